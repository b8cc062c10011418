"""The setup the benches share: one torch thread, INFO logging, no progress bars; sklearn digits with a tiny CNN
(one recipe, seeded) for the small benches, mnist5k with the default profile's small CNN for the default-run ones."""
from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from safedl.data import load_builtin, stratified_split
from safedl.models import TrainRecipe, build_model, train_model, with_normalization
from safedl.utils.progress import set_enabled
from safedl.utils.tensors import seed_everything

RECIPE = TrainRecipe(epochs=15, batch_size=64, lr=3e-3, augment="none")


def bench_setup() -> None:
    """One thread (the machine is shared: ratios, not absolute times) and plain INFO lines."""
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    set_enabled(False)


def digits_splits(seed: int):
    """sklearn's 8x8 digits, 20% test and 10% validation, stratified with ``seed``."""
    return stratified_split(load_builtin("digits"), test_fraction=0.2, val_fraction=0.1, seed=seed)


def fresh_tiny_cnn(splits, seed: int) -> torch.nn.Module:
    """An untrained tiny CNN for ``splits`` (its normalization inside), initialised with ``seed``."""
    seed_everything(seed)
    c, h, _ = splits.shape
    return with_normalization(build_model("tiny_cnn", in_channels=c, num_classes=splits.num_classes, image_size=h),
                              splits.mean, splits.std)


def trained_tiny_cnn(splits, seed: int) -> torch.nn.Module:
    """:func:`fresh_tiny_cnn` trained on the training split with :data:`RECIPE`, in eval mode."""
    model = fresh_tiny_cnn(splits, seed)
    train_model(model, splits.train, recipe=RECIPE, seed=seed)
    return model.eval()


def mnist5k_small_cnn(seed: int, *, epochs: int):
    """(splits, model): the default profile's data (mnist5k, 20% test, 10% validation, split with ``seed``) and its
    small CNN trained ``epochs`` epochs with the default recipe otherwise, in eval mode."""
    splits = stratified_split(load_builtin("mnist5k"), test_fraction=0.2, val_fraction=0.1, seed=seed)
    seed_everything(seed)
    model = with_normalization(build_model("small_cnn", in_channels=1, num_classes=10, image_size=28),
                               splits.mean, splits.std)
    train_model(model, splits.train, recipe=TrainRecipe(epochs=epochs), seed=seed)
    return splits, model.eval()


def cpu_ms_per_call(fn: Callable[[], object], calls: int) -> float:
    """CPU milliseconds (this process, time.process_time) per call of ``fn``, after one warm-up call."""
    fn()
    t0 = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - t0) / calls * 1000.0
