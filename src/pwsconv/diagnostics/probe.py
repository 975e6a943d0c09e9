"""`VarianceProbe`: record the paper's variance-transmission statistics on any model, with hooks only.

The probe measures, for every conv and linear layer of a model (torch's classes and all their subclasses: PWS layers,
zoo layers, user layers), the quantities of the analysis of Liu et al. (AAAI 2021):

======================  ==========================================================================================
Figure 1(a)             ``var_ratio_mean/min/max``: Var[W_o − ΔW_o] / Var[W_o] over the filters o of the layer.
Figure 1(b)             ``shift``: Var_o[n_l·E[ΔW_o]], the shift of the average gradient (``shift_rel``: the same
                        divided by n_l·E[ΔW²], dimensionless); ``grad_shift``: Var_o[n_l·E[∇W_o]] (no LR).
eq. 5 / 6               ``w_shift``: Var_o[n_l·E[W_o]] of the weights; ``transmission``: Σ_o ½·n_l·Var[W_o] / N_l.
Figure 6                ``x_mean_*``, ``x_sq_*``, ``x_mean2_*``, ``x_ratio_*``: per-sample E(x), E(x²), E²(x),
                        E²(x)/E(x²) of the layer input (mean / min / max over the batch), ``x_mean``, ``x_sq``.
eq. 5 / 14              ``y_var`` (Var[Y_l]) beside ``y_var_pred`` (eq. 5 from the previous layer),
                        ``y_var_pred_x`` (eq. 5 with E[X_l²] for ½·Var[Y_{l-1}], eq. 2), ``amp_eq15`` (eq. 15),
                        ``y_chan_var_mean`` / ``y_chan_mean_var`` (the two terms of eq. 14, measured).
eq. 8                   ``gy_mean_rel``: max_o |E[∇_{Y_o}L]| / RMS(∇_Y L), ≈ 0 for a conv followed by BN.
Figure 2                ``w_var_min/mean/max``: min / mean / max_o Var[W_o]; for PWS layers ``inv_std_min/max``:
                        1 / sqrt(Var[W_o] + γ) (γ as used inside the square root, ``effective_gamma``).
gradient norms          ``grad_norm`` (‖∇W‖), ``bias_grad_norm``, ``alpha_grad_norm`` (PWS α), ``update_norm``.
parameter values        ``alpha_absmax`` / ``alpha_mean`` (PWS α), ``bias_absmax`` / ``bias_mean`` (β), before the step.
gradient clipping       for layers that clip their gradients (``gamma="auto"``): ``w_clip_frac``, ``alpha_clip_frac``,
                        ``bias_clip_frac``: the share of filters / entries held at the clipping bound this step;
                        ``w_clip_kept``, ...: the norm of the clipped gradient over the unclipped one (1: untouched).
======================  ==========================================================================================

Which weight. W is the layer's raw ``weight`` parameter (what the optimizer updates); the statistics above without a
prefix are about it. For a reparameterized layer — a PWS layer (eq. 12), any layer with a ``standardized_weight()``
or ``reparam_weight()`` method (the zoo's WN / WS layers), or a torch ``parametrize``-d weight — the probe also
records the weight the layer applies (for PWS α·Ŵ) under the same names prefixed ``eff.`` (``eff.shift``,
``eff.w_shift``, ...), with ΔW_eff = W_eff(before) − W_eff(after).
For PWS, eq. 13 says ∇W has zero mean over every filter, so ``shift`` ≈ 0 (and ``eff.w_shift`` is 0 since
E[Ŵ_o] = 0). The eq. 5 prediction always uses the weight the layer applies (raw for plain layers).

"Previous layer" (eq. 5). Var[Y_{l-1}] is the output variance of the previous *recorded* conv/linear layer in forward
order in the same forward pass (whatever lies between — ReLU, pooling, BN, residual sums — is ignored, as in the
paper's derivation for a plain chain of conv + ReLU). The first layer has no prediction (NaN); ``y_var_pred_x`` needs
no previous layer.

ΔW, the update. With ``optimizer`` given, ΔW is the update that optimizer actually applies (momentum, weight decay,
Adam, anything): the probe hooks ``optimizer.step()`` (``register_step_pre_hook`` / ``register_step_post_hook``),
snapshots the weights before the step and takes ΔW = W_before − W_after afterwards. This is exact for every optimizer
and needs no copy of its math. Without an optimizer, ΔW = ``lr``·∇W as in Figure 1 (and W_eff after the update is
computed by evaluating the layer's weight function at W − lr·∇W, α − lr·∇α with ``torch.func.functional_call``,
leaving the model untouched). Without both, only the LR-free statistics (``grad_shift``, gradient norms) are recorded.

Steps. With an optimizer, a step is one ``optimizer.step()``; without, one backward pass (the probe finalizes the step
when the autograd engine finishes the backward pass). With ``auto=False`` nothing is finalized automatically: call
:meth:`VarianceProbe.step` after the backward pass (LR mode) or after ``optimizer.step()``. Steps whose index is not a
multiple of ``every`` cost (almost) nothing. Forward statistics come from the last forward pass with gradients
enabled before the step (forwards under ``torch.no_grad()`` — evaluation — are ignored unless
``record_no_grad=True``); a layer called twice in one forward pass is recorded at its first call.

Nothing is left behind: the probe sets no attribute on any module, parameter or optimizer; it registers forward hooks
(and one forward pre-hook on the root), per-forward tensor hooks on layer outputs (which die with the autograd graph),
and optimizer step hooks, all removed by :meth:`VarianceProbe.detach`. Outputs and gradients are bit-identical with
and without the probe (the hooks only read, under ``torch.no_grad()``).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from . import stats as S
from ._clipstats import hook_clips
from .records import Record, summarize, write_csv, write_jsonl

__all__ = ["VarianceProbe", "effective_weight", "raw_weight", "is_reparameterized", "layer_gamma"]


MODEL_LAYER = "(model)"


# ---------------------------------------------------------------------------------------------------- weight access
def _is_parametrized(m: nn.Module) -> bool:
    return torch.nn.utils.parametrize.is_parametrized(m, "weight")


#: Methods that return the weight a reparameterized layer applies: pwsconv's layers (PWS eq. 12, WN, WS, ...)
#: compute it with ``compute_weight`` (never through a cache); other libraries' layers may name it otherwise.
WEIGHT_METHODS = ("compute_weight", "standardized_weight", "reparam_weight")


def _weight_method(m: nn.Module) -> Callable[[], Tensor] | None:
    for attr in WEIGHT_METHODS:
        fn = getattr(m, attr, None)
        if callable(fn):
            return fn
    return None


def is_reparameterized(m: nn.Module) -> bool:
    """True when the weight a layer applies is computed from its parameters: PWS α·Ŵ (``standardized_weight``), a
    zoo layer's ``reparam_weight`` (WN, WS, ...), or a torch ``parametrize``-d ``weight``."""
    return _weight_method(m) is not None or _is_parametrized(m)


