"""TLS and mutual TLS, the read-only key, key checks, connection limits, fuzzing the server."""

from __future__ import annotations

import datetime
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvclient
from kvproto.codec import Codec
from kvproto.tls import server_context
from kvserve import KVDict, KVList, KVManager, KVNamespace, KVQueue, Server
from kvserve.containers import Container
from tests.aio_adapter import Connect
from tests.conftest import read_listening_line, start_kvserve
from tests.wire import (
    authed_connection,
    closed_by_peer,
    raw_connection,
    recv_frame,
    send_frame,
)


def _serve(srv: Server) -> threading.Thread:
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    return thread


def _stop(srv: Server, thread: threading.Thread) -> None:
    srv.stop()
    assert srv.wait_stopped(10)
    thread.join(10)


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def pki(ca: trustme.CA, tmp_path: Path) -> dict[str, Path]:
    """CA, server certificate for 127.0.0.1/localhost, and a client certificate, as files."""
    files = {
        "ca": tmp_path / "ca.pem",
        "server": tmp_path / "server.pem",
        "client": tmp_path / "client.pem",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(
        str(files["server"])
    )
    ca.issue_cert("client@example.org").private_key_and_cert_chain_pem.write_to_path(
        str(files["client"])
    )
    return files


def _tls_server(authkey: bytes, ctx: ssl.SSLContext) -> tuple[Server, threading.Thread]:
    srv = KVManager(("127.0.0.1", 0), authkey=authkey, tls=ctx).get_server()
    return srv, _serve(srv)


@pytest.fixture
def tls_server(authkey: bytes, pki: dict[str, Path]) -> Iterator[Server]:
    srv, thread = _tls_server(authkey, server_context(pki["server"]))
    yield srv
    _stop(srv, thread)


@pytest.fixture
def mtls_server(authkey: bytes, pki: dict[str, Path]) -> Iterator[Server]:
    srv, thread = _tls_server(authkey, server_context(pki["server"], client_ca=pki["ca"]))
    yield srv
    _stop(srv, thread)


def test_tls_round_trip(
    connect: Connect, tls_server: Server, authkey: bytes, pki: dict[str, Path]
) -> None:
    with connect(tls_server.endpoint, authkey, ca=pki["ca"]) as kv:
        d = kv.dict("secret")
        d["k"] = b"x" * 100_000  # several TLS records
        assert d["k"] == b"x" * 100_000


def test_tls_from_environment(
    connect: Connect,
    tls_server: Server,
    authkey: bytes,
    pki: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KV_TLS_CA", str(pki["ca"]))
    with connect(tls_server.endpoint, authkey) as kv:
        kv.ping()


def test_plain_client_to_tls_server_fails_fast(
    connect: Connect, tls_server: Server, authkey: bytes
) -> None:
    start = time.monotonic()
    with pytest.raises(kvclient.TLSError, match="expects TLS; pass tls=True"):
        connect(tls_server.endpoint, authkey, timeout=20)
    assert time.monotonic() - start < 10  # refused, not left to time out


def test_tls_client_to_plain_server_fails_fast(
    connect: Connect, address: str, authkey: bytes, pki: dict[str, Path]
) -> None:
    start = time.monotonic()
    with pytest.raises(kvclient.TLSError, match="did not answer TLS"):
        connect(address, authkey, ca=pki["ca"], timeout=20)
    assert time.monotonic() - start < 10
    with connect(address, authkey) as kv:  # the plain server is fine
        kv.ping()


@pytest.fixture
def kvserve_pair(clean_env: dict[str, str], authkey: bytes, pki: dict[str, Path]) -> Iterator[Any]:
    """Two real kvserve processes, ``{"tls": address, "plain": address, "env": env}``."""
    env = dict(clean_env, KV_AUTHKEY=authkey.decode())
    procs = [start_kvserve(env, "--tls-cert", str(pki["server"])), start_kvserve(env)]
    try:
        yield {"tls": read_listening_line(procs[0]), "plain": read_listening_line(procs[1])}
    finally:
        for proc in procs:
            proc.terminate()
            proc.communicate(timeout=10)


def test_kvserve_tls_mismatch_names_the_endpoint_and_the_cause(
    connect: Connect, kvserve_pair: dict[str, str], authkey: bytes, pki: dict[str, Path]
) -> None:
    """Plain at a TLS port, TLS at a plain one: a TLSError saying which, not a reset."""
    tls, plain = kvserve_pair["tls"], kvserve_pair["plain"]
    with pytest.raises(kvclient.TLSError) as told:
        connect(tls, authkey, retry=None)
    assert str(told.value) == (
        f"server at {tls} expects TLS; pass tls=True, or ca= with its CA (or set KV_TLS_CA; "
        "kvctl: --tls-ca)"
    )
    with pytest.raises(kvclient.TLSError) as told:
        connect(plain, authkey, ca=pki["ca"], retry=None)
    assert str(told.value).startswith(f"server at {plain} did not answer TLS (")
    assert str(told.value).endswith("); is it started with --tls-cert?")
    with connect(tls, authkey, ca=pki["ca"]) as kv, connect(plain, authkey) as other:
        kv.ping()  # neither server minds
        other.ping()


def test_kvctl_prints_the_tls_mismatch_as_one_line(
    kvserve_pair: dict[str, str], clean_env: dict[str, str], authkey: bytes, pki: dict[str, Path]
) -> None:
    tls, plain = kvserve_pair["tls"], kvserve_pair["plain"]
    env = dict(clean_env, KV_AUTHKEY=authkey.decode())
    kvctl = str(Path(sys.executable).parent / "kvctl")
    for args, line in [
        (["-a", tls, "get", "k"], f"TLSError: server at {tls} expects TLS; pass tls=True"),
        (["-a", tls, "ping"], f"TLSError: server at {tls} expects TLS; pass tls=True"),
        (
            ["-a", plain, "--tls-ca", str(pki["ca"]), "ping"],
            f"TLSError: server at {plain} did not answer TLS (",
        ),
    ]:
        done = subprocess.run([kvctl, *args], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 3 and done.stdout == "", (args, done)
        assert done.stderr.startswith(line) and done.stderr.count("\n") == 1, (args, done.stderr)


def test_a_plain_server_that_closes_at_once_is_not_taken_for_tls(
    connect: Connect, clean_env: dict[str, str], authkey: bytes
) -> None:
    """At its --max-connections limit kvserve closes a new connection unread, as a TLS port
    does a plain client's: the client asks, and it is no TLS server (retryable, not TLSError).
    """
    env = dict(clean_env, KV_AUTHKEY=authkey.decode())
    proc = start_kvserve(env, "--max-connections", "1")
    try:
        address = read_listening_line(proc)
        with connect(address, authkey) as first:
            first.ping()
            with pytest.raises(kvclient.KVConnectionError, match="max-connections") as told:
                connect(address, authkey, retry=None)
            assert not isinstance(told.value, kvclient.TLSError)
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


def test_a_tls_server_at_its_limit_is_retryable(
    connect: Connect, clean_env: dict[str, str], authkey: bytes, pki: dict[str, Path]
) -> None:
    """At its --max-connections limit kvserve closes a new connection at accept, before TLS:
    a TLS client gets the retryable KVConnectionError naming both likely causes (not a
    TLSError, which no retry would get past), and a plain client keeps the TLS hint.
    """
    env = dict(clean_env, KV_AUTHKEY=authkey.decode())
    proc = start_kvserve(env, "--tls-cert", str(pki["server"]), "--max-connections", "1")
    try:
        address = read_listening_line(proc)
        with connect(address, authkey, ca=pki["ca"]) as first:
            first.ping()
            with pytest.raises(kvclient.KVConnectionError) as told:
                connect(address, authkey, ca=pki["ca"], retry=None)
            assert not isinstance(told.value, kvclient.TLSError), repr(told.value)
            message = str(told.value)
            assert message.startswith(f"server at {address} closed the connection during the TLS")
            assert "--max-connections limit, or not serving TLS (--tls-cert)?" in message
            assert "handshake ()" not in message  # a reason, even for a bare reset
            start = time.monotonic()
            with pytest.raises(kvclient.KVConnectionError) as told:
                connect(address, authkey, retry=None, timeout=20)
            assert time.monotonic() - start < 10
            assert not isinstance(told.value, kvclient.TLSError), repr(told.value)
            assert "max-connections" in str(told.value)
            assert "if it serves TLS, connect with tls=True" in str(told.value)
        with connect(address, authkey, ca=pki["ca"]) as again:  # a retry then gets in
            again.ping()
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


def test_the_tls_probe_waits_no_longer_than_the_connect_timeout(
    connect: Connect, authkey: bytes
) -> None:
    """A port that closes a plain client at once is asked whether it answers TLS: that probe
    waits the connect timeout (5 s at most), not 5 s whatever it is (in a thread, for the
    asyncio client). Here a listener closes the first connection and holds the probe's."""
    held: list[float] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)

        def serve() -> None:
            first, _ = listener.accept()
            first.close()
            probe, _ = listener.accept()
            with probe:
                began = time.monotonic()
                probe.settimeout(10)
                try:
                    while probe.recv(4096):
                        pass
                except OSError:
                    return
                held.append(time.monotonic() - began)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        port = listener.getsockname()[1]
        with pytest.raises(kvclient.KVError):
            connect(f"127.0.0.1:{port}", authkey, retry=None, timeout=1.0)
        thread.join(15)
    assert held and held[0] < 3, held  # closed at the 1 s timeout, not after 5 s


def test_unknown_ca_is_refused(
    connect: Connect, tls_server: Server, authkey: bytes, tmp_path: Path
) -> None:
    other = trustme.CA()
    other.cert_pem.write_to_path(str(tmp_path / "other.pem"))
    with pytest.raises(
        kvclient.TLSError, match=r"refused.*certificate verify failed|unable to get"
    ):
        connect(tls_server.endpoint, authkey, ca=tmp_path / "other.pem")


def test_expired_certificate_is_refused(
    connect: Connect, ca: trustme.CA, authkey: bytes, pki: dict[str, Path], tmp_path: Path
) -> None:
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    expired = ca.issue_cert(
        "127.0.0.1", not_before=past - datetime.timedelta(days=30), not_after=past
    )
    expired.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "expired.pem"))
    srv, thread = _tls_server(authkey, server_context(tmp_path / "expired.pem"))
    try:
        with pytest.raises(kvclient.TLSError, match="expired"):
            connect(srv.endpoint, authkey, ca=pki["ca"])
    finally:
        _stop(srv, thread)


