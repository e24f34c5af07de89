"""flash2 benchmarks: patchkit (padding-free + varlen kernel) vs transformers' sdpa, in one process.

CPU (this script's main): reference kernel + padding-free on an OPT-125m-sized Llama decoder
(hidden 768, 12 layers, 12 heads, ffn 3072), batch 16 x 512, at 0 / 30 / 50 % padding, plain calls
``model(ids, attention_mask=mask)`` with no ``use_cache`` argument (Llama's default config
``use_cache=True``: both models fill a KV cache); then greedy ``generate`` (LlamaForCausalLM, same
size, 16 new tokens, left-padded prompts ~45 % padding) end to end, tokens compared.
``--models falcon`` runs the plain-call table on a Falcon decoder of the same size instead
(``FalconModel``, falcon-7b layout: multi-query fused qkv, parallel attention, rotary; Falcon's
default config ``use_cache=True``; padding-free since issue 11).
Baseline and patched model hold the same weights; runs alternate (baseline, patched, baseline, ...)
and medians are reported. Not a test: it asserts nothing beyond a correctness sanity check.

    python bench/bench_flash2.py            # full size (several minutes on 2 cores)
    python bench/bench_flash2.py --small    # seconds
    python bench/bench_flash2.py --models falcon --no-generate   # the Falcon plain-call table

``gpu_checks(small)`` is what bench/gpu_check.py calls on a GPU machine (see the issue): torch
kernel vs eager in bf16, the 8 x 4096 benchmark vs sdpa with peak memory and a bare packed call,
batch 1 without padding, plain calls (config ``use_cache=True``) at 30 / 50 % padding, and greedy
``generate`` (16 x 1024 left-padded prompts, ~45 % padding, 16 new tokens) with tokens compared.
``gpu_checks(small=True)`` dry-runs on the CPU with the reference kernel.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from transformers import (
    FalconConfig,
    FalconForCausalLM,
    FalconModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
)

import patchkit

CPU_SIZE = dict(hidden=768, layers=12, heads=12, kv_heads=12, ffn=3072)  # OPT-125m-sized decoder
SMALL_SIZE = dict(hidden=128, layers=2, heads=4, kv_heads=4, ffn=256)


def llama_config(
    hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, impl: str, use_cache: bool = False
) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        attn_implementation=impl,
        use_cache=use_cache,
        max_position_embeddings=8192,
        pad_token_id=0,
    )


def falcon_config(
    hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, impl: str, use_cache: bool = True
) -> FalconConfig:
    """falcon-7b's layout (old multi-query fused qkv, parallel attention + MLP, rotary, no biases) at
    the given size; ``kv_heads`` is unused (multi-query: one KV head)."""
    return FalconConfig(
        vocab_size=32000,
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        new_decoder_architecture=False,
        multi_query=True,
        parallel_attn=True,
        alibi=False,
        bias=False,
        attn_implementation=impl,
        use_cache=use_cache,
        max_position_embeddings=8192,
        pad_token_id=0,
    )


def twin_models(
    cfg_kw: dict[str, Any],
    device: str,
    dtype: torch.dtype,
    use_cache: bool = False,
    cls: Any = LlamaModel,
    make_config: Callable[..., Any] = llama_config,
) -> tuple[Any, Any]:
    """Two models of ``cls`` with the same weights: (HF sdpa baseline, copy to patch).

    ``use_cache=True`` is the Llama (and Falcon) config default: a plain call then fills a KV cache."""
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: fast for the 1B GPU model
        base = cls(make_config(**cfg_kw, impl="sdpa", use_cache=use_cache)).to(dtype=dtype).eval()
        other = cls(make_config(**cfg_kw, impl="sdpa", use_cache=use_cache)).to(dtype=dtype).eval()
    other.load_state_dict(base.state_dict())
    for model in (base, other):
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.use_cache = use_cache
    return base, other


def padded_batch(batch: int, length: int, padding: float, device: str, vocab: int = 32000):
    """Right-padded batch whose padding fraction is ``padding`` (row lengths spread evenly)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (batch, length), generator=gen)
    if batch == 1:
        lengths = [round(length * (1 - padding))]
    else:
        lengths = [max(1, round(length * (1 - 2 * padding * i / (batch - 1)))) for i in range(batch)]
    mask = torch.zeros(batch, length, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    return ids.to(device), mask.to(device)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def alternate(fns: dict[str, Callable[[], Any]], reps: int, device: str) -> dict[str, float]:
    """Median seconds per call of each fn, runs interleaved (one warm-up each first)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(reps):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def valid_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    m = mask.bool()
    return float((a[m].float() - b[m].float()).abs().max())


def cpu_bench(
    small: bool, reps: int, paddings: tuple[float, ...] = (0.0, 0.3, 0.5), model: str = "llama"
) -> list[dict[str, Any]]:
    """The CPU table: reference kernel + padding-free vs HF sdpa, **plain calls** ``model(ids,
    attention_mask=mask)`` with no ``use_cache`` argument on a config that keeps Llama's (or
    Falcon's) default ``use_cache=True`` (both models fill a KV cache), right padding spread evenly
    over rows. ``model``: ``"llama"`` (LlamaModel) or ``"falcon"`` (FalconModel, falcon-7b layout)."""
    size, batch, length = CPU_SIZE, 16, 512
    if small:
        size, batch, length = SMALL_SIZE, 4, 64
    if model == "falcon":
        sdpa, patched = twin_models(size, "cpu", torch.float32, True, FalconModel, falcon_config)
    else:
        sdpa, patched = twin_models(size, "cpu", torch.float32, use_cache=True)
    patchkit.apply(patched, attention="flash2", backend="reference")
    rows = []
    for padding in paddings:
        ids, mask = padded_batch(batch, length, padding, "cpu")
        with torch.inference_mode():
            got, want = patched(ids, attention_mask=mask), sdpa(ids, attention_mask=mask)
            diff = valid_diff(got.last_hidden_state, want.last_hidden_state, mask)
            cache_diff = max(
                valid_diff(g.transpose(1, 2), w.transpose(1, 2), mask)
                for gl, wl in zip(_cache(got).layers, _cache(want).layers, strict=True)
                for g, w in ((gl.keys, wl.keys), (gl.values, wl.values))
            )
            del got, want
            med = alternate(
                {
                    "sdpa": partial(sdpa, ids, attention_mask=mask),
                    "patchkit": partial(patched, ids, attention_mask=mask),
                },
                reps,
                "cpu",
            )
        rows.append(
            dict(
                padding=round(1 - mask.float().mean().item(), 3),
                sdpa_s=med["sdpa"],
                patchkit_s=med["patchkit"],
                speedup=med["sdpa"] / med["patchkit"],
                max_abs_diff=max(diff, cache_diff),
            )
        )
        print(_row(rows[-1]), flush=True)
    return rows


def _cache(out: Any) -> Any:
    """The KV cache of a model output (``cache`` in transformers 5.24, ``past_key_values`` in 5.17)."""
    fields = getattr(out, "__dataclass_fields__", {})
    return out["cache"] if "cache" in fields else out.past_key_values


def left_padded_batch(batch: int, length: int, padding: float, device: str, vocab: int = 32000):
    """:func:`padded_batch` flipped: left padding, as ``generate`` needs."""
    ids, mask = padded_batch(batch, length, padding, device, vocab)
    return ids.flip(1), mask.flip(1)


def generate_bench(
    small: bool,
    reps: int,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    backend: str = "reference",
    size: dict[str, int] | None = None,
    shape: tuple[int, int] = (16, 512),
    new_tokens: int = 16,
    padding: float = 0.45,
) -> dict[str, Any]:
    """Greedy ``generate`` end to end (prefill + ``new_tokens`` decode steps), left-padded prompts,
    LlamaForCausalLM with Llama's default ``use_cache=True``: patchkit vs HF sdpa, tokens compared."""
    if size is None:
        size = SMALL_SIZE if small else CPU_SIZE
    batch, length = (4, 64) if small else shape
    sdpa, patched = twin_models(size, device, dtype, use_cache=True, cls=LlamaForCausalLM)
    patchkit.apply(patched, attention="flash2", backend=backend)
    ids, mask = left_padded_batch(batch, length, padding, device)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        want = sdpa.generate(ids, attention_mask=mask, **kw)
        got = patched.generate(ids, attention_mask=mask, **kw)
        med = alternate(
            {
                "sdpa": partial(sdpa.generate, ids, attention_mask=mask, **kw),
                "patchkit": partial(patched.generate, ids, attention_mask=mask, **kw),
            },
            reps,
            device,
        )
    return dict(
        batch=batch,
        prompt=length,
        new_tokens=new_tokens,
        padding=round(1 - mask.float().mean().item(), 3),
        sdpa_s=med["sdpa"],
        patchkit_s=med["patchkit"],
        speedup=med["sdpa"] / med["patchkit"],
        tokens_identical=bool(torch.equal(got, want)),
        token_agreement=float((got == want).float().mean()),
    )


def _row(r: dict[str, Any]) -> str:
    return (
        f"{r['padding']:7.2f}  {r['sdpa_s']:7.3f}  {r['patchkit_s']:10.3f}  {r['speedup']:6.2f}x  "
        f"{r['max_abs_diff']:.1e}"
    )


# -- GPU ------------------------------------------------------------------------------------------
def _rel(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> float:
    if mask is not None:
        a, b = a[mask.bool()], b[mask.bool()]
    return float((a.float() - b.float()).norm() / b.float().norm())


def accuracy_checks(device: str, dtype: torch.dtype, backend: str) -> dict[str, Any]:
    """Patched vs eager in the same dtype (and vs eager fp32), tiny models, relative errors."""
    out: dict[str, Any] = {}
    kw = dict(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        attn_implementation="eager",
        use_cache=False,
        pad_token_id=0,
    )
    falcon_kw = dict(
        vocab_size=1000,
        hidden_size=256,
        num_hidden_layers=2,
        num_attention_heads=8,
        attn_implementation="eager",
        use_cache=False,
        pad_token_id=0,
    )
    cases: dict[str, tuple[Any, Any]] = {
        "llama-gqa": (LlamaForCausalLM, LlamaConfig(**kw)),
        "mistral-window16": (MistralForCausalLM, MistralConfig(sliding_window=16, **kw)),
        # padding-free since issue 11 (plain calls, use_cache=False here, and generate's prefill)
        "falcon-7b-layout": (
            FalconForCausalLM,
            FalconConfig(new_decoder_architecture=False, multi_query=True, parallel_attn=True, **falcon_kw),
        ),
        "falcon-new-arch-gqa": (
            FalconForCausalLM,
            FalconConfig(new_decoder_architecture=True, num_kv_heads=2, **falcon_kw),
        ),
    }
    ids, mask = padded_batch(4, 64, 0.3, device, vocab=1000)
    ids[2:], mask[2:] = ids[2:].flip(1), mask[2:].flip(1)  # rows 2-3 left-padded
    for name, (cls, cfg) in cases.items():
        torch.manual_seed(0)
        ref32 = cls(cfg).to(device).eval()
        model = cls(cfg).to(device).eval()
        model.load_state_dict(ref32.state_dict())
        model.to(dtype)
        with torch.no_grad():
            want32 = ref32(ids, attention_mask=mask).logits
            want = model(ids, attention_mask=mask).logits
            patchkit.apply(model, attention="flash2", backend=backend)
            got = model(ids, attention_mask=mask).logits
            packed_pos = torch.cat([torch.arange(20), torch.arange(30), torch.arange(14)]).unsqueeze(0).to(device)
            got_packed = model(ids[:1], position_ids=packed_pos).logits
        patchkit.reverse(model)
        with torch.no_grad():
            # (FalconModel of transformers 5.17 gives create_causal_mask no position_ids: its eager
            # path does not split packed rows, so the Falcon figure means something on >= 5.24 only)
            want_packed = model(ids[:1], position_ids=packed_pos).logits
        gen_kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=0, use_cache=True)
        left_ids, left_mask = ids[2:], mask[2:]
        greedy_want = model.generate(left_ids, attention_mask=left_mask, **gen_kw)
        patchkit.apply(model, attention="flash2", backend=backend)
        greedy_got = model.generate(left_ids, attention_mask=left_mask, **gen_kw)
        patchkit.reverse(model)
        # training on the right-padded rows (with left padding the first token's label is predicted
        # from a padding position, whose output differs by design: zeros here, unspecified in eager)
        grads_want, loss_want = _loss_and_grads(model, ids[:2], mask[:2])
        patchkit.apply(model.train(), attention="flash2", backend=backend)
        grads_got, loss_got = _loss_and_grads(model, ids[:2], mask[:2])
        patchkit.reverse(model)
        model.eval()
        out[name] = dict(
            train_loss_rel_err=abs(loss_got - loss_want) / abs(loss_want),
            train_grad_rel_err=_rel(grads_got, grads_want, None),
            rel_err_vs_eager_same_dtype=_rel(got, want, mask),
            rel_err_eager_same_dtype_vs_fp32=_rel(want, want32, mask),
            rel_err_vs_eager_fp32=_rel(got, want32, mask),
            rel_err_packed_position_ids=_rel(got_packed, want_packed, None),
            greedy_tokens_equal=bool(torch.equal(greedy_got, greedy_want)),
            greedy_token_agreement=float((greedy_got == greedy_want).float().mean()),
        )
    return out


def _loss_and_grads(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, float]:
    """All gradients flattened into one vector, and the loss, for a padded batch (labels ignore padding)."""
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), use_cache=False).loss
    loss.backward()
    grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    model.eval()
    return grads, float(loss.detach())


