"""Screen the clipping of ``gamma="auto"``'s α and β on the robust medium preset's auto cells.

Auto clips ∂L/∂β to λ·max(|β|, floor). A bias starts at 0, so with a floor of 1e-3 (round 4) its gradient stayed
below 1e-5, and in the medium runs every bias ended below 2e-3 in magnitude (paper PWS: 0.1–0.7): auto trained
almost without biases. This trains the preset's own auto runs (same configs and names) with another setting, set
in this process: ``--floor``, one floor at every LR (``CLIP_BIAS_FLOOR`` and ``AUTO_BIAS_FLOOR``; the default is
the rule ``auto_bias_floor``, so a screen at the rule's value for one LR is that LR's default run), and
``--clip-min``, the floor of λ of α and β (``AUTO_CLIP_MIN``, rule ``auto_clip``). The runs are trained one at a
time here, so start several processes with other ``--nets`` / ``--lrs`` to use more cores. Then it prints the table
against the preset's finished BN, paper PWS and auto cells.

    python benchmarks/auto_bias_screen.py --floor 0.1 --out results/auto_bias_floor01 --nets residual --lrs 0.05 0.1
    python benchmarks/auto_bias_screen.py --clip-min 0.005 --out results/auto_clip_step --lrs 0.4 1.6 3.2
    python benchmarks/auto_bias_screen.py --out results/auto_bias_floor01 --report
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
from pathlib import Path

from pwsconv import functional
from pwsconv.experiments import paper
from pwsconv.experiments.sweep import run_sweep


def _err(run_dir: Path) -> float | None:
    try:
        r = json.loads((run_dir / "result.json").read_text())
    except (OSError, ValueError):
        return None
    acc = r["metrics"].get("test_acc")
    return float("nan") if r["status"] == "nan" or acc is None else 100.0 * (1.0 - acc)


def _cell(folder: Path, name: str, seeds: int) -> str:
    errs = [e for s in range(seeds) if (e := _err(folder / f"{name}_s{s}")) is not None]
    if not errs:
        return "–"
    ok = [e for e in errs if math.isfinite(e)]
    if not ok:
        text = "NaN"
    elif len(ok) == 1:
        text = f"{ok[0]:.2f}"
    else:
        text = f"{statistics.mean(ok):.2f} ± {statistics.stdev(ok):.2f}"
    notes = ([f"{len(errs) - len(ok)} NaN"] if len(ok) < len(errs) and ok else []) + \
        ([f"{len(errs)} seed{'s' if len(errs) > 1 else ''}"] if len(errs) < seeds else [])
    return text + (f" ({', '.join(notes)})" if notes else "")


def _label(text: str) -> str:
    """The setting's label from floor.txt: a bare number there is a β floor (the first screens wrote only that)."""
    try:
        return f"β floor {float(text):g}"
    except ValueError:
        return text


PRESET_LRS = (0.05, 0.1, 0.4, 1.6, 3.2)


