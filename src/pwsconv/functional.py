"""Functional core of Parametric Weights Standardization (PWS).

Every PWS layer (1d/2d/3d convolutions, transposed convolutions, linear) calls :func:`pws_weight`;
nothing else in the package standardizes weights on its own.

Eq. 12 of Liu et al., "Delving into Variance Transmission and Normalization" (AAAI 2021)::

    Ŵ_o = sqrt(2 / n_l) · (W_o − E[W_o]) / sqrt(Var[W_o] + γ),      Y_o = α_o · (X ⊛ Ŵ_o) + β_o

with E and Var the mean and the population (biased) variance over the n_l elements of filter o.
α_o multiplies the kernel, which is the same as multiplying the output channel (Y_o is linear in Ŵ_o).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["pws_weight", "check_gamma", "he_std"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def check_gamma(gamma: float) -> float:
    """Validate γ of eq. 12: a finite number ≥ 0 (not a string or a bool). Returns it as a float."""
    if isinstance(gamma, (str, bytes, bool)):
        raise ValueError(f"gamma must be a non-negative finite number, got {gamma!r}")
    try:
        g = float(gamma)
    except (TypeError, ValueError):
        raise ValueError(f"gamma must be a non-negative finite number, got {gamma!r}") from None
    if not math.isfinite(g) or g < 0:
        raise ValueError(f"gamma must be a non-negative finite number, got {gamma!r}")
    return g


def he_std(fan: int) -> float:
    """Standard deviation of He (kaiming normal, ReLU) init: sqrt(2 / fan)."""
    return math.sqrt(2.0 / fan)


def pws_weight(
    weight: Tensor,
    gamma: float,
    alpha: Tensor | None = None,
    *,
    reduce_dims: Sequence[int] | None = None,
    gain: float | None = None,
) -> Tensor:
    """Standardize ``weight`` per filter (eq. 12) and scale it by α.

    Args:
        weight: raw weight. By default filter ``o`` is ``weight[o]`` (the layout of ``nn.ConvNd`` and ``nn.Linear``).
        gamma: γ ≥ 0, added to the filter variance inside the square root.
        alpha: per-filter scale; ``None`` for no α. Either a tensor with ``weight.dim()`` dims broadcastable to the
            kept (non-reduced) dims, a scalar, or a tensor with one value per filter (e.g. shape ``[out]`` for the
            default layout), which is reshaped to the kept dims.
        reduce_dims: the dims that make one filter (default: every dim but 0).
        gain: the constant in front; default sqrt(2 / n_l) with n_l the number of elements in one filter.
            Pass ``1.0`` for the "without sqrt(2/n_l)" ablation of Table 2.

    Statistics are computed in float32 when ``weight`` is float16/bfloat16 (also under autocast) and the
    result is returned in ``weight``'s dtype. Gradients flow to ``weight`` and ``alpha``; by eq. 13 the gradient
    of ``weight`` has zero mean over every filter.
    """
    if reduce_dims is None:
        reduce_dims = tuple(range(1, weight.dim()))
    reduce_dims = tuple(sorted({int(d) % weight.dim() for d in reduce_dims})) if weight.dim() else ()
    if not reduce_dims:
        # torch reads an empty dim list as "reduce everything": refuse instead of silently mixing filters
        raise ValueError(f"pws_weight: no filter dims to reduce (weight of shape {tuple(weight.shape)})")
    if gain is None:
        n = 1
        for d in reduce_dims:
            n *= weight.shape[d]
        gain = he_std(n)
    w = weight.float() if weight.dtype in _LOW_PRECISION else weight
    keep_shape = [1 if d in reduce_dims else s for d, s in enumerate(w.shape)]
    if alpha is None:
        scale = None if gain == 1.0 else torch.full(keep_shape, gain, dtype=w.dtype, device=w.device)
    else:
        if alpha.dim() != w.dim() and alpha.numel() != 1:
            # one value per filter: lay it out along the kept dims (a [out] vector would otherwise broadcast
            # against the trailing kernel dim and silently scale the wrong axis)
            if alpha.numel() != math.prod(keep_shape):
                raise ValueError(
                    f"pws_weight: alpha has {alpha.numel()} values (shape {tuple(alpha.shape)}) "
                    f"for {math.prod(keep_shape)} filters"
                )
            alpha = alpha.reshape(keep_shape)
        scale = alpha.to(w.dtype)
        if gain != 1.0:
            scale = scale * gain
        scale = scale.expand(keep_shape)
    out = _Standardize.apply(w, scale, float(gamma), reduce_dims)
    return out.to(weight.dtype)


class _Standardize(torch.autograd.Function):
    """x̂ · c with x̂ = (w − E[w]) / sqrt(Var[w] + γ) per filter: one fused op with the closed-form backward

        ∂L/∂w = c / sqrt(Var + γ) · (g − E[g] − x̂ · E[g x̂]),      ∂L/∂c = Σ_filter g x̂

    (E over the filter's elements, g = ∂L/∂out). The first term has zero mean over every filter: eq. 13.
    It saves only x̂ and per-filter scalars for backward (the autograd graph of the unfused expression keeps
    three weight-sized tensors), and launches fewer kernels.
    """

    @staticmethod
    def forward(ctx, w: Tensor, scale: Tensor | None, gamma: float, dims: tuple[int, ...]) -> Tensor:
        var, mean = torch.var_mean(w, dim=dims, correction=0, keepdim=True)
        inv = torch.rsqrt(var + gamma)
        xhat = (w - mean) * inv
        ctx.dims = dims
        ctx.has_scale = scale is not None
        ctx.save_for_backward(xhat, inv, scale if scale is not None else inv.new_ones(()))
        return xhat * scale if scale is not None else xhat

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):  # type: ignore[override]
        xhat, inv, scale = ctx.saved_tensors
        dims = ctx.dims
        gx = g * xhat
        grad_w = grad_scale = None
        if ctx.needs_input_grad[1]:
            grad_scale = gx.sum(dims, keepdim=True)
        if ctx.needs_input_grad[0]:
            if ctx.has_scale:
                g = g * scale
                gx = gx * scale
            grad_w = (g - g.mean(dims, keepdim=True) - xhat * gx.mean(dims, keepdim=True)) * inv
        return grad_w, grad_scale, None, None
