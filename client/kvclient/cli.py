"""``kvctl``: read and write a kvserve server from the shell (parse, call kvclient, print).

Every command opens one :class:`~kvclient.Client`, makes its calls and prints. The CLI adds no
behaviour the Python API lacks; the only things it does on its own are presentation and the
existence check of :meth:`_Session.existing`, so that reading a container that does not exist
says so instead of creating it (``kvctl keys -d typo`` must not leave a dict called ``typo``).

Output
------
A str result prints as is; any other result prints as one line of JSON, bytes as base64 text.
Results that are sequences (``keys``, ``list range``) print one item per line. With ``--json``
every result prints as one JSON document, and VALUE arguments are parsed as JSON.

Exit codes and errors
---------------------
=====  ==========================================================================
0      success
1      not found: missing key, container or attribute, empty list on pop, queue
       get timed out, cas mismatch, del found none of its keys, lock still held
       after --timeout (the answer is "no", nothing failed)
2      usage error (typer's own handling: bad option, bad number, malformed
       address, invalid JSON)
3      connection, auth or server error
=====  ==========================================================================

``kvctl lock run`` exits with its command's status instead (see :func:`lock_run`).

Exceptions become exit codes and the one stderr line ``ErrorName: message`` by one function,
:func:`kvclient._output.error_line`, called here only by :func:`_session` (and by the fast
path, :mod:`kvclient._kvctl`, for the writes it serves). Nothing prints a traceback: typer's
pretty exceptions are off, and anything unexpected is still reported as one line with exit
code 3.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import fnmatch
import functools
import json
import math
import os
import queue
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final, TypeVar

import typer
from typer.core import TyperGroup

import kvclient
from kvclient._dumps import Collector, MsgpackDumpWriter, restore_flow
from kvclient._output import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_USAGE,
    number,
    plain,
    to_json,
)
from kvclient._output import NotFoundError as _NotFoundError
from kvclient._output import error_line as _error_line
from kvclient._runner import run_sync
from kvclient.connection import DEFAULT_ADDRESS
from kvclient.proxies import make_proxy, to_ref
from kvclient.sync import DEFAULT_LEASE, ConditionProxy, LockProxy, SemaphoreProxy, ValueProxy
from kvproto.address import (
    FORMS,
    REDIS_FORMS,
    REDIS_SCHEMES,
    AddressError,
    Target,
    parse_redis_url,
    parse_target,
)
from kvproto.authkey import load_authkey
from kvproto.codec import STORED_DEPTH, Codec, Ref
from kvproto.errors import KindError, NoSuchContainerError
from kvproto.limits import check_ttl
from kvproto.schema import PARTED_KINDS

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_NOT_FOUND", "EXIT_OK", "EXIT_USAGE", "app"]


DEFAULT_DICT: Final = "default"
DEFAULT_TIMEOUT: Final = 10.0

# The kinds `kvctl lock status` reports on: every primitive with leased holders.
_LOCK_KINDS: Final = ("lock", "rlock", "semaphore", "bounded_semaphore", "condition")
# How to look at a container of each kind, for the message when a command meets the wrong one.
_READ_HINTS: Final = {
    "dict": "kvctl keys -d {name}",
    "list": "kvctl list range {name}",
    "queue": "kvctl queue size {name}",
    "namespace": "kvctl ns show {name}",
    "value": "kvctl value get {name}",
    **dict.fromkeys(_LOCK_KINDS, "kvctl lock status {name}"),
}
# Fixed-arity commands whose values or numbers may start with "-" (`incr hits -1`,
# `list range jobs -3`): unknown options there are taken as arguments. Commands taking any
# number of values stay strict, where a mistyped option would otherwise be stored as data;
# there `--` ends the options (`kvctl list push jobs -- -1`).
_NEGATIVE_OK: Final = {"ignore_unknown_options": True}


def _examples(*lines: str) -> str:
    """Return a help epilog showing ``lines`` as typed, not rewrapped (click's backspace marker)."""
    return "Examples:\n\n\b\n" + "\n".join(f"  {line}" for line in lines)


_EPILOG = (
    _examples(
        "kvctl set greeting hello           # store a str in the dict 'default'",
        "kvctl get greeting                 # prints: hello",
        "kvctl set --json limits '{\"rps\": 50}'",
        "kvctl incr -d hits home            # atomic; prints the new value",
        "kvctl list push jobs build test",
        "kvctl queue get jobs --timeout 5   # wait up to 5 s for an item",
        "kvctl names -a kv://10.0.0.5:50000 # connection options go anywhere before --",
    )
    + """

Values: a plain argument is stored as a str; with --json it is parsed as JSON (numbers,
lists, maps, true, false, null). A str result prints as is, anything else as JSON; with
--json every result prints as JSON. bytes print as base64. In commands taking several values,
put -- before values that start with "-": kvctl list push jobs -- -1.

ADDRESS is HOST:PORT, [IPv6]:PORT, kv://[KEY@]HOST:PORT or kvs://[KEY@]HOST:PORT (TLS); KEY
names the authkey file, ~/.config/kvmanager/KEY.key, or is a path to one. ADDRESS may also
be a Valkey/Redis URL, for the same commands on that backend (README "Outgrowing one host"):
redis://[USER:PASSWORD@]HOST[:PORT][/DB], rediss://... (TLS), or
redis-cluster://HOST:PORT[,HOST:PORT...] (any nodes of a Redis Cluster); the password may
come from env REDIS_PASSWORD instead. There dump, restore, compact, slowlog, watch and --ttl
exit 3: they are kvserve's only. A VALUE of - is stdin, whole (--bytes: as bytes).
Connection options may also follow the command.

The authkey is read from --authkey-file or the file the address names, else env KV_AUTHKEY
(the key itself), else the file named by env KV_AUTHKEY_FILE, else
~/.config/kvmanager/authkey; never from the command line.

Exit codes:

\b
  0  success
  1  not found: missing key, container or attribute, empty list on pop,
     queue get timed out, cas mismatch, del found none of its keys,
     lock still held after --timeout
  2  usage error: unknown option, missing argument, malformed address,
     invalid JSON under --json
  3  connection, auth or server error
kvctl lock run exits with its command's status instead (kvctl lock run -h).
Errors print one line to stderr, "ErrorName: message", never a traceback.
"""
)


def _option_names(command: Any) -> tuple[set[str], set[str]]:
    """Return every option name of a click command, and the names of those taking a value."""
    names: set[str] = set()
    valued: set[str] = set()
    for param in command.params:
        if getattr(param, "param_type_name", "") == "option":
            names.update(param.opts, param.secondary_opts)
            if not param.is_flag:
                valued.update(param.opts)
    return names, valued


def _hoist_global_options(group: TyperGroup, ctx: Any, args: list[str]) -> list[str]:
    """Return ``args`` with the main command's options that follow the command moved before it.

    So ``kvctl get k -a host:1`` reads as ``kvctl -a host:1 get k``, as etcdctl allows. An
    option the command has itself keeps its meaning there (``queue get --timeout`` is the wait,
    ``--json`` is the command's), and nothing after ``--`` moves. Rejected: declaring the
    connection options on every command, 40 commands times 8 options to keep in step.
    """
    global_names, global_valued = _option_names(group)
    i = 0
    while i < len(args) and args[i].startswith("-") and args[i] not in ("-", "--"):
        i += 2 if args[i] in global_valued else 1
    lead_end = i
    command: Any = group
    while i < len(args) and isinstance(command, TyperGroup):
        command = command.get_command(ctx, args[i])
        if command is None:
            return args  # an unknown command: let click say so
        i += 1
    if command is group:
        return args
    own_names, own_valued = _option_names(command)
    hoisted: list[str] = []
    rest: list[str] = []
    j = i
    while j < len(args):
        arg = args[j]
        if arg == "--":
            rest += args[j:]
            break
        name = arg.partition("=")[0] if arg.startswith("--") else arg
        takes_value = "=" not in arg and j + 1 < len(args)
        if name in global_names and name not in own_names:
            hoisted.append(arg)
            if takes_value and name in global_valued:
                j += 1
                hoisted.append(args[j])
        else:
            rest.append(arg)
            if takes_value and name in own_valued:
                j += 1
                rest.append(args[j])
        j += 1
    return [*args[:lead_end], *hoisted, *args[lead_end:i], *rest]


class _KvctlGroup(TyperGroup):
    """The main command: connection options are accepted after the command too."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, _hoist_global_options(self, ctx, args))


app = typer.Typer(
    cls=_KvctlGroup,
    name="kvctl",
    help="Read and write a kvserve server's dicts, lists, queues and namespaces from the shell.",
    epilog=_EPILOG,
    no_args_is_help=True,
    # Plain click output: help and usage errors read the same in a terminal, a pipe or a log,
    # and tests can assert them exactly. Rich boxes were rejected for that reason.
    rich_markup_mode=None,
    # A traceback (pretty or not) may show locals, and the authkey can be among them.
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
list_app = typer.Typer(
    help="Push, pop and read named lists.", no_args_is_help=True, rich_markup_mode=None
)
queue_app = typer.Typer(
    help="Put into and get from named FIFO queues.", no_args_is_help=True, rich_markup_mode=None
)
ns_app = typer.Typer(
    help="Read and set attributes of named namespaces.", no_args_is_help=True, rich_markup_mode=None
)
lock_app = typer.Typer(
    help="Run a command holding a lock; take, release and inspect locks and semaphores.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
value_app = typer.Typer(
    help="Read, set and add to named Values.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(list_app, name="list")
app.add_typer(queue_app, name="queue")
app.add_typer(ns_app, name="ns")
app.add_typer(lock_app, name="lock")
app.add_typer(value_app, name="value")

# The main command's options that take a value, for keep_only(). Checked against the main
# command itself by tests/test_kvctl_fast.py: a valued option missing here stops keep_only()
# from finding the command (it then keeps every command, which is only slower).
_GLOBAL_VALUED: Final = frozenset(
    ["-a", "--address", "--authkey-file", "--timeout", "--tls-ca", "--tls-cert", "--tls-key"]
)


def keep_only(argv: Sequence[str]) -> None:
    """Register with ``app`` only the command ``argv`` calls, when that is sure to be the same.

    typer turns every registered command into a click command on each run, reading every
    signature's annotations: ~20 ms of the ~200 a kvctl call through typer costs, for the
    one command it runs. Help, completion, a mistyped or missing command and anything
    unusual keep the whole app, so their output (command lists, suggestions) is unchanged.
    """
    if os.environ.get("_KVCTL_COMPLETE"):
        return
    i = 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] not in ("-", "--"):
        name = argv[i].partition("=")[0]
        if name in ("-h", "--help", "--version"):
            return
        i += 2 if name in _GLOBAL_VALUED and "=" not in argv[i] else 1
    if i >= len(argv) or "-h" in argv[i:] or "--help" in argv[i:]:
        return
    wanted = argv[i]
    commands = [c for c in app.registered_commands if c.name == wanted]
    groups = [g for g in app.registered_groups if g.name == wanted]
    if len(commands) + len(groups) != 1:
        return
    app.registered_commands, app.registered_groups = commands, groups


# -- values in and out ---------------------------------------------------------------------


def _parse_value(text: str, as_json: bool, hint: str = "'VALUE'") -> Any:
    """Return ``text`` itself, or the JSON value it spells when ``as_json``.

    Raises:
        typer.BadParameter: ``as_json`` and ``text`` is not JSON (exit 2, nothing sent).
    """
    if not as_json:
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(
            f"{_shorten(text)} is not valid JSON ({exc.msg} at column {exc.colno}); "
            "quote a str as '\"text\"', or leave out --json to store the text as is",
            param_hint=hint,
        ) from None


def _stdin_bytes() -> bytes:
    return typer.get_binary_stream("stdin").read()


def _read_value(text: str, as_json: bool, as_bytes: bool, hint: str = "'VALUE'") -> Any:
    """Return the value a VALUE argument stands for: itself, its JSON, its bytes, or stdin's.

    ``-`` reads all of stdin, unchanged (a trailing newline stays, as with ``redis-cli -x``):
    as bytes with ``as_bytes``, else as UTF-8 text, parsed as JSON with ``as_json``.

    Raises:
        typer.BadParameter: --bytes with --json, stdin that is not UTF-8 without --bytes, or
            invalid JSON (exit 2, nothing sent).
    """
    if as_bytes and as_json:
        raise typer.BadParameter("--bytes stores bytes as they are; leave out --json")
    if text != "-":
        # surrogateescape: argv bytes that are not UTF-8 come back as they were typed.
        return (
            text.encode("utf-8", "surrogateescape")
            if as_bytes
            else _parse_value(text, as_json, hint)
        )
    raw = _stdin_bytes()
    if as_bytes:
        return raw
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise typer.BadParameter(
            "stdin is not UTF-8 text; add --bytes to store it as bytes", param_hint=hint
        ) from None
    return _parse_value(decoded, as_json, "stdin")


def _read_values(texts: Sequence[str], as_json: bool, as_bytes: bool) -> list[Any]:
    """Return the values of VALUE arguments, at most one of them ``-`` (stdin)."""
    if list(texts).count("-") > 1:
        raise typer.BadParameter(
            "stdin can be read once: give - at most once", param_hint="'VALUE'"
        )
    return [_read_value(text, as_json, as_bytes) for text in texts]


def _shorten(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _number(text: str) -> float:
    """Parse an int (kept exact) or a finite float for ``incr`` (as the fast path does)."""
    parsed = number(text)
    if parsed is not None:
        return parsed
    try:
        float(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a number") from None
    raise typer.BadParameter(f"{text!r} is not a finite number")


def _seconds(text: str) -> float:
    """Parse a number of seconds, 0 or more."""
    try:
        seconds = float(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(seconds) and seconds >= 0):
        raise typer.BadParameter(f"{text!r} is not a number of seconds, 0 or more")
    return seconds


def _positive_seconds(text: str) -> float:
    seconds = _seconds(text)
    if seconds == 0:
        raise typer.BadParameter("must be more than 0 seconds")
    return seconds


def _ttl_seconds(text: str) -> float:
    try:
        return check_ttl(_seconds(text))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _is_redis(address: str) -> bool:
    """Return whether ``address`` is a Valkey/Redis URL (``redis://``, ``redis-cluster://``...)."""
    return address.strip().partition("://")[0].lower() in REDIS_SCHEMES


def _check_address(value: str) -> str:
    try:
        if _is_redis(value):
            parse_redis_url(value)
        else:
            parse_target(value)
    except AddressError as exc:
        raise typer.BadParameter(str(exc)) from None
    return value


def _blocking(timeout: float | None, no_wait: bool) -> tuple[bool, float | None]:
    """Return ``(block, timeout)`` for a queue call from ``--timeout`` and ``--no-wait``."""
    if no_wait and timeout is not None:
        raise typer.BadParameter(
            "give either --timeout or --no-wait, not both", param_hint="'--no-wait'"
        )
    return (not no_wait, timeout)


# -- settings, session and the one error boundary ------------------------------------------


@dataclass(frozen=True)
class _Settings:
    """Connection options and output mode, from the main command's options."""

    address: str = DEFAULT_ADDRESS
    authkey_file: Path | None = None
    timeout: float = DEFAULT_TIMEOUT
    json: bool = False
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None


_P = TypeVar("_P", bound=kvclient.Proxy)
_KIND_OF: Final[dict[type[kvclient.Proxy], str]] = {
    kvclient.DictProxy: "dict",
    kvclient.ListProxy: "list",
    kvclient.NamespaceProxy: "namespace",
    kvclient.QueueProxy: "queue",
}


class _Session:
    """One command's client (connected on first use) and its output mode."""

    def __init__(self, settings: _Settings, as_json: bool) -> None:
        self.settings = settings
        self.json = settings.json or as_json
        self._client: kvclient.Client | None = None

    @property
    def client(self) -> kvclient.Client:
        """The connected client; connects on first use."""
        if self._client is None and _is_redis(self.settings.address):
            # The same API on Valkey/Redis: the password is the URL's or REDIS_PASSWORD's.
            self._client = kvclient.connect(
                self.settings.address,
                None,
                self.settings.timeout,
                call_timeout=self.settings.timeout,
                ca=self.settings.tls_ca,
                cert=self.settings.tls_cert,
                key=self.settings.tls_key,
            )
        if self._client is None:
            target = _target(self.settings)
            key = load_authkey(authkey_file=self.settings.authkey_file or target.key_file).key
            self._client = kvclient.connect(
                (target.host, target.port),
                key,
                self.settings.timeout,
                call_timeout=self.settings.timeout,
                tls=target.tls,
                ca=self.settings.tls_ca,
                cert=self.settings.tls_cert,
                key=self.settings.tls_key,
            )
        return self._client

    def close(self) -> None:
        """Close the client, if one was opened."""
        if self._client is not None:
            self._client.close()

    def existing(self, name: str, proxy_type: type[_P]) -> _P:
        """Return a proxy to the container ``name``, which must exist with the proxy's kind.

        ``Client.dict(name)`` and friends create what they do not find, which is right for
        writes and wrong for reads; this looks the name up first instead.

        Raises:
            NoSuchContainerError: there is no container called ``name`` (exit 1).
            KindError: ``name`` is a container of another kind (exit 3).
        """
        client = self.client
        kind = _KIND_OF[proxy_type]
        found = client.names().get(name)
        if found is None:
            raise NoSuchContainerError(
                f"no {kind} named {name!r} on {client.endpoint}; kvctl names lists them"
            )
        if found != kind:
            hint = _READ_HINTS.get(found, "kvctl names").format(name=shlex.quote(name))
            raise KindError(f"{name!r} is a {found}, not a {kind}; read it with {hint}")
        return proxy_type(client, name)

    def existing_kind(self, name: str, kinds: Sequence[str]) -> kvclient.Proxy:
        """Return a proxy to the container ``name``, which must exist as one of ``kinds``.

        Raises:
            NoSuchContainerError: there is no container called ``name`` (exit 1).
            KindError: ``name`` is a container of another kind (exit 3).
        """
        client = self.client
        what = kinds[0]
        found = client.names().get(name)
        if found is None:
            raise NoSuchContainerError(
                f"no {what} named {name!r} on {client.endpoint}; kvctl names lists them"
            )
        if found not in kinds:
            hint = _READ_HINTS.get(found, "kvctl names").format(name=shlex.quote(name))
            raise KindError(f"{name!r} is a {found}, not a {what}; read it with {hint}")
        return make_proxy(client, found, name)

    def emit(self, value: Any, text: str | None = None) -> None:
        """Print one result: JSON in JSON mode, else ``text`` or the value as plain text."""
        if self.json:
            typer.echo(to_json(value))
        else:
            typer.echo(plain(value) if text is None else text)

    def emit_each(self, values: Iterable[Any]) -> None:
        """Print a sequence: one JSON array in JSON mode, else one item per line."""
        if self.json:
            typer.echo(to_json(list(values)))
        else:
            for value in values:
                typer.echo(plain(value))


def _target(settings: _Settings) -> Target:
    """Return where ``settings`` point; :func:`main` checked the address already."""
    return parse_target(settings.address)


def _settings(ctx: typer.Context) -> _Settings:
    obj = ctx.find_object(_Settings)
    return obj if obj is not None else _Settings()


def _json_mode(ctx: typer.Context, as_json: bool) -> bool:
    return _settings(ctx).json or as_json


@contextlib.contextmanager
def _session(ctx: typer.Context, as_json: bool = False) -> Iterator[_Session]:
    """Run one command's calls; map every exception to its exit code and stderr line here.

    Usage errors are raised before this is entered, so that nothing is sent when an argument
    is bad; typer prints them and exits 2.
    """
    session = _Session(_settings(ctx), as_json)
    try:
        yield session
    except (typer.Exit, BrokenPipeError):
        raise  # typer's own handling, e.g. a quiet exit when a pipe reader (`| head`) is gone
    except Exception as exc:
        # Everything else, expected or not, is one line: kvclient's errors name the address
        # and the fix, and a traceback could show the authkey among its locals.
        code, line = _error_line(exc)
        typer.echo(line, err=True)
        raise typer.Exit(code) from None
    finally:
        session.close()


# -- the main command: connection options --------------------------------------------------

DictOption = Annotated[
    str, typer.Option("--dict", "-d", metavar="NAME", help="The dict to use.", show_default=True)
]
JsonOption = Annotated[
    bool,
    typer.Option("--json", "-j", help="Parse values as JSON, and print the result as JSON."),
]
JsonOutOption = Annotated[bool, typer.Option("--json", "-j", help="Print the result as JSON.")]
BytesOption = Annotated[
    bool,
    typer.Option(
        "--bytes",
        "-b",
        help="Store VALUE as bytes: stdin's exactly with -, else the argument's UTF-8.",
    ),
]
WaitOption = Annotated[
    float | None,
    typer.Option(
        "--timeout",
        metavar="SECONDS",
        parser=_seconds,
        help="Wait at most this long (default: wait for ever).",
        show_default=False,
    ),
]
NoWaitOption = Annotated[bool, typer.Option("--no-wait", help="Do not wait at all.")]


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"kvctl {kvclient.__version__}")
        raise typer.Exit(EXIT_OK)


@app.callback()
def main(
    ctx: typer.Context,
    address: Annotated[
        str,
        typer.Option(
            "--address",
            "-a",
            metavar="ADDRESS",
            envvar="KV_ADDRESS",
            callback=_check_address,
            help=f"The kvserve server to talk to: {FORMS} (TLS; KEY names the authkey file "
            "~/.config/kvmanager/KEY.key, or is a path); or a Valkey/Redis server or cluster: "
            f"{REDIS_FORMS}.",
        ),
    ] = DEFAULT_ADDRESS,
    authkey_file: Annotated[
        Path | None,
        typer.Option(
            "--authkey-file",
            metavar="PATH",
            # Not envvar=: typer would then let KV_AUTHKEY_FILE win over KV_AUTHKEY, against
            # the order kvclient.auth.load_authkey documents and applies itself.
            help="File holding the authkey. [env var: KV_AUTHKEY_FILE; or the key itself in "
            "KV_AUTHKEY] [default: ~/.config/kvmanager/authkey]",
        ),
    ] = None,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout",
            metavar="SECONDS",
            envvar="KV_TIMEOUT",
            parser=_positive_seconds,
            help="Seconds allowed to connect, and to wait for each reply.",
        ),
    ] = DEFAULT_TIMEOUT,
    as_json: JsonOption = False,
    tls_ca: Annotated[
        Path | None,
        typer.Option(
            "--tls-ca",
            metavar="FILE",
            envvar="KV_TLS_CA",
            help="Use TLS, trusting this CA for the server's certificate.",
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None,
        typer.Option(
            "--tls-cert",
            metavar="FILE",
            envvar="KV_TLS_CERT",
            help="Client certificate, for servers that require one (--tls-ca on kvserve).",
        ),
    ] = None,
    tls_key: Annotated[
        Path | None,
        typer.Option(
            "--tls-key",
            metavar="FILE",
            envvar="KV_TLS_KEY",
            help="The client certificate's key (default: inside --tls-cert).",
        ),
    ] = None,
    version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_show_version, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Read and write a kvserve server's dicts, lists, queues and namespaces from the shell."""
    if _is_redis(address):
        if authkey_file is not None:
            raise typer.BadParameter(
                "an authkey is kvserve's; a Valkey/Redis server takes a password in the URL "
                "(redis://:PASSWORD@host) or in REDIS_PASSWORD",
                param_hint="'--authkey-file'",
            )
    elif authkey_file is not None and parse_target(address).key_file is not None:
        raise typer.BadParameter(
            "the address names an authkey file (KEY@) and --authkey-file names one too; "
            "give one of them",
            param_hint="'--authkey-file'",
        )
    ctx.obj = _Settings(address, authkey_file, timeout, as_json, tls_ca, tls_cert, tls_key)


# -- dict keys -----------------------------------------------------------------------------


Key = Annotated[str, typer.Argument(metavar="KEY", help="The key.")]
Keys = Annotated[list[str], typer.Argument(metavar="KEY", help="The keys.")]
ListName = Annotated[str, typer.Argument(metavar="NAME", help="The list.")]
QueueName = Annotated[str, typer.Argument(metavar="NAME", help="The queue.")]
NsName = Annotated[str, typer.Argument(metavar="NAME", help="The namespace.")]
Value = Annotated[
    str, typer.Argument(metavar="VALUE", help="The value: a str, or JSON with --json.")
]
Values = Annotated[
    list[str], typer.Argument(metavar="VALUE", help="The values: str, or JSON with --json.")
]


@app.command(
    "get",
    epilog=_examples(
        "kvctl get greeting", "kvctl get -d sessions --json 4f2a", "kvctl get --bytes blob > out"
    ),
)
def get(
    ctx: typer.Context,
    key: Key,
    dict_name: DictOption = DEFAULT_DICT,
    as_json: JsonOutOption = False,
    as_bytes: Annotated[
        bool,
        typer.Option(
            "--bytes", "-b", help="Write a bytes (or str) value as it is, with no newline."
        ),
    ] = False,
) -> None:
    """Print the value stored under KEY.

    A str prints as is, anything else as JSON (bytes as base64). Exit 1 if there is no KEY.
    """
    if as_bytes and _json_mode(ctx, as_json):
        raise typer.BadParameter("--bytes writes the value as it is; leave out --json")
    with _session(ctx, as_json) as session:
        mapping = session.existing(dict_name, kvclient.DictProxy)
        try:
            value = mapping[key]
        except KeyError:
            raise _NotFoundError("KeyError", f"no key {key!r} in dict {dict_name!r}") from None
        if not as_bytes:
            session.emit(value)
        elif isinstance(value, bytes | str):
            out = typer.get_binary_stream("stdout")
            out.write(value if isinstance(value, bytes) else value.encode())
            out.flush()
        else:
            raise TypeError(
                f"{key!r} holds a {type(value).__name__}, not bytes or a str; leave out --bytes"
            )


@app.command(
    "set",
    context_settings=_NEGATIVE_OK,
    epilog=_examples(
        "kvctl set greeting hello",
        'kvctl set --json limits \'{"rps": 50, "burst": [1, 2]}\'',
        "kvctl set --json balance -12.5",
        "kvctl set notes - < notes.txt       # stdin, as UTF-8 text",
        "kvctl set --bytes blob - < img.png  # stdin, as bytes (get --bytes > out.png)",
        "kvctl set --json cfg - < cfg.json",
        "kvctl set --ttl 30 --nx lock:backup $HOSTNAME || echo 'held by another'",
    ),
)
def set_(
    ctx: typer.Context,
    key: Key,
    value: Value,
    dict_name: DictOption = DEFAULT_DICT,
    as_json: JsonOption = False,
    as_bytes: BytesOption = False,
    ttl: Annotated[
        float | None,
        typer.Option(
            "--ttl",
            metavar="SECONDS",
            parser=_ttl_seconds,
            help="The key expires (vanishes for every reader) this many seconds from now.",
            show_default=False,
        ),
    ] = None,
    nx: Annotated[
        bool, typer.Option("--nx", help="Only if KEY is absent; exit 1 if it is present.")
    ] = False,
) -> None:
    """Store VALUE under KEY, creating the dict if needed; VALUE - reads stdin.

    stdin is taken whole and unchanged, a trailing newline included. To store the str "-"
    itself, write --json set KEY '"-"'. --nx --ttl together are a lock or a cache fill: the
    first caller wins (exit 0), the others exit 1 until the key expires.
    """
    parsed = _read_value(value, _json_mode(ctx, as_json), as_bytes)
    with _session(ctx, as_json) as session:
        mapping = session.client.dict(dict_name)
        if ttl is None and not nx:
            mapping[key] = parsed
        elif not mapping.set(key, parsed, ttl=ttl, nx=nx):
            raise _NotFoundError("KeyExists", f"key {key!r} is already in dict {dict_name!r}")


@app.command(
    "del",
    epilog=_examples(
        "kvctl del greeting", "kvctl del -d sessions 4f2a 9c1e", "kvctl del --strict a b"
    ),
)
def delete(
    ctx: typer.Context,
    keys: Keys,
    dict_name: DictOption = DEFAULT_DICT,
    strict: Annotated[
        bool, typer.Option("--strict", help="Exit 1 if any KEY did not exist, not only all.")
    ] = False,
    as_json: JsonOutOption = False,
) -> None:
    """Delete the KEYs in one atomic call and print how many existed.

    Exit 1 if none of them existed (with --strict: if any did not); the others are deleted
    all the same.
    """
    with _session(ctx, as_json) as session:
        deleted = session.existing(dict_name, kvclient.DictProxy).delete_many(keys)
        session.emit(deleted)
        wanted = len(set(keys))
        if deleted == 0 or (strict and deleted < wanted):
            if wanted == 1:
                raise _NotFoundError("KeyError", f"no key {keys[0]!r} in dict {dict_name!r}")
            if deleted == 0:
                raise _NotFoundError(
                    "KeyError", f"none of the {wanted} keys were in dict {dict_name!r}"
                )
            raise _NotFoundError(
                "KeyError", f"{wanted - deleted} of {wanted} keys were not in dict {dict_name!r}"
            )


@app.command(
    "watch",
    epilog=_examples(
        "kvctl watch default                    # every change of dict 'default', until Ctrl-C",
        "kvctl watch config --key db --json     # one JSON object a line",
        "kvctl watch workers --prefix w- --since 42",
    ),
)
def watch(
    ctx: typer.Context,
    name: Annotated[
        str, typer.Argument(metavar="NAME", help="The dict, list, namespace or queue.")
    ],
    since: Annotated[
        int | None,
        typer.Option(
            metavar="REV",
            min=0,
            help="Print the changes after this revision first (default: from now).",
            show_default=False,
        ),
    ] = None,
    key: Annotated[
        str | None, typer.Option(metavar="KEY", help="Only changes of KEY.", show_default=False)
    ] = None,
    prefix: Annotated[
        str | None,
        typer.Option(metavar="P", help="Only changes of keys starting with P.", show_default=False),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            metavar="SECONDS",
            parser=_seconds,
            help="Stop (exit 0) when nothing changed this long (default: never).",
            show_default=False,
        ),
    ] = None,
    count: Annotated[
        int | None,
        typer.Option(metavar="N", min=1, help="Stop (exit 0) after N events.", show_default=False),
    ] = None,
    as_json: JsonOutOption = False,
) -> None:
    """Print each change of container NAME as it happens, one a line, until Ctrl-C.

    A line is REVISION OP KEY VALUE (KEY and VALUE as kvctl get prints them; - when there is
    none), or with --json an object {"revision", "op", "key", "value"}. Resume later with
    --since and the last revision printed: nothing is lost or repeated while the server keeps
    that much history (else exit 3 with CompactedError, naming the oldest revision kept).
    Ctrl-C exits 130.
    """
    with _session(ctx, as_json) as session:
        proxy = session.existing_kind(name, ("dict", "list", "namespace", "queue"))
        assert isinstance(
            proxy,
            kvclient.DictProxy | kvclient.ListProxy | kvclient.QueueProxy | kvclient.NamespaceProxy,
        )
        events = proxy.watch(since, key=key, prefix=prefix, timeout=timeout)
        seen = 0
        try:
            for event in events:
                if session.json:
                    typer.echo(to_json(event._asdict()))
                else:
                    shown = ["-" if v is None else plain(v) for v in (event.key, event.value)]
                    typer.echo(f"{event.revision} {event.op} {shown[0]} {shown[1]}")
                seen += 1
                if count is not None and seen >= count:
                    break
        except KeyboardInterrupt:
            raise typer.Exit(EXIT_INTERRUPTED) from None


