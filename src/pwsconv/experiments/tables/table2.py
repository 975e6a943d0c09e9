"""Table 2 — the PWS ablation (√(2/n_l), trainable α, γ) at a small and a large LR, batch 16; the paper's VOC07
detection numbers are a reference for the pattern (run here as CIFAR-10 classification with one net)."""

from __future__ import annotations

import math
from typing import Any, Sequence

from ..sweep import RunSpec
from ..table import FULL, ONE_ARCH, SMOKE, VOC_NOTE, Context, Curves, ErrVs, Size, Table, grid, md_table, paper_value

#: VOC07 mAP (%) rows: (method, LR, backbone, gain √(2/n_l), trainable α, γ, mAP); NaN = collapsed
PAPER = [
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
]
#: variant label → (method, method_opts)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "none": ("none", {}),
    "bn": ("bn", {}),
    "pws γ=1e-3": ("pws", {"gamma": 1e-3}),
    "pws γ=1e-4": ("pws", {"gamma": 1e-4}),
    "pws γ=1e-5": ("pws", {"gamma": 1e-5}),
    "pws no α (γ=1e-3)": ("pws", {"gamma": 1e-3, "use_alpha": False}),
    "pws no √(2/n), no α (γ=1e-3)": ("pws", {"gamma": 1e-3, "use_alpha": False, "use_gain": False}),
}
SMOKE_VARIANTS = ("bn", "pws γ=1e-3", "pws no √(2/n), no α (γ=1e-3)")
#: (small, large) LR: the paper's 1e-3 / 1e-2 at batch 16 for "full"; ×10 for the short cpu schedule, where 1e-3
#: would barely move the weights in 8 epochs
LRS = {"full": (1e-3, 1e-2), "cpu": (1e-2, 1e-1), "smoke": (1e-2, 1e-1)}
BATCH = {"full": 16, "cpu": 16, "smoke": 32}
SIZES = {"full": FULL, "cpu": Size("cifar10", 2000, 1000, 8, 3), "smoke": SMOKE}


def _axes(preset: str) -> dict[str, Sequence[Any]]:
    keep = SMOKE_VARIANTS if preset == "smoke" else VARIANTS
    return dict(variant=[(i, v) for i, v in enumerate(VARIANTS) if v in keep], LR=LRS[preset])


def runs(preset: str, seeds: Sequence[int]) -> list[RunSpec]:
    size, (model, mopts) = SIZES[preset], ONE_ARCH[preset]

    def run(variant: tuple[int, str], LR: float, seed: int) -> RunSpec:
        i, label = variant
        method, opts = VARIANTS[label]
        cfg = size.config(model=model, model_opts=mopts, method=method, method_opts=dict(opts), lr=LR,
                          batch_size=BATCH[preset], seed=seed)
        return RunSpec(f"v{i}_{method}_lr{LR:g}_s{seed}", cfg, {"variant": label, "method": method, "LR": LR,
                                                                "seed": seed})

    return grid({**_axes(preset), "seed": seeds}, run)


def _paper_row(method: str, opts: dict[str, Any], lr: float) -> str:
    """The paper's VGG-16 mAP of a variant at LR 1e-3 or 1e-2 ("—" if the paper has no such row)."""
    gain, alpha = opts.get("use_gain", True), opts.get("use_alpha", True)
    for (pm, plr, bb, pg, pa, pgam, v) in PAPER:
        if bb == "VGG-16" and pm == method and plr == lr and \
                (method != "pws" or (pg, pa, pgam) == (gain, alpha, opts.get("gamma"))):
            return paper_value(v)
    return "—"


def summary(ctx: Context) -> str:
    cell = {(a["variant"], a["LR"]): a["err"] for a in ctx.agg}
    small, large = LRS[ctx.preset]
    head = ["variant", f"LR {small:g}: measured err", "paper mAP (LR 1e-3)", f"LR {large:g}: measured err",
            "paper mAP (LR 1e-2)"]
    rows = [[v, cell.get((v, small), "—"), _paper_row(m, o, 1e-3), cell.get((v, large), "—"), _paper_row(m, o, 1e-2)]
            for v, (m, o) in VARIANTS.items() if any(k[0] == v for k in cell)]
    return (f"Test error (%), mean ± std over seeds, at the small / large LR ({small:g} / {large:g}); paper = Table 2 "
            "(VOC07 mAP %, VGG-16, batch 16, LR 1e-3 / 1e-2; — = not in the paper).\n\n" + md_table(head, rows) +
            "\n\n" + VOC_NOTE)


TABLE = Table(
    name="table2", title="Table 2 — PWS ablation: √(2/n_l), trainable α, γ, at a small and a large LR",
    sizes=SIZES, runs=runs, paper=PAPER, summary=summary,
    plots=(Curves("Table 2 training curves", group_by="LR", line_by="variant"),
           ErrVs("LR", "Table 2: test error vs LR", line="variant")),
)
