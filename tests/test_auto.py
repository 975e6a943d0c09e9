"""gamma="auto": the stabilized PWS layer — γ relative to the He-init filter variance plus unit-wise
adaptive gradient clipping of W, α and β inside the layer. Its forward is eq. 12 (so it folds, is batch-independent
and round-trips through state_dict); only the gradients reaching the parameters are clipped."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch.autograd import gradcheck
from torch.func import functional_call

import pwsconv
from pwsconv import PWSConv1d, PWSConv2d, PWSConv3d, PWSConvTranspose2d, PWSLinear
from pwsconv.models import build_model
from pwsconv.functional import (AUTO_CLIP, AUTO_CLIP_W, AUTO_GAMMA, CLIP_BIAS_FLOOR, auto_bias_floor, auto_clip,
                                 auto_clip_w, check_clip, unit_clip)

F64 = torch.float64

LAYERS = {
    "conv1d": (lambda **kw: PWSConv1d(4, 3, 3, padding=1, **kw), (2, 4, 7)),
    "conv2d_grouped": (lambda **kw: PWSConv2d(4, 6, 3, groups=2, **kw), (2, 4, 6, 5)),
    "conv3d": (lambda **kw: PWSConv3d(2, 3, 2, **kw), (1, 2, 3, 4, 3)),
    "convT2d_grouped": (lambda **kw: PWSConvTranspose2d(4, 6, 3, stride=2, groups=2, **kw), (2, 4, 3, 4)),
    "linear": (lambda **kw: PWSLinear(5, 3, **kw), (4, 5)),
}


def make(name, dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    ctor, shape = LAYERS[name]
    layer = ctor(**kw).to(dtype)
    with torch.no_grad():   # non-trivial α and β
        layer.alpha.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.2, 0.2)
    return layer, torch.randn(shape, dtype=dtype)


def filters(layer, t):
    """[filters, n_l] view of a weight-shaped tensor (transposed layers: one filter per (group, out) slice)."""
    if isinstance(layer, PWSConvTranspose2d):
        g = layer.groups
        v = t.reshape(g, t.shape[0] // g, *t.shape[1:]).transpose(1, 2)
        return v.reshape(g * t.shape[1], -1)
    return t.reshape(t.shape[0], -1)


# ------------------------------------------------------------------------------------------------ forward = eq. 12
@pytest.mark.parametrize("name", LAYERS)
def test_auto_forward_is_eq12_with_relative_gamma(name):
    auto, x = make(name, gamma="auto")
    paper, _ = make(name, gamma=AUTO_GAMMA, equiv=True)    # the same γ rule written with the authors' switch
    assert auto.effective_gamma == pytest.approx(2 * AUTO_GAMMA / auto.fan)
    assert torch.equal(auto(x), paper(x))
    assert auto.clip_lambda == AUTO_CLIP and paper.clip_lambda == 0.0


def test_paper_default_unchanged():
    layer = PWSConv2d(3, 4, 3)
    assert layer.gamma == 1e-3 and layer.clip is None and layer.clip_lambda == 0.0
    assert layer.effective_gamma == 1e-3
    assert "auto" not in repr(layer) and "clip" not in repr(layer)
    assert "gamma='auto'" in repr(PWSConv2d(3, 4, 3, gamma="auto"))


@pytest.mark.parametrize("name", LAYERS)
def test_auto_folds_exactly(name):
    layer, x = make(name, gamma="auto")
    layer.eval()
    plain = layer.to_plain()
    assert not isinstance(plain, pwsconv.PWSMixin)
    torch.testing.assert_close(plain(x), layer(x), rtol=0, atol=0)
    net = torch.nn.Sequential(copy.deepcopy(layer))
    folded = pwsconv.fold(net.eval())
    torch.testing.assert_close(folded(x), layer(x), rtol=0, atol=0)


def test_auto_is_batch_independent():
    layer, _ = make("conv2d_grouped", gamma="auto")
    x = torch.randn(5, 4, 6, 5)
    full = layer(x)
    for i in range(5):
        torch.testing.assert_close(layer(x[i:i + 1]), full[i:i + 1], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("name", LAYERS)
def test_gradcheck_auto_without_active_clipping(name):
    # gradcheck needs the true gradient: with a λ no gradient reaches, the clip op is the identity in backward too
    layer, x = make(name, F64, gamma="auto", clip=1e12)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in layer.named_parameters()}
    keys = sorted(params)
    x = x[:1].requires_grad_(True)

    def fn(x, *ps):
        return functional_call(layer, dict(zip(keys, ps)), (x,))

    assert gradcheck(fn, (x, *[params[k] for k in keys]), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_unit_clip_identity_region():
    p = torch.randn(4, 3, dtype=F64, requires_grad=True)
    assert gradcheck(lambda t: unit_clip(t, 1e12) * 2.0, (p,), eps=1e-6, atol=1e-6)
    v = torch.randn(5, dtype=F64, requires_grad=True)
    assert gradcheck(lambda t: unit_clip(t, 1e12).sin(), (v,), eps=1e-6, atol=1e-6)
    # where nothing is clipped the gradient passes bit for bit, in float64 too (no float32 round trip)
    for t in (p, v):
        g = torch.randn(t.shape, dtype=F64)
        (got,) = torch.autograd.grad(unit_clip(t, 1e12), t, g)
        assert got.dtype == F64 and torch.equal(got, g)


@pytest.mark.parametrize("name", LAYERS)
def test_auto_clips_every_parameter_unitwise(name):
    layer, x = make(name, gamma="auto", clip=0.01)
    ref, _ = make(name, gamma="auto", clip=0)          # same forward, unclipped gradients
    (layer(x).square().sum() * 1e3).backward()
    (ref(x).square().sum() * 1e3).backward()
    lam = 0.01
    # W: per filter, ‖g_o‖ ≤ λ·‖W_o‖, and the clipped gradient is the unclipped one scaled by a factor in (0, 1]
    gw, gr, w = filters(layer, layer.weight.grad), filters(ref, ref.weight.grad), filters(layer, layer.weight)
    ratio = gw.norm(dim=1) / w.detach().norm(dim=1)
    assert (ratio <= lam * (1 + 1e-4)).all()
    assert (ratio > lam * 0.999).any()      # the big gradients were actually clipped
    cos = torch.nn.functional.cosine_similarity(gw, gr, dim=1)
    torch.testing.assert_close(cos, torch.ones_like(cos), rtol=0, atol=1e-5)
    # eq. 13 survives clipping: zero mean per filter
    torch.testing.assert_close(gw.mean(1), torch.zeros(gw.shape[0]), rtol=0, atol=1e-7)
    # α and β: per entry, |g| ≤ λ·max(|p|, floor) (α: 1e-3, β: CLIP_BIAS_FLOOR), and sign kept
    for p, pr, floor in ((layer.alpha, ref.alpha, 1e-3), (layer.bias, ref.bias, CLIP_BIAS_FLOOR)):
        bound = lam * p.detach().abs().clamp_min(floor)
        assert (p.grad.abs() <= bound * (1 + 1e-6)).all()
        assert torch.equal(torch.sign(p.grad), torch.sign(pr.grad))
        torch.testing.assert_close(p.grad, pr.grad.clamp(-bound, bound))


def test_clip_is_off_for_paper_pws_and_can_be_set():
    a, x = make("conv2d_grouped")                       # paper PWS
    b, _ = make("conv2d_grouped", clip=0)
    for m in (a, b):
        m(x).square().sum().backward()
    assert torch.equal(a.weight.grad, b.weight.grad)
    c, _ = make("conv2d_grouped", gamma=1e-3, clip=0.05)
    assert c.clip_lambda == 0.05 and c.effective_gamma == 1e-3
    with pytest.raises(ValueError, match="clip"):
        PWSConv2d(3, 4, 3, clip=-1)
    with pytest.raises(ValueError, match="clip"):
        PWSConv2d(3, 4, 3, clip="big")
    with pytest.raises(ValueError, match="gamma"):
        PWSConv2d(3, 4, 3, gamma="automatic")
    assert check_clip(None) is None and check_clip(0) == 0.0


@pytest.mark.parametrize("opts", [{}, {"clip": 0.03, "clip_w": 0.005}], ids=["default", "clip_w"])
def test_auto_fused_matches_per_layer(opts):
    """The fused node clips as the per-layer path does (one λ for W, α, β, or λ_W apart from α and β)."""
    torch.manual_seed(0)
    net = build_model("tiny_cnn", method="pws", method_opts={"gamma": "auto", **opts}, in_channels=1)
    fused = copy.deepcopy(net)
    handle = pwsconv.fuse_standardization(fused)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    for m in (net, fused):
        m.train()
        (torch.nn.functional.cross_entropy(m(x), y) * 1e3).backward()
    for (k, p), (_, q) in zip(net.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=k)
    handle.remove()


def test_auto_under_autocast():
    layer, x = make("conv2d_grouped", gamma="auto")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().square().sum().backward()
    assert y.dtype == torch.bfloat16
    assert torch.isfinite(layer.weight.grad).all() and layer.weight.grad.dtype == torch.float32
    ref = layer(x)
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05)


# ------------------------------------------------------------------------------------------------ state and API
def test_auto_state_dict_round_trip_and_pickle():
    layer, x = make("conv2d_grouped", gamma="auto")
    sd = layer.state_dict()
    assert set(sd) == {"weight", "bias", "alpha", "auto_gamma_ppm"}   # γ's choice (0: not made), no clipping state
    assert sd["auto_gamma_ppm"].dtype == torch.int32 and int(sd["auto_gamma_ppm"]) == 0
    other = PWSConv2d(4, 6, 3, groups=2, gamma="auto")
    other.load_state_dict(sd)
    assert torch.equal(other(x), layer(x))
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    assert back.gamma == "auto" and back.clip_lambda == AUTO_CLIP and torch.equal(back(x), layer(x))


def test_plain_sgd_loop_trains_at_a_large_lr():
    """A user's own loop, nothing but the layer: BN-free net at LR 1.6 stays finite with auto, not without."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    out = {}
    for gamma in (1e-3, "auto"):
        torch.manual_seed(0)
        net = build_model("tiny_cnn", method="pws", method_opts={"gamma": gamma}, in_channels=1)
        opt = torch.optim.SGD(pwsconv.param_groups(net, 5e-4), lr=1.6, momentum=0.9)
        losses = []
        for _ in range(30):
            loss = torch.nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        out[gamma] = losses
    assert not torch.isfinite(torch.tensor(out[1e-3])).all()       # paper PWS: NaN/inf within 30 steps
    auto = torch.tensor(out["auto"])
    assert torch.isfinite(auto).all() and auto.max() < 5.0          # starts at ln 10 ≈ 2.3, never blows up
    assert auto[-5:].mean() < auto[0]                               # and learns


