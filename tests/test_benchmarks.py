"""The benchmark harness runs end to end on a tiny model (timings themselves are never asserted)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def test_bench_methods_suites(tmp_path, capsys):
    bench = _script("bench_methods")
    out = tmp_path / "r"
    assert bench.main(["--suite", "train", "memory", "floor", "fold", "--models", "tiny_cnn", "--methods", "none",
                       "bn", "pws", "--batch-sizes", "2", "--image", "8", "--repeats", "1", "--warmup", "0",
                       "--device", "cpu", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    by = {(r["suite"], r["method"]): r for r in rows}
    assert {s for s, _ in by} == {"train", "memory", "floor", "fold"}
    assert {"pws", "pws (unfused)", "pws (recompute)"} <= {m for s, m in by if s == "train"}
    assert {m for s, m in by if s == "floor"} == {"none", "pws", "eq. 12 kernels only"}
    # memory is deterministic: rebuilding α·Ŵ in backward keeps exactly the plain-conv network's tensors
    mem = {m: r["mib"] for (s, m), r in by.items() if s == "memory"}
    assert mem["pws (recompute)"] == pytest.approx(mem["none"], rel=0.05) and mem["pws (recompute)"] < mem["pws"]
    assert "### memory" in (out / "results.md").read_text()


def test_ab_before_after_runs_and_rejects_a_non_package(tmp_path):
    ab = _script("ab_before_after")
    out = tmp_path / "ab"
    assert ab.main(["--before", str(ROOT / "src" / "pwsconv"), "--models", "tiny_cnn", "--batch-sizes", "2",
                    "--repeats", "1", "--warmup", "0", "--out", str(out)]) == 0
    (row,) = json.loads((out / "results.json").read_text())["rows"]
    assert {"bn", "pws before", "pws after", "pws after (recompute)"} <= set(row)
    with pytest.raises(SystemExit, match="not a package"):
        ab.main(["--before", str(tmp_path), "--out", str(out)])


def test_ab_eval_before_after_runs(tmp_path):
    ab = _script("ab_eval_before_after")
    out = tmp_path / "eval.json"
    assert ab.main(["--before", str(ROOT / "src" / "pwsconv"), "--models", "tiny_cnn", "--batch-sizes", "2",
                    "--repeats", "1", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert {"pws before", "pws after", "pws folded"} <= set(row) and row["none_ms"] > 0


def test_count_ops_counts_a_training_step(tmp_path):
    """benchmarks/count_ops.py: ops of one engine step per method, views excluded; auto's clipping adds ops."""
    mod = _script("count_ops")
    out = tmp_path / "ops.json"
    assert mod.main(["--model", "resnet_cifar_small", "--json", str(out)]) == 0
    counts = {k: v["total"] for k, v in json.loads(out.read_text())["counts"].items()}
    assert set(counts) == {"plain conv", "BN", "PWS fused", "auto fused"}
    assert 0 < counts["plain conv"] < counts["PWS fused"] < counts["auto fused"]
    t, c = torch.ones(3), mod.OpCounter()
    with c:
        t.view(3, 1).t()                      # views only: nothing counted
    assert c.total == 0


def test_fused_cat_limit_and_auto_step_table(tmp_path, capsys):
    """benchmarks/fused_cat_limit.py times the per-layer path against the fused node at several limits (and puts the
    library's limit back); benchmarks/auto_step_table.py summarizes a screen against the preset's cells."""
    from pwsconv.accel import fused as fused_module

    limit = fused_module.CPU_CAT_LIMIT
    assert _script("fused_cat_limit").main(["--model", "tiny_cnn", "--image", "8", "--repeats", "1",
                                           "--limits", "0", "inf"]) == 0
    assert fused_module.CPU_CAT_LIMIT == limit
    assert capsys.readouterr().out.startswith("| tiny_cnn | 2 |")
    base, screen = tmp_path / "base", tmp_path / "screen"
    for folder, name, acc in ((base, "lr_plain_bn_lr0.1_s0", 0.6), (screen, "plain_lr0.1_s0", 0.55),
                              (screen, "plain_lr0.1_s1", None)):
        (folder / name).mkdir(parents=True)
        (folder / name / "result.json").write_text(json.dumps({"metrics": {"test_acc": acc}}))
    assert _script("auto_step_table").main([str(screen), "--base", str(base), "--label", "cand"]) == 0
    md = (screen / "summary.md").read_text()
    assert "| plain | BN | — | 40.00 (1 seed) |" in md
    assert "| plain | cand | — | 45.00 ✗1/2 (2 seeds) |" in md


