"""A seeded corpus of hostile request bodies for the service's fuzz tests: (Content-Type, body) pairs.

Mutations of valid PNG/JPEG/BMP/WebP files (bit flips, truncations, header field edits with the checksums kept
right, so the decoder and not the checksum is what gets tested), .npy arrays with mutated headers and dtypes, JSON
(nesting bombs, huge numbers, wrong types, bad base64), multipart bodies with odd boundaries and parts, empty bodies
and wrong content types. The same seed gives the same corpus (numpy's seeded generator, no global state).
"""
from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import numpy as np
from PIL import Image

IMAGE_TYPES = ["image/png", "image/jpeg", "image/bmp", "image/webp", "application/octet-stream"]
OTHER_TYPES = ["text/plain", "", "application/xml", "image/gif", "multipart/mixed", "application/json; charset=utf-16",
               "APPLICATION/X-NPY", "image/png; q=0.5", "*/*", "application/x-www-form-urlencoded"]
DESCRS = ["<f4", ">f4", "<f2", ">f8", "|u1", "<f16", "<f12", "|O", "<c8", "<i8", "|b1", "<U4", "|S3", "|V8", "<M8[s]",
          [("a", "<f4")], [("a", "<f4", (2,))], "float32", "garbage", 7, None, "<f4\x00"]


def seed_files(rng: np.random.Generator) -> list[bytes]:
    """Valid files of every supported format and several modes and sizes (the mutation seeds)."""
    out = []
    for fmt, mode, size in [("PNG", "L", (8, 8)), ("PNG", "RGBA", (12, 7)), ("PNG", "P", (8, 8)), ("PNG", "I;16", (8, 8)),
                            ("JPEG", "L", (8, 8)), ("JPEG", "RGB", (16, 16)), ("BMP", "L", (8, 8)), ("BMP", "RGB", (5, 9)),
                            ("WEBP", "RGB", (8, 8)), ("WEBP", "RGBA", (10, 6))]:
        arr = rng.integers(0, 256, (size[1], size[0], len(mode) if mode in ("RGB", "RGBA") else 1), dtype=np.uint8)
        img = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr, None if arr.shape[2] > 1 else "L")
        img = img.convert(mode)
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


def npy_file(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _npy_raw(header: str, data: bytes, version: bytes = b"\x01\x00") -> bytes:
    raw = header.encode("utf-8", "surrogatepass")
    raw += b" " * (64 - (12 + len(raw) + 1) % 64) + b"\n"
    size = struct.pack("<H", len(raw) % 65536) if version[:1] == b"\x01" else struct.pack("<I", len(raw))
    return b"\x93NUMPY" + version + size + raw + data


# -- image mutations ------------------------------------------------------------------------------------------------
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _edit_png_ihdr(rng: np.random.Generator, data: bytes) -> bytes:
    w, h, depth, color = struct.unpack(">IIBB", data[16:26])
    field = rng.integers(0, 5)
    vals = [int(rng.choice([0, 1, 8, 2**31 - 1, 2**32 - 1, 65536, int(rng.integers(0, 5000))])) for _ in range(2)]
    if field == 0:
        w, h = vals
    elif field == 1:
        depth = int(rng.choice([0, 1, 2, 3, 4, 7, 8, 16, 32, 255]))
    elif field == 2:
        color = int(rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 255]))
    ihdr = struct.pack(">IIBB", w, h, depth, color) + data[26:29]
    if field == 3:
        ihdr = ihdr[: int(rng.integers(0, 13))]
    return data[:8] + _png_chunk(b"IHDR", ihdr) + data[33:]


def _edit_header_field(rng: np.random.Generator, data: bytes) -> bytes:
    """Overwrite a little-endian or big-endian integer field near the start (BMP, JPEG SOF, WebP RIFF/VP8)."""
    b = bytearray(data)
    if len(b) < 4:
        return bytes(b)
    pos = int(rng.integers(0, min(len(b) - 3, 64)))
    value = int(rng.choice([0, 1, 2**15, 2**16 - 1, 2**31 - 1, 2**32 - 1, int(rng.integers(0, 2**32))]))
    b[pos:pos + 4] = struct.pack("<I" if rng.random() < 0.5 else ">I", value)
    return bytes(b)


