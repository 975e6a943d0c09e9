"""The name → normalization-method registry.

A method says how to build the conv of a conv+norm unit and the output normalization that follows it. Models,
:func:`pwsconv.convert` and the experiments select methods by name only::

    conv = build_conv("pws", 2, 64, 128, 3, padding=1)      # PWSConv2d
    norm = build_norm("pws", 128, dim=2)                      # nn.Identity (PWS normalizes the filters, not outputs)

Adding a method is one :func:`register_method` call (usually at the bottom of the file that defines its layers).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from .layers.pws import (
    PWSConv1d,
    PWSConv2d,
    PWSConv3d,
    PWSConvTranspose1d,
    PWSConvTranspose2d,
    PWSConvTranspose3d,
    PWSLinear,
)

__all__ = [
    "NormMethod",
    "register_method",
    "get_method",
    "available_methods",
    "build_conv",
    "build_norm",
    "build_linear",
    "gn_groups",
    "plain_conv",
    "CONV_CLASSES",
]

CONV_CLASSES: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONVT_CLASSES: dict[int, type[nn.Module]] = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_BN_CLASSES: dict[int, type[nn.Module]] = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_IN_CLASSES: dict[int, type[nn.Module]] = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}

ConvFactory = Callable[..., nn.Module]
NormFactory = Callable[..., nn.Module]


@dataclass(frozen=True)
class NormMethod:
    """One normalization method of the zoo.

    Attributes:
        name: registry key ("pws", "bn", ...).
        summary: what it normalizes, one line.
        conv: ``conv(dim, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, **opts)`` → the conv of a unit (``dim`` = 1, 2 or 3).
        norm: ``norm(num_channels, dim, **opts)`` → the output normalization after the conv, or ``None`` for Identity.
        conv_bias: whether the conv of a unit carries a bias (False when the output norm has its own shift).
        linear: optional factory ``linear(in_features, out_features, bias, **opts)`` for classifier heads.
        transposed: optional factory for transposed convs, same arguments as ``conv`` plus ``output_padding``.
        batch_dependent / foldable / extra_params / reference: documentation used by the README table.
        options: names of the keyword options the factories accept (validated by :func:`build_conv`).
    """

    name: str
    summary: str
    conv: ConvFactory
    norm: NormFactory | None = None
    conv_bias: bool = True
    linear: Callable[..., nn.Module] | None = None
    transposed: ConvFactory | None = None
    batch_dependent: bool = False
    foldable: bool = True
    extra_params: str = ""
    reference: str = ""
    options: frozenset[str] = field(default_factory=frozenset)


_REGISTRY: dict[str, NormMethod] = {}


def register_method(method: NormMethod, *, overwrite: bool = False) -> NormMethod:
    """Add a method to the registry (``overwrite=True`` to replace one)."""
    if method.name in _REGISTRY and not overwrite:
        raise ValueError(f"normalization method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def available_methods() -> list[str]:
    """Registered method names, in registration order."""
    _load_builtin_methods()
    return list(_REGISTRY)


def get_method(name: str | NormMethod) -> NormMethod:
    """Look a method up by name; unknown names raise ``ValueError`` listing the known ones."""
    if isinstance(name, NormMethod):
        return name
    _load_builtin_methods()
    key = name if name in _REGISTRY else str(name).lower()  # exact name first: register_method keeps the case
    if key not in _REGISTRY:
        raise ValueError(f"unknown normalization method {name!r}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[key]


def _split_opts(method: NormMethod, opts: dict[str, Any]) -> dict[str, Any]:
    unknown = set(opts) - method.options
    if unknown:
        raise ValueError(
            f"method {method.name!r} takes no option(s) {sorted(unknown)}; it accepts {sorted(method.options) or 'none'}"
        )
    return opts


def _opts_for(factory: Any, opts: dict[str, Any]) -> dict[str, Any]:
    """The subset of the method options that ``factory`` takes: none for plain torch convs, all for a factory with
    ``**kwargs``, else those named in its signature."""
    if not opts or factory is None or factory is plain_conv:
        return {}
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return dict(opts)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return dict(opts)
    names = {p.name for p in params}
    return {k: v for k, v in opts.items() if k in names}


def build_conv(
    method: str | NormMethod,
    dim: int,
    in_channels: int,
    out_channels: int,
    kernel_size: Any,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
    bias: bool | None = None,
    padding_mode: str = "zeros",
    **opts: Any,
) -> nn.Module:
    """The conv of a conv+norm unit for ``method``; ``bias=None`` takes the method's default."""
    m = get_method(method)
    if dim not in CONV_CLASSES:
        raise ValueError(f"dim must be 1, 2 or 3, got {dim!r}")
    return m.conv(
        dim, in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
        groups=groups, bias=m.conv_bias if bias is None else bias, padding_mode=padding_mode,
        **_opts_for(m.conv, _split_opts(m, opts)),
    )


def build_norm(method: str | NormMethod, num_channels: int, dim: int = 2, **opts: Any) -> nn.Module:
    """The output normalization that follows a conv with ``num_channels`` outputs (Identity if the method has none)."""
    m = get_method(method)
    if m.norm is None:
        return nn.Identity()
    return m.norm(num_channels, dim, **_opts_for(m.norm, _split_opts(m, opts)))


