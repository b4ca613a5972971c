"""deploy/: the systemd unit and the container image, checked without systemd or a Docker engine.

Static tests parse ``deploy/kvserve.service`` and ``deploy/Dockerfile`` (small parsers below,
written for what those files use) and hold them to the installed ``kvserve --help`` and
``kvctl --help``. ``systemd-analyze verify`` and ``security --offline`` check the unit in a
scratch root when systemd is installed. Live tests run the unit's ExecStart and the image's CMD
and HEALTHCHECK exactly as written, with only paths, the port and the bind address swapped for
local ones, against a real kvserve: a flag with a bad value, a key path kvserve cannot use, or a
health check that cannot tell a working server from a broken one fails here.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import read_listening_line
from tests.test_compiled import build_env, build_wheel, extension_path, mypyc_paths

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
UNIT_FILE = DEPLOY / "kvserve.service"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"
README = DEPLOY / "README.md"
# The console scripts of the kvmanager under test: what ExecStart and CMD run once installed.
BIN = Path(sys.executable).parent
UNIT_NAME = "kvserve.service"
SYSTEM_UNITS = next(
    (p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir()),
    None,
)
KVSERVE_PATH_FLAGS = {"--authkey-file", "--data-dir"}


# -- the unit file -------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """A parsed unit file: each section's assignments in file order, repeated keys kept."""

    sections: dict[str, list[tuple[str, str]]]

    def values(self, section: str, key: str) -> list[str]:
        return [v for k, v in self.sections.get(section, []) if k == key]

    def value(self, section: str, key: str) -> str:
        """Return the one assignment of ``key``; a second one could silently undo the first."""
        found = self.values(section, key)
        assert len(found) == 1, f"[{section}] {key}= is assigned {len(found)} times, not once"
        return found[0]

    def environment(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for line in self.values("Service", "Environment"):
            for word in shlex.split(line):
                name, _, val = word.partition("=")
                env[name] = val
        return env

    def exec_start(self) -> list[str]:
        return shlex.split(self.value("Service", "ExecStart"))


def parse_unit(text: str) -> Unit:
    """Parse systemd's ini dialect: ``#``/``;`` comments, trailing-backslash continuations."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue  # systemd also skips comment lines inside a continuation
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, eq, val = line.partition("=")
        assert eq, f"not an assignment: {line!r}"
        assert current is not None, f"assignment before any section: {line!r}"
        current.append((key.strip(), val.strip()))
    assert not pending, "the file ends inside a continued line"
    return Unit(sections)


def expand_exec(argv: Sequence[str], env: Mapping[str, str], credentials: Path) -> list[str]:
    """Expand what systemd expands in ExecStart: specifiers at load, then ``${VAR}`` at exec.

    Raises:
        AssertionError: a specifier or variable this test does not know (systemd would expand
            an unknown variable to nothing, silently).
    """

    def specifier(match: re.Match[str]) -> str:
        char = match.group(1)
        if char == "%":
            return "%"
        if char == "d":
            return str(credentials)
        raise AssertionError(f"ExecStart uses %{char}: teach test_deploy.py what it expands to")

    def variable(match: re.Match[str]) -> str:
        name = match.group(1)
        assert name in env, f"ExecStart uses ${{{name}}}, which no Environment= line sets"
        return env[name]

    out = []
    for arg in argv:
        arg = re.sub(r"\$\{(\w+)\}", variable, re.sub(r"%(.)", specifier, arg))
        assert "$" not in arg, f"unexpanded variable in {arg!r}: write it as ${{NAME}}"
        out.append(arg)
    return out


@pytest.fixture(scope="module")
def unit() -> Unit:
    return parse_unit(UNIT_FILE.read_text())


# -- the Dockerfile ------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction: its name, leading ``--flags`` and the rest of the line."""

    name: str
    flags: dict[str, str]
    rest: str

    def exec_form(self) -> list[str]:
        """Return the JSON (exec) form's words; shell form fails (no shell as PID 1)."""
        words = json.loads(self.rest)
        assert isinstance(words, list), f"{self.name} is not in exec (JSON) form: {self.rest}"
        assert all(isinstance(w, str) for w in words)
        return [str(w) for w in words]


def parse_dockerfile(text: str) -> list[list[Instruction]]:
    """Return the build stages, each a list of instructions (an ARG before FROM is stage 0)."""
    stages: list[list[Instruction]] = [[]]
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker also drops comment lines inside a continuation
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        name, _, rest = line.partition(" ")
        flags: dict[str, str] = {}
        rest = rest.strip()
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            key, _, val = flag.partition("=")
            flags[key] = val
            rest = rest.strip()
        if name.upper() == "FROM":
            stages.append([])
        stages[-1].append(Instruction(name.upper(), flags, rest))
    assert not pending, "the Dockerfile ends inside a continued line"
    return stages


@dataclass(frozen=True)
class Image:
    build_args: dict[str, str]
    build: list[Instruction]  # every stage but the last
    final: list[Instruction]

    def one(self, name: str) -> Instruction:
        found = [i for i in self.final if i.name == name]
        assert len(found) == 1, f"the final stage has {len(found)} {name} instructions, not one"
        return found[0]

    def env(self, stage: Sequence[Instruction] | None = None) -> dict[str, str]:
        """The ``ENV`` settings of ``stage`` (default: the final one)."""
        env: dict[str, str] = {}
        for instruction in self.final if stage is None else stage:
            if instruction.name == "ENV":
                for word in shlex.split(instruction.rest):
                    name, eq, val = word.partition("=")
                    assert eq, f"write ENV as NAME=value: {word!r}"
                    env[name] = val
        return env

    def cmd(self) -> list[str]:
        return self.one("CMD").exec_form()

    def healthcheck(self) -> tuple[dict[str, str], list[str]]:
        check = self.one("HEALTHCHECK")
        kind, _, words = check.rest.partition(" ")
        assert kind == "CMD", f"HEALTHCHECK {kind}: expected a CMD"
        return check.flags, Instruction("HEALTHCHECK", {}, words).exec_form()


@pytest.fixture(scope="module")
def image() -> Image:
    stages = parse_dockerfile(DOCKERFILE.read_text())
    args = {}
    for instruction in stages[0]:
        assert instruction.name == "ARG", f"{instruction.name} before the first FROM"
        name, _, default = instruction.rest.partition("=")
        args[name] = default
    build = [i for stage in stages[1:-1] for i in stage]
    return Image(args, build, stages[-1])


# -- what the tools accept -----------------------------------------------------------------


def help_flags(argv: Sequence[str]) -> set[str]:
    # A wide terminal: rich shortens long option names to fit ("--handshake-timeo…").
    env = dict(os.environ, COLUMNS="200")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, check=True)
    assert "…" not in out.stdout, "help output was shortened; widen COLUMNS"
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", out.stdout))


