"""The attacks of bench/redteam_service.py, each bounded in count and in time, against 127.0.0.1 only. Every probe
returns a dict of raw figures; redteam_service.py judges them against the expectations and prints the table."""
from __future__ import annotations

import asyncio
import hashlib
import json
import random
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

from _redteam_net import KeepAlive, close, connect, read_response, request_bytes

UNKNOWN_KEY = "sdl_" + "0" * 12 + "_" + "A" * 43


def _status_of(data: bytes) -> int | None:
    return int(data[9:12]) if data.startswith(b"HTTP/1.") and data[9:12].isdigit() else None


# -- the target: a signed bundle, its attacker versions, keys, the legit PNG, the probe image ----------------
def build(work: Path, *, seed: int, epochs: int) -> dict:
    """The signed bundle (and a live copy for swaps), the attacker's file sets, keys, the legit PNG, the probe."""
    import numpy as np
    from safetensors.torch import load

    from _serve_helpers import npy_bytes, png_bytes
    from bundle_race import KEY, WEIGHTS, _flip, attacks, build_bundle
    from safedl.data import load_builtin, stratified_split
    from safedl.deploy import load_bundle
    from safedl.serve.keys import KeyStore

    root = build_bundle(work / "genuine", epochs=epochs, seed=seed)
    live = Path(shutil.copytree(root, work / "live"))
    genuine = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    (work / "signing.key").write_bytes(KEY)
    store, big = KeyStore(work / "keys.db", create=True), dict(rate_per_s=1e6, burst=10**6, daily_quota=10**12)
    made = {name: store.create(name=name, tier=tier, scopes=scopes, **lim) for name, tier, scopes, lim in [
        ("legit", "full", ("predict", "model"), big), ("fuzz", "rounded", ("predict",), big),
        ("label", "label", ("predict", "model"), big), ("admin", "full", ("predict", "model", "admin"), big),
        ("metrics", "rounded", ("metrics",), big),
        ("limited", "rounded", ("predict", "model"), dict(rate_per_s=0.2, burst=5, daily_quota=1000))]}
    tok, key_ids = {n: m[1] for n, m in made.items()}, {n: m[0].key_id for n, m in made.items()}
    splits = stratified_split(load_builtin("digits"), test_fraction=0.2, val_fraction=0.1, seed=seed)
    x = splits.test.x[:200]
    b = load_bundle(root, signing_key=KEY)
    good = b.pipeline.decide(x)
    b.pipeline.model.load_state_dict(load(_flip(genuine[WEIGHTS])))
    bad = b.pipeline.decide(x)
    i = next(i for i in range(len(x)) if not good.rejected[i] and (bool(bad.rejected[i])
                                                                   or int(bad.labels[i]) != int(good.labels[i])))
    (work / "legit.png").write_bytes(png_bytes(splits.test.x[0]))
    return {"root": root, "live": live, "genuine": genuine, "sets": attacks(genuine)[1], "tokens": tok,
            "key_ids": key_ids,
            "keyfile": work / "signing.key", "png": work / "legit.png",
            "probe": npy_bytes(x[i:i + 1].numpy().astype(np.float32)), "probe_index": i,
            "probe_labels": {"genuine": int(good.labels[i]), "forged": None if bad.rejected[i]
                             else int(bad.labels[i])}}



