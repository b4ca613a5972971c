"""The Lua scripts of the Valkey/Redis backend, one file per container kind.

Every operation that reads and writes, or must be exactly-once, is one script, run atomically
on the node serving its container's slot. ``<kind>.lua`` holds that kind's operations, each
starting with a line ``--- @op NAME``; :func:`scripts` wraps each in the shared prologue
(``_prologue.lua``: the container exists and is of this kind, and a request id already
answered returns its recorded answer) and epilogue (``_epilogue.lua``: record the answer under
the request id, in the same script as the change). ``create.lua`` and ``server.lua`` (drop,
describe) run without them. Lines after a ``--- @common`` line and before the first operation
are shared by every operation of the file (its local helpers), placed between the prologue and
the operation.

A new kind (the synchronization primitives) adds its own ``<kind>.lua`` and a module of
handlers beside :mod:`kvclient._redis.kinds`; nothing here changes.
"""

from __future__ import annotations

import hashlib
from functools import cache
from importlib.resources import files
from typing import Final, NamedTuple

__all__ = ["Script", "raw_script", "scripts"]

_MARK: Final = "--- @op "
_COMMON: Final = "--- @common"


class Script(NamedTuple):
    """One script: its text and the SHA1 that ``EVALSHA`` names it by."""

    name: str
    text: bytes
    sha: str


def _read(filename: str) -> str:
    return files(__package__).joinpath(filename).read_text(encoding="utf-8")


def _script(name: str, text: str) -> Script:
    body = text.encode()
    return Script(name, body, hashlib.sha1(body, usedforsecurity=False).hexdigest())


@cache
def scripts(kind_file: str) -> dict[str, Script]:
    """Return the operations of ``<kind_file>.lua``, each wrapped, by operation name."""
    prologue, epilogue = _read("_prologue.lua"), _read("_epilogue.lua")
    found: dict[str, Script] = {}
    name: str | None = None
    lines: list[str] = []
    common: list[str] | None = None
    for line in [*_read(f"{kind_file}.lua").splitlines(), _MARK]:
        if line.startswith(_MARK):
            if name is not None:
                body = "\n".join(lines)
                shared = "\n".join(common or [])
                text = f"{prologue}\n{shared}\nlocal function run()\n{body}\nend\n{epilogue}"
                found[name] = _script(f"{kind_file}.{name}", text)
            name, lines = line.removeprefix(_MARK).strip(), []
        elif name is not None:
            lines.append(line)
        elif line.strip() == _COMMON:
            common = []
        elif common is not None:
            common.append(line)
    found.pop("", None)
    return found


@cache
def raw_script(filename: str) -> Script:
    """Return ``<filename>.lua`` as it is (no prologue or epilogue)."""
    return _script(filename, _read(f"{filename}.lua"))
