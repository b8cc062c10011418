"""File loaders: .npz (x, y), image folder (one subfolder per class), MNIST IDX files, CIFAR-10 python pickles.

Every failure is one DataError naming the file and what was expected.
"""
from __future__ import annotations

import gzip
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from safedl.data.dataset import Dataset
from safedl.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def _to_nchw(x: np.ndarray, source: Path, *, channels_last: bool | None = None) -> torch.Tensor:
    """Accept N x H x W, N x H x W x C (C in 1, 3, 4) or N x C x H x W; uint8 is scaled by 1/255.

    ``channels_last=None`` guesses the layout: channels-last only when the last axis looks like channels and the
    second does not (an ambiguous N x 3 x 4 x 4 is read as N x C x H x W); loaders that know the layout say so.
    """
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and (channels_last if channels_last is not None
                          else x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4)):
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
        # Values above 1 are read as 8-bit intensities only when they are whole numbers in [0, 255]; anything else
        # (e.g. standardized images) is a mistake that must not be silently rescaled.
        if lo >= 0.0 and hi <= 255.0 and np.all(x == np.round(x)):
            x = x / 255.0
        else:
            raise DataError(f"{source}: pixel values must be floats in [0, 1] or whole numbers in [0, 255], "
                            f"found values in [{lo:g}, {hi:g}]")
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


RESIZE_POLICIES = ("stretch", "center_crop", "letterbox")
_HINT = ("set dataset.image_size (one int or [H, W]), dataset.channels (1 or 3) and dataset.resize "
         "(stretch | center_crop | letterbox) in the profile to convert every image alike")


def _fit(im, size: tuple[int, int] | None, resize: str):
    """Bring a Pillow image to ``size`` = (H, W): stretch, scale and crop the centre, or scale and pad with black."""
    from PIL import ImageOps

    if size is None or im.size == (size[1], size[0]):
        return im
    wh = (size[1], size[0])
    if resize == "center_crop":
        return ImageOps.fit(im, wh)
    if resize == "letterbox":
        return ImageOps.pad(im, wh, color=0)
    return im.resize(wh)


def _flatten_alpha(im):
    """RGBA / LA / palette-with-transparency: composite over black (the letterbox colour), keeping the colour mode."""
    from PIL import Image

    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        gray = im.mode in ("LA", "La")
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("L" if gray else "RGB")
    return im


