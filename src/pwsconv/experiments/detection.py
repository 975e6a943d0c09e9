"""The paper's detection tables (1–3) and its ImageNet table (5) as resumable sweeps: ``pwsconv reproduce NAME``.
Each table is one file of :mod:`pwsconv.experiments.tables` (a :class:`~pwsconv.experiments.det_table.DetTable`: its
grid, the paper's numbers, its summary); this module is their runner.

    pwsconv reproduce voc_table1 --full --data-root /data/voc            # Table 1: methods × batch 2/4/8, SSD-VGG16
    pwsconv reproduce voc_table2 --full --data-root /data/voc            # Table 2: the ablation rows
    pwsconv reproduce coco_table3 --full --data-root /data/coco --weights resnet50-0676ba61.pth   # Table 3
    pwsconv reproduce imagenet_table5 --full --data-root /data/ILSVRC2012                        # Table 5
    torchrun --nproc_per_node=8 -m pwsconv.cli reproduce voc_table1 --full --data-root /data/voc   # 8 GPUs
    pwsconv reproduce voc_table1 --full --dry-run                        # the grid and a time estimate
    pwsconv reproduce voc_table1 --preset smoke                          # CPU, minutes: the whole pipeline

Presets: ``full`` = the paper's settings on the real data (``--data-root``); ``smoke`` = every code path on a small
real-pixel set built on the fly (once, under ``$PWSCONV_CACHE/synthetic``, default ``~/.cache/pwsconv``) (MNIST digits pasted on CIFAR-10 photographs, written as VOCdevkit and COCO; an
image-folder tree of CIFAR-10 JPEGs for ImageNet) with small models and a few steps; ``cpu`` = the same synthetic
set with longer runs (a measurable mAP, tens of minutes on 2 cores). Every run lives in ``OUT/<run>/`` (config.yaml,
metrics.csv/jsonl, checkpoint.pt, result.json): a finished run is skipped, an interrupted one resumed from its
checkpoint, so re-running the command continues the sweep. Under torchrun every run is one DDP job over all processes.
``OUT/results.md`` puts the paper's numbers beside the measured ones; ``results.csv``/``results.jsonl`` have one row
per run.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Sequence

from ..train.checkpoint import atomic_write_text
from .det_table import DET_PRESETS, DetPreset, DetRunSpec, DetTable, md
from .table import PRESETS
from .paper import ReproduceError, pick
from .sweep import write_rows
from .tables import DET_TABLES
from .tables.coco_table3 import PAPER as PAPER_TABLE3
from .tables.imagenet_table5 import PAPER as PAPER_TABLE5
from .tables.table1 import PAPER as _PAPER_TABLE1

__all__ = ["EXTRA_EXPERIMENTS", "PAPER_TABLE3", "PAPER_TABLE5", "DetRunSpec", "build_det_runs", "reproduce_extra",
           "run_det_sweep"]

#: images/s of one GPU used for the --dry-run estimate: Table 1's RTX 2080Ti numbers (SSD, batch 8) where the paper
#: gives one; rough single-V100 figures otherwise (Mask R-CNN ~10 img/s, ResNet-50 ~400 img/s training)
_T1_FPS = {m: v[0] for m, v in _PAPER_TABLE1.items()}
_FULL_SIZES = {"voc_train": 16551, "voc_test": 4952, "coco_train": 117266, "coco_val": 5000,
               "imagenet_train": 1281167, "imagenet_val": 50000}
#: the experiments of this runner, one file each in :mod:`pwsconv.experiments.tables`
EXTRA_EXPERIMENTS = tuple(DET_TABLES)


# ---------------------------------------------------------------------------------------------------- data
def _synthetic(out_dir: str, p: DetPreset, data_root: str | None) -> dict[str, Any]:
    from ..detection.synthetic import make_detection_set

    return make_detection_set(os.path.join(out_dir, f"detection_{p.n_train}_{p.n_test}_{p.canvas}"), p.n_train,
                              p.n_test, canvas=p.canvas, data_dir=data_root)


def _imagenet_tree(out_dir: str, preset: str, data_root: str | None) -> dict[str, Any]:
    """A small ILSVRC-layout tree of real CIFAR-10 JPEGs (10 classes) for the smoke/cpu presets."""
    import numpy as np

    from ..data.datasets import find_data_root

    src = find_data_root("cifar10", data_root) / "cifar10_train_jpeg_bytes.npz"
    if not src.is_file():
        raise ReproduceError(f"{src} not found: the {preset} preset builds its image folder from it")
    root = os.path.join(out_dir, f"imagefolder_{preset}")
    per_train, per_val = (8, 2) if preset == "smoke" else (100, 20)
    stamp = os.path.join(root, "tree.json")
    if os.path.isfile(stamp) and json.load(open(stamp)).get("per") == [per_train, per_val]:
        return {"root": root}
    z = np.load(src)
    jpeg, off, y, names = z["jpeg"], z["offsets"], z["y"], z["classes"]
    for c in range(len(names)):
        idx = np.flatnonzero(y == c)[: per_train + per_val]
        for k, i in enumerate(idx):
            d = os.path.join(root, "train" if k < per_train else "val", f"n{c:08d}_{names[c]}")
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, f"{i:05d}.JPEG"), "wb") as f:
                f.write(jpeg[off[i]:off[i + 1]].tobytes())
    with open(stamp, "w") as f:
        json.dump({"per": [per_train, per_val]}, f)
    return {"root": root}


def _rank0_first(make: Callable[[], dict[str, Any]], out_dir: str) -> dict[str, Any]:
    """Under torchrun the synthetic data is written by rank 0; the other processes wait for it, then read it."""
    rank = int(os.environ.get("RANK", "0") or 0)
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return make()
    done = os.path.join(out_dir, ".synthetic_ready")
    os.makedirs(out_dir, exist_ok=True)
    if rank == 0:
        if os.path.exists(done):
            os.remove(done)
        info = make()
        atomic_write_text(json.dumps(info), done)
        return info
    for _ in range(6000):
        if os.path.exists(done):
            return make()   # complete: its stamp makes this a read, not a second write
        time.sleep(0.1)
    raise ReproduceError(f"rank {rank}: rank 0 did not build the synthetic data under {out_dir} in 10 minutes")


def _det_table(name: str, preset: str) -> DetTable:
    return pick(DET_TABLES, name, preset, [p for p in PRESETS if p in DET_PRESETS], EXTRA_EXPERIMENTS)


def _check_full(table: DetTable, data_root: str | None, weights: str | None) -> None:
    """The full preset trains on the real data: ``data_root`` must hold it (and ``weights`` exist, if needed)."""
    if not data_root:
        raise ReproduceError(f"{table.name} --full needs --data-root (VOC: the directory holding VOCdevkit/; COCO: "
                             "train2017/, val2017/, annotations/; ImageNet: train/ and val/)")
    if not os.path.isdir(data_root):
        raise ReproduceError(f"--data-root {data_root}: not a directory")
    if table.weights:
        if not weights:
            raise ReproduceError(f"{table.name} --full needs --weights: an ImageNet ResNet-50 state_dict for Mask "
                                 "R-CNN's backbone (torchvision's resnet50-*.pth; the paper starts from one)")
        if not os.path.isfile(weights):
            raise ReproduceError(f"--weights {weights}: file not found")
    if not os.path.exists(os.path.join(data_root, table.need)):
        raise ReproduceError(f"--data-root {data_root}: no {table.need} (see the README's detection/ImageNet "
                             "section for the expected layout)")


def _synthetic_data(table: DetTable, preset: str, out_dir: str, data_root: str | None) -> dict[str, Any]:
    """The smoke/cpu presets' data, built once in the cache (never in the results tree)."""
    from ..data.readers import default_cache_dir

    cache = os.path.join(os.fspath(default_cache_dir()), "synthetic")
    return _rank0_first(lambda: _imagenet_tree(cache, preset, data_root) if table.data == "imagenet" else
                        _synthetic(cache, DET_PRESETS[preset], data_root), out_dir)