def test_a_parametrized_weight_is_linked_too():
    """weight_norm (or any parametrization) moves the weight under ``parametrizations``: param_groups still links
    the layer to the group that holds it, so auto reads the LR."""
    from torch.nn.utils.parametrizations import weight_norm

    net = torch.nn.Sequential(PWSConv2d(3, 8, 3, gamma="auto"))
    weight_norm(net[0])
    torch.optim.SGD(pwsconv.param_groups(net, 5e-4), lr=1.6, momentum=0.9)
    assert net[0].clips() == (auto_clip_w(1.6, 0.9), auto_clip(1.6, 0.9), auto_bias_floor(1.6, 0.9), True)


def test_auto_refuses_equiv_which_would_do_nothing():
    with pytest.raises(ValueError, match='equiv=True has no effect with gamma="auto"'):
        PWSConv2d(3, 8, 3, gamma="auto", equiv=True)
    assert PWSConv2d(3, 8, 3, gamma=1e-3, equiv=True).effective_gamma == pytest.approx(2e-3 / 27)


def test_groups_copied_before_the_optimizer_warn_once():
    """The optimizer got copies of param_groups' dicts (``{**g, "lr": 1.6}``): the layers cannot see its LR, keep the
    fixed bounds, and say so (one warning text, which Python's default filter shows once); the dicts themselves,
    LR set in them, give the LR's bounds and no warning."""
    import warnings

    def run(groups_of):
        torch.manual_seed(0)
        net = build_model("tiny_cnn", method="pws", method_opts={"gamma": "auto"}, in_channels=1)
        opt = torch.optim.SGD(groups_of(net), lr=0.1, momentum=0.9)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            for _ in range(10):
                opt.zero_grad()
                net(torch.randn(4, 1, 8, 8)).sum().backward()
                opt.step()
        layer = next(m for m in net.modules() if isinstance(m, PWSConv2d))
        return [str(x.message) for x in w if "never reached an optimizer" in str(x.message)], layer.clips()

    msgs, clips = run(lambda net: [{**g, "lr": 1.6} for g in pwsconv.param_groups(net, 5e-4)])
    assert msgs and len(set(msgs)) == 1 and clips == (AUTO_CLIP_W, AUTO_CLIP, CLIP_BIAS_FLOOR, False)   # shown once

    def in_place(net):
        groups = pwsconv.param_groups(net, 5e-4)
        for g in groups:
            g["lr"] = 1.6
        return groups

    msgs, clips = run(in_place)
    assert msgs == [] and clips == (auto_clip_w(1.6, 0.9), auto_clip(1.6, 0.9), auto_bias_floor(1.6, 0.9), True)


def test_convert_and_method_registry_accept_auto():
    base = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 4, 3))
    net = pwsconv.convert(base, method="pws", gamma="auto")
    layers = [m for m in net.modules() if isinstance(m, pwsconv.PWSMixin)]
    assert len(layers) == 2 and all(m.gamma == "auto" and m.clip_lambda == AUTO_CLIP for m in layers)
    conv = pwsconv.build_conv("pws", 2, 3, 4, 3, gamma="auto", clip=0.01)
    assert conv.clip_lambda == 0.01


