"""ART evasion attacks as safedl evasion attacks (``art:ProjectedGradientDescent``, ``art:SquareAttack``, ...).

White-box ART attacks (those needing loss or class gradients) run on ART's PyTorchClassifier over the model they are
given, which in an adaptive evaluation is the defended system's attack surface (BPDA/EOT included). Black-box ones
see the model only through safedl's counted :class:`~safedl.attacks.query.QueryInterface` (scores), one sample at
a time, so ``queries_`` is exact per sample. Every output is checked to lie in [0, 1] and, for attacks with an
``eps``, in the eps-ball of its norm: ``on_violation="error"`` refuses the batch, ``"project"`` projects it back
and counts the samples in ``eps_violations_`` (the stage reports them).
"""
from __future__ import annotations

import inspect
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from safedl.attacks.base import EvasionAttack
from safedl.attacks.query import QueryInterface
from safedl.errors import AttackContractError, ConfigError
from safedl.integrations.art.estimator import QueryModel, art_classifier, num_classes, numpy_seed, probe_classifier
from safedl.utils.validate import check_choice, check_positive

#: norm spellings a profile may use for an ART attack -> safedl's name; and safedl's name -> ART's value
NORM_NAMES: dict[Any, str] = {"linf": "linf", "inf": "linf", float("inf"): "linf", "l2": "l2", "2": "l2", 2: "l2"}
ART_NORMS: dict[str, Any] = {"linf": np.inf, "l2": 2}
TOL = 1e-5
OWN_PARAMS = [
    inspect.Parameter("seed", inspect.Parameter.KEYWORD_ONLY, default=0, annotation="int | None"),
    inspect.Parameter("on_violation", inspect.Parameter.KEYWORD_ONLY, default="error", annotation="str"),
]


def canonical_norm(owner: Any, value: Any) -> str:
    """safedl's name of an ART norm value (inf / 'inf' / 'linf', 2 / 'l2'); anything else is a ConfigError."""
    key = value.lower() if isinstance(value, str) else value
    if key not in NORM_NAMES:
        raise ConfigError(f"{owner.registry_kind} {owner.registry_name!r}: norm={value!r} is not supported; allowed: "
                          "'linf' (inf) or 'l2' (2)")
    return NORM_NAMES[key]


#: ART's decision-based attacks: they read only the top-1 label, so they get labels-only access
DECISION_BASED = frozenset({"HopSkipJump", "BoundaryAttack", "GeoDA", "SignOPTAttack"})


def access_of(art_cls: type) -> str:
    """``white-box`` (ART needs gradients), ``labels`` (decision-based) or ``scores``."""
    if gradient_access(art_cls):
        return "white-box"
    return "labels" if art_cls.__name__ in DECISION_BASED else "scores"


def gradient_access(art_cls: type) -> bool:
    """Whether the ART attack needs gradients (its estimator requirements name a gradients mixin)."""
    reqs = getattr(art_cls, "_estimator_requirements", ()) or ()
    flat = [r for req in reqs for r in (req if isinstance(req, tuple) else (req,))]
    return any(getattr(r, "__name__", "") in ("LossGradientsMixin", "ClassGradientsMixin") for r in flat)


