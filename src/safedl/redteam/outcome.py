"""What one red-team attack measured: robust accuracy (or backdoor ASR) with its n and Wilson interval, the queries
it sent and how many it took until the service first detected it."""
from __future__ import annotations

from dataclasses import dataclass

from safedl.utils.stats import wilson_interval

Z_ONE_SIDED_95 = 1.6448536269514722


@dataclass
class AttackOutcome:
    """``correct`` of ``n`` attacked probes the service still answered rightly or rejected (robust accuracy), or
    for a backdoor replay (``kind="backdoor"``) ``correct`` of ``n`` triggered probes sent to the target class.

    ``queries``: images sent for this attack (attack queries and the final judging requests);
    ``adversarial_queries``: those of them that were not one of the clean probes themselves;
    ``queries_to_detection``: adversarial images sent up to and including the request in which the service first
    rejected an adversarial image or blocked the key (None: never); ``false_alarms`` of ``clean_queries``: the
    clean probes the attack sent unchanged (HopSkipJump's first query) that the service rejected; ``stopped``: why it ended early ('deadline', 'query_budget',
    'key_blocked') or None; probes of an unfinished chunk are not counted in ``n``.
    """

    attack: str
    eps: str
    kind: str = "robust"
    n: int = 0
    correct: int = 0
    queries: int = 0
    queries_to_detection: int | None = None
    adversarial_queries: int = 0
    clean_queries: int = 0
    false_alarms: int = 0
    stopped: str | None = None

    @property
    def value(self) -> float:
        return self.correct / self.n if self.n else float("nan")

    @property
    def ci95(self) -> tuple[float, float]:
        """Two-sided 95% Wilson interval (Wilson 1927)."""
        return wilson_interval(self.correct, self.n)

    @property
    def one_sided95(self) -> tuple[float, float]:
        """One-sided 95% bounds (lower, upper): Wilson at z = 1.645."""
        return wilson_interval(self.correct, self.n, z=Z_ONE_SIDED_95)

    @property
    def false_alarm_ci95(self) -> tuple[float, float]:
        """Two-sided 95% Wilson interval of the false-alarm rate on the clean probes sent."""
        return wilson_interval(self.false_alarms, self.clean_queries)

    def note_clean(self, *, sent: int, rejected: int) -> None:
        self.clean_queries += int(sent)
        self.false_alarms += int(rejected)

    def note_detection(self, sent_before: int, sent_in_request: int) -> None:
        if self.queries_to_detection is None:
            self.queries_to_detection = sent_before + sent_in_request
