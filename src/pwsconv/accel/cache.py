"""The entries of the eval cache, while a ``with pwsconv.cached(model):`` scope is open (:mod:`.source`): each
reparameterized layer in eval mode, with no gradient wanted, computes its weight once per state of its parameters.

An entry is keyed on the tensors it was computed from (identity, version counter, storage address), the layer's
settings key (assigning ``gamma``, ``eps``, ... changes it) and the number of optimizer steps taken while a scope
is open: ``SGD/Adam/AdamW(fused=True)`` update parameters without bumping their version counters (measured, torch
2.13), so a step counter is kept through torch's optimizer-step hook — registered when the first scope opens and
removed when the last one closes. A training forward, or one that wants gradients, drops the layer's entry and
computes the weight in the graph. Entries are never stale: a test changes every input of the key. The one write
no key can see is one through ``.data`` (a tensor of its own, with its own version counter): ``clear_cache``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["cached_weight", "clear_cache", "is_cached"]

#: layer id → the open scope's entry for it (``None`` until its first cached forward)
_ENTRIES: dict[int, "_Entry | None"] = {}
_STEPS = [0]            # optimizer steps taken while a scope is open (counted by pwsconv.accel.source)


class _Entry:
    """One layer's cached weight and what it was computed from. It holds the tensors (their ids cannot be reused
    while it lives) and detached views of them, which keep their storage alive: after ``weight.data = other`` the old
    block cannot be handed to a new tensor at the same address, so the address check cannot be fooled."""

    __slots__ = ("w", "w_version", "w_ptr", "a", "a_version", "a_ptr", "settings", "steps", "out", "keep")

    def __init__(self, layer: Any, w: Tensor, a: Tensor | None, out: Tensor) -> None:
        self.w, self.w_version, self.w_ptr = w, w._version, w.data_ptr()
        self.a = a
        self.a_version, self.a_ptr = (None, None) if a is None else (a._version, a.data_ptr())
        self.settings, self.steps, self.out = layer._settings_key(), _STEPS[0], out
        self.keep = (w.detach(), None if a is None else a.detach())

    def valid(self, layer: Any, w: Tensor, a: Tensor | None) -> bool:
        return (self.w is w and self.w_version == w._version and self.w_ptr == w.data_ptr() and self.a is a
                and (a is None or (self.a_version == a._version and self.a_ptr == a.data_ptr()))
                and self.settings == layer._settings_key() and self.steps == _STEPS[0])


def cached_weight(layer: Any, w: Tensor, a: Tensor | None) -> Tensor:
    """``layer.compute_weight()`` for a layer inside a scope, in eval mode, no gradient wanted: computed once per
    state of ``w`` and ``a`` (the parameters it reads) and of the layer's settings."""
    e = _ENTRIES.get(id(layer))
    if e is not None and e.valid(layer, w, a):
        return e.out
    # outside inference mode even when called inside it: the cached tensor must stay usable in a later graph
    # (eval with frozen weights but an input that wants gradients)
    with torch.inference_mode(False), torch.no_grad():
        out = layer.compute_weight()
    if not (w.is_inference() or (a is not None and a.is_inference())):   # inference tensors: no version to key on
        _ENTRIES[id(layer)] = _Entry(layer, w, a, out)
    return out


def clear_cache(module: Any) -> None:
    """Drop the cached weight of ``module`` and of every layer inside it, if any. A write through ``.data``
    (``p.data.copy_(q)``) bypasses torch's version counters, so a scope cannot see it: call this after one."""
    for m in (module.modules() if hasattr(module, "modules") else (module,)):
        if _ENTRIES.get(id(m)) is not None:
            _ENTRIES[id(m)] = None


def is_cached(layer: Any) -> bool:
    """Whether ``layer`` holds a cached weight."""
    return _ENTRIES.get(id(layer)) is not None
