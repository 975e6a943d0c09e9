"""``pwsconv probe``: the paper's Figure 1 experiment on a model and data set chosen by name.

The same network is built as each method ("none", "bn", "pws" by default) and trained for a few steps at a large LR
(or measured without updates, Figure 6 caption) with :class:`pwsconv.diagnostics.VarianceProbe` attached; the plots
(figure1.png, figure2.png, figure6.png, variance.png), the records (records.csv / records.jsonl) and a Markdown summary
(summary.md: the shift per layer for each method, and whether the plain network's Var[Y_l] grows with depth as eq. 6
predicts) are written to the output directory.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Callable

import torch

__all__ = ["configure_probe_parser", "probe", "OUTPUT_FILES"]

#: What a probe writes to its output directory.
OUTPUT_FILES = ("summary.md", "records.csv", "records.jsonl", "figure1.png", "figure1_effective.png", "figure2.png",
                "figure6.png", "variance.png", "clipping.png")


def probe(
    model: str = "tiny_cnn",
    dataset: str = "digits",
    methods: tuple[str, ...] = ("none", "bn", "pws"),
    lr: float = 0.5,
    steps: int = 30,
    batch_size: int = 64,
    mode: str = "train",
    out_dir: str = "runs/probe",
    data_root: str | None = None,
    seed: int = 0,
    every: int = 1,
    progress: bool = True,
    force: bool = False,
    **method_opts: Any,
) -> dict[str, Any]:
    """Run the Figure 1 experiment; returns :func:`pwsconv.diagnostics.run_probe_experiment`'s result.

    An ``out_dir`` that already holds a probe's results is refused (a one-line ``ValueError``) unless ``force``:
    then those files are replaced."""
    from ..data import load_dataset
    from ..diagnostics import run_probe_experiment
    from ..models import build_model
    from ..methods import get_method

    from ..config import FLOAT32_MAX, SEED_LIMIT, ConfigError, check_method_opts
    from ..train.rundir import check_output_dir

    def whole(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    # every argument is checked before anything is loaded, built or trained
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not (0 < lr < float("inf")):
        raise ValueError(f"--lr must be a positive number, got {lr}")
    if lr > FLOAT32_MAX:
        raise ValueError(f"--lr must be at most {FLOAT32_MAX:.4g} (beyond the float32 range of the weights SGD "
                         f"cannot apply it), got {lr}")
    for name, v in (("--steps", steps), ("--batch-size", batch_size), ("--every", every)):
        if not whole(v) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not whole(seed) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"--seed must be an integer in [0, 2**32), got {seed!r}")
    if mode not in ("train", "measure"):
        raise ValueError(f"--mode must be 'train' or 'measure', got {mode!r}")
    if not methods:
        raise ValueError("--methods must name at least one normalization method")
    def opts_of(label: str) -> tuple[str, dict[str, Any]]:
        """A method's options: the shared ones it declares (``--gamma`` goes to methods with a γ), then its own."""
        name, opts = _split_method(label)
        declared = get_method(name).options
        return name, {**{k: v for k, v in method_opts.items() if k in declared}, **opts}

    for m in methods:
        name, opts = opts_of(m)
        try:
            check_method_opts(name, opts)
        except ConfigError as e:
            raise ValueError(str(e).replace("method_opts.", "--").replace("method_opts ", f"{name} options ")) \
                from None
    check_output_dir(out_dir, "--out directory")
    held = [f for f in OUTPUT_FILES if os.path.lexists(os.path.join(out_dir, f))]
    if held and not force:
        raise ValueError(f"--out {out_dir} already holds a probe's results ({', '.join(held[:3])}"
                         f"{', ...' if len(held) > 3 else ''}); pass --force to replace them or choose another --out")
    from ..models import model_info
    from ..models.external import check, is_external

    check(model) if is_external(model) else model_info(model)   # a bad model name fails before any work
    data = load_dataset(dataset, data_root, seed=seed)
    n_train = len(data.train.y)
    if batch_size > n_train:
        raise ValueError(f"--batch-size {batch_size} is larger than the training set of {dataset!r} ({n_train} "
                         "images): no step could run")
    g = torch.Generator().manual_seed(seed)
    loader = data.loader("train", batch_size, generator=g, drop_last=True)

    def batches():
        return iter(loader)

    def model_fn(label: str) -> torch.nn.Module:
        method, opts = opts_of(label)
        return build_model(model, method=method, num_classes=data.num_classes, in_channels=data.in_channels,
                           method_opts=opts or None)

    for m in methods:   # every network builds (a bad option of any method fails here, before any training)
        try:
            model_fn(m)
        except (TypeError, ValueError) as e:
            raise ValueError(f"cannot build {model!r} with method {m!r}: {' '.join(str(e).split())}") from None
    os.makedirs(out_dir, exist_ok=True)
    return run_probe_experiment(model_fn, batches, methods=methods, lr=lr, steps=steps, mode=mode, out_dir=out_dir,
                                every=every, seed=seed, progress=progress)


