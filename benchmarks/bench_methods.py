"""Speed and memory of every normalization method, side by side, as ratios to plain conv ("none").

Measures in one process, same model and input, medians over repeats (interleaved round-robin so that drifts in
machine load hit every method alike):

* ``train``: one training step (forward + backward + SGD step) per method, model and batch size, as the training
  engine takes it (PWS layers standardized in one node by ``fuse_standardization``; "pws (unfused)" is the
  per-layer path, "pws (recompute)" the memory-saving variant that rebuilds α·Ŵ in backward);
* ``infer``: inference for plain conv, PWS eval (cached α·Ŵ), PWS folded, BN unfused and BN fused into the conv, GN, SN;
* ``fold``: plain conv, PWS eval (cached) and PWS folded alone (the precise check of the inference targets);
* ``memory``: peak training memory: on CUDA ``max_memory_allocated``; on CPU the bytes of the tensors autograd saves
  for backward (activation memory, the part that differs between methods) plus parameters, gradients and momentum;
* ``probe``: the overhead of the diagnostics probe attached to a training step;
* ``scaling``: PWS's and BN's overhead over plain conv as the batch grows (standardization is O(weights),
  BN is O(activations));
* ``floor``: the native kernels of eq. 12 alone (forward and backward for every PWS layer, no autograd), next to
  the plain-conv and PWS steps: the least any per-step standardization can cost on this machine.

Usage::

    python benchmarks/bench_methods.py --suite all --out results/benchmarks/all   # writes results.json / results.md
    python benchmarks/bench_methods.py --suite train --models resnet_cifar_small --batch-sizes 2 32 128
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import pwsconv
from pwsconv.experiments.speed import timed_interleaved, train_step_fn
from pwsconv.models import build_model

DEFAULT_METHODS = ["none", "bn", "gn", "in", "ln", "sn", "wn", "ws", "sws", "mabn", "pws"]


def _methods(requested: list[str]) -> list[str]:
    known = set(pwsconv.available_methods())
    missing = [m for m in requested if m not in known]
    if missing:
        print(f"# skipping methods not in the registry: {missing}", file=sys.stderr)
    return [m for m in requested if m in known]


def _build(model: str, method: str, batch: int, device: torch.device, in_ch: int = 3) -> nn.Module:
    opts = {}
    if method == "mabn":
        opts = {"batch_size": batch, "real_batch_size": batch}
    try:
        net = build_model(model, method=method, num_classes=10, in_channels=in_ch, **opts)
    except (TypeError, ValueError):
        net = build_model(model, method=method, num_classes=10, in_channels=in_ch)
    return net.to(device)


def _train_step_fn(net: nn.Module, x: torch.Tensor, y: torch.Tensor, extra: Callable | None = None,
                   fuse: bool = True, recompute: bool = False):
    return train_step_fn(net, x, y, lr=1e-3, extra=extra, fuse=fuse, recompute=recompute)


def bench_train(models, methods, batch_sizes, image, device, repeats, warmup, unfused=True) -> list[dict]:
    rows = []
    for model in models:
        for b in batch_sizes:
            x = torch.randn(b, 3, image, image, device=device)
            y = torch.randint(0, 10, (b,), device=device)
            fns = {}
            for m in methods:
                torch.manual_seed(0)
                if m == "bn" and b == 1:
                    continue
                fns[m] = _train_step_fn(_build(model, m, b, device), x, y)
                if m == "pws" and unfused:
                    torch.manual_seed(0)   # the per-layer path, for before/after
                    fns["pws (unfused)"] = _train_step_fn(_build(model, m, b, device), x, y, fuse=False)
                    torch.manual_seed(0)   # the memory-saving variant: α·Ŵ rebuilt in backward
                    fns["pws (recompute)"] = _train_step_fn(_build(model, m, b, device), x, y, recompute=True)
            t = timed_interleaved(fns, device, repeats, warmup)
            for m, s in t.items():
                rows.append(dict(suite="train", model=model, batch=b, method=m, ms=s * 1e3,
                                 images_per_s=b / s, ratio=s / t["none"]))
            print(_fmt_line(rows[-len(t):]), flush=True)
    return rows


def _fuse_bn(model: nn.Module) -> nn.Module:
    """Every eval BatchNorm merged into the conv that feeds it: :func:`pwsconv.fold` on an eval copy."""
    import pwsconv

    return pwsconv.fold(copy.deepcopy(model).eval())


def _time_inference(nets: dict, x: torch.Tensor, suite: str, model: str, device, repeats: int,
                    warmup: int) -> list[dict]:
    """Interleaved inference-mode timing of ``nets`` on ``x``; one row per net, ratios to ``nets["none"]``."""
    def mk(n):
        def f():
            with torch.inference_mode():
                n(x)
        return f

    t = timed_interleaved({k: mk(n) for k, n in nets.items()}, device, repeats, warmup)
    b = x.shape[0]
    rows = [dict(suite=suite, model=model, batch=b, method=k, ms=s * 1e3, images_per_s=b / s, ratio=s / t["none"])
            for k, s in t.items()]
    print(_fmt_line(rows), flush=True)
    return rows


def bench_infer(models, batch_sizes, image, device, repeats, warmup) -> list[dict]:
    rows = []
    for model in models:
        for b in batch_sizes:
            x = torch.randn(b, 3, image, image, device=device)
            torch.manual_seed(0)
            nets = {
                "none": _build(model, "none", b, device).eval(),
                "pws (eval, cached)": _build(model, "pws", b, device).eval(),
                "bn (unfused)": _build(model, "bn", b, device).eval(),
                "gn": _build(model, "gn", b, device).eval(),
            }
            if "sn" in pwsconv.available_methods():
                nets["sn"] = _build(model, "sn", b, device).eval()
            nets["pws (folded)"] = pwsconv.fold(nets["pws (eval, cached)"])
            nets["bn (fused)"] = _fuse_bn(nets["bn (unfused)"])
            rows += _time_inference(nets, x, "infer", model, device, repeats, warmup)
    return rows


def bench_fold(models, batch_sizes, image, device, repeats, warmup) -> list[dict]:
    """Folded / cached PWS against plain conv alone (no heavy methods in the rotation that could skew the caches)."""
    rows = []
    for model in models:
        for b in batch_sizes:
            x = torch.randn(b, 3, image, image, device=device)
            torch.manual_seed(0)
            pws = _build(model, "pws", b, device).eval()
            nets = {"none": _build(model, "none", b, device).eval(), "pws (eval, cached)": pws,
                    "pws (folded)": pwsconv.fold(pws)}
            rows += _time_inference(nets, x, "fold", model, device, repeats, warmup)
    return rows


def _saved_bytes(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes autograd keeps for backward in one training step (unique storages)."""
    seen: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in params:
            seen[ptr] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = nn.functional.cross_entropy(net(x), y)
    loss.backward()
    return sum(seen.values())