# -- 2. slowloris -----------------------------------------------------------------------------------------------
async def slowloris(port: int, sources: list[str], *, conns: int, seconds: float, deadline_s: float,
                    interval_s: float = 0.5) -> dict:
    """``conns`` connections (spread over ``sources``) that send a request head one byte every ``interval_s``,
    reconnecting when dropped, for ``seconds``; each connection's hold time and what ended it."""
    outcomes: list[tuple[str, float]] = []
    stop_at, cap = time.monotonic() + seconds, deadline_s + 10.0
    head = b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 4096

    async def one(source: str) -> None:
        while time.monotonic() < stop_at:
            t0, sent, got = time.monotonic(), 0, b""
            try:
                reader, writer = await connect(port, source)
            except (OSError, TimeoutError):
                outcomes.append(("connect_failed", 0.0))
                await asyncio.sleep(interval_s)
                continue
            end = "held"
            try:
                while time.monotonic() - t0 < cap:
                    try:
                        data = await asyncio.wait_for(reader.read(4096), interval_s)
                    except TimeoutError:
                        writer.write(head[sent:sent + 1])
                        sent += 1
                        continue
                    if not data:
                        status = _status_of(got)
                        end = str(status) if status else "closed"
                        break
                    got += data
            except OSError:
                end = str(_status_of(got) or "reset")
            outcomes.append((end, time.monotonic() - t0))
            close(writer)

    await asyncio.gather(*(one(sources[i % len(sources)]) for i in range(conns)))
    holds = [h for _, h in outcomes]
    return {"connections": len(outcomes), "outcomes": dict(Counter(e for e, _ in outcomes)),
            "max_hold_s": round(max(holds, default=0.0), 2), "min_hold_s": round(min(holds, default=0.0), 2),
            "held_past_deadline": sum(h > deadline_s + 2.0 for h in holds), "deadline_s": deadline_s}


# -- 3. keyless flood -----------------------------------------------------------------------------------------------
def random_key(rng: random.Random) -> dict[str, str]:
    """Headers with a wrong key: well formed and unknown, or malformed in one of several ways, or none."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    well = f"sdl_{rng.getrandbits(48):012x}_" + "".join(rng.choice(alphabet) for _ in range(43))
    kind = rng.randrange(8)
    if kind <= 2:
        return {"X-API-Key" if kind else "Authorization": well if kind else f"Bearer {well}"}
    bad = ["", "sdl_", "sdl_xyz_abc", "x" * 200, well[:-30], well.upper(), "Basic dXNlcjpwYXNz", "sdl_%s" % ("0" * 99)]
    if kind == 3:
        return {}
    if kind == 4:
        return {"Authorization": rng.choice(["Basic dXNlcjpwYXNz", "Bearer", "Bearer  ", f"Token {well}"])}
    return {"X-API-Key": rng.choice(bad)}


async def keyless_flood(port: int, sources: list[str], *, requests: int, seconds: float, png: bytes, seed: int,
                        per_source: int = 2) -> dict:
    """``requests`` requests with wrong keys from ``sources`` (``per_source`` connections each; predict with a
    body, or /v1/model without), within ``seconds``; statuses per source in the order answered."""
    rng = random.Random(seed)
    per_src: dict[str, list[int]] = {s: [] for s in sources}
    left, stop_at, t0 = [requests], time.monotonic() + seconds, time.monotonic()

    async def worker(source: str) -> None:
        conn = KeepAlive(port, source)
        while left[0] > 0 and time.monotonic() < stop_at:
            left[0] -= 1
            headers = random_key(rng)
            if rng.random() < 0.5:
                raw = request_bytes("POST", "/v1/predict", headers={**headers, "Content-Type": "image/png"},
                                    body=png)
            else:
                raw = request_bytes("GET", "/v1/model", headers=headers)
            r = await conn.send(raw)
            per_src[source].append(r[0] if r else 0)
        conn.drop()

    await asyncio.gather(*(worker(s) for s in sources for _ in range(per_source)))
    wall = time.monotonic() - t0
    statuses = Counter(s for seq in per_src.values() for s in seq)
    first_429 = [seq.index(429) if 429 in seq else None for seq in per_src.values()]
    after = [seq[i:] for seq, i in zip(per_src.values(), first_429) if i is not None]
    return {"sent": sum(statuses.values()), "seconds": round(wall, 2), "rps": round(sum(statuses.values()) / wall, 1),
            "statuses": {str(k): v for k, v in sorted(statuses.items())}, "sources": len(sources),
            "first_429_index": first_429,
            "share_429_after_first": round(sum(s.count(429) for s in after) / max(1, sum(map(len, after))), 3)}


def audit_counts(db: Path) -> dict:
    """Rows of the audit database: per-request rows without a key (keyless requests: expected none), and the
    aggregated rows of failures before authentication."""
    import sqlite3

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        null_key = conn.execute("SELECT COUNT(*) FROM audit WHERE key_id IS NULL").fetchone()[0]
        total = conn.execute("SELECT COUNT(*) FROM audit").fetchone()[0]
        agg = conn.execute("SELECT COUNT(*), COALESCE(SUM(count), 0) FROM unauthenticated").fetchone()
    finally:
        conn.close()
    return {"audit_rows": total, "audit_rows_without_key": null_key, "aggregated_rows": agg[0],
            "aggregated_count": agg[1]}


def statuses_of_key(db: Path, key_id: str) -> dict:
    """Audited HTTP statuses of one key's requests (endpoint, status) -> rows."""
    import sqlite3

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        rows = conn.execute("SELECT endpoint, http_status, COUNT(*) FROM audit WHERE key_id = ? GROUP BY 1, 2",
                            (key_id,)).fetchall()
    finally:
        conn.close()
    return {f"{e} {s}": n for e, s, n in rows}


