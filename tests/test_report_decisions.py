"""Report additions: the Pareto trade-off figure, the risk drivers, and the HTML report in real headless Chromium."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from _browser import chromium_or_skip
from safedl.decide.risk import assess_risk
from safedl.profile import Profile
from safedl.report.render import write_reports
from safedl.report.tradeoff import tradeoff_points
from safedl.utils.stats import proportion, scalar

ROOT = Path(__file__).resolve().parents[1]


def _defense(did, clean, robust, latency, kind="preprocessor"):
    return {"id": did, "name": did, "kind": kind, "against": "pgd",
            "metrics": {"clean_accuracy": proportion(clean, 200), "robust_accuracy": proportion(robust, 200),
                        "latency_added_ms_per_image": scalar(latency, n=200)}}


def _results():
    prof = Profile().model_dump(mode="json")
    attacks = [{"id": "pgd", "name": "pgd", "category": "evasion", "access": "white-box", "params": {"eps": 0.3},
                "metrics": {"clean_accuracy": proportion(190, 200), "robust_accuracy": proportion(2, 200),
                            "attack_success_rate": proportion(188, 190)}},
               {"id": "static_patch", "name": "static_patch", "category": "backdoor", "params": {},
                "metrics": {"attack_success_rate": proportion(180, 180), "clean_accuracy": proportion(189, 200),
                            "baseline": {"clean_accuracy": proportion(190, 200),
                                         "attack_success_rate": proportion(2, 180)}}}]
    defenses = [_defense("squeeze", 186, 150, 0.4), _defense("at", 180, 170, 0.0, kind="trainer"),
                _defense("dominated", 170, 100, 2.0), _defense("squeeze+at", 178, 175, 0.5, kind="pipeline"),
                {"id": "ss", "name": "spectral_signatures", "kind": "cleanser", "against": "static_patch",
                 "metrics": {"attack_success_rate_after": proportion(1, 180), "clean_accuracy_after": proportion(190, 200)}}]
    tm = Profile().threat_model
    results = {"schema_version": 1, "run_id": "r1", "created": "2026-11-30", "profile": prof,
               "environment": {"seed": 0}, "data": {"name": "digits", "shape": [1, 8, 8], "num_classes": 10,
                                                    "sizes": {"train": 1, "val": 1, "test": 200}},
               "baseline": {"metrics": {"clean_accuracy": proportion(190, 200)}, "time_s": 1.0},
               "attacks": attacks, "defenses": defenses}
    results["risk"] = assess_risk(tm, attacks, defenses, baseline_accuracy=0.95)
    results["gate"] = {"passed": True, "failures": [], "compared": "value"}
    return results


def test_pareto_front_marks_the_undominated_defenses_and_layered_ones():
    pts = {p["label"]: p for p in tradeoff_points(_results(), "pgd")}
    assert {k for k, p in pts.items() if p["pareto"]} == {"no defense", "squeeze", "at", "squeeze+at"}
    assert not pts["dominated"]["pareto"] and pts["squeeze+at"]["layered"] and not pts["at"]["layered"]


def test_report_shows_the_tradeoff_figure_and_what_drives_each_rating(tmp_path):
    write_reports(_results(), tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert (tmp_path / "artifacts/figures/tradeoff_pgd.png").stat().st_size > 5000
    assert "Pareto-optimal: no defense, squeeze, at, squeeze+at" in md
    assert "driven by" in md and "1 - robust_accuracy = 0.9900" in md and "with squeeze+at = 0.1250" in md


CHECK = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src'));
  const width = document.documentElement.clientWidth;
  const wide = [...document.querySelectorAll('table')].filter(t => t.getBoundingClientRect().right > width + 1).length;
  const pre = document.createElement('pre'); pre.id = 'safedl-check';
  pre.textContent = `IMAGES=${imgs.length} BROKEN=${JSON.stringify(broken)} TABLES=${document.querySelectorAll('table').length} OVERFLOW=${wide}`;
  document.body.appendChild(pre);
});
</script>"""


@pytest.mark.browser
def test_html_report_in_headless_chromium(tmp_path):
    browser = chromium_or_skip()
    write_reports(_results(), tmp_path)
    html = (tmp_path / "report.html").read_text()
    links = re.findall(r'(?:src|href)="([^"#]+)"', html)
    assert links and all((tmp_path / link).is_file() for link in links if "://" not in link)  # no broken links
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", CHECK + "</body>"))
    base = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
            "--window-size=1280,2000", "--virtual-time-budget=5000", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(base + ["--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
    m = re.search(r"IMAGES=(\d+) BROKEN=(\[.*?\]) TABLES=(\d+) OVERFLOW=(\d+)", dom)
    assert m, dom[-2000:]
    assert int(m.group(1)) == html.count("<img") >= 2 and m.group(2) == "[]"  # every figure loaded
    assert int(m.group(3)) >= 4 and m.group(4) == "0", m.group(0)             # every table fits the page
    shots = Path(os.environ.get("SAFEDL_TEST_ARTIFACTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    shot = shots / "report-chromium.png"
    subprocess.run(base + [f"--screenshot={shot}", (tmp_path / "report.html").as_uri()], capture_output=True,
                   timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10000
