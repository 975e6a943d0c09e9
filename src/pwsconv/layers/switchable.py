"""Switchable Normalization (Luo et al., ICLR 2019), following the authors' 2-d layer.

Per sample n and channel c, the instance statistics over the spatial positions (L = H·W) are

    mean_in = mean(x),   var_in = unbiased var(x)   (L = 1, e.g. 1×1 maps or (N, C) input: var_in = 0, not NaN)

and the layer and batch statistics are derived from them:

    mean_ln = mean_c(mean_in),   var_ln = mean_c(var_in + mean_in²) − mean_ln²
    mean_bn = mean_n(mean_in),   var_bn = mean_n(var_in + mean_in²) − mean_bn²

Means and variances are mixed with **separate** softmax weights (``mean_weight``, ``var_weight``; 3 each, or 2 with
``using_bn=False``; initialised equal): out = (x − Σ w_k mean_k)/sqrt(Σ v_k var_k + eps) · weight + bias.

Only the BN component keeps running statistics (initialised to 0 as in the authors' code); IN and LN are always
computed from the sample, also in eval mode (so SN does not fold into the conv). ``using_moving_average=True``:
running ← momentum·running + (1 − momentum)·batch with momentum 0.9. ``using_moving_average=False`` ("batch
average"): training forwards *add* mean_bn to ``running_mean`` and mean_bn² + var_bn to ``running_var``; run a
calibration pass with :func:`sn_batch_average` (or :meth:`SwitchNorm2d.finalize_batch_average`) before evaluating.
``using_bn=False`` mixes IN and LN only (advised at one image per device) and has no running statistics.
"""

from __future__ import annotations

import numbers
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ._checks import check_norm_input

from ._reparam import LOW_PRECISION

__all__ = ["SwitchNorm1d", "SwitchNorm2d", "SwitchNorm3d", "sn_batch_average"]


class _SwitchNormNd(nn.Module):
    """Switchable Normalization (see the module docstring).

    Args:
        num_features: channels C.
        eps: 1e-5.  momentum: 0.9 (running ← momentum·running + (1 − momentum)·batch).
        using_moving_average: True (exponential moving average); False: accumulate raw sums for a "batch average"
            calibration pass.
        using_bn: True (mix IN, LN, BN); False: IN and LN only, no running statistics.
        last_gamma: initialise ``weight`` to 0 (the authors' option for the last norm of a residual branch).
    """

    #: read by :func:`pwsconv.param_groups`: weight and bias (and the mixture logits) are norm parameters
    is_norm_layer = True
    #: why :func:`pwsconv.fold` leaves this layer as it is (it names it in a warning)
    cannot_fold = "its output mixes per-sample (IN/LN) statistics, not a fixed per-channel affine"
    _input_dims: tuple[int, ...] = (4,)

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.9, using_moving_average: bool = True,
                 using_bn: bool = True, last_gamma: bool = False, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        if not isinstance(num_features, numbers.Integral) or isinstance(num_features, bool) or num_features <= 0:
            raise ValueError(f"{type(self).__name__}: num_features must be a positive int, got {num_features!r}")
        if not float(eps) > 0:
            raise ValueError(f"{type(self).__name__}: eps must be > 0, got {eps!r}")
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"{type(self).__name__}: momentum must be in [0, 1], got {momentum!r}")
        fk = {"device": device, "dtype": dtype}
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.momentum = float(momentum)
        self.using_moving_average = bool(using_moving_average)
        self.using_bn = bool(using_bn)
        self.last_gamma = bool(last_gamma)
        k = 3 if self.using_bn else 2
        self.weight = nn.Parameter(torch.ones(self.num_features, **fk))
        self.bias = nn.Parameter(torch.zeros(self.num_features, **fk))
        self.mean_weight = nn.Parameter(torch.ones(k, **fk))
        self.var_weight = nn.Parameter(torch.ones(k, **fk))
        if self.using_bn:
            self.register_buffer("running_mean", torch.zeros(self.num_features, **fk))
            self.register_buffer("running_var", torch.zeros(self.num_features, **fk))
            self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long, device=device))
        self.reset_parameters()

    # ------------------------------------------------------------------ state
    def reset_running_stats(self) -> None:
        """Zero the BN component's running statistics (and the batch counter)."""
        if self.using_bn:
            self.running_mean.zero_()
            self.running_var.zero_()
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        with torch.no_grad():
            self.weight.fill_(0.0 if self.last_gamma else 1.0)
            self.bias.zero_()
            self.mean_weight.fill_(1.0)
            self.var_weight.fill_(1.0)

    @torch.no_grad()
    def finalize_batch_average(self, num_batches: int | None = None) -> None:
        """Turn the raw sums of ``using_moving_average=False`` into mean and variance: mean = Σmean_bn/k,
        var = Σ(mean_bn² + var_bn)/k − mean² (k = ``num_batches``, default: forwards since the last reset)."""
        if not self.using_bn:
            return
        k = int(self.num_batches_tracked) if num_batches is None else int(num_batches)
        if k <= 0:
            raise ValueError(f"{type(self).__name__}.finalize_batch_average: no batches accumulated")
        self.running_mean.div_(k)
        self.running_var.div_(k).sub_(self.running_mean ** 2)

    def mixture_weights(self) -> tuple[Tensor, Tensor]:
        """The softmax importance weights (means, variances), ordered IN, LN[, BN]."""
        return torch.softmax(self.mean_weight, 0), torch.softmax(self.var_weight, 0)

    # ------------------------------------------------------------------ forward
    def _check_input_dim(self, x: Tensor) -> None:
        check_norm_input(self, x, self._input_dims, self.num_features)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        n, c = x.shape[:2]
        xv = x.reshape(n, c, -1)
        if xv.dtype in LOW_PRECISION:
            xv = xv.float()
        length = xv.shape[-1]
        mean_in = xv.mean(-1, keepdim=True)
        # unbiased over the spatial positions as the authors; a single position has variance 0 (not NaN)
        var_in = xv.var(-1, keepdim=True, correction=1 if length > 1 else 0)
        mean_ln = mean_in.mean(1, keepdim=True)
        temp = var_in + mean_in ** 2
        var_ln = temp.mean(1, keepdim=True) - mean_ln ** 2
        mw, vw = self.mixture_weights()
        mw, vw = mw.to(xv.dtype), vw.to(xv.dtype)
        mean = mw[0] * mean_in + mw[1] * mean_ln
        var = vw[0] * var_in + vw[1] * var_ln
        if self.using_bn:
            if self.training:
                mean_bn = mean_in.mean(0, keepdim=True)
                var_bn = temp.mean(0, keepdim=True) - mean_bn ** 2
                with torch.no_grad():
                    mb = mean_bn.detach().view(-1).to(self.running_mean.dtype)
                    vb = var_bn.detach().view(-1).to(self.running_var.dtype)
                    if self.using_moving_average:
                        self.running_mean.mul_(self.momentum).add_((1 - self.momentum) * mb)
                        self.running_var.mul_(self.momentum).add_((1 - self.momentum) * vb)
                    else:
                        self.running_mean.add_(mb)
                        self.running_var.add_(mb ** 2 + vb)
                    self.num_batches_tracked.add_(1)
            else:
                mean_bn = self.running_mean.to(xv.dtype).view(1, c, 1)
                var_bn = self.running_var.to(xv.dtype).view(1, c, 1)
            mean = mean + mw[2] * mean_bn
            var = var + vw[2] * var_bn
        out = (xv - mean) / torch.sqrt(var + self.eps)
        out = out * self.weight.to(out.dtype).view(1, c, 1) + self.bias.to(out.dtype).view(1, c, 1)
        return out.reshape(x.shape).to(x.dtype)

    def extra_repr(self) -> str:
        s = f"{self.num_features}, eps={self.eps:g}, momentum={self.momentum:g}"
        if not self.using_moving_average:
            s += ", using_moving_average=False"
        if not self.using_bn:
            s += ", using_bn=False"
        if self.last_gamma:
            s += ", last_gamma=True"
        return s


