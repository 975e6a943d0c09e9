"""Training and evaluating a detector: a thin task on the engine's pieces.

    from pwsconv.detection.train import DetConfig, train_detector
    res = train_detector(DetConfig(model="ssd_vgg16", method="pws", method_opts={"gamma": 1e-3}, dataset="voc",
                                   data_root="data/", batch_size=8, lr=1e-2, epochs=240, milestones=[90, 170],
                                   out_dir="runs/voc_pws_b8"))
    res.status, res.metrics["mAP"]          # "ok" | "nan" (collapsed), VOC07 mAP (%)

Each step is the one training step, :func:`pwsconv.train.step.train_step`, with the task's loss
(:func:`detection_loss`: a detector takes lists of images *and* targets and returns a dict of losses) and gradient
clipping in its ``before_step``. The loop around it is still this module's own (the engine's loop is a classifier's:
accuracy sums, ``evaluate`` by CE/accuracy, data from ``load_dataset``, MultiStepLR; a detector is scored by mAP over
the whole set and warms its LR up); it reuses the engine's pieces: torchrun/DDP setup
(:mod:`pwsconv.train.distributed`), atomic checkpoints with verified loads and RNG states
(:mod:`pwsconv.train.checkpoint`), the run-directory lock and checks (:mod:`pwsconv.train.rundir`), the metrics log
(:class:`~pwsconv.train.metrics.MetricsLog`), :class:`~pwsconv.train.engine.RunResult` (``result.json``),
``param_groups`` (no weight decay on PWS's α), and the seeded, resumable, sharded loader of
:mod:`pwsconv.data.streaming`.

Behaviour as the engine: SGD + step LR (×``lr_decay`` at ``milestones`` epochs) with an optional linear warm-up,
a checkpoint every ``ckpt_every`` steps and at every epoch end holding everything needed to continue bit-exactly
(model, optimizer, RNG, position in the epoch); ``resume=True`` continues from it; a non-finite loss or weight ends the
run as ``status="nan"`` with NaN mAP (the paper's tables report collapses as NaN). ``batch_size`` is the global batch.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from ..optim import param_groups
from ..config import ConfigError, check_method_opts
from ..train import distributed as D
from ..train.checkpoint import atomic_save, atomic_write_text, dumps, load_checkpoint, rng_state, set_rng_state
from ..train.engine import RunResult, check_device, resolve_device
from ..train.metrics import MetricsLog
from ..train.rundir import check_output_dir, lock_run_dir, remove_stale_temps
from ..train.step import train_step

__all__ = ["DetConfig", "train_detector", "detection_loss", "DET_CHECKPOINT_FORMAT", "DATASETS"]

DET_CHECKPOINT_FORMAT = "pwsconv-detection-checkpoint"
DATASETS = ("voc", "coco")
NAN = float("nan")
#: fields that do not change what a run computes (a finished run with other values here is the same run)
COSMETIC = frozenset({"progress", "out_dir", "name", "device", "data_root", "num_workers", "num_threads",
                      "ckpt_every", "log_every", "eval_batch_size"})


@dataclass
class DetConfig:
    """One detection run (YAML-able; the sweep writes it to ``config.yaml``)."""

    model: str = "ssd_vgg16"                  # pwsconv.detection.DETECTORS
    method: str = "pws"
    method_opts: dict[str, Any] = field(default_factory=dict)
    model_opts: dict[str, Any] = field(default_factory=dict)   # passed to torchvision's SSD / MaskRCNN
    size: int | None = None                  # SSD input size (paper 320) / R-CNN min_size (800)
    weights: str | None = None               # R-CNN: a local ImageNet ResNet-50 state_dict (Table 3)
    dataset: str = "voc"                     # "voc" | "coco"
    data_root: str | None = None             # VOC: the directory holding VOCdevkit/; COCO: holding train2017/ etc.
    train_sets: Any = "07+12"                # VOC: "07+12" or [[year, image_set], ...]; COCO: split name
    test_sets: Any = "07test"                # VOC: "07test" or a list; COCO: "val2017"
    classes: list[str] | None = None         # VOC class names (default the 20 VOC classes)
    masks: bool = False                      # train and evaluate masks (Mask R-CNN)
    limit: int | None = None                 # first images of the training set (quick runs)
    test_limit: int | None = None
    epochs: int = 240
    max_steps: int | None = None
    batch_size: int = 8                      # global
    eval_batch_size: int = 8
    lr: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: list[int] = field(default_factory=list)
    lr_decay: float = 0.1
    warmup_steps: int = 0                    # linear warm-up from warmup_factor·lr (mmdetection: 500 steps, 1/1000)
    warmup_factor: float = 0.001
    grad_clip: float | None = None           # max gradient norm (None: none, as the paper)
    eval_every: int = 0                      # also evaluate every this many epochs (0: only at the end)
    seed: int = 0
    device: str = "auto"
    amp: str | None = None                   # None | "bf16"
    num_workers: int = 4
    num_threads: int | None = None
    out_dir: str = "runs/detection"
    name: str | None = None
    ckpt_every: int = 500
    log_every: int = 20
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("train_sets", "test_sets"):
            if isinstance(d[k], (list, tuple)):
                d[k] = [list(x) if isinstance(x, (list, tuple)) else x for x in d[k]]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DetConfig":
        names = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown detection config key(s) {unknown}")
        return cls(**dict(d)).validate()

    @property
    def run_name(self) -> str:
        return self.name or os.path.basename(os.path.normpath(self.out_dir))

    def validate(self) -> "DetConfig":
        from ..methods import available_methods
        from .models import DETECTORS

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(self.model in DETECTORS, f"unknown detector {self.model!r}; choose one of {', '.join(DETECTORS)}")
        need(self.method in available_methods(), f"unknown method {self.method!r}; choose one of "
                                                 f"{', '.join(available_methods())}")
        check_method_opts(self.method, self.method_opts)   # against the method's declarations, before any work
        need(self.dataset in DATASETS, f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        need(isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(isinstance(self.batch_size, int) and self.batch_size >= 1, f"batch_size must be ≥ 1, got {self.batch_size}")
        need(isinstance(self.epochs, int) and self.epochs >= 1, f"epochs must be ≥ 1, got {self.epochs}")
        need(self.max_steps is None or self.max_steps >= 1, f"max_steps must be ≥ 1 or null, got {self.max_steps}")
        need(list(self.milestones) == sorted(set(self.milestones)) and all(m >= 1 for m in self.milestones),
             f"milestones must be strictly increasing epochs ≥ 1, got {self.milestones}")
        need(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        need(self.weight_decay >= 0, f"weight_decay must be ≥ 0, got {self.weight_decay}")
        need(self.warmup_steps >= 0 and 0 < self.warmup_factor <= 1, "warmup_steps ≥ 0 and warmup_factor in (0, 1]")
        need(self.amp in (None, "bf16"), f"amp must be null or 'bf16', got {self.amp!r}")
        need(self.num_workers >= 0, f"num_workers must be ≥ 0, got {self.num_workers}")
        need(self.ckpt_every >= 0 and self.log_every >= 1 and self.eval_every >= 0,
             "ckpt_every ≥ 0, log_every ≥ 1, eval_every ≥ 0")
        need(self.size is None or (isinstance(self.size, int) and self.size >= 32), f"size must be ≥ 32, got {self.size}")
        need(not self.masks or self.model.startswith("maskrcnn"), "masks: true needs a maskrcnn_* model")
        need(self.weights is None or self.model.endswith("_fpn"), "weights is for the R-CNN models (SSD: from scratch)")
        if self.weights is not None:
            need(os.path.isfile(os.path.expanduser(self.weights)), f"weights {self.weights}: file not found")
        check_device(self.device)
        return self


# --------------------------------------------------------------------------------------------------- helpers
def detection_loss(model: nn.Module, images: Any, targets: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The detection task's loss for :func:`pwsconv.train.step.train_step`: torchvision's detectors return a dict
    of losses in training mode; their sum is minimized. Returns (the sum, the dict)."""
    losses = model(images, targets)
    return sum(losses.values()), losses


