"""Containers of the data package: :class:`ImageSet` and :class:`DataError`, and the array checks the readers share
(a :class:`~pwsconv.data.DatasetBundle`, which makes loaders, is in :mod:`pwsconv.data.bundle`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["DataError", "ImageSet", "channel_stats", "stratified_split"]


class DataError(ValueError):
    """Missing, truncated or malformed data. The message is one line naming the file and what is wrong."""

    def __init__(self, message: str = "") -> None:
        super().__init__(" ".join(str(message).split()))


@dataclass
class ImageSet:
    """Images held in memory: ``x`` uint8 ``[N, C, H, W]`` and ``y`` int64 ``[N]`` (class indices)."""

    x: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.x, Tensor) or self.x.dtype != torch.uint8 or self.x.dim() != 4:
            raise DataError(f"ImageSet.x must be a uint8 tensor [N, C, H, W], got "
                            f"{getattr(self.x, 'dtype', type(self.x))} {tuple(getattr(self.x, 'shape', ()))}")
        if not isinstance(self.y, Tensor) or self.y.dtype != torch.int64 or self.y.dim() != 1:
            raise DataError(f"ImageSet.y must be an int64 tensor [N], got "
                            f"{getattr(self.y, 'dtype', type(self.y))} {tuple(getattr(self.y, 'shape', ()))}")
        if len(self.x) != len(self.y):
            raise DataError(f"ImageSet: {len(self.x)} images but {len(self.y)} labels")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape)

    def subset(self, index: Tensor | Sequence[int] | slice) -> "ImageSet":
        """The images at ``index`` (a copy for index tensors, a view for slices)."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long)
        return ImageSet(self.x[index], self.y[index])

    def to(self, device: torch.device | str) -> "ImageSet":
        """The same images on ``device`` (e.g. keep a whole small data set on the GPU)."""
        return ImageSet(self.x.to(device), self.y.to(device))

    def class_counts(self, num_classes: int | None = None) -> Tensor:
        return torch.bincount(self.y.cpu(), minlength=num_classes or 0)


def channel_stats(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std (population) of uint8 images ``[N, C, H, W]`` on the 0..1 scale.

    Uses a 256-bin histogram per channel: exact and light on memory even for all of CIFAR-10.
    """
    means, stds = [], []
    values = torch.arange(256, dtype=torch.float64) / 255.0
    for c in range(x.shape[1]):
        hist = torch.bincount(x[:, c].reshape(-1).cpu(), minlength=256).to(torch.float64)
        n = hist.sum()
        if n == 0:
            means.append(0.0)
            stds.append(1.0)
            continue
        m = float((hist * values).sum() / n)
        v = float((hist * (values - m) ** 2).sum() / n)
        means.append(m)
        stds.append(max(v, 1e-12) ** 0.5)
    return tuple(means), tuple(stds)


def stratified_split(y: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices ``(keep, held_out)``: ``round(fraction × n_c)`` examples of each class c held out, chosen by a
    ``torch.Generator`` seeded with ``seed`` (reproducible, independent of the global RNG). Both index tensors are
    sorted, so the kept examples stay in their original order."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"split fraction must be in [0, 1), got {fraction!r}")
    g = torch.Generator().manual_seed(int(seed))
    y = y.cpu()
    held: list[Tensor] = []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c, as_tuple=False).flatten()
        k = int(round(fraction * len(idx)))
        if k:
            held.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    out = torch.sort(torch.cat(held)).values if held else torch.zeros(0, dtype=torch.long)
    mask = torch.ones(len(y), dtype=torch.bool)
    mask[out] = False
    return torch.nonzero(mask, as_tuple=False).flatten(), out


def to_nchw(arr: np.ndarray, what: str) -> Tensor:
    """uint8 images ``[N, H, W]`` or ``[N, H, W, C]`` (C ≤ 4) → a contiguous uint8 tensor ``[N, C, H, W]``."""
    if not isinstance(arr, np.ndarray):
        raise DataError(f"{what}: images are a {type(arr).__name__}, not an array")
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.integer) and arr.size and (arr.min() < 0 or arr.max() > 255):
            raise DataError(f"{what}: images must be uint8 0..255, got {arr.dtype} with values "
                            f"{arr.min()}..{arr.max()}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise DataError(f"{what}: images must be uint8, got dtype {arr.dtype}")
        arr = arr.astype(np.uint8)
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4 and 1 <= arr.shape[-1] <= 4:
        arr = arr.transpose(0, 3, 1, 2)
    else:
        raise DataError(f"{what}: images must be [N, H, W] or [N, H, W, C] with C ≤ 4, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[2] == 0 or arr.shape[3] == 0:
        raise DataError(f"{what}: no images (shape {arr.shape})")
    return torch.from_numpy(np.ascontiguousarray(arr))


def to_labels(arr: Any, what: str, n: int | None = None, num_classes: int | None = None) -> Tensor:
    """Integer labels ``[N]`` → an int64 tensor, checked for length ``n`` and range ``0..num_classes-1``."""
    arr = np.asarray(arr)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise DataError(f"{what}: labels must be a 1-D array, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise DataError(f"{what}: labels must be integers, got dtype {arr.dtype}")
    if n is not None and len(arr) != n:
        raise DataError(f"{what}: {len(arr)} labels for {n} images")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or (num_classes is not None and hi >= num_classes):
            rng = f"0..{num_classes - 1}" if num_classes is not None else "≥ 0"
            raise DataError(f"{what}: labels out of range {rng} (found {lo}..{hi})")
    return torch.from_numpy(arr.astype(np.int64))