def test_auto_bias_screen_report(tmp_path, capsys):
    """benchmarks/auto_bias_screen.py --report: mean ± std of the screened auto cells beside the preset's BN, paper
    PWS and auto cells; missing cells are dashes, a NaN run counts as NaN."""
    mod = _script("auto_bias_screen")
    base, out = tmp_path / "base", tmp_path / "screen"
    rows = [(base, "lr_residual_bn_lr0.1_s0", 0.6), (base, "lr_residual_bn_lr0.1_s1", 0.7),
            (out, "lr_residual_pws_auto_lr0.1_s0", 0.65), (out, "lr_residual_pws_auto_lr3.2_s0", None)]
    for folder, name, acc in rows:
        (folder / name).mkdir(parents=True)
        (folder / name / "result.json").write_text(json.dumps(
            {"status": "ok" if acc is not None else "nan", "metrics": {"test_acc": acc}}))
    (out / "floor.txt").write_text("0.1\n")
    assert mod.main(["--floor", "0.1", "--out", str(out), "--base", str(base), "--report"]) == 0
    text = capsys.readouterr().out
    assert "| residual | BN | – | 35.00 ± 7.07 (2 seeds) |" in text
    assert "| residual | auto, β floor 0.1 | – | 35.00 (1 seed) | – | – | NaN (1 seed) |" in text


def test_activation_scales_of_a_trained_run(tmp_path, capsys):
    """Per-unit channel scales of a trained run: one row per conv unit of the zoo, finite, ≥ 1 for max / min; a
    directory without a checkpoint is refused before any work (exit 2)."""
    import pwsconv
    from pwsconv.config import TrainConfig
    from pwsconv.models import ConvUnit
    from pwsconv.train import train

    cfg = TrainConfig(model="tiny_cnn", method="pws", dataset="digits", limit=64, test_limit=40, batch_size=32,
                      epochs=1, lr=0.05, progress=False, num_threads=1, out_dir=str(tmp_path / "run"),
                      ckpt_every=0).validate()
    train(cfg)
    scales = _script("activation_scales")
    assert scales.main([str(tmp_path / "run"), "--images", "20", "--json", str(tmp_path / "s.json")]) == 0
    rows = json.loads((tmp_path / "s.json").read_text())[str(tmp_path / "run")]
    units = sum(isinstance(m, ConvUnit) for m in pwsconv.load(tmp_path / "run").modules())
    assert len(rows) == units > 0
    assert all(torch.isfinite(torch.tensor([float(v) for v in r.values()])).all() and r["max_over_min"] >= 1.0
               and 0 <= r["dead"] <= r["channels"] for r in rows)
    assert "| unit | mean channel std |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        scales.main([str(tmp_path / "nothing")])
    assert e.value.code == 2


def test_autoclip_screen_clips_each_tensor_to_its_own_percentile(tmp_path, monkeypatch):
    """benchmarks/autoclip_screen.py: a tensor's gradient is clipped to the percentile of its own norm history (the
    current norm included); installed, it clips every parameter of a training run, each step, and restores nothing
    else (the task's bind is patched for this process only — here undone by monkeypatch)."""
    from pwsconv.config import TrainConfig
    from pwsconv.models import build_model
    from pwsconv.train import train
    from pwsconv.train.task import ClassificationTask

    mod = _script("autoclip_screen")
    clip = mod.AutoClip(50)
    hook = clip.hook(0)
    for norm, want in ((1.0, 1.0), (3.0, 2.0), (2.0, 2.0)):   # median of [1], [1, 3], [1, 3, 2]
        g = torch.tensor([norm, 0.0])
        assert float(hook(g).norm()) == pytest.approx(want)
    assert (clip.seen, clip.held) == (3, 1) and clip.kept == [pytest.approx(2 / 3)]

    monkeypatch.setattr(ClassificationTask, "bind", ClassificationTask.bind)
    for scope in ("layer", "model"):
        log: dict = {"clips": []}
        mod.install(10, scope, log)
        cfg = TrainConfig(model="tiny_cnn", method="pws", dataset="digits", epochs=1, max_steps=3, limit=64,
                          test_limit=32, batch_size=16, lr=0.1, device="cpu", progress=False,
                          out_dir=str(tmp_path / scope), ckpt_every=0)
        assert train(cfg).status == "ok"
        (c,) = log["clips"]
        n_params = len(list(build_model("tiny_cnn", "pws", num_classes=10, in_channels=1).parameters()))
        assert len(c.hist) == (n_params if scope == "layer" else 1)
        assert c.seen == 3 * len(c.hist) and 0 < c.held < c.seen


