"""Start-up and shutdown of ``safedl serve``: verify the bundle (a tampered one refuses to start), open the key and
audit stores, run uvicorn with JSON logs; SIGTERM/SIGINT stop accepting, let in-flight requests finish (up to
``graceful_s``), then the app flushes the model queue and the audit log; SIGHUP reloads the bundle (serve/swap.py)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from safedl.errors import UserError
from safedl.serve.config import ServeConfig

log = logging.getLogger("safedl.serve")


def load_verified_bundle(path: str | Path, *, device: str = "cpu", signing_key: bytes | None = None,
                         allow_entry_point: bool = True) -> Any:
    """The bundle at ``path``, every file's sha256 (and the signature, given a key) checked (raises BundleError).

    The one loading path (``safedl verify`` takes it too): ``load_bundle`` reads every file once and builds the
    system from the bytes it verified, so a swap racing with file replacements never loads unverified content."""
    from safedl.deploy import load_bundle

    return load_bundle(Path(path), device=device, signing_key=signing_key, allow_entry_point=allow_entry_point)


def build_app(*, bundle_path: Path, keys_db: Path, audit_db: Path, config: ServeConfig, device: str = "cpu",
              signing_key: bytes | None = None, audit_max_bytes: int | None = None, monitor_config: Any = None):
    from safedl.serve.app import create_app
    from safedl.serve.audit import AuditStore
    from safedl.serve.keys import KeyStore

    bundle = load_verified_bundle(bundle_path, device=device, signing_key=signing_key)
    keys = KeyStore(keys_db)
    app = create_app(bundle=bundle, keys=keys, audit=AuditStore(audit_db, max_bytes=audit_max_bytes), config=config,
                     monitor_config=monitor_config)
    # a swap verifies a new bundle as the start did (same signing key, device); SIGHUP reloads bundle_path
    app.state.service.swapper.configure(start_path=bundle_path, signing_key=signing_key, device=device)
    return app


def run_server(*, bundle_path: Path, keys_db: Path, audit_db: Path, audit_max_bytes: int | None = None,
               host: str = "127.0.0.1", port: int = 8000,
               config: ServeConfig | None = None, device: str = "cpu", torch_threads: int = 1,
               graceful_s: float = 30.0, log_level: str = "info", signing_key: bytes | None = None,
               monitor_config: Any = None) -> None:
    """Serve until SIGINT/SIGTERM. Raises UserError (exit 2) for a bad bundle, key database or option."""
    import torch
    import uvicorn

    from safedl.serve.logs import setup_json_logging

    setup_json_logging(getattr(logging, log_level.upper(), logging.INFO))
    torch.set_num_threads(int(torch_threads))
    if not (0 < port < 65536):
        raise UserError(f"--port {port}: must be 1-65535")
    app = build_app(bundle_path=bundle_path, keys_db=keys_db, audit_db=audit_db, config=config or ServeConfig(),
                    device=device, signing_key=signing_key, audit_max_bytes=audit_max_bytes,
                    monitor_config=monitor_config)
    from safedl.serve.swap import install_sighup

    install_sighup(app.state.service.swapper)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: the service is reachable from other machines", host)
    uvicorn.run(app, host=host, port=port, log_config=None, access_log=False, timeout_graceful_shutdown=int(graceful_s),
                h11_max_incomplete_event_size=16 * 1024, server_header=False)
