"""Structured logs: one JSON object per line, one line per event, never a secret.

Used by all three programs. `event(log, "auth.refused", reason="expired", user="alice")`
writes `{"ts": ..., "level": "info", "logger": ..., "event": "auth.refused", ...}`.
Fields whose names look secret are dropped here as a last line of defence.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_SECRET_WORDS = ("token", "password", "secret", "credential", "private")


def _is_secret(key: str) -> bool:
    k = key.lower()
    return any(w in k for w in _SECRET_WORDS) and not k.endswith(("_id", "_type", "_count"))


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if fields is not None:
            doc["event"] = record.getMessage()
            doc.update({k: v for k, v in fields.items() if not _is_secret(k)})
        else:
            doc["msg"] = record.getMessage()
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(doc, default=str, separators=(",", ":"))


def setup_logging(level: str = "info", stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JSONFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # asyncssh logs every packet-level step at INFO; keep only its warnings.
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def event(log: logging.Logger | logging.LoggerAdapter, name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one structured event; `fields` become top-level JSON keys."""
    if isinstance(log, logging.LoggerAdapter):
        fields = {**(log.extra or {}), **fields}
        log = log.logger
    if log.isEnabledFor(level):
        log.log(level, name, extra={"fields": fields})
