"""Untrusted request bytes -> a float32 image batch in [0, 1], with every limit checked before the expensive step.

Accepted: PNG, JPEG, BMP and WebP files (multipart parts, a raw body, or base64 strings in a JSON body
``{"images": [...]}``) and ``.npy`` arrays (HxW, CxHxW or NxCxHxW; uint8 0-255 or float16/32/64 in [0, 1]). Every
item's header is read first (:func:`declared_pixels`): the pixel count of each image and of the whole request is
checked before anything is decoded, so a small file describing a huge image (a decompression bomb) or a request of
many large images is refused without allocating it. Every failure is an :class:`InputError` carrying the HTTP
status and a reason for the client; nothing here raises anything else on bad bytes:

- 400 ``bad_json`` / ``bad_base64`` / ``empty``; 400 ``undecodable``: a malformed .npy header or truncated .npy data;
- 413 ``too_many_images`` / ``too_many_pixels``; 415 ``unsupported_format``: no magic number of a supported format;
- 422 ``undecodable``: data with the magic number of a supported image format that cannot be decoded (corrupt,
  truncated); 422 ``bad_dtype`` / ``bad_shape`` / ``not_finite`` / ``out_of_range`` / ``no_images``.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from safedl.serve.config import ServeConfig

IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "WEBP")
NPY_MAGIC = b"\x93NUMPY"
NPY_VERSIONS = ((1, 0), (2, 0), (3, 0))
_RAW_TYPES = ("image/png", "image/jpeg", "image/bmp", "image/webp", "application/x-npy", "application/octet-stream")


class InputError(Exception):
    """A client's bad input: ``status`` (400, 413, 415, 422) and a machine-readable ``code``."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class Decoded:
    """The images of one request: ``x`` float32 [N, C, H, W] in [0, 1] plus, per image, what the audit records."""

    x: torch.Tensor
    sha256: list[str] = field(default_factory=list)
    shapes: list[list[int]] = field(default_factory=list)   # as received (C, H, W), before any conversion
    raw: list[bytes] = field(default_factory=list)          # the bytes as received


@dataclass(frozen=True)
class _NpyHeader:
    dims: tuple[int, ...]           # as declared
    dims4: tuple[int, int, int, int]
    fortran: bool
    dtype: np.dtype
    offset: int                     # where the data starts

    @property
    def pixels(self) -> int:
        return self.dims4[0] * self.dims4[2] * self.dims4[3]


@dataclass(frozen=True)
class _ImageHeader:
    format: str
    bands: int
    height: int
    width: int

    @property
    def pixels(self) -> int:
        return self.height * self.width


def items_from_json(body: bytes, *, config: ServeConfig) -> list[bytes]:
    """``{"images": ["<base64 PNG/JPEG/BMP/WebP/.npy>", ...]}`` -> the decoded byte strings."""
    try:
        doc = json.loads(body)
    except Exception as exc:  # ValueError, UnicodeDecodeError, RecursionError (nesting bombs), MemoryError
        raise InputError(400, "bad_json", f"the body is not valid JSON ({type(exc).__name__}: "
                                          f"{str(exc)[:200]})") from None
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list) or not images or not all(isinstance(s, str) for s in images):
        raise InputError(422, "bad_json", 'expected {"images": ["<base64 image or .npy>", ...]} with at least one string')
    if len(images) > config.max_images:
        raise InputError(413, "too_many_images", f"{len(images)} images; at most {config.max_images} per request")
    out = []
    for i, s in enumerate(images):
        try:
            out.append(base64.b64decode(s, validate=True))
        except ValueError:  # binascii.Error, or a non-ASCII string
            raise InputError(400, "bad_base64", f"images[{i}] is not valid base64") from None
    return out


def raw_content_type_ok(content_type: str) -> bool:
    return content_type in _RAW_TYPES


def image_format(data: bytes) -> str | None:
    """The supported image format whose magic number ``data`` starts with (PNG, JPEG, BMP, WEBP), else None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"BM"):
        return "BMP"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def declared_pixels(items: list[bytes], *, shape: tuple[int, int, int], config: ServeConfig) -> list[int]:
    """Per item, the pixels it would decode to (an image's width x height, a .npy array's N x H x W), from the
    headers alone (nothing is decoded). Raises the :class:`InputError` that decoding would for a malformed header,
    a wrong dtype or shape, or an image over ``config.max_pixels``."""
    return [h.pixels for h in _headers(items, shape=shape, config=config)]


def check_request_pixels(total: int, *, config: ServeConfig) -> None:
    """413 when the request's images hold more than ``config.max_request_pixels`` pixels in all."""
    if total > config.max_request_pixels:
        raise InputError(413, "too_many_pixels", f"the request's images hold {total} pixels in all; at most "
                                                 f"{config.max_request_pixels} per request")