def test_wrong_hostname_is_refused(
    connect: Connect, ca: trustme.CA, authkey: bytes, pki: dict[str, Path], tmp_path: Path
) -> None:
    ca.issue_cert("db.example.org").private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "other-host.pem")
    )
    srv, thread = _tls_server(authkey, server_context(tmp_path / "other-host.pem"))
    try:
        with pytest.raises(kvclient.TLSError, match=r"mismatch|doesn.t match|not valid for"):
            connect(srv.endpoint, authkey, ca=pki["ca"])
    finally:
        _stop(srv, thread)


def test_mutual_tls_requires_a_client_certificate(
    connect: Connect, mtls_server: Server, authkey: bytes, pki: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(kvclient.TLSError, match="client certificate"):
        connect(mtls_server.endpoint, authkey, ca=pki["ca"], retry=None)
    stranger = trustme.CA().issue_cert("intruder@example.org")
    stranger.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "stranger.pem"))
    with pytest.raises(kvclient.TLSError):
        connect(mtls_server.endpoint, authkey, ca=pki["ca"], cert=tmp_path / "stranger.pem")
    with connect(mtls_server.endpoint, authkey, ca=pki["ca"], cert=pki["client"]) as kv:
        kv.dict("d")["k"] = 1
        assert kv.dict("d")["k"] == 1
    # The authkey still matters inside TLS.
    with pytest.raises(kvclient.AuthError):
        connect(mtls_server.endpoint, b"wrong-key-wrong-key", ca=pki["ca"], cert=pki["client"])


