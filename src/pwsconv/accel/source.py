"""Where a layer's weight comes from in a forward: :func:`weight_source`, the one callable pwsconv.accel installs on
a reparameterized layer (``layer._weight_source``). It serves the table of a running fused forward
(:func:`pwsconv.fuse_standardization`, held in a :class:`contextvars.ContextVar` so threads and nested forwards never
see another forward's table) or the eval cache of an open :func:`cached` scope; otherwise the layer computes its
weight itself. The same values on every path.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from .cache import _ENTRIES, _STEPS, cached_weight

__all__ = ["weight_source", "install_source", "uninstall_source", "needs_fresh", "fused_slot", "cached",
           "current_pack"]

_is_compiling = torch.compiler.is_compiling   # bound once: called on every forward
_grad_enabled = torch.is_grad_enabled
_top_hooks = torch._C._autograd._top_saved_tensors_default_hooks


def weight_source(layer: Any) -> tuple[Tensor, Tensor | None] | None:
    """The weight source pwsconv.accel installs on a layer (``layer._weight_source``): (weight, bias) from the
    running fused forward's table, or the weight from the eval cache of an open :func:`pwsconv.cached` scope (eval,
    no gradient wanted) — or ``None``, and the layer computes them itself (``compute_weight()``, ``compute_bias()``):
    the same values on every path."""
    if _is_compiling():   # torch.compile traces the computation itself (no cache, no table lookups)
        return None
    # unrolled for the two parameters a weight is computed from (the raw weight and α / g / gain): this runs once per
    # layer and forward, and at small batch its Python operations are a measurable part of a step
    params, names = layer._parameters, layer.weight_params
    try:
        w = params[names[0]]
        a = params[names[1]] if len(names) == 2 else None
    except KeyError:   # a parametrized weight (nn.utils.parametrize): computed every time, no cache, no fusion
        return None
    fwd = _ACTIVE.get()
    if fwd is not None:
        hit = fused_slot(layer, w, a, fwd)
        if hit is not None:
            return hit
    key = id(layer)
    if key not in _ENTRIES:
        return None
    if layer.training or (_grad_enabled() and (w.requires_grad or (a is not None and a.requires_grad))):
        _ENTRIES[key] = None   # training or gradients from here on: the cached tensor is dropped
        return None
    return cached_weight(layer, w, a), layer.compute_bias()


def install_source(layer: Any) -> None:
    """Make ``layer`` ask :func:`weight_source` for its weight (an instance attribute; idempotent)."""
    d = layer.__dict__
    if d.get("_weight_source") is not weight_source:
        d["_weight_source"] = weight_source


def uninstall_source(layer: Any) -> None:
    """Back to computing every weight in the layer itself."""
    if layer.__dict__.get("_weight_source") is weight_source:
        del layer.__dict__["_weight_source"]


def needs_fresh(layer: Any, w: Tensor, a: Tensor | None = None) -> bool:
    """Whether ``layer`` computes its weight anew, in the graph: training, or gradients wanted for ``w`` or ``a``
    (the parameters its weight is computed from). Otherwise the eval cache may serve it. (``weight_source``
    inlines this test.)"""
    return layer.training or (torch.is_grad_enabled() and (w.requires_grad or (a is not None and a.requires_grad)))


class _Forward:
    """One fused forward: the weights made by its pre-hook, per layer, and what the post-hook must undo."""

    __slots__ = ("owner", "grad", "cast", "slots", "depth", "hooks", "pack", "prev")

    def __init__(self, owner: Any, grad: bool, cast: tuple[str, torch.dtype] | None = None,
                 prev: "_Forward | None" = None) -> None:
        self.owner, self.grad, self.cast, self.slots, self.depth, self.hooks = owner, grad, cast, {}, 0, None
        self.pack = None   # the pack hook of the saved-tensor hooks in force when the table was made (set_pack)
        self.prev = prev   # the enclosing fused forward's table, active again when this one closes

    def set_pack(self) -> None:
        """Record the saved-tensor hooks in force now (after the fused forward installed its own, if any)."""
        self.pack = current_pack()

    def close(self) -> None:
        if self.hooks is not None:
            self.hooks.close()
            self.hooks = None
        _ACTIVE.set(self.prev)


def current_pack() -> Any:
    """The pack hook of the saved-tensor hooks in force (``None``: none)."""
    top = _top_hooks(False)
    return None if top is None else top[0]


#: the fused forward running in this thread / context, if any
_ACTIVE: contextvars.ContextVar[_Forward | None] = contextvars.ContextVar("pwsconv_fused_forward", default=None)


def fused_slot(layer: Any, w: Tensor, a: Tensor | None,
               fwd: _Forward | None = None) -> tuple[Tensor, Tensor | None] | None:
    """(α·Ŵ, β) computed for ``layer`` by the running fused forward (``fwd``, default: the active one), if it made
    them for these very tensors (same objects, same versions), the grad mode has not changed since, the same
    saved-tensor hooks are in force (inside a region that installs its own — non-reentrant activation checkpointing,
    ``save_on_cpu`` — the layer computes its weight itself, as it will when the region is recomputed in backward) and,
    where they were cast to autocast's dtype, autocast is still on with that dtype; else ``None``."""
    if fwd is None:
        fwd = _ACTIVE.get()
        if fwd is None:
            return None
    s = fwd.slots.get(id(layer))
    if s is None or s[0] is not w or s[1] != w._version or s[2] is not a or fwd.grad != torch.is_grad_enabled() \
            or (a is not None and s[3] != a._version):
        return None
    if fwd.grad and current_pack() is not fwd.pack:
        return None
    cast = fwd.cast
    if cast is not None and s[4].dtype == cast[1] and s[4].device.type == cast[0] and not (
            torch.is_autocast_enabled(cast[0]) and torch.get_autocast_dtype(cast[0]) == cast[1]):
        return None
    return s[4], s[5]


