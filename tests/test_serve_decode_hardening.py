"""Hostile input to the decoder (safedl.serve.decode) and through /v1/predict: JSON nesting bombs, broken .npy
headers, dtypes torch cannot take, corrupt data of a recognized format (422) versus an unknown format (415), and the
per-request pixel budget checked from the headers before anything is decoded."""
from __future__ import annotations

import base64
import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from _serve_helpers import npy_bytes
from safedl.errors import ConfigError
from safedl.serve.config import ServeConfig
from safedl.serve.decode import InputError, declared_pixels, decode_items, items_from_json

SHAPE = (1, 8, 8)
CFG = ServeConfig()


def _code(fn) -> tuple[int, str]:
    with pytest.raises(InputError) as info:
        fn()
    return info.value.status, info.value.code


def _image(fmt: str, size=(8, 8), mode="L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, format=fmt)
    return buf.getvalue()


def _npy_header(text: str, version=b"\x01\x00") -> bytes:
    """A .npy magic + version + header dict text (padded like numpy does), no data."""
    raw = text.encode("latin1")
    pad = 64 - (12 + len(raw) + 1) % 64
    raw += b" " * pad + b"\n"
    size = struct.pack("<H", len(raw)) if version == b"\x01\x00" else struct.pack("<I", len(raw))
    return b"\x93NUMPY" + version + size + raw


def _png_header_only(w: int, h: int) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")


# -- 1: JSON ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"images": ' + b"[" * 100_000, b"{" * 50_000,
                                  b'{"images": [' + b"[" * 5000 + b"]" * 5000 + b"]}",
                                  b'{"images": [' + b"9" * 100_000 + b"]}"])
def test_json_nesting_bombs_and_huge_numbers_are_400_bad_json(body):
    assert _code(lambda: items_from_json(body, config=CFG)) == (400, "bad_json")


@pytest.mark.parametrize("body", [b'{"images": [1e999999]}', b'{"images": [["a"]]}', b'{"images": [null]}',
                                  b'{"images": []}', b'{"images": {"a": "b"}}', b'["x"]', b'"images"'])
def test_json_of_the_wrong_shape_is_422_bad_json(body):
    assert _code(lambda: items_from_json(body, config=CFG)) == (422, "bad_json")


def test_json_with_non_ascii_or_bad_base64_is_400_bad_base64():
    for s in ("@@@", "é" * 8, "QUJD\\n", "QUJD=A"):
        body = ('{"images": ["%s"]}' % s).encode()
        assert _code(lambda: items_from_json(body, config=CFG)) == (400, "bad_base64")


# -- 2, 3: .npy headers and dtypes --------------------------------------------------------------------------------
@pytest.mark.parametrize("header", [
    "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 8, 8 ",        # unclosed bracket: a tokenizer error
    "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 8, 8), ",       # unclosed dict
    "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 8, 8), 'x': 1}",
    "{'descr': 'not a dtype', 'fortran_order': False, 'shape': (1, 8, 8)}",
    "{'descr': [('a', '<f4', (-1,))], 'fortran_order': False, 'shape': (1, 8, 8)}",
    "{'descr': '<f4', 'fortran_order': 'yes', 'shape': (1, 8, 8)}",
    "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 8, -8)}",
    "{'descr': '<f4', 'fortran_order': False, 'shape': (1.5, 8, 8)}",
    "{'descr': '<f4', 'fortran_order': False, 'shape': 8}",
    "__import__('os').system('true')",
    "\x00\xff" * 20,
    "(" * 5000,
])
def test_any_broken_npy_header_is_400_undecodable(header):
    for version in (b"\x01\x00", b"\x02\x00", b"\x03\x00"):
        data = _npy_header(header, version) + b"\0" * 256
        assert _code(lambda: decode_items([data], shape=SHAPE, config=CFG)) == (400, "undecodable"), version
        assert _code(lambda: declared_pixels([data], shape=SHAPE, config=CFG)) == (400, "undecodable")


def test_npy_with_a_bad_version_or_cut_header_is_400_undecodable():
    good = npy_bytes(np.zeros(SHAPE, np.float32))
    for data in (b"\x93NUMPY\x09\x00" + good[8:], good[:9], good[:11], good[:40]):
        assert _code(lambda: decode_items([data], shape=SHAPE, config=CFG)) == (400, "undecodable")


