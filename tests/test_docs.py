"""The docs stay true: the plugin guide is the installed example, every hook is documented and tested."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from patchkit import hookspecs

ROOT = Path(__file__).resolve().parents[1]


def code_blocks(markdown: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", markdown, flags=re.S)


def test_plugin_guide_shows_the_example_distribution_verbatim():
    guide = (ROOT / "docs" / "write-a-plugin.md").read_text()
    example = ROOT / "docs" / "example-plugin"
    assert (example / "pyproject.toml").read_text() in code_blocks(guide, "toml")
    assert (example / "src" / "patchkit_nodropout" / "__init__.py").read_text() in code_blocks(guide, "python")


def test_every_hook_is_documented_and_tested():
    hooks = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("register_")]
    assert hooks, "no hook specs found"
    api = (ROOT / "docs" / "api.md").read_text()
    tests = "".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py") if p.name != "test_docs.py")
    for hook in hooks:
        assert f"### `{hook}(register)`" in api, f"{hook} is not documented in docs/api.md"
        assert f"def {hook}(register" in tests, f"{hook} has no test implementing it"


def test_readme_starts_with_exactly_two_setup_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    first_block = code_blocks(readme, "bash")[0].strip().splitlines()
    assert len(first_block) == 2 and first_block[0].endswith("patchkit demo")
    test_command = first_block[1].split("&&")[-1].strip()
    assert test_command in (ROOT / ".ci" / "run").read_text()
