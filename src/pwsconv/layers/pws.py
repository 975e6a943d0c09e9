"""The PWS layer family (eq. 12): thin subclasses of torch layers with a trainable per-filter α.

    Ŵ_o = sqrt(2/n_l) · (W_o − E[W_o]) / sqrt(Var[W_o] + γ),        Y_o = α_o · (X ⊛ Ŵ_o) + β_o

Each class keeps its torch parent's constructor and ``weight`` / ``bias`` state_dict keys and adds ``alpha``. A forward
is :meth:`PWSMixin.compute_weight` (eq. 12, :func:`pwsconv.functional.pws_weight`), then the parent's conv; fusion
and the eval cache are installed from outside (:func:`pwsconv.fuse_standardization`, :func:`pwsconv.cached`) and
serve the same values. ``layer.to_plain()`` is the parent torch layer holding α·Ŵ and the bias (exact folding)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional as _F   # CLIP_BIAS_FLOOR read at the call
from ..functional import check_clip, check_gamma, he_std, pws_weight, unit_clip
from ._auto import (AutoGammaMixin, auto_clips_of, auto_gamma_of, link_live_group, link_optimizer_group,
                    register_auto_gamma, reset_auto_gamma)
from ._reparam import ReparamLinear, ReparamMixin, check_layer_args, setting

__all__ = ["PWSMixin", "PWSConv1d", "PWSConv2d", "PWSConv3d", "PWSConvTranspose1d", "PWSConvTranspose2d",
           "PWSConvTranspose3d", "PWSLinear", "FAN_MODES"]

FAN_MODES = ("fan_in", "fan_out")
_FUSE_DTYPES = (torch.float32, torch.float64)


def _fan_mode(value: str) -> str:
    if value in FAN_MODES:
        return value
    raise ValueError(f"fan_mode must be one of {FAN_MODES}, got {value!r}")


class PWSMixin(AutoGammaMixin, ReparamMixin):
    """Eq. 12 on a torch layer: α, γ, the ablation switches and ``gamma="auto"``.

    Constructor switches (paper defaults first):
        gamma (1e-3): γ of eq. 12, > 0; or ``"auto"``: γ·2/n_l (relative; chosen from the LR, in the state_dict) and
            clipped gradients (``clip``, ``clip_w``); the forward stays eq. 12 (batch-independent, foldable).
        clip, clip_w (None): unit-wise gradient clipping λ (AGC) of α, β and of W's filters (``clips()``); None:
            under "auto" from the optimizer's LR (:mod:`pwsconv.layers._auto`), else off (λ_W: ``clip``); 0: off.
        use_alpha (True): trainable per-filter α (Table 2 "Trainable α").
        use_gain (True): the sqrt(2/n_l) factor of eq. 12 (Table 2 "sqrt(2/n_l) in (12)").
        fan_mode ("fan_in"): n used by sqrt(2/n) and by the He init of the raw weights; "fan_in" is the paper's n_l.
        equiv (False): the authors' option γ → 2γ/n, i.e. Ŵ = (W − μ)/sqrt(n·Var/2 + γ); not with "auto".
        data_init_alpha (False): the authors' "initalpha": on the first training forward α ← sqrt(2 / Var(Y)).
    """

    alpha: nn.Parameter | None
    weight_params = ("weight", "alpha")

    def _pws_setup(self, gamma: float | str = 1e-3, use_alpha: bool = True, use_gain: bool = True,
                   fan_mode: str = "fan_in", equiv: bool = False, data_init_alpha: bool = False,
                   clip: float | None = None, clip_w: float | None = None) -> None:
        if equiv and gamma == "auto":   # auto's γ is relative already (2γ/n): equiv would silently do nothing
            raise ValueError('equiv=True has no effect with gamma="auto" (its γ is already 2γ/n); leave one out')
        self.fan_mode, self.gamma, self.clip, self.use_gain, self.equiv, self.clip_w = (fan_mode, gamma, clip,
                                                                                        use_gain, equiv, clip_w)
        self._data_init = self.data_init_alpha = bool(data_init_alpha)
        self._require_filter_of(2, "standardizing a single weight gives 0")
        w = self.weight
        out = w.shape[1] * self.groups if self._transposed_layout else w.shape[0]
        self.register_parameter("alpha", nn.Parameter(torch.ones(out, device=w.device, dtype=w.dtype))
                                if use_alpha else None)
        if data_init_alpha:
            self.register_buffer("alpha_initialized", torch.zeros((), dtype=torch.bool, device=w.device))
        self._finish_setup()

    # the settings compute_weight reads: assigning one validates it (and bumps _settings_version)
    gamma = setting("_gamma", lambda v: v if isinstance(v, str) and v == "auto" else check_gamma(v),
                    'γ of eq. 12 (validated on assignment), or "auto" (γ\'s buffer added).', register_auto_gamma)
    clip = setting("_clip", check_clip, "Gradient clipping λ of α and β (None: the default rule).")
    clip_w = setting("_clip_w", check_clip, "Gradient clipping λ of W's filters (None: the default rule).")
    use_gain = setting("_use_gain", bool, "Whether eq. 12's sqrt(2/n_l) factor is applied.")
    fan_mode = setting("_fan_mode", _fan_mode, '"fan_in" (the paper\'s n_l) or "fan_out": the n of sqrt(2/n).')
    equiv = setting("_equiv", bool, 'The authors\' "equiv" option: γ → 2γ/n.')

    @property
    def fan(self) -> int:
        """The n of sqrt(2/n) and of the He init: ``filter_size`` for fan_in, out_channels/groups × kernel for fan_out."""
        if self._fan_mode == "fan_in":
            return self.filter_size
        w = self._raw_weight()
        out_per_group = w.shape[1] if self._transposed_layout else w.shape[0] // getattr(self, "groups", 1)
        return out_per_group * math.prod(w.shape[2:])

    def clips(self) -> tuple[float, float, float, bool]:
        """(λ_W, λ of α and β, β's floor (|∂L/∂β| ≤ λ·max(|β|, floor)), α and β per vector) in force (auto: _auto)."""
        a = auto_clips_of(self) if self._gamma == "auto" and self._clip is None else None
        lam = self._clip if self._clip is not None else (a[1] if a else 0.0)
        return (self._clip_w if self._clip_w is not None else (a[0] if a else lam)), lam, (
            a[2] if a else _F.CLIP_BIAS_FLOOR), bool(a and a[3])

    clip_w_lambda = property(lambda self: self.clips()[0], doc="λ of W's filters in force (0: no clipping)")
    clip_lambda = property(lambda self: self.clips()[1], doc="λ of α and β in force (0: no clipping)")
    clip_bias_floor = property(lambda self: self.clips()[2], doc="the floor of β's clipping bound in force")

    @property
    def effective_gamma(self) -> float:
        """γ as used inside the square root (2γ/n under ``equiv`` and for ``gamma="auto"``)."""
        auto = self._gamma == "auto"   # auto: relative, AUTO_GAMMA or AUTO_GAMMA_FREE chosen from the LR (_auto)
        return 2.0 * (auto_gamma_of(self) if auto else self._gamma) / self.fan if auto or self._equiv else self._gamma

    @property
    def gain(self) -> float:
        return he_std(self.fan) if self._use_gain else 1.0

    # ------------------------------------------------------------------ eq. 12
    def _layout(self) -> tuple[tuple[int, ...] | None, tuple[int, ...], tuple[int, ...]]:
        """(grouped view shape or None, filter dims to reduce, α broadcast shape)."""
        w = self.weight
        if not self._transposed_layout:
            return None, tuple(range(1, w.dim())), (w.shape[0],) + (1,) * (w.dim() - 1)
        g = self.groups
        view = (g, w.shape[0] // g) + tuple(w.shape[1:])  # [G, Cin/G, Cout/G, *k]
        return view, (1,) + tuple(range(3, len(view))), (g, 1, w.shape[1]) + (1,) * (w.dim() - 2)

    def compute_weight(self) -> Tensor:
        """α·Ŵ of eq. 12 (gradients of W and α clipped by ``clip_w_lambda`` / ``clip_lambda``; values unchanged)."""
        view, reduce, alpha_shape = self._layout()
        w = self.weight if view is None else self.weight.reshape(view)
        lam_w, lam, _, vec = self.backward_clips()
        w, alpha = unit_clip(w, lam_w, reduce), unit_clip(self.alpha, lam, vector=vec)   # λ = 0: as is
        alpha = None if alpha is None else alpha.view(alpha_shape)
        out = pws_weight(w, self.effective_gamma, alpha, reduce_dims=reduce, gain=self.gain)
        return out if view is None else out.reshape(self.weight.shape)

    def compute_bias(self) -> Tensor | None:
        """β, its gradient clipped by ``clip_lambda``."""
        p = self._parameters
        b = p["bias"] if "bias" in p else self.bias   # (ReparamMixin.compute_bias, inlined: once per forward)
        _, lam, floor, vec = self.backward_clips()
        return unit_clip(b, lam, floor=floor, vector=vec)   # b itself without λ

    def fused_args(self) -> tuple | None:
        """(W, α, γ, gain, clips(), β) for :func:`pwsconv.fuse_standardization`, or ``None`` where it cannot serve
        (transposed, low precision, strided, α data-init to run, lazy before its first input, parametrized)."""
        p = self._parameters
        if "weight" not in p or "alpha" not in p:
            return None
        w, a = p["weight"], p["alpha"]
        if self._transposed_layout or w.dtype not in _FUSE_DTYPES or w.is_inference() or not (w.is_contiguous() or (
                w.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last))) \
                or (a is not None and (a.dtype != w.dtype or not a.is_contiguous())) \
                or (self.data_init_alpha and a is not None and not bool(self.alpha_initialized)):
            return None
        return w, a, self.effective_gamma, self.gain, self.fused_clips(), p["bias"] if "bias" in p else self.bias

    # ------------------------------------------------------------------ init and loading
    def _reset_extra(self) -> None:
        reset_auto_gamma(self)   # gamma="auto": chosen again from the LR (_auto)
        with torch.no_grad():
            if self.alpha is not None:
                self.alpha.fill_(1.0)
            if self.data_init_alpha:
                self.alpha_initialized.fill_(False)

    def _maybe_data_init(self, x: Tensor) -> None:
        if not (self.training and self.alpha is not None) or bool(self.alpha_initialized):
            return
        with torch.no_grad():
            var = self._forward_with(x, self.compute_weight(), None).float().var()
            if torch.isfinite(var) and var > 0:
                self.alpha.mul_(torch.sqrt(2.0 / var).to(self.alpha.dtype))
            self.alpha_initialized.fill_(True)

    standardized_weight = ReparamMixin.reparam_weight   # α·Ŵ as the layer applies it (the name of earlier releases)
    link_optimizer_group, link_live_group = link_optimizer_group, link_live_group   # param_groups, link_optimizer

    def extra_repr(self) -> str:  # type: ignore[override]
        s = super().extra_repr()  # type: ignore[misc]
        s += ", gamma='auto'" if self._gamma == "auto" else f", gamma={self._gamma:g}"
        for on, text in ((self._clip is not None, f", clip={self._clip}"), (self._clip_w is not None,
                         f", clip_w={self._clip_w}"), (self.alpha is None, ", use_alpha=False"), (not self._use_gain,
                         ", use_gain=False"), (self._fan_mode != "fan_in", ", fan_mode='fan_out'"), (self._equiv,
                         ", equiv=True"), (self.data_init_alpha, ", data_init_alpha=True")):
            s += text if on else ""
        return s


_PWS_DOC = """\n    PWS extras (eq. 12): gamma=1e-3, use_alpha=True, use_gain=True, fan_mode="fan_in", equiv=False,
    data_init_alpha=False, clip=None, clip_w=None (see :class:`PWSMixin`).\n"""


class _PWSConvNd(PWSMixin):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                 stride: int | Sequence[int] = 1, padding: int | str | Sequence[int] = 0,
                 dilation: int | Sequence[int] = 1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device: Any = None, dtype: Any = None, *, gamma: float | str = 1e-3, use_alpha: bool = True,
                 use_gain: bool = True, fan_mode: str = "fan_in", equiv: bool = False, data_init_alpha: bool = False,
                 clip: float | None = None, clip_w: float | None = None) -> None:
        check_layer_args(type(self).__name__, dict(in_channels=in_channels, out_channels=out_channels,
                                                   kernel_size=kernel_size, groups=groups))
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,  # type: ignore
                         dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode, device=device,
                         dtype=dtype)
        self._pws_setup(gamma, use_alpha, use_gain, fan_mode, equiv, data_init_alpha, clip, clip_w)


