"""Streaming image folders (ImageNet): images decoded in worker processes, never all held in memory.

    from pwsconv.data.streaming import StreamingLoader, scan_image_folder
    train = StreamingLoader(scan_image_folder("ILSVRC/train"), 256, train=True, num_workers=8, seed=0)
    for x, y in train: ...        # x float32 [B, 3, 224, 224] normalized, y int64 [B]

The layout is torchvision's ``ImageFolder`` one (``root/train/<wnid>/*.JPEG``, ``root/val/<wnid>/*.JPEG``: the
ILSVRC-2012 train/val layout after the usual ``valprep.sh``); classes are the sorted directory names. Files are read
and decoded with Pillow (libjpeg-turbo; CMYK/greyscale JPEGs become RGB) and transformed with
``torchvision.transforms.v2`` in the ``DataLoader``'s worker processes: the ResNet-50 augmentation of He et al.
(``RandomResizedCrop(224)`` + horizontal flip) for training, ``Resize(256)`` + ``CenterCrop(224)`` for evaluation.
The uint8 batches are normalized (ImageNet mean/std) on the training device.

Like the in-memory :class:`pwsconv.data.Loader`, the order **and the augmentation** of an epoch depend only on
``(seed, epoch)``: every global batch's indices come from a permutation seeded by both, and every image's random crop
and flip from a seed derived from ``(seed, epoch, position)`` — not from the worker that happens to decode it. So the
batches do not depend on ``num_workers``, every torchrun process takes its slice of the same global batch
(``tensor_split``, concatenating the ranks' batches gives the single-process batch), and a run resumed mid-epoch
(``load_state_dict({"epoch": e, "batch": i})``) gets exactly the remaining batches of an uninterrupted run.

The engine uses this pipeline for ``dataset: imagenet`` (``data_root`` = the directory holding ``train/`` and ``val/``;
``num_workers`` = decoding processes per training process). ``images_per_s`` of the last pass is kept in
:attr:`StreamingLoader.images_per_s`; :func:`loader_throughput` measures the pipeline alone.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from .core import DataError
from .loader import _MASK63, EpochBatches, epoch_seed

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "STREAMING_DATASETS", "FolderIndex", "scan_image_folder",
           "StreamingLoader", "SeededBatchLoader", "imagenet_transform", "loader_throughput", "build_streaming", "StreamingBundle"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: data set names the engine streams instead of loading into memory
STREAMING_DATASETS = ("imagenet",)
_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _need_torchvision() -> Any:
    try:
        import torchvision  # noqa: F401
        from torchvision.transforms import v2
    except ImportError:
        raise DataError("the streaming image-folder pipeline (dataset 'imagenet') needs torchvision: "
                        "pip install torch==2.14.1 -e '.[detection]' (torchvision 0.29.1 needs exactly torch 2.14.1)"
                        ) from None
    return v2


@dataclass
class FolderIndex:
    """The files of one split: ``samples`` = [(path, label)], ``classes`` = sorted class names."""

    root: str
    classes: list[str]
    samples: list[tuple[str, int]] = field(repr=False)

    def __len__(self) -> int:
        return len(self.samples)


def scan_image_folder(root: str | os.PathLike, classes: Sequence[str] | None = None) -> FolderIndex:
    """Index ``root/<class>/<image>`` (torchvision's ``ImageFolder`` rules: sorted class directories, files with an
    image extension, sorted). ``classes``: use these class names (e.g. the training split's) so labels agree."""
    _need_torchvision()
    from torchvision.datasets.folder import find_classes, make_dataset

    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DataError(f"{root}: image folder not found")
    found, _ = find_classes(root)
    if classes is None:
        classes = found
    else:
        classes = list(classes)
        missing = sorted(set(found) - set(classes))
        if missing:
            raise DataError(f"{root}: class directories {missing[:5]} are not in the training classes")
    to_idx = {c: i for i, c in enumerate(classes)}
    try:
        samples = make_dataset(root, {c: to_idx[c] for c in found}, extensions=_EXTENSIONS)
    except FileNotFoundError as e:
        raise DataError(f"{root}: {' '.join(str(e).split())}") from None
    if not samples:
        raise DataError(f"{root}: no images found")
    return FolderIndex(root, list(classes), [(str(p), int(y)) for p, y in samples])


def imagenet_transform(train: bool, size: int = 224, resize: int = 256) -> Any:
    """The ResNet-50 pipeline, Pillow image → uint8 CHW tensor: train = RandomResizedCrop(size) + RandomHorizontalFlip;
    eval = Resize(resize) + CenterCrop(size) (torchvision.transforms.v2, antialiased)."""
    v2 = _need_torchvision()
    if train:
        return v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(), v2.PILToTensor()])
    return v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(size), v2.PILToTensor()])


