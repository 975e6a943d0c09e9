"""``sn``: Switchable Normalization (learned mixtures of IN/LN/BN statistics); cannot be folded."""

from ..layers.switchable import SwitchNorm1d, SwitchNorm2d, SwitchNorm3d
from ._base import Method, Option, plain_conv

_SN = {1: SwitchNorm1d, 2: SwitchNorm2d, 3: SwitchNorm3d}

METHOD = Method(
    "sn", "outputs: learned softmax mixtures of IN/LN/BN means and (separately) variances", plain_conv,
    lambda c, dim, **kw: _SN[dim](c, **kw), False,
    norm_options=(Option("eps", float, low=0, low_open=True, doc="added to the mixed variance (1e-5)"),
                  Option("momentum", float, low=0, high=1,
                         doc="running ← momentum·running + (1 − momentum)·batch, BN component only (0.9)"),
                  Option("using_moving_average", bool, doc='False: "batch average" — accumulate raw sums, calibrate '
                                                           'with sn_batch_average (True)'),
                  Option("using_bn", bool, doc="False: mix IN and LN only (2+2 logits, no running statistics) (True)"),
                  Option("last_gamma", bool, doc="initialise the scale γ to 0 (False)")),
    batch_dependent=True, foldable=False, extra_params="γ, β per channel; 3+3 mixture logits; BN running mean/var",
    reference="Luo et al. 2019 (ICLR)")
