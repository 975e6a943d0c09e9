"""``sws``: NF-Nets scaled Weight Standardization, gain_o·γ_act·(W_o − μ)/sqrt(n·Var + ε)."""

from __future__ import annotations

from typing import Any, Mapping

from ..layers.ws import SWSConv1d, SWSConv2d, SWSConv3d, SWSLinear
from ._base import Method, Option, by_dim


def _check(opts: Mapping[str, Any]) -> None:
    if opts.get("floor") and opts.get("eps", 1e-4) == 0:
        raise ValueError("floor=True needs eps > 0 (the floor of fan_in·Var)")


METHOD = Method("sws", "filters: gain_o·γ_act·(W_o − μ)/sqrt(n·Var + ε) (NF-Nets scaled WS)",
                by_dim({1: SWSConv1d, 2: SWSConv2d, 3: SWSConv3d}), None, True,
                linear=lambda i, o, b, **kw: SWSLinear(i, o, bias=b, **kw),
                conv_options=(
                    Option("gamma_act", float, low=0, low_open=True, doc="γ_act, the activation gain (√2 for ReLU)"),
                    Option("eps", float, low=0, doc="ε in sqrt(n·Var + ε), or the floor with floor=True (1e-4)"),
                    Option("floor", bool, doc="True: DeepMind's sqrt(max(n·Var, ε)) (False)"),
                    Option("use_gain", bool, doc="trainable per-filter gain, exempt from weight decay (True)")),
                check_together=_check,
                extra_params="gain per filter (no weight decay)", reference="Brock et al. 2021 (NF-Nets)")
