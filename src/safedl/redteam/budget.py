"""The hard bounds of one red-team run: images sent in all (``--max-queries``) and wall time (``--budget-s``)."""
from __future__ import annotations

import time

from safedl.utils.validate import check_positive


class RunBudget:
    """Queries (images sent) and seconds left to a run; ``spend`` after every request."""

    def __init__(self, *, max_queries: int, budget_s: float):
        self.max_queries = check_positive("RunBudget", "max_queries", max_queries, integer=True)
        self.budget_s = check_positive("RunBudget", "budget_s", budget_s)
        self.deadline = time.monotonic() + self.budget_s
        self.spent = 0

    @property
    def queries_left(self) -> int:
        return max(self.max_queries - self.spent, 0)

    @property
    def seconds_left(self) -> float:
        return max(self.deadline - time.monotonic(), 0.0)

    def exhausted(self) -> str | None:
        """Why nothing more may be sent ('query_budget' or 'deadline'), or None."""
        if self.queries_left <= 0:
            return "query_budget"
        if self.seconds_left <= 0:
            return "deadline"
        return None

    def spend(self, images: int) -> None:
        self.spent += int(images)