def raw_weight(m: nn.Module) -> Tensor | None:
    """The weight tensor the optimizer updates (``weight``; a parametrization's single ``original``), or None."""
    if _is_parametrized(m):
        return getattr(m.parametrizations.weight, "original", None)
    w = m._parameters.get("weight")
    if w is None or isinstance(w, nn.parameter.UninitializedParameter):
        return None
    return w


def layer_gamma(m: nn.Module) -> float | None:
    """γ inside the PWS square root (eq. 12; ``effective_gamma``: 2γ/n under ``equiv``) for PWS layers, else None."""
    if not callable(getattr(m, "standardized_weight", None)):
        return None
    g = getattr(m, "effective_gamma", None)
    if g is None:
        g = getattr(m, "gamma", None)
    try:
        return None if g is None else float(g)
    except (TypeError, ValueError):
        return None


def effective_weight(m: nn.Module) -> Tensor:
    """The weight the layer applies, detached: ``standardized_weight()`` (PWS α·Ŵ), ``reparam_weight()`` (zoo WN/WS
    layers), a parametrized ``weight``, or the raw ``weight``. A layer's eval-mode weight cache is never touched."""
    with torch.no_grad():
        fn = _weight_method(m)
        if fn is not None:
            return fn().detach().clone()
        return m.weight.detach().clone()


