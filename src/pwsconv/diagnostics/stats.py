"""The statistics of the paper's variance-transmission analysis, as plain tensor functions.

Notation (Liu et al., AAAI 2021, "The Shift of the Average Gradient"): layer l has N_l filters W_o of n_l weights
each (a conv filter is ``weight[o]``, k×k×c elements; a linear "filter" is one output unit's row). ``Var`` and ``E``
are the population (biased, ddof = 0) variance and the mean over the elements named; ``Var_o`` is the population
variance over the N_l filters of a layer. All functions return 0-d tensors in ``dtype`` (float64 by default) so that
a caller can gather many of them and move them to the host in one transfer.

- :func:`filter_matrix`: the [N_l, n_l] view of a weight (filters as rows), for every conv/linear layout.
- :func:`weight_stats`: Var[W_o] (Figure 2(a)), Var_o[n_l·E[W_o]] (the filter-mean spread of eq. 5/6) and the
  transmission factor Σ_o ½·n_l·Var[W_o] / N_l of eq. 5; with γ, 1/sqrt(Var[W_o] + γ) (Figure 2(b)).
- :func:`update_stats`: Var[W_o − ΔW_o] / Var[W_o] (Figure 1(a)) and the shift of the average gradient
  Var_o[n_l·E[ΔW_o]] (Figure 1(b)).
- :func:`input_stats`: per-sample E(x), E(x²), E²(x) and E²(x)/E(x²) of a layer input (Figure 6).
- :func:`output_stats`: Var[Y_l] and its exact split into the within-channel and between-channel parts (eq. 14).
- :func:`predict_output_var`: Var[Y_l] as eq. 5 predicts it; :func:`eq15_factor`: the growth factor of eq. 15.
- :func:`channel_mean_stats`: the per-channel mean of ∇_Y L (zero under BN, eq. 8).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = [
    "is_tracked_layer",
    "is_transposed",
    "filter_matrix",
    "weight_stats",
    "update_stats",
    "grad_stats",
    "input_stats",
    "output_stats",
    "channel_mean_stats",
    "predict_output_var",
    "predict_output_var_from_input",
    "eq15_factor",
    "batched",
    "channel_dim",
    "stat_dtype",
]


def stat_dtype(device: torch.device, dtype: torch.dtype = torch.float64) -> torch.dtype:
    """float64 where the device has it (MPS does not: float32 there)."""
    if dtype == torch.float64 and device.type == "mps":
        return torch.float32
    return dtype


def is_tracked_layer(m: nn.Module) -> bool:
    """Every conv (1d/2d/3d and transposed, incl. PWS and other subclasses) and every ``nn.Linear`` subclass."""
    return isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))


def is_transposed(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd) and bool(getattr(m, "transposed", False))


def filter_matrix(module: nn.Module, w: Tensor) -> Tensor:
    """``w`` (a weight, an update or a gradient of ``module``'s weight) as an [N_l, n_l] matrix, one filter per row.

    Conv and linear: filter o is ``w[o]`` (n_l = in_channels/groups × kernel elements). Transposed conv (weight
    [C_in, C_out/G, *k]): filter o is output channel o's slice, the C_in/G × k weights that produce it (the layout
    PWS standardizes, eq. 12).
    """
    if w.dim() < 2:
        return w.reshape(w.shape[0] if w.dim() else 1, -1)
    if is_transposed(module):
        g = int(getattr(module, "groups", 1))
        cin, cout_g = w.shape[0], w.shape[1]
        k = math.prod(w.shape[2:]) if w.dim() > 2 else 1
        return w.reshape(g, cin // g, cout_g, k).permute(0, 2, 1, 3).reshape(g * cout_g, (cin // g) * k)
    return w.reshape(w.shape[0], -1)


def _pvar(t: Tensor, dim: int | None = None) -> Tensor:
    """Population variance (ddof = 0)."""
    if dim is None:
        return t.var(correction=0) if t.numel() > 0 else t.new_tensor(float("nan"))
    return t.var(dim=dim, correction=0)


def weight_stats(wf: Tensor, gamma: float | None = None, dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    """Statistics of the filters ``wf`` ([N_l, n_l], see :func:`filter_matrix`).

    Returns:
        w_var_min / w_var_mean / w_var_max: min / mean / max over o of Var[W_o] (Figure 2(a) plots the minimum).
        w_shift: Var_o[n_l·E[W_o]], the filter-mean spread that eq. 5 multiplies by E²[X_l] (Figure 1(b) for W).
        transmission: Σ_o ½·n_l·Var[W_o] / N_l, the factor by which eq. 5 carries Var[Y_{l-1}] to Var[Y_l]
            (1 for He-initialized filters, eq. 2).
        inv_std_min / inv_std_max (only when ``gamma`` is given): min / max over o of 1/sqrt(Var[W_o] + γ), the PWS
            denominator of eq. 12 that γ keeps from growing (Figure 2(b)).
    """
    wf = wf.detach().to(stat_dtype(wf.device, dtype))
    n = wf.shape[1]
    var_o = _pvar(wf, dim=1)
    mean_o = wf.mean(dim=1)
    out = {
        "w_var_min": var_o.min(),
        "w_var_mean": var_o.mean(),
        "w_var_max": var_o.max(),
        "w_shift": _pvar(n * mean_o),
        "transmission": (0.5 * n * var_o).mean(),
    }
    if gamma is not None:
        inv = 1.0 / torch.sqrt(var_o + gamma)
        out["inv_std_min"] = inv.min()
        out["inv_std_max"] = inv.max()
    return out


def update_stats(wf: Tensor, dwf: Tensor, dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    """Statistics of an update ΔW (``dwf``, [N_l, n_l]) of the filters ``wf``; the new filters are W − ΔW.

    Returns:
        var_ratio_mean / _min / _max: mean / min / max over o of Var[W_o − ΔW_o] / Var[W_o] (Figure 1(a)).
        shift: Var_o[n_l·E[ΔW_o]], the shift of the average gradient (Figure 1(b); ΔW = LR·∇W in the paper).
        shift_rel: shift / (n_l·E[ΔW²]), dimensionless: about 1 when the elements of ΔW were independent and
            zero-mean, larger when every filter's update has a systematic mean, 0 when every filter's update has mean
            zero (PWS, eq. 13).
        update_norm: ‖ΔW‖.
    """
    dt = stat_dtype(wf.device, dtype)
    wf = wf.detach().to(dt)
    dwf = dwf.detach().to(dt)
    n = wf.shape[1]
    ratio = _pvar(wf - dwf, dim=1) / _pvar(wf, dim=1)
    shift = _pvar(n * dwf.mean(dim=1))
    return {
        "var_ratio_mean": ratio.mean(),
        "var_ratio_min": ratio.min(),
        "var_ratio_max": ratio.max(),
        "shift": shift,
        "shift_rel": shift / (n * dwf.pow(2).mean()),
        "update_norm": torch.linalg.vector_norm(dwf),
    }


def grad_stats(gf: Tensor, dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    """Statistics of a weight gradient ∇W (``gf``, [N_l, n_l]) that need no learning rate.

    Returns:
        grad_norm: ‖∇W‖.
        grad_shift: Var_o[n_l·E[∇W_o]] (the shift of Figure 1(b) before multiplying by LR²).
        grad_shift_rel: grad_shift / (n_l·E[∇W²]) (see ``shift_rel`` of :func:`update_stats`; 0 for PWS, eq. 13).
    """
    gf = gf.detach().to(stat_dtype(gf.device, dtype))
    n = gf.shape[1]
    shift = _pvar(n * gf.mean(dim=1))
    return {
        "grad_norm": torch.linalg.vector_norm(gf),
        "grad_shift": shift,
        "grad_shift_rel": shift / (n * gf.pow(2).mean()),
    }


def batched(module: nn.Module, t: Tensor) -> Tensor:
    """``t`` with a batch dim: an unbatched conv input/output ([C, *spatial]) or a 1-d linear one gets dim 0 added."""
    if isinstance(module, nn.modules.conv._ConvNd):
        if t.dim() == len(module.kernel_size) + 1:
            return t.unsqueeze(0)
        return t
    return t.unsqueeze(0) if t.dim() == 1 else t


def channel_dim(module: nn.Module) -> int:
    """The output-channel dim of a batched output: 1 for convs, the last dim for linear layers."""
    return 1 if isinstance(module, nn.modules.conv._ConvNd) else -1


def input_stats(x: Tensor, dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    """Figure 6 statistics of a batched layer input X_l (dim 0 indexes the samples x of the batch).

    Following the caption of Figure 6, E(x) and E(x²) are the mean of the elements and of their squares in one sample
    x; the figure shows their range over the inputs. Returns:
        x_mean / x_sq: E[X_l] and E[X_l²] over all elements of the batch (the E[X_l] of eqs. 5, 6 and 15).
        x_mean_min / x_mean_max: range over the batch of E(x).
        x_sq_min / x_sq_max: range of E(x²).
        x_mean2_min / x_mean2_max: range of E²(x) (Figure 6(a)).
        x_ratio_mean / x_ratio_min / x_ratio_max: mean and range of E²(x)/E(x²) (Figure 6(b); eq. 15 uses it).
    """
    x = x.detach()
    x = x.reshape(x.shape[0], -1).to(stat_dtype(x.device, dtype)) if x.dim() else x.reshape(1, 1).to(dtype)
    m = x.mean(dim=1)
    s = x.pow(2).mean(dim=1)
    m2 = m * m
    r = m2 / s
    return {
        "x_mean": m.mean(),
        "x_sq": s.mean(),
        "x_mean_min": m.min(),
        "x_mean_max": m.max(),
        "x_sq_min": s.min(),
        "x_sq_max": s.max(),
        "x_mean2_min": m2.min(),
        "x_mean2_max": m2.max(),
        "x_ratio_mean": r.mean(),
        "x_ratio_min": r.min(),
        "x_ratio_max": r.max(),
    }


def _channels_first(t: Tensor, cdim: int) -> Tensor:
    return t.movedim(cdim, 0).reshape(t.shape[cdim], -1)


def output_stats(y: Tensor, cdim: int, dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    """Var[Y_l] of a batched layer output and its split (appendix, eq. 14): Var[Y_l] = mean_o Var[Y_o] + Var_o[E[Y_o]].

    Returns y_var (Var[Y_l] over all elements), y_mean (E[Y_l]), y_chan_var_mean (mean over channels o of Var[Y_o]),
    y_chan_mean_var (Var_o[E[Y_o]], the part the shift of the filter means feeds, eq. 5/6).
    """
    y = y.detach()
    yc = _channels_first(y, cdim).to(stat_dtype(y.device, dtype))
    return {
        "y_var": _pvar(yc),
        "y_mean": yc.mean(),
        "y_chan_var_mean": _pvar(yc, dim=1).mean(),
        "y_chan_mean_var": _pvar(yc.mean(dim=1)),
    }


def channel_mean_stats(g: Tensor, cdim: int, dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    """How far the output gradient ∇_{Y_o}L is from zero mean per channel (eq. 8: exactly zero after BN).

    Returns gy_mean_rel = max_o |E[∇_{Y_o}L]| / sqrt(E[(∇_Y L)²]) and gy_rms = sqrt(E[(∇_Y L)²]).
    """
    gc = _channels_first(g.detach(), cdim).to(stat_dtype(g.device, dtype))
    rms = gc.pow(2).mean().sqrt()
    return {"gy_mean_rel": gc.mean(dim=1).abs().max() / rms, "gy_rms": rms}


def predict_output_var(prev_y_var: Tensor | float, wf: Tensor, x_mean: Tensor | float,
                       dtype: torch.dtype = torch.float64) -> Tensor:
    """Eq. 5: Var[Y_l] = Var[Y_{l-1}] · Σ_o(½·n_l·Var[W_o]) / N_l + Var_o[n_l·E[W_o]·E[X_l]].

    ``wf`` are the filters the layer applies ([N_l, n_l]); ``x_mean`` is E[X_l] (a scalar, the same for every o, so
    the second term is E²[X_l]·Var_o[n_l·E[W_o]]). Like the paper, the bias is left out (b_l = 0).
    """
    wf = wf.detach().to(stat_dtype(wf.device, dtype))
    n = wf.shape[1]
    prev = torch.as_tensor(prev_y_var, dtype=wf.dtype, device=wf.device)
    xm = torch.as_tensor(x_mean, dtype=wf.dtype, device=wf.device)
    return prev * (0.5 * n * _pvar(wf, dim=1)).mean() + _pvar(n * wf.mean(dim=1) * xm)


def predict_output_var_from_input(x_sq: Tensor | float, wf: Tensor, x_mean: Tensor | float,
                                  dtype: torch.dtype = torch.float64) -> Tensor:
    """Eq. 5 with ½·Var[Y_{l-1}] replaced by the layer's own E[X_l²] (eq. 2: E[X_l²] = ½·Var[Y_{l-1}] after ReLU).

    Var[Y_l] = E[X_l²] · Σ_o(n_l·Var[W_o]) / N_l + E²[X_l]·Var_o[n_l·E[W_o]]. Unlike :func:`predict_output_var` it
    needs no previous layer, so it also applies to the first layer, after pooling, residual sums and norms.
    """
    wf = wf.detach().to(stat_dtype(wf.device, dtype))
    n = wf.shape[1]
    xs = torch.as_tensor(x_sq, dtype=wf.dtype, device=wf.device)
    xm = torch.as_tensor(x_mean, dtype=wf.dtype, device=wf.device)
    return xs * (n * _pvar(wf, dim=1)).mean() + xm * xm * _pvar(n * wf.mean(dim=1))


def eq15_factor(wf: Tensor, x_mean: Tensor | float, x_sq: Tensor | float,
                dtype: torch.dtype = torch.float64) -> Tensor:
    """Eq. 15: Var[Y_l] / Var[Y_{l-1}] ≈ 1 + E²[X_l] / (2·E[X_l²]) · Var_o[n_l·E[W_o]] for He-scaled filters.

    The product of these factors over the layers is the growth of the output variance with depth that the shift of
    the filter means causes (eq. 6).
    """
    wf = wf.detach().to(stat_dtype(wf.device, dtype))
    n = wf.shape[1]
    xm = torch.as_tensor(x_mean, dtype=wf.dtype, device=wf.device)
    xs = torch.as_tensor(x_sq, dtype=wf.dtype, device=wf.device)
    return 1.0 + xm * xm / (2.0 * xs) * _pvar(n * wf.mean(dim=1))
