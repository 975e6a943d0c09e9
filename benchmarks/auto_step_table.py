"""Summarize a ``benchmarks/auto_step_screen.sh`` run against the medium preset's BN, paper PWS and round-3 auto
cells: test error % (mean ± std over the seeds present, ✗ = collapsed: NaN or within 2 points of chance) per net and
LR, written as Markdown and CSV.

    python benchmarks/auto_step_table.py results/auto_round4_step008 --label "round 4"
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from pathlib import Path

LRS = ("0.05", "0.1", "0.4", "1.6", "3.2")
CHANCE = 90.0   # CIFAR-10: 10 classes


def _err(run: Path) -> float | None:
    f = run / "result.json"
    if not f.is_file():
        return None
    acc = json.loads(f.read_text())["metrics"].get("test_acc")
    return float("nan") if acc is None or not math.isfinite(acc) else 100.0 * (1.0 - acc)


def _cell(errs: list[float]) -> str:
    if not errs:
        return "—"
    bad = sum(1 for e in errs if not math.isfinite(e) or e >= CHANCE - 2)
    ok = [e for e in errs if math.isfinite(e)]
    txt = "NaN" if not ok else (f"{ok[0]:.2f}" if len(ok) == 1 else f"{statistics.mean(ok):.2f} ± {statistics.stdev(ok):.2f}")
    return txt + (f" ✗{bad}/{len(errs)}" if bad else "") + ("" if len(errs) == 3 else f" ({len(errs)} seed{'s' * (len(errs) > 1)})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("screen", type=Path)
    p.add_argument("--base", type=Path, default=Path("results/reproduce/robust_medium_10k"))
    p.add_argument("--label", default="candidate")
    p.add_argument("--same-as-base-at", nargs="*", default=["3.2"],
                   help="LRs where the candidate's λ_W equals round 3's (the base's auto runs are its runs)")
    a = p.parse_args(argv)
    rows, md = [], ["| net | method | " + " | ".join(f"LR {lr}" for lr in LRS) + " |",
                    "|---|---|" + "---:|" * len(LRS)]
    for net in ("residual", "plain"):
        for label, pattern in (("BN", "lr_{net}_bn_lr{lr}_s{s}"), ("paper PWS", "lr_{net}_pws_lr{lr}_s{s}"),
                               ("auto, round 3", "lr_{net}_pws_auto_lr{lr}_s{s}"), (a.label, None)):
            cells = []
            for lr in LRS:
                if pattern is None:
                    runs = [a.base / f"lr_{net}_pws_auto_lr{lr}_s{s}" if lr in a.same_as_base_at
                            else a.screen / f"{net}_lr{lr}_s{s}" for s in range(3)]
                else:
                    runs = [a.base / pattern.format(net=net, lr=lr, s=s) for s in range(3)]
                errs = [e for e in map(_err, runs) if e is not None]
                cells.append(_cell(errs))
                rows.append({"net": net, "method": label, "lr": lr, "errors": ";".join(f"{e:.2f}" for e in errs)})
            md.append(f"| {net} | {label} | " + " | ".join(cells) + " |")
    (a.screen / "summary.md").write_text("Test error %, mean ± std over seeds 0–2 (✗k/n: k of n seeds collapsed)."
                                         f" LR {', '.join(a.same_as_base_at)}: the candidate's λ_W is round 3's, so"
                                         " its runs are round 3's.\n\n" + "\n".join(md) + "\n")
    with open(a.screen / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["net", "method", "lr", "errors"])
        w.writeheader()
        w.writerows(rows)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
