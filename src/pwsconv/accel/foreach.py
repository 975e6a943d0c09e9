"""The fused node's (:mod:`pwsconv.accel.fused`) work on many tensors at once, with foreach ops: ``gamma="auto"``'s
unit-wise gradient clipping of every group's filters (:func:`pwsconv.functional.unit_clip`'s bound; α and β entries:
:func:`pwsconv.functional.clip_entries`, or each vector as one unit: :func:`~pwsconv.functional.clip_vectors`), and
the biases handed out through the node (cast to autocast's dtype all at once)."""

from __future__ import annotations

import functools
from typing import Sequence

import torch
from torch import Tensor

from ..functional import clip_entries, clip_vectors


def clip_units(ca: Sequence[tuple], scale: Tensor | float | None = None) -> list[tuple[int, Tensor]]:
    """The clipped gradients of α and β as (position, gradient): ``ca`` holds per vector (position, gradient, the α or
    β, λ, floor, per vector?) — per entry with :func:`~pwsconv.functional.clip_entries`, per vector with
    :func:`~pwsconv.functional.clip_vectors` (auto above its free range), each set in one call. ``scale``: the
    gradients are of a loss multiplied by it (a GradScaler's): clipped as g/scale, then multiplied back (the bounds
    × scale; exact for GradScaler's powers of two)."""
    out: list[tuple[int, Tensor]] = []
    for unit, fn in ((False, clip_entries), (True, clip_vectors)):
        part = [c for c in ca if bool(c[5]) == unit]
        if part:
            pos, gs, ps, lams, floors, _ = zip(*part)
            if scale is None:
                out += zip(pos, fn(gs, ps, lams, floors))
                continue
            clipped = fn(torch._foreach_div(list(gs), scale), ps, lams, floors)
            torch._foreach_mul_(clipped, scale)
            out += zip(pos, clipped)
    return out


def clip_filters_(cw: Sequence[tuple], cat: bool | None = None, scale: Tensor | float | None = None) -> None:
    """Clip, in place, each filter (row) of each group's ∂L/∂W to ‖∂L/∂W_o‖ ≤ λ_W·max(‖W_o‖, 1e-3) (× ``scale``, the
    loss scale the gradients carry, if given). ``cw``: per group (∂L/∂W as [rows, n], its per-row norms, λ_W, n, γ,
    the saved per-row mean and 1/sqrt(Var + γ)). Foreach ops, or on a CPU (a foreach op there is a loop of one
    kernel per tensor) the same ops on the concatenated rows (``cat``: force either way)."""
    gws, gns, lams, ns, gammas, means, rstds = zip(*cw)
    one_dtype = len({r.dtype for r in rstds}) == 1
    if (len(cw) > 1 and gws[0].device.type == "cpu" and one_dtype) if cat is None else cat:
        return _clip_filters_cat_(gws, gns, lams, ns, gammas, means, rstds, scale)
    # λ_W·max(‖W_o‖, 1e-3) from the saved statistics: ‖W_o‖² = n·(Var + E²) with Var = 1/rstd² − γ (no pass
    # over W), squared bound clamped below at (λ_W·1e-3)² (also a constant filter, Var < 0 by rounding)
    pn = torch._foreach_pow(rstds, -2.0)
    torch._foreach_add_(pn, [-g for g in gammas])
    torch._foreach_addcmul_(pn, means, means)
    torch._foreach_mul_(pn, [lam * lam * n for lam, n in zip(lams, ns)])
    torch._foreach_clamp_min_(pn, [lam * lam * 1e-6 for lam in lams])
    torch._foreach_sqrt_(pn)
    if scale is not None:
        torch._foreach_mul_(pn, scale)
    torch._foreach_div_(pn, gns)               # ‖∂L/∂W_o‖ = 0: +inf, clamped to 1 below
    torch._foreach_clamp_max_(pn, 1.0)
    torch._foreach_mul_(gws, [q.unsqueeze(1) for q in pn])   # in place: res holds views of these


def _clip_filters_cat_(gws, gns, lams, ns, gammas, means, rstds, scale=None) -> None:
    """:func:`clip_filters_` on a CPU, where a foreach op is a loop of one kernel per tensor: the same ops on the
    concatenated per-row statistics (so the same values), with each group's constants as per-row vectors. Where no
    filter is clipped, the gradients are left as they are (a CPU reads the test without waiting on a device)."""
    rows = tuple(g.shape[0] for g in gws)
    neg_gamma, mult, low = _row_constants(rows, lams, ns, gammas, rstds[0].dtype)
    mu = torch.cat(means)
    pn = torch.cat(rstds).pow_(-2.0)
    pn.add_(neg_gamma).addcmul_(mu, mu).mul_(mult).clamp_min_(low).sqrt_()
    if scale is not None:
        pn.mul_(scale)
    pn.div_(torch.cat(gns)).clamp_max_(1.0)
    if pn.min().item() >= 1.0:   # no filter clipped (W's usual case at an ordinary LR): every group's ×1 skipped
        return                   # (the same values; a NaN factor fails the test and is applied)
    for gw, q in zip(gws, pn.unsqueeze(1).split_with_sizes(rows)):
        gw.mul_(q)


@functools.lru_cache(maxsize=64)
def _row_constants(rows: tuple[int, ...], lams: tuple[float, ...], ns: tuple[int, ...], gammas: tuple[float, ...],
                   dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Per row of the concatenated groups (CPU): −γ, λ_W²·n and (λ_W·1e-3)² — fixed by the key, never changed in
    place, so a cached entry cannot go stale."""
    def per_row(values: list[float]) -> Tensor:
        return torch.repeat_interleave(torch.tensor(values, dtype=dtype), torch.tensor(rows))
    return (per_row([-g for g in gammas]), per_row([lam * lam * n for lam, n in zip(lams, ns)]),
            per_row([lam * lam * 1e-6 for lam in lams]))


def bias_views(bs: list[Tensor], cast: tuple[str, torch.dtype] | None) -> list[Tensor]:
    """The biases handed out by the node: views of themselves, or with ``cast`` (device type, dtype) the float32 ones
    on that device type in that dtype (one concatenation and one cast for all of them)."""
    out = [b.view_as(b) for b in bs]
    idx = _cast_idx(bs, cast)
    if idx:
        c = (bs[idx[0]] if len(idx) == 1 else torch.cat([bs[j] for j in idx])).to(cast[1])  # type: ignore[index]
        for j, v in zip(idx, c.split_with_sizes([bs[j].numel() for j in idx])):
            out[j] = v
    return out


def bias_grads(gs: Sequence[Tensor | None], bs: list[Tensor], cast: tuple[str, torch.dtype] | None
               ) -> list[Tensor | None]:
    """The biases' gradients in their own dtype (the backward of :func:`bias_views`)."""
    out = list(gs)
    idx = [j for j in _cast_idx(bs, cast) if gs[j] is not None]
    if idx:
        c = (gs[idx[0]] if len(idx) == 1 else torch.cat([gs[j] for j in idx])).to(torch.float32)
        for j, v in zip(idx, c.split_with_sizes([bs[j].numel() for j in idx])):
            out[j] = v
    return out


def _cast_idx(bs: list[Tensor], cast: tuple[str, torch.dtype] | None) -> list[int]:
    """Which biases the node casts: float32 ones on the device type of ``cast``."""
    if cast is None:
        return []
    return [j for j, b in enumerate(bs) if b.dtype == torch.float32 and b.device.type == cast[0]]
