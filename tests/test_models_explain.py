"""Explanations (issue 30): integrated gradients through Captum obey completeness and match a slow reference;
an evasion run's report carries the clean-vs-adversarial figure."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from torch import nn
from typer.testing import CliRunner

pytest.importorskip("captum")

from _profiles import tiny_profile  # noqa: E402
from safedl.cli import app  # noqa: E402
from safedl.models.explain import integrated_gradients, saliency  # noqa: E402


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(256, 3))


def _reference_ig(model: nn.Module, x: torch.Tensor, target: torch.Tensor, steps: int = 4000) -> torch.Tensor:
    """Midpoint Riemann sum of the path integral, one input at a time (slow, obviously right)."""
    out = []
    for xi, ti in zip(x, target):
        alphas = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps
        path = (alphas[:, None, None, None] * xi[None]).requires_grad_(True)
        g, = torch.autograd.grad(model(path)[:, int(ti)].sum(), path)
        out.append(xi * g.mean(0))
    return torch.stack(out)


def test_integrated_gradients_completeness_and_reference():
    model = _model().train()
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 1, 2, 0, 1])
    a, delta = integrated_gradients(model, x, target=target)
    with torch.no_grad():
        gap = model(x).gather(1, target[:, None]).squeeze(1) - model(torch.zeros_like(x))[:, target].diagonal()
    assert torch.allclose(a.flatten(1).sum(1), gap, atol=1e-3), (a.flatten(1).sum(1), gap)
    assert float(delta.abs().max()) < 1e-3
    assert torch.allclose(a, _reference_ig(model, x, target), atol=1e-4)
    assert model.training and all(p.grad is None for p in model.parameters())  # mode and grads left alone
    s = saliency(model, x, target=target)
    xr = x.clone().requires_grad_(True)
    g, = torch.autograd.grad(model.eval()(xr).gather(1, target[:, None]).sum(), xr)
    assert torch.allclose(s, g.abs(), atol=1e-6)


def test_evasion_run_report_has_the_integrated_gradients_figure(tmp_path):
    prof = tiny_profile(name="tiny-ig", training={"epochs": 2},
                        attacks={"evasion": [{"name": "fgsm", "params": {"eps": 0.1}}]},
                        evaluation={"n_examples": 3}, output={"dir": "runs", "figures": True, "html": False})
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(prof))
    res = CliRunner().invoke(app, ["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--no-progress", "-q"])
    assert res.exit_code == 0, res.output
    run_dir = next((tmp_path / "runs").iterdir())
    attack = json.loads((run_dir / "results.json").read_text())["attacks"][0]
    rel = attack["artifacts"]["integrated gradients: clean vs adversarial"]
    assert (run_dir / rel).read_bytes()[:4] == b"\x89PNG"
    assert rel in (run_dir / "report.md").read_text()
    assert any(n.startswith("integrated gradients (64 Gauss-Legendre steps") for n in attack["notes"])
