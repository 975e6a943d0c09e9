"""Issue 22 — reliability round 3: what a hostile-user audit still broke. One test (or a few) per class of the issue,
``test_item01_*`` … ``test_item09_*``; the generated bad command lines of ``test_robustness.py`` cover them too."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import yaml

from pwsconv.cli import main
from pwsconv.config import ConfigError, TrainConfig, load_config
from pwsconv.train import CheckpointError, train
from pwsconv.train.engine import RunResult

from test_robustness import TINY, cli, one_line_error, snapshot

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny 1-epoch pws run ``R`` (resumable to more epochs), trained once for this module."""
    root = tmp_path_factory.mktemp("issue22")
    assert main(["train", "--out-dir", str(root / "R"), "--method", "pws", *TINY]) == 0
    return root / "R"


def edited(finished, tmp_path, change) -> str:
    """A copy of the run whose checkpoint was edited by ``change(ck)`` and saved again (so its CRCs are valid)."""
    run = tmp_path / "E"
    shutil.copytree(finished, run)
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    change(ck)
    torch.save(ck, run / "checkpoint.pt")
    return str(run)


# ------------------------------------------------------------------------------------------------- 1. collapse
def test_item01_non_finite_eval_outputs_are_a_collapse(tmp_path, capsys):
    """Finite weights whose logits overflow (here: every weight ×1e30 after the last step, as a very large LR can
    leave them) used to end "ok" with an accuracy computed from NaN outputs."""
    cfg = TrainConfig(model="tiny_cnn", method="none", epochs=1, limit=64, test_limit=64, batch_size=32,
                      progress=False, num_threads=1, ckpt_every=0, out_dir=str(tmp_path / "blow"))
    steps = 64 // 32

    def blow_up(step):
        if step == steps:
            run_model = blow_up.model
            with torch.no_grad():
                for p in run_model.parameters():
                    p.mul_(1e30)

    import pwsconv.train.engine as E

    real_init = E._Run.__init__

    def init(self, *a, **k):   # hand the hook the run's model (the Python API has no model handle)
        real_init(self, *a, **k)
        blow_up.model = self.raw_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(E._Run, "__init__", init)
        res = train(cfg, on_step=blow_up)
    assert all(torch.isfinite(p).all() for p in blow_up.model.parameters())   # the weights are finite...
    assert res.status == "nan"                                                # ...the run collapsed all the same
    assert all(v != v for k, v in res.metrics.items() if k != "images_per_s")
    assert RunResult.load(cfg.out_dir).status == "nan"
    # the checkpoint says so too: resuming returns the collapse, it does not train on
    assert train(cfg.replace(epochs=3), resume=True).status == "nan"
    # `pwsconv eval` of the collapsed checkpoint says so instead of printing an accuracy as if it meant something
    capsys.readouterr()
    rc, out, _ = cli(capsys, "eval", cfg.out_dir)
    assert rc == 0 and "[collapsed: 64 images got non-finite outputs]" in out   # the run's test_limit


def test_item01_evaluate_counts_non_finite_outputs():
    from pwsconv.train import evaluate

    class Out(torch.nn.Module):
        def forward(self, x):
            out = torch.zeros(len(x), 10)
            out[0, 3] = -float("inf")     # a -inf in a non-target logit: the loss stays finite
            return out

    x, y = torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.long)
    ev = evaluate(Out(), [(x, y)])
    assert ev["nonfinite"] == 1 and ev["n"] == 4


# ------------------------------------------------------------------------------------------- 2. huge lr / wd
@pytest.mark.parametrize("flag,value", [("--lr", "1e39"), ("--lr", "1e300"), ("--weight-decay", "1e39"),
                                        ("--weight-decay", "1e300")])
def test_item02_huge_but_finite_lr_and_weight_decay(tmp_path, capsys, flag, value):
    rc, _, err = cli(capsys, "train", "--out-dir", tmp_path / "o", *TINY, flag, value)
    one_line_error(rc, err, flag[2:].replace("-", "_"), "at most")
    assert not (tmp_path / "o").exists()


