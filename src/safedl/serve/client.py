"""A bounded HTTP client of ``safedl serve`` and :class:`RemoteClassifier`, the running service as an attack oracle.

``ServiceClient`` talks to one service over one keep-alive connection (stdlib ``http.client``): images go as
``application/x-npy`` float32 arrays, so the service sees exactly the pixels sent (no 8-bit PNG quantisation); a 429
is retried after its ``Retry-After`` within a bounded wait; every other refusal raises :class:`ServiceError` with the
service's status, code and message. It refuses, before opening any socket, a host that is not the loopback
interface unless ``allow_remote=True``: an assessment tool must not become a load generator against someone
else's service by a typo.

``RemoteClassifier`` is a ``torch.nn.Module`` whose forward pass is a query to the service. Safedl's black-box
attacks reach a model only through :class:`~safedl.attacks.query.QueryInterface`, which applies a softmax to the
module's output (or takes its argmax for label-only attacks), so the module returns the *log* of the served
probabilities: ``softmax(log p) = p``, and the attacks (square, nes, hopskipjump, copycat, jacobian_augmentation)
run unchanged against the service. With label-only access it returns one-hot rows (argmax = the served label).
Hard bounds: ``max_queries`` images in all and a wall-clock ``deadline_s`` from the first query; exceeding either
raises before anything more is sent.
"""
from __future__ import annotations

import http.client
import ipaddress
import io
import json
import logging
import time
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import torch
from torch import nn

from safedl.errors import QueryBudgetExceeded, SafedlError, UserError
from safedl.utils.validate import check_choice, check_positive

log = logging.getLogger("safedl.serve.client")

LOOPBACK_NAMES = ("localhost",)
SCORE_TIERS = ("full", "rounded")      # tiers that answer a full probability vector
ACCESS = ("scores", "labels")
ON_REJECT = ("raise", "uniform")


class ServiceError(SafedlError, RuntimeError):
    """The service refused a request: HTTP ``status``, its error ``code`` and message."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class DeadlineExceeded(QueryBudgetExceeded):
    """The client's wall-clock deadline has passed; nothing more is sent."""


class TierError(UserError, ValueError):
    """The key's output tier does not give the access the attack needs (e.g. scores from a label-only key)."""


class RejectedQuery(SafedlError, RuntimeError):
    """The service's input detector rejected an image (no label or scores were answered for it)."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine's loopback interface (127.0.0.0/8, ::1 or 'localhost')."""
    h = host.strip("[]").lower()
    if h in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


