"""File loaders: exact round trips for every format, and one DataError naming the file for every bad input."""
from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from safedl.data import load_cifar10, load_idx, load_image_folder, load_npz
from safedl.errors import DataError

RNG = np.random.default_rng(0)


def _raises_naming(path, fn, *args, match: str | None = None, **kwargs) -> DataError:
    """Exactly one DataError whose message names ``path``."""
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert str(path) in msg, msg
    if match is not None:
        assert match.lower() in msg.lower(), msg
    return info.value


# ---------------------------------------------------------------- .npz
def test_npz_uint8_channels_last_round_trip(tmp_path):
    x = RNG.integers(0, 256, size=(12, 5, 6, 3), dtype=np.uint8)
    y = np.arange(12) % 4
    p = tmp_path / "d.npz"
    np.savez(p, x=x, y=y)
    d = load_npz(p)
    assert d.x.shape == (12, 3, 5, 6) and d.x.dtype == torch.float32 and d.y.dtype == torch.int64
    assert torch.equal(d.x, torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32) / 255.0))
    assert d.y.tolist() == y.tolist() and d.num_classes == 4


def test_npz_float_nchw_and_nhw_kept_exactly(tmp_path):
    x = RNG.random((7, 1, 4, 4), dtype=np.float32)
    np.savez(tmp_path / "a.npz", x=x, y=np.zeros(7, dtype=np.int64))
    assert torch.equal(load_npz(tmp_path / "a.npz").x, torch.from_numpy(x))
    np.savez(tmp_path / "b.npz", x=x[:, 0], y=np.zeros(7, dtype=np.int64))  # N x H x W gains a channel axis
    assert torch.equal(load_npz(tmp_path / "b.npz").x, torch.from_numpy(x))


def test_npz_whole_number_floats_in_0_255_are_rescaled(tmp_path):
    x = RNG.integers(0, 256, size=(4, 1, 3, 3)).astype(np.float64)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(4))
    assert torch.allclose(load_npz(tmp_path / "d.npz").x, torch.from_numpy((x / 255.0).astype(np.float32)))


@pytest.mark.parametrize("case", ["missing_y", "label_count", "nan", "negative", "standardized", "float_labels",
                                  "not_npz", "missing_file", "one_dim"])
def test_npz_bad_files_give_one_data_error_naming_the_file(tmp_path, case):
    p = tmp_path / f"{case}.npz"
    x = RNG.random((5, 1, 4, 4)).astype(np.float32)
    y = np.arange(5)
    match = None
    if case == "missing_y":
        np.savez(p, x=x)
        match = "'y'"
    elif case == "label_count":
        np.savez(p, x=x, y=np.arange(4))
        match = "5 images but 4 labels"
    elif case == "nan":
        x[2, 0, 1, 1] = np.nan
        np.savez(p, x=x, y=y)
        match = "nan"
    elif case == "negative":
        x[0, 0, 0, 0] = -0.5
        np.savez(p, x=x, y=y)
        match = "pixel values"
    elif case == "standardized":  # values above 1 that are not whole numbers must not be silently divided by 255
        np.savez(p, x=x * 3.3, y=y)
        match = "pixel values"
    elif case == "float_labels":
        np.savez(p, x=x, y=y + 0.5)
        match = "integers"
    elif case == "not_npz":
        p.write_bytes(b"this is not a zip archive")
    elif case == "one_dim":
        np.savez(p, x=np.zeros(5, dtype=np.float32), y=y)
        match = "dimensions"
    _raises_naming(p, load_npz, p, match=match)


# ---------------------------------------------------------------- image folder
def _write_images(root, mode: str, n_per_class: int = 3, size=(6, 5), fmt: str = "PNG"):
    from PIL import Image

    arrays = {}
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            shape = size if mode == "L" else size + (3,)
            arr = RNG.integers(0, 256, size=shape, dtype=np.uint8)
            f = root / c / f"{i}.{'png' if fmt == 'PNG' else 'jpg'}"
            Image.fromarray(arr, mode=mode).save(f, format=fmt)
            arrays[f] = arr
    return arrays


def test_image_folder_png_grayscale_round_trip(tmp_path):
    arrays = _write_images(tmp_path, "L")
    d = load_image_folder(tmp_path)
    assert d.x.shape == (6, 1, 6, 5) and d.class_names == ["cat", "dog"] and d.num_classes == 2
    assert d.y.tolist() == [0, 0, 0, 1, 1, 1]
    expected = torch.stack([torch.from_numpy(arrays[f].astype(np.float32) / 255.0)[None] for f in sorted(arrays)])
    assert torch.equal(d.x, expected)  # PNG is lossless: exact


