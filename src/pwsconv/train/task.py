"""What the training loop needs to know about one kind of run: a :class:`Task`.

The engine's loop (:func:`pwsconv.train.engine.run_task`) owns everything every run shares — epochs, the LR
schedule (SGD, ×``lr_decay`` at ``milestones`` epochs, an optional linear warm-up), step-exact checkpoints and
resume, the metrics log, the evaluation cadence, collapse detection, progress, ``result.json``. A task says only
what differs between kinds of runs:

- its data: :meth:`Task.setup` sets ``train_loader`` (a seeded loader: ``len``, ``set_epoch``, ``load_state_dict``);
- its network: :meth:`Task.build` (called under the run's seed);
- how a batch becomes a loss: :meth:`Task.loss_fn` ``(model, x, y) -> (loss, output)`` (a detector sums its loss
  dict), with the optional hooks of :func:`pwsconv.train.step.train_step` — ``after_forward(loss, output)`` between
  forward and backward (a probe records there) and ``before_step()`` between backward and the update (clipping);
- what a batch adds to the epoch's running sums (:meth:`Task.batch_sums`: loss·n, correct, n);
- how a model is scored: :meth:`Task.evaluate` (every ``eval_every`` epochs and at the end) and how its metrics
  become ``result.json``'s metrics and a ``metrics.csv`` row.

:class:`ClassificationTask` is ``pwsconv train``'s (cross-entropy, accuracy); ``pwsconv.detection.train`` and the
variance probe (``pwsconv.diagnostics``) define theirs.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..config import ConfigError, TrainConfig
from .checkpoint import CHECKPOINT_FORMAT, check_model_spec
from .metrics import COLUMNS
from .result import FINAL_METRICS, NAN
from .step import classification_loss

__all__ = ["Task", "ClassificationTask", "to_device"]


def to_device(obj: Any, device: torch.device) -> Any:
    """Tensors — alone or in lists, tuples and dicts (a detector's images and targets) — moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


class Task:
    """One kind of training run, for the engine's loop. Subclasses set the attributes and override the methods that
    differ; the defaults are a classifier's where one applies.

    Attributes:
        cfg: the run's config (a :class:`~pwsconv.config.TrainConfig` or a subclass that adds the task's fields).
        checkpoint_format: the ``format`` of its checkpoints (another task's checkpoint is refused on resume).
        columns: the columns of ``metrics.csv`` (``metrics.jsonl`` holds every key of a row).
        eval_every: evaluate every this many epochs (0: only at the end of the run).
        warmup_steps, warmup_factor: the LR rises linearly from ``warmup_factor``·LR to the LR over the first
            ``warmup_steps`` steps (0: no warm-up).
        files: write the run directory (config, metrics, checkpoints, ``result.json``); ``False``: an in-memory run
            of this process alone (no torchrun/DDP).
        check_weights: a non-finite weight is a collapse (``False``: only a non-finite loss is).
        after_forward, before_step: the training step's hooks (None: none).
    """

    checkpoint_format: str = CHECKPOINT_FORMAT
    columns: tuple[str, ...] = COLUMNS
    eval_every: int = 1
    warmup_steps: int = 0
    warmup_factor: float = 1.0
    files: bool = True
    check_weights: bool = True
    rate_unit: str = "img"   # what batch_sums' third number counts (the progress bar shows it per second)
    after_forward: Callable[[torch.Tensor, Any], bool | None] | None = None
    before_step: Callable[[], None] | None = None
    train_loader: Any = None

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    # ------------------------------------------------------------------ setup
    def setup(self, dist: Any, device: torch.device) -> None:
        """Load the data and set ``train_loader`` — before anything is written (missing data leave no trace)."""
        raise NotImplementedError

    def build(self) -> nn.Module:
        """The network (on the CPU; the engine seeds the RNGs before and moves it to the device after)."""
        raise NotImplementedError

    def spec(self) -> dict[str, Any] | None:
        """What rebuilds the network without the data (a checkpoint's ``model_spec``); None: nothing."""
        return None

    def check_spec(self, spec: Any, path: str) -> None:
        """Refuse a checkpoint's damaged ``model_spec`` (one line naming ``path``)."""
        check_model_spec(spec, path)

    def prepare(self, model: nn.Module) -> None:
        """The method's acceleration of the built network (on its device) before it trains (same values and
        gradients; BENCHMARKS.md), with the options its config fields declare."""
        from ..config import prepare_options
        from ..methods import prepare_for_training

        prepare_for_training(model, self.cfg.method, **prepare_options(self.cfg))

    def bind(self, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        """Called with the network (unwrapped) and its optimizer before the first step (hooks attach here)."""

    # ------------------------------------------------------------------ the step
    def loss_fn(self, model: nn.Module, x: Any, y: Any) -> tuple[torch.Tensor, Any]:
        """How a batch becomes the loss to minimize: ``(loss, output)``."""
        return classification_loss(model, x, y)

    def batch_sums(self, loss: torch.Tensor, out: Any, x: Any, y: Any) -> torch.Tensor:
        """What a batch adds to the epoch's running sums, as 3 float64 numbers on the loss's device: loss·n, correct
        predictions, n (kept on the device: no host sync per step)."""
        n = y.numel()
        return torch.stack([loss.detach().double() * n, (out.argmax(1) == y).sum().double(),
                            loss.new_full((), n, dtype=torch.float64)])

    # ------------------------------------------------------------------ scoring
    def evaluate(self, model: nn.Module, device: torch.device, distributed: bool) -> tuple[dict[str, Any], str]:
        """Score the network (unwrapped, any mode: the task sets it): ``(metrics, why)`` where ``why`` names a
        collapse the scores show ("" when there is none)."""
        return {}, ""

    def metrics(self, train: list[float], ev: dict[str, Any] | None, ips: float) -> dict[str, float]:
        """``result.json``'s metrics from the epoch's summed ``train`` sums, the evaluation (None: not evaluated this
        epoch) and the training images per second."""
        out = {"train_loss": train[0] / train[2], "train_acc": train[1] / train[2]}
        out.update({k: NAN for k in FINAL_METRICS if k not in out and k != "images_per_s"})
        out["images_per_s"] = ips
        out.update(ev or {})
        return out

    def nan_metrics(self, ips: float) -> dict[str, float]:
        """The metrics of a collapsed run (NaN)."""
        return {**{k: NAN for k in FINAL_METRICS}, "images_per_s": ips}

    def row(self, metrics: dict[str, Any], ev: dict[str, Any] | None, epoch_time: float) -> dict[str, Any]:
        """A ``metrics.csv`` row's values between ``lr`` and ``wall_time``."""
        return {**{k: metrics.get(k, NAN) for k in FINAL_METRICS}, "epoch_time": epoch_time}

    def metrics_from_row(self, row: dict[str, Any]) -> dict[str, float]:
        """The metrics of a finished run whose ``result.json`` is gone, from its last ``metrics.jsonl`` row."""
        return {k: float(row[k]) if row.get(k) is not None else NAN for k in FINAL_METRICS}

    def summary(self, metrics: dict[str, Any]) -> str:
        """The progress line's scores."""
        return f"loss {metrics['train_loss']:.4f}"


class ClassificationTask(Task):
    """``pwsconv train``: an image classifier (:mod:`pwsconv.models`) on a :mod:`pwsconv.data` set, trained by
    cross-entropy and scored by the loss and (top-1, top-5) accuracy on each evaluation split every epoch."""

    def setup(self, dist: Any, device: torch.device) -> None:
        from ..data import Loader, load_dataset
        from ..data.device import resident
        from ..data.streaming import STREAMING_DATASETS, build_streaming
        from .devices import _check_model_fits

        cfg = self.cfg
        if cfg.dataset in STREAMING_DATASETS:   # too big for memory: decoded by worker processes as it trains
            self.bundle, self.train_loader, self.eval_loaders = build_streaming(cfg, dist, device)
            n = self.train_loader.num_samples
        else:
            bundle = load_dataset(cfg.dataset, cfg.data_root, val_fraction=cfg.val_fraction, seed=cfg.seed,
                                  limit=cfg.limit, test_limit=cfg.test_limit)
            # on a GPU (auto: if it fits) the images live there: batches are gathered and augmented without the host
            bundle, self.data_on_device = resident(bundle, device, cfg.data_on_device)
            self.bundle = bundle
            common = dict(mean=bundle.mean, std=bundle.std, device=device, channels_last=cfg.channels_last,
                          rank=dist.rank, world_size=dist.world_size)
            self.train_loader = Loader(bundle.train, cfg.batch_size, shuffle=True,
                                       augment=bundle.augment if cfg.augment else None, drop_last=cfg.drop_last,
                                       generator=torch.Generator().manual_seed(cfg.seed), **common)
            n = len(bundle.train.y)
            self.eval_loaders = {split: Loader(getattr(bundle, split), cfg.eval_batch_size, shuffle=False,
                                               augment=None, drop_last=False, **common)
                                 for split in ("val", "test") if getattr(bundle, split, None) is not None}
        if len(self.train_loader) == 0:
            raise ConfigError(f"batch_size {cfg.batch_size} is larger than the training set ({n} images) with "
                              "drop_last: true")
        _check_model_fits(self._build, cfg, device)   # too large for this machine: one line, nothing allocated

    def _build(self) -> nn.Module:
        from ..models import build_model

        cfg, bundle = self.cfg, self.bundle
        return build_model(cfg.model, cfg.method, num_classes=bundle.num_classes, in_channels=bundle.in_channels,
                           **cfg.model_opts, method_opts=dict(cfg.method_opts))

    def build(self) -> nn.Module:
        from .devices import _is_oom

        cfg = self.cfg
        try:
            return self._build()
        except (TypeError, ValueError) as e:   # e.g. a depth the builder does not take: before anything is written
            raise ConfigError(f"cannot build model {cfg.model!r} with model_opts {dict(cfg.model_opts)} and "
                              f"method_opts {dict(cfg.method_opts)}: {' '.join(str(e).split())}") from None
        except (MemoryError, RuntimeError) as e:   # the estimate could not be made, or was too low
            if not isinstance(e, MemoryError) and not _is_oom(e):
                raise
            raise ConfigError(f"model {cfg.model!r} with model_opts {dict(cfg.model_opts)} does not fit in memory: "
                              f"{' '.join(str(e).split())[:160]}") from None

    def spec(self) -> dict[str, Any]:
        from .spec import model_spec

        return model_spec(self.cfg, self.bundle)

    def evaluate(self, model: nn.Module, device: torch.device, distributed: bool) -> tuple[dict[str, Any], str]:
        from .evaluate import evaluate

        out: dict[str, Any] = {}
        for split, loader in self.eval_loaders.items():
            ev = evaluate(model, loader, device=device, amp=self.cfg.amp, distributed=distributed)
            if ev["nonfinite"] or ev["loss"] != ev["loss"] or abs(ev["loss"]) == float("inf"):
                # finite weights whose outputs overflow (a very large LR): a collapse, not an accuracy
                return out, f"non-finite outputs on the {split} set"
            out[f"{split}_loss"], out[f"{split}_acc"] = ev["loss"], ev["acc"]
            if ev["acc5"] == ev["acc5"]:   # top-5 (ImageNet, Table 5): in result.json, not in metrics.csv
                out[f"{split}_acc5"] = ev["acc5"]
        return out, ""

    def summary(self, metrics: dict[str, Any]) -> str:
        return (f"loss {metrics['train_loss']:.4f} acc {metrics['train_acc']:.4f} | "
                + (f"val acc {metrics['val_acc']:.4f} | " if "val" in self.eval_loaders else "")
                + f"test loss {metrics['test_loss']:.4f} acc {metrics['test_acc']:.4f}")
