"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint holds only tensors and plain containers of primitives (model/optimizer/scheduler state, RNG states as
tensors, counters, the config as a dict), so loading never runs pickled code. Writing goes to a temporary file in the
same directory, which is fsync'ed and then ``os.replace``'d over the target: a crash leaves either the old file or the
new one, never half of one.
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
from collections import Counter
from typing import Any

import numpy as np
import torch

__all__ = ["CheckpointError", "atomic_save", "atomic_write_text", "load_checkpoint", "rng_state", "set_rng_state",
           "scheduler_state", "load_scheduler_state", "CHECKPOINT_FORMAT", "MODEL_FORMAT"]

#: ``format`` of a training checkpoint (``pwsconv train``) and of a model-only file (``pwsconv fold``).
CHECKPOINT_FORMAT = "pwsconv-checkpoint"
MODEL_FORMAT = "pwsconv-model"


class CheckpointError(ValueError):
    """A missing, truncated, corrupt or foreign checkpoint (one-line message)."""


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str | os.PathLike, write) -> None:
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(d)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` that never leaves a half-written ``path``."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def load_checkpoint(path: str | os.PathLike, *, formats: tuple[str, ...] = (CHECKPOINT_FORMAT, MODEL_FORMAT),
                    map_location: Any = "cpu") -> dict[str, Any]:
    """Load a pwsconv checkpoint with ``weights_only=True``; anything wrong is a one-line :class:`CheckpointError`."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        cand = os.path.join(path, "checkpoint.pt")
        if not os.path.isfile(cand):
            raise CheckpointError(f"{path} is a directory without a checkpoint.pt")
        path = cand
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, garbage bytes, disallowed globals, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if len(reason) > 160:
            reason = reason[:157] + "..."
        raise CheckpointError(f"cannot read checkpoint {path}: corrupt, truncated or not a pwsconv checkpoint "
                              f"({type(e).__name__}: {reason})") from None
    if not isinstance(obj, dict) or obj.get("format") not in formats:
        raise CheckpointError(f"{path} is not a pwsconv checkpoint (expected format {' or '.join(formats)})")
    return obj


# ------------------------------------------------------------------------------------------------------------ RNG
def rng_state() -> dict[str, Any]:
    """The torch (CPU and CUDA), numpy and python RNG states, as tensors and primitives only."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": {"name": str(np_state[0]), "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_version), "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss_next": None if py_gauss is None else float(py_gauss)},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["internal"].tolist()), p["gauss_next"]))


# ------------------------------------------------------------------------------------------------------ scheduler
def scheduler_state(sched: torch.optim.lr_scheduler.LRScheduler) -> dict[str, Any]:
    """The scheduler's state with ``Counter`` turned into a dict (older torch cannot load Counter weights-only)."""
    sd = dict(sched.state_dict())
    if isinstance(sd.get("milestones"), Counter):
        sd["milestones"] = {int(k): int(v) for k, v in sd["milestones"].items()}
    return sd


def load_scheduler_state(sched: torch.optim.lr_scheduler.LRScheduler, sd: dict[str, Any]) -> None:
    sd = dict(sd)
    if isinstance(sd.get("milestones"), dict):
        sd["milestones"] = Counter({int(k): int(v) for k, v in sd["milestones"].items()})
    sched.load_state_dict(sd)


def json_safe(v: Any) -> Any:
    """Non-finite floats → None (strict JSON); containers recursively."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v


def dumps(obj: Any) -> str:
    return json.dumps(json_safe(obj), allow_nan=False)