def test_tls_handshake_that_never_starts_is_closed(authkey: bytes, pki: dict[str, Path]) -> None:
    srv = KVManager(
        ("127.0.0.1", 0), authkey=authkey, tls=server_context(pki["server"]), handshake_timeout=0.5
    ).get_server()
    thread = _serve(srv)
    try:
        sock = socket.create_connection(srv.address, timeout=10)
        with sock:
            assert closed_by_peer(sock)
    finally:
        _stop(srv, thread)


def test_kvserve_with_mtls_end_to_end(
    connect: Connect, clean_env: dict[str, str], authkey: bytes, pki: dict[str, Path]
) -> None:
    env = dict(clean_env, KV_AUTHKEY=authkey.decode())
    proc = start_kvserve(
        env,
        "--tls-cert",
        str(pki["server"]),
        "--tls-ca",
        str(pki["ca"]),
    )
    try:
        address = read_listening_line(proc)
        with connect(address, authkey, ca=pki["ca"], cert=pki["client"]) as kv:
            kv.dict("d")["k"] = "over mTLS"
            assert kv.dict("d")["k"] == "over mTLS"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert "TLS on with client certificates required" in err


def test_non_loopback_bind_without_tls_warns(clean_env: dict[str, str], authkey: bytes) -> None:
    env = dict(clean_env, KV_AUTHKEY=authkey.decode())
    proc = start_kvserve(env, "--host", "0.0.0.0")  # bound briefly; only loopback is used
    try:
        read_listening_line(proc)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert "without TLS" in err
    assert "readable by anyone on the network" in err


