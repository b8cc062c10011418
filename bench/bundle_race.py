"""Bundle swap race (the TOCTOU finding): can an attacker who replaces files in a bundle directory while
``load_bundle`` runs (as ``POST /v1/admin/bundle`` does) get unsigned weights, state or a foreign version live?

Builds a tiny signed bundle (scikit-learn's 8x8 digits, ``tiny_cnn`` trained ``--epochs`` epochs, feature squeezing
+ its detector, HMAC key), then runs ``--iterations`` ``load_bundle(..., signing_key=KEY)`` calls while another
thread keeps replacing files (``os.replace``, atomically) with attacker versions and back: the model weights or the
detector state (valid safetensors files with other values), the manifest with its digest (listing the attacker's
files; signed with another key, or unsigned), or all of them, chosen with ``--seed``. Counts loads, refusals
(BundleError, by reason), genuine loads (weights, detector state and version bit-identical to the signed bundle)
and attacker loads (anything else that loaded): the target is 0 attacker loads. Bounded by ``--iterations`` and
``--max-seconds``.

    PYTHONPATH=src nice -n 5 .venv/bin/python bench/bundle_race.py --iterations 1000 --seed 0
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import os
import random
import re
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import torch

log = logging.getLogger("bundle_race")
KEY, OTHER_KEY = b"bench-genuine-key-0123456789", b"bench-attacker-key-9876543210"
WEIGHTS, MANIFEST, DIGEST = "model.safetensors", "manifest.json", "manifest.sha256"


def build_bundle(out: Path, *, epochs: int, seed: int) -> Path:
    """The tests' default deployed system (feature squeezing + its detector around a tiny CNN, digits), signed."""
    from safedl import registry
    from safedl.data import load_builtin, stratified_split
    from safedl.deploy import SecurePipeline, export_bundle
    from safedl.models import TrainRecipe, build_model, train_model, with_normalization
    from safedl.utils.tensors import seed_everything

    splits = stratified_split(load_builtin("digits"), test_fraction=0.2, val_fraction=0.1, seed=seed)
    seed_everything(seed)
    model = with_normalization(build_model("tiny_cnn", in_channels=1, num_classes=10, image_size=8),
                               splits.mean, splits.std)
    train_model(model, splits.train, recipe=TrainRecipe(epochs=epochs, batch_size=64, lr=3e-3, augment="none"),
                seed=seed)
    model.eval()
    det = registry.create("detector", "feature_squeezing_detector", bit_depth=2, fpr=0.1)
    det.fit(splits.train.x[:300], model=model, x_calibration=splits.val.x, seed=seed)
    pipe = SecurePipeline(model=model, preprocessors=[registry.create("preprocessor", "feature_squeezing",
                                                                      bit_depth=4)],
                          detectors=[det], class_names=splits.train.class_names, input_shape=splits.shape)
    spec = {"arch": "tiny_cnn", "arch_params": {}, "in_channels": 1, "num_classes": 10, "image_size": 8,
            "mean": list(splits.mean), "std": list(splits.std)}
    data = {"name": "digits", "shape": list(splits.shape), "num_classes": 10, "class_names": splits.train.class_names}
    return export_bundle(pipe, out, model_spec=spec, data=data, signing_key=KEY)


def _digest(manifest: bytes, key: bytes | None) -> bytes:
    text = f"sha256 {hashlib.sha256(manifest).hexdigest()}\n"
    if key is not None:
        text += f"hmac-sha256 {hmac.new(key, manifest, hashlib.sha256).hexdigest()}\n"
    return text.encode()


def _flip(data: bytes) -> bytes:
    from safetensors.torch import load, save

    return save({k: (-v if v.is_floating_point() else v + 1).contiguous() for k, v in load(data).items()})


def attacks(genuine: dict[str, bytes]) -> tuple[str, dict[str, dict[str, bytes]]]:
    """(the state file's path, {attack name: {file: attacker bytes}})."""
    manifest = json.loads(genuine[MANIFEST])
    state = next(c["state"] for c in manifest["components"] if c.get("state"))
    files = {WEIGHTS: _flip(genuine[WEIGHTS]), state: _flip(genuine[state])}
    forged = dict(manifest, files=dict(manifest["files"], **{r: hashlib.sha256(d).hexdigest()
                                                            for r, d in files.items()}))
    text = json.dumps(forged, indent=2, sort_keys=True).encode()
    return state, {
        "weights": {WEIGHTS: files[WEIGHTS]},
        "state": {state: files[state]},
        "manifest_other_key": {MANIFEST: text, DIGEST: _digest(text, OTHER_KEY)},
        "manifest_unsigned": {MANIFEST: text, DIGEST: _digest(text, None)},
        "everything": {**files, MANIFEST: text, DIGEST: _digest(text, OTHER_KEY)},
    }


