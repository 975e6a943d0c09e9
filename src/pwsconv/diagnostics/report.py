"""The reports of the Figure 1 experiment (:func:`pwsconv.diagnostics.run_probe_experiment`): how Var[Y_l] evolves
with depth against eqs. 5, 6 and 15 (:func:`depth_report`) and the Markdown summary (:func:`markdown_summary`)."""

from __future__ import annotations

import math
from typing import Any, Sequence

from .records import Record, layer_profile

__all__ = ["depth_report", "markdown_summary"]


def _fmt(v: float | None) -> str:
    if v is None or v != v:
        return "nan"
    if v == 0:
        return "0"
    a = abs(v)
    return f"{v:.3g}" if 1e-3 <= a < 1e4 else f"{v:.2e}"


def _conv_layers(records: Sequence[Record]) -> set[int]:
    conv = {r["layer_index"] for r in records if r["layer_index"] >= 0 and "Conv" in str(r["kind"])}
    return conv or {r["layer_index"] for r in records if r["layer_index"] >= 0}


def depth_report(records: Sequence[Record]) -> dict[str, Any]:
    """How Var[Y_l] evolves with depth in one method's records (eq. 6), over the conv layers (a global pooling before a
    linear classifier is outside eq. 5's chain; all layers when there is no conv).

    Returns ``ratio_first`` / ``ratio_last``: Var[Y_L] / Var[Y_1] at the first and the last recorded step whose
    values are finite; ``eq15_first`` / ``eq15_last``: the growth eq. 15 predicts, Π_{l≥2} (1 + E²[X_l] /
    (2E[X_l²])·Var_o[n_l·E[W_o]]); ``corr_log``: Pearson correlation of log10 measured vs log10 eq. 5-predicted
    Var[Y_l] over all layers ≥ 2 and steps; ``median_ratio``: the median of measured / predicted; ``points``.

    ``factors_first``: ``ratio_first`` as an exact product of four measured factors over the layers l ≥ 2
    (each Π_l; NaN when a statistic is missing): ``relu`` — E[X_l²] / (½·Var[Y_{l−1}]) (1 where eq. 2 holds);
    ``filters`` — eq. 5's prediction from the layer's own input over 2·E[X_l²] (the filters' scale n_l·Var[W_o]/2 and
    their mean shift, eq. 15's part: 1 for He-scaled zero-mean filters; PWS's γ makes it Var/(Var + γ) per layer); ``common_mean`` — 1 − E²[X_l]/E[X_l²]: eq. 5
    counts the inputs' common mean E²[X_l] in its first term, but the deviations W_o − E[W_o] sum to zero over a
    filter and cancel it (exactly so for independent inputs); ``rest`` — what is left of measured / eq. 5 (zero
    padding at the borders, spatially correlated inputs); and ``rest_last_layer``, the rest of the deepest layer alone.
    """
    layers = _conv_layers(records)
    by_step: dict[int, dict[int, dict[str, float]]] = {}
    for r in records:
        if r["layer_index"] in layers and r["stat"] in ("y_var", "y_var_pred", "amp_eq15", "y_var_pred_x", "x_sq",
                                                        "x_mean"):
            by_step.setdefault(r["step"], {}).setdefault(r["layer_index"], {})[r["stat"]] = r["value"]
    ratios: list[tuple[int, float, float]] = []
    meas, pred = [], []
    for s in sorted(by_step):
        lay = by_step[s]
        idx = sorted(lay)
        if len(idx) < 2:
            continue
        first, last = lay[idx[0]].get("y_var", math.nan), lay[idx[-1]].get("y_var", math.nan)
        amp = [lay[i].get("amp_eq15", math.nan) for i in idx[1:]]
        if first == first and last == last and first > 0:
            ratios.append((s, last / first, math.prod(amp)))
        for i in idx[1:]:
            m, p = lay[i].get("y_var", math.nan), lay[i].get("y_var_pred", math.nan)
            if m == m and p == p and m > 0 and p > 0:
                meas.append(math.log10(m))
                pred.append(math.log10(p))
    out: dict[str, Any] = {"ratio_first": math.nan, "ratio_last": math.nan, "eq15_first": math.nan,
                           "eq15_last": math.nan, "corr_log": math.nan, "median_ratio": math.nan,
                           "points": len(meas), "factors_first": _depth_factors({})}
    if ratios:
        out.update(ratio_first=ratios[0][1], eq15_first=ratios[0][2], ratio_last=ratios[-1][1],
                   eq15_last=ratios[-1][2], factors_first=_depth_factors(by_step[ratios[0][0]]))
    n = len(meas)
    if n >= 3:
        mm, mp = sum(meas) / n, sum(pred) / n
        sxy = sum((a - mm) * (b - mp) for a, b in zip(meas, pred))
        sxx = sum((a - mm) ** 2 for a in meas)
        syy = sum((b - mp) ** 2 for b in pred)
        if sxx > 0 and syy > 0:
            out["corr_log"] = sxy / math.sqrt(sxx * syy)
    if n:
        diffs = sorted(a - b for a, b in zip(meas, pred))
        k = n // 2
        md = diffs[k] if n % 2 else 0.5 * (diffs[k - 1] + diffs[k])
        out["median_ratio"] = 10 ** md
    return out


