"""≥ 20 real torchvision and timm architectures (random init, small inputs) × PWS and two other methods: forward,
backward + SGD step, nothing left unconverted (strict=True), folding exact, ONNX Runtime equal to torch."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
import torchvision
from torch import nn

import pwsconv
from pwsconv._bnlike import bn_info, conv_info

# 22 architectures, chosen to cover every layer kind convert must recognize while staying small on 2 cores:
# torchvision BN (incl. FrozenBatchNorm2d, depthwise, SE, channel shuffle, no-BN SqueezeNet, LayerNorm ConvNeXt);
# timm BatchNormAct2d (EfficientNet, RegNet, MobileNetV2/V3, LCNet, MixNet's MixedConv2d), Conv2dSame
# (tf_efficientnet), StdConv2d (BiT ResNetV2), ScaledStdConv2d (NF-ResNet), RepVGG's BN-only identity branches.
TV = ["resnet18", "resnet18_frozenbn", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf",
      "shufflenet_v2_x0_5", "mnasnet0_5", "squeezenet1_1", "convnext_tiny"]
TIMM = ["resnet10t", "resnet26d", "efficientnet_b0", "tf_efficientnet_b0", "regnety_002", "mobilenetv3_small_050",
        "resnetv2_50x1_bit", "nf_resnet26", "mobilenetv2_050", "mixnet_s", "repvgg_a0", "lcnet_050"]
ARCHS = [("torchvision", n) for n in TV] + [("timm", n) for n in TIMM]
METHODS = ["pws", "sws", "gn"]
SIZE: dict[str, int] = {}


_BUILT: dict[tuple[str, str], nn.Module] = {}


def _build(src: str, name: str) -> nn.Module:
    """The random-init model (built once per architecture; each method converts a deep copy)."""
    if (src, name) not in _BUILT:
        _BUILT.clear()   # the parametrization runs the methods of one architecture together
        _BUILT[(src, name)] = _make(src, name)
    return _BUILT[(src, name)]


def _make(src: str, name: str) -> nn.Module:
    torch.manual_seed(0)
    if src == "timm":
        return timm.create_model(name, pretrained=False, num_classes=10)
    if name.endswith("_frozenbn"):   # torchvision's detection backbones: FrozenBatchNorm2d
        return torchvision.models.get_model(name[:-9], weights=None, num_classes=10,
                                            norm_layer=torchvision.ops.FrozenBatchNorm2d)
    return torchvision.models.get_model(name, weights=None, num_classes=10)


def _plain_leftovers(model: nn.Module, method: str) -> list[str]:
    """BN-like layers still there, and convs that are not the method's."""
    left = [f"{n} ({type(m).__name__})" for n, m in model.named_modules() if bn_info(m) is not None]
    if method != "gn":
        left += [f"{n} ({type(m).__name__})" for n, m in model.named_modules()
                 if conv_info(m) is not None and not type(m).__module__.startswith("pwsconv.")]
    return left


CASES = [(s, n, m) for s, n in ARCHS for m in METHODS]   # architecture-major: each model is built once


@pytest.mark.parametrize("src,name,method", CASES, ids=[f"{s}:{n}-{m}" for s, n, m in CASES])
def test_architecture(src, name, method, tmp_path):
    model = _build(src, name)
    n_bn = sum(1 for m in model.modules() if bn_info(m) is not None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)   # nothing left behind silently
        warnings.filterwarnings("ignore", message=".*(deprecated|TracerWarning|onnx).*")
        net = pwsconv.convert(model, method, strict=True)
    assert not _plain_leftovers(net, method), _plain_leftovers(net, method)
    if method == "gn":
        assert sum(1 for m in net.modules() if isinstance(m, nn.GroupNorm)) >= n_bn
    s = SIZE.get(name, 32)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, s, s, generator=g)
    y = torch.tensor([1, 7])

    # forward, backward, one SGD step
    net.train()
    opt = torch.optim.SGD(pwsconv.param_groups(net, 5e-4), lr=0.01, momentum=0.9)
    before = {k: v.detach().clone() for k, v in net.state_dict().items() if v.is_floating_point()}
    out = net(x)
    out = out if isinstance(out, torch.Tensor) else out[0]
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    loss = nn.functional.cross_entropy(out, y)
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads if gr is not None)
    assert sum(gr is not None for gr in grads) > 0.9 * len(grads)
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)   # BN-free GhostNet starts with gradients of ~1e4
    opt.step()
    changed = sum(not torch.equal(before[k], v) for k, v in net.state_dict().items() if k in before)
    assert changed > 0

    # fold: the same function with plain layers
    net.eval()
    folded = pwsconv.fold(net)
    assert not any(type(m).__name__.startswith(("PWS", "SWS")) for m in folded.modules())
    with torch.no_grad():
        ref = net(x)
        got = folded(x)
    scale = ref.abs().max().clamp_min(1e-6)
    assert float((got - ref).abs().max() / scale) < 1e-4

    # ONNX Runtime runs the folded model and agrees with torch
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(folded, (x,), buf, dynamo=False, opset_version=17)
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    (onnx_out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    assert float(np.abs(onnx_out - got.numpy()).max()) < 1e-3 * float(scale)