def bench_memory(models, methods, batch_sizes, image, device) -> list[dict]:
    rows = []
    for model in models:
        for b in batch_sizes:
            x = torch.randn(b, 3, image, image, device=device)
            y = torch.randint(0, 10, (b,), device=device)
            res = {}
            for m in methods + (["pws (recompute)"] if "pws" in methods else []):
                if m == "bn" and b == 1:
                    continue
                torch.manual_seed(0)
                net = _build(model, m.split(" ")[0], b, device).train()
                # as the engine trains (PWS models only); the variant rebuilds α·Ŵ in backward
                if any(isinstance(x, pwsconv.PWSMixin) for x in net.modules()):
                    pwsconv.fuse_standardization(net, recompute=m == "pws (recompute)")
                state = sum(p.numel() * p.element_size() for p in net.parameters()) * 3  # params + grads + momentum
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    _train_step_fn(net, x, y)()
                    peak = torch.cuda.max_memory_allocated() - base + state
                else:
                    try:
                        peak = _saved_bytes(net, x, y) + state
                    except (ValueError, RuntimeError) as e:   # e.g. IN on 1×1 maps: not applicable to this net
                        print(f"# {m} skipped on {model} b={b}: {str(e).splitlines()[0]}", file=sys.stderr)
                        continue
                res[m] = peak
            for m, v in res.items():
                rows.append(dict(suite="memory", model=model, batch=b, method=m, mib=v / 2**20,
                                 ratio=v / res["none"], ratio_to_bn=v / res["bn"] if "bn" in res else None))
            print("  ".join(f"{m}={v / 2**20:.1f}MiB" for m, v in res.items()), f"[{model} b={b}]", flush=True)
    return rows


