"""The detection loop without torchvision: a stand-in detector and data set, so the main suite runs the loop (the one
training step with the task's loss, the shared metrics log, checkpoints, exact mid-epoch resume, collapse as a
result). tests/detection runs it on real torchvision detectors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import pwsconv.detection.data as det_data
import pwsconv.detection.evaluate as det_eval
import pwsconv.detection.models as det_models
import pwsconv.detection.train as det_train
from pwsconv.detection.train import DetConfig, train_detector
from pwsconv.train.checkpoint import load_checkpoint


class _Detector(nn.Module):
    """A conv + BN backbone converted like the real ones, returning a dict of losses in training mode."""

    def __init__(self, method: str, method_opts: dict) -> None:
        super().__init__()
        body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = det_models._convert_backbone(body, method, method_opts, False)
        self.head = nn.Linear(8, 4)

    def forward(self, images, targets):
        feats = self.body(torch.stack(images)).mean((2, 3))
        boxes = torch.stack([t["boxes"][0] for t in targets])
        return {"box": (self.head(feats) - boxes).square().mean(), "l2": 1e-3 * self.head.weight.square().sum()}


@pytest.fixture
def fake(monkeypatch):
    g = torch.Generator().manual_seed(0)
    items = [(torch.rand(3, 8, 8, generator=g), {"boxes": torch.rand(1, 4, generator=g), "labels": torch.ones(1)})
             for _ in range(12)]
    monkeypatch.setattr(det_train, "_datasets", lambda cfg: (items, items[:4], None, "voc07"))
    monkeypatch.setattr(det_data, "ssd_train_transform", lambda: (lambda img, t: (img, t)))
    monkeypatch.setattr(det_data, "eval_transform", lambda: (lambda img, t: (img, t)))
    monkeypatch.setattr(det_data, "num_classes_of", lambda ds: 2)
    monkeypatch.setattr(det_models, "build_detector",
                        lambda name, method, num_classes, size, method_opts, weights, **kw: _Detector(method, method_opts))
    monkeypatch.setattr(det_eval, "evaluate_detector",
                        lambda model, loader, gt, **kw: {"mAP": float(model.head.bias.detach().abs().sum())})


def _cfg(out, **kw):
    base = dict(model="ssd_tiny", method="pws", method_opts={"gamma": 1e-3}, dataset="voc", data_root="unused",
                batch_size=4, eval_batch_size=4, epochs=2, lr=0.05, num_workers=0, num_threads=1, ckpt_every=2,
                progress=False, out_dir=str(out))
    return DetConfig(**{**base, **kw})


def test_detection_loop_logs_checkpoints_and_resumes_exactly(fake, tmp_path):
    ref = train_detector(_cfg(tmp_path / "ref"))
    assert ref.status == "ok" and ref.step == 6 and ref.metrics["mAP"] > 0
    rows = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6] and rows[-1]["status"] == "ok"
    assert (tmp_path / "ref" / "metrics.csv").read_text().splitlines()[0].startswith("epoch,step,lr,train_loss,mAP")

    class Crash(RuntimeError):
        pass

    def crash(step):
        if step == 5:
            raise Crash()

    with pytest.raises(Crash):
        train_detector(_cfg(tmp_path / "c"), on_step=crash)
    assert load_checkpoint(tmp_path / "c" / "checkpoint.pt", formats=(det_train.DET_CHECKPOINT_FORMAT,))["step"] == 4
    res = train_detector(_cfg(tmp_path / "c"), resume=True)
    a = load_checkpoint(tmp_path / "ref" / "checkpoint.pt", formats=(det_train.DET_CHECKPOINT_FORMAT,))
    b = load_checkpoint(tmp_path / "c" / "checkpoint.pt", formats=(det_train.DET_CHECKPOINT_FORMAT,))
    assert res.step == 6 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert res.metrics["mAP"] == ref.metrics["mAP"]


def test_detection_loop_collapse_is_a_result_and_options_are_checked(fake, tmp_path):
    bad = train_detector(_cfg(tmp_path / "nan", method="none", method_opts={}, lr=1e12, log_every=1))
    assert bad.status == "nan" and bad.metrics["mAP"] != bad.metrics["mAP"]
    with pytest.raises(ValueError, match="method_opts.gamma must be"):
        train_detector(_cfg(tmp_path / "x", method_opts={"gamma": -1}))
    assert not (tmp_path / "x").exists()


def test_detconfig_is_a_trainconfig_with_detection_defaults_and_fields():
    import dataclasses

    from pwsconv.config import ConfigError, TrainConfig

    shared = {f.name for f in dataclasses.fields(TrainConfig)}
    assert issubclass(DetConfig, TrainConfig)
    own = [f.name for f in dataclasses.fields(DetConfig) if f.name not in shared]
    assert own == ["size", "weights", "train_sets", "test_sets", "classes", "masks", "warmup_steps", "warmup_factor",
                   "grad_clip", "eval_every"]
    d, t = DetConfig(), TrainConfig()
    assert (d.model, d.dataset, d.epochs, d.batch_size, d.eval_batch_size, d.lr, d.num_workers, d.ckpt_every) == \
        ("ssd_vgg16", "voc", 240, 8, 8, 1e-2, 4, 500)
    assert d.momentum == t.momentum and d.weight_decay == t.weight_decay and d.seed == t.seed
    help_of = {f.name: f.metadata["help"] for f in dataclasses.fields(TrainConfig)}
    assert all(f.metadata["help"] == help_of[f.name] for f in dataclasses.fields(DetConfig) if f.name in shared)
    for bad, msg in [({"val_fraction": 0.1}, "val_fraction is not used by detection"),
                     ({"amp": "fp16"}, "amp must be null or 'bf16'"), ({"lr": -1.0}, "lr must be"),
                     ({"model": "resnet18"}, "unknown detector"), ({"shuffle": True}, "unknown detection config key")]:
        with pytest.raises(ConfigError, match=msg):
            DetConfig.from_dict({"data_root": "x", **bad})
    assert DetConfig.from_dict({"data_root": "x"}).replace(lr=0.5).lr == 0.5


def test_a_saved_detection_config_of_the_former_loop_is_the_same_run():
    """config.yaml / result.json written before DetConfig took TrainConfig's keys: missing keys are the defaults, so
    the sweep still skips the committed runs and compares only what a run computes."""
    old = DetConfig(data_root="d", classes=["a"], max_steps=300, batch_size=4).to_dict()
    for k in ("val_fraction", "augment", "drop_last", "nesterov", "deterministic", "channels_last", "fuse_pws",
              "pws_recompute", "data_on_device", "compile", "sync_bn", "tensorboard"):
        old.pop(k)
    new = DetConfig(data_root="elsewhere", classes=["a"], max_steps=300, batch_size=4, progress=False).to_dict()
    assert det_train._same(old, new) == []
    assert det_train._same(old, {**new, "max_steps": 600, "eval_batch_size": 2}) == []   # length, cosmetic
    assert det_train._same(old, {**new, "batch_size": 8}) == ["batch_size 4 → 8"]
    assert det_train._same(old, {**new, "nesterov": True}) == ["nesterov False → True"]


def test_detection_schedule_warmup_clipping_and_eval_cadence(fake, monkeypatch, tmp_path):
    """The engine's LR schedule with the task's warm-up (per step) and milestones (per epoch), clipping in
    before_step, evaluation every eval_every epochs and at the end; per-class AP only in metrics.jsonl."""
    import pwsconv.train.engine as E

    seen, norms = [], []
    real = E.train_step

    def spy(model, opt, x, y, **kw):
        seen.append(opt.param_groups[0]["lr"])
        clip = kw["before_step"]

        def before_step():
            clip()
            norms.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()
                                                                      if p.grad is not None]))))
        return real(model, opt, x, y, **{**kw, "before_step": before_step})

    monkeypatch.setattr(E, "train_step", spy)
    res = train_detector(_cfg(tmp_path / "w", epochs=3, milestones=[2], warmup_steps=4, warmup_factor=0.1,
                              eval_every=2, grad_clip=0.5, ckpt_every=0))
    lr = 0.05
    want = [lr * (0.1 * (1 - s / 4) + s / 4) for s in range(4)] + [lr, lr] + [lr * 0.1] * 3
    assert seen == pytest.approx(want, rel=1e-12) and seen[0] == pytest.approx(0.005)
    assert len(norms) == 9 and max(norms) <= 0.5 + 1e-6 and norms[0] == pytest.approx(0.5, rel=1e-4)   # clipped
    rows = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx([want[2], want[5], want[8]], rel=1e-12)
    assert ["mAP" in r for r in rows] == [False, True, True]
    assert res.status == "ok" and res.metrics["mAP"] == rows[-1]["mAP"] and set(res.metrics) == \
        {"train_loss", "images_per_s", "mAP"}
    cfg = json.loads((tmp_path / "w" / "result.json").read_text())["config"]
    assert cfg["warmup_steps"] == 4 and cfg["lr"] == lr and cfg["fuse_pws"] is False


def test_detection_resume_checks_are_the_engines(fake, tmp_path):
    from pwsconv.train import ConfigMismatchError, RunDirError

    train_detector(_cfg(tmp_path / "r", max_steps=2))
    with pytest.raises(RunDirError, match="already holds files"):
        train_detector(_cfg(tmp_path / "r", max_steps=2))
    with pytest.raises(ConfigMismatchError, match="lr 0.05 → 0.1"):
        train_detector(_cfg(tmp_path / "r", max_steps=2, lr=0.1), resume=True)
    more = train_detector(_cfg(tmp_path / "r", max_steps=4, progress=True), resume=True)   # length: continues
    assert more.step == 4 and more.status == "ok"
