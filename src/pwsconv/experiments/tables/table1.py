"""Table 1 — sensitivity to the batch size (2/4/8/128) and training speed; the paper's VOC07 detection numbers are a
reference for the pattern (run here as CIFAR-10 classification with one net at LR 1e-2)."""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

from ...train.checkpoint import atomic_write_text
from ..sweep import RunSpec
from ..table import (FULL, ONE_ARCH, SMOKE, VOC_NOTE, Context, Curves, ErrVs, Size, Table, grid, md_table,
                     method_opts, paper_value)

#: method → (FPS at batch 8 on an RTX 2080Ti, {batch: VOC07 mAP %}); NaN = collapsed
PAPER = {
    "in": (35.34, {2: 71.43, 4: 72.69, 8: 72.97}),
    "bn": (45.66, {2: 72.97, 4: 75.18, 8: 76.74}),
    "gn": (29.26, {2: 75.08, 4: 75.26, 8: 75.13}),
    "sn": (28.56, {2: 76.29, 4: 76.53, 8: 76.86}),
    "wn": (52.11, {2: math.nan, 4: 76.70, 8: 77.06}),
    "pws": (52.72, {2: 76.93, 4: 77.11, 8: 77.66}),
}
METHODS = ("bn", "gn", "sn", "wn", "pws", "mabn", "in")
BATCHES = (2, 4, 8, 128)
LR = 1e-2
SIZES = {"full": FULL, "cpu": Size("cifar10", 800, 1000, 6, 3), "smoke": SMOKE}
AXES = {
    "full": dict(method=METHODS, batch=BATCHES),
    "cpu": dict(method=METHODS, batch=BATCHES),
    "smoke": dict(method=("bn", "pws", "mabn"), batch=(2, 128)),
}
#: the speed columns: batch sizes and interleaved rounds per preset
SPEED = {"full": ((8, 128), 20), "cpu": ((8, 128), 15), "smoke": ((8,), 2)}


def runs(preset: str, seeds: Sequence[int]) -> list[RunSpec]:
    size, (model, mopts) = SIZES[preset], ONE_ARCH[preset]

    def run(method: str, batch: int, seed: int) -> RunSpec:
        cfg = size.config(model=model, model_opts=mopts, method=method, method_opts=method_opts(method, batch, mopts),
                          lr=LR, batch_size=batch, seed=seed)
        return RunSpec(f"{method}_b{batch}_s{seed}", cfg, {"method": method, "batch": batch, "seed": seed})

    return grid({**AXES[preset], "seed": seeds}, run)


def speed(ctx: Context) -> dict[str, str]:
    """Training images/s of every method, measured interleaved after the sweep → ``ctx.extra["speed"]``,
    ``speed.csv``. A call that trained nothing keeps the ``speed.csv`` already there (delete it to measure again)."""
    from ..speed import train_step_rates

    c = ctx.runs[0].config
    methods = list(dict.fromkeys(r.config.method for r in ctx.runs))
    batches, repeats = SPEED[ctx.preset]
    path = os.path.join(ctx.out_dir, "speed.csv")
    if all(r.skipped for r in ctx.records):   # a finished grid re-aggregated: its measured speeds stay as they are
        kept = _read_speed(path, batches, methods)
        if kept is not None:
            ctx.extra["speed"] = kept
            return {"speed": path}
    image, in_ch = (8, 1) if c.dataset == "digits" else (32, 3)
    rates = {}
    for b in batches:
        opts = {m: method_opts(m, b, c.model_opts) for m in methods}
        rates[b] = train_step_rates(c.model, methods, b, model_opts=c.model_opts, method_opts=opts, image_size=image,
                                    in_channels=in_ch, repeats=repeats, warmup=2,
                                    device="cuda" if c.device != "cpu" and _cuda() else "cpu")
    # the tables use the rates as speed.csv holds them, so a later call that reads them back writes the same bytes
    rates = {b: {m: {"ms": round(r["ms"], 4), "images_per_s": round(r["images_per_s"], 2),
                     "ratio_to_first": round(r["ratio_to_first"], 4)} for m, r in per.items()}
             for b, per in rates.items()}
    ctx.extra["speed"] = rates
    lines = ["batch,method,ms_per_step,images_per_s,ratio_to_first"]
    for b, per in rates.items():
        lines += [f"{b},{m},{r['ms']:.4f},{r['images_per_s']:.2f},{r['ratio_to_first']:.4f}" for m, r in per.items()]
    atomic_write_text("\n".join(lines) + "\n", path)
    return {"speed": path}


def _read_speed(path: str, batches: Any, methods: list[str]) -> dict[int, dict[str, dict[str, float]]] | None:
    """The rates a previous call wrote to ``speed.csv``, if it holds exactly these batches and methods."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        rates: dict[int, dict[str, dict[str, float]]] = {}
        for row in rows:
            rates.setdefault(int(row["batch"]), {})[row["method"]] = {
                "ms": float(row["ms_per_step"]), "images_per_s": float(row["images_per_s"]),
                "ratio_to_first": float(row["ratio_to_first"])}
    except (OSError, KeyError, ValueError, TypeError):
        return None
    if sorted(rates) != sorted(int(b) for b in batches) or any(list(per) != methods for per in rates.values()):
        return None
    return rates


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def summary(ctx: Context) -> str:
    cell = {(a["method"], a["batch"]): a for a in ctx.agg}
    rates = ctx.extra.get("speed") or {}
    vs_bn = 8 in rates and "bn" in rates[8]
    head = ["method"] + [f"err B={b}" for b in BATCHES] + [f"img/s B={b}" for b in sorted(rates)] + \
        (["speed vs BN (B=8)"] if vs_bn else []) + ["paper FPS (B=8)", "paper FPS vs BN"] + \
        [f"paper mAP B={b}" for b in (2, 4, 8)]
    rows = []
    for m in [m for m in METHODS if any(k[0] == m for k in cell)]:
        fps, maps = PAPER.get(m, (None, {}))
        row = [m] + [cell[(m, b)]["err"] if (m, b) in cell else "—" for b in BATCHES]
        row += [_rate(rates[b].get(m)) for b in sorted(rates)]
        if vs_bn:
            r = rates[8].get(m)
            row.append("—" if r is None else f"×{r['images_per_s'] / rates[8]['bn']['images_per_s']:.2f}")
        row += [paper_value(fps), "—" if fps is None else f"×{fps / PAPER['bn'][0]:.2f}"]
        rows.append(row + [paper_value(maps.get(b)) for b in (2, 4, 8)])
    return ("Test error (%) by batch size, mean ± std over seeds. Training images/s: forward + backward + SGD step of "
            "the same model on random inputs of the dataset's shape, every method measured interleaved round-robin in "
            "one process after the sweep (medians; this machine, not comparable in absolute terms with the paper's "
            "RTX 2080Ti FPS — compare the ratios to BN). Paper = Table 1 (VOC07 mAP %, higher is better; mabn and "
            "batch 128 are not in the paper).\n\n" + md_table(head, rows) + "\n\n" + VOC_NOTE)


def _rate(r: dict[str, Any] | None) -> str:
    return "—" if r is None else f"{r['images_per_s']:.0f}"


TABLE = Table(
    name="table1", title="Table 1 — sensitivity to batch size, and training speed",
    sizes=SIZES, runs=runs, paper=PAPER, summary=summary, extra=speed,
    plots=(Curves("Table 1 training curves", group_by="batch"),
           ErrVs("batch", "Table 1: test error vs batch size")),
)
