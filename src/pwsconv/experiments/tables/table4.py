"""Table 4 — CIFAR-10 error (%) of a plain and a residual net × none/BN/GN/SN/WN/PWS × LR 0.1 and 0.05."""

from __future__ import annotations

from typing import Any, Sequence

from ..sweep import RunSpec
from ..table import ARCHS, FULL, SMOKE, Context, Curves, ErrVs, Size, Table, grid, md_table, method_opts, paper_value

#: CIFAR-10 top-1 error (%) by (arch, method, LR)
PAPER = {
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
}
METHODS = ("none", "bn", "gn", "sn", "wn", "pws")
LRS = (0.1, 0.05)
SIZES = {"full": FULL, "cpu": Size("cifar10", 3000, 1000, 8, 3), "smoke": SMOKE}
AXES = {
    "full": dict(arch=ARCHS["full"], method=METHODS, LR=LRS),
    "cpu": dict(arch=ARCHS["cpu"], method=METHODS, LR=LRS),
    "smoke": dict(arch=ARCHS["smoke"], method=("bn", "pws"), LR=LRS),
}


def runs(preset: str, seeds: Sequence[int]) -> list[RunSpec]:
    size = SIZES[preset]

    def run(arch: tuple, method: str, LR: float, seed: int) -> RunSpec:
        label, model, mopts = arch
        cfg = size.config(model=model, model_opts=mopts, method=method, method_opts=method_opts(method, 128, mopts),
                          lr=LR, seed=seed)
        return RunSpec(f"{label}_{method}_lr{LR:g}_s{seed}", cfg, {"arch": label, "method": method, "LR": LR,
                                                                   "seed": seed})

    return grid({**AXES[preset], "seed": seeds}, run)


def summary(ctx: Context) -> str:
    cell = {(a["arch"], a["method"], a["LR"]): a["err"] for a in ctx.agg}
    archs = [x for x in ("residual", "plain") if any(k[0] == x for k in cell)]
    head: list[Any] = ["method"] + [f"{arch} LR {lr:g}: {col}" if col else "paper"
                                    for arch in archs for lr in LRS for col in ("measured", "")]
    rows = [[m] + [v for arch in archs for lr in LRS
                   for v in (cell.get((arch, m, lr), "—"), paper_value(PAPER.get((arch, m, lr))))]
            for m in METHODS if any(k[1] == m for k in cell)]
    return "Test error (%), mean ± std over seeds; paper = Table 4 (CIFAR-10 error %, 200 epochs).\n\n" + \
        md_table(head, rows)


TABLE = Table(
    name="table4", title="Table 4 — CIFAR-10 classification error (%), plain and residual nets",
    sizes=SIZES, runs=runs, paper=PAPER, summary=summary,
    plots=(Curves("Table 4 training curves", group_by=lambda r: f"{r.spec.labels['arch']} LR {r.spec.labels['LR']:g}"),
           ErrVs("LR", "Table 4: test error vs LR", panel="arch")),
)
