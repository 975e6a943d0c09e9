"""fuse_standardization / pws_weights_fused: one autograd node for all PWS layers gives the same values and gradients
as the per-layer path, and never hands a layer a stale or foreign weight."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck

import pwsconv
from pwsconv.accel import pws_weights_fused
from pwsconv.functional import pws_weight
from pwsconv.layers.pws import PWSMixin
from pwsconv.models import build_model
from pwsconv.accel import is_cached
from pwsconv.accel.fused import _ACTIVE

torch.set_num_threads(1)


def _pair(model: str = "resnet_cifar_small", **kw):
    torch.manual_seed(0)
    a = build_model(model, "pws", num_classes=10, in_channels=3, **kw)
    b = copy.deepcopy(a)
    handle = pwsconv.fuse_standardization(b)
    return a, b, handle


def _grads(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method_opts", [{}, {"use_alpha": False}, {"use_gain": False}, {"gamma": 1e-12}])
def test_fused_model_matches_unfused(method_opts):
    torch.manual_seed(0)
    a = build_model("resnet_cifar_small", "pws", num_classes=10, in_channels=3, method_opts=method_opts)
    b = copy.deepcopy(a)
    pwsconv.fuse_standardization(b)
    x = torch.randn(4, 3, 32, 32)
    ya, yb = a(x), b(x)
    torch.testing.assert_close(yb, ya, rtol=0, atol=0)
    ya.square().sum().backward()
    yb.square().sum().backward()
    ga, gb = _grads(a), _grads(b)
    assert ga.keys() == gb.keys() and any("alpha" in k for k in ga) == ("use_alpha" not in method_opts)
    for k in ga:   # the same forward ops; backward is batch norm's closed form: equal up to float rounding
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-5, atol=1e-6 * ga[k].abs().max().item(), msg=k)


def test_fused_training_trajectory_identical():
    a, b, _ = _pair()
    opts = [torch.optim.SGD(pwsconv.param_groups(n, 5e-4), lr=0.1, momentum=0.9) for n in (a, b)]
    torch.manual_seed(1)
    data = [(torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))) for _ in range(4)]
    for x, y in data:
        for net, opt in zip((a, b), opts):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    for (k, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6, msg=k)


def test_fused_is_used_and_cleared():
    _, b, _ = _pair()
    layers = [m for m in b.modules() if isinstance(m, PWSMixin)]
    calls = []
    orig = PWSMixin.compute_weight

    def spy(self):
        calls.append(self)
        return orig(self)

    PWSMixin.compute_weight = spy
    try:
        b(torch.randn(2, 3, 32, 32)).sum().backward()
        assert calls == []                       # every layer took the pre-computed weight
        assert _ACTIVE.get() is None   # and the slots are gone after the forward
        layers[1](torch.randn(2, 16, 8, 8))      # called on its own: computes its weight itself
        assert calls == [layers[1]]
    finally:
        PWSMixin.compute_weight = orig


def test_in_place_change_inside_forward_recomputes():
    """A weight changed in place between the pre-hook and the layer (e.g. α data-init) is not served stale."""
    torch.manual_seed(0)
    conv = pwsconv.PWSConv2d(3, 4, 3, padding=1)
    ref = copy.deepcopy(conv)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, x):
            with torch.no_grad():
                self.conv.alpha.mul_(2.0)
            return self.conv(x)

    net = Net()
    pwsconv.fuse_standardization(net)
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        ref.alpha.mul_(2.0)
    torch.testing.assert_close(net(x), ref(x))


def test_data_init_alpha_with_fusion():
    torch.manual_seed(0)
    a = build_model("tiny_cnn", "pws", num_classes=10, in_channels=1, method_opts={"data_init_alpha": True})
    b = copy.deepcopy(a)
    pwsconv.fuse_standardization(b)
    x = torch.randn(8, 1, 8, 8)
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)


def test_exception_in_forward_leaves_no_slot():
    conv = pwsconv.PWSConv2d(3, 4, 3)
    pwsconv.fuse_standardization(conv)
    with pytest.raises(RuntimeError):
        conv(torch.randn(1, 5, 8, 8))            # wrong channel count: the conv raises after the pre-hook ran
    assert _ACTIVE.get() is None
    conv(torch.randn(1, 3, 8, 8)).sum().backward()
    assert conv.weight.grad is not None


def test_shared_layer_called_twice():
    conv = pwsconv.PWSConv2d(4, 4, 3, padding=1)
    ref = copy.deepcopy(conv)
    net, rnet = nn.Sequential(conv, nn.ReLU(), conv), nn.Sequential(ref, nn.ReLU(), ref)
    pwsconv.fuse_standardization(net)
    x = torch.randn(2, 4, 6, 6)
    y, r = net(x), rnet(x)
    torch.testing.assert_close(y, r, rtol=0, atol=0)
    y.sum().backward()
    r.sum().backward()
    # the fused node sums both uses' gradients before the standardization's backward: equal up to rounding
    torch.testing.assert_close(conv.weight.grad, ref.weight.grad)


def test_eval_mode_uses_the_cache_scope_and_remove():
    a, b, handle = _pair()
    a.eval()
    b.eval()
    x = torch.randn(2, 3, 32, 32)
    layer = next(m for m in b.modules() if isinstance(m, PWSMixin))
    with torch.no_grad(), pwsconv.cached(b):
        torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
        assert is_cached(layer) and _ACTIVE.get() is None
    assert pwsconv.fuse_standardization(b) is handle     # idempotent
    handle.remove()
    handle.remove()
    assert not b._forward_pre_hooks and not b._forward_hooks
    b.train()
    torch.testing.assert_close(b(x), a.train()(x), rtol=0, atol=0)
    assert pwsconv.fuse_standardization(b) is not handle


class _Mixed(nn.Module):
    """A fusable conv, then three layers the fused node cannot serve: transposed, bf16, α data-init still to run."""

    def __init__(self) -> None:
        super().__init__()
        self.a = pwsconv.PWSConv2d(3, 4, 3)
        self.t = pwsconv.PWSConvTranspose2d(4, 4, 3, groups=2)
        self.h = pwsconv.PWSConv2d(4, 4, 1).to(torch.bfloat16)
        self.d = pwsconv.PWSConv2d(4, 4, 1, data_init_alpha=True)

    def forward(self, x):
        return self.d(self.h(self.t(self.a(x)).bfloat16()).float())


def test_unfusable_layers_compute_themselves(monkeypatch):
    """Transposed layers, bf16 weights and a layer whose α data-init has not run fall back to computing their own
    weight (the fused layer does not), with the unfused model's values; after the data-init that layer is fused."""
    torch.manual_seed(0)
    net = _Mixed()
    ref = copy.deepcopy(net)
    pwsconv.fuse_standardization(net)
    x = torch.randn(2, 3, 8, 8)
    calls = []
    orig = PWSMixin.compute_weight
    monkeypatch.setattr(PWSMixin, "compute_weight", lambda self: calls.append(self) or orig(self))
    out = net(x)
    assert {id(m) for m in calls} == {id(net.t), id(net.h), id(net.d)}
    torch.testing.assert_close(out, ref(x), rtol=0, atol=0)
    assert bool(net.d.alpha_initialized)
    calls.clear()
    net(x)
    assert {id(m) for m in calls} == {id(net.t), id(net.h)}           # d is fused from now on


