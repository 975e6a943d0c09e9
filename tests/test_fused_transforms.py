"""A fused PWS model (fuse_standardization, what the training engine turns on) under the things researchers wrap
around a model: activation checkpointing inside it, saved-tensor hooks, torch.func per-sample gradients, gradient
penalties — the same gradients as the unfused model, or (second order through the weights) a clear error."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.checkpoint import checkpoint

import pwsconv
from pwsconv.functional import unit_clip
from pwsconv.models import build_model

torch.set_num_threads(1)

OPTS = [pytest.param({}, id="pws"), pytest.param({"gamma": "auto"}, id="auto")]


class _Checkpointed(nn.Module):
    def __init__(self, inner: nn.Module, reentrant: bool) -> None:
        super().__init__()
        self.inner, self.reentrant = inner, reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.inner, x, use_reentrant=self.reentrant)


def _pair(opts: dict, wrap=None):
    """(unfused, fused) float64 copies of a small ResNet with ``wrap`` applied to its stages in both."""
    torch.manual_seed(0)
    a = build_model("resnet_cifar_small", "pws", num_classes=10, method_opts=opts).double()
    if wrap is not None:
        a.stages = wrap(a.stages)
    b = copy.deepcopy(a)
    pwsconv.fuse_standardization(b)
    return a, b


def _grads(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad for k, p in net.named_parameters() if p.grad is not None}


def _assert_same_grads(a: nn.Module, b: nn.Module) -> None:
    ga, gb = _grads(a), _grads(b)
    assert ga.keys() == gb.keys() and len(ga) == len(list(a.parameters()))
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-9, atol=1e-12, msg=k)


@pytest.mark.parametrize("opts", OPTS)
@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_inside_a_fused_model(opts, reentrant):
    a, b = _pair(opts, lambda m: _Checkpointed(m, reentrant))
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    for net in (a, b):
        net(x).square().sum().backward()
    _assert_same_grads(a, b)


@pytest.mark.parametrize("recompute", [False, True])
def test_a_fused_model_nested_in_a_checkpointed_region_of_a_fused_model(recompute):
    a, _ = _pair({}, lambda m: _Checkpointed(m, False))
    b = copy.deepcopy(a)
    pwsconv.fuse_standardization(b.stages.inner, recompute=recompute)   # a fused backbone in a fused model
    pwsconv.fuse_standardization(b, recompute=recompute)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    for net in (a, b):
        net(x).square().sum().backward()
    _assert_same_grads(a, b)


def test_layers_under_saved_tensor_hooks_compute_their_own_weight(monkeypatch):
    class _OnCPU(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            with torch.autograd.graph.save_on_cpu():
                return self.inner(x)

    a, b = _pair({}, _OnCPU)
    seen = []
    layer = next(m for m in b.stages.modules() if isinstance(m, pwsconv.layers.PWSMixin))
    stem = next(m for m in b.stem.modules() if isinstance(m, pwsconv.layers.PWSMixin))
    orig = pwsconv.layers.PWSMixin.compute_weight
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    # record which layers computed their own weight
    monkeypatch.setattr(pwsconv.layers.PWSMixin, "compute_weight", lambda self: (seen.append(self), orig(self))[1])
    b(x).square().sum().backward()
    monkeypatch.undo()
    assert layer in seen and stem not in seen   # inside the region: its own weight; outside: the fused node's
    a(x).square().sum().backward()
    _assert_same_grads(a, b)


@pytest.mark.parametrize("opts", OPTS)
def test_per_sample_gradients_with_torch_func(opts):
    a, b = _pair(opts)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    y = torch.tensor([1, 4, 7])
    params = {k: v.detach() for k, v in b.named_parameters()}

    def loss(p, xi, yi):
        return nn.functional.cross_entropy(functional_call(b, p, (xi[None],)), yi[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(3):   # against one ordinary backward per sample on the unfused model
        a.zero_grad()
        nn.functional.cross_entropy(a(x[i:i + 1]), y[i:i + 1]).backward()
        for k, p in a.named_parameters():
            torch.testing.assert_close(per_sample[k][i], p.grad, rtol=1e-9, atol=1e-12, msg=k)


def test_hessian_vector_product_with_torch_func():
    """Forward-over-reverse (what torch.func.hessian does) on a fused model: the layers compute their own weights.
    The reference is autograd on the unfused model, J·v by the double-vjp trick. (gamma="auto" has no forward-mode
    rule: a custom jvp would break torch.compile's graph; test below.)"""
    a, b = _pair({})
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    names = [k for k, _ in b.named_parameters()]
    params = {k: v.detach() for k, v in b.named_parameters()}
    torch.manual_seed(1)
    v = {k: torch.randn_like(p) for k, p in params.items()}

    def f(p):
        return functional_call(b, p, (x,)).square().sum()

    _, hv = torch.func.jvp(grad(f), (params,), (v,))
    ps = list(a.parameters())
    gs = torch.autograd.grad(a(x).square().sum(), ps, create_graph=True)
    us = [torch.zeros_like(g, requires_grad=True) for g in gs]
    jtu = torch.autograd.grad(gs, ps, grad_outputs=us, create_graph=True)
    ref = torch.autograd.grad(jtu, us, grad_outputs=[v[k] for k in names])
    for k, r in zip(names, ref):
        torch.testing.assert_close(hv[k], r, rtol=1e-7, atol=1e-10, msg=k)


def test_auto_under_forward_mode_says_so():
    _, b = _pair({"gamma": "auto"})
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    params = {k: v.detach() for k, v in b.named_parameters()}
    with pytest.raises(NotImplementedError, match="jvp"):
        torch.func.jvp(grad(lambda p: functional_call(b, p, (x,)).square().sum()), (params,), (params,))


def test_unit_clip_under_vmap_clips_each_sample_on_its_own():
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    xs = torch.randn(5, 3, 3, 3, dtype=torch.float64) * torch.tensor([1e-3, 1, 10, 100, 1e3]).view(5, 1, 1, 1)

    def f(w, x):
        return (unit_clip(w, 0.01) * x).sum()

    got = vmap(grad(f), in_dims=(None, 0))(w, xs)
    for i in range(5):
        wi = w.clone().requires_grad_(True)
        f(wi, xs[i]).backward()
        torch.testing.assert_close(got[i], wi.grad, rtol=1e-12, atol=0)
    assert not torch.allclose(got[0], got[4] * 1e-6)   # the large samples were clipped, the small one not


@pytest.mark.parametrize("opts", OPTS)
def test_input_gradient_penalty_through_a_fused_model(opts):
    a, b = _pair(opts)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    for net in (a, b):
        xx = x.clone().requires_grad_(True)
        out = net(xx).logsumexp(1).sum()
        g, = torch.autograd.grad(out, xx, create_graph=True)
        (out + g.square().sum()).backward()
    _assert_same_grads(a, b)


@pytest.mark.parametrize("opts", OPTS)
def test_second_order_through_fused_weights_names_the_way_out(opts):
    a, b = _pair(opts)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    gs = torch.autograd.grad(b(x).square().sum(), list(b.parameters()), create_graph=True)
    penalty = sum(g.square().sum() for g in gs)
    with pytest.raises(RuntimeError, match=r"fuse_standardization: second-order .*\.remove\(\)"):
        penalty.backward()
    # the first-order gradients handed out under create_graph are the ordinary ones, and may be changed in place
    ga = torch.autograd.grad(a(x).square().sum(), list(a.parameters()))
    for u, v in zip(gs, ga):
        torch.testing.assert_close(u.detach(), v, rtol=1e-9, atol=1e-12)
    gs[0].mul_(2)
    # without fusion the same second-order gradient works
    gs = torch.autograd.grad(a(x).square().sum(), list(a.parameters()), create_graph=True)
    sum(g.square().sum() for g in gs).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in a.parameters())
