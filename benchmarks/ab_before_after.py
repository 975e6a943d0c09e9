"""Before/after of the PWS training step in ONE process: an older pwsconv checkout against this working tree.

Two benchmark runs in two processes differ by several percent on a shared machine (load, frequency, cache state),
which is as large as the effects being measured. This script imports the older package under another name
(``pwsconv_before``), builds the same network with both, and times plain conv, BN, PWS before, PWS after and PWS
after unfused (per-layer), PWS after with ``recompute=True`` and PWS after with ``gamma="auto"`` round-robin (order rotated every round), as ratios to plain conv.

    git worktree add /tmp/before 49014f9          # any commit that has pwsconv.experiments.speed
    python benchmarks/ab_before_after.py --before /tmp/before/src/pwsconv --out results/benchmarks/ab
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch


def load_package(name: str, path: Path):
    """Import the package at ``path`` (a directory holding ``__init__.py``) as ``name``."""
    init = path / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"error: {path} is not a package directory (no __init__.py)")
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]   # a package loaded under this name before (in this process): its submodules too
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(path)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, type=Path, help="path to the older checkout's src/pwsconv")
    p.add_argument("--models", nargs="+", default=["resnet_cifar_small", "convpool_cnn_c_small"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[2, 8, 32, 128])
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("results/benchmarks/ab"))
    p.add_argument("--lr", type=float, default=1e-3, help="SGD's LR (momentum 0.9): gamma=auto's bounds follow it "
                   "(above LR 0.1 α and β are clipped per vector)")
    p.add_argument("--also", nargs="*", default=[], metavar="METHOD",
                   help="other methods to time before and after too (e.g. mabn), with their default options")
    p.add_argument("--cpu-time", action="store_true",
                   help="one torch thread, timed by this thread's CPU time (for a machine busy with other work)")
    a = p.parse_args(argv)
    clock = time.perf_counter
    if a.cpu_time:
        torch.set_num_threads(1)
        clock = time.thread_time
    try:
        load_package("pwsconv_before", a.before.resolve())
        from pwsconv_before.experiments.speed import train_step_fn as before_step   # type: ignore[import-not-found]
        from pwsconv_before.models import build_model as before_build               # type: ignore[import-not-found]
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"error: cannot use {a.before} as the 'before' package: {e}") from None

    import pwsconv
    from pwsconv.experiments.speed import timed_interleaved, train_step_fn
    from pwsconv.models import build_model

    rows = []
    t0 = time.time()
    for model in a.models:
        for b in a.batch_sizes:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(b, 3, 32, 32, generator=g)
            y = torch.randint(0, 10, (b,), generator=g)

            def make(build, method, step, opts=None, **kw):
                torch.manual_seed(0)
                extra = {} if opts is None else {"method_opts": opts}
                return step(build(model, method, num_classes=10, in_channels=3, **extra), x, y, lr=a.lr, **kw)

            fns = {"none": make(build_model, "none", train_step_fn), "bn": make(build_model, "bn", train_step_fn),
                   "pws before": make(before_build, "pws", before_step),
                   "pws after": make(build_model, "pws", train_step_fn),
                   # the per-layer path (one layer_norm per layer, no fused node) decides whether fusion pays
                   "pws after (unfused)": make(build_model, "pws", train_step_fn, fuse=False),
                   "pws after (recompute)": make(build_model, "pws", train_step_fn, recompute=True),
                   # the stabilized layer (same forward, clipped gradients) against paper PWS
                   "pws after (gamma=auto)": make(build_model, "pws", train_step_fn, {"gamma": "auto"}),
                   "pws before (gamma=auto)": make(before_build, "pws", before_step, {"gamma": "auto"})}
            for m in a.also:
                fns[f"{m} before"] = make(before_build, m, before_step)
                fns[f"{m} after"] = make(build_model, m, train_step_fn)
            t = timed_interleaved(fns, "cpu", a.repeats, a.warmup, clock=clock)
            row = dict(model=model, batch=b, none_ms=t["none"] * 1e3,
                       **{k: v / t["none"] for k, v in t.items() if k != "none"})
            rows.append(row)
            print(f"[{model} b={b}] none={row['none_ms']:.2f}ms  " + "  ".join(
                f"{k}=×{v:.3f}" for k, v in row.items() if k not in ("model", "batch", "none_ms")), flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    meta = dict(before=str(a.before), torch=torch.__version__, pwsconv=pwsconv.__version__,
                clock="thread CPU time" if a.cpu_time else "wall time",
                threads=torch.get_num_threads(), repeats=a.repeats, wall_s=round(time.time() - t0),
                command="python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])))
    (a.out / "results.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    cols = [k for k in rows[0] if k not in ("model", "batch", "none_ms")]
    md = [f"Command: `{meta['command']}` ({meta['wall_s']} s, torch {meta['torch']}, {meta['threads']} threads, "
          f"{meta['clock']})", "",
          "| model | batch | none | " + " | ".join(cols) + " |", "|---|---:|---:|" + "---:|" * len(cols)]
    md += [f"| {r['model']} | {r['batch']} | {r['none_ms']:.2f} ms | " + " | ".join(f"×{r[c]:.3f}" for c in cols)
           + " |" for r in rows]
    (a.out / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
