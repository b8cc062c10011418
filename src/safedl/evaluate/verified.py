"""Verified accuracy of a deterministic certifier (``certifier:ibp``: interval bound propagation, Gowal et al. 2018,
arXiv:1810.12715) next to the empirical robust accuracy of the same evaluation images.

A verified image is classified correctly at every point of the L-inf ball, so no attack within that ball can break
it: per image, verified implies defended, hence verified accuracy <= empirical (adaptive) robust accuracy. The stage
checks this per image and records any violation (``verified_but_broken``), which would mean a bug in the bounds or
an attack leaving its ball.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from safedl import registry
from safedl.evaluate.base import EvasionState
from safedl.utils.stats import proportion

log = logging.getLogger(__name__)
#: L-inf radii of the certified-accuracy curve (the eps sweep users know), plus the certifier's and attack's eps
RADII = (0.01, 0.03, 0.05, 0.1, 0.2)


def interval_certification(cert: Any, st: EvasionState, defended: torch.Tensor, metrics: dict[str, Any],
                           notes: list[str]) -> None:
    """``certified_accuracy`` per L-inf radius and, for an L-inf attack with an eps budget, ``verified_accuracy``
    at the attack's eps (Wilson intervals), checked per image against the adaptive ``defended`` mask."""
    attack = registry.create("evasion", st.spec["name"], **st.spec.get("params", {}))
    linf = attack.bounded and attack.norm == "linf" and attack.eps > 0
    radii = sorted({*RADII, float(cert.eps), *([float(attack.eps)] if linf else [])})
    counts = cert.certified_accuracy(st.x, st.y, radii)
    metrics["certified_accuracy"] = {f"linf_{r:g}": proportion(k, m) for r, (k, m) in counts.items()}
    n = len(st.y)
    if not linf:
        notes.append(f"{cert.registry_name}: certificates are for L-inf balls; the paired attack "
                     f"{st.spec['name']} ({attack.norm}{'' if attack.bounded else ', no eps budget'}) is not one, so "
                     "no verified accuracy is set against its robust accuracy (certified_accuracy lists L-inf radii)")
        return
    ok = cert.certify(st.x, st.y, eps=attack.eps).cpu()
    metrics["verified_accuracy"] = proportion(int(ok.sum()), n)
    broken = int((ok & ~defended.cpu()).sum())
    metrics["verified_but_broken"] = broken
    notes.append(f"verified_accuracy: share of the {n} evaluation images that {cert.registry_name} proves correct "
                 f"on the whole L-inf ball of the attack's eps {attack.eps:g} (sound, incomplete: a lower bound on "
                 "the true robust accuracy, so it is at most the empirical robust_accuracy)")
    if broken:
        log.error("%s: %d verified images were broken by the adaptive attack: the bounds or the attack's ball "
                  "are wrong", cert.registry_name, broken)
        notes.append(f"SOUNDNESS FAILURE: {broken} verified images were broken by the adaptive attack")
