"""The paper's detectors, from torchvision, with the backbone converted to a normalization method by
:func:`pwsconv.convert`.

    model = build_detector("ssd_vgg16", "pws", num_classes=21, size=320, method_opts={"gamma": 1e-3})
    model = build_detector("maskrcnn_resnet50_fpn", "gn", num_classes=91, weights="resnet50-0676ba61.pth")

==========================  ============================================================================================
``ssd_vgg16``               SSD (torchvision ``SSD`` + ``SSDFeatureExtractorVGG``, the ``ssd300_vgg16`` recipe) at any
                            ``size`` ≥ 268 (the paper: 320), VGG-16 **with a norm after every conv** (``vgg16_bn``
                            features; the fc6/fc7 and extra convs get one too: "the network will collapse … if we do not
                            use BN after every conv layer"), from scratch. Tables 1, 2 and 3 (SSD rows). With IN the
                            norm after conv11_2 (a 1×1 map, where IN is undefined) is left out.
``ssd_resnet50``            SSD on a ResNet-50 (layer2/3/4 + three extra blocks, six feature maps like VGG's), Table 2's
                            ResNet-50 rows; with PWS a LayerNorm on each feature map (the paper's LN-at-output).
``ssd_tiny``                the same SSD head, anchors, loss and post-processing on a four-stage VGG-style backbone of
                            16–64 channels — for CPU tests and the smoke presets (64–128 px inputs).
``maskrcnn_resnet50_fpn``   torchvision Mask R-CNN R-50-FPN (Table 3); ``weights``: a local ImageNet ResNet-50
                            state_dict (torchvision's ``resnet50-*.pth`` format), as the paper starts from a pretrained
                            backbone; none can be downloaded here.
``fasterrcnn_resnet50_fpn`` the same without the mask head.
==========================  ============================================================================================

The conversion covers the backbone only (the paper: "replace all conv layers in the backbone with PWS layer"); heads
and FPN stay as torchvision builds them. Method "bn" keeps BatchNorm (``FrozenBatchNorm2d`` with pretrained weights,
torchvision's and mmdetection's default); every other method replaces it as :func:`pwsconv.convert` does.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Mapping

import torch
from torch import nn

from ..convert import convert
from ..methods import available_methods, get_method

__all__ = ["DETECTORS", "build_detector", "backbone_of", "DetectorError"]

DETECTORS = ("ssd_vgg16", "ssd_resnet50", "ssd_tiny", "maskrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn")


class DetectorError(ValueError):
    """A bad detector name, option or weights file (one-line message)."""


def _tv() -> Any:
    try:
        import torchvision
    except ImportError:
        raise DetectorError("detection needs torchvision: pip install torch==2.14.1 -e '.[detection]' "
                            "(torchvision 0.29.1 needs exactly torch 2.14.1)") from None
    return torchvision


def _norm_after_every_conv(module: nn.Module) -> None:
    """Insert BatchNorm2d after every Conv2d of ``module``'s Sequentials that is not already followed by one."""
    for name, child in list(module.named_children()):
        _norm_after_every_conv(child)
        if isinstance(child, nn.Sequential):
            items, out = list(child), []
            for k, m in enumerate(items):
                out.append(m)
                if isinstance(m, nn.Conv2d) and not (k + 1 < len(items) and isinstance(items[k + 1], nn.BatchNorm2d)):
                    out.append(nn.BatchNorm2d(m.out_channels))
            if len(out) != len(items):
                setattr(module, name, nn.Sequential(*out))


def _convert_backbone(backbone: nn.Module, method: str, method_opts: Mapping[str, Any], copy_weights: bool,
                      exclude: tuple[str, ...] = ()) -> nn.Module:
    m = get_method(method.lower())
    if m.keeps_batchnorm:   # the backbone is built with (frozen) BatchNorm already
        return backbone
    return convert(backbone, m, copy_weights=copy_weights, exclude=exclude, **dict(method_opts))


def _anchors(n_maps: int, size: int) -> Any:
    from torchvision.models.detection.anchor_utils import DefaultBoxGenerator

    ratios = [[2], [2, 3], [2, 3], [2, 3], [2], [2]][:n_maps]
    scales = [0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05] if n_maps == 6 else \
        [round(0.1 + k * 0.8 / (n_maps - 1), 4) for k in range(n_maps)] + [1.05]
    return DefaultBoxGenerator(ratios, scales=scales)   # steps from the feature-map sizes (any input size)


_SSD_DEFAULTS = {"image_mean": [0.48235, 0.45882, 0.40784], "image_std": [1.0 / 255.0] * 3}


