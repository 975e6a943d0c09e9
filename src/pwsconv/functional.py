"""Functional core of Parametric Weights Standardization (PWS).

Every PWS layer (1d/2d/3d convolutions, transposed convolutions, linear) calls :func:`pws_weight`;
nothing else in the package standardizes weights on its own.

Eq. 12 of Liu et al., "Delving into Variance Transmission and Normalization" (AAAI 2021)::

    Ŵ_o = sqrt(2 / n_l) · (W_o − E[W_o]) / sqrt(Var[W_o] + γ),      Y_o = α_o · (X ⊛ Ŵ_o) + β_o

with E and Var the mean and the population (biased) variance over the n_l elements of filter o.
α_o multiplies the kernel, which is the same as multiplying the output channel (Y_o is linear in Ŵ_o).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
from torch import Tensor
import torch.nn.functional as F

__all__ = ["pws_weight", "check_gamma", "check_clip", "he_std", "unit_clip",
           "AUTO_GAMMA",
           "AUTO_CLIP", "AUTO_CLIP_W", "AUTO_STEP", "AUTO_STEP_KNEE", "AUTO_CLIP_W_MIN", "CLIP_BIAS_FLOOR", "clip_bias", "auto_clip_w", "AUTO_BIAS_FLOOR",
           "auto_bias_floor", "AUTO_CLIP_MIN", "AUTO_CLIP_TOP", "AUTO_CLIP_KNEE", "AUTO_CLIP_FREE", "AUTO_CLIP_SPIKE",
           "auto_clip", "AUTO_CLIP_VECTOR", "auto_clip_vector", "clip_vectors",
           "AUTO_GAMMA_FREE", "auto_gamma"]

#: ``gamma="auto"``: γ relative to the He-init filter variance 2/n_l, i.e. γ_eff = AUTO_GAMMA · 2/n_l (the authors'
#: "equiv" rule), so that 1/sqrt(Var[W_o] + γ) is bounded at 1/sqrt(AUTO_GAMMA) ≈ 32× its He-init value whatever
#: the layer's width (Fig. 2), and γ never dominates the variance of a wide layer at init.
AUTO_GAMMA = 1e-3
#: ``gamma="auto"`` under SGD starting at an effective LR lr/(1 − m) up to :data:`AUTO_CLIP_FREE` (LR 0.1 at
#: momentum 0.9): γ relative to 2/n_l (:func:`auto_gamma`), near paper PWS's absolute 1e-3 on 3×3 convs — where weight
#: decay shrinks the filters, γ damps 1/sqrt(Var[W] + γ) as paper PWS's does (round 9, RESULTS.md). Above, where
#: the clips hold the filters' steps, :data:`AUTO_GAMMA`.
AUTO_GAMMA_FREE = 0.1
#: ``gamma="auto"``: the unit-wise adaptive gradient clipping λ (Brock et al. 2021) of α and β when the layer does
#: not know its optimizer's settings (no SGD group; RESULTS.md)
AUTO_CLIP = 0.01
#: ``gamma="auto"`` under SGD: λ of α and β just above the free range (:func:`auto_clip`; 0.01 in round 5, 0.005
#: since round 6)
AUTO_CLIP_TOP = 0.005
#: ``gamma="auto"`` under SGD: λ of α and β never below this above the free range (:func:`auto_clip`; with
#: AUTO_CLIP_TOP at the same value λ is 0.005 at every LR there)
AUTO_CLIP_MIN = 0.005
#: ``gamma="auto"`` under SGD: below this effective LR lr/(1 − m) λ of α and β grows as its inverse, like W's
#: (:func:`auto_clip`; 0: off) — above the free range :data:`AUTO_CLIP_FREE` only
AUTO_CLIP_KNEE = 0.0
#: ``gamma="auto"`` under SGD: up to this effective LR lr/(1 − m) (LR 0.1 at momentum 0.9), where paper PWS trains,
#: λ of α and β is :data:`AUTO_CLIP_SPIKE` — only spikes clipped (:func:`auto_clip`; 0: off; round 7, RESULTS.md)
AUTO_CLIP_FREE = 1.0
#: ``gamma="auto"`` under SGD: λ of α and β up to the effective LR :data:`AUTO_CLIP_FREE` (|∂L/∂α| ≤ |α|)
AUTO_CLIP_SPIKE = 1.0
#: ``gamma="auto"`` under SGD: above the effective LR :data:`AUTO_CLIP_FREE`, each layer's α (and β) is clipped as one
#: unit, ‖∂L/∂α‖ ≤ λ·max(‖α‖, 1e-3·sqrt(k)), keeping the gradient's direction, instead of per entry, where a bound
#: held on most steps makes sign descent (:func:`auto_clip_vector`; False: per entry, round 7; round 8, RESULTS.md)
AUTO_CLIP_VECTOR = True
#: ``gamma="auto"``: the unit-wise adaptive gradient clipping λ of each filter of W when the layer does not know its
#: optimizer's settings (a weight not in a :func:`pwsconv.param_groups` group of SGD): the value that trains at LR 1.6
AUTO_CLIP_W = 0.01
#: ``gamma="auto"`` under SGD: the largest step of a filter, relative to its norm, momentum included
#: (:func:`auto_clip_w`: λ of W = AUTO_STEP·(1 − m)/lr from the knee up, 0.02 at LR 0.4 with momentum 0.9; looser
#: below it, :data:`AUTO_STEP_KNEE`)
AUTO_STEP = 0.08
#: ``gamma="auto"`` under SGD: below this effective LR lr/(1 − m) (LR 0.4 at momentum 0.9) W's step bound loosens
#: as 1/lr — λ_W ∝ 1/lr², 0.32 at LR 0.1 — so that the clip leaves ordinary steps alone (0: off, the bound is
#: AUTO_STEP at every LR; RESULTS.md, round 5)
AUTO_STEP_KNEE = 4.0
#: ``gamma="auto"`` under SGD: λ of W never below this (reached from LR 1.6 with momentum 0.9). Below it weight decay
#: outpaces the filters' (orthogonal) gradient steps — they balance near sqrt(2·wd·(1 − m)/lr), 0.0056 at LR 3.2 with
#: wd 5e-4 — and the filters shrink: at LR 3.2 the plain CIFAR net then sat at chance (RESULTS.md)
AUTO_CLIP_W_MIN = 0.005
#: the floor of a bias's clipping bound, |∂L/∂β| ≤ λ·max(|β|, CLIP_BIAS_FLOOR) (α's is 1e-3, AGC's). A bias starts at
#: 0, where a floor of 1e-3 keeps its gradient below 1e-5 (λ 0.01); read at every forward
CLIP_BIAS_FLOOR = 1e-3
#: ``gamma="auto"`` under SGD: the largest floor of β's clipping bound (:func:`auto_bias_floor`), in force up to an
#: effective LR lr/(1 − m) of 1: β measured against the output's scale, which eq. 12's gain keeps near 1
AUTO_BIAS_FLOOR = 1.0

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
    """Validate γ of eq. 12: a finite number > 0 (not a string or a bool; with γ = 0 a constant filter is 0/0 = NaN).
    Returns it as a float."""
    v = _non_negative(gamma, "gamma", "a finite number > 0")
    if v <= 0:
        raise ValueError(f"gamma must be a finite number > 0 (γ = 0 divides a constant filter by zero), got {gamma!r}")
    return v


def check_clip(clip: float | None) -> float | None:
    """Validate a clipping λ: None (the default rule) or a finite number ≥ 0 (0 = off). Returns a float or None."""
    return None if clip is None else _non_negative(clip, "clip", "None or a non-negative finite number")


class _UnitClip(torch.autograd.Function):
    """Identity in forward; in backward the gradient is clipped unit-wise (see :func:`unit_clip`). Works under
    ``torch.func``'s reverse-mode transforms (under ``vmap`` each sample's gradient is clipped on its own). No
    forward-mode rule: a custom ``jvp`` makes ``torch.compile`` break its graph here (tested)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(p: Tensor, lam: float, dims: tuple[int, ...] | None,  # type: ignore[override]
                floor: float = 1e-3) -> Tensor:
        return p.view_as(p)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: Tensor) -> None:
        p, lam, dims, *floor = inputs
        ctx.save_for_backward(p)
        ctx.lam, ctx.dims, ctx.floor = lam, dims, floor[0] if floor else 1e-3

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        (p,) = ctx.saved_tensors
        lam, dims = ctx.lam, ctx.dims
        # out-of-place ops (the values of the in-place ones): differentiable again, and vmap has rules for them
        if dims is None:   # per entry: |g| ≤ λ·max(|p|, floor)
            bound = p.abs().clamp_min(ctx.floor) * lam
            return torch.clamp(g, -bound, bound), None, None, None
        ct = g.dtype if g.dtype in (torch.float32, torch.float64) else torch.float32   # float64 stays float64
        pf, gf = p.to(ct), g.to(ct)
        pn = torch.linalg.vector_norm(pf, dim=dims, keepdim=True).clamp_min(ctx.floor)   # a filter's: 1e-3
        gn = torch.linalg.vector_norm(gf, dim=dims, keepdim=True).clamp_min(1e-30)
        scale = (pn * lam / gn).clamp(max=1.0)
        return (gf * scale).to(g.dtype), None, None, None


