"""patchkit.from_pretrained: quantize (and patch attention) while loading, compared with transformers'
from_pretrained followed by patchkit.apply, on tiny checkpoints written with save_pretrained."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
from typing import Any

import pytest
import torch
from torch import nn

import patchkit

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
from patchkit_bnb.record import record_of  # noqa: E402

FAMILIES = ["int8", "fp4", "nf4"]


def _opt() -> nn.Module:
    cfg = transformers.OPTConfig(
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=128,
        word_embed_proj_dim=128,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.OPTForCausalLM(cfg)


def _bert() -> nn.Module:
    cfg = transformers.BertConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=128,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.BertModel(cfg)


def _llama() -> nn.Module:
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


MAKERS = {"opt": _opt, "bert": _bert, "llama": _llama}
CLASSES = {"opt": "OPTForCausalLM", "bert": "BertModel", "llama": "LlamaForCausalLM"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    """One sharded checkpoint per architecture (several shards each, via max_shard_size)."""
    out = {}
    for arch, make in MAKERS.items():
        folder = tmp_path_factory.mktemp(f"ckpt-{arch}")
        make().save_pretrained(folder, max_shard_size="40KB")
        assert (folder / "model.safetensors.index.json").exists()
        out[arch] = folder
    return out


def _copy(src: pathlib.Path, tmp: pathlib.Path) -> pathlib.Path:
    dst = tmp / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _cls(arch: str) -> type:
    return getattr(transformers, CLASSES[arch])  # type: ignore[no-any-return]


def _ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def _mask() -> torch.Tensor:
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0  # padding: the sdpa fastpath's packed path runs
    return mask


def _out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=_ids(), attention_mask=_mask())
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(dict(model.named_buffers(remove_duplicate=False)))
    # keep_original's zero-element marker (follows casts) is not part of the model's state
    return {k: v for k, v in named.items() if not k.endswith("._patchkit_kept_as")}


def _assert_same_tensors(a: nn.Module, b: nn.Module) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and ta[name].shape == tb[name].shape, name
        assert torch.equal(ta[name], tb[name]), name
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow  # 12 loads, each compared with transformers + apply
@pytest.mark.parametrize("attention", [None, "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("arch", ["opt", "bert"])
def test_loaded_equals_from_pretrained_plus_apply(
    checkpoints: dict[str, pathlib.Path], arch: str, family: str, attention: str | None
) -> None:
    cls = _cls(arch)
    ref = cls.from_pretrained(checkpoints[arch])
    ref_report = patchkit.apply(ref, attention=attention, quantize=family)
    model, report = patchkit.from_pretrained(
        cls, checkpoints[arch], attention=attention, quantize=family, return_report=True
    )
    assert type(model) is cls and not model.training
    assert patchkit.applied(model) == patchkit.applied(ref)
    assert torch.equal(_out(model), _out(ref))
    _assert_same_tensors(model, ref)
    assert {n: type(m) for n, m in model.named_modules()} == {n: type(m) for n, m in ref.named_modules()}
    assert [(s.paths, s.original, s.replacement, s.patcher) for s in report.swaps] == [
        (s.paths, s.original, s.replacement, s.patcher) for s in ref_report.swaps
    ]
    # the same notes, except that a streaming load does not measure the dequantization error
    measured = re.compile(r"max\|dW\| [0-9.e+-]+")
    loaded_notes = [[measured.sub("E", n) for n in s.notes] for s in report.swaps]
    applied_notes = [[measured.sub("E", n) for n in s.notes] for s in ref_report.swaps]
    assert all("error not measured while loading" in " ".join(n) for n in loaded_notes if "dequantiz" in " ".join(n))
    assert [[n.replace("error not measured while loading", "E") for n in s] for s in loaded_notes] == applied_notes
    assert [(s.path, s.reason) for s in report.skipped] == [(s.path, s.reason) for s in ref_report.skipped]
    with pytest.raises(patchkit.PatchedModelError):
        model.save_pretrained("never-written")
    # reverse: dequantized weights in the original Parameter objects, as after apply + reverse
    patchkit.reverse(model)
    patchkit.reverse(ref)
    assert not patchkit.is_patched(model)
    _assert_same_tensors(model, ref)
    assert all(type(m) in (type(r),) for m, r in zip(model.modules(), ref.modules(), strict=True))


@pytest.mark.parametrize("arch", ["opt", "bert", "llama"])
def test_plain_load_equals_transformers(checkpoints: dict[str, pathlib.Path], arch: str) -> None:
    """No patch: the streamed model is transformers' (non-persistent buffers such as rotary inv_freq and
    position_ids computed the same, tied weights tied, config and generation config the same)."""
    cls = _cls(arch)
    ref = cls.from_pretrained(checkpoints[arch])
    model = patchkit.from_pretrained(cls, checkpoints[arch])
    _assert_same_tensors(model, ref)
    assert model.config.to_dict() == ref.config.to_dict()
    assert torch.equal(_out(model), _out(ref))
    if arch == "llama":
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert torch.equal(model.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq)
        assert model.generation_config.to_dict() == ref.generation_config.to_dict()
    if arch == "bert":
        assert torch.equal(model.embeddings.position_ids, torch.arange(64).expand(1, -1))


def test_tied_llama_quantized_keeps_the_tie_and_matches_apply(checkpoints: dict[str, pathlib.Path]) -> None:
    ref = transformers.LlamaForCausalLM.from_pretrained(checkpoints["llama"])
    patchkit.apply(ref, quantize="nf4")
    model = patchkit.from_pretrained(transformers.LlamaForCausalLM, checkpoints["llama"], quantize="nf4")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(_out(model), _out(ref))


def _embedding_last(src: pathlib.Path, tmp: pathlib.Path) -> pathlib.Path:
    """``src`` re-sharded so that the embedding (tied to lm_head) is the last tensor read."""
    import json

    from safetensors.torch import load_file, save_file

    folder = _copy(src, tmp)
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
        shard.unlink()
    key = "model.embed_tokens.weight"
    rest = {k: v for k, v in tensors.items() if k != key}
    save_file(rest, folder / "a.safetensors", metadata={"format": "pt"})
    save_file({key: tensors[key]}, folder / "b.safetensors", metadata={"format": "pt"})
    weight_map = {**dict.fromkeys(rest, "a.safetensors"), key: "b.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_tied_llama_without_skip_defaults_quantizes_lm_head_and_keeps_the_shared_weight(
    checkpoints: dict[str, pathlib.Path], tmp_path: pathlib.Path
) -> None:
    """skip_defaults=False: the tied lm_head is quantized but its weight, shared with the embedding,
    stays in place. The load replaces every meta tensor while one stage's builds share their facts
    (gathered at the first build, before the embedding arrives here): the tie must still be seen."""
    folder = _embedding_last(checkpoints["llama"], tmp_path)
    ref = transformers.LlamaForCausalLM.from_pretrained(folder)
    ref_report = patchkit.apply(ref, quantize="int8", skip_defaults=False)
    model, report = patchkit.from_pretrained(
        transformers.LlamaForCausalLM, folder, quantize="int8", skip_defaults=False, return_report=True
    )
    lm_head = [s.notes for s in report.swaps if s.paths == ["lm_head"]]
    assert lm_head == [s.notes for s in ref_report.swaps if s.paths == ["lm_head"]]
    assert lm_head == [["int8: weight shared with another module, kept in place (reverse is exact)"]]
    assert [s.paths for s in report.swaps] == [s.paths for s in ref_report.swaps]
    assert model.model.embed_tokens.weight.numel() == ref.model.embed_tokens.weight.numel() > 0
    assert torch.equal(model.model.embed_tokens.weight, ref.model.embed_tokens.weight)
    assert torch.equal(_out(model), _out(ref))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_and_keep_in_fp32_modules(tmp_path: pathlib.Path, dtype: torch.dtype) -> None:
    cfg = transformers.T5Config(
        d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=128, decoder_start_token_id=0
    )
    torch.manual_seed(0)
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(tmp_path, max_shard_size="60KB")
    cls = transformers.T5ForConditionalGeneration
    ref = cls.from_pretrained(tmp_path, dtype=dtype)
    model = patchkit.from_pretrained(cls, tmp_path, dtype=dtype)
    _assert_same_tensors(model, ref)
    wo = model.encoder.block[0].layer[1].DenseReluDense.wo.weight
    assert wo.dtype == (torch.float32 if dtype == torch.float16 else dtype)  # T5's _keep_in_fp32_modules
    patchkit.apply(ref, quantize="int8")
    q, report = patchkit.from_pretrained(cls, tmp_path, dtype=dtype, quantize="int8", return_report=True)
    assert [(s.path, s.reason) for s in report.skipped] == [(s.path, s.reason) for s in patchkit_report(ref).skipped]
    assert any("_keep_in_fp32_modules" in s.reason for s in report.skipped)
    _assert_same_tensors(q, ref)


def patchkit_report(model: nn.Module) -> patchkit.PatchReport:
    from patchkit.journal import find_journal

    found = find_journal(model)
    assert found is not None
    return found[1].layers[-1].report  # type: ignore[no-any-return]


@pytest.mark.parametrize("family", FAMILIES)
def test_skip_only_and_options_match_apply(checkpoints: dict[str, pathlib.Path], family: str) -> None:
    cls = _cls("opt")
    kwargs = {"skip": ["model.decoder.layers.1"], "only": ["re:.*(proj|fc\\d)"], "blocksize": 128}
    if family == "int8":
        kwargs = {"skip": ["model.decoder.layers.1"], "threshold": 0.0}
    ref = cls.from_pretrained(checkpoints["opt"])
    ref_report = patchkit.apply(ref, quantize=family, **kwargs)
    model, report = patchkit.from_pretrained(cls, checkpoints["opt"], quantize=family, return_report=True, **kwargs)
    assert [s.paths for s in report.swaps] == [s.paths for s in ref_report.swaps]
    assert [(s.path, s.reason) for s in report.skipped] == [(s.path, s.reason) for s in ref_report.skipped]
    assert torch.equal(_out(model), _out(ref))
    with pytest.raises(patchkit.UnsupportedError, match="unknown option"):
        patchkit.from_pretrained(cls, checkpoints["opt"], quantize=family, treshold=1.0)


def test_quantized_save_is_byte_identical_to_the_apply_route(
    checkpoints: dict[str, pathlib.Path], tmp_path: pathlib.Path
) -> None:
    cls = _cls("opt")
    ref = cls.from_pretrained(checkpoints["opt"])
    patchkit.apply(ref, quantize="nf4")
    model = patchkit.from_pretrained(cls, checkpoints["opt"], quantize="nf4")
    patchkit.save_pretrained(ref, tmp_path / "a", quantized=True)
    patchkit.save_pretrained(model, tmp_path / "b", quantized=True)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    reloaded = cls.from_pretrained(tmp_path / "b")
    for module in reloaded.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False  # the kernel patchkit's layers use
    assert torch.equal(_out(reloaded.eval()), _out(model))


@pytest.mark.parametrize("family", ["int8", "nf4"])
def test_reverse_from_checkpoint_is_bit_identical(
    checkpoints: dict[str, pathlib.Path], tmp_path: pathlib.Path, family: str
) -> None:
    cls = _cls("opt")
    ref = cls.from_pretrained(checkpoints["opt"])
    model, report = patchkit.from_pretrained(
        cls, checkpoints["opt"], quantize=family, keep_original="checkpoint", return_report=True
    )
    layers = [m for m in model.modules() if record_of(m) is not None]
    assert layers
    for layer in layers:  # nothing kept in memory or on disk; the freed weight is empty
        record, kept = record_of(layer), _kept(model, layer)
        assert record is not None and record.freed
        assert kept.mode == "checkpoint" and not kept.values and kept.file is None
        assert kept.sources["weight"].digest
    assert all("re-reads it bit-identical" in " ".join(s.notes) for s in report.swaps)
    patchkit.reverse(model)
    _assert_same_tensors(model, ref)
    model.save_pretrained(tmp_path / "a")
    ref.save_pretrained(tmp_path / "b")
    names = sorted(os.listdir(tmp_path / "b"))
    assert sorted(os.listdir(tmp_path / "a")) == names
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def _kept(model: Any, layer: Any) -> Any:
    """What patchkit kept of the original that ``layer`` replaced (keep_original)."""
    from patchkit.journal import _Replace, find_journal

    found = find_journal(model)
    assert found is not None
    entries = [e for layer_ in found[1].layers for e in layer_.entries if isinstance(e, _Replace)]
    kept = next(e.kept for e in entries if e.replacement is layer)
    assert kept is not None
    return kept


def _all_kept(model: Any) -> list[Any]:
    """Everything patchkit kept of the originals (keep_original), in journal order."""
    from patchkit.journal import _Replace, find_journal

    found = find_journal(model)
    assert found is not None
    return [e.kept for layer_ in found[1].layers for e in layer_.entries if isinstance(e, _Replace) and e.kept]


def _shard_of(folder: pathlib.Path, key: str) -> pathlib.Path:
    import json

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder / index["weight_map"][key]


@pytest.mark.parametrize("change", ["bytes", "size"])
def test_reverse_from_checkpoint_refused_when_files_changed(
    checkpoints: dict[str, pathlib.Path], tmp_path: pathlib.Path, change: str
) -> None:
    folder = _copy(checkpoints["opt"], tmp_path)
    model = patchkit.from_pretrained(_cls("opt"), folder, quantize="nf4", keep_original="checkpoint")
    key = "model.decoder.layers.0.fc1.weight"
    shard = _shard_of(folder, key)
    original = shard.read_bytes()
    if change == "bytes":  # flip one byte inside the tensor data, same size
        source = _kept(model, model.model.decoder.layers[0].fc1).sources["weight"]
        assert source.key == key
        data = bytearray(original)
        data[source.begin + 5] ^= 0xFF
        shard.write_bytes(bytes(data))
    else:
        shard.write_bytes(original + b"\0" * 16)
    before = model.model.decoder.layers[0].fc1
    with pytest.raises(patchkit.PatchError, match="changed since loading") as err:
        patchkit.reverse(model)
    assert shard.name in str(err.value)
    assert patchkit.is_patched(model) and model.model.decoder.layers[0].fc1 is before  # nothing changed
    shard.write_bytes(original)  # put the file back: reverse now works, bit-identical
    patchkit.reverse(model)
    _assert_same_tensors(model, _cls("opt").from_pretrained(folder))


def test_keep_original_checkpoint_needs_a_patchkit_load(checkpoints: dict[str, pathlib.Path]) -> None:
    model = _cls("opt").from_pretrained(checkpoints["opt"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(patchkit.UnsupportedError, match="patchkit.from_pretrained"):
        patchkit.apply(model, quantize="nf4", keep_original="checkpoint")
    assert not patchkit.is_patched(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_missing_tensor_is_initialised_as_transformers_does(
    checkpoints: dict[str, pathlib.Path], tmp_path: pathlib.Path
) -> None:
    from safetensors.torch import load_file, save_file

    folder = _copy(checkpoints["opt"], tmp_path)
    key = "model.decoder.layers.1.final_layer_norm.weight"
    shard = _shard_of(folder, key)
    tensors = load_file(shard)
    del tensors[key]
    tensors["model.decoder.unused_extra"] = torch.zeros(3)
    save_file(tensors, shard, metadata={"format": "pt"})
    import json

    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    del index["weight_map"][key]
    index["weight_map"]["model.decoder.unused_extra"] = shard.name
    index_file.write_text(json.dumps(index))
    ref = _cls("opt").from_pretrained(folder)
    with pytest.warns(patchkit.PatchkitWarning) as record:
        model, report = patchkit.from_pretrained(_cls("opt"), folder, quantize="int8", return_report=True)
    messages = " ".join(str(w.message) for w in record)
    assert key in messages and "unused_extra" in messages
    assert any(key in note for note in report.notes)
    assert torch.equal(model.model.decoder.layers[1].final_layer_norm.weight, torch.ones(64))
    patchkit.apply(ref, quantize="int8")
    _assert_same_tensors(model, ref)


# -- bad input: a clear error naming the file (and the tensor), raised before any tensor is read -------


def test_missing_folder_and_missing_weights(tmp_path: pathlib.Path) -> None:
    with pytest.raises(patchkit.UnsupportedError, match="does not exist"):
        patchkit.from_pretrained(_cls("opt"), tmp_path / "nowhere", quantize="nf4")
    _opt().config.save_pretrained(tmp_path)
    with pytest.raises(patchkit.UnsupportedError, match="no model.safetensors"):
        patchkit.from_pretrained(_cls("opt"), tmp_path, quantize="nf4")


def test_shard_listed_in_the_index_but_absent(checkpoints: dict[str, pathlib.Path], tmp_path: pathlib.Path) -> None:
    folder = _copy(checkpoints["opt"], tmp_path)
    shard = _shard_of(folder, "model.decoder.layers.1.fc2.weight")
    shard.unlink()
    with pytest.raises(patchkit.UnsupportedError, match=shard.name):
        patchkit.from_pretrained(_cls("opt"), folder, quantize="nf4")


def test_truncated_file(checkpoints: dict[str, pathlib.Path], tmp_path: pathlib.Path) -> None:
    folder = _copy(checkpoints["opt"], tmp_path)
    shard = _shard_of(folder, "model.decoder.layers.1.fc2.weight")
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(patchkit.UnsupportedError, match=rf"{shard.name} is truncated: tensor '[\w.]+' needs bytes"):
        patchkit.from_pretrained(_cls("opt"), folder, quantize="nf4")
    shard.write_bytes(b"\x01")
    with pytest.raises(patchkit.UnsupportedError, match=f"{shard.name} is truncated"):
        patchkit.from_pretrained(_cls("opt"), folder)


@pytest.mark.parametrize("what", ["shape", "dtype"])
def test_wrong_shape_or_dtype(checkpoints: dict[str, pathlib.Path], tmp_path: pathlib.Path, what: str) -> None:
    from safetensors.torch import load_file, save_file

    folder = _copy(checkpoints["opt"], tmp_path)
    key = "model.decoder.layers.0.fc1.weight"
    shard = _shard_of(folder, key)
    tensors = load_file(shard)
    w = tensors[key]
    tensors[key] = w[:-1].contiguous() if what == "shape" else w.to(torch.int32)
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(patchkit.UnsupportedError, match=f"{shard.name}: tensor '{key}'.*{what}|{shard.name}.*{key}"):
        patchkit.from_pretrained(_cls("opt"), folder, quantize="nf4")


def test_plan_time_refusal_before_reading(checkpoints: dict[str, pathlib.Path]) -> None:
    with pytest.raises(patchkit.UnsupportedError, match="no quantize patcher of family"):
        patchkit.from_pretrained(_cls("opt"), checkpoints["opt"], quantize="int3")
    with pytest.raises(patchkit.UnsupportedError, match="blocksize"):
        patchkit.from_pretrained(_cls("opt"), checkpoints["opt"], quantize="nf4", blocksize=3)
    with pytest.raises(patchkit.UnsupportedError, match="one device"):
        patchkit.from_pretrained(_cls("opt"), checkpoints["opt"], quantize="nf4", device_map="auto")


def test_single_file_checkpoint_and_silent_progress(tmp_path: pathlib.Path, capfd: pytest.CaptureFixture[str]) -> None:
    _opt().save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    ref = _cls("opt").from_pretrained(tmp_path)
    capfd.readouterr()
    model = patchkit.from_pretrained(_cls("opt"), tmp_path, quantize="fp4")
    assert "patchkit: loading" not in capfd.readouterr().err  # not a terminal: no bar
    patchkit.apply(ref, quantize="fp4")
    assert torch.equal(_out(model), _out(ref))


# -- the files are read through a memory map: nothing loaded may stay backed by it ---------------------


def _file_backed(folder: pathlib.Path) -> list[tuple[int, int]]:
    """Address ranges of this process mapped from files in ``folder`` (Linux ``/proc/self/maps``)."""
    found = []
    for line in pathlib.Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith(str(folder)):
            begin, end = (int(x, 16) for x in parts[0].split("-"))
            found.append((begin, end))
    return found


def _assert_not_file_backed(tensors: list[torch.Tensor], folder: pathlib.Path) -> None:
    mapped = _file_backed(folder)
    for tensor in tensors:
        begin = tensor.data_ptr()
        end = begin + tensor.numel() * tensor.element_size()
        assert not any(b < end and begin < e for b, e in mapped), (tuple(tensor.shape), tensor.dtype)


linux_only = pytest.mark.skipif(not os.path.isfile("/proc/self/maps"), reason="reads /proc/self/maps")


@linux_only
@pytest.mark.parametrize("keep", [None, "cpu"])
def test_loaded_tensors_do_not_depend_on_the_files(
    checkpoints: dict[str, pathlib.Path], tmp_path: pathlib.Path, keep: str | None
) -> None:
    """A quantized layer's weight is handed to the quantizer as a view of the mapped file; the model
    (and, with keep_original="cpu", the kept original the quantizer held on to) must end up with
    memory of its own: the files can be rewritten or truncated afterwards."""
    folder = _copy(checkpoints["opt"], tmp_path)
    kwargs = {} if keep is None else {"keep_original": keep}
    model = patchkit.from_pretrained(_cls("opt"), folder, quantize="nf4", **kwargs)
    held = list(_tensors(model).values())
    kept = [v for k in _all_kept(model) for v in k.values.values()]
    assert bool(kept) == (keep == "cpu")
    _assert_not_file_backed(held + kept, folder)
    for shard in folder.glob("*.safetensors"):
        shard.write_bytes(b"")  # reading a page still mapped from a truncated file would raise SIGBUS
    ref = _cls("opt").from_pretrained(checkpoints["opt"])
    patchkit.apply(ref, quantize="nf4", **kwargs)
    assert torch.equal(_out(model), _out(ref))
    patchkit.reverse(model)
    patchkit.reverse(ref)
    _assert_same_tensors(model, ref)


@linux_only
def test_a_layer_skipped_while_loading_keeps_a_copy_of_its_own(
    checkpoints: dict[str, pathlib.Path], tmp_path: pathlib.Path
) -> None:
    """int8 refuses a weight beyond the float16 range only once it is loaded (strict=False: skipped);
    that weight was read as a view of the mapped file and must be copied out."""
    from safetensors.torch import load_file, save_file

    folder = _copy(checkpoints["opt"], tmp_path)
    key = "model.decoder.layers.0.fc1.weight"
    shard = _shard_of(folder, key)
    tensors = load_file(shard)
    tensors[key][0, 0] = 1e6
    save_file(tensors, shard, metadata={"format": "pt"})
    expected = tensors[key].clone()
    model, report = patchkit.from_pretrained(_cls("opt"), folder, quantize="int8", strict=False, return_report=True)
    assert [s.path for s in report.skipped if s.unsupported] == ["model.decoder.layers.0.fc1"]
    _assert_not_file_backed(list(_tensors(model).values()), folder)
    for name in folder.glob("*.safetensors"):
        name.write_bytes(b"")
    assert torch.equal(model.model.decoder.layers[0].fc1.weight, expected)


def test_reading_without_a_memory_map_gives_the_same_model(
    checkpoints: dict[str, pathlib.Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where files are not mapped (not Linux) every tensor is read into memory of its own: same model."""
    import patchkit.checkpoint

    cls = _cls("opt")
    ref = cls.from_pretrained(checkpoints["opt"])
    patchkit.apply(ref, quantize="int8")
    monkeypatch.setattr(patchkit.checkpoint, "mapping_supported", lambda: False)
    model = patchkit.from_pretrained(cls, checkpoints["opt"], quantize="int8", keep_original="checkpoint")
    _assert_same_tensors(model, ref)
    assert torch.equal(_out(model), _out(ref))
    patchkit.reverse(model)  # the originals read back from the files (fingerprinted while loading)
    _assert_same_tensors(model, cls.from_pretrained(checkpoints["opt"]))


