"""Screen a ``gamma="auto"`` whose clips relax as the layer ages, one of issue 20's candidates ("a clip that is tight
while the layer is young and relaxes on a schedule the layer counts itself").

Each auto layer's bounds (λ of W's filters and λ of α and β, as ``gamma="auto"`` chose them from the SGD group) are
multiplied after every optimizer step by ``max(1, (t / T)^p)``, t the steps taken, T ``--young`` steps (one epoch of
the medium preset by default): as tight as the default for the first T steps, then looser, ×2 at 2T with p = 1. The
bounds are set in this process by an optimizer step hook, so the layer's own backward uses them at the next step —
what a layer counting its steps would do. The runs are the robust medium preset's auto runs (same configs and names);
the table compares them with the preset's BN, paper PWS and auto cells.

``--follow-lr`` instead recomputes the bounds after every step from the group's current LR (the default reads the
starting LR once): after each LR decay the clips loosen to what ``gamma="auto"`` would choose at the new LR.

    python benchmarks/auto_relax_screen.py --nets plain --lrs 0.4 1.6 --out results/auto_relax
    python benchmarks/auto_relax_screen.py --follow-lr --out results/auto_follow_lr
    python benchmarks/auto_relax_screen.py --out results/auto_relax --report
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from auto_bias_screen import PRESET_LRS, add_screen_args, screen_runs, screen_table  # noqa: E402

from pwsconv import functional as _F  # noqa: E402
from pwsconv.experiments.sweep import run_sweep  # noqa: E402
from pwsconv.layers import _auto  # noqa: E402
from pwsconv.layers._auto import auto_clips_of  # noqa: E402
from pwsconv.train.task import ClassificationTask  # noqa: E402


def relax_factor(t: int, young: int, power: float) -> float:
    """How much looser than the chosen bounds a layer that has taken ``t`` steps clips."""
    return max(1.0, (t / young) ** power) if young > 0 else 1.0


def follow_lr_clips(lr: float, momentum: float) -> tuple[float, float, float, bool]:
    """The bounds ``gamma="auto"`` would choose if the SGD group started at ``lr``."""
    return (_F.auto_clip_w(lr, momentum), _F.auto_clip(lr, momentum), _F.auto_bias_floor(lr, momentum),
            bool(_F.auto_clip_vector(lr, momentum)))


def attach(model, opt, young: int = 0, power: float = 1.0, follow_lr: bool = False, only: str = "all") -> dict:
    """Relax the clips of every auto layer of ``model`` after each step of ``opt`` (with the steps, or with the LR's
    schedule: ``follow_lr``; ``only``: "w" follows with W's bound alone, "ab" with α's and β's alone, the other kept
    as chosen). Returns the state the hook keeps (steps, the chosen bounds, the bounds now, the layers)."""
    layers = [m for m in model.modules() if getattr(m, "_gamma", None) == "auto"]
    state = {"t": 0, "base": {}, "layers": layers}

    def chosen(m):   # the bounds the layer chose from its SGD group at its first forward
        base = state["base"].get(id(m))
        if base is None:
            base = state["base"][id(m)] = auto_clips_of(m)
        return base

    def post(optimizer, args, kwargs):
        state["t"] += 1
        if follow_lr:
            g = optimizer.param_groups[0]
            now = follow_lr_clips(g["lr"], g.get("momentum", 0.0))
            for m in layers:
                base = chosen(m)
                clips = now if only == "all" else (now[0],) + base[1:] if only == "w" else (base[0],) + now[1:]
                m.__dict__["_auto_clips"] = clips
            state["clips"] = clips
            return
        f = relax_factor(state["t"], young, power)
        for m in layers:
            base = chosen(m)
            m.__dict__["_auto_clips"] = (base[0] * f, base[1] * f, base[2], base[3])
        state["factor"] = f
    opt.register_step_post_hook(post)
    return state


def install(young: int, power: float, log: dict, follow_lr: bool = False, only: str = "all") -> None:
    """Patch ``ClassificationTask.bind`` so that every auto layer of a run of this process relaxes its clips
    (:func:`attach`)."""
    def bind(self, model, opt):
        if opt.state:   # bound after a resumed checkpoint loaded: the hook's state would restart mid-run
            raise RuntimeError("this screen does not resume an interrupted run (its clipping state is not in the "
                               "checkpoint): delete the run's folder to train it again")
        log["runs"].append(attach(model, opt, young, power, follow_lr, only))
    ClassificationTask.bind = bind


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--young", type=int, default=78, help="steps the clips stay as chosen (78: one epoch of the "
                    "medium preset's large-LR runs)")
    ap.add_argument("--power", type=float, default=1.0, help="then the bounds grow as (t / young)^power")
    ap.add_argument("--follow-lr", action="store_true", help="recompute the bounds from the current LR after every "
                    "step instead (--young and --power unused)")
    ap.add_argument("--only", choices=["all", "w", "ab"], default="all", help="with --follow-lr: which bounds follow "
                    "the LR (w: W's alone; ab: α's and β's alone)")
    add_screen_args(ap, [0.4, 1.6, 3.2])
    a = ap.parse_args(argv)
    if not a.report:
        _auto.AUTO_W_FOLLOWS_LR = False   # screened against round 9, whose λ_W stays at the starting LR's
        install(a.young, a.power, {"runs": []}, a.follow_lr, a.only)
        a.out.mkdir(parents=True, exist_ok=True)
        what = {"all": "clips", "w": "W's clip", "ab": "α's and β's clips"}[a.only]
        (a.out / "setting.txt").write_text(f"{what} follow the LR's schedule\n" if a.follow_lr else
                                           f"clips × max(1, (t/{a.young})^{a.power:g})\n")
        run_sweep([r for r in screen_runs(a.nets, a.lrs, ["pws auto"], a.seeds) if r.config.seed >= a.first_seed],
                  a.out, jobs=1)
    print(screen_table(a.out, a.base, list(PRESET_LRS), "pws_auto", "auto, {}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