def _load_image(f: Path, channels: int | None, size: tuple[int, int] | None, resize: str) -> np.ndarray:
    """The image file ``f`` as an array (see :func:`_read_image`); anything unreadable is one DataError naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(f) as im:
            return _read_image(im, channels, size, resize)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{f}: not a readable image ({type(exc).__name__}: {exc})") from None


def _read_image(im, channels: int | None, size: tuple[int, int] | None, resize: str = "stretch") -> np.ndarray:
    """One Pillow image as float32 H x W (grayscale) or H x W x 3 (RGB) in [0, 1].

    The EXIF orientation is applied first (a phone photo stored sideways is read upright); transparent pixels are
    composited over black; grayscale modes (L, 1, I, I;16, F) become H x W unless ``channels=3``.
    """
    from PIL import Image, ImageOps

    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I") or im.mode == "F":
        # 16-bit (and 32-bit) grayscale: Pillow's convert("L") would clip every value above 255, so scale here.
        top = 65535.0 if im.mode.startswith("I;16") or np.asarray(im).max(initial=0) <= 65535 else float(2**32 - 1)
        g = _fit(Image.fromarray(np.asarray(im, dtype=np.float32) / (1.0 if im.mode == "F" else top), mode="F"),
                 size, resize)
        arr = np.clip(np.asarray(g, dtype=np.float32), 0.0, 1.0)
        return np.repeat(arr[..., None], 3, axis=2) if channels == 3 else arr
    im = _flatten_alpha(im)
    gray = im.mode in ("L", "1")
    mode = {1: "L", 3: "RGB"}.get(channels or 0) or ("L" if gray else "RGB")
    im = _fit(im.convert(mode), size, resize)
    return np.asarray(im, dtype=np.uint8).astype(np.float32) / 255.0


def load_image_folder(path: str | Path, *, size: tuple[int, int] | None = None, channels: int | None = None,
                      resize: str = "stretch") -> Dataset:
    """A folder with one subfolder per class holding image files; classes are the sorted subfolder names.

    ``size`` = (H, W) with ``resize`` (stretch | center_crop | letterbox) and ``channels`` (1 or 3) convert images
    of any size and mode (RGB, L, RGBA, LA, P, I;16) alike; without them every image must match the first one.
    """
    root = Path(path)
    if channels not in (None, 1, 3):
        raise DataError(f"{root}: channels={channels!r} is not allowed; use 1 (grayscale), 3 (RGB) or None (as stored)")
    if resize not in RESIZE_POLICIES:
        raise DataError(f"{root}: resize={resize!r} is not allowed; use one of {', '.join(RESIZE_POLICIES)}")
    if not root.is_dir():
        raise DataError(f"{root}: folder not found")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class subfolders found (expected one subfolder of images per class)")
    images, labels = [], []
    first: Path | None = None  # the file whose shape every other image must match
    for ci, cname in enumerate(classes):
        files = sorted(f for f in (root / cname).iterdir()
                       if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file() and not f.name.startswith("."))
        for f in files:
            arr = _load_image(f, channels, size, resize)
            if images and arr.shape != images[0].shape:
                raise DataError(f"{f}: image shape {arr.shape} (H x W [x C]) differs from {images[0].shape} of the "
                                f"first image {first}; {_HINT}")
            if first is None:
                first = f
            images.append(arr)
            labels.append(ci)
    if not images:
        raise DataError(f"{root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in the class subfolders "
                        f"{', '.join(classes)}")
    x = _to_nchw(np.stack(images), root, channels_last=True)  # Pillow gives H x W (x C)
    return Dataset(x, torch.tensor(labels, dtype=torch.int64), len(classes), root.name, classes)


def _read_idx(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":  # gzip magic: decompress whatever the file is called
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:  # a truncated .gz raises EOFError
        raise DataError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from None
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
    dtype = np.dtype(dtypes[dtype_code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(f"{path}: IDX header says shape {dims} ({expected} bytes of data) but the file holds "
                        f"{len(data) - header} bytes (truncated or corrupt)")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def load_idx(images: str | Path, labels: str | Path) -> Dataset:
    """MNIST-format IDX files (optionally .gz): an images file and a labels file."""
    ip, lp = Path(images), Path(labels)
    x = _to_nchw(_read_idx(ip), ip)
    yt, k = _labels(_read_idx(lp), len(x), lp)
    return Dataset(x, yt, max(k, 10), ip.stem)


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches only: plain containers and numpy arrays. Any other global is refused, so a crafted
    'batch' file cannot run code (pickle.load would execute whatever the file names)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _load_batch(f: Path) -> dict:
    with open(f, "rb") as fh:
        d = _BatchUnpickler(fh, encoding="bytes").load()
    if not isinstance(d, dict):
        raise ValueError(f"expected a dict, got {type(d).__name__}")
    # The official batches were pickled by Python 2 (bytes keys); accept str keys from re-pickled copies too.
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def load_cifar10(path: str | Path, *, split: str = "train") -> Dataset:
    """A CIFAR-10 python-pickle folder (data_batch_1..5 for train, test_batch for test; Krizhevsky 2009)."""
    root = Path(path)
    if split not in ("train", "test"):
        raise DataError(f"{root}: split={split!r} is not allowed; use 'train' or 'test'")
    if not root.is_dir():
        raise DataError(f"{root}: folder not found")
    files = [root / f"data_batch_{i}" for i in range(1, 6)] if split == "train" else [root / "test_batch"]
    xs, ys = [], []
    for f in files:
        if not f.is_file():
            raise DataError(f"{f}: file not found (a CIFAR-10 python folder holds data_batch_1..5 and test_batch)")
        try:
            d = _load_batch(f)
            arr = np.asarray(d["data"], dtype=np.uint8)
            lab = np.asarray(d["labels"])
        except Exception as exc:  # UnpicklingError, EOFError, KeyError, ValueError ...
            raise DataError(f"{f}: not a CIFAR-10 pickle batch ({type(exc).__name__}: {exc})") from None
        if arr.ndim != 2 or arr.shape[1] != 3072:
            raise DataError(f"{f}: expected rows of 3072 bytes (3x32x32), got shape {arr.shape}")
        yt, k = _labels(lab, len(arr), f)
        if k > 10:
            raise DataError(f"{f}: CIFAR-10 labels must lie in 0..9, found {k - 1}")
        xs.append(arr.reshape(-1, 3, 32, 32))
        ys.append(yt)
    names = None
    meta = root / "batches.meta"
    if meta.is_file():
        try:
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in _load_batch(meta)["label_names"]]
        except Exception:  # the names are optional; a bad meta file only loses them
            names = None
    x = _to_nchw(np.concatenate(xs), root)
    return Dataset(x, torch.cat(ys), 10, "cifar10", names)


def load_image_array(path: str | Path, *, flag: str, what: str = "images") -> torch.Tensor:
    """An ``.npy`` array of images, N x C x H x W, as float in [0, 1] (uint8 arrays are scaled by 1/255); DataError
    naming ``flag`` and the file when it is missing, not an array (no pickles) or of another shape."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{flag} {path}: no such file (a .npy array N x C x H x W of {what})")
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise DataError(f"{flag} {path}: not a .npy array ({exc})") from None
    if arr.ndim != 4:
        raise DataError(f"{flag} {path}: shape {arr.shape}; expected N x C x H x W")
    x = torch.from_numpy(arr).float()
    return x / 255.0 if arr.dtype == np.uint8 else x


def load_images(path: str | Path, *, size: tuple[int, int] | None = None, channels: int | None = None,
                resize: str = "stretch") -> torch.Tensor:
    """Unlabelled images (N x C x H x W in [0, 1]) from a folder of image files (its class subfolders, if any, are
    read too), an ``.npz`` with an array ``x`` or an ``.npy`` array; DataError naming the path when none can be read.
    """
    root = Path(path)
    if root.is_file() and root.suffix.lower() in (".npz", ".npy"):
        try:
            loaded = np.load(root, allow_pickle=False)
            if isinstance(loaded, np.ndarray):
                arr = loaded
            else:
                with loaded as f:
                    if "x" not in f.files:
                        raise DataError(f"{root}: no array 'x' (the images) in this .npz; found "
                                        f"{', '.join(f.files) or 'none'}")
                    arr = np.asarray(f["x"])
        except DataError:
            raise
        except Exception as exc:  # zipfile.BadZipFile, ValueError, OSError ...
            raise DataError(f"{root}: not a readable .npz/.npy file ({exc})") from None
        return _to_nchw(arr, root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder or .npz/.npy file (expected a folder of images, an .npz with an "
                        "array 'x' or an .npy array)")
    files = sorted(f for f in root.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()
                   and not any(part.startswith(".") for part in f.relative_to(root).parts))
    if not files:
        raise DataError(f"{root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
    images = []
    for f in files:
        arr = _load_image(f, channels, size, resize)
        if images and arr.shape != images[0].shape:
            raise DataError(f"{f}: image shape {arr.shape} differs from {images[0].shape} of {files[0]}")
        images.append(arr)
    return _to_nchw(np.stack(images), root, channels_last=True)