def _split_method(label: str) -> tuple[str, dict[str, Any]]:
    """"pws:gamma=auto,clip=0.01" → ("pws", {"gamma": "auto", "clip": 0.01}); a bare name has no options."""
    name, _, rest = label.partition(":")
    opts: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        k, eq, v = item.partition("=")
        if not eq or not k:
            raise ValueError(f"--methods: {label!r}: options are NAME:key=value,key=value")
        try:
            opts[k] = float(v) if v not in ("auto", "True", "False", "None") else \
                {"auto": "auto", "True": True, "False": False, "None": None}[v]
        except ValueError:
            opts[k] = v
    return name, opts


def _gamma_arg(v: str) -> float | str:
    return "auto" if v == "auto" else float(v)


def configure_probe_parser(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    p.add_argument("--model", default="tiny_cnn", help="a name of pwsconv.models.available_models(), or "
                   "torchvision:NAME, timm:NAME, module.path:callable (default: tiny_cnn)")
    p.add_argument("--dataset", default="digits", help="a name of pwsconv.data.available_datasets() (default: digits)")
    p.add_argument("--data-root", default=None, help="the data set's directory (default: $PWSCONV_DATA or the usual "
                                                     "places)")
    p.add_argument("--methods", nargs="+", default=["none", "bn", "pws"],
                   help="method names, each optionally with options: e.g. bn pws pws:gamma=auto (default: none bn pws)")
    p.add_argument("--lr", type=float, default=0.5,
                   help="the LR (default: 0.5, where the shift grows before anything breaks; 5 makes the plain net "
                        "collapse on digits)")
    p.add_argument("--steps", type=int, default=30, help="steps (batches) per method (default: 30)")
    p.add_argument("--batch-size", type=int, default=64, help="(default: 64)")
    p.add_argument("--mode", choices=["train", "measure"], default="train",
                   help="train: apply the updates (default); measure: the paper's measure-without-update mode")
    p.add_argument("--every", type=int, default=1, help="record every N-th step (default: 1)")
    p.add_argument("--gamma", type=_gamma_arg, default=1e-3,
                   help='γ of the PWS layers, or "auto" (default: 1e-3; a method may also carry options: '
                        'pws:gamma=auto)')
    p.add_argument("--seed", type=int, default=0,
                   help="the seed of every method's initialization and data order (default: 0)")
    p.add_argument("--out", default="runs/probe", help="output directory (default: runs/probe)")
    p.add_argument("--force", action="store_true", help="replace the results of an earlier probe in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    def run(a: argparse.Namespace) -> int:
        res = probe(a.model, a.dataset, tuple(a.methods), a.lr, a.steps, a.batch_size, a.mode, a.out, a.data_root,
                    a.seed, a.every, not a.no_progress, force=a.force, gamma=a.gamma)
        print(res["markdown"])
        print(f"\nplots, records and summary written to {a.out}/")
        return 0

    return run
