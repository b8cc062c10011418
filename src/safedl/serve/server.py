"""Start-up and shutdown of ``safedl serve``: verify the bundle (a tampered one refuses to start), open the key and
audit stores, run uvicorn with the guarded HTTP protocol (serve/protocol.py: header deadline, connection limits,
lingering close) and JSON logs; SIGTERM/SIGINT stop accepting, let in-flight requests finish (up to ``graceful_s``),
then the app flushes the model queue and the audit log; SIGHUP reloads the bundle (serve/swap.py). With
``--workers N`` (N > 1) serve/workers.py runs N such servers on one listening socket."""
from __future__ import annotations

import logging
from typing import Any

from safedl.serve.options import LOOPBACK, ServeOptions

log = logging.getLogger("safedl.serve")


def build_app(options: ServeOptions) -> Any:
    """The app of ``options`` (bundle verified, stores opened; raises UserError/BundleError, exit 2)."""
    from safedl.deploy import load_bundle
    from safedl.serve.app import create_app
    from safedl.serve.audit import AuditStore
    from safedl.serve.key_cache import DEFAULT_TTL_S
    from safedl.serve.keys import KeyStore

    bundle = load_bundle(options.bundle_path, device=options.device, signing_key=options.signing_key)
    keys = KeyStore(options.keys_db, cache_ttl_s=DEFAULT_TTL_S)  # verified keys cached, revocations seen at once
    audit = AuditStore(options.audit_db, max_bytes=options.audit_max_bytes, retention=options.audit_retention)
    app = create_app(bundle=bundle, keys=keys, audit=audit,
                     config=options.config, monitor_config=options.monitor_config)
    # a swap verifies a new bundle as the start did (same signing key, device); SIGHUP reloads bundle_path (with
    # workers, the only swap: each worker gets it from the supervisor)
    app.state.service.swapper.configure(start_path=options.bundle_path, signing_key=options.signing_key,
                                        device=options.device, workers=options.workers)
    _start_release(app.state.service, options)
    return app


def _start_release(svc: Any, options: ServeOptions) -> None:
    """``--canary`` / ``--shadow``: the new bundle verified and checked as a swap would be (UserError, exit 2,
    when refused), then served next to the stable one (serve/rollout)."""
    from safedl.errors import UserError
    from safedl.serve.swap import SwapRefused

    if options.rollout is not None:
        svc.rollout.rules = options.rollout  # also for canaries started later over POST /v1/admin/canary
    path = options.canary_path or options.shadow_path
    if path is None:
        return
    try:
        svc.rollout.begin(str(path), mode="canary" if options.canary_path else "shadow", config=options.rollout,
                          ctx={"trigger": "start"}, operator_path=True)
    except SwapRefused as exc:
        raise UserError(f"--{'canary' if options.canary_path else 'shadow'} {path}: {exc.message}") from None


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas (M_ARENA_MAX) before the server starts its threads: each decoding thread would
    otherwise get its own arena, and freed image buffers stay mapped in all of them (the RSS grows with the thread
    count, not with the load). No-op (False) off glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        return bool(libc.mallopt(-8, int(arenas)))  # -8: M_ARENA_MAX
    except (OSError, AttributeError):
        return False


def freeze_startup_heap() -> int:
    """Move every object alive after start-up (torch, the bundle, the app) out of the cyclic garbage collector's
    reach (``gc.freeze``): a full collection would otherwise walk that heap while the event loop waits, and under
    connection churn (floods, held uploads) those pauses were the legit requests' tail latency (p99 3.2x -> 1.6x
    of unloaded in bench/redteam_service.py's held uploads). A start bundle swapped out later is still freed by
    reference counting; only what of it sits in a reference cycle stays (once: later bundles are not frozen).
    Returns the number of objects frozen."""
    import gc

    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def prepare_server(options: ServeOptions, *, log_fields: dict[str, Any] | None = None) -> tuple[Any, type]:
    """What serving ``options`` needs in this process: JSON logs (``log_fields`` on every line), malloc arenas,
    torch threads, the descriptor ceiling, the app (bundle verified, stores opened; its heap frozen out of the
    garbage collector), SIGHUP reload and the guarded
    protocol class (built here: it holds this process's connection table and slow lane, and cannot be pickled)."""
    import torch

    from safedl.serve.logs import setup_json_logging
    from safedl.serve.protocol import guarded_protocol, harden_process
    from safedl.serve.slow_lane import SlowLane
    from safedl.serve.swap import install_sighup

    setup_json_logging(getattr(logging, options.log_level.upper(), logging.INFO), fields=log_fields)
    limit_malloc_arenas()
    torch.set_num_threads(int(options.torch_threads))
    limits = options.connections
    ceiling = harden_process(max_connections=limits.max_connections)
    if ceiling < limits.max_connections:
        import dataclasses

        limits = dataclasses.replace(limits, max_connections=ceiling)
    app = build_app(options)
    freeze_startup_heap()
    install_sighup(app.state.service.swapper)
    lane = SlowLane(limits=options.slow_lane, penalized=app.state.service.unauth.penalized)
    protocol = guarded_protocol(limits=limits, trusted_proxies=options.config.trusted_proxies, slow_lane=lane)
    app.state.service.metrics.watch_connections(protocol.stats)
    return app, protocol


def uvicorn_settings(options: ServeOptions, *, protocol: type) -> dict[str, Any]:
    """uvicorn's settings for ``safedl serve`` (besides the app, host and port)."""
    # proxy_headers=False: uvicorn would otherwise take X-Forwarded-For from any loopback peer; serve/edge.py
    # honours it from --trusted-proxy peers only
    return dict(log_config=None, access_log=False, http=protocol, ws="none", proxy_headers=False,
                timeout_graceful_shutdown=int(options.graceful_s), h11_max_incomplete_event_size=16 * 1024,
                server_header=False, date_header=False)


def warn_if_exposed(host: str) -> None:
    """Log a warning when ``host`` is not a loopback address."""
    if host not in LOOPBACK:
        log.warning("listening on %s: the service is reachable from other machines (put it behind a TLS reverse "
                    "proxy)", host)


def run_server(options: ServeOptions) -> None:
    """Serve until SIGINT/SIGTERM in this process. Raises UserError (exit 2) for a bad bundle, key database or
    option."""
    import uvicorn

    app, protocol = prepare_server(options)
    warn_if_exposed(options.host)
    uvicorn.run(app, host=options.host, port=options.port, **uvicorn_settings(options, protocol=protocol))
