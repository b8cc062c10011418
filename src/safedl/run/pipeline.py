"""The run spine: baseline -> attack simulation -> defenses -> risk -> gate -> results.json and reports.

Each stage writes its result atomically into ``RUN_DIR/stages/<stage>/`` together with a content key (a hash of the
profile sections and inputs it depends on). ``resume`` reuses every stage whose key still matches, so a crash or
Ctrl-C loses no finished stage and a changed profile redoes only what changed.
"""
from __future__ import annotations

import datetime as _dt
import logging
import platform
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml
from torch import nn

import safedl
from safedl import registry
from safedl.assess.gate import evaluate_gate, fail_on_failed_stages
from safedl.assess.handlers import get_attack_handler, get_defense_handler, load_handlers
from safedl.assess.risk import assess_risk
from safedl.assess.stages import StageResult, StageShared, attack_stage, defense_stage
from safedl.data.dataset import Splits
from safedl.data.source import load_dataset
from safedl.data.split import stratified_split
from safedl.errors import ProfileError
from safedl.executors import Executor, Outcome, Task, create_executor
from safedl.executors.progress import GraphView
from safedl.models.checkpoint import save_checkpoint
from safedl.models.normalize import with_normalization
from safedl.models.train import accuracy, train_model
from safedl.models.user import load_entry_point, load_torchscript
from safedl.models.zoo import build_model
from safedl.profile import DefenseSpec, Profile
from safedl.utils import progress
from safedl.utils.bits import pack as pack_bits
from safedl.utils.io import (atomic_torch_save, atomic_write_bytes, atomic_write_json, atomic_write_text, file_sha256,
                             json_hash)
from safedl.utils.stats import proportion
from safedl.utils.tensors import predict, seed_everything

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1


RUN_MARKER = "safedl-run.json"  # written into every run directory; --resume adopts only folders that have one
_U8 = "__safedl_uint8__"
_POISONED = "__safedl_poisoned__"


