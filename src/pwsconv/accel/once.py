"""A backward that is differentiable once, whose second differentiation fails with a message naming the feature.

torch's ``once_differentiable`` reports "trying to differentiate twice a function that was marked with
@once_differentiable", which names neither the layer nor the way out. :func:`differentiable_once` does the same
(the backward runs without building a graph; its gradients, when they are asked for with ``create_graph=True``, get
a node that refuses to be differentiated), with the caller's message.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import Tensor

__all__ = ["differentiable_once"]


class _Refuse(torch.autograd.Function):
    """Identity (copies: the gradients it hands out may be changed in place) whose backward raises ``message``."""

    @staticmethod
    def forward(ctx: Any, message: str, *xs: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        ctx.message = message
        return tuple(None if x is None else x.clone() for x in xs)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> None:  # type: ignore[override]
        raise RuntimeError(ctx.message)


def differentiable_once(message: str) -> Callable:
    """Decorate a custom Function's ``backward``: it runs under ``torch.no_grad()``; under ``create_graph=True``
    (some input requires grad) its gradients are handed out through a node whose backward raises ``message``."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def backward(ctx: Any, *args: Any) -> Any:
            with torch.no_grad():
                out = fn(ctx, *args)
            if not torch.is_grad_enabled() or not any(isinstance(a, Tensor) and a.requires_grad for a in args):
                return out
            outs = out if isinstance(out, tuple) else (out,)
            fake = [None if o is None else o.detach().requires_grad_(True) for o in outs]
            refused = _Refuse.apply(message, *fake)
            return refused if isinstance(out, tuple) else refused[0]
        return backward
    return wrap
