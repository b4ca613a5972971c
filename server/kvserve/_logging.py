"""kvserve's log formats: ``text`` for people (the default) and ``json``, one object a line.

A JSON line holds ``ts`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger`` and
``message``, ``exc`` when an exception was logged, and the structured fields a call passed in
``extra`` (a slow request's ``slow_request``: kind, op, name, ms), so a log pipeline need not
parse the message. Values never appear in either format: the server logs names and sizes.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any, Final

__all__ = ["FORMATS", "setup"]

FORMATS: Final = ("text", "json")
_TEXT: Final = "%(asctime)s kvserve %(levelname)s %(message)s"
# What every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD: Final = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys() | {"message", "asctime"}
)


class JsonFormatter(logging.Formatter):
    """Format each record as one JSON object on one line."""

    def format(self, record: logging.LogRecord) -> str:
        """Return the record as a JSON line (no newline)."""
        out: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        return json.dumps(out, default=str, ensure_ascii=False)


def setup(level: int, fmt: str = "text") -> None:
    """Send kvserve's logs to stderr at ``level``, as ``fmt`` (``text`` or ``json``).

    Raises:
        ValueError: ``fmt`` is neither.
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format must be text or json, not {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT))
    logging.basicConfig(level=level, handlers=[handler])
