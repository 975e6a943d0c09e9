"""Detection pipelines (Tables 1–3) end to end on a small real-pixel set the tests build: MNIST digits pasted on
CIFAR-10 photographs, written as a VOCdevkit (JPEG + VOC XML) and as COCO (instances json with RLE masks from the
digits' pixels), read back through torchvision's datasets, augmented by SSD's transforms.v2 recipe, scored by
pycocotools. Needs torchvision + pycocotools (the integration environment); skipped cleanly without them."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision")
# with torchvision present, pycocotools is required (the "detection" extra): a missing evaluator is a failure here,
# never a silent skip
import pycocotools  # noqa: E402,F401

from pwsconv.detection import build_detector  # noqa: E402
from pwsconv.detection.data import (  # noqa: E402
    DetectionLoader, coco_dataset, ssd_train_transform, voc_dataset)
from pwsconv.detection.evaluate import coco_gt_from_voc, voc07_map  # noqa: E402
from pwsconv.detection.models import DetectorError  # noqa: E402
from pwsconv.detection.synthetic import make_detection_set, shared_sources  # noqa: E402
from pwsconv.detection.train import DetConfig, train_detector  # noqa: E402
from pwsconv.train.checkpoint import load_checkpoint  # noqa: E402

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    try:
        shared_sources()
    except ValueError as e:
        pytest.skip(str(e))
    return make_detection_set(tmp_path_factory.mktemp("synth"), n_train=320, n_test=80, canvas=96, seed=0)


def _voc_cfg(synth, out, **kw):
    base = dict(model="ssd_tiny", method="pws", method_opts={"gamma": 1e-3}, dataset="voc",
                data_root=synth["voc_root"], classes=synth["classes"], size=96, batch_size=16, eval_batch_size=40,
                lr=0.05, epochs=100, max_steps=160, num_workers=1, num_threads=1, out_dir=str(out), progress=False,
                ckpt_every=0, log_every=10, seed=0)
    base.update(kw)
    return DetConfig.from_dict(base)


def test_readers_boxes_masks_and_augmentation(synth):
    tr = voc_dataset(synth["voc_root"], "07+12", train=True, classes=synth["classes"])
    te = voc_dataset(synth["voc_root"], "07test", train=False, classes=synth["classes"])
    assert len(tr) == 320 and len(te) == 80 and len(tr.parts) == 2          # VOC2007 + VOC2012 trainval
    img, t = tr[0]
    assert img.size == (96, 96) and t["boxes"].shape[1] == 4 and (t["labels"] >= 1).all() and (t["labels"] <= 10).all()
    assert "difficult" in te[0][1]
    co = coco_dataset(synth["coco_root"], "train2017", train=True, masks=True)
    cimg, ct = co[0]
    # the same image and objects in both formats; COCO masks are the digits' pixels inside their boxes
    assert torch.equal(torch.sort(ct["labels"]).values, torch.sort(t["labels"]).values)
    assert torch.allclose(torch.sort(ct["boxes"].float(), 0).values, torch.sort(t["boxes"].float(), 0).values, atol=1.0)
    m, b = ct["masks"][0].bool(), ct["boxes"][0]
    ys, xs = torch.nonzero(m, as_tuple=True)
    assert abs(xs.min().item() - b[0].item()) <= 1 and abs(ys.max().item() + 1 - b[3].item()) <= 1
    assert 0.1 < m.float().sum().item() / ((b[2] - b[0]) * (b[3] - b[1])).item() < 0.9   # ink, not the whole box
    # SSD augmentation: seeded per item (same seed, same sample), boxes kept inside the image
    L = DetectionLoader(tr, ssd_train_transform(), 8, train=True, num_workers=0, seed=5)
    L2 = DetectionLoader(tr, ssd_train_transform(), 8, train=True, num_workers=2, seed=5)
    (ia, ta), (ib, tb) = next(iter(L)), next(iter(L2))
    for x, y, p, q in zip(ia, ib, ta, tb):
        assert torch.equal(x, y) and torch.equal(p["boxes"], q["boxes"])
        h, w = x.shape[-2:]
        assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
        assert (p["boxes"][:, 2] <= w + 1e-3).all() and (p["boxes"][:, 3] <= h + 1e-3).all()
        assert len(p["boxes"]) == len(p["labels"])
    assert any(x.shape[-1] != 96 for x in ia)   # zoom-out / IoU crop changed some sizes


def test_voc07_metric_on_known_detections(synth):
    te = voc_dataset(synth["voc_root"], "07test", train=False, classes=synth["classes"])
    gt = coco_gt_from_voc(te)
    perfect = []
    for i in range(len(te)):
        a = te.annotation(i)
        for bx, lab in zip(a["boxes"], a["labels"]):
            perfect.append({"image_id": i, "category_id": lab, "bbox": [bx[0], bx[1], bx[2] - bx[0], bx[3] - bx[1]],
                            "score": 0.9})
    assert voc07_map(gt, perfect)["mAP"] == pytest.approx(100.0)
    shifted = [dict(d, bbox=[d["bbox"][0] + d["bbox"][2], *d["bbox"][1:]]) for d in perfect]   # IoU 0 with its box
    assert voc07_map(gt, shifted)["mAP"] == pytest.approx(0.0)
    half = perfect[::2]   # recall about 0.5 at precision 1 → 11-point AP about 6/11
    assert 40 < voc07_map(gt, half)["mAP"] < 65
    assert voc07_map(gt, [])["mAP"] == 0.0


def test_ssd_trains_to_a_map_well_above_untrained(synth, tmp_path):
    untrained = train_detector(_voc_cfg(synth, tmp_path / "u", max_steps=1, lr=1e-6))
    trained = train_detector(_voc_cfg(synth, tmp_path / "t"))
    u, t = untrained.metrics["mAP"], trained.metrics["mAP"]
    print(f"SSD (tiny VGG backbone, PWS γ=1e-3) VOC07 mAP on the synthetic set: untrained {u:.2f}, "
          f"after 160 steps {t:.2f}; {trained.metrics['images_per_s']:.1f} img/s")
    assert trained.status == "ok" and trained.step == 160
    assert t > 8.0 and t > 10 * max(u, 0.1)
    rows = [json.loads(x) for x in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["mAP"] == pytest.approx(t) and rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert "mAP" in (tmp_path / "t" / "metrics.csv").read_text().splitlines()[0]


def test_mid_epoch_resume_is_exact_and_collapse_is_a_result(synth, tmp_path):
    kw = dict(max_steps=6, ckpt_every=2, eval_batch_size=80, test_limit=16, limit=64)
    ref = train_detector(_voc_cfg(synth, tmp_path / "ref", **kw))

    class Crash(RuntimeError):
        pass

    def crash(step):
        if step == 3:
            raise Crash()

    with pytest.raises(Crash):
        train_detector(_voc_cfg(synth, tmp_path / "c", **kw), on_step=crash)
    assert load_checkpoint(tmp_path / "c" / "checkpoint.pt", formats=("pwsconv-detection-checkpoint",))["step"] == 2
    res = train_detector(_voc_cfg(synth, tmp_path / "c", **kw), resume=True)
    assert res.step == 6
    a = load_checkpoint(tmp_path / "ref" / "checkpoint.pt", formats=("pwsconv-detection-checkpoint",))
    b = load_checkpoint(tmp_path / "c" / "checkpoint.pt", formats=("pwsconv-detection-checkpoint",))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert res.metrics["mAP"] == pytest.approx(ref.metrics["mAP"])
    again = train_detector(_voc_cfg(synth, tmp_path / "c", **kw), resume=True)   # finished: returns at once
    assert again.step == 6
    with pytest.raises(ValueError, match="already holds files"):
        train_detector(_voc_cfg(synth, tmp_path / "c", **kw))
    # the paper's "cannot be trained" rows: plain convs at a huge LR collapse → status nan, NaN mAP
    bad = train_detector(_voc_cfg(synth, tmp_path / "nan", method="none", method_opts={}, lr=50.0, max_steps=10,
                                  limit=64, test_limit=16, log_every=1))
    assert bad.status == "nan" and bad.metrics["mAP"] != bad.metrics["mAP"]


@pytest.mark.parametrize("method,opts", [("bn", {}), ("gn", {}), ("in", {}), ("sn", {}), ("wn", {}),
                                         ("pws", {"gamma": "auto"}), ("none", {})])
def test_ssd_vgg16_paper_model_converts_and_steps(method, opts):
    torch.manual_seed(0)
    m = build_detector("ssd_vgg16", method, num_classes=21, size=320, method_opts=opts)
    names = {type(x).__name__ for x in m.backbone.modules()}
    if method != "bn":
        assert "BatchNorm2d" not in names
    if method == "pws":
        assert any("PWS" in n for n in names)
    convs = [x for x in m.backbone.modules() if isinstance(x, torch.nn.Conv2d)]
    assert len(convs) == 13 + 2 + 8   # VGG-16's 13, fc6/fc7, the 8 extra convs
    images = [torch.rand(3, 200, 260), torch.rand(3, 240, 180)]   # BN's 1×1 last map needs 2 images per batch
    targets = [{"boxes": torch.tensor([[20.0, 30.0, 120.0, 150.0]]), "labels": torch.tensor([3])},
               {"boxes": torch.tensor([[5.0, 5.0, 60.0, 90.0], [70.0, 100.0, 170.0, 230.0]]),
                "labels": torch.tensor([1, 20])}]
    losses = m(images, targets)
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    m.eval()
    with torch.no_grad():
        out = m(images)
    assert out[0]["boxes"].shape[1] == 4


def test_builder_errors_are_one_line(tmp_path):
    for call, msg in [(lambda: build_detector("yolo", "bn", num_classes=21), "unknown detector"),
                      (lambda: build_detector("ssd_vgg16", "xx", num_classes=21), "unknown method"),
                      (lambda: build_detector("ssd_vgg16", "bn", num_classes=21, size=128), "size ≥ 268"),
                      (lambda: build_detector("maskrcnn_resnet50_fpn", "bn", num_classes=91,
                                              weights=tmp_path / "none.pth"), "file not found")]:
        with pytest.raises(DetectorError, match=msg) as e:
            call()
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="weights .*file not found"):
        DetConfig.from_dict({"model": "maskrcnn_resnet50_fpn", "weights": str(tmp_path / "x.pth")})


def test_mask_rcnn_pretrained_backbone_trains_and_scores_masks(synth, tmp_path):
    import torchvision

    wfile = tmp_path / "resnet50.pth"   # a stand-in for torchvision's ImageNet file (none can be downloaded here)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), wfile)
    cfg = DetConfig.from_dict(dict(
        model="maskrcnn_resnet50_fpn", method="pws", method_opts={"gamma": 1e-4}, weights=str(wfile),
        dataset="coco", data_root=synth["coco_root"], train_sets="train2017", test_sets="val2017", masks=True,
        size=64, batch_size=2, eval_batch_size=8, lr=0.01, weight_decay=1e-4, warmup_steps=2, epochs=1, max_steps=3,
        limit=16, test_limit=8, num_workers=0, num_threads=1, out_dir=str(tmp_path / "mrcnn"), progress=False,
        ckpt_every=0, model_opts={"box_batch_size_per_image": 32, "rpn_post_nms_top_n_train": 100}))
    res = train_detector(cfg)
    assert res.status == "ok" and res.step == 3
    for k in ("AP", "AP50", "AP75", "segm_AP", "segm_AP50"):
        assert 0.0 <= res.metrics[k] <= 100.0, k
    m = build_detector("maskrcnn_resnet50_fpn", "pws", num_classes=11, size=64, weights=wfile)
    body = m.backbone.body
    assert not any(isinstance(x, torch.nn.BatchNorm2d) for x in body.modules())
    assert not body.conv1.weight.requires_grad and body.layer2[0].conv1.weight.requires_grad   # stem frozen
    ref = torchvision.models.resnet50(weights=None)
    ref.load_state_dict(torch.load(wfile, weights_only=True))
    assert torch.equal(body.layer3[0].conv2.weight, ref.layer3[0].conv2.weight)   # copied from the file
    bn = build_detector("maskrcnn_resnet50_fpn", "bn", num_classes=11, size=64, weights=wfile)
    assert any(type(x).__name__ == "FrozenBatchNorm2d" for x in bn.backbone.body.modules())


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs gloo")
def test_two_process_detection_run(synth, tmp_path, torchrun):
    script = tmp_path / "run.py"
    script.write_text(
        "import sys\nfrom pwsconv.detection.train import DetConfig, train_detector\n"
        f"cfg = DetConfig.from_dict(dict(model='ssd_tiny', method='gn', dataset='voc', data_root={synth['voc_root']!r},"
        f" classes={synth['classes']!r}, size=96, batch_size=8, eval_batch_size=8, lr=0.01, epochs=1, max_steps=2,"
        " limit=32, test_limit=16, num_workers=0, num_threads=1, out_dir=sys.argv[1], progress=False, ckpt_every=0))\n"
        "r = train_detector(cfg)\nprint('RESULT', r.status, r.step, r.metrics['mAP'])\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
               PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    if os.path.isdir("/sys/class/net/lo"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    outs = {}
    for n in (1, 2):
        p = torchrun([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={n}",
                      "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", str(script), str(tmp_path / f"w{n}")],
                     env, tmp_path / f"w{n}", timeout=400)
        assert p.returncode == 0, p.stderr[-3000:]
        outs[n] = load_checkpoint(tmp_path / f"w{n}" / "checkpoint.pt", formats=("pwsconv-detection-checkpoint",))
    assert outs[2]["world_size"] == 2 and outs[1]["step"] == outs[2]["step"] == 2
    # SSD normalizes its loss by the positives of each process's own share (as torchvision's and mmdetection's
    # references do), so the 2-process update is not the single-process one; both trained (weights moved)
    init = build_detector("ssd_tiny", "gn", num_classes=11, size=96)
    k = "backbone.stem.0.0.weight"
    assert not torch.equal(outs[2]["model"][k], outs[1]["model"][k])
    assert all(torch.isfinite(v.float()).all() for v in outs[2]["model"].values())
    assert init.state_dict()[k].shape == outs[2]["model"][k].shape
    r1 = json.loads((tmp_path / "w1" / "result.json").read_text())
    r2 = json.loads((tmp_path / "w2" / "result.json").read_text())
    # rank 0 scored the detections of both shards: all 16 test images, as many boxes as the single process
    assert r2["metrics"]["detections"] >= 0.9 * r1["metrics"]["detections"] > 0
    assert r2["metrics"]["mAP"] == r2["metrics"]["mAP"]


@pytest.mark.parametrize("name,method", [("ssd_resnet50", "pws"), ("ssd_resnet50", "bn"),
                                         ("fasterrcnn_resnet50_fpn", "gn")])
def test_other_paper_detectors_step(name, method):
    torch.manual_seed(0)
    m = build_detector(name, method, num_classes=21, size=260 if name.startswith("ssd") else 64,
                       method_opts={"gamma": 1e-3} if method == "pws" else {})
    images = [torch.rand(3, 120, 150), torch.rand(3, 140, 110)]
    targets = [{"boxes": torch.tensor([[20.0, 30.0, 90.0, 100.0]]), "labels": torch.tensor([3])},
               {"boxes": torch.tensor([[5.0, 5.0, 60.0, 90.0]]), "labels": torch.tensor([7])}]
    losses = m(images, targets)
    loss = sum(losses.values())
    assert torch.isfinite(loss) and loss.item() < 100   # PWS's LayerNorm on the ResNet maps keeps the head sane
    loss.backward()
    if method == "pws":
        assert not any(isinstance(x, torch.nn.BatchNorm2d) for x in m.backbone.modules())
        assert m.backbone.out_norms is not None
