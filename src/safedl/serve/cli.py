"""The service's commands (``safedl serve``, ``safedl keys ...``, ``safedl audit export``, ``safedl db upgrade``),
mounted by safedl.cli. Every database option takes PATH_OR_URL: a SQLite file or a PostgreSQL URL.
Heavy imports (FastAPI, torch) happen inside the commands, so ``safedl --help`` stays fast."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from safedl.errors import UserError

keys_app = typer.Typer(no_args_is_help=True, help="Create, list and revoke API keys of `safedl serve`.")
audit_app = typer.Typer(no_args_is_help=True, help="Read the audit log of `safedl serve`.")
db_app = typer.Typer(no_args_is_help=True, help="The schema of the service's databases (keys, audit).")
RETENTION_HELP = ("delete audit rows (and resolved alerts, swaps) older than this many days (1-3650; 30-90 "
                  "typical); default: keep all")
INPUT_CACHE_HELP = "MB of decoded inputs kept per key by content hash (a key's repeat skips decoding only; 0: off)"
DB_HELP = "a SQLite file path or a PostgreSQL URL (postgresql://USER@HOST/DB)"
CANARY_HELP = "a new bundle served to a sticky share of keys, promoted step by step or rolled back by the rules"
SHADOW_HELP = "a new bundle run on every answered batch; answers come from BUNDLE, disagreements are counted"
FRACTION_HELP = "the canary's first step: its share of keys (0.1 = 10%)"
ROLLOUT_HELP = "rollout rules (YAML; `safedl rollout rules` prints the default, used without it)"


def _fail(exc: BaseException) -> None:
    sys.stderr.write(f"error: {exc}\n")
    raise typer.Exit(2)


def serve_command(
        bundle: Path = typer.Argument(..., help="a bundle directory from `safedl export` (verified at start)"),
        keys: str = typer.Option(..., "--keys", help="API key database (`safedl keys create --db PATH_OR_URL`): "
                                                     + DB_HELP),
        audit: str = typer.Option("audit.db", "--audit", help="audit log and monitor alerts: " + DB_HELP),
        audit_max_mb: Optional[float] = typer.Option(None, "--audit-max-mb",
                                                      help="cap of the audit database; above it requests get 503"),
        audit_retention_days: Optional[float] = typer.Option(None, "--audit-retention-days", help=RETENTION_HELP),
        host: str = typer.Option("127.0.0.1", "--host", help="interface to listen on"),
        port: int = typer.Option(8000, "--port"),
        trusted_proxy: list[str] = typer.Option([], "--trusted-proxy",
                                                help="CIDR of a reverse proxy whose X-Forwarded-For is honoured "
                                                     "(repeatable; default: none)"),
        max_body_mb: float = typer.Option(8.0, "--max-body-mb", help="largest request body (413 above)"),
        max_images: int = typer.Option(64, "--max-images", help="most images per request"),
        max_pixels: int = typer.Option(4_000_000, "--max-pixels", help="most pixels per image, checked before decoding"),
        max_request_pixels: int = typer.Option(16_000_000, "--max-request-pixels",
                                               help="most pixels per request (all images), before decoding"),
        key_pixels_per_s: float = typer.Option(2_000_000.0, "--key-pixels-per-s",
                                               help="per-key pixel budget refill (burst: 2x --max-request-pixels)"),
        input_cache_key_mb: float = typer.Option(2.0, "--input-cache-key-mb", help=INPUT_CACHE_HELP),
        input_cache_keys: int = typer.Option(256, "--input-cache-keys", help="keys the input cache holds at most"),
        no_resize: bool = typer.Option(False, "--no-resize", help="refuse (422) images whose size differs, don't resize"),
        max_batch: int = typer.Option(64, "--max-batch", help="most images per forward pass"),
        max_wait_ms: float = typer.Option(3.0, "--max-wait-ms", help="how long a batch waits for more requests"),
        header_timeout_s: float = typer.Option(10.0, "--header-timeout-s", help="deadline for a request's headers"),
        body_timeout_s: float = typer.Option(30.0, "--body-timeout-s", help="deadline for a request's body"),
        min_body_kbps: float = typer.Option(16.0, "--min-body-kbps",
                                            help="slowest body upload accepted (KiB/s, after 5 s)"),
        keepalive_s: float = typer.Option(5.0, "--keepalive-s", help="idle time a keep-alive connection is kept"),
        max_connections: int = typer.Option(1024, "--max-connections", help="open connections in all (503 above)"),
        max_connections_per_client: int = typer.Option(64, "--max-connections-per-client",
                                                       help="open connections per client address (429 above)"),
        unauth_rate: float = typer.Option(1.0, "--unauth-rate",
                                          help="failed authentications per second per client address (429 above)"),
        unauth_burst: int = typer.Option(20, "--unauth-burst", help="failed authentications allowed at once"),
        slow_lane_rate: float = typer.Option(50.0, "--slow-lane-rate",
                                             help="requests per second read, in all, from client addresses over "
                                                  "their failed-authentication budget (the slow lane)"),
        review: Optional[str] = typer.Option(None, "--review", help="review queue of rejected inputs: " + DB_HELP),
        quarantine: Optional[Path] = typer.Option(None, "--quarantine", help="alias: DIR = --review DIR/review.db"),
        review_mb: float = typer.Option(100.0, "--review-mb", "--quarantine-mb", help="size cap of queued images"),
        review_days: float = typer.Option(30.0, "--review-days", "--quarantine-days", help="retention of the queue"),
        device: str = typer.Option("cpu", "--device"),
        torch_threads: int = typer.Option(1, "--torch-threads", help="intra-op threads of the model (per worker)"),
        workers: int = typer.Option(1, "--workers", help="worker processes on one listening socket (1-64); each loads "
                                                         "the bundle. Rate limits, quotas and the audit are exact "
                                                         "across them (shared databases); the security monitor, the "
                                                         "failed-authentication budget and the connection limits are "
                                                         "per worker (each sees its share of a key's queries)"),
        graceful_s: float = typer.Option(30.0, "--graceful-s", help="how long shutdown waits for in-flight requests"),
        signing_key_file: Optional[Path] = typer.Option(None, "--signing-key-file",
                                                        help="require the bundle's HMAC signature with this key"),
        monitor_config: Optional[Path] = typer.Option(None, "--monitor-config",
                                                      help="security monitor rules (YAML; `safedl monitor rules` "
                                                           "prints the default); off without it"),
        canary: Optional[Path] = typer.Option(None, "--canary", help=CANARY_HELP),
        shadow: Optional[Path] = typer.Option(None, "--shadow", help=SHADOW_HELP),
        canary_fraction: Optional[float] = typer.Option(None, "--canary-fraction", help=FRACTION_HELP),
        rollout: Optional[Path] = typer.Option(None, "--rollout", help=ROLLOUT_HELP),
        watermark_key_file: Optional[Path] = typer.Option(
            None, "--watermark-key-file", help="DAWN response watermark (every tier) keyed with this secret "
                                               "(>= 16 bytes); `safedl ownership verify` proves copies with it"),
        watermark_rate: float = typer.Option(0.005, "--watermark-rate", help="share of answers the watermark "
                                                                             "alters (at most 0.005)"),
        poisoning_epsilon: float = typer.Option(0.0, "--poisoning-epsilon", help="LastLayerMAD prediction poisoning "
                                                "of score-tier answers: L1 budget (0 off; 1 measured; labels kept)"),
) -> None:
    """Serve a bundle over HTTP: API keys, rate limits, input limits, audit log, Prometheus metrics.

    Exit code 2 when the bundle fails verification or an option is wrong. SIGHUP reloads BUNDLE (verified as at
    start) without downtime; POST /v1/admin/bundle and /v1/admin/rollback (scope admin) swap and roll back.
    With --workers N, SIGHUP to the supervisor reloads every worker and SIGTERM stops them all gracefully.
    --canary NEW (or POST /v1/admin/canary) releases NEW to a sticky share of keys under the rollout rules.
    """
    _serve(dict(locals()))  # every option, by parameter name: one ServeOptions is built from them


def _serve(flags: dict) -> None:
    """Run ``safedl serve`` with its flags (exit 2 on a UserError; a worker supervisor's exit code)."""
    from safedl.serve.options import options_from_flags

    try:
        options = options_from_flags(**flags)
        if options.workers > 1:
            from safedl.serve.workers import run_workers

            code = run_workers(options)
        else:
            from safedl.serve.server import run_server

            code = run_server(options) or 0
    except UserError as exc:
        _fail(exc)
    if code:
        raise typer.Exit(code)


@keys_app.command("create")
def keys_create(db: str = typer.Option(..., "--db", help="key database (a SQLite file is created if missing): "
                                                          + DB_HELP),
                name: str = typer.Option(..., "--name"),
                tier: str = typer.Option("rounded", "--tier", help="output tier: full, rounded, topk or label"),
                scopes: str = typer.Option("predict,model", "--scopes", help="comma-separated: predict, model, admin (bundle swap, monitor, metrics), metrics (the Prometheus scraper)"),
                rate: float = typer.Option(20.0, "--rate", help="sustained requests per second (finite, > 0)"),
                burst: int = typer.Option(40, "--burst", help="requests allowed at once (>= 1)"),
                quota: int = typer.Option(100_000, "--quota", help="images per UTC day (>= 1)")) -> None:
    """Create a key and print it once (only its hash is stored). A value not allowed: exit 2, nothing written."""
    from safedl.serve.keys import KeyStore, check_key_settings
    from safedl.serve.stores.engine import parse_target

    try:
        settings = dict(name=name, tier=tier, scopes=tuple(s.strip() for s in scopes.split(",") if s.strip()),
                        rate_per_s=rate, burst=burst, daily_quota=quota)
        target = parse_target(db, flag="--db")
        check_key_settings(**settings)  # before the database is created
        key, token = KeyStore(target, create=True, flag="--db").create(**settings)
    except UserError as exc:
        _fail(exc)
    sys.stderr.write(f"created key {key.name} (id {key.key_id}, tier {key.tier}); store it now, it is not shown again:\n")
    typer.echo(token)


@keys_app.command("list")
def keys_list(db: str = typer.Option(..., "--db", help="key database: " + DB_HELP),
              as_json: bool = typer.Option(False, "--json", help="one JSON object per line")) -> None:
    """List keys (never their secrets)."""
    from safedl.serve.keys import KeyStore

    try:
        keys = KeyStore(db, flag="--db").list()
    except UserError as exc:
        _fail(exc)
    for k in keys:
        p = k.public()
        typer.echo(json.dumps(p) if as_json else
                   f"{p['key_id']}  {p['name']:<20} tier={p['tier']:<8} scopes={','.join(p['scopes'])} "
                   f"rate={p['rate_per_s']}/s burst={p['burst']} quota={p['daily_quota']}/day"
                   f"{'  REVOKED' if p['revoked'] else ''}")


@keys_app.command("revoke")
def keys_revoke(name: str = typer.Argument(..., help="key name or id"),
                db: str = typer.Option(..., "--db", help="key database: " + DB_HELP)) -> None:
    """Revoke a key: the service answers 401 to it from its next request on."""
    from safedl.serve.keys import KeyStore

    try:
        key = KeyStore(db, flag="--db").revoke(name)
    except UserError as exc:
        _fail(exc)
    typer.echo(f"revoked {key.name} ({key.key_id})")


@keys_app.command("actions")
def keys_actions(db: str = typer.Option(..., "--db", help="key database: " + DB_HELP),
                 show_all: bool = typer.Option(False, "--all", help="also the restored ones"),
                 as_json: bool = typer.Option(False, "--json", help="one JSON object per line")) -> None:
    """List the security monitor's automatic key actions (throttle, labels_only, block): who, what, when, why."""
    import dataclasses

    from safedl.serve.keys import KeyStore
    from safedl.serve.monitor.store import KeyActions

    try:
        store = KeyStore(db, flag="--db")
        acts = KeyActions(store)
        rows = acts.history() if show_all else acts.active()
        names = {k.key_id: k.name for k in store.list()}
    except UserError as exc:
        _fail(exc)
    for a in rows:
        d = dataclasses.asdict(a) | {"name": names.get(a.key_id)}
        state = f"restored by {a.restored_by}" if a.restored_at else "ACTIVE"
        typer.echo(json.dumps(d) if as_json else
                   f"#{a.id} {d['name'] or a.key_id:<20} {a.action:<11} by {a.actor} at {_iso(a.created_at)} "
                   f"alert {a.alert_id}: {a.reason}  [{state}]")


@keys_app.command("restore")
def keys_restore(name: str = typer.Argument(..., help="key name or id"),
                 db: str = typer.Option(..., "--db", help="key database: " + DB_HELP),
                 action: Optional[str] = typer.Option(None, "--action",
                                                      help="only this action (default: all)")) -> None:
    """Lift the monitor's active actions on a key (works on a running server: it reads them on every request)."""
    from safedl.serve.keys import KeyStore
    from safedl.serve.monitor.store import KeyActions

    try:
        lifted = KeyActions(KeyStore(db, flag="--db")).restore(name, action=action)
    except UserError as exc:
        _fail(exc)
    if not lifted:
        typer.echo(f"{name}: no active action to restore")
    for a in lifted:
        typer.echo(f"restored {name}: lifted #{a.id} {a.action} (alert {a.alert_id})")


def _iso(ts: float) -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


@audit_app.command("export")
def audit_export(db: str = typer.Option("audit.db", "--db", help="the service's audit database: " + DB_HELP),
                 out: Path = typer.Option(..., "--out", help="output file"),
                 fmt: Optional[str] = typer.Option(None, "--format", help="csv or jsonl (default: from --out suffix)"),
                 since: Optional[str] = typer.Option(None, "--since", help="ISO 8601 start (inclusive, UTC if naive)"),
                 until: Optional[str] = typer.Option(None, "--until", help="ISO 8601 end (exclusive)")) -> None:
    """Write the audit rows of a time range as CSV or JSONL."""
    from safedl.serve.audit import export_rows, parse_time

    try:
        fmt = fmt or ("jsonl" if out.suffix.lower() in (".jsonl", ".json") else "csv")
        n = export_rows(db, out, fmt=fmt, since=parse_time(since, flag="--since"),
                        until=parse_time(until, flag="--until"))
    except UserError as exc:
        _fail(exc)
    typer.echo(f"wrote {n} rows to {out}")


@db_app.command("upgrade")
def db_upgrade(target: str = typer.Argument(..., metavar="PATH_OR_URL", help="the key or audit database: "
                                                                             + DB_HELP)) -> None:
    """Bring a database to this safedl's schema revision, keeping its rows (back it up first). A database written
    by a safedl from before revisions is adopted. Servers starting meanwhile wait for it (the schema lock); stop
    the servers of the older safedl first: they do not check the revision again once started."""
    from safedl.serve.stores import engine as engines
    from safedl.serve.stores.migrate import upgrade

    try:
        where = engines.parse_target(target, flag="PATH_OR_URL")
        if where.is_sqlite and not where.path.is_file():
            raise UserError(f"PATH_OR_URL {where.display}: no such database file")
        eng = engines.open_engine(where, flag="PATH_OR_URL")
        try:
            before, after = upgrade(eng, what=where.display)
        except engines.StoreUnavailable as exc:
            raise UserError(f"{where.display}: cannot open the database ({exc})") from None
        finally:
            eng.dispose()
    except UserError as exc:
        _fail(exc)
    typer.echo(f"{where.display}: schema at revision {after}" + ("" if before == after else
                                                                 f" (was {before or 'unversioned'})"))
