"""The GPU benchmark in one prepared call that fits a hard wall-clock budget (``benchmarks/gpu.sh`` runs it).

Phases, each with its own time cap, results written after every phase (and every few seconds of timing) to
``<out>/gpu_bench.json`` and ``<out>/gpu_bench.md``:

1. **build + warm** every case (models built, moved, prepared as the engine prepares them, a few warm-up steps so
   cudnn's autotuning is done) — capped: cases not built when the cap is reached are listed as skipped;
2. **interleaved rounds** until the rounds cap: each round takes one timed sample of every case of every group, the
   order inside a group rotated every round (``pwsconv.experiments.speed.interleaved_samples``), so drifts in clocks
   and load hit every case of a group alike; medians and quartiles are reported;
3. **engine**: one ``pwsconv train`` run (CIFAR-10 ResNet-20, bf16 + channels_last, 2 epochs) in a subprocess, the
   per-epoch times read from its metrics; then 4 such runs at once (one epoch each: runs sharing the device, as
   ``reproduce --jobs 4``); then ``reproduce table4 --full --dry-run``'s estimate (throughput measured on the device).
   Skipped with a note when the CIFAR-10 files are not found (``--data-root``, ``$PWSCONV_DATA``);
4. **compile** (last, skippable): ``torch.compile`` of BN and PWS ResNet-50 training steps, compile seconds and
   interleaved step times — only started when its estimated cost still fits.

Groups (ResNet-50 = torchvision's, 224², batch 64; one training step = forward, backward, SGD):

* ``train fp32`` and ``train bf16+CL`` (bf16 autocast + channels_last): plain conv, BN, GN, PWS (per layer), PWS fused
  (as the engine runs it: ``pwsconv.methods.prepare_for_training``), ``gamma="auto"`` fused, timm ScaledStdConv2d;
* ``infer bf16+CL``: BN, BN folded into the convs, PWS folded, PWS with the eval cache;
* ``table1``: the paper's Table 1 speed column — SSD-VGG16 at 320², batch 8, fp32, training img/s per method with the
  ratio to BN, next to the paper's 2080 Ti FPS.

torchvision / timm missing: their cases are skipped with a note. ``--dry`` runs everything on the CPU with tiny sizes
in seconds (the test suite runs it).

    python benchmarks/gpu_bench.py --out results/benchmarks/gpu            # on a GPU machine (budget 480 s)
    python benchmarks/gpu_bench.py --dry --out /tmp/gpu_dry                # CPU, tiny, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import pwsconv
from pwsconv.experiments.speed import interleaved_samples, train_step_fn
from pwsconv.models import build_model

#: the ResNet-50 training cases: label → (method, method options, prepare: fused?)
TRAIN_CASES = {
    "plain conv": ("none", {}, True),
    "BN": ("bn", {}, True),
    "GN": ("gn", {}, True),
    "PWS": ("pws", {}, False),
    "PWS fused": ("pws", {}, True),
    "auto fused": ("pws", {"gamma": "auto"}, True),
    "timm ScaledStdConv2d": ("timm", {}, True),
}
#: Table 1's methods in the paper's order, plus PWS per layer (the engine runs PWS fused)
TABLE1_CASES = {"IN": ("in", True), "BN": ("bn", True), "GN": ("gn", True), "SN": ("sn", True), "WN": ("wn", True),
                "PWS": ("pws", True), "PWS (per layer)": ("pws", False)}
INFER_CASES = ("BN", "BN folded", "PWS folded", "PWS (eval cache)")
#: build order when the build cap bites: every group's BN first, then its PWS as the engine runs it, then the
#: other references, then the rest (tiers across groups; each group keeps its own order inside a tier)
BUILD_TIERS = ({"BN"}, {"PWS fused", "PWS folded"}, {"plain conv", "BN folded", "PWS"})


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:300]}"


@dataclass
class Case:
    group: str
    name: str
    make: Callable[[], Callable[[], None]]
    images: int
    fn: Callable[[], None] | None = None
    error: str | None = None
    build_s: float = 0.0
    samples: list[float] = field(default_factory=list)

    def guarded(self) -> Callable[[], None]:
        def call() -> None:
            if self.error is None and self.fn is not None:
                try:
                    self.fn()
                except Exception as e:   # one failing case must not end the one-shot run
                    self.error = "timing: " + _one_line(e)
                    _free()
        return call

    def stats(self) -> dict[str, Any] | None:
        if self.error is not None or not self.samples:
            return None
        s = sorted(self.samples)
        q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0]] * 3
        med = statistics.median(s)
        return {"ms": med * 1e3, "q1_ms": q[0] * 1e3, "q3_ms": q[2] * 1e3, "n": len(s),
                "images_per_s": self.images / med}


def _free() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Bench:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.device = torch.device(a.device)
        self.out = Path(a.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.started = a.started_at if a.started_at else time.time()
        self.deadline = self.started + a.budget - a.reserve        # wall-clock (time.time) end of all work
        self.cases: list[Case] = []
        self.notes: list[str] = []
        self.phases: dict[str, dict[str, Any]] = {}
        self.engine: dict[str, Any] = {}
        self.compiled: dict[str, Any] = {}
        self._last_write = 0.0

    # ------------------------------------------------------------------ time
    def left(self) -> float:
        return self.deadline - time.time()

    def phase(self, name: str, cap: float) -> float:
        """The wall-clock end of phase ``name``: ``cap`` seconds from now, never past the overall deadline."""
        end = min(time.time() + max(cap, 0.0), self.deadline)
        self.phases[name] = {"cap_s": round(cap, 1), "started_s": round(time.time() - self.started, 1)}
        return end

    def phase_done(self, name: str) -> None:
        p = self.phases[name]
        p["took_s"] = round(time.time() - self.started - p["started_s"], 1)

    # ------------------------------------------------------------------ cases
    def _x(self, batch: int, image: int, cl: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, 3, image, image, generator=g).to(self.device)
        y = torch.randint(0, self.a.classes, (batch,), generator=g).to(self.device)
        return (x.contiguous(memory_format=torch.channels_last) if cl else x), y

    def _resnet(self, method: str, opts: dict[str, Any]) -> nn.Module:
        torch.manual_seed(0)
        if method == "timm":
            return _timm_std_conv(build_model(self.a.model, "none", num_classes=self.a.classes))
        return build_model(self.a.model, method, num_classes=self.a.classes, method_opts=dict(opts))

    def add_train(self, bf16: bool) -> None:
        group = "train bf16+CL" if bf16 else "train fp32"
        for label, (method, opts, fuse) in TRAIN_CASES.items():
            def make(method=method, opts=opts, fuse=fuse, label=label) -> Callable[[], None]:
                net = self._resnet(method, opts).to(self.device)
                if bf16:
                    net = net.to(memory_format=torch.channels_last)
                x, y = self._x(self.a.batch, self.a.image, bf16)
                if fuse and method == "pws":
                    self._note_fusion(net, f"{group} / {label}")
                return train_step_fn(net, x, y, lr=1e-3, fuse=fuse, amp=torch.bfloat16 if bf16 else None)
            self.cases.append(Case(group, label, make, self.a.batch))

    def _note_fusion(self, net: nn.Module, where: str) -> None:
        """A note when layers of a model prepared for the fused node would still standardize one by one (e.g. weights
        in channels_last layout, which the fused node does not take)."""
        from pwsconv.layers.pws import PWSMixin

        layers = [m for m in net.modules() if isinstance(m, PWSMixin)]
        alone = sum(m.fused_args() is None for m in layers)
        if alone:
            self.notes.append(f"{where}: {alone} of {len(layers)} PWS layers are not fusable here (fused_args() is "
                              f"None: e.g. a channels_last weight) and standardize per layer")

    def add_infer(self) -> None:
        def make(label: str) -> Callable[[], Callable[[], None]]:
            def build() -> Callable[[], None]:
                net = self._resnet("bn" if label.startswith("BN") else "pws", {}).eval()
                if label.endswith("folded"):
                    net = pwsconv.fold(net)
                net = net.to(self.device).to(memory_format=torch.channels_last)
                x, _ = self._x(self.a.batch, self.a.image, True)

                def f() -> None:
                    with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16):
                        net(x)
                return f
            return build

        for label in INFER_CASES:
            self.cases.append(Case("infer bf16+CL", label, make(label), self.a.batch))

    def add_table1(self) -> None:
        from pwsconv.detection.models import build_detector

        b, size = self.a.det_batch, self.a.det_size
        for label, (method, fuse) in TABLE1_CASES.items():
            def make(method=method, fuse=fuse) -> Callable[[], None]:
                torch.manual_seed(0)
                net = build_detector(self.a.detector, method, num_classes=21, size=size).to(self.device)
                images, targets = _det_batch(b, size, self.device)
                return train_step_fn(net, images, targets, lr=1e-3, fuse=fuse, loss_fn=_det_loss)
            self.cases.append(Case("table1", label, make, b))

    def build_all(self, end: float) -> None:
        def tier(c: Case) -> int:
            if c.group == "table1" and c.name == "PWS":   # Table 1's "PWS" is the engine's (fused)
                return 1
            return next((i for i, t in enumerate(BUILD_TIERS) if c.name in t), len(BUILD_TIERS))

        for c in sorted(self.cases, key=tier):   # stable: each group keeps its order within a tier
            if time.time() > end:
                c.error = "skipped: build budget spent"
                continue
            t0 = time.time()
            try:
                c.fn = c.make()
                for _ in range(self.a.warmup):
                    c.fn()
                _sync(self.device)
            except Exception as e:
                c.error = "build: " + _one_line(e)
                c.fn = None
                _free()
            c.build_s = time.time() - t0
            print(f"  built {c.group} / {c.name} in {c.build_s:.1f} s" + (f" — {c.error}" if c.error else ""),
                  flush=True)
        self.write()

    def rounds(self, end: float) -> None:
        groups: dict[str, list[Case]] = {}
        for c in self.cases:
            if c.error is None and c.fn is not None:
                groups.setdefault(c.group, []).append(c)
        r = 0
        while time.time() < end and r < self.a.max_rounds and groups:
            for g, cs in groups.items():
                fns = {c.name: c.guarded() for c in cs if c.error is None}
                inner = self.a.infer_inner if g.startswith("infer") else 1
                got = interleaved_samples(fns, self.device, rounds=1, inner=inner, first_round=r)
                for c in cs:
                    if c.error is None and c.name in got:
                        c.samples += got[c.name]
            r += 1
            if time.time() - self._last_write > 15:
                self.write()
        self.phases["rounds"]["rounds"] = r
        self.write()

    # ------------------------------------------------------------------ engine: pwsconv train, 2 epochs
    def engine_run(self, end: float) -> None:
        a = self.a
        root: Path | None = None
        if a.engine_dataset != "digits":   # digits ships with scikit-learn
            try:
                from pwsconv.data import find_data_root

                root = find_data_root(a.engine_dataset, a.data_root)
            except (ValueError, OSError) as e:
                self.engine = {"skipped": f"no {a.engine_dataset} data: {_one_line(e)}"}
                self.notes.append(f"engine phase skipped: {a.engine_dataset} files not found (pass --data-root)")
                return
        args = [*(["--data-root", str(root)] if root else []), "--epochs", str(a.engine_epochs)]
        self.engine = {"data_root": str(root)}
        self.engine.update(self._train_procs("engine_run", 1, args, end - time.time() - (20 if a.estimate else 0)))
        self.engine["command"] = self.engine.pop("commands")[0]
        self.engine["epochs"] = self.engine.pop("runs")[0]
        self.write()
        # several runs sharing the device (`reproduce --jobs N`): one epoch each, all started at once
        if a.engine_jobs > 1 and time.time() + 30 + (20 if a.estimate else 0) < end:
            shared = self._train_procs("engine_jobs", a.engine_jobs, [*args[:-1], "1"],
                                       end - time.time() - (20 if a.estimate else 0))
            self.engine["jobs"] = {"n": a.engine_jobs, "wall_s": shared["wall_s"], "rc": shared["rc"],
                                   "epoch_time_s": [r[0]["epoch_time_s"] if r else None for r in shared["runs"]],
                                   **({"stderr": shared["stderr"]} if "stderr" in shared else {})}
            self.write()
        # `pwsconv reproduce table4 --full --dry-run`: the paper's grid estimated from throughput measured here
        if a.estimate and time.time() + 10 < end:
            from pwsconv.experiments.paper import reproduce

            t0 = time.time()
            try:
                info = reproduce(a.estimate, a.estimate_preset, dry_run=True, log=None, measure=True)
                self.engine["estimate"] = {"table": a.estimate, "preset": a.estimate_preset, "runs": info["n_runs"],
                                           "seconds": info["estimated_seconds"], "took_s": round(time.time() - t0, 1),
                                           "rates": info.get("measured_rates", {})}
            except Exception as e:
                self.engine["estimate"] = {"table": a.estimate, "error": _one_line(e)}
                _free()
            self.write()

    def _train_procs(self, name: str, n: int, args: list[str], timeout: float) -> dict[str, Any]:
        """``n`` ``pwsconv train`` processes at once (seeds 0..n-1, ``<out>/<name>/<k>``); their wall time, exit codes
        and per-epoch rows."""
        import shutil

        a = self.a
        base = self.out / name
        shutil.rmtree(base, ignore_errors=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(Path(pwsconv.__file__).parents[1])] + [v for v in [os.environ.get("PYTHONPATH")] if v])}
        cmds = [[sys.executable, "-m", "pwsconv", "train", "--model", a.engine_model, "--dataset", a.engine_dataset,
                 *args, "--seed", str(k), "--out-dir", str(base / str(k)), "--no-progress", "--device", a.device]
                + list(a.engine_args) for k in range(n)]
        t0 = time.time()
        procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
                 for c in cmds]
        rcs: list[Any] = []
        errs: list[str] = []
        for p in procs:
            try:
                _, err = p.communicate(timeout=max(1.0, timeout - (time.time() - t0)))
                rcs.append(p.returncode)
                if p.returncode:
                    errs += err.strip().splitlines()[-2:]
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()
                rcs.append("timeout")
        out: dict[str, Any] = {"commands": ["pwsconv " + " ".join(c[3:]) for c in cmds], "rc": rcs if n > 1 else rcs[0],
                               "wall_s": round(time.time() - t0, 2)}
        out["runs"] = [[{"epoch": r.get("epoch"), "epoch_time_s": r.get("epoch_time"),
                         "images_per_s": r.get("images_per_s"), "test_acc": r.get("test_acc")}
                        for r in _read_metrics(base / str(k))] for k in range(n)]
        if errs:
            out["stderr"] = errs[-4:]
        for ck in base.glob("*/checkpoint.pt"):   # only the metrics are wanted (and $OUT travels back)
            ck.unlink()
        return out

    # ------------------------------------------------------------------ compile: last, behind its own budget
    def compile_cases(self, end: float) -> None:
        a = self.a
        # under torch.compile the fused pre-hook steps aside (the compiler fuses the per-layer standardizations), so
        # "PWS" here is the model as the engine prepares it
        todo = [("BN", "bn", {}, True), ("PWS", "pws", {}, True), ("auto", "pws", {"gamma": "auto"}, True)
                ][:a.compile_cases]
        fns: dict[str, Callable[[], None]] = {}
        for label, method, opts, fuse in todo:
            if time.time() + a.compile_estimate > end:
                self.compiled[label] = {"skipped": f"compile budget: {end - time.time():.0f} s left, about "
                                                   f"{a.compile_estimate:.0f} s needed"}
                continue
            t0 = time.time()
            try:
                net = self._resnet(method, opts).to(self.device).to(memory_format=torch.channels_last)
                x, y = self._x(a.batch, a.image, True)
                f = train_step_fn(net, x, y, lr=1e-3, fuse=fuse, amp=torch.bfloat16, compile=True)
                for _ in range(max(a.warmup, 2)):
                    f()
                _sync(self.device)
                fns[label] = f
                self.compiled[label] = {"compile_and_warm_s": round(time.time() - t0, 1)}
            except Exception as e:
                self.compiled[label] = {"error": _one_line(e)}
                _free()
            self.write()
        samples: dict[str, list[float]] = {k: [] for k in fns}
        r = 0
        while fns and time.time() < end and r < a.max_rounds:
            interleaved_samples(fns, self.device, rounds=1, first_round=r, samples=samples)
            r += 1
        for k, v in samples.items():
            if v:
                self.compiled[k].update(ms=statistics.median(v) * 1e3, n=len(v))

    # ------------------------------------------------------------------ output
    def results(self) -> dict[str, Any]:
        groups: dict[str, dict[str, Any]] = {}
        for c in self.cases:
            g = groups.setdefault(c.group, {})
            st = c.stats()
            g[c.name] = {**(st or {}), "build_s": round(c.build_s, 2), **({"error": c.error} if c.error else {})}
        return {"meta": {"machine": machine(), "args": {k: v for k, v in vars(self.a).items()},
                         "elapsed_s": round(time.time() - self.started, 1), "budget_s": self.a.budget,
                         "phases": self.phases, "notes": self.notes,
                         "date": time.strftime("%Y-%m-%d %H:%M:%S")},
                "groups": groups, "engine": self.engine, "compile": self.compiled}

    def write(self) -> None:
        res = self.results()
        tmp = self.out / "gpu_bench.json.tmp"
        tmp.write_text(json.dumps(res, indent=1, default=str))
        os.replace(tmp, self.out / "gpu_bench.json")
        tmp = self.out / "gpu_bench.md.tmp"
        tmp.write_text(to_markdown(res))
        os.replace(tmp, self.out / "gpu_bench.md")
        self._last_write = time.time()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timm_std_conv(net: nn.Module) -> nn.Module:
    """Every plain ``nn.Conv2d`` of ``net`` replaced by timm's ScaledStdConv2d (NF-Nets' standardized conv)."""
    from timm.layers import ScaledStdConv2d

    for name, m in list(net.named_modules()):
        if type(m) is nn.Conv2d and isinstance(m.padding, tuple):
            new = ScaledStdConv2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride,
                                  padding=m.padding[0], dilation=m.dilation, groups=m.groups, bias=m.bias is not None)
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, child, new)
    return net


def _det_batch(b: int, size: int, device: torch.device) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """``b`` random images ``[3, size, size]`` in 0..1 with three random boxes each (VOC's 20 classes)."""
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    for _ in range(b):
        images.append(torch.rand(3, size, size, generator=g).to(device))
        xy = torch.rand(3, 2, generator=g) * size * 0.6
        wh = torch.rand(3, 2, generator=g) * size * 0.35 + size * 0.05
        targets.append({"boxes": torch.cat([xy, xy + wh], 1).to(device),
                        "labels": torch.randint(1, 21, (3,), generator=g).to(device)})
    return images, targets


def _det_loss(model: nn.Module, images: Any, targets: Any) -> tuple[torch.Tensor, None]:
    return sum(model(images, targets).values()), None   # type: ignore[return-value]


def _read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    try:
        from pwsconv.train.metrics import read_metrics

        return [r for r in read_metrics(run_dir) if r.get("epoch_time") is not None]
    except (OSError, ValueError):
        return []


def machine() -> dict[str, Any]:
    info = dict(python=platform.python_version(), torch=torch.__version__, pwsconv=pwsconv.__version__,
                cpu=platform.processor() or platform.machine(), cores=os.cpu_count(), threads=torch.get_num_threads())
    for mod in ("torchvision", "timm"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ---------------------------------------------------------------------------------------------------- Markdown
def _cell(st: dict[str, Any] | None, base: dict[str, Any] | None, unit: str = "ms") -> str:
    if not st or "ms" not in st:
        return "–"
    if unit == "img/s":
        v = f"{st['images_per_s']:.1f}"
        return v + (f" (×{st['images_per_s'] / base['images_per_s']:.2f})" if base and "ms" in base else "")
    v = f"{st['ms']:.1f}"
    return v + (f" (×{st['ms'] / base['ms']:.2f})" if base and "ms" in base else "")


def _ratio(g: dict[str, Any], a: str, b: str) -> str:
    x, y = g.get(a, {}), g.get(b, {})
    return f"{x['ms'] / y['ms']:.3f}" if "ms" in x and "ms" in y else "–"


def to_markdown(res: dict[str, Any]) -> str:
    meta, groups = res["meta"], res["groups"]
    out = [f"# GPU benchmark ({meta['machine'].get('gpu', meta['machine']['cpu'])})", "",
           f"torch {meta['machine']['torch']}, torchvision {meta['machine'].get('torchvision')}, "
           f"timm {meta['machine'].get('timm')}; {meta['elapsed_s']:.0f} s of a {meta['budget_s']:.0f} s budget; "
           f"phases: " + ", ".join(f"{k} {v.get('took_s', '…')} s (cap {v['cap_s']})" for k, v in
                                   meta["phases"].items()) + ".", ""]
    a = meta["args"]
    train = [g for g in ("train fp32", "train bf16+CL") if g in groups]
    if train:
        names = list(TRAIN_CASES)
        out += [f"## Training step: {a['model']}, {a['image']}², batch {a['batch']} (ms, median; × BN)", "",
                "| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for g in train:
            out.append(f"| {g} | " + " | ".join(_cell(groups[g].get(n), groups[g].get("BN")) for n in names) + " |")
        out += ["", "| ratio | " + " | ".join(train) + " |", "|---|" + "---:|" * len(train)]
        for a_, b_ in (("PWS fused", "BN"), ("PWS fused", "plain conv"), ("auto fused", "PWS fused"),
                       ("PWS fused", "PWS"), ("timm ScaledStdConv2d", "BN")):
            out.append(f"| {a_} / {b_} | " + " | ".join(_ratio(groups[g], a_, b_) for g in train) + " |")
        out.append("")
    if "infer bf16+CL" in groups:
        g = groups["infer bf16+CL"]
        out += [f"## Inference, bf16 + channels_last, batch {a['batch']} (ms; × BN)", "",
                "| " + " | ".join(INFER_CASES) + " |", "|" + "---:|" * len(INFER_CASES),
                "| " + " | ".join(_cell(g.get(n), g.get("BN")) for n in INFER_CASES) + " |", ""]
    if "table1" in groups:
        from pwsconv.experiments.tables.table1 import PAPER

        g = groups["table1"]
        out += [f"## Table 1 speed column: {a['detector']} {a['det_size']}², batch {a['det_batch']}, fp32, "
                "training img/s (× BN)", "",
                "| method | img/s (× BN) | ms/step | paper FPS, 2080 Ti (× BN) |", "|---|---:|---:|---:|"]
        bn_paper = PAPER["bn"][0]
        for name, (method, _) in TABLE1_CASES.items():
            st = g.get(name, {})
            paper = PAPER.get(method, (None,))[0] if name != "PWS (per layer)" else None
            out.append(f"| {name} | {_cell(st, g.get('BN'), 'img/s')} | {_f(st.get('ms'), 1)} | "
                       + (f"{paper:.2f} (×{paper / bn_paper:.2f}) |" if paper else "– |"))
        out.append("")
    errors = [(gn, n, v["error"]) for gn, g in groups.items() for n, v in g.items() if v.get("error")]
    eng = res.get("engine") or {}
    if eng:
        out += ["## Engine: " + (f"`{eng['command']}`" if "command" in eng else "pwsconv train"), ""]
        if "skipped" in eng:
            out.append(f"skipped: {eng['skipped']}")
        else:
            out.append(f"exit {eng.get('rc')}, {eng.get('wall_s')} s in all (start-up, data, epochs, evaluation)")
            out += [""] + ["| epoch | epoch time (s) | img/s | test acc |", "|---:|---:|---:|---:|"]
            for r in eng.get("epochs", []):
                out.append(f"| {r['epoch']} | {_f(r['epoch_time_s'], 2)} | {_f(r['images_per_s'], 0)} | "
                           f"{_f(r['test_acc'], 4)} |")
            if eng.get("stderr"):
                out.append("\nstderr: " + " / ".join(eng["stderr"]))
        jobs = eng.get("jobs")
        if jobs:
            times = ", ".join(_f(t, 2) for t in jobs["epoch_time_s"])
            out += ["", f"{jobs['n']} runs at once on the device (one epoch each, as `reproduce --jobs "
                        f"{jobs['n']}`): {jobs['wall_s']} s wall in all, epoch times {times} s, exit {jobs['rc']}"]
        est = eng.get("estimate")
        if est:
            out.append("")
            if "seconds" in est and est["seconds"] is not None:
                out.append(f"`pwsconv reproduce {est['table']} --preset {est['preset']} --dry-run`: {est['runs']} runs, about "
                           f"{est['seconds'] / 3600:.2f} h ({est['seconds'] / 60:.1f} min) one at a time (estimated in "
                           f"{est['took_s']} s"
                           + ("; measured: " + ", ".join(f"{k} {v:.0f} img/s" for k, v in est["rates"].items())
                              if est["rates"] else "") + ")")
            else:
                out.append(f"`pwsconv reproduce {est['table']} --dry-run`: {est.get('error', 'no estimate')}")
        out.append("")
    comp = res.get("compile") or {}
    if comp:
        out += ["## torch.compile, bf16 + channels_last, training step (ms)", "",
                "| case | ms | compile + warm-up (s) | note |", "|---|---:|---:|---|"]
        for k, v in comp.items():
            out.append(f"| compiled {k} | {_f(v.get('ms'), 1)} | {_f(v.get('compile_and_warm_s'), 0)} | "
                       f"{v.get('error') or v.get('skipped') or ''} |")
        if "ms" in comp.get("PWS", {}) and "ms" in comp.get("BN", {}):
            out.append(f"\ncompiled PWS / compiled BN: {comp['PWS']['ms'] / comp['BN']['ms']:.3f}")
        out.append("")
    if errors or meta["notes"]:
        out += ["## Notes", ""] + [f"- {n}" for n in meta["notes"]] + [f"- {g} / {n}: {e}" for g, n, e in errors]
    return "\n".join(out) + "\n"


def _f(v: Any, d: int) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):.{d}f}"


# ---------------------------------------------------------------------------------------------------- main
def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "results/benchmarks/gpu")
    p.add_argument("--budget", type=float, default=480.0, help="hard wall-clock budget in seconds, start-up included")
    p.add_argument("--started-at", type=float, default=None,
                   help="epoch seconds when the caller started (gpu.sh passes it, so start-up counts)")
    p.add_argument("--reserve", type=float, default=15.0, help="seconds kept free at the end")
    p.add_argument("--dry", action="store_true", help="CPU, tiny sizes, seconds (the test suite runs it)")
    p.add_argument("--device", default=None)
    p.add_argument("--model", default=None, help="classifier of the training/inference groups")
    p.add_argument("--image", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--detector", default=None)
    p.add_argument("--det-size", type=int, default=None)
    p.add_argument("--det-batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--infer-inner", type=int, default=3, help="inference calls per timed sample")
    p.add_argument("--max-rounds", type=int, default=10_000)
    p.add_argument("--skip", nargs="*", default=[], choices=["train", "infer", "table1", "engine", "compile"])
    p.add_argument("--build-cap", type=float, default=None, help="seconds for building and warming every case")
    p.add_argument("--engine-cap", type=float, default=120.0)
    p.add_argument("--compile-cap", type=float, default=150.0)
    p.add_argument("--compile-estimate", type=float, default=75.0, help="expected compile + warm-up s per case")
    p.add_argument("--compile-cases", type=int, default=2, help="1: BN; 2: + PWS; 3: + gamma='auto'")
    p.add_argument("--engine-model", default="resnet20")
    p.add_argument("--engine-dataset", default="cifar10")
    p.add_argument("--engine-epochs", type=int, default=2)
    p.add_argument("--engine-jobs", type=int, default=4, help="then this many 1-epoch runs at once (0: skip)")
    p.add_argument("--engine-args", default="", metavar="'FLAGS'",
                   help="more `pwsconv train` flags for the engine phase, one quoted string, after the defaults "
                        "(--amp bf16 --channels-last), e.g. --engine-args='--compile'")
    p.add_argument("--data-root", default=None)
    p.add_argument("--estimate", default="table4",
                   help="in the engine phase: the dry-run estimate of this table ('' to skip)")
    p.add_argument("--estimate-preset", default="full")
    a = p.parse_args(argv)
    if a.dry:   # tiny everything; compile off (it needs a C++ compiler and a minute on a CPU)
        defaults = dict(device="cpu", model="resnet_cifar_small", image=16, batch=2, detector="ssd_tiny", det_size=64,
                        det_batch=2, warmup=1, max_rounds=2, infer_inner=1, classes=10, build_cap=60.0,
                        engine_model="tiny_cnn", engine_dataset="digits", engine_epochs=2, engine_jobs=2)
        a.estimate_preset = "smoke"   # the full preset's models on a CPU: minutes
        if "compile" not in a.skip:
            a.skip.append("compile")
        a.engine_args = ["--limit", "256", "--batch-size", "64", "--num-threads", "1"] + shlex.split(a.engine_args)
    else:
        defaults = dict(device="cuda", model="torchvision:resnet50",
                        image=224, batch=64, detector="ssd_vgg16", det_size=320)
        a.engine_args = ["--amp", "bf16", "--channels-last"] + shlex.split(a.engine_args)
    for k, v in defaults.items():
        if k in ("warmup", "max_rounds", "infer_inner", "classes", "det_batch", "engine_model", "engine_dataset",
                 "engine_epochs", "engine_jobs"):
            if getattr(a, k) == p.get_default(k):
                setattr(a, k, v)
        elif getattr(a, k, None) is None:
            setattr(a, k, v)
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if not a.dry and torch.device(a.device).type == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: error: no CUDA device here; --dry runs the tiny CPU check, --device cpu the full sizes on "
              "the CPU", file=sys.stderr)
        return 2
    b = Bench(a)
    torch.backends.cudnn.benchmark = True
    print(f"gpu_bench: budget {a.budget:.0f} s, {b.left():.0f} s left after start-up, out {b.out}", flush=True)
    have_tv = _importable("torchvision")
    if a.model.startswith("torchvision:") and not have_tv:
        b.notes.append(f"torchvision missing: the {a.model} training and inference cases are skipped")
        a.skip += ["train", "infer", "compile"]
    if not have_tv and "table1" not in a.skip:
        b.notes.append("torchvision missing: the Table 1 (SSD) cases are skipped")
        a.skip.append("table1")
    if not _importable("timm"):
        b.notes.append("timm missing: the ScaledStdConv2d cases are skipped")
    if "train" not in a.skip:
        b.add_train(bf16=True)
        b.add_train(bf16=False)
        if not _importable("timm"):
            b.cases = [c for c in b.cases if c.name != "timm ScaledStdConv2d"]
    if "table1" not in a.skip:
        b.add_table1()
    if "infer" not in a.skip:
        b.add_infer()
    # the later phases' caps come off the top; building gets at most half of the rest, rounds what remains. A budget
    # too small for them all drops compile, then the engine phase (noted), so the layer figures always get time.
    for phase in ("compile", "engine"):
        later = (0 if "engine" in a.skip else a.engine_cap) + (0 if "compile" in a.skip else a.compile_cap)
        if phase not in a.skip and b.left() - later < 120:
            a.skip.append(phase)
            b.notes.append(f"{phase} phase skipped: the budget leaves too little time for it")
    later = (0 if "engine" in a.skip else a.engine_cap) + (0 if "compile" in a.skip else a.compile_cap)
    build_cap = a.build_cap if a.build_cap is not None else 0.5 * max(b.left() - later, 0)
    end = b.phase("build", build_cap)
    b.build_all(end)
    b.phase_done("build")
    end = b.phase("rounds", b.left() - later)
    b.rounds(end)
    b.phase_done("rounds")
    if "engine" not in a.skip:
        end = b.phase("engine", min(a.engine_cap, b.left() - (0 if "compile" in a.skip else a.compile_cap)))
        b.engine_run(end)
        b.phase_done("engine")
    if "compile" not in a.skip:
        for c in b.cases:   # free the eager cases' memory first
            c.fn = None
        _free()
        end = b.phase("compile", b.left())
        b.compile_cases(end)
        b.phase_done("compile")
    b.write()
    print((b.out / "gpu_bench.md").read_text(), flush=True)
    return 0


def _importable(name: str) -> bool:
    try:
        __import__(name)
        return True
    except ImportError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
