"""Bounded black-box attacks through the serving path (square on a scores key, HopSkipJump on a label key) and the
replay of stored adversarial and backdoor-triggered examples, each measured as an :class:`AttackOutcome`.

The attacks are safedl's own (``attacks/evasion/square.py``: Andriushchenko et al. 2020; ``hopskipjump.py``: Chen
et al. 2020), run unchanged against :class:`~safedl.serve.client.RemoteClassifier`. Probes go in chunks; a chunk
that runs out of the run's query or time budget is dropped whole (its probes are not counted), and the run stops.
A probe is robust when the service, asked about the attack's final image, rejects it (detected) or answers its true
label, as the offline evaluation counts a defended system.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from safedl import registry
from safedl.errors import QueryBudgetExceeded, UserError
from safedl.redteam.budget import RunBudget
from safedl.redteam.outcome import AttackOutcome
from safedl.serve.client import RemoteClassifier, ServiceClient, ServiceError

log = logging.getLogger("safedl.redteam.runner")

BLACKBOX = {"square": "scores", "hopskipjump": "labels"}


class DetectingRemote(RemoteClassifier):
    """:class:`RemoteClassifier` that records the images sent up to the first request with a rejected image."""

    def __init__(self, client: ServiceClient, **kw: Any):
        super().__init__(client, on_reject="uniform", **kw)
        self.first_rejection_: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        before = self.rejected_
        out = super().forward(x)
        if self.first_rejection_ is None and self.rejected_ > before:
            self.first_rejection_ = self.queries_
        return out


def make_attack(name: str, *, eps: float, queries_per_image: int, seed: int) -> Any:
    """The registry's square (L-inf, ``eps``) or hopskipjump (L2, ``eps``) with ``queries_per_image`` each."""
    if name == "square":
        return registry.create("evasion", "square", eps=eps, norm="linf", max_queries=queries_per_image, seed=seed)
    evals = max(10, min(100, queries_per_image // 10))
    return registry.create("evasion", "hopskipjump", eps=eps, norm="l2", max_queries=queries_per_image,
                           init_evals=evals, init_tries=min(100, max(10, queries_per_image // 10)), seed=seed)


def judge(client: ServiceClient, x: torch.Tensor, y: torch.Tensor, *, budget: RunBudget, batch: int,
          out: AttackOutcome, sent_before: int) -> tuple[int, int]:
    """(robust, images sent): ``x`` sent in requests of ``batch``; rejected or rightly labelled rows are robust."""
    robust = sent = 0
    for i in range(0, len(x), batch):
        doc = client.predict(x[i:i + batch], deadline=budget.deadline)
        rows = doc["results"]
        sent += len(rows)
        if any(r["rejected"] for r in rows):
            out.note_detection(sent_before, sent)
        robust += sum(bool(r["rejected"]) or int(r["label"]) == int(y[i + r["index"]]) for r in rows)
    return robust, sent


def run_blackbox(name: str, *, client: ServiceClient, x: torch.Tensor, y: torch.Tensor, eps: float,
                 queries_per_image: int, budget: RunBudget, num_classes: int, seed: int = 0, chunk: int = 50,
                 batch: int = 64) -> AttackOutcome:
    """Attack ``x`` chunk by chunk through ``client`` (access: scores for square, labels for hopskipjump)."""
    if name not in BLACKBOX:
        raise UserError(f"--attacks: {name!r} is not a black-box attack safedl redteam runs; allowed: "
                        f"{', '.join(sorted(BLACKBOX))}, replay")
    out = AttackOutcome(attack=name, eps=f"{eps:g}")
    attack = make_attack(name, eps=eps, queries_per_image=queries_per_image, seed=seed)
    for i in range(0, len(x), chunk):
        out.stopped = budget.exhausted()
        if out.stopped:
            break
        xs, ys = x[i:i + chunk], y[i:i + chunk]
        remote = DetectingRemote(client, access=BLACKBOX[name], max_queries=budget.queries_left,
                                 deadline_s=budget.seconds_left, max_images=batch, num_classes=num_classes)
        remote.check_attack(attack)
        try:
            adv = attack(remote, xs, ys)
            if remote.first_rejection_ is not None:
                out.note_detection(out.queries, remote.first_rejection_)
            if len(adv) > budget.queries_left - remote.queries_:
                raise QueryBudgetExceeded("no query budget left to judge the chunk's final images")
            robust, judged = judge(client, adv, ys, budget=budget, batch=batch, out=out,
                                   sent_before=out.queries + remote.queries_)
        except QueryBudgetExceeded as exc:  # DeadlineExceeded too: the chunk is dropped, the run stops
            out.stopped = "deadline" if budget.seconds_left <= 0 or "deadline" in str(exc) else "query_budget"
            _spend(out, budget, remote.queries_)
            break
        except ServiceError as exc:
            if exc.status != 403:
                raise
            out.stopped = "key_blocked"
            out.note_detection(out.queries, remote.queries_)
            _spend(out, budget, remote.queries_)
            log.warning("%s: the service blocked the key after %d queries (%s)", name, out.queries, exc.message)
            break
        _spend(out, budget, remote.queries_ + judged)
        out.n += len(xs)
        out.correct += robust
    log.info("%s eps=%s: robust %d/%d, %d queries%s", name, out.eps, out.correct, out.n, out.queries,
             f", stopped: {out.stopped}" if out.stopped else "")
    return out


def _spend(out: AttackOutcome, budget: RunBudget, images: int) -> None:
    out.queries += images
    budget.spend(images)
