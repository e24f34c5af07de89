"""Walking an ``nn.Module`` tree: every module once, with all its qualified names and parent edges,
and the ``only`` / ``skip`` name patterns."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from torch import nn

from .errors import ArgumentError

# Wrapper prefixes that users do not write in their patterns: torch.compile and DDP/FSDP.
WRAPPER_SEGMENTS = ("_orig_mod", "module")

Pattern = str | re.Pattern[str]


@dataclass
class Node:
    """One module object with every path and every ``(parent, child_name)`` edge that reaches it."""

    module: nn.Module
    paths: list[str] = field(default_factory=list)
    edges: list[tuple[nn.Module, str]] = field(default_factory=list)


def walk(root: nn.Module) -> list[Node]:
    """Every distinct module under ``root`` (root included), in pre-order of first appearance.

    A module reachable by several paths (shared or tied) is one node with all of them; its
    ``edges`` are the distinct ``(parent, name)`` slots that hold it, which is what a swap rewrites.
    """
    nodes: dict[int, Node] = {}
    order: list[Node] = []
    seen_edges: set[tuple[int, str]] = set()

    def visit(module: nn.Module, path: str, parent: nn.Module | None, name: str) -> None:
        node = nodes.get(id(module))
        if node is None:
            node = nodes[id(module)] = Node(module)
            order.append(node)
        node.paths.append(path)
        if parent is not None and (id(parent), name) not in seen_edges:
            seen_edges.add((id(parent), name))
            node.edges.append((parent, name))
        for child_name, child in module._modules.items():
            if child is not None:
                visit(child, f"{path}.{child_name}" if path else child_name, module, child_name)

    visit(root, "", None, "")
    return order


def canonical(path: str) -> str:
    """``path`` without leading wrapper segments (``_orig_mod.``, ``module.``)."""
    parts = path.split(".") if path else []
    while parts and parts[0] in WRAPPER_SEGMENTS:
        parts = parts[1:]
    return ".".join(parts)


def compile_patterns(patterns: Pattern | Iterable[Pattern] | None, what: str = "only/skip") -> list[Pattern]:
    """Normalise ``only`` / ``skip``: a string is exact-or-prefix at a module boundary; a compiled
    regex or a string starting with ``re:`` must match the whole qualified name. Anything else raises
    :class:`~patchkit.errors.ArgumentError` (a ``TypeError``) naming the argument ``what``."""
    if patterns is None:
        return []
    if isinstance(patterns, (str, re.Pattern)):
        patterns = [patterns]
    hint = "a qualified-name string, a re.Pattern (or 're:...' string), or a list of them"
    if not isinstance(patterns, Iterable) or isinstance(patterns, (bytes, dict)):
        raise ArgumentError(f"{what}={patterns!r}: expected {hint}, got {type(patterns).__name__}")
    compiled: list[Pattern] = []
    for pattern in patterns:
        if isinstance(pattern, str) and pattern.startswith("re:"):
            try:
                compiled.append(re.compile(pattern[3:]))
            except re.error as exc:
                raise ArgumentError(f"{what}: {pattern!r} is not a valid regular expression ({exc})") from exc
        elif isinstance(pattern, (str, re.Pattern)):
            compiled.append(pattern)
        else:
            raise ArgumentError(f"{what}: {pattern!r} is a {type(pattern).__name__}; expected {hint}")
    return compiled


def name_matches(path: str, patterns: Sequence[Pattern]) -> Pattern | None:
    """The first pattern that matches ``path`` (or its wrapper-free form), else ``None``."""
    forms = {path, canonical(path)}
    for pattern in patterns:
        for form in forms:
            if isinstance(pattern, re.Pattern):
                if pattern.fullmatch(form):
                    return pattern
            elif form == pattern or form.startswith(pattern + "."):
                return pattern
    return None
