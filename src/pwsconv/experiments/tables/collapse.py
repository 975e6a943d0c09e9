"""The LR-collapse scan (not a paper table): the LR at which each method first collapses, 0.0125 … 3.2 (×2)."""

from __future__ import annotations

from typing import Any, Sequence

from ..sweep import RunSpec
from ..table import FULL, ONE_ARCH, SMOKE, Context, Curves, ErrVs, Size, Table, grid, md_table, method_opts

#: no table in the paper: Table 2's NaN rows and the text ("cannot be trained without normalizing outputs when LR is
#: 1e-2", WN "collapses at small batch") are the reference
PAPER: dict[str, Any] = {}
METHODS = ("none", "bn", "gn", "sn", "wn", "pws")
LRS = tuple(round(0.0125 * 2 ** k, 6) for k in range(9))   # 0.0125 … 3.2, ×2
SIZES = {"full": FULL, "cpu": Size("cifar10", 2000, 1000, 4, 3), "smoke": SMOKE}
AXES = {
    "full": dict(method=METHODS, LR=LRS),
    "cpu": dict(method=METHODS, LR=LRS),
    "smoke": dict(method=("none", "pws"), LR=(0.05, 3.2)),
}
#: the net: Table 1's, except ConvPool-CNN-C (not VGG-16) at full size
MODEL = {**ONE_ARCH, "full": ("convpool_cnn_c", {})}


def runs(preset: str, seeds: Sequence[int]) -> list[RunSpec]:
    size, (model, mopts) = SIZES[preset], MODEL[preset]

    def run(method: str, LR: float, seed: int) -> RunSpec:
        cfg = size.config(model=model, model_opts=mopts, method=method, method_opts=method_opts(method, 128, mopts),
                          lr=LR, seed=seed)
        return RunSpec(f"{method}_lr{LR:g}_s{seed}", cfg, {"method": method, "LR": LR, "seed": seed})

    return grid({**AXES[preset], "seed": seeds}, run)


def lr_scan(agg: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """Error by (method, LR) with the collapsed seeds marked, and each method's first LR with a collapse (in one
    seed, in all seeds): the Markdown table and ``[{"method", "first_collapse_lr", "first_all_collapse_lr"}]``."""
    lrs = sorted({a["LR"] for a in agg})
    cell = {(a["method"], a["LR"]): a for a in agg}
    head = ["method"] + [f"{lr:g}" for lr in lrs] + ["first LR with a collapse", "first LR, all seeds collapsed"]
    rows, firsts = [], []
    for m in dict.fromkeys(a["method"] for a in agg):
        cells = [cell.get((m, lr)) for lr in lrs]
        first_any = next((lr for lr, a in zip(lrs, cells) if a and a["n_collapsed"]), None)
        first_all = next((lr for lr, a in zip(lrs, cells) if a and a["n_collapsed"] == a["n"]), None)
        rows.append([m] + [_marked(a) for a in cells] +
                    [f"{first_any:g}" if first_any else "none", f"{first_all:g}" if first_all else "none"])
        firsts.append({"method": m, "first_collapse_lr": first_any, "first_all_collapse_lr": first_all})
    return md_table(head, rows), firsts


def _marked(a: dict[str, Any] | None) -> str:
    if a is None:
        return "—"
    return a["err"] + (f" ✗{a['n_collapsed']}/{a['n']}" if a["n_collapsed"] else "")


def summary(ctx: Context) -> str:
    table, ctx.extra["first_collapse"] = lr_scan(ctx.agg)
    return ("Test error (%) by LR (mean ± std over seeds); ✗k/n = k of n seeds collapsed (NaN, or test accuracy ≤ "
            "chance + 2 %). The paper has no such table; its reference points are the NaN rows of Table 2 (PWS without "
            "√(2/n_l) at LR 1e-2, PWS with γ=1e-5 at LR 1e-2), WN collapsing at batch 2 (Table 1) and plain conv that "
            "'cannot be trained' without output normalization at LR 1e-2 on SSD.\n\n" + table)


TABLE = Table(
    name="collapse", title="LR collapse scan — the LR at which each method first collapses",
    sizes=SIZES, runs=runs, paper=PAPER, summary=summary,
    plots=(Curves("LR scan training curves", group_by="method", line_by="LR"),
           ErrVs("LR", "Test error vs LR (collapse scan)")),
)