# -- keys -------------------------------------------------------------------------------------


def test_key_file_readable_by_others_is_refused(clean_env: dict[str, str], tmp_path: Path) -> None:
    keyfile = tmp_path / "key"
    keyfile.write_bytes(os.urandom(32))
    keyfile.chmod(0o644)
    proc = start_kvserve(clean_env, "--authkey-file", str(keyfile))
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 3
    assert out == ""
    assert "chmod 600" in err
    assert "mode 644" in err


@pytest.mark.parametrize("key", ["", "short-key"])
def test_empty_or_short_key_is_refused(clean_env: dict[str, str], key: str) -> None:
    env = dict(clean_env, KV_AUTHKEY=key) if key else dict(clean_env)
    if not key:
        keyfile = Path(clean_env["HOME"]) / "empty"
        keyfile.parent.mkdir(parents=True, exist_ok=True)
        keyfile.write_bytes(b"")
        keyfile.chmod(0o600)
        proc = start_kvserve(env, "--authkey-file", str(keyfile))
    else:
        proc = start_kvserve(env)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 3
    assert out == ""
    assert ("is empty" in err) if not key else ("at least 16" in err)


# -- the read-only key ------------------------------------------------------------------------

READONLY_KEY = b"read-only-key-0123456789"

# One plausible call of every mutating method of every kind.
MUTATING_CALLS: dict[str, list[tuple[str, list[Any]]]] = {
    "dict": [
        ("__setitem__", ["k", 2]),
        ("__delitem__", ["k"]),
        ("update", [{"k": 3}]),
        ("pop", ["k"]),
        ("popitem", []),
        ("setdefault", ["new", 1]),
        ("clear", []),
        ("incr", ["n", 1, 0]),
        ("cas", ["k", 1, 5]),
        ("set_many", [{"a": 1}]),
        ("delete_many", [["k"]]),
        ("set", ["k", 2, 30.0]),
        ("set_ttl", ["k", 30.0]),
        ("persist", ["k"]),
        ("renew", [b"owner", 0]),
    ],
    "list": [
        ("__setitem__", [0, 9]),
        ("__delitem__", [0]),
        ("append", [1]),
        ("extend", [[1]]),
        ("insert", [0, 1]),
        ("pop", [-1]),
        ("remove", [1]),
        ("sort", [False]),
        ("reverse", []),
        ("clear", []),
        ("setslice", [0, 1, None, [7]]),
        ("delslice", [0, 1, None]),
        ("imul", [2]),
    ],
    "namespace": [
        ("setattr", ["x", 2]),
        ("delattr", ["x"]),
        ("incr", ["x", 1]),
        ("update", [{"y": 1}]),
    ],
    "queue": [
        ("put", [1, False, None]),
        ("get", [False, None]),
        ("put_nowait", [1]),
        ("get_nowait", []),
        ("task_done", []),
    ],
}


