"""The training loop (the only one in pwsconv): SGD + MultiStepLR (+ warm-up), AMP, DDP, step-exact checkpoints,
collapse = result — for every kind of run: a classifier (``pwsconv train``), a detector, the variance probe.

    from pwsconv.config import TrainConfig
    from pwsconv.train import train
    result = train(TrainConfig(model="tiny_cnn", method="pws", lr=0.5, epochs=5, out_dir="runs/x"))
    result.status, result.metrics["test_acc"]          # "ok" | "nan", final test accuracy (NaN if collapsed)

Reading order: :func:`train` wraps its config in a :class:`~pwsconv.train.task.ClassificationTask` and calls
:func:`run_task`, which sets up a :class:`_Run` (the task's data and model, optimizer, resume state) and calls its
``loop``, whose every step is :func:`pwsconv.train.step.train_step` with the task's loss and hooks (a task:
:mod:`pwsconv.train.task` — how a batch becomes a loss, how a model is scored). Each epoch: the loader's order is fixed by (seed, epoch);
after every ``ckpt_every`` optimizer steps and at the end of every epoch a checkpoint is written atomically, holding
everything needed to continue bit-exactly (model, optimizer, scheduler, scaler, RNG states, position in the epoch, the
epoch's running sums). A resumed run restarts the loader in the same epoch at the first batch not yet consumed (the
loader's order and augmentation depend only on (seed, epoch)), so on CPU its final weights equal an uninterrupted
run's.

A non-finite loss or parameter (checked every ``log_every`` steps and at epoch ends), or a non-finite evaluation
output, ends the run with status ``"nan"`` and NaN metrics (a collapse is a result, not an exception). Helpers:
``task``, ``devices``, ``evaluate``, ``spec`` (model spec, saved-config checks), ``result``."""

from __future__ import annotations

