"""What :func:`pwsconv.convert` recognizes, by what a layer *is* (its base classes and attributes), not by an exact-type
table: BatchNorm-like layers (torch's BatchNorm1d/2d/3d, SyncBatchNorm and lazy BN, torchvision's and timm's
FrozenBatchNorm2d, timm's BatchNormAct2d / SyncBatchNormAct / FrozenBatchNormAct2d with their drop path and activation)
and convolutions (every ``nn.Conv*d`` / ``nn.ConvTranspose*d`` subclass: plain ones, dynamically "SAME"-padded ones,
weight-standardized ones such as timm's ``StdConv2d`` / ``ScaledStdConv2d``), plus the arithmetic that carries a
pretrained conv+BN unit over to its replacement with ``copy_weights=True``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from .accel import clear_cache

__all__ = ["BNInfo", "ConvInfo", "bn_info", "bn_stats", "conv_info", "with_drop_act", "effective_weight",
           "fold_bn", "init_from"]

_TORCH_CONVS: tuple[tuple[type[nn.Module], int, bool], ...] = (
    (nn.Conv1d, 1, False), (nn.Conv2d, 2, False), (nn.Conv3d, 3, False),
    (nn.ConvTranspose1d, 1, True), (nn.ConvTranspose2d, 2, True), (nn.ConvTranspose3d, 3, True),
)
_BN_DIMS: tuple[tuple[type[nn.Module], int], ...] = (
    (nn.BatchNorm1d, 1), (nn.LazyBatchNorm1d, 1), (nn.BatchNorm3d, 3), (nn.LazyBatchNorm3d, 3),
)
#: children a BN-like layer may have: timm's *NormAct layers run BN → drop → act
_ACT_CHILDREN = ("drop", "act")


# ------------------------------------------------------------------------------------------------------ BatchNorm
@dataclass(frozen=True)
class BNInfo:
    dim: int              # 1, 2 or 3 (2 where the class does not say: SyncBatchNorm, FrozenBatchNorm2d)
    frozen: bool          # statistics and affine are buffers (FrozenBatchNorm2d)
    lazy: bool            # num_features not known yet (an uninitialized LazyBatchNorm)
    extras: tuple[str, ...]   # the children run after the normalization ("drop", "act"); () for plain BN
    ok: bool              # False: children or a forward that cannot be reproduced (listed as unconverted)


def _is_frozen_bn(m: nn.Module) -> bool:
    # torchvision.ops.FrozenBatchNorm2d, timm's FrozenBatchNorm2d / FrozenBatchNormAct2d: BN as four buffers
    if isinstance(m, _NormBase):
        return False
    b = m._buffers
    return all(isinstance(b.get(k), Tensor) for k in ("weight", "bias", "running_mean", "running_var")) \
        and isinstance(getattr(m, "eps", None), float)


def bn_info(m: nn.Module) -> BNInfo | None:
    """How ``m`` is a BatchNorm (``None`` when it is not one). InstanceNorm / GroupNorm / LayerNorm are not."""
    frozen = _is_frozen_bn(m)
    if not (isinstance(m, _BatchNorm) or frozen):
        return None
    dim = next((d for cls, d in _BN_DIMS if isinstance(m, cls)), 2)
    lazy = isinstance(m, LazyModuleMixin) and m.has_uninitialized_params()
    children = tuple(n for n, _ in m.named_children())
    ok = all(n in _ACT_CHILDREN for n in children)   # other children: a forward that cannot be reproduced
    extras = tuple(n for n in _ACT_CHILDREN if n in children)
    return BNInfo(dim, frozen, lazy, extras, ok)


def with_drop_act(bn: nn.Module, info: BNInfo, norm: nn.Module) -> nn.Module:
    """``norm`` followed by ``bn``'s drop path and activation (timm's BatchNormAct2d: BN → drop → act); Identity
    parts are left out, and a lone part is returned as it is."""
    parts: list[tuple[str, nn.Module]] = []
    if not isinstance(norm, nn.Identity):
        parts.append(("norm", norm))
    for name in info.extras:
        child = getattr(bn, name)
        if not isinstance(child, nn.Identity):
            parts.append((name, child))
    if not parts:
        return norm
    if len(parts) == 1 and parts[0][0] == "norm":
        return norm
    seq = nn.Sequential(OrderedDict(parts))
    seq.train(bn.training)
    return seq


def bn_stats(bn: nn.Module) -> tuple[Tensor, Tensor, float, Tensor | None, Tensor | None] | None:
    """(running_mean, running_var, eps, weight, bias) of a BN-like layer, or ``None`` without running statistics."""
    rm, rv = getattr(bn, "running_mean", None), getattr(bn, "running_var", None)
    if not isinstance(rm, Tensor) or not isinstance(rv, Tensor) or isinstance(rm, nn.parameter.UninitializedBuffer):
        return None
    return rm, rv, float(bn.eps), getattr(bn, "weight", None), getattr(bn, "bias", None)


# ------------------------------------------------------------------------------------------------------ convolutions
@dataclass(frozen=True)
class ConvInfo:
    base: type[nn.Module]   # the torch class it is (nn.Conv2d, nn.ConvTranspose1d, ...)
    dim: int
    transposed: bool
    same_pad: bool          # TF "SAME" padding computed from the input (timm Conv2dSame, *StdConv2dSame)
    std: str | None         # None, "std" (timm StdConv2d: (W − μ)/sqrt(Var + ε)) or "scaled" (ScaledStdConv2d)
    lazy: bool              # an uninitialized LazyConv*d
    custom: bool            # a forward of its own that none of the above explains: left as it is


def conv_info(m: nn.Module) -> ConvInfo | None:
    """How ``m`` is a convolution (``None`` for anything that is not an ``nn.Conv*d``/``nn.ConvTranspose*d``)."""
    if not isinstance(m, nn.modules.conv._ConvNd):
        return None
    base, dim, transposed = next(((c, d, t) for c, d, t in _TORCH_CONVS if isinstance(m, c)), (None, 0, False))
    if base is None:
        return None
    cls = type(m)
    name = cls.__name__
    lazy = isinstance(m, LazyModuleMixin) and m.has_uninitialized_params()
    std = None
    if dim == 2 and not transposed and "StdConv" in name and isinstance(getattr(m, "eps", None), float):
        std = "scaled" if isinstance(getattr(m, "gain", None), Tensor) and hasattr(m, "scale") else "std"
    same_flag = getattr(m, "same_pad", None)
    if isinstance(same_flag, bool):
        same = same_flag
    else:   # timm's Conv2dSame (and pwsconv's): padding 0 in the module, computed from the input in forward
        same = dim == 2 and not transposed and name.endswith("Same") and all(p == 0 for p in _pad_tuple(m))
    own_forward = cls.forward is not base.forward and not isinstance(m, LazyModuleMixin)
    custom = own_forward and std is None and not name.endswith("Same")
    return ConvInfo(base, dim, transposed, same, std, lazy, custom)


def _pad_tuple(m: nn.Module) -> tuple:
    p = m.padding
    return p if isinstance(p, tuple) else (p,) if not isinstance(p, str) else (1,)


def effective_weight(conv: nn.Module, info: ConvInfo) -> Tensor:
    """The weight ``conv`` actually convolves with (weight-standardized convs standardize theirs in forward)."""
    w = conv.weight
    if info.std is None:
        return w.detach().clone()
    out = w.shape[0]
    scale = (conv.gain * conv.scale).reshape(-1) if info.std == "scaled" else None
    return F.batch_norm(w.detach().reshape(1, out, -1), None, None, weight=None if scale is None else scale.detach(),
                        training=True, momentum=0.0, eps=conv.eps).reshape_as(w)


def fold_bn(weight: Tensor, bias: Tensor | None, bn: nn.Module, *, transposed: bool = False,
            linear: bool = False) -> tuple[Tensor, Tensor] | None:
    """``weight``/``bias`` of the layer that computes layer → ``bn`` (eval statistics), with torch's fusion
    utilities; ``None`` when ``bn`` has no running statistics."""
    st = bn_stats(bn)
    if st is None:
        return None
    rm, rv, eps, bw, bb = st
    bw = torch.ones_like(rm) if bw is None else bw.detach()
    bb = torch.zeros_like(rm) if bb is None else bb.detach()
    rm, rv = rm.to(weight.dtype), rv.to(weight.dtype)
    if linear:
        b = torch.zeros_like(rm) if bias is None else bias
        w, b = fuse_linear_bn_weights(weight, b, rm, rv, eps, bw.to(weight.dtype), bb.to(weight.dtype))
    else:
        w, b = fuse_conv_bn_weights(weight, bias, rm, rv, eps, bw.to(weight.dtype), bb.to(weight.dtype),
                                    transpose=transposed)
    return w.detach(), b.detach()


@torch.no_grad()
def init_from(new: nn.Module, raw: Tensor, eff: Tensor, bias: Tensor | None) -> None:
    """Initialize ``new`` so that it computes (as nearly as it can) the layer whose effective weight is ``eff`` and
    bias ``bias``; ``raw`` is the raw weight the original layer stored.

    A PWS layer keeps ``raw`` and fits α per filter by least squares, α_o = ⟨eff_o, Ŵ_o⟩ / ⟨Ŵ_o, Ŵ_o⟩ with Ŵ the
    standardized raw weight: for eff = s·W (a folded BN scale s) that is α_o = s_o·sqrt(Var[W_o] + γ)/gain, and
    α_o·Ŵ_o = eff_o − E[eff_o] — exact but for the filter mean that PWS removes. Any other layer gets ``eff``
    itself as its weight (plain convs: exact)."""
    if hasattr(new, "alpha") and hasattr(new, "compute_weight") and hasattr(new, "_layout"):
        new.weight.copy_(raw)
        if new.alpha is not None:
            new.alpha.fill_(1.0)
            s = new.compute_weight().double()
            view, reduce, _ = new._layout()
            e = eff.double()
            if view is not None:
                s, e = s.reshape(view), e.reshape(view)
            num, den = (s * e).sum(reduce), (s * s).sum(reduce)
            a = torch.where(den > 0, num / den.clamp_min(1e-300), torch.ones_like(num))
            new.alpha.copy_(a.reshape(-1).to(new.alpha.dtype))
        clear_cache(new)
    else:
        new.weight.copy_(eff)
    if getattr(new, "bias", None) is not None:
        if bias is None:
            new.bias.zero_()
        else:
            new.bias.copy_(bias)

