"""The monitor's YAML configuration (``safedl serve --monitor-config FILE``), validated by pydantic.

A bad file is refused at start with one message naming the file, the key and the value (exit code 2). The
shipped default is ``default.yml`` next to this module (``safedl monitor rules`` prints it).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from safedl.errors import UserError

DEFAULT_RULES = Path(__file__).with_name("default.yml")
#: metrics a rule may watch, computed over its window (per key or over all keys)
METRICS = ("requests", "queries", "rejected", "rejection_rate", "detected", "detection_rate", "flags",
           "stateful_flags", "prada_flags", "volume_flags", "anomalous", "anomaly_rate")
RATES = {"rejection_rate": "rejected", "detection_rate": "detected", "anomaly_rate": "anomalous"}
ACTIONS = ("throttle", "labels_only", "block")
SEVERITIES = ("info", "warning", "critical")
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
    severity: Literal[SEVERITIES] = "warning"  # type: ignore[valid-type]
    action: Optional[Literal[ACTIONS]] = None  # type: ignore[valid-type]
    min_queries: int = Field(20, ge=0, description="a rate metric is not judged on fewer images in the window")

    @model_validator(mode="after")
    def _action_needs_key(self) -> "Rule":
        if self.action is not None and self.scope != "key":
            raise ValueError(f"action {self.action!r} needs scope 'key' (a global alert has no key to act on)")
        return self


class StatefulConfig(_Strict):
    enabled: bool = True
    k: int = Field(50, ge=1)
    history: int = Field(1000, ge=1)
    threshold: Optional[float] = Field(None, gt=0, description="overrides the calibration file")


class PradaConfig(_Strict):
    enabled: bool = True
    min_queries: int = Field(100, ge=3)
    window: int = Field(2000, ge=3)
    max_growing: int = Field(2000, ge=1)
    delta: Optional[float] = Field(None, gt=0, lt=1, description="overrides the calibration file")


class VolumeConfig(_Strict):
    enabled: bool = True
    bucket_s: float = Field(60.0, gt=0)
    baseline_buckets: int = Field(60, ge=1)
    sigma: float = Field(3.0, gt=0)
    warmup_buckets: int = Field(5, ge=1)
    prior_rate: Optional[float] = Field(None, gt=0, description="queries per bucket expected of a new key")


class Detectors(_Strict):
    stateful: StatefulConfig = StatefulConfig()
    prada: PradaConfig = PradaConfig()
    volume: VolumeConfig = VolumeConfig()


class Webhook(_Strict):
    url: str = Field(pattern=r"^https?://")
    timeout_s: float = Field(2.0, gt=0, le=60)
    retries: int = Field(3, ge=0, le=10)
    backoff_s: float = Field(0.5, ge=0, le=60)
    queue_size: int = Field(1000, ge=1)


class Sinks(_Strict):
    log: bool = True
    jsonl: Optional[Path] = None
    webhook: Optional[Webhook] = None


class Actions(_Strict):
    throttle_factor: float = Field(0.1, gt=0, lt=1, description="a throttled key keeps this share of its rate")


class MonitorConfig(_Strict):
    calibration: Optional[Path] = Field(None, description="thresholds from `safedl monitor calibrate` (relative "
                                                          "paths are relative to the config file)")
    detectors: Detectors = Detectors()
    rules: list[Rule] = Field(default_factory=list)
    sinks: Sinks = Sinks()
    actions: Actions = Actions()
    max_keys: int = Field(10_000, ge=1)
    queue_size: int = Field(10_000, ge=1)
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


def _where(loc: tuple) -> str:
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
        raise UserError(f"{path}: {_where(err['loc'])} = {value[:120]}: {err['msg']}"
                        + (f" (and {len(exc.errors()) - 1} more problems)" if len(exc.errors()) > 1 else "")) from None
    updates = {}
    if cfg.calibration is not None and not cfg.calibration.is_absolute():
        updates["calibration"] = path.parent / cfg.calibration
    if cfg.sinks.jsonl is not None and not cfg.sinks.jsonl.is_absolute():
        updates["sinks"] = cfg.sinks.model_copy(update={"jsonl": path.parent / cfg.sinks.jsonl})
    return cfg.model_copy(update=updates) if updates else cfg
