"""Activation clustering (Chen et al., "Detecting Backdoor Attacks on Deep Neural Networks by Activation
Clustering", 2018).

Per class, the penultimate activations of a model trained on the poisoned data are reduced to ``n_dims`` dimensions
(``reduce``: PCA by default, or FastICA as in the paper; ICA's unit-variance whitening gives the one direction
that separates poisons the same weight as nine noise directions, which lowers silhouettes on MNIST) and split by
2-means (``n_clusters``, the profile's ``num_clusters``: 2 as in the paper; more is our variant, for classes with
several legitimate modes: the candidate poison cluster is then one of k, by the same rules; with k above the number
of modes the poisons can split over clusters and only one is removed: 8x8 digits, 10% 2x2 patch, seed 0, trusted =
validation split: k = 3 flags 0.643 of the poisons at fpr 0.035, tests/test_workflow_params.py). Deciding which classes
are poisoned (``rule``):

- ``"size"`` (the canonical rule): the smaller cluster is poison when its relative size is <= ``size_threshold``.
  It assumes poisons are a minority of their class and flags a clean cluster in every class that happens to split.
- ``"silhouette"`` (default): decide from the data. The 2-means silhouette score says whether the class really
  splits in two. With a trusted clean set, its samples of the class are assigned to the clusters: a cluster holding
  a share s of the class that receives far fewer trusted samples than s predicts (one-sided binomial test,
  p < ``alpha``, and at most ``max_trusted_ratio`` of the expected share) is foreign, and the class is poisoned if also silhouette >= ``silhouette_threshold``; this works
  even when poisons outnumber the clean samples of their class. Without trusted data the class is poisoned when the
  silhouette is >= ``untrusted_silhouette`` and the smaller cluster is taken as the poison.

``reclassify=True`` adds the paper's exclusionary reclassification for every suspected cluster: a model is trained
(with ``train_fn``) on the data without that cluster and classifies it; with ``l`` = (#predicted as its label) /
(#predicted as the most common other class), the cluster is legitimate if ``l > reclass_threshold`` and its class is
cleared. The score is (d_clean - d_poison) / (d_clean + d_poison) of each sample's distances to the two centres, halved in
classes not judged poisoned, so one ranking over all classes gives an AUROC.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import nn

from safedl.data.dataset import Dataset
from safedl.defenses.cleanse._common import FEATURE_SPACE_KNOWN_WEAK, TrainFn, class_indices, foreign_mode, need_model
from safedl.models.features import extract_features
from safedl.defenses.cleanse.result import DetectionResult
from safedl.registry import register
from safedl.utils.tensors import predict
from safedl.utils.validate import check_choice, check_positive, check_range


@register("cleanser", "activation_clustering")
class ActivationClustering:
    """Activation clustering (Chen et al. 2018): per-class 2-means on reduced activations, silhouette or size rule."""

    model_needs: tuple[str, ...] = ("features",)  # what the model must offer (safedl.models.features.model_problems)
    inputs: ClassVar[frozenset[str]] = frozenset({"model", "trusted", "train_fn"})
    trusted_data: ClassVar[str] = "optional"
    trusted_role: ClassVar[str] = "decides which cluster of a class is foreign"
    known_weak: ClassVar[dict[str, str]] = FEATURE_SPACE_KNOWN_WEAK

    def __init__(self, *, n_dims: int = 10, reduce: str = "pca", rule: str = "silhouette",
                 silhouette_threshold: float = 0.15, alpha: float = 0.05, max_trusted_ratio: float = 0.25, untrusted_silhouette: float = 0.5,
                 size_threshold: float = 0.35, reclassify: bool = False,
                 reclass_threshold: float = 1.0, seed: int = 0, n_clusters: int = 2):
        self.n_clusters = check_range(self, "n_clusters", n_clusters, low=2, high=20, integer=True)
        self.n_dims = check_range(self, "n_dims", n_dims, low=1, high=512, integer=True)
        self.reduce = check_choice(self, "reduce", reduce, ("ica", "pca"))
        self.rule = check_choice(self, "rule", rule, ("silhouette", "size"))
        self.silhouette_threshold = check_range(self, "silhouette_threshold", silhouette_threshold, low=-1.0, high=1.0)
        self.max_trusted_ratio = check_range(self, "max_trusted_ratio", max_trusted_ratio, low=0.0, high=1.0)
        self.alpha = check_range(self, "alpha", alpha, low=0.0, high=1.0, low_inclusive=False)
        self.untrusted_silhouette = check_range(self, "untrusted_silhouette", untrusted_silhouette, low=-1.0, high=1.0)
        self.size_threshold = check_range(self, "size_threshold", size_threshold, low=0.0, high=0.5)
        self.reclassify = check_choice(self, "reclassify", reclassify, (True, False))
        self.reclass_threshold = check_positive(self, "reclass_threshold", reclass_threshold)
        self.seed = check_range(self, "seed", seed, low=0, integer=True)

    def _reduce(self, r: np.ndarray) -> tuple[np.ndarray, object]:
        from sklearn.decomposition import PCA, FastICA

        k = int(min(self.n_dims, r.shape[0] - 1, r.shape[1]))
        if self.reduce == "ica":
            red = FastICA(k, random_state=self.seed, max_iter=400, whiten="unit-variance", tol=1e-3)
        else:
            red = PCA(k, random_state=self.seed)
        return red.fit_transform(r), red

    def find_poison(self, data: Dataset, *, model: nn.Module | None = None, trusted: Dataset | None = None,
                    train_fn: TrainFn | None = None, device: str | torch.device = "cpu") -> DetectionResult:
        import warnings

        from sklearn.cluster import KMeans
        from sklearn.metrics import silhouette_score

        model = need_model("activation_clustering", data, model, train_fn)
        feats = extract_features(model, data.x).double().numpy()
        t_feats = extract_features(model, trusted.x).double().numpy() if trusted is not None and len(trusted) else None
        n = len(data)
        flag = np.zeros(n, dtype=bool)
        score = np.zeros(n)
        per_class: list[dict] = []
        for c, idx_t in enumerate(class_indices(data.y, data.num_classes)):
            idx = idx_t.numpy()
            if len(idx) < max(6, 3 * self.n_clusters):
                per_class.append({"class": c, "n": len(idx), "poisoned": False})
                continue
            r = feats[idx]
            mu, sd = r.mean(0), 1.0  # centred only: scaling would inflate near-dead units
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # FastICA convergence chatter on near-degenerate ReLU features
                z, red = self._reduce((r - mu) / sd)
            km = KMeans(self.n_clusters, n_init=10, random_state=self.seed).fit(z)
            lab = km.labels_
            sizes = np.bincount(lab, minlength=self.n_clusters)
            sil = float(silhouette_score(z, lab, sample_size=min(len(z), 2000), random_state=self.seed)) \
                if sizes.min() > 0 else 0.0
            t_assign = None
            if t_feats is not None and trusted is not None:
                tc = t_feats[(trusted.y == c).numpy()]
                if len(tc):
                    t_assign = km.predict(red.transform((tc - mu) / sd))
            fm = foreign_mode(lab, t_assign)
            if self.rule == "size":
                p, how = int(np.argmin(sizes)), "smaller cluster"
                poisoned = sizes[p] / len(idx) <= self.size_threshold
            else:
                p, how = fm["mode"], fm["how"]
                if fm["p_value"] is not None:
                    poisoned = (sil >= self.silhouette_threshold and fm["p_value"] < self.alpha
                                and fm["trusted_ratio"] <= self.max_trusted_ratio)
                else:
                    poisoned = sil >= self.untrusted_silhouette
            entry = {"class": c, "n": len(idx), "silhouette": round(sil, 4), "sizes": sizes.tolist(),
                     "poison_cluster": how, "p_value": fm["p_value"], "trusted_counts": fm.get("trusted_counts")}
            members = idx[lab == p]
            if poisoned and self.reclassify:
                if train_fn is None:
                    from safedl.errors import ConfigError

                    raise ConfigError("activation_clustering: reclassify=True needs train_fn")
                keep = np.ones(n, dtype=bool)
                keep[members] = False
                m = train_fn(data.subset(torch.from_numpy(keep)))
                pred = predict(m, data.x[torch.from_numpy(members)]).cpu()
                counts = torch.bincount(pred, minlength=data.num_classes).float()
                own = float(counts[c])
                counts[c] = -1
                other = float(counts.max())
                ratio = own / max(other, 1.0)
                entry["reclass_ratio"] = round(ratio, 4)
                if ratio > self.reclass_threshold:  # the cluster is still recognised as its label: legitimate
                    poisoned = False
            d = np.linalg.norm(z[:, None, :] - km.cluster_centers_[None], axis=2)
            d_other = np.delete(d, p, axis=1).min(1)  # nearest other centre (the other one when k = 2)
            s = (d_other - d[:, p]) / np.maximum(d_other + d[:, p], 1e-12)
            weight = 1.0 if poisoned else 0.5
            score[idx] = s * weight
            if poisoned:
                flag[members] = True
            entry.update(poisoned=bool(poisoned), removed=int(len(members)) if poisoned else 0)
            per_class.append(entry)
        info = {"rule": self.rule, "reduce": self.reduce, "n_clusters": self.n_clusters, "per_class": per_class,
                "poisoned_classes": [e["class"] for e in per_class if e.get("poisoned")]}
        return DetectionResult(torch.from_numpy(flag), torch.from_numpy(score).float(), info)
