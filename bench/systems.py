"""The systems under test: how to start each server fresh, and how a client drives it.

Every server is its own process on 127.0.0.1 and a port the kernel picked, started from
scratch by :func:`start_server` and stopped by :meth:`Server.stop`. Clients never run in the
benchmark's own process: :mod:`bench.worker` builds a :class:`Driver` in each client process
and asks it for one zero-argument callable per case (:meth:`Driver.op`), which the timed loop
calls over and over. Each callable does exactly what a user of that system would write.
"""

from __future__ import annotations

import contextlib
import os
import queue
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

import msgpack

__all__ = [
    "ALL_SYSTEMS",
    "DEFAULT_SYSTEMS",
    "DURABLE_SYSTEMS",
    "INTERPRETERS",
    "MYPYC",
    "SYSTEM_LABELS",
    "Driver",
    "Endpoint",
    "Server",
    "SkipSystemError",
    "make_driver",
    "python_for",
    "start_server",
    "value_for",
]

DURABLE_SYSTEMS: Final = {
    "kvserve-no": "no",
    "kvserve-everysec": "everysec",
    "kvserve-always": "always",
}
"""kvserve with ``--data-dir`` (in the server's scratch directory) and this ``--fsync`` policy."""
MYPYC: Final = "kvserve-mypyc"
"""kvserve from the venv of a compiled build (``KVMANAGER_MYPYC=1 pip install .``): started, and
its :mod:`bench.cpu` client processes run, with the interpreter :data:`INTERPRETERS` names."""
INTERPRETERS: dict[str, str] = {}
"""System -> the Python that runs its server (and bench.cpu's clients), when not this one:
set by ``bench.targets --mypyc-python``. The worker pool's clients stay this interpreter's."""
ALL_SYSTEMS: Final = (
    "kvserve",
    MYPYC,
    *DURABLE_SYSTEMS,
    "stdlib",
    "raw",
    "raw-thread",
    "redis",
    "redis-py",
)
DEFAULT_SYSTEMS: Final = ("kvserve", "stdlib", "raw", "redis")
SYSTEM_LABELS: Final = {
    "kvserve": "kvserve + kvclient",
    MYPYC: "kvserve compiled (mypyc); pinned clients compiled, pooled clients this tree's",
    **{name: f"kvserve --data-dir --fsync {policy}" for name, policy in DURABLE_SYSTEMS.items()},
    "stdlib": "stdlib BaseManager + registered dict",
    "raw": "raw-socket floor (epoll, 1 thread)",
    "raw-thread": "raw-socket floor (thread/conn)",
    "redis": "Redis + redis-py + hiredis",
    "redis-py": "Redis + redis-py (pure-Python parser)",
}
QUEUE_TIMEOUT: Final = 0.5
"""Seconds a consumer's blocking get waits before giving up (only at the end of a phase)."""

_START_TIMEOUT: Final = 20.0
STR_VALUE: Final = "v" * 100
DICT_VALUE: Final[dict[str, Any]] = {"a": 1, "b": [1, 2, 3]}
MIB_VALUE: Final = b"\xa5" * (1024 * 1024)


class SkipSystemError(Exception):
    """A system cannot run on this machine; the message says why."""


def value_for(i: int) -> str:
    """Return the distinct 100-character str value stored under key number ``i``."""
    return f"{i:08d}{STR_VALUE[8:]}"


@dataclass(frozen=True)
class Endpoint:
    """Where a client finds a server: system name, address and (for kvserve/stdlib) key."""

    system: str
    host: str
    port: int
    authkey: str = ""


@dataclass
class Server:
    """A running server process started by :func:`start_server`."""

    endpoint: Endpoint
    proc: subprocess.Popen[bytes]
    workdir: Path
    log: IO[bytes]
    version: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        """The server's process id (CPU and RSS are read from it)."""
        return self.proc.pid

    def alive(self) -> bool:
        """Return whether the process is still running."""
        return self.proc.poll() is None

    def stop(self) -> None:
        """Terminate the process (SIGTERM, then SIGKILL after 5 s) and remove its files."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def stderr_tail(self, limit: int = 2000) -> str:
        """Return the end of the server's stderr, for error messages."""
        try:
            return (self.workdir / "stderr.log").read_text(errors="replace")[-limit:]
        except OSError:
            return ""


