"""Registry behaviour (unknown names, parameter checks, parameter listing), validation helpers, tensor helpers."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from safedl import registry
from safedl.errors import ConfigError, UnknownComponentError
from safedl.utils.tensors import eval_mode, frozen_params, predict, predict_logits, resolve_device, seed_everything
from safedl.utils.validate import check_choice, check_fraction, check_positive, check_range

ALL = [(k, n) for k in registry.KINDS for n in registry.names(k)]


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(UnknownComponentError) as info:
        registry.get("evasion", "pgdd")
    msg = str(info.value)
    assert "'pgdd'" in msg and all(n in msg for n in registry.names("evasion"))
    with pytest.raises(KeyError):  # still catchable as a KeyError
        registry.create("evasion", "nope")
    with pytest.raises(UnknownComponentError, match="evasion"):
        registry.names("evasions")
    with pytest.raises(UnknownComponentError, match="fgsm"):
        registry.find_kind("no_such_component")
    assert registry.find_kind("pgd") == "evasion"


def test_create_rejects_unknown_params_naming_the_valid_ones():
    with pytest.raises(ConfigError) as info:
        registry.create("evasion", "pgd", epsilon=0.1, steps=5)
    msg = str(info.value)
    assert "'epsilon'" in msg
    assert all(p in msg for p in ("eps", "norm", "steps", "alpha", "random_start", "restarts", "seed"))


def test_create_passes_params_and_validates_values():
    pgd = registry.create("evasion", "pgd", eps=0.1, steps=4)
    assert pgd.eps == 0.1 and pgd.steps == 4 and pgd.step_size == pytest.approx(2.5 * 0.1 / 4)
    with pytest.raises(ConfigError, match="steps"):
        registry.create("evasion", "pgd", steps=0)
    with pytest.raises(ConfigError, match="norm"):
        registry.create("evasion", "pgd", norm="l3")


def test_params_list_types_and_defaults():
    ps = {p.name: p for p in registry.params("evasion", "pgd")}
    assert (ps["eps"].type, ps["eps"].default, ps["eps"].required) == ("float", 0.3, False)
    assert (ps["steps"].type, ps["steps"].default) == ("int", 10)
    assert ps["alpha"].type == "float | None" and ps["alpha"].default is None
    assert ps["random_start"].type == "bool" and ps["random_start"].default is True


def test_register_rejects_a_second_class_under_the_same_name():
    class _A:
        pass

    class _B:
        pass

    registry.register("inspector", "_test_dup")(_A)
    try:
        with pytest.raises(ValueError, match="twice"):
            registry.register("inspector", "_test_dup")(_B)
        with pytest.raises(ValueError, match="kind"):
            registry.register("no_such_kind", "x")
    finally:
        registry._REGISTRY["inspector"].pop("_test_dup", None)


@pytest.mark.parametrize("kind,name", ALL, ids=[f"{k}:{n}" for k, n in ALL])
def test_every_component_documents_typed_params_and_builds_with_defaults(kind, name):
    """timm-style: every registry entry is checked, so a new component is covered automatically."""
    cls = registry.get(kind, name)
    assert registry.summary(cls), f"{kind} {name!r} needs a docstring (its first line is shown by `safedl list`)"
    ps = registry.params(kind, name)
    untyped = [p.name for p in ps if not p.type]
    assert not untyped, f"{kind} {name!r}: parameters without a type annotation: {untyped}"
    if not isinstance(cls, type) and getattr(cls, "alias_of", None):  # a deprecated alias builds a registered class
        obj = registry.create(kind, name)
        assert obj.registry_kind == kind and obj.registry_name in cls.alias_of
        return
    if not isinstance(cls, type):  # a stage evaluator: a function of the run context, not built from parameters
        assert kind in ("attack_evaluator", "defense_evaluator") and callable(cls)
        return
    if not any(p.required for p in ps):
        obj = registry.create(kind, name)
        assert obj.registry_name == name and obj.registry_kind == kind


# ---------------------------------------------------------------- validation helpers
def test_validation_messages_name_owner_key_value_and_allowed():
    with pytest.raises(ConfigError, match=r"pgd: norm='l3' is not allowed; choose one of 'linf', 'l2'"):
        check_choice("pgd", "norm", "l3", ["linf", "l2"])
    with pytest.raises(ConfigError, match=r"eps=1.5 is out of range; allowed: a number in \[0.0, 1.0\]"):
        check_fraction("x", "eps", 1.5, allow_zero=True)
    with pytest.raises(ConfigError, match="must be an integer"):
        check_positive("x", "steps", 2.0, integer=True)
    with pytest.raises(ConfigError, match="must be a number"):
        check_range("x", "lr", True)  # bool is not a number here
    with pytest.raises(ConfigError, match=r"\(0, inf\)"):
        check_positive("x", "eps", 0)
    assert check_range("x", "k", 3, low=1, high=3, integer=True) == 3


# ---------------------------------------------------------------- tensor helpers
def _mixed_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Sequential(nn.BatchNorm1d(4), nn.Dropout(0.5)))
    model.train()
    model[1].eval()      # a submodule deliberately frozen in eval mode (e.g. a frozen feature extractor)
    model[2][0].eval()
    return model


def test_eval_mode_restores_each_modules_own_mode():
    model = _mixed_model()
    before = [m.training for m in model.modules()]
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == before
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == before


def test_frozen_params_restores_requires_grad():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    model[1].bias.requires_grad_(False)
    with frozen_params(model):
        assert not any(p.requires_grad for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == [True, True, True, False]


def test_predict_is_batched_in_eval_mode_and_leaves_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 5), nn.Dropout(0.9)).train()
    x = torch.rand(23, 1, 4, 4)
    full = predict_logits(model, x, batch_size=1000)
    assert torch.equal(predict_logits(model, x, batch_size=4), full)  # dropout off, batching invisible
    assert torch.equal(predict(model, x, batch_size=7), full.argmax(1)) and model.training
    assert predict_logits(model, x[:0]).shape[0] == 0


def test_seed_everything_and_resolve_device():
    g = seed_everything(11)
    a = torch.rand(3, generator=g), torch.rand(3)
    g = seed_everything(11)
    assert torch.equal(a[0], torch.rand(3, generator=g)) and torch.equal(a[1], torch.rand(3))
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_validation_rejects_non_finite_numbers(bad):
    with pytest.raises(ConfigError, match="finite"):
        check_positive("pgd", "eps", bad)


def test_eval_mode_writes_no_flag_of_a_model_already_in_eval_mode():
    """nn.Module.__setattr__ is slow (about 1 ms per call for a small CNN when every flag was written twice): a
    model already in eval mode is left untouched, and a mode switched inside the block is still restored."""
    writes: list[str] = []

    class Counting(nn.Linear):
        def __setattr__(self, name, value):
            if name == "training":
                writes.append(name)
            super().__setattr__(name, value)

    model = nn.Sequential(Counting(2, 2), nn.ReLU()).eval()
    writes.clear()
    with eval_mode(model):
        pass
    assert writes == []
    with eval_mode(model):
        model.train()
    assert not any(m.training for m in model.modules())
