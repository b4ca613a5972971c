"""Addresses and URLs: the parser's forms and refusals, then connect() with each to real servers."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

import kvclient
from kvproto.address import (
    AddressError,
    RedisTarget,
    Target,
    parse_address,
    parse_redis_url,
    parse_target,
)
from kvproto.tls import server_context
from kvserve import KVManager, Server
from tests.aio_adapter import Connect

HOME_KEYS = os.path.expanduser("~/.config/kvmanager")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:50000", Target("127.0.0.1", 50000)),
        ("db1", Target("db1", 50000)),
        ("[::1]:6000", Target("::1", 6000)),
        ("[::1]", Target("::1", 50000)),
        ("::1", Target("::1", 50000)),
        ("kv://db1:7", Target("db1", 7)),
        ("kv://db1:7/", Target("db1", 7)),
        ("KV://db1", Target("db1", 50000)),
        ("kv://[::1]:7", Target("::1", 7)),
        ("kvs://db1:7", Target("db1", 7, tls=True)),
        ("kv://prod@db1:7", Target("db1", 7, key_file=f"{HOME_KEYS}/prod.key")),
        ("kv:///etc/kv/key@db1:7", Target("db1", 7, key_file="/etc/kv/key")),
        ("kv://%2Fetc%2Fkv%2Fkey@db1:7", Target("db1", 7, key_file="/etc/kv/key")),
        (
            "kvs://~/keys/a.key@[fe80::1]:9",
            Target("fe80::1", 9, True, os.path.expanduser("~/keys/a.key")),
        ),
        (("h", 5), Target("h", 5)),
    ],
)
def test_accepted_forms(text: str | tuple[str, int], expected: Target) -> None:
    assert parse_target(text) == expected


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("host:port", "port must be a number, not 'port'"),
        ("h:70000", "port out of range"),
        ("h:-1", "port must be a number"),
        ("[::1:5", "missing ']'"),
        ("[::1]x", "unexpected 'x' after ']'"),
        ("kv://fe80::1", "needs brackets"),
        ("kv://", "no host"),
        ("kv://:5", "no host"),
        ("kv://db1:5/path", "no path, query or fragment"),
        ("kv://db1:5?x=1", "no path, query or fragment"),
        ("http://db1:5", "unknown scheme 'http://'"),
        ("db1:5/x", "not a host and port"),
        ("me@db1:5", "not a host and port"),
    ],
)
def test_malformed_addresses_say_what_form_is_expected(text: str, why: str) -> None:
    with pytest.raises(AddressError) as caught:
        parse_target(text)
    message = str(caught.value)
    assert why in message
    assert message.endswith(
        "write HOST:PORT, [IPv6]:PORT, kv://[KEY@]HOST:PORT or kvs://[KEY@]HOST:PORT"
    )


@pytest.mark.parametrize("scheme", ["redis", "rediss", "redis-cluster"])
def test_redis_schemes_are_for_connect_not_kvserve_targets(scheme: str) -> None:
    with pytest.raises(AddressError, match=f"^{scheme}:// addresses are for the Valkey/Redis"):
        parse_target(f"{scheme}://db1:6379")


@pytest.mark.parametrize(
    ("url", "env", "expected"),
    [
        ("redis://db1", {}, RedisTarget((("db1", 6379),), False, False)),
        ("redis://db1:7/3", {}, RedisTarget((("db1", 7),), False, False, 3)),
        ("rediss://[::1]:7", {}, RedisTarget((("::1", 7),), False, True)),
        (
            "redis://u:p%40ss@db1/",
            {},
            RedisTarget((("db1", 6379),), False, False, 0, "u", "p@ss"),
        ),
        (
            "redis-cluster://h1:7000,h2",
            {"REDIS_PASSWORD": "pw", "REDIS_USERNAME": "me"},
            RedisTarget((("h1", 7000), ("h2", 6379)), True, False, 0, "me", "pw"),
        ),
        ("valkey-clusters://:pw@h1:1", {}, RedisTarget((("h1", 1),), True, True, 0, None, "pw")),
    ],
)
def test_redis_urls_parse(url: str, env: dict[str, str], expected: RedisTarget) -> None:
    assert parse_redis_url(url, env) == expected


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("redis://h1,h2", "several hosts need redis-cluster://"),
        ("redis-cluster://h1/2", "only database 0"),
        ("redis://h1/x", "must be a number"),
        ("redis://:secret@h1:99999", "port out of range"),
        ("redis://h1?db=2", "query strings"),
        ("kv://h1", "not a redis://"),
    ],
)
def test_bad_redis_urls_say_why_and_never_show_the_password(url: str, why: str) -> None:
    with pytest.raises(AddressError, match=why) as caught:
        parse_redis_url(url, {})
    assert "secret" not in str(caught.value)


@pytest.mark.parametrize("userinfo", ["user:secret", "a:", "bad name", "-x"])
def test_userinfo_names_a_key_and_never_holds_one(userinfo: str) -> None:
    with pytest.raises(AddressError) as caught:
        parse_target(f"kv://{userinfo}@db1:5")
    assert "secret" not in str(caught.value)


def test_parse_address_leaves_tls_and_key_files_to_connect() -> None:
    assert parse_address("kv://db1:5") == ("db1", 5)
    with pytest.raises(ValueError, match=r"kvclient\.connect\(\)"):
        parse_address("kvs://db1:5")
    with pytest.raises(ValueError, match=r"kvclient\.connect\(\)"):
        parse_address("kv://prod@db1:5")


# -- connect() with each form, to real servers -----------------------------------------------


def test_connect_takes_a_kv_url(server: Server, authkey: bytes) -> None:
    host, port = server.address
    with kvclient.connect(f"kv://{host}:{port}", authkey) as kv:
        kv.dict("d")["k"] = 1
        assert kv.endpoint == server.endpoint


def test_connect_takes_an_ipv6_url(authkey: bytes) -> None:
    try:
        srv = KVManager(("::1", 0), authkey=authkey).get_server()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        port = srv.address[1]
        for address in (f"kv://[::1]:{port}", f"[::1]:{port}"):
            with kvclient.connect(address, authkey) as kv:
                assert kv.address == ("::1", port)
                kv.ping()
    finally:
        srv.stop()
        srv.wait_stopped(10)
        thread.join(10)


def test_url_key_name_reads_the_key_file_under_home(
    connect: Connect,
    server: Server,
    authkey: bytes,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("KV_AUTHKEY", "a wrong key that the URL must win over")
    keys = tmp_path / ".config" / "kvmanager"
    keys.mkdir(parents=True)
    (keys / "prod.key").write_bytes(authkey + b"\n")
    (tmp_path / "other.key").write_bytes(b"not the key at all, 32 bytes....")
    host, port = server.address
    with connect(f"kv://prod@{host}:{port}") as kv:
        kv.ping()
    with pytest.raises(kvclient.AuthError, match="rejected"):
        connect(f"kv://~/other.key@{host}:{port}")
    with pytest.raises(kvclient.AuthError, match=r"missing\.key does not exist"):
        connect(f"kv://missing@{host}:{port}")
    with pytest.raises(ValueError, match="give one of them"):
        connect(f"kv://prod@{host}:{port}", authkey)


def test_kv_address_env_takes_a_url(
    server: Server, authkey: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    host, port = server.address
    monkeypatch.setenv("KV_ADDRESS", f"kv://{host}:{port}")
    with kvclient.connect(authkey=authkey) as kv:
        assert kv.endpoint == server.endpoint
    monkeypatch.setenv("KV_ADDRESS", "redis://db1:6379")
    with pytest.raises(ValueError, match="authkey= is kvserve's"):
        kvclient.connect(authkey=authkey)


@pytest.fixture
def tls_pki(tmp_path: Path) -> dict[str, Path]:
    ca = trustme.CA()
    paths = {"ca": tmp_path / "ca.pem", "server": tmp_path / "server.pem"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(paths["server"]))
    return paths


@pytest.fixture
def tls_server(authkey: bytes, tls_pki: dict[str, Path]) -> Iterator[Server]:
    srv = KVManager(
        ("127.0.0.1", 0), authkey=authkey, tls=server_context(tls_pki["server"])
    ).get_server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.stop()
    srv.wait_stopped(10)
    thread.join(10)


def test_kvs_url_turns_tls_on(
    connect: Connect,
    tls_server: Server,
    authkey: bytes,
    tls_pki: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("KV_TLS_CA", "KV_TLS_CERT", "KV_TLS_KEY"):
        monkeypatch.delenv(name, raising=False)
    url = f"kvs://{tls_server.endpoint}"
    with connect(url, authkey, ca=tls_pki["ca"], retry=None) as kv:
        kv.ping()
    # The same server as kv://, without a CA: plain TCP to a TLS server fails.
    with pytest.raises(kvclient.KVError):
        connect(f"kv://{tls_server.endpoint}", authkey, timeout=3, retry=None)
    # kvs:// without a CA trusts the system's CAs, which do not know this test CA.
    with pytest.raises(kvclient.TLSError):
        connect(url, authkey, timeout=3, retry=None)
    with pytest.raises(ValueError, match="tls=False refuses it"):
        connect(url, authkey, tls=False)
