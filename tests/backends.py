"""The implementations the conformance suite runs against, and their documented differences.

Every test that takes the `kv` fixture, and nothing kvserve-specific (`server`, `address`,
`kvserve_proc`), is a conformance test: `tests/conftest.py` runs it once per implementation
below (`test_x[kvserve-sync]`) and marks it `conformance`. A behaviour is specified once, in
that test; an implementation either passes it or carries an entry in its
`expected_differences`, which becomes `xfail(strict=True)` for that implementation only, so a
difference that silently goes away fails the run and the entry has to be removed.

Adding a backend or front end is one `Implementation` in `IMPLEMENTATIONS` plus what it needs
to start (a fixture in `tests/conftest.py`, reached from `start` by `request.getfixturevalue`,
so that tests on other implementations never start it).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import pytest

import kvclient

# Fixtures that only a kvserve provides. A test asking for one of them (itself or through one
# of its fixtures) is about kvserve, not about the behaviour every implementation shares, and
# keeps running once, against kvserve, unparametrized. `kv` reaches its server through
# `Implementation.start` (a dynamic request), never statically, so asking for `kv` alone does
# not put these names in a test's fixture closure.
KVSERVE_ONLY_FIXTURES = frozenset({"server", "address", "kvserve_proc"})

# What `kv` is for a test that is not a conformance test (it asked for a kvserve fixture too):
# a client of that same kvserve.
DEFAULT_ID = "kvserve-sync"

_ID = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")
_NODE = re.compile(r"tests/test_\w+\.py::\S+")


def _always_available() -> str | None:
    return None


@dataclass(frozen=True)
class Implementation:
    """One backend or front end that must pass the conformance suite.

    Attributes:
        id: shown in test names (`test_x[<id>]`) and accepted by `--backend`; lowercase words
            joined by hyphens.
        start: given the test's fixture request, start (or reach) what the implementation needs
            and return the address its clients connect to. Each test must get an empty store.
            Start things through `request.getfixturevalue` so pytest tears them down.
        connect: given that address and the test's authkey, return a client as a context
            manager; the suite closes it after the test.
        unavailable: None when this machine can run the implementation, otherwise the reason
            it cannot ("redis-server not on PATH"). Its tests are then skipped with that reason,
            or fail when `CI` is set: a CI that silently skips a backend is a defect.
        expected_differences: test node id without parameters (`tests/test_x.py::test_y`;
            `*` and `?` match as in fnmatch) -> the documented reason this implementation
            differs. Applied as `xfail(strict=True)` to this implementation only.
    """

    id: str
    start: Callable[[pytest.FixtureRequest], str]
    connect: Callable[[str, bytes], AbstractContextManager[kvclient.Client]]
    unavailable: Callable[[], str | None] = _always_available
    expected_differences: Mapping[str, str] = field(default_factory=dict)

    def difference(self, nodeid: str) -> str | None:
        """Return the documented reason this implementation fails `nodeid`, or None."""
        base = nodeid.split("[", 1)[0]
        for pattern, reason in self.expected_differences.items():
            if fnmatchcase(base, pattern):
                return reason
        return None


def kvserve_in_thread(request: pytest.FixtureRequest) -> str:
    """Start the `server` fixture (kvserve on port 0 in a thread) and return its address."""
    address: str = request.getfixturevalue("address")
    return address


def kvclient_connect(address: str, authkey: bytes) -> kvclient.Client:
    """Connect the synchronous kvclient with its default options."""
    return kvclient.connect(address, authkey)


def kvclient_aio_connect(address: str, authkey: bytes) -> kvclient.Client:
    """Connect the asyncio client (kvclient.aio) behind a sync-shaped adapter.

    Each call the suite makes is made by the asyncio client on a loop in a thread (see
    `tests/aio_adapter.py`): the same scenarios, not copies of them.
    """
    from tests.aio_adapter import connect  # only when this backend runs

    return connect(address, authkey)


def redis_cluster_start(request: pytest.FixtureRequest) -> str:
    """Reach the session's Redis Cluster (3 masters, 3 replicas), emptied for this test."""
    url: str = request.getfixturevalue("redis_cluster_url")
    return url


def redis_standalone_start(request: pytest.FixtureRequest) -> str:
    """Reach the session's standalone redis-server, emptied for this test."""
    url: str = request.getfixturevalue("redis_standalone_url")
    return url


def redis_connect(address: str, authkey: bytes) -> kvclient.Client:
    """Connect the sync kvclient to a redis:// or redis-cluster:// address (no authkey)."""
    return kvclient.connect(address)


def redis_aio_connect(address: str, authkey: bytes) -> kvclient.Client:
    """Connect the asyncio client (kvclient.aio) to a redis URL, behind the sync-shaped adapter."""
    from tests.aio_adapter import SyncOverAsync  # only when this front end runs

    return SyncOverAsync(address, None)


def _redis_unavailable() -> str | None:
    from tests.redis_cluster import available

    return available()


_STATS_COUNTS = (
    "stats()['ops'] and ['requests'] count kvserve's operations and frames; on Valkey/Redis "
    "'ops' is the masters' total_commands_processed (every command a script runs, and other "
    "clients'), and there are no frames to count"
)
# Differences of both Valkey/Redis implementations, with their reasons.
_NO_WATCH_TTL = (
    "watch, TTL and ephemeral keys are kvserve's so far: the Valkey/Redis backend raises "
    "NotSupportedError for them (README guarantees table; tests/test_redis_backend.py)"
)

