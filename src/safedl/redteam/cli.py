"""``safedl redteam``: bounded black-box attacks and replays through a running ``safedl serve``, written as
Prometheus textfile metrics; exit 0 when every SLO holds, 1 when one breaks, 2 on bad input."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from safedl.errors import UserError
from safedl.redteam.budget import RunBudget
from safedl.redteam.outcome import AttackOutcome
from safedl.redteam.probes import ProbeSet, fetch_probes, load_probe_file
from safedl.deploy.release_metrics import matching_release, release_eps
from safedl.redteam.replay import replay
from safedl.redteam.runner import BLACKBOX, run_blackbox
from safedl.redteam.slo import check_slo, load_slo
from safedl.redteam.textfile import write_slis
from safedl.serve.client import ServiceClient, ServiceError

log = logging.getLogger("safedl.redteam")

ATTACKS = (*BLACKBOX, "replay")
DEFAULT_EPS = {"square": 8 / 255, "hopskipjump": 0.5}  # L-inf for square, L2 for hopskipjump


class CurrentStderr(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is when a record is written (a plain StreamHandler keeps the stream it
    was made with: a caller that swaps stderr for a buffer, e.g. a test runner, would leave it writing to a closed
    file)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def ensure_logging() -> None:
    """safedl's INFO lines (each attack's numbers) on stderr when no handler is configured yet."""
    root, pkg = logging.getLogger(), logging.getLogger("safedl")
    if not root.handlers and not pkg.handlers:
        handler = CurrentStderr()
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        pkg.addHandler(handler)
        pkg.setLevel(logging.INFO)


def read_token(path: Path, flag: str = "--key-file") -> str:
    """The API key in ``path`` (white space stripped)."""
    if not path.is_file():
        raise UserError(f"{flag} {path}: not found")
    token = path.read_text(encoding="utf-8").strip()
    if not token:
        raise UserError(f"{flag} {path}: the file is empty; put the API key (`safedl keys create`) in it")
    return token


def parse_attacks(text: str) -> list[str]:
    names = [a.strip() for a in text.split(",") if a.strip()]
    bad = [a for a in names if a not in ATTACKS]
    if bad or not names:
        raise UserError(f"--attacks {text!r}: unknown {bad or 'empty list'}; allowed: {', '.join(ATTACKS)}")
    return list(dict.fromkeys(names))


def parse_eps(text: str | None) -> dict[str, float]:
    """``--eps square=0.03,hopskipjump=0.5``."""
    out: dict[str, float] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        try:
            eps = float(value)
        except ValueError:
            eps = -1.0
        if not sep or name.strip() not in BLACKBOX or not eps > 0:
            raise UserError(f"--eps {text!r}: give attack=value pairs with value > 0 for "
                            f"{', '.join(BLACKBOX)} (e.g. square=0.03,hopskipjump=0.5)")
        out[name.strip()] = eps
    return out


def _model_info(client: ServiceClient, flag: str) -> dict:
    try:
        return client.get("/v1/model")
    except ServiceError as exc:
        raise UserError(f"{flag}: GET /v1/model refused the key: {exc}") from None


def run_redteam(*, url: str, token: str, label_token: str, attacks: list[str], n: int, budget: RunBudget,
                eps: dict[str, float], probes: ProbeSet | None, queries_per_image: int, seed: int,
                allow_remote: bool, batch: int) -> tuple[list[AttackOutcome], dict[str, float], str]:
    """The outcomes, the release's matching values (by attack) and the served bundle version."""
    scores = ServiceClient(url, token=token, allow_remote=allow_remote)
    labels = ServiceClient(url, token=label_token, allow_remote=allow_remote)
    info = _model_info(scores, "--key-file")
    if label_token != token and "hopskipjump" in attacks:
        _model_info(labels, "--label-key-file")
    manifest = info.get("manifest") or {}
    probes = (probes or fetch_probes(scores)).head(n)
    outcomes, release = [], {}
    for name in attacks:
        if name == "replay":
            outcomes += replay(scores, probes, budget=budget, batch=batch)
            continue
        e = eps.get(name) or release_eps(manifest, name) or DEFAULT_EPS[name]
        client = scores if name == "square" else labels
        outcomes.append(run_blackbox(name, client=client, x=probes.x, y=probes.y, eps=e, batch=batch,
                                     queries_per_image=queries_per_image, budget=budget,
                                     num_classes=len(info["class_names"]), seed=seed))
        value = matching_release(manifest, name, e)
        if value is not None:
            release[name] = value
    return outcomes, release, str(info.get("bundle_version", "unknown"))


