"""``pwsconv.load``: run directory / checkpoint / folded file → the network in eval mode with its preprocessing."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
from torch import nn

import pwsconv
from pwsconv.cli import main
from pwsconv.config import TrainConfig
from pwsconv.data import load_dataset
from pwsconv.train import CheckpointError, train
from pwsconv.train.loading import Preprocess

SMALL = dict(dataset="digits", limit=128, test_limit=64, batch_size=32, epochs=1, progress=False, num_threads=1,
             ckpt_every=0, seed=0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A PWS run and a BN run (tiny_cnn on digits), and the file `pwsconv fold` writes for each."""
    d = tmp_path_factory.mktemp("load")
    out = {}
    for method in ("pws", "bn"):
        run = d / method
        train(TrainConfig(method=method, lr=0.05, out_dir=str(run), **SMALL))
        folded = d / f"{method}_folded.pt"
        with contextlib.redirect_stdout(io.StringIO()) as said:
            assert main(["fold", str(run), str(folded)]) == 0
        out[method] = (run, folded, said.getvalue())
    return out


def test_fold_counts_what_it_merged(runs):
    """tiny_cnn has 10 conv units: 10 PWS convs folded, or 10 BatchNorm2d merged into their convs."""
    assert "folded 10 layer(s) of tiny_cnn (pws) into plain layers (10 PWSConv2d)" in runs["pws"][2]
    assert "folded 10 layer(s) of tiny_cnn (bn) into plain layers (10 BatchNorm2d)" in runs["bn"][2]


@pytest.fixture(scope="module")
def test_images():
    b = load_dataset("digits")
    return b, b.test.x[:16], b.test.y[:16]


def _reference_logits(model: nn.Module, bundle, x_uint8: torch.Tensor, spec_file) -> torch.Tensor:
    """The logits on the training loader's normalization with the run's statistics (what `pwsconv eval` does)."""
    from pwsconv.data import Loader

    spec = torch.load(spec_file, weights_only=True)["model_spec"]
    loader = Loader(bundle.test, 16, shuffle=False, augment=None, mean=spec["mean"], std=spec["std"])
    xb, _ = next(iter(loader))
    assert torch.equal(bundle.test.x[:16], x_uint8)
    with torch.no_grad():
        return model(xb)


@pytest.mark.parametrize("method", ["pws", "bn"])
def test_run_dir_checkpoint_and_folded_file_give_the_same_network(runs, test_images, method):
    run, folded, _ = runs[method]
    bundle, x, _ = test_images
    m_dir = pwsconv.load(run)
    m_ck = pwsconv.load(run / "checkpoint.pt")
    m_fold = pwsconv.load(folded)
    m_fold2 = pwsconv.load(str(run), fold=True)
    for m in (m_dir, m_ck, m_fold, m_fold2):
        assert isinstance(m, nn.Module) and not m.training
        assert not any(mod.training for mod in m.modules())
    # reparameterized layers (PWS) and BN stay in the unfolded model; the folded ones hold plain layers only
    assert any(type(mod).__module__.startswith("pwsconv.layers") or isinstance(mod, nn.BatchNorm2d)
               for mod in m_dir.modules())
    for m in (m_fold, m_fold2):
        assert not any(type(mod).__module__.startswith("pwsconv.layers") or isinstance(mod, nn.BatchNorm2d)
                       for mod in m.modules())
        assert m.pretrained_cfg["folded"] is True
    assert m_dir.pretrained_cfg["folded"] is False
    ref = _reference_logits(m_dir, bundle, x, folded)
    with torch.no_grad():
        for m in (m_dir, m_ck, m_fold, m_fold2):
            got = m(m.preprocess(x))
            assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5), (got - ref).abs().max()
    # same state dict as the file: preprocess and pretrained_cfg are attributes, not submodules
    ck = torch.load(folded, weights_only=True)
    assert set(m_fold.state_dict()) == set(ck["model"])
    assert "preprocess" not in dict(m_fold.named_children())


