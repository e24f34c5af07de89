"""The support matrix: every causal-LM and masked-LM architecture of the installed transformers,
built from a shrunk default config, patched, and compared against eager.

    python tools/support_matrix.py                  # write docs/support.md
    python tools/support_matrix.py --check          # exit 1 if docs/support.md is stale
    python tools/support_matrix.py --only llama qwen2

For each architecture (decoders: flash2 on the reference backend; encoders: sdpa):
plan + apply (a refusal is recorded with its reason), outputs on a right-padded and a left-padded
batch against the unpatched eager model (valid tokens), greedy generate on a left-padded batch (decoders), reverse
exactness (same module and parameter objects, same state bytes). An architecture that applies but
differs is **WRONG**: the test suite fails on any such row (nothing may be silently wrong).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "support.md"
TOLERANCE = 1e-5
# Multimodal or hybrid models whose tiny build alone takes over 20 s on a 2-core CPU (vision / audio
# towers, byte-level patchers): listed as not checked, so the walk stays inside CI's budget.
SLOW = {
    "bailing_hybrid": "hybrid linear-attention model",
    "blt": "byte-latent model with local encoders",
    "falcon_h1": "hybrid Mamba model",
    "git": "vision-text model",
    "got_ocr2": "vision-text model",
    "moss_transcribe_diarize": "audio-text model",
    "phi4_multimodal": "vision/audio-text model",
}
TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 256,
    "max_position_embeddings": 256,
    "head_dim": 16,
    "moe_intermediate_size": 64,
    "shared_expert_intermediate_size": 64,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "sliding_window": 6,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "type_vocab_size": 2,
}


@dataclass
class Row:
    """One architecture's result."""

    arch: str
    kind: str  # decoder | encoder
    status: str  # exact | refused | not built | WRONG
    reason: str = ""
    max_diff: float | None = None
    generate_equal: bool | None = None
    padding_free: bool | None = None

    def cells(self) -> list[str]:
        diff = "" if self.max_diff is None else f"{self.max_diff:.0e}"
        gen = {None: "", True: "same", False: "DIFFERENT"}[self.generate_equal]
        pf = {None: "", True: "yes", False: "no"}[self.padding_free]
        reason = self.reason.replace("|", "/").replace("\n", " ")[:160]
        return [self.arch, self.kind, self.status, pf, diff, gen, reason]