@pytest.fixture(scope="module")
def kvserve_flags() -> set[str]:
    flags = help_flags([str(BIN / "kvserve"), "--help"])
    assert {"--host", "--port", "--authkey-file", "--data-dir"} <= flags  # the parser works
    return flags


@pytest.fixture(scope="module")
def kvctl_flags() -> set[str]:
    flags = help_flags([str(BIN / "kvctl"), "--help"])
    assert {"--address", "--authkey-file", "--timeout"} <= flags
    return flags


def flags_of(argv: Sequence[str]) -> list[str]:
    return [arg.partition("=")[0] for arg in argv if arg.startswith("-")]


def option(argv: Sequence[str], flag: str) -> str:
    """Return the value after ``flag`` (given exactly once) in ``argv``."""
    positions = [i for i, arg in enumerate(argv) if arg == flag]
    assert len(positions) == 1, f"{flag} appears {len(positions)} times in {list(argv)}"
    assert positions[0] + 1 < len(argv), f"{flag} has no value"
    return argv[positions[0] + 1]


def swap(argv: Sequence[str], replacements: Mapping[str, str]) -> list[str]:
    """Replace each ``flag``'s value: ``{"--port": "0"}``."""
    out = list(argv)
    for flag, new in replacements.items():
        index = out.index(flag)
        out[index + 1] = new
    return out


def clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KV_")}
    env["HOME"] = str(tmp_path / "home")  # a default key made by mistake would land here
    return env


