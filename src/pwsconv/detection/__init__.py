"""Object detection with PWS (the paper's Tables 1–3): torchvision's SSD and Mask/Faster R-CNN with the backbone
converted by :func:`pwsconv.convert`, Pascal VOC and COCO through torchvision's datasets, SSD's augmentation
(``transforms.v2``), VOC07 / COCO mAP from pycocotools, and a resumable, DDP-capable training loop.

Needs the ``detection`` extra (``pip install -e ".[detection]"``: torchvision, pycocotools). Modules:
:mod:`~pwsconv.detection.models`, :mod:`~pwsconv.detection.data`, :mod:`~pwsconv.detection.evaluate`,
:mod:`~pwsconv.detection.train`, :mod:`~pwsconv.detection.synthetic` (small real-pixel sets for tests).
"""

from .models import DETECTORS, DetectorError, backbone_of, build_detector

__all__ = ["DETECTORS", "DetectorError", "build_detector", "backbone_of"]
