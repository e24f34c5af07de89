"""Fault injection: raise at every journal operation and every patcher call of apply and of reverse,
for each first-party family, and check that nothing is lost.

After a failed apply the model equals its original (state bytes, module objects and classes, hooks,
instance attributes, config). After a failed reverse it is still patched (and guarded), and a
second reverse, once the fault is gone, restores it exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from exactness import full_state, tiny_bert, tiny_falcon, tiny_llama, tiny_mistral, tiny_opt
from torch import nn

import patchkit
from patchkit import Registry
from patchkit.journal import Journal, _Call, _Replace, _SetAttr
from patchkit_bnb.record import record_of

pytest.importorskip("bitsandbytes")
pytest.importorskip("transformers")


class InjectedFault(Exception):
    """The fault the harness raises."""


class Injector:
    """Counts events; raises :class:`InjectedFault` at the ``fail_at``-th one."""

    def __init__(self, fail_at: int | None = None, after: bool = False) -> None:
        self.n, self.fail_at, self.after = 0, fail_at, after
        self.events: list[str] = []

    def tick(self, what: str) -> None:
        self.n += 1
        self.events.append(what)
        if self.n == self.fail_at:
            self.fail_at = None  # once: the rollback that follows runs unharmed
            raise InjectedFault(f"event {self.n}: {what}")

    def around(self, what: str, call: Callable[[], Any]) -> Any:
        """Tick before the call (``after=False``: the change never happens) or after it (it did)."""
        if not self.after:
            self.tick(what)
            return call()
        out = call()
        self.tick(what)
        return out


class InjectingRegistry(Registry):
    """The installed plugins, with every patcher callable reporting to an :class:`Injector`."""

    def __init__(self, injector: Injector) -> None:
        super().__init__()
        self.load_entry_points()
        self.injector = injector

    def patchers(self) -> list[patchkit.Patcher]:
        inj = self.injector
        out = []
        for p in super().patchers():
            wrapped: dict[str, Any] = {}
            for field in ("check", "build", "setup", "restore"):
                fn = getattr(p, field)
                if fn is not None:
                    wrapped[field] = _wrap(inj, f"{p.name}.{field}", fn)
            out.append(dataclasses.replace(p, **wrapped))
        return out


def _wrap(inj: Injector, what: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        return inj.around(what, lambda: fn(*args))

    return call


@contextlib.contextmanager
def journal_faults(inj: Injector) -> Iterator[None]:
    """Every journal operation of apply (record) and of reverse (commit) reports to ``inj``."""
    saved: list[tuple[type, str, Any]] = []

    def patch(cls: type, name: str) -> None:
        real = getattr(cls, name)
        saved.append((cls, name, real))

        def op(self: Any, *args: Any, **kwargs: Any) -> Any:
            return inj.around(f"{cls.__name__}.{name}", lambda: real(self, *args, **kwargs))

        setattr(cls, name, op)

    for cls, name in ((Journal, "replace"), (Journal, "set_attr"), (Journal, "call")):
        patch(cls, name)
    for cls in (_Replace, _SetAttr, _Call):
        patch(cls, "commit")
    try:
        yield
    finally:
        for cls, name, real in saved:
            setattr(cls, name, real)


# One-layer models: every fault point is visited (each apply and reverse is short).
CASES: dict[str, tuple[Callable[[], nn.Module], dict[str, Any]]] = {
    "sdpa-bert": (lambda: tiny_bert(num_hidden_layers=1), {"attention": "sdpa"}),
    "sdpa-opt": (lambda: tiny_opt(1), {"attention": "sdpa"}),
    "flash2-llama": (lambda: tiny_llama(num_hidden_layers=1), {"attention": "flash2", "backend": "reference"}),
    "flash2-mistral": (lambda: tiny_mistral(1), {"attention": "flash2", "backend": "reference"}),
    "flash2-falcon": (lambda: tiny_falcon(1), {"attention": "flash2", "backend": "reference"}),
    "int8": (lambda: tiny_llama(num_hidden_layers=1), {"quantize": "int8", "keep_original": "cpu"}),
    "fp4": (lambda: tiny_llama(num_hidden_layers=1), {"quantize": "fp4", "keep_original": "cpu"}),
    "nf4": (lambda: tiny_llama(num_hidden_layers=1), {"quantize": "nf4"}),
    "sdpa+int8": (
        lambda: tiny_bert(num_hidden_layers=1),
        {"attention": "sdpa", "quantize": "int8", "keep_original": "cpu"},
    ),
}


def _count(make: Callable[[], nn.Module], kw: dict[str, Any], phase: str) -> int:
    inj = Injector()
    model = make()
    registry = InjectingRegistry(inj)
    with journal_faults(inj):
        if phase == "apply":
            patchkit.apply(model, registry=registry, **kw)
        else:
            patchkit.apply(model, registry=registry, **kw)
            inj.n = 0
            patchkit.reverse(model)
    return inj.n


def _params(cases: list[str]) -> list[Any]:
    """The cases, the quantizing ones marked slow (a quantization per fault position)."""
    return [pytest.param(c, marks=pytest.mark.slow) if "quantize" in CASES[c][1] else c for c in cases]


@pytest.mark.parametrize("after", [False, True], ids=["before-op", "after-op"])
@pytest.mark.parametrize("case", _params(sorted(CASES)))
def test_a_fault_anywhere_in_apply_leaves_the_model_as_it_was(case: str, after: bool) -> None:
    make, kw = CASES[case]
    total = _count(make, kw, "apply")
    assert total >= 3
    for k in range(1, total + 1):
        model = make()
        before = full_state(model)
        inj = Injector(fail_at=k, after=after)
        registry = InjectingRegistry(inj)
        with journal_faults(inj), pytest.raises(InjectedFault):
            patchkit.apply(model, registry=registry, **kw)
        where = inj.events[k - 1]
        assert not patchkit.is_patched(model), where
        assert full_state(model) == before, where


@pytest.mark.parametrize("after", [False, True], ids=["before-op", "after-op"])
@pytest.mark.parametrize("case", _params(sorted(set(CASES) - {"nf4"})))  # exact reverse needs keep_original
def test_a_fault_anywhere_in_reverse_keeps_it_patched_and_a_second_reverse_is_exact(
    case: str, after: bool, tmp_path: Path
) -> None:
    make, kw = CASES[case]
    total = _count(make, kw, "reverse")
    assert total >= 2
    for k in range(1, total + 1):
        model = make()
        before = full_state(model)
        inj = Injector(after=after)
        registry = InjectingRegistry(inj)
        with journal_faults(inj):
            patchkit.apply(model, registry=registry, **kw)
            inj.n, inj.fail_at, inj.events = 0, k, []
            with pytest.raises(InjectedFault):
                patchkit.reverse(model)
        where = inj.events[k - 1]
        assert patchkit.is_patched(model), where
        left = patchkit.applied(model)  # empty once only the guard itself was being removed
        if left:
            assert "save_pretrained" in model.__dict__, where  # the guard stays while a layer is left
        if any(record_of(m) is not None for m in model.modules()):  # a quantized layer is still in place
            with pytest.raises(patchkit.PatchedModelError):
                model.save_pretrained(tmp_path / "never-written")
        patchkit.reverse(model)
        assert full_state(model) == before, where
