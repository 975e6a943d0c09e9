"""Whole-model operations: :func:`convert` a network to a normalization method, :func:`fold` reparameterized layers
into plain torch layers, and :func:`param_groups` for the optimizer (α without weight decay)."""

from __future__ import annotations

import copy
import fnmatch
import warnings
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedTensorMixin

from ._bnlike import bn_info, bn_stats, conv_info, effective_weight, fold_bn, init_from, with_drop_act
from .accel import clear_cache
from .layers.lazy import LazyPWSConv1d, LazyPWSConv2d, LazyPWSConv3d
from .layers.same import Conv2dSame, same_padded
from .layers._reparam import FilterTooSmallError
from .methods import Method, build_norm, get_method, plain_conv

__all__ = ["convert", "fold", "param_groups", "is_norm_layer", "NORM_TYPES"]

_LAZY_PWS = {1: LazyPWSConv1d, 2: LazyPWSConv2d, 3: LazyPWSConv3d}
_GLOBAL_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                 nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)

#: Module types whose parameters count as "norm affine" in :func:`param_groups`.
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm,
                                           nn.LocalResponseNorm)


def is_norm_layer(m: nn.Module) -> bool:
    """True for torch's norm layers and for zoo layers that declare ``is_norm_layer = True``."""
    return isinstance(m, NORM_TYPES) or bool(getattr(m, "is_norm_layer", False))


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
        strict: raise ``ValueError`` (before anything is changed) instead of warning about layers left unconverted.
        example_inputs: with ``copy_weights``, a batch (a tensor, or a tuple of positional inputs) of typical data
            to calibrate on: the converted model runs on it once in eval mode and, layer after layer in forward
            order, each copied PWS layer's α_o and β_o become the least-squares fit of the original conv(+BN)
            output on the inputs the layer receives (y_o ≈ α_o·z_o + β_o, z = the standardized conv). This
            recovers what a per-channel scale and shift can of the removed filter mean E[W_o]·Σx; the rest, which
            varies with the input, cannot be represented by a PWS layer.

    Returns:
        The converted model (``model`` itself when ``inplace=True``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(method, (str, Method)):
        raise TypeError(f"convert: method must be a method name (str), got {type(method).__name__}")
    m = get_method(method)
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be an nn.Module, got {type(model).__name__}")
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)  # "conv1" is one pattern, not five
    if not inplace:
        model = _deepcopy(model)
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
    m.split_options(dict(method_opts))   # an undeclared option: MethodOptionError before anything changes
    opts = dict(method_opts)
    ctx = _Ctx(m, bias, copy_weights, opts, _conv_bn_pairs(model) if copy_weights else {})
    if example_inputs is not None:
        if not copy_weights:
            raise ValueError("convert: example_inputs is used with copy_weights=True only")
        ctx.calibrate = True
        example_inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    converted: dict[int, nn.Module] = {}
    plan: list[tuple[str, nn.Module, nn.Module]] = []
    for name, mod in targets:
        if _matches(name, exclude):
            continue
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
            new.train(mod.training)
            new._pws_placed = True
        _set_submodule(model, name, new)
    for _, _, new in plan:
        new.__dict__.pop("_pws_placed", None)
    if example_inputs is not None:
        _calibrate(ctx, model, example_inputs)

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

    def __init__(self, m, bias, copy_weights: bool, opts: dict, pairs: dict[int, tuple[str, nn.Module]]) -> None:
        self.m, self.bias, self.copy_weights, self.opts, self.pairs = m, bias, copy_weights, opts, pairs
        self.conv_opts, self.norm_opts = m.split_options(opts)
        self.left: list[str] = []      # "name (Type): why" of every conv/norm left as it is
        self.lost: list[str] = []      # BN layers whose statistics copy_weights could not carry
        self.folded: set[int] = set()  # BN layers folded into the conv before them
        self.calibrate = False                       # example_inputs given: keep a reference of each copied layer
        self.refs: dict[int, nn.Module] = {}         # new PWS layer → plain layer computing the original conv(+BN)

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


def _conv_bn_pairs(model: nn.Module) -> dict[int, tuple[str, nn.Module]]:
    """conv/linear → the BN registered right after it in the same parent, with as many features as it has outputs
    (the conv→BN unit of torchvision and timm), for ``copy_weights``."""
    mods = list(model.named_modules())
    pairs: dict[int, tuple[str, nn.Module]] = {}
    for (n1, a), (n2, b) in zip(mods, mods[1:]):
        ci = conv_info(a)
        if ci is None and not isinstance(a, nn.Linear):
            continue
        if ci is not None and ci.lazy or bn_info(b) is None or bn_stats(b) is None:
            continue
        if not _feeds(model, n1, n2):
            continue
        outs = a.out_channels if ci is not None else a.out_features
        if bn_stats(b)[0].numel() == outs:
            pairs[id(a)] = (n2, b)
    return pairs