@app.command("keys", epilog=_examples("kvctl keys", "kvctl keys 'user:*' -d sessions"))
def keys(
    ctx: typer.Context,
    pattern: Annotated[
        str | None, typer.Argument(metavar="GLOB", help="Only keys matching this shell glob.")
    ] = None,
    dict_name: DictOption = DEFAULT_DICT,
    as_json: JsonOutOption = False,
) -> None:
    """Print the keys of the dict, one a line, in insertion order."""
    with _session(ctx, as_json) as session:
        found = session.existing(dict_name, kvclient.DictProxy).keys()
        if pattern is not None:
            # Filtered here: the API has no glob, and the keys snapshot is one round trip
            # either way. Keys that are not str match by how they print.
            found = [key for key in found if fnmatch.fnmatchcase(plain(key), pattern)]
        session.emit_each(found)


@app.command(
    "incr",
    context_settings=_NEGATIVE_OK,
    epilog=_examples("kvctl incr -d hits home", "kvctl incr stock -3", "kvctl incr load 0.25"),
)
def incr(
    ctx: typer.Context,
    key: Annotated[str, typer.Argument(metavar="KEY", help="The key (0 when missing).")],
    by: Annotated[
        float, typer.Argument(metavar="BY", parser=_number, help="The amount to add.")
    ] = 1,
    dict_name: DictOption = DEFAULT_DICT,
    as_json: JsonOption = False,
) -> None:
    """Add BY to the number at KEY atomically, and print the new value."""
    with _session(ctx, as_json) as session:
        session.emit(session.client.dict(dict_name).incr(key, by))


