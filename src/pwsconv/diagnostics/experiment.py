"""The paper's measurement modes and its Figure 1 experiment (``pwsconv probe``).

- :func:`measure_without_update`: the mode of Figure 6's caption — forward and backward on every batch, compute what
  the update would be, do not apply it — so that a network that would collapse at a large LR can be measured on all
  the data.
- :func:`run_probe_experiment`: the Figure 1 experiment — the same network built for each normalization method
  ("none", "bn", "pws", ...), trained (or measured without update) at a large LR with SGD (momentum 0.9), a
  :class:`~pwsconv.diagnostics.VarianceProbe` on each; writes CSV + JSON lines + the PNG plots of Figures 1, 2, 6 and
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

from ..train.step import train_step
from .plots import has_clipping, plot_clipping, plot_figure1, plot_figure2, plot_figure6, plot_variance_transmission
from .probe import VarianceProbe
from .records import Record, layer_profile, write_csv, write_jsonl

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
        if restore:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
                for b, s in zip(bufs, saved_bufs):
                    b.copy_(s)
    return probe


def _training_run(model: nn.Module, loss_fn: Callable, batches: Batches, steps: int, optimizer: torch.optim.Optimizer,
                  every: int, progress: bool | None, desc: str) -> tuple[VarianceProbe, int | None]:
    """Train ``steps`` SGD steps with a probe on; stop at the first non-finite loss (the step is returned)."""
    device = _model_device(model)
    probe = VarianceProbe(model, optimizer=optimizer, every=every)
    collapsed_at: int | None = None
    task_loss, record = _probed(probe, loss_fn, logit_scale=True)
    with probe:
        it = _batch_iter(batches)
        for step in _progress(range(steps), steps, desc, progress):
            batch = next(it, None)
            if batch is None:  # cycle over the data
                it = _batch_iter(batches)
                batch = next(it, None)
                if batch is None:
                    break
            x, y = _to(batch[0], device), _to(batch[1], device)
            loss, _ = train_step(model, optimizer, x, y, loss_fn=task_loss, after_forward=record)
            if not _is_finite(loss):
                collapsed_at = step
                probe.step()  # keep this step's forward statistics (NaN/inf recorded as NaN)
                break
    return probe, collapsed_at


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


# ---------------------------------------------------------------------------------------------------- reports
def _fmt(v: float | None) -> str:
    if v is None or v != v:
        return "nan"
    if v == 0:
        return "0"
    a = abs(v)
    return f"{v:.3g}" if 1e-3 <= a < 1e4 else f"{v:.2e}"


def _conv_layers(records: Sequence[Record]) -> set[int]:
    conv = {r["layer_index"] for r in records if r["layer_index"] >= 0 and "Conv" in str(r["kind"])}
    return conv or {r["layer_index"] for r in records if r["layer_index"] >= 0}


def depth_report(records: Sequence[Record]) -> dict[str, Any]:
    """How Var[Y_l] evolves with depth in one method's records (eq. 6), over the conv layers (a global pooling before a
    linear classifier is outside eq. 5's chain; all layers when there is no conv).

    Returns ``ratio_first`` / ``ratio_last``: Var[Y_L] / Var[Y_1] at the first and the last recorded step whose
    values are finite; ``eq15_first`` / ``eq15_last``: the growth eq. 15 predicts, Π_{l≥2} (1 + E²[X_l] /
    (2E[X_l²])·Var_o[n_l·E[W_o]]); ``corr_log``: Pearson correlation of log10 measured vs log10 eq. 5-predicted
    Var[Y_l] over all layers ≥ 2 and steps; ``median_ratio``: the median of measured / predicted; ``points``.

    ``factors_first``: ``ratio_first`` as an exact product of four measured factors over the layers l ≥ 2
    (each Π_l; NaN when a statistic is missing): ``relu`` — E[X_l²] / (½·Var[Y_{l−1}]) (1 where eq. 2 holds);
    ``filters`` — eq. 5's prediction from the layer's own input over 2·E[X_l²] (the filters' scale n_l·Var[W_o]/2 and
    their mean shift, eq. 15's part: 1 for He-scaled zero-mean filters; PWS's γ makes it Var/(Var + γ) per layer); ``common_mean`` — 1 − E²[X_l]/E[X_l²]: eq. 5
    counts the inputs' common mean E²[X_l] in its first term, but the deviations W_o − E[W_o] sum to zero over a
    filter and cancel it (exactly so for independent inputs); ``rest`` — what is left of measured / eq. 5 (zero
    padding at the borders, spatially correlated inputs); and ``rest_last_layer``, the rest of the deepest layer alone.
    """
    layers = _conv_layers(records)
    by_step: dict[int, dict[int, dict[str, float]]] = {}
    for r in records:
        if r["layer_index"] in layers and r["stat"] in ("y_var", "y_var_pred", "amp_eq15", "y_var_pred_x", "x_sq",
                                                        "x_mean"):
            by_step.setdefault(r["step"], {}).setdefault(r["layer_index"], {})[r["stat"]] = r["value"]
    ratios: list[tuple[int, float, float]] = []
    meas, pred = [], []
    for s in sorted(by_step):
        lay = by_step[s]
        idx = sorted(lay)
        if len(idx) < 2:
            continue
        first, last = lay[idx[0]].get("y_var", math.nan), lay[idx[-1]].get("y_var", math.nan)
        amp = [lay[i].get("amp_eq15", math.nan) for i in idx[1:]]
        if first == first and last == last and first > 0:
            ratios.append((s, last / first, math.prod(amp)))
        for i in idx[1:]:
            m, p = lay[i].get("y_var", math.nan), lay[i].get("y_var_pred", math.nan)
            if m == m and p == p and m > 0 and p > 0:
                meas.append(math.log10(m))
                pred.append(math.log10(p))
    out: dict[str, Any] = {"ratio_first": math.nan, "ratio_last": math.nan, "eq15_first": math.nan,
                           "eq15_last": math.nan, "corr_log": math.nan, "median_ratio": math.nan,
                           "points": len(meas), "factors_first": _depth_factors({})}
    if ratios:
        out.update(ratio_first=ratios[0][1], eq15_first=ratios[0][2], ratio_last=ratios[-1][1],
                   eq15_last=ratios[-1][2], factors_first=_depth_factors(by_step[ratios[0][0]]))
    n = len(meas)
    if n >= 3:
        mm, mp = sum(meas) / n, sum(pred) / n
        sxy = sum((a - mm) * (b - mp) for a, b in zip(meas, pred))
        sxx = sum((a - mm) ** 2 for a in meas)
        syy = sum((b - mp) ** 2 for b in pred)
        if sxx > 0 and syy > 0:
            out["corr_log"] = sxy / math.sqrt(sxx * syy)
    if n:
        diffs = sorted(a - b for a, b in zip(meas, pred))
        k = n // 2
        md = diffs[k] if n % 2 else 0.5 * (diffs[k - 1] + diffs[k])
        out["median_ratio"] = 10 ** md
    return out


def _depth_factors(lay: dict[int, dict[str, float]]) -> dict[str, float]:
    """Var[Y_L]/Var[Y_1] at one step as Π over l ≥ 2 of relu · filters · common_mean · rest (see depth_report)."""
    nan = math.nan
    out = {"relu": nan, "filters": nan, "common_mean": nan, "rest": nan, "rest_last_layer": nan}
    idx = sorted(lay)
    prods = {"relu": 1.0, "filters": 1.0, "common_mean": 1.0, "rest": 1.0}
    last_rest = nan
    for a, b in zip(idx, idx[1:]):
        prev, cur = lay[a], lay[b]
        try:
            relu = cur["x_sq"] / (0.5 * prev["y_var"])
            filters = cur["y_var_pred_x"] / (2.0 * cur["x_sq"])
            common = 1.0 - cur["x_mean"] ** 2 / cur["x_sq"]
            rest = cur["y_var"] / cur["y_var_pred_x"] / common
        except (KeyError, ZeroDivisionError):
            return out
        for k, v in (("relu", relu), ("filters", filters), ("common_mean", common), ("rest", rest)):
            prods[k] *= v
        last_rest = rest
    if len(idx) < 2 or not all(math.isfinite(v) for v in prods.values()):
        return out
    return {**prods, "rest_last_layer": last_rest}


def markdown_summary(records_by_method: dict[str, Sequence[Record]], *, collapsed: dict[str, int | None] | None = None,
                     plain: str = "none", title: str = "Variance-transmission probe", config: str = "") -> str:
    """The Markdown report of :func:`run_probe_experiment`: a table of the shift of the average gradient
    Var_o[n_l·E[ΔW_o]] per layer and method (Figure 1(b), mean over recorded steps; for PWS the raw weight, eq. 13),
    and a table of Var[Y_l] with depth against eqs. 5, 6 and 15, with a one-line verdict for the plain network."""
    collapsed = collapsed or {}
    lines = [f"## {title}", ""]
    if config:
        lines += [config, ""]
    methods = list(records_by_method)
    profiles = {m: layer_profile(records_by_method[m], "shift", "mean") for m in methods}
    gprof = {m: layer_profile(records_by_method[m], "grad_shift", "mean") for m in methods}
    names: dict[int, str] = {}
    for m in methods:
        for src in (profiles[m], gprof[m]):
            for i, n in zip(src[0], src[1]):
                names.setdefault(i, n)
    use = profiles if any(profiles[m][0] for m in methods) else gprof
    label = "Var_o[n_l·E[ΔW_o]]" if use is profiles else "Var_o[n_l·E[∇W_o]]"
    lines += [f"### Shift of the average gradient {label} per layer (Figure 1(b), mean over recorded steps)", ""]
    lines.append("| # | layer | " + " | ".join(methods) + " |")
    lines.append("|---|---|" + "---|" * len(methods))
    for i in sorted(names):
        row = []
        for m in methods:
            d = dict(zip(use[m][0], use[m][2]))
            row.append(_fmt(d.get(i)))
        lines.append(f"| {i + 1} | `{names[i]}` | " + " | ".join(row) + " |")
    lines += ["", "### Var[Y_l] with depth (eqs. 5, 6, 15; conv layers)", "",
              "| method | collapsed at step | Var[Y_L]/Var[Y_1] first step | last step "
              "| eq. 15 predicts (first / last) "
              "| corr(log Var[Y_l], log eq. 5) | median measured/eq. 5 |",
              "|---|---|---|---|---|---|---|"]
    reports = {m: depth_report(records_by_method[m]) for m in methods}
    for m in methods:
        r = reports[m]
        c = collapsed.get(m)
        lines.append(f"| {m} | {'—' if c is None else c} | {_fmt(r['ratio_first'])} | {_fmt(r['ratio_last'])} | "
                     f"{_fmt(r['eq15_first'])} / {_fmt(r['eq15_last'])} | {_fmt(r['corr_log'])} | "
                     f"{_fmt(r['median_ratio'])} |")
    if plain in reports:
        r = reports[plain]
        ratio = r["ratio_last"]
        if ratio != ratio:
            verdict = f"The plain network ('{plain}') has no finite Var[Y_l] profile (collapsed or no conv layers)."
        else:
            grows = ratio > 1.0
            verdict = (f"The plain network ('{plain}'): Var[Y_l] {'grows' if grows else 'does not grow'} with depth "
                       f"(last/first conv layer ×{_fmt(ratio)} at the last finite step; eq. 15 predicts "
                       f"×{_fmt(r['eq15_last'])}; eq. 6 predicts growth whenever the filter means shift).")
        lines += ["", verdict]
    lines += _depth_explanation(reports)
    lines += ["", "Var[Y_l] is the conv output before any norm layer; eqs. 5/15 chain conv to conv and ignore output "
              "normalization, so for BN-like methods they describe the un-normalized chain only (BN re-centres every "
              "channel, eq. 8)."]
    return "\n".join(lines) + "\n"


def _depth_explanation(reports: dict[str, dict[str, Any]]) -> list[str]:
    """The table that says where Var[Y_L]/Var[Y_1] at the first step comes from, and why it can be far below eq. 15's
    value (e.g. PWS: eq. 15 predicts 1 — no mean shift — while the variance decays)."""
    rows = [(m, r["ratio_first"], r["factors_first"]) for m, r in reports.items()
            if math.isfinite(r["ratio_first"]) and math.isfinite(r["factors_first"]["rest"])]
    if not rows:
        return []
    lines = ["", "### Where Var[Y_L]/Var[Y_1] comes from (first step; each column a product over the conv layers "
             "l ≥ 2)", "",
             "| method | measured | = ReLU: E[X_l²]/(½Var[Y_l−1]) (eq. 2) | × filters: scale and mean shift (eq. 15's "
             "part) | × 1 − E²[X_l]/E[X_l²] | × rest (padding, correlated inputs; last layer alone) |",
             "|---|---|---|---|---|---|"]
    for m, ratio, f in rows:
        lines.append(f"| {m} | {_fmt(ratio)} | {_fmt(f['relu'])} | {_fmt(f['filters'])} | {_fmt(f['common_mean'])} | "
                     f"{_fmt(f['rest'])} ({_fmt(f['rest_last_layer'])}) |")
    lines += ["", "Eq. 15 accounts only for part of the filters' column: their mean shift (a factor 1 for PWS, whose "
              "filters have zero mean). The column also holds their scale, n_l·Var[W_o]/2: 1 at He init, below 1 "
              "for PWS because γ sits beside Var[W_o] in eq. 12 (Var/(Var + γ) per layer). Eq. 5's first term, E[X_l²]·n_l·Var[W_o], counts the common mean E²[X_l] of a layer's "
              "inputs, but the deviations W_o − E[W_o] sum to zero over a filter and cancel it, so only about "
              "1 − E²[X_l]/E[X_l²] of it passes a layer (after a ReLU ≈ 0.68; for every method). The rest is what eq. "
              "5's independence assumption leaves out: zero padding at the borders (a 3×3 conv on a 2×2 map sees 4 of "
              "its 9 taps inside the map) and neighbouring inputs that are correlated. On small inputs and deep "
              "stacks these compound to orders of magnitude without any collapse."]
    return lines


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
    0.9, ``weight_decay`` with α exempt, as the paper sets), ΔW = the optimizer's actual update; a method whose loss
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
    from ..optim import param_groups
    from .records import summarize

    loss_fn = loss_fn or F.cross_entropy
    data = _reusable(batches, steps)
    dev = torch.device(device) if device is not None else None
    records_by_method: dict[str, list[Record]] = {}
    collapsed: dict[str, int | None] = {}
    for method in methods:
        torch.manual_seed(seed)
        model = model_fn(method)
        if dev is not None:
            model = model.to(dev)
        model.train()
        if mode == "train":
            opt = torch.optim.SGD(param_groups(model, weight_decay), lr=lr, momentum=momentum)
            probe, c = _training_run(model, loss_fn, data, steps, opt, every, progress, f"probe {method}")
        else:
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