def test_the_table_covers_every_mutating_method() -> None:
    kinds: dict[str, type[Container]] = {
        "dict": KVDict,
        "list": KVList,
        "namespace": KVNamespace,
        "queue": KVQueue,
    }
    for kind, cls in kinds.items():
        assert {m for m, _ in MUTATING_CALLS[kind]} == set(cls.mutating), kind


def test_readonly_key_reads_everything_and_changes_nothing(
    connect: Connect, authkey: bytes
) -> None:
    srv = KVManager(("127.0.0.1", 0), authkey=authkey, readonly_authkey=READONLY_KEY).get_server()
    thread = _serve(srv)
    try:
        with connect(srv.endpoint, authkey) as admin:
            admin.dict("dict").update({"k": 1, "n": 5})
            admin.list("list").extend([1, 2, 3])
            admin.namespace("namespace").x = 1
            admin.queue("queue").put(1)
            before = admin.dump()
        with connect(srv.endpoint, READONLY_KEY, retry=None) as ro:
            assert ro.dict("dict")["k"] == 1  # reads work, and so does naming a container
            assert ro.list("list").copy() == [1, 2, 3]
            assert ro.namespace("namespace").x == 1
            assert ro.queue("queue").qsize() == 1
            for kind, calls in MUTATING_CALLS.items():
                for method, args in calls:
                    with pytest.raises(kvclient.ReadOnlyError):
                        ro.call(kind, kind, method, args)
            with pytest.raises(PermissionError):
                ro.dict("brand-new")  # creating is a change
            with pytest.raises(kvclient.ReadOnlyError):
                ro.drop("dict")
            with pytest.raises(kvclient.ReadOnlyError):
                ro.restore(before)
            with ro.batch() as b:
                b.dict("dict")["k"] = 99
                got = b.dict("dict").get("k")
            assert isinstance(b.results and b.results[0], kvclient.ReadOnlyError)
            assert got.value == 1
        with connect(srv.endpoint, authkey) as admin:
            assert admin.dump() == before
    finally:
        _stop(srv, thread)


# -- limits -----------------------------------------------------------------------------------


def test_connections_beyond_the_limit_are_refused_then_service_resumes(authkey: bytes) -> None:
    srv = KVManager(("127.0.0.1", 0), authkey=authkey, max_connections=10).get_server()
    thread = _serve(srv)
    try:
        with kvclient.connect(srv.endpoint, authkey) as kv:
            d = kv.dict("d")
            d["k"] = 1
            # 10 authenticated with the client; connections still authenticating do not count
            # (they have their own cap: see test_faults_wire's lockout test).
            held = [authed_connection(srv.endpoint, authkey) for _ in range(9)]
            extra = [raw_connection(srv.endpoint, hello=False) for _ in range(20)]
            for sock in extra:
                assert closed_by_peer(sock, timeout=5)  # refused at once
                sock.close()
            assert d["k"] == 1  # the existing client is unaffected
            for sock in held:
                sock.close()
            time.sleep(0.2)
            with kvclient.connect(srv.endpoint, authkey) as again:  # normal service resumes
                assert again.dict("d")["k"] == 1
            assert kv.stats()["refused_connections"] >= 20
    finally:
        _stop(srv, thread)


