"""Core PWS layers: gradients (float64 gradcheck), eq. 12 against a direct re-derivation, eq. 13 (zero-mean weight
gradient per filter), constructor defaults, argument validation, the eval cache and autocast."""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

import pwsconv
from pwsconv.accel import is_cached
from pwsconv import (
    PWSConv1d,
    PWSConv2d,
    PWSConv3d,
    PWSConvTranspose1d,
    PWSConvTranspose2d,
    PWSConvTranspose3d,
    PWSLinear,
    pws_weight,
)

F64 = torch.float64

# --------------------------------------------------------------------------------------------- layer catalogue
# name -> (constructor taking PWS keyword switches, input shape). Tiny sizes: gradcheck is O(#params × cost).
LAYERS = {
    "conv1d": (lambda **kw: PWSConv1d(4, 3, 3, stride=2, padding=1, **kw), (2, 4, 7)),
    "conv2d_nonsquare_dilated": (lambda **kw: PWSConv2d(3, 4, (3, 2), padding=(1, 2), dilation=(2, 1), **kw),
                                 (2, 3, 6, 5)),
    "conv2d_grouped": (lambda **kw: PWSConv2d(4, 6, 3, groups=2, stride=(2, 1), **kw), (1, 4, 6, 5)),
    "conv2d_depthwise": (lambda **kw: PWSConv2d(3, 3, 3, groups=3, padding=1, padding_mode="reflect", **kw),
                         (2, 3, 5, 5)),
    "conv3d": (lambda **kw: PWSConv3d(2, 3, (2, 3, 2), padding=(0, 1, 1), **kw), (1, 2, 3, 4, 3)),
    "convT1d": (lambda **kw: PWSConvTranspose1d(3, 4, 3, stride=2, output_padding=1, **kw), (2, 3, 4)),
    "convT2d_grouped": (lambda **kw: PWSConvTranspose2d(4, 6, (3, 2), stride=2, groups=2, dilation=(1, 2), **kw),
                        (1, 4, 3, 4)),
    "convT2d_depthwise": (lambda **kw: PWSConvTranspose2d(3, 3, 2, groups=3, **kw), (2, 3, 3, 3)),
    "convT3d": (lambda **kw: PWSConvTranspose3d(2, 2, (2, 2, 3), **kw), (1, 2, 2, 3, 2)),
    "linear": (lambda **kw: PWSLinear(5, 3, **kw), (4, 5)),
}

ABLATIONS = {
    "default": {},
    "no_alpha": {"use_alpha": False},
    "no_gain": {"use_gain": False},
    "fan_out": {"fan_mode": "fan_out"},
    "equiv": {"equiv": True, "gamma": 0.1},
    "gamma_tiny": {"gamma": 1e-12},   # γ must be > 0 (issue 22); ≈ the γ → 0 limit
}


def make(name: str, dtype=torch.float32, seed: int = 0, randomize: bool = True, **kw):
    """Build a layer and give α and the bias non-trivial values (so that their roles are actually tested)."""
    torch.manual_seed(seed)
    ctor, shape = LAYERS[name]
    layer = ctor(**kw).to(dtype)
    if randomize:
        with torch.no_grad():
            if layer.alpha is not None:
                layer.alpha.uniform_(0.5, 2.0).mul_(torch.randint(0, 2, layer.alpha.shape, dtype=dtype) * 2 - 1)
            if layer.bias is not None:
                layer.bias.normal_()
    x = torch.randn(shape, dtype=dtype)
    return layer, x


def filters(layer: nn.Module, weight: torch.Tensor) -> list[torch.Tensor]:
    """The filters of eq. 12, one per output channel, read straight from the torch weight layout."""
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        cin, cout_g = weight.shape[0], weight.shape[1]
        g = layer.groups
        cin_g = cin // g
        # output channel o = g*Cout/G + o_local uses weight[g*Cin/G:(g+1)*Cin/G, o_local]
        return [weight[gi * cin_g:(gi + 1) * cin_g, o] for gi in range(g) for o in range(cout_g)]
    return [weight[o] for o in range(weight.shape[0])]


def set_filters(layer: nn.Module, out: torch.Tensor, values: list[torch.Tensor]) -> None:
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        g = layer.groups
        cin_g, cout_g = out.shape[0] // g, out.shape[1]
        for i, v in enumerate(values):
            gi, o = divmod(i, cout_g)
            out[gi * cin_g:(gi + 1) * cin_g, o] = v
    else:
        for o, v in enumerate(values):
            out[o] = v


