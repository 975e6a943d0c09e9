"""Where a run computes: device checks and resolution, autocast and the fp16 grad scaler, out-of-memory detection and
the estimate of whether a model fits before it is allocated."""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn

from ..config import ConfigError, TrainConfig

__all__ = ["DEVICE_TYPES", "check_device", "resolve_device"]

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
