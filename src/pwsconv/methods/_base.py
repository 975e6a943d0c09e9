"""What a normalization method is (:class:`Method`), its typed errors, and the pieces the method files share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Mapping

from torch import Tensor, nn

from ._options import Option, OptionValueError

__all__ = ["Method", "MethodError", "UnknownMethodError", "MethodOptionError", "plain_conv", "gn_groups",
           "CONV_CLASSES", "by_dim", "FoldStats", "Option", "EPS", "MOMENTUM"]

#: what :attr:`Method.fold_norm` returns: (mean, var, eps, weight, bias) of an eval-mode per-channel norm
FoldStats = tuple[Tensor, Tensor, float, Tensor | None, Tensor | None]

CONV_CLASSES: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class MethodError(ValueError):
    """A method name or option that the registry cannot use."""


class UnknownMethodError(MethodError):
    """No method of that name is registered."""


class MethodOptionError(MethodError):
    """An option the method does not declare, or a value of the wrong type or range for it."""


class _OptionNames(frozenset):
    """The names of a method's options (a frozenset of str) that keeps their declarations (``specs``)."""

    specs: dict[str, Option]

    def __new__(cls, options: list[Option]) -> "_OptionNames":
        names = super().__new__(cls, (o.name for o in options))
        names.specs = {o.name: o for o in options}
        return names

    def __reduce__(self) -> tuple:   # copy, deepcopy, pickle: rebuilt from the declarations
        return _OptionNames, (list(self.specs.values()),)


