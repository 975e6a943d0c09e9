"""The paper's measurement modes and its Figure 1 experiment (``pwsconv probe``).

- :func:`measure_without_update`: the mode of Figure 6's caption — forward and backward on every batch, compute what
  the update would be, do not apply it — so that a network that would collapse at a large LR can be measured on all
  the data.
- :func:`run_probe_experiment`: the Figure 1 experiment — the same network built for each normalization method
  ("none", "bn", "pws", ...), trained (the engine's loop with a :class:`ProbeTask`) or measured without update at a
  large LR with SGD (momentum 0.9), a :class:`~pwsconv.diagnostics.VarianceProbe` on each; writes CSV + JSON lines + the PNG plots of Figures 1, 2, 6 and
  of Var[Y_l] vs eq. 5, and returns a short Markdown summary: the shift of the average gradient per layer for each
  method and whether the plain network's Var[Y_l] grows with depth as eq. 6 predicts.
"""

from __future__ import annotations

import copy
import math
import os
import sys
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..optim import remap_optimizer_groups
from ..train import TrainConfig
from ..train.engine import run_task
from ..train.step import train_step
from ..train.task import Task
from .plots import has_clipping, plot_clipping, plot_figure1, plot_figure2, plot_figure6, plot_variance_transmission
from .probe import VarianceProbe
from .records import Record, write_csv, write_jsonl
from .report import depth_report, markdown_summary

__all__ = ["measure_without_update", "run_probe_experiment", "markdown_summary", "depth_report"]

Batches = Iterable[tuple[Any, Any]] | Callable[[], Iterable[tuple[Any, Any]]]


def _progress(it: Iterable, total: int | None, desc: str, enabled: bool | None) -> Iterable:
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is in the "suite" extra
        return it
    return tqdm(it, total=total, desc=desc, leave=False)


def _batch_iter(batches: Batches) -> Iterator[tuple[Any, Any]]:
    return iter(batches() if callable(batches) else batches)


def _to(obj: Any, device: torch.device | None) -> Any:
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(o, device) for o in obj)
    return obj


def _model_device(model: nn.Module) -> torch.device | None:
    for p in model.parameters():
        return p.device
    return None


def _is_finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t.detach()).all())


def measure_without_update(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None,
    batches: Batches,
    lr: float | None = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    steps: int | None = None,
    every: int = 1,
    restore: bool = True,
    progress: bool | None = None,
    probe: VarianceProbe | None = None,
    desc: str = "measure",
) -> VarianceProbe:
    """Measure every batch without updating the model (Figure 6 caption; Figure 1 uses ΔW = LR·∇W).

    For each batch (x, y): forward, ``loss_fn(model(x), y)`` (default cross-entropy), backward, then the probe records
    what the update would be — ΔW = ``lr``·∇W, or, with ``optimizer``, the update that optimizer would apply: it is
    stepped and the parameters and the optimizer state are put back right after (so every batch's update is the one
    from the same state). Nothing is applied: with ``restore=True`` (default) every parameter and buffer (e.g. BN
    running statistics, a data-initialized PWS α) is restored at the end to its value before the call, and the
    gradients are left as None. A batch whose loss is not finite is recorded (NaN) and skipped.

    Args:
        batches: an iterable of (x, y) or a callable returning one; ``steps`` limits the number of batches.
        probe: an existing (detached) probe to record into; by default a new ``VarianceProbe(model, lr=lr)`` or
            ``VarianceProbe(model, optimizer)``.

    Returns:
        The probe (detached), with one recorded step per batch (``every`` as in the probe) and the loss as the
        model-level ``loss`` record.
    """
    if optimizer is None and lr is None and probe is None:
        raise ValueError("measure_without_update needs lr (ΔW = lr·∇W) or an optimizer")
    loss_fn = loss_fn or F.cross_entropy
    device = _model_device(model)
    params = list(model.parameters())
    saved = [t.detach().clone() for t in params] if restore else []
    bufs = list(model.buffers())
    saved_bufs = [b.detach().clone() for b in bufs] if restore else []
    if probe is None:
        probe = VarianceProbe(model, optimizer=optimizer, lr=lr, every=every)
    groups = list(optimizer.param_groups) if optimizer is not None else []   # replaced by each load_state_dict
    task_loss, record = _probed(probe, loss_fn, logit_scale=False)
    try:
        probe.attach()
        it = _batch_iter(batches)
        for i, batch in enumerate(_progress(it, steps, desc, progress)):
            if steps is not None and i >= steps:
                break
            x, y = _to(batch[0], device), _to(batch[1], device)
            loss, _ = train_step(model, None, x, y, loss_fn=task_loss, after_forward=record)   # gradients only
            if not _is_finite(loss):
                probe.step()
                continue
            if optimizer is not None:
                before = [p.detach().clone() for p in params]
                state = copy.deepcopy(optimizer.state_dict())
                optimizer.step()  # the probe records the update here
                with torch.no_grad():
                    for p, b in zip(params, before):
                        p.copy_(b)
                optimizer.load_state_dict(state)
            elif not probe.auto:
                probe.step()
    finally:
        probe.detach()
        model.zero_grad(set_to_none=True)
        if optimizer is not None:   # gamma="auto" layers linked to the optimizer's groups follow their successors
            remap_optimizer_groups(model, groups, optimizer.param_groups)
        if restore:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
                for b, s in zip(bufs, saved_bufs):
                    b.copy_(s)
    return probe


