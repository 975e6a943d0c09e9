"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint holds only tensors and plain containers of primitives (model/optimizer/scheduler state, RNG states as
tensors, counters, the config as a dict), so loading never runs pickled code. Writing goes to a temporary file in the
same directory, which is fsync'ed and then ``os.replace``'d over the target: a crash leaves either the old file or the
new one, never half of one. Files get the permissions of the user's umask (``0o666 & ~umask``), not mkstemp's 0600.
A failed write (a full disk, a quota, an I/O error) removes the temporary file, leaves the target as it was and raises
:class:`WriteError` — an ``OSError`` whose one-line message names the file.

Integrity: ``torch.save`` writes a zip archive with a CRC-32 per member. :func:`load_checkpoint` verifies every
member's CRC before ``torch.load`` (which does not), so a file whose bytes changed after it was written (a bit flip, a
partial copy, an edit) is refused with a one-line :class:`CheckpointError` instead of loading silently wrong weights.
This needs nothing in the file beyond what ``torch.save`` always wrote, so checkpoints of earlier pwsconv versions load
as before.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import random
import re
import tempfile
import threading
import warnings
import zipfile
from collections import Counter
from typing import Any, Callable

import numpy as np
import torch

__all__ = ["CheckpointError", "WriteError", "atomic_save", "atomic_write_text", "atomic_save_figure",
           "load_checkpoint", "verify_checkpoint", "rng_state", "set_rng_state", "scheduler_state", "load_scheduler_state",
           "current_umask", "file_mode", "check_training_state", "check_model_spec", "CHECKPOINT_FORMAT",
           "MODEL_FORMAT", "FORMAT_VERSION"]

#: ``format`` of a training checkpoint (``pwsconv train``) and of a model-only file (``pwsconv fold``).
CHECKPOINT_FORMAT = "pwsconv-checkpoint"
MODEL_FORMAT = "pwsconv-model"
#: The ``version`` of the files this pwsconv writes, and the only one it reads.
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A missing, truncated, corrupt or foreign checkpoint (one-line message)."""


class WriteError(OSError):
    """A file could not be written (disk full, quota, I/O error, permissions); the message is one line naming it.

    The target file, if it existed, is unchanged and no temporary file is left behind.
    """

    def __init__(self, path: str, reason: str, err: int | None = None) -> None:
        super().__init__(err if err is not None else errno.EIO, reason, path)
        self.path, self.reason = path, reason

    def __str__(self) -> str:
        return f"cannot write {self.path}: {self.reason}"


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it (``/proc/self/status``; elsewhere a guarded set-and-restore)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # pragma: no cover - kernels without the Umask line
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a newly created file gets under the current umask (``0o666 & ~umask``)."""
    return 0o666 & ~current_umask()


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


def _reason(e: BaseException, directory: str) -> tuple[str, int | None]:
    """A short reason for a failed write, and its errno ("no space left on device" for torch's writer errors on a
    full disk, which carry no errno)."""
    err = getattr(e, "errno", None)
    if err in (errno.ENOSPC, errno.EDQUOT):
        return ("no space left on device" if err == errno.ENOSPC else "disk quota exceeded"), err
    if isinstance(e, OSError):
        return (e.strerror or str(e) or type(e).__name__), err
    full = False
    try:
        st = os.statvfs(directory)
        full = st.f_bavail * st.f_frsize < (1 << 20)
    except (OSError, AttributeError):
        pass
    if full:
        return "no space left on device", errno.ENOSPC
    text = re.sub(r"\[enforce fail at [^\]]*\]\s*\.?\s*", "", " ".join(str(e).split())) or type(e).__name__
    return f"write failed, is the disk full? ({text[:160]})", None


