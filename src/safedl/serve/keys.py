"""API keys: stored as SHA-256 hashes, compared in constant time, with a tier, scopes, rate limits and a quota.

A key is ``sdl_<key id>_<secret>``; only the id and ``sha256(secret)`` are stored, so a leaked key database does not
leak usable keys (the 256-bit random secret makes a slow password hash unnecessary). The plaintext is shown once,
at creation.
"""
from __future__ import annotations

import hashlib
import hmac
import numbers
import re
import secrets
import time
import os
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from safedl.errors import UserError
from safedl.serve import key_cache
from safedl.serve.stores import engine as engines
from safedl.serve.stores.migrate import ensure_schema
from safedl.serve.stores.schema import api_keys
from safedl.serve.tiers import TIERS

SCOPES = ("predict", "model", "admin", "metrics")  # metrics: the Prometheus scraper (admin may too)
DEFAULT_SCOPES = ("predict", "model")  # admin only when asked for
_TOKEN = re.compile(r"^sdl_([0-9a-f]{12})_([A-Za-z0-9_-]{20,100})$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_DUMMY_HASH = hashlib.sha256(b"no such key").hexdigest()
MAX_RATE_PER_S = 1e9          # upper bounds of a key's limits: finite, and exact in the limiter's float state
MAX_BURST = 10**12
MAX_DAILY_QUOTA = 10**15



def well_formed(token: str | None) -> bool:
    """Whether ``token`` has the shape of a key at all (a cheap check before any lookup)."""
    return token is not None and len(token) <= 160 and _TOKEN.match(token) is not None


def token_key_id(token: str) -> str | None:
    """The key id a well-formed token names (not a secret: it only says which key the secret claims to be)."""
    m = _TOKEN.match(token)
    return m.group(1) if m else None


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    name: str
    tier: str
    scopes: tuple[str, ...]
    rate_per_s: float
    burst: int
    daily_quota: int
    created_at: float
    revoked_at: float | None = None

    def public(self) -> dict:
        return {"key_id": self.key_id, "name": self.name, "tier": self.tier, "scopes": list(self.scopes),
                "rate_per_s": self.rate_per_s, "burst": self.burst, "daily_quota": self.daily_quota,
                "created_at": self.created_at, "revoked": self.revoked_at is not None}


def _check_limit(flag: str, value: object, *, high: float, integer: bool, unit: str) -> None:
    ok_type = isinstance(value, numbers.Integral if integer else numbers.Real)
    if isinstance(value, bool) or not ok_type or not 0 < value <= high:  # NaN and inf fail here
        allowed = (f"a whole number of {unit} from 1 to {high:.0e}" if integer
                   else f"a finite number of {unit} above 0 and at most {high:.0e}")
        raise UserError(f"{flag} {value!r}: not allowed; allowed is {allowed}")


def check_key_settings(*, name: str, tier: str, scopes: tuple[str, ...], rate_per_s: float, burst: int,
                       daily_quota: int) -> None:
    """Raise UserError naming the first setting of a new key that is not allowed (before anything is written)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise UserError(f"--name {name!r}: use 1-64 letters, digits, '_', '.', '-' (starting with a letter or digit)")
    if tier not in TIERS:
        raise UserError(f"--tier {tier!r} is not allowed; choose one of {', '.join(TIERS)}")
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        raise UserError(f"--scopes {','.join(scopes)!r}: allowed scopes are {', '.join(SCOPES)}")
    _check_limit("--rate", rate_per_s, high=MAX_RATE_PER_S, integer=False, unit="requests per second")
    _check_limit("--burst", burst, high=MAX_BURST, integer=True, unit="requests at once")
    _check_limit("--quota", daily_quota, high=MAX_DAILY_QUOTA, integer=True, unit="images per UTC day")


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _row_to_key(row: tuple) -> ApiKey:
    key_id, name, tier, scopes, rate, burst, quota, created, revoked = row
    return ApiKey(key_id=key_id, name=name, tier=tier, scopes=tuple(s for s in scopes.split(",") if s),
                  rate_per_s=rate, burst=burst, daily_quota=quota, created_at=created, revoked_at=revoked)


_COLS = ("key_id", "name", "tier", "scopes", "rate_per_s", "burst", "daily_quota", "created_at", "revoked_at")
_SELECT = sa.select(*(api_keys.c[c] for c in _COLS))
# the lookup of every request, on the DBAPI cursor (engines.Hot)
_BY_ID = engines.Hot(f"SELECT {', '.join(_COLS)}, secret_sha256 FROM api_keys WHERE key_id = :key_id")


class KeyStore:
    """The key database (a SQLite file or a PostgreSQL URL: serve/stores/engine.py); safe to use from many
    threads, processes and replicas at once. ``engine`` is shared with the rate limiter and the key actions."""

    def __init__(self, path: str | os.PathLike, *, create: bool = False, flag: str = "--keys",
                 cache_ttl_s: float | None = None):
        """``cache_ttl_s``: keep verified keys in this process for at most that long, dropped at once when a key
        is revoked anywhere (serve/key_cache.py); None: every ``authenticate`` reads the database."""
        target = engines.parse_target(path, flag=flag)
        self.target = target
        self.path: Path | str = target.path if target.is_sqlite else target.display
        if target.is_sqlite and not create and not target.path.is_file():
            raise UserError(f"{flag} {self.path}: no such key database; create one with "
                            f"`safedl keys create --db {self.path} --name NAME`")
        self.engine = engines.open_engine(target, flag=flag, create=create)
        try:
            ensure_schema(self.engine, what="key database")
        except engines.StoreUnavailable as exc:
            self.engine.dispose()
            raise UserError(f"{self.path}: cannot open the key database ({exc})") from exc
        except UserError:
            self.engine.dispose()
            raise
        self._cache = None if cache_ttl_s is None else key_cache.VerifiedKeyCache(
            key_cache.SqliteGeneration(target.path) if target.is_sqlite else key_cache.PostgresGeneration(
                self.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)),
            ttl_s=cache_ttl_s)

    def _what(self) -> str:
        return f"key database {self.path}"

    def create(self, *, name: str, tier: str = "rounded", scopes: tuple[str, ...] = DEFAULT_SCOPES,
               rate_per_s: float = 20.0,
               burst: int = 40, daily_quota: int = 100_000) -> tuple[ApiKey, str]:
        """Add a key; returns it and its plaintext token (shown once, never stored). Limits must be finite and
        positive (see :func:`check_key_settings`)."""
        check_key_settings(name=name, tier=tier, scopes=scopes, rate_per_s=rate_per_s, burst=burst,
                           daily_quota=daily_quota)
        key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        key = ApiKey(key_id=key_id, name=name, tier=tier, scopes=tuple(scopes), rate_per_s=float(rate_per_s),
                     burst=int(burst), daily_quota=int(daily_quota), created_at=time.time())
        try:
            with engines.write(self.engine, what=self._what()) as conn:
                conn.execute(api_keys.insert().values(
                    key_id=key_id, name=name, tier=tier, scopes=",".join(scopes), rate_per_s=key.rate_per_s,
                    burst=key.burst, daily_quota=key.daily_quota, created_at=key.created_at, revoked_at=None,
                    secret_sha256=_hash(secret)))
        except sa_exc.IntegrityError:
            raise UserError(f"--name {name!r}: a key with this name exists in {self.path}") from None
        return key, f"sdl_{key_id}_{secret}"

    def list(self) -> list[ApiKey]:
        with engines.read(self.engine, what=self._what()) as conn:
            rows = conn.execute(_SELECT.order_by(api_keys.c.created_at)).all()
        return [_row_to_key(tuple(r)) for r in rows]

    def revoke(self, name_or_id: str) -> ApiKey:
        match = sa.or_(api_keys.c.name == name_or_id, api_keys.c.key_id == name_or_id)
        with engines.write(self.engine, what=self._what()) as conn:
            row = conn.execute(_SELECT.where(match)).first()
            if row is None:
                raise UserError(f"{name_or_id!r}: no key with this name or id in {self.path}")
            conn.execute(api_keys.update().where(api_keys.c.key_id == row.key_id, api_keys.c.revoked_at.is_(None))
                         .values(revoked_at=time.time()))
            row = conn.execute(_SELECT.where(api_keys.c.key_id == row.key_id)).first()
            if not self.target.is_sqlite:
                conn.execute(sa.text(f"NOTIFY {key_cache.CHANNEL}"))  # delivered at the commit (key caches)
        if self.target.is_sqlite:
            key_cache.signal_sqlite_revocation(self.target.path)  # after the commit: key caches drop their keys
        return _row_to_key(tuple(row))

    def authenticate(self, token: str | None) -> ApiKey | None:
        """The live key this token belongs to, or None (unknown, malformed, wrong secret or revoked); raises
        StoreUnavailable when the database cannot answer.

        The secret's hash is compared with ``hmac.compare_digest``, and an unknown id is compared against a dummy
        hash, so timing does not tell a wrong secret from an unknown key.
        """
        if self._cache is not None:
            return self._cache.authenticate(token, self._lookup)
        return self._lookup(token)

    def _lookup(self, token: str | None) -> ApiKey | None:
        m = _TOKEN.match(token) if well_formed(token) else None
        key_id, secret = (m.group(1), m.group(2)) if m else ("", "x")
        row = None
        if m:
            with engines.hot(self.engine, what=self._what()) as conn:
                row = next(iter(_BY_ID.run(conn, {"key_id": key_id})), None)
        stored = row[-1] if row else _DUMMY_HASH
        ok = hmac.compare_digest(stored, _hash(secret))
        if not (ok and row and m) or row[-2] is not None:
            return None
        return _row_to_key(tuple(row)[:-1])

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
        self.engine.dispose()
