"""Models by name from outside the zoo: ``module.path:callable`` here; ``torchvision:`` / ``timm:`` where
installed (the integration environment runs them; the main environment has neither, so they skip)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

import pwsconv
from pwsconv.cli import main
from pwsconv.config import ConfigError, TrainConfig
from pwsconv.models import build_model
from pwsconv.models.external import check

HERE = __name__


# ------------------------------------------------------------------ callables a user might point --model at
def with_classes(num_classes: int = 10, width: int = 8) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


def with_chans(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_chans, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))


def fixed() -> nn.Module:   # no arguments at all: first conv and last Linear are replaced
    return with_classes(7)


class Holder:
    build = staticmethod(with_chans)


NOT_CALLABLE = 3


def not_a_module() -> int:
    return 1


SMALL = ["--limit", "64", "--test-limit", "50", "--batch-size", "16", "--epochs", "1", "--no-progress",
         "--num-threads", "1", "--ckpt-every", "0", "--max-steps", "2"]


@pytest.mark.parametrize("attr", ["with_classes", "with_chans", "fixed", "Holder.build"])
@pytest.mark.parametrize("method", ["pws", "gn", "bn"])
def test_callable_models_fit_the_data_set(attr, method):
    net = build_model(f"{HERE}:{attr}", method, num_classes=4, in_channels=1)
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 4)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].in_channels == 1
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert (len(bns) > 0) == (method == "bn")
    if method == "pws":
        assert all(isinstance(m, pwsconv.PWSConv2d) for m in convs)


def test_model_and_method_options_are_split():
    net = build_model(f"{HERE}:with_classes", "pws", num_classes=3, width=16, gamma=1e-2)
    assert net[0].out_channels == 16 and net[0].gamma == 1e-2


@pytest.mark.parametrize("name,needle", [
    (f"{HERE}:nope", "has no attribute 'nope'"),
    (f"{HERE}:NOT_CALLABLE", "is not callable"),
    ("no_such_pkg.mod:build", "cannot import module 'no_such_pkg.mod'"),
    ("torchvision:", "expected 'torchvision:NAME'"),
])
def test_bad_names_are_one_line(name, needle):
    with pytest.raises(ValueError, match=needle):
        check(name)
    with pytest.raises(ConfigError, match=needle):
        TrainConfig(model=name).validate()


def test_callable_returning_something_else():
    with pytest.raises(ValueError, match="not an nn.Module"):
        build_model(f"{HERE}:not_a_module", "pws")


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed")
@pytest.mark.parametrize("name", ["torchvision:resnet18", "timm:resnet26d"])
def test_missing_extra_says_what_to_install(tmp_path, capsys, name):
    if name.startswith("timm") and importlib.util.find_spec("timm") is not None:
        pytest.skip("timm is installed")
    rc = main(["train", "--model", name, "--out-dir", str(tmp_path / "x")] + SMALL)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "torchvision==0.29.1" in err and "replace your torch" in err
    assert not (tmp_path / "x").exists()    # validated before any work


def test_a_module_of_the_current_directory_is_found_and_sys_path_restored(tmp_path, monkeypatch):
    """The console script's sys.path lacks the current directory (``python -m`` has it): a model module there is
    still found, sys.path is left as it was, and a module that exists nowhere is one line saying where to put it."""
    import os
    import sys

    from pwsconv.models import build_model

    (tmp_path / "my_local_models.py").write_text(
        "import torch.nn as nn\n"
        "def build(num_classes=10, in_channels=3):\n"
        "    return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),\n"
        "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd(), str(tmp_path))])
    before = list(sys.path)
    net = build_model("my_local_models:build", "pws", num_classes=3, in_channels=1)
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 3) and sys.path == before
    with pytest.raises(ValueError, match="on PYTHONPATH, or in the current directory") as e:
        build_model("no_such_module_anywhere:build", "pws", num_classes=3)
    assert len(str(e.value).splitlines()) == 1


def test_cli_train_eval_fold_a_callable_model(tmp_path, capsys):
    d = tmp_path / "run"
    assert main(["train", "--model", f"{HERE}:with_classes", "--method", "pws", "--out-dir", str(d)] + SMALL) == 0
    assert main(["eval", str(d)]) == 0
    assert main(["fold", str(d), str(tmp_path / "folded.pt")]) == 0
    assert main(["eval", str(tmp_path / "folded.pt")]) == 0
    rc = main(["train", "--model", f"{HERE}:nope", "--out-dir", str(tmp_path / "bad")] + SMALL)
    assert rc == 2 and "has no attribute" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["torchvision:resnet18", "timm:resnet26d"])
def test_torchvision_and_timm_by_name(name):
    pytest.importorskip(name.split(":")[0])
    pytest.importorskip("torchvision" if name.startswith("torchvision") else "timm")
    net = build_model(name, "pws", num_classes=5, in_channels=1)
    assert not [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert net(torch.randn(2, 1, 32, 32)).shape == (2, 5)
    with pytest.raises(ValueError, match="did you mean"):
        check(name[:-1] + "x")


def test_probe_takes_a_model_by_name(tmp_path, capsys):
    out = tmp_path / "probe"
    assert main(["probe", "--model", f"{HERE}:with_classes", "--steps", "2", "--batch-size", "16", "--out", str(out),
                 "--no-progress"]) == 0
    capsys.readouterr()
    rc = main(["probe", "--model", f"{HERE}:nope", "--out", str(tmp_path / "bad"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "has no attribute" in err
    assert not (tmp_path / "bad").exists()
