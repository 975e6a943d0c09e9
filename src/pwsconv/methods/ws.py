"""``ws``: Weight Standardization of the filters, then GroupNorm on the outputs (Qiao et al.)."""

from torch import nn

from ..layers.ws import WSConv1d, WSConv2d, WSConv3d
from ._base import Method, Option, by_dim, gn_groups

METHOD = Method("ws", "filters: (W_o − μ)/sqrt(Var + ε), then GroupNorm on the outputs",
                by_dim({1: WSConv1d, 2: WSConv2d, 3: WSConv3d}),
                lambda c, dim, num_groups=32, gn_eps=1e-5: nn.GroupNorm(gn_groups(c, num_groups), c, eps=gn_eps),
                False,
                conv_options=(Option("eps", float, low=0, doc="ε of the weight standardization (1e-5)"),
                              Option("original_std", bool,
                                     doc="True: the original code's (W − μ)/(unbiased std + ε) (False)")),
                norm_options=(Option("num_groups", int, low=1,
                                     doc="upper bound of the GroupNorm groups, see the GN group rule (32)"),
                              Option("gn_eps", float, low=0, doc="the GroupNorm's ε (1e-5)")), foldable=False,
                extra_params="γ, β per channel (GN)", reference="Qiao et al. 2019")