@app.command(
    "cas",
    context_settings=_NEGATIVE_OK,
    epilog=_examples("kvctl cas leader node-a node-b", "kvctl cas --json version 3 4"),
)
def cas(
    ctx: typer.Context,
    key: Key,
    expected: Annotated[
        str, typer.Argument(metavar="EXPECTED", help="The value KEY must hold now.")
    ],
    new: Annotated[str, typer.Argument(metavar="NEW", help="The value to store if it does.")],
    dict_name: DictOption = DEFAULT_DICT,
    as_json: JsonOption = False,
) -> None:
    """Set KEY to NEW only if it holds EXPECTED now (compare-and-swap).

    The comparison is strict about type (with --json, 1 does not match 1.0), and a missing
    key never matches. Exit 1 when nothing was swapped.
    """
    json_mode = _json_mode(ctx, as_json)
    old = _parse_value(expected, json_mode, "'EXPECTED'")
    value = _parse_value(new, json_mode, "'NEW'")
    with _session(ctx, as_json) as session:
        if not session.existing(dict_name, kvclient.DictProxy).cas(key, old, value):
            raise _NotFoundError(
                "CasMismatch",
                f"{key!r} in dict {dict_name!r} is missing or does not hold {to_json(old)}; "
                "nothing was changed",
            )


