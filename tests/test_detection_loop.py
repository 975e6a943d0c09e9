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
