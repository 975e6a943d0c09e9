"""Per-channel scale of every conv unit's output in trained networks: what BN resets at each layer and PWS does not.

For each run directory (``pwsconv train``'s, or a sweep's): the trained network (``pwsconv.load``), the first
``--images`` test images of its data set (preprocessed as in training), and for every conv unit of the zoo (conv →
norm → activation) the standard deviation of each output channel over the batch and positions. The table gives,
per unit, the mean channel std, the ratio of the largest to the smallest, and their coefficient of variation; a
BN network holds the mean near a constant and the ratio near 1–2 at every depth.

    python benchmarks/activation_scales.py results/reproduce/robust_medium/lr_plain_{bn,pws,pws_auto}_lr0.1_s0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import pwsconv
from pwsconv.data import load_dataset
from pwsconv.models import ConvUnit


def unit_scales(model: torch.nn.Module, x: torch.Tensor) -> list[dict[str, float]]:
    """Per conv unit of ``model`` (in forward order) on the batch ``x``: mean channel std, max/min and its CV, and
    how many of its channels are dead (zero at ≥ 99 % of the positions of the batch: a ReLU that never opens)."""
    rows: list[dict[str, float]] = []

    def hook(_mod, _inp, out) -> None:
        per_channel = out.detach().transpose(0, 1).reshape(out.shape[1], -1).double()
        std = per_channel.std(1)
        dead = int(((per_channel == 0).double().mean(1) >= 0.99).sum())
        rows.append({"mean_std": float(std.mean()), "max_over_min": float(std.max() / std.min().clamp_min(1e-12)),
                     "cv": float(std.std() / std.mean().clamp_min(1e-12)), "dead": dead,
                     "channels": int(out.shape[1])})

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, ConvUnit)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run directories (each with checkpoint.pt)")
    p.add_argument("--images", type=int, default=500, help="test images per network (default 500)")
    p.add_argument("--data-root", default=None, help="the data set's directory (default: as pwsconv train finds it)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args(argv)
    if args.images < 2:
        p.error(f"--images must be at least 2, got {args.images}")
    for run in args.runs:
        if not (run / "checkpoint.pt").is_file() and not run.is_file():
            p.error(f"{run}: no checkpoint.pt there")
    out = {}
    for run in args.runs:
        model = pwsconv.load(run)
        cfg = model.pretrained_cfg
        data = load_dataset(cfg["dataset"], args.data_root, limit=1, test_limit=args.images)
        rows = unit_scales(model, model.preprocess(data.test.x[:args.images]))
        if not rows:
            p.error(f"{run}: the network has no conv units of the zoo")
        out[str(run)] = rows
        print(f"\n{run} ({cfg['model']}, {cfg['method']})\n")
        print("| unit | mean channel std | max / min | CV | dead channels |\n|---:|---:|---:|---:|---:|")
        for i, r in enumerate(rows):
            print(f"| {i} | {r['mean_std']:.3f} | {r['max_over_min']:.1f} | {r['cv']:.2f} | "
                  f"{r['dead']} of {r['channels']} |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
