"""In-process CPU time of the parts of one served request (1 torch thread, one 1 x 28 x 28 PNG): the model forward,
``SecurePipeline.decide`` of the default deployed system (also with the classifier and the detector in separate
forward passes) and its classifier and detector, the key lookup (also
through the verified-key cache) and the three limit statements on SQLite, PNG decoding. Setup as bench/bench_serve.py ``prepare`` (seed ``--seed``).

    PYTHONPATH=src nice -n 10 /work/main/.venv/bin/python bench/bench_request_parts.py --calls 500 --seed 0
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import prepare  # noqa: E402

from _setup import cpu_ms_per_call  # noqa: E402


def _cpu_ms(fn, calls: int) -> float:
    return round(cpu_ms_per_call(fn, calls), 3)


def _separate(pipe, x):
    """``decide`` with the classifier and the detector in separate forward passes (deploy/shared_forward.py off)."""
    pipe.share_forward = False
    try:
        return pipe.decide(x)
    finally:
        pipe.share_forward = True


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from safedl.deploy import load_bundle
    from safedl.serve.config import ServeConfig
    from safedl.serve.decode import decode_items
    from safedl.serve.keys import KeyStore
    from safedl.serve.limits import RateLimiter

    with tempfile.TemporaryDirectory(prefix="bench_parts_") as tmp:
        bundle, token, pngs = prepare(Path(tmp), args.seed)
        pipe = load_bundle(bundle).pipeline
        keys = KeyStore(Path(tmp) / "keys.db")
        cached = KeyStore(Path(tmp) / "keys.db", cache_ttl_s=2.0)  # as safedl serve opens it (serve/key_cache.py)
        limiter, key, cfg = RateLimiter(keys), keys.authenticate(token), ServeConfig()
        x, n = decode_items([pngs[0]], shape=(1, 28, 28), config=cfg).x, args.calls
        with torch.inference_mode():
            out = {"model_forward": _cpu_ms(lambda: pipe.model(x), n)}
        out.update({"decide": _cpu_ms(lambda: pipe.decide(x), n),
                    "decide_separate_passes": _cpu_ms(lambda: _separate(pipe, x), n),
                    "classify": _cpu_ms(lambda: pipe.decide(x, with_detectors=False), n),
                    "detector_score": _cpu_ms(lambda: pipe.detectors[0].detector.score(x), n),
                    "key_lookup": _cpu_ms(lambda: keys.authenticate(token), n),
                    "key_lookup_cached": _cpu_ms(lambda: cached.authenticate(token), n),
                    "token_bucket": _cpu_ms(lambda: limiter.take(key), n),
                    "pixel_budget": _cpu_ms(lambda: limiter.charge_pixels(key, pixels=784, rate_per_s=1e9,
                                                                          burst=10**9), n),
                    "image_quota": _cpu_ms(lambda: limiter.charge_images(key, images=1), n),
                    "png_decode": _cpu_ms(lambda: decode_items([pngs[0]], shape=(1, 28, 28), config=cfg), n)})
        keys.close()
        cached.close()
    res = {"seed": args.seed, "calls": args.calls, "cpu_ms_per_call": out}
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
