"""How a ``gamma="auto"`` PWS layer learns its γ and its clipping bounds from its optimizer (no per-step call).

:func:`pwsconv.param_groups` calls ``layer.link_optimizer_group(group)`` with the parameter group that holds the
layer's weight. torch's optimizers keep those very dicts and fill in their defaults, so once an SGD optimizer exists
the layer reads its starting LR and momentum there, once, and sets λ of α and β =
:func:`pwsconv.functional.auto_clip` (only spikes clipped, per entry, up to LR 0.1 at momentum 0.9; 0.005 above,
each layer's α and β as one vector: :func:`pwsconv.functional.auto_clip_vector`) and the floor of β's bound,
:func:`pwsconv.functional.auto_bias_floor` (β free up to LR 0.1 at momentum 0.9, held from about 3.2). Those are
kept whatever the schedule does. λ_W = :func:`pwsconv.functional.auto_clip_w` (each SGD step moves a filter by at
most ``AUTO_STEP`` of its norm) follows the group's *current* LR (:data:`AUTO_W_FOLLOWS_LR`, round 10): a bound on
the step, not on the gradient, so when the schedule lowers the LR the bound on the gradient loosens with it.
No λ is saved. A resumed run builds its optimizer from ``param_groups`` with the same starting LR and gets the same
α/β bounds; for λ_W to follow the LR the optimizer holds after ``optimizer.load_state_dict`` (which replaces the
group dicts), :func:`pwsconv.link_optimizer` ties the layers to the optimizer itself (the training engine does).
Compiled, λ_W follows too: computed in arithmetic alone, the LR becomes a symbolic input after its first change.
Without a linked SGD group the layer uses ``AUTO_CLIP_W``, ``AUTO_CLIP`` and ``CLIP_BIAS_FLOOR``.

γ acts in the forward, so it is state: the buffer ``auto_gamma_ppm`` holds the layer's γ relative to 2/n_l in
millionths (an integer: exact under dtype casts), 0 until chosen (``AUTO_GAMMA`` in force meanwhile). The first
forward that finds a linked SGD group chooses it from the starting LR, :func:`pwsconv.functional.auto_gamma`
(``AUTO_GAMMA_FREE`` up to LR 0.1 at momentum 0.9, ``AUTO_GAMMA`` above); a layer that trains without one (another
optimizer, or neither ``param_groups`` nor :func:`pwsconv.link_optimizer`) chooses ``AUTO_GAMMA``. It is kept
from then on — a later optimizer, a schedule or fine-tuning at another LR does not change the function — and
folding, inference, copies and a resumed run read it from the buffer. The layer keeps a copy of the buffer's
value so that a forward needs no device sync; the copy follows every write torch makes to the buffer (see
:class:`AutoGammaMixin`). A pwsconv checkpoint of an auto layer
(with α) saved before the buffer existed loads with ``AUTO_GAMMA``, the γ it was trained with; one without α cannot
be told from a plain torch layer's and loads unchosen. ``reset_parameters()`` un-chooses it.

The same links carry fp16's GradScaler (:func:`link_loss_scaler`, set by ``link_optimizer(..., scaler=)``): layers
that clip gradients in their backward multiply their bounds by its scale (:func:`backward_clips`,
:func:`fused_clips`), and MABN keeps its moving average of backward statistics unscaled (:func:`linked_scale`).
"""

from __future__ import annotations

from typing import Any

import torch

from .. import functional as _F

__all__ = ["link_optimizer_group", "link_live_group", "link_loss_scaler", "loss_scale_of", "linked_scale",
           "backward_clips",
           "fused_clips", "auto_clips_of", "AUTO_W_FOLLOWS_LR", "auto_gamma_of",
           "register_auto_gamma", "GAMMA_BUFFER",
           "AutoGammaMixin", "reset_auto_gamma"]

#: the buffer of a ``gamma="auto"`` layer holding its γ relative to 2/n_l in millionths (0: not chosen yet); an
#: integer, so casting the model to another float dtype leaves it exact
GAMMA_BUFFER = "auto_gamma_ppm"

#: ``gamma="auto"`` under SGD: λ_W is :func:`pwsconv.functional.auto_clip_w` of the linked group's current LR (True,
#: round 10: a bound on each filter's step that holds through the schedule) or of its starting LR (False: round 9)
AUTO_W_FOLLOWS_LR = True


