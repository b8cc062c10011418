"""Issue 13, online part: safedl's own query attacks and extraction attacks sent through the running service, one
API key each, and benign key streams; the service's per-key query detectors (``GET /v1/monitor/summary``) say after
how many queries each key was first flagged.

The victim is the default mnist5k small_cnn of ``measure_evasion.default_model`` (the offline bench's victim),
exported as a bundle without input defenses (the detectors under test are the service's query monitor; an input
detector would only change what the attacker sees) and served by ``safedl serve`` in a child process on 127.0.0.1
and a free port. Every key talks to it through :class:`safedl.serve.client.RemoteClassifier` (float32 .npy
bodies, exact pixels) with a hard query budget and deadline.

- Attack keys (as the offline bench, ``measure_query_detection``): square and nes (L-inf 0.3, scores, tier full)
  and hopskipjump (L2, labels, tier label) attack consecutive test images one at a time (at most 1,000 queries per
  image) until the key has sent ``--attack-budget`` queries; copycat (scores, tier full) and jacobian_augmentation
  (labels, tier label) steal with that budget from the train split. Key j uses test images 20j..20j+19 and seed
  ``seed * 1000 + j``.
- Benign keys, ``--benign-queries`` images each in requests of ``--benign-batch``: "in order" (the test+val images
  in order from a per-key offset, then passes with random 2-pixel shifts) and "bursts" (each image 1-5 times with
  small crops and brightness changes), built by ``measure_query_detection``'s stream builders.
- After each key, its row of the monitor summary (admin key) gives ``flags[detector]``, the key's 1-based query
  number at its first flag. Per attack and detector: median queries to detection among detected keys, share
  detected within 500 and within the budget; per benign stream and detector: share of keys ever flagged (95% Wilson
  intervals, n keys). Targets (issue 13): every attack detected within 500 queries, <= 1% of benign keys flagged.

Bounded: ``--time-limit-s`` of wall time for all keys (keys run interleaved, attacks and benign, so a run stopped by
the limit still covers every kind; the number not run is reported). ``--offline-detectors`` additionally wraps each
key's oracle in the offline bench's detectors (``ObservedModel``; calibrated as there) for a same-stream comparison.

    PYTHONPATH=src nice -n 10 python bench/measure_service_detection.py --seed 0 --out /tmp/service_detection.json
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from measure_evasion import default_model  # noqa: E402  (bench/ is on sys.path when run as a script)
from measure_query_detection import EVASION, make_detectors  # noqa: E402
from safedl import registry
from safedl.attacks.extraction.base import ExtractionOracle
from safedl.defenses.query import ObservedModel
from safedl.defenses.query.streams import burst_stream, in_order_stream
from safedl.deploy import SecurePipeline, export_bundle
from safedl.errors import QueryBudgetExceeded
from safedl.serve.client import RemoteClassifier, ServiceClient, ServiceError, TierError
from safedl.serve.keys import KeyStore
from safedl.serve.monitor.calibration import quantize
from safedl.utils.progress import set_enabled
from safedl.utils.stats import proportion
from safedl.utils.tensors import seed_everything

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _serve_helpers import ServerProcess  # noqa: E402  (the tests' `safedl serve` child process)

log = logging.getLogger("measure_service_detection")

ATTACKS = {"square": "full", "nes": "full", "hopskipjump": "label", "copycat": "full",
           "jacobian_augmentation": "label"}                       # attack -> the tier its key gets
ACCESS = {"full": "scores", "label": "labels"}
TARGET_QUERIES, TARGET_FALSE_ALARMS = 500, 0.01


def export_victim(model, splits, out: Path) -> Path:
    """The victim as a bundle (no input defenses), through ``safedl.deploy.export_bundle``."""
    pipe = SecurePipeline(model=model, class_names=splits.train.class_names, input_shape=splits.shape)
    spec = {"arch": "small_cnn", "arch_params": {}, "in_channels": 1, "num_classes": 10, "image_size": 28,
            "mean": list(splits.mean), "std": list(splits.std)}
    data = {"name": "mnist5k", "shape": list(splits.shape), "num_classes": 10, "class_names": splits.train.class_names}
    return export_bundle(pipe, out, model_spec=spec, data=data)


class Keys:
    """API keys of the bench (high rate limits: the measurement is of detection, not of rate limiting)."""

    def __init__(self, path: Path):
        self.store = KeyStore(path, create=True)
        self.ids: dict[str, str] = {}

    def create(self, name: str, *, tier: str = "full", scopes: tuple[str, ...] = ("predict", "model")) -> str:
        key, token = self.store.create(name=name, tier=tier, scopes=scopes, rate_per_s=10_000.0, burst=10_000,
                                       daily_quota=10**8)
        self.ids[name] = key.key_id
        return token


# ---------------------------------------------------------------------------------------------- one key

def oracle_for(url: str, token: str, *, access: str, budget: int, deadline_s: float, dets: dict | None, name: str
               ) -> tuple[RemoteClassifier, torch.nn.Module]:
    """The key's RemoteClassifier, and the module the attack queries (it, or it under the offline detectors)."""
    remote = RemoteClassifier(ServiceClient(url, token=token), access=access, max_queries=budget,
                              deadline_s=deadline_s, num_classes=10)
    if dets is None:
        return remote, remote
    for d in dets.values():
        d.reset()
    return remote, ObservedModel(remote, dets, key=name)


