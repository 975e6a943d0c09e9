"""Nothing silently wrong: checkpoint integrity, run-directory ownership and locking, a full disk, bad input.

Every item of the issue has a test here (``test_item01_*`` … ``test_item13_*``), plus a table-driven test that feeds
more than 200 bad command lines to the CLI in-process and checks: exit code 2, one stderr line, no traceback, and no
file on disk changed or created.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import shutil
import stat
import subprocess
import sys
import threading
import zipfile

import pytest
import torch
import yaml

from pwsconv.cli import main
from pwsconv.config import ConfigError, TrainConfig
from pwsconv.train import CheckpointError, load_checkpoint, read_metrics, train
from pwsconv.train.checkpoint import WriteError, atomic_save, atomic_write_text, current_umask, verify_checkpoint
from pwsconv.train.engine import ConfigMismatchError
from pwsconv.train.metrics import MetricsLog
from pwsconv.train.rundir import LOCK_NAME, RunDirLocked, lock_run_dir

TINY = ["--epochs", "1", "--limit", "64", "--test-limit", "64", "--batch-size", "32", "--no-progress",
        "--num-threads", "1", "--ckpt-every", "0"]
SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def cli(capsys, *args) -> tuple[int, str, str]:
    """Run the CLI in-process: (exit code, stdout, stderr); argparse's SystemExit counts as an exit code."""
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc: int, err: str, *needles: str) -> str:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "error" in lines[0], err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def snapshot(root) -> dict[str, tuple]:
    """Every path under ``root``: files by (sha256, mtime_ns, mode), directories by kind."""
    snap: dict[str, tuple] = {}
    for d, dirs, files in os.walk(root):
        for name in dirs:
            snap[os.path.relpath(os.path.join(d, name), root)] = ("dir",)
        for name in files:
            p = os.path.join(d, name)
            st = os.stat(p)
            with open(p, "rb") as f:
                snap[os.path.relpath(p, root)] = (hashlib.sha256(f.read()).hexdigest(), st.st_mtime_ns, st.st_mode)
    return snap