def _atomic_write(path: str | os.PathLike, write) -> None:
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    except OSError as e:
        reason, err = _reason(e, d)
        raise WriteError(path, reason, err) from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())   # mkstemp makes 0600; the file follows the umask like open() would
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # ENOSPC / EDQUOT / EIO, or torch's zip writer failing ("file write failed")
        reason, err = _reason(e, d)
        _unlink_quietly(tmp)
        raise WriteError(path, reason, err) from None
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _fsync_dir(d)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` that never leaves a half-written ``path`` (:class:`WriteError` if it fails)."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (:class:`WriteError` if it fails)."""
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110) -> None:
    """Save a matplotlib figure as PNG to ``path`` atomically (a unique temporary name: concurrent writers of the same
    plot never share a file; :class:`WriteError` if writing fails — an error of matplotlib's comes as itself)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    _atomic_write(path, lambda f: f.write(buf.getvalue()))


def _resolve(path: str) -> str:
    if not os.path.lexists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        cand = os.path.join(path, "checkpoint.pt")
        if not os.path.lexists(cand):
            raise CheckpointError(f"{path} is a directory without a checkpoint.pt")
        path = cand
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is not a regular file (a checkpoint is a file written by pwsconv)")
    return path


def verify_checkpoint(path: str | os.PathLike) -> str:
    """Check that ``path`` (or ``path/checkpoint.pt`` for a run directory) is an intact ``torch.save`` zip archive:
    every member's CRC-32 matches its bytes. Returns the file's path; a missing, foreign, truncated or modified file
    is a one-line :class:`CheckpointError` naming it."""
    path = _resolve(os.fspath(path))
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        if head[:2] != b"PK" or not zipfile.is_zipfile(path):
            raise CheckpointError(f"{path} is not a pwsconv checkpoint (not a torch.save zip archive: empty, "
                                  "truncated, a plain pickle or another format)")
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()   # reads every member and checks its CRC-32 and local header
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, NotImplementedError) as e:
        raise CheckpointError(f"{path} is corrupt (its zip structure is damaged: {' '.join(str(e).split())[:120]}); "
                              "it cannot be trusted") from None
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    if bad is not None:
        raise CheckpointError(f"{path} is corrupt: the bytes of {bad!r} no longer match their CRC-32 (the file "
                              "changed after it was written); refusing to load it")
    return path


def load_checkpoint(path: str | os.PathLike, *, formats: tuple[str, ...] = (CHECKPOINT_FORMAT, MODEL_FORMAT),
                    map_location: Any = "cpu") -> dict[str, Any]:
    """Load a pwsconv checkpoint with ``weights_only=True`` after :func:`verify_checkpoint`; anything wrong is a
    one-line :class:`CheckpointError` naming the file."""
    path = verify_checkpoint(path)
    try:
        with warnings.catch_warnings():   # torch's warnings about foreign files would precede the error line
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # garbage bytes, disallowed globals, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if len(reason) > 160:
            reason = reason[:157] + "..."
        raise CheckpointError(f"cannot read checkpoint {path}: corrupt, truncated or not a pwsconv checkpoint "
                              f"({type(e).__name__}: {reason})") from None
    if not isinstance(obj, dict) or obj.get("format") not in formats:
        raise CheckpointError(f"{path} is not a pwsconv checkpoint (expected format {' or '.join(formats)})")
    _check_header(obj, path)
    return obj


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_header(obj: dict[str, Any], path: str) -> None:
    """The fields every pwsconv file has: a known format version; config / model_spec / model of the right kind (a
    file edited by hand keeps valid CRCs, so its contents are checked before anything uses them)."""
    v = obj.get("version")
    if not _is_int(v):
        raise CheckpointError(f"{path}: its format version is {v!r}, not an integer (the file was edited or is not "
                              "a pwsconv checkpoint)")
    if v != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {v}; this pwsconv reads version {FORMAT_VERSION}"
                              + (" (it was written by a newer pwsconv: upgrade to read it)" if v > FORMAT_VERSION
                                 else ""))
    for key in ("config", "model_spec", "model"):
        if key in obj and obj[key] is not None and not isinstance(obj[key], dict):
            raise CheckpointError(f"{path}: its {key} is a {type(obj[key]).__name__}, not a mapping (the file was "
                                  "edited or is damaged)")


def check_model_spec(spec: Any, path: str) -> dict[str, Any]:
    """``spec`` (a file's ``model_spec``) if it can rebuild a network, else a one-line :class:`CheckpointError`
    naming ``path`` and the field."""
    def bad(field: str, want: str) -> CheckpointError:
        got = spec.get(field, "missing") if isinstance(spec, dict) else spec
        return CheckpointError(f"{path}: its model_spec.{field} must be {want}, got {got!r} (the file was edited "
                               "or is damaged)")

    if not isinstance(spec, dict):
        raise CheckpointError(f"{path} has no usable model_spec (got {type(spec).__name__})")
    for field in ("model", "method"):
        if not isinstance(spec.get(field), str) or not spec[field]:
            raise bad(field, "a name")
    for field in ("num_classes", "in_channels"):
        if not _is_int(spec.get(field)) or spec[field] < 1:
            raise bad(field, "an integer ≥ 1")
    for field in ("method_opts", "model_opts"):
        if spec.get(field) is not None and not isinstance(spec[field], dict):
            raise bad(field, "a mapping")
    for field in ("mean", "std"):
        v = spec.get(field)
        if not (isinstance(v, (list, tuple)) and len(v) == spec["in_channels"] and all(_is_number(x) and
                                                                                         math.isfinite(x) for x in v)):
            raise bad(field, f"a list of {spec['in_channels']} finite numbers")
    if not all(x > 0 for x in spec["std"]):
        raise bad("std", "positive")
    return spec


#: The fields of a training checkpoint that resuming reads: (field, check, what it must be).
_TRAINING_FIELDS: tuple[tuple[str, Any, str], ...] = (
    ("config", lambda v: isinstance(v, dict), "a mapping"),
    ("model", lambda v: isinstance(v, dict), "a state_dict"),
    ("optimizer", lambda v: isinstance(v, dict) and isinstance(v.get("state"), dict)
     and isinstance(v.get("param_groups"), list), "an optimizer state_dict (state and param_groups)"),
    ("scheduler", lambda v: isinstance(v, dict) and _is_int(v.get("last_epoch")) and v["last_epoch"] >= 0,
     "a scheduler state_dict (with last_epoch ≥ 0)"),
    ("scaler", lambda v: v is None or isinstance(v, dict), "null or a GradScaler state_dict"),
    ("epoch", lambda v: _is_int(v) and v >= 0, "an integer ≥ 0"),
    ("batch", lambda v: _is_int(v) and v >= 0, "an integer ≥ 0"),
    ("step", lambda v: _is_int(v) and v >= 0, "an integer ≥ 0"),
    ("sums", lambda v: isinstance(v, (list, tuple)) and len(v) == 3 and all(_is_number(x) for x in v),
     "3 numbers"),
    ("wall_time", lambda v: _is_number(v) and math.isfinite(v) and v >= 0, "a finite number ≥ 0"),
    ("status", lambda v: v in ("running", "ok", "nan"), "'running', 'ok' or 'nan'"),
    ("rng", lambda v: isinstance(v, list) and len(v) >= 1 and all(_rng_ok(s) for s in v),
     "a list of RNG states (torch, numpy, python)"),
)


def _rng_ok(s: Any) -> bool:
    if not isinstance(s, dict) or not isinstance(s.get("torch"), torch.Tensor) or s["torch"].dtype != torch.uint8:
        return False
    n, p = s.get("numpy"), s.get("python")
    return (isinstance(n, dict) and isinstance(n.get("keys"), torch.Tensor) and n["keys"].numel() == 624
            and isinstance(n.get("name"), str) and _is_int(n.get("pos")) and _is_int(n.get("has_gauss"))
            and _is_number(n.get("cached_gaussian"))
            and isinstance(p, dict) and isinstance(p.get("internal"), torch.Tensor) and _is_int(p.get("version"))
            and (p.get("gauss_next") is None or _is_number(p.get("gauss_next"))))


def check_training_state(ck: dict[str, Any], path: str,
                         check_spec: Callable[[Any, str], Any] | None = None) -> dict[str, Any]:
    """``ck`` if it holds everything a resumed run reads, of the right kinds (counters ≥ 0, a known status, RNG
    states, optimizer state...); else a one-line :class:`CheckpointError` naming ``path`` and the field. Whether the
    states fit the run's model and optimizer is checked when they are loaded into them. ``check_spec``: how its
    ``model_spec`` is checked (default :func:`check_model_spec`, a classifier's)."""
    for field, ok, want in _TRAINING_FIELDS:
        if field not in ck:
            raise CheckpointError(f"cannot resume from {path}: it has no {field} (the file was edited or is not a "
                                  "training checkpoint); nothing was changed")
        if not ok(ck[field]):
            got = ck[field]
            shown = repr(got) if not isinstance(got, (dict, list, tuple)) else type(got).__name__
            raise CheckpointError(f"cannot resume from {path}: its {field} must be {want}, got {shown[:80]} (the "
                                  "file was edited or is damaged); nothing was changed")
    (check_spec or check_model_spec)(ck.get("model_spec"), path)   # rewritten by the resumed run: not hidden
    return ck


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
    """Restore the states of :func:`rng_state`. All or nothing: if one of them is refused (e.g. a damaged state of
    the wrong size), the RNGs are left as they were and the error is raised."""
    before = rng_state()
    try:
        _set_rng_state(state)
    except BaseException:
        _set_rng_state(before)
        raise


def _set_rng_state(state: dict[str, Any]) -> None:
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