def _depth_factors(lay: dict[int, dict[str, float]]) -> dict[str, float]:
    """Var[Y_L]/Var[Y_1] at one step as Π over l ≥ 2 of relu · filters · common_mean · rest (see depth_report)."""
    nan = math.nan
    out = {"relu": nan, "filters": nan, "common_mean": nan, "rest": nan, "rest_last_layer": nan}
    idx = sorted(lay)
    prods = {"relu": 1.0, "filters": 1.0, "common_mean": 1.0, "rest": 1.0}
    last_rest = nan
    for a, b in zip(idx, idx[1:]):
        prev, cur = lay[a], lay[b]
        try:
            relu = cur["x_sq"] / (0.5 * prev["y_var"])
            filters = cur["y_var_pred_x"] / (2.0 * cur["x_sq"])
            common = 1.0 - cur["x_mean"] ** 2 / cur["x_sq"]
            rest = cur["y_var"] / cur["y_var_pred_x"] / common
        except (KeyError, ZeroDivisionError):
            return out
        for k, v in (("relu", relu), ("filters", filters), ("common_mean", common), ("rest", rest)):
            prods[k] *= v
        last_rest = rest
    if len(idx) < 2 or not all(math.isfinite(v) for v in prods.values()):
        return out
    return {**prods, "rest_last_layer": last_rest}


