"""The hooks a patchkit plugin may implement. Every hook receives a ``register`` callback.

A plugin is a module exposed in the ``patchkit`` entry-point group. It implements any of the
hooks below with the :data:`hookimpl` marker and calls ``register`` once per object it offers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT = "patchkit"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_patchers(register: Callable[[Any], None]) -> None:
    """Offer module patchers: call ``register(patchkit.Patcher(...))`` once per patcher."""


@hookspec
def register_attention_backends(register: Callable[[Any], None]) -> None:
    """Offer attention kernels: call ``register(patchkit.AttentionBackend(...))`` once per kernel."""


@hookspec
def register_demos(register: Callable[[Any], None]) -> None:
    """Offer demos for ``patchkit demo``: call ``register(patchkit.Demo(...))`` once per demo.

    A demo builds a model the plugin patches (from an embedded config, nothing downloaded), its
    inputs and the ``apply`` arguments; core runs, compares, times and reverses it.
    """
