"""A user's own training loop, not the engine: a VGG-style CIFAR net written with ``nn.Conv2d`` + ``nn.BatchNorm2d``,
trained as is (BN) or after ``pwsconv.convert(net, "pws", gamma="auto")``, with ``SGD(pwsconv.param_groups(net, 5e-4),
lr, momentum=0.9)``, forward, backward, step — nothing else. The shape of issue 20's held-out check (small VGG-style
net, 5,000 images, 4 epochs, LR 0.1 / 0.4 / 1.6), written independently of it; one JSON line per run.

    python benchmarks/user_loop_check.py --method auto --lr 0.1 --seed 0 --out results/auto_user_loop/runs.jsonl

``--round9``: ``gamma="auto"`` as in round 9, λ_W kept at the starting LR's (the library's λ_W follows the LR since
round 10). ``--follow-w`` (the screen of that change, on round 9): after every step W's clipping bound is set to
the one ``gamma="auto"`` would choose at the current LR (benchmarks/auto_relax_screen.py), α's and β's kept.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import pwsconv
from pwsconv.data import Loader, load_dataset


def vgg_style(width: int = 32, classes: int = 10) -> nn.Module:
    def unit(i: int, o: int) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

    w = width
    return nn.Sequential(*unit(3, w), *unit(w, w), nn.MaxPool2d(2), *unit(w, 2 * w), *unit(2 * w, 2 * w),
                         nn.MaxPool2d(2), *unit(2 * w, 4 * w), *unit(4 * w, 4 * w), nn.MaxPool2d(2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, classes))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=["bn", "auto", "pws"], required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--limit", type=int, default=5000)
    p.add_argument("--test-limit", type=int, default=2000)
    p.add_argument("--follow-w", action="store_true", help="auto: round 9 with W's bound following the LR's schedule "
                   "after every step (the screen of round 10)")
    p.add_argument("--round9", action="store_true", help="auto: λ_W kept at the starting LR's (round 9)")
    p.add_argument("--out", type=Path, default=Path("results/auto_user_loop/runs.jsonl"))
    a = p.parse_args(argv)
    if (a.follow_w or a.round9) and a.method != "auto":
        p.error("--follow-w and --round9 need --method auto")
    if a.follow_w or a.round9:
        from pwsconv.layers import _auto

        _auto.AUTO_W_FOLLOWS_LR = False
    torch.set_num_threads(1)
    ds = load_dataset("cifar10", limit=a.limit, test_limit=a.test_limit, seed=a.seed)
    train = Loader(ds.train, 128, shuffle=True, drop_last=True, augment=ds.augment, mean=ds.mean, std=ds.std,
                   seed=a.seed)
    test = Loader(ds.test, 500, shuffle=False, mean=ds.mean, std=ds.std)
    torch.manual_seed(a.seed)
    net = vgg_style()
    if a.method != "bn":
        net = pwsconv.convert(net, "pws", gamma="auto" if a.method == "auto" else 1e-3)
    opt = torch.optim.SGD(pwsconv.param_groups(net, 5e-4), lr=a.lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [a.epochs // 2, (3 * a.epochs) // 4], 0.1)
    if a.follow_w:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from auto_relax_screen import attach

        attach(net, opt, follow_lr=True, only="w")
    t0, finite = time.perf_counter(), True
    for _ in range(a.epochs):
        net.train()
        for x, y in train:
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            finite = finite and math.isfinite(loss.item())
        sched.step()
    net.eval()
    correct = n = 0
    with torch.no_grad():
        for x, y in test:
            out = net(x)
            correct += int((out.argmax(1) == y).sum())
            n += len(y)
    err = 100.0 * (1 - correct / n) if finite else float("nan")
    tag = " follow-w" if a.follow_w else " round9" if a.round9 else ""
    row = {"method": a.method + tag, "lr": a.lr, "seed": a.seed, "epochs": a.epochs, "limit": a.limit,
           "test_error": err, "seconds": round(time.perf_counter() - t0, 1)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
