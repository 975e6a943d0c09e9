"""The runner of the paper's experiments as resumable sweeps: Table 4 (CIFAR-10 error), Table 1 (batch-size
sensitivity and training speed), Table 2 (PWS ablation), an LR-collapse scan and ``robust``, each at three sizes
("presets"). Each table is one file of :mod:`pwsconv.experiments.tables` (its grid, the paper's numbers, its summary
and plots, declared as a :class:`~pwsconv.experiments.table.Table`); this module trains the grid of any of them,
aggregates the seeds and writes results.md/csv, summary.csv and the PNGs — the same code for every table.

    from pwsconv.experiments.paper import reproduce, EXPERIMENTS
    out = reproduce("table4", preset="cpu")            # trains (resumably), writes results.md/csv/jsonl + PNGs
    reproduce("table4", preset="full", dry_run=True)    # lists the 24 runs of the paper's setting, trains nothing
    $ pwsconv reproduce table4 --preset cpu      # → results/reproduce/table4_cpu (resumes the runs already there)

Presets
-------
``full``  — the paper's settings where they exist (CIFAR-10, SGD momentum 0.9, weight decay 5e-4, batch 128,
            200 epochs, LR ×0.1 after epochs 100/150/180, γ = 1e-3 for PWS; 1 seed by default, the paper reports one
            number per cell).  Table 4: plain = ``convpool_cnn_c`` (ConvPool-CNN-C without dropout), residual =
            ``resnet20`` (He et al. 2016a CIFAR ResNet, depth 20 — the paper says "the same as (He et al. 2016a)"
            without naming the depth; ResNet-20 is the smallest of that family and the usual choice) × none/bn/gn/
            sn/wn/pws × LR 0.1 and 0.05.  Tables 1 and 2 are VOC07 *detection* (SSD, VGG-16) in the paper; here they
            are run as their CIFAR-10 classification analogue with ``vgg16`` at the paper's LRs and batch sizes
            (Table 1: LR 1e-2, batch 2/4/8 plus 128; Table 2: batch 16, LR 1e-3 and 1e-2), so the paper's mAP numbers
            are shown as a reference for the *pattern* (which method collapses, which degrades with small batches),
            not as comparable numbers.
``cpu``   — the same grids sized to finish in about an hour each on 2 CPU cores with 3 seeds: real CIFAR-10, the
            width-scaled models (``convpool_cnn_c_small`` at width 0.125 = 22k params, ``resnet_cifar_small`` =
            ResNet-8 at width 0.5 = 19k params), a training subset (``limit``), a 1000-image test subset and a short
            schedule whose LR milestones keep the paper's proportions (epochs 100/150/180 of 200 → 50/75/90 %).
``smoke`` — a few optimizer steps on the offline ``digits`` set with ``tiny_cnn`` / ``resnet_cifar_small``, 1 seed,
            1 thread: checks the whole pipeline in seconds (the tests use it).

CPU-preset sizing (measured, not guessed). One engine epoch of ``convpool_cnn_c_small`` (width 0.25, PWS) on a
5000-image CIFAR-10 subset took 61 s wall (≈ 95-190 training images/s; the 2-core machine was shared with other jobs,
load 2-4) and ResNet-8 ≈ 200 images/s. Timed without the other load, the chosen width-scaled models train at
≈ 800-900 images/s (ConvPool-C w=0.125) and ≈ 1500-2000 images/s (ResNet-8 w=0.5) at batch 128, ≈ 430-560 / 630-880
at batch 8 and ≈ 170-270 / 220-300 at batch 2; SN is ≈ 2× slower than the others, MABN ≈ 1.3×
(:data:`_CPU_RATES`). The dry-run estimate uses those rates × 0.6 (data loading, evaluation, a shared machine) and
gives, for 3 seeds (expect up to ~2× longer if the machine is as loaded as it was while measuring):

    table4   2 archs × 6 methods × 2 LRs × 3 seeds = 72 runs,  3000 images × 8 epochs, batch 128   ≈ 54 min
    table1   7 methods × 4 batch sizes × 3 seeds   = 84 runs,   800 images × 6 epochs, batch 2…128 ≈ 64 min
    table2   7 variants × 2 LRs × 3 seeds          = 42 runs,  2000 images × 8 epochs, batch 16    ≈ 49 min
    collapse 6 methods × 9 LRs × 3 seeds           = 162 runs, 2000 images × 4 epochs, batch 128   ≈ 57 min

(1000 test images each; milestones 8 epochs → [4, 6, 7], 6 → [3, 4, 5], 4 → [2, 3].)
Measured on 2026-11-25 (two sweeps at a time, 1 torch thread each, on the 2-core machine): table4 ≈ 70 min,
table1 38 min, table2 33 min, collapse 50 min of wall time (results in ``results/reproduce/*_cpu``).
``reproduce(..., dry_run=True)`` prints the per-grid estimate. The cpu numbers are far from the paper's errors
(a few epochs on a few thousand images); what they can show is the ordering and the collapses.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import platform
import statistics
import time
from typing import Any, Callable, Iterator, Sequence

from ..train.checkpoint import atomic_save_figure, atomic_write_text
from ..train.rundir import RunDirLocked, lock_run_dir, remove_stale_temps
from .sweep import (RunSpec, SweepRecord, plot_curves, results_table, run_sweep, shard_of, unfinished,
                    write_results)
from .estimate import (_CPU_RATES, _DATA_SHAPES, _DATA_SIZES, _ENGINE_EFFICIENCY, _GPU_EFFICIENCY,  # noqa: F401
                       _estimate_seconds, _run_seconds, measured_estimate)
from .table import PRESETS, VOC_NOTE, Context, Curves, ErrVs, Table, milestones_for
from .tables import TABLES

__all__ = ["EXPERIMENTS", "PRESETS", "PAPER_NUMBERS", "TABLES", "ReproduceError", "reproduce", "build_runs",
           "aggregate", "milestones_for", "VOC_NOTE"]


class ReproduceError(ValueError):
    """Unknown experiment or preset, or bad seeds (one-line message; the CLI exits with code 2)."""


#: experiment name → builder(preset, seeds) → list of RunSpec
EXPERIMENTS: dict[str, Callable[..., list[RunSpec]]] = {name: t.runs for name, t in TABLES.items()}
#: experiment name → the paper's numbers (see each table's file for their layout)
PAPER_NUMBERS: dict[str, Any] = {name: t.paper for name, t in TABLES.items()}


# ---------------------------------------------------------------------------------------------- run lists
def _seed_list(seeds: int | Sequence[int] | None, default: int) -> list[int]:
    if seeds is None:
        return list(range(default))
    if isinstance(seeds, bool):
        raise ReproduceError(f"seeds must be a count ≥ 1 or a list of ints, got {seeds!r}")
    if isinstance(seeds, int):
        if seeds < 1:
            raise ReproduceError(f"seeds must be ≥ 1, got {seeds}")
        return list(range(seeds))
    out = [int(s) for s in seeds]
    if not out or len(set(out)) != len(out):
        raise ReproduceError(f"seeds must be a non-empty list of distinct ints, got {list(seeds)!r}")
    return out


def pick(tables: dict[str, Any], name: str, preset: str, presets: Sequence[str], choices: Sequence[str]) -> Any:
    """``tables[name]``, or a one-line :class:`ReproduceError` for an unknown table or preset."""
    if name not in tables:
        raise ReproduceError(f"unknown experiment {name!r}; choose one of {', '.join(choices)}")
    if preset not in presets:
        raise ReproduceError(f"unknown preset {preset!r}; choose one of {', '.join(presets)}")
    return tables[name]


def _table(name: str, preset: str) -> Table:
    presets = [p for p in TABLES[name].sizes] if name in TABLES else PRESETS
    return pick(TABLES, name, preset, presets, list(TABLES))


def build_runs(name: str, preset: str = "cpu", seeds: int | Sequence[int] | None = None,
               data_root: str | None = None) -> list[RunSpec]:
    """The run list of one experiment at one preset (seeds: a count or a list; default: the preset's)."""
    table = _table(name, preset)
    runs = table.runs(preset, _seed_list(seeds, table.sizes[preset].seeds))
    if data_root is not None:
        for r in runs:
            r.config.data_root = os.fspath(data_root)
    return runs


# ---------------------------------------------------------------------------------------------- aggregation
def _err(r: SweepRecord) -> float:
    a = r.result.metrics.get("test_acc", math.nan)
    return math.nan if r.result.status == "nan" or a is None or not math.isfinite(a) else 100.0 * (1.0 - a)


def _chance_error(r: SweepRecord) -> float:
    return 100.0 * (1.0 - 1.0 / 10)     # CIFAR-10 and digits both have 10 classes


def _collapsed(r: SweepRecord) -> bool:
    e = _err(r)
    return math.isnan(e) or e >= _chance_error(r) - 2.0


def aggregate(records: Sequence[SweepRecord], keys: Sequence[str]) -> list[dict[str, Any]]:
    """Group runs by the label ``keys`` (all seeds together): n, NaN count, mean/std of test error (%) over the
    finite seeds, mean images/s, collapse count, and ``err`` as shown in tables ("6.50 ± 0.12", "NaN (2/3)")."""
    groups: dict[tuple, list[SweepRecord]] = {}
    for r in records:
        groups.setdefault(tuple(r.spec.labels.get(k) for k in keys), []).append(r)
    out = []
    for key, recs in groups.items():
        errs = [_err(r) for r in recs]
        finite = [e for e in errs if not math.isnan(e)]
        n, n_nan = len(recs), len(errs) - len(finite)
        mean = statistics.fmean(finite) if finite else math.nan
        std = statistics.stdev(finite) if len(finite) > 1 else (0.0 if finite else math.nan)
        ips = [r.result.metrics.get("images_per_s", math.nan) for r in recs]
        ips = [x for x in ips if isinstance(x, (int, float)) and math.isfinite(x)]
        if n_nan:
            shown = f"NaN ({n_nan}/{n})"
        elif n > 1:
            shown = f"{mean:.2f} ± {std:.2f}"
        else:
            shown = f"{mean:.2f}"
        out.append({**dict(zip(keys, key)), "n": n, "n_nan": n_nan, "err_mean": mean, "err_std": std, "err": shown,
                    "n_collapsed": sum(_collapsed(r) for r in recs),
                    "images_per_s": statistics.fmean(ips) if ips else math.nan})
    return out



# ---------------------------------------------------------------------------------------------- plots
def _plot(p: Curves | ErrVs, ctx: Context, first_seed: int) -> str:
    path = os.path.join(ctx.out_dir, f"{p.key}.png")
    if isinstance(p, Curves):
        recs = [r for r in ctx.records if r.spec.labels.get("seed") == first_seed and (p.select is None or p.select(r))]
        return plot_curves(recs, path, group_by=p.group_by, line_by=p.line_by, title=f"{p.title} (seed {first_seed})")
    cells = [a for a in ctx.agg if p.select is None or p.select(a)]
    return _plot_vs(cells, p.x, path, panel_key=p.panel, line_key=p.line, title=p.title)


#: err_vs_* line styles: marker and dash pattern per line, so that no line is told apart by colour alone.
_MARKERS = ("o", "s", "^", "D", "v", "P", "*", "<", ">", "h")
_LINESTYLES = ("-", "--", "-.", ":")


def _plot_vs(agg: list[dict[str, Any]], x_key: str, path: str, *, title: str, line_key: str = "method",
             panel_key: str | None = None, logx: bool = True) -> str:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys(a[panel_key] for a in agg)) if panel_key else [None]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 3.8), squeeze=False)
    # every line its own marker and line style (told apart without colour); "×" is kept for collapses
    lines = list(dict.fromkeys(a[line_key] for a in agg))
    style = {ln: (_MARKERS[i % len(_MARKERS)], _LINESTYLES[i % len(_LINESTYLES)]) for i, ln in enumerate(lines)}
    for ax, p in zip(axes[0], panels):
        sub = [a for a in agg if panel_key is None or a[panel_key] == p]
        any_bad = False
        for line in dict.fromkeys(a[line_key] for a in sub):
            pts = sorted((a[x_key], a) for a in sub if a[line_key] == line)
            xs = [x for x, _ in pts]
            ys = [a["err_mean"] for _, a in pts]
            es = [a["err_std"] if math.isfinite(a["err_std"]) else 0.0 for _, a in pts]
            marker, ls = style[line]
            (h,) = ax.plot(xs, ys, marker=marker, ms=5, ls=ls, lw=1.4, mfc="white", label=str(line))
            ax.errorbar(xs, ys, yerr=es, fmt="none", ecolor=h.get_color(), alpha=0.5)
            bad = [(x, a) for x, a in pts if a["n_nan"] or a["n_collapsed"]]
            if bad:
                any_bad = True
                ax.plot([x for x, _ in bad], [100.0 if math.isnan(a["err_mean"]) else a["err_mean"] for _, a in bad],
                        ls="none", marker="x", color="black", ms=10, mew=2.2)
                ax.plot([x for x, _ in bad], [100.0 if math.isnan(a["err_mean"]) else a["err_mean"] for _, a in bad],
                        ls="none", marker="x", color=h.get_color(), ms=7, mew=1.2)
        if any_bad:
            ax.plot([], [], ls="none", marker="x", color="black", ms=8, mew=2, label="collapsed seeds (×)")
        if logx:
            from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

            ax.set_xscale("log", base=2)
            ticks = sorted({a[x_key] for a in sub})
            ax.xaxis.set_major_locator(FixedLocator(ticks))      # plain labels at the grid's values (no mathtext)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(x_key)
        ax.set_ylabel("test error (%)")
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
        if p is not None:
            ax.set_title(f"{panel_key} {p}")
        ax.legend(fontsize=7)
    fig.suptitle(title + "  (× = collapsed seeds, in the line's colour; NaN drawn at 100 %)", fontsize=9)
    fig.tight_layout()
    atomic_save_figure(fig, path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- results.md, summary.csv
def _write_summary_csv(agg: Sequence[dict[str, Any]], path: str) -> str:
    """One row per cell (NaN written as "nan")."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(agg[0]) if agg else [], lineterminator="\n")
    w.writeheader()
    for a in agg:
        w.writerow({k: ("nan" if isinstance(v, float) and math.isnan(v) else v) for k, v in a.items()})
    atomic_write_text(buf.getvalue(), path)
    return path


def _command(name: str, preset: str, out_dir: str, seeds: Any, data_root: Any) -> str:
    cmd = f"pwsconv reproduce {name} --preset {preset} --out {out_dir}"
    if seeds is not None:
        cmd += f" --seeds {seeds if isinstance(seeds, int) else len(list(seeds))}"
    if data_root is not None:
        cmd += f" --data-root {data_root}"
    return cmd


def _recorded_versions(md: str) -> str | None:
    """The "Versions:" line of an existing results.md (the software and machine that trained its runs)."""
    try:
        with open(md, encoding="utf-8") as f:
            return next((line[len("Versions: "):].rstrip("\n") for line in f if line.startswith("Versions: ")), None)
    except (OSError, UnicodeDecodeError):
        return None


def _versions() -> str:
    import torch

    try:
        from importlib.metadata import version

        pv = version("pwsconv")
    except Exception:  # pragma: no cover - not installed as a distribution
        pv = "unknown"
    return (f"pwsconv {pv}, torch {torch.__version__}, Python {platform.python_version()}, "
            f"{platform.platform()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")


def _settings(runs: Sequence[RunSpec]) -> str:
    c = runs[0].config
    models = sorted({f"{r.config.model}{r.config.model_opts or ''}" for r in runs})
    return (f"dataset {c.dataset} (train limit {c.limit or 'all'}, test limit {c.test_limit or 'all'}), "
            f"models {', '.join(models)}, epochs {c.epochs}" + (f" (max_steps {c.max_steps})" if c.max_steps else "") +
            f", LR ×{c.lr_decay:g} at epochs {c.milestones}, SGD momentum {c.momentum:g}, weight decay "
            f"{c.weight_decay:g}, batch {sorted({r.config.batch_size for r in runs})}, seeds "
            f"{sorted({r.config.seed for r in runs})}")


def _results_md(table: Table, ctx: Context, info: dict[str, Any], summary: str, files: dict[str, str],
                seeds: Any) -> str:
    """results.md: a function of the runs' results alone (nothing about this call), so re-aggregating a finished
    grid writes the same bytes."""
    name, preset, out_dir, runs, records = table.name, ctx.preset, ctx.out_dir, ctx.runs, ctx.records
    run_time = sum(r.result.wall_time for r in records)
    note = {"cpu": "Note: the cpu preset trains small models for a few epochs on a CIFAR-10 subset, so the errors are "
                   "far above the paper's; compare orderings and collapses, not values.",
            "smoke": "**Note: smoke preset — a few optimizer steps on the digits set; a pipeline check, not a "
                     "result.**"}.get(preset)
    md = [f"# {table.title}", "",
          f"Preset **{preset}** — {len(records)} runs.", "", *([note, ""] if note else []),
          *([f"**Partial report**: {len(records)} of the grid's {len(records) + len(info['unfinished'])} runs are "
             f"finished; not yet: {', '.join(info['unfinished'])}.", ""] if info.get("unfinished") else []),
          summary, "",
          "## Setting", "", _settings(runs), "",
          "## Reproduce", "", "```", info["command"], "```", "",
          f"Python: `reproduce({name!r}, preset={preset!r}, out_dir={out_dir!r}"
          + (f", seeds={seeds!r}" if seeds is not None else "") + ")`", "",
          f"Versions: {info['versions']}", "",
          f"Summed training time of all runs: {run_time:.1f} s.", "",
          "Plots: " + ", ".join(f"`{os.path.basename(p)}`" for k, p in files.items() if p.endswith(".png")), "",
          "## All runs", "", results_table(records, list(runs[0].labels),
                                            metric_columns=(("test_acc", "test acc (%)"),
                                                            ("images_per_s", "img/s"))), ""]
    return "\n".join(md)


# ---------------------------------------------------------------------------------------------- reproduce
def reproduce(name: str, preset: str = "cpu", out_dir: str | os.PathLike | None = None,
              seeds: int | Sequence[int] | None = None, data_root: str | os.PathLike | None = None,
              progress: bool = False, dry_run: bool = False, plots: bool = True,
              log: Callable[[str], None] | None = print, jobs: int = 1, shard: tuple[int, int] | None = None,
              compile: bool = False, measure: bool | None = None, report: bool = False) -> dict[str, Any]:
    """Run (resumably) one of :data:`EXPERIMENTS` at a preset and write its results under ``out_dir``
    (default ``results/reproduce/<name>_<preset>``, where this repository keeps its measured runs): ``results.md``
    (the paper's numbers beside the measured mean ± std
    over seeds, the command, versions, wall time), ``results.csv``/``results.jsonl`` (one row per run),
    ``summary.csv`` (one row per cell), ``curves.png`` and ``err_vs_lr.png``/``err_vs_batch.png``.

    Returns ``{"name", "preset", "out_dir", "runs", "n_runs", "records", "summary", "files", ...}``; with
    ``dry_run`` only the run list (names, labels, configs) and ``estimated_seconds`` (cpu/smoke presets), nothing is
    trained or written. ``plots=False`` skips the PNGs (tables only).

    ``jobs``: runs trained at a time, each in its own process (several share one GPU). ``shard=(i, N)``: train only
    every N-th run from the i-th (:func:`~pwsconv.experiments.sweep.shard_of`; N processes or machines, e.g. a SLURM
    array, on one ``out_dir``); the tables are written by the shard that finds every run finished (or by a call
    without ``shard`` afterwards, which trains nothing more). ``compile``: every run under ``torch.compile``.
    ``measure`` (dry runs of grids without rates measured in advance, e.g. the full presets): estimate from the
    training throughput measured now on this machine (:func:`measured_estimate`); None: only when a GPU is here (on a
    CPU, measuring the full-size models takes minutes). ``report``: train nothing; the tables and plots of the runs
    already finished in ``out_dir`` (results.md says how many of the grid's runs that is).
    """
    table = _table(name, preset)
    out_dir = os.fspath(out_dir) if out_dir is not None else os.path.join("results", "reproduce", f"{name}_{preset}")
    data_root = os.fspath(data_root) if data_root is not None else None
    runs = build_runs(name, preset, seeds, data_root)
    if compile:
        for r in runs:
            r.config.compile = True
    info: dict[str, Any] = {"name": name, "preset": preset, "out_dir": out_dir, "n_runs": len(runs),
                            "seeds": sorted({r.config.seed for r in runs}),
                            "command": _command(name, preset, out_dir, seeds, data_root)}
    if dry_run:
        if measure is None:
            import torch

            measure = torch.cuda.is_available()
        return _dry_run(info, shard_of(runs, shard), log, jobs, measure)

    previous = _recorded_versions(os.path.join(out_dir, "results.md"))
    t0 = time.perf_counter()
    if report:
        left = set(unfinished(runs, out_dir))
        if len(left) == len(runs):
            raise ReproduceError(f"--report: no finished run of {name} [{preset}] in {out_dir}")
        info["unfinished"] = sorted(left)
        runs = [r for r in runs if r.name not in left]
        shard = None
    records = run_sweep(runs, out_dir, progress=progress, log=log, jobs=jobs, shard=shard)
    trained = any(not r.skipped for r in records)
    if shard is not None:
        left = unfinished(runs, out_dir)
        if left:
            if log is not None:
                log(f"{name} [{preset}] shard {shard[0]}/{shard[1]}: {len(records)} runs done; {len(left)} runs of "
                    f"other shards not finished yet — the last shard to finish writes the tables")
            info.update({"records": records, "runs": [r.spec.name for r in records], "unfinished": left,
                         "wall_time": time.perf_counter() - t0})
            return info
        records = run_sweep(runs, out_dir, log=None)   # every run finished: all read back, none trained
    wall = time.perf_counter() - t0
    # a grid re-aggregated without training keeps the versions that trained it: its results.md stays byte-identical
    info["versions"] = previous if previous and not trained else _versions()
    agg = aggregate(records, [k for k in runs[0].labels if k != "seed"])
    ctx = Context(preset, runs, records, agg, out_dir)
    with _one_writer(out_dir, log):   # shards that finish together (or a --report meanwhile) write one at a time
        remove_stale_temps(out_dir)   # left by a writer killed mid-write
        files = dict(write_results(records, out_dir, title=table.title))
        more = table.extra(ctx) if table.extra is not None else {}
        summary = table.summary(ctx)
        if plots:
            files.update({p.key: _plot(p, ctx, min(info["seeds"])) for p in table.plots})
        files["summary"] = _write_summary_csv(agg, os.path.join(out_dir, "summary.csv"))
        files.update(more)
        atomic_write_text(_results_md(table, ctx, info, summary, files, seeds), files["md"])
    skipped = sum(r.skipped for r in records)
    info.update({"records": records, "summary": agg, "files": files, "wall_time": wall, "skipped": skipped,
                 "runs": [r.name for r in runs], **ctx.extra})
    if log is not None:
        log(f"{name} [{preset}]: {len(records)} runs ({skipped} skipped) in {wall:.1f} s → {files['md']}")
    return info


@contextlib.contextmanager
def _one_writer(out_dir: str, log: Callable[[str], None] | None) -> Iterator[None]:
    """Hold ``out_dir``'s writer lock for the block, waiting while another process (or thread) holds it — the last
    to write sees every run, so it writes the tables after the other."""
    stack, said = contextlib.ExitStack(), False
    while True:
        try:
            stack.enter_context(lock_run_dir(out_dir))
            break
        except RunDirLocked:
            if log is not None and not said:
                log(f"waiting: another process is writing the tables in {out_dir}")
                said = True
            time.sleep(0.2)
    with stack:
        yield


def _dry_run(info: dict[str, Any], runs: Sequence[RunSpec], log: Callable[[str], None] | None,
             jobs: int = 1, measure: bool = False) -> dict[str, Any]:
    """The run list, which of them are already done in the output directory, and the time the rest would take."""
    left = set(unfinished(runs, info["out_dir"]))
    todo = [r for r in runs if r.name in left]
    info["runs"] = [{"name": r.name, "labels": dict(r.labels), "config": r.config.to_dict(),
                     "done": r.name not in left} for r in runs]
    info["n_done"], info["n_to_run"] = len(runs) - len(todo), len(todo)
    est = _estimate_seconds(todo) if todo else 0.0
    where, hint = "on 2 CPU cores", ""
    if est is None and todo:   # no rate measured in advance for these models
        if measure:   # measure them here, now
            est, rates, device = measured_estimate(todo)
            info["measured_rates"] = rates
            where = f"one run at a time on this machine's {device} (training throughput measured just now)"
        else:
            hint = " (no time estimate: run the dry run on the GPU machine, where it measures the throughput, or add " \
                   "--measure to measure on this CPU, minutes)"
    info["estimated_seconds"] = est
    if log is not None:
        for r in runs:
            log(f"  {r.name}: " + ", ".join(f"{k}={v}" for k, v in r.labels.items())
                + ("" if r.name in left else " (done)"))
        for k, v in info.get("measured_rates", {}).items():
            log(f"  measured: {k}: {v:.0f} images/s")
        log(f"{info['name']} [{info['preset']}]: {len(runs)} runs: {len(todo)} to run, {len(runs) - len(todo)} done" +
            (f", about {_duration(est)} {where}" if todo and est is not None else "") +
            (f" (with --jobs {jobs} on one device: less, by up to {jobs}× where one run leaves it idle)"
             if jobs > 1 and todo and est is not None else "") + (hint if todo else "") + f" → {info['out_dir']}")
    return info


def _duration(s: float) -> str:
    return f"{s / 60:.0f} min" if s < 5400 else f"{s / 3600:.1f} h"
