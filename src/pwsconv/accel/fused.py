"""All PWS layers of a model standardized in one autograd node per forward (:func:`fuse_standardization`), and the
node itself (:func:`pws_weights_fused`).

A step of a network with many small layers is dominated by per-op dispatch and autograd bookkeeping, not by
arithmetic; computing every layer's α·Ŵ together costs a handful of native ops per group of same-shaped layers
instead of several per layer. Measured in BENCHMARKS.md (the fused node against the per-layer path).

How it reaches the layers: a forward pre-hook on the model computes the weights of the layers that will need a
fresh one and puts them in a per-forward table held by a :class:`contextvars.ContextVar` (so threads and nested
forwards never see another forward's table). It also installs :func:`weight_source` on each layer it walks (the
layers' one hook for weights computed elsewhere, ``layer._weight_source``), which looks the layer up there — or in
the eval cache of an open :func:`pwsconv.cached` scope. A layer takes part by defining ``fused_args()``."""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .. import functional as _F
from ..functional import _LOW_PRECISION
from .foreach import bias_grads, bias_views, clip_filters_, clip_units
from .cache import _ENTRIES
from .once import differentiable_once
from .source import _ACTIVE, _Forward, current_pack, needs_fresh, uninstall_source, weight_source

__all__ = ["pws_weights_fused", "fuse_standardization", "FuseHandle"]

_BN_BACKWARD = torch.ops.aten.native_batch_norm_backward.default
_TWICE = ("fuse_standardization: second-order gradients through PWS weights (e.g. Hessian-vector products) need the "
          "unfused layers: call .remove() on the handle fuse_standardization returned (config: fuse_pws: false)")
#: weights with more elements than this are not concatenated with other layers' on a CPU (their own group)
CPU_CAT_LIMIT = 1 << 14
#: the devices whose autocast casts a conv's / linear's weight and bias to its dtype (so the node may do it instead)
_CAST_DEVICES = ("cuda", "cpu")