def _eval_forward(model: nn.Module, args: tuple, hooks: list) -> None:
    modes = {mod: mod.training for mod in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(*args)
    finally:
        for h in hooks:
            h.remove()
        for mod, mode in modes.items():
            mod.training = mode


def _calibrate(ctx: _Ctx, model: nn.Module, args: tuple) -> None:
    """Fit α and β of every copied PWS layer on ``args``, in forward order: per output channel, the least-squares
    line from the layer's standardized output z_o (α = 1, β = 0) to the output of the layer it replaces (conv with
    the BN after it folded in), y_o ≈ α_o·z_o + β_o, on the inputs the layer actually receives (which already come
    from calibrated layers)."""
    if not args or not all(isinstance(a, Tensor) for a in args):
        raise TypeError("convert: example_inputs must be a tensor or a tuple of tensors")
    refs = {i: r for i, r in ctx.refs.items()}
    layers = {id(mod): mod for mod in model.modules() if id(mod) in refs}

    def pre(mod: nn.Module, inp: tuple) -> None:
        ref = refs.pop(id(mod), None)
        if ref is None:
            return
        y = ref(*inp)
        alpha, bias = mod.alpha, getattr(mod, "bias", None)
        saved = (None if alpha is None else alpha.detach().clone(), None if bias is None else bias.detach().clone())
        if alpha is not None:
            alpha.fill_(1.0)
        if bias is not None:
            bias.zero_()
        clear_cache(mod)
        z = mod.forward(*inp)
        if not (isinstance(z, Tensor) and isinstance(y, Tensor)) or z.shape != y.shape or z.dim() < 2:
            _restore(mod, saved)
            return
        ch = 1 if z.dim() > 2 else z.dim() - 1
        zc = z.detach().double().movedim(ch, 0).reshape(z.shape[ch], -1)
        yc = y.detach().double().movedim(ch, 0).reshape(y.shape[ch], -1)
        zm, ym = zc.mean(1), yc.mean(1)
        if alpha is not None:
            var = (zc - zm[:, None]).square().mean(1)
            cov = ((zc - zm[:, None]) * (yc - ym[:, None])).mean(1)
            a = torch.where(var > 1e-12 * var.max().clamp_min(1e-300), cov / var.clamp_min(1e-300),
                            saved[0].double())
            alpha.copy_(a.to(alpha.dtype))
        else:
            a = torch.ones_like(zm)
        if bias is not None:
            bias.copy_((ym - a * zm).to(bias.dtype))
        clear_cache(mod)

    hooks = [mod.register_forward_pre_hook(pre) for mod in layers.values()]
    _eval_forward(model, args, hooks)


def _restore(mod: nn.Module, saved: tuple) -> None:
    if saved[0] is not None:
        mod.alpha.copy_(saved[0])
    if saved[1] is not None:
        mod.bias.copy_(saved[1])
    clear_cache(mod)


def _feeds(model: nn.Module, conv_name: str, bn_name: str) -> bool:
    """Whether the output of ``conv_name`` is what ``bn_name`` (the next module in registration order) normalizes:
    both in the same parent, or the conv ends a chain of ``nn.Sequential``s that sits in the BN's parent (timm's
    ``stem`` Sequential ending with a conv, followed by ``bn1``)."""
    bn_parent = bn_name.rpartition(".")[0]
    path = conv_name
    while True:
        parent = path.rpartition(".")[0]
        if parent == bn_parent:
            return True
        if not parent or not (bn_parent == "" or parent.startswith(bn_parent + ".")):
            return False
        seq = model.get_submodule(parent)
        if not isinstance(seq, nn.Sequential) or not len(seq) or seq[-1] is not model.get_submodule(path):
            return False
        path = parent


def _carry(ctx: _Ctx, mod: nn.Module, new: nn.Module, ci: Any, *, linear: bool = False) -> None:
    """copy_weights: the original layer's function (with the BN after it folded in where the method drops BN)."""
    if not ctx.copy_weights or _is_lazy(mod):
        return
    raw = mod.weight.detach()
    eff = effective_weight(mod, ci) if ci is not None else raw.clone()
    b = None if mod.bias is None else mod.bias.detach().clone()
    pair = ctx.pairs.get(id(mod))
    takes_fold = hasattr(new, "alpha") or type(new).__module__.startswith("torch.") or type(new) is Conv2dSame
    if pair is not None and ctx.m.norm is None and takes_fold:
        fused = fold_bn(eff, b, pair[1], transposed=bool(ci is not None and ci.transposed), linear=linear)
        if fused is not None:
            eff, b = fused
            ctx.folded.add(id(pair[1]))
    with torch.no_grad():
        init_from(new, raw.to(new.weight.dtype), eff.to(new.weight.dtype),
                  None if b is None else b.to(new.weight.dtype))
        if ctx.calibrate and hasattr(new, "alpha") and hasattr(new, "to_plain"):
            ref = new.to_plain()     # the same geometry and padding, holding the original (BN-folded) weights
            ref.weight.copy_(eff.to(ref.weight.dtype))
            if ref.bias is not None:
                ref.bias.copy_(0.0 if b is None else b.to(ref.bias.dtype))
            elif b is not None:
                ref.register_forward_hook(_add_bias(b))
            ctx.refs[id(new)] = ref


class _add_bias:
    def __init__(self, b: Tensor) -> None:
        self.b = b

    def __call__(self, mod: nn.Module, inp: Any, out: Tensor) -> Tensor:
        return out + self.b.view(-1, *([1] * (out.dim() - 2))) if out.dim() > 2 else out + self.b


def _try(ctx: _Ctx, name: str, mod: nn.Module, build) -> nn.Module:
    try:
        return build()
    except FilterTooSmallError as e:   # a filter too small for weight standardization
        return ctx.leave(name, mod, f"left as {type(mod).__name__}: {e}")


def _convert_conv(ctx: _Ctx, name: str, conv: nn.Module, ci: Any) -> nn.Module:
    m = ctx.m
    want_bias = (m.conv_bias or conv.bias is not None) if ctx.bias is None else ctx.bias
    plain_method = m.conv is plain_conv
    fold_needed = ctx.copy_weights and id(conv) in ctx.pairs and m.norm is None
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
        if not ctx.copy_weights:
            nn.init.kaiming_normal_(new.weight, mode="fan_in", nonlinearity="relu")
            if new.bias is not None:
                nn.init.zeros_(new.bias)
        _carry(ctx, conv, new, ci)
        return new
    is_pws = m.name == "pws" or m.conv.__name__ == "_pws_conv"
    kw = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=want_bias,
              padding_mode=conv.padding_mode)
    if ci.lazy:
        if not is_pws:
            return ctx.leave(name, conv, f"uninitialized lazy conv: method {m.name!r} has no lazy conv; run one "
                                         "forward first")
        return _LAZY_PWS[ci.dim](conv.out_channels, conv.kernel_size, **kw, **ctx.conv_opts)
    new = _try(ctx, name, conv, lambda: m.conv(ci.dim, conv.in_channels, conv.out_channels, conv.kernel_size,
                                               **kw, **ctx.conv_opts))
    if ci.same_pad and new is not conv:
        new.__class__ = same_padded(type(new))   # the method's conv, padding the input as the original did
    if new is not conv:
        _carry(ctx, conv, new, ci)
    return new


