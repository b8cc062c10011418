"""Issue 26: natural-image model stealing on one small data set, offline (no HTTP; each API key is a replayed query
log, so every detector sees exactly that key's stream in chunks of 16 queries).

- Victim: tiny_cnn, the test suite's recipe (15 epochs, lr 3e-3, seed = --seed) on the data set's 70/10/20 split.
- Detectors: copycat and Sybil (pixel subspace, 16 components, fitted on the service's calibration streams of the
  training split; per-query rate 5%, null 10%, alpha 1e-4), stateful (k 50, history 1000, 0.1% quantile) and PRADA
  (1% quantile, classes = victim labels), calibrated on the same streams.
- Benign keys (test+val images only): natural stream (1500), one class dominating (80% one class, 1500), retry
  bursts (1500), 20 images repeated (1500), long-running natural key (3000); --keys keys of each profile.
- Attackers (scores, --budget queries): copycat on the training split (in distribution), copycat on the other
  built-in set resized (out of distribution), Jacobian augmentation (seed set 150), and the OOD copycat split over
  5 keys interleaved with 5 natural keys (Sybil).
- Fidelity: agreement with the victim's labels on the test split (95% Wilson interval); at detection = a fresh
  surrogate trained on the log up to the first flag of any per-key detector of this issue (copycat, Sybil).
- Output defense: adaptive misinformation, tau = the 0.5% quantile of the victim's confidence on training images.
- Ownership: DAWN watermark (rate --wm-rate), copies = copycat in distribution at 1000 and 2000 queries; independent
  models = tiny_cnn seeds +1..+3 and small_cnn seeds +1, +2 on the same training split.

    PYTHONPATH=src nice -n 10 python bench/measure_model_stealing.py --data digits --seed 0 --out steal_digits_s0.json
"""
from __future__ import annotations

import argparse
import json
import logging
import time

import torch

from safedl import registry
from safedl.attacks.extraction.base import ExtractionOracle
from safedl.data import load_builtin, stratified_split
from safedl.defenses.ownership import ResponseWatermark, WatermarkedModel, verify_ownership
from safedl.defenses.postprocess.adaptive_misinformation import AdaptiveMisinformation
from safedl.defenses.query import PRADA, CopycatDetector, StatefulDetector, SybilDetector
from safedl.defenses.query.streams import burst_stream, calibration_streams, in_order_stream
from safedl.evaluate.attack_extraction import attacker_pool
from safedl.models import TrainRecipe, build_model, train_model, with_normalization
from safedl.utils.progress import set_enabled
from safedl.utils.stats import proportion
from safedl.utils.tensors import seed_everything

log = logging.getLogger("bench.steal")
CHUNK = 16


def victim_model(sp, seed: int, arch: str = "tiny_cnn"):
    seed_everything(seed)
    c, h, _ = sp.shape
    m = with_normalization(build_model(arch, in_channels=c, num_classes=sp.num_classes, image_size=h), sp.mean, sp.std)
    train_model(m, sp.train, recipe=TrainRecipe(epochs=15, batch_size=64, lr=3e-3, augment="none"), seed=seed)
    return m.eval()


def labels(m, x):
    with torch.no_grad():
        return m(x).argmax(1)


def benign_keys(x, y, n_keys: int, seed: int) -> dict[str, torch.Tensor]:
    out = {}
    for j in range(n_keys):
        g = torch.Generator().manual_seed(seed * 1000 + j)
        xr = torch.roll(x, -97 * j, 0)
        cls = torch.where(y == j % 10)[0]
        pick = torch.where(torch.rand(1500, generator=g) < 0.8, cls[torch.randint(len(cls), (1500,), generator=g)],
                           torch.randint(len(x), (1500,), generator=g))
        out[f"natural-{j}"] = in_order_stream(xr, 1500, seed=seed + j)
        out[f"one_class-{j}"] = x[pick]
        out[f"bursts-{j}"] = burst_stream(xr, 1500, seed=seed + 50 + j)
        out[f"repeats-{j}"] = xr[torch.randint(20, (1500,), generator=g)]
        out[f"long_running-{j}"] = in_order_stream(xr, 3000, seed=seed + 100 + j)
    return out


