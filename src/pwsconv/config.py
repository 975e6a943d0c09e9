"""Typed run configuration: YAML files and ``key=value`` overrides mapped onto :class:`TrainConfig`.

    cfg = load_config("cfg.yaml", overrides=["lr=0.1", "method_opts.gamma=1e-4"])   # validated
    cfg.to_dict()                                                                    # plain dict (YAML/JSON/checkpoint)

Every problem is a :class:`ConfigError` (a ``ValueError``) with a one-line message: unknown key (with a suggestion),
wrong type, out-of-range value, unknown model/method/dataset name, malformed YAML.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

__all__ = ["ConfigError", "TrainConfig", "load_config", "load_yaml", "apply_overrides", "parse_value",
           "check_method_opts", "fields_with", "prepare_options", "FIELD_ROLES", "FIELD_GROUPS",
           "RESUME_MUTABLE_FIELDS", "SEED_LIMIT"]


class ConfigError(ValueError):
    """A bad configuration: the message is one line and names the offending key."""


#: What a config field is to a run, declared once per field (``TrainConfig``'s field metadata "role"):
#:  - "identity": what the run computes — another value makes another run;
#:  - "length": how long it goes on — a checkpoint continues with another value, a finished run is another run;
#:  - "cosmetic": how, where and how verbosely it computes, not what (device, threads, fused standardization, data and
#:    output paths, logging) — a run with another value is the same run.
FIELD_ROLES = ("identity", "length", "cosmetic")


#: The groups of ``pwsconv train --help``, in order; each field declares its own (metadata "group").
FIELD_GROUPS = ("what to train", "optimization", "speed and reproducibility", "outputs")
_TRAIN, _OPT, _SPEED, _OUT = FIELD_GROUPS


def _identity(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, group: str, help: str) -> Any:
    return field(default=default, default_factory=factory, metadata={"role": "identity", "group": group, "help": help})


def _length(default: Any, *, group: str, help: str) -> Any:
    return field(default=default, metadata={"role": "length", "group": group, "help": help})


def _cosmetic(default: Any, *, prepare: str | None = None, group: str, help: str) -> Any:
    """A field that does not change what a run computes; ``prepare``: the keyword of
    :func:`pwsconv.methods.prepare_for_training` it is passed as (see :func:`prepare_options`)."""
    return field(default=default, metadata={"role": "cosmetic", "group": group, "help": help,
                                            **({"prepare": prepare} if prepare else {})})


@dataclass
class TrainConfig:
    """One training run. Field names are the YAML keys and the ``--set`` keys; each field's role (identity, length,
    cosmetic: :data:`FIELD_ROLES`) says whether another value makes another run (:func:`fields_with`).

    The defaults follow the paper's CIFAR setting where one applies (SGD momentum 0.9, weight decay 5e-4, multi-step
    LR ×0.1); the data/model defaults are the offline digits set and the small ``tiny_cnn``.
    """

    # Each field's one-line description (metadata "help") and group are what `pwsconv train --help` shows.
    model: str = _identity("tiny_cnn", group=_TRAIN, help="the network: a zoo name (pwsconv.models), torchvision:NAME, "
                           "timm:NAME or module.path:callable")
    method: str = _identity("pws", group=_TRAIN, help="the normalization method: none, bn, gn, in, ln, pws, sn, wn, "
                            "ws, sws, mabn")
    method_opts: dict[str, Any] = _identity(factory=dict, group=_TRAIN,
                                            help="the method's options, e.g. gamma=1e-3 for pws, groups=8 for gn")
    model_opts: dict[str, Any] = _identity(factory=dict, group=_TRAIN,
                                           help="the model builder's options, e.g. width=0.5")
    dataset: str = _identity("digits", group=_TRAIN, help="digits (bundled), mnist, fashion_mnist, cifar10, npz, "
                             "imagefolder, imagenet")
    data_root: str | None = _cosmetic(None, group=_TRAIN, help="where the data set's files are (default: "
                                      "$PWSCONV_DATA or the usual places)")
    val_fraction: float = _identity(0.0, group=_TRAIN, help="hold out this fraction of the training images as a "
                                    "validation split")
    limit: int | None = _identity(None, group=_TRAIN, help="train on at most this many images (default: all)")
    test_limit: int | None = _identity(None, group=_TRAIN,
                                       help="evaluate on at most this many test images (default: all)")
    augment: bool = _identity(True, group=_TRAIN, help="the data set's standard augmentation (CIFAR: pad 4, random "
                              "crop, flip), if it has one")
    epochs: int = _length(10, group=_OPT, help="training epochs")
    max_steps: int | None = _length(None, group=_OPT, help="stop after this many optimizer steps, whatever "
                                 "the epoch (default: no limit)")
    batch_size: int = _identity(128, group=_OPT, help="the global batch size (split evenly across DDP processes)")
    eval_batch_size: int = _identity(500, group=_OPT, help="the batch size of evaluation")
    drop_last: bool = _identity(True, group=_OPT, help="drop the last incomplete training batch of an epoch")
    lr: float = _identity(0.1, group=_OPT, help="the SGD learning rate")
    momentum: float = _identity(0.9, group=_OPT, help="SGD momentum")
    nesterov: bool = _identity(False, group=_OPT, help="Nesterov momentum")
    weight_decay: float = _identity(5e-4, group=_OPT, help="L2 weight decay (α of PWS layers always gets 0)")
    milestones: list[int] = _identity(factory=list, group=_OPT,
                                      help="epochs at which the LR is multiplied by lr_decay, e.g. 100 150")
    lr_decay: float = _identity(0.1, group=_OPT, help="the LR factor at each milestone")
    seed: int = _identity(0, group=_SPEED, help="the random seed (initialization, data order, augmentation)")
    deterministic: bool = _identity(False, group=_SPEED, help="deterministic algorithms only "
                                    "(torch.use_deterministic_algorithms, deterministic cuDNN)")
    amp: str | None = _identity(None, group=_SPEED, help="mixed precision: bf16 or fp16 (fp16 uses a "
                                "GradScaler; default: null, i.e. float32)")
    channels_last: bool = _identity(False, group=_SPEED, help="the channels_last memory format for the model and "
                                    "the batches")
    fuse_pws: bool = _cosmetic(True, prepare="fuse", group=_SPEED, help="standardize all PWS layers in one autograd "
                               "node per step (same values, faster)")
    pws_recompute: bool = _cosmetic(False, prepare="recompute", group=_SPEED, help="with fuse_pws: rebuild α·Ŵ in "
                                    "backward instead of keeping it (less memory)")
    data_on_device: bool | None = _cosmetic(None, group=_SPEED, help="hold in-memory data sets on the GPU: true "
                                            "or false (default: null, i.e. on CUDA when they fit)")
    compile: bool = _cosmetic(False, group=_SPEED, help="torch.compile the model (same values; compiles at the start)")
    device: str = _cosmetic("auto", group=_SPEED, help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    num_threads: int | None = _cosmetic(None, group=_SPEED, help="CPU threads for this run (torch.set_num_threads, "
                                        "restored afterwards; default: torch's)")
    num_workers: int | None = _cosmetic(None, group=_SPEED, help="streamed data (imagenet): decoding processes per "
                                        "training process (default: up to 8, bounded by the cores)")
    sync_bn: bool = _identity(False, group=_SPEED, help="multi-process runs: BatchNorm → SyncBatchNorm (PWS and GN "
                              "need none)")
    out_dir: str = _cosmetic("runs/train", group=_OUT, help="the run directory (config.yaml, metrics, checkpoint.pt, "
                             "result.json)")
    name: str | None = _cosmetic(None, group=_OUT, help="a label for tables (default: the out_dir's name)")
    ckpt_every: int = _cosmetic(200, group=_OUT, help="also checkpoint every this many steps (0: only at epoch ends)")
    log_every: int = _cosmetic(10, group=_OUT, help="progress-bar refresh and collapse check, in steps")
    progress: bool = _cosmetic(True, group=_OUT, help="per-epoch lines, and a progress bar when stderr is a terminal")
    tensorboard: bool = _cosmetic(False, group=_OUT, help="TensorBoard events in out_dir/tb (if tensorboard is "
                                  "installed)")

    # ------------------------------------------------------------------ conversion
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["method_opts"] = dict(self.method_opts)
        d["model_opts"] = dict(self.model_opts)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, validate: bool = True) -> "TrainConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(f"a config must be a mapping of keys to values, got {type(data).__name__}")
        cfg = cls()
        for key, value in data.items():
            _set_field(cfg, str(key), value)
        if validate:
            cfg.validate()
        return cfg

    def replace(self, **changes: Any) -> "TrainConfig":
        """A validated copy with some fields changed."""
        d = self.to_dict()
        d.update(changes)
        return TrainConfig.from_dict(d)

    # ------------------------------------------------------------------ validation
    def validate(self, *, check_names: bool = True) -> "TrainConfig":
        """Check ranges and (with ``check_names``) that model, method and dataset exist; returns ``self``."""

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(math.isfinite(self.lr) and self.lr > 0, f"lr must be a finite number > 0, got {self.lr!r}")
        need(self.lr <= FLOAT32_MAX, f"lr must be at most {FLOAT32_MAX:.4g} (beyond the float32 range of the "
                                     f"weights SGD cannot apply it), got {self.lr!r}")
        need(self.batch_size >= 1, f"batch_size must be ≥ 1, got {self.batch_size}")
        need(self.eval_batch_size >= 1, f"eval_batch_size must be ≥ 1, got {self.eval_batch_size}")
        need(self.epochs >= 1, f"epochs must be ≥ 1, got {self.epochs}")
        need(self.max_steps is None or self.max_steps >= 1, f"max_steps must be ≥ 1 or null, got {self.max_steps}")
        need(math.isfinite(self.momentum) and 0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        need(math.isfinite(self.weight_decay) and self.weight_decay >= 0,
             f"weight_decay must be a finite number ≥ 0, got {self.weight_decay}")
        need(self.weight_decay <= FLOAT32_MAX, f"weight_decay must be at most {FLOAT32_MAX:.4g} (beyond the float32 "
                                               f"range of the weights SGD cannot apply it), got {self.weight_decay!r}")
        need(math.isfinite(self.lr_decay) and 0 < self.lr_decay <= 1, f"lr_decay must be in (0, 1], got {self.lr_decay}")
        need(all(m >= 1 for m in self.milestones) and list(self.milestones) == sorted(set(self.milestones)),
             f"milestones must be strictly increasing epochs ≥ 1, got {self.milestones}")
        need(0 <= self.val_fraction < 1, f"val_fraction must be in [0, 1), got {self.val_fraction}")
        need(self.limit is None or self.limit >= 1, f"limit must be ≥ 1 or null, got {self.limit}")
        need(self.test_limit is None or self.test_limit >= 1, f"test_limit must be ≥ 1 or null, got {self.test_limit}")
        need(self.amp in (None, "bf16", "fp16"), f"amp must be null, 'bf16' or 'fp16', got {self.amp!r}")
        need(self.ckpt_every >= 0, f"ckpt_every must be ≥ 0 (0: epoch ends only), got {self.ckpt_every}")
        need(self.num_threads is None or 1 <= self.num_threads <= THREADS_LIMIT,
             f"num_threads must be between 1 and {THREADS_LIMIT} or null, got {self.num_threads}")
        need(self.num_workers is None or self.num_workers >= 0,
             f"num_workers must be ≥ 0 or null, got {self.num_workers}")
        need(self.log_every >= 1, f"log_every must be ≥ 1, got {self.log_every}")
        need(bool(self.out_dir), "out_dir must not be empty")
        need(not (self.nesterov and self.momentum == 0), "nesterov needs momentum > 0")
        need(isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed < SEED_LIMIT,
             f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        if self.device != "auto":
            import torch

            try:
                dev = torch.device(self.device)
            except (RuntimeError, ValueError, TypeError):
                raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}") from None
            need(dev.type in ("cpu", "cuda", "mps", "xpu"),
                 f"device {self.device!r} cannot run pwsconv; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
        if check_names:
            self._check_names()
        return self

    def _check_names(self) -> None:
        from .methods import available_methods

        methods = available_methods()
        if self.method.lower() not in methods:
            raise ConfigError(f"unknown method {self.method!r}{_suggest(self.method, methods)}; choose one of "
                              f"{', '.join(methods)}")
        try:
            from .models import available_models
        except ImportError:  # pragma: no cover - the models package is part of the project
            available_models = None
        external = False
        if available_models is not None:
            from .models.external import check, is_external

            external = is_external(self.model)
            if external:
                try:
                    check(self.model)   # imports the module / looks the architecture up: before any work starts
                except ValueError as e:
                    raise ConfigError(str(e)) from None
        if available_models is not None and not external:
            models = list(available_models())
            if self.model not in models:
                raise ConfigError(f"unknown model {self.model!r}{_suggest(self.model, models)}; "
                                  f"choose one of {', '.join(models)}")
        if available_models is not None:
            from .models import model_info

            check_method_opts(self.method, self.method_opts)
            allowed = set(self.model_opts) if external else model_info(self.model).model_options()
            unknown = sorted(set(self.model_opts) - allowed)   # an external builder's options: its own business
            if unknown:
                raise ConfigError(f"model {self.model!r} takes no option(s) {unknown}; it accepts "
                                  f"{sorted(allowed) or 'none'}")
            if not external:
                _check_model_opts(self.model_opts, model_info(self.model).builder)
        try:
            from .data import available_datasets
        except ImportError:  # pragma: no cover
            available_datasets = None
        if available_datasets is not None:
            sets = list(available_datasets())
            if self.dataset not in sets:
                raise ConfigError(f"unknown dataset {self.dataset!r}{_suggest(self.dataset, sets)}; "
                                  f"choose one of {', '.join(sets)}")

    @property
    def run_name(self) -> str:
        return self.name or os.path.basename(os.path.normpath(self.out_dir))


#: Seeds are integers in [0, SEED_LIMIT) (numpy's seed range; torch's generators take them all).
SEED_LIMIT = 2**32
#: The largest float32: ``lr`` and ``weight_decay`` beyond it cannot multiply float32 weights (torch's SGD refuses).
FLOAT32_MAX = 3.4028234663852886e38
#: The most CPU threads a run may ask for (``torch.set_num_threads`` takes a C int; no machine has more cores).
THREADS_LIMIT = 65536


# ---------------------------------------------------------------------------------------- option type checks
def _check_model_opts(opts: Mapping[str, Any], builder: Any) -> None:
    from .methods._options import OptionValueError, check_kwargs

    try:
        check_kwargs("model_opts", opts, builder)
    except OptionValueError as e:
        raise ConfigError(str(e)) from None


def check_method_opts(method: str, opts: Mapping[str, Any]) -> None:
    """Check a method's options against what the method declares (:meth:`pwsconv.methods.Method.check_options`:
    names, types, ranges); a one-line :class:`ConfigError` naming the option (``method_opts.gamma must be ...``)."""
    from .methods import MethodError, get_method

    try:
        get_method(method).check_options(dict(opts), prefix="method_opts.")
    except MethodError as e:
        raise ConfigError(str(e) if str(e).startswith("method_opts") else f"method_opts: {e}") from None


def prepare_options(cfg: TrainConfig) -> dict[str, Any]:
    """The keywords the engine passes to :func:`pwsconv.methods.prepare_for_training`: the fields that declare one
    (``fuse_pws`` → ``fuse``, ``pws_recompute`` → ``recompute``)."""
    return {f.metadata["prepare"]: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if "prepare" in f.metadata}


def fields_with(*roles: str) -> frozenset[str]:
    """The names of the :class:`TrainConfig` fields whose role is one of ``roles`` (see :data:`FIELD_ROLES`)."""
    unknown = [r for r in roles if r not in FIELD_ROLES]
    if unknown:
        raise ValueError(f"unknown field role(s) {unknown}; the roles are {', '.join(FIELD_ROLES)}")
    return frozenset(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["role"] in roles)


#: Fields that may differ between a checkpoint's config and the config used to resume it (they change how long or how
#: verbosely a run goes on, not what it computes).
RESUME_MUTABLE_FIELDS = fields_with("length", "cosmetic")

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_value(text: str) -> Any:
    """A command-line value: ints, floats (``1e-4`` too), true/false, null, lists ``[100, 150]`` and dicts via YAML."""
    s = text.strip()
    for conv in (int, float):
        try:
            return conv(s)
        except ValueError:
            pass
    import yaml

    try:
        v = safe_load_unique(s) if s else ""
    except yaml.YAMLError:
        return s
    return _fix_floats(v)


_UNIQUE_LOADER: Any = None


def safe_load_unique(stream: Any) -> Any:
    """``yaml.safe_load`` that refuses a mapping with the same key twice (PyYAML keeps the last one silently): a
    ``yaml.YAMLError`` whose problem names the key and the line it was first given on. Merge keys (``<<``) may
    repeat keys, as YAML defines."""
    global _UNIQUE_LOADER
    import yaml

    if _UNIQUE_LOADER is None:
        class _UniqueKeyLoader(yaml.SafeLoader):
            def construct_mapping(self, node: Any, deep: bool = False) -> Any:
                if isinstance(node, yaml.MappingNode):
                    seen: dict[Any, int] = {}
                    for key_node, _ in node.value:
                        if key_node.tag == "tag:yaml.org,2002:merge":
                            continue
                        key = self.construct_object(key_node, deep=True)
                        try:
                            first = seen.get(key)
                        except TypeError:   # an unhashable key: SafeLoader's own error follows
                            continue
                        if first is not None:
                            raise yaml.constructor.ConstructorError(
                                "while constructing a mapping", node.start_mark,
                                f"key {key!r} is given twice (first on line {first + 1}); remove one",
                                key_node.start_mark)
                        seen[key] = key_node.start_mark.line
                return super().construct_mapping(node, deep)

        _UNIQUE_LOADER = _UniqueKeyLoader
    return yaml.load(stream, Loader=_UNIQUE_LOADER)  # noqa: S506 - a SafeLoader subclass


def _fix_floats(v: Any) -> Any:
    # PyYAML (YAML 1.1) reads 1e-4 as a string; numbers written that way are meant as numbers
    if isinstance(v, str):
        try:
            return float(v) if v.strip().lower() not in ("nan", "inf", "-inf", "infinity") else v
        except ValueError:
            return v
    if isinstance(v, list):
        return [_fix_floats(x) for x in v]
    if isinstance(v, dict):
        return {k: _fix_floats(x) for k, x in v.items()}
    return v


def _coerce(key: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)) and type(None) in args:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(key, inner, value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.strip().lower() in ("true", "yes", "on", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        if isinstance(value, str):
            value = parse_value(value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key} must be a number, got {value!r}") from None
        if not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    if origin is list:
        if isinstance(value, str):
            value = parse_value(value) if value.strip() else []
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", args[0], v) for i, v in enumerate(value)]
    if origin is dict:
        if isinstance(value, str):
            value = parse_value(value) if value.strip() else {}
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return {str(k): _fix_floats(v) for k, v in value.items()}
    return value  # pragma: no cover


def _set_field(cfg: TrainConfig, key: str, value: Any) -> None:
    top, _, sub = key.partition(".")
    if top not in _FIELDS:
        raise ConfigError(f"unknown config key {top!r}{_suggest(top, _FIELDS)}")
    if sub:
        if typing.get_origin(_HINTS[top]) is not dict:
            raise ConfigError(f"config key {top!r} has no sub-keys (got {key!r})")
        d = dict(getattr(cfg, top))
        d[sub] = parse_value(value) if isinstance(value, str) else _fix_floats(value)
        setattr(cfg, top, d)
        return
    setattr(cfg, top, _coerce(top, _HINTS[top], value))


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or malformed YAML is a one-line :class:`ConfigError`."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = safe_load_unique(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config path is a directory, not a YAML file: {path}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"malformed YAML in {path}{where}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file is not UTF-8 text: {path}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a YAML mapping of keys to values, got {type(data).__name__}")
    return _fix_floats(data)


def apply_overrides(cfg: TrainConfig | Mapping[str, Any], overrides: Iterable[str] | Mapping[str, Any]) -> TrainConfig:
    """Apply ``["key=value", "method_opts.gamma=1e-4", ...]`` (or a mapping) and validate."""
    cfg = TrainConfig.from_dict(cfg.to_dict() if isinstance(cfg, TrainConfig) else cfg, validate=False)
    items: list[tuple[str, Any]] = []
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    else:
        for item in overrides:
            key, eq, value = str(item).partition("=")
            if not eq or not key.strip():
                raise ConfigError(f"an override must look like key=value, got {item!r}")
            items.append((key.strip(), value))
    for key, value in items:
        _set_field(cfg, key, value)
    return cfg.validate()


def load_config(path: str | os.PathLike | None = None, overrides: Iterable[str] | Mapping[str, Any] = ()) -> TrainConfig:
    """Defaults ← YAML file (if given) ← overrides, validated."""
    base = load_yaml(path) if path is not None else {}
    cfg = TrainConfig.from_dict(base, validate=False)
    return apply_overrides(cfg, overrides)