def test_gradcheck_fused_node_with_inactive_clipping():
    from pwsconv.accel import pws_weights_fused

    torch.manual_seed(0)
    ws = [torch.randn(3, 2, 2, 2, dtype=F64, requires_grad=True), torch.randn(2, 2, 2, 2, dtype=F64, requires_grad=True)]
    als = [torch.rand(3, dtype=F64).add_(0.5).requires_grad_(True), torch.rand(2, dtype=F64).add_(0.5).requires_grad_(True)]

    def fn(w0, a0, w1, a1):
        return tuple(pws_weights_fused([w0, w1], [a0, a1], [1e-3, 1e-3], [0.5, 0.5], [1e12, 1e12]))

    assert gradcheck(fn, (ws[0], als[0], ws[1], als[1]), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_fused_node_passes_biases_through_and_clips_them_like_alpha():
    """The biases of clipped layers go through the fused node: identity forward (float64 gradcheck with inactive
    clipping), and with active clipping the same gradients as :func:`unit_clip` per layer, α's bound for β."""
    from pwsconv.accel.fused import _fused
    from pwsconv.functional import pws_weight, unit_clip

    torch.manual_seed(0)
    ws = [torch.randn(3, 2, 2, 2, dtype=F64, requires_grad=True), torch.randn(2, 2, 2, 2, dtype=F64, requires_grad=True)]
    als = [torch.rand(3, dtype=F64).add_(0.5).requires_grad_(True), torch.rand(2, dtype=F64).add_(0.5).requires_grad_(True)]
    bs = [torch.randn(3, dtype=F64, requires_grad=True), torch.randn(2, dtype=F64, requires_grad=True)]

    def fn(w0, a0, b0, w1, a1, b1, lam=(1e12, 1e12)):
        out, bias = _fused([w0, w1], [a0, a1], [1e-3, 1e-3], [0.5, 0.5], [lam, lam], [b0, b1])
        return (*out, *bias)

    args = (ws[0], als[0], bs[0], ws[1], als[1], bs[1])
    assert gradcheck(fn, args, eps=1e-6, atol=1e-6, rtol=1e-4)
    outs = fn(*args, lam=(0.01, 0.02))
    assert all(torch.equal(o, b) for o, b in zip(outs[2:], bs))
    gs = [torch.randn_like(o) * 10 for o in outs]
    g_in = [g.clone() for g in gs]
    got = torch.autograd.grad(outs, args, gs)
    assert all(torch.equal(a, b) for a, b in zip(gs, g_in))        # the incoming gradients are left as they were
    ref = [pws_weight(unit_clip(w, 0.01), 1e-3, unit_clip(a, 0.02), gain=0.5) for w, a in zip(ws, als)]
    ref += [unit_clip(b, 0.02, floor=CLIP_BIAS_FLOOR) for b in bs]
    want = torch.autograd.grad(ref, [ws[0], ws[1], als[0], als[1], bs[0], bs[1]], gs)
    order = (0, 3, 1, 4, 2, 5)   # where w0, w1, a0, a1, b0, b1 are in args (w0 a0 b0 w1 a1 b1)
    for k, g in zip(order, want):
        torch.testing.assert_close(got[k], g)


# ------------------------------------------------------------------------------------------------ λ of W apart from α, β
@pytest.mark.parametrize("name", LAYERS)
def test_clip_w_clips_filters_apart_from_alpha_and_beta(name):
    """``clip_w`` is the λ of W's filters, ``clip`` the λ of α and β: each bound holds with its own λ."""
    layer, x = make(name, gamma="auto", clip=0.05, clip_w=0.002)
    ref, _ = make(name, gamma="auto", clip=0)
    assert (layer.clip_lambda, layer.clip_w_lambda) == (0.05, 0.002)
    for m in (layer, ref):
        (m(x).square().sum() * 1e3).backward()
    gw, gr, w = filters(layer, layer.weight.grad), filters(ref, ref.weight.grad), filters(layer, layer.weight)
    ratio = gw.norm(dim=1) / w.detach().norm(dim=1)
    assert (ratio <= 0.002 * (1 + 1e-4)).all() and (ratio > 0.002 * 0.999).any()
    torch.testing.assert_close(gw.mean(1), torch.zeros(gw.shape[0]), rtol=0, atol=1e-7)   # eq. 13
    for p, pr, floor in ((layer.alpha, ref.alpha, 1e-3), (layer.bias, ref.bias, CLIP_BIAS_FLOOR)):
        bound = 0.05 * p.detach().abs().clamp_min(floor)
        torch.testing.assert_close(p.grad, pr.grad.clamp(-bound, bound))


def test_clip_w_defaults_and_validation():
    auto, paper = PWSConv2d(3, 4, 3, gamma="auto"), PWSConv2d(3, 4, 3)
    assert (auto.clip_lambda, auto.clip_w_lambda) == (AUTO_CLIP, AUTO_CLIP_W)
    assert (paper.clip_lambda, paper.clip_w_lambda) == (0.0, 0.0)
    # an explicit clip covers W too unless clip_w says otherwise (the rows of earlier releases keep their meaning)
    assert PWSConv2d(3, 4, 3, gamma="auto", clip=0.02).clip_w_lambda == 0.02
    assert PWSConv2d(3, 4, 3, gamma="auto", clip=0.02, clip_w=0).clip_w_lambda == 0.0
    assert PWSConv2d(3, 4, 3, clip_w=0.1).clip_lambda == 0.0
    assert "clip_w=0.1" in repr(PWSConv2d(3, 4, 3, clip_w=0.1))
    with pytest.raises(ValueError, match="clip"):
        PWSConv2d(3, 4, 3, clip_w=-0.1)
    assert pwsconv.build_conv("pws", 2, 3, 4, 3, gamma="auto", clip_w=0.2).clip_w_lambda == 0.2


# ------------------------------------------------------------------------------------------------ λ of W from the SGD settings
def test_auto_clip_w_formula():
    from pwsconv.functional import AUTO_CLIP_W_MIN, AUTO_STEP, AUTO_STEP_KNEE, auto_clip_w

    # a bound on the update: lr·λ/(1 − m) = AUTO_STEP, so λ ∝ (1 − m)/lr, and never below AUTO_CLIP_W_MIN
    assert AUTO_STEP == 0.08 and AUTO_CLIP_W_MIN == 0.005
    assert auto_clip_w(0.1, 0.9, knee=0) == pytest.approx(0.08)
    assert auto_clip_w(0.4, 0.9) == pytest.approx(0.02)
    assert auto_clip_w(1.6, 0.9) == auto_clip_w(3.2, 0.9) == pytest.approx(AUTO_CLIP_W_MIN)
    assert auto_clip_w(4.0, 0.0) == pytest.approx(AUTO_STEP / 4.0)
    assert auto_clip_w(0.8, 0.9, step=0.16, floor=0.0) == pytest.approx(0.02)
    # the knee (AUTO_STEP_KNEE = 4): below the effective LR 4 the bound loosens as 1/lr more; unchanged from it on
    assert AUTO_STEP_KNEE == 4.0
    assert auto_clip_w(0.1, 0.9) == pytest.approx(0.32) and auto_clip_w(0.05, 0.9) == pytest.approx(1.28)
    assert all(auto_clip_w(lr, 0.9) == auto_clip_w(lr, 0.9, knee=0) for lr in (0.4, 0.8, 1.6, 3.2))
    for bad in ((0.0, 0.9), (0.1, 1.0), (float("nan"), 0.9), ("x", 0), (-1, 0.5)):
        assert auto_clip_w(*bad) is None


def _auto_net():
    torch.manual_seed(0)
    return build_model("tiny_cnn", method="pws", method_opts={"gamma": "auto"}, in_channels=1)


def _pws_layers(net):
    return [m for m in net.modules() if isinstance(m, pwsconv.PWSMixin)]


def test_auto_reads_its_lr_from_param_groups(monkeypatch):
    """The user's plain loop: SGD(param_groups(net, wd), lr, momentum) — the layers learn α's and β's bounds from
    the LR the optimizer starts with (a schedule changes nothing after that) and λ_W from the LR now (round 10: a
    bound on each filter's step); without param_groups, or under another optimizer, the fixed AUTO_CLIP_W."""
    from pwsconv.functional import auto_clip, auto_clip_w
    from pwsconv.layers import _auto

    net = _auto_net()
    assert all(m.clip_w_lambda == AUTO_CLIP_W for m in _pws_layers(net))      # no optimizer known
    groups = pwsconv.param_groups(net, 5e-4)
    assert all(m.clip_w_lambda == AUTO_CLIP_W for m in _pws_layers(net))      # groups, but no LR in them yet
    opt = torch.optim.SGD(groups, lr=0.4, momentum=0.9)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [1], gamma=0.1)
    want = auto_clip_w(0.4, 0.9)
    assert all(m.clip_w_lambda == pytest.approx(want) for m in _pws_layers(net))
    opt.step()
    sched.step()                                                              # LR now 0.04: λ_W follows it
    assert auto_clip_w(0.04, 0.9) > 10 * want
    assert all(m.clip_w_lambda == pytest.approx(auto_clip_w(0.04, 0.9)) for m in _pws_layers(net))
    assert all(m.clip_lambda == auto_clip(0.4, 0.9) for m in _pws_layers(net))   # α and β: chosen once
    monkeypatch.setattr(_auto, "AUTO_W_FOLLOWS_LR", False)                    # round 9: λ_W from the starting LR
    assert all(m.clip_w_lambda == pytest.approx(want) for m in _pws_layers(net))
    monkeypatch.undo()
    # explicit settings win; an Adam group is not SGD: the fixed λ
    assert PWSConv2d(3, 4, 3, gamma="auto", clip_w=0.5).clip_w_lambda == 0.5
    other = _auto_net()
    torch.optim.Adam(pwsconv.param_groups(other, 5e-4), lr=1e-3)
    assert all(m.clip_w_lambda == AUTO_CLIP_W for m in _pws_layers(other))
    # copies and pickles are unlinked until their own param_groups call, and keep nothing of the optimizer
    clone = copy.deepcopy(net)
    buf = io.BytesIO()
    torch.save(net, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for m in _pws_layers(clone) + _pws_layers(loaded):
        assert m.__dict__["_opt_group"].groups == []
    # a second param_groups call that never reaches an optimizer (logging, inspection) does not unlink the first
    third = _auto_net()
    opt3 = torch.optim.SGD(pwsconv.param_groups(third, 5e-4), lr=0.4, momentum=0.9)
    pwsconv.param_groups(third, 5e-4)
    assert all(m.clip_w_lambda == pytest.approx(want) for m in _pws_layers(third)) and opt3


@pytest.mark.parametrize("linked", [True, False])
def test_auto_lr_rule_is_the_same_after_resume(linked):
    """A resumed run builds a new optimizer from param_groups and loads its state. With pwsconv.link_optimizer the
    layers follow the loaded groups' LR (λ_W of LR 0.08 after the decay) and the run continues bit-exactly; without
    it they read the dicts param_groups returned, which load_state_dict replaced (LR 0.8: the documented reason for
    the call). α's and β's bounds come from the starting LR either way."""
    from pwsconv.functional import auto_clip, auto_clip_w

    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))

    def make():
        net = _auto_net()
        opt = torch.optim.SGD(pwsconv.param_groups(net, 5e-4), lr=0.8, momentum=0.9)
        pwsconv.link_optimizer(net, opt)
        pwsconv.link_optimizer(net, opt)                 # twice: one hook
        return net, opt, torch.optim.lr_scheduler.MultiStepLR(opt, [2], gamma=0.1)

    def step(net, opt, sched):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()

    net, opt, sched = make()
    assert len(opt._optimizer_load_state_dict_post_hooks) == 1
    for _ in range(3):
        step(net, opt, sched)
    saved = copy.deepcopy((net.state_dict(), opt.state_dict(), sched.state_dict()))
    for _ in range(2):
        step(net, opt, sched)
    net2 = _auto_net()
    opt2 = torch.optim.SGD(pwsconv.param_groups(net2, 5e-4), lr=0.8, momentum=0.9)
    if linked:
        pwsconv.link_optimizer(net2, opt2)
    sched2 = torch.optim.lr_scheduler.MultiStepLR(opt2, [2], gamma=0.1)
    net2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    sched2.load_state_dict(saved[2])
    for _ in range(2):
        step(net2, opt2, sched2)
    assert all(m.clip_lambda == auto_clip(0.8, 0.9) for m in _pws_layers(net2))
    lam_w = auto_clip_w(0.08 if linked else 0.8, 0.9)
    assert all(m.clip_w_lambda == pytest.approx(lam_w) for m in _pws_layers(net2))
    if linked:
        for (k, p), (_, q) in zip(net.state_dict().items(), net2.state_dict().items()):
            assert torch.equal(p, q), k


def _train_with_decay(fuse: bool, follow: bool, monkeypatch, compiled: bool = False):
    """5 steps of the auto tiny_cnn at LR 1.6 (W's bound 0.005: it holds), the LR ×0.1 after every step."""
    from pwsconv.layers import _auto

    monkeypatch.setattr(_auto, "AUTO_W_FOLLOWS_LR", follow)
    net = _auto_net()
    if fuse:
        pwsconv.fuse_standardization(net)
    opt = torch.optim.SGD(pwsconv.param_groups(net, 5e-4), lr=1.6, momentum=0.9)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.1)
    model = torch.compile(net, backend="aot_eager") if compiled else net
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x, y = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net


