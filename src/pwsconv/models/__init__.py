"""The model zoo of the PWS experiments, buildable with any normalization method by name.

    >>> from pwsconv.models import build_model, available_models
    >>> net = build_model("resnet20", "pws", gamma=1e-3)            # CIFAR ResNet-20, BN-free PWS convs
    >>> net = build_model("convpool_cnn_c", "bn")                  # the paper's plain CIFAR net with BN
    >>> net = build_model("tiny_cnn", "none", in_channels=1)       # 8×8 digits demo net without normalization

Every conv+norm unit is made by :func:`pwsconv.methods.build_conv` / :func:`~pwsconv.methods.build_norm` from the method
name, so all methods of :func:`pwsconv.available_methods` work with all models. Keyword arguments of
:func:`build_model` that the model's builder takes (``width``, ``depth``, ``pws_variant``, ``ln_io``, ``shortcut``,
``layers``, ``widths``, ...) configure the model; the others are the method's options (e.g. ``gamma`` for "pws",
``groups`` for "gn"). Convs are He-initialized by their factories, classifiers ``Linear`` with N(0, 0.01) and bias 0.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from .external import build_external, is_external
from .common import ConvUnit, LayerNorm2d, MethodSpec, PadToMin, SafeMaxPool2d, init_classifier
from .plain import VGG, ConvPoolCNNC, TinyCNN
from .resnet import BasicBlock, Bottleneck, ResNet, ShortcutA, cifar_resnet, imagenet_resnet

__all__ = [
    "build_model",
    "available_models",
    "model_info",
    "register_model",
    "ModelEntry",
    "MODELS",
    "MethodSpec",
    "ConvUnit",
    "LayerNorm2d",
    "SafeMaxPool2d",
    "PadToMin",
    "init_classifier",
    "ConvPoolCNNC",
    "VGG",
    "TinyCNN",
    "ResNet",
    "BasicBlock",
    "Bottleneck",
    "ShortcutA",
    "cifar_resnet",
    "imagenet_resnet",
]


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: ``builder(method=..., num_classes=..., in_channels=..., method_opts=..., **preset)``."""

    name: str
    builder: Callable[..., nn.Module]
    preset: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    reference: str = ""

    def model_options(self) -> set[str]:
        """The keyword options that configure the model (not the method)."""
        sig = inspect.signature(self.builder)
        return {n for n in sig.parameters if n not in ("method", "num_classes", "in_channels", "method_opts")}


MODELS: dict[str, ModelEntry] = {}


def register_model(entry: ModelEntry, *, overwrite: bool = False) -> ModelEntry:
    """Add a model to the registry (``overwrite=True`` to replace one)."""
    if entry.name in MODELS and not overwrite:
        raise ValueError(f"model {entry.name!r} is already registered")
    MODELS[entry.name] = entry
    return entry


def available_models() -> list[str]:
    """Registered model names, in registration order."""
    return list(MODELS)


