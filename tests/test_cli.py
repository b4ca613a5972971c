"""`kvctl` against live servers: every command's exact output and exit code, then real processes.

CliRunner tests run the typer app in this process against the threaded `server` fixture; the
subprocess tests run the installed `kvctl` script against a `kvserve` process, as a user would.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

import kvclient
from kvclient.cli import EXIT_ERROR, EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE, app
from kvclient.proxies import to_ref
from kvproto.codec import Codec
from kvserve import KVManager
from tests.conftest import ServerProcess, read_listening_line, start_kvserve

Kvctl = Callable[..., Result]

runner = CliRunner()
# Unset whatever the developer's shell exports, so that tests see only what they pass.
_NO_ENV: dict[str, str | None] = {
    "KV_ADDRESS": None,
    "KV_AUTHKEY": None,
    "KV_AUTHKEY_FILE": None,
    "KV_TIMEOUT": None,
    "KV_TLS_CA": None,
    "KV_TLS_CERT": None,
    "KV_TLS_KEY": None,
}


def invoke(
    args: list[str], env: dict[str, str | None] | None = None, input: bytes | None = None
) -> Result:
    # catch_exceptions=False: an exception escaping the CLI must fail the test, not pass as
    # CliRunner's exit code 1, which is also kvctl's "not found".
    return runner.invoke(
        app, args, env={**_NO_ENV, **(env or {})}, catch_exceptions=False, input=input
    )


@pytest.fixture
def kvctl(address: str, authkey: bytes, tmp_path: Path) -> Kvctl:
    """Run `kvctl --address ADDRESS ARGS...` with the key in KV_AUTHKEY, as a script would."""

    def run(*args: str, env: dict[str, str | None] | None = None) -> Result:
        base: dict[str, str | None] = {
            "KV_AUTHKEY": authkey.decode(),
            "HOME": str(tmp_path / "home"),
        }
        return invoke(["--address", address, *args], {**base, **(env or {})})

    return run


def ok(result: Result, stdout: str = "") -> None:
    assert (result.exit_code, result.stderr) == (EXIT_OK, "")
    assert result.stdout == stdout


def fails(result: Result, code: int, stderr: str, stdout: str = "") -> None:
    assert result.exit_code == code
    assert result.stderr == stderr
    assert result.stdout == stdout


def free_port() -> int:
    """A loopback port nothing listens on (bound by the OS, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- dict keys -----------------------------------------------------------------------------


def test_set_then_get_a_str(kvctl: Kvctl, kv: kvclient.Client) -> None:
    ok(kvctl("set", "greeting", "hello world"))
    assert kv.dict("default")["greeting"] == "hello world"
    ok(kvctl("get", "greeting"), "hello world\n")


def test_a_plain_value_is_stored_as_a_str(kvctl: Kvctl, kv: kvclient.Client) -> None:
    ok(kvctl("set", "n", "5"))
    ok(kvctl("set", "neg", "-5"))  # a value starting with "-" is not an option here
    assert kv.dict("default").copy() == {"n": "5", "neg": "-5"}
    ok(kvctl("get", "n"), "5\n")
    ok(kvctl("get", "n", "--json"), '"5"\n')


@pytest.mark.parametrize(
    ("text", "stored", "printed"),
    [
        ("5", 5, "5"),
        ("-12.5", -12.5, "-12.5"),
        ("123456789012345678901234567890", 123456789012345678901234567890, None),
        ('[1, "x", null, true]', [1, "x", None, True], None),
        ('{"rps": 50, "burst": [1, 2]}', {"rps": 50, "burst": [1, 2]}, None),
        ('"quoted"', "quoted", "quoted"),
        ("null", None, None),
    ],
)
def test_set_json_stores_the_json_value(
    kvctl: Kvctl, kv: kvclient.Client, text: str, stored: Any, printed: str | None
) -> None:
    ok(kvctl("set", "--json", "k", text))
    value = kv.dict("default")["k"]
    assert value == stored
    assert type(value) is type(stored)
    ok(kvctl("get", "k"), f"{text if printed is None else printed}\n")


def test_the_global_json_flag_works_like_the_command_flag(
    kvctl: Kvctl, kv: kvclient.Client
) -> None:
    ok(kvctl("-j", "set", "k", "[1, 2]"))
    assert kv.dict("default")["k"] == [1, 2]
    ok(kvctl("-j", "set", "s", '"text"'))
    ok(kvctl("-j", "get", "s"), '"text"\n')
    ok(kvctl("get", "s"), "text\n")


def test_get_prints_str_raw_and_anything_else_as_json_bytes_as_base64(
    kvctl: Kvctl, kv: kvclient.Client
) -> None:
    d = kv.dict("default")
    d["s"] = 'line with "quotes"'
    d["blob"] = b"\x00\x01hi"
    d["tuple"] = (1, b"a", {"k": None})
    d["keys"] = {1: "int", ("t", 2): "tuple", b"x": "bytes"}
    d["float"] = 0.5
    d["bool"] = False
    expected = {
        "s": ('line with "quotes"', '"line with \\"quotes\\""'),
        "blob": ('"AAFoaQ=="', '"AAFoaQ=="'),
        "tuple": ('[1, "YQ==", {"k": null}]', '[1, "YQ==", {"k": null}]'),
        "keys": ('{"1": "int", "[\\"t\\", 2]": "tuple", "eA==": "bytes"}',) * 2,
        "float": ("0.5", "0.5"),
        "bool": ("false", "false"),
    }
    for key, (plain, as_json) in expected.items():
        ok(kvctl("get", key), plain + "\n")
        ok(kvctl("get", key, "--json"), as_json + "\n")


def test_get_a_missing_key_exits_1(kvctl: Kvctl) -> None:
    ok(kvctl("set", "k", "v"))
    fails(kvctl("get", "nope"), EXIT_NOT_FOUND, "KeyError: no key 'nope' in dict 'default'\n")
    fails(
        kvctl("get", "-d", "default", "--json", "nope"),
        EXIT_NOT_FOUND,
        "KeyError: no key 'nope' in dict 'default'\n",
    )


def test_dict_option_picks_the_dict(kvctl: Kvctl, kv: kvclient.Client) -> None:
    ok(kvctl("set", "-d", "sessions", "4f2a", "alice"))
    ok(kvctl("set", "--dict", "other", "4f2a", "bob"))
    assert kv.dict("sessions").copy() == {"4f2a": "alice"}
    assert kv.dict("other").copy() == {"4f2a": "bob"}
    ok(kvctl("get", "4f2a", "--dict", "sessions"), "alice\n")


def test_del_prints_how_many_existed(kvctl: Kvctl, kv: kvclient.Client) -> None:
    kv.dict("default").update(a=1, b=2, c=3, d=4)
    ok(kvctl("del", "a", "b"), "2\n")
    # Some missing: still a success, the count says how many there were.
    ok(kvctl("del", "c", "x", "y"), "1\n")
    fails(
        kvctl("del", "x", "y"),
        EXIT_NOT_FOUND,
        "KeyError: none of the 2 keys were in dict 'default'\n",
        stdout="0\n",
    )
    fails(kvctl("del", "c"), EXIT_NOT_FOUND, "KeyError: no key 'c' in dict 'default'\n", "0\n")
    assert kv.dict("default").copy() == {"d": 4}


def test_del_strict_fails_if_any_key_was_missing(kvctl: Kvctl, kv: kvclient.Client) -> None:
    kv.dict("default").update(a=1, b=2)
    fails(
        kvctl("del", "--strict", "a", "x", "y"),
        EXIT_NOT_FOUND,
        "KeyError: 2 of 3 keys were not in dict 'default'\n",
        stdout="1\n",
    )
    assert kv.dict("default").copy() == {"b": 2}  # the ones there are deleted all the same
    ok(kvctl("del", "b", "--strict"), "1\n")


def test_keys_with_and_without_a_glob(kvctl: Kvctl, kv: kvclient.Client) -> None:
    d = kv.dict("default")
    d.update({"user:1": "a", "admin": "b", "user:2": "c"})
    d[7] = "an int key, from Python"
    ok(kvctl("keys"), "user:1\nadmin\nuser:2\n7\n")
    ok(kvctl("keys", "user:*"), "user:1\nuser:2\n")
    ok(kvctl("keys", "[7a]*"), "admin\n7\n")
    ok(kvctl("keys", "nothing*"), "")
    ok(kvctl("keys", "--json"), '["user:1", "admin", "user:2", 7]\n')
    ok(kvctl("keys", "--json", "nothing*"), "[]\n")


def test_incr(kvctl: Kvctl, kv: kvclient.Client) -> None:
    ok(kvctl("incr", "hits"), "1\n")
    ok(kvctl("incr", "hits", "5"), "6\n")
    ok(kvctl("incr", "hits", "-10"), "-4\n")
    ok(kvctl("incr", "hits", "0.5", "--json"), "-3.5\n")
    ok(kvctl("incr", "-d", "counters", "home"), "1\n")
    assert kv.dict("default")["hits"] == -3.5
    assert kv.dict("counters")["home"] == 1


def test_incr_of_a_str_is_a_server_error(kvctl: Kvctl) -> None:
    ok(kvctl("set", "name", "alice"))
    result = kvctl("incr", "name")
    assert result.exit_code == EXIT_ERROR
    assert result.stderr == "TypeError: the value at 'name' is str, not a number\n"


def test_cas(kvctl: Kvctl, kv: kvclient.Client) -> None:
    d = kv.dict("default")
    d["leader"] = "node-a"
    ok(kvctl("cas", "leader", "node-a", "node-b"))
    assert d["leader"] == "node-b"
    fails(
        kvctl("cas", "leader", "node-a", "node-c"),
        EXIT_NOT_FOUND,
        "CasMismatch: 'leader' in dict 'default' is missing or does not hold \"node-a\"; "
        "nothing was changed\n",
    )
    assert d["leader"] == "node-b"
    fails(
        kvctl("cas", "missing", "x", "y"),
        EXIT_NOT_FOUND,
        "CasMismatch: 'missing' in dict 'default' is missing or does not hold \"x\"; "
        "nothing was changed\n",
    )
    assert "missing" not in d


def test_cas_json_compares_types_strictly(kvctl: Kvctl, kv: kvclient.Client) -> None:
    d = kv.dict("default")
    d["version"] = 1
    fails(
        kvctl("cas", "--json", "version", "1.0", "2"),
        EXIT_NOT_FOUND,
        "CasMismatch: 'version' in dict 'default' is missing or does not hold 1.0; "
        "nothing was changed\n",
    )
    fails(  # without --json, "1" is a str and never matches the int 1
        kvctl("cas", "version", "1", "2"),
        EXIT_NOT_FOUND,
        "CasMismatch: 'version' in dict 'default' is missing or does not hold \"1\"; "
        "nothing was changed\n",
    )
    ok(kvctl("cas", "--json", "version", "1", "-2"))
    assert d["version"] == -2


def test_mget(kvctl: Kvctl, kv: kvclient.Client) -> None:
    kv.dict("default").update(host="db1", port=5432, tags=["a"])
    ok(kvctl("mget", "port", "host"), '{"port": 5432, "host": "db1"}\n')
    ok(kvctl("mget", "--json", "tags"), '{"tags": ["a"]}\n')
    fails(
        kvctl("mget", "host", "nope", "host", "zz"),
        EXIT_NOT_FOUND,
        "KeyError: no keys 'nope', 'zz' in dict 'default'\n",
        stdout='{"host": "db1"}\n',
    )
    fails(
        kvctl("mget", "nope"),
        EXIT_NOT_FOUND,
        "KeyError: no key 'nope' in dict 'default'\n",
        stdout="{}\n",
    )


def test_mset(kvctl: Kvctl, kv: kvclient.Client) -> None:
    ok(kvctl("mset", "host", "db1", "port", "5432"))
    assert kv.dict("default").copy() == {"host": "db1", "port": "5432"}
    ok(kvctl("mset", "--json", "-d", "cfg", "port", "5432", "tags", '["a", "b"]'))
    assert kv.dict("cfg").copy() == {"port": 5432, "tags": ["a", "b"]}


def test_mset_needs_pairs_and_stores_nothing_otherwise(kvctl: Kvctl, kv: kvclient.Client) -> None:
    fails(
        kvctl("mset", "a", "1", "b"),
        EXIT_USAGE,
        "Usage: kvctl mset [OPTIONS] {KEY VALUE}...\n"
        "Try 'kvctl mset -h' for help.\n\n"
        "Error: Invalid value for 'KEY VALUE': needs KEY VALUE pairs, got 3 arguments\n",
    )
    result = kvctl("mset", "--json", "-d", "cfg", "a", "1", "b", "{nope")
    assert result.exit_code == EXIT_USAGE
    assert "Error: Invalid value for 'VALUE' of 'b': '{nope' is not valid JSON" in result.stderr
    assert kv.names() == {}


# -- values that are not JSON under --json: exit 2, clear message, nothing stored ------------


def test_invalid_json_message(kvctl: Kvctl) -> None:
    fails(
        kvctl("set", "--json", "k", "{x"),
        EXIT_USAGE,
        "Usage: kvctl set [OPTIONS] {KEY} {VALUE}\n"
        "Try 'kvctl set -h' for help.\n\n"
        "Error: Invalid value for 'VALUE': '{x' is not valid JSON (Expecting property name "
        "enclosed in double quotes at column 2); quote a str as '\"text\"', or leave out "
        "--json to store the text as is\n",
    )


@pytest.mark.parametrize(
    "args",
    [
        ["set", "--json", "k", "hello"],
        ["-j", "set", "k", "hello"],
        ["mset", "--json", "a", "1", "b", "[1,"],
        ["cas", "--json", "k", "1", "{x"],
        ["list", "push", "--json", "l", "1", "nope"],
        ["queue", "put", "--json", "q", "'single'"],
        ["ns", "set", "--json", "n", "attr", "True"],
    ],
)
def test_invalid_json_exits_2_and_stores_nothing(
    kvctl: Kvctl, kv: kvclient.Client, args: list[str]
) -> None:
    result = kvctl(*args)
    assert result.exit_code == EXIT_USAGE
    assert result.stdout == ""
    assert "is not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr
    assert kv.names() == {}


# -- reading never creates; kinds are checked -----------------------------------------------


@pytest.mark.parametrize(
    ("args", "kind"),
    [
        (["get", "-d", "ghost", "k"], "dict"),
        (["keys", "-d", "ghost"], "dict"),
        (["mget", "-d", "ghost", "k"], "dict"),
        (["del", "-d", "ghost", "k"], "dict"),
        (["cas", "-d", "ghost", "k", "a", "b"], "dict"),
        (["list", "pop", "ghost"], "list"),
        (["list", "range", "ghost"], "list"),
        (["list", "len", "ghost"], "list"),
        (["queue", "size", "ghost"], "queue"),
        (["ns", "get", "ghost", "attr"], "namespace"),
        (["ns", "show", "ghost"], "namespace"),
    ],
)
def test_reading_a_missing_container_exits_1_and_creates_nothing(
    kvctl: Kvctl, kv: kvclient.Client, address: str, args: list[str], kind: str
) -> None:
    fails(
        kvctl(*args),
        EXIT_NOT_FOUND,
        f"NoSuchContainerError: no {kind} named 'ghost' on {address}; kvctl names lists them\n",
    )
    assert kv.names() == {}


def test_a_container_of_another_kind_exits_3(kvctl: Kvctl, kv: kvclient.Client) -> None:
    kv.list("jobs").append("build")
    fails(
        kvctl("get", "-d", "jobs", "k"),
        EXIT_ERROR,
        "KindError: 'jobs' is a list, not a dict; read it with kvctl list range jobs\n",
    )
    kv.dict("cfg")
    fails(
        kvctl("list", "len", "cfg"),
        EXIT_ERROR,
        "KindError: 'cfg' is a dict, not a list; read it with kvctl keys -d cfg\n",
    )
    result = kvctl("set", "-d", "jobs", "k", "v")  # writes: the server refuses, same exit code
    assert result.exit_code == EXIT_ERROR
    assert result.stderr.startswith("KindError: 'jobs' already exists as a list, not a dict")
    assert kv.list("jobs").copy() == ["build"]


# -- lists ---------------------------------------------------------------------------------


def test_list_commands(kvctl: Kvctl, kv: kvclient.Client) -> None:
    ok(kvctl("list", "push", "jobs", "build", "test", "deploy"))
    ok(kvctl("list", "push", "--json", "jobs", "1", "--", "-2"))
    assert kv.list("jobs").copy() == ["build", "test", "deploy", 1, -2]
    ok(kvctl("list", "range", "jobs"), "build\ntest\ndeploy\n1\n-2\n")
    ok(kvctl("list", "range", "jobs", "-2"), "1\n-2\n")
    ok(kvctl("list", "range", "jobs", "1", "3"), "test\ndeploy\n")
    ok(kvctl("list", "range", "jobs", "0", "-3"), "build\ntest\n")
    ok(kvctl("list", "range", "jobs", "9"), "")
    ok(kvctl("list", "range", "--json", "jobs", "2"), '["deploy", 1, -2]\n')
    ok(kvctl("list", "len", "jobs"), "5\n")
    ok(kvctl("list", "pop", "jobs"), "-2\n")
    ok(kvctl("list", "pop", "jobs", "--index", "0"), "build\n")
    ok(kvctl("list", "pop", "jobs", "-i", "-2", "--json"), '"deploy"\n')
    fails(
        kvctl("list", "pop", "jobs", "--index", "5"),
        EXIT_NOT_FOUND,
        "IndexError: no index 5 in list 'jobs'\n",
    )
    assert kv.list("jobs").copy() == ["test", 1]


def test_list_pop_on_an_empty_list_exits_1(kvctl: Kvctl, kv: kvclient.Client) -> None:
    kv.list("jobs")
    fails(kvctl("list", "pop", "jobs"), EXIT_NOT_FOUND, "IndexError: list 'jobs' is empty\n")
    ok(kvctl("list", "len", "jobs"), "0\n")


# -- queues --------------------------------------------------------------------------------


def test_queue_commands(kvctl: Kvctl, kv: kvclient.Client) -> None:
    ok(kvctl("queue", "put", "jobs", "build", "test"))
    ok(kvctl("queue", "put", "--json", "jobs", '{"id": 7}'))
    ok(kvctl("queue", "size", "jobs"), "3\n")
    ok(kvctl("queue", "get", "jobs"), "build\n")
    ok(kvctl("queue", "get", "jobs", "--json"), '"test"\n')
    ok(kvctl("queue", "get", "jobs", "--no-wait"), '{"id": 7}\n')
    ok(kvctl("queue", "size", "--json", "jobs"), "0\n")
    assert kv.queue("jobs").qsize() == 0


def test_queue_get_on_an_empty_queue_exits_1(kvctl: Kvctl, kv: kvclient.Client) -> None:
    fails(
        kvctl("queue", "get", "jobs", "--no-wait"),
        EXIT_NOT_FOUND,
        "queue.Empty: queue 'jobs' is empty\n",
    )
    assert "jobs" not in kv.names()  # --no-wait on a missing queue creates nothing
    kv.queue("jobs")
    fails(
        kvctl("queue", "get", "jobs", "--no-wait"),
        EXIT_NOT_FOUND,
        "queue.Empty: queue 'jobs' is empty\n",
    )
    kv.dict("notaqueue")["k"] = 1
    result = kvctl("queue", "get", "notaqueue", "--no-wait")
    assert result.exit_code == EXIT_ERROR
    assert result.stderr.startswith("KindError: 'notaqueue' is a dict, not a queue")
    started = time.monotonic()
    fails(
        kvctl("queue", "get", "jobs", "--timeout", "0.3"),
        EXIT_NOT_FOUND,
        "queue.Empty: no item came into queue 'jobs' within 0.3 s\n",
    )
    assert 0.25 < time.monotonic() - started < 5


def test_queue_get_waits_for_a_producer(kvctl: Kvctl, address: str, authkey: bytes) -> None:
    def produce() -> None:
        time.sleep(0.3)
        with kvclient.connect(address, authkey) as client:
            client.queue("jobs").put({"id": 1})

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        ok(kvctl("queue", "get", "jobs"), '{"id": 1}\n')  # no timeout: waits for ever
    finally:
        producer.join(10)


def test_queue_put_on_a_full_bounded_queue_exits_1(kvctl: Kvctl, kv: kvclient.Client) -> None:
    kv.queue("small", maxsize=1).put("first")
    fails(
        kvctl("queue", "put", "small", "x", "--no-wait"),
        EXIT_NOT_FOUND,
        "queue.Full: queue 'small' stayed full\n",
    )
    fails(
        kvctl("queue", "put", "small", "x", "--timeout", "0.2"),
        EXIT_NOT_FOUND,
        "queue.Full: queue 'small' stayed full for 0.2 s\n",
    )
    assert kv.queue("small").qsize() == 1


def test_queue_timeout_and_no_wait_together_is_a_usage_error(kvctl: Kvctl) -> None:
    fails(
        kvctl("queue", "get", "jobs", "--timeout", "1", "--no-wait"),
        EXIT_USAGE,
        "Usage: kvctl queue get [OPTIONS] {NAME}\n"
        "Try 'kvctl queue get -h' for help.\n\n"
        "Error: Invalid value for '--no-wait': give either --timeout or --no-wait, not both\n",
    )


# -- namespaces ----------------------------------------------------------------------------


def test_namespace_commands(kvctl: Kvctl, kv: kvclient.Client) -> None:
    ok(kvctl("ns", "set", "config", "mode", "fast"))
    ok(kvctl("ns", "set", "--json", "config", "workers", "8"))
    ok(kvctl("ns", "set", "config", "name", "prod"))  # not the proxy's own attribute
    ok(kvctl("ns", "set", "config", "incr", "-1"))
    assert kv.namespace("config").to_dict() == {
        "mode": "fast",
        "workers": 8,
        "name": "prod",
        "incr": "-1",
    }
    ok(kvctl("ns", "get", "config", "mode"), "fast\n")
    ok(kvctl("ns", "get", "config", "workers"), "8\n")
    ok(kvctl("ns", "get", "config", "name"), "prod\n")
    ok(kvctl("ns", "get", "--json", "config", "incr"), '"-1"\n')
    ok(
        kvctl("ns", "show", "config"),
        '{"mode": "fast", "workers": 8, "name": "prod", "incr": "-1"}\n',
    )
    fails(
        kvctl("ns", "get", "config", "nope"),
        EXIT_NOT_FOUND,
        "AttributeError: namespace 'config' has no attribute 'nope'\n",
    )


def test_namespace_private_names_are_a_usage_error(kvctl: Kvctl, kv: kvclient.Client) -> None:
    result = kvctl("ns", "set", "config", "_secret", "x")
    assert result.exit_code == EXIT_USAGE
    assert "Error: Invalid value for 'ATTR': names starting with '_'" in result.stderr
    assert kv.names() == {}


# -- locks and values ----------------------------------------------------------------------


def test_lock_status_of_a_free_and_a_held_lock(kvctl: Kvctl, kv: kvclient.Client) -> None:
    fails(
        kvctl("lock", "status", "deploy"),
        EXIT_NOT_FOUND,
        f"NoSuchContainerError: no lock named 'deploy' on {kv.endpoint}; kvctl names lists them\n",
    )
    lock = kv.lock("deploy")
    ok(
        kvctl("lock", "status", "deploy"),
        "kind        lock\nlocked      no\nholder      -\nlast token  0\nwaiters     0\n",
    )
    assert lock.acquire() is True
    token = lock.token
    result = kvctl("lock", "status", "deploy")
    assert (result.exit_code, result.stderr) == (EXIT_OK, "")
    assert re.fullmatch(
        "kind        lock\n"
        "locked      yes\n"
        f"holder      {kv.owner_id}\n"
        r"since       \d{4}-\d\d-\d\d \d\d:\d\d:\d\d[+-]\d\d:\d\d\n"
        f"token       {token}\n"
        r"lease       (29\.\d|30\.0) s left\n"
        f"last token  {token}\n"
        "waiters     0\n",
        result.stdout,
    ), result.stdout
    status = json.loads(kvctl("lock", "status", "--json", "deploy").stdout)
    assert (status["name"], status["kind"], status["locked"]) == ("deploy", "lock", True)
    assert [(h["owner"], h["token"]) for h in status["holders"]] == [(kv.owner_id, token)]
    assert (status["last_token"], status["waiters"]) == (token, 0)
    lock.release()


def test_lock_status_counts_waiters_and_semaphore_slots(
    kvctl: Kvctl, kv: kvclient.Client, address: str, authkey: bytes
) -> None:
    lock = kv.lock("busy")
    lock.acquire()
    with kvclient.connect(address, authkey) as other:
        waiter = threading.Thread(target=lambda: other.lock("busy").acquire(timeout=5))
        waiter.start()
        deadline = time.monotonic() + 5
        while json.loads(kvctl("lock", "status", "--json", "busy").stdout)["waiters"] != 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        lock.release()
        waiter.join(10)
    slots = kv.semaphore("pool", 3)
    slots.acquire()
    slots.acquire()
    result = kvctl("lock", "status", "pool")
    assert result.exit_code == EXIT_OK
    assert "kind        semaphore\n" in result.stdout
    assert "token       1 2\n" in result.stdout
    fails(
        kvctl("lock", "status", "pool-value"),
        EXIT_NOT_FOUND,
        f"NoSuchContainerError: no lock named 'pool-value' on {address}; kvctl names lists them\n",
    )
    kv.value("pool-value", 0)
    fails(
        kvctl("lock", "status", "pool-value"),
        EXIT_ERROR,
        "KindError: 'pool-value' is a value, not a lock; read it with kvctl value get pool-value\n",
    )
    fails(
        kvctl("get", "-d", "pool", "k"),
        EXIT_ERROR,
        "KindError: 'pool' is a semaphore, not a dict; read it with kvctl lock status pool\n",
    )


def test_value_commands(kvctl: Kvctl, kv: kvclient.Client, address: str) -> None:
    fails(
        kvctl("value", "get", "hits"),
        EXIT_NOT_FOUND,
        f"NoSuchContainerError: no value named 'hits' on {address}; kvctl names lists them\n",
    )
    ok(kvctl("value", "incr", "hits"), "1\n")
    ok(kvctl("value", "incr", "hits", "-3"), "-2\n")
    ok(kvctl("value", "get", "hits"), "-2\n")
    ok(kvctl("value", "set", "hits", "40"))
    ok(kvctl("value", "incr", "hits", "2"), "42\n")
    assert (kv.value("hits", 0).value, kv.value("hits", 0).typecode) == (42, "q")
    fails(
        kvctl("value", "set", "hits", "0.5"),
        EXIT_ERROR,
        "TypeError: 'float' object cannot be interpreted as an integer\n",
    )
    ok(kvctl("value", "set", "ratio", "0.5"))
    ok(kvctl("value", "get", "--json", "ratio"), "0.5\n")
    kv.value("letter", "u", "a")
    ok(kvctl("value", "set", "--json", "letter", '"b"'))
    ok(kvctl("value", "get", "letter"), "b\n")
    result = kvctl("value", "set", "hits", "abc")
    assert result.exit_code == EXIT_USAGE
    assert "Error: Invalid value: 'abc' is not a number\n" in result.stderr
    fails(
        kvctl("value", "set", "--json", "word", '"x"'),
        EXIT_ERROR,
        "ValueError: no Value named 'word' yet, and a new one takes its type from VALUE, which "
        'must then be a number or true/false, not "x"\n',
    )
    assert "word" not in kv.names()


# -- the server ----------------------------------------------------------------------------


def test_names_table_and_json(kvctl: Kvctl, kv: kvclient.Client) -> None:
    ok(kvctl("names"), "NAME  KIND  SIZE\n")
    ok(kvctl("names", "--json"), "{}\n")
    kv.dict("sessions").update(a=1, b=2)
    kv.list("jobs").extend([1, 2, 3])
    kv.queue("work")
    kv.namespace("config").mode = "fast"
    ok(
        kvctl("names"),
        "NAME      KIND       SIZE\n"
        "config    namespace  1\n"
        "jobs      list       3\n"
        "sessions  dict       2\n"
        "work      queue      0\n",
    )
    assert json.loads(kvctl("names", "--json").stdout) == {
        "config": {"kind": "namespace", "size": 1},
        "jobs": {"kind": "list", "size": 3},
        "sessions": {"kind": "dict", "size": 2},
        "work": {"kind": "queue", "size": 0},
    }


def test_drop(kvctl: Kvctl, kv: kvclient.Client, address: str) -> None:
    kv.list("jobs").append(1)
    ok(kvctl("drop", "jobs"))
    assert kv.names() == {}
    fails(
        kvctl("drop", "jobs"),
        EXIT_NOT_FOUND,
        f"NoSuchContainerError: no container named 'jobs' on {address}\n",
    )


def test_ping(kvctl: Kvctl) -> None:
    result = kvctl("ping")
    assert (result.exit_code, result.stderr) == (EXIT_OK, "")
    assert re.fullmatch(r"pong \d+\.\d\d ms\n", result.stdout)
    result = kvctl("ping", "--json")
    assert result.exit_code == EXIT_OK
    reply = json.loads(result.stdout)
    assert list(reply) == ["rtt_ms"]
    assert 0 < reply["rtt_ms"] < 5000


def test_stats(kvctl: Kvctl, kv: kvclient.Client) -> None:
    kv.dict("d").update(a=1, b=2)
    kv.list("l").append(1)
    result = kvctl("stats")
    assert (result.exit_code, result.stderr) == (EXIT_OK, "")
    lines = result.stdout.splitlines()
    rows = dict(line.split(None, 1) for line in lines)
    # The server may add facts; these six come first, in this order, values in one column.
    assert list(rows)[:6] == ["version", "uptime", "clients", "containers", "keys", "ops"]
    assert len({len(line) - len(rows[line.split()[0]]) for line in lines}) == 1
    assert rows["version"] == kvclient.__version__
    assert re.fullmatch(r"\d+\.\d s", rows["uptime"])
    assert rows["clients"] == "2"  # the kv fixture and this command
    assert (rows["containers"], rows["keys"]) == ("2", "3")
    assert int(rows["ops"]) > 0
    facts = json.loads(kvctl("stats", "--json").stdout)
    assert list(facts)[:6] == ["version", "uptime", "clients", "containers", "keys", "ops"]
    assert (facts["containers"], facts["keys"]) == (2, 3)
    assert facts["ops"] > 0


def test_version() -> None:
    result = invoke(["--version"])
    assert (result.exit_code, result.stdout) == (EXIT_OK, f"kvctl {kvclient.__version__}\n")


# -- connection, authkey, errors -----------------------------------------------------------


def test_unreachable_address_exits_3_with_the_address_and_the_fix(authkey: bytes) -> None:
    port = free_port()
    fails(
        invoke(["--address", f"127.0.0.1:{port}", "get", "k"], {"KV_AUTHKEY": authkey.decode()}),
        EXIT_ERROR,
        f"KVConnectionError: could not connect to 127.0.0.1:{port} (connection refused); "
        "is kvserve running? (for other hosts it must listen on them: kvserve --host 0.0.0.0)\n",
    )


def test_address_and_timeout_from_the_environment(
    address: str, authkey: bytes, kv: kvclient.Client
) -> None:
    ok(invoke(["set", "k", "v"], {"KV_ADDRESS": address, "KV_AUTHKEY": authkey.decode()}))
    assert kv.dict("default")["k"] == "v"
    env: dict[str, str | None] = {
        "KV_ADDRESS": address,
        "KV_AUTHKEY": authkey.decode(),
        "KV_TIMEOUT": "2.5",
    }
    ok(invoke(["get", "k"], env), "v\n")
    result = invoke(["get", "k"], dict(env, KV_TIMEOUT="soon"))
    assert result.exit_code == EXIT_USAGE
    assert "Invalid value for '--timeout' (env var: 'KV_TIMEOUT'): 'soon' is not a number" in (
        result.stderr
    )


def test_wrong_authkey_exits_3_and_never_shows_the_key(kvctl: Kvctl, address: str) -> None:
    wrong = "wrong-key-0123456789abcdef"
    result = kvctl("get", "k", env={"KV_AUTHKEY": wrong})
    fails(
        result,
        EXIT_ERROR,
        f"AuthError: {address}: the server rejected the authkey; check that both sides "
        "use the same key\n",
    )
    assert wrong not in result.output


def test_authkey_sources_in_order(
    kvctl: Kvctl, authkey: bytes, tmp_path: Path, kv: kvclient.Client
) -> None:
    kv.dict("default")["k"] = "v"
    good = tmp_path / "good"
    good.write_bytes(authkey + b"\n")
    bad = tmp_path / "bad"
    bad.write_bytes(b"not the key\n")
    # --authkey-file wins over KV_AUTHKEY.
    ok(kvctl("--authkey-file", str(good), "get", "k", env={"KV_AUTHKEY": "wrong"}), "v\n")
    # KV_AUTHKEY wins over KV_AUTHKEY_FILE, as in kvclient.auth.load_authkey.
    ok(kvctl("get", "k", env={"KV_AUTHKEY_FILE": str(bad)}), "v\n")
    ok(kvctl("get", "k", env={"KV_AUTHKEY": None, "KV_AUTHKEY_FILE": str(good)}), "v\n")
    # Then ~/.config/kvmanager/authkey.
    home = tmp_path / "home"
    (home / ".config" / "kvmanager").mkdir(parents=True)
    (home / ".config" / "kvmanager" / "authkey").write_bytes(authkey)
    ok(kvctl("get", "k", env={"KV_AUTHKEY": None}), "v\n")


def test_a_missing_authkey_file_exits_3(kvctl: Kvctl, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    fails(
        kvctl("--authkey-file", str(missing), "ping"),
        EXIT_ERROR,
        f"AuthError: authkey file {missing} does not exist; copy it from the server host, or "
        f"make a new one: `(umask 077 && head -c 32 /dev/urandom > {missing})`\n",
    )
    result = kvctl("ping", env={"KV_AUTHKEY": None})  # no key anywhere; HOME is empty
    assert result.exit_code == EXIT_ERROR
    assert result.stderr.startswith("AuthError: authkey file ")


def test_the_authkey_itself_is_not_an_option() -> None:
    result = invoke(["--authkey", "secret", "ping"])
    assert result.exit_code == EXIT_USAGE
    assert "No such option: --authkey" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["bogus"],
        ["get"],
        ["set", "k"],
        ["incr", "k", "many"],
        ["incr", "k", "nan"],
        ["list", "range", "jobs", "x"],
        ["list", "push", "jobs", "-1"],
        ["queue", "get", "jobs", "--timeout", "-1"],
        ["--timeout", "0", "ping"],
        ["--address", "localhost:http", "ping"],
        ["--address", "127.0.0.1:70000", "ping"],
        ["get", "k", "--no-such-option"],
    ],
)
def test_usage_errors_exit_2_before_anything_is_sent(
    kvctl: Kvctl, kv: kvclient.Client, args: list[str]
) -> None:
    ops = [kv.stats()["ops"], kv.stats()["ops"]]
    result = kvctl(*args)
    ops.append(kv.stats()["ops"])
    assert result.exit_code == EXIT_USAGE
    assert result.stdout == ""
    assert result.stderr.startswith("Usage: kvctl")
    assert "Traceback" not in result.stderr
    assert ops[2] - ops[1] == ops[1] - ops[0]  # the server saw nothing between the stats calls