@pytest.mark.parametrize("dtype", [np.longdouble, np.complex64, np.complex128, np.clongdouble, np.int8, np.int64,
                                   np.uint16, np.uint64, np.bool_, "<M8[s]", "<m8[s]", "S4", "U2", "V4",
                                   [("a", "<f4")]])
def test_npy_dtypes_other_than_float16_32_64_and_uint8_are_422_bad_dtype(dtype):
    dt = np.dtype(dtype)
    arr = np.zeros(SHAPE, dt)
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, allow_pickle=False)
    assert _code(lambda: decode_items([buf.getvalue()], shape=SHAPE, config=CFG)) == (422, "bad_dtype")


@pytest.mark.parametrize("dtype", ["<f2", ">f2", "<f4", ">f4", "<f8", ">f8", "|u1"])
@pytest.mark.parametrize("fortran", [False, True])
def test_npy_of_every_allowed_dtype_byte_order_and_memory_order_decodes(dtype, fortran):
    rng = np.random.default_rng(0)
    ref = rng.random((2, *SHAPE))
    arr = (ref * 255).round().astype(dtype) if dtype == "|u1" else ref.astype(dtype)
    arr = np.asfortranarray(arr) if fortran else arr
    out = decode_items([npy_bytes(arr)], shape=SHAPE, config=CFG).x
    want = arr.astype(np.float64) / (255 if dtype == "|u1" else 1)
    assert out.shape == (2, *SHAPE) and np.allclose(out.numpy(), want, atol=1e-3)


