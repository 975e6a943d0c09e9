"""How often and how hard ``gamma="auto"`` clips W's filters through a schedule: round 9 (λ_W of the starting LR)
against round 10 (λ_W of the LR now), on the robust medium preset's own auto runs (same configs; per-layer path,
seed 0). Every training step records, for W, the share of filters held at the bound and ‖clipped ∇‖/‖unclipped ∇‖
(the probe's clip statistics), mean over the layers; writes steps.csv, clipping.png (both rounds against the step,
the LR beside them) and summary.md (per LR phase).

    python benchmarks/auto_follow_mechanism.py --net plain --lr 1.6 --out results/auto_round10_mechanism/plain_lr1.6
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from auto_bias_screen import screen_runs  # noqa: E402

from pwsconv.diagnostics._clipstats import hook_clips  # noqa: E402
from pwsconv.layers import _auto  # noqa: E402
from pwsconv.train import train  # noqa: E402
from pwsconv.train.task import ClassificationTask  # noqa: E402


def record_w_clipping(model, opt) -> list[dict]:
    """Hook every auto layer of ``model``: after each step of ``opt`` one row (step, LR, W's held share and kept norm
    share, mean over the layers that clipped). Returns the list the rows go to."""
    rows: list[dict] = []
    now: dict[str, list[float]] = {"held": [], "kept": []}

    def record(key, held, kept):
        if key == "w":
            now["held"].append(float(held))
            now["kept"].append(float(kept))

    def forward_hook(m, args, out):
        if m.training and out.grad_fn is not None and m.clip_w_lambda:
            hook_clips(out, args[0], m, record)

    for m in model.modules():
        if getattr(m, "_gamma", None) == "auto":
            m.register_forward_hook(forward_hook)

    def post(optimizer, args, kwargs):
        if now["held"]:
            rows.append({"step": len(rows), "lr": optimizer.param_groups[0]["lr"],
                         "held": statistics.fmean(now["held"]), "kept": statistics.fmean(now["kept"])})
        now["held"].clear()
        now["kept"].clear()
    opt.register_step_post_hook(post)
    return rows


def run(net: str, lr: float, follow: bool, seed: int) -> tuple[list[dict], float]:
    """One preset run (per-layer standardization, so the probe sees each layer's clip), its rows and test error."""
    (r,) = [r for r in screen_runs([net], [lr], ["pws auto"], seed + 1) if r.config.seed == seed]
    holder: dict[str, list[dict]] = {}
    original = ClassificationTask.bind

    def bind(self, model, opt):
        original(self, model, opt)
        holder["rows"] = record_w_clipping(model, opt)
    with tempfile.TemporaryDirectory() as tmp:
        old = _auto.AUTO_W_FOLLOWS_LR
        _auto.AUTO_W_FOLLOWS_LR, ClassificationTask.bind = follow, bind
        try:
            res = train(dataclasses.replace(r.config, out_dir=str(Path(tmp) / "run"), fuse_pws=False,
                                            progress=False))
        finally:
            _auto.AUTO_W_FOLLOWS_LR, ClassificationTask.bind = old, original
    acc = res.metrics.get("test_acc")
    return holder.get("rows", []), float("nan") if acc is None else 100 * (1 - acc)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--net", choices=["residual", "plain"], default="plain")
    ap.add_argument("--lr", type=float, default=1.6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, follow in (("round 9", False), ("round 10", True)):
        results[name] = run(a.net, a.lr, follow, a.seed)
    with open(a.out / "steps.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["round", "step", "lr", "w_held", "w_kept"])
        for name, (rows, _) in results.items():
            for r in rows:
                w.writerow([name, r["step"], f"{r['lr']:.6g}", f"{r['held']:.6f}", f"{r['kept']:.6f}"])
    lines = [f"# W's clipping through the schedule: {a.net} net, LR {a.lr:g}, seed {a.seed}", "",
             "| round | test error % | LR phase | steps | W filters held (mean) | ‖∇‖ kept (mean) |",
             "|---|---:|---|---:|---:|---:|"]
    for name, (rows, err) in results.items():
        for phase in sorted({r["lr"] for r in rows}, reverse=True):
            sel = [r for r in rows if r["lr"] == phase]
            lines.append(f"| {name} | {err:.2f} | {phase:.4g} | {len(sel)} | "
                         f"{100 * statistics.fmean(r['held'] for r in sel):.1f} % | "
                         f"{100 * statistics.fmean(r['kept'] for r in sel):.1f} % |")
    (a.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pwsconv.train.checkpoint import atomic_save_figure

    fig, axes = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for name, (rows, err) in results.items():
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [100 * r["held"] for r in rows], label=f"{name} ({err:.2f} % error)", lw=1)
        axes[1].plot(steps, [100 * r["kept"] for r in rows], label=name, lw=1)
    axes[0].set_ylabel("W filters held at the bound (%)")
    axes[1].set_ylabel("‖clipped ∇W‖ / ‖∇W‖ (%)")
    axes[1].set_xlabel("step")
    lr_ax = axes[0].twinx()
    rows = results["round 10"][0]
    lr_ax.step([r["step"] for r in rows], [r["lr"] for r in rows], color="gray", ls="--", lw=0.8, where="post")
    lr_ax.set_yscale("log")
    lr_ax.set_ylabel("LR (dashed)")
    axes[0].legend(loc="center right")
    axes[0].set_title(f'gamma="auto", {a.net} net, LR {a.lr:g}: W\'s clip, round 9 vs round 10')
    fig.tight_layout()
    atomic_save_figure(fig, a.out / "clipping.png", dpi=110)
    plt.close(fig)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
