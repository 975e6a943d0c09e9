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
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["pws_weight", "pws_weights_fused", "check_gamma", "check_clip", "he_std", "unit_clip", "unit_clip_many",
           "AUTO_GAMMA",
           "AUTO_CLIP"]

#: ``gamma="auto"``: γ relative to the He-init filter variance 2/n_l, i.e. γ_eff = AUTO_GAMMA · 2/n_l (the authors'
#: "equiv" rule), so that 1/sqrt(Var[W_o] + γ) is bounded at 1/sqrt(AUTO_GAMMA) ≈ 32× its He-init value whatever
#: the layer's width (Fig. 2), and γ never dominates the variance of a wide layer at init.
AUTO_GAMMA = 1e-3
#: ``gamma="auto"``: the unit-wise adaptive gradient clipping λ (Brock et al. 2021) of W, α and β (RESULTS.md).
AUTO_CLIP = 0.01

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _non_negative(value: object, name: str, what: str = "a non-negative finite number") -> float:
    """``value`` as a finite float ≥ 0 (not a string or a bool), else a ValueError naming ``name``."""
    msg = f"{name} must be {what}, got {value!r}"
    if isinstance(value, (str, bytes, bool)):
        raise ValueError(msg)
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(msg) from None
    if not math.isfinite(v) or v < 0:
        raise ValueError(msg)
    return v


def check_gamma(gamma: float) -> float:
    """Validate γ of eq. 12: a finite number ≥ 0 (not a string or a bool). Returns it as a float."""
    return _non_negative(gamma, "gamma")


def check_clip(clip: float | None) -> float | None:
    """Validate a clipping λ: None (the default rule) or a finite number ≥ 0 (0 = off). Returns a float or None."""
    return None if clip is None else _non_negative(clip, "clip", "None or a non-negative finite number")