class _Cycle:
    """The engine's loader over ``batches``: ``steps`` batches a run, re-read from the start when they run out."""

    def __init__(self, batches: Batches, steps: int) -> None:
        self.batches, self.steps = batches, steps

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        it = _batch_iter(self.batches)
        for _ in range(self.steps):
            batch = next(it, None)
            if batch is None:  # cycle over the data
                it = _batch_iter(self.batches)
                batch = next(it, None)
                if batch is None:
                    raise ValueError("the probe's batches are empty: there is nothing to train on")
            yield batch[0], batch[1]


class ProbeTask(Task):
    """One method's run of the Figure 1 experiment as a task of the engine's loop
    (:func:`pwsconv.train.engine.run_task`): ``steps`` SGD steps of ``model_fn(method)`` (built under ``seed``; α
    exempt from weight decay) on ``batches``, an in-memory run (no files) with a :class:`VarianceProbe` on the
    network and its optimizer, recording between forward and backward (the loss, the logit scale) in
    ``after_forward``. The first non-finite loss ends the run
    there (no backward; its forward statistics are kept): ``collapsed_at`` is that step (0-based)."""

    files = False
    check_weights = False   # a non-finite loss ends the run, as the probe's records show it
    rate_unit = "it"        # batch_sums counts steps (the loss is the mean over steps)
    eval_every = 0

    def __init__(self, model_fn: Callable[[str], nn.Module], method: str, batches: Batches, loss_fn: Callable, *,
                 steps: int, lr: float, momentum: float, weight_decay: float, seed: int, every: int,
                 device: str | torch.device | None, progress: bool | None) -> None:
        super().__init__(TrainConfig(model="custom", method=method, lr=lr, momentum=momentum,
                                     weight_decay=weight_decay, seed=seed, epochs=1, max_steps=steps, batch_size=1,
                                     log_every=1, ckpt_every=0, name=f"probe {method}",
                                     device=str(device) if device is not None else "cpu",
                                     progress=sys.stderr.isatty() if progress is None else bool(progress)))
        self.model_fn, self.user_loss, self.every = model_fn, loss_fn, every
        self.train_loader = _Cycle(batches, steps)
        self.collapsed_at: int | None = None
        self.calls = 0

    def setup(self, dist: Any, device: torch.device) -> None:
        pass

    def build(self) -> nn.Module:
        return self.model_fn(self.cfg.method)

    def prepare(self, model: nn.Module) -> None:
        pass   # no fused standardization: the probe sees every layer's own forward

    def bind(self, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        self.probe = VarianceProbe(model, optimizer=opt, every=self.every).attach()
        self._loss, self._record = _probed(self.probe, self.user_loss, logit_scale=True)

    def loss_fn(self, model: nn.Module, x: Any, y: Any) -> tuple[Tensor, Any]:
        return self._loss(model, x, y)

    def after_forward(self, loss: Tensor, out: Any) -> bool:
        finite = self._record(loss, out)
        if not finite:
            self.collapsed_at = self.calls
            self.probe.step()  # keep this step's forward statistics (NaN/inf recorded as NaN)
        self.calls += 1
        return finite

    def batch_sums(self, loss: Tensor, out: Any, x: Any, y: Any) -> Tensor:
        return torch.stack([loss.detach().double(), loss.new_zeros((), dtype=torch.float64),
                            loss.new_ones((), dtype=torch.float64)])

    def metrics(self, train: list[float], ev: dict[str, Any] | None, ips: float) -> dict[str, float]:
        return {"train_loss": train[0] / max(train[2], 1)}

    def nan_metrics(self, ips: float) -> dict[str, float]:
        return {"train_loss": math.nan}

    def row(self, metrics: dict[str, Any], ev: dict[str, Any] | None, epoch_time: float) -> dict[str, Any]:
        return dict(metrics)


def _training_run(task: ProbeTask) -> tuple[VarianceProbe, int | None]:
    """Train the task's run through the engine's loop; the probe (detached) and the step of the collapse, if any."""
    try:
        run_task(task)
    finally:
        if hasattr(task, "probe"):
            task.probe.detach()
    return task.probe, task.collapsed_at


def _probed(probe: VarianceProbe, loss_fn: Callable, logit_scale: bool) -> tuple[Callable, Callable]:
    """For the training step: the task loss ``(model, x, y) -> (loss_fn(model(x), y), output)`` and the hook that
    records between forward and backward (the loss, the logit scale; ``False`` for a non-finite loss: no backward)."""
    def task(model: nn.Module, x: Any, y: Any) -> tuple[Tensor, Any]:
        out = model(x)
        return loss_fn(out, y), out

    def record(loss: Tensor, out: Any) -> bool:
        probe.log("loss", float(loss.detach()))
        if logit_scale and isinstance(out, torch.Tensor) and out.is_floating_point():
            probe.log("logit_std", float(out.detach().float().std()))   # the logit scale
        return _is_finite(loss)

    return task, record


def _reusable(batches: Batches, steps: int | None) -> Batches:
    """Callables and re-iterable containers are used as they are; a one-shot iterator is materialized (``steps``
    batches) so that every method sees the same data."""
    if callable(batches):
        return batches
    if iter(batches) is batches:  # an iterator / generator
        out = []
        for i, b in enumerate(batches):
            if steps is not None and i >= steps:
                break
            out.append(b)
        return out
    return batches


# ---------------------------------------------------------------------------------------------------- experiment
def run_probe_experiment(
    model_fn: Callable[[str], nn.Module],
    batches: Batches,
    methods: Sequence[str] = ("none", "bn", "pws"),
    lr: float = 0.1,
    steps: int = 20,
    mode: str = "train",
    out_dir: str | os.PathLike | None = None,
    *,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    every: int = 1,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    plots: bool = True,
    verbose: bool = False,
) -> dict[str, Any]:
    """The paper's Figure 1 experiment on any network: one probe per normalization method at a large LR.

    For each method, ``torch.manual_seed(seed)`` then ``model_fn(method)`` builds the network (e.g.
    ``lambda m: pwsconv.convert(base(), method=m)``). ``mode="train"``: ``steps`` SGD steps (``lr``, ``momentum``
    0.9, ``weight_decay`` with α exempt, as the paper sets) — the engine's training loop, :class:`ProbeTask`, on
    ``device`` (default the CPU) —, ΔW = the optimizer's actual update; a method whose loss
    becomes NaN/inf is stopped there (its NaN statistics are kept) and the others go on. ``mode="measure"``:
    :func:`measure_without_update` on ``steps`` batches (ΔW = lr·∇W, nothing applied; Figure 6 caption).

    ``batches``: an iterable of (x, y) batches or a callable returning one; re-iterable containers and callables are
    re-read for each method, a one-shot iterator is first materialized. In train mode the data are cycled if there
    are fewer than ``steps`` batches. Default loss: cross-entropy.

    Writes to ``out_dir`` (when given): ``records.csv`` and ``records.jsonl`` (all methods, a ``method`` column),
    ``figure1.png`` (raw weights), ``figure1_effective.png``, ``figure2.png``, ``figure6.png``, ``variance.png``,
    ``summary.md``.

    Returns:
        dict with ``markdown`` (the report of :func:`markdown_summary`), ``records`` ({method: records}),
        ``summary`` ({method: per-layer summary}), ``depth`` ({method: :func:`depth_report`}), ``collapsed``
        ({method: first non-finite step or None}), ``files`` ({name: path}) and ``config``.
    """
    if mode not in ("train", "measure"):
        raise ValueError(f"mode must be 'train' or 'measure', got {mode!r}")
    if not methods:
        raise ValueError("methods must name at least one normalization method")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    from .records import summarize

    loss_fn = loss_fn or F.cross_entropy
    data = _reusable(batches, steps)
    dev = torch.device(device) if device is not None else None
    records_by_method: dict[str, list[Record]] = {}
    collapsed: dict[str, int | None] = {}
    for method in methods:
        if mode == "train":   # the engine's loop: seeded build, SGD with α exempt from weight decay
            probe, c = _training_run(ProbeTask(model_fn, method, data, loss_fn, steps=steps, lr=lr, momentum=momentum,
                                               weight_decay=weight_decay, seed=seed, every=every, device=device,
                                               progress=progress))
        else:
            torch.manual_seed(seed)
            model = model_fn(method)
            if dev is not None:
                model = model.to(dev)
            model.train()
            probe = measure_without_update(model, loss_fn, data, lr=lr, steps=steps, every=every, progress=progress,
                                           desc=f"measure {method}")
            losses = [r for r in probe.records if r["stat"] == "loss" and r["value"] != r["value"]]
            c = losses[0]["step"] if losses else None
        records_by_method[method] = probe.records
        collapsed[method] = c if c is not None else (None if not probe.collapsed else _first_nan_step(probe.records))

    config = (f"mode: {mode}; lr {lr:g}" + (f" (SGD, momentum {momentum:g}, weight decay {weight_decay:g})"
                                             if mode == "train" else " (ΔW = lr·∇W, not applied)")
              + f"; {steps} steps; every {every}; methods: {', '.join(methods)}")
    md = markdown_summary(records_by_method, collapsed=collapsed, config=config)
    files: dict[str, str] = {}
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        tagged = [dict(r, method=m) for m, recs in records_by_method.items() for r in recs]
        files["csv"] = str(write_csv(tagged, os.path.join(out_dir, "records.csv")))
        files["jsonl"] = str(write_jsonl(tagged, os.path.join(out_dir, "records.jsonl")))
        if plots:
            files["figure1"] = str(plot_figure1(records_by_method, os.path.join(out_dir, "figure1.png")))
            files["figure1_effective"] = str(plot_figure1(records_by_method,
                                                          os.path.join(out_dir, "figure1_effective.png"),
                                                          weight="effective"))
            files["figure2"] = str(plot_figure2(records_by_method, os.path.join(out_dir, "figure2.png")))
            files["figure6"] = str(plot_figure6(records_by_method, os.path.join(out_dir, "figure6.png")))
            files["variance"] = str(plot_variance_transmission(records_by_method,
                                                               os.path.join(out_dir, "variance.png")))
            if has_clipping(records_by_method):
                files["clipping"] = str(plot_clipping(records_by_method, os.path.join(out_dir, "clipping.png")))
        path = os.path.join(out_dir, "summary.md")
        with open(path, "w", encoding="utf-8") as f:
            f.write(md)
        files["summary"] = path
    if verbose:
        print(md)
    return {
        "markdown": md,
        "records": records_by_method,
        "summary": {m: summarize(r) for m, r in records_by_method.items()},
        "depth": {m: depth_report(r) for m, r in records_by_method.items()},
        "collapsed": collapsed,
        "files": files,
        "config": {"mode": mode, "lr": lr, "steps": steps, "every": every, "momentum": momentum,
                   "weight_decay": weight_decay, "methods": list(methods), "seed": seed},
    }


def _first_nan_step(records: Sequence[Record]) -> int | None:
    steps = [r["step"] for r in records if r["value"] != r["value"] and r["stat"] in ("loss", "y_var", "grad_norm")]
    return min(steps) if steps else None
