"""Table 2 (detection) — SSD on VOC07: the PWS ablation rows (√(2/n_l), trainable α, γ) at LR 1e-3 and 1e-2."""

from __future__ import annotations

from typing import Any

from ..det_table import DET_PRESETS, DetRunSpec, DetTable, det_cfg, by, mark, md, metric, pws_opts
from ..table import grid
from .table2 import PAPER

#: the paper's rows in its order (1-based row number, (method, LR, backbone, √(2/n_l), trainable α, γ, mAP))
ROWS = list(enumerate(PAPER, 1))
SMOKE_ROWS = (2, 7, 9)


def runs(preset: str, data: dict[str, Any], root: str | None, weights: str | None) -> list[DetRunSpec]:
    p = DET_PRESETS[preset]

    def run(row: tuple[int, tuple]) -> DetRunSpec:
        i, (m, lr, bb, gain, alpha, gamma, _map) = row
        cfg = det_cfg(preset, data, model=p.model_resnet if bb == "ResNet-50" else p.model_vgg, method=m,
                      method_opts=pws_opts(gamma, gain, alpha) if m == "pws" else {}, dataset="voc", data_root=root,
                      size=p.size, batch_size=16 if preset != "smoke" else 4, lr=lr, weight_decay=5e-4, epochs=240,
                      milestones=[90, 170])
        label = {"row": i, "method": m, "LR": lr, "backbone": bb, "gain": mark(gain), "alpha": mark(alpha),
                 "gamma": gamma if gamma is not None else "—"}
        return DetRunSpec(f"r{i:02d}_{m}_lr{lr:g}_{'r50' if bb == 'ResNet-50' else 'vgg'}", "detection", cfg, label)

    return grid({"row": [r for r in ROWS if preset != "smoke" or r[0] in SMOKE_ROWS]}, run)


def summary(records: list[dict[str, Any]]) -> str:
    rows = [[i, m, f"{lr:g}", bb, mark(g), mark(a), "—" if gam is None else f"{gam:g}", v,
             metric(by(records, row=i), "mAP")]
            for i, (m, lr, bb, g, a, gam, v) in ROWS if by(records, row=i) is not None]
    return md(["row", "method", "LR", "backbone", "√(2/n_l)", "trainable α", "γ", "paper mAP", "measured mAP"], rows)


TABLE = DetTable(
    name="voc_table2",
    title="Table 2 — SSD on VOC07: PWS ablation (√(2/n_l), trainable α, γ) at LR 1e-3 and 1e-2, batch 16",
    runs=runs, paper=PAPER, summary=summary, need="VOCdevkit/VOC2007/ImageSets/Main/test.txt",
)
