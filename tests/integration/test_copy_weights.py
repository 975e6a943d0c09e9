"""convert(copy_weights=True) of a "pretrained-like" torchvision resnet18 (random init, BN statistics warmed up on real
CIFAR-10 images) measured on other real CIFAR-10 images (../shared/data; skipped where it is missing). The figures of
README/docs come from benchmarks/copy_weights_closeness.py, which runs the same measurement."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torchvision

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "..", "shared", "data")
spec = importlib.util.spec_from_file_location("copy_weights_closeness",
                                              os.path.join(ROOT, "benchmarks", "copy_weights_closeness.py"))
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


@pytest.fixture(scope="module")
def rows():
    if not os.path.isfile(os.path.join(DATA, "cifar10", "cifar10_test_from_jpeg.npz")):
        pytest.skip("real CIFAR-10 test images not found under ../shared/data")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    return {label: (rel, agree) for _, label, rel, agree in bench.measure("resnet18", model, bench.load_images(DATA))}


def test_bn_folding_is_exact_for_plain_convs(rows):
    rel, agree = rows["none, copy_weights (BN folded into the convs)"]
    assert rel < 1e-4 and agree == 1.0


def test_pws_copy_weights_calibration_helps(rows):
    plain = rows["pws, copy_weights"][0]
    calibrated = rows["pws, copy_weights + example_inputs (256 images)"][0]
    assert calibrated < plain