class SwitchNorm1d(_SwitchNormNd):
    __doc__ = "Switchable Normalization for (N, C) or (N, C, L) inputs.\n\n    " + (_SwitchNormNd.__doc__ or "")
    _input_dims = (2, 3)


class SwitchNorm2d(_SwitchNormNd):
    __doc__ = "Switchable Normalization for (N, C, H, W) inputs (the authors' layer).\n\n    " + (
        _SwitchNormNd.__doc__ or "")
    _input_dims = (4,)


class SwitchNorm3d(_SwitchNormNd):
    __doc__ = "Switchable Normalization for (N, C, D, H, W) inputs.\n\n    " + (_SwitchNormNd.__doc__ or "")
    _input_dims = (5,)


@torch.no_grad()
def sn_batch_average(model: nn.Module, batches: Iterable[Any], num_batches: int | None = None) -> int:
    """The authors' "batch average" calibration for SN layers built with ``using_moving_average=False``.

    Zeroes the running statistics of every such layer, runs ``model`` in train mode (no gradients) on ``batches``
    (each item is passed as ``model(item)``, or ``model(*item)`` for tuples/lists — pass only the inputs), at most
    ``num_batches`` of them, then sets running_mean = Σmean_bn/k and running_var = Σ(mean_bn² + var_bn)/k −
    running_mean². The model's train/eval modes are restored. Returns k, the number of batches used.
    """
    layers = [m for m in model.modules() if isinstance(m, _SwitchNormNd) and m.using_bn and not m.using_moving_average]
    modes = {m: m.training for m in model.modules()}
    for m in layers:
        m.reset_running_stats()
    model.train()
    k = 0
    try:
        for item in batches:
            if num_batches is not None and k >= num_batches:
                break
            model(*item) if isinstance(item, (tuple, list)) else model(item)
            k += 1
    finally:
        for m, mode in modes.items():
            m.training = mode
    if k == 0:
        raise ValueError("sn_batch_average: no batches given")
    for m in layers:
        m.finalize_batch_average(k)
    return k