def _free_port() -> int:
    # redis-server cannot be told port 0 and report back, so borrow one from the kernel. The
    # tiny race (another process taking it before redis binds) fails loudly, never silently.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _clean_env(workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KV_", "BENCH_"))}
    env["HOME"] = str(workdir / "home")
    (workdir / "home").mkdir()
    return env


def _read_listening_line(proc: subprocess.Popen[bytes], prefix: str, workdir: Path) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline().decode(errors="replace")
    if not line.startswith(prefix):
        proc.kill()
        proc.wait(5)
        err = (workdir / "stderr.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"server did not start: stdout {line!r}, stderr {err!r}")
    return line.removeprefix(prefix).strip()


def _split_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def start_server(
    system: str,
    path: Sequence[str] = (),
    wrapper: Sequence[str] = (),
    env_extra: Mapping[str, str] | None = None,
    server_args: Sequence[str] = (),
) -> Server:
    """Start a fresh server for ``system`` and wait until it accepts connections.

    Args:
        system: one of :data:`ALL_SYSTEMS`.
        path: directories put first on the server's ``PYTHONPATH``, before this tree's; for
            example another tree's ``server`` and ``client`` directories, to run its kvserve
            beside this one's (default: none, the installed kvserve).
        wrapper: a command the Python server runs under (``valgrind --tool=callgrind ...``,
            for :mod:`bench.instructions`); not for redis-server.
        env_extra: variables added to the server's environment (``PYTHONHASHSEED``).
        server_args: more kvserve command-line options (``--busy-poll-us 50``).

    Raises:
        SkipSystemError: the system is not installed here (redis-server, redis-py).
        RuntimeError: the server did not come up within 20 s.
    """
    if system.startswith("redis"):
        return _start_redis(system)
    if system == MYPYC and system not in INTERPRETERS:
        raise SkipSystemError(f"{MYPYC}: no interpreter of a compiled build given - skipped")
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{system}-"))
    env = _clean_env(workdir)
    log = (workdir / "stderr.log").open("wb")
    key = secrets.token_hex(16)
    if system in ("kvserve", MYPYC) or system in DURABLE_SYSTEMS:
        env["KV_AUTHKEY"] = key
        argv = [python_for(system), "-m", "kvserve", "--port", "0", "--log-level", "warning"]
        if system in DURABLE_SYSTEMS:
            # In the scratch directory, so stop() removes it; tempfile's directory is /tmp
            # unless TMPDIR says otherwise (the report names its filesystem).
            argv += ["--data-dir", str(workdir / "data"), "--fsync", DURABLE_SYSTEMS[system]]
        argv += server_args
        prefix = "kvserve listening on "
    elif system == "stdlib":
        env["BENCH_AUTHKEY"] = key
        argv = [sys.executable, "-m", "bench.stdlib_server"]
        prefix = "stdlib listening on "
    elif system in ("raw", "raw-thread"):
        mode = "epoll" if system == "raw" else "thread"
        argv = [sys.executable, "-m", "bench.floor", "--mode", mode]
        prefix = "floor listening on "
        key = ""
    else:
        raise ValueError(f"unknown system {system!r}; known: {', '.join(ALL_SYSTEMS)}")
    # bench.* must be importable by the server whatever the caller's cwd.
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (*path, str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH")) if p
    )
    env.update(env_extra or {})
    proc = subprocess.Popen(
        [*wrapper, *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=log,
        env=env,
        cwd=workdir,
    )
    try:
        host, port = _split_address(_read_listening_line(proc, prefix, workdir))
    except BaseException:
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return Server(Endpoint(system, host, port, key), proc, workdir, log)


def python_for(system: str) -> str:
    """Return the interpreter that runs ``system``'s server: :data:`INTERPRETERS`' or this one."""
    return INTERPRETERS.get(system, sys.executable)


def _start_redis(system: str) -> Server:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SkipSystemError(
            "redis-server is not installed (apt-get install redis-server) - skipped"
        )
    try:
        import redis
    except ImportError:
        raise SkipSystemError(
            "redis-py is not installed (pip install -e '.[bench]') - skipped"
        ) from None
    if system == "redis":
        import redis.utils

        if not redis.utils.HIREDIS_AVAILABLE:
            raise SkipSystemError("hiredis is not installed (pip install -e '.[bench]') - skipped")
    version = subprocess.run(
        [exe, "--version"], capture_output=True, text=True, check=False, timeout=10
    ).stdout.strip()
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{system}-"))
    log = (workdir / "stderr.log").open("wb")
    port = _free_port()
    argv = [
        exe,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
        "--daemonize",
        "no",
        "--logfile",
        "",
    ]
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=workdir
    )
    server = Server(Endpoint(system, "127.0.0.1", port), proc, workdir, log, version)
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1.0)
    deadline = time.monotonic() + _START_TIMEOUT
    try:
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"redis-server did not start on port {port}: {server.stderr_tail()}"
                    ) from None
                time.sleep(0.02)
    except BaseException:
        server.stop()
        raise
    finally:
        client.close()
    return server


