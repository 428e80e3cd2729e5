"""One self-contained HTML evaluation report.

Every plot is a matplotlib figure embedded as a base64 PNG ``<img>``; tables are plain HTML;
the style sheet is inline; there is no script, external file, font or URL, so the page opens
in a browser without a network. Every section is optional: pass what you have.

Plots carry ``data-plot="<name>"`` so tests and readers can find them: ``metrics_vs_k``,
``metric_curves`` (metric against k with bootstrap bands), ``slices``, ``peers``, ``ablations``,
``feature_importance``, ``modality_weights``, ``user_attention``, ``popularity_lorenz``, ``tradeoff``.

The page is rendered by a Jinja2 template (autoescaped; section bodies built here are the
only trusted HTML). Every figure is formatted by one function (``_fmt``: 4 decimals, counts
as integers), so a number reads the same in every table.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from fusionrec.evaluation import metrics as M
from fusionrec.pipeline.io.storage import atomic_path

if TYPE_CHECKING:  # matplotlib and Jinja2 load when a report is drawn, not with `fusionrec evaluate`
    import jinja2
    from matplotlib.figure import Figure

_METRIC_KEY = re.compile(r"^(?P<name>[a-z_]+)@(?P<k>\d+)$")
_PREFERRED = ("ndcg@10", "recall@10", "map@10", "hit_rate@10", "precision@10", "mrr@10")
_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2rem auto;max-width:1100px;
color:#1d2330;padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.2rem;border-bottom:1px solid #ccd;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.85rem}
th,td{border:1px solid #ccd;padding:.25rem .5rem;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#eef0f5}
img.plot{max-width:100%;height:auto;display:block;margin:.6rem 0}
p.note{color:#555;font-size:.85rem}div.scroll{overflow-x:auto}
table.meta th{text-align:left}pre{font-size:.75rem;background:#f6f7fa;padding:.5rem;overflow-x:auto}
"""


@dataclass(frozen=True)
class Section:
    """A titled block of trusted HTML (use the helpers below, or build your own)."""

    title: str
    html: str


# ----------------------------------------------------------------------------- building blocks

def new_figure(*args: Any, **kwargs: Any) -> Figure:
    """A matplotlib `Figure` (matplotlib is imported here, on the first plot)."""
    from matplotlib.figure import Figure

    return Figure(*args, **kwargs)


