"""TensorFlow-style dynamic "SAME" padding for 2-d convolutions (timm's ``Conv2dSame`` / ``*StdConv2dSame`` with
``same_pad=True``): the input is padded, depending on its size, so that the output has ceil(input / stride) pixels,
the extra pixel going to the bottom/right. :func:`pwsconv.convert` turns such convs into the method's conv with that
padding (:class:`PWSConv2dSame` for PWS; :func:`same_padded` makes the class for any other conv class), and
:func:`pwsconv.fold` turns those into :class:`Conv2dSame` (an ``nn.Conv2d`` whose forward pads first).
"""

from __future__ import annotations

import math
import sys
from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .pws import PWSConv2d

__all__ = ["pad_same", "Conv2dSame", "PWSConv2dSame", "same_padded"]


def _same(size: int, k: int, s: int, d: int) -> int:
    return max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)


def pad_same(x: Tensor, kernel_size: Sequence[int], stride: Sequence[int], dilation: Sequence[int]) -> Tensor:
    """Pad ``x`` (N, C, H, W) for a TF "SAME" convolution: half of the padding before, the rest after."""
    ih, iw = x.shape[-2:]
    ph = _same(int(ih), kernel_size[0], stride[0], dilation[0])
    pw = _same(int(iw), kernel_size[1], stride[1], dilation[1])
    if ph or pw:
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
    return x


class SamePadMixin:
    """Pads the input for TF "SAME" before the conv's own forward; folds to :class:`Conv2dSame`."""

    kernel_size: tuple
    stride: tuple
    dilation: tuple

    def forward(self, input: Tensor) -> Tensor:
        return super().forward(pad_same(input, self.kernel_size, self.stride, self.dilation))  # type: ignore[misc]

    def to_plain(self) -> nn.Module:
        plain = super().to_plain()  # type: ignore[misc]
        if type(plain) is nn.Conv2d:
            plain.__class__ = Conv2dSame
        return plain


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with TF "SAME" padding computed from the input size (``padding`` must be 0)."""

    def forward(self, input: Tensor) -> Tensor:
        return super().forward(pad_same(input, self.kernel_size, self.stride, self.dilation))


class PWSConv2dSame(SamePadMixin, PWSConv2d):
    """:class:`pwsconv.PWSConv2d` with TF "SAME" padding computed from the input size; folds to :class:`Conv2dSame`."""


_SAME: dict[type, type] = {nn.Conv2d: Conv2dSame, PWSConv2d: PWSConv2dSame}


def same_padded(cls: type[nn.Module]) -> type[nn.Module]:
    """The "SAME"-padded version of the 2-d conv class ``cls`` (made once, named ``<cls>Same`` in this module so that
    pickling finds it)."""
    if cls in _SAME or cls in _SAME.values():
        return _SAME.get(cls, cls)
    name = f"{cls.__name__}Same"
    new = type(name, (SamePadMixin, cls), {"__module__": __name__, "__qualname__": name,
                                           "__doc__": f"{cls.__name__} with TF 'SAME' padding from the input size."})
    setattr(sys.modules[__name__], name, new)
    _SAME[cls] = new
    return new


def __getattr__(name: str) -> type[nn.Module]:
    """``pwsconv.layers.same.<Class>Same`` for any conv class of pwsconv or torch, made on first use: a pickled model
    holding one unpickles in a fresh process."""
    if name.endswith("Same") and not name.startswith("_"):
        from . import mabn, pws, wn, ws

        base = name[: -len("Same")]
        for mod in (pws, ws, wn, mabn, nn):
            cls = getattr(mod, base, None)
            if isinstance(cls, type) and issubclass(cls, nn.Conv2d):
                return same_padded(cls)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
