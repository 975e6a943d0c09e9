"""The paper's experiments as resumable sweeps: Table 4 (CIFAR-10 error), Table 1 (batch-size sensitivity and
training speed), Table 2 (PWS ablation) and an LR-collapse scan, each at three sizes ("presets").

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

import argparse
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..config import TrainConfig
from ..train.checkpoint import atomic_write_text
from .sweep import RunSpec, SweepRecord, plot_curves, results_table, run_sweep, write_results

__all__ = ["EXPERIMENTS", "PRESETS", "PAPER_NUMBERS", "ReproduceError", "reproduce", "build_runs",
           "add_reproduce_parser", "aggregate", "milestones_for"]

PRESETS = ("cpu", "full", "smoke")


class ReproduceError(ValueError):
    """Unknown experiment or preset, or bad seeds (one-line message; the CLI exits with code 2)."""


# ---------------------------------------------------------------------------------------------- the paper's numbers
#: The paper's values. Table 4: CIFAR-10 top-1 error (%) by (arch, method, LR). Table 1: VOC07 mAP (%) by batch size
#: and training speed (images/s, RTX 2080Ti, batch 8) — detection, so a reference for the pattern only. Table 2:
#: VOC07 mAP (%) rows (method, LR, backbone, sqrt(2/n_l), trainable α, γ) → mAP (NaN = collapsed).
PAPER_NUMBERS: dict[str, Any] = {
    "table4": {
        ("residual", "none", 0.1): 8.82, ("residual", "none", 0.05): 9.11,
        ("plain", "none", 0.1): 7.28, ("plain", "none", 0.05): 7.40,
        ("residual", "bn", 0.1): 6.12, ("residual", "bn", 0.05): 9.14,
        ("plain", "bn", 0.1): 5.90, ("plain", "bn", 0.05): 7.67,
        ("residual", "gn", 0.1): 6.82, ("residual", "gn", 0.05): 9.09,
        ("plain", "gn", 0.1): 6.77, ("plain", "gn", 0.05): 7.54,
        ("residual", "sn", 0.1): 6.19, ("residual", "sn", 0.05): 8.90,
        ("plain", "sn", 0.1): 5.95, ("plain", "sn", 0.05): 7.34,
        ("residual", "wn", 0.1): 7.18, ("residual", "wn", 0.05): 7.41,
        ("plain", "wn", 0.1): 6.98, ("plain", "wn", 0.05): 7.38,
        ("residual", "pws", 0.1): 6.50, ("residual", "pws", 0.05): 6.75,
        ("plain", "pws", 0.1): 6.16, ("plain", "pws", 0.05): 6.30,
    },
    "table1": {  # method: (FPS at batch 8, {batch: mAP})
        "in": (35.34, {2: 71.43, 4: 72.69, 8: 72.97}),
        "bn": (45.66, {2: 72.97, 4: 75.18, 8: 76.74}),
        "gn": (29.26, {2: 75.08, 4: 75.26, 8: 75.13}),
        "sn": (28.56, {2: 76.29, 4: 76.53, 8: 76.86}),
        "wn": (52.11, {2: math.nan, 4: 76.70, 8: 77.06}),
        "pws": (52.72, {2: 76.93, 4: 77.11, 8: 77.66}),
    },
    "table2": [  # (method, LR, backbone, gain sqrt(2/n_l), trainable α, γ, mAP)
        ("none", 1e-3, "VGG-16", None, None, None, 68.68),
        ("bn", 1e-3, "VGG-16", None, None, None, 72.80),
        ("sn", 1e-3, "VGG-16", None, None, None, 71.70),
        ("pws", 1e-3, "VGG-16", True, True, 1e-5, 72.99),
        ("pws", 1e-3, "VGG-16", True, True, 1e-3, 70.32),
        ("bn", 1e-2, "ResNet-50", None, None, None, 75.83),
        ("pws", 1e-2, "ResNet-50", True, True, 1e-3, 77.19),
        ("bn", 1e-2, "VGG-16", None, None, None, 77.00),
        ("pws", 1e-2, "VGG-16", False, False, 1e-3, math.nan),
        ("pws", 1e-2, "VGG-16", True, False, 1e-3, 74.96),
        ("pws", 1e-2, "VGG-16", True, True, 1e-3, 77.52),
        ("pws", 1e-2, "VGG-16", True, True, 1e-4, 76.50),
        ("pws", 1e-2, "VGG-16", True, True, 1e-5, math.nan),
    ],
    "collapse": {},  # no table in the paper: Table 2's NaN rows and the text ("cannot be trained without normalizing
                     # outputs when LR is 1e-2", WN "collapses at small batch") are the reference
}

VOC_NOTE = ("The paper's Tables 1 and 2 are Pascal VOC07 *detection* mAP (SSD, VGG-16 backbone); these runs are "
            "CIFAR-10 *classification*, so the paper column is a reference for the pattern (which settings collapse "
            "to NaN, which methods degrade at small batch, relative speed), not a number to match.")


# ---------------------------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class _Size:
    dataset: str
    limit: int | None
    test_limit: int | None
    epochs: int
    seeds: int
    max_steps: int | None = None
    num_threads: int | None = None
    extra: tuple = ()

    def base(self, **kw: Any) -> dict[str, Any]:
        d = dict(dataset=self.dataset, limit=self.limit, test_limit=self.test_limit, epochs=self.epochs,
                 max_steps=self.max_steps, milestones=milestones_for(self.epochs), lr_decay=0.1, momentum=0.9,
                 weight_decay=5e-4, batch_size=128, num_threads=self.num_threads, progress=False, ckpt_every=0)
        d.update(dict(self.extra))
        d.update(kw)
        return d


def milestones_for(epochs: int) -> list[int]:
    """The paper's LR milestones (100/150/180 of 200 epochs) at the same proportions for a shorter schedule."""
    if epochs == 200:
        return [100, 150, 180]
    ms = sorted({max(1, round(epochs * f)) for f in (0.5, 0.75, 0.9)})
    return [m for m in ms if m < epochs] if epochs > 1 else []