# -- 4. held uploads -----------------------------------------------------------------------------------------------
async def held_uploads(port: int, sources: list[str], *, conns: int, seconds: float, body_mb: float = 8.0,
                       chunk: int = 16384, interval_s: float = 0.1) -> dict:
    """``conns`` connections with an unknown key declaring ``body_mb`` MB bodies and trickling them (``chunk``
    bytes every ``interval_s``), reconnecting, for ``seconds``: the answer, body bytes sent before it, and how long
    the server kept taking the body after it."""
    head = request_bytes("POST", "/v1/predict", headers={"X-API-Key": UNKNOWN_KEY,
                                                          "Content-Type": "application/x-npy",
                                                          "Content-Length": str(int(body_mb * 2**20))})
    head = head.replace(b"Content-Length: 0\r\n", b"")
    answers, before, after = Counter(), [], []
    stop_at = time.monotonic() + seconds

    async def one(source: str) -> None:
        while time.monotonic() < stop_at:
            try:
                reader, writer = await connect(port, source)
                writer.write(head)
            except (OSError, TimeoutError):
                answers["connect_failed"] += 1
                await asyncio.sleep(0.5)
                continue
            sent, got, t_answer, t_end = 0, b"", None, time.monotonic() + 30.0
            try:
                while time.monotonic() < t_end:
                    try:
                        data = await asyncio.wait_for(reader.read(65536), interval_s)
                    except TimeoutError:
                        writer.write(b"\0" * chunk)
                        await writer.drain()
                        sent += chunk
                        continue
                    if not data:
                        break
                    if t_answer is None:
                        t_answer, sent_at_answer = time.monotonic(), sent
                    got += data
            except OSError:
                pass
            answers[str(_status_of(got) or "none")] += 1
            if t_answer is not None:
                before.append(sent_at_answer)
                after.append(time.monotonic() - t_answer)
            close(writer)

    await asyncio.gather(*(one(sources[i % len(sources)]) for i in range(conns)))
    return {"uploads": sum(answers.values()), "answers": dict(answers),
            "max_body_bytes_before_answer": max(before, default=None),
            "max_s_taking_body_after_answer": round(max(after, default=0.0), 2)}


# -- 5. connection limits -----------------------------------------------------------------------------------------
async def _open_and_listen(port: int, sources: list[str], n: int, wait_s: float = 1.5) -> tuple[Counter, list]:
    """Open ``n`` connections (round robin over ``sources``), send nothing, and see which get an answer at once."""
    writers, readers = [], []
    for i in range(n):
        try:
            r, w = await connect(port, sources[i % len(sources)])
            readers.append(r)
            writers.append(w)
        except (OSError, TimeoutError):
            readers.append(None)
            writers.append(None)

    async def listen(reader) -> str:
        if reader is None:
            return "connect_failed"
        try:
            data = await asyncio.wait_for(reader.read(64), wait_s)
        except TimeoutError:
            return "admitted"
        except OSError:
            return "reset"
        return str(_status_of(data) or "closed")

    got = await asyncio.gather(*(listen(r) for r in readers))
    return Counter(got), writers