# -- client side ---------------------------------------------------------------------------

Op = Callable[[], object]


class Driver:
    """A connected client of one system; :meth:`op` returns what the timed loop calls.

    Args:
        endpoint: the server to drive.
        binary: values are bytes or msgpack-encoded (Redis is then used without decoding).
    """

    def __init__(self, endpoint: Endpoint, binary: bool = False) -> None:
        self.endpoint = endpoint
        self.binary = binary

    def op(self, kind: str, prefix: str, index: int, value: Any, batch: int) -> Op:
        """Prepare (store what a GET reads) and return the callable for one case.

        Args:
            kind: ``get``, ``set``, ``incr``, ``mget``, ``mset``, ``put`` or ``qget``.
            prefix: unique to the phase, so phases never see each other's keys.
            index: this client's number (0-based); each client uses its own keys.
            value: the value stored or expected.
            batch: keys per round trip for ``mget``/``mset``.
        """
        raise NotImplementedError

    def fill(self, start: int, stop: int, batch: int) -> None:
        """Store keys ``key:%08d`` -> :func:`value_for` for ``start <= i < stop``."""
        raise NotImplementedError

    def close(self) -> None:
        """Close the connection(s)."""


def _fill_batches(start: int, stop: int, batch: int) -> list[dict[str, str]]:
    return [
        {f"key:{i:08d}": value_for(i) for i in range(lo, min(lo + batch, stop))}
        for lo in range(start, stop, batch)
    ]


def _check(got: Any, expected: Any, what: str) -> None:
    if got != expected:
        raise AssertionError(f"{what}: read back {str(got)[:80]!r}, expected {expected!r:.80}")


class KVServeDriver(Driver):
    """kvclient: ``kv.dict("bench")`` and ``kv.queue(name)``."""

    def __init__(self, endpoint: Endpoint, binary: bool = False) -> None:
        super().__init__(endpoint, binary)
        import kvclient

        self.kv = kvclient.connect((endpoint.host, endpoint.port), endpoint.authkey.encode())

    def op(self, kind: str, prefix: str, index: int, value: Any, batch: int) -> Op:
        d = self.kv.dict("bench")
        key = f"{prefix}:{index}"
        if kind == "get":
            d[key] = value
            _check(d[key], value, "kvserve get")
            return lambda: d[key]
        if kind == "set":
            return lambda: d.__setitem__(key, value)
        if kind == "incr":
            hot = f"{prefix}:hot"
            return lambda: d.incr(hot)
        keys = [f"{prefix}:{index}:{j}" for j in range(batch)]
        if kind == "mget":
            d.set_many(dict.fromkeys(keys, value))
            _check(d.get_many(keys), dict.fromkeys(keys, value), "kvserve get_many")
            return lambda: d.get_many(keys)
        if kind == "mset":
            mapping = dict.fromkeys(keys, value)
            return lambda: d.set_many(mapping)
        q = self.kv.queue(f"{prefix}:q")
        if kind == "put":
            return lambda: q.put(value)
        if kind == "qget":

            def qget() -> object:
                try:
                    return q.get(timeout=QUEUE_TIMEOUT)
                except queue.Empty:
                    return None

            return qget
        raise ValueError(kind)

    def fill(self, start: int, stop: int, batch: int) -> None:
        d = self.kv.dict("bench")
        for mapping in _fill_batches(start, stop, batch):
            d.set_many(mapping)
        _check(d[f"key:{stop - 1:08d}"], value_for(stop - 1), "kvserve fill")

    def close(self) -> None:
        self.kv.close()