def test_state_dict_pickle_and_deepcopy_unchanged(tmp_path):
    """Fusing adds no state_dict key; a fused model pickles (torch.save) and deep-copies, and the copies give the
    fused model's outputs, themselves fused (the hooks travel with the model)."""
    import pickle

    a, b, _ = _pair()
    assert list(a.state_dict()) == list(b.state_dict())
    x = torch.randn(2, 3, 32, 32)
    want = b(x)
    torch.save(b, tmp_path / "m.pt")
    copies = [copy.deepcopy(b), pickle.loads(pickle.dumps(b)), torch.load(tmp_path / "m.pt", weights_only=False)]
    for c in copies:
        torch.testing.assert_close(c(x), want, rtol=0, atol=0)
        assert any(m._forward_pre_hooks for m in c.modules())


def test_a_model_without_pws_layers_warns():
    folded = pwsconv.fold(nn.Sequential(pwsconv.PWSConv2d(3, 4, 3)))
    with pytest.warns(UserWarning, match="holds no PWS layer"):
        pwsconv.fuse_standardization(folded)


def test_bad_input():
    with pytest.raises(TypeError):
        pwsconv.fuse_standardization(torch.randn(3))
    w = torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match="same length"):
        pws_weights_fused([w], [None, None], [1e-3], [1.0])
    with pytest.raises(ValueError, match="alpha has 3 values"):
        pws_weights_fused([w], [torch.ones(3)], [1e-3], [1.0])
    with pytest.raises(ValueError, match="contiguous"):
        pws_weights_fused([w.transpose(0, 1)], [None], [1e-3], [1.0])


def test_pws_weights_fused_matches_and_gradcheck():
    torch.manual_seed(0)
    shapes = [(4, 3, 3, 3), (5, 7), (3, 2, 4), (2, 6, 1, 1, 2)]
    ws = [torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in shapes]
    alphas = [torch.rand(s[0], dtype=torch.float64, requires_grad=True) + 0.5 for s in shapes[:2]] + [None, None]
    alphas = [a.detach().requires_grad_() if a is not None else None for a in alphas]
    gammas = [1e-3, 0.0, 1e-2, 1e-5]
    gains = [0.3, 1.0, 2.0, 1.0]
    outs = pws_weights_fused(ws, alphas, gammas, gains)
    for w, a, g, gain, o in zip(ws, alphas, gammas, gains, outs):
        torch.testing.assert_close(o, pws_weight(w, g, a, gain=gain))

    flat = [t for pair in zip(ws, alphas) for t in pair if t is not None]

    def fn(*ts):
        it = iter(ts)
        w_in, a_in = [], []
        for a in alphas:
            w_in.append(next(it))
            a_in.append(next(it) if a is not None else None)
        return tuple(pws_weights_fused(w_in, a_in, gammas, gains))

    assert gradcheck(fn, tuple(flat), eps=1e-6, atol=1e-6, rtol=1e-4)
    # eq. 13: the weight gradient has zero mean over every filter
    g = torch.randn_like(outs[0])
    (gw,) = torch.autograd.grad(outs[0], ws[0], g)
    torch.testing.assert_close(gw.flatten(1).mean(1), torch.zeros(4, dtype=torch.float64), atol=1e-12, rtol=0)


