"""Every registered normalization method, by name: build, gradients, train/eval, state_dict, batch size 1, convert,
fold, and the weight-method layers (WN, WS, scaled WS) against their formulas."""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import pathlib
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pwsconv
from pwsconv.layers import (
    CenConv2d,
    MABN2d,
    SWSConv1d,
    SWSConv2d,
    SWSConv3d,
    SWSLinear,
    SwitchNorm2d,
    WNConv1d,
    WNConv2d,
    WNConv3d,
    WNLinear,
    WSConv2d,
)
from pwsconv.methods import get_method, methods_table
from pwsconv.models import build_model

METHODS = pwsconv.available_methods()
PAPER_METHODS = ("none", "bn", "gn", "in", "ln", "pws", "sn", "wn", "ws", "sws", "mabn")
D = torch.float64
DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "methods.md"

# options that make a unit deterministic for gradcheck: MABN's custom backward equals the true gradient during its
# warm-up (r = 1, current batch statistics); past it MABN is checked against its re-derivation (tests/test_mabn.py)
GRADCHECK_NORM_OPTS = {"mabn": {"warmup_iters": 10**9}}

# batch 1 with 1×1 maps (4 output channels): (torch's message, raised in training only?). BN has one value per channel
# in training; IN one spatial element; GN with 4 channels uses 4 groups (largest divisor ≤ 32) of one value each.
_ONE = "more than 1 value per channel"
ONE_VALUE_ERRORS = {"bn": (_ONE, True), "in": ("more than 1 spatial element", False), "gn": (_ONE, False),
                    "ws": (_ONE, False)}


def _unit(name, cin=2, cout=4, dim=2, norm_opts=None, seed=0):
    torch.manual_seed(seed)
    conv = pwsconv.build_conv(name, dim, cin, cout, 3, padding=1)
    norm = pwsconv.build_norm(name, cout, dim=dim, **(norm_opts or {}))
    return nn.Sequential(conv, norm)


