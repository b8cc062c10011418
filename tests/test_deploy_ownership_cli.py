"""``safedl ownership verify`` (issue 26): p-value and verdict for a suspect bundle or TorchScript file, exit 2 on
bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("fastapi")
from _serve_helpers import make_bundle  # noqa: E402
from safedl.cli import app as cli_app  # noqa: E402
from safedl.defenses.ownership import ResponseWatermark  # noqa: E402
from safedl.deploy import load_bundle  # noqa: E402

KEY = b"w" * 32


class Constant(torch.nn.Module):
    """Always answers class ``c`` (a "copy" that reproduces a watermark whose label is ``c`` everywhere)."""

    def __init__(self, c: int):
        super().__init__()
        self.c = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.full((x.shape[0],), self.c, dtype=torch.long), 10).float()


@pytest.fixture(scope="module")
def setup(tiny_model, digits_splits, tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    bundle = make_bundle(tiny_model, digits_splits, root / "bundle", detect=False)
    (root / "wm.key").write_bytes(KEY)
    x = torch.cat([digits_splits.train.x, digits_splits.test.x, digits_splits.val.x])
    victim = load_bundle(bundle).pipeline.decide(x).labels.cpu()
    mask, wl = ResponseWatermark(key=KEY, num_classes=10, rate=0.05).select(x, victim)
    pick = mask & (wl == 7)
    evidence = torch.cat([x[pick], x[~mask][:200]])  # watermarked with label 7, and unmarked queries
    np.save(root / "evidence.npy", evidence.numpy())
    torch.jit.script(Constant(7)).save(str(root / "copy.pt"))
    return root, bundle, int(pick.sum())


def _verify(root, bundle, suspect, *extra):
    return CliRunner().invoke(cli_app, ["ownership", "verify", str(bundle), "--suspect", str(suspect), "--evidence",
                                        str(root / "evidence.npy"), "--watermark-key-file", str(root / "wm.key"),
                                        "--rate", "0.05", *extra])


def test_a_copy_reproducing_the_watermark_is_accused_and_the_original_model_is_not(setup):
    root, bundle, n7 = setup
    assert n7 >= 3
    res = _verify(root, bundle, root / "copy.pt")
    assert res.exit_code == 0, res.output
    assert f"gave the watermark label on {n7}" in res.output and "verdict: COPY" in res.output
    res = _verify(root, bundle, bundle)  # the bundle itself answers its own labels: never the watermark's
    assert res.exit_code == 0 and "p-value 1;" in res.output and "not shown to be a copy" in res.output


def test_bad_input_exits_2_with_one_clear_message(setup, tmp_path):
    root, bundle, _ = setup
    res = _verify(root, bundle, tmp_path / "nothing.pt")
    assert res.exit_code == 2 and "--suspect" in res.output and "no such" in res.output
    (tmp_path / "short.key").write_bytes(b"abc")
    res = _verify(root, bundle, root / "copy.pt", "--watermark-key-file", str(tmp_path / "short.key"))
    assert res.exit_code == 2 and "16 bytes" in res.output
