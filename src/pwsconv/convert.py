"""Whole-model conversion: :func:`convert` a network to a normalization method.

Neighbours: :mod:`pwsconv.calibration` (``copy_weights`` / ``example_inputs``), :mod:`pwsconv.folding`
(:func:`fold`, deployment) and :mod:`pwsconv.optim` (:func:`param_groups`), re-exported here as before."""

from __future__ import annotations

import copy
import fnmatch
import warnings
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedTensorMixin

from ._bnlike import bn_info, bn_stats, conv_info, with_drop_act
from .calibration import WeightCopy, conv_bn_pairs
from .folding import fold
from .layers.same import Conv2dSame, same_padded
from .layers._reparam import FilterTooSmallError
from .methods import Method, build_norm, get_method, plain_conv
from .optim import NORM_TYPES, is_norm_layer, param_groups

__all__ = ["convert", "fold", "param_groups", "is_norm_layer", "NORM_TYPES"]

_GLOBAL_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                 nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)

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
    strict: bool = False,
    example_inputs: Any = None,
    **method_opts: Any,
) -> nn.Module:
    """Turn a conv+BN network into one that uses ``method`` (default: a BN-free PWS network, as the paper does).

    Every convolution becomes the method's conv with the same hyper-parameters (for "pws": its PWS twin, eq. 12) and
    every BatchNorm becomes the method's output norm (for "pws", "none", "wn": ``nn.Identity``; for "gn": GroupNorm;
    "bn" keeps BatchNorm). ``gamma=1e-3`` and the other PWS switches go in ``method_opts``.

    Layers are recognized by what they are, not by their exact type: every ``nn.Conv*d`` subclass (timm's
    ``Conv2dSame`` and other dynamically "SAME"-padded convs become the method's conv with that padding, e.g.
    :class:`pwsconv.layers.same.PWSConv2dSame`; weight-standardized convs such as timm's ``StdConv2d``/``ScaledStdConv2d`` become plain PWS
    convs; uninitialized ``nn.LazyConv*d`` become lazy PWS convs that take their input channels from the first
    batch) and every BatchNorm (``nn.BatchNorm1d/2d/3d``, ``SyncBatchNorm``, lazy BN, ``FrozenBatchNorm2d`` of
    torchvision and timm, timm's ``BatchNormAct2d``, whose drop path and activation are kept after the new norm).
    A conv or BN that cannot be converted (a forward of its own, a 1×1 depthwise filter of one weight, ...) stays
    as it is and all of them are listed in one warning; ``strict=True`` raises ``ValueError`` instead. Other norms
    (GroupNorm, LayerNorm, ...) are kept by design.

    Args:
        model: any module tree (Sequential, residual blocks, torchvision / timm models, your own modules).
        method: a registered method name (see :func:`pwsconv.available_methods`).
        copy_weights: start from the model's current (e.g. pretrained) function. Each conv's weight and bias are
            copied; a BatchNorm registered right after its conv in the same parent (torchvision's and timm's conv→BN
            units) is folded in with its running statistics when the method drops BN ("pws", "none"). For PWS the
            raw weight is copied and α_o = s_o·sqrt(Var[W_o] + γ)/gain (s_o = γ_bn/sqrt(var + ε)), β = the folded
            shift, so α·Ŵ equals the BN-scaled weight up to its per-filter mean, which standardization removes (the
            one part that cannot be exact). BN statistics that cannot be carried over are listed in a warning.
        exclude: module names or fnmatch patterns (e.g. ``"conv1"``, ``"fc"``, ``"layer4.*"``) left untouched. An
            excluded conv keeps the BatchNorm registered right after it (its conv→BN unit), so it stays normalized.
            A pattern that matches no module is warned about (``strict=True``: ``ValueError``), since a typo would
            convert the layer meant to be kept.
        bias: give converted convs a bias (``None``: the method's default; "pws" adds β_o since BN's shift is gone).
        convert_linear: also convert ``nn.Linear`` (PWSLinear for "pws"); the paper keeps the classifier plain.
        convert_transposed: also convert ``nn.ConvTranspose*d`` when the method has a transposed layer.
        input_norm: add LayerNorm (GroupNorm with one group) after the stem: ``True`` = after the first conv in
            module order, or the name of the module after whose output to insert it.
        output_norm: add LayerNorm before the global pooling: ``True`` = before the first ``AdaptiveAvg/MaxPool``, or the
            name of the module before whose input to insert it. Together these are the paper's ImageNet setting.
            A module that gets a norm is wrapped in ``nn.Sequential`` (its state_dict keys gain ``.0``/``.1``).
        inplace: modify ``model`` itself; by default a deep copy is converted and ``model`` is left unchanged.
            Either way the converted layers hold new parameters: build the optimizer after ``convert``.
        strict: raise ``ValueError`` (before anything is changed) instead of warning about layers left unconverted
            or ``exclude`` patterns that match nothing.
        example_inputs: with ``copy_weights``, a batch (a tensor, or a tuple of positional inputs) of typical data
            to calibrate on: the converted model runs on it once in eval mode and, layer after layer in forward
            order, each copied PWS layer's α_o and β_o become the least-squares fit of the original conv(+BN)
            output on the inputs the layer receives (y_o ≈ α_o·z_o + β_o, z = the standardized conv). This
            recovers what a per-channel scale and shift can of the removed filter mean E[W_o]·Σx; the rest, which
            varies with the input, cannot be represented by a PWS layer.

    A converted layer keeps its original's device, dtype, training mode, channels_last weights and frozen
    parameters (``requires_grad=False``; a PWS layer's α follows its weight). Layers that are already pwsconv layers
    are left as they are; with ``method_opts`` they are listed in the warning (set options on them directly, e.g.
    ``layer.gamma = 1e-2``). A bare conv or BatchNorm as ``model`` is converted itself. Not carried over: hooks
    registered on a replaced layer, and a weight tensor shared by two convs (each gets its own).

    Returns:
        The converted model (``model`` itself when ``inplace=True``).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or is a ``torch.jit`` (TorchScript) module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("convert: torch.jit (TorchScript) modules cannot be converted; convert the Python model, "
                        "then script the result")
    if not isinstance(method, (str, Method)):
        raise TypeError(f"convert: method must be a method name (str), got {type(method).__name__}")
    m = get_method(method)
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)  # "conv1" is one pattern, not five
    if not inplace:
        model = _deepcopy(model)
    if (conv_info(model) is not None or bn_info(model) is not None) and not _own_layer(model):
        holder = nn.Sequential(model)   # a bare layer: converted as the one child of a holder
        return convert(holder, m.name, copy_weights=copy_weights, exclude=exclude, bias=bias,
                       convert_linear=convert_linear, convert_transposed=convert_transposed, input_norm=input_norm,
                       output_norm=output_norm, inplace=True, strict=strict, example_inputs=example_inputs,
                       **method_opts)[0]
    # every path to every module: a layer shared by several parents is converted once and stays shared
    targets: list[tuple[str, nn.Module]] = [(n, mod) for n, mod in model.named_modules(remove_duplicate=False) if n]
    unmatched = [p for p in exclude if not any(_matches(n, (p,)) for n, _ in targets)]
    if unmatched:   # a typo would convert the layer meant to be kept
        msg = f"convert: exclude pattern(s) {unmatched} match no module of the model, so they exclude nothing"
        if strict:
            raise ValueError(msg)
        warnings.warn(msg, stacklevel=2)

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
    m.split_options(dict(method_opts))   # an undeclared option: MethodOptionError before anything changes
    opts = dict(method_opts)
    if example_inputs is not None and not copy_weights:
        raise ValueError("convert: example_inputs is used with copy_weights=True only")
    weights = WeightCopy(model, fold_norms=m.norm is None, calibrate=example_inputs is not None) if copy_weights \
        else None
    ctx = _Ctx(m, bias, weights, opts)
    if example_inputs is not None:
        example_inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    converted: dict[int, nn.Module] = {}
    plan: list[tuple[str, nn.Module, nn.Module]] = []
    keep: set[int] = set()   # the BN of an excluded conv→BN unit: a conv kept plain keeps its norm
    if exclude:
        pairs = conv_bn_pairs(model)
        keep = {id(pairs[id(mod)][1]) for n, mod in targets if _matches(n, exclude) and id(mod) in pairs}
    for name, mod in targets:
        if _matches(name, exclude) or id(mod) in keep:
            continue
        if method_opts and _own_layer(mod) and (conv_info(mod) is not None or bn_info(mod) is not None):
            ctx.leave(name, mod, f"already a {type(mod).__name__}: its options are unchanged")
        if id(mod) in converted:
            plan.append((name, mod, converted[id(mod)]))
            continue
        new = _convert_one(ctx, name, mod, convert_linear, convert_transposed)
        converted[id(mod)] = new
        if new is not mod:
            plan.append((name, mod, new))

    if ctx.left:
        msg = (f"convert(method={m.name!r}): {len(ctx.left)} conv/norm layer(s) left unconverted: "
               + "; ".join(ctx.left))
        if strict:
            raise ValueError(msg)
        warnings.warn(msg, stacklevel=2)
    if ctx.lost:
        warnings.warn(f"convert(copy_weights=True): the running statistics and affine of {len(ctx.lost)} BatchNorm "
                      f"layer(s) are not carried over by method {m.name!r} (no conv registered right before them "
                      "to fold them into, or a method with its own norm): " + ", ".join(ctx.lost), stacklevel=2)
    for name, mod, new in plan:
        if new is not mod and not getattr(new, "_pws_placed", False):
            if not _is_lazy(mod):
                new.to(device=_device_of(mod), dtype=_dtype_of(mod))
                _keep_state(mod, new)
            new.train(mod.training)
            new._pws_placed = True
        _set_submodule(model, name, new)
    for _, _, new in plan:
        new.__dict__.pop("_pws_placed", None)
    if example_inputs is not None:
        weights.calibrate(model, example_inputs)

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


def _keep_state(mod: nn.Module, new: nn.Module) -> None:
    """What a user set on the original layer: frozen parameters (α follows the weight) and channels_last weights."""
    w, nw = getattr(mod, "weight", None), getattr(new, "weight", None)
    if isinstance(w, nn.Parameter) and isinstance(nw, nn.Parameter):
        if not w.requires_grad:
            for p in (nw, getattr(new, "alpha", None)):
                if isinstance(p, nn.Parameter):
                    p.requires_grad_(False)
        if w.dim() == 4 == nw.dim() and not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last):
            new.to(memory_format=torch.channels_last)
    b, nb = getattr(mod, "bias", None), getattr(new, "bias", None)
    if isinstance(b, nn.Parameter) and isinstance(nb, nn.Parameter) and not b.requires_grad:
        nb.requires_grad_(False)


def _deepcopy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also copies lazy modules before their first forward (torch refuses to deepcopy an
    uninitialized parameter: each gets a fresh uninitialized one)."""
    memo: dict[int, Any] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if isinstance(t, UninitializedTensorMixin):
            memo[id(t)] = type(t)(requires_grad=t.requires_grad, device=t.device, dtype=t.dtype)
    return copy.deepcopy(model, memo)


