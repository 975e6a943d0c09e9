"""The ``pwsconv`` command line.

    pwsconv train [--config cfg.yaml] [--set key=value ...] [--lr 0.1 --method bn ...] [--resume]
    pwsconv eval CKPT [--dataset NAME] [--split test|val]
    pwsconv fold CKPT OUT
    pwsconv demo [--out runs/demo] [--epochs N] [--quick]
    pwsconv probe [--model tiny_cnn --dataset digits --lr 0.5 --steps 30 --mode train|measure]
    pwsconv reproduce NAME [--preset cpu|full|smoke] [--dry-run]

Bad input (unknown model/method/dataset, a negative LR or batch size, a missing data directory, malformed YAML, a
corrupt checkpoint, an output directory that holds another run) prints one line on stderr and exits with code 2;
set ``PWSCONV_DEBUG=1`` to get the traceback instead. A collapsed training run is a result (status "nan"), exit 0.

Adding a subcommand is one function decorated with :func:`subcommand`: it receives its ``argparse`` parser, adds its
arguments, and returns the handler ``(args) -> exit code``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from typing import Any, Callable, Sequence

__all__ = ["main", "build_parser", "subcommand"]

Handler = Callable[[argparse.Namespace], int | None]
_SUBCOMMANDS: list[tuple[str, str, Callable[[argparse.ArgumentParser], Handler]]] = []


def subcommand(name: str, help: str) -> Callable:
    """Register ``fn(parser) -> handler`` as ``pwsconv NAME`` (subcommands appear in registration order)."""

    def deco(fn: Callable[[argparse.ArgumentParser], Handler]) -> Callable[[argparse.ArgumentParser], Handler]:
        _SUBCOMMANDS[:] = [s for s in _SUBCOMMANDS if s[0] != name]
        _SUBCOMMANDS.append((name, help, fn))
        return fn

    return deco


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message (exit code 2, as argparse's own)."""

    def error(self, message: str) -> typing.NoReturn:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class UsageError(ValueError):
    """Bad command-line input detected by a handler."""