class PWSConv1d(_PWSConvNd, nn.Conv1d):
    __doc__ = "Drop-in ``nn.Conv1d`` with Parametric Weights Standardization (eq. 12)." + _PWS_DOC
    _plain_cls = nn.Conv1d


class PWSConv2d(_PWSConvNd, nn.Conv2d):
    __doc__ = "Drop-in ``nn.Conv2d`` with Parametric Weights Standardization (eq. 12)." + _PWS_DOC
    _plain_cls = nn.Conv2d


class PWSConv3d(_PWSConvNd, nn.Conv3d):
    __doc__ = "Drop-in ``nn.Conv3d`` with Parametric Weights Standardization (eq. 12)." + _PWS_DOC
    _plain_cls = nn.Conv3d


class _PWSConvTransposeNd(PWSMixin):
    _transposed_layout = True
    _n_spatial: int
    _conv_fn: Any

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                 stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
                 output_padding: int | Sequence[int] = 0, groups: int = 1, bias: bool = True,
                 dilation: int | Sequence[int] = 1, padding_mode: str = "zeros", device: Any = None, dtype: Any = None,
                 *, gamma: float | str = 1e-3, use_alpha: bool = True, use_gain: bool = True, fan_mode: str = "fan_in",
                 equiv: bool = False, data_init_alpha: bool = False, clip: float | None = None,
                 clip_w: float | None = None) -> None:
        check_layer_args(type(self).__name__, dict(in_channels=in_channels, out_channels=out_channels,
                                                   kernel_size=kernel_size, groups=groups))
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,  # type: ignore
                         output_padding=output_padding, groups=groups, bias=bias, dilation=dilation,
                         padding_mode=padding_mode, device=device, dtype=dtype)
        self._pws_setup(gamma, use_alpha, use_gain, fan_mode, equiv, data_init_alpha, clip, clip_w)

    def _forward_with(self, x: Tensor, weight: Tensor, bias: Tensor | None, output_size: list[int] | None = None):
        output_padding = self._output_padding(  # type: ignore[attr-defined]
            x, output_size, self.stride, self.padding, self.kernel_size, self._n_spatial, self.dilation)
        return type(self)._conv_fn(x, weight, bias, self.stride, self.padding, output_padding, self.groups,
                                   self.dilation)


