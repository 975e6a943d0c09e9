"""One training step of a classifier: the step of the training engine, and the step the speed measurements time.

    loss, out = train_step(model, opt, x, y)                                   # fp32
    loss, out = train_step(model, opt, x, y, amp=torch.float16, device_type="cuda", scaler=torch.amp.GradScaler())
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["train_step"]


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *,
               amp: torch.dtype | None = None, device_type: str = "cpu", scaler: Any = None,
               before_step: Callable[[], None] | None = None,
               loss_fn: Callable[[nn.Module, Any, Any], tuple[torch.Tensor, Any]] | None = None
               ) -> tuple[torch.Tensor, Any]:
    """Gradients cleared (set to None), forward (under ``torch.autocast(device_type, amp)`` unless ``amp`` is None),
    cross-entropy of the logits in float32, backward (of the loss scaled by ``scaler``, a GradScaler, if given),
    ``before_step()`` (e.g. a probe of the gradients), and the optimizer step (through ``scaler``, which is then
    updated). Returns the loss (not detached) and the logits.

    ``loss_fn(model, x, y) -> (loss, out)`` replaces forward + cross-entropy for other tasks (a torchvision detector:
    ``lambda m, images, targets: (sum(m(images, targets).values()), None)``)."""
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device_type, dtype=amp) if amp is not None else contextlib.nullcontext():
        if loss_fn is not None:
            loss, out = loss_fn(model, x, y)
        else:
            out = model(x)
            loss = F.cross_entropy(out.float(), y)
    if scaler is None:
        loss.backward()
        if before_step is not None:
            before_step()
        opt.step()
    else:
        scaler.scale(loss).backward()
        if before_step is not None:
            before_step()
        scaler.step(opt)
        scaler.update()
    return loss, out
