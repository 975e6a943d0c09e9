"""``ln``: LayerNorm over (C, H, W) of the outputs, as GroupNorm with one group."""

from torch import nn

from ._base import EPS, Method, plain_conv

METHOD = Method("ln", "outputs, per sample over (C, H, W) (GroupNorm with one group)", plain_conv,
                lambda c, dim, **kw: nn.GroupNorm(1, c, **kw), False, norm_options=(EPS,),
                foldable=False, extra_params="γ, β per channel", reference="Ba et al. 2016")