class _OptimizerGroups:
    """The parameter groups that hold a layer's weight, newest last (a few ``param_groups`` calls may be made before
    one of them reaches an optimizer). Derived, not state: a copy or an unpickled layer is unlinked until its own
    ``param_groups`` call."""

    __slots__ = ("groups", "live", "scaler")

    def __init__(self) -> None:
        self.groups: list[dict] = []
        self.live: dict | None = None   # the optimizer's own group (pwsconv.link_optimizer), followed for λ_W
        self.scaler: Any = None         # the GradScaler whose scale the gradients carry (pwsconv.link_optimizer)

    def __reduce__(self) -> tuple:
        return (_OptimizerGroups, ())

    def __deepcopy__(self, memo: dict) -> "_OptimizerGroups":
        return _OptimizerGroups()


def _link_of(layer: Any) -> _OptimizerGroups:
    """The layer's links to its optimizer's groups (made empty on first use)."""
    link = layer.__dict__.get("_opt_group")
    if link is None:
        link = layer.__dict__["_opt_group"] = _OptimizerGroups()
    return link


def link_optimizer_group(layer: Any, group: dict) -> None:
    """Called by :func:`pwsconv.param_groups` with the group that holds ``layer``'s weight: ``gamma="auto"`` reads
    the learning rate and momentum from it once an optimizer has filled them in (and again after a new call)."""
    link = _link_of(layer)
    link.groups, link.live = link.groups[-3:] + [group], None
    layer.__dict__["_auto_clips"] = None


def link_live_group(layer: Any, group: dict) -> None:
    """Called by :func:`pwsconv.link_optimizer` with the optimizer's group that holds ``layer``'s weight (again after
    every ``optimizer.load_state_dict``): λ_W follows that group's LR. The bounds chosen from the starting LR stay as
    they are (a resumed run chooses them from the group its ``param_groups`` call made, as the run it continues)."""
    link = _link_of(layer)
    if link.live is not group and not any("lr" in g for g in link.groups):
        layer.__dict__["_auto_clips"] = None   # no filled param_groups group: the choice reads this one
    link.live = group


def link_loss_scaler(layer: Any, scaler: Any) -> None:
    """Called by :func:`pwsconv.link_optimizer` with its ``scaler``: a ``torch.amp.GradScaler`` whose scale the loss
    is multiplied by before ``backward()`` (fp16 mixed precision), or None (a disabled scaler counts as None: it
    scales nothing, and it stays disabled). The clipping bounds compare gradients with the weights, so in backward
    they are multiplied by that scale (:func:`backward_clips`, :func:`fused_clips`)."""
    _link_of(layer).scaler = scaler if scaler is not None and scaler.is_enabled() else None


def loss_scale_of(layer: Any) -> Any:
    """The scale a linked GradScaler multiplies the loss by: its scale tensor (``update()`` and loads change it in
    place, so the clip nodes read its value when they run: no device sync, no graph break), or before its first
    ``scale()`` the float that call will use; None without a scaler (warned once under float16 autocast, where one
    is usual)."""
    s = linked_scale(layer)
    if s is None and not torch.compiler.is_compiling():
        _warn_if_fp16_unscaled(layer)
    return s


def linked_scale(layer: Any) -> Any:
    """The scale of the GradScaler linked to ``layer`` (:func:`link_loss_scaler`): its tensor (changed in place by
    ``update()`` and loads; GradScaler's scales are powers of two), before its first ``scale()`` the float that
    call will use, else None."""
    link = layer.__dict__.get("_opt_group")
    scaler = None if link is None else link.scaler
    if scaler is None:
        return None
    s = scaler._scale
    return float(scaler._init_scale) if s is None else s


def backward_clips(layer: Any) -> tuple:
    """``layer.clips()`` with λ_W and λ of α and β multiplied by the loss scale of a linked GradScaler
    (:func:`loss_scale_of`; then tensors, or floats before the first step): the bounds the per-layer backward
    applies to gradients of the scaled loss."""
    clips = layer.clips()
    if not (clips[0] or clips[1]):   # (paper PWS: no lookup at all)
        return clips
    s = loss_scale_of(layer)
    return clips if s is None else (clips[0] * s if clips[0] else 0.0, clips[1] * s if clips[1] else 0.0) + clips[2:]


