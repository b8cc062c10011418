"""Before a run directory exists: load and split the data, build the model, check that every defense can use it
(``prepare``), and resolve the profile's paths; nothing here writes anything."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from safedl import registry
from safedl.data.dataset import Splits
from safedl.data.extra import with_extra, with_field_test
from safedl.data.source import load_dataset
from safedl.data.split import stratified_split
from safedl.errors import CheckpointError, ConfigError, DataError, ProfileError
from safedl.models.checkpoint import load_network_state
from safedl.models.features import feature_problem, model_problems, set_feature_layer
from safedl.models.normalize import with_normalization
from safedl.models.user import load_entry_point, load_torchscript
from safedl.models.zoo import build_model
from safedl.profile import Profile
from safedl.run.planning import defense_kinds, plan_defenses


def model_factory(profile: Profile, splits: Splits, *, base_dir: Path):
    """A function returning a fresh (untrained) model of the profile's architecture, plus checkpoint metadata."""
    spec = profile.model
    c, h, _ = splits.shape
    if spec.entry_point:
        def fresh() -> nn.Module:
            return load_entry_point(spec.entry_point, **spec.params)
        return fresh, {"entry_point": spec.entry_point, "arch_params": spec.params}
    if spec.torchscript:
        path = Path(spec.torchscript) if Path(spec.torchscript).is_absolute() else base_dir / spec.torchscript
        load_torchscript(path)  # fail early on a bad file

        def fresh() -> nn.Module:
            return load_torchscript(path)
        return fresh, {"torchscript": str(path)}
    mean, std = model_normalization(profile, splits)
    meta = {"arch": spec.arch, "arch_params": spec.params, "in_channels": c, "num_classes": splits.num_classes,
            "image_size": h, "mean": mean, "std": std}

    def fresh() -> nn.Module:
        net = build_model(spec.arch, in_channels=c, num_classes=splits.num_classes, image_size=h, **spec.params)
        return with_normalization(net, mean, std)
    return fresh, meta


def model_normalization(profile: Profile, splits: Splits) -> tuple[list[float], list[float]]:
    """Per-channel (mean, std) inside the model: ``model.normalization`` (e.g. the statistics a pretrained network
    was trained with), else the training split's; ProfileError when the profile's do not match the channels."""
    norm = profile.model.normalization
    if norm is None:
        return list(splits.mean), list(splits.std)
    c = splits.shape[0]
    for key in ("mean", "std"):
        values = getattr(norm, key)
        if len(values) != c:
            raise ProfileError(f"model.normalization.{key}: {len(values)} values for images with {c} channel(s); "
                               f"give one per channel")
    return list(norm.mean), list(norm.std)



def resolve_paths(profile: Profile, base_dir: Path) -> Profile:
    """A copy of ``profile`` with every file path absolute (relative ones resolved against ``base_dir``, the profile's
    folder), so the copy saved in the run directory resumes from any working directory."""
    def absolute(p: str | None) -> str | None:
        if p is None:
            return None
        q = Path(p).expanduser()
        return str((q if q.is_absolute() else Path(base_dir) / q).resolve())

    extra = [e.model_copy(update={"path": absolute(e.path)}) for e in profile.dataset.extra]
    field = profile.dataset.field_test
    field = field.model_copy(update={"path": absolute(field.path)}) if field is not None else None
    ds = profile.dataset.model_copy(update={"path": absolute(profile.dataset.path), "extra": extra, "field_test": field,
                                            "labels_path": absolute(profile.dataset.labels_path)})
    md = profile.model.model_copy(update={"torchscript": absolute(profile.model.torchscript),
                                          "checkpoint": absolute(profile.model.checkpoint)})
    canary = profile.canary_records.model_copy(update={"path": absolute(profile.canary_records.path)})
    return profile.model_copy(update={"dataset": ds, "model": md, "canary_records": canary})


def check_model_support(profile: Profile, model: nn.Module, sample: torch.Tensor) -> None:
    """Before anything runs: every listed defense can work with this model (features, head, conv layer, hooks);
    one ProfileError naming each defense that cannot and why."""
    errors = []
    for i, d in enumerate(profile.defenses):
        for kind, name, params in defense_kinds(d):
            needs = getattr(registry.create(kind, name, **params), "model_needs", ())
            for why in model_problems(model, needs, sample, layer=profile.model.feature_layer):
                errors.append((f"defenses[{i}]", f"{name} cannot work with this model: {why}"))
    if profile.model.feature_layer is not None and not errors:
        why = feature_problem(model, sample, layer=profile.model.feature_layer)
        if why:
            errors.append(("model.feature_layer", why))
    if errors:
        lines = [f"{len(errors)} error(s) in the threat profile"] + [f"  {k}: {m}" for k, m in errors]
        raise ProfileError("\n".join(lines), errors=errors)


def _with_feature_layer(fresh, layer: str | None):
    if layer is None:
        return fresh

    def tagged() -> nn.Module:
        return set_feature_layer(fresh(), layer)
    return tagged


def prepare(profile: Profile, *, base_dir: Path) -> tuple[Splits, Any, dict]:
    """Load and split the data, build the model and check that every defense can use it: everything that can fail
    before a run dir exists (nothing is written)."""
    data = load_dataset(profile.dataset, base_dir=base_dir)
    try:
        splits = stratified_split(data, **profile.split_args)  # before_split: the clean hold-out is carved first
    except DataError as exc:
        where = profile.dataset.path or profile.dataset.name
        raise DataError(f"dataset {where}: {str(exc).removeprefix(data.name + ': ')}") from None
    splits = with_extra(splits, profile.dataset.extra, base_dir=Path(base_dir))
    splits = with_field_test(splits, profile.dataset.field_test, base_dir=Path(base_dir))
    fresh, meta = model_factory(profile, splits, base_dir=base_dir)
    fresh = _with_feature_layer(fresh, profile.model.feature_layer)
    model = fresh()  # a broken entry point or architecture fails here, before anything is written
    plan_defenses(profile)
    if profile.model.checkpoint:
        load_user_checkpoint(model, Path(profile.model.checkpoint))
    _check_forward(model, splits)
    check_model_support(profile, model, splits.train.x[:2])
    return splits, fresh, meta


def load_user_checkpoint(model: nn.Module, path: Path) -> None:
    """Load ``path`` (a state_dict, or safedl's {"state_dict", "meta"}) into ``model``; CheckpointError if it cannot."""
    if not path.is_file():
        raise CheckpointError(f"model.checkpoint {path}: file not found")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        load_network_state(model, blob.get("state_dict", blob) if isinstance(blob, dict) else blob)
    except CheckpointError as exc:
        raise CheckpointError(f"model.checkpoint {path}: cannot load it into the model ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - unpickling refusal, corrupt zip, key/shape mismatch ...
        raise CheckpointError(f"model.checkpoint {path}: cannot load it into the model "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


def _check_forward(model: nn.Module, splits: Splits) -> None:
    """The model takes the data's images and gives one logit per class (a user model built for other data fails
    here with the shapes, not later inside an attack)."""
    x = splits.train.x[:2]
    try:
        with torch.no_grad():
            out = model.eval()(x)
    except Exception as exc:  # noqa: BLE001 - any failure of the user's forward on our data
        raise ConfigError(f"the model cannot take the data's images (shape {tuple(x.shape)}, float32 in [0, 1]): "
                          f"{type(exc).__name__}: {exc}") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] != splits.num_classes:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"the model must return N x {splits.num_classes} logits (one per class: "
                          f"{', '.join((splits.train.class_names or [])[:10])}); it returned {shape}")

