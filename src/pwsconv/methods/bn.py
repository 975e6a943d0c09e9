"""``bn``: BatchNorm on the outputs (folded into the conv by :func:`pwsconv.fold` in eval mode)."""

from __future__ import annotations

from torch import nn

from ._base import EPS, MOMENTUM, FoldStats, Method, plain_conv

_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _fold_norm(m: nn.Module) -> FoldStats | None:
    """An eval-mode torch BatchNorm with running statistics folds into the conv before it."""
    if type(m) in _BN.values() and not m.training and m.running_mean is not None and m.running_var is not None:
        return m.running_mean, m.running_var, m.eps, m.weight, m.bias
    return None


METHOD = Method("bn", "outputs, per channel over (N, H, W)", plain_conv, lambda c, dim, **kw: _BN[dim](c, **kw),
                False, norm_options=(EPS, MOMENTUM), keeps_batchnorm=True, fold_norm=_fold_norm,
                batch_dependent=True,
                extra_params="γ, β per channel; running mean/var", reference="Ioffe & Szegedy 2015")
