"""Data sets by name: :func:`load_dataset` and :func:`available_datasets`.

=================  ==========================================================================================
name               source
=================  ==========================================================================================
``digits``         scikit-learn's bundled 8×8 digits (1,797 images, no files needed); fixed stratified 80/20
                   train/test split
``mnist``          IDX files (``train-images-idx3-ubyte[.gz]``, ``train-labels-…``, ``t10k-…``), split ``.npz``
                   files (``*train*.npz`` / ``*test*.npz`` with ``x``, ``y``; labels may come from the IDX label
                   file — the layout of the shared copy) or one Keras-style ``mnist.npz``
                   (``x_train``, ``y_train``, ``x_test``, ``y_test``)
``fashion_mnist``  the same formats as ``mnist``
``cifar10``        the python batches (``data_batch_1..5``, ``test_batch``, optional ``batches.meta``) or the
                   shared JPEG copy (``cifar10_train_jpeg_bytes.npz`` — decoded once and cached as ``.npy``,
                   trusted only while it matches the SHA-256 beside it — and ``cifar10_test_from_jpeg.npz``)
``npz``            ``root`` = an ``.npz`` file: uint8 ``x`` ``[N, H, W]`` or ``[N, H, W, C]``, integer ``y``,
                   optional ``x_test``/``y_test`` (else a stratified 20% test split) and ``classes``
``imagefolder``    ``root/train/<class>/*.jpg|png…`` and ``root/val/<class>/…`` (or ``root/test``), read into
                   memory (``image_size=`` resizes)
=================  ==========================================================================================

Without ``root``, mnist / fashion_mnist / cifar10 are looked up in ``$PWSCONV_DATA/<name>`` (or ``$PWSCONV_DATA``
itself) and then in ``../shared/data/<name>`` and ``shared/data/<name>`` relative to the working directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .bundle import DatasetBundle
from .core import DataError, ImageSet, channel_stats, stratified_split, to_labels, to_nchw
from .readers import decode_jpeg_archive, read_cifar_batch, read_cifar_meta, read_idx, read_image_folder, read_npz

__all__ = ["load_dataset", "available_datasets", "find_data_root", "DATASETS", "CIFAR10_CLASSES",
           "FASHION_MNIST_CLASSES"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
DIGIT_CLASSES = tuple(str(i) for i in range(10))

_ALIASES = {
    "digits": ("digits",),
    "mnist": ("mnist", "MNIST"),
    "fashion_mnist": ("fashion_mnist", "fashion-mnist", "FashionMNIST", "fashionmnist"),
    "cifar10": ("cifar10", "cifar-10", "CIFAR10", "cifar-10-batches-py"),
}


@dataclass
class _Raw:
    """What a reader returns before splitting and statistics."""

    train: tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]
    test: tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor] | None
    classes: Sequence[str]
    augment: str | None
    source: str
    val: tuple[np.ndarray, np.ndarray] | None = None


# ------------------------------------------------------------------------------------------------------ roots
def find_data_root(name: str, root: str | Path | None = None) -> Path:
    """The directory (or file) to read data set ``name`` from.

    An explicit ``root`` is used as given, or ``root/<name>`` when that exists (so both the data set's own
    directory and the directory holding all data sets work). Without one: ``$PWSCONV_DATA/<name>``,
    ``$PWSCONV_DATA``, ``../shared/data/<name>``, ``shared/data/<name>`` (relative to the working directory).
    """
    aliases = _ALIASES.get(name, (name,))
    if root is not None:
        base = Path(root).expanduser()
        if not base.exists():
            raise DataError(f"{base}: data root not found for {name!r}")
        if base.is_dir():
            for a in aliases:
                if (base / a).is_dir():
                    return base / a
        return base
    candidates: list[Path] = []
    env = os.environ.get("PWSCONV_DATA")
    if env:
        e = Path(env).expanduser()
        candidates += [e / a for a in aliases] + [e]
    cwd = Path.cwd()
    for rel in (Path("..") / "shared" / "data", Path("shared") / "data"):
        candidates += [cwd / rel / a for a in aliases]
    for c in candidates:
        if c.is_dir() and any(c.iterdir()):
            return c.resolve()
    raise DataError(f"no data directory found for {name!r}: give it with --data-root (command line) or root= / "
                    "data_root (Python), set PWSCONV_DATA, or place the files in "
                    f"../shared/data/{aliases[0]} (looked in {', '.join(str(c) for c in candidates)})")


def _first(folder: Path, names: Sequence[str]) -> Path | None:
    for n in names:
        for cand in (folder / n, folder / (n + ".gz")):
            if cand.is_file():
                return cand
    return None


def _search_dirs(base: Path) -> list[Path]:
    out = [base]
    for sub in ("raw",):
        if (base / sub).is_dir():
            out.append(base / sub)
    return out


# ---------------------------------------------------------------------------------------------------- readers
def _load_digits(root: Path | None, split_seed: int, test_fraction: float, **_: Any) -> _Raw:
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - scikit-learn is part of the suite extra
        raise DataError("the 'digits' data set needs scikit-learn (pip install scikit-learn)") from None
    d = load_digits()
    x = np.round(np.asarray(d.images, dtype=np.float64) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    y = np.asarray(d.target, dtype=np.int64)
    keep, test = stratified_split(torch.from_numpy(y), test_fraction, split_seed)
    return _Raw((x[keep.numpy()], y[keep.numpy()]), (x[test.numpy()], y[test.numpy()]), DIGIT_CLASSES, None,
                "sklearn.datasets.load_digits")


def _keras_npz(path: Path, classes: Sequence[str]) -> _Raw | None:
    arrays = read_npz(path)
    if "x_train" not in arrays:
        return None
    for k in ("y_train", "x_test", "y_test"):
        if k not in arrays:
            raise DataError(f"{path}: has 'x_train' but no {k!r} (keys {sorted(arrays)})")
    return _Raw((arrays["x_train"], arrays["y_train"]), (arrays["x_test"], arrays["y_test"]),
                _classes(arrays, classes), None, str(path))


def _classes(arrays: dict, default: Sequence[str]) -> Sequence[str]:
    c = arrays.get("classes")
    if c is None:
        return default
    return [str(v) for v in np.asarray(c).reshape(-1)]


def _npz_split(path: Path, labels_file: Path | None) -> tuple[np.ndarray, np.ndarray]:
    arrays = read_npz(path)
    if "x" not in arrays:
        raise DataError(f"{path}: missing key 'x' (has {sorted(arrays)})")
    x = arrays["x"]
    if "y" in arrays:
        return x, arrays["y"]
    if labels_file is None:
        raise DataError(f"{path}: no 'y' key and no IDX label file next to it")
    labels = read_idx(labels_file, ndim=1)
    if len(labels) < len(x):
        raise DataError(f"{labels_file}: {len(labels)} labels for the {len(x)} images of {path.name}")
    return x, labels[: len(x)]


def _pick_npz(folder: Path, words: Sequence[str]) -> Path | None:
    found = sorted(p for p in folder.glob("*.npz") if any(w in p.name.lower() for w in words))
    if len(found) > 1:
        raise DataError(f"{folder}: several candidate files {[p.name for p in found]}; point --data-root "
                        f"(root= in Python) at one .npz file or keep one per split")
    return found[0] if found else None


def _load_mnist_like(name: str, default_classes: Sequence[str]) -> Callable[..., _Raw]:
    def load(root: Path, **_: Any) -> _Raw:
        if root.is_file():
            raw = _keras_npz(root, default_classes)
            if raw is None:
                raise DataError(f"{root}: expected keys x_train/y_train/x_test/y_test for {name}")
            return raw
        for folder in _search_dirs(root):
            for keras in (folder / f"{name}.npz", folder / "mnist.npz"):
                if keras.is_file() and (raw := _keras_npz(keras, default_classes)) is not None:
                    return raw
        splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        sources: list[str] = []
        for split, prefixes, words in (("train", ("train",), ("train",)), ("test", ("t10k", "test"), ("test", "t10k"))):
            for folder in _search_dirs(root):
                labels = _first(folder, [f"{p}-labels-idx1-ubyte" for p in prefixes]
                                + [f"{p}-labels.idx1-ubyte" for p in prefixes])
                images = _first(folder, [f"{p}-images-idx3-ubyte" for p in prefixes]
                                + [f"{p}-images.idx3-ubyte" for p in prefixes])
                if images is not None:
                    if labels is None:
                        raise DataError(f"{images}: no matching IDX label file ({prefixes[0]}-labels-idx1-ubyte[.gz]) "
                                        f"in {folder}")
                    x = read_idx(images, ndim=3)
                    y = read_idx(labels, ndim=1)
                    if len(x) != len(y):
                        raise DataError(f"{labels}: {len(y)} labels for the {len(x)} images of {images.name}")
                    splits[split] = (x, y)
                    sources.append(images.name)
                    break
                npz = _pick_npz(folder, words)
                if npz is not None:
                    splits[split] = _npz_split(npz, labels)
                    sources.append(npz.name)
                    break
        if "train" not in splits:
            raise DataError(f"{root}: no {name} training images (expected train-images-idx3-ubyte[.gz], a *train*.npz "
                            f"with x/y, or {name}.npz with x_train/...)")
        if "test" not in splits:
            raise DataError(f"{root}: no {name} test images (expected t10k-images-idx3-ubyte[.gz] + "
                            f"t10k-labels-idx1-ubyte[.gz], or a *test*.npz with x/y)")
        return _Raw(splits["train"], splits["test"], default_classes, None, f"{root} ({', '.join(sources)})")

    return load


def _load_cifar10(root: Path, cache_dir: Any = None, limit: int | None = None, **_: Any) -> _Raw:
    if root.is_file():
        raise DataError(f"{root}: cifar10 expects a directory (python batches or the shared JPEG .npz files); "
                        f"use name='npz' for a single .npz file")
    for folder in (root, root / "cifar-10-batches-py"):
        batches = [folder / f"data_batch_{i}" for i in range(1, 6)]
        if any(b.is_file() for b in batches) or (folder / "test_batch").is_file():
            missing = [b.name for b in batches + [folder / "test_batch"] if not b.is_file()]
            if missing:
                raise DataError(f"{folder}: CIFAR-10 python batches incomplete, missing {', '.join(missing)}")
            parts = [read_cifar_batch(b) for b in batches]
            xs, ys = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
            xt, yt = read_cifar_batch(folder / "test_batch")
            classes = read_cifar_meta(folder / "batches.meta") or CIFAR10_CLASSES
            return _Raw((torch.from_numpy(xs), ys), (torch.from_numpy(xt), yt), classes, "cifar", str(folder))
    train_npz, test_npz = root / "cifar10_train_jpeg_bytes.npz", root / "cifar10_test_from_jpeg.npz"
    if train_npz.is_file() or test_npz.is_file():
        for p in (train_npz, test_npz):
            if not p.is_file():
                raise DataError(f"{p}: file not found (the shared CIFAR-10 copy needs both "
                                f"{train_npz.name} and {test_npz.name})")
        x, arrays = decode_jpeg_archive(train_npz, cache_dir=cache_dir, limit=limit)
        if "y" not in arrays:
            raise DataError(f"{train_npz}: missing key 'y' (has {sorted(arrays)})")
        y = arrays["y"][: len(x)]
        test = read_npz(test_npz)
        for k in ("x", "y"):
            if k not in test:
                raise DataError(f"{test_npz}: missing key {k!r} (has {sorted(test)})")
        if test["x"].ndim != 4 or test["x"].shape[1:] != (32, 32, 3):
            raise DataError(f"{test_npz}: 'x' must be [N, 32, 32, 3], got {test['x'].shape}")
        return _Raw((x, y), (test["x"], test["y"]), _classes(arrays, CIFAR10_CLASSES), "cifar",
                    f"{root} (JPEG copy)")
    raise DataError(f"{root}: no CIFAR-10 data (expected data_batch_1..5 + test_batch, or "
                    f"cifar10_train_jpeg_bytes.npz + cifar10_test_from_jpeg.npz)")


def _load_npz(root: Path, split_seed: int, test_fraction: float, **_: Any) -> _Raw:
    if not root.is_file():
        raise DataError(f"{root}: the 'npz' data set needs the path of an .npz file as its data root "
                        "(--data-root FILE.npz; root= in Python)")
    arrays = read_npz(root)
    xk = "x" if "x" in arrays else "x_train" if "x_train" in arrays else None
    yk = "y" if "y" in arrays else "y_train" if "y_train" in arrays else None
    if xk is None or yk is None:
        raise DataError(f"{root}: needs keys 'x' and 'y' (or x_train/y_train), has {sorted(arrays)}")
    x, y = arrays[xk], arrays[yk]
    classes = _classes(arrays, ())
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError(f"{root}: 'x_test' and 'y_test' must come together (has {sorted(arrays)})")
    if "x_test" in arrays:
        return _Raw((x, y), (arrays["x_test"], arrays["y_test"]), classes, None, str(root))
    xt = to_nchw(x, f"{root} [{xk}]")
    yt = to_labels(y, f"{root} [{yk}]", len(xt))
    keep, test = stratified_split(yt, test_fraction, split_seed)
    return _Raw((xt[keep], yt[keep]), (xt[test], yt[test]), classes, None,
                f"{root} (test = stratified {test_fraction:.0%} split, split_seed {split_seed})")


def _load_imagefolder(root: Path, image_size: Any = None, **_: Any) -> _Raw:
    if not root.is_dir():
        raise DataError(f"{root}: image folder root not found")
    size = None if image_size is None else ((int(image_size),) * 2 if np.isscalar(image_size)
                                            else tuple(int(v) for v in image_size))
    if not (root / "train").is_dir():
        raise DataError(f"{root}: expected {root}/train/<class>/<images> (and {root}/val/<class>/...)")
    x, y, classes = read_image_folder(root / "train", size=size)
    val = test = None
    if (root / "test").is_dir():
        xt, yt, _ = read_image_folder(root / "test", classes, size or x.shape[1:3])
        test = (xt, yt)
        if (root / "val").is_dir():
            xv, yv, _ = read_image_folder(root / "val", classes, size or x.shape[1:3])
            val = (xv, yv)
    elif (root / "val").is_dir():
        xt, yt, _ = read_image_folder(root / "val", classes, size or x.shape[1:3])
        test = (xt, yt)
    if test is not None and test[0].shape[1:] != x.shape[1:]:
        raise DataError(f"{root}: evaluation images are {test[0].shape[1:]}, training images {x.shape[1:]}")
    return _Raw((x, y), test, classes, None, str(root), val=val)


_Loader = Callable[..., _Raw]

DATASETS: dict[str, tuple[_Loader, bool]] = {  # name → (reader, needs a root directory)
    "digits": (_load_digits, False),
    "mnist": (_load_mnist_like("mnist", DIGIT_CLASSES), True),
    "fashion_mnist": (_load_mnist_like("fashion_mnist", FASHION_MNIST_CLASSES), True),
    "cifar10": (_load_cifar10, True),
    "npz": (_load_npz, True),
    "imagefolder": (_load_imagefolder, True),
}
_NAME_ALIASES = {"fashion-mnist": "fashion_mnist", "fashionmnist": "fashion_mnist", "cifar-10": "cifar10",
                 "image_folder": "imagefolder", "sklearn_digits": "digits"}


def available_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`, plus the streamed ones the engine reads (pwsconv.data.streaming)."""
    from .streaming import STREAMING_DATASETS

    return list(DATASETS) + [n for n in STREAMING_DATASETS if n not in DATASETS]