def test_no_arguments_prints_help() -> None:
    result = invoke([])
    assert result.exit_code == EXIT_USAGE
    assert "Usage: kvctl [OPTIONS] COMMAND [ARGS]..." in result.output


def test_an_unexpected_error_is_one_line_exit_3(
    kvctl: Kvctl, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: kvclient.Client) -> dict[str, Any]:
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr(kvclient.Client, "describe", broken)
    fails(kvctl("names"), EXIT_ERROR, "RuntimeError: something broke\n")


def test_an_interrupt_exits_130(kvctl: Kvctl, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(self: kvclient.Client) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(kvclient.Client, "ping", interrupted)
    result = kvctl("ping")
    assert result.exit_code == 130
    assert "Traceback" not in result.output


# -- help ----------------------------------------------------------------------------------

COMMANDS = [
    ["get"],
    ["set"],
    ["del"],
    ["watch"],
    ["keys"],
    ["incr"],
    ["cas"],
    ["mget"],
    ["mset"],
    ["names"],
    ["drop"],
    ["ping"],
    ["stats"],
    ["compact"],
    ["slowlog"],
    ["dump"],
    ["restore"],
    ["list", "push"],
    ["list", "pop"],
    ["list", "range"],
    ["list", "len"],
    ["queue", "put"],
    ["queue", "get"],
    ["queue", "size"],
    ["ns", "get"],
    ["ns", "set"],
    ["ns", "show"],
    ["top"],
    ["lock", "status"],
    ["lock", "run"],
    ["lock", "acquire"],
    ["lock", "release"],
    ["value", "get"],
    ["value", "set"],
    ["value", "incr"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help_with_an_example(command: list[str]) -> None:
    for flag in ("--help", "-h"):
        result = invoke([*command, flag])
        assert result.exit_code == EXIT_OK
        assert result.stdout.startswith(f"Usage: kvctl {' '.join(command)} [OPTIONS]")
        examples = result.stdout.split("Examples:\n\n", 1)[1]
        assert examples.startswith(f"    kvctl {' '.join(command)}")


def test_every_command_is_covered_by_the_help_test() -> None:
    commands = invoke(["-h"]).stdout.split("Commands:\n")[1].split("\n\n")[0]
    listed = {line.split()[0] for line in commands.splitlines()}
    groups = {"list", "queue", "ns", "lock", "value"}
    assert listed == {c[0] for c in COMMANDS} | groups
    for group in groups:
        text = invoke([group, "-h"]).stdout.split("Commands:\n")[1]
        assert {line.split()[0] for line in text.strip().splitlines()} == {
            c[1] for c in COMMANDS if c[0] == group
        }


def test_main_help_teaches_exit_codes_and_an_example() -> None:
    result = invoke(["--help"])
    assert result.exit_code == EXIT_OK
    for line in [
        "    kvctl set greeting hello ",
        "    0  success\n",
        "    1  not found: missing key, container or attribute, empty list on pop,\n"
        "       queue get timed out, cas mismatch, del found none of its keys,\n"
        "       lock still held after --timeout\n",
        "    2  usage error: unknown option, missing argument, malformed address,\n"
        "       invalid JSON under --json\n",
        "    3  connection, auth or server error\n",
        "kvctl lock run exits with its command's status instead",
        "[env var: KV_AUTHKEY_FILE",
        "KV_ADDRESS",
        "KV_TIMEOUT",
        "--install-completion",
    ]:
        assert line in result.stdout


# -- real processes: the README flow --------------------------------------------------------


def kvctl_script() -> str:
    script = Path(sys.executable).parent / "kvctl"
    assert script.exists(), f"{script} missing: install the project (pip install -e .)"
    return str(script)


@pytest.fixture
def shell(kvserve_proc: ServerProcess) -> Iterator[Callable[..., subprocess.CompletedProcess[str]]]:
    """Run the installed `kvctl` script as a separate process, with KV_ADDRESS exported."""
    env = dict(kvserve_proc.env, KV_ADDRESS=kvserve_proc.address)

    def run(*args: str, **env_overrides: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [kvctl_script(), *args],
            env={**env, **env_overrides},
            capture_output=True,
            text=True,
            timeout=30,
        )

    yield run


def test_readme_session(clean_env: dict[str, str]) -> None:
    """The README's session: no key configured, kvserve creates the default authkey file."""
    proc = start_kvserve(clean_env)
    server = ServerProcess(proc, read_listening_line(proc), b"", clean_env)
    env = dict(clean_env, KV_ADDRESS=server.address)  # README: the default 127.0.0.1:50000
    steps: list[tuple[list[str], str]] = [
        (["set", "greeting", "hello"], ""),
        (["get", "greeting"], "hello\n"),
        (["--json", "set", "visits", "41"], ""),
        (["incr", "visits"], "42\n"),
        (["queue", "put", "jobs", "build", "test"], ""),
        (["queue", "get", "jobs"], "build\n"),
        (["names"], "NAME     KIND   SIZE\ndefault  dict   2\njobs     queue  1\n"),
    ]
    try:
        for args, stdout in steps:
            done = subprocess.run(
                [kvctl_script(), *args], env=env, capture_output=True, text=True, timeout=30
            )
            assert (done.returncode, done.stdout, done.stderr) == (0, stdout, ""), args
    finally:
        assert server.stop() == 0


def test_a_closed_pipe_ends_kvctl_quietly(kvserve_proc: ServerProcess) -> None:
    with kvclient.connect(kvserve_proc.address, kvserve_proc.authkey) as kv:
        kv.list("big").extend(range(100_000))  # far more than a pipe buffer holds
    env = dict(kvserve_proc.env, KV_ADDRESS=kvserve_proc.address)
    proc = subprocess.Popen(
        [kvctl_script(), "list", "range", "big"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline() == "0\n"
    proc.stdout.close()  # as `kvctl list range big | head -1` does
    try:
        assert proc.wait(30) == 1  # typer's exit code for EPIPE
        assert proc.stderr.read() == ""
    finally:
        proc.stderr.close()


def test_kvctl_writes_and_python_reads_then_the_reverse(
    shell: Callable[..., subprocess.CompletedProcess[str]], kvserve_proc: ServerProcess
) -> None:
    assert shell("set", "greeting", "hello").returncode == 0
    assert shell("--json", "set", "-d", "cfg", "limits", '{"rps": 50}').returncode == 0
    with kvclient.connect(kvserve_proc.address, kvserve_proc.authkey) as kv:
        assert kv.dict("default")["greeting"] == "hello"
        assert kv.dict("cfg")["limits"] == {"rps": 50}
        kv.dict("default")["from_python"] = [1, (2, b"\xff")]
        kv.list("jobs").extend(["a", "b"])
    done = shell("get", "from_python")
    assert (done.returncode, done.stdout) == (0, '[1, [2, "/w=="]]\n')
    done = shell("list", "range", "jobs")
    assert (done.returncode, done.stdout) == (0, "a\nb\n")


def test_exit_codes_of_real_processes(
    shell: Callable[..., subprocess.CompletedProcess[str]], kvserve_proc: ServerProcess
) -> None:
    results = {
        EXIT_OK: shell("set", "k", "v"),
        EXIT_NOT_FOUND: shell("get", "missing"),
        EXIT_USAGE: shell("set", "--json", "bad", "{x"),
        EXIT_ERROR: shell("get", "k", KV_ADDRESS=f"127.0.0.1:{free_port()}"),
    }
    for code, done in results.items():
        assert done.returncode == code, (code, done.stderr)
        assert "Traceback" not in done.stderr
    assert results[EXIT_NOT_FOUND].stderr == "KeyError: no key 'missing' in dict 'default'\n"
    assert results[EXIT_ERROR].stderr.startswith("KVConnectionError: could not connect to ")
    assert results[EXIT_ERROR].stderr.count("\n") == 1
    wrong = shell("get", "k", KV_AUTHKEY="definitely-wrong")
    assert (wrong.returncode, wrong.stderr) == (
        EXIT_ERROR,
        f"AuthError: {kvserve_proc.address}: the server rejected the authkey; check that both "
        "sides use the same key\n",
    )
    with kvclient.connect(kvserve_proc.address, kvserve_proc.authkey) as kv:
        assert kv.dict("default").copy() == {"k": "v"}  # "bad" was never stored


# -- dump, restore, compact, TLS ----------------------------------------------------------


def _fill_for_dump(kv: kvclient.Client) -> None:
    d = kv.dict("d")
    d.update({"s": "str", "b": b"\x00\xff", "t": (1, (2, "x")), "big": 2**70, "n": None})
    d[("tuple", "key")] = [1.5, {"nested": True}]
    d["$odd"] = "a key JSON would mistake for a tag"
    d["ref"] = kv.list("l")
    kv.list("l").extend([1, 2])
    kv.queue("q", maxsize=3).put("job")
    kv.namespace("ns").x = 1


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
def test_dump_then_restore_into_an_empty_server(
    kvctl: Kvctl, kv: kvclient.Client, authkey: bytes, fmt: str, tmp_path: Path
) -> None:
    _fill_for_dump(kv)
    expected = kv.dump()
    dumped = kvctl("dump", "--format", fmt)
    assert dumped.exit_code == EXIT_OK, dumped.stderr
    data = dumped.stdout_bytes
    if fmt == "json":
        json.loads(data)  # people can read it with jq
    fresh = KVManager(("127.0.0.1", 0), authkey=authkey).get_server()
    thread = threading.Thread(target=fresh.serve_forever, daemon=True)
    thread.start()
    try:
        restored = invoke(
            ["--address", fresh.endpoint, "restore", "--format", fmt],
            {"KV_AUTHKEY": authkey.decode(), "HOME": str(tmp_path / "home")},
            input=data,
        )
        assert (restored.exit_code, restored.stdout) == (EXIT_OK, "4\n"), restored.stderr
        with kvclient.connect(fresh.endpoint, authkey) as other:
            got = other.dump()
            assert _refs_plain(got) == _refs_plain(expected)
        again = invoke(
            ["--address", fresh.endpoint, "restore", "--format", fmt],
            {"KV_AUTHKEY": authkey.decode(), "HOME": str(tmp_path / "home")},
            input=data,
        )
        assert again.exit_code == EXIT_ERROR
        assert "empty server" in again.stderr
    finally:
        fresh.stop()
        fresh.wait_stopped(10)
        thread.join(10)


def _refs_plain(value: Any) -> Any:
    if isinstance(value, kvclient.Proxy):
        ref = to_ref(value)
        assert ref is not None
        return ("ref", ref.kind, ref.name)
    if isinstance(value, list):
        return [_refs_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_refs_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _refs_plain(v) for k, v in value.items()}
    return value


def test_restore_refuses_what_is_not_a_dump(
    kvctl: Kvctl, kv: kvclient.Client, authkey: bytes
) -> None:
    result = invoke(
        ["--address", kvctl_address(kv), "restore", "--format", "json"],
        {"KV_AUTHKEY": authkey.decode()},
        input=b"{not json",
    )
    assert result.exit_code == EXIT_USAGE
    assert "not a json dump" in result.output
    assert kv.names() == {}


def kvctl_address(kv: kvclient.Client) -> str:
    return kv.endpoint


def test_compact_without_a_data_dir_is_a_server_error(kvctl: Kvctl) -> None:
    result = kvctl("compact")
    assert result.exit_code == EXIT_ERROR
    assert "--data-dir" in result.stderr


def test_tls_options_reach_the_server(authkey: bytes, tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    from kvproto.tls import server_context

    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "server.pem")
    )
    ca.issue_cert("me@example.org").private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "client.pem")
    )
    srv = KVManager(
        ("127.0.0.1", 0),
        authkey=authkey,
        tls=server_context(tmp_path / "server.pem", client_ca=tmp_path / "ca.pem"),
    ).get_server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    env: dict[str, str | None] = {"KV_AUTHKEY": authkey.decode(), "HOME": str(tmp_path / "h")}
    try:
        base = ["--address", srv.endpoint, "--tls-ca", str(tmp_path / "ca.pem")]
        ok(invoke([*base, "--tls-cert", str(tmp_path / "client.pem"), "set", "k", "v"], env), "")
        without = invoke([*base, "get", "k"], env)
        assert without.exit_code == EXIT_ERROR
        assert without.stderr.startswith("TLSError: ")
        env["KV_TLS_CA"] = str(tmp_path / "ca.pem")
        env["KV_TLS_CERT"] = str(tmp_path / "client.pem")
        ok(invoke(["--address", srv.endpoint, "get", "k"], env), "v\n")
    finally:
        srv.stop()
        srv.wait_stopped(10)
        thread.join(10)


# -- addresses and URLs, options after the command -------------------------------------------


def test_connection_options_after_the_command(
    address: str, authkey: bytes, kv: kvclient.Client
) -> None:
    env: dict[str, str | None] = {"KV_AUTHKEY": authkey.decode()}
    kv.dict("default")["k"] = "v"
    ok(invoke(["get", "k", "-a", address], env), "v\n")
    ok(invoke(["get", "k", f"--address={address}", "--timeout", "5"], env), "v\n")
    ok(invoke(["list", "push", "jobs", "x", "--address", address], env))
    # Later wins, as for any option given twice.
    ok(invoke(["-a", "127.0.0.1:1", "get", "k", "-a", address], env), "v\n")
    # After --, nothing is an option: these are values.
    ok(invoke(["-a", address, "list", "push", "jobs", "--", "-a", "127.0.0.1:1"], env))
    assert kv.list("jobs").copy() == ["x", "-a", "127.0.0.1:1"]


def test_an_option_the_command_has_itself_stays_the_commands(
    address: str, authkey: bytes, kv: kvclient.Client
) -> None:
    env: dict[str, str | None] = {"KV_AUTHKEY": authkey.decode()}
    # queue get's --timeout is the wait, not the connection timeout: it must give up in 0.2 s.
    started = time.monotonic()
    result = invoke(["queue", "get", "jobs", "--timeout", "0.2", "-a", address], env)
    assert time.monotonic() - started < 5
    fails(result, EXIT_NOT_FOUND, "queue.Empty: no item came into queue 'jobs' within 0.2 s\n")


def test_url_addresses(address: str, authkey: bytes, tmp_path: Path, kv: kvclient.Client) -> None:
    kv.dict("default")["k"] = "v"
    home = tmp_path / "home"
    (home / ".config" / "kvmanager").mkdir(parents=True)
    (home / ".config" / "kvmanager" / "prod.key").write_bytes(authkey)
    (tmp_path / "k.key").write_bytes(authkey)
    env: dict[str, str | None] = {"HOME": str(home)}
    ok(invoke(["get", "k", "-a", f"kv://prod@{address}"], env), "v\n")
    ok(invoke(["get", "k", "-a", f"kv://{tmp_path}/k.key@{address}"], env), "v\n")
    ok(invoke(["get", "k"], {**env, "KV_ADDRESS": f"kv://prod@{address}"}), "v\n")
    ok(invoke(["get", "k", "-a", f"kv://{address}/"], {"KV_AUTHKEY": authkey.decode()}), "v\n")
    missing = invoke(["get", "k", "-a", f"kv://nope@{address}"], env)
    assert missing.exit_code == EXIT_ERROR
    assert missing.stderr.startswith("AuthError: authkey file ")
    assert "nope.key does not exist" in missing.stderr


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("kv://db1:5/path", "no path, query or fragment"),
        ("db1:port", "port must be a number"),
        ("http://db1", "unknown scheme 'http://'"),
        ("kv://u:secret@db1", "never carries a key or password"),
    ],
)
def test_malformed_address_is_a_usage_error_naming_the_forms(text: str, why: str) -> None:
    cases: list[tuple[list[str], dict[str, str | None]]] = [
        (["get", "k", "-a", text], {}),
        (["get", "k"], {"KV_ADDRESS": text}),
    ]
    for args, env in cases:
        result = invoke(args, env)
        assert result.exit_code == EXIT_USAGE
        assert result.stdout == ""
        assert why in result.stderr
        # What to write instead: every form, or for a bad userinfo the kv:// forms with a key.
        assert "kv://[KEY@]HOST:PORT or kvs://" in result.stderr or (
            "write kv://NAME@HOST:PORT" in result.stderr
        )


