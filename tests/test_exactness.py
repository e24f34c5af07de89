"""Issue 10's eleven cases: the exactness promise under faults, copies, hooks, casts, loads, layers,
options, module globals and Trainer checkpoints. Real transformers models, real plugins."""

from __future__ import annotations

import copy
import gc
import hashlib
import pickle
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from exactness import (
    batch,
    failing_patcher,
    full_state,
    logits,
    registry_plus,
    tiny_bert,
    tiny_llama,
)
from helpers import ScaledLinear, registry_with, scaled_linear_patcher
from torch import nn

import patchkit
from patchkit import NotPatchedError, PatchedModelError, PatchError, UnsupportedError

pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

QUANT = ["int8", "fp4", "nf4"]


# 1. A failed apply after a quantizer stage rolls back bit for bit.
@pytest.mark.parametrize("family", QUANT)
def test_failed_later_stage_rolls_quantizer_back_bit_exact(family: str) -> None:
    model = tiny_llama()
    before = full_state(model)
    with pytest.raises(RuntimeError, match="injected build failure"):
        patchkit.apply(model, quantize=family, patch="boom", registry=registry_plus(failing_patcher()))
    assert full_state(model) == before
    assert not patchkit.is_patched(model)


# 2. A reverse that fails midway keeps the journal and the save guard; a second reverse finishes.
def test_reverse_with_a_missing_kept_file_stays_patched_and_resumes(tmp_path: Path) -> None:
    model = tiny_llama()
    before = full_state(model)
    keep = tmp_path / "kept"
    patchkit.apply(model, quantize="int8", keep_original=str(keep))
    files = sorted(keep.iterdir())
    assert len(files) == 14
    moved = tmp_path / "away.safetensors"
    shutil.move(files[5], moved)
    with pytest.raises(PatchError, match="missing"):
        patchkit.reverse(model)
    assert patchkit.is_patched(model)
    with pytest.raises(PatchedModelError):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    shutil.move(moved, files[5])
    patchkit.reverse(model)
    assert full_state(model) == before
    assert not any(keep.iterdir())  # kept files are deleted once restored


def test_reverse_of_a_quantized_model_moved_to_meta_refuses_and_stays_patched(tmp_path: Path) -> None:
    model = tiny_llama()
    patchkit.apply(model, quantize="nf4")
    with pytest.raises(PatchedModelError, match="reverse"):
        model.to("meta")  # refused before anything moves (tests/test_bnb_defects.py)
    layer = model.model.layers[0].self_attn.q_proj
    with pytest.raises(RuntimeError):
        # around patchkit's guard: bitsandbytes moves the quantization state to meta, then refuses midway
        nn.Module._apply(layer, lambda t: t.to("meta"))
    with pytest.raises(PatchError, match="still patched"):
        patchkit.reverse(model)
    assert patchkit.is_patched(model)
    with pytest.raises(PatchedModelError):
        model.save_pretrained(tmp_path / "never-written")
    with pytest.raises(PatchError, match="still patched"):
        patchkit.reverse(model)  # a second reverse says the same, not NotPatchedError


def test_interrupted_reverse_resumes_where_it_stopped(tmp_path: Path) -> None:
    model = tiny_llama()
    before = full_state(model)
    patchkit.apply(model, quantize="nf4", keep_original="cpu")
    holder, journal = patchkit.journal.find_journal(model)  # type: ignore[attr-defined,misc]
    layer = journal.layers[0]
    # an interrupt after a few entries were undone (a KeyboardInterrupt from the 4th commit)
    victim = layer.entries[-4]
    real = victim.commit

    def interrupted(prepared: object) -> None:
        raise KeyboardInterrupt

    victim.commit = interrupted
    with pytest.raises(KeyboardInterrupt):
        patchkit.reverse(model)
    assert patchkit.is_patched(model)
    with pytest.raises(PatchedModelError):
        model.save_pretrained(tmp_path / "never-written")
    victim.commit = real
    patchkit.reverse(model)
    assert full_state(model) == before


