"""The paper's gradient identities, autograd against the closed forms.

* BN (eqs. 7, 8): per channel o, with σ_o² = Var[Y_o] + ε (biased variance), n = N·H·W and ∇_Ŷ L the gradient w.r.t.
  the normalized output Ŷ = (Y − μ)/σ,
      ‖∇_{Y_o} L‖² = (‖∇_{Ŷ_o} L‖² − (⟨1, ∇_{Ŷ_o} L⟩² + ⟨∇_{Ŷ_o} L, Ŷ_o⟩²)/n) / σ_o²     (7)
      E[∇_{Y_o} L] = 0                                                                   (8)
  Eq. 7 is exact for ε → 0 (it uses ‖Ŷ_o‖² = n); with ε > 0 it holds up to a relative O(ε/Var). (torch ≥ 2.13
  refuses ε = 0 in training, so the "exact" case uses ε = 1e-12.)
* WN (eqs. 10, 11): Ŵ = g·W/‖W‖ per filter,
      E[∇_W L] = g/‖W‖ · E[∇_Ŵ L]              (10, for a filter with E[W] = 0, the paper's assumption)
      ‖∇_W L‖² = g²/‖W‖² (‖∇_Ŵ L‖² − ⟨∇_Ŵ L, Ŵ⟩²/g²)   (11, exact)
* PWS (eq. 13): E[∇_{W_o} L] = 0 for every filter — also for the other centring methods (WS, scaled WS, CenConv).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pwsconv import PWSConv2d
from pwsconv.layers import CenConv2d, SWSConv2d, WNConv2d, WSConv2d

D = torch.float64


def _bn_case(eps, seed=0):
    g = torch.Generator().manual_seed(seed)
    N, C, H, W = 3, 4, 3, 2
    Y = (torch.randn(N, C, H, W, generator=g, dtype=D) * 1.7 + 0.4).requires_grad_(True)
    bn = nn.BatchNorm2d(C, eps=eps).double()
    with torch.no_grad():
        bn.weight.copy_(torch.randn(C, generator=g, dtype=D))
        bn.bias.copy_(torch.randn(C, generator=g, dtype=D))
    R = torch.randn(N, C, H, W, generator=g, dtype=D)
    (bn(Y) * R).sum().backward()
    # ∇_Ŷ L by autograd on the normalized output as a leaf: loss = ⟨R, γ·Ŷ + β⟩
    var, mean = torch.var_mean(Y.detach(), dim=(0, 2, 3), correction=0, keepdim=True)
    sigma2 = var + eps
    Yhat = ((Y.detach() - mean) / torch.sqrt(sigma2)).requires_grad_(True)
    (R * (bn.weight.view(1, C, 1, 1) * Yhat + bn.bias.view(1, C, 1, 1))).sum().backward()
    return Y.grad, Yhat.grad, Yhat.detach(), sigma2.view(C), N * H * W


@pytest.mark.parametrize("eps,rtol", [(1e-12, 1e-9), (1e-5, 1e-4)])
def test_bn_eq7_squared_gradient_norm(eps, rtol):
    gY, gYhat, Yhat, sigma2, n = _bn_case(eps)
    for o in range(gY.shape[1]):
        a, y = gYhat[:, o], Yhat[:, o]
        lhs = gY[:, o].pow(2).sum()
        rhs = (a.pow(2).sum() - (a.sum() ** 2 + (a * y).sum() ** 2) / n) / sigma2[o]
        torch.testing.assert_close(lhs, rhs, rtol=rtol, atol=0.0)


@pytest.mark.parametrize("eps", [1e-12, 1e-5])
def test_bn_eq8_zero_mean_gradient(eps):
    gY, _, _, _, _ = _bn_case(eps, seed=1)
    scale = gY.abs().max()
    torch.testing.assert_close(gY.mean(dim=(0, 2, 3)) / scale, torch.zeros(gY.shape[1], dtype=D), atol=1e-13, rtol=0)


def test_bn_full_closed_form():
    # ∇_Y L = (∇_Ŷ L − mean(∇_Ŷ L) − Ŷ · mean(∇_Ŷ L · Ŷ)) / σ   (the form behind eqs. 7 and 8)
    gY, a, y, sigma2, _ = _bn_case(1e-3, seed=2)
    want = (a - a.mean((0, 2, 3), keepdim=True) - y * (a * y).mean((0, 2, 3), keepdim=True)) \
        / torch.sqrt(sigma2).view(1, -1, 1, 1)
    torch.testing.assert_close(gY, want, rtol=1e-10, atol=1e-12)


def _filter_grads(conv, x, R, centre=False):
    """Autograd ∇_W L of the layer and ∇_Ŵ L w.r.t. the weight it convolves with (a leaf)."""
    if centre:
        with torch.no_grad():
            conv.weight.sub_(conv.weight.mean((1, 2, 3), keepdim=True))
    (conv(x) * R).sum().backward()
    What = conv.reparam_weight().detach().requires_grad_(True)
    (F.conv2d(x, What, conv.bias, conv.stride, conv.padding) * R).sum().backward()
    return conv.weight.grad, What.grad, What.detach()


def _wn_case(seed, centre):
    g = torch.Generator().manual_seed(seed)
    conv = WNConv2d(3, 4, 3, padding=1).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=D) * 0.3 + 0.05)
        conv.g.copy_(torch.tensor([1.0, 0.5, -2.0, 1.5], dtype=D))
    x = torch.randn(2, 3, 4, 4, generator=g, dtype=D)
    R = torch.randn(2, 4, 4, 4, generator=g, dtype=D)
    gW, gWhat, What = _filter_grads(conv, x, R, centre=centre)
    return conv, gW, gWhat, What


def test_wn_eq10_mean_gradient():
    conv, gW, gWhat, _ = _wn_case(0, centre=True)  # eq. 10 assumes E[W] = 0
    norm = conv.weight.detach().flatten(1).norm(dim=1)
    want = conv.g.detach() / norm * gWhat.mean((1, 2, 3))
    torch.testing.assert_close(gW.mean((1, 2, 3)), want, rtol=1e-9, atol=1e-13)


def test_wn_eq11_squared_gradient_norm():
    conv, gW, gWhat, What = _wn_case(1, centre=False)  # exact for any W
    w, gg = conv.weight.detach(), conv.g.detach()
    norm2 = w.flatten(1).pow(2).sum(1)
    inner = (gWhat * What).flatten(1).sum(1)
    want = gg ** 2 / norm2 * (gWhat.flatten(1).pow(2).sum(1) - inner ** 2 / gg ** 2)
    torch.testing.assert_close(gW.flatten(1).pow(2).sum(1), want, rtol=1e-9, atol=1e-14)


def test_wn_full_closed_form():
    # ∇_W L = g/‖W‖ (∇_Ŵ L − ⟨∇_Ŵ L, Ŵ⟩ Ŵ / g²): eqs. 10 and 11 follow from it
    conv, gW, gWhat, What = _wn_case(2, centre=False)
    gg = conv.g.detach().view(-1, 1, 1, 1)
    norm = conv.weight.detach().flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    inner = (gWhat * What).sum((1, 2, 3), keepdim=True)
    torch.testing.assert_close(gW, gg / norm * (gWhat - inner * What / gg ** 2), rtol=1e-9, atol=1e-13)


def _pws_case(seed):
    g = torch.Generator().manual_seed(seed)
    conv = PWSConv2d(3, 4, 3, padding=1, gamma=1e-3).double()
    with torch.no_grad():
        conv.weight.add_(0.05)  # filters with a non-zero mean
        conv.alpha.copy_(torch.tensor([1.0, 0.3, -1.2, 2.0], dtype=D))
    x = torch.randn(2, 3, 4, 4, generator=g, dtype=D)
    R = torch.randn(2, 4, 4, 4, generator=g, dtype=D)
    (conv(x) * R).sum().backward()
    What = conv.standardized_weight().detach().requires_grad_(True)
    (F.conv2d(x, What, conv.bias, padding=1) * R).sum().backward()
    return conv, conv.weight.grad, What.grad


def test_pws_eq13_zero_mean_filter_gradient():
    _, gW, _ = _pws_case(0)
    scale = gW.abs().amax((1, 2, 3))
    torch.testing.assert_close(gW.mean((1, 2, 3)) / scale, torch.zeros(4, dtype=D), atol=1e-13, rtol=0)


def test_pws_full_closed_form():
    # Ŵ = c·(W − μ)/s, c = sqrt(2/n)·α, s = sqrt(Var + γ):  ∇_W L = (c/s)(a − mean(a) − Ŵ_s·mean(a·Ŵ_s)),
    # a = ∇_Ŵ L, Ŵ_s = (W − μ)/s. Its filter mean is −(c/s)·E[Ŵ_s]·mean(a·Ŵ_s) = 0: eq. 13.
    conv, gW, a = _pws_case(1)
    w = conv.weight.detach()
    n = w[0].numel()
    var, mean = torch.var_mean(w, dim=(1, 2, 3), correction=0, keepdim=True)
    s = torch.sqrt(var + conv.gamma)
    ws = (w - mean) / s
    c = math.sqrt(2.0 / n) * conv.alpha.detach().view(-1, 1, 1, 1)
    want = c / s * (a - a.mean((1, 2, 3), keepdim=True) - ws * (a * ws).mean((1, 2, 3), keepdim=True))
    torch.testing.assert_close(gW, want, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("make", [
    lambda: WSConv2d(3, 4, 3, padding=1),
    lambda: WSConv2d(3, 4, 3, padding=1, original_std=True),
    lambda: SWSConv2d(3, 4, 3, padding=1),
    lambda: SWSConv2d(3, 4, 3, padding=1, floor=True),
    lambda: CenConv2d(3, 4, 3, padding=1),
], ids=["ws", "ws-original", "sws", "sws-floor", "cenconv"])
def test_eq13_holds_for_every_centring_method(make):
    torch.manual_seed(0)
    conv = make().double()
    with torch.no_grad():
        conv.weight.add_(0.1)
    x = torch.randn(2, 3, 4, 4, dtype=D)
    (conv(x) * torch.randn(2, 4, 4, 4, dtype=D)).sum().backward()
    gW = conv.weight.grad
    torch.testing.assert_close(gW.mean((1, 2, 3)) / gW.abs().amax((1, 2, 3)), torch.zeros(4, dtype=D),
                               atol=1e-12, rtol=0)


def test_wn_does_not_centre_the_gradient():
    # the contrast the paper draws: WN keeps the shift of the average gradient when E[W] ≠ 0
    _, gW, _, _ = _wn_case(3, centre=False)
    assert gW.mean((1, 2, 3)).abs().max() > 1e-6