class _Ctx:
    """What one :func:`convert` call knows and collects."""

    def __init__(self, m: Method, bias: bool | None, copy: WeightCopy | None, opts: dict) -> None:
        self.m, self.bias, self.copy, self.opts = m, bias, copy, opts
        self.conv_opts, self.norm_opts = m.split_options(opts)
        self.left: list[str] = []      # "name (Type): why" of every conv/norm left as it is
        self.lost: list[str] = []      # BN layers whose statistics copy_weights could not carry

    def leave(self, name: str, mod: nn.Module, why: str) -> nn.Module:
        self.left.append(f"{name} ({type(mod).__name__}: {why})")
        return mod


def _is_lazy(mod: nn.Module) -> bool:
    return isinstance(mod, LazyModuleMixin) and mod.has_uninitialized_params()


def _own_layer(mod: nn.Module) -> bool:
    """A pwsconv layer (PWS, WN, WS, SWS, CenConv, ...): already converted, never converted twice. pwsconv's plain
    ``Conv2dSame`` (what fold makes of a same-padded PWS conv) is a plain conv like any other."""
    return type(mod).__module__.startswith("pwsconv.") and type(mod) is not Conv2dSame


def _convert_one(ctx: _Ctx, name: str, mod: nn.Module, convert_linear: bool, convert_transposed: bool) -> nn.Module:
    m = ctx.m
    ci = conv_info(mod)
    if ci is not None:
        if _own_layer(mod):
            return mod
        if ci.transposed:
            if not convert_transposed or m.transposed is None:
                return mod
            return _convert_convt(ctx, name, mod, ci)
        return _convert_conv(ctx, name, mod, ci)
    if type(mod) is nn.Linear and convert_linear and m.linear is not None:
        return _convert_linear(ctx, name, mod)
    bi = bn_info(mod)
    if bi is not None and not _own_layer(mod):
        return _convert_bn(ctx, name, mod, bi)
    return mod


