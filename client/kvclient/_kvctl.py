"""The ``kvctl`` entry point: ``kvctl get`` served without loading typer, everything else by it.

Every command is defined once, in :mod:`kvclient.cli`. Loading it costs typer and the whole
client, about 100 ms, eight times a bare ``python -c pass``; a shell loop calling
``kvctl get`` pays that on every call. So :func:`main` first tries :func:`fast_get`, which
recognises the plain form of one read-only command::

    kvctl [connection options] get KEY [-d NAME] [--json]   (options in any order, as in cli)

and runs it over one :class:`~kvclient.connection.Connection`, printing what ``kvclient.cli``
prints for the same outcome (``tests/test_kvctl_fast.py`` runs both and compares). Whatever it
does not recognise, or is not sure to print the same way (TLS, a usage error, a connection or
auth error, a value holding a container reference, a dict name that is another kind), it
leaves to ``kvclient.cli`` by returning None before it has printed anything. Only a read is
served here: falling back after an error is then harmless, where a write might be applied
twice. Set ``KVCTL_NO_FAST_PATH=1`` to always use ``kvclient.cli``.

Rejected: a second, hand-written parser for every command (two definitions of the CLI to
keep in step), and replacing typer (the issue asks the CLI to stay typer).
"""

from __future__ import annotations

import math
import os
import sys

from kvproto.address import DEFAULT_PORT, AddressError, parse_target

__all__ = ["fast_get", "main"]

# Options of the main command and of `get`: those that take a value, and flags.
_VALUED = {"-a": "address", "--address": "address", "--authkey-file": "authkey_file"}
_VALUED |= {"--timeout": "timeout", "-d": "dict", "--dict": "dict"}
_FLAGS = {"--json": "json", "-j": "json"}


class _NotPlain(Exception):
    """This call is not one the fast path serves the same way; kvclient.cli takes it."""


def _refuse_ref(_ref: object) -> object:
    raise _NotPlain  # printing a proxy needs the whole client


def _parse(argv: list[str]) -> dict[str, str] | None:
    """Return the options and KEY of a plain ``get`` call, or None for anything else."""
    found: dict[str, str] = {}
    positional: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-"):
            name, eq, value = arg.partition("=") if arg.startswith("--") else (arg, "", "")
            if name in _VALUED:
                if not eq:
                    i += 1
                    if i == len(argv):
                        return None
                    value = argv[i]
                found[_VALUED[name]] = value
            elif name in _FLAGS and not eq:
                found[_FLAGS[name]] = "1"
            else:
                return None  # --help, --bytes, TLS options, --, a KEY starting with "-" ...
        else:
            positional.append(arg)
        i += 1
    if len(positional) != 2 or positional[0] != "get":
        return None
    found["key"] = positional[1]
    return found


def _timeout(text: str) -> float | None:
    try:
        seconds = float(text)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds > 0 else None


def fast_get(argv: list[str]) -> int | None:
    """Run ``kvctl get`` if ``argv`` is a plain call of it; return the exit code, else None.

    None means nothing was printed and kvclient.cli must run the call instead.
    """
    options = _parse(argv)
    if options is None:
        return None
    env = os.environ
    if env.get("KVCTL_NO_FAST_PATH") or env.get("KV_TLS_CA") or env.get("KV_TLS_CERT"):
        return None
    address = options.get("address", env.get("KV_ADDRESS") or f"127.0.0.1:{DEFAULT_PORT}")
    timeout = _timeout(options.get("timeout", env.get("KV_TIMEOUT") or "10"))
    try:
        target = parse_target(address)
    except AddressError:
        return None
    authkey_file = options.get("authkey_file")
    if timeout is None or target.tls or (target.key_file and authkey_file):
        return None

    from kvclient.connection import Connection  # noqa: PLC0415
    from kvproto.authkey import load_authkey  # noqa: PLC0415 - only once the call is plain
    from kvproto.errors import KVError  # noqa: PLC0415

    key, dict_name = options["key"], options.get("dict", "default")
    try:
        authkey = load_authkey(authkey_file=authkey_file or target.key_file).key
        conn = Connection((target.host, target.port), authkey, timeout, make_ref=_refuse_ref)
    except (KVError, OSError, ValueError):
        return None  # kvclient.cli reports it, with its retries and wording
    try:
        kind = conn.call([None, "names", [], None]).get(dict_name)
        if kind is None:
            line = f"no dict named {dict_name!r} on {conn.endpoint}; kvctl names lists them"
            return _fail(f"NoSuchContainerError: {line}")
        if kind != "dict":
            return None
        try:
            value = conn.call([dict_name, "__getitem__", [key], None])
        except KeyError:
            return _fail(f"KeyError: no key {key!r} in dict {dict_name!r}")
    except (KVError, OSError, _NotPlain):
        return None
    finally:
        conn.close()
    return _print(value, bool(options.get("json")))


def _fail(line: str) -> int:
    sys.stderr.write(line.replace("\n", " ") + "\n")
    return 1


def _print(value: object, as_json: bool) -> int | None:
    if isinstance(value, str) and not as_json:
        text = value
    else:
        from kvclient._output import to_json  # noqa: PLC0415 - a str needs no JSON

        text = to_json(value)
    if "\x1b" in text:
        return None  # click's echo strips ANSI escapes when stdout is not a terminal
    out = sys.stdout
    out.write(text + "\n")
    out.flush()
    return 0


def main() -> None:
    """Run kvctl: ``get`` by :func:`fast_get` when it can, anything else by kvclient.cli."""
    try:
        code = fast_get(sys.argv[1:])
    except BrokenPipeError:
        # The reader of a pipe (`| head`) is gone, as click handles it: quiet, exit 1.
        sys.stdout = None
        sys.exit(1)
    if code is not None:
        sys.exit(code)
    from kvclient.cli import app, keep_only  # noqa: PLC0415 - typer and the whole client

    keep_only(sys.argv[1:])
    app(prog_name="kvctl")
