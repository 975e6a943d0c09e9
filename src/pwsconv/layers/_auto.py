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


class _OptimizerGroups:
    """The parameter groups that hold a layer's weight, newest last (a few ``param_groups`` calls may be made before
    one of them reaches an optimizer). Derived, not state: a copy or an unpickled layer is unlinked until its own
    ``param_groups`` call."""

    __slots__ = ("groups",)

    def __init__(self) -> None:
        self.groups: list[dict] = []

    def __reduce__(self) -> tuple:
        return (_OptimizerGroups, ())

    def __deepcopy__(self, memo: dict) -> "_OptimizerGroups":
        return _OptimizerGroups()


def link_optimizer_group(layer: Any, group: dict) -> None:
    """Called by :func:`pwsconv.param_groups` with the group that holds ``layer``'s weight: ``gamma="auto"`` reads
    the learning rate and momentum from it once an optimizer has filled them in (and again after a new call)."""
    link = layer.__dict__.get("_opt_group")
    if link is None:
        link = layer.__dict__["_opt_group"] = _OptimizerGroups()
    link.groups = link.groups[-3:] + [group]
    layer.__dict__["_auto_clip_w"] = None


def auto_clip_w_of(layer: Any) -> float:
    """λ of ``layer``'s filters under ``gamma="auto"``: learned once from the newest linked group that an SGD
    optimizer has filled in, else AUTO_CLIP_W."""
    lam = layer.__dict__.get("_auto_clip_w")
    if lam is not None:
        return lam
    link = layer.__dict__.get("_opt_group")
    group = next((g for g in reversed(link.groups) if "lr" in g), None) if link is not None else None
    if group is None or "dampening" not in group:   # no optimizer (yet), or not SGD: the fixed λ
        return AUTO_CLIP_W
    lam = auto_clip_w(group.get("initial_lr", group["lr"]), group.get("momentum", 0.0))
    if lam is None:
        return AUTO_CLIP_W
    layer.__dict__["_auto_clip_w"] = lam   # once: the LR the optimizer starts with, whatever the schedule does
    return lam
