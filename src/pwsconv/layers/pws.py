"""The PWS layer family: thin subclasses of torch layers around :func:`pwsconv.functional.pws_weight`.

Each class keeps its torch parent's constructor arguments and ``weight`` / ``bias`` state_dict keys and adds a
trainable per-filter ``alpha`` (eq. 12: Y_o = α_o · (X ⊛ Ŵ_o) + β_o). ``layer.to_plain()`` returns the parent torch
layer holding α·Ŵ and the bias (exact folding; the paper: "PWS can be reset to a normal conv layer in the inference
stage").
"""

from __future__ import annotations

import math
import numbers
import threading
import weakref
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional import (AUTO_CLIP, AUTO_GAMMA, check_clip, check_gamma, he_std, pws_weight, pws_weights_fused,
                          unit_clip, unit_clip_many)

__all__ = [
    "PWSMixin",
    "PWSConv1d",
    "PWSConv2d",
    "PWSConv3d",
    "PWSConvTranspose1d",
    "PWSConvTranspose2d",
    "PWSConvTranspose3d",
    "PWSLinear",
    "FAN_MODES",
    "fuse_standardization",
]

FAN_MODES = ("fan_in", "fan_out")


def _is_compiling_fallback() -> bool:  # pragma: no cover - torch < 2.3
    return False


# bound directly (not wrapped): this runs on every eval forward, and dynamo recognizes the function itself
_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", _is_compiling_fallback)


#: optimizer steps taken in this process (any optimizer). Fused/foreach optimizer kernels may update parameters
#: without bumping their version counters, so the eval cache also keys on this count.
_OPTIMIZER_STEPS = [0]
_OPTIMIZER_HOOK: list[Any] = []


def _bump_optimizer_steps(optimizer: Any, args: Any, kwargs: Any) -> None:
    _OPTIMIZER_STEPS[0] += 1


def _count_optimizer_steps() -> None:
    if not _OPTIMIZER_HOOK:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _OPTIMIZER_HOOK.append(register_optimizer_step_post_hook(_bump_optimizer_steps))


def _check_fan_mode(value: str) -> str:
    if value not in FAN_MODES:
        raise ValueError(f"fan_mode must be one of {FAN_MODES}, got {value!r}")
    return value


def _setting(field: str, convert: Any, doc: str) -> property:
    """A layer setting stored in ``field``: assignment converts/validates the value and drops the eval cache."""
    def set_(self: Any, value: Any) -> None:
        setattr(self, field, convert(value))
        self._cache = None

    return property(lambda self: getattr(self, field), set_, doc=doc)


