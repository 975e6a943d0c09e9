"""PWS layers behave like their torch parents: call forms, memory format, gradient layout, dtypes,
scripting, loading a plain layer's state_dict."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pwsconv
from pwsconv import (PWSConv1d, PWSConv2d, PWSConv3d, PWSConvTranspose1d, PWSConvTranspose2d, PWSConvTranspose3d,
                     PWSLinear)

LAYERS = [
    (lambda: PWSConv1d(4, 6, 3), lambda: nn.Conv1d(4, 6, 3), (2, 4, 9)),
    (lambda: PWSConv2d(4, 6, 3, groups=2), lambda: nn.Conv2d(4, 6, 3, groups=2), (2, 4, 7, 7)),
    (lambda: PWSConv3d(4, 6, 2), lambda: nn.Conv3d(4, 6, 2), (2, 4, 4, 4, 4)),
    (lambda: PWSConvTranspose1d(4, 6, 3), lambda: nn.ConvTranspose1d(4, 6, 3), (2, 4, 5)),
    (lambda: PWSConvTranspose2d(4, 6, 3, groups=2), lambda: nn.ConvTranspose2d(4, 6, 3, groups=2), (2, 4, 5, 5)),
    (lambda: PWSConvTranspose3d(4, 6, 2), lambda: nn.ConvTranspose3d(4, 6, 2), (2, 4, 3, 3, 3)),
    (lambda: PWSLinear(4, 3), lambda: nn.Linear(4, 3), (5, 4)),
]


@pytest.mark.parametrize("make,plain,shape", LAYERS)
def test_input_keyword_and_plain_state_dict(make, plain, shape):
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(shape)
    torch.testing.assert_close(layer(input=x), layer(x))
    ref = plain()
    layer.load_state_dict(ref.state_dict(), strict=True)      # α defaults to 1
    assert torch.equal(layer.alpha, torch.ones_like(layer.alpha))
    assert torch.equal(layer.weight, ref.weight)


def test_transposed_output_size_keyword():
    layer = PWSConvTranspose2d(4, 6, 3, stride=2)
    x = torch.randn(1, 4, 5, 5)
    assert layer(input=x, output_size=[12, 12]).shape == nn.ConvTranspose2d(4, 6, 3, stride=2)(x, [12, 12]).shape


@pytest.mark.parametrize("make,plain,shape", LAYERS)
def test_weight_gradient_contiguous(make, plain, shape):
    layer = make()
    x = torch.randn(shape)
    (g,) = torch.autograd.grad(layer(x).square().sum(), layer.weight)
    assert g.is_contiguous() and g.shape == layer.weight.shape


@pytest.mark.parametrize("make,plain,shape", [c for c in LAYERS if len(c[2]) in (4, 5)])
def test_channels_last_follows_torch(make, plain, shape):
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    torch.manual_seed(1)
    layer, ref = make().to(memory_format=fmt), plain().to(memory_format=fmt)
    x = torch.randn(shape)
    for inp in (x, x.contiguous(memory_format=fmt)):
        want = ref(inp).is_contiguous(memory_format=fmt)
        assert layer(inp).is_contiguous(memory_format=fmt) == want
    folded = pwsconv.fold(layer.eval())
    assert folded.weight.is_contiguous(memory_format=fmt)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), layer(x), rtol=1e-4, atol=1e-5)
    contiguous = make()
    assert contiguous(x).is_contiguous() and pwsconv.fold(contiguous).weight.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_dtypes_refused(dtype):
    with pytest.raises(TypeError, match="complex dtypes are not supported"):
        PWSConv2d(3, 4, 3, dtype=dtype)
    with pytest.raises(TypeError, match="complex dtypes are not supported"):
        PWSLinear(3, 4).to(dtype)


def test_jit_script_points_to_fold():
    net = nn.Sequential(PWSConv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(TypeError, match=r"fold.*torch.export"):
        torch.jit.script(net)
    scripted = torch.jit.script(pwsconv.fold(net.eval()))
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x))