def reference_weight(layer: nn.Module, weight=None, alpha="layer", gamma=None) -> torch.Tensor:
    """Eq. 12 written out filter by filter in plain tensor code (float64)."""
    weight = layer.weight if weight is None else weight
    alpha = layer.alpha if alpha == "layer" else alpha
    gamma = layer.gamma if gamma is None else gamma
    w = weight.detach().to(F64)
    fs = filters(layer, w)
    n = fs[0].numel()
    kernel = math.prod(w.shape[2:]) if w.dim() > 2 else 1
    if layer.fan_mode == "fan_in":
        fan = n
    elif isinstance(layer, nn.modules.conv._ConvTransposeNd):
        fan = w.shape[1] * kernel
    else:
        fan = w.shape[0] // getattr(layer, "groups", 1) * kernel
    if layer.equiv:
        gamma = 2.0 * gamma / fan
    gain = math.sqrt(2.0 / fan) if layer.use_gain else 1.0
    outs = []
    for o, f in enumerate(fs):
        assert f.numel() == n
        mu = f.sum() / n
        var = ((f - mu) ** 2).sum() / n  # population variance
        a = 1.0 if alpha is None else float(alpha[o].detach())
        outs.append(a * gain * (f - mu) / torch.sqrt(var + gamma))
    out = torch.empty_like(w)
    set_filters(layer, out, outs)
    return out


def plain_forward(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """The parent torch layer's function with an explicit weight."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[weight.dim() - 2]
        return fn(x, weight, bias, layer.stride, layer.padding, layer.output_padding, layer.groups, layer.dilation)
    return layer._conv_forward(x, weight, bias)


def n_filters(layer):
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


# ============================================================================================ 1. gradcheck
# Every layer: gradcheck of the output wrt input, weight, α and bias in gradcheck's fast mode (a random projection
# v^T J u of the whole Jacobian, a handful of evaluations), plus the full element-by-element check for the 1-d layers
# and the linear layer; the full Jacobian of the standardized weight (no conv, cheap) is checked for every layer below.
# The ablation switches run on a plain grouped, a depthwise, a transposed grouped and the linear layer.
FULL = ("conv1d", "convT1d", "linear")
GRADCHECK_CASES = [(name, "default", name not in FULL) for name in LAYERS] + [
    (name, ab, True)
    for name in ("conv2d_grouped", "conv2d_depthwise", "convT2d_grouped", "linear")
    for ab in ABLATIONS
    if ab != "default"
]


@pytest.mark.parametrize("name,ablation,fast", GRADCHECK_CASES)
def test_gradcheck_layers(name, ablation, fast):
    layer, x = make(name, F64, **ABLATIONS[ablation])
    layer.train()
    params = {k: v.detach().clone().requires_grad_(True) for k, v in layer.named_parameters()}
    assert set(params) == ({"weight", "bias"} if ablation == "no_alpha" else {"weight", "bias", "alpha"})
    keys = sorted(params)
    x = x[:1].requires_grad_(True)

    def fn(x, *ps):
        return functional_call(layer, dict(zip(keys, ps)), (x,))

    assert gradcheck(fn, (x, *[params[k] for k in keys]), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=fast)


class _StandardizedWeight(nn.Module):
    """Exposes ``layer.standardized_weight()`` as a forward, for functional_call."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self):
        return self.layer.standardized_weight()


@pytest.mark.parametrize("name,ablation", [(name, "default") for name in LAYERS] + [
    (name, ab)
    for name in ("conv2d_grouped", "convT2d_grouped", "convT3d", "linear")
    for ab in ABLATIONS
    if ab != "default"
])
def test_gradcheck_standardized_weight_full(name, ablation):
    layer, _ = make(name, F64, **ABLATIONS[ablation])
    wrapper = _StandardizedWeight(layer.train())
    keys = ["layer.weight"] + ([] if layer.alpha is None else ["layer.alpha"])
    ps = [dict(wrapper.named_parameters())[k].detach().clone().requires_grad_(True) for k in keys]
    assert gradcheck(lambda *ps: functional_call(wrapper, dict(zip(keys, ps)), ()), tuple(ps), eps=1e-6, atol=1e-6,
                     rtol=1e-4)


def test_gradcheck_eval_mode_with_grad():
    # eval mode with grad enabled must not use the (no-grad) cache: gradients are exact
    layer, x = make("conv2d_grouped", F64)
    layer.eval()
    w = layer.weight.detach().clone().requires_grad_(True)
    a = layer.alpha.detach().clone().requires_grad_(True)
    assert gradcheck(lambda w, a: functional_call(layer, {"weight": w, "alpha": a}, (x,)), (w, a), fast_mode=True)


@pytest.mark.parametrize(
    "shape,reduce_dims,gain",
    [((4, 3, 3, 2), None, None), ((5, 6), None, None), ((2, 3, 4, 3), (1, 3), None), ((3, 4, 2), None, 1.0),
     ((3, 2, 2, 2, 2), (-1, -2, -3, -4), None)],
)
def test_gradcheck_functional(shape, reduce_dims, gain):
    torch.manual_seed(1)
    w = torch.randn(shape, dtype=F64, requires_grad=True)
    dims = tuple(range(1, len(shape))) if reduce_dims is None else tuple(d % len(shape) for d in reduce_dims)
    kept = [1 if d in dims else s for d, s in enumerate(shape)]
    a = torch.empty(kept, dtype=F64).uniform_(0.5, 2.0).requires_grad_(True)
    assert gradcheck(lambda w, a: pws_weight(w, 1e-3, a, reduce_dims=reduce_dims, gain=gain), (w, a))
    assert gradcheck(lambda w: pws_weight(w, 0.0, None, reduce_dims=reduce_dims, gain=gain), (w,))


def test_functional_per_filter_alpha_vector():
    # α given as one value per filter ([out]) is laid out along the filter axis, not broadcast against the last dim
    torch.manual_seed(2)
    w = torch.randn(4, 3, 3, 4, dtype=F64)  # last dim == out: the trap for naive broadcasting
    a = torch.tensor([0.5, -1.0, 2.0, 3.0], dtype=F64)
    got = pws_weight(w, 1e-3, a)
    want = pws_weight(w, 1e-3, a.view(4, 1, 1, 1))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got, a.view(4, 1, 1, 1) * pws_weight(w, 1e-3), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError):
        pws_weight(w, 1e-3, torch.ones(3, dtype=F64))
    with pytest.raises(ValueError):
        pws_weight(torch.randn(5), 1e-3)  # no filter dims: torch would reduce everything


