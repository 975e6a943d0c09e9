"""Folding (``pwsconv.fold``): a PWS network becomes plain torch layers holding α·Ŵ with the same outputs.

The property test draws random layer kinds (1d/2d/3d conv, transposed conv, linear), shapes, groups, stride, dilation,
padding and padding modes, PWS switches, and random α/bias values set after init.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import pwsconv
from pwsconv import (
    PWSConv1d,
    PWSConv2d,
    PWSConv3d,
    PWSConvTranspose1d,
    PWSConvTranspose2d,
    PWSConvTranspose3d,
    PWSLinear,
)

CONV = {1: PWSConv1d, 2: PWSConv2d, 3: PWSConv3d}
CONVT = {1: PWSConvTranspose1d, 2: PWSConvTranspose2d, 3: PWSConvTranspose3d}
PLAIN = {PWSConv1d: nn.Conv1d, PWSConv2d: nn.Conv2d, PWSConv3d: nn.Conv3d, PWSConvTranspose1d: nn.ConvTranspose1d,
         PWSConvTranspose2d: nn.ConvTranspose2d, PWSConvTranspose3d: nn.ConvTranspose3d, PWSLinear: nn.Linear}
HYPER = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode",
         "output_padding", "in_features", "out_features")


def no_pwsconv_left(model: nn.Module) -> bool:
    return all(not type(m).__module__.startswith("pwsconv") for m in model.modules())


def assert_same_output(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    scale = max(b.abs().max().item(), 1e-30)
    assert (a - b).abs().max().item() <= rtol * scale, (a - b).abs().max().item() / scale


def randomize(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "alpha", None) is not None:
                m.alpha.copy_(torch.rand(m.alpha.shape, generator=g) * 4 - 2)
            if isinstance(m, pwsconv.PWSMixin) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))


@st.composite
def layer_and_input(draw):
    kind = draw(st.sampled_from(["conv", "conv", "convT", "linear"]))
    opts = dict(
        gamma=draw(st.sampled_from([1e-12, 1e-5, 1e-3, 0.1])),   # γ > 0 (issue 22)
        use_alpha=draw(st.booleans()),
        use_gain=draw(st.booleans()),
        fan_mode=draw(st.sampled_from(["fan_in", "fan_out"])),
        equiv=draw(st.booleans()),
    )
    bias = draw(st.booleans())
    batch = draw(st.integers(1, 2))
    if kind == "linear":
        fin, fout = draw(st.integers(2, 6)), draw(st.integers(1, 4))
        lead = draw(st.sampled_from([(batch,), (batch, 3)]))
        return PWSLinear(fin, fout, bias=bias, **opts), lead + (fin,)
    dim = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 3))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 2))
    ks = tuple(draw(st.integers(1, 3)) for _ in range(dim))
    assume((cin // groups) * math.prod(ks) >= 2)  # PWS needs filters of ≥ 2 weights
    stride = tuple(draw(st.integers(1, 2)) for _ in range(dim))
    dil = tuple(draw(st.integers(1, 2)) for _ in range(dim))
    pad = tuple(draw(st.integers(0, 2)) for _ in range(dim))
    if kind == "conv":
        mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
        padding: object = pad
        if draw(st.integers(0, 5)) == 0:  # padding="same" (stride 1 only)
            stride, padding, pad = (1,) * dim, "same", tuple(d * (k - 1) for d, k in zip(dil, ks))
        sizes = tuple(max(d * (k - 1) + 1 - 2 * p, p + 1, 1) + draw(st.integers(0, 2))
                      for d, k, p in zip(dil, ks, pad))
        layer = CONV[dim](cin, cout, ks, stride=stride, padding=padding, dilation=dil, groups=groups, bias=bias,
                          padding_mode=mode, **opts)
    else:
        outpad = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dil))
        sizes = tuple(draw(st.integers(1, 3)) for _ in range(dim))
        out = [(n - 1) * s - 2 * p + d * (k - 1) + op + 1
               for n, s, p, d, k, op in zip(sizes, stride, pad, dil, ks, outpad)]
        assume(all(o >= 1 for o in out))
        layer = CONVT[dim](cin, cout, ks, stride=stride, padding=pad, output_padding=outpad, groups=groups,
                           bias=bias, dilation=dil, **opts)
    return layer, (batch, cin) + sizes


@settings(max_examples=80, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(case=layer_and_input(), seed=st.integers(0, 2**16), train=st.booleans())
def test_fold_random_layers(case, seed, train):
    layer, shape = case
    torch.manual_seed(seed)
    randomize(layer, seed)
    model = nn.Sequential(nn.Sequential(layer), nn.Identity()).train(train)
    x = torch.randn(shape)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        y = model(x)
    folded = pwsconv.fold(model)
    assert no_pwsconv_left(folded)
    plain = folded[0][0]
    assert type(plain) is PLAIN[type(layer)]
    assert plain.training == train
    for h in HYPER:
        if hasattr(layer, h):
            assert getattr(plain, h) == getattr(layer, h), h
    assert (plain.bias is None) == (layer.bias is None)
    with torch.no_grad():
        assert_same_output(folded(x), y)
        assert_same_output(folded.eval()(x), model.eval()(x))
    # the original is untouched (a deep copy was folded)
    assert model[0][0] is layer and isinstance(layer, pwsconv.PWSMixin)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_fold_inplace_and_copy():
    torch.manual_seed(0)
    model = nn.Sequential(PWSConv2d(3, 4, 3, padding=1), nn.ReLU(), PWSConv2d(4, 4, 3, groups=2))
    randomize(model, 0)
    x = torch.randn(2, 3, 6, 6)
    y = model(x).detach()
    copy_folded = pwsconv.fold(model)
    assert copy_folded is not model and isinstance(model[0], PWSConv2d) and isinstance(model[2], PWSConv2d)
    same = pwsconv.fold(model, inplace=True)
    assert same is model
    assert type(model[0]) is nn.Conv2d and type(model[2]) is nn.Conv2d and no_pwsconv_left(model)
    assert_same_output(model(x).detach(), y)
    assert_same_output(copy_folded(x).detach(), y)
    # folding a plain model is a no-op copy
    again = pwsconv.fold(model)
    assert_same_output(again(x).detach(), y)


def test_fold_top_level_layer_and_shared_layer():
    torch.manual_seed(1)
    layer = PWSConvTranspose2d(4, 6, 3, stride=2, groups=2)
    randomize(layer, 1)
    x = torch.randn(1, 4, 3, 3)
    plain = pwsconv.fold(layer)
    assert type(plain) is nn.ConvTranspose2d
    assert_same_output(plain(x).detach(), layer(x).detach())
    shared = PWSConv2d(3, 3, 3, padding=1)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    folded = pwsconv.fold(model)
    assert no_pwsconv_left(folded)
    assert folded[0] is folded[2]  # sharing survives folding
    x = torch.randn(1, 3, 5, 5)
    assert_same_output(folded(x).detach(), model(x).detach())


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = PWSConv2d(cin, cout, 3, stride=stride, padding=1)
        self.conv2 = PWSConv2d(cout, cout, 3, padding=1, padding_mode="reflect")
        self.down = PWSConv2d(cin, cout, 1, stride=stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return self.down(x) + self.conv2(torch.relu(self.conv1(torch.relu(x))))


def _nested_net() -> nn.Module:
    return nn.Sequential(
        PWSConv2d(3, 8, 3, padding=1),
        nn.GroupNorm(1, 8),
        _Block(8, 8, 1),
        _Block(8, 16, 2),
        nn.Sequential(nn.GroupNorm(1, 16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
        PWSLinear(16, 5),
    )


def test_fold_nested_model():
    torch.manual_seed(2)
    net = _nested_net()
    randomize(net, 2)
    net.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        y = net(x)
    folded = pwsconv.fold(net)
    assert no_pwsconv_left(folded)
    assert isinstance(folded[2], _Block) and type(folded[3].down) is nn.Conv2d and type(folded[5]) is nn.Linear
    assert not folded.training and not folded[3].conv1.training
    with torch.no_grad():
        assert_same_output(folded(x), y)
    # a folded model is an ordinary torch model: state_dict without alpha, trainable
    assert not any(k.endswith("alpha") for k in folded.state_dict())
    folded.train()(x).sum().backward()
    assert all(p.grad is not None for p in folded.parameters())


def test_fold_converted_resnet_like_model():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, groups=8, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    pws = pwsconv.convert(net, convert_linear=True, input_norm=True, output_norm=True)
    randomize(pws, 3)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        y = pws.eval()(x)
    folded = pwsconv.fold(pws)
    assert no_pwsconv_left(folded)
    with torch.no_grad():
        assert_same_output(folded(x), y)


def test_fold_float64_and_bf16():
    torch.manual_seed(4)
    layer = PWSConv2d(4, 6, 3, groups=2).double()
    randomize(layer, 4)
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    plain = pwsconv.fold(layer)
    assert plain.weight.dtype == torch.float64
    torch.testing.assert_close(plain(x), layer(x), rtol=1e-12, atol=1e-12)
    lb = PWSConv2d(4, 6, 3).to(torch.bfloat16)
    pb = pwsconv.fold(lb)
    assert pb.weight.dtype == torch.bfloat16
    assert torch.equal(pb.weight, lb.standardized_weight().detach())


def test_folded_model_torch_compile():
    torch.manual_seed(5)
    net = _nested_net().eval()
    randomize(net, 5)
    folded = pwsconv.fold(net)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        y = net(x)
        for backend in ("eager", "aot_eager"):
            torch._dynamo.reset()
            assert_same_output(torch.compile(folded, backend=backend, fullgraph=True)(x), y)


@pytest.mark.slow
def test_folded_model_torch_compile_inductor():
    # default inductor backend on a tiny net (≈ 20 s cold on 2 CPU cores, a few seconds with a warm cache)
    torch.manual_seed(6)
    net = nn.Sequential(PWSConv2d(3, 8, 3, padding=1), nn.ReLU(), PWSConv2d(8, 8, 3, padding=1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), PWSLinear(8, 4)).eval()
    randomize(net, 6)
    folded = pwsconv.fold(net)
    x = torch.randn(2, 3, 8, 8)
    torch._dynamo.reset()
    with torch.no_grad():
        y = torch.compile(folded)(x)
        assert_same_output(y, net(x), rtol=1e-4)


def test_folded_model_onnx_export(tmp_path):
    onnx = pytest.importorskip("onnx")
    torch.manual_seed(7)
    net = _nested_net().eval()
    folded = pwsconv.fold(net)
    x = torch.randn(1, 3, 8, 8)
    path = tmp_path / "pws.onnx"
    try:
        import onnxscript  # noqa: F401

        torch.onnx.export(folded, (x,), str(path))
    except ImportError:
        torch.onnx.export(folded, (x,), str(path), dynamo=False)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    ops = {n.op_type for n in model.graph.node}
    assert "Conv" in ops
    try:
        import onnxruntime as ort
    except ImportError:
        pytest.skip("exported and checked; onnxruntime is not installed, so the outputs were not compared")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert_same_output(torch.from_numpy(out), net(x), rtol=1e-4)


def test_folded_state_dict_loads_into_plain_architecture():
    torch.manual_seed(8)
    pws = nn.Sequential(PWSConv2d(3, 4, 3), nn.ReLU(), PWSLinear(4, 2))
    randomize(pws, 8)
    folded = pwsconv.fold(pws)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Linear(4, 2))
    plain.load_state_dict(folded.state_dict())  # strict: exactly the plain keys
    x = torch.randn(2, 3, 3, 3)
    h = torch.randn(5, 4)
    with torch.no_grad():
        assert_same_output(plain[0](x), pws[0](x))
        assert_same_output(plain[2](h), pws[2](h))


# ------------------------------------------------------------------------------------------ BatchNorm folding
def _warm_bn(model, in_ch=3, size=16, steps=3):
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(8, in_ch, size, size))
    return model.eval()


@pytest.mark.parametrize("model_name,method,opts", [
    ("resnet_cifar_small", "bn", {}), ("convpool_cnn_c_small", "bn", {}), ("resnet50_small", "bn", {}),
    ("resnet_cifar_small", "mabn", {"batch_size": 8, "real_batch_size": 16}),
])
def test_fold_merges_eval_batchnorm_into_the_conv(model_name, method, opts):
    from pwsconv.models import build_model

    torch.manual_seed(0)
    net = build_model(model_name, method=method, method_opts=opts)
    if method == "mabn":   # MABN's statistics move only with optimizer steps
        net.train()
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        for _ in range(3):
            opt.zero_grad()
            net(torch.randn(8, 3, 32, 32)).square().mean().backward()
            opt.step()
        net.eval()
    else:
        _warm_bn(net, size=32)
    x = torch.randn(4, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # nothing left to warn about
        folded = pwsconv.fold(net)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) or type(m).__module__.startswith("pwsconv.layers")
                   for m in folded.modules())
    torch.testing.assert_close(folded(x), net(x), rtol=1e-4, atol=1e-5)
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()) or method == "mabn"


def test_fold_keeps_batchnorms_it_cannot_merge_and_says_so():
    class Twice(nn.Module):          # the conv's output feeds the BN and the residual: merging would change it
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3)
            self.lin = nn.Linear(4, 4)
            self.bn1 = nn.BatchNorm1d(4)

        def forward(self, x):
            y = self.conv(x)
            z = self.bn(y) + y
            return z.mean((2, 3)) @ torch.ones(3, 4) + self.bn1(self.lin(torch.ones(x.shape[0], 4)))

    net = _warm_bn(Twice(), size=8)
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"2 eval-mode BatchNorm layer\(s\) left unfolded.*bn, bn1"):
        folded = pwsconv.fold(net)
    assert isinstance(folded.bn, nn.BatchNorm2d) and isinstance(folded.bn1, nn.BatchNorm1d)
    torch.testing.assert_close(folded(x), net(x))
    # training-mode BN is never touched (its statistics are the batch's), and batchnorm=False keeps them all
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    assert isinstance(pwsconv.fold(seq)[1], nn.BatchNorm2d)
    assert isinstance(pwsconv.fold(seq.eval(), batchnorm=False)[1], nn.BatchNorm2d)
    assert isinstance(pwsconv.fold(seq.eval())[1], nn.Identity)


def test_fold_untraceable_model_keeps_its_batchnorms_with_a_warning():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            if x.sum() > 0:               # data-dependent control flow: torch.fx cannot trace it
                x = -x
            return self.bn(self.conv(x))

    net = _warm_bn(Dynamic(), size=8)
    with pytest.warns(UserWarning, match="cannot be traced"):
        folded = pwsconv.fold(net)
    assert isinstance(folded.bn, nn.BatchNorm2d)


@pytest.mark.parametrize("method", pwsconv.available_methods())
def test_fold_every_method_as_the_registry_says(method):
    """A method marked foldable folds to plain torch layers (no pwsconv layer, no BatchNorm/MABN left, same
    outputs); one that cannot fold says so (SN: one warning naming each layer), or is made of plain torch norms."""
    from pwsconv.models import build_model

    torch.manual_seed(0)
    net = build_model("tiny_cnn", method, num_classes=10, in_channels=1)
    x = torch.randn(4, 1, 8, 8)
    net.train()
    for _ in range(3):   # running statistics that are not the init values
        net(x)
    net.eval()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        folded = pwsconv.fold(net)
    layers = [m for m in folded.modules() if type(m).__module__.startswith("pwsconv.layers")]
    norms = [m for m in folded.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-4, atol=1e-5)
    if pwsconv.get_method(method).foldable:
        assert layers == [] and norms == [] and not w, (method, layers, norms, [str(m.message) for m in w])
    elif layers:
        assert len(w) == 1 and all(type(m).__name__ in str(w[0].message) for m in layers)
        assert "cannot be folded" in str(w[0].message)
    else:
        assert all(type(m).__module__.startswith("torch.") for m in folded.modules() if not list(m.children()))


def test_fold_report_counts_what_was_folded():
    from pwsconv.folding import fold_report

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), pwsconv.PWSConv2d(4, 4, 3),
                        nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)).eval()
    folded, report = fold_report(net)
    assert report.plain == ["3"] and report.merged == ["1", "5"] and report.left == []
    assert report.summary() == "1 layer(s) made plain, 2 norm layer(s) merged into their conv"
    assert isinstance(folded[1], nn.Identity) and type(folded[3]) is nn.Conv2d
    assert isinstance(net[1], nn.BatchNorm2d)   # a copy, as fold


def test_a_registered_method_declares_how_its_norm_folds():
    """fold names no method: a norm from outside the package folds once its method says how."""
    from pwsconv.methods import Method, _REGISTRY, plain_conv, register_method

    class Scale(nn.Module):       # y = x·s + b per channel: a BatchNorm of mean 0 and variance 1 − eps
        def __init__(self, c):
            super().__init__()
            self.s, self.b = nn.Parameter(torch.rand(c) + 0.5), nn.Parameter(torch.randn(c))

        def forward(self, x):
            return x * self.s.view(1, -1, 1, 1) + self.b.view(1, -1, 1, 1)

    def fold_norm(m):
        if isinstance(m, Scale):
            return torch.zeros_like(m.s), torch.full_like(m.s, 1.0 - 1e-5), 1e-5, m.s, m.b
        return None

    register_method(Method("scale_test", "outputs × s + b", plain_conv, lambda c, dim: Scale(c), False,
                           fold_norm=fold_norm))
    try:
        from pwsconv.models import build_model

        net = build_model("tiny_cnn", "scale_test", num_classes=10, in_channels=1).eval()
        x = torch.randn(2, 1, 8, 8)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            folded = pwsconv.fold(net)
        assert not any(isinstance(m, Scale) for m in folded.modules())
        torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-5)
        # ... and the rest takes it by name: convert, the training and detection configs
        from pwsconv.config import TrainConfig
        from pwsconv.detection.train import DetConfig

        conv_bn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
        assert isinstance(pwsconv.convert(conv_bn, "scale_test")[1], Scale)
        TrainConfig(method="scale_test").validate()
        DetConfig(method="scale_test").validate()
    finally:
        _REGISTRY.pop("scale_test")


def test_fold_of_a_lazy_layer_before_its_first_forward_names_it():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")               # torch: "Initializing zero-element tensors is a no-op"
        net = nn.Sequential(pwsconv.LazyPWSConv2d(8, 3), nn.ReLU())
    with pytest.raises(ValueError, match=r"lazy layer\(s\) 0 have no weights yet; run one forward first"):
        pwsconv.fold(net)
    net(torch.randn(1, 3, 8, 8))
    assert type(pwsconv.fold(net)[0]) is nn.Conv2d