def fused_clips(layer: Any) -> tuple:
    """``layer.clips()`` and, fifth, the loss scale (:func:`loss_scale_of`, None without one) for
    :func:`pwsconv.fuse_standardization`'s node, which groups layers by the bounds and applies the scale in its
    backward."""
    clips = layer.clips()
    return clips + ((loss_scale_of(layer) if clips[0] or clips[1] else None),)


_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None) or (
    lambda: torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu"))


def _warn_if_fp16_unscaled(layer: Any) -> None:
    """Warn once (per call site) when a clipping layer trains under float16 autocast without a linked GradScaler."""
    if not _any_autocast():   # the usual case: done (one call)
        return
    w = layer._raw_weight()
    dev = w.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == torch.float16 \
            and layer.training and torch.is_grad_enabled() and w.requires_grad:
        import warnings

        warnings.warn(f"{type(layer).__name__} clips gradients in its backward and runs under float16 autocast: if "
                      "a GradScaler scales the loss, call pwsconv.link_optimizer(model, optimizer, scaler=scaler) so "
                      "that the bounds apply to the unscaled gradients (else they are tighter by the scale)",
                      stacklevel=4)


def remap_groups(layer: Any, to: dict[int, dict]) -> None:
    """Called by :func:`pwsconv.optim.remap_optimizer_groups`: each link of ``layer`` to a group whose id is in
    ``to`` goes to the group that replaced it (an optimizer's ``load_state_dict``); other links stay."""
    link = layer.__dict__.get("_opt_group")
    if link is not None:
        link.groups = [to.get(id(g), g) for g in link.groups]
        link.live = to.get(id(link.live), link.live) if link.live is not None else None


def auto_clips_of(layer: Any) -> tuple[float, float, float, bool]:
    """(λ of ``layer``'s filters, λ of α and β, the floor of β's bound, α and β clipped per vector) under
    ``gamma="auto"``: learned from the newest linked group that an SGD optimizer has filled in — λ_W from its current
    LR (:data:`AUTO_W_FOLLOWS_LR`), the others once, from its starting LR — else (AUTO_CLIP_W, AUTO_CLIP,
    CLIP_BIAS_FLOOR, False)."""
    link = layer.__dict__.get("_opt_group")
    if link is not None and link.live is not None and "dampening" not in link.live:
        return _F.AUTO_CLIP_W, _F.AUTO_CLIP, _F.CLIP_BIAS_FLOOR, False   # tied to another optimizer than SGD
    clips = layer.__dict__.get("_auto_clips")
    if clips is None or len(clips) != 4:     # (a model pickled by round 7 or before cached 3 entries: re-read)
        sgd = _sgd_group(layer, warn=True)
        if sgd is None:   # no optimizer (yet), or not SGD: the fixed values
            return _F.AUTO_CLIP_W, _F.AUTO_CLIP, _F.CLIP_BIAS_FLOOR, False
        lr, m = sgd
        lam_w, lam, floor = _F.auto_clip_w(lr, m), _F.auto_clip(lr, m), _F.auto_bias_floor(lr, m)
        if lam_w is None or lam is None or floor is None:
            return _F.AUTO_CLIP_W, _F.AUTO_CLIP, _F.CLIP_BIAS_FLOOR, False
        # once: the LR the optimizer starts with, whatever the schedule does
        clips = layer.__dict__["_auto_clips"] = (lam_w, lam, floor, bool(_F.auto_clip_vector(lr, m)))
    if not AUTO_W_FOLLOWS_LR:
        return clips
    now = _current_lr(link)
    if now is None:
        return clips
    if torch.compiler.is_compiling():   # no cache, no float(): dynamo keeps the LR symbolic, so no recompile per LR
        return clips if (lam_w := _traced_clip_w(*now)) is None else (lam_w,) + clips[1:]
    follow = layer.__dict__.get("_auto_follow")   # (LR and momentum, the chosen bounds, the bounds now)
    if follow is None or follow[0] != now or follow[1] is not clips:
        lam_w = _F.auto_clip_w(*now)
        follow = layer.__dict__["_auto_follow"] = (now, clips, clips if lam_w is None else (lam_w,) + clips[1:])
    return follow[2]


def _traced_clip_w(lr: Any, m: Any) -> Any:
    """:func:`pwsconv.functional.auto_clip_w` in arithmetic alone (the same operations, so the same float), for a
    compiled forward: a Python float from the optimizer's group becomes a symbolic input after its first change
    (dynamo's automatic dynamic), where ``float()``, ``math`` or ``max`` would specialize it and recompile at every
    change. ``None`` where the rule is not defined (the guards are on the signs only)."""
    if not (0 < lr < float("inf")) or not (0 <= m < 1):
        return None
    step = _F.AUTO_STEP * (1.0 - m) / lr * torch.sym_max(1.0, _F.AUTO_STEP_KNEE * (1.0 - m) / lr)
    return torch.sym_max(step, _F.AUTO_CLIP_W_MIN)


def _current_lr(link: _OptimizerGroups | None) -> tuple[Any, Any] | None:
    """(LR now, momentum) of the optimizer's group (:func:`link_live_group`), else of the newest linked SGD group."""
    if link is None:
        return None
    group = link.live if link.live is not None else next((g for g in reversed(link.groups) if "lr" in g), None)
    if group is None or "dampening" not in group:
        return None
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):   # a tensor LR (filled in place by schedulers): its value, in eager only
        if torch.compiler.is_compiling():
            return None
        lr = float(lr)
    return lr, group.get("momentum", 0.0)


