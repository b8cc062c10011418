"""`safedl serve --workers 2` as real processes on 127.0.0.1 (serve/workers.py): both workers answer; rate limits
and quotas stay exact across them (shared key database); any worker's /metrics counts every worker's requests and
exports every metric the rules and dashboards query; kill -9 of a worker: restarted, the service keeps answering,
every 200 has its audit row; SIGHUP reloads every worker; SIGTERM stops them all and exits by the signal. Which
worker answered is read from the server's JSON log lines (``pid`` on every worker line), not from the response."""
from __future__ import annotations

import os
import pickle
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from typer.testing import CliRunner  # noqa: E402

from _serve_helpers import ServerProcess, audit_rows, make_bundle, png_bytes, quantized  # noqa: E402
from safedl.cli import app as cli  # noqa: E402
from safedl.deploy import load_bundle  # noqa: E402
from safedl.errors import UserError  # noqa: E402
from safedl.serve.keys import KeyStore  # noqa: E402
from safedl.serve.options import ServeOptions  # noqa: E402
from safedl.serve.workers import RestartBudget  # noqa: E402
from test_deploy_monitoring import assert_rules_and_dashboards_find, exposition_names, monitor_settings  # noqa: E402
from test_serve_swap import DEFENDED, _reexport  # noqa: E402

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")


