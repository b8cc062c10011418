"""One check of an attack's output against its own threat model, shared by the conformance suites."""
from __future__ import annotations

import torch


def assert_within_threat(attack, x: torch.Tensor, x_adv: torch.Tensor, *, tol: float = 1e-4) -> None:
    """The L-inf / L2 ball of ``eps``; for ``norm = "l0"`` at most ``k`` pixel positions changed; for
    ``norm = "patch"`` nothing outside the last call's ``support_`` changed, on at most ``patch_fraction`` of the
    image. Minimum-norm attacks (``bounded = False``) have no budget to check."""
    if not getattr(attack, "bounded", True):
        return
    delta = (x_adv - x).flatten(1)
    if attack.norm == "l0":
        changed = ((x_adv - x).abs() > 1e-7).any(1).flatten(1).sum(1)
        assert int(changed.max()) <= attack.k
    elif attack.norm == "patch":
        support = attack.support_.to(x.device).expand_as(x)
        assert torch.equal(x_adv[~support], x[~support])
        area = support[:, 0].flatten(1).float().mean(1)
        assert float(area.max()) <= attack.patch_fraction + 1e-6
    elif attack.norm == "linf":
        assert float(delta.abs().max()) <= attack.eps + tol
    else:
        assert float(delta.norm(dim=1).max()) <= attack.eps + tol
