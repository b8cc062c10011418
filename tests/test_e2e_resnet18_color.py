"""examples/resnet18-color.yaml end to end: a ResNet-18 (CIFAR stem) on 32 px colour photos in an image folder,
trained 1 epoch on small images made here (two classes told apart by colour), attacked with FGSM and PGD at 8/255.
The run must finish, keep every adversarial image in the eps-ball of its 3-channel original, and PGD must be at
least as strong as FGSM."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from safedl.cli import app

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "resnet18-color.yaml"


def _photos(root: Path, n: int = 40, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for cls, channel in (("red", 0), ("blue", 2)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 90, size=(40, 40, 3), dtype=np.uint8)  # larger than 32: center_crop resizes
            img[..., channel] = rng.integers(120, 256, size=(40, 40), dtype=np.uint8)
            Image.fromarray(img, "RGB").save(root / cls / f"{i}.png")


def test_the_resnet18_colour_example_runs_with_one_epoch(tmp_path):
    _photos(tmp_path / "photos")
    prof = yaml.safe_load(EXAMPLE.read_text())
    prof["dataset"]["path"] = str(tmp_path / "photos")
    prof["training"].update(epochs=1, batch_size=16, lr=0.05)
    prof["evaluation"].update(n_eval=16, batch_size=16, n_examples=2)
    prof["output"] = {"dir": str(tmp_path / "runs"), "html": False, "figures": False}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(prof))
    res = CliRunner().invoke(app, ["run", str(path), "--no-progress", "-q"])
    assert res.exit_code == 0, res.output  # no gate in the example
    run_dir = next((tmp_path / "runs").iterdir())
    results = json.loads((run_dir / "results.json").read_text())
    assert results["profile"]["model"]["arch"] == "resnet18"
    attacks = {a["id"]: a["metrics"] for a in results["attacks"]}
    assert attacks["fgsm"]["robust_accuracy"]["n"] == 16
    assert attacks["pgd"]["robust_accuracy"]["value"] <= attacks["fgsm"]["robust_accuracy"]["value"]
    for m in attacks.values():
        assert m["perturbation"]["linf_max"]["value"] <= 0.03137 + 1e-6  # the eps-ball holds on colour images
