"""Training-speed measurement shared by ``pwsconv reproduce table1`` and ``benchmarks/bench_methods.py``.

Speeds are compared fairly only when measured in one process, same model and input, interleaved round-robin (one
call of every candidate per round, so a drift in machine load hits all of them alike), as medians over rounds.

    from pwsconv.experiments.speed import train_step_rates
    rates = train_step_rates("convpool_cnn_c_small", ["bn", "pws"], batch_size=8, model_opts={"width": 0.125})
    # {"bn": {"ms": 12.1, "images_per_s": 661.0}, "pws": {...}}
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..train.step import train_step

__all__ = ["timed_interleaved", "interleaved_samples", "train_step_fn", "train_step_rates"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_samples(fns: Mapping[str, Callable[[], None]], device: torch.device | str = "cpu",
                        rounds: int = 10, inner: int = 1, clock: Callable[[], float] = time.perf_counter,
                        first_round: int = 0, deadline: float | None = None,
                        samples: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each fn, ``rounds`` rounds round-robin (one timed sample of each fn per round, the order
    rotated by one every round, starting at rotation ``first_round``), appended to ``samples`` (a new dict if None).
    Stops early, between rounds, once ``time.perf_counter()`` passes ``deadline``."""
    device = torch.device(device)
    samples = {k: [] for k in fns} if samples is None else samples
    items = list(fns.items())
    for r in range(first_round, first_round + rounds):
        if deadline is not None and time.perf_counter() > deadline:
            break
        # rotate the order every round, so that no method always runs right after the same (e.g. cache-thrashing) one
        for k, f in items[r % len(items):] + items[:r % len(items)]:
            _sync(device)
            t = clock()
            for _ in range(inner):
                f()
            _sync(device)
            samples.setdefault(k, []).append((clock() - t) / inner)
    return samples


def timed_interleaved(fns: Mapping[str, Callable[[], None]], device: torch.device | str = "cpu", repeats: int = 10,
                      warmup: int = 2, inner: int = 1,
                      clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds per call of each fn, measured round-robin (one call of each per round, the order rotated by one
    every round). ``clock=time.thread_time`` with one torch thread measures CPU time of this thread only, which other
    processes on a busy machine barely disturb (wall time is the default)."""
    if repeats < 1 or warmup < 0 or inner < 1:
        raise ValueError(f"repeats and inner must be ≥ 1 and warmup ≥ 0, got {repeats}, {inner}, {warmup}")
    device = torch.device(device)
    for _ in range(warmup):
        for f in fns.values():
            f()
    samples = interleaved_samples(fns, device, repeats, inner, clock)
    return {k: statistics.median(v) for k, v in samples.items()}


def _prepare_model(net: nn.Module, fuse: bool, recompute: bool) -> None:
    """The method's acceleration of ``net`` before it trains, as the engine applies it (``TrainConfig.fuse_pws``,
    ``TrainConfig.pws_recompute``)."""
    from ..methods import prepare_for_training

    prepare_for_training(net, None, fuse=fuse, recompute=recompute)   # the method is not known: every method's


def train_step_fn(net: nn.Module, x: Any, y: Any, lr: float = 1e-3,
                  extra: Callable[[], None] | None = None, fuse: bool = True,
                  recompute: bool = False, amp: torch.dtype | None = None,
                  loss_fn: Callable[[nn.Module, Any, Any], tuple[torch.Tensor, Any]] | None = None,
                  compile: bool = False) -> Callable[[], None]:
    """A callable taking one training step of ``net`` on ``(x, y)`` with the engine's step
    (:func:`pwsconv.train.step.train_step`; float32, or under autocast to ``amp``): SGD momentum 0.9 with weight
    decay 5e-4 (none on α), PWS layers standardized in one node when ``fuse``, α·Ŵ rebuilt in backward when also
    ``recompute``, and ``extra()`` called between backward and the optimizer step. ``loss_fn``: see
    :func:`~pwsconv.train.step.train_step` (detectors); ``compile``: the prepared network under ``torch.compile``
    (compiled on the first call)."""
    from ..optim import param_groups

    net.train()
    _prepare_model(net, fuse, recompute)
    opt = torch.optim.SGD(param_groups(net, 5e-4), lr=lr, momentum=0.9)

    model = torch.compile(net) if compile else net
    device_type = next((p.device.type for p in net.parameters()), "cpu")

    def step() -> None:
        train_step(model, opt, x, y, before_step=extra, amp=amp, device_type=device_type, loss_fn=loss_fn)

    return step


def train_step_rates(model: str, methods: Sequence[str], batch_size: int, *, model_opts: Mapping[str, Any] | None = None,
                     method_opts: Mapping[str, Mapping[str, Any]] | None = None, image_size: int = 32,
                     in_channels: int = 3, num_classes: int = 10, repeats: int = 10, warmup: int = 2,
                     device: str = "cpu", seed: int = 0, amp: str | None = None,
                     channels_last: bool = False) -> dict[str, dict[str, float]]:
    """Training images/s of ``model`` with each normalization method, measured interleaved in this process on random
    inputs (forward + backward + SGD step; under autocast to ``amp`` = "bf16"/"fp16" if given, channels-last memory
    format if asked). Returns ``{method: {"ms", "images_per_s", "ratio_to_first"}}``."""
    from ..models import build_model

    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    dev = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, in_channels, image_size, image_size, generator=g).to(dev)
    y = torch.randint(0, num_classes, (batch_size,), generator=g).to(dev)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    dtype = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    fns = {}
    for m in methods:
        torch.manual_seed(seed)
        net = build_model(model, m, num_classes=num_classes, in_channels=in_channels, **dict(model_opts or {}),
                          method_opts=dict((method_opts or {}).get(m, {}))).to(dev).to(memory_format=fmt)
        fns[m] = train_step_fn(net, x, y, amp=dtype)
    t = timed_interleaved(fns, dev, repeats, warmup)
    first = t[methods[0]]
    return {m: {"ms": s * 1e3, "images_per_s": batch_size / s, "ratio_to_first": s / first} for m, s in t.items()}
