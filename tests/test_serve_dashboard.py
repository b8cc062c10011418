"""The on-call page (/dashboard) in real headless Chromium: it loads, draws the monitor summary (alerts, charts,
top keys, flagged-input gallery) with every string as text, and shows 401/403 with no data when the key is
missing or lacks the admin scope. A screenshot is kept in $SAFEDL_TEST_ARTIFACTS."""
from __future__ import annotations

import base64
import os
import re
import sqlite3
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
import httpx  # noqa: E402
import yaml  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from _browser import chromium_or_skip  # noqa: E402
from _monitor_helpers import near_duplicates, npy, write_config  # noqa: E402
from _serve_helpers import Uvicorn, make_bundle, png_bytes  # noqa: E402
from safedl.deploy import load_bundle  # noqa: E402
from safedl.serve import create_app  # noqa: E402
from safedl.serve.audit import AuditStore  # noqa: E402
from safedl.serve.dashboard import ASSETS, CSP, dashboard_router  # noqa: E402
from safedl.serve.keys import KeyStore  # noqa: E402
from safedl.serve.monitor import DEFAULT_RULES, load_monitor_config  # noqa: E402
from safedl.serve.monitor.calibration import calibrate, quantize, save_calibration  # noqa: E402

HOSTILE = '<img src=x onerror="document.body.dataset.pwned=1">'
HOSTILE_REASON = "<script>document.body.dataset.pwned=2</script>"
FLAGS = ("prada", "stateful", "volume")


# ---- a minimal DOM from chromium's --dump-dom -----------------------------------------------------------------
class Node:
    def __init__(self, tag: str, attrs: dict, parent: "Node | None"):
        self.tag, self.attrs, self.parent, self.children, self.texts = tag, attrs, parent, [], []

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def all(self, tag: str | None = None, **attrs: str) -> list["Node"]:
        out = []
        for c in self.children:
            if isinstance(c, Node):
                if (tag is None or c.tag == tag) and all(c.attrs.get(k.replace("_", "-")) == v
                                                         for k, v in attrs.items()):
                    out.append(c)
                out.extend(c.all(tag, **attrs))
        return out

    def one(self, tag: str | None = None, **attrs: str) -> "Node":
        found = self.all(tag, **attrs)
        assert len(found) == 1, (tag, attrs, len(found))
        return found[0]


class _Tree(HTMLParser):
    VOID = {"img", "br", "input", "meta", "link", "hr", "source", "col", "wbr"}

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.root = self.cur = Node("#root", {}, None)
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: v or "" for k, v in attrs}, self.cur)
        self.cur.children.append(node)
        if tag not in self.VOID:
            self.cur = node

    def handle_endtag(self, tag):
        n = self.cur
        while n is not None and n.tag != tag:
            n = n.parent
        if n is not None and n.parent is not None:
            self.cur = n.parent

    def handle_data(self, data):
        self.cur.children.append(data)


def dom(html: str) -> Node:
    return _Tree(html).root


# ---- the browser and the server -------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def browser() -> str:
    """Session scope: a missing browser skips (or fails) before the module's service fixtures are built."""
    return chromium_or_skip()


def chromium(browser: str, url: str, profile: Path, *, screenshot: Path | None = None, budget_ms: int = 3000) -> str:
    """The DOM of ``url`` after ``budget_ms`` of virtual time (or a screenshot of it); nothing leaves loopback."""
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--window-size=1280,1700", f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}"]
    cmd += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


