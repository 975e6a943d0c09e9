"""PNG plots in the look of the paper's Figures 1, 2 and 6, one curve per method.

Every function takes ``records_by_method``: a dict ``{method name: records}`` where records is a list of probe
records or a :class:`~pwsconv.diagnostics.VarianceProbe` (a bare list/probe is plotted as one unnamed curve), and a
PNG ``path``; it returns ``path``. Values over several recorded steps are aggregated per layer with ``agg``
(NaN ignored). matplotlib is imported lazily and used through its Agg canvas only (no pyplot, no global backend
change), so the plots work headless and in threads.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

from .records import as_records, layer_profile, step_series

__all__ = ["plot_figure1", "plot_figure2", "plot_figure6", "plot_variance_transmission", "plot_clipping", "has_clipping"]


def _figure(ncols: int, width: float = 5.2, height: float = 3.8, nrows: int = 1):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - matplotlib is in the "suite" extra
        raise ImportError("pwsconv.diagnostics plots need matplotlib: pip install 'pwsconv[suite]'") from e
    fig = Figure(figsize=(width * ncols, height * nrows))
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(ncols * nrows)]
    return fig, axes


def _save(fig: Any, path: str | os.PathLike) -> str | os.PathLike:
    from ..train.checkpoint import atomic_save_figure

    fig.tight_layout()
    atomic_save_figure(fig, path)
    return path


def _methods(records_by_method: Any) -> dict[str, list[dict]]:
    if isinstance(records_by_method, Mapping):
        return {str(k): as_records(v) for k, v in records_by_method.items()}
    return {"": as_records(records_by_method)}


def _finite(vals: list[float]) -> list[float]:
    return [v for v in vals if v == v and math.isfinite(v)]


def _maybe_log(ax: Any, values: list[float]) -> None:
    """A y axis on which every curve stays readable when one run collapses: log scale when every finite value is
    positive and they span more than two decades; otherwise, when a few values lie far outside the bulk (a run
    blowing up), the axis is clipped to the bulk and says so."""
    fin = sorted(_finite(values))
    if not fin:
        return
    if fin[0] > 0 and fin[-1] / fin[0] > 100:
        ax.set_yscale("log")
        return
    lo, hi = fin[int(0.02 * (len(fin) - 1))], fin[int(round(0.98 * (len(fin) - 1)))]
    span = hi - lo if hi > lo else max(abs(hi), 1e-12)
    if fin[-1] > hi + 10 * span or fin[0] < lo - 10 * span:
        kept = [v for v in fin if lo - 10 * span <= v <= hi + 10 * span]   # everything but the far outliers
        pad = 0.05 * (kept[-1] - kept[0] or span)
        ax.set_ylim(kept[0] - pad, kept[-1] + pad)
        ax.text(0.99, 0.98, f"axis clipped; values from {fin[0]:.3g} to {fin[-1]:.3g}", ha="right", va="top",
                transform=ax.transAxes, fontsize=7, color="0.35")


def _x(idx: list[int]) -> list[int]:
    return [i + 1 for i in idx]  # the paper counts layers from 1


def _empty(ax: Any, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def plot_figure1(records_by_method: Any, path: str | os.PathLike, *, weight: str = "raw", agg: str = "mean",
                 step: int | None = None) -> str | os.PathLike:
    """Figure 1: (a) Var[W_o − ΔW_o] / Var[W_o] per layer (line: mean over filters, band: min–max over filters);
    (b) the shift of the average gradient Var_o[n_l·E[ΔW_o]] per layer.

    ``weight="raw"`` plots the weight the optimizer updates (for PWS, eq. 13 makes its shift ≈ 0);
    ``"effective"`` plots the weight the layer applies (``eff.*``, falling back to raw for plain layers).
    """
    pre = "eff." if weight == "effective" else ""
    fb = (lambda s: s) if pre else (lambda s: None)
    fig, (ax_a, ax_b) = _figure(2, height=4.1)
    all_a: list[float] = []
    all_b: list[float] = []
    any_a = any_b = False
    for method, recs in _methods(records_by_method).items():
        idx, _, mean = layer_profile(recs, pre + "var_ratio_mean", agg, step, fallback=fb("var_ratio_mean"))
        if idx:
            any_a = True
            line, = ax_a.plot(_x(idx), mean, marker="o", ms=3, label=method or None)
            all_a += mean
            i_lo, _, lo = layer_profile(recs, pre + "var_ratio_min", "min", step, fallback=fb("var_ratio_min"))
            i_hi, _, hi = layer_profile(recs, pre + "var_ratio_max", "max", step, fallback=fb("var_ratio_max"))
            if i_lo == idx and i_hi == idx:
                ax_a.fill_between(_x(idx), lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
                all_a += lo + hi
        idx, _, shift = layer_profile(recs, pre + "shift", agg, step, fallback=fb("shift"))
        if idx:
            any_b = True
            all_b += shift
            ax_b.plot(_x(idx), shift, marker="o", ms=3, label=method or None)
    ax_a.set_title("(a) Var[W_o − ΔW_o] / Var[W_o]")
    ax_a.set_xlabel("layer")
    ax_b.set_title("(b) shift of the average gradient  Var[n_l E[ΔW_o]]")
    ax_b.set_xlabel("layer")
    _maybe_log(ax_a, all_a)
    _maybe_log(ax_b, all_b)
    fig.suptitle("Figure 1, effective weights: what each layer applies (PWS: α·Ŵ, eq. 12)" if pre else
                 "Figure 1, raw weights: the parameters SGD updates (PWS: W before standardization)", fontsize=11)
    for ax, ok in ((ax_a, any_a), (ax_b, any_b)):
        if not ok:
            _empty(ax, "no update statistics (give lr or optimizer)")
        elif ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def _pick_layer(recs: list[dict], layer: str | int | None, stat: str) -> str | int | None:
    idx = sorted({r["layer_index"] for r in recs if r["stat"] == stat and r["layer_index"] >= 0})
    if not idx:
        return None
    if layer is None:
        return 2 if 2 in idx else idx[-1]  # the paper's Figure 2 shows the third conv layer
    return layer


def plot_figure2(records_by_method: Any, path: str | os.PathLike, *, layer: str | int | None = None
                 ) -> str | os.PathLike:
    """Figure 2 over the training steps for one layer (default: the third probed layer, as in the paper):
    (a) min_o Var[W_o] of the raw weight; (b) for PWS layers, 1 / sqrt(Var[W_o] + γ) (band: min–max over filters).

    ``layer`` is a layer name or a 0-based layer index.
    """
    fig, (ax_a, ax_b) = _figure(2)
    any_a = any_b = False
    vals_a: list[float] = []
    vals_b: list[float] = []
    chosen = set()
    for method, recs in _methods(records_by_method).items():
        lay = _pick_layer(recs, layer, "w_var_min")
        if lay is None:
            continue
        chosen.add(lay if isinstance(lay, str) else f"layer {lay + 1}")
        steps, v = step_series(recs, "w_var_min", lay)
        if steps:
            any_a = True
            vals_a += v
            ax_a.plot(steps, v, label=method or None)
        s_lo, lo = step_series(recs, "inv_std_min", lay)
        s_hi, hi = step_series(recs, "inv_std_max", lay)
        if s_lo and s_lo == s_hi:
            any_b = True
            line, = ax_b.plot(s_lo, lo, label=f"{method} min_o" if method else "min_o")
            ax_b.plot(s_hi, hi, ls="--", color=line.get_color(), label=f"{method} max_o" if method else "max_o")
            ax_b.fill_between(s_lo, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
            vals_b += lo + hi
    where = ", ".join(sorted(chosen))
    ax_a.set_title(f"(a) min_o Var[W_o]  ({where})" if where else "(a) min_o Var[W_o]")
    ax_b.set_title("(b) 1 / sqrt(Var[W_o] + γ)  (PWS layers)")
    for ax in (ax_a, ax_b):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    _maybe_log(ax_a, vals_a)
    _maybe_log(ax_b, vals_b)
    if not any_a:
        _empty(ax_a)
    elif ax_a.get_legend_handles_labels()[0]:
        ax_a.legend(fontsize=8)
    if not any_b:
        _empty(ax_b, "no PWS layer")
    elif ax_b.get_legend_handles_labels()[0]:
        ax_b.legend(fontsize=8)
    return _save(fig, path)


def plot_figure6(records_by_method: Any, path: str | os.PathLike, *, agg: str = "mean") -> str | os.PathLike:
    """Figure 6 per layer: (a) the range over the inputs x of E²(x); (b) the range of E²(x)/E(x²) (line: mean).

    As in the caption, E(x) and E(x²) are taken per sample x of the layer input X_l; the bands span the smallest and
    the largest per-sample value seen over all recorded steps.
    """
    fig, (ax_a, ax_b) = _figure(2)
    vals_a: list[float] = []
    vals_b: list[float] = []
    any_data = False
    for method, recs in _methods(records_by_method).items():
        idx, _, lo = layer_profile(recs, "x_mean2_min", "min")
        if not idx:
            continue
        i_hi, _, hi = layer_profile(recs, "x_mean2_max", "max")
        i_m, _, xm = layer_profile(recs, "x_mean", agg)
        i_rl, _, rlo = layer_profile(recs, "x_ratio_min", "min")
        i_rh, _, rhi = layer_profile(recs, "x_ratio_max", "max")
        i_rm, _, rm = layer_profile(recs, "x_ratio_mean", agg)
        if not (idx == i_hi == i_m == i_rl == i_rh == i_rm):
            continue
        any_data = True
        mid = [v * v for v in xm]
        line, = ax_a.plot(_x(idx), mid, marker="o", ms=3, label=method or None)
        ax_a.fill_between(_x(idx), lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
        vals_a += lo + hi
        line, = ax_b.plot(_x(idx), rm, marker="o", ms=3, label=method or None)
        ax_b.fill_between(_x(idx), rlo, rhi, color=line.get_color(), alpha=0.15, linewidth=0)
        vals_b += rlo + rhi
    ax_a.set_title("(a) E²[X_l]  (range of E²(x) over the inputs)")
    ax_b.set_title("(b) E²[X_l] / E[X_l²]")
    for ax in (ax_a, ax_b):
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
        if not any_data:
            _empty(ax)
        elif ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    _maybe_log(ax_a, vals_a)
    _maybe_log(ax_b, vals_b)
    return _save(fig, path)


def plot_variance_transmission(records_by_method: Any, path: str | os.PathLike, *, agg: str = "mean",
                               step: int | None = None) -> str | os.PathLike:
    """Var[Y_l] per layer, measured (solid) beside eq. 5's prediction from the previous layer (dashed) and from the
    layer's own input via eq. 2 (dotted); log scale. Shows whether the output variance grows with depth (eq. 6)."""
    fig, (ax,) = _figure(1, width=6.5)
    vals: list[float] = []
    for method, recs in _methods(records_by_method).items():
        idx, _, meas = layer_profile(recs, "y_var", agg, step)
        if not idx:
            continue
        line, = ax.plot(_x(idx), meas, marker="o", ms=3, label=f"{method} measured" if method else "measured")
        i_p, _, pred = layer_profile(recs, "y_var_pred", agg, step)
        ax.plot(_x(i_p), pred, ls="--", color=line.get_color(), label=f"{method} eq. 5" if method else "eq. 5")
        i_x, _, predx = layer_profile(recs, "y_var_pred_x", agg, step)
        ax.plot(_x(i_x), predx, ls=":", color=line.get_color(),
                label=f"{method} eq. 5 via E[X²]" if method else "eq. 5 via E[X²]")
        vals += meas + pred + predx
    ax.set_title("Var[Y_l]: measured vs eq. 5")
    ax.set_xlabel("layer")
    ax.grid(alpha=0.3)
    fin = [v for v in _finite(vals) if v > 0]
    if fin:
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    else:
        _empty(ax)
    return _save(fig, path)


