"""Tests of pwsconv.diagnostics: the variance-transmission probe (Figures 1, 2, 6; eqs. 5, 8, 13, 15)."""

from __future__ import annotations

import copy
import json
import os
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pwsconv
from pwsconv.diagnostics import (
    VarianceProbe,
    depth_report,
    measure_without_update,
    plot_figure1,
    plot_figure2,
    plot_figure6,
    plot_variance_transmission,
    read_csv,
    read_jsonl,
    run_probe_experiment,
    select,
)
from pwsconv.diagnostics.stats import filter_matrix

D = torch.float64
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: one intra-op thread avoids oversubscription when other suites run beside."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pvar(values) -> float:
    """Population variance of a list of floats / a tensor (the direct formula)."""
    v = [float(a) for a in (values.flatten() if isinstance(values, torch.Tensor) else values)]
    m = sum(v) / len(v)
    return sum((a - m) ** 2 for a in v) / len(v)


def mean(values) -> float:
    v = [float(a) for a in (values.flatten() if isinstance(values, torch.Tensor) else values)]
    return sum(v) / len(v)


def table(records) -> dict[tuple[int, str, str], float]:
    return {(r["step"], r["layer"], r["stat"]): r["value"] for r in records}


def he_conv(*args, **kw) -> nn.Conv2d:
    c = nn.Conv2d(*args, **kw)
    nn.init.kaiming_normal_(c.weight, nonlinearity="relu")
    if c.bias is not None:
        nn.init.zeros_(c.bias)
    return c


def chain(conv=he_conv, norm=None, c=6) -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = 3
    for _ in range(3):
        layers += [conv(cin, c, 3, padding=1), norm(c) if norm else nn.Identity(), nn.ReLU(inplace=True)]
        cin = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 3)]
    return nn.Sequential(*layers).to(D)


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    def __init__(self, c: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.block1 = Block(c)
        self.block2 = Block(c)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.relu(self.bn(self.stem(x)))
        x = self.block2(self.block1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def data(n_batches: int = 2, batch: int = 4, size: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=g, dtype=D), torch.randint(0, 3, (batch,), generator=g))
            for _ in range(n_batches)]


def hooks_empty(model: nn.Module) -> bool:
    for m in model.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs"):
            if getattr(m, attr, None):
                return False
    for p in model.parameters():
        if getattr(p, "_backward_hooks", None) or getattr(p, "_post_accumulate_grad_hooks", None):
            return False
    return True


