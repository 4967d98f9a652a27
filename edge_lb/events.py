"""Structured logs: one logfmt line per event, readable by people and by log shippers.

    2026-11-26T10:00:00.123Z info event=health vip=10.0.0.1:80/tcp backend=10.1.0.2 check=tcp to=down
        reason="connect: refused"     (one line in the log)
"""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from typing import Any

log = logging.getLogger("edge_lb")
_RECENT: deque[dict[str, Any]] = deque(maxlen=1000)  # for the API's "recent events"


def _value(value: object) -> str:
    text = str(value)
    if text and all(c.isalnum() or c in "-_.:/[]%@+," for c in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def render(event: str, **fields: object) -> str:
    """event=NAME key=value ...; values quoted when they hold spaces or quotes; None fields are left out."""
    parts = [f"event={event}"]
    parts += [f"{k}={_value(v)}" for k, v in fields.items() if v is not None]
    return " ".join(parts)


def emit(event: str, level: int = logging.INFO, **fields: object) -> None:
    log.log(level, render(event, **fields))
    _RECENT.append({"time": time.time(), "event": event, "level": logging.getLevelName(level).lower(),
                    **{k: v if isinstance(v, bool | int | float | str) else str(v)
                       for k, v in fields.items() if v is not None}})


def recent(limit: int = 100) -> list[dict[str, Any]]:
    """The last `limit` events (at most 1000 are kept), oldest first."""
    return list(_RECENT)[-limit:] if limit > 0 else []


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        line = f"{stamp} {record.levelname.lower()} {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup(level: int = logging.INFO) -> None:
    """Log lines to stderr (systemd's journal takes them from there)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
