"""The HTTP inference service (`safedl serve`): a verified bundle's SecurePipeline behind API keys, rate limits,
input limits, an audit log written before every answer, Prometheus metrics and micro-batching.

Modules, one component each, in the order a request meets them: ``protocol`` / ``connection_limits`` (the HTTP
connection: header and body deadlines, connection limits, lingering close), ``edge`` (ASGI: framing, client address,
security headers), ``http`` (authentication before the body, bounded body reading, audit before answer),
``request`` (the typed request context, ApiError), ``unauth`` (bounded work before authentication), ``service``
(the state and admission rules), ``predict`` / ``admin`` / ``app`` (routes), ``decode`` (untrusted bytes ->
tensors), ``batcher`` (micro-batching), ``tiers`` (per-key output hardening), ``keys``, ``limits``, ``audit``,
``review/`` (the review queue), ``metrics``, ``swap`` (bundle hot swap), ``monitor/`` (security monitor), ``config`` / ``options``
(validated settings), ``server`` (start-up and shutdown), ``workers`` (``--workers N``: the supervisor
and its worker processes on one socket), ``client`` (the service as an attack oracle).
"""
from __future__ import annotations

from safedl.serve.config import ServeConfig

__all__ = ["ServeConfig", "create_app"]


def __getattr__(name: str):  # fastapi is an optional dependency: import the app factory lazily
    if name == "create_app":
        from safedl.serve.app import create_app

        return create_app
    raise AttributeError(name)