def _replace(root: Path, rel: str, data: bytes) -> None:
    tmp = root.parent / f".race-{rel.replace('/', '_')}"
    tmp.write_bytes(data)
    os.replace(tmp, root / rel)


def racer(root: Path, genuine: dict[str, bytes], sets: dict[str, dict[str, bytes]], stop: threading.Event,
          seed: int, swaps: Counter) -> None:
    """Put one attack's files in place, wait 0-2 ms, put the genuine ones back, wait 0-2 ms; until ``stop``."""
    rng = random.Random(seed)
    names = sorted(sets)
    while not stop.is_set():
        name = rng.choice(names)
        for rel, data in sets[name].items():
            _replace(root, rel, data)
        time.sleep(rng.uniform(0, 0.002))
        for rel in sets[name]:
            _replace(root, rel, genuine[rel])
        swaps[name] += 1
        time.sleep(rng.uniform(0, 0.002))


def is_genuine(b, genuine: dict[str, bytes], state: str, version: str) -> bool:
    """Weights, detector state and version bit-identical to the signed bundle."""
    from safetensors.torch import load

    from safedl.deploy.state import fitted_state

    want, got = load(genuine[WEIGHTS]), b.pipeline.model.state_dict()
    if b.version != version or set(got) != set(want) or not all(torch.equal(got[k], want[k]) for k in want):
        return False
    det = b.pipeline.detectors[0]
    tensors, _ = fitted_state(getattr(det, "detector", det))
    return all(k in tensors and torch.equal(tensors[k], v) for k, v in load(genuine[state]).items())


def _reason(msg: str) -> str:
    """A refusal's message without its paths and numbers (the reason, for counting)."""
    return re.sub(r"\S*/\S*|\b\d+\b", "", msg).split("(")[0].strip(" :;")


def run(*, iterations: int, seed: int, epochs: int, max_seconds: float, workdir: Path) -> dict:
    from safedl.deploy import load_bundle
    from safedl.errors import BundleError

    root = build_bundle(workdir / "bundle", epochs=epochs, seed=seed)
    genuine = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    version = hashlib.sha256(genuine[MANIFEST]).hexdigest()[:12]
    state, sets = attacks(genuine)
    stop, swaps, refusals = threading.Event(), Counter(), Counter()
    out = {"loads": 0, "refused": 0, "genuine_loads": 0, "attacker_loads": 0}
    thread = threading.Thread(target=racer, args=(root, genuine, sets, stop, seed, swaps), daemon=True)
    t0 = time.monotonic()
    thread.start()
    try:
        for i in range(iterations):
            if time.monotonic() - t0 > max_seconds:
                log.warning("stopped after %d loads: --max-seconds %.0f reached", i, max_seconds)
                break
            try:
                b = load_bundle(root, signing_key=KEY)
            except BundleError as exc:
                out["refused"] += 1
                refusals[_reason(str(exc))] += 1
                continue
            out["loads"] += 1
            out["genuine_loads" if is_genuine(b, genuine, state, version) else "attacker_loads"] += 1
    finally:
        stop.set()
        thread.join(10)
    out.update(attempts=out["loads"] + out["refused"], seconds=round(time.monotonic() - t0, 1),
               swaps=dict(sorted(swaps.items())), refusals=dict(refusals.most_common()), seed=seed)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iterations", type=int, default=1000, help="load_bundle calls")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=2, help="training epochs of the tiny model")
    p.add_argument("--max-seconds", type=float, default=600.0, help="stop the loads after this long")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bundle-race-") as tmp:
        result = run(iterations=args.iterations, seed=args.seed, epochs=args.epochs, max_seconds=args.max_seconds,
                     workdir=Path(tmp))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    raise SystemExit(0 if main()["attacker_loads"] == 0 else 1)
