"""Exploration runs for gamma="auto" (results/robust_explore/README.md): plain ConvPool-C (w=0.125) on CIFAR-10, the collapse-scan cpu
setting (2000 train / 1000 test images, 4 epochs, LR x0.1 after 2 and 3, batch 128, SGD 0.9, wd 5e-4), 1 seed.
Usage: python benchmarks/robust_explore.py OUTDIR VARIANT:LR [VARIANT:LR ...]"""
import json, sys
from pwsconv.config import TrainConfig
from pwsconv.experiments.sweep import RunSpec, run_sweep, results_table

V = {
    "auto": ("pws", {"gamma": "auto"}),
    "auto_ln": ("pws", {"gamma": "auto"}),
    "pws_ln": ("pws", {"gamma": 1e-3}),
    "bn_ln": ("bn", {}),
    "auto_c04_ln": ("pws", {"gamma": "auto", "clip": 0.04}),
    "bn": ("bn", {}),
    "pws": ("pws", {"gamma": 1e-3}),
    "pws_equiv": ("pws", {"gamma": 1e-3, "equiv": True}),
    "pws_clip": ("pws", {"gamma": 1e-3, "clip": 0.04}),
    "pws_an": ("pws", {"gamma": 1e-3, "affine_norm": True}),
    "pws_an_equiv": ("pws", {"gamma": 1e-3, "affine_norm": True, "equiv": True}),
    "pws_an_clip": ("pws", {"gamma": 1e-3, "affine_norm": True, "clip": 0.04}),
    "pws_clipall": ("pws", {"gamma": 1e-3, "clip": 0.04, "clip_weight": True}),
    "pws_clipall01": ("pws", {"gamma": 1e-3, "clip": 0.01, "clip_weight": True}),
    "pws_clipall02": ("pws", {"gamma": 1e-3, "clip": 0.02, "clip_weight": True}),
    "pws_an_clipall02": ("pws", {"gamma": 1e-3, "affine_norm": True, "clip": 0.02, "clip_weight": True}),
    "pws_eq_clipall02": ("pws", {"gamma": 1e-3, "equiv": True, "clip": 0.02, "clip_weight": True}),
    "pws_an_clipall": ("pws", {"gamma": 1e-3, "affine_norm": True, "clip": 0.04, "clip_weight": True}),
    "pws_an_clipall01": ("pws", {"gamma": 1e-3, "affine_norm": True, "clip": 0.01, "clip_weight": True}),
}
model = sys.argv[3] if len(sys.argv) > 3 and not ":" in sys.argv[3] else None
out = sys.argv[1]
runs = []
for item in sys.argv[2:]:
    if ":" not in item:
        continue
    v, lr = item.split(":")
    arch = "plain"
    if v.startswith("res_"):
        arch, v = "residual", v[4:]
    method, opts = V[v]
    mname, mopts = ("convpool_cnn_c_small", {"width": 0.125}) if arch == "plain" else ("resnet_cifar_small", {"width": 0.5})
    if v.endswith("_ln"):   # LayerNorm after the first conv and before the global pooling
        mopts = {**mopts, "ln_io": True}
    cfg = dict(model=mname, model_opts=mopts, method=method, method_opts=opts, dataset="cifar10", limit=2000,
               test_limit=1000, epochs=4, milestones=[2, 3], lr=float(lr), batch_size=128, seed=0, num_threads=1,
               progress=False, ckpt_every=0)
    runs.append(RunSpec(f"{arch}_{v}_lr{lr}", TrainConfig.from_dict(cfg), {"arch": arch, "variant": v, "LR": float(lr)}))
recs = run_sweep(runs, out)
for r in recs:
    print(r.spec.name, r.result.status, {k: round(v, 3) for k, v in r.result.metrics.items()}, round(r.seconds, 1), flush=True)
