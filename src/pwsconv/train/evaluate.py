"""Scoring a model: mean cross-entropy and accuracy over a loader (non-finite outputs counted: a collapse)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..accel import cached
from .devices import _autocast
from .result import NAN

__all__ = ["evaluate"]

def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, device: torch.device | str | None = None, amp: str | None = None,
             distributed: bool | None = None) -> dict[str, float]:
    """Mean cross-entropy loss and accuracy of ``model`` over ``loader`` (in eval mode, the mode restored; inside a
    :func:`pwsconv.cached` scope, so each reparameterized layer computes its weight once).

    Under torch.distributed with a sharded loader (``world_size > 1``) the sums are all-reduced, so every process
    gets the metrics of the whole set. Returns ``{"loss", "acc", "acc5", "n", "nonfinite"}`` (``acc5``: top-5
    accuracy, NaN with fewer than 5 classes; ``nonfinite``: how many images got a NaN or infinite output — their
    "accuracy" is meaningless, and the training loop counts any as a collapse).
    """
    model = _unwrap(model)
    was_training = model.training
    model.eval()
    dev = torch.device(device) if device is not None else next(
        (p.device for p in model.parameters()), torch.device("cpu"))
    sums = torch.zeros(5, dtype=torch.float64, device=dev)
    k5 = True
    try:
        with cached(model):   # each reparameterized weight computed once for the whole evaluation
            for x, y in loader:
                x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                with _autocast(dev, amp):
                    out = model(x)
                out = out.float()
                sums[0] += F.cross_entropy(out, y, reduction="sum").double()
                sums[1] += (out.argmax(1) == y).sum()
                sums[2] += y.numel()
                k5 = k5 and out.shape[1] >= 5
                if k5 and len(y):
                    sums[3] += (out.topk(5, dim=1).indices == y[:, None]).any(1).sum()
                sums[4] += (~torch.isfinite(out).reshape(len(out), -1).all(1)).sum()
    finally:
        model.train(was_training)
    if distributed is None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized() and \
            getattr(loader, "world_size", 1) > 1
    if distributed:
        torch.distributed.all_reduce(sums)
    loss, correct, n, correct5, nonfinite = sums.tolist()
    return {"loss": loss / n if n else NAN, "acc": correct / n if n else NAN,
            "acc5": correct5 / n if n and k5 else NAN, "n": int(n), "nonfinite": int(nonfinite)}
