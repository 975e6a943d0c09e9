"""The dry-run time estimate of a reproduce grid: from training rates measured in advance on the 2-core CPU machine
(cpu/smoke presets), or from the throughput measured now on this machine (:func:`measured_estimate`; full presets,
GPUs)."""

from __future__ import annotations

import math
from typing import Any, Sequence

from .sweep import RunSpec

__all__ = ["measured_estimate"]

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
#: the share of the step rate measured in isolation that a run gets on a GPU (evaluation, checkpoints, start-up of the
#: loop; the data pipeline is on the device, :mod:`pwsconv.data.device`)
_GPU_EFFICIENCY = 0.8
#: (train images, test images) of the full data sets, for runs without a ``limit``
_DATA_SIZES = {"cifar10": (50000, 10000), "mnist": (60000, 10000), "fashion_mnist": (60000, 10000),
               "digits": (1437, 360)}
#: (channels, side) of the inputs of each data set, to measure a model's step on random inputs of that shape
_DATA_SHAPES = {"cifar10": (3, 32), "mnist": (1, 28), "fashion_mnist": (1, 28), "digits": (1, 8)}


def _run_seconds(c: Any, rate: float) -> float:
    """Wall time of one run of config ``c`` at ``rate`` training images/s (evaluation ≈ 3× faster, 1 s start-up)."""
    n_train, n_test = _DATA_SIZES.get(c.dataset, (c.limit or 0, c.test_limit or 0))
    n_train = min(n_train, c.limit) if c.limit else n_train
    per_epoch = max(1, n_train // c.batch_size)
    steps = per_epoch * c.epochs
    if c.max_steps is not None:
        steps = min(steps, c.max_steps)
    evals = (c.test_limit or n_test) * math.ceil(steps / per_epoch)
    return (steps * c.batch_size + evals / 3.0) / rate + 1.0


def _estimate_seconds(runs: Sequence[RunSpec]) -> float | None:
    """Rough wall time of ``runs`` on 2 CPU cores from the rates measured for the cpu presets (None for models
    without a measured rate, e.g. the full preset: see :func:`measured_estimate`)."""
    total = 0.0
    for r in runs:
        c = r.config
        table = _CPU_RATES.get(c.model)
        if table is None or c.limit is None:
            return None
        near = min(table, key=lambda b: (abs(math.log(b / c.batch_size)), b))
        total += _run_seconds(c, table[near].get(c.method, 3000.0) * _ENGINE_EFFICIENCY)
    return total


def measured_estimate(runs: Sequence[RunSpec], device: str | None = None, *, repeats: int = 3,
                      warmup: int = 1) -> tuple[float | None, dict[str, float], str]:
    """Wall time of ``runs`` trained one after another here, from the training throughput of each distinct (model,
    method, batch, precision) measured now on ``device`` (default: the GPU if there is one) with
    :func:`pwsconv.experiments.speed.train_step_rates`. Returns ``(seconds or None if a data set's input shape is
    unknown, {case: images/s}, device)``."""
    import torch

    from .speed import train_step_rates

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    eff = _GPU_EFFICIENCY if device.startswith("cuda") else _ENGINE_EFFICIENCY
    groups: dict[tuple, dict[str, Any]] = {}
    for r in runs:
        c = r.config
        if c.dataset not in _DATA_SHAPES:
            return None, {}, device
        key = (c.model, repr(sorted(c.model_opts.items())), c.batch_size, c.dataset, c.amp, c.channels_last)
        groups.setdefault(key, {}).setdefault(f"{c.method} {sorted(c.method_opts.items())}", (c.method,
                                                                                           dict(c.method_opts)))
    rates: dict[str, float] = {}
    for (model, _, batch, dataset, amp, cl), cases in groups.items():
        c0 = next(r.config for r in runs if r.config.model == model and r.config.batch_size == batch)
        ch, side = _DATA_SHAPES[dataset]
        pending = list(cases.items())
        while pending:   # one interleaved measurement per set of distinct methods
            layer, seen = [], set()
            for item in pending:
                if item[1][0] not in seen:
                    layer.append(item)
                    seen.add(item[1][0])
            pending = [i for i in pending if i not in layer]
            got = train_step_rates(model, [m for _, (m, _) in layer], batch, model_opts=c0.model_opts,
                                   method_opts={m: o for _, (m, o) in layer}, image_size=side, in_channels=ch,
                                   repeats=repeats, warmup=warmup, device=device, amp=amp, channels_last=cl)
            for label, (m, _) in layer:
                rates[f"{model} b{batch}{' ' + amp if amp else ''} {label}"] = got[m]["images_per_s"]
    total = 0.0
    for r in runs:
        c = r.config
        label = f"{c.method} {sorted(c.method_opts.items())}"
        total += _run_seconds(c, rates[f"{c.model} b{c.batch_size}{' ' + c.amp if c.amp else ''} {label}"] * eff)
    return total, rates, device
