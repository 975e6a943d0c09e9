"""The fused node's CPU concatenation limit (``pwsconv.accel.fused.CPU_CAT_LIMIT``): one PWS training step with the
per-layer path against the fused node at several limits, in one process, round-robin, thread CPU time.

Layers whose weights have more elements than the limit are not concatenated with the other layers of their group;
copying large weights three times per step cost more than the dispatch it saved (torchvision's ResNet-50: the fused
node was 1.26× the per-layer path at batch 2 with no limit).

    python benchmarks/fused_cat_limit.py --model resnet_cifar_small --batch 2 --limits 0 16384 inf
    python benchmarks/fused_cat_limit.py --model torchvision:resnet50 --batch 2 --repeats 6   # needs torchvision
"""

from __future__ import annotations

import argparse
import time

import torch

import pwsconv
from pwsconv.accel import fused as fused_module
from pwsconv.experiments.speed import timed_interleaved
from pwsconv.models import build_model
from pwsconv.train.step import train_step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet_cifar_small")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--image", type=int, default=32)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--limits", nargs="+", default=["0", "16384", "65536", "inf"])
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    limits = {f"fused, limit {v}": (1 << 62 if v == "inf" else int(v)) for v in a.limits}
    x = torch.randn(a.batch, 3, a.image, a.image, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (a.batch,), generator=torch.Generator().manual_seed(1))
    fns = {}
    for tag in ["per-layer", *limits]:
        torch.manual_seed(0)
        net = build_model(a.model, "pws", num_classes=10, in_channels=3)
        if tag != "per-layer":
            pwsconv.fuse_standardization(net)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

        def step(net=net, opt=opt, limit=limits.get(tag)) -> None:
            if limit is not None:
                fused_module.CPU_CAT_LIMIT = limit
            train_step(net, opt, x, y)
        fns[tag] = step
    default = fused_module.CPU_CAT_LIMIT
    try:
        t = timed_interleaved(fns, "cpu", a.repeats, 2, clock=time.thread_time)
    finally:
        fused_module.CPU_CAT_LIMIT = default
    base = t["per-layer"]
    print(f"| {a.model} | {a.batch} | {base * 1e3:.1f} ms | "
          + " | ".join(f"×{t[k] / base:.3f}" for k in limits) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
