"""The engine's loop runs any task (pwsconv.train.task.Task): a task of a few lines — its data, network, loss, hooks
and score — gets the loop's epochs, schedule, checkpoints, exact resume, metrics log and collapse handling."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from pwsconv.config import TrainConfig
from pwsconv.train import load_checkpoint
from pwsconv.train.engine import run_task
from pwsconv.train.task import Task


class _Batches:
    """A seeded loader over a fixed regression set (the interface the loop asks of a loader)."""

    def __init__(self, n: int, batch: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.batch, self.epoch, self.start = torch.randn(n, 4, generator=g), batch, 0, 0
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0])

    def __len__(self) -> int:
        return len(self.x) // self.batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start = epoch, 0

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.start = state["epoch"], state["batch"]

    def __iter__(self):
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.epoch))
        for b in range(self.start, len(self)):
            i = order[b * self.batch:(b + 1) * self.batch]
            yield self.x[i], self.y[i]


class Regression(Task):
    columns = ("epoch", "step", "lr", "train_loss", "val_mse", "wall_time", "status")
    checkpoint_format = "test-regression"
    eval_every = 2

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        self.events: list[str] = []

    def setup(self, dist, device) -> None:
        self.train_loader = _Batches(32, 8)

    def build(self) -> nn.Module:
        return nn.Linear(4, 1)

    def check_spec(self, spec, path) -> None:
        pass

    def loss_fn(self, model, x, y):
        out = model(x).squeeze(1)
        return {"mse": (out - y).square().mean()}["mse"], out

    def after_forward(self, loss, out) -> None:   # between forward and backward: no gradient yet
        self.events.append("forward" if self.model.weight.grad is None else "stale grad")

    def before_step(self) -> None:               # between backward and the update: the gradients
        self.events.append("backward" if self.model.weight.grad is not None else "no grad")

    def bind(self, model, opt) -> None:
        self.model = model

    def batch_sums(self, loss, out, x, y):
        return torch.stack([loss.detach().double() * len(y), loss.new_zeros((), dtype=torch.float64),
                            loss.new_full((), len(y), dtype=torch.float64)])

    def evaluate(self, model, device, distributed):
        ldr = self.train_loader
        with torch.no_grad():
            return {"val_mse": float((model(ldr.x).squeeze(1) - ldr.y).square().mean())}, ""

    def metrics(self, train, ev, ips):
        return {"train_loss": train[0] / train[2], **(ev or {})}

    def nan_metrics(self, ips):
        return {"train_loss": float("nan"), "val_mse": float("nan")}

    def row(self, metrics, ev, epoch_time):
        return dict(metrics)

    def metrics_from_row(self, row):
        return {k: row[k] for k in ("train_loss", "val_mse") if k in row}


def _cfg(out, **kw):
    base = dict(lr=0.05, epochs=4, milestones=[3], ckpt_every=3, progress=False, out_dir=str(out), num_threads=1)
    return TrainConfig(**{**base, **kw})


def test_a_custom_task_gets_the_whole_loop(tmp_path):
    task = Regression(_cfg(tmp_path / "ref"))
    ref = run_task(task)
    assert ref.status == "ok" and ref.step == 16
    assert task.events == ["forward", "backward"] * 16
    rows = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 8, 12, 16] and [r["lr"] for r in rows] == pytest.approx([.05] * 3 + [.005])
    assert ["val_mse" in r for r in rows] == [False, True, False, True]   # eval_every 2
    assert (tmp_path / "ref" / "metrics.csv").read_text().splitlines()[0] == \
        "epoch,step,lr,train_loss,val_mse,wall_time,status"
    assert rows[0]["train_loss"] > rows[-1]["train_loss"] and rows[1]["val_mse"] > rows[3]["val_mse"]

    class Crash(RuntimeError):
        pass

    def crash(step):
        if step == 7:
            raise Crash()

    with pytest.raises(Crash):
        run_task(Regression(_cfg(tmp_path / "c")), on_step=crash)
    assert load_checkpoint(tmp_path / "c" / "checkpoint.pt", formats=("test-regression",))["step"] == 6
    res = run_task(Regression(_cfg(tmp_path / "c")), resume=True)   # mid-epoch: the same order, the same weights
    a, b = (load_checkpoint(tmp_path / d / "checkpoint.pt", formats=("test-regression",)) for d in ("ref", "c"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]) and res.metrics == ref.metrics

    class Other(Regression):
        checkpoint_format = "another-task"

    with pytest.raises(ValueError, match="checkpoint.pt"):   # another task's checkpoint: refused, one line
        run_task(Other(_cfg(tmp_path / "c", epochs=5)), resume=True)


def test_a_custom_task_collapses_as_a_result(tmp_path):
    res = run_task(Regression(_cfg(tmp_path / "n", lr=1e20, log_every=1)))
    assert res.status == "nan" and res.step < 16 and res.metrics["train_loss"] != res.metrics["train_loss"]
    assert json.loads((tmp_path / "n" / "result.json").read_text())["status"] == "nan"
