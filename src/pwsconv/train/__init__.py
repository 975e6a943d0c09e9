"""Training: one loop for every experiment (``pwsconv train``, the demo, the paper-table sweeps).

    from pwsconv.config import TrainConfig
    from pwsconv.train import train, evaluate
    result = train(TrainConfig(method="pws", lr=0.5, epochs=5, out_dir="runs/pws"))

See :mod:`pwsconv.train.engine` for the loop (:func:`run_task` runs any :class:`~pwsconv.train.task.Task`: a
classifier's, a detector's, the variance probe's), :mod:`pwsconv.train.step` for its training step (also what
:mod:`pwsconv.experiments.speed` times), :mod:`pwsconv.train.checkpoint` for the checkpoint format and
:mod:`pwsconv.train.distributed` for multi-process training (and why PWS needs no SyncBN).
"""

from ..config import ConfigError, TrainConfig, load_config
from .checkpoint import CheckpointError, WriteError, atomic_save, load_checkpoint, verify_checkpoint
from .engine import (
    ConfigMismatchError,
    RunDirError,
    RunResult,
    build_from_spec,
    evaluate,
    model_spec,
    resolve_device,
    run_task,
    train,
)
from .metrics import read_metrics
from .rundir import RunDirLocked, lock_run_dir
from .step import train_step
from .task import ClassificationTask, Task

__all__ = ["train", "evaluate", "RunResult", "RunDirError", "TrainConfig", "ConfigError", "load_config",
           "CheckpointError", "load_checkpoint", "atomic_save", "build_from_spec", "model_spec", "resolve_device",
           "read_metrics", "verify_checkpoint", "WriteError", "ConfigMismatchError", "RunDirLocked", "lock_run_dir",
           "train_step", "run_task", "Task", "ClassificationTask"]