_SMOKE = dict(dataset="digits", limit=256, test_limit=64, epochs=1, seeds=1, max_steps=2, num_threads=1,
              extra=(("eval_batch_size", 64),))

_SIZES: dict[str, dict[str, _Size]] = {
    "table4": {"full": _Size("cifar10", None, None, 200, 1), "cpu": _Size("cifar10", 3000, 1000, 8, 3),
               "smoke": _Size(**_SMOKE)},
    "table1": {"full": _Size("cifar10", None, None, 200, 1), "cpu": _Size("cifar10", 800, 1000, 6, 3),
               "smoke": _Size(**_SMOKE)},
    "table2": {"full": _Size("cifar10", None, None, 200, 1), "cpu": _Size("cifar10", 2000, 1000, 8, 3),
               "smoke": _Size(**_SMOKE)},
    "collapse": {"full": _Size("cifar10", None, None, 200, 1), "cpu": _Size("cifar10", 2000, 1000, 4, 3),
                 "smoke": _Size(**_SMOKE)},
}
_SIZES["robust"] = _SIZES["collapse"]   # seeds/preset keys; the runs take the collapse (LR) and table1 (batch) sizes

# models: (label, model, model_opts) per preset
_T4_ARCHS = {
    "full": [("plain", "convpool_cnn_c", {}), ("residual", "resnet20", {})],
    "cpu": [("plain", "convpool_cnn_c_small", {"width": 0.125}), ("residual", "resnet_cifar_small", {"width": 0.5})],
    "smoke": [("plain", "tiny_cnn", {}), ("residual", "resnet_cifar_small", {"width": 0.5})],
}
_ONE_ARCH = {"full": ("vgg16", {}), "cpu": ("convpool_cnn_c_small", {"width": 0.125}), "smoke": ("tiny_cnn", {})}

T4_METHODS = ("none", "bn", "gn", "sn", "wn", "pws")
T4_LRS = (0.1, 0.05)
T1_METHODS = ("bn", "gn", "sn", "wn", "pws", "mabn", "in")
T1_BATCHES = (2, 4, 8, 128)
T1_LR = {"full": 1e-2, "cpu": 1e-2, "smoke": 1e-2}
#: Table 2 variants: label → (method, method_opts)
T2_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "none": ("none", {}),
    "bn": ("bn", {}),
    "pws γ=1e-3": ("pws", {"gamma": 1e-3}),
    "pws γ=1e-4": ("pws", {"gamma": 1e-4}),
    "pws γ=1e-5": ("pws", {"gamma": 1e-5}),
    "pws no α (γ=1e-3)": ("pws", {"gamma": 1e-3, "use_alpha": False}),
    "pws no √(2/n), no α (γ=1e-3)": ("pws", {"gamma": 1e-3, "use_alpha": False, "use_gain": False}),
}
#: Table 2 LRs (small, large): the paper's 1e-3 / 1e-2 at batch 16 for "full"; ×10 for the short cpu schedule, where
#: 1e-3 would barely move the weights in 8 epochs.
T2_LRS = {"full": (1e-3, 1e-2), "cpu": (1e-2, 1e-1), "smoke": (1e-2, 1e-1)}
T2_BATCH = {"full": 16, "cpu": 16, "smoke": 32}
COLLAPSE_METHODS = ("none", "bn", "gn", "sn", "wn", "pws")
COLLAPSE_LRS = tuple(round(0.0125 * 2 ** k, 6) for k in range(9))   # 0.0125 … 3.2, ×2
_SMOKE_COLLAPSE_LRS = (0.05, 3.2)
#: the smoke preset trains a subset of each grid (every code path, a few seconds in all)
_SMOKE_SUBSET = {"table4": ("bn", "pws"), "table1": ("bn", "pws", "mabn"), "table1_batches": (2, 128),
                 "table2": ("bn", "pws γ=1e-3", "pws no √(2/n), no α (γ=1e-3)"), "collapse": ("none", "pws")}


def _method_opts(method: str, batch: int, model_opts: dict[str, Any] | None = None) -> dict[str, Any]:
    if method == "pws":
        return {"gamma": 1e-3}
    if method == "mabn":
        return {"batch_size": batch, "real_batch_size": max(batch, 32)}
    if method == "gn" and model_opts and "width" in model_opts:
        # width-scaled model: scale GN's 32 groups with the width so that a group holds as many channels as in the
        # full-width net (ConvPool-C at width 0.125: 12/24 channels in 4 groups = 3/6 per group, as 96/192 in 32).
        # With 32 groups every channel would be its own group, which before global pooling erases the class signal.
        return {"groups": max(1, round(32 * float(model_opts["width"])))}
    return {}


def _lr_tag(lr: float) -> str:
    return f"{lr:g}"


def _table4(preset: str, seeds: Sequence[int]) -> list[RunSpec]:
    size = _SIZES["table4"][preset]
    runs = []
    for arch, model, mopts in _T4_ARCHS[preset]:
        for method in _SMOKE_SUBSET["table4"] if preset == "smoke" else T4_METHODS:
            for lr in T4_LRS:
                for s in seeds:
                    cfg = size.base(model=model, model_opts=mopts, method=method,
                                    method_opts=_method_opts(method, 128, mopts), lr=lr, seed=s)
                    runs.append(RunSpec(f"{arch}_{method}_lr{_lr_tag(lr)}_s{s}", TrainConfig.from_dict(cfg),
                                        {"arch": arch, "method": method, "LR": lr, "seed": s}))
    return runs


def _table1(preset: str, seeds: Sequence[int]) -> list[RunSpec]:
    size = _SIZES["table1"][preset]
    model, mopts = _ONE_ARCH[preset]
    runs = []
    smoke = preset == "smoke"
    for method in _SMOKE_SUBSET["table1"] if smoke else T1_METHODS:
        for b in _SMOKE_SUBSET["table1_batches"] if smoke else T1_BATCHES:
            for s in seeds:
                cfg = size.base(model=model, model_opts=mopts, method=method, method_opts=_method_opts(method, b, mopts),
                                lr=T1_LR[preset], batch_size=b, seed=s)
                runs.append(RunSpec(f"{method}_b{b}_s{s}", TrainConfig.from_dict(cfg),
                                    {"method": method, "batch": b, "seed": s}))
    return runs