def report(out: Path, base: Path, seeds: int = 3, extra_lrs: tuple[float, ...] = ()) -> str:
    """The table: the preset's BN, paper PWS and auto cells (at an LR the preset lacks: those trained into ``out``
    by ``--methods``) and the screened setting's."""
    lrs = sorted(set(PRESET_LRS) | set(extra_lrs))
    lines = ["| net | method | " + " | ".join(f"LR {lr:g}" for lr in lrs) + " |", "|---|---|" + "---:|" * len(lrs)]
    floor = (out / "floor.txt").read_text().strip() if (out / "floor.txt").is_file() else "?"
    for net in ("residual", "plain"):
        for label, folder, method in (("BN", base, "bn"), ("paper PWS", base, "pws"), ("auto", base, "pws_auto"),
                                      (f"auto, {_label(floor)}", out, "pws_auto")):
            cells = [_cell(folder if lr in PRESET_LRS else out, f"lr_{net}_{method}_lr{lr:g}", seeds) for lr in lrs]
            lines.append(f"| {net} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_screen_args(ap: argparse.ArgumentParser, lrs: list[float]) -> None:
    """The arguments every hook screen shares (benchmarks/autoclip_screen.py, benchmarks/auto_relax_screen.py)."""
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--nets", nargs="+", default=["residual", "plain"])
    ap.add_argument("--lrs", nargs="+", type=float, default=lrs)
    ap.add_argument("--seeds", type=int, help="seeds per cell (default: the preset's 3)")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--base", type=Path, default=Path("results/reproduce/robust_medium"))
    ap.add_argument("--report", action="store_true", help="only print the table of the finished runs")


def screen_table(out: Path, base: Path, lrs: list[float], method: str, label: str, seeds: int = 3) -> str:
    """The preset's BN, paper PWS and auto cells beside the screened runs of ``method`` in ``out``, labelled
    ``label`` (``{}`` is replaced by out/setting.txt)."""
    setting = (out / "setting.txt").read_text().strip() if (out / "setting.txt").is_file() else "screened"
    lines = ["| net | method | " + " | ".join(f"LR {lr:g}" for lr in lrs) + " |", "|---|---|" + "---:|" * len(lrs)]
    for net in ("residual", "plain"):
        for name, folder, m in (("BN", base, "bn"), ("paper PWS", base, "pws"), ("auto", base, "pws_auto"),
                                (label.format(setting), out, method)):
            cells = [_cell(folder, f"lr_{net}_{m}_lr{lr:g}", seeds) for lr in lrs]
            lines.append(f"| {net} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def screen_runs(nets: list[str], lrs: list[float], methods: list[str], seeds: int | None = None,
                width: float | None = None) -> list:
    """The preset's LR-scan runs of ``methods`` on ``nets`` at ``lrs``; at an LR the preset lacks, its LR-0.1 runs
    with that LR (the same schedule and names with the LR replaced); ``width``: the nets at that width."""
    runs = [r for r in paper.build_runs("robust", "medium", seeds=seeds) if r.labels["part"] == "lr"
            and r.labels["method"] in methods and r.labels["arch"] in nets]
    if width is not None:
        runs = [dataclasses.replace(r, config=dataclasses.replace(
            r.config, model_opts={**r.config.model_opts, "width": width})) for r in runs]
    out = [r for r in runs if r.labels["LR"] in lrs]
    for lr in (x for x in lrs if x not in PRESET_LRS):
        for r in (r for r in runs if r.labels["LR"] == 0.1):
            out.append(dataclasses.replace(r, name=r.name.replace("_lr0.1_", f"_lr{lr:g}_"),
                                           labels={**r.labels, "LR": lr},
                                           config=dataclasses.replace(r.config, lr=lr)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--floor", type=float, help="one floor of the biases' clipping bound at every LR (default: the "
                   "rule, auto_bias_floor)")
    p.add_argument("--step-knee", type=float, help="W's step bound loosens below this effective LR (AUTO_STEP_KNEE)")
    p.add_argument("--clip-knee", type=float, help="λ of α and β grows as 1/lr below this effective LR, above --clip-free's "
                   "(AUTO_CLIP_KNEE; default: the module's)")
    p.add_argument("--clip-top", type=float, help="λ of α and β just above the free range (AUTO_CLIP_TOP; at an LR inside it "
                   "only with --clip-free 0)")
    p.add_argument("--clip-min", type=float, help="the floor of λ of α and β above the free range (AUTO_CLIP_MIN; inside "
                   "it only with --clip-free 0)")
    p.add_argument("--clip-free", type=float, help="up to this effective LR λ of α and β is AUTO_CLIP_SPIKE "
                   "(AUTO_CLIP_FREE; 0: off)")
    p.add_argument("--auto-gamma", type=float, help="γ of auto at every LR, relative to the He-init filter variance, "
                   "γ_eff = this·2/n_l (sets AUTO_GAMMA and AUTO_GAMMA_FREE; 0.1 puts γ_eff near paper PWS's 1e-3 "
                   "on the preset's 3×3 convs)")
    p.add_argument("--auto-gamma-free", type=float, help="γ of auto up to LR 0.1 at momentum 0.9 only "
                   "(AUTO_GAMMA_FREE, 0.1; 1e-3: round 8)")
    p.add_argument("--clip-unit", choices=["entry", "vector"], help="above the free range clip α and β per entry "
                   "(round 7) or each layer's vector as one unit (AUTO_CLIP_VECTOR; default: the module's)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--nets", nargs="+", default=["residual", "plain"])
    p.add_argument("--lrs", nargs="+", type=float, default=list(PRESET_LRS),
                   help="LRs to train (one the preset lacks: its LR-0.1 runs at that LR)")
    p.add_argument("--methods", nargs="+", default=["pws auto"], choices=["bn", "pws", "pws auto"],
                   help="the preset's methods to train (bn and pws: the comparison at an LR the preset lacks)")
    p.add_argument("--seeds", type=int, help="seeds per cell (default: the preset's 3)")
    p.add_argument("--first-seed", type=int, default=0, help="train only the seeds from this one on (another "
                   "process trains the others into another folder)")
    p.add_argument("--width", type=float, help="the nets at this width (default: the preset's); compare with "
                   "--base results/plain_width05 at 0.5")
    p.add_argument("--base", type=Path, default=Path("results/reproduce/robust_medium"))
    p.add_argument("--report", action="store_true", help="only print the table of the finished runs")
    a = p.parse_args(argv)
    if not a.report:
        if a.floor is not None:
            functional.CLIP_BIAS_FLOOR = functional.AUTO_BIAS_FLOOR = a.floor   # one floor at every LR
        if a.clip_min is not None:
            functional.AUTO_CLIP_MIN = a.clip_min
        if a.clip_top is not None:
            functional.AUTO_CLIP_TOP = a.clip_top
        if a.step_knee is not None:
            functional.AUTO_STEP_KNEE = a.step_knee
        if a.clip_knee is not None:
            functional.AUTO_CLIP_KNEE = a.clip_knee
        if a.clip_free is not None:
            functional.AUTO_CLIP_FREE = a.clip_free
        if a.auto_gamma is not None:   # read by the layer when it chooses its γ
            functional.AUTO_GAMMA = functional.AUTO_GAMMA_FREE = a.auto_gamma
        if a.auto_gamma_free is not None:
            functional.AUTO_GAMMA_FREE = a.auto_gamma_free
        if a.clip_unit is not None:
            functional.AUTO_CLIP_VECTOR = a.clip_unit == "vector"
        runs = [r for r in screen_runs(a.nets, a.lrs, a.methods, a.seeds, a.width) if r.config.seed >= a.first_seed]
        (a.out).mkdir(parents=True, exist_ok=True)
        label = ", ".join(x for x in (f"β floor {a.floor}" if a.floor is not None else "",
                                      f"λ of α, β ≥ {a.clip_min}" if a.clip_min is not None else "",
                                      f"λ of α, β ≤ {a.clip_top}" if a.clip_top is not None else "",
                                      f"W's step bound loosens below LR/(1 − m) = {a.step_knee}"
                                      if a.step_knee is not None else "",
                                      f"λ of α, β loosens below LR/(1 − m) = {a.clip_knee}"
                                      if a.clip_knee is not None else "",
                                      (f"λ of α, β {functional.AUTO_CLIP_SPIKE} up to LR/(1 − m) = {a.clip_free}"
                                       if a.clip_free else "no free range for α, β (round 6)")
                                      if a.clip_free is not None else "",
                                      f"width {a.width:g}" if a.width is not None else "",
                                      f"α, β clipped per {a.clip_unit} above the free range" if a.clip_unit else "",
                                      f"γ_eff = {a.auto_gamma:g}·2/n_l" if a.auto_gamma is not None else "",
                                      f"γ_eff = {a.auto_gamma_free:g}·2/n_l up to LR/(1 − m) = 1"
                                      if a.auto_gamma_free is not None else "")
                      if x)
        (a.out / "floor.txt").write_text(f"{label or 'the defaults'}\n")
        run_sweep(runs, a.out, jobs=1)
    print(report(a.out, a.base, extra_lrs=tuple(x for x in a.lrs if x not in PRESET_LRS)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