# -- 4: corrupt data of a recognized format is 422, an unknown format 415 ------------------------------------------
def _corrupt_cases() -> list[tuple[str, bytes]]:
    png, jpg, bmp, webp = (_image(f) for f in ("PNG", "JPEG", "BMP", "WEBP"))
    bmp_bad = bytearray(bmp)
    bmp_bad[14:18] = struct.pack("<I", 7)                    # an impossible DIB header size
    webp_bad = bytearray(webp)
    webp_bad[12:16] = b"XXXX"                                # unknown chunk
    return [("png_magic_only", png[:8]), ("png_half", png[: len(png) // 2]), ("jpeg_half", jpg[: len(jpg) // 2]),
            ("jpeg_magic_only", jpg[:3]), ("bmp_bad_dib", bytes(bmp_bad)), ("bmp_short", bmp[:40]),
            ("bmp_magic_only", b"BM"), ("webp_half", webp[: len(webp) // 2]), ("webp_bad_chunk", bytes(webp_bad)),
            ("webp_header_only", webp[:12])]


@pytest.mark.parametrize("name,data", _corrupt_cases(), ids=[c[0] for c in _corrupt_cases()])
def test_corrupt_data_of_a_recognized_format_is_422_undecodable(name, data):
    assert _code(lambda: decode_items([data], shape=SHAPE, config=CFG)) == (422, "undecodable")


@pytest.mark.parametrize("data", [b"GIF89a" + b"\0" * 50, _image("GIF"), _image("TIFF"), b"hello, not an image",
                                  b"RIFF\0\0\0\0WAVEfmt ", b"\x93NUM", b"\x89PN"])
def test_unknown_or_unsupported_formats_stay_415(data):
    assert _code(lambda: decode_items([data], shape=SHAPE, config=CFG)) == (415, "unsupported_format")


# -- 5: declared pixels, checked per request before decoding ------------------------------------------------------
def test_declared_pixels_reads_the_headers_of_every_format():
    items = [_image("PNG", (30, 20)), _image("JPEG", (7, 9), "RGB"), _image("BMP", (8, 8)),
             _image("WEBP", (16, 4), "RGB"), npy_bytes(np.zeros((3, 1, 8, 8), np.float32)),
             npy_bytes(np.zeros((8, 8), np.uint8)), _png_header_only(1000, 2000)]
    assert declared_pixels(items, shape=SHAPE, config=CFG) == [600, 63, 64, 64, 192, 64, 2_000_000]


def test_declared_pixels_raises_the_decoders_codes():
    cases = [(_png_header_only(3000, 3000), (413, "too_many_pixels")), (_png_header_only(20000, 20000),
             (413, "too_many_pixels")), (npy_bytes(np.zeros((1, 3000, 3000), np.uint8))[:200], (413, "too_many_pixels")),
             (b"", (400, "empty")), (b"hello", (415, "unsupported_format")), (_image("PNG")[:8], (422, "undecodable")),
             (npy_bytes(np.zeros(SHAPE, np.int64)), (422, "bad_dtype"))]
    for data, want in cases:
        assert _code(lambda: declared_pixels([data], shape=SHAPE, config=CFG)) == want
        assert _code(lambda: decode_items([data], shape=SHAPE, config=CFG)) == want


def test_request_pixel_budget_is_checked_before_anything_is_decoded():
    items = [_png_header_only(2000, 2000)] * 5         # 20 M pixels declared; the data itself is undecodable
    with pytest.raises(InputError) as info:
        decode_items(items, shape=SHAPE, config=CFG)
    e = info.value
    assert (e.status, e.code) == (413, "too_many_pixels") and "20000000" in e.message and "16000000" in e.message
    small = ServeConfig(max_request_pixels=100)
    assert _code(lambda: decode_items([_image("PNG")] * 2, shape=SHAPE, config=small)) == (413, "too_many_pixels")
    assert decode_items([_image("PNG")], shape=SHAPE, config=ServeConfig(max_request_pixels=64)).x.shape == (1, *SHAPE)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_max_request_pixels_must_be_a_positive_integer(bad):
    with pytest.raises(ConfigError, match="max_request_pixels"):
        ServeConfig(max_request_pixels=bad)


def _big_rgba_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", (2000, 2000), (10, 20, 30, 255)).save(buf, "PNG")   # ~20 KB: 16 MB once decoded
    return buf.getvalue()


def test_declared_pixels_is_cheap_next_to_decoding():
    """64 RGBA 2000x2000 PNGs: the header pass costs a small fraction of one decode (times printed with -s)."""
    items = [_big_rgba_png()] * 64
    t0 = time.perf_counter()
    assert declared_pixels(items, shape=SHAPE, config=CFG) == [4_000_000] * 64
    t_declared = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert _code(lambda: decode_items(items, shape=SHAPE, config=CFG)) == (413, "too_many_pixels")
    t_refused = time.perf_counter() - t0
    cfg = ServeConfig(max_request_pixels=64 * 4_000_000)
    t0 = time.perf_counter()
    assert decode_items(items[:4], shape=SHAPE, config=cfg).x.shape == (4, *SHAPE)
    t_decode4 = time.perf_counter() - t0
    print(f"\n{sum(map(len, items)) / 1e3:.0f} KB: declared_pixels x64 {t_declared * 1e3:.1f} ms, refused decode_items "
          f"x64 {t_refused * 1e3:.1f} ms, decode_items x4 {t_decode4 * 1e3:.1f} ms")
    assert t_declared < t_decode4 / 4 and t_refused < t_decode4 / 4


# -- through the service ------------------------------------------------------------------------------------------
def test_hostile_bodies_through_predict_are_4xx(tiny_model, digits_splits, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from _serve_helpers import make_bundle
    from safedl.deploy import load_bundle
    from safedl.serve import create_app
    from safedl.serve.audit import AuditStore
    from safedl.serve.keys import KeyStore

    keys = KeyStore(tmp_path / "k.db", create=True)
    token = keys.create(name="t", tier="full", rate_per_s=1000, burst=1000)[1]
    app = create_app(bundle=load_bundle(make_bundle(tiny_model, digits_splits, tmp_path / "b")), keys=keys,
                     audit=AuditStore(tmp_path / "a.db"), config=ServeConfig())
    npy = _npy_header("{'descr': '<f4', 'fortran_order': False, 'shape': (1, 8, 8 ") + b"\0" * 256
    f128 = io.BytesIO()
    np.save(f128, np.zeros(SHAPE, np.longdouble))
    cases = [(b"[" * 100_000, "application/json", 400, "bad_json"),
             (b'{"images": [[[[' + b"[" * 100_000, "application/json", 400, "bad_json"),
             (npy, "application/x-npy", 400, "undecodable"), (f128.getvalue(), "application/x-npy", 422, "bad_dtype"),
             (_image("PNG")[:30], "image/png", 422, "undecodable"),
             (b'{"images": ["%s"]}' % base64.b64encode(_image("BMP")[:40]), "application/json", 422, "undecodable")]
    with TestClient(app) as client:
        for body, ctype, status, code in cases:
            r = client.post("/v1/predict", content=body, headers={"X-API-Key": token, "Content-Type": ctype})
            assert (r.status_code, r.json()["error"]["code"]) == (status, code), (ctype, r.text[:200])
        assert client.get("/v1/health").status_code == 200
