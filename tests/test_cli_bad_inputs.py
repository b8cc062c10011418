"""A corpus of users' mistakes run through every CLI command: each exits 2 with one message naming the file/key and
what is allowed, never a traceback, and writes nothing (no run directory, no report).

Commands are read from the typer app itself; commands this file has no cases for still get the generic ones (an
unknown flag; a missing path for a required argument)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import typer
import yaml
from PIL import Image
from typer.testing import CliRunner

from safedl.cli import app

KNOWN = {"init", "validate", "list", "run", "report"}
GOOD = {"dataset": {"name": "digits"}, "attacks": {"evasion": [{"name": "fgsm", "params": {"eps": 0.1}}]},
        "training": {"epochs": 1}, "evaluation": {"gate": {"min_clean_accuracy": 0.1}}}


def _profile(tmp, name, data):
    path = tmp / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _with(**sections):
    prof = json.loads(json.dumps(GOOD))
    prof.update(sections)
    return prof


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(command args, text the message must contain) for every bad input, built once."""
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    one = tmp / "oneclass" / "cats"
    one.mkdir(parents=True)
    for i in range(6):
        Image.fromarray(np.full((8, 8), 30 * i, np.uint8)).save(one / f"{i}.png")
    mixed = tmp / "mixed"
    for c, size in (("a", (8, 8)), ("b", (9, 7))):
        (mixed / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.zeros(size, np.uint8)).save(mixed / c / f"{i}.png")
    (tmp / "nolinear.py").write_text("from torch import nn\n\ndef build():\n    return nn.Sequential("
                                     "nn.Conv2d(1, 10, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())\n")
    (tmp / "garbage.pt").write_bytes(b"not a checkpoint")
    (tmp / "a_file").write_text("x")
    foreign = tmp / "foreign"
    foreign.mkdir()
    (foreign / "profile.yaml").write_text(yaml.safe_dump(GOOD))
    rd = tmp / "rd"
    rd.mkdir()
    good = _profile(tmp, "good.yaml", GOOD)
    P = lambda name, data: str(_profile(tmp, name, data))  # noqa: E731
    profiles = [
        (str(tmp / "missing.yaml"), "not found"),
        (str(tmp / "binary.yaml"), "not a text"),
        (P("list.yaml", "- a\n- b\n"), "YAML mapping"),
        (P("syntax.yaml", "a: [1, 2\n"), "not valid YAML"),
        (P("empty.yaml", "{}\n"), "attacks: the profile lists no attack"),
        (P("typo.yaml", _with(attakcs={})), "attakcs"),
        (P("unknown.yaml", _with(attacks={"evasion": [{"name": "pgdd"}]})), "attacks.evasion[0].name"),
        (P("eps.yaml", _with(attacks={"evasion": [{"name": "pgd", "params": {"eps": -1}}]})), "eps"),
        (P("size.yaml", _with(dataset={"format": "image_folder", "path": "x", "image_size": "big"})),
         "dataset.image_size"),
        (P("oneclass.yaml", _with(dataset={"format": "image_folder", "path": "oneclass"})), "cats: 6"),
        (P("mixed.yaml", _with(dataset={"format": "image_folder", "path": "mixed"})), "dataset.image_size"),
        (P("nodata.yaml", _with(dataset={"format": "npz", "path": "nothere.npz"})), "nothere.npz"),
        (P("entry.yaml", _with(model={"entry_point": "no_such_module_xyz:build"})), "no_such_module_xyz"),
        (P("ckpt.yaml", _with(model={"arch": "tiny_cnn", "checkpoint": "garbage.pt"})), "garbage.pt"),
        (P("layer.yaml", _with(model={"arch": "tiny_cnn", "feature_layer": "nope"},
                               attacks={"backdoor": [{"name": "static_patch"}]},
                               defenses=[{"name": "spectral_signatures"}])), "nope"),
    ]
    cases = {
        "init": [([str(good)], "exists"), ([str(tmp)], "is a folder"), ([str(tmp / "no" / "p.yaml")], "does not exist")],
        "validate": [([p], msg) for p, msg in profiles] + [([str(_profile(tmp, "nogate.yaml", _with(
            evaluation={}))), "--require-gate"], "sets no threshold")],
        "list": [(["nope"], "unknown component kind")],
        "run": [([p, "--runs-dir", str(tmp / "runs")], msg) for p, msg in profiles] + [
            ([str(good), "--device", "tpu", "--runs-dir", str(tmp / "runs")], "--device"),
            ([str(good), "--device", "cuda:7", "--runs-dir", str(tmp / "runs")], "cuda"),
            (["--resume", str(tmp / "nothere")], "not a safedl run directory"),
            (["--resume", str(foreign)], "not a safedl run directory"),
            ([str(good), "--runs-dir", str(tmp / "a_file")], "a_file"),
        ],
        "report": [([str(tmp / "nothere")], "not found"), ([str(tmp / "binary.yaml")], "not valid JSON")],
    }
    for i, (blob, msg) in enumerate([([1, 2], "not a safedl results file"),
                                     ({"schema_version": 9}, "schema_version 9"),
                                     ({"schema_version": 1, "run_id": "x"}, "profile (expected a dict)"),
                                     (_shaped(attacks=[1]), "unexpected shape")]):
        d = rd / f"r{i}"
        d.mkdir()
        (d / "results.json").write_text(json.dumps(blob))
        cases["report"].append(([str(d)], msg))
    return tmp, cases