_OPEN = [0]             # open cached() scopes
_HOOK: list[Any] = []   # the optimizer-step hook, while a scope is open


def _count_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    _STEPS[0] += 1


@contextlib.contextmanager
def cached(model: nn.Module) -> Iterator[nn.Module]:
    """The eval cache, scoped like ``torch.nn.utils.parametrize.cached()``: within this context every reparameterized
    layer of ``model`` (PWS, WS, SWS, WN, CenConv) in eval mode, with no gradient wanted, computes its weight once
    per state of its parameters and settings, and reuses it; the values are those computed without the cache.
    Outside the scope nothing is kept. Nested and overlapping scopes are fine. Yields ``model``.

        with pwsconv.cached(model), torch.no_grad():
            for x, _ in test_loader:
                model.eval()(x)

    The training engine wraps its evaluation in it; for deployment, ``pwsconv.fold`` is the path (plain layers).
    An entry never goes stale (tested): it is keyed on its tensors' identity, version and storage, the layer's
    settings and the optimizer steps taken meanwhile; a training forward or one that wants gradients drops it. The
    exception is a write through ``.data`` (``p.data.copy_(q)``, an old-style EMA swap), which torch does not
    count: call ``pwsconv.clear_cache(model)`` after one (writes to ``p`` under ``torch.no_grad()``, optimizer
    steps, ``load_state_dict`` and ``state_dict()`` tensors are all seen)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"pwsconv.cached expects an nn.Module, got {type(model).__name__}")
    mine = [m for m in model.modules() if hasattr(type(m), "compute_weight") and id(m) not in _ENTRIES]
    for m in mine:
        _ENTRIES[id(m)] = None
        install_source(m)
    if _OPEN[0] == 0:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _HOOK.append(register_optimizer_step_post_hook(_count_step))
    _OPEN[0] += 1
    try:
        yield model
    finally:
        _OPEN[0] -= 1
        if _OPEN[0] == 0:
            _HOOK.pop().remove()
        for m in mine:
            _ENTRIES.pop(id(m), None)
            uninstall_source(m)   # a fused model's pre-hook installs it again on its next forward
