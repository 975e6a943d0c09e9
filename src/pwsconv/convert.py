"""Whole-model operations: :func:`convert` a network to a normalization method, :func:`fold` reparameterized layers
into plain torch layers, and :func:`param_groups` for the optimizer (α without weight decay)."""

from __future__ import annotations

import copy
import fnmatch
import warnings
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from .norms import NormMethod, _opts_for, _split_opts, build_norm, get_method

__all__ = ["convert", "fold", "param_groups", "is_norm_layer", "NORM_TYPES"]

_CONV_DIM = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_CONVT_DIM = {nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}
_BN_DIM = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3, nn.SyncBatchNorm: 2}
_GLOBAL_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                 nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)

#: Module types whose parameters count as "norm affine" in :func:`param_groups`.
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm,
                                           nn.LocalResponseNorm)


def is_norm_layer(m: nn.Module) -> bool:
    """True for torch's norm layers and for zoo layers that declare ``is_norm_layer = True``."""
    return isinstance(m, NORM_TYPES) or bool(getattr(m, "is_norm_layer", False))


def _exact_type(m: nn.Module, table: dict) -> int | None:
    # exact types only: a PWSConv2d (a Conv2d subclass) or another zoo conv is never converted twice
    return table.get(type(m))


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) or name.startswith(p + ".") for p in patterns)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _channels_of(module: nn.Module) -> int | None:
    for attr in ("out_channels", "num_features", "out_features", "num_channels"):
        v = getattr(module, attr, None)
        if isinstance(v, int):
            return v
    last = None
    for m in module.modules():
        if isinstance(m, (nn.modules.conv._ConvNd,)):
            last = m.out_channels
    return last


