"""Where the monitor's state lives: alerts in the audit database (table ``monitor_alerts``), automatic key actions
in the key database (table ``key_actions``, read by the service on every request, so `safedl keys restore` takes
effect on a running server, or on every replica sharing a PostgreSQL key database). Both append-mostly: a
restored action keeps its row."""
from __future__ import annotations

import getpass
import json
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from safedl.errors import UserError
from safedl.serve.keys import ApiKey, KeyStore
from safedl.serve.stores import engine as engines
from safedl.serve.stores.migrate import ensure_schema
from safedl.serve.stores.schema import ALERT_COLUMNS, key_actions, monitor_alerts

_ALERT_COLS = ALERT_COLUMNS
_ACTION_COLS = ("id", "key_id", "action", "actor", "reason", "alert_id", "params", "created_at", "restored_at",
                "restored_by")
# the read of every request (``enforce``), on the DBAPI cursor (engines.Hot)
_ACTIVE_OF_KEY = engines.Hot(f"SELECT {', '.join(_ACTION_COLS)} FROM key_actions WHERE key_id = :key_id AND "
                         "restored_at IS NULL ORDER BY id")
SEVERITY_ORDER = ("throttle", "labels_only", "block")


class AlertStore:
    """Alert rows (one per alert, updated in place: state, events, value, resolved_at). ``path``: the audit
    database's PATH_OR_URL (or its Target)."""

    def __init__(self, path: Any):
        target = engines.parse_target(path, flag="--audit")
        self.path = target.path if target.is_sqlite else target.display
        if target.is_sqlite:
            target.path.parent.mkdir(parents=True, exist_ok=True)
        self.engine = engines.open_engine(target, flag="--audit", pool_size=2, max_overflow=2)
        ensure_schema(self.engine, what=f"audit database {self.path}")

    def upsert(self, alert: dict[str, Any]) -> None:
        t = monitor_alerts
        values = {c: alert.get(c) for c in _ALERT_COLS}
        with engines.write(self.engine, what="monitor alerts") as conn:
            ins = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(t).values(**values)
            conn.execute(ins.on_conflict_do_update(index_elements=[t.c.alert_id],
                                                   set_={c: ins.excluded[c] for c in _ALERT_COLS if c != "alert_id"}))

    def resolve_stale(self, *, now: float) -> int:
        """Resolve alerts a previous run left firing (its windows are gone; an ongoing attack fires anew)."""
        t = monitor_alerts
        with engines.write(self.engine, what="monitor alerts") as conn:
            return conn.execute(t.update().where(t.c.state == "firing")
                                .values(state="resolved", resolved_at=now, last_at=now)).rowcount

    def recent(self, *, since: float, limit: int = 100) -> list[dict[str, Any]]:
        """Alerts still firing or started/resolved since ``since``, newest first."""
        t = monitor_alerts
        with engines.read(self.engine, what="monitor alerts") as conn:
            rows = conn.execute(sa.select(*(t.c[c] for c in _ALERT_COLS))
                                .where(sa.or_(t.c.state == "firing", t.c.last_at >= since))
                                .order_by(t.c.started_at.desc()).limit(limit)).all()
        return [dict(zip(_ALERT_COLS, r)) for r in rows]

    def close(self) -> None:
        self.engine.dispose()


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

    def _rows(self, where: Any, args: dict | None = None) -> list[KeyAction]:
        t = key_actions
        if isinstance(where, engines.Hot):
            with engines.hot(self.store.engine, what="key actions") as conn:
                rows = where.run(conn, args or {})
        else:
            with engines.read(self.store.engine, what="key actions") as conn:
                rows = conn.execute(sa.select(*(t.c[c] for c in _ACTION_COLS)).where(where).order_by(t.c.id)).all()
        return [KeyAction(**{**dict(zip(_ACTION_COLS, r)), "params": json.loads(r[6])}) for r in rows]

    def active(self, key_id: str | None = None) -> list[KeyAction]:
        if key_id is None:
            return self._rows(key_actions.c.restored_at.is_(None))
        return self._rows(_ACTIVE_OF_KEY, {"key_id": key_id})

    def history(self) -> list[KeyAction]:
        return self._rows(sa.true())

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
        t = key_actions
        with engines.write(self.store.engine, what="key actions") as conn:
            new_id = conn.execute(t.insert().values(key_id=key_id, action=action, actor=actor, reason=reason,
                                                    alert_id=alert_id, params=json.dumps(params or {}),
                                                    created_at=time.time()).returning(t.c.id)).scalar_one()
        return self._rows(t.c.id == new_id)[0]

    def restore(self, name_or_id: str, *, action: str | None = None, actor: str | None = None) -> list[KeyAction]:
        """Lift the key's active actions (all, or only ``action``); the rows stay, with who lifted them and when."""
        key = next((k for k in self.store.list() if name_or_id in (k.name, k.key_id)), None)
        if key is None:
            raise UserError(f"{name_or_id!r}: no key with this name or id in {self.store.path}")
        if action is not None and action not in SEVERITY_ORDER:
            raise UserError(f"--action {action!r}: choose one of {', '.join(SEVERITY_ORDER)}")
        acts = [a for a in self.active(key.key_id) if action is None or a.action == action]
        who = actor or f"cli:{getpass.getuser()}"
        t = key_actions
        with engines.write(self.store.engine, what="key actions") as conn:
            for a in acts:
                conn.execute(t.update().where(t.c.id == a.id).values(restored_at=time.time(), restored_by=who))
        return [self._rows(t.c.id == a.id)[0] for a in acts]


def strongest(actions: list[KeyAction]) -> str | None:
    """The most severe active action (block > labels_only > throttle), or None."""
    names = {a.action for a in actions}
    return next((n for n in reversed(SEVERITY_ORDER) if n in names), None)


def new_alert_id() -> str:
    return uuid.uuid4().hex[:16]
