"""Detection mAP from pycocotools: COCO AP / AP50 / AP75 (bbox and segm) for Table 3, and the VOC07 11-point mAP
at IoU 0.5 for Tables 1–2.

VOC07 through pycocotools: the ground truth becomes a COCO object (one category per VOC class, ``difficult`` objects
as ``iscrowd`` so that detections on them are neither true nor false positives), ``COCOeval`` matches at IoU 0.5 with
one area range and no cap below the detector's own (``maxDets`` = 1000), and the 11-point AP of each class is the mean
of its interpolated precision at recall 0, 0.1, …, 1 — pycocotools' precision at a recall threshold *is* the maximum
precision at recall ≥ that threshold, the VOC07 definition. The differences from the VOC devkit's ``voc_eval`` are
pycocotools' box convention (continuous coordinates, no +1 on widths) and that a detection matching a difficult object
is ignored by intersection-over-detection-area rather than IoU; both change mAP by well under a point.
"""

from __future__ import annotations

import contextlib
import io
import math
from typing import Any, Iterable, Sequence

import numpy as np
import torch

__all__ = ["coco_gt_from_voc", "collect_detections", "coco_metrics", "voc07_map", "evaluate_detector"]


def _coco() -> Any:
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        from ..data.core import DataError

        raise DataError("detection mAP needs pycocotools: pip install -e '.[detection]'") from None
    return COCO, COCOeval


