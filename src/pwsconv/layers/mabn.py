"""Moving Average Batch Normalization (MABN, Yan et al., ICLR 2020) with its weight-centralized conv (CenConv).

MABN restores BN at small batch sizes by replacing the batch statistics of the forward *and* of the backward pass by
simple moving averages over the last ``buffer_size = real_B // B`` iterations. It has no mean subtraction (the mean
is handled by the weight-centralized conv before it) and no running mean: it divides by the square root of the second
moment. Following the authors' layer, per channel:

Training forward (iteration ``t`` = 1, 2, ...; counter ``iters`` saved in the state_dict)::

    x2      = mean over (N, *spatial) of x²                 → ring buffer buffer_x2[t mod buffer_size]
    var     = x2                 if t ≤ buffer_size or t < warmup_iters
              mean(buffer_x2)    otherwise                 (simple moving average)
    z       = x / sqrt(var + eps)
    r       = sqrt(var + eps) / sqrt(running_var + eps)   clamped to exactly 1 while t ≤ max(1000, warmup_iters),
                                                          then to [1/5, 5]
    out     = weight · r · z + bias
    running_var ← momentum · running_var + (1 − momentum) · var          (momentum 0.98)

Backward (a custom autograd Function: intentionally *not* the true gradient once the averages kick in)::

    g       = grad_out · weight · r
    gz      = mean over (N, *spatial) of g · z              → ring buffer buffer_gz[t mod buffer_size]
    mean_gz = gz during warm-up (same test as above), else mean(buffer_gz)
    grad_x  = (g − z · mean_gz) / sqrt(var + eps)
    grad_weight = Σ grad_out · r · z,   grad_bias = Σ grad_out

During warm-up (r = 1, var = current x2) this *is* the exact gradient of out = weight·x/sqrt(mean(x²)+eps)+bias.

Eval: out = weight · x / sqrt(running_var + eps) + bias (an affine map per channel: foldable into the conv before it).
Any batch size works, including 1 (no mean is subtracted); ``B`` only sets the buffer length.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor, nn

from ._auto import link_loss_scaler, linked_scale
from ._checks import check_norm_input
from ._reparam import LOW_PRECISION, ReparamMixin, filter_dims

__all__ = ["CenConv1d", "CenConv2d", "CenConv3d", "MABN1d", "MABN2d", "MABN3d", "centered_weight"]


# ------------------------------------------------------------------------------------------------------ CenConv
def centered_weight(weight: Tensor) -> Tensor:
    """Weight centralization: each filter ``weight[o]`` minus its mean over (C_in/groups, *kernel); no scaling."""
    return weight - weight.mean(dim=filter_dims(weight), keepdim=True)


class _CenConvNd(ReparamMixin):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0,
                 dilation: Any = 1, groups: int = 1, bias: bool = False, padding_mode: str = "zeros",
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,  # type: ignore
                         dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode, device=device,
                         dtype=dtype)
        self._require_filter_of(2, "centering a single weight gives 0")
        self._finish_setup()

    def compute_weight(self) -> Tensor:
        """W − mean(W) per filter."""
        return centered_weight(self.weight)


_CEN_DOC = ("``nn.Conv{d}d`` with weight centralization (MABN's CenConv): each filter minus its mean over "
            "(C_in/groups, *kernel), no scaling. Same constructor as torch's but ``bias=False`` by default, as the "
            "authors recommend before MABN.")


class CenConv1d(_CenConvNd, nn.Conv1d):
    __doc__ = _CEN_DOC.format(d=1)
    _plain_cls = nn.Conv1d


class CenConv2d(_CenConvNd, nn.Conv2d):
    __doc__ = _CEN_DOC.format(d=2)
    _plain_cls = nn.Conv2d


class CenConv3d(_CenConvNd, nn.Conv3d):
    __doc__ = _CEN_DOC.format(d=3)
    _plain_cls = nn.Conv3d


# ------------------------------------------------------------------------------------------------------ MABN
def _in_warmup(it: int, buffer_size: int, warmup_iters: int) -> bool:
    return it <= buffer_size or it < warmup_iters


class _MABNFunction(torch.autograd.Function):
    """Forward and the custom backward of MABN (see the module docstring). Buffers are updated in place."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, running_var: Tensor, buffer_x2: Tensor,
                buffer_gz: Tensor, it: int, buffer_size: int, warmup_iters: int, eps: float,
                momentum: float, scale: Tensor | float | None = None) -> Tensor:
        dims = [0] + list(range(2, x.dim()))
        shape = (1, -1) + (1,) * (x.dim() - 2)
        cdt = torch.float32 if x.dtype in LOW_PRECISION else x.dtype
        xc = x.to(cdt)
        slot = it % buffer_size
        x2 = (xc * xc).mean(dim=dims)
        guard = scale is not None or x.dtype in LOW_PRECISION   # fp16 or a GradScaler: overflows kept out
        _store(buffer_x2[slot], x2, guard)
        var = x2 if _in_warmup(it, buffer_size, warmup_iters) else buffer_x2.mean(dim=0).to(cdt)
        std = torch.sqrt(var + eps)
        z = xc / std.view(shape)
        if it <= max(1000, warmup_iters):
            r = torch.ones_like(std)
        else:
            r = (std / torch.sqrt(running_var.to(cdt) + eps)).clamp(1.0 / 5.0, 5.0)
        y = z * r.view(shape)
        running_var.copy_(momentum * running_var + (1.0 - momentum) * var.to(running_var.dtype))
        out = y * weight.to(cdt).view(shape) + bias.to(cdt).view(shape)
        ctx.save_for_backward(z, std, r, weight)
        # written in backward: kept as attributes (not saved tensors) so that several forwards before their backwards
        # (gradient accumulation) do not trip autograd's version check
        ctx.buffer_gz = buffer_gz
        ctx.it, ctx.buffer_size, ctx.warmup_iters, ctx.scale, ctx.guard = it, buffer_size, warmup_iters, scale, guard
        return out.to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        z, std, r, weight = ctx.saved_tensors
        dims = [0] + list(range(2, z.dim()))
        shape = (1, -1) + (1,) * (z.dim() - 2)
        go = grad_out.to(z.dtype)
        grad_x = grad_w = grad_b = None
        g = go * (weight.to(z.dtype) * r).view(shape)
        gz = (g * z).mean(dim=dims)
        buffer_gz, scale = ctx.buffer_gz, ctx.scale   # scale: a linked GradScaler's, in every gradient here
        # updated as in the original, whatever needs a gradient; kept unscaled (exact: scales are powers of two)
        slot = buffer_gz[ctx.it % ctx.buffer_size]
        _store(slot, gz if scale is None else gz / scale, ctx.guard)
        if ctx.needs_input_grad[0]:
            if _in_warmup(ctx.it, ctx.buffer_size, ctx.warmup_iters):
                mean_gz = gz
            else:
                mean_gz = buffer_gz.mean(dim=0).to(z.dtype)
                mean_gz = mean_gz if scale is None else mean_gz * scale
            grad_x = ((g - z * mean_gz.view(shape)) / std.view(shape)).to(grad_out.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (go * z).sum(dim=dims).mul(r).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = go.sum(dim=dims).to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None, None, None


def _store(slot: Tensor, value: Tensor, guard: bool) -> None:
    """``slot`` ← ``value``; with ``guard`` (fp16 inputs or a linked GradScaler) only where it is finite: a statistic
    of an fp16 overflow (a step the GradScaler skips) would otherwise poison the moving averages for a whole window
    (no host sync; finite values are written as they are). Float32 and bfloat16 do not overflow in practice: no
    ops added there."""
    slot.copy_(torch.where(torch.isfinite(value), value, slot) if guard else value)


def _pos_int(v: Any, name: str) -> int:
    if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"MABN: {name} must be a positive int, got {v!r}")
    return int(v)