@dataclass(frozen=True)
class Method:
    """One normalization method: how to build the conv of a conv+norm unit and the output norm after it.

    Attributes:
        name: registry key ("pws", "bn", ...).
        summary: what it normalizes, one line (the table of ``docs/methods.md``).
        conv: ``conv(dim, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, **conv_options)`` → the conv of a unit (``dim`` = 1, 2 or 3).
        norm: ``norm(num_channels, dim, **norm_options)`` → the output norm after the conv, or ``None`` (Identity).
        conv_bias: whether the conv of a unit carries a bias (False when the output norm has its own shift).
        linear: optional ``linear(in_features, out_features, bias, **conv_options)`` for classifier heads.
        transposed: optional factory for transposed convs (the ``conv`` arguments plus ``output_padding``).
        lazy: optional ``lazy(dim, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            **conv_options)`` → a conv that takes its input channels from the first batch (what
            :func:`pwsconv.convert` makes of an uninitialized ``nn.LazyConv*d``).
        conv_options / norm_options: the options the method takes, and the factory each one goes to: each an
            :class:`~pwsconv.methods.Option` (name, type, range; the one declaration every entry point validates
            against) or a bare name (any value, left to the factory to check). Read back as frozensets of names;
            :attr:`option_specs` holds the declarations.
        check_together: optional ``check_together(options)`` raising ``ValueError`` for a combination of valid
            values that the method cannot take (MABN: real_batch_size a multiple of batch_size).
        keeps_batchnorm: :func:`pwsconv.convert` leaves a model's BatchNorm layers as they are (the method's output
            norm is BatchNorm itself: statistics, affine and timm's BN+activation layers are kept).
        ln_io: the paper's ImageNet setting for this method: the ImageNet ResNet gets LayerNorm after its stem and
            before its global pooling (``ln_io=None`` of :func:`pwsconv.models.resnet.imagenet_resnet`; PWS, Table 5).
        spatial_stats: the output norm's statistics are per sample and channel over the spatial positions (undefined on
            a 1×1 map: the SSD backbone leaves its last norm, after a 1×1 map, as it is).
        fold_norm: optional ``fold_norm(layer)`` → how a layer of this method's output norm folds into the conv
            before it at inference: its eval statistics ``(mean, var, eps, weight, bias)`` (the layer computes
            ``(x − mean) / sqrt(var + eps) · weight + bias``), or ``None`` when ``layer`` is not such a norm or
            cannot fold now (training mode, no running statistics). :func:`pwsconv.fold` merges it into that conv.
        prepare: optional ``prepare(model, fuse=..., recompute=...)`` the training engine calls before training
            (PWS: :func:`pwsconv.fuse_standardization`).
        batch_dependent / foldable / extra_params / reference: documentation (``foldable``: :func:`pwsconv.fold`
            turns a model of this method into plain torch layers).
    """

    name: str
    summary: str
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module] | None = None
    conv_bias: bool = True
    linear: Callable[..., nn.Module] | None = None
    transposed: Callable[..., nn.Module] | None = None
    lazy: Callable[..., nn.Module] | None = None
    conv_options: Collection[str | Option] = field(default_factory=frozenset)
    norm_options: Collection[str | Option] = field(default_factory=frozenset)
    check_together: Callable[[Mapping[str, Any]], None] | None = None
    keeps_batchnorm: bool = False
    fold_norm: Callable[[nn.Module], FoldStats | None] | None = None
    ln_io: bool = False
    spatial_stats: bool = False
    prepare: Callable[..., Any] | None = None
    batch_dependent: bool = False
    foldable: bool = True
    extra_params: str = ""
    reference: str = ""
    option_specs: dict[str, Option] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        specs: dict[str, Option] = {}
        parts: dict[str, list[Option]] = {"conv": [], "norm": []}
        for part, given in (("conv", self.conv_options), ("norm", self.norm_options)):
            for o in ([given] if isinstance(given, (str, Option)) else given):
                if isinstance(o, str):   # a bare name, or the name of a declaration kept through dataclasses.replace
                    o = given.specs[o] if isinstance(given, _OptionNames) else Option(o)
                if o.name in specs:
                    raise MethodError(f"method {self.name!r} declares option {o.name!r} twice")
                specs[o.name] = o
                parts[part].append(o)
        object.__setattr__(self, "conv_options", _OptionNames(parts["conv"]))
        object.__setattr__(self, "norm_options", _OptionNames(parts["norm"]))
        object.__setattr__(self, "option_specs", specs)

    @property
    def options(self) -> frozenset[str]:
        """Every option the method takes."""
        return self.conv_options | self.norm_options

    def check_options(self, opts: Mapping[str, Any], *, prefix: str | None = None) -> dict[str, Any]:
        """``opts`` validated against the declarations (names, types, ranges, :attr:`check_together`); a
        :class:`MethodOptionError` otherwise, naming the option as ``prefix + name`` (default: ``"method 'pws':
        gamma"``). Returns the options (a whole float as an int where the option is an integer)."""
        unknown = set(opts) - self.options
        if unknown:
            raise MethodOptionError(f"method {self.name!r} takes no option(s) {sorted(unknown)}; it accepts "
                                    f"{sorted(self.options) or 'none'}")
        pre = f"method {self.name!r}: " if prefix is None else prefix
        try:
            out = {k: self.option_specs[k].check(v, pre + k) for k, v in opts.items()}
            if self.check_together is not None:
                self.check_together(out)
        except OptionValueError as e:
            raise MethodOptionError(str(e)) from None
        except ValueError as e:
            raise MethodOptionError(f"{pre.rstrip(': .')}: {e}" if pre else str(e)) from None
        return out

    def split_options(self, opts: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(conv options, norm options) of ``opts``, validated (:meth:`check_options`)."""
        opts = self.check_options(opts)
        return ({k: v for k, v in opts.items() if k in self.conv_options},
                {k: v for k, v in opts.items() if k in self.norm_options})


#: the ``eps`` and ``momentum`` of torch's norm layers, as the norm methods declare them
EPS = Option("eps", float, low=0, doc="ε added to the variance")
MOMENTUM = Option("momentum", float | None, low=0, high=1, doc="running statistics' momentum (None: cumulative)")


def plain_conv(dim: int, in_channels: int, out_channels: int, kernel_size: Any, **kw: Any) -> nn.Module:
    """A torch conv with He (kaiming normal, fan_in, ReLU) weights and zero bias, as the paper initializes."""
    conv = CONV_CLASSES[dim](in_channels, out_channels, kernel_size, **kw)
    nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def by_dim(classes: dict[int, type[nn.Module]]) -> Callable[..., nn.Module]:
    """A conv factory ``(dim, *args, **kw) → classes[dim](*args, **kw)``."""
    def make(dim: int, *args: Any, **kw: Any) -> nn.Module:
        return classes[dim](*args, **kw)

    return make


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
