"""Fixtures: real kvserve servers on port 0 (in a thread, or as a subprocess) and clients.

`kv` is parametrized over the implementations in `tests/backends.py`: every test that takes
`kv` and no kvserve-only fixture runs once per implementation and is marked `conformance`.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import kvclient
from kvserve import KVManager, Server
from tests import backends, redis_cluster
from tests.aio_adapter import FRONT_ENDS, Connect
from tests.backends import Implementation

pytest_plugins = ["pytester"]


def pytest_addoption(parser: pytest.Parser) -> None:
    known = ", ".join(impl.id for impl in backends.IMPLEMENTATIONS)
    parser.addoption(
        "--backend",
        action="append",
        default=[],
        metavar="NAME",
        help=f"run the conformance tests against only this implementation (repeatable): {known}",
    )


def _selected(config: pytest.Config) -> list[Implementation]:
    registry = backends.by_id()
    names: list[str] = config.getoption("backend")
    unknown = sorted(set(names) - registry.keys())
    if unknown:
        raise pytest.UsageError(
            f"--backend {', '.join(unknown)}: unknown; known: {', '.join(registry)}"
        )
    return [impl for impl in registry.values() if not names or impl.id in names]


def pytest_configure(config: pytest.Config) -> None:
    # Registered here, beside the hook that applies it, rather than in pyproject.toml.
    config.addinivalue_line(
        "markers",
        "conformance: runs once per implementation in tests/backends.py; set automatically"
        " on every test that takes `kv` and no kvserve-only fixture",
    )
    _selected(config)  # an unknown --backend is a usage error before anything is collected


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    closure = set(metafunc.fixturenames)
    if "implementation" not in closure or closure & backends.KVSERVE_ONLY_FIXTURES:
        return
    ids = [impl.id for impl in _selected(metafunc.config)]
    metafunc.parametrize("implementation", ids, indirect=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    registry = backends.by_id()
    for item in items:
        callspec = getattr(item, "callspec", None)
        impl_id = callspec.params.get("implementation") if callspec is not None else None
        if impl_id is None:
            continue
        impl = registry[impl_id]
        item.add_marker(pytest.mark.conformance)
        reason = impl.difference(item.nodeid)
        if reason is not None:
            item.add_marker(pytest.mark.xfail(strict=True, reason=f"{impl.id}: {reason}"))


@pytest.fixture
def authkey() -> bytes:
    return secrets.token_hex(16).encode()


@pytest.fixture
def server(authkey: bytes) -> Iterator[Server]:
    """A real server in a thread of this process (fast to start)."""
    srv = KVManager(("127.0.0.1", 0), authkey=authkey).get_server()
    thread = threading.Thread(target=srv.serve_forever, name="kvserve", daemon=True)
    thread.start()
    yield srv
    srv.stop()
    assert srv.wait_stopped(10), "server loop did not stop"
    thread.join(10)


@pytest.fixture
def address(server: Server) -> str:
    return server.endpoint


@pytest.fixture(params=sorted(FRONT_ENDS))
def connect(request: pytest.FixtureRequest) -> Connect:
    """``connect(address, authkey, **options)`` of each front end in turn (sync, asyncio).

    For tests of connecting itself (TLS, keys, errors, retries) against servers they start:
    the same scenario through both clients, expecting the same errors.
    """
    return FRONT_ENDS[request.param]


@pytest.fixture
def implementation(request: pytest.FixtureRequest) -> Implementation:
    """The implementation `kv` talks to: each one in turn for a conformance test, else kvserve."""
    impl = backends.by_id()[getattr(request, "param", backends.DEFAULT_ID)]
    outcome = backends.unavailable_outcome(impl)
    if outcome is not None:
        verdict, message = outcome
        if verdict == "fail":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return impl


@pytest.fixture
def kv(
    request: pytest.FixtureRequest, implementation: Implementation, authkey: bytes
) -> Iterator[kvclient.Client]:
    """A client of `implementation`, on a store of its own; closed after the test."""
    target = implementation.start(request)
    with implementation.connect(target, authkey) as client:
        yield client


# -- Valkey/Redis: one cluster and one standalone server per session, flushed per test ---------


@pytest.fixture(scope="session")
def redis_cluster_session() -> Iterator[redis_cluster.Cluster]:
    """A real 3-master / 3-replica redis-server cluster (tests/redis_cluster.py)."""
    with redis_cluster.running_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis_standalone_session() -> Iterator[redis_cluster.Standalone]:
    """A real standalone redis-server."""
    server = redis_cluster.Standalone().start()
    yield server
    server.stop()


def _flush(cli_nodes: list[redis_cluster.Node]) -> None:
    for node in cli_nodes:
        if "role:master" in node.cli("info", "replication"):
            node.cli("flushall")


@pytest.fixture
def redis_cluster_url(redis_cluster_session: redis_cluster.Cluster) -> str:
    """The session's cluster, emptied for this test: its ``redis-cluster://`` address."""
    _flush(redis_cluster_session.nodes)
    return "redis-cluster://" + ",".join(redis_cluster_session.seeds[:3])


@pytest.fixture
def redis_standalone_url(redis_standalone_session: redis_cluster.Standalone) -> str:
    """The session's standalone server, emptied for this test: its ``redis://`` address."""
    assert redis_standalone_session.node is not None
    _flush([redis_standalone_session.node])
    return redis_standalone_session.url


# -- More clients of `kv`'s implementation, here or in worker processes (tests/targets.py) ----
from tests.targets import ClientFactory, Target  # noqa: E402  (kept in this one block)


@pytest.fixture
def kv_target(
    request: pytest.FixtureRequest, implementation: Implementation, authkey: bytes
) -> Target:
    """Where `kv`'s implementation and store are reached: give it to worker processes.

    `start` reaches what it starts through `request.getfixturevalue`, cached for the test, so
    this is the store `kv` uses (tests/test_conformance_meta.py checks it).
    """
    return Target(implementation.id, implementation.start(request), authkey)


@pytest.fixture
def kv_factory(kv_target: Target) -> Iterator[ClientFactory]:
    """`kv_factory()` opens another client of `kv`'s store (another owner); closed after."""
    with ClientFactory(kv_target) as factory:
        yield factory


@pytest.fixture
def kv2(kv_factory: ClientFactory) -> kvclient.Client:
    """A second client of `kv`'s implementation and store: another owner."""
    return kv_factory()


@dataclass
class ServerProcess:
    proc: subprocess.Popen[str]
    address: str
    authkey: bytes
    env: dict[str, str]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(10)
        finally:
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    stream.close()


def start_kvserve(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    """Start `python -m kvserve --port 0 ...`; the caller reads the listening line."""
    return subprocess.Popen(
        [sys.executable, "-m", "kvserve", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def read_listening_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("kvserve listening on "):
        proc.kill()
        err = proc.stderr.read() if proc.stderr else ""
        raise AssertionError(f"kvserve did not start: {line!r} {err}")
    return line.removeprefix("kvserve listening on ").strip()


@pytest.fixture
def clean_env(tmp_path: Path) -> dict[str, str]:
    """An environment with a private HOME and no KV_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KV_")}
    env["HOME"] = str(tmp_path / "home")
    return env


@pytest.fixture
def kvserve_proc(clean_env: dict[str, str], authkey: bytes) -> Iterator[ServerProcess]:
    """A real `kvserve` subprocess on port 0, authkey passed by environment."""
    env = dict(clean_env, KV_AUTHKEY=authkey.decode())
    proc = start_kvserve(env)
    sp = ServerProcess(proc, read_listening_line(proc), authkey, env)
    yield sp
    sp.stop()
