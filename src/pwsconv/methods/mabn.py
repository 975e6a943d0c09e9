"""``mabn``: Moving Average Batch Normalization after a weight-centralized conv (Yan et al., ICLR 2020)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..layers.mabn import CenConv1d, CenConv2d, CenConv3d, MABN1d, MABN2d, MABN3d
from ._base import FoldStats, Method, by_dim

#: MABN defaults of the registry: 2 images per device (the paper's small-batch setting), statistics averaged over
#: real_B // B = 16 iterations (a simulated batch of 32).
MABN_DEFAULT_BATCH_SIZE = 2
MABN_DEFAULT_REAL_BATCH_SIZE = 32
_MABN = {1: MABN1d, 2: MABN2d, 3: MABN3d}


def _norm(c: int, dim: int, batch_size: int = MABN_DEFAULT_BATCH_SIZE,
          real_batch_size: int = MABN_DEFAULT_REAL_BATCH_SIZE, **kw: Any) -> nn.Module:
    return _MABN[dim](c, B=batch_size, real_B=real_batch_size, **kw)


def _fold_norm(m: nn.Module) -> FoldStats | None:
    """MABN in eval mode is x·γ/sqrt(running_var + ε) + β: a per-channel affine (a BatchNorm of mean 0)."""
    if isinstance(m, tuple(_MABN.values())) and not m.training:
        return torch.zeros_like(m.running_var), m.running_var, m.eps, m.weight, m.bias
    return None


METHOD = Method(
    "mabn", "filters centred (CenConv) + outputs ÷ sqrt(moving-average 2nd moment), moving-average backward",
    by_dim({1: CenConv1d, 2: CenConv2d, 3: CenConv3d}), _norm, False,
    norm_options=frozenset({"batch_size", "real_batch_size", "eps", "momentum", "warmup_iters"}), fold_norm=_fold_norm,
    batch_dependent=True, extra_params="γ, β per channel; running var; 2 ring buffers",
    reference="Yan et al. 2020 (ICLR)")
