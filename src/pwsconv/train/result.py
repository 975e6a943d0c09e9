"""What a run produced (:class:`RunResult`, its ``result.json``) and the errors of a run directory."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

__all__ = ["RunResult", "RunDirError", "FINAL_METRICS"]

FINAL_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "images_per_s")
NAN = float("nan")


class RunDirError(ValueError):
    """The output directory cannot be used (it holds another run and ``resume`` was not asked for)."""


@dataclass
class RunResult:
    """What a run produced: ``status`` ("ok" or "nan" = collapsed), final ``metrics`` (NaN where missing or collapsed),
    progress counters, and the paths of its files."""

    status: str
    metrics: dict[str, float]
    epoch: float
    step: int
    wall_time: float
    out_dir: str
    config: dict[str, Any]
    paths: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.config.get("name") or os.path.basename(os.path.normpath(self.out_dir))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunResult":
        metrics = {k: (NAN if v is None else float(v)) for k, v in dict(d.get("metrics", {})).items()}
        return cls(status=d["status"], metrics=metrics, epoch=float(d.get("epoch", 0)), step=int(d.get("step", 0)),
                   wall_time=float(d.get("wall_time") or 0.0), out_dir=d.get("out_dir", ""),
                   config=dict(d.get("config", {})), paths=dict(d.get("paths", {})))

    @classmethod
    def load(cls, out_dir: str | os.PathLike) -> "RunResult":
        import json

        with open(os.path.join(out_dir, "result.json"), encoding="utf-8") as f:
            return cls.from_dict(json.load(f))
