"""The public surface: exports, the error tree, proxies across processes, stdlib compatibility."""

from __future__ import annotations

import multiprocessing as mp
import pickle  # to check what a pickled proxy carries; never used on the wire
import subprocess
import sys
from typing import Any

import pytest

import kvclient
import kvserve
from kvproto.address import parse_address
from kvserve import KVManager
from tests.aio_adapter import Connect
from tests.targets import Target


@pytest.mark.parametrize("module", [kvclient, kvserve])
def test_all_is_sorted_and_complete(module: Any) -> None:
    assert module.__all__ == sorted(module.__all__)
    public = {n for n in vars(module) if not n.startswith("_") and n[0].isupper()}
    public -= {"Any"}
    assert public <= set(module.__all__)


def test_error_tree() -> None:
    assert issubclass(kvclient.KVConnectionError, kvclient.KVError)
    assert issubclass(kvclient.KVConnectionError, ConnectionError)
    assert issubclass(kvclient.KVTimeoutError, kvclient.KVConnectionError)
    assert issubclass(kvclient.KVTimeoutError, TimeoutError)
    for name in ("AuthError", "ProtocolError", "RemoteError", "KindError", "NoSuchContainerError"):
        assert issubclass(getattr(kvclient, name), kvclient.KVError)


def test_kvclient_never_imports_kvserve() -> None:
    code = "import sys, kvclient, kvclient.cli; print('kvserve' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:50000", ("127.0.0.1", 50000)),
        ("example.org:1", ("example.org", 1)),
        ("[::1]:6000", ("::1", 6000)),
        ("::1", ("::1", 50000)),
        ("host", ("host", 50000)),
        (("h", 5), ("h", 5)),
    ],
)
def test_parse_address(text: Any, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["host:port", "h:70000", "[::1:5"])
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid address"):
        parse_address(text)


def _child_appends(proxy: kvclient.ListProxy, value: Any) -> None:
    proxy.append(value)


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_proxy_handed_to_a_child_process_keeps_working(kv: kvclient.Client, method: str) -> None:
    lst = kv.list("from-children")
    lst.append("parent")  # the parent's connection exists before the child starts
    ctx = mp.get_context(method)
    child = ctx.Process(target=_child_appends, args=(lst, method))  # type: ignore[attr-defined]
    child.start()
    child.join(60)
    assert child.exitcode == 0
    lst.append("parent-again")  # the parent's connection was not disturbed by the child
    assert lst.copy() == ["parent", method, "parent-again"]


def test_pickled_proxy_carries_no_authkey_outside_spawning(
    kv: kvclient.Client, authkey: bytes
) -> None:
    data = pickle.dumps(kv.dict("d"))
    assert authkey not in data
    # In this process the client is found again by address, so the proxy still works.
    proxy = pickle.loads(data)
    proxy["k"] = 1
    assert kv.dict("d")["k"] == 1


def test_kvmanager_offers_no_half_working_client_path(address: str, authkey: bytes) -> None:
    host, port = parse_address(address)
    manager = KVManager((host, port), authkey=authkey)
    with pytest.raises(NotImplementedError, match=r"kvclient\.connect\(address, authkey\)"):
        manager.connect()
    # No stdlib-style creation methods whose AutoProxy objects would half work.
    for typeid in ("dict", "list", "namespace", "queue", "lock", "value"):
        assert not hasattr(manager, typeid)
    with kvclient.connect(address, authkey) as kv:
        kv.ping()


def test_an_authkey_shorter_than_the_server_minimum_is_refused_on_both_sides(
    connect: Connect, address: str, authkey: bytes
) -> None:
    with pytest.raises(kvclient.AuthError, match="5 bytes; use at least 16"):
        KVManager(("127.0.0.1", 0), authkey=b"short")
    with pytest.raises(kvclient.AuthError, match="5 bytes; kvserve keys are at least 16"):
        connect(address, b"short")
    KVManager(("127.0.0.1", 0), authkey=b"k" * 16)  # the minimum itself is fine


def test_kvmanager_start_runs_a_server_process(authkey: bytes) -> None:
    manager = KVManager(("127.0.0.1", 0), authkey=authkey)
    manager.start()
    try:
        with kvclient.connect(manager.address, authkey) as kv:  # type: ignore[arg-type]
            kv.dict("d")["x"] = 1
            assert kv.dict("d")["x"] == 1
    finally:
        manager.shutdown()


def test_client_close_and_context_manager(kv: kvclient.Client, kv_target: Target) -> None:
    with kv_target.connect() as other:
        d = other.dict("d")
        d["x"] = 1
    with pytest.raises(kvclient.KVError, match="closed"):
        d["x"] = 2
    assert kv.dict("d")["x"] == 1  # closing one client closes only its own connections


def test_repr_names_container_and_server(kv: kvclient.Client) -> None:
    assert repr(kv.dict("users")) == (
        f"<DictProxy object, typeid 'dict' at {kv.endpoint}, name 'users'>"
    )
    assert kv.dict("users").name == "users"
