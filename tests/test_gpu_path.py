"""The GPU path, checked without a GPU: device-resident data (on the "meta" device), a training loop without host
syncs between log points, and the prepared GPU benchmark's --dry mode."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from pwsconv.config import TrainConfig
from pwsconv.data import ImageSet, Loader, load_dataset
from pwsconv.data.device import fits_on_device, resident, resident_bytes
from pwsconv.train import train

ROOT = Path(__file__).resolve().parents[1]

#: tensor calls that wait for the device (or copy to the host) when the tensor lives on a GPU
SYNCS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy", "tensor", "as_tensor"}


class Calls(TorchFunctionMode):
    """Records (name, args) of every torch call made under it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append((getattr(func, "__name__", str(func)), args))
        return func(*args, **(kwargs or {}))


def test_resident_loader_gathers_on_the_device_and_copies_the_plan_once():
    g = torch.Generator().manual_seed(0)
    images = ImageSet(torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8, generator=g), torch.arange(10))
    host = Loader(images, 4, shuffle=True, augment="cifar", mean=0.5, std=0.25, seed=3)
    on_meta = Loader(images.to("meta"), 4, shuffle=True, augment="cifar", mean=0.5, std=0.25, seed=3, device="meta",
                     channels_last=True)
    with Calls() as rec:
        batches = list(on_meta)
    assert [tuple(x.shape) for x, _ in batches] == [tuple(x.shape) for x, _ in host] == [(4, 3, 8, 8)] * 2 + [(2, 3, 8, 8)]
    assert all(x.device.type == y.device.type == "meta" for x, y in batches)
    assert all(x.is_contiguous(memory_format=torch.channels_last) for x, _ in batches)
    # host → device copies: the epoch's order and augmentation parameters, once; nothing per batch
    moves = [a for name, a in rec.calls if name == "to" and isinstance(a[0], torch.Tensor) and a[0].device.type == "cpu"]
    assert len(moves) == 2
    assert not [n for n, _ in rec.calls if n in SYNCS]


def test_resident_is_auto_on_only_for_a_gpu_with_room():
    ds = load_dataset("digits")
    assert resident_bytes(ds) == sum(s.x.numel() + 8 * len(s.y) for s in ds.splits().values())
    assert not fits_on_device(1, torch.device("cpu"))
    same, on = resident(ds, torch.device("cpu"), None)
    assert same is ds and not on
    same, on = resident(ds, torch.device("cpu"), True)      # forced: the CPU already holds it
    assert same is ds and on
    moved, on = resident(ds, torch.device("meta"), True)
    assert on and moved.train.x.device.type == "meta" and moved.test.y.device.type == "meta"
    assert ds.train.x.device.type == "cpu" and moved.num_classes == ds.num_classes


@pytest.mark.parametrize("method_opts", [{}, {"gamma": "auto"}], ids=["pws", "auto"])
def test_training_loop_does_not_sync_between_log_points(tmp_path, method_opts):
    """Every step but the epoch's last (collapse check, evaluation, checkpoint) runs without one call that would wait
    for a GPU: metrics are summed on the device and read at log points only (gamma="auto": its clipping too)."""
    cfg = TrainConfig(model="tiny_cnn", dataset="digits", method="pws", method_opts=method_opts, epochs=1,
                      batch_size=64, lr=0.05,
                      log_every=10_000, ckpt_every=0, progress=False, data_on_device=True, num_threads=1,
                      out_dir=str(tmp_path / "run"))
    marks: list[int] = []
    rec = Calls()

    def on_step(step: int) -> None:
        marks.append(len(rec.calls))

    with rec:
        res = train(cfg, on_step=on_step)
    assert res.status == "ok" and res.step == len(marks) >= 20
    for k in range(len(marks) - 1):   # from after step k to after step k+1: the loader, one train_step, the sums
        window = [n for n, _ in rec.calls[marks[k]:marks[k + 1]]]
        assert "conv2d" in window or "_conv_forward" in window or len(window) > 20
        syncs = [n for n in window if n in SYNCS]
        assert not syncs, f"step {k + 2}: {syncs}"


def test_data_on_device_changes_nothing_on_cpu(tmp_path):
    base = dict(model="tiny_cnn", dataset="digits", method="pws", epochs=1, max_steps=6, batch_size=32, lr=0.05,
                progress=False, num_threads=1)
    a = train(TrainConfig(**base, out_dir=str(tmp_path / "a")))
    b = train(TrainConfig(**base, data_on_device=True, out_dir=str(tmp_path / "b")))
    assert a.metrics["train_loss"] == b.metrics["train_loss"] and a.metrics["test_acc"] == b.metrics["test_acc"]