def _randomize_affine(unit, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in unit.named_parameters():
            if not n.endswith("weight") or n == "0.weight":
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return unit


def _train_steps(unit, steps=3, shape=(2, 2, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(unit.parameters(), lr=0.05)
    unit.train()
    for _ in range(steps):
        x = torch.randn(*shape, generator=g, dtype=next(unit.parameters()).dtype)
        loss = unit(x).pow(2).mean() + unit(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return unit


def test_every_paper_method_is_registered_with_its_documentation():
    assert set(PAPER_METHODS) <= set(METHODS)
    for name in METHODS:
        m = pwsconv.get_method(name)
        assert m.name == name and m.summary and m.reference and m.extra_params


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_unit(name, training):
    unit = _randomize_affine(_unit(name, norm_opts=GRADCHECK_NORM_OPTS.get(name)).double())
    if not training:
        _train_steps(unit, 2)
    unit.train(training)
    x0 = torch.randn(2, 2, 3, 3, dtype=D)
    unit(x0)  # any first-forward initialization happens before gradcheck
    names = [n for n, _ in unit.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in unit.parameters())
    x = x0.clone().requires_grad_(True)

    def f(x, *ps):
        return torch.func.functional_call(unit, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), fast_mode=True)


def _buffers(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("name", METHODS)
def test_train_and_eval_behaviour(name):
    method = pwsconv.get_method(name)
    unit = _unit(name).double()
    x = torch.randn(3, 2, 4, 4, dtype=D)
    x_other = x.clone()
    x_other[1:] = torch.randn(2, 2, 4, 4, dtype=D) * 3 + 1
    # train: sample 0's output depends on the rest of the batch exactly when the registry says so
    a, b = copy.deepcopy(unit).train(), copy.deepcopy(unit).train()
    depends = not torch.allclose(a(x)[0], b(x_other)[0], rtol=1e-9, atol=1e-12)
    assert depends == method.batch_dependent
    # training forwards update the running statistics of the batch-dependent methods only
    before = _buffers(unit)
    _train_steps(unit, 2, shape=(2, 2, 4, 4))
    changed = any(not torch.equal(v, before[k]) for k, v in unit.state_dict().items() if k not in dict(
        unit.named_parameters()))
    assert changed == method.batch_dependent
    # eval: deterministic, per sample, and changes no state
    unit.eval()
    state = _buffers(unit)
    y = unit(x)
    torch.testing.assert_close(unit(x), y)
    torch.testing.assert_close(unit(x_other)[0], y[0])
    for k, v in unit.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("name", METHODS)
def test_state_dict_round_trip(name):
    unit = _train_steps(_unit(name, seed=0), 3)
    buf = io.BytesIO()
    torch.save(unit.state_dict(), buf)
    buf.seek(0)
    fresh = _unit(name, seed=123)
    fresh.load_state_dict(torch.load(buf))
    unit.eval(), fresh.eval()
    x = torch.randn(2, 2, 4, 4)
    torch.testing.assert_close(fresh(x), unit(x), rtol=0, atol=0)
    # the conv keeps torch's parameter names
    assert "0.weight" in unit.state_dict()


@pytest.mark.parametrize("name", METHODS)
def test_batch_size_one(name):
    unit = _unit(name)
    for mode in (True, False):
        unit.train(mode)
        x = torch.randn(1, 2, 4, 4, requires_grad=True)
        out = unit(x)
        out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    # batch 1 with 1×1 maps: methods that normalize over a single value refuse with torch's clear ValueError
    x = torch.randn(1, 2, 1, 1)
    for mode in (True, False):
        unit.train(mode)
        expected = ONE_VALUE_ERRORS.get(name)
        if expected is not None and (mode or not expected[1]):
            with pytest.raises(ValueError, match=expected[0]):
                unit(x)
        elif name in PAPER_METHODS:
            assert torch.isfinite(unit(x)).all()
        else:  # a method added later: either works or says why
            try:
                assert torch.isfinite(unit(x)).all()
            except ValueError as e:
                assert "more than 1" in str(e)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("dim", [1, 3])
def test_1d_and_3d_units(name, dim):
    unit = _unit(name, dim=dim)
    shape = (2, 2, 5) if dim == 1 else (2, 2, 3, 3, 3)
    x = torch.randn(*shape, requires_grad=True)
    out = unit(x)
    out.sum().backward()
    assert out.shape == (2, 4) + shape[2:] and torch.isfinite(x.grad).all()
    conv = unit[0]
    assert isinstance(conv, {1: nn.Conv1d, 3: nn.Conv3d}[dim])


# ---------------------------------------------------------------------------------------------- convert / fold
class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = Block(8, 8, 1)
        self.layer2 = Block(8, 16, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.flatten(self.pool(self.layer2(self.layer1(x))), 1))


CONV_NAMES = ("conv1", "layer1.conv1", "layer1.conv2", "layer2.conv1", "layer2.conv2", "layer2.down.0")
NORM_NAMES = ("bn1", "layer1.bn1", "layer1.bn2", "layer2.bn1", "layer2.bn2", "layer2.down.1")
EXPECTED = {  # the zoo's own layer types (the builtins are checked through the registry)
    "sn": (nn.Conv2d, SwitchNorm2d), "wn": (WNConv2d, nn.Identity), "ws": (WSConv2d, nn.GroupNorm),
    "sws": (SWSConv2d, nn.Identity), "mabn": (CenConv2d, MABN2d), "pws": (pwsconv.PWSConv2d, nn.Identity),
    "bn": (nn.Conv2d, nn.BatchNorm2d), "none": (nn.Conv2d, nn.Identity), "gn": (nn.Conv2d, nn.GroupNorm),
    "in": (nn.Conv2d, nn.InstanceNorm2d), "ln": (nn.Conv2d, nn.GroupNorm),
}


@pytest.mark.parametrize("name", METHODS)
def test_convert_resnet(name):
    torch.manual_seed(0)
    net = pwsconv.convert(TinyResNet(), method=name)
    conv_t = type(pwsconv.build_conv(name, 2, 8, 8, 3))
    norm_t = type(pwsconv.build_norm(name, 8, 2))
    if name in EXPECTED:
        assert (conv_t, norm_t) == EXPECTED[name]
    for n in CONV_NAMES:
        assert type(net.get_submodule(n)) is conv_t, n
    for n in NORM_NAMES:
        assert type(net.get_submodule(n)) is norm_t, n
    assert type(net.fc) is nn.Linear  # the classifier stays plain by default
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x = torch.randn(2, 3, 8, 8)
    loss = F.cross_entropy(net(x), torch.tensor([0, 2]))
    loss.backward()
    opt.step()
    assert math.isfinite(loss.item())
    assert all(torch.isfinite(p).all() for p in net.parameters())
    net.eval()
    assert torch.isfinite(net(x)).all()


FOLDABLE_WEIGHT_METHODS = ("pws", "wn", "ws", "sws", "mabn")


@pytest.mark.parametrize("name", FOLDABLE_WEIGHT_METHODS)
def test_fold_equivalence(name):
    torch.manual_seed(0)
    net = pwsconv.convert(TinyResNet(), method=name).double()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        net(torch.randn(2, 3, 8, 8, dtype=D)).pow(2).mean().backward()
        opt.step()
    net.eval()
    folded = pwsconv.fold(net)
    x = torch.randn(3, 3, 8, 8, dtype=D)
    torch.testing.assert_close(folded(x), net(x), rtol=1e-10, atol=1e-12)
    for n in CONV_NAMES:
        assert type(folded.get_submodule(n)) is nn.Conv2d, n
    assert not any(hasattr(m, "to_plain") for m in folded.modules())
    assert type(net.conv1) is not nn.Conv2d  # fold copied, the original is untouched


@pytest.mark.parametrize("cls,x_shape", [(WNConv1d, (2, 3, 6)), (WNConv3d, (1, 3, 3, 3, 3)),
                                         (SWSConv1d, (2, 3, 6)), (SWSConv3d, (1, 3, 3, 3, 3))])
def test_fold_other_dims(cls, x_shape):
    conv = cls(3, 4, 2, groups=1).double()
    with torch.no_grad():
        conv.bias.uniform_(-1, 1)
    x = torch.randn(*x_shape, dtype=D)
    plain = conv.to_plain()
    assert type(plain) is conv._plain_cls
    torch.testing.assert_close(plain(x), conv(x))


@pytest.mark.parametrize("cls", [WNLinear, SWSLinear])
def test_linear_variants(cls):
    lin = cls(6, 3).double()
    x = torch.randn(4, 6, dtype=D)
    assert isinstance(lin, nn.Linear) and set(lin.state_dict()) >= {"weight", "bias"}
    torch.testing.assert_close(pwsconv.fold(lin)(x), lin(x))
    name = "wn" if cls is WNLinear else "sws"
    assert type(pwsconv.build_linear(name, 6, 3)) is cls
    net = pwsconv.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2)), name, convert_linear=True)
    assert type(net[2]) is cls


def test_single_weight_filters_are_left_plain_by_convert():
    model = nn.Sequential(nn.Conv2d(4, 4, 1, groups=4, bias=False), nn.BatchNorm2d(4))
    for name in ("ws", "sws", "mabn"):
        with pytest.warns(UserWarning, match="element"):
            net = pwsconv.convert(model, name)
        assert type(net[0]) is nn.Conv2d
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert type(pwsconv.convert(model, "wn")[0]) is WNConv2d  # WN is fine on a single weight


# ---------------------------------------------------------------------------------------------- weight methods
def test_wn_layer_formula_and_paper_init():
    conv = WNConv2d(3, 4, 3, padding=1).double()
    assert isinstance(conv, nn.Conv2d) and conv.bias is not None  # the WN conv has a bias
    assert torch.equal(conv.g.detach(), torch.ones(4, dtype=D))  # g = 1 as the paper
    assert set(conv.state_dict()) == {"weight", "bias", "g"}
    w = conv.weight.detach()
    torch.testing.assert_close(conv.reparam_weight(), w / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1))
    # He init of the direction: n_l·Var[W] ≈ 2 (the paper: ‖W‖² = 2)
    big = WNConv2d(64, 64, 3)
    assert 1.6 < big.weight.detach().flatten(1).pow(2).sum(1).mean() < 2.4


