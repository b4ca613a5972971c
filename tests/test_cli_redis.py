"""`kvctl` on the Valkey/Redis backend: the same commands, given a redis:// address.

Real `kvctl` processes against a real standalone redis-server and a real 3-master cluster
(tests/redis_cluster.py), exact stdout, stderr and exit codes. The commands that are kvserve's
(dump, restore, compact, slowlog, watch, --ttl) exit 3 with one line (`NotSupportedError:`;
`ValueError:` for compact, as kvserve's without --data-dir) and no traceback; a malformed
URL or an authkey option is a usage error (exit 2) before anything is sent.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

import kvclient
from tests.backends import in_ci
from tests.redis_cluster import available
from tests.test_cli import kvctl_script

_MISSING = available()
pytestmark = pytest.mark.skipif(
    _MISSING is not None and not in_ci(), reason=f"redis-server needed: {_MISSING}"
)

Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(params=["standalone", "cluster"])
def redis_url(request: pytest.FixtureRequest) -> str:
    """An emptied redis-server or Redis Cluster of this session: its URL."""
    name = "redis_standalone_url" if request.param == "standalone" else "redis_cluster_url"
    url: str = request.getfixturevalue(name)
    return url


@pytest.fixture
def shell(redis_url: str, tmp_path: Path) -> Run:
    """Run the installed `kvctl` as its own process, with KV_ADDRESS set to the redis URL."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "KV_ADDRESS": redis_url}

    def run(*args: str, stdin: str | None = None, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [kvctl_script(), *args],
            env={**env, **extra},
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )

    return run


def outcome(done: subprocess.CompletedProcess[str]) -> tuple[int, str, str]:
    return done.returncode, done.stdout, done.stderr


def test_the_commands_run_unchanged_on_redis(shell: Run, redis_url: str) -> None:
    steps: list[tuple[list[str], tuple[int, str, str]]] = [
        (["set", "greeting", "hello"], (0, "", "")),
        (["get", "greeting"], (0, "hello\n", "")),  # kvctl's fast path hands it to the cli
        (["--json", "set", "visits", "41"], (0, "", "")),
        (["incr", "visits"], (0, "42\n", "")),
        (["incr", "visits", "-2", "--json"], (0, "40\n", "")),
        (["get", "nope"], (1, "", "KeyError: no key 'nope' in dict 'default'\n")),
        (["mset", "a", "1", "b", "2"], (0, "", "")),
        (["mget", "a", "b"], (0, '{"a": "1", "b": "2"}\n', "")),
        (["cas", "a", "1", "3"], (0, "", "")),
        (["keys", "?"], (0, "a\nb\n", "")),
        (["del", "a", "b"], (0, "2\n", "")),
        (["list", "push", "jobs", "build", "test"], (0, "", "")),
        (["list", "range", "jobs"], (0, "build\ntest\n", "")),
        (["list", "pop", "jobs"], (0, "test\n", "")),
        (["list", "len", "jobs"], (0, "1\n", "")),
        (["queue", "put", "q", "one"], (0, "", "")),
        (["queue", "size", "q"], (0, "1\n", "")),
        (["queue", "get", "q", "--timeout", "1"], (0, "one\n", "")),
        (
            ["queue", "get", "q", "--timeout", "0.2"],
            (1, "", "queue.Empty: no item came into queue 'q' within 0.2 s\n"),
        ),
        (["ns", "set", "cfg", "mode", "fast"], (0, "", "")),
        (["ns", "get", "cfg", "mode"], (0, "fast\n", "")),
        (["value", "set", "v", "3"], (0, "", "")),
        (["value", "incr", "v", "2"], (0, "5\n", "")),
        (["lock", "acquire", "L", "--lease", "60"], (0, "1\n", "")),
        (
            ["lock", "run", "L", "--timeout", "0.3", "--", "true"],
            (1, "", "LockTimeoutError: lock 'L' is still held after 0.3 s\n"),
        ),
        (["lock", "release", "L", "1"], (0, "", "")),
        (["lock", "run", "L", "--", "echo", "ran"], (0, "ran\n", "")),
        (["drop", "jobs"], (0, "", "")),
        (
            ["names"],
            (
                0,
                "NAME     KIND       SIZE\nL        lock       0\ncfg      namespace  1\n"
                "default  dict       2\nq        queue      0\nv        value      1\n",
                "",
            ),
        ),
    ]
    for args, expected in steps:
        assert outcome(shell(*args)) == expected, args
    ping = shell("ping")
    assert (ping.returncode, ping.stderr) == (0, "")
    assert ping.stdout.startswith("pong ") and ping.stdout.endswith(" ms\n")
    with kvclient.connect(redis_url) as kv:  # what kvctl wrote is what the API reads
        assert dict(kv.dict("default").items()) == {"greeting": "hello", "visits": 40}
        assert kv.value("v", 0).value == 5