def _table2(preset: str, seeds: Sequence[int]) -> list[RunSpec]:
    size = _SIZES["table2"][preset]
    model, mopts = _ONE_ARCH[preset]
    runs = []
    for i, (variant, (method, opts)) in enumerate(T2_VARIANTS.items()):
        if preset == "smoke" and variant not in _SMOKE_SUBSET["table2"]:
            continue
        for lr in T2_LRS[preset]:
            for s in seeds:
                cfg = size.base(model=model, model_opts=mopts, method=method, method_opts=dict(opts), lr=lr,
                                batch_size=T2_BATCH[preset], seed=s)
                runs.append(RunSpec(f"v{i}_{method}_lr{_lr_tag(lr)}_s{s}", TrainConfig.from_dict(cfg),
                                    {"variant": variant, "method": method, "LR": lr, "seed": s}))
    return runs


def _collapse(preset: str, seeds: Sequence[int]) -> list[RunSpec]:
    size = _SIZES["collapse"][preset]
    model, mopts = _ONE_ARCH[preset] if preset != "full" else ("convpool_cnn_c", {})
    lrs = _SMOKE_COLLAPSE_LRS if preset == "smoke" else COLLAPSE_LRS
    methods = _SMOKE_SUBSET["collapse"] if preset == "smoke" else COLLAPSE_METHODS
    runs = []
    for method in methods:
        for lr in lrs:
            for s in seeds:
                cfg = size.base(model=model, model_opts=mopts, method=method, method_opts=_method_opts(method, 128, mopts),
                                lr=lr, seed=s)
                runs.append(RunSpec(f"{method}_lr{_lr_tag(lr)}_s{s}", TrainConfig.from_dict(cfg),
                                    {"method": method, "LR": lr, "seed": s}))
    return runs


#: ``pwsconv reproduce robust`` (not a paper table: the paper's open problem, choosing γ): method label →
#: (method, method_opts). "pws auto" is ``gamma="auto"``; the ablation rows vary one ingredient of it.
ROBUST_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "bn": ("bn", {}),
    "gn": ("gn", {}),
    "pws": ("pws", {"gamma": 1e-3}),
    "pws auto": ("pws", {"gamma": "auto"}),
}
ROBUST_ABLATION: dict[str, tuple[str, dict[str, Any]]] = {
    "auto, clip 0.02": ("pws", {"gamma": "auto", "clip": 0.02}),
    "auto, clip 0.04": ("pws", {"gamma": "auto", "clip": 0.04}),
    "auto without clipping (γ rule only)": ("pws", {"gamma": "auto", "clip": 0}),
    "paper γ=1e-3 + clip 0.01 (no γ rule)": ("pws", {"gamma": 1e-3, "clip": 0.01}),
}
ROBUST_ABLATION_LRS = (0.1, 0.4, 1.6)
ROBUST_BATCHES = (2, 4, 8, 128)
_SMOKE_ROBUST = {"methods": ("bn", "pws auto"), "lrs": (0.05, 3.2), "batches": (2,)}


def _robust_opts(method: str, opts: dict[str, Any], batch: int, mopts: dict[str, Any]) -> dict[str, Any]:
    return dict(opts) if method == "pws" else _method_opts(method, batch, mopts)


def _robust(preset: str, seeds: Sequence[int]) -> list[RunSpec]:
    """LR scan (plain and residual net) × BN, GN, paper PWS, ``gamma="auto"``; ablation rows of auto at three LRs;
    batch 2/4/8/128 at the Table 1 setting. The plain-net scan uses the collapse scan's setting and the batch rows
    Table 1's, run for run (same configs), so those sweeps' finished runs can be reused."""
    smoke = preset == "smoke"
    lsize, bsize = _SIZES["collapse"][preset], _SIZES["table1"][preset]
    archs = _T4_ARCHS[preset]
    if preset == "full":
        archs = [("plain", "convpool_cnn_c", {}), ("residual", "resnet20", {})]
    methods = {k: ROBUST_METHODS[k] for k in (_SMOKE_ROBUST["methods"] if smoke else ROBUST_METHODS)}
    lrs = _SMOKE_ROBUST["lrs"] if smoke else COLLAPSE_LRS
    runs = []
    for arch, model, mopts in archs:
        for label, (method, opts) in methods.items():
            for lr in lrs:
                for s in seeds:
                    cfg = lsize.base(model=model, model_opts=mopts, method=method,
                                     method_opts=_robust_opts(method, opts, 128, mopts), lr=lr, seed=s)
                    runs.append(RunSpec(f"lr_{arch}_{label.replace(' ', '_')}_lr{_lr_tag(lr)}_s{s}",
                                        TrainConfig.from_dict(cfg),
                                        {"part": "lr", "arch": arch, "method": label, "LR": lr, "batch": 128,
                                         "seed": s}))
    if not smoke:
        arch, model, mopts = archs[0]
        for i, (label, (method, opts)) in enumerate(ROBUST_ABLATION.items()):
            for lr in ROBUST_ABLATION_LRS:
                for s in seeds:
                    cfg = lsize.base(model=model, model_opts=mopts, method=method, method_opts=dict(opts), lr=lr,
                                     seed=s)
                    runs.append(RunSpec(f"abl{i}_{arch}_lr{_lr_tag(lr)}_s{s}", TrainConfig.from_dict(cfg),
                                        {"part": "ablation", "arch": arch, "method": label, "LR": lr, "batch": 128,
                                         "seed": s}))
    model, mopts = _ONE_ARCH[preset]
    for label, (method, opts) in methods.items():
        for b in _SMOKE_ROBUST["batches"] if smoke else ROBUST_BATCHES:
            for s in seeds:
                cfg = bsize.base(model=model, model_opts=mopts, method=method,
                                 method_opts=_robust_opts(method, opts, b, mopts), lr=T1_LR[preset], batch_size=b,
                                 seed=s)
                runs.append(RunSpec(f"batch_{label.replace(' ', '_')}_b{b}_s{s}", TrainConfig.from_dict(cfg),
                                    {"part": "batch", "arch": "plain", "method": label, "LR": T1_LR[preset],
                                     "batch": b, "seed": s}))
    return runs


