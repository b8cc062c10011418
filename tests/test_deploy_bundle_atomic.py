"""Bundle loading is atomic with respect to the files it verified (the swap TOCTOU finding): files replaced in the
bundle directory while ``load_bundle`` runs never put unverified weights, state or a foreign version live; every
load either raises BundleError or returns exactly the signed genuine system. Also: symbolic links, non-regular files
and oversized bundles are refused with a message naming the file."""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from _serve_helpers import make_bundle
from safedl.deploy import bundle as bundle_mod
from safedl.deploy import load_bundle
from safedl.deploy.state import fitted_state
from safedl.errors import BundleError

KEY = b"genuine-signing-key-0123456789"
OTHER_KEY = b"attacker-signing-key-987654321"
WEIGHTS, MANIFEST, DIGEST = "model.safetensors", "manifest.json", "manifest.sha256"


def _digest(manifest: bytes, key: bytes | None) -> bytes:
    text = f"sha256 {hashlib.sha256(manifest).hexdigest()}\n"
    if key is not None:
        text += f"hmac-sha256 {hmac.new(key, manifest, hashlib.sha256).hexdigest()}\n"
    return text.encode()


@dataclass
class Versions:
    """The genuine (signed with KEY) and attacker contents of every file of one bundle."""

    root: Path
    genuine: dict[str, bytes]
    attacker: dict[str, bytes]
    state_rel: str
    version: str


def _flip(tensors: dict[str, torch.Tensor]) -> bytes:
    """A valid safetensors file with the same names and shapes but other values."""
    return st_save({k: (-v if v.is_floating_point() else v + 1).contiguous() for k, v in tensors.items()})


@pytest.fixture(scope="module")
def signed_template(tiny_model, digits_splits, tmp_path_factory) -> Path:
    root = make_bundle(tiny_model, digits_splits, tmp_path_factory.mktemp("atomic") / "genuine")
    (root / DIGEST).write_bytes(_digest((root / MANIFEST).read_bytes(), KEY))
    return root


@pytest.fixture()
def versions(signed_template, tmp_path) -> Versions:
    root = Path(shutil.copytree(signed_template, tmp_path / "bundle"))
    genuine = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    manifest = json.loads(genuine[MANIFEST])
    state_rel = next(c["state"] for c in manifest["components"] if c.get("state"))
    attacker = {WEIGHTS: _flip(st_load(genuine[WEIGHTS])), state_rel: _flip(st_load(genuine[state_rel]))}
    # the attacker's manifest lists the attacker's files; signed with another key (or unsigned, below)
    forged = dict(manifest, files=dict(manifest["files"], **{
        rel: hashlib.sha256(data).hexdigest() for rel, data in attacker.items()}))
    attacker[MANIFEST] = json.dumps(forged, indent=2, sort_keys=True).encode()
    attacker[DIGEST] = _digest(attacker[MANIFEST], OTHER_KEY)
    attacker["unsigned.sha256"] = _digest(attacker[MANIFEST], None)
    version = hashlib.sha256(genuine[MANIFEST]).hexdigest()[:12]
    load_bundle(root, signing_key=KEY)  # the genuine bundle loads
    return Versions(root=root, genuine=genuine, attacker=attacker, state_rel=state_rel, version=version)


def _replace(root: Path, rel: str, data: bytes) -> None:
    """Atomically replace ``root/rel`` (a temporary file outside the bundle renamed over it)."""
    tmp = root.parent / f".swap-{threading.get_ident()}-{rel.replace('/', '_')}"
    tmp.write_bytes(data)
    os.replace(tmp, root / rel)


def _assert_genuine(b, v: Versions) -> None:
    """A successful load is bit-identical to the genuine bundle and carries the genuine manifest's version."""
    assert b.version == v.version, "version from another manifest than the one verified"
    weights = st_load(v.genuine[WEIGHTS])
    got = b.pipeline.model.state_dict()
    assert set(got) == set(weights)
    assert all(torch.equal(got[k].cpu(), weights[k]) for k in weights), "unsigned weights went live"
    det = b.pipeline.detectors[0]
    det = getattr(det, "detector", det)
    state, _ = fitted_state(det)
    want = st_load(v.genuine[v.state_rel])
    assert all(torch.equal(state[k].cpu(), want[k]) for k in want), "unsigned detector state went live"


