"""The conformance machinery itself: the registry in tests/backends.py and the `kv` parametrization.

The end-to-end tests run an inner pytest (a subprocess, through `pytester`) whose conftest is
ours plus made-up implementations: one that is unavailable, one that is a second kvserve with
expected differences. That is how an unavailable backend, a CI run, `--backend` and a strict
xfail are shown to behave, without a second real backend on this machine.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle  # to check that a Target travels to a worker; never used on the wire
import subprocess
import sys
from pathlib import Path

import pytest

import kvclient
from tests import backends
from tests.backends import Implementation
from tests.targets import ClientFactory, Target

ROOT = Path(__file__).resolve().parent.parent


def _collect_conformance() -> list[str]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            "conformance",
            "tests",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [line for line in proc.stdout.splitlines() if "::" in line]


def test_the_registry_is_well_formed_and_no_expected_difference_is_stale() -> None:
    nodeids = _collect_conformance()
    assert backends.DEFAULT_ID in backends.by_id()
    for impl in backends.IMPLEMENTATIONS:
        runs = [n for n in nodeids if f"[{impl.id}]" in n or f"[{impl.id}-" in n]
        assert runs, f"{impl.id}: no conformance test runs against it"
    assert backends.registry_problems(backends.IMPLEMENTATIONS, nodeids) == []


def _impl(id: str, differences: dict[str, str] | None = None) -> Implementation:
    return Implementation(
        id=id,
        start=backends.kvserve_in_thread,
        connect=backends.kvclient_connect,
        expected_differences=differences or {},
    )


def test_registry_problems_names_each_defect() -> None:
    collected = ["tests/test_a.py::test_one[kvserve-sync]", "tests/test_a.py::test_two[x-1]"]
    good = _impl("good", {"tests/test_a.py::test_one": "documented", "tests/test_a.py::*": "all"})
    assert backends.registry_problems([good], collected) == []

    problems = backends.registry_problems(
        [
            good,
            _impl("good"),
            _impl("Bad_Id"),
            _impl(
                "stale",
                {
                    "tests/test_a.py::test_gone": "was fixed",
                    "tests/test_a.py::test_one": "  ",
                    "tests/test_a.py::test_two[x-1]": "one parameter",
                    "test_one": "not a node id",
                },
            ),
        ],
        collected,
    )
    assert problems == [
        "good: id used twice",
        "'Bad_Id': id must be lowercase words joined by hyphens",
        "stale: tests/test_a.py::test_gone: names no conformance test (stale?)",
        "stale: tests/test_a.py::test_one: expected difference without a reason",
        "stale: tests/test_a.py::test_two[x-1]: not a test node id without parameters"
        " (tests/test_x.py::test_y)",
        "stale: test_one: not a test node id without parameters (tests/test_x.py::test_y)",
    ]


def test_an_expected_difference_covers_every_parametrization_of_its_test() -> None:
    impl = _impl("x", {"tests/test_a.py::test_one": "why", "tests/test_b.py::test_q_*": "q"})
    assert impl.difference("tests/test_a.py::test_one[x]") == "why"
    assert impl.difference("tests/test_a.py::test_one[x-fork]") == "why"
    assert impl.difference("tests/test_a.py::test_one_more[x]") is None
    assert impl.difference("tests/test_b.py::test_q_get[x]") == "q"
    assert impl.difference("tests/test_b.py::test_p[x]") is None


@pytest.mark.parametrize(
    ("ci", "expected"),
    [
        (None, "skip"),
        ("", "skip"),
        ("false", "skip"),
        ("0", "skip"),
        ("true", "fail"),
        ("1", "fail"),
    ],
)
def test_an_unavailable_implementation_is_skipped_except_in_ci(
    ci: str | None, expected: str
) -> None:
    env = {} if ci is None else {"CI": ci}
    absent = Implementation(
        id="absent",
        start=backends.kvserve_in_thread,
        connect=backends.kvclient_connect,
        unavailable=lambda: "redis-server not on PATH",
    )
    outcome = backends.unavailable_outcome(absent, env)
    assert outcome is not None
    assert outcome[0] == expected
    assert "absent is not available here: redis-server not on PATH" in outcome[1]
    assert backends.unavailable_outcome(_impl("present"), env) is None


INNER_CONFTEST = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})

from tests import backends

# Only the sync client of the real registry: the counts below are about the machinery, not
# about how many front ends tests/backends.py lists.
backends.IMPLEMENTATIONS = (backends.by_id()["kvserve-sync"],) + (
    backends.Implementation(
        id="absent",
        start=backends.kvserve_in_thread,
        connect=backends.kvclient_connect,
        unavailable=lambda: "nothing to start on this machine",
    ),
    backends.Implementation(
        id="kvserve-again",
        start=backends.kvserve_in_thread,
        connect=backends.kvclient_connect,
        expected_differences={{
            "test_inner.py::test_differs": "kvserve-again keeps no dicts (documented)",
            "test_inner.py::test_fixed": "an entry whose difference went away",
        }},
    ),
)

from tests.conftest import *  # noqa: E402,F403
"""