def test_auto_w_bound_follows_the_lr_fused_and_per_layer(monkeypatch):
    """λ_W read at every forward: the fused node and the per-layer path clip with the same bound after each decay
    (same weights), and following changes the run (the bound held at LR 1.6 is 10× looser per decay)."""
    per_layer = _train_with_decay(False, True, monkeypatch)
    fused = _train_with_decay(True, True, monkeypatch)
    kept = _train_with_decay(False, False, monkeypatch)
    for (k, a), b, c in zip(per_layer.state_dict().items(), fused.state_dict().values(), kept.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=k)
    assert any(not torch.allclose(a, c) for a, c in zip(per_layer.state_dict().values(), kept.state_dict().values())
               if a.is_floating_point())


def test_compiled_auto_follows_the_lr_without_recompiling_at_every_change(monkeypatch):
    """Under torch.compile λ_W follows the LR too: computed in arithmetic alone, so the LR becomes a symbolic input
    after its first change and a schedule that changes it every step compiles at most twice (the first graph, then
    the dynamic one); the run is eager's, per layer and fused."""
    from torch._dynamo.utils import counters

    from pwsconv.functional import auto_clip_w
    from pwsconv.layers._auto import _traced_clip_w

    for lr in (0.016, 0.1, 0.16, 0.4, 1.6, 3.2, 1e-5):
        assert _traced_clip_w(lr, 0.9) == auto_clip_w(lr, 0.9) and _traced_clip_w(lr, 0.0) == auto_clip_w(lr, 0.0)
    assert _traced_clip_w(0.0, 0.9) is None and _traced_clip_w(float("inf"), 0.9) is None
    assert _traced_clip_w(float("nan"), 0.9) is None and _traced_clip_w(0.1, 1.0) is None
    for fuse in (False, True):
        torch._dynamo.reset()
        counters.clear()
        compiled = _train_with_decay(fuse, True, monkeypatch, compiled=True)
        assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
        eager = _train_with_decay(fuse, True, monkeypatch)
        for (k, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=k)


def test_auto_links_survive_copies_other_optimizers_and_reloads():
    """Review cases of round 10: a tensor LR is followed (schedulers fill it in place); a copy keeps nothing of the
    original's optimizer (its choice comes from its own); link_optimizer to Adam gives the fixed bounds; groups the
    optimizer got as copies are read through link_optimizer, without the warning; a reload of an optimizer the
    model has left (param_groups for a new one) does not take it back; OneCycleLR's bounds are chosen for its
    max_lr; the probe's measure_without_update leaves the layers with the optimizer they train with."""
    import warnings

    from pwsconv.diagnostics.experiment import measure_without_update
    from pwsconv.functional import AUTO_CLIP, auto_clip, auto_clip_w

    def step(net, opt, loss_scale=1.0):
        torch.manual_seed(1)
        x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
        opt.zero_grad()
        (loss_scale * torch.nn.functional.cross_entropy(net(x), y)).backward()
        opt.step()

    net = _auto_net()
    opt = torch.optim.SGD(pwsconv.param_groups(net, 5e-4), lr=torch.tensor(1.6), momentum=0.9)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [1], 0.1)
    step(net, opt)
    sched.step()
    assert all(m.clip_w_lambda == pytest.approx(auto_clip_w(0.16, 0.9)) for m in _pws_layers(net))
    # a copy: its own optimizer's choice (not the original's LR-1.6 bounds)
    cp = copy.deepcopy(net)
    pwsconv.link_optimizer(cp, torch.optim.SGD(cp.parameters(), lr=0.01, momentum=0.9))
    assert all(m.clips()[1:] == (auto_clip(0.01, 0.9), 1.0, False) for m in _pws_layers(cp))
    # Adam linked: the fixed bounds, whatever SGD chose before
    pwsconv.link_optimizer(net, torch.optim.Adam(net.parameters(), lr=1e-3))
    assert all(m.clip_w_lambda == AUTO_CLIP_W and m.clip_lambda == AUTO_CLIP for m in _pws_layers(net))
    # groups copied into the optimizer: seen through link_optimizer, no warning
    other = _auto_net()
    opt2 = torch.optim.SGD([{**g, "lr": 0.4} for g in pwsconv.param_groups(other, 5e-4)], momentum=0.9)
    pwsconv.link_optimizer(other, opt2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(4):
            step(other, opt2)
    opt2.param_groups[0]["lr"] = 0.04
    assert all(m.clip_w_lambda == pytest.approx(auto_clip_w(0.04, 0.9)) for m in _pws_layers(other))
    # fine-tuning with a new optimizer, then the old one reloaded: the layers stay with the new one
    snap = copy.deepcopy(opt2.state_dict())
    opt3 = torch.optim.SGD(pwsconv.param_groups(other, 5e-4), lr=0.02, momentum=0.9)
    opt2.load_state_dict(snap)
    assert all(m.clip_w_lambda == pytest.approx(auto_clip_w(0.02, 0.9)) for m in _pws_layers(other))
    # the probe's measurement with the training optimizer: the layers follow its groups after it
    batches = [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))) for _ in range(2)]
    measure_without_update(other, None, batches, optimizer=opt3, progress=False)
    opt3.param_groups[0]["lr"] = 0.002
    assert all(m.clip_w_lambda == pytest.approx(auto_clip_w(0.002, 0.9)) for m in _pws_layers(other))
    # OneCycleLR: initial_lr is max_lr / div_factor; the bounds chosen once are those of max_lr
    one = _auto_net()
    opt4 = torch.optim.SGD(pwsconv.param_groups(one, 5e-4), lr=1.6, momentum=0.9)
    torch.optim.lr_scheduler.OneCycleLR(opt4, max_lr=1.6, total_steps=10)
    step(one, opt4)
    assert all(m.clip_lambda == auto_clip(1.6, 0.9) for m in _pws_layers(one))