def _clip_per_entry(g: Tensor, p: Tensor, lam: float | Tensor, floor: float | Tensor) -> Tensor:
    """``g`` clipped per entry to |g| ≤ λ·max(|p|, floor), out of place (one vector, or many concatenated; λ and the
    floor numbers or per-entry vectors)."""
    bound = p.abs().clamp_min_(floor).mul_(lam)
    return torch.clamp(g, -bound, bound)


def unit_clip(p: Tensor | None, lam: float | Tensor, dims: Sequence[int] | None = None, floor: float = 1e-3,
              vector: bool = False) -> Tensor | None:
    """Unit-wise adaptive gradient clipping (AGC, Brock et al. 2021, "High-performance large-scale image recognition
    without normalization"), as an identity op: the value is ``p``; the gradient flowing back through it is scaled
    so that ‖g_u‖ ≤ λ·max(‖p_u‖, 1e-3) for every unit u — a filter (the norm over ``dims``) for a weight, each entry
    for a vector (α, β; ``dims=None``; ``floor`` replaces 1e-3 there: β's is :data:`CLIP_BIAS_FLOOR`), or the whole
    vector as one unit with ``vector=True`` (‖g‖ ≤ λ·max(‖p‖, floor·sqrt(k)) for k entries; :func:`clip_vectors`). A
    per-filter scale keeps eq. 13: the clipped ∂L/∂W_o still has zero mean.
    ``None`` stays ``None``; without autograd (no grad mode, or ``p`` needs no gradient) ``p`` itself is returned."""
    if p is None or (not isinstance(lam, Tensor) and not lam) or not (p.requires_grad and torch.is_grad_enabled()):
        return p
    lam = lam if isinstance(lam, Tensor) else float(lam)   # a tensor: λ times a GradScaler's scale (no sync)
    if p.dim() <= 1:
        if vector:
            return _UnitClip.apply(p, lam, (0,) if p.dim() else (), float(floor) * math.sqrt(p.numel()))
        return _UnitClip.apply(p, lam, None, float(floor))
    nd = p.dim()
    d = tuple(range(1, nd)) if dims is None else tuple(sorted({int(x) % nd for x in dims}))
    return _UnitClip.apply(p, lam, d)


