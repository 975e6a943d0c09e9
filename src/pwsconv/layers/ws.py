"""Weight Standardization (Qiao et al. 2019) and scaled Weight Standardization (NF-Nets, Brock et al. 2021).

Both are per-filter standardizations of the kernel and reuse :func:`pwsconv.functional.pws_weight` (eq. 12 of the
paper with other constants) instead of a second copy of that math:

* WS:  Ŵ = (W − μ)/sqrt(Var + ε)            = ``pws_weight(W, ε, gain=1)``  (biased variance, ε inside the root,
  as timm and the PWS code). ``original_std=True`` gives the original code's (W − μ)/(std_unbiased + ε) (ε outside
  the root; users of that code report NaNs when a filter's std collapses). WS is paired with GroupNorm.
* SWS: Ŵ = gain · γ_act · (W − μ)/sqrt(n·Var + ε) = ``pws_weight(W, ε/n, gain, gain=γ_act/sqrt(n))`` with n the
  fan-in and a trainable per-filter ``gain`` (init 1, exempt from weight decay). With γ_act = sqrt(2) (ReLU) this is
  PWS with a tiny γ. ``floor=True`` uses DeepMind's max(n·Var, ε) instead of n·Var + ε (ε = 1e-4 by default).

All layers subclass the torch layer (same constructor, ``weight``/``bias`` keys) and fold with ``to_plain()``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..functional import pws_weight
from ._reparam import LOW_PRECISION, ReparamMixin, ReparamLinear, filter_dims, setting

__all__ = [
    "ws_weight",
    "scaled_ws_weight",
    "WSConv1d",
    "WSConv2d",
    "WSConv3d",
    "SWSConv1d",
    "SWSConv2d",
    "SWSConv3d",
    "SWSLinear",
]


def ws_weight(weight: Tensor, eps: float = 1e-5, *, original_std: bool = False) -> Tensor:
    """Weight Standardization per filter ``weight[o]``: (W − μ)/sqrt(Var + eps) (biased Var, eps inside the root).

    ``original_std=True``: the original (Qiao et al.) code's (W − μ)/(unbiased std + eps), eps outside the root.
    """
    if not original_std:
        return pws_weight(weight, eps, None, reduce_dims=filter_dims(weight), gain=1.0)
    w = weight.float() if weight.dtype in LOW_PRECISION else weight
    std, mean = torch.std_mean(w, dim=filter_dims(w), correction=1, keepdim=True)
    return ((w - mean) / (std + eps)).to(weight.dtype)


def scaled_ws_weight(weight: Tensor, gain: Tensor | None, gamma_act: float = math.sqrt(2.0), eps: float = 1e-4,
                     *, floor: bool = False) -> Tensor:
    """Scaled WS (NF-Nets): gain · γ_act · (W − μ)/sqrt(n·Var + eps) per filter, n = fan-in (filter size).

    ``floor=True``: gain · γ_act · (W − μ)/sqrt(max(n·Var, eps)) (DeepMind's form). ``gain``: one value per filter or
    ``None``.
    """
    dims = filter_dims(weight)
    n = math.prod(weight.shape[1:])
    g = None if gain is None else gain.reshape((-1,) + (1,) * len(dims))
    if not floor:
        return pws_weight(weight, eps / n, g, reduce_dims=dims, gain=gamma_act / math.sqrt(n))
    w = weight.float() if weight.dtype in LOW_PRECISION else weight
    var, mean = torch.var_mean(w, dim=dims, correction=0, keepdim=True)
    scale = torch.rsqrt(torch.clamp_min(var * n, eps)) * gamma_act
    if g is not None:
        scale = scale * g.to(scale.dtype)
    return ((w - mean) * scale).to(weight.dtype)


def _check_eps(eps: float, name: str) -> float:
    e = float(eps)
    if not math.isfinite(e) or e < 0:
        raise ValueError(f"{name}: eps must be a finite number ≥ 0, got {eps!r}")
    return e


def _check_gamma_act(value: float, name: str) -> float:
    ga = float(value)
    if not math.isfinite(ga) or ga <= 0:
        raise ValueError(f"{name}: gamma_act must be a finite number > 0, got {value!r}")
    return ga


# --------------------------------------------------------------------------------------------------------- WS
class _WSConvNd(ReparamMixin):
    eps = setting("_eps", lambda v: _check_eps(v, "WSConv"), "ε inside the root (validated on assignment).")
    original_std = setting("_original_std", bool, "The original code's (W − μ)/(std_unbiased + ε).")

    def __init__(self, *args, eps: float = 1e-5, original_std: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eps, self.original_std = _check_eps(eps, type(self).__name__), original_std
        self._require_filter_of(2, "standardizing a single weight gives 0")
        self._finish_setup()

    def compute_weight(self) -> Tensor:
        """(W − μ)/sqrt(Var + ε) per filter (or the original's (W − μ)/(std_unbiased + ε))."""
        return ws_weight(self.weight, self.eps, original_std=self.original_std)

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", eps={self.eps:g}"  # type: ignore[misc]
        return s + (", original_std=True" if self.original_std else "")


_WS_DOC = ("Drop-in ``nn.Conv{d}d`` with Weight Standardization (Qiao et al. 2019); keywords ``eps=1e-5`` (inside the "
           "root, biased variance) and ``original_std=False`` (True: unbiased std, eps outside the root). "
           "Use with GroupNorm after it.")


class WSConv1d(_WSConvNd, nn.Conv1d):
    __doc__ = _WS_DOC.format(d=1)
    _plain_cls = nn.Conv1d


class WSConv2d(_WSConvNd, nn.Conv2d):
    __doc__ = _WS_DOC.format(d=2)
    _plain_cls = nn.Conv2d


class WSConv3d(_WSConvNd, nn.Conv3d):
    __doc__ = _WS_DOC.format(d=3)
    _plain_cls = nn.Conv3d


# --------------------------------------------------------------------------------------------------------- scaled WS
class _SWSMixin:
    #: read by :func:`pwsconv.param_groups`: the per-filter gain gets no weight decay (as NF-Nets)
    no_weight_decay_params = ("gain",)
    weight_params = ("weight", "gain")
    gain: nn.Parameter | None
    gamma_act = setting("_gamma_act", lambda v: _check_gamma_act(v, "SWS"),
                        "γ_act, the activation's gain (sqrt(2) for ReLU; validated on assignment).")
    eps = setting("_eps", lambda v: _check_eps(v, "SWS"), "ε of sqrt(n·Var + ε) (validated on assignment).")
    floor = setting("_floor", bool, "DeepMind's sqrt(max(n·Var, ε)) instead of sqrt(n·Var + ε).")

    def _sws_setup(self, gamma_act: float, eps: float, floor: bool, use_gain: bool) -> None:
        name = type(self).__name__
        self.gamma_act = _check_gamma_act(gamma_act, name)
        self.eps = _check_eps(eps, name)
        self.floor = bool(floor)
        if self.floor and self.eps <= 0:
            raise ValueError(f"{name}: floor=True needs eps > 0 (the floor of fan_in·Var)")
        self._require_filter_of(2, "standardizing a single weight gives 0")  # type: ignore[attr-defined]
        w = self.weight  # type: ignore[attr-defined]
        if use_gain:
            self.gain = nn.Parameter(torch.ones(w.shape[0], device=w.device, dtype=w.dtype))
        else:
            self.register_parameter("gain", None)  # type: ignore[attr-defined]
        self._finish_setup()  # type: ignore[attr-defined]

    def _reset_extra(self) -> None:
        if self.gain is not None:
            with torch.no_grad():
                self.gain.fill_(1.0)

    def compute_weight(self) -> Tensor:
        """gain · γ_act · (W − μ)/sqrt(n·Var + ε) per filter (sqrt(max(n·Var, ε)) with ``floor``)."""
        return scaled_ws_weight(self.weight, self.gain, self.gamma_act, self.eps,  # type: ignore[attr-defined]
                                floor=self.floor)

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", gamma_act={self.gamma_act:.4g}, eps={self.eps:g}"  # type: ignore[misc]
        if self.floor:
            s += ", floor=True"
        if self.gain is None:
            s += ", use_gain=False"
        return s


class _SWSConvNd(_SWSMixin, ReparamMixin):
    def __init__(self, *args, gamma_act: float = math.sqrt(2.0), eps: float = 1e-4, floor: bool = False,
                 use_gain: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._sws_setup(gamma_act, eps, floor, use_gain)


_SWS_DOC = ("Drop-in ``nn.Conv{d}d`` with scaled Weight Standardization (NF-Nets): gain·γ_act·(W−μ)/sqrt(n·Var+ε); "
            "keywords ``gamma_act=sqrt(2)``, ``eps=1e-4``, ``floor=False`` (True: sqrt(max(n·Var, ε))), "
            "``use_gain=True``.")


class SWSConv1d(_SWSConvNd, nn.Conv1d):
    __doc__ = _SWS_DOC.format(d=1)
    _plain_cls = nn.Conv1d


class SWSConv2d(_SWSConvNd, nn.Conv2d):
    __doc__ = _SWS_DOC.format(d=2)
    _plain_cls = nn.Conv2d


class SWSConv3d(_SWSConvNd, nn.Conv3d):
    __doc__ = _SWS_DOC.format(d=3)
    _plain_cls = nn.Conv3d


class SWSLinear(_SWSMixin, ReparamLinear, nn.Linear):
    """Drop-in ``nn.Linear`` with scaled WS per output unit (same keywords as :class:`SWSConv2d`)."""

    _plain_cls = nn.Linear

    def __init__(self, *args, gamma_act: float = math.sqrt(2.0), eps: float = 1e-4, floor: bool = False,
                 use_gain: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._sws_setup(gamma_act, eps, floor, use_gain)
