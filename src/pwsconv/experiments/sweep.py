"""A sweep: a list of run configs, each trained with :func:`pwsconv.train.train` in its own directory, then collected
into tables and plots. The demo and the paper-table experiments are sweeps.

    runs = [RunSpec("pws_lr0.1", TrainConfig(method="pws", lr=0.1), {"method": "pws", "LR": 0.1}), ...]
    records = run_sweep(runs, "runs/my_sweep")        # resumable: finished runs are skipped, broken ones resumed
    print(results_table(records, ["method", "LR"]))
    write_results(records, "runs/my_sweep")           # results.md / .csv / .jsonl
    plot_curves(records, "runs/my_sweep/curves.png", group_by="LR", line_by="method")

Layout: ``<sweep dir>/<run name>/`` holds each run's config.yaml, metrics.csv/.jsonl, checkpoint.pt, result.json.
Running the same sweep again skips runs whose result.json matches their config and resumes interrupted ones from
their last checkpoint; a run directory holding a run with a *different* config (by its checkpoint, config.yaml or
result.json) is an error, never overwritten. Each run holds its directory's lock while it trains, so a second sweep
started on the same directory is refused at once instead of training the same runs twice.
"""

from __future__ import annotations

import csv
import json
import io
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from ..config import TrainConfig, fields_with
from ..train.checkpoint import atomic_save_figure, atomic_write_text, json_safe
from ..train.engine import ConfigMismatchError, RunResult, _config_diff, train
from ..train.metrics import read_metrics
from ..train.rundir import check_output_dir

__all__ = ["RunSpec", "SweepRecord", "SweepError", "run_sweep", "parse_shard", "shard_of", "unfinished", "results_table", "results_rows", "write_results",
           "plot_curves", "format_value"]

# config fields that do not change what a run computes (a finished run with other values here is still "the same")
_COSMETIC = fields_with("cosmetic")


class SweepError(ValueError):
    """A sweep directory holds runs with other settings, or the run list is malformed."""


@dataclass
class RunSpec:
    """One run of a sweep: a unique ``name`` (its directory), its config, and the ``labels`` shown in tables."""

    name: str
    config: TrainConfig
    labels: dict[str, Any] = field(default_factory=dict)


@dataclass
class SweepRecord:
    spec: RunSpec
    result: RunResult
    rows: list[dict[str, Any]]       # the run's per-epoch metrics
    skipped: bool                    # already finished before this call
    seconds: float                   # time spent on it in this call