# ---------------------------------------------------------------------------------------------------- statistics
def test_statistics_match_hand_computation():
    torch.manual_seed(1)
    conv1, conv2 = nn.Conv2d(2, 3, 2).to(D), nn.Conv2d(3, 4, 2).to(D)
    model = nn.Sequential(conv1, nn.ReLU(), conv2)
    x = torch.randn(3, 2, 5, 5, dtype=D) + 0.3
    lr = 0.1
    with VarianceProbe(model, lr=lr) as probe:
        out = model(x)
        (out ** 2).sum().backward()
    t = table(probe.records)
    assert {r["step"] for r in probe.records} == {0}
    assert [r["layer_index"] for r in probe.records if r["stat"] == "y_var"] == [0, 1]

    with torch.no_grad():
        y1 = conv1(x)
        xin = torch.relu(y1)
        y2 = conv2(xin)
    w, g = conv2.weight.detach(), conv2.weight.grad
    n = 3 * 2 * 2
    filt = [w[o].flatten() for o in range(4)]
    dw = [lr * g[o].flatten() for o in range(4)]
    var_o = [pvar(f) for f in filt]
    expect = {
        # Figure 2(a), eq. 5 terms
        "w_var_min": min(var_o), "w_var_mean": mean(var_o), "w_var_max": max(var_o),
        "w_shift": pvar([n * mean(f) for f in filt]),
        "transmission": mean([0.5 * n * v for v in var_o]),
        # Figure 1(a) / (b)
        "var_ratio_mean": mean([pvar(f - d) / pvar(f) for f, d in zip(filt, dw)]),
        "var_ratio_min": min(pvar(f - d) / pvar(f) for f, d in zip(filt, dw)),
        "var_ratio_max": max(pvar(f - d) / pvar(f) for f, d in zip(filt, dw)),
        "shift": pvar([n * mean(d) for d in dw]),
        "shift_rel": pvar([n * mean(d) for d in dw]) / (n * mean(torch.cat(dw) ** 2)),
        "grad_shift": pvar([n * mean(g[o]) for o in range(4)]),
        "grad_norm": math.sqrt(float((g ** 2).sum())),
        "bias_grad_norm": math.sqrt(float((conv2.bias.grad ** 2).sum())),
        "update_norm": math.sqrt(float((torch.cat(dw) ** 2).sum())),
        # Figure 6: per-sample E(x), E(x²)
        "x_mean": mean(xin), "x_sq": mean(xin ** 2),
        "x_mean_min": min(mean(xin[i]) for i in range(3)), "x_mean_max": max(mean(xin[i]) for i in range(3)),
        "x_sq_min": min(mean(xin[i] ** 2) for i in range(3)),
        "x_mean2_max": max(mean(xin[i]) ** 2 for i in range(3)),
        "x_ratio_mean": mean([mean(xin[i]) ** 2 / mean(xin[i] ** 2) for i in range(3)]),
        "x_ratio_min": min(mean(xin[i]) ** 2 / mean(xin[i] ** 2) for i in range(3)),
        # output variance and its eq. 14 split
        "y_var": pvar(y2), "y_mean": mean(y2),
        "y_chan_var_mean": mean([pvar(y2[:, o]) for o in range(4)]),
        "y_chan_mean_var": pvar([mean(y2[:, o]) for o in range(4)]),
        # eq. 5 from the previous layer's output, eq. 5 via E[X²] (eq. 2), eq. 15
        "y_var_pred": pvar(y1) * mean([0.5 * n * v for v in var_o]) + pvar([n * mean(f) * mean(xin) for f in filt]),
        "y_var_pred_x": mean(xin ** 2) * mean([n * v for v in var_o])
        + mean(xin) ** 2 * pvar([n * mean(f) for f in filt]),
        "amp_eq15": 1 + mean(xin) ** 2 / (2 * mean(xin ** 2)) * pvar([n * mean(f) for f in filt]),
        # eq. 8 statistic: ∇_Y L = 2·Y here
        "gy_mean_rel": max(abs(mean(2 * y2[:, o])) for o in range(4)) / math.sqrt(mean((2 * y2) ** 2)),
    }
    for stat, value in expect.items():
        assert t[(0, "2", stat)] == pytest.approx(value, rel=1e-10, abs=1e-14), stat
    assert math.isnan(t[(0, "0", "y_var_pred")])  # the first layer has no previous layer
    assert t[(0, "0", "y_var")] == pytest.approx(pvar(y1), rel=1e-12)


def test_pws_figure2_statistics_and_effective_weight():
    torch.manual_seed(2)
    conv = pwsconv.PWSConv2d(2, 3, 2, gamma=1e-3).to(D)
    with torch.no_grad():
        conv.alpha.copy_(torch.tensor([0.5, 1.0, 2.0]))
    x = torch.randn(2, 2, 4, 4, dtype=D)
    with VarianceProbe(conv, lr=0.5) as probe:
        conv(x).sum().backward()
    t = table(probe.records)
    name = "PWSConv2d"  # the root module has no name
    w = conv.weight.detach()
    var_o = [pvar(w[o]) for o in range(3)]
    inv = [1 / math.sqrt(v + 1e-3) for v in var_o]
    assert t[(0, name, "inv_std_min")] == pytest.approx(min(inv), rel=1e-12)
    assert t[(0, name, "inv_std_max")] == pytest.approx(max(inv), rel=1e-12)
    assert t[(0, name, "w_var_min")] == pytest.approx(min(var_o), rel=1e-12)
    eff = conv.standardized_weight().detach()
    n = 8
    eff_var = [pvar(eff[o]) for o in range(3)]
    assert t[(0, name, "eff.w_var_max")] == pytest.approx(max(eff_var), rel=1e-12)
    # α²·(2/n)·Var/(Var + γ), eq. 12
    assert t[(0, name, "eff.w_var_max")] == pytest.approx(
        max(a * a * 2 / n * v / (v + 1e-3) for a, v in zip([0.5, 1.0, 2.0], var_o)), rel=1e-10)
    assert abs(t[(0, name, "eff.w_shift")]) < 1e-25  # E[Ŵ_o] = 0
    assert t[(0, name, "alpha_grad_norm")] == pytest.approx(float(conv.alpha.grad.norm()), rel=1e-12)
    # ΔW_eff = Ŵ(W, α) − Ŵ(W − lr∇W, α − lr∇α)
    with torch.no_grad():
        after = pwsconv.pws_weight(w - 0.5 * conv.weight.grad, 1e-3, conv.alpha - 0.5 * conv.alpha.grad)
    d = (eff - after)
    assert t[(0, name, "eff.update_norm")] == pytest.approx(float(d.norm()), rel=1e-10)


