"""Helpers of the security-monitor tests: a monitor config file, a local webhook receiver, square-attack-like query
streams."""
from __future__ import annotations

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import torch
import yaml


def write_config(path: Path, *, calibration: Path | None, rules: list[dict], **extra) -> Path:
    """A monitor YAML at ``path`` (sinks: JSONL next to it unless ``sinks`` is given)."""
    cfg = {"calibration": str(calibration) if calibration else None, "rules": rules,
           "sinks": {"log": True, "jsonl": str(path.with_suffix(".jsonl"))}, "tick_s": 0.2, **extra}
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


class WebhookReceiver:
    """An HTTP server on 127.0.0.1 that records every POSTed JSON body; the first ``fail`` posts get a 500."""

    def __init__(self, *, fail: int = 0):
        self.bodies: list[dict] = []
        self.statuses: list[int] = []
        self.fail = fail
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status = 500 if len(outer.statuses) < outer.fail else 200
                outer.statuses.append(status)
                if status == 200:
                    outer.bodies.append(body)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "WebhookReceiver":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def npy(x: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x.numpy().astype(np.float32), allow_pickle=False)
    return buf.getvalue()


def near_duplicates(img: torch.Tensor, n: int, *, eps: float, seed: int) -> torch.Tensor:
    """``n`` copies of ``img`` each with one random square of +-eps (what square attack queries look like)."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = img.shape
    out = img.expand(n, c, h, w).clone()
    for j in range(n):
        s = int(torch.randint(1, max(2, h // 2), (1,), generator=g))
        r, q = (int(v) for v in torch.randint(0, h - s + 1, (2,), generator=g))
        sign = 1.0 if bool(torch.rand(1, generator=g) < 0.5) else -1.0
        out[j, :, r:r + s, q:q + s] += sign * eps
    return out.clamp(0, 1)