@app.command("mget", epilog=_examples("kvctl mget host port", "kvctl mget -d sessions 4f2a 9c1e"))
def mget(
    ctx: typer.Context,
    keys: Keys,
    dict_name: DictOption = DEFAULT_DICT,
    as_json: JsonOutOption = False,
) -> None:
    """Print the values of the KEYs as one JSON object, read in one atomic call.

    Missing keys are left out of the object, and make the exit code 1.
    """
    with _session(ctx, as_json) as session:
        found = session.existing(dict_name, kvclient.DictProxy).get_many(keys)
        wanted = list(dict.fromkeys(keys))
        session.emit({key: found[key] for key in wanted if key in found})
        missing = [key for key in wanted if key not in found]
        if missing:
            s = "s" if len(missing) > 1 else ""
            listed = ", ".join(map(repr, missing))
            raise _NotFoundError("KeyError", f"no key{s} {listed} in dict {dict_name!r}")


@app.command(
    "mset",
    epilog=_examples(
        "kvctl mset host db1 port 5432", 'kvctl mset --json port 5432 tags \'["a", "b"]\''
    ),
)
def mset(
    ctx: typer.Context,
    pairs: Annotated[list[str], typer.Argument(metavar="KEY VALUE", help="Keys and values.")],
    dict_name: DictOption = DEFAULT_DICT,
    as_json: JsonOption = False,
) -> None:
    """Store every KEY VALUE pair in one atomic call, creating the dict if needed."""
    if len(pairs) % 2:
        raise typer.BadParameter(
            f"needs KEY VALUE pairs, got {len(pairs)} arguments", param_hint="'KEY VALUE'"
        )
    json_mode = _json_mode(ctx, as_json)
    mapping = {
        key: _parse_value(value, json_mode, f"'VALUE' of {key!r}")
        for key, value in zip(pairs[::2], pairs[1::2], strict=True)
    }
    with _session(ctx, as_json) as session:
        session.client.dict(dict_name).set_many(mapping)


# -- lists ---------------------------------------------------------------------------------


@list_app.command(
    "push",
    epilog=_examples("kvctl list push jobs build test deploy", "kvctl list push --json n 3 -- -2"),
)
def list_push(
    ctx: typer.Context,
    name: ListName,
    values: Values,
    as_json: JsonOption = False,
    as_bytes: BytesOption = False,
) -> None:
    """Append the VALUEs to list NAME in one atomic call, creating it if needed.

    A VALUE - is stdin, whole.
    """
    items = _read_values(values, _json_mode(ctx, as_json), as_bytes)
    with _session(ctx, as_json) as session:
        session.client.list(name).extend(items)


@list_app.command(
    "pop",
    epilog=_examples(
        "kvctl list pop jobs",
        "kvctl list pop jobs --index 0      # the oldest: first in, first out",
    ),
)
def list_pop(
    ctx: typer.Context,
    name: ListName,
    index: Annotated[
        int, typer.Option("--index", "-i", help="The position: -1 is the last, 0 the first.")
    ] = -1,
    as_json: JsonOutOption = False,
) -> None:
    """Remove one item from list NAME and print it (the last, unless --index says).

    Exit 1 if the list is empty or has no item at INDEX.
    """
    with _session(ctx, as_json) as session:
        items = session.existing(name, kvclient.ListProxy)
        try:
            value = items.pop(index)
        except IndexError:
            if index == -1:
                message = f"list {name!r} is empty"
            else:
                message = f"no index {index} in list {name!r}"
            raise _NotFoundError("IndexError", message) from None
        session.emit(value)


@list_app.command(
    "range",
    context_settings=_NEGATIVE_OK,
    epilog=_examples(
        "kvctl list range jobs", "kvctl list range jobs 0 10", "kvctl list range jobs -3"
    ),
)
def list_range(
    ctx: typer.Context,
    name: ListName,
    start: Annotated[
        int, typer.Argument(metavar="START", help="The first index (negative: from the end).")
    ] = 0,
    stop: Annotated[
        int | None,
        typer.Argument(metavar="STOP", help="The index to stop before.  [default: the end]"),
    ] = None,
    as_json: JsonOutOption = False,
) -> None:
    """Print the items of list NAME from START up to STOP, one a line.

    Indexes work as in Python slices: START is included, STOP is not, and negative
    numbers count from the end (list range jobs -3 prints the last three).
    """
    with _session(ctx, as_json) as session:
        session.emit_each(session.existing(name, kvclient.ListProxy)[start:stop])


@list_app.command("len", epilog=_examples("kvctl list len jobs"))
def list_len(ctx: typer.Context, name: ListName, as_json: JsonOutOption = False) -> None:
    """Print the number of items in list NAME."""
    with _session(ctx, as_json) as session:
        session.emit(len(session.existing(name, kvclient.ListProxy)))


# -- queues --------------------------------------------------------------------------------


@queue_app.command(
    "put",
    epilog=_examples(
        "kvctl queue put jobs build test", "kvctl queue put --json jobs '{\"id\": 7}'"
    ),
)
def queue_put(
    ctx: typer.Context,
    name: QueueName,
    values: Values,
    timeout: WaitOption = None,
    no_wait: NoWaitOption = False,
    as_json: JsonOption = False,
    as_bytes: BytesOption = False,
) -> None:
    """Put the VALUEs into queue NAME, in order, creating it (unbounded) if needed.

    A VALUE - is stdin, whole. Only a bounded queue (made from Python) can be full: then put
    waits, and exits 1 if the queue stays full past --timeout, or at once with --no-wait.
    """
    block, wait = _blocking(timeout, no_wait)
    items = _read_values(values, _json_mode(ctx, as_json), as_bytes)
    with _session(ctx, as_json) as session:
        jobs = session.client.queue(name)
        for item in items:
            try:
                jobs.put(item, block=block, timeout=wait)
            except queue.Full:
                how = f" for {wait:g} s" if block and wait is not None else ""
                raise _NotFoundError("queue.Full", f"queue {name!r} stayed full{how}") from None


