"""``convert(copy_weights=True)``: carry a pretrained conv(+BN) unit over to the layer that replaces it, and with
``example_inputs`` calibrate each copied PWS layer's α and β on data.

A PWS layer keeps the raw weight and fits α per filter (α·Ŵ equals the BN-scaled weight up to its per-filter mean,
which standardization removes); any other layer gets the effective weight itself (exact for plain convs). A BN
registered right after its conv is folded in with its running statistics when the method drops BN.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from ._bnlike import ConvInfo, bn_info, bn_stats, conv_info
from .accel import clear_cache
from .layers.same import Conv2dSame

__all__ = ["WeightCopy", "conv_bn_pairs", "effective_weight", "fold_bn", "init_from"]


class WeightCopy:
    """What one ``convert(copy_weights=True)`` call carries over: the conv → BN pairs of the original model, the BN
    layers folded into their conv (``folded``), and with ``calibrate`` a reference layer per copied PWS layer
    computing the original conv(+BN) (``refs``), which :meth:`calibrate` fits α and β to."""

    def __init__(self, model: nn.Module, *, fold_norms: bool, calibrate: bool) -> None:
        self.pairs = conv_bn_pairs(model)
        self.fold_norms = fold_norms     # the method drops BN: fold each BN into the conv before it
        self.calibrate_layers = calibrate
        self.folded: set[int] = set()
        self.refs: dict[int, nn.Module] = {}

    def folds(self, mod: nn.Module) -> bool:
        """Whether ``mod``'s BN will be folded into its replacement."""
        return self.fold_norms and id(mod) in self.pairs

    def carry(self, mod: nn.Module, new: nn.Module, ci: ConvInfo | None, *, linear: bool = False) -> None:
        """Give ``new`` the original layer's function (with the BN after it folded in where the method drops BN)."""
        if isinstance(mod, LazyModuleMixin) and mod.has_uninitialized_params():
            return
        raw = mod.weight.detach()
        eff = effective_weight(mod, ci) if ci is not None else raw.clone()
        b = None if mod.bias is None else mod.bias.detach().clone()
        pair = self.pairs.get(id(mod))
        takes_fold = hasattr(new, "alpha") or type(new).__module__.startswith("torch.") or type(new) is Conv2dSame
        if pair is not None and self.fold_norms and takes_fold:
            fused = fold_bn(eff, b, pair[1], transposed=bool(ci is not None and ci.transposed), linear=linear)
            if fused is not None:
                eff, b = fused
                self.folded.add(id(pair[1]))
        with torch.no_grad():
            init_from(new, raw.to(new.weight.dtype), eff.to(new.weight.dtype),
                      None if b is None else b.to(new.weight.dtype))
            if self.calibrate_layers and hasattr(new, "alpha") and hasattr(new, "to_plain"):
                ref = new.to_plain()     # the same geometry and padding, holding the original (BN-folded) weights
                ref.weight.copy_(eff.to(ref.weight.dtype))
                if ref.bias is not None:
                    ref.bias.copy_(0.0 if b is None else b.to(ref.bias.dtype))
                elif b is not None:
                    ref.register_forward_hook(_add_bias(b))
                self.refs[id(new)] = ref

    def calibrate(self, model: nn.Module, args: tuple) -> None:
        """Fit α and β of every copied PWS layer on ``args``, in forward order: per output channel, the least-squares
        line from the layer's standardized output z_o (α = 1, β = 0) to the output of the layer it replaces (conv with
        the BN after it folded in), y_o ≈ α_o·z_o + β_o, on the inputs the layer actually receives (which already come
        from calibrated layers)."""
        if not args or not all(isinstance(a, Tensor) for a in args):
            raise TypeError("convert: example_inputs must be a tensor or a tuple of tensors")
        refs = dict(self.refs)
        layers = {id(mod): mod for mod in model.modules() if id(mod) in refs}

        def pre(mod: nn.Module, inp: tuple) -> None:
            ref = refs.pop(id(mod), None)
            if ref is None:
                return
            y = ref(*inp)
            alpha, bias = mod.alpha, getattr(mod, "bias", None)
            saved = (None if alpha is None else alpha.detach().clone(), None if bias is None else bias.detach().clone())
            if alpha is not None:
                alpha.fill_(1.0)
            if bias is not None:
                bias.zero_()
            clear_cache(mod)
            z = mod.forward(*inp)
            if not (isinstance(z, Tensor) and isinstance(y, Tensor)) or z.shape != y.shape or z.dim() < 2:
                _restore(mod, saved)
                return
            ch = 1 if z.dim() > 2 else z.dim() - 1
            zc = z.detach().double().movedim(ch, 0).reshape(z.shape[ch], -1)
            yc = y.detach().double().movedim(ch, 0).reshape(y.shape[ch], -1)
            zm, ym = zc.mean(1), yc.mean(1)
            if alpha is not None:
                var = (zc - zm[:, None]).square().mean(1)
                cov = ((zc - zm[:, None]) * (yc - ym[:, None])).mean(1)
                a = torch.where(var > 1e-12 * var.max().clamp_min(1e-300), cov / var.clamp_min(1e-300),
                                saved[0].double())
                alpha.copy_(a.to(alpha.dtype))
            else:
                a = torch.ones_like(zm)
            if bias is not None:
                bias.copy_((ym - a * zm).to(bias.dtype))
            clear_cache(mod)

        hooks = [mod.register_forward_pre_hook(pre) for mod in layers.values()]
        _eval_forward(model, args, hooks)