def convert(
    model: nn.Module,
    method: str = "pws",
    *,
    copy_weights: bool = False,
    exclude: Iterable[str] = (),
    bias: bool | None = None,
    convert_linear: bool = False,
    convert_transposed: bool = False,
    input_norm: bool | str = False,
    output_norm: bool | str = False,
    inplace: bool = False,
    **method_opts: Any,
) -> nn.Module:
    """Turn a conv+BN network into one that uses ``method`` (default: a BN-free PWS network, as the paper does).

    Every ``nn.Conv1d/2d/3d`` becomes the method's conv with the same hyper-parameters (for "pws": its PWS twin,
    eq. 12) and every BatchNorm becomes the method's output norm (for "pws", "none", "wn": ``nn.Identity``; for "gn":
    GroupNorm; "bn" keeps BatchNorm). ``gamma=1e-3`` and the other PWS switches go in ``method_opts``.

    Args:
        model: any module tree (Sequential, residual blocks, torchvision-style ResNets, your own modules).
        method: a registered method name (see :func:`pwsconv.available_methods`).
        copy_weights: copy each conv's current weight (and bias, where both have one) into its replacement.
        exclude: module names or fnmatch patterns (e.g. ``"conv1"``, ``"fc"``, ``"layer4.*"``) left untouched.
        bias: give converted convs a bias (``None``: the method's default; "pws" adds β_o since BN's shift is gone).
        convert_linear: also convert ``nn.Linear`` (PWSLinear for "pws"); the paper keeps the classifier plain.
        convert_transposed: also convert ``nn.ConvTranspose*d`` when the method has a transposed layer.
        input_norm: add LayerNorm (GroupNorm with one group) after the stem: ``True`` = after the first conv in
            module order, or the name of the module after whose output to insert it.
        output_norm: add LayerNorm before the global pooling: ``True`` = before the first ``AdaptiveAvg/MaxPool``, or the
            name of the module before whose input to insert it. Together these are the paper's ImageNet setting.
            A module that gets a norm is wrapped in ``nn.Sequential`` (its state_dict keys gain ``.0``/``.1``).
        inplace: modify ``model`` itself; by default a deep copy is converted and ``model`` is left unchanged.

    Returns:
        The converted model (``model`` itself when ``inplace=True``). Layers a method cannot take (e.g. a PWS filter
        of a single weight, as in a 1×1 depthwise conv) stay as they are, with a warning.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(method, (str, NormMethod)):
        raise TypeError(f"convert: method must be a method name (str), got {type(method).__name__}")
    m = get_method(method)
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)  # "conv1" is one pattern, not five
    if not inplace:
        model = copy.deepcopy(model)
    # every path to every module: a layer shared by several parents is converted once and stays shared
    targets: list[tuple[str, nn.Module]] = [(n, mod) for n, mod in model.named_modules(remove_duplicate=False) if n]

    # resolve the LayerNorm positions before anything is replaced
    first_conv = next((n for n, mod in targets if isinstance(mod, nn.modules.conv._ConvNd)), None)
    in_name = first_conv if input_norm is True else (input_norm or None)
    out_name: str | None = None
    out_channels = None
    if output_norm:
        if output_norm is True:
            out_name = next((n for n, mod in targets if isinstance(mod, _GLOBAL_POOLS)), None)
            if out_name is None:
                raise ValueError("output_norm=True: no global pooling module found; pass the module name instead")
        else:
            out_name = str(output_norm)
        names = [n for n, _ in targets]
        if out_name not in names:
            raise ValueError(f"output_norm: no module named {out_name!r}")
        for n, mod in targets[: names.index(out_name)]:
            if isinstance(mod, nn.modules.conv._ConvNd):
                out_channels = mod.out_channels
        if out_channels is None:
            raise ValueError(f"output_norm: cannot infer the channels entering {out_name!r} (no conv before it)")
    if input_norm and in_name is None:
        raise ValueError("input_norm=True: the model has no conv layer")
    if in_name and in_name not in {n for n, _ in targets}:
        raise ValueError(f"input_norm: no module named {in_name!r}")

    # method options go to the factories that take them (e.g. "gn": groups/eps to the GroupNorm, not the conv)
    opts = _split_opts(m, dict(method_opts))
    conv_opts = _opts_for(m.conv, opts)
    norm_opts = _opts_for(m.norm, opts)
    converted: dict[int, nn.Module] = {}
    for name, mod in targets:
        if _matches(name, exclude):
            continue
        if id(mod) in converted:
            _set_submodule(model, name, converted[id(mod)])
            continue
        dim = _exact_type(mod, _CONV_DIM)
        if dim is not None:
            new = _convert_conv(m, mod, dim, bias, copy_weights, conv_opts, name)
        elif convert_transposed and (dim := _exact_type(mod, _CONVT_DIM)) is not None and m.transposed is not None:
            new = _convert_convt(m, mod, dim, bias, copy_weights, _opts_for(m.transposed, opts), name)
        elif convert_linear and type(mod) is nn.Linear and m.linear is not None:
            new = _convert_linear(m, mod, bias, copy_weights, _opts_for(m.linear, opts), name)
        elif (dim := _exact_type(mod, _BN_DIM)) is not None:
            new = mod if m.name == "bn" else build_norm(m, mod.num_features, dim, **norm_opts)
        else:
            continue
        if new is not mod:
            new.to(device=_device_of(mod), dtype=_dtype_of(mod))
            new.train(mod.training)
            _set_submodule(model, name, new)
        converted[id(mod)] = new

    if in_name:
        mod = model.get_submodule(in_name)
        c = _channels_of(mod)
        if c is None:
            raise ValueError(f"input_norm: cannot infer the output channels of {in_name!r}")
        gn = nn.GroupNorm(1, c).to(device=_device_of(mod), dtype=_dtype_of(mod))
        _set_submodule(model, in_name, _wrap(mod, mod, gn))
    if out_name:
        mod = model.get_submodule(out_name)
        gn = nn.GroupNorm(1, out_channels).to(device=_device_of(model), dtype=_dtype_of(model))
        _set_submodule(model, out_name, _wrap(mod, gn, mod))
    return model


def _wrap(mod: nn.Module, *parts: nn.Module) -> nn.Sequential:
    """``nn.Sequential(*parts)`` in ``mod``'s train/eval mode (without touching the modes inside ``mod``)."""
    seq = nn.Sequential(*parts)
    seq.training = mod.training
    for p in parts:
        if p is not mod:
            p.train(mod.training)
    return seq


