"""``Route``: where one predict request goes (the stable version, or the canary lane for a key in its share).
A request on a canary holds a lease on its lane (serve/rollout/lane.py), so a rollback, abort or promotion
decided while it is in flight never stops the lane under it: the lane stops once its last request finished; one
still in flight past the lane's longest wait is re-routed to the stable version when it reaches the model. Either
way the request is answered (never a 500 because of a decision) and audited with the version that answered."""
from __future__ import annotations

import concurrent.futures as cf
import logging
from typing import Any

import torch

from safedl.serve.batcher import MicroBatcher

log = logging.getLogger("safedl.serve.rollout")


class Route:
    """One request's batcher, version and role; ``done()`` once it has its answer."""

    def __init__(self, svc: Any, batcher: MicroBatcher, version: str, role: str, *, lease: Any = None):
        self.svc, self.batcher, self.version, self.role = svc, batcher, version, role
        self._lease = lease

    def submit(self, x: torch.Tensor) -> cf.Future:
        """Queue ``x`` on the routed batcher; on the stable one when the routed lane has stopped meanwhile."""
        fut = self.batcher.try_submit(x)
        if fut is None and self.batcher is not self.svc.batcher:
            log.warning("a request routed to %s %s reached the model after the lane stopped; answered by the "
                        "stable version", self.role, self.version, extra={"event": "rollout_rerouted"})
            self.batcher, self.version, self.role = self.svc.batcher, self.svc.bundle.version, "stable"
            fut = self.batcher.try_submit(x)
        if fut is None:
            fut = cf.Future()
            fut.set_exception(RuntimeError("the model worker is not running"))
        return fut

    def done(self) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            lease.release()