@queue_app.command(
    "get",
    epilog=_examples(
        "kvctl queue get jobs", "kvctl queue get jobs --timeout 5", "kvctl queue get jobs --no-wait"
    ),
)
def queue_get(
    ctx: typer.Context,
    name: QueueName,
    timeout: WaitOption = None,
    no_wait: NoWaitOption = False,
    as_json: JsonOutOption = False,
) -> None:
    """Take the oldest item from queue NAME and print it, waiting for one if it is empty.

    Waits for ever unless told otherwise; a queue that does not exist yet is created, so a
    consumer may start before its producer. Exit 1 if no item came within --timeout, or at
    once with --no-wait (which creates nothing: a missing queue is an empty one).
    """
    block, wait = _blocking(timeout, no_wait)
    with _session(ctx, as_json) as session:
        if block:
            jobs = session.client.queue(name)
        elif session.client.names().get(name) is None:
            raise _NotFoundError("queue.Empty", f"queue {name!r} is empty")
        else:
            jobs = session.existing(name, kvclient.QueueProxy)
        try:
            item = jobs.get(block=block, timeout=wait)
        except queue.Empty:
            if block:
                message = f"no item came into queue {name!r} within {wait:g} s"
            else:
                message = f"queue {name!r} is empty"
            raise _NotFoundError("queue.Empty", message) from None
        session.emit(item)


@queue_app.command("size", epilog=_examples("kvctl queue size jobs"))
def queue_size(ctx: typer.Context, name: QueueName, as_json: JsonOutOption = False) -> None:
    """Print the number of items waiting in queue NAME."""
    with _session(ctx, as_json) as session:
        session.emit(session.existing(name, kvclient.QueueProxy).qsize())


# -- namespaces ----------------------------------------------------------------------------

Attr = Annotated[str, typer.Argument(metavar="ATTR", help="The attribute.")]


@ns_app.command("get", epilog=_examples("kvctl ns get config mode"))
def ns_get(ctx: typer.Context, name: NsName, attr: Attr, as_json: JsonOutOption = False) -> None:
    """Print attribute ATTR of namespace NAME.

    Exit 1 if the namespace has no such attribute.
    """
    with _session(ctx, as_json) as session:
        # to_dict, not getattr(proxy, attr): attributes of the proxy object itself
        # (incr, to_dict) would shadow the namespace's attributes of the same name.
        attrs = session.existing(name, kvclient.NamespaceProxy).to_dict()
        if attr not in attrs:
            raise _NotFoundError("AttributeError", f"namespace {name!r} has no attribute {attr!r}")
        session.emit(attrs[attr])


@ns_app.command(
    "set",
    context_settings=_NEGATIVE_OK,
    epilog=_examples("kvctl ns set config mode fast", "kvctl ns set --json config workers 8"),
)
def ns_set(
    ctx: typer.Context, name: NsName, attr: Attr, value: Value, as_json: JsonOption = False
) -> None:
    """Set attribute ATTR of namespace NAME to VALUE, creating the namespace if needed."""
    if attr.startswith("_"):
        raise typer.BadParameter(
            "names starting with '_' are never sent to the server (as with a stdlib "
            "Namespace proxy); choose another name",
            param_hint="'ATTR'",
        )
    parsed = _parse_value(value, _json_mode(ctx, as_json))
    with _session(ctx, as_json) as session:
        setattr(session.client.namespace(name), attr, parsed)


@ns_app.command("show", epilog=_examples("kvctl ns show config"))
def ns_show(ctx: typer.Context, name: NsName, as_json: JsonOutOption = False) -> None:
    """Print every attribute of namespace NAME as one JSON object."""
    with _session(ctx, as_json) as session:
        session.emit(session.existing(name, kvclient.NamespaceProxy).to_dict())


# -- locks and values ----------------------------------------------------------------------

LockName = Annotated[
    str, typer.Argument(metavar="NAME", help="The lock, rlock, semaphore or condition.")
]
ValueName = Annotated[str, typer.Argument(metavar="NAME", help="The Value.")]


def _since(held_for: float) -> str:
    """Return the local wall-clock time ``held_for`` seconds ago, to the second."""
    moment = datetime.datetime.now().astimezone() - datetime.timedelta(seconds=held_for)
    return moment.isoformat(sep=" ", timespec="seconds")


@lock_app.command(
    "status", epilog=_examples("kvctl lock status deploy", "kvctl lock status --json deploy")
)
def lock_status(ctx: typer.Context, name: LockName, as_json: JsonOutOption = False) -> None:
    """Print who holds lock NAME, since when, its fencing token, and how many wait.

    Also for rlocks, semaphores (one holder line per client holding slots) and conditions.
    The holder is the owner id a client shows as Client.owner_id. Exit 1 if there is no such
    lock.
    """
    with _session(ctx, as_json) as session:
        proxy = session.existing_kind(name, _LOCK_KINDS)
        assert isinstance(proxy, LockProxy | SemaphoreProxy | ConditionProxy)
        status = proxy.status()
        holders = [{**holder, "since": _since(holder["held_for"])} for holder in status["holders"]]
        result = {"name": name, **status, "holders": holders}
        rows = [["kind", str(status["kind"])], ["locked", "yes" if holders else "no"]]
        for holder in holders:
            tokens = holder["tokens"]
            token = " ".join(map(str, tokens)) if len(tokens) > 1 else str(holder["token"])
            rows += [
                ["holder", str(holder["owner"])],
                ["since", holder["since"]],
                ["token", token],
                ["lease", f"{max(0.0, holder['lease_left']):.1f} s left"],
            ]
            if holder["count"] > 1 and len(tokens) == 1:
                rows.append(["depth", str(holder["count"])])
        if not holders:
            rows.append(["holder", "-"])
        rows += [["last token", str(status["last_token"])], ["waiters", str(status["waiters"])]]
        session.emit(result, _table(rows))


LeaseOption = Annotated[
    float,
    typer.Option(
        "--lease",
        metavar="SECONDS",
        parser=_positive_seconds,
        help="Seconds the hold lasts if kvctl stops renewing it (is killed, stalls, is cut off).",
    ),
]
LockTokenArg = Annotated[
    int, typer.Argument(metavar="TOKEN", help="The fencing token lock acquire printed.")
]


def _acquire_lock(
    session: _Session, name: str, lease: float, timeout: float | None
) -> tuple[LockProxy, int]:
    """Take lock ``name`` for this command's client; return it and its fencing token.

    Raises:
        _NotFoundError: the lock stayed held for ``timeout`` seconds (exit 1).
    """
    lock = session.client.lock(name, lease=lease)
    got = lock.acquire(True, -1 if timeout is None else timeout)
    if got is False:
        raise _NotFoundError("LockTimeoutError", f"lock {name!r} is still held after {timeout:g} s")
    # acquire() returns the token today; the stdlib shape returns True and leaves the token
    # in lock.token. Read it there first, so both work.
    token = getattr(lock, "token", None)
    if token is None or isinstance(token, bool):
        token = got
    if isinstance(token, bool):
        raise RuntimeError(f"acquired lock {name!r} but the client gave no fencing token")
    return lock, int(token)


def _run_child(command: list[str], env: dict[str, str]) -> int:
    """Run ``command`` to its end and return its exit status as a shell reports it.

    SIGTERM and SIGHUP sent to kvctl are passed on to the command, and kvctl waits for it to
    end; SIGINT is ignored while it runs, as a shell does: a terminal sends it to the command
    as well.
    """
    try:
        child = subprocess.Popen(command, env=env)  # noqa: S603 - running CMD is the point
    except FileNotFoundError:
        typer.echo(f"FileNotFoundError: command not found: {command[0]}", err=True)
        return 127
    except OSError as exc:
        typer.echo(f"{type(exc).__name__}: cannot run {command[0]}: {exc.strerror}", err=True)
        return 126

    def forward(signum: int, _frame: object) -> None:
        child.send_signal(signum)

    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, forward),
        signal.SIGHUP: signal.signal(signal.SIGHUP, forward),
        signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
    }
    try:
        status = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 128 - status if status < 0 else status


class LeaseLostError(Exception):
    """The lock ``kvctl lock run`` held expired before the command ended (exit 3)."""


@lock_app.command(
    "run",
    epilog=_examples(
        "kvctl lock run deploy -- ./deploy.sh prod",
        "kvctl lock run nightly --lease 10 --timeout 0 -- make backup   # skip if held",
        "kvctl lock run db-migrate -- sh -c 'migrate --fence \"$KV_FENCING_TOKEN\"'",
    ),
)
def lock_run(
    ctx: typer.Context,
    name: LockName,
    command: Annotated[
        list[str], typer.Argument(metavar="-- CMD [ARGS]...", help="The command to run.")
    ],
    lease: LeaseOption = DEFAULT_LEASE,
    timeout: WaitOption = None,
) -> None:
    """Take lock NAME, run CMD holding it, release it when CMD ends; exit with CMD's status.

    CMD gets the fencing token in env KV_FENCING_TOKEN. kvctl renews the lease every third of
    --lease while CMD runs; if kvctl is killed, the lease runs out and the next holder gets
    the lock (CMD itself is not stopped). Exit status: CMD's (128+N if a signal N ended it);
    1 if the lock stayed held past --timeout; 126/127 if CMD could not run; 3 on a connection
    error, or if the lease ran out while CMD ran (another holder may have run at the same time).
    """
    with _session(ctx) as session:
        lock, token = _acquire_lock(session, name, lease, timeout)
        try:
            status = _run_child(command, {**os.environ, "KV_FENCING_TOKEN": str(token)})
        finally:
            try:
                lock.release()
            except RuntimeError:
                lost = True
            else:
                lost = False
        if lost:
            raise LeaseLostError(
                f"lock {name!r} (token {token}) was lost while the command ran: its lease ran "
                "out; another holder may have run at the same time"
            )
    raise typer.Exit(status)


