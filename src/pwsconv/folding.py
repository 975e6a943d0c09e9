"""Deployment: :func:`fold` turns reparameterized layers into the plain torch layers computing the same function and
merges every eval-mode output norm that can fold into the conv before it.

What folds is declared where it is defined, never named here: a layer folds through its ``to_plain()`` (the PWS
family, WS, WN, CenConv), a layer that cannot fold says why in a ``cannot_fold`` class attribute (SwitchNorm), and a
method whose output norm folds declares how in :attr:`pwsconv.methods.Method.fold_norm` (BatchNorm, MABN).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from .methods import norm_fold_stats

__all__ = ["fold", "FoldReport", "fold_report"]

_PLAIN_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class FoldReport:
    """What one :func:`fold` call did: the names of the reparameterized layers made plain, of the norm layers merged
    into the conv before them, and of the layers left as they are (each with why)."""

    plain: list[str] = field(default_factory=list)
    merged: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: ``"3 layer(s) made plain, 2 norm layer(s) merged into their conv"``."""
        text = f"{len(self.plain)} layer(s) made plain, {len(self.merged)} norm layer(s) merged into their conv"
        return text + (f", {len(self.left)} left as they are" if self.left else "")


def fold(model: nn.Module, inplace: bool = False, *, batchnorm: bool = True) -> nn.Module:
    """Replace every reparameterized layer (anything with a ``to_plain()`` method: the PWS family and the zoo's
    weight-normalized convs) by the plain torch layer that computes the same function, and fold every eval-mode
    BatchNorm that directly follows a conv into that conv.

    PWS layers become ``nn.Conv*d`` / ``nn.ConvTranspose*d`` / ``nn.Linear`` holding α·Ŵ (eq. 12) and the bias; outputs
    match the unfolded model to float rounding, and no pwsconv class is left. By default ``model`` is deep-copied and
    left unchanged; with ``inplace=True`` it is modified and returned. Hooks registered on a folded layer are not
    carried over to its replacement. The folded layers keep the train/eval mode of the originals.

    ``batchnorm`` (default True): a BatchNorm in eval mode (running statistics) whose only input is the output of a
    plain conv used nowhere else is merged into that conv with torch's ``fuse_conv_bn_weights`` and replaced by
    ``nn.Identity`` — the conv+BN pairs are found by tracing the model with ``torch.fx`` (module calls as leaves), so
    only real data flow counts. A BatchNorm in training mode, after something other than a conv, or in a model fx
    cannot trace stays as it is; every one left is named in one warning. MABN's eval form (a per-channel scale and
    shift after its CenConv) is folded the same way (each method declares how its norm folds:
    :attr:`pwsconv.methods.Method.fold_norm`). SwitchNorm mixes per-sample statistics and cannot be folded: such
    layers (a class attribute ``cannot_fold`` says why) stay and are named in one warning.

    :func:`pwsconv.folding.fold_report` does the same and also says what was folded.
    """
    return _fold(model, inplace, batchnorm, FoldReport(), stacklevel=3)


def fold_report(model: nn.Module, inplace: bool = False, *, batchnorm: bool = True) -> tuple[nn.Module, FoldReport]:
    """:func:`fold`, and a :class:`FoldReport` of what it did (``pwsconv fold`` prints its summary)."""
    report = FoldReport()
    return _fold(model, inplace, batchnorm, report, stacklevel=3), report


def _fold(model: nn.Module, inplace: bool, batchnorm: bool, report: FoldReport, stacklevel: int) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold: model must be a torch.nn.Module, got {type(model).__name__}")
    lazy = [n or type(model).__name__ for n, m in model.named_modules() if isinstance(m, LazyModuleMixin)
            and m.has_uninitialized_params() and hasattr(m, "to_plain")]
    if lazy:   # before any copy or change: torch's own error names no layer
        raise ValueError(f"fold: lazy layer(s) {', '.join(lazy)} have no weights yet; run one forward first")
    if not inplace:
        model = copy.deepcopy(model)
    if hasattr(model, "to_plain") and callable(model.to_plain):
        report.plain.append("")
        return model.to_plain()
    folded: dict[int, nn.Module] = {}  # a layer shared by several parents is folded once and stays shared
    for name, mod in list(model.named_modules(remove_duplicate=False)):
        if name and hasattr(mod, "to_plain") and callable(mod.to_plain):
            try:
                if model.get_submodule(name) is not mod:
                    continue
            except AttributeError:
                continue  # inside a module already folded
            if id(mod) not in folded:
                folded[id(mod)] = mod.to_plain()
                report.plain.append(name)
            _set_submodule(model, name, folded[id(mod)])
    if batchnorm:
        _fold_norms(model, report, stacklevel + 1)
    left = [f"{n} ({type(m).__name__}: {m.cannot_fold})" for n, m in model.named_modules()
            if isinstance(getattr(type(m), "cannot_fold", None), str)]
    if left:
        report.left.extend(left)
        warnings.warn(f"fold: {len(left)} layer(s) cannot be folded and stay as they are: " + "; ".join(left),
                      stacklevel=stacklevel)
    return model


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _fold_norms(model: nn.Module, report: FoldReport, stacklevel: int) -> None:
    """Merge every eval-mode conv → foldable norm pair of ``model`` in place (see :func:`fold`); the norms left
    unfolded are named in one warning and in ``report.left``."""
    import torch.fx as fx
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    stats = {n: s for n, m in model.named_modules() if (s := norm_fold_stats(m)) is not None}
    if not stats:
        return

    class _Leaves(fx.Tracer):   # every module without children is a call, so the graph shows module-level data flow
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return not any(True for _ in m.children()) or super().is_leaf_module(m, qualname)

    try:
        graph = _Leaves().trace(model)
    except Exception as e:  # dynamic control flow, unsupported ops: leave the norms alone
        left = list(stats)
        reason = f"the model cannot be traced by torch.fx ({type(e).__name__})"
    else:
        calls: dict[str, int] = {}
        for node in graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        for node in graph.nodes:
            if node.op != "call_module" or node.target not in stats or calls[node.target] != 1:
                continue
            prev = node.args[0] if node.args else None
            if not (isinstance(prev, fx.Node) and prev.op == "call_module" and calls.get(prev.target) == 1
                    and len(prev.users) == 1 and len(node.args) == 1 and not node.kwargs):
                continue
            conv = model.get_submodule(prev.target)
            mean, var, eps, weight, bias = stats[node.target]
            if not isinstance(conv, _PLAIN_CONVS) or conv.training or conv.out_channels != mean.numel():
                continue
            with torch.no_grad():
                conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, mean, var, eps, weight, bias)
            _set_submodule(model, node.target, nn.Identity())
            report.merged.append(node.target)
        left = [n for n in stats if n not in report.merged]
        reason = "each does not directly follow a plain conv used only there"
    if left:
        report.left.extend(f"{n} (norm: {reason})" for n in left)
        warnings.warn(f"fold: {len(left)} eval-mode BatchNorm layer(s) left unfolded ({reason}): "
                      + ", ".join(left[:8]) + (" ..." if len(left) > 8 else ""), stacklevel=stacklevel)