def test_wn_data_dependent_init():
    torch.manual_seed(0)
    conv = WNConv2d(3, 5, 3, padding=1, data_init=True).double()
    assert "initialized" in conv.state_dict() and not bool(conv.initialized)
    x = torch.randn(8, 3, 6, 6, dtype=D) * 3 + 1
    y = conv(x)  # first training forward: g and b make the outputs zero-mean, unit-variance per channel
    var, mean = torch.var_mean(y.detach(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean, torch.zeros(5, dtype=D), atol=1e-10, rtol=0)
    torch.testing.assert_close(var, torch.ones(5, dtype=D), atol=1e-8, rtol=0)
    assert bool(conv.initialized) and not torch.equal(conv.g.detach(), torch.ones(5, dtype=D))
    g_after = conv.g.detach().clone()
    conv(torch.randn(8, 3, 6, 6, dtype=D))
    assert torch.equal(conv.g.detach(), g_after)  # only once
    conv2 = pwsconv.build_conv("wn", 2, 3, 5, 3, data_init=True)
    assert conv2.data_init
    lin = WNLinear(4, 3, data_init=True)
    out = lin(torch.randn(16, 4) * 2)
    torch.testing.assert_close(out.mean(0), torch.zeros(3), atol=1e-5, rtol=0)


def test_ws_formulas_and_eps_placement():
    conv = WSConv2d(3, 4, 3).double()
    w = conv.weight.detach()
    var, mean = torch.var_mean(w, dim=(1, 2, 3), correction=0, keepdim=True)
    torch.testing.assert_close(conv.reparam_weight(), (w - mean) / torch.sqrt(var + 1e-5))
    orig = WSConv2d(3, 4, 3, original_std=True, eps=1e-3).double()
    w = orig.weight.detach()
    std, mean = torch.std_mean(w, dim=(1, 2, 3), correction=1, keepdim=True)
    torch.testing.assert_close(orig.reparam_weight(), (w - mean) / (std + 1e-3))
    # a constant filter (zero variance) standardizes to exactly 0 with either ε placement, no NaN
    with torch.no_grad():
        conv.weight[0].fill_(0.7)
        orig.weight[0].fill_(0.7)
    assert torch.isfinite(conv.reparam_weight()).all() and torch.isfinite(orig.reparam_weight()).all()
    norm = pwsconv.build_norm("ws", 48)
    # the GN group rule (norms.gn_groups): the largest divisor of C that is ≤ 32
    assert isinstance(norm, nn.GroupNorm) and norm.num_groups == 24 == pwsconv.methods.gn_groups(48)
    assert pwsconv.build_norm("ws", 64).num_groups == 32 and pwsconv.build_norm("ws", 8).num_groups == 8
    assert pwsconv.build_norm("ws", 48, num_groups=8, gn_eps=1e-3).eps == 1e-3
    c = pwsconv.build_conv("ws", 2, 3, 8, 3, eps=1e-4, original_std=True)
    assert isinstance(c, WSConv2d) and c.eps == 1e-4 and c.original_std and c.bias is None
    net = pwsconv.convert(nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8)), "ws", num_groups=2,
                          eps=1e-4)
    assert net[1].num_groups == 2 and net[0].eps == 1e-4


