"""Structured JSON logs: one object per line (ts, level, logger, msg and any ``extra`` fields)."""
from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Mapping

_STD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": round(record.created, 6), "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
               "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        for k, v in vars(record).items():
            if k not in _STD and not k.startswith("_"):
                doc[k] = v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else str(v)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class StaticFields(logging.Filter):
    """Adds the same fields to every record (a worker's ``worker`` index and ``pid``)."""

    def __init__(self, fields: Mapping[str, Any]):
        super().__init__()
        self.fields = dict(fields)

    def filter(self, record: logging.LogRecord) -> bool:
        for k, v in self.fields.items():
            setattr(record, k, v)
        return True


def setup_json_logging(level: int = logging.INFO, stream=None, *, fields: Mapping[str, Any] | None = None) -> None:
    """JSON lines on ``stream`` (stderr) for the root logger and uvicorn's; ``fields`` go on every line."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    if fields:
        handler.addFilter(StaticFields(fields))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
