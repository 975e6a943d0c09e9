"""The training engine: files, exact resume, collapse as a result, DDP = single process, config validation."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from pwsconv.config import ConfigError, TrainConfig, apply_overrides, load_config, parse_value
from pwsconv.train import CheckpointError, RunDirError, RunResult, evaluate, load_checkpoint, read_metrics, train


def small(tmp_path, name="run", **kw) -> TrainConfig:
    """A run of a few steps on 128 digits: 4 steps per epoch at batch 32."""
    base = dict(model="tiny_cnn", method="pws", dataset="digits", limit=128, test_limit=100, batch_size=32,
                epochs=2, lr=0.05, progress=False, num_threads=1, out_dir=str(tmp_path / name), ckpt_every=0)
    base.update(kw)
    return TrainConfig(**base).validate()


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Stop(Exception):
    """A simulated crash (nothing is saved on the way out)."""


def crash_at(step: int):
    def hook(s: int) -> None:
        if s == step:
            raise Stop(f"simulated crash after step {s}")
    return hook


# ------------------------------------------------------------------------------------------------ basic run
def test_run_writes_metrics_config_checkpoint(tmp_path):
    cfg = small(tmp_path, val_fraction=0.2)
    res = train(cfg)
    assert isinstance(res, RunResult) and res.status == "ok"
    assert res.step == 2 * 3 and res.epoch == 2.0          # 102 train images after the val split → 3 batches of 32
    for k in ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "images_per_s"):
        assert math.isfinite(res.metrics[k]), k
    out = tmp_path / "run"
    for f in ("config.yaml", "metrics.csv", "metrics.jsonl", "checkpoint.pt", "result.json"):
        assert (out / f).is_file(), f
    assert load_config(out / "config.yaml") == cfg   # the effective config, re-loadable
    rows = read_metrics(out)
    assert [r["epoch"] for r in rows] == [1.0, 2.0] and [r["step"] for r in rows] == [3, 6]
    assert all(r["status"] in ("running", "ok") for r in rows) and rows[-1]["status"] == "ok"
    csv_lines = (out / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("epoch,step,lr,train_loss") and len(csv_lines) == 3
    ck = torch.load(out / "checkpoint.pt", weights_only=True)   # only tensors and primitives
    assert ck["step"] == 6 and ck["status"] == "ok" and ck["config"]["lr"] == 0.05
    assert not any(k.endswith("alpha") and v.numel() == 0 for k, v in ck["model"].items())
    assert json.loads((out / "result.json").read_text())["status"] == "ok"
    # the result can be reproduced from the checkpoint with evaluate()
    from pwsconv.data import Loader, load_dataset
    from pwsconv.train import build_from_spec

    model = build_from_spec(ck["model_spec"])
    model.load_state_dict(ck["model"])
    b = load_dataset("digits", test_limit=100)
    ev = evaluate(model, Loader(b.test, 50, shuffle=False, mean=ck["model_spec"]["mean"], std=ck["model_spec"]["std"]))
    assert ev["n"] == 100 and ev["acc"] == pytest.approx(res.metrics["test_acc"])


def test_out_dir_is_never_overwritten(tmp_path):
    cfg = small(tmp_path, epochs=1)
    train(cfg)
    before = {p: (tmp_path / "run" / p).read_bytes() for p in os.listdir(tmp_path / "run")}
    with pytest.raises(RunDirError, match="already holds files"):
        train(cfg.replace(lr=0.1))
    assert {p: (tmp_path / "run" / p).read_bytes() for p in os.listdir(tmp_path / "run")} == before
    # resuming a finished run does nothing and returns its result
    res = train(cfg, resume=True)
    assert res.status == "ok" and {p: (tmp_path / "run" / p).read_bytes() for p in before} == before
    # resuming with a different setting is refused
    with pytest.raises(ConfigError, match="lr"):
        train(cfg.replace(lr=0.1), resume=True)


# ----------------------------------------------------------------------------------------------- exact resume
@pytest.mark.parametrize("method", ["bn", "pws", "pws auto"])
def test_resume_after_crash_is_exact(tmp_path, method):
    # 4 steps per epoch, 3 epochs = 12 steps; checkpoints every 3 steps (mid-epoch) and at epoch ends. gamma="auto"
    # at LR 1.6: W's bound holds and follows the LR after the decay at epoch 2 — from the optimizer's loaded groups
    auto = {"method_opts": {"gamma": "auto"}, "lr": 1.6, "milestones": [1, 2]} if method == "pws auto" else {}
    cfg = small(tmp_path, "ref", **{"method": method.split()[0], "epochs": 3, "ckpt_every": 3, "milestones": [2],
                                    "lr": 0.1, **auto})
    ref = train(cfg)
    ref_ck = load_checkpoint(tmp_path / "ref" / "checkpoint.pt")
    for crash in (2, 7, 10):   # before any checkpoint; 1 step after the mid-epoch one at 6; after the one at 9
        run = cfg.replace(out_dir=str(tmp_path / f"crash{crash}"))
        with pytest.raises(Stop):
            train(run, on_step=crash_at(crash))
        res = train(run, resume=True)
        ck = load_checkpoint(tmp_path / f"crash{crash}" / "checkpoint.pt")
        assert same_state(ck["model"], ref_ck["model"]), f"crash at {crash}"
        assert ck["optimizer"]["state"].keys() == ref_ck["optimizer"]["state"].keys()
        assert all(torch.equal(ck["optimizer"]["state"][k]["momentum_buffer"],
                               ref_ck["optimizer"]["state"][k]["momentum_buffer"]) for k in ck["optimizer"]["state"])
        assert res.metrics["test_acc"] == ref.metrics["test_acc"]
        rows, ref_rows = read_metrics(run.out_dir), read_metrics(cfg.out_dir)
        assert [(r["step"], r["train_loss"], r["lr"]) for r in rows] == \
            [(r["step"], r["train_loss"], r["lr"]) for r in ref_rows]


def test_resume_after_max_steps_and_longer_epochs(tmp_path):
    cfg = small(tmp_path, "ref", epochs=2)
    ref = train(cfg)
    part = cfg.replace(out_dir=str(tmp_path / "part"), max_steps=3, epochs=1)
    assert train(part).step == 3
    res = train(part.replace(max_steps=None, epochs=2), resume=True)
    assert res.step == ref.step
    assert same_state(load_checkpoint(tmp_path / "part" / "checkpoint.pt")["model"],
                      load_checkpoint(tmp_path / "ref" / "checkpoint.pt")["model"])


def test_kill_process_then_resume(tmp_path):
    """SIGKILL a real `pwsconv train` process mid-run; resuming it gives the weights of an uninterrupted run."""
    cfg = small(tmp_path, "ref", method="bn", batch_size=8, epochs=3, limit=256, ckpt_every=1)
    ref = train(cfg)
    out = tmp_path / "killed"
    yaml_cfg = tmp_path / "cfg.yaml"
    yaml_cfg.write_text(yaml.safe_dump(cfg.replace(out_dir=str(out)).to_dict()))
    # the CLI's `train`, in a child that stops (sleeps) right after its first checkpoint and tells us so: the kill
    # comes mid-run whatever the machine's load (no race against a clock)
    sentinel = tmp_path / "checkpointed"
    child = ("import pathlib, sys, time\n"
             "from pwsconv import cli\n"
             "from pwsconv.train import engine\n"
             "save = engine._Run.save_checkpoint\n"
             "def stop_after(self):\n"
             "    save(self)\n"
             "    pathlib.Path(sys.argv[2]).write_text(str(self.step))\n"
             "    time.sleep(3600)\n"
             "engine._Run.save_checkpoint = stop_after\n"
             "sys.exit(cli.main(['train', '--config', sys.argv[1]]))\n")
    proc = subprocess.Popen([sys.executable, "-c", child, str(yaml_cfg), str(sentinel)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    ck_path = out / "checkpoint.pt"
    deadline = time.time() + 600                      # only a guard against a hung child
    while not sentinel.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    still_running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert sentinel.exists() and still_running, proc.stderr.read().decode()
    assert ck_path.exists()
    assert not (out / "result.json").exists()
    assert torch.load(ck_path, weights_only=True)["step"] < 96
    res = train(cfg.replace(out_dir=str(out)), resume=True)
    assert res.step == ref.step == 96
    assert same_state(load_checkpoint(ck_path)["model"], load_checkpoint(tmp_path / "ref" / "checkpoint.pt")["model"])


# ------------------------------------------------------------------------------------------------- collapse
def test_collapse_is_a_result(tmp_path):
    cfg = small(tmp_path, method="none", lr=1e4, epochs=3)
    res = train(cfg)   # no exception
    assert res.status == "nan"
    assert all(math.isnan(v) for k, v in res.metrics.items() if k != "images_per_s")
    assert res.step < 12   # stopped early
    rows = read_metrics(cfg.out_dir)
    assert rows[-1]["status"] == "nan" and math.isnan(rows[-1]["test_acc"])
    assert "nan" in (tmp_path / "run" / "metrics.csv").read_text().splitlines()[-1]
    saved = json.loads((tmp_path / "run" / "result.json").read_text())   # strict JSON: NaN is written as null
    assert saved["status"] == "nan" and saved["metrics"]["test_acc"] is None
    again = train(cfg, resume=True)   # a collapsed run is finished
    assert again.status == "nan" and again.step == res.step


# ------------------------------------------------------------------------------------------------------ DDP
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_ddp_two_processes_match_single_process(tmp_path, torchrun):
    cfg = small(tmp_path, "single", method="pws", epochs=2, batch_size=32, ckpt_every=0)
    train(cfg)
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    if os.path.isdir("/sys/class/net/lo"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
           "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", "-m", "pwsconv.cli", "train",
           "--out-dir", str(out), "--method", "pws", "--epochs", "2", "--batch-size", "32", "--limit", "128",
           "--test-limit", "100", "--lr", "0.05", "--no-progress", "--num-threads", "1", "--ckpt-every", "0"]
    p = torchrun(cmd, env, out, timeout=240)   # repeated once after gloo's known abort at exit (tests/conftest.py)
    assert p.returncode == 0, p.stderr[-3000:]
    a = load_checkpoint(tmp_path / "single" / "checkpoint.pt")
    b = load_checkpoint(out / "checkpoint.pt")
    assert b["world_size"] == 2 and b["step"] == a["step"] == 8
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5), k
    ra, rb = read_metrics(cfg.out_dir), read_metrics(out)
    assert [r["train_loss"] for r in ra] == pytest.approx([r["train_loss"] for r in rb], rel=1e-4)
    assert [r["test_acc"] for r in ra] == pytest.approx([r["test_acc"] for r in rb], abs=0.011)


# ---------------------------------------------------------------------------------------------------- config
def test_config_overrides_and_validation(tmp_path):
    cfg = apply_overrides(TrainConfig(), ["lr=1e-1", "method_opts.gamma=1e-4", "milestones=[100, 150]", "amp=bf16",
                                          "limit=null", "deterministic=true", "batch_size=64"])
    assert cfg.lr == 0.1 and cfg.method_opts == {"gamma": 1e-4} and cfg.milestones == [100, 150]
    assert cfg.amp == "bf16" and cfg.limit is None and cfg.deterministic is True and cfg.batch_size == 64
    assert parse_value("1e-4") == 1e-4 and parse_value("[1, 2]") == [1, 2] and parse_value("pws") == "pws"
    bad = {
        "lr=-0.1": "lr must be", "batch_size=-2": "batch_size", "lrr=0.1": "did you mean 'lr'",
        "model=nope": "unknown model", "method=nope": "unknown method", "dataset=nope": "unknown dataset",
        "amp=fp8": "amp", "epochs=two": "integer", "milestones=[5, 2]": "increasing", "lr=nan": "lr must be",
        "momentum=1.5": "momentum", "lr.x=1": "no sub-keys",
    }
    for item, msg in bad.items():
        with pytest.raises(ConfigError, match=msg) as e:
            apply_overrides(TrainConfig(), [item])
        assert "\n" not in str(e.value)
    y = tmp_path / "bad.yaml"
    y.write_text("lr: 0.1\nmodel: [unclosed\n")
    with pytest.raises(ConfigError, match="malformed YAML.*line"):
        load_config(y)
    y.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(y)
    y.write_text("lr: 0.2\nmethod_opts: {gamma: 1e-3}\n")
    assert load_config(y, ["lr=0.3"]).lr == 0.3 and load_config(y).method_opts == {"gamma": 1e-3}


def test_corrupt_checkpoint_is_a_one_line_error(tmp_path):
    train(small(tmp_path, epochs=1))
    good = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    for name, data in (("trunc.pt", good[: len(good) // 2]), ("junk.pt", b"not a checkpoint at all"),
                       ("empty.pt", b"")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(tmp_path / name)
        assert "\n" not in str(e.value) and name in str(e.value)
    torch.save({"something": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a pwsconv checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    # a corrupt checkpoint in a run directory: resume reports it instead of silently starting over
    shutil.copy(tmp_path / "trunc.pt", tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(CheckpointError):
        train(small(tmp_path, epochs=1), resume=True)


def test_metrics_log_takes_a_tasks_columns(tmp_path):
    """The detection loop's metrics go through the same log (its own CSV columns; every key in the JSONL)."""
    from pwsconv.train.metrics import MetricsLog

    cols = ("epoch", "step", "train_loss", "mAP", "status")
    log = MetricsLog(str(tmp_path), columns=cols)
    log.log({"epoch": 1.0, "step": 4, "train_loss": 0.5, "mAP": float("nan"), "status": "running",
             "per_class": {"cat": 12.5}})
    log.log({"epoch": 2.0, "step": 8, "train_loss": 0.25, "mAP": 31.0, "status": "ok"})
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines == ["epoch,step,train_loss,mAP,status", "1.0,4,0.5,nan,running", "2.0,8,0.25,31.0,ok"]
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert first["per_class"] == {"cat": 12.5} and first["mAP"] is None
    again = MetricsLog(str(tmp_path), resume_step=4, columns=cols)   # resumed at step 4: the later row is redone
    assert [r["step"] for r in again.rows] == [4] and len((tmp_path / "metrics.csv").read_text().splitlines()) == 2
    assert MetricsLog(str(tmp_path / "other"), enabled=False).rows == []   # a non-main process keeps no rows


def test_engine_links_its_grad_scaler_for_fp16(tmp_path, monkeypatch):
    """`amp=fp16` scales the loss with a GradScaler: the engine links it (clipping layers bound unscaled gradients);
    bf16 and float32 need none (None unlinks)."""
    import pwsconv.train.engine as engine

    seen = []
    real = engine.link_optimizer
    monkeypatch.setattr(engine, "link_optimizer", lambda m, o, scaler=None: (seen.append(scaler), real(m, o, scaler))[1])
    for amp in ("fp16", "bf16", None):
        train(small(tmp_path, f"amp_{amp}", epochs=1, max_steps=1, amp=amp, method_opts={"gamma": "auto"}))
    assert isinstance(seen[0], torch.amp.GradScaler) and seen[1:] == [None, None]