def run_attack(name: str, oracle: torch.nn.Module, remote: RemoteClassifier, x, y, *, budget: int, seed: int,
               pool: torch.Tensor, victim: torch.nn.Module, x_test: torch.Tensor) -> dict[str, Any]:
    """One attack key until its budget is spent (or the service stops answering it); what it achieved (evasion:
    success on the images attacked; extraction: fidelity on ``x_test``), judged on the local copy of the victim."""
    out: dict[str, Any] = {"stopped_by": "budget"}
    try:
        if name in EVASION:
            attack = registry.create("evasion", name, **EVASION[name], seed=seed)
            remote.check_attack(attack)
            fooled = attacked = 0
            for i in range(len(x)):
                left = budget - remote.queries_
                if left <= 0:
                    break
                attack.max_queries = min(EVASION[name]["max_queries"], left)
                adv = attack(oracle, x[i:i + 1], y[i:i + 1])
                with torch.no_grad():  # success judged on the local copy of the victim: no extra service query
                    fooled += int(victim(adv).argmax(1).item() != int(y[i]))
                attacked += 1
                out["attack_success"] = proportion(fooled, attacked)  # kept if the service stops the key later
        else:
            attack = registry.create("extraction", name, surrogate="tiny_cnn", epochs=5, seed=seed)
            remote.check_attack(attack)
            stolen = attack.extract(ExtractionOracle(oracle, budget=budget, output=remote.access), pool,
                                    num_classes=10).surrogate
            with torch.no_grad():  # fidelity: agreement of the stolen copy with the victim on the test images
                agree = stolen(x_test).argmax(1) == victim(x_test).argmax(1)
            out["fidelity"] = proportion(int(agree.sum()), len(agree))
    except QueryBudgetExceeded as exc:  # also the deadline
        out["stopped_by"] = f"client bound: {exc}"
    except (ServiceError, TierError) as exc:  # the monitor blocked the key or switched it to labels only
        out["stopped_by"] = f"service: {exc}"
    return out


def run_benign(stream: torch.Tensor, oracle: torch.nn.Module, *, batch: int) -> dict[str, Any]:
    out: dict[str, Any] = {"stopped_by": "budget"}
    try:
        for i in range(0, len(stream), batch):
            oracle(stream[i:i + batch])
    except QueryBudgetExceeded as exc:
        out["stopped_by"] = f"client bound: {exc}"
    except (ServiceError, TierError) as exc:
        out["stopped_by"] = f"service: {exc}"
    return out


def key_row(admin: ServiceClient, key_id: str, *, sent: int, wait_s: float = 60.0) -> dict[str, Any] | None:
    """The key's row of the monitor summary once the monitor has seen all ``sent`` queries (it works off a queue),
    or the last row seen after ``wait_s`` (None when the summary does not list the key)."""
    deadline, row = time.monotonic() + wait_s, None
    while True:
        row = next((r for r in admin.get("/v1/monitor/summary").get("keys", []) if r.get("key_id") == key_id), None)
        if (row is not None and row.get("queries", 0) >= sent) or time.monotonic() > deadline:
            return row
        time.sleep(0.2)


# ---------------------------------------------------------------------------------------------- summaries

