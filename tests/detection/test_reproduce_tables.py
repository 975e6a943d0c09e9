"""`pwsconv reproduce voc_table1 | voc_table2 | coco_table3 | imagenet_table5`: the grids, dry runs and bad input run
in the main environment (no torchvision needed); the smoke presets run end to end, resumably, where torchvision is."""

from __future__ import annotations

import importlib.util
import json

import pytest

from pwsconv.cli import main
from pwsconv.experiments.detection import PAPER_TABLE3, PAPER_TABLE5, build_det_runs, reproduce_extra

HAVE_TV = importlib.util.find_spec("torchvision") is not None


def test_full_grids_follow_the_paper(tmp_path):
    t1 = build_det_runs("voc_table1", "full", str(tmp_path), make_data=False)
    assert len(t1) == 18 and {r.labels["batch"] for r in t1} == {2, 4, 8}
    c = t1[-1].config
    assert (c.model, c.size, c.lr, c.epochs, c.milestones, c.weight_decay, c.momentum) == \
        ("ssd_vgg16", 320, 1e-2, 240, [90, 170], 5e-4, 0.9)
    assert [r.config.method_opts for r in t1 if r.labels["method"] == "pws"][0] == {"gamma": 1e-3}
    t2 = build_det_runs("voc_table2", "full", str(tmp_path), make_data=False)
    assert len(t2) == 13 and all(r.config.batch_size == 16 for r in t2)
    no_gain = [r for r in t2 if r.labels["gain"] == "✗"][0].config
    assert no_gain.method_opts == {"gamma": 1e-3, "use_gain": False, "use_alpha": False} and no_gain.lr == 1e-2
    assert {r.config.model for r in t2 if r.labels["backbone"] == "ResNet-50"} == {"ssd_resnet50"}
    t3 = build_det_runs("coco_table3", "full", str(tmp_path), make_data=False)
    assert {(r.labels["structure"], r.labels["method"], r.labels["schedule"]) for r in t3} == set(PAPER_TABLE3)
    mr = [r.config for r in t3 if r.labels["structure"] == "Mask R-CNN"][0]
    assert mr.masks and mr.epochs == 12 and mr.milestones == [8, 11] and mr.batch_size == 4 and mr.weights
    ssd2x = [r.config for r in t3 if r.labels["schedule"] == "2x"][0]
    assert ssd2x.epochs == 150 and ssd2x.milestones == [60, 100, 140] and ssd2x.batch_size == 16
    t5 = build_det_runs("imagenet_table5", "full", str(tmp_path), make_data=False)
    assert {r.labels["method"] for r in t5} == set(PAPER_TABLE5)
    c5 = t5[0].config
    assert (c5.model, c5.dataset, c5.batch_size, c5.lr, c5.epochs, c5.milestones, c5.weight_decay) == \
        ("resnet50", "imagenet", 64, 0.025, 100, [30, 60, 90], 1e-4)


def test_dry_run_prints_grid_and_estimate(capsys):
    assert main(["reproduce", "voc_table1", "--full", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "pws_b2" in out and "18 runs" in out and "GPU-hours" in out
    info = reproduce_extra("coco_table3", "full", dry_run=True, log=None)
    assert info["n_runs"] == 7 and info["estimated_seconds"] > 3600


@pytest.mark.parametrize("argv,msg", [
    (["reproduce", "voc_table1", "--full"], "needs --data-root"),
    (["reproduce", "coco_table3", "--full", "--data-root", "."], "needs --weights"),
    (["reproduce", "imagenet_table5", "--full", "--data-root", "/nonexistent"], "not a directory"),
    (["reproduce", "voc_table1", "--full", "--data-root", "."], "no VOCdevkit"),
    (["reproduce", "voc_table1", "--preset", "fast"], "unknown preset"),
    (["reproduce", "voc_table1", "--seeds", "3"], "one seed"),
    (["reproduce", "table1", "--weights", "x.pth", "--dry-run"], "--weights is for coco_table3"),
])
def test_bad_input_is_one_line_exit_2(argv, msg, capsys):
    if not HAVE_TV and "--dry-run" not in argv and "--seeds" not in argv:
        msg = "needs torchvision"   # the main environment: refused before anything else
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1


@pytest.mark.skipif(not HAVE_TV, reason="the smoke presets train torchvision detectors")
def test_smoke_presets_end_to_end_and_resumable(tmp_path, capsys, monkeypatch):
    pytest.importorskip("pycocotools")
    monkeypatch.setenv("PWSCONV_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "t1"
    assert main(["reproduce", "voc_table1", "--preset", "smoke", "--out", str(out)]) == 0
    md = (out / "results.md").read_text()
    assert "| pws | 52.72 |" in md and "76.93" in md           # the paper's numbers beside the measured
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert {r["run"] for r in rows} == {"bn_b2", "pws_b2"} and all(r["status"] == "ok" for r in rows)
    assert all(0 <= r["mAP"] <= 100 for r in rows)
    assert not any(p.suffix == ".jpg" for p in out.rglob("*"))   # the synthetic images live in the cache, not here
    capsys.readouterr()
    assert main(["reproduce", "voc_table1", "--preset", "smoke", "--out", str(out)]) == 0   # resumed: all skipped
    assert "2 already done" in (out / "results.md").read_text()
    out2 = tmp_path / "t2"
    assert main(["reproduce", "voc_table2", "--preset", "smoke", "--out", str(out2)]) == 0
    rows2 = {json.loads(x)["run"]: json.loads(x) for x in (out2 / "results.jsonl").read_text().splitlines()}
    assert rows2["r09_pws_lr0.01_vgg"]["status"] == "nan"   # no √(2/n_l), no α at LR 1e-2: collapses, as the paper's NaN
    assert rows2["r02_bn_lr0.001_vgg"]["status"] == "ok" and "77.19" in (out2 / "results.md").read_text()
    out3 = tmp_path / "t3"
    assert main(["reproduce", "coco_table3", "--preset", "smoke", "--out", str(out3)]) == 0
    rows3 = {json.loads(x)["run"]: json.loads(x) for x in (out3 / "results.jsonl").read_text().splitlines()}
    assert set(rows3) == {"maskrcnn_gn_1x", "maskrcnn_pws_1x", "ssd_pws_1x"}
    assert all(r["status"] == "ok" and 0 <= r["AP"] <= 100 for r in rows3.values())
    assert all(0 <= rows3[k]["segm_AP"] <= 100 for k in ("maskrcnn_gn_1x", "maskrcnn_pws_1x"))
    assert "38.90" in (out3 / "results.md").read_text()
    assert (tmp_path / "cache" / "synthetic" / "detection_48_16_96" / "VOCdevkit" / "VOC2007" / "Annotations").is_dir()
    from pwsconv.data.datasets import find_data_root

    try:   # Table 5's smoke preset streams a tree of real CIFAR-10 JPEGs from the shared data
        find_data_root("cifar10")
    except Exception:
        pytest.skip("the shared CIFAR-10 data are not here (Table 5's smoke preset needs them); tables 1-3 passed")
    out5 = tmp_path / "t5"
    assert main(["reproduce", "imagenet_table5", "--preset", "smoke", "--out", str(out5)]) == 0
    md5 = (out5 / "results.md").read_text()
    assert "| pws | 24.00 |" in md5 and "top-5" in md5
