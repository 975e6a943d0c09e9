"""Plain (non-residual) networks: ConvPool-CNN-C, VGG-16 and a tiny CNN for 8×8 / 28×28 inputs."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from .common import ConvUnit, LayerNorm2d, MethodSpec, PadToMin, SafeMaxPool2d, global_pool, init_classifier, scaled

__all__ = ["ConvPoolCNNC", "VGG", "TinyCNN", "VGG16_CFG"]


class ConvPoolCNNC(nn.Module):
    """ConvPool-CNN-C of Springenberg et al. 2015 ("Striving for Simplicity", Table 1/2), without dropout.

    The "plain" CIFAR-10 network of the PWS paper (Table 4), which removes all dropout layers::

        3×3 conv 96 ×3 → 3×3 max-pool /2 → 3×3 conv 192 ×3 → 3×3 max-pool /2
        → 3×3 conv 192 (valid) → 1×1 conv 192 → 1×1 conv num_classes → global average pooling

    Every conv except the last is a conv+norm+ReLU unit of ``method``. The last 1×1 conv to ``num_classes`` followed
    by global average pooling is computed as global pooling followed by a ``Linear`` (the same function and parameter
    count: both are linear), initialised N(0, 0.01) and left without normalization or ReLU, so that its outputs are
    the logits. Max-pooling is 3×3 stride 2 padding 1 (32 → 16 → 8, then the valid conv gives the paper's 6×6 map).

    ``width`` scales every channel count (``width=0.25`` → 24/48 channels). On inputs smaller than 32×32 the pools
    never shrink a map below one pixel and the valid conv pads its input up to 3×3 if needed. ``ln_io=True`` adds
    LayerNorm (GroupNorm with one group) after the first conv and before the global pooling, as the authors'
    classification networks do.
    """

    def __init__(self, method: str | MethodSpec = "pws", num_classes: int = 10, in_channels: int = 3,
                 width: float = 1.0, method_opts: dict | None = None, ln_io: bool = False) -> None:
        super().__init__()
        spec = MethodSpec(method, method_opts)
        c1, c2 = scaled(96, width), scaled(192, width)
        first = ConvUnit(spec, in_channels, c1, 3)
        if ln_io:
            first.norm = nn.Sequential(first.norm, LayerNorm2d(c1))
        self.features = nn.Sequential(
            first, ConvUnit(spec, c1, c1, 3), ConvUnit(spec, c1, c1, 3),
            SafeMaxPool2d(3, 2, padding=1),
            ConvUnit(spec, c1, c2, 3), ConvUnit(spec, c2, c2, 3), ConvUnit(spec, c2, c2, 3),
            SafeMaxPool2d(3, 2, padding=1),
            PadToMin(3), ConvUnit(spec, c2, c2, 3, padding=0),
            ConvUnit(spec, c2, c2, 1),
        )
        if ln_io:
            self.features.append(LayerNorm2d(c2))
        self.fc = init_classifier(nn.Linear(c2, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(global_pool(self.features(x)))


VGG16_CFG: tuple = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """VGG of Simonyan & Zisserman 2015 with a conv+norm unit per conv, CIFAR-style (default: VGG-16, config "D").

    13 3×3 conv units in 5 stages with 2×2 max-pooling, then global average pooling and one ``Linear`` classifier
    (N(0, 0.01) init), as in the common CIFAR adaptations of VGG-16 ("BN after every conv" versions; the PWS paper
    compares normal conv / BN / SN / PWS on such a VGG-16). At 32×32 the last map is 1×1, so global pooling equals
    flattening; at 224×224 the 7×7 map is averaged (adaptive pooling). Pools that would shrink a map below one pixel
    are skipped (small inputs). ``width`` scales every channel count; ``cfg`` gives another layer list
    (ints = conv widths, "M" = max-pool).
    """

    def __init__(self, method: str | MethodSpec = "pws", num_classes: int = 10, in_channels: int = 3,
                 width: float = 1.0, cfg: Sequence[int | str] = VGG16_CFG,
                 method_opts: dict | None = None) -> None:
        super().__init__()
        spec = MethodSpec(method, method_opts)
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(SafeMaxPool2d(2, 2))
            else:
                out = scaled(int(v), width)
                layers.append(ConvUnit(spec, c, out, 3))
                c = out
        self.features = nn.Sequential(*layers)
        self.fc = init_classifier(nn.Linear(c, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(global_pool(self.features(x)))


class TinyCNN(nn.Module):
    """A small plain CNN for 8×8 (scikit-learn digits) and 28×28 (MNIST) inputs, used by the quick demos.

    ``len(widths)`` 3×3 conv+norm+ReLU units (default 10 units, ~46k parameters: 16 ×4, 24↓ ×3, 32↓ ×3 channels,
    ↓ = stride 2: 8×8 → 4×4 → 2×2), global average pooling and a ``Linear`` classifier (N(0, 0.01)); ``strides``
    default: 2 wherever the width grows. Deep enough that the plain network without normalization collapses at a large
    learning rate while BN and PWS train. Measured on sklearn digits (SGD momentum 0.9, weight decay 5e-4, batch 64,
    8 epochs, seeds 0-2, test accuracy): LR 0.1 — none 10/20/10 %, PWS 97/95/95 %, BN 99/99/99 %; LR 0.02 — none
    95-97 %.
    """

    def __init__(self, method: str | MethodSpec = "pws", num_classes: int = 10, in_channels: int = 1,
                 widths: Sequence[int] = (16, 16, 16, 16, 24, 24, 24, 32, 32, 32),
                 strides: Sequence[int] | None = None, method_opts: dict | None = None) -> None:
        super().__init__()
        spec = MethodSpec(method, method_opts)
        widths = list(widths)
        if not widths:
            raise ValueError("TinyCNN needs at least one conv layer")
        if strides is None:  # stride 2 where the width grows (after the first layer)
            strides = [2 if i > 0 and w > widths[i - 1] else 1 for i, w in enumerate(widths)]
        if len(strides) != len(widths):
            raise ValueError(f"strides ({len(strides)}) and widths ({len(widths)}) differ in length")
        layers: list[nn.Module] = []
        c = in_channels
        for w, s in zip(widths, strides):
            layers.append(ConvUnit(spec, c, int(w), 3, int(s)))
            c = int(w)
        self.features = nn.Sequential(*layers)
        self.fc = init_classifier(nn.Linear(c, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(global_pool(self.features(x)))