# ============================================================================================ 2. eq. 12
@pytest.mark.parametrize("ablation", list(ABLATIONS))
@pytest.mark.parametrize("name", list(LAYERS))
def test_eq12_matches_rederivation(name, ablation):
    layer, x = make(name, F64, **ABLATIONS[ablation])
    ref = reference_weight(layer)
    got = layer.standardized_weight()
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    # the layer computes Y_o = α_o · (X ⊛ Ŵ_o) + β_o with Ŵ free of α
    y = layer(x)
    w_hat = reference_weight(layer, alpha=None)
    y_no_alpha = plain_forward(layer, x, w_hat, None)
    alpha = torch.ones(n_filters(layer), dtype=F64) if layer.alpha is None else layer.alpha.detach()
    shape = (1, -1) + (1,) * (x.dim() - 2)
    want = alpha.view(shape) * y_no_alpha + layer.bias.detach().view(shape)
    torch.testing.assert_close(y, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", list(LAYERS))
def test_standardized_filters_have_zero_mean_and_he_variance(name):
    # with γ → 0 (γ ≪ Var[W_o]) and α = 1 every filter of Ŵ has mean 0 and population variance 2/n_l
    layer, _ = make(name, F64, randomize=False, gamma=1e-300)
    for f in filters(layer, layer.standardized_weight().detach()):
        n = f.numel()
        assert n == layer.filter_size
        assert abs(f.mean().item()) < 1e-12
        assert f.var(correction=0).item() == pytest.approx(2.0 / n, rel=1e-10)


def test_gamma_inside_sqrt_and_equiv():
    # Ŵ = sqrt(2/n)(W-μ)/sqrt(Var+γ): scaling the raw weight with γ>0 is NOT scale-invariant, with γ → 0 it is
    torch.manual_seed(3)
    layer = PWSConv2d(8, 4, 3, gamma=1e-2, dtype=F64)
    w0 = layer.standardized_weight().detach().clone()
    with torch.no_grad():
        layer.weight.mul_(10)
    w1 = layer.standardized_weight().detach()
    assert not torch.allclose(w0, w1)
    layer.gamma = 1e-300   # γ = 0 itself is refused (a constant filter would be 0/0); 1e-300 vanishes next to Var
    w2 = layer.standardized_weight().detach()
    with torch.no_grad():
        layer.weight.div_(10)
    torch.testing.assert_close(layer.standardized_weight().detach(), w2)
    # equiv: Ŵ = α (W − μ)/sqrt(n·Var/2 + γ)
    eq = PWSConv2d(8, 4, 3, gamma=0.1, equiv=True, dtype=F64)
    w = eq.weight.detach()
    n = 8 * 9
    var, mu = torch.var_mean(w, dim=(1, 2, 3), correction=0, keepdim=True)
    torch.testing.assert_close(eq.standardized_weight(), (w - mu) / torch.sqrt(n * var / 2 + 0.1))
    assert eq.effective_gamma == pytest.approx(2 * 0.1 / n)


@pytest.mark.parametrize("name", list(LAYERS))
def test_constructor_defaults(name):
    layer, _ = make(name, randomize=False)
    assert torch.equal(layer.alpha, torch.ones(n_filters(layer)))
    assert layer.alpha.requires_grad and isinstance(layer.alpha, nn.Parameter)
    assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
    assert layer.gamma == 1e-3 and layer.use_gain and layer.fan_mode == "fan_in" and not layer.equiv
    assert set(layer.state_dict()) == {"weight", "bias", "alpha"}
    assert isinstance(layer, pwsconv.PWSMixin)


@pytest.mark.parametrize(
    "ctor,n_in,n_out",
    [
        (lambda **kw: PWSConv2d(48, 64, 3, **kw), 48 * 9, 64 * 9),
        (lambda **kw: PWSConv2d(64, 64, 3, groups=4, **kw), 16 * 9, 16 * 9),
        (lambda **kw: PWSConv1d(96, 32, 5, **kw), 96 * 5, 32 * 5),
        (lambda **kw: PWSConvTranspose2d(64, 32, 3, groups=2, **kw), 32 * 9, 16 * 9),
        (lambda **kw: PWSLinear(300, 120, **kw), 300, 120),
    ],
)
def test_he_init(ctor, n_in, n_out):
    torch.manual_seed(4)
    for mode, n in (("fan_in", n_in), ("fan_out", n_out)):
        layer = ctor(fan_mode=mode)
        w = layer.weight.detach()
        assert layer.fan == n
        assert w.std().item() == pytest.approx(math.sqrt(2.0 / n), rel=0.05)
        assert abs(w.mean().item()) < 0.05 * math.sqrt(2.0 / n)
        assert layer.gain == pytest.approx(math.sqrt(2.0 / n))
    assert ctor().filter_size == n_in


def test_state_dict_compatible_with_nn_conv2d():
    torch.manual_seed(5)
    ref = nn.Conv2d(3, 8, 3, padding=1)
    pws = PWSConv2d(3, 8, 3, padding=1)
    assert set(pws.state_dict()) == set(ref.state_dict()) | {"alpha"}
    with torch.no_grad():
        pws.alpha.fill_(3.0)
    result = pws.load_state_dict(ref.state_dict(), strict=True)   # a plain conv's state_dict loads strictly
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(pws.weight, ref.weight) and torch.equal(pws.bias, ref.bias)
    assert torch.equal(pws.alpha, torch.ones(8))   # α defaults to 1 when the state_dict has none
    # and back: a PWS state_dict round-trips
    other = PWSConv2d(3, 8, 3, padding=1)
    other.load_state_dict(pws.state_dict())
    x = torch.randn(1, 3, 5, 5)
    torch.testing.assert_close(other(x), pws(x))
    # the layer is a drop-in: it is an nn.Conv2d with the same hyper-parameters
    assert isinstance(pws, nn.Conv2d)
    assert "gamma=0.001" in repr(pws)


def test_bias_false_and_use_alpha_false():
    layer = PWSConv2d(3, 4, 3, bias=False, use_alpha=False)
    assert layer.bias is None and layer.alpha is None
    assert set(layer.state_dict()) == {"weight"}
    y = layer(torch.randn(1, 3, 5, 5))
    assert y.shape == (1, 4, 3, 3)


def test_transposed_output_size_argument():
    layer = PWSConvTranspose2d(3, 4, 3, stride=2)
    x = torch.randn(1, 3, 4, 4)
    assert layer(x).shape[-2:] == (9, 9)
    assert layer(x, output_size=[10, 10]).shape[-2:] == (10, 10)


def test_data_init_alpha():
    torch.manual_seed(6)
    layer = PWSConv2d(3, 6, 3, data_init_alpha=True)
    x = torch.randn(8, 3, 8, 8)
    layer(x)
    assert bool(layer.alpha_initialized)
    with torch.no_grad():
        var = plain_forward(layer, x, layer.standardized_weight(), None).var()
    assert var.item() == pytest.approx(2.0, rel=1e-4)
    a = layer.alpha.detach().clone()
    layer(x)  # only once
    assert torch.equal(layer.alpha, a)
    assert "alpha_initialized" in layer.state_dict()


# ============================================================================================ 3. eq. 13
@pytest.mark.parametrize("ablation", ["default", "no_alpha", "no_gain", "fan_out", "equiv"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_eq13_weight_gradient_has_zero_mean_per_filter(name, ablation):
    for seed in range(1 if ablation != "default" else 3):
        layer, x = make(name, F64, seed=seed, **ABLATIONS[ablation])
        x = x.abs() + 0.5  # non-negative inputs (post-ReLU): a plain layer's gradient has a large mean shift
        y = layer(x)
        loss = (y * torch.randn_like(y)).sum() + (y ** 2).mean()
        loss.backward()
        grad = layer.weight.grad
        scale = grad.abs().max().item()
        assert scale > 0
        for f in filters(layer, grad):
            assert abs(f.mean().item()) <= 1e-12 * max(1.0, scale)
    # the property is PWS's doing: the same loss through the raw weight has a clearly non-zero filter mean
    raw = layer.weight.detach().clone().requires_grad_(True)
    y = plain_forward(layer, x, raw, layer.bias.detach())
    (y * torch.randn_like(y)).sum().backward()
    assert max(abs(f.mean().item()) for f in filters(layer, raw.grad)) > 1e-6 * raw.grad.abs().max().item()


# ============================================================================================ 7. bad arguments
@pytest.mark.parametrize("gamma", [-1e-3, 0.0, -0.0, 0, float("nan"), float("inf"), "1e-3", "abc", None, True])
def test_bad_gamma(gamma):
    with pytest.raises(ValueError):
        PWSConv2d(3, 4, 3, gamma=gamma)
    with pytest.raises(ValueError):
        PWSLinear(3, 4, gamma=gamma)
    layer = PWSConv2d(3, 4, 3)
    with pytest.raises(ValueError):
        layer.gamma = gamma
    assert layer.gamma == 1e-3


@pytest.mark.parametrize(
    "ctor",
    [
        lambda: PWSConv2d(3, 4, 3, groups=2),  # in_channels not divisible by groups
        lambda: PWSConv2d(4, 3, 3, groups=2),  # out_channels not divisible by groups
        lambda: PWSConvTranspose2d(3, 4, 3, groups=2),
        lambda: PWSConv2d(3, 4, 0),
        lambda: PWSConv2d(3, 4, (3, 0)),
        lambda: PWSConv3d(3, 4, -1),
        lambda: PWSConv1d(0, 4, 3),
        lambda: PWSConv1d(3, 4, 3, groups=0),
        lambda: PWSConv2d(3, 4, 3, fan_mode="fan_avg"),
        lambda: PWSLinear(3, 4, fan_mode="nope"),
        lambda: PWSConv2d(1, 1, 1),  # one-element filter
        lambda: PWSConv2d(4, 4, 1, groups=4),  # 1x1 depthwise: one-element filters
        lambda: PWSConvTranspose2d(4, 4, 1, groups=4),
        lambda: PWSConv3d(1, 3, 1),
        lambda: PWSLinear(1, 4),
        lambda: PWSLinear(0, 4),
        lambda: PWSLinear(4, 2.5),
    ],
)
def test_bad_constructor_args(ctor):
    with pytest.raises(ValueError):
        ctor()


def test_smallest_valid_filters():
    assert PWSConv2d(2, 1, 1).filter_size == 2
    assert PWSConv1d(1, 1, 2).filter_size == 2
    assert PWSLinear(2, 1).filter_size == 2


def test_registry_errors():
    with pytest.raises(ValueError):
        pwsconv.get_method("nope")
    with pytest.raises(ValueError):
        pwsconv.build_conv("pws", 2, 3, 4, 3, not_an_option=1)
    assert type(pwsconv.build_conv("pws", 2, 3, 4, 3, gamma=1e-4)) is PWSConv2d
    assert type(pwsconv.build_conv("PWS", 1, 3, 4, 3)) is PWSConv1d
    assert isinstance(pwsconv.build_norm("pws", 4), nn.Identity)
    assert "pws" in pwsconv.available_methods()


# ============================================================================================ 5. eval cache
@pytest.fixture
def counted(monkeypatch):
    """A PWSConv2d whose compute_weight calls are counted."""
    torch.manual_seed(7)
    layer = PWSConv2d(3, 4, 3, padding=1)
    calls = {"n": 0}
    orig = layer.compute_weight

    def wrapped():
        calls["n"] += 1
        return orig()

    monkeypatch.setattr(layer, "compute_weight", wrapped)
    with pwsconv.cached(layer):
        yield layer, calls, torch.randn(2, 3, 5, 5)


def expected(layer, x):
    w = reference_weight(layer).to(layer.weight.dtype)
    return plain_forward(layer, x.to(layer.weight.dtype), w, layer.bias.detach())


def test_data_writes_need_clear_cache_and_other_writes_do_not():
    """A write through ``.data`` has its own version counter, so the scope cannot see it; ``pwsconv.clear_cache``
    on the model drops every layer's entry. The same write on the parameter (under no_grad) or on a state_dict
    tensor is seen without it."""
    torch.manual_seed(9)
    net = nn.Sequential(PWSConv2d(3, 4, 3), nn.ReLU(), PWSConv2d(4, 4, 3)).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad(), pwsconv.cached(net):
        y0 = net(x)
        net[0].weight.data.mul_(-1.0)
        assert torch.equal(net(x), y0)                           # not seen: documented
        pwsconv.clear_cache(net)
        assert not is_cached(net[0]) and not is_cached(net[2])
        y1 = net(x)
        torch.testing.assert_close(y1, F.conv2d(F.relu(F.conv2d(x, net[0].compute_weight(), net[0].bias)),
                                                net[2].compute_weight(), net[2].bias))
        net[0].weight.mul_(-1.0)                                 # on the parameter: seen
        torch.testing.assert_close(net(x), y0, rtol=0, atol=0)
        net.state_dict()["2.weight"].add_(1.0)                   # a state_dict tensor shares the version: seen
        assert not torch.equal(net(x), y0)


def test_no_cache_outside_a_scope_and_the_scope_leaves_nothing_behind():
    """Outside ``pwsconv.cached`` every forward computes the weight; inside, eval + no_grad computes it once; leaving
    the scope drops the entry, the installed source and the optimizer-step hook (no process-wide side effect)."""
    from torch.optim.optimizer import _global_optimizer_post_hooks

    torch.manual_seed(7)
    layer = PWSConv2d(3, 4, 3).eval()
    net = nn.Sequential(layer, nn.ReLU())
    calls, orig = [], layer.compute_weight
    layer.compute_weight = lambda: (calls.append(1), orig())[1]
    x = torch.randn(1, 3, 6, 6)
    hooks = len(_global_optimizer_post_hooks)
    with torch.no_grad():
        net(x), net(x)
        assert len(calls) == 2
        with pwsconv.cached(net) as same:
            assert same is net and len(_global_optimizer_post_hooks) == hooks + 1
            with pwsconv.cached(layer):          # nested: the outer scope owns the layer
                y1 = net(x)
            y2 = net(x)
            assert len(calls) == 3 and is_cached(layer) and torch.equal(y1, y2)
        assert not is_cached(layer) and "_weight_source" not in layer.__dict__
        assert len(_global_optimizer_post_hooks) == hooks
        net(x)
        assert len(calls) == 4
    with pytest.raises(TypeError, match="nn.Module"):
        with pwsconv.cached("net"):
            pass


def test_cache_computed_once_in_eval_no_grad(counted):
    layer, calls, x = counted
    layer.eval()
    with torch.no_grad():
        y1 = layer(x)
        y2 = layer(x)
        y3 = layer(x)
    assert calls["n"] == 1
    assert torch.equal(y1, y2) and torch.equal(y1, y3)
    torch.testing.assert_close(y1, expected(layer, x))
    # train mode never caches
    layer.train()
    with torch.no_grad():
        layer(x)
        layer(x)
    assert calls["n"] == 3


def test_cache_frozen_layer_in_eval_with_grad(counted):
    # eval + grad enabled but nothing requires grad: no graph needed, the cache may serve
    layer, calls, x = counted
    layer.eval().requires_grad_(False)
    layer(x)
    layer(x)
    assert calls["n"] == 1


def test_cache_inplace_weight_change(counted):
    layer, calls, x = counted
    layer.eval()
    with torch.no_grad():
        y0 = layer(x)
        layer.weight.mul_(1.5).add_(0.1 * torch.randn_like(layer.weight))
        y1 = layer(x)
    assert calls["n"] == 2
    assert not torch.allclose(y0, y1)
    torch.testing.assert_close(y1, expected(layer, x))


def test_cache_replaced_parameter(counted):
    layer, calls, x = counted
    layer.eval()
    with torch.no_grad():
        layer(x)
        layer.weight = nn.Parameter(torch.randn_like(layer.weight))
        y = layer(x)
        layer.alpha = nn.Parameter(torch.full_like(layer.alpha, 3.0))
        y2 = layer(x)
    assert calls["n"] == 3
    torch.testing.assert_close(y2, expected(layer, x))
    assert not torch.allclose(y, y2)


def test_cache_optimizer_step(counted):
    layer, calls, x = counted
    layer.eval()
    opt = torch.optim.SGD(layer.parameters(), lr=0.5, momentum=0.9)
    with torch.no_grad():
        y0 = layer(x)
    n0 = calls["n"]
    loss = layer(x).pow(2).mean()  # eval mode, grad enabled: no cache, gradients flow
    assert calls["n"] == n0 + 1
    loss.backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert layer.alpha.grad is not None and layer.bias.grad is not None
    opt.step()
    with torch.no_grad():
        y1 = layer(x)
        layer(x)
    assert calls["n"] == n0 + 2
    assert not torch.allclose(y0, y1)
    torch.testing.assert_close(y1, expected(layer, x))


@pytest.mark.parametrize("optim", [torch.optim.Adam, torch.optim.AdamW])
def test_cache_foreach_optimizers(optim):
    """Inside ``pwsconv.cached``, a foreach optimizer's step (in-place updates of all parameters at once) drops the
    cached weight: the next eval forward serves the new parameters."""
    from pwsconv.accel import is_cached

    torch.manual_seed(8)
    layer = PWSConv2d(3, 4, 3).eval()
    x = torch.randn(1, 3, 5, 5)
    opt = optim(layer.parameters(), lr=0.1, foreach=True)
    with pwsconv.cached(layer):
        with torch.no_grad():
            y0 = layer(x)
        assert is_cached(layer)
        layer(x).sum().backward()
        opt.step()
        with torch.no_grad():
            y1 = layer(x)
        assert not torch.allclose(y0, y1)
        torch.testing.assert_close(y1, expected(layer, x))


def test_cache_alpha_and_gamma_change(counted):
    layer, calls, x = counted
    layer.eval()
    with torch.no_grad():
        y0 = layer(x)
        layer.alpha.mul_(2.0)
        y1 = layer(x)
        torch.testing.assert_close(y1 - layer.bias.view(1, -1, 1, 1), 2 * (y0 - layer.bias.view(1, -1, 1, 1)))
        layer.gamma = 0.5
        y2 = layer(x)
        torch.testing.assert_close(y2, expected(layer, x))
        assert not torch.allclose(y1, y2)
        layer.gamma = 0.05
        torch.testing.assert_close(layer(x), expected(layer, x))
        layer.use_gain = False
        torch.testing.assert_close(layer(x), expected(layer, x))
        layer.fan_mode = "fan_out"
        torch.testing.assert_close(layer(x), expected(layer, x))
    assert calls["n"] == 6


def test_settings_are_validated_and_drop_the_cache(counted):
    layer, calls, x = counted
    layer.eval()
    with torch.no_grad():
        layer(x)
        layer(x)
        assert calls["n"] == 1
        with pytest.raises(ValueError, match="fan_mode"):
            layer.fan_mode = "fan_avg"
        layer.equiv = True
        torch.testing.assert_close(layer(x), expected(layer, x))
    assert calls["n"] == 2 and is_cached(layer)
    assert layer.equiv is True and layer.fan_mode == "fan_in" and layer.use_gain is True


@pytest.mark.parametrize("opt_kw", [{"fused": True}, {"foreach": True}, {"foreach": False}])
def test_cache_sees_every_optimizer_step(opt_kw):
    """Fused optimizer kernels update parameters without bumping their version counters: the cache also counts
    optimizer steps."""
    torch.manual_seed(0)
    layer = PWSConv2d(4, 4, 3).eval()
    x = torch.randn(1, 4, 6, 6)
    opt = torch.optim.Adam(layer.parameters(), lr=0.1, **opt_kw)
    with pwsconv.cached(layer):
        with torch.no_grad():
            layer(x)
        assert is_cached(layer)
        for p in layer.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        with torch.no_grad():
            torch.testing.assert_close(layer(x), expected(layer, x))


def test_cache_sees_data_reassignment_even_at_a_reused_address():
    torch.manual_seed(0)
    layer = PWSConv2d(4, 4, 3).eval()
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad(), pwsconv.cached(layer):
        layer(x)
        for _ in range(3):        # the allocator would hand the freed block back; the cache keeps it alive
            layer.weight.data = torch.randn_like(layer.weight)
            torch.testing.assert_close(layer(x), expected(layer, x))



def test_cache_sees_data_reassignment_when_the_freed_block_is_handed_back():
    """``weight.data = t`` twice between two forwards: the first frees the cached storage, the second gets that very
    block from the allocator (same id, version and address). The cache must keep the old storage alive so that no
    new tensor can sit at its address (a stale weight otherwise)."""
    torch.manual_seed(0)
    layer = PWSConv2d(64, 64, 3).eval()      # 147 KB: the CPU allocator hands a freed block of that size back
    x = torch.randn(1, 64, 5, 5)
    with torch.no_grad(), pwsconv.cached(layer):
        for _ in range(8):
            layer(x)
            layer.weight.data = torch.zeros(1)
            layer.weight.data = torch.randn(64, 64, 3, 3)
            torch.testing.assert_close(layer(x), layer.to_plain()(x), rtol=0, atol=0)


def test_parameters_made_in_inference_mode_and_parametrized_bias():
    from torch.nn.utils import parametrize

    with torch.inference_mode():
        layer = PWSConv2d(3, 4, 3).eval()
        x = torch.randn(1, 3, 6, 6)
        with pwsconv.cached(layer):
            want = F.conv2d(x, layer.compute_weight(), layer.bias)
            torch.testing.assert_close(layer(x), want)           # no version counter: computed, never cached
            assert not is_cached(layer)

    class Twice(nn.Module):
        def forward(self, t):
            return 2 * t

    layer = PWSConv2d(3, 4, 3)
    parametrize.register_parametrization(layer, "bias", Twice())
    x = torch.randn(1, 3, 6, 6)
    torch.testing.assert_close(layer(x), F.conv2d(x, layer.standardized_weight(), 2 * layer.parametrizations.bias.original))



def test_cache_then_parameters_replaced_by_inference_tensors():
    """A cached layer whose parameters are then replaced by inference tensors (``load_state_dict(..., assign=True)``
    of a state made under ``torch.inference_mode``): no version counter to compare, the cache misses instead of
    raising, and the weight is computed from the new tensors (in and outside inference mode)."""
    torch.manual_seed(0)
    layer = PWSConv2d(3, 4, 3).eval()
    x = torch.randn(1, 3, 6, 6)
    with pwsconv.cached(layer):
        with torch.no_grad():
            layer(x)
        assert is_cached(layer)
        with torch.inference_mode():
            state = {k: v.clone() * 2 if k == "weight" else v.clone() for k, v in layer.state_dict().items()}
            layer.load_state_dict(state, assign=True)
            assert layer.weight.is_inference()
            torch.testing.assert_close(layer(x), expected(layer, x))
        with torch.no_grad():
            torch.testing.assert_close(layer(x), expected(layer, x))
    layer.train()
    net = nn.Sequential(layer)
    pwsconv.fuse_standardization(net)
    with torch.inference_mode():
        torch.testing.assert_close(net(x), expected(layer, x))

def test_cache_load_state_dict_in_eval(counted):
    layer, calls, x = counted
    layer.eval()
    other = PWSConv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        other.alpha.uniform_(0.5, 2)
        other.bias.normal_()
        layer(x)
        layer.load_state_dict(other.state_dict())
        y = layer(x)
    torch.testing.assert_close(y, other.eval()(x))
    assert calls["n"] == 2


def test_cache_train_eval_toggle_and_to_dtype(counted):
    layer, calls, x = counted
    layer.eval()
    with torch.no_grad():
        layer(x)
        layer.train()
        layer(x)                      # a training forward computes its weight and drops the cached one
        assert not is_cached(layer)
        layer.eval()
        layer(x)
        assert calls["n"] == 3
        layer.to(F64)
        y = layer(x.double())
    assert y.dtype == F64
    assert calls["n"] == 4
    torch.testing.assert_close(y, expected(layer, x.double()))


def test_cache_dropped_on_copy_and_pickle():
    torch.manual_seed(9)
    layer = PWSConv2d(3, 4, 3).eval()
    x = torch.randn(1, 3, 5, 5)
    with pwsconv.cached(layer):
        with torch.no_grad():
            y = layer(x)
        assert is_cached(layer)
        for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
            assert not is_cached(clone) and "_weight_source" not in clone.__dict__
            with torch.no_grad():
                torch.testing.assert_close(clone(x), y)
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), y)


def test_cache_inference_mode():
    torch.manual_seed(10)
    layer = PWSConv2d(3, 4, 3).eval()
    x = torch.randn(1, 3, 5, 5)
    with pwsconv.cached(layer):
        with torch.inference_mode():
            y = layer(x)
        layer.requires_grad_(False)
        xg = x.clone().requires_grad_(True)
        out = layer(xg)  # must not reuse an inference tensor in a graph
    out.sum().backward()
    torch.testing.assert_close(out.detach(), y)
    assert xg.grad is not None


def test_eval_with_grad_flows_and_no_cache():
    torch.manual_seed(11)
    for name in LAYERS:
        layer, x = make(name)
        layer.eval()
        layer(x).square().sum().backward()
        assert not is_cached(layer)
        for pname, p in layer.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, (name, pname)


def test_compile_unfolded_layer_eval():
    torch.manual_seed(12)
    layer = PWSConv2d(3, 4, 3, padding=1).eval()
    x = torch.randn(2, 3, 6, 6)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x))
    layer.train()
    y = torch.compile(layer, backend="eager")(x)
    y.sum().backward()
    assert layer.weight.grad is not None


