"""``bn``: BatchNorm on the outputs (folded into the conv by :func:`pwsconv.fold` in eval mode)."""

from torch import nn

from ._base import Method, plain_conv

_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}

METHOD = Method("bn", "outputs, per channel over (N, H, W)", plain_conv, lambda c, dim, **kw: _BN[dim](c, **kw),
                False, norm_options=frozenset({"eps", "momentum"}), batch_dependent=True,
                extra_params="γ, β per channel; running mean/var", reference="Ioffe & Szegedy 2015")