def _ssd_vgg16(num_classes: int, size: int, method: str, method_opts: Mapping[str, Any], **kw: Any) -> nn.Module:
    tv = _tv()
    from torchvision.models.detection.ssd import SSD, SSDFeatureExtractorVGG

    if size < 268:
        raise DetectorError(f"ssd_vgg16 needs size ≥ 268 (its 3×3 valid extra convs), got {size}")
    vgg = tv.models.vgg16_bn(weights=None)
    extractor = SSDFeatureExtractorVGG(vgg.features, highres=False)
    _norm_after_every_conv(extractor.extra)          # fc6/fc7 and conv8_2…conv11_2 normalized too
    last = "extra.4.4"                                # the norm after conv11_2, whose map is 1×1
    one_by_one = get_method(method.lower()).spatial_stats   # per-instance statistics of one pixel are undefined
    extractor = _convert_backbone(extractor, method, method_opts, copy_weights=False,
                                  exclude=(last,) if one_by_one else ())
    if one_by_one:
        extractor.extra[4][4] = nn.Identity()
    return SSD(extractor, _anchors(6, size), (size, size), num_classes, **{**_SSD_DEFAULTS, **kw})


class SSDFeatureExtractorResNet(nn.Module):
    """ResNet-50 → six SSD feature maps: layer2 (stride 8), layer3 (16), layer4 (32) and three extra blocks
    (1×1 reduce + 3×3 stride-2 / valid conv, each followed by a norm)."""

    def __init__(self, resnet: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool, resnet.layer1, resnet.layer2)
        self.layer3, self.layer4 = resnet.layer3, resnet.layer4

        def block(cin: int, mid: int, cout: int, **conv: Any) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
                                 nn.Conv2d(mid, cout, 3, bias=False, **conv), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.extra = nn.ModuleList([block(2048, 256, 512, stride=2, padding=1), block(512, 128, 256, stride=2,
                                                                                       padding=1),
                                    block(256, 128, 256)])
        self.out_channels = [512, 1024, 2048, 512, 256, 256]
        self.out_norms: nn.ModuleList | None = None

    def add_output_norms(self) -> None:
        """LayerNorm (GroupNorm with one group) on every feature map before the head — for PWS, whose residual
        sums are not normalized (the paper's ResNet-50 setting: LN at the output, cf. ``imagenet_resnet(ln_io=True)``)."""
        self.out_norms = nn.ModuleList(nn.GroupNorm(1, c) for c in self.out_channels)

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        c2 = self.body(x)
        c3 = self.layer3(c2)
        x = self.layer4(c3)
        outs = [c2, c3, x]
        for b in self.extra:
            x = b(x)
            outs.append(x)
        if self.out_norms is not None:
            outs = [n(v) for n, v in zip(self.out_norms, outs)]
        return OrderedDict((str(i), v) for i, v in enumerate(outs))


def _ssd_resnet50(num_classes: int, size: int, method: str, method_opts: Mapping[str, Any], **kw: Any) -> nn.Module:
    tv = _tv()
    from torchvision.models.detection.ssd import SSD

    if size < 257:
        raise DetectorError(f"ssd_resnet50 needs size ≥ 257 (its 3×3 valid last extra conv), got {size}")
    ext = _convert_backbone(SSDFeatureExtractorResNet(tv.models.resnet50(weights=None)), method, method_opts, False)
    if get_method(method.lower()).ln_io:   # LayerNorm on the backbone's outputs, as the method's ImageNet setting
        ext.add_output_norms()
    return SSD(ext, _anchors(6, size), (size, size), num_classes, **{**_SSD_DEFAULTS, **kw})