def test_item02_huge_lr_from_yaml(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("lr: 1e39\nweight_decay: 0.0\n")
    rc, _, err = cli(capsys, "train", "--config", tmp_path / "c.yaml", "--out-dir", tmp_path / "o", *TINY)
    one_line_error(rc, err, "lr must be at most")
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="weight_decay"):
        TrainConfig(weight_decay=1e300).validate(check_names=False)
    TrainConfig(lr=1e30).validate(check_names=False)    # large but usable: a collapse is a result


# -------------------------------------------------------------------------------------------------- 3. Ctrl-C
_INTERRUPT = '''
import os, sys
class _Interrupt:
    fired = False
    def find_spec(self, name, path=None, target=None):
        if name == os.environ["KI_MODULE"] and not _Interrupt.fired:
            _Interrupt.fired = True
            raise KeyboardInterrupt
sys.meta_path.insert(0, _Interrupt())
'''


@pytest.mark.parametrize("module", ["torch", "yaml"])
@pytest.mark.parametrize("entry", ["-m", "script"])
def test_item03_ctrl_c_while_torch_imports_at_start(tmp_path, module, entry):
    """A Ctrl-C during ``import torch`` (simulated by an import hook that raises KeyboardInterrupt there): one line,
    exit 130, for ``python -m pwsconv`` and for the console script's ``from pwsconv.cli import main``."""
    (tmp_path / "sitecustomize.py").write_text(_INTERRUPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), SRC]), "KI_MODULE": module}
    env.pop("PWSCONV_DEBUG", None)
    head = [sys.executable, "-m", "pwsconv"] if entry == "-m" else \
        [sys.executable, "-c", "import sys; from pwsconv.cli import main; sys.exit(main())"]
    p = subprocess.run([*head, "train", "--out-dir", str(tmp_path / "o"), "--epochs", "1"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 130, p.stderr
    assert p.stderr.strip().splitlines() == ["pwsconv train: interrupted; the run continues from its last "
                                             "checkpoint with the same command plus --resume"], p.stderr
    assert not (tmp_path / "o").exists()


def test_item03_import_pwsconv_does_not_import_torch():
    code = ("import sys, pwsconv, pwsconv.cli; assert 'torch' not in sys.modules; "
            "from pwsconv import PWSConv2d, convert, fold, functional; import pwsconv.convert; "
            "assert callable(pwsconv.convert) and pwsconv.convert is convert and pwsconv.functional is functional")
    p = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": SRC}, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr


def test_item03_ctrl_c_inside_optimizer_construction(tmp_path, capsys, monkeypatch):
    """A Ctrl-C inside a lazy import in the optimizer's constructor, and a clean-up step of the engine that then
    fails on the half-imported module: the interrupt is what comes out — one line, exit 130, no traceback."""
    import pwsconv.train.distributed as D

    def sgd(*a, **k):
        raise KeyboardInterrupt

    def cleanup(info):
        raise AttributeError("partially initialized module 'torch._dynamo' has no attribute 'config'")

    monkeypatch.setattr(torch.optim, "SGD", sgd)
    monkeypatch.setattr(D, "cleanup_distributed", cleanup)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(out_dir=str(tmp_path / "api"), epochs=1, limit=64, batch_size=32, progress=False))
    rc, out, err = cli(capsys, "train", "--out-dir", tmp_path / "o", *TINY)
    assert rc == 130 and err.strip().splitlines() == [
        "pwsconv train: interrupted; the run continues from its last checkpoint with the same command plus "
        "--resume"], err
    assert not (tmp_path / "o").exists() and not (tmp_path / "api").exists()


def test_item03_error_chained_to_an_interrupt_is_the_interrupt(capsys, monkeypatch):
    import pwsconv.cli as C

    def handler(args):
        try:
            raise KeyboardInterrupt
        finally:
            raise ImportError("cannot import name 'x' from partially initialized module 'y'")

    monkeypatch.setattr(C, "_cmd_reproduce", handler)
    rc, _, err = cli(capsys, "reproduce", "table4")
    assert rc == 130 and err.strip().splitlines() == [
        "pwsconv reproduce: interrupted; run the same command again to continue where it stopped"]


# ---------------------------------------------------------------------------- 4 and 8. checkpoints edited by hand
def _foreign_weights(ck):
    ck["model"] = torch.nn.Linear(3, 3).state_dict()


def _garbage_rng(ck):
    ck["rng"][0]["torch"] = torch.zeros(3, dtype=torch.uint8)


EDITS = {
    "no optimizer": (lambda ck: ck.pop("optimizer"), "has no optimizer"),
    "empty optimizer": (lambda ck: ck.__setitem__("optimizer", {"state": {}, "param_groups": []}), "optimizer state"),
    "garbage RNG": (_garbage_rng, "RNG state"),
    "RNG not a list": (lambda ck: ck.__setitem__("rng", "garbage"), "its rng"),
    "foreign weights": (_foreign_weights, "model weights"),
    "bn weights": (None, "model weights"),
    "scheduler": (lambda ck: ck.__setitem__("scheduler", {"x": 1}), "scheduler"),
    "sums": (lambda ck: ck.__setitem__("sums", [1.0]), "sums"),
    "negative step": (lambda ck: ck.__setitem__("step", -3), "step must be an integer ≥ 0"),
    "negative epoch": (lambda ck: ck.__setitem__("epoch", -1), "epoch must be an integer ≥ 0"),
    "batch past the epoch": (lambda ck: ck.__setitem__("batch", 999), "batch 999"),
    "string epoch": (lambda ck: ck.__setitem__("epoch", "abc"), "epoch must be an integer"),
    "bool step": (lambda ck: ck.__setitem__("step", True), "step must be an integer"),
    "status": (lambda ck: ck.__setitem__("status", "weird"), "status"),
    "wall time": (lambda ck: ck.__setitem__("wall_time", float("nan")), "wall_time"),
    "newer version": (lambda ck: ck.__setitem__("version", 99), "format version 99"),
    "string version": (lambda ck: ck.__setitem__("version", "1"), "format version"),
    "no version": (lambda ck: ck.pop("version"), "format version"),
    "config a string": (lambda ck: ck.__setitem__("config", "lr: 0.1"), "config is a str"),
}


@pytest.mark.parametrize("case", list(EDITS))
def test_item04_item08_resume_from_an_edited_checkpoint(finished, tmp_path, capsys, case):
    change, needle = EDITS[case]
    if change is None:   # another method's weights under this run's config
        other = torch.load(tmp_path.parent / "bn_ck.pt", weights_only=True) if (tmp_path.parent / "bn_ck.pt").exists() \
            else None
        if other is None:
            assert main(["train", "--out-dir", str(tmp_path / "B"), "--method", "bn", *TINY]) == 0
            other = torch.load(tmp_path / "B" / "checkpoint.pt", weights_only=True)
        change = lambda ck: ck.__setitem__("model", other["model"])  # noqa: E731
    run = edited(finished, tmp_path, change)
    before = snapshot(run)
    rc, _, err = cli(capsys, "train", "--out-dir", run, "--resume", *TINY, "--epochs", "2")
    line = one_line_error(rc, err, needle)
    assert "checkpoint.pt" in line
    assert snapshot(run) == before   # nothing overwritten


@pytest.mark.parametrize("case", ["newer version", "config a string", "no version"])
def test_item08_eval_and_fold_refuse_edited_fields(finished, tmp_path, capsys, case):
    change, needle = EDITS[case]
    run = edited(finished, tmp_path, change)
    for argv in (["eval", run], ["fold", run, tmp_path / "F.pt"]):
        rc, _, err = cli(capsys, *argv)
        one_line_error(rc, err, needle, "checkpoint.pt")
    assert not (tmp_path / "F.pt").exists()


def test_item09_bad_fields_name_the_file(finished, tmp_path, capsys):
    run = edited(finished, tmp_path, lambda ck: ck["config"].__setitem__("seed", "abc"))
    rc, _, err = cli(capsys, "eval", run)
    one_line_error(rc, err, run, "config.seed")
    run2 = tmp_path / "S"
    shutil.copytree(finished, run2)
    ck = torch.load(run2 / "checkpoint.pt", weights_only=True)
    ck["model_spec"]["num_classes"] = "ten"
    torch.save(ck, run2 / "checkpoint.pt")
    rc, _, err = cli(capsys, "eval", run2)
    one_line_error(rc, err, str(run2), "model_spec.num_classes")


# ------------------------------------------------------------------------------------------- 5. decode cache
def _archive(tmp_path):
    from test_data import _jpeg_bytes, _labels

    imgs = np.stack([np.full((32, 32, 3), 20 * i + 10, np.uint8) for i in range(6)])
    blobs = [_jpeg_bytes(im) for im in imgs]
    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    d = tmp_path / "cifar10"
    d.mkdir()
    np.savez(d / "cifar10_train_jpeg_bytes.npz", jpeg=np.frombuffer(b"".join(blobs), np.uint8), offsets=offsets,
             y=_labels(6).astype(np.int64))
    np.savez(d / "cifar10_test_from_jpeg.npz", x=imgs[:2], y=_labels(2).astype(np.int64))
    return d


@pytest.mark.parametrize("damage", ["zeroed", "truncated", "no checksum"])
def test_item05_decode_cache_is_verified_and_rebuilt(tmp_path, damage):
    from pwsconv.data import load_dataset

    d, cache = _archive(tmp_path), tmp_path / "cache"
    good = load_dataset("cifar10", d, cache_dir=cache).train.x.clone()
    (npy,) = cache.glob("*.npy")
    sums = npy.with_name(npy.name + ".sha256")
    assert sums.read_text().split() == [__import__("hashlib").sha256(npy.read_bytes()).hexdigest(), npy.name]
    if damage == "zeroed":     # the right shape, black images
        x = np.load(npy)
        np.save(npy, np.zeros_like(x))
    elif damage == "truncated":
        npy.write_bytes(npy.read_bytes()[:-100])
    else:
        sums.unlink()
    with pytest.warns(UserWarning, match="decoding cifar10_train_jpeg_bytes.npz again"):
        ds = load_dataset("cifar10", d, cache_dir=cache, limit=3)   # even under a limit: rebuilt in full
    assert torch.equal(ds.train.x, good[:3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # rebuilt: no warning any more
        again = load_dataset("cifar10", d, cache_dir=cache, limit=4)
    assert torch.equal(again.train.x, good[:4])
    np.testing.assert_array_equal(np.load(npy), good.permute(0, 2, 3, 1).numpy())


# ------------------------------------------------------------------------------------------------------ 6. gamma
@pytest.mark.parametrize("gamma", ["0", "0.0", "-0.0", "-1e-9"])
def test_item06_gamma_must_be_positive(tmp_path, capsys, gamma):
    rc, _, err = cli(capsys, "train", "--out-dir", tmp_path / "o", *TINY, "--method", "pws", "--method-opt",
                     f"gamma={gamma}")
    one_line_error(rc, err, "gamma must be a finite number > 0")
    assert not (tmp_path / "o").exists()
    from pwsconv import PWSConv2d

    with pytest.raises(ValueError, match="gamma"):
        PWSConv2d(3, 4, 3, gamma=float(gamma))
    layer = PWSConv2d(3, 4, 3, gamma="auto")   # "auto" stays valid
    with pytest.raises(ValueError, match="gamma"):
        layer.gamma = 0.0
    assert layer.gamma == "auto"


# --------------------------------------------------------------------------------------------- 7. too large a model
def test_item07_model_too_large_is_refused_before_allocating(tmp_path, capsys, monkeypatch):
    import pwsconv.train.devices as DV

    real = torch.empty
    monkeypatch.setattr(DV, "_available_memory", lambda device: 8 * 2**30)   # an 8 GiB machine
    rc, _, err = cli(capsys, "train", "--out-dir", tmp_path / "o", *TINY, "--model-opt", "widths=[50000,50000]")
    one_line_error(rc, err, "parameters", "GiB", "8.0 GiB available")
    assert not (tmp_path / "o").exists()
    assert torch.empty is real
    # an allocator failure the estimate could not foresee is one line too
    monkeypatch.setattr(DV, "_check_model_fits", lambda *a: None)

    def oom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 1440000400000 bytes.")

    import pwsconv.models as M

    monkeypatch.setattr(M, "build_model", oom)
    rc, _, err = cli(capsys, "train", "--out-dir", tmp_path / "o", *TINY)
    one_line_error(rc, err, "does not fit in memory")
    assert not (tmp_path / "o").exists()


def test_item07_normal_models_pass_the_estimate():
    from pwsconv.train.engine import _available_memory, _check_model_fits
    from pwsconv.models import build_model

    cfg = TrainConfig(model="resnet_cifar_small")
    state = torch.get_rng_state()
    _check_model_fits(lambda: build_model("resnet_cifar_small", "pws", num_classes=10, in_channels=3), cfg,
                      torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), state)   # the meta build leaves the seed's stream alone
    avail = _available_memory(torch.device("cpu"))
    assert avail is None or avail > 0


# ------------------------------------------------------------------------------------------ 9. misleading messages
def test_item09_num_threads_overflow_names_the_flag(tmp_path, capsys):
    rc, _, err = cli(capsys, "train", "--out-dir", tmp_path / "o", *TINY[:-4], "--num-threads",
                     "99999999999999999999", "--ckpt-every", "0")
    one_line_error(rc, err, "num_threads")


def test_item09_symlink_loop_is_named_as_such(finished, tmp_path, capsys):
    os.symlink(tmp_path / "b", tmp_path / "a")
    os.symlink(tmp_path / "a", tmp_path / "b")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    rc, _, err = cli(capsys, "train", "--out-dir", tmp_path / "a" / "run", *TINY)
    one_line_error(rc, err, "symbolic link loop")
    rc, _, err = cli(capsys, "train", "--out-dir", tmp_path / "a", *TINY)
    one_line_error(rc, err, "symbolic link loop")
    rc, _, err = cli(capsys, "train", "--out-dir", tmp_path / "dangling" / "run", *TINY)
    one_line_error(rc, err, "missing target")
    for out in (tmp_path / "a", tmp_path / "a" / "m.pt"):
        rc, _, err = cli(capsys, "fold", finished, out)
        one_line_error(rc, err, "symbolic link loop")


@pytest.mark.parametrize("text,key", [("lr: 0.1\nepochs: 2\nlr: 5\n", "'lr'"),
                                      ("method_opts:\n  gamma: 0.1\n  gamma: 0.2\n", "'gamma'")])
def test_item09_yaml_key_given_twice_is_refused(tmp_path, capsys, text, key):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=f"key {key} is given twice"):
        load_config(tmp_path / "c.yaml")
    rc, _, err = cli(capsys, "train", "--config", tmp_path / "c.yaml", "--out-dir", tmp_path / "o")
    one_line_error(rc, err, "given twice", "line")
    assert not (tmp_path / "o").exists()
    # merge keys may repeat keys (YAML defines the result)
    (tmp_path / "m.yaml").write_text("base: &b {lr: 0.1}\n")
    assert yaml.safe_load((tmp_path / "m.yaml").read_text()) == {"base": {"lr": 0.1}}
    from pwsconv.config import safe_load_unique

    assert safe_load_unique("a: &x {p: 1, q: 2}\nb:\n  <<: *x\n  p: 3\n") == {"a": {"p": 1, "q": 2},
                                                                           "b": {"p": 3, "q": 2}}


def test_item09_detection_tables_without_the_extra(tmp_path, capsys, monkeypatch):
    """torchvision installed, pycocotools not: one line naming the missing package and the extra to install."""
    import importlib.machinery
    import importlib.util
    import types

    fake = types.ModuleType("torchvision")
    fake.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pycocotools" else real(name, *a))
    rc, _, err = cli(capsys, "reproduce", "voc_table1", "--out", tmp_path / "v")
    line = one_line_error(rc, err, "needs pycocotools", "pip install", "[detection]")
    assert "torchvision" not in line.split("(")[0]
    assert not (tmp_path / "v").exists()
