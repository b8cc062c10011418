"""Prediction poisoning, our last-layer variant of MAD (Orekondy, Schiele & Fritz, "Prediction Poisoning: Towards
Defenses Against DNN Model Stealing Attacks", ICLR 2020), with the argmax kept (the paper's MAD-argmax)."""
from __future__ import annotations

import torch
from torch import nn

from safedl.errors import ConfigError
from safedl.utils.validate import check_range


def last_linear(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` of ``model`` (the surrogate's classifier layer)."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not layers:
        raise ConfigError(f"LastLayerMAD: the surrogate {type(model).__name__} has no nn.Linear layer")
    return layers[-1]


def blend_keeping_argmax(y: torch.Tensor, target: torch.Tensor, *, epsilon: float) -> torch.Tensor:
    """(1 - a) y + a e_target per row, with the largest a in [0, 1] such that the L1 change a ||e_t - y||_1 is at
    most ``epsilon`` and the top class of y stays strictly on top (closed form per row)."""
    n, k = y.shape
    e = torch.nn.functional.one_hot(target, k).to(y.dtype)
    l1 = (e - y).abs().sum(1).clamp_min(1e-12)
    a = (epsilon / l1).clamp(max=1.0)
    top = y.argmax(1)
    other = target != top
    # the top class keeps (1 - a) y_top; the target reaches (1 - a) y_t + a: stay below by a small margin
    yt, yk = y[torch.arange(n), top], y[torch.arange(n), target]
    limit = (yt - yk) / (1.0 + yt - yk) * (1.0 - 1e-3)
    a = torch.where(other, torch.minimum(a, limit.clamp_min(0.0)), a)
    return (1 - a).unsqueeze(1) * y + a.unsqueeze(1) * e


def random_surrogate(shape: tuple[int, int, int], num_classes: int, *, arch: str = "small_cnn", seed: int = 0,
                     mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None) -> nn.Module:
    """A randomly initialised ``arch`` for images of ``shape`` (the attacker's model before it learns; seeded
    without touching the global RNG), normalised with ``mean``/``std`` (0.5 per channel without them)."""
    from safedl.models import build_model, with_normalization

    c, h, _ = shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        net = build_model(arch, in_channels=c, num_classes=num_classes, image_size=h)
    return with_normalization(net, mean or (0.5,) * c, std or (0.5,) * c).eval()


class LastLayerMAD:
    """MAD picks, per query, the answer y~ that turns the attacker's training gradient G^T y~ farthest (in angle)
    from the honest one G^T y, within ||y~ - y||_1 <= ``epsilon``; G is the Jacobian of the log-probabilities of
    a surrogate of the attacker's model with respect to its parameters. As in the paper, the maximum is sought at
    the simplex's vertices e_k, and y~ = (1 - a) y + a e_k (here: the vertex whose blend, at the largest a the
    budget and the argmax rule allow, turns the gradient most).

    Our variant: G over the surrogate's last linear layer only. There d log p_k / d(W, b) = (e_k - p) [h; 1]^T
    (p: the surrogate's probabilities, h: its features), so the angle between G^T y and G^T y~ is the angle
    between y - p and y~ - p: one forward pass per query, no per-class backward pass. ``surrogate``: a model of
    the attacker's architecture, randomly initialised (the paper's choice; the served model itself would give
    p = y and no direction). The top-1 label is always kept (MAD-argmax), so benign top-1 accuracy is unchanged.
    """

    def __init__(self, *, surrogate: nn.Module, epsilon: float = 1.0):
        self.surrogate = surrogate.eval()
        last_linear(surrogate)
        self.epsilon = float(check_range(self, "epsilon", epsilon, low=0.0, high=2.0))

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Poisoned probabilities (same shape and top-1 label as ``probs``) for the images ``x``."""
        p = self.surrogate(x).softmax(1).to(probs.dtype)
        honest = probs - p
        n, k = probs.shape
        best, best_cos = probs, torch.full((n,), float("inf"), dtype=probs.dtype, device=probs.device)
        for c in range(k):  # each vertex, blended within the budget and the argmax rule: keep the most turned
            cand = blend_keeping_argmax(probs, torch.full((n,), c, device=probs.device), epsilon=self.epsilon)
            cos = torch.nn.functional.cosine_similarity(cand - p, honest, dim=1, eps=1e-12)
            better = cos < best_cos
            best = torch.where(better.unsqueeze(1), cand, best)
            best_cos = torch.where(better, cos, best_cos)
        return best