def bench_floor(models, batch_sizes, image, device, repeats, warmup) -> list[dict]:
    """The least any per-step standardization can cost: only the native kernels of eq. 12 for every PWS layer of the
    model (layer-norm forward + α multiply, batch-norm closed-form backward; no autograd, no Python between
    layers beyond a loop), timed interleaved with the plain-conv and the PWS training step."""
    from pwsconv.layers.pws import PWSMixin

    bn_backward = torch.ops.aten.native_batch_norm_backward.default
    rows = []
    for model in models:
        for b in batch_sizes:
            x = torch.randn(b, 3, image, image, device=device)
            y = torch.randint(0, 10, (b,), device=device)
            torch.manual_seed(0)
            pws = _build(model, "pws", b, device)
            layers = [m for m in pws.modules() if isinstance(m, PWSMixin)]
            ws = [m.weight.detach().view(m.weight.shape[0], -1) for m in layers]
            grads = [torch.randn_like(w) for w in ws]
            scales = [(m.alpha.detach() * m.gain) if m.alpha is not None else None for m in layers]

            def kernels() -> None:
                for w, g, s, m in zip(ws, grads, scales, layers):
                    r, n = w.shape
                    out, mean, rstd = torch.native_layer_norm(w, (n,), None, None, m.effective_gamma)
                    if s is not None:
                        out.mul_(s.view(r, 1))
                    bn_backward(g.view(1, r, n), w.view(1, r, n), s, None, None, mean.view(r), rstd.view(r), True,
                                m.effective_gamma, [True, s is not None, False])

            torch.manual_seed(0)
            fns = {"none": _train_step_fn(_build(model, "none", b, device), x, y),
                   "pws": _train_step_fn(pws, x, y), "eq. 12 kernels only": kernels}
            t = timed_interleaved(fns, device, repeats, warmup)
            rows += [dict(suite="floor", model=model, batch=b, method=k, ms=v * 1e3, ratio=v / t["none"])
                     for k, v in t.items()]
            print(_fmt_line(rows[-3:]), flush=True)
    return rows


def bench_probe(models, batch_sizes, image, device, repeats, warmup) -> list[dict]:
    from pwsconv.diagnostics import VarianceProbe

    rows = []
    for model in models:
        for b in batch_sizes:
            x = torch.randn(b, 3, image, image, device=device)
            y = torch.randint(0, 10, (b,), device=device)
            torch.manual_seed(0)
            plain = _build(model, "pws", b, device)
            probed = copy.deepcopy(plain)
            probe = VarianceProbe(probed, lr=1e-3)
            probe.attach()
            step_idx = [0]

            def record() -> None:
                probe.step(step_idx[0])
                step_idx[0] += 1

            t = timed_interleaved({"pws": _train_step_fn(plain, x, y),
                                   "pws + probe": _train_step_fn(probed, x, y, record)}, device, repeats, warmup)
            probe.detach()
            for k, s in t.items():
                rows.append(dict(suite="probe", model=model, batch=b, method=k, ms=s * 1e3, ratio=s / t["pws"]))
            print(_fmt_line(rows[-2:]), flush=True)
    return rows


