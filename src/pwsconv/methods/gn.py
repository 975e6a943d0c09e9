"""``gn``: GroupNorm on the outputs, 32 groups (or the largest divisor of the channels below 32)."""

from torch import nn

from ._base import EPS, Method, Option, gn_groups, plain_conv

METHOD = Method("gn", "outputs, per sample over groups of channels × (H, W)", plain_conv,
                lambda c, dim, groups=32, **kw: nn.GroupNorm(gn_groups(c, groups), c, **kw), False,
                norm_options=(Option("groups", int, low=1, doc="at most this many groups (32)"), EPS), foldable=False,
                extra_params="γ, β per channel", reference="Wu & He 2018")