def test_sws_formula_floor_and_pws_identity():
    conv = SWSConv2d(3, 4, 3).double()
    with torch.no_grad():
        conv.gain.copy_(torch.tensor([1.0, 0.5, 2.0, -1.0]))
    w = conv.weight.detach()
    n = w[0].numel()
    var, mean = torch.var_mean(w, dim=(1, 2, 3), correction=0, keepdim=True)
    gain = conv.gain.detach().view(-1, 1, 1, 1)
    torch.testing.assert_close(conv.reparam_weight(), gain * math.sqrt(2) * (w - mean) / torch.sqrt(n * var + 1e-4))
    floor = SWSConv2d(3, 4, 3, floor=True, gamma_act=1.0).double()
    with torch.no_grad():
        floor.weight[0].mul_(1e-6)  # n·Var far below the floor
    w = floor.weight.detach()
    var, mean = torch.var_mean(w, dim=(1, 2, 3), correction=0, keepdim=True)
    torch.testing.assert_close(floor.reparam_weight(), (w - mean) / torch.sqrt(torch.clamp_min(n * var, 1e-4)))
    # with γ_act = sqrt(2) scaled WS is PWS with γ = ε/n and α = gain
    pws = pwsconv.PWSConv2d(3, 4, 3, gamma=1e-4 / n).double()
    with torch.no_grad():
        pws.weight.copy_(conv.weight)
        pws.alpha.copy_(conv.gain)
    torch.testing.assert_close(conv.reparam_weight(), pws.standardized_weight())
    assert SWSConv2d.no_weight_decay_params == ("gain",)
    assert SWSConv2d(3, 4, 3, use_gain=False).gain is None
    with pytest.raises(ValueError, match="gamma_act"):
        SWSConv2d(3, 4, 3, gamma_act=0)


def test_sws_gain_has_no_weight_decay():
    net = pwsconv.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), "sws")
    groups = {g["name"]: g for g in pwsconv.param_groups(net, 5e-4)}
    assert [id(p) for p in groups["no_decay"]["params"]] == [id(net[0].gain)]
    assert groups["no_decay"]["weight_decay"] == 0.0


def test_unknown_options_are_refused():
    with pytest.raises(ValueError, match="takes no option"):
        pwsconv.build_norm("mabn", 8, real_b=4)
    with pytest.raises(ValueError, match="takes no option"):
        pwsconv.build_conv("wn", 2, 3, 4, 3, gamma=1e-3)


