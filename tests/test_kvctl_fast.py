"""kvctl's fast path (kvclient._kvctl): the same output as the typer command, and a light start.

Each handled call is run both ways against the same real server, the fast path in this
process (its output captured) and the typer app through CliRunner, and must print the same
bytes with the same exit code. Calls the fast path must leave to typer are checked to print
nothing and return None. What a start imports is checked in a fresh interpreter, by module
name, not by timing (bench/startup.py measures the time).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import kvclient
from kvclient._kvctl import fast_call
from tests.test_cli import free_port, invoke, kvctl_script

# Loaded by kvctl's typer path or the full client; the fast path must load none of them.
HEAVY = (
    "typer",
    "rich",
    "click",
    "pydantic",
    "ssl",
    "multiprocessing",
    "importlib.metadata",
    "pathlib",
    "kvclient.cli",
    "kvclient.client",
    "kvclient.proxies",
    "kvclient.sync",
)


@pytest.fixture
def seeded(kv: kvclient.Client) -> kvclient.Client:
    d = kv.dict("default")
    d.update(
        {
            "s": "hello wörld",
            "n": 42,
            "f": 0.5,
            "b": b"\x00\xffbytes",
            "obj": {"a": [1, (2, 3)], 7: None, b"k": True},
            "multi": "line one\nline two",
            "esc": "\x1b[31mred\x1b[0m",
            "nested": kv.list("inner"),
            "-dash": "a key starting with a dash",
        }
    )
    kv.dict("other")["k"] = "in other"
    kv.list("jobs").append(1)
    return kv


@pytest.fixture
def fast_env(monkeypatch: pytest.MonkeyPatch, authkey: bytes, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("KV"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("KV_AUTHKEY", authkey.decode())
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


GETS = [
    ["get", "s"],
    ["get", "n"],
    ["get", "f"],
    ["get", "b"],
    ["get", "obj"],
    ["get", "multi"],
    ["get", "s", "--json"],
    ["--json", "get", "n"],
    ["get", "-j", "obj"],
    ["get", "-d", "other", "k"],
    ["get", "k", "--dict=other"],
    ["get", "missing"],
    ["get", "k", "-d", "no-such-dict"],
    ["--timeout", "5", "get", "s"],
    ["get", "s", "--timeout=2.5"],
]
WRITES = [
    ["set", "k", "v"],
    ["set", "k", "two words", "-d", "fresh"],
    ["set", "-d", "jobs", "k", "v"],  # a list: KindError, exit 3
    ["set", "s", "héllo"],
    ["incr", "n"],
    ["incr", "n", "5"],
    ["incr", "n", "0.5"],
    ["incr", "n", "1_000"],
    ["incr", "n", "--json"],
    ["--json", "incr", "-d", "other", "new"],
    ["incr", "s"],  # a str: TypeError, exit 3
    ["incr", "k", "-d", "jobs"],
    ["--timeout", "5", "incr", "n"],
]


@pytest.mark.parametrize("args", [*GETS, *WRITES], ids=" ".join)
def test_fast_call_prints_and_stores_what_the_typer_command_does(
    args: list[str],
    seeded: kvclient.Client,
    address: str,
    authkey: bytes,
    fast_env: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [*args, "-a", address]
    names = ("default", "other", "fresh")

    def state() -> dict[str, dict[Any, Any]]:
        return {name: seeded.dict(name).copy() for name in names}

    before = state()
    code = fast_call(argv)
    out, err = capsys.readouterr()
    assert code is not None, "the fast path should have served this call"
    fast_state = state()
    for name in names:  # the same start for the typer command
        seeded.dict(name).clear()
        seeded.dict(name).update(before[name])
    typed = invoke(argv, {"KV_AUTHKEY": authkey.decode()})
    assert (code, out, err) == (typed.exit_code, typed.stdout, typed.stderr)
    assert fast_state == state()
    if code == 0 and args in WRITES:
        assert fast_state != before  # the call did change something


def test_fast_incr_is_exact_across_processes(
    seeded: kvclient.Client, address: str, authkey: bytes, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KV")}
    env |= {"KV_AUTHKEY": authkey.decode(), "KV_ADDRESS": address, "HOME": str(tmp_path)}
    script = f"for i in $(seq 25); do {kvctl_script()} incr -d hits home >/dev/null || exit 1; done"
    procs = [subprocess.Popen(["sh", "-c", script], env=env) for _ in range(4)]
    assert [p.wait(120) for p in procs] == [0] * 4
    assert seeded.dict("hits")["home"] == 100


def test_fast_call_reads_kv_address_and_url_key_files(
    seeded: kvclient.Client,
    address: str,
    authkey: bytes,
    fast_env: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("KV_ADDRESS", address)
    assert fast_call(["get", "s"]) == 0
    assert capsys.readouterr() == ("hello wörld\n", "")
    monkeypatch.delenv("KV_AUTHKEY")
    (tmp_path / "k.key").write_bytes(authkey)
    assert fast_call(["get", "s", "-a", f"kv://{tmp_path}/k.key@{address}"]) == 0
    assert capsys.readouterr() == ("hello wörld\n", "")


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["get", "s", "--help"], {}),
        (["get", "--", "s"], {}),
        (["get", "-dash"], {}),
        (["get", "b", "--bytes"], {}),
        (["get", "s", "--tls-ca", "ca.pem"], {}),
        (["get", "s"], {"KV_TLS_CA": "ca.pem"}),
        (["get", "s"], {"KVCTL_NO_FAST_PATH": "1"}),
        (["get"], {}),
        (["get", "s", "t"], {}),
        (["names"], {}),
        (["list", "len", "jobs"], {}),
        (["--version"], {}),
        (["get", "s", "--timeout", "0"], {}),
        (["get", "s", "--timeout"], {}),
        (["get", "s", "-a", "kvs://127.0.0.1:1"], {}),
        (["get", "s", "-a", "bad:port"], {}),
        (["get", "s", "-a", "redis://127.0.0.1:1"], {}),
        (["get", "s", "-a", "UNREACHABLE"], {}),
        (["get", "s"], {"KV_AUTHKEY": "the wrong key entirely"}),
        (["get", "nested"], {}),
        (["get", "esc"], {}),
        (["get", "k", "-d", "jobs"], {}),
        (["set", "new", "-"], {}),  # stdin
        (["set", "--json", "new", "1"], {}),
        (["set", "new", "v", "--bytes"], {}),
        (["set", "new", "v", "--ttl", "5"], {}),
        (["set", "new", "-1"], {}),  # a value starting with "-"
        (["set", "new"], {}),
        (["set", "new", "a", "b"], {}),
        (["incr", "new", "x"], {}),  # not a number: cli's usage error
        (["incr", "new", "nan"], {}),
        (["incr"], {}),
        (["set", "new", "v", "-a", "UNREACHABLE"], {}),
        (["set", "new", "v"], {"KV_AUTHKEY": "the wrong key entirely"}),
        (["incr", "new"], {"KV_TLS_CA": "ca.pem"}),
        (["incr", "new"], {"KVCTL_NO_FAST_PATH": "1"}),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else ",".join(v),
)
def test_calls_the_fast_path_leaves_to_typer_print_nothing(
    args: list[str],
    env: dict[str, str],
    seeded: kvclient.Client,
    address: str,
    fast_env: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    unreachable = f"127.0.0.1:{free_port()}"
    argv = [unreachable if a == "UNREACHABLE" else a for a in args]
    if "-a" not in argv:
        argv += ["-a", address]
    assert fast_call(argv) is None
    assert capsys.readouterr() == ("", "")
    assert "new" not in seeded.dict("default")  # and nothing was written


def test_the_installed_script_runs_both_paths_alike(
    seeded: kvclient.Client, address: str, authkey: bytes, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KV")}
    env |= {"KV_AUTHKEY": authkey.decode(), "KV_ADDRESS": address, "HOME": str(tmp_path)}
    runs = {}
    for label, extra in (("fast", {}), ("typer", {"KVCTL_NO_FAST_PATH": "1"})):
        for key in ("s", "missing"):
            done = subprocess.run(
                [kvctl_script(), "get", key],
                env={**env, **extra},
                capture_output=True,
                timeout=30,
            )
            runs[label, key] = (done.returncode, done.stdout, done.stderr)
    assert runs["fast", "s"] == runs["typer", "s"] == (0, "hello wörld\n".encode(), b"")
    assert runs["fast", "missing"] == runs["typer", "missing"]
    assert runs["fast", "missing"][0] == 1


def _fresh(code: str, env: dict[str, str] | None = None) -> Any:
    """Run ``code`` in a fresh interpreter; it prints one JSON document, returned here."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_the_fast_path_imports_no_typer_rich_ssl_or_full_client(
    seeded: kvclient.Client, address: str, authkey: bytes, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KV")}
    env |= {"KV_AUTHKEY": authkey.decode(), "HOME": str(tmp_path)}
    code = f"""
import json, sys
from kvclient._kvctl import fast_call
code = fast_call(["get", "s", "-a", {address!r}])
heavy = {list(HEAVY)!r}
print(json.dumps([code, sorted(m for m in sys.modules if m.split(".")[0] in heavy or m in heavy)]))
"""
    code_, loaded = _fresh(code, env)
    assert code_ == 0  # it did serve the call
    assert loaded == []
    # The check can fail: the typer path loads what the fast path must not.
    typer_code = "import json, sys, kvclient.cli; print(json.dumps(sorted(sys.modules)))"
    assert {"typer", "kvclient.proxies"} <= set(_fresh(typer_code, env))


