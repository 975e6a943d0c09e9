"""The training loop (the only one in pwsconv): SGD + MultiStepLR, AMP, DDP, step-exact checkpoints, collapse = result.

    from pwsconv.config import TrainConfig
    from pwsconv.train import train
    result = train(TrainConfig(model="tiny_cnn", method="pws", lr=0.5, epochs=5, out_dir="runs/x"))
    result.status, result.metrics["test_acc"]          # "ok" | "nan", final test accuracy (NaN if collapsed)

Reading order: :func:`train` sets up a :class:`_Run` (data, model, optimizer, resume state) and calls its ``loop``,
whose every step is :func:`pwsconv.train.step.train_step`. Each epoch: the loader's order is fixed by (seed, epoch);
after every ``ckpt_every`` optimizer steps and at the end of every epoch a checkpoint is written atomically, holding
everything needed to continue bit-exactly (model, optimizer, scheduler, scaler, RNG states, position in the epoch, the
epoch's running sums). A resumed run restarts the loader in the same epoch at the first batch not yet consumed (the
loader's order and augmentation depend only on (seed, epoch)), so on CPU its final weights equal an uninterrupted
run's.

A non-finite loss or parameter (checked every ``log_every`` steps and at epoch ends), or a non-finite evaluation
output, ends the run with status ``"nan"`` and NaN metrics (a collapse is a result, not an exception). Helpers:
``devices``, ``evaluate``, ``spec`` (model spec, saved-config checks), ``result``."""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from ..optim import param_groups
from ..config import ConfigError, TrainConfig
from . import distributed as D
from .checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    atomic_save,
    check_training_state,
    atomic_write_text,
    dumps,
    load_checkpoint,
    load_scheduler_state,
    rng_state,
    scheduler_state,
    set_rng_state,
)
from .devices import (_AMP_DTYPES, DEVICE_TYPES, _available_memory, _check_model_fits, _grad_scaler,  # noqa: F401
                      _is_oom, check_device, resolve_device)
from .evaluate import evaluate
from .metrics import MetricsLog, read_metrics
from .result import FINAL_METRICS, NAN, RunDirError, RunResult
from .spec import (_COSMETIC_FIELDS, ConfigMismatchError, _as_config, _config_diff, _nonempty_dir,  # noqa: F401
                   _saved_configs, build_from_spec, model_spec)
from .rundir import check_output_dir, lock_run_dir, remove_stale_temps
from .step import train_step

__all__ = ["train", "evaluate", "RunResult", "RunDirError", "ConfigMismatchError", "build_from_spec", "model_spec",
           "resolve_device", "check_device", "FINAL_METRICS", "DEVICE_TYPES"]


def _prepare_model(model: nn.Module, cfg: TrainConfig) -> None:
    """The method's acceleration of a built network before it trains (same values and gradients; BENCHMARKS.md)."""
    from ..config import prepare_options
    from ..methods import prepare_for_training

    prepare_for_training(model, cfg.method, **prepare_options(cfg))


