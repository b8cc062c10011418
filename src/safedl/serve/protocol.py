"""Connection-level defenses for ``safedl serve``: a uvicorn h11 protocol with a request-head deadline, a body
deadline, per-client and overall connection limits, a keep-alive request cap and lingering close, plus
``harden_process`` (file-descriptor ceiling, rate-limited connection logs).

Wiring: ``uvicorn.Config(app, http=guarded_protocol(limits=..., trusted_proxies=...))``. The counters live on the
returned class (``cls.stats``); every server made from one class shares its limits and counts (one per process).
"""
from __future__ import annotations

import asyncio
import http
import logging
from collections.abc import Callable, Sequence
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from safedl.errors import UserError
from safedl.serve.connection_limits import (COUNTERS, REFUSAL_LINGER_SLOTS, ConnectionLimits, ConnectionTable,
                                            IPNetwork, ProtocolStats, RepeatFilter, client_key, harden_process,
                                            install_log_filters, parse_networks)
from safedl.serve.edge import raw_head_framing_error
from safedl.serve.lingering import LingeringTransport
from safedl.serve.request import context_in
from safedl.serve.slow_lane import SlowLane

__all__ = ["COUNTERS", "ConnectionLimits", "GuardedH11Protocol", "ProtocolStats", "RepeatFilter", "guarded_protocol",
           "harden_process", "install_log_filters"]

logger = logging.getLogger(__name__)


def _with_connection_close(message: dict) -> dict:
    """An ASGI response start carrying ``Connection: close`` (and no other Connection header)."""
    headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
    return {**message, "headers": [*headers, (b"connection", b"close")]}


_BODIES = {408: b"Request Timeout: no complete request in time",
           429: b"Too Many Requests: too many connections from this address",
           503: b"Service Unavailable: too many connections",
           400: b"Bad Request: ambiguous request framing (repeated Content-Length, or Content-Length with "
                b"Transfer-Encoding)"}