def decode_items(items: list[bytes], *, shape: tuple[int, int, int], config: ServeConfig) -> Decoded:
    """Decode each item (an encoded image or a .npy array) into images of ``shape`` (C, H, W), once every header
    has been read and the request's image and pixel totals checked."""
    if not items:
        raise InputError(422, "no_images", "the request holds no image")
    headers = _headers(items, shape=shape, config=config)
    n = sum(h.dims4[0] if isinstance(h, _NpyHeader) else 1 for h in headers)
    if n > config.max_images:
        raise InputError(413, "too_many_images", f"{n} images in one request; at most {config.max_images}")
    check_request_pixels(sum(h.pixels for h in headers), config=config)
    xs: list[torch.Tensor] = []
    out = Decoded(x=torch.empty(0))
    for i, (data, h) in enumerate(zip(items, headers)):
        if isinstance(h, _NpyHeader):
            arr = _decode_npy(data, h, where=f"image {i}")
            out.shapes += [list(arr.shape[1:])] * arr.shape[0]
            out.sha256 += [hashlib.sha256(a.numpy().tobytes()).hexdigest() for a in arr]
            out.raw += [data] * arr.shape[0]
            xs.append(arr)
        else:
            xs.append(_decode_image(data, h, shape=shape, where=f"image {i}").unsqueeze(0))
            out.shapes.append([h.bands, h.height, h.width])
            out.sha256.append(hashlib.sha256(data).hexdigest())
            out.raw.append(data)
    out.x = torch.cat(xs)
    return out


def _headers(items: list[bytes], *, shape: tuple[int, int, int],
             config: ServeConfig) -> list[_NpyHeader | _ImageHeader]:
    out: list[_NpyHeader | _ImageHeader] = []
    for i, data in enumerate(items):
        where = f"image {i}"
        if not data:
            raise InputError(400, "empty", f"{where} is empty")
        if data.startswith(NPY_MAGIC):
            out.append(_npy_header(data, shape=shape, config=config, where=where))
        else:
            out.append(_image_header(data, shape=shape, config=config, where=where))
    return out


# -- encoded images ------------------------------------------------------------------------------------------------
def _undecodable(where: str, fmt: str, exc: BaseException) -> InputError:
    return InputError(422, "undecodable", f"{where}: corrupt or truncated {fmt} data ({type(exc).__name__}: "
                                          f"{str(exc)[:200]})")


def _image_header(data: bytes, *, shape: tuple[int, int, int], config: ServeConfig, where: str) -> _ImageHeader:
    """Width, height and bands from the header (PIL opens lazily: no pixel is decoded here)."""
    c, h, w = shape
    fmt = image_format(data)
    if fmt is None:
        raise InputError(415, "unsupported_format",
                         f"{where}: not a PNG, JPEG, BMP, WebP or .npy file (unrecognized or unsupported data)")
    if c not in (1, 3):
        raise InputError(422, "bad_shape", f"this model takes {c}x{h}x{w} inputs; send them as .npy arrays")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: we check the size ourselves
            with Image.open(io.BytesIO(data), formats=(fmt,)) as im:
                (iw, ih), bands = im.size, len(im.getbands())
    except Image.DecompressionBombError as exc:
        raise InputError(413, "too_many_pixels", f"{where}: {exc} (this service takes at most {config.max_pixels} "
                                                 "pixels per image)") from None
    except Exception as exc:  # the magic number is right, the header is not: whatever PIL raises
        raise _undecodable(where, fmt, exc) from None
    if iw * ih > config.max_pixels:
        raise InputError(413, "too_many_pixels", f"{where}: {iw}x{ih} = {iw * ih} pixels; "
                                                 f"at most {config.max_pixels} per image")
    if (ih, iw) != (h, w) and not config.resize:
        raise InputError(422, "bad_shape", f"{where}: {bands}x{ih}x{iw}; expected {c}x{h}x{w} (CxHxW)")
    return _ImageHeader(format=fmt, bands=bands, height=ih, width=iw)