class _Run:
    """State of one training run: built by ``__init__``, advanced by :meth:`loop`."""

    def __init__(self, cfg: TrainConfig, dist: D.DistInfo, device: torch.device, resume: bool,
                 on_step: Callable[[int], None] | None) -> None:
        from ..data import Loader, load_dataset
        from ..models import build_model

        self.cfg, self.dist, self.device, self.on_step = cfg, dist, device, on_step
        self.out_dir = os.path.abspath(cfg.out_dir)
        self.paths = {k: os.path.join(self.out_dir, f) for k, f in (
            ("config", "config.yaml"), ("metrics_csv", "metrics.csv"), ("metrics_jsonl", "metrics.jsonl"),
            ("checkpoint", "checkpoint.pt"), ("result", "result.json"))}

        # -- the output directory: a new run never touches another run's files (train() holds its lock)
        try:
            check_output_dir(self.out_dir)
        except ValueError as e:
            raise RunDirError(str(e)) from None
        for key, p in self.paths.items():
            if os.path.lexists(p) and not os.path.isfile(p):
                raise RunDirError(f"{p} exists and is not a regular file; the run directory {cfg.out_dir} is not "
                                  "usable (remove or rename it)")
        if dist.is_main:
            remove_stale_temps(self.out_dir)   # left by a writer killed mid-write; we hold the lock
        ckpt = None
        self.saved_result: RunResult | None = None
        if resume:
            if os.path.isfile(self.paths["checkpoint"]):
                ckpt = check_training_state(load_checkpoint(self.paths["checkpoint"], formats=(CHECKPOINT_FORMAT,)),
                                            self.paths["checkpoint"])
                diff = _config_diff(ckpt["config"], cfg.to_dict())
                if diff:
                    raise ConfigMismatchError(f"cannot resume {cfg.out_dir}: the config differs from the "
                                              f"checkpoint's in " + "; ".join(diff), diff)
            saved = _saved_configs(self.paths)
            for fname, old, _ in saved:
                diff = _config_diff(old, cfg.to_dict())
                if diff:
                    raise ConfigMismatchError(f"cannot resume {cfg.out_dir}: it holds a run with other settings "
                                              f"(its {fname} differs in " + "; ".join(diff) + "); nothing was "
                                              "changed — choose another out_dir", diff)
            if ckpt is None:
                finished = [(f, old, r) for f, old, r in saved if r is not None and r.get("status") in ("ok", "nan")]
                if finished:
                    fname, old, res = finished[0]
                    diff = _config_diff(old, cfg.to_dict(), _COSMETIC_FIELDS)
                    if diff:
                        raise ConfigMismatchError(
                            f"cannot resume {cfg.out_dir}: its run finished and has no checkpoint.pt to continue "
                            f"from (" + "; ".join(diff) + "); nothing was changed — choose another out_dir", diff)
                    self.saved_result = RunResult.from_dict(res)
                elif not saved and any(os.path.isfile(self.paths[k]) for k in ("metrics_csv", "metrics_jsonl")):
                    raise RunDirError(f"cannot resume {cfg.out_dir}: it holds metrics of a run whose settings are "
                                      "unknown (no checkpoint.pt, config.yaml or result.json); nothing was changed "
                                      "— choose another out_dir")
        elif _nonempty_dir(self.out_dir):
            raise RunDirError(f"output directory {cfg.out_dir} already holds files; resume that run (--resume) or "
                              f"choose another out_dir")
        self.ckpt = ckpt
        if self.saved_result is not None:
            return   # a finished run without a checkpoint, same settings: nothing to do (run() returns its result)

        # -- data (before anything is written: a missing data set leaves no trace)
        from ..data.streaming import STREAMING_DATASETS, build_streaming

        if cfg.dataset in STREAMING_DATASETS:   # too big for memory: decoded by worker processes as it trains
            self.bundle, self.train_loader, self.eval_loaders = build_streaming(cfg, dist, device)
            self.steps_per_epoch = len(self.train_loader)
            if self.steps_per_epoch == 0:
                raise ConfigError(f"batch_size {cfg.batch_size} is larger than the training set "
                                  f"({self.train_loader.num_samples} images) with drop_last: true")
        else:
            self._in_memory_data(cfg, dist, device, Loader, load_dataset)
        bundle = self.bundle

        # -- model, optimizer, schedule (the model's init depends on the seed only)
        build = lambda: build_model(cfg.model, cfg.method, num_classes=bundle.num_classes,  # noqa: E731
                                    in_channels=bundle.in_channels, **cfg.model_opts,
                                    method_opts=dict(cfg.method_opts))
        _check_model_fits(build, cfg, device)   # a network too large for this machine: one line, nothing allocated
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        torch.manual_seed(cfg.seed)
        try:
            model = build()
        except (TypeError, ValueError) as e:   # e.g. a depth the builder does not take: before anything is written
            raise ConfigError(f"cannot build model {cfg.model!r} with model_opts {dict(cfg.model_opts)} and "
                              f"method_opts {dict(cfg.method_opts)}: {' '.join(str(e).split())}") from None
        except (MemoryError, RuntimeError) as e:   # the estimate could not be made, or was too low
            if not isinstance(e, MemoryError) and not _is_oom(e):
                raise
            raise ConfigError(f"model {cfg.model!r} with model_opts {dict(cfg.model_opts)} does not fit in memory: "
                              f"{' '.join(str(e).split())[:160]}") from None
        if cfg.sync_bn and dist.enabled:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        try:
            model.to(device)
        except RuntimeError as e:
            if not _is_oom(e):
                raise
            raise ConfigError(f"model {cfg.model!r} with model_opts {dict(cfg.model_opts)} does not fit in the "
                              f"memory of {device}: {' '.join(str(e).split())[:160]}") from None
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        _prepare_model(model, cfg)
        self.spec = model_spec(cfg, bundle)
        self.opt = torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum,
                                   nesterov=cfg.nesterov)
        self.sched = torch.optim.lr_scheduler.MultiStepLR(self.opt, milestones=list(cfg.milestones),
                                                          gamma=cfg.lr_decay)
        self.scaler = _grad_scaler(device, cfg.amp)

        # -- position: (epoch, batch within epoch, global step), the epoch's running sums, time
        self.epoch, self.batch, self.step = 0, 0, 0
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)   # loss·n, correct, n of this epoch (local)
        self.wall_before = 0.0
        self.status = "running"
        torch.manual_seed(cfg.seed + 1000003 * dist.rank)  # per-process stream for dropout etc.
        if ckpt is not None:
            self._load_state(ckpt, model)
        self.raw_model = model
        self.model: nn.Module = model
        if dist.enabled:
            self.model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        if cfg.compile:   # the training forward and backward; evaluation and checkpoints use the raw model
            self.model = torch.compile(self.model)


    def _load_state(self, ckpt: dict[str, Any], model: nn.Module) -> None:
        """Continue from a checkpoint whose fields :func:`check_training_state` accepted. A state that does not fit
        this run (another model's weights, a damaged optimizer or RNG state) is a one-line
        :class:`~pwsconv.train.checkpoint.CheckpointError` naming the file; nothing has been written yet."""
        path = self.paths["checkpoint"]
        if ckpt["batch"] > self.steps_per_epoch:
            raise CheckpointError(f"cannot resume from {path}: its batch {ckpt['batch']} is beyond the "
                                  f"{self.steps_per_epoch} batches of an epoch (the file was edited); nothing was "
                                  "changed")
        parts: list[tuple[str, Callable[[], Any]]] = [
            ("model weights", lambda: model.load_state_dict(ckpt["model"])),
            ("optimizer state", lambda: self.opt.load_state_dict(ckpt["optimizer"])),
            ("scheduler state", lambda: load_scheduler_state(self.sched, ckpt["scheduler"]))]
        if self.scaler is not None and ckpt.get("scaler"):
            parts.append(("GradScaler state", lambda: self.scaler.load_state_dict(ckpt["scaler"])))
        if len(ckpt["rng"]) == self.dist.world_size:
            parts.append(("RNG state", lambda: set_rng_state(ckpt["rng"][self.dist.rank])))
        for what, load in parts:
            try:
                load()
            except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
                text = " ".join(str(e).split()) or type(e).__name__
                raise CheckpointError(f"cannot resume from {path}: its {what} cannot be loaded into this run "
                                      f"({self.cfg.model}, {self.cfg.method}): {text[:200]}; nothing was "
                                      "changed") from None
        self.epoch, self.batch, self.step = ckpt["epoch"], ckpt["batch"], ckpt["step"]
        self.sums = torch.tensor(ckpt["sums"], dtype=torch.float64, device=self.device)
        self.wall_before = float(ckpt["wall_time"])
        self.status = ckpt["status"]

    def _in_memory_data(self, cfg: TrainConfig, dist: D.DistInfo, device: torch.device, Loader: Any,
                        load_dataset: Any) -> None:
        """The small data sets: loaded into memory and batched by :class:`pwsconv.data.Loader`."""
        from ..data.device import resident

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
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch == 0:
            raise ConfigError(f"batch_size {cfg.batch_size} is larger than the training set "
                              f"({len(bundle.train.y)} images) with drop_last: true")
        self.eval_loaders = {split: Loader(getattr(bundle, split), cfg.eval_batch_size, shuffle=False, augment=None,
                                           drop_last=False, **common)
                             for split in ("val", "test") if getattr(bundle, split, None) is not None}

    # ------------------------------------------------------------------ bookkeeping
    @property
    def max_steps(self) -> int:
        total = self.cfg.epochs * self.steps_per_epoch
        return min(total, self.cfg.max_steps) if self.cfg.max_steps else total

    def finished(self) -> bool:
        return self.status == "nan" or self.step >= self.max_steps or self.epoch >= self.cfg.epochs

    def save_checkpoint(self) -> None:
        rngs = [rng_state()]
        if self.dist.enabled:
            gathered: list[Any] = [None] * self.dist.world_size
            torch.distributed.all_gather_object(gathered, rngs[0])
            rngs = gathered
        if not self.dist.is_main:
            return
        atomic_save({
            "format": CHECKPOINT_FORMAT, "version": 1, "config": self.cfg.to_dict(), "model_spec": self.spec,
            "model": self.raw_model.state_dict(), "optimizer": self.opt.state_dict(),
            "scheduler": scheduler_state(self.sched),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch, "batch": self.batch, "step": self.step, "sums": self.sums.tolist(),
            "wall_time": self.wall_time(), "status": self.status, "rng": rngs,
            "world_size": self.dist.world_size,
        }, self.paths["checkpoint"])

    def wall_time(self) -> float:
        return self.wall_before + (time.perf_counter() - self.t_start)

    def collapsed(self) -> bool:
        """Non-finite parameter or running loss, on any process. Under fp16 the GradScaler skips steps with a
        non-finite loss, so there a collapse is a loss scale driven below 1 (even unscaled gradients overflow)."""
        flags = [torch.isfinite(p).all() for p in self.raw_model.parameters()]
        if self.scaler is None:
            flags.append(torch.isfinite(self.sums[0]))
        else:
            flags.append(torch.tensor(self.scaler.get_scale() >= 1.0, device=self.device))
        bad = (~torch.stack(flags).all()).to(torch.float32).reshape(1)
        return D.all_reduce_sum(bad, self.dist).item() > 0

    def write_result(self, metrics: dict[str, float]) -> "RunResult":
        res = RunResult(status=self.status, metrics=metrics, epoch=self.epoch + self.batch / self.steps_per_epoch,
                        step=self.step, wall_time=self.wall_time(), out_dir=self.out_dir, config=self.cfg.to_dict(),
                        paths=dict(self.paths))
        if self.dist.is_main:
            atomic_write_text(dumps(res.to_dict()) + "\n", self.paths["result"])
        return res

    def result_from_files(self) -> "RunResult":
        if os.path.isfile(self.paths["result"]):
            try:
                return RunResult.load(self.out_dir)
            except (ValueError, KeyError, OSError):
                pass  # rebuilt below
        rows = read_metrics(self.out_dir)
        last = rows[-1] if rows else {}
        metrics = {k: float(last.get(k, NAN)) if last.get(k) is not None else NAN for k in FINAL_METRICS}
        return self.write_result(metrics)

    # ------------------------------------------------------------------ the loop
    def run(self) -> "RunResult":
        cfg, dist = self.cfg, self.dist
        self.t_start = time.perf_counter()
        D.barrier(dist)   # every process has checked out_dir / read the checkpoint before rank 0 writes anything
        if self.saved_result is not None:
            return self.saved_result
        if self.ckpt is not None and self.finished():
            return self.result_from_files()   # nothing left to do (a finished or collapsed run)
        if dist.is_main:
            os.makedirs(self.out_dir, exist_ok=True)
            import yaml

            atomic_write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), self.paths["config"])
        log = MetricsLog(self.out_dir, enabled=dist.is_main, tensorboard=cfg.tensorboard,
                         resume_step=self.step if self.ckpt is not None else None)
        D.barrier(dist)
        try:
            return self.loop(log)
        finally:
            log.close()

    def loop(self, log: MetricsLog) -> "RunResult":
        cfg, model, opt, scaler = self.cfg, self.model, self.opt, self.scaler
        device_type = self.device.type
        amp = None if cfg.amp is None else _AMP_DTYPES[cfg.amp]   # the autocast dtype (None: float32)
        show = cfg.progress and self.dist.is_main
        if show:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # tqdm is part of the "suite" extra; without it, train quietly
                show = False
        final: dict[str, float] = {}
        while not self.finished():
            self.train_loader.set_epoch(self.epoch)
            if self.batch:  # resumed mid-epoch: the same order, from the first batch not yet consumed
                self.train_loader.load_state_dict({"epoch": self.epoch, "batch": self.batch})
            model.train()
            seg_images, seg_t0 = 0, time.perf_counter()
            bar = tqdm(total=self.steps_per_epoch, initial=self.batch, leave=False, dynamic_ncols=True,
                       desc=f"{cfg.run_name} epoch {self.epoch + 1}/{cfg.epochs}") if show else None
            collapsed = False
            for i, (x, y) in enumerate(self.train_loader, start=self.batch):
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                loss, out = train_step(model, opt, x, y, amp=amp, device_type=device_type, scaler=scaler)
                self.step += 1
                self.batch = i + 1
                n = y.numel()
                seg_images += n
                # on the device, no host sync: read at log points and epoch ends
                self.sums[:2] += torch.stack([loss.detach().double() * n, (out.argmax(1) == y).sum().double()])
                self.sums[2] += n
                if self.on_step is not None:
                    self.on_step(self.step)
                last = self.batch == self.steps_per_epoch or self.step >= self.max_steps
                if self.step % cfg.log_every == 0 or last:
                    if self.collapsed():
                        collapsed = True
                        break
                    if bar is not None:
                        s = self.sums.tolist()
                        ips = seg_images * self.dist.world_size / max(time.perf_counter() - seg_t0, 1e-9)
                        bar.set_postfix(loss=f"{s[0] / s[2]:.4f}", acc=f"{s[1] / s[2]:.3f}", img_s=f"{ips:.0f}",
                                        refresh=False)
                if bar is not None:
                    bar.update(1)
                if self.step >= self.max_steps:
                    break
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and not last:
                    self.save_checkpoint()
            if bar is not None:
                bar.close()
            seg_time = time.perf_counter() - seg_t0
            ips = seg_images * self.dist.world_size / max(seg_time, 1e-9)

            why = "non-finite loss or weights" if collapsed else ""
            if not collapsed:
                # end of an epoch (or of the run, mid-epoch, at max_steps)
                tot = D.all_reduce_sum(self.sums.clone(), self.dist).tolist()
                final = {"train_loss": tot[0] / tot[2], "train_acc": tot[1] / tot[2], "val_loss": NAN,
                         "val_acc": NAN, "test_loss": NAN, "test_acc": NAN, "images_per_s": ips}
                for split, loader in self.eval_loaders.items():
                    ev = evaluate(self.raw_model, loader, device=self.device, amp=cfg.amp,
                                  distributed=self.dist.enabled)
                    if ev["nonfinite"] or not math.isfinite(ev["loss"]):
                        # finite weights whose outputs overflow (a very large LR): a collapse, not an accuracy
                        why = f"non-finite outputs on the {split} set"
                        break
                    final[f"{split}_loss"], final[f"{split}_acc"] = ev["loss"], ev["acc"]
                    if ev["acc5"] == ev["acc5"]:   # top-5 (ImageNet, Table 5): in result.json, not in metrics.csv
                        final[f"{split}_acc5"] = ev["acc5"]
            if why:
                self.status = "nan"
                final = {k: NAN for k in FINAL_METRICS}
                final["images_per_s"] = ips
                self._log_row(log, final, seg_time)
                self.save_checkpoint()
                if show:
                    tqdm.write(f"{cfg.run_name}: collapsed ({why}) at step {self.step}, epoch {self.epoch + 1}")
                break
            lr = opt.param_groups[0]["lr"]
            if self.batch == self.steps_per_epoch:   # a complete epoch: next epoch, next LR
                self.sched.step()
                self.epoch, self.batch = self.epoch + 1, 0
                self.sums.zero_()
            done = self.step >= self.max_steps or self.epoch >= cfg.epochs
            self.status = "ok" if done else "running"
            self._log_row(log, final, seg_time, lr=lr)
            self.save_checkpoint()
            if show:
                tqdm.write(f"{cfg.run_name} epoch {self.epoch if self.batch == 0 else self.epoch + 1}: "
                           f"loss {final['train_loss']:.4f} acc {final['train_acc']:.4f} | "
                           + (f"val acc {final['val_acc']:.4f} | " if "val" in self.eval_loaders else "")
                           + f"test loss {final['test_loss']:.4f} acc {final['test_acc']:.4f} | "
                           f"{ips:.0f} img/s | lr {lr:g}")
        D.barrier(self.dist)
        return self.write_result(final)

    def _log_row(self, log: MetricsLog, m: dict[str, float], seg_time: float, lr: float | None = None) -> None:
        row = {"epoch": self.epoch + self.batch / self.steps_per_epoch, "step": self.step,
               "lr": self.opt.param_groups[0]["lr"] if lr is None else lr}
        row.update({k: m.get(k, NAN) for k in FINAL_METRICS})
        row.update({"epoch_time": seg_time, "wall_time": self.wall_time(), "status": self.status})
        log.log(row)


