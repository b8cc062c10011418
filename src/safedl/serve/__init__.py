"""The HTTP inference service (`safedl serve`): a verified bundle's SecurePipeline behind API keys, rate limits,
input limits, an audit log written before every answer, Prometheus metrics and micro-batching.

Modules, one component each: ``config`` (limits), ``keys`` (hashed API keys), ``limits`` (token bucket + daily
quota), ``decode`` (untrusted bytes -> tensors), ``audit`` (SQLite WAL store, export), ``quarantine`` (flagged
inputs kept for review), ``metrics`` (Prometheus), ``batcher`` (dynamic micro-batching), ``tiers`` (per-key
output hardening), ``logs`` (JSON logs), ``app`` (the FastAPI app factory), ``server`` (start-up and shutdown).
"""
from __future__ import annotations

from safedl.serve.config import ServeConfig

__all__ = ["ServeConfig", "create_app"]


def __getattr__(name: str):  # fastapi is an optional dependency: import the app factory lazily
    if name == "create_app":
        from safedl.serve.app import create_app

        return create_app
    raise AttributeError(name)