def _shaped(**override):
    base = {"schema_version": 1, "run_id": "r", "profile": {"name": "p", "threat_model": {}, "seed": 0, "model": {}},
            "data": {"name": "d", "shape": [1, 8, 8], "num_classes": 2, "sizes": {"train": 1, "val": 1, "test": 1}},
            "baseline": {"metrics": {}}, "attacks": [], "defenses": [],
            "risk": {"overall_level": "low", "rule": "r", "per_attack": []}, "gate": {"passed": True, "failures": []},
            "environment": {}}
    base.update(override)
    return base


def _commands() -> dict:
    return typer.main.get_command(app).commands


def _assert_user_error(res, expect: str, args) -> None:
    out = res.output
    assert res.exit_code == 2, (args, res.exit_code, out)
    assert "Traceback" not in out and out.lstrip().startswith(("error:", "Usage:")), (args, out)
    assert expect in out, (args, expect, out)


@pytest.mark.parametrize("command", sorted(KNOWN))
def test_every_bad_input_exits_2_with_a_named_message_and_writes_nothing(corpus, command, monkeypatch):
    tmp, cases = corpus
    monkeypatch.chdir(tmp)
    assert command in _commands()
    before = sorted(p.relative_to(tmp) for p in tmp.rglob("*"))
    for args, expect in cases[command]:
        res = CliRunner().invoke(app, [command, *args])
        _assert_user_error(res, expect, args)
    assert sorted(p.relative_to(tmp) for p in tmp.rglob("*")) == before  # nothing half-written anywhere


def test_commands_without_cases_get_the_generic_bad_inputs(tmp_path):
    """Commands other engineers add (export, serve, keys ...) are covered by the generic cases automatically."""
    for name, cmd in _commands().items():
        res = CliRunner().invoke(app, [name, "--no-such-flag"])
        assert res.exit_code == 2 and "Traceback" not in res.output, (name, res.output)
        if name in KNOWN or getattr(cmd, "commands", None):
            continue
        first = next((p for p in cmd.params if p.param_type_name == "argument"), None)
        if first is not None and first.required:
            res = CliRunner().invoke(app, [name, str(tmp_path / "does-not-exist")])
            assert res.exit_code == 2 and "Traceback" not in res.output, (name, res.output)


def test_ctrl_c_and_sigterm_name_the_real_run_dir(tmp_path, monkeypatch):
    import os
    import signal

    import safedl.run as pipeline  # the CLI calls safedl.run.run_assessment

    seen = []

    def interrupted(profile, *, run_dir, **kw):
        run_dir.mkdir(parents=True)
        seen.append(run_dir)
        os.kill(os.getpid(), signal.SIGTERM)  # a cancelled CI job: handled like Ctrl-C
        raise AssertionError("SIGTERM was not turned into an interrupt")

    monkeypatch.setattr(pipeline, "run_assessment", interrupted)
    path = _profile(tmp_path, "p.yaml", GOOD)
    res = CliRunner().invoke(app, ["run", str(path), "--runs-dir", str(tmp_path / "runs")])
    assert res.exit_code == 130, res.output
    assert f"--resume {seen[0]}" in res.output and "RUN_DIR" not in res.output.split("interrupted")[-1]


def test_verbose_shows_safedl_debug_lines_only():
    import logging

    from safedl.cli import _setup_logging

    _setup_logging(True, False)
    try:
        assert logging.getLogger("safedl.run.baseline").isEnabledFor(logging.DEBUG)
        for other in ("PIL.PngImagePlugin", "matplotlib.font_manager"):
            assert not logging.getLogger(other).isEnabledFor(logging.DEBUG)
            assert not logging.getLogger(other).isEnabledFor(logging.INFO)
    finally:
        logging.getLogger().handlers.clear()
        logging.getLogger("safedl").setLevel(logging.NOTSET)
