"""Converted timm / torchvision models, fused as the training engine fuses them, under the tools their users turn on:
timm's gradient checkpointing and torch.func per-sample gradients (DP-SGD style) — the unfused model's gradients."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
from torch import nn
from torch.func import functional_call, grad, vmap

import pwsconv


@pytest.mark.parametrize("opts", [{}, {"gamma": "auto"}], ids=["pws", "auto"])
def test_timm_grad_checkpointing_on_a_fused_model(opts):
    torch.manual_seed(0)
    net = pwsconv.convert(timm.create_model("resnet10t", pretrained=False, num_classes=10), "pws", strict=True,
                          **opts).double()
    net.set_grad_checkpointing(True)
    fused = copy.deepcopy(net)
    pwsconv.fuse_standardization(fused)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for m in (net, fused):
        m.train()
        m(x).square().sum().backward()
    ga = {k: p.grad for k, p in net.named_parameters()}
    for k, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, ga[k], rtol=1e-9, atol=1e-12, msg=k)


def test_per_sample_gradients_of_a_converted_torchvision_resnet():
    torch.manual_seed(0)
    net = pwsconv.convert(torchvision.models.resnet18(num_classes=10), "pws", strict=True)
    ref = copy.deepcopy(net)
    pwsconv.fuse_standardization(net)
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 3, 9])
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss(p, xi, yi):
        return nn.functional.cross_entropy(functional_call(net, p, (xi[None],)), yi[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(3):
        ref.zero_grad()
        nn.functional.cross_entropy(ref(x[i:i + 1]), y[i:i + 1]).backward()
        for k, p in ref.named_parameters():
            scale = p.grad.abs().max().item() + 1e-12
            torch.testing.assert_close(per_sample[k][i], p.grad, rtol=1e-4, atol=1e-5 * scale, msg=k)
