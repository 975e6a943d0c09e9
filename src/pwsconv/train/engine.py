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

A non-finite loss or parameter (checked every ``log_every`` steps and at epoch ends), or a non-finite output of the
evaluation (finite weights whose logits overflow), ends the run with status ``"nan"`` and NaN metrics, as the
paper's tables report a collapse — it is a result, not an exception.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..optim import param_groups
from ..config import RESUME_MUTABLE_FIELDS, ConfigError, TrainConfig, fields_with
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
from .metrics import MetricsLog, read_metrics
from .rundir import check_output_dir, is_run_file, lock_run_dir, remove_stale_temps
from .step import train_step

__all__ = ["train", "evaluate", "RunResult", "RunDirError", "ConfigMismatchError", "build_from_spec", "model_spec",
           "resolve_device", "check_device", "FINAL_METRICS", "DEVICE_TYPES"]

FINAL_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "images_per_s")
NAN = float("nan")


class RunDirError(ValueError):
    """The output directory cannot be used (it holds another run and ``resume`` was not asked for)."""


@dataclass
class RunResult:
    """What a run produced: ``status`` ("ok" or "nan" = collapsed), final ``metrics`` (NaN where missing or collapsed),
    progress counters, and the paths of its files."""

    status: str
    metrics: dict[str, float]
    epoch: float
    step: int
    wall_time: float
    out_dir: str
    config: dict[str, Any]
    paths: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.config.get("name") or os.path.basename(os.path.normpath(self.out_dir))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunResult":
        metrics = {k: (NAN if v is None else float(v)) for k, v in dict(d.get("metrics", {})).items()}
        return cls(status=d["status"], metrics=metrics, epoch=float(d.get("epoch", 0)), step=int(d.get("step", 0)),
                   wall_time=float(d.get("wall_time") or 0.0), out_dir=d.get("out_dir", ""),
                   config=dict(d.get("config", {})), paths=dict(d.get("paths", {})))

    @classmethod
    def load(cls, out_dir: str | os.PathLike) -> "RunResult":
        import json

        with open(os.path.join(out_dir, "result.json"), encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


# ------------------------------------------------------------------------------------------------------------ helpers
#: Device types pwsconv trains and evaluates on ("meta" has no data, "quantum" does not exist).
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def check_device(name: Any, what: str = "device") -> torch.device | None:
    """A one-line :class:`~pwsconv.config.ConfigError` unless ``name`` is "auto" or a device pwsconv can compute on
    and that exists here (CUDA available, index < device count). Returns the device (``None`` for "auto")."""
    if not isinstance(name, str):
        raise ConfigError(f"{what} must be a string such as 'auto', 'cpu' or 'cuda:0', got {name!r}")
    if name == "auto":
        return None
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"{what} must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}") from None
    if dev.type not in DEVICE_TYPES:
        raise ConfigError(f"{what} {name!r} cannot run pwsconv; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"device {name!r} requested but MPS is not available")
    elif dev.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise ConfigError(f"device {name!r} requested but XPU is not available")
    return dev


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """"auto" → ``cuda:LOCAL_RANK`` if CUDA is available, else cpu; a bare "cuda" also gets the local rank.
    An unknown, unusable ("meta") or absent device is a one-line :class:`~pwsconv.config.ConfigError`."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = check_device(name)
    assert dev is not None
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def model_spec(cfg: TrainConfig, bundle: Any) -> dict[str, Any]:
    """Everything needed to rebuild the network (and its input normalization) without the training data."""
    return {
        "model": cfg.model, "method": cfg.method, "method_opts": dict(cfg.method_opts),
        "model_opts": dict(cfg.model_opts),
        "num_classes": int(bundle.num_classes), "in_channels": int(bundle.in_channels),
        "image_size": _plain(bundle.image_size), "mean": [float(v) for v in bundle.mean],
        "std": [float(v) for v in bundle.std], "dataset": cfg.dataset, "folded": False,
    }


def _plain(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [int(x) for x in v]
    return int(v) if v is not None else None


def build_from_spec(spec: Mapping[str, Any]) -> nn.Module:
    """The network of a :func:`model_spec` (folded to plain layers when ``spec["folded"]``), in eval mode."""
    from ..folding import fold
    from ..models import build_model

    model = build_model(spec["model"], spec["method"], num_classes=spec["num_classes"],
                        in_channels=spec["in_channels"], **dict(spec.get("model_opts") or {}),
                        method_opts=dict(spec.get("method_opts") or {}))
    if spec.get("folded"):
        model = fold(model.eval())
    return model.eval()


#: ``TrainConfig.amp`` → the autocast dtype.
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _autocast(device: torch.device, amp: str | None):
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_AMP_DTYPES[amp])


def _grad_scaler(device: torch.device, amp: str | None):
    if amp != "fp16":
        return None
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device.type)
    return torch.cuda.amp.GradScaler(enabled=device.type == "cuda")  # pragma: no cover - torch < 2.3


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, device: torch.device | str | None = None, amp: str | None = None,
             distributed: bool | None = None) -> dict[str, float]:
    """Mean cross-entropy loss and accuracy of ``model`` over ``loader`` (in eval mode; the mode is restored).

    Under torch.distributed with a sharded loader (``world_size > 1``) the sums are all-reduced, so every process
    gets the metrics of the whole set. Returns ``{"loss", "acc", "acc5", "n", "nonfinite"}`` (``acc5``: top-5
    accuracy, NaN with fewer than 5 classes; ``nonfinite``: how many images got a NaN or infinite output — their
    "accuracy" is meaningless, and the training loop counts any as a collapse).
    """
    model = _unwrap(model)
    was_training = model.training
    model.eval()
    dev = torch.device(device) if device is not None else next(
        (p.device for p in model.parameters()), torch.device("cpu"))
    sums = torch.zeros(5, dtype=torch.float64, device=dev)
    k5 = True
    try:
        for x, y in loader:
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            with _autocast(dev, amp):
                out = model(x)
            out = out.float()
            sums[0] += F.cross_entropy(out, y, reduction="sum").double()
            sums[1] += (out.argmax(1) == y).sum()
            sums[2] += y.numel()
            k5 = k5 and out.shape[1] >= 5
            if k5 and len(y):
                sums[3] += (out.topk(5, dim=1).indices == y[:, None]).any(1).sum()
            sums[4] += (~torch.isfinite(out).reshape(len(out), -1).all(1)).sum()
    finally:
        model.train(was_training)
    if distributed is None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized() and \
            getattr(loader, "world_size", 1) > 1
    if distributed:
        torch.distributed.all_reduce(sums)
    loss, correct, n, correct5, nonfinite = sums.tolist()
    return {"loss": loss / n if n else NAN, "acc": correct / n if n else NAN,
            "acc5": correct5 / n if n and k5 else NAN, "n": int(n), "nonfinite": int(nonfinite)}


def _as_config(config: TrainConfig | Mapping[str, Any] | str | os.PathLike) -> TrainConfig:
    if isinstance(config, TrainConfig):
        return TrainConfig.from_dict(config.to_dict())
    if isinstance(config, Mapping):
        return TrainConfig.from_dict(config)
    from ..config import load_config

    return load_config(config)


def _nonempty_dir(path: str) -> bool:
    return os.path.isdir(path) and any(is_run_file(e.name) for e in os.scandir(path))


def _normalized(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A saved config as the current code reads it: missing keys (fields added since) get their defaults."""
    try:
        return TrainConfig.from_dict(cfg, validate=False).to_dict()
    except (ConfigError, TypeError, ValueError):   # a key of another version: compare what is there
        return {**TrainConfig().to_dict(), **dict(cfg)}


def _config_diff(old: Mapping[str, Any], new: Mapping[str, Any],
                 ignore: frozenset[str] | set[str] = RESUME_MUTABLE_FIELDS) -> list[str]:
    old, new = _normalized(old), _normalized(new)
    out = []
    for k in sorted(set(old) | set(new)):
        if k in ignore:
            continue
        if old.get(k) != new.get(k):
            out.append(f"{k} {old.get(k)!r} → {new.get(k)!r}")
    return out


#: Fields that leave a run the same run (a finished run with other values here is still the one asked for).
_COSMETIC_FIELDS = fields_with("cosmetic")


class ConfigMismatchError(ConfigError):
    """``resume`` into a directory holding a run made with other settings (``diff``: "key old → new" items)."""

    def __init__(self, message: str, diff: list[str]) -> None:
        super().__init__(message)
        self.diff = diff


def _saved_configs(paths: Mapping[str, str]) -> list[tuple[str, dict[str, Any], dict[str, Any] | None]]:
    """(file name, config, result or None) for config.yaml and result.json where they exist and can be read.
    A file that exists but cannot be read is a one-line error (it is not silently replaced)."""
    import json

    import yaml

    out: list[tuple[str, dict[str, Any], dict[str, Any] | None]] = []
    if os.path.isfile(paths["config"]):
        try:
            with open(paths["config"], encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise RunDirError(f"cannot resume: {paths['config']} cannot be read ({type(e).__name__}); it holds the "
                              "settings of the run there, so nothing was changed") from None
        if not isinstance(data, dict):
            raise RunDirError(f"cannot resume: {paths['config']} is not a config mapping; nothing was changed")
        out.append(("config.yaml", data, None))
    if os.path.isfile(paths["result"]):
        try:
            with open(paths["result"], encoding="utf-8") as f:
                res = json.load(f)
        except (OSError, UnicodeDecodeError, ValueError):
            res = None    # a result is rebuilt from the metrics; config.yaml still tells the settings
        if isinstance(res, dict) and isinstance(res.get("config"), dict):
            out.append(("result.json", res["config"], res))
    return out


def _prepare_model(model: nn.Module, cfg: TrainConfig) -> None:
    """The method's acceleration of a built network before it trains (same values and gradients; BENCHMARKS.md)."""
    from ..config import prepare_options
    from ..methods import prepare_for_training

    prepare_for_training(model, cfg.method, **prepare_options(cfg))


def _is_oom(e: BaseException) -> bool:
    """An allocator's out-of-memory error (CPU: "can't allocate memory"; CUDA: OutOfMemoryError)."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    text = str(e).lower()
    return isinstance(e, oom) or "out of memory" in text or "can't allocate memory" in text


def _available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device`` (free GPU memory; on CPU the kernel's MemAvailable, or the
    container's memory limit less its usage if that is smaller), or None where it cannot be told."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    if device.type != "cpu":
        return None
    found: list[int] = []
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:   # cgroup v2 limit of a container
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current", encoding="ascii") as f:
            used = int(f.read().strip())
        if limit != "max":
            found.append(max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def _check_model_fits(build: Callable[[], nn.Module], cfg: TrainConfig, device: torch.device) -> None:
    """Refuse, in one line and before allocating anything, a network whose weights, gradients and momentum alone
    need more memory than ``device`` has. The size comes from building it on the meta device (no memory); a
    network that cannot be built there is not estimated (its real build reports an allocation failure itself)."""
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            meta = build()
        numel = sum(p.numel() for p in meta.parameters())
        bytes_each = max((p.element_size() for p in meta.parameters()), default=4)
    except Exception:   # noqa: BLE001 - a builder that needs real tensors: not estimated
        return
    copies = 2 + (cfg.momentum > 0)           # weights, gradients, SGD momentum
    need = numel * bytes_each * copies
    avail = _available_memory(device)
    if avail is not None and need > avail:
        raise ConfigError(f"model {cfg.model!r} with model_opts {dict(cfg.model_opts)} has {numel:,} parameters: "
                          f"training needs at least {need / 2**30:,.1f} GiB (weights, gradients and momentum), "
                          f"more than the {avail / 2**30:,.1f} GiB available on {device}")


# ---------------------------------------------------------------------------------------------------------- the run
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
