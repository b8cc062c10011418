"""RunDir: the one place that knows a run directory's layout.

    RUN_DIR/
      safedl-run.json        the marker (``--resume`` adopts only folders that have one): format, data hash
      profile.yaml           the resolved profile the run used
      stages/<stage>/        one folder per stage: stage.json (content key, entry, sha256 of its files), state.pt,
                             the baseline's model.pt, defense-models/ (trained defense models, cached by key)
      stages/systems/<name>/ each evaluated evasion defense's system as a bundle (``safedl export`` reads it)
      artifacts/             figures and example images (paths in results.json are relative to RUN_DIR)
      results.json           the results contract; report.md / report.html are rendered from it alone
      gate.json, recommendations.md/.json, recommended.yaml   decision artifacts
      defended.yaml          the profile `safedl defend` writes (default)

Everything else asks a RunDir for a path instead of spelling one.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MARKER = "safedl-run.json"
MARKER_FORMAT = "safedl-run"


def attack_stage_name(attack_id: str) -> str:
    """The stage name of attack entry ``attack_id`` (its folder under ``stages/``)."""
    return f"attack-{attack_id}"


def defense_stage_name(defense_key: str, attack_id: str) -> str:
    """The stage name of defense entry ``defense_key`` evaluated against attack ``attack_id``."""
    return f"defense-{defense_key}-vs-{attack_id}"


def suite_stage_name(defense_key: str, attack_id: str, shard: int, shards: int) -> str:
    """The stage name of shard ``shard`` of ``shards`` of the strong adaptive suite of a defense stage."""
    return f"suite-{defense_key}-vs-{attack_id}-{shard + 1}of{shards}"


class RunDir:
    """The layout of one run directory (paths only; nothing is created until a ``*_dir`` method is called)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    # -- top-level files ---------------------------------------------------------------------------------
    @property
    def marker(self) -> Path:
        return self.path / MARKER

    @property
    def profile(self) -> Path:
        return self.path / "profile.yaml"

    @property
    def results(self) -> Path:
        return self.path / "results.json"

    @property
    def report_md(self) -> Path:
        return self.path / "report.md"

    @property
    def report_html(self) -> Path:
        return self.path / "report.html"

    @property
    def gate(self) -> Path:
        return self.path / "gate.json"

    @property
    def recommendations_md(self) -> Path:
        return self.path / "recommendations.md"

    @property
    def recommendations_json(self) -> Path:
        return self.path / "recommendations.json"

    @property
    def recommended_profile(self) -> Path:
        return self.path / "recommended.yaml"

    @property
    def defended_profile(self) -> Path:
        """The profile ``safedl defend`` writes by default."""
        return self.path / "defended.yaml"

    # -- stages ------------------------------------------------------------------------------------------
    @property
    def stages(self) -> Path:
        return self.path / "stages"

    def stage(self, name: str) -> Path:
        """``stages/<name>`` (not created)."""
        return self.stages / name

    def stage_record(self, name: str) -> Path:
        """The stage's ``stage.json``: written last, it marks the stage done."""
        return self.stage(name) / "stage.json"

    def stage_state(self, name: str) -> Path:
        return self.stage(name) / "state.pt"

    @property
    def baseline_model(self) -> Path:
        return self.stage("baseline") / "model.pt"

    def stage_dir(self, *parts: str) -> Path:
        """``stages/<parts...>``, created."""
        p = self.stages.joinpath(*parts)
        p.mkdir(parents=True, exist_ok=True)
        return p

    def defense_model_dir(self, name: str) -> Path:
        """Where a defense's trained model is cached (``name``: component and content key), created."""
        return self.stage_dir("defense-models", name)

    def system(self, name: str) -> Path:
        """``stages/systems/<name>``: one evaluated defense's system as a bundle (not created)."""
        return self.stages / "systems" / name.replace("/", "_")

    # -- artifacts ---------------------------------------------------------------------------------------
    @property
    def artifacts(self) -> Path:
        return self.path / "artifacts"

    def artifact_dir(self, *parts: str) -> Path:
        """``artifacts/<parts...>``, created: figures and example images."""
        p = self.artifacts.joinpath(*parts)
        p.mkdir(parents=True, exist_ok=True)
        return p

    @property
    def figures(self) -> Path:
        """``artifacts/figures`` (not created): the report's summary figures."""
        return self.artifacts / "figures"

    def rel(self, path: str | Path) -> str:
        """``path`` relative to the run directory (how results.json names files)."""
        return str(Path(path).relative_to(self.path))

    # -- the marker ----------------------------------------------------------------------------------------
    def read_marker(self) -> dict[str, Any] | None:
        """The marker's content, or None when there is none or it cannot be read."""
        try:
            blob = json.loads(self.marker.read_text())
        except (ValueError, OSError):
            return None
        return blob if isinstance(blob, dict) else None

    def is_run(self) -> bool:
        """A folder safedl made: it holds the run marker (or, from older versions, a stage record or results.json)."""
        if self.marker.is_file():
            blob = self.read_marker()
            return blob is not None and blob.get("format") == MARKER_FORMAT
        return self.profile.is_file() and (self.stage_record("baseline").is_file() or self.results.is_file())