class TinySSDBackbone(nn.Module):
    """A VGG-style backbone for CPU tests: conv-BN-ReLU stages of 16/32/64/64 channels, feature maps at strides
    8, 16 and 32 (three SSD maps)."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 64)) -> None:
        super().__init__()

        def stage(cin: int, cout: int, pool: bool) -> nn.Sequential:
            layers: list[nn.Module] = [nn.MaxPool2d(2)] if pool else []
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                       nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            return nn.Sequential(*layers)

        w = widths
        self.stem = nn.Sequential(stage(3, w[0], False), stage(w[0], w[1], True), stage(w[1], w[2], True))  # /4
        self.s8 = stage(w[2], w[2], True)
        self.s16 = stage(w[2], w[3], True)
        self.s32 = stage(w[3], w[3], True)
        self.out_channels = [w[2], w[3], w[3]]

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        a = self.s8(self.stem(x))
        b = self.s16(a)
        c = self.s32(b)
        return OrderedDict([("0", a), ("1", b), ("2", c)])


def _ssd_tiny(num_classes: int, size: int, method: str, method_opts: Mapping[str, Any], **kw: Any) -> nn.Module:
    _tv()
    from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
    from torchvision.models.detection.ssd import SSD

    if size < 64:
        raise DetectorError(f"ssd_tiny needs size ≥ 64, got {size}")
    ext = _convert_backbone(TinySSDBackbone(), method, method_opts, False)
    anchors = DefaultBoxGenerator([[2], [2, 3], [2]], scales=[0.15, 0.3, 0.55, 0.85])
    kw = {**_SSD_DEFAULTS, "image_std": [0.229 / 1.0, 0.224, 0.225], "image_mean": [0.485, 0.456, 0.406], **kw}
    return SSD(ext, anchors, (size, size), num_classes, **kw)


def _load_backbone_weights(resnet: nn.Module, weights: str | os.PathLike) -> None:
    path = os.fspath(weights)
    if not os.path.isfile(path):
        raise DetectorError(f"backbone weights {path}: file not found (Table 3 starts from an ImageNet ResNet-50; "
                            "pass torchvision's resnet50-*.pth or a state_dict of the same keys)")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - one line naming the file
        raise DetectorError(f"backbone weights {path}: cannot be read ({type(e).__name__})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    sd = {k.removeprefix("module."): v for k, v in sd.items() if not k.startswith("fc.")}
    missing, unexpected = resnet.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise DetectorError(f"backbone weights {path} do not fit a ResNet-50: missing {missing[:3]}, unexpected "
                            f"{list(unexpected)[:3]}")


def _rcnn(kind: str, num_classes: int, size: int, method: str, method_opts: Mapping[str, Any],
          weights: str | os.PathLike | None = None, trainable_layers: int | None = None, **kw: Any) -> nn.Module:
    tv = _tv()
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import misc as misc_nn_ops

    pretrained = weights is not None
    frozen_bn = pretrained and get_method(method.lower()).keeps_batchnorm
    resnet = tv.models.resnet50(weights=None, norm_layer=misc_nn_ops.FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d)
    if pretrained:
        _load_backbone_weights(resnet, weights)   # type: ignore[arg-type]
    resnet = _convert_backbone(resnet, method, method_opts, copy_weights=pretrained, exclude=("fc",))
    if trainable_layers is None:
        trainable_layers = 3 if pretrained else 5   # torchvision's / mmdetection's default (stem + layer1 frozen)
    backbone = _resnet_fpn_extractor(resnet, trainable_layers)
    sizes = dict(min_size=size, max_size=max(size, int(size * 1333 / 800)))
    cls = tv.models.detection.MaskRCNN if kind == "mask" else tv.models.detection.FasterRCNN
    return cls(backbone, num_classes=num_classes, **{**sizes, **kw})


def build_detector(name: str, method: str = "pws", *, num_classes: int, size: int | None = None,
                   method_opts: Mapping[str, Any] | None = None, weights: str | os.PathLike | None = None,
                   **kw: Any) -> nn.Module:
    """A torchvision detector ``name`` (:data:`DETECTORS`) for ``num_classes`` classes (background included, as
    torchvision counts: VOC 21, COCO 91) with its backbone converted to ``method``.

    Args:
        size: SSD's square input size (default 320, the paper's; ssd_tiny 96) or the R-CNNs' ``min_size``
            (default 800; ``max_size`` = size·1333/800).
        method_opts: the method's options (``{"gamma": 1e-3}``, ``{"gamma": "auto"}``, ``{"groups": 32}``).
        weights: R-CNNs only: a local ImageNet ResNet-50 state_dict for the backbone (Table 3).
        kw: passed to torchvision's ``SSD`` / ``MaskRCNN`` (e.g. ``score_thresh``, ``detections_per_img``,
            ``box_batch_size_per_image``).
    """
    key = str(name).lower()
    if key not in DETECTORS:
        raise DetectorError(f"unknown detector {name!r}; choose one of {', '.join(DETECTORS)}")
    if not isinstance(method, str) or method.lower() not in available_methods():
        raise DetectorError(f"unknown method {method!r}; choose one of {', '.join(available_methods())}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise DetectorError(f"num_classes must be an int ≥ 2 (background included), got {num_classes!r}")
    opts = dict(method_opts or {})
    if weights is not None and not key.endswith("_fpn"):
        raise DetectorError(f"{key} is trained from scratch (as the paper); weights= is for the R-CNNs")
    try:
        if key == "ssd_vgg16":
            return _ssd_vgg16(num_classes, int(size or 320), method, opts, **kw)
        if key == "ssd_resnet50":
            return _ssd_resnet50(num_classes, int(size or 320), method, opts, **kw)
        if key == "ssd_tiny":
            return _ssd_tiny(num_classes, int(size or 96), method, opts, **kw)
        return _rcnn("mask" if key.startswith("mask") else "faster", num_classes, int(size or 800), method, opts,
                     weights=weights, **kw)
    except TypeError as e:
        raise DetectorError(f"cannot build {key} with {kw or opts}: {' '.join(str(e).split())}") from None


def backbone_of(model: nn.Module) -> nn.Module:
    """The converted part of a detector (SSD: the feature extractor; R-CNN: the ResNet body)."""
    bb = model.backbone
    return getattr(bb, "body", bb)