ATTACKS = {  # which files the attacker puts in place, and with which contents
    "weights": lambda v: {WEIGHTS: v.attacker[WEIGHTS]},
    "state": lambda v: {v.state_rel: v.attacker[v.state_rel]},
    "manifest_other_key": lambda v: {MANIFEST: v.attacker[MANIFEST], DIGEST: v.attacker[DIGEST]},
    "manifest_unsigned": lambda v: {MANIFEST: v.attacker[MANIFEST], DIGEST: v.attacker["unsigned.sha256"]},
    "everything": lambda v: {WEIGHTS: v.attacker[WEIGHTS], v.state_rel: v.attacker[v.state_rel],
                             MANIFEST: v.attacker[MANIFEST], DIGEST: v.attacker[DIGEST]},
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_files_replaced_between_verification_and_build_never_go_live(versions, monkeypatch, attack):
    """Deterministic: the attacker's files land exactly after verification, when the model is being built."""
    v, files = versions, ATTACKS[attack](versions)
    real_build = bundle_mod.build_model

    def build_then_swap(spec):
        for rel, data in files.items():
            _replace(v.root, rel, data)
        return real_build(spec)

    monkeypatch.setattr(bundle_mod, "build_model", build_then_swap)
    try:
        b = load_bundle(v.root, signing_key=KEY)
    except BundleError:
        return
    _assert_genuine(b, v)


@pytest.mark.parametrize("attack", ["weights", "manifest_other_key", "everything"])
def test_free_running_swaps_never_put_attacker_files_live(versions, attack):
    """A thread flips the files between the genuine and the attacker's versions while loads run (bounded)."""
    v, files = versions, ATTACKS[attack](versions)
    stop = threading.Event()

    def racer():
        i = 0
        while not stop.is_set():
            src = files if i % 2 == 0 else {rel: v.genuine[rel] for rel in files}
            for rel, data in src.items():
                _replace(v.root, rel, data)
            i += 1

    t = threading.Thread(target=racer, daemon=True)
    t.start()
    loads = refused = 0
    deadline = time.monotonic() + 15.0
    try:
        for _ in range(60):
            if time.monotonic() > deadline:
                break
            try:
                b = load_bundle(v.root, signing_key=KEY)
            except BundleError:
                refused += 1
                continue
            loads += 1
            _assert_genuine(b, v)
    finally:
        stop.set()
        t.join(10)
    assert loads + refused > 0


# ------------------------------------------------------------------------------------ what is read, and how much

def test_symbolic_links_in_the_bundle_are_refused(versions, tmp_path):
    v = versions
    outside = tmp_path / "weights-elsewhere.safetensors"
    outside.write_bytes(v.genuine[WEIGHTS])  # same bytes, so only the link itself can be the reason
    (v.root / WEIGHTS).unlink()
    (v.root / WEIGHTS).symlink_to(outside)
    with pytest.raises(BundleError, match=r"model\.safetensors.*symbolic link"):
        load_bundle(v.root, signing_key=KEY)
    (v.root / WEIGHTS).unlink()
    (v.root / WEIGHTS).write_bytes(v.genuine[WEIGHTS])
    state_dir = v.root / "state"
    shutil.move(state_dir, tmp_path / "state-elsewhere")
    state_dir.symlink_to(tmp_path / "state-elsewhere", target_is_directory=True)
    with pytest.raises(BundleError, match=r"state.*symbolic link"):
        load_bundle(v.root, signing_key=KEY)


def test_non_regular_files_are_refused_without_blocking(versions):
    os.mkfifo(versions.root / "state" / "pipe")  # opening a FIFO for reading would block without O_NONBLOCK
    with pytest.raises(BundleError, match=r"pipe.*not a regular file"):
        load_bundle(versions.root, signing_key=KEY)


def test_a_bundle_over_the_size_bound_is_refused(versions, monkeypatch):
    from safedl.deploy import verify

    monkeypatch.setattr(verify, "MAX_BUNDLE_BYTES", len(versions.genuine[WEIGHTS]) // 2)
    with pytest.raises(BundleError, match=r"larger than"):
        load_bundle(versions.root, signing_key=KEY)


def test_listed_paths_outside_the_bundle_are_refused(versions):
    m = json.loads(versions.genuine[MANIFEST])
    m["files"]["../escape"] = "0" * 64
    text = json.dumps(m).encode()
    (versions.root / MANIFEST).write_bytes(text)
    (versions.root / DIGEST).write_bytes(_digest(text, KEY))
    with pytest.raises(BundleError, match="outside the bundle"):
        load_bundle(versions.root, signing_key=KEY)


def test_a_digest_file_with_non_ascii_text_is_refused_not_a_crash(versions):
    (versions.root / DIGEST).write_bytes("sha256 é\nhmac-sha256 \xff\n".encode())
    with pytest.raises(BundleError, match="does not match its digest"):
        load_bundle(versions.root, signing_key=KEY)
