"""convert() on every BatchNorm-like and conv-like layer, with stand-ins for the torchvision/timm classes
(the real ones are exercised by tests/integration/), and copy_weights carrying a pretrained conv+BN unit over."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pwsconv
from pwsconv import PWSConv2d, PWSLinear
from pwsconv.layers.lazy import LazyPWSConv2d
from pwsconv.layers.same import Conv2dSame, PWSConv2dSame, pad_same


# ------------------------------------------------------------------ stand-ins, shaped like the library classes
class BatchNormAct2d(nn.BatchNorm2d):   # timm.layers.BatchNormAct2d: BN → drop → act
    def __init__(self, c: int, act: bool = True, drop: float = 0.0):
        super().__init__(c)
        self.drop = nn.Dropout(drop) if drop else nn.Identity()
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


class FrozenBatchNorm2d(nn.Module):     # torchvision.ops.FrozenBatchNorm2d: four buffers
    def __init__(self, n: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return x * scale.view(1, -1, 1, 1) + (self.bias - self.running_mean * scale).view(1, -1, 1, 1)


class TfConv2dSame(nn.Conv2d):          # timm.layers.Conv2dSame
    def __init__(self, cin, cout, k, stride=1, bias=True):
        super().__init__(cin, cout, k, stride, 0, bias=bias)

    def forward(self, x):
        return F.conv2d(pad_same(x, self.kernel_size, self.stride, self.dilation), self.weight, self.bias,
                        self.stride, 0, self.dilation, self.groups)


class StdConv2d(nn.Conv2d):             # timm.layers.StdConv2d
    def __init__(self, cin, cout, k, padding=0, eps=1e-6):
        super().__init__(cin, cout, k, padding=padding, bias=False)
        self.eps = eps

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                         eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledStdConv2d(nn.Conv2d):       # timm.layers.ScaledStdConv2d
    def __init__(self, cin, cout, k, padding=0, gamma=1.0, eps=1e-6):
        super().__init__(cin, cout, k, padding=padding, bias=True)
        self.gain = nn.Parameter(torch.full((cout, 1, 1, 1), 1.3))
        self.scale = gamma * self.weight[0].numel() ** -0.5
        self.eps = eps

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0,
                         eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class PlainSubclass(nn.Conv2d):         # a subclass that only adds attributes: converted like nn.Conv2d
    tag = "mine"


class OddConv(nn.Conv2d):               # a forward nobody can reproduce: left, and listed
    def forward(self, x):
        return super().forward(x).flip(-1)


def _bns(model):
    return [m for m in model.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d))]


def _warm(model, shape=(16, 3, 12, 12), steps=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(shape, generator=g) + 0.3)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) and m.affine:
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.3, 0.3, generator=g)
    return model.eval()


# ------------------------------------------------------------------ BatchNorm-like layers
def test_batchnorm_act_keeps_drop_and_act():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8, drop=0.1), nn.Conv2d(8, 4, 3), BatchNormAct2d(4, act=False))
    pws = pwsconv.convert(model)
    assert not _bns(pws)
    assert isinstance(pws[1], nn.Sequential) and list(pws[1]._modules) == ["drop", "act"]
    assert type(pws[1].act) is nn.ReLU and pws[1].drop.p == 0.1
    assert type(pws[3]) is nn.Identity   # no act, no drop: nothing left
    gn = pwsconv.convert(model, "gn")
    assert list(gn[1]._modules) == ["norm", "drop", "act"] and type(gn[1].norm) is nn.GroupNorm
    assert pwsconv.convert(model, "bn")[1] is not None and type(pwsconv.convert(model, "bn")[1]) is BatchNormAct2d
    assert pws(torch.randn(2, 3, 9, 9)).shape == (2, 4, 5, 5)


@pytest.mark.parametrize("method", ["pws", "gn", "none"])
def test_frozen_sync_and_lazy_batchnorm(method):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), FrozenBatchNorm2d(8), nn.Conv2d(8, 8, 3), nn.SyncBatchNorm(8),
                          nn.Conv1d(8, 8, 1) if False else nn.Identity())
    out = pwsconv.convert(model, method)
    assert not _bns(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch's "lazy modules are a new feature"
        lazy = nn.Sequential(nn.Conv2d(3, 8, 3), nn.LazyBatchNorm2d())
    if method == "gn":   # GroupNorm needs the channels a lazy BN does not know yet: listed, strict raises
        with pytest.warns(UserWarning, match="lazy BatchNorm"):
            pwsconv.convert(lazy, method)
        with pytest.raises(ValueError, match="left unconverted"):
            pwsconv.convert(lazy, method, strict=True)
    else:
        assert type(pwsconv.convert(lazy, method)[1]) is nn.Identity


def test_lazy_conv_becomes_pws_on_first_forward():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = nn.Sequential(nn.LazyConv2d(8, 3, padding=1), nn.LazyBatchNorm2d(), nn.ReLU(), nn.LazyConv2d(4, 1))
    pws = pwsconv.convert(model, gamma=1e-2)          # a deep copy of uninitialized parameters works
    assert type(pws[0]) is LazyPWSConv2d and type(pws[1]) is nn.Identity
    y = pws(torch.randn(2, 5, 6, 6))
    assert y.shape == (2, 4, 6, 6)
    assert type(pws[0]) is PWSConv2d and pws[0].in_channels == 5 and pws[0].gamma == 1e-2
    assert pws[0].alpha.shape == (8,) and pws[0].bias is not None
    pwsconv.convert(model, inplace=True)
    model(torch.randn(1, 3, 6, 6))
    assert type(model[0]) is PWSConv2d and type(model[3]) is PWSConv2d   # not plain layers after the first batch
    torch.testing.assert_close(pwsconv.fold(model.eval())(torch.ones(1, 3, 6, 6)), model(torch.ones(1, 3, 6, 6)))


# ------------------------------------------------------------------ conv subclasses
def test_conv_subclasses():
    model = nn.Sequential(TfConv2dSame(3, 8, 3, stride=2), nn.BatchNorm2d(8), StdConv2d(8, 8, 3, padding=1),
                          ScaledStdConv2d(8, 8, 3, padding=1), PlainSubclass(8, 8, 1), nn.BatchNorm2d(8))
    pws = pwsconv.convert(model)
    assert type(pws[0]) is PWSConv2dSame and type(pws[2]) is PWSConv2d and type(pws[3]) is PWSConv2d
    assert type(pws[4]) is PWSConv2d and not _bns(pws)
    for size in (7, 8, 9):   # the SAME padding follows the input size, as TF / timm
        x = torch.randn(1, 3, size, size)
        assert pws(x).shape == model.eval()(x).shape == (1, 8, math.ceil(size / 2), math.ceil(size / 2))
    folded = pwsconv.fold(pws.eval())
    assert type(folded[0]) is Conv2dSame
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), pws(x), rtol=1e-4, atol=1e-5)
    again = pwsconv.convert(folded)   # pwsconv's own plain Conv2dSame converts again
    assert type(again[0]) is PWSConv2dSame


def test_unconvertible_layers_listed_in_one_warning_or_strict():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), OddConv(8, 8, 3), nn.Conv2d(8, 8, 1, groups=8))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = pwsconv.convert(model)
    msgs = [str(x.message) for x in w if "left unconverted" in str(x.message)]
    assert len(msgs) == 1 and "2 conv/norm layer(s)" in msgs[0]
    assert "2 (OddConv: a forward of its own)" in msgs[0] and "3 (Conv2d" in msgs[0]
    assert type(out[2]) is OddConv and type(out[0]) is PWSConv2d
    with pytest.raises(ValueError, match="left unconverted"):
        pwsconv.convert(model, inplace=True, strict=True)
    assert type(model[0]) is nn.Conv2d     # strict checks before changing anything
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pwsconv.convert(model, exclude=["2", "3"], strict=True)


# ------------------------------------------------------------------ copy_weights
def _unit(bias=False):
    torch.manual_seed(3)
    return _warm(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=bias), nn.BatchNorm2d(16), nn.ReLU(),
                               nn.Conv2d(16, 8, 3, padding=1, bias=bias), nn.BatchNorm2d(8)))


def test_copy_weights_folds_bn_exactly_for_plain_convs():
    model = _unit()
    none = pwsconv.convert(model, "none", copy_weights=True).eval()
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(none(x), model(x), rtol=1e-5, atol=1e-5)


def test_copy_weights_pws_alpha_beta_from_bn():
    model = _unit(bias=True)
    pws = pwsconv.convert(model, copy_weights=True).eval()
    conv, bn, new = model[0], model[1], pws[0]
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    w = conv.weight.detach()
    var = w.var(dim=(1, 2, 3), unbiased=False)
    torch.testing.assert_close(new.weight, w)                                   # raw weight kept
    torch.testing.assert_close(new.alpha, (s * torch.sqrt(var + new.gamma) / new.gain).detach())
    torch.testing.assert_close(new.bias, (s * (conv.bias - bn.running_mean) + bn.bias).detach())
    # α·Ŵ = the BN-scaled weight minus its per-filter mean: the one thing PWS cannot keep
    scaled = s.detach().view(-1, 1, 1, 1) * w
    torch.testing.assert_close(new.standardized_weight(), scaled - scaled.mean(dim=(1, 2, 3), keepdim=True))
    # so the layer is exact on inputs whose every receptive field sums to 0: here each pixel's channels sum to 0
    # (zero padding adds zeros), and the lost mean·Σ(field) term vanishes
    x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    x = x - x.mean(dim=1, keepdim=True)
    with torch.no_grad():
        ref = model[1](model[0](x))
        got = pws[1](pws[0](x))
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        # and not exact on an ordinary input (the per-filter mean is really lost)
        y = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(1))
        assert not torch.allclose(pws[1](pws[0](y)), model[1](model[0](y)), rtol=1e-3, atol=1e-3)


def test_copy_weights_example_inputs_bias_correction_and_lost_statistics():
    model = _unit()
    g = torch.Generator().manual_seed(1)
    calib, x = torch.randn(32, 3, 12, 12, generator=g) + 0.3, torch.randn(32, 3, 12, 12, generator=g) + 0.3
    plain = pwsconv.convert(model, copy_weights=True).eval()
    corrected = pwsconv.convert(model, copy_weights=True, example_inputs=calib).eval()
    with torch.no_grad():
        ref = model(x)
        err = [float((m(x) - ref).norm() / ref.norm()) for m in (plain, corrected)]
        means = [float((m(x).mean((0, 2, 3)) - ref.mean((0, 2, 3))).abs().max()) for m in (plain, corrected)]
    assert err[1] < err[0] and means[1] < 0.5 * means[0]
    assert model.training is False and all(not m.training for m in model.modules())
    with pytest.raises(ValueError, match="copy_weights"):
        pwsconv.convert(model, example_inputs=calib)
    # a BN with no conv right before it: its statistics are dropped, and the warning says so
    lone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))
    with pytest.warns(UserWarning, match=r"1 BatchNorm layer\(s\).*: 2"):
        pwsconv.convert(lone, copy_weights=True)


def test_copy_weights_std_convs_and_linear():
    torch.manual_seed(4)
    model = nn.Sequential(StdConv2d(3, 8, 3, padding=1), ScaledStdConv2d(8, 8, 3, padding=1)).eval()
    pws = pwsconv.convert(model, copy_weights=True).eval()
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(pws(x), model(x), rtol=1e-3, atol=1e-4)   # both standardize: exact up to ε vs γ
    lin = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5))
    _warm(lin, shape=(32, 6))
    pws = pwsconv.convert(lin, copy_weights=True, convert_linear=True).eval()
    assert type(pws[0]) is PWSLinear and type(pws[1]) is nn.Identity
    w, b = torch.nn.utils.fusion.fuse_linear_bn_weights(lin[0].weight, lin[0].bias, lin[1].running_mean,
                                                        lin[1].running_var, lin[1].eps, lin[1].weight, lin[1].bias)
    torch.testing.assert_close(pws[0].standardized_weight(), (w - w.mean(1, keepdim=True)).detach())
    torch.testing.assert_close(pws[0].bias, b.detach())


def test_same_padded_convs_for_every_method_pickle_in_a_fresh_process(tmp_path):
    import subprocess
    import sys

    model = nn.Sequential(TfConv2dSame(3, 8, 3, stride=2), nn.BatchNorm2d(8))
    for method in ("sws", "wn", "gn"):
        out = pwsconv.convert(model, method)
        assert type(out[0]).__name__.endswith("Same")
        x = torch.randn(1, 3, 9, 9)
        assert out(x).shape == (1, 8, 5, 5)
    path = tmp_path / "m.pt"
    torch.save(pwsconv.convert(model, "sws"), path)
    code = ("import torch, sys; m = torch.load(sys.argv[1], weights_only=False); "
            "print(type(m[0]).__name__, tuple(m(torch.randn(1, 3, 9, 9)).shape))")
    res = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    assert res.stdout.split() == ["SWSConv2dSame", "(1,", "8,", "5,", "5)"]
