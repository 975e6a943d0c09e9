"""A run's identity on disk: the model spec (what rebuilds the network without the data) and the comparison of a
run directory's saved configs with the one asked for (resume and re-run checks)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from torch import nn

from ..config import ConfigError, TrainConfig
from .result import RunDirError
from .rundir import is_run_file

__all__ = ["model_spec", "build_from_spec", "ConfigMismatchError", "check_saved_run", "roles_of"]

def model_spec(cfg: TrainConfig, bundle: Any) -> dict[str, Any]:
    """Everything needed to rebuild the network (and its input normalization) without the training data."""
    return {
        "model": cfg.model, "method": cfg.method, "method_opts": dict(cfg.method_opts),
        "model_opts": dict(cfg.model_opts),
        "num_classes": int(bundle.num_classes), "in_channels": int(bundle.in_channels),
        "image_size": _plain(bundle.image_size), "mean": [float(v) for v in bundle.mean],
        "std": [float(v) for v in bundle.std], "dataset": cfg.dataset, "folded": False,
    }


def _plain(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [int(x) for x in v]
    return int(v) if v is not None else None


def build_from_spec(spec: Mapping[str, Any]) -> nn.Module:
    """The network of a :func:`model_spec` (folded to plain layers when ``spec["folded"]``), in eval mode."""
    from ..folding import fold
    from ..models import build_model

    model = build_model(spec["model"], spec["method"], num_classes=spec["num_classes"],
                        in_channels=spec["in_channels"], **dict(spec.get("model_opts") or {}),
                        method_opts=dict(spec.get("method_opts") or {}))
    if spec.get("folded"):
        model = fold(model.eval())
    return model.eval()


def _as_config(config: TrainConfig | Mapping[str, Any] | str | os.PathLike) -> TrainConfig:
    if isinstance(config, TrainConfig):
        return TrainConfig.from_dict(config.to_dict())
    if isinstance(config, Mapping):
        return TrainConfig.from_dict(config)
    from ..config import load_config

    return load_config(config)


def _nonempty_dir(path: str) -> bool:
    return os.path.isdir(path) and any(is_run_file(e.name) for e in os.scandir(path))


def roles_of(cls: type, *roles: str) -> frozenset[str]:
    """The fields of the config class ``cls`` (:class:`TrainConfig` or a subclass) whose role is one of ``roles``
    (:data:`pwsconv.config.FIELD_ROLES`)."""
    return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("role") in roles)


def _normalized(cfg: Mapping[str, Any], cls: type = TrainConfig) -> dict[str, Any]:
    """A saved config as the current code reads it: missing keys (fields added since) get their defaults."""
    try:
        return cls.from_dict(cfg, validate=False).to_dict()
    except (ConfigError, TypeError, ValueError):   # a key of another version: compare what is there
        return {**cls().to_dict(), **dict(cfg)}


def _config_diff(old: Mapping[str, Any], new: Mapping[str, Any], ignore: frozenset[str] | set[str] | None = None,
                 cls: type = TrainConfig) -> list[str]:
    """"key old → new" for every field of ``cls`` that differs (``ignore``: default the length and cosmetic ones,
    which a resumed run may change)."""
    ignore = roles_of(cls, "length", "cosmetic") if ignore is None else ignore
    old, new = _normalized(old, cls), _normalized(new, cls)
    out = []
    for k in sorted(set(old) | set(new)):
        if k in ignore:
            continue
        if old.get(k) != new.get(k):
            out.append(f"{k} {old.get(k)!r} → {new.get(k)!r}")
    return out


#: Fields that leave a run the same run (a finished run with other values here is still the one asked for).
_COSMETIC_FIELDS = roles_of(TrainConfig, "cosmetic")


class ConfigMismatchError(ConfigError):
    """``resume`` into a directory holding a run made with other settings (``diff``: "key old → new" items)."""

    def __init__(self, message: str, diff: list[str]) -> None:
        super().__init__(message)
        self.diff = diff


def _saved_configs(paths: Mapping[str, str]) -> list[tuple[str, dict[str, Any], dict[str, Any] | None]]:
    """(file name, config, result or None) for config.yaml and result.json where they exist and can be read.
    A file that exists but cannot be read is a one-line error (it is not silently replaced)."""
    import json

    import yaml

    out: list[tuple[str, dict[str, Any], dict[str, Any] | None]] = []
    if os.path.isfile(paths["config"]):
        try:
            with open(paths["config"], encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise RunDirError(f"cannot resume: {paths['config']} cannot be read ({type(e).__name__}); it holds the "
                              "settings of the run there, so nothing was changed") from None
        if not isinstance(data, dict):
            raise RunDirError(f"cannot resume: {paths['config']} is not a config mapping; nothing was changed")
        out.append(("config.yaml", data, None))
    if os.path.isfile(paths["result"]):
        try:
            with open(paths["result"], encoding="utf-8") as f:
                res = json.load(f)
        except (OSError, UnicodeDecodeError, ValueError):
            res = None    # a result is rebuilt from the metrics; config.yaml still tells the settings
        if isinstance(res, dict) and isinstance(res.get("config"), dict):
            out.append(("result.json", res["config"], res))
    return out


def check_saved_run(paths: Mapping[str, str], cfg: TrainConfig, ckpt: dict[str, Any] | None) -> dict[str, Any] | None:
    """Whether ``resume`` may continue in a run directory: its checkpoint (``ckpt``, if any), config.yaml and
    result.json must hold a run with ``cfg``'s settings (fields of the config's class; length and cosmetic fields
    may differ), else a :class:`ConfigMismatchError` / :class:`RunDirError` — before anything is written. Returns the
    saved result.json of a finished run without a checkpoint (the same run: it is returned as it is), else None."""
    cls, new, out_dir = type(cfg), cfg.to_dict(), cfg.out_dir
    if ckpt is not None:
        diff = _config_diff(ckpt["config"], new, cls=cls)
        if diff:
            raise ConfigMismatchError(f"cannot resume {out_dir}: the config differs from the checkpoint's in "
                                      + "; ".join(diff), diff)
    saved = _saved_configs(paths)
    for fname, old, _ in saved:
        diff = _config_diff(old, new, cls=cls)
        if diff:
            raise ConfigMismatchError(f"cannot resume {out_dir}: it holds a run with other settings (its {fname} "
                                      "differs in " + "; ".join(diff) + "); nothing was changed — choose another "
                                      "out_dir", diff)
    if ckpt is not None:
        return None
    finished = [(f, old, r) for f, old, r in saved if r is not None and r.get("status") in ("ok", "nan")]
    if finished:
        fname, old, res = finished[0]
        diff = _config_diff(old, new, roles_of(cls, "cosmetic"), cls=cls)
        if diff:
            raise ConfigMismatchError(f"cannot resume {out_dir}: its run finished and has no checkpoint.pt to continue "
                                      "from (" + "; ".join(diff) + "); nothing was changed — choose another out_dir",
                                      diff)
        return res
    if not saved and any(os.path.isfile(paths[k]) for k in ("metrics_csv", "metrics_jsonl")):
        raise RunDirError(f"cannot resume {out_dir}: it holds metrics of a run whose settings are unknown (no "
                          "checkpoint.pt, config.yaml or result.json); nothing was changed — choose another out_dir")
    return None