def replay(dets: dict, streams: dict[str, torch.Tensor], *, interleave: bool = False) -> dict[str, dict[str, int]]:
    """First flag (key query number) per key and detector; keys sent round-robin when ``interleave``."""
    first: dict[str, dict[str, int]] = {k: {} for k in streams}
    longest = max(len(s) for s in streams.values())
    order = ([(i, k) for i in range(0, longest, CHUNK) for k in streams] if interleave
             else [(i, k) for k in streams for i in range(0, len(streams[k]), CHUNK)])
    for i, k in order:
        xb = streams[k][i:i + CHUNK]
        if not len(xb):
            continue
        for name, det in dets.items():
            v = det.observe(k, xb)
            if v.flagged and name not in first[k]:
                first[k][name] = v.first_at or v.n_seen
    return first


def fidelity(copy, victim, tx) -> dict:
    return proportion(int((labels(copy, tx) == labels(victim, tx)).sum()), len(tx))


def steal(victim, attack, pool, budget: int, post=None, output: str = "scores"):
    o = ExtractionOracle(victim, budget=budget, output=output, postprocess=post)
    res = attack.extract(o, pool, num_classes=10)
    return res.surrogate, o.log()


def copy_on_prefix(attack, log_, n: int, pool):
    s = attack.fresh_surrogate(tuple(pool.shape[1:]), 10, pool)
    return attack.train_surrogate(s, log_.x[:n], log_.answers[:n], log_.output, num_classes=10,
                                  device=torch.device("cpu"))


def make_detectors(sp, victim, seed: int) -> dict:
    calib = calibration_streams(sp.train.x, seed=seed)
    cc = CopycatDetector().calibrate(calib)
    return {"copycat": cc, "sybil": SybilDetector(subspace=cc.subspace_),
            "stateful": StatefulDetector(k=50, history=1000).calibrate(calib, fpr=1e-3),
            "prada": PRADA(num_classes=10, classify=lambda x: labels(victim, x)).calibrate(calib, fpr=0.01)}


def fresh(dets: dict) -> dict:
    for d in dets.values():
        d.reset()
    return dets


def attackers(args, sp, victim, other: str) -> dict:
    b, pool_ood = args.budget, attacker_pool(sp, other)
    made = {}
    for name, attack, pool in (
            ("copycat_in", registry.create("extraction", "copycat", pool="train", epochs=10, seed=args.seed),
             sp.train.x),
            ("copycat_ood", registry.create("extraction", "copycat", pool=other, epochs=10, seed=args.seed), pool_ood),
            ("jacobian", registry.create("extraction", "jacobian_augmentation", epochs=10, seed=args.seed),
             sp.train.x)):
        copy, lg = steal(victim, attack, pool, b)
        made[name] = (attack, pool, copy, lg)
    return made


def detection_rows(args, sp, victim, dets, made) -> list[dict]:
    tx, rows = sp.test.x, []
    for name, (attack, pool, copy, lg) in made.items():
        first = replay(fresh(dets), {name: lg.x})[name]
        ours = min([first[d] for d in ("copycat", "sybil") if d in first], default=None)
        at = fidelity(copy_on_prefix(attack, lg, ours, pool), victim, tx) if ours else None
        rows.append({"attacker": name, "keys": 1, "queries": len(lg), "first_flag": first,
                     "fidelity_at_detection": at, "fidelity_end": fidelity(copy, victim, tx)})
    attack, pool, copy, lg = made["copycat_ood"]
    split = {f"sybil-{j}": part for j, part in enumerate(lg.x.chunk(5))}
    nat = {f"natural-{j}": in_order_stream(torch.roll(torch.cat([sp.test.x, sp.val.x]), -131 * j, 0), len(lg) // 5 * 3,
                                           seed=args.seed + 300 + j) for j in range(5)}
    first = replay(fresh(dets), {**split, **nat}, interleave=True)
    rows.append({"attacker": "copycat_ood split over 5 keys", "keys": 5, "queries": len(lg),
                 "first_flag": {k: first[k] for k in split},
                 "benign_keys_flagged_alongside": {k: first[k] for k in nat if first[k]},
                 "fidelity_end": fidelity(copy, victim, tx)})
    return rows


