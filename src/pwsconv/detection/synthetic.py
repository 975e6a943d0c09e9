"""Small real-pixel detection sets for CPU tests and the smoke presets: MNIST digits pasted (in colour, alpha = the
digit's ink) on CIFAR-10 photographs, written as a **VOCdevkit** (JPEG + VOC XML, VOC2007 trainval/test and VOC2012
trainval) and as **COCO** (train2017/val2017 + instances json with boxes and RLE masks from the digits' pixels), so
the real readers, transforms, models and evaluator run on them unchanged.

    make_detection_set("data/synth", n_train=400, n_test=100, canvas=96)
    # data/synth/VOCdevkit/VOC2007/..., data/synth/VOCdevkit/VOC2012/..., data/synth/coco/{train2017,val2017,annotations}

Classes: the ten digits, named ``digit0`` … ``digit9`` (VOC labels 1..10, COCO category ids 1..10).
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..data.core import DataError

__all__ = ["DIGIT_CLASSES", "make_detection_set", "shared_sources"]

DIGIT_CLASSES = tuple(f"digit{i}" for i in range(10))


def shared_sources(data_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """The MNIST test images/labels and CIFAR-10 test images the sets are made of (``$PWSCONV_DATA`` or the shared
    data directory); a one-line :class:`DataError` when missing."""
    cands = [Path(data_dir)] if data_dir else []
    if os.environ.get("PWSCONV_DATA"):
        cands.append(Path(os.environ["PWSCONV_DATA"]))
    cands += [Path.cwd() / ".." / "shared" / "data", Path.cwd() / "shared" / "data", Path("/work/shared/data")]
    for c in cands:
        files = {"mnist_x": c / "mnist" / "t10k-images-idx3-ubyte.gz", "mnist_y": c / "mnist" / "t10k-labels-idx1-ubyte.gz",
                 "cifar": c / "cifar10" / "cifar10_test_from_jpeg.npz"}
        if all(p.is_file() for p in files.values()):
            return files
    raise DataError("the synthetic detection set needs mnist/t10k-images-idx3-ubyte.gz, mnist/t10k-labels-idx1-ubyte.gz "
                    "and cifar10/cifar10_test_from_jpeg.npz under a data directory (pass data_dir= or set "
                    f"PWSCONV_DATA; looked in {', '.join(str(c) for c in cands)})")


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _render(rng: np.random.Generator, digits: np.ndarray, dlabels: np.ndarray, backgrounds: np.ndarray, canvas: int,
            max_objects: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    from PIL import Image

    bg = backgrounds[rng.integers(len(backgrounds))]
    img = np.asarray(Image.fromarray(bg).resize((canvas, canvas), Image.BILINEAR), dtype=np.float32)
    img = img * 0.6   # darker photographs, so light digits stand out
    objs: list[dict[str, Any]] = []
    occupied = np.zeros((canvas, canvas), bool)
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(20):
            s = int(rng.integers(int(canvas * 0.25), int(canvas * 0.5) + 1))
            y0, x0 = int(rng.integers(0, canvas - s + 1)), int(rng.integers(0, canvas - s + 1))
            if not occupied[y0:y0 + s, x0:x0 + s].any():
                break
        else:
            continue
        k = int(rng.integers(len(digits)))
        alpha = np.asarray(Image.fromarray(digits[k]).resize((s, s), Image.BILINEAR), dtype=np.float32) / 255.0
        colour = rng.uniform(150, 255, size=3).astype(np.float32)
        region = img[y0:y0 + s, x0:x0 + s]
        img[y0:y0 + s, x0:x0 + s] = region * (1 - alpha[..., None]) + colour * alpha[..., None]
        mask = np.zeros((canvas, canvas), np.uint8)
        mask[y0:y0 + s, x0:x0 + s] = alpha > 0.5
        ys, xs = np.nonzero(mask)
        if len(ys) == 0:
            continue
        occupied[y0:y0 + s, x0:x0 + s] = True
        objs.append({"label": int(dlabels[k]), "box": [int(xs.min()), int(ys.min()), int(xs.max()) + 1,
                                                      int(ys.max()) + 1], "mask": mask})
    return np.clip(img, 0, 255).astype(np.uint8), objs


def _voc_xml(name: str, canvas: int, objs: list[dict[str, Any]]) -> str:
    parts = [f"<annotation><folder>VOC</folder><filename>{name}.jpg</filename>"
             f"<size><width>{canvas}</width><height>{canvas}</height><depth>3</depth></size><segmented>0</segmented>"]
    for o in objs:
        x0, y0, x1, y1 = o["box"]
        parts.append(f"<object><name>{DIGIT_CLASSES[o['label']]}</name><pose>Unspecified</pose><truncated>0</truncated>"
                     f"<difficult>0</difficult><bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin><xmax>{x1}</xmax>"
                     f"<ymax>{y1}</ymax></bndbox></object>")
    parts.append("</annotation>")
    return "".join(parts)


def make_detection_set(root: str | os.PathLike, n_train: int = 400, n_test: int = 100, *, canvas: int = 96,
                       max_objects: int = 3, seed: int = 0, data_dir: str | os.PathLike | None = None,
                       quality: int = 92) -> dict[str, Any]:
    """Write the set under ``root`` (idempotent: an existing complete set with the same parameters is kept) and
    return ``{"voc_root", "coco_root", "classes", "n_train", "n_test", "objects"}``. Train images 0..n_train-1 go
    to VOC2007 trainval (first half) and VOC2012 trainval (second half) — so "07+12" is all of them — and to COCO
    train2017; test images to VOC2007 test and COCO val2017. Digits come from the MNIST test set, backgrounds from
    the CIFAR-10 test set (the two halves of each source are disjoint between train and test)."""
    from PIL import Image
    from pycocotools import mask as mask_utils

    root = Path(root)
    params = {"n_train": n_train, "n_test": n_test, "canvas": canvas, "max_objects": max_objects, "seed": seed,
              "version": 1}
    stamp = root / "synthetic.json"
    info = {"voc_root": str(root), "coco_root": str(root / "coco"), "classes": list(DIGIT_CLASSES),
            "n_train": n_train, "n_test": n_test}
    if stamp.is_file():
        old = json.loads(stamp.read_text())
        if old.get("params") == params:
            return {**info, "objects": old["objects"]}
    src = shared_sources(data_dir)
    mx, my = _idx(src["mnist_x"]), _idx(src["mnist_y"]).astype(np.int64)
    cifar = np.load(src["cifar"])["x"]
    half_m, half_c = len(mx) // 2, len(cifar) // 2
    rng = np.random.default_rng(seed)
    voc07, voc12 = root / "VOCdevkit" / "VOC2007", root / "VOCdevkit" / "VOC2012"
    for v in (voc07, voc12):
        for d in ("JPEGImages", "Annotations", "ImageSets/Main"):
            (v / d).mkdir(parents=True, exist_ok=True)
    coco = root / "coco"
    for d in ("train2017", "val2017", "annotations"):
        (coco / d).mkdir(parents=True, exist_ok=True)
    cats = [{"id": i + 1, "name": c, "supercategory": "digit"} for i, c in enumerate(DIGIT_CLASSES)]
    lists: dict[str, list[str]] = {"07trainval": [], "12trainval": [], "07test": []}
    coco_js = {s: {"images": [], "annotations": [], "categories": cats} for s in ("train2017", "val2017")}
    n_obj = 0
    for k in range(n_train + n_test):
        is_train = k < n_train
        sl_m = slice(0, half_m) if is_train else slice(half_m, None)
        sl_c = slice(0, half_c) if is_train else slice(half_c, None)
        img, objs = _render(rng, mx[sl_m], my[sl_m], cifar[sl_c], canvas, max_objects)
        name = f"{k:06d}"
        voc = voc07 if (not is_train or k < n_train // 2) else voc12
        key = "07test" if not is_train else ("07trainval" if voc is voc07 else "12trainval")
        Image.fromarray(img).save(voc / "JPEGImages" / f"{name}.jpg", quality=quality)
        (voc / "Annotations" / f"{name}.xml").write_text(_voc_xml(name, canvas, objs))
        lists[key].append(name)
        split = "train2017" if is_train else "val2017"
        Image.fromarray(img).save(coco / split / f"{name}.jpg", quality=quality)
        img_id = k + 1
        coco_js[split]["images"].append({"id": img_id, "file_name": f"{name}.jpg", "width": canvas, "height": canvas})
        for o in objs:
            n_obj += 1
            x0, y0, x1, y1 = o["box"]
            rle = mask_utils.encode(np.asfortranarray(o["mask"]))
            rle["counts"] = rle["counts"].decode("ascii")
            coco_js[split]["annotations"].append({
                "id": n_obj, "image_id": img_id, "category_id": o["label"] + 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": float(o["mask"].sum()), "iscrowd": 0, "segmentation": rle})
    (voc07 / "ImageSets/Main/trainval.txt").write_text("\n".join(lists["07trainval"]) + "\n")
    (voc12 / "ImageSets/Main/trainval.txt").write_text("\n".join(lists["12trainval"]) + "\n")
    (voc07 / "ImageSets/Main/test.txt").write_text("\n".join(lists["07test"]) + "\n")
    for split, js in coco_js.items():
        (coco / "annotations" / f"instances_{split}.json").write_text(json.dumps(js))
    stamp.write_text(json.dumps({"params": params, "objects": n_obj}))
    return {**info, "objects": n_obj}