REDIS_DIFFERENCES: dict[str, str] = {
    "tests/test_watch.py::*": _NO_WATCH_TTL,
    "tests/test_ttl.py::*": _NO_WATCH_TTL,
    "tests/test_ephemeral.py::*": _NO_WATCH_TTL,
    "tests/test_containers.py::test_list_operators_follow_the_stdlib_listproxy": _STATS_COUNTS,
    "tests/test_containers.py::test_batch_sends_calls_on_several_containers_in_one_frame": (
        _STATS_COUNTS
    ),
    "tests/test_persistence.py::test_dump_then_restore_into_a_fresh_server": (
        "dump/restore are kvserve's: a point-in-time copy of a cluster needs every master "
        "stopped at once; Valkey/Redis is backed up with its own tools (BGSAVE, redis-cli --rdb)"
    ),
    "tests/test_sync.py::test_dump_and_restore_keep_tokens_increasing": (
        "dump/restore are kvserve's (see test_dump_then_restore_into_a_fresh_server)"
    ),
}


_AIO_PREDICATE = (
    "Condition.wait_for's predicate is a plain function the asyncio client calls on its event "
    "loop (kvclient.aio docs: checked locally); this test's predicate reads a list through the "
    "sync-shaped adapter, a blocking call that cannot run on that loop (tests/aio_adapter.py "
    "refuses it)"
)
_AIO_DIFFERENCES = {
    "tests/test_sync.py::test_condition_wait_and_notify_across_processes": _AIO_PREDICATE
}
# The asyncio front end on Valkey/Redis: the backend's differences and the front end's.
REDIS_AIO_DIFFERENCES: dict[str, str] = {**REDIS_DIFFERENCES, **_AIO_DIFFERENCES}

IMPLEMENTATIONS: tuple[Implementation, ...] = (
    Implementation(
        id="kvserve-sync",
        # The `server` fixture: a real kvserve on port 0 in a thread of the test process.
        start=kvserve_in_thread,
        connect=kvclient_connect,
    ),
    Implementation(
        id="kvserve-asyncio",
        start=kvserve_in_thread,
        connect=kvclient_aio_connect,
        expected_differences=_AIO_DIFFERENCES,
    ),
    Implementation(
        id="redis-cluster",
        start=redis_cluster_start,
        connect=redis_connect,
        unavailable=_redis_unavailable,
        expected_differences=REDIS_DIFFERENCES,
    ),
    Implementation(
        id="redis-standalone",
        start=redis_standalone_start,
        connect=redis_connect,
        unavailable=_redis_unavailable,
        expected_differences=REDIS_DIFFERENCES,
    ),
    Implementation(
        id="redis-cluster-asyncio",
        start=redis_cluster_start,
        connect=redis_aio_connect,
        unavailable=_redis_unavailable,
        expected_differences=REDIS_AIO_DIFFERENCES,
    ),
    Implementation(
        id="redis-standalone-asyncio",
        start=redis_standalone_start,
        connect=redis_aio_connect,
        unavailable=_redis_unavailable,
        expected_differences=REDIS_AIO_DIFFERENCES,
    ),
)


def by_id(implementations: Iterable[Implementation] | None = None) -> dict[str, Implementation]:
    """Return the implementations (default: `IMPLEMENTATIONS`, read now) keyed by id."""
    impls = IMPLEMENTATIONS if implementations is None else implementations
    return {impl.id: impl for impl in impls}


def in_ci(environ: Mapping[str, str] = os.environ) -> bool:
    """Return whether we run in CI (`CI` set to anything but empty, 0, false or no)."""
    return environ.get("CI", "").strip().lower() not in {"", "0", "false", "no"}


def unavailable_outcome(
    impl: Implementation, environ: Mapping[str, str] = os.environ
) -> tuple[str, str] | None:
    """Return ("skip" or "fail", message) when `impl` cannot run here, else None."""
    reason = impl.unavailable()
    if reason is None:
        return None
    message = f"{impl.id} is not available here: {reason}"
    if in_ci(environ):
        return "fail", f"{message} (CI is set: a backend CI cannot run fails, it is not skipped)"
    return "skip", message


def registry_problems(
    implementations: Iterable[Implementation], conformance_nodeids: Iterable[str]
) -> list[str]:
    """Return what is wrong with a registry, checked against the collected conformance tests.

    Finds duplicate or malformed ids, expected differences with an empty reason, patterns that
    are not test node ids, and patterns that name no conformance test (a stale xfail).
    """
    impls = list(implementations)
    bases = {nodeid.split("[", 1)[0] for nodeid in conformance_nodeids}
    problems: list[str] = []
    seen: set[str] = set()
    for impl in impls:
        if impl.id in seen:
            problems.append(f"{impl.id}: id used twice")
        seen.add(impl.id)
        if not _ID.fullmatch(impl.id):
            problems.append(f"{impl.id!r}: id must be lowercase words joined by hyphens")
        for pattern, reason in impl.expected_differences.items():
            if not reason.strip():
                problems.append(f"{impl.id}: {pattern}: expected difference without a reason")
            if not _NODE.fullmatch(pattern) or "[" in pattern:
                problems.append(
                    f"{impl.id}: {pattern}: not a test node id without parameters"
                    " (tests/test_x.py::test_y)"
                )
            elif not any(fnmatchcase(base, pattern) for base in bases):
                problems.append(f"{impl.id}: {pattern}: names no conformance test (stale?)")
    return problems
