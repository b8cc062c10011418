"""Decoding cost with and without the per-key input cache (serve/input_cache.py), as ``Service`` decodes: the
same request sent again by the same key (a hit) against the first send (a miss: ``decode_items``), per request.

Inputs (seeded random pixels, as a worst case for the codecs): an 8-bit PNG at the bundle's shape, a JPEG of
another size that the service resizes and converts (RGB 256 x 256 -> 1 x 28 x 28), and one ``.npy`` of 64 images.
For each: REPEATS timed requests of each kind after a warm-up; reported: median and p90 microseconds per request,
hit / miss, and the cache's bytes held.

    PYTHONPATH=src nice -n 10 /work/main/.venv/bin/python bench/bench_input_cache.py --repeats 300 --seed 0
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import statistics
import time

import numpy as np
import torch
from PIL import Image

from safedl.serve.config import ServeConfig
from safedl.serve.decode import decode_items
from safedl.serve.input_cache import InputCache

log = logging.getLogger("bench.input_cache")
SHAPE = (1, 28, 28)


def _encoded(rng: np.random.Generator) -> dict[str, bytes]:
    def enc(arr: np.ndarray, mode: str, fmt: str) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(arr, mode).save(buf, format=fmt)
        return buf.getvalue()

    npy = io.BytesIO()
    np.save(npy, rng.random((64, *SHAPE), dtype=np.float32), allow_pickle=False)
    return {"png_28x28": enc(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L", "PNG"),
            "jpeg_256x256_rgb_resized": enc(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), "RGB", "JPEG"),
            "npy_64x1x28x28": npy.getvalue()}


def _timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def measure(item: bytes, *, repeats: int) -> dict:
    config = ServeConfig()

    def decode(some: list[bytes]):
        return decode_items(some, shape=SHAPE, config=config)

    for _ in range(10):  # warm-up (codec tables, allocator)
        decode([item])
    miss = _timed(lambda: InputCache().decode("k", [item], decode), repeats)  # a fresh cache: always a miss
    cache = InputCache(max_bytes_per_key=64 * 2**20)
    cache.decode("k", [item], decode)
    hit = _timed(lambda: cache.decode("k", [item], decode), repeats)
    assert cache.hits == repeats
    q = statistics.quantiles
    return {"bytes": len(item), "miss_us": {"p50": statistics.median(miss), "p90": q(miss, n=10)[-1]},
            "hit_us": {"p50": statistics.median(hit), "p90": q(hit, n=10)[-1]},
            "hit_over_miss_p50": statistics.median(hit) / statistics.median(miss), "cache_bytes": cache.nbytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the JSON here too")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)  # as `safedl serve --torch-threads 1` (the default)
    rng = np.random.default_rng(args.seed)
    results = {name: measure(item, repeats=args.repeats) for name, item in _encoded(rng).items()}
    text = json.dumps({"seed": args.seed, "repeats": args.repeats, "torch_threads": 1, "results": results}, indent=2)
    log.info("%s", text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
