"""Table 3 (detection) — COCO: Mask R-CNN R-50-FPN 1x (BN, GN, PWS) and SSD-VGG16 1x/2x (BN, PWS), bbox AP."""

from __future__ import annotations

from typing import Any

from ..det_table import DET_PRESETS, DetRunSpec, DetTable, by, det_cfg, md, metric, pws_opts
from ..table import grid

#: (structure, method, schedule) → (AP, AP50, AP75) bbox, %
PAPER: dict[tuple[str, str, str], tuple[float, float, float]] = {
    ("Mask R-CNN", "bn", "1x"): (38.0, 58.6, 41.4),
    ("Mask R-CNN", "gn", "1x"): (38.2, 59.2, 41.1),
    ("Mask R-CNN", "pws", "1x"): (38.9, 59.6, 42.5),
    ("SSD", "bn", "1x"): (25.2, 41.3, 26.4),
    ("SSD", "pws", "1x"): (25.3, 41.2, 26.6),
    ("SSD", "bn", "2x"): (26.6, 42.7, 28.1),
    ("SSD", "pws", "2x"): (27.2, 44.0, 28.7),
}
#: SSD schedules: name → (epochs, milestones)
SSD_SCHEDULES = {"1x": (80, [30, 50, 70]), "2x": (150, [60, 100, 140])}
AXES = {
    "full": {"maskrcnn": dict(method=("bn", "gn", "pws")), "ssd": dict(schedule=("1x", "2x"), method=("bn", "pws"))},
    "smoke": {"maskrcnn": dict(method=("gn", "pws")), "ssd": dict(schedule=("1x",), method=("pws",))},
}
AXES["cpu"] = AXES["full"]


def runs(preset: str, data: dict[str, Any], root: str | None, weights: str | None) -> list[DetRunSpec]:
    p, full = DET_PRESETS[preset], preset == "full"

    def maskrcnn(method: str) -> DetRunSpec:
        # the mmdetection 1x recipe (Chen et al. 2019) at the paper's batch 4: LR 0.02·4/16, warm-up 500 steps,
        # ×0.1 after epochs 8 and 11 of 12, weight decay 1e-4; pretrained backbone (stem + layer1 frozen)
        cfg = det_cfg(preset, data, model="maskrcnn_resnet50_fpn", method=method,
                      method_opts=pws_opts(1e-4) if method == "pws" else {}, dataset="coco", data_root=root,
                      masks=True, size=p.rcnn_size, weights=weights if full else None, batch_size=4 if full else 2,
                      lr=0.005 if full else 0.01, weight_decay=1e-4, warmup_steps=500 if full else 0,
                      warmup_factor=1 / 3, epochs=12, milestones=[8, 11],
                      model_opts={} if full else {"box_batch_size_per_image": 64, "rpn_post_nms_top_n_train": 200})
        return DetRunSpec(f"maskrcnn_{method}_1x", "detection", cfg,
                          {"structure": "Mask R-CNN", "method": method, "schedule": "1x"})

    def ssd(schedule: str, method: str) -> DetRunSpec:
        epochs, milestones = SSD_SCHEDULES[schedule]
        cfg = det_cfg(preset, data, model=p.model_vgg, method=method,
                      method_opts=pws_opts(1e-4) if method == "pws" else {}, dataset="coco", data_root=root,
                      size=p.size, batch_size=16 if full else 8, lr=1e-2, weight_decay=5e-4, epochs=epochs,
                      milestones=milestones)
        return DetRunSpec(f"ssd_{method}_{schedule}", "detection", cfg,
                          {"structure": "SSD", "method": method, "schedule": schedule})

    return grid(AXES[preset]["maskrcnn"], maskrcnn) + grid(AXES[preset]["ssd"], ssd)


def summary(records: list[dict[str, Any]]) -> str:
    rows = []
    for (s, m, sch), (ap, ap50, ap75) in PAPER.items():
        r = by(records, structure=s, method=m, schedule=sch)
        if r is not None:
            rows.append([s, m, sch, ap, metric(r, "AP"), ap50, metric(r, "AP50"), ap75, metric(r, "AP75"),
                         metric(r, "segm_AP") if s == "Mask R-CNN" else None])
    return md(["structure", "method", "schedule", "paper AP", "AP", "paper AP50", "AP50", "paper AP75", "AP75",
               "mask AP"], rows)


TABLE = DetTable(
    name="coco_table3", title="Table 3 — COCO detection: Mask R-CNN R-50-FPN 1x, SSD-VGG16 1x/2x (bbox AP %)",
    runs=runs, paper=PAPER, summary=summary, need="annotations/instances_train2017.json", weights=True,
)