@pytest.mark.parametrize("scheme", ["redis", "rediss", "redis-cluster"])
def test_redis_urls_are_parsed_as_redis_urls(scheme: str) -> None:
    """kvctl takes redis URLs (tests/test_cli_redis.py); a malformed one names their forms."""
    result = invoke(["ping", "-a", f"{scheme}://127.0.0.1:x"])
    assert result.exit_code == EXIT_USAGE
    assert result.stdout == ""
    assert "port must be a number, not 'x'; write redis://[USER:PASSWORD@]HOST" in (
        " ".join(result.stderr.split())
    )


def test_url_key_and_authkey_file_together_is_a_usage_error(address: str, tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_bytes(b"0123456789abcdef")
    result = invoke(["-a", f"kv://prod@{address}", "--authkey-file", str(key), "ping"])
    assert result.exit_code == EXIT_USAGE
    assert "give one of them" in result.stderr


def test_kvs_url_uses_tls(authkey: bytes, tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    from kvproto.tls import server_context

    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "server.pem")
    )
    srv = KVManager(
        ("127.0.0.1", 0), authkey=authkey, tls=server_context(tmp_path / "server.pem")
    ).get_server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    env: dict[str, str | None] = {"KV_AUTHKEY": authkey.decode(), "HOME": str(tmp_path / "h")}
    try:
        ca_opt = ["--tls-ca", str(tmp_path / "ca.pem")]
        ok(invoke(["set", "k", "v", "-a", f"kvs://{srv.endpoint}", *ca_opt], env))
        tls_env = {**env, "KV_TLS_CA": ca_opt[1]}
        ok(invoke(["get", "k", "-a", f"kvs://{srv.endpoint}"], tls_env), "v\n")
        # kv:// to the same TLS server, no CA given: plain TCP, refused.
        plain = invoke(["--timeout", "3", "get", "k", "-a", f"kv://{srv.endpoint}"], env)
        assert plain.exit_code == EXIT_ERROR
    finally:
        srv.stop()
        srv.wait_stopped(10)
        thread.join(10)