# 3. Copies.
@pytest.mark.parametrize("keep", ["cpu", "folder"])
def test_deepcopy_of_an_int8_model_reverses_on_its_own(keep: str, tmp_path: Path) -> None:
    model = tiny_llama()
    ref = logits(model)
    before = full_state(model)
    values = {n: p.detach().clone() for n, p in model.named_parameters()}
    patchkit.apply(model, quantize="int8", keep_original="cpu" if keep == "cpu" else str(tmp_path))
    twin = copy.deepcopy(model)
    patchkit.reverse(twin)
    assert not patchkit.is_patched(twin) and patchkit.is_patched(model)
    for name, p in twin.named_parameters():
        assert torch.equal(p, values[name]), name
    assert torch.equal(logits(twin), ref)
    patchkit.reverse(model)
    assert full_state(model) == before


def test_deepcopy_of_an_sdpa_model_reverses_the_copy() -> None:
    model = tiny_bert()
    ref = logits(model)
    patchkit.apply(model, attention="sdpa")
    twin = copy.deepcopy(model)
    valid = batch()["attention_mask"].bool()  # padding positions are not compared
    assert torch.allclose(logits(twin)[valid], ref[valid], atol=1e-5)
    patchkit.reverse(twin)
    assert type(twin.encoder) is transformers.models.bert.modeling_bert.BertEncoder
    assert twin.config._attn_implementation == model.config._attn_implementation
    assert torch.equal(logits(twin), ref)
    assert patchkit.is_patched(model)
    assert torch.allclose(logits(model)[valid], ref[valid], atol=1e-5)
    patchkit.reverse(model)


def test_pickling_a_patched_model_raises_patched_model_error(tmp_path: Path) -> None:
    model = tiny_llama()
    patchkit.apply(model, quantize="int8")
    with pytest.raises(PatchedModelError, match="reverse"):
        torch.save(model, tmp_path / "model.pt")
    with pytest.raises(PatchedModelError, match="reverse"):
        pickle.dumps(model)
    patchkit.reverse(model)
    torch.save(model, tmp_path / "model.pt")  # the unpatched model pickles as before


# 4. Hooks added or removed while patched.
def _counting_hook(calls: list[str], tag: str):  # noqa: ANN202
    def hook(module: nn.Module, args: object, out: object) -> None:
        calls.append(tag)

    return hook


def test_hook_removed_while_patched_stops_firing() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    calls: list[str] = []
    handle = model[0].register_forward_hook(_counting_hook(calls, "h"))
    patchkit.apply(model, patch="scale", registry=registry_with(scaled_linear_patcher()))
    handle.remove()
    model(torch.randn(1, 4))
    assert calls == []
    patchkit.reverse(model)
    model(torch.randn(1, 4))
    assert calls == []


def test_hook_added_to_a_replacement_survives_reverse() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    original = model[0]
    patchkit.apply(model, patch="scale", registry=registry_with(scaled_linear_patcher()))
    assert isinstance(model[0], ScaledLinear)
    calls: list[str] = []
    model[0].register_forward_hook(_counting_hook(calls, "h"))
    model(torch.randn(1, 4))
    assert calls == ["h"]
    patchkit.reverse(model)
    assert model[0] is original
    model(torch.randn(1, 4))
    assert calls == ["h", "h"]


@pytest.mark.parametrize("family", QUANT)
def test_quantized_layer_shares_hooks_with_the_original(family: str) -> None:
    model = tiny_llama()
    layer = model.model.layers[0].mlp.up_proj
    calls: list[str] = []
    handle = layer.register_forward_hook(_counting_hook(calls, "before"))
    patchkit.apply(model, quantize=family, keep_original="cpu")
    handle.remove()
    model.model.layers[0].mlp.up_proj.register_forward_hook(_counting_hook(calls, "while"))
    logits(model)
    assert calls == ["while"]
    patchkit.reverse(model)
    assert model.model.layers[0].mlp.up_proj is layer
    logits(model)
    assert calls == ["while", "while"]


# 5. Casts while quantized.
@pytest.mark.parametrize("family", QUANT)
@pytest.mark.parametrize("cast", ["half", "bfloat16"])
def test_cast_while_quantized_then_reverse_gives_a_consistent_model(family: str, cast: str) -> None:
    model = tiny_bert()
    values = {n: p.detach().clone() for n, p in model.named_parameters()}
    patchkit.apply(model, quantize=family, keep_original="cpu")
    model.half() if cast == "half" else model.to(torch.bfloat16)
    dtype = torch.float16 if cast == "half" else torch.bfloat16
    patchkit.reverse(model)
    assert {p.dtype for p in model.parameters()} == {dtype}
    for name, p in model.named_parameters():  # exactly what the cast does to the unpatched model
        assert torch.equal(p, values[name].to(dtype)), name
    logits(model)  # runs: no dtype mismatch


