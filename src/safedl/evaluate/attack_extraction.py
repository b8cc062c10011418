"""Extraction stage: steal the baseline through the counted query interface and measure how well the copy works.

For each query budget of the attack (250 / 500 / 1000 / 2000 / 4000 by default) a fresh attacker with that total
budget runs the attack; the stolen model is scored on the test split, which neither the victim nor the attacker
trained on: ``fidelity`` (agreement with the victim's answered label) and ``surrogate_accuracy`` (against the true
labels), both with Wilson 95% intervals. PGD examples crafted on the largest-budget copy are sent to the victim:
``transfer_success_rate`` is the share of victim-correct evaluation images it then misclassifies.
``attack_success_rate`` of an extraction attack is defined as its fidelity at the largest budget, so risk and
gate treat it like any other attack.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from safedl import registry
from safedl.evaluate.context import RunContext
from safedl.evaluate.base import AttackOutcome, attack_evaluator
from safedl.attacks.extraction.base import ExtractionAttack, ExtractionOracle
from safedl.data.builtin import load_builtin
from safedl.data.dataset import Splits
from safedl.profile import AttackSpec
from safedl.utils.progress import progress_bar
from safedl.utils.stats import proportion, scalar
from safedl.utils.tensors import eval_mode, predict, predict_logits

log = logging.getLogger(__name__)
Postprocess = Callable[[torch.Tensor], torch.Tensor] | None


def attacker_pool(splits: Splits, name: str) -> torch.Tensor:
    """The attacker's own unlabelled natural images: a split's images, or another built-in set resized to fit."""
    if name == "train":
        return splits.train.x
    if name == "val":
        return splits.val.x
    x = load_builtin(name).x
    c, h, w = splits.shape
    if x.shape[2:] != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)
    if x.shape[1] != c:
        x = x.mean(1, keepdim=True).expand(-1, c, -1, -1).contiguous()
    return x


def deployed_labels(model: nn.Module, x: torch.Tensor, postprocess: Postprocess) -> torch.Tensor:
    """The label the deployed system answers: argmax of the (post-processed) output."""
    if postprocess is None:
        return predict(model, x)
    with eval_mode(model):
        return postprocess(predict_logits(model, x)).argmax(1)


def extraction_curve(victim: nn.Module, attack: ExtractionAttack, pool: torch.Tensor, test_x: torch.Tensor,
                     test_y: torch.Tensor, *, output: str, num_classes: int, device: torch.device,
                     postprocess: Postprocess = None, observer: Callable[[torch.Tensor], None] | None = None,
                     description: str = "extraction") -> tuple[list[dict[str, Any]], nn.Module]:
    """Run the attack once per budget; returns the curve points and the largest budget's surrogate."""
    target = deployed_labels(victim, test_x, postprocess).cpu()
    points, surrogate = [], None
    with progress_bar(len(attack.budgets), description) as bar:
        for budget in attack.budgets:
            oracle = ExtractionOracle(victim, budget=budget, output=output, postprocess=postprocess, device=device)
            result = attack.extract(oracle, pool, num_classes=num_classes, device=device)
            surrogate = result.surrogate
            pred = predict(surrogate, test_x).cpu()
            points.append({"budget": budget, "queries": oracle.used,
                           "fidelity": proportion(int((pred == target).sum()), len(target)),
                           "surrogate_accuracy": proportion(int((pred == test_y.cpu()).sum()), len(test_y))})
            log.info("%s: %d queries -> fidelity %.3f, accuracy %.3f", description, oracle.used,
                     points[-1]["fidelity"]["value"], points[-1]["surrogate_accuracy"]["value"])
            bar.advance(1)
    assert surrogate is not None
    return points, surrogate


def transfer_success(victim: nn.Module, surrogate: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                     postprocess: Postprocess = None, batch_size: int = 250) -> dict[str, Any]:
    """PGD (L-inf ``eps``, 20 steps) on the stolen model, sent to the victim: success among victim-correct images."""
    pgd = registry.create("evasion", "pgd", eps=eps, steps=20)
    x_adv = torch.cat([pgd(surrogate, x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    ok = deployed_labels(victim, x, postprocess) == y
    fooled = ok & (deployed_labels(victim, x_adv, postprocess) != y)
    return proportion(int(fooled.sum()), int(ok.sum()))


def curve_metrics(points: list[dict[str, Any]], transfer: dict[str, Any], *, suffix: str = "") -> dict[str, Any]:
    """results.json metrics of a curve: the largest budget's fidelity / accuracy, and one entry per budget."""
    last = points[-1]
    m: dict[str, Any] = {f"fidelity{suffix}": last["fidelity"], f"surrogate_accuracy{suffix}": last["surrogate_accuracy"],
                         f"attack_success_rate{suffix}": last["fidelity"], f"transfer_success_rate{suffix}": transfer,
                         f"queries_total{suffix}": scalar(last["queries"])}
    m[f"by_budget{suffix}"] = {str(p["budget"]): {"fidelity": p["fidelity"], "surrogate_accuracy": p["surrogate_accuracy"]}
                               for p in points}
    return m


@attack_evaluator("extraction")
def simulate_extraction(ctx: RunContext, spec: AttackSpec, attack: ExtractionAttack) -> AttackOutcome:
    """Steal the baseline at every budget with the access the threat model exposes (scores or labels)."""
    output = ctx.profile.threat_model.interface_exposed
    pool = attacker_pool(ctx.splits, attack.pool)
    test = ctx.splits.test
    points, surrogate = extraction_curve(ctx.baseline, attack, pool, test.x.to(ctx.device), test.y, output=output,
                                         num_classes=ctx.splits.num_classes, device=ctx.device,
                                         description=f"attack {spec.key}")
    x, y = ctx.eval_set()
    transfer = transfer_success(ctx.baseline, surrogate, x, y, eps=attack.transfer_eps)
    entry: dict[str, Any] = {
        "id": spec.key, "name": spec.name, "category": "extraction", "access": output,
        "params": attack.params(), "metrics": curve_metrics(points, transfer), "curve": points,
        "notes": [f"attacker pool: {attack.pool!r} images ({len(pool)}), answers: {output}; attack_success_rate is "
                  "the fidelity at the largest budget"],
        "artifacts": {},
    }
    if ctx.profile.output.figures:
        from safedl.report.extraction_figures import curve_figure

        path = ctx.artifact_dir("attacks") / f"{spec.key}_extraction_curve.png"
        if curve_figure(path, {"undefended": points}, title=f"Extraction {spec.key}: stolen model vs query budget"):
            entry["artifacts"]["extraction curve (95% CI)"] = ctx.rel(path)
    return AttackOutcome(entry=entry, state={"curve": points, "surrogate": surrogate.cpu().state_dict()})
