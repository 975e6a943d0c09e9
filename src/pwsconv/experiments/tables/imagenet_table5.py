"""Table 5 — ResNet-50 on ImageNet: top-1 validation error of BN, GN, LN, IN, WN and PWS."""

from __future__ import annotations

from typing import Any

from ..det_table import DetRunSpec, DetTable, by, md, metric
from ..table import grid

#: top-1 error (%) on ImageNet val. The paper gives no top-5 numbers (only its Figure 5 curves).
PAPER: dict[str, float] = {"bn": 23.6, "gn": 24.3, "ln": 25.3, "in": 28.4, "wn": 28.2, "pws": 24.0}
AXES = {"full": dict(method=tuple(PAPER)), "cpu": dict(method=tuple(PAPER)), "smoke": dict(method=("bn", "pws"))}


def runs(preset: str, data: dict[str, Any], root: str | None, weights: str | None) -> list[DetRunSpec]:
    from ...config import TrainConfig

    full = preset == "full"

    def run(method: str) -> DetRunSpec:
        cfg = dict(model="resnet50" if full else "resnet50_small", method=method,
                   method_opts={"gamma": 1e-4} if method == "pws" else {}, dataset="imagenet",
                   data_root=root if full else data["root"], batch_size=64 if preset != "smoke" else 8,
                   eval_batch_size=100 if full else 16, lr=0.025, momentum=0.9, weight_decay=1e-4,
                   epochs=100 if full else (2 if preset == "cpu" else 1), milestones=[30, 60, 90] if full else [],
                   num_workers=8 if full else 1, max_steps=2 if preset == "smoke" else None,
                   ckpt_every=1000 if full else 0, progress=False, num_threads=None if full else 1)
        return DetRunSpec(method, "imagenet", TrainConfig.from_dict(cfg), {"method": method})

    return grid(AXES[preset], run)


def _err(acc: float | None) -> float | None:
    return None if acc is None else 100 * (1 - acc)


def summary(records: list[dict[str, Any]]) -> str:
    rows = [[m, err, _err(metric(r, "val_acc")), "—", _err(metric(r, "val_acc5")), metric(r, "images_per_s")]
            for m, err in PAPER.items() if (r := by(records, method=m)) is not None]
    return md(["method", "paper top-1 err", "top-1 err", "paper top-5 err", "top-5 err", "train img/s"], rows)


TABLE = DetTable(
    name="imagenet_table5", title="Table 5 — ResNet-50 on ImageNet: top-1 / top-5 validation error (%)",
    runs=runs, paper=PAPER, summary=summary, need="train", data="imagenet",
)