@pytest.mark.parametrize("method,opts,needle", [
    ("pws", {"gamma": 0.0}, "gamma must be a finite number > 0 or 'auto', got 0.0"),
    ("pws", {"gamma": "automatic"}, "gamma must be"),
    ("pws", {"use_alpha": "maybe"}, "use_alpha must be true/false"),
    ("pws", {"fan_mode": "fan_avg"}, "fan_mode must be one of 'fan_in', 'fan_out'"),
    ("pws", {"clip": float("nan")}, "clip must be a finite number ≥ 0 or null"),
    ("gn", {"groups": 0}, "groups must be an integer ≥ 1"),
    ("bn", {"momentum": 1.5}, "momentum must be a finite number in [0, 1] or null"),
    ("mabn", {"batch_size": 3}, "real_batch_size (32, the batch size to simulate) must be divisible by batch_size (3"),
    ("sws", {"floor": True, "eps": 0.0}, "floor=True needs eps > 0"),
])
def test_options_are_checked_once_against_the_declaration_at_every_entry(method, opts, needle):
    """One declaration per option (type, range), one check, the same one-line message from every entry point."""
    from pwsconv.config import ConfigError, TrainConfig
    from pwsconv.detection.train import DetConfig
    from pwsconv.methods import MethodOptionError

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    entries = [lambda: pwsconv.convert(model, method, **opts), lambda: build_model("tiny_cnn", method, **opts),
               lambda: pwsconv.build_conv(method, 2, 3, 8, 3, **opts) if set(opts) <= get_method(method).conv_options
               else pwsconv.build_norm(method, 8, **opts)]
    for entry in entries:
        with pytest.raises(MethodOptionError, match=re.escape(needle)):
            entry()
    for config in (TrainConfig, DetConfig):   # the classification and the detection configs
        with pytest.raises(ConfigError, match=re.escape(needle)) as e:
            config(method=method, method_opts=opts).validate()
        assert len(str(e.value).splitlines()) == 1 and str(e.value).startswith("method_opts")


def test_declared_options_take_what_they_say():
    from pwsconv.methods import Method, Option, plain_conv

    net = build_model("tiny_cnn", "mabn", batch_size=4.0, real_batch_size=16)   # a whole float is an integer
    assert {m.B for m in net.modules() if hasattr(m, "real_B")} == {4}
    assert build_model("tiny_cnn", "bn", momentum=None) is not None
    assert type(pwsconv.build_conv("pws", 2, 3, 4, 3, gamma="auto", clip=None)) is pwsconv.PWSConv2d
    with pytest.raises(pwsconv.methods.MethodError, match="declares option 'eps' twice"):
        Method("twice", "x", plain_conv, conv_options=(Option("eps", float),), norm_options=("eps",))
    variant = dataclasses.replace(get_method("pws"), name="pws_variant")   # a variant keeps the declarations
    for m in (variant, copy.deepcopy(get_method("pws"))):
        assert m.conv_options == get_method("pws").conv_options
        with pytest.raises(pwsconv.methods.MethodOptionError, match="gamma must be a finite number"):
            m.check_options({"gamma": -1})
    bare = Method("bare", "x", plain_conv, conv_options=frozenset({"anything"}))   # a bare name: any value
    assert bare.conv_options == frozenset({"anything"}) and bare.check_options({"anything": object()})


def test_docs_list_every_declared_option():
    from pwsconv.methods import options_table

    assert options_table() in DOCS.read_text(encoding="utf-8"), \
        "docs/methods.md: regenerate the options table from pwsconv.methods.options_table()"


def test_docs_table_lists_every_method():
    text = DOCS.read_text(encoding="utf-8")
    table = methods_table()
    for name in METHODS:
        assert f"| `{name}` |" in text, f"docs/methods.md misses {name}: regenerate it from pwsconv.methods.methods_table()"
        assert f"| `{name}` |" in table


# ---------------------------------------------------------------------------------------------- review: caching
REPARAM_CLASSES = [WSConv2d, SWSConv2d, WNConv2d, CenConv2d, pwsconv.PWSConv2d]


