"""How hard a layer's gradient clipping cuts, for :class:`pwsconv.diagnostics.VarianceProbe` (``*_clip_kept``).

The layer's ``unit_clip`` nodes sit between its output and its parameters; a pre-hook on such a node sees the
gradient before it is clipped. The probe hooks them on recorded forwards only (nothing is kept on the layer)."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch
from torch import Tensor, nn

from . import stats as S


def hook_clips(out: Tensor, x: Any, m: nn.Module, record: Callable[[str, Tensor, Tensor], None],
               dtype: torch.dtype | None = None) -> None:
    """Hook the clipping nodes of ``m`` found from ``out`` (not through its input ``x``): each calls
    ``record(kind, held, kept)`` in backward, kind "w", "alpha" or "bias": held, the share of units (filters; entries,
    or the whole vector where α and β are clipped per vector) at their bound;
    kept = ‖clipped ∇‖ / ‖unclipped ∇‖."""
    stop = x.grad_fn if isinstance(x, Tensor) else None
    ptrs = {t.data_ptr(): key for key in ("alpha", "bias") if isinstance(t := getattr(m, key, None), Tensor)}
    todo, seen = [out.grad_fn], set()
    while todo and len(seen) < 64:          # the weight and bias paths are a few nodes long
        node = todo.pop()
        if node is None or node is stop or id(node) in seen:
            continue
        seen.add(id(node))
        if type(node).__name__ == "_UnitClipBackward":
            p = node.saved_tensors[0]
            key = ptrs.get(p.data_ptr(), "w" if node.dims is not None else None)   # α, β: per entry or vector
            if key is not None:
                node.register_prehook(partial(_prehook, record, key, p, node.lam, node.dims,
                                              getattr(node, "floor", 1e-3), dtype))
            continue
        todo.extend(n for n, _ in node.next_functions)


def _prehook(record: Callable[[str, Tensor, Tensor], None], key: str, p: Tensor, lam: float, dims: Any, floor: float,
             dtype: torch.dtype | None, grads: tuple) -> None:
    g = grads[0]
    if g is None:
        return
    with torch.no_grad():
        dt = S.stat_dtype(g.device, dtype or torch.float64)
        gf, pf = g.detach().to(dt), p.detach().to(dt)
        if dims is None:
            bound, gn = pf.abs().clamp_min(floor) * lam, gf.abs()
        else:
            bound = torch.linalg.vector_norm(pf, dim=dims).clamp_min(floor) * lam   # a filter's floor: 1e-3
            gn = torch.linalg.vector_norm(gf, dim=dims)
        held = (gn >= bound * (1 - 1e-3)).to(dt).mean()
        record(key, held, torch.linalg.vector_norm(torch.minimum(gn, bound)) / torch.linalg.vector_norm(gn).clamp_min(1e-30))
