"""Evasion stage: run one evasion attack on the evaluation images and measure how robust the baseline is."""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch
from torch import nn

from safedl.evaluate.context import RunContext
from safedl.evaluate.base import AttackOutcome, EvasionState, attack_evaluator
from safedl.profile import AttackSpec
from safedl.utils.bits import pack as pack_bits
from safedl.utils.progress import progress_bar
from safedl.report.stage_figures import example_figure
from safedl.utils.stats import mean_metric, proportion, scalar
from safedl.utils.backoff import BackoffReport, run_with_backoff
from safedl.utils.tensors import predict

log = logging.getLogger(__name__)


def choose_targets(y: torch.Tensor, num_classes: int, *, target_class: int | None, seed: int) -> torch.Tensor:
    """A fixed target class, or for each sample a uniformly random class other than its own (seeded)."""
    if target_class is not None:
        return torch.full_like(y, int(target_class))
    g = torch.Generator().manual_seed(seed)
    offset = torch.randint(1, num_classes, y.shape, generator=g).to(y.device)
    return (y + offset) % num_classes


def run_evasion(model: nn.Module, attack: Any, x: torch.Tensor, y: torch.Tensor, *, target: torch.Tensor | None,
                batch_size: int, description: str = "attack",
                on_backoff: Callable[[BackoffReport], None] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, float]:
    """Attack in batches; returns (x_adv, per-sample queries or None, per-sample ``broken_by_`` or None, seconds).

    Out of memory on a batch halves the batch size and retries it (``safedl.utils.backoff``); ``on_backoff``
    receives what was done."""
    queries, broken = [], []
    t0 = time.perf_counter()
    with progress_bar(len(x), description) as bar:
        def one(sl: slice) -> torch.Tensor:
            adv = attack(model, x[sl], y[sl], target=None if target is None else target[sl])
            q = getattr(attack, "queries_", None)
            if q is not None:
                queries.append(q.detach().cpu())
            b = getattr(attack, "broken_by_", None)
            if b is not None:
                broken.append(b.detach().cpu())
            bar.advance(len(adv))
            return adv

        advs, report = run_with_backoff(one, len(x), batch_size=batch_size)
    elapsed = time.perf_counter() - t0
    if on_backoff is not None:
        on_backoff(report)
    cat = lambda parts: torch.cat(parts) if parts else None  # noqa: E731
    return torch.cat(advs), cat(queries), cat(broken), elapsed


def evasion_metrics(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, *,
                    target: torch.Tensor | None, queries: torch.Tensor | None, batch_size: int = 500) -> dict[str, Any]:
    """The standard evasion metrics (DESIGN.md): accuracies, success rates among clean-correct samples, norms, queries."""
    pred = predict(model, x, batch_size=batch_size)
    pred_adv = predict(model, x_adv, batch_size=batch_size)
    correct = pred == y
    robust = correct & (pred_adv == y)
    n, n_ok = len(y), int(correct.sum())
    delta = (x_adv - x).flatten(1)
    linf, l2 = delta.abs().amax(1), delta.norm(dim=1)
    l0 = ((x_adv - x).abs() > 1e-7).any(1).flatten(1).sum(1).float()  # changed pixel positions, any channel
    m: dict[str, Any] = {
        "clean_accuracy": proportion(int(correct.sum()), n),
        "robust_accuracy": proportion(int(robust.sum()), n),
        "attack_success_rate": proportion(int((correct & (pred_adv != y)).sum()), n_ok),
        "perturbation": {
            "linf_mean": mean_metric(linf.cpu()), "linf_max": scalar(float(linf.max()) if n else 0.0, n=n),
            "l2_mean": mean_metric(l2.cpu()), "l2_max": scalar(float(l2.max()) if n else 0.0, n=n),
            "l0_mean": mean_metric(l0.cpu()), "l0_max": scalar(float(l0.max()) if n else 0.0, n=n),
        },
    }
    if target is not None:
        eligible = correct & (target != y)
        m["targeted_success_rate"] = proportion(int((eligible & (pred_adv == target)).sum()), int(eligible.sum()))
    if queries is not None:
        qf = queries.float()
        m["queries_median"] = scalar(float(qf.median()), n=len(qf))
        m["queries_mean"] = mean_metric(qf)
        m["queries_max"] = scalar(float(qf.max()), n=len(qf))
    return m