class PWSMixin:
    """Shared machinery of the PWS layers: α, γ, the ablation switches, the eval cache and folding.

    Constructor switches (paper defaults first):
        gamma (1e-3): γ of eq. 12, ≥ 0; or ``"auto"``: the stabilized PWS that trains at BN's learning rates —
            γ relative to the He-init filter variance (γ·2/n_l with γ = ``AUTO_GAMMA``, the authors' ``equiv`` rule)
            plus unit-wise adaptive gradient clipping of W, α and β inside the layer (``clip``, default
            ``AUTO_CLIP``). The forward is eq. 12 unchanged (batch-independent, foldable); only gradients differ.
        clip (None): unit-wise adaptive gradient clipping λ (Brock et al. 2021) applied in the layer's backward:
            each filter's ∂L/∂W_o is scaled so that ‖∂L/∂W_o‖ ≤ λ·‖W_o‖, and each α_o / β_o gradient is clamped to
            λ·max(|α_o|, 1e-3). ``None``: ``AUTO_CLIP`` under ``gamma="auto"``, off otherwise; ``0``: off.
        use_alpha (True): trainable per-filter α (Table 2 "Trainable α").
        use_gain (True): the sqrt(2/n_l) factor of eq. 12 (Table 2 "sqrt(2/n_l) in (12)").
        fan_mode ("fan_in"): n used by sqrt(2/n) and by the He init of the raw weights; "fan_in" is the paper's n_l.
        equiv (False): the authors' "equiv" option, γ → 2γ/n, i.e. Ŵ = (W − μ)/sqrt(n·Var/2 + γ).
        data_init_alpha (False): the authors' "initalpha": on the first training forward α ← sqrt(2 / Var(Y)).
    """

    weight: Tensor
    bias: Tensor | None
    alpha: nn.Parameter | None
    _plain_cls: type[nn.Module]
    _transposed_layout: bool = False
    _memory_format: Any = None      # torch.channels_last(_3d) when the raw weight has that layout

    def _pws_setup(
        self,
        gamma: float | str,
        use_alpha: bool,
        use_gain: bool,
        fan_mode: str,
        equiv: bool,
        data_init_alpha: bool,
        clip: float | None = None,
    ) -> None:
        self._cache: tuple | None = None
        _refuse_complex(self, self.weight.dtype)
        self._update_layout()
        self.fan_mode = fan_mode      # the setters validate
        self.gamma = gamma
        self.clip = clip
        self.use_gain = use_gain
        self.equiv = equiv
        self.data_init_alpha = bool(data_init_alpha)
        n_filter = self.filter_size
        if n_filter < 2:
            raise ValueError(
                f"{type(self).__name__}: a filter has {n_filter} element(s); standardizing a single weight gives 0. "
                "PWS needs in_channels/groups × kernel elements ≥ 2 (leave such layers as plain layers)"
            )
        out = self.weight.shape[1] * (self.groups if hasattr(self, "groups") else 1) if self._transposed_layout \
            else self.weight.shape[0]
        if use_alpha:
            self.alpha = nn.Parameter(torch.ones(out, device=self.weight.device, dtype=self.weight.dtype))
        else:
            self.register_parameter("alpha", None)
        if data_init_alpha:
            self.register_buffer("alpha_initialized", torch.zeros((), dtype=torch.bool, device=self.weight.device))
        self._fused: tuple | None = None   # (token, key, α·Ŵ, (β, clipped β) or None): set by fuse_standardization
        self._pws_ready = True
        self.reset_parameters()

    # ------------------------------------------------------------------ geometry
    @property
    def filter_size(self) -> int:
        """n_l: the number of weights in one filter (in_channels/groups × kernel elements)."""
        w = self._parameters["weight"]   # not self.weight (nn.Module.__getattr__): read on every fused step
        if not self._transposed_layout:
            return w.numel() // w.shape[0]
        k = math.prod(w.shape[2:]) if w.dim() > 2 else 1
        return (w.shape[0] // self.groups) * k

    @property
    def fan(self) -> int:
        """The n of sqrt(2/n) and of the He init: ``filter_size`` for fan_in, out_channels/groups × kernel for fan_out."""
        if self._fan_mode == "fan_in":
            return self.filter_size
        w = self._parameters["weight"]
        k = math.prod(w.shape[2:]) if w.dim() > 2 else 1
        out_per_group = w.shape[1] if self._transposed_layout else w.shape[0] // getattr(self, "groups", 1)
        return out_per_group * k

    # the settings _compute_weight reads: assigning one validates it and drops the eval cache, so the cache needs to
    # watch only the tensors
    gamma = _setting("_gamma", lambda v: v if isinstance(v, str) and v == "auto" else check_gamma(v),
                     'γ of eq. 12 (validated on assignment), or "auto".')
    clip = _setting("_clip", check_clip, "Unit-wise adaptive gradient clipping λ (None: AUTO_CLIP under gamma=\"auto\").")

    @property
    def clip_lambda(self) -> float:
        """The clipping λ in force (0: no clipping)."""
        if self._clip is not None:
            return self._clip
        return AUTO_CLIP if self._gamma == "auto" else 0.0
    use_gain = _setting("_use_gain", bool, "Whether eq. 12's sqrt(2/n_l) factor is applied.")
    fan_mode = _setting("_fan_mode", _check_fan_mode,
                        '"fan_in" (the paper\'s n_l) or "fan_out": the n of sqrt(2/n) and of the He init.')
    equiv = _setting("_equiv", bool, 'The authors\' "equiv" option: γ → 2γ/n.')

    @property
    def effective_gamma(self) -> float:
        """γ as used inside the square root (2γ/n under ``equiv`` and for ``gamma="auto"``)."""
        if self._gamma == "auto":
            return 2.0 * AUTO_GAMMA / self.fan
        return 2.0 * self._gamma / self.fan if self.equiv else self._gamma

    @property
    def gain(self) -> float:
        return he_std(self.fan) if self._use_gain else 1.0

    # ------------------------------------------------------------------ init
    def reset_parameters(self) -> None:
        if not getattr(self, "_pws_ready", False):
            return  # called by the torch parent's __init__ before the PWS attributes exist
        with torch.no_grad():
            self.weight.normal_(0.0, he_std(self.fan))  # He (kaiming normal, ReLU) init, paper "Experiments"
            if self.bias is not None:
                self.bias.zero_()
            if self.alpha is not None:
                self.alpha.fill_(1.0)
            if self.data_init_alpha:
                self.alpha_initialized.fill_(False)
        self._cache = None

    # ------------------------------------------------------------------ the standardized weight
    def _layout(self) -> tuple[tuple[int, ...] | None, tuple[int, ...], tuple[int, ...]]:
        """(grouped view shape or None, filter dims to reduce, α broadcast shape)."""
        w = self.weight
        if not self._transposed_layout:
            return None, tuple(range(1, w.dim())), (w.shape[0],) + (1,) * (w.dim() - 1)
        g = self.groups
        view = (g, w.shape[0] // g) + tuple(w.shape[1:])  # [G, Cin/G, Cout/G, *k]
        reduce = (1,) + tuple(range(3, len(view)))
        return view, reduce, (g, 1, w.shape[1]) + (1,) * (w.dim() - 2)

    def _compute_weight(self) -> Tensor:
        view, reduce, alpha_shape = self._layout()
        w = self.weight if view is None else self.weight.reshape(view)
        alpha, lam = self.alpha, self.clip_lambda
        if lam:   # gamma="auto" / clip: identity forward, clipped gradients (per filter for W, per entry for α)
            w, alpha = unit_clip(w, lam, reduce), unit_clip(alpha, lam)
        alpha = None if alpha is None else alpha.view(alpha_shape)
        out = pws_weight(w, self.effective_gamma, alpha, reduce_dims=reduce, gain=self.gain)
        return out if view is None else out.reshape(self.weight.shape)

    def _bias(self) -> Tensor | None:
        """β as the layer applies it: clipped in backward when ``clip_lambda`` > 0."""
        p = self._parameters   # straight from the dict unless parametrized (nn.Module.__getattr__ is slow)
        b = p["bias"] if "bias" in p else self.bias
        lam = self.clip_lambda
        if not lam or b is None:
            return b
        f = self._fused   # fuse_standardization clipped every layer's β in one node for this forward
        if f is not None and f[0][0] and len(f) > 3 and f[3] is not None and f[3][0] is b:
            return f[3][1]
        return unit_clip(b, lam)

    def _needs_fresh_weight(self, w: Tensor, a: Tensor | None) -> bool:
        """Training, or gradients wanted: α·Ŵ is computed anew (in the graph) instead of taken from the eval cache."""
        return self.training or (torch.is_grad_enabled() and (w.requires_grad or (a is not None and a.requires_grad)))

    def standardized_weight(self) -> Tensor:
        """α·Ŵ of eq. 12 as the layer uses it.

        In eval mode, when no gradient is needed, the result is cached and reused until ``weight`` or ``alpha``
        change (in place, by ``load_state_dict``, by an optimizer, by replacing the Parameter, or by ``.to()``), a
        setting (``gamma``, ``use_gain``, ``fan_mode``, ``equiv``) is assigned, any optimizer takes a step (fused
        optimizer kernels do not bump version counters), or the layer goes back to ``.train()``; the cache is keyed
        on the tensors' identity, version counters and storage. Parameters created under ``torch.inference_mode``
        have no version counter and are never cached.
        Writes through ``.data`` (``layer.weight.data.mul_(2)``) bypass the version counter: call ``layer.eval()``
        again after them. Under ``torch.compile`` the cache is not used.
        """
        params = self._parameters
        w, a = params["weight"], params["alpha"]
        c = self._cache
        # the eval fast path, as few Python operations as possible (it runs once per layer and forward, between
        # conv kernels that have just evicted the interpreter's data from the CPU caches): the same tensors, at the
        # same version and storage, no optimizer step since, no gradient wanted, not tracing
        if c is not None and c[0] is w and c[1] is a and c[2] == w._version and c[3] == w.data_ptr() \
                and (a is None or (c[4] == a._version and c[5] == a.data_ptr())) and c[7] == _OPTIMIZER_STEPS[0] \
                and not (torch.is_grad_enabled() and (w.requires_grad or (a is not None and a.requires_grad))) \
                and not _is_compiling():
            return c[6]     # (a cache exists only in eval mode: .train() drops it and training never makes one)
        if self._needs_fresh_weight(w, a) or _is_compiling():
            if c is not None:
                self._cache = None
            fused = self._fused
            if fused is not None and fused[0][0] and fused[1] == _fused_key(w, a):
                return fused[2]   # computed for this forward by fuse_standardization's pre-hook
            return self._compute_weight()
        # outside inference mode even when called inside it: the cached tensor must stay usable in a later graph
        # (eval with frozen weights but an input that wants gradients)
        with torch.inference_mode(False), torch.no_grad():
            out = self._compute_weight()
        if w.is_inference() or (a is not None and a.is_inference()):
            return out   # parameters made under inference_mode have no version counter to key a cache on
        _count_optimizer_steps()
        # the detached views keep the storage alive: after ``weight.data = other`` the old block cannot be handed
        # to a new tensor at the same address, so the storage check cannot be fooled
        self._cache = (w, a, w._version, w.data_ptr(), None if a is None else a._version,
                       None if a is None else a.data_ptr(), out, _OPTIMIZER_STEPS[0], w.detach(),
                       None if a is None else a.detach())
        return out

    def __getstate__(self) -> dict:  # pickling / deepcopy: the cache is derived data, never saved
        state = super().__getstate__()  # type: ignore[misc]
        state["_cache"] = None
        state["_fused"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        # models pickled before use_gain / fan_mode / equiv became cache-dropping properties stored them plainly
        for k in ("use_gain", "fan_mode", "equiv"):
            if k in state:
                state["_" + k] = state.pop(k)
        state.setdefault("_clip", None)   # layers pickled before ``clip`` existed: paper PWS, no clipping
        super().__setstate__(state)  # type: ignore[misc]

    def train(self, mode: bool = True):  # type: ignore[override]
        self._cache = None
        return super().train(mode)  # type: ignore[misc]

    def _apply(self, fn, *args, **kwargs):  # .to(), .half(), .cuda(): drop the cache with the old tensors
        self._cache = None
        out = super()._apply(fn, *args, **kwargs)  # type: ignore[misc]
        if "weight" in self._parameters:
            _refuse_complex(self, self._parameters["weight"].dtype)
            self._update_layout()
        return out

    def _update_layout(self) -> None:
        """Remember whether the raw weight is channels_last: α·Ŵ (and the folded weight) then follow it, as the
        output of ``nn.Conv2d`` follows a channels_last weight."""
        w = self._parameters.get("weight")
        fmt = None
        if isinstance(w, Tensor) and not isinstance(w, nn.parameter.UninitializedParameter) and w.dim() in (4, 5):
            cl = torch.channels_last if w.dim() == 4 else torch.channels_last_3d
            if w.is_contiguous(memory_format=cl) and not w.is_contiguous():
                fmt = cl
        self._memory_format = fmt

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """A plain torch layer's state_dict (no ``alpha``) loads strictly into its PWS twin: α defaults to 1."""
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,  # type: ignore[misc]
                                      missing_keys, unexpected_keys, error_msgs)
        if prefix + "weight" not in state_dict:
            return
        for key in ("alpha", "alpha_initialized"):
            if prefix + key in missing_keys:
                missing_keys.remove(prefix + key)
                if key == "alpha" and self.alpha is not None:
                    with torch.no_grad():
                        self.alpha.fill_(1.0)
        self._cache = None

    def __prepare_scriptable__(self):  # called by torch.jit.script before it compiles a module
        raise TypeError(
            f"torch.jit.script: {type(self).__name__} (unfolded PWS) is not scriptable; script pwsconv.fold(model) "
            "(plain torch layers), or use torch.export / torch.compile on the unfolded model"
        )

    def _maybe_data_init_alpha(self, x: Tensor) -> None:
        if not (self.data_init_alpha and self.training and self.alpha is not None) or bool(self.alpha_initialized):
            return
        with torch.no_grad():
            y = self._forward_with(x, self._compute_weight(), None)
            var = y.float().var()
            if torch.isfinite(var) and var > 0:
                self.alpha.mul_(torch.sqrt(2.0 / var).to(self.alpha.dtype))
            self.alpha_initialized.fill_(True)

    def forward(self, input: Tensor, *args: Any, **kwargs: Any) -> Tensor:  # the parent's call forms (input=)
        if self.data_init_alpha:
            self._maybe_data_init_alpha(input)
        return self._forward_with(input, _with_format(self.standardized_weight(), self._memory_format), self._bias(),
                                  *args, **kwargs)

    # ------------------------------------------------------------------ folding
    def to_plain(self) -> nn.Module:
        """The parent torch layer holding α·Ŵ and the bias: the same function, with no pwsconv class."""
        plain = torch.nn.utils.skip_init(
            self._plain_cls, **self._plain_kwargs(), device=self.weight.device, dtype=self.weight.dtype
        )
        if self._memory_format is not None:
            plain.to(memory_format=self._memory_format)   # fold keeps the channels_last weight layout
        with torch.no_grad():
            plain.weight.copy_(self._compute_weight())
            if self.bias is not None:
                plain.bias.copy_(self.bias)
        plain.train(self.training)
        return plain

    def extra_repr(self) -> str:  # type: ignore[override]
        s = super().extra_repr()  # type: ignore[misc]
        s += ", gamma='auto'" if self._gamma == "auto" else f", gamma={self._gamma:g}"
        if self._clip is not None:
            s += f", clip={self._clip:g}"
        if self.alpha is None:
            s += ", use_alpha=False"
        if not self.use_gain:
            s += ", use_gain=False"
        if self.fan_mode != "fan_in":
            s += f", fan_mode={self.fan_mode!r}"
        if self.equiv:
            s += ", equiv=True"
        if self.data_init_alpha:
            s += ", data_init_alpha=True"
        return s


def _refuse_complex(layer: Any, dtype: torch.dtype) -> None:
    if dtype.is_complex:
        raise TypeError(f"{type(layer).__name__}: complex dtypes are not supported (dtype={dtype}); "
                        "PWS standardizes real filters: use a real floating dtype")


def _with_format(w: Tensor, fmt: Any) -> Tensor:
    return w if fmt is None else w.contiguous(memory_format=fmt)


def _is_pos_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0


def _check_conv_args(name: str, in_channels: int, out_channels: int, kernel_size: Any, groups: int) -> None:
    for arg, v in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
        if not _is_pos_int(v):
            raise ValueError(f"{name}: {arg} must be a positive int, got {v!r}")
    ks = kernel_size if isinstance(kernel_size, (tuple, list)) else (kernel_size,)
    if len(ks) == 0 or not all(_is_pos_int(k) for k in ks):
        raise ValueError(f"{name}: kernel_size must be positive ints, got {kernel_size!r}")
    if in_channels % groups or out_channels % groups:
        raise ValueError(
            f"{name}: in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by groups ({groups})"
        )


_PWS_DOC = """
    PWS extras (eq. 12): gamma=1e-3, use_alpha=True, use_gain=True, fan_mode="fan_in", equiv=False,
    data_init_alpha=False (see :class:`PWSMixin`).
"""


class _PWSConvNd(PWSMixin):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | str | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: Any = None,
        *,
        gamma: float | str = 1e-3,
        use_alpha: bool = True,
        use_gain: bool = True,
        fan_mode: str = "fan_in",
        equiv: bool = False,
        data_init_alpha: bool = False,
        clip: float | None = None,
    ) -> None:
        _check_conv_args(type(self).__name__, in_channels, out_channels, kernel_size, groups)
        super().__init__(  # type: ignore[call-arg]
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
            groups=groups, bias=bias, padding_mode=padding_mode, device=device, dtype=dtype,
        )
        self._pws_setup(gamma, use_alpha, use_gain, fan_mode, equiv, data_init_alpha, clip)

    def _forward_with(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return self._conv_forward(x, weight, bias)  # type: ignore[attr-defined]

    def forward(self, input: Tensor) -> Tensor:  # the hot path: one Python call less than PWSMixin.forward
        if self.data_init_alpha:
            self._maybe_data_init_alpha(input)
        w = self.standardized_weight()
        if self._memory_format is not None:
            w = w.contiguous(memory_format=self._memory_format)
        return self._conv_forward(input, w, self._bias())  # type: ignore[attr-defined]

    def _plain_kwargs(self) -> dict[str, Any]:
        return dict(
            in_channels=self.in_channels, out_channels=self.out_channels, kernel_size=self.kernel_size,
            stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups,
            bias=self.bias is not None, padding_mode=self.padding_mode,
        )


class PWSConv1d(_PWSConvNd, nn.Conv1d):
    __doc__ = "Drop-in ``nn.Conv1d`` with Parametric Weights Standardization (eq. 12)." + _PWS_DOC
    _plain_cls = nn.Conv1d


class PWSConv2d(_PWSConvNd, nn.Conv2d):
    __doc__ = "Drop-in ``nn.Conv2d`` with Parametric Weights Standardization (eq. 12)." + _PWS_DOC
    _plain_cls = nn.Conv2d


class PWSConv3d(_PWSConvNd, nn.Conv3d):
    __doc__ = "Drop-in ``nn.Conv3d`` with Parametric Weights Standardization (eq. 12)." + _PWS_DOC
    _plain_cls = nn.Conv3d


class _PWSConvTransposeNd(PWSMixin):
    _transposed_layout = True
    _n_spatial: int

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        output_padding: int | Sequence[int] = 0,
        groups: int = 1,
        bias: bool = True,
        dilation: int | Sequence[int] = 1,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: Any = None,
        *,
        gamma: float | str = 1e-3,
        use_alpha: bool = True,
        use_gain: bool = True,
        fan_mode: str = "fan_in",
        equiv: bool = False,
        data_init_alpha: bool = False,
        clip: float | None = None,
    ) -> None:
        _check_conv_args(type(self).__name__, in_channels, out_channels, kernel_size, groups)
        super().__init__(  # type: ignore[call-arg]
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, output_padding=output_padding,
            groups=groups, bias=bias, dilation=dilation, padding_mode=padding_mode, device=device, dtype=dtype,
        )
        self._pws_setup(gamma, use_alpha, use_gain, fan_mode, equiv, data_init_alpha, clip)

    _conv_fn = staticmethod(F.conv_transpose2d)

    def _forward_with(self, x: Tensor, weight: Tensor, bias: Tensor | None, output_size: list[int] | None = None):
        output_padding = self._output_padding(  # type: ignore[attr-defined]
            x, output_size, self.stride, self.padding, self.kernel_size, self._n_spatial, self.dilation
        )
        return type(self)._conv_fn(x, weight, bias, self.stride, self.padding, output_padding, self.groups,
                                   self.dilation)

    def _plain_kwargs(self) -> dict[str, Any]:
        return dict(
            in_channels=self.in_channels, out_channels=self.out_channels, kernel_size=self.kernel_size,
            stride=self.stride, padding=self.padding, output_padding=self.output_padding, groups=self.groups,
            bias=self.bias is not None, dilation=self.dilation, padding_mode=self.padding_mode,
        )


class PWSConvTranspose1d(_PWSConvTransposeNd, nn.ConvTranspose1d):
    __doc__ = "Drop-in ``nn.ConvTranspose1d`` with PWS; a filter is one output channel's slice (eq. 12)." + _PWS_DOC
    _plain_cls = nn.ConvTranspose1d
    _n_spatial = 1
    _conv_fn = staticmethod(F.conv_transpose1d)


class PWSConvTranspose2d(_PWSConvTransposeNd, nn.ConvTranspose2d):
    __doc__ = "Drop-in ``nn.ConvTranspose2d`` with PWS; a filter is one output channel's slice (eq. 12)." + _PWS_DOC
    _plain_cls = nn.ConvTranspose2d
    _n_spatial = 2
    _conv_fn = staticmethod(F.conv_transpose2d)


class PWSConvTranspose3d(_PWSConvTransposeNd, nn.ConvTranspose3d):
    __doc__ = "Drop-in ``nn.ConvTranspose3d`` with PWS; a filter is one output channel's slice (eq. 12)." + _PWS_DOC
    _plain_cls = nn.ConvTranspose3d
    _n_spatial = 3
    _conv_fn = staticmethod(F.conv_transpose3d)


class PWSLinear(PWSMixin, nn.Linear):
    __doc__ = "Drop-in ``nn.Linear`` with PWS; a filter is one output unit's row (eq. 12)." + _PWS_DOC
    _plain_cls = nn.Linear

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        gamma: float | str = 1e-3,
        use_alpha: bool = True,
        use_gain: bool = True,
        fan_mode: str = "fan_in",
        equiv: bool = False,
        data_init_alpha: bool = False,
        clip: float | None = None,
    ) -> None:
        for arg, v in (("in_features", in_features), ("out_features", out_features)):
            if not _is_pos_int(v):
                raise ValueError(f"PWSLinear: {arg} must be a positive int, got {v!r}")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._pws_setup(gamma, use_alpha, use_gain, fan_mode, equiv, data_init_alpha, clip)

    def _forward_with(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    def _plain_kwargs(self) -> dict[str, Any]:
        return dict(in_features=self.in_features, out_features=self.out_features, bias=self.bias is not None)


# ---------------------------------------------------------------------------------------------- fused standardization
def _fused_key(w: Tensor, a: Tensor | None) -> tuple:
    # the tensors, their versions, the grad mode and the thread: a weight made under no_grad is never handed to a
    # layer that runs with gradients enabled (and vice versa), nor one made by another thread's forward
    return (id(w), w._version, -1 if a is None else id(a), -1 if a is None else a._version, torch.is_grad_enabled(),
            threading.get_ident())


def _fusable(m: PWSMixin, w: Tensor | None = None, a: Tensor | None = None) -> bool:
    """Whether the fused node can standardize ``m`` (``w``/``a``: its weight and α when the caller has them)."""
    if w is None:
        w, a = m.weight, m.alpha
    if m._transposed_layout or w.dtype not in _FUSE_DTYPES or w.dim() < 2 or not w.is_contiguous() \
            or w.is_inference():
        return False
    if a is not None and (a.dtype != w.dtype or not a.is_contiguous()):
        return False
    return not (m.data_init_alpha and a is not None and not bool(m.alpha_initialized))


_FUSE_DTYPES = (torch.float32, torch.float64)


class _FuseState:
    """Shared by the two hooks of one fused model: ``recompute``, the cached list of PWS layers and, per thread (a
    model may run forwards in several threads, e.g. ``nn.DataParallel`` replicas that share its hooks), the live
    token, the layers holding a slot and the saved-tensor hooks of the running forward."""

    def __init__(self, recompute: bool = False) -> None:
        self.recompute = recompute
        self.pws_layers: tuple | None = None   # (module-tree generation, weakref to the model, weakrefs to its layers)
        self._local = threading.local()

    token = property(lambda self: getattr(self._local, "token", None),
                     lambda self, v: setattr(self._local, "token", v))
    layers = property(lambda self: getattr(self._local, "layers", None),
                      lambda self, v: setattr(self._local, "layers", v))
    saved_hooks = property(lambda self: getattr(self._local, "saved_hooks", None),
                           lambda self, v: setattr(self._local, "saved_hooks", v))

    def __getstate__(self) -> dict:   # pickling / deepcopy: no per-forward state, no references to these layers
        return {"recompute": self.recompute}

    def __setstate__(self, state: dict) -> None:   # also states pickled before ``recompute`` existed
        self.recompute = state.get("recompute", False)
        self.pws_layers = None
        self._local = threading.local()

    def pws_layer_refs(self, module: nn.Module) -> list[weakref.ref]:
        """The model's PWS layers, walked once and again only after a submodule was registered anywhere (torch's
        global module-registration hook) or when the hook runs for another module (replicas sharing it). A layer
        added behind torch's back (``_modules`` edited directly) is missed until then and computes its own weight,
        which is correct, only not fused; a removed layer is skipped once it is garbage (weak references)."""
        cached = self.pws_layers
        if cached is None or cached[0] != _TREE_GENERATION[0] or cached[1]() is not module:
            cached = self.pws_layers = (_TREE_GENERATION[0], weakref.ref(module),
                                        [weakref.ref(m) for m in module.modules() if isinstance(m, PWSMixin)])
        return cached[2]


#: bumped whenever any nn.Module registers a submodule, so that fused models re-walk their tree
_TREE_GENERATION = [0]


def _bump_tree_generation(module: nn.Module, name: str, submodule: nn.Module | None) -> None:
    _TREE_GENERATION[0] += 1


_TREE_HOOK: list[Any] = []


def _watch_module_tree() -> None:
    if not _TREE_HOOK:
        _TREE_HOOK.append(nn.modules.module.register_module_module_registration_hook(_bump_tree_generation))


class _Recompute:
    """What autograd keeps instead of a layer's α·Ŵ under ``fuse_standardization(..., recompute=True)``: the raw
    weight and α (alive anyway as parameters), their versions and the layer's γ and gain."""

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
    """Saved-tensor hooks active during one fused forward: a PWS layer's α·Ŵ saved by its conv for backward is
    replaced by a :class:`_Recompute` token and rebuilt when backward needs it; every other tensor goes to the
    hooks that were active outside the model, if any, or is kept as usual."""

    def __init__(self, outs: dict[int, tuple[Tensor, _Recompute]]) -> None:
        self.outs = outs
        self.outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, _unpack_saved)

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


