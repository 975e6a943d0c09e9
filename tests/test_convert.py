"""Whole-model conversion (``pwsconv.convert``) and optimizer groups (``pwsconv.param_groups``)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import pwsconv
from pwsconv import PWSConv1d, PWSConv2d, PWSConv3d, PWSConvTranspose2d, PWSLinear

PWS_OF = {nn.Conv1d: PWSConv1d, nn.Conv2d: PWSConv2d, nn.Conv3d: PWSConv3d}
CONV_HYPER = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")


# ------------------------------------------------------------------------------------------------ test networks
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class TinyResNet(nn.Module):
    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(8, 8))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, stride=2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _dw_separable(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(),
        nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6(),
    )


class TinyMobileNet(nn.Module):
    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
            _dw_separable(8, 16, 1),
            _dw_separable(16, 16, 2),
            nn.Conv2d(16, 16, (1, 3), padding=(0, 2), dilation=(1, 2), padding_mode="replicate"),  # non-square
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


NETS = {"resnet": (TinyResNet, (2, 3, 6, 6), 5), "mobilenet": (TinyMobileNet, (2, 3, 8, 8), 4)}


def build(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor, int]:
    torch.manual_seed(seed)
    cls, shape, ncls = NETS[name]
    return cls(), torch.randn(shape), ncls


def convs_of(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)}


def bns_of(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ======================================================================================================= convert
@pytest.mark.parametrize("name", list(NETS))
def test_convert_to_pws(name):
    model, x, ncls = build(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    convs, bns = convs_of(model), bns_of(model)
    assert convs and bns
    pws = pwsconv.convert(model)
    assert pws is not model
    mods = dict(pws.named_modules())
    for n, conv in convs.items():
        new = mods[n]
        assert type(new) is PWS_OF[type(conv)], n
        for h in CONV_HYPER:
            assert getattr(new, h) == getattr(conv, h), (n, h)
        assert new.bias is not None  # β_o: the BN shift is gone, PWS convs carry a bias
        assert new.gamma == 1e-3 and torch.equal(new.alpha, torch.ones(new.out_channels))
    for n in bns:
        assert type(mods[n]) is nn.Identity, n
    assert not bns_of(pws)
    assert type(pws.fc if name == "resnet" else pws.classifier) is nn.Linear  # the head stays plain by default
    # the original is untouched
    assert convs_of(model).keys() == convs.keys() and all(type(m) in PWS_OF for m in convs_of(model).values())
    assert bns_of(model).keys() == bns.keys()
    assert state_equal(model.state_dict(), before)
    # runs forward and backward, in train and eval mode
    y = pws(x)
    assert y.shape == (x.shape[0], ncls) and torch.isfinite(y).all()
    y.square().mean().backward()
    for pn, p in pws.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pn
    with torch.no_grad():
        assert pws.eval()(x).shape == (x.shape[0], ncls)


def test_convert_options_pass_through():
    model, x, _ = build("resnet")
    pws = pwsconv.convert(model, gamma=1e-4, equiv=True, fan_mode="fan_out", use_alpha=False)
    for m in convs_of(pws).values():
        assert m.gamma == 1e-4 and m.equiv and m.fan_mode == "fan_out" and m.alpha is None
    nobias = pwsconv.convert(model, bias=False)
    assert all(m.bias is None for m in convs_of(nobias).values())
    with pytest.raises(ValueError):
        pwsconv.convert(model, not_an_option=1)
    with pytest.raises(ValueError):
        pwsconv.convert(model, "bn", gamma=1e-3)  # an option the method does not take
    with pytest.raises(ValueError):
        pwsconv.convert(model, method="nope")
    with pytest.raises(ValueError):
        pwsconv.convert(model, gamma=-1.0)


def test_convert_exclude():
    model, x, _ = build("resnet")
    pws = pwsconv.convert(model, exclude=["conv1", "fc"], convert_linear=True)
    assert type(pws.conv1) is nn.Conv2d
    assert type(pws.fc) is nn.Linear
    assert type(pws.layer1[0].conv1) is PWSConv2d  # "conv1" matches the full name only
    pws2 = pwsconv.convert(model, exclude=["layer2.*", "bn1"])
    assert type(pws2.bn1) is nn.BatchNorm2d
    assert all(type(m) is nn.Conv2d for m in convs_of(pws2.layer2).values())
    assert type(pws2.layer2[0].downsample[1]) is nn.BatchNorm2d
    assert type(pws2.layer1[0].conv2) is PWSConv2d and type(pws2.layer1[0].bn2) is nn.Identity
    pws3 = pwsconv.convert(model, exclude=["layer1"])  # a module name excludes its subtree
    assert all(type(m) is nn.Conv2d for m in convs_of(pws3.layer1).values())
    assert type(pws3.layer2[0].conv1) is PWSConv2d
    assert pws(x).shape == pws2(x).shape == pws3(x).shape == (2, 5)


def test_convert_exclude_that_matches_nothing_warns_or_raises():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.warns(UserWarning, match=r"exclude pattern\(s\) \['layer4\.\*', '7'\] match no module"):
        out = pwsconv.convert(model, exclude=["layer4.*", "7", "0"])
    assert type(out[0]) is nn.Conv2d and type(out[1]) is nn.BatchNorm2d   # the excluded conv keeps its BN
    with pytest.raises(ValueError, match="match no module"):
        pwsconv.convert(model, exclude="conv1", strict=True, inplace=True)
    assert type(model[0]) is nn.Conv2d and type(model[1]) is nn.BatchNorm2d   # nothing changed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pwsconv.convert(model, exclude="1", strict=True)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_exclude_keeps_the_units_bn_and_convert_keeps_what_the_user_set():
    """An excluded conv keeps the BN right after it (torchvision's stem: ``exclude=["conv1"]``), with copy_weights
    too (no BN lost); frozen and channels_last convs stay so; a bare conv or BN is converted; converting PWS layers
    again with options lists them (their options are not changed behind the user's back)."""
    class Stem(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8)
            self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8)

        def forward(self, x):
            return self.bn2(self.conv2(self.bn1(self.conv1(x))))

    torch.manual_seed(0)
    model = Stem().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = pwsconv.convert(model, exclude=["conv1"], copy_weights=True)
    assert type(out.conv1) is nn.Conv2d and type(out.bn1) is nn.BatchNorm2d
    assert type(out.conv2) is pwsconv.PWSConv2d and type(out.bn2) is nn.Identity
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(out.bn1(out.conv1(x)), model.bn1(model.conv1(x)), rtol=0, atol=0)
    frozen = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).to(memory_format=torch.channels_last)
    frozen[0].weight.requires_grad_(False)
    frozen[0].bias.requires_grad_(False)
    new = pwsconv.convert(frozen)[0]
    assert not (new.weight.requires_grad or new.alpha.requires_grad or new.bias.requires_grad)
    assert new.weight.is_contiguous(memory_format=torch.channels_last)
    assert pwsconv.convert(nn.Sequential(nn.Conv2d(3, 8, 3)))[0].weight.requires_grad
    assert type(pwsconv.convert(nn.Conv2d(3, 8, 3), strict=True)) is pwsconv.PWSConv2d
    assert type(pwsconv.convert(nn.BatchNorm2d(8), strict=True)) is nn.Identity
    pws = pwsconv.convert(nn.Sequential(nn.Conv2d(3, 8, 3)))
    with pytest.warns(UserWarning, match="already a PWSConv2d: its options are unchanged"):
        again = pwsconv.convert(pws, gamma=1e-2)
    assert again[0].gamma == 1e-3
    with pytest.raises(ValueError, match="already a PWSConv2d"):
        pwsconv.convert(pws, gamma=1e-2, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pwsconv.convert(pws)                      # converting twice without options: nothing to say


def test_convert_torchscript_module_is_refused():
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    with pytest.raises(TypeError, match=r"torch\.jit \(TorchScript\) modules cannot be converted"):
        pwsconv.convert(scripted)


def test_convert_shared_layers_and_string_exclude():
    conv, bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
    model = nn.Sequential(conv, bn, nn.ReLU(), conv, bn)
    pws = pwsconv.convert(model)
    assert type(pws[0]) is PWSConv2d and pws[0] is pws[3]  # converted once, still shared
    assert type(pws[1]) is nn.Identity and type(pws[4]) is nn.Identity
    block = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3))
    tied = pwsconv.convert(nn.Sequential(block, block))
    assert tied[0] is tied[1] and type(tied[0][0]) is PWSConv2d
    one = pwsconv.convert(nn.Sequential(nn.Conv2d(3, 3, 3), nn.Conv2d(3, 3, 3)), exclude="0")
    assert type(one[0]) is nn.Conv2d and type(one[1]) is PWSConv2d


