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
    assert infos["needs_missing"].status == "unavailable" and "not installed" in infos["needs_missing"].reason
    assert "pip install 'patchkit-nonexistent-package>=1'" in infos["needs_missing"].reason  # the install hint
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
    assert info.status == "failed" and "plugin 'dup' already registered a patcher named 'same'" in info.reason
    # the error quotes the offending definition and where the hook is
    assert "Patcher(name='same', kind='other', family='f', match='Linear'" in info.reason
    assert "test_registry.py:" in info.reason
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


def _plugin(name: str, *patchers: patchkit.Patcher, **attrs: object):
    import types

    module = types.ModuleType(name)

    @patchkit.hookimpl
    def register_patchers(register):
        for patcher in patchers:
            register(patcher)

    module.register_patchers = register_patchers
    for key, value in attrs.items():
        setattr(module, key, value)
    return module


def _keep(module, ctx):
    return None


def test_patcher_names_are_scoped_by_plugin_and_a_clash_never_disables_a_loaded_plugin():
    import patchkit_bnb

    impostor = patchkit.Patcher(name="bnb-int8", kind="quantize", family="int8", match=nn.Linear, build=_keep)
    for order in (("aaa", "bnb"), ("bnb", "aaa")):  # entry-point name order no longer decides anything
        registry = Registry()
        for name in order:
            plugin = patchkit_bnb if name == "bnb" else _plugin("aaa", impostor)
            assert registry.add_plugin(plugin, name=name).status == "loaded", registry.plugins()
        assert registry.patcher("bnb:bnb-int8").plugin == "bnb"
        assert registry.patcher("aaa:bnb-int8").plugin == "aaa"
        assert registry.patcher("bnb:bnb-nf4") is registry.patcher("bnb-nf4")  # bare name: unambiguous
        with pytest.raises(KeyError, match="ambiguous.*aaa:bnb-int8.*bnb:bnb-int8"):
            registry.patcher("bnb-int8")
        model = nn.Sequential(nn.Linear(4, 4))
        with pytest.raises(patchkit.ConflictError, match="bnb-int8.*plugin 'aaa'|plugin 'aaa'.*bnb-int8"):
            patchkit.plan(model, quantize="int8", registry=registry)  # same family, same priority: named
        plan = patchkit.plan(model, quantize="bnb:int8", registry=registry)  # family scoped to one plugin
        assert [(p.patcher, p.plugin) for p in plan.patches] == [("bnb-int8", "bnb")]
    # a plugin name cannot be loaded twice; the newcomer is named and the first stays
    with pytest.raises(PluginError, match="cannot add plugin 'aaa'.*already loaded"):
        registry.add_plugin(_plugin("aaa"), name="aaa")
    assert {p.name: p.status for p in registry.plugins()} == {"aaa": "loaded", "bnb": "loaded"}


def test_backend_clash_fails_only_the_newcomer_and_names_it():
    import types

    def offer(module):
        @patchkit.hookimpl
        def register_attention_backends(register):
            register(patchkit.AttentionBackend(name="k", varlen=_keep, unavailable=lambda d, t, n: None))

        module.register_attention_backends = register_attention_backends
        return module

    registry = Registry()
    assert registry.add_plugin(offer(types.ModuleType("first")), name="first").status == "loaded"
    info = registry.add_plugin(offer(types.ModuleType("second")), name="second")
    assert info.status == "failed" and "plugin 'second' (the newcomer)" in info.reason
    assert "AttentionBackend(name='k')" in info.reason and "plugin 'first', which stays loaded" in info.reason
    assert registry.attention_backends()["k"].plugin == "first"


def test_unavailable_plugin_is_listed_with_what_it_covers_and_the_install_hint():
    patcher = patchkit.Patcher(
        name="rms", kind="other", family="fusedrms", match=nn.LayerNorm, build=_keep, covers=("Qwen2RMSNorm",)
    )
    registry = Registry()
    info = registry.add_plugin(_plugin("fused", patcher, REQUIRES={"patchkit-no-such-kernel": ">=1.2"}), name="fused")
    assert info.status == "unavailable"
    assert (
        info.reason
        == "needs patchkit-no-such-kernel>=1.2, which is not installed: pip install 'patchkit-no-such-kernel>=1.2'"
    )
    assert [(p.qualname, p.covers) for p in info.patcher_details] == [("fused:rms", ("Qwen2RMSNorm",))]
    assert registry.patchers() == []  # listed, never used
    with pytest.raises(patchkit.UnsupportedError, match="offered by plugin 'fused', which is unavailable.*pip install"):
        patchkit.plan(nn.Sequential(nn.LayerNorm(4)), patch="fusedrms", registry=registry)
    # an availability probe: a plugin that needs something REQUIRES cannot express (a GPU, a library)
    probe = _plugin("probe", patcher, available=lambda: "needs a CUDA device: run on a GPU machine")
    info = Registry().add_plugin(probe, name="probe")
    assert info.status == "unavailable" and info.reason == "needs a CUDA device: run on a GPU machine"
    assert Registry().add_plugin(_plugin("ok", patcher, available=lambda: None), name="ok").status == "loaded"


def test_backend_needing_a_missing_package_is_unavailable_and_never_chosen():
    import types

    module = types.ModuleType("kern")

    @patchkit.hookimpl
    def register_attention_backends(register):
        register(
            patchkit.AttentionBackend(
                name="fastk",
                varlen=_keep,
                unavailable=lambda d, t, n: None,
                packages={"patchkit-no-such-kernel": ">=2"},
                priority=99,
            )
        )

    module.register_attention_backends = register_attention_backends
    registry = Registry()
    info = registry.add_plugin(module, name="kern")
    assert info.status == "loaded"
    [backend] = info.backend_details
    assert backend.name == "fastk" and "pip install 'patchkit-no-such-kernel>=2'" in (backend.unavailable or "")
    from patchkit.attention_backends import resolve_backend

    with pytest.raises(patchkit.UnsupportedError, match="not installed: pip install"):
        resolve_backend(registry.attention_backends(), "fastk", "cpu", torch.float32)
    with pytest.raises(patchkit.UnsupportedError, match="fastk: needs patchkit-no-such-kernel"):
        resolve_backend(registry.attention_backends(), "auto", "cpu", torch.float32)


def test_covers_and_declarations_are_validated_quoting_the_definition():
    bad = patchkit.Patcher(name="x", kind="other", family="f", match=nn.Linear, build=_keep, covers="Linear")  # type: ignore[arg-type]
    info = Registry().add_plugin(_plugin("badcovers", bad), name="badcovers")
    assert info.status == "failed" and "covers must be a tuple of non-empty strings" in info.reason
    assert "covers='Linear'" in info.reason
    scoped = patchkit.Patcher(name="a:b", kind="other", family="f", match=nn.Linear, build=_keep)
    assert "must not contain ':'" in Registry().add_plugin(_plugin("colon", scoped), name="colon").reason


def test_first_party_plugins_declare_what_they_cover():
    registry = Registry()
    registry.load_entry_points()
    covers = {p.qualname: p.covers for p in registry.patchers()}
    assert "MistralAttention" in covers["flash2:flash2-llama"] and "Falcon" in covers["flash2:flash2-falcon"]
    assert "BertModel" in covers["sdpa:sdpa-bert-encoder"] and "OPTModel" in covers["sdpa:sdpa-opt-decoder"]
    assert any("nn.Linear" in c for c in covers["bnb:bnb-int8"])
    assert patchkit.registry.PLUGIN_API_VERSION == "1.1"
