"""PyTorch's own ModuleInfo samples (torch.testing._internal.common_modules.module_db) for every conv and linear class,
run through the PWS twins: each sample's constructor arguments build the PWS layer, and its output (all call forms:
positional, ``input=``, ``output_size=``) and input gradient equal those of the torch layer holding α·Ŵ; the weight
gradient is contiguous; the memory format follows torch's; train and eval agree (PWS is mode-independent); copies
and pickles compute the same. Complex dtypes are refused with a clear TypeError; a sample whose filter has a single
weight is refused with ValueError (PWS cannot standardize one weight)."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn
from torch.testing._internal.common_modules import module_db

import pwsconv
from pwsconv.layers.lazy import LazyPWSConv1d, LazyPWSConv2d, LazyPWSConv3d

TWINS = {
    nn.Conv1d: pwsconv.PWSConv1d, nn.Conv2d: pwsconv.PWSConv2d, nn.Conv3d: pwsconv.PWSConv3d,
    nn.ConvTranspose1d: pwsconv.PWSConvTranspose1d, nn.ConvTranspose2d: pwsconv.PWSConvTranspose2d,
    nn.ConvTranspose3d: pwsconv.PWSConvTranspose3d, nn.Linear: pwsconv.PWSLinear,
    nn.LazyConv1d: LazyPWSConv1d, nn.LazyConv2d: LazyPWSConv2d, nn.LazyConv3d: LazyPWSConv3d,
}
INFOS = [mi for mi in module_db if mi.module_cls in TWINS]
CASES = []
for mi in INFOS:
    for dtype in sorted(set(mi.dtypes) | {torch.complex64}, key=str):
        n = len(mi.module_inputs_func(mi, device="cpu", dtype=dtype if not dtype.is_complex else torch.float32,
                                      requires_grad=True, training=True))
        CASES += [(mi, dtype, i) for i in range(n)]


def _sample(mi, dtype, i):
    return mi.module_inputs_func(mi, device="cpu", dtype=dtype, requires_grad=True, training=True)[i]


def _fwd(m, fi):
    return m(*fi.args, **fi.kwargs)


def _clone_inputs(fi):
    def c(v):
        return v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v
    return [c(a) for a in fi.args], {k: c(v) for k, v in fi.kwargs.items()}


class _FI:
    def __init__(self, args, kwargs):
        self.args, self.kwargs = args, kwargs


def _as_kwargs(fi):
    """The same call with the input as a keyword (``input=``), as torch's layers accept it."""
    if not fi.args:
        return None
    return _FI(list(fi.args[1:]), {"input": fi.args[0], **fi.kwargs})


def test_every_conv_and_linear_class_is_covered():
    covered = {mi.module_cls for mi in INFOS}
    assert {nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
            nn.Linear} <= covered
    assert len(CASES) >= 60


@pytest.mark.parametrize("mi,dtype,i", CASES, ids=[f"{mi.name}-{str(d).split('.')[-1]}-{i}" for mi, d, i in CASES])
def test_module_info_sample(mi, dtype, i):
    twin = TWINS[mi.module_cls]
    if dtype.is_complex:
        s = _sample(mi, torch.float32, i)
        with pytest.raises(TypeError, match="complex dtypes are not supported"):
            m = twin(*s.constructor_input.args, **s.constructor_input.kwargs, dtype=dtype)
            _fwd(m, s.forward_input)   # a lazy layer refuses when it materializes
        return
    s = _sample(mi, dtype, i)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch's lazy-module notice
        try:
            pws = twin(*s.constructor_input.args, **s.constructor_input.kwargs, device="cpu", dtype=dtype)
            args, kwargs = _clone_inputs(s.forward_input)
            out = pws(*args, **kwargs)
        except ValueError as e:
            assert "element" in str(e)   # a filter of a single weight: PWS refuses it by design
            pytest.skip(f"single-weight filter refused: {e}")
        ref = mi.module_cls(*s.constructor_input.args, **s.constructor_input.kwargs, device="cpu", dtype=dtype)
        r_args, r_kwargs = _clone_inputs(s.forward_input)
        _ = ref(*r_args, **r_kwargs)          # materializes a lazy reference
    assert type(pws).__module__.startswith("pwsconv.")
    with torch.no_grad():
        ref.weight.copy_(pws.standardized_weight())
        if ref.bias is not None:
            ref.bias.copy_(pws.bias)
    r_args, r_kwargs = _clone_inputs(s.forward_input)
    expected = ref(*r_args, **r_kwargs)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, expected, **tol)

    # input= call form
    kw = _as_kwargs(s.forward_input)
    if kw is not None:
        a, k = _clone_inputs(kw)
        torch.testing.assert_close(pws(*a, **k), expected, **tol)

    # gradients: w.r.t. the input equal torch's; the weight gradient is contiguous
    if out.requires_grad:
        g = torch.randn_like(out)
        params = [pws.weight] + [t for t in args if isinstance(t, torch.Tensor) and t.requires_grad]
        grads = torch.autograd.grad(out, params, g, allow_unused=True)
        assert grads[0] is not None and grads[0].is_contiguous()
        r_in = [t for t in r_args if isinstance(t, torch.Tensor) and t.requires_grad]
        if r_in:
            r_grads = torch.autograd.grad(expected, r_in, g, allow_unused=True)
            for a, b in zip(grads[1:], r_grads):
                if a is not None and b is not None:
                    torch.testing.assert_close(a, b, **tol)

    # mode independence: eval computes what train computes
    a, k = _clone_inputs(s.forward_input)
    with torch.no_grad():
        pws.eval()
        torch.testing.assert_close(pws(*a, **k), out.detach(), **tol)
        # copies and pickles compute the same
        buf = io.BytesIO()
        torch.save(pws, buf)
        buf.seek(0)
        for other in (copy.deepcopy(pws), torch.load(buf, weights_only=False)):
            torch.testing.assert_close(other(*a, **k), out.detach(), **tol)
    pws.train()

    # memory format: channels_last module and/or input → the output layout torch's layer gives
    x = s.forward_input.args[0] if s.forward_input.args else None
    if isinstance(x, torch.Tensor) and x.dim() in (4, 5) and pws.weight.dim() == x.dim():
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        for mod_cl in (False, True):
            for in_cl in (False, True):
                p2, r2 = copy.deepcopy(pws), copy.deepcopy(ref)
                if mod_cl:
                    p2.to(memory_format=fmt)
                    r2.to(memory_format=fmt)
                xi = x.detach().contiguous(memory_format=fmt) if in_cl else x.detach().contiguous()
                rest = [t.detach() if isinstance(t, torch.Tensor) else t for t in s.forward_input.args[1:]]
                with torch.no_grad():
                    po, ro = p2(xi, *rest, **s.forward_input.kwargs), r2(xi, *rest, **s.forward_input.kwargs)
                assert po.is_contiguous(memory_format=fmt) == ro.is_contiguous(memory_format=fmt), (mod_cl, in_cl)
                assert po.is_contiguous() == ro.is_contiguous(), (mod_cl, in_cl)
                torch.testing.assert_close(po, ro, **tol)
