"""Which path a call of a patched encoder / OPT decoder takes: packed (padding-free) or the original's own.

The packed path pays for itself by skipping padding; where there is little to skip, its fixed
costs (one host sync to read the lengths, the gather and scatter, per-sequence attention calls,
a kernel launch more per layer on a GPU) can make it slower than doing nothing. Each family has
one small pure cost model over facts known before the call (:class:`patchkit.paths.CallFacts`);
its thresholds are the named constants below, with the measurements they come from
(``bench/regimes.py``, docs/benchmarks.md). ``path="packed"|"original"`` (an ``apply`` option) or
``PATCHKIT_PATH`` forces either path.
"""

from __future__ import annotations

from typing import Any

import torch

from patchkit.paths import LOG_ATTR, CallFacts, PathLog, requested

OPTION_ATTR = "_patchkit_path_option"  # the apply option, on the patched module

# --- encoders (BERT family, DistilBERT) -------------------------------------------------------
# CPU, fp32, 2 threads (bench/regimes.py, 2026-12-03): with padding the packed path wins from the
# smallest call measured (MiniLM shape 32 x 32 at 10% padding: 1.3x); without padding it wins only
# through its fused GEMM epilogues and oneDNN GEMMs, which start at 256 rows (1 x 256: 1.02x,
# 32 x 256: 1.05-1.13x) and lose below (1 x 16: 0.95x, 1 x 64: 0.97x).
ENCODER_CPU_MIN_PADDING = 0.02  # padded fraction from which packing pays on the CPU
ENCODER_CPU_MIN_TOKENS_UNPADDED = 256  # without padding: packed only from this many tokens (oneDNN rows)
# ... and only with enough padded slots to skip: 1 x 16 at 30% (5 slots) ran 0.96-0.99x packed
# (bench/regimes.py --quick, 2026-12-07): the gather/scatter and the length read cost what 5 rows save.
ENCODER_CPU_MIN_PADDED_SLOTS = 16
# CUDA: not calibrated on a GPU in this session (no device). Kernel launches dominate small calls, and
# the H100 sessions measured compiled packed BERT at 0.71-0.84x of compiled HF: original when compiling.
ENCODER_CUDA_MIN_PADDING = 0.15
ENCODER_CUDA_MIN_TOKENS = 4096

# --- OPT decoder ------------------------------------------------------------------------------
# CPU: packed with padding (30% at 4 x 64 prompts already wins); without padding the packed
# forward is 1.02-1.07x at 16 x 512 (fused epilogues) and loses on short calls. Decode steps (a
# cache to continue) always run the original (transformers' SDPA): nothing to unpad.
OPT_CPU_MIN_PADDING = 0.02
OPT_CPU_MIN_TOKENS_UNPADDED = 2048
# Compiled (inductor) on the CPU the packed OPT lost: 32 x 128 at 30% ran 0.81-0.86x of compiled HF
# (bench/regimes.py --quick, twice, 2026-12-07), so a compiled OPT runs the original (BERT and
# flash2's Llama keep packing compiled: 1.39-1.41x and 1.21x in the same runs).
OPT_CUDA_MIN_PADDING = 0.15
OPT_CUDA_MIN_TOKENS = 4096


def _gpu_rule(facts: CallFacts, min_padding: float, min_tokens: int) -> tuple[str, str]:
    if facts.compiling:
        return "original", "compiled on a GPU: the packed path does not profit from inductor (0.71-0.84x)"
    if facts.padding < min_padding:
        return "original", f"padding {facts.padding:.0%} < {min_padding:.0%} on {facts.device}"
    if facts.tokens < min_tokens:
        return "original", f"{facts.tokens} tokens < {min_tokens}: launch-bound on {facts.device}"
    return "packed", f"padding {facts.padding:.0%}, {facts.tokens} tokens on {facts.device}"


def _cpu_rule(facts: CallFacts, min_padding: float, min_unpadded: int, min_slots: int = 0) -> tuple[str, str]:
    if facts.padding >= min_padding and facts.padded_slots < min_slots and facts.tokens < min_unpadded:
        return "original", f"only {facts.padded_slots} padded slots < {min_slots}: too few to pay for packing"
    if facts.padding >= min_padding:
        return "packed", f"padding {facts.padding:.0%} >= {min_padding:.0%}"
    if facts.tokens >= min_unpadded:
        return "packed", f"padding {facts.padding:.0%} but {facts.tokens} >= {min_unpadded} tokens (fused GEMMs)"
    return "original", f"padding {facts.padding:.0%} < {min_padding:.0%} and {facts.tokens} < {min_unpadded} tokens"