def test_pws_shift_is_zero_plain_shift_is_large():
    """Eq. 13: the raw PWS weight's gradient has zero mean per filter; a plain conv's has not (Figure 1(b))."""
    batches = data(1)
    torch.manual_seed(0)
    plain = measure_without_update(chain(he_conv), None, batches, lr=1.0).records
    torch.manual_seed(0)
    pws = measure_without_update(chain(pwsconv.PWSConv2d), None, batches, lr=1.0).records
    for layer in ("0", "3", "6"):
        p_rel = select(pws, "shift_rel", layer)[0]["value"]
        assert 0 <= p_rel <= 1e-10
        assert select(pws, "grad_shift_rel", layer)[0]["value"] <= 1e-10
        assert abs(select(pws, "eff.shift", layer)[0]["value"]) <= 1e-20
        p_shift = select(pws, "shift", layer)[0]["value"]
        q_shift = select(plain, "shift", layer)[0]["value"]
        assert q_shift > 1e10 * max(p_shift, 1e-300)
    for layer in ("3", "6"):  # inputs after ReLU have a positive mean: a systematic shift
        assert select(plain, "shift_rel", layer)[0]["value"] > 2.0


def test_bn_preceded_output_gradient_is_zero_mean_per_channel():
    """Eq. 8: E[∇_{Y_o} L] = 0 for a conv followed by BN (train mode)."""
    torch.manual_seed(0)
    bn = measure_without_update(chain(norm=lambda c: nn.BatchNorm2d(c).to(D)), None, data(1), lr=0.1).records
    torch.manual_seed(0)
    plain = measure_without_update(chain(), None, data(1), lr=0.1).records
    for layer in ("0", "3", "6"):
        assert select(bn, "gy_mean_rel", layer)[0]["value"] < 1e-10
        assert select(plain, "gy_mean_rel", layer)[0]["value"] > 1e-3


# ---------------------------------------------------------------------------------------------------- transparency
def _mixed_model() -> nn.Module:
    torch.manual_seed(3)
    model = TinyResNet().to(D)
    model.block2.conv1 = pwsconv.PWSConv2d(4, 4, 3, padding=1).to(D)
    return model


def _train(model: nn.Module, probe_kw: dict | None, steps: int = 2):
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-3)
    probe = None
    if probe_kw is not None:
        probe = VarianceProbe(model, optimizer=opt if probe_kw.pop("opt", False) else None, **probe_kw).attach()
    outs, grads = [], []
    for x, y in data(steps):
        opt.zero_grad()
        out = model(x)
        F.cross_entropy(out, y).backward()
        outs.append(out.detach().clone())
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    with torch.no_grad():  # an evaluation pass too
        outs.append(model.eval()(data(1, seed=5)[0][0]).clone())
    return outs, grads, [p.detach().clone() for p in model.parameters()], opt, probe


def test_attach_detach_bit_identical_and_leaves_nothing():
    base = _mixed_model()
    ref = _train(copy.deepcopy(base), None)
    for kw in ({"opt": True}, {"lr": 0.2}, {"opt": True, "every": 2}):
        model = copy.deepcopy(base)
        # (the eval pass of _train caches PWS weights: derived data of the layer, not something the probe left)
        keys = lambda: {n: set(m.__dict__) - {"_accel_cache"} for n, m in model.named_modules()}  # noqa: E731
        before_keys = keys()
        outs, grads, params, opt, probe = _train(model, dict(kw))
        assert probe.records, kw
        for a, b in zip(outs, ref[0]):
            assert torch.equal(a, b)
        for ga, gb in zip(grads, ref[1]):
            assert all(torch.equal(u, v) for u, v in zip(ga, gb))
        assert all(torch.equal(u, v) for u, v in zip(params, ref[2]))
        probe.detach()
        assert hooks_empty(model)
        assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
        assert keys() == before_keys
        n_rec = len(probe.records)
        model.train()
        model(data(1)[0][0]).sum().backward()  # detached: nothing more is recorded
        assert len(probe.records) == n_rec


