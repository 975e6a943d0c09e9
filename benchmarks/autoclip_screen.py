"""Screen AutoClip (Seetharaman et al. 2020) as the stabilizer of paper PWS, one of issue 20's candidates.

AutoClip clips a gradient to the p-th percentile of the norms that gradient has had so far (p = 10 in the paper). The
issue asks for it per layer ("a per-layer running statistic of its own gradient norms"): here every parameter tensor
(each layer's W, α, β, the classifier's weight and bias) keeps the history of its own gradient norm and is clipped to
its own percentile, in a gradient hook on the leaf, so the step the optimizer takes is the clipped one — what a layer
doing this inside its backward would give. ``--scope model`` clips the whole gradient with one history instead (the
paper's form). The runs are the robust medium preset's paper-PWS runs (same configs and names, γ = 1e-3) trained
with the hooks installed in this process; the table compares them with the preset's BN, paper PWS and
``gamma="auto"`` cells.

    python benchmarks/autoclip_screen.py --nets plain --lrs 0.1 1.6 --out results/autoclip_p10
    python benchmarks/autoclip_screen.py --out results/autoclip_p10 --report
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from auto_bias_screen import PRESET_LRS, add_screen_args, screen_runs, screen_table  # noqa: E402

from pwsconv.experiments.sweep import run_sweep  # noqa: E402
from pwsconv.train.task import ClassificationTask  # noqa: E402


class AutoClip:
    """Per-tensor AutoClip: ``hook(grad)`` clips ``grad`` to the ``p``-th percentile of its tensor's norm history
    (the current norm included). Counts how often it clipped and the share of the norm it kept."""

    def __init__(self, p: float) -> None:
        self.p, self.hist, self.held, self.seen, self.kept = p, {}, 0, 0, []

    def hook(self, key: int):
        def clip(grad: torch.Tensor) -> torch.Tensor:
            n = float(grad.norm())
            if not np.isfinite(n):
                return grad
            h = self.hist.setdefault(key, [])
            h.append(n)
            bound = float(np.percentile(h, self.p))
            self.seen += 1
            if n > bound > 0:
                self.held += 1
                self.kept.append(bound / n)
                return grad * (bound / n)
            return grad
        return clip


def install(p: float, scope: str, log: dict) -> None:
    """Patch ``ClassificationTask.bind`` so every run of this process clips its gradients with AutoClip."""
    def bind(self, model, opt):
        if opt.state:   # bound after a resumed checkpoint loaded: the hook's state would restart mid-run
            raise RuntimeError("this screen does not resume an interrupted run (its clipping state is not in the "
                               "checkpoint): delete the run's folder to train it again")
        clip = AutoClip(p)
        log["clips"].append(clip)
        params = [q for q in model.parameters() if q.requires_grad]
        if scope == "layer":
            for i, q in enumerate(params):
                q.register_hook(clip.hook(i))
        else:   # one history for the whole gradient: clip in the optimizer's pre-step hook
            def pre(optimizer, args, kwargs):
                grads = [q.grad for q in params if q.grad is not None]
                total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
                scaled = clip.hook(0)(total.reshape(1))
                if float(total) > 0:
                    s = float(scaled) / float(total)
                    if s != 1.0:
                        torch._foreach_mul_(grads, s)
            opt.register_step_pre_hook(pre)
    ClassificationTask.bind = bind


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--percentile", type=float, default=10.0, help="clip to this percentile of the history (10)")
    ap.add_argument("--scope", choices=["layer", "model"], default="layer",
                    help="one history per parameter tensor (the issue's form) or one for the whole gradient")
    add_screen_args(ap, list(PRESET_LRS))
    a = ap.parse_args(argv)
    if not a.report:
        log: dict = {"clips": []}
        install(a.percentile, a.scope, log)
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "setting.txt").write_text(f"AutoClip p{a.percentile:g} per {a.scope}\n")
        runs = [r for r in screen_runs(a.nets, a.lrs, ["pws"], a.seeds) if r.config.seed >= a.first_seed]
        for r in runs:   # one at a time, so each run's clip statistics are its own
            n0 = len(log["clips"])
            run_sweep([r], a.out, jobs=1)
            if len(log["clips"]) > n0:
                c = log["clips"][-1]
                with open(a.out / "clip_stats.jsonl", "a") as f:
                    f.write(json.dumps({"name": r.name, "held_share": c.held / max(c.seen, 1),
                                        "mean_kept_when_held": float(np.mean(c.kept)) if c.kept else 1.0}) + "\n")
    print(screen_table(a.out, a.base, sorted(set(a.lrs) | ({0.1, 1.6} if a.report else set())), "pws",
                       "paper PWS + {}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
