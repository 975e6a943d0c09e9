"""A loaded data set (:class:`DatasetBundle`): its splits and what a model and a :class:`~pwsconv.data.Loader` need."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .core import ImageSet
from .loader import Loader

__all__ = ["DatasetBundle"]


@dataclass
class DatasetBundle:
    """A loaded data set: splits plus what a model and a :class:`~pwsconv.data.Loader` need to know about it.

    Attributes:
        train / val / test: the splits (``val`` is None when ``val_fraction == 0``; ``test`` may be None for an
            image folder without a test/val directory).
        num_classes, in_channels: for the model.
        image_size: ``(H, W)``.
        mean, std: per-channel statistics of the training split on the 0..1 scale, for input normalization.
        classes: class names, indexed by label.
        augment: the paper's training augmentation for this data ("cifar": pad 4 + random crop + horizontal flip),
            or None.
        name: the data set's registry name; source: where it was read from (files), for logs.
    """

    name: str
    train: ImageSet
    val: ImageSet | None
    test: ImageSet | None
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    augment: str | None = None
    source: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def splits(self) -> dict[str, ImageSet]:
        """The splits that exist, by name."""
        return {k: v for k, v in (("train", self.train), ("val", self.val), ("test", self.test)) if v is not None}

    def loader(self, split: str, batch_size: int, *, train: bool | None = None, **kwargs: Any) -> Loader:
        """A :class:`~pwsconv.data.Loader` over ``split`` with this data set's normalization.

        ``train`` (default: ``split == "train"``) turns on shuffling and the data set's augmentation; other keyword
        arguments go to the Loader (e.g. ``generator``, ``device``, ``rank``, ``world_size``, ``drop_last``).
        """
        images = self.splits().get(split)
        if images is None:
            raise ValueError(f"data set {self.name!r} has no {split!r} split; it has {', '.join(self.splits())}")
        train = split == "train" if train is None else train
        kwargs.setdefault("shuffle", train)
        kwargs.setdefault("augment", self.augment if train else None)
        return Loader(images, batch_size, mean=self.mean, std=self.std, **kwargs)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.splits().items())
        return (f"DatasetBundle({self.name!r}, {sizes}, classes={self.num_classes}, "
                f"shape={self.in_channels}x{self.image_size[0]}x{self.image_size[1]}, augment={self.augment!r})")