# -- values from stdin -------------------------------------------------------------------------


def stdin_kvctl(kvctl_args: list[str], data: bytes, address: str, authkey: bytes) -> Result:
    return invoke(["-a", address, *kvctl_args], {"KV_AUTHKEY": authkey.decode()}, input=data)


def test_set_dash_reads_stdin_whole(address: str, authkey: bytes, kv: kvclient.Client) -> None:
    text = "line one\nline two ü\n"
    ok(stdin_kvctl(["set", "notes", "-"], text.encode(), address, authkey))
    assert kv.dict("default")["notes"] == text  # unchanged, trailing newline kept
    ok(stdin_kvctl(["set", "--json", "cfg", "-"], b'{"rps": 5, "on": true}\n', address, authkey))
    assert kv.dict("default")["cfg"] == {"rps": 5, "on": True}
    ok(stdin_kvctl(["set", "--json", "dash", '"-"'], b"ignored", address, authkey))
    assert kv.dict("default")["dash"] == "-"  # how to store the str "-" itself


def test_set_bytes_is_binary_safe(address: str, authkey: bytes, kv: kvclient.Client) -> None:
    blob = bytes(range(256)) * 4 + b"\r\n\x00"
    ok(stdin_kvctl(["set", "--bytes", "blob", "-"], blob, address, authkey))
    assert kv.dict("default")["blob"] == blob
    got = stdin_kvctl(["get", "--bytes", "blob"], b"", address, authkey)
    assert (got.exit_code, got.stdout_bytes) == (EXIT_OK, blob)
    ok(stdin_kvctl(["set", "-b", "word", "héllo"], b"", address, authkey))
    assert kv.dict("default")["word"] == "héllo".encode()
    kv.dict("default")["n"] = 5
    wrong = stdin_kvctl(["get", "--bytes", "n"], b"", address, authkey)
    assert wrong.exit_code == EXIT_ERROR
    assert wrong.stderr == "TypeError: 'n' holds a int, not bytes or a str; leave out --bytes\n"


