"""The contract holds by construction, for third-party patchers the core does not trust.

Each test names the promise it checks. The patchers come from ``third_party.py``: a fused-QKV
attention patcher (another state-dict layout) and a plain-torch int8 quantizer whose ``restore``
dequantizes. Every case here failed on the code before the contract was enforced by the core.
"""

from __future__ import annotations

import gc
import hashlib
import io
import pickle
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from exactness import full_state, tiny_bert, tiny_falcon, tiny_llama
from helpers import registry_with, scaled_linear_patcher
from third_party import fused_qkv_patcher, int8_patcher
from torch import nn

import patchkit
from patchkit import PatchedModelError, PatchError
from patchkit.journal import JOURNAL_ATTR, Journal, _Replace, find_journal

transformers = pytest.importorskip("transformers")


def files(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def train_step(model: nn.Module) -> None:
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    model.eval()


# -- 1. saving writes what reverse-then-save writes, or refuses naming the patcher ---------------------


@pytest.mark.parametrize("trained", [False, True])
def test_fused_qkv_attention_patcher_cannot_save_its_own_layout(tmp_path: Path, trained: bool) -> None:
    model = tiny_llama()
    patchkit.apply(model, attention="fused", registry=registry_with(fused_qkv_patcher()))
    assert any("qkv_proj" in k for k in model.state_dict())  # the patched layout differs
    if trained:
        train_step(model)
    for save in (
        lambda: model.save_pretrained(tmp_path / "out"),
        lambda: model.save_pretrained(tmp_path / "out", state_dict=model.state_dict()),  # what Trainer passes
        lambda: patchkit.save_pretrained(model, tmp_path / "out"),
    ):
        with pytest.raises(PatchedModelError, match="fused-qkv") as refused:
            save()
        assert "reverse" in str(refused.value) and "quantized=True" not in str(refused.value)
        assert not (tmp_path / "out").exists()


def test_a_patcher_whose_state_dict_shows_the_original_layout_saves_it(tmp_path: Path) -> None:
    model, twin = tiny_llama(), tiny_llama()
    patchkit.apply(model, attention="fused", registry=registry_with(fused_qkv_patcher(layout_view=True)))
    model.save_pretrained(tmp_path / "patched")
    twin.save_pretrained(tmp_path / "twin")
    assert files(tmp_path / "patched") == files(tmp_path / "twin")
    # After training, the fused weight moved on but reverse brings back the q/k/v the user had:
    # the two disagree, so the save is refused rather than writing either silently.
    train_step(model)
    with pytest.raises(PatchedModelError, match="fused-qkv"):
        model.save_pretrained(tmp_path / "trained")
    assert not (tmp_path / "trained").exists()


def test_save_while_patched_after_training_equals_reverse_then_save(tmp_path: Path) -> None:
    model = tiny_llama()
    patchkit.apply(model, attention="flash2", backend="reference")
    train_step(model)  # the shared parameters are the user's: training reaches them
    model.save_pretrained(tmp_path / "patched")
    patchkit.reverse(model)
    model.save_pretrained(tmp_path / "reversed")
    assert files(tmp_path / "patched") == files(tmp_path / "reversed")


def test_declared_same_checkpoint_is_not_trusted(tmp_path: Path) -> None:
    model = tiny_llama()
    patcher = fused_qkv_patcher(same_checkpoint=True)  # a false declaration
    patchkit.apply(model, attention="fused", registry=registry_with(patcher))
    with pytest.raises(PatchedModelError, match="fused-qkv"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_declared_difference_refuses_and_does_not_point_at_quantized_saving(tmp_path: Path) -> None:
    model = tiny_llama()
    patchkit.apply(model, patch="scale", registry=registry_with(scaled_linear_patcher(same_checkpoint=False)))
    with pytest.raises(PatchedModelError, match="scaled-linear") as refused:
        model.save_pretrained(tmp_path / "out")
    assert "quantized=True" not in str(refused.value)


# -- 2. a rollback never runs restore ------------------------------------------------------------------


def test_failed_apply_never_calls_a_dequantizing_restore() -> None:
    model = tiny_llama()
    before = full_state(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    patcher, calls = int8_patcher(fail_at=5)
    with pytest.raises(RuntimeError, match="injected failure"):
        patchkit.apply(model, quantize="tq8", registry=registry_with(patcher))
    assert calls["restore"] == 0
    for name, p in model.named_parameters():
        assert torch.equal(p, weights[name]), name  # bit for bit: the dequantized values never landed
    assert full_state(model) == before


# -- 3. load_state_dict and keep_original are core services --------------------------------------------


def test_load_state_dict_into_a_third_party_quantized_model_refuses_before_loading_anything() -> None:
    model = tiny_llama()
    incoming = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    patcher, _ = int8_patcher()
    patchkit.apply(model, quantize="tq8", registry=registry_with(patcher))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for target in (model, model.model, model.model.layers[0]):
        prefix = _prefix(model, target)
        part = {k[len(prefix) :]: v for k, v in incoming.items() if k.startswith(prefix)}
        with pytest.raises(PatchedModelError, match="load_state_dict") as refused:
            target.load_state_dict(part)
        assert "int8" in str(refused.value) and "reverse" in str(refused.value)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_load_state_dict_into_a_parameter_sharing_patched_model_loads_the_users_tensors() -> None:
    model = tiny_llama()
    incoming = {k: v + 1 for k, v in model.state_dict().items()}
    patchkit.apply(model, attention="flash2", backend="reference")
    model.load_state_dict(incoming)
    patchkit.reverse(model)
    assert all(torch.equal(v, incoming[k]) for k, v in model.state_dict().items())


def _prefix(root: nn.Module, target: nn.Module) -> str:
    if target is root:
        return ""
    return next(name for name, m in root.named_modules() if m is target) + "."


@pytest.mark.parametrize("keep", ["cpu", "folder"])
def test_keep_original_is_a_core_service_for_any_quantizer(tmp_path: Path, keep: str) -> None:
    model = tiny_llama()
    before = full_state(model)
    patcher, calls = int8_patcher()
    where = "cpu" if keep == "cpu" else str(tmp_path / "kept")
    report = patchkit.apply(model, quantize="tq8", keep_original=where, registry=registry_with(patcher))
    assert calls["commit"] > 0  # the quantizer freed the full-precision weights
    assert all("kept" in " ".join(s.notes) for s in report.swaps)
    if keep == "folder":
        assert any((tmp_path / "kept").iterdir())
    patchkit.reverse(model)
    assert full_state(model) == before  # bit for bit, although the quantizer's restore dequantizes
    if keep == "folder":
        assert not any((tmp_path / "kept").iterdir())  # the kept files go with reverse


def test_keep_original_checkpoint_for_a_third_party_quantizer(tmp_path: Path) -> None:
    source = tiny_llama()
    source.save_pretrained(tmp_path / "ckpt")
    patcher, _ = int8_patcher()
    registry = registry_with(patcher)
    model = patchkit.from_pretrained(
        transformers.LlamaForCausalLM, tmp_path / "ckpt", quantize="tq8", keep_original="checkpoint", registry=registry
    )
    patchkit.reverse(model)
    expected = source.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


# -- defects of the core -------------------------------------------------------------------------------


def test_an_interrupt_during_the_commit_phase_completes_the_commit_first(request: pytest.FixtureRequest) -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    # Python's Ctrl-C handler, whatever the runner set (a shell's background job starts with SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    model = tiny_llama()
    patcher, calls = int8_patcher(on_commit=lambda n: signal.raise_signal(signal.SIGINT) if n == 2 else None)
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    with pytest.raises(KeyboardInterrupt):
        patchkit.apply(model, quantize="tq8", registry=registry_with(patcher))
    assert calls["commit"] == linears  # never "raised and half-changed": the apply finished
    assert patchkit.applied(model) == {"quantize": "tq8"}
    patchkit.reverse(model)
    assert not patchkit.is_patched(model)


def test_an_interrupt_before_the_rollback_scope_leaves_no_journal(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_bert()
    before = full_state(model)

    def interrupted(self: Journal, applied: dict[str, str]) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(Journal, "begin", interrupted)
    with pytest.raises(KeyboardInterrupt):
        patchkit.apply(model, attention="sdpa")
    monkeypatch.undo()
    assert JOURNAL_ATTR not in model.__dict__
    assert patchkit.applied(model) == {}
    assert full_state(model) == before
    torch.save(model, io.BytesIO())  # an unpatched model pickles
    patchkit.apply(model, attention="sdpa")  # and can be patched
    patchkit.reverse(model)


def test_an_interrupt_right_after_gc_disable_leaves_gc_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    assert gc.isenabled()
    real = gc.disable

    def disable_then_interrupt() -> None:
        real()
        raise KeyboardInterrupt

    monkeypatch.setattr(gc, "disable", disable_then_interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            patchkit.apply(tiny_bert(), attention="sdpa")
    finally:
        monkeypatch.undo()
        enabled = gc.isenabled()
        gc.enable()
    assert enabled


def test_threads_applying_at_once_leave_gc_enabled() -> None:
    models = [tiny_bert(num_hidden_layers=1) for _ in range(4)]
    errors: list[BaseException] = []
    start = threading.Barrier(len(models))

    def work(model: nn.Module) -> None:
        try:
            start.wait()
            for _ in range(5):
                patchkit.apply(model, attention="sdpa")
                patchkit.reverse(model)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert gc.isenabled()


def _local_replacement_patcher() -> patchkit.Patcher:
    class LocalLinear(nn.Linear):  # defined in a function: not importable, as in many notebooks
        pass

    return patchkit.Patcher(
        name="local", kind="other", family="local", match=nn.Linear, build=lambda m, c: patchkit.share_as(m, LocalLinear)
    )


@pytest.mark.parametrize("case", ["sdpa-bert", "flash2-falcon", "third-party"])
def test_pickling_a_patched_model_or_part_of_it_raises_patched_model_error(case: str) -> None:
    if case == "sdpa-bert":
        model: nn.Module = tiny_bert()
        patchkit.apply(model, attention="sdpa")
    elif case == "flash2-falcon":
        model = tiny_falcon()
        patchkit.apply(model, attention="flash2", backend="reference")
    else:
        model = tiny_llama()
        patchkit.apply(model, patch="local", registry=registry_with(_local_replacement_patcher()))
    journal = find_journal(model)[1]  # type: ignore[index]
    replaced = [e.replacement for layer in journal.layers for e in layer.entries if isinstance(e, _Replace)]
    for target in (model, *replaced[:1]):
        with pytest.raises(PatchedModelError, match="reverse"):
            torch.save(target, io.BytesIO())
        with pytest.raises(PatchedModelError):
            pickle.dumps(target)
    patchkit.reverse(model)
    torch.save(model, io.BytesIO())


def test_bad_only_pattern_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match="only") as raised:
        patchkit.apply(tiny_bert(), attention="sdpa", only=123)
    assert isinstance(raised.value, PatchError)