#: experiment name → builder(preset, seeds) → list of RunSpec
EXPERIMENTS: dict[str, Callable[..., list[RunSpec]]] = {
    "table4": _table4, "table1": _table1, "table2": _table2, "collapse": _collapse, "robust": _robust,
}

_TITLES = {
    "table4": "Table 4 — CIFAR-10 classification error (%), plain and residual nets",
    "table1": "Table 1 — sensitivity to batch size, and training speed",
    "table2": "Table 2 — PWS ablation: √(2/n_l), trainable α, γ, at a small and a large LR",
    "collapse": "LR collapse scan — the LR at which each method first collapses",
    "robust": 'PWS that trains wherever BN trains — gamma="auto" across LRs and batch sizes',
}

#: training images/s of forward+backward+SGD step measured on this 2-core machine (torch 2.13, random 32×32 inputs,
#: 2026-11-23) for the cpu-preset models, by batch size; the dry-run estimate uses these × _ENGINE_EFFICIENCY
#: (data loading, augmentation, evaluation bookkeeping, other load on the machine).
_CPU_RATES: dict[str, dict[int, dict[str, float]]] = {
    "convpool_cnn_c_small": {   # width 0.125
        128: dict(none=833, bn=783, gn=903, sn=466, wn=881, pws=888, mabn=690, **{"in": 786}),
        8: dict(none=564, bn=506, gn=543, sn=267, wn=512, pws=429, mabn=369, **{"in": 464}),
        2: dict(none=269, bn=228, gn=229, sn=98, wn=212, pws=173, mabn=151, **{"in": 174}),
    },
    "resnet_cifar_small": {     # width 0.5
        128: dict(none=1991, bn=1455, gn=1769, sn=801, wn=1948, pws=1643, mabn=1247, **{"in": 1586}),
        8: dict(none=879, bn=750, gn=856, sn=345, wn=770, pws=629, mabn=515, **{"in": 667}),
        2: dict(none=270, bn=230, gn=308, sn=117, wn=267, pws=216, mabn=180, **{"in": 248}),
    },
    "tiny_cnn": {128: {}},
}
_ENGINE_EFFICIENCY = 0.6


