"""Red-team figures of `safedl serve` (the service-hardening issue): each attack run against a real server
process on 127.0.0.1 while Apache Bench sends legit traffic, with what was expected, what happened, and the legit
p99 during the attack against the unloaded p99.

Setup (seeded): bench/bundle_race.py's signed bundle (scikit-learn's 8x8 digits, ``tiny_cnn`` trained ``--epochs``,
feature squeezing + its detector, HMAC key), keys (legit full tier with high limits, fuzz, label tier, admin,
metrics scraper, a rate-limited one), ``safedl serve --signing-key-file ... --max-connections 600`` (server A) and,
for the audit cap, a second one with ``--audit-max-mb 0.5`` (server B). Legit traffic: ``ab -c 4`` posting one PNG
test digit with the legit key from 127.0.0.1, a new connection per request (a Python client with the same summary
if ab is missing; the table says which). Attackers connect from other 127/8 addresses (``127.20.x.y`` ...), so
per-address limits see them as other clients. Probes, each bounded in count and time:

 1. baseline: legit p50/p99 and req/s, no attack;
 2. slowloris: ``--slowloris`` connections sending a request head one byte per 0.5 s, reconnecting, for
    ``--probe-s``: each dropped at the header deadline (408 or closed);
 3. keyless flood: ``--flood`` requests with random well-formed and malformed keys from 16 addresses: 401 then
    429 per address, no audit row per keyless request, few aggregated rows; then the same flood against server B
    (``--audit-max-mb 0.5``), after which legit requests still get 200 (no 503);
 4. held uploads: 40 connections with an unknown key declaring 8 MB bodies, trickled: 401 before the body is
    read, server RSS growth small;
 5. connection limits: 64 + 10 connections from one address (429 beyond 64), 600 + 10 in all (503 beyond 600);
 6. fuzz: ``--fuzz`` bodies of tests/_fuzz_corpus.py over HTTP: no 5xx;
 7. swaps: ``--swaps`` admin swaps while bundle_race's racer rewrites the bundle files with attacker content:
    no unsigned load (version, manifest and the answer to a probe image whose label differs under forged weights);
 8. score leak: a label-tier key gets 401/403 on /metrics and no ``threshold_`` in /v1/model; a rate-limited key
    gets 429 with Retry-After;
 9. memory: the server's RSS every 2 s, over the whole run and ``--minutes`` of all probes in rotation
    (target growth <= +100 MB); and the server's stderr lines (no log flood).

Legit p99 during slowloris, the keyless flood and held uploads must be <= 2x the unloaded p99. Everything runs on
one machine, so the attackers' own CPU counts against the server: each row says the CPU seconds the server, the
attackers (this process) and ab used during it, and rows 3/4 the server CPU per attack request (the probe's server
CPU less the legit requests' share at the baseline cost). Exit code 0 whatever the figures (a measurement); a missed
target is marked MISSED. The table goes to stdout, the same with every raw figure as JSON to ``--out``.

    PYTHONPATH=src nice -n 5 .venv/bin/python bench/redteam_service.py --quick --seed 0 \
        --out bench/results/redteam_service_quick.json                                         # ~90 s, smoke check
    PYTHONPATH=src nice -n 5 .venv/bin/python bench/redteam_service.py --fuzz 20000 --swaps 300 --minutes 3 --seed 0
    PYTHONPATH=src nice -n 5 .venv/bin/python bench/redteam_service.py --fuzz 100000 --swaps 1000 --minutes 10 \
        --seed 0 --out bench/results/redteam_service_full.json                                         # the issue's run

``--quick``: --fuzz 300 --swaps 15 --minutes 0.3 --slowloris 100 --flood 1500 --probe-s 5 --baseline-s 5
--header-timeout-s 4 --max-probe-s 60.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import _redteam_probes as P  # noqa: E402
from _redteam_net import AddressPool, Legit, LogCounter, RssSampler, cpu_delta, cpu_marks  # noqa: E402

log = logging.getLogger("redteam_service")
PROBES = ("slowloris", "flood", "flood_capped", "held", "connections", "fuzz", "swaps", "leak", "rotation")


class Run:
    """One server under test, its legit load, RSS sampler, and the rows measured against it."""

    def __init__(self, srv, legit: Legit, args):
        self.srv, self.legit, self.args = srv, legit, args
        self.rss = RssSampler(srv.proc.pid)
        self.rss.start()
        self.logs = LogCounter(srv.log.name)
        self.baseline_p99: float | None = None
        self.rows: list[dict] = []
        self.in_rotation = False  # the rotation runs one legit load over all its probes
        self.legit_cpu_ms = 0.0

    def attack_cpu_ms(self, res: dict, attacks: int) -> float | None:
        """Server CPU per attack request: the probe's server CPU less the legit requests' share (baseline cost)."""
        server, lg = (res.get("cpu_s") or {}).get("server"), res.get("legit") or {}
        if server is None or not attacks:
            return None
        return round((1000 * server - lg.get("requests", 0) * self.legit_cpu_ms) / attacks, 2)

    def during(self, name: str, fn, *, seconds: float, legit: bool = True) -> dict:
        """Run ``fn()`` while the legit load runs (at most ``seconds``); its figures plus legit, RSS and log lines."""
        logs0, t0 = self.logs.update(), time.monotonic()
        rss0 = self.rss.sample()
        legit = legit and not self.in_rotation
        cpu0 = cpu_marks(self.srv.proc.pid)
        if legit:
            self.legit.start(seconds)
        try:
            res = fn()
        finally:
            lg = self.legit.stop() if legit else None
        t1 = time.monotonic()
        self.rss.sample()
        logs1 = self.logs.update()
        cpu = cpu_delta(cpu0, cpu_marks(self.srv.proc.pid))
        window = self.rss.window(t0, t1)
        res.update(seconds=round(t1 - t0, 1), legit=lg, rss_before_mb=rss0, rss_max_mb=max(window, default=None),
                   log_lines={k: logs1[k] - logs0[k] for k in logs1},
                   server_alive=self.srv.proc.poll() is None, cpu_s=cpu)
        log.info("%s: %s", name, json.dumps(res, default=str)[:1500])
        return res

    def row(self, probe: str, expected: str, got: str, ok: bool, res: dict, *, ratio_target: bool = False) -> None:
        lg = res.get("legit") or {}
        p99 = lg.get("p99_ms")
        ratio = None if p99 is None or not self.baseline_p99 else round(p99 / self.baseline_p99, 2)
        if lg:
            cpu = res.get("cpu_s") or {}
            got += (f"; legit {lg['rps']:.0f} req/s, non-2xx {lg['non_2xx']}; CPU s server {cpu.get('server')}, "
                    f"attackers {cpu.get('attacker_and_bench')}, ab {cpu.get('ab_waited')}")
        self.rows.append({"probe": probe, "expected": expected, "got": got, "ok": bool(ok), "legit_p99_ms": p99,
                          "ratio": ratio, "ratio_target_2x": ratio_target,
                          "ratio_ok": None if not ratio_target or ratio is None else ratio <= 2.0, "figures": res})


def probe_baseline(run: Run, args) -> None:
    res = run.during("baseline", lambda: (time.sleep(args.baseline_s), {})[1], seconds=args.baseline_s)
    lg = res["legit"]
    run.baseline_p99 = lg["p99_ms"]
    run.legit_cpu_ms = 1000 * res["cpu_s"]["server"] / max(1, lg["requests"])  # server CPU per legit request
    run.row("1 baseline (no attack)", "reference", f"p50 {lg['p50_ms']} ms, p99 {lg['p99_ms']} ms "
            f"({lg['tool']} -c {args.legit_concurrency}, one PNG digit)",
            lg["non_2xx"] == 0 and lg["requests"] > 0, res)


def probe_slowloris(run: Run, args, pool: AddressPool, *, conns: int, seconds: float, record: bool = True) -> dict:
    srcs = pool.take(max(1, conns // 25))
    res = run.during("slowloris", lambda: P.run(P.slowloris(run.srv.port, srcs, conns=conns, seconds=seconds,
                                                            deadline_s=args.header_timeout_s)),
                     seconds=seconds + args.header_timeout_s + 1)
    ok = res["held_past_deadline"] == 0 and set(res["outcomes"]) <= {"408", "closed", "reset"}
    if record:
        run.row(f"2 slowloris ({conns} conns, 1 byte/0.5 s)", f"each dropped at the header deadline "
                f"({args.header_timeout_s:g} s): 408 or closed",
                f"{res['connections']} connections made: {_counts(res['outcomes'])}; held {res['min_hold_s']}-"
                f"{res['max_hold_s']} s, past deadline+2 s: {res['held_past_deadline']}", ok, res, ratio_target=True)
    return res


def _counts(c: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(c.items()))


def flood_figures(srv, args, pool: AddressPool, requests: int, seconds: float, run: Run | None) -> dict:
    """The flood (with legit load when ``run``), then the audit database once the aggregated counts are flushed."""
    srcs = pool.take(16)
    before = P.audit_counts(srv.audit_path)
    flood = lambda: P.run(P.keyless_flood(srv.port, srcs, requests=requests, seconds=seconds,  # noqa: E731
                                          png=args.png_bytes, seed=args.seed))
    res = run.during("keyless flood", flood, seconds=seconds) if run else flood()
    time.sleep(6.0)  # the unauthenticated counts are flushed every 5 s
    after = P.audit_counts(srv.audit_path)
    res["audit"] = {k: after[k] - before[k] for k in after}
    res["aggregated_rows_bound"] = 16 * (int(res.get("seconds", seconds) // 60) + 2) * 2 * 2
    return res


def flood_ok(res: dict, burst: int) -> tuple[bool, str]:
    st, a = res["statuses"], res["audit"]
    first = res["first_429_index"]
    ok = (set(st) <= {"401", "429"} and all(i is not None and i >= burst - 2 for i in first)
          and res["share_429_after_first"] >= 0.5 and a["audit_rows_without_key"] == 0
          and a["aggregated_rows"] <= res["aggregated_rows_bound"])
    seen = [i for i in first if i is not None]
    got = (f"{res['sent']} at {res['rps']:.0f}/s: {_counts(st)}; 1st 429 after {min(seen, default=None)}-"
           f"{max(seen, default=None)} 401s/addr, then {res['share_429_after_first']:.0%} 429; keyless audit rows "
           f"{a['audit_rows_without_key']}, aggregated rows {a['aggregated_rows']} (count {a['aggregated_count']})")
    return ok, got


def probe_flood(run: Run, args, pool: AddressPool) -> None:
    res = flood_figures(run.srv, args, pool, args.flood, args.probe_s + 10, run)
    ok, got = flood_ok(res, 20)
    res["server_cpu_ms_per_attack_request"] = cost = run.attack_cpu_ms(res, res["sent"])
    got += f"; server CPU ~{cost} ms per keyless request (legit: {run.legit_cpu_ms:.1f})"
    run.row(f"3 keyless flood ({args.flood} req, 16 addrs)", "401 then 429 per address; no audit row per keyless "
            "request; few aggregated rows", got, ok, res, ratio_target=True)


def probe_flood_capped(run: Run, args, pool: AddressPool, make_server) -> None:
    with make_server("--audit-max-mb", "0.5") as b:
        b.wait_ready()
        res = flood_figures(b, args, pool, args.flood, args.probe_s + 10, None)
        codes = P.legit_check(b.url, token=run.tokens["legit"], png=args.png_bytes)
        res["legit_after"] = dict(codes)
        res["audit_db_bytes"] = sum(p.stat().st_size for p in b.audit_path.parent.glob(b.audit_path.name + "*"))
    ok, got = flood_ok(res, 20)
    ok = ok and set(codes) == {200}
    run.row("3b keyless flood, server B --audit-max-mb 0.5", "as 3; then legit requests 200 (no 503)",
            f"{got}; legit after: {_counts(res['legit_after'])}; audit db {res['audit_db_bytes'] / 2**20:.2f} MB",
            ok, res)


def probe_held(run: Run, args, pool: AddressPool, *, conns: int = 40, seconds: float | None = None,
               record: bool = True) -> dict:
    seconds = args.probe_s if seconds is None else seconds
    srcs = pool.take(conns)
    res = run.during("held uploads", lambda: P.run(P.held_uploads(run.srv.port, srcs, conns=conns,
                                                                  seconds=seconds)), seconds=seconds + 3)
    growth = (res["rss_max_mb"] or 0) - (res["rss_before_mb"] or 0)
    res["rss_growth_mb"] = round(growth, 1)
    ok = (set(res["answers"]) <= {"401", "429"} and (res["max_body_bytes_before_answer"] or 0) <= 256 * 1024
          and growth <= 40)
    res["server_cpu_ms_per_attack_request"] = cost = run.attack_cpu_ms(res, res["uploads"])
    if record:
        run.row(f"4 held uploads ({conns} conns x 8 MB declared, trickled)", "401 before the body is read; RSS "
                "growth < 40 MB", f"{res['uploads']} uploads: {_counts(res['answers'])}; body bytes before answer "
                f"<= {res['max_body_bytes_before_answer']}; RSS +{growth:.1f} MB; server CPU ~{cost} ms per upload",
                ok, res, ratio_target=True)
    return res


def probe_connections(run: Run, args, pool: AddressPool, *, record: bool = True, legit: bool = False) -> dict:
    one, many = pool.take(1)[0], pool.take((args.max_connections + 10) // 32 + 1)
    res = run.during("connection limits", lambda: P.run(P.connection_limits(
        run.srv.port, one, many, per_client=64, overall=args.max_connections)), seconds=20, legit=legit)
    a, m = res["one_address"], res["many_addresses"]
    ok = (a.get("admitted") == 64 and a.get("429") == 10 and m.get("admitted", 0) <= args.max_connections
          and m.get("503", 0) >= 10 and set(m) <= {"opened", "admitted", "503"})
    if record:
        run.row("5 connection limits", f"one address: 429 beyond 64; in all: 503 beyond {args.max_connections}",
                f"one address: {_counts({k: v for k, v in a.items() if k != 'opened'})} of {a['opened']}; "
                f"{len(many)} addresses: {_counts({k: v for k, v in m.items() if k != 'opened'})} of {m['opened']}",
                ok, res)
    return res


def probe_fuzz(run: Run, args, pool: AddressPool, *, n: int, seed: int, record: bool = True) -> dict:
    src = pool.take(1)[0]
    res = run.during("fuzz", lambda: P.run(P.fuzz(run.srv.port, run.tokens["fuzz"], src, n=n, seed=seed,
                                                   seconds=args.max_probe_s)), seconds=args.max_probe_s)
    if record:
        run.row(f"6 fuzz ({n} bodies, corpus seed {seed})", "no 5xx, every request answered",
                f"{res['sent']} sent: 5xx {res['5xx']}, no answer {res['no_answer']}; {_counts(res['statuses'])}",
                res["5xx"] == 0 and res["no_answer"] == 0 and res["sent"] == n, res)
    return res


def probe_swaps(run: Run, args, *, n: int, seed: int, record: bool = True) -> dict:
    b = args.built
    res = run.during("swaps", lambda: P.swaps(run.srv.url, admin=run.tokens["admin"], legit=run.tokens["legit"],
                                              n=n, seconds=args.max_probe_s, live=b["live"], genuine=b["genuine"],
                                              sets=b["sets"], seed=seed, probe=b["probe"], expect=args.expect,
                                              same=P.same_answer), seconds=args.max_probe_s)
    if record:
        fivexx = sum(v for k, v in res["statuses"].items() if k.startswith("5"))
        run.row(f"7 swaps ({n}, attacker rewriting the files)", "0 unsigned loads; no 5xx",
                f"{res['attempts']} swaps: {_counts(res['statuses'])}; unsigned loads {res['unsigned_loads']}; "
                f"attacker rewrites {sum(res['attacker_rewrites'].values())}",
                res["unsigned_loads"] == 0 and fivexx == 0 and res["attempts"] == n, res)
    return res


def probe_leak(run: Run, args) -> None:
    res = run.during("score leak", lambda: P.score_leak(run.srv.url, label=run.tokens["label"],
                                                        admin=run.tokens["admin"], scraper=run.tokens["metrics"],
                                                        png=args.png_bytes), seconds=5, legit=False)
    m = res["metrics_status"]
    hidden = set(res["label_predict_fields"]) <= {"index", "label", "class_name", "rejected", "reason",
                                                  "input_sha256"}
    run.row("8 score leak (label-tier key)", "/metrics 401 (no key) / 403 (label key); no threshold_ in "
            "/v1/model; no scores in answers", f"/metrics {m['none']}/{m['label']} (scraper {m['metrics_key']}); "
            f"threshold_ in /v1/model: label {res['label_model_has_threshold_']}, admin "
            f"{res['admin_model_has_threshold_']}; label answer fields {','.join(res['label_predict_fields'])}",
            m == {"none": 401, "label": 403, "metrics_key": 200} and not res["label_model_has_threshold_"]
            and res["admin_model_has_threshold_"] and hidden, res)
    rl = run.during("rate limited", lambda: P.rate_limited(run.srv.url, token=run.tokens["limited"]),
                    seconds=5, legit=False)
    codes = rl["statuses"]
    run.row("8b rate-limited key (burst 5, 0.2/s)", "200 x5 then 429 with Retry-After",
            f"{''.join('.' if c == 200 else 'x' if c == 429 else '?' for c in codes)} (. 200, x 429), "
            f"Retry-After {rl['retry_after']}", codes[:5] == [200] * 5 and set(codes[5:]) == {429}
            and rl["retry_after"] is not None, rl)


def rotation(run: Run, args, pool: AddressPool) -> None:
    """``--minutes`` of every probe in turn, small sizes, legit load throughout; RSS over it."""
    steps = [lambda i: probe_slowloris(run, args, pool, conns=max(20, args.slowloris // 5), seconds=2, record=False),
             lambda i: flood_figures(run.srv, args, pool, 2000, 10, None),
             lambda i: probe_held(run, args, pool, conns=30, seconds=5, record=False),
             lambda i: probe_connections(run, args, pool, record=False),
             lambda i: probe_fuzz(run, args, pool, n=1000, seed=args.seed + 1000 + i, record=False),
             lambda i: probe_swaps(run, args, n=20, seed=args.seed + 1000 + i, record=False),
             lambda i: (probe_leak_quiet(run), {})[1]]
    end, done, fivexx, unsigned = time.monotonic() + args.minutes * 60, [], 0, 0

    def loop() -> dict:
        nonlocal fivexx, unsigned
        i = 0
        while time.monotonic() < end:
            res = steps[i % len(steps)](i)
            fivexx += res.get("5xx", 0) + sum(v for k, v in res.get("statuses", {}).items() if str(k)[:1] == "5")
            unsigned += res.get("unsigned_loads", 0)
            done.append(i % len(steps))
            i += 1
        return {"steps": len(done), "rounds": len(done) / len(steps), "5xx": fivexx, "unsigned_loads": unsigned}

    run.legit.start(args.minutes * 60 + 60)
    run.in_rotation = True
    try:
        res = run.during("rotation", loop, seconds=0)
    finally:
        run.in_rotation = False
        res_legit = run.legit.stop()
    res["legit"] = res_legit
    s, t0 = [mb for _, mb in run.rss.samples], run.rss.samples[0][0]
    start = run.rss_start
    audited = P.statuses_of_key(run.srv.audit_path, args.built["key_ids"]["legit"])
    res.update(rss_start_mb=start, rss_max_mb=max(s), rss_end_mb=s[-1], growth_mb=round(s[-1] - start, 1),
               peak_growth_mb=round(max(s) - start, 1), samples=len(s), legit_key_audited_whole_run=audited,
               rss_series_s_mb=[(round(t - t0), round(mb, 1)) for t, mb in run.rss.samples[::5]])
    bad = {k: v for k, v in audited.items() if not k.endswith((" 200", " 499"))}
    cut = sum(v for k, v in audited.items() if k.endswith(" 499"))
    ok = res["growth_mb"] <= 100 and res["peak_growth_mb"] <= 100 and fivexx == 0 and unsigned == 0
    run.row(f"9 memory ({args.minutes:g} min of all probes in rotation)", "RSS growth <= +100 MB; no 5xx, no "
            "unsigned load", f"{res['steps']} probe runs: RSS start {start:.0f}, max {max(s):.0f}, end {s[-1]:.0f} MB "
            f"(growth {res['growth_mb']:+.0f}, peak {res['peak_growth_mb']:+.0f}); 5xx {fivexx}, unsigned {unsigned}; "
            f"legit key's audited non-200 over the run: {_counts(bad) or 'none'} (+{cut} 499: ab's requests in "
            f"flight when it is stopped; ab's non-2xx not in the audit were "
            f"answered before the app, e.g. 503 while probe 5 holds every connection slot)", ok, res)


def probe_leak_quiet(run: Run) -> None:
    P.score_leak(run.srv.url, label=run.tokens["label"], admin=run.tokens["admin"], scraper=run.tokens["metrics"],
                 png=run.args.png_bytes)
    P.rate_limited(run.srv.url, token=run.tokens["limited"], n=3)


def log_row(run: Run, logs: dict, minutes: float) -> None:
    bound = int(60 * max(1.0, minutes))
    run.row("log lines (server stderr)", f"no flood: lines other than one per authenticated request / swap "
            f"<= {bound} (60 per min); no error or traceback",
            f"{logs['lines']} lines: {logs['request_lines']} request, {logs['swap_lines']} swap, "
            f"{logs['other_lines']} other, {logs['error_lines']} error", logs["other_lines"] <= bound
            and logs["error_lines"] == 0, logs)


def table(rows: list[dict]) -> str:
    out = ["| probe | expected | got | legit p99 during (ms) | ratio to unloaded p99 |", "|---|---|---|---|---|"]
    for r in rows:
        got = r["got"] if r["ok"] else f"MISSED: {r['got']}"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        if r["ratio_ok"] is False:
            ratio += " MISSED (target <= 2x)"
        n = (r["figures"].get("legit") or {}).get("requests", 0)
        p99 = "" if r["legit_p99_ms"] is None else f"{r['legit_p99_ms']:.1f}" + (f" (n={n})" if n < 100 else "")
        out.append(f"| {r['probe']} | {r['expected']} | {got.replace('|', '/')} | {p99} | {ratio} |")
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fuzz", type=int, default=100_000, help="fuzz bodies (probe 6)")
    p.add_argument("--swaps", type=int, default=1000, help="admin swaps under a racing attacker (probe 7)")
    p.add_argument("--minutes", type=float, default=10.0, help="minutes of all probes in rotation (probe 9)")
    p.add_argument("--quick", action="store_true", help="every probe, small and short (< ~90 s): smoke check")
    p.add_argument("--slowloris", type=int, default=500, help="slowloris connections")
    p.add_argument("--flood", type=int, default=20_000, help="keyless requests per flood")
    p.add_argument("--probe-s", type=float, default=20.0, help="duration of slowloris and held uploads")
    p.add_argument("--baseline-s", type=float, default=20.0)
    p.add_argument("--max-probe-s", type=float, default=3600.0, help="time cap of the fuzz and swap probes")
    p.add_argument("--legit-concurrency", type=int, default=4, help="ab -c")
    p.add_argument("--header-timeout-s", type=float, default=10.0, help="the server's --header-timeout-s")
    p.add_argument("--max-connections", type=int, default=600, help="the server's --max-connections")
    p.add_argument("--epochs", type=int, default=10, help="training epochs of the tiny model")
    p.add_argument("--out", type=Path, default=HERE / "results" / "redteam_service.json")
    p.add_argument("--server-arg", action="append", default=[],
                   help="an extra `safedl serve` argument for the servers (repeat: --server-arg=--slow-lane-rate "
                        "--server-arg=100)")
    p.add_argument("--probes", default=",".join(PROBES),
                   help=f"comma list of the probes to run after the baseline (default all: {','.join(PROBES)})")
    args = p.parse_args(argv)
    args.probes = [s.strip() for s in args.probes.split(",") if s.strip()]
    unknown = sorted(set(args.probes) - set(PROBES))
    if unknown:
        p.error(f"--probes: unknown {', '.join(unknown)}; choose from {', '.join(PROBES)}")
    if args.quick:
        args.fuzz, args.swaps, args.minutes, args.slowloris, args.flood = 300, 15, 0.3, 100, 1500
        args.probe_s, args.baseline_s, args.header_timeout_s, args.max_probe_s = 5.0, 5.0, 4.0, 60.0
    return args


def serve_and_probe(args, work: Path) -> tuple[Run, dict]:
    """Server A with every probe in turn (server B inside probe 3b); the run and how the server ended."""
    from _serve_helpers import ServerProcess

    built, n_srv, pool = args.built, [0], AddressPool()

    def make_server(*extra: str):
        n_srv[0] += 1
        audit = work / f"audit{n_srv[0]}.db"
        srv = ServerProcess(built["root"], work / "keys.db", audit, "--header-timeout-s", str(args.header_timeout_s),
                            *args.server_arg, *extra)
        srv.audit_path = audit
        return srv

    t_start = time.monotonic()
    with make_server("--signing-key-file", str(built["keyfile"]), "--max-connections",
                     str(args.max_connections)) as srv:
        srv.wait_ready()
        run = Run(srv, Legit(srv.port, built["tokens"]["legit"], built["png"], work,
                             concurrency=args.legit_concurrency), args)
        run.tokens = built["tokens"]
        import httpx

        with httpx.Client(base_url=srv.url, timeout=30) as c:
            args.expect = P.served_answer(c, admin=run.tokens["admin"], legit=run.tokens["legit"], probe=built["probe"])
        run.legit.start(3)
        run.legit.stop()  # warm-up
        run.rss_start = run.rss.sample()
        probe_baseline(run, args)
        chosen = {
            "slowloris": lambda: probe_slowloris(run, args, pool, conns=args.slowloris, seconds=args.probe_s),
            "flood": lambda: probe_flood(run, args, pool),
            "flood_capped": lambda: probe_flood_capped(run, args, pool, make_server),
            "held": lambda: probe_held(run, args, pool),
            "connections": lambda: probe_connections(run, args, pool),
            "fuzz": lambda: probe_fuzz(run, args, pool, n=args.fuzz, seed=args.seed),
            "swaps": lambda: probe_swaps(run, args, n=args.swaps, seed=args.seed),
            "leak": lambda: probe_leak(run, args),
            "rotation": lambda: rotation(run, args, pool)}
        for name in PROBES:
            if name in args.probes:
                chosen[name]()
        ended = {"server_alive_at_end": srv.proc.poll() is None, "server_exit_code": srv.stop()}
        run.rss.stop()
        log_row(run, {**run.logs.update(), "first_errors": run.logs.first_errors,
                      "other_kinds": dict(run.logs.other_kinds.most_common(15))}, (time.monotonic() - t_start) / 60)
    return run, ended


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    import torch

    torch.set_num_threads(1)
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="redteam-service-") as tmp:
        built = args.built = P.build(Path(tmp), seed=args.seed, epochs=args.epochs)
        args.png_bytes = built["png"].read_bytes()
        run, ended = serve_and_probe(args, Path(tmp))
    result = {"command": " ".join(sys.argv), "seed": args.seed, "quick": args.quick,
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                       if k not in ("built", "png_bytes", "expect")},
              "probe_image": {"test_index": built["probe_index"], "labels": built["probe_labels"]},
              "baseline_p99_ms": run.baseline_p99, **ended, "wall_s": round(time.monotonic() - t_start, 1),
              "cpu_count": os.cpu_count(), "load_avg_at_end": os.getloadavg(),
              "legit_tool": run.legit.tool or "python-fallback", "rows": run.rows}
    print(table(run.rows))
    mem = next((r["figures"] for r in run.rows if r["probe"].startswith("9 ")), None)
    if mem is not None:
        print(f"\nmemory: server RSS start {mem['rss_start_mb']:.0f} MB, max {mem['rss_max_mb']:.0f} MB, end "
              f"{mem['rss_end_mb']:.0f} MB, growth {mem['growth_mb']:+.0f} MB (peak {mem['peak_growth_mb']:+.0f}; "
              f"target <= +100 MB{'' if mem['growth_mb'] <= 100 and mem['peak_growth_mb'] <= 100 else ': MISSED'}); "
              f"{mem['samples']} samples; wall {result['wall_s']:.0f} s; load avg at end "
              f"{result['load_avg_at_end'][0]:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


if __name__ == "__main__":
    main()
