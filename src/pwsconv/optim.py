"""What the optimizer sees: :func:`param_groups` (α and declared parameters without weight decay, as the paper sets)."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

__all__ = ["param_groups", "link_optimizer", "is_norm_layer", "NORM_TYPES"]

#: Module types whose parameters count as "norm affine" in :func:`param_groups`.
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm,
                                           nn.LocalResponseNorm)


def is_norm_layer(m: nn.Module) -> bool:
    """True for torch's norm layers and for zoo layers that declare ``is_norm_layer = True``."""
    return isinstance(m, NORM_TYPES) or bool(getattr(m, "is_norm_layer", False))


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    bias_weight_decay: float | None = None,
    norm_weight_decay: float | None = None,
    no_decay_weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups in which α (and every parameter a layer lists in ``no_weight_decay_params``) has
    weight decay 0, as the paper sets ("Weight decay for α_o is set as 0").

    ``bias_weight_decay`` / ``norm_weight_decay``: weight decay for biases and for the affine parameters of norm
    layers (``None``: the same as ``weight_decay``, which is what the paper's code does). Parameters that do not
    require grad are left out; shared parameters appear once. Empty groups are dropped. Each group has a ``"name"``.

    Layers with ``gamma="auto"`` are told which group holds their weight: once an SGD optimizer built from these
    groups has filled in its learning rate, they set their clipping from it (:func:`pwsconv.functional.auto_clip_w`);
    to resume such a run with ``optimizer.load_state_dict``, see :func:`link_optimizer`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"param_groups: model must be a torch.nn.Module, got {type(model).__name__}")
    if weight_decay is None:
        raise TypeError("param_groups: weight_decay must be a finite number ≥ 0, got None")
    for label, v in (("weight_decay", weight_decay), ("bias_weight_decay", bias_weight_decay),
                     ("norm_weight_decay", norm_weight_decay), ("no_decay_weight_decay", no_decay_weight_decay)):
        if isinstance(v, bool):
            raise TypeError(f"param_groups: {label} must be a number, got {v!r}")
        if v is not None and (not isinstance(v, (int, float)) or v < 0 or v != v or v == float("inf")):
            raise ValueError(f"{label} must be a finite number ≥ 0, got {v!r}")
    wd_bias = weight_decay if bias_weight_decay is None else bias_weight_decay
    wd_norm = weight_decay if norm_weight_decay is None else norm_weight_decay
    groups: dict[str, tuple[float, list[nn.Parameter]]] = {
        "decay": (weight_decay, []), "bias": (wd_bias, []), "norm": (wd_norm, []), "no_decay": (no_decay_weight_decay, []),
    }
    seen: set[int] = set()
    for mod in model.modules():
        exempt = set(getattr(mod, "no_weight_decay_params", ()))
        if hasattr(mod, "alpha") and isinstance(getattr(mod, "alpha"), nn.Parameter):
            exempt.add("alpha")
        for pname, p in mod.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if pname in exempt:
                key = "no_decay"
            elif is_norm_layer(mod):
                key = "norm"
            elif pname == "bias":
                key = "bias"
            else:
                key = "decay"
            groups[key][1].append(p)
    out = [{"params": ps, "weight_decay": float(wd), "name": k} for k, (wd, ps) in groups.items() if ps]
    _link_layers(model, out, "link_optimizer_group")   # gamma="auto" reads the SGD settings of its weight's group
    return out


def link_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any = None) -> None:
    """Tie the ``gamma="auto"`` layers of ``model`` to ``optimizer``: each follows the LR of the optimizer's group
    that holds its weight, now and after every ``optimizer.load_state_dict`` (which replaces the group dicts that
    :func:`param_groups` linked). Call it once, after building the optimizer, when a run may be resumed::

        opt = torch.optim.SGD(pwsconv.param_groups(net, 5e-4), lr=0.1, momentum=0.9)
        pwsconv.link_optimizer(net, opt)        # then opt.load_state_dict(...) resumes bit-exactly

    A fresh run with :func:`param_groups` needs no call (it links the groups it returns); an optimizer built on
    ``net.parameters()`` or on copies of those groups is read only through this call. After a load, only the links to
    this optimizer's groups move (a layer since linked to another optimizer by :func:`param_groups` stays with it).

    ``scaler``: the ``torch.amp.GradScaler`` of float16 mixed precision, if the loss is scaled with one
    (``scaler.scale(loss).backward()``): the layers that clip gradients in their backward (``gamma="auto"``,
    ``clip=``) then multiply their bounds by its scale, so that they bound the unscaled gradients (without it they
    would be tighter by the scale, 65536 at first), and MABN keeps its moving average of backward statistics
    unscaled (the scale changes during training). None (the default) or a disabled scaler: the loss is not
    scaled.
    Layers without ``gamma="auto"`` or ``clip`` are left alone; calling it again is harmless."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"link_optimizer: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"link_optimizer: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if scaler is not None and not (isinstance(scaler, torch.amp.GradScaler) or (
            callable(getattr(scaler, "is_enabled", None)) and hasattr(scaler, "_init_scale"))):
        raise TypeError(f"link_optimizer: scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}")
    _link_layers(model, optimizer.param_groups, "link_live_group")
    for mod in model.modules():
        link_scaler = getattr(mod, "link_loss_scaler", None)
        if link_scaler is not None:
            link_scaler(scaler)
    linked = _RELINKED.setdefault(optimizer, weakref.WeakSet())
    if model not in linked:
        linked.add(model)
        ref, before = weakref.ref(model), []

        def keep(opt: torch.optim.Optimizer, state_dict: dict) -> None:
            before[:] = opt.param_groups

        def relink(opt: torch.optim.Optimizer) -> None:   # links to the replaced dicts move to their successors
            if (m := ref()) is not None:
                remap_optimizer_groups(m, before, opt.param_groups)
            before.clear()
        optimizer.register_load_state_dict_pre_hook(keep)
        optimizer.register_load_state_dict_post_hook(relink)


#: the models each optimizer relinks after its load_state_dict (one hook per pair)
_RELINKED: "weakref.WeakKeyDictionary[torch.optim.Optimizer, weakref.WeakSet]" = weakref.WeakKeyDictionary()


def remap_optimizer_groups(model: nn.Module, old: list[dict[str, Any]], new: list[dict[str, Any]]) -> None:
    """Move every link of ``model``'s layers to a group of ``old`` onto the group at the same place in ``new`` (an
    optimizer's groups before and after its ``load_state_dict``); links to other groups stay."""
    to = {id(o): n for o, n in zip(old, new)}
    for mod in model.modules() if to else ():
        remap = getattr(mod, "remap_optimizer_groups", None)
        if remap is not None:
            remap(to)


def _link_layers(model: nn.Module, groups: list[dict[str, Any]], method: str) -> None:
    """Call ``layer.<method>(group)`` on every layer that has it, with the group of ``groups`` holding its weight."""
    owner = {id(p): g for g in groups for p in g["params"]}
    for mod in model.modules():
        link = getattr(mod, method, None)
        if link is None:
            continue
        w = mod._parameters.get("weight")   # or, parametrized (weight_norm, ...), the tensors the weight is made of
        ws = [w] if w is not None else [p for n, p in mod.named_parameters()
                                        if n.startswith("parametrizations.weight.")]
        group = next((owner[id(p)] for p in ws if id(p) in owner), None)
        if group is not None:
            link(group)
