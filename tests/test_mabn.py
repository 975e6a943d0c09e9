"""MABN (Yan et al., ICLR 2020) and its weight-centralized conv, against a direct re-derivation of the algorithm."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pwsconv
from pwsconv.layers import CenConv1d, CenConv2d, CenConv3d, MABN1d, MABN2d, MABN3d


# ---------------------------------------------------------------------------------------------- the re-derivation
class ReferenceMABN:
    """The algorithm written out channel by channel with Python lists as ring buffers (no code shared with the layer)."""

    def __init__(self, channels: int, B: int, real_B: int, eps=1e-5, momentum=0.98, warmup_iters=100):
        self.C, self.size = channels, real_B // B
        self.eps, self.momentum, self.warmup = eps, momentum, warmup_iters
        self.it = 0
        self.running_var = [1.0] * channels
        self.x2_buf = [[0.0] * channels for _ in range(self.size)]
        self.gz_buf = [[0.0] * channels for _ in range(self.size)]

    def step(self, x, weight, bias, grad_out):
        """One training iteration: returns (out, grad_x, grad_weight, grad_bias, r per channel)."""
        self.it += 1
        t, slot = self.it, self.it % self.size
        warm = t <= self.size or t < self.warmup
        out, gx = torch.empty_like(x), torch.empty_like(x)
        gw, gb, rs = torch.empty(self.C, dtype=x.dtype), torch.empty(self.C, dtype=x.dtype), []
        for c in range(self.C):
            xc, go = x[:, c], grad_out[:, c]
            self.x2_buf[slot][c] = float((xc * xc).mean())
            var = self.x2_buf[slot][c] if warm else sum(b[c] for b in self.x2_buf) / self.size
            s = math.sqrt(var + self.eps)
            z = xc / s
            if t <= max(1000, self.warmup):
                r = 1.0
            else:
                r = min(max(s / math.sqrt(self.running_var[c] + self.eps), 0.2), 5.0)
            rs.append(r)
            y = r * z
            out[:, c] = weight[c] * y + bias[c]
            self.running_var[c] = self.momentum * self.running_var[c] + (1 - self.momentum) * var
            g = go * weight[c] * r
            self.gz_buf[slot][c] = float((g * z).mean())
            mean_gz = self.gz_buf[slot][c] if warm else sum(b[c] for b in self.gz_buf) / self.size
            gx[:, c] = (g - z * mean_gz) / s
            gw[c] = (go * y).sum()
            gb[c] = go.sum()
        return out, gx, gw, gb, torch.tensor(rs, dtype=x.dtype)


def _run(layer, ref, iters, shape, gen, check_r=None):
    for _ in range(iters):
        x = torch.randn(*shape, generator=gen, dtype=torch.float64).mul_(2).requires_grad_(True)
        go = torch.randn(*shape, generator=gen, dtype=torch.float64)
        layer.weight.grad = layer.bias.grad = None
        out = layer(x)
        out.backward(go)
        r_out, r_gx, r_gw, r_gb, r = ref.step(x.detach(), layer.weight.detach(), layer.bias.detach(), go)
        torch.testing.assert_close(out, r_out, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(x.grad, r_gx, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(layer.weight.grad, r_gw, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(layer.bias.grad, r_gb, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(layer.running_var, torch.tensor(ref.running_var, dtype=torch.float64))
        assert int(layer.iters) == ref.it
        if check_r is not None:
            check_r(r)
        with torch.no_grad():  # move the affine parameters like an optimizer would
            layer.weight.add_(0.1 * torch.randn(layer.weight.shape, generator=gen, dtype=torch.float64))
            layer.bias.add_(0.1 * torch.randn(layer.bias.shape, generator=gen, dtype=torch.float64))
    torch.testing.assert_close(layer.buffer_x2, torch.tensor(ref.x2_buf, dtype=torch.float64))
    torch.testing.assert_close(layer.buffer_gz, torch.tensor(ref.gz_buf, dtype=torch.float64))


@pytest.mark.parametrize("batch", [2, 3, 1])
def test_forward_backward_match_rederivation_through_warmup(batch):
    gen = torch.Generator().manual_seed(batch)
    # buffer of 3 iterations, warm-up of 5: iterations 1-4 use the batch, 5.. the simple moving averages
    layer = MABN2d(3, B=2, real_B=6, warmup_iters=5).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, -1.5, 2.0]))
        layer.bias.copy_(torch.tensor([0.1, 0.0, -0.3]))
    ref = ReferenceMABN(3, 2, 6, warmup_iters=5)
    _run(layer, ref, 12, (batch, 3, 2, 3), gen)


def test_buffer_longer_than_warmup():
    # iteration ≤ buffer_size also counts as warm-up even after warmup_iters
    gen = torch.Generator().manual_seed(7)
    layer = MABN2d(2, B=1, real_B=4, warmup_iters=0).double()
    ref = ReferenceMABN(2, 1, 4, warmup_iters=0)
    _run(layer, ref, 9, (2, 2, 2, 2), gen)


def test_renormalization_clamp_after_iteration_1000():
    gen = torch.Generator().manual_seed(3)
    layer = MABN2d(3, B=2, real_B=4, warmup_iters=10).double()
    ref = ReferenceMABN(3, 2, 4, warmup_iters=10)
    # jump to iteration 999 with running variances far from the batch statistics (≈ 4) so that r hits both clamps
    rv = [1e-8, 1e6, 1.0]
    with torch.no_grad():
        layer.iters.fill_(999)
        layer.running_var.copy_(torch.tensor(rv))
    ref.it, ref.running_var = 999, list(rv)
    seen = []
    _run(layer, ref, 4, (2, 3, 3, 3), gen, check_r=seen.append)
    rs = torch.stack(seen)
    assert (rs[0] == 1).all()  # iteration 1000 = max(1000, warmup): exactly 1
    assert rs[1, 0] == 5 and (rs[1:, 1] == 0.2).all()  # from 1001 on: clamped to [1/5, 5]
    assert (rs[1:, 2] != 1).all() and (rs[1:, 2] < 5).all()


def test_backward_is_true_gradient_during_warmup():
    # while warming up (r = 1, var = the batch's second moment) the custom backward is the exact gradient
    layer = MABN2d(3, B=2, real_B=4, warmup_iters=10**9).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.7, -1.2, 1.9]))
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in layer.parameters())

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params))


def test_backward_is_not_the_true_gradient_after_warmup():
    # intentional: past warm-up MABN back-propagates through moving averages, not through its own forward
    torch.manual_seed(0)
    layer = MABN2d(2, B=2, real_B=4, warmup_iters=0).double()  # buffer of 2 slots
    for _ in range(3):
        layer(torch.randn(2, 2, 2, 2, dtype=torch.float64)).sum().backward()
    other_slot = layer.buffer_x2[1].clone()  # iteration 4 writes slot 0 and averages it with slot 1
    x = torch.randn(2, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    go = torch.randn(2, 2, 2, 2, dtype=torch.float64)
    out = layer(x)
    out.backward(go)
    # the same forward in plain autograd (r = 1 before iteration 1000): var = SMA of (x², other slot)
    xt = x.detach().clone().requires_grad_(True)
    var = ((xt ** 2).mean((0, 2, 3)) + other_slot) / 2
    out_true = layer.weight.detach().view(1, -1, 1, 1) * xt / torch.sqrt(var + layer.eps).view(1, -1, 1, 1)
    torch.testing.assert_close(out, out_true)
    out_true.backward(go)
    assert not torch.allclose(x.grad, xt.grad, rtol=1e-3, atol=1e-6)


def test_eval_is_affine_in_running_var():
    layer = MABN2d(4, B=2, real_B=4)
    for _ in range(3):
        layer(torch.randn(2, 4, 3, 3)).sum().backward()
    layer.eval()
    x = torch.randn(5, 4, 3, 3)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    want = x / torch.sqrt(layer.running_var + layer.eps).view(1, -1, 1, 1) * layer.weight.view(1, -1, 1, 1) \
        + layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), want)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k  # eval changes no state


def test_real_B_must_be_divisible_by_B():
    with pytest.raises(ValueError, match="divisible"):
        MABN2d(8, B=3, real_B=8)
    with pytest.raises(ValueError, match="positive int"):
        MABN2d(8, B=0, real_B=8)
    assert MABN2d(8, B=4, real_B=32).buffer_size == 8


def test_input_dims_checked():
    with pytest.raises(ValueError, match="4D"):
        MABN2d(3, 2, 4)(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="channels"):
        MABN2d(3, 2, 4)(torch.randn(2, 4, 2, 2))


@pytest.mark.parametrize("cls,shape", [(MABN1d, (2, 3)), (MABN1d, (2, 3, 5)), (MABN3d, (2, 3, 2, 2, 2))])
def test_other_dims(cls, shape):
    layer = cls(3, B=2, real_B=4, warmup_iters=0)
    for _ in range(4):
        x = torch.randn(*shape, requires_grad=True)
        layer(x).sum().backward()
        assert torch.isfinite(x.grad).all()
    assert layer.eval()(torch.randn(*shape)).shape == shape


def test_any_batch_size_and_batch_size_one():
    layer = MABN2d(3, B=2, real_B=8, warmup_iters=2)
    for n in (1, 2, 5, 1, 3, 7):
        x = torch.randn(n, 3, 2, 2, requires_grad=True)
        out = layer(x)
        out.sum().backward()
        assert out.shape == x.shape and torch.isfinite(x.grad).all()
    # 1×1 maps at batch 1 (one value per channel): still defined, no mean is subtracted
    out = layer(torch.randn(1, 3, 1, 1))
    assert torch.isfinite(out).all()


def test_gradient_accumulation_two_forwards_then_backwards():
    """Two forwards, then both backwards (gradient accumulation): each backward uses its own forward's statistics,
    so the accumulated gradients equal those of forward-backward, forward-backward on a copy."""
    torch.manual_seed(0)
    layer = MABN2d(2, B=2, real_B=4, warmup_iters=0).double()
    for _ in range(3):     # fill the moving statistics first
        layer(torch.randn(2, 2, 3, 3, dtype=torch.float64)).square().sum().backward()
    layer.zero_grad()
    twin = copy.deepcopy(layer)
    a, b = (torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True) for _ in range(2))
    la, lb = layer(a).sum(), layer(b).square().sum()
    la.backward()
    lb.backward()
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    twin(a2).sum().backward()
    twin(b2).square().sum().backward()
    assert int(layer.iters) == int(twin.iters) == 5
    for got, want in ((layer.weight.grad, twin.weight.grad), (layer.bias.grad, twin.bias.grad), (a.grad, a2.grad),
                      (b.grad, b2.grad)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for name, buf in layer.named_buffers():
        torch.testing.assert_close(buf, dict(twin.named_buffers())[name], rtol=1e-12, atol=1e-12)


def test_state_dict_round_trip_keeps_iteration_and_buffers():
    torch.manual_seed(0)
    layer = MABN2d(3, B=2, real_B=6, warmup_iters=2)
    for _ in range(5):
        layer(torch.randn(2, 3, 2, 2)).sum().backward()
    sd = layer.state_dict()
    assert set(sd) == {"weight", "bias", "running_var", "iters", "buffer_x2", "buffer_gz"}
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    other = MABN2d(3, B=2, real_B=6, warmup_iters=2)
    other.load_state_dict(torch.load(buf))
    assert int(other.iters) == 5
    x = torch.randn(2, 3, 2, 2)
    torch.testing.assert_close(other.eval()(x), layer.eval()(x))
    # training resumes identically (same ring buffers, same counter)
    layer.train(), other.train()
    torch.testing.assert_close(other(x), layer(x))


def test_trains_at_batch_size_2():
    torch.manual_seed(0)
    net = nn.Sequential(
        CenConv2d(2, 8, 3, padding=1), MABN2d(8, B=2, real_B=8, warmup_iters=5), nn.ReLU(),
        CenConv2d(8, 8, 3, padding=1), MABN2d(8, B=2, real_B=8, warmup_iters=5), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2),
    )
    data = torch.randn(8, 2, 4, 4)
    labels = (data[:, 0].mean((1, 2)) > data[:, 1].mean((1, 2))).long()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)

    def epoch_loss():
        total = 0.0
        for i in range(0, 8, 2):  # batch size 2
            loss = F.cross_entropy(net(data[i:i + 2]), labels[i:i + 2])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        return total / 4

    first = epoch_loss()
    for _ in range(14):
        last = epoch_loss()
    assert math.isfinite(last) and last < first
    assert int(net[1].iters) == 60  # well past warm-up and the 4-slot buffers
    net.eval()
    assert torch.isfinite(net(data)).all()


# ---------------------------------------------------------------------------------------------- CenConv
@pytest.mark.parametrize("cls,x_shape,kw", [
    (CenConv1d, (2, 4, 7), dict(kernel_size=3, dilation=2, groups=2)),
    (CenConv2d, (2, 4, 6, 6), dict(kernel_size=3, dilation=2, groups=2, stride=2, padding=1)),
    (CenConv3d, (1, 4, 4, 4, 4), dict(kernel_size=2, groups=4)),
])
def test_cenconv_centres_each_filter_and_folds(cls, x_shape, kw):
    conv = cls(4, 6 if kw.get("groups", 1) != 4 else 8, **kw).double()
    assert conv.bias is None  # the authors' recommendation: no bias before MABN
    assert isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    w = conv.reparam_weight()
    torch.testing.assert_close(w.mean(dim=tuple(range(1, w.dim()))), torch.zeros(w.shape[0], dtype=torch.float64))
    torch.testing.assert_close(w, conv.weight - conv.weight.mean(dim=tuple(range(1, w.dim())), keepdim=True))
    x = torch.randn(*x_shape, dtype=torch.float64)
    plain = pwsconv.fold(conv)
    assert type(plain) is cls._plain_cls
    torch.testing.assert_close(plain(x), conv(x))
    assert set(conv.state_dict()) == {"weight"}


def test_cenconv_with_bias_and_grad_mean_zero():
    conv = CenConv2d(3, 4, 3, bias=True).double()
    assert conv.bias is not None
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    conv(x).pow(2).sum().backward()
    torch.testing.assert_close(conv.weight.grad.mean((1, 2, 3)), torch.zeros(4, dtype=torch.float64))


def test_cenconv_rejects_single_weight_filters():
    with pytest.raises(ValueError, match="element"):
        CenConv2d(4, 4, 1, groups=4)


def test_cenconv_plus_mabn_eval_is_one_conv():
    """The arithmetic of folding (pwsconv.fold itself: tests/test_fold.py): CenConv + MABN in eval is one conv."""
    torch.manual_seed(0)
    conv, norm = CenConv2d(3, 4, 3, padding=1).double(), MABN2d(4, B=2, real_B=4).double()
    for _ in range(3):
        norm(conv(torch.randn(2, 3, 4, 4, dtype=torch.float64))).sum().backward()
    conv.eval(), norm.eval()
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    folded = nn.Conv2d(3, 4, 3, padding=1).double()
    with torch.no_grad():
        folded.weight.copy_(conv.reparam_weight() * scale.view(-1, 1, 1, 1))
        folded.bias.copy_(norm.bias)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(folded(x), norm(conv(x)))


def test_registry_options_reach_mabn():
    norm = pwsconv.build_norm("mabn", 8, batch_size=4, real_batch_size=16, warmup_iters=7, momentum=0.9)
    assert isinstance(norm, MABN2d) and norm.buffer_size == 4 and norm.warmup_iters == 7 and norm.momentum == 0.9
    default = pwsconv.build_norm("mabn", 8)
    assert (default.B, default.real_B, default.buffer_size) == (2, 32, 16)
    assert isinstance(pwsconv.build_norm("mabn", 8, dim=1), MABN1d)
    with pytest.raises(ValueError, match="divisible"):
        pwsconv.build_norm("mabn", 8, batch_size=3, real_batch_size=8)
    conv = pwsconv.build_conv("mabn", 2, 3, 8, 3)
    assert isinstance(conv, CenConv2d) and conv.bias is None
    net = pwsconv.convert(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), "mabn", real_batch_size=8)
    assert isinstance(net[0], CenConv2d) and isinstance(net[1], MABN2d) and net[1].buffer_size == 4


def test_param_groups_treat_mabn_affine_as_norm():
    net = nn.Sequential(CenConv2d(3, 4, 3), MABN2d(4, 2, 4))
    groups = {g["name"]: g for g in pwsconv.param_groups(net, 1e-4, norm_weight_decay=0.0)}
    norm_ids = {id(p) for p in groups["norm"]["params"]}
    assert {id(net[1].weight), id(net[1].bias)} == norm_ids


def test_deepcopy_and_double():
    layer = MABN2d(3, 2, 4)
    layer(torch.randn(2, 3, 2, 2))
    c = copy.deepcopy(layer).double()
    assert c.buffer_x2.dtype == torch.float64 and c.iters.dtype == torch.long and int(c.iters) == 1


def test_fp16_loss_scale_is_kept_out_of_the_moving_average_and_overflows_out_of_the_buffers():
    """Under fp16 a GradScaler multiplies the loss, so Σ g·z carries its scale, which changes (×0.5 after an
    overflow, ×2 after a stretch without one): with the scaler linked (``pwsconv.link_optimizer(..., scaler=)``)
    the window averages unscaled statistics and the gradients are the unscaled run's, exactly (the scales are
    powers of two). A non-finite statistic (the overflowing step, which the scaler skips) does not enter the
    buffers, so the next steps are not NaN (unlinked too, with float16 inputs)."""
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 3, 3), MABN2d(3, B=2, real_B=6, warmup_iters=1), nn.ReLU(), nn.Flatten(),
                             nn.Linear(27, 4))

    ref, scaled = net(), net()
    x = torch.randn(6, 2, 1, 5, 5)
    ref(x[0]), scaled(x[0])
    opt = torch.optim.SGD(scaled.parameters(), lr=0.0)
    sc = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    pwsconv.link_optimizer(scaled, opt, scaler=sc)
    for step in range(6):
        ref.zero_grad()
        ref(x[step]).square().sum().backward()
        opt.zero_grad()
        sc.scale(scaled(x[step]).square().sum()).backward()
        s = sc.get_scale()
        for (k, p), q in zip(ref.named_parameters(), scaled.parameters()):
            torch.testing.assert_close(q.grad / s, p.grad, rtol=1e-6, atol=1e-9, msg=f"step {step}: {k}")
        sc.update(new_scale=s * (0.5 if step % 2 else 2.0))
    layer = scaled[1]
    with torch.no_grad():
        layer.buffer_gz.zero_()
    out = layer(torch.randn(2, 3, 4, 4, requires_grad=True))
    out.backward(torch.full_like(out, float("inf")))     # an overflowing backward
    assert torch.isfinite(layer.buffer_gz).all() and torch.isfinite(layer.buffer_x2).all()
    y = layer(torch.randn(2, 3, 4, 4, requires_grad=True))
    y.sum().backward()
    assert torch.isfinite(y).all()
    alone = MABN2d(3, B=2, real_B=6, warmup_iters=1)   # no scaler: guarded by its float16 input
    for _ in range(2):
        out = alone(torch.randn(2, 3, 4, 4, dtype=torch.float16, requires_grad=True))
        out.backward(torch.full_like(out, float("inf")))
    assert torch.isfinite(alone.buffer_gz).all()