def coco_gt_from_voc(ds: Any) -> Any:
    """A pycocotools ``COCO`` ground truth of a :class:`~pwsconv.detection.data.VOCSet` (read from its XML only)."""
    COCO, _ = _coco()
    images, anns = [], []
    for i in range(len(ds)):
        a = ds.annotation(i)
        images.append({"id": i, "width": a["width"], "height": a["height"]})
        for b, lab, dif in zip(a["boxes"], a["labels"], a["difficult"]):
            w, h = b[2] - b[0], b[3] - b[1]
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(lab), "bbox": [b[0], b[1], w, h],
                         "area": float(w * h), "iscrowd": int(dif), "ignore": int(dif)})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns,
                  "categories": [{"id": k + 1, "name": c} for k, c in enumerate(ds.classes)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


@torch.no_grad()
def collect_detections(model: torch.nn.Module, loader: Iterable, *, masks: bool = False,
                       progress: bool = False) -> list[dict[str, Any]]:
    """COCO-format results (``image_id``, ``category_id``, ``bbox`` xywh in original pixels, ``score``, and
    ``segmentation`` RLE where ``masks``) of ``model`` over ``loader`` (eval mode; the mode is restored)."""
    was = model.training
    model.eval()
    out: list[dict[str, Any]] = []
    if masks:
        from pycocotools import mask as mask_utils
    it = loader
    if progress:
        try:
            from tqdm.auto import tqdm

            it = tqdm(loader, total=len(loader), leave=False, desc="eval")
        except ImportError:
            pass
    try:
        for images, targets in it:
            preds = model(images)
            for p, t in zip(preds, targets):
                img_id = int(t["image_id"])
                boxes = p["boxes"].float().cpu()
                scores, labels = p["scores"].float().cpu().tolist(), p["labels"].cpu().tolist()
                xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
                rles = None
                if masks and "masks" in p:
                    m = (p["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
                    rles = mask_utils.encode(np.asfortranarray(m.transpose(1, 2, 0))) if len(m) else []
                for k in range(len(scores)):
                    r = {"image_id": img_id, "category_id": int(labels[k]), "bbox": [round(v, 3) for v in xywh[k]],
                         "score": round(float(scores[k]), 5)}
                    if rles is not None:
                        rle = dict(rles[k])
                        rle["counts"] = rle["counts"].decode("ascii")
                        r["segmentation"] = rle
                    out.append(r)
    finally:
        model.train(was)
    return out


def _run_eval(gt: Any, dets: list[dict[str, Any]], iou_type: str, setup=None) -> Any:
    _, COCOeval = _coco()
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(dets)
        E = COCOeval(gt, dt, iou_type)
        if setup is not None:
            setup(E.params)
        E.evaluate()
        E.accumulate()
        if setup is None:
            E.summarize()
    return E


def coco_metrics(gt: Any, dets: list[dict[str, Any]], iou_types: Sequence[str] = ("bbox",)) -> dict[str, float]:
    """COCO AP (IoU .50:.95), AP50, AP75 (and APs/APm/APl) in %, per iou type: keys ``AP``, ``AP50``, … for bbox,
    ``segm_AP``, … for segm. No detections: 0."""
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    res: dict[str, float] = {}
    for t in iou_types:
        prefix = "" if t == "bbox" else f"{t}_"
        if not dets:
            res.update({prefix + n: 0.0 for n in names})
            continue
        E = _run_eval(gt, dets, t)
        for n, v in zip(names, E.stats[:6]):
            res[prefix + n] = float(v) * 100 if v >= 0 else math.nan
    return res


def voc07_map(gt: Any, dets: list[dict[str, Any]]) -> dict[str, Any]:
    """VOC07 11-point mAP at IoU 0.5 (%), per-class APs, and the 101-point AP50 (%)."""
    cats = sorted(gt.getCatIds())
    names = {c["id"]: c["name"] for c in gt.loadCats(cats)}
    if not dets:
        return {"mAP": 0.0, "AP50_101": 0.0, "per_class": {names[c]: 0.0 for c in cats}}

    def setup(p: Any) -> None:
        p.iouThrs = np.array([0.5])
        p.areaRng, p.areaRngLbl = [[0.0, 1e10]], ["all"]
        p.maxDets = [1000]

    E = _run_eval(gt, dets, "bbox", setup)
    prec = E.eval["precision"][0, :, :, 0, 0]          # [101 recall thresholds, K]
    per, ap101 = {}, []
    for k, c in enumerate(E.params.catIds):
        col = prec[:, k]
        if (col < 0).all():                              # no ground truth of this class
            continue
        col = np.where(col < 0, 0.0, col)
        per[names[c]] = float(col[::10].mean() * 100)    # recall 0, 0.1, …, 1.0
        ap101.append(float(col.mean() * 100))
    return {"mAP": float(np.mean(list(per.values()))) if per else math.nan,
            "AP50_101": float(np.mean(ap101)) if ap101 else math.nan, "per_class": per}


def evaluate_detector(model: torch.nn.Module, loader: Any, gt: Any, *, protocol: str, masks: bool = False,
                      progress: bool = False) -> dict[str, Any]:
    """mAP of ``model`` on ``loader``'s set: ``protocol`` "voc07" → ``mAP`` (+ ``AP50_101``, ``per_class``), "coco"
    → ``AP``/``AP50``/``AP75``/… (+ ``segm_*`` with ``masks``). Under torch.distributed each process detects its
    shard and rank 0 evaluates all; every process returns the metrics."""
    dets = collect_detections(model, loader, masks=masks, progress=progress)
    dist = torch.distributed.is_available() and torch.distributed.is_initialized() and \
        getattr(loader, "world_size", 1) > 1
    if dist:
        parts: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, dets)
        dets = [d for p in parts for d in p]
    res: dict[str, Any] = {}
    if not dist or torch.distributed.get_rank() == 0:
        if protocol == "voc07":
            res = voc07_map(gt, dets)
        elif protocol == "coco":
            res = coco_metrics(gt, dets, ("bbox", "segm") if masks else ("bbox",))
        else:
            raise ValueError(f"unknown protocol {protocol!r}; use 'voc07' or 'coco'")
    if dist:
        box = [res]
        torch.distributed.broadcast_object_list(box, src=0)
        res = box[0]
    res["detections"] = len(dets)
    return res