def benign_rows(args, sp, dets) -> dict:
    ben = benign_keys(torch.cat([sp.test.x, sp.val.x]), torch.cat([sp.test.y, sp.val.y]), args.keys, args.seed)
    first = replay(fresh(dets), ben, interleave=True)  # one population: the Sybil pool sees all keys together
    out = {}
    for name in dets:
        for prof in ("natural", "one_class", "bursts", "repeats", "long_running"):
            keys = [k for k in ben if k.startswith(prof + "-")]
            out.setdefault(name, {})[prof] = proportion(sum(name in first[k] for k in keys), len(keys))
        out[name]["all"] = proportion(sum(name in first[k] for k in ben), len(ben))
    return out


def defense_rows(args, sp, victim, made) -> dict:
    tx, ty = sp.test.x, sp.test.y
    with torch.no_grad():
        am = AdaptiveMisinformation().calibrate(victim(sp.train.x).softmax(1), max_flip=0.005)
        acc = proportion(int((victim(tx).argmax(1) == ty).sum()), len(ty))
        acc_am = proportion(int((am(victim(tx)).argmax(1) == ty).sum()), len(ty))
    out = {"tau": am.tau, "benign_top1": acc, "benign_top1_with_am": acc_am, "attackers": {}}
    for name, (attack, pool, copy, _) in made.items():
        copy_am, _ = steal(victim, attack, pool, args.budget, post=am)
        out["attackers"][name] = {"fidelity": fidelity(copy, victim, tx), "fidelity_with_am": fidelity(copy_am, victim, tx)}
    attack, pool = made["copycat_in"][:2]
    lab, _ = steal(victim, attack, pool, args.budget, output="labels")
    out["label_tier_copycat_in_fidelity"] = fidelity(lab, victim, tx)  # label keys: no misinformation
    return out


def _own(wm, lg, victim, m) -> dict:
    """Both tests of one suspect on a copier's log: rank-sum on its scores, binomial on its labels."""
    vl = labels(victim, lg.x)
    with torch.no_grad():
        sc = m(lg.x).softmax(1)
    r = verify_ownership(watermark=wm, evidence=lg.x, victim_labels=vl, suspect_scores=sc)
    b = verify_ownership(watermark=wm, evidence=lg.x, victim_labels=vl, suspect_labels=sc.argmax(1))
    return {"watermarked": r.n, "matches": r.matches, "rank_sum": r.rank_sum, "p_rank": r.p_value,
            "p_label": b.p_value}


def ownership_rows(args, sp, victim, rates) -> list[dict]:
    """Copies trained on watermarked answers (copycat in distribution; 10 epochs, the bench's attacker, and 40, one
    that fits its answers), and 5 independent models tested on the same copier's queries."""
    indep = [(f"{a} seed {args.seed + s}", victim_model(sp, args.seed + s, a))
             for a, s in (("tiny_cnn", 1), ("tiny_cnn", 2), ("tiny_cnn", 3), ("small_cnn", 1), ("small_cnn", 2))]
    rows = []
    for rate in rates:
        wm = ResponseWatermark(key=f"bench-{args.seed}".encode().ljust(32, b"k"), num_classes=10, rate=rate)
        served = WatermarkedModel(victim, wm)
        for budget, epochs, output in ((1000, 10, "scores"), (1000, 40, "scores"), (2000, 10, "scores"),
                                       (2000, 40, "scores"), (1000, 40, "labels")):
            attack = registry.create("extraction", "copycat", pool="train", epochs=epochs, seed=args.seed)
            copy, lg = steal(served, attack, sp.train.x, budget, output=output)
            ind = {n: _own(wm, lg, victim, m) for n, m in indep}
            rows.append({"rate": rate, "queries": budget, "epochs": epochs, "output": output,
                         **_own(wm, lg, victim, copy),
                         "independent_p_rank": {n: v["p_rank"] for n, v in ind.items()},
                         "independent_p_label": {n: v["p_label"] for n, v in ind.items()},
                         "copy_fidelity": fidelity(copy, victim, sp.test.x)})
            log.info("ownership %s", rows[-1])
    return rows