def test_convert_copy_weights():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, bias=True), nn.BatchNorm2d(6), nn.Conv1d(2, 2, 2), nn.Linear(4, 3))
    with torch.no_grad():
        model[0].bias.normal_()
    pws = pwsconv.convert(model, copy_weights=True, convert_linear=True)
    assert torch.equal(pws[0].weight, model[0].weight)   # raw weights copied; the (default) BN is folded into β
    torch.testing.assert_close(pws[0].bias, model[0].bias / (1 + 1e-5) ** 0.5)
    assert torch.equal(pws[2].weight, model[2].weight)
    assert type(pws[3]) is PWSLinear and torch.equal(pws[3].weight, model[3].weight)
    fresh = pwsconv.convert(model)
    assert not torch.equal(fresh[0].weight, model[0].weight)
    # the raw weights are copied, not shared
    with torch.no_grad():
        pws[0].weight.zero_()
    assert model[0].weight.abs().sum() > 0


def test_convert_inplace():
    model, x, _ = build("resnet")
    out = pwsconv.convert(model, inplace=True)
    assert out is model
    assert type(model.conv1) is PWSConv2d and type(model.bn1) is nn.Identity and not bns_of(model)
    assert model(x).shape == (2, 5)


def test_convert_input_and_output_norm():
    model, x, _ = build("resnet")
    pws = pwsconv.convert(model, input_norm=True, output_norm=True)
    stem = pws.conv1
    assert isinstance(stem, nn.Sequential) and type(stem[0]) is PWSConv2d
    assert type(stem[1]) is nn.GroupNorm and stem[1].num_groups == 1 and stem[1].num_channels == 8
    neck = pws.avgpool
    assert isinstance(neck, nn.Sequential) and type(neck[0]) is nn.GroupNorm and type(neck[1]) is nn.AdaptiveAvgPool2d
    assert neck[0].num_groups == 1 and neck[0].num_channels == 16
    y = pws(x)
    assert y.shape == (2, 5)
    y.sum().backward()
    assert stem[1].weight.grad is not None and neck[0].weight.grad is not None
    # the GN after the stem sees the stem conv's output
    seen = {}
    stem[1].register_forward_hook(lambda m, i, o: seen.update(inp=i[0].clone()))
    with torch.no_grad():
        pws(x)
        torch.testing.assert_close(seen["inp"], stem[0](x))
    # named positions, and the MobileNet-like net
    mb, xm, _ = build("mobilenet")
    pm = pwsconv.convert(mb, input_norm="features.0", output_norm="pool")
    assert isinstance(pm.features[0], nn.Sequential) and pm.features[0][1].num_channels == 8
    assert pm.pool[0].num_channels == 16
    assert pm(xm).shape == (2, 4)
    with pytest.raises(ValueError):
        pwsconv.convert(mb, output_norm="no_such_module")
    with pytest.raises(ValueError):
        pwsconv.convert(mb, input_norm="no_such_module")
    with pytest.raises(ValueError):
        pwsconv.convert(nn.Sequential(nn.Conv2d(3, 3, 3)), output_norm=True)  # no global pooling


