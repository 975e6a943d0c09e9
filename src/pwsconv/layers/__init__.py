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

# The rest of the normalization zoo (registered by name in :mod:`pwsconv.methods`).
from .mabn import CenConv1d, CenConv2d, CenConv3d, MABN1d, MABN2d, MABN3d  # noqa: E402
from .switchable import SwitchNorm1d, SwitchNorm2d, SwitchNorm3d, sn_batch_average  # noqa: E402
from .wn import WNConv1d, WNConv2d, WNConv3d, WNLinear  # noqa: E402
from .ws import SWSConv1d, SWSConv2d, SWSConv3d, SWSLinear, WSConv1d, WSConv2d, WSConv3d  # noqa: E402

__all__ += [
    "CenConv1d", "CenConv2d", "CenConv3d", "MABN1d", "MABN2d", "MABN3d",
    "SwitchNorm1d", "SwitchNorm2d", "SwitchNorm3d", "sn_batch_average",
    "WNConv1d", "WNConv2d", "WNConv3d", "WNLinear",
    "WSConv1d", "WSConv2d", "WSConv3d", "SWSConv1d", "SWSConv2d", "SWSConv3d", "SWSLinear",
]
