"""Variance-transmission diagnostics: measure and plot the shift of the average gradient on any model.

Liu et al. (AAAI 2021) explain the collapse of un-normalized networks at a large LR by the *shift of the average
gradient*: the filters' mean updates E[ΔW_o] differ from filter to filter (Figure 1(b)), and by eqs. 5/6

    Var[Y_l] = Var[Y_{l-1}]·Σ_o(½·n_l·Var[W_o])/N_l + Var_o[n_l·E[W_o]·E[X_l]]          (eq. 5)
             ≈ Var[Y_{l-1}] + E²[X_l]·Var_o[n_l·E[W_o]]                                   (eq. 6)

the spread of the filter means adds to the output variance at every layer. BN removes the shift (its output
gradient has zero mean per channel, eq. 8), and so does PWS (the gradient of the raw weight has zero mean per
filter, eq. 13). This package measures all of it on any model, with hooks only::

    from pwsconv.diagnostics import VarianceProbe, plot_figure1
    with VarianceProbe(model, optimizer) as probe:       # or VarianceProbe(model, lr=0.1): ΔW = lr·∇W
        for x, y in loader:
            opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()
    probe.to_csv("probe.csv"); probe.summary()
    plot_figure1({"pws": probe}, "figure1.png")

- :class:`VarianceProbe` — records Figure 1 (a)/(b), Figure 2, Figure 6 statistics, Var[Y_l] beside eq. 5's
  prediction, eq. 8's per-channel gradient mean and gradient norms, for every conv/linear layer (records: a tidy
  list of ``{step, layer, layer_index, kind, stat, value}``).
- :func:`measure_without_update` — Figure 6's mode: forward + backward on every batch, the update computed, not applied.
- :func:`run_probe_experiment` — the Figure 1 experiment for several methods, CSV/JSONL/PNG + Markdown summary
  (the ``pwsconv probe`` command).
- :func:`plot_figure1`, :func:`plot_figure2`, :func:`plot_figure6`, :func:`plot_variance_transmission` — PNGs.
- :mod:`.stats` — the statistics as plain tensor functions.
"""

from . import stats
from .experiment import depth_report, markdown_summary, measure_without_update, run_probe_experiment
from .plots import plot_figure1, plot_figure2, plot_figure6, plot_variance_transmission
from .probe import VarianceProbe, effective_weight, is_reparameterized, layer_gamma, probe_layers, raw_weight
from .records import (
    layer_profile,
    read_csv,
    read_jsonl,
    select,
    step_series,
    summarize,
    write_csv,
    write_jsonl,
)

__all__ = [
    "VarianceProbe",
    "measure_without_update",
    "run_probe_experiment",
    "markdown_summary",
    "depth_report",
    "plot_figure1",
    "plot_figure2",
    "plot_figure6",
    "plot_variance_transmission",
    "write_csv",
    "read_csv",
    "write_jsonl",
    "read_jsonl",
    "summarize",
    "select",
    "layer_profile",
    "step_series",
    "effective_weight",
    "raw_weight",
    "is_reparameterized",
    "layer_gamma",
    "probe_layers",
    "stats",
]