def build_det_runs(name: str, preset: str, out_dir: str, data_root: str | None = None,
                   weights: str | None = None, make_data: bool = True) -> list[DetRunSpec]:
    """The run list of experiment ``name`` at ``preset`` (the synthetic data of smoke/cpu is built under
    ``out_dir`` unless ``make_data`` is False, e.g. for a dry run)."""
    table = _det_table(name, preset)
    data: dict[str, Any] = {}
    if preset == "full" and make_data:
        _check_full(table, data_root, weights)
    elif preset == "full":   # a dry run: placeholders for what is not given; the weights file need not exist
        if data_root and not os.path.isdir(data_root):
            raise ReproduceError(f"--data-root {data_root}: not a directory")
        data_root = data_root or "DATA_ROOT"
        if table.weights:
            return _unvalidated(lambda: table.runs(preset, data, data_root, weights or "RESNET50.pth"))
    elif make_data:
        data = _synthetic_data(table, preset, out_dir, data_root)
    else:
        data = {"root": "SYNTHETIC", "voc_root": "SYNTHETIC", "coco_root": "SYNTHETIC",
                "classes": [f"digit{i}" for i in range(10)]}
    return table.runs(preset, data, data_root, weights)


def _unvalidated(make: Callable[[], list[DetRunSpec]]) -> list[DetRunSpec]:
    """``make()`` with DetConfig's validation off (to print the grid of a dry run)."""
    from ..detection import train as T

    real = T.DetConfig.validate
    T.DetConfig.validate = lambda self: self
    try:
        return make()
    finally:
        T.DetConfig.validate = real