_MAX_HEAD_SCAN = 32 * 1024
READ_SIZE = 16 * 1024          # one socket read at most
BODY_BUFFER_LIMIT = 48 * 1024  # body bytes held for an app that has not read them: then reading pauses
PENALIZED_LINGER_BYTES = 64 * 1024


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol under the limits of ``table`` (set on the subclass that ``guarded_protocol`` makes).

    Timers: the head deadline (connection start or end of a response -> request head), the body deadline (head ->
    body), and the tail: ``drain`` (response done, body not: wait ``linger_s`` for it) or ``linger`` (half-closed:
    discard input for ``linger_s`` / ``linger_max_bytes``, then close)."""

    table: ConnectionTable
    stats: ProtocolStats
    lane: SlowLane | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = self.table.limits
        self.timeout_keep_alive = self.limits.keepalive_timeout_s
        self._inner_app, self.app = self.app, self._guarded_app
        self._raw: asyncio.Transport | None = None
        self._proxy: LingeringTransport | None = None
        self._slot: str | None = None
        self._admitted = self._refusal_lingering = self._done = False
        self._requests = 0
        self._closing_scope: Any = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._tail_timer: asyncio.TimerHandle | None = None
        self._tail: str | None = None
        self._tail_left = 0
        self._head_buf = b""
        self._lane_client: str | None = None
        self._proven = False  # a request on this connection presented a valid key: never held in the slow lane

    # -- connection lifecycle
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._raw = transport
        # a request whose body the app never reads (a refused key) has at most BODY_BUFFER_LIMIT + READ_SIZE
        # (64 KB) of it buffered, not uvicorn's 64 KB high-water mark + asyncio's 256 KB reads
        if hasattr(transport, "max_size"):
            transport.max_size = READ_SIZE
        self._proxy = LingeringTransport(transport, on_close=self._begin_linger)
        super().connection_made(self._proxy)
        self._slot = client_key(self.client, trusted=self.table.trusted)
        self._lane_client = self.client[0] if self.lane is not None and self._slot is not None else None
        held = self._lane_holds()
        refusal = self.table.admit(self._slot, per_client_cap=self.lane.limits.max_connections_per_client
                                   if held else None)
        if refusal is None:
            self._admitted = True
            self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._on_head_timeout)
            if held:
                self._hold(then=None)
        else:
            self._refuse(refusal)

    def connection_lost(self, exc: Exception | None) -> None:
        self._done = True
        self._cancel_timers()
        self._release()
        super().connection_lost(exc)
        # the protocol, its transport proxy and uvicorn's request cycle refer to each other: only the cyclic
        # collector frees them, late under connection churn, so drop the buffers they hold now
        self._head_buf = b""
        if self._proxy is not None:
            self._proxy.on_close = _ignore
        if self.cycle is not None:  # disconnected: the app's receive() answers http.disconnect, never this body
            self.cycle.body = b""

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        self._done = True  # the websocket protocol owns the connection from here, outside these limits
        self._cancel_timers()
        self._release()
        super().handle_websocket_upgrade(event)

    def _release(self) -> None:
        if self._admitted:
            self._admitted = False
            self.table.release(self._slot)
        if self._refusal_lingering:
            self._refusal_lingering = False
            self.stats.refusals_lingering -= 1

    def _refuse(self, status: int) -> None:
        if status == 429:
            self.table.log(logging.WARNING, "refused connections over the per-client limit (latest from %s)",
                           self._peer())
        else:
            self.table.log(logging.WARNING, "refused connections over the overall limit (latest from %s)",
                           self._peer())
        self._send_error(status, retry_after=True)
        if self.stats.refusals_lingering < REFUSAL_LINGER_SLOTS:
            self._refusal_lingering = True
            self.stats.refusals_lingering += 1
            self.transport.close()
        else:  # too many lingering already: their descriptors are the scarcer resource
            self._close_now()

    # -- the slow lane (serve/slow_lane.py)
    def _lane_holds(self) -> bool:
        return self.lane is not None and not self._proven and self.lane.penalized(self._lane_client)

    def _hold(self, *, then: Callable[[], None] | None) -> None:
        """Stop reading until the lane releases this connection; then resume and call ``then``."""
        self._raw.pause_reading()
        self.stats.increment("slow_lane_holds")

        def release() -> None:
            self._raw.resume_reading()
            if then is not None:
                then()

        self.lane.hold(release, alive=lambda: not self._done and not self._raw.is_closing())

    # -- reading
    def data_received(self, data: bytes) -> None:
        if self._tail == "linger":
            self._tail_left -= len(data)
            if self._tail_left < 0:
                self._end_linger()
            return
        if self._tail == "drain":
            self._tail_left -= len(data)
            if self._tail_left < 0:
                self._on_drain_timeout()
                return
        if self.conn.their_state is h11.IDLE and self._ambiguous_head(data):
            return
        super().data_received(data)

    def _ambiguous_head(self, data: bytes) -> bool:
        """Scan a request head as it arrives; True (answered 400, closing) when its framing is ambiguous."""
        if self._head_buf is None:
            return False
        self._head_buf += data
        end = self._head_buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head_buf) > _MAX_HEAD_SCAN:
                self._head_buf = None  # h11 refuses a head this long itself
            return False
        problem = raw_head_framing_error(self._head_buf[:end])
        self._head_buf = b""
        if problem is None:
            return False
        self.stats.increment("bad_framing")
        self.table.log(logging.WARNING, "refused a request with %s (latest from %s)", problem, self._peer())
        self._send_error(400, retry_after=False)
        self.transport.close()
        return True

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not None and len(self.cycle.body) >= BODY_BUFFER_LIMIT:
            self.flow.pause_reading()  # resumed when the app reads (uvicorn's receive())
        if self.cycle is not cycle and self.cycle is not None:
            self._on_request_head()
        if self.conn.their_state is not h11.SEND_BODY:
            self._cancel_body_wait()

    def _on_request_head(self) -> None:
        self._head_timer = _cancel(self._head_timer)
        self._cancel_body_wait()
        self._requests += 1
        if self.conn.their_state is h11.SEND_BODY:
            self._body_timer = self.loop.call_later(self.limits.body_timeout_s, self._on_body_timeout)
        if self._requests >= self.limits.max_requests_per_connection:
            self.stats.increment("requests_capped")
            self.cycle.keep_alive = False
            self._closing_scope = self.scope

    async def _guarded_app(self, scope: Any, receive: Any, send: Any) -> None:
        async def guarded_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                ctx = context_in(scope)
                self._proven = self._proven or bool(ctx is not None and ctx.authenticated)
                if self._must_close(scope):
                    message = _with_connection_close(message)
            await send(message)

        await self._inner_app(scope, receive, guarded_send)

    def _must_close(self, scope: Any) -> bool:
        """Whether this response ends the connection: the request cap is reached, or it answers early and the rest
        of the body may be more than a keep-alive connection drains (``linger_max_bytes``; unknown when chunked)."""
        if scope is self._closing_scope:
            return True
        if self.conn.their_state is not h11.SEND_BODY:
            return False
        length = dict(scope["headers"]).get(b"content-length", b"")
        return not length.isdigit() or int(length) > self.limits.linger_max_bytes

    def on_response_complete(self) -> None:
        self._head_buf = b""
        self._body_timer = _cancel(self._body_timer)
        if not self.transport.is_closing():
            _cancel(self._head_timer)
            self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._on_head_timeout)
            if self.conn.their_state is h11.SEND_BODY:  # a body nobody will read: wait linger_s for its end
                self._tail, self._tail_left = "drain", self.limits.linger_max_bytes
                self._tail_timer = self.loop.call_later(self.limits.linger_s, self._on_drain_timeout)
            elif self._lane_holds():  # the next request (pipelined ones too) waits for the lane
                self._hold(then=super().on_response_complete)
                return
        super().on_response_complete()

    def _cancel_body_wait(self) -> None:
        self._body_timer = _cancel(self._body_timer)
        if self._tail == "drain":
            self._tail, self._tail_timer = None, _cancel(self._tail_timer)

    # -- deadlines
    def _on_head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        self.stats.increment("header_timeouts")
        self.table.log(logging.WARNING, "closed connections without a request head after %.1fs (latest from %s)",
                       self.limits.header_timeout_s, self._peer())
        if self.conn.our_state is h11.IDLE:
            self._send_error(408, retry_after=False)
        self.transport.close()

    def _on_body_timeout(self) -> None:
        self._body_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.SEND_BODY:
            return
        self.stats.increment("body_timeouts")
        self.table.log(logging.WARNING, "closed connections without a complete request body after %.1fs "
                       "(latest from %s)", self.limits.body_timeout_s, self._peer())
        cycle = self.cycle
        started = cycle is not None and cycle.response_started
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's receive() answers http.disconnect, its sends are dropped
            cycle.message_event.set()
        if not started:
            self._send_error(408, retry_after=False)
        self.transport.close()

    def _on_drain_timeout(self) -> None:
        self._tail, self._tail_timer = None, _cancel(self._tail_timer)
        self.stats.increment("drain_timeouts")
        self._close_now()

    def timeout_keep_alive_handler(self) -> None:
        if not self.transport.is_closing():
            self.stats.increment("keepalive_timeouts")
        super().timeout_keep_alive_handler()

    # -- closing
    def _begin_linger(self) -> None:
        """Half-close, then read and discard for at most linger_s / linger_max_bytes before closing (a client in
        the slow lane: PENALIZED_LINGER_BYTES, so its uploads cost a few reads, not a megabyte each)."""
        raw = self._raw
        self._cancel_timers()
        if self._done or raw.is_closing():
            raw.close()
            return
        # a client in the slow lane: discard little of what it still sends (its close is still seen at once)
        budget = PENALIZED_LINGER_BYTES if self._lane_holds() else self.limits.linger_max_bytes
        self._tail, self._tail_left = "linger", budget
        try:
            if raw.can_write_eof():  # not TLS: the peer reads the answer, then end of stream
                raw.write_eof()
            raw.resume_reading()
        except (OSError, RuntimeError):
            raw.close()
            return
        self.stats.increment("lingering_closes")
        self._tail_timer = self.loop.call_later(self.limits.linger_s, self._end_linger)

    def _end_linger(self) -> None:
        self._tail_timer = _cancel(self._tail_timer)
        raw = self._raw
        if not raw.is_closing():
            self.stats.increment("linger_cutoffs")
            raw.close()
            if raw.get_write_buffer_size():  # a peer that does not read either: give up after one more linger_s
                self._tail_timer = self.loop.call_later(self.limits.linger_s, raw.abort)

    def _close_now(self) -> None:
        self._cancel_timers()
        self._proxy.closing = True
        self._raw.close()

    def _cancel_timers(self) -> None:
        self._head_timer = _cancel(self._head_timer)
        self._body_timer = _cancel(self._body_timer)
        self._tail_timer = _cancel(self._tail_timer)
        self.timeout_keep_alive_task = _cancel(self.timeout_keep_alive_task)

    def _send_error(self, status: int, *, retry_after: bool) -> None:
        """Write a complete ``status`` response with Connection: close, where h11's state allows one."""
        body = _BODIES[status]
        headers = [*self.server_state.default_headers, (b"content-type", b"text/plain; charset=utf-8"),
                   (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        if retry_after:
            headers.append((b"retry-after", str(self.limits.retry_after_s).encode()))
        try:
            out = self.conn.send(h11.Response(status_code=status, headers=headers,
                                              reason=http.HTTPStatus(status).phrase.encode()))
            out += self.conn.send(h11.Data(data=body)) + self.conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            return
        self.transport.write(out)

    def _peer(self) -> str:
        return self.client[0] if self.client else "a local socket"


def _ignore() -> None:
    return None


def _cancel(handle: asyncio.TimerHandle | None) -> None:
    """Cancel a timer (if any); returns None to assign back."""
    if handle is not None:
        handle.cancel()
    return None


def guarded_protocol(*, limits: ConnectionLimits, trusted_proxies: Sequence[IPNetwork | str] = (),
                     slow_lane: SlowLane | None = None) -> type:
    """A subclass of uvicorn's H11Protocol enforcing ``limits``, for ``uvicorn.Config(app, http=...)``. Peers in
    ``trusted_proxies`` are exempt from the per-client limit (not the overall one) and from ``slow_lane``.
    Counters: ``cls.stats``."""
    if not isinstance(limits, ConnectionLimits):
        raise UserError(f"limits must be a ConnectionLimits, got {type(limits).__name__}")
    table = ConnectionTable(limits=limits, trusted_proxies=parse_networks(trusted_proxies), log=logger)
    return type("GuardedProtocol", (GuardedH11Protocol,), {"table": table, "stats": table.stats,
                                                           "lane": slow_lane})