def _decode(path: str) -> Any:
    """The RGB Pillow image of a file (Pillow: JPEG via libjpeg-turbo, CMYK and grey JPEGs converted to RGB)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"{path}: cannot decode image ({type(e).__name__}: {' '.join(str(e).split())})") from None


class _Decoded(torch.utils.data.Dataset):
    """Item ``(index, seed)`` → (transformed uint8 image, label); the transform's randomness comes from ``seed``."""

    def __init__(self, samples: list[tuple[str, int]], transform: Any) -> None:
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int]:
        idx, seed = key
        path, label = self.samples[idx]
        img = _decode(path)
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)          # v2 transforms draw from torch's global RNG (of this worker)
        try:
            out = self.transform(img)
        finally:
            torch.random.set_rng_state(state)
        return out, label


def _collate(items: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.int64)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)   # decoding processes each use one core; the training process keeps its threads


class SeededBatchLoader(EpochBatches):
    """Global batches of a map-style ``dataset`` whose items are keyed ``(index, seed)``, loaded by ``num_workers``
    processes: the order and every item's seed depend only on ``(seed, epoch)``; each of ``world_size`` processes
    takes its ``tensor_split`` share of every global batch; ``state_dict``/``load_state_dict`` resume mid-epoch.
    Subclasses turn a collated batch into what they yield (:meth:`finish`). The image-folder
    :class:`StreamingLoader` and the detection loader (``pwsconv.detection.data``) are both this loader.
    """

    def __init__(self, dataset: Any, batch_size: int, *, shuffle: bool, drop_last: bool, num_workers: int = 4,
                 seed: int = 0, rank: int = 0, world_size: int = 1, collate_fn: Any = None, pin_memory: bool = False,
                 prefetch_factor: int = 4) -> None:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int ≥ 0, got {num_workers!r}")
        if not isinstance(world_size, int) or world_size < 1 or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.seed = int(seed) & _MASK63
        self.rank, self.world_size = rank, world_size
        self.collate_fn = collate_fn
        self.pin_memory = pin_memory
        self.epoch, self._pos, self._resume_at = 0, 0, 0
        self.images_per_s = float("nan")   # of the last (partial) pass, this process's items

    # sizes and the resumable (seed, epoch, batch) state: EpochBatches, as for the in-memory Loader
    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    # ------------------------------------------------------------------ the epoch's plan
    def epoch_plan(self, epoch: int | None = None) -> tuple[Tensor, Tensor]:
        """(order, per-position item seeds) of an epoch; identical on every rank and for any ``num_workers``."""
        epoch = self.epoch if epoch is None else epoch
        n = len(self.dataset)
        g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        seeds = torch.randint(0, 2**62, (n,), generator=g, dtype=torch.int64)
        return order, seeds

    def batch_keys(self, start: int = 0) -> list[list[tuple[int, int]]]:
        """This rank's ``(index, seed)`` lists of the epoch's global batches from ``start`` on."""
        order, seeds = self.epoch_plan()
        out = []
        for i in range(start, len(self)):
            sl = slice(i * self.batch_size, min((i + 1) * self.batch_size, len(order)))
            idx, sd = order[sl], seeds[sl]
            if self.world_size > 1:
                idx, sd = torch.tensor_split(idx, self.world_size)[self.rank], \
                    torch.tensor_split(sd, self.world_size)[self.rank]
            out.append(list(zip(idx.tolist(), sd.tolist())))
        return out

    # ------------------------------------------------------------------ iteration
    def empty_batch(self) -> Any:
        """What a rank gets for a final global batch smaller than ``world_size`` (its share is empty)."""
        return self.collate_fn([])

    def finish(self, batch: Any) -> Any:
        """A collated batch → what iteration yields (e.g. moved to the device and normalized)."""
        return batch

    @staticmethod
    def batch_len(batch: Any) -> int:
        return len(batch[-1])

    def __iter__(self) -> Iterator[Any]:
        start, self._resume_at = self._resume_at, 0
        self._pos = start
        keys = self.batch_keys(start)
        nonempty = [k for k in keys if k]
        kw: dict[str, Any] = {}
        if self.num_workers > 0:
            kw = dict(num_workers=self.num_workers, prefetch_factor=self.prefetch_factor,
                      worker_init_fn=_worker_init, persistent_workers=False)
        dl = torch.utils.data.DataLoader(self.dataset, batch_sampler=nonempty, collate_fn=self.collate_fn,
                                         pin_memory=self.pin_memory, **kw)
        it = iter(dl)
        t0, seen = time.perf_counter(), 0
        try:
            for i, k in enumerate(keys, start=start):
                batch = next(it) if k else self.empty_batch()
                out = self.finish(batch)
                self._pos = i + 1
                seen += self.batch_len(batch)
                self.images_per_s = seen / max(time.perf_counter() - t0, 1e-9)
                yield out
        finally:
            del it
        self.epoch += 1
        self._pos = 0