def _as_uint8(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` as uint8 when it holds exactly k/255 values (8-bit images), so the round trip is lossless; else None."""
    if t.dtype != torch.float32 or t.numel() < 256:
        return None
    q = (t * 255).round()
    if bool(((q < 0) | (q > 255)).any()):
        return None
    u = q.to(torch.uint8)
    return u if torch.equal(u.float() / 255, t) else None


def pack_state(obj: Any) -> Any:
    """A smaller, lossless form of a stage's state for ``torch.save``: float images that are exact 8-bit values are
    stored as uint8, and a poisoned data set keeps only the rows the attack changed next to the originals."""
    from safedl.data.dataset import PoisonedDataset

    if isinstance(obj, PoisonedDataset):
        changed = (obj.x != obj.original_x).flatten(1).any(1)
        fields = {"rows": changed.nonzero().flatten(), "x_rows": obj.x[changed], "y": obj.y,
                  "num_classes": obj.num_classes, "name": obj.name, "class_names": obj.class_names,
                  "is_poison": obj.is_poison, "original_x": obj.original_x, "original_y": obj.original_y,
                  "info": obj.info}
        return {_POISONED: pack_state(fields)}
    if isinstance(obj, torch.Tensor):
        u = _as_uint8(obj)
        return obj if u is None else {_U8: u}
    if isinstance(obj, dict):
        return {k: pack_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(pack_state(v) for v in obj)
    return obj


def unpack_state(obj: Any) -> Any:
    """The inverse of ``pack_state`` (states saved unpacked by older versions pass through unchanged)."""
    from safedl.data.dataset import PoisonedDataset

    if isinstance(obj, dict) and set(obj) == {_U8}:
        return obj[_U8].float() / 255
    if isinstance(obj, dict) and set(obj) == {_POISONED}:
        f = unpack_state(obj[_POISONED])
        x = f["original_x"].clone()
        x[f["rows"]] = f["x_rows"]
        return PoisonedDataset(x, f["y"], f["num_classes"], f["name"], f["class_names"], is_poison=f["is_poison"],
                               original_x=f["original_x"], original_y=f["original_y"], info=f["info"])
    if isinstance(obj, dict):
        return {k: unpack_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(unpack_state(v) for v in obj)
    return obj


def load_stage_state(path: Path) -> dict:
    """Read a stage's ``state.pt`` (written by ``Run._finish``)."""
    return unpack_state(torch.load(path, map_location="cpu", weights_only=False))


class _LazyState(Mapping):
    """An attack's saved state, read from disk on first use (most resumed runs never need it)."""

    def __init__(self, path: Path):
        self._path, self._data = path, None

    def _load(self) -> dict:
        if self._data is None:
            self._data = load_stage_state(self._path)
        return self._data

    def __getitem__(self, key: str) -> Any:
        return self._load()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())


# ---------------------------------------------------------------------------------------------- planning

def defense_kinds(spec: DefenseSpec) -> list[tuple[str, str, dict]]:
    """(kind, name, params) of each component of a defense spec."""
    parts = [(spec.name, spec.params)] if spec.name else [(c.name, c.params) for c in spec.pipeline or []]
    return [(registry.find_kind(n, registry.DEFENSE_KINDS), n, p) for n, p in parts]


def plan_defenses(profile: Profile) -> list[tuple[DefenseSpec, str, str]]:
    """Every (defense, attack id, handler kind) pair to evaluate; raises ProfileError for impossible pairs."""
    load_handlers()
    attacks = {a.key: cat for cat, a in profile.attacks.all()}
    attack_specs = {a.key: a for _, a in profile.attacks.all()}
    plan, errors = [], []
    for i, d in enumerate(profile.defenses):
        kinds = defense_kinds(d)
        kind = kinds[0][0] if len(kinds) == 1 else "pipeline"
        present = {k for k, _, _ in kinds}
        if "certifier" in present and present & {"preprocessor", "postprocessor", "trainer"}:
            errors.append((f"defenses[{i}].pipeline", "a certifier (randomized smoothing) certifies the noise-"
                           "trained model alone; list it without preprocessors, postprocessors or trainers"))
        targets = list(attacks) if "all" in d.against else d.against
        matched = 0
        for aid in targets:
            handler = get_defense_handler(kind, attacks[aid])
            why_not = None if handler is None else getattr(handler, "not_applicable", lambda c, a: None)(
                attacks[aid], attack_specs[aid])
            if handler is None or why_not:
                if "all" not in d.against:
                    errors.append((f"defenses[{i}].against", f"a {kind} defense ({d.key}) cannot be evaluated against "
                                   f"{attacks[aid]} attack {aid!r}" + (f": {why_not}" if why_not else "")))
                continue
            plan.append((d, aid, kind))
            matched += 1
        if matched == 0 and "all" in d.against:
            errors.append((f"defenses[{i}]", f"no attack in the profile that a {kind} defense ({d.key}) applies to"))
    if errors:
        lines = [f"{len(errors)} error(s) in the threat profile"] + [f"  {k}: {m}" for k, m in errors]
        raise ProfileError("\n".join(lines), errors=errors)
    for cat, a in profile.attacks.all():
        try:
            get_attack_handler(cat)
        except KeyError:
            raise ProfileError(f"attacks.{cat}: no stage can run {cat} attacks in this installation",
                               errors=[(f"attacks.{cat}", "no handler")]) from None
    return plan


# ---------------------------------------------------------------------------------------------- model

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
    meta = {"arch": spec.arch, "arch_params": spec.params, "in_channels": c, "num_classes": splits.num_classes,
            "image_size": h, "mean": list(splits.mean), "std": list(splits.std)}

    def fresh() -> nn.Module:
        net = build_model(spec.arch, in_channels=c, num_classes=splits.num_classes, image_size=h, **spec.params)
        return with_normalization(net, splits.mean, splits.std)
    return fresh, meta


# ---------------------------------------------------------------------------------------------- the run

@dataclass(frozen=True)
class _Node:
    """A stage of the graph: its folder name, content key, kind, component id, attack it is evaluated against."""

    stage: str
    key: str
    kind: str
    id: str
    against: str | None
    task: Task


def executor_for(profile: Profile, device: torch.device) -> Executor:
    """The executor the profile's ``execution`` section asks for (``--executor`` etc. override it on the CLI)."""
    ex = profile.execution
    gpus = None
    if ex.executor == "ray" and device.type == "cuda":
        gpus = ex.gpus_per_task or (1.0 / ex.workers if ex.workers else 1.0)
    return create_executor(ex.executor, workers=ex.workers, threads_per_task=ex.threads_per_task,
                           address=ex.ray_address, gpus_per_task=gpus, preload=("safedl.assess._preload",))


class Run:
    """One assessment run in its own directory."""

    def __init__(self, profile: Profile, *, run_dir: Path, device: torch.device, base_dir: Path = Path(".")):
        self.profile, self.run_dir, self.device, self.base_dir = profile, Path(run_dir), device, base_dir

    @staticmethod
    def new_run_dir(profile: Profile, root: Path | None = None) -> Path:
        root = Path(root if root is not None else profile.output.dir)
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        path, k = root / f"{stamp}-{profile.name}", 1
        while path.exists():
            k += 1
            path = root / f"{stamp}-{profile.name}-{k}"
        return path

    # -- stage cache -----------------------------------------------------------------------------------
    def _stage(self, name: str) -> Path:
        return self.run_dir / "stages" / name

    def _cached(self, name: str, key: str) -> dict | None:
        """The finished stage's record when its key matches and every file it recorded is intact, else None (redo)."""
        marker = self._stage(name) / "stage.json"
        if not marker.is_file():
            return None
        import json

        try:
            blob = json.loads(marker.read_text())
        except (ValueError, OSError):
            return None
        if not isinstance(blob, dict) or blob.get("key") != key:
            return None
        for rel, digest in (blob.get("files") or {}).items():
            f = self._stage(name) / rel
            if not f.is_file() or file_sha256(f) != digest:
                log.warning("stage %s: %s is missing or does not match the sha256 recorded in stage.json; "
                            "redoing the stage", name, f)
                return None
        return blob

    def _finish(self, name: str, key: str, entry: dict, state: dict | None = None) -> None:
        """Save the stage's state (packed, lossless), then stage.json with the sha256 of every file in the stage."""
        d = self._stage(name)
        if state is not None:
            atomic_torch_save(d / "state.pt", pack_state(state))
        files = {f.relative_to(d).as_posix(): file_sha256(f) for f in sorted(d.rglob("*"))
                 if f.is_file() and f.name != "stage.json" and not f.name.startswith(".")}
        atomic_write_json(d / "stage.json", {"key": key, "entry": entry, "files": files})  # last: marks the stage done

    # -- stages ----------------------------------------------------------------------------------------
    def execute(self, *, splits: Splits, fresh, model_meta: dict, executor: Executor | None = None) -> dict[str, Any]:
        """Baseline on this process, then the stage graph on ``executor`` (default: the profile's ``execution``)."""
        p = self.profile
        plan = plan_defenses(p)
        executor = executor if executor is not None else executor_for(p, self.device)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "profile.yaml", yaml.safe_dump(p.model_dump(mode="json"), sort_keys=False))
        data_info = data_summary(p, splits)
        baseline_key = json_hash({"data": data_info["hashes"], "dataset": p.dataset.model_dump(),
                                  "model": p.model.model_dump(), "training": p.training.model_dump(), "seed": p.seed})
        baseline, baseline_entry = self._baseline(baseline_key, splits, fresh, model_meta)
        graph = self._graph(plan, baseline_key)
        if executor.in_process:
            shared = StageShared(profile=p, splits=splits, device=str(self.device), base_dir=str(self.base_dir),
                                 model_meta=model_meta, baseline=baseline, fresh=fresh, run_dir=str(self.run_dir))
        else:
            shared = StageShared(profile=p, splits=splits, device=str(self.device), model_meta=model_meta,
                                 base_dir=str(Path(self.base_dir).resolve()),
                                 baseline_state={k: v.detach().cpu() for k, v in baseline.state_dict().items()})
        entries, failed = self._run_graph(graph, executor, shared)
        attacks = [entries[n.stage] for n in graph if n.kind == "attack" and n.stage in entries]
        defenses = [entries[n.stage] for n in graph if n.kind == "defense" and n.stage in entries]
        results: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "run_id": self.run_dir.name,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "profile": p.model_dump(mode="json"),
            "environment": environment(self.device, p.seed),
            "execution": {"executor": executor.name, "workers": executor.workers,
                          "threads_per_task": executor.threads_per_task},
            "data": data_info,
            "baseline": baseline_entry,
            "attacks": attacks,
            "defenses": defenses,
            "failed_stages": failed,
        }
        results["risk"] = assess_risk(p.threat_model, attacks, defenses,
                                      baseline_accuracy=baseline_entry["metrics"]["clean_accuracy"]["value"])
        results["gate"] = fail_on_failed_stages(evaluate_gate(p.evaluation.gate, results), failed)
        atomic_write_json(self.run_dir / "results.json", results)
        from safedl.report.render import write_reports

        write_reports(results, self.run_dir, html=p.output.html, figures=p.output.figures)
        return results

    def _graph(self, plan: list[tuple[DefenseSpec, str, str]], baseline_key: str) -> list[_Node]:
        """One node per attack and per (defense, attack) pair, with the content key its stage is saved under."""
        p = self.profile
        nodes, attack_keys = [], {}
        for cat, spec in p.attacks.all():
            key = json_hash({"baseline": baseline_key, "category": cat, "spec": spec.model_dump(),
                             "evaluation": p.evaluation.model_dump(exclude={"gate"}), "output": p.output.figures})
            attack_keys[spec.key] = key
            nodes.append(_Node(f"attack-{spec.key}", key, "attack", spec.key, None,
                               Task(f"attack-{spec.key}", attack_stage, {"category": cat, "spec": spec})))
        for dspec, aid, kind in plan:
            key = json_hash({"attack": attack_keys[aid], "defense": dspec.model_dump(), "kind": kind})
            stage = f"defense-{dspec.key}-vs-{aid}"
            kwargs = {"dspec": dspec, "kind": kind, "attack_id": aid, "components": defense_kinds(dspec)}
            nodes.append(_Node(stage, key, "defense", dspec.key, aid,
                               Task(stage, defense_stage, kwargs, deps=(f"attack-{aid}",))))
        return nodes

    def _run_graph(self, graph: list[_Node], executor: Executor, shared: StageShared
                   ) -> tuple[dict[str, dict], list[dict]]:
        """Reuse finished stages, run the others on ``executor`` and save each the moment it finishes."""
        entries: dict[str, dict] = {}
        todo = []
        view = GraphView(title=f"stages ({executor.name})", enabled=progress.enabled())
        for n in graph:
            cached = self._cached(n.stage, n.key)
            if cached is None:
                todo.append(n)
                continue
            log.info("%s: reusing finished stage", n.stage)
            entries[n.stage] = cached["entry"]
            view.mark_reused(n.stage)
        given: dict[str, StageResult] = {}
        for d in {d for n in todo for d in n.task.deps} - {n.stage for n in todo}:  # finished attacks still needed
            state = _LazyState(self._stage(d) / "state.pt")
            given[d] = StageResult(entry=entries[d], state=state if executor.in_process else dict(state))
        by_stage = {n.stage: n for n in graph}
        failed: dict[str, dict] = {}

        def save(out: Outcome) -> None:
            n = by_stage[out.id]
            if not out.ok:
                failed[n.stage] = {"stage": n.stage, "kind": n.kind, "id": n.id, "against": n.against,
                                   "error": out.error, "attempts": out.attempts}
                return
            for rel, data in out.value.files.items():
                self._write_file(rel, data)
            self._finish(n.stage, n.key, out.value.entry, out.value.state if n.kind == "attack" else None)
            entries[n.stage] = out.value.entry
            log.debug("%s: finished in %.1f s", n.stage, out.time_s)

        if todo:
            with view:
                executor.run([n.task for n in todo], shared=shared, given=given, on_result=save,
                             on_event=view.update)
        return entries, [failed[n.stage] for n in graph if n.stage in failed]

    def _write_file(self, rel: str, data: bytes) -> None:
        """Write a file a stage made in its private folder to the same place in the run directory."""
        path = (self.run_dir / rel).resolve()
        if not path.is_relative_to(self.run_dir.resolve()):
            raise ValueError(f"a stage returned a file outside the run directory: {rel!r}")
        atomic_write_bytes(path, data)

    def _baseline(self, key: str, splits: Splits, fresh, model_meta: dict) -> tuple[nn.Module, dict]:
        p = self.profile
        seed_everything(p.seed)
        model = fresh().to(self.device)
        cached = self._cached("baseline", key)
        ckpt = self._stage("baseline") / "model.pt"
        if cached is not None and ckpt.is_file():
            log.info("baseline: reusing finished stage")
            blob = torch.load(ckpt, map_location="cpu", weights_only=True)
            model.load_state_dict(blob["state_dict"])
            return model.to(self.device).eval(), cached["entry"]
        t0 = time.perf_counter()
        history: list = []
        if p.model.checkpoint:
            path = Path(p.model.checkpoint)
            path = path if path.is_absolute() else self.base_dir / path
            load_user_checkpoint(model, path)
            source = f"checkpoint {path}"
        elif p.model.torchscript:
            source = "TorchScript model as given (not retrained)"
        else:
            log.info("baseline: training %s for %d epochs", p.model.arch or p.model.entry_point, p.training.epochs)
            report = train_model(model, splits.train, recipe=p.training, seed=p.seed, val=splits.val,
                                 device=self.device, description="baseline")
            history = report.history
            source = "trained"
        model.eval()
        pred = predict(model, splits.test.x.to(self.device)).cpu()
        correct = pred == splits.test.y
        per_class = []
        for c in range(splits.num_classes):
            m = splits.test.y == c
            per_class.append(float(correct[m].float().mean()) if bool(m.any()) else float("nan"))
        entry = {
            "source": source,
            "metrics": {"clean_accuracy": proportion(int(correct.sum()), len(correct)),
                        "val_accuracy": proportion(round(accuracy(model, splits.val, device=self.device) * len(splits.val)),
                                                   len(splits.val)) if len(splits.val) else None},
            "per_class": {"clean_accuracy": per_class},
            "per_image": {"clean_correct": pack_bits(correct)},  # test split order; for paired comparisons
            "history": history,
            "time_s": time.perf_counter() - t0,
            "recipe": p.training.model_dump(),
            "notes": _baseline_notes(p, splits),
        }
        meta = dict(model_meta, data_hash=splits.hashes()["train"], recipe=p.training.model_dump(),
                    clean_accuracy=entry["metrics"]["clean_accuracy"]["value"])
        save_checkpoint(ckpt, model, meta)
        self._finish("baseline", key, entry)
        return model, entry


def _baseline_notes(profile: Profile, splits: Splits) -> list[str]:
    n_eval, n_test = profile.evaluation.n_eval, len(splits.test)
    if n_eval > n_test:
        msg = (f"evaluation.n_eval = {n_eval} is larger than the test split ({n_test} images): attacks and defenses "
               f"are measured on all {n_test} test images")
        log.warning(msg)
        return [msg]
    return []


def data_summary(profile: Profile, splits: Splits) -> dict[str, Any]:
    """results.json "data": the data set's name, where it came from, its class names, shape, sizes and hashes."""
    names = splits.train.class_names or [str(i) for i in range(splits.num_classes)]
    return {"name": splits.train.name, "format": profile.dataset.format, "path": profile.dataset.path,
            "class_names": list(names), "shape": list(splits.shape), "num_classes": splits.num_classes,
            "sizes": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
            "class_counts": {"train": splits.train.class_counts(), "test": splits.test.class_counts()},
            "hashes": splits.hashes()}


def environment(device: torch.device, seed: int) -> dict[str, Any]:
    import numpy
    import sklearn

    return {"safedl": safedl.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "scikit-learn": sklearn.__version__, "platform": platform.platform(),
            "device": str(device), "threads": torch.get_num_threads(), "seed": seed}


def resolve_paths(profile: Profile, base_dir: Path) -> Profile:
    """A copy of ``profile`` with every file path absolute (relative ones resolved against ``base_dir``, the profile's
    folder), so the copy saved in the run directory resumes from any working directory."""
    def absolute(p: str | None) -> str | None:
        if p is None:
            return None
        q = Path(p).expanduser()
        return str((q if q.is_absolute() else Path(base_dir) / q).resolve())

    ds = profile.dataset.model_copy(update={"path": absolute(profile.dataset.path),
                                            "labels_path": absolute(profile.dataset.labels_path)})
    md = profile.model.model_copy(update={"torchscript": absolute(profile.model.torchscript),
                                          "checkpoint": absolute(profile.model.checkpoint)})
    return profile.model_copy(update={"dataset": ds, "model": md})


def check_model_support(profile: Profile, model: nn.Module, sample: torch.Tensor) -> None:
    """Before anything runs: every listed defense can work with this model (features, head, conv layer, hooks);
    one ProfileError naming each defense that cannot and why."""
    from safedl.models.features import model_problems

    errors = []
    for i, d in enumerate(profile.defenses):
        for kind, name, params in defense_kinds(d):
            needs = getattr(registry.create(kind, name, **params), "model_needs", ())
            for why in model_problems(model, needs, sample, layer=profile.model.feature_layer):
                errors.append((f"defenses[{i}]", f"{name} cannot work with this model: {why}"))
    if profile.model.feature_layer is not None and not errors:
        from safedl.models.features import feature_problem

        why = feature_problem(model, sample, layer=profile.model.feature_layer)
        if why:
            errors.append(("model.feature_layer", why))
    if errors:
        lines = [f"{len(errors)} error(s) in the threat profile"] + [f"  {k}: {m}" for k, m in errors]
        raise ProfileError("\n".join(lines), errors=errors)


def _with_feature_layer(fresh, layer: str | None):
    from safedl.models.features import set_feature_layer

    if layer is None:
        return fresh

    def tagged() -> nn.Module:
        return set_feature_layer(fresh(), layer)
    return tagged


def prepare(profile: Profile, *, base_dir: Path) -> tuple[Splits, Any, dict]:
    """Load and split the data, build the model and check that every defense can use it: everything that can fail
    before a run dir exists (nothing is written)."""
    from safedl.errors import DataError

    data = load_dataset(profile.dataset, base_dir=base_dir)
    try:
        splits = stratified_split(data, test_fraction=profile.dataset.test_fraction,
                                  val_fraction=profile.dataset.val_fraction,
                                  seed=profile.seed if profile.dataset.split_seed is None
                                  else profile.dataset.split_seed)
    except DataError as exc:
        where = profile.dataset.path or profile.dataset.name
        raise DataError(f"dataset {where}: {str(exc).removeprefix(data.name + ': ')}") from None
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
    from safedl.errors import CheckpointError

    if not path.is_file():
        raise CheckpointError(f"model.checkpoint {path}: file not found")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(blob.get("state_dict", blob) if isinstance(blob, dict) else blob)
    except Exception as exc:  # noqa: BLE001 - unpickling refusal, corrupt zip, key/shape mismatch ...
        raise CheckpointError(f"model.checkpoint {path}: cannot load it into the model "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


def _check_forward(model: nn.Module, splits: Splits) -> None:
    """The model takes the data's images and gives one logit per class (a user model built for other data fails
    here with the shapes, not later inside an attack)."""
    from safedl.errors import ConfigError

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


def data_fingerprint(splits: Splits) -> str:
    """One content hash of the train/val/test splits."""
    return json_hash(splits.hashes())


def is_run_dir(path: Path) -> bool:
    """A folder safedl made: it holds the run marker (or, from older versions, a stage record or results.json)."""
    import json

    path = Path(path)
    marker = path / RUN_MARKER
    if marker.is_file():
        try:
            return json.loads(marker.read_text()).get("format") == "safedl-run"
        except (ValueError, OSError, AttributeError):
            return False
    return (path / "profile.yaml").is_file() and (
        (path / "stages" / "baseline" / "stage.json").is_file() or (path / "results.json").is_file())


def adopt_run_dir(run_dir: Path, profile: Profile, splits: Splits) -> None:
    """Refuse a non-empty folder that is not a safedl run, or a run made on other data; then write the marker."""
    import json

    from safedl.errors import UserError

    run_dir = Path(run_dir)
    fingerprint = data_fingerprint(splits)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir}: exists and is not a folder; give a run directory")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not is_run_dir(run_dir):
            raise UserError(f"{run_dir}: not a safedl run directory (no {RUN_MARKER}); refusing to write into it. "
                            "Give a folder that `safedl run` created, or leave out --resume to start a new run")
        marker = run_dir / RUN_MARKER
        old = json.loads(marker.read_text()).get("data_hash") if marker.is_file() else None
        if old is not None and old != fingerprint:
            raise UserError(f"{run_dir}: the data changed since this run was made (content hash {old[:12]}, now "
                            f"{fingerprint[:12]}; data: {profile.dataset.path or profile.dataset.name}); refusing "
                            "to resume on other data. Start a new run (leave out --resume)")
    atomic_write_json(run_dir / RUN_MARKER, {
        "format": "safedl-run", "version": 1, "safedl": safedl.__version__, "data_hash": fingerprint,
        "data": {"name": splits.train.name, "format": profile.dataset.format, "path": profile.dataset.path,
                 "labels_path": profile.dataset.labels_path}})


def run_assessment(profile: Profile, *, base_dir: Path = Path("."), run_dir: Path | None = None,
                   runs_root: Path | None = None, device: torch.device | str = "cpu") -> tuple[Path, dict]:
    """Run (or resume, when ``run_dir`` is an existing run) a whole assessment; returns (run dir, results).

    Paths in the profile are resolved against ``base_dir`` and saved absolute; resuming refuses a folder that is
    not a safedl run and a run whose data changed.
    """
    profile = resolve_paths(profile, Path(base_dir))
    splits, fresh, meta = prepare(profile, base_dir=base_dir)
    run_dir = Path(run_dir) if run_dir is not None else Run.new_run_dir(profile, runs_root)
    adopt_run_dir(run_dir, profile, splits)
    run = Run(profile, run_dir=run_dir, device=torch.device(device), base_dir=base_dir)
    return run_dir, run.execute(splits=splits, fresh=fresh, model_meta=meta)
