"""What :func:`pwsconv.convert` recognizes, by what a layer *is* (its base classes and attributes), not by an exact-type
table: BatchNorm-like layers (torch's BatchNorm1d/2d/3d, SyncBatchNorm and lazy BN, torchvision's and timm's
FrozenBatchNorm2d, timm's BatchNormAct2d / SyncBatchNormAct / FrozenBatchNormAct2d with their drop path and activation)
and convolutions (every ``nn.Conv*d`` / ``nn.ConvTranspose*d`` subclass: plain ones, dynamically "SAME"-padded ones,
weight-standardized ones such as timm's ``StdConv2d`` / ``ScaledStdConv2d``). What carries a pretrained conv+BN
unit over to its replacement with ``copy_weights=True`` is in :mod:`pwsconv.calibration`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.modules.lazy import LazyModuleMixin

__all__ = ["BNInfo", "ConvInfo", "bn_info", "bn_stats", "conv_info", "with_drop_act"]

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