@pytest.mark.parametrize(
    ("args", "data", "why"),
    [
        (["set", "k", "-"], b"\xff\xfe not utf-8", "stdin is not UTF-8 text; add --bytes"),
        (["set", "--json", "k", "-"], b"{not json", "is not valid JSON"),
        (["set", "--json", "--bytes", "k", "-"], b"x", "leave out --json"),
        (["list", "push", "jobs", "-", "-"], b"x", "give - at most once"),
    ],
)
def test_bad_stdin_is_a_usage_error_and_sends_nothing(
    address: str, authkey: bytes, kv: kvclient.Client, args: list[str], data: bytes, why: str
) -> None:
    result = stdin_kvctl(args, data, address, authkey)
    assert result.exit_code == EXIT_USAGE
    assert why in result.stderr
    assert kv.names() == {}


def test_list_push_and_queue_put_read_stdin(
    address: str, authkey: bytes, kv: kvclient.Client
) -> None:
    ok(stdin_kvctl(["list", "push", "jobs", "a", "-", "b"], b"from stdin", address, authkey))
    assert kv.list("jobs").copy() == ["a", "from stdin", "b"]
    ok(stdin_kvctl(["queue", "put", "--bytes", "q", "-"], b"\x00\x01", address, authkey))
    assert kv.queue("q").get(timeout=1) == b"\x00\x01"


