"""pwsconv.experiments.speed: the interleaved timing shared by Table 1 and the benchmarks."""

from __future__ import annotations

import pytest
import torch

from pwsconv.experiments.speed import timed_interleaved, train_step_fn, train_step_rates
from pwsconv.models import build_model

torch.set_num_threads(1)


def test_timed_interleaved_round_robin_order_and_medians():
    order = []
    t = timed_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=3, warmup=1)
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b"]   # warm-up, then 3 rounds, each rotated by one
    assert set(t) == {"a", "b"} and all(v >= 0 for v in t.values())


@pytest.mark.parametrize("kw", [dict(repeats=0), dict(warmup=-1), dict(inner=0)])
def test_timed_interleaved_rejects_bad_counts(kw):
    with pytest.raises(ValueError):
        timed_interleaved({"a": lambda: None}, **kw)


def test_train_step_fn_trains():
    torch.manual_seed(0)
    net = build_model("tiny_cnn", "pws", num_classes=10, in_channels=1)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    step = train_step_fn(net, x, y, lr=0.1)
    step()
    changed = [k for k, v in net.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.endswith("weight") for k in changed) and any(k.endswith("alpha") for k in changed)
    assert getattr(net, "_pws_fuse_handle", None) is not None     # fused, as the engine trains


def test_train_step_rates():
    r = train_step_rates("tiny_cnn", ["none", "pws"], 4, image_size=8, in_channels=1, repeats=2, warmup=1)
    assert list(r) == ["none", "pws"]
    assert r["none"]["ratio_to_first"] == 1.0
    for v in r.values():
        assert v["ms"] > 0 and v["images_per_s"] == pytest.approx(4 / (v["ms"] / 1e3))
    with pytest.raises(ValueError):
        train_step_rates("tiny_cnn", ["none"], 0)


def test_train_step_fn_calls_extra_between_backward_and_step():
    torch.manual_seed(0)
    net = build_model("tiny_cnn", "pws", num_classes=10, in_channels=1)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    seen = []

    def extra():   # gradients of this step are there, the weights not yet updated
        seen.append((all(p.grad is not None for p in net.parameters() if p.requires_grad),
                     {k: v.clone() for k, v in net.state_dict().items()}))

    before = {k: v.clone() for k, v in net.state_dict().items()}
    step = train_step_fn(net, x, y, lr=0.1, extra=extra)
    step()
    assert len(seen) == 1 and seen[0][0]
    assert all(torch.equal(v, before[k]) for k, v in seen[0][1].items())


def test_train_step_returns_loss_and_logits_with_amp_and_scaler():
    from pwsconv import param_groups
    from pwsconv.train.engine import _grad_scaler
    from pwsconv.train.step import train_step

    torch.manual_seed(0)
    net = build_model("tiny_cnn", "pws", num_classes=10, in_channels=1)
    opt = torch.optim.SGD(param_groups(net, 5e-4), lr=0.1, momentum=0.9)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    loss, out = train_step(net, opt, x, y)
    assert out.shape == (8, 10) and loss.dtype == torch.float32 and loss.requires_grad
    loss, out = train_step(net, opt, x, y, amp=torch.bfloat16, device_type="cpu")
    assert out.dtype == torch.bfloat16 and loss.dtype == torch.float32
    scaler = _grad_scaler(torch.device("cpu"), "fp16")   # as the engine makes it for amp: fp16
    calls = []
    loss, out = train_step(net, opt, x, y, amp=torch.bfloat16, device_type="cpu", scaler=scaler,
                           before_step=lambda: calls.append(scaler.get_scale()))
    assert calls and torch.isfinite(loss)
