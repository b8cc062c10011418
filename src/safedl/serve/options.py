"""``ServeOptions``: everything ``safedl serve`` was asked for, validated once, flowing from the CLI to the server."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safedl.errors import UserError
from safedl.serve.config import MAX_WATERMARK_RATE, ServeConfig
from safedl.serve.protocol import ConnectionLimits
from safedl.serve.slow_lane import SlowLaneLimits
from safedl.serve.stores.engine import parse_target

LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_WORKERS = 64


@dataclass(frozen=True, kw_only=True)
class ServeOptions:
    """Paths, network, device and limits of one server (the app's own limits are ``config``; the connection-level
    ones ``connections``, counted per worker process). ``workers`` > 1: that many processes serve one listening
    socket (serve/workers.py); picklable, so a worker gets it through its start pipe, never its environment."""

    bundle_path: Path
    keys_db: str | Path                 # PATH_OR_URL (serve/stores/engine.py)
    audit_db: str | Path = Path("audit.db")
    audit_max_bytes: int | None = None
    audit_retention: Any = None         # serve/stores/retention.Retention (--audit-retention-days), None: keep all
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "cpu"
    torch_threads: int = 1
    workers: int = 1
    graceful_s: float = 30.0
    log_level: str = "info"
    signing_key: bytes | None = field(default=None, repr=False)
    monitor_config: Any = None
    config: ServeConfig = field(default_factory=ServeConfig)
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)
    slow_lane: SlowLaneLimits = field(default_factory=SlowLaneLimits)
    canary_path: Path | None = None     # --canary: served to a sticky share of keys, promoted or rolled back
    shadow_path: Path | None = None     # --shadow: run next to the stable bundle, answers never served
    rollout: Any = None                 # serve/rollout/config.RolloutConfig (--rollout FILE, --canary-fraction);
                                        # None: the default rules

    def __post_init__(self) -> None:
        if self.canary_path is not None and self.shadow_path is not None:
            raise UserError("--canary and --shadow: give one (start a shadow, then a canary, one after the other)")
        if (self.canary_path or self.shadow_path) and self.workers > 1:
            raise UserError(f"--canary / --shadow with --workers {self.workers}: a rollout runs in one process; "
                            "use --workers 1")
        parse_target(self.keys_db, flag="--keys")  # a value that is no database: exit 2 before anything is opened
        parse_target(self.audit_db, flag="--audit")
        if not (0 < int(self.port) < 65536):
            raise UserError(f"--port {self.port}: must be 1-65535")
        if self.torch_threads < 1:
            raise UserError(f"--torch-threads {self.torch_threads}: must be at least 1")
        w = self.workers
        if isinstance(w, bool) or not isinstance(w, int) or not 1 <= w <= MAX_WORKERS:
            raise UserError(f"--workers {self.workers}: must be an integer from 1 to {MAX_WORKERS}")
        if not (self.graceful_s >= 0 and self.graceful_s < float("inf")):
            raise UserError(f"--graceful-s {self.graceful_s}: must be a finite number >= 0")
        if self.audit_max_bytes is not None and self.audit_max_bytes <= 0:
            raise UserError(f"--audit-max-mb: must be positive (got {self.audit_max_bytes} bytes)")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise UserError(f"--log-level {self.log_level!r}: choose debug, info, warning or error")


def review_target(review: str | None, quarantine: Path | None) -> str | None:
    """``--review PATH_OR_URL``, or the database ``--quarantine DIR`` (its former folder flag, kept as an alias)
    names: ``DIR/review.db``; UserError when both are given or the value is no database."""
    if review is not None and quarantine is not None:
        raise UserError("--quarantine is an alias of --review (--quarantine DIR = --review DIR/review.db); give one")
    if quarantine is not None:
        review = str(Path(quarantine) / "review.db")
    if review is not None:
        parse_target(review, flag="--review")
    return review


def options_from_flags(*, bundle: Path, keys: str | Path, audit: str | Path, audit_max_mb: float | None, host: str,
                       port: int, audit_retention_days: float | None = None, input_cache_key_mb: float = 2.0,
                       input_cache_keys: int = 256,
                       trusted_proxy: list[str], max_body_mb: float, max_images: int, max_pixels: int,
                       max_request_pixels: int, key_pixels_per_s: float, no_resize: bool, max_batch: int,
                       max_wait_ms: float, header_timeout_s: float, body_timeout_s: float, min_body_kbps: float,
                       keepalive_s: float, max_connections: int, max_connections_per_client: int,
                       unauth_rate: float, unauth_burst: int, slow_lane_rate: float, review: str | None,
                       quarantine: Path | None, review_mb: float, review_days: float, device: str,
                       torch_threads: int, workers: int, graceful_s: float,
                       signing_key_file: Path | None, monitor_config: Path | None, canary: Path | None = None,
                       shadow: Path | None = None, canary_fraction: float | None = None,
                       rollout: Path | None = None, watermark_key_file: Path | None = None,
                       watermark_rate: float = 0.005, poisoning_epsilon: float = 0.0) -> ServeOptions:
    """The ``safedl serve`` flags (sizes in MB and KiB/s, as typed) as one validated ``ServeOptions``; raises
    UserError naming the flag."""
    from safedl.serve.protocol import parse_networks
    from safedl.serve.stores.retention import Retention
    from safedl.utils.keyfile import read_key_file, read_signing_key

    monitor = None
    if monitor_config is not None:
        from safedl.serve.monitor import load_monitor_config

        monitor = load_monitor_config(monitor_config)
    if not 0.0 < watermark_rate <= MAX_WATERMARK_RATE:
        raise UserError(f"--watermark-rate {watermark_rate!r}: allowed: a share in (0, {MAX_WATERMARK_RATE}]")
    config = ServeConfig(watermark_key=read_key_file(watermark_key_file, flag="--watermark-key-file"),
                         watermark_rate=watermark_rate, poisoning_epsilon=_l1_budget(poisoning_epsilon),
                         max_body_bytes=int(max_body_mb * 2**20), max_images=max_images, max_pixels=max_pixels,
                         max_request_pixels=max_request_pixels, key_pixels_per_s=key_pixels_per_s,
                         key_pixel_burst=2 * max_request_pixels, resize=not no_resize, max_batch=max_batch,
                         max_wait_ms=max_wait_ms, review_db=review_target(review, quarantine),
                         review_max_bytes=int(review_mb * 2**20), review_retention_days=review_days,
                         input_cache_bytes_per_key=_mb_bytes(input_cache_key_mb, flag="--input-cache-key-mb"),
                         input_cache_keys=input_cache_keys,
                         unauth_rate_per_s=unauth_rate, unauth_burst=unauth_burst, body_timeout_s=body_timeout_s,
                         min_body_bytes_per_s=min_body_kbps * 1024.0,
                         trusted_proxies=parse_networks(trusted_proxy, name="--trusted-proxy"))
    if canary_fraction is not None and canary is None:
        raise UserError("--canary-fraction needs --canary BUNDLE")
    from safedl.serve.rollout.config import load_rollout

    plan = load_rollout(rollout).with_first_step(canary_fraction)  # also the rules of canaries started over HTTP
    connections = ConnectionLimits(header_timeout_s=header_timeout_s, keepalive_timeout_s=keepalive_s,
                                   max_connections=max_connections,
                                   max_connections_per_client=max_connections_per_client)
    return ServeOptions(bundle_path=bundle, keys_db=keys, audit_db=audit,
                        audit_max_bytes=None if audit_max_mb is None else int(audit_max_mb * 2**20), host=host,
                        audit_retention=None if audit_retention_days is None else Retention(days=audit_retention_days),
                        port=port, device=device, torch_threads=torch_threads, workers=workers,
                        graceful_s=graceful_s,
                        signing_key=read_signing_key(signing_key_file), monitor_config=monitor, config=config,
                        connections=connections, slow_lane=SlowLaneLimits(rate_per_s=slow_lane_rate),
                        canary_path=canary, shadow_path=shadow, rollout=plan)


def _l1_budget(epsilon: float) -> float:
    if not 0.0 <= epsilon <= 2.0:
        raise UserError(f"--poisoning-epsilon {epsilon!r}: allowed: an L1 budget from 0 (off) to 2")
    return float(epsilon)


def _mb_bytes(mb: float, *, flag: str) -> int:
    if not 0 <= mb <= 1024:
        raise UserError(f"{flag} {mb!r}: must be a number of MB from 0 (off) to 1024")
    return int(mb * 2**20)