class Poisoned(torch.nn.Module):
    """``victim`` answering through LastLayerMAD: log of the poisoned probabilities (softmax gives them back)."""

    def __init__(self, victim, mad):
        super().__init__()
        self.victim, self.mad = victim, mad

    def forward(self, x):
        with torch.no_grad():
            return self.mad(x, self.victim(x).softmax(1)).clamp_min(1e-12).log()


def poisoning_rows(args, sp, victim, other: str) -> dict:
    """Copy fidelity with and without LastLayerMAD (surrogate: a randomly initialised small_cnn, seed + 7), per
    L1 budget, for the copycat in and out of distribution (scores, --budget queries, 10 epochs)."""
    from safedl.defenses.postprocess.prediction_poisoning import LastLayerMAD

    seed_everything(args.seed + 7)
    c, h, _ = sp.shape
    sur = with_normalization(build_model("small_cnn", in_channels=c, num_classes=10, image_size=h), sp.mean, sp.std)
    tx, ty = sp.test.x, sp.test.y
    out = {"benign_top1": proportion(int((labels(victim, tx) == ty).sum()), len(ty)), "attackers": {}}
    pools = {"copycat_in": ("train", sp.train.x), "copycat_ood": (other, attacker_pool(sp, other))}
    for name, (pool_name, pool) in pools.items():
        row = {}
        for eps in (0.0, 0.5, 1.0, 2.0):
            served = victim if eps == 0 else Poisoned(victim, LastLayerMAD(surrogate=sur, epsilon=eps))
            if eps:
                row.setdefault("benign_top1_with", {})[str(eps)] = proportion(
                    int((labels(served, tx) == ty).sum()), len(ty))
            attack = registry.create("extraction", "copycat", pool=pool_name, epochs=10, seed=args.seed)
            copy, _ = steal(served, attack, pool, args.budget)
            row[str(eps)] = fidelity(copy, victim, tx)
            log.info("poisoning %s eps %g: %s", name, eps, row[str(eps)])
        out["attackers"][name] = row
    return out


def _pct(m) -> str:
    return "-" if m is None else f"{100 * m['value']:.1f}% [{100 * m['ci95'][0]:.1f}, {100 * m['ci95'][1]:.1f}]"


