"""File readers: IDX (MNIST format, raw or gzip), ``.npz``, CIFAR python-pickle batches, the shared CIFAR-10 JPEG
archive (decoded once and cached as ``.npy``) and image-folder trees.

Every failure is a :class:`~pwsconv.data.DataError` with a one-line message that names the file.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .core import DataError

__all__ = [
    "read_idx",
    "write_idx",
    "read_npz",
    "read_cifar_batch",
    "read_cifar_meta",
    "decode_jpeg_archive",
    "read_image_folder",
    "default_cache_dir",
    "IMAGE_EXTENSIONS",
]

# IDX type codes → numpy big-endian dtypes
_IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_IDX_CODES = {v.newbyteorder(">") if v.itemsize > 1 else v: k for k, v in _IDX_DTYPES.items()}

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")


def _read_bytes(path: Path) -> bytes:
    """File contents, transparently gunzipped when the file starts with the gzip magic."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except EOFError:
        raise DataError(f"{path}: gzip stream is truncated (the file is incomplete)") from None
    except (gzip.BadGzipFile, zlib.error, OSError) as e:
        raise DataError(f"{path}: corrupt gzip data ({e})") from None


def read_idx(path: str | Path, ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (the MNIST format; ``.gz`` or raw) into a native-endian numpy array.

    Checks the magic (two zero bytes, a known type code, the number of dims), ``ndim`` if given, and that the data
    size matches the header exactly (a truncated or padded file is an error).
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(f"{path}: too short for an IDX header ({len(data)} bytes)")
    if data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: bad IDX magic {data[:4].hex()} (expected 0000 + type code + ndim, e.g. 00000803)")
    nd = data[3]
    if ndim is not None and nd != ndim:
        raise DataError(f"{path}: IDX file has {nd} dimension(s), expected {ndim} "
                        f"({'images' if ndim == 3 else 'labels'})")
    head = 4 + 4 * nd
    if len(data) < head:
        raise DataError(f"{path}: truncated IDX header")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(nd))
    dt = _IDX_DTYPES[data[2]]
    expected = int(np.prod(dims, dtype=np.int64)) * dt.itemsize
    got = len(data) - head
    if got < expected:
        n_complete = got // max(1, expected // max(1, dims[0])) if dims else 0
        raise DataError(f"{path}: truncated: header says {dims} ({expected} data bytes) but only {got} bytes follow "
                        f"({n_complete} complete items)")
    if got > expected:
        raise DataError(f"{path}: {got - expected} unexpected bytes after the {dims} data declared in the header")
    arr = np.frombuffer(data, dtype=dt, count=expected // dt.itemsize, offset=head).reshape(dims)
    return arr.astype(dt.newbyteorder("=")) if dt.itemsize > 1 else arr.copy()


def write_idx(path: str | Path, array: np.ndarray, *, compress: bool | None = None) -> Path:
    """Write ``array`` in IDX format (gzip if ``compress`` or the name ends in ``.gz``). Used by tests and tools."""
    path = Path(path)
    arr = np.asarray(array)
    key = arr.dtype.newbyteorder(">") if arr.dtype.itemsize > 1 else arr.dtype
    if key not in _IDX_CODES:
        raise ValueError(f"IDX cannot store dtype {arr.dtype}")
    payload = bytes([0, 0, _IDX_CODES[key], arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    payload += arr.astype(key).tobytes()
    if compress or (compress is None and path.suffix == ".gz"):
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` file (no pickle: object arrays are an error)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: not an .npz archive (a single .npy array)")
        with z:
            return {k: z[k] for k in z.files}
    except DataError:
        raise
    except (zipfile.BadZipFile, EOFError, zlib.error) as e:
        raise DataError(f"{path}: corrupt or truncated .npz ({e})") from None
    except ValueError as e:  # object arrays (allow_pickle=False), bad headers, short reads
        raise DataError(f"{path}: malformed .npz ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read .npz ({e})") from None


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only (CIFAR batches hold nothing else), never arbitrary code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):  # numpy ≥ 2: skip the deprecated alias
            module = "numpy._core." + module[len("numpy.core."):]
        return super().find_class(module, name)


def _unpickle(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with open(path, "rb") as f:
            return _SafeUnpickler(f, encoding="bytes").load()
    except EOFError:
        raise DataError(f"{path}: truncated pickle (the file is incomplete)") from None
    except (pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a valid CIFAR python batch ({type(e).__name__}: {e})") from None


def _get(d: dict, *keys: str) -> Any:
    for k in keys:
        for kk in (k, k.encode()):
            if kk in d:
                return d[kk]
    return None


def read_cifar_batch(path: str | Path, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python batch (``data_batch_1`` … ``test_batch``): ``(x uint8 [N, 3, 32, 32], y int64 [N])``."""
    path = Path(path)
    d = _unpickle(path)
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a dict with 'data' and 'labels', got {type(d).__name__}")
    data = _get(d, "data")
    labels = _get(d, "labels", "fine_labels")
    if data is None or labels is None:
        keys = sorted(k.decode() if isinstance(k, bytes) else str(k) for k in d)
        raise DataError(f"{path}: missing 'data' or 'labels' key (has {keys})")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' must be uint8 [N, 3072], got {data.dtype} {data.shape}")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise DataError(f"{path}: 'labels' are not integers") from None
    if y.ndim != 1 or len(y) != len(data):
        raise DataError(f"{path}: {len(data)} images but labels of shape {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"{path}: labels out of range 0..{num_classes - 1} (found {y.min()}..{y.max()})")
    return data.reshape(-1, 3, 32, 32), y


def read_cifar_meta(path: str | Path) -> list[str] | None:
    """Class names from ``batches.meta`` (None if the file is absent)."""
    path = Path(path)
    if not path.is_file():
        return None
    d = _unpickle(path)
    names = _get(d, "label_names", "fine_label_names") if isinstance(d, dict) else None
    if names is None:
        return None
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def default_cache_dir() -> Path:
    """``$PWSCONV_CACHE`` or ``~/.cache/pwsconv``."""
    env = os.environ.get("PWSCONV_CACHE")
    return Path(env).expanduser() if env else Path("~/.cache/pwsconv").expanduser()


def _decode_one(buf: np.ndarray, i: int, path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(buf.tobytes())) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: image {i} is not a decodable JPEG ({e})") from None


def decode_jpeg_archive(path: str | Path, *, cache_dir: str | Path | None | bool = None,
                        limit: int | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Decode an archive of concatenated JPEG files (keys ``jpeg`` uint8 [B], ``offsets`` int64 [N+1], ``y``;
    the shared ``cifar10_train_jpeg_bytes.npz``) into ``x`` uint8 ``[N, H, W, 3]``, with the archive's other arrays.

    The full decode (≈ 6 s for CIFAR-10 train on one core) is cached as ``<cache_dir>/<stem>-<md5>.npy``
    (``cache_dir`` default :func:`default_cache_dir`; ``False`` disables the cache) and later loads read the
    ``.npy``. With ``limit`` and no cache yet, only the first ``limit`` images are decoded (and nothing is cached).

    The cache is trusted only if it matches the SHA-256 of its bytes recorded beside it (``<cache>.npy.sha256``,
    the format of ``sha256sum``): a damaged cache (zeroed pixels, truncated, replaced) or one without a checksum is
    decoded again in full and rewritten, with one warning, even under ``limit``.
    """
    path = Path(path)
    arrays = read_npz(path)
    for key in ("jpeg", "offsets"):
        if key not in arrays:
            raise DataError(f"{path}: missing key {key!r} (has {sorted(arrays)})")
    buf, offsets = arrays.pop("jpeg"), arrays.pop("offsets")
    if buf.dtype != np.uint8 or buf.ndim != 1:
        raise DataError(f"{path}: 'jpeg' must be a 1-D uint8 byte array, got {buf.dtype} {buf.shape}")
    if offsets.ndim != 1 or not np.issubdtype(offsets.dtype, np.integer) or len(offsets) < 2:
        raise DataError(f"{path}: 'offsets' must be 1-D integers [N+1], got {offsets.dtype} {offsets.shape}")
    if offsets[0] != 0 or offsets[-1] != len(buf) or np.any(np.diff(offsets) <= 0):
        raise DataError(f"{path}: 'offsets' must rise strictly from 0 to len(jpeg) = {len(buf)}")
    n = len(offsets) - 1
    cache_file = None
    rebuild = False   # a cache that failed its check: decoded in full and rewritten, whatever the limit
    if cache_dir is not False:
        digest = hashlib.md5(buf.data).hexdigest()[:16]
        cache_file = Path(cache_dir or default_cache_dir()).expanduser() / f"{path.stem}-{digest}.npy"
        if cache_file.is_file():
            problem = _cache_problem(cache_file)
            if problem is None:
                try:
                    x = np.load(cache_file, mmap_mode="r" if limit is not None and limit < n else None)
                    if x.dtype == np.uint8 and x.ndim == 4 and len(x) == n:
                        return (np.array(x[:limit]) if limit is not None else x), arrays
                    problem = f"holds {x.dtype} {x.shape}, not {n} uint8 images"
                except (OSError, ValueError, EOFError) as e:
                    problem = f"cannot be read ({type(e).__name__})"
            warnings.warn(f"the decode cache {cache_file} {problem}; decoding {path.name} again in full and "
                          "rewriting it", stacklevel=3)
            rebuild = True
    count = n if limit is None or rebuild else max(0, min(n, int(limit)))
    first = _decode_one(buf[offsets[0]:offsets[1]], 0, path)
    x = np.empty((count,) + first.shape, dtype=np.uint8)
    for i in range(count):
        img = first if i == 0 else _decode_one(buf[offsets[i]:offsets[i + 1]], i, path)
        if img.shape != first.shape:
            raise DataError(f"{path}: image {i} has shape {img.shape}, image 0 has {first.shape}")
        x[i] = img
    if cache_file is not None and count == n:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f"{cache_file.stem}.{os.getpid()}.tmp.npy")
            np.save(tmp, x)
            line = f"{_sha256_file(tmp)}  {cache_file.name}\n"
            os.replace(tmp, cache_file)   # a crash between the two replaces leaves a mismatch: rebuilt next time
            sums = _checksum_file(cache_file)
            tmp_sums = sums.with_name(f"{sums.name}.{os.getpid()}.tmp")
            tmp_sums.write_text(line, encoding="ascii")
            os.replace(tmp_sums, sums)
        except OSError as e:
            warnings.warn(f"could not write the decode cache {cache_file} ({e}); the next load decodes again",
                          stacklevel=3)
    if limit is not None and count > limit:
        x = x[:max(0, int(limit))].copy()   # not a view that keeps the full decode alive
    return x, arrays


def _checksum_file(cache_file: Path) -> Path:
    return cache_file.with_name(cache_file.name + ".sha256")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _cache_problem(cache_file: Path) -> str | None:
    """None if ``cache_file`` matches the SHA-256 recorded beside it; else what is wrong."""
    sums = _checksum_file(cache_file)
    try:
        recorded = sums.read_text(encoding="ascii").split()[0].lower()
    except FileNotFoundError:
        return f"has no checksum file {sums.name} (written by an older pwsconv, or interrupted)"
    except (OSError, UnicodeDecodeError, IndexError):
        return f"has an unreadable checksum file {sums.name}"
    try:
        actual = _sha256_file(cache_file)
    except OSError as e:
        return f"cannot be read ({e.strerror or type(e).__name__})"
    if actual != recorded:
        return "does not match its checksum (damaged or changed since it was written)"
    return None


def _find_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def read_image_folder(folder: str | Path, classes: Sequence[str] | None = None,
                      size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """An ImageFolder split ``folder/<class>/*.jpg|png…`` read into memory: ``(x uint8 [N, H, W, C], y, classes)``.

    ``classes``: the class list to use (e.g. the train split's; an unknown class directory is an error); default
    the sorted sub-directory names. ``size``: ``(H, W)`` to resize every image to (bilinear); without it all images
    must have the same size. Images are RGB, or one channel when every image is grayscale.
    """
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: directory not found")
    dirs = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not dirs:
        raise DataError(f"{folder}: no class sub-directories (expected {folder}/<class>/<image files>)")
    if classes is None:
        classes = dirs
    unknown = [d for d in dirs if d not in classes]
    if unknown:
        raise DataError(f"{folder}: class directories {unknown} are not among the training classes")
    index = {c: i for i, c in enumerate(classes)}
    files: list[tuple[Path, int]] = []
    for d in dirs:
        files += [(p, index[d]) for p in _find_images(folder / d)]
    if not files:
        raise DataError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    images: list[np.ndarray] = []
    modes: set[str] = set()
    for p, _ in files:
        try:
            with Image.open(p) as im:
                im.load()
                gray = im.mode in ("1", "L", "I;16", "I", "F")
                modes.add("L" if gray else "RGB")
                im = im.convert("L" if gray else "RGB")
                if size is not None and im.size != (size[1], size[0]):
                    im = im.resize((size[1], size[0]), Image.BILINEAR)
                images.append(np.asarray(im))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise DataError(f"{p}: cannot read image ({e})") from None
    rgb = "RGB" in modes
    out = []
    shape0 = images[0].shape[:2]
    for (p, _), a in zip(files, images):
        if a.shape[:2] != shape0:
            raise DataError(f"{p}: size {a.shape[1]}x{a.shape[0]} differs from {shape0[1]}x{shape0[0]}; "
                            f"pass image_size= to resize")
        if rgb and a.ndim == 2:
            a = np.repeat(a[:, :, None], 3, axis=2)
        out.append(a)
    x = np.stack(out)
    y = np.array([lab for _, lab in files], dtype=np.int64)
    return x, y, list(classes)
