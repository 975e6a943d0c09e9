"""``in``: InstanceNorm on the outputs, with an affine per channel."""

from torch import nn

from ._base import EPS, Method, plain_conv

_IN = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}

METHOD = Method("in", "outputs, per sample and channel over (H, W)", plain_conv,
                lambda c, dim, **kw: _IN[dim](c, affine=True, **kw), False, norm_options=(EPS,), spatial_stats=True,
                foldable=False, extra_params="γ, β per channel", reference="Ulyanov et al. 2016")
