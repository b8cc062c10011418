"""Ensemble of attacks, AutoAttack-style (Croce & Hein, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks", ICML 2020): the per-sample worst case over several attacks."""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from safedl import registry
from safedl.attacks.base import EvasionAttack
from safedl.data.dataset import Dataset
from safedl.errors import ConfigError
from safedl.utils.tensors import predict

#: AutoAttack's standard suite (Croce & Hein 2020, in its order): APGD-CE, APGD-T (targeted DLR over the 9 top wrong
#: classes), FAB-T (targeted FAB over the 9 top wrong classes), Square with 5000 queries
DEFAULT_ATTACKS: tuple[dict, ...] = (
    {"name": "apgd_ce", "params": {}},
    {"name": "apgd_dlr", "params": {"n_target_classes": 9}},
    {"name": "fab", "params": {"n_target_classes": 9}},
    {"name": "square", "params": {"max_queries": 5000}},
)
_ACCESS_ORDER = ("white-box", "transfer", "scores", "labels")  # most to least demanding


class _Access:
    """``access`` of an ensemble: the most demanding of its members' (the class itself reads 'white-box')."""

    def __get__(self, obj: Any, owner: type) -> str:
        if obj is None or not getattr(obj, "_members", None):
            return "white-box"
        return min((m.access for m in obj._members), key=_ACCESS_ORDER.index)


@registry.register("evasion", "ensemble")
class EnsembleAttack(EvasionAttack):
    """Run ``attacks`` (a list of {"name", "params"} specs) in order, each only on the samples that every earlier
    attack left correctly classified (or, targeted, not yet at their target), and keep each sample's first success.

    All members share the ensemble's ``eps`` and ``norm``, so the worst case stays within one budget. After a
    call, ``broken_by_`` (LongTensor N) holds the index into ``attack_names_`` of the attack that broke each sample
    (-1: not broken, including samples misclassified before any attack) and ``queries_`` the summed black-box
    queries, plus one label query per sample per success check, when every member is black-box.
    """

    access = _Access()  # type: ignore[assignment]
    conformance_params: ClassVar[dict] = {"eps": 0.3, "attacks": [{"name": "apgd_ce", "params": {"steps": 5}},
                                                                  {"name": "square", "params": {"max_queries": 50}}]}

    def __init__(self, *, attacks: list[dict] | None = None, eps: float = 0.3, norm: str = "linf"):
        self._init_norm_eps(norm, eps)
        specs = [dict(s) for s in (DEFAULT_ATTACKS if attacks is None else attacks)]
        if not specs:
            raise ConfigError("ensemble: attacks=[] is empty; give at least one {'name', 'params'} spec")
        self.attacks = attacks
        self.member_specs: list[dict] = []  # the members as run: the ensemble's eps and norm filled in
        self._members: list[EvasionAttack] = []
        for i, spec in enumerate(specs):
            if not isinstance(spec, dict) or "name" not in spec or set(spec) - {"name", "params"}:
                raise ConfigError(f"ensemble: attacks[{i}]={spec!r} must be a mapping with 'name' and optional 'params'")
            name, params = spec["name"], dict(spec.get("params") or {})
            if name == "ensemble":
                raise ConfigError(f"ensemble: attacks[{i}] cannot itself be 'ensemble'")
            registry.get("evasion", name)  # unknown names list the valid ones
            accepted = {p.name for p in registry.params("evasion", name)}
            for key, value in (("eps", self.eps), ("norm", self.norm)):
                if key in params and params[key] != value:
                    raise ConfigError(f"ensemble: attacks[{i}] ({name}) sets {key}={params[key]!r} but the ensemble's "
                                      f"{key} is {value!r}; members share the ensemble's budget")
                if key in accepted:
                    params[key] = value
            member = registry.create("evasion", name, **params)
            if not getattr(member, "bounded", True):
                raise ConfigError(f"ensemble: attacks[{i}] ({name}) has no eps budget (it minimises the perturbation); "
                                  f"give it an eps or choose a bounded attack")
            self._members.append(member)
            self.member_specs.append({"name": name, "params": params})

    def fit(self, train: Dataset, *, model: nn.Module, device: torch.device | str = "cpu") -> "EnsembleAttack":
        """Fit the members that learn something first (e.g. a transfer attack's surrogate)."""
        for m in self._members:
            if hasattr(m, "fit"):
                m.fit(train, model=model, device=device)
        return self

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        def succeeded(pred: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return pred != y[idx] if target is None else pred == target[idx]

        n = len(x)
        black_box = self.access in ("scores", "labels")
        queries = torch.ones(n, dtype=torch.long, device=x.device) if black_box else None
        all_idx = torch.arange(n, device=x.device)
        todo = all_idx[~succeeded(predict(model, x), all_idx)]
        out = x.clone()
        broken_by = torch.full((n,), -1, dtype=torch.long, device=x.device)
        for i, member in enumerate(self._members):
            if len(todo) == 0:
                break
            x_adv = member(model, x[todo], y[todo], target=None if target is None else target[todo])
            if queries is not None:
                q = member.queries_
                queries[todo] += 1 + (q.to(x.device) if q is not None else 0)
            ok = succeeded(predict(model, x_adv), todo)
            out[todo] = x_adv  # unbroken samples keep the latest attempt; broken ones leave the pool
            broken_by[todo[ok]] = i
            todo = todo[~ok]
        self.broken_by_ = broken_by
        self.attack_names_ = [s["name"] for s in self.member_specs]
        self.queries_ = queries
        return out