def _estimate_seconds(runs: Sequence[RunSpec]) -> float | None:
    """Rough wall time of ``runs`` on 2 CPU cores (None for models without a measured rate, e.g. the full preset)."""
    total = 0.0
    for r in runs:
        c = r.config
        table = _CPU_RATES.get(c.model)
        if table is None or c.limit is None:
            return None
        near = min(table, key=lambda b: (abs(math.log(b / c.batch_size)), b))
        rate = table[near].get(c.method, 3000.0) * _ENGINE_EFFICIENCY
        steps = max(1, c.limit // c.batch_size) * c.epochs
        if c.max_steps is not None:
            steps = min(steps, c.max_steps)
        evals = (c.test_limit or 10000) * math.ceil(steps / max(1, c.limit // c.batch_size))
        total += (steps * c.batch_size + evals / 3.0) / rate + 1.0   # eval ≈ 3× faster; 1 s start-up per run
    return total


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


def _check(name: str, preset: str) -> None:
    if name not in EXPERIMENTS:
        raise ReproduceError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    if preset not in PRESETS:
        raise ReproduceError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")


def build_runs(name: str, preset: str = "cpu", seeds: int | Sequence[int] | None = None,
               data_root: str | None = None) -> list[RunSpec]:
    """The run list of one experiment at one preset (seeds: a count or a list; default: the preset's)."""
    _check(name, preset)
    runs = EXPERIMENTS[name](preset, _seed_list(seeds, _SIZES[name][preset].seeds))
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


def _paper(v: float | None) -> str:
    if v is None:
        return "—"
    return "NaN" if math.isnan(v) else f"{v:.2f}"


def _md_table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _summary_table4(agg: list[dict[str, Any]]) -> str:
    cell = {(a["arch"], a["method"], a["LR"]): a["err"] for a in agg}
    archs = [x for x in ("residual", "plain") if any(k[0] == x for k in cell)]
    head, rows = ["method"], []
    for arch in archs:
        for lr in T4_LRS:
            head += [f"{arch} LR {lr:g}: measured", "paper"]
    for m in [m for m in T4_METHODS if any(k[1] == m for k in cell)]:
        row = [m]
        for arch in archs:
            for lr in T4_LRS:
                row += [cell.get((arch, m, lr), "—"), _paper(PAPER_NUMBERS["table4"].get((arch, m, lr)))]
        rows.append(row)
    return "Test error (%), mean ± std over seeds; paper = Table 4 (CIFAR-10 error %, 200 epochs).\n\n" + \
        _md_table(head, rows)


def _summary_table1(agg: list[dict[str, Any]], rates: dict[int, dict[str, dict[str, float]]] | None = None) -> str:
    cell = {(a["method"], a["batch"]): a for a in agg}
    rates = rates or {}
    rate_batches = sorted(rates)
    head = ["method"] + [f"err B={b}" for b in T1_BATCHES] + [f"img/s B={b}" for b in rate_batches] + \
        (["speed vs BN (B=8)"] if 8 in rates and "bn" in rates[8] else []) + ["paper FPS (B=8)", "paper FPS vs BN"] + \
        [f"paper mAP B={b}" for b in (2, 4, 8)]
    bn_fps = PAPER_NUMBERS["table1"]["bn"][0]
    rows = []
    for m in [m for m in T1_METHODS if any(k[0] == m for k in cell)]:
        fps, maps = PAPER_NUMBERS["table1"].get(m, (None, {}))
        row = [m] + [cell[(m, b)]["err"] if (m, b) in cell else "—" for b in T1_BATCHES]
        for b in rate_batches:
            r = rates[b].get(m)
            row.append("—" if r is None else f"{r['images_per_s']:.0f}")
        if 8 in rates and "bn" in rates[8]:
            r = rates[8].get(m)
            row.append("—" if r is None else f"×{r['images_per_s'] / rates[8]['bn']['images_per_s']:.2f}")
        row += [_paper(fps), "—" if fps is None else f"×{fps / bn_fps:.2f}"] + [_paper(maps.get(b)) for b in (2, 4, 8)]
        rows.append(row)
    return ("Test error (%) by batch size, mean ± std over seeds. Training images/s: forward + backward + SGD step of "
            "the same model on random inputs of the dataset's shape, every method measured interleaved round-robin in one process "
            "after the sweep (medians; this machine, not comparable in absolute terms with the paper's RTX 2080Ti "
            "FPS — compare the ratios to BN). Paper = Table 1 (VOC07 mAP %, higher is better; mabn and batch 128 "
            "are not in the paper).\n\n" + _md_table(head, rows) + "\n\n" + VOC_NOTE)


#: Table 1's speed columns: batch sizes and interleaved rounds per preset
T1_SPEED = {"full": ((8, 128), 20), "cpu": ((8, 128), 15), "smoke": ((8,), 2)}


def _table1_rates(runs: Sequence[RunSpec], preset: str) -> dict[int, dict[str, dict[str, float]]]:
    from .speed import train_step_rates

    c = runs[0].config
    methods = list(dict.fromkeys(r.config.method for r in runs))
    batches, repeats = T1_SPEED[preset]
    image, in_ch = (8, 1) if c.dataset == "digits" else (32, 3)
    out = {}
    for b in batches:
        opts = {m: _method_opts(m, b, c.model_opts) for m in methods}
        out[b] = train_step_rates(c.model, methods, b, model_opts=c.model_opts, method_opts=opts, image_size=image,
                                  in_channels=in_ch, repeats=repeats, warmup=2,
                                  device="cuda" if c.device != "cpu" and _cuda() else "cpu")
    return out


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _paper_t2(method: str, opts: dict[str, Any], lr_rank: int) -> str:
    lr = (1e-3, 1e-2)[lr_rank]
    gain, alpha = opts.get("use_gain", True), opts.get("use_alpha", True)
    for (pm, plr, bb, pg, pa, pgam, v) in PAPER_NUMBERS["table2"]:
        if bb != "VGG-16" or pm != method or plr != lr:
            continue
        if method == "pws" and (pg != gain or pa != alpha or pgam != opts.get("gamma")):
            continue
        return _paper(v)
    return "—"


def _summary_table2(agg: list[dict[str, Any]], preset: str) -> str:
    cell = {(a["variant"], a["LR"]): a["err"] for a in agg}
    small, large = T2_LRS[preset]
    head = ["variant", f"LR {small:g}: measured err", "paper mAP (LR 1e-3)", f"LR {large:g}: measured err",
            "paper mAP (LR 1e-2)"]
    rows = []
    for variant, (method, opts) in T2_VARIANTS.items():
        if not any(k[0] == variant for k in cell):
            continue
        rows.append([variant, cell.get((variant, small), "—"), _paper_t2(method, opts, 0),
                     cell.get((variant, large), "—"), _paper_t2(method, opts, 1)])
    return (f"Test error (%), mean ± std over seeds, at the small / large LR ({small:g} / {large:g}); paper = Table 2 "
            "(VOC07 mAP %, VGG-16, batch 16, LR 1e-3 / 1e-2; — = not in the paper).\n\n" + _md_table(head, rows) +
            "\n\n" + VOC_NOTE)


def _summary_collapse(agg: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    lrs = sorted({a["LR"] for a in agg})
    methods = list(dict.fromkeys(a["method"] for a in agg))
    cell = {(a["method"], a["LR"]): a for a in agg}
    head = ["method"] + [f"{lr:g}" for lr in lrs] + ["first LR with a collapse", "first LR, all seeds collapsed"]
    rows, firsts = [], []
    for m in methods:
        row = [m]
        first_any = first_all = None
        for lr in lrs:
            a = cell.get((m, lr))
            if a is None:
                row.append("—")
                continue
            mark = " ✗" if a["n_collapsed"] else ""
            row.append(a["err"] + (f"{mark}{a['n_collapsed']}/{a['n']}" if a["n_collapsed"] else ""))
            if a["n_collapsed"] and first_any is None:
                first_any = lr
            if a["n_collapsed"] == a["n"] and first_all is None:
                first_all = lr
        row += [f"{first_any:g}" if first_any else "none", f"{first_all:g}" if first_all else "none"]
        rows.append(row)
        firsts.append({"method": m, "first_collapse_lr": first_any, "first_all_collapse_lr": first_all})
    text = ("Test error (%) by LR (mean ± std over seeds); ✗k/n = k of n seeds collapsed (NaN, or test accuracy ≤ "
            "chance + 2 %). The paper has no such table; its reference points are the NaN rows of Table 2 (PWS without "
            "√(2/n_l) at LR 1e-2, PWS with γ=1e-5 at LR 1e-2), WN collapsing at batch 2 (Table 1) and plain conv that "
            "'cannot be trained' without output normalization at LR 1e-2 on SSD.\n\n" + _md_table(head, rows))
    return text, firsts


def _all_train(a: dict[str, Any] | None) -> bool:
    return a is not None and a["n_collapsed"] == 0


def _summary_robust(agg: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The LR scans (one table per arch), the ablation, the batch table and the issue's targets checked."""
    parts = []
    targets: dict[str, Any] = {}
    lr_agg = [a for a in agg if a["part"] == "lr"]
    for arch in dict.fromkeys(a["arch"] for a in lr_agg):
        sub = [a for a in lr_agg if a["arch"] == arch]
        text, _ = _summary_collapse(sub)
        parts.append(f"### LR scan, {arch} net (batch 128)\n\n" + text.split("\n\n", 1)[1])
        cell = {(a["method"], a["LR"]): a for a in sub}
        lrs = sorted({a["LR"] for a in sub})
        bn_ok = [lr for lr in lrs if _all_train(cell.get(("bn", lr)))]
        bn_max = max(bn_ok) if bn_ok else None
        t: dict[str, Any] = {"bn_max_trainable_lr": bn_max}
        for m in [m for m in ("pws auto", "pws") if any(k[0] == m for k in cell)]:
            trains = [lr for lr in bn_ok if _all_train(cell.get((m, lr)))]
            within = [lr for lr in lrs if bn_max is not None and 0.05 <= lr <= bn_max
                      and cell.get((m, lr)) is not None and cell.get(("bn", lr)) is not None
                      and cell[(m, lr)]["err_mean"] <= cell[("bn", lr)]["err_mean"] + 1.0]
            span = [lr for lr in lrs if bn_max is not None and 0.05 <= lr <= bn_max]
            best = min((cell[(m, lr)]["err_mean"] for lr in lrs if (m, lr) in cell and _all_train(cell[(m, lr)])),
                       default=math.nan)
            bn_best = min((cell[("bn", lr)]["err_mean"] for lr in bn_ok), default=math.nan)
            t[m] = {"trains_where_bn_trains": f"{len(trains)}/{len(bn_ok)}", "within_bn_plus_1": f"{len(within)}/{len(span)}",
                    "best_lr_err": best, "bn_best_lr_err": bn_best}
        targets[arch] = t
    abl = [a for a in agg if a["part"] == "ablation"]
    if abl:
        cell = {(a["method"], a["LR"]): a["err"] + (f" ✗{a['n_collapsed']}/{a['n']}" if a["n_collapsed"] else "")
                for a in abl + [a for a in lr_agg if a["arch"] == abl[0]["arch"]]}
        labels = ["bn", "pws", "pws auto"] + list(dict.fromkeys(a["method"] for a in abl))
        rows = [[m] + [cell.get((m, lr), "—") for lr in ROBUST_ABLATION_LRS] for m in labels]
        parts.append(f"### Ablation of gamma=\"auto\", {abl[0]['arch']} net\n\n" +
                     _md_table(["variant"] + [f"LR {lr:g}" for lr in ROBUST_ABLATION_LRS], rows))
    bat = [a for a in agg if a["part"] == "batch"]
    if bat:
        cell = {(a["method"], a["batch"]): a for a in bat}
        batches = sorted({a["batch"] for a in bat})
        methods = list(dict.fromkeys(a["method"] for a in bat))
        rows = [[m] + [cell[(m, b)]["err"] if (m, b) in cell else "—" for b in batches] +
                [_paper(PAPER_NUMBERS["table1"].get(m.split()[0], (None, {}))[1].get(2)) if m != "pws auto" else "—"]
                for m in methods]
        parts.append("### Batch size (LR 1e-2, the Table 1 setting)\n\n" +
                     _md_table(["method"] + [f"err B={b}" for b in batches] + ["paper mAP B=2 (VOC07)"], rows))
        if ("bn", 2) in cell and ("pws auto", 2) in cell:
            targets["batch2"] = {"pws auto": cell[("pws auto", 2)]["err_mean"], "bn": cell[("bn", 2)]["err_mean"]}
    lines = []
    for arch, t in targets.items():
        if arch == "batch2":
            lines.append(f"- batch 2: auto {t['pws auto']:.2f} % vs BN {t['bn']:.2f} % error "
                         f"({'met' if t['pws auto'] <= t['bn'] else 'missed'}: auto ≤ BN)")
            continue
        for m in ("pws auto", "pws"):
            if m in t:
                v = t[m]
                lines.append(f"- {arch}, {m}: trains in every seed at {v['trains_where_bn_trains']} of the LRs where "
                             f"BN does (BN up to LR {t['bn_max_trainable_lr']}); error ≤ BN + 1 at "
                             f"{v['within_bn_plus_1']} LRs in [0.05, BN's max]; best-LR error {v['best_lr_err']:.2f} "
                             f"vs BN's {v['bn_best_lr_err']:.2f}")
    text = ("Test error (%), mean ± std over seeds; ✗k/n = k of n seeds collapsed (NaN or within 2 points of "
            "chance). The paper has no such table (choosing γ is its open problem); its Table 1 claim C2 is "
            "\"PWS holds at batch 2\" (paper column: VOC07 mAP, a pattern reference only).\n\n"
            "### Targets\n\n" + "\n".join(lines) + "\n\n" + "\n\n".join(parts))
    return text, targets


# ---------------------------------------------------------------------------------------------- plots
def _plot_vs(agg: list[dict[str, Any]], x_key: str, path: str, *, title: str, line_key: str = "method",
             panel_key: str | None = None, logx: bool = True) -> str:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys(a[panel_key] for a in agg)) if panel_key else [None]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 3.8), squeeze=False)
    for ax, p in zip(axes[0], panels):
        sub = [a for a in agg if panel_key is None or a[panel_key] == p]
        for line in dict.fromkeys(a[line_key] for a in sub):
            pts = sorted((a[x_key], a) for a in sub if a[line_key] == line)
            xs = [x for x, _ in pts]
            ys = [a["err_mean"] for _, a in pts]
            es = [a["err_std"] if math.isfinite(a["err_std"]) else 0.0 for _, a in pts]
            (h,) = ax.plot(xs, ys, marker="o", ms=4, label=str(line))
            ax.errorbar(xs, ys, yerr=es, fmt="none", ecolor=h.get_color(), alpha=0.5)
            bad = [(x, a) for x, a in pts if a["n_nan"] or a["n_collapsed"]]
            if bad:
                ax.plot([x for x, _ in bad], [100.0 if math.isnan(a["err_mean"]) else a["err_mean"] for _, a in bad],
                        ls="none", marker="x", color="red", ms=9, mew=2)
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
    fig.suptitle(title + "  (red × = collapsed seeds, NaN drawn at 100 %)", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------- reproduce
def _command(name: str, preset: str, out_dir: str, seeds: Any, data_root: Any) -> str:
    cmd = f"pwsconv reproduce {name} --preset {preset} --out {out_dir}"
    if seeds is not None:
        cmd += f" --seeds {seeds if isinstance(seeds, int) else len(list(seeds))}"
    if data_root is not None:
        cmd += f" --data-root {data_root}"
    return cmd


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


def reproduce(name: str, preset: str = "cpu", out_dir: str | os.PathLike | None = None,
              seeds: int | Sequence[int] | None = None, data_root: str | os.PathLike | None = None,
              progress: bool = False, dry_run: bool = False, plots: bool = True,
              log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Run (resumably) one of :data:`EXPERIMENTS` at a preset and write its results under ``out_dir``
    (default ``results/reproduce/<name>_<preset>``, where this repository keeps its measured runs): ``results.md``
    (the paper's numbers beside the measured mean ± std
    over seeds, the command, versions, wall time), ``results.csv``/``results.jsonl`` (one row per run),
    ``summary.csv`` (one row per cell), ``curves.png`` and ``err_vs_lr.png``/``err_vs_batch.png``.

    Returns ``{"name", "preset", "out_dir", "runs", "n_runs", "records", "summary", "files", ...}``; with
    ``dry_run`` only the run list (names, labels, configs) and ``estimated_seconds`` (cpu/smoke presets), nothing is
    trained or written. ``plots=False`` skips the PNGs (tables only).
    """
    _check(name, preset)
    out_dir = os.fspath(out_dir) if out_dir is not None else os.path.join("results", "reproduce", f"{name}_{preset}")
    data_root = os.fspath(data_root) if data_root is not None else None
    runs = build_runs(name, preset, seeds, data_root)
    info: dict[str, Any] = {"name": name, "preset": preset, "out_dir": out_dir, "n_runs": len(runs),
                            "seeds": sorted({r.config.seed for r in runs}),
                            "command": _command(name, preset, out_dir, seeds, data_root)}
    if dry_run:
        info["runs"] = [{"name": r.name, "labels": dict(r.labels), "config": r.config.to_dict()} for r in runs]
        info["estimated_seconds"] = _estimate_seconds(runs)
        if log is not None:
            for r in runs:
                log(f"  {r.name}: " + ", ".join(f"{k}={v}" for k, v in r.labels.items()))
            est = info["estimated_seconds"]
            log(f"{name} [{preset}]: {len(runs)} runs" +
                (f", about {est / 60:.0f} min on 2 CPU cores" if est is not None else "") + f" → {out_dir}")
        return info

    t0 = time.perf_counter()
    records = run_sweep(runs, out_dir, progress=progress, log=log)
    wall = time.perf_counter() - t0
    run_time = sum(r.result.wall_time for r in records)

    keys = [k for k in runs[0].labels if k != "seed"]
    agg = aggregate(records, keys)
    paths = write_results(records, out_dir, title=_TITLES[name])
    first_seed = min(info["seeds"])
    curve_recs = [r for r in records if r.spec.labels.get("seed") == first_seed]
    files = dict(paths)
    extra: dict[str, Any] = {}
    if not plots:
        plot_curves_, plot_vs_ = (lambda *a, **k: None), (lambda *a, **k: None)
    else:
        plot_curves_, plot_vs_ = plot_curves, _plot_vs
    if name == "table4":
        summary = _summary_table4(agg)
        files["curves"] = plot_curves_(curve_recs, os.path.join(out_dir, "curves.png"),
                                      group_by=lambda r: f"{r.spec.labels['arch']} LR {r.spec.labels['LR']:g}",
                                      title=f"Table 4 training curves (seed {first_seed})")
        files["err_vs_lr"] = plot_vs_(agg, "LR", os.path.join(out_dir, "err_vs_lr.png"), panel_key="arch",
                                      title="Table 4: test error vs LR")
    elif name == "table1":
        extra["speed"] = _table1_rates(runs, preset)
        summary = _summary_table1(agg, extra["speed"])
        files["curves"] = plot_curves_(curve_recs, os.path.join(out_dir, "curves.png"), group_by="batch",
                                      title=f"Table 1 training curves (seed {first_seed})")
        files["err_vs_batch"] = plot_vs_(agg, "batch", os.path.join(out_dir, "err_vs_batch.png"),
                                         title="Table 1: test error vs batch size")
    elif name == "table2":
        summary = _summary_table2(agg, preset)
        files["curves"] = plot_curves_(curve_recs, os.path.join(out_dir, "curves.png"), group_by="LR",
                                      line_by="variant", title=f"Table 2 training curves (seed {first_seed})")
        files["err_vs_lr"] = plot_vs_(agg, "LR", os.path.join(out_dir, "err_vs_lr.png"), line_key="variant",
                                      title="Table 2: test error vs LR")
    elif name == "robust":
        summary, extra["targets"] = _summary_robust(agg)
        lr_agg = [a for a in agg if a["part"] == "lr"]
        files["err_vs_lr"] = plot_vs_(lr_agg, "LR", os.path.join(out_dir, "err_vs_lr.png"), panel_key="arch",
                                      title="Test error vs LR (batch 128)")
        files["err_vs_batch"] = plot_vs_([a for a in agg if a["part"] == "batch"], "batch",
                                         os.path.join(out_dir, "err_vs_batch.png"),
                                         title="Test error vs batch size (LR 1e-2, Table 1 setting)")
        files["curves"] = plot_curves_([r for r in curve_recs if r.spec.labels["part"] == "lr"
                                        and r.spec.labels["LR"] in ROBUST_ABLATION_LRS],
                                       os.path.join(out_dir, "curves.png"),
                                       group_by=lambda r: f"{r.spec.labels['arch']} LR {r.spec.labels['LR']:g}",
                                       title=f"LR-scan training curves (seed {first_seed})")
    else:
        summary, firsts = _summary_collapse(agg)
        extra["first_collapse"] = firsts
        files["curves"] = plot_curves_(curve_recs, os.path.join(out_dir, "curves.png"), group_by="method",
                                      line_by="LR", title=f"LR scan training curves (seed {first_seed})")
        files["err_vs_lr"] = plot_vs_(agg, "LR", os.path.join(out_dir, "err_vs_lr.png"),
                                      title="Test error vs LR (collapse scan)")

    # one row per cell
    import csv
    import io

    buf = io.StringIO()
    cols = list(agg[0]) if agg else []
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for a in agg:
        w.writerow({k: ("nan" if isinstance(v, float) and math.isnan(v) else v) for k, v in a.items()})
    files = {k: v for k, v in files.items() if v is not None}
    files["summary"] = os.path.join(out_dir, "summary.csv")
    atomic_write_text(buf.getvalue(), files["summary"])
    if "speed" in extra:
        lines = ["batch,method,ms_per_step,images_per_s,ratio_to_first"]
        for b, per in extra["speed"].items():
            lines += [f"{b},{m},{r['ms']:.4f},{r['images_per_s']:.2f},{r['ratio_to_first']:.4f}" for m, r in per.items()]
        files["speed"] = os.path.join(out_dir, "speed.csv")
        atomic_write_text("\n".join(lines) + "\n", files["speed"])

    skipped = sum(r.skipped for r in records)
    md = [f"# {_TITLES[name]}", "",
          f"Preset **{preset}** — {len(records)} runs ({skipped} already done before this call, skipped).", "",
          summary, "",
          "## Setting", "", _settings(runs), "",
          "## Reproduce", "", "```", info["command"], "```", "",
          f"Python: `reproduce({name!r}, preset={preset!r}, out_dir={out_dir!r}"
          + (f", seeds={seeds!r}" if seeds is not None else "") + ")`", "",
          f"Versions: {_versions()}", "",
          f"Wall time of this call: {wall:.1f} s; summed training time of all runs: {run_time:.1f} s.", "",
          "Plots: " + ", ".join(f"`{os.path.basename(p)}`" for k, p in files.items() if p.endswith(".png")), "",
          "## All runs", "", results_table(records, list(runs[0].labels),
                                            metric_columns=(("test_acc", "test acc (%)"),
                                                            ("images_per_s", "img/s"))), ""]
    if preset == "cpu":
        md += ["Note: the cpu preset trains small models for a few epochs on a CIFAR-10 subset, so the errors are "
               "far above the paper's; compare orderings and collapses, not values.", ""]
    if preset == "smoke":
        md += ["Note: smoke preset — a few optimizer steps on the digits set; a pipeline check, not a result.", ""]
    atomic_write_text("\n".join(md), paths["md"])
    info.update({"records": records, "summary": agg, "files": files, "wall_time": wall, "skipped": skipped,
                 "runs": [r.name for r in runs], **extra})
    if log is not None:
        log(f"{name} [{preset}]: {len(records)} runs ({skipped} skipped) in {wall:.1f} s → {paths['md']}")
    return info


# ---------------------------------------------------------------------------------------------- CLI
def add_reproduce_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``reproduce`` to an argparse sub-parser set; ``func`` returns the exit code."""
    p = subparsers.add_parser("reproduce", help="re-run one of the paper's tables (table4, table1, table2, collapse)")
    p.set_defaults(func=configure_reproduce_parser(p))
    return p


def configure_reproduce_parser(p: argparse.ArgumentParser) -> Any:
    """Add ``NAME [--preset cpu|full|smoke] [--full] [--out DIR] [--seeds N] [--data-root DIR] [--dry-run]
    [--progress]`` to ``p`` and return the handler (``pwsconv reproduce``)."""
    p.description = ("Re-run one of the paper's experiments as a resumable sweep and write results.md (paper numbers "
                     "beside measured mean ± std), results.csv/jsonl and PNG plots. Presets: cpu (about an hour on 2 "
                     "cores, small models, CIFAR-10 subset), full (the paper's settings), smoke (seconds, digits).")
    p.add_argument("name", metavar="NAME", help=f"one of {', '.join(EXPERIMENTS)}, or (GPU tables, the detection "
                                                "extra) voc_table1, voc_table2, coco_table3, imagenet_table5")
    p.add_argument("--preset", default=None, help="cpu (default), full or smoke")
    p.add_argument("--full", action="store_true", help="same as --preset full")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output directory (default results/reproduce/NAME_PRESET; finished runs there are skipped)")
    p.add_argument("--seeds", type=int, default=None, metavar="N", help="number of seeds (default: the preset's)")
    p.add_argument("--data-root", default=None, metavar="DIR", help="dataset directory")
    p.add_argument("--dry-run", action="store_true", help="list the runs and a time estimate; train nothing")
    p.add_argument("--progress", action="store_true", help="per-run progress bars")
    # detection / ImageNet tables (pwsconv.experiments.detection): voc_table1, voc_table2, coco_table3, imagenet_table5
    p.add_argument("--weights", default=None, metavar="FILE",
                   help="coco_table3: an ImageNet ResNet-50 state_dict for Mask R-CNN's backbone")
    return _cmd_reproduce


def _cmd_reproduce(args: argparse.Namespace) -> int:
    preset = args.preset
    if args.full:
        if preset not in (None, "full"):
            raise ReproduceError(f"--full contradicts --preset {preset}")
        preset = "full"
    from .detection import EXTRA_EXPERIMENTS, reproduce_extra   # the GPU tables: their own module

    if args.name in EXTRA_EXPERIMENTS:
        if args.seeds not in (None, 1):
            raise ReproduceError(f"{args.name} runs one seed per cell (as the paper); drop --seeds")
        reproduce_extra(args.name, preset or "smoke", out_dir=args.out, data_root=args.data_root,
                        weights=args.weights, dry_run=args.dry_run, progress=True)
        return 0
    if args.weights is not None:
        raise ReproduceError("--weights is for coco_table3 only")
    reproduce(args.name, preset or "cpu", out_dir=args.out, seeds=args.seeds, data_root=args.data_root,
              progress=args.progress, dry_run=args.dry_run)
    return 0


if __name__ == "__main__":  # pragma: no cover
    _ap = argparse.ArgumentParser(prog="python -m pwsconv.experiments.paper")
    add_reproduce_parser(_ap.add_subparsers(dest="cmd", required=True))
    _a = _ap.parse_args()
    try:
        sys.exit(_a.func(_a))
    except ValueError as _e:
        print(f"error: {_e}", file=sys.stderr)
        sys.exit(2)