def test_convert_1x1_depthwise_left_plain_with_warning():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1, groups=8), nn.BatchNorm2d(8))
    with pytest.warns(UserWarning, match="left as Conv2d"):
        pws = pwsconv.convert(model)
    assert type(pws[0]) is PWSConv2d
    assert type(pws[2]) is nn.Conv2d and pws[2].groups == 8
    assert type(pws[1]) is nn.Identity and type(pws[3]) is nn.Identity
    assert pws(torch.randn(1, 3, 5, 5)).shape == (1, 8, 3, 3)
    with pytest.warns(UserWarning, match="left as Linear"):
        lin = pwsconv.convert(nn.Sequential(nn.Linear(1, 4), nn.Linear(4, 2)), convert_linear=True)
    assert type(lin[0]) is nn.Linear and type(lin[1]) is PWSLinear


def test_convert_linear_and_transposed():
    model, x, _ = build("mobilenet")
    pws = pwsconv.convert(model, convert_linear=True)
    assert type(pws.classifier) is PWSLinear
    assert pws.classifier.in_features == 16 and pws.classifier.out_features == 4
    assert pws(x).shape == (2, 4)
    dec = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, output_padding=1), nn.BatchNorm2d(6))
    kept = pwsconv.convert(dec)
    assert type(kept[0]) is nn.ConvTranspose2d  # only with convert_transposed
    conv = pwsconv.convert(dec, convert_transposed=True)
    assert type(conv[0]) is PWSConvTranspose2d
    for h in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "output_padding", "groups",
              "dilation"):
        assert getattr(conv[0], h) == getattr(dec[0], h)
    xt = torch.randn(1, 4, 3, 3)
    assert conv(xt).shape == dec(xt).shape