def distance(x: torch.Tensor, x_adv: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample L-inf or L2 distance."""
    delta = (x_adv - x).flatten(1)
    return delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)


def project(x: torch.Tensor, x_adv: torch.Tensor, *, norm: str, eps: float | None) -> torch.Tensor:
    """``x_adv`` projected onto the eps-ball around ``x`` (when ``eps`` is set) and into [0, 1]."""
    delta = x_adv - x
    if eps is not None:
        if norm == "linf":
            delta = delta.clamp(-eps, eps)
        else:
            scale = (eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
            delta = delta * scale.view(-1, *([1] * (x.ndim - 1)))
    return (x + delta).clamp(0, 1)


class ArtEvasionAttack(EvasionAttack):
    """Base of the generated ``art:<Class>`` evasion adapters (one subclass per ART class, made by ``resolve``)."""

    art_class: ClassVar[type]
    art_param_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **params: Any):
        self.seed = params.pop("seed")
        self.on_violation = check_choice(self, "on_violation", params.pop("on_violation"), ("error", "project"))
        for key, value in params.items():
            setattr(self, key, value)
        if "norm" in params:
            self.norm = canonical_norm(self, params["norm"])
        self.bounded = "eps" in params  # type: ignore[misc]
        if self.bounded:
            self.eps = float(check_positive(self, "eps", params["eps"]))
            if self.norm == "linf" and self.eps > 1:
                raise ConfigError(f"{self.registry_name}: eps={self.eps!r} is larger than the [0, 1] pixel range "
                                  "for norm 'linf'")
        self.eps_violations_ = 0
        self._build(probe_classifier(), targeted=False)  # ART validates its parameters in its constructor

    def params(self) -> dict:
        """The constructor arguments (ART's and safedl's), as the results file records them."""
        return {k: getattr(self, k) for k in (*self.art_param_names, "seed", "on_violation")}

    def art_kwargs(self) -> dict[str, Any]:
        """The ART constructor arguments (norm in ART's spelling)."""
        kw = {k: getattr(self, k) for k in self.art_param_names}
        if "norm" in kw:
            kw["norm"] = ART_NORMS[self.norm]
        return kw

    def _build(self, classifier: Any, *, targeted: bool) -> Any:
        accepted = inspect.signature(self.art_class.__init__).parameters
        kw = self.art_kwargs()
        if targeted:
            if "targeted" not in accepted:
                raise ConfigError(f"evasion {self.registry_name!r} has no targeted mode in ART; set targeted: false")
            kw["targeted"] = True
        if "verbose" in accepted:
            kw["verbose"] = False
        try:
            return self.art_class(classifier, **kw)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"evasion {self.registry_name!r}: ART refused the parameters {kw!r}: {exc}") from None

    def _generate(self, classifier: Any, x: torch.Tensor, labels: torch.Tensor, *, targeted: bool) -> torch.Tensor:
        attack = self._build(classifier, targeted=targeted)
        with numpy_seed(self.seed), torch.random.fork_rng(devices=[]):
            if self.seed is not None:
                torch.manual_seed(int(self.seed))
            out = attack.generate(x.detach().cpu().numpy(), y=labels.detach().cpu().numpy())
        try:
            return torch.as_tensor(np.asarray(out, dtype=np.float32), dtype=x.dtype).reshape(x.shape).to(x.device)
        except (ValueError, TypeError, RuntimeError):
            raise AttackContractError(f"{self.registry_name}: ART's generate did not return adversarial images of the "
                                      f"input's shape {tuple(x.shape)} (attacks that return a patch or a universal "
                                      "perturbation are not supported by the adapter)") from None

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        k = num_classes(model, x)
        labels, targeted = (y, False) if target is None else (target, True)
        if self.access == "white-box":
            clf = art_classifier(model, input_shape=tuple(x.shape[1:]), nb_classes=k, device=x.device)
            self.queries_ = None
            params = list(model.parameters())
            grads = [p.grad for p in params]  # ART's loss_gradient calls model.zero_grad(): put .grad back
            try:
                return self.checked(x, self._generate(clf, x, labels, targeted=targeted))
            finally:
                for p, g in zip(params, grads):
                    p.grad = g
        advs, counts = [], []
        for i in range(len(x)):  # one sample at a time: each query is counted for the sample it belongs to
            interface = QueryInterface(model, n=1, output=self.access, device=x.device)
            clf = art_classifier(QueryModel(interface, num_classes=k), input_shape=tuple(x.shape[1:]), nb_classes=k,
                                 device=x.device)
            advs.append(self._generate(clf, x[i:i + 1], labels[i:i + 1], targeted=targeted))
            counts.append(interface.counts.cpu())
        self.queries_ = torch.cat(counts)
        return self.checked(x, torch.cat(advs))

    def checked(self, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        """``x_adv`` after the [0, 1] and eps-ball checks (see the module docstring)."""
        flat = x_adv.flatten(1)
        bad = (flat < -TOL).any(1) | (flat > 1 + TOL).any(1)
        dist = distance(x, x_adv, self.norm)
        if self.bounded:
            bad |= dist > self.eps * (1 + 1e-4) + TOL
        if bool(bad.any()):
            msg = (f"{self.registry_name}: {int(bad.sum())} of {len(x)} outputs lie outside [0, 1]"
                   + (f" or the {self.norm} eps-ball (eps {self.eps:g}, largest distance {float(dist.max()):.6g})"
                      if self.bounded else ""))
            if self.on_violation == "error":
                raise AttackContractError(msg + "; set on_violation: project to project them back and count them")
            self.eps_violations_ += int(bad.sum())
        return project(x, x_adv, norm=self.norm, eps=self.eps if self.bounded else None)
