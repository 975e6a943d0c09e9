"""What a detection / ImageNet table declares (:class:`DetTable`) and the pieces those table files share: the
presets (:data:`DET_PRESETS`), a run's :class:`~pwsconv.detection.train.DetConfig` (:func:`det_cfg`), PWS options and
the Markdown cells. The runner is :mod:`pwsconv.experiments.detection` (``pwsconv reproduce voc_table1 ...``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence


@dataclass
class DetRunSpec:
    name: str
    kind: str                       # "detection" | "imagenet"
    config: Any                     # DetConfig | TrainConfig
    labels: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DetTable:
    """One detection / ImageNet experiment, declared by one file of :mod:`pwsconv.experiments.tables`."""
    name: str
    title: str
    runs: Callable[[str, dict[str, Any], str | None, str | None], list[DetRunSpec]]  # (preset, data, root, weights)
    paper: Any                                         # the paper's numbers
    summary: Callable[[list[dict[str, Any]]], str]     # run records → the Markdown table of results.md
    need: str                                          # what --data-root must hold (full preset)
    data: str = "detection"                            # the synthetic set of smoke/cpu: "detection" | "imagenet"
    weights: bool = False                              # the full preset needs --weights


@dataclass(frozen=True)
class DetPreset:
    model_vgg: str
    model_resnet: str
    size: int | None
    max_steps: int | None
    n_train: int = 0
    n_test: int = 0
    canvas: int = 96
    rcnn_size: int | None = None
    num_workers: int = 4


DET_PRESETS = {
    "full": DetPreset("ssd_vgg16", "ssd_resnet50", 320, None, rcnn_size=800, num_workers=8),
    "cpu": DetPreset("ssd_tiny", "ssd_tiny", 96, 300, n_train=400, n_test=100, rcnn_size=96, num_workers=1),
    "smoke": DetPreset("ssd_tiny", "ssd_tiny", 96, 3, n_train=48, n_test=16, rcnn_size=64, num_workers=0),
}


def det_cfg(preset: str, data: dict[str, Any], **kw: Any) -> Any:
    """A detection run's DetConfig: the paper's settings ``kw``; off the full preset, the synthetic set of ``data``
    with ``max_steps`` bounding the run."""
    from ..detection.train import DetConfig

    p = DET_PRESETS[preset]
    epochs, milestones = kw.pop("epochs"), kw.pop("milestones")
    if preset != "full":   # the synthetic set: max_steps bounds the run; the schedule keeps its shape
        epochs, milestones = 1000, []
        kw.pop("data_root", None)
    base = dict(epochs=epochs, milestones=milestones, max_steps=p.max_steps, num_workers=p.num_workers,
                progress=True, ckpt_every=500 if preset == "full" else 0, log_every=20 if preset == "full" else 10)
    if preset != "full":
        base.update(data_root=data["voc_root"] if kw.get("dataset", "voc") == "voc" else data["coco_root"],
                    eval_batch_size=16, num_threads=1)
        if kw.get("dataset", "voc") == "voc":
            base["classes"] = data["classes"]
        else:
            base.update(train_sets="train2017", test_sets="val2017")
    elif kw.get("dataset") == "coco":
        base.update(train_sets="train2017", test_sets="val2017")
    base.update(kw)
    return DetConfig.from_dict(base)


def pws_opts(gamma: float | None, gain: bool | None = True, alpha: bool | None = True) -> dict[str, Any]:
    o: dict[str, Any] = {"gamma": gamma}
    if gain is False:
        o["use_gain"] = False
    if alpha is False:
        o["use_alpha"] = False
    return o


# ---------------------------------------------------------------------------------------------------- Markdown
def mark(v: bool | None) -> str:
    return "—" if v is None else ("✓" if v else "✗")


def _f(v: Any, digits: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return "NaN" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def md(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; floats with 2 decimals, NaN as "NaN", None as "—"."""
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(_f(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def by(records: list[dict[str, Any]], **want: Any) -> dict[str, Any] | None:
    """The first record whose labels have the values ``want``."""
    for r in records:
        if all(r["labels"].get(k) == v for k, v in want.items()):
            return r
    return None


def metric(r: dict[str, Any] | None, key: str) -> float | None:
    """A record's metric (NaN for a collapsed run, None for no record or no such metric)."""
    if r is None:
        return None
    if r["status"] == "nan":
        return math.nan
    v = r["metrics"].get(key)
    return None if v is None else float(v)
