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


def digests(x: torch.Tensor) -> list[bytes]:
    """One key per image of ``x`` (its pixels clipped to [0, 1], as sent): equal keys, identical images."""
    flat = x.detach().float().clamp(0, 1).cpu().flatten(1).contiguous()
    return [row.numpy().tobytes() for row in flat]


class DetectingRemote(RemoteClassifier):
    """:class:`RemoteClassifier` that tells the attack's adversarial queries from its clean ones (an image identical
    to one of the probes being attacked, e.g. HopSkipJump's first query of each probe): ``first_rejection_`` is the
    number of adversarial images sent up to the first request in which one of them was rejected; rejections of
    clean probes are false alarms (``false_alarms_`` of ``clean_sent_``), never a detection."""

    def __init__(self, client: ServiceClient, *, clean: torch.Tensor, **kw: Any):
        super().__init__(client, on_reject="uniform", **kw)
        self.clean_keys = set(digests(clean))
        self.first_rejection_: int | None = None
        self.adversarial_sent_ = self.clean_sent_ = self.false_alarms_ = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        is_clean = torch.tensor([k in self.clean_keys for k in digests(x)], dtype=torch.bool)
        if len(x) == 0 or bool(is_clean.all()) or not bool(is_clean.any()):
            return self._sent(x, clean=len(x) > 0 and bool(is_clean.all()))
        a, b = self._sent(x[is_clean], clean=True), self._sent(x[~is_clean], clean=False)
        out = a.new_empty((len(x),) + tuple(a.shape[1:]))
        out[is_clean.to(out.device)], out[~is_clean.to(out.device)] = a, b
        return out

    def _sent(self, x: torch.Tensor, *, clean: bool) -> torch.Tensor:
        before = self.rejected_
        out = super().forward(x)
        rejected = self.rejected_ - before
        if clean:
            self.clean_sent_ += len(x)
            self.false_alarms_ += rejected
            return out
        self.adversarial_sent_ += len(x)
        if self.first_rejection_ is None and rejected:
            self.first_rejection_ = self.adversarial_sent_
        return out


def make_attack(name: str, *, eps: float, queries_per_image: int, seed: int) -> Any:
    """The registry's square (L-inf, ``eps``) or hopskipjump (L2, ``eps``) with ``queries_per_image`` each."""
    if name == "square":
        return registry.create("evasion", "square", eps=eps, norm="linf", max_queries=queries_per_image, seed=seed)
    evals = max(10, min(100, queries_per_image // 10))
    return registry.create("evasion", "hopskipjump", eps=eps, norm="l2", max_queries=queries_per_image,
                           init_evals=evals, init_tries=min(100, max(10, queries_per_image // 10)), seed=seed)


def judge(client: ServiceClient, x: torch.Tensor, y: torch.Tensor, *, budget: RunBudget, batch: int,
          out: AttackOutcome, sent_before: int, clean: set[bytes]) -> tuple[int, int]:
    """(robust, images sent): ``x`` sent in requests of ``batch``; rejected or rightly labelled rows are robust. A
    rejected final image is a detection when it is adversarial (not in ``clean``), else a false alarm."""
    robust = sent = adversarial = 0
    keys = digests(x)
    for i in range(0, len(x), batch):
        doc = client.predict(x[i:i + batch], deadline=budget.deadline)
        rows = doc["results"]
        sent += len(rows)
        is_clean = [keys[i + r["index"]] in clean for r in rows]
        adversarial += sum(not c for c in is_clean)
        if any(r["rejected"] and not c for r, c in zip(rows, is_clean)):
            out.note_detection(sent_before, adversarial)
        out.note_clean(sent=sum(is_clean), rejected=sum(bool(r["rejected"]) and c for r, c in zip(rows, is_clean)))
        robust += sum(bool(r["rejected"]) or int(r["label"]) == int(y[i + r["index"]]) for r in rows)
    out.adversarial_queries += adversarial
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
        remote = DetectingRemote(client, clean=xs, access=BLACKBOX[name], max_queries=budget.queries_left,
                                 deadline_s=budget.seconds_left, max_images=batch, num_classes=num_classes)
        remote.check_attack(attack)
        try:
            adv = attack(remote, xs, ys)
            _attack_sent(out, remote)
            if len(adv) > budget.queries_left - remote.queries_:
                raise QueryBudgetExceeded("no query budget left to judge the chunk's final images")
            robust, judged = judge(client, adv, ys, budget=budget, batch=batch, out=out,
                                   sent_before=out.adversarial_queries, clean=remote.clean_keys)
        except QueryBudgetExceeded as exc:  # DeadlineExceeded too: the chunk is dropped, the run stops
            out.stopped = "deadline" if budget.seconds_left <= 0 or "deadline" in str(exc) else "query_budget"
            _attack_sent(out, remote)
            _spend(out, budget, remote.queries_)
            break
        except ServiceError as exc:
            if exc.status != 403:
                raise
            out.stopped = "key_blocked"
            _attack_sent(out, remote)
            out.note_detection(out.adversarial_queries, 0)
            _spend(out, budget, remote.queries_)
            log.warning("%s: the service blocked the key after %d queries (%s)", name, out.queries, exc.message)
            break
        _spend(out, budget, remote.queries_ + judged)
        out.n += len(xs)
        out.correct += robust
    log.info("%s eps=%s: robust %d/%d, %d queries%s", name, out.eps, out.correct, out.n, out.queries,
             f", stopped: {out.stopped}" if out.stopped else "")
    return out


def _attack_sent(out: AttackOutcome, remote: DetectingRemote) -> None:
    """The chunk's attack queries into ``out`` (once per chunk): detection, adversarial count, false alarms."""
    if remote.first_rejection_ is not None:
        out.note_detection(out.adversarial_queries, remote.first_rejection_)
    out.adversarial_queries += remote.adversarial_sent_
    out.note_clean(sent=remote.clean_sent_, rejected=remote.false_alarms_)
    remote.first_rejection_, remote.adversarial_sent_, remote.clean_sent_, remote.false_alarms_ = None, 0, 0, 0


def _spend(out: AttackOutcome, budget: RunBudget, images: int) -> None:
    out.queries += images
    budget.spend(images)