# --------------------------------------------------------------------------------------------------------- train
def _default_text(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None or value == [] or value == {}:
        return "none"
    return str(value)


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """One ``--field-name`` flag per TrainConfig field (values are parsed like ``--set``), in the field's group, with
    the description the field declares (``config.py`` is the one source)."""
    from .config import FIELD_GROUPS, TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    groups = {name: p.add_argument_group(name) for name in FIELD_GROUPS}
    for f in dataclasses.fields(TrainConfig):
        g = groups[f.metadata["group"]]
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        text = f.metadata["help"]   # its own words on the default where the default is "none" or needs them
        if "default" not in text and default is not None:
            text += f" (default: {_default_text(default)})"
        if hint is bool:
            g.add_argument(flag, dest=f"cfg_{f.name}", action=argparse.BooleanOptionalAction, default=None, help=text)
        elif typing.get_origin(hint) is list:
            g.add_argument(flag, dest=f"cfg_{f.name}", nargs="*", default=None, metavar="N", help=text)
        elif typing.get_origin(hint) is dict:
            g.add_argument(flag.rstrip("s") if f.name.endswith("opts") else flag, dest=f"cfg_{f.name}",
                           action="append", default=None, metavar="KEY=VALUE",
                           help=f"{f.metadata['help']}; one KEY=VALUE each (repeatable)")
        else:
            g.add_argument(flag, dest=f"cfg_{f.name}", default=None, metavar=f.name.upper(), help=text)


def _flag_overrides(args: argparse.Namespace) -> list[tuple[str, Any]]:
    from .config import ConfigError, parse_value

    out: list[tuple[str, Any]] = []
    for key, value in vars(args).items():
        if not key.startswith("cfg_") or value is None:
            continue
        name = key[4:]
        if name in ("method_opts", "model_opts"):
            for item in value:
                k, eq, v = item.partition("=")
                if not eq or not k.strip():
                    raise ConfigError(f"--{name[:-1].replace('_', '-')} must look like key=value, got {item!r}")
                out.append((f"{name}.{k.strip()}", parse_value(v)))
        elif isinstance(value, list):
            out.append((name, [parse_value(v) for v in value]))
        else:
            out.append((name, value))
    return out


@subcommand("train", "train one network (config file + overrides); --resume continues a run")
def _train_parser(p: argparse.ArgumentParser) -> Handler:
    p.description = ("Train one network. Every setting below is a field of the run's config: give it as a flag, as "
                     "--set key=value, or in a YAML file (--config); flags win over --set, --set over the file. "
                     "The run directory gets config.yaml, metrics.csv/.jsonl, checkpoint.pt and result.json.")
    p.add_argument("--config", "-c", metavar="YAML",
                   help="a YAML file of these settings (their names as keys, e.g. `lr: 0.1`)")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set lr=0.1 --set method_opts.gamma=1e-4 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in out_dir from its checkpoint (its config.yaml is the base config "
                        "when --config is not given); where out_dir holds no run yet, say so and start one")
    p.add_argument("--print-config", action="store_true", help="print the effective config as YAML and exit")
    _add_config_flags(p)

    def run(args: argparse.Namespace) -> int:
        import yaml

        from .config import TrainConfig, apply_overrides, load_yaml
        from .train import train

        flags = _flag_overrides(args)
        base: dict[str, Any] = {}
        if args.config:
            base = load_yaml(args.config)
        elif args.resume:
            # the run's own config, found from the out_dir given by the flags (or the default out_dir)
            probe = apply_overrides(TrainConfig(), list(args.overrides))
            probe = apply_overrides(probe, dict(flags))
            saved = os.path.join(probe.out_dir, "config.yaml")
            if os.path.isfile(saved):
                base = load_yaml(saved)
        cfg = TrainConfig.from_dict(base, validate=False)
        cfg = apply_overrides(cfg, list(args.overrides))
        cfg = apply_overrides(cfg, dict(flags))
        if args.print_config:
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
            return 0
        if args.resume and not (os.path.isdir(cfg.out_dir) and os.listdir(cfg.out_dir)):
            # start-or-continue is allowed (a preemptible job's one command), but never silently: a mistyped
            # directory would otherwise start a new run unnoticed
            print(f"pwsconv train: nothing to resume in {cfg.out_dir} (no run there yet): starting a new run",
                  file=sys.stderr)
        res = train(cfg, resume=args.resume)
        if os.environ.get("RANK", "0") not in ("", "0"):
            return 0  # under torchrun only rank 0 reports
        m = res.metrics
        print(f"{res.name}: status {res.status} | epoch {res.epoch:g} step {res.step} | "
              f"train loss {m['train_loss']:.4f} acc {m['train_acc']:.4f} | "
              f"test loss {m['test_loss']:.4f} acc {m['test_acc']:.4f} | {res.wall_time:.1f} s")
        print(f"results in {res.out_dir} (config.yaml, metrics.csv, metrics.jsonl, checkpoint.pt, result.json)")
        return 0

    return run


# ---------------------------------------------------------------------------------------------------------- eval
def _load_model(path: str) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(model in eval mode, its spec, the checkpoint) from a training checkpoint or a folded model file."""
    from .train.loading import load_model_file

    return load_model_file(path)


@subcommand("eval", "evaluate a checkpoint (training checkpoint or `pwsconv fold` output) on a data set")
def _eval_parser(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint.pt, a run directory, or a folded model file")
    p.add_argument("--dataset", help="data set name (default: the one the model was trained on)")
    p.add_argument("--data-root", help="data directory (default: the training run's)")
    p.add_argument("--split", choices=("test", "val", "train"), default="test", help="(default: test)")
    p.add_argument("--batch-size", type=int, default=500, help="images per forward (default: 500)")
    p.add_argument("--limit", type=int, default=None,
                   help="score at most this many images of the split (default: the run's own limit for it: its "
                        "test_limit for test, its limit for train; none for val)")
    p.add_argument("--all", action="store_true", help="score the whole split, even where the run used a limit")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON line")

    def run(args: argparse.Namespace) -> int:
        from .data import Loader, load_dataset
        from .train import evaluate
        from .train.engine import resolve_device

        if args.batch_size < 1:
            raise UsageError(f"--batch-size must be ≥ 1, got {args.batch_size}")
        if args.limit is not None and args.limit < 1:
            raise UsageError(f"--limit must be ≥ 1, got {args.limit}")
        if args.all and args.limit is not None:
            raise UsageError("--all and --limit contradict each other; pass one")
        device = resolve_device(args.device)   # before anything is loaded: a bad device is bad input
        model, spec, ck = _load_model(args.checkpoint)
        cfg = dict(ck.get("config") or {})
        src = args.checkpoint

        def field(key: str, kind: type, default: Any) -> Any:   # a config field of the checkpoint, checked
            v = cfg.get(key)
            if v is None:
                return default
            if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int) or \
                    (kind is float and not 0 <= v < 1) or (kind is int and v < (1 if key == "limit" else 0)):
                raise UsageError(f"{src}: its config.{key} is {v!r}, not a valid {key} (the file was edited or is "
                                 "damaged); pass --dataset to evaluate on a data set of your choice")
            return v

        name = args.dataset or spec.get("dataset") or cfg.get("dataset")
        if not name:
            raise UsageError("the checkpoint does not say which data set it was trained on; pass --dataset")
        same = name == cfg.get("dataset")
        root = args.data_root if args.data_root is not None else (cfg.get("data_root") if same else None)
        # the run's own splits (its limit also decides its val split); the size scored is chosen below
        bundle = load_dataset(name, root, val_fraction=field("val_fraction", float, 0.0) if same else 0.0,
                              seed=field("seed", int, 0) if same else 0,
                              limit=field("limit", int, None) if same and not (args.all and args.split == "train")
                              else None)
        if bundle.num_classes != spec["num_classes"] or bundle.in_channels != spec["in_channels"]:
            raise UsageError(f"data set {name!r} has {bundle.num_classes} classes and {bundle.in_channels} channels; "
                             f"the model expects {spec['num_classes']} and {spec['in_channels']}")
        images = getattr(bundle, args.split)
        if images is None:
            raise UsageError(f"data set {name!r} has no {args.split} split here (a val split needs val_fraction > 0)")
        trained_on = spec.get("dataset") or cfg.get("dataset")
        if trained_on and name != trained_on:
            print(f"pwsconv eval: note: the model was trained on {trained_on}; {name}'s images are scored as they "
                  f"are fed to it (resized to its input size, normalized with {trained_on}'s mean and std)",
                  file=sys.stderr)
        total = len(images)
        run_limit = cfg.get({"test": "test_limit", "train": "limit"}.get(args.split, "")) if same else None
        n, why = total, ""
        if args.limit is not None and args.limit < total:
            n, why = args.limit, "--limit"
        elif args.limit is None and not args.all and run_limit is not None and run_limit < total:
            n, why = int(run_limit), (f"the run's {'test_limit' if args.split == 'test' else 'limit'}; "
                                      "--all scores all of them")
        images = images.subset(slice(0, n))
        model.to(device)
        loader = Loader(images, args.batch_size, shuffle=False, augment=None, mean=spec["mean"], std=spec["std"],
                        device=device)
        m = evaluate(model, loader, device=device)
        out = {"checkpoint": args.checkpoint, "dataset": name, "split": args.split, "folded": bool(spec.get("folded")),
               "loss": m["loss"], "acc": m["acc"], "n": m["n"], "n_split": total, "nonfinite": m["nonfinite"]}
        if args.json:
            from .train.checkpoint import dumps

            print(dumps(out))
        else:
            print(f"{name} {args.split}: loss {m['loss']:.4f} acc {m['acc']:.4f} ({100 * m['acc']:.2f}%, "
                  f"n={m['n']} of {total} images{f': {why}' if why else ''})"
                  f"{' [folded]' if spec.get('folded') else ''}"
                  + (f" [collapsed: {m['nonfinite']} images got non-finite outputs]" if m["nonfinite"] else ""))
        return 0

    return run


# ---------------------------------------------------------------------------------------------------------- fold
@subcommand("fold", "fold PWS (and other reparameterized) layers and eval BatchNorm into plain convs: a deployable "
                    "model file (pwsconv.load reads it)")
def _fold_parser(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint.pt or a run directory")
    p.add_argument("out", metavar="OUT", help="the model file to write (state_dict + model spec)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")

    def run(args: argparse.Namespace) -> int:
        from collections import Counter

        from .folding import fold_report
        from .train.checkpoint import MODEL_FORMAT, atomic_save

        from .train.checkpoint import verify_checkpoint
        from .train.rundir import check_output_file

        if os.path.isdir(args.out):
            raise UsageError(f"{args.out} is a directory; OUT must be a file path")
        src = verify_checkpoint(args.checkpoint)   # the file actually read (CKPT/checkpoint.pt for a run directory)
        check_output_file(args.out, "OUT")         # a symbolic-link loop or a file in its path: named as such
        if os.path.lexists(args.out) and os.path.exists(src) and os.path.samefile(src, args.out):
            raise UsageError(f"OUT {args.out} is the checkpoint being folded; write the model file elsewhere")
        if os.path.exists(args.out) and not args.force:
            raise UsageError(f"{args.out} already exists; pass --force to overwrite it or choose another OUT")
        if os.path.basename(args.out) == "checkpoint.pt" and any(
                os.path.exists(os.path.join(os.path.dirname(os.path.abspath(args.out)), f))
                for f in ("config.yaml", "metrics.jsonl", "result.json")):
            raise UsageError(f"OUT {args.out} is the training checkpoint of a run directory; replacing it would "
                             "make the run impossible to resume — choose another OUT")
        model, spec, ck = _load_model(src)
        folded, report = fold_report(model.eval())   # a copy: ``model`` still holds what was folded
        merged = Counter(type(model.get_submodule(n)).__name__ for n in report.plain + report.merged)
        spec = {**spec, "folded": True}
        atomic_save({"format": MODEL_FORMAT, "version": 1, "model_spec": spec, "model": folded.state_dict(),
                     "config": ck.get("config") or {}, "source": os.path.abspath(args.checkpoint)}, args.out)
        kinds = sorted({type(m).__name__ for m in folded.modules() if len(list(m.children())) == 0
                        and any(True for _ in m.parameters(recurse=False))})
        detail = f" ({', '.join(f'{n} {k}' for k, n in sorted(merged.items()))})" if merged else ""
        print(f"folded {sum(merged.values())} layer(s) of {spec['model']} ({spec['method']}) into plain layers"
              f"{detail} → {args.out}")
        print(f"layers with parameters now: {', '.join(kinds)}; evaluate with: pwsconv eval {args.out}")
        return 0

    return run


# ---------------------------------------------------------------------------------------------------------- demo
@subcommand("demo", "the paper's story in about a minute on the bundled digits data: plain / BN / GN / PWS / PWS "
                    "gamma=auto at LR 0.05 and 0.2, BN / PWS / auto at 0.5, BN vs PWS at batch 2")
def _demo_parser(p: argparse.ArgumentParser) -> Handler:
    from .experiments.demo import DEFAULT_OUT

    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT}); an interrupted "
                                                      "demo continues where it stopped")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs per run (default: the demo's; the batch-2 runs get a third of them)")
    p.add_argument("--quick", action="store_true", help="a much smaller demo (a few seconds; for tests)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="per-run progress bars (default: when stderr is a terminal)")

    def run(args: argparse.Namespace) -> int:
        from .experiments.demo import run_demo

        if args.epochs is not None and args.epochs < 1:
            raise UsageError(f"--epochs must be ≥ 1, got {args.epochs}")
        progress = sys.stderr.isatty() if args.progress is None else args.progress
        run_demo(args.out, epochs=args.epochs, quick=args.quick, progress=progress)
        return 0

    return run


# --------------------------------------------------------------------------------------------------- probe, reproduce
@subcommand("probe", "the paper's Figure 1 experiment: variance-transmission diagnostics of none / bn / pws at a large LR")
def _probe_parser(p: argparse.ArgumentParser) -> Handler:
    from .experiments.probe import configure_probe_parser

    return configure_probe_parser(p)


@subcommand("reproduce", "re-run a table of the paper (table4, table1, table2, collapse, robust; GPU tables with the "
                         "detection extra) with a CPU or full preset")
def configure_reproduce_parser(p: argparse.ArgumentParser) -> Handler:
    """Add ``NAME [--preset cpu|full|smoke] [--full] [--out DIR] [--seeds N] [--data-root DIR] [--dry-run]
    [--progress] [--weights FILE]`` to ``p`` and return the handler (``pwsconv reproduce``)."""
    from .experiments.paper import EXPERIMENTS

    p.description = ("Re-run one of the paper's experiments as a resumable sweep and write results.md (paper numbers "
                     "beside measured mean ± std), results.csv/jsonl and PNG plots. Presets: cpu (about an hour on 2 "
                     "cores, small models, CIFAR-10 subset), full (the paper's settings), smoke (seconds: digits, or "
                     "a small synthetic VOC/COCO/ImageNet set for the detection and ImageNet tables).")
    p.add_argument("name", metavar="NAME", help=f"one of {', '.join(EXPERIMENTS)}, or (GPU tables, the detection "
                                                "extra) voc_table1, voc_table2, coco_table3, imagenet_table5")
    p.add_argument("--preset", default=None, help="cpu (default; smoke for the detection and ImageNet "
                                                  "tables), full or smoke; robust also has medium (CPU, longer) and "
                                                  "gpu (one GPU, all of CIFAR-10; use --jobs)")
    p.add_argument("--full", action="store_true", help="same as --preset full")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output directory (default results/reproduce/NAME_PRESET; finished runs there are skipped)")
    p.add_argument("--seeds", type=int, default=None, metavar="N", help="number of seeds (default: the preset's)")
    p.add_argument("--data-root", default=None, metavar="DIR", help="dataset directory")
    p.add_argument("--dry-run", action="store_true", help="list the runs and a time estimate; train nothing")
    p.add_argument("--report", action="store_true",
                   help="write the tables and plots from the runs already finished in --out; train nothing (a "
                        "sweep in progress, or one stopped by a time limit)")
    p.add_argument("--progress", action="store_true", help="per-run progress bars")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="train N runs at a time, each in its own process (several runs share one GPU)")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="train only shard I of N (0 ≤ I < N) of the runs, e.g. from a SLURM array job "
                        "(--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT) on a shared --out directory; the "
                        "last shard to finish writes the tables")
    p.add_argument("--compile", action="store_true", help="train every run under torch.compile")
    p.add_argument("--measure", action=argparse.BooleanOptionalAction, default=None,
                   help="--dry-run of a full preset: estimate from the training throughput measured here (default: "
                        "only on a GPU; on a CPU it takes minutes)")
    # detection / ImageNet tables (pwsconv.experiments.detection): voc_table1, voc_table2, coco_table3, imagenet_table5
    p.add_argument("--weights", default=None, metavar="FILE",
                   help="coco_table3: an ImageNet ResNet-50 state_dict for Mask R-CNN's backbone")
    return _cmd_reproduce


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from .experiments.detection import EXTRA_EXPERIMENTS, reproduce_extra   # the GPU tables: their own module
    from .experiments.paper import ReproduceError, reproduce

    preset = args.preset
    if args.full:
        if preset not in (None, "full"):
            raise ReproduceError(f"--full contradicts --preset {preset}")
        preset = "full"
    from .experiments.sweep import parse_shard

    if args.jobs < 1:
        raise ReproduceError(f"--jobs must be ≥ 1, got {args.jobs}")
    shard = parse_shard(args.shard) if args.shard is not None else None
    if args.name in EXTRA_EXPERIMENTS:
        if args.jobs != 1 or shard is not None or args.compile or args.report:
            raise ReproduceError(f"--jobs, --shard, --compile and --report are for the classification tables, not "
                                 f"{args.name}")
        if args.seeds not in (None, 1):
            raise ReproduceError(f"{args.name} runs one seed per cell (as the paper); drop --seeds")
        reproduce_extra(args.name, preset or "smoke", out_dir=args.out, data_root=args.data_root,
                        weights=args.weights, dry_run=args.dry_run, progress=True)
        return 0
    if args.weights is not None:
        raise ReproduceError("--weights is for coco_table3 only")
    reproduce(args.name, preset or "cpu", out_dir=args.out, seeds=args.seeds, data_root=args.data_root,
              progress=args.progress, dry_run=args.dry_run, jobs=args.jobs, shard=shard, compile=args.compile,
              measure=args.measure, report=args.report)
    return 0


# ---------------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="pwsconv", description="Parametric Weights Standardization (PWS): train, evaluate, fold, "
                                                 "and reproduce the paper's experiments.")
    parser.add_argument("--version", action="version", version=f"pwsconv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, help, fn in _SUBCOMMANDS:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(func=fn(sp))
    return parser


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg


def _interrupted(e: BaseException) -> bool:
    """Whether ``e`` is a Ctrl-C, or an error raised while a Ctrl-C was being handled (e.g. by clean-up code that
    touches a module the interrupt left half-imported)."""
    seen: set[int] = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        if isinstance(x, KeyboardInterrupt):
            return True
        seen.add(id(x))
        x = x.__cause__ or x.__context__
    return False


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pwsconv`` console script; returns the exit code (2 for bad input, 130 for Ctrl-C).

    Everything, from the first import of torch (building the parser imports the experiment modules) to the end of
    the command, runs under the Ctrl-C handler: an interrupt is always one line on stderr and exit code 130."""
    command = "train"
    try:
        command = next((a for a in (sys.argv[1:] if argv is None else argv) if not str(a).startswith("-")), "")
        return _main(argv)
    except BaseException as e:
        if not _interrupted(e) or os.environ.get("PWSCONV_DEBUG", "") not in ("", "0") and \
                not isinstance(e, KeyboardInterrupt):
            raise
        name = f"pwsconv {command}" if command in {s[0] for s in _SUBCOMMANDS} else "pwsconv"
        hint = {"train": "; the run continues from its last checkpoint with the same command plus --resume",
                "demo": "; run the same command again to continue where it stopped",
                "reproduce": "; run the same command again to continue where it stopped"}.get(command, "")
        print(f"{name}: interrupted{hint}", file=sys.stderr)
        return 130


def _main(argv: Sequence[str] | None) -> int:
    from .config import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    debug = os.environ.get("PWSCONV_DEBUG", "") not in ("", "0")
    try:
        import yaml

        yaml_errors: tuple[type[BaseException], ...] = (yaml.YAMLError,)
    except ImportError:  # pragma: no cover
        yaml_errors = ()
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, ConfigError, *yaml_errors) as e:  # bad input: one line, exit 2
        if debug or _interrupted(e):
            raise
        print(f"pwsconv {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # python -m pwsconv.cli
    sys.exit(main())
