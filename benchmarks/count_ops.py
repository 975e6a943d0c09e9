"""Dispatched aten ops per training step, per method — a proxy for launch-bound GPU time, counted on the CPU.

One engine training step (:func:`pwsconv.train.step.train_step`: forward, cross-entropy, backward, SGD with momentum,
PWS prepared as the engine prepares it) is run under a ``TorchDispatchMode`` that counts every aten op except
views and aliases (they launch no kernel). A warm-up step first, so lazily created optimizer state is not counted.
The fused node groups layers as it does on a GPU (no CPU concatenation limit; ``--cpu-grouping`` keeps the CPU's);
``--foreach`` uses SGD's foreach implementation (torch's default on a GPU; on a CPU the default is a loop).

    python benchmarks/count_ops.py                          # resnet50_small, batch 2
    python benchmarks/count_ops.py --model resnet_cifar_small --amp bf16 --channels-last
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pwsconv
from pwsconv.accel import fused as fused_module
from pwsconv.methods import prepare_for_training
from pwsconv.models import build_model
from pwsconv.train.step import train_step

CASES = {"plain conv": ("none", {}), "BN": ("bn", {}), "PWS fused": ("pws", {}), "auto fused": ("pws", {"gamma": "auto"})}


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active (``total`` and ``by_op``), views and aliases excluded."""

    def __init__(self) -> None:
        super().__init__()
        self.total, self.by_op = 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket not in (torch.ops.aten.detach, torch.ops.aten.alias):
            name = str(func.overloadpacket)
            self.total += 1
            self.by_op[name] = self.by_op.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def count(model: str, method: str, opts: dict, batch: int, amp: torch.dtype | None, channels_last: bool,
          foreach: bool = False) -> OpCounter:
    torch.manual_seed(0)
    net = build_model(model, method=method, method_opts=opts, num_classes=10)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    prepare_for_training(net, method)
    opt = torch.optim.SGD(pwsconv.param_groups(net, 5e-4), lr=0.1, momentum=0.9, foreach=foreach)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    train_step(net, opt, x, y, amp=amp)
    counter = OpCounter()
    with counter:
        train_step(net, opt, x, y, amp=amp)
    return counter


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50_small")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--amp", choices=["bf16"], default=None)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--foreach", action="store_true", help="SGD(foreach=True), the GPU default")
    p.add_argument("--cpu-grouping", action="store_true", help="the fused node's CPU concatenation limit")
    p.add_argument("--json", default=None, help="also write the counts here")
    a = p.parse_args(argv)
    amp = torch.bfloat16 if a.amp == "bf16" else None
    out = {}
    limit = fused_module.CPU_CAT_LIMIT
    for label, (method, opts) in CASES.items():
        if not a.cpu_grouping:
            fused_module.CPU_CAT_LIMIT = 1 << 62
        try:
            c = count(a.model, method, opts, a.batch, amp, a.channels_last, a.foreach)
        finally:
            fused_module.CPU_CAT_LIMIT = limit
        out[label] = {"total": c.total, "by_op": dict(sorted(c.by_op.items(), key=lambda kv: -kv[1]))}
        top = ", ".join(f"{k.split('.')[-1]} {v}" for k, v in list(out[label]["by_op"].items())[:5])
        print(f"{label:12s} {c.total:6d}   ({top})")
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump({"model": a.model, "batch": a.batch, "amp": a.amp, "channels_last": a.channels_last,
                       "foreach": a.foreach, "cpu_grouping": a.cpu_grouping,
                       "counts": out}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