import contextlib
import os
import random
import time
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from ..accel import cached
from ..optim import link_optimizer, param_groups
from ..config import ConfigError, TrainConfig
from . import distributed as D
from .checkpoint import (
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
from .result import FINAL_METRICS, RunDirError, RunResult
from .spec import (_COSMETIC_FIELDS, ConfigMismatchError, _as_config, _config_diff, _nonempty_dir,  # noqa: F401
                   build_from_spec, check_saved_run, model_spec)
from .rundir import check_output_dir, lock_run_dir, remove_stale_temps
from .step import train_step
from .task import ClassificationTask, Task, to_device

__all__ = ["train", "run_task", "Task", "evaluate", "RunResult", "RunDirError", "ConfigMismatchError", "build_from_spec",
           "model_spec",
           "resolve_device", "check_device", "FINAL_METRICS", "DEVICE_TYPES"]


class _Run:
    """State of one training run of a :class:`~pwsconv.train.task.Task`: built by ``__init__``, advanced by
    :meth:`loop`."""

    def __init__(self, task: Task, dist: D.DistInfo, device: torch.device, resume: bool,
                 on_step: Callable[[int], None] | None) -> None:
        cfg = task.cfg
        self.task, self.cfg, self.dist, self.device, self.on_step = task, cfg, dist, device, on_step
        self.out_dir = os.path.abspath(cfg.out_dir)
        self.paths = {k: os.path.join(self.out_dir, f) for k, f in (
            ("config", "config.yaml"), ("metrics_csv", "metrics.csv"), ("metrics_jsonl", "metrics.jsonl"),
            ("checkpoint", "checkpoint.pt"), ("result", "result.json"))}

        # -- the output directory: a new run never touches another run's files (run_task() holds its lock)
        self.ckpt = ckpt = None
        self.saved_result: RunResult | None = None
        if task.files:
            try:
                check_output_dir(self.out_dir)
            except ValueError as e:
                raise RunDirError(str(e)) from None
            for key, p in self.paths.items():
                if os.path.lexists(p) and not os.path.isfile(p):
                    raise RunDirError(f"{p} exists and is not a regular file; the run directory {cfg.out_dir} is "
                                      "not usable (remove or rename it)")
            if dist.is_main:
                remove_stale_temps(self.out_dir)   # left by a writer killed mid-write; we hold the lock
            if resume:
                path = self.paths["checkpoint"]
                if os.path.isfile(path):
                    ckpt = check_training_state(load_checkpoint(path, formats=(task.checkpoint_format,)), path,
                                                task.check_spec)
                saved = check_saved_run(self.paths, cfg, ckpt)
                if saved is not None:   # a finished run without a checkpoint, same settings: nothing to do
                    self.saved_result = RunResult.from_dict(saved)
                    return
            elif _nonempty_dir(self.out_dir):
                raise RunDirError(f"output directory {cfg.out_dir} already holds files; resume that run (--resume) "
                                  "or choose another out_dir")
        self.ckpt = ckpt

        # -- data (before anything is written: a missing data set leaves no trace)
        task.setup(dist, device)
        self.train_loader = task.train_loader
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch == 0:
            raise ConfigError(f"batch_size {cfg.batch_size} is larger than the training set")

        # -- model, optimizer, schedule (the model's init depends on the seed only)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        torch.manual_seed(cfg.seed)
        model = task.build()
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
        task.prepare(model)
        self.spec = task.spec()
        self.opt = torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum,
                                   nesterov=cfg.nesterov)
        self.sched = torch.optim.lr_scheduler.MultiStepLR(self.opt, milestones=list(cfg.milestones),
                                                          gamma=cfg.lr_decay)
        self.scaler = _grad_scaler(device, cfg.amp)
        # gamma="auto" follows this optimizer's LR (after a resume too); clipping layers bound unscaled gradients
        link_optimizer(model, self.opt, scaler=self.scaler)

        # -- position: (epoch, batch within epoch, global step), the epoch's running sums, time
        self.epoch, self.batch, self.step = 0, 0, 0
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)   # task.batch_sums of this epoch (local)
        self.wall_before = 0.0
        self.status = "running"
        torch.manual_seed(cfg.seed + 1000003 * dist.rank)  # per-process stream for dropout etc.
        if ckpt is not None:
            self._load_state(ckpt, model)
        task.bind(model, self.opt)
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

    # ------------------------------------------------------------------ bookkeeping
    @property
    def max_steps(self) -> int:
        total = self.cfg.epochs * self.steps_per_epoch
        return min(total, self.cfg.max_steps) if self.cfg.max_steps else total

    def finished(self) -> bool:
        return self.status == "nan" or self.step >= self.max_steps or self.epoch >= self.cfg.epochs

    def save_checkpoint(self) -> None:
        if not self.task.files:
            return
        rngs = [rng_state()]
        if self.dist.enabled:
            gathered: list[Any] = [None] * self.dist.world_size
            torch.distributed.all_gather_object(gathered, rngs[0])
            rngs = gathered
        if not self.dist.is_main:
            return
        atomic_save({
            "format": self.task.checkpoint_format, "version": 1, "config": self.cfg.to_dict(),
            "model_spec": self.spec, "model": self.raw_model.state_dict(), "optimizer": self.opt.state_dict(),
            "scheduler": scheduler_state(self.sched),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch, "batch": self.batch, "step": self.step, "sums": self.sums.tolist(),
            "wall_time": self.wall_time(), "status": self.status, "rng": rngs,
            "world_size": self.dist.world_size,
        }, self.paths["checkpoint"])

    def wall_time(self) -> float:
        return self.wall_before + (time.perf_counter() - self.t_start)

    def collapsed(self) -> bool:
        """Non-finite parameter (unless the task says otherwise) or running loss, on any process. Under fp16 the
        GradScaler skips steps with a non-finite loss, so there a collapse is a loss scale driven below 1 (even unscaled gradients overflow)."""
        flags = [torch.isfinite(p).all() for p in self.raw_model.parameters()] if self.task.check_weights else []
        if self.scaler is None:
            flags.append(torch.isfinite(self.sums[0]))
        else:
            flags.append(torch.tensor(self.scaler.get_scale() >= 1.0, device=self.device))
        bad = (~torch.stack(flags).all()).to(torch.float32).reshape(1)
        return D.all_reduce_sum(bad, self.dist).item() > 0

    def warm_up(self, restore: bool = False) -> None:
        """The LR of the next step: the schedule's × the linear warm-up factor (``restore``: the schedule's alone)."""
        a = 1.0 if restore else min(self.step / self.task.warmup_steps, 1.0)
        f = self.task.warmup_factor * (1 - a) + a
        for group, lr in zip(self.opt.param_groups, self.sched.get_last_lr()):
            group["lr"] = lr * f

    def write_result(self, metrics: dict[str, float]) -> "RunResult":
        res = RunResult(status=self.status, metrics=metrics, epoch=self.epoch + self.batch / self.steps_per_epoch,
                        step=self.step, wall_time=self.wall_time(), out_dir=self.out_dir if self.task.files else "",
                        config=self.cfg.to_dict(), paths=dict(self.paths) if self.task.files else {})
        if self.dist.is_main and self.task.files:
            atomic_write_text(dumps(res.to_dict()) + "\n", self.paths["result"])
        return res

    def result_from_files(self) -> "RunResult":
        if os.path.isfile(self.paths["result"]):
            try:
                return RunResult.load(self.out_dir)
            except (ValueError, KeyError, OSError):
                pass  # rebuilt below
        rows = read_metrics(self.out_dir)
        return self.write_result(self.task.metrics_from_row(rows[-1] if rows else {}))

    # ------------------------------------------------------------------ the loop
    def run(self) -> "RunResult":
        cfg, dist = self.cfg, self.dist
        self.t_start = time.perf_counter()
        D.barrier(dist)   # every process has checked out_dir / read the checkpoint before rank 0 writes anything
        if self.saved_result is not None:
            return self.saved_result
        if self.ckpt is not None and self.finished():
            return self.result_from_files()   # nothing left to do (a finished or collapsed run)
        files = dist.is_main and self.task.files
        if files:
            os.makedirs(self.out_dir, exist_ok=True)
            import yaml

            atomic_write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), self.paths["config"])
        log = MetricsLog(self.out_dir, enabled=files, tensorboard=cfg.tensorboard, columns=self.task.columns,
                         resume_step=self.step if self.ckpt is not None else None)
        D.barrier(dist)
        try:
            return self.loop(log)
        finally:
            log.close()

    def loop(self, log: MetricsLog) -> "RunResult":
        cfg, task, model, opt, scaler = self.cfg, self.task, self.model, self.opt, self.scaler
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
            seg_n0, seg_t0 = float(self.sums[2]), time.perf_counter()   # images so far this epoch (resumed: > 0)
            bar = tqdm(total=self.steps_per_epoch, initial=self.batch, leave=False, dynamic_ncols=True,
                       disable=None,   # the bar only on a terminal; logs get the per-epoch lines alone
                       desc=f"{cfg.run_name} epoch {self.epoch + 1}/{cfg.epochs}") if show else None
            collapsed = False
            for i, (x, y) in enumerate(self.train_loader, start=self.batch):
                x, y = to_device(x, self.device), to_device(y, self.device)
                if task.warmup_steps:
                    self.warm_up()
                loss, out = train_step(model, opt, x, y, loss_fn=task.loss_fn, amp=amp, device_type=device_type,
                                       scaler=scaler, after_forward=task.after_forward, before_step=task.before_step)
                self.step += 1
                self.batch = i + 1
                self.sums += task.batch_sums(loss, out, x, y)   # on the device, no host sync: read at log points
                if self.on_step is not None:
                    self.on_step(self.step)
                last = self.batch == self.steps_per_epoch or self.step >= self.max_steps
                if self.step % cfg.log_every == 0 or last:
                    if self.collapsed():
                        collapsed = True
                        break
                    if bar is not None:
                        s = self.sums.tolist()
                        ips = (s[2] - seg_n0) * self.dist.world_size / max(time.perf_counter() - seg_t0, 1e-9)
                        bar.set_postfix({"loss": f"{s[0] / s[2]:.4f}", f"{task.rate_unit}_s": f"{ips:.0f}"},
                                        lr=f"{opt.param_groups[0]['lr']:.3g}", refresh=False)
                if bar is not None:
                    bar.update(1)
                if self.step >= self.max_steps:
                    break
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and not last:
                    self.save_checkpoint()
            if bar is not None:
                bar.close()
            seg_time = time.perf_counter() - seg_t0
            ips = (float(self.sums[2]) - seg_n0) * self.dist.world_size / max(seg_time, 1e-9)

            why = "non-finite loss or weights" if collapsed else ""
            ev = None
            complete = self.batch == self.steps_per_epoch   # a complete epoch: next epoch, next LR
            done = self.step >= self.max_steps or self.epoch + complete >= cfg.epochs
            if not collapsed:   # end of an epoch (or of the run, mid-epoch, at max_steps)
                tot = D.all_reduce_sum(self.sums.clone(), self.dist).tolist()
                if done or (task.eval_every and complete and (self.epoch + 1) % task.eval_every == 0):
                    with cached(self.raw_model):   # each reparameterized weight computed once while scoring
                        ev, why = task.evaluate(self.raw_model, self.device, self.dist.enabled)
                final = task.metrics(tot, ev, ips)
            lr = opt.param_groups[0]["lr"]
            if why:
                self.status = "nan"
                final = task.nan_metrics(ips)
                self._log_row(log, task.row(final, None, seg_time), lr)
                self.save_checkpoint()
                if show:
                    tqdm.write(f"{cfg.run_name}: collapsed ({why}) at step {self.step}, epoch {self.epoch + 1}")
                break
            if complete:
                if task.warmup_steps:
                    self.warm_up(restore=True)   # the schedule steps from its own LR, not a warmed-up one
                self.sched.step()
                self.epoch, self.batch = self.epoch + 1, 0
                self.sums.zero_()
            self.status = "ok" if done else "running"
            self._log_row(log, task.row(final, ev, seg_time), lr)
            self.save_checkpoint()
            if show:
                tqdm.write(f"{cfg.run_name} epoch {self.epoch if self.batch == 0 else self.epoch + 1}: "
                           f"{task.summary(final)} | {ips:.0f} img/s | lr {lr:g}")
        D.barrier(self.dist)
        return self.write_result(final)

    def _log_row(self, log: MetricsLog, values: dict[str, Any], lr: float) -> None:
        log.log({"epoch": self.epoch + self.batch / self.steps_per_epoch, "step": self.step, "lr": lr, **values,
                 "wall_time": self.wall_time(), "status": self.status})


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
    return run_task(ClassificationTask(_as_config(config)), resume=resume, on_step=on_step)