def _carry(copy: WeightCopy | None, mod: nn.Module, new: nn.Module, ci: Any, *, linear: bool = False) -> None:
    if copy is not None:
        copy.carry(mod, new, ci, linear=linear)


def _try(ctx: _Ctx, name: str, mod: nn.Module, build) -> nn.Module:
    try:
        return build()
    except FilterTooSmallError as e:   # a filter too small for weight standardization
        return ctx.leave(name, mod, f"left as {type(mod).__name__}: {e}")


def _convert_conv(ctx: _Ctx, name: str, conv: nn.Module, ci: Any) -> nn.Module:
    m = ctx.m
    want_bias = (m.conv_bias or conv.bias is not None) if ctx.bias is None else ctx.bias
    plain_method = m.conv is plain_conv
    fold_needed = ctx.copy is not None and ctx.copy.folds(conv)
    if ci.custom:
        if plain_method and want_bias == (conv.bias is not None):
            return conv
        return ctx.leave(name, conv, "a forward of its own")
    if plain_method:
        if ci.std is not None or ci.lazy:
            return conv    # the method keeps plain convs: a weight-standardized or lazy conv stays as the model has it
        if want_bias == (conv.bias is not None) and not fold_needed:
            return conv    # the method keeps plain convs and the bias is as wanted: nothing to change
        cls = same_padded(ci.base) if ci.same_pad else ci.base
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                  dilation=conv.dilation, groups=conv.groups, bias=want_bias, padding_mode=conv.padding_mode)
        if ctx.copy is None:
            nn.init.kaiming_normal_(new.weight, mode="fan_in", nonlinearity="relu")
            if new.bias is not None:
                nn.init.zeros_(new.bias)
        _carry(ctx.copy, conv, new, ci)
        return new
    kw = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=want_bias,
              padding_mode=conv.padding_mode)
    if ci.lazy:
        if m.lazy is None:
            return ctx.leave(name, conv, f"uninitialized lazy conv: method {m.name!r} has no lazy conv; run one "
                                         "forward first")
        return m.lazy(ci.dim, conv.out_channels, conv.kernel_size, **kw, **ctx.conv_opts)
    new = _try(ctx, name, conv, lambda: m.conv(ci.dim, conv.in_channels, conv.out_channels, conv.kernel_size,
                                               **kw, **ctx.conv_opts))
    if ci.same_pad and new is not conv:
        new.__class__ = same_padded(type(new))   # the method's conv, padding the input as the original did
    if new is not conv:
        _carry(ctx.copy, conv, new, ci)
    return new


