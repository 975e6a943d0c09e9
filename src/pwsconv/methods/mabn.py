"""``mabn``: Moving Average Batch Normalization after a weight-centralized conv (Yan et al., ICLR 2020)."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..layers.mabn import CenConv1d, CenConv2d, CenConv3d, MABN1d, MABN2d, MABN3d
from ._base import FoldStats, Method, Option, by_dim

#: MABN defaults of the registry: 2 images per device (the paper's small-batch setting), statistics averaged over
#: real_B // B = 16 iterations (a simulated batch of 32).
MABN_DEFAULT_BATCH_SIZE = 2
MABN_DEFAULT_REAL_BATCH_SIZE = 32
_MABN = {1: MABN1d, 2: MABN2d, 3: MABN3d}


def _norm(c: int, dim: int, batch_size: int = MABN_DEFAULT_BATCH_SIZE,
          real_batch_size: int = MABN_DEFAULT_REAL_BATCH_SIZE, **kw: Any) -> nn.Module:
    return _MABN[dim](c, B=batch_size, real_B=real_batch_size, **kw)


def _check(opts: Mapping[str, Any]) -> None:
    b = opts.get("batch_size", MABN_DEFAULT_BATCH_SIZE)
    real = opts.get("real_batch_size", MABN_DEFAULT_REAL_BATCH_SIZE)
    if real % b:
        raise ValueError(f"real_batch_size ({real}, the batch size to simulate) must be divisible by batch_size ({b}, "
                         "the real batch size per device)")


def _fold_norm(m: nn.Module) -> FoldStats | None:
    """MABN in eval mode is x·γ/sqrt(running_var + ε) + β: a per-channel affine (a BatchNorm of mean 0)."""
    if isinstance(m, tuple(_MABN.values())) and not m.training:
        return torch.zeros_like(m.running_var), m.running_var, m.eps, m.weight, m.bias
    return None


METHOD = Method(
    "mabn", "filters centred (CenConv) + outputs ÷ sqrt(moving-average 2nd moment), moving-average backward",
    by_dim({1: CenConv1d, 2: CenConv2d, 3: CenConv3d}), _norm, False,
    norm_options=(Option("batch_size", int, low=1, doc="B, the real batch size per device (2)"),
                  Option("real_batch_size", int, low=1,
                         doc="real_B, the batch size to simulate, a multiple of B; buffer_size = real_B // B (32)"),
                  Option("eps", float, low=0, low_open=True, doc="ε added to the variance (1e-5)"),
                  Option("momentum", float, low=0, high=1,
                         doc="running_var ← momentum·running_var + (1 − momentum)·var (0.98)"),
                  Option("warmup_iters", int, low=0, doc="iterations that use the current batch statistics (100)")),
    check_together=_check, fold_norm=_fold_norm,
    batch_dependent=True, extra_params="γ, β per channel; running var; 2 ring buffers",
    reference="Yan et al. 2020 (ICLR)")
