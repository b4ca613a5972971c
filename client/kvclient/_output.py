"""How ``kvctl`` prints a value, shared by its typer commands and its fast path.

A str prints as is; any other value prints as one line of JSON: bytes as base64 text, tuples as
lists, map keys that JSON cannot hold as their JSON text, and anything else (a proxy to a
container stored inside another one) as its ``repr``, which names its kind, name and server.
"""

from __future__ import annotations

import base64
import json
from typing import Any

__all__ = ["jsonable", "plain", "to_json"]


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