def _sgd_group(layer: Any, warn: bool = False) -> tuple[Any, Any] | None:
    """(starting LR, momentum) of the newest linked group an SGD optimizer has filled in (else of the optimizer's
    own group, :func:`link_live_group`), else None. The starting LR is a scheduler's ``max_lr`` (OneCycleLR: the
    largest it reaches) or ``initial_lr``, else the LR."""
    link = layer.__dict__.get("_opt_group")
    group = next((g for g in reversed(link.groups) if "lr" in g), None) if link is not None else None
    if group is None and link is not None and link.live is not None and "lr" in link.live:
        group = link.live
    if warn and group is None and link is not None and layer.training and torch.is_grad_enabled():
        _warn_if_never_filled(layer)
    if group is None or "dampening" not in group:
        return None
    key = "max_lr" if "max_lr" in group else "initial_lr" if "initial_lr" in group else "lr"
    return group[key], group.get("momentum", 0.0)


def register_auto_gamma(layer: Any, ppm: int = 0) -> None:
    """Called when ``gamma`` is set (on construction or assignment): an auto layer gets γ's buffer (``ppm``; 0: not
    chosen) if it has none; a layer set to a number loses it (its state_dict keys are paper PWS's again)."""
    d = layer.__dict__
    if d.get("_gamma") != "auto":
        if layer._buffers.pop(GAMMA_BUFFER, None) is not None:
            d.pop("_auto_gamma", None)
        return
    if GAMMA_BUFFER in layer._buffers:
        return
    w = layer._raw_weight()
    layer.register_buffer(GAMMA_BUFFER, torch.full((), ppm, dtype=torch.int32, device=w.device))
    _mirror(layer, ppm)
    if not d.get("_auto_gamma_hooks"):   # once per layer (hooks are kept when γ goes to a number and back)
        d["_auto_gamma_hooks"] = True
        layer.register_load_state_dict_pre_hook(_load_older_checkpoint)
        layer.register_load_state_dict_post_hook(_read_loaded_gamma)
        layer.register_state_dict_pre_hook(_choose_before_saving)


def _mirror(layer: Any, ppm: int) -> None:
    """Record ``ppm`` as the value of the layer's buffer as it is now (identity, version counter): any other write to
    it, or another tensor in its place, makes :func:`auto_gamma_of` read it again. A change of γ in force bumps the
    layer's ``_settings_version`` (the eval cache keys on it)."""
    d = layer.__dict__
    buf = layer._buffers[GAMMA_BUFFER]
    old = d.get("_auto_gamma")
    if old is not None and old[2] != ppm:
        d["_settings_version"] = d.get("_settings_version", 0) + 1
    d["_auto_gamma"] = (buf, _version(buf), ppm)


def _store(layer: Any, ppm: int) -> None:
    """Write ``ppm`` into the layer's buffer (a meta tensor holds no value) and record it."""
    buf = layer._buffers[GAMMA_BUFFER]
    if not buf.is_meta:
        with torch.no_grad():
            buf.fill_(ppm)
    _mirror(layer, ppm)