@attack_evaluator("evasion")
def simulate_evasion(ctx: RunContext, spec: AttackSpec, attack: Any) -> AttackOutcome:
    """Attack the baseline on the evaluation images; transfer attacks first fit their surrogate."""
    x, y = ctx.eval_set()
    model = ctx.baseline
    target = None
    if spec.targeted:
        target = choose_targets(y, ctx.splits.num_classes, target_class=spec.target_class, seed=ctx.seed)
    t_fit = 0.0
    if hasattr(attack, "fit"):
        t0 = time.perf_counter()
        attack.fit(ctx.splits.train, model=model, device=ctx.device)
        t_fit = time.perf_counter() - t0
    backoff: list[BackoffReport] = []
    x_adv, queries, broken_by, elapsed = run_evasion(model, attack, x, y, target=target,
                                          batch_size=ctx.profile.evaluation.batch_size, description=f"attack {spec.key}",
                                          on_backoff=backoff.append)
    metrics = evasion_metrics(model, x, y, x_adv, target=target, queries=queries)
    metrics["time_per_sample_s"] = scalar(elapsed / max(1, len(x)), n=len(x))
    entry: dict[str, Any] = {
        "id": spec.key, "name": spec.name, "category": "evasion", "access": getattr(attack, "access", "white-box"),
        "params": attack.params() if hasattr(attack, "params") else dict(spec.params),
        "targeted": spec.targeted, "metrics": metrics, "time_s": elapsed + t_fit, "notes": [], "artifacts": {},
    }
    if backoff and backoff[0].note:
        entry["notes"].append(backoff[0].note)
        entry["batch_backoff"] = {"requested": backoff[0].requested, "used": backoff[0].used,
                                  "failed_sizes": backoff[0].failed_sizes}
    if t_fit >= 0.05:  # attacks whose fit does nothing measurable get no note
        entry["notes"].append(f"surrogate/fit time {t_fit:.1f}s included in time_s")
    fit_queries = getattr(attack, "fit_queries_", None)
    if fit_queries:
        metrics["fit_queries_total"] = scalar(float(fit_queries))
        entry["notes"].append(f"{int(fit_queries)} label queries to the target were spent training the surrogate")
    violations = getattr(attack, "eps_violations_", 0)
    if violations:  # an adapted attack (e.g. art:...) returned examples outside [0, 1] or its eps-ball
        metrics["eps_violations"] = proportion(int(violations), len(x))
        entry["notes"].append(f"{violations} of {len(x)} examples came back outside [0, 1] or the eps-ball and "
                              "were projected back (on_violation: project)")
    if hasattr(attack, "threat"):  # a threat that is not an L-p ball (a pixel budget, a patch): say which
        entry["threat"] = attack.threat()
        entry["notes"].append(f"threat model: {entry['threat']['description']}; the eps-ball metrics do not apply")
    if not getattr(attack, "bounded", True):
        entry["notes"].append("minimum-norm attack with no eps budget: read robust accuracy together with the "
                              "perturbation norms")
    names = getattr(attack, "attack_names_", None)
    if broken_by is not None and names is not None:
        entry["broken_by"] = {nm: int((broken_by == i).sum()) for i, nm in enumerate(names)}
        entry["broken_by"]["not broken"] = int((broken_by < 0).sum())
    pred, pred_adv = predict(model, x), predict(model, x_adv)
    # per evaluation image (the first n_eval test images): still correct under attack, for paired comparisons
    entry["per_image"] = {"robust": pack_bits((pred == y) & (pred_adv == y))}
    if ctx.profile.evaluation.n_examples and ctx.profile.output.figures:
        path = ctx.artifact_dir("attacks") / f"{spec.key}_examples.png"
        example_figure(path, x, x_adv, y, pred, pred_adv, class_names=ctx.splits.train.class_names,
                       n=ctx.profile.evaluation.n_examples)
        if path.exists():
            entry["artifacts"]["clean (top) vs adversarial (bottom) examples"] = ctx.rel(path)
        _explanations(ctx, spec, model, x, x_adv, pred, pred_adv, entry)
    state = EvasionState(x=x, y=y, x_adv=x_adv, target=target, spec=spec.model_dump()).to_state()
    return AttackOutcome(entry=entry, state=state)


MAX_EXPLAINED = 4  # rows of the integrated-gradients figure


def _explanations(ctx, spec, model, x, x_adv, pred, pred_adv, entry: dict) -> None:
    """Integrated-gradients maps of the first few clean and adversarial inputs (needs Captum: the explain extra)."""
    from safedl.models import explain
    from safedl.report.explain_figures import explanation_figure

    if not explain.available():
        entry["notes"].append("no explanation figure: Captum is not installed (pip install 'safedl[explain]')")
        return
    n = min(MAX_EXPLAINED, ctx.profile.evaluation.n_examples, len(x))
    xc, xa = x[:n], x_adv[:n]
    try:
        a_c, d_c = explain.integrated_gradients(model, xc, target=pred[:n])
        a_a, d_a = explain.integrated_gradients(model, xa, target=pred_adv[:n])
    except RuntimeError as exc:  # e.g. a user model autograd cannot differentiate: the figure is optional
        entry["notes"].append(f"no explanation figure: integrated gradients failed on this model ({exc})")
        return
    names = ctx.splits.train.class_names or [str(i) for i in range(ctx.splits.num_classes)]
    titles = [(f"pred {names[int(pred[i])]}", f"pred {names[int(pred_adv[i])]}") for i in range(n)]
    path = ctx.artifact_dir("attacks") / f"{spec.key}_integrated_gradients.png"
    explanation_figure(path, xc.cpu(), xa.cpu(), a_c.cpu(), a_a.cpu(), titles)
    entry["artifacts"]["integrated gradients: clean vs adversarial"] = ctx.rel(path)
    err = float(torch.cat([d_c, d_a]).abs().max())
    entry["notes"].append(f"integrated gradients (64 Gauss-Legendre steps, black baseline): largest completeness "
                          f"error |sum(attr) - (f(x) - f(0))| = {err:.2g} over the {2 * n} explained inputs")
