"""The rest of the normalization zoo the paper compares: registers "sn", "wn", "ws", "sws" and "mabn".

Imported once by :func:`pwsconv.norms.available_methods` / :func:`pwsconv.norms.get_method` (it is listed in
``pwsconv.norms._ZOO_MODULES``). Each method is one :func:`pwsconv.norms.register_method` call. The factories take the
options of the whole method and ignore those that belong to the other factory of the unit, so that
:func:`pwsconv.norms.build_conv` / :func:`pwsconv.norms.build_norm` / :func:`pwsconv.convert` can pass all options.

:func:`methods_table` renders the registry as the Markdown table of ``docs/methods.md``.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from .layers.mabn import CenConv1d, CenConv2d, CenConv3d, MABN1d, MABN2d, MABN3d
from .layers.switchable import SwitchNorm1d, SwitchNorm2d, SwitchNorm3d
from .layers.wn import WNConv1d, WNConv2d, WNConv3d, WNLinear
from .layers.ws import SWSConv1d, SWSConv2d, SWSConv3d, SWSLinear, WSConv1d, WSConv2d, WSConv3d
from .norms import NormMethod, available_methods, get_method, gn_groups, plain_conv, register_method

__all__ = ["methods_table", "MABN_DEFAULT_BATCH_SIZE", "MABN_DEFAULT_REAL_BATCH_SIZE"]

#: MABN defaults of the registry: 2 images per device (the paper's small-batch setting), statistics averaged over
#: real_B // B = 16 iterations (a simulated batch of 32).
MABN_DEFAULT_BATCH_SIZE = 2
MABN_DEFAULT_REAL_BATCH_SIZE = 32


def _conv_kw(stride: Any, padding: Any, dilation: Any, groups: int, bias: bool, padding_mode: str) -> dict[str, Any]:
    return dict(stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode)


# ------------------------------------------------------------------------------------------------------ sn
_SN = {1: SwitchNorm1d, 2: SwitchNorm2d, 3: SwitchNorm3d}


def _sn_norm(c: int, dim: int, eps: float = 1e-5, momentum: float = 0.9, using_moving_average: bool = True,
             using_bn: bool = True, last_gamma: bool = False, **_conv_opts: Any) -> nn.Module:
    return _SN[dim](c, eps=eps, momentum=momentum, using_moving_average=using_moving_average, using_bn=using_bn,
                    last_gamma=last_gamma)


# ------------------------------------------------------------------------------------------------------ wn
_WN = {1: WNConv1d, 2: WNConv2d, 3: WNConv3d}


def _wn_conv(dim: int, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0,
             dilation: Any = 1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *,
             data_init: bool = False, **_norm_opts: Any) -> nn.Module:
    return _WN[dim](in_channels, out_channels, kernel_size, data_init=data_init,
                    **_conv_kw(stride, padding, dilation, groups, bias, padding_mode))


def _wn_linear(in_features: int, out_features: int, bias: bool = True, *, data_init: bool = False,
               **_other: Any) -> nn.Module:
    return WNLinear(in_features, out_features, bias=bias, data_init=data_init)


# ------------------------------------------------------------------------------------------------------ ws
_WS = {1: WSConv1d, 2: WSConv2d, 3: WSConv3d}


def _ws_conv(dim: int, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0,
             dilation: Any = 1, groups: int = 1, bias: bool = False, padding_mode: str = "zeros", *,
             eps: float = 1e-5, original_std: bool = False, **_norm_opts: Any) -> nn.Module:
    return _WS[dim](in_channels, out_channels, kernel_size, eps=eps, original_std=original_std,
                    **_conv_kw(stride, padding, dilation, groups, bias, padding_mode))


def _ws_norm(c: int, dim: int, num_groups: int = 32, gn_eps: float = 1e-5, **_conv_opts: Any) -> nn.Module:
    return nn.GroupNorm(gn_groups(c, num_groups), c, eps=gn_eps)


# ------------------------------------------------------------------------------------------------------ sws
_SWS = {1: SWSConv1d, 2: SWSConv2d, 3: SWSConv3d}


def _sws_conv(dim: int, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0,
              dilation: Any = 1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *,
              gamma_act: float = math.sqrt(2.0), eps: float = 1e-4, floor: bool = False, use_gain: bool = True,
              **_norm_opts: Any) -> nn.Module:
    return _SWS[dim](in_channels, out_channels, kernel_size, gamma_act=gamma_act, eps=eps, floor=floor,
                     use_gain=use_gain, **_conv_kw(stride, padding, dilation, groups, bias, padding_mode))


def _sws_linear(in_features: int, out_features: int, bias: bool = True, *, gamma_act: float = math.sqrt(2.0),
                eps: float = 1e-4, floor: bool = False, use_gain: bool = True, **_other: Any) -> nn.Module:
    return SWSLinear(in_features, out_features, bias=bias, gamma_act=gamma_act, eps=eps, floor=floor,
                     use_gain=use_gain)


# ------------------------------------------------------------------------------------------------------ mabn
_CEN = {1: CenConv1d, 2: CenConv2d, 3: CenConv3d}
_MABN = {1: MABN1d, 2: MABN2d, 3: MABN3d}


def _cen_conv(dim: int, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0,
              dilation: Any = 1, groups: int = 1, bias: bool = False, padding_mode: str = "zeros",
              **_norm_opts: Any) -> nn.Module:
    return _CEN[dim](in_channels, out_channels, kernel_size, **_conv_kw(stride, padding, dilation, groups, bias,
                                                                          padding_mode))


def _mabn_norm(c: int, dim: int, batch_size: int = MABN_DEFAULT_BATCH_SIZE,
               real_batch_size: int = MABN_DEFAULT_REAL_BATCH_SIZE, eps: float = 1e-5, momentum: float = 0.98,
               warmup_iters: int = 100, **_conv_opts: Any) -> nn.Module:
    return _MABN[dim](c, B=batch_size, real_B=real_batch_size, eps=eps, momentum=momentum, warmup_iters=warmup_iters)


# ------------------------------------------------------------------------------------------------------ registry
def _register() -> None:
    for m in (
        NormMethod(
            "sn", "outputs: learned softmax mixtures of IN/LN/BN means and (separately) variances", plain_conv,
            _sn_norm, False, batch_dependent=True, foldable=False,
            extra_params="γ, β per channel; 3+3 mixture logits; BN running mean/var",
            reference="Luo et al. 2019 (ICLR)",
            options=frozenset({"eps", "momentum", "using_moving_average", "using_bn", "last_gamma"})),
        NormMethod(
            "wn", "filters: Ŵ_o = g_o·W_o/‖W_o‖ (g = 1 as the paper; data_init option)", _wn_conv, None, True,
            linear=_wn_linear, batch_dependent=False, foldable=True, extra_params="g per filter",
            reference="Salimans & Kingma 2016", options=frozenset({"data_init"})),
        NormMethod(
            "ws", "filters: (W_o − μ)/sqrt(Var + ε), then GroupNorm on the outputs", _ws_conv, _ws_norm, False,
            batch_dependent=False, foldable=False,
            extra_params="γ, β per channel (GN)", reference="Qiao et al. 2019",
            options=frozenset({"eps", "original_std", "num_groups", "gn_eps"})),
        NormMethod(
            "sws", "filters: gain_o·γ_act·(W_o − μ)/sqrt(n·Var + ε) (NF-Nets scaled WS)", _sws_conv, None, True,
            linear=_sws_linear, batch_dependent=False, foldable=True, extra_params="gain per filter (no weight decay)",
            reference="Brock et al. 2021 (NF-Nets)", options=frozenset({"gamma_act", "eps", "floor", "use_gain"})),
        NormMethod(
            "mabn", "filters centred (CenConv) + outputs ÷ sqrt(moving-average 2nd moment), moving-average backward",
            _cen_conv, _mabn_norm, False, batch_dependent=True, foldable=True,
            extra_params="γ, β per channel; running var; 2 ring buffers",
            reference="Yan et al. 2020 (ICLR)",
            options=frozenset({"batch_size", "real_batch_size", "eps", "momentum", "warmup_iters"})),
    ):
        register_method(m)


_register()


# ------------------------------------------------------------------------------------------------------ docs
def methods_table() -> str:
    """The registry as a Markdown table: name, what it normalizes, batch dependence, foldability, extra parameters,
    reference (the table of ``docs/methods.md``)."""
    rows = [
        "| method | what it normalizes | depends on the batch? | foldable into the conv at inference? "
        "| extra parameters | reference |",
        "|---|---|---|---|---|---|",
    ]
    for name in available_methods():
        m = get_method(name)
        cells = [f"`{m.name}`", m.summary, "yes" if m.batch_dependent else "no", "yes" if m.foldable else "no",
                 m.extra_params or "—", m.reference or "—"]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"
