"""pwsconv — Parametric Weights Standardization (PWS, Liu et al., AAAI 2021) for training CNNs without BatchNorm.

Eq. 12:  Ŵ_o = sqrt(2/n_l) · (W_o − E[W_o]) / sqrt(Var[W_o] + γ),   Y_o = α_o · (X ⊛ Ŵ_o) + β_o

    >>> import torch, pwsconv
    >>> conv = pwsconv.PWSConv2d(3, 16, 3, padding=1)            # drop-in nn.Conv2d
    >>> net = pwsconv.convert(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)))
    >>> plain = pwsconv.fold(net.eval())                         # plain nn.Conv2d, same outputs
    >>> # model = pwsconv.load("runs/train")   # a trained / folded model back, with model.preprocess
"""

import sys as _sys
import types as _types
from typing import TYPE_CHECKING, Any

# The public names are imported on first use (PEP 562), so that ``import pwsconv`` — and the ``pwsconv`` command,
# whose module lives in this package — does not import torch before the command has started: a Ctrl-C while torch
# loads is then the command's one-line "interrupted" (exit 130), and ``pwsconv --version`` is instant.
_LAZY = {
    "pws_weight": ".functional",
    "fold": ".folding", "is_norm_layer": ".optim", "param_groups": ".optim", "link_optimizer": ".optim",
    **{name: ".layers.pws" for name in ("PWSConv1d", "PWSConv2d", "PWSConv3d", "PWSConvTranspose1d",
                                        "PWSConvTranspose2d", "PWSConvTranspose3d", "PWSLinear", "PWSMixin")},
    "fuse_standardization": ".accel", "cached": ".accel", "clear_cache": ".accel",
    **{name: ".layers.lazy" for name in ("LazyPWSConv1d", "LazyPWSConv2d", "LazyPWSConv3d")},
    "Conv2dSame": ".layers.same", "PWSConv2dSame": ".layers.same",
    **{name: ".methods" for name in ("Method", "available_methods", "build_conv", "build_linear", "build_norm",
                                     "get_method", "register_method")},
    "load": ".train.loading",
}

if TYPE_CHECKING:  # what static tools see: the eager imports
    from . import functional
    from .accel import cached, clear_cache, fuse_standardization
    from .convert import convert
    from .folding import fold
    from .functional import pws_weight
    from .layers.lazy import LazyPWSConv1d, LazyPWSConv2d, LazyPWSConv3d
    from .layers.pws import (PWSConv1d, PWSConv2d, PWSConv3d, PWSConvTranspose1d, PWSConvTranspose2d,
                             PWSConvTranspose3d, PWSLinear, PWSMixin)
    from .layers.same import Conv2dSame, PWSConv2dSame
    from .methods import Method, available_methods, build_conv, build_linear, build_norm, get_method, register_method
    from .optim import is_norm_layer, link_optimizer, param_groups
    from .train.loading import load


def __getattr__(name: str) -> Any:
    import importlib
    import importlib.util

    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    elif not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)   # a subpackage: pwsconv.layers, pwsconv.methods, ...
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(_types.ModuleType):
    """``pwsconv.convert`` is the function even after the submodule ``pwsconv.convert`` is imported (the import
    system binds a submodule as an attribute of its package; eager imports used to rebind the name afterwards)."""

    @property
    def convert(self) -> Any:
        from .convert import convert

        return convert

    @convert.setter
    def convert(self, value: Any) -> None:   # the import system recording the submodule: sys.modules has it
        pass


_sys.modules[__name__].__class__ = _Package


__version__ = "0.1.0"

__all__ = [
    "functional",
    "pws_weight",
    "PWSConv1d",
    "PWSConv2d",
    "PWSConv3d",
    "PWSConvTranspose1d",
    "PWSConvTranspose2d",
    "PWSConvTranspose3d",
    "PWSLinear",
    "PWSMixin",
    "PWSConv2dSame",
    "Conv2dSame",
    "LazyPWSConv1d",
    "LazyPWSConv2d",
    "LazyPWSConv3d",
    "fuse_standardization",
    "cached",
    "clear_cache",
    "convert",
    "fold",
    "load",
    "param_groups",
    "link_optimizer",
    "is_norm_layer",
    "Method",
    "available_methods",
    "get_method",
    "register_method",
    "build_conv",
    "build_norm",
    "build_linear",
    "__version__",
]
