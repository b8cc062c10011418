"""Load the data set a profile names (built-in or files), resolving relative paths against the profile's folder."""
from __future__ import annotations

from pathlib import Path

from safedl.data.builtin import load_builtin
from safedl.data.dataset import Dataset
from safedl.data.loaders import load_cifar10, load_idx, load_image_folder, load_npz


def load_dataset(spec, *, base_dir: str | Path = ".") -> Dataset:
    """``spec`` is the profile's DatasetSpec; ``limit`` keeps the first N samples."""
    base = Path(base_dir)

    def resolve(p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else base / q

    if spec.format == "builtin":
        data = load_builtin(spec.name)
    elif spec.format == "npz":
        data = load_npz(resolve(spec.path))
    elif spec.format == "image_folder":
        data = load_image_folder(resolve(spec.path), size=spec.target_size, channels=spec.channels, resize=spec.resize)
    elif spec.format == "idx":
        data = load_idx(resolve(spec.path), resolve(spec.labels_path))
    elif spec.format == "cifar10":
        data = load_cifar10(resolve(spec.path))
    else:  # the schema forbids other formats
        raise ValueError(spec.format)
    if spec.limit is not None and spec.limit < len(data):
        import torch

        data = data.subset(torch.arange(spec.limit))
    if spec.format != "builtin" and spec.name:
        data.name = spec.name
    return data