def _as_set(pair: tuple[Any, Any], what: str, num_classes: int | None) -> ImageSet:
    x, y = pair
    xt = x if isinstance(x, torch.Tensor) else to_nchw(x, what)
    if isinstance(y, torch.Tensor) and y.dtype == torch.int64:
        y = y.numpy()
    return ImageSet(xt.contiguous(), to_labels(y, what, len(xt), num_classes))


def load_dataset(name: str, root: str | Path | None = None, *, val_fraction: float = 0.0, seed: int = 0,
                 limit: int | None = None, test_limit: int | None = None, split_seed: int = 0,
                 test_fraction: float = 0.2, cache_dir: str | Path | None | bool = None,
                 image_size: int | Sequence[int] | None = None) -> DatasetBundle:
    """Load data set ``name`` (see the module docstring) into memory.

    Args:
        root: the data set's directory or file (default: :func:`find_data_root`; not used by "digits").
        val_fraction: the fraction of the training images (per class, rounded) held out as ``bundle.val``.
        seed: seeds the validation split (a ``torch.Generator``; reproducible, independent of global RNGs).
        limit: keep only the first ``limit`` training images (before the validation split; quick runs).
        test_limit: keep only the first ``test_limit`` test images.
        split_seed: seeds the train/test split of data without a test set ("digits", "npz" without x_test); kept
            separate from ``seed`` so that the test set stays the same across runs with different seeds.
        test_fraction: that test split's size (default 20%).
        cache_dir: where the decoded CIFAR-10 JPEG copy is cached (default ``$PWSCONV_CACHE`` or
            ``~/.cache/pwsconv``; False: no cache).
        image_size: "imagefolder" only: resize every image to this size.

    Returns:
        A :class:`DatasetBundle`; mean/std are computed from the (final) training split.

    Raises:
        DataError: missing, truncated or malformed files (one-line message naming the file).
        ValueError: an unknown name or a bad argument.
    """
    key = str(name).lower()
    key = _NAME_ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if not isinstance(val_fraction, (int, float)) or not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    for label, v in (("limit", limit), ("test_limit", test_limit)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{label} must be a positive int or None, got {v!r}")
    reader, needs_root = DATASETS[key]
    path = find_data_root(key, root) if needs_root else (Path(root) if root is not None else None)
    raw = reader(path, split_seed=split_seed, test_fraction=float(test_fraction), cache_dir=cache_dir, limit=limit,
                 image_size=image_size)

    classes = tuple(str(c) for c in raw.classes)
    num_classes = len(classes) if classes else None
    train = _as_set(raw.train, f"{raw.source} [train]", num_classes)
    test = _as_set(raw.test, f"{raw.source} [test]", num_classes) if raw.test is not None else None
    val = _as_set(raw.val, f"{raw.source} [val]", num_classes) if raw.val is not None else None
    if num_classes is None:
        num_classes = int(max(int(s.y.max()) for s in (train, test, val) if s is not None and len(s)) + 1)
        classes = tuple(str(i) for i in range(num_classes))
    if limit is not None:
        train = train.subset(slice(0, limit))
    if test_limit is not None and test is not None:
        test = test.subset(slice(0, test_limit))
    if val_fraction > 0:
        if val is not None:
            raise ValueError(f"{raw.source} has its own validation split; use val_fraction=0")
        keep, held = stratified_split(train.y, float(val_fraction), seed)
        if len(held) == 0:
            raise ValueError(f"val_fraction {val_fraction} of {len(train)} training images is empty")
        train, val = train.subset(keep), train.subset(held)
    for label, s in (("test", test), ("val", val)):
        if s is not None and s.x.shape[1:] != train.x.shape[1:]:
            raise DataError(f"{raw.source}: {label} images are {tuple(s.x.shape[1:])}, training images "
                            f"{tuple(train.x.shape[1:])}")
    mean, std = channel_stats(train.x)
    return DatasetBundle(
        name=key, train=train, val=val, test=test, num_classes=num_classes, in_channels=int(train.x.shape[1]),
        image_size=(int(train.x.shape[2]), int(train.x.shape[3])), mean=mean, std=std, classes=classes,
        augment=raw.augment, source=raw.source,
        info={"root": str(path) if path is not None else None, "seed": seed, "split_seed": split_seed,
              "val_fraction": float(val_fraction), "limit": limit},
    )