# ---------------------------------------------------------------------------------------------------- sweep
def _same_config(a: dict[str, Any], b: dict[str, Any], kind: str) -> bool:
    if kind == "detection":
        from ..detection.train import _same

        return not _same(a, b)
    from .sweep import _same_run

    return _same_run(a, b)


def run_det_sweep(runs: Sequence[DetRunSpec], out_dir: str, *, log: Callable[[str], None] | None = print,
                  progress: bool = True) -> list[dict[str, Any]]:
    """Train every run (skipping finished ones, resuming interrupted ones); returns one record per run."""
    from ..train.engine import RunResult, train

    is_main = os.environ.get("RANK", "0") in ("", "0")
    records = []
    for k, spec in enumerate(runs):
        run_dir = os.path.join(out_dir, spec.name)
        cfg = spec.config
        cfg.out_dir = run_dir
        cfg.name = spec.name
        cfg.progress = bool(progress and is_main)
        t0 = time.perf_counter()
        skipped = False
        res_path = os.path.join(run_dir, "result.json")
        if os.path.isfile(res_path) and not os.path.isfile(os.path.join(run_dir, "checkpoint.pt.tmp")):
            try:
                old = RunResult.load(run_dir)
            except (ValueError, KeyError, OSError):
                old = None
            if old is not None and old.status in ("ok", "nan") and _same_config(old.config, cfg.to_dict(), spec.kind):
                res, skipped = old, True
        if not skipped:
            if log is not None and is_main:
                log(f"[{k + 1}/{len(runs)}] {spec.name}: " + ", ".join(f"{a}={b}" for a, b in spec.labels.items()))
            if spec.kind == "detection":
                from ..detection.train import train_detector

                res = train_detector(cfg, resume=True)
            else:
                res = train(cfg, resume=True)
        records.append({"name": spec.name, "labels": dict(spec.labels), "status": res.status,
                        "metrics": dict(res.metrics), "step": res.step, "wall_time": res.wall_time,
                        "skipped": skipped, "seconds": time.perf_counter() - t0})
    return records


def _estimate(runs: Sequence[DetRunSpec], preset: str) -> float | None:
    if preset != "full":
        return None
    total = 0.0
    for r in runs:
        c = r.config
        if r.kind == "imagenet":
            total += c.epochs * (_FULL_SIZES["imagenet_train"] / 400 + _FULL_SIZES["imagenet_val"] / 1500)
        elif c.model.startswith("maskrcnn"):
            total += c.epochs * _FULL_SIZES["coco_train"] / 10
        else:
            n = _FULL_SIZES["voc_train"] if c.dataset == "voc" else _FULL_SIZES["coco_train"]
            total += c.epochs * n / _T1_FPS.get(c.method, 45.0)
    return total


