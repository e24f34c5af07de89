"""flash2 on Llama and Mistral through transformers' dispatch point, against eager attention.

Everything runs on the CPU in fp32 with the ``reference`` kernel; each comparison is on valid
(non-padding) tokens with max |diff| <= 1e-5, on tiny random-init configs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import snapshot
from torch.overrides import TorchFunctionMode
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import patchkit
from patchkit import UnsupportedError

TOL = 1e-5


def llama(kv_heads: int = 2, **kw) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        attn_implementation="eager",
        use_cache=False,
        pad_token_id=0,
        **kw,
    )
    return LlamaForCausalLM(cfg).eval()


def mistral(window: int = 4) -> MistralForCausalLM:
    torch.manual_seed(0)
    cfg = MistralConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=window,
        attn_implementation="eager",
        use_cache=False,
        pad_token_id=0,
    )
    return MistralForCausalLM(cfg).eval()


def batch(pad: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 97, (3, 11), generator=gen)
    mask = torch.ones(3, 11, dtype=torch.long)
    if pad == "left":
        mask[0, :4] = 0
        mask[2, :1] = 0
    elif pad == "right":
        mask[0, 6:] = 0
        mask[1, 9:] = 0
    return ids, mask


def logits(model, ids, mask, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, attention_mask=mask, **kw).logits


class LinearInputs(TorchFunctionMode):
    """Shapes of the inputs ``F.linear`` receives with ``weight`` (a module hook would itself switch
    padding-free off: hooks inside a patched model see padded tensors)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = weight
        self.seen: list[tuple[int, ...]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.linear and len(args) > 1 and args[1] is self.weight:
            self.seen.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def patch(model, **kw) -> patchkit.PatchReport:
    return patchkit.apply(model, attention="flash2", backend="reference", **kw)


def close_on(mask: torch.Tensor, got: torch.Tensor, want: torch.Tensor) -> float:
    valid = mask.bool() if mask is not None else torch.ones(got.shape[:2], dtype=torch.bool)
    return (got - want)[valid].abs().max().item()


@pytest.mark.parametrize(
    "make",
    [llama, lambda: llama(kv_heads=1), lambda: llama(kv_heads=4), mistral],
    ids=["llama-gqa", "llama-mqa", "llama-mha", "mistral-window4"],
)
@pytest.mark.parametrize("pad", ["left", "right", "none", "full"])
@pytest.mark.parametrize("padding_free", [True, False])
def test_matches_eager(make, pad, padding_free):
    model = make()
    ids, mask = batch(pad)
    mask_arg = None if pad == "none" else mask
    want = logits(model, ids, mask_arg)
    patch(model, padding_free=padding_free)
    got = logits(model, ids, mask_arg)
    assert close_on(mask, got, want) <= TOL
    patchkit.reverse(model)
    assert close_on(mask, logits(model, ids, mask_arg), want) == 0.0


def test_padding_free_runs_packed_tokens_through_mlp():
    model = llama()
    ids, mask = batch("left")
    patch(model)
    with LinearInputs(model.model.layers[0].mlp.gate_proj.weight) as recorder:
        logits(model, ids, mask)
        assert recorder.seen == [(1, int(mask.sum()), 64)]  # no padding token reaches the MLP
        with torch.no_grad():
            out = model(ids, attention_mask=mask, use_cache=True)  # prefill into an empty cache: packed too
            assert recorder.seen[-1] == (1, int(mask.sum()), 64)
            step_mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
            model(ids[:, :1], attention_mask=step_mask, past_key_values=out.past_key_values)  # decode step
    assert recorder.seen[-1] == (3, 1, 64)  # a non-empty cache: padded rows, varlen attention only


def test_packed_sequences_by_position_ids():
    model = llama()
    lengths = [4, 5, 3]
    ids = torch.randint(1, 97, (1, sum(lengths)), generator=torch.Generator().manual_seed(2))
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    want = logits(model, ids, None, position_ids=pos)  # eager builds a block-diagonal mask from position_ids
    separate = torch.cat([logits(model, part, None) for part in ids.split(lengths, dim=1)], dim=1)
    assert (want - separate).abs().max() <= TOL
    patch(model)
    got = logits(model, ids, None, position_ids=pos)
    assert (got - want).abs().max() <= TOL


def test_explicit_cu_seq_lens_kwargs():
    model = llama()
    lengths = [6, 2, 5]
    ids = torch.randint(1, 97, (1, sum(lengths)), generator=torch.Generator().manual_seed(3))
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    separate = torch.cat([logits(model, part, None) for part in ids.split(lengths, dim=1)], dim=1)
    patch(model)
    cu = torch.tensor([0, 6, 8, 13], dtype=torch.int32)
    got = logits(model, ids, None, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=6, max_length_k=6)
    assert (got - separate).abs().max() <= TOL


@pytest.mark.parametrize("make", [llama, lambda: mistral(window=3)], ids=["llama", "mistral"])
@pytest.mark.parametrize("rows", [1, 3])
def test_generate_greedy_matches_eager(make, rows):
    model = make()
    model.config.use_cache = True
    ids, mask = batch("left")
    ids, mask = ids[:rows], mask[:rows]
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    want = model.generate(ids, attention_mask=mask, **kw)
    patch(model)
    got = model.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(got, want)


def test_mistral_window_smaller_than_sequence_matters():
    model = mistral(window=3)
    ids, mask = batch("right")
    want = logits(model, ids, mask)
    model.config.sliding_window = None  # sanity: the window changes the result, so the test can fail
    assert close_on(mask, logits(model, ids, mask), want) > 1e-3
    model.config.sliding_window = 3
    patch(model)
    assert close_on(mask, logits(model, ids, mask), want) <= TOL


@pytest.mark.parametrize("padding_free", [True, False])
@pytest.mark.parametrize("pad", ["right", "left"])
def test_training_loss_and_grads_match_eager(padding_free, pad):
    model = llama().train()
    ids, mask = batch(pad)
    labels = ids.masked_fill(mask == 0, -100)
    if pad == "left":  # the first token's label is predicted from a padding position: ignore it too
        labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)

    def loss_and_grads():
        model.zero_grad()
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    want_loss, want_grads = loss_and_grads()
    patch(model, padding_free=padding_free)
    got_loss, got_grads = loss_and_grads()
    assert abs(got_loss - want_loss) / abs(want_loss) <= 1e-4
    for name, grad in want_grads.items():
        rel = (got_grads[name] - grad).norm() / grad.norm().clamp(min=1e-12)
        assert rel <= 1e-4, name
    # grads land on the user's own parameter objects (shared, not copied)
    assert all(p.grad is not None for p in model.parameters())