def build_linear(method: str | NormMethod, in_features: int, out_features: int, bias: bool = True,
                 **opts: Any) -> nn.Module:
    """A linear layer for ``method`` (the method's weight reparameterization if it has one, else nn.Linear)."""
    m = get_method(method)
    if m.linear is None:
        return nn.Linear(in_features, out_features, bias=bias)
    return m.linear(in_features, out_features, bias, **_opts_for(m.linear, _split_opts(m, opts)))


# ---------------------------------------------------------------------------------------------- built-in methods
def plain_conv(dim: int, in_channels: int, out_channels: int, kernel_size: Any, **kw: Any) -> nn.Module:
    """A torch conv with He (kaiming normal, fan_in, ReLU) weights and zero bias, as the paper initializes."""
    conv = CONV_CLASSES[dim](in_channels, out_channels, kernel_size, **kw)
    nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def gn_groups(num_channels: int, groups: int = 32) -> int:
    """Groups for GroupNorm: the largest divisor of ``num_channels`` that is ≤ ``groups`` (32, Wu & He 2018).

    With fewer channels than ``groups`` every channel is its own group (GN = IN with a shared affine); with a count
    not divisible by 32 (e.g. 48) the largest divisor below 32 (24) is used.
    """
    if num_channels <= 0 or groups <= 0:
        raise ValueError(f"num_channels and groups must be positive, got {num_channels}, {groups}")
    g = min(groups, num_channels)
    while num_channels % g:
        g -= 1
    return g


_PWS_OPTS = frozenset({"gamma", "use_alpha", "use_gain", "fan_mode", "equiv", "data_init_alpha", "clip"})
_PWS_CONV = {1: PWSConv1d, 2: PWSConv2d, 3: PWSConv3d}
_PWS_CONVT = {1: PWSConvTranspose1d, 2: PWSConvTranspose2d, 3: PWSConvTranspose3d}


def _pws_conv(dim: int, *args: Any, **kw: Any) -> nn.Module:
    return _PWS_CONV[dim](*args, **kw)


def _pws_convt(dim: int, *args: Any, **kw: Any) -> nn.Module:
    return _PWS_CONVT[dim](*args, **kw)


def _bn(c: int, dim: int, **kw: Any) -> nn.Module:
    return _BN_CLASSES[dim](c, **kw)


def _gn(c: int, dim: int, groups: int = 32, **kw: Any) -> nn.Module:
    return nn.GroupNorm(gn_groups(c, groups), c, **kw)


def _in(c: int, dim: int, **kw: Any) -> nn.Module:
    return _IN_CLASSES[dim](c, affine=True, **kw)


def _ln(c: int, dim: int, **kw: Any) -> nn.Module:
    return nn.GroupNorm(1, c, **kw)


# Modules whose import registers more methods (one line per zoo file).
_ZOO_MODULES: tuple[str, ...] = ("pwsconv.zoo",)

_ZOO_LOADED = False


def _load_builtin_methods() -> None:
    """Import the zoo modules once; each registers its method(s) with :func:`register_method` on import."""
    global _ZOO_LOADED
    if _ZOO_LOADED:
        return
    _ZOO_LOADED = True
    import importlib

    for mod in _ZOO_MODULES:
        importlib.import_module(mod)


def _register_builtins() -> None:
    for m in (
        NormMethod("none", "nothing: plain conv with bias, He init", plain_conv, None, True,
                   batch_dependent=False, foldable=True, extra_params="—", reference="He et al. 2015 (init)"),
        NormMethod("bn", "outputs, per channel over (N, H, W)", plain_conv, _bn, False, batch_dependent=True,
                   foldable=True, extra_params="γ, β per channel; running mean/var", reference="Ioffe & Szegedy 2015",
                   options=frozenset({"eps", "momentum"})),
        NormMethod("gn", "outputs, per sample over groups of channels × (H, W)", plain_conv, _gn, False,
                   foldable=False, extra_params="γ, β per channel", reference="Wu & He 2018",
                   options=frozenset({"groups", "eps"})),
        NormMethod("in", "outputs, per sample and channel over (H, W)", plain_conv, _in, False, foldable=False,
                   extra_params="γ, β per channel", reference="Ulyanov et al. 2016", options=frozenset({"eps"})),
        NormMethod("ln", "outputs, per sample over (C, H, W) (GroupNorm with one group)", plain_conv, _ln, False,
                   foldable=False, extra_params="γ, β per channel", reference="Ba et al. 2016",
                   options=frozenset({"eps"})),
        NormMethod("pws", "filters: per-filter standardization × sqrt(2/n_l) × α (eq. 12)", _pws_conv, None, True,
                   linear=lambda i, o, b, **kw: PWSLinear(i, o, bias=b, **kw), transposed=_pws_convt,
                   foldable=True, extra_params="α per filter", reference="Liu et al. 2021 (this paper)",
                   options=_PWS_OPTS),
    ):
        register_method(m)


_register_builtins()