def test_set_from_a_redirected_file_in_a_real_process(
    kvserve_proc: ServerProcess, tmp_path: Path
) -> None:
    blob = bytes(range(256)) * 64
    (tmp_path / "in.bin").write_bytes(blob)
    env = dict(kvserve_proc.env, KV_ADDRESS=kvserve_proc.address)
    with (tmp_path / "in.bin").open("rb") as stdin:
        done = subprocess.run(
            [kvctl_script(), "set", "--bytes", "blob", "-"],
            stdin=stdin,
            env=env,
            capture_output=True,
            timeout=30,
        )
    assert (done.returncode, done.stderr) == (0, b"")
    out = subprocess.run(
        [kvctl_script(), "get", "--bytes", "blob"], env=env, capture_output=True, timeout=30
    )
    assert (out.returncode, out.stdout) == (0, blob)


def test_dump_to_a_file_is_atomic(kvctl: Kvctl, kv: kvclient.Client, tmp_path: Path) -> None:
    kv.dict("d")["k"] = (1, b"x")
    target = tmp_path / "backup.msgpack"
    result = kvctl("dump", "-o", str(target))
    assert result.exit_code == EXIT_OK, result.stderr
    assert Codec().unpack(target.read_bytes())["containers"][0][2] == {"k": (1, b"x")}
    assert [p.name for p in tmp_path.iterdir()] == ["backup.msgpack"]  # no temporary left
    # A failing dump leaves no file at all (a shell redirection leaves an empty one).
    missing = tmp_path / "no-such-dir" / "backup.msgpack"
    failed = kvctl("dump", "-o", str(missing))
    assert failed.exit_code == EXIT_USAGE
    assert "cannot write" in failed.stderr
    assert not missing.parent.exists()
