"""Experiments built on one sweep runner (:mod:`pwsconv.experiments.sweep`): the demo (:mod:`.demo`), the probe
(:mod:`.probe`) and the paper's tables plus ``robust`` (one file each in :mod:`.tables`, run by :mod:`.paper`; the
detection / ImageNet tables by :mod:`.detection`). A sweep is a list of :class:`RunSpec` (name, TrainConfig, table
labels) trained with :func:`pwsconv.train.train`, resumably, and collected into Markdown/CSV/JSONL tables and PNG
curves."""

from .sweep import (
    RunSpec,
    SweepError,
    SweepRecord,
    format_value,
    plot_curves,
    results_rows,
    results_table,
    run_sweep,
    write_results,
)

__all__ = ["RunSpec", "SweepRecord", "SweepError", "run_sweep", "results_table", "results_rows", "write_results",
           "plot_curves", "format_value"]
