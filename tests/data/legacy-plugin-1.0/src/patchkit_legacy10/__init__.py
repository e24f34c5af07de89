"""A plugin written for patchkit plugin API 1.0, kept as it was (a frozen test fixture).

It uses what 1.0 documented: ``ctx.dry_run`` in ``check``, a ``restore`` that changes the model
itself and returns ``None``, no ``options``/``covers`` declarations.
"""

import torch
from torch import nn

import patchkit

PATCHKIT_API = ">=1,<2"
REQUIRES = {"torch": ">=2.0"}


class NoDropout(nn.Dropout):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return input


def check_dropout(module, ctx):
    if ctx.dry_run:  # planning only: a model on the meta device is fine
        return None
    if module.training:
        raise patchkit.UnsupportedError("nodropout is for inference: call model.eval() first")
    return None


class HalfLinear(nn.Module):
    """Stores the weight in float16 (a toy quantizer)."""

    def __init__(self, original):
        super().__init__()
        self.weight = nn.Parameter(original.weight.detach().half(), requires_grad=False)
        self.bias = original.bias

    def forward(self, x):
        return nn.functional.linear(x, self.weight.to(x.dtype), self.bias)


def build_half(module, ctx):
    return HalfLinear(module)


def restore_half(original, replacement, ctx):
    # API 1.0: restore changes the model itself and returns None.
    original.weight.data = replacement.weight.detach().to(original.weight.dtype)


def check_boom(module, ctx):
    return ctx.options["explode"]  # a KeyError unless the option is given: a plugin bug


@patchkit.hookimpl
def register_patchers(register):
    register(
        patchkit.Patcher(
            name="nodropout", kind="other", family="legacy-nodropout", match=nn.Dropout, build=lambda m, c: patchkit.share_as(m, NoDropout), check=check_dropout
        )
    )
    register(patchkit.Patcher(name="half", kind="quantize", family="legacy-half", match=nn.Linear, build=build_half, restore=restore_half))
    register(patchkit.Patcher(name="boom", kind="other", family="legacy-boom", match=nn.Linear, build=build_half, check=check_boom))