def choose_encoder_path(facts: CallFacts) -> tuple[str, str]:
    """``("packed" | "original", why)`` for one call of a BERT-family / DistilBERT encoder."""
    if facts.device == "cpu":
        return _cpu_rule(facts, ENCODER_CPU_MIN_PADDING, ENCODER_CPU_MIN_TOKENS_UNPADDED, ENCODER_CPU_MIN_PADDED_SLOTS)
    return _gpu_rule(facts, ENCODER_CUDA_MIN_PADDING, ENCODER_CUDA_MIN_TOKENS)


def choose_opt_path(facts: CallFacts) -> tuple[str, str]:
    """``("packed" | "original", why)`` for one call of an OPT decoder."""
    if facts.cached:
        return "original", "continues a KV cache (decode step): transformers' SDPA, nothing to unpad"
    if facts.compiling:
        return "original", "compiled: the packed OPT does not profit from inductor (CPU 0.81-0.86x, GPU 0.71-0.84x)"
    if facts.device == "cpu":
        return _cpu_rule(facts, OPT_CPU_MIN_PADDING, OPT_CPU_MIN_TOKENS_UNPADDED)
    return _gpu_rule(facts, OPT_CUDA_MIN_PADDING, OPT_CUDA_MIN_TOKENS)


def describe_encoder_rule() -> str:
    """The encoder rule in one line, for the apply report."""
    return (
        f"packed on CPU when padding >= {ENCODER_CPU_MIN_PADDING:.0%} (and >= {ENCODER_CPU_MIN_PADDED_SLOTS} padded "
        f"slots) or >= {ENCODER_CPU_MIN_TOKENS_UNPADDED} tokens, on GPU when padding >= "
        f"{ENCODER_CUDA_MIN_PADDING:.0%} and >= {ENCODER_CUDA_MIN_TOKENS} tokens "
        "(never compiled on GPU); otherwise the original forward; force with path='packed'|'original'"
    )


def describe_opt_rule() -> str:
    """The OPT rule in one line, for the apply report."""
    return (
        "decode steps (a cache to continue) and compiled calls: original (transformers' SDPA); otherwise packed on "
        "CPU when "
        f"padding >= {OPT_CPU_MIN_PADDING:.0%} or >= {OPT_CPU_MIN_TOKENS_UNPADDED} tokens, on GPU when padding >= "
        f"{OPT_CUDA_MIN_PADDING:.0%} and >= {OPT_CUDA_MIN_TOKENS} tokens (never compiled on GPU); "
        "force with path='packed'|'original'"
    )


def path_log(module: Any) -> PathLog:
    """The module's :class:`patchkit.paths.PathLog` (created on first use; plugin-owned attribute)."""
    log = module.__dict__.get(LOG_ATTR)
    if not isinstance(log, PathLog):
        log = PathLog()
        module.__dict__[LOG_ATTR] = log
    return log


@torch.compiler.disable  # host-side: reads the lengths (one sync), keeps counters
def decide(
    module: Any,
    keep: torch.Tensor | None,
    batch: int,
    length: int,
    device: torch.device,
    rule: Any,
    compiling: bool,
    cached: bool = False,
) -> str:
    """Record and return the path of this call: the forced one, or ``rule``'s choice."""
    log = path_log(module)
    forced = requested(module.__dict__.get(OPTION_ATTR))
    if forced != "auto":
        return log.record(forced, "forced")
    tokens = batch * length if keep is None else int(keep.sum())
    facts = CallFacts(
        tokens=tokens,
        slots=batch * length,
        batch=batch,
        length=length,
        device=device.type,
        cached=cached,
        compiling=compiling,
        training=bool(getattr(module, "training", False)) and torch.is_grad_enabled(),
    )
    path, why = rule(facts)
    return log.record(path, why)


@torch.compiler.disable
def record_original(module: Any, why: str) -> None:
    """Count a call that had to take the original path (a fallback, not a choice)."""
    path_log(module).record("original", why)