@lock_app.command(
    "acquire",
    epilog=_examples(
        "kvctl lock acquire deploy --lease 300   # prints the fencing token",
        "token=$(kvctl lock acquire deploy --lease 300) || exit 1",
        'step-one --fence "$token"; step-two --fence "$token"',
        'kvctl lock release deploy "$token"',
    ),
)
def lock_acquire(
    ctx: typer.Context,
    name: LockName,
    lease: LeaseOption = DEFAULT_LEASE,
    timeout: WaitOption = None,
    as_json: JsonOutOption = False,
) -> None:
    """Take lock NAME and print its fencing token; the hold outlives this command.

    Nothing renews the hold once kvctl exits: it lasts --lease seconds (default 30), unless
    lock release ends it first. Waits for ever unless --timeout says; exit 1 if the lock stayed
    held that long.
    """
    with _session(ctx, as_json) as session:
        _, token = _acquire_lock(session, name, lease, timeout)
        session.emit({"name": name, "token": token, "lease": lease}, str(token))


@lock_app.command("release", epilog=_examples('kvctl lock release deploy "$token"'))
def lock_release(
    ctx: typer.Context, name: LockName, token: LockTokenArg, as_json: JsonOutOption = False
) -> None:
    """Release lock NAME held with fencing TOKEN (as lock acquire printed it), from any host.

    Exit 1 if it is not held with that token: released already, or its lease ran out (and
    perhaps another holder has it now).
    """
    with _session(ctx, as_json) as session:
        proxy = session.existing_kind(name, ("lock",))
        assert isinstance(proxy, LockProxy)
        if not proxy.release_token(token):
            raise _NotFoundError(
                "NotHeldError",
                f"lock {name!r} is not held with token {token}: released already, or its "
                f"lease ran out; kvctl lock status {shlex.quote(name)} shows who holds it",
            )
        if session.json:
            session.emit({"name": name, "released": token})


@value_app.command("get", epilog=_examples("kvctl value get hits"))
def value_get(ctx: typer.Context, name: ValueName, as_json: JsonOutOption = False) -> None:
    """Print the Value NAME.

    Exit 1 if there is no such Value.
    """
    with _session(ctx, as_json) as session:
        proxy = session.existing_kind(name, ("value",))
        assert isinstance(proxy, ValueProxy)
        session.emit(proxy.value)


@value_app.command(
    "set",
    context_settings=_NEGATIVE_OK,
    epilog=_examples("kvctl value set hits 0", "kvctl value set ratio 0.5"),
)
def value_set(
    ctx: typer.Context, name: ValueName, value: Value, as_json: JsonOption = False
) -> None:
    """Set the Value NAME to VALUE, creating it if needed.

    VALUE is a number; with --json, any JSON value the Value's typecode can hold ("x" for
    typecode u, true for ?). A new Value takes its type from VALUE: an int makes typecode q, a
    float d. An existing Value keeps its type: an int Value refuses 0.5.
    """
    parsed = _parse_value(value, True) if _json_mode(ctx, as_json) else _number(value)
    with _session(ctx, as_json) as session:
        client = session.client
        if client.names().get(name) == "value":
            ValueProxy(client, name).value = parsed
        elif isinstance(parsed, int | float):
            client.value(name, parsed)
        else:
            raise ValueError(
                f"no Value named {name!r} yet, and a new one takes its type from VALUE, "
                f"which must then be a number or true/false, not {to_json(parsed)}"
            )


@value_app.command(
    "incr",
    context_settings=_NEGATIVE_OK,
    epilog=_examples("kvctl value incr hits", "kvctl value incr stock -3"),
)
def value_incr(
    ctx: typer.Context,
    name: ValueName,
    by: Annotated[
        float, typer.Argument(metavar="BY", parser=_number, help="The amount to add.")
    ] = 1,
    as_json: JsonOutOption = False,
) -> None:
    """Add BY to the Value NAME atomically and print the new value.

    A missing Value is created at 0 (typecode q for an int BY, d for a float one).
    """
    with _session(ctx, as_json) as session:
        client = session.client
        if client.names().get(name) == "value":
            proxy = ValueProxy(client, name)
        else:
            proxy = client.value(name, 0 if isinstance(by, int) else 0.0)
        session.emit(proxy.incr(by))


# -- the server ----------------------------------------------------------------------------


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[col]) for row in rows) for col in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


@app.command("names", epilog=_examples("kvctl names", "kvctl names --json"))
def names(ctx: typer.Context, as_json: JsonOutOption = False) -> None:
    """Print every container with its kind and size, sorted by name.

    The size is the number of keys, items or attributes the container holds.
    """
    with _session(ctx, as_json) as session:
        described = dict(sorted(session.client.describe().items()))
        rows = [["NAME", "KIND", "SIZE"]]
        rows += [[name, str(info["kind"]), str(info["size"])] for name, info in described.items()]
        session.emit(described, _table(rows))


@app.command("drop", epilog=_examples("kvctl drop jobs"))
def drop(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="The container.")],
    as_json: JsonOutOption = False,
) -> None:
    """Delete container NAME, of any kind, and everything in it.

    Exit 1 if there was no such container.
    """
    with _session(ctx, as_json) as session:
        client = session.client
        if not client.drop(name):
            raise NoSuchContainerError(f"no container named {name!r} on {client.endpoint}")


@app.command("ping", epilog=_examples("kvctl ping                         # prints: pong 0.12 ms"))
def ping(ctx: typer.Context, as_json: JsonOutOption = False) -> None:
    """Make one round trip to the server and print how long it took."""
    with _session(ctx, as_json) as session:
        client = session.client  # connected first: the handshake is not part of the round trip
        started = time.perf_counter()
        client.ping()
        ms = (time.perf_counter() - started) * 1000
        session.emit({"rtt_ms": round(ms, 3)}, f"pong {ms:.2f} ms")


@app.command(
    "compact",
    epilog=_examples(
        "kvctl compact                  # start it, return at once",
        "kvctl compact --wait           # prints: compacted in 0.4 s: 64.2 MiB -> 3.1 MiB on disk",
    ),
)
def compact(
    ctx: typer.Context,
    wait: Annotated[
        bool,
        typer.Option("--wait", "-w", help="Wait until it is done and say what it did."),
    ] = False,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout",
            metavar="SECONDS",
            parser=_positive_seconds,
            help="With --wait: give up waiting after this long (exit 3; it goes on).",
        ),
    ] = 600.0,
    as_json: JsonOutOption = False,
) -> None:
    """Compact a --data-dir server's log into a new snapshot, in the background.

    Prints "started", or "running" when a compaction is already under way. With --wait,
    waits for it (or for the one running) to finish and prints how long it took and the
    size of the data files before and after; exit 3 if it failed, with the server's reason.
    """
    with _session(ctx, as_json) as session:
        client = session.client
        before = client.stats().get("persistence") or {}
        began = time.monotonic()
        started = client.compact()
        if not wait:
            session.emit({"started": started}, "started" if started else "running")
            return
        facts = _wait_compaction(client, began + timeout)
        seconds = time.monotonic() - began
        if facts.get("compactions", 0) <= before.get("compactions", 0):
            reason = facts.get("last_error") or "no snapshot was written"
            raise RuntimeError(f"compaction on {client.endpoint} failed: {reason}")
        result = {
            "started": started,
            "seconds": round(seconds, 3),
            "disk_bytes_before": before.get("disk_bytes"),
            "disk_bytes_after": facts.get("disk_bytes"),
            "compactions": facts.get("compactions"),
        }
        text = (
            f"compacted in {seconds:.1f} s: {_size(before.get('disk_bytes'))} -> "
            f"{_size(facts.get('disk_bytes'))} on disk"
        )
        session.emit(result, text)


_COMPACT_POLL: Final = 0.05  # seconds between looks at a compaction under way


def _wait_compaction(client: kvclient.Client, deadline: float) -> dict[str, Any]:
    """Poll ``stats()`` until no compaction runs; return its persistence facts.

    Raises:
        TimeoutError: still compacting at ``deadline`` (monotonic seconds).
    """
    while True:  # bounded by the deadline
        facts: dict[str, Any] = client.stats().get("persistence") or {}
        if not facts.get("compacting"):
            return facts
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"the compaction on {client.endpoint} is still running; it goes on without "
                "kvctl (see kvctl stats)"
            )
        time.sleep(_COMPACT_POLL)


@app.command(
    "slowlog",
    epilog=_examples(
        "kvctl slowlog                  # the slow requests kept, newest first",
        "kvctl slowlog -n 10",
        "kvctl slowlog --json | jq '.[0]'",
    ),
)
def slowlog(
    ctx: typer.Context,
    count: Annotated[
        int | None,
        typer.Option(
            "--count", "-n", min=1, help="The newest N only (default: all kept, up to 128)."
        ),
    ] = None,
    as_json: JsonOutOption = False,
) -> None:
    """Print the server's recent slow requests, newest first: when, kind, operation, container, ms.

    The server keeps them when started with --slow-ms MS: requests that took MS milliseconds
    or more, from arrival to reply, the newest 128. Values are never kept. Exit 1 if the
    server keeps no slow-request log.
    """
    with _session(ctx, as_json) as session:
        client = session.client
        found: dict[str, Any] = client.call(None, None, "slowlog", [] if count is None else [count])
        if found.get("slow_ms") is None:
            raise _NotFoundError(
                "NotEnabled",
                f"kvserve at {client.endpoint} keeps no slow-request log; start it with "
                "--slow-ms MS",
            )
        entries = found.get("entries", [])
        rows = [["TIME", "KIND", "OP", "CONTAINER", "MS"]]
        for entry in entries:
            at = datetime.datetime.fromtimestamp(entry["at"]).strftime("%Y-%m-%d %H:%M:%S.%f")
            name = "-" if entry.get("name") is None else str(entry["name"])
            rows.append([at[:-3], entry["kind"], entry["op"], name, f"{entry['ms']:.3f}"])
        summary = (
            f"{len(entries)} shown of {found.get('total', 0)} requests over "
            f"{found['slow_ms']:g} ms since start"
        )
        session.emit(entries, f"{_table(rows)}\n{summary}" if entries else summary)


