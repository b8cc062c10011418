"""``ServeOptions``: everything ``safedl serve`` was asked for, validated once, flowing from the CLI to the server."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safedl.errors import UserError
from safedl.serve.config import ServeConfig
from safedl.serve.protocol import ConnectionLimits

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True, kw_only=True)
class ServeOptions:
    """Paths, network, device and limits of one server (the app's own limits are ``config``; the connection-level
    ones ``connections``)."""

    bundle_path: Path
    keys_db: Path
    audit_db: Path = Path("audit.db")
    audit_max_bytes: int | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "cpu"
    torch_threads: int = 1
    graceful_s: float = 30.0
    log_level: str = "info"
    signing_key: bytes | None = field(default=None, repr=False)
    monitor_config: Any = None
    config: ServeConfig = field(default_factory=ServeConfig)
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)

    def __post_init__(self) -> None:
        if not (0 < int(self.port) < 65536):
            raise UserError(f"--port {self.port}: must be 1-65535")
        if self.torch_threads < 1:
            raise UserError(f"--torch-threads {self.torch_threads}: must be at least 1")
        if not (self.graceful_s >= 0 and self.graceful_s < float("inf")):
            raise UserError(f"--graceful-s {self.graceful_s}: must be a finite number >= 0")
        if self.audit_max_bytes is not None and self.audit_max_bytes <= 0:
            raise UserError(f"--audit-max-mb: must be positive (got {self.audit_max_bytes} bytes)")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise UserError(f"--log-level {self.log_level!r}: choose debug, info, warning or error")