def run_task(task: Task, *, resume: bool = False, on_step: Callable[[int], None] | None = None) -> RunResult:
    """Run the engine's loop on ``task`` (a :class:`~pwsconv.train.task.Task` holding a validated config): what
    :func:`train` does for a classifier, for any kind of run (a detector, the variance probe); same arguments,
    errors and result."""
    cfg = task.cfg
    device_type = resolve_device(cfg.device).type
    if task.files:
        try:
            check_output_dir(cfg.out_dir)
        except ValueError as e:
            raise RunDirError(str(e)) from None
    dist = D.setup_distributed(device_type) if task.files else D.DistInfo()   # an in-memory run: this process's
    det_before = torch.are_deterministic_algorithms_enabled()
    threads_before = torch.get_num_threads()
    cudnn_before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)

    def restore(ok: bool = False) -> None:
        torch.use_deterministic_algorithms(det_before)
        if torch.get_num_threads() != threads_before:
            torch.set_num_threads(threads_before)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_before
        D.cleanup_distributed(dist, synchronize=ok)

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
        with lock_run_dir(cfg.out_dir) if dist.is_main and task.files else contextlib.nullcontext():
            result = _Run(task, dist, device, resume, on_step).run()
    except BaseException:
        # the error in flight (a Ctrl-C inside a lazy import, a bad checkpoint) is what the caller sees; a clean-up
        # step that fails meanwhile (e.g. on a module the interrupt left half-imported) must not replace it
        with contextlib.suppress(Exception):
            restore()
        raise
    restore(ok=True)
    return result
