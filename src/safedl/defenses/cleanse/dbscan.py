"""DBSCAN on per-class penultimate features (Ester, Kriegel, Sander & Xu, "A density-based algorithm for
discovering clusters in large spatial databases with noise", KDD 1996) as a poison cleanser.

Per class, the penultimate representations of a model trained on the data are standardised and reduced with PCA
(as activation clustering reduces them before clustering), then clustered by DBSCAN. Poisons that share a trigger
form their own dense cluster inside the target class, and scattered outliers (e.g. flipped labels) become noise.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import nn

from safedl.data.dataset import Dataset
from safedl.defenses.cleanse._common import TrainFn, judge_per_class, need_model
from safedl.defenses.cleanse.result import DetectionResult
from safedl.models.features import extract_features
from safedl.registry import register
from safedl.utils.validate import check_range


def k_distance(z: np.ndarray, k: int) -> np.ndarray:
    """Per point, the distance to its k-th nearest other point (Ester et al.'s k-dist)."""
    from sklearn.neighbors import NearestNeighbors

    k = min(k, len(z) - 1)
    dist, _ = NearestNeighbors(n_neighbors=k + 1).fit(z).kneighbors(z)
    return dist[:, k]


def reduce(r: np.ndarray, n_components: int) -> np.ndarray:
    """Standardise per feature and project on the top ``n_components`` principal components."""
    z = (r - r.mean(0)) / (r.std(0) + 1e-8)
    k = min(n_components, z.shape[1], len(z))
    _, _, vt = np.linalg.svd(z, full_matrices=False)
    return z @ vt[:k].T


@register("cleanser", "dbscan")
class DBSCANCleanser:
    """Per-class DBSCAN (Ester et al. 1996) on PCA-reduced penultimate features; flags noise points and the members
    of small clusters. ``eps`` is the neighbourhood radius; ``eps=None`` uses the paper's heuristic: the
    k-dist (distance to the ``min_samples``-th neighbour) at the (1 - ``noise_fraction``) quantile of the class,
    ``noise_fraction`` being the share of noise the user expects. A cluster is small when it holds less than
    ``max_cluster_share`` of its class and is not the class's largest cluster. The score is 1 minus the share of
    the class in the sample's cluster (1 for noise), so small clusters and noise rank first. The default
    ``noise_fraction`` 0.2 was picked on digits seed 0 (planted 2x2-patch poison at 3% and 10%): at 0.05 the radius
    merged the poison cluster into its class.
    """

    model_needs: tuple[str, ...] = ("features",)  # what the model must offer (safedl.models.features.model_problems)
    inputs: ClassVar[frozenset[str]] = frozenset({"model", "train_fn"})
    trusted_data: ClassVar[str] = "unused"
    trusted_role: ClassVar[str] = "not used"
    known_weak: ClassVar[dict[str, str]] = {}
    conformance_params: ClassVar[dict] = {"min_samples": 4, "noise_fraction": 0.1}

    def __init__(self, *, eps: float | None = None, min_samples: int = 5, noise_fraction: float = 0.2,
                 max_cluster_share: float = 0.35, n_components: int = 10):
        if eps is not None:
            check_range(self, "eps", eps, low=0.0, low_inclusive=False)
        self.eps = eps
        self.min_samples = check_range(self, "min_samples", min_samples, low=1, integer=True)
        self.noise_fraction = check_range(self, "noise_fraction", noise_fraction, low=0.0, high=1.0,
                                          low_inclusive=False, high_inclusive=False)
        self.max_cluster_share = check_range(self, "max_cluster_share", max_cluster_share, low=0.0, high=1.0)
        self.n_components = check_range(self, "n_components", n_components, low=1, integer=True)

    def _class(self, r: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
        """Flags, scores and facts for one class's features."""
        from sklearn.cluster import DBSCAN

        z = reduce(r, self.n_components)
        eps = self.eps if self.eps is not None else float(np.quantile(k_distance(z, self.min_samples),
                                                                         1 - self.noise_fraction))
        labels = DBSCAN(eps=max(eps, 1e-12), min_samples=self.min_samples).fit_predict(z)
        ids, sizes = np.unique(labels[labels >= 0], return_counts=True)
        share = np.zeros(len(z))
        small = np.zeros(len(z), dtype=bool)
        largest = ids[np.argmax(sizes)] if len(ids) else None
        for c, s in zip(ids, sizes):
            member = labels == c
            share[member] = s / len(z)
            small[member] = c != largest and s / len(z) < self.max_cluster_share
        noise = labels < 0
        flags = noise | small
        facts = {"eps": round(eps, 6), "clusters": [int(s) for s in sizes], "noise": int(noise.sum()),
                 "small_cluster_members": int(small.sum())}
        return flags, 1.0 - share, facts

    def find_poison(self, data: Dataset, *, model: nn.Module | None = None, trusted: Dataset | None = None,
                    train_fn: TrainFn | None = None, device: str | torch.device = "cpu") -> DetectionResult:
        model = need_model("dbscan", data, model, train_fn)
        feats = extract_features(model, data.x).double().numpy()
        flag, score, per_class = judge_per_class(feats, data, self._class, min_n=self.min_samples + 1,
                                                 skipped="fewer samples than min_samples + 1")
        return DetectionResult(torch.from_numpy(flag), torch.from_numpy(score).float(),
                               {"eps": self.eps, "min_samples": self.min_samples, "per_class": per_class})