def _convert_linear(ctx: _Ctx, name: str, lin: nn.Linear) -> nn.Module:
    m = ctx.m
    b = lin.bias is not None if ctx.bias is None else ctx.bias
    new = _try(ctx, name, lin, lambda: m.linear(lin.in_features, lin.out_features, b, **ctx.conv_opts))
    if new is not lin:
        _carry(ctx, lin, new, None, linear=True)
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
        _carry(ctx, conv, new, ci)
    return new


def _convert_bn(ctx: _Ctx, name: str, bn: nn.Module, info: Any) -> nn.Module:
    m = ctx.m
    if m.name == "bn":
        return bn
    if not info.ok:
        return ctx.leave(name, bn, "children other than a drop path and an activation")
    if m.norm is None:
        norm: nn.Module = nn.Identity()
        if ctx.copy_weights and id(bn) not in ctx.folded and not info.lazy and bn_stats(bn) is not None:
            ctx.lost.append(name)
    else:
        if info.lazy:
            return ctx.leave(name, bn, f"uninitialized lazy BatchNorm: method {m.name!r} needs its channels; run one "
                                       "forward first")
        c = bn_stats(bn)[0].numel() if bn_stats(bn) is not None else int(bn.num_features)
        norm = build_norm(m, c, info.dim, **ctx.norm_opts)
        if ctx.copy_weights and bn_stats(bn) is not None:
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


