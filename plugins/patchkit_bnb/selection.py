"""Which linear layers a quantizer takes, and why it leaves the others alone.

transformers quantizes only modules whose type is exactly ``nn.Linear`` (so Falcon's
``FalconLinear`` stays full precision) and a user skip list replaces its defaults. Here every
``nn.Linear`` subclass is a candidate, the defaults (output embedding, tied weights,
``_keep_in_fp32_modules``) always apply, and a user ``skip`` (handled by the engine) adds to them.
Each default skip is a reason string, so ``patchkit.plan`` lists every linear layer.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from types import ModuleType

from torch import nn

from patchkit import PatchContext


def is_linear(module: nn.Module, path: str, root: nn.Module) -> bool:
    """Match predicate: any ``nn.Linear`` (subclasses included) or transformers' ``Conv1D``
    (GPT-2 and kin: a linear layer whose weight is stored transposed)."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def is_conv1d(module: nn.Module) -> bool:
    """True for an instance of ``transformers.pytorch_utils.Conv1D`` (only looked up when loaded)."""
    utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(utils, "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d)


def _parent(root: nn.Module, path: str) -> nn.Module | None:
    if not path:
        return None
    head = path.rpartition(".")[0]
    try:
        return root.get_submodule(head) if head else root
    except AttributeError:
        return None


def _ancestors(root: nn.Module, path: str) -> list[nn.Module]:
    parts = path.split(".") if path else []
    out, node = [root], root
    for part in parts[:-1]:
        child = node._modules.get(part)
        if child is None:
            break
        out.append(child)
        node = child
    return out


def _output_embedding(root: nn.Module) -> nn.Module | None:
    getter = getattr(root, "get_output_embeddings", None)
    if not callable(getter):
        return None
    try:
        found = getter()
    except Exception:  # some heads raise NotImplementedError; then there is none to protect
        return None
    return found if isinstance(found, nn.Module) else None


@dataclass
class ModelFacts:
    """Whole-model facts the per-layer checks need, gathered in one pass over the model.

    Keyed on module objects, not tensors: ``patchkit.from_pretrained`` replaces each meta tensor by
    its loaded value (in every module holding it, so ties stay ties) while one stage's builds share
    these facts, and a fact about which module shares its weight stays true through that.
    """

    tied: frozenset[int]  # id() of the modules whose weight Parameter another module object also holds
    output_embedding: nn.Module | None
    keep_fp32: frozenset[str]
    has_loaded_weights: bool  # any parameter off the meta device (when gathered)


def _gather(root: nn.Module) -> ModelFacts:
    owners: Counter[int] = Counter()  # id(Parameter) -> number of module objects holding it
    keep: set[str] = set()
    loaded = False
    modules = list(root.modules())
    for m in modules:
        for p in m._parameters.values():
            if p is not None:
                owners[id(p)] += 1
                loaded = loaded or p.device.type != "meta"
        for attr in ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict"):
            value = getattr(type(m), attr, None)  # a class attribute; the class lookup is fast
            if isinstance(value, (list, tuple, set)):
                keep.update(str(v) for v in value)
    tied = frozenset(id(m) for m in modules if (w := m._parameters.get("weight")) is not None and owners[id(w)] > 1)
    return ModelFacts(tied, _output_embedding(root), frozenset(keep), loaded)


def model_facts(ctx: PatchContext) -> ModelFacts:
    """:class:`ModelFacts` of ``ctx.root``, gathered once per apply/plan stage (the engine's per-stage
    ``ctx.cache``: no module-global state, nothing outlives the call)."""
    key = ("patchkit_bnb.facts", id(ctx.root))
    facts = ctx.cache.get(key)
    if facts is None:
        facts = ctx.cache[key] = _gather(ctx.root)
    return facts


def shared_weight(root: nn.Module, module: nn.Module, facts: ModelFacts | None = None) -> bool:
    """True when another module object holds ``module``'s weight Parameter (tied weights)."""
    if module._parameters.get("weight") is None:
        return False
    return id(module) in (facts if facts is not None else _gather(root)).tied


def _keep_fp32(names: frozenset[str], paths: tuple[str, ...]) -> str | None:
    for path in paths:
        segments = path.split(".")
        for name in names:
            if name in segments:
                return name
    return None


def _inside_adapter(ancestors: list[nn.Module]) -> bool:
    peft: ModuleType | None = sys.modules.get("peft")
    if peft is None:
        return False
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except Exception:
        return False
    return any(isinstance(a, BaseTunerLayer) for a in ancestors)


def skip_reason(
    bnb: ModuleType,
    module: nn.Module,
    root: nn.Module,
    paths: tuple[str, ...],
    facts: ModelFacts,
    *,
    defaults: bool = True,
) -> str | None:
    """Why ``module`` (a linear at ``paths`` under ``root``) is left alone, or ``None``.

    ``defaults=False`` (option ``skip_defaults=False``) drops the output-embedding, tied-weight and
    ``_keep_in_fp32_modules`` rules; the rules that protect correctness always apply.
    """
    if isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)):
        return "already a bitsandbytes layer"
    weight = module._parameters.get("weight")
    if weight is None or not weight.is_floating_point():
        return "its weight is not a floating-point parameter (already quantized?)"
    path = paths[0] if paths else ""
    ancestors = _ancestors(root, path)
    if isinstance(_parent(root, path), nn.MultiheadAttention):
        return "nn.MultiheadAttention reads this projection's weight directly, not through forward"
    if _inside_adapter(ancestors[1:]):
        return "part of a PEFT adapter layer; quantize the base model before adding adapters"
    if not defaults:
        return None
    if module is facts.output_embedding or any(p.rpartition(".")[2] == "lm_head" for p in paths):
        return "output embedding (lm_head) stays full precision by default; skip_defaults=False quantizes it"
    if shared_weight(root, module, facts):
        return "tied weight (shared with another module) stays full precision"
    kept = _keep_fp32(facts.keep_fp32, paths)
    if kept is not None:
        return f"listed in the model's _keep_in_fp32_modules ({kept!r})"
    return None
