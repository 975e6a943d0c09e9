"""pwsconv — Parametric Weights Standardization (PWS, Liu et al., AAAI 2021) for training CNNs without BatchNorm.

Eq. 12:  Ŵ_o = sqrt(2/n_l) · (W_o − E[W_o]) / sqrt(Var[W_o] + γ),   Y_o = α_o · (X ⊛ Ŵ_o) + β_o

    >>> import torch, pwsconv
    >>> conv = pwsconv.PWSConv2d(3, 16, 3, padding=1)            # drop-in nn.Conv2d
    >>> net = pwsconv.convert(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)))
    >>> plain = pwsconv.fold(net.eval())                         # plain nn.Conv2d, same outputs
    >>> # model = pwsconv.load("runs/train")   # a trained / folded model back, with model.preprocess
"""

from . import functional
from .convert import convert
from .folding import fold
from .optim import is_norm_layer, param_groups
from .functional import pws_weight
from .layers.pws import (
    PWSConv1d,
    PWSConv2d,
    PWSConv3d,
    PWSConvTranspose1d,
    PWSConvTranspose2d,
    PWSConvTranspose3d,
    PWSLinear,
    PWSMixin,
    fuse_standardization,
)
from .layers.lazy import LazyPWSConv1d, LazyPWSConv2d, LazyPWSConv3d
from .layers.same import Conv2dSame, PWSConv2dSame
from .methods import Method, available_methods, build_conv, build_linear, build_norm, get_method, register_method
from .train.loading import load

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
    "convert",
    "fold",
    "load",
    "param_groups",
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
