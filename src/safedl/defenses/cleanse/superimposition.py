"""Superimposition entropy of training samples: STRIP's test (Gao et al., ACSAC 2019) run on the training set itself.

STRIP superimposes an input with clean images and measures the entropy of the model's predictions: a trigger
dominates whatever it is blended with, so a triggered input keeps its (target) prediction and its entropy is low. STRIP
draws the overlays from a clean hold-out; here there is none, so each training sample is overlaid with training
samples of *other* labels (our variant): with all-to-one poison every sample outside the target class is clean,
so the overlays of the target class's samples carry no trigger. The blend is the pixel-wise maximum by default (our
variant: every lit trigger pixel survives; STRIP's saturating sum, ``blend="add"``, also lights the dark cells of a
checkerboard), and the score is the share of blends *not* predicted as the sample's own label (persistence of the
label; the entropy breaks ties). Used by ``isolate_cross_fit`` to isolate suspects with no trusted data.
"""
from __future__ import annotations

import torch
from torch import nn

from safedl.errors import ConfigError
from safedl.utils.tensors import eval_mode, model_device


def other_label_overlays(y: torch.Tensor, *, n_overlays: int, generator: torch.Generator) -> torch.Tensor:
    """N x ``n_overlays`` indices into ``y``: for sample i, samples drawn uniformly among those whose label is not
    ``y[i]`` (with replacement)."""
    classes = torch.unique(y)
    if len(classes) < 2:
        raise ConfigError("superimposition entropy: the data hold one class only; overlays must come from other labels")
    out = torch.empty(len(y), n_overlays, dtype=torch.long)
    for c in classes.tolist():
        rows = torch.nonzero(y == c).flatten()
        pool = torch.nonzero(y != c).flatten()
        pick = torch.randint(0, len(pool), (len(rows), n_overlays), generator=generator)
        out[rows] = pool[pick]
    return out


def superimposition_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, n_overlays: int = 16,
                           blend: str = "max", seed: int = 0, batch_size: int = 128) -> dict[str, torch.Tensor]:
    """Each ``x[i]`` superimposed with ``n_overlays`` samples of ``x`` labelled other than ``y[i]`` (``blend``:
    ``"max"``, the pixel-wise maximum, which keeps every lit trigger pixel; ``"add"``, STRIP's saturating sum) and
    predicted: ``entropy`` (mean prediction entropy, nats), ``persistence`` (share of blends still predicted as
    ``y[i]``) and ``score`` (``1 - persistence``, ties broken by entropy; low = the label survives blending)."""
    if blend not in ("max", "add"):
        raise ConfigError(f"superimposition blend={blend!r}: allowed 'max' or 'add'")
    overlay = other_label_overlays(y.cpu(), n_overlays=n_overlays, generator=torch.Generator().manual_seed(seed))
    dev = model_device(model)
    ent, keep = [], []
    with eval_mode(model), torch.no_grad():
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].to(dev)
            ov = x[overlay[i:i + batch_size]].to(dev)  # B x K x C x H x W
            mix = torch.maximum(xb[:, None], ov) if blend == "max" else (xb[:, None] + ov).clamp(0.0, 1.0)
            p = model(mix.flatten(0, 1)).float().softmax(1).clamp_min(1e-12).view(len(xb), n_overlays, -1)
            ent.append((-(p * p.log()).sum(2)).mean(1).cpu())
            keep.append((p.argmax(2) == y[i:i + batch_size].to(dev)[:, None]).float().mean(1).cpu())
    entropy = torch.cat(ent) if ent else torch.empty(0)
    persistence = torch.cat(keep) if keep else torch.empty(0)
    # entropy is at most log(num_classes) < 10: scaled below one persistence step (1 / n_overlays)
    score = (1.0 - persistence) + entropy / (10.0 * n_overlays * max(1.0, float(entropy.max()) if len(entropy) else 1.0))
    return {"entropy": entropy, "persistence": persistence, "score": score}


def superimposition_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, n_overlays: int = 16,
                            seed: int = 0, batch_size: int = 128) -> torch.Tensor:
    """Mean prediction entropy (nats) of each ``x[i]`` superimposed by STRIP's saturating sum with ``n_overlays``
    samples of ``x`` labelled other than ``y[i]``; low = the prediction survives blending."""
    return superimposition_scores(model, x, y, n_overlays=n_overlays, blend="add", seed=seed,
                                  batch_size=batch_size)["entropy"]
