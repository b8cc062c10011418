"""The monitor's YAML configuration (``safedl serve --monitor-config FILE``), validated by pydantic.

A bad file is refused at start with one message naming the file, the key and the value (exit code 2). The
shipped default is ``default.yml`` next to this module (``safedl monitor rules`` prints it).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from safedl.errors import UserError

DEFAULT_RULES = Path(__file__).with_name("default.yml")
#: metrics a rule may watch, computed over its window (per key or over all keys)
METRICS = ("requests", "queries", "rejected", "rejection_rate", "detected", "detection_rate", "flags",
           "stateful_flags", "prada_flags", "volume_flags", "anomalous", "anomaly_rate", "copycat_flags",
           "sybil_flags", "input_drift_p", "prediction_drift_p")
#: metrics that are the p-value of the scope's latest drift test (``drift:``), not sums over the rule's window
DRIFT_METRICS = {"input_drift_p": "input", "prediction_drift_p": "prediction"}
RATES = {"rejection_rate": "rejected", "detection_rate": "detected", "anomaly_rate": "anomalous"}
ACTIONS = ("throttle", "labels_only", "block")
#: alert levels, lowest first; ``low | medium | high | critical`` grade by evidence (``bands``), the others are
#: the original fixed levels (kept so existing files stay valid)
SEVERITIES = ("info", "low", "warning", "medium", "high", "critical")
SEVERITY_RANK = {"info": 0, "low": 1, "warning": 2, "medium": 2, "high": 3, "critical": 4}
BANDS = ("low", "medium", "high", "critical")
COMPARISONS = {">": float.__gt__, ">=": float.__ge__, "<": float.__lt__, "<=": float.__le__}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Window(_Strict):
    """Exactly one of ``count`` (the scope's last N predict requests) or ``seconds`` (the last S seconds)."""

    count: Optional[int] = Field(None, ge=1, le=100_000)
    seconds: Optional[float] = Field(None, gt=0, le=86_400)

    @model_validator(mode="after")
    def _one(self) -> "Window":
        if (self.count is None) == (self.seconds is None):
            raise ValueError("give exactly one of count or seconds")
        return self


class Rule(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    metric: Literal[METRICS]  # type: ignore[valid-type]
    scope: Literal["key", "global"] = "key"
    window: Window
    comparison: Literal[">", ">=", "<", "<="] = ">="
    threshold: float
    for_s: float = Field(0.0, ge=0, description="the condition must hold this long before the alert fires")
    clear_s: float = Field(0.0, ge=0, le=86_400, description="hysteresis: the condition must stay false this long "
                           "before a firing alert resolves (one continuous attack with quiet spells is one alert)")
    severity: Literal[SEVERITIES] = "warning"  # type: ignore[valid-type]
    bands: Optional[dict[Literal[BANDS], float]] = Field(  # type: ignore[valid-type]
        None, description="severity graded from the value: the value at which each of low/medium/high/critical "
                          "starts (in the rule's comparison direction); replaces the fixed severity")
    action: Optional[Literal[ACTIONS]] = None  # type: ignore[valid-type]
    min_queries: int = Field(20, ge=0, description="a rate metric is not judged on fewer images in the window")

    @model_validator(mode="before")
    @classmethod
    def _threshold_from_bands(cls, data: Any) -> Any:
        """With ``bands`` and no ``threshold``, the alert fires where the lowest band starts."""
        if isinstance(data, dict) and data.get("threshold") is None and isinstance(data.get("bands"), dict):
            first = [data["bands"][b] for b in BANDS if b in data["bands"]] or list(data["bands"].values())
            if first:  # (an unknown band name is then the error reported, not a missing threshold)
                return {**data, "threshold": first[0]}
        return data

    @model_validator(mode="after")
    def _action_needs_key(self) -> "Rule":
        if self.action is not None and self.scope != "key":
            raise ValueError(f"action {self.action!r} needs scope 'key' (a global alert has no key to act on)")
        return self

    @model_validator(mode="after")
    def _bands_ordered(self) -> "Rule":
        if self.bands is None:
            return self
        if not self.bands:
            raise ValueError("bands: give at least one of low, medium, high, critical")
        levels = [b for b in BANDS if b in self.bands]
        values = [self.bands[b] for b in levels]
        up = self.comparison in (">", ">=")
        if values != sorted(values, reverse=not up):
            raise ValueError(f"bands must {'grow' if up else 'shrink'} from low to critical for comparison "
                             f"{self.comparison!r}; got {dict(zip(levels, values))}")
        return self

    def graded(self, value: float) -> str:
        """The alert's severity at ``value``: the highest band reached (the lowest band below the first one), or
        the fixed ``severity`` when the rule has no bands."""
        if not self.bands:
            return self.severity
        levels = [b for b in BANDS if b in self.bands]
        reached = [b for b in levels if COMPARISONS[self.comparison](float(value), float(self.bands[b]))]
        return reached[-1] if reached else levels[0]


class StatefulConfig(_Strict):
    enabled: bool = True
    k: int = Field(50, ge=1)
    history: int = Field(1000, ge=1)
    threshold: Optional[float] = Field(None, gt=0, description="overrides the calibration file")
    history_store: Literal["database", "memory"] = Field(
        "database", description="database: each key's history is shared by every worker and replica (next to a "
                                "SQLite audit file, or in the PostgreSQL audit database: serve/stores/history.py); "
                                "memory: per process only")


class PradaConfig(_Strict):
    enabled: bool = True
    min_queries: int = Field(100, ge=3)
    window: int = Field(2000, ge=3)
    max_growing: int = Field(2000, ge=1)
    delta: Optional[float] = Field(None, gt=0, lt=1, description="overrides the calibration file")
    history_store: Literal["database", "memory"] = Field(
        "memory", description="database: each key's queries and classes are shared by every worker and replica "
                              "through the stateful detector's store (every process then runs PRADA over the "
                              "key's whole stream); memory: per process only")


class VolumeConfig(_Strict):
    enabled: bool = True
    bucket_s: float = Field(60.0, gt=0)
    baseline_buckets: int = Field(60, ge=1)
    sigma: float = Field(3.0, gt=0)
    warmup_buckets: int = Field(5, ge=1)
    prior_rate: Optional[float] = Field(None, gt=0, description="queries per bucket expected of a new key")


class CopycatConfig(_Strict):
    """The per-key copycat detector (out-of-distribution share); its pixel subspace comes from the calibration."""

    enabled: bool = True
    null_rate: Optional[float] = Field(None, gt=0, lt=1, description="benign OOD share tolerated (default 2x the "
                                                                      "calibrated per-query rate)")
    alpha: float = Field(1e-4, gt=0, lt=1)
    min_queries: int = Field(50, ge=1)
    window: int = Field(1000, ge=1)


class SybilConfig(_Strict):
    """The cross-key detector: keys with weak evidence (``key_alpha``) pooled, the pool tested at ``alpha``."""

    enabled: bool = True
    null_rate: Optional[float] = Field(None, gt=0, lt=1)
    alpha: float = Field(1e-4, gt=0, lt=1)
    key_alpha: float = Field(1e-2, gt=0, lt=1)
    min_queries: int = Field(30, ge=1)
    window: int = Field(1000, ge=1)
    global_window: int = Field(2000, ge=1)


class Detectors(_Strict):
    stateful: StatefulConfig = StatefulConfig()
    prada: PradaConfig = PradaConfig()
    volume: VolumeConfig = VolumeConfig()
    copycat: CopycatConfig = CopycatConfig()
    sybil: SybilConfig = SybilConfig()


class _Delivery(_Strict):
    """What every queued sink shares: its own thread and bounded queue, a timeout per attempt, retries with
    exponential backoff (``backoff_s * 2**attempt``) on connection errors and transient answers."""

    timeout_s: float = Field(5.0, gt=0, le=60)
    retries: int = Field(3, ge=0, le=10)
    backoff_s: float = Field(0.5, ge=0, le=60)
    queue_size: int = Field(1000, ge=1)


class Webhook(_Delivery):
    """POST each notification as it is (``{"event", "alert"[, "group"]}``) to ``url``."""

    url: str = Field(pattern=r"^https?://")
    timeout_s: float = Field(2.0, gt=0, le=60)


def _one_of(obj: BaseModel, value: str, env: str) -> None:
    if (getattr(obj, value) is None) == (getattr(obj, env) is None):
        raise ValueError(f"give exactly one of {value} or {env} (the name of an environment variable holding it)")


class Slack(_Delivery):
    """A Slack incoming webhook. The URL is a secret: prefer ``url_env``."""

    url: Optional[str] = Field(None, pattern=r"^https?://")
    url_env: Optional[str] = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    channel: Optional[str] = None

    @model_validator(mode="after")
    def _url(self) -> "Slack":
        _one_of(self, "url", "url_env")
        return self


class PagerDuty(_Delivery):
    """PagerDuty Events API v2 (``dedup_key`` = the alert's fingerprint, so a re-trigger updates one incident)."""

    url: str = Field("https://events.pagerduty.com/v2/enqueue", pattern=r"^https?://")
    routing_key: Optional[str] = Field(None, min_length=1)
    routing_key_env: Optional[str] = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    source: str = Field("safedl-serve", min_length=1, description="payload.source: this service, as on-call knows it")

    @model_validator(mode="after")
    def _key(self) -> "PagerDuty":
        _one_of(self, "routing_key", "routing_key_env")
        return self


class Email(_Delivery):
    """SMTP (smtplib). The password is never in the file: ``password_env`` names the environment variable."""

    host: str = Field(min_length=1)
    port: int = Field(25, ge=1, le=65535)
    from_: str = Field(alias="from", pattern=r"^[^@\s]+@[^@\s]+$")
    to: list[str] = Field(min_length=1)
    starttls: bool = False
    username: Optional[str] = None
    password_env: Optional[str] = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    subject_prefix: str = "[safedl]"

    @field_validator("to")
    @classmethod
    def _addresses(cls, to: list[str]) -> list[str]:
        bad = [a for a in to if "@" not in a or any(c.isspace() for c in a)]
        if bad:
            raise ValueError(f"not an e-mail address: {', '.join(bad)}")
        return to

    @model_validator(mode="after")
    def _login(self) -> "Email":
        if (self.username is None) != (self.password_env is None):
            raise ValueError("username and password_env go together (the password is read from that variable)")
        return self


class Sinks(_Strict):
    log: bool = True
    jsonl: Optional[Path] = None
    webhook: Optional[Webhook] = None
    slack: Optional[Slack] = None
    pagerduty: Optional[PagerDuty] = None
    email: Optional[Email] = None


class Routing(_Strict):
    """What reaches the sinks: suppression of flapping, allow-listed keys, grouping across keys."""

    suppress_s: float = Field(300.0, ge=0, le=86_400, description="an alert that fires again this soon after it "
                              "resolved re-opens (same alert, no new notification); its resolution is announced "
                              "only once it stayed resolved this long")
    allow_keys: list[str] = Field(default_factory=list, description="key ids or names never alerted or acted on "
                                                                    "(the team's own canary and scanner keys)")
    group_s: float = Field(0.0, ge=0, le=3600, description="alerts of one rule firing on several keys within this "
                           "many seconds go out as one grouped notification (0: one per alert)")


class Drift(_Strict):
    """Windowed two-sample tests of the served traffic against the bundle's drift reference (serve/monitor/drift.py).
    Windows count images (rejected ones included), one per scope (all traffic, and each key with ``per_key``)."""

    enabled: bool = True
    window: int = Field(200, ge=20, le=10_000, description="images per test window")
    permutations: int = Field(199, ge=19, le=9_999, description="MMD permutations; p >= 1 / (permutations + 1)")
    per_key: bool = True
    max_keys: int = Field(100, ge=1, le=10_000, description="keys with an open window, at most (the least "
                                                            "recently seen one is forgotten first)")
    seed: int = Field(0, ge=0)


class Actions(_Strict):
    throttle_factor: float = Field(0.1, gt=0, lt=1, description="a throttled key keeps this share of its rate")


class MonitorConfig(_Strict):
    calibration: Optional[Path] = Field(None, description="thresholds from `safedl monitor calibrate` (relative "
                                                          "paths are relative to the config file)")
    detectors: Detectors = Detectors()
    rules: list[Rule] = Field(default_factory=list)
    sinks: Sinks = Sinks()
    actions: Actions = Actions()
    routing: Routing = Routing()
    drift: Drift = Drift()
    max_keys: int = Field(10_000, ge=1)
    misinformation: bool = Field(True, description="adaptive misinformation (Kariyappa & Qureshi 2020) on the scores "
                                 "of every key that receives scores, at the calibration file's confidence threshold")
    queue_size: int = Field(10_000, ge=1, description="predict batches waiting for the monitor worker, at most")
    queue_mb: float = Field(256.0, gt=0, description="... and at most this many MB of their pixels")
    series_bucket_s: int = Field(60, ge=1, le=3600)
    gallery_size: int = Field(32, ge=0, le=256)
    gallery_interval_s: float = Field(2.0, ge=0)
    tick_s: float = Field(1.0, gt=0, le=60)

    @field_validator("rules")
    @classmethod
    def _unique(cls, rules: list[Rule]) -> list[Rule]:
        names = [r.name for r in rules]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"rule names must be unique; repeated: {', '.join(dup)}")
        return rules


def field_path(loc: tuple) -> str:
    """A pydantic error location as the key path a user writes (``rules[2].window.count``)."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def load_monitor_config(path: str | Path) -> MonitorConfig:
    """Read and validate ``path``; raises UserError naming the file, the key and the value."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--monitor-config {path}: no such file (the shipped default is {DEFAULT_RULES})")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the top level must be a mapping (calibration, detectors, rules, sinks, ...)")
    try:
        cfg = MonitorConfig.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        value = json.dumps(err.get("input"), default=str)
        raise UserError(f"{path}: {field_path(err['loc'])} = {value[:120]}: {err['msg']}"
                        + (f" (and {len(exc.errors()) - 1} more problems)" if len(exc.errors()) > 1 else "")) from None
    updates = {}
    if cfg.calibration is not None and not cfg.calibration.is_absolute():
        updates["calibration"] = path.parent / cfg.calibration
    if cfg.sinks.jsonl is not None and not cfg.sinks.jsonl.is_absolute():
        updates["sinks"] = cfg.sinks.model_copy(update={"jsonl": path.parent / cfg.sinks.jsonl})
    return cfg.model_copy(update=updates) if updates else cfg
