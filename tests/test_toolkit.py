"""patchkit.toolkit: the documented helpers plugin authors import (hook detection, source fingerprints,
and the re-exported varlen / padded / threads / backend helpers), and that plugins carry no copy of them."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.modules import module as torch_module
from transformers.utils.output_capturing import install_output_capuring_hook

import patchkit
from patchkit import toolkit

ROOT = Path(__file__).resolve().parents[1]


def test_every_toolkit_name_exists_and_states_its_contract() -> None:
    for name in toolkit.__all__:
        value = getattr(toolkit, name)  # AttributeError: __all__ promises a name the module lacks
        if callable(value):
            assert (inspect.getdoc(value) or "").strip(), f"toolkit.{name} has no docstring"
    # the re-exports are the very objects the core modules define, not copies
    from patchkit import attention_backends, padded, threads, varlen

    assert toolkit.grouped_sdpa is varlen.grouped_sdpa and toolkit.plan_groups is varlen.plan_groups
    assert toolkit.Group is varlen.Group and toolkit.PaddedBuffers is padded.PaddedBuffers
    assert toolkit.governed is threads.governed and toolkit.resolve_backend is attention_backends.resolve_backend
    assert toolkit.AttentionBackend is patchkit.AttentionBackend


def _tree() -> nn.Sequential:
    return nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU(), nn.Linear(2, 2)))


def test_foreign_hooks_sees_every_kind_and_ignores_inert_capture_hooks() -> None:
    m = nn.Linear(2, 2)
    assert toolkit.foreign_hooks(m) == []

    def fwd(mod, args, out):  # type: ignore[no-untyped-def]
        return out

    def pre_kw(mod, args, kwargs):  # type: ignore[no-untyped-def]
        return None

    def bwd(mod, gin, gout):  # type: ignore[no-untyped-def]
        return None

    handles = [
        m.register_forward_hook(fwd),
        m.register_forward_pre_hook(pre_kw, with_kwargs=True),
        m.register_full_backward_hook(bwd),
    ]
    assert toolkit.foreign_hooks(m) == ["fwd", "pre_kw", "bwd"]
    for h in handles:
        h.remove()
    assert toolkit.foreign_hooks(m) == []
    install_output_capuring_hook(m, "hidden_states", 0)  # transformers' own, inert outside capturing calls
    (hook,) = m._forward_hooks.values()
    assert toolkit.is_inert_hook(hook)
    assert toolkit.foreign_hooks(m) == []

    def output_capturing_hook(mod, args, out):  # type: ignore[no-untyped-def]
        return out * 0  # same name, not transformers': counted

    m.register_forward_hook(output_capturing_hook)
    assert toolkit.foreign_hooks(m) == ["output_capturing_hook"]


def test_hooked_modules_names_modules_strictly_inside_except_exempt_and_global_hooks() -> None:
    tree = _tree()
    assert toolkit.hooked_modules(tree) == []

    def seen(mod, args):  # type: ignore[no-untyped-def]
        return None

    tree.register_forward_pre_hook(seen)  # the region itself is called as unpatched: not counted
    assert toolkit.hooked_modules(tree) == []
    tree[1][1].register_forward_pre_hook(seen)
    assert toolkit.hooked_modules(tree) == ["1.1 (Linear): ['seen']"]
    assert toolkit.hooked_modules(tree, exempt=[tree[1][1]]) == []
    handle = torch_module.register_module_forward_hook(lambda mod, args, out: None)
    try:
        assert toolkit.global_hooks() == ["<lambda>"]
        assert toolkit.hooked_modules(tree, exempt=[tree[1][1]]) == ["global module hooks ['<lambda>']"]
        assert toolkit.hooked_modules(tree, exempt=[tree[1][1]], include_global=False) == []
    finally:
        handle.remove()
    assert toolkit.global_hooks() == []


def test_share_hooks_shares_forward_and_backward_hooks_not_load_hooks() -> None:
    original, replacement = nn.Linear(2, 2), nn.Linear(2, 2)
    toolkit.share_hooks(original, replacement)
    x = torch.ones(1, 2)
    handle = replacement.register_forward_hook(lambda mod, args, out: out * 0, always_call=True)
    assert toolkit.foreign_hooks(original) == ["<lambda>"]
    assert original._forward_hooks_always_called == {handle.id: True}  # the flag dicts travel too
    assert original(x).abs().sum() == 0
    handle.remove()
    assert toolkit.foreign_hooks(original) == [] and original(x).abs().sum() > 0
    replacement._register_load_state_dict_pre_hook(lambda *a, **k: None)
    assert not original._load_state_dict_pre_hooks  # a replacement's own load guard stays its own


def _version_a(x):  # type: ignore[no-untyped-def]
    return x


def _version_b(x):  # type: ignore[no-untyped-def]
    return x  # one comment more


def test_fingerprint_sees_any_source_change_and_is_stable() -> None:
    a = toolkit.fingerprint([_version_a])
    assert re.fullmatch(r"[0-9a-f]{64}", a) and a == toolkit.fingerprint([_version_a])
    assert a != toolkit.fingerprint([_version_b])
    assert toolkit.fingerprint([_version_a, _version_b]) != toolkit.fingerprint([_version_b, _version_a])


def test_require_known_returns_the_release_refuses_others_unless_trusted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(toolkit.TRUST_ENV, raising=False)
    value = toolkit.fingerprint([_version_a])
    assert toolkit.require_known("my path", [_version_a], {"1.0": "0" * 64, "1.1": value}) == "1.1"
    with pytest.raises(patchkit.UnsupportedError) as err:
        toolkit.require_known("my path", [_version_b], {"1.0": "0" * 64, "1.1": value})
    message = str(err.value)
    assert message.startswith("my path re-derives _version_b from test_toolkit")
    assert "(1.0, 1.1)" in message and toolkit.TRUST_ENV in message and toolkit.TRUST_OPTION in message

    class Ctx:
        def __init__(self, trust: bool) -> None:
            self.trust = trust

        def option(self, name: str, default: object = None) -> object:
            return self.trust if name == toolkit.TRUST_OPTION else default

    assert toolkit.require_known("my path", [_version_b], {"1.1": value}, Ctx(True)) == ""
    with pytest.raises(patchkit.UnsupportedError):
        toolkit.require_known("my path", [_version_b], {"1.1": value}, Ctx(False))
    monkeypatch.setenv(toolkit.TRUST_ENV, "0")
    assert not toolkit.trusted(None)
    monkeypatch.setenv(toolkit.TRUST_ENV, "1")
    assert toolkit.trusted(None)
    assert toolkit.require_known("my path", [_version_b], {"1.1": value}) == ""


# One implementation each: plugins import these from patchkit.toolkit instead of carrying their own.
OWN_COPIES = {
    "hook detection": re.compile(r"_forward_pre_hooks|_global_forward_hooks|def (foreign|global)_hooks|def hooked_"),
    "source fingerprints": re.compile(r"hashlib\.sha256\(\)|def fingerprint|def require_known|PATCHKIT_TRUST_"),
}


def test_plugins_carry_no_copy_of_the_toolkit() -> None:
    found = []
    for path in sorted((ROOT / "plugins").rglob("*.py")):
        text = path.read_text()
        found += [f"{path.relative_to(ROOT)}: {what}" for what, pattern in OWN_COPIES.items() if pattern.search(text)]
    assert not found, f"use patchkit.toolkit instead: {found}"


def test_the_toolkit_names_no_architecture() -> None:
    source = Path(toolkit.__file__).read_text()
    for name in ("Llama", "Bert", "BERT", "OPT", "Falcon", "Mistral", "bitsandbytes", "import transformers"):
        assert not re.search(rf"\b{name}\b", source), name