def test_residual_model_all_layers_in_forward_order():
    model = TinyResNet().to(D)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    with VarianceProbe(model, optimizer=opt) as probe:
        for x, y in data(2):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    order = ["stem", "block1.conv1", "block1.conv2", "block2.conv1", "block2.conv2", "fc"]
    for step in (0, 1):
        recs = select(probe.records, "y_var", step=step)
        assert [r["layer"] for r in recs] == order
        assert [r["layer_index"] for r in recs] == list(range(6))
        for stat in ("shift", "var_ratio_mean", "grad_norm", "y_var_pred", "x_ratio_max", "gy_mean_rel"):
            vals = [r["value"] for r in select(probe.records, stat, step=step)]
            assert len(vals) == 6 and all(math.isfinite(v) for v in vals[1:]), stat
    s = probe.summary()
    assert list(s) == order  # per-layer summary in forward order
    assert s["fc"]["kind"] == "Linear" and s["stem"]["steps"] == 2


def test_converted_pws_model():
    model = pwsconv.convert(TinyResNet(), method="pws").to(D)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "PWSConv2d" in kinds and "BatchNorm2d" not in kinds
    probe = measure_without_update(model, None, data(2), lr=1.0)
    for layer in ("stem", "block1.conv1", "block2.conv2"):
        for step in (0, 1):
            rec = {r["stat"]: r["value"] for r in select(probe.records, layer=layer, step=step)}
            assert rec["shift_rel"] <= 1e-10
            assert rec["inv_std_min"] > 0 and "eff.shift" in rec and "eff.var_ratio_mean" in rec
            assert rec.get("y_var", 0) > 0
    assert probe.summary()["stem"]["kind"] == "PWSConv2d"


def test_transposed_and_linear_filter_layout():
    """A filter of a transposed conv is an output channel's slice: PWS makes its mean zero (eq. 12)."""
    torch.manual_seed(0)
    for m in (pwsconv.PWSConvTranspose2d(4, 6, 3, groups=2).to(D), pwsconv.PWSLinear(5, 3).to(D)):
        with torch.no_grad():
            m.weight.add_(0.3)
        eff = filter_matrix(m, m.standardized_weight().detach())
        assert eff.shape[0] == (6 if m.weight.dim() > 2 else 3)
        assert eff.mean(dim=1).abs().max() < 1e-12
        x = torch.randn(2, 4, 3, 3, dtype=D) if m.weight.dim() > 2 else torch.randn(2, 5, dtype=D)
        with VarianceProbe(m, lr=0.1) as probe:
            m(x).sum().backward()
        rec = {r["stat"]: r["value"] for r in probe.records}
        assert rec["eff.w_shift"] < 1e-20 < rec["w_shift"]
        assert rec["shift_rel"] < 1e-10


class CenteredConv(nn.Conv2d):
    """A user's reparameterized conv (like the zoo's WS layers): applies W − E[W_o] via ``reparam_weight``."""

    def reparam_weight(self):
        return self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)

    def forward(self, x):
        return self._conv_forward(x, self.reparam_weight(), self.bias)


def test_other_reparameterized_layers():
    torch.manual_seed(0)
    wn = torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(4, 4, 3).to(D))
    model = nn.Sequential(CenteredConv(3, 4, 3).to(D), nn.ReLU(), wn)
    x = torch.randn(2, 3, 7, 7, dtype=D)
    for kw in ({"lr": 0.5}, {"optimizer": torch.optim.SGD(model.parameters(), lr=0.5)}):
        with VarianceProbe(model, **kw) as probe:
            model(x).sum().backward()
            if "optimizer" in kw:
                kw["optimizer"].step()
        rec = table(probe.records)
        assert rec[(0, "0", "eff.w_shift")] < 1e-25 < rec[(0, "0", "w_shift")]  # centred filters, eq. 5's term = 0
        assert rec[(0, "0", "shift_rel")] < 1e-10  # centring also zeroes the gradient's filter means (cf. eq. 13)
        assert math.isfinite(rec[(0, "2", "eff.shift")]) and math.isfinite(rec[(0, "2", "y_var_pred")])
        assert (0, "2", "shift") not in rec  # weight_norm has two raw tensors (g, v): only the applied weight
        model.zero_grad()


