"""Switchable Normalization (Luo et al., ICLR 2019) against a per-(sample, channel) re-derivation."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import pwsconv
from pwsconv.layers import SwitchNorm1d, SwitchNorm2d, SwitchNorm3d, sn_batch_average

D = torch.float64


def reference_sn(x, layer, training, running=None):
    """The algorithm of the authors' layer written with explicit loops; returns (output, (mean_bn, var_bn))."""
    n, c = x.shape[:2]
    xv = x.reshape(n, c, -1)
    length = xv.shape[-1]
    mean_in = torch.empty(n, c, dtype=x.dtype)
    var_in = torch.empty(n, c, dtype=x.dtype)
    for i in range(n):
        for j in range(c):
            v = xv[i, j]
            mean_in[i, j] = v.sum() / length
            var_in[i, j] = ((v - mean_in[i, j]) ** 2).sum() / (length - 1) if length > 1 else 0.0
    second = var_in + mean_in ** 2
    mean_ln = torch.stack([mean_in[i].mean() for i in range(n)]).view(n, 1)
    var_ln = torch.stack([second[i].mean() for i in range(n)]).view(n, 1) - mean_ln ** 2
    mw = torch.exp(layer.mean_weight.detach()) / torch.exp(layer.mean_weight.detach()).sum()
    vw = torch.exp(layer.var_weight.detach()) / torch.exp(layer.var_weight.detach()).sum()
    mean = mw[0] * mean_in + mw[1] * mean_ln
    var = vw[0] * var_in + vw[1] * var_ln
    stats = None
    if layer.using_bn:
        if training:
            mean_bn = mean_in.mean(0, keepdim=True)
            var_bn = second.mean(0, keepdim=True) - mean_bn ** 2
            stats = (mean_bn.view(-1), var_bn.view(-1))
        else:
            mean_bn, var_bn = running[0].view(1, c), running[1].view(1, c)
        mean = mean + mw[2] * mean_bn
        var = var + vw[2] * var_bn
    out = (xv - mean.unsqueeze(-1)) / torch.sqrt(var.unsqueeze(-1) + layer.eps)
    out = out * layer.weight.detach().view(1, c, 1) + layer.bias.detach().view(1, c, 1)
    return out.reshape(x.shape), stats


def _randomize(layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return layer


@pytest.mark.parametrize("cls,shape", [(SwitchNorm2d, (3, 4, 3, 2)), (SwitchNorm1d, (3, 4, 5)),
                                       (SwitchNorm3d, (2, 4, 2, 2, 2)), (SwitchNorm2d, (3, 4, 1, 1)),
                                       (SwitchNorm1d, (3, 4))])
@pytest.mark.parametrize("using_bn", [True, False])
def test_matches_rederivation_train_and_eval(cls, shape, using_bn):
    layer = _randomize(cls(4, using_bn=using_bn).double())
    running = (torch.zeros(4, dtype=D), torch.zeros(4, dtype=D))  # the authors initialise them to 0
    for _ in range(3):
        x = torch.randn(*shape, dtype=D)
        want, stats = reference_sn(x, layer, True)
        torch.testing.assert_close(layer(x), want)
        if using_bn:
            running = tuple(0.9 * r + 0.1 * s for r, s in zip(running, stats))
            torch.testing.assert_close(layer.running_mean, running[0])
            torch.testing.assert_close(layer.running_var, running[1])
    layer.eval()
    x = torch.randn(*shape, dtype=D)
    want, _ = reference_sn(x, layer, False, running)
    torch.testing.assert_close(layer(x), want)
    assert torch.isfinite(layer(x)).all()


def test_1x1_maps_have_no_nan_and_zero_instance_variance():
    layer = SwitchNorm2d(3).double()
    x = torch.randn(4, 3, 1, 1, dtype=D, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert torch.isfinite(layer.running_var).all()
    # with all the weight on IN: the instance mean is the value itself and the instance variance 0 → output = bias
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor([60.0, 0.0, 0.0]))
        layer.var_weight.copy_(torch.tensor([60.0, 0.0, 0.0]))
        layer.bias.fill_(0.25)
    torch.testing.assert_close(layer(x), torch.full_like(x, 0.25))
    # batch size 1 with 1×1 maps (one value per channel) is still defined
    assert torch.isfinite(layer(torch.randn(1, 3, 1, 1, dtype=D))).all()


def test_means_and_variances_are_mixed_separately():
    layer = SwitchNorm2d(3).double()
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor([60.0, 0.0, 0.0]))  # mean → IN mean
        layer.var_weight.copy_(torch.tensor([0.0, 60.0, 0.0]))  # var → LN var
    x = torch.randn(2, 3, 4, 4, dtype=D)
    mean_in = x.mean((2, 3), keepdim=True)
    var_in = x.var((2, 3), keepdim=True)  # unbiased over H·W, as the authors
    var_ln = (var_in + mean_in ** 2).mean(1, keepdim=True) - mean_in.mean(1, keepdim=True) ** 2
    torch.testing.assert_close(layer(x), (x - mean_in) / torch.sqrt(var_ln + 1e-5))
    mw, vw = layer.mixture_weights()
    assert mw.shape == vw.shape == (3,) and torch.allclose(mw.sum(), torch.tensor(1.0, dtype=D))