class ServiceClient:
    """One API key's connection to ``url`` (``http://127.0.0.1:8000``); not thread-safe (one per thread).

    A 429 whose ``Retry-After`` is at most ``max_retry_wait_s`` is waited out and retried, up to ``max_retries`` in
    a row; a longer one (a daily quota) or one more raises :class:`ServiceError` at once. ``requests_`` counts HTTP
    exchanges, ``images_`` images answered, ``throttled_`` 429s waited out.
    """

    def __init__(self, url: str, *, token: str, timeout_s: float = 30.0, max_retry_wait_s: float = 10.0,
                 max_retries: int = 5, allow_remote: bool = False):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UserError(f"ServiceClient: url {url!r} must look like http://127.0.0.1:8000")
        if not allow_remote and not is_loopback(parts.hostname):
            raise UserError(f"ServiceClient: host {parts.hostname!r} is not loopback (127.0.0.1, ::1, localhost); "
                            "pass allow_remote=True to query another machine on purpose")
        self.url, self.scheme, self.host = url, parts.scheme, parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.base_path = parts.path.rstrip("/")
        self.token = token
        self.timeout_s = check_positive("ServiceClient", "timeout_s", timeout_s)
        self.max_retry_wait_s = float(max_retry_wait_s)
        self.max_retries = int(max_retries)
        if self.max_retry_wait_s < 0 or self.max_retries < 0:
            raise UserError("ServiceClient: max_retry_wait_s and max_retries must be >= 0")
        self._conn: http.client.HTTPConnection | None = None
        self.requests_ = self.images_ = self.throttled_ = 0

    # -- transport --------------------------------------------------------------------------------------------
    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
            self._conn = cls(self.host, self.port, timeout=timeout)
        self._conn.timeout = timeout
        if self._conn.sock is not None:
            self._conn.sock.settimeout(timeout)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def request(self, method: str, path: str, *, body: bytes | None = None, content_type: str | None = None,
                deadline: float | None = None) -> dict[str, Any]:
        """One call, 429s waited out within the bounds; the JSON answer, or :class:`ServiceError`."""
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if content_type is not None:
            headers["Content-Type"] = content_type
        for attempt in range(self.max_retries + 1):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise DeadlineExceeded("the client's wall-clock deadline has passed")
            try:
                resp, data = self._send(method, path, body, headers, self.timeout_s if left is None
                                        else min(self.timeout_s, left))
            except TimeoutError as exc:
                if left is not None and left < self.timeout_s:
                    raise DeadlineExceeded("the client's wall-clock deadline passed during a request") from exc
                raise
            self.requests_ += 1
            wait = _retry_after(resp.getheader("Retry-After"))
            if resp.status == 429 and attempt < self.max_retries and wait <= self.max_retry_wait_s:
                if deadline is not None and time.monotonic() + wait > deadline:
                    raise DeadlineExceeded(f"429: waiting {wait:.1f} s would pass the client's deadline")
                self.throttled_ += 1
                log.info("429 from %s; retrying in %.2f s", path, wait)
                time.sleep(wait)
                continue
            return _json_or_error(resp.status, data)
        raise AssertionError("unreachable")  # the last attempt returns or raises

    def _send(self, method: str, path: str, body: bytes | None, headers: dict, timeout: float):
        """One HTTP exchange. A keep-alive connection the server closed while idle (it closes them after a few
        seconds) fails before the request is read; only then is it resent once, on a new connection. Any other
        failure is raised: the service may have answered (and counted) the request already."""
        for fresh in (self._conn is None, True):
            conn = self._connection(timeout)
            try:
                conn.request(method, self.base_path + path, body=body, headers=headers)
                resp = conn.getresponse()
                return resp, resp.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if fresh:
                    raise
                log.debug("idle keep-alive connection closed by the server; reconnecting")
            except (OSError, http.client.HTTPException):
                self.close()
                raise
        raise AssertionError("unreachable")

    def predict(self, x: torch.Tensor, *, deadline: float | None = None) -> dict[str, Any]:
        """POST ``x`` (float N x C x H x W in [0, 1]) as one float32 .npy body; the service's JSON answer."""
        if x.ndim != 4 or not x.is_floating_point():
            raise ValueError(f"ServiceClient.predict: x must be a float N x C x H x W tensor, got {tuple(x.shape)}")
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(x.detach().cpu().to(torch.float32).numpy()), allow_pickle=False)
        out = self.request("POST", "/v1/predict", body=buf.getvalue(), content_type="application/x-npy",
                           deadline=deadline)
        self.images_ += len(x)
        return out

    def get(self, path: str) -> dict[str, Any]:
        """GET ``path`` (``/v1/model``, ``/v1/monitor/summary``, ...) as JSON."""
        return self.request("GET", path)

    def __enter__(self) -> "ServiceClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _retry_after(value: str | None) -> float:
    """Seconds a 429's Retry-After asks for (1 when absent or not a number of seconds)."""
    try:
        return max(float(value), 0.0) if value is not None else 1.0
    except ValueError:
        return 1.0


def _json_or_error(status: int, data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data) if data else {}
    except ValueError:
        doc = {}
    if status == 200 and isinstance(doc, dict):
        return doc
    err = doc.get("error", {}) if isinstance(doc, dict) else {}
    raise ServiceError(status, str(err.get("code", "http_error")),
                       str(err.get("message", data[:200].decode(errors="replace"))))