def test_image_folder_png_rgb_round_trip_and_channel_conversion(tmp_path):
    arrays = _write_images(tmp_path, "RGB")
    d = load_image_folder(tmp_path)
    expected = torch.stack([torch.from_numpy(arrays[f].transpose(2, 0, 1).astype(np.float32) / 255.0)
                            for f in sorted(arrays)])
    assert d.x.shape == (6, 3, 6, 5) and torch.equal(d.x, expected)
    gray = load_image_folder(tmp_path, channels=1)
    assert gray.x.shape == (6, 1, 6, 5)
    resized = load_image_folder(tmp_path, size=(4, 7))
    assert resized.x.shape == (6, 3, 4, 7)


def test_image_folder_jpeg_is_close(tmp_path):
    from PIL import Image

    (tmp_path / "a").mkdir()
    arr = np.full((8, 8, 3), 200, dtype=np.uint8)  # flat image: JPEG reproduces it almost exactly
    Image.fromarray(arr).save(tmp_path / "a" / "x.jpeg", quality=95)
    Image.fromarray(arr).save(tmp_path / "a" / "y.JPG", quality=95)
    d = load_image_folder(tmp_path)
    assert d.x.shape == (2, 3, 8, 8)
    assert (d.x - 200 / 255).abs().max() <= 2 / 255


def test_image_folder_16_bit_png_keeps_its_range(tmp_path):
    from PIL import Image

    (tmp_path / "a").mkdir()
    arr = (np.arange(16, dtype=np.uint16) * 4369).reshape(4, 4)  # 0 .. 65535
    Image.fromarray(arr).save(tmp_path / "a" / "deep.png")
    d = load_image_folder(tmp_path)
    assert d.x.shape == (1, 1, 4, 4)
    assert torch.allclose(d.x[0, 0], torch.from_numpy(arr.astype(np.float32) / 65535.0))  # not clipped at 255


def test_image_folder_ignores_hidden_folders_and_other_files(tmp_path):
    _write_images(tmp_path, "L")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    d = load_image_folder(tmp_path)
    assert d.class_names == ["cat", "dog"] and len(d) == 6


def test_image_folder_unreadable_image_names_it(tmp_path):
    _write_images(tmp_path, "L")
    bad = tmp_path / "dog" / "9.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    _raises_naming(bad, load_image_folder, tmp_path, match="not a readable image")


def test_image_folder_truncated_png_names_it(tmp_path):
    _write_images(tmp_path, "L", size=(40, 40))
    f = tmp_path / "cat" / "1.png"
    f.write_bytes(f.read_bytes()[:60])
    _raises_naming(f, load_image_folder, tmp_path)


def test_image_folder_mixed_sizes_name_the_odd_file(tmp_path):
    from PIL import Image

    _write_images(tmp_path, "L")
    odd = tmp_path / "dog" / "z.png"
    Image.fromarray(np.zeros((9, 9), dtype=np.uint8)).save(odd)
    _raises_naming(odd, load_image_folder, tmp_path, match="dataset.image_size")
    assert load_image_folder(tmp_path, size=(6, 5)).x.shape == (7, 1, 6, 5)


@pytest.mark.parametrize("case", ["missing", "no_classes", "no_images"])
def test_image_folder_bad_folders(tmp_path, case):
    root = tmp_path / "data"
    if case != "missing":
        root.mkdir()
    if case == "no_images":
        (root / "a").mkdir()
    _raises_naming(root, load_image_folder, root)


# ---------------------------------------------------------------- IDX
def _idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    dt = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}[code]
    return struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape) \
        + arr.astype(dt).tobytes()


@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip_plain_and_gz(tmp_path, compress):
    x = RNG.integers(0, 256, size=(9, 4, 5), dtype=np.uint8)
    y = np.array([0, 1, 2, 3, 4, 5, 6, 7, 9], dtype=np.uint8)
    suffix = ".gz" if compress else ""
    xi, yi = tmp_path / f"images-idx3-ubyte{suffix}", tmp_path / f"labels-idx1-ubyte{suffix}"
    for path, arr in ((xi, x), (yi, y)):
        raw = _idx_bytes(arr)
        path.write_bytes(gzip.compress(raw) if compress else raw)
    d = load_idx(xi, yi)
    assert d.x.shape == (9, 1, 4, 5) and d.num_classes == 10
    assert torch.equal(d.x, torch.from_numpy(x[:, None].astype(np.float32) / 255.0))
    assert d.y.tolist() == y.tolist()


def test_idx_big_endian_int32_labels(tmp_path):
    x = RNG.integers(0, 256, size=(3, 2, 2), dtype=np.uint8)
    (tmp_path / "x").write_bytes(_idx_bytes(x))
    (tmp_path / "y").write_bytes(_idx_bytes(np.array([1, 300, 2]), code=0x0C))
    assert load_idx(tmp_path / "x", tmp_path / "y").y.tolist() == [1, 300, 2]