def _decode_image(data: bytes, header: _ImageHeader, *, shape: tuple[int, int, int], where: str) -> torch.Tensor:
    """Decode, convert to the model's channels and resize to its H x W: float32 [C, H, W] in [0, 1]."""
    c, h, w = shape
    mode = "L" if c == 1 else "RGB"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=(header.format,)) as im:
                if header.format == "JPEG" and (header.height, header.width) != (h, w):
                    im.draft(mode, (w, h))  # decode a large JPEG at a reduced scale
                im.load()
                im = im.convert(mode)
                if im.size != (w, h):
                    im = im.resize((w, h), Image.Resampling.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
    except Exception as exc:  # truncated or corrupt pixel data of a recognized format
        raise _undecodable(where, header.format, exc) from None
    t = torch.from_numpy(arr.copy()).to(torch.float32).div_(255.0)
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


# -- .npy arrays ---------------------------------------------------------------------------------------------------
def _dtype_ok(dtype: np.dtype) -> bool:
    """float16/32/64 or uint8, either byte order; no structured, sub-array, object or extended-precision types."""
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        return False
    return (dtype.kind == "f" and dtype.itemsize in (2, 4, 8)) or (dtype.kind == "u" and dtype.itemsize == 1)


def _read_npy_header(f: io.BytesIO, *, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """numpy's own header reader (a literal, never a pickle); anything it raises on hostile bytes becomes a 400."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "created on Python 2" header warnings
            version = np.lib.format.read_magic(f)
            if version not in NPY_VERSIONS:
                raise ValueError(f"unknown .npy format version {version}")
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            dims, fortran, dtype = reader(f, max_header_size=10_000)
    except Exception as exc:  # ValueError, SyntaxError, tokenize.TokenError, RecursionError, MemoryError, ...
        raise InputError(400, "undecodable", f"{where}: bad .npy header ({type(exc).__name__}: "
                                             f"{str(exc)[:200]})") from None
    if any(d < 0 for d in dims):
        raise InputError(400, "undecodable", f"{where}: bad .npy header (negative dimension in {list(dims)})")
    return tuple(int(d) for d in dims), bool(fortran), dtype


def _npy_dims4(dims: tuple[int, ...], *, shape: tuple[int, int, int], where: str) -> tuple[int, int, int, int]:
    c, h, w = shape
    if len(dims) == 2 and c == 1:
        return (1, 1, *dims)
    if len(dims) in (3, 4):
        return (1, *dims) if len(dims) == 3 else dims
    raise InputError(422, "bad_shape", f"{where}: array of shape {list(dims)}; expected CxHxW = {c}x{h}x{w} "
                                       f"or NxCxHxW")


def _npy_header(data: bytes, *, shape: tuple[int, int, int], config: ServeConfig, where: str) -> _NpyHeader:
    """A .npy header read and checked (dtype, shape, limits, data length) before any data is touched."""
    f = io.BytesIO(data)
    dims, fortran, dtype = _read_npy_header(f, where=where)
    if not _dtype_ok(dtype):
        raise InputError(422, "bad_dtype", f"{where}: dtype {dtype}; send uint8 (0-255) or float16/32/64 in [0, 1]")
    dims4 = _npy_dims4(dims, shape=shape, where=where)
    if dims4[0] == 0:
        raise InputError(422, "no_images", f"{where}: the array holds no image (shape {list(dims)})")
    if dims4[0] > config.max_images:
        raise InputError(413, "too_many_images", f"{where}: {dims4[0]} images; at most {config.max_images}")
    if dims4[2] * dims4[3] > config.max_pixels:
        raise InputError(413, "too_many_pixels", f"{where}: {dims4[2]}x{dims4[3]} pixels per image; "
                                                 f"at most {config.max_pixels}")
    if dims4[1:] != tuple(shape):
        c, h, w = shape
        raise InputError(422, "bad_shape", f"{where}: array of shape {list(dims)}; expected CxHxW = {c}x{h}x{w} "
                                           f"(arrays are not resized)")
    want = dims4[0] * dims4[1] * dims4[2] * dims4[3] * dtype.itemsize
    if len(data) - f.tell() != want:
        raise InputError(400, "undecodable", f"{where}: truncated .npy data ({len(data) - f.tell()} bytes for "
                                             f"shape {list(dims)} {dtype}, expected {want})")
    return _NpyHeader(dims=dims, dims4=dims4, fortran=fortran, dtype=dtype, offset=f.tell())


def _decode_npy(data: bytes, header: _NpyHeader, *, where: str) -> torch.Tensor:
    """The checked array -> float32 [N, C, H, W] in [0, 1] (uint8 scaled by 1/255; floats must lie in [0, 1])."""
    dtype = header.dtype
    count = int(np.prod(header.dims4))
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=header.offset)
    arr = arr.reshape(header.dims, order="F" if header.fortran else "C").reshape(header.dims4)
    t = torch.from_numpy(np.ascontiguousarray(arr).astype(dtype.newbyteorder("=")))
    if dtype.kind == "u":
        return t.to(torch.float32).div_(255.0)
    if not bool(torch.isfinite(t).all()):
        raise InputError(422, "not_finite", f"{where}: the array holds NaN or infinite values")
    if bool((t < 0).any()) or bool((t > 1).any()):
        raise InputError(422, "out_of_range", f"{where}: float values must lie in [0, 1] "
                                              f"(got min {t.min().item():.4g}, max {t.max().item():.4g})")
    return t.to(torch.float32)
