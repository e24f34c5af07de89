"""torch.compile on patched models: outputs match eager, graph breaks are counted, `_orig_mod.` targeting.

CPU, fp32, tiny random models. The BERT fastpath is compiled once with the default inductor
backend (C++ codegen; ~25 s on a 2-core CPU), everything else with ``aot_eager`` (same Dynamo
tracing and AOT autograd, no code generation) to keep the file fast.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import patchkit

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # torch.compile: seconds per graph on the CPU
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def tiny_llama(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="eager",
        use_cache=False,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    cfg._attn_implementation = "eager"
    return transformers.BertModel(cfg).eval()


def padded(seed: int = 1, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 97, (3, 10), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, 6:] = 0
    mask[2, 8:] = 0
    return ids.to(device), mask.to(device)


def valid_diff(got: torch.Tensor, want: torch.Tensor, mask: torch.Tensor) -> float:
    return (got - want)[mask.bool()].abs().max().item()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_compiled_bert_fastpath_matches_eager_with_inductor():
    model = tiny_bert()
    patchkit.apply(model, attention="sdpa")
    compiled = torch.compile(model)  # default backend: inductor
    with torch.no_grad():
        for seed in (1, 2):  # a second batch (same shapes, other padding values) reuses the graphs
            ids, mask = padded(seed)
            want = model(ids, attention_mask=mask).last_hidden_state
            got = compiled(ids, attention_mask=mask).last_hidden_state
            assert valid_diff(got, want, mask) <= 1e-5
            assert got[~mask.bool()].abs().max().item() == 0  # padding rows stay zeros
    graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        compiled(*padded(3)[:1], attention_mask=padded(3)[1])
    assert counters["stats"]["unique_graphs"] == graphs  # no recompilation per call


@pytest.mark.parametrize("train", [False, True])
def test_compiled_flash2_reference_matches_eager(train):
    model = tiny_llama().train(train)
    patchkit.apply(model, attention="flash2", backend="reference")
    compiled = torch.compile(model, backend="aot_eager")
    ids, mask = padded()
    labels = ids.masked_fill(mask == 0, -100)
    want = model(ids, attention_mask=mask, labels=labels)
    got = compiled(ids, attention_mask=mask, labels=labels)
    assert valid_diff(got.logits, want.logits, mask) <= 1e-5
    assert got.loss.item() == pytest.approx(want.loss.item(), rel=1e-5)
    if train:
        params = list(model.parameters())
        for g, w in zip(torch.autograd.grad(got.loss, params), torch.autograd.grad(want.loss, params), strict=True):
            assert torch.allclose(g, w, atol=1e-6, rtol=1e-4)


def test_compiled_flash2_does_not_recompile_per_call():
    model = tiny_llama()
    patchkit.apply(model, attention="flash2", backend="reference")
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        for seed in (1, 2):
            ids, mask = padded(seed)
            compiled(ids, attention_mask=mask)
        graphs = counters["stats"]["unique_graphs"]
        ids, mask = padded(3)
        compiled(ids, attention_mask=mask)
    assert counters["stats"]["unique_graphs"] == graphs


def test_compiled_model_is_not_governed_between_graphs(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a busy CPU the thread governor lowers torch's count for eager packed calls; inside a
    compiled call (also in eager code between its graphs) it must not, or every change of its
    decision recompiles the graphs."""
    from patchkit import threads

    gov = threads.Governor()
    monkeypatch.setattr(threads, "governor", gov)
    gov.last_probe = float("inf")  # no probes: the test sets the decision
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = tiny_llama()
        patchkit.apply(model, attention="flash2", backend="reference")
        compiled = torch.compile(model, backend="aot_eager")
        with torch.no_grad():
            for i, seed in enumerate((1, 2, 3, 4, 5)):
                gov.cap = 1 if i % 2 else None  # as if contention came and went between calls
                ids, mask = padded(seed)
                compiled(ids, attention_mask=mask)
                if i == 1:
                    graphs = counters["stats"]["unique_graphs"]
        assert counters["stats"]["unique_graphs"] == graphs
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_compiled_dispatch_reads_the_config_switch_as_a_constant():
    """Regression (torch 2.11): compiled transformers code looks ``config._attn_implementation`` up in
    the interfaces' dicts (``create_causal_mask``: ``... not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping``),
    and the value is flash2's ``ConfigSwitch`` (a ``str`` subclass). Dynamo before 2.13 failed there with
    ``AsPythonConstantNotImplementedError: UserDefinedObjectVariable(ConfigSwitch) is not a constant``.
    The same lookups in one graph, then the whole model; a reverse must invalidate both (guard on the field)."""
    from patchkit_flash2 import dispatch
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = tiny_llama()
    ids, mask = padded()
    padding = ~mask.bool()
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
    patchkit.apply(model, attention="flash2", backend="reference")
    config = model.config
    assert isinstance(config._attn_implementation, dispatch.ConfigSwitch)
    pytree = torch.utils._pytree
    if hasattr(pytree, "register_constant"):  # what Dynamo before 2.13 needs (see dispatch._constant_for_dynamo)
        assert pytree.is_constant_class(dispatch.ConfigSwitch)

    @torch.compile(backend="eager", fullgraph=True)
    def route(x: torch.Tensor) -> torch.Tensor:
        impl = config._attn_implementation
        if impl not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
            return x - 1
        return x + 1 if ALL_ATTENTION_FUNCTIONS.get_interface(impl, None) is dispatch.attention_forward else x

    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        assert route(torch.zeros(1)).item() == 1
        got = compiled(ids, attention_mask=mask).logits
        assert valid_diff(got, want, mask) <= 1e-5
        assert got[padding].abs().max().item() == 0  # the padding-free path ran: zeros on padding
        patchkit.reverse(model)
        assert type(config._attn_implementation) is str and config._attn_implementation == "eager"
        assert route(torch.zeros(1)).item() == 0
        got = compiled(ids, attention_mask=mask).logits
    assert valid_diff(got, want, mask) <= 1e-5
    assert got[padding].abs().max().item() > 0  # the unpatched model ran