class _WeightFn(nn.Module):
    """Calls the wrapped layer's weight function; used with ``functional_call`` to evaluate it at other parameters."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self) -> Tensor:
        return effective_weight(self.m)


def _effective_weight_at(m: nn.Module, params: dict[str, Tensor]) -> Tensor:
    from torch.func import functional_call

    with torch.no_grad():
        return functional_call(_WeightFn(m), {f"m.{k}": v for k, v in params.items()}, ())


def _nan_like(ref: Tensor) -> Tensor:
    return torch.full((), float("nan"), dtype=S.stat_dtype(ref.device), device=ref.device)


# ---------------------------------------------------------------------------------------------------- the probe
class VarianceProbe:
    """Record variance-transmission statistics (Figures 1, 2, 6; eqs. 5, 6, 8, 13, 15) of every conv/linear layer.

    Args:
        model: any ``nn.Module``; its conv (incl. transposed) and linear layers, subclasses included, are probed.
        optimizer: when given, ΔW is the update this optimizer actually applies (see the module docstring).
        lr: without an optimizer, ΔW = lr·∇W (Figure 1). Ignored when ``optimizer`` is given.
        every: record steps whose index is a multiple of ``every``.
        auto: finalize steps automatically (after ``optimizer.step()``, or at the end of each backward pass when there
            is no optimizer); with ``False`` call :meth:`step` yourself.
        include: optional ``include(name, module) -> bool`` to select layers.
        record_no_grad: also record forward statistics of forwards run under ``torch.no_grad()``.
        dtype: the dtype the statistics are computed in (float64; float32 on MPS).
        start_step: index of the first step.

    Use as ``with VarianceProbe(model, opt) as probe: ...`` or ``probe = VarianceProbe(model, lr=0.1).attach()`` …
    ``probe.detach()``. Results: :attr:`records` (a tidy list of dicts with keys step, layer, layer_index, kind,
    stat, value), :meth:`summary`, :meth:`to_csv`, :meth:`to_jsonl`.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        lr: float | None = None,
        every: int = 1,
        *,
        auto: bool = True,
        include: Callable[[str, nn.Module], bool] | None = None,
        record_no_grad: bool = False,
        dtype: torch.dtype = torch.float64,
        start_step: int = 0,
    ) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        if lr is not None and (not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr)):
            raise ValueError(f"lr must be a finite number, got {lr!r}")
        self.model = model
        self.optimizer = optimizer
        self.lr = None if lr is None else float(lr)
        self.every = every
        self.auto = bool(auto)
        self.record_no_grad = bool(record_no_grad)
        self.dtype = dtype
        self.records: list[Record] = []
        self.collapsed = False
        self._step = int(start_step)
        self._layers: dict[str, nn.Module] = {}
        for name, m in model.named_modules():
            if S.is_tracked_layer(m) and (include is None or include(name, m)):
                self._layers[name or type(m).__name__] = m
        self._handles: list[Any] = []
        self._epoch = 0
        self._attached = False
        self._cb_queued = False
        self._reset_step()

    # ------------------------------------------------------------------ public API
    @property
    def layers(self) -> list[str]:
        """Names of the probed layers (module order)."""
        return list(self._layers)

    @property
    def current_step(self) -> int:
        """Index of the step in progress (the next one to be finalized)."""
        return self._step

    @property
    def attached(self) -> bool:
        return self._attached

    def attach(self) -> "VarianceProbe":
        """Register the hooks (idempotent). Returns ``self``."""
        if self._attached:
            return self
        self._epoch += 1
        ep = self._epoch
        self._handles.append(self.model.register_forward_pre_hook(partial(self._root_pre_hook, ep)))
        for name, m in self._layers.items():
            self._handles.append(m.register_forward_hook(partial(self._forward_hook, ep, name), with_kwargs=True))
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_pre_hook(partial(self._opt_pre_hook, ep)))
            self._handles.append(self.optimizer.register_step_post_hook(partial(self._opt_post_hook, ep)))
        self._attached = True
        return self

    def detach(self) -> "VarianceProbe":
        """Remove every hook; pending (unfinalized) measurements are dropped; :attr:`records` are kept."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._epoch += 1  # tensor hooks still alive in an old autograd graph become no-ops
        self._attached = False
        self._cb_queued = False
        self._reset_step()
        return self

    def __enter__(self) -> "VarianceProbe":
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def step(self, step_index: int | None = None) -> list[Record]:
        """Finalize the step in progress now and return its records (``auto=False`` usage, or to flush).

        Call it after ``loss.backward()`` (no optimizer: ΔW = lr·∇W from the current ``.grad``) or after
        ``optimizer.step()`` (optimizer mode). ``step_index`` overrides the step number written in the records; the
        internal counter continues from it. With ``auto=True`` it only flushes what is pending (e.g. the forward
        statistics of a step whose loss was not finite, so no backward followed) and is a no-op otherwise.
        """
        s = self._step if step_index is None else int(step_index)
        if self.auto and not (self._fwd or self._bwd or self._upd or self._snap):
            return []  # already finalized automatically: nothing pending
        if self.optimizer is None and self._recording():
            self._collect_lr_updates()
        return self._advance(s)

    def log(self, stat: str, value: float, step: int | None = None, layer: str = MODEL_LAYER) -> None:
        """Add a model-level value (e.g. the loss) to the records, at the step in progress by default."""
        v = _finite_or_nan(value)
        if v != v:
            self.collapsed = True
        self.records.append({"step": self._step if step is None else int(step), "layer": layer, "layer_index": -1,
                             "kind": "model", "stat": stat, "value": v})

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per layer: ``layer_index``, ``kind``, ``steps`` and the mean over recorded steps (finite values) of every
        statistic (see :func:`pwsconv.diagnostics.summarize`)."""
        return summarize(self.records)

    def to_csv(self, path: Any) -> Any:
        """Write :attr:`records` as CSV (columns step, layer, layer_index, kind, stat, value). Returns the path."""
        return write_csv(self.records, path)

    def to_jsonl(self, path: Any) -> Any:
        """Write :attr:`records` as JSON lines (NaN written as null). Returns the path."""
        return write_jsonl(self.records, path)

    # ------------------------------------------------------------------ internals
    def _recording(self) -> bool:
        return self._step % self.every == 0

    def _reset_step(self) -> None:
        self._fwd: dict[str, dict[str, Tensor]] = {}
        self._bwd: dict[str, dict[str, Tensor]] = {}
        self._upd: dict[str, dict[str, Tensor]] = {}
        self._snap: dict[str, tuple[Tensor | None, Tensor | None]] = {}
        self._order: list[str] = []
        self._seen: set[str] = set()
        self._prev_y_var: Tensor | None = None
        self._clip: dict[str, dict[str, Tensor]] = {}

    def _forward_recorded(self) -> bool:
        return torch.is_grad_enabled() or self.record_no_grad

    def _root_pre_hook(self, ep: int, module: nn.Module, args: Any) -> None:
        if ep != self._epoch or not self._forward_recorded() or not self._recording():
            return
        # a new forward pass of the whole model: the layer order and Var[Y_{l-1}] chain start again
        self._order = []
        self._seen = set()
        self._prev_y_var = None

    def _forward_hook(self, ep: int, name: str, m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        if ep != self._epoch or not isinstance(out, Tensor):
            return
        recording = self._recording()
        if torch.is_grad_enabled() and out.requires_grad and (recording or (self.optimizer is None and self.auto)):
            out.register_hook(partial(self._out_grad_hook, ep, name, m, recording))
        if not recording or not self._forward_recorded() or name in self._seen:
            return
        x = args[0] if args else kwargs.get("input")
        if torch.is_grad_enabled() and out.grad_fn is not None and (getattr(m, "clip_lambda", 0.0) or getattr(
                m, "clip_w_lambda", 0.0)):
            hook_clips(out, x, m, partial(self._clip_kept, name), self.dtype)
        if not isinstance(x, Tensor) or x.numel() == 0 or out.numel() == 0:
            return
        with torch.no_grad():
            st = self._forward_stats(m, x, out)
        self._seen.add(name)
        self._order.append(name)
        self._fwd[name] = st

    def _forward_stats(self, m: nn.Module, x: Tensor, out: Tensor) -> dict[str, Tensor]:
        dt = self.dtype
        st: dict[str, Tensor] = {}
        st.update(S.input_stats(S.batched(m, x), dt))
        st.update(S.output_stats(S.batched(m, out), S.channel_dim(m), dt))
        raw = raw_weight(m)
        if raw is not None:
            st.update(S.weight_stats(S.filter_matrix(m, raw), gamma=layer_gamma(m), dtype=dt))
        applied = raw.detach() if raw is not None else None
        if is_reparameterized(m):
            applied = effective_weight(m)
            st.update({"eff." + k: v for k, v in S.weight_stats(S.filter_matrix(m, applied), dtype=dt).items()})
        if applied is None:
            return st
        wf = S.filter_matrix(m, applied)
        st["y_var_pred"] = (S.predict_output_var(self._prev_y_var, wf, st["x_mean"], dt)
                            if self._prev_y_var is not None else _nan_like(st["y_var"]))
        st["y_var_pred_x"] = S.predict_output_var_from_input(st["x_sq"], wf, st["x_mean"], dt)
        st["amp_eq15"] = S.eq15_factor(wf, st["x_mean"], st["x_sq"], dt)
        self._prev_y_var = st["y_var"]
        return st

    def _clip_kept(self, name: str, key: str, frac: Tensor, kept: Tensor) -> None:
        self._clip.setdefault(name, {}).update({key + "_clip_frac": frac, key + "_clip_kept": kept})

    def _out_grad_hook(self, ep: int, name: str, m: nn.Module, recording: bool, grad: Tensor) -> None:
        if ep != self._epoch:
            return
        if recording and name not in self._bwd and name in self._fwd:
            with torch.no_grad():
                self._bwd[name] = S.channel_mean_stats(S.batched(m, grad), S.channel_dim(m), self.dtype)
        if self.optimizer is None and self.auto and not self._cb_queued:
            self._cb_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(partial(self._backward_end, ep))

    def _backward_end(self, ep: int) -> None:
        self._cb_queued = False
        if ep != self._epoch or self.optimizer is not None or not self.auto:
            return
        if self._recording():
            self._collect_lr_updates()
        self._advance(self._step)

    def _step_layers(self) -> list[str]:
        return list(self._order) if self._order else list(self._layers)

    def _grad_stats(self, m: nn.Module, raw: Tensor | None) -> dict[str, Tensor]:
        st: dict[str, Tensor] = {}
        if raw is not None and raw.grad is not None:
            st.update(S.grad_stats(S.filter_matrix(m, raw.grad), self.dtype))
        for pname, key in (("bias", "bias"), ("alpha", "alpha")):
            p = getattr(m, pname, None)
            if isinstance(p, Tensor) and p.grad is not None:
                dt = S.stat_dtype(p.device, self.dtype)
                st[key + "_grad_norm"] = torch.linalg.vector_norm(p.grad.detach().to(dt))
                v = p.detach().to(dt)     # the values the step starts from (what blows up first)
                st[key + "_absmax"] = v.abs().max()
                st[key + "_mean"] = v.mean()
        return st

    def _collect_lr_updates(self) -> None:
        """LR mode: gradient statistics and, with ``lr``, ΔW = lr·∇W (and the matching ΔW_eff)."""
        with torch.no_grad():
            for name in self._step_layers():
                m = self._layers[name]
                raw = raw_weight(m)
                st = self._grad_stats(m, raw)
                if self.lr is not None and raw is not None and raw.grad is not None:
                    wf = S.filter_matrix(m, raw.detach())
                    st.update(S.update_stats(wf, S.filter_matrix(m, self.lr * raw.grad.detach()), self.dtype))
                named = list(m.named_parameters())
                if self.lr is not None and is_reparameterized(m) and any(p.grad is not None for _, p in named):
                    params = {k: p.detach() - self.lr * p.grad.detach() if p.grad is not None else p.detach()
                              for k, p in named}
                    before = effective_weight(m)
                    after = _effective_weight_at(m, params)
                    st.update({"eff." + k: v for k, v in S.update_stats(
                        S.filter_matrix(m, before), S.filter_matrix(m, before - after), self.dtype).items()})
                if st:
                    self._upd[name] = st

    def _opt_pre_hook(self, ep: int, optimizer: Any, args: Any, kwargs: Any) -> None:
        if ep != self._epoch or not self._recording():
            return
        with torch.no_grad():
            for name in self._step_layers():
                m = self._layers[name]
                raw = raw_weight(m)
                self._upd[name] = self._grad_stats(m, raw)
                self._snap[name] = (None if raw is None else raw.detach().clone(),
                                    effective_weight(m) if is_reparameterized(m) else None)

    def _opt_post_hook(self, ep: int, optimizer: Any, args: Any, kwargs: Any) -> None:
        if ep != self._epoch:
            return
        if self._recording():
            with torch.no_grad():
                for name, (before, eff_before) in self._snap.items():
                    m = self._layers[name]
                    raw = raw_weight(m)
                    st = self._upd.setdefault(name, {})
                    if before is not None and raw is not None:
                        st.update(S.update_stats(S.filter_matrix(m, before),
                                                 S.filter_matrix(m, before - raw.detach()), self.dtype))
                    if eff_before is not None:
                        eff_after = effective_weight(m)
                        st.update({"eff." + k: v for k, v in S.update_stats(
                            S.filter_matrix(m, eff_before), S.filter_matrix(m, eff_before - eff_after),
                            self.dtype).items()})
            self._snap = {}
        if self.auto:
            self._advance(self._step)

    def _advance(self, s: int) -> list[Record]:
        """Turn the pending measurements into records at step ``s``, move to step ``s + 1``."""
        out: list[Record] = []
        if self._recording():
            names = list(self._order) + [n for n in self._upd if n not in self._seen]
            for i, name in enumerate(names):
                st: dict[str, Tensor] = {}
                st.update(self._fwd.get(name, {}))
                st.update(self._bwd.get(name, {}))
                st.update(self._clip.get(name, {}))
                st.update(self._upd.get(name, {}))
                if not st:
                    continue
                keys = list(st)
                first = next(iter(st.values()))
                dt = torch.float32 if first.device.type == "mps" else torch.float64
                vals = torch.stack([v.detach().reshape(()).to(device=first.device, dtype=dt)
                                    for v in st.values()]).tolist()  # one device-to-host transfer per layer
                kind = type(self._layers[name]).__name__
                for k, v in zip(keys, vals):
                    v = _finite_or_nan(v)
                    if v != v and k in _COLLAPSE_STATS:
                        self.collapsed = True
                    out.append({"step": s, "layer": name, "layer_index": i, "kind": kind, "stat": k, "value": v})
        self.records.extend(out)
        self._step = s + 1
        self._reset_step()
        return out


_COLLAPSE_STATS = frozenset({"y_var", "x_sq", "grad_norm", "w_var_mean"})


def _finite_or_nan(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return f if math.isfinite(f) else float("nan")


def probe_layers(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """The (name, module) pairs a :class:`VarianceProbe` records."""
    return [(n or type(m).__name__, m) for n, m in model.named_modules() if S.is_tracked_layer(m)]