def _reread(layer: Any) -> None:
    """Record the value the layer's buffer holds now (one read; a meta tensor holds none: 0)."""
    buf = layer._buffers[GAMMA_BUFFER]
    _mirror(layer, 0 if buf.is_meta else int(buf))


def _version(t: torch.Tensor) -> int | None:
    """Its version counter (None in a compiled forward, which never compares it, and for an inference tensor)."""
    return None if torch.compiler.is_compiling() or t.is_inference() else t._version


def _load_older_checkpoint(layer: Any, state_dict: dict, prefix: str, *args: Any) -> None:
    """A pwsconv checkpoint of the layer (it has α) without γ's buffer was trained with ``AUTO_GAMMA``: load that."""
    if layer.__dict__.get("_gamma") == "auto" and prefix + GAMMA_BUFFER not in state_dict \
            and prefix + "alpha" in state_dict:
        state_dict[prefix + GAMMA_BUFFER] = torch.tensor(round(_F.AUTO_GAMMA * 1e6), dtype=torch.int32)


def reset_auto_gamma(layer: Any) -> None:
    """``reset_parameters()``: a re-initialized auto layer chooses its γ again (from the LR it next trains with)."""
    if GAMMA_BUFFER in layer._buffers:
        _store(layer, 0)
        layer.__dict__.pop("_auto_gamma_w0", None)


def _read_loaded_gamma(layer: Any, incompatible_keys: Any = None) -> None:
    """After ``load_state_dict``: read the loaded value once here (not in the next forward, which may be compiled)."""
    if GAMMA_BUFFER in layer._buffers:   # always read (an inference tensor has no version counter to tell a write)
        _reread(layer)


def _choose_before_saving(layer: Any, *args: Any) -> None:
    """A state_dict saved once the optimizer is known holds the γ the layer's next forward will use."""
    if layer.__dict__.get("_gamma") == "auto":
        auto_gamma_of(layer)


def auto_gamma_of(layer: Any, choose: bool = True) -> float:
    """γ of a ``gamma="auto"`` layer relative to 2/n_l: chosen once from the linked SGD group's starting LR
    (:func:`pwsconv.functional.auto_gamma`) and kept in its buffer; ``AUTO_GAMMA`` until then, and for good once the
    layer has trained without an SGD group (:func:`_chosen_gamma`).
    The layer keeps a copy of the buffer's value, read again only after another write to it (``load_state_dict``,
    DDP's broadcast, an EMA copy, ``functional_call``): no device sync per forward."""
    if GAMMA_BUFFER not in layer._buffers:   # a layer pickled before γ's buffer existed: it trained with AUTO_GAMMA
        register_auto_gamma(layer, round(_F.AUTO_GAMMA * 1e6))
    buf = layer._buffers[GAMMA_BUFFER]
    seen = layer.__dict__.get("_auto_gamma")
    # (a compiled forward trusts the copy: dynamo cannot guard on a version counter; the eager paths refresh it)
    if seen is None or not torch.compiler.is_compiling() and (seen[0] is not buf or seen[1] != _version(buf)):
        if _wrapped(buf):   # vmap over stacked models' buffers: the layer's own value, nothing chosen in there
            return seen[2] / 1e6 if seen is not None and seen[2] else _F.AUTO_GAMMA
        _reread(layer)
        seen = layer.__dict__["_auto_gamma"]
    ppm = seen[2]
    if ppm == 0 and choose:   # not chosen yet: from the optimizer's starting LR once there is one
        gamma = _chosen_gamma(layer)
        if gamma is not None:
            if torch._C._functorch.maybe_current_level() is not None:   # inside torch.func.grad/vmap: no write to
                return gamma                                # a captured buffer; the next plain forward stores it
            ppm = round(gamma * 1e6)
            _store(layer, ppm)
    return ppm / 1e6 if ppm else _F.AUTO_GAMMA


#: optimizer steps (in-place updates of the weight, seen by its version counter) after which a layer that trains
#: without a filled optimizer group keeps AUTO_GAMMA for good
_STEPS_WITHOUT_GROUP = 2


