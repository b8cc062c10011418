"""The bundle's probe set (deploy/probes.py): `safedl export` stores the run's held-out test images, its stored
adversarial examples and its backdoor-triggered inputs; verify and loading refuse a tampered probe file."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from typer.testing import CliRunner

from _profiles import tiny_profile
from safedl.cli import app
from safedl.deploy import load_bundle
from safedl.deploy.probes import KINDS, load_probes, probe_set
from safedl.errors import BundleError
from safedl.rundir import RunDir
from safedl.run.state import load_stage_state

PROFILE = tiny_profile(
    name="tinyprobes", training={"epochs": 3},
    attacks={"evasion": [{"name": "fgsm", "params": {"eps": 0.2}}],
             "backdoor": [{"name": "static_patch", "params": {"target_class": 3, "patch_size": 2,
                                                              "poison_fraction": 0.1}}]},
    evaluation={"n_eval": 80},
    output={"dir": "runs", "html": False, "figures": False},
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("probes")
    (tmp / "p.yaml").write_text(yaml.safe_dump(PROFILE))
    CliRunner().invoke(app, ["run", str(tmp / "p.yaml"), "--runs-dir", str(tmp / "runs"), "--no-progress", "-q"])
    run = next((tmp / "runs").iterdir())
    res = CliRunner().invoke(app, ["export", str(run), "--baseline", "--out", str(tmp / "b"), "--probes", "50"])
    assert res.exit_code == 0, res.output
    return run, tmp / "b"


def test_export_stores_the_runs_probes_hashed_in_the_manifest(exported):
    run, b = exported
    manifest = json.loads((b / "manifest.json").read_text())
    assert manifest["probes"]["file"] in manifest["files"]
    ps = load_probes(b)
    assert ps.counts() == manifest["probes"]["counts"]
    assert ps.counts()["clean"] == 50 and ps.counts()["adversarial"] == 50 and ps.counts()["triggered"] == 50
    results = json.loads((run / "results.json").read_text())
    ids = {a["name"]: a["id"] for a in results["attacks"]}
    evasion = load_stage_state(RunDir(run).stage_state(f"attack-{ids['fgsm']}"))
    adv = ps.x[ps.mask("adversarial")]
    # every adversarial probe is one of the run's stored adversarial examples, with its label
    stored = {tuple(v.flatten().tolist()): int(lab) for v, lab in zip(evasion["x_adv"], evasion["y"])}
    assert all(stored.get(tuple(v.flatten().tolist())) == int(lab)
               for v, lab in zip(adv, ps.y[ps.mask("adversarial")]))
    trig = ps.mask("triggered")
    assert set(ps.target[trig].tolist()) == {3} and set(ps.target[~trig].tolist()) == {-1}
    assert load_bundle(b).probes.counts() == ps.counts()
    out = CliRunner().invoke(app, ["verify", str(b)])
    assert out.exit_code == 0 and "probes: 150" in out.output


def test_a_tampered_probe_file_is_refused_by_verify_and_loading(exported, tmp_path):
    _, b = exported
    bad = tmp_path / "bad"
    shutil.copytree(b, bad)
    f = bad / "probes" / "probes.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 1
    f.write_bytes(bytes(raw))
    for load in (load_bundle, load_probes):
        with pytest.raises(BundleError, match="probes.safetensors"):
            load(bad)
    out = CliRunner().invoke(app, ["verify", str(bad)])
    assert out.exit_code == 2 and "probes.safetensors" in out.output


def test_probe_set_samples_each_source_with_its_seed():
    x, y = torch.rand(300, 1, 8, 8), torch.arange(300) % 10
    a = probe_set(clean=(x, y), adversarial=[(x[:40], y[:40])], n=100, seed=1)
    assert a.counts() == {"clean": 100, "adversarial": 40, "triggered": 0}
    assert torch.equal(a.x, probe_set(clean=(x, y), adversarial=[(x[:40], y[:40])], n=100, seed=1).x)
    assert not torch.equal(a.x, probe_set(clean=(x, y), adversarial=[(x[:40], y[:40])], n=100, seed=2).x)
    assert list(KINDS) == ["clean", "adversarial", "triggered"]
