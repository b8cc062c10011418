"""File loaders: .npz (x, y), image folder (one subfolder per class), MNIST IDX files, CIFAR-10 python pickles.

Every failure is one DataError naming the file and what was expected.
"""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import torch

from safedl.data.dataset import Dataset
from safedl.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}


def _to_nchw(x: np.ndarray, source: Path) -> torch.Tensor:
    """Accept N x H x W, N x H x W x C (C in 1, 3, 4) or N x C x H x W; uint8 is scaled by 1/255."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        x = x.transpose(0, 3, 1, 2)
    elif x.ndim != 4:
        raise DataError(f"{source}: images must have 3 or 4 dimensions (N x H x W [x C]), got shape {x.shape}")
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{source}: images contain NaN or infinite values")
    lo, hi = float(x.min(initial=0.0)), float(x.max(initial=0.0))
    if lo < 0.0 or hi > 1.0:
        if lo >= 0.0 and hi <= 255.0:
            x = x / 255.0
        else:
            raise DataError(f"{source}: pixel values must lie in [0, 1] or [0, 255], found [{lo:g}, {hi:g}]")
    return torch.from_numpy(np.ascontiguousarray(x))


def _labels(y: np.ndarray, n: int, source: Path) -> tuple[torch.Tensor, int]:
    y = np.asarray(y).reshape(-1)
    if len(y) != n:
        raise DataError(f"{source}: {n} images but {len(y)} labels")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0):
            y = y.astype(np.int64)
        else:
            raise DataError(f"{source}: labels must be integers, got dtype {y.dtype}")
    if n and y.min() < 0:
        raise DataError(f"{source}: labels must be >= 0, found {int(y.min())}")
    return torch.from_numpy(y.astype(np.int64)), int(y.max()) + 1 if n else 0


def load_npz(path: str | Path) -> Dataset:
    """An .npz file with arrays ``x`` (images) and ``y`` (integer labels)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x", "y") if k not in f.files]
            if missing:
                raise DataError(f"{path}: missing array(s) {', '.join(missing)}; found {', '.join(f.files) or 'none'}; "
                                "expected 'x' (images) and 'y' (labels)")
            x, y = f["x"], f["y"]
    except DataError:
        raise
    except Exception as exc:  # zipfile.BadZipFile, ValueError, OSError ...
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None
    xt = _to_nchw(np.asarray(x), path)
    yt, k = _labels(y, len(xt), path)
    return Dataset(xt, yt, k, path.stem)


def load_image_folder(path: str | Path, *, size: tuple[int, int] | None = None, channels: int | None = None) -> Dataset:
    """A folder with one subfolder per class holding PNG/JPEG files; classes are the sorted subfolder names."""
    from PIL import Image, UnidentifiedImageError

    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: folder not found")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{root}: no class subfolders found (expected one subfolder of images per class)")
    images, labels = [], []
    for ci, cname in enumerate(classes):
        files = sorted(f for f in (root / cname).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        for f in files:
            try:
                with Image.open(f) as im:
                    mode = {1: "L", 3: "RGB"}.get(channels or 0) or ("L" if im.mode in ("L", "1", "I;16", "I") else "RGB")
                    im = im.convert(mode)
                    if size is not None:
                        im = im.resize((size[1], size[0]))
                    arr = np.asarray(im, dtype=np.uint8)
            except (UnidentifiedImageError, OSError) as exc:
                raise DataError(f"{f}: not a readable image ({exc})") from None
            if images and arr.shape != images[0].shape:
                raise DataError(f"{f}: image shape {arr.shape} differs from {images[0].shape} of the first image; "
                                "pass a size to resize all images")
            images.append(arr)
            labels.append(ci)
    if not images:
        raise DataError(f"{root}: no PNG/JPEG images in the class subfolders {', '.join(classes)}")
    x = _to_nchw(np.stack(images), root)
    return Dataset(x, torch.tensor(labels, dtype=torch.int64), len(classes), root.name, classes)


def _read_idx(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if dtype_code not in dtypes:
        raise DataError(f"{path}: unknown IDX data type 0x{dtype_code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(">" + "I" * ndim, data[4:header])
    arr = np.frombuffer(data, dtype=dtypes[dtype_code], offset=header)
    if arr.size != int(np.prod(dims)):
        raise DataError(f"{path}: IDX header says shape {dims} ({int(np.prod(dims))} values) but the file holds {arr.size}")
    return arr.reshape(dims)


def load_idx(images: str | Path, labels: str | Path) -> Dataset:
    """MNIST-format IDX files (optionally .gz): an images file and a labels file."""
    ip, lp = Path(images), Path(labels)
    x = _to_nchw(_read_idx(ip), ip)
    yt, k = _labels(_read_idx(lp), len(x), lp)
    return Dataset(x, yt, max(k, 10), ip.stem)


def load_cifar10(path: str | Path, *, split: str = "train") -> Dataset:
    """A CIFAR-10 python-pickle folder (data_batch_1..5 for train, test_batch for test)."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: folder not found")
    files = [root / f"data_batch_{i}" for i in range(1, 6)] if split == "train" else [root / "test_batch"]
    xs, ys = [], []
    for f in files:
        if not f.is_file():
            raise DataError(f"{f}: file not found (a CIFAR-10 python folder holds data_batch_1..5 and test_batch)")
        try:
            with open(f, "rb") as fh:
                d = pickle.load(fh, encoding="bytes")
            data, lab = d[b"data"], d[b"labels"]
        except Exception as exc:
            raise DataError(f"{f}: not a CIFAR-10 pickle batch ({exc})") from None
        arr = np.asarray(data, dtype=np.uint8)
        if arr.ndim != 2 or arr.shape[1] != 3072:
            raise DataError(f"{f}: expected rows of 3072 bytes (3x32x32), got shape {arr.shape}")
        xs.append(arr.reshape(-1, 3, 32, 32))
        ys.append(np.asarray(lab))
    names = None
    meta = root / "batches.meta"
    if meta.is_file():
        try:
            with open(meta, "rb") as fh:
                names = [n.decode() for n in pickle.load(fh, encoding="bytes")[b"label_names"]]
        except Exception:
            names = None
    x = _to_nchw(np.concatenate(xs), root)
    yt, _ = _labels(np.concatenate(ys), len(x), root)
    return Dataset(x, yt, 10, "cifar10", names)