def figure_to_img(fig: Figure, name: str, alt: str) -> str:
    """PNG ``<img>`` with a data URI (no metadata: the PNG carries no URL)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buf = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return (f'<img class="plot" data-plot="{html.escape(name)}" alt="{html.escape(alt)}" '
            f'src="data:image/png;base64,{data}">')


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def table_html(rows: pl.DataFrame | Sequence[Mapping[str, Any]]) -> str:
    """HTML table; ``<m>_ci_low``/``<m>_ci_high`` columns fold into ``<m>`` as ``v [lo, hi]``."""
    df = rows if isinstance(rows, pl.DataFrame) else pl.DataFrame(list(rows))
    if df.height == 0:
        return "<p class=\"note\">(no rows)</p>"
    folded = {c[: -len("_ci_low")] for c in df.columns
              if c.endswith("_ci_low") and c[: -len("_ci_low")] in df.columns
              and c[: -len("_ci_low")] + "_ci_high" in df.columns}
    cols = [c for c in df.columns if not any(c in (f + "_ci_low", f + "_ci_high") for f in folded)]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = []
    for row in df.iter_rows(named=True):  # rendering a small table, not computing metrics
        cells = []
        for c in cols:
            text = _fmt(row[c])
            if c in folded and row[c + "_ci_low"] is not None:
                text += f" [{_fmt(row[c + '_ci_low'])}, {_fmt(row[c + '_ci_high'])}]"
            cells.append(f"<td>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f"<div class=\"scroll\"><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _metric_runs(runs: Mapping[str, Any]) -> dict[str, Mapping[str, float]]:
    return {name: (r.metrics if hasattr(r, "metrics") else r) for name, r in runs.items()}


def _pick_metrics(columns: Iterable[str], wanted: Sequence[str] | None, limit: int) -> list[str]:
    cols = list(columns)
    if wanted:
        return [m for m in wanted if m in cols]
    chosen = [m for m in _PREFERRED if m in cols]
    return (chosen or [c for c in cols if _METRIC_KEY.match(c)])[:limit]


# ----------------------------------------------------------------------------- sections

def section_summary(metrics: Mapping[str, float], title: str = "Summary") -> Section:
    """``<metric>@<k>`` values as a metric x cut-off grid, then the other figures."""
    grid: dict[str, dict[str, Any]] = {}
    ks: list[int] = []
    other = []
    for key, v in metrics.items():
        m = _METRIC_KEY.match(key)
        if m:
            grid.setdefault(m["name"], {"metric": m["name"]})[f"@{m['k']}"] = v
            ks.append(int(m["k"]))
        else:
            other.append({"figure": key, "value": v})
    cols = ["metric"] + [f"@{k}" for k in sorted(set(ks))]
    parts = []
    if grid:
        parts.append(table_html(pl.DataFrame([{c: row.get(c) for c in cols} for row in grid.values()])))
    if other:
        parts.append(table_html([{"figure": r["figure"], "value": _fmt(r["value"])} for r in other]))
    return Section(title, "".join(parts))


def section_metrics_vs_k(runs: Mapping[str, Any]) -> Section | None:
    """One panel per ranking metric, one line per run, cut-off on the x axis."""
    runs = _metric_runs(runs)
    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for run, mets in runs.items():
        for key, v in mets.items():
            m = _METRIC_KEY.match(key)
            if m and m["name"] in M.RANKING_METRICS and v is not None and not math.isnan(v):
                series.setdefault(m["name"], {}).setdefault(run, []).append((int(m["k"]), float(v)))
    if not series:
        return None
    names = [n for n in M.RANKING_METRICS if n in series]
    ncols = min(3, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig = new_figure(figsize=(4.2 * ncols, 3.0 * nrows))
    for i, name in enumerate(names):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for run, pts in series[name].items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=run)
        ax.set_xticks(sorted({p[0] for pts in series[name].values() for p in pts}))
        ax.set_title(name)
        ax.set_xlabel("cut-off k")
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=7)
    fig.tight_layout()
    table = pl.DataFrame([{"run": r, **{k: v for k, v in m.items() if "@" in k or k == "rmse"}}
                          for r, m in runs.items()])
    return Section("Metrics against cut-off", figure_to_img(fig, "metrics_vs_k", "metrics against cut-off")
                   + table_html(table))


def _bars(df: pl.DataFrame, label_col: str, metrics: list[str], name: str, title: str) -> str:
    labels = [str(v) for v in df[label_col].to_list()]
    fig = new_figure(figsize=(max(6.0, 0.9 * len(labels) * max(1, len(metrics)) * 0.5 + 3), 3.6))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(metrics)
    x = np.arange(len(labels))
    for j, m in enumerate(metrics):
        vals = df[m].cast(pl.Float64).to_numpy()
        err = None
        if f"{m}_ci_low" in df.columns and f"{m}_ci_high" in df.columns:
            lo = df[f"{m}_ci_low"].cast(pl.Float64).to_numpy()
            hi = df[f"{m}_ci_high"].cast(pl.Float64).to_numpy()
            err = np.nan_to_num(np.vstack([vals - lo, hi - vals]).clip(min=0))
        ax.bar(x + (j - (len(metrics) - 1) / 2) * width, np.nan_to_num(vals), width, yerr=err,
               capsize=3, label=m)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return figure_to_img(fig, name, title)


def _label_column(df: pl.DataFrame, preferred: Sequence[str]) -> str:
    for c in preferred:
        if c in df.columns:
            return c
    return next(c for c in df.columns if df.schema[c] == pl.String) if any(
        df.schema[c] == pl.String for c in df.columns) else df.columns[0]


def section_table_with_bars(df: pl.DataFrame, title: str, name: str, metrics: Sequence[str] | None = None,
                            label_cols: Sequence[str] = ("model", "variant", "run", "name")) -> Section | None:
    """Table plus grouped bars (with CI whiskers where ``<m>_ci_low/high`` exist)."""
    if df is None or df.height == 0:
        return None
    label = _label_column(df, label_cols)
    chosen = _pick_metrics([c for c in df.columns if df.schema[c].is_numeric()], metrics, 3)
    img = _bars(df, label, chosen, name, title) if chosen else ""
    return Section(title, img + table_html(df))


IMPORTANCE_TYPES = {
    "gain": "gain: the total loss reduction of the splits that use the feature",
    "split": "split: the number of times the feature is used in a split",
}


def section_feature_importance(importance: pl.DataFrame, top: int = 25,
                               importance_type: str | None = None) -> Section | None:
    """Horizontal bars of the ``top`` features (first string column = name, first numeric = value),
    the importance type (``gain`` or ``split``) named on the axis and under the plot."""
    if importance is None or importance.height == 0:
        return None
    name_col = _label_column(importance, ("feature", "name"))
    numeric = [c for c in (["importance", "gain"] + importance.columns)
               if c in importance.columns and importance.schema[c].is_numeric()]
    if not numeric:
        raise ValueError(f"feature importance needs a numeric column; has {', '.join(importance.columns)}")
    val_col = numeric[0]
    df = importance.sort(val_col, descending=True).head(top)
    fig = new_figure(figsize=(7, 0.28 * df.height + 1.2))
    ax = fig.add_subplot(1, 1, 1)
    ax.barh(np.arange(df.height)[::-1], df[val_col].cast(pl.Float64).to_numpy(), color="#4c72b0")
    ax.set_yticks(np.arange(df.height)[::-1])
    ax.set_yticklabels([str(v) for v in df[name_col].to_list()], fontsize=8)
    kind = importance_type or (val_col if val_col in IMPORTANCE_TYPES else None)
    ax.set_xlabel(f"importance ({kind})" if kind else val_col)
    ax.set_title("Ranker feature importance" + (f" ({kind})" if kind else ""))
    fig.tight_layout()
    note = (f'<p class="note">Importance type: {html.escape(IMPORTANCE_TYPES.get(kind, kind))}.</p>'
            if kind else "")
    return Section("Feature importance", note + figure_to_img(fig, "feature_importance", "feature importance")
                   + table_html(df))


def section_modality_weights(weights: Mapping[str, float] | pl.DataFrame | None,
                             user_attention: pl.DataFrame | None) -> Section | None:
    """Global fusion weights as bars; per-user attention as one histogram per modality.

    ``user_attention`` is wide (a column per modality, optional ``user_id``) or long
    (``modality, weight``).
    """
    parts = []
    if weights is not None and len(weights):
        if isinstance(weights, pl.DataFrame):
            weights = dict(zip(weights[_label_column(weights, ("modality",))].to_list(),
                               weights["weight"].to_list()))
        fig = new_figure(figsize=(5, 3))
        ax = fig.add_subplot(1, 1, 1)
        ax.bar(list(map(str, weights)), [float(v) for v in weights.values()], color="#55a868")
        ax.set_ylabel("weight")
        ax.set_title("Global modality weights")
        fig.tight_layout()
        parts.append(figure_to_img(fig, "modality_weights", "global modality weights"))
        parts.append(table_html([{"modality": k, "weight": float(v)} for k, v in weights.items()]))
    if user_attention is not None and user_attention.height:
        if {"modality", "weight"} <= set(user_attention.columns):
            long = user_attention.select(pl.col("modality").cast(pl.String), pl.col("weight").cast(pl.Float64))
        else:
            num = [c for c in user_attention.columns if c != "user_id" and user_attention.schema[c].is_numeric()]
            long = user_attention.unpivot(on=num, variable_name="modality", value_name="weight")
        mods = long["modality"].unique().sort().to_list()
        fig = new_figure(figsize=(3.4 * len(mods), 2.8))
        for i, mod in enumerate(mods):
            ax = fig.add_subplot(1, len(mods), i + 1)
            vals = long.filter(pl.col("modality") == mod)["weight"].drop_nulls().to_numpy()
            ax.hist(vals, bins=30, range=(0.0, 1.0) if vals.size and vals.min() >= 0 and vals.max() <= 1 else None,
                    color="#c44e52")
            ax.set_title(f"{mod} (mean {vals.mean():.2f})" if vals.size else mod, fontsize=9)
            ax.set_xlabel("per-user attention")
        fig.tight_layout()
        parts.append(figure_to_img(fig, "user_attention", "distribution of per-user attention"))
    return Section("Modality weights", "".join(parts)) if parts else None


def section_popularity(exposure: Mapping[str, Any], n_items: int | None = None, k: int | None = None
                       ) -> Section | None:
    """Lorenz curves of exposure (recs frames or exposure-count arrays), Gini in the legend."""
    if not exposure:
        return None
    fig = new_figure(figsize=(5.5, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="equal exposure")
    rows = []
    for name, value in exposure.items():
        if isinstance(value, pl.DataFrame):
            counts = M.exposure_counts(value, n_items, k)
        else:
            counts = np.sort(np.asarray(value, dtype=np.float64))
            if n_items and counts.size < n_items:
                counts = np.concatenate([np.zeros(n_items - counts.size), counts])
        total = counts.sum()
        y = np.concatenate([[0.0], np.cumsum(counts) / total]) if total else np.zeros(counts.size + 1)
        g = M.gini(counts)
        ax.plot(np.linspace(0, 1, counts.size + 1), y, label=f"{name} (Gini {g:.3f})")
        rows.append({"run": name, "gini": g, "items_shown": int((counts > 0).sum()), "catalog": int(counts.size)})
    ax.set_xlabel("share of catalog (least exposed first)")
    ax.set_ylabel("share of recommendations")
    ax.set_title("Popularity bias: Lorenz curve of exposure")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return Section("Popularity bias", figure_to_img(fig, "popularity_lorenz", "Lorenz curve of exposure")
                   + table_html(rows))


def section_headline(intervals: Sequence[Mapping[str, Any]], title: str = "Headline") -> Section | None:
    """``bootstrap_ci`` dicts as metric, mean, 95% interval and users."""
    rows = [{"metric": str(c["metric"]), "value": c["mean"],
             f"{round(100 * (1 - float(c.get('alpha', 0.05))))}% interval":
                 f"[{_fmt(c['ci_low'])}, {_fmt(c['ci_high'])}]", "users": int(c["n_users"])}
            for c in intervals]
    if not rows:
        return None
    n_boot = intervals[0].get("n_boot")
    note = (f'<p class="note">Percentile bootstrap over users ({n_boot} resamples).</p>' if n_boot else "")
    return Section(title, table_html(rows) + note)


def section_metric_curves(curves: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]]) -> Section | None:
    """Metric against cut-off k, one line per run with its bootstrap band.

    ``curves``: run -> metric -> points ``{"k", "mean", "ci_low", "ci_high"}``.
    """
    metrics = sorted({m for per_run in curves.values() for m in per_run},
                     key=lambda m: M.RANKING_METRICS.index(m) if m in M.RANKING_METRICS else 99)
    if not metrics:
        return None
    ncols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig = new_figure(figsize=(4.2 * ncols, 3.0 * nrows))
    ks: set[int] = set()
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for run, per_run in curves.items():
            pts = sorted(per_run.get(metric, []), key=lambda p: p["k"])
            if not pts:
                continue
            x = [int(p["k"]) for p in pts]
            ks.update(x)
            (line,) = ax.plot(x, [p["mean"] for p in pts], marker="o", markersize=3, label=run)
            ax.fill_between(x, [p["ci_low"] for p in pts], [p["ci_high"] for p in pts], color=line.get_color(),
                            alpha=0.18, linewidth=0)
        ax.set_title(metric)
        ax.set_xlabel("cut-off k")
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=7)
    fig.tight_layout()
    note = (f'<p class="note">Bands: 95% bootstrap intervals over users, at k = '
            f'{", ".join(str(k) for k in sorted(ks))}.</p>')
    return Section("Metrics against cut-off", figure_to_img(fig, "metric_curves", "metrics against cut-off k")
                   + note)


def section_slices(rows: Sequence[Mapping[str, Any]], metric: str) -> Section | None:
    """Slices (user segments, cold items) as bars with interval whiskers, then the table."""
    if not rows:
        return None
    df = pl.DataFrame(list(rows))
    return section_table_with_bars(df, "Slices", "slices", [metric], label_cols=("slice",))


TRADEOFF_METRICS = (("coverage", "catalog coverage"), ("gini", "Gini of exposure (lower: flatter)"),
                    ("long_tail_share", "long-tail share"), ("ild", "intra-list diversity"),
                    ("calibration_kl", "calibration KL (lower: calibrated)"))


def section_tradeoff(points: Sequence[Mapping[str, Any]]) -> Section | None:
    """NDCG@10 against each beyond-accuracy metric, one curve per rerank option over its
    parameter, whiskers its paired 95% interval against the unreranked lists (the star).

    ``points``: dicts ``option, value, ndcg@10, ndcg@10_diff, ndcg@10_ci`` (``[low, high]``, the
    difference's interval) and the metrics of ``TRADEOFF_METRICS``; the point without
    ``ndcg@10_diff`` is the unreranked lists.
    """
    if not points:
        return None
    base = next((p for p in points if "ndcg@10_diff" not in p), None)
    options = list(dict.fromkeys(str(p["option"]) for p in points if "ndcg@10_diff" in p))
    fig = new_figure(figsize=(4.2 * 3, 3.2 * 2))
    for i, (metric, label) in enumerate(TRADEOFF_METRICS):
        ax = fig.add_subplot(2, 3, i + 1)
        for option in options:
            pts = [p for p in points if p["option"] == option]
            if base is not None:
                pts = [base, *pts]
            x = [float(p[metric]) for p in pts]
            y = [float(p["ndcg@10"]) for p in pts]
            # Whiskers: the paired interval of the difference, drawn around the point.
            err = np.array([[float(p["ndcg@10_diff"]) - float(p["ndcg@10_ci"][0]) if "ndcg@10_ci" in p else 0.0
                             for p in pts],
                            [float(p["ndcg@10_ci"][1]) - float(p["ndcg@10_diff"]) if "ndcg@10_ci" in p else 0.0
                             for p in pts]]).clip(min=0.0)
            ax.errorbar(x, y, yerr=err, marker="o", markersize=3, capsize=2, linewidth=1, label=option)
        if base is not None:
            ax.plot([float(base[metric])], [float(base["ndcg@10"])], marker="*", markersize=11, color="black",
                    linestyle="none", label="shipped order")
        ax.set_xlabel(label)
        ax.set_ylabel("NDCG@10")
        ax.grid(alpha=0.3)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    legend_ax = fig.add_subplot(2, 3, 6)
    legend_ax.axis("off")
    legend_ax.legend(handles, labels, loc="center", fontsize=8)
    fig.tight_layout()
    rows = [{"option": p["option"], "value": p.get("value"), "ndcg@10": p["ndcg@10"],
             "difference": p.get("ndcg@10_diff"),
             "ci_low": (p.get("ndcg@10_ci") or [None, None])[0], "ci_high": (p.get("ndcg@10_ci") or [None, None])[1],
             **{m: p[m] for m, _ in TRADEOFF_METRICS}} for p in points]
    note = ('<p class="note">Each option swept over its parameter, the others off; whiskers: the 95% paired '
            'bootstrap interval over users of the NDCG@10 difference against the shipped order\'s lists (the '
            'star).</p>')
    return Section("Beyond accuracy: rerank trade-offs",
                   figure_to_img(fig, "tradeoff", "NDCG@10 against coverage, Gini, long-tail share, ILD and "
                                                  "calibration KL per rerank option") + note + table_html(rows))


# ----------------------------------------------------------------------------- the page

@cache
def _template() -> jinja2.Template:
    import jinja2

    return jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string(_PAGE)


_PAGE = """\
<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title><style>{{ css|safe }}</style></head>
<body><h1>{{ title }}</h1>
{% if meta %}<p class="note">{% for key, value in meta.items() %}{{ key }}: {{ value }}\
{% if not loop.last %} &middot; {% endif %}{% endfor %}</p>{% endif %}
{% for section in sections %}<section><h2>{{ section.title }}</h2>{{ section.html }}</section>
{% endfor %}
{% if run_metadata or config %}<section><h2>Run metadata</h2>
{% if run_metadata %}<table class="meta"><tbody>{% for key, value in run_metadata.items() %}\
<tr><th>{{ key }}</th><td>{{ value }}</td></tr>{% endfor %}</tbody></table>{% endif %}
{% if config %}<details><summary>config</summary><pre>{{ config }}</pre></details>{% endif %}
</section>{% endif %}
</body></html>
"""


def render_report(*, title: str = "fusionrec evaluation", meta: Mapping[str, Any] | None = None,
                  summary: Mapping[str, float] | None = None, runs: Mapping[str, Any] | None = None,
                  slices: Mapping[str, Mapping[str, float]] | None = None,
                  comparisons: Sequence[Mapping[str, Any]] | None = None,
                  peers: pl.DataFrame | None = None, peer_metrics: Sequence[str] | None = None,
                  ablations: pl.DataFrame | None = None, ablation_metrics: Sequence[str] | None = None,
                  feature_importance: pl.DataFrame | None = None,
                  modality_weights: Mapping[str, float] | pl.DataFrame | None = None,
                  user_attention: pl.DataFrame | None = None,
                  exposure: Mapping[str, Any] | None = None, n_items: int | None = None,
                  exposure_k: int | None = None, sections: Sequence[Section] = (),
                  headline: Sequence[Mapping[str, Any]] | None = None,
                  curves: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]] | None = None,
                  slice_intervals: Sequence[Mapping[str, Any]] | None = None, slice_metric: str | None = None,
                  importance_type: str | None = None, run_metadata: Mapping[str, Any] | None = None,
                  config: str | None = None, tradeoff: Sequence[Mapping[str, Any]] | None = None) -> str:
    """The report as an HTML string; sections whose input is None or empty are left out.

    ``runs``: name -> metrics dict (or an ``EvaluationResult``) for the metrics-vs-cut-off
    plot. ``peers``/``ablations``: frames with a label column (``model``/``variant``) and
    metric columns, optionally ``<m>_ci_low``/``<m>_ci_high``. ``comparisons``: dicts from
    ``paired_comparison``. ``exposure``: name -> recs frame or exposure counts. ``headline``:
    ``bootstrap_ci`` dicts; ``curves``: run -> metric -> ``{k, mean, ci_low, ci_high}`` points
    (drawn with bands, in place of the plain metric-vs-k plot); ``slice_intervals``: rows
    ``slice, <slice_metric>, <slice_metric>_ci_low/_ci_high, users`` (bars with whiskers, in
    place of the plain slices table); ``run_metadata``: name -> value (data hash, versions);
    ``config``: the run's config as text; ``tradeoff``: rerank sweep points (`section_tradeoff`,
    as `bench/tradeoff.py` writes them).
    """
    blocks: list[Section | None] = []
    if headline:
        blocks.append(section_headline(headline))
    if summary:
        blocks.append(section_summary(summary))
    if curves:
        blocks.append(section_metric_curves(curves))
    elif runs:
        blocks.append(section_metrics_vs_k(runs))
    if slice_intervals and slice_metric:
        blocks.append(section_slices(slice_intervals, slice_metric))
    elif slices:
        blocks.append(Section("Slices", table_html([{"slice": s, **dict(v)} for s, v in slices.items()])))
    if comparisons:
        blocks.append(Section("Paired comparisons (offline A/B)", table_html(list(comparisons))))
    if peers is not None:
        blocks.append(section_table_with_bars(peers, "Peers", "peers", peer_metrics))
    if ablations is not None:
        blocks.append(section_table_with_bars(ablations, "Ablations", "ablations", ablation_metrics))
    if feature_importance is not None:
        blocks.append(section_feature_importance(feature_importance, importance_type=importance_type))
    blocks.append(section_modality_weights(modality_weights, user_attention))
    if exposure:
        blocks.append(section_popularity(exposure, n_items, exposure_k))
    if tradeoff:
        blocks.append(section_tradeoff(tradeoff))
    blocks.extend(sections)
    from markupsafe import Markup

    shown = [Section(b.title, Markup(b.html)) for b in blocks if b]  # section bodies are built (escaped) here
    return _template().render(title=title, css=_CSS, meta=dict(meta or {}), sections=shown,
                            run_metadata=dict(run_metadata or {}), config=config or "")


def write_report(path: str | os.PathLike[str], **sections: Any) -> Path:
    """Render (see :func:`render_report` for the sections) and write atomically; returns the path."""
    path = Path(path)
    page = render_report(**sections)  # render first: a failed render leaves the old page alone
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path