def flip_member(path, member_suffix: str | None = None) -> str:
    """XOR a few bytes inside one zip member of a torch.save file (its CRC no longer matches); returns the member."""
    with zipfile.ZipFile(path) as z:
        infos = [i for i in z.infolist() if "/data/" in i.filename]
        info = max(infos, key=lambda i: i.file_size) if member_suffix is None else \
            next(i for i in infos if i.filename.endswith(member_suffix))
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        n, m = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        start = info.header_offset + 30 + n + m
        f.seek(start + min(16, info.file_size // 2))
        chunk = bytearray(f.read(4))
        f.seek(start + min(16, info.file_size // 2))
        f.write(bytes(b ^ 0x5A for b in chunk))
    return info.filename


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Two finished tiny runs (pws ``R``, bn ``X``) and a folded model, trained once for this module."""
    root = tmp_path_factory.mktemp("robust")
    assert main(["train", "--out-dir", str(root / "R"), "--method", "pws", *TINY]) == 0
    assert main(["train", "--out-dir", str(root / "X"), "--method", "bn", *TINY]) == 0
    assert main(["fold", str(root / "R"), str(root / "F.pt")]) == 0
    return root


@pytest.fixture
def runs(base, tmp_path):
    """Fresh copies of the module's runs (tests may break them)."""
    for name in ("R", "X"):
        shutil.copytree(base / name, tmp_path / name)
    shutil.copy(base / "F.pt", tmp_path / "F.pt")
    return tmp_path


# ------------------------------------------------------------------------------------------- 1. integrity
def test_item01_bit_flipped_checkpoint_is_refused_everywhere(runs, capsys):
    ck = runs / "R" / "checkpoint.pt"
    member = flip_member(ck)
    with pytest.raises(CheckpointError, match="CRC"):
        verify_checkpoint(ck)
    before = snapshot(runs)
    for cmd in (["eval", runs / "R"], ["eval", ck], ["fold", runs / "R", runs / "R" / "f.pt"],
                ["train", "--out-dir", runs / "R", "--resume", "--epochs", "2", "--no-progress"]):
        line = one_line_error(*cli(capsys, *cmd)[::2], "checkpoint.pt", "corrupt")
        assert member in line
    assert snapshot(runs) == before
    # a folded model file is verified the same way
    flip_member(runs / "F.pt")
    one_line_error(*cli(capsys, "eval", runs / "F.pt")[::2], "F.pt", "corrupt")
    # checkpoints written before this change (no extra data in them) still load: nothing new is required
    obj = load_checkpoint(runs / "X")
    torch.save(obj, runs / "plain_save.pt")        # a bare torch.save of the same content
    assert load_checkpoint(runs / "plain_save.pt")["step"] == obj["step"]


# -------------------------------------------------------------------------- 2. resume / sweep ownership
def test_item02_resume_without_checkpoint_never_replaces_another_run(runs, capsys):
    x = runs / "X"
    os.remove(x / "checkpoint.pt")
    before = snapshot(runs)
    one_line_error(*cli(capsys, "train", "--out-dir", x, "--resume", "--method", "pws")[::2],
                   "cannot resume", "method 'bn' → 'pws'")
    with pytest.raises(ConfigMismatchError, match="lr"):
        train(TrainConfig.from_dict({**yaml.safe_load((x / "config.yaml").read_text()), "lr": 0.05}), resume=True)
    # the run finished and cannot be continued without its checkpoint: a longer run is refused too
    one_line_error(*cli(capsys, "train", "--out-dir", x, "--resume", "--epochs", "2")[::2], "no checkpoint.pt")
    # the same settings: its result, nothing retrained or rewritten
    rc, out, err = cli(capsys, "train", "--out-dir", x, "--resume")
    assert rc == 0 and "status ok" in out, err
    assert snapshot(runs) == before
    # metrics of unknown settings (no checkpoint, config.yaml or result.json) are not overwritten either
    for f in ("config.yaml", "result.json"):
        os.remove(x / f)
    before = snapshot(runs)
    one_line_error(*cli(capsys, "train", "--out-dir", x, "--resume", "--method", "bn", *TINY)[::2], "unknown")
    assert snapshot(runs) == before


def test_item02_sweep_refuses_other_settings_without_checkpoint(runs):
    from pwsconv.experiments import RunSpec, SweepError, run_sweep

    sweep = runs / "sweep"
    cfg = TrainConfig.from_dict(yaml.safe_load((runs / "X" / "config.yaml").read_text()))
    shutil.copytree(runs / "X", sweep / "bn")
    os.remove(sweep / "bn" / "checkpoint.pt")        # like the committed results/reproduce runs
    before = snapshot(sweep)
    [rec] = run_sweep([RunSpec("bn", cfg)], sweep, log=None)
    assert rec.skipped and snapshot(sweep) == before
    with pytest.raises(SweepError, match=r"other settings \(lr 0.1 → 0.05"):
        run_sweep([RunSpec("bn", cfg.replace(lr=0.05))], sweep, log=None)
    assert snapshot(sweep) == before


def test_item02_committed_reproduce_runs_still_reaggregate(tmp_path):
    """The committed results/reproduce runs (config.yaml, metrics, result.json; no checkpoint) are the same
    settings to the stricter comparison: skipped, not retrained; a changed LR is refused."""
    from pwsconv.experiments import SweepError, run_sweep
    from pwsconv.experiments.paper import build_runs

    committed = os.path.join(os.path.dirname(SRC), "results", "reproduce", "table2_cpu")
    if not os.path.isdir(committed):
        pytest.skip("no committed table2_cpu results in this checkout")
    specs = [r for r in build_runs("table2", "cpu") if os.path.isdir(os.path.join(committed, r.name))][:3]
    assert specs
    for r in specs:
        shutil.copytree(os.path.join(committed, r.name), tmp_path / r.name)
    before = snapshot(tmp_path)
    recs = run_sweep(specs, tmp_path, log=None)
    assert all(r.skipped for r in recs) and snapshot(tmp_path) == before
    changed = specs[0].config.replace(lr=specs[0].config.lr / 2)
    with pytest.raises(SweepError, match="other settings"):
        run_sweep([type(specs[0])(specs[0].name, changed, specs[0].labels)], tmp_path, log=None)
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------- 3. locking
HOLD = ("import sys; sys.path.insert(0, sys.argv[1]); from pwsconv.train.rundir import lock_run_dir\n"
        "with lock_run_dir(sys.argv[2]):\n    print('locked', flush=True); sys.stdin.read()\n")


def test_item03_one_writer_per_run_directory(tmp_path, capsys):
    d = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, SRC, str(d)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(tmp_path)
        one_line_error(*cli(capsys, "train", "--out-dir", d, "--method", "pws", *TINY)[::2], str(d), "in use")
        one_line_error(*cli(capsys, "train", "--out-dir", d, "--resume", *TINY)[::2], "in use")
        assert snapshot(tmp_path) == before
        # a sweep worker on the same run is refused at once, too
        from pwsconv.experiments import RunSpec, run_sweep

        cfg = TrainConfig(method="bn", epochs=1, limit=64, test_limit=64, batch_size=32, num_threads=1)
        with pytest.raises(RunDirLocked, match="in use"):
            run_sweep([RunSpec("run", cfg)], tmp_path, log=None)
    finally:
        holder.kill()   # SIGKILL: the kernel releases the lock; the stale .lock file must not block anyone
        holder.wait()
    assert (d / LOCK_NAME).exists()
    rc, _, err = cli(capsys, "train", "--out-dir", d, "--resume", "--method", "pws", *TINY)
    assert rc == 0, err
    assert not (d / LOCK_NAME).exists() and (d / "result.json").is_file()


def test_item03_lock_is_per_thread_and_reentrant(tmp_path):
    d = tmp_path / "run"
    with lock_run_dir(d):
        with lock_run_dir(d):         # the same thread again (a sweep holding the lock while train() takes it)
            pass
        assert (d / LOCK_NAME).exists()
        errors = []
        t = threading.Thread(target=lambda: errors.append(_try_lock(d)))
        t.start()
        t.join()
        assert errors and isinstance(errors[0], RunDirLocked) and str(d) in str(errors[0])
    assert not d.exists()             # the lock created the directory and nothing was written: no trace left


def _try_lock(d):
    try:
        with lock_run_dir(d):
            return None
    except RunDirLocked as e:
        return e


# ------------------------------------------------------------------------------------------- 4. disk full
def _fail_save(exc):
    def save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 partial")   # some bytes reach the temporary file first
        raise exc
    return save


@pytest.mark.parametrize("exc,reason", [
    (RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: "
                  "file write failed"), "write failed"),
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on device"),
])
def test_item04_full_disk_at_a_checkpoint_write(runs, capsys, monkeypatch, exc, reason):
    r = runs / "R"
    ck_before = (r / "checkpoint.pt").read_bytes()
    rows_before = (r / "metrics.jsonl").read_text().splitlines()
    monkeypatch.setattr("pwsconv.train.checkpoint.torch.save", _fail_save(exc))
    line = one_line_error(*cli(capsys, "train", "--out-dir", r, "--resume", "--epochs", "2",
                               "--no-progress")[::2], "cannot write", str(r / "checkpoint.pt"), reason)
    assert "enforce fail" not in line
    assert (r / "checkpoint.pt").read_bytes() == ck_before
    assert (r / "metrics.jsonl").read_text().splitlines()[: len(rows_before)] == rows_before
    assert not [f for f in os.listdir(r) if f.endswith(".tmp")] and not (r / LOCK_NAME).exists()
    monkeypatch.undo()
    # with space again, the run resumes from the intact checkpoint and its metrics are whole
    rc, _, err = cli(capsys, "train", "--out-dir", r, "--resume", "--epochs", "2", "--no-progress")
    assert rc == 0, err
    assert [row["step"] for row in read_metrics(r)] == [2, 4]


def test_item04_full_disk_at_a_metrics_append_and_text_write(tmp_path, monkeypatch):
    log = MetricsLog(str(tmp_path))
    log.log({"epoch": 1.0, "step": 2, "lr": 0.1, "status": "running"})
    before = {f: (tmp_path / f).read_bytes() for f in ("metrics.csv", "metrics.jsonl")}
    real_write = os.write

    def short_then_full(fd, data):   # half a line lands, then the disk is full
        if len(data) > 8:
            real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("pwsconv.train.metrics.os.write", short_then_full)
    with pytest.raises(WriteError, match="metrics.csv: no space left on device"):
        log.log({"epoch": 2.0, "step": 4, "lr": 0.1, "status": "ok"})
    monkeypatch.undo()
    assert {f: (tmp_path / f).read_bytes() for f in before} == before   # no torn line, every row intact
    # a text file (config.yaml, result.json) on a full disk: the old content stays, no temporary file is left
    target = tmp_path / "result.json"
    target.write_text("old")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("pwsconv.train.checkpoint.os.fsync", full)
    with pytest.raises(WriteError) as e:
        atomic_write_text("new", target)
    monkeypatch.undo()
    assert str(e.value) == f"cannot write {target}: no space left on device" and e.value.errno == errno.ENOSPC
    assert target.read_text() == "old" and not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


# --------------------------------------------------------------------------------- 5.–8. bad input, one line
def test_item05_no_tracebacks(runs, capsys):
    r = runs / "R"
    before = snapshot(runs)
    for cmd, needle in ((["eval", r, "--device", "quantum"], "quantum"), (["eval", r, "--device", "meta"], "meta"),
                        (["train", "--device", "meta", "--out-dir", runs / "n1", *TINY], "meta"),
                        (["train", "--model", "resnet_cifar_small", "--model-opt", "width=abc",
                          "--out-dir", runs / "n2", *TINY], "width"),
                        (["train", "--model", "resnet_cifar_small", "--model-opt", "depth=7",
                          "--out-dir", runs / "n3", *TINY], "depth")):
        one_line_error(*cli(capsys, *cmd)[::2], needle)
    assert snapshot(runs) == before
    # end to end, as a user runs it
    for cmd in (["eval", str(r), "--device", "quantum"], ["train", "--device", "meta", "--out-dir", str(runs / "n")]):
        p = subprocess.run([sys.executable, "-m", "pwsconv", *cmd], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": SRC})
        assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_item06_silently_accepted_values(tmp_path, capsys, monkeypatch):
    one_line_error(*cli(capsys, "train", "--method-opt", "use_alpha=maybe", "--out-dir", tmp_path / "a",
                        *TINY)[::2], "use_alpha", "true/false")
    with pytest.raises(ConfigError, match="use_alpha"):
        TrainConfig(method_opts={"use_alpha": "maybe"}).validate()

    def no_training(*a, **k):
        raise AssertionError("the probe started training")

    monkeypatch.setattr("pwsconv.diagnostics.run_probe_experiment", no_training)
    one_line_error(*cli(capsys, "probe", "--batch-size", "10000000", "--steps", "2", "--out", tmp_path / "p",
                        "--no-progress")[::2], "--batch-size 10000000", "larger than the training set")
    from pwsconv import param_groups

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    with pytest.raises(TypeError, match="weight_decay"):
        param_groups(net, weight_decay=True)
    assert not os.listdir(tmp_path)


def test_item07_probe_checks_gamma_before_training(tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr("pwsconv.diagnostics.run_probe_experiment", lambda *a, **k: calls.append(1))
    for g in ("-1", "nan", "inf"):
        one_line_error(*cli(capsys, "probe", "--gamma", g, "--out", tmp_path / "p", "--no-progress")[::2], "gamma")
    assert not calls and not (tmp_path / "p").exists()


def test_item08_clear_messages(runs, capsys):
    with open(runs / "plain.pkl", "wb") as f:
        pickle.dump({"model": [1, 2, 3]}, f)
    rc, _, err = cli(capsys, "eval", runs / "plain.pkl")
    line = one_line_error(rc, err, "plain.pkl", "not a pwsconv checkpoint")
    assert "Warning" not in err and line == err.strip()
    one_line_error(*cli(capsys, "train", "--seed", str(2**70), "--out-dir", runs / "s", *TINY)[::2],
                   "seed must be an integer in [0, 2**32)")
    (runs / "afile").write_text("x")
    for cmd in (["train", "--out-dir", runs / "afile" / "run", *TINY], ["fold", runs / "R", runs / "afile" / "f.pt"],
                ["probe", "--out", runs / "afile" / "p", "--no-progress"]):
        line = one_line_error(*cli(capsys, *cmd)[::2], "afile", "is a file, not a directory")
        assert "Errno" not in line


# --------------------------------------------------------------------------------------- 9.–11. the last holes
def test_item09_fold_never_replaces_a_training_checkpoint(runs, capsys):
    r = runs / "R"
    before = snapshot(runs)
    for out, src in ((r / "checkpoint.pt", r / "checkpoint.pt"), (r / "checkpoint.pt", r),
                     (runs / "X" / "checkpoint.pt", r)):
        one_line_error(*cli(capsys, "fold", src, out, "--force")[::2], "OUT")
    assert snapshot(runs) == before
    rc, _, err = cli(capsys, "train", "--out-dir", r, "--resume", "--epochs", "2", "--no-progress")
    assert rc == 0, err


def test_item10_a_directory_named_checkpoint_pt(runs, capsys):
    r = runs / "R"
    os.remove(r / "checkpoint.pt")
    os.mkdir(r / "checkpoint.pt")
    before = snapshot(runs)
    one_line_error(*cli(capsys, "train", "--out-dir", r, "--resume", "--no-progress")[::2], "checkpoint.pt",
                   "not a regular file")
    one_line_error(*cli(capsys, "eval", r)[::2], "checkpoint.pt")
    assert snapshot(runs) == before
    assert len(read_metrics(r)) == 1


def test_item11_python_api_argument_errors():
    from pwsconv import convert, fold, param_groups

    for call, name in ((lambda: convert("x"), "model"), (lambda: convert(None), "model"),
                       (lambda: fold(None), "model"), (lambda: param_groups("x", 0.1), "model"),
                       (lambda: convert(torch.nn.Conv2d(3, 4, 3), method=3), "method"),
                       (lambda: param_groups(torch.nn.Conv2d(3, 4, 3), None), "weight_decay")):
        with pytest.raises(TypeError, match=name):
            call()
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(torch.nn.Conv2d(3, 4, 3), -1.0)


# ------------------------------------------------------------------------------------ 12.–13. leftovers, modes
KILL_MID_WRITE = (
    "import os, signal, sys; sys.path.insert(0, sys.argv[1])\n"
    "from pwsconv.train.checkpoint import _atomic_write\n"
    "def write(f):\n    f.write(b'half a checkpoint'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
    "_atomic_write(os.path.join(sys.argv[2], sys.argv[3]), write)\n")


def test_item12_temp_files_of_a_killed_writer_are_removed_at_the_next_start(runs, capsys):
    r = runs / "R"
    for name in ("checkpoint.pt", "result.json"):
        p = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, SRC, str(r), name], timeout=120)
        assert p.returncode == -9
    stale = sorted(f for f in os.listdir(r) if f.endswith(".tmp"))
    assert len(stale) == 2 and stale[0].startswith(".checkpoint.pt.") and stale[1].startswith(".result.json.")
    (r / "notes.tmp").write_text("the user's own file")
    rc, _, err = cli(capsys, "train", "--out-dir", r, "--resume", "--no-progress")
    assert rc == 0, err
    assert sorted(f for f in os.listdir(r) if f.endswith(".tmp")) == ["notes.tmp"]


UMASK_RUN = (
    "import os, sys; sys.path.insert(0, sys.argv[1]); os.umask(int(sys.argv[3], 8))\n"
    "from pwsconv.cli import main\n"
    "sys.exit(main(['train', '--out-dir', sys.argv[2]] + sys.argv[4:]))\n")


@pytest.mark.parametrize("mask", ["027"])
def test_item13_files_follow_the_umask(tmp_path, mask):
    d = tmp_path / "run"
    p = subprocess.run([sys.executable, "-c", UMASK_RUN, SRC, str(d), mask, *TINY], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    want = 0o666 & ~int(mask, 8)
    modes = {f: stat.S_IMODE(os.stat(d / f).st_mode) for f in os.listdir(d)}
    assert set(modes) == {"config.yaml", "metrics.csv", "metrics.jsonl", "checkpoint.pt", "result.json"}
    assert all(m == want for m in modes.values()), (oct(want), {f: oct(m) for f, m in modes.items()})


def test_item13_umask_is_read_without_changing_it(tmp_path):
    mask = current_umask()
    atomic_save({"a": torch.zeros(1)}, tmp_path / "x.pt")
    assert stat.S_IMODE(os.stat(tmp_path / "x.pt").st_mode) == 0o666 & ~mask
    assert current_umask() == mask


# ------------------------------------------------------------------------- ≥ 200 bad command lines, generated
def _bad_invocations(w) -> list[list]:
    """Bad command lines against the world ``w`` (finished runs, model files, corrupt files); none may succeed,
    change or create anything."""
    new = w / "new"   # a run that must never be created
    cases: list[list] = []

    def train(*a):
        cases.append(["train", "--out-dir", new, *TINY, *a])

    for flag in ("--lr", "--momentum", "--weight-decay", "--lr-decay", "--val-fraction"):
        for v in ("-1", "abc", "nan", "inf", "1e999", "[1]"):
            train(flag, v)
    for flag in ("--epochs", "--batch-size", "--eval-batch-size", "--limit", "--test-limit", "--max-steps",
                 "--num-threads", "--log-every", "--ckpt-every", "--seed"):
        for v in ("-5", "abc", "1.5", "[1]", "true"):
            train(flag, v)
    train("--seed", str(2**70))
    train("--seed", str(2**32))
    for field in ("augment", "nesterov", "deterministic", "channels_last", "fuse_pws", "pws_recompute", "sync_bn",
                  "progress", "tensorboard", "drop_last"):
        for v in ("maybe", "2", "[true]"):
            train("--set", f"{field}={v}")
    for flag, v in (("--model", "nope"), ("--model", "resnet"), ("--method", "nope"), ("--method", "PWSS"),
                    ("--dataset", "nope"), ("--dataset", "digitz"), ("--amp", "fp8"), ("--amp", "bf17"),
                    ("--device", "quantum"), ("--device", "meta"), ("--device", "cuda:99"), ("--device", ""),
                    ("--device", "cpu:x"), ("--out-dir", ""), ("--data-root", "/nonexistent/pwsconv")):
        if flag == "--data-root":
            train("--dataset", "mnist", flag, v)
        else:
            train(flag, v)
    for opt in ("use_alpha=maybe", "use_gain=2", "equiv=abc", "data_init_alpha=[1]", "gamma=-1", "gamma=abc",
                "gamma=nan", "gamma=inf", "fan_mode=bogus", "fan_mode=3", "nope=1", "=3", "noequals"):
        train("--method", "pws", "--method-opt", opt)
    for method, opt in (("gn", "groups=abc"), ("gn", "groups=2.5"), ("gn", "groups=0"), ("bn", "eps=x"),
                        ("bn", "momentum=abc"), ("bn", "gamma=1"), ("none", "gamma=1e-3")):
        train("--method", method, "--method-opt", opt)
    for model, opt in (("resnet_cifar_small", "width=abc"), ("resnet_cifar_small", "width=-1"),
                       ("resnet_cifar_small", "depth=7"), ("resnet_cifar_small", "depth=abc"),
                       ("resnet_cifar_small", "nope=1"), ("tiny_cnn", "widths=abc"), ("tiny_cnn", "depth=3"),
                       ("resnet_cifar_small", "shortcut=3")):
        train("--model", model, "--model-opt", opt)
    for ms in (["3", "2"], ["0"], ["abc"], ["2", "2"]):
        train("--milestones", *ms)
    for s in ("noequals", "=3", "lrr=0.1", "lr.sub=1", "method_opts=3", "milestones=abc", "batchsize=3"):
        train("--set", s)
    train("--nesterov", "--momentum", "0")
    train("--limit", "10")            # fewer images than one batch (32) with drop_last
    for cfg in ("missing.yaml", "bad.yaml", "list.yaml", "binary.yaml", "adir", "unknown.yaml"):
        cases.append(["train", "--config", w / cfg, "--out-dir", new])
    for out in (w / "afile", w / "afile" / "run", w / "R"):
        cases.append(["train", "--out-dir", out, *TINY])
    for extra in (["--method", "gn"], ["--lr", "0.3"], ["--seed", "1"], ["--model-opt", "widths=[8,8]"],
                  ["--set", "method_opts.gamma=0.01"], ["--batch-size", "16"]):
        cases.append(["train", "--out-dir", w / "R", "--resume", *extra])          # other settings
        cases.append(["train", "--out-dir", w / "Xn", "--resume", *extra])         # the same, no checkpoint
    for d in ("Rflip", "Rdir", "Xn"):
        cases.append(["train", "--out-dir", w / d, "--resume", "--epochs", "3"])
    cases.append(["train", "--out-dir", w / "orphan", "--resume", *TINY])
    cases += [["train", "--no-such-flag"], ["train", "--epochs"], ["train", "--lr"], ["train", "--resume=3"]]

    bad_ckpts = ["missing.pt", "adir", "empty.pt", "junk.pt", "plain.pkl", "trunc.pt", "Rflip", "Rflip/checkpoint.pt",
                 "Fflip.pt", "foreign.pt", "Rdir", "nockpt"]
    for c in bad_ckpts:
        cases.append(["eval", w / c])
        cases.append(["fold", w / c, w / "out.pt"])
    for extra in (["--device", "quantum"], ["--device", "meta"], ["--device", "cuda:99"], ["--device", ""],
                  ["--batch-size", "0"], ["--batch-size", "-1"], ["--batch-size", "abc"], ["--limit", "0"],
                  ["--limit", "-3"], ["--split", "nope"], ["--split", "val"], ["--dataset", "nope"],
                  ["--dataset", "mnist", "--data-root", "/nonexistent/pwsconv"], ["--no-such-flag"]):
        cases.append(["eval", w / "R", *extra])
    cases.append(["eval"])
    for args in ([w / "R", w / "F.pt"], [w / "R", w / "R" / "checkpoint.pt", "--force"],
                 [w / "R" / "checkpoint.pt", w / "R" / "checkpoint.pt", "--force"], [w / "R", w / "afile" / "f.pt"],
                 [w / "R", w], [w / "R", w / "Xn" / "checkpoint.pt", "--force"], [w / "R"],
                 [w / "R", w / "adir" / ""]):
        cases.append(["fold", *args])

    def probe(*a):
        cases.append(["probe", "--out", w / "probe", "--no-progress", *a])

    for flag, vals in (("--lr", ("-1", "0", "nan", "inf", "abc", "1e39", "1e300")),
                       ("--steps", ("0", "-1", "abc", "1.5")), ("--batch-size", ("0", "-2", "10000000")),
                       ("--every", ("0", "-1")), ("--gamma", ("-1", "nan", "inf", "abc", "0", "0.0")),
                       ("--model", ("nope",)), ("--dataset", ("nope",)), ("--mode", ("nope",)),
                       ("--seed", ("-1", str(2**70))), ("--methods", ("bogus", "pws:gamma=0"))):
        for v in vals:
            probe(flag, v)
    cases.append(["probe", "--out", w / "afile", "--no-progress"])
    cases.append(["probe", "--out", w / "afile" / "p", "--no-progress"])
    cases.append(["probe", "--methods", "none", "bn", "pws", "--model", "resnet_cifar_small", "--gamma", "-1",
                  "--out", w / "probe", "--no-progress"])

    for args in (["nope"], ["table4", "--preset", "nope"], ["table4", "--seeds", "0"], ["table4", "--seeds", "-1"],
                 ["table4", "--seeds", "abc"], ["table4", "--full", "--preset", "smoke"],
                 ["table4", "--preset", "smoke", "--out", w / "afile"],
                 ["table4", "--preset", "smoke", "--out", w / "afile" / "sub"], []):
        cases.append(["reproduce", *args])
    for args in (["--epochs", "0"], ["--epochs", "-1"], ["--epochs", "abc"], ["--quick", "--out", w / "afile"],
                 ["--quick", "--out", w / "afile" / "sub"]):
        cases.append(["demo", *args])
    cases += [["nope"], [], ["--no-such-flag"]]

    # issue 22 (reliability round 3)
    for flag, v in (("--lr", "1e39"), ("--lr", "1e300"), ("--weight-decay", "1e39"), ("--weight-decay", "1e300"),
                    ("--num-threads", "99999999999999999999"), ("--num-threads", str(2**31))):
        train(flag, v)
    for opt in ("gamma=0", "gamma=0.0", "gamma=-0.0", "gamma=-1e-12"):
        train("--method", "pws", "--method-opt", opt)
    train("--model-opt", "widths=[200000,200000]")        # terabytes of weights: refused before allocating
    for cfg in ("hugelr.yaml", "hugewd.yaml", "dup.yaml", "dupnested.yaml", "gamma0.yaml"):
        cases.append(["train", "--config", w / cfg, "--out-dir", new])
    links = w.parent / (w.name + "_links")                # symbolic-link loops (outside w: os.walk cannot stat them)
    for out in (links / "a", links / "a" / "run", links / "dangling" / "run"):
        cases.append(["train", "--out-dir", out, *TINY])
    cases.append(["fold", w / "R", links / "a"])
    cases.append(["fold", w / "R", links / "a" / "m.pt"])
    cases.append(["demo", "--quick", "--out", links / "a"])
    for d in _EDITED:
        cases.append(["train", "--out-dir", w / d, "--resume", *TINY, "--epochs", "3"])
    for d in ("Ever", "Ecfgstr", "Espec", "Eseed", "Enc"):
        cases.append(["eval", w / d])
    for d in ("Ever", "Ecfgstr", "Espec", "Enc"):
        cases.append(["fold", w / d, w / "out.pt"])
    cases.append(["reproduce", "voc_table1", "--out", w / "voc"])   # without the detection extra
    return cases


def _bn_weights(ck, base):
    ck["model"] = torch.load(base / "X" / "checkpoint.pt", weights_only=True)["model"]


#: run copies whose checkpoint was edited by hand and saved again (valid CRCs): name → edit(ck, base)
_EDITED = {
    "Eneg": lambda ck, b: ck.__setitem__("step", -3),
    "Ever": lambda ck, b: ck.__setitem__("version", 99),
    "Enoopt": lambda ck, b: ck.pop("optimizer"),
    "Erng": lambda ck, b: ck["rng"][0].__setitem__("torch", torch.zeros(3, dtype=torch.uint8)),
    "Eforeign": _bn_weights,
    "Ecfgstr": lambda ck, b: ck.__setitem__("config", "lr: 0.1"),
    "Espec": lambda ck, b: ck.__setitem__("model_spec", "tiny_cnn"),
    "Eseed": lambda ck, b: ck["config"].__setitem__("seed", "abc"),
    "Enc": lambda ck, b: ck["model_spec"].__setitem__("num_classes", "ten"),
    "Eepoch": lambda ck, b: ck.__setitem__("epoch", "abc"),
    "Ebatch": lambda ck, b: ck.__setitem__("batch", 10**6),
    "Esched": lambda ck, b: ck.__setitem__("scheduler", {"x": 1}),
}


@pytest.fixture(scope="module")
def world(base, tmp_path_factory):
    w = tmp_path_factory.mktemp("world")
    for name in ("R", "X"):
        shutil.copytree(base / name, w / name)
    shutil.copy(base / "F.pt", w / "F.pt")
    shutil.copytree(base / "R", w / "Rflip")
    flip_member(w / "Rflip" / "checkpoint.pt")
    shutil.copy(base / "F.pt", w / "Fflip.pt")
    flip_member(w / "Fflip.pt")
    shutil.copytree(base / "X", w / "Xn")
    os.remove(w / "Xn" / "checkpoint.pt")
    shutil.copytree(base / "R", w / "Rdir")
    os.remove(w / "Rdir" / "checkpoint.pt")
    os.mkdir(w / "Rdir" / "checkpoint.pt")
    os.mkdir(w / "orphan")
    shutil.copy(base / "R" / "metrics.jsonl", w / "orphan" / "metrics.jsonl")
    os.mkdir(w / "nockpt")
    os.mkdir(w / "adir")
    good = (base / "R" / "checkpoint.pt").read_bytes()
    (w / "trunc.pt").write_bytes(good[: len(good) // 2])
    (w / "empty.pt").write_bytes(b"")
    (w / "junk.pt").write_bytes(b"\x00garbage" * 10)
    with open(w / "plain.pkl", "wb") as f:
        pickle.dump({"a": 1}, f)
    torch.save({"something": torch.zeros(1)}, w / "foreign.pt")
    (w / "afile").write_text("not a directory")
    (w / "bad.yaml").write_text("lr: 0.1\n  model: : [\n")
    (w / "list.yaml").write_text("- 1\n- 2\n")
    (w / "binary.yaml").write_bytes(b"\xff\xfe\x00\x01")
    (w / "unknown.yaml").write_text("lr: 0.1\nbatchsize: 3\n")
    (w / "hugelr.yaml").write_text("lr: 1e39\n")
    (w / "hugewd.yaml").write_text("weight_decay: 1e300\n")
    (w / "dup.yaml").write_text("lr: 0.1\nepochs: 1\nlr: 0.5\n")
    (w / "dupnested.yaml").write_text("method: pws\nmethod_opts:\n  gamma: 0.001\n  gamma: 0.01\n")
    (w / "gamma0.yaml").write_text("method: pws\nmethod_opts: {gamma: 0}\n")
    for name, edit in _EDITED.items():
        shutil.copytree(base / "R", w / name)
        ck = torch.load(w / name / "checkpoint.pt", weights_only=True)
        edit(ck, base)
        torch.save(ck, w / name / "checkpoint.pt")
    links = w.parent / (w.name + "_links")
    links.mkdir()
    os.symlink(links / "b", links / "a")
    os.symlink(links / "a", links / "b")
    os.symlink(links / "nowhere", links / "dangling")
    return w


def test_generated_bad_invocations(world, capsys):
    cases = _bad_invocations(world)
    assert len(cases) >= 200
    before = snapshot(world)
    failures = []
    for argv in cases:
        rc, out, err = cli(capsys, *argv)
        lines = err.strip().splitlines()
        if rc != 2 or len(lines) != 1 or "Traceback" in err or "error" not in lines[0]:
            failures.append((argv, rc, err[-300:]))
        now = snapshot(world)
        if now != before:
            changed = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
            failures.append((argv, "changed", changed))
            before = now
    assert not failures, "\n".join(map(str, failures[:20])) + f"\n({len(failures)} of {len(cases)} failed)"