def test_stats_names_the_backend(shell: Run, redis_url: str) -> None:
    done = shell("stats", "--json")
    assert (done.returncode, done.stderr) == (0, "")
    facts = json.loads(done.stdout)
    cluster = redis_url.startswith("redis-cluster://")
    assert facts["backend"] == ("redis-cluster" if cluster else "redis")
    assert facts["masters"] == (3 if cluster else 1)
    top = shell("top", "--count", "1", "--interval", "0.1", "--json")
    assert (top.returncode, top.stderr) == (0, "")
    assert json.loads(top.stdout)["backend"] == facts["backend"]


_BACKUPS = (
    "on Valkey/Redis, persistence and backups are the server's own "
    "(appendonly, save, BGSAVE, redis-cli --rdb)"
)


@pytest.mark.parametrize(
    ("args", "stdin", "stderr"),
    [
        (["dump"], None, f"NotSupportedError: dump is kvserve's (kvserve --data-dir); {_BACKUPS}"),
        (
            ["restore", "--format", "json"],
            '{"format": 1, "containers": []}',  # an empty dump: refused all the same
            f"NotSupportedError: restore is kvserve's (kvserve --data-dir); {_BACKUPS}",
        ),
        (
            ["compact"],
            None,
            f"ValueError: compact is kvserve's (kvserve --data-dir); {_BACKUPS}",
        ),
        (
            ["slowlog"],
            None,
            "NotSupportedError: slowlog is kvserve's (kvserve --slow-ms); on Valkey/Redis, read "
            "the server's own: redis-cli SLOWLOG GET on each master",
        ),
        (
            ["set", "--ttl", "5", "k", "v"],
            None,
            "NotSupportedError: dict.set needs 'ttl', which the Valkey/Redis backend does not "
            "offer; see the guarantees table in the README",
        ),
        (
            ["watch", "default"],
            None,
            "NotSupportedError: dict.revision needs 'watch', which the Valkey/Redis backend "
            "does not offer; see the guarantees table in the README",
        ),
    ],
    ids=["dump", "restore", "compact", "slowlog", "ttl", "watch"],
)
def test_kvserve_only_commands_exit_3_with_one_line(
    shell: Run, tmp_path: Path, args: list[str], stdin: str | None, stderr: str
) -> None:
    shell("set", "k", "v")  # watch needs the dict to exist to get as far as the backend
    out = tmp_path / "backup.msgpack"
    extra = ["-o", str(out)] if args == ["dump"] else []
    assert outcome(shell(*args, *extra, stdin=stdin)) == (3, "", stderr + "\n")
    assert list(tmp_path.glob("*backup*")) == []  # dump -o leaves no file behind


def test_address_errors_are_usage_errors(shell: Run) -> None:
    bad = shell("-a", "redis://h:x/0", "ping")
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert bad.stderr.endswith(
        "Error: Invalid value for '--address' / '-a' (env var: 'KV_ADDRESS'): invalid address "
        "'redis://h:x/0': port must be a number, not 'x'; write redis://[USER:PASSWORD@]HOST"
        "[:PORT][/DB], rediss://... (TLS) or redis-cluster://[USER:PASSWORD@]HOST:PORT"
        "[,HOST:PORT...]\n"
    )
    keyed = shell("--authkey-file", "/dev/null", "ping")
    assert keyed.returncode == 2
    assert keyed.stderr.endswith(
        "Error: Invalid value for '--authkey-file': an authkey is kvserve's; a Valkey/Redis "
        "server takes a password in the URL (redis://:PASSWORD@host) or in REDIS_PASSWORD\n"
    )


def test_an_unreachable_server_is_exit_3(shell: Run) -> None:
    done = shell("-a", "redis://127.0.0.1:1/0", "--timeout", "1", "get", "k")
    assert done.returncode == 3
    assert done.stdout == ""
    assert done.stderr.startswith("KVConnectionError: ")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_help_names_the_redis_urls() -> None:
    done = subprocess.run(
        [kvctl_script(), "--help"], capture_output=True, text=True, timeout=60, env={}
    )
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "or a Valkey/Redis server or cluster: redis://[USER:PASSWORD@]HOST[:PORT][/DB]" in text
    assert "redis-cluster://HOST:PORT[,HOST:PORT...] (any nodes of a Redis Cluster)" in text
