"""Acceleration of the reparameterized layers, behind one seam: :func:`weight_and_bias`.

A layer of :mod:`pwsconv.layers` says *what* it computes (``compute_weight()``, ``compute_bias()``, eq. 12 for PWS);
this package decides *where the values come from*, without changing them:

* the table of a fused forward (:func:`fuse_standardization`: all PWS layers of a model standardized in one
  autograd node, optionally rebuilt in backward to save memory) — :mod:`.fused`;
* the eval cache (eval mode, no gradient wanted: computed once per state of the parameters) — :mod:`.cache`;
* otherwise the layer's own ``compute_weight()``.

Import direction: ``functional`` ← ``accel`` ← ``layers``; nothing here imports a layer class.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .cache import cached_weight, clear_cache, is_cached
from .fused import _ACTIVE, FuseHandle, fuse_standardization, fused_slot, needs_fresh, pws_weights_fused

_is_compiling = torch.compiler.is_compiling   # bound once: called on every forward
_grad_enabled = torch.is_grad_enabled

__all__ = ["weight_and_bias", "fuse_standardization", "FuseHandle", "pws_weights_fused", "clear_cache", "is_cached",
           "needs_fresh"]


def weight_and_bias(layer: Any) -> tuple[Tensor, Tensor | None]:
    """The weight and bias ``layer`` applies in this forward: from the running fused forward, from the eval cache,
    or computed by the layer (``compute_weight()`` / ``compute_bias()``) — the same values on every path."""
    if _is_compiling():   # torch.compile traces the computation itself (no cache, no table lookups)
        return layer.compute_weight(), layer.compute_bias()
    # unrolled for the two parameters a weight is computed from (the raw weight and α / g / gain): this runs once per
    # layer and forward, and at small batch its Python operations are a measurable part of a step
    params, names = layer._parameters, layer.weight_params
    try:
        w = params[names[0]]
        a = params[names[1]] if len(names) == 2 else None
    except KeyError:   # a parametrized weight (nn.utils.parametrize): computed every time, no cache, no fusion
        return layer.compute_weight(), layer.compute_bias()
    fwd = _ACTIVE.get()
    if fwd is not None:
        hit = fused_slot(layer, w, a, fwd)
        if hit is not None:
            return hit
    if layer.training or (_grad_enabled() and (w.requires_grad or (a is not None and a.requires_grad))):
        d = layer.__dict__
        if "_accel_cache" in d:
            del d["_accel_cache"]   # training or gradients from here on: the cached tensor is dropped
        return layer.compute_weight(), layer.compute_bias()
    return cached_weight(layer, w, a), layer.compute_bias()
