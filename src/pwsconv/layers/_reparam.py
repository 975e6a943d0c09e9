"""Shared machinery of the zoo's weight-reparameterized layers (WN, WS, scaled WS, weight centralization).

A reparameterized layer subclasses a torch layer (``nn.Conv1d/2d/3d`` or ``nn.Linear``), keeps its constructor and
its ``weight`` / ``bias`` state_dict keys, and computes the weight it convolves with from the raw ``weight`` on every
forward (:meth:`WeightReparamMixin.reparam_weight`). ``to_plain()`` returns the parent torch layer holding that weight
(what :func:`pwsconv.fold` uses). The raw weights get the paper's He init (kaiming normal, fan_in, ReLU), biases 0.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional import he_std

__all__ = ["WeightReparamMixin", "ReparamConvNd", "ReparamLinear", "filter_dims", "LOW_PRECISION"]

from ..functional import _LOW_PRECISION as LOW_PRECISION   # one definition (functional.py)


def filter_dims(weight: Tensor) -> tuple[int, ...]:
    """The dims that make one filter of a conv/linear weight (all but the output dim 0)."""
    return tuple(range(1, weight.dim()))


class WeightReparamMixin:
    """Base of the reparameterized layers: subclasses implement :meth:`reparam_weight` and ``_reset_extra``."""

    weight: Tensor
    bias: Tensor | None
    _plain_cls: type[nn.Module]
    _zoo_ready: bool = False

    # ------------------------------------------------------------------ to be provided by the concrete layer
    def reparam_weight(self) -> Tensor:  # pragma: no cover - abstract
        """The weight the layer actually applies (differentiable w.r.t. the raw parameters)."""
        raise NotImplementedError

    def _reset_extra(self) -> None:
        """Reset the layer's own parameters (gains, ...) after the raw weights were re-initialized."""

    # ------------------------------------------------------------------ geometry and init
    @property
    def filter_size(self) -> int:
        """n_l: the number of weights in one filter (in_channels/groups × kernel elements; in_features for linear)."""
        return math.prod(self.weight.shape[1:])

    def _finish_setup(self) -> None:
        self._zoo_ready = True
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if not self._zoo_ready:
            return  # called by the torch parent's __init__ before the subclass attributes exist
        with torch.no_grad():
            self.weight.normal_(0.0, he_std(self.filter_size))  # He init (the paper's "Experiments")
            if self.bias is not None:
                self.bias.zero_()
        self._reset_extra()

    def _require_filter_of(self, n_min: int, what: str) -> None:
        if self.filter_size < n_min:
            raise ValueError(
                f"{type(self).__name__}: a filter has {self.filter_size} element(s); {what} "
                f"(needs in_channels/groups × kernel elements ≥ {n_min}; leave such layers as plain layers)"
            )

    # ------------------------------------------------------------------ forward / folding
    def forward(self, x: Tensor) -> Tensor:
        return self._forward_with(x, self.reparam_weight(), self.bias)

    def _forward_with(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def _plain_kwargs(self) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    def to_plain(self) -> nn.Module:
        """The parent torch layer holding the reparameterized weight and the bias: same function, no pwsconv class."""
        plain = torch.nn.utils.skip_init(
            self._plain_cls, **self._plain_kwargs(), device=self.weight.device, dtype=self.weight.dtype
        )
        with torch.no_grad():
            plain.weight.copy_(self.reparam_weight())
            if self.bias is not None:
                plain.bias.copy_(self.bias)
        plain.train(self.training)  # type: ignore[attr-defined]
        return plain


class ReparamConvNd(WeightReparamMixin):
    """Mixin for ``nn.ConvNd`` subclasses: conv forward with the reparameterized weight and conv folding."""

    def _forward_with(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return self._conv_forward(x, weight, bias)  # type: ignore[attr-defined]

    def _plain_kwargs(self) -> dict[str, Any]:
        return dict(
            in_channels=self.in_channels, out_channels=self.out_channels,  # type: ignore[attr-defined]
            kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,  # type: ignore[attr-defined]
            dilation=self.dilation, groups=self.groups, bias=self.bias is not None,  # type: ignore[attr-defined]
            padding_mode=self.padding_mode,  # type: ignore[attr-defined]
        )


class ReparamLinear(WeightReparamMixin):
    """Mixin for ``nn.Linear`` subclasses."""

    def _forward_with(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    def _plain_kwargs(self) -> dict[str, Any]:
        return dict(in_features=self.in_features, out_features=self.out_features,  # type: ignore[attr-defined]
                    bias=self.bias is not None)