def _peak(device: str, fn: Callable[[], Any]) -> float | None:
    """GiB allocated at the peak of one call, above what was allocated before it (weights excluded)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**30


def speed_checks(device: str, dtype: torch.dtype, backend: str, small: bool, reps: int) -> dict[str, Any]:
    """8 x 4096 at ~30 % padding vs sdpa (time, peak memory, bare packed call); batch 1 at 0 %."""
    size = dict(hidden=2048, layers=16, heads=32, kv_heads=8, ffn=5632)
    shapes = {"b8x4096_pad30": (8, 4096, 0.3), "b1x4096_pad0": (1, 4096, 0.0)}
    if small:
        size = dict(hidden=128, layers=2, heads=4, kv_heads=2, ffn=256)
        shapes = {"b4x128_pad30": (4, 128, 0.3), "b1x128_pad0": (1, 128, 0.0)}
    sdpa, patched = twin_models(size, device, dtype)
    patchkit.apply(patched, attention="flash2", backend=backend)
    results: dict[str, Any] = {"model": size, "backend": backend, "dtype": str(dtype)}
    for name, (batch, length, padding) in shapes.items():
        ids, mask = padded_batch(batch, length, padding, device)
        # bare: the same kernel on tokens packed beforehand (no unpad / re-pad / mask work in the timing)
        index = mask.flatten().nonzero().squeeze(1)
        lengths = mask.sum(-1, dtype=torch.int32)
        cu = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        packed_ids = ids.flatten()[index].unsqueeze(0)
        packed_pos = torch.arange(length, device=device).expand(batch, length).flatten()[index].unsqueeze(0)
        max_len = int(lengths.max())
        fns = {
            "sdpa": partial(sdpa, ids, attention_mask=mask),
            "patchkit": partial(patched, ids, attention_mask=mask),
            "bare_packed": partial(
                patched,
                packed_ids,
                position_ids=packed_pos,
                cu_seq_lens_q=cu,
                cu_seq_lens_k=cu,
                max_length_q=max_len,
                max_length_k=max_len,
            ),
        }
        with torch.inference_mode():
            diff = valid_diff(fns["patchkit"]().last_hidden_state, fns["sdpa"]().last_hidden_state, mask)
            med = alternate(fns, reps, device)
            peaks = {k: _peak(device, fn) for k, fn in fns.items()}
        results[name] = dict(
            padding=round(1 - mask.float().mean().item(), 3),
            ms={k: v * 1e3 for k, v in med.items()},
            speedup_vs_sdpa=med["sdpa"] / med["patchkit"],
            patchkit_over_bare=med["patchkit"] / med["bare_packed"],
            peak_gib_above_weights=peaks,
            max_abs_diff_vs_sdpa=diff,
        )
    return results


def gpu_checks(small: bool) -> dict[str, Any]:
    """CUDA checks for bench/gpu_check.py; ``small=True`` dry-runs on the CPU (reference kernel, fp32)."""
    cuda = torch.cuda.is_available()
    if not cuda and not small:
        raise RuntimeError("gpu_checks(small=False) needs a CUDA GPU; use small=True for a CPU dry run")
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    backend = "torch" if cuda else "reference"
    import transformers

    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "backend": backend,
    }
    if cuda:
        from patchkit_flash2 import backends

        result["torch_varlen_features"] = sorted(backends.torch_features())
    result["accuracy"] = accuracy_checks(device, dtype, backend)
    result["speed"] = speed_checks(device, dtype, backend, small, reps=3 if small else 10)
    result["plain_call"] = plain_call_checks(device, dtype, backend, small, reps=3 if small else 10)
    result["plain_call_falcon"] = plain_call_checks(device, dtype, backend, small, 3 if small else 10, "falcon")
    gpu_size = dict(hidden=2048, layers=16, heads=32, kv_heads=8, ffn=5632)
    result["generate"] = generate_bench(
        small,
        reps=2 if small else 5,
        device=device,
        dtype=dtype,
        backend=backend,
        size=SMALL_SIZE if small else gpu_size,
        shape=(16, 1024),
        new_tokens=16,
        padding=0.45,
    )
    return result


def plain_call_checks(
    device: str, dtype: torch.dtype, backend: str, small: bool, reps: int, model: str = "llama"
) -> dict[str, Any]:
    """Plain calls with no ``use_cache`` argument on Llama's default config (``use_cache=True``, so both
    models fill a KV cache): 8 x 4096 at ~30 % and ~50 % padding vs HF sdpa, time and peak memory.
    ``model="falcon"``: the same on a FalconModel of the same width and depth (falcon-7b layout)."""
    size = dict(hidden=2048, layers=16, heads=32, kv_heads=8, ffn=5632)
    shapes = {"b8x4096_pad30": (8, 4096, 0.3), "b8x4096_pad50": (8, 4096, 0.5)}
    if small:
        size = dict(hidden=128, layers=2, heads=4, kv_heads=2, ffn=256)
        shapes = {"b4x128_pad30": (4, 128, 0.3), "b4x128_pad50": (4, 128, 0.5)}
    if model == "falcon":
        sdpa, patched = twin_models(size, device, dtype, True, FalconModel, falcon_config)
    else:
        sdpa, patched = twin_models(size, device, dtype, use_cache=True)
    patchkit.apply(patched, attention="flash2", backend=backend)
    results: dict[str, Any] = {
        "model": dict(size, arch=model),
        "backend": backend,
        "dtype": str(dtype),
        "use_cache": "config (True)",
    }
    for name, (batch, length, padding) in shapes.items():
        ids, mask = padded_batch(batch, length, padding, device)
        fns = {"sdpa": partial(sdpa, ids, attention_mask=mask), "patchkit": partial(patched, ids, attention_mask=mask)}
        with torch.inference_mode():
            got, want = fns["patchkit"](), fns["sdpa"]()
            diff = valid_diff(got.last_hidden_state, want.last_hidden_state, mask)
            cache_filled = _cache(got) is not None and _cache(got).get_seq_length() == length
            del got, want
            med = alternate(fns, reps, device)
            peaks = {k: _peak(device, fn) for k, fn in fns.items()}
        results[name] = dict(
            padding=round(1 - mask.float().mean().item(), 3),
            ms={k: v * 1e3 for k, v in med.items()},
            speedup_vs_sdpa=med["sdpa"] / med["patchkit"],
            peak_gib_above_weights=peaks,
            max_abs_diff_vs_sdpa=diff,
            cache_filled=cache_filled,
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny model and batch (seconds)")
    parser.add_argument("--reps", type=int, default=None, help="timed runs per variant (default 3, small 3)")
    parser.add_argument("--paddings", default="0,0.3,0.5", help="padding fractions of the plain-call table")
    parser.add_argument("--models", default="llama", help="plain-call table for: llama, falcon, or llama,falcon")
    parser.add_argument("--no-generate", action="store_true", help="skip the generate benchmark")
    parser.add_argument("--only-generate", action="store_true", help="only the generate benchmark")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--gpu-dry-run", action="store_true", help="run gpu_checks(small=True) and print JSON")
    parser.add_argument("--contend", type=int, default=0, metavar="N", help="N competing busy processes while timing")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gpu_dry_run:
        print(json.dumps(gpu_checks(small=True), indent=1))
        return
    import transformers
    from bench_sdpa import competing_processes  # the same competitor as the sdpa benchmark's

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
        f"{args.contend} competing busy process(es)"
    )
    with competing_processes(args.contend):
        _tables(args)


def _tables(args: argparse.Namespace) -> None:
    reps = args.reps or 3
    for name in [] if args.only_generate else args.models.split(","):
        print(f"{name}: plain call model(ids, attention_mask=mask), config use_cache=True (the default)")
        print(
            "padding  sdpa_s   patchkit_s  speedup  max_abs_diff (last hidden state + cache, valid tokens)", flush=True
        )
        cpu_bench(args.small, reps, tuple(float(x) for x in args.paddings.split(",")), model=name)
    if not args.no_generate:
        r = generate_bench(args.small, reps)
        print(
            f"generate: batch {r['batch']} x prompt {r['prompt']} (left padding {r['padding']:.2f}), "
            f"{r['new_tokens']} new tokens: sdpa {r['sdpa_s']:.3f} s, patchkit {r['patchkit_s']:.3f} s, "
            f"{r['speedup']:.2f}x, tokens identical: {r['tokens_identical']} (agreement {r['token_agreement']:.4f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