def write_key(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    path.write_bytes(key)
    path.chmod(0o400)  # as systemd credentials and docker secrets usually are
    return key


@dataclass
class Running:
    proc: subprocess.Popen[str]
    address: str

    def stop(self, timeout: float) -> tuple[int, str]:
        """Send SIGTERM as systemd and Docker do; return the exit code and stderr."""
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, err


StartKvserve = Callable[[list[str], dict[str, str]], Running]


@pytest.fixture
def start_kvserve() -> Iterator[StartKvserve]:
    """Start a command line that runs kvserve; killed at teardown if the test did not stop it."""
    started: list[subprocess.Popen[str]] = []

    def start(argv: list[str], env: dict[str, str]) -> Running:
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        started.append(proc)
        return Running(proc, read_listening_line(proc))

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def kvctl(argv: Sequence[str], env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    assert argv[0] == "kvctl"
    return subprocess.run(
        [str(BIN / "kvctl"), *argv[1:]], capture_output=True, text=True, env=env, timeout=60
    )


def looks_like_a_key(word: str) -> bool:
    """A long word that is not a path, flag or variable: what a pasted key would look like."""
    return len(word) >= 16 and not word.startswith(("/", "-", "%", "$")) and "/" not in word


# -- systemd unit: static ------------------------------------------------------------------

HARDENING = {
    "DynamicUser": "yes",
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "PrivateUsers": "yes",
    "ProtectProc": "invisible",
    "ProcSubset": "pid",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "SystemCallArchitectures": "native",
    "UMask": "0077",
}


@pytest.mark.parametrize(("key", "expected"), sorted(HARDENING.items()))
def test_unit_hardening_option(unit: Unit, key: str, expected: str) -> None:
    assert unit.value("Service", key) == expected


def test_unit_sandbox_allows_only_sockets_and_system_service_calls(unit: Unit) -> None:
    families = unit.value("Service", "RestrictAddressFamilies").split()
    assert sorted(families) == ["AF_INET", "AF_INET6", "AF_UNIX"]
    filters = unit.values("Service", "SystemCallFilter")
    assert filters[0] == "@system-service"  # the allow-list first; later lines only remove
    assert all(f.startswith("~") for f in filters[1:])
    assert "@privileged" in " ".join(filters[1:])
    assert not unit.values("Service", "User"), "DynamicUser= and User= together: pick one"


def test_unit_lifecycle(unit: Unit) -> None:
    assert unit.value("Service", "Restart") == "on-failure"
    assert unit.value("Service", "KillSignal") == "SIGTERM"
    assert 10 <= int(unit.value("Service", "TimeoutStopSec")) <= 120
    assert unit.value("Install", "WantedBy") == "multi-user.target"


def test_unit_exec_start_uses_only_real_kvserve_flags(unit: Unit, kvserve_flags: set[str]) -> None:
    argv = unit.exec_start()
    assert argv[0].startswith("/"), "ExecStart needs an absolute path"
    assert Path(argv[0]).name == "kvserve"
    used = flags_of(argv[1:])
    assert used, "no flags parsed from ExecStart"
    assert set(used) <= kvserve_flags, f"not kvserve flags: {set(used) - kvserve_flags}"


def test_unit_state_and_key_paths(unit: Unit) -> None:
    argv = unit.exec_start()
    assert option(argv, "--data-dir") == "/var/lib/" + unit.value("Service", "StateDirectory")
    name, _, source = unit.value("Service", "LoadCredential").partition(":")
    assert option(argv, "--authkey-file") == f"%d/{name}"  # the credentials directory
    assert source == "/etc/kvserve/authkey"
    assert option(argv, "--fsync") in {"always", "everysec"}  # never "no" for a service


def test_unit_listens_on_loopback_unless_told(unit: Unit) -> None:
    env = unit.environment()
    argv = expand_exec(unit.exec_start(), env, Path("/run/credentials") / UNIT_NAME)
    assert option(argv, "--host") == "127.0.0.1"
    assert option(argv, "--port") == "50000"


def test_unit_never_carries_a_key(unit: Unit) -> None:
    assert not {"KV_AUTHKEY", "KV_AUTHKEY_FILE"} & unit.environment().keys()
    assert not unit.values("Service", "EnvironmentFile")  # where a KV_AUTHKEY could hide
    assert not [w for w in unit.exec_start() if looks_like_a_key(w)]


# -- systemd unit: systemd-analyze ---------------------------------------------------------


@pytest.fixture
def unit_root(tmp_path: Path, unit: Unit) -> Path:
    """A scratch root with systemd's own units, this unit, and a stand-in for its program.

    ``verify`` checks that ExecStart's program exists and is executable; /opt/kvmanager is not
    installed here, so ``--root`` points systemd-analyze at this tree instead.
    """
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd): unit not verified")
    if SYSTEM_UNITS is None:
        pytest.skip("no /usr/lib/systemd/system on this host: unit dependencies cannot resolve")
    root = tmp_path / "root"
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    program = root / unit.exec_start()[0].lstrip("/")
    program.parent.mkdir(parents=True)
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT_FILE, root / "etc/systemd/system" / UNIT_NAME)
    return root