def test_pretrained_cfg_speaks_timms_terms(runs, test_images):
    bundle = test_images[0]
    cfg = pwsconv.load(runs["pws"][0]).pretrained_cfg
    spec = torch.load(runs["pws"][1], weights_only=True)["model_spec"]   # the training split's statistics
    assert cfg["mean"] == pytest.approx(spec["mean"]) and cfg["std"] == pytest.approx(spec["std"])
    assert cfg["input_size"] == (bundle.in_channels, *bundle.image_size)
    assert cfg["num_classes"] == bundle.num_classes == 10
    assert (cfg["model"], cfg["method"], cfg["dataset"]) == ("tiny_cnn", "pws", "digits")
    assert cfg["interpolation"] == "bilinear" and cfg["crop_pct"] == 1.0


def test_preprocess_accepts_images_as_they_come(runs, test_images):
    _, x, _ = test_images
    pre = pwsconv.load(runs["pws"][1]).preprocess
    ref = pre(x)                                             # uint8 NCHW
    assert ref.shape == (16, 1, 8, 8) and ref.dtype == torch.float32
    assert torch.allclose(pre(x.float() / 255), ref, atol=1e-6)   # float 0..1
    assert torch.allclose(pre(x[0]), ref[:1], atol=1e-6)     # CHW
    hwc = x[0].permute(1, 2, 0).numpy()
    assert torch.allclose(pre(hwc), ref[:1], atol=1e-6)      # HWC array (as images are stored)
    assert torch.allclose(pre(hwc[:, :, 0]), ref[:1], atol=1e-6)  # HW array
    PIL = pytest.importorskip("PIL.Image")
    rgb = PIL.fromarray(np.repeat(hwc, 3, axis=2))           # an RGB image for a 1-channel model: converted to L
    assert torch.allclose(pre(rgb), ref[:1], atol=1.5 / 255 / min(pre.std.flatten().tolist()))
    # another size: shorter side to 8, center crop
    big = torch.nn.functional.interpolate(x[:2].float(), size=(16, 24), mode="nearest").to(torch.uint8)
    assert pre(big).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="expects 1 channel"):
        pre(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="HW, HWC or NHWC"):
        pre(np.zeros((1, 2, 3, 4, 5), np.uint8))
    with pytest.raises(ValueError, match=r"float images must hold pixels in 0\.\.1 \(this one spans 0\.\.200\)"):
        pre(x.float().clamp(max=200))                        # 0..255 as float: the common slip
    with pytest.raises(ValueError, match="do not normalize them first"):
        pre(ref)                                             # already normalized


def test_preprocess_resize_keeps_the_center():
    pre = Preprocess([0.0], [1.0], (4, 4))
    x = torch.zeros(1, 1, 4, 8)
    x[..., 2:6] = 1.0                                        # the central 4 columns of a 4×8 image
    assert torch.equal(pre(x), torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match="std must be positive"):
        Preprocess([0.5], [0.0])


def test_bad_paths_are_one_line_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        pwsconv.load(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="without a checkpoint.pt"):
        pwsconv.load(tmp_path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a pwsconv checkpoint"):
        pwsconv.load(tmp_path / "junk.pt")


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_onnx_export_of_network_and_preprocessing(runs, test_images, tmp_path):
    """The README's deployment path: fold → load → ONNX (with the preprocessing in front); ONNX Runtime agrees."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    _, x, _ = test_images
    model = pwsconv.load(runs["pws"][1])
    deploy = nn.Sequential(model.preprocess, model).eval()
    xf = x.float() / 255
    buf = io.BytesIO()
    torch.onnx.export(deploy, (xf,), buf, dynamo=False, opset_version=17, input_names=["image"],
                      dynamic_axes={"image": {0: "batch"}})
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"image": xf.numpy()})
    with torch.no_grad():
        want = deploy(xf)
    assert np.abs(got - want.numpy()).max() < 1e-4
    # the README's own call: torch's default (dynamo) exporter, which needs onnxscript
    pytest.importorskip("onnxscript")
    path = tmp_path / "r.onnx"
    torch.onnx.export(deploy, (torch.rand(1, *model.pretrained_cfg["input_size"]),), str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: xf[:1].numpy()})
    assert np.abs(got - want[:1].numpy()).max() < 1e-4
