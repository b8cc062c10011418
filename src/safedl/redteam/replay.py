"""Replay of a probe set's stored adversarial examples (robust accuracy) and backdoor-triggered inputs (attack
success rate: the share of triggered probes, not already of the target class, answered as the target and not
rejected; Gu et al. 2017, BadNets) through the serving path."""
from __future__ import annotations

from safedl.errors import UserError
from safedl.redteam.budget import RunBudget
from safedl.redteam.outcome import AttackOutcome
from safedl.redteam.probes import ProbeSet
from safedl.redteam.runner import judge
from safedl.serve.client import ServiceClient


def _fits(budget: RunBudget, n: int, what: str) -> None:
    if budget.exhausted() or budget.queries_left < n:
        raise UserError(f"--max-queries/--budget-s: no budget left to replay {n} {what}")


def replay_adversarial(client: ServiceClient, probes: ProbeSet, *, budget: RunBudget, batch: int) -> AttackOutcome:
    """Robust accuracy of the service on the stored adversarial examples."""
    out = AttackOutcome(attack="replay", eps="stored")
    _fits(budget, len(probes.x_adv), "stored adversarial examples")
    robust, sent = judge(client, probes.x_adv, probes.y_adv, budget=budget, batch=batch, out=out, sent_before=0,
                         clean=set())  # stored adversarial examples: every one adversarial
    budget.spend(sent)
    out.n, out.correct, out.queries = len(probes.x_adv), robust, sent
    return out


def replay_triggered(client: ServiceClient, probes: ProbeSet, *, budget: RunBudget, batch: int) -> AttackOutcome:
    """Backdoor attack success rate of the service on the stored triggered inputs."""
    out = AttackOutcome(attack="replay_backdoor", eps="stored", kind="backdoor")
    keep = probes.y_trigger != probes.trigger_target
    x, target = probes.x_trigger[keep], probes.trigger_target[keep]
    _fits(budget, len(x), "triggered inputs")
    hits = 0
    for i in range(0, len(x), batch):
        rows = client.predict(x[i:i + batch], deadline=budget.deadline)["results"]
        out.queries += len(rows)
        out.adversarial_queries += len(rows)
        if any(r["rejected"] for r in rows):
            out.note_detection(out.queries - len(rows), len(rows))
        hits += sum(not r["rejected"] and int(r["label"]) == int(target[i + r["index"]]) for r in rows)
    budget.spend(out.queries)
    out.n, out.correct = int(keep.sum()), hits
    return out


def replay(client: ServiceClient, probes: ProbeSet, *, budget: RunBudget, batch: int = 64) -> list[AttackOutcome]:
    """Both replays the probe set holds data for; UserError when it holds neither."""
    if probes.x_adv is None and probes.x_trigger is None:
        raise UserError("--attacks replay: the probe set has neither 'x_adv'/'y_adv' (stored adversarial examples) "
                        "nor 'x_trigger'/'y_trigger'/'trigger_target' (backdoor-triggered inputs)")
    outs = []
    if probes.x_adv is not None:
        outs.append(replay_adversarial(client, probes, budget=budget, batch=batch))
    if probes.x_trigger is not None:
        outs.append(replay_triggered(client, probes, budget=budget, batch=batch))
    return outs