def test_engine_fuses_by_default(tmp_path, monkeypatch):
    """The engine's training steps go through the fused node (no layer computes its own weight in training mode)
    unless ``fuse_pws=False``; both give the same training."""
    from pwsconv.config import TrainConfig
    from pwsconv.train import train

    common = dict(model="tiny_cnn", method="pws", dataset="digits", limit=64, test_limit=32, epochs=1, batch_size=16,
                  progress=False, ckpt_every=0, num_threads=1)
    in_training = []
    orig = PWSMixin.compute_weight
    monkeypatch.setattr(PWSMixin, "compute_weight", lambda self: in_training.append(self.training) or orig(self))
    r1 = train(TrainConfig(out_dir=str(tmp_path / "a"), **common))
    assert not any(in_training)
    r2 = train(TrainConfig(out_dir=str(tmp_path / "b"), fuse_pws=False, **common))
    assert any(in_training)
    assert r1.metrics["test_acc"] == pytest.approx(r2.metrics["test_acc"], abs=1 / 32)
    assert r1.metrics["train_loss"] == pytest.approx(r2.metrics["train_loss"], rel=1e-4)


# ---------------------------------------------------------------------------------------------- edge cases (review)
def test_in_place_change_of_one_layer_does_not_break_the_others_backward():
    torch.manual_seed(0)
    net = nn.Sequential(pwsconv.PWSLinear(4, 4, use_gain=False, data_init_alpha=True), pwsconv.PWSLinear(4, 4))
    ref = copy.deepcopy(net)
    pwsconv.fuse_standardization(net)
    x = torch.randn(8, 4)
    net(x).sum().backward()
    ref(x).sum().backward()
    for (k, p), q in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=k)

    class Shrink(nn.Module):           # a forward that changes a weight in place after the pre-hook ran
        def __init__(self):
            super().__init__()
            self.a, self.b = pwsconv.PWSConv2d(2, 3, 3), pwsconv.PWSConv2d(3, 3, 1)

        def forward(self, x):
            with torch.no_grad():
                self.b.weight.mul_(0.5)
            return self.b(self.a(x))

    torch.manual_seed(0)
    s = Shrink()
    r = copy.deepcopy(s)
    pwsconv.fuse_standardization(s)
    x = torch.randn(1, 2, 5, 5)
    s(x).sum().backward()
    r(x).sum().backward()
    for (k, p), q in zip(s.named_parameters(), r.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=k)


def test_unused_layer_gets_no_gradient():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = pwsconv.PWSConv2d(2, 2, 1), pwsconv.PWSConv2d(2, 2, 1)

        def forward(self, x):
            return self.used(x)

    net = Skip()
    pwsconv.fuse_standardization(net)
    net(torch.randn(1, 2, 3, 3)).sum().backward()
    assert net.used.weight.grad is not None
    assert net.unused.weight.grad is None and net.unused.alpha.grad is None


def test_grad_enabled_inside_no_grad_root():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = pwsconv.PWSConv2d(2, 2, 3)

        def forward(self, x):
            with torch.enable_grad():
                return self.conv(x)

    net = Mixed()
    pwsconv.fuse_standardization(net)
    with torch.no_grad():
        y = net(torch.randn(1, 2, 5, 5))
    (g,) = torch.autograd.grad(y.sum(), net.conv.weight)
    assert g is not None and g.abs().sum() > 0


