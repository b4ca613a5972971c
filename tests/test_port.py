"""The README's porting example: a SyncManager program and its kvmanager port, run and compared.

The two programs (``tests/port_stdlib.py``, ``tests/port_kvclient.py``) differ only in their
imports and constructor lines; the README shows that difference as a diff, and this test
checks that the README's diff is the real one.
"""

from __future__ import annotations

import difflib
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
STDLIB = ROOT / "tests" / "port_stdlib.py"
PORTED = ROOT / "tests" / "port_kvclient.py"


def readme_diff() -> str:
    """Return the unified diff of the two programs, as the README shows it."""
    diff = difflib.unified_diff(
        STDLIB.read_text().splitlines(),
        PORTED.read_text().splitlines(),
        "with_syncmanager.py",
        "with_kvmanager.py",
        n=1,
        lineterm="",
    )
    return "\n".join(diff)


def _run(program: Path, env: dict[str, str]) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, str(program)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_the_ported_program_gives_the_same_results(kvserve_proc: ServerProcess) -> None:
    env = dict(kvserve_proc.env, KV_ADDRESS=kvserve_proc.address)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    expected = _run(STDLIB, env)
    assert expected["total"] == 20 * (4 + 5 + 2)  # the program itself works
    assert expected["state"] == "done"
    assert _run(PORTED, env) == expected


def test_the_readme_shows_the_real_diff_and_it_touches_only_imports_and_constructors() -> None:
    diff = readme_diff()
    assert f"```diff\n{diff}\n```" in (ROOT / "README.md").read_text()
    changed = [
        line[1:].strip()
        for line in diff.splitlines()[2:]
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    assert changed
    for line in filter(None, changed):
        constructs = " = manager." in line or " = kv." in line
        assert constructs or line.startswith(("import ", "from ", "with ")), line