def test_link_optimizer_checks_its_arguments_and_links_without_param_groups():
    from pwsconv.functional import auto_clip_w

    net = _auto_net()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        pwsconv.link_optimizer("net", torch.optim.SGD(net.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        pwsconv.link_optimizer(net, [{"params": list(net.parameters())}])
    opt = torch.optim.SGD(net.parameters(), lr=0.4, momentum=0.9)   # no param_groups: the optimizer's own groups
    pwsconv.link_optimizer(net, opt)
    opt.param_groups[0]["lr"] = 0.04
    assert all(m.clip_w_lambda == pytest.approx(auto_clip_w(0.04, 0.9)) for m in _pws_layers(net))
    pwsconv.param_groups(net, 5e-4)      # a new param_groups call: the layers follow its groups from then on
    assert all(m.__dict__["_opt_group"].live is None for m in _pws_layers(net))


def test_auto_gamma_formula():
    from pwsconv.functional import AUTO_GAMMA_FREE, auto_gamma

    assert auto_gamma(0.1, 0.9) == AUTO_GAMMA_FREE == 0.1 and auto_gamma(0.05, 0.9) == AUTO_GAMMA_FREE
    assert auto_gamma(0.11, 0.9) == AUTO_GAMMA and auto_gamma(1.6, 0.9) == AUTO_GAMMA
    assert auto_gamma(1.0, 0.0) == AUTO_GAMMA_FREE and auto_gamma(1.01, 0.0) == AUTO_GAMMA
    assert auto_gamma(0.0, 0.9) is None and auto_gamma(0.1, 1.0) is None and auto_gamma("x", 0.9) is None
    assert auto_gamma(0.1, 0.9, free=0) == AUTO_GAMMA                     # no free range: one γ everywhere


@pytest.mark.parametrize("lr, want", [(0.1, 0.1), (0.4, AUTO_GAMMA)])
def test_auto_gamma_is_chosen_from_the_lr_once_and_kept_in_the_state_dict(lr, want):
    """γ acts in the forward: chosen from the starting LR by the first forward that finds an SGD group, saved in the
    state_dict (int, exact under dtype casts), kept when the LR changes later; folding, a fresh model that loads the
    state_dict and the eval cache all see it."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    net = _auto_net()
    layers = _pws_layers(net)
    assert all(int(m.auto_gamma_ppm) == 0 and m.effective_gamma == 2 * AUTO_GAMMA / m.fan for m in layers)
    net.eval()
    with pwsconv.cached(net):
        before = net(x)                                   # cached with γ before the choice
        opt = torch.optim.SGD(pwsconv.param_groups(net, 5e-4), lr=lr, momentum=0.9)
        after = net(x)                                    # no step taken: only γ can change the output
    assert all(int(m.auto_gamma_ppm) == round(want * 1e6) for m in layers)
    assert all(m.effective_gamma == 2 * want / m.fan for m in layers)
    with torch.no_grad():
        ref = net(x)
    assert torch.equal(after, ref) and (torch.equal(before, after) == (want == AUTO_GAMMA))
    net.train()
    loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    opt.step()
    torch.optim.SGD(pwsconv.param_groups(net, 5e-4), lr=0.4 if lr == 0.1 else 0.05, momentum=0.9)  # fine-tuning
    net.eval()
    y1 = net(x)
    assert all(m.effective_gamma == 2 * want / m.fan for m in layers)        # kept: the function does not change
    fresh = _auto_net().eval()
    fresh.load_state_dict(net.state_dict())                                  # no optimizer: γ from the state_dict
    assert torch.equal(fresh(x), y1)
    torch.testing.assert_close(pwsconv.fold(copy.deepcopy(net))(x), y1, rtol=1e-5, atol=1e-5)
    half = copy.deepcopy(net).to(torch.bfloat16)
    assert all(int(m.auto_gamma_ppm) == round(want * 1e6) for m in _pws_layers(half))
    # a layer that chose another γ loads this one (the mirror of the buffer is read again)
    other = _auto_net()
    torch.optim.SGD(pwsconv.param_groups(other, 5e-4), lr=0.4 if lr == 0.1 else 0.1, momentum=0.9)
    other.eval()
    other(x)
    other.load_state_dict(net.state_dict())
    assert torch.equal(other(x), y1)


def test_auto_gamma_of_older_checkpoints_and_plain_state_dicts():
    """A pwsconv auto checkpoint saved before γ's buffer existed loads with AUTO_GAMMA, the γ it was trained with; a
    plain torch layer's state_dict leaves the choice to the LR; gamma set to "auto" later gets the buffer."""
    layer = PWSConv2d(3, 4, 3, gamma="auto")
    old = {k: v for k, v in layer.state_dict().items() if k != "auto_gamma_ppm"}
    fresh = PWSConv2d(3, 4, 3, gamma="auto")
    fresh.load_state_dict(old)
    assert int(fresh.auto_gamma_ppm) == 1000
    torch.optim.SGD(pwsconv.param_groups(fresh, 5e-4), lr=0.1, momentum=0.9)
    assert fresh.effective_gamma == 2 * AUTO_GAMMA / fresh.fan                # chosen already: kept
    plain = torch.nn.Conv2d(3, 4, 3)
    twin = PWSConv2d(3, 4, 3, gamma="auto")
    twin.load_state_dict(plain.state_dict())
    assert int(twin.auto_gamma_ppm) == 0
    torch.optim.SGD(pwsconv.param_groups(twin, 5e-4), lr=0.1, momentum=0.9)
    assert twin.effective_gamma == pytest.approx(0.2 / twin.fan) and int(twin.auto_gamma_ppm) == 100000
    later = PWSConv2d(3, 4, 3)
    assert "auto_gamma_ppm" not in later.state_dict()                         # paper PWS: torch's keys and α
    later.gamma = "auto"
    assert later.effective_gamma == 2 * AUTO_GAMMA / later.fan and int(later.state_dict()["auto_gamma_ppm"]) == 0
    # a layer pickled before the buffer existed (no buffer, no copy of its value) keeps the γ it trained with
    pickled = PWSConv2d(3, 4, 3, gamma="auto")
    del pickled._buffers["auto_gamma_ppm"], pickled.__dict__["_auto_gamma"]
    torch.optim.SGD(pwsconv.param_groups(pickled, 5e-4), lr=0.1, momentum=0.9)
    assert pickled.effective_gamma == 2 * AUTO_GAMMA / pickled.fan and int(pickled.auto_gamma_ppm) == 1000


def _two_auto_convs():
    torch.manual_seed(0)
    return torch.nn.Sequential(PWSConv2d(3, 8, 3, gamma="auto"), torch.nn.ReLU(), PWSConv2d(8, 4, 3, gamma="auto"))


def _rel_gamma(net):
    return [round(m.effective_gamma * m.fan / 2, 12) for m in _pws_layers(net)]


def test_auto_gamma_buffer_and_the_layers_copy_stay_together():
    """Every way torch writes or replaces a buffer: the forward follows the buffer, the eval cache is never stale,
    and copies made before the first forward compute as the original."""
    x = torch.randn(2, 3, 8, 8)
    # the eval cache, no gradients: a weight cached before the choice is not served after it
    net = _two_auto_convs().eval()
    with pwsconv.cached(net), torch.no_grad():
        before = net(x)
        torch.optim.SGD(pwsconv.param_groups(net, 5e-4), lr=0.1, momentum=0.9)
        after = net(x)
    assert _rel_gamma(net) == [0.1, 0.1] and not torch.equal(before, after)
    with torch.no_grad():
        assert torch.equal(after, net(x))
    # a copy made before the first forward (fold, deepcopy, an EMA model) chooses first, like the original
    net = _two_auto_convs()
    torch.optim.SGD(pwsconv.param_groups(net, 5e-4), lr=0.1, momentum=0.9)
    folded, ema = pwsconv.fold(copy.deepcopy(net)), copy.deepcopy(net)
    torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-6)
    assert _rel_gamma(ema) == [0.1, 0.1] and torch.equal(ema(x), net(x))
    # an in-place write to the buffer (DDP's broadcast, an EMA's copy_ of buffers, load_state_dict) is followed
    other = _two_auto_convs()
    other(x)                                               # unlinked: AUTO_GAMMA, nothing chosen
    for mo, mn in zip(_pws_layers(other), _pws_layers(net)):
        mo.auto_gamma_ppm.copy_(mn.auto_gamma_ppm)
    assert _rel_gamma(other) == [0.1, 0.1] and torch.equal(other(x), net(x))
    # .to() keeps the value without a read; to_empty() + reset_parameters() starts over (nothing chosen)
    moved = copy.deepcopy(net).to(torch.float64)
    assert _rel_gamma(moved) == [0.1, 0.1] and moved[0].auto_gamma_ppm.dtype == torch.int32
    meta = torch.nn.Sequential(PWSConv2d(3, 8, 3, gamma="auto", device="meta"))
    meta.to_empty(device="cpu")
    meta[0].reset_parameters()
    assert int(meta[0].auto_gamma_ppm) == 0 and _rel_gamma(meta) == [AUTO_GAMMA]
    # trained with another optimizer: AUTO_GAMMA for good, so SGD fine-tuning later does not change the function
    adam = _two_auto_convs()
    torch.optim.Adam(pwsconv.param_groups(adam, 5e-4), lr=1e-3)
    adam(x).sum().backward()
    torch.optim.SGD(pwsconv.param_groups(adam, 5e-4), lr=0.01, momentum=0.9)
    assert _rel_gamma(adam) == [AUTO_GAMMA] * 2 and int(adam[0].auto_gamma_ppm) == 1000
    unlinked = _two_auto_convs()                           # no param_groups: locked after two optimizer steps
    for _ in range(5):
        unlinked.state_dict(), copy.deepcopy(unlinked), unlinked(x)   # bookkeeping and forwards alone lock nothing
    plain_sgd = torch.optim.SGD(unlinked.parameters(), lr=0.01, momentum=0.9)
    for _ in range(2):
        plain_sgd.zero_grad()
        unlinked(x).sum().backward()
        plain_sgd.step()
    unlinked(x)
    torch.optim.SGD(pwsconv.param_groups(unlinked, 5e-4), lr=0.01, momentum=0.9)
    assert _rel_gamma(unlinked) == [AUTO_GAMMA] * 2 and int(unlinked[0].auto_gamma_ppm) == 1000
    # before any step, a forward or two and saving the initial weights do not decide anything
    early = _two_auto_convs()
    for _ in range(8):
        early(x), early.state_dict()
    torch.optim.SGD(pwsconv.param_groups(early, 5e-4), lr=0.1, momentum=0.9)
    assert _rel_gamma(early) == [0.1, 0.1]
    # a model built in inference mode reads a loaded γ (no version counter there)
    with torch.inference_mode():
        inf = _two_auto_convs()
        inf.load_state_dict(net.state_dict())
        assert _rel_gamma(inf) == [0.1, 0.1]
    # an in-place write is also read at the next train() / eval() — what a compiled forward relies on
    ema = _two_auto_convs()
    for mo, mn in zip(_pws_layers(ema), _pws_layers(net)):
        mo.auto_gamma_ppm.copy_(mn.auto_gamma_ppm)
    ema.eval()
    assert all(m.__dict__["_auto_gamma"][2] == 100000 for m in _pws_layers(ema))
    # vmap over stacked copies (model ensembling): the layer's own γ, no read of a batched buffer
    params, buffers = torch.func.stack_module_state([copy.deepcopy(net), copy.deepcopy(net)])
    base = copy.deepcopy(net).to("meta")
    out = torch.vmap(lambda p, b: torch.func.functional_call(base, (p, b), (x,)))(params, buffers)
    torch.testing.assert_close(out[1], net(x), rtol=1e-5, atol=1e-6)
    # gamma set to a number: the buffer goes (paper PWS's keys), and a strict load into a paper PWS layer works
    layer = PWSConv2d(3, 4, 3, gamma="auto")
    layer.gamma = 1e-3
    assert set(layer.state_dict()) == {"weight", "bias", "alpha"}
    PWSConv2d(3, 4, 3).load_state_dict(layer.state_dict())
    layer.gamma = "auto"
    assert int(layer.state_dict()["auto_gamma_ppm"]) == 0


def test_auto_fused_clips_many_groups_at_once_and_a_constant_filter():
    """The fused backward clips every group with foreach ops after its loop: on a residual net (several groups of
    same-shaped layers, two of them with their own λ_W) it matches the per-layer path, and a constant (all-zero)
    filter, whose norm comes out of the saved statistics as 0, gets finite gradients."""
    torch.manual_seed(0)
    net = build_model("resnet_cifar_small", method="pws", method_opts={"gamma": "auto"}, in_channels=3, num_classes=10)
    layers = [m for m in net.modules() if isinstance(m, PWSConv2d)]
    assert len({tuple(m.weight.shape[1:]) for m in layers}) >= 3
    with torch.no_grad():
        layers[0].weight[0].zero_()
    layers[1].clip_w = layers[2].clip_w = 0.004
    fused = copy.deepcopy(net)
    handle = pwsconv.fuse_standardization(fused)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    for m in (net, fused):
        (torch.nn.functional.cross_entropy(m(x), y) * 1e3).backward()
    for (k, p), (_, q) in zip(net.named_parameters(), fused.named_parameters()):
        assert torch.isfinite(q.grad).all(), k
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=k)
    handle.remove()