class PWSConvTranspose1d(_PWSConvTransposeNd, nn.ConvTranspose1d):
    __doc__ = "Drop-in ``nn.ConvTranspose1d`` with PWS; a filter is one output channel's slice (eq. 12)." + _PWS_DOC
    _plain_cls, _n_spatial, _conv_fn = nn.ConvTranspose1d, 1, staticmethod(F.conv_transpose1d)


class PWSConvTranspose2d(_PWSConvTransposeNd, nn.ConvTranspose2d):
    __doc__ = "Drop-in ``nn.ConvTranspose2d`` with PWS; a filter is one output channel's slice (eq. 12)." + _PWS_DOC
    _plain_cls, _n_spatial, _conv_fn = nn.ConvTranspose2d, 2, staticmethod(F.conv_transpose2d)


class PWSConvTranspose3d(_PWSConvTransposeNd, nn.ConvTranspose3d):
    __doc__ = "Drop-in ``nn.ConvTranspose3d`` with PWS; a filter is one output channel's slice (eq. 12)." + _PWS_DOC
    _plain_cls, _n_spatial, _conv_fn = nn.ConvTranspose3d, 3, staticmethod(F.conv_transpose3d)


class PWSLinear(PWSMixin, ReparamLinear, nn.Linear):
    __doc__ = "Drop-in ``nn.Linear`` with PWS; a filter is one output unit's row (eq. 12)." + _PWS_DOC
    _plain_cls = nn.Linear

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device: Any = None, dtype: Any = None,
                 *, gamma: float | str = 1e-3, use_alpha: bool = True, use_gain: bool = True, fan_mode: str = "fan_in",
                 equiv: bool = False, data_init_alpha: bool = False, clip: float | None = None,
                 clip_w: float | None = None) -> None:
        check_layer_args("PWSLinear", dict(in_features=in_features, out_features=out_features))
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._pws_setup(gamma, use_alpha, use_gain, fan_mode, equiv, data_init_alpha, clip, clip_w)