class _PWSMany(torch.autograd.Function):
    """Eq. 12 for many weights in one autograd node. Layers whose weights have the same filter shape (``w.shape[1:]``)
    and the same γ, gain and α-ness form a group: one ``native_layer_norm`` over the rows of the concatenated
    [filters, n_l] matrix and one in-place multiply by α·gain per row (the ops of :func:`pws_weight`, so the same
    values), split back into per-layer views — a handful of native ops per *group* rather than per layer.

    Backward is one ``native_batch_norm_backward`` per group, with the rows as the channels of a [1, filters, n_l]
    batch, the layer norm's per-row E[w] and 1/sqrt(Var + γ) as the saved batch statistics and α·gain as the affine
    weight: training-mode batch norm of that batch *is* eq. 12, so its closed-form backward gives ∂L/∂W (eq. 13)
    and ∂L/∂(α·gain) = Σ g·x̂ per filter in one kernel, two passes over the weight (the layer-norm backward plus a
    separate Σ g·x̂ took five). Keeps those per-filter statistics, α·gain and the concatenated weight of a group of
    2 or more layers (one copy of the weights; re-concatenating them in backward cost one op per group), no
    weight-sized x̂.

    The weights and α are kept as references with their version counters rather than through ``save_for_backward``:
    a layer whose weight changes in place after this node ran (α data-init on the first forward) computes its own
    weight and sends no gradient here, and must not make the other layers' backward fail. A gradient that does
    arrive for a changed tensor raises the usual "modified by an inplace operation" error. Differentiable once
    (penalties on input gradients work; differentiating the weights' gradients again raises a clear error).

    ``spec`` is a tuple of groups ``(layers, w_pos, a_pos, rows, n, gamma, gain, shape, clip)``: the layers' output
    indices, the positions of their weights (and α, 1-d, or ``None``) among ``tensors``, their filter counts, n_l,
    γ, the gain, the shape of the concatenated weight and (λ_W, λ_α, per vector) of unit-wise gradient clipping in
    backward (0: none; α per entry, or per vector: ``clip_vectors``). ``bias_spec`` is a tuple of ``(position, λ,
    floor, per vector)``: biases passed through after the ``n_out`` weights, their gradients clipped like α's but with
    their own floor, |g| ≤ λ·max(|β|, floor) (λ > 0; one set of foreach ops for all α and β).

    ``cast`` (autocast's ``(device type, dtype)``, or ``None``): the float32 weights and biases on that device type
    are handed out in that dtype, one cast per group and one for all biases instead of autocast's one per layer and
    tensor in forward and again in backward (the same values: a cast is elementwise). ``scale`` (a GradScaler's
    tensor, read in backward, or a float, or None): the gradients are of a loss times it: so are the clips' bounds.
    """

    @staticmethod
    def forward(ctx, spec: tuple, bias_spec: tuple, cast: tuple[str, torch.dtype] | None,  # type: ignore[override]
                scale: Tensor | float | None, n_out: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        ctx.set_materialize_grads(False)      # layers that were not used get None, not zeros
        outs: list[Tensor | None] = [None] * n_out
        saved = []
        for layers, w_pos, a_pos, rows, n, gamma, gain, shape, clip in spec:
            ws = [tensors[i] for i in w_pos]
            w = ws[0] if len(ws) == 1 else torch.cat(ws)
            r_all = shape[0]
            if a_pos is not None:
                al = [tensors[i] for i in a_pos]
                s = al[0] if len(al) == 1 else torch.cat(al)
                if gain != 1.0:
                    s = s * gain
                versions = [t._version for t in ws + al]
            else:
                al = []
                s = None if gain == 1.0 else torch.full((r_all,), gain, dtype=w.dtype, device=w.device)
                versions = [t._version for t in ws]
            # the ops of pws_weight (so the same values): x̂ by layer norm over the rows, then α·gain per row
            out, mean, rstd = torch.native_layer_norm(w.view(r_all, n), (n,), None, None, gamma)
            if s is not None:
                out.mul_(s.view(r_all, 1))
            if cast is not None and w.dtype == torch.float32 and w.device.type == cast[0]:
                out = out.to(cast[1])
            out = out.view(shape)        # shapes as tuples of ints: a torch.Size argument costs 3× more
            mean, rstd = mean.view(r_all), rstd.view(r_all)
            if len(rows) == 1:
                outs[layers[0]] = out
            else:
                for k, o in zip(layers, out.split_with_sizes(rows)):
                    outs[k] = o
            # the concatenated weight is kept for backward (a weight-sized copy per group of 2+ layers): re-concatenating
            # it there cost one more op per group
            saved.append((ws, al, versions, s, mean, rstd, w))
        outs += bias_views([tensors[i] for i, *_ in bias_spec], cast)
        ctx.spec, ctx.bias_spec, ctx.cast, ctx.scale = spec, bias_spec, cast, scale
        ctx.groups = saved
        if bias_spec:
            ctx.biases = [tensors[i] for i, *_ in bias_spec]
        return tuple(outs)  # type: ignore[arg-type]

    @staticmethod
    @differentiable_once(_TWICE)
    def backward(ctx, *grads: Tensor | None):  # type: ignore[override]
        needs = ctx.needs_input_grad
        res: list[Tensor | None] = [None] * len(needs)
        # unit-wise clipping (gamma="auto", clip=) of all groups at once, with foreach ops after the loop: W's filters
        # (rows) to ‖∂L/∂W_o‖ ≤ λ_W·max(‖W_o‖, 1e-3), each α entry to |∂L/∂α| ≤ λ·max(|α|, 1e-3) — unit_clip's bounds
        cw: list[tuple] = []     # (gw as [rows, n], per-row ‖gw‖, λ_W, n, γ, mean, rstd) per clipped group
        ca: list[tuple] = []     # (index in res, ∂L/∂α of one layer or ∂L/∂β, the α or β, λ, floor, per vector?)
        for (layers, w_pos, a_pos, rows, n, gamma, gain, shape, clip), (ws, al, versions, s, mean, rstd, w) in zip(
                ctx.spec, ctx.groups):
            gl = [grads[k] for k in layers]
            if all(g is None for g in gl):
                continue
            need_w = any(needs[i + _NARGS] for i in w_pos)
            need_a = a_pos is not None and any(needs[i + _NARGS] for i in a_pos)
            if not (need_w or need_a):
                continue
            # only the layers that send a gradient need their tensors unchanged: a layer changed in place after
            # this node ran computes its own weight, and its rows here get a zero gradient that is thrown away
            k = len(ws)
            for j, gj in enumerate(gl):
                if gj is not None and (ws[j]._version != versions[j] or (al and al[j]._version != versions[k + j])):
                    raise RuntimeError("pws_weights_fused: a weight or alpha needed for gradient computation has "
                                       "been modified by an inplace operation after the forward pass")
            if len(gl) == 1:
                g = gl[0]
            else:
                gdt = next(x for x in gl if x is not None).dtype
                g = torch.cat([x if x is not None else torch.zeros_like(t, dtype=gdt) for x, t in zip(gl, ws)])
            if g.dtype != w.dtype:
                g = g.to(w.dtype)
            r_all = shape[0]
            gw, gs, _ = _BN_BACKWARD(g.reshape(1, r_all, n), w.view(1, r_all, n), s, None, None, mean, rstd,
                                     True, gamma, [need_w, need_a, False])
            clip_w, clip_a, vec = clip
            if need_w:
                gw = gw.view(r_all, n)
                if clip_w:
                    cw.append((gw, torch.linalg.vector_norm(gw, dim=1), clip_w, n, gamma, mean, rstd))
                gw = gw.view(shape)
                parts = (gw,) if len(rows) == 1 else gw.split_with_sizes(rows)
                for i, gi, p in zip(w_pos, gl, parts):
                    if gi is not None:
                        res[i + _NARGS] = p
            if need_a:
                if gain != 1.0:
                    gs = gs.mul_(gain)
                parts = (gs,) if len(rows) == 1 else gs.split_with_sizes(rows)
                for i, gi, p, a in zip(a_pos, gl, parts, al):   # α is 1-d here (pws_weights_fused)
                    if gi is not None:
                        res[i + _NARGS] = p
                        if clip_a:
                            ca.append((i + _NARGS, p, a, clip_a, 1e-3, vec))
        if cw:
            clip_filters_(cw, scale=ctx.scale)
        if ctx.bias_spec:
            gb = bias_grads(grads[len(grads) - len(ctx.bias_spec):], ctx.biases, ctx.cast)
            for (i, lam, floor, vec), b, g in zip(ctx.bias_spec, ctx.biases, gb):
                if g is not None and needs[i + _NARGS]:
                    if lam:     # clipped out of place: an incoming gradient is not ours to change
                        ca.append((i + _NARGS, g, b, lam, floor, vec))
                    else:
                        res[i + _NARGS] = g
        for i, c in clip_units(ca, ctx.scale):   # α and β: per entry, or per vector above auto's free range
            res[i] = c
        return tuple(res)


#: the leading non-tensor arguments of _PWSMany.forward (spec, bias_spec, cast, scale, n_out)
_NARGS = 5


def pws_weights_fused(weights: Sequence[Tensor], alphas: Sequence[Tensor | None], gammas: Sequence[float],
                      gains: Sequence[float], clips: Sequence[float | tuple[float, float]] | None = None
                      ) -> list[Tensor]:
    """:func:`pws_weight` for many layers at once, as one autograd node (eq. 12 per filter ``weight[o]``).

    Same values as ``[pws_weight(w, γ, α, gain=g) for ...]`` and the same gradients up to float rounding (tested),
    at a fraction of the per-layer overhead: a step of a network with many small PWS layers is dominated by per-op
    dispatch and autograd bookkeeping, not by arithmetic, so layers with the same filter shape, γ and gain are
    standardized together by one native op. Each weight uses the default layout (filters along dim 0, contiguous,
    float32 or float64); each α has one value per filter (or is ``None``). ``clips``: per layer, the unit-wise
    gradient clipping λ of :func:`unit_clip` applied to ∂L/∂W (per filter) and ∂L/∂α (per entry, or per vector) in
    the node's backward — one λ for both, or (λ_W, λ_α[, β's floor[, α and β per vector[, the loss scale]]]) (0 =
    none; ``gamma="auto"`` layers). Used by :func:`pwsconv.fuse_standardization`.
    """
    return _fused(weights, alphas, gammas, gains, clips)[0]


def _fused(weights: Sequence[Tensor], alphas: Sequence[Tensor | None], gammas: Sequence[float],
           gains: Sequence[float], clips: Sequence[float | tuple[float, float]] | None = None,
           biases: Sequence[Tensor | None] = (), cast: tuple[str, torch.dtype] | None = None
           ) -> tuple[list[Tensor], list[Tensor | None]]:
    """:func:`pws_weights_fused`, and the layers' biases (β) passed through the same node: a bias whose layer clips
    α (λ_α > 0) and that needs a gradient gets its gradient clipped like α (:func:`unit_clip`'s bound
    λ_α·max(|β|, floor), the floor the third entry of its ``clips`` tuple, else CLIP_BIAS_FLOOR; per vector where the
    fourth is true), with α's foreach ops. ``cast`` (autocast's ``(device type, dtype)``, or ``None``): the
    float32 weights and biases on that device type come out in that dtype (autocast then casts nothing). Another bias
    is returned as it is."""
    if clips is None:
        clips = [0.0] * len(weights)
    if not (len(weights) == len(alphas) == len(gammas) == len(gains) == len(clips)):
        raise ValueError("pws_weights_fused: weights, alphas, gammas, gains and clips must have the same length")
    groups: dict[tuple, tuple[list[int], list[int], list[int] | None, list[int]]] = {}
    tensors: list[Tensor] = []
    scale = None   # a GradScaler's loss scale (the fifth entry of a clips tuple), applied in backward
    for k, (w, a, gamma, gain, clip) in enumerate(zip(weights, alphas, gammas, gains, clips)):
        if w.dim() < 2 or not w.is_contiguous() or w.dtype in _LOW_PRECISION:
            raise ValueError(f"pws_weights_fused: needs contiguous float32/float64 weights with ≥ 2 dims, got "
                             f"{tuple(w.shape)} {w.dtype}")
        rows = w.shape[0]
        if a is not None and a.numel() != rows:
            raise ValueError(f"pws_weights_fused: alpha has {a.numel()} values for {rows} filters")
        scale = clip[4] if isinstance(clip, tuple) and len(clip) > 4 and clip[4] is not None else scale
        clip = (float(clip[0] or 0.0), float(clip[1] or 0.0), len(clip) > 3 and bool(clip[3])) \
            if isinstance(clip, tuple) else (float(clip or 0.0),) * 2 + (False,)
        # a large weight is not concatenated with others (its own group): on a CPU copying it costs more than the
        # dispatch it would save (measured on torchvision's ResNet-50, BENCHMARKS.md); on a GPU copies are cheap
        alone = k if w.device.type == "cpu" and w.numel() > CPU_CAT_LIMIT else None
        key = (w.shape[1:], w.dtype, w.device, float(gamma), float(gain), a is not None, clip, alone)
        grp = groups.get(key)
        if grp is None:
            grp = groups[key] = ([], [], [] if a is not None else None, [])
        grp[0].append(k)
        grp[1].append(len(tensors))
        grp[3].append(rows)
        tensors.append(w)
        if a is not None:
            if a.dtype != w.dtype:
                a = a.to(w.dtype)
            if a.dim() != 1 or not a.is_contiguous():
                a = a.reshape(rows)
            grp[2].append(len(tensors))  # type: ignore[union-attr]
            tensors.append(a)
    spec = tuple((tuple(layers), tuple(w_pos), None if a_pos is None else tuple(a_pos), tuple(rows),
                  math.prod(key[0]), key[3], key[4], (sum(rows), *key[0]), key[6])
                 for key, (layers, w_pos, a_pos, rows) in groups.items())
    bias_out = list(biases) if biases else [None] * len(weights)
    bias_spec, passed = [], []
    for k, b in enumerate(biases):
        if b is None:
            continue
        c = clips[k]
        lam = c[1] if isinstance(c, tuple) else c
        lam = float(lam or 0.0) if b.requires_grad and torch.is_grad_enabled() else 0.0
        floor = float(c[2]) if isinstance(c, tuple) and len(c) > 2 else _F.CLIP_BIAS_FLOOR
        if lam or (cast is not None and b.dtype == torch.float32 and b.device.type == cast[0]):
            bias_spec.append((len(tensors), lam, floor, isinstance(c, tuple) and len(c) > 3 and bool(c[3])))
            passed.append(k)
            tensors.append(b)
    out = _PWSMany.apply(spec, tuple(bias_spec), cast, scale, len(weights), *tensors)
    for k, v in zip(passed, out[len(weights):]):
        bias_out[k] = v
    return list(out[:len(weights)]), bias_out


# ------------------------------------------------------------------------------------------ the model-level hooks
class _Recompute:
    """What autograd keeps instead of a layer's α·Ŵ under ``recompute=True``: the raw weight and α (alive anyway as
    parameters), their versions and the layer's γ and gain."""

    __slots__ = ("w", "a", "versions", "gamma", "gain")

    def __init__(self, w: Tensor, a: Tensor | None, gamma: float, gain: float) -> None:
        self.w, self.a, self.gamma, self.gain = w, a, gamma, gain
        self.versions = (w._version, None if a is None else a._version)

    def materialize(self) -> Tensor:
        w, a = self.w, self.a
        if self.versions != (w._version, None if a is None else a._version):
            raise RuntimeError("fuse_standardization(recompute=True): a weight or alpha needed for gradient "
                               "computation has been modified by an inplace operation after the forward pass")
        rows = w.shape[0]
        with torch.no_grad():   # the native ops of the fused forward, so the same values, bit for bit
            out = torch.native_layer_norm(w.view(rows, -1), (w.numel() // rows,), None, None, self.gamma)[0]
            if a is not None:
                out.mul_((a * self.gain if self.gain != 1.0 else a).view(rows, 1))
            elif self.gain != 1.0:
                out.mul_(self.gain)
            return out.view_as(w)


class _Outer:
    """A tensor packed by saved-tensor hooks that were active outside the model (chained, not overridden)."""

    __slots__ = ("packed", "unpack")

    def __init__(self, packed: Any, unpack: Any) -> None:
        self.packed, self.unpack = packed, unpack


class _RecomputeHooks:
    """Saved-tensor hooks active during one fused forward: a layer's α·Ŵ saved by its conv for backward is replaced
    by a :class:`_Recompute` token and rebuilt when backward needs it; every other tensor goes to the hooks that were
    active outside the model, if any, or is kept as usual."""

    def __init__(self, outs: dict[int, tuple[Tensor, _Recompute]]) -> None:
        self.outs = outs
        self.outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, _unpack_saved)
        self.ctx.__enter__()

    def pack(self, t: Tensor) -> Any:
        hit = self.outs.get(id(t))
        if hit is not None and hit[0] is t:
            return hit[1]
        return t if self.outer is None else _Outer(self.outer[0](t), self.outer[1])

    def close(self) -> None:
        self.ctx.__exit__(None, None, None)
        self.outs.clear()     # drop the α·Ŵ tensors: from here on only the tokens refer to their layers


def _unpack_saved(x: Any) -> Tensor:
    # module-level (not a bound method): autograd keeps the unpack hook with every saved tensor, and it must not keep
    # the forward's α·Ŵ alive
    if type(x) is _Recompute:
        return x.materialize()
    if type(x) is _Outer:
        return x.unpack(x.packed)
    return x


def _layers(root: nn.Module) -> list[nn.Module]:
    """The modules under ``root`` (itself included) whose class defines ``fused_args``, in ``modules()`` order, each
    once. A class-attribute test and ``_modules`` directly: ``module.modules()`` plus ``getattr`` on every module
    (which goes through ``nn.Module.__getattr__`` and an exception for each module without the attribute) took 4×
    longer, measured on ResNet-8 and the ResNet-50-shaped net."""
    out, seen, stack = [], {id(root)}, [root]
    while stack:
        m = stack.pop()
        if hasattr(type(m), "fused_args"):
            out.append(m)
        children = [c for c in m._modules.values() if c is not None and id(c) not in seen]
        seen.update(map(id, children))
        stack.extend(reversed(children))
    return out


class _FusePre:
    """Forward pre-hook: standardize every fusable layer of the model that will need a fresh weight, in one node."""

    def __init__(self, recompute: bool = False) -> None:
        self.recompute = recompute

    def __call__(self, module: nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
            return   # traced, or under torch.func (vmap, grad, ...): the layers compute their weights (no table)
        fwd = prev = _ACTIVE.get()
        if fwd is not None:
            # inside another fused model's forward its table serves these layers too, unless saved-tensor hooks of
            # their own are in force (a checkpointed region: its recompute will have no outer table): a table of its own
            if fwd.owner is not self and (not fwd.grad or current_pack() is fwd.pack):
                fwd.depth += 1
                return
            if fwd.owner is self:   # its own table is still there: its forward was interrupted (KeyboardInterrupt
                fwd.close()         # skips torch's always-call hooks) or it calls itself: the old table is dropped
                prev = fwd.prev
        grad = torch.is_grad_enabled()
        if not (module.training or grad):
            return
        layers, args_ = [], []
        for m in _layers(module):   # walked every forward (≈15–35 µs), so layers added in any way are seen
            if m.__dict__.get("_weight_source") is not weight_source:
                m.__dict__["_weight_source"] = weight_source
            spec = m.fused_args()
            if spec is not None and needs_fresh(m, spec[0], spec[1]):
                layers.append(m)
                args_.append(spec)
        if not layers:
            return
        if self.recompute:   # recompute rebuilds α·Ŵ from the [filters, n] view of a contiguous weight only
            keep = [i for i, sp in enumerate(args_) if sp[0].is_contiguous()]
            layers, args_ = [layers[i] for i in keep], [args_[i] for i in keep]
            if not layers:
                return
        ws, als, gammas, gains, lams, biases = zip(*args_)
        # a channels_last weight is standardized through its contiguous [O, kh, kw, C] view (per-filter statistics do
        # not depend on the order of a filter's elements); its α·Ŵ is handed back in the weight's own layout
        cl = [not w.is_contiguous() for w in ws]
        rows = [w.permute(0, 2, 3, 1) if c else w for w, c in zip(ws, cl)]
        # gamma="auto" / clip: the node clips ∂L/∂W per filter (λ_W) and ∂L/∂α per entry or vector (λ) in its
        # backward and ∂L/∂β of the clipped layers likewise — all in the same node. Under autocast the node hands out the
        # weights and biases in autocast's dtype (one cast per group, not autocast's one per layer and tensor); a
        # layer that runs where autocast is off or set otherwise computes its own (fused_slot checks)
        cast = None
        if not self.recompute:
            dev = ws[0].device.type
            if dev in _CAST_DEVICES and torch.is_autocast_enabled(dev):
                cast = (dev, torch.get_autocast_dtype(dev))
        outs, bias_out = _fused(rows, als, gammas, gains, lams, biases, cast)
        outs = [o.permute(0, 3, 1, 2) if c else o for o, c in zip(outs, cl)]
        fwd = _Forward(self, grad, cast, prev)
        for m, w, a, o, b in zip(layers, ws, als, outs, bias_out):
            fwd.slots[id(m)] = (w, w._version, a, None if a is None else a._version, o, b)
        if self.recompute and grad:
            fwd.hooks = _RecomputeHooks({id(o): (o, _Recompute(w, a, g, gn))
                                         for o, w, a, g, gn in zip(outs, ws, als, gammas, gains)})
        fwd.set_pack()
        _ACTIVE.set(fwd)

    def post(self, module: nn.Module, args: Any, output: Any) -> None:
        """Forward hook (always called, also on an exception): the table made by this model's pre-hook dies."""
        if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
            return
        fwd = _ACTIVE.get()
        if fwd is None:
            return
        if fwd.owner is self:
            fwd.close()
        elif fwd.depth:
            fwd.depth -= 1


class FuseHandle:
    """What :func:`fuse_standardization` returns: ``.remove()`` takes the hooks off again."""

    def __init__(self, model: nn.Module, pre: _FusePre) -> None:
        self._model, self._pre = model, pre
        self._handles = (model.register_forward_pre_hook(pre), model.register_forward_hook(pre.post, always_call=True))
        self.active = True

    @property
    def recompute(self) -> bool:
        """Whether α·Ŵ is rebuilt in backward instead of kept (see :func:`fuse_standardization`)."""
        return self._pre.recompute

    def remove(self) -> None:
        if not self.active:
            return
        self.active = False
        if getattr(self._model, "_pws_fuse_handle", None) is self:
            del self._model._pws_fuse_handle
        for h in self._handles:
            h.remove()
        for m in _layers(self._model):
            if id(m) not in _ENTRIES:   # (a layer in an open cached() scope keeps the source until it closes)
                uninstall_source(m)


def fuse_standardization(model: nn.Module, *, recompute: bool = False) -> FuseHandle:
    """Standardize all PWS layers of ``model`` (eq. 12) in one autograd node per forward instead of one per layer.

    A forward pre-hook on ``model`` computes every PWS layer's α·Ŵ with :func:`pws_weights_fused` when the layer
    would compute it anyway (training, or gradients needed); each layer then uses its result. Values are identical
    to the unfused model and gradients equal up to float rounding (tested); the step is faster when the network has
    many small layers or the batch is small (BENCHMARKS.md), and it keeps no weight-sized x̂ for backward.

    ``recompute=True`` also drops the α·Ŵ each conv keeps for its backward and rebuilds it there from the raw weight
    (the same native op, so the same values): one weight-sized tensor less per layer during a step, at the cost of
    one more standardization per layer in backward. It works through saved-tensor hooks during the model's forward;
    hooks active outside the model (``torch.autograd.graph.save_on_cpu``, memory probes) still receive every other
    tensor. It saves memory for convolutions; ``PWSLinear`` keeps its α·Ŵ (``addmm`` saves a transposed view). A
    ``KeyboardInterrupt`` inside the forward skips torch's forward hooks: the table (and with ``recompute`` the
    saved-tensor hooks) stay until the model's next forward drops them.

    Safe by construction: a layer uses the pre-computed weight only during the forward of ``model`` that made it, in
    the same thread, the same grad mode and only while its ``weight``/``alpha`` are the same tensors at the same
    version (an in-place change makes it compute its own); layers called outside that forward, transposed /
    low-precision layers, α data-init before its first batch, and ``torch.compile`` tracing compute their weight as
    usual; :func:`pwsconv.cached` still serves eval; unused layers get no gradient. The hooks are picklable (``torch.save(model)``,
    ``copy.deepcopy``). Layers in an activation-checkpointed region (or one with its own saved-tensor hooks) and
    under ``torch.func`` transforms (per-sample gradients, ``hessian``) compute their own weights; penalties on input
    gradients work. Second-order gradients through the weights with ``torch.autograd`` (``create_graph=True``) raise:
    call ``handle.remove()`` (or ``fuse_pws: false``) there.
    The training engine turns this on for PWS models (``TrainConfig.fuse_pws``, ``TrainConfig.pws_recompute``).
    Calling it again on the same model returns the same handle, with ``recompute`` set as asked.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse_standardization expects an nn.Module, got {type(model).__name__}")
    if not isinstance(recompute, bool):
        raise TypeError(f"fuse_standardization: recompute must be a bool, got {recompute!r}")
    old = getattr(model, "_pws_fuse_handle", None)
    if old is not None and old.active:
        old._pre.recompute = recompute
        return old
    if not any(hasattr(type(m), "fused_args") for m in model.modules()):   # e.g. a folded model: nothing to fuse
        warnings.warn(f"fuse_standardization: {type(model).__name__} holds no PWS layer (yet), so nothing is "
                      "fused; PWS layers added later are served", stacklevel=2)
    handle = FuseHandle(model, _FusePre(recompute))
    model._pws_fuse_handle = handle
    return handle
