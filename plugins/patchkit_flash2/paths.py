"""Which path a call of a flash2-patched base model takes: flash2's (padding-free where exact, varlen
attention otherwise) or the original's own (transformers' attention dispatch, exact by definition).

Padding-free pays for itself by skipping padding; with little or none to skip, flash2's own path
is slower than transformers' SDPA on the CPU (its reference kernel is grouped masked SDPA calls:
0.88x on a Llama 768 x 12, 8 x 256 without padding), one-token decode steps gain nothing from
unpadding (0.93x for ``generate`` where they dominate), and on a GPU the compiled packed model ran
at 0.42-0.58x of compiled HF. :func:`choose_flash2_path` is the cost model, over facts known before
the call (:class:`patchkit.paths.CallFacts`); its thresholds are named constants with the figures
they come from (``bench/regimes.py``, docs/benchmarks.md). ``path="packed"|"original"`` (an
``apply`` option) or ``PATCHKIT_PATH`` forces either path.

Calls whose semantics only flash2 gives stay on flash2's path whatever the choice: explicit
``cu_seq_lens_*`` kwargs, and ``position_ids`` without a mask and without a cache (transformers'
FA2 rule for sequences packed in one row; SDPA and eager split those rows differently).
"""

from __future__ import annotations

from patchkit.paths import CallFacts

# CPU (fp32, 2 threads, reference kernel; bench/regimes.py, 2026-12-03): padding-free wins from
# 10% padding at every size measured; without padding flash2's own path only adds work (the
# varlen reference kernel on full rows: 0.88x), so the original runs.
CPU_MIN_PADDING = 0.05
# ... with at least this many padded slots to skip: Llama 768 x 4, 1 x 16 at 30% (5 slots) ran
# 0.94-0.95x padding-free (bench/regimes.py --quick, 2026-12-07): unpad/re-pad cost what 5 rows save.
CPU_MIN_PADDED_SLOTS = 16
# CUDA: not calibrated on a GPU in this session (no device run). Small calls are launch-bound (the
# unpad / re-pad kernels and the host sync are fixed costs), and compiled packed models measured
# 0.42-0.58x of compiled HF sdpa on an H100 (docs/benchmarks.md): original when compiling.
CUDA_MIN_PADDING = 0.15
CUDA_MIN_TOKENS = 4096


def choose_flash2_path(facts: CallFacts, packable: bool) -> tuple[str, str]:
    """``("packed" | "original", why)`` for one call; ``packable``: the call can run padding-free."""
    if facts.cached:
        return "original", "continues a KV cache (decode step): dense SDPA, nothing to unpad"
    if not packable:
        return "original", "cannot run padding-free (no padding, hooks, a static cache, padding_free=False)"
    if facts.device == "cpu":
        if facts.padding >= CPU_MIN_PADDING and facts.padded_slots < CPU_MIN_PADDED_SLOTS:
            return (
                "original",
                f"only {facts.padded_slots} padded slots < {CPU_MIN_PADDED_SLOTS}: too few to pay for unpadding",
            )
        if facts.padding >= CPU_MIN_PADDING:
            return "packed", f"padding {facts.padding:.0%} >= {CPU_MIN_PADDING:.0%}"
        return "original", f"padding {facts.padding:.0%} < {CPU_MIN_PADDING:.0%}"
    if facts.compiling:
        return "original", "compiled on a GPU: compiled packed measured 0.42-0.58x of compiled HF"
    if facts.padding < CUDA_MIN_PADDING:
        return "original", f"padding {facts.padding:.0%} < {CUDA_MIN_PADDING:.0%} on {facts.device}"
    if facts.tokens < CUDA_MIN_TOKENS:
        return "original", f"{facts.tokens} tokens < {CUDA_MIN_TOKENS}: launch-bound on {facts.device}"
    return "packed", f"padding {facts.padding:.0%}, {facts.tokens} tokens on {facts.device}"


def describe_rule() -> str:
    """The rule in one line, for the apply report."""
    return (
        "decode steps and calls that cannot run padding-free: original (transformers' attention); otherwise "
        f"padding-free on CPU when padding >= {CPU_MIN_PADDING:.0%} and >= {CPU_MIN_PADDED_SLOTS} padded slots, "
        f"on GPU when padding >= {CUDA_MIN_PADDING:.0%} and >= {CUDA_MIN_TOKENS} tokens (never compiled on GPU); "
        "force with path='packed'|'original'"
    )
