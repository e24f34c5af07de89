"""Example patchkit plugin: replace every ``nn.Dropout`` with a no-op for inference.

Use: ``patchkit.apply(model, patch="nodropout")``; ``patchkit.reverse(model)`` puts the
original Dropout objects back.
"""

import torch
from torch import nn

import patchkit

PATCHKIT_API = ">=1.1,<2"  # the patchkit plugin API this plugin was written for (1.1: covers)
REQUIRES = {"torch": ">=2.0"}  # packages it needs; patchkit lists the plugin as unavailable if unmet


class NoDropout(nn.Dropout):
    """A Dropout that never drops: a subclass, so isinstance checks still see a Dropout."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return input


def build(module: nn.Module, ctx: patchkit.PatchContext) -> nn.Module:
    # share_as: same parameters, buffers, submodules and hooks; no __init__, no copy.
    return patchkit.share_as(module, NoDropout)


def check(module: nn.Module, ctx: patchkit.PatchContext) -> str | None:
    if module.training and not ctx.option("allow_training", False):
        raise patchkit.UnsupportedError("nodropout is for inference: call model.eval() first")
    return None


@patchkit.hookimpl
def register_patchers(register):
    register(
        patchkit.Patcher(
            name="nodropout",
            kind="other",
            family="nodropout",
            match=nn.Dropout,
            build=build,
            check=check,
            description="Dropout -> identity for inference",
            covers=("torch.nn.Dropout and subclasses",),
            options={"allow_training": "also patch modules in training mode (default False)"},
        )
    )
