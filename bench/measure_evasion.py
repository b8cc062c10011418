"""Issue 3 "done when" numbers: robust accuracy of PGD-40, the AutoAttack-style ensemble (apgd_ce, apgd_dlr targeted,
square) and Square with 5,000 queries, on the default mnist5k small_cnn, first N test images, L-inf eps 0.3.

    .venv/bin/python bench/measure_evasion.py [--n 1000] [--square-n 1000] [--queries 5000] [--seed 0]
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from safedl import registry
from safedl.data import load_builtin, stratified_split
from safedl.models import TrainRecipe, build_model, train_model, with_normalization
from safedl.utils.progress import set_enabled
from safedl.utils.stats import proportion
from safedl.utils.tensors import predict, seed_everything

CACHE = Path("/tmp/safedl_bench_mnist5k_small_cnn.pt")


def default_model(seed: int = 0):
    """The default mnist5k small_cnn, trained with TrainRecipe() defaults (cached under /tmp)."""
    splits = stratified_split(load_builtin("mnist5k"), test_fraction=0.2, val_fraction=0.1, seed=seed)
    seed_everything(seed)
    model = with_normalization(build_model("small_cnn", in_channels=1, num_classes=10, image_size=28),
                               splits.mean, splits.std)
    if CACHE.exists():
        model.load_state_dict(torch.load(CACHE))
    else:
        train_model(model, splits.train, recipe=TrainRecipe(), seed=seed, val=splits.val)
        torch.save(model.state_dict(), CACHE)
    return model.eval(), splits


def robust(model, attack, x, y, batch: int = 250):
    t0 = time.perf_counter()
    advs, queries, broken = [], [], []
    for i in range(0, len(x), batch):
        advs.append(attack(model, x[i:i + batch], y[i:i + batch]))
        if attack.queries_ is not None:
            queries.append(attack.queries_)
        if getattr(attack, "broken_by_", None) is not None:
            broken.append(attack.broken_by_)
    attack.all_broken_by = torch.cat(broken) if broken else None
    adv = torch.cat(advs)
    dt = time.perf_counter() - t0
    ok = (predict(model, x) == y) & (predict(model, adv) == y)
    return proportion(int(ok.sum()), len(y)), dt, (torch.cat(queries) if queries else None), adv


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--square-n", type=int, default=None, help="images for the standalone Square run (default: n)")
    ap.add_argument("--queries", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    set_enabled(False)
    logging.basicConfig(level=logging.WARNING)
    model, splits = default_model(args.seed)
    x, y = splits.test.x[: args.n], splits.test.y[: args.n]
    clean = proportion(int((predict(model, x) == y).sum()), len(y))
    print(f"mnist5k small_cnn seed={args.seed} n={len(y)} eps=0.3 linf  clean_accuracy={clean['value']:.4f} "
          f"ci95={clean['ci95']}")

    def show(label, res):
        m, dt, q, _ = res
        qs = "" if q is None else f" queries median={float(q.float().median()):.0f} mean={float(q.float().mean()):.1f}"
        print(f"{label:<44} robust_accuracy={m['value']:.4f} ci95=[{m['ci95'][0]:.4f}, {m['ci95'][1]:.4f}] "
              f"n={m['n']} time={dt:.1f}s{qs}", flush=True)
        return m

    pgd = show("pgd steps=40 (random start)", robust(model, registry.create("evasion", "pgd", eps=0.3, steps=40,
                                                                              seed=args.seed), x, y))
    ens_attack = registry.create("evasion", "ensemble", eps=0.3, attacks=[
        {"name": "apgd_ce", "params": {"seed": args.seed}},
        {"name": "apgd_dlr", "params": {"n_target_classes": 9, "seed": args.seed}},
        {"name": "square", "params": {"max_queries": args.queries, "seed": args.seed}}])
    res = robust(model, ens_attack, x, y)
    ens = show("ensemble(apgd_ce, apgd_dlr targeted, square)", res)
    bb = ens_attack.all_broken_by
    print("  broken_by:", {nm: int((bb == i).sum()) for i, nm in enumerate(ens_attack.attack_names_)},
          "not broken:", int((bb < 0).sum()))
    sn = args.square_n or args.n
    sq = show(f"square max_queries={args.queries} (n={sn})",
              robust(model, registry.create("evasion", "square", eps=0.3, max_queries=args.queries, seed=args.seed),
                     x[:sn], y[:sn]))
    pgd_sub = pgd if sn == args.n else show(f"pgd steps=40 on the same {sn}",
                                            robust(model, registry.create("evasion", "pgd", eps=0.3, steps=40,
                                                                          seed=args.seed), x[:sn], y[:sn]))
    print(f"target ensemble <= pgd: {ens['value'] <= pgd['value']}  ({ens['value']:.4f} vs {pgd['value']:.4f})")
    print(f"target square within 10 points of pgd: {abs(sq['value'] - pgd_sub['value']) <= 0.10}  "
          f"({sq['value']:.4f} vs {pgd_sub['value']:.4f})")


if __name__ == "__main__":
    main()