def shrink(config: Any) -> Any:
    """The default config made tiny: every size attribute the config has (directly or through its
    ``attribute_map``) set from :data:`TINY`."""
    mapped = getattr(config, "attribute_map", {}) or {}
    for name, value in TINY.items():
        if hasattr(config, name) or name in mapped:
            with contextlib.suppress(Exception):
                setattr(config, name, value)
    for sub in ("text_config",):
        inner = getattr(config, sub, None)
        if inner is not None and inner is not config:
            shrink(inner)
    return config


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Raise TimeoutError after ``seconds`` (main thread, POSIX)."""

    def fire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"took longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _state(model: torch.nn.Module) -> tuple[Any, ...]:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return (
        buf.getvalue(),
        [(n, id(m), type(m)) for n, m in model.named_modules()],
        [(n, id(p)) for n, p in model.named_parameters()],
    )


def _batch(length: int, left: bool) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 256, (2, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if left:
        mask[1, : length // 3] = 0
        ids[1, : length // 3] = 0
    else:
        mask[1, length - length // 3 :] = 0
        ids[1, length - length // 3 :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _output(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs, use_cache=False) if hasattr(model, "generate") else model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def check(arch: str, kind: str) -> Row:
    """Build ``arch`` tiny and run the whole comparison; never raises."""
    import transformers

    import patchkit

    mapping = (
        transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        if kind == "decoder"
        else transformers.models.auto.modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
    )
    if arch in SLOW:
        return Row(arch, kind, "not built", f"not checked: {SLOW[arch]}, too slow to build on the CPU")
    try:
        config = shrink(transformers.AutoConfig.for_model(arch))
        cls = getattr(transformers, mapping[arch])
        torch.manual_seed(0)
        model = cls._from_config(config, attn_implementation="eager").eval()
    except Exception as exc:  # recorded: architectures that cannot be shrunk or built here
        return Row(arch, kind, "not built", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    kwargs: dict[str, Any] = (
        {"attention": "flash2", "backend": "reference"} if kind == "decoder" else {"attention": "sdpa"}
    )
    right = _batch(12, left=False)
    left = _batch(8, left=True)
    try:
        reference = _output(model, right)
        reference_left = _output(model, _batch(12, left=True))
        tokens = None
        if kind == "decoder":
            tokens = model.generate(**left, max_new_tokens=4, do_sample=False, pad_token_id=0)
    except Exception as exc:
        return Row(arch, kind, "not built", f"eager forward failed: {type(exc).__name__}: {exc}"[:200])
    before = _state(model)
    try:
        report = patchkit.apply(model, **kwargs)
    except patchkit.PatchError as exc:
        return Row(arch, kind, "refused", str(exc).splitlines()[0])
    try:
        valid = right["attention_mask"].bool()
        patched = _output(model, right)
        diff = (patched[valid] - reference[valid]).abs().max().item()
        left12 = _batch(12, left=True)
        valid_left = left12["attention_mask"].bool()
        diff = max(diff, (_output(model, left12)[valid_left] - reference_left[valid_left]).abs().max().item())
        same_tokens = None
        if tokens is not None:
            again = model.generate(**left, max_new_tokens=4, do_sample=False, pad_token_id=0)
            same_tokens = bool(torch.equal(again, tokens))
        # the patcher's route note ("... padding-free on" / "padding-free off (why)"), not the path rule's prose
        on = re.compile(r"padding-free on($| \()")
        padding_free = any(on.search(note) for note in report.notes) if kind == "decoder" else True
    except Exception as exc:
        patchkit.reverse(model)
        return Row(arch, kind, "WRONG", f"patched forward raised {type(exc).__name__}: {exc}"[:200])
    patchkit.reverse(model)
    exact_reverse = _state(model) == before
    ok = diff <= TOLERANCE and same_tokens is not False and exact_reverse
    reason = "" if exact_reverse else "reverse not exact"
    return Row(arch, kind, "exact" if ok else "WRONG", reason, diff, same_tokens, padding_free)


def architectures() -> list[tuple[str, str]]:
    """(model_type, kind) for every causal-LM and masked-LM mapping entry."""
    from transformers.models.auto import modeling_auto as auto

    decoders = sorted(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    encoders = sorted(auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES)  # BERT & co. appear in both mappings
    return [(a, "decoder") for a in decoders] + [(a, "encoder") for a in encoders]


def render(rows: list[Row], version: str) -> str:
    """docs/support.md."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[f"{row.kind} {row.status}"] = counts.get(f"{row.kind} {row.status}", 0) + 1
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    head = ["architecture", "kind", "status", "padding-free", "max diff", "generate", "reason"]
    lines = [
        "# Support matrix",
        "",
        f"Generated by `python tools/support_matrix.py` against transformers {version} (CPU, fp32, tiny",
        "random models from each architecture's shrunk default config). Decoders: `attention=\"flash2\"`",
        "on the reference backend; encoders: `attention=\"sdpa\"`. *exact*: outputs on the valid tokens of",
        f"a right- and a left-padded batch within {TOLERANCE:g} of the unpatched eager model, greedy `generate` tokens",
        "on a left-padded batch identical, reverse restores the same objects and state bytes. *refused*:",
        "`apply` raises at plan time with the reason shown (nothing changed). *not built*: the tiny",
        "config could not be built here. *WRONG* would be a silent difference (CI fails on any).",
        "",
        f"Summary: {summary}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _comparable(text: str) -> list[tuple[str, ...]]:
    """Architecture, kind, status and reason of each row (diffs vary in the last bits per machine)."""
    out = []
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| architecture"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            # a build failure's wording (or a timeout) may vary by machine: only its status counts
            out.append((cells[0], cells[1], cells[2], "" if cells[2] == "not built" else cells[6]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with docs/support.md; exit 1 if stale")
    parser.add_argument("--only", nargs="*", help="these model types only (prints, writes nothing)")
    parser.add_argument("--timeout", type=int, default=120, help="seconds per architecture")
    args = parser.parse_args(argv)
    import transformers

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    todo = [(a, k) for a, k in architectures() if not args.only or a in args.only]
    rows = []
    for arch, kind in todo:
        start = time.perf_counter()
        try:
            with time_limit(args.timeout):
                row = check(arch, kind)
        except TimeoutError as exc:
            row = Row(arch, kind, "not built", str(exc))
        rows.append(row)
        print(f"{arch:<28} {kind:<8} {row.status:<9} {time.perf_counter() - start:5.1f}s {row.reason[:80]}", flush=True)
    wrong = [r.arch for r in rows if r.status == "WRONG"]
    text = render(rows, transformers.__version__)
    if args.only:
        print(text)
    elif args.check:
        current = OUT.read_text() if OUT.exists() else ""
        if f"transformers {transformers.__version__} " not in current:
            # the table is CI's contract with one release (the test extra pins it): a mismatch is not a pass
            print(
                f"docs/support.md was generated on another transformers release than {transformers.__version__}: "
                "install the release pyproject.toml's test extra pins, or regenerate the table and bump the pin",
                file=sys.stderr,
            )
            return 1
        elif _comparable(current) != _comparable(text):
            print("docs/support.md is stale: run python tools/support_matrix.py and commit it", file=sys.stderr)
            return 1
    else:
        OUT.write_text(text)
        print(f"wrote {OUT}")
    if wrong:
        print(f"WRONG (patched but not exact): {wrong}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