@pytest.mark.parametrize("cls", REPARAM_CLASSES, ids=lambda c: c.__name__)
def test_parametrized_weight_forward_to_and_fold(cls):
    """``nn.utils.parametrize`` on ``weight`` (no ``weight`` in ``_parameters`` any more): the layer applies its
    reparameterization to the parametrized weight, in eval too (never a stale cached value), and ``.to()`` works."""
    from torch.nn.utils import parametrize

    class Neg(nn.Module):
        def forward(self, w):
            return -w

    torch.manual_seed(0)
    layer = cls(3, 4, 3)
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.weight.neg_()
    parametrize.register_parametrization(layer, "weight", Neg())
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(layer(x), twin(x))
    layer.eval()
    twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), twin(x))
        layer.parametrizations.weight.original.mul_(2)
        twin.weight.mul_(2)
        torch.testing.assert_close(layer(x), twin(x))
        torch.testing.assert_close(layer.to_plain()(x), twin(x))
    layer.double()
    with torch.no_grad():
        torch.testing.assert_close(layer(x.double()), twin.double()(x.double()))


@pytest.mark.parametrize("cls,settings", [
    (WSConv2d, {"eps": 0.5, "original_std": True}),
    (SWSConv2d, {"eps": 2.0, "floor": True, "gamma_act": 3.0}),
    (WNConv2d, {}),
    (CenConv2d, {}),
], ids=lambda v: v.__name__ if isinstance(v, type) else "")
def test_zoo_eval_cache_settings_inplace_and_load(cls, settings, monkeypatch):
    """The eval cache of WS/SWS/WN/CenConv (a ``pwsconv.cached`` scope): computed once per state; assigning a
    setting, an in-place change of any parameter the weight is computed from, reset_parameters() and
    load_state_dict() all make it compute anew."""
    torch.manual_seed(0)
    layer = cls(3, 4, 3).eval()
    calls = []
    orig = layer.compute_weight
    monkeypatch.setattr(layer, "compute_weight", lambda: (calls.append(1), orig())[1])
    x = torch.randn(2, 3, 6, 6)

    def check():
        torch.testing.assert_close(layer(x), F.conv2d(x, orig(), layer.bias), rtol=0, atol=0)

    with torch.no_grad(), pwsconv.cached(layer):
        check()
        check()
        assert len(calls) == 1 and pwsconv.accel.is_cached(layer)
        for k, v in settings.items():
            n = len(calls)
            setattr(layer, k, v)
            check()
            assert len(calls) == n + 1, k
        assert all(getattr(layer, k) == v for k, v in settings.items())
        for name in layer.weight_params:
            p = getattr(layer, name)
            if p is not None:
                p.mul_(0.5)
                check()
        n = len(calls)
        layer.reset_parameters()
        check()
        other = cls(3, 4, 3)
        for p in other.parameters():
            p.normal_()
        layer.load_state_dict(other.state_dict())
        check()
        assert len(calls) == n + 2
        layer.requires_grad_(False)
        check()
        assert len(calls) == n + 2     # frozen: still the cached weight


def test_sws_settings_are_validated_on_assignment():
    layer = SWSConv2d(3, 4, 3)
    for name, bad in (("gamma_act", 0.0), ("gamma_act", float("nan")), ("eps", -1.0)):
        with pytest.raises(ValueError, match=name):
            setattr(layer, name, bad)
    layer.gamma_act = 1.0
    assert layer.gamma_act == 1.0


@pytest.mark.parametrize("cls", [WNConv2d, SWSConv2d, pwsconv.PWSConv2d])
def test_plain_conv_state_dict_loads_strictly_with_own_parameters_at_init(cls):
    """A plain nn.Conv2d state_dict loads strictly into every reparameterized twin; α / g / gain take their initial
    value 1, and a state that has them keeps them (a missing data-init flag alone resets nothing)."""
    torch.manual_seed(0)
    plain = nn.Conv2d(3, 4, 3)
    layer = cls(3, 4, 3)
    extra = next(n for n in ("alpha", "g", "gain") if getattr(layer, n, None) is not None)
    with torch.no_grad():
        getattr(layer, extra).fill_(3.0)
    layer.load_state_dict(plain.state_dict(), strict=True)
    assert torch.equal(layer.weight, plain.weight) and torch.all(getattr(layer, extra) == 1.0)
    if cls is pwsconv.PWSConv2d:
        src = pwsconv.PWSConv2d(3, 4, 3)
        with torch.no_grad():
            src.alpha.fill_(2.0)
        dst = pwsconv.PWSConv2d(3, 4, 3, data_init_alpha=True)
        dst.load_state_dict(src.state_dict(), strict=True)   # no alpha_initialized in the state: α kept
        assert torch.all(dst.alpha == 2.0) and not bool(dst.alpha_initialized)
