"""The optional compiled build (hatch_build.py): each build is what was asked for, never silently.

The suite runs against either build: CI installs kvmanager pure (``pip install -e .``) and
compiled (``KVMANAGER_MYPYC=1 pip install .``) and runs all of it against each, with
``KVMANAGER_MYPYC`` set for pytest as it was for the install. Here: with ``KVMANAGER_MYPYC=1``
every module pyproject.toml lists for mypyc must be an extension module (a build that fell back
to Python fails); without it every one must be the ``.py`` (a stale extension left beside the
source would shadow the code being tested). And the build hook itself: a pure wheel builds with
no C compiler anywhere, and an editable install refuses to compile.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import pkgutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
COMPILED = os.environ.get("KVMANAGER_MYPYC", "") == "1"
"""Whether the installed kvmanager is meant to be the compiled build."""


def mypyc_paths() -> list[str]:
    """The source paths pyproject.toml gives the mypyc hook (``mypyc-modules``)."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    paths = config["tool"]["hatch"]["build"]["targets"]["wheel"]["hooks"]["custom"]
    return [str(p) for p in paths["mypyc-modules"]]


def module_name(path: str) -> str:
    """``server/kvserve/engine.py`` -> ``kvserve.engine`` (the first directory is a source root)."""
    return ".".join(Path(path).with_suffix("").parts[1:])


def is_extension(module: ModuleType) -> bool:
    return str(module.__file__).endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def extension_path(path: str) -> str:
    """Where a compiled wheel holds the extension of ``path`` (``kvserve/engine.cpython-...``)."""
    return str(Path(path).with_suffix("").relative_to(Path(path).parts[0]))


def build_env(**extra: str) -> dict[str, str]:
    """This environment for a build: ``KVMANAGER_MYPYC`` only as ``extra`` gives it."""
    env = {k: v for k, v in os.environ.items() if k != "KVMANAGER_MYPYC"}
    return env | {"PIP_DISABLE_PIP_VERSION_CHECK": "1"} | extra


def build_wheel(source: Path, out: Path, env: dict[str, str], timeout: float = 300) -> Path:
    """``pip wheel`` the project in ``source`` into ``out``; offline (no build isolation)."""
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    done = subprocess.run(
        [*pip, "-w", str(out), "."],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = out.glob("kvmanager-*.whl")
    return wheel


MODULES = [module_name(path) for path in mypyc_paths()]


@pytest.mark.parametrize("name", MODULES)
def test_each_listed_module_is_the_build_asked_for(name: str) -> None:
    module = importlib.import_module(name)
    if COMPILED:
        assert is_extension(module), f"KVMANAGER_MYPYC=1 but {name} is {module.__file__}"
    else:
        assert not is_extension(module), (
            f"{name} is {module.__file__} but KVMANAGER_MYPYC is not 1: testing the compiled "
            "build, set it; else a stale extension shadows the .py beside it: delete it"
        )


def test_the_list_names_modules_of_the_three_packages() -> None:
    assert MODULES, "pyproject.toml lists no module for mypyc"
    for path in mypyc_paths():
        assert (REPO / path).is_file(), path
        assert Path(path).parts[0] in {"protocol", "server", "client"}, path


def test_a_monkeypatched_class_stays_python() -> None:
    # tests/test_cli.py replaces kvclient.Client methods; a compiled class would refuse that.
    assert "kvclient.client" not in MODULES
    import kvclient.client

    assert not is_extension(kvclient.client)


def _interpreted_subclasses_of_compiled() -> list[tuple[type, type]]:
    """Every (class of an unlisted module, its base from a listed module) in the packages."""
    listed = set(MODULES)
    pairs = []
    for package in ("kvproto", "kvserve", "kvclient"):
        root = importlib.import_module(package)
        for info in pkgutil.walk_packages(root.__path__, f"{package}."):
            if info.name in listed or info.name.endswith("__main__"):
                continue
            module = importlib.import_module(info.name)
            for cls in vars(module).values():
                if not isinstance(cls, type) or cls.__module__ != info.name:
                    continue
                pairs += [(cls, base) for base in cls.__mro__[1:] if base.__module__ in listed]
    return pairs


def test_interpreted_code_subclasses_only_compiled_classes_that_allow_it() -> None:
    """mypyc refuses, when the object is made, an interpreted subclass of a native class.

    Found by making an object of a fresh subclass of each such base (``__new__`` only: no
    constructor runs); passes trivially in the pure build and fails in the compiled one for a
    base without ``@mypyc_attr(allow_interpreted_subclasses=True)``.
    """
    pairs = _interpreted_subclasses_of_compiled()
    assert any(base.__name__ == "RequestIds" for _, base in pairs), pairs  # the walk works
    for cls, base in pairs:
        probe = type(f"Probe{base.__name__}", (base,), {})
        try:
            probe.__new__(probe)  # type: ignore[call-overload]
        except TypeError as exc:
            pytest.fail(f"{cls.__module__}.{cls.__qualname__} subclasses compiled {base}: {exc}")


def test_a_pure_wheel_needs_no_compiler(tmp_path: Path) -> None:
    # No C compiler reachable: only the interpreter's directory on PATH, and CC pointing nowhere.
    env = build_env(PATH=str(Path(sys.executable).parent), CC=str(tmp_path / "no-cc"))
    wheel = build_wheel(REPO, tmp_path, env)
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert "kvserve/engine.py" in names
    assert not [n for n in names if n.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))]


def hatchling_hook(hook: str, out: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run hatchling's PEP 517/660 ``hook`` on the project (pip would install what it builds)."""
    code = f"import sys, hatchling.build as b; b.{hook}(sys.argv[1])"
    return subprocess.run(
        [sys.executable, "-c", code, str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_an_editable_install_refuses_to_compile(tmp_path: Path) -> None:
    done = hatchling_hook("build_editable", tmp_path, build_env(KVMANAGER_MYPYC="1"))
    assert done.returncode != 0
    assert "KVMANAGER_MYPYC=1 builds a regular wheel" in done.stderr
    assert not list(tmp_path.iterdir())


def test_a_value_other_than_0_or_1_is_refused(tmp_path: Path) -> None:
    done = hatchling_hook("build_wheel", tmp_path, build_env(KVMANAGER_MYPYC="yes"))
    assert done.returncode != 0
    assert "KVMANAGER_MYPYC='yes': expected 1" in done.stderr
