"""CPU ms per ``SecurePipeline.decide`` of one 1 x 28 x 28 image and per model forward (1 torch thread; median of
``--rounds`` rounds of ``--calls`` calls) for the safedl on PYTHONPATH, on a fixed bundle, so two versions can be
compared on the same bundle by running this alternately with each one's ``src`` (the machine's load moves both):

    PYTHONPATH=src nice -n 10 .venv/bin/python bench/bench_decide.py --workdir /tmp/bd --seed 0   # makes the bundle once
    PYTHONPATH=/path/to/other/src nice -n 10 .venv/bin/python bench/bench_decide.py --workdir /tmp/bd

The bundle is bench/bench_serve.py ``prepare`` (seed ``--seed``), made in ``--workdir`` when it is not there yet.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _setup import cpu_ms_per_call as _cpu_ms  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from bench_serve import prepare
    from safedl.deploy import load_bundle
    from safedl.serve.config import ServeConfig
    from safedl.serve.decode import decode_items

    png = args.workdir / "digit.png"
    if not (args.workdir / "bundle" / "manifest.json").is_file():
        args.workdir.mkdir(parents=True, exist_ok=True)
        png.write_bytes(prepare(args.workdir, args.seed)[2][0])
    pipe = load_bundle(args.workdir / "bundle").pipeline
    x = decode_items([png.read_bytes()], shape=(1, 28, 28), config=ServeConfig()).x
    out: dict[str, list[float]] = {"decide": [], "model_forward": []}
    for _ in range(args.rounds):
        out["decide"].append(_cpu_ms(lambda: pipe.decide(x), args.calls))
        with torch.inference_mode():
            out["model_forward"].append(_cpu_ms(lambda: pipe.model(x), args.calls))
    res = {"cpu_ms_median": {k: round(statistics.median(v), 3) for k, v in out.items()},
           "rounds": args.rounds, "calls": args.calls}
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
