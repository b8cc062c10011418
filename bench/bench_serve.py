"""`safedl serve` against a bare FastAPI endpoint serving the same model (issue 12), on loopback.

One run, one process tree: this script trains the default model (``small_cnn`` on ``mnist5k``, seed 0, 2 epochs;
accuracy is not the point), exports the default deployed system as a bundle (feature squeezing bit depth 4 + the
feature-squeezing detector, fpr 0.05), then starts, one after the other, (a) a bare FastAPI app that decodes the PNG
and runs the model's forward pass (nothing else) and (b) ``safedl serve`` on that bundle (API key, rate limits,
decoding limits, detector, audit log, metrics, micro-batching), and (c) ``safedl serve`` on the undefended bundle
of the same model (the service's own cost, apples to apples with (a)). Each is loaded by 1, 8 and 32 concurrent
keep-alive clients sending PNGs of test digits for ``--seconds`` each (bounded by ``--max-requests`` too), after
a warm-up. Reports throughput, p50/p95/p99 latency, non-200 and 5xx counts, and for safedl serve whether the audit
rows equal the answered requests. It also reports the defended pipeline's own ``decide`` throughput at those
batch sizes (the ceiling any server of it can reach). Targets (2 cores): safedl >= 0.7x the bare throughput at 32 clients, p99 <= 50 ms
at 32 clients, zero 5xx, audit rows == answered.

    PYTHONPATH=src nice -n 10 .venv/bin/python bench/bench_serve.py --seconds 8 --levels 1,8,32 --seed 0
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from fastapi import FastAPI, Request  # noqa: E402  (module level: the endpoint annotations are resolved here)

log = logging.getLogger("bench_serve")


# -- the bare endpoint (run in a child process with --bare-server) -------------------------------------------------
def bare_app(bundle_path: str):
    import numpy as np
    from fastapi.concurrency import run_in_threadpool
    from PIL import Image

    from safedl.deploy import load_bundle

    model = load_bundle(bundle_path).pipeline.model.eval()
    app = FastAPI()

    def infer(body: bytes) -> int:
        with Image.open(io.BytesIO(body)) as im:
            x = torch.from_numpy(np.asarray(im.convert("L"), dtype=np.uint8).copy()).float().div(255)[None, None]
        with torch.inference_mode():
            return int(model(x).argmax(1))

    @app.post("/v1/predict")
    async def predict(request: Request) -> dict:
        return {"label": await run_in_threadpool(infer, await request.body())}

    @app.get("/v1/ready")
    async def ready() -> dict:
        return {"ready": True}

    return app


# -- setup ------------------------------------------------------------------------------------------------------
def prepare(workdir: Path, seed: int) -> tuple[Path, str, list[bytes]]:
    from PIL import Image

    from safedl import registry
    from safedl.data import load_builtin, stratified_split
    from safedl.deploy import SecurePipeline, export_bundle
    from safedl.models import TrainRecipe, build_model, train_model, with_normalization
    from safedl.serve.keys import KeyStore
    from safedl.utils.tensors import seed_everything

    splits = stratified_split(load_builtin("mnist5k"), test_fraction=0.2, val_fraction=0.1, seed=seed)
    seed_everything(seed)
    c, h, w = splits.shape
    model = with_normalization(build_model("small_cnn", in_channels=c, num_classes=splits.num_classes, image_size=h),
                               splits.mean, splits.std)
    train_model(model, splits.train, recipe=TrainRecipe(epochs=2, batch_size=128, lr=3e-3, augment="none"), seed=seed)
    model.eval()
    squeeze = registry.create("preprocessor", "feature_squeezing", bit_depth=4)
    det = registry.create("detector", "feature_squeezing_detector", bit_depth=2, fpr=0.05)
    det.fit(splits.train.x[:500], model=model, x_calibration=splits.val.x, seed=seed)
    names = splits.train.class_names or [str(i) for i in range(splits.num_classes)]
    pipe = SecurePipeline(model=model, preprocessors=[squeeze], detectors=[det], class_names=names,
                          input_shape=splits.shape)
    spec = {"arch": "small_cnn", "arch_params": {}, "in_channels": c, "num_classes": splits.num_classes,
            "image_size": h, "mean": list(splits.mean), "std": list(splits.std)}
    bundle = export_bundle(pipe, workdir / "bundle", model_spec=spec,
                           data={"name": "mnist5k", "shape": list(splits.shape), "num_classes": splits.num_classes,
                                 "class_names": names})
    export_bundle(SecurePipeline(model=model, class_names=names, input_shape=splits.shape), workdir / "bundle_plain",
                  model_spec=spec, data={"name": "mnist5k", "shape": list(splits.shape),
                                         "num_classes": splits.num_classes, "class_names": names})
    _, token = KeyStore(workdir / "keys.db", create=True).create(name="bench", tier="rounded", rate_per_s=1e6,
                                                                 burst=10**6, daily_quota=10**9)
    pngs = []
    for img in splits.test.x[:64]:
        buf = io.BytesIO()
        Image.fromarray((img[0] * 255).round().to(torch.uint8).numpy(), "L").save(buf, "PNG")
        pngs.append(buf.getvalue())
    return bundle, token, pngs


# -- load generator: raw HTTP/1.1 keep-alive clients on one asyncio loop (cheap, so the client steals little CPU) --
async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = 0
    for line in lines[1:]:
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    await reader.readexactly(length)
    return int(lines[0].split()[1])


async def _client(port: int, reqs: list[bytes], offset: int, stop_at: float, out: list, max_n: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = offset
    try:
        while time.perf_counter() < stop_at and len(out) < max_n:
            t0 = time.perf_counter()
            writer.write(reqs[i % len(reqs)])
            await writer.drain()
            status = await _read_response(reader)
            out.append((time.perf_counter() - t0, status))
            i += 1
    finally:
        writer.close()


async def _load(port: int, reqs: list[bytes], clients: int, seconds: float, max_n: int) -> tuple[list, float]:
    out: list = []
    t0 = time.perf_counter()
    await asyncio.gather(*(_client(port, reqs, k * 7, t0 + seconds, out, max_n) for k in range(clients)))
    return out, time.perf_counter() - t0


def _requests(pngs: list[bytes], token: str | None) -> list[bytes]:
    auth = f"X-API-Key: {token}\r\n" if token else ""
    return [(f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Type: image/png\r\n"
             f"Content-Length: {len(p)}\r\n\r\n").encode() + p for p in pngs]


def _summary(samples: list, wall: float) -> dict:
    lat = torch.tensor([s[0] for s in samples], dtype=torch.float64) * 1000.0
    q = torch.quantile(lat, torch.tensor([0.5, 0.95, 0.99], dtype=torch.float64)).tolist() if len(lat) else [None] * 3
    statuses = [s[1] for s in samples]
    return {"requests": len(samples), "seconds": round(wall, 3), "throughput_rps": round(len(samples) / wall, 1),
            "p50_ms": round(q[0], 2), "p95_ms": round(q[1], 2), "p99_ms": round(q[2], 2),
            "non_200": sum(s != 200 for s in statuses), "5xx": sum(s >= 500 for s in statuses)}


def pipeline_ceiling(bundle: Path, pngs: list[bytes], sizes: list[int], repeats: int = 10) -> dict:
    """Images/s of the bundle's own ``decide`` at each batch size, in this process: what the defended system can
    compute at most, whatever serves it (the defense costs forward passes the bare endpoint does not run)."""
    from safedl.deploy import load_bundle
    from safedl.serve.config import ServeConfig
    from safedl.serve.decode import decode_items

    b = load_bundle(bundle)
    x = decode_items(pngs, shape=tuple(b.pipeline.input_shape), config=ServeConfig()).x
    out = {}
    for n in sizes:
        xb = x[torch.arange(n) % len(x)]
        b.pipeline.decide(xb)
        t0 = time.perf_counter()
        for _ in range(repeats):
            b.pipeline.decide(xb)
        out[str(n)] = round(n * repeats / (time.perf_counter() - t0), 1)
    return out


def _start(cmd: list[str], port: int, env: dict, log_path: Path) -> subprocess.Popen:
    import httpx

    with open(log_path, "ab") as fh:  # a file, not a pipe: an undrained pipe would block the server's logging
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=fh)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:4]} exited: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/ready", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become ready")


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(name: str, cmd: list[str], port: int, reqs: list[bytes], levels: list[int], seconds: float,
            max_n: int, env: dict, log_path: Path) -> tuple[dict, int, int]:
    """Per level: summary; plus the total requests answered 200 and answered at all (warm-up included)."""
    proc = _start(cmd, port, env, log_path)
    out, answered_200, answered = {}, 0, 0
    try:
        for c in levels:
            warm, _ = asyncio.run(_load(port, reqs, c, 1.0, 200))
            samples, wall = asyncio.run(_load(port, reqs, c, seconds, max_n))
            out[str(c)] = _summary(samples, wall)
            for s in (warm, samples):
                answered += len(s)
                answered_200 += sum(st == 200 for _, st in s)
            log.info("%s, %d clients: %s", name, c, out[str(c)])
    finally:
        _stop(proc)
    return out, answered_200, answered


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--levels", default="1,8,32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-requests", type=int, default=50_000, help="per level")
    p.add_argument("--max-wait-ms", type=float, default=3.0)
    p.add_argument("--out", type=Path, default=None, help="also write the results here (JSON)")
    p.add_argument("--bare-server", nargs=2, metavar=("BUNDLE", "PORT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.bare_server:
        import uvicorn

        uvicorn.run(bare_app(args.bare_server[0]), host="127.0.0.1", port=int(args.bare_server[1]),
                    log_level="warning", access_log=False)
        return {}
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    levels = [int(v) for v in args.levels.split(",")]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        work = Path(tmp)
        bundle, token, pngs = prepare(work, args.seed)
        port = _free_port()
        bare, _, _ = measure("bare", [sys.executable, __file__, "--bare-server", str(bundle), str(port)], port,
                             _requests(pngs, None), levels, args.seconds, args.max_requests, env, work / "bare.log")
        ceiling = {"default": pipeline_ceiling(bundle, pngs, levels), "undefended": pipeline_ceiling(
            work / "bundle_plain", pngs, levels)}
        served, audit = {}, {}
        for name, path in (("safedl", bundle), ("safedl_undefended", work / "bundle_plain")):
            port = _free_port()
            db = work / f"audit_{name}.db"
            cmd = [sys.executable, "-m", "safedl.cli", "serve", str(path), "--keys", str(work / "keys.db"),
                   "--audit", str(db), "--port", str(port), "--max-wait-ms", str(args.max_wait_ms)]
            served[name], ok200, answered = measure(name, cmd, port, _requests(pngs, token), levels, args.seconds,
                                                    args.max_requests, env, work / f"{name}.log")
            conn = sqlite3.connect(db)
            rows = conn.execute("SELECT COUNT(*), SUM(http_status = 200) FROM audit WHERE endpoint='/v1/predict'"
                                ).fetchone()
            conn.close()
            audit[name] = {"answered": answered, "answered_200": ok200, "rows": rows[0], "rows_200": rows[1] or 0,
                           "rows_equal_answered": rows[0] == answered and (rows[1] or 0) == ok200}
    ratio = {name: {c: round(r[c]["throughput_rps"] / bare[c]["throughput_rps"], 3) for c in bare}
             for name, r in served.items()}
    result = {"seed": args.seed, "seconds_per_level": args.seconds, "cpu_count": os.cpu_count(),
              "load_avg_at_end": os.getloadavg(), "bare": bare, **served, "throughput_ratio_vs_bare": ratio,
              "pipeline_ceiling_images_per_s": ceiling, "audit": audit,
              "targets": {"ratio_32_ge_0.7": ratio["safedl"].get("32", 0) >= 0.7,
                          "p99_32_le_50ms": served["safedl"].get("32", {}).get("p99_ms", 1e9) <= 50,
                          "zero_5xx": all(v["5xx"] == 0 for r in served.values() for v in r.values()),
                          "audit_rows_equal_answered": all(a["rows_equal_answered"] for a in audit.values())}}
    print(json.dumps(result, indent=2))
    if args.out:
        from safedl.utils.io import atomic_write_json

        atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