def test_save_load_and_teacher_copy(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(pwsconv.PWSConv2d(3, 4, 3), nn.ReLU(), pwsconv.PWSConv2d(4, 4, 3))
    pwsconv.fuse_standardization(net)
    torch.save(net, tmp_path / "m.pt")                       # hooks are picklable
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(loaded(x), net(x))
    teacher = copy.deepcopy(net)

    class Distill(nn.Module):
        def __init__(self):
            super().__init__()
            self.student = net

        def forward(self, x):
            with torch.no_grad():
                t = teacher(x)
            return self.student(x) - t

    d = Distill()
    d(x).sum().backward()
    layers = [m for m in net.modules() if isinstance(m, PWSMixin)]
    assert _ACTIVE.get() is None
    layers[0](x).sum().backward()                            # no stale slot: a fresh graph


# ---------------------------------------------------------------------------------------------- grouped layers
def test_grouped_layers_gradcheck_and_partial_use():
    """Layers with the same filter shape, γ, gain and α-ness share one native call: values and float64 gradients
    are those of the per-layer path, also when only some layers of a group are used."""
    torch.manual_seed(0)
    shapes = [(4, 3, 2), (5, 3, 2), (3, 3, 2), (2, 3, 2)]
    ws = [torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in shapes]
    alphas = [torch.rand(s[0], dtype=torch.float64).add(0.5).requires_grad_() for s in shapes[:2]] + [None, None]
    gammas, gains = [1e-3] * 4, [0.5] * 4
    outs = pws_weights_fused(ws, alphas, gammas, gains)
    for w, a, o in zip(ws, alphas, outs):
        torch.testing.assert_close(o, pws_weight(w, 1e-3, a, gain=0.5), rtol=0, atol=0)

    def fn(w0, a0, w1, a1, w2, w3):
        return tuple(pws_weights_fused([w0, w1, w2, w3], [a0, a1, None, None], gammas, gains))

    assert gradcheck(fn, (ws[0], alphas[0], ws[1], alphas[1], ws[2], ws[3]), eps=1e-6, atol=1e-6, rtol=1e-4)
    # only the second layer of the first group is used: the first gets no gradient at all
    outs = pws_weights_fused(ws, alphas, gammas, gains)
    outs[1].square().sum().backward()
    assert ws[0].grad is None and alphas[0].grad is None and ws[2].grad is None
    gw, ga = torch.autograd.grad(pws_weight(ws[1], 1e-3, alphas[1], gain=0.5).square().sum(), (ws[1], alphas[1]))
    torch.testing.assert_close(ws[1].grad, gw)
    torch.testing.assert_close(alphas[1].grad, ga)


# ---------------------------------------------------------------------------------------------- recompute
def _saved_storage_bytes(net: nn.Module, x: torch.Tensor) -> int:
    seen: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = net(x)
    y.square().sum().backward()
    return sum(seen.values())


def test_recompute_same_gradients_less_memory():
    torch.manual_seed(0)
    a = build_model("resnet_cifar_small", "pws", num_classes=10, in_channels=3)
    b = copy.deepcopy(a)
    h = pwsconv.fuse_standardization(a)
    pwsconv.fuse_standardization(b, recompute=True)
    assert not h.recompute and b._pws_fuse_handle.recompute
    x = torch.randn(2, 3, 32, 32)
    kept, dropped = _saved_storage_bytes(a, x), _saved_storage_bytes(b, x)
    weight_bytes = sum(m.weight.numel() * 4 for m in a.modules() if isinstance(m, PWSMixin))
    assert kept - dropped == weight_bytes        # exactly the α·Ŵ of every layer is no longer kept
    for (k, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p.grad, q.grad), k    # rebuilt with the same op: bit-identical gradients
    # the outer hooks above saw every activation (chained, not overridden): the rest of the graph is unchanged
    assert dropped > 0
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None


def test_recompute_retain_graph_outer_hooks_and_in_place_error():
    torch.manual_seed(0)
    net = build_model("tiny_cnn", "pws", num_classes=10, in_channels=1)
    ref = copy.deepcopy(net)
    pwsconv.fuse_standardization(net, recompute=True)
    x = torch.randn(3, 1, 8, 8)
    with torch.autograd.graph.save_on_cpu():
        y = net(x)
    y.sum().backward(retain_graph=True)
    y.sum().backward()                       # rebuilt again for the second backward
    ref(x).sum().backward()
    for (k, p), q in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, 2 * q.grad, msg=k)
    y = net(x)
    with torch.no_grad():
        next(m for m in net.modules() if isinstance(m, PWSMixin)).weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_recompute_exception_in_forward_pops_hooks_and_engine_option(tmp_path):
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = pwsconv.PWSConv2d(2, 2, 3)

        def forward(self, x):
            self.c(x)
            raise KeyError("boom")

    net = Boom()
    pwsconv.fuse_standardization(net, recompute=True)
    with pytest.raises(KeyError):
        net(torch.randn(1, 2, 5, 5))
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    assert _ACTIVE.get() is None
    with pytest.raises(TypeError, match="recompute must be a bool"):
        pwsconv.fuse_standardization(net, recompute="yes")

    from pwsconv.config import TrainConfig
    from pwsconv.train import train

    common = dict(model="tiny_cnn", method="pws", dataset="digits", limit=64, test_limit=32, epochs=1, batch_size=16,
                  progress=False, ckpt_every=0, num_threads=1)
    r1 = train(TrainConfig(out_dir=str(tmp_path / "a"), **common))
    r2 = train(TrainConfig(out_dir=str(tmp_path / "b"), pws_recompute=True, **common))
    assert r1.metrics["train_loss"] == r2.metrics["train_loss"]     # the same computation, bit for bit
    assert r1.metrics["test_acc"] == r2.metrics["test_acc"]


def test_layer_list_follows_the_module_tree(monkeypatch):
    """The fused hook walks the model on every training forward (no process-wide module-registration hook): a
    replaced layer is fused, the old one is neither standardized nor kept alive; a layer added behind torch's back
    (``_modules`` edited directly) is fused too; a deep copy standardizes its own layers."""
    import gc
    import weakref

    torch.manual_seed(0)
    net = nn.Sequential(pwsconv.PWSConv2d(3, 4, 3), nn.ReLU(), pwsconv.PWSConv2d(4, 4, 3))
    pwsconv.fuse_standardization(net)
    x = torch.randn(2, 3, 9, 9)
    net(x)
    calls = []
    orig = PWSMixin.compute_weight
    monkeypatch.setattr(PWSMixin, "compute_weight", lambda self: (calls.append(self), orig(self))[1])
    old = weakref.ref(net[2])
    net[2] = pwsconv.PWSConv2d(4, 4, 3)           # registered through torch
    ref = copy.deepcopy(net)
    handle = ref._pws_fuse_handle
    handle.remove()
    gc.collect()
    assert old() is None                          # the hook keeps no strong reference to a removed layer
    torch.testing.assert_close(net(x), ref(x), rtol=0, atol=0)
    assert calls == [ref[0], ref[2]]             # only the unfused copy computed its own weights
    calls.clear()
    extra = pwsconv.PWSConv2d(4, 4, 1)
    net._modules["3"] = extra                     # behind torch's back: still found by the walk, fused
    ref._modules["3"] = copy.deepcopy(extra)
    torch.testing.assert_close(net(x), ref(x), rtol=0, atol=0)
    assert extra not in calls and net[0] not in calls and net[2] not in calls and ref[3] in calls
    calls.clear()
    twin = copy.deepcopy(net)                     # its hooks walk and fuse its own layers, never the original's
    twin(x)
    assert calls == []
    assert _ACTIVE.get() is None