def summarize(rows: list[dict[str, Any]], *, budget: int, source: str) -> dict[str, Any]:
    """Per detector (and 'any'): median queries to the first flag among keys flagged within the budget, shares
    flagged within 500 queries and within the budget (Wilson 95%, n keys)."""
    names = sorted({d for r in rows for d in (r.get(source) or {})})
    out = {}
    for det in names + ["any"]:
        firsts = []
        for r in rows:
            flags = {k: v for k, v in (r.get(source) or {}).items() if v is not None}
            firsts.append(min(flags.values(), default=None) if det == "any" else flags.get(det))
        hit = [f for f in firsts if f is not None and f <= budget]
        out[det] = {"median_queries_to_detect": statistics.median(hit) if hit else None,
                    "detected_within_500": proportion(sum(f <= TARGET_QUERIES for f in hit), len(rows)),
                    "detected_within_budget": proportion(len(hit), len(rows))}
    return out


def false_alarms(rows: list[dict[str, Any]], *, source: str) -> dict[str, Any]:
    names = sorted({d for r in rows for d in (r.get(source) or {})})
    flagged = lambda r, d: any(v is not None for k, v in (r.get(source) or {}).items() if d in ("any", k))  # noqa: E731
    return {d: proportion(sum(flagged(r, d) for r in rows), len(rows)) for d in names + ["any"]}


def _ci(p: dict[str, Any]) -> str:
    return f"{p['value']:.2f} [{p['ci95'][0]:.2f}, {p['ci95'][1]:.2f}] (n={p['n']})"


