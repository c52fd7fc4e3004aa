"""Expert activations by name: ``ACTIVATIONS[name] = (function, gated)``.

A gated activation (``swiglu``, ``geglu``) computes ``act(x W1) * (x W3)``, so its experts carry a
third weight ``w3``; the others compute ``act(x W1)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def _gelu_tanh(h: torch.Tensor) -> torch.Tensor:
    return F.gelu(h, approximate="tanh")


ACTIVATIONS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], bool]] = {
    "swiglu": (F.silu, True),
    "geglu": (F.gelu, True),
    "gelu": (F.gelu, False),
    "gelu_tanh": (_gelu_tanh, False),
    "relu": (F.relu, False),
    "silu": (F.silu, False),
}