def _chosen_gamma(layer: Any) -> float | None:
    """γ from the linked SGD group; AUTO_GAMMA where the layer trains without one (a filled non-SGD group, or its
    weight updated ``_STEPS_WITHOUT_GROUP`` times in training mode with no group); None: not known yet."""
    sgd = _sgd_group(layer)
    if sgd is not None:
        return _F.auto_gamma(*sgd)
    link = layer.__dict__.get("_opt_group")
    if link is not None and any("lr" in g for g in link.groups):   # an optimizer filled it in, not SGD
        return _F.AUTO_GAMMA
    w = layer._raw_weight()
    if not layer.training or torch.compiler.is_compiling() or w.is_inference():
        return None
    first = layer.__dict__.get("_auto_gamma_w0")           # (the weight, its version when first seen training)
    if first is None or first[0] is not w:
        layer.__dict__["_auto_gamma_w0"] = (w, w._version)
        return None
    return _F.AUTO_GAMMA if w._version - first[1] >= _STEPS_WITHOUT_GROUP else None


def _wrapped(t: torch.Tensor) -> bool:
    """A tensor of a torch.func transform (vmap over stacked buffers): no value to read here."""
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


class AutoGammaMixin:
    """What keeps γ's buffer and the layer's copy of it together through torch's module machinery (and the links
    to the optimizer's groups through a reload: ``remap_optimizer_groups``)."""

    remap_optimizer_groups, link_loss_scaler = remap_groups, link_loss_scaler
    backward_clips, fused_clips = backward_clips, fused_clips

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``.to()``, ``.cuda()``, ``to_empty()``: the value recorded before the move is written into the new
        buffer (to_empty leaves it uninitialized) and recorded with it, so the next forward reads nothing."""
        ppm = None
        if GAMMA_BUFFER in self._buffers:   # type: ignore[attr-defined]
            auto_gamma_of(self, choose=False)   # the value now (read again if something else wrote it)
            ppm = self.__dict__["_auto_gamma"][2]
        out = super()._apply(fn, *args, **kwargs)  # type: ignore[misc]
        buf = self._buffers.get(GAMMA_BUFFER)   # type: ignore[attr-defined]
        if ppm is not None and buf is not None and self.__dict__["_auto_gamma"][0] is not buf:
            _store(self, ppm)
        return out

    def train(self, mode: bool = True) -> Any:
        """``train()`` / ``eval()``: the layer's copy of γ is brought up to date (and γ chosen if it can be) here,
        outside any compiled region — a compiled forward trusts the copy (dynamo cannot guard on version counters),
        so a write to the buffer in place (an EMA's copy, DDP's broadcast) reaches it at the next mode switch."""
        out = super().train(mode)  # type: ignore[misc]
        if GAMMA_BUFFER in self._buffers and self.__dict__.get("_gamma") == "auto":   # type: ignore[attr-defined]
            auto_gamma_of(self)
        return out

    def _settings_key(self) -> int:
        """What the eval cache keys on besides the parameters (γ chosen first, which bumps the version)."""
        if self.__dict__.get("_gamma") == "auto":
            auto_gamma_of(self)
        return self._settings_version   # type: ignore[attr-defined]

    def __getstate__(self) -> dict:
        """Pickling, deepcopy (and so ``fold``, an EMA copy): γ is chosen first, so the copy computes as the original
        (a copy is unlinked from the optimizer)."""
        if self.__dict__.get("_gamma") == "auto":
            auto_gamma_of(self)
        state = dict(super().__getstate__())  # type: ignore[misc]
        for key in ("_auto_clips", "_auto_follow", "_auto_unfilled"):   # the bounds come from the copy's optimizer
            state.pop(key, None)
        return state


#: reads of the bounds in training (one or two per forward) after which a layer linked by ``param_groups`` whose
#: groups never reached an optimizer warns (a forward or two before the optimizer exists is usual)
_UNFILLED_READS = 6


def _warn_if_never_filled(layer: Any) -> None:
    """Warn once: ``param_groups`` linked the layer, but training runs and no optimizer has filled in those dicts —
    the optimizer got copies (``{**g, "lr": ...}``), so the fixed bounds are in force, not the LR's."""
    n = layer.__dict__.get("_auto_unfilled", 0) + 1
    layer.__dict__["_auto_unfilled"] = n
    if n == _UNFILLED_READS:
        import warnings

        warnings.warn(f'gamma="auto": {type(layer).__name__} trains, but the parameter groups pwsconv.param_groups '
                      "linked it to never reached an optimizer (was it given copies of them?), so its clipping uses "
                      "the fixed bounds, not your LR's: pass the dicts param_groups returns to the optimizer as they "
                      "are (set lr / momentum in them)", stacklevel=4)