def test_convert_other_methods():
    model, x, _ = build("resnet")
    bn = pwsconv.convert(model, "bn")
    assert len(bns_of(bn)) == len(bns_of(model))
    assert all(type(m) is nn.Conv2d for m in convs_of(bn).values())
    assert bn(x).shape == (2, 5)
    gn = pwsconv.convert(model, "gn")
    assert not bns_of(gn)
    gns = [m for m in gn.modules() if type(m) is nn.GroupNorm]
    assert len(gns) == len(bns_of(model))
    assert all(m.num_groups == m.num_channels for m in gns)  # ≤ 32 channels: one channel per group
    assert gn(x).shape == (2, 5)
    gn4 = pwsconv.convert(model, "gn", groups=4)  # method options reach the norm, not the conv
    assert all(m.num_groups == 4 for m in gn4.modules() if type(m) is nn.GroupNorm)
    assert all(m.groups == 1 for m in convs_of(gn4).values())
    none = pwsconv.convert(model, "none")
    assert not bns_of(none)
    for n, m in convs_of(none).items():
        assert type(m) is nn.Conv2d and m.bias is not None, n
    assert none(x).shape == (2, 5)
    ln = pwsconv.convert(model, "ln")
    assert all(m.num_groups == 1 for m in ln.modules() if type(m) is nn.GroupNorm)


def test_convert_keeps_dtype_device_and_mode():
    model, x, _ = build("mobilenet")
    model = model.double().eval()
    pws = pwsconv.convert(model, convert_linear=True, input_norm=True, output_norm=True)
    assert all(p.dtype == torch.float64 for p in pws.parameters())
    assert not any(m.training for m in pws.modules())
    y = pws(x.double())
    assert y.dtype == torch.float64 and y.shape == (2, 4)


def test_convert_does_not_reconvert_pws_layers():
    model, x, _ = build("resnet")
    pws = pwsconv.convert(model)
    with torch.no_grad():
        pws.conv1.alpha.fill_(3.0)
    again = pwsconv.convert(pws)
    assert torch.equal(again.conv1.alpha, pws.conv1.alpha)
    torch.testing.assert_close(again.eval()(x), pws.eval()(x))


def test_convert_torchvision_resnet18():
    tv = pytest.importorskip("torchvision")
    model = tv.models.resnet18(num_classes=10)
    pws = pwsconv.convert(model, input_norm=True, output_norm=True)
    assert not bns_of(pws)
    assert all(type(m) is PWSConv2d for m in convs_of(pws).values())
    assert pws.conv1[1].num_channels == 64 and pws.avgpool[0].num_channels == 512
    y = pws(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 10)
    y.sum().backward()
    folded = pwsconv.fold(pws.eval())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), pws(x), rtol=1e-4, atol=1e-4)


