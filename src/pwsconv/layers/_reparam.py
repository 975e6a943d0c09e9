"""One base for every weight-reparameterized layer of pwsconv: PWS (eq. 12), WN, WS, scaled WS and CenConv.

A reparameterized layer subclasses a torch layer (``nn.Conv1d/2d/3d``, ``nn.ConvTranspose*d`` or ``nn.Linear``),
keeps its constructor and its ``weight`` / ``bias`` state_dict keys, and says what it computes:
``compute_weight()`` (the weight it convolves with, from the raw ``weight`` and its own parameters, named in
``weight_params``) and ``compute_bias()``; its forward applies them with the parent's conv / linear. One hook lets
acceleration installed from outside serve the same values faster (``_weight_source``, set by
:mod:`pwsconv.accel`: the fused forward and the scoped eval cache); nothing here knows what it is. ``to_plain()``
returns the parent torch layer holding the computed weight (what :func:`pwsconv.fold` uses). The raw weights get the
paper's He init (kaiming normal, ReLU), biases 0.
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional import _LOW_PRECISION as LOW_PRECISION   # one definition (functional.py)
from ..functional import he_std

__all__ = ["FilterTooSmallError", "ReparamMixin", "ReparamLinear", "filter_dims", "setting", "LOW_PRECISION"]


class FilterTooSmallError(ValueError):
    """A filter has too few weights for the reparameterization (standardizing a single weight gives 0)."""


def filter_dims(weight: Tensor) -> tuple[int, ...]:
    """The dims that make one filter of a conv/linear weight (all but the output dim 0)."""
    return tuple(range(1, weight.dim()))


def setting(field: str, convert: Callable[[Any], Any], doc: str,
            then: Callable[[Any], None] | None = None) -> property:
    """A layer setting stored in ``field``: assignment converts/validates the value, bumps the layer's
    ``_settings_version`` (what a cache of the computed weight keys on) and calls ``then(layer)`` if given."""
    def set_(self: Any, value: Any) -> None:
        d = self.__dict__
        d[field] = convert(value)
        d["_settings_version"] = d.get("_settings_version", 0) + 1
        if then is not None:
            then(self)

    return property(lambda self: self.__dict__[field], set_, doc=doc)


class ReparamMixin:
    """Base of the reparameterized layers; a concrete layer implements :meth:`compute_weight` (and may override
    :meth:`compute_bias`, ``_reset_extra`` and ``_maybe_data_init``)."""

    weight: Tensor
    bias: Tensor | None
    _plain_cls: type[nn.Module]
    #: the parameters ``compute_weight`` reads (one or two): the raw weight first (the eval cache is keyed on them)
    weight_params: tuple[str, ...] = ("weight",)
    _transposed_layout = False     # filters along dim 1 (ConvTranspose) instead of dim 0
    _data_init = False             # a data-dependent init runs on the first training forward
    _memory_format: Any = None     # torch.channels_last(_3d) when the raw weight has that layout
    _ready = False
    _settings_version = 0          # bumped by every assignment of a setting
    #: ``(layer) -> (weight, bias) | None``: values computed elsewhere (installed per instance by pwsconv.accel)
    _weight_source: Callable[[Any], "tuple[Tensor, Tensor | None] | None"] | None = None

    # ------------------------------------------------------------------ what the concrete layer computes
    def compute_weight(self) -> Tensor:  # pragma: no cover - abstract
        """The weight the layer applies, differentiable w.r.t. its parameters (no cache, no fusion)."""
        raise NotImplementedError

    def compute_bias(self) -> Tensor | None:
        """The bias the layer applies (the raw ``bias`` unless the layer changes it)."""
        p = self._parameters   # type: ignore[attr-defined]
        return p["bias"] if "bias" in p else self.bias   # (parametrized: through the property)

    def _reset_extra(self) -> None:
        """Reset the layer's own parameters (gains, α, ...) after the raw weights were re-initialized."""

    def _maybe_data_init(self, x: Tensor) -> None:
        """The data-dependent init, on the first training forward (layers with ``_data_init``)."""

    # ------------------------------------------------------------------ the forward
    def weight_and_bias(self) -> tuple[Tensor, Tensor | None]:
        """The weight and bias this forward applies: ``compute_weight()`` and ``compute_bias()``, unless an installed
        ``_weight_source`` serves them (the same values)."""
        source = self._weight_source
        if source is not None:
            hit = source(self)
            if hit is not None:
                return hit
        return self.compute_weight(), self.compute_bias()

    def reparam_weight(self) -> Tensor:
        """The weight the layer applies in this forward (:meth:`weight_and_bias`)."""
        return self.weight_and_bias()[0]

    def forward(self, input: Tensor, *args: Any, **kwargs: Any) -> Tensor:   # the parent's call forms (input=)
        if self._data_init:
            self._maybe_data_init(input)
        w, b = self.weight_and_bias()
        if self._memory_format is not None:
            w = w.contiguous(memory_format=self._memory_format)
        return self._forward_with(input, w, b, *args, **kwargs)

    def _forward_with(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The parent's computation with this weight and bias: ``nn.ConvNd``'s conv (padding modes included);
        ``ReparamLinear`` and the transposed PWS convs override it."""
        return self._conv_forward(x, weight, bias)  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ geometry and init
    def _finish_setup(self) -> None:
        if self.weight.dtype.is_complex:
            raise TypeError(f"{type(self).__name__}: complex dtypes are not supported (dtype={self.weight.dtype}); "
                            "standardize real filters: use a real floating dtype")
        self._update_layout()
        self._ready = True
        self.reset_parameters()

    def _raw_weight(self) -> Tensor:
        """The ``weight`` parameter (through the property when ``nn.utils.parametrize`` has taken it over)."""
        p = self._parameters   # type: ignore[attr-defined]
        return p["weight"] if "weight" in p else self.weight

    @property
    def filter_size(self) -> int:
        """n_l: the number of weights in one filter (in_channels/groups × kernel elements; in_features for linear)."""
        w = self._raw_weight()
        if not self._transposed_layout:
            return w.numel() // w.shape[0]
        return (w.shape[0] // self.groups) * math.prod(w.shape[2:])   # type: ignore[attr-defined]

    @property
    def fan(self) -> int:
        """The n of the He init (and of PWS's sqrt(2/n)): ``filter_size``."""
        return self.filter_size

    def _require_filter_of(self, n_min: int, what: str) -> None:
        if self.filter_size < n_min:
            raise FilterTooSmallError(
                f"{type(self).__name__}: a filter has {self.filter_size} element(s); {what} "
                f"(needs in_channels/groups × kernel elements ≥ {n_min}; leave such layers as plain layers)"
            )

    def reset_parameters(self) -> None:
        if not self._ready:
            return  # called by the torch parent's __init__ before the subclass attributes exist
        with torch.no_grad():
            self.weight.normal_(0.0, he_std(self.fan))  # He init (the paper's "Experiments")
            if self.bias is not None:
                self.bias.zero_()
        self._reset_extra()

    def _update_layout(self) -> None:
        """Remember whether the raw weight is channels_last: the computed (and the folded) weight then follow it, as
        the output of ``nn.Conv2d`` follows a channels_last weight."""
        w = self._parameters.get("weight")   # type: ignore[attr-defined]
        fmt = None
        if isinstance(w, Tensor) and not isinstance(w, nn.parameter.UninitializedParameter) and w.dim() in (4, 5):
            cl = torch.channels_last if w.dim() == 4 else torch.channels_last_3d
            if w.is_contiguous(memory_format=cl) and not w.is_contiguous():
                fmt = cl
        self._memory_format = fmt

    def _apply(self, fn, *args, **kwargs):  # .to(), .half(), .cuda(): the new tensors' dtype and layout
        out = super()._apply(fn, *args, **kwargs)  # type: ignore[misc]
        if self._ready and self._raw_weight().dtype.is_complex:
            raise TypeError(f"{type(self).__name__}: complex dtypes are not supported; use a real floating dtype")
        self._update_layout()
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """A plain torch layer's state_dict (``weight``, ``bias``) loads strictly into its twin: the layer's own
        parameters and buffers (α, g, gain, data-init flags) missing from it take their initial values."""
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,  # type: ignore[misc]
                                      missing_keys, unexpected_keys, error_msgs)
        if prefix + "weight" not in state_dict:
            return
        params = {prefix + n for n, p in self._parameters.items() if n not in ("weight", "bias") and p is not None}
        own = params | {prefix + n for n in self._buffers}  # type: ignore[attr-defined]
        missing = [k for k in missing_keys if k in own]
        for k in missing:
            missing_keys.remove(k)
        if params and params <= set(missing):   # none of the layer's own parameters given: all at their init
            self._reset_extra()

    def _settings_key(self) -> Any:
        """What the eval cache keys on besides the parameters it reads (a setting's assignment changes it)."""
        return self._settings_version

    def __getstate__(self) -> dict:  # pickling / deepcopy: an installed weight source is not part of the layer
        state = super().__getstate__()  # type: ignore[misc]
        state.pop("_weight_source", None)
        return state

    def __prepare_scriptable__(self):  # called by torch.jit.script before it compiles a module
        raise TypeError(
            f"torch.jit.script: {type(self).__name__} (unfolded {self._plain_cls.__name__} reparameterization) is not "
            "scriptable; script pwsconv.fold(model) (plain torch layers), or use torch.export / torch.compile"
        )

    # ------------------------------------------------------------------ folding
    def to_plain(self) -> nn.Module:
        """The parent torch layer holding the computed weight and bias: the same function, no pwsconv class."""
        plain = torch.nn.utils.skip_init(self._plain_cls, **self._plain_kwargs(), device=self.weight.device,
                                         dtype=self.weight.dtype)
        if self._memory_format is not None:
            plain.to(memory_format=self._memory_format)   # fold keeps the channels_last weight layout
        with torch.no_grad():
            plain.weight.copy_(self.compute_weight())
            if self.bias is not None:
                plain.bias.copy_(self.bias)
        plain.train(self.training)  # type: ignore[attr-defined]
        return plain

    def _plain_kwargs(self) -> dict[str, Any]:
        """The parent's constructor arguments: those of its signature, read from this layer's attributes."""
        names = [n for n in inspect.signature(self._plain_cls.__init__).parameters
                 if n not in ("self", "device", "dtype")]
        kw = {n: getattr(self, n) for n in names if n != "bias"}
        kw["bias"] = self.bias is not None
        return kw


class ReparamLinear(ReparamMixin):
    """Mixin for ``nn.Linear`` subclasses."""

    def _forward_with(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)


def _is_pos_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0


def check_layer_args(name: str, args: dict[str, Any]) -> None:
    """One-line ``ValueError`` for channel/feature counts, groups or kernel sizes that are not positive ints, or
    channels not divisible by groups (before torch allocates anything)."""
    for arg in ("in_channels", "out_channels", "groups", "in_features", "out_features"):
        if arg in args and not _is_pos_int(args[arg]):
            raise ValueError(f"{name}: {arg} must be a positive int, got {args[arg]!r}")
    if "kernel_size" in args:
        k = args["kernel_size"]
        ks = k if isinstance(k, (tuple, list)) else (k,)
        if len(ks) == 0 or not all(_is_pos_int(v) for v in ks):
            raise ValueError(f"{name}: kernel_size must be positive ints, got {k!r}")
    g = args.get("groups", 1)
    if "in_channels" in args and (args["in_channels"] % g or args["out_channels"] % g):
        raise ValueError(f"{name}: in_channels ({args['in_channels']}) and out_channels ({args['out_channels']}) "
                         f"must be divisible by groups ({g})")
