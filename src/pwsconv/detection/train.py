"""Training and evaluating a detector: a task of the engine's one training loop.

    from pwsconv.detection.train import DetConfig, train_detector
    res = train_detector(DetConfig(model="ssd_vgg16", method="pws", method_opts={"gamma": 1e-3}, dataset="voc",
                                   data_root="data/", batch_size=8, lr=1e-2, epochs=240, milestones=[90, 170],
                                   out_dir="runs/voc_pws_b8"))
    res.status, res.metrics["mAP"]          # "ok" | "nan" (collapsed), VOC07 mAP (%)

:class:`DetConfig` is :class:`~pwsconv.config.TrainConfig` with detection's defaults and its own fields (input
size, backbone weights, VOC/COCO splits, masks, warm-up, gradient clipping, evaluation cadence). A run is
:func:`pwsconv.train.engine.run_task` with a :class:`DetectionTask`: the engine's loop — SGD + step LR (×``lr_decay``
at ``milestones`` epochs) with the task's linear warm-up, a checkpoint every ``ckpt_every`` steps and at every epoch
end holding everything needed to continue bit-exactly, ``resume=True``, the metrics log, a non-finite loss or weight
ending the run as ``status="nan"`` with NaN mAP (the paper's tables report collapses as NaN), torchrun/DDP
(``batch_size`` is the global batch). Each step is the one training step,
:func:`pwsconv.train.step.train_step`, with the task's loss (:func:`detection_loss`: a detector takes lists of images
*and* targets and returns a dict of losses) and gradient clipping in its ``before_step``. The task scores a detector
by mAP over the whole test set (pycocotools; VOC07 or COCO) at the end of the run and every ``eval_every`` epochs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..config import ConfigError, TrainConfig, check_method_opts
from ..train.engine import RunResult, check_device, run_task
from ..train.spec import _config_diff
from ..train.task import Task

__all__ = ["DetConfig", "DetectionTask", "train_detector", "detection_loss", "DET_CHECKPOINT_FORMAT", "DATASETS"]

DET_CHECKPOINT_FORMAT = "pwsconv-detection-checkpoint"
DATASETS = ("voc", "coco")
NAN = float("nan")
#: metrics.csv's columns (metrics.jsonl rows also hold the evaluation's other keys, e.g. per-class AP)
_COLUMNS = ("epoch", "step", "lr", "train_loss", "mAP", "AP", "AP50", "AP75", "segm_AP", "images_per_s",
            "epoch_time", "wall_time", "status")
#: TrainConfig's options of a classifier's in-memory data, which a detection run does not use
_UNUSED = ("val_fraction", "augment", "drop_last", "data_on_device")


def _default(name: str, value: Any, role: str | None = None) -> Any:
    """TrainConfig's field ``name`` with detection's default (its description kept; ``role``: another role)."""
    meta = dict(TrainConfig.__dataclass_fields__[name].metadata)
    return field(default=value, metadata={**meta, "role": role or meta["role"]})


def _own(default: Any, help: str) -> Any:
    return field(default=default, metadata={"role": "identity", "group": "detection", "help": help})


@dataclass
class DetConfig(TrainConfig):
    """One detection run (YAML-able; the sweep writes it to ``config.yaml``): TrainConfig's fields — detection's
    defaults below — and detection's own."""

    model: str = _default("model", "ssd_vgg16")             # pwsconv.detection.DETECTORS
    dataset: str = _default("dataset", "voc")               # "voc" | "coco"
    epochs: int = _default("epochs", 240)
    batch_size: int = _default("batch_size", 8)
    eval_batch_size: int = _default("eval_batch_size", 8, role="cosmetic")   # mAP is over the whole set anyway
    lr: float = _default("lr", 1e-2)
    num_workers: int = _default("num_workers", 4)
    out_dir: str = _default("out_dir", "runs/detection")
    ckpt_every: int = _default("ckpt_every", 500)
    log_every: int = _default("log_every", 20)
    fuse_pws: bool = _default("fuse_pws", False)   # per-layer standardization, as before (true: faster, ≈ values)
    size: int | None = _own(None, "SSD input size (paper 320) / R-CNN min_size (800)")
    weights: str | None = _own(None, "R-CNN: a local ImageNet ResNet-50 state_dict (Table 3)")
    train_sets: Any = _own("07+12", "VOC: '07+12' or [[year, image_set], ...]; COCO: the split name")
    test_sets: Any = _own("07test", "VOC: '07test' or a list; COCO: 'val2017'")
    classes: list[str] | None = _own(None, "VOC class names (default the 20 VOC classes)")
    masks: bool = _own(False, "train and evaluate masks (Mask R-CNN)")
    warmup_steps: int = _own(0, "linear LR warm-up steps from warmup_factor·lr (mmdetection: 500, 1/1000)")
    warmup_factor: float = _own(0.001, "the warm-up's first LR factor")
    grad_clip: float | None = _own(None, "max gradient norm (null: none, as the paper)")
    eval_every: int = _own(0, "also evaluate every this many epochs (0: only at the end)")

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        for k in ("train_sets", "test_sets"):
            if isinstance(d[k], (list, tuple)):
                d[k] = [list(x) if isinstance(x, (list, tuple)) else x for x in d[k]]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, validate: bool = True) -> "DetConfig":
        if not isinstance(d, Mapping):
            raise ConfigError(f"a detection config must be a mapping of keys to values, got {type(d).__name__}")
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"unknown detection config key(s) {unknown}")
        cfg = cls(**dict(d))
        return cfg.validate() if validate else cfg

    def replace(self, **changes: Any) -> "DetConfig":
        """A validated copy with some fields changed."""
        return DetConfig.from_dict({**self.to_dict(), **changes})

    def validate(self, *, check_names: bool = True) -> "DetConfig":
        from ..methods import available_methods
        from .models import DETECTORS

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        for name in ("batch_size", "epochs", "num_workers"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool), f"{name} must be an integer, got {v!r}")
        super().validate(check_names=False)   # the shared fields: ranges, seed, device
        need(self.model in DETECTORS, f"unknown detector {self.model!r}; choose one of {', '.join(DETECTORS)}")
        need(self.method in available_methods(), f"unknown method {self.method!r}; choose one of "
                                                 f"{', '.join(available_methods())}")
        check_method_opts(self.method, self.method_opts)   # against the method's declarations, before any work
        need(self.dataset in DATASETS, f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        for f in dataclasses.fields(TrainConfig):
            if f.name in _UNUSED:
                need(getattr(self, f.name) == f.default, f"{f.name} is not used by detection runs (leave it out)")
        need(self.amp in (None, "bf16"), f"amp must be null or 'bf16', got {self.amp!r}")
        need(self.warmup_steps >= 0 and 0 < self.warmup_factor <= 1, "warmup_steps ≥ 0 and warmup_factor in (0, 1]")
        need(self.eval_every >= 0, f"eval_every must be ≥ 0, got {self.eval_every}")
        need(self.size is None or (isinstance(self.size, int) and self.size >= 32),
             f"size must be ≥ 32, got {self.size}")
        need(not self.masks or self.model.startswith("maskrcnn"), "masks: true needs a maskrcnn_* model")
        need(self.weights is None or self.model.endswith("_fpn"), "weights is for the R-CNN models (SSD: from scratch)")
        if self.weights is not None:
            need(os.path.isfile(os.path.expanduser(self.weights)), f"weights {self.weights}: file not found")
        check_device(self.device)
        return self


# --------------------------------------------------------------------------------------------------- the task
def detection_loss(model: nn.Module, images: Any, targets: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The detection task's loss for :func:`pwsconv.train.step.train_step`: torchvision's detectors return a dict
    of losses in training mode; their sum is minimized. Returns (the sum, the dict)."""
    losses = model(images, targets)
    return sum(losses.values()), losses


def _same(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """The settings in which two detection configs differ (length and cosmetic fields aside): "key old → new"."""
    return _config_diff(a, b, cls=DetConfig)


class DetectionTask(Task):
    """A detector (:mod:`pwsconv.detection.models`) on VOC or COCO (:mod:`pwsconv.detection.data`): the loss is the
    sum of the detector's loss dict, the score the test set's mAP
    (:func:`~pwsconv.detection.evaluate.evaluate_detector`)."""

    checkpoint_format = DET_CHECKPOINT_FORMAT
    columns = _COLUMNS
    cfg: DetConfig

    def __init__(self, cfg: DetConfig) -> None:
        super().__init__(cfg)
        self.eval_every, self.warmup_steps, self.warmup_factor = cfg.eval_every, cfg.warmup_steps, cfg.warmup_factor

    def setup(self, dist: Any, device: torch.device) -> None:
        from .data import DetectionLoader, eval_transform, num_classes_of, rcnn_train_transform, ssd_train_transform

        cfg = self.cfg
        train_ds, test_ds, self.gt, self.protocol = _datasets(cfg)
        common = dict(num_workers=cfg.num_workers, seed=cfg.seed, device=device, rank=dist.rank,
                      world_size=dist.world_size)
        self.train_loader = DetectionLoader(train_ds, ssd_train_transform() if cfg.model.startswith("ssd")
                                            else rcnn_train_transform(), cfg.batch_size, train=True, **common)
        self.test_loader = DetectionLoader(test_ds, eval_transform(), cfg.eval_batch_size, train=False, **common)
        if len(self.train_loader) == 0:
            raise ConfigError(f"batch_size {cfg.batch_size} is larger than the training set ({len(train_ds)} images)")
        self.num_classes, self.is_main = num_classes_of(train_ds), dist.is_main

    def build(self) -> nn.Module:
        from .models import build_detector

        cfg = self.cfg
        return build_detector(cfg.model, cfg.method, num_classes=self.num_classes, size=cfg.size,
                              method_opts=cfg.method_opts, weights=cfg.weights, **dict(cfg.model_opts))

    def spec(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"model": cfg.model, "method": cfg.method, "method_opts": dict(cfg.method_opts),
                "model_opts": dict(cfg.model_opts), "num_classes": self.num_classes, "size": cfg.size,
                "dataset": cfg.dataset}

    def check_spec(self, spec: Any, path: str) -> None:
        from ..train.checkpoint import CheckpointError

        if not isinstance(spec, dict) or not isinstance(spec.get("model"), str):
            raise CheckpointError(f"{path} has no usable model_spec (got {type(spec).__name__})")

    def bind(self, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        self.model = model

    def loss_fn(self, model: nn.Module, images: Any, targets: Any) -> tuple[torch.Tensor, Any]:
        return detection_loss(model, images, targets)

    def before_step(self) -> None:
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)

    def batch_sums(self, loss: torch.Tensor, out: Any, images: Any, targets: Any) -> torch.Tensor:
        n = len(images)
        return torch.stack([loss.detach().double() * n, loss.new_zeros((), dtype=torch.float64),
                            loss.new_full((), n, dtype=torch.float64)])

    def evaluate(self, model: nn.Module, device: torch.device, distributed: bool) -> tuple[dict[str, Any], str]:
        from .evaluate import evaluate_detector

        return evaluate_detector(model, self.test_loader, self.gt, protocol=self.protocol, masks=self.cfg.masks,
                                 progress=self.cfg.progress and self.is_main), ""

    def metrics(self, train: list[float], ev: dict[str, Any] | None, ips: float) -> dict[str, float]:
        return {"train_loss": train[0] / max(train[2], 1), "images_per_s": ips,
                **{k: v for k, v in (ev or {}).items() if k != "per_class"}}

    def nan_metrics(self, ips: float) -> dict[str, float]:
        if self.protocol == "voc07":
            keys = ["mAP", "AP50_101"]
        else:
            keys = ["AP", "AP50", "AP75"] + (["segm_AP", "segm_AP50", "segm_AP75"] if self.cfg.masks else [])
        return {"train_loss": NAN, "images_per_s": ips, **{k: NAN for k in keys}}

    def row(self, metrics: dict[str, Any], ev: dict[str, Any] | None, epoch_time: float) -> dict[str, Any]:
        head = ("train_loss", "images_per_s")
        return {**{k: metrics[k] for k in head}, "epoch_time": epoch_time,
                **{k: v for k, v in metrics.items() if k not in head},
                **({"per_class": ev["per_class"]} if ev and "per_class" in ev else {})}

    def metrics_from_row(self, row: dict[str, Any]) -> dict[str, float]:
        return {k: v for k, v in row.items()
                if k not in ("epoch", "step", "lr", "epoch_time", "wall_time", "status", "per_class")}

    def summary(self, metrics: dict[str, Any]) -> str:
        return f"loss {metrics['train_loss']:.4f}" + "".join(
            f" | {k} {metrics[k]:.2f}" for k in ("mAP", "AP") if k in metrics)


def train_detector(config: DetConfig | Mapping[str, Any], *, resume: bool = False,
                   on_step: Callable[[int], None] | None = None) -> RunResult:
    """Train and evaluate one detector (see the module docstring); returns its :class:`RunResult` with metrics
    ``mAP`` (VOC07, %) or ``AP``/``AP50``/``AP75`` (COCO, %; ``segm_*`` with masks), ``train_loss``,
    ``images_per_s``. ``resume``: continue the run in ``out_dir`` (return at once if it finished)."""
    raw = config.to_dict() if isinstance(config, DetConfig) else config
    return run_task(DetectionTask(DetConfig.from_dict(raw)), resume=resume, on_step=on_step)


# ------------------------------------------------------------------------------------------------------ data
def _datasets(cfg: DetConfig) -> tuple[Any, Any, Any, str]:
    from .data import VOC_CLASSES, coco_dataset, voc_dataset
    from .evaluate import coco_gt_from_voc

    if not cfg.data_root:
        raise ConfigError(f"dataset {cfg.dataset!r} needs data_root")
    if cfg.dataset == "voc":
        classes = tuple(cfg.classes) if cfg.classes else VOC_CLASSES
        tr = voc_dataset(cfg.data_root, _sets(cfg.train_sets), train=True, classes=classes)
        te = voc_dataset(cfg.data_root, _sets(cfg.test_sets), train=False, classes=classes)
        tr, te = _limit(tr, cfg.limit), _limit(te, cfg.test_limit)
        return tr, te, coco_gt_from_voc(te), "voc07"
    tr = coco_dataset(cfg.data_root, cfg.train_sets if isinstance(cfg.train_sets, str) and cfg.train_sets != "07+12"
                      else "train2017", train=True, masks=cfg.masks)
    te = coco_dataset(cfg.data_root, cfg.test_sets if isinstance(cfg.test_sets, str) and cfg.test_sets != "07test"
                      else "val2017", train=False, masks=cfg.masks)
    tr, te = _limit(tr, cfg.limit), _limit(te, cfg.test_limit)
    gt = te.coco
    if cfg.test_limit is not None:   # evaluate on the kept images only
        gt = _coco_subset(te)
    return tr, te, gt, "coco"


def _sets(s: Any) -> Any:
    return [tuple(x) for x in s] if isinstance(s, (list, tuple)) else s


def _limit(ds: Any, n: int | None) -> Any:
    if n is None:
        return ds
    if hasattr(ds, "keep"):           # COCOSet
        ds.keep = ds.keep[:n]
        return ds
    ds.offsets = [min(o, n) for o in ds.offsets]   # VOCSet: the first n images
    return ds


def _coco_subset(ds: Any) -> Any:
    from pycocotools.coco import COCO

    ids = {ds.ids[k] for k in ds.keep}
    src = ds.coco.dataset
    gt = COCO()
    gt.dataset = {"images": [i for i in src["images"] if i["id"] in ids],
                  "annotations": [a for a in src["annotations"] if a["image_id"] in ids],
                  "categories": src["categories"]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt
