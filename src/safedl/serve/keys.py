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
from dataclasses import dataclass
from pathlib import Path

from safedl.errors import UserError
from safedl.serve._sqlite import PerThread, connect
from safedl.serve.dburl import sqlite_path
from safedl.serve.tiers import TIERS

SCOPES = ("predict", "model", "admin", "metrics")  # metrics: the Prometheus scraper (admin may too)
DEFAULT_SCOPES = ("predict", "model")  # admin only when asked for
_TOKEN = re.compile(r"^sdl_([0-9a-f]{12})_([A-Za-z0-9_-]{20,100})$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_DUMMY_HASH = hashlib.sha256(b"no such key").hexdigest()
MAX_RATE_PER_S = 1e9          # upper bounds of a key's limits: finite, and exact in the limiter's float state
MAX_BURST = 10**12
MAX_DAILY_QUOTA = 10**15

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, secret_sha256 TEXT NOT NULL, tier TEXT NOT NULL,
    scopes TEXT NOT NULL, rate_per_s REAL NOT NULL, burst INTEGER NOT NULL, daily_quota INTEGER NOT NULL,
    created_at REAL NOT NULL, revoked_at REAL);
CREATE TABLE IF NOT EXISTS rate_state (
    key_id TEXT PRIMARY KEY, tokens REAL NOT NULL, updated_at REAL NOT NULL, day TEXT NOT NULL, used INTEGER NOT NULL);
"""


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


_COLS = "key_id, name, tier, scopes, rate_per_s, burst, daily_quota, created_at, revoked_at"


class KeyStore:
    """The key database (SQLite, WAL); safe to use from many threads and processes at once."""

    def __init__(self, path: str | Path, *, create: bool = False):
        self.path = sqlite_path(path, what="key database")
        if not create and not self.path.is_file():
            raise UserError(f"--keys {self.path}: no such key database; create one with "
                            f"`safedl keys create --db {self.path} --name NAME`")
        try:
            if create:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = connect(self.path)
            conn.executescript(_SCHEMA)
            conn.close()
        except Exception as exc:  # sqlite3.Error or OSError
            raise UserError(f"{self.path}: cannot open the key database ({exc})") from exc
        self.conns = PerThread(self.path)

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
        conn = self.conns.get()
        if conn.execute("SELECT 1 FROM api_keys WHERE name=?", (name,)).fetchone():
            raise UserError(f"--name {name!r}: a key with this name exists in {self.path}")
        conn.execute(f"INSERT INTO api_keys ({_COLS}, secret_sha256) VALUES (?,?,?,?,?,?,?,?,?,?)",
                     (key_id, name, tier, ",".join(scopes), key.rate_per_s, key.burst, key.daily_quota,
                      key.created_at, None, _hash(secret)))
        return key, f"sdl_{key_id}_{secret}"

    def list(self) -> list[ApiKey]:
        rows = self.conns.get().execute(f"SELECT {_COLS} FROM api_keys ORDER BY created_at").fetchall()
        return [_row_to_key(r) for r in rows]

    def revoke(self, name_or_id: str) -> ApiKey:
        conn = self.conns.get()
        row = conn.execute(f"SELECT {_COLS} FROM api_keys WHERE name=? OR key_id=?", (name_or_id, name_or_id)).fetchone()
        if row is None:
            raise UserError(f"{name_or_id!r}: no key with this name or id in {self.path}")
        if row[-1] is None:
            conn.execute("UPDATE api_keys SET revoked_at=? WHERE key_id=?", (time.time(), row[0]))
        return _row_to_key(conn.execute(f"SELECT {_COLS} FROM api_keys WHERE key_id=?", (row[0],)).fetchone())

    def authenticate(self, token: str | None) -> ApiKey | None:
        """The live key this token belongs to, or None (unknown, malformed, wrong secret or revoked).

        The secret's hash is compared with ``hmac.compare_digest``, and an unknown id is compared against a dummy
        hash, so timing does not tell a wrong secret from an unknown key.
        """
        m = _TOKEN.match(token) if well_formed(token) else None
        key_id, secret = (m.group(1), m.group(2)) if m else ("", "x")
        row = None
        if m:
            row = self.conns.get().execute(f"SELECT {_COLS}, secret_sha256 FROM api_keys WHERE key_id=?",
                                           (key_id,)).fetchone()
        stored = row[-1] if row else _DUMMY_HASH
        ok = hmac.compare_digest(stored, _hash(secret))
        if not (ok and row and m) or row[-2] is not None:
            return None
        return _row_to_key(row[:-1])

    def close(self) -> None:
        self.conns.close()
