"""Plugin discovery through real entry points of pip-installed distributions."""

from __future__ import annotations

import pytest
import torch
from helpers import snapshot
from torch import nn

import patchkit
from patchkit import PluginError, Registry


def test_example_plugin_from_docs_discovered_planned_applied_reversed(
    example_plugin_site, monkeypatch, fresh_default_registry
):
    monkeypatch.syspath_prepend(str(example_plugin_site))
    info = {p.name: p for p in patchkit.plugins()}["nodropout"]
    assert info.status == "loaded" and info.version == "1.0.0" and info.patchers == ["nodropout"]
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.Sequential(nn.Dropout(0.2))).eval()
    before = snapshot(model)
    assert [p.paths for p in patchkit.plan(model, patch="nodropout").patches] == [["1"], ["2.0"]]
    report = patchkit.apply(model, patch="nodropout")
    assert {s.replacement for s in report.swaps} == {"NoDropout"} and report.swaps[0].plugin == "nodropout"
    model.train()  # a NoDropout never drops, even in training mode
    x = torch.ones(4, 3)
    assert torch.equal(model[1](x), x)
    model.eval()
    patchkit.reverse(model)
    assert snapshot(model) == before
    with pytest.raises(patchkit.UnsupportedError, match="model.eval"):
        patchkit.apply(model.train(), patch="nodropout")


def test_first_party_plugins_use_the_same_entry_point_group():
    from importlib.metadata import entry_points

    names = {ep.name: ep.value for ep in entry_points(group="patchkit")}
    assert {"flash2", "sdpa", "bnb"} <= set(names)
    # core never imports its plugins: a fresh interpreter importing patchkit loads none of them
    import subprocess
    import sys

    code = "import patchkit, sys; print(sorted(m for m in sys.modules if m.startswith('patchkit_')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_broken_plugins_are_isolated_and_listed(broken_plugins_site, monkeypatch):
    monkeypatch.syspath_prepend(str(broken_plugins_site))
    monkeypatch.delenv("PATCHKIT_STRICT_PLUGINS", raising=False)
    registry = Registry()
    registry.load_entry_points()
    infos = {p.name: p for p in registry.plugins()}
    assert infos["broken_import"].status == "failed" and "missing" in infos["broken_import"].reason
    assert infos["broken_hook"].status == "failed" and "boom in hook" in infos["broken_hook"].reason
    assert infos["future_api"].status == "skipped" and "patchkit plugin API>=2" in infos["future_api"].reason
    assert infos["needs_missing"].status == "skipped" and "not installed" in infos["needs_missing"].reason
    assert infos["string_match"].status == "failed" and "never a class-name string" in infos["string_match"].reason
    assert "by-name" in infos["string_match"].reason  # the error quotes the offending definition
    assert infos["bad_hookimpl"].status == "failed" and "callback" in infos["bad_hookimpl"].reason
    # the healthy first-party plugins still loaded
    assert infos["sdpa"].status in ("loaded", "skipped")
    assert "by-name" not in {p.name for p in registry.patchers()}


def test_strict_plugins_env_raises(broken_plugins_site, monkeypatch):
    monkeypatch.syspath_prepend(str(broken_plugins_site))
    monkeypatch.setenv("PATCHKIT_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="broken_hook|broken_import|bad_hookimpl"):
        Registry().load_entry_points()


def test_disable_plugins_env(broken_plugins_site, monkeypatch):
    monkeypatch.syspath_prepend(str(broken_plugins_site))
    monkeypatch.setenv("PATCHKIT_DISABLE_PLUGINS", "broken_import, broken_hook")
    registry = Registry()
    registry.load_entry_points()
    infos = {p.name: p for p in registry.plugins()}
    assert infos["broken_import"].status == "skipped" and "PATCHKIT_DISABLE_PLUGINS" in infos["broken_import"].reason
    assert infos["broken_hook"].status == "skipped"


def test_registration_is_strict():
    import types

    module = types.ModuleType("dup")

    @patchkit.hookimpl
    def register_patchers(register):
        patcher = patchkit.Patcher(name="same", kind="other", family="f", match=nn.Linear, build=lambda m, c: m)
        register(patcher)
        register(patcher)

    module.register_patchers = register_patchers
    info = Registry().add_plugin(module, name="dup")
    assert info.status == "failed" and "already taken" in info.reason
    module2 = types.ModuleType("wrongkind")

    @patchkit.hookimpl
    def register_patchers2(register):
        register(patchkit.Patcher(name="k", kind="fancy", family="f", match=nn.Linear, build=lambda m, c: m))

    module2.register_patchers = register_patchers2
    info = Registry().add_plugin(module2, name="wrongkind")
    assert info.status == "failed" and "kind must be one of" in info.reason
    module3 = types.ModuleType("notpatcher")

    @patchkit.hookimpl
    def register_patchers3(register):
        register("hello")

    module3.register_patchers = register_patchers3
    assert "takes patchkit.Patcher" in Registry().add_plugin(module3, name="np").reason


def test_attention_backend_hook_registers_backends():
    import types

    module = types.ModuleType("kern")

    @patchkit.hookimpl
    def register_attention_backends(register):
        register(
            patchkit.AttentionBackend(
                name="mykernel", varlen=lambda *a, **k: None, unavailable=lambda device, dtype, needs: None
            )
        )

    module.register_attention_backends = register_attention_backends
    registry = Registry()
    info = registry.add_plugin(module, name="kern", version="1.2")
    assert info.backends == ["mykernel"] and registry.attention_backends()["mykernel"].plugin == "kern"
    other = types.ModuleType("kern2")
    other.register_attention_backends = register_attention_backends
    assert "already offered" in registry.add_plugin(other, name="kern2").reason
