"""The GPU path, checked without a GPU: device-resident data (on the "meta" device), a training loop without host
syncs between log points, and the prepared GPU benchmark's --dry mode."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

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


def test_training_loop_does_not_sync_between_log_points(tmp_path):
    """Every step but the epoch's last (collapse check, evaluation, checkpoint) runs without one call that would wait
    for a GPU: metrics are summed on the device and read at log points only."""
    cfg = TrainConfig(model="tiny_cnn", dataset="digits", method="pws", epochs=1, batch_size=64, lr=0.05,
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
    assert bench.main(["--dry", "--out", str(out), "--max-rounds", "1"]) == 0
    res = json.loads((out / "gpu_bench.json").read_text())
    train_fp32 = res["groups"]["train fp32"]
    assert {"plain conv", "BN", "GN", "PWS", "PWS fused", "auto fused"} <= set(train_fp32)
    assert all(v["ms"] > 0 and v["n"] == 1 for k, v in train_fp32.items() if "error" not in v)
    assert set(res["groups"]["infer bf16+CL"]) == {"BN", "BN folded", "PWS folded", "PWS (eval cache)"}
    assert [r["epoch"] for r in res["engine"]["epochs"]] == [1.0, 2.0] and res["engine"]["rc"] == 0
    assert set(res["meta"]["phases"]) == {"build", "rounds", "engine"}     # compile is off in --dry
    md = (out / "gpu_bench.md").read_text()
    assert "| PWS fused / BN |" in md and "## Engine" in md and "## Inference" in md