# ---- a summary in the contract's schema (CONTRACT.md), hostile strings included ----------------------------------
def fake_summary(digits: torch.Tensor, *, now: float) -> dict:
    """Three keys (an attacker flagged by ``stateful``, a benign one, one whose name is HTML), three alerts (firing
    critical, firing info global, resolved warning), an hour of 60 s buckets and three flagged inputs."""
    attack, benign, odd = "a1a1a1a1a1a1", "b2b2b2b2b2b2", "c3c3c3c3c3c3"
    t = [now - 3600 + 60 * i for i in range(60)]
    queries = [5 + (i % 7) + (40 if i >= 50 else 0) for i in range(60)]
    rejected = [0 if i < 50 else 3 + i % 4 for i in range(60)]
    pngs = [base64.b64encode(png_bytes(digits[i])).decode() for i in range(3)]
    return {
        "now": now, "bundle_version": "v-test",
        "alerts": [
            {"alert_id": "r1", "rule": "volume_spike", "severity": "warning", "key_id": benign, "state": "resolved",
             "started_at": now - 1800, "resolved_at": now - 1500, "value": 3.4, "events": 2, "action": None},
            {"alert_id": "f2", "rule": "global_volume", "severity": "info", "key_id": None, "state": "firing",
             "started_at": now - 300, "resolved_at": None, "value": 3.1, "events": 1, "action": None},
            {"alert_id": "f1", "rule": "query_attack", "severity": "critical", "key_id": attack, "state": "firing",
             "started_at": now - 400, "resolved_at": None, "value": 0.021, "events": 57, "action": "block"}],
        "keys": [
            {"key_id": attack, "name": "attacker", "queries": 420, "rejected": 31, "tier": "full", "action": "block",
             "flags": {"stateful": 23, "prada": None, "volume": None}},
            {"key_id": benign, "name": "benign", "queries": 300, "rejected": 2, "tier": "rounded", "action": None,
             "flags": {"stateful": None, "prada": None, "volume": None}},
            {"key_id": odd, "name": HOSTILE, "queries": 12, "rejected": 0, "tier": "label", "action": None,
             "flags": {"stateful": None, "prada": None, "volume": None}}],
        "series": {"bucket_s": 60, "t": t, "queries": queries, "rejected": rejected,
                   "flags": [int(i == 52) for i in range(60)], "alerts": [int(i == 53) for i in range(60)]},
        "flagged_inputs": [{"ts": now - 10 * i, "key_id": attack, "request_id": f"{i:032x}",
                            "reason": HOSTILE_REASON if i == 2 else "query_attack:stateful", "sha256": f"{i:064x}",
                            "png_base64": pngs[i]} for i in range(3)]}


class FakeMonitor:
    """Stands in for the service's SecurityMonitor: a fixed ``snapshot()``, calls counted."""

    def __init__(self, summary: dict):
        self.summary, self.calls = summary, 0

    def start(self) -> None: ...

    def close(self) -> None: ...

    def snapshot(self) -> dict:
        self.calls += 1
        return self.summary