@pytest.mark.parametrize(
    "make, kwargs, floor",
    [(tiny_bert, dict(attention="sdpa"), 1), (tiny_llama, dict(attention="flash2", backend="reference"), 1)],
    ids=["bert-sdpa", "llama-flash2"],
)
def test_graph_breaks_are_counted_and_unpatched_has_none(make, kwargs, floor):
    """Padding-free execution is data-dependent (the packed token count comes from the mask): Dynamo breaks the
    graph there. The unpatched model compiles to one graph. Counts are pinned loosely (see docs/distributed.md)."""
    ids, mask = padded()
    model = make()
    with torch.no_grad():
        plain = torch._dynamo.explain(model)(ids, attention_mask=mask)
        patchkit.apply(model, **kwargs)
        torch._dynamo.reset()
        patched = torch._dynamo.explain(model)(ids, attention_mask=mask)
    assert plain.graph_break_count == 0
    assert floor <= patched.graph_break_count <= 30, [str(r.reason)[:80] for r in patched.break_reasons]


def test_only_skip_and_reverse_through_orig_mod_prefix_llama():
    model = tiny_llama()
    ids, mask = padded()
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
    compiled = torch.compile(model, backend="aot_eager")
    report = patchkit.apply(compiled, attention="flash2", backend="reference", only=["model.layers.1"])
    assert [s.paths for s in report.swaps] == [["_orig_mod.model.layers.1.self_attn"]]
    assert hasattr(model.model.layers[1].self_attn, "_patchkit_flash2")
    assert not hasattr(model.model.layers[0].self_attn, "_patchkit_flash2")
    with torch.no_grad():
        assert valid_diff(compiled(ids, attention_mask=mask).logits, want, mask) <= 1e-5
    patchkit.reverse(compiled)
    assert not patchkit.is_patched(compiled) and not hasattr(model.model.layers[1].self_attn, "_patchkit_flash2")
    assert model.config._attn_implementation == "eager"
    report = patchkit.apply(compiled, attention="flash2", backend="reference", skip=["_orig_mod.model.layers.0"])
    assert [s.paths for s in report.swaps] == [["_orig_mod.model.layers.1.self_attn"]]
    patchkit.reverse(compiled)


def test_only_and_reverse_through_orig_mod_prefix_bert():
    model = tiny_bert()
    encoder = model.encoder
    ids, mask = padded()
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        before = compiled(ids, attention_mask=mask).last_hidden_state
        report = patchkit.apply(compiled, attention="sdpa", only=["encoder"])
        assert [s.paths for s in report.swaps] == [["_orig_mod.encoder"]] and model.encoder is not encoder
        assert valid_diff(compiled(ids, attention_mask=mask).last_hidden_state, before, mask) <= 1e-5
        patchkit.reverse(compiled)
        assert model.encoder is encoder
        assert torch.equal(compiled(ids, attention_mask=mask).last_hidden_state, before)  # dynamo re-guarded
    with pytest.raises(patchkit.UnsupportedError, match="nothing to patch"):
        patchkit.apply(compiled, attention="sdpa", skip=["_orig_mod.encoder"])


@pytest.mark.cuda
@CUDA
def test_compiled_flash2_torch_backend_cuda():
    """The torch varlen kernel (bf16, sm80+) under torch.compile with inductor: matches the eager patched model."""
    model = tiny_llama(torch.bfloat16).cuda()
    patchkit.apply(model, attention="flash2", backend="torch")
    compiled = torch.compile(model)
    ids, mask = padded(device="cuda")
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits.float()
        got = compiled(ids, attention_mask=mask).logits.float()
    assert valid_diff(got, want, mask) <= 2e-2 * want[mask.bool()].abs().max().item()


@pytest.mark.cuda
@CUDA
def test_compiled_bert_fastpath_cuda():
    model = tiny_bert().cuda().half()
    patchkit.apply(model, attention="sdpa")
    compiled = torch.compile(model)
    ids, mask = padded(device="cuda")
    with torch.no_grad():
        want = model(ids, attention_mask=mask).last_hidden_state.float()
        got = compiled(ids, attention_mask=mask).last_hidden_state.float()
    assert valid_diff(got, want, mask) <= 2e-2