def _device_of(mod: nn.Module) -> torch.device:
    for p in mod.parameters():
        return p.device
    return torch.device("cpu")


def _dtype_of(mod: nn.Module) -> torch.dtype | None:
    for p in mod.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def _copy_params(old: nn.Module, new: nn.Module, copy_weights: bool) -> None:
    if not copy_weights:
        return
    with torch.no_grad():
        new.weight.copy_(old.weight)  # type: ignore[operator]
        if getattr(old, "bias", None) is not None and getattr(new, "bias", None) is not None:
            new.bias.copy_(old.bias)  # type: ignore[union-attr]


def _convert_conv(m, conv: nn.Module, dim: int, bias, copy_weights: bool, opts: dict, name: str) -> nn.Module:
    want_bias = (m.conv_bias or conv.bias is not None) if bias is None else bias
    if m.conv.__name__ == "plain_conv" and want_bias == (conv.bias is not None):
        return conv  # the method keeps plain convs and the bias is as wanted: nothing to change
    try:
        new = m.conv(
            dim, conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, bias=want_bias, padding_mode=conv.padding_mode, **opts,
        )
    except ValueError as e:
        if "element" in str(e):  # a filter too small for weight standardization
            warnings.warn(f"convert: {name} left as {type(conv).__name__}: {e}", stacklevel=3)
            return conv
        raise
    _copy_params(conv, new, copy_weights)
    return new


def _convert_linear(m, lin: nn.Linear, bias, copy_weights: bool, opts: dict, name: str) -> nn.Module:
    try:
        new = m.linear(lin.in_features, lin.out_features, lin.bias is not None if bias is None else bias, **opts)
    except ValueError as e:
        if "element" in str(e):  # e.g. PWSLinear(1, n): a filter of a single weight
            warnings.warn(f"convert: {name} left as {type(lin).__name__}: {e}", stacklevel=3)
            return lin
        raise
    _copy_params(lin, new, copy_weights)
    return new


def _convert_convt(m, conv: nn.Module, dim: int, bias, copy_weights: bool, opts: dict, name: str) -> nn.Module:
    try:
        new = m.transposed(
            dim, conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            output_padding=conv.output_padding, groups=conv.groups,
            bias=(m.conv_bias or conv.bias is not None) if bias is None else bias,
            dilation=conv.dilation, padding_mode=conv.padding_mode, **opts,
        )
    except ValueError as e:
        if "element" in str(e):
            warnings.warn(f"convert: {name} left as {type(conv).__name__}: {e}", stacklevel=3)
            return conv
        raise
    _copy_params(conv, new, copy_weights)
    return new


def fold(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every reparameterized layer (anything with a ``to_plain()`` method: the PWS family and the zoo's
    weight-normalized convs) by the plain torch layer that computes the same function.

    PWS layers become ``nn.Conv*d`` / ``nn.ConvTranspose*d`` / ``nn.Linear`` holding α·Ŵ (eq. 12) and the bias; outputs
    match the unfolded model to float rounding, and no pwsconv class is left. By default ``model`` is deep-copied and
    left unchanged; with ``inplace=True`` it is modified and returned. Hooks registered on a folded layer are not
    carried over to its replacement. The folded layers keep the train/eval mode of the originals.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold: model must be a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    if hasattr(model, "to_plain") and callable(model.to_plain):
        return model.to_plain()
    folded: dict[int, nn.Module] = {}  # a layer shared by several parents is folded once and stays shared
    for name, mod in list(model.named_modules(remove_duplicate=False)):
        if name and hasattr(mod, "to_plain") and callable(mod.to_plain):
            try:
                if model.get_submodule(name) is not mod:
                    continue
            except AttributeError:
                continue  # inside a module already folded
            if id(mod) not in folded:
                folded[id(mod)] = mod.to_plain()
            _set_submodule(model, name, folded[id(mod)])
    return model


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
    return [{"params": ps, "weight_decay": float(wd), "name": k} for k, (wd, ps) in groups.items() if ps]