def test_gpu_bench_dry(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu_bench.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_bench", bench)    # its dataclasses look their module up
    spec.loader.exec_module(bench)  # type: ignore[union-attr]
    out = tmp_path / "gpu"
    # generous caps: the phases must not be cut short on a loaded test machine (timings are not asserted)
    assert bench.main(["--dry", "--out", str(out), "--max-rounds", "1", "--budget", "900", "--engine-cap", "600"]) == 0
    res = json.loads((out / "gpu_bench.json").read_text())
    train_fp32 = res["groups"]["train fp32"]
    assert {"plain conv", "BN", "GN", "PWS", "PWS fused", "auto fused"} <= set(train_fp32)
    assert all(v["ms"] > 0 and v["n"] == 1 for k, v in train_fp32.items() if "error" not in v)
    assert set(res["groups"]["infer bf16+CL"]) == {"BN", "BN folded", "PWS folded", "PWS (eval cache)"}
    assert [r["epoch"] for r in res["engine"]["epochs"]] == [1.0, 2.0] and res["engine"]["rc"] == 0
    assert res["engine"]["estimate"]["runs"] == 8 and res["engine"]["estimate"]["seconds"] > 0
    assert res["engine"]["jobs"]["rc"] == [0, 0] and all(t > 0 for t in res["engine"]["jobs"]["epoch_time_s"])
    assert set(res["meta"]["phases"]) == {"build", "rounds", "engine"}     # compile is off in --dry
    md = (out / "gpu_bench.md").read_text()
    assert "| PWS fused / BN |" in md and "## Engine" in md and "## Inference" in md


# ------------------------------------------------------------------------------------------- sweeps: shards, jobs
def _results(out: Path) -> dict[str, tuple]:
    rows = {}
    for p in sorted(out.glob("*/result.json")):
        r = json.loads(p.read_text())
        rows[p.parent.name] = (r["status"], r["step"], r["metrics"]["train_loss"], r["metrics"]["test_loss"],
                               r["metrics"]["test_acc"])
    return rows


def test_three_shard_processes_give_one_process_results(tmp_path):
    import os
    import subprocess

    from pwsconv.experiments.paper import reproduce

    one = tmp_path / "one"
    info = reproduce("table4", "smoke", out_dir=one, plots=False, log=None)
    assert info["n_runs"] == 8
    shared = tmp_path / "shared"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-m", "pwsconv", "reproduce", "table4", "--preset", "smoke", "--out",
                               str(shared), "--shard", f"{i}/3"] + (["--jobs", "2"] if i == 0 else []),
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e for _, e in outs]
    assert _results(shared) == _results(one) and len(_results(one)) == 8
    # the shard that found every run finished wrote the tables, the same as the single process's
    assert (shared / "results.csv").is_file() and (shared / "results.md").is_file()
    strip = lambda t: [ln.split(",")[:6] for ln in t.splitlines()]   # noqa: E731 (out_dir/wall time differ)
    assert strip((shared / "summary.csv").read_text()) == strip((one / "summary.csv").read_text())


