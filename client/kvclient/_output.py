"""How ``kvctl`` prints values and errors and reads numbers, for typer and the fast path.

A str prints as is; any other value prints as one line of JSON: bytes as base64 text, tuples as
lists, map keys that JSON cannot hold as their JSON text, and anything else (a proxy to a
container stored inside another one) as its ``repr``, which names its kind, name and server.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any, Final

from kvproto.errors import NoSuchContainerError

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_USAGE",
    "NotFoundError",
    "error_line",
    "jsonable",
    "number",
    "plain",
    "to_json",
]

EXIT_OK: Final = 0
EXIT_NOT_FOUND: Final = 1
EXIT_USAGE: Final = 2
EXIT_ERROR: Final = 3
EXIT_INTERRUPTED: Final = 130  # 128 + SIGINT, as a shell reports a command ended by Ctrl-C


class NotFoundError(Exception):
    """The answer is "no" (exit 1): a missing key or item, an empty queue, a cas mismatch.

    Args:
        label: the error name printed before the message (``KeyError``, ``queue.Empty``, ...).
        message: what was not found, naming the key and the container.
    """

    def __init__(self, label: str, message: str) -> None:
        super().__init__(message)
        self.label = label


def error_line(exc: Exception) -> tuple[int, str]:
    """Return the exit code and the one stderr line, ``ErrorName: message``, for ``exc``."""
    if isinstance(exc, NotFoundError):
        code, name = EXIT_NOT_FOUND, exc.label
    else:
        code = EXIT_NOT_FOUND if isinstance(exc, NoSuchContainerError) else EXIT_ERROR
        name = type(exc).__name__
    # str(KeyError("x")) is "'x'"; the message is the argument itself.
    message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    message = " ".join(message.splitlines())
    return code, f"{name}: {message}" if message else name


def jsonable(value: Any) -> Any:
    """Return ``value`` with bytes as base64 text, tuples as lists and proxies as their repr."""
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, list | tuple):
        return [jsonable(item) for item in value]
    if isinstance(value, dict):
        return {_json_key(key): jsonable(item) for key, item in value.items()}
    return repr(value)


def _json_key(key: Any) -> Any:
    if isinstance(key, str | int | float | bool) or key is None:
        return key  # json.dumps turns numbers, booleans and None into key strings itself
    text = jsonable(key)  # bytes: base64 text; a tuple: its JSON text
    return text if isinstance(text, str) else json.dumps(text, ensure_ascii=False)


def to_json(value: Any) -> str:
    """Return ``value`` as one line of JSON (see the module docstring)."""
    return json.dumps(jsonable(value), ensure_ascii=False)


def plain(value: Any) -> str:
    """Return a str as is, anything else as :func:`to_json` does."""
    return value if isinstance(value, str) else to_json(value)


def number(text: str) -> int | float | None:
    """Parse BY as ``kvctl incr`` does (an int kept exact, else a finite float), None if not."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        parsed = float(text)
    except ValueError:
        return None
    return parsed if math.isfinite(parsed) else None