def clip_bias(b: Tensor | None, lam: float) -> Tensor | None:
    """:func:`unit_clip` of a bias, with the floor :data:`CLIP_BIAS_FLOOR` (read at every call)."""
    return unit_clip(b, lam, floor=CLIP_BIAS_FLOOR)


def clip_entries(gs: Sequence[Tensor], ps: Sequence[Tensor], lams: Sequence[float], floors: Sequence[float],
                 cat: bool | None = None) -> list[Tensor]:
    """Each entry of each gradient clipped to |g| ≤ λ·max(|p|, floor), out of place, with a handful of foreach ops
    for all the vectors (the fused node's α and β). On a CPU, where a foreach op is a loop
    of one kernel per vector, the vectors that share their dtypes are concatenated and clipped at once instead, λ
    and the floor as per-entry vectors (the same ops on each entry, so the same values; ``cat``: force either way)."""
    if (ps and ps[0].device.type == "cpu") if cat is None else cat:
        return _clip_entries_cat(gs, ps, lams, floors)
    bound = torch._foreach_abs(list(ps))
    torch._foreach_clamp_min_(bound, list(floors))
    torch._foreach_mul_(bound, list(lams))
    clipped = torch._foreach_maximum(list(gs), torch._foreach_neg(bound))
    torch._foreach_minimum_(clipped, bound)
    return clipped


