"""The fused node's (:mod:`pwsconv.accel.fused`) work on many tensors at once, with foreach ops: ``gamma="auto"``'s
unit-wise gradient clipping of every group's filters (:func:`pwsconv.functional.unit_clip`'s bound; α and β entries:
:func:`pwsconv.functional.clip_entries`), and the biases handed out through the node (cast to autocast's dtype all
at once)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def clip_filters_(cw: Sequence[tuple]) -> None:
    """Clip, in place, each filter (row) of each group's ∂L/∂W to ‖∂L/∂W_o‖ ≤ λ_W·max(‖W_o‖, 1e-3). ``cw``: per
    group (∂L/∂W as [rows, n], its per-row norms, λ_W, n, γ, the saved per-row mean and 1/sqrt(Var + γ))."""
    gws, gns, lams, ns, gammas, means, rstds = zip(*cw)
    # λ_W·max(‖W_o‖, 1e-3) from the saved statistics: ‖W_o‖² = n·(Var + E²) with Var = 1/rstd² − γ (no pass
    # over W), squared bound clamped below at (λ_W·1e-3)² (also a constant filter, Var < 0 by rounding)
    pn = torch._foreach_pow(rstds, -2.0)
    torch._foreach_add_(pn, [-g for g in gammas])
    torch._foreach_addcmul_(pn, means, means)
    torch._foreach_mul_(pn, [lam * lam * n for lam, n in zip(lams, ns)])
    torch._foreach_clamp_min_(pn, [lam * lam * 1e-6 for lam in lams])
    torch._foreach_sqrt_(pn)
    torch._foreach_div_(pn, gns)               # ‖∂L/∂W_o‖ = 0: +inf, clamped to 1 below
    torch._foreach_clamp_max_(pn, 1.0)
    torch._foreach_mul_(gws, [q.unsqueeze(1) for q in pn])   # in place: res holds views of these


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