def _fmt_line(rows: list[dict]) -> str:
    r0 = rows[0]
    return f"[{r0['suite']} {r0['model']} b={r0['batch']}] " + "  ".join(
        f"{r['method']}={r['ms']:.1f}ms(x{r['ratio']:.3f})" for r in rows)


def to_markdown(rows: list[dict]) -> str:
    out = []
    for suite in dict.fromkeys(r["suite"] for r in rows):
        rs = [r for r in rows if r["suite"] == suite]
        methods = list(dict.fromkeys(r["method"] for r in rs))
        keys = list(dict.fromkeys((r["model"], r["batch"]) for r in rs))
        unit = "MiB" if suite == "memory" else "ms"
        out.append(f"\n### {suite} ({unit}, ratio to plain conv)\n")
        out.append("| model | batch | " + " | ".join(methods) + " |")
        out.append("|---|---:|" + "---:|" * len(methods))
        for model, b in keys:
            cells = []
            for m in methods:
                r = next((r for r in rs if r["model"] == model and r["batch"] == b and r["method"] == m), None)
                if r is None:
                    cells.append("—")
                elif suite == "memory":
                    cells.append(f"{r['mib']:.1f} (×{r['ratio']:.2f})")
                else:
                    cells.append(f"{r['ms']:.2f} (×{r['ratio']:.3f})")
            out.append(f"| {model} | {b} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def machine() -> dict:
    info = dict(python=platform.python_version(), torch=torch.__version__, pwsconv=pwsconv.__version__,
                cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                cores=os.cpu_count())
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", nargs="+", default=["all"],
                   choices=["all", "train", "infer", "fold", "memory", "probe", "scaling", "floor"])
    p.add_argument("--models", nargs="+", default=["resnet_cifar_small", "convpool_cnn_c_small"])
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[2, 32, 128])
    p.add_argument("--image", type=int, default=32)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="results/benchmarks/latest")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    suites = {"train", "infer", "fold", "memory", "probe", "scaling", "floor"} if "all" in a.suite else set(a.suite)
    methods = _methods(a.methods)
    if "none" not in methods:
        methods.insert(0, "none")
    torch.backends.cudnn.benchmark = True
    rows: list[dict] = []
    t0 = time.time()
    if "train" in suites:
        rows += bench_train(a.models, methods, a.batch_sizes, a.image, device, a.repeats, a.warmup)
    if "scaling" in suites:
        sc = bench_train(a.models[:1], ["none", "bn", "pws"], [1, 2, 4, 8, 16, 32, 64, 128], a.image, device,
                         a.repeats, a.warmup, unfused=False)
        for r in sc:
            r["suite"] = "scaling"
        rows += sc
    if "infer" in suites:
        rows += bench_infer(a.models, a.batch_sizes, a.image, device, a.repeats, a.warmup)
    if "fold" in suites:
        rows += bench_fold(a.models, a.batch_sizes, a.image, device, a.repeats, a.warmup)
    if "memory" in suites:
        rows += bench_memory(a.models, methods, a.batch_sizes, a.image, device)
    if "floor" in suites:
        rows += bench_floor(a.models, a.batch_sizes, a.image, device, a.repeats, a.warmup)
    if "probe" in suites:
        rows += bench_probe(a.models[:1], a.batch_sizes[-1:], a.image, device, a.repeats, a.warmup)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(machine=machine(), command="python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])),
                wall_s=time.time() - t0, date=time.strftime("%Y-%m-%d %H:%M:%S"))
    (out / "results.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    md = f"Machine: {json.dumps(meta['machine'])}\n\nCommand: `{meta['command']}` ({meta['wall_s']:.0f} s)\n" + to_markdown(rows)
    (out / "results.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