def fold(model: nn.Module, inplace: bool = False, *, batchnorm: bool = True) -> nn.Module:
    """Replace every reparameterized layer (anything with a ``to_plain()`` method: the PWS family and the zoo's
    weight-normalized convs) by the plain torch layer that computes the same function, and fold every eval-mode
    BatchNorm that directly follows a conv into that conv.

    PWS layers become ``nn.Conv*d`` / ``nn.ConvTranspose*d`` / ``nn.Linear`` holding α·Ŵ (eq. 12) and the bias; outputs
    match the unfolded model to float rounding, and no pwsconv class is left. By default ``model`` is deep-copied and
    left unchanged; with ``inplace=True`` it is modified and returned. Hooks registered on a folded layer are not
    carried over to its replacement. The folded layers keep the train/eval mode of the originals.

    ``batchnorm`` (default True): a BatchNorm in eval mode (running statistics) whose only input is the output of a
    plain conv used nowhere else is merged into that conv with torch's ``fuse_conv_bn_eval`` and replaced by
    ``nn.Identity`` — the conv+BN pairs are found by tracing the model with ``torch.fx`` (module calls as leaves), so
    only real data flow counts. A BatchNorm in training mode, after something other than a conv, or in a model fx
    cannot trace stays as it is; every one left is named in one warning. MABN's eval form (a per-channel scale and
    shift after its CenConv) is folded the same way. SwitchNorm mixes per-sample statistics and cannot be folded: such
    layers (a class attribute ``cannot_fold`` says why) stay and are named in one warning.
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
    if batchnorm:
        _fold_batchnorms(model)
    left = [f"{n} ({type(m).__name__}: {m.cannot_fold})" for n, m in model.named_modules()
            if isinstance(getattr(type(m), "cannot_fold", None), str)]
    if left:
        warnings.warn(f"fold: {len(left)} layer(s) cannot be folded and stay as they are: " + "; ".join(left),
                      stacklevel=2)
    return model


_PLAIN_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _foldable_bn(m: nn.Module) -> bool:
    """An eval-mode per-channel affine after a conv: torch's BatchNorm with running statistics, or MABN (its eval
    form is x·γ/sqrt(running_var + ε) + β, the CenConv before it already folded to a plain conv)."""
    from .layers.mabn import _MABNNd

    if isinstance(m, _MABNNd):
        return not m.training
    return (type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) and not m.training
            and m.running_mean is not None and m.running_var is not None)


def _fold_batchnorms(model: nn.Module) -> list[str]:
    """Merge eval-mode conv → BatchNorm pairs of ``model`` in place (see :func:`fold`); returns the names of the
    BatchNorm layers left unfolded (also warned about)."""
    import torch.fx as fx
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    bns = [n for n, m in model.named_modules() if _foldable_bn(m)]
    if not bns:
        return []

    class _Leaves(fx.Tracer):   # every module without children is a call, so the graph shows module-level data flow
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return not any(True for _ in m.children()) or super().is_leaf_module(m, qualname)

    try:
        graph = _Leaves().trace(model)
    except Exception as e:  # dynamic control flow, unsupported ops: leave the BatchNorms alone
        left = bns
        reason = f"the model cannot be traced by torch.fx ({type(e).__name__})"
    else:
        calls: dict[str, int] = {}
        for node in graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        done = set()
        for node in graph.nodes:
            if node.op != "call_module" or node.target not in bns or calls[node.target] != 1:
                continue
            prev = node.args[0] if node.args else None
            if not (isinstance(prev, fx.Node) and prev.op == "call_module" and calls.get(prev.target) == 1
                    and len(prev.users) == 1 and len(node.args) == 1 and not node.kwargs):
                continue
            conv, bn = model.get_submodule(prev.target), model.get_submodule(node.target)
            if not isinstance(conv, _PLAIN_CONVS) or conv.training or conv.out_channels != bn.num_features:
                continue
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                fused = fuse_conv_bn_eval(conv, bn)   # torch's own conv-BN fusion
                with torch.no_grad():
                    conv.weight, conv.bias = fused.weight, fused.bias
            else:   # MABN in eval: per-channel scale γ/sqrt(running_var + ε) and shift β
                with torch.no_grad():
                    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
                    shape = (-1,) + (1,) * (conv.weight.dim() - 1)
                    b = conv.bias if conv.bias is not None else torch.zeros_like(bn.bias)
                    conv.weight = nn.Parameter(conv.weight * scale.view(shape).to(conv.weight.dtype))
                    conv.bias = nn.Parameter((b * scale + bn.bias).to(conv.weight.dtype))
            _set_submodule(model, node.target, nn.Identity())
            done.add(node.target)
        left = [n for n in bns if n not in done]
        reason = "each does not directly follow a plain conv used only there"
    if left:
        warnings.warn(f"fold: {len(left)} eval-mode BatchNorm layer(s) left unfolded ({reason}): "
                      + ", ".join(left[:8]) + (" ..." if len(left) > 8 else ""), stacklevel=3)
    return left


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
    groups has filled in its learning rate, they set their clipping from it (:func:`pwsconv.functional.auto_clip_w`).
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
    # layers that adapt to their optimizer (gamma="auto" reads the SGD settings of its weight's group once)
    owner = {id(p): g for g in out for p in g["params"]}
    for mod in model.modules():
        link, w = getattr(mod, "link_optimizer_group", None), getattr(mod, "weight", None)
        if link is not None and isinstance(w, nn.Parameter) and id(w) in owner:
            link(owner[id(w)])
    return out

