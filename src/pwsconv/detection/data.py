"""Detection data: Pascal VOC (VOCdevkit layout) and COCO (instances json) through torchvision's datasets, SSD's
augmentation and the R-CNN one (``transforms.v2``), batched by :class:`pwsconv.data.streaming.SeededBatchLoader`
(worker processes, per-(seed, epoch) order and augmentation, torchrun sharding, mid-epoch resume).

    train = voc_dataset("data/", [("2007", "trainval"), ("2012", "trainval")], train=True)   # 07+12 trainval
    test = voc_dataset("data/", [("2007", "test")], train=False)                              # 07 test
    loader = DetectionLoader(train, ssd_train_transform(), 32, train=True, num_workers=8)
    for images, targets in loader: ...   # lists: float [3, H, W] in 0..1; {"boxes" xyxy, "labels", ...}

Labels: VOC 1..20 (0 is the background, as torchvision's detectors count; ``num_classes`` = 21); COCO its category ids
(1..90, ``num_classes`` = 91). VOC objects marked ``difficult`` are dropped from training targets and kept (flagged)
for evaluation, where they are ignored as in the VOC07 protocol.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from ..data.core import DataError
from ..data.streaming import SeededBatchLoader

__all__ = ["VOC_CLASSES", "VOCSet", "voc_dataset", "coco_dataset", "ssd_train_transform", "rcnn_train_transform",
           "eval_transform", "DetectionLoader", "num_classes_of"]

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")


def _v2() -> Any:
    try:
        from torchvision.transforms import v2
    except ImportError:
        raise DataError("detection data needs torchvision: pip install -e '.[detection]'") from None
    return v2


# ------------------------------------------------------------------------------------------------------- VOC
class VOCSet(torch.utils.data.Dataset):
    """VOC images and targets from one or more ``(year, image_set)`` of a VOCdevkit, read by
    ``torchvision.datasets.VOCDetection``. Item → ``(PIL image, {"boxes": BoundingBoxes xyxy, "labels",
    "difficult", "image_id"})``; ``train=True`` drops difficult objects."""

    def __init__(self, root: str | os.PathLike, sets: Sequence[tuple[str, str]], *, train: bool,
                 classes: Sequence[str] = VOC_CLASSES) -> None:
        try:
            from torchvision.datasets import VOCDetection
        except ImportError:
            raise DataError("VOC needs torchvision: pip install -e '.[detection]'") from None
        root = Path(root).expanduser()
        if (root / "VOCdevkit").is_dir() is False and root.name == "VOCdevkit":
            root = root.parent
        self.parts = []
        for year, image_set in sets:
            base = root / "VOCdevkit" / f"VOC{year}"
            if not (base / "ImageSets" / "Main" / f"{image_set}.txt").is_file():
                raise DataError(f"{base}: no ImageSets/Main/{image_set}.txt (expected the VOCdevkit layout: "
                                f"{root}/VOCdevkit/VOC{year}/{{JPEGImages,Annotations,ImageSets}})")
            try:
                self.parts.append(VOCDetection(str(root), year=str(year), image_set=image_set, download=False))
            except (RuntimeError, ValueError) as e:
                raise DataError(f"{base}: {' '.join(str(e).split())}") from None
        self.offsets = [0]
        for p in self.parts:
            self.offsets.append(self.offsets[-1] + len(p))
        self.train = train
        self.classes = tuple(classes)
        self._cls = {c: i + 1 for i, c in enumerate(self.classes)}
        self.sets = [tuple(s) for s in sets]

    def __len__(self) -> int:
        return self.offsets[-1]

    def _locate(self, i: int) -> tuple[Any, int]:
        for k, p in enumerate(self.parts):
            if i < self.offsets[k + 1]:
                return p, i - self.offsets[k]
        raise IndexError(i)

    def annotation(self, i: int) -> dict[str, Any]:
        """The parsed XML of image ``i`` (without reading the image): width, height, objects."""
        import xml.etree.ElementTree as ET

        part, j = self._locate(i)
        ann = part.parse_voc_xml(ET.parse(part.annotations[j]).getroot())["annotation"]
        objs = ann.get("object", [])
        objs = objs if isinstance(objs, list) else [objs]
        boxes, labels, difficult = [], [], []
        for o in objs:
            name = o["name"].strip()
            if name not in self._cls:
                raise DataError(f"{part.annotations[j]}: unknown class {name!r} (classes: {', '.join(self.classes)})")
            b = o["bndbox"]
            # VOC boxes are 1-based inclusive pixel indices → 0-based continuous xyxy
            boxes.append([float(b["xmin"]) - 1, float(b["ymin"]) - 1, float(b["xmax"]), float(b["ymax"])])
            labels.append(self._cls[name])
            difficult.append(int(o.get("difficult", 0)) == 1)
        size = ann["size"]
        return {"width": int(size["width"]), "height": int(size["height"]), "boxes": boxes, "labels": labels,
                "difficult": difficult, "file": part.images[j]}

    def __getitem__(self, i: int) -> tuple[Any, dict[str, Any]]:
        from PIL import Image
        from torchvision import tv_tensors

        a = self.annotation(i)
        with Image.open(a["file"]) as im:
            img = im.convert("RGB")
        boxes = torch.tensor(a["boxes"], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor(a["labels"], dtype=torch.int64)
        diff = torch.tensor(a["difficult"], dtype=torch.bool)
        if self.train:
            boxes, labels, diff = boxes[~diff], labels[~diff], diff[~diff]
        target = {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(img.height, img.width)),
                  "labels": labels, "image_id": i}
        if not self.train:
            target["difficult"] = diff
        return img, target


def voc_dataset(root: str | os.PathLike, sets: Sequence[tuple[str, str]] | str = "07+12", *, train: bool,
                classes: Sequence[str] = VOC_CLASSES) -> VOCSet:
    """VOC ``sets``: "07+12" (2007 + 2012 trainval, 16,551 images), "07test" (2007 test, 4,952), or a list of
    ``(year, image_set)``."""
    if sets == "07+12":
        sets = [("2007", "trainval"), ("2012", "trainval")]
    elif sets == "07test":
        sets = [("2007", "test")]
    elif isinstance(sets, str):
        raise DataError(f"unknown VOC sets {sets!r}; use '07+12', '07test' or a list of (year, image_set)")
    return VOCSet(root, list(sets), train=train, classes=classes)


# ------------------------------------------------------------------------------------------------------ COCO
class COCOSet(torch.utils.data.Dataset):
    """COCO ``split`` (e.g. "train2017") of ``root`` (``root/<split>/*.jpg``, ``root/annotations/instances_<split>
    .json``) through ``torchvision.datasets.CocoDetection`` + ``wrap_dataset_for_transforms_v2`` (boxes, labels = category
    ids, masks from the polygons/RLE, image_id). ``train=True`` drops images without annotations (as torchvision's
    references do) and crowd annotations."""

    def __init__(self, root: str | os.PathLike, split: str, *, train: bool, masks: bool = False) -> None:
        try:
            from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
        except ImportError:
            raise DataError("COCO needs torchvision: pip install -e '.[detection]'") from None
        root = Path(root).expanduser()
        ann = root / "annotations" / f"instances_{split}.json"
        img_dir = root / split
        if not ann.is_file() or not img_dir.is_dir():
            raise DataError(f"{root}: expected {split}/ and annotations/instances_{split}.json (the COCO layout)")
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):   # pycocotools prints progress
            try:
                base = CocoDetection(str(img_dir), str(ann))
            except (ValueError, KeyError, OSError) as e:
                raise DataError(f"{ann}: cannot be read ({type(e).__name__}: {' '.join(str(e).split())})") from None
        self.coco = base.coco
        keys = {"boxes", "labels", "image_id"} | ({"masks"} if masks else set())
        self.ds = wrap_dataset_for_transforms_v2(base, target_keys=keys)
        self.train = train
        self.ids = list(base.ids)
        if train:
            keep = [k for k, img_id in enumerate(self.ids)
                    if any(not a.get("iscrowd", 0) for a in self.coco.imgToAnns.get(img_id, []))]
        else:
            keep = list(range(len(self.ids)))
        self.keep = keep
        self.cat_ids = sorted(self.coco.getCatIds())
        self.masks = masks

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, i: int) -> tuple[Any, dict[str, Any]]:
        from torchvision import tv_tensors

        img, target = self.ds[self.keep[i]]
        img_id = self.ids[self.keep[i]]
        if "boxes" not in target:   # an image without annotations (evaluation only)
            h, w = img.height, img.width
            target = {"boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(h, w)),
                      "labels": torch.zeros(0, dtype=torch.int64)}
            if self.masks:
                target["masks"] = tv_tensors.Mask(torch.zeros(0, h, w, dtype=torch.uint8))
        if self.train:
            anns = self.coco.imgToAnns.get(img_id, [])
            crowd = torch.tensor([bool(a.get("iscrowd", 0)) for a in anns], dtype=torch.bool)
            if crowd.numel() == len(target["labels"]) and crowd.any():
                target = {k: (v[~crowd] if k in ("boxes", "labels", "masks") else v) for k, v in target.items()}
        target["image_id"] = img_id
        return img, target


def coco_dataset(root: str | os.PathLike, split: str = "train2017", *, train: bool, masks: bool = False) -> COCOSet:
    return COCOSet(root, split, train=train, masks=masks)


def num_classes_of(ds: Any) -> int:
    """torchvision's ``num_classes`` (background included) for a VOC or COCO set."""
    if isinstance(ds, VOCSet):
        return len(ds.classes) + 1
    return int(max(ds.cat_ids)) + 1 if ds.cat_ids else 2


# ------------------------------------------------------------------------------------------------ transforms
def ssd_train_transform() -> Any:
    """SSD's augmentation (Liu et al. 2016; torchvision's reference recipe): photometric distortion, zoom out
    (mean-filled canvas up to 4×), IoU crop, horizontal flip; then 0..1 floats and degenerate boxes removed. The
    model resizes to its input size."""
    v2 = _v2()
    from collections import defaultdict

    from torchvision import tv_tensors

    return v2.Compose([
        v2.ToImage(),
        v2.RandomPhotometricDistort(p=1.0),
        v2.RandomZoomOut(fill=defaultdict(lambda: 0, {tv_tensors.Image: (123, 117, 104)})),
        v2.RandomIoUCrop(),
        v2.RandomHorizontalFlip(p=0.5),
        v2.ToDtype(torch.float32, scale=True),
        v2.SanitizeBoundingBoxes(),
        v2.ToPureTensor(),
    ])


def rcnn_train_transform() -> Any:
    """Mask / Faster R-CNN training (torchvision / mmdetection default): horizontal flip only."""
    v2 = _v2()
    return v2.Compose([v2.ToImage(), v2.RandomHorizontalFlip(p=0.5), v2.ToDtype(torch.float32, scale=True),
                       v2.SanitizeBoundingBoxes(), v2.ToPureTensor()])


def eval_transform() -> Any:
    v2 = _v2()
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.ToPureTensor()])


# ------------------------------------------------------------------------------------------------------ loader
class _Seeded(torch.utils.data.Dataset):
    """Item ``(index, seed)`` → the transformed ``(image, target)``; the augmentation's randomness comes from ``seed``
    (so it does not depend on which worker process decodes the item)."""

    def __init__(self, ds: Any, transform: Any) -> None:
        self.ds, self.transform = ds, transform

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, dict[str, Any]]:
        idx, seed = key
        img, target = self.ds[idx]
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            img, target = self.transform(img, target)
        finally:
            torch.random.set_rng_state(state)
        return img, target


def _collate(items: list[tuple[Tensor, dict[str, Any]]]) -> tuple[list[Tensor], list[dict[str, Any]]]:
    return [x for x, _ in items], [t for _, t in items]


class DetectionLoader(SeededBatchLoader):
    """Batches ``(images, targets)`` (lists, on ``device``) of a detection set with a ``transforms.v2``
    ``transform``; ``batch_size`` is the global batch (each torchrun process gets its share)."""

    def __init__(self, ds: Any, transform: Any, batch_size: int, *, train: bool, num_workers: int = 4, seed: int = 0,
                 device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1,
                 drop_last: bool | None = None) -> None:
        self.device = torch.device(device)
        self.ds = ds
        super().__init__(_Seeded(ds, transform), batch_size, shuffle=train,
                         drop_last=train if drop_last is None else drop_last, num_workers=num_workers, seed=seed,
                         rank=rank, world_size=world_size, collate_fn=_collate,
                         pin_memory=False, prefetch_factor=2)

    def finish(self, batch: tuple[list[Tensor], list[dict[str, Any]]]) -> tuple[list[Tensor], list[dict[str, Any]]]:
        images, targets = batch
        dev = self.device
        images = [x.to(dev, non_blocking=True) for x in images]
        targets = [{k: (v.to(dev, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in t.items()}
                   for t in targets]
        return images, targets
