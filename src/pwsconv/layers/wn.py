"""Weight Normalization (Salimans & Kingma 2016) as the paper uses it: Ŵ_o = g_o · W_o / ‖W_o‖ per filter.

The paper (section "WN's Effect on Variance Transmission", eqs. 9-11) sets g to **1** instead of the data-dependent
initialization, which it found necessary to train at a large LR; ``data_init=True`` gives the data-dependent
initialization of Salimans & Kingma instead: on the first training forward, g ← 1/σ[t] and b ← −μ[t]/σ[t] with t the
output of the conv with W/‖W‖ (μ, σ per output channel over the batch, biased variance + 1e-10 as in their code).

The layers subclass ``nn.Conv1d/2d/3d`` / ``nn.Linear`` (same constructor, ``weight`` = the direction V, ``bias``) and
add ``g`` (one per filter). The conv has a bias (the paper's WN networks have no output norm). ``to_plain()`` folds.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._reparam import LOW_PRECISION, ReparamMixin, ReparamLinear, filter_dims

__all__ = ["wn_weight", "WNConv1d", "WNConv2d", "WNConv3d", "WNLinear"]


def wn_weight(weight: Tensor, g: Tensor) -> Tensor:
    """g_o · W_o / ‖W_o‖ for every filter o = ``weight[o]`` (‖·‖ the Frobenius norm; ``g`` has one value per filter).

    The norm is computed in float32 for float16/bfloat16 weights; the result has ``weight``'s dtype.
    """
    w = weight.float() if weight.dtype in LOW_PRECISION else weight
    norm = torch.linalg.vector_norm(w, dim=filter_dims(w), keepdim=True)
    scale = g.to(w.dtype).reshape(norm.shape) / norm
    return (w * scale).to(weight.dtype)


class _WNMixin:
    g: nn.Parameter
    data_init: bool
    weight_params = ("weight", "g")

    def _wn_setup(self, data_init: bool) -> None:
        w = self.weight  # type: ignore[attr-defined]
        self.g = nn.Parameter(torch.ones(w.shape[0], device=w.device, dtype=w.dtype))
        self.data_init = self._data_init = bool(data_init)
        if self.data_init:
            self.register_buffer(  # type: ignore[attr-defined]
                "initialized", torch.zeros((), dtype=torch.bool, device=w.device))
        self._finish_setup()  # type: ignore[attr-defined]

    def _reset_extra(self) -> None:
        with torch.no_grad():
            self.g.fill_(1.0)  # the paper's g = 1
            if self.data_init:
                self.initialized.fill_(False)

    def compute_weight(self) -> Tensor:
        """Ŵ = g · W / ‖W‖ per filter."""
        return wn_weight(self.weight, self.g)  # type: ignore[attr-defined]

    def _channel_dims(self, t: Tensor) -> tuple[int, ...]:
        raise NotImplementedError  # pragma: no cover - abstract: the conv and linear classes below

    def _maybe_data_init(self, x: Tensor) -> None:
        if not self.training or bool(self.initialized):
            return
        with torch.no_grad():
            self.g.fill_(1.0)
            t = self._forward_with(x, self.compute_weight(), None)  # type: ignore[attr-defined]
            tc = t.float() if t.dtype in LOW_PRECISION else t
            var, mean = torch.var_mean(tc, dim=self._channel_dims(t), correction=0)
            scale = 1.0 / torch.sqrt(var + 1e-10)
            self.g.copy_(scale.to(self.g.dtype))
            if self.bias is not None:  # type: ignore[attr-defined]
                self.bias.copy_((-mean * scale).to(self.bias.dtype))  # type: ignore[attr-defined]
            self.initialized.fill_(True)

    def extra_repr(self) -> str:
        s = super().extra_repr()  # type: ignore[misc]
        return s + (", data_init=True" if self.data_init else "")


class _WNConvNd(_WNMixin, ReparamMixin):
    def __init__(self, *args, data_init: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._wn_setup(data_init)

    def _channel_dims(self, t: Tensor) -> tuple[int, ...]:
        return (0,) + tuple(range(2, t.dim()))


_DOC = ("Drop-in ``nn.Conv{d}d`` with Weight Normalization, Ŵ_o = g_o·W_o/‖W_o‖ (g init 1, as the paper); "
        "extra keyword ``data_init=False`` (Salimans & Kingma's data-dependent init of g and the bias).")


class WNConv1d(_WNConvNd, nn.Conv1d):
    __doc__ = _DOC.format(d=1)
    _plain_cls = nn.Conv1d


class WNConv2d(_WNConvNd, nn.Conv2d):
    __doc__ = _DOC.format(d=2)
    _plain_cls = nn.Conv2d


class WNConv3d(_WNConvNd, nn.Conv3d):
    __doc__ = _DOC.format(d=3)
    _plain_cls = nn.Conv3d


class WNLinear(_WNMixin, ReparamLinear, nn.Linear):
    """Drop-in ``nn.Linear`` with Weight Normalization per output unit (g init 1); keyword ``data_init=False``."""

    _plain_cls = nn.Linear

    def __init__(self, *args, data_init: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._wn_setup(data_init)

    def _channel_dims(self, t: Tensor) -> tuple[int, ...]:
        return tuple(range(t.dim() - 1))
