"""Between the monitor's alerts and the sinks: fingerprints, suppression of flapping, grouping across keys.

- ``fingerprint(rule, key_id)``: stable across restarts and workers (sha256 of rule and scope key, 16 hex), in every
  notification; PagerDuty's ``dedup_key``.
- Suppression (``routing.suppress_s``): a resolved alert is held; if the same fingerprint fires again within the
  window the monitor re-opens that alert (``reopen``) and nobody is notified again; the resolution is announced
  only once the alert stayed resolved for the whole window (``tick``), or at shutdown.
- Grouping (``routing.group_s`` > 0): the first key alert of a rule opens a group; alerts of the same rule on other
  keys within ``group_s`` join it; when it closes, one notification lists them all (one alone goes out as usual).

The ``Router`` is driven under the monitor's lock (not thread-safe by itself); times are the monitor's clock.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable

from safedl.serve.monitor.config import SEVERITY_RANK, Routing


def fingerprint(rule: str, key_id: str | None) -> str:
    """The alert's identity: sha256 of the rule name and its scope key (``global`` for a global rule), 16 hex."""
    return hashlib.sha256(f"{rule}\x00{key_id if key_id is not None else '<global>'}".encode()).hexdigest()[:16]


@dataclass
class _Group:
    rule: str
    closes_at: float
    alerts: list[dict] = field(default_factory=list)


class Router:
    """See the module docstring. ``public`` turns a live alert dict into its notification form."""

    def __init__(self, config: Routing, *, notify: Callable[[dict[str, Any]], None],
                 public: Callable[[dict], dict]):
        self.config, self._notify, self._public = config, notify, public
        self._held: dict[str, tuple[dict, float]] = {}  # fingerprint -> (resolved alert, resolved at)
        self._groups: dict[str, _Group] = {}

    # -- firing ------------------------------------------------------------------------------------------------
    def reopen(self, fp: str, now: float) -> dict | None:
        """The alert resolved under ``fp`` less than ``suppress_s`` ago (taken off hold), else None."""
        held = self._held.pop(fp, None)
        if held is None:
            return None
        if now - held[1] < self.config.suppress_s:
            return held[0]
        self._announce_resolved(held[0])  # should have gone out at the last tick
        return None

    def fired(self, alert: dict, now: float) -> None:
        """A new alert: notify now, or add it to its rule's open group."""
        if self.config.group_s <= 0 or alert["key_id"] is None:
            self._notify({"event": "alert_fired", "alert": self._public(alert)})
            return
        group = self._groups.get(alert["rule"])
        if group is None:
            group = self._groups[alert["rule"]] = _Group(alert["rule"], now + self.config.group_s)
        group.alerts.append(alert)

    def escalated(self, alert: dict) -> None:
        """The alert's severity rose while firing (a pending group will carry the new level anyway)."""
        group = self._groups.get(alert["rule"])
        if group is not None and any(a is alert for a in group.alerts):
            return
        self._notify({"event": "alert_escalated", "alert": self._public(alert)})

    # -- resolving ---------------------------------------------------------------------------------------------
    def resolved(self, alert: dict, now: float) -> None:
        """The alert stopped holding: hold its announcement for ``suppress_s`` (0: announce now)."""
        group = self._groups.get(alert["rule"])
        if group is not None and any(a is alert for a in group.alerts):
            self._flush_group(self._groups.pop(alert["rule"]))  # it fired before it resolves
        if self.config.suppress_s <= 0:
            self._announce_resolved(alert)
        else:
            self._held[fingerprint(alert["rule"], alert["key_id"])] = (alert, now)

    def _announce_resolved(self, alert: dict) -> None:
        self._notify({"event": "alert_resolved", "alert": self._public(alert)})

    # -- time --------------------------------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Send the groups that closed and the resolutions whose suppression window passed."""
        for rule in [r for r, g in self._groups.items() if now >= g.closes_at]:
            self._flush_group(self._groups.pop(rule))
        for fp in [fp for fp, (_, at) in self._held.items() if now - at >= self.config.suppress_s]:
            self._announce_resolved(self._held.pop(fp)[0])

    def _flush_group(self, group: _Group) -> None:
        alerts = [self._public(a) for a in group.alerts]
        if len(alerts) == 1:
            self._notify({"event": "alert_fired", "alert": alerts[0]})
            return
        top = max(alerts, key=lambda a: (_rank(a["severity"]), -a["started_at"]))
        self._notify({"event": "alert_fired", "alert": top,
                      "group": {"rule": group.rule, "count": len(alerts), "keys": [a["key_id"] for a in alerts],
                                "alerts": alerts}})

    def close(self) -> None:
        """Shutdown: send every open group and every held resolution now."""
        for rule in list(self._groups):
            self._flush_group(self._groups.pop(rule))
        for fp in list(self._held):
            self._announce_resolved(self._held.pop(fp)[0])

    def held(self) -> int:
        return len(self._held)


def _rank(severity: str) -> int:
    return SEVERITY_RANK.get(severity, 0)