def model_info(name: str) -> ModelEntry:
    """The registry entry of ``name`` (``ValueError`` listing the names if unknown)."""
    key = name if name in MODELS else str(name).lower()
    if key not in MODELS:
        close = difflib.get_close_matches(str(name), list(MODELS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown model {name!r}{hint}; choose one of {', '.join(MODELS)}")
    return MODELS[key]


def build_model(name: str, method: str = "pws", num_classes: int = 10, in_channels: int = 3,
                **method_opts: Any) -> nn.Module:
    """Build model ``name`` with normalization ``method``.

    Args:
        name: one of :func:`available_models`, or a model from outside the zoo: ``"torchvision:resnet18"``,
            ``"timm:resnet26d"``, ``"my_package.my_module:build"`` (see :mod:`pwsconv.models.external`),
            built with random weights and converted to ``method`` with :func:`pwsconv.convert`.
        method: one of :func:`pwsconv.available_methods` ("pws", "bn", "gn", "none", ...).
        num_classes: classifier outputs.
        in_channels: input channels (1 for MNIST / digits).
        **method_opts: options of the model's builder (e.g. ``width=0.5``, ``depth=56``, ``pws_variant=True``,
            ``ln_io=False``) and of the method (e.g. ``gamma=1e-4``); a ``method_opts={...}`` dict is merged too.
            Options neither takes raise ``ValueError``.
    """
    if is_external(name):
        return _build_external_model(name, method, num_classes, in_channels, method_opts)
    entry = model_info(name)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
    opts = dict(method_opts)
    opts = {**dict(opts.pop("method_opts", None) or {}), **opts}
    model_keys = entry.model_options()
    model_kw = dict(entry.preset)
    meth_kw: dict[str, Any] = {}
    for k, v in opts.items():
        (model_kw if k in model_keys else meth_kw)[k] = v
    spec = MethodSpec(method, meth_kw)  # validates the method options (ValueError names the accepted ones)
    return entry.builder(method=spec, num_classes=num_classes, in_channels=in_channels, **model_kw)


def _build_external_model(name: str, method: str, num_classes: int, in_channels: int,
                          kwargs: dict[str, Any]) -> nn.Module:
    from ..methods import get_method

    for label, v in (("num_classes", num_classes), ("in_channels", in_channels)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{label} must be a positive int, got {v!r}")
    opts = dict(kwargs)
    meth_kw = dict(opts.pop("method_opts", None) or {})
    accepted = get_method(method).options
    model_kw = {}
    for k, v in opts.items():   # the method's options go to convert, everything else to the model's builder
        (meth_kw if k in accepted else model_kw)[k] = v
    return build_external(name, method, num_classes=num_classes, in_channels=in_channels, model_opts=model_kw,
                          method_opts=meth_kw)


def _register_builtin_models() -> None:
    paper_plain = "Springenberg et al. 2015 (ConvPool-CNN-C), no dropout: the PWS paper's CIFAR 'plain' net"
    he_cifar = "He et al. 2016a, CIFAR ResNet: the PWS paper's CIFAR 'residual' net"
    for e in (
        ModelEntry("convpool_cnn_c", ConvPoolCNNC, {}, "ConvPool-CNN-C (1.3M params), 32×32 inputs", paper_plain),
        ModelEntry("convpool_cnn_c_small", ConvPoolCNNC, {"width": 0.25}, "ConvPool-CNN-C at width 0.25 (24/48 ch)",
                   paper_plain),
        ModelEntry("resnet_cifar", cifar_resnet, {"depth": 20}, "CIFAR ResNet-(6n+2), depth kwarg (default 20)",
                   he_cifar),
        ModelEntry("resnet20", cifar_resnet, {"depth": 20}, "CIFAR ResNet-20 (0.27M)", he_cifar),
        ModelEntry("resnet32", cifar_resnet, {"depth": 32}, "CIFAR ResNet-32 (0.46M)", he_cifar),
        ModelEntry("resnet56", cifar_resnet, {"depth": 56}, "CIFAR ResNet-56 (0.85M)", he_cifar),
        ModelEntry("resnet110", cifar_resnet, {"depth": 110}, "CIFAR ResNet-110 (1.7M)", he_cifar),
        ModelEntry("resnet_cifar_small", cifar_resnet, {"depth": 8}, "CIFAR ResNet-8 (75k; width=0.5: 19k)", he_cifar),
        ModelEntry("vgg16", VGG, {}, "VGG-16 (13 conv units + linear head, 14.7M), 32×32 or 224×224",
                   "Simonyan & Zisserman 2015"),
        ModelEntry("vgg_small", VGG, {"width": 0.25}, "VGG-16 at width 0.25 (16..128 ch, 0.9M)",
                   "Simonyan & Zisserman 2015"),
        ModelEntry("resnet50", imagenet_resnet, {}, "ImageNet ResNet-50 (25.6M); LN at input/output for pws",
                   "He et al. 2016a; PWS paper Table 5"),
        ModelEntry("resnet50_small", imagenet_resnet, {"layers": (1, 1, 1, 1), "width": 0.25},
                   "bottleneck ResNet (1/1/1/1 blocks, width 0.25)", "He et al. 2016a"),
        ModelEntry("tiny_cnn", TinyCNN, {}, "10 conv units, ~46k params, for 8×8 digits / 28×28 MNIST", "this project"),
    ):
        register_model(e)


_register_builtin_models()