def test_bias_clip_floor_is_the_same_on_both_paths(monkeypatch):
    """β's clipping bound is λ·max(|β|, CLIP_BIAS_FLOOR) on the per-layer path and in the fused node alike (read at
    every forward); with a larger floor a bias at 0 gets a larger gradient."""
    from pwsconv import functional

    torch.manual_seed(0)
    net = build_model("tiny_cnn", method="pws", method_opts={"gamma": "auto"}, in_channels=1)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    grads = {}
    for floor in (1e-3, 0.1):
        monkeypatch.setattr(functional, "CLIP_BIAS_FLOOR", floor)
        for fused in (False, True):
            m = copy.deepcopy(net)
            handle = pwsconv.fuse_standardization(m) if fused else None
            (torch.nn.functional.cross_entropy(m(x), y) * 1e3).backward()
            grads[floor, fused] = {k: p.grad for k, p in m.named_parameters()}
            if handle:
                handle.remove()
        for k, g in grads[floor, False].items():
            torch.testing.assert_close(grads[floor, True][k], g, rtol=1e-5, atol=1e-7, msg=k)
        b = dict(net.named_parameters())["features.0.conv.bias"]
        lam = net.features[0].conv.clip_lambda
        bound = b.detach().abs().clamp_min(floor) * lam
        assert (grads[floor, False]["features.0.conv.bias"].abs() <= bound * (1 + 1e-6)).all()
    assert grads[0.1, False]["features.0.conv.bias"].abs().max() > 10 * grads[1e-3, False]["features.0.conv.bias"].abs().max()


def test_auto_bias_floor_formula():
    """β's floor under SGD: ((1 − m)/lr)² clamped to [CLIP_BIAS_FLOOR, AUTO_BIAS_FLOOR] — 1 (β free) up to an
    effective LR lr/(1 − m) of 1, then falling with its inverse square to α's 1e-3 at LR 3.2 (m 0.9)."""
    from pwsconv.functional import AUTO_BIAS_FLOOR, CLIP_BIAS_FLOOR, auto_bias_floor

    assert AUTO_BIAS_FLOOR == 1.0 and CLIP_BIAS_FLOOR == 1e-3
    assert auto_bias_floor(0.05, 0.9) == auto_bias_floor(0.1, 0.9) == 1.0
    assert auto_bias_floor(0.4, 0.9) == pytest.approx(0.0625)
    assert auto_bias_floor(1.6, 0.9) == pytest.approx(0.1 ** 2 / 1.6 ** 2)
    assert auto_bias_floor(3.2, 0.9) == auto_bias_floor(10.0, 0.9) == CLIP_BIAS_FLOOR
    assert auto_bias_floor(4.0, 0.0) == pytest.approx(1 / 16)          # the effective LR: no momentum, lr 4
    assert auto_bias_floor(0.4, 0.9, top=0.01, bottom=0.0) == 0.01
    for bad in ((0.0, 0.9), (0.1, 1.0), (float("inf"), 0.9), ("x", 0)):
        assert auto_bias_floor(*bad) is None


@pytest.mark.parametrize("lr", [0.1, 1.6])
def test_auto_bias_floor_from_param_groups_on_both_paths(lr):
    """The layer learns β's floor with λ_W from its SGD group; the per-layer path and the fused node clip ∂L/∂β to
    λ·max(|β|, floor) alike, so at LR 0.1 a bias at 0 gets a gradient up to λ·1 (it moves), at LR 1.6 up to
    λ·0.0039; without an SGD group the floor is CLIP_BIAS_FLOOR."""
    from pwsconv.functional import CLIP_BIAS_FLOOR, auto_bias_floor

    net = build_model("tiny_cnn", method="pws", method_opts={"gamma": "auto"}, in_channels=1)
    assert all(m.clip_bias_floor == CLIP_BIAS_FLOOR for m in _pws_layers(net))
    torch.optim.SGD(pwsconv.param_groups(net, 5e-4), lr=lr, momentum=0.9)
    floor = auto_bias_floor(lr, 0.9)
    assert all(m.clip_bias_floor == floor for m in _pws_layers(net))
    assert PWSConv2d(3, 4, 3, gamma="auto", clip=0.02).clip_bias_floor == CLIP_BIAS_FLOOR   # explicit λ: as before
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    grads = []
    for fused in (False, True):
        m = copy.deepcopy(net)
        torch.optim.SGD(pwsconv.param_groups(m, 5e-4), lr=lr, momentum=0.9)
        handle = pwsconv.fuse_standardization(m) if fused else None
        (torch.nn.functional.cross_entropy(m(x), y) * 1e3).backward()
        grads.append({k: p.grad for k, p in m.named_parameters()})
        if handle:
            handle.remove()
    for k, g in grads[0].items():
        torch.testing.assert_close(grads[1][k], g, rtol=1e-5, atol=1e-7, msg=k)
    conv = net.features[0].conv
    g, b = grads[0]["features.0.conv.bias"], conv.bias.detach()
    if lr == 0.1:      # inside the free range: per entry
        assert not conv.clips()[3]
        bound = b.abs().clamp_min(floor) * conv.clip_lambda
        assert (g.abs() <= bound * (1 + 1e-6)).all()
        assert g.abs().max() > 0.5 * conv.clip_lambda * floor      # the scaled loss pushes β to its bound
    else:              # above it: the layer's β as one unit, ‖g‖ ≤ λ·max(‖β‖, floor·sqrt(k)), held there
        assert conv.clips()[3]
        bound = conv.clip_lambda * max(b.norm().item(), floor * b.numel() ** 0.5)
        assert g.norm().item() == pytest.approx(bound, rel=1e-5)


def test_auto_clip_of_alpha_and_beta(monkeypatch):
    """λ of α and β under SGD: AUTO_CLIP_SPIKE (1: only spikes clipped) up to the effective LR lr/(1 − m) =
    AUTO_CLIP_FREE = 1 — where paper PWS trains (round 7) — and above it AUTO_CLIP_TOP·min(1, (1 − m)/lr), never
    below AUTO_CLIP_MIN, with an optional knee: 0.005 from LR 0.2 at m 0.9 (round 6: 0.005 at every LR; round 5: a
    top of 0.01); the layer learns it with λ_W (no optimizer: AUTO_CLIP)."""
    from pwsconv import functional
    from pwsconv.functional import AUTO_CLIP, AUTO_CLIP_FREE, AUTO_CLIP_MIN, AUTO_CLIP_SPIKE, AUTO_CLIP_TOP, auto_clip

    assert AUTO_CLIP == 0.01 and AUTO_CLIP_MIN == AUTO_CLIP_TOP == 0.005
    assert AUTO_CLIP_FREE == 1.0 and AUTO_CLIP_SPIKE == 1.0
    assert [auto_clip(lr, 0.9) for lr in (0.01, 0.05, 0.1, 0.11, 0.2, 0.4, 3.2)] == [1.0] * 3 + [0.005] * 4
    assert auto_clip(1.0, 0.0) == 1.0 and auto_clip(1.01, 0.0) == 0.005      # the effective LR: no momentum
    # round 6's rule (no free range): 0.005 at every LR
    assert [auto_clip(lr, 0.9, free=0.0) for lr in (0.01, 0.05, 0.1, 0.2, 0.4, 3.2)] == [0.005] * 6
    # round 5's rule: 0.01 up to LR 0.1 (m 0.9), falling as 1/lr to the floor from LR 0.2
    assert [auto_clip(lr, 0.9, top=0.01, free=0.0) for lr in (0.05, 0.1, 0.2, 0.4, 3.2)] == \
        [0.01, 0.01, 0.005, 0.005, 0.005]
    assert auto_clip(0.15, 0.9, top=0.01) == pytest.approx(0.01 * 0.1 / 0.15)
    assert auto_clip(0.4, 0.9, top=0.01, bottom=0.01) == 0.01          # a floor at the top: λ constant
    assert auto_clip(0.2, 0.9, top=0.01, bottom=0.001) == pytest.approx(0.005)
    assert auto_clip(0.05, 0.0, top=0.01, bottom=0.0, free=0.0) == 0.01 and auto_clip(0.0, 0.9) is None
    # a knee (AUTO_CLIP_KNEE, off by default): below the effective LR `knee` λ grows as its inverse, unchanged above
    assert [auto_clip(lr, 0.9, top=0.01, knee=4.0, free=0.0) for lr in (0.05, 0.1, 0.2, 0.4, 3.2)] == \
        [0.08, 0.04, 0.01, 0.005, 0.005]
    # the free range's bound: another threshold, another λ there (AUTO_CLIP_SPIKE, read at the call)
    assert [auto_clip(lr, 0.9, free=2.0) for lr in (0.1, 0.2, 0.21)] == [1.0, 1.0, 0.005]
    monkeypatch.setattr(functional, "AUTO_CLIP_SPIKE", 0.5)
    assert auto_clip(0.1, 0.9) == 0.5
    monkeypatch.setattr(functional, "AUTO_CLIP_TOP", 0.01)            # read at the call
    for lr, want in ((0.1, 0.5), (0.2, 0.005), (0.4, 0.005)):
        net = _auto_net()
        assert all(m.clip_lambda == 0.01 for m in _pws_layers(net))       # no optimizer: AUTO_CLIP
        torch.optim.SGD(pwsconv.param_groups(net, 5e-4), lr=lr, momentum=0.9)
        assert all(m.clip_lambda == want for m in _pws_layers(net))
    assert PWSConv2d(3, 4, 3, gamma="auto", clip=0.03).clip_lambda == 0.03