class _FusePre:
    """Forward pre-hook: standardize every fusable PWS layer that will need a fresh weight, in one node."""

    def __init__(self, state: _FuseState) -> None:
        self.state = state

    def __call__(self, module: nn.Module, args: Any) -> None:
        if _is_compiling():
            return
        st = self.state
        if st.token is not None:      # re-entered (the model calls itself): the outer forward's slots stay
            return
        grad = torch.is_grad_enabled()
        layers, keys, ws, als, gammas, gains, lams = [], [], [], [], [], [], []
        for ref in st.pws_layer_refs(module):
            m = ref()
            if m is None:
                continue
            params = m._parameters
            w, a = params["weight"], params["alpha"]
            # the same test as m._needs_fresh_weight, inlined: this loop runs on every forward
            if not (m.training or (grad and (w.requires_grad or (a is not None and a.requires_grad)))):
                continue
            if not _fusable(m, w, a):
                continue
            layers.append(m)
            keys.append(_fused_key(w, a))
            ws.append(w)
            als.append(a)
            gammas.append(m.effective_gamma)
            gains.append(m.gain)
            lams.append(m.clip_lambda)
        if not layers:
            return
        # gamma="auto" / clip: the node clips ∂L/∂W per filter and ∂L/∂α per entry in its backward, per group
        outs = pws_weights_fused(ws, als, gammas, gains, lams)
        # β of the clipped layers: one clipping node for all of them, not one per layer
        clipped = [(i, m._parameters.get("bias")) for i, m in enumerate(layers) if lams[i]]
        clipped = [(i, b) for i, b in clipped if b is not None and b.requires_grad and grad]
        bias_out: list = [None] * len(layers)
        if clipped:
            views = unit_clip_many([b for _, b in clipped], [lams[i] for i, _ in clipped])
            for (i, b), v in zip(clipped, views):
                bias_out[i] = (b, v)
        token = [True]
        st.token, st.layers = token, layers
        for m, k, o, bo in zip(layers, keys, outs, bias_out):
            m._fused = (token, k, o, bo)
        if st.recompute and grad:
            hooks = _RecomputeHooks({id(o): (o, _Recompute(w, a, g, gn))
                                     for o, w, a, g, gn in zip(outs, ws, als, gammas, gains)})
            hooks.ctx.__enter__()
            st.saved_hooks = hooks