class StdlibDriver(Driver):
    """stdlib ``BaseManager.connect()``, ``get_dict()`` proxy, ``get_queue(name)`` proxy."""

    def __init__(self, endpoint: Endpoint, binary: bool = False) -> None:
        super().__init__(endpoint, binary)
        from bench.stdlib_server import connect

        self.manager = connect((endpoint.host, endpoint.port), endpoint.authkey.encode())
        self.proxies: list[Any] = []

    def op(self, kind: str, prefix: str, index: int, value: Any, batch: int) -> Op:
        d: Any = self.manager.get_dict()  # type: ignore[attr-defined]
        self.proxies.append(d)
        key = f"{prefix}:{index}"
        if kind == "get":
            d[key] = value
            _check(d[key], value, "stdlib get")
            return lambda: d[key]
        if kind == "set":
            return lambda: d.__setitem__(key, value)
        if kind == "incr":
            hot = f"{prefix}:hot"
            return lambda: d.incr(hot)
        keys = [f"{prefix}:{index}:{j}" for j in range(batch)]
        if kind == "mget":
            d.set_many(dict.fromkeys(keys, value))
            _check(d.get_many(keys), dict.fromkeys(keys, value), "stdlib get_many")
            return lambda: d.get_many(keys)
        if kind == "mset":
            mapping = dict.fromkeys(keys, value)
            return lambda: d.set_many(mapping)
        q: Any = self.manager.get_queue(f"{prefix}:q")  # type: ignore[attr-defined]
        self.proxies.append(q)
        if kind == "put":
            return lambda: q.put(value)
        if kind == "qget":

            def qget() -> object:
                try:
                    return q.get(timeout=QUEUE_TIMEOUT)
                except queue.Empty:
                    return None

            return qget
        raise ValueError(kind)

    def fill(self, start: int, stop: int, batch: int) -> None:
        d: Any = self.manager.get_dict()  # type: ignore[attr-defined]
        self.proxies.append(d)
        for mapping in _fill_batches(start, stop, batch):
            d.update(mapping)
        _check(d[f"key:{stop - 1:08d}"], value_for(stop - 1), "stdlib fill")

    def close(self) -> None:
        # Close the proxies' per-thread connections now, so a server thread does not linger
        # for each finished phase.
        for proxy in self.proxies:
            tls = getattr(proxy, "_tls", None)
            conn = getattr(tls, "connection", None)
            if tls is not None and conn is not None:
                with contextlib.suppress(OSError):
                    conn.close()
                del tls.connection
        self.proxies.clear()


class RawDriver(Driver):
    """:class:`bench.floor.FloorClient`: one msgpack frame out, one back."""

    def __init__(self, endpoint: Endpoint, binary: bool = False) -> None:
        super().__init__(endpoint, binary)
        from bench.floor import FloorClient

        self.client = FloorClient((endpoint.host, endpoint.port))

    def op(self, kind: str, prefix: str, index: int, value: Any, batch: int) -> Op:
        call = self.client.call
        key = f"{prefix}:{index}"
        if kind == "get":
            call(["set", key, value])
            _check(call(["get", key]), value, "raw get")
            return lambda: call(["get", key])
        if kind == "set":
            return lambda: call(["set", key, value])
        if kind == "incr":
            hot = f"{prefix}:hot"
            return lambda: call(["incr", hot])
        keys = [f"{prefix}:{index}:{j}" for j in range(batch)]
        if kind == "mget":
            call(["mset", dict.fromkeys(keys, value)])
            _check(call(["mget", keys]), [value] * batch, "raw mget")
            return lambda: call(["mget", keys])
        if kind == "mset":
            mapping = dict.fromkeys(keys, value)
            return lambda: call(["mset", mapping])
        name = f"{prefix}:q"
        if kind == "put":
            return lambda: call(["put", name, value])
        if kind == "qget":
            return lambda: call(["qget", name, QUEUE_TIMEOUT])
        raise ValueError(kind)

    def fill(self, start: int, stop: int, batch: int) -> None:
        for mapping in _fill_batches(start, stop, batch):
            self.client.call(["mset", mapping])
        _check(self.client.call(["get", f"key:{stop - 1:08d}"]), value_for(stop - 1), "raw fill")

    def close(self) -> None:
        self.client.close()