@pytest.mark.parametrize("case", ["truncated", "truncated_int32", "extra", "magic", "dtype", "short_header",
                                  "truncated_gz", "label_count", "missing", "labels_as_images"])
def test_idx_bad_files_name_the_file(tmp_path, case):
    x = RNG.integers(0, 256, size=(4, 3, 3), dtype=np.uint8)
    y = np.arange(4, dtype=np.uint8)
    xi, yi = tmp_path / "x.idx", tmp_path / "y.idx"
    xi.write_bytes(_idx_bytes(x))
    yi.write_bytes(_idx_bytes(y))
    bad, match = xi, None
    if case == "truncated":
        xi.write_bytes(_idx_bytes(x)[:-5])
        match = "truncated"
    elif case == "truncated_int32":  # a partial element used to escape as numpy's ValueError
        bad = yi
        yi.write_bytes(_idx_bytes(y.astype(np.int32), code=0x0C)[:-2])
        match = "truncated"
    elif case == "extra":
        xi.write_bytes(_idx_bytes(x) + b"\x00")
    elif case == "magic":
        xi.write_bytes(b"\x08\x03" + _idx_bytes(x)[2:])
        match = "magic"
    elif case == "dtype":
        xi.write_bytes(b"\x00\x00\x07" + _idx_bytes(x)[3:])
        match = "type"
    elif case == "short_header":
        xi.write_bytes(_idx_bytes(x)[:9])
        match = "header"
    elif case == "truncated_gz":  # gzip's EOFError used to escape
        xi = bad = tmp_path / "x.idx.gz"
        xi.write_bytes(gzip.compress(_idx_bytes(x))[:-12])
    elif case == "label_count":
        bad = yi
        yi.write_bytes(_idx_bytes(y[:3]))
        match = "4 images but 3 labels"
    elif case == "missing":
        xi = bad = tmp_path / "nope.idx"
        match = "not found"
    elif case == "labels_as_images":
        xi = bad = yi
    _raises_naming(bad, load_idx, xi, yi, match=match)


# ---------------------------------------------------------------- CIFAR-10 pickles
def _cifar_folder(root, n_per_batch=4, *, str_keys=False):
    root.mkdir()
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = RNG.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = RNG.integers(0, 10, size=n_per_batch).tolist()
        k = (lambda s: s) if str_keys else (lambda s: s.encode())
        with open(root / name, "wb") as fh:
            pickle.dump({k("batch_label"): k(name), k("labels"): labels, k("data"): data}, fh, protocol=2)
        batches[name] = (data, labels)
    with open(root / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, fh, protocol=2)
    return batches


@pytest.mark.parametrize("str_keys", [False, True])
def test_cifar10_round_trip(tmp_path, str_keys):
    root = tmp_path / "cifar-10-batches-py"
    batches = _cifar_folder(root, str_keys=str_keys)
    train = load_cifar10(root)
    assert train.x.shape == (20, 3, 32, 32) and train.num_classes == 10
    assert train.class_names == [f"c{i}" for i in range(10)]
    data = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    assert torch.equal(train.x, torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0))
    assert train.y.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    test = load_cifar10(root, split="test")
    assert len(test) == 4 and test.y.tolist() == batches["test_batch"][1]


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize("case", ["missing_batch", "bad_rows", "label_count", "label_range", "garbage",
                                  "code_execution", "truncated"])
def test_cifar10_bad_batches_name_the_file(tmp_path, case):
    root = tmp_path / "c"
    _cifar_folder(root)
    f = root / "data_batch_3"
    good = {b"labels": [1, 2, 3, 4], b"data": np.zeros((4, 3072), dtype=np.uint8)}
    if case == "missing_batch":
        f.unlink()
    elif case == "bad_rows":
        good[b"data"] = np.zeros((4, 100), dtype=np.uint8)
    elif case == "label_count":
        good[b"labels"] = [1, 2, 3]
    elif case == "label_range":
        good[b"labels"] = [1, 2, 3, 10]
    if case in ("bad_rows", "label_count", "label_range"):
        f.write_bytes(pickle.dumps(good, protocol=2))
    elif case == "garbage":
        f.write_bytes(b"\x00\x01 not a pickle")
    elif case == "code_execution":  # a crafted batch must be refused, never executed
        f.write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}))
    elif case == "truncated":
        f.write_bytes(f.read_bytes()[:500])
    _raises_naming(f, load_cifar10, root)


def test_cifar10_bad_split_and_missing_folder(tmp_path):
    _raises_naming(tmp_path, load_cifar10, tmp_path, split="validation", match="split")
    _raises_naming(tmp_path / "none", load_cifar10, tmp_path / "none")