def systemd_analyze(*args: str) -> tuple[int, str]:
    tool = shutil.which("systemd-analyze")
    assert tool is not None
    out = subprocess.run(
        [tool, *args], capture_output=True, encoding="utf-8", errors="replace", timeout=120
    )
    return out.returncode, out.stdout + out.stderr


def verify(root: Path) -> tuple[int, list[str]]:
    """Return verify's exit code and what it said about this unit (warnings exit 0 too)."""
    code, output = systemd_analyze("verify", f"--root={root}", "--man=no", UNIT_NAME)
    return code, [line for line in output.splitlines() if "kvserve" in line]


def readme_drop_in() -> str:
    match = re.search(r"```ini\n(.*?)```", README.read_text(), re.DOTALL)
    assert match, "deploy/README.md has no ```ini drop-in example"
    return match.group(1)


@pytest.mark.parametrize("drop_in", ["none", "readme"])
def test_systemd_analyze_verify(unit_root: Path, drop_in: str) -> None:
    if drop_in == "readme":
        directory = unit_root / "etc/systemd/system" / f"{UNIT_NAME}.d"
        directory.mkdir()
        (directory / "override.conf").write_text(readme_drop_in())
    code, complaints = verify(unit_root)
    assert code == 0
    assert complaints == []


def test_systemd_analyze_verify_reports_a_broken_unit(unit_root: Path) -> None:
    """The check above can fail: systemd-analyze does read the unit in the scratch root."""
    path = unit_root / "etc/systemd/system" / UNIT_NAME
    path.write_text(path.read_text().replace("Restart=on-failure", "Restart=sometimes"))
    code, complaints = verify(unit_root)
    assert code == 0  # a bad value is a warning, exit 0: hence the check on the output
    assert any("sometimes" in line for line in complaints), complaints
    (unit_root / "opt").rename(unit_root / "gone")
    code, complaints = verify(unit_root)
    assert code != 0
    assert any("not executable" in line for line in complaints), complaints


def test_systemd_analyze_security_exposure(unit_root: Path) -> None:
    code, output = systemd_analyze(
        "security", "--offline=yes", f"--root={unit_root}", "--no-pager", UNIT_NAME
    )
    if code != 0 and "offline" in output:
        pytest.skip(f"this systemd-analyze has no offline security review: {output.strip()}")
    match = re.search(rf"Overall exposure level for {re.escape(UNIT_NAME)}: (\d+\.\d+)", output)
    assert match, output
    # 0.0 is fully confined, 10.0 not at all. Ours is 1.2: what is left is network access
    # (the service's job) and running within the host's root directory.
    assert float(match.group(1)) <= 2.0, output


# -- systemd unit: live --------------------------------------------------------------------