def _convert_linear(ctx: _Ctx, name: str, lin: nn.Linear) -> nn.Module:
    m = ctx.m
    b = lin.bias is not None if ctx.bias is None else ctx.bias
    new = _try(ctx, name, lin, lambda: m.linear(lin.in_features, lin.out_features, b, **ctx.conv_opts))
    if new is not lin:
        _carry(ctx.copy, lin, new, None, linear=True)
    return new


def _convert_convt(ctx: _Ctx, name: str, conv: nn.Module, ci: Any) -> nn.Module:
    m = ctx.m
    if ci.custom or ci.lazy:
        return ctx.leave(name, conv, "a forward of its own" if ci.custom else "uninitialized lazy transposed conv")
    new = _try(ctx, name, conv, lambda: m.transposed(
        ci.dim, conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        output_padding=conv.output_padding, groups=conv.groups,
        bias=(m.conv_bias or conv.bias is not None) if ctx.bias is None else ctx.bias,
        dilation=conv.dilation, padding_mode=conv.padding_mode, **ctx.conv_opts,
    ))
    if new is not conv:
        _carry(ctx.copy, conv, new, ci)
    return new


def _convert_bn(ctx: _Ctx, name: str, bn: nn.Module, info: Any) -> nn.Module:
    m = ctx.m
    if m.keeps_batchnorm:
        return bn
    if not info.ok:
        return ctx.leave(name, bn, "children other than a drop path and an activation")
    if m.norm is None:
        norm: nn.Module = nn.Identity()
        if ctx.copy is not None and id(bn) not in ctx.copy.folded and not info.lazy and bn_stats(bn) is not None:
            ctx.lost.append(name)
    else:
        if info.lazy:
            return ctx.leave(name, bn, f"uninitialized lazy BatchNorm: method {m.name!r} needs its channels; run one "
                                       "forward first")
        c = bn_stats(bn)[0].numel() if bn_stats(bn) is not None else int(bn.num_features)
        norm = build_norm(m, c, info.dim, **ctx.norm_opts)
        if ctx.copy is not None and bn_stats(bn) is not None:
            ctx.lost.append(name)
    return with_drop_act(bn, info, norm)


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