class _FusePost:
    """Forward hook (always called, also on an exception): every slot made by this forward dies."""

    def __init__(self, state: _FuseState) -> None:
        self.state = state

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        st = self.state
        if st.token is None:
            return
        st.token[0] = False
        for m in st.layers or ():
            m._fused = None
        if st.saved_hooks is not None:
            st.saved_hooks.close()
            st.saved_hooks = None
        st.token = st.layers = None


class _FuseHandle:
    """What :func:`fuse_standardization` returns: ``.remove()`` takes the hooks off again."""

    def __init__(self, model: nn.Module, pre: Any, post: Any, state: _FuseState) -> None:
        self._model, self._pre, self._post, self._state = model, pre, post, state
        self.active = True

    @property
    def recompute(self) -> bool:
        """Whether α·Ŵ is rebuilt in backward instead of kept (see :func:`fuse_standardization`)."""
        return self._state.recompute

    def __setstate__(self, state: dict) -> None:   # handles pickled before ``recompute`` existed
        self.__dict__.update(state)
        if "_state" not in state:
            self._state = _FuseState()

    def remove(self) -> None:
        if not self.active:
            return
        self.active = False
        if getattr(self._model, "_pws_fuse_handle", None) is self:
            del self._model._pws_fuse_handle
        self._pre.remove()
        self._post.remove()
        for m in self._model.modules():
            if isinstance(m, PWSMixin):
                m._fused = None