class RedisDriver(Driver):
    """redis-py (with hiredis for ``redis``, the pure-Python parser for ``redis-py``).

    str values are read back as str (``decode_responses=True``, what a user storing text
    writes); dict values are msgpack-encoded by the client; bytes stay bytes.
    """

    def __init__(self, endpoint: Endpoint, binary: bool = False) -> None:
        super().__init__(endpoint, binary)
        import redis

        kwargs: dict[str, Any] = {}
        if endpoint.system == "redis-py":
            from redis._parsers import _RESP3Parser

            kwargs["parser_class"] = _RESP3Parser
            kwargs["protocol"] = 3
        self.r = redis.Redis(
            host=endpoint.host,
            port=endpoint.port,
            decode_responses=not binary,
            socket_connect_timeout=10.0,
            **kwargs,
        )
        self.r.ping()

    def op(self, kind: str, prefix: str, index: int, value: Any, batch: int) -> Op:
        r = self.r
        key = f"{prefix}:{index}"
        packb, unpackb = msgpack.packb, msgpack.unpackb
        encode = isinstance(value, dict)
        if kind == "get":
            if encode:
                r.set(key, packb(value))
                _check(unpackb(r.get(key)), value, "redis get")
                return lambda: unpackb(r.get(key))
            r.set(key, value)
            _check(r.get(key), value, "redis get")
            return lambda: r.get(key)
        if kind == "set":
            if encode:
                return lambda: r.set(key, packb(value))
            return lambda: r.set(key, value)
        if kind == "incr":
            hot = f"{prefix}:hot"
            return lambda: r.incr(hot)
        keys = [f"{prefix}:{index}:{j}" for j in range(batch)]
        if kind == "mget":
            r.mset(dict.fromkeys(keys, value))

            def pipeline_get() -> object:
                pipe = r.pipeline(transaction=False)
                for k in keys:
                    pipe.get(k)
                return pipe.execute()

            _check(pipeline_get(), [value] * batch, "redis pipeline get")
            return pipeline_get
        if kind == "mset":

            def pipeline_set() -> object:
                pipe = r.pipeline(transaction=False)
                for k in keys:
                    pipe.set(k, value)
                return pipe.execute()

            return pipeline_set
        name = f"{prefix}:q"
        if kind == "put":
            return lambda: r.lpush(name, value)
        if kind == "qget":
            return lambda: r.brpop([name], timeout=QUEUE_TIMEOUT)
        raise ValueError(kind)

    def fill(self, start: int, stop: int, batch: int) -> None:
        for mapping in _fill_batches(start, stop, batch):
            self.r.mset(mapping)
        _check(self.r.get(f"key:{stop - 1:08d}"), value_for(stop - 1), "redis fill")

    def close(self) -> None:
        self.r.close()


_DRIVERS: Final[dict[str, type[Driver]]] = {
    "kvserve": KVServeDriver,
    MYPYC: KVServeDriver,
    **dict.fromkeys(DURABLE_SYSTEMS, KVServeDriver),
    "stdlib": StdlibDriver,
    "raw": RawDriver,
    "raw-thread": RawDriver,
    "redis": RedisDriver,
    "redis-py": RedisDriver,
}


def make_driver(endpoint: Endpoint, binary: bool = False) -> Driver:
    """Connect to ``endpoint`` with the client its system is used with."""
    return _DRIVERS[endpoint.system](endpoint, binary)
