"""CPython's own manager tests, run against kvserve and against the stdlib SyncManager.

``test._test_multiprocessing`` (shipped with the interpreter) is what CPython's managers must
pass. Its ``ManagerMixin`` test classes take every object from ``cls.manager``
(``self.list(...)``, ``self.Queue()``, ``self.Lock()`` ...), so a small shim manager that hands
out kvclient proxies under fresh names, with the initial contents copied in, runs CPython's
real test classes against a real kvserve process.

Every class is run twice: ``WithKVManager...`` against kvserve, ``WithStdlibManager...`` against
a real ``multiprocessing.managers.SyncManager`` (the baseline). Both lists are the same, so
every test the stdlib manager passes, kvmanager passes, except:

- :data:`EXCLUDED`: tests that cannot apply to any msgpack network store, skipped for both
  with their reason;
- :data:`KV_DIFFERS`: deliberate differences, expected failures on kvserve only, each also a
  row of the README table "where kvmanager differs from the stdlib, and why";
- :data:`STDLIB_LACKS`: tests the stdlib manager itself fails (kvmanager passes them), expected
  failures of the baseline.

One kvserve process and one SyncManager serve the whole module: starting one per class would
cost more than the tests.
"""

from __future__ import annotations

import functools
import itertools
import multiprocessing
import multiprocessing.managers
import os
import secrets
import subprocess
import sys
import unittest
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

import kvclient
from tests.conftest import read_listening_line

try:
    import test._test_multiprocessing as cpython  # type: ignore[import-not-found]
except ImportError as exc:  # pragma: no cover - depends on how Python was installed
    # Not a skip: without these tests the parity claim is untested, and that must show.
    raise ImportError(
        f"CPython's own test package is missing ({exc}); this runner needs "
        "test._test_multiprocessing. Install it (Debian/Ubuntu: apt install "
        "libpython3.11-testsuite; pyenv and python.org builds include it; the official "
        "Docker python images delete it)"
    ) from exc

# -- what is left out, and why -----------------------------------------------------------------

_NO_CODE = "runs user code in the manager process (kvserve never receives code, only msgpack data)"
_NO_MANAGER = "never touches the manager: it tests multiprocessing.Queue or process internals"

EXCLUDED: dict[str, str] = {
    # Whole classes.
    "_TestPool": "Pool: " + _NO_CODE,
    "_TestMyManager": "user-registered typeids and callables: " + _NO_CODE,
    "_TestRemoteManager": "a user-registered typeid with a callable (get_queue): " + _NO_CODE,
    "_TestManagerRestart": "a user-registered typeid with a callable (get_queue): " + _NO_CODE,
    # Single tests.
    "_TestBarrier.test_action": "Barrier(action=): " + _NO_CODE,
    "_TestQueue.test_no_import_lock_contention": _NO_MANAGER,
    "_TestQueue.test_timeout": _NO_MANAGER,
    "_TestQueue.test_queue_feeder_donot_stop_onexc": _NO_MANAGER,
    "_TestQueue.test_queue_feeder_on_queue_feeder_error": _NO_MANAGER,
    "_TestQueue.test_closed_queue_put_get_exceptions": _NO_MANAGER,
    "TestSyncManagerTypes.test_pool": "Pool: " + _NO_CODE,
}

_SNAPSHOT = (
    "iteration walks a snapshot fetched in one round trip (the stdlib pays one round trip per "
    "item and sees later changes)"
)

KV_DIFFERS: dict[str, str] = {
    "_TestContainers.test_list_iter": _SNAPSHOT,
    "_TestContainers.test_dict_iter": _SNAPSHOT,
}

_NO_SYNC = (
    "the stdlib manager's {} ignores lock= and has no get_lock()/get_obj() (kvclient's has "
    "them, as multiprocessing.{} does)"
)

STDLIB_LACKS: dict[str, str] = {
    "_TestValue.test_getobj_getlock": _NO_SYNC.format("Value", "Value"),
    "_TestArray.test_getobj_getlock_obj": _NO_SYNC.format("Array", "Array"),
    "_TestArray.test_array_from_size": "the stdlib manager's Array takes no size: "
    "array.array('i', 10) raises TypeError",
    "_TestValue.test_rawvalue": "the stdlib manager has no RawValue (kvclient's is "
    "kv.value(..., lock=False))",
    "_TestArray.test_rawarray": "the stdlib manager has no RawArray (kvclient's is "
    "kv.array(..., lock=False))",
}

# -- the shim manager --------------------------------------------------------------------------


