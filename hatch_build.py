"""The optional compiled build: hatchling's hook that compiles the hot modules with mypyc.

Off unless asked for, so ``pip install .`` needs no compiler and installs pure Python::

    KVMANAGER_MYPYC=1 pip install .        # a wheel whose hot modules are C extensions

With ``KVMANAGER_MYPYC=1`` a wheel build (never an editable install, never the sdist) asks for
mypy and setuptools as build dependencies, compiles the modules listed in pyproject.toml
(``[tool.hatch.build.targets.wheel.hooks.custom] mypyc-modules``) into one mypyc group, and adds
the extensions beside the ``.py`` files, which the wheel still carries: Python imports an
extension module in preference to the source next to it. The wheel is then tagged for this
interpreter and platform instead of ``py3-none-any``. A missing C compiler or a module mypyc
rejects fails the build: the opt-in never falls back to pure Python silently.

An editable install with ``KVMANAGER_MYPYC=1`` is refused: an extension built in the source
tree would be imported instead of the ``.py`` beside it, and edits to that file would be
ignored without a word.

Only hatchling is importable when this module is loaded (mypy and setuptools are installed
after :meth:`MypycBuildHook.dependencies` names them), so they are imported where used.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

ENV = "KVMANAGER_MYPYC"
# The compiler is part of the build: an exact mypy, so a wheel built tomorrow is the one that
# passed CI. Move it deliberately and run the compiled suite (.ci/run) with the new one.
BUILD_REQUIRES = ["mypy==2.4.1", "setuptools>=70"]
GROUP = "kvmanager"
"""mypyc group name: the shared library is ``kvmanager__mypyc.<ext>`` at the wheel's top."""


def compile_requested() -> bool:
    """Whether ``KVMANAGER_MYPYC`` asks for the compiled build (``1``; unset, empty or ``0``: no).

    Raises:
        ValueError: any other value, rather than guessing what was meant.
    """
    value = os.environ.get(ENV, "")
    if value not in ("", "0", "1"):
        raise ValueError(f"{ENV}={value!r}: expected 1 (compile with mypyc) or 0 (pure Python)")
    return value == "1"


class MypycBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    """Compile ``mypyc-modules`` into the wheel when :func:`compile_requested`."""

    PLUGIN_NAME = "mypyc"

    def dependencies(self) -> list[str]:
        """What a compiled build needs installed first; nothing for the pure one.

        Mypy (which is mypyc) and setuptools (its build_ext), and what mypy must see to type
        the modules as ``mypy --strict`` does in development: the runtime dependencies and the
        ``redis`` extra (without them their types are Any, and the strict check fails).
        """
        if not compile_requested():
            return []
        core = self.metadata.core
        return [*BUILD_REQUIRES, *core.dependencies, *core.optional_dependencies["redis"]]

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        """Compile, and hand the extensions to the wheel as extra files."""
        if self.target_name != "wheel" or not compile_requested():
            return
        if version == "editable":
            raise RuntimeError(
                f"{ENV}=1 builds a regular wheel: `{ENV}=1 pip install .` (not -e); an "
                "editable install with compiled modules would ignore edits to their .py files"
            )
        modules = self.config.get("mypyc-modules")
        if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
            raise TypeError("tool.hatch.build.targets.wheel.hooks.custom.mypyc-modules: a list")
        self._scratch = Path(tempfile.mkdtemp(prefix="kvmanager-mypyc-"))
        for built, target in _compile(Path(self.root), modules, self._scratch):
            build_data["force_include"][str(built)] = target
        build_data["pure_python"] = False
        build_data["infer_tag"] = True

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        """Remove the scratch directory (C sources, objects, the built extensions)."""
        scratch = getattr(self, "_scratch", None)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _compile(root: Path, modules: list[str], scratch: Path) -> list[tuple[Path, str]]:
    """Build ``modules`` (paths under ``root``) in ``scratch``; return (file, path in wheel)."""
    # Installed by then (dependencies() above), not when this module is loaded.
    from mypyc.build import mypycify  # noqa: PLC0415
    from setuptools import Distribution  # noqa: PLC0415
    from setuptools.command.build_ext import build_ext  # noqa: PLC0415

    cwd = os.getcwd()
    # mypy reads [tool.mypy] from pyproject.toml and names modules from mypy_path, both
    # relative to the project root; its cache and the generated C go to the scratch directory.
    os.chdir(root)
    try:
        extensions = mypycify(
            [*modules, "--cache-dir", str(scratch / "mypy-cache")],
            target_dir=str(scratch / "c"),
            group_name=GROUP,
            multi_file=True,
        )
        # A bare Distribution: setuptools must not read pyproject.toml (hatchling's project).
        command = build_ext(Distribution({"name": GROUP, "ext_modules": extensions}))
        command.build_lib = str(scratch / "lib")
        command.build_temp = str(scratch / "temp")
        command.parallel = os.cpu_count() or 1
        command.ensure_finalized()
        command.run()
    finally:
        os.chdir(cwd)
    lib = scratch / "lib"
    built = sorted(Path(output) for output in command.get_outputs())
    return [(path, path.relative_to(lib).as_posix()) for path in built]