class _MABNNd(nn.Module):
    """Moving Average Batch Normalization (see the module docstring).

    Args:
        channels: number of channels C.
        B: the real batch size per device (only used for the buffer length).
        real_B: the batch size to simulate; must be a multiple of ``B``. ``buffer_size = real_B // B``.
        eps: 1e-5.  momentum: 0.98 (running_var ← momentum·running_var + (1 − momentum)·var).
        warmup_iters: 100 (iterations that use the current batch statistics).
    """

    #: read by :func:`pwsconv.param_groups`: weight and bias are norm affines
    is_norm_layer = True
    _input_dims: tuple[int, ...] = (4,)

    def __init__(self, channels: int, B: int, real_B: int, eps: float = 1e-5, momentum: float = 0.98,
                 warmup_iters: int = 100, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        channels, B, real_B = _pos_int(channels, "channels"), _pos_int(B, "B"), _pos_int(real_B, "real_B")
        if real_B % B:
            raise ValueError(
                f"MABN: real_B ({real_B}, the batch size to simulate) must be divisible by B ({B}, the real batch "
                f"size per device); buffer_size = real_B // B"
            )
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"MABN: momentum must be in [0, 1], got {momentum!r}")
        if not float(eps) > 0:
            raise ValueError(f"MABN: eps must be > 0, got {eps!r}")
        if isinstance(warmup_iters, bool) or not isinstance(warmup_iters, numbers.Integral) or warmup_iters < 0:
            raise ValueError(f"MABN: warmup_iters must be an int ≥ 0, got {warmup_iters!r}")
        fk = {"device": device, "dtype": dtype}
        self.num_features = channels
        self.B, self.real_B = B, real_B
        self.buffer_size = real_B // B
        self.eps = float(eps)
        self.momentum = float(momentum)
        self.warmup_iters = int(warmup_iters)
        self.weight = nn.Parameter(torch.ones(channels, **fk))
        self.bias = nn.Parameter(torch.zeros(channels, **fk))
        self.register_buffer("running_var", torch.ones(channels, **fk))
        self.register_buffer("iters", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("buffer_x2", torch.zeros(self.buffer_size, channels, **fk))
        self.register_buffer("buffer_gz", torch.zeros(self.buffer_size, channels, **fk))

    def reset_running_stats(self) -> None:
        self.running_var.fill_(1.0)
        self.iters.zero_()
        self.buffer_x2.zero_()
        self.buffer_gz.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        with torch.no_grad():
            self.weight.fill_(1.0)
            self.bias.zero_()

    def _check_input_dim(self, x: Tensor) -> None:
        check_norm_input(self, x, self._input_dims, self.num_features)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if self.training:
            self.iters.add_(1)
            it = int(self.iters)
            return _MABNFunction.apply(x, self.weight, self.bias, self.running_var, self.buffer_x2, self.buffer_gz,
                                       it, self.buffer_size, self.warmup_iters, self.eps, self.momentum,
                                       linked_scale(self))
        shape = (1, -1) + (1,) * (x.dim() - 2)
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        return x * scale.to(x.dtype).view(shape) + self.bias.to(x.dtype).view(shape)

    #: :func:`pwsconv.link_optimizer`'s ``scaler`` (fp16): the backward's moving average of Σ g·z is kept unscaled
    link_loss_scaler = link_loss_scaler

    def extra_repr(self) -> str:
        return (f"{self.num_features}, B={self.B}, real_B={self.real_B}, eps={self.eps:g}, momentum={self.momentum:g}, "
                f"warmup_iters={self.warmup_iters}")


class MABN1d(_MABNNd):
    __doc__ = "MABN for (N, C) or (N, C, L) inputs." + (_MABNNd.__doc__ or "")
    _input_dims = (2, 3)


class MABN2d(_MABNNd):
    __doc__ = "MABN for (N, C, H, W) inputs (the authors' layer)." + (_MABNNd.__doc__ or "")
    _input_dims = (4,)


class MABN3d(_MABNNd):
    __doc__ = "MABN for (N, C, D, H, W) inputs." + (_MABNNd.__doc__ or "")
    _input_dims = (5,)
