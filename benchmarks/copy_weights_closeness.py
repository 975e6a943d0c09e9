"""How close a converted BN model starts to the original with ``convert(..., copy_weights=True)``.

A torchvision / timm model with random init is made "pretrained-like" by BN-statistics warm-up (train-mode forwards
on 512 real CIFAR-10 test images, cumulative averages), then converted. On 2,000 other CIFAR-10 test images it
reports the relative error of the logits ‖y − y₀‖/‖y₀‖ and the top-1 agreement with the original, for: "none"
(BN folded into plain convs: exact), "pws" copy_weights, "pws" copy_weights + example_inputs (bias correction on 256
warm-up images), and "pws" without copy_weights (a fresh PWS network, for reference).

Run in the integration environment (``bash .ci/integration`` builds it):

    ~/.cache/pwsconv/integration-venv/bin/python benchmarks/copy_weights_closeness.py [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import os
import warnings

import numpy as np
import torch

import pwsconv

MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


def load_images(data_root: str) -> torch.Tensor:
    path = os.path.join(data_root, "cifar10", "cifar10_test_from_jpeg.npz")
    x = np.load(path)["x"][:2768]                    # uint8 [N, 32, 32, 3], real CIFAR-10 test images
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float().div_(255)
    return (t - MEAN) / STD


def pretrained_like(model: torch.nn.Module, images: torch.Tensor) -> torch.nn.Module:
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None                           # cumulative average over the warm-up batches
    model.train()
    with torch.no_grad():
        for i in range(0, 512, 64):
            model(images[i:i + 64])
    return model.eval()


def closeness(ref: torch.nn.Module, new: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        a = torch.cat([ref(x[i:i + 250]) for i in range(0, len(x), 250)])
        b = torch.cat([new.eval()(x[i:i + 250]) for i in range(0, len(x), 250)])
    return float((b - a).norm() / a.norm()), float((a.argmax(1) == b.argmax(1)).float().mean())


def measure(name: str, model: torch.nn.Module, images: torch.Tensor) -> list[tuple[str, str, float, float]]:
    model = pretrained_like(model, images)
    calib, test = images[512:768], images[768:2768]
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        variants = {
            "none, copy_weights (BN folded into the convs)": pwsconv.convert(model, "none", copy_weights=True),
            "pws, copy_weights": pwsconv.convert(model, copy_weights=True),
            "pws, copy_weights + example_inputs (256 images)": pwsconv.convert(model, copy_weights=True,
                                                                               example_inputs=calib),
            "pws, fresh (no copy_weights)": pwsconv.convert(model),
        }
    for label, new in variants.items():
        rows.append((name, label, *closeness(model, new, test)))
    return rows


def per_layer(model: torch.nn.Module, images: torch.Tensor) -> list[float]:
    """Relative error of each copied PWS layer against its conv+BN on the *original* model's inputs to that conv
    (so no error is passed on): what PWS cannot represent, layer by layer."""
    from pwsconv.calibration import conv_bn_pairs

    model = pretrained_like(model, images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pws = pwsconv.convert(model, copy_weights=True)
    pairs = conv_bn_pairs(model)
    names = {id(m): n for n, m in model.named_modules()}
    inputs: dict[int, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, inp: inputs.__setitem__(id(mod), inp[0].detach()))
             for m in model.modules() if id(m) in pairs]
    with torch.no_grad():
        model(images[768:1024])
    for h in hooks:
        h.remove()
    errs = []
    with torch.no_grad():
        for m in model.modules():
            if id(m) not in pairs:
                continue
            x = inputs[id(m)]
            ref = pairs[id(m)][1](m(x))
            got = pws.get_submodule(names[id(m)]).eval()(x)
            if float(ref.norm()) > 0:   # a unit whose BN output is all zero has no relative error
                errs.append(float((got - ref).norm() / ref.norm()))
    return errs


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    p.add_argument("--models", nargs="+", default=["torchvision:resnet18", "timm:resnet26d", "timm:efficientnet_b0"])
    a = p.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    images = load_images(a.data)
    print("| model | variant | logits rel. error | top-1 agreement |\n|---|---|---:|---:|")
    for spec in a.models:
        src, _, arch = spec.partition(":")
        torch.manual_seed(0)
        if src == "timm":
            import timm
            model = timm.create_model(arch, pretrained=False, num_classes=10)
        else:
            import torchvision
            model = torchvision.models.get_model(arch, weights=None, num_classes=10)
        base = {k: v.clone() for k, v in model.state_dict().items()}
        for name, label, rel, agree in measure(spec, model, images):
            print(f"| {name} | {label} | {rel:.4f} | {100 * agree:.1f} % |", flush=True)
        model.load_state_dict(base)
        errs = sorted(per_layer(model, images))
        print(f"| {spec} | per conv+BN unit, on the original inputs ({len(errs)} units) | median "
              f"{errs[len(errs) // 2]:.3f}, min {errs[0]:.3f}, max {errs[-1]:.3f} | |", flush=True)


if __name__ == "__main__":
    main()