def test_auto_clips_alpha_and_beta_per_vector_above_the_free_range(monkeypatch):
    """Above the free range (round 8) each layer's α and β is clipped as one unit: auto_clip_vector is False up to
    the effective LR AUTO_CLIP_FREE and True above (AUTO_CLIP_VECTOR, read at the call; None where undefined); the
    layer learns it with its λ, and an explicit clip= stays per entry (AGC)."""
    from pwsconv import functional
    from pwsconv.functional import AUTO_CLIP_VECTOR, auto_clip_vector

    assert AUTO_CLIP_VECTOR is True
    assert [auto_clip_vector(lr, 0.9) for lr in (0.01, 0.1, 0.11, 0.2, 3.2)] == [False, False, True, True, True]
    assert auto_clip_vector(1.0, 0.0) is False and auto_clip_vector(1.01, 0.0) is True
    assert auto_clip_vector(0.2, 0.9, free=2.0) is False and auto_clip_vector(0.05, 0.9, free=0.0) is True
    assert auto_clip_vector(0.0, 0.9) is None and auto_clip_vector(0.1, 1.0) is None
    for lr, want in ((0.1, False), (0.4, True)):
        net = _auto_net()
        assert not any(m.clips()[3] for m in _pws_layers(net))     # no optimizer: AUTO_CLIP per entry
        torch.optim.SGD(pwsconv.param_groups(net, 5e-4), lr=lr, momentum=0.9)
        assert all(m.clips()[3] is want for m in _pws_layers(net))
    monkeypatch.setattr(functional, "AUTO_CLIP_VECTOR", False)       # round 7: per entry at every LR
    assert auto_clip_vector(0.4, 0.9) is False
    assert PWSConv2d(3, 4, 3, gamma="auto", clip=0.03).clips()[3] is False


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_clip_vectors_keeps_direction_and_equals_the_layer_path(dtype):
    """clip_vectors (the fused node's, several vectors at once) with foreach ops gives unit_clip(vector=True)'s
    gradients bit for bit on a CPU, and concatenated (the CPU's default: segment sums) the same to float rounding:
    ‖g‖ ≤ λ·max(‖p‖, floor·sqrt(k)), a held vector scaled (its direction kept), one under its bound and a zero
    gradient unchanged, out of place, in the gradient's dtype."""
    from pwsconv.functional import clip_vectors, unit_clip

    g = torch.Generator().manual_seed(1)
    pt = torch.float32 if dtype == torch.bfloat16 else dtype          # α and β: float32 or float64
    ps = [(torch.randn(k, generator=g) * s).to(pt) for k, s in ((6, 1.0), (3, 1e-4), (5, 2.0), (4, 0.0), (7, 1.0))]
    gs = [(torch.randn(k, generator=g) * s).to(dtype) for k, s in ((6, 1.0), (3, 1.0), (5, 1e-4), (4, 1.0), (7, 0.0))]
    lams, floors = [0.01, 0.01, 0.04, 0.01, 0.01], [1e-3, 1e-3, 1.0, 1.0, 1e-3]
    before = [x.clone() for x in gs]
    out = clip_vectors(gs, ps, lams, floors, cat=False)
    for x, y in zip(clip_vectors(gs, ps, lams, floors), out):               # the CPU default: concatenated
        assert x.dtype == y.dtype
        torch.testing.assert_close(x, y, rtol=1e-6 if dtype != torch.bfloat16 else 1e-2, atol=0.0)
    assert all(torch.equal(x, y) for x, y in zip(gs, before))                # out of place
    for o, gi, p, lam, floor in zip(out, gs, ps, lams, floors):
        assert o.dtype == gi.dtype
        leaf = p.clone().requires_grad_(True)
        unit_clip(leaf, lam, floor=floor, vector=True).backward(gi.float() if dtype == torch.bfloat16 else gi)
        if dtype != torch.bfloat16:
            assert torch.equal(leaf.grad, o)
        bound = lam * max(p.norm().item(), floor * p.numel() ** 0.5)
        assert o.double().norm().item() <= bound * (1 + 1e-2) + 1e-12
        if gi.double().norm().item() <= bound:
            assert torch.equal(o, gi)                                     # under its bound (or zero): as it was
        else:
            cos = torch.nn.functional.cosine_similarity(o.double(), gi.double(), dim=0)
            assert cos.item() == pytest.approx(1.0, abs=1e-6)              # held: direction kept
    assert not torch.equal(out[0], gs[0]) and torch.equal(out[2], gs[2])
    leaf = gs[0].clone().requires_grad_(True)                                   # differentiable on both paths
    for cat in (False, True):
        clip_vectors([leaf] + gs[1:], ps, lams, floors, cat=cat)[0].sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


def test_auto_bounds_cached_by_an_older_version_are_read_again():
    """A model pickled whole by round 7 or before cached three bounds on each auto layer; the layer reads its
    optimizer group again instead of failing on the missing fourth entry."""
    net = _auto_net()
    torch.optim.SGD(pwsconv.param_groups(net, 5e-4), lr=1.6, momentum=0.9)
    layer = _pws_layers(net)[0]
    want = layer.clips()
    layer.__dict__["_auto_clips"] = want[:3]
    net(torch.randn(2, 1, 8, 8)).sum().backward()
    assert layer.clips() == want and len(want) == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clip_ops_concatenated_equal_foreach(dtype):
    """On a CPU the fused node clips the concatenated rows and vectors (fewer kernels than a foreach loop): the same
    ops on every entry, so bit-for-bit the foreach result — with several λ, γ, n and floors, a gradient that needs no
    clipping, a zero gradient and a constant filter."""
    from pwsconv.accel.foreach import clip_filters_
    from pwsconv.functional import clip_entries

    g = torch.Generator().manual_seed(0)
    cw = []
    for rows, n, lam in ((4, 9, 0.01), (3, 27, 0.32), (5, 9, 0.01), (2, 18, 0.004)):
        w = torch.randn(rows, n, generator=g, dtype=dtype)
        w[0] = 0.5 if rows == 3 else w[0]                      # a constant filter: Var 0
        gw = torch.randn(rows, n, generator=g, dtype=dtype) * torch.logspace(-6, 2, rows, dtype=dtype)[:, None]
        gw[-1] = 0.0 if rows == 5 else gw[-1]                  # a zero gradient
        gamma = 2e-3 / n
        mean = w.mean(1)
        rstd = (w.var(1, unbiased=False) + gamma).rsqrt()
        cw.append((gw, torch.linalg.vector_norm(gw, dim=1), lam, n, gamma, mean, rstd))
    results = []
    for cat in (False, True):
        c = [(t[0].clone(),) + t[1:] for t in cw]
        clip_filters_(c, cat=cat)
        results.append([t[0] for t in c])
    assert any(not torch.equal(a, t[0]) for a, t in zip(results[0], cw))   # something was clipped
    for a, b in zip(*results):
        assert torch.equal(a, b)
    ps = [torch.randn(k, generator=g, dtype=dtype) * s for k, s in ((6, 1.0), (3, 1e-4), (5, 2.0), (4, 0.0))]
    gs = [torch.randn(k, generator=g, dtype=dtype) for k in (6, 3, 5, 4)]
    lams, floors = [0.01, 0.01, 0.04, 0.01], [1e-3, 1e-3, 1.0, 1e-3]
    before = [x.clone() for x in gs]
    a, b = clip_entries(gs, ps, lams, floors, cat=False), clip_entries(gs, ps, lams, floors, cat=True)
    assert all(torch.equal(x, y) for x, y in zip(gs, before))                # out of place
    assert any(not torch.equal(x, y) for x, y in zip(a, gs))
    for x, y in zip(a, b):
        assert x.shape == y.shape and torch.equal(x, y)


