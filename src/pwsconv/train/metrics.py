"""Per-epoch metrics of a run, as ``metrics.csv`` and ``metrics.jsonl`` (and TensorBoard scalars when asked).

One row per epoch end (plus one for a run stopped by ``max_steps`` mid-epoch, and one for a collapse). ``epoch`` is the
number of epochs done (fractional for a mid-epoch row). Missing values (no validation split) are empty in the CSV and
``null`` in JSON; a collapsed run's metrics are ``nan`` in the CSV and ``null`` in JSON, with ``status: "nan"``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from typing import Any

from .checkpoint import WriteError, _reason, atomic_write_text, dumps

__all__ = ["COLUMNS", "MetricsLog", "read_metrics"]

COLUMNS = ("epoch", "step", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc",
           "images_per_s", "epoch_time", "wall_time", "status")


def _csv_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else repr(v)
    return str(v)


def _csv_text(rows: list[dict[str, Any]], header: bool, columns: tuple[str, ...] = COLUMNS) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if header:
        w.writerow(columns)
    for r in rows:
        w.writerow([_csv_cell(r.get(c)) for c in columns])
    return buf.getvalue()


def read_metrics(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of ``out_dir/metrics.jsonl`` (``null`` metrics come back as NaN); a torn last line is ignored."""
    path = os.path.join(out_dir, "metrics.jsonl")
    rows: list[dict[str, Any]] = []
    if not os.path.exists(path):
        return rows
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                break  # a line cut by a crash: everything after it is suspect
            for k in COLUMNS:
                if k not in ("epoch", "step", "status") and r.get(k) is None and k in r:
                    r[k] = float("nan")
            rows.append(r)
    return rows


def _append(path: str, data: bytes, size: int) -> None:
    """Append ``data`` durably; if that fails, cut the file back to ``size`` bytes (no torn line) and re-raise."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        except OSError:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            raise
    finally:
        os.close(fd)


class MetricsLog:
    """Append-only metrics files; on resume, rows written after the checkpoint's step are dropped (they are redone).

    ``columns``: the CSV's columns (default :data:`COLUMNS`, a classifier's; the detection loop passes its own); the
    JSONL rows hold every key of a row."""

    def __init__(self, out_dir: str, *, enabled: bool = True, resume_step: int | None = None,
                 tensorboard: bool = False, columns: tuple[str, ...] = COLUMNS) -> None:
        self.out_dir = out_dir
        self.enabled = enabled
        self.columns = tuple(columns)
        self.csv_path = os.path.join(out_dir, "metrics.csv")
        self.jsonl_path = os.path.join(out_dir, "metrics.jsonl")
        self.tb = None
        self.rows: list[dict[str, Any]] = []
        if not enabled:
            return
        keep = [r for r in read_metrics(out_dir) if resume_step is not None and r.get("step", 0) <= resume_step]
        atomic_write_text(_csv_text(keep, header=True, columns=self.columns), self.csv_path)
        atomic_write_text("".join(dumps(r) + "\n" for r in keep), self.jsonl_path)
        self.rows = keep
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
            except Exception:  # ImportError, or a broken tensorboard install
                warnings.warn("tensorboard: true, but tensorboard is not installed; writing CSV/JSONL only",
                              stacklevel=2)
            else:
                self.tb = SummaryWriter(os.path.join(out_dir, "tb"), purge_step=resume_step)

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        # both files get the row or neither does: a failed append (a full disk) is cut back to the previous rows
        lines = ((self.csv_path, _csv_text([row], header=False, columns=self.columns)),
                 (self.jsonl_path, dumps(row) + "\n"))
        sizes = [os.path.getsize(p) if os.path.exists(p) else 0 for p, _ in lines]
        done: list[int] = []
        for i, (path, text) in enumerate(lines):
            try:
                _append(path, text.encode("utf-8"), sizes[i])
            except OSError as e:
                for j in done:
                    try:
                        os.truncate(lines[j][0], sizes[j])
                    except OSError:
                        pass
                reason, err = _reason(e, self.out_dir)
                raise WriteError(path, reason, err) from None
            done.append(i)
        self.rows.append(dict(row))
        if self.tb is not None:
            for k in self.columns:
                v = row.get(k)
                if k not in ("epoch", "step", "status") and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(k, v, row["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