class StreamingLoader(SeededBatchLoader):
    """Batches ``(x, y)`` of an image folder decoded by ``num_workers`` processes: ``x`` float32 ``[B, 3, S, S]``
    normalized with ``mean``/``std``, ``y`` int64 ``[B]``, both on ``device``.

    The interface is :class:`pwsconv.data.Loader`'s (``len``, ``set_epoch``, ``state_dict``/``load_state_dict``,
    ``rank``/``world_size`` sharding of the **global** ``batch_size``, ``num_samples``, ``local_batch_size``), so the
    engine trains and evaluates with either. ``train``: shuffle + the random-resized-crop augmentation, else file
    order + resize/centre crop.
    """

    def __init__(self, index: FolderIndex, batch_size: int, *, train: bool, size: int = 224, resize: int = 256,
                 num_workers: int = 4, seed: int = 0, drop_last: bool | None = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 device: str | torch.device = "cpu", channels_last: bool = False, rank: int = 0,
                 world_size: int = 1, prefetch_factor: int = 4) -> None:
        self.device = torch.device(device)
        super().__init__(_Decoded(index.samples, imagenet_transform(bool(train), size, resize)), batch_size,
                         shuffle=bool(train), drop_last=bool(train) if drop_last is None else bool(drop_last),
                         num_workers=num_workers, seed=seed, rank=rank, world_size=world_size, collate_fn=_collate,
                         pin_memory=self.device.type == "cuda", prefetch_factor=prefetch_factor)
        self.index, self.train, self.size = index, bool(train), size
        self.channels_last = bool(channels_last)
        m = torch.tensor(list(mean), dtype=torch.float64)
        s = torch.tensor(list(std), dtype=torch.float64)
        self._scale = (1.0 / (255.0 * s)).to(torch.float32).view(1, -1, 1, 1).to(self.device)
        self._shift = (-m / s).to(torch.float32).view(1, -1, 1, 1).to(self.device)

    def empty_batch(self) -> tuple[Tensor, Tensor]:
        return torch.empty(0, 3, self.size, self.size, dtype=torch.uint8), torch.empty(0, dtype=torch.int64)

    def finish(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        xb, yb = batch
        xb = xb.to(self.device, non_blocking=True)
        yb = yb.to(self.device, non_blocking=True)
        x = torch.addcmul(self._shift, xb.to(torch.float32), self._scale)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, yb

    def __repr__(self) -> str:
        return (f"StreamingLoader(root={self.index.root!r}, n={len(self.index)}, batch_size={self.batch_size}, "
                f"train={self.train}, workers={self.num_workers}, epoch={self.epoch}, "
                f"rank={self.rank}/{self.world_size})")


def loader_throughput(loader: StreamingLoader, batches: int | None = None) -> dict[str, float]:
    """Images/s of ``loader`` alone (read + decode + transform + normalize) over ``batches`` batches (default: one
    pass); the loader's epoch is left where it was."""
    epoch = loader.epoch
    t0, n, k = time.perf_counter(), 0, 0
    for _, y in loader:
        n += len(y)
        k += 1
        if batches is not None and k >= batches:
            break
    dt = time.perf_counter() - t0
    loader.set_epoch(epoch)
    return {"images": n, "batches": k, "seconds": dt, "images_per_s": n / max(dt, 1e-9)}


# ------------------------------------------------------------------------------------------------ engine seam
@dataclass
class StreamingBundle:
    """What the engine's model spec needs to know about a streamed data set (cf. :class:`DatasetBundle`)."""

    name: str
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    source: str


def _split_dir(root: Path, names: Sequence[str]) -> Path | None:
    for n in names:
        if (root / n).is_dir():
            return root / n
    return None


def build_streaming(cfg: Any, dist: Any, device: torch.device) -> tuple[StreamingBundle, StreamingLoader,
                                                                       dict[str, StreamingLoader]]:
    """(bundle, train loader, {"val": loader}) of ``cfg.dataset == "imagenet"`` for the engine.

    ``cfg.data_root`` holds ``train/`` and ``val/`` (the ILSVRC-2012 image-folder layout); ``cfg.limit`` /
    ``cfg.test_limit`` keep the first images of a split (in index order, for quick checks);
    ``cfg.num_workers`` (None: up to 8 per process, bounded by the cores) decoding processes per training process.
    """
    if not cfg.data_root:
        raise DataError("dataset 'imagenet' needs data_root: the directory holding train/<class>/ and val/<class>/")
    root = Path(cfg.data_root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: ImageNet root not found")
    if cfg.val_fraction:
        raise DataError("dataset 'imagenet' has its own val split; use val_fraction: 0")
    tr_dir = _split_dir(root, ("train",))
    ev_dir = _split_dir(root, ("val", "test"))
    if tr_dir is None:
        raise DataError(f"{root}: no train/ directory (ILSVRC layout: train/<wnid>/*.JPEG, val/<wnid>/*.JPEG)")
    train_idx = scan_image_folder(tr_dir)
    if cfg.limit is not None:
        train_idx.samples = train_idx.samples[: cfg.limit]
    workers = getattr(cfg, "num_workers", None)
    if workers is None:
        workers = max(0, min(8, (os.cpu_count() or 1) // max(dist.world_size, 1) - 1))
    size = 224
    common = dict(num_workers=int(workers), seed=cfg.seed, device=device, channels_last=cfg.channels_last,
                  rank=dist.rank, world_size=dist.world_size, size=size)
    train = StreamingLoader(train_idx, cfg.batch_size, train=bool(cfg.augment), drop_last=cfg.drop_last, **common)
    train.shuffle = True   # augment: false still shuffles (it only turns the random crop into the eval crop)
    evals: dict[str, StreamingLoader] = {}
    if ev_dir is not None:
        ev_idx = scan_image_folder(ev_dir, train_idx.classes)
        if cfg.test_limit is not None:
            ev_idx.samples = ev_idx.samples[: cfg.test_limit]
        evals["val"] = StreamingLoader(ev_idx, cfg.eval_batch_size, train=False, drop_last=False, **common)
    bundle = StreamingBundle(name="imagenet", num_classes=len(train_idx.classes), in_channels=3,
                             image_size=(size, size), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                             classes=tuple(train_idx.classes), source=str(root))
    return bundle, train, evals