@pytest.mark.parametrize("family", QUANT)
def test_input_of_another_dtype_never_casts_the_shared_bias(family: str) -> None:
    model = tiny_bert()
    before = full_state(model)
    extra = {} if family == "int8" else {"compute_dtype": "bf16"}
    patchkit.apply(model, quantize=family, keep_original="cpu", **extra)
    layer = model.encoder.layer[0].attention.self.query
    with torch.no_grad():
        layer(torch.randn(2, 3, 64, dtype=torch.bfloat16))
    assert layer.bias.dtype == torch.float32
    patchkit.reverse(model)
    assert full_state(model) == before


# 6. load_state_dict into a quantized model.
@pytest.mark.parametrize("family", QUANT)
def test_load_state_dict_into_a_quantized_model_is_refused_before_anything_loads(family: str) -> None:
    model, donor = tiny_llama(), tiny_llama(hidden_act="gelu")
    with torch.no_grad():
        for p in donor.parameters():
            p.add_(1.0)
    before = full_state(model)
    patchkit.apply(model, quantize=family, keep_original="cpu")
    patched = full_state(model)
    with pytest.raises(PatchedModelError, match="load_state_dict"):
        model.load_state_dict(donor.state_dict())
    assert full_state(model)["state"] == patched["state"]
    patchkit.reverse(model)
    assert full_state(model) == before
    model.load_state_dict(donor.state_dict())  # unpatched: loads as usual


# 7. Layers.
def test_patched_block_undoes_its_own_layer_not_the_newest() -> None:
    model = tiny_bert()
    before = full_state(model)
    encoder = model.encoder
    with patchkit.patched(model, attention="sdpa"):
        patchkit.apply(model, quantize="int8", keep_original="cpu")
    assert patchkit.applied(model) == {"quantize": "int8"}
    assert model.encoder is encoder
    patchkit.reverse(model)
    assert full_state(model) == before


def test_reverse_inside_a_patched_block_leaves_nothing_to_undo() -> None:
    model = tiny_bert()
    before = full_state(model)
    with patchkit.patched(model, attention="sdpa"):
        patchkit.reverse(model)
    assert full_state(model) == before
    assert "_patchkit_journal" not in model.__dict__


def test_reverse_undoes_every_journal_in_the_tree() -> None:
    pair = nn.ModuleList([tiny_bert(), tiny_bert()])
    before = full_state(pair)
    patchkit.apply(pair[0], quantize="int8", keep_original="cpu")
    patchkit.apply(pair[1], attention="sdpa")
    patchkit.reverse(pair)
    assert not patchkit.is_patched(pair[0]) and not patchkit.is_patched(pair[1])
    assert full_state(pair) == before


# 8. A no-op apply leaves no trace.
def test_noop_apply_leaves_no_trace(tmp_path: Path) -> None:
    model = tiny_bert()
    before = full_state(model)
    report = patchkit.apply(model, quantize="int8", skip=["encoder", "pooler"], strict=False)
    assert not report.swaps
    assert not patchkit.is_patched(model)
    assert full_state(model) == before
    model.save_pretrained(tmp_path / "saved")
    patchkit.apply(model, quantize="int8")  # no ConflictError
    with pytest.raises(NotPatchedError):
        patchkit.reverse(tiny_bert())


# 9. Unknown options.
def test_unknown_option_is_refused_with_a_suggestion() -> None:
    model = tiny_llama()
    before = full_state(model)
    with pytest.raises(UnsupportedError, match=r"keep_orignal.*Did you mean 'keep_original'"):
        patchkit.apply(model, quantize="nf4", keep_orignal="cpu")
    with pytest.raises(UnsupportedError, match="keep_orignal"):
        patchkit.plan(model, quantize="nf4", keep_orignal="cpu")
    assert full_state(model) == before


# 10. No module-global state in the quantizer's selection.
class _Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def test_tying_between_plan_and_apply_is_seen_at_once() -> None:
    model = _Two()
    assert len(patchkit.plan(model, quantize="int8").patches) == 2
    model.b.weight = model.a.weight  # tie, then apply within a fraction of a second
    report = patchkit.apply(model, quantize="int8", strict=False)
    assert not report.swaps and all("tied" in s.reason for s in report.skipped)