# ---------------------------------------------------------------------------------------------- review, round 2
def test_in_place_change_in_one_layer_of_a_group_spares_the_others():
    """Two layers with the same filter shape share one batch-norm backward: one of them changed in place after the
    pre-hook (it computes its own weight) must not make the other's gradient fail."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = pwsconv.PWSConv2d(3, 4, 3), pwsconv.PWSConv2d(3, 4, 3)

        def forward(self, x):
            with torch.no_grad():
                self.c1.weight.clamp_(-0.5, 0.5)
            return self.c1(x) + self.c2(x)

    torch.manual_seed(0)
    a = M()
    b = copy.deepcopy(a)
    pwsconv.fuse_standardization(b)
    x = torch.randn(2, 3, 8, 8)
    a(x).sum().backward()
    b(x).sum().backward()
    for (k, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6 * p.grad.abs().max().item(), msg=k)


def test_forwards_in_two_threads_keep_their_own_state():
    import threading

    a_in, b_done = threading.Event(), threading.Event()

    class Gate(nn.Module):
        def forward(self, x):
            if threading.current_thread().name == "A":
                a_in.set()
                b_done.wait(10)       # thread A is mid-forward while thread B runs a whole step
            return x

    torch.manual_seed(0)
    net = nn.Sequential(pwsconv.PWSConv2d(3, 4, 3), Gate(), pwsconv.PWSConv2d(4, 4, 3))
    ref = copy.deepcopy(net)
    pwsconv.fuse_standardization(net, recompute=True)
    x = torch.randn(2, 3, 8, 8)
    res = {}

    def run(name):
        try:
            if name == "B":
                a_in.wait(10)
            res[name] = net(x).sum()
            res[name + " hooks"] = torch._C._autograd._top_saved_tensors_default_hooks(False)
        except BaseException as e:  # noqa: BLE001 - reported below
            res[name] = e
        finally:
            if name == "B":
                b_done.set()

    ts = [threading.Thread(target=run, args=(n,), name=n) for n in "AB"]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert res["A hooks"] is None and res["B hooks"] is None       # each thread popped only its own hooks
    (res["A"] + res["B"]).backward()
    (2 * ref(x).sum()).backward()
    for (k, p), q in zip(ref.named_parameters(), net.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6 * p.grad.abs().max().item(), msg=k)


# ---------------------------------------------------------------------------------------------- review, round 3
def test_layers_without_their_parameters_yet_compute_themselves():
    """A fused model may hold PWS layers whose ``weight``/``alpha`` are not (yet) plain parameters: a lazy layer
    before its first input (``convert`` makes them for ``nn.LazyConv*d``; no ``alpha`` registered yet) and a layer
    whose weight is taken over by ``nn.utils.parametrize``. They compute their own weight; the others are fused."""
    from torch.nn.utils import parametrize

    from pwsconv.layers.lazy import LazyPWSConv2d

    class Neg(nn.Module):
        def forward(self, w):
            return -w

    torch.manual_seed(0)
    net = nn.Sequential(LazyPWSConv2d(4, 3, padding=1), nn.ReLU(), pwsconv.PWSConv2d(4, 4, 3, padding=1),
                        pwsconv.PWSConv2d(4, 4, 3))
    x = torch.randn(2, 3, 6, 6)
    net(x)                                              # materialized: now a PWSConv2d
    ref = copy.deepcopy(net)
    parametrize.register_parametrization(net[2], "weight", Neg())
    with torch.no_grad():
        ref[2].weight.neg_()
    pwsconv.fuse_standardization(net)
    lazy = nn.Sequential(LazyPWSConv2d(4, 3))
    pwsconv.fuse_standardization(lazy)
    assert lazy(x).shape == (2, 4, 4, 4) and type(lazy[0]) is pwsconv.PWSConv2d
    y, r = net(x), ref(x)
    torch.testing.assert_close(y, r)
    y.sum().backward()
    r.sum().backward()
    torch.testing.assert_close(net[2].parametrizations.weight.original.grad, -ref[2].weight.grad)
    torch.testing.assert_close(net[3].weight.grad, ref[3].weight.grad)
    assert _ACTIVE.get() is None


def _small(c_in: int = 3, c: int = 4) -> nn.Module:
    return nn.Sequential(pwsconv.PWSConv2d(c_in, c, 3, padding=1), nn.ReLU(), pwsconv.PWSConv2d(c, c, 3, padding=1))


def _same_values_and_grads(a: nn.Module, b: nn.Module, run_a, run_b) -> None:
    ya, yb = run_a(), run_b()
    torch.testing.assert_close(yb, ya, rtol=0, atol=0)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for (k, p), q in zip(a.named_parameters(), b.parameters()):
        assert (p.grad is None) == (q.grad is None), k
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6 * p.grad.abs().max().item(), msg=k)
    assert _ACTIVE.get() is None


@pytest.mark.parametrize("recompute", [False, True])
def test_fused_model_inside_fused_model(recompute, monkeypatch):
    """A fused submodule inside a fused model, and a fused model that is not a submodule called from the forward:
    the outer table serves the submodule's layers (nothing computed per layer), the foreign model's layers compute
    their own; same values and gradients as unfused; the table is gone afterwards."""
    class Outer(nn.Module):
        def __init__(self, foreign):
            super().__init__()
            self.a, self.b = _small(), _small(4, 3)
            self.__dict__["foreign"] = foreign      # not registered: not part of the outer model

        def forward(self, x):
            return self.foreign(self.b(self.a(x)))

    torch.manual_seed(0)
    ref = Outer(_small(3, 3))
    net = copy.deepcopy(ref)
    net.__dict__["foreign"] = copy.deepcopy(ref.foreign)
    for m in (net.a, net, net.foreign):
        pwsconv.fuse_standardization(m, recompute=recompute)
    calls = []
    orig = PWSMixin.compute_weight
    monkeypatch.setattr(PWSMixin, "compute_weight", lambda self: (calls.append(self), orig(self))[1])
    x = torch.randn(2, 3, 6, 6)
    _same_values_and_grads(nn.ModuleList([ref, ref.foreign]), nn.ModuleList([net, net.foreign]),
                           lambda: ref(x), lambda: net(x))
    mine = [m for m in calls if any(m is n for n in net.modules())]
    assert mine == [] and len(calls) >= 2 * 2        # ref's 6 layers, the foreign model's 2 layers per layer
    foreign_layers = [m for m in net.foreign.modules() if isinstance(m, PWSMixin)]
    assert all(any(m is c for c in calls) for m in foreign_layers)
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None


def test_exception_in_inner_fused_model_keeps_the_outer_table(monkeypatch):
    """An inner fused model raising inside the outer forward (caught there): the inner post-hook undoes only its
    own level; the outer layers still take the fused weights; no table is left after either forward."""
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.c = _small(), pwsconv.PWSConv2d(3, 4, 3)

        def forward(self, x):
            try:
                self.inner(x[:, :2])                # wrong channel count: raises inside the inner forward
            except RuntimeError:
                pass
            return self.c(x)

    torch.manual_seed(0)
    net = Outer()
    pwsconv.fuse_standardization(net.inner)
    pwsconv.fuse_standardization(net)
    calls = []
    orig = PWSMixin.compute_weight
    monkeypatch.setattr(PWSMixin, "compute_weight", lambda self: (calls.append(self), orig(self))[1])
    x = torch.randn(1, 3, 6, 6)
    net(x).sum().backward()
    assert calls == [] and _ACTIVE.get() is None and net.c.weight.grad is not None
    with pytest.raises(RuntimeError):
        net.inner(x[:, :2])                          # the inner model on its own: its own table, gone after
    assert _ACTIVE.get() is None


def test_two_threads_concurrently_match_sequential_runs():
    """Two threads in the same fused model at the same time (a barrier inside the forward makes them overlap):
    each output and its gradients equal those of a sequential run on the same input."""
    import threading

    barrier = threading.Barrier(2, timeout=10)

    class Meet(nn.Module):
        def forward(self, x):
            if threading.current_thread() is not threading.main_thread():
                barrier.wait()
            return x

    torch.manual_seed(0)
    net = nn.Sequential(pwsconv.PWSConv2d(3, 4, 3), Meet(), pwsconv.PWSConv2d(4, 4, 3))
    pwsconv.fuse_standardization(net)
    xs = [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)]
    seq = []
    for x in xs:
        y = net(x)
        seq.append((y.detach(), torch.autograd.grad(y.square().sum(), list(net.parameters()))))
    out: dict = {}

    def run(i):
        try:
            y = net(xs[i])
            out[i] = (y.detach(), torch.autograd.grad(y.square().sum(), list(net.parameters())))
        except BaseException as e:  # noqa: BLE001 - reported below
            out[i] = e

    ts = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for i in range(2):
        assert not isinstance(out[i], BaseException), out[i]
        torch.testing.assert_close(out[i][0], seq[i][0], rtol=0, atol=0)
        for g, r in zip(out[i][1], seq[i][1]):
            torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-7)
    assert _ACTIVE.get() is None


@pytest.mark.parametrize("recompute", [False, True])
def test_reentrant_checkpoint_inside_and_around_a_fused_model(recompute):
    import torch.utils.checkpoint as cp

    class Ck(nn.Module):
        def __init__(self):
            super().__init__()
            self.m, self.head = _small(), pwsconv.PWSConv2d(4, 2, 3)

        def forward(self, x):
            return self.head(cp.checkpoint(self.m, x, use_reentrant=True) if self.ck else self.m(x))

    torch.manual_seed(0)
    ref = Ck()
    ref.ck = False
    net = copy.deepcopy(ref)
    net.ck = True
    pwsconv.fuse_standardization(net, recompute=recompute)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    _same_values_and_grads(ref, net, lambda: ref(x), lambda: net(x))
    whole = copy.deepcopy(ref)
    pwsconv.fuse_standardization(whole, recompute=recompute)
    ref.zero_grad()
    _same_values_and_grads(ref, whole, lambda: ref(x), lambda: cp.checkpoint(whole, x, use_reentrant=True))


def test_grad_mode_changes_inside_the_forward_and_eval_with_grad():
    """no_grad / inference_mode regions inside a fused training forward get weights computed in their own mode;
    eval mode with gradients is fused (same values and gradients); there only the no_grad region caches."""
    class G(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = _small()

        def forward(self, x):
            with torch.no_grad():
                t = self.m(x)
            with torch.inference_mode():
                u = self.m(x)
            return self.m(x) * t + u.clone()

    torch.manual_seed(0)
    ref = G()
    net = copy.deepcopy(ref)
    pwsconv.fuse_standardization(net)
    x = torch.randn(2, 3, 6, 6)
    _same_values_and_grads(ref, net, lambda: ref(x), lambda: net(x))
    ref.eval()
    net.eval()
    ref.zero_grad()
    net.zero_grad()
    with pwsconv.cached(net):
        _same_values_and_grads(ref, net, lambda: ref(x), lambda: net(x))
        assert all(is_cached(m) for m in net.modules() if isinstance(m, PWSMixin))   # from the no_grad region


def test_no_pws_layer_shared_layer_and_tied_weights():
    """A fused model with no PWS layer runs as usual; a layer shared by two fused models (one inside the other) and
    two layers sharing one weight (different α) give the unfused values and gradients."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 3, 3))
    with pytest.warns(UserWarning, match="holds no PWS layer"):
        pwsconv.fuse_standardization(plain)
    plain(torch.randn(1, 3, 5, 5)).sum().backward()
    assert plain[0].weight.grad is not None and _ACTIVE.get() is None

    s = pwsconv.PWSConv2d(3, 3, 3, padding=1)
    tied = pwsconv.PWSConv2d(3, 3, 3, padding=1, gamma=0.1)
    tied.weight = s.weight
    with torch.no_grad():
        tied.alpha.uniform_(0.5, 2.0)
    ref = nn.Sequential(nn.Sequential(s, nn.ReLU()), s, tied)
    net = copy.deepcopy(ref)
    assert net[2].weight is net[0][0].weight and net[1] is net[0][0]
    pwsconv.fuse_standardization(net[0])
    pwsconv.fuse_standardization(net)
    x = torch.randn(2, 3, 6, 6)
    _same_values_and_grads(ref, net, lambda: ref(x), lambda: net(x))


