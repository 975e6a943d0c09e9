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
    if fuse and any(hasattr(type(m), "fused_args") for m in model.modules()):
        fuse_standardization(model, recompute=recompute)


METHOD = Method(
    "pws", "filters: per-filter standardization × sqrt(2/n_l) × α (eq. 12)",
    by_dim({1: PWSConv1d, 2: PWSConv2d, 3: PWSConv3d}), None, True,
    linear=lambda i, o, b, **kw: PWSLinear(i, o, bias=b, **kw),
    transposed=by_dim({1: PWSConvTranspose1d, 2: PWSConvTranspose2d, 3: PWSConvTranspose3d}),
    lazy=by_dim({1: LazyPWSConv1d, 2: LazyPWSConv2d, 3: LazyPWSConv3d}),
    conv_options=(
        Option("gamma", float | Literal["auto"], low=0, low_open=True,
               doc='γ of eq. 12 (1e-3), or "auto": γ·2/n_l relative to the He-init filter variance — γ = 0.1 if the '
                   'SGD group\'s starting LR/(1 − momentum) is ≤ 1, else 1e-3, chosen once and saved in the state_dict '
                   '— plus unit-wise gradient clipping in the backward, its bounds from the same group: each filter of W '
                   'at λ_W = max(0.08·(1 − momentum)/LR·max(1, 4·(1 − momentum)/LR), 0.005) of the LR now, '
                   'α and β at 1 (spikes only) up to a starting LR/(1 − momentum) = 1 (per entry) and at 0.005 above '
                   '(each layer\'s α, β as one vector), β\'s floor ((1 − momentum)/LR)² in [1e-3, 1] of the starting LR '
                   '(without an SGD group: γ 1e-3, 0.01, 0.01, 1e-3; when to '
                   'use it: the README\'s gamma="auto" entry)'),
        Option("use_alpha", bool, doc="the learnable per-filter α (True; Table 2's switch)"),
        Option("use_gain", bool, doc="the sqrt(2/n_l) factor of eq. 12 (True; Table 2's switch)"),
        Option("fan_mode", Literal["fan_in", "fan_out"], doc='the n of sqrt(2/n) ("fan_in": the paper\'s n_l)'),
        Option("equiv", bool, doc='the authors\' "equiv" option: γ → 2γ/n_l (False)'),
        Option("data_init_alpha", bool, doc="α from the first training batch's output scale (False)"),
        Option("clip", float | None, low=0, doc='the clipping λ of α and β, per entry (None: under gamma="auto" 1 '
               'up to a starting LR/(1 − momentum) = 1 and 0.005 per layer vector above, read from the SGD group '
               '(param_groups or link_optimizer), else 0.01; off otherwise; 0: off); also of W when clip_w is not '
               'given — so under gamma="auto" a clip given replaces all of its bounds (β\'s floor 1e-3)'),
        Option("clip_w", float | None, low=0, doc='the clipping λ of W\'s filters (None: clip if given, else under '
               'gamma="auto" from the SGD group\'s LR now — 0.01 without an SGD group —, else off; 0: off)'),
    ),
    prepare=_prepare, ln_io=True, extra_params="α per filter", reference="Liu et al. 2021 (this paper)")