@pytest.mark.parametrize("case", ["none clipped", "rows near their bound", "nan"])
def test_clip_filters_cat_skips_only_when_nothing_is_clipped(case):
    """Where no filter of any group is clipped — far below the bounds, or every row at 99 % of its bound — the
    CPU's concatenated clip leaves the gradients untouched (no ×1 per group): the foreach result bit for bit. A NaN
    gradient is not "nothing clipped": its row becomes NaN as with the foreach ops."""
    from pwsconv.accel.foreach import clip_filters_

    g = torch.Generator().manual_seed(1)
    cw = []
    for rows, n in ((4, 9), (3, 27)):
        w = torch.randn(rows, n, generator=g)
        gw = torch.randn(rows, n, generator=g) * 1e-4          # far below 0.01·‖W_o‖
        if case == "rows near their bound":
            gw *= 0.99 * 0.01 * w.norm(dim=1, keepdim=True) / gw.norm(dim=1, keepdim=True)
        if case == "nan" and rows == 3:
            gw[1, 2] = float("nan")
        cw.append((gw, torch.linalg.vector_norm(gw, dim=1), 0.01, n, 1e-3, w.mean(1),
                   (w.var(1, unbiased=False) + 1e-3).rsqrt()))
    out = []
    for cat in (False, True):
        c = [(t[0].clone(),) + t[1:] for t in cw]
        clip_filters_(c, cat=cat)
        out.append([t[0] for t in c])
    for a, b, t in zip(*out, cw):
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))
        if case == "none clipped":
            assert torch.equal(b, t[0])
    if case == "nan":
        assert out[1][1][1].isnan().all() and not out[1][1][0].isnan().any()


def test_auto_fused_mixed_dtypes_on_cpu():
    """A float32 and a float64 layer in one fused node on a CPU (two groups; the concatenated clipping needs one
    dtype, so these take the foreach ops): both layers get the per-layer path's clipped gradients, in their dtype."""
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = PWSConv2d(3, 4, 3, gamma="auto"), PWSConv2d(4, 4, 3, gamma="auto").double()

        def forward(self, x):
            return self.b(self.a(x).double()).square().sum()

    net, x = Net(), torch.randn(2, 3, 8, 8)
    fused = copy.deepcopy(net)
    handle = pwsconv.fuse_standardization(fused)
    for m in (net, fused):
        (m(x) * 1e3).backward()
    for (k, p), (_, q) in zip(net.named_parameters(), fused.named_parameters()):
        assert q.grad.dtype == p.dtype
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=k)
    handle.remove()


def _train_scaled(mode: str, lr: float, clip: dict | None = None, scaler: bool = True):
    """4 steps of the tiny_cnn (auto, or ``clip`` options) in ``mode`` ("layer", "fused", "compiled"), the loss scaled
    by a linked GradScaler (its scale halved after the first step) or, ``scaler=False``, not scaled and not linked."""
    torch.manual_seed(0)
    net = build_model("tiny_cnn", method="pws", method_opts=clip or {"gamma": "auto"}, in_channels=1)
    if mode == "fused":
        pwsconv.fuse_standardization(net)
    opt = torch.optim.SGD(pwsconv.param_groups(net, 5e-4), lr=lr, momentum=0.9)
    sc = torch.amp.GradScaler("cpu") if scaler else None
    pwsconv.link_optimizer(net, opt, scaler=sc)
    if mode == "compiled":
        torch._dynamo.reset()
    model = torch.compile(net, backend="aot_eager") if mode == "compiled" else net
    g, grads = torch.Generator().manual_seed(1), []
    for step in range(4):
        x, y = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        if sc is None:
            loss.backward()
            opt.step()
            grads.append([p.grad.clone() for p in net.parameters()])
            continue
        sc.scale(loss).backward()
        grads.append([p.grad / sc.get_scale() for p in net.parameters()])
        sc.step(opt)
        sc.update(new_scale=sc.get_scale() / 2 if step == 0 else None)
    return net, grads


@pytest.mark.parametrize("mode", ["layer", "fused", "compiled"])
def test_clipping_bounds_the_unscaled_gradients_under_a_linked_grad_scaler(mode):
    """fp16 mixed precision scales the loss (GradScaler, 65536 at first): a clip in the backward compares gradients of
    the scaled loss with the weights, so without the scale it would be 65536× tighter. With
    ``link_optimizer(..., scaler=)`` the bounds are multiplied by the scale (followed when it changes): the run is
    the unscaled run's, per layer, fused and compiled, where the clips hold (LR 1.6: W, α and β per vector; an
    explicit clip= per entry) — and unlinked, the scaled run's gradients are far smaller (the defect fixed)."""
    for lr, clip in ((1.6, None), (0.1, {"clip": 0.002, "clip_w": 0.001})):
        from torch._dynamo.utils import counters

        ref, ref_grads = _train_scaled("layer", lr, clip, scaler=False)
        counters.clear()
        net, grads = _train_scaled(mode, lr, clip)
        if mode == "compiled":   # one graph, and one more when the scale becomes GradScaler's tensor; no breaks
            assert counters["stats"]["unique_graphs"] <= 2 and not counters["graph_break"], dict(counters)
        for step, (a, b) in enumerate(zip(ref_grads, grads)):
            for k, (ga, gb) in enumerate(zip(a, b)):
                torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-7, msg=f"step {step}, parameter {k}")
        for (k, a), b in zip(ref.state_dict().items(), net.state_dict().values()):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=k)
    if mode == "layer":   # the defect: a scaled loss through unlinked layers
        torch.manual_seed(0)
        net = build_model("tiny_cnn", method="pws", method_opts={"gamma": "auto"}, in_channels=1)
        torch.optim.SGD(pwsconv.param_groups(net, 5e-4), lr=1.6, momentum=0.9)
        x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
        (65536.0 * torch.nn.functional.cross_entropy(net(x), y)).backward()
        w = net.features[0].conv.weight.grad / 65536.0
        assert w.norm() < 0.01 * ref_grads[0][0].norm()


def test_link_optimizer_scaler_checks_and_the_fp16_warning():
    """A scaler that is not a GradScaler is refused before anything is linked; None or a disabled scaler unlinks;
    the forward reads the scale without a device sync (GradScaler's update() writes its tensor at every step);
    under float16 autocast a clipping layer without a linked scaler warns (bfloat16, which needs no scaler, and a
    frozen layer do not)."""
    import warnings

    from torch.utils._python_dispatch import TorchDispatchMode

    class Syncs(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func.overloadpacket in (torch.ops.aten._local_scalar_dense, torch.ops.aten.item)
            return func(*args, **(kwargs or {}))

    net = _auto_net()
    opt = torch.optim.SGD(pwsconv.param_groups(net, 5e-4), lr=0.1, momentum=0.9)
    with pytest.raises(TypeError, match="scaler must be a torch.amp.GradScaler"):
        pwsconv.link_optimizer(net, opt, scaler=2.0)
    layer = _pws_layers(net)[0]
    assert "_opt_group" not in layer.__dict__ or layer.__dict__["_opt_group"].scaler is None
    sc = torch.amp.GradScaler("cpu")
    pwsconv.link_optimizer(net, opt, scaler=sc)
    assert layer.backward_clips()[:2] == tuple(v * 65536.0 for v in layer.clips()[:2])
    x = torch.randn(4, 1, 8, 8)
    for fuse in (False, True):
        handle = pwsconv.fuse_standardization(net) if fuse else None
        for _ in range(2):
            opt.zero_grad()
            sc.scale(net(x).sum()).backward()    # the scale is a tensor from here on, written by every update()
            sc.step(opt)
            sc.update()
            with Syncs() as syncs:
                net(x)
            assert syncs.n == 0
        assert torch.is_tensor(layer.backward_clips()[0])
        if handle is not None:
            handle.remove()
    pwsconv.link_optimizer(net, opt)
    assert layer.backward_clips() == layer.clips()
    pwsconv.link_optimizer(net, opt, scaler=torch.amp.GradScaler("cpu", enabled=False))
    assert layer.backward_clips() == layer.clips()
    for dtype, warns in ((torch.bfloat16, False), (torch.float16, True)):
        with warnings.catch_warnings(record=True) as seen, torch.autocast("cpu", dtype=dtype):
            warnings.simplefilter("always")
            net(x)
        hits = [w for w in seen if "GradScaler" in str(w.message)]
        assert bool(hits) == warns, [str(w.message) for w in seen]
    net.requires_grad_(False)
    with warnings.catch_warnings(record=True) as seen, torch.autocast("cpu", dtype=torch.float16):
        warnings.simplefilter("always")
        net(x)
    assert not [w for w in seen if "GradScaler" in str(w.message)]
