"""``kvserve``: run a kvmanager server from the command line.

It prints exactly one line to stdout, ``kvserve listening on HOST:PORT``, once it accepts
connections (scripts and tests read the port from it); everything else goes to stderr.

Exit status: 0 after SIGTERM or Ctrl-C; 1 when the server stopped on its own because it could
not go on safely (the log could not be written or fsynced, e.g. a full disk), with the reason on
stderr, so a supervisor's ``Restart=on-failure`` restarts it; 2 on a usage error; 3 when it
could not start (authkey, TLS, data directory unusable, damaged or locked, address in use).
"""

from __future__ import annotations

import gc
import ipaddress
import logging
import math
import signal
from pathlib import Path
from types import FrameType
from typing import Annotated, NoReturn

import typer

from kvproto._version import __version__
from kvproto.address import AddressError, parse_host_port
from kvproto.authkey import check_server_key, load_authkey
from kvproto.errors import KVError
from kvproto.net import format_address
from kvproto.tls import server_context
from kvproto.wire import MAX_FRAME_DEFAULT
from kvserve._logging import FORMATS
from kvserve._logging import setup as setup_logging
from kvserve.history import DEFAULT_HISTORY_AGE, DEFAULT_HISTORY_COUNT, MAX_HISTORY_COUNT
from kvserve.manager import KVManager
from kvserve.persistence import PROGRESS_EVERY, Persistence

__all__ = ["app", "main"]

app = typer.Typer(
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode=None,  # plain help: rich boxes cut long option names at 80 columns
    pretty_exceptions_enable=False,  # a traceback with locals could show the authkey
)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"kvserve {__version__}")
        raise typer.Exit()


_EPILOG = (
    # \b: click prints the next paragraph as typed instead of rewrapping it.
    "Examples:\n\n\b\n"
    "  kvserve --port 50000                  # this host only (127.0.0.1)\n"
    "  kvserve --host 0.0.0.0 --port 50000   # other hosts too: copy the authkey file to them\n"
    "  kvserve --data-dir /var/lib/kvserve   # keep every container across restarts\n"
    "  kvserve --host 0.0.0.0 --tls-cert server.pem --tls-key server.key --tls-ca ca.pem\n"
    "  kvserve --metrics-port 9464 --slow-ms 10   # Prometheus on 127.0.0.1:9464/metrics\n"
    "  kvserve --log-format json                 # one JSON object per log line\n\n"
    "The authkey comes from --authkey-file, else env KV_AUTHKEY, else "
    "~/.config/kvmanager/authkey, which the first start creates (32 random bytes, mode 0600)."
)