@pytest.mark.parametrize("mapped", [True, False])
def test_file_truncated_after_the_header_check(
    checkpoints: dict[str, pathlib.Path], tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, mapped: bool
) -> None:
    import patchkit.checkpoint
    from patchkit.checkpoint import ShardReader, open_checkpoint

    if not mapped:
        monkeypatch.setattr(patchkit.checkpoint, "mapping_supported", lambda: False)
    folder = _copy(checkpoints["opt"], tmp_path)
    checkpoint = open_checkpoint(folder)
    shard = _shard_of(folder, "model.decoder.layers.1.fc2.weight")
    shard.write_bytes(shard.read_bytes()[:-100])
    name, entries = next((f, e) for f, e in checkpoint.by_file() if f == str(shard))
    reader = ShardReader(name, checkpoint.sizes[name])
    first = reader.read(entries[0], entries[0].torch_dtype, torch.device("cpu"), fingerprint=True, share=False)
    assert first[0].shape == entries[0].shape and first[1]
    with pytest.raises(patchkit.UnsupportedError, match=rf"{shard.name} is truncated: tensor '[\w.]+' needs"):
        reader.read(entries[-1], entries[-1].torch_dtype, torch.device("cpu"), fingerprint=False, share=True)
    reader.close()


@pytest.mark.parametrize("value", [65500.0, 65504.0, 65510.0, float("inf")])
def test_int8_float16_range_check_while_loading_matches_apply(
    checkpoints: dict[str, pathlib.Path], tmp_path: pathlib.Path, value: float
) -> None:
    """While loading, int8's check reads the float16 range off the row scales it computes anyway
    (65500 and 65510 both round to 65504): it must refuse exactly what apply refuses."""
    from safetensors.torch import load_file, save_file

    folder = _copy(checkpoints["opt"], tmp_path)
    key = "model.decoder.layers.0.fc1.weight"
    shard = _shard_of(folder, key)
    tensors = load_file(shard)
    tensors[key][3, 5] = value
    save_file(tensors, shard, metadata={"format": "pt"})
    cls = _cls("opt")
    ref = cls.from_pretrained(folder)
    ref_report = patchkit.apply(ref, quantize="int8", strict=False)
    model, report = patchkit.from_pretrained(cls, folder, quantize="int8", strict=False, return_report=True)
    refused = [s.path for s in report.skipped if s.unsupported]
    assert refused == (["model.decoder.layers.0.fc1"] if value > 65504 else [])
    # the same skips (a load reports the ones found once tensors arrived after the plan-time ones)
    assert sorted((s.path, s.reason, s.unsupported) for s in report.skipped) == sorted(
        (s.path, s.reason, s.unsupported) for s in ref_report.skipped
    )
    _assert_same_tensors(model, ref)
