"""Untrusted request bytes -> a float32 image batch in [0, 1], with every limit checked before the expensive step.

Accepted: PNG, JPEG, BMP and WebP files (multipart parts, a raw body, or base64 strings in a JSON body
``{"images": [...]}``) and ``.npy`` arrays (HxW, CxHxW or NxCxHxW; uint8 0-255 or float in [0, 1]). The pixel count
is read from the image header (or the .npy header) and checked before anything is decoded, so a small file
describing a huge image (a decompression bomb) is refused without allocating it. Every failure is an
:class:`InputError` carrying the HTTP status and a reason for the client; nothing here raises anything else on bad
bytes.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import struct
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from safedl.serve.config import ServeConfig

IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "WEBP")
NPY_MAGIC = b"\x93NUMPY"
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
    raw: list[bytes] = field(default_factory=list)          # the bytes as received (for the quarantine)


def items_from_json(body: bytes, *, config: ServeConfig) -> list[bytes]:
    """``{"images": ["<base64 PNG/JPEG/BMP/WebP/.npy>", ...]}`` -> the decoded byte strings."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(400, "bad_json", f"the body is not valid JSON ({exc})") from None
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list) or not images or not all(isinstance(s, str) for s in images):
        raise InputError(422, "bad_json", 'expected {"images": ["<base64 image or .npy>", ...]} with at least one string')
    if len(images) > config.max_images:
        raise InputError(413, "too_many_images", f"{len(images)} images; at most {config.max_images} per request")
    out = []
    for i, s in enumerate(images):
        try:
            out.append(base64.b64decode(s, validate=True))
        except (binascii.Error, ValueError):
            raise InputError(400, "bad_base64", f"images[{i}] is not valid base64") from None
    return out


def raw_content_type_ok(content_type: str) -> bool:
    return content_type in _RAW_TYPES


def decode_items(items: list[bytes], *, shape: tuple[int, int, int], config: ServeConfig) -> Decoded:
    """Decode each item (an encoded image or a .npy array) into images of ``shape`` (C, H, W)."""
    if not items:
        raise InputError(422, "no_images", "the request holds no image")
    xs: list[torch.Tensor] = []
    out = Decoded(x=torch.empty(0))
    for i, data in enumerate(items):
        if not data:
            raise InputError(400, "empty", f"image {i} is empty")
        if data.startswith(NPY_MAGIC):
            arr = _decode_npy(data, shape=shape, config=config, where=f"image {i}")
            out.shapes += [list(arr.shape[1:])] * arr.shape[0]
            for a in arr:
                b = a.numpy().tobytes()
                out.sha256.append(hashlib.sha256(b).hexdigest())
                out.raw.append(data)
            xs.append(arr)
        else:
            img, orig = _decode_image(data, shape=shape, config=config, where=f"image {i}")
            out.shapes.append(orig)
            out.sha256.append(hashlib.sha256(data).hexdigest())
            out.raw.append(data)
            xs.append(img.unsqueeze(0))
        if sum(t.shape[0] for t in xs) > config.max_images:
            raise InputError(413, "too_many_images", f"more than {config.max_images} images in one request")
    out.x = torch.cat(xs)
    return out


def _decode_image(data: bytes, *, shape: tuple[int, int, int], config: ServeConfig, where: str):
    c, h, w = shape
    if c not in (1, 3):
        raise InputError(422, "bad_shape", f"this model takes {c}x{h}x{w} inputs; send them as .npy arrays")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: we check the size ourselves
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
                iw, ih = im.size
                if iw * ih > config.max_pixels:
                    raise InputError(413, "too_many_pixels", f"{where}: {iw}x{ih} = {iw * ih} pixels; "
                                                             f"at most {config.max_pixels} per image")
                orig = [len(im.getbands()), ih, iw]
                if (ih, iw) != (h, w) and not config.resize:
                    raise InputError(422, "bad_shape", f"{where}: {orig[0]}x{ih}x{iw}; expected {c}x{h}x{w} (CxHxW)")
                if im.format == "JPEG" and (ih, iw) != (h, w):
                    im.draft("L" if c == 1 else "RGB", (w, h))  # decode a large JPEG at a reduced scale
                im.load()
                im = im.convert("L" if c == 1 else "RGB")
                if im.size != (w, h):
                    im = im.resize((w, h), Image.Resampling.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
    except InputError:
        raise
    except Image.DecompressionBombError as exc:
        raise InputError(413, "too_many_pixels", f"{where}: {exc} (this service takes at most {config.max_pixels} "
                                                 "pixels per image)") from None
    except UnidentifiedImageError:
        raise InputError(415, "unsupported_format",
                         f"{where}: not a PNG, JPEG, BMP, WebP or .npy file (unrecognized or unsupported data)") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error) as exc:
        raise InputError(400, "undecodable", f"{where}: truncated or corrupt image data ({type(exc).__name__}: {exc})") from None
    t = torch.from_numpy(arr.copy()).to(torch.float32).div_(255.0)
    return (t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()), orig