@pytest.mark.parametrize("recompute", [False, True])
def test_keyboard_interrupt_in_forward_leaves_a_table_the_next_forward_drops(recompute):
    """torch skips always-call forward hooks for a KeyboardInterrupt: the table (and recompute's saved-tensor hooks)
    stay; the model's next forward drops them, is fused again, and leaves nothing behind."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = pwsconv.PWSConv2d(3, 4, 3), pwsconv.PWSConv2d(4, 4, 3)
            self.stop = False

        def forward(self, x):
            x = self.a(x)
            if self.stop:
                raise KeyboardInterrupt
            return self.b(x)

    net = Net()
    ref = copy.deepcopy(net)
    pwsconv.fuse_standardization(net, recompute=recompute)
    x = torch.randn(2, 3, 9, 9)
    net.stop = True
    with pytest.raises(KeyboardInterrupt):
        net(x)
    assert _ACTIVE.get() is not None            # what the interrupted forward left
    net.stop = False
    out = net(x)
    assert _ACTIVE.get() is None
    torch.testing.assert_close(out, ref(x), rtol=0, atol=0)
    out.sum().backward()
    ref(x).sum().backward()
    torch.testing.assert_close(net.a.weight.grad, ref.a.weight.grad)
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None   # no saved-tensor hooks left


@pytest.mark.parametrize("gamma", [1e-3, "auto"])
def test_channels_last_model_is_fused_with_the_per_layer_values(gamma, monkeypatch):
    """A channels_last model (``model.to(memory_format=torch.channels_last)``: every 4-d weight strided) is served by
    the fused node through the weights' [O, kh, kw, C] views — no layer falls back to computing its own weight —
    with the per-layer path's gradients (values and layout). With ``recompute=True``
    those layers compute their own weights (the same values)."""
    torch.manual_seed(0)
    ref = build_model("resnet_cifar_small", "pws", method_opts={"gamma": gamma}, width=0.25)
    net = copy.deepcopy(ref).to(memory_format=torch.channels_last)
    ref = ref.to(memory_format=torch.channels_last)
    handle = pwsconv.fuse_standardization(net)
    x = torch.randn(4, 3, 16, 16).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (4,))
    calls = []
    orig = PWSMixin.compute_weight
    monkeypatch.setattr(PWSMixin, "compute_weight", lambda self: calls.append(self) or orig(self))
    for m in (ref, net):
        m.train()
        (torch.nn.functional.cross_entropy(m(x), y) * 1e3).backward()
    assert calls and all(any(c is r for r in ref.modules()) for c in calls)   # only the unfused net computed its own
    for (k, p), (_, q) in zip(ref.named_parameters(), net.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5,    # float rounding of other conv layouts
                                   msg=lambda m: f"{k}: {m}")
        assert q.grad.stride() == p.grad.stride(), (k, q.grad.stride(), p.grad.stride(), q.stride())
    handle.remove()
    handle = pwsconv.fuse_standardization(net, recompute=True)
    calls.clear()
    net(x).sum().backward()
    assert calls                                  # the strided weights were left to their layers
    handle.remove()


def test_large_weights_are_not_concatenated_on_a_cpu(monkeypatch):
    """Weights above ``CPU_CAT_LIMIT`` elements form their own group (no copy into a concatenation), with the same
    values and gradients as the per-layer computation."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from pwsconv.accel import fused as fused_module

    class Cats(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Cats.n += func is torch.ops.aten.cat.default
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    ws = [torch.randn(8, 3, 3, 3, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    ws.append(torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True))
    als = [torch.rand(w.shape[0], dtype=torch.float64, requires_grad=True) for w in ws]
    for limit, cats in ((1 << 62, 2), (100, 0)):    # 216 and 108 elements: one group of three, or three groups
        monkeypatch.setattr(fused_module, "CPU_CAT_LIMIT", limit)
        Cats.n = 0
        with Cats():
            outs = pws_weights_fused(ws, als, [1e-3] * 3, [0.5] * 3)
        assert Cats.n == cats
        for o, w, a in zip(outs, ws, als):
            torch.testing.assert_close(o, pws_weight(w, 1e-3, a.view(-1, 1, 1, 1), gain=0.5))
        assert gradcheck(lambda *t: pws_weights_fused(t[:3], t[3:], [1e-3] * 3, [0.5] * 3), (*ws, *als))


class _Casts(__import__("torch.utils._python_dispatch", fromlist=["TorchDispatchMode"]).TorchDispatchMode):
    """Counts the dtype casts (``aten._to_copy``) dispatched while active."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func is torch.ops.aten._to_copy.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("gamma", [1e-3, "auto", "auto at LR 1.6"])
def test_autocast_weights_and_biases_are_cast_by_the_node(gamma):
    """Under autocast the fused node hands out α·Ŵ and β in autocast's dtype — one cast per group and one for all
    biases, in forward and in backward, instead of autocast's one per layer and tensor — with the values of the
    per-layer path under autocast (a cast is elementwise) and its gradients up to float rounding (auto at LR 1.6:
    α and β clipped per vector)."""
    torch.manual_seed(0)
    ref = build_model("resnet_cifar_small", "pws", method_opts={"gamma": "auto" if isinstance(gamma, str) else gamma}, width=0.25)
    net = copy.deepcopy(ref)
    if gamma == "auto at LR 1.6":
        for m in (ref, net):
            torch.optim.SGD(pwsconv.param_groups(m, 5e-4), lr=1.6, momentum=0.9)
        assert all(m.clips()[3] for m in net.modules() if isinstance(m, PWSMixin))
    handle = pwsconv.fuse_standardization(net)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    casts, outs = {}, {}
    for name, m in (("ref", ref), ("fused", net)):
        m.train()
        rec = _Casts()
        with rec:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = m(x)
            outs[name] = out
            (torch.nn.functional.cross_entropy(out.float(), y) * 1e3).backward()
        casts[name] = rec.n
    assert torch.equal(outs["fused"], outs["ref"])
    n_layers = sum(isinstance(m, PWSMixin) for m in ref.modules())
    # per layer: W and β forward and back (4 casts); the node: one per group and one for all biases, each way
    assert casts["ref"] - casts["fused"] >= 2 * n_layers
    for (k, p), (_, q) in zip(ref.named_parameters(), net.named_parameters()):
        assert q.grad.dtype == p.grad.dtype == torch.float32
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5, msg=lambda m: f"{k}: {m}")
    handle.remove()


def test_autocast_turned_off_inside_the_model_makes_those_layers_compute_their_own():
    """A layer that runs where autocast is off (or set to another dtype) does not get the node's bf16 weight: it
    computes its own in float32 (the values of the unfused model) and the rest of the model still trains."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = pwsconv.PWSConv2d(3, 4, 3, padding=1)
            self.b = pwsconv.PWSConv2d(4, 4, 3, padding=1)
            self.c = pwsconv.PWSConv2d(4, 4, 3, padding=1)

        def forward(self, x):
            x = self.a(x)
            with torch.autocast("cpu", dtype=torch.float16):
                x = self.c(x)
            with torch.autocast("cpu", enabled=False):
                return self.b(x.float())

    torch.manual_seed(0)
    ref = Net()
    net = copy.deepcopy(ref)
    handle = pwsconv.fuse_standardization(net)
    x = torch.randn(2, 3, 8, 8)
    for m in (ref, net):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
        assert out.dtype == torch.float32
        out.square().sum().backward()
    assert torch.equal(net(x), ref(x))
    for (k, p), (_, q) in zip(ref.named_parameters(), net.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5, msg=lambda m: f"{k}: {m}")
    handle.remove()
