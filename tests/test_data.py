"""The data package: readers (IDX, npz, CIFAR pickles, JPEG archive, image folders) on small synthetic files and their
errors, the offline digits set, the shared real data (if present), and the Loader (augmentation, determinism,
resuming, DDP sharding)."""

from __future__ import annotations

import gzip
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from pwsconv.data import (
    DataError,
    ImageSet,
    Loader,
    available_datasets,
    cifar_augment,
    cifar_params,
    load_dataset,
    read_idx,
    write_idx,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _images(n: int, h: int = 28, w: int = 28, c: int | None = None, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (n, h, w) if c is None else (n, h, w, c)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _labels(n: int, k: int = 10) -> np.ndarray:
    return (np.arange(n) % k).astype(np.uint8)


def _mnist_dir(d: Path, n_train: int = 30, n_test: int = 20, gz: bool = True) -> Path:
    ext = ".gz" if gz else ""
    d.mkdir(parents=True, exist_ok=True)
    write_idx(d / f"train-images-idx3-ubyte{ext}", _images(n_train))
    write_idx(d / f"train-labels-idx1-ubyte{ext}", _labels(n_train))
    write_idx(d / f"t10k-images-idx3-ubyte{ext}", _images(n_test, seed=1))
    write_idx(d / f"t10k-labels-idx1-ubyte{ext}", _labels(n_test))
    return d


# ------------------------------------------------------------------------------------------------ registry/digits
def test_available_datasets_and_unknown_name():
    assert {"digits", "mnist", "fashion_mnist", "cifar10", "npz", "imagefolder"} <= set(available_datasets())
    with pytest.raises(ValueError, match="digits"):
        load_dataset("imagenet-42")


def test_digits_offline_shapes_and_reproducible_split():
    a = load_dataset("digits", val_fraction=0.1, seed=3)
    assert a.train.x.dtype == torch.uint8 and a.train.x.shape[1:] == (1, 8, 8)
    assert a.train.y.dtype == torch.int64
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert 350 <= len(a.test) <= 365 and 125 <= len(a.val) <= 150
    assert (a.num_classes, a.in_channels, a.image_size, a.augment) == (10, 1, (8, 8), None)
    assert int(a.train.x.max()) == 255 and int(a.train.x.min()) == 0
    assert 0 < a.mean[0] < 1 and 0 < a.std[0] < 1
    assert set(a.test.y.tolist()) == set(range(10))
    b = load_dataset("digits", val_fraction=0.1, seed=3)
    c = load_dataset("digits", val_fraction=0.1, seed=4)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.val.y, b.val.y)
    assert torch.equal(a.test.x, c.test.x)  # the test split is fixed (split_seed), independent of seed
    assert not torch.equal(a.val.x, c.val.x)
    d = load_dataset("digits")
    assert d.val is None and len(d.train) == len(a.train) + len(a.val)
    assert len(load_dataset("digits", limit=100).train) == 100


# --------------------------------------------------------------------------------------------------------- IDX
def test_idx_roundtrip_and_mnist_layout(tmp_path):
    d = _mnist_dir(tmp_path)
    arr = read_idx(d / "train-images-idx3-ubyte.gz", ndim=3)
    assert arr.shape == (30, 28, 28) and arr.dtype == np.uint8
    ds = load_dataset("mnist", d, val_fraction=0.2, seed=0)
    assert ds.train.x.shape == (20, 1, 28, 28) and len(ds.val) == 10  # round(0.2 × 3) = 1 of each class's 3
    assert ds.test.x.shape == (20, 1, 28, 28)
    assert torch.equal(ds.test.x[:, 0], torch.from_numpy(_images(20, seed=1)))
    assert ds.classes[0] == "0" and ds.augment is None
    # raw (not gzipped) files and the directory that holds <name>/ both work
    raw = _mnist_dir(tmp_path / "rawroot" / "mnist", gz=False)
    assert len(load_dataset("mnist", raw.parent).train) == 30
    # other IDX types round-trip
    write_idx(tmp_path / "i32.idx", np.arange(6, dtype=np.int32).reshape(2, 3))
    assert read_idx(tmp_path / "i32.idx").tolist() == [[0, 1, 2], [3, 4, 5]]


def test_idx_errors(tmp_path):
    good = write_idx(tmp_path / "x.idx", _images(5))
    payload = good.read_bytes()
    # truncated raw file
    (tmp_path / "short.idx").write_bytes(payload[:-100])
    with pytest.raises(DataError, match=r"short\.idx.*truncated"):
        read_idx(tmp_path / "short.idx")
    # truncated gzip stream
    gz = gzip.compress(payload)
    (tmp_path / "short.gz").write_bytes(gz[: len(gz) // 2])
    with pytest.raises(DataError, match=r"short\.gz.*truncated"):
        read_idx(tmp_path / "short.gz")
    # corrupt gzip
    (tmp_path / "bad.gz").write_bytes(gz[:10] + b"\xff" * 50)
    with pytest.raises(DataError, match=r"bad\.gz"):
        read_idx(tmp_path / "bad.gz")
    # bad magic
    (tmp_path / "magic.idx").write_bytes(b"\x12\x34" + payload[2:])
    with pytest.raises(DataError, match="magic"):
        read_idx(tmp_path / "magic.idx")
    # wrong number of dims (a label file where images are expected)
    write_idx(tmp_path / "lab.idx", _labels(5))
    with pytest.raises(DataError, match="dimension"):
        read_idx(tmp_path / "lab.idx", ndim=3)
    # trailing garbage
    (tmp_path / "long.idx").write_bytes(payload + b"\0\0")
    with pytest.raises(DataError, match="unexpected bytes"):
        read_idx(tmp_path / "long.idx")
    with pytest.raises(DataError, match="not found"):
        read_idx(tmp_path / "missing.idx")


def test_mnist_dataset_errors(tmp_path):
    d = _mnist_dir(tmp_path / "count")
    write_idx(d / "train-labels-idx1-ubyte.gz", _labels(29))  # count mismatch
    with pytest.raises(DataError, match="29 labels for the 30 images"):
        load_dataset("mnist", d)
    d = _mnist_dir(tmp_path / "range")
    lab = _labels(30)
    lab[3] = 10
    write_idx(d / "train-labels-idx1-ubyte.gz", lab)
    with pytest.raises(DataError, match="out of range"):
        load_dataset("mnist", d)
    d = _mnist_dir(tmp_path / "notest")
    (d / "t10k-images-idx3-ubyte.gz").unlink()
    (d / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="no mnist test images"):
        load_dataset("mnist", d)
    d = _mnist_dir(tmp_path / "trunc")
    data = (d / "t10k-images-idx3-ubyte.gz").read_bytes()
    (d / "t10k-images-idx3-ubyte.gz").write_bytes(data[:-200])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz"):
        load_dataset("mnist", d)
    with pytest.raises(DataError, match="not found"):
        load_dataset("mnist", tmp_path / "nowhere")


def test_mnist_npz_layouts(tmp_path):
    # the shared layout: train images in an .npz without labels + the IDX label file; test in IDX
    d = tmp_path / "shared_like"
    d.mkdir()
    write_idx(d / "train-labels-idx1-ubyte.gz", _labels(50))
    np.savez(d / "mnist_train_first23.npz", x=_images(23))
    write_idx(d / "t10k-images-idx3-ubyte.gz", _images(7))
    write_idx(d / "t10k-labels-idx1-ubyte.gz", _labels(7))
    ds = load_dataset("mnist", d)
    assert len(ds.train) == 23 and ds.train.y.tolist()[:12] == list(range(10)) + [0, 1]
    # split npz files with x, y for both splits (the shared Fashion-MNIST layout)
    f = tmp_path / "fashion"
    f.mkdir()
    np.savez(f / "fashion_mnist_train_first9.npz", x=_images(9), y=_labels(9).astype(np.int64))
    np.savez(f / "fashion_mnist_test_first4.npz", x=_images(4), y=_labels(4).astype(np.int64))
    fm = load_dataset("fashion_mnist", f)
    assert (len(fm.train), len(fm.test), fm.classes[9]) == (9, 4, "Ankle boot")
    # a Keras-style single file
    k = tmp_path / "mnist.npz"
    np.savez(k, x_train=_images(6), y_train=_labels(6), x_test=_images(3), y_test=_labels(3))
    km = load_dataset("mnist", k)
    assert (len(km.train), len(km.test)) == (6, 3)


# --------------------------------------------------------------------------------------------------- generic npz
def test_generic_npz(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, x=_images(50, 6, 5, 3), y=_labels(50, 5), classes=np.array(list("abcde")))
    ds = load_dataset("npz", p, val_fraction=0.25, seed=1)
    assert ds.train.x.shape[1:] == (3, 6, 5) and ds.image_size == (6, 5) and ds.in_channels == 3
    assert len(ds.test) == 10 and len(ds.val) == 10 and len(ds.train) == 30  # stratified 20% test, 25% val
    assert ds.classes == tuple("abcde") and len(ds.mean) == 3
    assert torch.equal(load_dataset("npz", p).test.y, ds.test.y)
    q = tmp_path / "e.npz"
    np.savez(q, x=_images(8, 4, 4), y=_labels(8, 2), x_test=_images(3, 4, 4), y_test=_labels(3, 2))
    e = load_dataset("npz", q)
    assert (len(e.train), len(e.test), e.num_classes) == (8, 3, 2)


@pytest.mark.parametrize("arrays,match", [
    ({"x": _images(4, 4, 4)}, "needs keys 'x' and 'y'"),
    ({"x": np.zeros((4, 4, 4), np.float32), "y": _labels(4)}, "uint8"),
    ({"x": _images(4, 4, 4), "y": _labels(5)}, "5 labels for 4 images"),
    ({"x": _images(4, 4, 4), "y": np.array([0, 1, -1, 0])}, "out of range"),
    ({"x": _images(4, 4, 4), "y": np.array([0.0, 1, 1, 0])}, "integers"),
    ({"x": _images(4, 4, 4), "y": _labels(4), "classes": np.array(["a"])}, "out of range"),
    ({"x": np.zeros((4, 3, 8, 8), np.uint8), "y": _labels(4)}, "shape"),
    ({"x": _images(4, 4, 4), "y": _labels(4), "x_test": _images(2, 4, 4)}, "together"),
])
def test_generic_npz_malformed(tmp_path, arrays, match):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    with pytest.raises(DataError, match=match) as e:
        load_dataset("npz", p)
    assert "bad.npz" in str(e.value) and "\n" not in str(e.value)


def test_default_roots(tmp_path, monkeypatch):
    _mnist_dir(tmp_path / "store" / "mnist", n_train=10, n_test=10)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PWSCONV_DATA", raising=False)
    with pytest.raises(DataError, match="no data directory found for 'mnist'"):
        load_dataset("mnist")
    monkeypatch.setenv("PWSCONV_DATA", str(tmp_path / "store"))
    assert len(load_dataset("mnist").train) == 10
    monkeypatch.delenv("PWSCONV_DATA")
    (tmp_path / "work").mkdir()
    (tmp_path / "shared").mkdir()
    (tmp_path / "store").rename(tmp_path / "shared" / "data")
    monkeypatch.chdir(tmp_path / "work")  # ../shared/data/<name>, as from a checkout next to shared/
    assert len(load_dataset("mnist").test) == 10


def test_npz_corrupt_files(tmp_path):
    p = tmp_path / "t.npz"
    np.savez(p, x=_images(20), y=_labels(20))
    data = p.read_bytes()
    (tmp_path / "trunc.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="trunc.npz"):
        load_dataset("npz", tmp_path / "trunc.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(DataError, match="junk.npz"):
        load_dataset("npz", tmp_path / "junk.npz")
    with pytest.raises(DataError, match="needs the path of an .npz file"):
        load_dataset("npz", tmp_path)
    np.save(tmp_path / "single.npy", _images(3))
    with pytest.raises(DataError, match="not an .npz"):
        load_dataset("npz", tmp_path / "single.npy")


# ------------------------------------------------------------------------------------------------ CIFAR pickles
def _write_cifar(d: Path, n: int = 6, meta: bool = True) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"batch_label": name.encode(), b"labels": [int(v) for v in rng.integers(0, 10, n)],
                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
        with open(d / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    if meta:
        with open(d / "batches.meta", "wb") as f:
            pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    return d


def test_cifar_pickle_batches(tmp_path):
    d = _write_cifar(tmp_path / "cifar-10-batches-py")
    ds = load_dataset("cifar10", tmp_path, val_fraction=0.0)
    assert ds.train.x.shape == (30, 3, 32, 32) and ds.test.x.shape == (6, 3, 32, 32)
    assert ds.augment == "cifar" and ds.classes[3] == "c3" and ds.image_size == (32, 32)
    with open(d / "data_batch_2", "rb") as f:
        b2 = pickle.load(f, encoding="bytes")
    torch.testing.assert_close(ds.train.x[6:12].reshape(6, -1), torch.from_numpy(b2[b"data"]))
    assert ds.train.y[6:12].tolist() == b2[b"labels"]
    # a pickle naming numpy.core.multiarray (as the original Python 2 files do) loads too
    raw = pickle.dumps({b"labels": [1, 2], b"data": np.full((2, 3072), 7, np.uint8)}, protocol=2)
    raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in raw
    (d / "test_batch").write_bytes(raw)
    ds = load_dataset("cifar10", tmp_path)
    assert ds.test.y.tolist() == [1, 2] and int(ds.test.x.max()) == 7


def test_cifar_pickle_errors(tmp_path):
    d = _write_cifar(tmp_path / "trunc")
    data = (d / "data_batch_3").read_bytes()
    (d / "data_batch_3").write_bytes(data[: len(data) // 3])
    with pytest.raises(DataError, match="data_batch_3.*truncated"):
        load_dataset("cifar10", d)
    d = _write_cifar(tmp_path / "missing")
    (d / "data_batch_5").unlink()
    with pytest.raises(DataError, match="missing data_batch_5"):
        load_dataset("cifar10", d)
    d = _write_cifar(tmp_path / "shape")
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"labels": [0, 1], b"data": np.zeros((2, 100), np.uint8)}, f)
    with pytest.raises(DataError, match=r"test_batch.*\[N, 3072\]"):
        load_dataset("cifar10", d)
    d = _write_cifar(tmp_path / "keys")
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"pixels": np.zeros((2, 3072), np.uint8)}, f)
    with pytest.raises(DataError, match="missing 'data' or 'labels'"):
        load_dataset("cifar10", d)
    d = _write_cifar(tmp_path / "evil")
    with open(d / "test_batch", "wb") as f:  # a pickle that would call os.getcwd: refused, never executed
        f.write(b"cposix\ngetcwd\n(tR.")
    with pytest.raises(DataError, match="refusing"):
        load_dataset("cifar10", d)
    with pytest.raises(DataError, match="no CIFAR-10 data"):
        load_dataset("cifar10", tmp_path / "evil" / ".." / "..")


# -------------------------------------------------------------------------------------------- CIFAR JPEG archive
def _jpeg_bytes(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_cifar_jpeg_archive_decode_and_cache(tmp_path):
    yy, xx = np.mgrid[0:32, 0:32]
    imgs = np.stack([np.stack([(yy * 8 * (i + 1) // 8 + 40 * c + 9 * i) % 256 + 0 * xx for c in range(3)], -1)
                     for i in range(12)]).astype(np.uint8)  # smooth images: JPEG keeps them close
    imgs[:, :, :16] //= 2
    blobs = [_jpeg_bytes(im) for im in imgs]
    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    d = tmp_path / "cifar10"
    d.mkdir()
    np.savez(d / "cifar10_train_jpeg_bytes.npz", jpeg=np.frombuffer(b"".join(blobs), np.uint8), offsets=offsets,
             y=_labels(12).astype(np.int64), classes=np.array([f"k{i}" for i in range(10)]))
    np.savez(d / "cifar10_test_from_jpeg.npz", x=imgs[:4], y=_labels(4).astype(np.int64))
    cache = tmp_path / "cache"
    ds = load_dataset("cifar10", d, cache_dir=cache)
    assert ds.train.x.shape == (12, 3, 32, 32) and ds.classes[0] == "k0" and ds.augment == "cifar"
    err = (ds.train.x.float() - torch.from_numpy(imgs).permute(0, 3, 1, 2).float()).abs().mean()
    assert err < 8  # JPEG is lossy but close on smooth images
    cached = list(cache.glob("*.npy"))
    assert len(cached) == 1
    np.testing.assert_array_equal(np.load(cached[0]), ds.train.x.permute(0, 2, 3, 1).numpy())
    again = load_dataset("cifar10", d, cache_dir=cache, limit=5)  # served from the cache
    assert torch.equal(again.train.x, ds.train.x[:5])
    nocache = load_dataset("cifar10", d, cache_dir=False, limit=3)
    assert torch.equal(nocache.train.x, ds.train.x[:3])
    # malformed archive: offsets past the end
    np.savez(d / "cifar10_train_jpeg_bytes.npz", jpeg=np.frombuffer(b"".join(blobs), np.uint8),
             offsets=offsets + 1, y=_labels(12).astype(np.int64))
    with pytest.raises(DataError, match="offsets"):
        load_dataset("cifar10", d, cache_dir=False)
    (d / "cifar10_test_from_jpeg.npz").unlink()
    with pytest.raises(DataError, match="cifar10_test_from_jpeg.npz"):
        load_dataset("cifar10", d, cache_dir=False)


# -------------------------------------------------------------------------------------------------- image folder
def test_imagefolder(tmp_path):
    from PIL import Image

    for split, n in (("train", 3), ("val", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(_images(1, 6, 6, 3, seed=i)[0]).save(tmp_path / split / cls / f"{i}.png")
    ds = load_dataset("imagefolder", tmp_path)
    assert ds.train.x.shape == (6, 3, 6, 6) and ds.test.x.shape == (4, 3, 6, 6) and ds.classes == ("cat", "dog")
    assert ds.train.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert load_dataset("imagefolder", tmp_path, image_size=4).train.x.shape == (6, 3, 4, 4)
    Image.fromarray(_images(1, 5, 5, 3)[0]).save(tmp_path / "train" / "dog" / "odd.png")
    with pytest.raises(DataError, match="odd.png"):
        load_dataset("imagefolder", tmp_path)
    (tmp_path / "val" / "bird").mkdir()
    with pytest.raises(DataError, match="bird"):
        load_dataset("imagefolder", tmp_path, image_size=4)


# ------------------------------------------------------------------------------------------------- shared data
@pytest.mark.skipif(not (SHARED / "mnist" / "t10k-images-idx3-ubyte.gz").is_file(), reason="no shared MNIST")
def test_shared_mnist_test_set():
    x = read_idx(SHARED / "mnist" / "t10k-images-idx3-ubyte.gz", ndim=3)
    y = read_idx(SHARED / "mnist" / "t10k-labels-idx1-ubyte.gz", ndim=1)
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (10000,) and y[:5].tolist() == [7, 2, 1, 0, 4] and y.max() == 9
    ds = load_dataset("mnist", SHARED / "mnist", limit=100)
    assert ds.train.x.shape == (100, 1, 28, 28) and ds.test.x.shape == (10000, 1, 28, 28)


@pytest.mark.skipif(not (SHARED / "cifar10" / "cifar10_test_from_jpeg.npz").is_file(), reason="no shared CIFAR-10")
def test_shared_cifar10_test_set():
    ds = load_dataset("cifar10", SHARED / "cifar10", limit=32, cache_dir=False)  # decodes only 32 train JPEGs
    assert ds.train.x.shape == (32, 3, 32, 32) and ds.test.x.shape == (10000, 3, 32, 32)
    assert torch.bincount(ds.test.y).tolist() == [1000] * 10
    assert ds.classes[0] == "airplane" and ds.augment == "cifar"


# ------------------------------------------------------------------------------------------------------ Loader
def _indexed_set(n: int = 37, c: int = 3, h: int = 6) -> ImageSet:
    """Images whose labels are their own indices (to track order)."""
    x = torch.randint(0, 256, (n, c, h, h), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return ImageSet(x, torch.arange(n))


def test_loader_batches_normalization_and_len():
    s = _indexed_set()
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    loader = Loader(s, 8, shuffle=False, mean=mean, std=std)
    assert len(loader) == 5 and len(Loader(s, 8, shuffle=False, drop_last=True)) == 4
    batches = list(loader)
    assert [len(y) for _, y in batches] == [8, 8, 8, 8, 5]
    x0, y0 = batches[0]
    assert x0.dtype == torch.float32 and y0.dtype == torch.int64
    ref = (s.x[:8].float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(x0, ref)
    shuffled = Loader(s, 8, shuffle=True, seed=1)
    ys = torch.cat([y for _, y in shuffled])
    assert sorted(ys.tolist()) == list(range(37)) and ys.tolist() != list(range(37))
    xcl, _ = next(iter(Loader(s, 4, shuffle=False, channels_last=True)))
    assert xcl.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError):
        Loader(s, 0, shuffle=False)
    with pytest.raises(ValueError):
        Loader(s, 4, shuffle=False, rank=2, world_size=2)
    with pytest.raises(ValueError):
        Loader(s, 4, shuffle=False, augment="mixup")


def _reference_augment(img: torch.Tensor, dy: int, dx: int, flip: int, pad: int = 4) -> torch.Tensor:
    c, h, w = img.shape
    p = torch.zeros(c, h + 2 * pad, w + 2 * pad, dtype=img.dtype)
    p[:, pad:pad + h, pad:pad + w] = img
    out = p[:, dy:dy + h, dx:dx + w]
    return out.flip(-1) if flip else out


def test_cifar_augment_matches_pad_crop_flip():
    x = torch.randint(1, 256, (64, 3, 32, 32), dtype=torch.uint8)  # no zeros: padding is recognizable
    params = cifar_params(64, torch.Generator().manual_seed(0))
    assert params[:, :2].min() >= 0 and params[:, :2].max() <= 8 and set(params[:, 2].tolist()) == {0, 1}
    out = cifar_augment(x, params)
    assert out.shape == x.shape and out.dtype == torch.uint8
    for i in range(64):
        dy, dx, f = params[i].tolist()
        assert torch.equal(out[i], _reference_augment(x[i], dy, dx, f))
    # the centre crop without flip is the identity; with flip, a mirror
    centre = torch.tensor([[4, 4, 0], [4, 4, 1]])
    same = cifar_augment(x[:2], centre)
    assert torch.equal(same[0], x[0]) and torch.equal(same[1], x[1].flip(-1))
    # the largest shift shows 4 rows of zero padding
    corner = cifar_augment(x[:1], torch.tensor([[0, 0, 0]]))
    assert (corner[0, :, :4, :] == 0).all() and torch.equal(corner[0, :, 4:, 4:], x[0, :, :28, :28])


def test_loader_augmentation_deterministic_and_resumable():
    s = _indexed_set(50, 3, 8)
    mk = lambda **kw: Loader(s, 16, shuffle=True, augment="cifar", **kw)  # noqa: E731
    a = [(x.clone(), y.clone()) for x, y in mk(seed=7)]
    b = [(x.clone(), y.clone()) for x, y in mk(generator=torch.Generator().manual_seed(7))]
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    # epochs differ, and set_epoch reproduces any of them
    loader = mk(seed=7)
    e0 = [y.clone() for _, y in loader]
    e1 = [y.clone() for _, y in loader]
    assert loader.epoch == 2 and not all(torch.equal(p, q) for p, q in zip(e0, e1))
    fresh = mk(seed=7)
    fresh.set_epoch(1)
    assert all(torch.equal(p, y) for p, (_, y) in zip(e1, fresh))
    # mid-epoch resume through state_dict
    loader = mk(seed=7)
    loader.set_epoch(3)
    full = [(x.clone(), y.clone()) for x, y in loader]
    loader.set_epoch(3)
    it = iter(loader)
    next(it)
    next(it)
    state = loader.state_dict()
    assert state["epoch"] == 3 and state["batch"] == 2
    resumed = mk(seed=0)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(full) - 2
    assert all(torch.equal(x, fx) and torch.equal(y, fy) for (x, y), (fx, fy) in zip(rest, full[2:]))
    assert resumed.epoch == 4 and len(list(resumed)) == len(full)  # the next epoch is whole again


@pytest.mark.parametrize("world_size,batch", [(2, 16), (3, 16), (4, 8)])
def test_loader_ddp_sharding_matches_single_process(world_size, batch):
    s = _indexed_set(45, 3, 8)
    kw = dict(shuffle=True, augment="cifar", seed=11, mean=0.5, std=0.25)
    single = Loader(s, batch, **kw)
    single.set_epoch(2)
    ranks = [Loader(s, batch, rank=r, world_size=world_size, **kw) for r in range(world_size)]
    for r in ranks:
        r.set_epoch(2)
        assert len(r) == len(single)
    for (x, y), *parts in zip(single, *ranks):
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        sizes = [len(p[1]) for p in parts]
        assert max(sizes) - min(sizes) <= 1
    assert ranks[0].local_batch_size == -(-batch // world_size) or batch % world_size == 0


def test_bundle_loader_helper():
    ds = load_dataset("digits", limit=64)
    train = ds.loader("train", 32, seed=0)
    assert train.shuffle and train.augment is None and len(train) == 2
    x, y = next(iter(ds.loader("test", 100)))
    assert x.shape == (100, 1, 8, 8) and abs(float(x.mean())) < 0.5
    with pytest.raises(ValueError, match="no 'val' split"):
        ds.loader("val", 8)
