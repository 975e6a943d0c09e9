"""Layers: the PWS family (:mod:`.pws`) and the other normalization methods of the zoo, one concept per file."""

from .pws import (
    FAN_MODES,
    PWSConv1d,
    PWSConv2d,
    PWSConv3d,
    PWSConvTranspose1d,
    PWSConvTranspose2d,
    PWSConvTranspose3d,
    PWSLinear,
    PWSMixin,
)

__all__ = [
    "FAN_MODES",
    "PWSConv1d",
    "PWSConv2d",
    "PWSConv3d",
    "PWSConvTranspose1d",
    "PWSConvTranspose2d",
    "PWSConvTranspose3d",
    "PWSLinear",
    "PWSMixin",
]
