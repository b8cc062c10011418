"""Connection limits of ``safedl serve`` and their accounting, and process hardening.

``ConnectionLimits`` (validated bounds), ``ConnectionTable`` (open connections overall and per client, counters,
throttled log lines) and ``client_key`` (what the per-client limit counts) serve ``safedl.serve.protocol``, which
re-exports the public names. ``harden_process`` raises RLIMIT_NOFILE's soft limit to the hard one and returns how
many connections the server may hold; ``RepeatFilter`` keeps the asyncio and uvicorn loggers from flooding under
attack (one line per message type per interval, with the count of what it held back).
"""
from __future__ import annotations

import dataclasses
import ipaddress
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from safedl.errors import UserError

logger = logging.getLogger(__name__)

FD_RESERVE = 64            # descriptors kept back for files, SQLite, threads, the listening socket
REFUSAL_LINGER_SLOTS = 32  # refused connections that may linger at once; beyond that they are closed at once
LOG_INTERVAL_S = 10.0      # at most one line per message type per interval
FILTERED_LOGGERS = ("asyncio", "uvicorn.error", "safedl.serve.protocol", "python_multipart.multipart")  # the last: one warning per malformed body


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
COUNTERS = ("header_timeouts", "body_timeouts", "keepalive_timeouts", "drain_timeouts", "refused_per_client",
            "refused_overall", "requests_capped", "lingering_closes", "linger_cutoffs", "bad_framing",
            "slow_lane_holds")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConnectionLimits:
    """Bounds on one server's connections. Times in seconds from the event named, never reset by incoming bytes.

    Over ``max_requests_per_connection`` the answer carries Connection: close; over ``max_connections_per_client``
    (a peer's IPv4 address or IPv6 /64) a new connection gets 429, over ``max_connections`` 503, both with
    Retry-After ``retry_after_s``. Closing half-closes first and reads (discarding) for ``linger_s`` or
    ``linger_max_bytes``, so the client reads the answer rather than a reset. An answer sent before the request
    body was read keeps the connection only if the rest is at most ``linger_max_bytes`` and arrives within
    ``linger_s``; otherwise it carries Connection: close."""

    header_timeout_s: float = 10.0     # connection start / end of the previous response -> complete request head
    body_timeout_s: float = 60.0       # complete request head -> complete request body
    keepalive_timeout_s: float = 5.0   # idle between requests
    max_requests_per_connection: int = 1000
    max_connections_per_client: int = 64
    max_connections: int = 1024
    linger_s: float = 2.0
    linger_max_bytes: int = 1 << 20
    retry_after_s: int = 5             # the Retry-After of a refused connection

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "int":
                ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
                kind = "a positive integer"
            else:
                ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                      and value > 0)
                kind = "a finite positive number of seconds"
            if not ok:
                raise UserError(f"ConnectionLimits.{field.name} must be {kind}, got {value!r}")