def test_defaults_match_the_authors_layer():
    layer = SwitchNorm2d(5)
    assert layer.momentum == 0.9 and layer.eps == 1e-5 and layer.using_moving_average and layer.using_bn
    torch.testing.assert_close(layer.mean_weight.detach(), torch.ones(3))  # equal mixture at init
    torch.testing.assert_close(layer.var_weight.detach(), torch.ones(3))
    assert torch.equal(layer.running_mean, torch.zeros(5)) and torch.equal(layer.running_var, torch.zeros(5))
    assert torch.equal(SwitchNorm2d(5, last_gamma=True).weight.detach(), torch.zeros(5))


def test_using_bn_false_mixes_in_and_ln_only():
    layer = SwitchNorm2d(3, using_bn=False).double()
    assert layer.mean_weight.shape == (2,) and layer.var_weight.shape == (2,)
    assert "running_mean" not in layer.state_dict()
    x = torch.randn(1, 3, 4, 4, dtype=D)
    torch.testing.assert_close(layer.train()(x), layer.eval()(x))  # nothing batch dependent, train == eval


def test_eval_uses_running_bn_stats_and_sample_in_ln_stats():
    layer = SwitchNorm2d(3).double()
    for _ in range(4):
        layer(torch.randn(4, 3, 3, 3, dtype=D) * 2 + 1)
    layer.eval()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(3, 3, 3, 3, dtype=D)
    y = layer(x)
    x2 = x.clone()
    x2[1:] = torch.randn(2, 3, 3, 3, dtype=D) * 5
    torch.testing.assert_close(layer(x2)[0], y[0])  # per-sample in eval
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_batch_average_accumulates_raw_sums_and_calibrates():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), SwitchNorm2d(3, using_moving_average=False))
    batches = [torch.randn(2, 2, 3, 3) for _ in range(3)]
    sn = net[1]
    mb, sq = torch.zeros(3), torch.zeros(3)
    for b in batches:  # a training pass adds raw sums
        with torch.no_grad():
            y = net[0](b).double()
        mean_in, var_in = y.mean((2, 3)), y.var((2, 3))
        m = mean_in.mean(0)
        v = (var_in + mean_in ** 2).mean(0) - m ** 2
        mb += m.float()
        sq += (m ** 2 + v).float()
        net(b)
    torch.testing.assert_close(sn.running_mean, mb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sn.running_var, sq, rtol=1e-5, atol=1e-5)
    net.eval()
    k = sn_batch_average(net, batches)
    assert k == 3 and not net.training and not net[1].training  # modes restored
    torch.testing.assert_close(sn.running_mean, mb / 3, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sn.running_var, sq / 3 - (mb / 3) ** 2, rtol=1e-5, atol=1e-5)
    assert sn_batch_average(net, batches, num_batches=2) == 2
    with pytest.raises(ValueError, match="no batches"):
        sn_batch_average(net, [])


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("using_bn", [True, False])
def test_gradcheck(training, using_bn):
    layer = _randomize(SwitchNorm2d(3, using_bn=using_bn).double(), seed=1)
    if using_bn:
        with torch.no_grad():
            layer.running_mean.uniform_(-1, 1)
            layer.running_var.uniform_(0.5, 2)
    layer.train(training)
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in layer.parameters())
    x = torch.randn(2, 3, 2, 3, dtype=D, requires_grad=True)

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), fast_mode=True)


def test_mixture_logits_receive_gradients_and_state_dict_round_trip():
    layer = SwitchNorm2d(3)
    layer(torch.randn(2, 3, 4, 4)).pow(3).sum().backward()
    assert layer.mean_weight.grad.abs().sum() > 0 and layer.var_weight.grad.abs().sum() > 0
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    other = SwitchNorm2d(3)
    other.load_state_dict(torch.load(buf))
    assert int(other.num_batches_tracked) == 1
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(other.eval()(x), copy.deepcopy(layer).eval()(x))


def test_registry_and_convert_options():
    norm = pwsconv.build_norm("sn", 8, using_bn=False, momentum=0.5, using_moving_average=False)
    assert isinstance(norm, SwitchNorm2d) and not norm.using_bn and norm.momentum == 0.5
    assert isinstance(pwsconv.build_norm("sn", 8, dim=3), SwitchNorm3d)
    net = pwsconv.convert(nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8)), "sn", using_bn=False)
    assert type(net[0]) is nn.Conv2d and net[0].bias is None and isinstance(net[1], SwitchNorm2d)
    assert not net[1].using_bn
    assert pwsconv.is_norm_layer(net[1])


def test_input_checks():
    with pytest.raises(ValueError, match="4D"):
        SwitchNorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="channels"):
        SwitchNorm1d(3)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="positive"):
        SwitchNorm2d(0)