async def connection_limits(port: int, one_source: str, many: list[str], *, per_client: int, overall: int,
                            extra: int = 10) -> dict:
    """``per_client + extra`` connections from one address, then ``overall + extra`` from many."""
    one, writers = await _open_and_listen(port, [one_source], per_client + extra)
    for w in writers:
        close(w)
    await asyncio.sleep(2.5)  # the refused ones linger up to linger_s
    alls, writers = await _open_and_listen(port, many, overall + extra)
    for w in writers:
        close(w)
    await asyncio.sleep(2.5)
    return {"one_address": {"opened": per_client + extra, **one}, "many_addresses": {"opened": overall + extra,
                                                                                      **alls}}


# -- 6. fuzz --------------------------------------------------------------------------------------------------------
async def fuzz(port: int, token: str, source: str, *, n: int, seed: int, seconds: float, concurrency: int = 4,
               chunk: int = 500) -> dict:
    """``n`` bodies of tests/_fuzz_corpus.py (chunks of ``chunk``, chunk i drawn with seed ``seed * 1_000_003 +
    i``) posted to /v1/predict with a valid key, within ``seconds``; statuses, and every 5xx / no-answer case."""
    from _fuzz_corpus import corpus

    statuses, bad = Counter(), []
    stop_at, done = time.monotonic() + seconds, [0]
    for ci in range((n + chunk - 1) // chunk):
        if time.monotonic() >= stop_at:
            break
        csd = seed * 1_000_003 + ci
        queue = list(enumerate(corpus(min(chunk, n - ci * chunk), seed=csd)))

        async def worker() -> None:
            conn = KeepAlive(port, source)
            while queue and time.monotonic() < stop_at:
                idx, (ctype, body) = queue.pop()
                headers = {"X-API-Key": token, **({"Content-Type": ctype} if ctype else {})}
                r = await conn.send(request_bytes("POST", "/v1/predict", headers=headers, body=body))
                done[0] += 1
                statuses[r[0] if r else "no_answer"] += 1
                if (r is None or r[0] >= 500) and len(bad) < 20:
                    bad.append({"status": r[0] if r else None, "content_type": ctype, "bytes": len(body),
                                "sha256": hashlib.sha256(body).hexdigest(), "corpus_seed": csd, "index": idx,
                                "answer": (r[2][:300].decode(errors="replace") if r else None)})
            conn.drop()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"sent": done[0], "statuses": {str(k): v for k, v in sorted(statuses.items(), key=str)},
            "5xx": sum(v for k, v in statuses.items() if isinstance(k, int) and k >= 500),
            "no_answer": statuses.get("no_answer", 0), "cases": bad}


# -- 7. swaps under a racing attacker -------------------------------------------------------------------------------
def swaps(url: str, *, admin: str, legit: str, n: int, seconds: float, live: Path, genuine: dict, sets: dict,
          seed: int, probe: bytes, expect: dict, same) -> dict:
    """``n`` admin swaps to ``live`` while a thread (bench/bundle_race.py's racer) keeps replacing its files with
    attacker versions and back; after each accepted swap, the served version, manifest and the answer to the
    probe image are compared with the genuine ones (an unsigned load is any difference)."""
    import httpx

    from bundle_race import racer

    stop, raced, out = threading.Event(), Counter(), Counter()
    unsigned_cases: list[dict] = []
    thread = threading.Thread(target=racer, args=(live, genuine, sets, stop, seed, raced), daemon=True)
    t_end = time.monotonic() + seconds
    thread.start()
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            for _ in range(n):
                if time.monotonic() > t_end:
                    break
                r = c.post("/v1/admin/bundle", json={"path": str(live)}, headers={"X-API-Key": admin})
                out[str(r.status_code)] += 1
                if r.status_code != 200:
                    continue
                seen = served_answer(c, admin=admin, legit=legit, probe=probe)
                if not same(seen, expect):
                    out["unsigned_loads"] += 1
                    if len(unsigned_cases) < 5:
                        unsigned_cases.append({"swap_answer": r.json(), "seen": seen})
    finally:
        stop.set()
        thread.join(10)
    return {"attempts": sum(v for k, v in out.items() if k.isdigit()), "statuses": {k: v for k, v in out.items()
                                                                                   if k.isdigit()},
            "unsigned_loads": out["unsigned_loads"], "attacker_rewrites": dict(raced), "cases": unsigned_cases}


