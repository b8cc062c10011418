"""Helpers of the service tests: images as bytes, a tiny stand-in bundle, free ports, an app served in a thread."""
from __future__ import annotations

import io
import socket
import threading
import time

import numpy as np
import torch
from PIL import Image


def png_bytes(img: torch.Tensor, fmt: str = "PNG") -> bytes:
    """A float [C, H, W] image in [0, 1] as PNG/JPEG/BMP/WEBP bytes (8-bit)."""
    arr = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    pil = Image.fromarray(arr[0].numpy(), "L") if arr.shape[0] == 1 else Image.fromarray(arr.permute(1, 2, 0).numpy(), "RGB")
    buf = io.BytesIO()
    pil.save(buf, format=fmt)
    return buf.getvalue()


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def quantized(img: torch.Tensor) -> torch.Tensor:
    """What the service sees after an 8-bit PNG round trip."""
    return (img.clamp(0, 1) * 255).round() / 255


def audit_rows(db, where: str = "1=1") -> list[dict]:
    """The audit table's rows matching ``where`` (SQL), oldest first, as dicts."""
    import sqlite3

    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    out = [dict(r) for r in conn.execute(f"SELECT * FROM audit WHERE {where} ORDER BY id")]
    conn.close()
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_bundle(model, splits, out, *, fpr: float = 0.1, detect: bool = True, drift: bool = False):
    """Export the default deployed system of the tests (feature squeezing + its detector around ``model``, digits;
    ``detect=False``: without the detector; ``drift``: with the validation split as drift reference) as a real
    bundle at ``out``, through ``safedl.deploy.export_bundle``."""
    from safedl import registry
    from safedl.deploy import SecurePipeline, export_bundle

    squeeze = registry.create("preprocessor", "feature_squeezing", bit_depth=4)
    det = registry.create("detector", "feature_squeezing_detector", bit_depth=2, fpr=fpr)
    det.fit(splits.train.x[:300], model=model, x_calibration=splits.val.x, seed=0)
    pipe = SecurePipeline(model=model, preprocessors=[squeeze], detectors=[det] if detect else [],
                          class_names=splits.train.class_names, input_shape=splits.shape)
    spec = {"arch": "tiny_cnn", "arch_params": {}, "in_channels": 1, "num_classes": 10, "image_size": 8,
            "mean": list(splits.mean), "std": list(splits.std)}
    data = {"name": "digits", "shape": list(splits.shape), "num_classes": 10, "class_names": splits.train.class_names}
    from safedl.deploy.drift_reference import compute_reference

    ref = compute_reference(model, splits.val.x, splits.val.y, num_classes=10) if drift else None
    return export_bundle(pipe, out, model_spec=spec, data=data, drift=ref,
                         metrics={"pgd": {"metrics": {"robust_accuracy": {"value": 0.5, "ci95": [0.4, 0.6], "n": 100}}}})


class ServerProcess:
    """``safedl serve`` in a child process on 127.0.0.1 and a free port; always stopped on exit."""

    def __init__(self, bundle, keys, audit, *extra: str):
        import os
        import subprocess
        import sys
        from pathlib import Path

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        src = str(Path(__file__).resolve().parents[1] / "src")
        env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.cmd = [sys.executable, "-m", "safedl.cli", "serve", str(bundle), "--keys", str(keys), "--audit",
                    str(audit), "--port", str(self.port), *extra]
        import tempfile

        # stderr to a file, not a pipe: an undrained pipe would block the server's logging under load
        self.log = tempfile.NamedTemporaryFile(prefix="safedl-serve-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(self.cmd, env=env, stdout=subprocess.DEVNULL, stderr=self.log)

    def log_text(self) -> str:
        from pathlib import Path

        return Path(self.log.name).read_text(errors="replace")

    def log_records(self) -> list[dict]:
        """The JSON log records written so far; a line the server is still writing (no newline yet) is left out."""
        import json

        text = self.log_text()
        complete = text[:text.rfind("\n") + 1]
        return [json.loads(line) for line in complete.splitlines() if line.startswith("{")]

    def wait_ready(self, timeout: float = 90.0) -> "ServerProcess":
        import time

        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/v1/ready", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not become ready")

    def stop(self, timeout: float = 30.0) -> int:
        import subprocess

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        import os

        self.stop()
        self.log.close()
        os.unlink(self.log.name)


class Uvicorn:
    """``app`` served by uvicorn in a thread on 127.0.0.1 and a free port (lifespan included); stopped on exit."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "Uvicorn":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