def ownership_table(res: dict) -> list[str]:
    """The ownership rows as a Markdown table."""
    lines = ["| watermark rate | copier's answers | queries | copy epochs | watermarked | copy matches | copy p "
             "(rank-sum) | copy p (labels) | independent models' min p (rank-sum / labels) | copy fidelity |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for o in res["ownership"]:
        lines.append(f"| {o['rate']:g} | {o.get('output', 'scores')} | {o['queries']} | {o.get('epochs', 10)} | "
                     f"{o['watermarked']} | {o['matches']} | {o.get('p_rank', float('nan')):.3g} | "
                     f"{o.get('p_label', o.get('copy_p', float('nan'))):.3g} | "
                     f"{min(o.get('independent_p_rank', {'-': float('nan')}).values()):.3g} / "
                     f"{min(o.get('independent_p_label', o.get('independent_p', {})).values()):.3g} | "
                     f"{_pct(o['copy_fidelity'])} |")
    return lines


def poisoning_table(res: dict) -> list[str]:
    """Copy fidelity without and with LastLayerMAD per L1 budget."""
    p = res["poisoning"]
    eps = [e for e in next(iter(p["attackers"].values())) if e not in ("0.0", "benign_top1_with")]
    lines = ["| attacker | fidelity without | " + " | ".join(f"with MAD, L1 {e}" for e in eps) + " |",
             "|---|---|" + "---|" * len(eps)]
    for name, row in p["attackers"].items():
        lines.append(f"| {name} | {_pct(row['0.0'])} | " + " | ".join(_pct(row[e]) for e in eps) + " |")
    first = next(iter(p["attackers"].values()))["benign_top1_with"]
    lines += ["", f"benign top-1 {_pct(p['benign_top1'])}; with MAD: " +
              ", ".join(f"L1 {e}: {_pct(v)}" for e, v in first.items())]
    return lines


def render(res: dict) -> str:
    """The README tables of one result file."""
    if "poisoning" in res:  # --only poisoning
        return "\n".join([f"{res['data']}, seed {res['seed']}, {res['budget']} queries", ""] + poisoning_table(res))
    if "benign" not in res:  # --only ownership
        return "\n".join([f"{res['data']}, seed {res['seed']}, ownership only", ""] + ownership_table(res))
    b, d = res["benign"], res["output_defense"]
    lines = [f"{res['data']}, seed {res['seed']}, {res['budget']} queries per attacker",
             "", "| attacker | keys | first flag (key query) by detector | fidelity at detection | fidelity at end |"
             " fidelity with adaptive misinformation |", "|---|---|---|---|---|---|"]
    for r in res["attackers"]:
        am = d["attackers"].get(r["attacker"], {}).get("fidelity_with_am")
        flags = ", ".join(f"{k}: {v}" for k, v in r["first_flag"].items()) or "never"
        lines.append(f"| {r['attacker']} | {r['keys']} | {flags} | {_pct(r.get('fidelity_at_detection'))} | "
                     f"{_pct(r['fidelity_end'])} | {_pct(am)} |")
    lines += ["", "| detector | benign keys falsely flagged (all profiles) | natural | one class | bursts | repeats |"
              " long-running |", "|---|---|---|---|---|---|---|"]
    for name, row in b.items():
        lines.append(f"| {name} | {_pct(row['all'])} | " + " | ".join(
            _pct(row[p]) for p in ("natural", "one_class", "bursts", "repeats", "long_running")) + " |")
    lines += ["", f"Adaptive misinformation (tau {d['tau']:.3f}): benign top-1 {_pct(d['benign_top1'])} -> "
              f"{_pct(d['benign_top1_with_am'])}; a label-tier copycat (in distribution, no misinformation) reaches "
              f"fidelity {_pct(d['label_tier_copycat_in_fidelity'])}."]
    return "\n".join(lines + [""] + ownership_table(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="digits", choices=("digits", "mnist5k"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", type=int, default=1000)
    ap.add_argument("--keys", type=int, default=10, help="benign keys per traffic profile")
    ap.add_argument("--wm-rate", type=float, default=0.005)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="result JSON")
    ap.add_argument("--only", choices=("ownership", "poisoning"), help="run this part only (its rows in the result JSON)")
    ap.add_argument("--render", help="print the README tables of this result JSON and exit")
    args = ap.parse_args()
    if args.render:
        with open(args.render, encoding="utf-8") as fh:
            print(render(json.load(fh)))  # noqa: T201 (the bench's output)
        return
    if not args.out:
        ap.error("--out is required (or --render)")
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    set_enabled(False)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    sp = stratified_split(load_builtin(args.data), test_fraction=0.2, val_fraction=0.1, seed=args.seed)
    other = "mnist5k" if args.data == "digits" else "digits"
    victim = victim_model(sp, args.seed)
    if args.only:
        part = (ownership_rows(args, sp, victim, [args.wm_rate]) if args.only == "ownership"
                else poisoning_rows(args, sp, victim, other))
        res = {"data": args.data, "seed": args.seed, "budget": args.budget, args.only: part,
               "seconds": round(time.perf_counter() - t0, 1)}
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(res, fh, indent=1)
        return
    dets = make_detectors(sp, victim, args.seed)
    log.info("detectors calibrated (%.0f s)", time.perf_counter() - t0)
    res = {"data": args.data, "seed": args.seed, "budget": args.budget, "benign": benign_rows(args, sp, dets)}
    log.info("benign done (%.0f s)", time.perf_counter() - t0)
    made = attackers(args, sp, victim, other)
    res["attackers"] = detection_rows(args, sp, victim, dets, made)
    log.info("attackers done (%.0f s)", time.perf_counter() - t0)
    res["output_defense"] = defense_rows(args, sp, victim, made)
    res["ownership"] = ownership_rows(args, sp, victim, [args.wm_rate])
    res["seconds"] = round(time.perf_counter() - t0, 1)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(res, fh, indent=1)
    log.info("wrote %s (%.0f s)", args.out, res["seconds"])


if __name__ == "__main__":
    main()
