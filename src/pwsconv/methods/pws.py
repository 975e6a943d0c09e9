"""``pws``: Parametric Weights Standardization (eq. 12) — the filters are standardized, the outputs are not."""

from __future__ import annotations


from torch import nn

from ..accel import fuse_standardization
from ..layers.lazy import LazyPWSConv1d, LazyPWSConv2d, LazyPWSConv3d
from ..layers.pws import (PWSConv1d, PWSConv2d, PWSConv3d, PWSConvTranspose1d, PWSConvTranspose2d,
                          PWSConvTranspose3d, PWSLinear)
from ._base import Method, by_dim


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
    conv_options=frozenset({"gamma", "use_alpha", "use_gain", "fan_mode", "equiv", "data_init_alpha", "clip"}),
    prepare=_prepare, ln_io=True, extra_params="α per filter", reference="Liu et al. 2021 (this paper)")