def _decode_npy(data: bytes, *, shape: tuple[int, int, int], config: ServeConfig, where: str) -> torch.Tensor:
    """A .npy file -> float32 [N, C, H, W] in [0, 1]; header read and checked before the data (no pickles)."""
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        dims, fortran, dtype = reader(f, max_header_size=10_000)
    except (ValueError, SyntaxError, TypeError, EOFError, KeyError) as exc:
        raise InputError(400, "undecodable", f"{where}: bad .npy header ({exc})") from None
    if dtype.hasobject or dtype.kind not in "uf" or (dtype.kind == "u" and dtype.itemsize != 1):
        raise InputError(422, "bad_dtype", f"{where}: dtype {dtype}; send uint8 (0-255) or float16/32/64 in [0, 1]")
    c, h, w = shape
    dims = tuple(dims)
    if len(dims) == 2 and c == 1:
        dims4 = (1, 1, *dims)
    elif len(dims) == 3:
        dims4 = (1, *dims)
    elif len(dims) == 4:
        dims4 = dims
    else:
        raise InputError(422, "bad_shape", f"{where}: array of shape {list(dims)}; expected CxHxW = {c}x{h}x{w} "
                                           f"or NxCxHxW")
    if dims4[0] == 0:
        raise InputError(422, "no_images", f"{where}: the array holds no image (shape {list(dims)})")
    if dims4[0] > config.max_images:
        raise InputError(413, "too_many_images", f"{where}: {dims4[0]} images; at most {config.max_images}")
    if dims4[2] * dims4[3] > config.max_pixels:
        raise InputError(413, "too_many_pixels", f"{where}: {dims4[2]}x{dims4[3]} pixels per image; "
                                                 f"at most {config.max_pixels}")
    if dims4[1:] != (c, h, w):
        raise InputError(422, "bad_shape", f"{where}: array of shape {list(dims)}; expected CxHxW = {c}x{h}x{w} "
                                           f"(arrays are not resized)")
    count = int(np.prod(dims4))
    if len(data) - f.tell() != count * dtype.itemsize:
        raise InputError(400, "undecodable", f"{where}: truncated .npy data ({len(data) - f.tell()} bytes for "
                                             f"shape {list(dims)} {dtype}, expected {count * dtype.itemsize})")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=f.tell()).reshape(dims, order="F" if fortran else "C")
    t = torch.from_numpy(np.ascontiguousarray(arr.reshape(dims4)).astype(dtype.newbyteorder("=")))
    if dtype.kind == "u":
        return t.to(torch.float32).div_(255.0)
    if not bool(torch.isfinite(t).all()):
        raise InputError(422, "not_finite", f"{where}: the array holds NaN or infinite values")
    if bool((t < 0).any()) or bool((t > 1).any()):
        raise InputError(422, "out_of_range", f"{where}: float values must lie in [0, 1] "
                                              f"(got min {t.min().item():.4g}, max {t.max().item():.4g})")
    return t.to(torch.float32)


def declared_pixels(items: list[bytes], *, shape: tuple[int, int, int], config: ServeConfig) -> list[int]:
    """Per item, the pixels its header declares (image width x height; .npy N x H x W), read without decoding;
    the total is checked against ``config.max_request_pixels`` (413)."""
    out = []
    for i, data in enumerate(items):
        if data.startswith(NPY_MAGIC):
            f = io.BytesIO(data)
            try:
                version = np.lib.format.read_magic(f)
                reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                dims = tuple(reader(f, max_header_size=10_000)[0])
            except Exception as exc:  # noqa: BLE001 - any header failure is the client's bad input
                raise InputError(400, "undecodable", f"image {i}: bad .npy header ({type(exc).__name__})") from None
            out.append(int(np.prod(dims, dtype=np.float64)) if dims else 1)
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
                    out.append(int(im.size[0]) * int(im.size[1]))
        except Exception:  # noqa: BLE001 - decode_items gives the precise error
            out.append(0)
    total = sum(out)
    if total > config.max_request_pixels:
        raise InputError(413, "too_many_pixels", f"the request's images declare {total} pixels in all; at most "
                                                 f"{config.max_request_pixels} per request")
    return out
