"""What blows up first at a collapsing LR? Reads the probe records written by

    pwsconv probe --model convpool_cnn_c_small --dataset cifar10 --methods bn pws pws:gamma=auto \
        --lr LR --steps 45 --batch-size 128 --out results/mechanism/lrLR          (LR = 0.4 and 1.6)

and writes results/mechanism/mechanism.png (the committed records are trimmed to the statistics used here and
gzipped: records.csv.gz) (per step: loss, logit scale, and per conv layer α, |β|, Var[Y_l],
max 1/sqrt(Var[W_o]+γ), ‖∇W‖, ‖∇α‖, ‖∇β‖) and mechanism.md (for each quantity, the first step at which it exceeds
10× its step-0 value, per method and LR).

Usage: python benchmarks/mechanism_analyze.py [DIR]   (DIR: default results/mechanism; it reads DIR/lrLR/ and writes
DIR/mechanism.png and DIR/mechanism.md)"""
import csv, gzip, math, os, sys
from collections import defaultdict

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

HERE = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "results",
                                                           "mechanism")
LRS = ("0.4", "1.6")
LAYER_STATS = [("alpha_absmax", "max |α|"), ("bias_absmax", "max |β|"), ("y_var", "Var[Y_l]"),
               ("inv_std_max", "max 1/sqrt(Var[W_o]+γ)"), ("grad_norm", "‖∇W‖"), ("alpha_grad_norm", "‖∇α‖"),
               ("bias_grad_norm", "‖∇β‖")]
MODEL_STATS = [("loss", "loss"), ("logit_std", "logit std")]


def load(lr):
    data = defaultdict(lambda: defaultdict(dict))   # method -> (layer, stat) -> step -> value
    path = os.path.join(HERE, f"lr{lr}", "records.csv")
    # committed: the statistics used here, gzipped (records.csv.gz); a fresh probe run writes records.csv
    f = open(path) if os.path.exists(path) else gzip.open(path + ".gz", "rt")
    for r in csv.DictReader(f):
        v = float(r["value"]) if r["value"] not in ("", "nan") else math.nan
        data[r["method"]][(r["layer"], r["stat"])][int(r["step"])] = v
    return data


def first_blowup(series, factor=10.0):
    steps = sorted(series)
    if not steps:
        return None
    nonzero = [abs(series[s]) for s in steps if math.isfinite(series[s]) and series[s] != 0]
    v0 = nonzero[0] if nonzero else 0.0      # β starts at 0: its first non-zero value is the baseline
    for s in steps:
        v = series[s]
        if not math.isfinite(v) or (v0 > 0 and abs(v) > factor * v0):
            return s
    return None


def main():
    all_data = {lr: load(lr) for lr in LRS}
    methods = list(next(iter(all_data.values())))
    conv_layers = sorted({l for d in all_data.values() for m in d.values() for (l, s) in m if s == "y_var"
                          and l != "fc"}, key=lambda l: (len(l), l))
    show = [conv_layers[0], conv_layers[len(conv_layers) // 2], conv_layers[-1]]
    stats = MODEL_STATS + LAYER_STATS
    fig, axes = plt.subplots(len(stats), len(LRS) * len(methods), figsize=(3.2 * len(LRS) * len(methods), 2.0 * len(stats)),
                             squeeze=False, sharex=True)
    for j, (lr, m) in enumerate([(lr, m) for lr in LRS for m in methods]):
        d = all_data[lr].get(m, {})
        for i, (st, label) in enumerate(stats):
            ax = axes[i][j]
            layers = ["(model)"] if (st, label) in MODEL_STATS else show
            for l in layers:
                ser = d.get((l, st), {})
                if ser:
                    xs = sorted(ser)
                    ax.plot(xs, [abs(ser[x]) if math.isfinite(ser[x]) else math.nan for x in xs], label=l)
            ax.set_yscale("log")
            if i == 0:
                ax.set_title(f"{m}, LR {lr}", fontsize=8)
            if j == 0:
                ax.set_ylabel(label, fontsize=7)
            ax.tick_params(labelsize=6)
            if i == len(MODEL_STATS) and j == 0:
                ax.legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "mechanism.png"), dpi=90)
    lines = ["# What blows up first (probe records, ConvPool-C width 0.25, CIFAR-10, batch 128, SGD 0.9, wd 5e-4)", "",
             "First step at which a quantity exceeds 10× its step-0 value (its first non-zero value for β, which starts at 0) or becomes non-finite; '—' = never in "
             "45 steps. Layer quantities: the earliest over all conv layers, with the layer.", ""]
    head = ["quantity"] + [f"{m} @ LR {lr}" for lr in LRS for m in methods]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for st, label in stats:
        row = [label]
        for lr in LRS:
            for m in methods:
                d = all_data[lr].get(m, {})
                best = None
                for (l, s), ser in d.items():
                    if s != st or (st not in dict(MODEL_STATS) and l == "fc"):
                        continue
                    f = first_blowup(ser)
                    if f is not None and (best is None or f < best[0]):
                        best = (f, l)
                row.append("—" if best is None else (f"{best[0]}" if best[1] == "(model)" else f"{best[0]} ({best[1]})"))
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Largest finite value over the run (model quantities) or over steps and conv layers (layer quantities):",
              "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for st, label in stats:
        row = [label]
        for lr in LRS:
            for m in methods:
                vals = [abs(v) for (l, s_), ser in all_data[lr].get(m, {}).items() if s_ == st and l != "fc"
                        for v in ser.values() if math.isfinite(v)]
                row.append(f"{max(vals):.3g}" if vals else "—")
        lines.append("| " + " | ".join(row) + " |")
    nan = []
    for lr in LRS:
        for m in methods:
            ser = all_data[lr][m].get(("(model)", "loss"), {})
            bad = [s for s, v in sorted(ser.items()) if not math.isfinite(v)]
            nan.append(f"- {m} @ LR {lr}: " + (f"loss non-finite at step {bad[0]}" if bad else
                                                f"finite for {len(ser)} steps, last loss {ser[max(ser)]:.3g}"))
    lines += ["", *nan, ""]
    open(os.path.join(HERE, "mechanism.md"), "w").write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