def test_output_attentions_is_refused():
    model = llama()
    ids, mask = batch("left")
    patch(model)
    with pytest.raises(UnsupportedError, match="attention weights"):
        model(ids, attention_mask=mask, output_attentions=True)


def test_reverse_restores_exact_original():
    model = llama()
    before = snapshot(model)
    config_before = copy.deepcopy(model.config.to_dict())
    attn_before = model.config._attn_implementation
    patch(model)
    assert model.config._attn_implementation == "patchkit"
    patchkit.reverse(model)
    assert snapshot(model) == before
    assert model.config.to_dict() == config_before
    assert model.config._attn_implementation == attn_before
    assert "forward" not in model.model.__dict__


def test_other_model_of_same_class_untouched_even_sharing_config():
    keys_before = {k: v for k, v in ALL_ATTENTION_FUNCTIONS._global_mapping.items() if k != "patchkit"}
    masks_before = {k: v for k, v in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.items() if k != "patchkit"}
    a = llama()
    b = LlamaForCausalLM(a.config).eval()  # same config object: the hardest case
    c = llama()
    ids, mask = batch("left")
    want_b, want_c = logits(b, ids, mask), logits(c, ids, mask)
    patch(a)
    seen = []
    b.model.layers[0].mlp.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    assert torch.equal(logits(b, ids, mask), want_b)  # b falls back to eager, on its own masks
    assert seen == [(3, 11, 64)]
    assert torch.equal(logits(c, ids, mask), want_c)
    assert c.config._attn_implementation == "eager" and "forward" not in c.model.__dict__
    assert {k: v for k, v in ALL_ATTENTION_FUNCTIONS._global_mapping.items() if k != "patchkit"} == keys_before
    assert {k: v for k, v in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.items() if k != "patchkit"} == masks_before


def test_unpatched_layer_of_patched_model_keeps_previous_implementation():
    model = llama()
    ids, mask = batch("left")
    want = logits(model, ids, mask)
    report = patch(model, skip=["model.layers.1"])
    assert [s.paths for s in report.swaps] == [["model.layers.0.self_attn"]]
    assert "_patchkit_flash2" not in model.model.layers[1].self_attn.__dict__
    assert close_on(mask, logits(model, ids, mask), want) <= TOL


def test_auto_refuses_cpu_fp32_before_touching_the_model():
    model = llama()
    before = snapshot(model)
    with pytest.raises(UnsupportedError, match="backend='reference'") as err:
        patchkit.apply(model, attention="flash2")
    assert "CUDA" in str(err.value) and "bf16" in str(err.value)
    assert snapshot(model) == before and not patchkit.is_patched(model)


def test_sdpa_model_keeps_sdpa_fallback_and_matches():
    torch.manual_seed(0)
    model = llama()
    model.config._attn_implementation = "sdpa"
    ids, mask = batch("right")
    want = logits(model, ids, mask)
    patch(model)
    assert close_on(mask, logits(model, ids, mask), want) <= TOL
    patchkit.reverse(model)
    assert model.config._attn_implementation == "sdpa"


def test_inputs_embeds_padding_free_matches_eager():
    model = llama()
    ids, mask = batch("left")
    embeds = model.get_input_embeddings()(ids).detach()
    with torch.no_grad():
        want = model(inputs_embeds=embeds, attention_mask=mask).logits
        patch(model)
        got = model(inputs_embeds=embeds, attention_mask=mask).logits
    assert close_on(mask, got, want) <= TOL


def test_plan_on_meta_device_checks_dtype_without_touching():
    with torch.device("meta"):
        model = llama().to(torch.bfloat16)
    plan = patchkit.plan(model, attention="flash2", backend="torch")
    assert "flash2-llama" in str(plan)
    with pytest.raises(UnsupportedError, match="bf16"):
        patchkit.plan(model.float(), attention="flash2", backend="torch")
    assert not patchkit.is_patched(model)


def test_models_sharing_a_config_reverse_in_any_order():
    a = llama()
    b = LlamaForCausalLM(a.config).eval()
    ids, mask = batch("right")
    want_a, want_b = logits(a, ids, mask), logits(b, ids, mask)
    patch(a)
    patch(b)
    patchkit.reverse(a)  # b stays patched: the shared config still says "patchkit"
    assert a.config._attn_implementation == "patchkit"
    with LinearInputs(b.model.layers[0].mlp.gate_proj.weight) as recorder:
        assert close_on(mask, logits(b, ids, mask), want_b) <= TOL
    assert [shape[0] for shape in recorder.seen] == [1]  # b still padding-free
    assert torch.equal(logits(a, ids, mask), want_a)  # a falls back to eager exactly
    patchkit.reverse(b)
    assert a.config._attn_implementation == "eager"
