"""Acceleration of the reparameterized layers, installed from outside them.

A layer of :mod:`pwsconv.layers` computes what it applies (``compute_weight()``, ``compute_bias()``: eq. 12 for PWS)
and has one hook for values computed elsewhere: ``layer._weight_source``, a callable ``(layer) -> (weight, bias)`` or
``None``. This package installs :func:`weight_source` there, which serves the same values faster:

* :func:`fuse_standardization` — all PWS layers of a model standardized in one autograd node per forward (optionally
  rebuilt in backward to save memory) — :mod:`.fused`;
* :func:`cached` — the eval cache, scoped like ``torch.nn.utils.parametrize.cached()``: inside the context, eval mode
  with no gradient wanted computes each weight once per state of its parameters — :mod:`.cache`.

Import direction: ``functional`` ← ``accel``; ``layers`` imports nothing from here and nothing here imports a layer
class.
"""

from __future__ import annotations

from .cache import clear_cache, is_cached
from .fused import FuseHandle, fuse_standardization, pws_weights_fused
from .source import cached, needs_fresh, weight_source

__all__ = ["cached", "fuse_standardization", "FuseHandle", "pws_weights_fused", "clear_cache", "is_cached",
           "needs_fresh", "weight_source"]
