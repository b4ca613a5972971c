"""The ``kvctl`` entry point: ``get``, ``set`` and ``incr`` served without typer, the rest by it.

Every command is defined once, in :mod:`kvclient.cli`. Loading it costs typer, about 70% of
a typer-path call (~225 ms, eighteen times a bare ``python -c pass``); a shell loop calling
``kvctl`` pays that on every call. So :func:`main` first tries :func:`fast_call`, which
recognises the plain form of three commands::

    kvctl [connection options] get KEY [-d NAME] [--json]
    kvctl [connection options] set KEY VALUE [-d NAME]
    kvctl [connection options] incr KEY [BY] [-d NAME] [--json]

(options in any order, as in cli) and prints what ``kvclient.cli`` prints for the same outcome
(``tests/test_kvctl_fast.py`` runs both and compares). ``get`` runs over one bare
:class:`~kvclient.connection.Connection`; ``set`` and ``incr`` over a
:class:`~kvclient.Client`, as the typer commands do, with its request ids and retries: a write
retried after a lost connection is still applied once.

Whatever it does not recognise, or is not sure to handle the same way (TLS, a Valkey/Redis
URL, which :func:`~kvproto.address.parse_target` refuses, ``--json`` or ``-`` values of
``set``, a usage error, a value holding a container reference, a dict name that is another
kind), it leaves to ``kvclient.cli`` by returning None *before it has sent a
write or printed anything*: a connection or auth error at connect time, or anything ``get``
meets, falls back harmlessly, where falling back after a write was sent might apply it twice.
After that point, errors are reported here, through the same
:func:`~kvclient._output.error_line` as the typer commands. Set ``KVCTL_NO_FAST_PATH=1`` to
always use ``kvclient.cli``.

Rejected: a second, hand-written parser for every command (two definitions of the CLI to
keep in step), and replacing typer (the issue asks the CLI to stay typer).
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

from kvproto.address import DEFAULT_PORT, AddressError, parse_target

__all__ = ["fast_call", "main"]

# Options of the main command and of the commands served here: those taking a value, and
# flags. An option not listed (--bytes, --ttl, TLS options, --help, ...) sends the call to cli.
_VALUED = {"-a": "address", "--address": "address", "--authkey-file": "authkey_file"}
_VALUED |= {"--timeout": "timeout", "-d": "dict", "--dict": "dict"}
_FLAGS = {"--json": "json", "-j": "json"}
# The commands served here, and how many arguments each takes (fewest, most).
_ARITY = {"get": (1, 1), "set": (2, 2), "incr": (1, 2)}


class _NotPlain(Exception):
    """This call is not one the fast path serves the same way; kvclient.cli takes it."""


def _refuse_ref(_ref: object) -> object:
    raise _NotPlain  # printing a proxy needs the whole client


def _parse(argv: list[str]) -> dict[str, Any] | None:
    """Return the options, command and arguments of a plain call, or None for anything else."""
    found: dict[str, Any] = {}
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
                return None  # --help, --bytes, TLS options, --, a value starting with "-" ...
        else:
            positional.append(arg)
        i += 1
    if not positional or positional[0] not in _ARITY:
        return None
    command, args = positional[0], positional[1:]
    fewest, most = _ARITY[command]
    if not fewest <= len(args) <= most or (command == "set" and "json" in found):
        return None  # set --json parses VALUE: left to cli, with its usage errors
    found["command"], found["args"] = command, args
    return found


def _timeout(text: str) -> float | None:
    try:
        seconds = float(text)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds > 0 else None


def fast_call(argv: list[str]) -> int | None:
    """Run ``argv`` if it is a plain ``get``, ``set`` or ``incr``; return the exit code, else None.

    None means nothing was sent that changes anything and nothing was printed: kvclient.cli
    must run the call instead.
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
    if options["command"] == "get":
        return _get(options, (target.host, target.port), authkey_file or target.key_file, timeout)
    return _write(options, (target.host, target.port), authkey_file or target.key_file, timeout)


def _get(
    options: dict[str, Any], address: tuple[str, int], key_file: str | None, timeout: float
) -> int | None:
    from kvclient.connection import Connection  # noqa: PLC0415
    from kvproto.authkey import load_authkey  # noqa: PLC0415 - only once the call is plain
    from kvproto.errors import KVError  # noqa: PLC0415

    (key,), dict_name = options["args"], options.get("dict", "default")
    try:
        authkey = load_authkey(authkey_file=key_file).key
        conn = Connection(address, authkey, timeout, make_ref=_refuse_ref)
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


def _write(
    options: dict[str, Any], address: tuple[str, int], key_file: str | None, timeout: float
) -> int | None:
    """``set`` or ``incr`` through a Client, as the typer commands make them."""
    command, args = options["command"], options["args"]
    by: float = 1
    if command == "incr" and len(args) == 2:
        from kvclient._output import number  # noqa: PLC0415

        parsed = number(args[1])
        if parsed is None:
            return None  # cli says it is not a number (exit 2)
        by = parsed
    import kvclient  # noqa: PLC0415 - the whole client, still no typer
    from kvclient._output import error_line  # noqa: PLC0415
    from kvproto.authkey import load_authkey  # noqa: PLC0415
    from kvproto.errors import KVError  # noqa: PLC0415

    try:
        authkey = load_authkey(authkey_file=key_file).key
        client = kvclient.connect(address, authkey, timeout, call_timeout=timeout, tls=False)
    except (KVError, OSError, ValueError):
        return None  # nothing sent yet: kvclient.cli reports it, with its wording
    # From here on a write may be on its way: every outcome is reported here.
    try:
        mapping = client.dict(options.get("dict", "default"))
        if command == "set":
            mapping[args[0]] = args[1]
            return 0
        result = mapping.incr(args[0], by)
    except Exception as exc:
        code, line = error_line(exc)
        _echo(sys.stderr, line)
        return code
    finally:
        client.close()
    from kvclient._output import plain, to_json  # noqa: PLC0415

    _echo(sys.stdout, to_json(result) if options.get("json") else plain(result))
    return 0


def _echo(stream: Any, line: str) -> None:
    """Write ``line`` as click's echo does: ANSI escapes dropped unless on a terminal."""
    if "\x1b" in line and not stream.isatty():
        import re  # noqa: PLC0415 - rare: a name or key holding an escape sequence

        line = re.sub(r"\033\[[;?0-9]*[a-zA-Z]", "", line)  # click's strip_ansi
    stream.write(line + "\n")
    stream.flush()


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
    """Run kvctl: plain ``get``/``set``/``incr`` by :func:`fast_call`, anything else by cli."""
    try:
        code = fast_call(sys.argv[1:])
    except BrokenPipeError:
        # The reader of a pipe (`| head`) is gone, as click handles it: quiet, exit 1.
        sys.stdout = None
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)  # as typer: no traceback
    if code is not None:
        sys.exit(code)
    from kvclient.cli import app, keep_only  # noqa: PLC0415 - typer and the whole client

    keep_only(sys.argv[1:])
    app(prog_name="kvctl")
