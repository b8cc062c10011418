"""Where the monitor's state lives: alerts in the audit database (table ``monitor_alerts``), automatic key actions
in the key database (table ``key_actions``, read by the service on every request, so `safedl keys restore` takes
effect on a running server). Both SQLite (WAL), both append-mostly: a restored action keeps its row."""
from __future__ import annotations

import getpass
import json
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from safedl.errors import UserError
from safedl.serve._sqlite import PerThread, connect, immediate
from safedl.serve.keys import ApiKey, KeyStore

_ALERTS = """
CREATE TABLE IF NOT EXISTS monitor_alerts (
    alert_id TEXT PRIMARY KEY, rule TEXT NOT NULL, severity TEXT NOT NULL, key_id TEXT, state TEXT NOT NULL,
    started_at REAL NOT NULL, resolved_at REAL, last_at REAL NOT NULL, value REAL, events INTEGER NOT NULL,
    action TEXT, metric TEXT NOT NULL, threshold REAL NOT NULL, bundle_version TEXT);
CREATE INDEX IF NOT EXISTS monitor_alerts_started ON monitor_alerts (started_at);
"""
_ALERT_COLS = ("alert_id", "rule", "severity", "key_id", "state", "started_at", "resolved_at", "last_at", "value",
               "events", "action", "metric", "threshold", "bundle_version")
_ACTIONS = """
CREATE TABLE IF NOT EXISTS key_actions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, key_id TEXT NOT NULL, action TEXT NOT NULL, actor TEXT NOT NULL,
    reason TEXT NOT NULL, alert_id TEXT, params TEXT NOT NULL, created_at REAL NOT NULL,
    restored_at REAL, restored_by TEXT);
CREATE INDEX IF NOT EXISTS key_actions_key ON key_actions (key_id, restored_at);
"""
_ACTION_COLS = ("id", "key_id", "action", "actor", "reason", "alert_id", "params", "created_at", "restored_at",
                "restored_by")
SEVERITY_ORDER = ("throttle", "labels_only", "block")


class AlertStore:
    """Alert rows (one per alert, updated in place: state, events, value, resolved_at)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = connect(self.path)
        conn.executescript(_ALERTS)
        conn.close()
        self.conns = PerThread(self.path)

    def upsert(self, alert: dict[str, Any]) -> None:
        conn = self.conns.get()
        with immediate(conn):
            conn.execute(f"INSERT OR REPLACE INTO monitor_alerts ({', '.join(_ALERT_COLS)}) "
                         f"VALUES ({', '.join('?' * len(_ALERT_COLS))})", tuple(alert.get(c) for c in _ALERT_COLS))

    def recent(self, *, since: float, limit: int = 100) -> list[dict[str, Any]]:
        """Alerts still firing or started/resolved since ``since``, newest first."""
        rows = self.conns.get().execute(
            f"SELECT {', '.join(_ALERT_COLS)} FROM monitor_alerts WHERE state='firing' OR last_at >= ? "
            "ORDER BY started_at DESC LIMIT ?", (since, limit)).fetchall()
        return [dict(zip(_ALERT_COLS, r)) for r in rows]

    def close(self) -> None:
        self.conns.close()


@dataclass(frozen=True)
class KeyAction:
    id: int
    key_id: str
    action: str
    actor: str
    reason: str
    alert_id: str | None
    params: dict
    created_at: float
    restored_at: float | None
    restored_by: str | None


class KeyBlocked(Exception):
    """The key is blocked by an automatic action (HTTP 403)."""

    def __init__(self, action: KeyAction):
        super().__init__(f"this key is blocked by the security monitor since "
                         f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(action.created_at))} "
                         f"({action.reason}; alert {action.alert_id}); an operator can restore it with "
                         f"`safedl keys restore`")
        self.action = action


class KeyActions:
    """Automatic responses to alerts, per key: throttle (rate x factor), labels_only (tier ``label``), block."""

    def __init__(self, store: KeyStore):
        self.store = store
        conn = store.conns.get()
        conn.executescript(_ACTIONS)

    def _rows(self, where: str, args: tuple) -> list[KeyAction]:
        rows = self.store.conns.get().execute(
            f"SELECT {', '.join(_ACTION_COLS)} FROM key_actions WHERE {where} ORDER BY id", args).fetchall()
        return [KeyAction(**{**dict(zip(_ACTION_COLS, r)), "params": json.loads(r[6])}) for r in rows]

    def active(self, key_id: str | None = None) -> list[KeyAction]:
        if key_id is None:
            return self._rows("restored_at IS NULL", ())
        return self._rows("key_id=? AND restored_at IS NULL", (key_id,))

    def history(self) -> list[KeyAction]:
        return self._rows("1=1", ())

    def enforce(self, key: ApiKey) -> ApiKey:
        """The key as its active actions leave it (raises KeyBlocked when blocked): one indexed read per request."""
        acts = self.active(key.key_id)
        if not acts:
            return key
        for a in acts:
            if a.action == "block":
                raise KeyBlocked(a)
        for a in acts:
            if a.action == "labels_only":
                key = replace(key, tier="label")
            elif a.action == "throttle":
                f = float(a.params.get("factor", 0.1))
                key = replace(key, rate_per_s=key.rate_per_s * f, burst=max(1, int(key.burst * f)))
        return key

    def record(self, *, key_id: str, action: str, reason: str, alert_id: str | None, actor: str = "monitor",
               params: dict | None = None) -> KeyAction:
        if action not in SEVERITY_ORDER:
            raise UserError(f"action {action!r}: choose one of {', '.join(SEVERITY_ORDER)}")
        conn = self.store.conns.get()
        with immediate(conn):
            cur = conn.execute("INSERT INTO key_actions (key_id, action, actor, reason, alert_id, params, created_at) "
                               "VALUES (?,?,?,?,?,?,?)", (key_id, action, actor, reason, alert_id,
                                                          json.dumps(params or {}), time.time()))
        return self._rows("id=?", (cur.lastrowid,))[0]

    def restore(self, name_or_id: str, *, action: str | None = None, actor: str | None = None) -> list[KeyAction]:
        """Lift the key's active actions (all, or only ``action``); the rows stay, with who lifted them and when."""
        key = next((k for k in self.store.list() if name_or_id in (k.name, k.key_id)), None)
        if key is None:
            raise UserError(f"{name_or_id!r}: no key with this name or id in {self.store.path}")
        if action is not None and action not in SEVERITY_ORDER:
            raise UserError(f"--action {action!r}: choose one of {', '.join(SEVERITY_ORDER)}")
        acts = [a for a in self.active(key.key_id) if action is None or a.action == action]
        who = actor or f"cli:{getpass.getuser()}"
        conn = self.store.conns.get()
        with immediate(conn):
            for a in acts:
                conn.execute("UPDATE key_actions SET restored_at=?, restored_by=? WHERE id=?", (time.time(), who, a.id))
        return [self._rows("id=?", (a.id,))[0] for a in acts]


def strongest(actions: list[KeyAction]) -> str | None:
    """The most severe active action (block > labels_only > throttle), or None."""
    names = {a.action for a in actions}
    return next((n for n in reversed(SEVERITY_ORDER) if n in names), None)


def new_alert_id() -> str:
    return uuid.uuid4().hex[:16]