def test_shard_and_jobs_are_checked(capsys):
    from pwsconv.cli import main
    from pwsconv.experiments.sweep import RunSpec, SweepError, parse_shard, shard_of

    assert parse_shard("2/4") == (2, 4)
    for bad in ("4/4", "-1/2", "1", "a/b", "1/0"):
        with pytest.raises(SweepError, match="i/N"):
            parse_shard(bad)
    runs = [RunSpec(str(i), TrainConfig()) for i in range(7)]
    parts = [shard_of(runs, (i, 3)) for i in range(3)]
    assert sorted(r.name for p in parts for r in p) == [r.name for r in runs] and [len(p) for p in parts] == [3, 2, 2]
    assert main(["reproduce", "table4", "--preset", "smoke", "--shard", "3/3", "--dry-run"]) == 2
    assert main(["reproduce", "table4", "--preset", "smoke", "--jobs", "0", "--dry-run"]) == 2
    assert main(["reproduce", "voc_table1", "--jobs", "2", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "--shard must be i/N" in err[0] and "--jobs must be ≥ 1" in err[1]
    assert "classification tables" in err[2]
    from pwsconv.experiments.paper import build_runs, reproduce

    info = reproduce("table4", "smoke", dry_run=True, log=None, compile=True, shard=(1, 3))
    assert [r["name"] for r in info["runs"]] == [r.name for r in build_runs("table4", "smoke")][1::3]
    assert all(r["config"]["compile"] for r in info["runs"])


def test_full_dry_run_estimates_from_measured_throughput(monkeypatch):
    """The full preset has no rates measured in advance: the dry run measures each (model, method) step here (the
    measurement itself is pwsconv.experiments.speed.train_step_rates, stubbed to known rates for speed)."""
    import pwsconv.experiments.speed as speed
    from pwsconv.experiments import paper

    asked = []

    def rates(model, methods, batch, **kw):
        asked.append((model, tuple(methods), batch, kw["image_size"], kw["in_channels"], kw["device"]))
        return {m: {"ms": 1.0, "images_per_s": 1000.0 * (2 if model == "resnet20" else 1), "ratio_to_first": 1.0}
                for m in methods}

    monkeypatch.setattr(speed, "train_step_rates", rates)
    assert paper.reproduce("table4", "full", dry_run=True, log=None, measure=False)["estimated_seconds"] is None
    assert not asked
    info = paper.reproduce("table4", "full", dry_run=True, log=None, measure=True)
    assert {(m, b, s, c) for m, _, b, s, c, _ in asked} == {("convpool_cnn_c", 128, 32, 3), ("resnet20", 128, 32, 3)}
    assert all(set(ms) == {"none", "bn", "gn", "sn", "wn", "pws"} for _, ms, *_ in asked)
    eff = paper._GPU_EFFICIENCY if asked[0][-1] == "cuda" else paper._ENGINE_EFFICIENCY
    per_run = {r: (390 * 200 * 128 + 10000 * 200 / 3) / (1000.0 * k * eff) + 1.0
               for r, k in (("convpool_cnn_c", 1), ("resnet20", 2))}
    assert info["estimated_seconds"] == pytest.approx(12 * per_run["convpool_cnn_c"] + 12 * per_run["resnet20"])
    assert len(info["measured_rates"]) == 12


# ------------------------------------------------------------------------------------------------ torch.compile
@pytest.mark.parametrize("gamma, lr", [(1e-3, 0.1), ("auto", 0.1), ("auto", 1.6)])
@pytest.mark.parametrize("fuse", [False, True])
def test_compiled_pws_trains_with_eager_values_and_no_graph_break(gamma, lr, fuse):
    """torch.compile of a PWS ResNet (paper γ or "auto" — at LR 1.6 its α and β clipped per vector — fused or per
    layer): the same losses and weights as eager after a few SGD steps, in one graph. ``aot_eager`` runs dynamo's capture and AOT autograd (where graph breaks and
    wrong gradients come from) without the C++ compile of inductor."""
    import copy

    import torch._dynamo
    from torch._dynamo.utils import counters

    from pwsconv.convert import param_groups
    from pwsconv.methods import prepare_for_training
    from pwsconv.models import build_model
    from pwsconv.train.step import train_step

    torch.manual_seed(0)   # a residual net: convs of three sizes, a strided 1×1 shortcut, the classifier
    eager = build_model("resnet_cifar_small", "pws", method_opts={"gamma": gamma}, width=0.25)
    compiled = copy.deepcopy(eager)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(3)]
    losses = {}
    torch._dynamo.reset()
    counters.clear()
    for name, net in (("eager", eager), ("compiled", compiled)):
        net.train()
        prepare_for_training(net, "pws", fuse=fuse)
        opt = torch.optim.SGD(param_groups(net, 5e-4), lr=lr, momentum=0.9)
        model = torch.compile(net, backend="aot_eager") if name == "compiled" else net
        losses[name] = [float(train_step(model, opt, x, y)[0].detach()) for x, y in data]
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-5, abs=1e-6)
    for (n, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=n)
    assert not counters["graph_break"], dict(counters["graph_break"])
    explained = torch._dynamo.explain(compiled)(data[0][0])
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_engine_compile_flag(tmp_path, monkeypatch):
    """``compile: true`` trains the model under torch.compile (here with the aot_eager backend) to eager's values."""
    calls = []
    real = torch.compile

    def compile_(model, **kw):
        calls.append(type(model).__name__)
        return real(model, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", compile_)
    base = dict(model="tiny_cnn", dataset="digits", method="pws", epochs=1, max_steps=5, batch_size=32, lr=0.05,
                progress=False, num_threads=1)
    a = train(TrainConfig(**base, out_dir=str(tmp_path / "eager")))
    b = train(TrainConfig(**base, compile=True, out_dir=str(tmp_path / "compiled")))
    assert calls == ["TinyCNN"] and b.status == "ok"
    assert b.metrics["train_loss"] == pytest.approx(a.metrics["train_loss"], rel=1e-5)
    assert b.metrics["test_acc"] == a.metrics["test_acc"]


def test_inductor_compiled_pws_trains_with_eager_values():
    """The default backend (inductor, C++ on the CPU; ≈ 25 s cold on 2 cores): a fused net with a paper-γ and an
    "auto" layer trains three SGD steps to eager's losses and weights."""
    import copy

    import torch._dynamo
    from torch import nn

    from pwsconv.convert import param_groups
    from pwsconv.layers.pws import PWSConv2d, PWSLinear
    from pwsconv.methods import prepare_for_training
    from pwsconv.train.step import train_step

    torch.manual_seed(0)
    eager = nn.Sequential(PWSConv2d(3, 8, 3, padding=1), nn.ReLU(), PWSConv2d(8, 8, 3, padding=1, gamma="auto"),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), PWSLinear(8, 4))
    compiled = copy.deepcopy(eager)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(3)]
    torch._dynamo.reset()
    losses = {}
    for name, net in (("eager", eager), ("compiled", compiled)):
        net.train()
        prepare_for_training(net, "pws", fuse=True)
        opt = torch.optim.SGD(param_groups(net, 5e-4), lr=0.1, momentum=0.9)
        model = torch.compile(net) if name == "compiled" else net
        losses[name] = [float(train_step(model, opt, x, y)[0].detach()) for x, y in data]
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-5)
    for (n, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=n)
