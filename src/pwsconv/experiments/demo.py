"""``pwsconv demo``: the paper's story in about a minute on CPU, on scikit-learn's bundled 8×8 digits (no download).

The same 10-layer plain CNN (``tiny_cnn``) is trained four ways — plain conv ("none", He init), BatchNorm, GroupNorm
and PWS — at a moderate and at a large learning rate (SGD momentum 0.9, weight decay 5e-4, batch 64, seed 0), and BN
and PWS are trained once more with batch size 2. The settings were chosen by measurement on this network
(5 seeds each; test accuracy after 15 epochs):

* LR 0.05: plain conv 96–98 %, PWS 95–99 %, BN 99 %. GN trains slowly here (its groups hold single channels of
  2×2 maps at this width; the paper also finds GN weak when layers have few channels).
* LR 0.2: plain conv collapses — the loss becomes NaN (2 of 5 seeds) or the network dies and stays at chance level
  (10 %) — while PWS (96–98 %), BN and GN train.
* LR 0.5: paper PWS (γ = 1e-3) collapses where BN still trains; ``gamma="auto"`` (γ relative to the
  He-init filter variance plus unit-wise gradient clipping inside the layer) trains there too. It runs at the two
  other LRs as well, to show the same switch at an ordinary LR.
* batch 2 (LR 0.005, 5 epochs): both train; BN's *training* loss stays higher, because it normalizes with the
  statistics of two images (its eval mode then uses the running averages), whereas PWS does not depend on the batch.

Everything is a sweep (:mod:`pwsconv.experiments.sweep`), so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import math
import os
import time
from typing import Callable

from ..config import TrainConfig
from .sweep import RunSpec, SweepRecord, plot_curves, results_table, run_sweep, write_results

__all__ = ["DEFAULT_OUT", "demo_runs", "run_demo", "verdict", "MODERATE_LR", "LARGE_LR", "VERY_LARGE_LR",
           "SMALL_BATCH_LR"]

DEFAULT_OUT = os.path.join("runs", "demo")
MODERATE_LR = 0.05
LARGE_LR = 0.2
VERY_LARGE_LR = 0.5
BATCH = 64
SMALL_BATCH = 2
SMALL_BATCH_LR = 0.005
EPOCHS = 15
METHODS = ("none", "bn", "gn", "pws")
METHOD_NAMES = {"none": "plain conv", "bn": "BN", "gn": "GN", "pws": "PWS", "pws_auto": 'PWS gamma="auto"'}


def demo_runs(epochs: int | None = None, *, quick: bool = False) -> list[RunSpec]:
    """The demo's run list: 4 methods and PWS ``gamma="auto"`` × {moderate, large} LR at batch 64; BN, PWS and PWS
    ``gamma="auto"`` at a very large LR; then BN and PWS at batch 2.

    ``epochs`` is for the batch-64 runs (default 15); the batch-2 runs get a third of it (they take 32× more steps
    per epoch). ``quick`` trains on 256 images and tests on 200, for a few seconds in all (for tests).
    """
    ep = epochs if epochs is not None else (2 if quick else EPOCHS)
    ep_small = max(1, round(ep / 3))
    base = TrainConfig(model="tiny_cnn", dataset="digits", batch_size=BATCH, epochs=ep, momentum=0.9,
                       weight_decay=5e-4, milestones=[], seed=0, num_threads=1, ckpt_every=500, log_every=10,
                       limit=256 if quick else None, test_limit=200 if quick else None)
    runs = []
    auto = base.replace(method="pws", method_opts={"gamma": "auto"})
    for lr, methods in ((MODERATE_LR, METHODS + ("pws_auto",)), (LARGE_LR, METHODS + ("pws_auto",)),
                        (VERY_LARGE_LR, ("bn", "pws", "pws_auto"))):
        for m in methods:
            cfg = auto if m == "pws_auto" else base.replace(method=m)
            runs.append(RunSpec(f"{m}_lr{lr:g}_b{BATCH}", cfg.replace(lr=lr),
                                {"method": METHOD_NAMES[m], "LR": lr, "batch": BATCH}))
    for m in ("bn", "pws"):
        runs.append(RunSpec(f"{m}_lr{SMALL_BATCH_LR:g}_b{SMALL_BATCH}",
                            base.replace(method=m, lr=SMALL_BATCH_LR, batch_size=SMALL_BATCH, epochs=ep_small,
                                         max_steps=40 if quick else None),
                            {"method": METHOD_NAMES[m], "LR": SMALL_BATCH_LR, "batch": SMALL_BATCH}))
    return runs


def verdict(rec: SweepRecord, num_classes: int = 10) -> str:
    """"collapsed (NaN)", "fails (chance level)" (test accuracy below twice chance) or "trains"."""
    acc = rec.result.metrics.get("test_acc", math.nan)
    if rec.result.status == "nan" or math.isnan(acc):
        return "collapsed (NaN)"
    if acc < 2.0 / num_classes:
        return "fails (chance level)"
    return "trains"


_QUICK_NOTE = ("**--quick: 256 training images and a few steps per run — a check that the demo runs, not a result "
               "(most runs stay near chance). Run `pwsconv demo` without --quick for the real comparison.**")

_NOTES = """\
Same network (`tiny_cnn`, 10 conv units) and seed for every row; SGD momentum 0.9, weight decay 5e-4 (α of PWS: 0),
constant LR; test accuracy on the held-out 20 % of scikit-learn's digits after the last epoch. **NaN** = the run
collapsed (non-finite loss or weights; the paper's tables report this as NaN); "chance level" = the network stopped
learning (≈10 %). Plain conv trains at the moderate LR but not at the large one (depending on the seed its loss
becomes NaN or the network dies at chance level), where BN, GN and PWS still train: PWS standardizes every filter
(zero mean, eq. 12), which removes the "shift of the average gradient" that inflates the plain network's variance.
At the very large LR paper PWS collapses too; `gamma="auto"` keeps the same forward (eq. 12, foldable) and clips
each filter's, α's and β's gradient relative to its own size inside the layer, which stops the runaway growth of the
first layers' α, β and gradients that precedes the collapse. It reads the LR from the optimizer once:
at an ordinary LR the clip leaves the steps alone, so the same switch is used at every LR. At batch size 2 PWS does not depend on the batch at all; BN normalizes with the statistics
of two images. Per-run curves: curves.png; per-epoch metrics: <run>/metrics.csv."""


def run_demo(out: str | os.PathLike = DEFAULT_OUT, *, epochs: int | None = None, quick: bool = False,
             progress: bool = False, log: Callable[[str], None] | None = print) -> list[SweepRecord]:
    """Run (or continue) the demo in ``out``, print its Markdown table and write results files and plots."""
    out = os.fspath(out)
    say = log or (lambda s: None)
    runs = demo_runs(epochs, quick=quick)
    say(f"pwsconv demo: {len(runs)} runs of tiny_cnn on digits → {out}" + (" (quick)" if quick else ""))
    t0 = time.perf_counter()
    records = run_sweep(runs, out, progress=progress, log=log)
    for r in records:
        r.spec.labels["verdict"] = verdict(r)
    columns = ["method", "LR", "batch"]
    table = results_table(records, columns + ["verdict"])
    title = "pwsconv demo: plain conv vs BN vs GN vs PWS on digits (tiny_cnn)"
    notes = (_QUICK_NOTE + "\n\n" + _NOTES) if quick else _NOTES
    paths = write_results(records, out, title=title, columns=columns + ["verdict"], notes=notes)

    def group(r: SweepRecord) -> str:
        return f"batch {r.spec.labels['batch']}, LR {r.spec.labels['LR']:g}"

    png = plot_curves(records, os.path.join(out, "curves.png"), group_by=group, line_by="method", title=title)
    say("")
    say(table)
    say("")
    if quick:
        say(_QUICK_NOTE)
    say(f"done in {time.perf_counter() - t0:.0f} s. Results: {paths['md']}, {paths['csv']}, {paths['jsonl']}; "
        f"curves: {png}; per-run files: {os.path.join(out, '<run>')}/")
    return records
