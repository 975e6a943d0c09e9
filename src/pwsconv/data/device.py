"""Device-resident data: a data set that fits in accelerator memory is held there, so that batches are gathered,
augmented (the CIFAR crop + flip are batched tensor ops) and normalized on the device without a host round trip.

    bundle, on_device = resident(bundle, torch.device("cuda"), setting=None)   # None: auto (cuda, fits)

The randomness does not move: a :class:`~pwsconv.data.Loader` still draws each epoch's order and augmentation
parameters from a CPU generator seeded by (seed, epoch) and copies them to the device once per epoch, so a run gives
the same batches wherever its images live (the gather and the integer crop/flip are exact).
"""

from __future__ import annotations

import dataclasses

import torch

from .bundle import DatasetBundle
from .core import ImageSet

__all__ = ["resident", "resident_bytes", "fits_on_device", "MAX_DEVICE_FRACTION"]

#: the largest share of the device's free memory the images of a data set may take to be placed there automatically
MAX_DEVICE_FRACTION = 0.25


def resident_bytes(bundle: DatasetBundle) -> int:
    """Bytes of the images and labels of every split of ``bundle``."""
    return sum(s.x.numel() * s.x.element_size() + s.y.numel() * s.y.element_size() for s in bundle.splits().values())


def fits_on_device(nbytes: int, device: torch.device, fraction: float = MAX_DEVICE_FRACTION) -> bool:
    """Whether ``nbytes`` take at most ``fraction`` of the free memory of the CUDA ``device`` (False elsewhere)."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= fraction * free


def resident(bundle: DatasetBundle, device: torch.device, setting: bool | None = None) -> tuple[DatasetBundle, bool]:
    """``bundle`` with every split moved to ``device`` when ``setting`` is True, or when it is None (auto) and the
    device is a GPU whose free memory holds the data set easily (:func:`fits_on_device`); else ``bundle`` unchanged.
    Returns ``(bundle, on_device)``. On the CPU the images already live where they are used (``on_device`` True
    only if asked for)."""
    device = torch.device(device)
    on = bool(setting) if setting is not None else fits_on_device(resident_bytes(bundle), device)
    if not on or device.type == "cpu":
        return bundle, on

    def move(s: ImageSet | None) -> ImageSet | None:
        return None if s is None else s.to(device)

    return dataclasses.replace(bundle, train=move(bundle.train), val=move(bundle.val), test=move(bundle.test)), True
