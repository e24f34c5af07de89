"""The docs stay true: the plugin guide is the installed example, every hook is documented and tested."""

from __future__ import annotations

import inspect
import re
import shutil
import subprocess
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


def test_installing_the_example_plugin_leaves_the_source_tree_clean(example_plugin_site: Path) -> None:
    """The fixture pip-installs docs/example-plugin from a copy: nothing is built next to its sources."""
    from conftest import BUILD_LEFTOVERS, EXAMPLE_PLUGIN

    assert (example_plugin_site / "patchkit_nodropout" / "__init__.py").is_file()  # the fixture did install it
    leftovers = sorted(str(p.relative_to(ROOT)) for pattern in BUILD_LEFTOVERS for p in EXAMPLE_PLUGIN.rglob(pattern))
    assert not leftovers, f"built in the source tree (delete them if an older run left them): {leftovers}"
    if (ROOT / ".git").exists() and shutil.which("git"):
        status = subprocess.run(
            ["git", "status", "--porcelain", "--ignored", "--", str(EXAMPLE_PLUGIN)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert status == "", f"docs/example-plugin is not as committed:\n{status}"


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


GUIDE_ITEMS = {
    # issue 12: what an outside developer needed and could not find
    "build returns None for an in-place patch": "**`None` for an in-place patch**",
    "testing without installing others": "registry = Registry()",
    "add_plugin": "registry.add_plugin(",
    "load_entry_points": "Registry.load_entry_points()",
    "registry= argument": "`registry=` is accepted by `apply`, `plan` and `patched`",
    "Requirements field types": "`devices: frozenset[str]`",
    "Requirements dtypes type": "frozenset[torch.dtype]",
    "share_as shares": "**hook dicts are\nshared**",
    "share_as copies": "The **containers**",
    "match needs the class": "**`match=` needs the class, so import heavy packages inside the hook.**",
    "conflict test": "**Conflicts**",
    "fault injection through a Registry": "**Fault injection**: subclass `Registry`",
    "bnb layer types": "quantizes `nn.Linear` **and its subclasses**",
    "Conv1D": "plus transformers' `Conv1D`",
    # issue 10's contract
    "two-phase apply": "**`build` and `setup` must not destroy anything a rollback needs**",
    "on_commit": "`ctx.on_commit(step)`",
    "on_reverse harmless": "**harmless if the change was\n  never made**",
    "on_reverse no closures": "**module-level function, a bound method, or a `functools.partial` over objects**",
    "pickling refused": "refuses to be\n  pickled",
    "two-phase reverse": "**returns a commit callable**",
    "reverse resumes": "it resumes",
    "options": "| `options` | `Mapping[str, str] \\| None` |",
    "same_checkpoint": "| `same_checkpoint` | `bool \\| None` |",
    "covers": "| `covers` | `tuple[str, ...]` |",
    "cache": "`ctx.cache` is a `dict`",
    "API 1.1": "this release: 1.1",
    "unavailable": "the plugin is `unavailable`, with the install command",
    "scoped names": "scopes it as `plugin:name`",
    # issue 19: what a plugin author hit
    "checkpoint_source in check and build": "There `ctx.checkpoint_source(tensor)` answers in\n`check` and `build`",
    "TensorSource.read": "`TensorSource.read(where)` reads the tensor back",
    "stacked patchers": "**Stacked patchers**",
    "pickling refused by the core": "**Pickling is refused for you.**",
    "restore never on rollback": "**`restore` is never called on a rollback**",
    "same_checkpoint not trusted": "is **not trusted**",
    "core keep_original and guards": "## A quantizer: what the core does for you",
    "weight copies under the meta build": "### Patchers that copy weights, under `patchkit.from_pretrained`",
    "toolkit": "## Helpers: `patchkit.toolkit`",
}


def test_plugin_guide_covers_what_plugin_authors_asked_for():
    guide = (ROOT / "docs" / "write-a-plugin.md").read_text()
    missing = [item for item, text in GUIDE_ITEMS.items() if text not in guide]
    assert not missing, f"docs/write-a-plugin.md does not cover: {missing}"


def test_api_reference_is_current():
    import patchkit

    api = (ROOT / "docs" / "api.md").read_text()
    assert f"this release: {patchkit.registry.PLUGIN_API_VERSION}" in api
    # deprecated, not removed (the deprecation policy): documented as such, with its replacement
    assert "`ctx.dry_run` is deprecated" in api and "## Deprecation policy" in api
    for name in ("covers", "same_checkpoint", "on_commit", "ctx.cache", "Swap", "Registry()", "add_plugin"):
        assert name in api, name
    for flag in ("--patch", "--train", "-o key=value", "--lenient"):
        assert flag in api, flag


def _row(markdown: str, call: str) -> str:
    """The table row of docs/api.md whose first cell starts with ``call``."""
    rows = [line for line in markdown.splitlines() if line.startswith(f"| `{call}")]
    assert len(rows) == 1, f"no single row for {call}"
    return rows[0]


def test_api_rows_list_every_parameter_of_the_entry_points():
    import patchkit

    api = (ROOT / "docs" / "api.md").read_text()
    for fn in (patchkit.apply, patchkit.from_pretrained, patchkit.save_pretrained):
        signature = _row(api, f"patchkit.{fn.__name__}(").split("|")[1]
        for name, param in inspect.signature(fn).parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                name = f"**{name}"
            assert name in signature, f"docs/api.md: patchkit.{fn.__name__} does not list {name}"
    assert "`registry=`" in _row(api, "patchkit.from_pretrained(")


def test_api_documents_the_toolkit_and_what_plugin_authors_asked():
    from patchkit import toolkit

    api = (ROOT / "docs" / "api.md").read_text()
    section = api.split("## Toolkit for plugin authors", 1)[1].split("\n## ", 1)[0]
    missing = [name for name in toolkit.__all__ if f"`{name}" not in section]
    assert not missing, f"docs/api.md's toolkit section does not document {missing}"
    assert "**Stability.**" in section
    # checkpoint_source: check and build while loading (patcher.py, loading.py), not build alone
    assert "It answers in both `check` and `build`" in api and "only valid inside `build`" not in api
    assert '`.read(where="") -> torch.Tensor`' in _row(api, "patchkit.TensorSource")
    assert "must refuse, or defer the copy" in api


def test_patcher_pages_do_not_say_attention_patched_models_refuse_to_save():
    import patchkit

    registry = patchkit.Registry()
    registry.load_entry_points()
    attention = [p for p in registry.patchers() if p.kind == "attention"]
    assert attention  # saving while patched is verified per save (test_contract, test_save_guard), not declared
    for page in ("sdpa.md", "flash2.md"):
        text = " ".join((ROOT / "docs" / "patchers" / page).read_text().split())
        assert "`save_pretrained` refuses" not in text, page


def test_the_quantizer_example_in_the_plugin_guide_runs_as_documented(tmp_path: Path) -> None:
    """The guide's complete int8 quantizer, run as written: what it says the core does for it holds."""
    import copy
    import pickle
    import types

    import pytest
    import torch
    from torch import nn

    import patchkit

    guide = (ROOT / "docs" / "write-a-plugin.md").read_text()
    [source] = [b for b in code_blocks(guide, "python") if b.startswith("# example: int8 quantizer")]
    plugin = types.ModuleType("tq8_example")
    exec(compile(source, "write-a-plugin.md", "exec"), plugin.__dict__)
    registry = patchkit.Registry()
    assert registry.add_plugin(plugin, name="tq8").status == "loaded"

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    params = [(p, p.detach().clone()) for p in model.parameters()]
    x = torch.randn(4, 16)
    expected = model(x).detach()
    for keep in ("cpu", str(tmp_path / "kept")):
        patchkit.apply(model, quantize="tq8", keep_original=keep, registry=registry)
        assert params[0][0].numel() == 0 and torch.allclose(model(x), expected, atol=0.05)  # freed, quantized
        with pytest.raises(patchkit.PatchedModelError, match="load_state_dict"):
            model.load_state_dict(copy.deepcopy(model.state_dict()))
        with pytest.raises(patchkit.PatchedModelError):
            pickle.dumps(model)
        patchkit.reverse(model)  # the same Parameter objects, bit for bit
        assert all(p is q and torch.equal(p, v) for (p, v), q in zip(params, model.parameters(), strict=True))
    patchkit.apply(model, quantize="tq8", registry=registry)
    patchkit.reverse(model)  # no keep_original: dequantized
    assert all(torch.allclose(p, v, atol=0.02) for p, v in params) and not torch.equal(model[0].weight, params[0][1])