def mutate_image(rng: np.random.Generator, data: bytes) -> bytes:
    kind = int(rng.integers(0, 8))
    b = bytearray(data)
    if kind == 0:                                   # bit flips
        for _ in range(int(rng.integers(1, 9))):
            i = int(rng.integers(0, len(b)))
            b[i] ^= 1 << int(rng.integers(0, 8))
        return bytes(b)
    if kind == 1:                                   # truncation
        return data[: int(rng.integers(0, len(data)))]
    if kind == 2 and data.startswith(b"\x89PNG"):
        return _edit_png_ihdr(rng, data)
    if kind in (2, 3):
        return _edit_header_field(rng, data)
    if kind == 4:                                   # random bytes overwritten
        i = int(rng.integers(0, len(b)))
        n = int(rng.integers(1, 32))
        b[i:i + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        return bytes(b)
    if kind == 5:                                   # magic number of one format, body of another
        return data[:12] + bytes(rng.integers(0, 256, int(rng.integers(0, 400)), dtype=np.uint8))
    if kind == 6:                                   # junk appended or a slice repeated
        i = int(rng.integers(0, len(b)))
        return data + data[i:] * int(rng.integers(1, 4))
    return data                                     # as is


# -- .npy ---------------------------------------------------------------------------------------------------------
def _npy_dims(rng: np.random.Generator) -> tuple:
    pick = int(rng.integers(0, 6))
    if pick == 0:
        return (1, 8, 8)
    if pick == 1:
        return (int(rng.integers(0, 70)), 1, 8, 8)
    if pick == 2:
        return (8, 8)
    if pick == 3:
        return tuple(int(rng.choice([-1, 0, 1, 8, 3000, 2**31, 2**63 - 1])) for _ in range(int(rng.integers(0, 6))))
    if pick == 4:
        return (1, 3, 8, 8)
    return (1, 1, 8, 8)


def mutate_npy(rng: np.random.Generator) -> bytes:
    kind = int(rng.integers(0, 6))
    if kind == 0:                                   # a valid header, values that are wrong or right
        arr = rng.random((int(rng.integers(1, 4)), 1, 8, 8)) * float(rng.choice([1.0, 3.0, -1.0]))
        if rng.random() < 0.3:
            arr.flat[int(rng.integers(0, arr.size))] = float(rng.choice([np.nan, np.inf, -np.inf]))
        dt = str(rng.choice(["<f4", ">f4", "<f2", ">f8", "|u1", "<f16"]))
        with np.errstate(invalid="ignore"):
            arr = arr.astype(dt)
        return npy_file(np.asfortranarray(arr) if rng.random() < 0.3 else arr)
    descr = DESCRS[int(rng.integers(0, len(DESCRS)))]
    dims = _npy_dims(rng)
    fortran = rng.choice(["False", "True", "'yes'", "0"])
    header = "{'descr': %r, 'fortran_order': %s, 'shape': %r, }" % (descr, fortran, dims)
    if kind == 1:                                   # header text cut anywhere (unclosed brackets)
        header = header[: int(rng.integers(0, len(header)))]
    elif kind == 2:                                 # a character replaced
        i = int(rng.integers(0, len(header)))
        header = header[:i] + str(rng.choice(list("([{}])'\",:\\\x00\xff\ud800 "))) + header[i + 1:]
    elif kind == 3:                                 # deep nesting, or a long literal
        header = "{'descr': '<f4', 'fortran_order': False, 'shape': " + "(" * int(rng.integers(10, 3000)) + "}"
    version = bytes([int(rng.choice([1, 1, 2, 3, 0, 9])), 0])
    try:
        itemsize = np.dtype(descr).itemsize
    except (TypeError, ValueError):
        itemsize = 4
    data = bytes(int(rng.choice([0, 64 * itemsize, 64 * itemsize - 3, int(rng.integers(0, 4096))])))
    return _npy_raw(header, data, version)


# -- JSON ---------------------------------------------------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def json_body(rng: np.random.Generator, seeds: list[bytes]) -> bytes:
    kind = int(rng.integers(0, 9))
    depth = int(rng.choice([10, 900, 1100, 5000, 100_000]))
    if kind == 0:
        return b"[" * depth
    if kind == 1:
        return b'{"images": [' + b"[" * depth + b"]" * depth + b"]}"
    if kind == 2:
        return b'{"images": [' + b"9" * int(rng.choice([10, 5000, 100_000])) + b"e99999]}"
    if kind == 3:                                   # wrong types
        value = [None, 1, 1.5, True, {}, [], "x", [1], [None], [["a"]], {"a": "b"}][int(rng.integers(0, 11))]
        return json.dumps({"images": value} if rng.random() < 0.8 else value).encode()
    if kind == 4:                                   # bad base64
        bad = ["@@@", "QUJD\n", "é" * 4, "A", "=" * 8, "\ud800", "QUJD=A", "%00"]
        return json.dumps({"images": [bad[int(rng.integers(0, len(bad)))]]}).encode()
    if kind == 5:                                   # base64 of mutated files, sometimes too many
        n = int(rng.choice([1, 2, 3, 70]))
        return json.dumps({"images": [_b64(mutate_image(rng, seeds[int(rng.integers(0, len(seeds)))]))
                                      for _ in range(n)]}).encode()
    if kind == 6:                                   # .npy inside JSON
        return json.dumps({"images": [_b64(mutate_npy(rng))]}).encode()
    if kind == 7:                                   # not UTF-8, or NaN/Infinity literals, or a lone surrogate
        return [b"\xff\xfe{\x00", b'{"images": NaN}', b'{"images": ["\\ud800"]}', b"\x00" * 10,
                b'{"images": [' + b'"QUJD",' * 65 + b'"QUJD"]}'][int(rng.integers(0, 5))]
    return json.dumps({"images": [_b64(seeds[int(rng.integers(0, len(seeds)))])], "extra": {"a": [1] * 10}}).encode()


# -- multipart ----------------------------------------------------------------------------------------------------
def multipart_body(rng: np.random.Generator, seeds: list[bytes]) -> tuple[str, bytes]:
    boundary = str(rng.choice(["xyz", "", "a" * 200, "\"quoted\"", "b=c;d", "--", "x%y", "x y", "0" * 71]))
    ctype = "multipart/form-data" + ("" if rng.random() < 0.1 else f"; boundary={boundary}")
    b = boundary.encode("utf-8")
    parts = []
    for _ in range(int(rng.choice([0, 1, 2, 3, 70]))):
        payload = mutate_image(rng, seeds[int(rng.integers(0, len(seeds)))])
        disp = str(rng.choice(['form-data; name="f"; filename="x.png"', 'form-data; name="f"', "form-data",
                               'form-data; filename="../../etc/passwd"', "attachment", ""]))
        parts.append(b"--" + b + b"\r\nContent-Disposition: " + disp.encode() + b"\r\n\r\n" + payload + b"\r\n")
    body = b"preamble\r\n" * int(rng.integers(0, 2)) + b"".join(parts) + b"--" + b + b"--\r\n"
    if rng.random() < 0.3:
        body = body[: int(rng.integers(0, len(body) + 1))]
    if rng.random() < 0.1:
        body = body.replace(b"\r\n", b"\n")
    return ctype, body


def corpus(n: int, *, seed: int = 0) -> list[tuple[str, bytes]]:
    """``n`` (Content-Type, body) pairs across every content type the service takes, and some it does not."""
    rng = np.random.default_rng(seed)
    seeds = seed_files(rng)
    out = []
    for _ in range(n):
        kind = int(rng.integers(0, 10))
        if kind <= 2:
            body = mutate_image(rng, seeds[int(rng.integers(0, len(seeds)))])
            out.append((str(rng.choice(IMAGE_TYPES)), body))
        elif kind <= 4:
            out.append((str(rng.choice(["application/x-npy", "application/octet-stream"])), mutate_npy(rng)))
        elif kind <= 6:
            out.append(("application/json", json_body(rng, seeds)))
        elif kind <= 8:
            out.append(multipart_body(rng, seeds))
        else:
            body = [b"", b"\x00", bytes(rng.integers(0, 256, int(rng.integers(0, 512)), dtype=np.uint8))][
                int(rng.integers(0, 3))]
            out.append((str(rng.choice(OTHER_TYPES + IMAGE_TYPES)), body))
    return out