def train(config: TrainConfig | Mapping[str, Any] | str | os.PathLike, *, resume: bool = False,
          on_step: Callable[[int], None] | None = None) -> RunResult:
    """Train one network as ``config`` says and return its :class:`RunResult`.

    Args:
        config: a :class:`~pwsconv.config.TrainConfig`, a dict of its fields, or the path of a YAML file.
        resume: continue the run in ``config.out_dir`` from its checkpoint (start fresh if there is none; return at
            once if it already finished or collapsed). Without it, an ``out_dir`` that holds files is refused.
        on_step: called with the global step after every optimizer step (progress hooks; an exception it raises
            aborts the run like a crash, leaving the last checkpoint).

    A collapse (non-finite loss or weights) is returned as ``status="nan"`` with NaN metrics, never raised. Bad
    configs raise :class:`~pwsconv.config.ConfigError`, an unusable ``out_dir`` :class:`RunDirError`, a bad
    checkpoint :class:`~pwsconv.train.checkpoint.CheckpointError`, missing data ``pwsconv.data.DataError`` — all
    ``ValueError`` s with one-line messages.
    """
    cfg = _as_config(config)
    device_type = resolve_device(cfg.device).type
    try:
        check_output_dir(cfg.out_dir)
    except ValueError as e:
        raise RunDirError(str(e)) from None
    dist = D.setup_distributed(device_type)
    det_before = torch.are_deterministic_algorithms_enabled()
    threads_before = torch.get_num_threads()
    cudnn_before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)

    def restore() -> None:
        torch.use_deterministic_algorithms(det_before)
        if torch.get_num_threads() != threads_before:
            torch.set_num_threads(threads_before)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_before
        D.cleanup_distributed(dist)

    try:
        device = resolve_device(cfg.device, dist.local_rank)
        if cfg.batch_size % dist.world_size:
            raise ConfigError(f"batch_size {cfg.batch_size} is the global batch and must be divisible by the "
                              f"{dist.world_size} processes")
        if cfg.sync_bn and dist.enabled and device.type != "cuda":
            raise ConfigError("sync_bn: true needs CUDA devices (torch's SyncBatchNorm does not run on CPU); "
                              "set sync_bn: false")
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        if cfg.deterministic:
            if device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        elif device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        with lock_run_dir(cfg.out_dir) if dist.is_main else contextlib.nullcontext():
            result = _Run(cfg, dist, device, resume, on_step).run()
    except BaseException:
        # the error in flight (a Ctrl-C inside a lazy import, a bad checkpoint) is what the caller sees; a clean-up
        # step that fails meanwhile (e.g. on a module the interrupt left half-imported) must not replace it
        with contextlib.suppress(Exception):
            restore()
        raise
    restore()
    return result
