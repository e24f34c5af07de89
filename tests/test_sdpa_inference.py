"""The sdpa plugin's inference kernels: fused GEMM epilogues, and when the packed layers must not use them."""

from __future__ import annotations

import pytest
import torch
from patchkit_sdpa import _inference
from patchkit_sdpa._inference import ONEDNN_MIN_ROWS, fusable_activation, inference_ready, linear, plain_linear
from test_sdpa_bert import batch, tiny_bert, valid_diff
from test_sdpa_opt import padded, tiny_opt
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.activations import ACT2FN

import patchkit


class OpLog(TorchDispatchMode):
    """Records the name of every ATen/oneDNN op that runs (no behaviour change)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops.add(str(func._overloadpacket))
        return func(*args, **(kwargs or {}))


def ops_of(fn) -> set[str]:  # type: ignore[no-untyped-def]
    with OpLog() as log:
        fn()
    return log.ops


ONEDNN = "mkldnn._linear_pointwise"


@pytest.fixture
def onednn_at_any_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny test batches have fewer rows than the oneDNN threshold: lift it."""
    monkeypatch.setattr(_inference, "ONEDNN_MIN_ROWS", 1)


@pytest.mark.parametrize("act", [None, "relu", "gelu", "gelu_new", "silu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_linear_equals_module_then_activation(act: str | None, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    m = nn.Linear(24, 40).to(dtype).eval()
    x = torch.randn(17, 24, dtype=dtype)
    fn = ACT2FN[act] if act else None
    with torch.no_grad():
        want = fn(m(x)) if fn else m(x)
        got = linear(m, x, activation=fn)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_linear_with_residual_and_without_bias() -> None:
    torch.manual_seed(0)
    m = nn.Linear(24, 24, bias=False).eval()
    x, r = torch.randn(9, 24), torch.randn(9, 24)
    with torch.no_grad():
        torch.testing.assert_close(linear(m, x, residual=r), m(x) + r, rtol=1e-5, atol=1e-5)


def test_fp32_cpu_runs_on_onednn_unless_disabled() -> None:
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    m, x = nn.Linear(8, 8).eval(), torch.randn(ONEDNN_MIN_ROWS, 8)
    with torch.no_grad():
        assert ONEDNN in ops_of(lambda: linear(m, x, residual=x))
        with torch.backends.mkldnn.flags(enabled=False):
            used = ops_of(lambda: linear(m, x, residual=x))
        small = ops_of(lambda: linear(m, x[: ONEDNN_MIN_ROWS - 1], residual=x[: ONEDNN_MIN_ROWS - 1]))
    assert ONEDNN not in used and "aten.addmm" in used
    assert ONEDNN not in small and "aten.addmm" in small  # few rows: MKL, oneDNN's call overhead loses


def test_fusable_activations_are_exactly_the_erf_gelu_and_relu() -> None:
    assert fusable_activation(ACT2FN["gelu"]) == "gelu"
    assert fusable_activation(nn.GELU()) == "gelu"
    assert fusable_activation(nn.ReLU()) == "relu"
    assert fusable_activation(ACT2FN["relu"]) == "relu"
    for other in (nn.GELU(approximate="tanh"), ACT2FN["gelu_new"], ACT2FN["gelu_python"], nn.SiLU(), torch.tanh):
        assert fusable_activation(other) is None


def test_plain_linear_excludes_subclasses_hooks_and_overrides() -> None:
    class MyLinear(nn.Linear):
        pass

    assert plain_linear(nn.Linear(2, 2))
    assert not plain_linear(MyLinear(2, 2))
    hooked = nn.Linear(2, 2)
    hooked.register_forward_pre_hook(lambda m, a: None)
    assert not plain_linear(hooked)
    overridden = nn.Linear(2, 2)
    overridden.forward = lambda x: x  # type: ignore[method-assign]
    assert not plain_linear(overridden)

    class TaggedParameter(nn.Parameter):  # stands for a tensor-subclass weight (torchao, DTensor, ...)
        pass

    subclassed = nn.Linear(2, 2)
    subclassed.weight = TaggedParameter(subclassed.weight.detach().clone())
    assert not plain_linear(subclassed)


def test_inference_ready_needs_eval_and_no_autograd() -> None:
    m, x = nn.Linear(4, 4).eval(), torch.randn(2, 4)
    assert not inference_ready([m], [], x)  # grad mode on and the weight requires grad
    with torch.no_grad():
        assert inference_ready([m], [], x)
        assert not inference_ready([m.train()], [], x)
    m.eval().requires_grad_(False)
    assert inference_ready([m], [], x)
    assert not inference_ready([m], [], x.requires_grad_())
    handle = nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        with torch.no_grad():
            assert not inference_ready([m], [], torch.randn(2, 4))
    finally:
        handle.remove()


def _bert_pair() -> tuple[nn.Module, nn.Module]:
    eager = tiny_bert("eager")
    fast = tiny_bert("eager")
    patchkit.apply(fast, attention="sdpa")
    return eager, fast


@pytest.mark.usefixtures("onednn_at_any_size")
def test_bert_inference_uses_fused_kernels_and_matches_eager() -> None:
    eager, fast = _bert_pair()
    ids, mask = batch("right")
    with torch.no_grad():
        want = eager(input_ids=ids, attention_mask=mask).last_hidden_state
        used = ops_of(lambda: fast(input_ids=ids, attention_mask=mask))
        got = fast(input_ids=ids, attention_mask=mask).last_hidden_state
    if torch.backends.mkldnn.is_available():
        assert ONEDNN in used
    assert valid_diff(got, want, mask) <= 1e-5


def test_a_hook_added_after_patching_sends_the_call_through_the_original_forward() -> None:
    """A hook on a Linear must see the padded call it sees unpatched, not the packed tokens."""
    eager, fast = _bert_pair()
    calls: list[tuple[int, ...]] = []
    fast.encoder.layer[1].intermediate.dense.register_forward_hook(lambda m, a, out: calls.append(tuple(out.shape)))
    ids, mask = batch("right")
    with torch.no_grad(), pytest.warns(patchkit.PatchkitWarning, match="hooks"):
        got = fast(input_ids=ids, attention_mask=mask).last_hidden_state
    with torch.no_grad():
        want = eager(input_ids=ids, attention_mask=mask).last_hidden_state
    assert calls == [(*ids.shape, 64)]  # the hook saw the padded batch, once
    assert valid_diff(got, want, mask) <= 1e-5


def test_peft_lora_layers_run_their_own_forward() -> None:
    peft = pytest.importorskip("peft")
    eager, fast = _bert_pair()
    cfg = dict(r=4, lora_alpha=8, target_modules=["query", "value", "dense"], init_lora_weights=False)
    torch.manual_seed(1)
    want_model = peft.get_peft_model(eager, peft.LoraConfig(**cfg)).eval()
    torch.manual_seed(1)
    got_model = peft.get_peft_model(fast, peft.LoraConfig(**cfg)).eval()
    ids, mask = batch("left")
    with torch.no_grad():
        want = want_model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = got_model(input_ids=ids, attention_mask=mask).last_hidden_state
        with got_model.disable_adapter():
            without = got_model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert valid_diff(got, want, mask) <= 1e-5
    assert valid_diff(got, without, mask) > 1e-3  # the adapters really ran


def test_bert_with_grad_mode_on_matches_and_backpropagates() -> None:
    eager, fast = _bert_pair()
    ids, mask = batch("holes")
    want = eager(input_ids=ids, attention_mask=mask).last_hidden_state
    got = fast(input_ids=ids, attention_mask=mask).last_hidden_state
    assert got.requires_grad and valid_diff(got.detach(), want.detach(), mask) <= 1e-5
    (got * mask[..., None]).sum().backward()
    assert fast.encoder.layer[0].intermediate.dense.weight.grad is not None


@pytest.mark.parametrize("pre", [True, False])
@pytest.mark.usefixtures("onednn_at_any_size")
def test_opt_inference_uses_fused_kernels_and_matches_eager(pre: bool) -> None:
    eager = tiny_opt("eager", do_layer_norm_before=pre)
    fast = tiny_opt("eager", do_layer_norm_before=pre)
    patchkit.apply(fast, attention="sdpa")
    ids, mask = padded("right")
    with torch.no_grad():
        want = eager(input_ids=ids, attention_mask=mask, use_cache=False).logits
        used = ops_of(lambda: fast(input_ids=ids, attention_mask=mask, use_cache=False))
        got = fast(input_ids=ids, attention_mask=mask, use_cache=False).logits
    if torch.backends.mkldnn.is_available():
        assert ONEDNN in used
    assert valid_diff(got, want, mask) <= 1e-5


def test_float64_models_skip_onednn_and_stay_exact() -> None:
    eager, fast = _bert_pair()
    eager.double(), fast.double()
    ids, mask = batch("right")
    with torch.no_grad():
        used = ops_of(lambda: fast(input_ids=ids, attention_mask=mask))
        got = fast(input_ids=ids, attention_mask=mask).last_hidden_state
        want = eager(input_ids=ids, attention_mask=mask).last_hidden_state
    assert ONEDNN not in used
    assert valid_diff(got, want, mask) <= 1e-12


def test_jit_tracing_records_the_portable_module_path() -> None:
    _, fast = _bert_pair()
    h = torch.randn(2, 5, 32)
    with torch.no_grad():
        want = fast.encoder(h).last_hidden_state
        traced = torch.jit.trace(fast.encoder, (h,), strict=False, check_trace=False)
        got = traced(h)
    graph = str(traced.inlined_graph)
    assert "aten::linear" in graph and "mkldnn" not in graph
    torch.testing.assert_close(got["last_hidden_state"], want, rtol=1e-5, atol=1e-5)


def test_a_non_contiguous_weight_still_gives_the_module_result() -> None:
    torch.manual_seed(0)
    m = nn.Linear(8, 12).eval()
    m.weight = nn.Parameter(torch.randn(8, 12).t())  # a transposed view, as some conversions leave it
    x, r = torch.randn(5, 8), torch.randn(5, 12)
    with torch.no_grad():
        torch.testing.assert_close(linear(m, x, residual=r), m(x) + r, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(linear(m, x, activation=nn.ReLU()), m(x).relu(), rtol=1e-5, atol=1e-5)


def test_an_activation_is_fused_by_its_class_not_its_name() -> None:
    class GELUActivation(nn.Module):  # same name as transformers' class, different function
        act = torch.nn.functional.gelu

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(x)

    assert fusable_activation(GELUActivation()) is None
    m, x = nn.Linear(6, 6).eval(), torch.randn(3, 6)
    with torch.no_grad():
        torch.testing.assert_close(linear(m, x, activation=GELUActivation()), torch.sigmoid(m(x)))


@pytest.mark.usefixtures("onednn_at_any_size")
def test_the_fast_path_survives_a_call_that_captured_hidden_states() -> None:
    eager, fast = _bert_pair()
    ids, mask = batch("right")
    with torch.no_grad():
        with pytest.warns(UserWarning, match="hidden states"):
            fast(input_ids=ids, attention_mask=mask, output_hidden_states=True)  # installs capture hooks
        assert fast.encoder.layer[0]._forward_hooks  # transformers leaves them in place
        used = ops_of(lambda: fast(input_ids=ids, attention_mask=mask))
        got = fast(input_ids=ids, attention_mask=mask).last_hidden_state
        want = eager(input_ids=ids, attention_mask=mask).last_hidden_state
    if torch.backends.mkldnn.is_available():
        assert ONEDNN in used
    assert valid_diff(got, want, mask) <= 1e-5
