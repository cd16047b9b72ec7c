"""Logs as JSON lines: time, level, event, service, region and the record's own fields.

A stack trace never reaches a log line: an exception is logged by its type only, because its message or
frames could carry SQL, a token or a secret (DESIGN D8).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import msgspec

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
_context: dict[str, str] = {}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": record.msg if isinstance(record.msg, str) else str(record.msg),
            "logger": record.name,
            **_context,
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        if record.exc_info and record.exc_info[0] is not None:
            doc["error_type"] = record.exc_info[0].__name__
        return msgspec.json.encode(doc).decode()


def configure_logging(*, service: str, region: str | None = None) -> None:
    _context.update(service=service)
    if region:
        _context.update(region=region)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get("TXROUTE_LOG_LEVEL", "INFO").upper())
    for noisy in ("granian", "granian.access", "httpx", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
