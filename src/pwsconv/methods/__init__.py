"""The one name → normalization-method registry.

A method (:class:`Method`) says how to build the conv of a conv+norm unit and the output normalization after it, and
declares its options and which of the two each one goes to. Models, :func:`pwsconv.convert`, the engine and the
experiments select methods by name only::

    conv = build_conv("pws", 2, 64, 128, 3, padding=1)      # PWSConv2d
    norm = build_norm("pws", 128, dim=2)                      # nn.Identity (PWS normalizes the filters, not outputs)

Adding a method is one file in this package defining ``METHOD = Method(...)`` and its name in ``_BUILTIN`` below
(or :func:`register_method` from outside the package).
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any

from torch import nn

from ._base import (CONV_CLASSES, FoldStats, Method, MethodError, MethodOptionError, UnknownMethodError, gn_groups,
                    plain_conv)
from ._options import Option

__all__ = ["Method", "Option", "MethodError", "UnknownMethodError", "MethodOptionError", "register_method",
           "get_method", "available_methods", "build_conv", "build_norm", "build_linear", "prepare_for_training",
           "norm_fold_stats", "methods_table", "options_table", "gn_groups", "plain_conv", "CONV_CLASSES"]

#: the built-in methods, one module each, in the order of the docs' table
_BUILTIN = ("none", "bn", "gn", "instance", "ln", "pws", "sn", "wn", "ws", "sws", "mabn")

_REGISTRY: dict[str, Method] = {}


def register_method(method: Method, *, overwrite: bool = False) -> Method:
    """Add a method to the registry (``overwrite=True`` to replace one)."""
    if not isinstance(method, Method):
        raise TypeError(f"register_method expects a pwsconv.methods.Method, got {type(method).__name__}")
    if method.name in _REGISTRY and not overwrite:
        raise MethodError(f"normalization method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


for _name in _BUILTIN:
    register_method(importlib.import_module(f".{_name}", __name__).METHOD)


def available_methods() -> list[str]:
    """Registered method names, in registration order."""
    return list(_REGISTRY)


def get_method(name: str | Method) -> Method:
    """Look a method up by name; an unknown name raises :class:`UnknownMethodError` listing the known ones."""
    if isinstance(name, Method):
        return name
    key = name if name in _REGISTRY else str(name).lower()  # exact name first: register_method keeps the case
    if key not in _REGISTRY:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownMethodError(f"unknown normalization method {name!r}{hint}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[key]


def build_conv(method: str | Method, dim: int, in_channels: int, out_channels: int, kernel_size: Any,
               stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1, bias: bool | None = None,
               padding_mode: str = "zeros", **opts: Any) -> nn.Module:
    """The conv of a conv+norm unit for ``method``; ``bias=None`` takes the method's default. ``opts``: any of the
    method's options (those of its norm are ignored here)."""
    m = get_method(method)
    if dim not in CONV_CLASSES:
        raise ValueError(f"dim must be 1, 2 or 3, got {dim!r}")
    return m.conv(dim, in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                  groups=groups, bias=m.conv_bias if bias is None else bias, padding_mode=padding_mode,
                  **m.split_options(opts)[0])


def build_norm(method: str | Method, num_channels: int, dim: int = 2, **opts: Any) -> nn.Module:
    """The output normalization after a conv with ``num_channels`` outputs (Identity if the method has none)."""
    m = get_method(method)
    norm_opts = m.split_options(opts)[1]
    return nn.Identity() if m.norm is None else m.norm(num_channels, dim, **norm_opts)


def build_linear(method: str | Method, in_features: int, out_features: int, bias: bool = True,
                 **opts: Any) -> nn.Module:
    """A linear layer for ``method`` (the method's weight reparameterization if it has one, else nn.Linear)."""
    m = get_method(method)
    conv_opts = m.split_options(opts)[0]
    if m.linear is None:
        return nn.Linear(in_features, out_features, bias=bias)
    return m.linear(in_features, out_features, bias, **conv_opts)


def prepare_for_training(model: nn.Module, method: str | Method | None = None, *, fuse: bool = True,
                         recompute: bool = False) -> None:
    """What ``method`` does to a model before training (PWS: all PWS layers standardized in one autograd node,
    :func:`pwsconv.fuse_standardization`; same values and gradients); nothing for most methods. ``method=None``: a
    network of unknown method gets every method's preparation (each touches only its own layers)."""
    for m in (_REGISTRY.values() if method is None else (get_method(method),)):
        if m.prepare is not None:
            m.prepare(model, fuse=fuse, recompute=recompute)


def norm_fold_stats(layer: nn.Module) -> FoldStats | None:
    """How ``layer`` folds into the conv before it, as the method whose output norm it is declares
    (:attr:`Method.fold_norm`); ``None`` when no registered method's norm folds it (now)."""
    for m in _REGISTRY.values():
        if m.fold_norm is not None:
            stats = m.fold_norm(layer)
            if stats is not None:
                return stats
    return None


def methods_table() -> str:
    """The registry as a Markdown table: name, what it normalizes, batch dependence, foldability, extra parameters,
    reference (the table of ``docs/methods.md``)."""
    rows = ["| method | what it normalizes | depends on the batch? | foldable into the conv at inference? "
            "| extra parameters | reference |", "|---|---|---|---|---|---|"]
    for m in _REGISTRY.values():
        cells = [f"`{m.name}`", m.summary, "yes" if m.batch_dependent else "no", "yes" if m.foldable else "no",
                 m.extra_params or "—", m.reference or "—"]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"


def options_table() -> str:
    """Every method's declared options as a Markdown table: method, option, the factory it goes to, the values it
    takes, what it is (the options table of ``docs/methods.md``)."""
    rows = ["| method | option | goes to | values | what it is |", "|---|---|---|---|---|"]
    for m in _REGISTRY.values():
        for name, o in m.option_specs.items():
            cells = [f"`{m.name}`", f"`{name}`", "conv" if name in m.conv_options else "norm", o.describe(),
                     o.doc or "—"]
            rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"