class KVShimManager:
    """The part of ``SyncManager`` the CPython tests call, handing out kvclient proxies.

    Every object gets a fresh name, so tests never see each other's objects, and its initial
    contents are given at creation (``initial=``), as ``manager.list(range(10))`` does.
    """

    def __init__(self, kv: kvclient.Client) -> None:
        self._kv = kv
        self._prefix = f"parity-{secrets.token_hex(4)}"
        self._counter = itertools.count()

    def _name(self, kind: str) -> str:
        return f"{self._prefix}.{kind}.{next(self._counter)}"

    def list(self, sequence: Iterable[Any] = ()) -> Any:
        return self._kv.list(self._name("list"), initial=sequence)

    def dict(self, *args: Any, **kwds: Any) -> Any:
        return self._kv.dict(self._name("dict"), initial=dict(*args, **kwds))

    def Namespace(self, **kwds: Any) -> Any:
        return self._kv.namespace(self._name("namespace"), initial=kwds)

    def Queue(self, maxsize: int = 0) -> Any:
        return self._kv.queue(self._name("queue"), maxsize)

    JoinableQueue = Queue  # every kv queue has task_done() and join()

    def Lock(self) -> Any:
        return self._kv.lock(self._name("lock"))

    def RLock(self) -> Any:
        return self._kv.rlock(self._name("rlock"))

    def Semaphore(self, value: int = 1) -> Any:
        return self._kv.semaphore(self._name("semaphore"), value)

    def BoundedSemaphore(self, value: int = 1) -> Any:
        return self._kv.bounded_semaphore(self._name("bounded_semaphore"), value)

    def Condition(self, lock: Any = None) -> Any:
        if lock is not None:
            raise TypeError("a kvserve Condition has its own lock")
        return self._kv.condition(self._name("condition"))

    def Event(self) -> Any:
        return self._kv.event(self._name("event"))

    def Barrier(
        self, parties: int, action: Callable[[], Any] | None = None, timeout: float | None = None
    ) -> Any:
        if action is not None:
            raise TypeError("Barrier(action=) would send code to the server")
        return self._kv.barrier(self._name("barrier"), parties, timeout)

    def Value(self, typecode: str, value: Any, lock: Any = True) -> Any:
        return self._kv.value(self._name("value"), typecode, value, lock=lock)

    def Array(self, typecode: str, sequence: Any, lock: Any = True) -> Any:
        return self._kv.array(self._name("array"), typecode, sequence, lock=lock)

    def RawValue(self, typecode: str, value: Any) -> Any:
        return self.Value(typecode, value, lock=False)

    def RawArray(self, typecode: str, sequence: Any) -> Any:
        return self.Array(typecode, sequence, lock=False)


# -- one server of each kind for the module ----------------------------------------------------

_SERVERS: dict[str, Any] = {}