def clip_vectors(gs: Sequence[Tensor], ps: Sequence[Tensor], lams: Sequence[float], floors: Sequence[float],
                 cat: bool | None = None) -> list[Tensor]:
    """Each gradient clipped as one unit to ‖g‖ ≤ λ·max(‖p‖, floor·sqrt(k)) (k entries), out of place, its
    direction kept — :func:`unit_clip` with ``vector=True`` — with a handful of foreach ops for all the vectors (the
    fused node's α and β above auto's free range). On a CPU, where a foreach op is a loop of one kernel per vector,
    the 1-d vectors of one dtype are concatenated and their norms taken as segment sums instead (the same bound, to
    float rounding; ``cat``: force either way)."""
    wide = (torch.float32, torch.float64)
    same = all(g.dtype in wide and p.dtype == g.dtype for g, p in zip(gs, ps))   # the usual case: no casts
    if (same and ps[0].device.type == "cpu") if cat is None else cat:
        if same and len({g.dtype for g in gs}) == 1 and all(g.dim() == 1 for g in gs):
            return _clip_vectors_cat(gs, ps, tuple(float(x) for x in lams), tuple(float(x) for x in floors))
    gf = list(gs) if same else [g if g.dtype in wide else g.float() for g in gs]
    pn = torch._foreach_norm(list(ps) if same else [p.to(g.dtype) for p, g in zip(ps, gf)])
    torch._foreach_clamp_min_(pn, [f * math.sqrt(p.numel()) for f, p in zip(floors, ps)])
    torch._foreach_mul_(pn, list(lams))
    torch._foreach_div_(pn, torch._foreach_clamp_min(torch._foreach_norm(gf), 1e-30))
    torch._foreach_clamp_max_(pn, 1.0)
    out = torch._foreach_mul(gf, pn)
    return out if same else [c.to(g.dtype) for c, g in zip(out, gs)]


def _clip_vectors_cat(gs: Sequence[Tensor], ps: Sequence[Tensor], lams: tuple[float, ...], floors: tuple[float, ...]
                      ) -> list[Tensor]:
    """:func:`clip_vectors` on the concatenated vectors: each vector's squared norm by one segment sum, the bound per
    vector, one scale per entry; the results are views of the product."""
    sizes = tuple(g.shape[0] for g in gs)
    lengths, floor, lam, index = _vector_constants(sizes, lams, floors, gs[0].dtype, gs[0].device)
    g, p = torch.cat(gs), torch.cat(ps)
    gn = torch.segment_reduce(g * g, "sum", lengths=lengths).sqrt().clamp_min(1e-30)   # out of place: differentiable
    scale = (torch.segment_reduce(p * p, "sum", lengths=lengths).sqrt().clamp_min(floor) * lam / gn).clamp_max(1.0)
    return list((g * scale.index_select(0, index)).split_with_sizes(sizes))