def _write_outputs(table: DetTable, preset: str, out_dir: str, records: list[dict[str, Any]], command: str,
                   wall: float) -> dict[str, str]:
    import torch

    files = {"md": os.path.join(out_dir, "results.md"), "csv": os.path.join(out_dir, "results.csv"),
             "jsonl": os.path.join(out_dir, "results.jsonl")}
    flat = []
    for r in records:
        row = {"run": r["name"], **r["labels"], "status": r["status"], "step": r["step"],
               "train_time_s": round(r["wall_time"], 1)}
        row.update({k: v for k, v in r["metrics"].items() if isinstance(v, (int, float))})
        flat.append(row)
    write_rows(flat, files["csv"], files["jsonl"])
    cols = list(dict.fromkeys(k for row in flat for k in row))
    import torchvision

    skipped = sum(r["skipped"] for r in records)
    lines = [f"# {table.title}", "", f"Preset **{preset}** — {len(records)} runs ({skipped} already done before "
             f"this call, skipped).", "", table.summary(records), ""]
    if preset != "full":
        lines += [f"Note: the {preset} preset trains small models for a few steps on a synthetic real-pixel set (MNIST "
               "digits on CIFAR-10 photographs, or CIFAR-10 JPEGs as an image folder); it checks the pipeline, so "
               "its numbers are not comparable with the paper's.", ""]
    lines += ["## Reproduce", "", "```", command, "```", "",
              f"Versions: torch {torch.__version__}, torchvision {torchvision.__version__}", "",
              f"Wall time of this call: {wall:.1f} s.", "", "## All runs", "",
              md(cols, [[row.get(c) for c in cols] for row in flat]), ""]
    atomic_write_text("\n".join(lines), files["md"])
    return files


def reproduce_extra(name: str, preset: str = "smoke", out_dir: str | None = None, data_root: str | None = None,
                    weights: str | None = None, dry_run: bool = False, progress: bool = True,
                    log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Run experiment ``name`` (:data:`EXTRA_EXPERIMENTS`) at ``preset`` and write ``results.md``/``.csv``/``.jsonl``
    under ``out_dir`` (default ``results/reproduce/<name>_<preset>``). ``dry_run``: the run list and, for ``full``,
    a time estimate on one GPU; nothing is trained or written."""
    if not dry_run:   # the detection extra, checked before anything runs (without importing it)
        import importlib.util

        needs = ("torchvision",) if name == "imagenet_table5" else ("torchvision", "pycocotools")
        missing = [m for m in needs if importlib.util.find_spec(m) is None]
        if missing:
            raise ReproduceError(f"{name} needs {' and '.join(missing)} (the detection extra): pip install "
                                 "torch==2.14.1 -e '.[detection]' (torchvision 0.29.1 needs exactly torch 2.14.1)")
    if name not in EXTRA_EXPERIMENTS:
        raise ReproduceError(f"unknown experiment {name!r}; choose one of {', '.join(EXTRA_EXPERIMENTS)}")
    out_dir = out_dir or os.path.join("results", "reproduce", f"{name}_{preset}")
    command = f"pwsconv reproduce {name} --preset {preset}" + (f" --data-root {data_root}" if data_root else "") + \
        (f" --weights {weights}" if weights else "") + f" --out {out_dir}"
    if preset == "full":
        command += f"\n# multi-GPU: torchrun --nproc_per_node=N -m pwsconv.cli reproduce {name} --full ..."
    runs = build_det_runs(name, preset, out_dir, data_root, weights, make_data=not dry_run)
    info: dict[str, Any] = {"name": name, "preset": preset, "out_dir": out_dir, "n_runs": len(runs),
                            "runs": [r.name for r in runs], "command": command}
    is_main = os.environ.get("RANK", "0") in ("", "0")
    if dry_run:
        est = _estimate(runs, preset)
        info["estimated_seconds"] = est
        if log is not None:
            for r in runs:
                c = r.config
                log(f"  {r.name}: " + ", ".join(f"{k}={v}" for k, v in r.labels.items()) +
                    f" | {c.model}, batch {c.batch_size}, lr {c.lr:g}, epochs {c.epochs}, milestones {c.milestones}"
                    + (f", γ {c.method_opts['gamma']}" if "gamma" in c.method_opts else ""))
            log(f"{name} [{preset}]: {len(runs)} runs" + (
                f", about {est / 3600:.0f} GPU-hours on one GPU (paper's 2080Ti speeds for SSD; ~10 img/s Mask R-CNN, "
                f"~400 img/s ResNet-50); divide by the torchrun processes" if est else "") + f" → {out_dir}")
        return info
    t0 = time.perf_counter()
    records = run_det_sweep(runs, out_dir, log=log, progress=progress)
    wall = time.perf_counter() - t0
    files = _write_outputs(DET_TABLES[name], preset, out_dir, records, command, wall) if is_main else {}
    info.update({"records": records, "files": files, "wall_time": wall})
    if log is not None and is_main:
        log(f"{name} [{preset}]: {len(records)} runs in {wall:.1f} s → {files['md']}")
    return info
