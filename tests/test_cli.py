"""The `pwsconv` command line: bad input → one line + exit code 2, fold round trip, resume, the quick demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from pwsconv.cli import build_parser, main, subcommand

SMALL = ["--limit", "128", "--test-limit", "100", "--batch-size", "32", "--epochs", "1", "--no-progress",
         "--num-threads", "1", "--ckpt-every", "0"]


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "error" in lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny PWS run trained through the CLI (shared by the tests that need a checkpoint)."""
    d = tmp_path_factory.mktemp("cli") / "pws"
    rc = main(["train", "--out-dir", str(d), "--method", "pws", "--lr", "0.1", "--set", "method_opts.gamma=1e-3"]
              + SMALL)
    assert rc == 0
    return d


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("args,needle", [
    (["--model", "nope"], "unknown model"),
    (["--method", "nope"], "unknown method"),
    (["--dataset", "nope"], "unknown dataset"),
    (["--lr", "-0.1"], "lr must be"),
    (["--batch-size", "-4"], "batch_size"),
    (["--set", "lrr=0.1"], "unknown config key"),
    (["--set", "noequals"], "key=value"),
    (["--amp", "fp8"], "amp"),
    (["--set", "method_opts.nope=1"], "nope"),
    (["--dataset", "mnist", "--data-root", "/nonexistent/pwsconv-data"], "/nonexistent/pwsconv-data"),
])
def test_train_bad_input(tmp_path, capsys, args, needle):
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, "train", "--out-dir", out, *SMALL, *args)
    assert_one_line_error(rc, err, needle)
    assert not out.exists()   # nothing written for a run that could not start