INNER_TESTS = """
import kvclient

def test_same(kv: kvclient.Client) -> None:
    kv.dict("d")["a"] = 1
    assert kv.dict("d")["a"] == 1

def test_differs(kv: kvclient.Client, implementation: object) -> None:
    assert getattr(implementation, "id") != "kvserve-again"

def test_fixed(kv: kvclient.Client) -> None:
    assert kv.dict("d").get("a") is None

def test_kvserve_only(kv: kvclient.Client, address: str) -> None:
    kv.dict("d")["a"] = 2
    assert address
"""


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.delenv("CI", raising=False)
    pytester.makeconftest(INNER_CONFTEST)
    pytester.makepyfile(test_inner=INNER_TESTS)
    return pytester


def _run(inner: pytest.Pytester, *args: str) -> pytest.RunResult:
    return inner.runpytest_subprocess("-p", "no:cacheprovider", "-ra", "-v", *args, timeout=120)


def test_each_implementation_runs_the_suite_with_its_differences_and_absences_reported(
    inner: pytest.Pytester,
) -> None:
    result = _run(inner)
    result.assert_outcomes(passed=5, failed=1, skipped=3, xfailed=1)
    result.stdout.fnmatch_lines_random(
        [
            "*test_same?kvserve-sync? PASSED*",
            "*test_same?kvserve-again? PASSED*",
            "*test_differs?kvserve-again? XFAIL*",
            "*test_kvserve_only PASSED*",
            "SKIPPED * absent is not available here: nothing to start on this machine",
            "XFAIL *test_differs?kvserve-again? - kvserve-again: kvserve-again keeps no dicts*",
            # strict: a difference that went away fails the run until its entry is removed
            "[[]XPASS(strict)[]] kvserve-again: an entry whose difference went away",
            "FAILED *test_fixed?kvserve-again? - *XPASS(strict)*",
        ]
    )


def test_in_ci_an_unavailable_implementation_fails(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CI", "true")
    result = _run(inner, "-k", "same")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["ERROR *test_same?absent? - *absent is not available here*CI*"])


def test_conformance_marker_selects_exactly_the_parametrized_tests(inner: pytest.Pytester) -> None:
    result = inner.runpytest_subprocess("-p", "no:cacheprovider", "--collect-only", "-q")
    everything = [line for line in result.stdout.lines if "::" in line]
    result = inner.runpytest_subprocess(
        "-p", "no:cacheprovider", "--collect-only", "-q", "-m", "conformance"
    )
    conformance = [line for line in result.stdout.lines if "::" in line]
    assert len(conformance) == 9
    assert set(everything) - set(conformance) == {"test_inner.py::test_kvserve_only"}
    assert all(
        line.endswith(("[kvserve-sync]", "[absent]", "[kvserve-again]")) for line in conformance
    )


def test_backend_option_selects_implementations(inner: pytest.Pytester) -> None:
    result = _run(inner, "--backend", "kvserve-again")
    result.assert_outcomes(passed=2, failed=1, xfailed=1)
    result = _run(inner, "--backend", "kvserve-sync", "--backend", "absent", "-m", "conformance")
    result.assert_outcomes(passed=3, skipped=3)
    result = _run(inner, "--backend", "nope")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*--backend nope: unknown; known: kvserve-sync, absent, kvserve-again"]
    )


def _child_reports(target: Target) -> None:
    with target.connect() as kv:
        kv.dict("meta")["child"] = [kv.dict("meta")["x"], kv.owner_id]


def test_more_clients_and_worker_processes_reach_the_store_kv_uses(
    request: pytest.FixtureRequest,
    implementation: Implementation,
    kv: kvclient.Client,
    kv2: kvclient.Client,
    kv_factory: ClientFactory,
    kv_target: Target,
) -> None:
    # `start` again within the test reaches what it started, not a second, empty store.
    assert implementation.start(request) == kv_target.address
    assert kv_target.implementation == implementation.id
    kv.dict("meta")["x"] = 1
    third = kv_factory()
    assert (kv2.dict("meta")["x"], third.dict("meta")["x"]) == (1, 1)
    owners = {kv.owner_id, kv2.owner_id, third.owner_id}
    assert len(owners) == 3  # each client is another owner
    assert pickle.loads(pickle.dumps(kv_target)) == kv_target
    child = mp.get_context("spawn").Process(target=_child_reports, args=(kv_target,))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    seen, child_owner = kv.dict("meta")["child"]
    assert seen == 1 and child_owner not in owners
    with ClientFactory(kv_target) as factory:
        d = factory().dict("meta")
        assert d["x"] == 1
    with pytest.raises(kvclient.KVError, match="closed"):
        d["x"] = 2  # the factory closed what it opened