def test_auto_relax_screen_loosens_the_chosen_bounds_with_the_steps(tmp_path, monkeypatch):
    """benchmarks/auto_relax_screen.py: after t steps every auto layer clips with its chosen bounds × max(1, t/T)^p
    (β's floor and the per-vector choice unchanged)."""
    from pwsconv.config import TrainConfig
    from pwsconv.train import train
    from pwsconv.train.task import ClassificationTask

    from pwsconv.layers import _auto

    mod = _script("auto_relax_screen")
    monkeypatch.setattr(_auto, "AUTO_W_FOLLOWS_LR", False)   # the screen's baseline is round 9 (its main sets this)
    assert [mod.relax_factor(t, 78, 1.0) for t in (1, 78, 156)] == [1.0, 1.0, 2.0]
    assert mod.relax_factor(400, 0, 1.0) == 1.0 and mod.relax_factor(4, 2, 2.0) == 4.0
    monkeypatch.setattr(ClassificationTask, "bind", ClassificationTask.bind)
    log: dict = {"runs": []}
    mod.install(1, 1.0, log)
    cfg = TrainConfig(model="tiny_cnn", method="pws", method_opts={"gamma": "auto"}, dataset="digits", epochs=1,
                      max_steps=3, limit=64, test_limit=32, batch_size=16, lr=1.6, device="cpu", progress=False,
                      out_dir=str(tmp_path / "run"), ckpt_every=0)
    train(cfg)
    (state,) = log["runs"]
    assert state["t"] == 3 and state["factor"] == 3.0 and state["base"]
    for base in state["base"].values():
        assert base[:2] == (0.005, 0.005)   # LR 1.6: λ_W at its floor, λ of α and β 0.005 (round 8)
    assert all(m.clips()[:2] == (0.015, 0.015) for m in state["layers"]) and state["layers"]   # what the layers use
    log = {"runs": []}
    mod.install(1, 1.0, log, follow_lr=True)   # the bounds of the current LR: at a decayed LR 0.16, W's loosen
    train(dataclasses.replace(cfg, out_dir=str(tmp_path / "follow"), milestones=[1], lr_decay=0.1, epochs=2,
                              max_steps=6))
    (state,) = log["runs"]
    want = mod.follow_lr_clips(1.6 * 0.1, 0.9)
    assert state["clips"] == want and state["clips"][0] == pytest.approx(0.125)
    assert all(m.clips() == state["clips"] for m in state["layers"])


def test_auto_follow_mechanism_records_w_clipping_per_step():
    """benchmarks/auto_follow_mechanism.py: one row per optimizer step with W's held share and kept norm share
    (at LR 1.6 the filters of a loss ×100 are held; after a decay ×0.01 round 10's looser bound holds few)."""
    import pwsconv
    from pwsconv.models import build_model

    mod = _script("auto_follow_mechanism")
    torch.manual_seed(0)
    net = build_model("tiny_cnn", method="pws", method_opts={"gamma": "auto"}, in_channels=1)
    opt = torch.optim.SGD(pwsconv.param_groups(net, 5e-4), lr=1.6, momentum=0.9)
    rows = mod.record_w_clipping(net, opt)
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        x, y = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
        loss = 100 * torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 1:
            opt.param_groups[0]["lr"] = 0.016
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and [r["lr"] for r in rows] == [1.6, 1.6, 0.016, 0.016]
    assert all(0 <= r["held"] <= 1 and 0 < r["kept"] <= 1 for r in rows)
    assert rows[0]["held"] > 0.5 and rows[0]["kept"] < 0.5 and rows[3]["held"] < 0.2 and rows[3]["kept"] > 0.9
