"""``sws``: NF-Nets scaled Weight Standardization, gain_o·γ_act·(W_o − μ)/sqrt(n·Var + ε)."""

from ..layers.ws import SWSConv1d, SWSConv2d, SWSConv3d, SWSLinear
from ._base import Method, by_dim

METHOD = Method("sws", "filters: gain_o·γ_act·(W_o − μ)/sqrt(n·Var + ε) (NF-Nets scaled WS)",
                by_dim({1: SWSConv1d, 2: SWSConv2d, 3: SWSConv3d}), None, True,
                linear=lambda i, o, b, **kw: SWSLinear(i, o, bias=b, **kw),
                conv_options=frozenset({"gamma_act", "eps", "floor", "use_gain"}),
                extra_params="gain per filter (no weight decay)", reference="Brock et al. 2021 (NF-Nets)")