def served_answer(c, *, admin: str, legit: str, probe: bytes) -> dict:
    """What the server serves now: version and manifest (admin), and the full-tier answer to the probe image."""
    m = c.get("/v1/model", headers={"X-API-Key": admin}).json()
    p = c.post("/v1/predict", content=probe, headers={"X-API-Key": legit, "Content-Type": "application/x-npy"})
    res = p.json()["results"][0] if p.status_code == 200 else {"status": p.status_code}
    return {"version": m.get("bundle_version"), "manifest_sha256": hashlib.sha256(json.dumps(
        m.get("manifest"), sort_keys=True).encode()).hexdigest(), "label": res.get("label"),
        "rejected": res.get("rejected"), "probabilities": res.get("probabilities"),
        "detector_scores": res.get("detector_scores")}


def same_answer(seen: dict, expect: dict, tol: float = 1e-4) -> bool:
    """The genuine bundle's version, manifest and answer (floats within ``tol``: batching may reorder sums)."""
    def close(a, b) -> bool:
        if isinstance(a, dict) and isinstance(b, dict):
            return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
        if isinstance(a, list) and isinstance(b, list):
            return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
        if isinstance(a, float) and isinstance(b, float):
            return abs(a - b) <= tol * max(1.0, abs(b))
        return a == b
    return close(seen, expect)


# -- 8. score leak, and the rate-limited key -----------------------------------------------------------------------
def score_leak(url: str, *, label: str, admin: str, scraper: str, png: bytes) -> dict:
    import httpx

    with httpx.Client(base_url=url, timeout=30) as c:
        m = {"none": c.get("/metrics").status_code,
             "label": c.get("/metrics", headers={"X-API-Key": label}).status_code,
             "metrics_key": c.get("/metrics", headers={"X-API-Key": scraper}).status_code}
        label_model = c.get("/v1/model", headers={"X-API-Key": label}).text
        admin_model = c.get("/v1/model", headers={"X-API-Key": admin}).text
        pr = c.post("/v1/predict", content=png, headers={"X-API-Key": label, "Content-Type": "image/png"})
    first = pr.json()["results"][0] if pr.status_code == 200 else {}
    return {"metrics_status": m, "label_model_has_threshold_": "threshold_" in label_model,
            "admin_model_has_threshold_": "threshold_" in admin_model, "label_predict_status": pr.status_code,
            "label_predict_fields": sorted(k for k, v in first.items() if v is not None)}


def rate_limited(url: str, *, token: str, n: int = 12) -> dict:
    import httpx

    with httpx.Client(base_url=url, timeout=30) as c:
        rs = [c.get("/v1/model", headers={"X-API-Key": token}) for _ in range(n)]
    codes = [r.status_code for r in rs]
    return {"statuses": codes, "retry_after": next((r.headers.get("retry-after") for r in rs
                                                    if r.status_code == 429), None)}


def legit_check(url: str, *, token: str, png: bytes, n: int = 20) -> Counter:
    import httpx

    with httpx.Client(base_url=url, timeout=30) as c:
        return Counter(c.post("/v1/predict", content=png, headers={"X-API-Key": token, "Content-Type": "image/png"}
                              ).status_code for _ in range(n))


def run(coro):
    return asyncio.run(coro)


__all__ = ["audit_counts", "build", "connection_limits", "fuzz", "held_uploads", "keyless_flood", "legit_check",
           "rate_limited", "read_response", "run", "same_answer", "score_leak", "served_answer", "slowloris",
           "statuses_of_key", "swaps"]
