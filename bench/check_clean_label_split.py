"""Did splitting ``clean_label`` into ``feature_collision`` and ``label_consistent_backdoor`` change any poison?

Poisons scikit-learn's digits (seed 0 split) with each clean-label attack through one shared surrogate and saves the
poisoned sets; run it once on a checkout from before the split (``--names old``: ``clean_label`` with ``method``)
and once on today's code (``--names new``), then compare the two files bit for bit:

    git worktree add --detach /tmp/cl-old 4f3f657^
    PYTHONPATH=src .venv/bin/python bench/check_clean_label_split.py --names new --surrogate /tmp/cl_sur.pt \
        --out /tmp/cl_new.pt                       # trains and saves the surrogate the first time
    (cd /tmp/cl-old && PYTHONPATH=src /work/main/.venv/bin/python $OLDPWD/bench/check_clean_label_split.py \
        --names old --surrogate /tmp/cl_sur.pt --out /tmp/cl_old.pt)
    .venv/bin/python bench/check_clean_label_split.py --compare /tmp/cl_old.pt /tmp/cl_new.pt

Exit code of ``--compare``: 0 when every poisoned set is identical, 1 otherwise.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

log = logging.getLogger("check_clean_label_split")

#: (case, the new registry name, the old alias's method, parameters both take)
CASES = [
    ("lcb_default_small", "label_consistent_backdoor", "clean_label_backdoor", {"steps": 3, "eot_samples": 2}),
    ("lcb_one_corner_no_eot", "label_consistent_backdoor", "clean_label_backdoor",
     {"eps": 0.1, "steps": 5, "all_corners": False, "eot_shift": 0, "class_fraction": 0.3, "target_class": 3}),
    ("fc_default", "feature_collision", "feature_collision", {"n_victims": 3, "fc_steps": 30}),
    ("fc_source_6", "feature_collision", "feature_collision",
     {"n_victims": 2, "poisons_per_victim": 4, "fc_steps": 20, "source_class": 6, "opacity": 0.2}),
]


def surrogate(splits, path: Path):
    """The tiny CNN every case attacks through: loaded from ``path``, or trained (seed 0) and saved there."""
    from safedl.models import TrainRecipe, build_model, train_model, with_normalization
    from safedl.utils.tensors import seed_everything

    seed_everything(0)
    model = with_normalization(build_model("tiny_cnn", in_channels=1, num_classes=10, image_size=8),
                               splits.mean, splits.std)
    if path.is_file():
        model.load_state_dict(torch.load(path))
    else:
        train_model(model, splits.train, recipe=TrainRecipe(epochs=15, batch_size=64, lr=3e-3, augment="none"),
                    seed=0)
        torch.save(model.state_dict(), path)
    return model.eval()


def poison_all(names: str, surrogate_path: Path) -> dict[str, dict[str, torch.Tensor]]:
    from safedl import registry
    from safedl.data import load_builtin, stratified_split

    torch.set_num_threads(1)
    splits = stratified_split(load_builtin("digits"), test_fraction=0.2, val_fraction=0.1, seed=0)
    model = surrogate(splits, surrogate_path)
    out = {}
    for case, new, method, params in CASES:
        attack = (registry.create("poisoning", new, **params) if names == "new"
                  else registry.create("poisoning", "clean_label", method=method, **params))
        kw = {}
        if getattr(attack, "needs_victims", False):
            vm = attack.victim_mask(splits.test.y)
            kw = {"victims": splits.test.x[vm][:3], "victim_labels": splits.test.y[vm][:3]}
        attack.fit(splits.train, surrogate=model, **kw)
        p = attack.poison(splits.train, generator=torch.Generator().manual_seed(1))
        out[case] = {"x": p.x, "y": p.y, "is_poison": p.is_poison}
        log.info("%s (%s): %d poisoned", case, type(attack).__name__, int(p.is_poison.sum()))
    return out


def compare(a: Path, b: Path) -> int:
    ra, rb = torch.load(a), torch.load(b)
    same = True
    for case in sorted(set(ra) | set(rb)):
        if case not in ra or case not in rb:
            log.info("%s: only in %s", case, a if case in ra else b)
            same = False
            continue
        eq = {k: torch.equal(ra[case][k], rb[case][k]) for k in ("x", "y", "is_poison")}
        max_dx = float((ra[case]["x"] - rb[case]["x"]).abs().max())
        log.info("%s: identical %s, max |dx| %.3g, poisoned %d vs %d", case, eq, max_dx,
                 int(ra[case]["is_poison"].sum()), int(rb[case]["is_poison"].sum()))
        same &= all(eq.values())
    log.info("all identical" if same else "DIFFERENT")
    return 0 if same else 1


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--names", choices=("old", "new"), default="new")
    ap.add_argument("--surrogate", type=Path, default=Path("/tmp/cl_surrogate.pt"))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("OLD", "NEW"))
    args = ap.parse_args()
    if args.compare:
        return compare(*args.compare)
    if args.out is None:
        ap.error("--out is required unless --compare")
    torch.save(poison_all(args.names, args.surrogate), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