def test_unit_command_line_serves_pings_and_stops_cleanly(
    unit: Unit, tmp_path: Path, start_kvserve: StartKvserve
) -> None:
    credentials = tmp_path / "credentials"
    name = unit.value("Service", "LoadCredential").partition(":")[0]
    key = write_key(credentials / name)
    env = unit.environment() | {"KVSERVE_PORT": "0"}  # what a drop-in would do
    argv = expand_exec(unit.exec_start(), env, credentials)
    state = tmp_path / "state"
    argv = swap(argv, {"--data-dir": str(state)})
    argv[0] = str(BIN / "kvserve")

    server = start_kvserve(argv, clean_env(tmp_path))
    assert server.address.startswith("127.0.0.1:")
    # As deploy/README.md tells an operator to check it.
    health = dict(clean_env(tmp_path), KV_ADDRESS=server.address)
    ok = kvctl(["kvctl", "ping"], dict(health, KV_AUTHKEY_FILE=str(credentials / name)))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("pong ")
    write_key(tmp_path / "other-key")
    wrong = kvctl(["kvctl", "ping"], dict(health, KV_AUTHKEY_FILE=str(tmp_path / "other-key")))
    assert wrong.returncode == 3, wrong.stderr

    code, err = server.stop(timeout=float(unit.value("Service", "TimeoutStopSec")))
    assert code == 0, err
    assert f"authkey from {credentials / name}" in err
    assert key.hex() not in err
    assert any(state.iterdir()), "nothing written to the state directory"
    assert not (tmp_path / "home").exists(), "kvserve made a default key instead"


# -- container image: static ---------------------------------------------------------------


def test_image_base_is_python_311_slim(image: Image) -> None:
    froms = [i.rest.split()[0] for i in [*image.build, *image.final] if i.name == "FROM"]
    assert len(froms) == 2
    for ref in froms:
        resolved = re.sub(r"\$\{(\w+)\}", lambda m: image.build_args[m.group(1)], ref)
        assert resolved == "python:3.11-slim"
    # The venv copied between stages links to the base image's python: same image, both stages.
    assert len(set(froms)) == 1


def test_image_runs_as_a_fixed_non_root_user(image: Image) -> None:
    user = image.one("USER").rest
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0, f"USER {user}: give a numeric, non-root UID"
    assert gid.isdigit() and int(gid) > 0
    runs = " ".join(i.rest for i in image.final if i.name == "RUN")
    assert f"--uid {uid}" in runs and f"--gid {gid}" in runs  # the user the image creates
    names = [i.name for i in image.final]
    assert names.index("USER") > max(n for n, name in enumerate(names) if name == "RUN")


def test_image_cmd_uses_only_real_kvserve_flags(image: Image, kvserve_flags: set[str]) -> None:
    cmd = image.cmd()
    assert cmd[0] == "kvserve"
    assert "/opt/kvmanager/venv/bin" in image.env()["PATH"].split(":")
    used = set(flags_of(cmd[1:]))
    assert used <= kvserve_flags, f"not kvserve flags: {used - kvserve_flags}"


def test_image_cmd_matches_volume_port_and_secret(image: Image) -> None:
    cmd = image.cmd()
    assert option(cmd, "--host") == "0.0.0.0"  # the container's interface, reached via -p
    assert image.one("VOLUME").exec_form() == [option(cmd, "--data-dir")] == ["/data"]
    assert image.one("EXPOSE").rest == option(cmd, "--port") == "50000"
    assert option(cmd, "--authkey-file") == "/run/secrets/kvmanager-authkey"
    assert image.one("STOPSIGNAL").rest == "SIGTERM"


def test_image_health_check_is_kvctl_ping_on_the_served_port_and_key(
    image: Image, kvctl_flags: set[str]
) -> None:
    flags, check = image.healthcheck()
    assert check[0] == "kvctl"
    assert check[-1] == "ping"
    used = set(flags_of(check[1:-1]))
    assert used <= kvctl_flags, f"not kvctl flags: {used - kvctl_flags}"
    env, cmd = image.env(), image.cmd()
    # kvctl finds the server and the key through the environment the image sets.
    assert env["KV_ADDRESS"] == f"127.0.0.1:{option(cmd, '--port')}"
    assert env["KV_AUTHKEY_FILE"] == option(cmd, "--authkey-file")
    # kvctl must give up before Docker kills it, or a hung server reads as a hung check.
    assert float(option(check, "--timeout")) < float(flags["--timeout"].removesuffix("s"))
    assert {"--interval", "--timeout", "--start-period", "--retries"} <= flags.keys()