def test_apply_keeps_no_reference_to_a_deleted_model() -> None:
    model = tiny_llama()
    patchkit.apply(model, quantize="int8")
    head = weakref.ref(model.lm_head)
    patchkit.reverse(model)
    patchkit.plan(model, quantize="int8")
    del model
    gc.collect()
    assert head() is None


# 11. Trainer checkpoints of attention-patched models.
def _dataset(vocab: int, classification: bool) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(8):
        ids = torch.randint(1, vocab, (12,), generator=g)
        mask = torch.ones(12, dtype=torch.long)
        mask[: i % 4] = 0
        label = torch.tensor(i % 2) if classification else ids.masked_fill(mask == 0, -100)
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": label})
    return rows


def _digest(folder: Path, names: tuple[str, ...]) -> dict[str, str]:
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names}


@pytest.mark.parametrize("arch", ["llama-flash2", "bert-sdpa"])
def test_trainer_checkpoints_and_resumes_an_attention_patched_model(arch: str, tmp_path: Path) -> None:
    if arch == "llama-flash2":
        model, data, kw = tiny_llama(), _dataset(128, False), {"attention": "flash2", "backend": "reference"}
    else:
        model = tiny_bert(transformers.BertForSequenceClassification, num_labels=2)
        data, kw = _dataset(128, True), {"attention": "sdpa"}
    model.train()
    patchkit.apply(model, **kw)

    def trainer(steps: int, out: Path) -> transformers.Trainer:
        args = transformers.TrainingArguments(
            output_dir=str(out),
            max_steps=steps,
            save_steps=1,
            per_device_train_batch_size=4,
            learning_rate=1e-3,
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            logging_steps=1,
            seed=0,
        )
        return transformers.Trainer(model=model, args=args, train_dataset=data)

    trainer(2, tmp_path / "run").train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / "model.safetensors").exists()
    assert patchkit.is_patched(model)
    # the checkpoint equals what the unpatched model writes
    patchkit.reverse(model)
    model.save_pretrained(tmp_path / "plain")
    names = ("model.safetensors", "config.json")
    assert _digest(checkpoint, names) == _digest(tmp_path / "plain", names)
    # resume from the first checkpoint, patched again
    patchkit.apply(model, **kw)
    trainer(3, tmp_path / "run").train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))
    assert (tmp_path / "run" / "checkpoint-3" / "model.safetensors").exists()
    assert patchkit.is_patched(model)
    patchkit.reverse(model)


def test_quantized_model_save_is_refused_naming_both_ways_out(tmp_path: Path) -> None:
    model = tiny_llama()
    patchkit.apply(model, attention="flash2", backend="reference")
    model.save_pretrained(tmp_path / "attention-only")  # attention patchers save the original
    patchkit.apply(model, quantize="int8")
    with pytest.raises(PatchedModelError, match=r"patchkit.reverse\(model\).*quantized=True"):
        model.save_pretrained(tmp_path / "quantized")
    patchkit.reverse(model)


def test_attention_patched_save_writes_the_original_config(tmp_path: Path) -> None:
    model, twin = tiny_llama(), tiny_llama()
    patchkit.apply(model, attention="flash2", backend="reference")
    model.save_pretrained(tmp_path / "patched")
    patchkit.save_pretrained(model, tmp_path / "via-patchkit")
    twin.save_pretrained(tmp_path / "twin")
    names = ("model.safetensors", "config.json")
    assert _digest(tmp_path / "patched", names) == _digest(tmp_path / "twin", names)
    assert _digest(tmp_path / "via-patchkit", names) == _digest(tmp_path / "twin", names)
    patchkit.reverse(model)


def test_two_stage_apply_rolls_back_both_stages() -> None:
    model = tiny_bert()
    before = full_state(model)
    with pytest.raises(RuntimeError, match="injected"):
        patchkit.apply(model, attention="sdpa", quantize="nf4", patch="boom", registry=registry_plus(failing_patcher()))
    assert full_state(model) == before


def test_batch_is_unchanged_by_helpers() -> None:
    # guards the fixtures themselves: left padding in row 1
    assert batch()["attention_mask"][1, 0] == 0 and batch()["attention_mask"][0].all()
