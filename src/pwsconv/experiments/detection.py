"""The paper's detection tables (1–3) and its ImageNet table (5) as resumable sweeps: ``pwsconv reproduce NAME``.

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
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..train.checkpoint import atomic_write_text
from .paper import PAPER_NUMBERS, ReproduceError
from .sweep import write_rows

__all__ = ["EXTRA_EXPERIMENTS", "PAPER_TABLE3", "PAPER_TABLE5", "DetRunSpec", "build_det_runs", "reproduce_extra",
           "run_det_sweep"]

#: Table 3 (COCO): (structure, method, schedule) → (AP, AP50, AP75) bbox, %
PAPER_TABLE3: dict[tuple[str, str, str], tuple[float, float, float]] = {
    ("Mask R-CNN", "bn", "1x"): (38.0, 58.6, 41.4),
    ("Mask R-CNN", "gn", "1x"): (38.2, 59.2, 41.1),
    ("Mask R-CNN", "pws", "1x"): (38.9, 59.6, 42.5),
    ("SSD", "bn", "1x"): (25.2, 41.3, 26.4),
    ("SSD", "pws", "1x"): (25.3, 41.2, 26.6),
    ("SSD", "bn", "2x"): (26.6, 42.7, 28.1),
    ("SSD", "pws", "2x"): (27.2, 44.0, 28.7),
}
#: Table 5 (ImageNet val, ResNet-50): top-1 error (%). The paper gives no top-5 numbers (only its Figure 5 curves).
PAPER_TABLE5: dict[str, float] = {"bn": 23.6, "gn": 24.3, "ln": 25.3, "in": 28.4, "wn": 28.2, "pws": 24.0}

EXTRA_EXPERIMENTS = ("voc_table1", "voc_table2", "coco_table3", "imagenet_table5")
_TITLES = {
    "voc_table1": "Table 1 — SSD-VGG16 on VOC07: sensitivity to the batch size (mAP %) and training speed",
    "voc_table2": "Table 2 — SSD on VOC07: PWS ablation (√(2/n_l), trainable α, γ) at LR 1e-3 and 1e-2, batch 16",
    "coco_table3": "Table 3 — COCO detection: Mask R-CNN R-50-FPN 1x, SSD-VGG16 1x/2x (bbox AP %)",
    "imagenet_table5": "Table 5 — ResNet-50 on ImageNet: top-1 / top-5 validation error (%)",
}
#: images/s of one GPU used for the --dry-run estimate: Table 1's RTX 2080Ti numbers (SSD, batch 8) where the paper
#: gives one; rough single-V100 figures otherwise (Mask R-CNN ~10 img/s, ResNet-50 ~400 img/s training)
_T1_FPS = {m: v[0] for m, v in PAPER_NUMBERS["table1"].items()}
_FULL_SIZES = {"voc_train": 16551, "voc_test": 4952, "coco_train": 117266, "coco_val": 5000,
               "imagenet_train": 1281167, "imagenet_val": 50000}


@dataclass
class DetRunSpec:
    name: str
    kind: str                       # "detection" | "imagenet"
    config: Any                     # DetConfig | TrainConfig
    labels: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------- grids
T1_METHODS = ("in", "bn", "gn", "sn", "wn", "pws")
T1_BATCHES = (2, 4, 8)
#: Table 2 rows: (method, LR, backbone, √(2/n_l), trainable α, γ) — the paper's order
T2_ROWS = [(m, lr, bb, g, a, gam) for (m, lr, bb, g, a, gam, _v) in PAPER_NUMBERS["table2"]]


def _pws_opts(gamma: float | None, gain: bool | None = True, alpha: bool | None = True) -> dict[str, Any]:
    o: dict[str, Any] = {"gamma": gamma}
    if gain is False:
        o["use_gain"] = False
    if alpha is False:
        o["use_alpha"] = False
    return o


@dataclass(frozen=True)
class _DetPreset:
    model_vgg: str
    model_resnet: str
    size: int | None
    epochs_scale: float             # the paper's epochs × this (smoke/cpu: a few epochs on the synthetic set)
    max_steps: int | None
    n_train: int = 0
    n_test: int = 0
    canvas: int = 96
    rcnn_size: int | None = None
    num_workers: int = 4


_DET_PRESETS = {
    "full": _DetPreset("ssd_vgg16", "ssd_resnet50", 320, 1.0, None, rcnn_size=800, num_workers=8),
    "cpu": _DetPreset("ssd_tiny", "ssd_tiny", 96, 0.0, 300, n_train=400, n_test=100, rcnn_size=96, num_workers=1),
    "smoke": _DetPreset("ssd_tiny", "ssd_tiny", 96, 0.0, 3, n_train=48, n_test=16, rcnn_size=64, num_workers=0),
}


def _synthetic(out_dir: str, p: _DetPreset, data_root: str | None) -> dict[str, Any]:
    from ..detection.synthetic import make_detection_set

    return make_detection_set(os.path.join(out_dir, f"detection_{p.n_train}_{p.n_test}_{p.canvas}"), p.n_train,
                              p.n_test, canvas=p.canvas, data_dir=data_root)


def _det_cfg(preset: str, data: dict[str, Any], **kw: Any) -> Any:
    from ..detection.train import DetConfig

    p = _DET_PRESETS[preset]
    epochs, milestones = kw.pop("epochs"), kw.pop("milestones")
    if preset != "full":   # the synthetic set: max_steps bounds the run; the schedule keeps its shape
        epochs, milestones = 1000, []
        kw.pop("data_root", None)
    base = dict(epochs=epochs, milestones=milestones, max_steps=p.max_steps, num_workers=p.num_workers,
                progress=True, ckpt_every=500 if preset == "full" else 0, log_every=20 if preset == "full" else 10)
    if preset != "full":
        base.update(data_root=data["voc_root"] if kw.get("dataset", "voc") == "voc" else data["coco_root"],
                    eval_batch_size=16, num_threads=1)
        if kw.get("dataset", "voc") == "voc":
            base["classes"] = data["classes"]
        else:
            base.update(train_sets="train2017", test_sets="val2017")
    elif kw.get("dataset") == "coco":
        base.update(train_sets="train2017", test_sets="val2017")
    base.update(kw)
    return DetConfig.from_dict(base)


def _voc_table1(preset: str, data: dict[str, Any], root: str | None, weights: str | None) -> list[DetRunSpec]:
    p = _DET_PRESETS[preset]
    methods = ("bn", "pws") if preset == "smoke" else T1_METHODS
    batches = (2,) if preset == "smoke" else T1_BATCHES
    runs = []
    for m in methods:
        for b in batches:
            cfg = _det_cfg(preset, data, model=p.model_vgg, method=m, method_opts=_pws_opts(1e-3) if m == "pws" else {},
                           dataset="voc", data_root=root, size=p.size, batch_size=b, lr=1e-2, momentum=0.9,
                           weight_decay=5e-4, epochs=240, milestones=[90, 170])
            runs.append(DetRunSpec(f"{m}_b{b}", "detection", cfg, {"method": m, "batch": b}))
    return runs


def _voc_table2(preset: str, data: dict[str, Any], root: str | None, weights: str | None) -> list[DetRunSpec]:
    p = _DET_PRESETS[preset]
    runs = []
    for i, (m, lr, bb, gain, alpha, gamma) in enumerate(T2_ROWS):
        if preset == "smoke" and i not in (1, 6, 8):
            continue
        opts = _pws_opts(gamma, gain, alpha) if m == "pws" else {}
        model = p.model_resnet if bb == "ResNet-50" else p.model_vgg
        cfg = _det_cfg(preset, data, model=model, method=m, method_opts=opts, dataset="voc", data_root=root,
                       size=p.size, batch_size=16 if preset != "smoke" else 4, lr=lr, weight_decay=5e-4, epochs=240,
                       milestones=[90, 170])
        label = {"row": i + 1, "method": m, "LR": lr, "backbone": bb, "gain": _mark(gain), "alpha": _mark(alpha),
                 "gamma": gamma if gamma is not None else "—"}
        runs.append(DetRunSpec(f"r{i + 1:02d}_{m}_lr{lr:g}_{'r50' if bb == 'ResNet-50' else 'vgg'}", "detection", cfg,
                               label))
    return runs


def _mark(v: bool | None) -> str:
    return "—" if v is None else ("✓" if v else "✗")


def _coco_table3(preset: str, data: dict[str, Any], root: str | None, weights: str | None) -> list[DetRunSpec]:
    p = _DET_PRESETS[preset]
    runs = []
    for m in ("bn", "gn", "pws"):
        if preset == "smoke" and m == "bn":
            continue
        # the mmdetection 1x recipe (Chen et al. 2019) at the paper's batch 4: LR 0.02·4/16, warm-up 500 steps,
        # ×0.1 after epochs 8 and 11 of 12, weight decay 1e-4; pretrained backbone (stem + layer1 frozen)
        cfg = _det_cfg(preset, data, model="maskrcnn_resnet50_fpn", method=m,
                       method_opts=_pws_opts(1e-4) if m == "pws" else {}, dataset="coco", data_root=root,
                       masks=True, size=p.rcnn_size, weights=weights if preset == "full" else None, batch_size=4 if
                       preset == "full" else 2, lr=0.005 if preset == "full" else 0.01, weight_decay=1e-4,
                       warmup_steps=500 if preset == "full" else 0, warmup_factor=1 / 3, epochs=12, milestones=[8, 11],
                       model_opts={} if preset == "full" else {"box_batch_size_per_image": 64,
                                                               "rpn_post_nms_top_n_train": 200})
        runs.append(DetRunSpec(f"maskrcnn_{m}_1x", "detection", cfg, {"structure": "Mask R-CNN", "method": m,
                                                                       "schedule": "1x"}))
    for sched, epochs, ms in (("1x", 80, [30, 50, 70]), ("2x", 150, [60, 100, 140])):
        for m in ("bn", "pws"):
            if preset == "smoke" and (sched == "2x" or m == "bn"):
                continue
            cfg = _det_cfg(preset, data, model=p.model_vgg, method=m, method_opts=_pws_opts(1e-4) if m == "pws" else {},
                           dataset="coco", data_root=root, size=p.size, batch_size=16 if preset == "full" else 8,
                           lr=1e-2, weight_decay=5e-4, epochs=epochs, milestones=ms)
            runs.append(DetRunSpec(f"ssd_{m}_{sched}", "detection", cfg, {"structure": "SSD", "method": m,
                                                                           "schedule": sched}))
    return runs


def _imagenet_table5(preset: str, data: dict[str, Any], root: str | None, weights: str | None) -> list[DetRunSpec]:
    from ..config import TrainConfig

    runs = []
    methods = ("bn", "pws") if preset == "smoke" else ("bn", "gn", "ln", "in", "wn", "pws")
    for m in methods:
        cfg = dict(model="resnet50" if preset == "full" else "resnet50_small", method=m,
                   method_opts={"gamma": 1e-4} if m == "pws" else {}, dataset="imagenet",
                   data_root=root if preset == "full" else data["root"], batch_size=64 if preset != "smoke" else 8,
                   eval_batch_size=100 if preset == "full" else 16, lr=0.025, momentum=0.9, weight_decay=1e-4,
                   epochs=100 if preset == "full" else (2 if preset == "cpu" else 1),
                   milestones=[30, 60, 90] if preset == "full" else [], num_workers=8 if preset == "full" else 1,
                   max_steps=None if preset == "full" else (None if preset == "cpu" else 2),
                   ckpt_every=1000 if preset == "full" else 0, progress=False,
                   num_threads=None if preset == "full" else 1)
        runs.append(DetRunSpec(f"{m}", "imagenet", TrainConfig.from_dict(cfg), {"method": m}))
    return runs


_BUILDERS: dict[str, Callable[..., list[DetRunSpec]]] = {
    "voc_table1": _voc_table1, "voc_table2": _voc_table2, "coco_table3": _coco_table3,
    "imagenet_table5": _imagenet_table5,
}


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


def build_det_runs(name: str, preset: str, out_dir: str, data_root: str | None = None,
                   weights: str | None = None, make_data: bool = True) -> list[DetRunSpec]:
    """The run list of experiment ``name`` at ``preset`` (the synthetic data of smoke/cpu is built under
    ``out_dir`` unless ``make_data`` is False, e.g. for a dry run)."""
    if name not in _BUILDERS:
        raise ReproduceError(f"unknown experiment {name!r}; choose one of {', '.join(EXTRA_EXPERIMENTS)}")
    if preset not in ("full", "cpu", "smoke"):
        raise ReproduceError(f"unknown preset {preset!r}; choose cpu, full or smoke")
    data: dict[str, Any] = {}
    if preset == "full":
        if not data_root and make_data:
            raise ReproduceError(f"{name} --full needs --data-root (VOC: the directory holding VOCdevkit/; COCO: "
                                 "train2017/, val2017/, annotations/; ImageNet: train/ and val/)")
        if data_root and not os.path.isdir(data_root):
            raise ReproduceError(f"--data-root {data_root}: not a directory")
        if name == "coco_table3" and make_data:
            if not weights:
                raise ReproduceError("coco_table3 --full needs --weights: an ImageNet ResNet-50 state_dict for Mask "
                                     "R-CNN's backbone (torchvision's resnet50-*.pth; the paper starts from one)")
            if not os.path.isfile(weights):
                raise ReproduceError(f"--weights {weights}: file not found")
        if data_root and make_data:
            need = {"voc_table1": "VOCdevkit/VOC2007/ImageSets/Main/test.txt",
                    "voc_table2": "VOCdevkit/VOC2007/ImageSets/Main/test.txt",
                    "coco_table3": "annotations/instances_train2017.json", "imagenet_table5": "train"}[name]
            if not os.path.exists(os.path.join(data_root, need)):
                raise ReproduceError(f"--data-root {data_root}: no {need} (see the README's detection/ImageNet "
                                     "section for the expected layout)")
        if not make_data:
            data_root = data_root or "DATA_ROOT"
            weights = weights or ("RESNET50.pth" if name == "coco_table3" else None)
    elif make_data:
        from ..data.readers import default_cache_dir

        cache = os.path.join(os.fspath(default_cache_dir()), "synthetic")   # data never lands in the results tree
        data = _rank0_first(lambda: _imagenet_tree(cache, preset, data_root) if name == "imagenet_table5" else
                            _synthetic(cache, _DET_PRESETS[preset], data_root), out_dir)
    else:
        data = {"root": "SYNTHETIC", "voc_root": "SYNTHETIC", "coco_root": "SYNTHETIC",
                "classes": [f"digit{i}" for i in range(10)]}
    if not make_data and preset == "full" and name == "coco_table3":
        return _dry_coco(preset, data_root, weights)
    return _BUILDERS[name](preset, data, data_root, weights)


def _dry_coco(preset: str, root: str | None, weights: str | None) -> list[DetRunSpec]:
    from ..detection import train as T

    real = T.DetConfig.validate
    T.DetConfig.validate = lambda self: self   # the weights file need not exist to print the grid
    try:
        return _coco_table3(preset, {}, root, weights)
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


# ---------------------------------------------------------------------------------------------------- tables
def _f(v: Any, digits: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return "NaN" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def _md(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(_f(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _by(records: list[dict[str, Any]], **want: Any) -> dict[str, Any] | None:
    for r in records:
        if all(r["labels"].get(k) == v for k, v in want.items()):
            return r
    return None


def _metric(r: dict[str, Any] | None, key: str) -> float | None:
    if r is None:
        return None
    if r["status"] == "nan":
        return math.nan
    v = r["metrics"].get(key)
    return None if v is None else float(v)


def _summary(name: str, records: list[dict[str, Any]]) -> str:
    if name == "voc_table1":
        head = ["method", "paper img/s (2080Ti, b8)", "measured img/s (b8)"]
        for b in T1_BATCHES:
            head += [f"paper mAP b{b}", f"measured mAP b{b}"]
        rows = []
        for m in T1_METHODS:
            fps, maps = PAPER_NUMBERS["table1"].get(m, (None, {}))
            r8 = _by(records, method=m, batch=8)
            row: list[Any] = [m, fps, _metric(r8, "images_per_s")]
            for b in T1_BATCHES:
                row += [maps.get(b), _metric(_by(records, method=m, batch=b), "mAP")]
            if any(_by(records, method=m, batch=b) for b in T1_BATCHES):
                rows.append(row)
        return _md(head, rows)
    if name == "voc_table2":
        rows = []
        for i, (m, lr, bb, g, a, gam, v) in enumerate(PAPER_NUMBERS["table2"]):
            r = _by(records, row=i + 1)
            if r is None:
                continue
            rows.append([i + 1, m, f"{lr:g}", bb, _mark(g), _mark(a), "—" if gam is None else f"{gam:g}", v,
                         _metric(r, "mAP")])
        return _md(["row", "method", "LR", "backbone", "√(2/n_l)", "trainable α", "γ", "paper mAP", "measured mAP"],
                   rows)
    if name == "coco_table3":
        rows = []
        for (s, m, sch), (ap, ap50, ap75) in PAPER_TABLE3.items():
            r = _by(records, structure=s, method=m, schedule=sch)
            if r is None:
                continue
            rows.append([s, m, sch, ap, _metric(r, "AP"), ap50, _metric(r, "AP50"), ap75, _metric(r, "AP75"),
                         _metric(r, "segm_AP") if s == "Mask R-CNN" else None])
        return _md(["structure", "method", "schedule", "paper AP", "AP", "paper AP50", "AP50", "paper AP75", "AP75",
                    "mask AP"], rows)
    rows = []
    for m, err in PAPER_TABLE5.items():
        r = _by(records, method=m)
        if r is None:
            continue
        a1, a5 = _metric(r, "val_acc"), _metric(r, "val_acc5")
        rows.append([m, err, None if a1 is None else 100 * (1 - a1), "—", None if a5 is None else 100 * (1 - a5),
                     _metric(r, "images_per_s")])
    return _md(["method", "paper top-1 err", "top-1 err", "paper top-5 err", "top-5 err", "train img/s"], rows)


def _estimate(name: str, runs: Sequence[DetRunSpec], preset: str) -> float | None:
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


def _write_outputs(name: str, preset: str, out_dir: str, records: list[dict[str, Any]], command: str,
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
    md = [f"# {_TITLES[name]}", "", f"Preset **{preset}** — {len(records)} runs ({skipped} already done before this "
          f"call, skipped).", "", _summary(name, records), ""]
    if preset != "full":
        md += [f"Note: the {preset} preset trains small models for a few steps on a synthetic real-pixel set (MNIST "
               "digits on CIFAR-10 photographs, or CIFAR-10 JPEGs as an image folder); it checks the pipeline, so "
               "its numbers are not comparable with the paper's.", ""]
    md += ["## Reproduce", "", "```", command, "```", "",
           f"Versions: torch {torch.__version__}, torchvision {torchvision.__version__}", "",
           f"Wall time of this call: {wall:.1f} s.", "", "## All runs", "",
           _md(cols, [[row.get(c) for c in cols] for row in flat]), ""]
    atomic_write_text("\n".join(md), files["md"])
    return files


def reproduce_extra(name: str, preset: str = "smoke", out_dir: str | None = None, data_root: str | None = None,
                    weights: str | None = None, dry_run: bool = False, progress: bool = True,
                    log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Run experiment ``name`` (:data:`EXTRA_EXPERIMENTS`) at ``preset`` and write ``results.md``/``.csv``/``.jsonl``
    under ``out_dir`` (default ``results/reproduce/<name>_<preset>``). ``dry_run``: the run list and, for ``full``,
    a time estimate on one GPU; nothing is trained or written."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        if not dry_run:
            raise ReproduceError(f"{name} needs torchvision (and pycocotools for detection): pip install -e "
                                 "'.[detection]' (torchvision needs torch 2.14.1 here, see DEVELOPERS.md)") from None
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
        est = _estimate(name, runs, preset)
        info["estimated_seconds"] = est
        if log is not None:
            for r in runs:
                c = r.config
                log(f"  {r.name}: " + ", ".join(f"{k}={v}" for k, v in r.labels.items()) +
                    f" | {c.model}, batch {c.batch_size}, lr {c.lr:g}, epochs {c.epochs}, milestones {c.milestones}"
                    + (f", γ {c.method_opts.get('gamma')}" if c.method == "pws" else ""))
            log(f"{name} [{preset}]: {len(runs)} runs" + (
                f", about {est / 3600:.0f} GPU-hours on one GPU (paper's 2080Ti speeds for SSD; ~10 img/s Mask R-CNN, "
                f"~400 img/s ResNet-50); divide by the torchrun processes" if est else "") + f" → {out_dir}")
        return info
    t0 = time.perf_counter()
    records = run_det_sweep(runs, out_dir, log=log, progress=progress)
    wall = time.perf_counter() - t0
    files = _write_outputs(name, preset, out_dir, records, command, wall) if is_main else {}
    info.update({"records": records, "files": files, "wall_time": wall})
    if log is not None and is_main:
        log(f"{name} [{preset}]: {len(records)} runs in {wall:.1f} s → {files['md']}")
    return info