FormatOption = Annotated[
    str,
    typer.Option(
        "--format",
        "-f",
        metavar="FORMAT",
        help="msgpack (exact, compact) or json (for people; tagged where JSON lacks a type).",
    ),
]


def _check_format(value: str) -> str:
    if value not in ("msgpack", "json"):
        raise typer.BadParameter("must be msgpack or json", param_hint="--format")
    return value


@app.command(
    "dump",
    epilog=_examples(
        "kvctl dump -o backup.msgpack",
        "kvctl dump > backup.msgpack",
        "kvctl dump --format json | jq '.containers[][0]'",
    ),
)
def dump(
    ctx: typer.Context,
    fmt: FormatOption = "msgpack",
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            metavar="FILE",
            help="Write to FILE, atomically: it appears, complete, only once the dump succeeded "
            "(a shell redirection leaves an empty file behind when it fails).",
        ),
    ] = None,
) -> None:
    """Write a consistent copy of every container to stdout or FILE (see restore).

    Read from the server in pieces, so the size is unlimited and other clients are served
    meanwhile; written as it arrives. A progress bar is shown on a terminal (stderr), and a
    summary line is printed to stderr at the end.
    """
    _check_format(fmt)
    # A file that cannot be written is the user's error (exit 2), found before connecting.
    tmp = None if output is None else output.with_name(f".{output.name}.tmp-{os.getpid()}")
    try:
        fh = typer.get_binary_stream("stdout") if tmp is None else open(tmp, "wb")  # noqa: SIM115
    except OSError as exc:
        raise typer.BadParameter(f"cannot write {output}: {exc.strerror or exc}") from None
    started = time.monotonic()
    out = _CountingWriter(fh)
    progress = _Progress("dump")
    failed: OSError | None = None
    try:
        with _session(ctx) as session:
            try:
                read = session.client.dump_stream(functools.partial(_dump_sink, fmt, out, progress))
                if fmt == "json":
                    out.write(b"]}\n")
                out.flush(sync=tmp is not None)
            except _OutputError as exc:
                failed = exc.error
            finally:
                progress.close()
        if failed is not None:
            raise typer.BadParameter(
                f"cannot write {output or 'stdout'}: {failed.strerror or failed}"
            )
        if tmp is not None and output is not None:
            fh.close()
            try:
                os.replace(tmp, output)
            except OSError as exc:
                raise typer.BadParameter(f"cannot write {output}: {exc.strerror or exc}") from None
    finally:
        if tmp is not None:
            fh.close()
            tmp.unlink(missing_ok=True)
    typer.echo(
        f"dumped {read['containers']} containers, {read['items']} items "
        f"({_size(out.written)}) in {time.monotonic() - started:.1f} s"
        + ("" if output is None else f" to {output}"),
        err=True,
    )


class _OutputError(Exception):
    """Writing the dump failed (carries the OSError): a usage error, not the server's."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


class _CountingWriter:
    """A binary output that counts what it wrote and turns OSError into _OutputError."""

    def __init__(self, fh: Any) -> None:
        self._fh = fh
        self.written = 0

    def write(self, data: bytes) -> int:
        try:
            self._fh.write(data)
        except OSError as exc:
            raise _OutputError(exc) from None
        self.written += len(data)
        return len(data)

    def flush(self, *, sync: bool = False) -> None:
        try:
            self._fh.flush()
            if sync:
                os.fsync(self._fh.fileno())
        except OSError as exc:
            raise _OutputError(exc) from None


class _Progress:
    """A progress bar on stderr when it is a terminal, redrawn at most ten times a second."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.total = 0
        self.done = 0
        self._shown = 0.0
        stderr = typer.get_text_stream("stderr")
        self._out = stderr if stderr.isatty() else None

    def advance(self, items: int) -> None:
        self.done += items
        now = time.monotonic()
        if self._out is None or now - self._shown < 0.1:
            return
        self._shown = now
        share = min(1.0, self.done / self.total) if self.total else 1.0
        bar = "#" * int(share * 30)
        self._out.write(f"\r{self.label} [{bar:<30}] {share:4.0%} {self.done}/{self.total} items")
        self._out.flush()

    def close(self) -> None:
        if self._out is not None and self._shown:
            self._out.write("\r\033[K")
            self._out.flush()


def _dump_sink(
    fmt: str, out: _CountingWriter, progress: _Progress, header: dict[str, Any]
) -> Callable[[list[Any]], None]:
    """Return what writes each record of a dump as ``fmt`` (see kvclient._dumps)."""
    progress.total = int(header.get("items", 0))
    if fmt == "msgpack":
        writer = MsgpackDumpWriter(out.write, Codec(to_ref=to_ref).pack, header)

        def record(rec: list[Any]) -> None:
            writer(rec)
            progress.advance(1 if rec[4] is None else len(rec[2]))

        return record
    # JSON: the same document as json.dumps of the whole dump, one container at a time (a
    # container's keys decide its tagging, so each is assembled whole first).
    out.write(f'{{"format": {json.dumps(header["format"])}, "containers": ['.encode())
    collect = Collector()
    count = [0]

    def emit() -> None:
        entry = collect.containers.pop()
        text = json.dumps(_to_tagged_json(entry), ensure_ascii=False)
        out.write(((", " if count[0] else "") + text).encode())
        count[0] += 1

    def json_record(rec: list[Any]) -> None:
        if rec[3] == 0 and collect.containers:
            emit()
        collect(rec)
        progress.advance(1 if rec[4] is None else len(rec[2]))
        done = rec[4] is None or len(collect.containers[-1][2]) >= rec[4]
        if done:
            emit()

    return json_record


@app.command(
    "restore",
    epilog=_examples("kvctl restore < backup.msgpack", "kvctl restore --format json < backup.json"),
)
def restore(
    ctx: typer.Context, fmt: FormatOption = "msgpack", as_json: JsonOutOption = False
) -> None:
    """Load a dump from stdin into an empty server; print how many containers it made.

    Sent in pieces, so the size is unlimited and other clients are served meanwhile; the
    containers appear as their pieces arrive, and a restore that fails half-way leaves what
    it restored (drop it and restore again). Progress bar and summary line on stderr.
    """
    _check_format(fmt)
    started = time.monotonic()
    raw = typer.get_binary_stream("stdin").read()
    try:
        data = _from_tagged_json(json.loads(raw)) if fmt == "json" else Codec().unpack(raw)
    except (ValueError, kvclient.ProtocolError) as exc:
        raise typer.BadParameter(f"stdin is not a {fmt} dump ({exc})") from None
    progress = _Progress("restore")
    containers = data.get("containers") if isinstance(data, dict) else None
    if isinstance(containers, list):
        progress.total = sum(
            len(e[2]) if isinstance(e, list) and len(e) == 3 and e[1] in PARTED_KINDS else 1
            for e in containers
        )
    with _session(ctx, as_json) as session:
        pack = Codec(to_ref=to_ref, encode_depth=STORED_DEPTH).pack
        try:
            count = run_sync(session.client, restore_flow(data, pack, progress.advance))
        finally:
            progress.close()
        typer.echo(
            f"restored {count} containers, {progress.done} items ({_size(len(raw))}) in "
            f"{time.monotonic() - started:.1f} s",
            err=True,
        )
        session.emit({"containers": count}, str(count))


def _to_tagged_json(value: Any) -> Any:
    """Turn a dump into JSON, tagging what JSON cannot say: bytes, tuples, refs, odd keys."""
    if isinstance(value, kvclient.Proxy):
        return {"$ref": [value._kind, value._name]}
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode()}
    if isinstance(value, tuple):
        return {"$tuple": [_to_tagged_json(v) for v in value]}
    if isinstance(value, list):
        return [_to_tagged_json(v) for v in value]
    if isinstance(value, dict):
        if all(type(k) is str and not k.startswith("$") for k in value):
            return {k: _to_tagged_json(v) for k, v in value.items()}
        return {"$dict": [[_to_tagged_json(k), _to_tagged_json(v)] for k, v in value.items()]}
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**53:
        return {"$int": str(value)}
    return value


def _from_tagged_json(value: Any) -> Any:
    """Undo :func:`_to_tagged_json`."""
    if isinstance(value, list):
        return [_from_tagged_json(v) for v in value]
    if isinstance(value, dict):
        if len(value) == 1:
            ((tag, inner),) = value.items()
            if tag == "$ref":
                return Ref(str(inner[0]), str(inner[1]))
            if tag == "$bytes":
                return base64.b64decode(inner)
            if tag == "$tuple":
                return tuple(_from_tagged_json(v) for v in inner)
            if tag == "$dict":
                return {_from_tagged_json(k): _from_tagged_json(v) for k, v in inner}
            if tag == "$int":
                return int(inner)
        return {k: _from_tagged_json(v) for k, v in value.items()}
    return value


_STATS_ORDER: Final = ("version", "uptime", "clients", "containers", "keys", "ops")


_STATS_BUSIEST: Final = 5  # operations named on the requests_by_op line


def _stats_cell(key: str, value: Any) -> str:
    """Return how ``kvctl stats`` shows one fact (``--json`` shows them as they are)."""
    if key == "uptime" and isinstance(value, int | float):
        return f"{value:.1f} s"
    if key == "memory" and isinstance(value, dict):
        return (
            f"{_size(value.get('rss_bytes'))} resident, peak {_size(value.get('peak_rss_bytes'))}"
        )
    if key == "requests_by_op":
        if not isinstance(value, dict):
            return "- (counted when kvserve runs with --metrics-port or --slow-ms)"
        busiest = sorted(value.items(), key=lambda item: -item[1].get("count", 0))
        text = ", ".join(f"{name} {op.get('count')}" for name, op in busiest[:_STATS_BUSIEST])
        more = len(busiest) - _STATS_BUSIEST
        return text + (f", and {more} more (--json)" if more > 0 else "")
    return plain(value)