@app.command(epilog=_EPILOG)
def serve(
    version: Annotated[
        bool,
        typer.Option("--version", is_eager=True, callback=_show_version, help="Print the version."),
    ] = False,
    host: Annotated[
        str, typer.Option(help="Address to bind. Use 0.0.0.0 or :: to accept other hosts.")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(help="TCP port; 0 picks a free one.", min=0, max=65535)
    ] = 50000,
    authkey_file: Annotated[
        Path | None, typer.Option(help="File holding the authkey (never pass the key itself).")
    ] = None,
    log_level: Annotated[
        str, typer.Option(help="debug, info, warning or error.", case_sensitive=False)
    ] = "info",
    max_frame: Annotated[
        int, typer.Option(help="Largest request accepted, in bytes.", min=1024)
    ] = MAX_FRAME_DEFAULT,
    handshake_timeout: Annotated[
        float, typer.Option(help="Seconds a new connection has to authenticate.", min=0.1)
    ] = 5.0,
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Keep every container in this directory across restarts."),
    ] = None,
    fsync: Annotated[
        str,
        typer.Option(
            help="With --data-dir: 'always' (acknowledge after fsync), 'everysec' (lose at most "
            "~1 s on power failure, nothing on a crash), or 'no' (the OS decides)."
        ),
    ] = "everysec",
    compact_at: Annotated[
        int, typer.Option(help="Log size in bytes that triggers background compaction.", min=1)
    ] = 64 * 1024 * 1024,
    shutdown_timeout: Annotated[
        float,
        typer.Option(help="Seconds to finish sending replies after SIGTERM.", min=0),
    ] = 5.0,
    tls_cert: Annotated[
        Path | None, typer.Option(help="Serve TLS only, with this PEM certificate (chain).")
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option(help="The certificate's private key (default: in --tls-cert).")
    ] = None,
    tls_ca: Annotated[
        Path | None,
        typer.Option(help="Mutual TLS: clients must present a certificate signed by this CA."),
    ] = None,
    readonly_authkey_file: Annotated[
        Path | None,
        typer.Option(help="A second key: its clients can read everything and change nothing."),
    ] = None,
    max_connections: Annotated[
        int,
        typer.Option(
            help="Authenticated connections beyond this are refused at once (read-only ones may "
            "take half).",
            min=1,
        ),
    ] = 1024,
    max_pending: Annotated[
        int,
        typer.Option(
            help="Connections still authenticating, at most; the oldest silent one is closed to "
            "admit a new one.",
            min=1,
        ),
    ] = 64,
    idle_timeout: Annotated[
        float | None,
        typer.Option(
            help="Close connections that sent no complete request this many seconds "
            "(default: never).",
            min=1,
        ),
    ] = None,
    repair: Annotated[
        bool,
        typer.Option(help="Start despite damaged data files, keeping what precedes the damage."),
    ] = False,
    progress_interval: Annotated[
        float,
        typer.Option(
            metavar="SECONDS",
            help="With --data-dir: seconds between the progress lines logged while start-up "
            "loads the data (0: only what it loads and the totals).",
            min=0,
        ),
    ] = PROGRESS_EVERY,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            metavar="PORT",
            help="Serve Prometheus metrics on http://127.0.0.1:PORT/metrics (default: off).",
            min=0,
            max=65535,
            show_default=False,
        ),
    ] = None,
    metrics: Annotated[
        str | None,
        typer.Option(
            "--metrics",
            metavar="HOST:PORT",
            help="Serve them on this address instead, e.g. 0.0.0.0:9464 for a remote "
            "Prometheus (no authkey protects it; it shows no names, keys or values).",
            show_default=False,
        ),
    ] = None,
    slow_ms: Annotated[
        float | None,
        typer.Option(
            help="Log requests taking this many milliseconds or more (kind, operation, "
            "container, duration; never values) and keep the last 128 for `kvctl slowlog` "
            "(default: off).",
            metavar="MS",
            min=0,
            show_default=False,
        ),
    ] = None,
    busy_poll_us: Annotated[
        int,
        typer.Option(
            metavar="US",
            help="After serving, poll the sockets for up to US microseconds before sleeping "
            "(default 0: off). Pays with one or a few clients that call back to back while "
            "server and client run on different CPUs (each request then skips waking a "
            "sleeping server: 1.5x the GETs/s measured on a 2-vCPU VM); costs up to US "
            "of CPU per request when the next one does not come in time. Adaptive: polls "
            "that find nothing twice in a row back off (skipped for up to 64 turns), so an "
            "idle server sleeps and a client pausing between calls costs little. Try 50 "
            "(100-200 on a busy machine, where clients take longer to come back).",
            min=0,
            max=10_000,
        ),
    ] = 0,
    watch_history: Annotated[
        int,
        typer.Option(
            metavar="N",
            help="Changes each container keeps for `watch --since` (a watcher further behind "
            "gets CompactedError).",
            min=0,
            max=MAX_HISTORY_COUNT,
        ),
    ] = DEFAULT_HISTORY_COUNT,
    watch_history_age: Annotated[
        float,
        typer.Option(
            metavar="SECONDS", help="...and for at most this long.", min=1, max=366 * 86400
        ),
    ] = DEFAULT_HISTORY_AGE,
    log_format: Annotated[
        str,
        typer.Option(
            metavar="text|json",
            help="text (for people) or json (one object a line, for log pipelines).",
        ),
    ] = "text",
) -> None:
    """Serve named, lock-guarded dicts, lists, Namespaces and Queues until Ctrl-C or SIGTERM.

    Prints one line to stdout, `kvserve listening on HOST:PORT`, then logs to stderr.
    """
    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        raise typer.BadParameter(f"unknown log level {log_level!r}", param_hint="--log-level")
    if log_format not in FORMATS:
        raise typer.BadParameter("must be text or json", param_hint="--log-format")
    setup_logging(level, log_format)
    log = logging.getLogger("kvserve")
    metrics_address = _metrics_address(metrics_port, metrics)
    if not math.isfinite(progress_interval):
        raise typer.BadParameter(
            "must be a finite number of seconds", param_hint="--progress-interval"
        )
    if fsync not in ("always", "everysec", "no"):
        raise typer.BadParameter("must be always, everysec or no", param_hint="--fsync")
    if (tls_key is not None or tls_ca is not None) and tls_cert is None:
        raise typer.BadParameter("--tls-key and --tls-ca need --tls-cert", param_hint="--tls-cert")
    try:
        source = load_authkey(authkey_file=authkey_file, create=True)
        check_server_key(source)
        readonly_key = None
        if readonly_authkey_file is not None:
            readonly = load_authkey(authkey_file=readonly_authkey_file)
            check_server_key(readonly)
            readonly_key = readonly.key
        tls = server_context(tls_cert, tls_key, tls_ca) if tls_cert is not None else None
        persistence = None
        if data_dir is not None:
            persistence = Persistence(
                data_dir,
                fsync,  # type: ignore[arg-type]
                compact_at,
                repair=repair,
                progress_every=progress_interval,
            )
        manager = KVManager(
            (host, port),
            authkey=source.key,
            max_frame=max_frame,
            handshake_timeout=handshake_timeout,
            persistence=persistence,
            shutdown_timeout=shutdown_timeout,
            tls=tls,
            readonly_authkey=readonly_key,
            max_connections=max_connections,
            max_pending=max_pending,
            idle_timeout=idle_timeout,
            metrics=metrics_address,
            slow_ms=slow_ms,
            busy_poll=busy_poll_us / 1e6,
            history=(watch_history, watch_history_age),
        )
        server = manager.get_server()
    except KVError as exc:
        _fail(exc)  # a PersistenceError names the data directory and the file
    except OSError as exc:
        # Persistence translates its own OSErrors, so what is left is binding the address.
        _fail(f"cannot listen on {host}:{port} ({exc.strerror or exc})")

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        server.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if tls is None and not _is_loopback(server.address[0]):
        log.warning(
            "listening on %s without TLS: traffic, values included, is readable by anyone on "
            "the network; use --tls-cert/--tls-key (and --tls-ca for client certificates)",
            server.endpoint,
        )
    elif tls is not None:
        log.info("TLS on%s", " with client certificates required" if tls_ca else "")
    if server.metrics_address is not None:
        log.info("metrics on %s", server.metrics_endpoint)
        if not _is_loopback(server.metrics_address[0]):
            log.warning(
                "metrics on %s are readable by anyone who can reach it (no authkey; they show "
                "counts and sizes, never names or values)",
                format_address(*server.metrics_address),
            )
    if slow_ms is not None:
        log.info("logging requests of %g ms or more (kvctl slowlog shows the last 128)", slow_ms)
    if source.created:
        log.info("created a new authkey in %s (mode 0600); copy it to client hosts", source.origin)
    report = server.load_report
    if report is None:
        log.info(
            "authkey from %s; data is in memory only (use --data-dir to keep it)", source.origin
        )
    else:
        # Persistence logged what it loaded and the totals, as it loaded them.
        log.info("authkey from %s; data in %s (fsync %s)", source.origin, data_dir, fsync)
    # What start-up made (modules, typer, the data loaded from --data-dir) lives as long as
    # the server: collect its garbage once now, then freeze the rest out of the collector's
    # generations, so no collection while serving walks it again (a full one walked 1M
    # loaded dict values in ~0.5 s, in the middle of some request; bench/tail.py).
    gc.collect()
    gc.freeze()
    print(f"kvserve listening on {server.endpoint}", flush=True)
    server.serve_forever()
    reason = server.fatal_error or (persistence.failed if persistence is not None else None)
    if reason is not None:
        # Exit 0 here would tell systemd (Restart=on-failure) that stopping was intended.
        typer.echo(
            f"kvserve: fatal: {reason}; stopped (no write missing from the log was acknowledged)",
            err=True,
        )
        raise typer.Exit(1)
    log.info("stopped")


def _metrics_address(port: int | None, address: str | None) -> tuple[str, int] | None:
    """Return where to serve metrics from ``--metrics-port``/``--metrics``, None: nowhere."""
    if port is not None and address is not None:
        raise typer.BadParameter(
            "give --metrics-port PORT or --metrics HOST:PORT, not both", param_hint="--metrics"
        )
    if port is not None:
        return ("127.0.0.1", port)
    if address is None:
        return None
    text = address.strip()
    if text.isdigit():
        text = ":" + text  # a bare port: loopback, as with --metrics-port
    port_text = text.rpartition(":")[2]
    if ":" not in text or not (port_text.isascii() and port_text.isdigit()) or text.endswith("]"):
        raise typer.BadParameter(
            f"{address!r} is not HOST:PORT (e.g. 127.0.0.1:9464, 0.0.0.0:9464, [::1]:9464)",
            param_hint="--metrics",
        )
    try:
        return parse_host_port(text)
    except AddressError as exc:
        raise typer.BadParameter(str(exc), param_hint="--metrics") from None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _fail(error: object) -> NoReturn:
    name = type(error).__name__ if isinstance(error, BaseException) else "Error"
    typer.echo(f"kvserve: {name}: {error}", err=True)
    raise typer.Exit(3)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