def _artifacts(tmp_path: Path) -> Path:
    out = Path(os.environ.get("SAFEDL_TEST_ARTIFACTS", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    return out


def _points(d: str) -> list[tuple[float, float]]:
    return [(float(a), float(b)) for a, b in re.findall(r"[ML](-?[\d.]+) (-?[\d.]+)", d)]


# ---- the real service: keys, monitor, a scripted attack ---------------------------------------------------------
class Live:
    """The real service (create_app) on 127.0.0.1 with four keys: ``benign`` and ``attacker`` (tier full),
    ``ops`` (admin scope) and ``user`` (the default scopes, predict and model)."""

    def __init__(self, tmp: Path, bundle, *, monitor_config=None):
        self.keys = KeyStore(tmp / "keys.db", create=True)
        self.tokens = {n: self.keys.create(name=n, tier="full", rate_per_s=1e4, burst=10_000)[1]
                       for n in ("benign", "attacker")}
        self.tokens["ops"] = self.keys.create(name="ops", scopes=("admin",))[1]
        self.tokens["user"] = self.keys.create(name="user")[1]
        self.ids = {k.name: k.key_id for k in self.keys.list()}
        self.audit_db = tmp / "audit.db"
        self.app = create_app(bundle=bundle, keys=self.keys, audit=AuditStore(self.audit_db),
                              monitor_config=monitor_config)
        self.svc = self.app.state.service

    def summary_answers(self, status: int) -> int:
        """Audited answers of /v1/monitor/summary with ``status`` (every answer is audited, refusals too; a 401 has
        no valid key behind it, so it is counted in the aggregated ``unauthenticated`` table)."""
        self.svc.flush_unauthenticated()
        conn = sqlite3.connect(self.audit_db)
        if status == 401:
            (n,) = conn.execute("SELECT COALESCE(SUM(count), 0) FROM unauthenticated WHERE "
                                "endpoint='/v1/monitor/summary' AND code='unauthorized'").fetchone()
        else:
            (n,) = conn.execute("SELECT COUNT(*) FROM audit WHERE endpoint='/v1/monitor/summary' AND http_status=?",
                                (status,)).fetchone()
        conn.close()
        return n


@pytest.fixture(scope="module")
def bundle(tiny_model, digits_splits, tmp_path_factory):
    return load_bundle(make_bundle(tiny_model, digits_splits, tmp_path_factory.mktemp("dash") / "bundle"))


@pytest.fixture(scope="module")
def attacked(bundle, digits_splits, tmp_path_factory):
    """The service with the real monitor (the shipped rules; thresholds calibrated on benign streams of the digits
    training split, seed 0) after a scripted attack over HTTP: 50 rounds of one benign request of 4 distinct test
    images and 3 attacker requests of one near-duplicate each (random +-0.1 squares on one test digit, seed 0)."""
    tmp = tmp_path_factory.mktemp("dash-live")
    calib = save_calibration(calibrate(bundle, digits_splits.train.x, seed=0), tmp / "calibration.json")
    rules = yaml.safe_load(DEFAULT_RULES.read_text())["rules"]
    cfg = load_monitor_config(write_config(tmp / "monitor.yml", calibration=calib, rules=rules))
    live = Live(tmp, bundle, monitor_config=cfg)
    benign = quantize(digits_splits.test.x[:200])
    attack = near_duplicates(quantize(digits_splits.test.x[0]), 150, eps=0.1, seed=0)
    with Uvicorn(live.app) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        def post(who: str, x: torch.Tensor) -> None:
            r = http.post("/v1/predict", content=npy(x), headers={"Authorization": f"Bearer {live.tokens[who]}",
                                                                   "Content-Type": "application/x-npy"})
            assert r.status_code == 200, r.text
        for i in range(50):
            post("benign", benign[4 * i:4 * i + 4])
            for j in range(3):
                post("attacker", attack[3 * i + j:3 * i + j + 1])
        assert live.svc.monitor.flush()
        live.url = srv.url
        live.http = http
        yield live


# ---- tests -------------------------------------------------------------------------------------------------------
def test_page_and_assets_are_self_contained_and_served_with_a_strict_csp():
    app = FastAPI()
    app.include_router(dashboard_router())
    client = TestClient(app)
    for path, (_, media) in {"/dashboard" + ("/" + k if k else ""): v for k, v in ASSETS.items()}.items():
        r = client.get(path)
        assert r.status_code == 200 and r.headers["content-type"] == media, path
        assert r.headers["content-security-policy"] == CSP and r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["cache-control"] == "no-store" and r.headers["referrer-policy"] == "no-referrer"
        # no CDN, font or any other origin: the machine has no network
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|@import|url\(|fetch\(\s*["']https?:""", r.text)
    assert client.get("/dashboard/other.js").status_code == 404
    assert "script-src 'self'" in CSP and "unsafe-inline" not in CSP and "connect-src 'self'" in CSP


def test_the_static_assets_are_package_data():
    """A wheel or a fresh ``pip install`` ships what ``ASSETS`` serves (pyproject's package-data globs)."""
    import fnmatch
    import tomllib

    globs = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["safedl"]
    for file, _ in ASSETS.values():
        assert any(fnmatch.fnmatch(f"serve/static/{file}", g) for g in globs), (file, globs)


def test_dashboard_draws_alerts_charts_keys_and_gallery_with_strings_as_text(browser, tmp_path, bundle, digits_splits):
    """The real service and endpoint, a stand-in monitor whose summary has every case: alert order, an HTML key
    name and reason, three thumbnails, an hour of series."""
    summary = fake_summary(digits_splits.test.x, now=time.time())
    live = Live(tmp_path, bundle)
    live.svc.monitor = fake = FakeMonitor(summary)
    with Uvicorn(live.app) as srv:
        url = f"{srv.url}/dashboard#key={live.tokens['ops']}"
        page = dom(chromium(browser, url, tmp_path / "profile", budget_ms=12000))  # virtual time: past two refreshes
        polls = fake.calls
        shot = _artifacts(tmp_path) / "dashboard-fake-chromium.png"
        chromium(browser, url, tmp_path / "profile2", screenshot=shot)
    body = page.one("body")
    assert body.attrs["data-state"] == "ok", page.one(id="status").text()
    assert int(body.attrs["data-updates"]) == polls >= 3  # loaded, then refreshed every 5 s
    assert "pwned" not in " ".join(body.attrs)
    # alerts: firing before resolved, critical first; the global alert has no key
    alerts = [r for r in page.one("table", id="alerts").all("tr") if "data-state" in r.attrs]
    assert [(r.attrs["data-state"], r.attrs["data-severity"]) for r in alerts] == [
        ("firing", "critical"), ("firing", "info"), ("resolved", "warning")]
    assert alerts[0].attrs["data-key-id"] == "a1a1a1a1a1a1" and "attacker" in alerts[0].text()
    assert "block" in alerts[0].text() and "(global)" in alerts[1].text()
    # the HTML key name and reason are shown as text, never as elements
    odd = page.one("tr", data_key_id="c3c3c3c3c3c3")
    assert HOSTILE in odd.text() and not odd.all("img")
    assert any(HOSTILE_REASON in f.text() for f in page.one(id="gallery").all("figure"))
    assert not page.one(id="gallery").all("script") and not page.one(id="keys").all("img")
    # top keys: only the attacker is flagged, by stateful at query 23
    keys = _keys(page)
    assert {k: r.attrs["data-flagged"] for k, r in keys.items()} == {"a1a1a1a1a1a1": "1", "b2b2b2b2b2b2": "0",
                                                                      "c3c3c3c3c3c3": "0"}
    assert keys["a1a1a1a1a1a1"].one("td", data_detector="stateful").text() == "at query 23"
    assert [h.text() for h in page.one("table", id="keys").all("th")][-3:] == [f"{d} flag" for d in FLAGS]
    _check_charts(page, summary["series"])
    # gallery: one decoded thumbnail per flagged input, in the summary's order
    imgs = page.one(id="gallery").all("img")
    assert [i.attrs["src"].split(",", 1)[1] for i in imgs] == [f["png_base64"] for f in summary["flagged_inputs"]]
    assert [i.attrs.get("data-state") for i in imgs] == ["loaded"] * 3  # decoded by the browser
    assert shot.is_file() and shot.stat().st_size > 20000


def test_dashboard_shows_a_scripted_attack_seen_by_the_real_monitor(browser, attacked, tmp_path):
    live = attacked
    url = f"{live.url}/dashboard#key={live.tokens['ops']}"
    page = dom(chromium(browser, url, tmp_path / "profile"))
    shot = _artifacts(tmp_path) / "dashboard-chromium.png"
    chromium(browser, url, tmp_path / "profile2", screenshot=shot)
    api = live.http.get("/v1/monitor/summary", headers={"Authorization": f"Bearer {live.tokens['ops']}"}).json()
    assert page.one("body").attrs["data-state"] == "ok", page.one(id="status").text()
    attacker, benign = live.ids["attacker"], live.ids["benign"]
    # one firing critical query_attack alert for the attacker, none for the benign key
    rows = [r for r in page.one("table", id="alerts").all("tr") if "data-state" in r.attrs]
    mine = [r for r in rows if r.attrs["data-key-id"] == attacker and "query_attack" in r.text()]
    assert len(mine) == 1 and mine[0].attrs["data-state"] == "firing" and mine[0].attrs["data-severity"] == "critical"
    assert [r.attrs["data-alert-id"] for r in rows] == [a["alert_id"] for a in sorted(api["alerts"], key=_urgency)]
    assert not [r for r in rows if r.attrs["data-key-id"] == benign]
    # top keys: the attacker flagged by stateful at the query number the API reports, the benign key not at all
    keys = _keys(page)
    first = {k["key_id"]: k["flags"]["stateful"] for k in api["keys"]}
    assert keys[attacker].attrs["data-flagged"] == "1" and first[attacker] is not None
    assert keys[attacker].one("td", data_detector="stateful").text() == f"at query {first[attacker]}"
    assert keys[benign].attrs["data-flagged"] == "0" and "flag" not in {
        c.attrs.get("class") for c in keys[benign].all("td")}
    assert [keys[k].all("td", **{"class": "num"})[0].text() for k in (attacker, benign)] == ["150", "200"]
    # charts: 350 queries in the last hour's buckets, drawn as a path through every bucket
    charts = {s.attrs["data-chart"]: s for s in page.all("svg")}
    pts = _points(charts["volume"].one("path", data_series="queries").attrs["d"])
    assert len(pts) == len(api["series"]["t"]) == 3600 // api["series"]["bucket_s"]
    assert sum(api["series"]["queries"]) == 350
    assert min(y for _, y in pts) < max(y for _, y in pts)  # the attack's bucket stands out
    assert _points(charts["flags"].one("path", data_series="flags").attrs["d"])
    # gallery: the flagged inputs, all the attacker's, decoded
    imgs = page.one(id="gallery").all("img")
    assert len(imgs) == len(api["flagged_inputs"]) >= 1
    assert {i.attrs["data-key-id"] for i in imgs} == {attacker}
    assert all(i.attrs.get("data-state") == "loaded" for i in imgs)
    assert shot.is_file() and shot.stat().st_size > 20000


@pytest.mark.parametrize("who, status, state, words", [(None, 401, "unauthorized", "401 Unauthorized"),
                                                        ("user", 403, "forbidden", "403 Forbidden")])
def test_no_key_or_a_key_without_admin_scope_shows_the_error_and_no_data(browser, attacked, tmp_path, who, status,
                                                                          state, words):
    live = attacked
    before = live.summary_answers(status)
    url = f"{live.url}/dashboard" + (f"#key={live.tokens[who]}" if who else "")
    page = dom(chromium(browser, url, tmp_path / "profile", budget_ms=12000))
    assert page.one("body").attrs["data-state"] == state
    assert page.one(id="status").text().startswith(words)
    assert "hidden" in page.one("main").attrs
    assert not page.all("svg") and not page.one(id="gallery").all("img") and not page.one(id="keys").all("td")
    assert not page.one(id="alerts").all("td") and "attacker" not in page.one("body").text()
    assert live.summary_answers(status) == before + 1  # refused once, not retried every 5 s


def test_a_service_without_monitor_says_so(browser, tmp_path, bundle):
    live = Live(tmp_path, bundle)
    with Uvicorn(live.app) as srv:
        page = dom(chromium(browser, f"{srv.url}/dashboard#key={live.tokens['ops']}", tmp_path / "profile"))
    assert page.one("body").attrs["data-state"] == "off" and "hidden" in page.one("main").attrs
    assert "--monitor-config" in page.one(id="status").text()  # the server's reason, shown as it came
    assert live.summary_answers(404) == 1


def _urgency(alert: dict) -> tuple:
    """The page's order: firing first, then critical, warning, info, then the newest first."""
    return alert["state"] != "firing", ["critical", "warning", "info"].index(alert["severity"]), -alert["started_at"]


def _keys(page: Node) -> dict[str, Node]:
    return {r.attrs["data-key-id"]: r for r in page.one("table", id="keys").all("tr") if "data-key-id" in r.attrs}


def _check_charts(page: Node, series: dict) -> None:
    """Each series is a path through one point per bucket, its highest value highest on the chart."""
    charts = {s.attrs["data-chart"]: s for s in page.all("svg")}
    assert set(charts) == {"volume", "rate", "flags"}
    for chart, name in (("volume", "queries"), ("volume", "rejected"), ("flags", "flags")):
        pts = _points(charts[chart].one("path", data_series=name).attrs["d"])
        assert len(pts) == len(series["t"]), (chart, name)
        assert [x for x, _ in pts] == sorted(x for x, _ in pts)
        top = min(range(len(pts)), key=lambda i: pts[i][1])
        assert series[name][top] == max(series[name]), (chart, name)
        assert len({round(y, 1) for _, y in pts}) > 1  # not a flat line
    rate = _points(charts["rate"].one("path", data_series="rejection rate").attrs["d"])
    assert len(rate) == sum(q > 0 for q in series["queries"])
    assert len(charts["volume"].all("text")) >= 5 + 2  # y tick labels and time labels