@app.command("stats", epilog=_examples("kvctl stats", "kvctl stats --json | jq .requests_by_op"))
def stats(ctx: typer.Context, as_json: JsonOutOption = False) -> None:
    """Print server facts, one a line.

    version, uptime (seconds), clients (connected now), containers, keys (items held in all
    containers), ops (operations served since start, each call of a batch counted), requests
    (a batch is one), memory (the server's resident size), requests_by_op (counts and seconds
    by kind and operation, when kvserve runs with --metrics-port or --slow-ms; the busiest
    shown here, all with --json), and persistence (with --data-dir: disk bytes, compactions,
    fsyncs and their seconds).
    """
    with _session(ctx, as_json) as session:
        facts = session.client.stats()
        order: list[str] = [key for key in _STATS_ORDER if key in facts]
        order += [key for key in facts if key not in _STATS_ORDER]
        rows = [[key, _stats_cell(key, facts[key])] for key in order]
        session.emit({key: facts[key] for key in order}, _table(rows))


_TOP_HEADER: Final = (
    "clients",
    "containers",
    "keys",
    "ops/s",
    "requests/s",
    "memory",
    "log",
    "fsync-ms",
    "compactions",
    "busiest",
)
_TOP_EVERY: Final = 20  # rows between repeated headers, as redis-cli --stat does
_TOP_BUSIEST: Final = 3  # operations named in the last column of a line
_CLEAR: Final = "\x1b[H\x1b[2J"  # cursor home, clear the screen: a terminal only


def _size(nbytes: Any) -> str:
    if not isinstance(nbytes, int):
        return "-"
    if nbytes < 1024:
        return f"{nbytes} B"
    size, unit = nbytes / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{size:.1f} {unit}"


@dataclass(frozen=True)
class _Rates:
    """What changed between two ``stats()`` replies, per second of the interval between them.

    Attributes:
        ops: operations per second (each call of a batch counted).
        requests: requests per second (a batch is one).
        by_op: ``(kind.op, requests per second, mean ms)``, busiest first (mean None when
            none came); None when the server does not count requests by operation.
        fsyncs: fdatasyncs of the log per second.
        fsync_ms: their mean duration, ms; None when there was none (or no --data-dir).
    """

    ops: float
    requests: float
    by_op: list[tuple[str, float, float | None]] | None
    fsyncs: float
    fsync_ms: float | None


def _rates(before: dict[str, Any], after: dict[str, Any], seconds: float) -> _Rates:
    """Return the rates between two ``stats()`` replies taken ``seconds`` apart."""
    seconds = max(seconds, 1e-9)

    def per_s(key: str, old: dict[str, Any] | None, new: dict[str, Any] | None) -> float:
        return float((new or {}).get(key, 0) - (old or {}).get(key, 0)) / seconds

    by_op: list[tuple[str, float, float | None]] | None = None
    new_ops, old_ops = after.get("requests_by_op"), before.get("requests_by_op") or {}
    if isinstance(new_ops, dict):
        by_op = []
        for name, now in new_ops.items():
            then = old_ops.get(name) or {}
            count = now.get("count", 0) - then.get("count", 0)
            spent = now.get("seconds", 0.0) - then.get("seconds", 0.0)
            by_op.append((name, count / seconds, spent * 1000 / count if count else None))
        by_op.sort(key=lambda row: (-row[1], row[0]))
    old_disk, new_disk = before.get("persistence"), after.get("persistence")
    syncs = (new_disk or {}).get("fsyncs", 0) - (old_disk or {}).get("fsyncs", 0)
    spent = (new_disk or {}).get("fsync_seconds", 0.0) - (old_disk or {}).get("fsync_seconds", 0.0)
    return _Rates(
        ops=per_s("ops", before, after),
        requests=per_s("requests", before, after),
        by_op=by_op,
        fsyncs=syncs / seconds,
        fsync_ms=spent * 1000 / syncs if syncs > 0 else None,
    )


def _top_json(facts: dict[str, Any], rates: _Rates) -> str:
    by_op = None if rates.by_op is None else {name: round(r, 1) for name, r, _ in rates.by_op}
    return to_json(
        {
            **facts,
            "ops_per_s": round(rates.ops, 1),
            "requests_per_s": round(rates.requests, 1),
            "requests_per_s_by_op": by_op,
            "fsync_ms": None if rates.fsync_ms is None else round(rates.fsync_ms, 3),
        }
    )


def _top_row(facts: dict[str, Any], rates: _Rates) -> list[str]:
    """Return one line's cells: no cell holds a space, so ``awk`` and ``cut`` can split it."""
    persistence = facts.get("persistence") or {}
    memory = facts.get("memory") or {}
    if rates.by_op is None:
        busiest = "-"
    else:
        top = [f"{name}={r:.0f}" for name, r, _ in rates.by_op[:_TOP_BUSIEST] if r > 0]
        busiest = ",".join(top) or "-"
    return [
        str(facts.get("clients", "-")),
        str(facts.get("containers", "-")),
        str(facts.get("keys", "-")),
        f"{rates.ops:.0f}",
        f"{rates.requests:.0f}",
        _size(memory.get("rss_bytes")).replace(" ", ""),
        _size(persistence.get("disk_bytes")).replace(" ", ""),
        "-" if rates.fsync_ms is None else f"{rates.fsync_ms:.2f}",
        str(persistence.get("compactions", "-")),
        busiest,
    ]


def _uptime(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    minutes, _ = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return f"{days}d {hours:02d}h {minutes:02d}m" if days else f"{hours}h {minutes:02d}m"


def _top_screen(
    endpoint: str, facts: dict[str, Any], rates: _Rates, interval: float, height: int
) -> str:
    """Return one refresh of the terminal view: totals, then requests by operation."""
    persistence = facts.get("persistence")
    memory = facts.get("memory") or {}
    lines = [
        f"kvserve {facts.get('version', '?')} at {endpoint}, up {_uptime(facts.get('uptime'))}"
        f"; every {interval:g} s, Ctrl-C ends",
        f"clients {facts.get('clients', '-')}   containers {facts.get('containers', '-')}   "
        f"keys {facts.get('keys', '-')}   memory {_size(memory.get('rss_bytes'))} "
        f"(peak {_size(memory.get('peak_rss_bytes'))})",
        f"ops/s {rates.ops:.0f}   requests/s {rates.requests:.0f}",
    ]
    if persistence:
        fsync = "-" if rates.fsync_ms is None else f"{rates.fsync_ms:.2f} ms mean"
        lines.append(
            f"log {_size(persistence.get('disk_bytes'))}   compactions "
            f"{persistence.get('compactions', '-')}   fsyncs/s {rates.fsyncs:.1f}   fsync {fsync}"
        )
    else:
        lines.append("log -   (no --data-dir: nothing on disk, no fsyncs)")
    lines.append("")
    if rates.by_op is None:
        lines.append(
            "requests by operation: not counted; start kvserve with --metrics-port or --slow-ms"
        )
    else:
        rows = [["REQUESTS/S", "MEAN MS", "KIND.OP"]]
        room = max(height - len(lines) - 2, 1)
        for name, per_s, mean_ms in rates.by_op[:room]:
            if per_s <= 0:
                break
            rate = f"{per_s:.0f}" if per_s >= 10 else f"{per_s:.1f}"
            rows.append([rate, "-" if mean_ms is None else f"{mean_ms:.3f}", name])
        lines.append(_table(rows) if len(rows) > 1 else "no requests in the last interval")
    return "\n".join(lines)


@app.command(
    "top",
    epilog=_examples(
        "kvctl top                          # refreshes in a terminal until Ctrl-C",
        "kvctl top --interval 5 --count 12  # a minute, every 5 s",
        "kvctl top | tee load.log           # piped: a line per interval",
        "kvctl top --json | jq .requests_per_s_by_op",
    ),
)
def top(
    ctx: typer.Context,
    interval: Annotated[
        float,
        typer.Option(
            "--interval",
            "-i",
            metavar="SECONDS",
            parser=_positive_seconds,
            help="Seconds between refreshes.",
        ),
    ] = 1.0,
    count: Annotated[
        int | None,
        typer.Option("--count", "-n", min=1, help="Stop after this many (default: never)."),
    ] = None,
    lines_only: Annotated[
        bool,
        typer.Option("--lines", "-l", help="A line per interval in a terminal too."),
    ] = False,
    as_json: JsonOutOption = False,
) -> None:
    """Show the server's load every INTERVAL seconds, like redis-cli --stat.

    In a terminal, a view refreshed in place: clients, containers, keys, memory (the
    server's resident size), operations and requests per second, for a --data-dir server
    its size on disk, compactions and fsync latency (mean over the interval), and requests
    per second by operation with their mean latency (counted when kvserve runs with
    --metrics-port or --slow-ms). Piped, or with --lines, one line per interval without
    escape codes, cells without spaces (busiest: the three busiest operations); with --json,
    one JSON object a line: the stats plus ops_per_s, requests_per_s, requests_per_s_by_op
    and fsync_ms. Rates include these refreshes' own stats calls. Ctrl-C ends it (exit 0).
    """
    with _session(ctx, as_json) as session:
        client = session.client
        out = typer.get_text_stream("stdout")
        screen = not (session.json or lines_only) and out.isatty()
        widths = [max(len(h), 10) for h in _TOP_HEADER[:-1]]
        before, then = client.stats(), time.monotonic()
        shown = 0
        try:
            while count is None or shown < count:
                time.sleep(interval)
                facts, now = client.stats(), time.monotonic()
                seconds = now - then
                if facts.get("uptime", 0) < before.get("uptime", 0):
                    # The server restarted (the client reconnected): its counts are since
                    # then, uptime seconds ago, not since the last refresh.
                    before = {}
                    seconds = min(seconds, max(float(facts.get("uptime", 0)), 1e-3))
                rates = _rates(before, facts, seconds)
                if session.json:
                    typer.echo(_top_json(facts, rates))
                elif screen:
                    height = shutil.get_terminal_size().lines
                    view = _top_screen(client.endpoint, facts, rates, interval, height)
                    out.write(_CLEAR + view + "\n")
                    out.flush()
                else:
                    rows = [_top_row(facts, rates)]
                    if shown % _TOP_EVERY == 0:
                        rows.insert(0, list(_TOP_HEADER))
                    for row in rows:
                        cells = [c.ljust(w) for c, w in zip(row, widths, strict=False)]
                        typer.echo("  ".join([*cells, row[-1]]).rstrip())
                before, then = facts, now
                shown += 1
        except KeyboardInterrupt:
            pass