def test_idle_connections_are_closed(authkey: bytes) -> None:
    srv = KVManager(("127.0.0.1", 0), authkey=authkey, idle_timeout=0.5).get_server()
    thread = _serve(srv)
    try:
        sock = authed_connection(srv.endpoint, authkey)
        with sock:
            assert closed_by_peer(sock, timeout=10)
        with kvclient.connect(srv.endpoint, authkey) as kv:
            kv.dict("d")["k"] = 1
            time.sleep(1.5)  # idle past the limit: closed by the server...
            assert kv.dict("d")["k"] == 1  # ...and the client reconnects on its own
    finally:
        _stop(srv, thread)


def test_slowloris_does_not_starve_real_clients(authkey: bytes) -> None:
    srv = KVManager(("127.0.0.1", 0), authkey=authkey, handshake_timeout=1.0).get_server()
    thread = _serve(srv)
    stalled: list[socket.socket] = []
    try:
        for _ in range(500):
            sock = socket.create_connection(srv.address, timeout=10)
            sock.sendall(b"\x00")  # one byte of a length prefix, then nothing
            stalled.append(sock)
        start = time.monotonic()
        with kvclient.connect(srv.endpoint, authkey, timeout=5, retry=None) as kv:
            kv.dict("d")["k"] = 1
            assert kv.dict("d")["k"] == 1
        served_in = time.monotonic() - start
        assert served_in < 5  # generous: it takes milliseconds; the stalled ones cost no thread
        for sock in stalled:
            assert closed_by_peer(sock, timeout=10)  # each closed after the handshake timeout
    finally:
        for sock in stalled:
            sock.close()
        _stop(srv, thread)


# -- fuzzing ----------------------------------------------------------------------------------

small_text = st.text(alphabet="abcxyz_", max_size=4)
values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | small_text
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(small_text, inner, max_size=3),
    max_leaves=10,
)
methods = (
    st.sampled_from(
        sorted(
            KVDict.exposed
            | KVList.exposed
            | KVNamespace.exposed
            | KVQueue.exposed
            | {"create", "names", "drop", "batch", "ping", "stats", "dump", "restore", "nope"}
        )
    )
    | small_text
)
messages = st.one_of(
    st.tuples(
        st.none() | small_text | st.integers(min_value=0, max_value=9),
        methods,
        st.lists(values, max_size=4),
        st.none() | st.dictionaries(small_text, values, max_size=2),
    ).map(list),
    values,
)


@pytest.fixture(scope="module")
def fuzz_target() -> Iterator[tuple[Server, bytes]]:
    key = os.urandom(16).hex().encode()
    srv = KVManager(("127.0.0.1", 0), authkey=key).get_server()
    thread = _serve(srv)
    with kvclient.connect(srv.endpoint, key) as kv:
        kv.dict("SENTINEL")["k"] = [1, 2, 3]
        for kind in ("dict", "list", "namespace", "queue"):
            kv.call(None, None, "create", [kind, kind[0]])
    yield srv, key
    _stop(srv, thread)


@settings(
    max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(frames=st.lists(messages | st.binary(max_size=40), min_size=1, max_size=5))
def test_fuzzed_frames_get_documented_errors_and_the_server_survives(
    fuzz_target: tuple[Server, bytes], frames: list[Any]
) -> None:
    srv, key = fuzz_target
    codec = Codec()
    sock = authed_connection(srv.endpoint, key)
    with sock:
        for frame in frames:
            payload = frame if isinstance(frame, bytes) else msgpack.packb(frame, use_bin_type=True)
            try:
                send_frame(sock, payload)
                reply = recv_frame(sock)
            except (EOFError, ConnectionError):
                break  # the server closed this connection: allowed for undecodable frames
            kind, value = codec.unpack(reply)
            assert kind in ("#RETURN", "#ERROR")
            if kind == "#ERROR":
                assert isinstance(value, Exception)
                assert not isinstance(value, kvclient.RemoteError), value  # no internal errors
    with kvclient.connect(srv.endpoint, key) as kv:
        assert kv.dict("SENTINEL")["k"] == [1, 2, 3]
