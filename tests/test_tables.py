"""The paper tables as data (pwsconv.experiments.tables): every table file declares its grid, paper numbers, summary
and plots; the registry lists every file; the runner is the same for all (no per-table code outside the file)."""

from __future__ import annotations

import importlib
import math
import pkgutil

import pytest

from pwsconv.experiments import paper, tables
from pwsconv.experiments.det_table import DetTable
from pwsconv.experiments.detection import EXTRA_EXPERIMENTS, build_det_runs
from pwsconv.experiments.sweep import RunSpec, SweepRecord
from pwsconv.experiments.table import PRESETS, Context, Curves, ErrVs, Table
from pwsconv.train.engine import RunResult


def test_registry_lists_every_table_file():
    files = {m.name for m in pkgutil.iter_modules(tables.__path__)}
    assert files == set(tables.FILES) | set(tables.DET_FILES)        # a new file must be registered, and vice versa
    for f in files:
        t = importlib.import_module(f"pwsconv.experiments.tables.{f}").TABLE
        assert t.name == f and t.title
        assert (tables.TABLES if f in tables.FILES else tables.DET_TABLES)[f] is t
    assert list(paper.EXPERIMENTS) == ["table4", "table1", "table2", "collapse", "robust"] == list(tables.TABLES)
    assert EXTRA_EXPERIMENTS == ("voc_table1", "voc_table2", "coco_table3", "imagenet_table5")
    assert all(isinstance(t, Table) for t in tables.TABLES.values())
    assert all(isinstance(t, DetTable) for t in tables.DET_TABLES.values())


@pytest.mark.parametrize("name", list(tables.TABLES))
def test_table_declares_grid_sizes_and_plots(name):
    t = tables.TABLES[name]
    assert set(t.sizes) >= set(PRESETS) and all(s.seeds >= 1 for s in t.sizes.values())
    assert t.paper is not None and callable(t.summary) and t.plots
    assert all(isinstance(p, (Curves, ErrVs)) for p in t.plots)
    assert len({p.key for p in t.plots}) == len(t.plots)                  # one PNG per plot
    sizes = {}
    for preset in t.sizes:     # the shared presets and a table's own (robust: medium, gpu)
        runs = paper.build_runs(name, preset)
        sizes[preset] = len(runs)
        assert runs and all(isinstance(r, RunSpec) for r in runs)
        assert len({r.name for r in runs}) == len(runs)                  # names are unique: they are directories
        assert len({tuple(r.labels.items()) for r in runs}) == len(runs)  # so are the cells × seeds
        keys = list(runs[0].labels)
        assert keys[-1] == "seed" and all(list(r.labels) == keys for r in runs)
        assert {r.config.seed for r in runs} == set(range(t.sizes[preset].seeds))
    assert sizes["smoke"] < sizes["full"] and sizes["cpu"] == sizes["full"] * t.sizes["cpu"].seeds


def test_paper_numbers_are_declared():
    pn = paper.PAPER_NUMBERS
    assert len(pn["table4"]) == 24 and all(0 < v < 20 for v in pn["table4"].values())
    assert {(a, m, lr) for r in paper.build_runs("table4", "full")
            for a, m, lr in [(r.labels["arch"], r.labels["method"], r.labels["LR"])]} == set(pn["table4"])
    assert set(pn["table1"]) == {"in", "bn", "gn", "sn", "wn", "pws"}
    assert math.isnan(pn["table1"]["wn"][1][2]) and pn["table1"]["pws"][0] == 52.72
    assert len(pn["table2"]) == 13 and sum(math.isnan(row[-1]) for row in pn["table2"]) == 2
    from pwsconv.experiments.detection import PAPER_TABLE3, PAPER_TABLE5

    assert tables.DET_TABLES["coco_table3"].paper is PAPER_TABLE3 and len(PAPER_TABLE3) == 7
    assert tables.DET_TABLES["imagenet_table5"].paper is PAPER_TABLE5 and PAPER_TABLE5["pws"] == 24.0
    assert tables.DET_TABLES["voc_table2"].paper is pn["table2"]        # one copy of the paper's numbers


@pytest.mark.parametrize("name", list(tables.DET_TABLES))
def test_detection_table_grids(name, tmp_path):
    for preset in PRESETS:
        runs = build_det_runs(name, preset, str(tmp_path), make_data=False)
        assert runs and len({r.name for r in runs}) == len(runs)
    assert len(build_det_runs(name, "smoke", str(tmp_path), make_data=False)) < \
        len(build_det_runs(name, "full", str(tmp_path), make_data=False))


def _record(spec: RunSpec, acc: float) -> SweepRecord:
    res = RunResult(status="ok" if math.isfinite(acc) else "nan", metrics={"test_acc": acc, "images_per_s": 100.0},
                    epoch=1.0, step=1, wall_time=1.0, out_dir="x", config={})
    return SweepRecord(spec, res, [], True, 0.0)


@pytest.mark.parametrize("name", ["table4", "table2", "collapse", "robust"])
def test_summary_from_aggregated_records(name):
    """A summary is a function of the aggregated cells: every cell's error appears, the paper column is there."""
    runs = paper.build_runs(name, "smoke", seeds=2)
    records = [_record(r, math.nan if i % 5 == 0 else 0.5 + 0.01 * (i % 7)) for i, r in enumerate(runs)]
    agg = paper.aggregate(records, [k for k in runs[0].labels if k != "seed"])
    ctx = Context("smoke", runs, records, agg, "unused")
    md = tables.TABLES[name].summary(ctx)
    assert md.count("\n|---") >= 1 and "paper" in md.lower()
    assert all(a["err"] in md for a in agg)
    if name == "collapse":
        assert {f["method"] for f in ctx.extra["first_collapse"]} == {"none", "pws"}
    if name == "robust":
        assert set(ctx.extra["targets"]) >= {"plain", "residual"}
    if name == "table4":
        assert "6.16" in md and "6.50" in md                              # the paper's PWS errors at LR 0.1


def test_robust_long_presets_train_small_lrs_long_and_large_lrs_short():
    """robust's medium (CPU) and gpu presets: LR 0.05/0.1 for the full schedule, 0.4/1.6/3.2 short; both nets;
    the round-2 auto (W clipped too) as an ablation row at one small and one large LR; unknown presets refused."""
    from pwsconv.experiments.tables import robust

    for preset in ("medium", "gpu"):
        runs = paper.build_runs("robust", preset)
        size = robust.SIZES[preset]
        for r in runs:
            long = r.labels["LR"] in robust.LONG_LRS
            assert r.config.epochs == (size.epochs if long else robust.SHORT[preset]["epochs"])
        assert {r.labels["arch"] for r in runs} == {"plain", "residual"}
        assert {r.labels["method"] for r in runs if r.labels["part"] == "lr"} == {"bn", "pws", "pws auto"}
        assert {r.labels["LR"] for r in runs} == set(robust.LONG_LRS + robust.SHORT_LRS)
        abl = {(r.labels["arch"], r.labels["LR"]) for r in runs if r.labels["part"] == "ablation"}
        assert {lr for _, lr in abl} == {0.1, 1.6}
        assert {a for a, _ in abl} == ({"residual"} if preset == "medium" else {"plain", "residual"})
    gpu = paper.build_runs("robust", "gpu")
    assert all(r.config.amp == "bf16" and r.config.channels_last and r.config.limit is None for r in gpu)
    with pytest.raises(paper.ReproduceError, match="unknown preset"):
        paper.build_runs("table4", "gpu")