def _eval_forward(model: nn.Module, args: tuple, hooks: list) -> None:
    modes = {mod: mod.training for mod in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(*args)
    finally:
        for h in hooks:
            h.remove()
        for mod, mode in modes.items():
            mod.training = mode


def _restore(mod: nn.Module, saved: tuple) -> None:
    if saved[0] is not None:
        mod.alpha.copy_(saved[0])
    if saved[1] is not None:
        mod.bias.copy_(saved[1])
    clear_cache(mod)


def _feeds(model: nn.Module, conv_name: str, bn_name: str) -> bool:
    """Whether the output of ``conv_name`` is what ``bn_name`` (the next module in registration order) normalizes:
    both in the same parent, or the conv ends a chain of ``nn.Sequential``s that sits in the BN's parent (timm's
    ``stem`` Sequential ending with a conv, followed by ``bn1``)."""
    bn_parent = bn_name.rpartition(".")[0]
    path = conv_name
    while True:
        parent = path.rpartition(".")[0]
        if parent == bn_parent:
            return True
        if not parent or not (bn_parent == "" or parent.startswith(bn_parent + ".")):
            return False
        seq = model.get_submodule(parent)
        if not isinstance(seq, nn.Sequential) or not len(seq) or seq[-1] is not model.get_submodule(path):
            return False
        path = parent


def conv_bn_pairs(model: nn.Module) -> dict[int, tuple[str, nn.Module]]:
    """conv/linear → the BN registered right after it in the same parent, with as many features as it has outputs
    (the conv→BN unit of torchvision and timm), for ``copy_weights``."""
    mods = list(model.named_modules())
    pairs: dict[int, tuple[str, nn.Module]] = {}
    for (n1, a), (n2, b) in zip(mods, mods[1:]):
        ci = conv_info(a)
        if ci is None and not isinstance(a, nn.Linear):
            continue
        if ci is not None and ci.lazy or bn_info(b) is None or bn_stats(b) is None:
            continue
        if not _feeds(model, n1, n2):
            continue
        outs = a.out_channels if ci is not None else a.out_features
        if bn_stats(b)[0].numel() == outs:
            pairs[id(a)] = (n2, b)
    return pairs


class _add_bias:
    def __init__(self, b: Tensor) -> None:
        self.b = b

    def __call__(self, mod: nn.Module, inp: Any, out: Tensor) -> Tensor:
        return out + self.b.view(-1, *([1] * (out.dim() - 2))) if out.dim() > 2 else out + self.b


def effective_weight(conv: nn.Module, info: ConvInfo) -> Tensor:
    """The weight ``conv`` actually convolves with (weight-standardized convs standardize theirs in forward)."""
    w = conv.weight
    if info.std is None:
        return w.detach().clone()
    out = w.shape[0]
    scale = (conv.gain * conv.scale).reshape(-1) if info.std == "scaled" else None
    return F.batch_norm(w.detach().reshape(1, out, -1), None, None, weight=None if scale is None else scale.detach(),
                        training=True, momentum=0.0, eps=conv.eps).reshape_as(w)


def fold_bn(weight: Tensor, bias: Tensor | None, bn: nn.Module, *, transposed: bool = False,
            linear: bool = False) -> tuple[Tensor, Tensor] | None:
    """``weight``/``bias`` of the layer that computes layer → ``bn`` (eval statistics), with torch's fusion
    utilities; ``None`` when ``bn`` has no running statistics."""
    st = bn_stats(bn)
    if st is None:
        return None
    rm, rv, eps, bw, bb = st
    bw = torch.ones_like(rm) if bw is None else bw.detach()
    bb = torch.zeros_like(rm) if bb is None else bb.detach()
    rm, rv = rm.to(weight.dtype), rv.to(weight.dtype)
    if linear:
        b = torch.zeros_like(rm) if bias is None else bias
        w, b = fuse_linear_bn_weights(weight, b, rm, rv, eps, bw.to(weight.dtype), bb.to(weight.dtype))
    else:
        w, b = fuse_conv_bn_weights(weight, bias, rm, rv, eps, bw.to(weight.dtype), bb.to(weight.dtype),
                                    transpose=transposed)
    return w.detach(), b.detach()


@torch.no_grad()
def init_from(new: nn.Module, raw: Tensor, eff: Tensor, bias: Tensor | None) -> None:
    """Initialize ``new`` so that it computes (as nearly as it can) the layer whose effective weight is ``eff`` and
    bias ``bias``; ``raw`` is the raw weight the original layer stored.

    A PWS layer keeps ``raw`` and fits α per filter by least squares, α_o = ⟨eff_o, Ŵ_o⟩ / ⟨Ŵ_o, Ŵ_o⟩ with Ŵ the
    standardized raw weight: for eff = s·W (a folded BN scale s) that is α_o = s_o·sqrt(Var[W_o] + γ)/gain, and
    α_o·Ŵ_o = eff_o − E[eff_o] — exact but for the filter mean that PWS removes. Any other layer gets ``eff``
    itself as its weight (plain convs: exact)."""
    if hasattr(new, "alpha") and hasattr(new, "compute_weight") and hasattr(new, "_layout"):
        new.weight.copy_(raw)
        if new.alpha is not None:
            new.alpha.fill_(1.0)
            s = new.compute_weight().double()
            view, reduce, _ = new._layout()
            e = eff.double()
            if view is not None:
                s, e = s.reshape(view), e.reshape(view)
            num, den = (s * e).sum(reduce), (s * s).sum(reduce)
            a = torch.where(den > 0, num / den.clamp_min(1e-300), torch.ones_like(num))
            new.alpha.copy_(a.reshape(-1).to(new.alpha.dtype))
        clear_cache(new)
    else:
        new.weight.copy_(eff)
    if getattr(new, "bias", None) is not None:
        if bias is None:
            new.bias.zero_()
        else:
            new.bias.copy_(bias)

