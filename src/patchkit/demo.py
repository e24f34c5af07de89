"""``patchkit demo``: patch an embedded model, check outputs, time both, reverse, prove exactness.

The model is built from the config below with random weights (nothing is downloaded): the shape
of all-MiniLM-L6-v2, a sentence-embedding encoder, run on a padded batch as a server would.
"""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

DEMO_CONFIG: dict[str, Any] = {
    "model_type": "bert",
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "vocab_size": 30522,
    "max_position_embeddings": 512,
    "attn_implementation": "sdpa",
}


def _fingerprint(model: nn.Module) -> tuple[Any, ...]:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return (
        [(name, id(m), type(m)) for name, m in model.named_modules(remove_duplicate=False)],
        [(name, id(p), p.data_ptr()) for name, p in model.named_parameters()],
        buf.getvalue(),
        getattr(model.config, "_attn_implementation", None),
    )


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _peak_rss_growth_mib(fn: Callable[[], Any]) -> float | None:
    """Peak resident-memory growth during one call (Linux: reset VmHWM, run, read it); None elsewhere."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # "5" resets the peak RSS counter
        base = _status_kib("VmRSS")
        fn()
        return (_status_kib("VmHWM") - base) / 1024
    except (OSError, KeyError):
        return None


def run_demo(quick: bool = False) -> int:
    """Run the demo, print what happened; returns 0 when outputs match and reverse is exact."""
    try:
        from transformers import AutoConfig, AutoModel
    except ImportError:
        print("patchkit demo needs transformers: pip install 'patchkit[transformers]'")
        return 2
    import patchkit

    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    config = AutoConfig.for_model(**{k: v for k, v in DEMO_CONFIG.items() if k != "attn_implementation"})
    model = AutoModel.from_config(config, attn_implementation=DEMO_CONFIG["attn_implementation"]).eval()
    batch, seq = (8, 64) if quick else (32, 256)
    lengths = torch.randint(seq // 10, seq + 1, (batch,))
    lengths[0] = seq
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1000, config.vocab_size, (batch, seq)) * mask
    padding = 1 - mask.float().mean().item()
    print(
        f"model: {type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"random init from an embedded config (all-MiniLM-L6-v2 shape); baseline = transformers' own SDPA"
    )
    print(f"batch: {batch} x {seq} tokens, {padding:.0%} padding (right-padded)")

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            return model(input_ids=ids, attention_mask=mask).last_hidden_state

    before = _fingerprint(model)
    reference = forward()
    o_mem = _peak_rss_growth_mib(forward)
    report = patchkit.apply(model, attention="sdpa")
    print(report)
    patched_out = forward()
    valid = mask.bool()
    diff = (patched_out[valid] - reference[valid]).abs().max().item()
    print(f"outputs on real tokens: max |patched - original| = {diff:.2e}")
    p_mem = _peak_rss_growth_mib(forward)

    repeats = 3 if quick else 7
    patched_ms, original_ms = [], []
    for _ in range(repeats):  # alternate patched and original runs so both see the same machine state
        patched_ms.append(_median_ms(forward, 1))
        patchkit.reverse(model)
        original_ms.append(_median_ms(forward, 1))
        patchkit.apply(model, attention="sdpa")
    p_ms, o_ms = statistics.median(patched_ms), statistics.median(original_ms)
    print(
        f"speed: original {o_ms:.1f} ms, patched {p_ms:.1f} ms per forward -> speed-up {o_ms / p_ms:.2f}x "
        f"(median of {repeats} alternating runs, {torch.get_num_threads()} threads)"
    )
    if o_mem is not None and p_mem is not None:
        print(f"peak memory growth during a forward: original {o_mem:.0f} MiB, patched {p_mem:.0f} MiB")
    patchkit.reverse(model)
    exact = _fingerprint(model) == before and not patchkit.is_patched(model)
    print(
        f"reverse restored the original exactly (same module and parameter objects, same bytes): "
        f"{'yes' if exact else 'NO'}"
    )
    ok = exact and diff <= 1e-4
    print("demo OK" if ok else "demo FAILED")
    return 0 if ok else 1
