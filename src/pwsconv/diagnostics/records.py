"""The tidy record table of the probe (step × layer × statistic) and its CSV / JSON-lines files.

A record is a dict ``{"step": int, "layer": str, "layer_index": int, "kind": str, "stat": str, "value": float}``
(``kind`` is the layer's class name, ``"model"`` for model-level values such as the loss, whose ``layer_index`` is
−1); :func:`pwsconv.diagnostics.run_probe_experiment` adds ``"method"``. Non-finite values are stored as NaN, written
as ``nan`` in CSV and ``null`` in JSON lines, and read back as NaN.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict
from typing import Any, Iterable, Mapping, Sequence

__all__ = [
    "Record",
    "BASE_COLUMNS",
    "write_csv",
    "read_csv",
    "write_jsonl",
    "read_jsonl",
    "summarize",
    "select",
    "layer_profile",
    "step_series",
    "as_records",
    "group_by",
]

Record = dict[str, Any]
BASE_COLUMNS = ("step", "layer", "layer_index", "kind", "stat", "value")
_INT_COLS = ("step", "layer_index")


def as_records(obj: Any) -> list[Record]:
    """A list of records from a list of records or from anything with a ``records`` attribute (a probe)."""
    recs = getattr(obj, "records", obj)
    return list(recs)


def _columns(records: Sequence[Record]) -> list[str]:
    extra: list[str] = []
    for r in records:
        for k in r:
            if k not in BASE_COLUMNS and k not in extra:
                extra.append(k)
    return extra + list(BASE_COLUMNS)


def write_csv(records: Iterable[Record] | Any, path: str | os.PathLike) -> str | os.PathLike:
    """Write records as CSV with a header; extra keys (e.g. ``method``) come first. Returns ``path``."""
    recs = as_records(records)
    cols = _columns(recs)
    d = os.path.dirname(os.fspath(path))
    if d:
        os.makedirs(d, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in recs:
            row = dict(r)
            v = row.get("value")
            if isinstance(v, float):
                row["value"] = "nan" if v != v else repr(v)
            w.writerow(row)
    return path


def read_csv(path: str | os.PathLike) -> list[Record]:
    """Read a file written by :func:`write_csv` (step / layer_index as int, value as float)."""
    out: list[Record] = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            r: Record = dict(row)
            for k in _INT_COLS:
                if k in r and r[k] not in ("", None):
                    r[k] = int(r[k])
            r["value"] = float(r["value"]) if r.get("value") not in ("", None) else float("nan")
            out.append(r)
    return out


def write_jsonl(records: Iterable[Record] | Any, path: str | os.PathLike) -> str | os.PathLike:
    """Write one JSON object per record (NaN as ``null``: strict JSON). Returns ``path``."""
    d = os.path.dirname(os.fspath(path))
    if d:
        os.makedirs(d, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in as_records(records):
            row = dict(r)
            v = row.get("value")
            if isinstance(v, float) and not math.isfinite(v):
                row["value"] = None
            f.write(json.dumps(row, allow_nan=False) + "\n")
    return path


def read_jsonl(path: str | os.PathLike) -> list[Record]:
    """Read a file written by :func:`write_jsonl` (``null`` values back to NaN)."""
    out: list[Record] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                r["value"] = float("nan") if r.get("value") is None else float(r["value"])
                out.append(r)
    return out


def select(records: Iterable[Record], stat: str | None = None, layer: str | int | None = None,
           step: int | None = None) -> list[Record]:
    """The records with the given stat / layer (name, or ``layer_index`` as int) / step."""
    out = []
    for r in records:
        if stat is not None and r["stat"] != stat:
            continue
        if layer is not None and (r["layer_index"] != layer if isinstance(layer, int) else r["layer"] != layer):
            continue
        if step is not None and r["step"] != step:
            continue
        out.append(r)
    return out


def _nanagg(values: list[float], agg: str) -> float:
    vals = [v for v in values if v == v]
    if not vals:
        return float("nan")
    if agg == "mean":
        return sum(vals) / len(vals)
    if agg == "min":
        return min(vals)
    if agg == "max":
        return max(vals)
    if agg == "median":
        s = sorted(vals)
        k = len(s) // 2
        return s[k] if len(s) % 2 else 0.5 * (s[k - 1] + s[k])
    if agg == "last":
        return vals[-1]
    if agg == "first":
        return vals[0]
    raise ValueError(f"unknown agg {agg!r}")


def layer_profile(records: Iterable[Record], stat: str, agg: str = "mean", step: int | None = None,
                  fallback: str | None = None) -> tuple[list[int], list[str], list[float]]:
    """The value of ``stat`` per layer (x axis of Figures 1 and 6): layer indices, names and values aggregated over
    the recorded steps with ``agg`` (mean / median / min / max / first / last, NaN ignored) or taken at ``step``.
    Layers without ``stat`` use ``fallback`` (e.g. ``"shift"`` for ``"eff.shift"`` on plain layers)."""
    by_layer: dict[int, list[float]] = defaultdict(list)
    fb: dict[int, list[float]] = defaultdict(list)
    names: dict[int, str] = {}
    for r in records:
        if r["layer_index"] < 0 or (step is not None and r["step"] != step):
            continue
        if r["stat"] == stat:
            by_layer[r["layer_index"]].append(r["value"])
            names.setdefault(r["layer_index"], r["layer"])
        elif fallback is not None and r["stat"] == fallback:
            fb[r["layer_index"]].append(r["value"])
            names.setdefault(r["layer_index"], r["layer"])
    idx = sorted(set(by_layer) | set(fb))
    vals = [_nanagg(by_layer[i] if by_layer.get(i) else fb.get(i, []), agg) for i in idx]
    return idx, [names[i] for i in idx], vals


def step_series(records: Iterable[Record], stat: str, layer: str | int | None = None) -> tuple[list[int], list[float]]:
    """(steps, values) of ``stat`` for one layer (name or index; ``None``: the model-level value), Figure 2's x axis."""
    pts: dict[int, float] = {}
    for r in records:
        if r["stat"] != stat:
            continue
        if layer is None:
            if r["layer_index"] != -1:
                continue
        elif r["layer_index"] != layer if isinstance(layer, int) else r["layer"] != layer:
            continue
        pts[r["step"]] = r["value"]
    steps = sorted(pts)
    return steps, [pts[s] for s in steps]


