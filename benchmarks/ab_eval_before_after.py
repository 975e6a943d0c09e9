"""Eval forward (``no_grad``) before/after in ONE process: plain conv, PWS of an older checkout and of this tree
(both through their eval cache: ``pwsconv.cached`` where the tree has that scope, automatic before it), this tree's
PWS without the cache, and its folded PWS net, round-robin, as ratios to plain conv.

    git worktree add /tmp/before 9567877
    python benchmarks/ab_eval_before_after.py --before /tmp/before/src/pwsconv --out results/benchmarks/ab_round4_eval.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab_before_after import load_package  # noqa: E402  (the sibling script: one way to import the old package)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, type=Path, help="path to the older checkout's src/pwsconv")
    p.add_argument("--models", nargs="+", default=["resnet_cifar_small", "convpool_cnn_c_small", "resnet50_small"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[2, 32])
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--out", type=Path, default=Path("results/benchmarks/ab_eval.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)   # timed by this thread's CPU time: other processes barely disturb it
    before = load_package("pwsconv_before", a.before.resolve())
    import pwsconv_before.models  # type: ignore[import-not-found]  # noqa: F401

    import pwsconv
    import pwsconv.models
    from pwsconv.experiments.speed import timed_interleaved

    rows = []
    for model in a.models:
        for b in a.batch_sizes:
            x = torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(0))
            nets = {}
            for tag, pkg, method in (("pws before", before, "pws"), ("pws after", pwsconv, "pws"),
                                     ("none", pwsconv, "none")):
                torch.manual_seed(0)
                nets[tag] = pkg.models.build_model(model, method, num_classes=10, in_channels=3).eval()
            nets["pws folded"] = pwsconv.fold(nets["pws after"])
            nets["pws after, no cache"] = copy.deepcopy(nets["pws after"])

            def fn(net):
                def f() -> None:
                    with torch.no_grad():
                        net(x)
                return f

            with contextlib.ExitStack() as scopes:   # one cache scope around all rounds, as an evaluation holds it
                scopes.enter_context(pwsconv.cached(nets["pws after"]))
                if hasattr(before, "cached"):
                    scopes.enter_context(before.cached(nets["pws before"]))
                t = timed_interleaved({k: fn(n) for k, n in nets.items()}, "cpu", a.repeats, 3, clock=time.thread_time)
            row = dict(model=model, batch=b, none_ms=t["none"] * 1e3, **{k: t[k] / t["none"] for k in t if k != "none"})
            rows.append(row)
            print(f"| {model} | {b} | {row['none_ms']:.2f} ms | " + " | ".join(
                f"×{row[k]:.3f}" for k in ("pws before", "pws after", "pws after, no cache", "pws folded")) + " |",
                flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
