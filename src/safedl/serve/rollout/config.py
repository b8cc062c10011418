"""``rollout.yaml``: how a canary is promoted or rolled back (pydantic-validated; a bad file is one UserError
naming the file, the key and the value, exit 2). ``safedl rollout rules`` prints :data:`DEFAULT_RULES`, which apply
when ``safedl serve --canary`` is given without ``--rollout FILE``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from safedl.errors import UserError

DEFAULT_RULES = """\
# safedl rollout rules (`safedl serve STABLE --canary NEW --rollout rollout.yaml`)
steps: [5, 25, 50, 100]      # percent of keys on the canary, one step per interval (--canary-fraction: the first)
interval_s: 60               # seconds between decisions; the probe set runs through both versions at each
max_holds: 10                # non_inferiority: evaluations in a row a step may hold on too little evidence,
                             # then the canary is rolled back ("insufficient evidence")
checks:
  confidence: 0.95           # one-sided bound of each paired canary - stable difference
  mode: evidence             # evidence: fail when the bound nearest to passing is past the limit (the data show a
                             # breach); non_inferiority: pass only when the far bound is within it, fail when the
                             # near one is past it, else hold at the current step (insufficient evidence)
  min_probes: 200            # fewer probe images than this: the checks run on all there are, and say so
  latency_p99_ratio: 1.5     # canary p99 <= 1.5 x stable p99 (probe runs, one image per call, interleaved)
  latency_slack_s: 0.005     # ... or within this many seconds of it (sub-millisecond models: timer noise)
  error_rate: 0.01           # canary 5xx share of its requests (traffic and probe runs)
  clean_accuracy_drop: 0.02  # stable - canary accuracy on the clean probes
  robust_accuracy_drop: 0.02 # stable - canary robust accuracy on the adversarial probes (rejected counts robust)
  backdoor_asr_increase: 0.05 # canary - stable attack success on the triggered probes
  disagreement: 0.10         # share of clean probes the canary labels differently from stable
  live_robust_accuracy_drop: 0.02 # stable - canary robust accuracy under the live attack below
live_attack:                 # a bounded Square attack (L-inf) on each version's full pipeline, in process
  n: 50                      # clean probes attacked (a fixed seeded subset; 0: no live attack)
  queries_per_image: 100     # the attack's queries per image, per version, per evaluation
  eps: null                  # null: the eps the bundle's manifest measured square at (else 8/255)
  seed: 0                    # the subset and the attack's random squares
"""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Checks(_Strict):
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    mode: Literal["evidence", "non_inferiority"] = "evidence"
    min_probes: int = Field(200, ge=1)
    latency_p99_ratio: float = Field(1.5, ge=1.0)
    latency_slack_s: float = Field(0.005, ge=0.0)
    error_rate: float = Field(0.01, ge=0.0, le=1.0)
    clean_accuracy_drop: float = Field(0.02, ge=0.0, le=1.0)
    robust_accuracy_drop: float = Field(0.02, ge=0.0, le=1.0)
    backdoor_asr_increase: float = Field(0.05, ge=0.0, le=1.0)
    disagreement: float = Field(0.10, ge=0.0, le=1.0)
    live_robust_accuracy_drop: float = Field(0.02, ge=0.0, le=1.0)


class LiveAttack(_Strict):
    n: int = Field(50, ge=0, le=10_000)
    queries_per_image: int = Field(100, ge=2, le=10_000)
    eps: float | None = Field(None, gt=0.0, le=1.0)
    seed: int = Field(0, ge=0)


class RolloutConfig(_Strict):
    steps: list[float] = Field(default_factory=lambda: [5.0, 25.0, 50.0, 100.0], min_length=1)
    interval_s: float = Field(60.0, gt=0.0, le=86400.0)
    max_holds: int = Field(10, ge=0, le=10_000)
    checks: Checks = Field(default_factory=Checks)
    live_attack: LiveAttack = Field(default_factory=LiveAttack)

    @field_validator("steps")
    @classmethod
    def _increasing_to_100(cls, v: list[float]) -> list[float]:
        if any(not 0 < s <= 100 for s in v) or any(b <= a for a, b in zip(v, v[1:])) or v[-1] != 100:
            raise ValueError("steps must be percentages in (0, 100], strictly increasing, ending at 100")
        return v

    def with_first_step(self, fraction: float | None) -> "RolloutConfig":
        """``--canary-fraction``: the first step (a fraction in (0, 1]); the later steps above it are kept."""
        if fraction is None:
            return self
        if not 0 < fraction <= 1:
            raise UserError(f"--canary-fraction {fraction}: must be in (0, 1] (0.1 = 10% of keys)")
        first = round(float(fraction) * 100, 6)
        return self.model_copy(update={"steps": [first] + [s for s in self.steps if s > first]})


def _where(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def parse_rollout(text: str, *, where: str) -> RolloutConfig:
    """Validate rollout rules from YAML text; UserError naming ``where``, the key and the value."""
    import yaml

    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(f"{where}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{where}: the top level must be a mapping (steps, interval_s, checks, live_attack)")
    try:
        return RolloutConfig.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        value = json.dumps(err.get("input"), default=str)[:120]
        raise UserError(f"{where}: {_where(err['loc'])} = {value}: {err['msg']}") from None


def load_rollout(path: str | Path | None) -> RolloutConfig:
    """``--rollout FILE`` validated; the default rules when None."""
    if path is None:
        return parse_rollout(DEFAULT_RULES, where="(default rules)")
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--rollout {path}: no such file (`safedl rollout rules` prints the default)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--rollout {path}: cannot read it ({exc})") from None
    return parse_rollout(text, where=str(path))
