"""Residual networks: the CIFAR ResNets of He et al. 2016a and the ImageNet ResNet-50, with any normalization method.

Standard blocks are the post-activation blocks of He et al. 2016a (conv-norm-ReLU-conv-norm, add, ReLU): the PWS
paper's "For ResNet, we only remove all BN layers. The network structure is not modified." With ``pws_variant=True``
the blocks are the variant of the authors' PWS code: the ReLU moves to the start of each residual branch (identity =
x, branch = convs(relu(x)), the projection shortcut also sees relu(x)), there is no ReLU after the addition, and the
network gets GroupNorm(1) (= LayerNorm over C, H, W) after the stem and a GroupNorm(1) + ReLU "neck" before the global
pooling.
"""

from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .common import ConvUnit, LayerNorm2d, MethodSpec, SafeMaxPool2d, global_pool, init_classifier, scaled

__all__ = ["BasicBlock", "Bottleneck", "ShortcutA", "ResNet", "cifar_resnet", "imagenet_resnet"]

SHORTCUTS = ("A", "B")


class ShortcutA(nn.Module):
    """He et al. 2016a option A: parameter-free shortcut — subsample by ``stride`` and zero-pad the new channels."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        if out_ch < in_ch:
            raise ValueError(f"option-A shortcut cannot reduce channels ({in_ch} → {out_ch})")
        self.in_ch, self.out_ch, self.stride = in_ch, out_ch, stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_ch - self.in_ch
        if extra:
            x = F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))
        return x

    def extra_repr(self) -> str:
        return f"{self.in_ch}, {self.out_ch}, stride={self.stride}"


def _shortcut(spec: MethodSpec, in_ch: int, out_ch: int, stride: int, kind: str) -> nn.Module | None:
    if stride == 1 and in_ch == out_ch:
        return None
    if kind == "A":
        return ShortcutA(in_ch, out_ch, stride)
    return ConvUnit(spec, in_ch, out_ch, 1, stride, 0, act=False)  # option B: 1×1 projection conv + norm


class BasicBlock(nn.Module):
    """Two 3×3 conv+norm units with a shortcut (He et al. 2016a, CIFAR ResNets)."""

    expansion = 1

    def __init__(self, spec: MethodSpec, in_ch: int, planes: int, stride: int = 1, shortcut: str = "A",
                 pre_act: bool = False) -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.pre_act = pre_act
        self.unit1 = ConvUnit(spec, in_ch, planes, 3, stride)
        self.unit2 = ConvUnit(spec, planes, out_ch, 3, 1, act=False)
        self.shortcut = _shortcut(spec, in_ch, out_ch, stride, shortcut)

    def branch(self, x: Tensor) -> Tensor:
        return self.unit2(self.unit1(x))

    def forward(self, x: Tensor) -> Tensor:
        if self.pre_act:  # the authors' PWS variant: ReLU at the start of the branch, none after the addition
            r = F.relu(x)
            identity = x if self.shortcut is None else self.shortcut(r)
            return self.branch(r) + identity
        identity = x if self.shortcut is None else self.shortcut(x)
        return F.relu(self.branch(x) + identity)


class Bottleneck(BasicBlock):
    """1×1 → 3×3 (stride here, as in torchvision's "ResNet v1.5") → 1×1 (×4 channels) conv+norm units + shortcut."""

    expansion = 4

    def __init__(self, spec: MethodSpec, in_ch: int, planes: int, stride: int = 1, shortcut: str = "B",
                 pre_act: bool = False) -> None:
        nn.Module.__init__(self)
        out_ch = planes * self.expansion
        self.pre_act = pre_act
        self.unit1 = ConvUnit(spec, in_ch, planes, 1, 1, 0)
        self.unit2 = ConvUnit(spec, planes, planes, 3, stride)
        self.unit3 = ConvUnit(spec, planes, out_ch, 1, 1, 0, act=False)
        self.shortcut = _shortcut(spec, in_ch, out_ch, stride, shortcut)

    def branch(self, x: Tensor) -> Tensor:
        return self.unit3(self.unit2(self.unit1(x)))


class ResNet(nn.Module):
    """A ResNet body: ``stem`` → ``stages`` → ``neck`` → global average pooling → ``fc`` (N(0, 0.01) init).

    Use :func:`cifar_resnet` / :func:`imagenet_resnet` (or :func:`pwsconv.models.build_model`) to build one.
    """

    def __init__(self, stem: nn.Module, stages: nn.Sequential, neck: nn.Module, features: int,
                 num_classes: int) -> None:
        super().__init__()
        self.stem = stem
        self.stages = stages
        self.neck = neck
        self.fc = init_classifier(nn.Linear(features, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(global_pool(self.neck(self.stages(self.stem(x)))))


def _make_stages(spec: MethodSpec, block: type[BasicBlock], in_ch: int, widths: Sequence[int], blocks: Sequence[int],
                 strides: Sequence[int], shortcut: str, pre_act: bool) -> tuple[nn.Sequential, int]:
    stages = []
    for planes, n, stride in zip(widths, blocks, strides):
        layers = []
        for i in range(n):
            layers.append(block(spec, in_ch, planes, stride if i == 0 else 1, shortcut, pre_act))
            in_ch = planes * block.expansion
        stages.append(nn.Sequential(*layers))
    return nn.Sequential(*stages), in_ch


def _stem_and_neck(spec: MethodSpec, in_channels: int, stem_width: int, k: int, stride: int, max_pool: bool,
                   out_ch: int, pws_variant: bool, ln_io: bool) -> tuple[nn.Sequential, nn.Module]:
    stem: list[nn.Module] = [spec.conv(in_channels, stem_width, k, stride, k // 2), spec.norm(stem_width)]
    if ln_io:
        stem.append(LayerNorm2d(stem_width))
    if not pws_variant:  # the variant's first block applies the ReLU at the start of its branch
        stem.append(nn.ReLU(inplace=True))
    if max_pool:
        stem.append(SafeMaxPool2d(3, 2, padding=1))
    neck: list[nn.Module] = []
    if ln_io:
        neck.append(LayerNorm2d(out_ch))
    if pws_variant:  # the last ReLU (none after the last addition)
        neck.append(nn.ReLU(inplace=True))
    return nn.Sequential(*stem), (nn.Sequential(*neck) if neck else nn.Identity())


def _check_shortcut(shortcut: str) -> str:
    s = str(shortcut).upper()
    if s not in SHORTCUTS:
        raise ValueError(f"shortcut must be 'A' (zero-padding identity) or 'B' (1×1 projection), got {shortcut!r}")
    return s


def cifar_resnet(method: str | MethodSpec = "pws", num_classes: int = 10, in_channels: int = 3, depth: int = 20,
                 width: float = 1.0, shortcut: str | None = None, pws_variant: bool = False, ln_io: bool | None = None,
                 method_opts: dict | None = None) -> ResNet:
    """The CIFAR-10 ResNet of He et al. 2016a (Sec. 4.2): 3×3 stem with 16 channels, three stages of
    ``n = (depth − 2) / 6`` basic blocks with 16/32/64 channels (all × ``width``), stride 2 at stages 2 and 3, global
    average pooling, ``Linear`` classifier. depth 20/32/44/56/110 (≈ 0.27M/0.46M/0.66M/0.85M/1.7M parameters with
    BN). No max-pool (3×3 stride-1 stem).

    Args:
        shortcut: "A" (parameter-free zero-padding, He et al.'s CIFAR choice; default for the standard net) or "B"
            (1×1 projection conv+norm; default for ``pws_variant``, as in the authors' PWS code).
        pws_variant: the authors' PWS ResNet variant (module docstring). Default False: the paper's Table 4 only
            removes the BN layers.
        ln_io: GroupNorm(1) after the stem and before the global pooling; ``None`` = on for ``pws_variant`` only.
    """
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n + 2 (e.g. 20, 32, 56, 110), got {depth}")
    spec = MethodSpec(method, method_opts)
    shortcut = _check_shortcut(shortcut or ("B" if pws_variant else "A"))
    ln_io = pws_variant if ln_io is None else bool(ln_io)
    n = (depth - 2) // 6
    widths = [scaled(c, width) for c in (16, 32, 64)]
    stages, out_ch = _make_stages(spec, BasicBlock, widths[0], widths, [n] * 3, [1, 2, 2], shortcut, pws_variant)
    stem, neck = _stem_and_neck(spec, in_channels, widths[0], 3, 1, False, out_ch, pws_variant, ln_io)
    return ResNet(stem, stages, neck, out_ch, num_classes)


def imagenet_resnet(method: str | MethodSpec = "pws", num_classes: int = 1000, in_channels: int = 3,
                    layers: Sequence[int] = (3, 4, 6, 3), width: float = 1.0, ln_io: bool | None = None,
                    pws_variant: bool = False, shortcut: str = "B", method_opts: dict | None = None) -> ResNet:
    """The ImageNet bottleneck ResNet of He et al. 2016a (default ResNet-50: 3/4/6/3 blocks, 64/128/256/512 planes,
    ×4 expansion, ≈ 25.6M parameters with BN): 7×7 stride-2 stem + 3×3 max-pool, projection (option B) shortcuts.

    Args:
        ln_io: GroupNorm(1) (= LayerNorm) after the stem conv and before the global pooling — the paper's ImageNet
            setting for PWS ("we use LN to normalize the input and the output of ResNet-50", Table 5). ``None`` = as
            the method declares (:attr:`pwsconv.methods.Method.ln_io`: on for "pws"), and on for ``pws_variant``.
        width: multiplies every channel count (``width=0.25``: 16-channel stem).
        pws_variant: the authors' PWS block variant (module docstring).
    """
    spec = MethodSpec(method, method_opts)
    shortcut = _check_shortcut(shortcut)
    if ln_io is None:
        ln_io = spec.method.ln_io or pws_variant
    stem_w = scaled(64, width)
    widths = [scaled(c, width) for c in (64, 128, 256, 512)]
    stages, out_ch = _make_stages(spec, Bottleneck, stem_w, widths, list(layers), [1, 2, 2, 2][: len(layers)],
                                  shortcut, pws_variant)
    stem, neck = _stem_and_neck(spec, in_channels, stem_w, 7, 2, True, out_ch, pws_variant, bool(ln_io))
    return ResNet(stem, stages, neck, out_ch, num_classes)
