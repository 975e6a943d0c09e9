"""What a paper table declares (:class:`Table`) and the pieces the table files share: the preset sizes
(:class:`Size`), the models, the per-method options and :func:`grid`, the product of a table's axes.

A table file (``pwsconv/experiments/tables/<name>.py``) holds data — its presets' sizes, its axes, the paper's
numbers — and two short functions: ``runs(preset, seeds)`` (one :class:`RunSpec` per point of :func:`grid`) and
``summary(ctx)`` (the Markdown table from the aggregated cells ``ctx.agg``). The runner
(:mod:`pwsconv.experiments.paper`) does everything else: training, aggregation, results.md/csv, plots, dry runs.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from ..config import TrainConfig
from .sweep import RunSpec, SweepRecord

PRESETS = ("cpu", "full", "smoke")

VOC_NOTE = ("The paper's Tables 1 and 2 are Pascal VOC07 *detection* mAP (SSD, VGG-16 backbone); these runs are "
            "CIFAR-10 *classification*, so the paper column is a reference for the pattern (which settings collapse "
            "to NaN, which methods degrade at small batch, relative speed), not a number to match.")


# ---------------------------------------------------------------------------------------------- presets
def milestones_for(epochs: int) -> list[int]:
    """The paper's LR milestones (100/150/180 of 200 epochs) at the same proportions for a shorter schedule."""
    if epochs == 200:
        return [100, 150, 180]
    ms = sorted({max(1, round(epochs * f)) for f in (0.5, 0.75, 0.9)})
    return [m for m in ms if m < epochs] if epochs > 1 else []


@dataclass(frozen=True)
class Size:
    """The data and schedule of one preset of one table; ``config(**kw)`` is a run's TrainConfig."""
    dataset: str
    limit: int | None
    test_limit: int | None
    epochs: int
    seeds: int
    max_steps: int | None = None
    num_threads: int | None = None
    extra: tuple = ()

    def config(self, **kw: Any) -> TrainConfig:
        d = dict(dataset=self.dataset, limit=self.limit, test_limit=self.test_limit, epochs=self.epochs,
                 max_steps=self.max_steps, milestones=milestones_for(self.epochs), lr_decay=0.1, momentum=0.9,
                 weight_decay=5e-4, batch_size=128, num_threads=self.num_threads, progress=False, ckpt_every=0)
        d.update(dict(self.extra))
        d.update(kw)
        return TrainConfig.from_dict(d)


FULL = Size("cifar10", None, None, 200, 1)
SMOKE = Size("digits", 256, 64, 1, 1, max_steps=2, num_threads=1, extra=(("eval_batch_size", 64),))

#: Table 4's two nets per preset: (label, model, model_opts)
ARCHS = {
    "full": [("plain", "convpool_cnn_c", {}), ("residual", "resnet20", {})],
    "cpu": [("plain", "convpool_cnn_c_small", {"width": 0.125}), ("residual", "resnet_cifar_small", {"width": 0.5})],
    "smoke": [("plain", "tiny_cnn", {}), ("residual", "resnet_cifar_small", {"width": 0.5})],
}
#: the one net of Tables 1 and 2 per preset: (model, model_opts)
ONE_ARCH = {"full": ("vgg16", {}), "cpu": ("convpool_cnn_c_small", {"width": 0.125}), "smoke": ("tiny_cnn", {})}


def method_opts(method: str, batch: int, model_opts: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A method's options in the paper's setting (PWS γ = 1e-3, MABN's batch sizes, GN groups scaled by width)."""
    if method == "pws":
        return {"gamma": 1e-3}
    if method == "mabn":
        return {"batch_size": batch, "real_batch_size": max(batch, 32)}
    if method == "gn" and model_opts and "width" in model_opts:
        # width-scaled model: scale GN's 32 groups with the width so that a group holds as many channels as in the
        # full-width net (ConvPool-C at width 0.125: 12/24 channels in 4 groups = 3/6 per group, as 96/192 in 32).
        # With 32 groups every channel would be its own group, which before global pooling erases the class signal.
        return {"groups": max(1, round(32 * float(model_opts["width"])))}
    return {}


def grid(axes: Mapping[str, Sequence[Any]], run: Callable[..., RunSpec]) -> list[RunSpec]:
    """``run(**point)`` for every point of the product of ``axes`` (name → values; the last axis varies fastest)."""
    names = list(axes)
    return [run(**dict(zip(names, point))) for point in itertools.product(*axes.values())]


# ---------------------------------------------------------------------------------------------- the table
@dataclass
class Context:
    """What a summary (and a table's ``extra`` hook) sees: the preset, the runs, their records, the aggregated cells
    (:func:`pwsconv.experiments.paper.aggregate`), the output directory; values put in ``extra`` are returned in
    ``reproduce``'s result."""
    preset: str
    runs: list[RunSpec]
    records: list[SweepRecord]
    agg: list[dict[str, Any]]
    out_dir: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Curves:
    """``curves.png``: training curves of the first seed's runs (``select`` filters them), one panel per
    ``group_by`` value, one line per ``line_by`` value."""
    title: str
    group_by: str | Callable[[SweepRecord], str]
    line_by: str = "method"
    select: Callable[[SweepRecord], bool] | None = None

    @property
    def key(self) -> str:
        return "curves"


@dataclass(frozen=True)
class ErrVs:
    """``err_vs_<x>.png``: mean test error vs the label ``x`` (log scale), one line per ``line`` value, one panel
    per ``panel`` value, over the cells ``select`` keeps."""
    x: str
    title: str
    panel: str | None = None
    line: str = "method"
    select: Callable[[dict[str, Any]], bool] | None = None

    @property
    def key(self) -> str:
        return f"err_vs_{self.x.lower()}"


@dataclass(frozen=True)
class Table:
    """One experiment of ``pwsconv reproduce NAME``, declared by one file of :mod:`pwsconv.experiments.tables`."""
    name: str
    title: str
    sizes: Mapping[str, Size]                                # preset → size (its ``seeds`` is the default count)
    runs: Callable[[str, Sequence[int]], list[RunSpec]]      # (preset, seeds) → the grid
    paper: Any                                               # the paper's numbers
    summary: Callable[[Context], str]                        # → the Markdown table(s) of results.md
    plots: Sequence[Curves | ErrVs] = ()                     # in the order results.md lists them
    extra: Callable[[Context], dict[str, str]] | None = None  # measures more (into ctx.extra), → {key: file written}


# ---------------------------------------------------------------------------------------------- Markdown
def paper_value(v: float | None) -> str:
    """A paper number as shown: "—" for none, "NaN" for a collapse, else 2 decimals."""
    if v is None:
        return "—"
    return "NaN" if math.isnan(v) else f"{v:.2f}"


def md_table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