# ================================================================================================== param_groups
def _by_name(groups):
    return {g["name"]: g for g in groups}


def test_param_groups_alpha_without_weight_decay():
    model, x, _ = build("resnet")
    pws = pwsconv.convert(model, convert_linear=True, input_norm=True)
    groups = pwsconv.param_groups(pws, 5e-4)
    by = _by_name(groups)
    alphas = [m.alpha for m in pws.modules() if getattr(m, "alpha", None) is not None]
    assert alphas
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(by["no_decay"]["params"]) == ids(alphas) and by["no_decay"]["weight_decay"] == 0.0
    assert by["decay"]["weight_decay"] == 5e-4 and by["bias"]["weight_decay"] == 5e-4
    assert by["norm"]["weight_decay"] == 5e-4
    weights = [m.weight for m in pws.modules() if isinstance(m, pwsconv.PWSMixin)]
    assert ids(weights) <= ids(by["decay"]["params"])
    gn = pws.conv1[1]
    assert ids([gn.weight, gn.bias]) == ids(by["norm"]["params"])
    # every trainable parameter exactly once
    flat = [p for g in groups for p in g["params"]]
    assert len(flat) == len(set(map(id, flat))) and ids(flat) == ids(pws.parameters())
    # usable by an optimizer, and α really is not decayed
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    a0 = pws.conv1[0].alpha.detach().clone()
    w0 = pws.conv1[0].weight.detach().clone()
    opt.zero_grad()
    for p in pws.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # zero gradients: only weight decay moves parameters
    assert torch.equal(pws.conv1[0].alpha, a0)
    assert not torch.equal(pws.conv1[0].weight, w0)
    opt.zero_grad()
    pws(x).sum().backward()
    opt.step()


def test_param_groups_options():
    pws = pwsconv.convert(TinyResNet(), input_norm=True)
    by = _by_name(pwsconv.param_groups(pws, 1e-4, bias_weight_decay=0.0, norm_weight_decay=0.0,
                                       no_decay_weight_decay=1e-6))
    assert by["bias"]["weight_decay"] == 0.0 and by["norm"]["weight_decay"] == 0.0
    assert by["no_decay"]["weight_decay"] == 1e-6 and by["decay"]["weight_decay"] == 1e-4
    biases = [m.bias for m in pws.modules() if isinstance(m, (PWSConv2d, nn.Linear))]
    assert {id(b) for b in biases} == {id(p) for p in by["bias"]["params"]}
    # frozen parameters are left out; empty groups are dropped
    pws.fc.requires_grad_(False)
    for m in pws.modules():
        if getattr(m, "alpha", None) is not None:
            m.alpha.requires_grad_(False)
    groups = pwsconv.param_groups(pws, 1e-4)
    flat = {id(p) for g in groups for p in g["params"]}
    assert id(pws.fc.weight) not in flat and id(pws.fc.bias) not in flat
    assert "no_decay" not in _by_name(groups)
    assert all(g["params"] for g in groups)
    # shared parameters appear once
    shared = nn.Linear(3, 3)
    tied = nn.Sequential(shared, shared)
    flat = [p for g in pwsconv.param_groups(tied, 0.1) for p in g["params"]]
    assert len(flat) == 2
    # a plain model has no no_decay group
    plain = _by_name(pwsconv.param_groups(TinyResNet(), 1e-4))
    assert set(plain) == {"decay", "bias", "norm"}


@pytest.mark.parametrize("kw", [{"weight_decay": -1e-4}, {"weight_decay": float("nan")},
                                {"weight_decay": float("inf")}, {"weight_decay": 1e-4, "bias_weight_decay": -1.0},
                                {"weight_decay": 1e-4, "norm_weight_decay": -1.0},
                                {"weight_decay": 1e-4, "no_decay_weight_decay": -1.0},
                                {"weight_decay": "1e-4"}])
def test_param_groups_bad_weight_decay(kw):
    with pytest.raises(ValueError):
        pwsconv.param_groups(nn.Linear(2, 2), **kw)