def _lr_at(cfg: DetConfig, epoch: int, step: int) -> float:
    lr = cfg.lr * cfg.lr_decay ** sum(1 for m in cfg.milestones if epoch >= m)
    if cfg.warmup_steps and step < cfg.warmup_steps:
        a = step / cfg.warmup_steps
        lr *= cfg.warmup_factor * (1 - a) + a
    return lr


def _same(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    keys = sorted((set(a) | set(b)) - COSMETIC - {"epochs", "max_steps"})
    return [f"{k} {a.get(k)!r} → {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


_COLUMNS = ("epoch", "step", "lr", "train_loss", "mAP", "AP", "AP50", "AP75", "segm_AP", "images_per_s",
            "epoch_time", "wall_time", "status")


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


# ------------------------------------------------------------------------------------------------------- run
def train_detector(config: DetConfig | Mapping[str, Any], *, resume: bool = False,
                   on_step: Callable[[int], None] | None = None) -> RunResult:
    """Train and evaluate one detector (see the module docstring); returns its :class:`RunResult` with metrics
    ``mAP`` (VOC07, %) or ``AP``/``AP50``/``AP75`` (COCO, %; ``segm_*`` with masks), ``train_loss``,
    ``images_per_s``. ``resume``: continue the run in ``out_dir`` (return at once if it finished)."""
    cfg = config if isinstance(config, DetConfig) else DetConfig.from_dict(config)
    cfg.validate()
    out_dir = os.path.abspath(cfg.out_dir)
    try:
        check_output_dir(out_dir)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    device_type = resolve_device(cfg.device).type
    dist = D.setup_distributed(device_type)
    threads = torch.get_num_threads()
    try:
        if cfg.batch_size % dist.world_size:
            raise ConfigError(f"batch_size {cfg.batch_size} must be divisible by the {dist.world_size} processes")
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        device = resolve_device(cfg.device, dist.local_rank)
        with lock_run_dir(out_dir) if dist.is_main else contextlib.nullcontext():
            return _run(cfg, out_dir, dist, device, resume, on_step)
    finally:
        torch.set_num_threads(threads)
        D.cleanup_distributed(dist)


def _run(cfg: DetConfig, out_dir: str, dist: D.DistInfo, device: torch.device, resume: bool,
         on_step: Callable[[int], None] | None) -> RunResult:
    from .data import DetectionLoader, eval_transform, num_classes_of, rcnn_train_transform, ssd_train_transform
    from .evaluate import evaluate_detector
    from .models import build_detector

    paths = {k: os.path.join(out_dir, f) for k, f in (("config", "config.yaml"), ("metrics_csv", "metrics.csv"),
                                                       ("metrics_jsonl", "metrics.jsonl"),
                                                       ("checkpoint", "checkpoint.pt"), ("result", "result.json"))}
    ckpt = None
    if resume and os.path.isfile(paths["result"]) and not os.path.isfile(paths["checkpoint"]):
        res = RunResult.load(out_dir)
        diff = _same(res.config, cfg.to_dict())
        if diff:
            raise ConfigError(f"cannot resume {cfg.out_dir}: it holds a finished run with other settings ("
                              + "; ".join(diff) + ")")
        return res
    if resume and os.path.isfile(paths["checkpoint"]):
        ckpt = load_checkpoint(paths["checkpoint"], formats=(DET_CHECKPOINT_FORMAT,))
        diff = _same(ckpt["config"], cfg.to_dict())
        if diff:
            raise ConfigError(f"cannot resume {cfg.out_dir}: the config differs from the checkpoint's in "
                              + "; ".join(diff))
    elif os.path.isdir(out_dir) and any(os.path.isfile(p) for p in paths.values()):
        if not resume:
            raise ConfigError(f"output directory {cfg.out_dir} already holds a run; resume it or choose another")

    # -- data and model (before anything is written)
    train_ds, test_ds, gt, protocol = _datasets(cfg)
    is_ssd = cfg.model.startswith("ssd")
    common = dict(num_workers=cfg.num_workers, seed=cfg.seed, device=device, rank=dist.rank,
                  world_size=dist.world_size)
    train_loader = DetectionLoader(train_ds, ssd_train_transform() if is_ssd else rcnn_train_transform(),
                                   cfg.batch_size, train=True, **common)
    test_loader = DetectionLoader(test_ds, eval_transform(), cfg.eval_batch_size, train=False, **common)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ConfigError(f"batch_size {cfg.batch_size} is larger than the training set ({len(train_ds)} images)")
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    torch.manual_seed(cfg.seed)
    model = build_detector(cfg.model, cfg.method, num_classes=num_classes_of(train_ds), size=cfg.size,
                           method_opts=cfg.method_opts, weights=cfg.weights, **dict(cfg.model_opts)).to(device)
    opt = torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum)
    epoch = batch = step = 0
    wall_before, loss_sum, loss_n, status = 0.0, 0.0, 0, "running"
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        epoch, batch, step = int(ckpt["epoch"]), int(ckpt["batch"]), int(ckpt["step"])
        loss_sum, loss_n = float(ckpt["loss_sum"]), int(ckpt["loss_n"])
        wall_before, status = float(ckpt["wall_time"]), ckpt["status"]
        if len(ckpt["rng"]) == dist.world_size:
            set_rng_state(ckpt["rng"][dist.rank])
    raw = model
    if dist.enabled:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    max_steps = min(cfg.epochs * steps_per_epoch, cfg.max_steps or 10**18)
    t_start = time.perf_counter()

    def wall() -> float:
        return wall_before + time.perf_counter() - t_start

    def save() -> None:
        rngs = [rng_state()]
        if dist.enabled:
            g: list[Any] = [None] * dist.world_size
            torch.distributed.all_gather_object(g, rngs[0])
            rngs = g
        if dist.is_main:
            atomic_save({"format": DET_CHECKPOINT_FORMAT, "version": 1, "config": cfg.to_dict(),
                         "model": raw.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch, "batch": batch,
                         "step": step, "loss_sum": loss_sum, "loss_n": loss_n, "wall_time": wall(),
                         "status": status, "rng": rngs, "world_size": dist.world_size}, paths["checkpoint"])

    def evaluate() -> dict[str, Any]:
        return evaluate_detector(raw, test_loader, gt, protocol=protocol, masks=cfg.masks,
                                 progress=cfg.progress and dist.is_main)

    D.barrier(dist)
    if dist.is_main:
        os.makedirs(out_dir, exist_ok=True)
        remove_stale_temps(out_dir)
        import yaml

        atomic_write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), paths["config"])
    log = MetricsLog(out_dir, enabled=dist.is_main, resume_step=step if ckpt is not None else None, columns=_COLUMNS)
    show = cfg.progress and dist.is_main
    if show:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            show = False
    final: dict[str, Any] = {}
    amp = torch.bfloat16 if cfg.amp == "bf16" else None

    def clip() -> None:
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)

    while status == "running" and step < max_steps:
        train_loader.set_epoch(epoch)
        if batch:
            train_loader.load_state_dict({"epoch": epoch, "batch": batch})
        model.train()
        seg_t0, seg_images = time.perf_counter(), 0
        bar = tqdm(total=steps_per_epoch, initial=batch, leave=False, dynamic_ncols=True,
                   desc=f"{cfg.run_name} epoch {epoch + 1}/{cfg.epochs}") if show else None
        collapsed = False
        for i, (images, targets) in enumerate(train_loader, start=batch):
            lr = _lr_at(cfg, epoch, step)
            for g in opt.param_groups:
                g["lr"] = lr
            loss, _ = train_step(model, opt, images, targets, loss_fn=detection_loss, amp=amp,
                                 device_type=device.type, before_step=clip)
            step, batch = step + 1, i + 1
            lv = float(loss.detach())
            loss_sum, loss_n = loss_sum + lv * len(images), loss_n + len(images)
            seg_images += len(images)
            if on_step is not None:
                on_step(step)
            last = batch == steps_per_epoch or step >= max_steps
            if step % cfg.log_every == 0 or last:
                bad = torch.tensor([0.0 if math.isfinite(loss_sum) and all(
                    bool(torch.isfinite(p).all()) for p in raw.parameters()) else 1.0])
                if D.all_reduce_sum(bad, dist).item() > 0:
                    collapsed = True
                    break
                if bar is not None:
                    ips = seg_images * dist.world_size / max(time.perf_counter() - seg_t0, 1e-9)
                    bar.set_postfix(loss=f"{loss_sum / max(loss_n, 1):.3f}", img_s=f"{ips:.1f}", lr=f"{lr:.3g}",
                                    refresh=False)
            if bar is not None:
                bar.update(1)
            if step >= max_steps:
                break
            if cfg.ckpt_every and step % cfg.ckpt_every == 0 and not last:
                save()
        if bar is not None:
            bar.close()
        seg_time = time.perf_counter() - seg_t0
        ips = seg_images * dist.world_size / max(seg_time, 1e-9)
        tot = D.all_reduce_sum(torch.tensor([loss_sum, float(loss_n)], dtype=torch.float64), dist).tolist()
        row: dict[str, Any] = {"epoch": epoch + batch / steps_per_epoch, "step": step, "lr": _lr_at(cfg, epoch, step - 1),
                               "train_loss": tot[0] / max(tot[1], 1), "images_per_s": ips, "epoch_time": seg_time}
        if collapsed:
            status = "nan"
            final = {"train_loss": NAN, "images_per_s": ips, **_nan_metrics(protocol, cfg.masks)}
            row.update(final)
            row.update({"wall_time": wall(), "status": status})
            log.log(row)
            save()
            if show:
                tqdm.write(f"{cfg.run_name}: collapsed (non-finite loss or weights) at step {step}")
            break
        if batch == steps_per_epoch:
            epoch, batch, loss_sum, loss_n = epoch + 1, 0, 0.0, 0
        done = step >= max_steps or epoch >= cfg.epochs
        if done or (cfg.eval_every and batch == 0 and epoch % cfg.eval_every == 0):
            ev = evaluate()
            row.update({k: v for k, v in ev.items() if k != "per_class"})
            if "per_class" in ev:
                row["per_class"] = ev["per_class"]
        status = "ok" if done else "running"
        row.update({"wall_time": wall(), "status": status})
        log.log(row)
        save()
        final = {k: v for k, v in row.items()
                 if k not in ("epoch", "step", "lr", "epoch_time", "wall_time", "status", "per_class")}
        if show:
            score = (f" | mAP {row['mAP']:.2f}" if "mAP" in row else "") + (f" | AP {row['AP']:.2f}" if "AP" in row
                                                                            else "")
            tqdm.write(f"{cfg.run_name} epoch {epoch if batch == 0 else epoch + 1}: loss {row['train_loss']:.4f}"
                       f"{score} | {ips:.1f} img/s | lr {row['lr']:.3g}")
    D.barrier(dist)
    if ckpt is not None and not final:   # resumed a run that had already finished or collapsed
        if os.path.isfile(paths["result"]):
            return RunResult.load(out_dir)
        final = {k: v for k, v in (log.rows[-1] if log.rows else {}).items()
                 if k not in ("epoch", "step", "lr", "epoch_time", "wall_time", "status", "per_class")}
    res = RunResult(status=status, metrics=final, epoch=epoch + batch / steps_per_epoch, step=step,
                    wall_time=wall(), out_dir=out_dir, config=cfg.to_dict(), paths=paths)
    if dist.is_main:
        atomic_write_text(dumps(res.to_dict()) + "\n", paths["result"])
    return res


def _nan_metrics(protocol: str, masks: bool) -> dict[str, float]:
    if protocol == "voc07":
        return {"mAP": NAN, "AP50_101": NAN}
    keys = ["AP", "AP50", "AP75"] + (["segm_AP", "segm_AP50", "segm_AP75"] if masks else [])
    return {k: NAN for k in keys}
