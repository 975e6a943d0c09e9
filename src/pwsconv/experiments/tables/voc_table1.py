"""Table 1 (detection) — SSD-VGG16 on VOC07: methods × batch 2/4/8, mAP and training speed."""

from __future__ import annotations

from typing import Any

from ..det_table import DET_PRESETS, DetRunSpec, DetTable, by, det_cfg, md, metric, pws_opts
from ..table import grid
from .table1 import PAPER

METHODS = ("in", "bn", "gn", "sn", "wn", "pws")
BATCHES = (2, 4, 8)
AXES = {"full": dict(method=METHODS, batch=BATCHES), "cpu": dict(method=METHODS, batch=BATCHES),
        "smoke": dict(method=("bn", "pws"), batch=(2,))}


def runs(preset: str, data: dict[str, Any], root: str | None, weights: str | None) -> list[DetRunSpec]:
    p = DET_PRESETS[preset]

    def run(method: str, batch: int) -> DetRunSpec:
        cfg = det_cfg(preset, data, model=p.model_vgg, method=method,
                      method_opts=pws_opts(1e-3) if method == "pws" else {}, dataset="voc", data_root=root,
                      size=p.size, batch_size=batch, lr=1e-2, momentum=0.9, weight_decay=5e-4, epochs=240,
                      milestones=[90, 170])
        return DetRunSpec(f"{method}_b{batch}", "detection", cfg, {"method": method, "batch": batch})

    return grid(AXES[preset], run)


def summary(records: list[dict[str, Any]]) -> str:
    head = ["method", "paper img/s (2080Ti, b8)", "measured img/s (b8)"]
    head += [h for b in BATCHES for h in (f"paper mAP b{b}", f"measured mAP b{b}")]
    rows = []
    for m in METHODS:
        if not any(by(records, method=m, batch=b) for b in BATCHES):
            continue
        fps, maps = PAPER.get(m, (None, {}))
        rows.append([m, fps, metric(by(records, method=m, batch=8), "images_per_s")] +
                    [v for b in BATCHES for v in (maps.get(b), metric(by(records, method=m, batch=b), "mAP"))])
    return md(head, rows)


TABLE = DetTable(
    name="voc_table1", title="Table 1 — SSD-VGG16 on VOC07: sensitivity to the batch size (mAP %) and training speed",
    runs=runs, paper=PAPER, summary=summary, need="VOCdevkit/VOC2007/ImageSets/Main/test.txt",
)