# ---------------------------------------------------------------------------------------------------- update modes
def test_optimizer_update_matches_lr_times_grad_for_plain_sgd():
    base = _mixed_model()
    lr = 0.3
    ma, mb = copy.deepcopy(base), copy.deepcopy(base)
    oa = torch.optim.SGD(ma.parameters(), lr=lr)
    ob = torch.optim.SGD(mb.parameters(), lr=lr)
    pa = VarianceProbe(ma, optimizer=oa).attach()
    pb = VarianceProbe(mb, lr=lr).attach()
    for x, y in data(2):
        for m, o in ((ma, oa), (mb, ob)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    pa.detach(), pb.detach()
    ta, tb = table(pa.records), table(pb.records)
    assert set(ta) == set(tb)
    checked = 0
    for key, va in ta.items():
        if key[2].split(".")[-1] in ("shift", "var_ratio_mean", "var_ratio_min", "var_ratio_max", "update_norm"):
            assert va == pytest.approx(tb[key], rel=1e-8, abs=1e-18), key
            checked += 1
    assert checked >= 2 * 7 * 5 and any(k[2] == "eff.shift" for k in ta)


def test_momentum_update_is_the_applied_update():
    model = chain()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    probe = VarianceProbe(model, optimizer=opt).attach()
    for x, y in data(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        w0 = model[0].weight.detach().clone()
        opt.step()
        dw = w0 - model[0].weight.detach()
    probe.detach()
    assert select(probe.records, "update_norm", "0", step=2)[0]["value"] == pytest.approx(float(dw.norm()), rel=1e-12)


def test_measure_without_update_leaves_model_unchanged():
    model = chain(norm=lambda c: nn.BatchNorm2d(c).to(D))
    state = copy.deepcopy(model.state_dict())
    probe = measure_without_update(model, None, data(3), lr=10.0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is None for p in model.parameters())
    assert sorted({r["step"] for r in probe.records}) == [0, 1, 2]
    assert len(select(probe.records, "loss")) == 3 and hooks_empty(model)
    # with an optimizer: its would-be update, then parameters and optimizer state put back
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    probe = measure_without_update(model, None, data(2), optimizer=opt)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert not opt.state and select(probe.records, "shift") and not opt._optimizer_step_pre_hooks


def test_every_stride_manual_step_and_no_grad_forwards():
    model = chain()
    with VarianceProbe(model, lr=0.1, every=2) as probe:
        for _ in range(5):
            x, y = data(1)[0]
            F.cross_entropy(model(x), y).backward()
            with torch.no_grad():
                model(x)  # evaluation forwards are ignored
    assert sorted({r["step"] for r in probe.records}) == [0, 2, 4]
    assert len(select(probe.records, "y_var", step=2)) == 4
    with VarianceProbe(model, lr=0.1, auto=False) as probe:
        x, y = data(1)[0]
        F.cross_entropy(model(x), y).backward()
        assert probe.records == []
        recs = probe.step(10)
    assert recs and {r["step"] for r in recs} == {10} and probe.current_step == 11
    assert select(recs, "shift")


def test_nonfinite_values_are_recorded_as_nan():
    model = chain()
    x, y = data(1)[0]
    x[0, 0, 0, 0] = float("inf")
    with VarianceProbe(model, lr=0.1) as probe:
        F.cross_entropy(model(x), y).backward()
    vals = [r["value"] for r in select(probe.records, "y_var")]
    assert vals and all(math.isnan(v) for v in vals)
    assert probe.collapsed
    assert all(isinstance(r["value"], float) for r in probe.records)          # numbers, never tensors or None
    assert not any(math.isinf(r["value"]) for r in probe.records)


# ---------------------------------------------------------------------------------------------------- output
def test_csv_jsonl_roundtrip(tmp_path):
    probe = measure_without_update(chain(), None, data(2), lr=0.1)
    recs = probe.records
    assert set(recs[0]) == {"step", "layer", "layer_index", "kind", "stat", "value"}
    written = ((probe.to_csv(tmp_path / "r.csv"), read_csv), (probe.to_jsonl(tmp_path / "r.jsonl"), read_jsonl))
    for path, reader in written:
        back = reader(path)
        assert len(back) == len(recs)
        for a, b in zip(recs, back):
            assert (a["step"], a["layer"], a["layer_index"], a["kind"], a["stat"]) == \
                   (b["step"], b["layer"], b["layer_index"], b["kind"], b["stat"])
            both_nan = math.isnan(a["value"]) and math.isnan(b["value"])
            assert both_nan or a["value"] == pytest.approx(b["value"], rel=1e-15)
    first = (tmp_path / "r.jsonl").read_text().splitlines()
    assert all(isinstance(json.loads(line), dict) for line in first)  # strict JSON (NaN written as null)
    assert any(json.loads(line)["value"] is None for line in first)   # the first layer's y_var_pred


def test_plots_written(tmp_path):
    model = pwsconv.convert(TinyResNet(), method="pws").to(D)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with VarianceProbe(model, optimizer=opt) as probe:
        for x, y in data(2):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    plain = measure_without_update(TinyResNet().to(D), None, data(1), lr=0.1)
    by_method = {"pws": probe, "bn": plain.records, "empty": []}
    for fn, name in ((plot_figure1, "f1.png"), (plot_figure2, "f2.png"), (plot_figure6, "f6.png"),
                     (plot_variance_transmission, "var.png")):
        path = fn(by_method, tmp_path / name)
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC, path


def test_depth_report_on_hand_made_records():
    recs = []
    for layer, (yv, pred, amp) in enumerate([(1.0, math.nan, 1.0), (2.0, 2.0, 2.0), (8.0, 4.0, 2.0)]):
        for stat, v in (("y_var", yv), ("y_var_pred", pred), ("amp_eq15", amp)):
            recs.append({"step": 0, "layer": f"c{layer}", "layer_index": layer, "kind": "Conv2d", "stat": stat,
                         "value": v})
    r = depth_report(recs)
    assert r["ratio_first"] == 8.0 and r["eq15_first"] == 4.0 and r["points"] == 2
    assert r["median_ratio"] == pytest.approx(math.sqrt(2))


def test_run_probe_experiment(tmp_path):
    def model_fn(method: str) -> nn.Module:
        base = nn.Sequential(he_conv(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                             he_conv(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        return pwsconv.convert(base, method=method, copy_weights=True).to(D)

    batches = data(2)
    res = run_probe_experiment(model_fn, batches, lr=0.5, steps=2, out_dir=tmp_path / "train")
    md = res["markdown"]
    assert "Shift of the average gradient" in md and "| none | bn | pws |" in md and "plain network" in md
    for name in ("csv", "jsonl", "figure1", "figure2", "figure6", "variance", "summary"):
        assert (tmp_path / "train").joinpath(res["files"][name].split("/")[-1]).exists(), name
    assert (tmp_path / "train" / "figure1.png").read_bytes()[:8] == PNG_MAGIC
    rows = read_csv(res["files"]["csv"])
    assert {r["method"] for r in rows} == {"none", "bn", "pws"}
    assert res["collapsed"] == {"none": None, "bn": None, "pws": None}
    pws_shift = [v["shift_rel"] for k, v in res["summary"]["pws"].items() if v["kind"] == "PWSConv2d"]
    assert pws_shift and all(s < 1e-2 for s in pws_shift)  # only weight decay (and momentum) move filter means
    # Var[Y_L]/Var[Y_1] is the exact product of the measured factors the summary's last table shows
    assert "Where Var[Y_L]/Var[Y_1] comes from" in md
    for m in ("none", "bn", "pws"):
        d = res["depth"][m]
        f = d["factors_first"]
        assert f["relu"] * f["filters"] * f["common_mean"] * f["rest"] == pytest.approx(d["ratio_first"], rel=1e-9)
        assert 0 < f["common_mean"] <= 1

    # measure mode, batches from a callable
    res = run_probe_experiment(model_fn, lambda: iter(batches), methods=("none", "pws"), lr=0.5, steps=2,
                               mode="measure", out_dir=None)
    assert res["files"] == {} and set(res["records"]) == {"none", "pws"}
    assert max(v["shift_rel"] for v in res["summary"]["pws"].values() if v["kind"] == "PWSConv2d") < 1e-10

    # a collapsing plain network: NaN recorded, that method stopped, no crash
    res = run_probe_experiment(model_fn, iter(batches), methods=("none", "pws"), lr=1e30, steps=4, plots=False,
                               out_dir=tmp_path / "collapse")
    assert res["collapsed"]["none"] is not None
    assert any(math.isnan(r["value"]) for r in res["records"]["none"])
    assert (tmp_path / "collapse" / "records.jsonl").exists()


def test_probe_training_runs_are_the_engines_loop(monkeypatch, tmp_path):
    """The Figure 1 training runs go through the engine's loop (run_task with a ProbeTask: an in-memory run, no
    files): the same records as a probe on SGD stepped by hand, cycling over the batches; empty batches refused."""
    import pwsconv.diagnostics.experiment as X
    from pwsconv.optim import param_groups
    from pwsconv.train.step import train_step

    def model_fn(method: str) -> nn.Module:
        base = nn.Sequential(he_conv(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(4, 3))
        return pwsconv.convert(base, method=method, copy_weights=True).to(D)

    batches = data(2)
    tasks = []
    real = X.run_task
    monkeypatch.setattr(X, "run_task", lambda task: (tasks.append(task), real(task))[1])
    monkeypatch.chdir(tmp_path)
    res = run_probe_experiment(model_fn, batches, methods=("pws",), lr=0.5, steps=3, plots=False)
    assert [type(t).__name__ for t in tasks] == ["ProbeTask"] and list(tmp_path.iterdir()) == []

    torch.manual_seed(0)   # the reference: the probe on SGD stepped by hand
    model = model_fn("pws")
    opt = torch.optim.SGD(param_groups(model, 5e-4), lr=0.5, momentum=0.9)
    def loss_fn(model, x, y):   # the probe's default: cross-entropy of the (float64) output
        out = model(x)
        return F.cross_entropy(out, y), out

    with VarianceProbe(model, optimizer=opt) as probe:
        def record(loss, out):
            probe.log("loss", float(loss.detach()))
            probe.log("logit_std", float(out.detach().float().std()))

        for x, y in (batches * 2)[:3]:   # 3 steps over 2 batches: cycled
            train_step(model, opt, x, y, loss_fn=loss_fn, after_forward=record)
    got = res["records"]["pws"]
    assert len(got) == len(probe.records) > 0 and max(r["step"] for r in got) == 2
    same = [a == b or ({**a, "value": 0} == {**b, "value": 0} and a["value"] != a["value"] and b["value"] != b["value"])
            for a, b in zip(got, probe.records)]
    assert all(same)
    with pytest.raises(ValueError, match="batches are empty"):
        run_probe_experiment(model_fn, [], methods=("pws",), steps=2, plots=False)


def test_plots_stay_readable_when_a_run_collapses(monkeypatch, tmp_path):
    """A run blowing up must not flatten every other curve: log scale (positive data over decades) or an axis
    clipped to the bulk that says so; Figure 1's raw and effective versions have different titles."""
    from pwsconv.diagnostics import plots

    fig, (ax,) = plots._figure(1)
    plots._maybe_log(ax, [0.5, 1.0, 2.0, 1e6])
    assert ax.get_yscale() == "log"
    fig, (ax,) = plots._figure(1)
    bulk = [0.1 * i for i in range(-20, 21)]
    plots._maybe_log(ax, bulk + [-3.0, 4e8, float("nan"), float("inf")])
    lo, hi = ax.get_ylim()
    assert ax.get_yscale() == "linear" and -3.5 < lo < -3 and 2 < hi < 2.5
    assert any("clipped" in t.get_text() for t in ax.texts)
    fig, (ax,) = plots._figure(1)
    plots._maybe_log(ax, bulk)
    assert not ax.texts and ax.get_yscale() == "linear"

    figs = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.append(fig) or path)
    recs = [{"step": 0, "layer": "c", "layer_index": 0, "kind": "Conv2d", "stat": st, "value": 1.0}
            for st in ("var_ratio_mean", "shift")]
    plots.plot_figure1({"none": recs}, tmp_path / "a.png")
    plots.plot_figure1({"none": recs}, tmp_path / "b.png", weight="effective")
    titles = [f._suptitle.get_text() for f in figs]
    assert titles[0] != titles[1] and "raw" in titles[0] and "effective" in titles[1]


def _clip_stats(kind: str, **opts):
    """One probed SGD step (LR 0, a loss × 1e3) of TinyResNet converted to PWS with ``opts``: the model and the
    ``*_clip_<kind>`` records of block1.conv1."""
    torch.manual_seed(0)
    model = pwsconv.convert(TinyResNet(), method="pws", **opts).to(D)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with VarianceProbe(model, optimizer=opt) as probe:
        for x, y in data(1):
            opt.zero_grad()
            (F.cross_entropy(model(x), y) * 1e3).backward()
            opt.step()
    return model, {s: [r["value"] for r in select(probe.records, s, layer="block1.conv1")]
                   for s in (f"w_clip_{kind}", f"alpha_clip_{kind}", f"bias_clip_{kind}")}


def test_clip_fraction_of_auto_layers():
    """gamma="auto": the probe records the share of filters / α / β entries held at the clipping bound — all of
    them under a tiny λ and a large loss, none under a huge λ; layers that do not clip record nothing of it."""
    def fracs(**opts):
        return _clip_stats("frac", **opts)[1]

    tight = fracs(gamma="auto", clip=1e-6, clip_w=1e-6)
    assert tight["w_clip_frac"] == [1.0] and tight["alpha_clip_frac"] == [1.0]
    loose = fracs(gamma="auto", clip=1e9, clip_w=1e9)
    assert loose["w_clip_frac"] == [0.0] and loose["alpha_clip_frac"] == [0.0]
    assert fracs(gamma=1e-3) == {"w_clip_frac": [], "alpha_clip_frac": [], "bias_clip_frac": []}


def test_clip_kept_measures_how_hard_the_clip_cuts():
    """``*_clip_kept`` (seen before the layer clips): ‖clipped ∇‖/‖unclipped ∇‖ per kind — the value computed from
    the unclipped gradients of the same model with clipping off; 1 where nothing is cut, absent where nothing clips."""
    from pwsconv.functional import CLIP_BIAS_FLOOR

    def run(**opts):
        return _clip_stats("kept", **opts)

    lam = 0.01
    clipped, kept = run(gamma="auto", clip=lam, clip_w=lam)
    free, none = run(gamma="auto", clip=0.0, clip_w=0.0)
    assert none == {"w_clip_kept": [], "alpha_clip_kept": [], "bias_clip_kept": []}
    m = free.block1.conv1
    g, w = m.weight.grad.double().flatten(1), m.weight.detach().double().flatten(1)
    gn, bound = g.norm(dim=1), w.norm(dim=1).clamp_min(1e-3) * lam
    want_w = (torch.minimum(gn, bound).norm() / gn.norm()).item()
    ga, a = m.alpha.grad.double().abs(), m.alpha.detach().double().abs()
    want_a = (torch.minimum(ga, a.clamp_min(1e-3) * lam).norm() / ga.norm()).item()
    assert kept["w_clip_kept"] == [pytest.approx(want_w, rel=1e-4)] and want_w < 0.5
    assert kept["alpha_clip_kept"] == [pytest.approx(want_a, rel=1e-4)]
    if m.bias is not None:
        gb, b = m.bias.grad.double().abs(), m.bias.detach().double().abs()
        want_b = (torch.minimum(gb, b.clamp_min(CLIP_BIAS_FLOOR) * lam).norm() / gb.norm()).item()
        assert kept["bias_clip_kept"] == [pytest.approx(want_b, rel=1e-4)]
    _, loose = run(gamma="auto", clip=1e9, clip_w=1e9)
    assert loose["w_clip_kept"] == [1.0] and loose["alpha_clip_kept"] == [1.0]


def test_clip_stats_of_alpha_clipped_per_vector(monkeypatch):
    """Above auto's free range α and β are clipped per layer vector: the probe records them as α / β (not as W's
    filters), held 1 or 0 per layer, kept = min(‖g‖, bound)/‖g‖ with bound λ·max(‖α‖, 1e-3·sqrt(k))."""
    from pwsconv import functional

    monkeypatch.setattr(functional, "AUTO_CLIP_FREE", 0.0)     # per vector at any LR (LR ~0: the model stays put)
    torch.manual_seed(0)
    model = pwsconv.convert(TinyResNet(), method="pws", gamma="auto").to(D)
    opt = torch.optim.SGD(pwsconv.param_groups(model, 0.0), lr=1e-12)
    m = model.block1.conv1
    assert m.clips()[3] and m.clip_lambda == 0.005
    with VarianceProbe(model, optimizer=opt) as probe:
        for x, y in data(1):
            opt.zero_grad()
            (F.cross_entropy(model(x), y) * 1e3).backward()
            opt.step()
    rec = {s: [r["value"] for r in select(probe.records, s, layer="block1.conv1")]
           for s in ("w_clip_frac", "alpha_clip_frac", "alpha_clip_kept")}
    assert rec["w_clip_frac"] == [0.0] and rec["alpha_clip_frac"] == [1.0]   # W far below its bound, α held
    a, ga = m.alpha.detach().double(), m.alpha.grad.double()
    bound = 0.005 * max(a.norm().item(), 1e-3 * a.numel() ** 0.5)
    assert ga.norm().item() == pytest.approx(bound, rel=1e-4)              # the clipped gradient sits at it
    assert 0.0 < rec["alpha_clip_kept"][0] < 1.0


def test_clipping_plot_only_for_clipping_layers(tmp_path):
    from pwsconv.diagnostics.plots import has_clipping, plot_clipping

    recs = [{"step": s, "layer": "a", "layer_index": 0, "kind": "PWSConv2d", "stat": st, "value": v}
            for s in range(3) for st, v in (("w_clip_frac", 0.5), ("alpha_clip_frac", 1.0), ("y_var", 2.0),
                                            ("w_clip_kept", 0.2), ("alpha_clip_kept", 1.0))]
    assert has_clipping({"auto": recs}) and not has_clipping({"pws": [r for r in recs if r["stat"] == "y_var"]})
    path = plot_clipping({"auto": recs}, tmp_path / "clipping.png")
    assert os.path.getsize(path) > 1000