def redteam_command(
        url: str = typer.Option(..., "--url", help="the service, e.g. http://127.0.0.1:8000"),
        key_file: Path = typer.Option(..., "--key-file", help="file holding a scores key (tier full or rounded)"),
        label_key_file: Optional[Path] = typer.Option(None, "--label-key-file",
                                                      help="a label-tier key for hopskipjump (default: --key-file)"),
        attacks: str = typer.Option("square,hopskipjump,replay", "--attacks", help="comma-separated: "
                                    "square, hopskipjump, replay"),
        n: int = typer.Option(200, "--n", min=1, help="probe images per attack"),
        budget_s: float = typer.Option(600.0, "--budget-s", min=1.0, help="wall-time bound of the whole run"),
        max_queries: int = typer.Option(200_000, "--max-queries", min=1, help="images sent in all, at most"),
        queries_per_image: int = typer.Option(100, "--queries-per-image", min=2, help="attack queries per probe"),
        out: Path = typer.Option(..., "--out", help="Prometheus textfile to write (atomically), e.g. slis.prom"),
        eps: Optional[str] = typer.Option(None, "--eps", help="square=0.03,hopskipjump=0.5 (default: the "
                                          "release's eps for the attack, else 8/255 and 0.5)"),
        data: Optional[Path] = typer.Option(None, "--data", help=".npz probe set (x, y; optional x_adv/y_adv, "
                                            "x_trigger/y_trigger/trigger_target); default GET /v1/admin/probes"),
        slo: Optional[Path] = typer.Option(None, "--slo", help="YAML SLO file (min_robust_accuracy, "
                                           "max_drop_from_release, max_backdoor_asr)"),
        seed: int = typer.Option(0, "--seed"),
        batch: int = typer.Option(64, "--batch", min=1, help="images per request (the service's --max-images)"),
        allow_remote: bool = typer.Option(False, "--allow-remote", help="allow a host other than loopback")) -> None:
    """Red-team a running service through HTTP; exit 1 when an SLO breaks."""
    started = time.monotonic()
    ensure_logging()
    if out.suffix != ".prom":
        raise UserError(f"--out {out}: the textfile collector reads files ending in .prom")
    names, slo_cfg, eps_map = parse_attacks(attacks), load_slo(slo), parse_eps(eps)
    token = read_token(key_file)
    label_token = read_token(label_key_file, "--label-key-file") if label_key_file else token
    probes = load_probe_file(data) if data is not None else None
    outcomes, release, version = run_redteam(
        url=url, token=token, label_token=label_token, attacks=names, n=n, eps=eps_map, probes=probes,
        budget=RunBudget(max_queries=max_queries, budget_s=budget_s), queries_per_image=queries_per_image,
        seed=seed, allow_remote=allow_remote, batch=batch)
    breaches = check_slo(slo_cfg, outcomes, release)
    write_slis(out, outcomes=outcomes, bundle_version=version, release=release, breaches=breaches, started=started)
    for o in outcomes:
        lo, hi = o.ci95
        what = "backdoor ASR" if o.kind == "backdoor" else "robust accuracy"
        log.info("%s eps=%s: %s %.4f [%.4f, %.4f] n=%d, %d queries", o.attack, o.eps, what, o.value, lo, hi, o.n,
                 o.queries)
    for b in breaches:
        log.error("SLO broken: %s", b)
    raise typer.Exit(1 if breaches else 0)
