"""Image-classification data for the PWS experiments: loading (:func:`load_dataset`) and fast in-memory batching
(:class:`Loader`).

    >>> from pwsconv.data import load_dataset, Loader
    >>> ds = load_dataset("digits", val_fraction=0.1, seed=0)        # offline: scikit-learn's 8×8 digits
    >>> train = Loader(ds.train, 64, shuffle=True, augment=ds.augment, mean=ds.mean, std=ds.std)
    >>> for x, y in train: ...                                       # x float32 [64, 1, 8, 8], y int64 [64]

Data sets: "digits", "mnist", "fashion_mnist", "cifar10", "npz", "imagefolder" (see :mod:`pwsconv.data.datasets`).
Everything is held in memory as uint8 tensors; batches are gathered, augmented (CIFAR: pad 4 + random crop + flip,
vectorized) and normalized on the fly. Problems with files raise :class:`DataError` (a ``ValueError``).
"""

from .bundle import DatasetBundle
from .core import DataError, ImageSet, channel_stats, stratified_split
from .datasets import CIFAR10_CLASSES, FASHION_MNIST_CLASSES, available_datasets, find_data_root, load_dataset
from .loader import AUGMENTATIONS, Loader, cifar_augment, cifar_params, epoch_seed
from .readers import (
    decode_jpeg_archive,
    default_cache_dir,
    read_cifar_batch,
    read_idx,
    read_image_folder,
    read_npz,
    write_idx,
)

__all__ = [
    "DataError",
    "DatasetBundle",
    "ImageSet",
    "Loader",
    "load_dataset",
    "available_datasets",
    "find_data_root",
    "channel_stats",
    "stratified_split",
    "cifar_augment",
    "cifar_params",
    "epoch_seed",
    "AUGMENTATIONS",
    "read_idx",
    "write_idx",
    "read_npz",
    "read_cifar_batch",
    "read_image_folder",
    "decode_jpeg_archive",
    "default_cache_dir",
    "CIFAR10_CLASSES",
    "FASHION_MNIST_CLASSES",
]