class _UnitClip(torch.autograd.Function):
    """Identity in forward; in backward the gradient is clipped unit-wise (see :func:`unit_clip`)."""

    @staticmethod
    def forward(ctx, p: Tensor, lam: float, dims: tuple[int, ...] | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(p)
        ctx.lam, ctx.dims = lam, dims
        return p.view_as(p)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (p,) = ctx.saved_tensors
        lam, dims = ctx.lam, ctx.dims
        if dims is None:   # per entry: |g| ≤ λ·max(|p|, 1e-3)
            bound = p.abs().clamp_min(1e-3).mul_(lam)
            return torch.minimum(torch.maximum(g, -bound), bound), None, None
        pf, gf = p.float(), g.float()
        pn = torch.linalg.vector_norm(pf, dim=dims, keepdim=True).clamp_min_(1e-3)
        gn = torch.linalg.vector_norm(gf, dim=dims, keepdim=True).clamp_min_(1e-30)
        scale = (pn.mul_(lam) / gn).clamp_(max=1.0)
        return (gf * scale).to(g.dtype), None, None


def unit_clip(p: Tensor | None, lam: float, dims: Sequence[int] | None = None) -> Tensor | None:
    """Unit-wise adaptive gradient clipping (AGC, Brock et al. 2021, "High-performance large-scale image recognition
    without normalization"), as an identity op: the value is ``p``; the gradient flowing back through it is scaled
    so that ‖g_u‖ ≤ λ·max(‖p_u‖, 1e-3) for every unit u — a filter (the norm over ``dims``) for a weight, each entry
    for a vector (α, β; ``dims=None``). A per-filter scale keeps eq. 13: the clipped ∂L/∂W_o still has zero mean.
    ``None`` stays ``None``; without autograd (no grad mode, or ``p`` needs no gradient) ``p`` itself is returned."""
    if p is None or not lam or not (p.requires_grad and torch.is_grad_enabled()):
        return p
    if p.dim() <= 1:
        return _UnitClip.apply(p, float(lam), None)
    nd = p.dim()
    d = tuple(range(1, nd)) if dims is None else tuple(sorted({int(x) % nd for x in dims}))
    return _UnitClip.apply(p, float(lam), d)


class _UnitClipMany(torch.autograd.Function):
    """Identity on several vectors at once; backward clips each entry as :func:`unit_clip` does (one node for all)."""

    @staticmethod
    def forward(ctx, lams: tuple[float, ...], *ps: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*ps)
        ctx.lams = lams
        return tuple(p.view_as(p) for p in ps)

    @staticmethod
    def backward(ctx, *gs: Tensor | None):  # type: ignore[override]
        ps = ctx.saved_tensors
        out: list[Tensor | None] = [None]
        for p, g, lam in zip(ps, gs, ctx.lams):
            if g is None:
                out.append(None)
                continue
            bound = p.abs().clamp_min(1e-3).mul_(lam)
            out.append(torch.minimum(torch.maximum(g, -bound), bound))
        return tuple(out)


def unit_clip_many(ps: Sequence[Tensor], lams: Sequence[float]) -> list[Tensor]:
    """:func:`unit_clip` of several 1-d tensors (biases, per entry) in one autograd node."""
    return list(_UnitClipMany.apply(tuple(float(x) for x in lams), *ps))


def he_std(fan: int) -> float:
    """Standard deviation of He (kaiming normal, ReLU) init: sqrt(2 / fan)."""
    return math.sqrt(2.0 / fan)


def _rows_layout(shape: Sequence[int], dims: tuple[int, ...]) -> tuple[tuple[int, ...] | None, int, int]:
    """How to see a weight as a [filters, n] matrix: (permutation, or None when ``dims`` are already the trailing
    dims as in conv/linear weights; number of filters; n = elements per filter)."""
    nd = len(shape)
    kept = tuple(d for d in range(nd) if d not in dims)
    n = rows = 1
    for d in range(nd):
        if d in dims:
            n *= int(shape[d])
        else:
            rows *= int(shape[d])
    perm = None if dims == tuple(range(nd - len(dims), nd)) else kept + dims
    return perm, rows, n


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

    Implementation: the filters are the rows of a [filters, n_l] matrix (a view for conv/linear weights; a permuted
    copy for other layouts) and x̂ = (W − E[W]) / sqrt(Var[W] + γ) is ``layer_norm`` over the rows with ε = γ and no
    affine: layer norm over the last dim *is* per-filter standardization with the biased variance and γ inside the
    root. Its built-in backward is the closed form ∂L/∂W = (g − E[g] − x̂·E[g x̂]) / sqrt(Var + γ) (zero mean per
    filter: eq. 13), so no Python runs in the backward pass. On CPU this is ≈3× faster per layer than ``var_mean``
    plus elementwise ops, and autograd keeps only x̂ and per-filter scalars (W is the leaf parameter).

    Statistics are computed in float32 when ``weight`` is float16/bfloat16 (also under autocast) and the
    result is returned in ``weight``'s dtype. Gradients flow to ``weight`` and ``alpha``.
    """
    nd = weight.dim()
    dims = tuple(range(1, nd)) if reduce_dims is None else \
        (tuple(sorted({int(d) % nd for d in reduce_dims})) if nd else ())
    if not dims:
        # torch reads an empty dim list as "reduce everything": refuse instead of silently mixing filters
        raise ValueError(f"pws_weight: no filter dims to reduce (weight of shape {tuple(weight.shape)})")
    perm, rows, n = _rows_layout(weight.shape, dims)
    if gain is None:
        gain = he_std(n)
    w = weight.float() if weight.dtype in _LOW_PRECISION else weight
    if perm is None:
        out = F.layer_norm(w.reshape(rows, n), (n,), None, None, float(gamma))
    else:
        # filters that are not the trailing dims (transposed-conv layouts): standardize in place, so that the
        # gradient of ``weight`` has its layout (a permuted copy would hand back a non-contiguous gradient)
        var, mean = torch.var_mean(w, dims, correction=0, keepdim=True)
        out = (w - mean) * torch.rsqrt(var + float(gamma))
    keep_shape = [1 if d in dims else s for d, s in enumerate(w.shape)]
    if alpha is not None:
        if alpha.numel() == 1:
            a2 = alpha.reshape(1, 1)
        elif alpha.dim() == nd:
            # broadcastable to the kept dims (the reduced dims must be 1)
            keep = [1 if d in dims else s for d, s in enumerate(w.shape)]
            try:
                a2 = alpha.expand(keep).reshape(rows, 1)
            except RuntimeError:
                raise ValueError(f"pws_weight: alpha of shape {tuple(alpha.shape)} does not broadcast to the "
                                 f"per-filter shape {tuple(keep)}") from None
        elif alpha.numel() == rows:
            # one value per filter, in filter order (a [out] vector must not broadcast against the kernel dims)
            a2 = alpha.reshape(rows, 1)
        else:
            raise ValueError(f"pws_weight: alpha has {alpha.numel()} values (shape {tuple(alpha.shape)}) "
                             f"for {rows} filters")
        a2 = a2.to(w.dtype)
        if perm is not None:
            a2 = a2.reshape(keep_shape)   # the kept dims in their order = the filter order of the rows
        out = out * (a2 * gain if gain != 1.0 else a2)
    elif gain != 1.0:
        out = out * gain
    if perm is None:
        out = out.view(weight.shape)
    return out.to(weight.dtype)


_BN_BACKWARD = torch.ops.aten.native_batch_norm_backward.default


class _PWSMany(torch.autograd.Function):
    """Eq. 12 for many weights in one autograd node. Layers whose weights have the same filter shape (``w.shape[1:]``)
    and the same γ, gain and α-ness form a group: one ``native_layer_norm`` over the rows of the concatenated
    [filters, n_l] matrix and one in-place multiply by α·gain per row (the ops of :func:`pws_weight`, so the same
    values), split back into per-layer views — a handful of native ops per *group* rather than per layer.

    Backward is one ``native_batch_norm_backward`` per group, with the rows as the channels of a [1, filters, n_l]
    batch, the layer norm's per-row E[w] and 1/sqrt(Var + γ) as the saved batch statistics and α·gain as the affine
    weight: training-mode batch norm of that batch *is* eq. 12, so its closed-form backward gives ∂L/∂W (eq. 13)
    and ∂L/∂(α·gain) = Σ g·x̂ per filter in one kernel, two passes over the weight (the layer-norm backward plus a
    separate Σ g·x̂ took five). Keeps only those per-filter statistics and α·gain (the weights are alive anyway and
    are re-concatenated in backward; no weight-sized x̂).

    The weights and α are kept as references with their version counters rather than through ``save_for_backward``:
    a layer whose weight changes in place after this node ran (α data-init on the first forward) computes its own
    weight and sends no gradient here, and must not make the other layers' backward fail. A gradient that does
    arrive for a changed tensor raises the usual "modified by an inplace operation" error. Differentiable once
    (no double backward, e.g. gradient penalties: use the per-layer path there).

    ``spec`` is a tuple of groups ``(layers, w_pos, a_pos, rows, n, gamma, gain, shape)``: the layers' output
    indices, the positions of their weights (and α, 1-d, or ``None``) among ``tensors``, their filter counts, n_l,
    γ, the gain and the shape of the concatenated weight.
    """

    @staticmethod
    def forward(ctx, spec: tuple, n_out: int, *tensors: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.set_materialize_grads(False)      # layers that were not used get None, not zeros
        outs: list[Tensor | None] = [None] * n_out
        saved = []
        for layers, w_pos, a_pos, rows, n, gamma, gain, shape, clip in spec:
            ws = [tensors[i] for i in w_pos]
            w = ws[0] if len(ws) == 1 else torch.cat(ws)
            r_all = shape[0]
            if a_pos is not None:
                al = [tensors[i] for i in a_pos]
                s = al[0] if len(al) == 1 else torch.cat(al)
                if gain != 1.0:
                    s = s * gain
                versions = [t._version for t in ws + al]
            else:
                al = []
                s = None if gain == 1.0 else torch.full((r_all,), gain, dtype=w.dtype, device=w.device)
                versions = [t._version for t in ws]
            # the ops of pws_weight (so the same values): x̂ by layer norm over the rows, then α·gain per row
            out, mean, rstd = torch.native_layer_norm(w.view(r_all, n), (n,), None, None, gamma)
            if s is not None:
                out.mul_(s.view(r_all, 1))
            out = out.view(shape)        # shapes as tuples of ints: a torch.Size argument costs 3× more
            mean, rstd = mean.view(r_all), rstd.view(r_all)
            if len(rows) == 1:
                outs[layers[0]] = out
            else:
                for k, o in zip(layers, out.split_with_sizes(rows)):
                    outs[k] = o
            saved.append((ws, al, versions, s, mean, rstd))
        ctx.spec = spec
        ctx.groups = saved
        return tuple(outs)  # type: ignore[arg-type]

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Tensor | None):  # type: ignore[override]
        needs = ctx.needs_input_grad
        res: list[Tensor | None] = [None] * len(needs)
        for (layers, w_pos, a_pos, rows, n, gamma, gain, shape, clip), (ws, al, versions, s, mean, rstd) in zip(
                ctx.spec, ctx.groups):
            gl = [grads[k] for k in layers]
            if all(g is None for g in gl):
                continue
            need_w = any(needs[i + 2] for i in w_pos)
            need_a = a_pos is not None and any(needs[i + 2] for i in a_pos)
            if not (need_w or need_a):
                continue
            # only the layers that send a gradient need their tensors unchanged: a layer changed in place after
            # this node ran computes its own weight, and its rows here get a zero gradient that is thrown away
            k = len(ws)
            for j, gj in enumerate(gl):
                if gj is not None and (ws[j]._version != versions[j] or (al and al[j]._version != versions[k + j])):
                    raise RuntimeError("pws_weights_fused: a weight or alpha needed for gradient computation has "
                                       "been modified by an inplace operation after the forward pass")
            if len(gl) == 1:
                g, w = gl[0], ws[0]
            else:
                g = torch.cat([x if x is not None else torch.zeros_like(t) for x, t in zip(gl, ws)])
                w = torch.cat(ws)
            r_all = shape[0]
            gw, gs, _ = _BN_BACKWARD(g.reshape(1, r_all, n), w.view(1, r_all, n), s, None, None, mean, rstd,
                                     True, gamma, [need_w, need_a, False])
            if need_w:
                if clip:   # unit-wise gradient clipping per filter (the rows), as unit_clip does per layer
                    pn = torch.linalg.vector_norm(w.view(r_all, n), dim=1, keepdim=True).clamp_min_(1e-3)
                    gn = torch.linalg.vector_norm(gw.view(r_all, n), dim=1, keepdim=True).clamp_min_(1e-30)
                    gw = gw.view(r_all, n) * (pn.mul_(clip) / gn).clamp_(max=1.0)
                gw = gw.view(shape)
                parts = (gw,) if len(rows) == 1 else gw.split_with_sizes(rows)
                for i, gi, p in zip(w_pos, gl, parts):
                    if gi is not None:
                        res[i + 2] = p
            if need_a:
                if gain != 1.0:
                    gs = gs.mul_(gain)
                if clip:   # per entry: |∂L/∂α| ≤ λ·max(|α|, 1e-3)
                    a_all = al[0] if len(al) == 1 else torch.cat(al)
                    bound = a_all.abs().clamp_min(1e-3).mul_(clip)
                    gs = torch.minimum(torch.maximum(gs, -bound), bound)
                parts = (gs,) if len(rows) == 1 else gs.split_with_sizes(rows)
                for i, gi, p in zip(a_pos, gl, parts):   # α is 1-d here (pws_weights_fused)
                    if gi is not None:
                        res[i + 2] = p
        return tuple(res)


def pws_weights_fused(weights: Sequence[Tensor], alphas: Sequence[Tensor | None], gammas: Sequence[float],
                      gains: Sequence[float], clips: Sequence[float] | None = None) -> list[Tensor]:
    """:func:`pws_weight` for many layers at once, as one autograd node (eq. 12 per filter ``weight[o]``).

    Same values as ``[pws_weight(w, γ, α, gain=g) for ...]`` and the same gradients up to float rounding (tested),
    at a fraction of the per-layer overhead: a step of a network with many small PWS layers is dominated by per-op
    dispatch and autograd bookkeeping, not by arithmetic, so layers with the same filter shape, γ and gain are
    standardized together by one native op. Each weight uses the default layout (filters along dim 0, contiguous,
    float32 or float64); each α has one value per filter (or is ``None``). ``clips``: per layer, the unit-wise
    gradient clipping λ of :func:`unit_clip` applied to ∂L/∂W (per filter) and ∂L/∂α (per entry) in the node's
    backward (0 = none; ``gamma="auto"`` layers). Used by :func:`pwsconv.fuse_standardization`.
    """
    if clips is None:
        clips = [0.0] * len(weights)
    if not (len(weights) == len(alphas) == len(gammas) == len(gains) == len(clips)):
        raise ValueError("pws_weights_fused: weights, alphas, gammas, gains and clips must have the same length")
    groups: dict[tuple, tuple[list[int], list[int], list[int] | None, list[int]]] = {}
    tensors: list[Tensor] = []
    for k, (w, a, gamma, gain, clip) in enumerate(zip(weights, alphas, gammas, gains, clips)):
        if w.dim() < 2 or not w.is_contiguous() or w.dtype in _LOW_PRECISION:
            raise ValueError(f"pws_weights_fused: needs contiguous float32/float64 weights with ≥ 2 dims, got "
                             f"{tuple(w.shape)} {w.dtype}")
        rows = w.shape[0]
        if a is not None and a.numel() != rows:
            raise ValueError(f"pws_weights_fused: alpha has {a.numel()} values for {rows} filters")
        key = (w.shape[1:], w.dtype, w.device, float(gamma), float(gain), a is not None, float(clip or 0.0))
        grp = groups.get(key)
        if grp is None:
            grp = groups[key] = ([], [], [] if a is not None else None, [])
        grp[0].append(k)
        grp[1].append(len(tensors))
        grp[3].append(rows)
        tensors.append(w)
        if a is not None:
            if a.dtype != w.dtype:
                a = a.to(w.dtype)
            if a.dim() != 1 or not a.is_contiguous():
                a = a.reshape(rows)
            grp[2].append(len(tensors))  # type: ignore[union-attr]
            tensors.append(a)
    spec = tuple((tuple(layers), tuple(w_pos), None if a_pos is None else tuple(a_pos), tuple(rows),
                  math.prod(key[0]), key[3], key[4], (sum(rows), *key[0]), key[6])
                 for key, (layers, w_pos, a_pos, rows) in groups.items())
    return list(_PWSMany.apply(spec, len(weights), *tensors))
