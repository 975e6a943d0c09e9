"""The one training step: the step of the engine's loop (for every task: a classifier, a detector, the variance
probe's runs), of the probe's measurement without update, and the step the speed measurements time. Nothing else in
pwsconv calls ``.backward()``.

    loss, out = train_step(model, opt, x, y)                                   # classifier, fp32
    loss, out = train_step(model, opt, x, y, amp=torch.float16, device_type="cuda", scaler=torch.amp.GradScaler())
    loss, _ = train_step(detector, opt, images, targets, loss_fn=detection_loss)   # another task: its loss

A task says how a batch becomes a loss (``loss_fn(model, x, y) -> (loss, output)``; default: cross-entropy of the
logits, :func:`classification_loss`); ``after_forward`` sees the loss and output between forward and backward (a
probe records there, and can stop a step whose loss is not finite); ``before_step`` sees the gradients between
backward and the optimizer step (gradient clipping, a probe of the gradients).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["train_step", "classification_loss", "LossFn"]

#: ``loss_fn(model, x, y) -> (loss, output)``: how a task turns a batch into the scalar loss to minimize
LossFn = Callable[[nn.Module, Any, Any], "tuple[torch.Tensor, Any]"]


def classification_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``model(x)`` (the logits, in float32) against the labels ``y``; returns (loss, logits)."""
    out = model(x)
    return F.cross_entropy(out.float(), y), out


def train_step(model: nn.Module, opt: torch.optim.Optimizer | None, x: Any, y: Any, *,
               loss_fn: LossFn | None = None, amp: torch.dtype | None = None, device_type: str = "cpu",
               scaler: Any = None, after_forward: Callable[[torch.Tensor, Any], bool | None] | None = None,
               before_step: Callable[[], None] | None = None) -> tuple[torch.Tensor, Any]:
    """Gradients cleared (set to None), forward and loss (``loss_fn``, default :func:`classification_loss`; under ``torch.autocast(device_type, amp)``
    unless ``amp`` is None), ``after_forward(loss, output)`` (returning ``False`` ends the step there: no backward, no
    update), backward (of the loss scaled by ``scaler``, a GradScaler, if given), ``before_step()``, and the optimizer
    step (through ``scaler``, which is then updated). ``opt=None``: gradients only (cleared on the model, no step).
    Returns the loss (not detached) and the output."""
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    else:
        model.zero_grad(set_to_none=True)
    task = classification_loss if loss_fn is None else loss_fn
    if amp is None:
        loss, out = task(model, x, y)
    else:
        with torch.autocast(device_type, dtype=amp):
            loss, out = task(model, x, y)
    if after_forward is not None and after_forward(loss, out) is False:
        return loss, out
    if scaler is None:
        loss.backward()
        if before_step is not None:
            before_step()
        if opt is not None:
            opt.step()
    else:
        scaler.scale(loss).backward()
        if before_step is not None:
            before_step()
        if opt is not None:
            scaler.step(opt)
            scaler.update()
    return loss, out