CLIP_STATS = (("w_clip_frac", "W (per filter)"), ("alpha_clip_frac", "α"), ("bias_clip_frac", "β"))


def has_clipping(records_by_method: Any) -> bool:
    """Whether any method recorded clipping statistics (layers that clip their gradients: ``gamma="auto"``)."""
    names = {s for s, _ in CLIP_STATS}
    return any(r["stat"] in names for recs in _methods(records_by_method).values() for r in recs)


def plot_clipping(records_by_method: Any, path: str | os.PathLike) -> str | os.PathLike:
    """How often and how hard the clipping of ``gamma="auto"`` fires: per step, the share of W's filters, α entries
    and β entries held at their bound (top row) and the share of the gradient's norm the clip keeps (bottom row,
    log scale; 100 % = untouched), averaged over the layers (one panel per parameter kind, one line per method)."""
    fig, axes = _figure(3, width=4.4, nrows=2)
    rows = [(ax, stat, label, False) for ax, (stat, label) in zip(axes[:3], CLIP_STATS)] + \
        [(ax, stat.replace("_frac", "_kept"), label, True) for ax, (stat, label) in zip(axes[3:], CLIP_STATS)]
    for ax, stat, label, kept in rows:
        drawn = False
        for method, recs in _methods(records_by_method).items():
            per_step: dict[int, list[float]] = {}
            for r in recs:
                if r["stat"] == stat and math.isfinite(r["value"]):
                    per_step.setdefault(r["step"], []).append(r["value"])
            if per_step:
                steps = sorted(per_step)
                ax.plot(steps, [100.0 * sum(per_step[s]) / len(per_step[s]) for s in steps], lw=1.2,
                        label=method or None)
                drawn = True
        ax.set_title(f"{label}: " + ("gradient norm kept" if kept else "share clipped"))
        ax.set_xlabel("step")
        if kept:
            ax.set_ylabel("% of the gradient norm kept (mean over layers)")
            if drawn:
                ax.set_yscale("log")
        else:
            ax.set_ylabel("% held at the bound (mean over layers)")
            ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        if not drawn:
            _empty(ax)
        elif ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return _save(fig, path)