class RemoteClassifier(nn.Module):
    """The service behind one key as a classifier module: ``forward(x)`` -> log-probabilities (``access="scores"``)
    or one-hot labels (``access="labels"``), one or more HTTP requests of at most ``max_images`` images each.

    ``max_queries`` caps the images sent in all and ``deadline_s`` the wall time from the first query (both raise
    :class:`~safedl.errors.QueryBudgetExceeded` before sending). A key whose tier cannot give the access asked for
    raises :class:`TierError` on its first answer (scores need tier full or rounded). An image the service rejects
    raises :class:`RejectedQuery` (``on_reject="raise"``) or is answered as uniform probabilities / class 0
    (``"uniform"``: an uninformative answer; the rejections are counted in ``rejected_``). ``num_classes`` is read
    from ``GET /v1/model`` when not given. ``queries_`` counts images answered.

    The service takes pixels in [0, 1] only; probes outside it (NES samples ``x + sigma * u`` unclipped) are
    clipped before sending, as any image file would be, and counted in ``clipped_``.
    """

    def __init__(self, client: ServiceClient, *, access: str = "scores", max_queries: int = 10_000,
                 deadline_s: float = 600.0, max_images: int = 64, num_classes: int | None = None,
                 on_reject: str = "raise"):
        super().__init__()
        self.client = client
        self.access = check_choice("RemoteClassifier", "access", access, ACCESS)
        self.max_queries = check_positive("RemoteClassifier", "max_queries", max_queries, integer=True)
        self.deadline_s = check_positive("RemoteClassifier", "deadline_s", deadline_s)
        self.max_images = check_positive("RemoteClassifier", "max_images", max_images, integer=True)
        self.num_classes = None if num_classes is None else check_positive("RemoteClassifier", "num_classes",
                                                                           num_classes, integer=True)
        self.on_reject = check_choice("RemoteClassifier", "on_reject", on_reject, ON_REJECT)
        self.queries_ = self.rejected_ = self.clipped_ = 0
        self.tier_: str | None = None
        self._deadline: float | None = None

    def check_attack(self, attack: Any) -> None:
        """Refuse an attack that needs more access than this classifier gives (scores attack, labels access)."""
        need = getattr(attack, "access", None)
        if need == "scores" and self.access != "scores":
            raise TierError(f"{type(attack).__name__} needs scores; this RemoteClassifier gives {self.access}")
        if need not in ("scores", "labels"):
            raise TierError(f"{type(attack).__name__} has access {need!r}; only black-box (scores/labels) attacks "
                            "can run through the service")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._deadline is None:
            self._deadline = time.monotonic() + self.deadline_s
        if self.queries_ + len(x) > self.max_queries:
            raise QueryBudgetExceeded(f"RemoteClassifier: {len(x)} more queries would exceed max_queries="
                                      f"{self.max_queries} ({self.queries_} sent)")
        if time.monotonic() >= self._deadline:
            raise DeadlineExceeded(f"RemoteClassifier: deadline of {self.deadline_s} s passed "
                                   f"after {self.queries_} queries")
        if self.num_classes is None:
            self.num_classes = len(self.client.get("/v1/model")["class_names"])
        x, self.clipped_ = _clip(x, self.clipped_)
        outs = [self._answer(self.client.predict(x[i:i + self.max_images], deadline=self._deadline))
                for i in range(0, len(x), self.max_images)]
        return torch.cat(outs).to(x.device)

    def _answer(self, doc: dict[str, Any]) -> torch.Tensor:
        tier = doc.get("tier")
        if self.access == "scores" and tier not in SCORE_TIERS:
            raise TierError(f"this key's tier {tier!r} does not answer probabilities; score-based access needs "
                            f"tier {' or '.join(SCORE_TIERS)}")
        self.tier_ = tier
        k = int(self.num_classes)
        rows = []
        for r in doc["results"]:
            self.queries_ += 1
            if r["rejected"]:
                self.rejected_ += 1
                if self.on_reject == "raise":
                    raise RejectedQuery(f"the service rejected image {r['index']} ({r['reason']})")
                rows.append(torch.full((k,), 1.0 / k) if self.access == "scores" else _one_hot(0, k))
            elif self.access == "scores":
                rows.append(torch.tensor(r["probabilities"], dtype=torch.float32))
            else:
                rows.append(_one_hot(int(r["label"]), k))
        out = torch.stack(rows)
        # softmax(log p) = p: what QueryInterface returns is the served probabilities (log 0 = -inf is fine there)
        return out.log() if self.access == "scores" else out


class PipelineClassifier(nn.Module):
    """A bundle's ``SecurePipeline`` in-process, answering as :class:`RemoteClassifier` does through a full-tier
    key (log of the decided probabilities, or one-hot labels; a rejected image raises :class:`RejectedQuery`):
    the local reference the HTTP oracle is checked against."""

    def __init__(self, pipeline: Any, *, access: str = "scores"):
        super().__init__()
        self.pipeline = pipeline
        self.access = check_choice("PipelineClassifier", "access", access, ACCESS)
        self.queries_ = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.pipeline.decide(_clip(x, 0)[0])
        self.queries_ += len(x)
        if bool(d.rejected.any()):
            i = int(d.rejected.nonzero()[0])
            raise RejectedQuery(f"the pipeline rejected image {i} ({d.reasons[i]})")
        if self.access == "scores":
            return d.probs.log()
        return torch.nn.functional.one_hot(d.labels, d.probs.shape[1]).to(torch.float32)


def _clip(x: torch.Tensor, count: int) -> tuple[torch.Tensor, int]:
    """x clipped to [0, 1], and ``count`` plus the number of images that needed it."""
    outside = ((x < 0) | (x > 1)).flatten(1).any(1)
    return x.clamp(0, 1), count + int(outside.sum())


def _one_hot(label: int, k: int) -> torch.Tensor:
    v = torch.zeros(k)
    v[label] = 1.0
    return v
