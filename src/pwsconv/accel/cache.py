"""The eval cache of the reparameterized layers: in eval mode, with no gradient wanted, a layer's weight is computed
once and reused until one of the tensors it is computed from changes.

The key is the tensors themselves (identity, version counter, storage address) plus the number of optimizer steps
taken in this process; the layer's settings drop the cache when assigned (``layers._reparam.setting``). Nothing is
kept in training mode or when gradients are wanted: the first such forward drops the cached tensor.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["cached_weight", "clear_cache", "is_cached"]

#: Optimizer steps taken in this process. Measured (torch 2.13, CPU): ``SGD(fused=True)``, ``Adam(fused=True)`` and
#: ``AdamW(fused=True)`` update parameters without bumping their version counters (``foreach`` and the default
#: for-loop do bump them), so the version counters alone would let a fused optimizer's step go unseen by the cache.
#: Counting steps needs torch's process-wide optimizer-step hook; it is registered when the first weight is cached,
#: only counts, and is the one process-wide side effect of pwsconv.
_STEPS = [0]
_HOOK: list[Any] = []


def _count_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    _STEPS[0] += 1


def _watch_optimizer_steps() -> None:
    if not _HOOK:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _HOOK.append(register_optimizer_step_post_hook(_count_step))


def cached_weight(layer: Any, w: Tensor, a: Tensor | None) -> Tensor:
    """``layer.compute_weight()``, computed once per state of ``w`` and ``a`` (the parameters it reads): the same
    tensors (the cache holds them, so their ids cannot be reused), at the same version and storage, and no optimizer
    step since."""
    c = layer.__dict__.get("_accel_cache")
    if c is not None and c[0] is w and c[1] == w._version and c[2] == w.data_ptr() and c[3] is a \
            and (a is None or (c[4] == a._version and c[5] == a.data_ptr())) and c[6] == _STEPS[0]:
        return c[7]
    # outside inference mode even when called inside it: the cached tensor must stay usable in a later graph
    # (eval with frozen weights but an input that wants gradients)
    with torch.inference_mode(False), torch.no_grad():
        out = layer.compute_weight()
    if w.is_inference() or (a is not None and a.is_inference()):
        return out   # made under inference_mode: no version counter to key a cache on
    _watch_optimizer_steps()
    # the cache holds the tensors (their ids cannot be reused while it lives) and detached views of them, which keep
    # their storage alive: after ``weight.data = other`` the old block cannot be handed to a new tensor at the same
    # address, so the address check cannot be fooled. (An inference tensor put in place of a cached one fails the
    # identity test before its missing version counter is read.)
    layer.__dict__["_accel_cache"] = (w, w._version, w.data_ptr(), a, None if a is None else a._version,
                                      None if a is None else a.data_ptr(), _STEPS[0], out, w.detach(),
                                      None if a is None else a.detach())
    return out


def clear_cache(layer: Any) -> None:
    """Drop ``layer``'s cached weight (settings do this when assigned; writes through ``.data`` need it)."""
    layer.__dict__.pop("_accel_cache", None)


def is_cached(layer: Any) -> bool:
    """Whether ``layer`` holds a cached weight."""
    return "_accel_cache" in layer.__dict__
