"""CPU and wall seconds of the default profile's baseline training per epoch, by torch threads and memory format.

    nice -n 10 env PYTHONPATH=src python bench/train_cost.py --epochs 1 --seed 0 --threads 1 2

mnist5k split like examples/default.yaml (seed 0), small_cnn, the default recipe (batch 64, Adam, one-cycle,
shift augmentation) for ``--epochs`` epochs; each configuration trains the same seeded model once. Prints CPU
seconds (``time.process_time``, all threads), wall seconds and whether the trained weights are bitwise those of
the first configuration (a change that alters them changes every number of a run). channels_last converts the
model's weights and each batch to NHWC.
"""
from __future__ import annotations

import argparse
import logging
import time

import torch

from safedl.data import load_builtin, stratified_split
from safedl.models import TrainRecipe, build_model, train_model, with_normalization
from safedl.utils.progress import set_enabled
from safedl.utils.tensors import seed_everything

log = logging.getLogger("train_cost")


def _train(splits, *, seed: int, epochs: int, threads: int, channels_last: bool) -> tuple[float, float, dict]:
    torch.set_num_threads(threads)
    seed_everything(seed)
    model = with_normalization(build_model("small_cnn", in_channels=1, num_classes=10, image_size=28),
                               splits.mean, splits.std)
    train = splits.train
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        train = type(train)(train.x.contiguous(memory_format=torch.channels_last), train.y, train.num_classes,
                            train.name, train.class_names)
    c0, t0 = time.process_time(), time.perf_counter()
    train_model(model, train, recipe=TrainRecipe(epochs=epochs), seed=seed)
    return time.process_time() - c0, time.perf_counter() - t0, {k: v.clone() for k, v in model.state_dict().items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    set_enabled(False)
    splits = stratified_split(load_builtin("mnist5k"), test_fraction=0.2, val_fraction=0.1, seed=args.seed)
    ref = None
    for threads in args.threads:
        for cl in (False, True):
            cpu, wall, state = _train(splits, seed=args.seed, epochs=args.epochs, threads=threads, channels_last=cl)
            ref = state if ref is None else ref
            same = all(torch.equal(state[k], ref[k]) for k in ref)
            log.info("threads %d, %-14s: %.1f CPU s, %.1f s wall for %d epoch(s) of %d images; weights %s", threads,
                     "channels_last" if cl else "contiguous", cpu, wall, args.epochs, len(splits.train),
                     "identical" if same else "DIFFER")


if __name__ == "__main__":
    main()
