"""The on-call page (/dashboard) in real headless Chromium: it loads, draws the monitor summary (alerts, charts,
top keys, flagged-input gallery) with every string as text, and shows 401/403 with no data when the key is
missing or lacks the admin scope. A screenshot is kept in $SAFEDL_TEST_ARTIFACTS."""
from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import threading
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from _serve_helpers import free_port, png_bytes  # noqa: E402
from safedl.serve.dashboard import ASSETS, CSP, dashboard_router  # noqa: E402

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
                if (tag is None or c.tag == tag) and all(c.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items()):
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
def _chromium() -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed but CI is set: install Debian's chromium (.ci/run does)")
        pytest.skip("headless check needs Debian's chromium (apt-get install -y chromium); CI=1 makes this a failure")
    return browser


def chromium(url: str, profile: Path, *, screenshot: Path | None = None, budget_ms: int = 3000) -> str:
    """The DOM of ``url`` after ``budget_ms`` of virtual time (or a screenshot of it); nothing leaves loopback."""
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--window-size=1280,1700", f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}"]
    cmd += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


class Uvicorn:
    """``app`` served by uvicorn in a thread on 127.0.0.1 and a free port (lifespan included); stopped on exit."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "Uvicorn":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


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
                   "flags": [1 if i == 52 else 0 for i in range(60)], "alerts": [1 if i == 53 else 0 for i in range(60)]},
        "flagged_inputs": [{"ts": now - 10 * i, "key_id": attack, "request_id": f"{i:032x}",
                            "reason": HOSTILE_REASON if i == 2 else "query_attack:stateful", "sha256": f"{i:064x}",
                            "png_base64": pngs[i]} for i in range(3)]}


def fake_service(summary: dict, tokens: dict[str, bool]) -> FastAPI:
    """The dashboard's routes plus a stand-in for ``GET /v1/monitor/summary`` with the contract's auth answers
    (``tokens``: token -> has the admin scope)."""
    app = FastAPI()
    app.include_router(dashboard_router())
    app.state.summary_calls = 0

    @app.get("/v1/monitor/summary")
    async def summary_route(request: Request):
        app.state.summary_calls += 1
        auth = request.headers.get("authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else None
        if token not in tokens:
            return JSONResponse({"error": {"code": "unauthorized", "message": "missing, unknown or revoked API key"}},
                                status_code=401)
        if not tokens[token]:
            return JSONResponse({"error": {"code": "forbidden", "message": "this key's scopes (predict, model) do "
                                           "not include 'admin'"}}, status_code=403)
        return summary

    return app


def _artifacts(tmp_path: Path) -> Path:
    out = Path(os.environ.get("SAFEDL_TEST_ARTIFACTS", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    return out


def _points(d: str) -> list[tuple[float, float]]:
    return [(float(a), float(b)) for a, b in re.findall(r"[ML](-?[\d.]+) (-?[\d.]+)", d)]


# ---- tests -------------------------------------------------------------------------------------------------------
def test_page_and_assets_are_packaged_self_contained_and_served_with_a_strict_csp():
    client = TestClient(fake_service({}, {}))
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


def test_dashboard_draws_alerts_charts_keys_and_gallery_with_strings_as_text(tmp_path, digits_splits):
    summary = fake_summary(digits_splits.test.x, now=time.time())
    app = fake_service(summary, {"sdl_admin": True})
    with Uvicorn(app) as srv:
        url = f"{srv.url}/dashboard#key=sdl_admin"
        page = dom(chromium(url, tmp_path / "profile", budget_ms=12000))  # virtual time: past two refreshes
        polls = app.state.summary_calls
        shot = _artifacts(tmp_path) / "dashboard-fake-chromium.png"
        chromium(url, tmp_path / "profile2", screenshot=shot)
    body = page.one("body")
    assert body.attrs["data-state"] == "ok", page.one(id="status").text()
    assert int(body.attrs["data-updates"]) == polls >= 3  # loaded, then refreshed every 5 s
    assert "pwned" not in " ".join(body.attrs)
    # alerts: firing before resolved, critical first; the global alert has no key
    rows = page.one("table", id="alerts").all("tr", **{"data_state": "firing"})
    order = [(r.attrs["data-state"], r.attrs["data-severity"]) for r in page.one("table", id="alerts").all("tr")
             if "data-state" in r.attrs]
    assert order == [("firing", "critical"), ("firing", "info"), ("resolved", "warning")]
    assert rows[0].attrs["data-key-id"] == "a1a1a1a1a1a1" and "attacker" in rows[0].text() and "block" in rows[0].text()
    # the HTML key name and reason are shown as text, never as elements
    odd = page.one("tr", data_key_id="c3c3c3c3c3c3")
    assert HOSTILE in odd.text() and not odd.all("img")
    assert any(HOSTILE_REASON in f.text() for f in page.one(id="gallery").all("figure"))
    assert not page.one(id="gallery").all("script") and not page.one(id="keys").all("img")
    # top keys: only the attacker is flagged, by stateful at query 23
    keys = {r.attrs["data-key-id"]: r for r in page.one("table", id="keys").all("tr") if "data-key-id" in r.attrs}
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


@pytest.mark.parametrize("token, status, words", [(None, "unauthorized", "401"), ("sdl_user", "forbidden", "403")])
def test_no_key_or_a_key_without_admin_scope_shows_the_error_and_no_data(tmp_path, digits_splits, token, status,
                                                                          words):
    summary = fake_summary(digits_splits.test.x, now=time.time())
    app = fake_service(summary, {"sdl_admin": True, "sdl_user": False})
    with Uvicorn(app) as srv:
        page = dom(chromium(f"{srv.url}/dashboard" + (f"#key={token}" if token else ""), tmp_path / "profile",
                            budget_ms=12000))
    assert page.one("body").attrs["data-state"] == status
    assert app.state.summary_calls == 1  # a refused key is not retried every 5 s (a new key from the form is)
    assert page.one(id="status").text().startswith(words)
    assert "hidden" in page.one("main").attrs
    assert not page.all("svg") and not page.one(id="gallery").all("img") and not page.one(id="keys").all("td")
    assert not page.one(id="alerts").all("td") and "attacker" not in page.one("body").text()