@functools.lru_cache(maxsize=64)
def _vector_constants(sizes: tuple[int, ...], lams: tuple[float, ...], floors: tuple[float, ...], dtype: torch.dtype,
                      device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The segment lengths, floor·sqrt(k), λ and the entries' vector index of :func:`_clip_vectors_cat` — fixed by
    the key, never changed in place; made outside inference mode, so a first call there cannot poison the cache."""
    with torch.inference_mode(False):
        lengths = torch.tensor(sizes, device=device)
        floor = torch.tensor([f * math.sqrt(k) for f, k in zip(floors, sizes)], dtype=dtype, device=device)
        index = torch.repeat_interleave(torch.arange(len(sizes), device=device), lengths)
        return lengths, floor, torch.tensor(lams, dtype=dtype, device=device), index


def _clip_entries_cat(gs: Sequence[Tensor], ps: Sequence[Tensor], lams: Sequence[float], floors: Sequence[float]
                      ) -> list[Tensor]:
    """:func:`clip_entries` with one set of ops per pair of dtypes on the concatenated vectors (:class:`_UnitClip`'s
    ops, λ and the floor as per-entry vectors where they differ: the same values); the results are views of the
    concatenation."""
    gt, pt = gs[0].dtype, ps[0].dtype
    if len(gs) > 1 and all(g.dtype == gt and p.dtype == pt and g.dim() == 1 for g, p in zip(gs, ps)):
        sizes = tuple(g.shape[0] for g in gs)     # the fused node's α and β: one class of vectors (Python kept short)
        lam, floor = _entry_constants(sizes, tuple(lams), tuple(floors), pt, ps[0].device)
        return list(_clip_per_entry(torch.cat(gs), torch.cat(ps), lam, floor).split_with_sizes(sizes))
    classes: dict[tuple, list[int]] = {}
    for i, (g, p) in enumerate(zip(gs, ps)):
        classes.setdefault((g.dtype, p.dtype), []).append(i)
    out: list[Tensor] = list(gs)
    for (_, dtype), idx in classes.items():
        if len(idx) == 1:
            i = idx[0]
            out[i] = _clip_per_entry(gs[i], ps[i], float(lams[i]), float(floors[i]))
            continue
        flat = all(gs[i].dim() == 1 for i in idx)    # α and β are: no views to make (each costs a dispatch)
        sizes = tuple(gs[i].numel() for i in idx)
        lam, floor = _entry_constants(sizes, tuple(float(lams[i]) for i in idx),
                                      tuple(float(floors[i]) for i in idx), dtype, ps[idx[0]].device)
        c = _clip_per_entry(torch.cat([gs[i] if flat else gs[i].reshape(-1) for i in idx]),
                            torch.cat([ps[i] if flat else ps[i].reshape(-1) for i in idx]), lam, floor)
        for i, v in zip(idx, c.split_with_sizes(sizes)):
            out[i] = v if flat else v.view_as(gs[i])
    return out


@functools.lru_cache(maxsize=64)
def _entry_constants(sizes: tuple[int, ...], lams: tuple[float, ...], floors: tuple[float, ...], dtype: torch.dtype,
                     device: torch.device) -> tuple[float | Tensor, float | Tensor]:
    """λ and the floor of :func:`_clip_entries_cat`: one number where all vectors share it, else a per-entry vector
    of ``dtype`` (the number each entry's op would use) — fixed by the key and never changed in place, so a cached
    entry cannot go stale."""
    def per_entry(values: tuple[float, ...]) -> float | Tensor:
        if len(set(values)) == 1:
            return values[0]
        return torch.repeat_interleave(torch.tensor(values, dtype=dtype), torch.tensor(sizes)).to(device)
    with torch.inference_mode(False):     # a first call under inference mode must not cache inference tensors
        return per_entry(lams), per_entry(floors)


def _sgd_setting(lr: object, momentum: object) -> tuple[float, float] | None:
    """(lr, momentum) as floats where the auto rules are defined (lr > 0 finite, 0 ≤ m < 1), else ``None``."""
    try:
        lr, m = float(lr), float(momentum)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return (lr, m) if math.isfinite(lr) and lr > 0 and 0 <= m < 1 else None


def _in_free_range(lr: float, m: float, free: float | None) -> bool:
    """Whether the effective LR lr/(1 − m) is at most ``free`` (default :data:`AUTO_CLIP_FREE`, read at the call; 0:
    no free range) — rounded: 0.1 / (1 − 0.9) is 1.0000000000000002 in floats."""
    free = AUTO_CLIP_FREE if free is None else free
    return bool(free) and round(lr / (1.0 - m), 12) <= free


def auto_clip_w(lr: float, momentum: float = 0.0, step: float = AUTO_STEP,
                floor: float = AUTO_CLIP_W_MIN, knee: float | None = None) -> float | None:
    """λ of W's filters for ``gamma="auto"`` under SGD: ``max(step · (1 − m) / lr, floor)``, or ``None`` where it is
    not defined (lr ≤ 0 or not finite, m outside [0, 1)). The first term is multiplied by max(1, knee·(1 − m)/lr)
    (``knee`` default :data:`AUTO_STEP_KNEE` = 4, read at the call): below the effective LR ``knee`` — LR 0.4 at m
    0.9 — the step bound loosens as 1/lr, to 32 % of a filter's norm at LR 0.1 and 128 % at 0.05. There the 8 % bound
    held a third of the filters at LR 0.1 and cost the plain CIFAR net 0.8 points (RESULTS.md); above LR 0.4 nothing
    changes.

    A bound on the *update*, not on the gradient: with ‖∂L/∂W_o‖ ≤ λ·‖W_o‖, one SGD step moves a filter by at most
    lr·λ/(1 − m) = ``step`` of its norm, momentum included (8 %). That is the throttle a large LR needs in its first
    steps, where unbounded steps kill the network (RESULTS.md), and it leaves ordinary steps alone: Ŵ (eq. 12) does
    not change with the scale of W, so under SGD with weight decay wd a filter settles at
    ‖∂L/∂W_o‖/‖W_o‖ ≈ sqrt(2·wd·(1 − m)/lr) (spherical motion dynamics), 0.032 at LR 0.1 with wd 5e-4 and m 0.9,
    below the bound (0.08, or 0.32 with the knee) there. From LR 1.6 (m 0.9) the floor holds λ at 0.005: tighter, the plain CIFAR net
    stopped learning at LR 3.2 (measured, RESULTS.md)."""
    sgd = _sgd_setting(lr, momentum)
    if sgd is None:
        return None
    lr, m = sgd
    knee = AUTO_STEP_KNEE if knee is None else knee
    return max(step * (1.0 - m) / lr * max(1.0, knee * (1.0 - m) / lr), floor)


def auto_clip(lr: float, momentum: float = 0.0, top: float | None = None, bottom: float | None = None,
              knee: float | None = None, free: float | None = None) -> float | None:
    """λ of α and β for ``gamma="auto"`` under SGD: ``AUTO_CLIP_SPIKE`` = 1 (only spikes clipped) up to the effective
    LR lr/(1 − m) ``free`` (default :data:`AUTO_CLIP_FREE` = 1: LR 0.1 at m 0.9); above it ``top·min(1, (1 − m)/lr)``
    (rounded to 12 decimals), never below ``bottom``, times ``max(1, knee·(1 − m)/lr)`` (defaults
    :data:`AUTO_CLIP_TOP` = :data:`AUTO_CLIP_MIN` = 0.005 and :data:`AUTO_CLIP_KNEE` = 0, read at the call: λ = 0.005
    from LR 0.2 at m 0.9), or ``None`` where it is not defined (as :func:`auto_clip_w`).

    Measured on the CIFAR medium preset (RESULTS.md): 0.005 from LR 0.2 gains 1–11 points at LR 0.4–3.2 over 0.01
    (round 5). Below, where paper PWS trains, a per-entry bound this tight holds α and β at it on most steps — each
    moves by a fixed step in the direction of its gradient's sign, however small that gradient — and on the plain
    net at four times the width its channels drifted apart and some died (1.4 points behind paper PWS at LR 0.1);
    with only spikes clipped there (round 7) auto follows paper PWS. Above the free range λ bounds each layer's α
    and β vector as one unit (:func:`auto_clip_vector`, round 8), so a held vector keeps its direction."""
    sgd = _sgd_setting(lr, momentum)
    if sgd is None:
        return None
    lr, m = sgd
    if _in_free_range(lr, m, free):
        return AUTO_CLIP_SPIKE
    top = AUTO_CLIP_TOP if top is None else top
    bottom = AUTO_CLIP_MIN if bottom is None else bottom
    knee = AUTO_CLIP_KNEE if knee is None else knee
    lam = max(round(top * min(1.0, (1.0 - m) / lr), 12), min(bottom, top))
    return round(lam * max(1.0, knee * (1.0 - m) / lr), 12)


def auto_clip_vector(lr: float, momentum: float = 0.0, free: float | None = None) -> bool | None:
    """Whether ``gamma="auto"`` under SGD clips each layer's α and β as one unit (:func:`clip_vectors`) rather than per
    entry: above the effective LR lr/(1 − m) ``free`` (default :data:`AUTO_CLIP_FREE`, where :func:`auto_clip` turns
    tight) while :data:`AUTO_CLIP_VECTOR` (both read at the call), or ``None`` where it is not defined (as
    :func:`auto_clip_w`).

    Above the free range the bound holds on most steps; per entry that is sign descent — each α and β moves by a
    fixed step in its gradient's sign, however small and noisy — and on the plain CIFAR net at four times the
    preset's width it cost 1.4 points at LR 0.1 (round 6). One bound per layer vector keeps the direction: a held
    vector takes a normalized-gradient step (round 8, RESULTS.md)."""
    sgd = _sgd_setting(lr, momentum)
    if sgd is None:
        return None
    lr, m = sgd
    return bool(AUTO_CLIP_VECTOR) and not _in_free_range(lr, m, free)


def auto_gamma(lr: float, momentum: float = 0.0, free: float | None = None) -> float | None:
    """γ of ``gamma="auto"`` under SGD, relative to the He-init filter variance 2/n_l: :data:`AUTO_GAMMA_FREE` up to
    the effective LR lr/(1 − m) ``free`` (default :data:`AUTO_CLIP_FREE`), :data:`AUTO_GAMMA` above (all read at the
    call); ``None`` where it is not defined (as :func:`auto_clip_w`). γ acts in the forward, so a layer chooses it
    once and keeps it in its state_dict (:mod:`pwsconv.layers._auto`)."""
    sgd = _sgd_setting(lr, momentum)
    if sgd is None:
        return None
    lr, m = sgd
    return AUTO_GAMMA_FREE if _in_free_range(lr, m, free) else AUTO_GAMMA


def auto_bias_floor(lr: float, momentum: float = 0.0, top: float | None = None,
                    bottom: float | None = None) -> float | None:
    """The floor of β's clipping bound for ``gamma="auto"`` under SGD, |∂L/∂β| ≤ λ·max(|β|, floor):
    ``((1 − m)/lr)²`` clamped to [``bottom``, ``top``] (default :data:`CLIP_BIAS_FLOOR` = 1e-3 and
    :data:`AUTO_BIAS_FLOOR` = 1, read at the call), or ``None`` where it is not defined (as :func:`auto_clip_w`).

    A bias starts at 0, so its bound is λ·floor. With 1e-3 (α's floor, AGC's) every bias of an auto run stayed below
    2e-3, and auto trailed paper PWS by 0.7–1 point on the CIFAR residual net at LR 0.05/0.1; a floor of 1 lets β
    move there (one step at most lr·λ/(1 − m) = 0.01 at LR 0.1, m 0.9) and closes that gap, but a free β at
    LR 1.6–3.2 cost 7–13 points (RESULTS.md). So the floor is 1 while the effective LR lr/(1 − m) is at most 1 (LR
    0.1 at m 0.9) and falls with its inverse square above: 0.0625 at LR 0.4, 0.0039 at 1.6, and 1e-3 from 3.2 —
    a bias's step at most λ·(1 − m)/lr there."""
    sgd = _sgd_setting(lr, momentum)
    if sgd is None:
        return None
    lr, m = sgd
    top = AUTO_BIAS_FLOOR if top is None else top
    bottom = CLIP_BIAS_FLOOR if bottom is None else bottom
    # rounded to 12 decimals: 1 − 0.9 is 0.09999999999999998 in floats, and LR 0.1 at m 0.9 should give exactly 1
    return min(top, max(round(((1.0 - m) / lr) ** 2, 12), bottom))


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