def fuse_standardization(model: nn.Module, *, recompute: bool = False) -> _FuseHandle:
    """Standardize all PWS layers of ``model`` (eq. 12) in one autograd node per forward instead of one per layer.

    A forward pre-hook on ``model`` computes every PWS layer's α·Ŵ with :func:`pwsconv.functional.pws_weights_fused`
    when the layer would compute it anyway (training, or gradients needed); each layer then uses its result. Values
    are identical to the unfused model and gradients equal up to float rounding (tested); the step is faster when
    the network has many small layers or the batch is small (per-layer dispatch and autograd overhead dominate
    there; see BENCHMARKS.md), and it keeps no weight-sized x̂ for backward.

    ``recompute=True`` also drops the α·Ŵ each conv keeps for its backward and rebuilds it there from the raw weight
    (the same native op, so the same values): one weight-sized tensor less per layer during a step, at the cost of
    one more standardization per layer in backward — the memory of a plain-conv network, for small batches where
    weights outweigh activations. It works through saved-tensor hooks during the model's forward; hooks that are
    active outside the model (``torch.autograd.graph.save_on_cpu``, memory probes) still receive every other
    tensor. It saves memory for convolutions; ``PWSLinear`` keeps its α·Ŵ (``addmm`` saves a transposed view of
    it). A ``KeyboardInterrupt`` inside the forward skips torch's forward hooks, so the saved-tensor hooks stay
    pushed until the model's next forward removes them.

    Safe by construction: a layer uses the pre-computed weight only during the forward of ``model`` that made it,
    only in the same grad mode and only while its ``weight``/``alpha`` are the same tensors at the same version (an
    in-place change makes it recompute its own); layers called outside that forward, transposed / ``equiv`` /
    low-precision layers, α data-init before its first batch, and ``torch.compile`` tracing compute their weight as
    usual; eval mode keeps the cache; unused layers get no gradient. The hooks are picklable (``torch.save(model)``,
    ``copy.deepcopy``). Not supported: double backward (gradient penalties), non-reentrant activation checkpointing
    inside the model and ``torch.func`` transforms — call ``handle.remove()`` (or ``fuse_pws: false``) there.
    The training engine turns this on for every model (``TrainConfig.fuse_pws``, and ``TrainConfig.pws_recompute``
    for ``recompute``). Returns a handle with ``.remove()``; calling it again on the same model returns the same
    handle, with ``recompute`` set as asked.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse_standardization expects an nn.Module, got {type(model).__name__}")
    if not isinstance(recompute, bool):
        raise TypeError(f"fuse_standardization: recompute must be a bool, got {recompute!r}")
    old = getattr(model, "_pws_fuse_handle", None)
    if old is not None and old.active:
        old._state.recompute = recompute
        return old
    _watch_module_tree()
    state = _FuseState(recompute)
    h_pre = model.register_forward_pre_hook(_FusePre(state))
    h_post = model.register_forward_hook(_FusePost(state), always_call=True)
    handle = _FuseHandle(model, h_pre, h_post, state)
    model._pws_fuse_handle = handle
    return handle
