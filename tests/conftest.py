"""Shared fixtures: real plugin distributions installed with pip into temporary folders."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import patchkit.registry

# The suite tests each path's exactness on tiny models, where the cost model would pick the original
# path for most calls: it runs the padding-free path as before unless a test asks otherwise
# (tests/test_paths.py tests the per-call choice with PATCHKIT_PATH unset or path="auto").
os.environ.setdefault("PATCHKIT_PATH", "packed")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_PLUGIN = ROOT / "docs" / "example-plugin"


def pip_install_target(project: Path, target: Path) -> None:
    """Install ``project`` for real (offline, no deps) into ``target``."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(project),
        ],
        check=True,
    )


# What building a project in place leaves behind (setuptools' build/ and *.egg-info, bytecode).
BUILD_LEFTOVERS = ("build", "dist", "*.egg-info", "__pycache__")


@pytest.fixture(scope="session")
def example_plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder where the docs' example plugin distribution is pip-installed.

    Built from a copy in a temporary folder: pip builds a local project in place (setuptools writes
    ``build/`` and ``*.egg-info`` next to the sources), which must not happen in the source tree.
    """
    project = tmp_path_factory.mktemp("example-src") / EXAMPLE_PLUGIN.name
    shutil.copytree(EXAMPLE_PLUGIN, project, ignore=shutil.ignore_patterns(*BUILD_LEFTOVERS))
    target = tmp_path_factory.mktemp("example-site")
    pip_install_target(project, target)
    return target


BROKEN = {
    "pk_broken_import": "raise ImportError('this plugin needs a package that is missing')\n",
    "pk_broken_hook": """
        import patchkit
        @patchkit.hookimpl
        def register_patchers(register):
            raise RuntimeError('boom in hook')
    """,
    "pk_future_api": """
        import patchkit
        PATCHKIT_API = '>=2'
        @patchkit.hookimpl
        def register_patchers(register):
            raise AssertionError('must not be called')
    """,
    "pk_needs_missing": """
        import patchkit
        REQUIRES = {'patchkit-nonexistent-package': '>=1'}
        @patchkit.hookimpl
        def register_patchers(register):
            raise AssertionError('must not be called')
    """,
    "pk_string_match": """
        import patchkit
        @patchkit.hookimpl
        def register_patchers(register):
            register(patchkit.Patcher(name='by-name', kind='other', family='x', match='Linear', build=lambda m, c: m))
    """,
    "pk_bad_hookimpl": """
        import patchkit
        @patchkit.hookimpl
        def register_patchers(callback):
            pass
    """,
}


@pytest.fixture(scope="session")
def broken_plugins_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real distribution whose entry points are broken in every way a plugin can be."""
    project = tmp_path_factory.mktemp("broken-src")
    eps = "\n".join(f'{name.removeprefix("pk_")} = "{name}"' for name in BROKEN)
    (project / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [build-system]
            requires = ["setuptools>=64"]
            build-backend = "setuptools.build_meta"
            [project]
            name = "patchkit-broken-plugins"
            version = "0.0.1"
            [tool.setuptools]
            py-modules = [{mods}]
            [project.entry-points.patchkit]
            """
        ).format(mods=", ".join(f'"{m}"' for m in BROKEN))
        + eps
        + "\n"
    )
    for name, body in BROKEN.items():
        (project / f"{name}.py").write_text(textwrap.dedent(body))
    target = tmp_path_factory.mktemp("broken-site")
    pip_install_target(project, target)
    return target


@pytest.fixture
def fresh_default_registry():
    """Make patchkit rediscover entry points (after sys.path changed) and forget afterwards."""
    patchkit.registry.reset_default_registry()
    yield
    patchkit.registry.reset_default_registry()
