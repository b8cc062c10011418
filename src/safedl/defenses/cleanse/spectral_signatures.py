"""Spectral signatures (Tran, Li & Madry, NeurIPS 2018): poisons leave a trace along the top singular direction.

Per class, the penultimate representations of a model trained on the poisoned data are centred and projected on
their top right singular vector; the outlier score is the squared projection (the paper's; ``n_directions`` > 1
uses the norm of the projection on the top k singular vectors).

Two removal rules (``rule``):

- ``"fixed"`` (the paper's): in every class remove the ``eps_multiplier x expected_fraction`` share of samples with
  the highest scores. It needs the poison fraction in advance and, when poisons are about half their class, fails:
  both modes then lie equally far from the centre, so the squared score cannot tell them apart.
- ``"auto"`` (default): decide from the data. Per class a two-component Gaussian mixture is fitted to the *signed*
  projections on the top ``n_directions`` singular vectors (poisons on one side, at any share), and another to their
  norm (the outlier score: a small share of poisons far out); default k = 2, as at a 1% poison rate on MNIST the
  poisons spread over two directions. Ashman's D measures how well the modes separate; the better-supported split
  (smallest p-value among those that pass) decides. With a trusted clean set, the trusted samples of the
  class are assigned to the modes: a mode that holds a share s of the class but receives far fewer trusted samples
  than s predicts (one-sided binomial test, p < ``alpha``, and at most ``max_trusted_ratio`` of the expected share) is foreign, and the class is poisoned if also
  D >= ``min_separation``. This works at any poison share, including poisons outnumbering clean samples. Without
  trusted data, the class is poisoned when D >= ``untrusted_separation`` and the smaller mode (assumed poison) holds
  at least ``min_share`` of the class. Samples whose posterior for the poison mode exceeds 0.5 are flagged; the
  score is that posterior, halved in classes not judged poisoned, so the ranking over all classes gives an AUROC.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import nn

from safedl.data.dataset import Dataset
from safedl.defenses.cleanse._common import (FEATURE_SPACE_KNOWN_WEAK, TrainFn, class_indices,
                                           foreign_mode, gmm_split, need_model)
from safedl.models.features import extract_features
from safedl.defenses.cleanse.result import DetectionResult
from safedl.registry import register
from safedl.utils.validate import check_choice, check_fraction, check_positive, check_range


@register("cleanser", "spectral_signatures")
class SpectralSignatures:
    """Spectral signatures (Tran et al. 2018) with a data-driven per-class removal rule (or the paper's fixed one)."""

    model_needs: tuple[str, ...] = ("features",)  # what the model must offer (safedl.models.features.model_problems)
    inputs: ClassVar[frozenset[str]] = frozenset({"model", "trusted", "train_fn"})
    trusted_data: ClassVar[str] = "optional"
    trusted_role: ClassVar[str] = "decides which mode of a class is foreign"
    known_weak: ClassVar[dict[str, str]] = FEATURE_SPACE_KNOWN_WEAK

    def __init__(self, *, rule: str = "auto", expected_fraction: float = 0.1, eps_multiplier: float = 1.5,
                 n_directions: int = 2, min_separation: float = 2.0, alpha: float = 0.05, max_trusted_ratio: float = 0.25, untrusted_separation: float = 4.0,
                 min_share: float = 0.01, seed: int = 0):
        self.rule = check_choice(self, "rule", rule, ("auto", "fixed"))
        self.expected_fraction = check_fraction(self, "expected_fraction", expected_fraction)
        self.eps_multiplier = check_positive(self, "eps_multiplier", eps_multiplier)
        self.min_separation = check_positive(self, "min_separation", min_separation)
        self.n_directions = check_range(self, "n_directions", n_directions, low=1, high=64, integer=True)
        self.max_trusted_ratio = check_range(self, "max_trusted_ratio", max_trusted_ratio, low=0.0, high=1.0)
        self.alpha = check_range(self, "alpha", alpha, low=0.0, high=1.0, low_inclusive=False)
        self.untrusted_separation = check_positive(self, "untrusted_separation", untrusted_separation)
        self.min_share = check_range(self, "min_share", min_share, low=0.0, high=0.5)
        self.seed = check_range(self, "seed", seed, low=0, integer=True)

    def find_poison(self, data: Dataset, *, model: nn.Module | None = None, trusted: Dataset | None = None,
                    train_fn: TrainFn | None = None, device: str | torch.device = "cpu") -> DetectionResult:
        model = need_model("spectral_signatures", data, model, train_fn)
        feats = extract_features(model, data.x)
        t_feats = extract_features(model, trusted.x) if trusted is not None and len(trusted) else None
        n = len(data)
        flag = torch.zeros(n, dtype=torch.bool)
        score = torch.zeros(n)
        per_class: list[dict] = []
        for c, idx in enumerate(class_indices(data.y, data.num_classes)):
            if len(idx) < 4:
                per_class.append({"class": c, "n": len(idx), "poisoned": False})
                continue
            r = feats[idx].double()
            mu = r.mean(0, keepdim=True)
            # top right singular vector of the centred representations
            _, _, vh = torch.linalg.svd(r - mu, full_matrices=False)
            v = vh[: self.n_directions].T
            proj = ((r - mu) @ v).numpy()
            entry: dict = {"class": c, "n": len(idx)}
            if self.rule == "fixed":
                s = (proj**2).sum(1)
                k = min(len(idx), int(np.ceil(self.eps_multiplier * self.expected_fraction * len(idx))))
                top = np.argsort(-s)[:k]
                f = np.zeros(len(idx), dtype=bool)
                f[top] = True
                flag[idx] = torch.from_numpy(f)
                score[idx] = torch.from_numpy(s / max(float(s.mean()), 1e-12)).float()
                entry.update(poisoned=k > 0, removed=int(k))
            else:
                t_proj = None
                if t_feats is not None:
                    tc = t_feats[trusted.y == c]
                    t_proj = ((tc.double() - mu) @ v).numpy() if len(tc) else None
                # two candidate splits: the signed projections (poisons on one side, any share) and their norm (the
                # outlier score itself: a small share of poisons far out); the best-supported one decides
                cands = []
                for form in ("signed", "radial"):
                    xs = proj if form == "signed" else np.linalg.norm(proj, axis=1, keepdims=True)
                    g = gmm_split(xs, seed=self.seed)
                    if g["model"] is None:
                        continue
                    t_assign = None
                    if t_proj is not None:
                        tx = t_proj if form == "signed" else np.linalg.norm(t_proj, axis=1, keepdims=True)
                        t_assign = g["model"].predict(tx)
                    fm = foreign_mode(g["post"].argmax(1), t_assign)
                    w = np.asarray(g["weights"])
                    if fm["p_value"] is not None:
                        ok = (g["D"] >= self.min_separation and fm["p_value"] < self.alpha
                              and fm["trusted_ratio"] <= self.max_trusted_ratio)
                    else:
                        ok = g["D"] >= self.untrusted_separation and w[fm["mode"]] >= self.min_share
                    cands.append((not ok, fm["p_value"] if fm["p_value"] is not None else -g["D"], form, g, fm, ok))
                if not cands:
                    per_class.append({**entry, "poisoned": False})
                    continue
                _, _, form, g, fm, poisoned = min(cands, key=lambda t: (t[0], t[1]))
                weights = np.asarray(g["weights"])
                p = fm["mode"]
                post = g["post"][:, p]
                f = (post > 0.5) & poisoned
                flag[idx] = torch.from_numpy(f)
                score[idx] = torch.from_numpy(post * (1.0 if poisoned else 0.5)).float()
                entry.update(poisoned=bool(poisoned), split=form, separation_D=round(g["D"], 3),
                             weights=[round(w, 4) for w in weights.tolist()], poison_mode=fm["how"],
                             p_value=fm["p_value"], trusted_counts=fm.get("trusted_counts"), removed=int(f.sum()))
            per_class.append(entry)
        info = {"rule": self.rule, "n_directions": self.n_directions, "per_class": per_class,
                "poisoned_classes": [e["class"] for e in per_class if e.get("poisoned")]}
        return DetectionResult(flag, score, info)
