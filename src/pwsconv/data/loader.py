"""In-memory batching of an :class:`~pwsconv.data.ImageSet`: shuffling, the CIFAR augmentation (vectorized),
normalization, resumable order and DDP sharding.

The order and the augmentation of an epoch depend only on ``(seed, epoch)``: every epoch draws from its own
``torch.Generator`` seeded from both, so a run resumed at epoch ``e`` (``set_epoch(e)`` or ``load_state_dict``) sees
exactly the batches of an uninterrupted run, and every DDP process computes the same global permutation and
augmentation parameters and takes its own slice of each global batch.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

from .core import ImageSet

__all__ = ["Loader", "cifar_augment", "cifar_params", "AUGMENTATIONS", "epoch_seed"]

_MASK63 = (1 << 63) - 1


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for epoch ``epoch`` of a loader seeded with ``seed`` (SplitMix64-style mixing)."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + (int(epoch) + 1) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (z ^ (z >> 31)) & _MASK63


def cifar_params(n: int, generator: torch.Generator, pad: int = 4) -> Tensor:
    """Random parameters of the CIFAR augmentation for ``n`` images: int64 ``[n, 3]`` = (dy, dx, flip), with the
    crop offsets dy, dx uniform in ``0..2·pad`` and flip in {0, 1}."""
    p = torch.empty(n, 3, dtype=torch.int64)
    p[:, :2] = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)
    p[:, 2] = torch.randint(0, 2, (n,), generator=generator)
    return p


def cifar_augment(x: Tensor, params: Tensor, pad: int = 4) -> Tensor:
    """The CIFAR augmentation of Lee et al. 2015 / He et al. 2016a on a batch, without a per-image loop.

    Zero-pad every image by ``pad`` pixels (value 0 = black, as torchvision's ``RandomCrop(32, padding=4)``), crop an
    ``H × W`` window at offset ``(dy, dx)`` and mirror it horizontally where ``flip`` is 1; ``params`` is
    ``[N, 3]`` (dy, dx, flip) from :func:`cifar_params`. One gather does crop and flip together.
    """
    n, c, h, w = x.shape
    params = params.to(x.device)
    dy, dx, flip = params[:, 0], params[:, 1], params[:, 2].bool()
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = dy[:, None] + ar_h[None, :]                                            # [N, H]
    cols = dx[:, None] + torch.where(flip[:, None], (w - 1 - ar_w)[None, :], ar_w[None, :])  # [N, W]
    n_idx = torch.arange(n, device=x.device)[:, None, None, None]
    c_idx = torch.arange(c, device=x.device)[None, :, None, None]
    return xp[n_idx, c_idx, rows[:, None, :, None], cols[:, None, None, :]]


AUGMENTATIONS: dict[str, tuple[Callable[[int, torch.Generator], Tensor], Callable[[Tensor, Tensor], Tensor]]] = {
    "cifar": (cifar_params, cifar_augment),
}


class EpochBatches:
    """Batch bookkeeping shared by :class:`Loader` and the streaming loader: the number of batches, this process's
    share of a batch, the epoch, and the (seed, epoch, batch) state that makes a resumed run continue mid-epoch.
    Subclasses set ``seed``, ``epoch``, ``batch_size``, ``drop_last``, ``rank``, ``world_size``, ``_pos`` and
    ``_resume_at`` and define ``num_samples``."""

    seed: int
    epoch: int
    batch_size: int
    drop_last: bool
    rank: int
    world_size: int
    _pos: int
    _resume_at: int

    @property
    def num_samples(self) -> int:  # pragma: no cover - defined by subclasses
        raise NotImplementedError

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def local_batch_size(self) -> int:
        """This process's share of a full global batch."""
        b, w = self.batch_size, self.world_size
        return b // w + (1 if self.rank < b % w else 0)

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` at its first batch on the next iteration."""
        self.epoch = int(epoch)
        self._pos = self._resume_at = 0

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "batch": self._pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        batch = int(state.get("batch", 0))
        if not 0 <= batch <= len(self):
            raise ValueError(f"loader state batch {batch} is outside 0..{len(self)}")
        self.seed = int(state.get("seed", self.seed)) & _MASK63
        self.epoch = int(state["epoch"])
        self._pos = self._resume_at = batch


class Loader(EpochBatches):
    """Batches ``(x, y)`` of an in-memory :class:`ImageSet`: ``x`` float32 ``[B, C, H, W]`` normalized as
    ``(x/255 − mean)/std``, ``y`` int64 ``[B]``, both on ``device``.

    Args:
        images: the images.
        batch_size: the **global** batch size (with ``world_size > 1`` each process gets its share of it).
        shuffle: a new random order every epoch.
        augment: "cifar" (4-pixel zero pad + random crop + random horizontal flip) or None.
        mean, std: per-channel normalization on the 0..1 scale (a float or one per channel); None = 0 / 1.
        drop_last: drop the last incomplete global batch.
        generator: its ``initial_seed()`` is the loader's seed (when ``seed`` is not given); the generator itself is
            not advanced, so the order depends only on (seed, epoch).
        seed: the loader's seed (default: from ``generator``, else 0).
        device: where batches are produced (the uint8 batch is moved first, then augmented and converted there).
            Images that already live on a device (``ImageSet.to``, :func:`pwsconv.data.device.resident`) are
            gathered there: the epoch's order and augmentation parameters are copied to it once per epoch, and a
            batch costs no host round trip.
        channels_last: return ``x`` in channels-last memory format.
        rank, world_size: DDP sharding. Every process computes the same global permutation and augmentation and
            takes ``torch.tensor_split(global_batch, world_size)[rank]``, so concatenating the ranks' batches gives
            the single-process batch exactly (shares differ by at most one image when ``world_size`` does not divide
            the batch; a final batch smaller than ``world_size`` leaves some ranks an empty batch — use
            ``drop_last=True`` for training).

    Each ``iter(loader)`` runs the current epoch from its first batch; a completed pass advances the epoch counter
    (an abandoned one does not), and ``set_epoch(e)`` sets it explicitly (as with a ``DistributedSampler``).
    ``state_dict()`` records (seed, epoch, batches already delivered this epoch); after ``load_state_dict`` the next
    iteration continues from that batch, so a run resumed from mid-epoch gets the same remaining batches.
    """

    def __init__(self, images: ImageSet, batch_size: int, *, shuffle: bool, augment: str | None = None,
                 mean: float | Sequence[float] | None = None, std: float | Sequence[float] | None = None,
                 drop_last: bool = False, generator: torch.Generator | None = None, seed: int | None = None,
                 device: str | torch.device = "cpu", channels_last: bool = False, rank: int = 0,
                 world_size: int = 1) -> None:
        if not isinstance(images, ImageSet):
            raise TypeError(f"Loader needs an ImageSet, got {type(images).__name__}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(world_size, int) or world_size < 1 or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
        if augment is not None and augment not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {augment!r}; choose one of {list(AUGMENTATIONS)} or None")
        self.images = images
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.augment = augment
        self.drop_last = bool(drop_last)
        if seed is None:
            seed = generator.initial_seed() if generator is not None else 0
        self.seed = int(seed) & _MASK63
        self.device = torch.device(device)
        self.channels_last = bool(channels_last)
        self.rank, self.world_size = rank, world_size
        c = images.x.shape[1]
        m = torch.zeros(c, dtype=torch.float64) if mean is None else _per_channel(mean, c, "mean")
        s = torch.ones(c, dtype=torch.float64) if std is None else _per_channel(std, c, "std")
        if (s <= 0).any():
            raise ValueError(f"std must be positive, got {s.tolist()}")
        # x_float = x_uint8 · scale + shift  ==  (x/255 − mean)/std
        self._scale = (1.0 / (255.0 * s)).to(torch.float32).view(1, c, 1, 1).to(self.device)
        self._shift = (-m / s).to(torch.float32).view(1, c, 1, 1).to(self.device)
        self.epoch = 0
        self._pos = 0          # batches of the current epoch delivered so far
        self._resume_at = 0    # where the next iteration starts (set by load_state_dict only)

    @property
    def num_samples(self) -> int:
        return len(self.images)

    # ------------------------------------------------------------------ the epoch's randomness
    def epoch_plan(self, epoch: int | None = None) -> tuple[Tensor, Tensor | None]:
        """``(order, aug_params)`` of an epoch: the permutation of image indices and the augmentation parameters of
        each position in that order (None without augmentation). Identical on every rank."""
        epoch = self.epoch if epoch is None else epoch
        n = len(self.images)
        g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        params = AUGMENTATIONS[self.augment][0](n, g) if self.augment else None
        return order, params

    def batch_indices(self, i: int, epoch: int | None = None) -> Tensor:
        """Image indices of this rank's share of global batch ``i``."""
        order, _ = self.epoch_plan(epoch)
        return self._shard(order[i * self.batch_size:(i + 1) * self.batch_size])

    def _shard(self, t: Tensor) -> Tensor:
        if self.world_size == 1:
            return t
        return torch.tensor_split(t, self.world_size)[self.rank]

    # ------------------------------------------------------------------ iteration
    def _make_batch(self, idx: Tensor, params: Tensor | None) -> tuple[Tensor, Tensor]:
        x, y = self.images.x, self.images.y
        xb = x[idx.to(x.device)].to(self.device, non_blocking=True)
        yb = y[idx.to(y.device)].to(self.device, non_blocking=True)
        if params is not None:   # (a copy that does not wait for the device, like the images')
            xb = AUGMENTATIONS[self.augment][1](xb, params.to(xb.device, non_blocking=True))  # type: ignore[index]
        out = torch.addcmul(self._shift, xb.to(torch.float32), self._scale)
        if self.channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        return out, yb

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order, params = self.epoch_plan()
        if self.images.x.device.type != "cpu":   # device-resident images: the epoch's plan goes there once
            order = order.to(self.images.x.device)
            params = params.to(self.images.x.device) if params is not None else None
        start, self._resume_at = self._resume_at, 0
        self._pos = start
        for i in range(start, len(self)):
            sl = slice(i * self.batch_size, min((i + 1) * self.batch_size, len(order)))
            idx = self._shard(order[sl])
            p = self._shard(params[sl]) if params is not None else None
            self._pos = i + 1
            yield self._make_batch(idx, p)
        self.epoch += 1
        self._pos = 0

    def __repr__(self) -> str:
        return (f"Loader(n={len(self.images)}, batch_size={self.batch_size}, batches={len(self)}, "
                f"shuffle={self.shuffle}, augment={self.augment!r}, seed={self.seed}, epoch={self.epoch}, "
                f"rank={self.rank}/{self.world_size}, device={self.device})")


def _per_channel(v: float | Sequence[float], c: int, what: str) -> Tensor:
    t = torch.as_tensor(v, dtype=torch.float64).flatten()
    if t.numel() == 1:
        t = t.expand(c).clone()
    if t.numel() != c:
        raise ValueError(f"{what} has {t.numel()} values for {c} channels")
    return t