# ============================================================================================ 6. autocast
class _RecordDtypes(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.var_mean, torch.rsqrt, torch.native_layer_norm, torch.nn.functional.layer_norm,
                    torch.batch_norm, torch.native_batch_norm):
            self.seen.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["conv2d_grouped", "convT2d_grouped", "linear", "conv1d"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_autocast_bf16(name, mode):
    layer, x = make(name)
    layer.train(mode == "train")
    with torch.no_grad():
        y32 = layer(x)
    rec = _RecordDtypes()
    with torch.autocast("cpu", dtype=torch.bfloat16), rec:
        y16 = layer(x)
        w = layer.standardized_weight()
    assert y16.dtype == torch.bfloat16
    assert w.dtype == torch.float32
    assert rec.seen and all(d == torch.float32 for d in rec.seen)  # standardization statistics in float32
    torch.testing.assert_close(y16.float(), y32, rtol=3e-2, atol=3e-2 * y32.abs().max().item())
    if mode == "train":
        y16.float().sum().backward()
        assert layer.weight.grad.dtype == torch.float32 and torch.isfinite(layer.weight.grad).all()


def test_pws_weight_low_precision_weights():
    torch.manual_seed(13)
    w32 = torch.randn(8, 16, 3, 3) * 0.05 + 0.01
    a = torch.rand(8) + 0.5
    for dt in (torch.bfloat16, torch.float16):
        w = w32.to(dt)
        rec = _RecordDtypes()
        with rec:
            out = pws_weight(w, 1e-3, a)
        assert out.dtype == dt
        assert all(d == torch.float32 for d in rec.seen)
        # identical to the float32 computation on the same (rounded) values, rounded once at the end
        assert torch.equal(out, pws_weight(w.float(), 1e-3, a).to(dt))
        torch.testing.assert_close(out.float(), pws_weight(w32, 1e-3, a), rtol=2e-2, atol=2e-2)
    # a bf16 layer runs end to end
    layer = PWSConv2d(4, 6, 3).to(torch.bfloat16)
    y = layer(torch.randn(1, 4, 5, 5, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


def test_the_engine_evaluation_computes_each_weight_once_and_leaves_no_cache(monkeypatch):
    from pwsconv.models import build_model
    from pwsconv import PWSMixin
    from pwsconv.train.evaluate import evaluate

    torch.manual_seed(0)
    net = build_model("resnet_cifar_small", "pws", num_classes=10, in_channels=3)
    layers = [m for m in net.modules() if isinstance(m, PWSMixin)]
    calls = []
    orig = PWSMixin.compute_weight
    monkeypatch.setattr(PWSMixin, "compute_weight", lambda self: (calls.append(1), orig(self))[1])
    loader = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(3)]
    res = evaluate(net, loader)
    assert res["n"] == 12 and len(calls) == len(layers) > 0 and net.training
    assert not any(is_cached(m) or "_weight_source" in m.__dict__ for m in layers)