def _same_run(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return not _config_diff(a, b, _COSMETIC)   # fields added since a run was made count with their defaults


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/N"`` (0 ≤ i < N) → ``(i, N)``; anything else is a one-line :class:`SweepError`."""
    i, slash, n = str(text).partition("/")
    try:
        si, sn = int(i), int(n)
    except ValueError:
        si, sn = -1, 0
    if not slash or sn < 1 or not 0 <= si < sn:
        raise SweepError(f"--shard must be i/N with 0 ≤ i < N (e.g. 0/4, or $SLURM_ARRAY_TASK_ID/"
                         f"$SLURM_ARRAY_TASK_COUNT), got {text!r}")
    return si, sn


def shard_of(runs: Sequence[RunSpec], shard: tuple[int, int] | None) -> list[RunSpec]:
    """The runs shard ``(i, N)`` trains: every N-th run from the i-th (all runs for None), so each shard gets a
    similar mix of methods and settings."""
    if shard is None:
        return list(runs)
    i, n = shard
    return [r for k, r in enumerate(runs) if k % n == i]


def _run_config(spec: RunSpec, out_dir: str, progress: bool) -> TrainConfig:
    return TrainConfig.from_dict({**spec.config.to_dict(), "out_dir": os.path.join(out_dir, spec.name),
                                  "name": spec.name, "progress": progress})


def _finished(cfg: TrainConfig) -> RunResult | None:
    """The run's result if its directory holds a finished run of the same settings."""
    if os.path.isfile(os.path.join(cfg.out_dir, "result.json")):
        try:
            prev = RunResult.load(cfg.out_dir)
        except (ValueError, KeyError, OSError):
            return None
        if prev.status in ("ok", "nan") and _same_run(prev.config, cfg.to_dict()):
            return prev
    return None


def unfinished(runs: Sequence[RunSpec], out_dir: str | os.PathLike) -> list[str]:
    """Names of the runs of ``runs`` without a finished result of their settings under ``out_dir``."""
    return [r.name for r in runs if _finished(_run_config(r, os.fspath(out_dir), False)) is None]


def _train_one(cfg: TrainConfig) -> tuple[RunResult, float]:
    """``(result, seconds)`` of training (or resuming) one run of a sweep."""
    t0 = time.perf_counter()
    try:   # train() holds the run directory's lock: a second sweep on the same run is refused at once
        return train(cfg, resume=True), time.perf_counter() - t0
    except ConfigMismatchError as e:
        raise SweepError(f"{cfg.out_dir} holds a run with other settings ({'; '.join(e.diff)}); nothing was "
                         f"changed — choose another output directory") from None


def _worker_init(threads: int) -> None:   # a sweep's worker process: its share of the CPU cores
    import torch

    torch.set_num_threads(threads)


def run_sweep(runs: Sequence[RunSpec], out_dir: str | os.PathLike, *, progress: bool = False,
              log: Callable[[str], None] | None = print, jobs: int = 1,
              shard: tuple[int, int] | None = None) -> list[SweepRecord]:
    """Train every run of ``runs`` under ``out_dir`` (resumably) and return their records, in order.

    ``jobs`` > 1: that many runs at a time, each in its own process (several runs share one GPU; on the CPU each
    process gets its share of the cores). ``shard=(i, N)``: only this shard's runs (:func:`shard_of`) — N processes,
    on as many machines as a scheduler gives (a SLURM array job: ``--shard $SLURM_ARRAY_TASK_ID/N``), share one
    sweep directory on a shared file system; each run's lock keeps two processes from training the same run.
    """
    out_dir = os.fspath(out_dir)
    names = [r.name for r in runs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise SweepError(f"run names must be unique in a sweep; repeated: {', '.join(sorted(dup))}")
    bad = [n for n in names if not n or os.sep in n or n.startswith(".")]
    if bad:
        raise SweepError(f"run names must be plain directory names, got {bad}")
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise SweepError(f"jobs must be an integer ≥ 1, got {jobs!r}")
    try:
        check_output_dir(out_dir, "sweep directory")
    except ValueError as e:
        raise SweepError(str(e)) from None
    mine = shard_of(runs, shard)
    cfgs = [_run_config(spec, out_dir, progress and jobs == 1) for spec in mine]
    done: dict[int, tuple[RunResult, float, bool]] = {}   # (result, seconds, skipped)
    todo = []
    for k, cfg in enumerate(cfgs):
        prev = _finished(cfg)
        if prev is not None:
            done[k] = (prev, 0.0, True)
        else:
            todo.append(k)

    def report(k: int) -> None:
        if log is None:
            return
        result, seconds, skipped = done[k]
        acc = format_value(result.metrics.get("test_acc", math.nan), pct=True)
        how = "done before, skipped" if skipped else f"{seconds:.1f} s"
        log(f"[{k + 1}/{len(mine)}] {mine[k].name}: {result.status}, test acc {acc} ({how})")

    for k in sorted(done):
        report(k)
    if jobs == 1 or len(todo) <= 1:
        for k in todo:
            done[k] = (*_train_one(cfgs[k]), False)
            report(k)
    else:
        import multiprocessing as mp
        from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

        threads = max(1, (os.cpu_count() or 1) // min(jobs, len(todo)))
        with ProcessPoolExecutor(min(jobs, len(todo)), mp_context=mp.get_context("spawn"),
                                 initializer=_worker_init, initargs=(threads,)) as pool:
            futures = {pool.submit(_train_one, cfgs[k]): k for k in todo}
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for f in finished:
                    k = futures[f]
                    if f.exception() is not None:
                        for p in pending:
                            p.cancel()
                        raise f.exception()   # type: ignore[misc]
                    done[k] = (*f.result(), False)
                    report(k)
    return [SweepRecord(spec, done[k][0], read_metrics(cfgs[k].out_dir), done[k][2], done[k][1])
            for k, spec in enumerate(mine)]


# ----------------------------------------------------------------------------------------------------- tables
def format_value(v: Any, *, pct: bool = False, digits: int = 2) -> str:
    """NaN → "NaN" (a collapse, as in the paper's tables); accuracies as percentages with ``pct``."""
    if v is None:
        return "—"
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        if pct:
            return f"{100 * v:.{digits}f}"
        return f"{v:g}"
    return str(v)


_RESULT_COLUMNS = ("test_acc", "test_loss", "train_loss", "train_acc", "val_acc", "images_per_s")


def results_rows(records: Iterable[SweepRecord]) -> list[dict[str, Any]]:
    """One flat dict per run: name, labels, status, final metrics, epochs, steps, seconds, directory."""
    rows = []
    for r in records:
        row: dict[str, Any] = {"name": r.spec.name, **r.spec.labels, "status": r.result.status}
        for k in _RESULT_COLUMNS:
            row[k] = r.result.metrics.get(k, math.nan)
        row.update({"epochs": r.result.epoch, "steps": r.result.step, "wall_time": r.result.wall_time,
                    "out_dir": r.result.out_dir})
        rows.append(row)
    return rows


def results_table(records: Sequence[SweepRecord], columns: Sequence[str] | None = None, *,
                  metric_columns: Sequence[tuple[str, str]] = (("test_acc", "test acc (%)"),)) -> str:
    """A Markdown table: the label ``columns`` (default: all labels of the first run), the metrics, the status."""
    if columns is None:
        columns = list(records[0].spec.labels) if records else []
    head = list(columns) + [title for _, title in metric_columns] + ["status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in records:
        cells = [format_value(r.spec.labels.get(c)) for c in columns]
        for key, _ in metric_columns:
            v = r.result.metrics.get(key, math.nan)
            cells.append(format_value(v, pct=key.endswith("_acc")))
        cells.append(r.result.status)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(records: Sequence[SweepRecord], out_dir: str | os.PathLike, *, title: str = "Results",
                  columns: Sequence[str] | None = None, notes: str = "") -> dict[str, str]:
    """Write ``results.md`` (title, table, notes), ``results.csv`` and ``results.jsonl``; returns their paths."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    rows = results_rows(records)
    paths = {k: os.path.join(out_dir, f"results.{k}") for k in ("md", "csv", "jsonl")}
    md = f"# {title}\n\n{results_table(records, columns)}\n"
    if notes:
        md += f"\n{notes.rstrip()}\n"
    atomic_write_text(md, paths["md"])
    write_rows(rows, paths["csv"], paths["jsonl"])
    return paths


def write_rows(rows: Sequence[dict[str, Any]], csv_path: str | os.PathLike, jsonl_path: str | os.PathLike) -> None:
    """``rows`` as CSV (the union of their keys, NaN written as "nan") and JSON lines (NaN as null), atomically."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("nan" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()})
    atomic_write_text(buf.getvalue(), csv_path)
    atomic_write_text("".join(json.dumps(json_safe(r), allow_nan=False, default=str) + "\n" for r in rows), jsonl_path)


# ----------------------------------------------------------------------------------------------------- plots
def plot_curves(records: Sequence[SweepRecord], path: str | os.PathLike, *, group_by: str | Callable | None = None,
                line_by: str = "method", metrics: Sequence[tuple[str, str]] = (
                    ("train_loss", "train loss"), ("test_acc", "test accuracy")), title: str | None = None) -> str:
    """Training curves as a PNG: one column per group (runs with the same ``group_by`` label, or the value a
    callable returns for a record), one row per metric, one line per run labelled by ``line_by``. A collapsed run's
    curve stops where it became NaN and ends in a red ×."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    def group_of(r: SweepRecord) -> str:
        if group_by is None:
            return ""
        if callable(group_by):
            return str(group_by(r))
        return f"{group_by} {format_value(r.spec.labels.get(group_by))}"

    groups: dict[str, list[SweepRecord]] = {}
    for r in records:
        groups.setdefault(group_of(r), []).append(r)
    names: list[str] = []
    for r in records:
        n = format_value(r.spec.labels.get(line_by, r.spec.name))
        if n not in names:
            names.append(n)
    cycle = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    colors = {n: cycle[i % len(cycle)] for i, n in enumerate(names)}   # one colour per line label in every panel
    ncol, nrow = max(1, len(groups)), len(metrics)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.0 * nrow), squeeze=False)
    for c, (gname, recs) in enumerate(groups.items()):
        for rr, (key, label) in enumerate(metrics):
            ax = axes[rr][c]
            for r in recs:
                xs = [row["epoch"] for row in r.rows if row.get("status") != "nan"]
                ys = [row.get(key, math.nan) for row in r.rows if row.get("status") != "nan"]
                name = format_value(r.spec.labels.get(line_by, r.spec.name))
                ax.plot(xs, ys, marker="o", ms=3, color=colors[name],
                        label=name + (" (NaN)" if r.result.status == "nan" else ""))
                if r.result.status == "nan":
                    x_nan = r.result.epoch
                    finite = [y for y in ys if isinstance(y, float) and math.isfinite(y)]
                    y_nan = finite[-1] if finite else (0.0 if key.endswith("acc") else 1.0)
                    ax.plot([x_nan], [y_nan], marker="x", color="red", ms=10, mew=2)
            ax.set_xlabel("epoch")
            ax.set_ylabel(label)
            if key.endswith("loss"):
                ax.set_yscale("log")
            if rr == 0:
                ax.set_title(gname)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = os.fspath(path)
    atomic_save_figure(fig, path)
    plt.close(fig)
    return path