def test_malformed_and_missing_yaml(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.1\n  model: : [\n")
    rc, _, err = run_cli(capsys, "train", "--config", bad, "--out-dir", tmp_path / "o")
    assert_one_line_error(rc, err, "malformed YAML", "bad.yaml")
    rc, _, err = run_cli(capsys, "train", "--config", tmp_path / "missing.yaml")
    assert_one_line_error(rc, err, "not found")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("lr: 0.1\nbatchsize: 3\n")
    rc, _, err = run_cli(capsys, "train", "--config", unknown)
    assert_one_line_error(rc, err, "batchsize", "batch_size")


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--no-such-flag"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_existing_results_are_never_overwritten(trained, capsys):
    before = {f: (trained / f).read_bytes() for f in os.listdir(trained)}
    rc, _, err = run_cli(capsys, "train", "--out-dir", trained, "--lr", "0.3", *SMALL)
    assert_one_line_error(rc, err, "already holds files", "--resume")
    assert {f: (trained / f).read_bytes() for f in os.listdir(trained)} == before


def test_corrupt_checkpoint(tmp_path, trained, capsys):
    good = (trained / "checkpoint.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(good[: len(good) // 3])
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage" * 10)
    for cmd in (["eval", tmp_path / "trunc.pt"], ["eval", tmp_path / "junk.pt"],
                ["fold", tmp_path / "trunc.pt", tmp_path / "f.pt"], ["eval", tmp_path / "missing.pt"]):
        rc, _, err = run_cli(capsys, *cmd)
        assert_one_line_error(rc, err, "checkpoint")
    assert not (tmp_path / "f.pt").exists()


def test_console_script_error_has_no_traceback(tmp_path):
    """The installed entry point, as a user runs it."""
    p = subprocess.run([sys.executable, "-m", "pwsconv.cli", "train", "--lr", "-1", "--out-dir", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == ["pwsconv train: error: lr must be a finite number > 0, got -1.0"]


# ------------------------------------------------------------------------------------------ eval, fold, resume
def test_fold_round_trip(tmp_path, trained, capsys):
    rc, out, _ = run_cli(capsys, "eval", trained / "checkpoint.pt", "--json")
    assert rc == 0
    unfolded = json.loads(out)
    folded_path = tmp_path / "deploy.pt"
    rc, out, _ = run_cli(capsys, "fold", trained, folded_path)
    assert rc == 0 and "folded 10 layer(s)" in out
    ck = torch.load(folded_path, weights_only=True)
    assert ck["model_spec"]["folded"] is True and not any(k.endswith("alpha") for k in ck["model"])
    rc, out, _ = run_cli(capsys, "eval", folded_path, "--json")
    assert rc == 0
    folded = json.loads(out)
    assert folded["folded"] and not unfolded["folded"]
    assert folded["n"] == unfolded["n"] > 0
    assert folded["acc"] == unfolded["acc"]
    assert folded["loss"] == pytest.approx(unfolded["loss"], rel=1e-4, abs=1e-5)
    # the folded model holds plain torch layers only
    from pwsconv.train import build_from_spec

    model = build_from_spec(ck["model_spec"])
    model.load_state_dict(ck["model"])
    assert not any(type(m).__module__.startswith("pwsconv.layers") for m in model.modules())
    # OUT exists → refused (exit 2) unless --force
    rc, _, err = run_cli(capsys, "fold", trained, folded_path)
    assert_one_line_error(rc, err, "already exists")
    assert run_cli(capsys, "fold", trained, folded_path, "--force")[0] == 0


def test_eval_options(trained, capsys):
    rc, out, _ = run_cli(capsys, "eval", trained, "--split", "train", "--limit", "64")
    assert rc == 0 and "train: loss" in out and "n=64 of 128 images: --limit" in out
    # the run was tested on its first 100 test images (--test-limit 100): eval scores the same ones and says so
    rc, out, _ = run_cli(capsys, "eval", trained)
    assert rc == 0 and "n=100 of 359 images: the run's test_limit; --all scores all of them" in out
    result = json.loads((trained / "result.json").read_text())
    rc, out, _ = run_cli(capsys, "eval", trained, "--json")
    got = json.loads(out)
    assert (got["n"], got["n_split"]) == (100, 359) and got["acc"] == pytest.approx(result["metrics"]["test_acc"])
    rc, out, _ = run_cli(capsys, "eval", trained, "--all")
    assert rc == 0 and "n=359 of 359 images)" in out
    rc, _, err = run_cli(capsys, "eval", trained, "--all", "--limit", "5")
    assert_one_line_error(rc, err, "--all and --limit")
    rc, _, err = run_cli(capsys, "eval", trained, "--split", "val")
    assert_one_line_error(rc, err, "no val split")
    rc, _, err = run_cli(capsys, "eval", trained, "--dataset", "mnist", "--data-root", "/nonexistent/x")
    assert_one_line_error(rc, err, "/nonexistent/x")


def test_eval_on_another_data_set_says_so(trained, tmp_path, capsys):
    """Scoring a digits model on (28×28) MNIST works, with a note that the images are resized and normalized as
    the training set was; on its own data set there is no note."""
    import numpy as np

    from pwsconv.data import write_idx

    rng = np.random.default_rng(0)
    d = tmp_path / "mnist"
    d.mkdir()
    for split, n in (("train", 20), ("t10k", 10)):
        write_idx(d / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(d / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, n, dtype=np.uint8))
    rc, out, err = run_cli(capsys, "eval", trained, "--dataset", "mnist", "--data-root", d)
    assert rc == 0 and "n=10 of 10" in out
    assert "note: the model was trained on digits; mnist's images" in err and "resized" in err
    rc, out, err = run_cli(capsys, "eval", trained)
    assert rc == 0 and "note" not in err


def test_resume_uses_the_runs_own_config(tmp_path, capsys):
    d = tmp_path / "r"
    assert main(["train", "--out-dir", str(d), "--method", "none", "--lr", "0.02", "--max-steps", "2"] + SMALL) == 0
    capsys.readouterr()
    # resume without --config: the saved config.yaml is the base; only the run length changes
    rc, out, err = run_cli(capsys, "train", "--out-dir", d, "--resume", "--max-steps", "4")
    assert rc == 0, err
    assert "step 4" in out and "status ok" in out
    ck = torch.load(d / "checkpoint.pt", weights_only=True)
    assert ck["config"]["method"] == "none" and ck["config"]["lr"] == 0.02 and ck["step"] == 4


def test_resume_where_there_is_no_run_says_so_and_starts_one(tmp_path, capsys):
    """--resume on an output directory without a run (a preemptible job's first start, or a mistyped path) starts a
    new run, and says so on stderr: never silently."""
    d = tmp_path / "typo"
    rc, out, err = run_cli(capsys, "train", "--out-dir", d, "--resume", "--method", "none", "--max-steps", "2", *SMALL)
    assert rc == 0 and "step 2" in out
    assert f"nothing to resume in {d}" in err and "starting a new run" in err
    rc, out, err = run_cli(capsys, "train", "--out-dir", d, "--resume", "--max-steps", "3")
    assert rc == 0 and "nothing to resume" not in err and "step 3" in out


def test_print_config(capsys):
    rc, out, _ = run_cli(capsys, "train", "--print-config", "--lr", "0.2", "--set", "method_opts.gamma=1e-4",
                         "--milestones", "100", "150", "--model-opt", "widths=[8, 16]")
    assert rc == 0 and "lr: 0.2" in out and "gamma: 0.0001" in out and "- 150" in out and "- 16" in out


# --------------------------------------------------------------------------------------------------- demo
def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    rc, text, err = run_cli(capsys, "demo", "--quick", "--out", out)
    assert rc == 0, err
    assert "| method | LR | batch | verdict | test acc (%) | status |" in text
    assert text.count("\n| ") >= 16     # header + 15 runs
    for f in ("results.md", "results.csv", "results.jsonl", "curves.png"):
        assert (out / f).is_file(), f
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 15 and {r["method"] for r in rows} == {"plain conv", "BN", "GN", "PWS", 'PWS gamma="auto"'}
    assert {r["batch"] for r in rows} == {64, 2}
    assert (out / "pws_lr0.2_b64" / "metrics.csv").is_file()
    # running it again skips the finished runs (resumable sweep)
    rc, text2, _ = run_cli(capsys, "demo", "--quick", "--out", out)
    assert rc == 0 and text2.count("skipped") == 15
    # a sweep directory holding a run with other settings is refused, not overwritten
    from pwsconv.experiments import RunSpec, SweepError, run_sweep
    from pwsconv.experiments.demo import demo_runs

    spec = demo_runs(quick=True)[0]
    before = (out / spec.name / "checkpoint.pt").read_bytes()
    with pytest.raises(SweepError, match="other settings"):
        run_sweep([RunSpec(spec.name, spec.config.replace(lr=0.5))], out, log=None)
    assert (out / spec.name / "checkpoint.pt").read_bytes() == before


def test_adding_a_subcommand_is_one_function(capsys):
    @subcommand("hello", "say hello (test)")
    def _hello(p):
        p.add_argument("--name", default="world")
        return lambda args: print(f"hello {args.name}") or 0

    try:
        assert "hello" in build_parser().format_help()
        assert main(["hello", "--name", "pws"]) == 0 and capsys.readouterr().out == "hello pws\n"
    finally:
        from pwsconv import cli

        cli._SUBCOMMANDS[:] = [s for s in cli._SUBCOMMANDS if s[0] != "hello"]


def test_train_help_describes_every_option_in_its_group(capsys):
    """`pwsconv train --help`: every option has a description — for config fields the one config.py declares —
    under its group (what to train / optimization / speed and reproducibility / outputs)."""
    import argparse
    import dataclasses

    from pwsconv.config import FIELD_GROUPS, TrainConfig

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    groups = {g.title: g for g in sub._action_groups}
    assert set(FIELD_GROUPS) <= set(groups)
    for f in dataclasses.fields(TrainConfig):
        (action,) = [a for a in groups[f.metadata["group"]]._group_actions if a.dest == f"cfg_{f.name}"]
        assert f.metadata["help"] and action.help.startswith(f.metadata["help"]), f.name
    assert all(a.help for a in sub._actions)
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    positions = [text.index(f"\n{g}:\n") for g in FIELD_GROUPS]
    assert positions == sorted(positions)


def test_missing_data_error_speaks_in_command_line_terms(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PWSCONV_DATA", raising=False)
    rc, _, err = run_cli(capsys, "train", "--out-dir", tmp_path / "out", "--dataset", "mnist", *SMALL)
    assert_one_line_error(rc, err, "no data directory found for 'mnist'", "--data-root", "PWSCONV_DATA")


def test_probe_refuses_to_overwrite_its_results(tmp_path, capsys):
    out = tmp_path / "probe"
    args = ["probe", "--methods", "none", "pws", "--steps", "2", "--batch-size", "16", "--out", out, "--no-progress"]
    rc, text, _ = run_cli(capsys, *args)
    assert rc == 0 and "Where Var[Y_L]/Var[Y_1] comes from" in (out / "summary.md").read_text()
    before = (out / "records.csv").read_bytes()
    rc, _, err = run_cli(capsys, *args)
    assert_one_line_error(rc, err, "already holds a probe's results", "--force")
    assert (out / "records.csv").read_bytes() == before
    assert run_cli(capsys, *args, "--force")[0] == 0