def markdown(res: dict[str, Any]) -> str:
    lines = [f"Service detection (seed {res['args']['seed']}, attack budget {res['args']['attack_budget']}, benign "
             f"{res['args']['benign_queries']} queries/key), source: {res['source']}", "",
             "The targets (every attack key detected within 500 queries; <= 1% of benign keys flagged) are judged "
             "on the 'any' rows (flagged by at least one detector).", "",
             "| attack | detector | median queries to detect | detected <= 500 | detected <= budget | met |",
             "|---|---|---|---|---|---|"]
    for name in ATTACKS:
        for det, s in res.get("attacks", {}).get(name, {}).get("summary", {}).items():
            met = ("yes" if s["detected_within_500"]["value"] == 1.0 else "no") if det == "any" else ""
            lines.append(f"| {name} | {det} | {s['median_queries_to_detect']} | {_ci(s['detected_within_500'])} | "
                         f"{_ci(s['detected_within_budget'])} | {met} |")
    lines += ["", "| benign stream | detector | keys flagged | met (<= 1%) |", "|---|---|---|---|"]
    for kind in ("in_order", "bursts"):
        for det, p in res.get("benign", {}).get(kind, {}).get("false_alarms", {}).items():
            met = ("yes" if p["value"] <= TARGET_FALSE_ALARMS else "no") if det == "any" else ""
            lines.append(f"| {kind} | {det} | {_ci(p)} | {met} |")
    t = res.get("throughput", {})
    lines += ["", f"Throughput: {t.get('images', 0)} images in {t.get('requests', 0)} requests over "
                  f"{t.get('wall_s', 0):.0f} s ({t.get('images_per_s', 0):.0f} images/s); keys not run for lack of "
                  f"time: {res.get('keys_not_run', 0)}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- the run

def schedule(args) -> list[tuple[str, str, int]]:
    """(group, name, j) in interleaved rounds: round j runs attack key j of each attack and benign keys j."""
    tasks = []
    for j in range(max(args.attack_keys, args.benign_keys)):
        tasks += [("attack", a, j) for a in args.attacks if j < args.attack_keys]
        tasks += [("benign", b, j) for b in ("in_order", "bursts") if j < args.benign_keys]
    return tasks


def run_task(task: tuple[str, str, int], ctx: dict[str, Any], args, deadline_s: float) -> dict[str, Any]:
    group, name, j = task
    seed = args.seed * 1000 + j
    tier = ATTACKS[name] if group == "attack" else "full"
    key_name = f"{group}-{name}-{j}"
    token = ctx["keys"].create(key_name, tier=tier)
    budget = args.attack_budget if group == "attack" else args.benign_queries
    remote, oracle = oracle_for(ctx["url"], token, access=ACCESS[tier], budget=budget, deadline_s=deadline_s,
                                dets=ctx["dets"], name=key_name)
    t0 = time.perf_counter()
    splits = ctx["splits"]
    if group == "attack":
        lo = j * 20 % len(splits.test.x)
        out = run_attack(name, oracle, remote, splits.test.x[lo:lo + 20], splits.test.y[lo:lo + 20], budget=budget,
                         seed=seed, pool=splits.train.x, victim=ctx["victim"], x_test=splits.test.x)
    else:
        fn: Callable = in_order_stream if name == "in_order" else burst_stream
        bx = ctx["benign_x"]
        # a user's images are 8-bit files: quantised as the service decodes them (attack keys send float .npy)
        stream = quantize(fn(torch.roll(bx, -((j * 97) % len(bx)), 0), args.benign_queries, seed=seed))
        out = run_benign(stream, oracle, batch=args.benign_batch)
    row = {"key": key_name, "key_id": ctx["keys"].ids[key_name], "tier": tier, "seed": seed,
           "sent": remote.queries_, "requests": remote.client.requests_, "throttled": remote.client.throttled_,
           "wall_s": time.perf_counter() - t0, **out}
    remote.client.close()
    if ctx["admin"] is not None:
        srow = key_row(ctx["admin"], row["key_id"], sent=row["sent"])
        row["service"] = None if srow is None else srow.get("flags")
        row["service_row"] = srow
    if isinstance(oracle, ObservedModel):
        row["offline"] = {d: oracle.first_detection_.get(d) for d in ctx["dets"]}
    log.info("%s: %d queries in %.1fs (%s); service flags %s; offline flags %s", key_name, row["sent"],
             row["wall_s"], row["stopped_by"], row.get("service"), row.get("offline"))
    return row


def collect(rows: list[dict[str, Any]], args, sources: list[str]) -> dict[str, Any]:
    res: dict[str, Any] = {"attacks": {}, "benign": {}}
    for name in args.attacks:
        r = [x for x in rows if x["key"].startswith(f"attack-{name}-")]
        if r:
            res["attacks"][name] = {"keys": r, "summary": summarize(r, budget=args.attack_budget, source=sources[0]),
                                    **({"summary_offline": summarize(r, budget=args.attack_budget, source="offline")}
                                       if "offline" in sources[1:] else {})}
    for kind in ("in_order", "bursts"):
        r = [x for x in rows if x["key"].startswith(f"benign-{kind}-")]
        if r:
            res["benign"][kind] = {"keys": r, "false_alarms": false_alarms(r, source=sources[0]),
                                   **({"false_alarms_offline": false_alarms(r, source="offline")}
                                      if "offline" in sources[1:] else {})}
    return res


def save(args, res: dict[str, Any]) -> None:
    Path(args.out).write_text(json.dumps(res, indent=1))
    Path(args.out).with_suffix(".md").write_text(markdown(res))


def admin_client(url: str, keys: Keys, name: str) -> ServiceClient | None:
    """An admin-scope client, or None when this service has no admin scope or no monitor summary."""
    from safedl.errors import UserError

    try:
        token = keys.create(name, scopes=("admin",))
    except UserError as exc:
        log.warning("no admin key (%s): the service's flags cannot be read", exc)
        return None
    admin = ServiceClient(url, token=token)
    try:
        admin.get("/v1/monitor/summary")
    except ServiceError as exc:
        log.warning("GET /v1/monitor/summary: %s; the service's flags cannot be read", exc)
        return None
    return admin


def monitor_config(bundle: Path, x_train: torch.Tensor, work: Path, *, seed: int) -> Path:
    """The shipped monitor rules with thresholds calibrated for ``bundle`` on benign streams of ``x_train``
    (``safedl monitor calibrate``'s procedure)."""
    from safedl.deploy import load_bundle
    from safedl.serve.monitor import DEFAULT_RULES
    from safedl.serve.monitor.calibration import calibrate, save_calibration

    t0 = time.perf_counter()
    save_calibration(calibrate(load_bundle(bundle), x_train, seed=seed), work / "calibration.json")
    log.info("monitor calibrated in %.0fs", time.perf_counter() - t0)
    cfg = work / "monitor.yml"  # the shipped file: `calibration: calibration.json` resolves next to it
    cfg.write_text(Path(DEFAULT_RULES).read_text())
    return cfg


def run_shard(shard: list, ctx: dict[str, Any], args, res: dict[str, Any], rows: list, t0: float, i: int) -> bool:
    """One fresh service for a group of keys (the summary lists the top keys by volume only); False when the time
    limit stopped it."""
    work = ctx["work"]
    extra = [*args.serve_arg] + (["--monitor-config", str(ctx["monitor"])] if ctx["monitor"] else [])
    with ServerProcess(ctx["bundle"], work / "keys.db", work / f"audit-{i}.db", *extra) as srv:
        srv.wait_ready(timeout=180)
        ctx["url"] = srv.url
        ctx["admin"] = admin_client(srv.url, ctx["keys"], f"bench-admin-{i}")
        if ctx["admin"] is None and ctx["dets"] is None:
            raise SystemExit("neither the service's monitor summary nor --offline-detectors: nothing to measure")
        for k, task in enumerate(shard):
            left = args.time_limit_s - (time.perf_counter() - t0)
            if left < 5:
                res["keys_not_run"] = res.get("keys_not_run", 0) + len(shard) - k
                return False
            rows.append(run_task(task, ctx, args, deadline_s=min(args.key_deadline_s, left)))
        if ctx["admin"] is not None:
            res.setdefault("alerts", []).extend(ctx["admin"].get("/v1/monitor/summary").get("alerts", []))
        res.setdefault("server_exit", []).append(srv.stop())
    return True


def run(args) -> dict[str, Any]:
    t_start = time.perf_counter()
    model, splits = default_model(args.seed)
    work = Path(tempfile.mkdtemp(prefix="safedl-service-detection-"))
    bundle = export_victim(model, splits, work / "bundle")
    ctx: dict[str, Any] = {"keys": Keys(work / "keys.db"), "splits": splits, "victim": model, "dets": None,
                           "benign_x": torch.cat([splits.test.x, splits.val.x]), "work": work, "bundle": bundle,
                           "monitor": monitor_config(bundle, splits.train.x, work, seed=args.seed)}
    if args.offline_detectors:
        tr = splits.train.x
        calib = [in_order_stream(tr, 3500, seed=100)] + [burst_stream(tr, 2000, seed=200 + s) for s in range(2)]
        ctx["dets"] = make_detectors(calib, model)
    sources = (["service"] if ctx["monitor"] else []) + (["offline"] if ctx["dets"] else [])
    res: dict[str, Any] = {"args": vars(args), "torch": torch.__version__, "source": sources[0] if sources else None,
                           "keys_not_run": 0, "calibration": json.loads((work / "calibration.json").read_text()),
                           "monitor_config": ctx["monitor"].read_text()}
    tasks = schedule(args)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for i in range(0, len(tasks), args.keys_per_service):
        done = run_shard(tasks[i:i + args.keys_per_service], ctx, args, res, rows, t0, i // args.keys_per_service)
        wall = time.perf_counter() - t0
        images, requests = sum(r["sent"] for r in rows), sum(r["requests"] for r in rows)
        res["throughput"] = {"images": images, "requests": requests, "wall_s": wall, "images_per_s": images / wall}
        res.update(collect(rows, args, sources))
        save(args, res)
        if not done:
            res["keys_not_run"] += max(0, len(tasks) - (i + args.keys_per_service))
            log.warning("time limit reached: %d keys not run", res["keys_not_run"])
            break
    res["time_s"] = time.perf_counter() - t_start
    save(args, res)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/service_detection.json", help="JSON results (Markdown table next to it)")
    ap.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=list(ATTACKS))
    ap.add_argument("--attack-keys", type=int, default=5, help="keys per attack (different images and seeds)")
    ap.add_argument("--attack-budget", type=int, default=2000, help="queries per attack key")
    ap.add_argument("--benign-keys", type=int, default=30, help="keys per benign stream kind")
    ap.add_argument("--benign-queries", type=int, default=5000)
    ap.add_argument("--benign-batch", type=int, default=32, help="images per benign request")
    ap.add_argument("--time-limit-s", type=float, default=1500.0, help="wall time for all keys")
    ap.add_argument("--key-deadline-s", type=float, default=300.0, help="wall time per key")
    ap.add_argument("--offline-detectors", action="store_true",
                    help="also run the offline bench's detectors on each key's stream (costs CPU)")
    ap.add_argument("--keys-per-service", type=int, default=16,
                    help="keys per service instance (a fresh one per group: the summary lists its top 20 keys)")
    ap.add_argument("--serve-arg", action="append", default=[], help="extra `safedl serve` argument (repeatable)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 key per attack, 2 benign keys per kind")
    args = ap.parse_args()
    if args.quick:
        args.attack_keys, args.attack_budget, args.benign_keys, args.benign_queries = 1, 600, 2, 1500
        args.time_limit_s = min(args.time_limit_s, 300.0)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    set_enabled(False)
    seed_everything(args.seed)
    res = run(args)
    print(markdown(res), end="")  # noqa: T201  (the table is the script's output)
    log.info("done in %.0fs; results in %s and %s", res["time_s"], args.out, Path(args.out).with_suffix(".md"))


if __name__ == "__main__":
    main()