def summarize(records: Iterable[Record]) -> dict[str, dict[str, Any]]:
    """Per layer (in layer_index order, model-level values first): ``layer_index``, ``kind``, ``steps`` (number of
    recorded steps) and, for every statistic, its mean over the recorded steps (NaN values ignored; NaN if none)."""
    acc: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    meta: dict[str, dict[str, Any]] = {}
    steps: dict[str, set[int]] = defaultdict(set)
    for r in records:
        acc[r["layer"]][r["stat"]].append(r["value"])
        meta.setdefault(r["layer"], {"layer_index": r["layer_index"], "kind": r["kind"]})
        steps[r["layer"]].add(r["step"])
    out: dict[str, dict[str, Any]] = {}
    for layer in sorted(acc, key=lambda n: meta[n]["layer_index"]):
        d: dict[str, Any] = dict(meta[layer])
        d["steps"] = len(steps[layer])
        for stat, vals in acc[layer].items():
            d[stat] = _nanagg(vals, "mean")
        out[layer] = d
    return out


def group_by(records: Iterable[Record], key: str) -> Mapping[Any, list[Record]]:
    """Split records by the value of ``key`` (e.g. ``"method"``)."""
    out: dict[Any, list[Record]] = defaultdict(list)
    for r in records:
        out[r.get(key)].append(r)
    return dict(out)
