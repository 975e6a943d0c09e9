"""Models from outside the zoo, by name: ``torchvision:resnet18``, ``timm:resnet26d`` or ``my_package.my_module:build``
(any callable returning an ``nn.Module``).

    >>> net = build_model("torchvision:resnet18", "pws", num_classes=10, in_channels=1)   # via pwsconv.models

The model is built with random weights (never downloaded), ``num_classes`` and the input channels set from the data
set, then converted to the method with :func:`pwsconv.convert` like the zoo models are built with it:

* ``timm:NAME``: ``timm.create_model(NAME, pretrained=False, num_classes=..., in_chans=..., **model_opts)``.
* ``torchvision:NAME``: ``torchvision.models.get_model(NAME, weights=None, num_classes=..., **model_opts)``; torchvision
  has no input-channel argument, so the first conv is replaced by one with ``in_channels`` inputs.
* ``module.path:attr``: ``attr`` (dotted attributes allowed) is called with ``num_classes`` and ``in_chans`` /
  ``in_channels`` where its signature takes them (or ``**kwargs``); otherwise the first conv and the last
  ``nn.Linear`` are replaced to fit the data set.

:func:`check` validates a name without building anything (the CLI calls it before any work starts): an unknown
module, attribute or architecture, or a missing torchvision/timm, is one ``ValueError`` line.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import inspect
import math
import os
import sys
from typing import Any, Callable

from torch import nn

__all__ = ["is_external", "check", "build_external", "EXTRA_HINT"]

EXTRA_HINT = ("install the torchvision release built for your torch (torch 2.14.1: pip install torchvision==0.29.1) "
              "and timm; a bare 'pip install torchvision' may replace your torch")


def is_external(name: Any) -> bool:
    """Whether ``name`` names a model outside the zoo (``source:name``)."""
    return isinstance(name, str) and ":" in name


def _split(name: str) -> tuple[str, str]:
    src, _, attr = name.partition(":")
    if not src or not attr:
        raise ValueError(f"model {name!r}: expected 'torchvision:NAME', 'timm:NAME' or 'module.path:callable'")
    return src, attr


def _import(module: str, name: str, *, extra: bool = False):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if extra:
            raise ValueError(f"model {name!r} needs {module.split('.')[0]}, which is not installed: {EXTRA_HINT}") from None
        top, cwd = module.split(".")[0], os.getcwd()
        if isinstance(e, ModuleNotFoundError) and e.name == top and cwd not in sys.path and (
                os.path.isfile(os.path.join(cwd, top + ".py")) or os.path.isdir(os.path.join(cwd, top))):
            # a module of the current directory, as `python -m pwsconv` would find it (the console script's path
            # does not hold the current directory); sys.path is restored at once
            sys.path.insert(0, cwd)
            try:
                return importlib.import_module(module)
            except ImportError as e2:
                e = e2
            finally:
                sys.path.remove(cwd)
        raise ValueError(f"model {name!r}: cannot import module {module!r} ({e}; a module of your own must be "
                         f"importable: on PYTHONPATH, or in the current directory)") from None


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _resolve(name: str) -> tuple[str, Callable[..., nn.Module]]:
    """(kind, builder) of an external model name; ``ValueError`` with one line when it does not exist."""
    src, attr = _split(name)
    if src == "torchvision":
        tvm = _import("torchvision.models", name, extra=True)
        names = list(tvm.list_models())
        if attr not in names:
            raise ValueError(f"model {name!r}: torchvision has no model {attr!r}{_suggest(attr, names)}")
        return "torchvision", tvm.get_model_builder(attr)
    if src == "timm":
        timm = _import("timm", name, extra=True)
        if not timm.is_model(attr):
            raise ValueError(f"model {name!r}: timm has no model {attr!r}"
                             f"{_suggest(attr, list(timm.list_models()))}")
        return "timm", lambda **kw: timm.create_model(attr, pretrained=False, **kw)
    mod = _import(src, name)
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"model {name!r}: module {src!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"model {name!r}: {attr!r} is not callable (a function or class returning an nn.Module)")
    return "callable", obj


def check(name: str) -> None:
    """Validate an external model name (``ValueError``, one line, when it cannot be built)."""
    _resolve(name)


def _accepts(fn: Callable[..., Any], arg: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return arg in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _named_params(fn: Callable[..., Any]) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def _first_conv(model: nn.Module) -> tuple[str, nn.Module] | None:
    return next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)), None)


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def adapt_in_channels(model: nn.Module, in_channels: int, name: str) -> nn.Module:
    """Replace the first conv by a copy taking ``in_channels`` inputs (same class and hyper-parameters; the weight
    is initialized anew as torch initializes convs)."""
    first = _first_conv(model)
    if first is None:
        raise ValueError(f"model {name!r}: no conv layer whose input channels could be set to {in_channels}")
    n, conv = first
    if conv.in_channels == in_channels:
        return model
    if conv.groups != 1 or getattr(conv, "transposed", False):
        raise ValueError(f"model {name!r}: the first conv {n!r} is grouped or transposed; cannot set its input "
                         f"channels to {in_channels}")
    new = copy.deepcopy(conv)   # same class and settings (a timm Conv2dSame stays one)
    new.in_channels = in_channels
    shape = (conv.out_channels, in_channels) + tuple(conv.weight.shape[2:])
    new.weight = nn.Parameter(conv.weight.new_empty(shape))
    nn.init.kaiming_uniform_(new.weight, a=math.sqrt(5))
    _set(model, n, new)
    return model


def _adapt_classes(model: nn.Module, num_classes: int, name: str) -> nn.Module:
    last = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ValueError(f"model {name!r}: its callable takes no num_classes and it has no nn.Linear head to set "
                         f"to {num_classes} classes")
    n, lin = last[-1]
    if lin.out_features != num_classes:
        _set(model, n, nn.Linear(lin.in_features, num_classes, bias=lin.bias is not None,
                                 device=lin.weight.device, dtype=lin.weight.dtype))
    return model


def build_external(name: str, method: Any = "pws", *, num_classes: int = 10, in_channels: int = 3,
                   model_opts: dict[str, Any] | None = None, method_opts: dict[str, Any] | None = None,
                   **convert_opts: Any) -> nn.Module:
    """Build the external model ``name`` for ``num_classes`` classes and ``in_channels`` inputs, converted to
    ``method`` (a name, or a :class:`~pwsconv.models.common.MethodSpec`) with :func:`pwsconv.convert`."""
    from ..convert import convert
    from .common import MethodSpec

    kind, builder = _resolve(name)
    kw = dict(model_opts or {})
    if kind == "timm":
        model = builder(num_classes=num_classes, in_chans=in_channels, **kw)
    elif kind == "torchvision":
        model = builder(weights=None, num_classes=num_classes, **kw)
        model = adapt_in_channels(model, in_channels, name)
    else:
        named = _named_params(builder)
        takes_classes = _accepts(builder, "num_classes")
        if takes_classes:
            kw.setdefault("num_classes", num_classes)
        chan_arg = next((a for a in ("in_chans", "in_channels") if a in named), None)
        if chan_arg is not None:
            kw.setdefault(chan_arg, in_channels)
        model = builder(**kw)
        if not isinstance(model, nn.Module):
            raise ValueError(f"model {name!r}: the callable returned {type(model).__name__}, not an nn.Module")
        if chan_arg is None:
            model = adapt_in_channels(model, in_channels, name)
        if not takes_classes:
            model = _adapt_classes(model, num_classes, name)
    spec = method if isinstance(method, MethodSpec) else MethodSpec(method, dict(method_opts or {}))
    if not spec.method.keeps_batchnorm:   # BatchNorm is what these models are built with
        model = convert(model, spec.name, inplace=True, **convert_opts, **dict(spec.opts))
    return model.train()