@pytest.fixture(scope="module", autouse=True)
def _servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    authkey = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KV_")}
    env["HOME"] = str(tmp_path_factory.mktemp("home"))
    env["KV_AUTHKEY"] = authkey
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvserve", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    kv = None
    stdlib = multiprocessing.managers.SyncManager()
    try:
        kv = kvclient.connect(read_listening_line(proc), authkey.encode())
        stdlib.start()
        _SERVERS["kv"] = KVShimManager(kv)
        _SERVERS["stdlib"] = stdlib
        yield
    finally:
        _SERVERS.clear()
        if kv is not None:
            kv.close()
        stdlib.shutdown()
        proc.terminate()
        proc.wait(10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


class _SharedManagerMixin(cpython.ManagerMixin):  # type: ignore[misc]
    """CPython's ManagerMixin, with the module's manager instead of one started per class."""

    server_kind = ""
    manager: Any

    @classmethod
    def setUpClass(cls) -> None:
        cls.manager = _SERVERS[cls.server_kind]

    @classmethod
    def tearDownClass(cls) -> None:
        stdlib = _SERVERS.get("stdlib")
        manager_process = getattr(stdlib, "_process", None)
        for child in multiprocessing.active_children():
            if child is not manager_process:
                child.join(5)
        cls.manager = None


class KVManagerMixin(_SharedManagerMixin):
    server_kind = "kv"
    # ManagerMixin has no RawValue/RawArray (the stdlib manager has none); kvclient's are
    # Value/Array with lock=False, so _TestValue/_TestArray run whole.
    RawValue = property(lambda self: self.manager.RawValue)
    RawArray = property(lambda self: self.manager.RawArray)


class StdlibManagerMixin(_SharedManagerMixin):
    server_kind = "stdlib"


# -- the test classes --------------------------------------------------------------------------


def _manager_classes() -> dict[str, Any]:
    """Return CPython's test classes that run with a manager, plus _TestValue and _TestArray."""
    found: dict[str, Any] = {}
    base: Any
    for name, base in vars(cpython).items():
        if not isinstance(base, type) or not issubclass(base, cpython.BaseTestCase):
            continue
        if base is cpython.BaseTestCase or name in EXCLUDED:
            continue
        if "manager" in getattr(base, "ALLOWED_TYPES", ()) or name in ("_TestValue", "_TestArray"):
            found[name] = base
    return found


def _skip(reason: str) -> Callable[..., None]:
    def skipped(self: unittest.TestCase) -> None:
        self.skipTest(reason)

    return skipped


def _expect_failure(func: Callable[..., Any]) -> Callable[..., Any]:
    # A new function: expectedFailure marks the function it is given, and the original is
    # shared by both runs.
    @functools.wraps(func)
    def expected(self: unittest.TestCase) -> None:
        func(self)

    return unittest.expectedFailure(expected)


def _marks(base: type, name: str, differs: dict[str, str]) -> dict[str, Any]:
    """Return the class attributes that skip exclusions and expect the listed failures."""
    attrs: dict[str, Any] = {}
    for test in (n for n in dir(base) if n.startswith("test")):
        key = f"{name}.{test}"
        if key in EXCLUDED:
            attrs[test] = _skip(EXCLUDED[key])
        elif key in differs:
            attrs[test] = _expect_failure(getattr(base, test))
    return attrs


def _install(prefix: str, mixin: type, differs: dict[str, str]) -> None:
    for name, base in _manager_classes().items():
        cls_name = f"{prefix}{name.lstrip('_').removeprefix('Test')}"
        cls = type(cls_name, (base, mixin, unittest.TestCase), _marks(base, name, differs))
        cls.__module__ = __name__
        cls.__qualname__ = cls_name
        globals()["Test" + cls_name] = cls


_install("WithKVManager", KVManagerMixin, KV_DIFFERS)
_install("WithStdlibManager", StdlibManagerMixin, STDLIB_LACKS)


class _SharedSyncManagerTypes(cpython.TestSyncManagerTypes):  # type: ignore[misc]
    """TestSyncManagerTypes with the module's manager in place of one SyncManager per test."""

    __test__ = False  # only its two subclasses below run
    server_kind = ""

    def setUp(self) -> None:
        self.manager = _SERVERS[self.server_kind]
        self.proc = None

    def tearDown(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.proc.terminate()
            self.proc.join()
        self.proc = None

    @classmethod
    def setUpClass(cls) -> None:
        pass

    @classmethod
    def tearDownClass(cls) -> None:
        pass


TestWithKVManagerSyncManagerTypes = type(
    "TestWithKVManagerSyncManagerTypes",
    (_SharedSyncManagerTypes,),
    {
        "__test__": True,
        "server_kind": "kv",
        **_marks(cpython.TestSyncManagerTypes, "TestSyncManagerTypes", KV_DIFFERS),
    },
)
TestWithStdlibManagerSyncManagerTypes = type(
    "TestWithStdlibManagerSyncManagerTypes",
    (_SharedSyncManagerTypes,),
    {
        "__test__": True,
        "server_kind": "stdlib",
        **_marks(cpython.TestSyncManagerTypes, "TestSyncManagerTypes", STDLIB_LACKS),
    },
)


# -- the runner's own checks -------------------------------------------------------------------


def test_every_listed_exclusion_and_difference_names_a_real_test() -> None:
    """A renamed CPython test must not leave a stale entry that silently excludes nothing."""
    for key in [*EXCLUDED, *KV_DIFFERS, *STDLIB_LACKS]:
        cls_name, _, test = key.partition(".")
        cls = getattr(cpython, cls_name, None)
        assert cls is not None, key
        assert not test or callable(getattr(cls, test, None)), key
    assert not set(KV_DIFFERS) & set(EXCLUDED)


def test_the_runner_covers_every_manager_class() -> None:
    manager_classes = {
        name
        for name, base in vars(cpython).items()
        if isinstance(base, type)
        and issubclass(base, cpython.BaseTestCase)
        and base is not cpython.BaseTestCase
        and "manager" in getattr(base, "ALLOWED_TYPES", ())
    }
    installed = set(_manager_classes())
    assert manager_classes <= installed | set(EXCLUDED)
    assert {"_TestQueue", "_TestLock", "_TestContainers", "_TestValue", "_TestArray"} <= installed
    tests = [
        n
        for name in installed
        for n in dir(globals()[f"TestWithKVManager{name.lstrip('_').removeprefix('Test')}"])
        if n.startswith("test")
    ]
    assert len(tests) >= 50, len(tests)


def test_every_expected_failure_is_a_row_of_the_readme_table() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme.split("### Where kvmanager differs from the stdlib, and why", 1)[1]
    table = table.split("\n## ", 1)[0]
    for key in KV_DIFFERS:
        assert f"`{key.rpartition('.')[2]}`" in table, key
