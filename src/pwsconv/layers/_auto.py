"""How a ``gamma="auto"`` PWS layer learns the clipping λ of its filters from its optimizer (no per-step call).

:func:`pwsconv.param_groups` calls ``layer.link_optimizer_group(group)`` with the parameter group that holds the
layer's weight. torch's optimizers keep those very dicts and fill in their defaults, so once an SGD optimizer exists
the layer reads its starting LR and momentum there, once, and sets λ_W = :func:`pwsconv.functional.auto_clip_w`
(each SGD step moves a filter by at most ``AUTO_STEP`` of its norm). A schedule changes nothing after that, and
nothing is saved: a resumed run builds its optimizer from ``param_groups`` with the same LR and gets the same λ.
Without a linked SGD group the layer uses ``AUTO_CLIP_W``.
"""

from __future__ import annotations

from typing import Any

from ..functional import AUTO_CLIP_W, auto_clip_w

__all__ = ["link_optimizer_group", "auto_clip_w_of"]


class _OptimizerGroup:
    """The optimizer parameter group that holds a layer's weight. Derived, not state: a copy or an unpickled layer
    is unlinked until its own ``param_groups`` call."""

    __slots__ = ("group",)

    def __init__(self, group: dict | None = None) -> None:
        self.group = group

    def __reduce__(self) -> tuple:
        return (_OptimizerGroup, ())

    def __deepcopy__(self, memo: dict) -> "_OptimizerGroup":
        return _OptimizerGroup()


def link_optimizer_group(layer: Any, group: dict) -> None:
    """Called by :func:`pwsconv.param_groups` with the group that holds ``layer``'s weight: ``gamma="auto"`` reads
    the learning rate and momentum from it once the optimizer has filled them in."""
    layer.__dict__["_opt_group"] = _OptimizerGroup(group)
    layer.__dict__["_auto_clip_w"] = None


def auto_clip_w_of(layer: Any) -> float:
    """λ of ``layer``'s filters under ``gamma="auto"``: learned once from its linked SGD group, else AUTO_CLIP_W."""
    lam = layer.__dict__.get("_auto_clip_w")
    if lam is not None:
        return lam
    link = layer.__dict__.get("_opt_group")
    group = link.group if link is not None else None
    if not group or "lr" not in group or "dampening" not in group:   # no SGD group (yet): the fixed λ
        return AUTO_CLIP_W
    lam = auto_clip_w(group.get("initial_lr", group["lr"]), group.get("momentum", 0.0))
    if lam is None:
        return AUTO_CLIP_W
    layer.__dict__["_auto_clip_w"] = lam   # once: the LR the optimizer starts with, whatever the schedule does
    return lam
