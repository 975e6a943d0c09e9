"""Building blocks shared by the model zoo: the method-agnostic conv+norm(+ReLU) unit and size-safe pooling.

Every conv of a conv+norm unit is made by :func:`pwsconv.methods.build_conv` and its output normalization by
:func:`pwsconv.methods.build_norm`, selected by the method's name, so each model works with every registered method
(including methods registered after this module was imported).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..methods import Method, build_conv, build_norm, get_method

__all__ = [
    "MethodSpec",
    "ConvUnit",
    "SafeMaxPool2d",
    "PadToMin",
    "LayerNorm2d",
    "init_classifier",
    "scaled",
]


class MethodSpec:
    """A normalization method with its options, split between the conv factory and the norm factory.

    ``spec.conv(64, 128, 3, stride=2, padding=1)`` and ``spec.norm(128)`` build the two halves of a unit. Unknown
    options raise ``ValueError`` naming the options the method accepts.
    """

    def __init__(self, method: str | Method | "MethodSpec" = "pws", opts: Mapping[str, Any] | None = None) -> None:
        if isinstance(method, MethodSpec):
            opts = {**method.opts, **(opts or {})}
            method = method.method
        self.method: Method = get_method(method)
        self.opts: dict[str, Any] = dict(opts or {})
        # validated here, each option to the factory the method declares it for (gn's "groups" to the GroupNorm)
        self.conv_opts, self.norm_opts = self.method.split_options(self.opts)

    @property
    def name(self) -> str:
        return self.method.name

    def conv(self, in_ch: int, out_ch: int, k: int, stride: int = 1, padding: int = 0, *, groups: int = 1,
             bias: bool | None = None) -> nn.Module:
        return build_conv(self.method, 2, in_ch, out_ch, k, stride=stride, padding=padding, groups=groups, bias=bias,
                          **self.conv_opts)

    def norm(self, channels: int) -> nn.Module:
        return build_norm(self.method, channels, 2, **self.norm_opts)

    def __repr__(self) -> str:
        return f"MethodSpec({self.name!r}, {self.opts!r})"


class ConvUnit(nn.Module):
    """conv → method norm → (ReLU): one conv+norm unit of the paper's networks.

    With method "bn" this is the usual Conv-BN-ReLU; with "pws" the norm is Identity and the conv standardizes its
    filters (eq. 12); with "none" it is a plain He-initialized conv with bias.
    """

    def __init__(self, spec: MethodSpec, in_ch: int, out_ch: int, k: int = 3, stride: int = 1,
                 padding: int | None = None, *, act: bool = True) -> None:
        super().__init__()
        self.conv = spec.conv(in_ch, out_ch, k, stride, k // 2 if padding is None else padding)
        self.norm = spec.norm(out_ch)
        self.act: nn.Module = nn.ReLU(inplace=True) if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))


class LayerNorm2d(nn.GroupNorm):
    """LayerNorm over (C, H, W) per sample = ``GroupNorm(1, C)`` (what the authors call LN/GN(1))."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__(1, channels, eps=eps)


class SafeMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that passes its input through unchanged when the (padded) map is smaller than the kernel.

    Lets the CIFAR/ImageNet networks run on tiny inputs (8×8 digits) without a pooling layer shrinking a map below
    one pixel; at the intended input sizes it is exactly ``nn.MaxPool2d``.
    """

    def forward(self, x: Tensor) -> Tensor:
        k = self.kernel_size if isinstance(self.kernel_size, tuple) else (self.kernel_size,) * 2
        p = self.padding if isinstance(self.padding, tuple) else (self.padding,) * 2
        if x.shape[-2] + 2 * p[0] < k[0] or x.shape[-1] + 2 * p[1] < k[1]:
            return x
        return super().forward(x)


class PadToMin(nn.Module):
    """Zero-pad the spatial dims symmetrically up to at least ``size`` (identity for maps already that large).

    Used before an unpadded ("valid") conv so that small inputs still give a ≥1-pixel output.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = int(size)

    def forward(self, x: Tensor) -> Tensor:
        dh, dw = max(0, self.size - x.shape[-2]), max(0, self.size - x.shape[-1])
        if dh == 0 and dw == 0:
            return x
        return F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))

    def extra_repr(self) -> str:
        return f"size={self.size}"


def init_classifier(fc: nn.Linear, std: float = 0.01) -> nn.Linear:
    """The authors' classifier init: weight ~ N(0, std²), bias 0."""
    nn.init.normal_(fc.weight, 0.0, std)
    if fc.bias is not None:
        nn.init.zeros_(fc.bias)
    return fc


def scaled(channels: int, width: float, minimum: int = 1) -> int:
    """``round(channels × width)``, at least ``minimum``."""
    if width <= 0:
        raise ValueError(f"width multiplier must be positive, got {width!r}")
    return max(minimum, int(round(channels * width)))


def global_pool(x: Tensor) -> Tensor:
    """Global average pooling to ``[N, C]``."""
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