class ProtocolStats(Mapping[str, int]):
    """Counters (a read-only mapping, keys in ``COUNTERS``) and gauges of one guarded protocol class."""

    def __init__(self) -> None:
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._listeners: list[Callable[[str], None]] = []
        self.open_connections = 0      # admitted and not yet closed (lingering included)
        self.refusals_lingering = 0    # refused connections still lingering

    def increment(self, name: str) -> None:
        """Add one to counter ``name`` (and tell the listeners)."""
        self._counts[name] += 1
        for listener in self._listeners:
            listener(name)

    def subscribe(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(name)`` on every increment from now on (the Prometheus counter of serve/metrics.py)."""
        self._listeners.append(listener)

    def gauges(self) -> dict[str, int]:
        """The current gauges as a plain dict."""
        return {"open_connections": self.open_connections, "refusals_lingering": self.refusals_lingering}

    def __getitem__(self, name: str) -> int:
        return self._counts[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._counts)

    def __len__(self) -> int:
        return len(self._counts)

    def __repr__(self) -> str:
        return f"ProtocolStats({self._counts}, gauges={self.gauges()})"


def parse_networks(networks: Sequence[IPNetwork | str], *, name: str = "trusted_proxies") -> tuple[IPNetwork, ...]:
    """CIDR strings or networks as a tuple of ``ipaddress`` networks; a bad one is a UserError naming ``name``."""
    if isinstance(networks, (str, bytes)):
        networks = [networks]
    out = []
    for net in networks:
        try:
            out.append(net if isinstance(net, (ipaddress.IPv4Network, ipaddress.IPv6Network))
                       else ipaddress.ip_network(str(net), strict=False))
        except ValueError as exc:
            raise UserError(f"{name}: {net!r} is not an IP network ({exc})") from None
    return tuple(out)


def client_key(peer: tuple[str, int] | None, *, trusted: Sequence[IPNetwork]) -> str | None:
    """What the per-client limit counts for a peer: its IPv4 address or IPv6 /64; None when exempt (a trusted
    proxy, a Unix socket peer)."""
    if not peer:
        return None
    try:
        ip = ipaddress.ip_address(peer[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in net for net in trusted):
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class ConnectionTable:
    """The shared state of one guarded protocol class: open connections overall and per client, the counters and
    the throttle of its own log lines. Used from the event loop's thread only (read from anywhere)."""

    def __init__(self, *, limits: ConnectionLimits, trusted_proxies: Sequence[IPNetwork], log: logging.Logger):
        self.limits = limits
        self.logger = log
        self.trusted = tuple(trusted_proxies)
        self.per_client: dict[str, int] = {}
        self.stats = ProtocolStats()
        self.throttle = Throttle()

    def admit(self, key: str | None, *, per_client_cap: int | None = None) -> int | None:
        """Count a new connection in, or return the status refusing it (503 overall, 429 per client: over
        ``max_connections_per_client``, or over ``per_client_cap`` when smaller)."""
        if self.stats.open_connections >= self.limits.max_connections:
            self.stats.increment("refused_overall")
            return 503
        cap = min(self.limits.max_connections_per_client, per_client_cap or self.limits.max_connections_per_client)
        if key is not None and self.per_client.get(key, 0) >= cap:
            self.stats.increment("refused_per_client")
            return 429
        self.stats.open_connections += 1
        if key is not None:
            self.per_client[key] = self.per_client.get(key, 0) + 1
        return None

    def release(self, key: str | None) -> None:
        """Count an admitted connection out."""
        self.stats.open_connections -= 1
        if key is not None:
            left = self.per_client.get(key, 1) - 1
            if left > 0:
                self.per_client[key] = left
            else:
                self.per_client.pop(key, None)

    def log(self, level: int, msg: str, *args: Any) -> None:
        """Log ``msg`` at most once per interval, saying how many were held back."""
        held_back = self.throttle.admit(msg)
        if held_back is None:
            return
        if held_back:
            msg, args = msg + " (and %d more in the last %.0fs)", (*args, held_back, self.throttle.interval_s)
        self.logger.log(level, msg, *args)


class Throttle:
    """Admits one event per key per interval and counts the ones it held back (bounded number of keys)."""

    def __init__(self, *, interval_s: float = LOG_INTERVAL_S, max_keys: int = 256,
                 clock: Callable[[], float] = time.monotonic):
        self.interval_s, self.max_keys, self.clock = interval_s, max_keys, clock
        self._last: dict[Any, list] = {}   # key -> [time admitted, held back since]
        self._lock = threading.Lock()

    def admit(self, key: Any) -> int | None:
        """None to hold the event back, else how many were held back since the last admitted one."""
        now = self.clock()
        with self._lock:
            entry = self._last.get(key)
            if entry is not None and now - entry[0] < self.interval_s:
                entry[1] += 1
                return None
            self._last.pop(key, None)
            if len(self._last) >= self.max_keys:
                self._last.pop(next(iter(self._last)))
            self._last[key] = [now, 0]
            return entry[1] if entry is not None else 0


class RepeatFilter(logging.Filter):
    """A logging filter passing one record per (logger, level, first line of the message) per interval; the next
    one passed says how many were suppressed."""

    def __init__(self, *, interval_s: float = LOG_INTERVAL_S):
        super().__init__()
        self.throttle = Throttle(interval_s=interval_s)

    def filter(self, record: logging.LogRecord) -> bool:
        first_line = str(record.msg).split("\n", 1)[0]
        suppressed = self.throttle.admit((record.name, record.levelno, first_line))
        if suppressed is None:
            return False
        if suppressed:
            record.msg = f"{record.msg} [{suppressed} similar lines suppressed]"
        return True


def install_log_filters(*, names: Sequence[str] = FILTERED_LOGGERS) -> None:
    """Put one ``RepeatFilter`` on each named logger (idempotent)."""
    for name in names:
        target = logging.getLogger(name)
        if not any(isinstance(f, RepeatFilter) for f in target.filters):
            target.addFilter(RepeatFilter())


def harden_process(*, max_connections: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard one, rate-limit connection logs; return the connection ceiling
    (``max_connections`` lowered to what the descriptor limit leaves after a reserve)."""
    if isinstance(max_connections, bool) or not isinstance(max_connections, int) or max_connections <= 0:
        raise UserError(f"max_connections must be a positive integer, got {max_connections!r}")
    install_log_filters()
    try:
        import resource
    except ImportError:  # not POSIX: no descriptor limit to read
        return max_connections
    soft = _raise_nofile(resource)
    ceiling = soft - FD_RESERVE - REFUSAL_LINGER_SLOTS
    if ceiling < 1:
        raise UserError(f"RLIMIT_NOFILE is {soft}: too low to serve (need more than "
                        f"{FD_RESERVE + REFUSAL_LINGER_SLOTS}); raise it with `ulimit -n`")
    if ceiling < max_connections:
        logger.warning("max_connections lowered from %d to %d: RLIMIT_NOFILE is %d (raise it with `ulimit -n`)",
                       max_connections, ceiling, soft)
        return ceiling
    return max_connections


def _raise_nofile(resource: Any) -> int:
    """Set the soft descriptor limit to the hard one where allowed; return the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:  # e.g. macOS caps the soft limit below an infinite hard one
            logger.warning("could not raise RLIMIT_NOFILE from %d to %d: %s", soft, target, exc)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20
