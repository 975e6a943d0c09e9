"""``pws``: Parametric Weights Standardization (eq. 12) — the filters are standardized, the outputs are not."""

from __future__ import annotations

from typing import Literal

from torch import nn

from ..accel import fuse_standardization
from ..layers.lazy import LazyPWSConv1d, LazyPWSConv2d, LazyPWSConv3d
from ..layers.pws import (PWSConv1d, PWSConv2d, PWSConv3d, PWSConvTranspose1d, PWSConvTranspose2d,
                          PWSConvTranspose3d, PWSLinear)
from ._base import Method, Option, by_dim


def _prepare(model: nn.Module, *, fuse: bool = True, recompute: bool = False) -> None:
    """All PWS layers in one autograd node per forward (BENCHMARKS.md: it pays at batch ≤ 32)."""
    if fuse:
        fuse_standardization(model, recompute=recompute)


METHOD = Method(
    "pws", "filters: per-filter standardization × sqrt(2/n_l) × α (eq. 12)",
    by_dim({1: PWSConv1d, 2: PWSConv2d, 3: PWSConv3d}), None, True,
    linear=lambda i, o, b, **kw: PWSLinear(i, o, bias=b, **kw),
    transposed=by_dim({1: PWSConvTranspose1d, 2: PWSConvTranspose2d, 3: PWSConvTranspose3d}),
    lazy=by_dim({1: LazyPWSConv1d, 2: LazyPWSConv2d, 3: LazyPWSConv3d}),
    conv_options=(
        Option("gamma", float | Literal["auto"], low=0, low_open=True,
               doc='γ of eq. 12 (1e-3), or "auto": γ relative to the He-init variance plus unit-wise clipping'),
        Option("use_alpha", bool, doc="the learnable per-filter α (True)"),
        Option("use_gain", bool, doc="the sqrt(2/n_l) factor of eq. 12 (True)"),
        Option("fan_mode", Literal["fan_in", "fan_out"], doc="the n of sqrt(2/n) (fan_in: the paper's n_l)"),
        Option("equiv", bool, doc='the authors\' "equiv" option: γ → 2γ/n (False)'),
        Option("data_init_alpha", bool, doc="α from the first batch's output scale (False)"),
        Option("clip", float | None, low=0, doc='unit-wise gradient clipping λ of α and β (None: the gamma="auto" '
               'default, else off)'),
        Option("clip_w", float | None, low=0, doc='unit-wise gradient clipping λ of each filter of W (None: the '
               'gamma="auto" default, else as clip)'),
    ),
    prepare=_prepare, ln_io=True, extra_params="α per filter", reference="Liu et al. 2021 (this paper)")
