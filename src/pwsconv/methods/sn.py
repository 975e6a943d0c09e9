"""``sn``: Switchable Normalization (learned mixtures of IN/LN/BN statistics); cannot be folded."""

from ..layers.switchable import SwitchNorm1d, SwitchNorm2d, SwitchNorm3d
from ._base import Method, plain_conv

_SN = {1: SwitchNorm1d, 2: SwitchNorm2d, 3: SwitchNorm3d}

METHOD = Method(
    "sn", "outputs: learned softmax mixtures of IN/LN/BN means and (separately) variances", plain_conv,
    lambda c, dim, **kw: _SN[dim](c, **kw), False,
    norm_options=frozenset({"eps", "momentum", "using_moving_average", "using_bn", "last_gamma"}),
    batch_dependent=True, foldable=False, extra_params="γ, β per channel; 3+3 mixture logits; BN running mean/var",
    reference="Luo et al. 2019 (ICLR)")