@pytest.fixture(scope="module")
def setup(tiny_model, digits_splits, eval_batch, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("workers")
    plain = make_bundle(tiny_model, digits_splits, tmp / "plain")
    a = _reexport(plain, tmp / "a", metrics=DEFENDED, run={"defense": "feature_squeezing"})
    b = _reexport(plain, tmp / "b")  # the same system, other manifest metrics: another version
    keys = KeyStore(tmp / "k.db", create=True)
    tokens = {"ops": keys.create(name="ops", tier="full", scopes=("predict", "model", "admin"), rate_per_s=10_000,
                                 burst=10_000)[1],
              "quota3": keys.create(name="quota3", rate_per_s=10_000, burst=10_000, daily_quota=3)[1]}
    for i in range(3):  # burst 5, (almost) no refill during the test
        tokens[f"burst5_{i}"] = keys.create(name=f"burst5_{i}", rate_per_s=0.001, burst=5)[1]
    keys.close()
    monitor = tmp / "monitor.yml"
    monitor.write_text(yaml.safe_dump(monitor_settings()))
    imgs = [png_bytes(quantized(eval_batch[0])[i]) for i in range(8)]
    return {"tmp": tmp, "a": a, "b": b, "va": load_bundle(a).version, "vb": load_bundle(b).version,
            "keys": tmp / "k.db", "tokens": tokens, "monitor": monitor, "imgs": imgs}


# -- helpers ---------------------------------------------------------------------------------------------------
def _records(srv: ServerProcess) -> list[dict]:
    return srv.log_records()


def _wait(predicate, timeout: float = 90.0, every: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False


def _serving(srv: ServerProcess) -> dict[int, int]:
    """Worker index -> pid of the workers that serve now (the supervisor's latest worker_ready of each slot)."""
    out = {}
    for rec in _records(srv):
        if rec.get("role") == "supervisor" and rec.get("event") == "worker_ready":
            out[rec["worker"]] = rec["worker_pid"]
    return out


def _answered_by(srv: ServerProcess, request_ids) -> dict[str, int]:
    """Request id -> pid of the worker that logged it."""
    wanted = set(request_ids)
    return {r["request_id"]: r["pid"] for r in _records(srv)
            if r.get("event") == "request" and r.get("request_id") in wanted}


def _post(url: str, token: str, img: bytes, client=None) -> httpx.Response:
    return (client or httpx).post(url + "/v1/predict", content=img, timeout=30,
                                  headers={"X-API-Key": token, "Content-Type": "image/png"})


def _concurrent(url: str, token: str, imgs: list[bytes], n: int) -> list[tuple[int, str]]:
    """``n`` requests at once, each on its own connection: (status, request id) each."""
    barrier, out = threading.Barrier(n), [None] * n

    def one(i: int) -> None:
        with httpx.Client(timeout=30) as c:
            barrier.wait(20)
            r = _post(url, token, imgs[i % len(imgs)], c)
            out[i] = (r.status_code, r.headers.get("x-request-id"))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def _metric(text: str, line_start: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start + " "))


def _load(url, token, imgs, stop, answered, errors, lock, n_max=300):
    """Requests on fresh connections until ``stop``: (time, status, request id, version) each; errors counted."""
    for i in range(n_max):
        if stop.is_set():
            return
        try:
            r = _post(url, token, imgs[i % len(imgs)])
        except httpx.HTTPError:
            with lock:
                errors.append(time.monotonic())
            time.sleep(0.05)
            continue
        with lock:
            answered.append((time.monotonic(), r.status_code, r.headers.get("x-request-id"),
                             r.json().get("bundle_version") if r.status_code == 200 else None))


# -- without a server -------------------------------------------------------------------------------------------
def test_workers_option_is_validated_and_the_options_travel_by_pickle(tmp_path):
    for bad in (0, 65, -1, True):
        with pytest.raises(UserError, match="--workers"):
            ServeOptions(bundle_path=tmp_path, keys_db=tmp_path / "k.db", workers=bad)
    res = CliRunner().invoke(cli, ["serve", str(tmp_path), "--keys", str(tmp_path / "k.db"), "--workers", "0"])
    assert res.exit_code == 2 and "--workers 0" in res.output
    opts = ServeOptions(bundle_path=tmp_path, keys_db=tmp_path / "k.db", workers=4, signing_key=b"s3cret-key")
    assert pickle.loads(pickle.dumps(opts)) == opts  # spawn: the start pipe carries it, not argv or environ
    assert "s3cret" not in repr(opts)


def test_restart_budget_allows_a_few_restarts_a_minute():
    now = [100.0]
    budget = RestartBudget(limit=2, window_s=60.0, clock=lambda: now[0])
    assert budget.try_spend() is None and budget.try_spend() is None
    assert budget.try_spend() == 160.0  # the third waits for the first to leave the window
    now[0] = 160.0
    assert budget.try_spend() is None


def test_a_bundle_that_fails_verification_stops_the_start_once_with_exit_2(setup, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(setup["a"], bad)
    weights = bad / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with ServerProcess(bad, setup["keys"], tmp_path / "a.db", "--workers", "2") as srv:
        assert srv.proc.wait(120) == 2
        err = srv.log_text()
    assert err.count("error: ") == 1 and "model.safetensors" in err  # worker 0 said it; worker 1 never started
    assert not (tmp_path / "a.db").exists()


# -- two workers ------------------------------------------------------------------------------------------------
def test_two_workers_share_limits_quotas_audit_and_metrics(setup, tmp_path):
    tok, imgs, audit = setup["tokens"], setup["imgs"], tmp_path / "audit.db"
    ok, refused = [], []
    with ServerProcess(setup["a"], setup["keys"], audit, "--workers", "2", "--monitor-config",
                       str(setup["monitor"])) as srv:
        srv.wait_ready()
        assert _wait(lambda: len(_serving(srv)) == 2), srv.log_text()[-3000:]
        pids = set(_serving(srv).values())
        for i in range(200):  # fresh connections until both workers have answered (the kernel picks one each)
            r = _post(srv.url, tok["ops"], imgs[i % len(imgs)])
            assert r.status_code == 200
            ok.append(r.headers["x-request-id"])
            if i % 10 == 9 and set(_answered_by(srv, ok).values()) == pids:
                break
        assert set(_answered_by(srv, ok).values()) == pids

        split = False
        for i in range(3):  # burst 5 across both workers: exactly 5 of 20 concurrent requests get through
            out = _concurrent(srv.url, tok[f"burst5_{i}"], imgs, 20)
            assert sorted(s for s, _ in out) == [200] * 5 + [429] * 15
            ok += [rid for s, rid in out if s == 200]
            refused += [rid for s, rid in out if s == 429]
            split = split or len(set(_answered_by(srv, [rid for _, rid in out]).values())) == 2
            if split:
                break
        assert split, "no trial spread its 20 requests over both workers"
        out = _concurrent(srv.url, tok["quota3"], imgs, 10)  # a daily quota of 3 images, across both workers
        assert sorted(s for s, _ in out) == [200] * 3 + [429] * 7
        ok += [rid for s, rid in out if s == 200]
        refused += [rid for s, rid in out if s == 429]

        r = httpx.post(srv.url + "/v1/admin/bundle", json={"path": str(setup["b"])}, timeout=30,
                       headers={"X-API-Key": tok["ops"]})  # it would swap one worker: SIGHUP swaps them all
        assert r.status_code == 409 and r.json()["error"]["code"] == "swap_needs_sighup", r.text
        scrapes, by = [], {}
        for _ in range(30):  # /metrics of either worker counts both workers' requests
            r = httpx.get(srv.url + "/metrics", headers={"X-API-Key": tok["ops"]}, timeout=30)
            assert r.status_code == 200
            scrapes.append(r.text)
            by[r.headers["x-request-id"]] = r.text
            if len(set(_answered_by(srv, by).values())) == 2:
                break
        assert len(set(_answered_by(srv, by).values())) == 2, "one worker answered every scrape"
    for text in scrapes:
        assert _metric(text, 'safedl_requests_total{endpoint="/v1/predict",status="200"}') == len(ok)
        assert _metric(text, 'safedl_requests_total{endpoint="/v1/predict",status="429"}') == len(refused)
        assert _metric(text, "safedl_ready") == 1.0
    assert_rules_and_dashboards_find(exposition_names(scrapes[-1]))
    rows = {r["request_id"]: r["http_status"] for r in audit_rows(audit, "endpoint='/v1/predict'")}
    assert all(rows.get(rid) == 200 for rid in ok) and all(rows.get(rid) == 429 for rid in refused)


def _swap_directory(src: Path, live: Path) -> None:
    """Replace the bundle directory ``live`` by a copy of ``src`` (renames: a reader sees one or the other)."""
    nxt, old = live.with_name(live.name + ".next"), live.with_name(live.name + ".old")
    shutil.copytree(src, nxt)
    os.rename(live, old)
    os.rename(nxt, live)


def test_a_killed_worker_is_restarted_sighup_reloads_both_and_sigterm_stops_them(setup, tmp_path):
    tok, imgs, audit, va, vb = setup["tokens"]["ops"], setup["imgs"], tmp_path / "audit.db", setup["va"], setup["vb"]
    live = tmp_path / "live"
    shutil.copytree(setup["a"], live)
    answered, errors, lock, stop = [], [], threading.Lock(), threading.Event()
    with ServerProcess(live, setup["keys"], audit, "--workers", "2") as srv:
        srv.wait_ready()
        assert _wait(lambda: len(_serving(srv)) == 2), srv.log_text()[-3000:]
        before = _serving(srv)
        threads = [threading.Thread(target=_load, args=(srv.url, tok, imgs[k:], stop, answered, errors, lock))
                   for k in range(3)]
        for t in threads:
            t.start()
        try:
            time.sleep(1.0)
            killed_at = time.monotonic()
            os.kill(before[0], signal.SIGKILL)
            assert _wait(lambda: _serving(srv).get(0) not in (None, before[0])), srv.log_text()[-3000:]
            after = _serving(srv)
            assert after[1] == before[1]
            time.sleep(1.0)
            _swap_directory(setup["b"], live)
            srv.proc.send_signal(signal.SIGHUP)

            def reloaded() -> set[int]:
                return {r["pid"] for r in _records(srv) if r.get("event") == "bundle_swap"
                        and r.get("trigger") == "sighup" and r.get("outcome") == "swapped"
                        and r.get("bundle_version") == vb}
            assert _wait(lambda: reloaded() == set(after.values())), srv.log_text()[-3000:]
            fresh = [_post(srv.url, tok, imgs[i % len(imgs)]) for i in range(10)]
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        assert {r.status_code for r in fresh} == {200} and {r.json()["bundle_version"] for r in fresh} == {vb}
        stop2, answered2 = threading.Event(), []  # in flight during SIGTERM
        threads = [threading.Thread(target=_load, args=(srv.url, tok, imgs, stop2, answered2, [], lock))
                   for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(90) == -signal.SIGTERM
        stop2.set()
        for t in threads:
            t.join(60)
        recs = _records(srv)
    assert len(errors) <= 3  # at most the requests in flight on the killed worker, one per client
    assert {s for _, s, _, _ in answered} == {200} and {s for _, s, _, _ in answered2} <= {200, 503}
    assert any(t > killed_at for t, _, _, _ in answered)  # answered on after the kill
    stopped = {r["pid"] for r in recs if r.get("role") == "worker" and r.get("event") == "stop"}
    assert stopped == set(after.values())  # both current workers flushed their audit and stopped
    start = next(r for r in recs if r.get("event") == "workers_start")
    assert not Path(start["metrics_dir"]).exists()
    rows = {r["request_id"] for r in audit_rows(audit, "http_status=200")}
    assert {rid for _, s, rid, _ in answered + answered2 if s == 200} <= rows
