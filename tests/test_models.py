"""The model zoo: every model × every registered normalization method builds and trains one step; the paper's
architecture details (parameter counts, LN at input/output, the authors' PWS ResNet variant, init)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pwsconv
from pwsconv.models import available_models, build_model, model_info
from pwsconv.models.common import PadToMin, SafeMaxPool2d
from pwsconv.models.resnet import BasicBlock, ShortcutA

METHODS = pwsconv.available_methods()

# model → (in_channels, input size) small enough to be quick, large enough that no map is 1×1 where a norm needs
# more than one spatial element (instance norm)
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is faster, and immune to oversubscription when suites run side by side."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SMALL = {
    "tiny_cnn": (1, 8),
    "convpool_cnn_c_small": (3, 16),
    "resnet_cifar_small": (3, 8),
    "vgg_small": (3, 32),
    "resnet50_small": (3, 64),
    "resnet20": (3, 8),
    "convpool_cnn_c": (3, 16),
}


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_registry_lists_models_and_rejects_unknown():
    names = available_models()
    for n in ("convpool_cnn_c", "resnet_cifar", "resnet20", "resnet56", "resnet110", "vgg16", "resnet50",
              "convpool_cnn_c_small", "resnet_cifar_small", "vgg_small", "resnet50_small", "tiny_cnn"):
        assert n in names
    with pytest.raises(ValueError, match="resnet20"):
        build_model("resnet21")
    with pytest.raises(ValueError, match="unknown normalization method"):
        build_model("tiny_cnn", "batchnorm-ish")
    with pytest.raises(ValueError, match=r"'resnet99' \(did you mean 'resnet56'\?\)"):   # typos get a suggestion
        build_model("resnet99")
    with pytest.raises(ValueError, match=r"'pwss' \(did you mean 'pws'\?\)"):
        build_model("tiny_cnn", "pwss")
    from pwsconv.config import ConfigError, TrainConfig
    with pytest.raises(ConfigError, match=r"'pwss' \(did you mean 'pws'\?\)"):
        TrainConfig(method="pwss").validate()
    assert model_info("tiny_cnn").reference


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(SMALL))
def test_every_model_every_method_forward_backward(name, method):
    c, s = SMALL[name]
    torch.manual_seed(0)
    net = build_model(name, method, num_classes=7, in_channels=c)
    x = torch.randn(2, c, s, s)
    out = net(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    net.eval()
    with torch.no_grad():
        assert net(x).shape == (2, 7)


@pytest.mark.parametrize("method", ["pws", "bn"])
@pytest.mark.parametrize("name", ["tiny_cnn", "convpool_cnn_c_small", "resnet_cifar_small", "vgg_small",
                                  "resnet50_small"])
@pytest.mark.parametrize("size", [8, 28])
def test_small_inputs_grayscale(name, method, size):
    """8×8 digits and 28×28 MNIST: pools never shrink a map below one pixel."""
    net = build_model(name, method, num_classes=10, in_channels=1)
    out = net(torch.randn(3, 1, size, size))
    assert out.shape == (3, 10) and torch.isfinite(out).all()


def test_parameter_counts_of_full_models():
    # He et al. 2016a: ResNet-20/56/110 have 0.27M/0.85M/1.7M parameters (option-A shortcuts, BN)
    assert _n_params(build_model("resnet20", "bn")) == 269_722
    assert _n_params(build_model("resnet56", "bn")) == 853_018
    assert _n_params(build_model("resnet110", "bn")) == 1_727_962
    assert _n_params(build_model("resnet_cifar", "bn", depth=32)) == 464_154
    # ConvPool-CNN-C ≈ 1.4M (Springenberg et al. 2015), VGG-16 CIFAR (conv+BN, one linear) ≈ 14.7M
    assert _n_params(build_model("convpool_cnn_c", "bn")) == 1_370_986
    assert _n_params(build_model("vgg16", "bn")) == 14_724_042
    # torchvision's resnet50 has exactly 25,557,032 parameters
    assert _n_params(build_model("resnet50", "bn", num_classes=1000)) == 25_557_032
    assert 20_000 <= _n_params(build_model("tiny_cnn", "pws", in_channels=1)) <= 50_000


def test_resnet50_pws_has_ln_at_input_and_output():
    torch.manual_seed(0)
    net = build_model("resnet50", "pws", num_classes=10)
    gns = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert len(gns) == 2 and all(g.num_groups == 1 for g in gns)
    assert isinstance(net.stem[2], nn.GroupNorm) and net.stem[2].num_channels == 64
    assert isinstance(net.neck[0], nn.GroupNorm) and net.neck[0].num_channels == 2048
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert sum(isinstance(m, pwsconv.PWSConv2d) for m in net.modules()) == 53
    with torch.no_grad():
        out = net(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    # off by default for other methods, and switchable
    assert not any(isinstance(m, nn.GroupNorm) for m in build_model("resnet50_small", "bn").modules())
    assert not any(isinstance(m, nn.GroupNorm) for m in build_model("resnet50_small", "pws", ln_io=False).modules())


def test_cifar_resnet_standard_structure():
    net = build_model("resnet20", "pws")
    assert not any(isinstance(m, (nn.GroupNorm, nn.MaxPool2d)) for m in net.modules())  # paper: only BN removed
    assert net.stem[0].kernel_size == (3, 3) and net.stem[0].stride == (1, 1)
    blocks = [m for m in net.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 9
    assert sum(isinstance(b.shortcut, ShortcutA) for b in blocks) == 2
    # post-activation: a block's output is ReLU'd
    b = blocks[0]
    assert (b(torch.randn(2, 16, 8, 8)) >= 0).all()


def test_cifar_resnet_pws_variant():
    torch.manual_seed(0)
    net = build_model("resnet20", "pws", pws_variant=True)
    gns = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert len(gns) == 2 and all(g.num_groups == 1 for g in gns)
    assert not any(isinstance(m, nn.ReLU) for m in net.stem)  # the first block's branch starts with the ReLU
    assert isinstance(net.neck[0], nn.GroupNorm) and isinstance(net.neck[1], nn.ReLU)
    blocks = [m for m in net.modules() if isinstance(m, BasicBlock)]
    assert all(b.pre_act for b in blocks)
    assert sum(b.shortcut is not None and not isinstance(b.shortcut, ShortcutA) for b in blocks) == 2  # projections
    x = torch.randn(2, 16, 8, 8)
    b = blocks[0]
    out = b(x)
    assert (out < 0).any()  # no ReLU after the addition
    torch.testing.assert_close(out, b.branch(F.relu(x)) + x)
    y = net(torch.randn(2, 3, 8, 8))
    assert y.shape == (2, 10)


def test_method_options_pass_through_and_validation():
    net = build_model("resnet_cifar_small", "pws", gamma=1e-4, use_alpha=False)
    convs = [m for m in net.modules() if isinstance(m, pwsconv.PWSConv2d)]
    assert convs and all(c.gamma == 1e-4 and c.alpha is None for c in convs)
    net = build_model("tiny_cnn", "gn", in_channels=1, groups=4)
    assert all(m.num_groups == 4 for m in net.modules() if isinstance(m, nn.GroupNorm))
    net = build_model("tiny_cnn", "bn", in_channels=1, momentum=0.01, widths=(8, 8, 16))
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 3 and all(m.momentum == 0.01 for m in bns)
    # model options, via kwargs or mixed into method_opts (as the training engine passes them)
    assert build_model("convpool_cnn_c", "pws", width=0.25).fc.in_features == 48
    assert build_model("resnet_cifar_small", "bn", width=0.5).fc.in_features == 32
    assert build_model("resnet50_small", "pws", width=0.5, layers=(1, 1)).fc.in_features == 256  # 2 stages: 64·4
    assert build_model("resnet_cifar", "bn", method_opts={"depth": 8}) is not None
    with pytest.raises(ValueError, match="gamma"):
        build_model("tiny_cnn", "bn", gamma=1e-3)
    with pytest.raises(ValueError, match="depth"):
        build_model("resnet_cifar", "bn", depth=21)
    with pytest.raises(ValueError, match="shortcut"):
        build_model("resnet20", "bn", shortcut="C")


def test_init_he_convs_and_small_normal_classifier():
    torch.manual_seed(0)
    net = build_model("convpool_cnn_c", "none")
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            if m.weight.numel() > 10_000:
                assert m.weight.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.05)
            assert m.bias is not None and (m.bias == 0).all()
    assert net.fc.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert (net.fc.bias == 0).all()
    bn_net = build_model("resnet20", "bn")
    assert all(m.bias is None for m in bn_net.modules() if isinstance(m, nn.Conv2d))  # the norm has the shift


def test_vgg_adaptive_pool_larger_inputs():
    net = build_model("vgg_small", "pws")
    with torch.no_grad():
        assert net(torch.randn(1, 3, 96, 96)).shape == (1, 10)
    assert sum(isinstance(m, pwsconv.PWSConv2d) for m in build_model("vgg16", "pws").modules()) == 13


def test_full_vgg16_forward():
    net = build_model("vgg16", "bn")
    out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_pws_models_fold_to_plain_convs():
    torch.manual_seed(0)
    net = build_model("resnet_cifar_small", "pws", pws_variant=True).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = net(x)
        folded = pwsconv.fold(net)
        assert not any(isinstance(m, pwsconv.PWSConv2d) for m in folded.modules())
        torch.testing.assert_close(folded(x), ref, rtol=1e-4, atol=1e-5)


def test_safe_pool_and_pad_helpers():
    pool = SafeMaxPool2d(2, 2)
    assert pool(torch.randn(1, 2, 1, 1)).shape == (1, 2, 1, 1)
    assert pool(torch.randn(1, 2, 4, 4)).shape == (1, 2, 2, 2)
    pad = PadToMin(3)
    assert pad(torch.randn(1, 2, 2, 2)).shape == (1, 2, 3, 3)
    x = torch.randn(1, 2, 5, 5)
    assert pad(x) is x


def test_tiny_cnn_trains_with_pws_on_a_toy_batch():
    """Smoke check: SGD steps at a large LR reduce the loss of a (shallow) PWS net. The class is a left/right contrast
    (PWS filters are zero-mean, so a pure brightness offset would be invisible to them)."""
    torch.manual_seed(0)
    x = torch.randn(64, 1, 8, 8)
    s = torch.sign(torch.randn(64, 1, 1, 1))
    x[..., :4] += s
    x[..., 4:] -= s
    y = (s.flatten() > 0).long()
    net = build_model("tiny_cnn", "pws", num_classes=2, in_channels=1, widths=(16, 32, 32))
    opt = torch.optim.SGD(pwsconv.param_groups(net, 5e-4), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert math.isfinite(losses[-1]) and losses[-1] < 0.8 * losses[0]
