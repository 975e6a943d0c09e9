"""The paper-table experiments (pwsconv.experiments.paper): smoke runs end to end, resume, grid sizes, settings."""

from __future__ import annotations

import argparse
import csv
import math

import pytest
import torch

from pwsconv.experiments.paper import (
    EXPERIMENTS,
    PAPER_NUMBERS,
    ReproduceError,
    aggregate,
    build_runs,
    milestones_for,
    reproduce,
)


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("reproduce")


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_smoke_end_to_end_and_resume(name, smoke_dir):
    out = smoke_dir / name
    info = reproduce(name, "smoke", out_dir=out, log=None)
    assert info["n_runs"] == len(info["records"]) > 0
    assert info["skipped"] == 0
    for f in ("results.md", "results.csv", "results.jsonl", "summary.csv", "curves.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert any(p.endswith(("err_vs_lr.png", "err_vs_batch.png")) for p in info["files"].values())
    md = (out / "results.md").read_text()
    assert "pwsconv reproduce" in md and "torch" in md and "Summed training time" in md and "paper" in md.lower()
    if name in ("table1", "table2"):
        assert "detection" in md          # the VOC mAP caveat
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == info["n_runs"]
    for r in info["records"]:
        assert r.result.status in ("ok", "nan")
        assert r.result.config["dataset"] == "digits" and r.result.step <= 2
    if name == "table1":   # speed measured interleaved after the sweep, one row per method
        with open(out / "speed.csv") as f:
            rows = list(csv.DictReader(f))
        assert {r["method"] for r in rows} == {"bn", "pws", "mabn"}
        assert all(float(r["images_per_s"]) > 0 for r in rows)
        assert "speed vs BN (B=8)" in md and "paper FPS vs BN" in md
    if name == "collapse":
        assert {f["method"] for f in info["first_collapse"]} == {"none", "pws"}
        assert "first LR with a collapse" in md
    # second call: every run is skipped, the results are written again — the same bytes (committed grids stay clean)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    again = reproduce(name, "smoke", out_dir=out, log=None)
    assert again["skipped"] == again["n_runs"]
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    said: list[str] = []
    dry = reproduce(name, "smoke", out_dir=out, dry_run=True, log=said.append)
    assert (dry["n_to_run"], dry["n_done"]) == (0, info["n_runs"]) and dry["estimated_seconds"] == 0
    assert said[-1].startswith(f"{name} [smoke]: {info['n_runs']} runs: 0 to run, {info['n_runs']} done")
    assert [r.result.metrics.get("test_acc") for r in again["records"]] == \
        [r.result.metrics.get("test_acc") for r in info["records"]] or any(
            r.result.status == "nan" for r in info["records"])


@pytest.mark.parametrize("name,preset,n", [
    ("table4", "full", 2 * 6 * 2 * 1), ("table4", "cpu", 2 * 6 * 2 * 3),
    ("table1", "full", 7 * 4 * 1), ("table1", "cpu", 7 * 4 * 3),
    ("table2", "full", 7 * 2 * 1), ("table2", "cpu", 7 * 2 * 3),
    ("collapse", "full", 6 * 9 * 1), ("collapse", "cpu", 6 * 9 * 3),
    ("robust", "full", 2 * 4 * 9 + 4 * 3 + 4 * 4), ("robust", "cpu", 3 * (2 * 4 * 9 + 4 * 3 + 4 * 4)),
])
def test_dry_run_grid_sizes(name, preset, n, tmp_path):
    info = reproduce(name, preset, out_dir=tmp_path / "x", dry_run=True, log=None)
    assert info["n_runs"] == len(info["runs"]) == n
    assert not (tmp_path / "x").exists()            # nothing trained or written
    if preset == "cpu":
        assert info["estimated_seconds"] is not None and info["estimated_seconds"] < 2 * 3600
        assert all(r["config"]["dataset"] == "cifar10" and r["config"]["limit"] for r in info["runs"])
    per_seed = n // (3 if preset == "cpu" else 1)
    assert reproduce(name, preset, seeds=2, dry_run=True, log=None)["n_runs"] == 2 * per_seed


def test_table4_full_matches_paper_settings():
    runs = build_runs("table4", "full")
    assert {r.config.model for r in runs} == {"convpool_cnn_c", "resnet20"}
    assert {r.labels["method"] for r in runs} == {"none", "bn", "gn", "sn", "wn", "pws"}
    assert {r.config.lr for r in runs} == {0.1, 0.05}
    for r in runs:
        c = r.config
        assert (c.dataset, c.batch_size, c.weight_decay, c.momentum, c.epochs, c.milestones, c.lr_decay) == \
            ("cifar10", 128, 5e-4, 0.9, 200, [100, 150, 180], 0.1)
        assert c.limit is None and c.test_limit is None and c.max_steps is None
        if c.method == "pws":
            assert c.method_opts["gamma"] == 1e-3
    # every cell has a paper number
    assert all((r.labels["arch"], r.labels["method"], r.labels["LR"]) in PAPER_NUMBERS["table4"] for r in runs)


def test_other_presets_settings():
    t1 = build_runs("table1", "full")
    assert {r.config.batch_size for r in t1} == {2, 4, 8, 128}
    mabn = [r.config for r in t1 if r.config.method == "mabn"]
    assert all(c.method_opts["batch_size"] == c.batch_size and c.method_opts["real_batch_size"] >= c.batch_size
               and c.method_opts["real_batch_size"] % c.batch_size == 0 for c in mabn)
    t2 = build_runs("table2", "full")
    assert {r.config.lr for r in t2} == {1e-3, 1e-2} and {r.config.batch_size for r in t2} == {16}
    opts = [r.config.method_opts for r in t2 if r.config.method == "pws"]
    assert {o["gamma"] for o in opts} == {1e-3, 1e-4, 1e-5}
    assert any(o.get("use_gain") is False for o in opts) and any(o.get("use_alpha") is False for o in opts)
    col = build_runs("collapse", "cpu")
    lrs = sorted({r.config.lr for r in col})
    assert lrs[0] <= 0.0125 and lrs[-1] >= 3.2 and all(math.isclose(b / a, 2) for a, b in zip(lrs, lrs[1:]))
    cpu = build_runs("table4", "cpu")
    c = cpu[0].config
    assert c.milestones == milestones_for(c.epochs) and len(c.milestones) >= 2
    assert milestones_for(200) == [100, 150, 180] and milestones_for(20) == [10, 15, 18]
    assert len({r.config.seed for r in cpu}) >= 3


def test_errors():
    with pytest.raises(ReproduceError, match="unknown experiment"):
        reproduce("table9", dry_run=True, log=None)
    with pytest.raises(ValueError, match="unknown preset"):
        reproduce("table4", preset="gpu", dry_run=True, log=None)
    with pytest.raises(ValueError, match="seeds"):
        build_runs("table4", "smoke", seeds=0)


def test_aggregate_counts_nan():
    from pwsconv.experiments.sweep import RunSpec, SweepRecord
    from pwsconv.train.engine import RunResult

    def rec(seed, acc, status="ok"):
        res = RunResult(status=status, metrics={"test_acc": acc, "images_per_s": 10.0}, epoch=1.0, step=1,
                        wall_time=1.0, out_dir="x", config={})
        return SweepRecord(RunSpec(f"r{seed}", None, {"method": "pws", "seed": seed}), res, [], False, 0.0)

    agg = aggregate([rec(0, 0.9), rec(1, math.nan, "nan"), rec(2, 0.8)], ["method"])
    assert agg[0]["err"] == "NaN (1/3)" and agg[0]["n_collapsed"] == 1 and math.isclose(agg[0]["err_mean"], 15.0)
    agg = aggregate([rec(0, 0.9), rec(1, 0.8)], ["method"])
    assert agg[0]["err"].startswith("15.00 ± ")


def test_cli_parser(tmp_path, capsys):
    from pwsconv.cli import configure_reproduce_parser

    ap = argparse.ArgumentParser()
    p = ap.add_subparsers(dest="cmd").add_parser("reproduce")
    p.set_defaults(func=configure_reproduce_parser(p))
    args = ap.parse_args(["reproduce", "table4", "--full", "--dry-run", "--out", str(tmp_path / "o")])
    assert args.func(args) == 0
    assert "24 runs" in capsys.readouterr().out
    args = ap.parse_args(["reproduce", "nope", "--dry-run"])
    with pytest.raises(ValueError):
        args.func(args)
    args = ap.parse_args(["reproduce", "table4", "--full", "--preset", "cpu", "--dry-run"])
    with pytest.raises(ValueError):
        args.func(args)


def test_cpu_preset_scales_gn_groups_with_width():
    """Width-scaled models keep the full-width net's channels per GN group (32 groups × width)."""
    from pwsconv.models import build_model

    for name in ("table4", "table1", "collapse"):
        for r in build_runs(name, "cpu"):
            c = r.config
            if c.method == "gn":
                assert c.method_opts == {"groups": round(32 * c.model_opts["width"])}
            elif c.method in ("bn", "none", "sn", "wn"):
                assert "groups" not in c.method_opts
    r = next(r for r in build_runs("table4", "cpu") if r.config.method == "gn" and r.labels["arch"] == "plain")
    net = build_model(r.config.model, "gn", num_classes=10, in_channels=3, **r.config.model_opts,
                      method_opts=r.config.method_opts)
    sizes = {m.num_channels // m.num_groups for m in net.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert sizes == {3, 6}        # 96/32 and 192/32 channels per group, as at full width


def test_robust_grid_reuses_the_collapse_and_table1_runs():
    """The plain-net BN/GN/PWS LR scan of ``robust`` is the collapse scan and its batch rows are Table 1's, config for
    config, so finished runs of those sweeps can be reused; auto is gamma="auto" with nothing else changed."""
    from pwsconv.experiments.sweep import _same_run

    rob = build_runs("robust", "cpu")
    col = {(r.labels["method"], r.labels["LR"], r.labels["seed"]): r.config for r in build_runs("collapse", "cpu")}
    t1 = {(r.labels["method"], r.labels["batch"], r.labels["seed"]): r.config for r in build_runs("table1", "cpu")}
    n_lr = n_b = 0
    for r in rob:
        lab = r.labels
        if lab["part"] == "lr" and lab["arch"] == "plain" and lab["method"] in ("bn", "gn", "pws"):
            assert _same_run(r.config.to_dict(), col[(lab["method"], lab["LR"], lab["seed"])].to_dict())
            n_lr += 1
        if lab["part"] == "batch" and lab["method"] in ("bn", "gn", "pws"):
            assert _same_run(r.config.to_dict(), t1[(lab["method"], lab["batch"], lab["seed"])].to_dict())
            n_b += 1
        if lab["method"] == "pws auto":
            assert r.config.method == "pws" and r.config.method_opts == {"gamma": "auto"}
    assert n_lr == 3 * 9 * 3 and n_b == 3 * 4 * 3
    assert {r.labels["arch"] for r in rob} == {"plain", "residual"}


def test_err_vs_plots_tell_lines_and_collapses_apart_without_colour(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from pwsconv.experiments import paper

    saved = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (saved.append(self), real(self, *a, **k))[1])
    agg = [{"method": m, "LR": lr, "err_mean": math.nan if (m == "pws" and lr == 0.8) else 50.0, "err_std": 1.0,
            "n_nan": int(m == "pws" and lr == 0.8), "n_collapsed": 0}
           for m in ("bn", "gn", "pws", "pws auto") for lr in (0.1, 0.8)]
    paper._plot_vs(agg, "LR", str(tmp_path / "err_vs_lr.png"), title="t")
    ax = saved[0].axes[0]
    styles = {ln.get_label(): (ln.get_marker(), ln.get_linestyle()) for ln in ax.get_lines()
              if not ln.get_label().startswith("_")}
    lines = {k: v for k, v in styles.items() if k != "collapsed seeds (×)"}
    assert set(lines) == {"bn", "gn", "pws", "pws auto"}
    assert len(set(lines.values())) == 4 and "x" not in {m for m, _ in lines.values()}
    assert styles["collapsed seeds (×)"][0] == "x"


def test_report_tables_from_the_finished_runs_only(tmp_path):
    """--report: a sweep in progress (or stopped by a time limit) gets its tables from the finished runs, trains
    nothing more and says which runs are missing; with no finished run it refuses in one line."""
    from pwsconv.experiments.sweep import run_sweep

    out = tmp_path / "robust"
    with pytest.raises(ReproduceError, match="no finished run"):
        reproduce("robust", "smoke", out_dir=out, report=True, log=None)
    runs = build_runs("robust", "smoke")
    run_sweep(runs[:3], out, log=None)
    info = reproduce("robust", "smoke", out_dir=out, report=True, log=None, plots=False)
    assert len(info["records"]) == 3 and all(r.skipped for r in info["records"])
    assert sorted(info["unfinished"]) == sorted(r.name for r in runs[3:])
    md = (out / "results.md").read_text()
    assert "Partial report" in md and runs[3].name in md
    assert not (out / runs[3].name).exists()          # nothing trained


def test_table1_rewrites_the_same_bytes_when_a_rate_sits_on_a_rounding_edge(tmp_path, monkeypatch):
    """A measured rate like 908.5012 img/s reads 909 in results.md; speed.csv keeps 908.50, which reads 908 — the table
    must come from the rates as speed.csv holds them, so the call that only re-reads them writes the same bytes."""
    import pwsconv.experiments.speed as speed_mod

    def fake_rates(model, methods, batch, **kw):
        return {m: {"ms": 8.80571234, "images_per_s": 908.5012, "ratio_to_first": 1.09424999} for m in methods}

    monkeypatch.setattr(speed_mod, "train_step_rates", fake_rates)
    out = tmp_path / "table1"
    reproduce("table1", "smoke", out_dir=out, log=None)
    md = (out / "results.md").read_text()
    assert "| 908 |" in md   # 908.50 → 908 (round half to even), as when read back
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    reproduce("table1", "smoke", out_dir=out, log=None)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_one_writer_of_the_tables(tmp_path):
    """Shards that finish together, or a --report meanwhile: a call that finds another writing the tables waits for
    it, then writes them itself (it has every finished run); a killed writer's temporary files are cleared."""
    import threading

    from pwsconv.train.rundir import lock_run_dir

    out = tmp_path / "collapse"
    held, release = threading.Event(), threading.Event()

    def holder():   # another writer (a thread counts as one: the lock is per process and thread)
        with lock_run_dir(out):
            held.set()
            release.wait(60)

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert held.wait(60)
        (out / ".curves.png.k1ll3d.tmp").write_bytes(b"half a png")   # a writer killed mid-write
        said: list[str] = []

        def log(line: str) -> None:
            said.append(line)
            if line.startswith("waiting"):
                assert not (out / "results.md").exists()   # nothing written while the other holds the lock
                release.set()

        info = reproduce("collapse", "smoke", out_dir=out, shard=(0, 1), log=log)
    finally:
        release.set()
        t.join()
    assert any(line == f"waiting: another process is writing the tables in {out}" for line in said)
    assert (out / "results.md").is_file() and "curves" in info["files"] and len(info["records"]) == info["n_runs"]
    assert not list(out.glob(".*tmp*")) and not (out / ".lock").exists()
