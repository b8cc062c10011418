"""Issue 13, offline part: per-key query detectors against safedl's own query attacks and extraction attacks, the
benign false-alarm rate, and the extraction curves with and without each output / training defense (mnist5k).

No HTTP: each API key is simulated by wrapping the victim in ``ObservedModel``, which the counted query interface
calls once per query batch, so every detector sees exactly the stream that key would send.

- Detectors: ``StatefulDetector`` (Chen et al.; k=50, history 1000, threshold = the 0.1% quantile of per-query k-NN
  distances on benign calibration streams), once on flattened pixels and once on the victim's penultimate features
  ("stateful_features"), and ``PRADA`` (Juuti et al.; grouped by the victim's
  label, delta = the 1% quantile of W on the same calibration streams). Calibration streams use train-split images; evaluation streams use
  test+val images only.
- Attack keys: square (L-inf 0.3, scores), nes (L-inf 0.3, scores), hopskipjump (L2, labels, 1000 queries per image):
  each key attacks consecutive test images one at a time until it has sent ``--attack-budget`` queries; copycat
  (scores) and jacobian_augmentation (labels) keys steal with that budget, one seed per key.
- Benign keys (5,000 queries each): "in order" = the test+val images in order, then further passes with a fresh
  random 2-pixel shift per pass; "bursts" = each image sent 1-5 times with small random crops (shift) and brightness
  changes (x0.8-1.2), as a user retrying would.
- Extraction curves (250/500/1000/2000/4000 queries; fidelity and surrogate accuracy on the 1000 test images, 95%
  Wilson intervals; transfer of PGD L-inf 0.3 from the largest-budget copy to the victim on 500 test images):
  copycat with scores and jacobian_augmentation with labels, undefended and under rounding (1 decimal), top_k (k=1),
  class_labels, reverse_sigmoid (beta 0.7, gamma 0.1) and a dp_training victim (epsilon 8).

The README numbers (seed 0) ran on one CUDA GPU (torch 2.11, 12 CPU threads), the two parts as two processes
(wall 127 s and 100 s there):

    PYTHONPATH=src python bench/measure_query_detection.py --device cuda --threads 12 --skip curves --out det.json
    PYTHONPATH=src python bench/measure_query_detection.py --device cuda --threads 12 --skip detection --out cur.json

On a CPU use ``--device cpu`` under ``nice -n 10``; the curves part trains 45 small_cnn surrogates and a DP-SGD
victim, far beyond 25 minutes on 2 shared cores, so there add ``--surrogate tiny_cnn --surrogate-params
'{"width": 16, "hidden": 64}' --epochs 10`` (weaker copies: not the README numbers).

``--quick`` runs a small version (fewer keys, budgets, curves) for a smoke check.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from typing import Any

import torch

from measure_evasion import default_model  # noqa: E402  (bench/ is on sys.path when run as a script)
from safedl import registry
from safedl.evaluate.attack_extraction import deployed_labels, extraction_curve, transfer_success
from safedl.attacks.extraction.base import ExtractionOracle
from safedl.defenses.query import PRADA, ObservedModel, StatefulDetector
from safedl.defenses.query.streams import burst_stream, calibration_streams, in_order_stream
from safedl.models import TrainRecipe, build_model, with_normalization
from safedl.utils.progress import set_enabled
from safedl.utils.stats import proportion
from safedl.utils.tensors import seed_everything

log = logging.getLogger("measure_query_detection")


# ---------------------------------------------------------------------------------------------- streams

class VictimFeatures(torch.nn.Module):
    """The victim's penultimate features (its own normalization first): an encoder for the stateful detector."""

    def __init__(self, model: torch.nn.Sequential):
        super().__init__()
        self.norm, self.net = model[0], model[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(self.norm(x))


def make_detectors(calib: list[torch.Tensor], model) -> dict[str, Any]:
    t0 = time.perf_counter()
    sd = StatefulDetector(k=50, history=1000).calibrate(calib, fpr=1e-3)
    sf = StatefulDetector(k=50, history=1000, encoder=VictimFeatures(model)).calibrate(calib, fpr=1e-3)
    pr = PRADA(classify=lambda x: model(x).argmax(1)).calibrate(calib, fpr=0.01)
    log.info("calibrated on %d benign streams in %.0fs: stateful threshold %.4f (pixels), %.4f (victim features), "
             "PRADA delta %.4f", len(calib), time.perf_counter() - t0, sd.threshold_, sf.threshold_, pr.delta_)
    return {"stateful": sd, "stateful_features": sf, "prada": pr}


def feed(model, dets, key: str, stream: torch.Tensor, chunk: int = 16) -> dict[str, int]:
    om = ObservedModel(model, dets, key=key, chunk=chunk)
    stream = stream.to(DEVICE)
    with torch.no_grad():
        for i in range(0, len(stream), 256):
            om(stream[i:i + 256])
    return om.first_detection_


# ---------------------------------------------------------------------------------------------- attack keys

EVASION = {"square": dict(eps=0.3, max_queries=1000), "nes": dict(eps=0.3, max_queries=1000),
           "hopskipjump": dict(max_queries=1000)}


def attack_key(model, dets, name: str, key: str, x: torch.Tensor, y: torch.Tensor, budget: int) -> dict[str, Any]:
    """One key running ``name`` until it has sent ``budget`` queries; the detectors' first flags."""
    om = ObservedModel(model, dets, key=key)
    if name in EVASION:
        attack = registry.create("evasion", name, **EVASION[name])
        for i in range(len(x)):
            left = budget - om.queries_
            if left <= 0 or len(om.first_detection_) == len(dets):
                break
            attack.max_queries = min(EVASION[name]["max_queries"], left)
            attack(om, x[i:i + 1], y[i:i + 1])
    else:
        seed = int(key.rsplit("-", 1)[1])
        kw = {"surrogate": "tiny_cnn", "epochs": 5, "seed": seed}
        attack = registry.create("extraction", name, **kw)
        output = "scores" if name == "copycat" else "labels"
        attack.extract(ExtractionOracle(om, budget=budget, output=output, device=DEVICE), POOL, num_classes=10,
                       device=DEVICE)
    return {"sent": om.queries_, "first": dict(om.first_detection_)}


def summarize(rows: list[dict[str, Any]], budget: int, names: list[str]) -> dict[str, Any]:
    out = {}
    for det in names + ["any"]:
        firsts = [min(r["first"].values()) if det == "any" and r["first"] else r["first"].get(det)
                  for r in rows]
        hit = [f for f in firsts if f is not None and f <= budget]
        out[det] = {"median_queries_to_detect": statistics.median(hit) if hit else None,
                    "never_detected": proportion(len(rows) - len(hit), len(rows)),
                    "detected_within_500": proportion(sum(f <= 500 for f in hit), len(rows))}
    return out


POOL: torch.Tensor = torch.empty(0)
DEVICE = torch.device("cpu")


def detection_part(model, splits, args) -> dict[str, Any]:
    global POOL
    POOL = splits.train.x.to(DEVICE)
    tr = splits.train.x
    calib = [s.to(DEVICE) for s in calibration_streams(tr, seed=0)]
    dets = make_detectors(calib, model)
    names = list(dets)
    benign_x = torch.cat([splits.test.x, splits.val.x])
    res: dict[str, Any] = {"thresholds": {n: getattr(d, "threshold_", None) or getattr(d, "delta_", None)
                                          for n, d in dets.items()}}
    for kind, fn in (("in_order", in_order_stream), ("bursts", burst_stream)):
        flagged = {d: 0 for d in names + ["any"]}
        for j in range(args.benign_keys):
            for d in dets.values():
                d.reset()
            start = (j * 97) % len(benign_x)
            stream = fn(torch.roll(benign_x, -start, 0), args.benign_queries, seed=j)
            first = feed(model, dets, f"benign-{kind}-{j}", stream)
            for d in names:
                flagged[d] += d in first
            flagged["any"] += bool(first)
        res[f"benign_{kind}"] = {d: proportion(k, args.benign_keys) for d, k in flagged.items()}
        save(args, "detection", res)
        log.info("benign %s: keys flagged %s of %d", kind, flagged, args.benign_keys)
    x, y = splits.test.x.to(DEVICE), splits.test.y.to(DEVICE)
    for name in list(EVASION) + ["copycat", "jacobian_augmentation"]:
        rows = []
        for j in range(args.attack_keys):
            for d in dets.values():
                d.reset()
            lo = j * 20
            rows.append(attack_key(model, dets, name, f"{name}-{j}", x[lo:lo + 20], y[lo:lo + 20], args.attack_budget))
        res[name] = summarize(rows, args.attack_budget, names) | {"keys": rows}
        save(args, "detection", res)
        log.info("%s: %s", name, {d: (v["median_queries_to_detect"], v["never_detected"]["value"])
                                   for d, v in res[name].items() if d != "keys"})
    return res


# ---------------------------------------------------------------------------------------------- curves

DEFENSES = {"none": None, "rounding": {"decimals": 1}, "top_k": {"k": 1}, "class_labels": {},
            "reverse_sigmoid": {"beta": 0.7, "gamma": 0.1}, "dp_training": {"target_epsilon": 8.0}}


def dp_victim(splits, seed: int):
    seed_everything(seed)  # the victim's architecture and seed, trained by DP-SGD
    model = with_normalization(build_model("small_cnn", in_channels=1, num_classes=10, image_size=28),
                               splits.mean, splits.std)
    trainer = registry.create("trainer", "dp_training", **DEFENSES["dp_training"])
    t0 = time.perf_counter()
    # on the CPU: safedl's dp_training passes a CPU generator that Opacus cannot use for noise on CUDA (torch 2.11)
    model = trainer.fit(model, splits.train, recipe=TrainRecipe(), seed=seed, val=splits.val).to(DEVICE)
    log.info("dp_training victim: %.0fs, epsilon spent %.2f", time.perf_counter() - t0, trainer.epsilon_spent_)
    return model.eval(), trainer.epsilon_spent_


def curves_part(model, splits, args) -> dict[str, Any]:
    res: dict[str, Any] = {}
    x_eval, y_eval = splits.test.x[:500].to(DEVICE), splits.test.y[:500].to(DEVICE)
    pool, test_x = splits.train.x.to(DEVICE), splits.test.x.to(DEVICE)
    dp_model, eps_spent = dp_victim(splits, args.seed) if "dp_training" in args.defenses else (None, None)
    res["dp_epsilon_spent"] = eps_spent
    for name, output in (("copycat", "scores"), ("jacobian_augmentation", "labels")):
        attack = registry.create("extraction", name, surrogate=args.surrogate, surrogate_params=args.surrogate_params,
                                 epochs=args.epochs, budgets=args.budgets, seed=args.seed)
        for dname in args.defenses:
            if output == "labels" and dname in ("rounding", "top_k", "class_labels"):
                continue  # label-preserving output hardening changes nothing when only labels are answered
            victim = dp_model if dname == "dp_training" else model
            post = None if dname in ("none", "dp_training") else registry.create("postprocessor", dname,
                                                                                    **DEFENSES[dname])
            t0 = time.perf_counter()
            if post is not None:
                post = post.to(DEVICE)
            points, surrogate = extraction_curve(victim, attack, pool, test_x, splits.test.y,
                                                 output=output, num_classes=10, device=DEVICE,
                                                 postprocess=post, description=f"{name}/{output}/{dname}")
            transfer = transfer_success(victim, surrogate, x_eval, y_eval, eps=0.3, postprocess=post)
            correct = deployed_labels(victim, test_x, post).cpu() == splits.test.y
            res[f"{name}/{output}/{dname}"] = {"curve": points, "transfer_success_rate": transfer,
                                               "victim_accuracy": proportion(int(correct.sum()), len(correct)),
                                               "time_s": time.perf_counter() - t0}
            log.info("%s/%s/%s (%.0fs): %s; transfer %.3f", name, output, dname, time.perf_counter() - t0,
                     " ".join(f"{p['budget']}:{p['fidelity']['value']:.3f}/{p['surrogate_accuracy']['value']:.3f}"
                              for p in points), transfer["value"])
            save(args, "curves", res)
    return res


def save(args, part: str, res: dict[str, Any]) -> None:
    """Write what is measured so far (a run stopped at its time limit keeps its finished parts)."""
    RESULTS[part] = res
    with open(args.out, "w") as fh:
        json.dump(RESULTS, fh, indent=1)


RESULTS: dict[str, Any] = {}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/measure_query_detection.json")
    ap.add_argument("--benign-keys", type=int, default=30)
    ap.add_argument("--benign-queries", type=int, default=5000)
    ap.add_argument("--attack-keys", type=int, default=10)
    ap.add_argument("--attack-budget", type=int, default=2000)
    ap.add_argument("--surrogate", default="small_cnn")
    ap.add_argument("--surrogate-params", type=json.loads, default={})
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--budgets", type=int, nargs="+", default=[250, 500, 1000, 2000, 4000])
    ap.add_argument("--defenses", nargs="+", default=list(DEFENSES))
    ap.add_argument("--skip", choices=["detection", "curves"], default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.quick:
        args.benign_keys, args.benign_queries, args.attack_keys, args.attack_budget = 2, 1500, 2, 600
        args.budgets, args.defenses = [250, 1000], ["none", "class_labels"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    set_enabled(False)
    seed_everything(args.seed)
    t0 = time.perf_counter()
    model, splits = default_model(args.seed)
    model = model.to(DEVICE)
    RESULTS.update({"args": vars(args), "torch": torch.__version__})
    if args.skip != "detection":
        detection_part(model, splits, args)
    if args.skip != "curves":
        curves_part(model, splits, args)
    save(args, "time_s", time.perf_counter() - t0)
    log.info("done in %.0fs; results in %s", RESULTS["time_s"], args.out)


if __name__ == "__main__":
    main()