def test_import_kvclient_loads_the_client_only_on_use() -> None:
    loaded = _fresh(
        "import json, sys, kvclient; before = sorted(sys.modules); kvclient.connect; "
        "print(json.dumps([before, sorted(sys.modules)]))"
    )
    assert "kvclient.client" not in loaded[0]
    assert "importlib.metadata" not in loaded[0]
    assert "kvclient.client" in loaded[1]
    assert kvclient.__version__ == kvclient.__dict__["__version__"]


def test_kvclient_lazy_names_match_all() -> None:
    where = kvclient._WHERE
    assert sorted([*where, "__version__"]) == kvclient.__all__
    for name in kvclient.__all__:
        assert getattr(kvclient, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        kvclient.nope


def test_connection_module_loads_neither_ssl_nor_multiprocessing() -> None:
    loaded = _fresh("import json, sys, kvclient.connection; print(json.dumps(sorted(sys.modules)))")
    assert "ssl" not in loaded
    assert not [m for m in loaded if m.startswith("multiprocessing")]


def test_version_is_the_package_metadata_version() -> None:
    import importlib.metadata

    assert importlib.metadata.version("kvmanager") == kvclient.__version__


# -- the typer path builds only the command it runs ---------------------------------------


def test_keep_only_knows_every_valued_option_of_the_main_command() -> None:
    import typer

    from kvclient import cli

    group = typer.main.get_command(cli.app)
    valued = {
        opt
        for param in group.params
        if getattr(param, "param_type_name", "") == "option"
        and not getattr(param, "is_flag", False)
        for opt in param.opts
    }
    assert valued == cli._GLOBAL_VALUED


@pytest.mark.parametrize(
    ("argv", "kept"),
    [
        (["get", "k"], ["get"]),
        (["-a", "h:1", "--timeout=3", "names", "-j"], ["names"]),
        (["--authkey-file", "names", "incr", "n"], ["incr"]),  # an option's value is no command
        (["lock", "run", "x", "--", "true"], ["lock"]),
        (["get", "k", "-a", "h:1"], ["get"]),
        ([], None),
        (["-h"], None),
        (["get", "--help"], None),
        (["--version"], None),
        (["nams"], None),  # a typo keeps every command, for click's "Did you mean"
        (["-a"], None),
    ],
)
def test_keep_only_keeps_the_command_argv_names_and_everything_when_unsure(
    argv: list[str], kept: list[str] | None
) -> None:
    code = f"""
import json
from kvclient import cli
every = len(cli.app.registered_commands) + len(cli.app.registered_groups)
cli.keep_only({argv!r})
names = [c.name for c in cli.app.registered_commands] + [g.name for g in cli.app.registered_groups]
print(json.dumps(None if len(names) == every else names))
"""
    assert _fresh(code) == kept


def test_the_client_loads_neither_ssl_nor_multiprocessing_until_it_needs_them(
    server: object, address: str, authkey: bytes
) -> None:
    loaded = _fresh(
        "import json, sys, kvclient\n"
        f"with kvclient.connect({address!r}, {authkey!r}) as kv:\n"
        "    kv.dict('d')['k'] = 1\n"
        "    plain = sorted(sys.modules)\n"
        "    kv.rebuild_info()\n"
        "print(json.dumps([plain, sorted(sys.modules)]))"
    )
    assert "ssl" not in loaded[0]
    assert not [m for m in loaded[0] if m.startswith("multiprocessing")]
    assert "multiprocessing.context" in loaded[1]  # a proxy being pickled asks it