def test_image_never_carries_a_key(image: Image) -> None:
    assert "KV_AUTHKEY" not in image.env()
    assert "KV_AUTHKEY" not in image.build_args
    words = [*image.cmd(), *image.healthcheck()[1], *image.env().values()]
    assert not [w for w in words if looks_like_a_key(w)]
    assert not any(i.name == "ARG" and "KEY" in i.rest.upper() for i in image.final)


# -- container image: build context --------------------------------------------------------


def dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """Translate .dockerignore lines into ``(is_exception, regex)``, as Docker reads them."""
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.removeprefix("!")).lstrip("/")
        assert "[" not in pattern and "\\" not in pattern, f"teach the test {pattern!r}"
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((negate, re.compile(regex)))
    return rules


def in_context(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for negate, regex in rules:
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            excluded = not negate
    return not excluded


def context_files(root: Path, rules: list[tuple[bool, re.Pattern[str]]]) -> list[str]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        prefix = "" if rel == "." else rel + "/"
        # Never descend into an excluded directory (.git, .venv): only top-level names are
        # let back in, which in_context checks below.
        dirnames[:] = [d for d in dirnames if in_context(prefix + d, rules)]
        files += [prefix + f for f in filenames if in_context(prefix + f, rules)]
    return sorted(files)


def copy_sources(image: Image) -> list[tuple[list[str], str]]:
    """Return each build-stage ``COPY`` from the context as ``(sources, destination)``."""
    copies = []
    for instruction in image.build:
        if instruction.name == "COPY" and "--from" not in instruction.flags:
            words = shlex.split(instruction.rest)
            copies.append((words[:-1], words[-1]))
    assert copies, "the build stage copies nothing from the context"
    return copies


def test_dockerignore_sits_where_buildkit_looks() -> None:
    assert DOCKERIGNORE.name == DOCKERFILE.name + ".dockerignore"
    assert DOCKERIGNORE.parent == DOCKERFILE.parent


def test_build_context_holds_exactly_what_the_build_copies(image: Image) -> None:
    rules = dockerignore_rules(DOCKERIGNORE.read_text())
    top_level = {path.split("/")[0] for path in context_files(REPO, rules)}
    copied = {source.rstrip("/") for sources, _ in copy_sources(image) for source in sources}
    assert top_level == copied
    for path in ["authkey", ".git/config", ".venv/bin/python", "tests/conftest.py", "deploy/x"]:
        assert not in_context(path, rules), path
    assert not in_context("server/kvserve/__pycache__/server.cpython-311.pyc", rules)
    assert in_context("server/kvserve/server.py", rules)


# The build compiles (the image's KVMANAGER_MYPYC=1): ~35 s of CPU, over 120 s on a loaded VM.
@pytest.mark.timeout(600)
def test_build_context_builds_a_wheel_with_both_commands(image: Image, tmp_path: Path) -> None:
    """Do the build stage's COPYs and its ``pip install .``, minus Docker."""
    rules = dockerignore_rules(DOCKERIGNORE.read_text())
    src = tmp_path / "src"  # the stage's WORKDIR
    src.mkdir()
    for sources, destination in copy_sources(image):
        for source in sources:
            target = src / destination
            if (REPO / source).is_dir():
                shutil.copytree(
                    REPO / source,
                    target,
                    ignore=lambda d, names: [
                        n
                        for n in names
                        if not in_context(os.path.relpath(Path(d) / n, REPO), rules)
                    ],
                    dirs_exist_ok=True,
                )
            else:
                assert in_context(source, rules), f"{source} is COPYed but not in the context"
                shutil.copy(REPO / source, target / source if destination.endswith("/") else target)
    # The image build fetches hatchling (and, compiled, mypy) into an isolated build
    # environment; this reuses the ones installed here (the test extra), to stay offline. With
    # the build stage's ENV, so KVMANAGER_MYPYC=1 there compiles here too.
    wheel = build_wheel(src, tmp_path / "wheels", build_env(**image.env(image.build)), 600)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = archive.read(entry_points).decode()
    assert {"kvserve/__main__.py", "kvclient/cli.py"} <= names
    assert re.search(r"^kvserve = ", scripts, re.MULTILINE)
    assert re.search(r"^kvctl = ", scripts, re.MULTILINE)
    # The image is the compiled build: every module listed for mypyc, as an extension.
    extensions = {n.split(".", 1)[0] for n in names if n.endswith(".so")}
    assert {extension_path(path) for path in mypyc_paths()} <= extensions
    assert not wheel.name.endswith("-none-any.whl"), wheel.name


def test_image_is_the_compiled_build_with_the_compiler_in_the_build_stage_only(
    image: Image,
) -> None:
    assert image.env(image.build).get("KVMANAGER_MYPYC") == "1"
    assert "KVMANAGER_MYPYC" not in image.env()  # nothing in the image builds

    def runs(stage: list[Instruction]) -> str:
        return " ".join(i.rest for i in stage if i.name == "RUN")

    assert re.search(r"apt-get install .*\bgcc\b", runs(image.build))
    assert "gcc" not in runs(image.final)
    # The build stage checks what it installed before the runtime stage copies it.
    (install,) = [i.rest for i in image.build if i.name == "RUN" and "pip install ." in i.rest]
    assert "kvserve.engine" in install and ".py" in install


# -- container image: live -----------------------------------------------------------------


def test_image_command_and_health_check_against_a_real_kvserve(
    image: Image, tmp_path: Path, start_kvserve: StartKvserve
) -> None:
    cmd = image.cmd()
    secret = tmp_path / "secrets" / Path(option(cmd, "--authkey-file")).name
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    write_key(secret)
    argv = swap(
        cmd,
        {
            "--authkey-file": str(secret),
            "--data-dir": str(data),
            "--port": "0",
            # 0.0.0.0 is right inside a container; on this machine it would open the port to
            # the network for the length of the test.
            "--host": "127.0.0.1",
        },
    )
    argv[0] = str(BIN / "kvserve")
    server = start_kvserve(argv, clean_env(tmp_path))

    _, check = image.healthcheck()
    # The image's KV_* settings; its port is 50000, this server's is whatever port 0 got.
    env = clean_env(tmp_path) | {k: v for k, v in image.env().items() if k.startswith("KV_")}
    env["KV_ADDRESS"] = server.address
    healthy = kvctl(check, dict(env, KV_AUTHKEY_FILE=str(secret)))
    assert healthy.returncode == 0, healthy.stderr
    assert healthy.stdout.startswith("pong ")
    write_key(tmp_path / "other-key")
    wrong_key = kvctl(check, dict(env, KV_AUTHKEY_FILE=str(tmp_path / "other-key")))
    assert wrong_key.returncode == 3, wrong_key.stderr

    code, err = server.stop(timeout=10)  # Docker's default grace period
    assert code == 0, err
    assert any(data.iterdir()), "nothing written to the data volume"
    down = kvctl(check, dict(env, KV_AUTHKEY_FILE=str(secret)))
    assert down.returncode == 3, down.stderr


def test_image_without_the_secret_exits_instead_of_making_a_key(
    image: Image, tmp_path: Path
) -> None:
    cmd = image.cmd()
    missing = tmp_path / "secrets" / "kvmanager-authkey"
    argv = swap(cmd, {"--authkey-file": str(missing), "--data-dir": str(tmp_path), "--port": "0"})
    argv[0] = str(BIN / "kvserve")
    out = subprocess.run(argv, capture_output=True, text=True, env=clean_env(tmp_path), timeout=60)
    assert out.returncode == 3
    assert f"authkey file {missing} does not exist" in out.stderr
    assert out.stdout == ""  # never listened
    assert not (tmp_path / "home").exists()


# -- the README ----------------------------------------------------------------------------


def test_readme_names_the_paths_and_commands_the_files_use(unit: Unit, image: Image) -> None:
    text = README.read_text()
    exec_start = unit.exec_start()
    _, check = image.healthcheck()
    for needle in [
        exec_start[0],
        unit.value("Service", "LoadCredential").partition(":")[2],
        f"/run/credentials/{UNIT_NAME}/",
        option(exec_start, "--data-dir"),
        option(image.cmd(), "--authkey-file"),
        "docker build -f deploy/Dockerfile",
        " ".join(check),
        "head -c 32 /dev/urandom",
        "KV_AUTHKEY_FILE",
        "KV_ADDRESS",
    ]:
        assert needle in text, f"deploy/README.md does not mention {needle!r}"