def markdown_summary(records_by_method: dict[str, Sequence[Record]], *, collapsed: dict[str, int | None] | None = None,
                     plain: str = "none", title: str = "Variance-transmission probe", config: str = "") -> str:
    """The Markdown report of :func:`run_probe_experiment`: a table of the shift of the average gradient
    Var_o[n_l·E[ΔW_o]] per layer and method (Figure 1(b), mean over recorded steps; for PWS the raw weight, eq. 13),
    and a table of Var[Y_l] with depth against eqs. 5, 6 and 15, with a one-line verdict for the plain network."""
    collapsed = collapsed or {}
    lines = [f"## {title}", ""]
    if config:
        lines += [config, ""]
    methods = list(records_by_method)
    profiles = {m: layer_profile(records_by_method[m], "shift", "mean") for m in methods}
    gprof = {m: layer_profile(records_by_method[m], "grad_shift", "mean") for m in methods}
    names: dict[int, str] = {}
    for m in methods:
        for src in (profiles[m], gprof[m]):
            for i, n in zip(src[0], src[1]):
                names.setdefault(i, n)
    use = profiles if any(profiles[m][0] for m in methods) else gprof
    label = "Var_o[n_l·E[ΔW_o]]" if use is profiles else "Var_o[n_l·E[∇W_o]]"
    lines += [f"### Shift of the average gradient {label} per layer (Figure 1(b), mean over recorded steps)", ""]
    lines.append("| # | layer | " + " | ".join(methods) + " |")
    lines.append("|---|---|" + "---|" * len(methods))
    for i in sorted(names):
        row = []
        for m in methods:
            d = dict(zip(use[m][0], use[m][2]))
            row.append(_fmt(d.get(i)))
        lines.append(f"| {i + 1} | `{names[i]}` | " + " | ".join(row) + " |")
    lines += ["", "### Var[Y_l] with depth (eqs. 5, 6, 15; conv layers)", "",
              "| method | collapsed at step | Var[Y_L]/Var[Y_1] first step | last step "
              "| eq. 15 predicts (first / last) "
              "| corr(log Var[Y_l], log eq. 5) | median measured/eq. 5 |",
              "|---|---|---|---|---|---|---|"]
    reports = {m: depth_report(records_by_method[m]) for m in methods}
    for m in methods:
        r = reports[m]
        c = collapsed.get(m)
        lines.append(f"| {m} | {'—' if c is None else c} | {_fmt(r['ratio_first'])} | {_fmt(r['ratio_last'])} | "
                     f"{_fmt(r['eq15_first'])} / {_fmt(r['eq15_last'])} | {_fmt(r['corr_log'])} | "
                     f"{_fmt(r['median_ratio'])} |")
    if plain in reports:
        r = reports[plain]
        ratio = r["ratio_last"]
        if ratio != ratio:
            verdict = f"The plain network ('{plain}') has no finite Var[Y_l] profile (collapsed or no conv layers)."
        else:
            grows = ratio > 1.0
            verdict = (f"The plain network ('{plain}'): Var[Y_l] {'grows' if grows else 'does not grow'} with depth "
                       f"(last/first conv layer ×{_fmt(ratio)} at the last finite step; eq. 15 predicts "
                       f"×{_fmt(r['eq15_last'])}; eq. 6 predicts growth whenever the filter means shift).")
        lines += ["", verdict]
    lines += _depth_explanation(reports)
    lines += ["", "Var[Y_l] is the conv output before any norm layer; eqs. 5/15 chain conv to conv and ignore output "
              "normalization, so for BN-like methods they describe the un-normalized chain only (BN re-centres every "
              "channel, eq. 8)."]
    return "\n".join(lines) + "\n"


def _depth_explanation(reports: dict[str, dict[str, Any]]) -> list[str]:
    """The table that says where Var[Y_L]/Var[Y_1] at the first step comes from, and why it can be far below eq. 15's
    value (e.g. PWS: eq. 15 predicts 1 — no mean shift — while the variance decays)."""
    rows = [(m, r["ratio_first"], r["factors_first"]) for m, r in reports.items()
            if math.isfinite(r["ratio_first"]) and math.isfinite(r["factors_first"]["rest"])]
    if not rows:
        return []
    lines = ["", "### Where Var[Y_L]/Var[Y_1] comes from (first step; each column a product over the conv layers "
             "l ≥ 2)", "",
             "| method | measured | = ReLU: E[X_l²]/(½Var[Y_l−1]) (eq. 2) | × filters: scale and mean shift (eq. 15's "
             "part) | × 1 − E²[X_l]/E[X_l²] | × rest (padding, correlated inputs; last layer alone) |",
             "|---|---|---|---|---|---|"]
    for m, ratio, f in rows:
        lines.append(f"| {m} | {_fmt(ratio)} | {_fmt(f['relu'])} | {_fmt(f['filters'])} | {_fmt(f['common_mean'])} | "
                     f"{_fmt(f['rest'])} ({_fmt(f['rest_last_layer'])}) |")
    lines += ["", "Eq. 15 accounts only for part of the filters' column: their mean shift (a factor 1 for PWS, whose "
              "filters have zero mean). The column also holds their scale, n_l·Var[W_o]/2: 1 at He init, below 1 "
              "for PWS because γ sits beside Var[W_o] in eq. 12 (Var/(Var + γ) per layer). Eq. 5's first term, E[X_l²]·n_l·Var[W_o], counts the common mean E²[X_l] of a layer's "
              "inputs, but the deviations W_o − E[W_o] sum to zero over a filter and cancel it, so only about "
              "1 − E²[X_l]/E[X_l²] of it passes a layer (after a ReLU ≈ 0.68; for every method). The rest is what eq. "
              "5's independence assumption leaves out: zero padding at the borders (a 3×3 conv on a 2×2 map sees 4 of "
              "its 9 taps inside the map) and neighbouring inputs that are correlated. On small inputs and deep "
              "stacks these compound to orders of magnitude without any collapse."]
    return lines
