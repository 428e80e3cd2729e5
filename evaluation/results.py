"""Evaluation of one run (recommendations against held-out interactions), its slices,
bootstrap confidence intervals and the paired comparison of two runs.

Relevance: every distinct (user, item) of the test frame is relevant, except - by default -
pairs the user already had in train (recommenders leave seen items out, so those could never
be hit), and, with ``relevance_threshold``, rated rows below it (rows without a value stay
relevant). Beyond-accuracy metrics (coverage, novelty, diversity, popularity bias) are taken
over the lists of the evaluated users only, so runs with different user sets compare fairly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import polars as pl

from fusionrec.evaluation import metrics as M

SEGMENTS = ("new", "light", "medium", "heavy")


@dataclass(frozen=True)
class EvaluationResult:
    """Overall metrics, per-user metrics and slice summaries of one run."""

    ks: tuple[int, ...]
    metrics: dict[str, float]
    per_user: pl.DataFrame = field(repr=False)
    slices: dict[str, dict[str, float]]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (without the per-user frame)."""
        return {"ks": list(self.ks), "metrics": dict(self.metrics),
                "slices": {k: dict(v) for k, v in self.slices.items()}}


def _pairs(df: pl.DataFrame) -> pl.DataFrame:
    return M.relevant_pairs(df)


def relevant_truth(test: pl.DataFrame, train: pl.DataFrame | None = None, *,
                   relevance_threshold: float | None = None, exclude_train_pairs: bool = True
                   ) -> pl.DataFrame:
    """Distinct relevant ``user_id, item_id`` pairs of the test frame (see the module docstring)."""
    t = test
    if relevance_threshold is not None and "value" in t.columns:
        t = t.filter(pl.col("value").is_null() | (pl.col("value") >= relevance_threshold))
    t = _pairs(t)
    if exclude_train_pairs and train is not None and train.height:
        t = t.join(_pairs(train), on=["user_id", "item_id"], how="anti")
    return t.sort("user_id", "item_id")


def user_segments(users: pl.DataFrame, train: pl.DataFrame,
                  activity_quantiles: tuple[float, float] = (0.25, 0.75)) -> pl.DataFrame:
    """``user_id, n_train, segment`` for the given users.

    ``n_train`` is the number of distinct training items; ``segment`` is ``new`` (none),
    ``light`` (at most the lower quantile of training users' activity), ``heavy`` (at least
    the upper quantile) or ``medium``.
    """
    activity = _pairs(train).group_by("user_id").agg(pl.len().cast(pl.Int64).alias("n_train"))
    lo, hi = activity_quantiles
    if activity.height:
        q_lo = float(cast(float, activity["n_train"].quantile(lo, "linear")))
        q_hi = float(cast(float, activity["n_train"].quantile(hi, "linear")))
    else:
        q_lo = q_hi = math.inf
    n = pl.col("n_train")
    return (users.select(pl.col("user_id").cast(pl.String)).unique()
            .join(activity, on="user_id", how="left")
            .with_columns(n.fill_null(0))
            .with_columns(segment=pl.when(n == 0).then(pl.lit("new"))
                          .when(n <= q_lo).then(pl.lit("light"))
                          .when(n >= q_hi).then(pl.lit("heavy"))
                          .otherwise(pl.lit("medium")))
            .sort("user_id"))


def evaluate(recs: pl.DataFrame, test: pl.DataFrame, train: pl.DataFrame,
             ks: int | Iterable[int] = (10, 20), item_vectors: M.ItemVectors | None = None,
             n_items: int | None = None, *, relevance_threshold: float | None = None,
             exclude_train_pairs: bool = True, predictions: pl.DataFrame | None = None,
             activity_quantiles: tuple[float, float] = (0.25, 0.75)) -> EvaluationResult:
    """Evaluate one run.

    ``metrics``: means of the ranking metrics at each k, ``coverage@k``, ``novelty@k``,
    ``gini@k``, ``mean_popularity@k``, ``long_tail_share@k``, ``ild@k`` (with
    ``item_vectors``), ``rmse`` (with ``predictions``: ``user_id, item_id, score`` rating
    predictions against the test ``value``), and counts. ``per_user``: ranking metrics and
    ``ild@k`` per evaluated user with ``n_train`` and ``segment``. ``slices``: ``all``,
    ``new_users``, ``light_users``, ``medium_users``, ``heavy_users`` and ``cold_items``
    (relevance restricted to test items without training interactions, over the users who
    have one; precision there counts only cold hits).
    """
    ks = M.check_ks(ks)
    truth = relevant_truth(test, train, relevance_threshold=relevance_threshold,
                           exclude_train_pairs=exclude_train_pairs)
    per_user = M.ranking_metrics(recs, truth, ks)
    evaluated = per_user.select("user_id")
    lists = M.ranked_lists(recs).join(evaluated, on="user_id", how="semi")
    eval_recs = lists.rename({"pos": "rank"})

    if item_vectors is not None:
        for k in ks:
            ild = M.intra_list_diversity_per_user(eval_recs, item_vectors, k).rename({"ild": f"ild@{k}"})
            per_user = per_user.join(ild, on="user_id", how="left")
    per_user = (per_user.join(user_segments(evaluated, train, activity_quantiles), on="user_id", how="left")
                .select("user_id", "n_relevant", "n_train", "segment",
                        *[c for c in per_user.columns if "@" in c]))

    train_items = _pairs(train).select("item_id").unique()
    catalog = n_items or pl.concat([train_items["item_id"], _pairs(test)["item_id"],
                                    lists["item_id"]]).n_unique()
    metrics: dict[str, float] = M.summarise(per_user)
    metrics["n_items"] = int(catalog)
    metrics["n_new_users"] = int((per_user["segment"] == "new").sum())
    for k in ks:
        metrics[f"coverage@{k}"] = M.coverage(eval_recs, catalog, k)
        metrics[f"novelty@{k}"] = M.novelty(eval_recs, train, k)
        bias = M.popularity_bias(eval_recs, train, k, n_items=catalog)
        metrics[f"gini@{k}"] = bias["gini"]
        metrics[f"mean_popularity@{k}"] = bias["mean_popularity"]
        metrics[f"long_tail_share@{k}"] = bias["long_tail_share"]
    if predictions is not None:
        metrics["rmse"] = M.rmse(predictions, test)

    slices = {"all": M.summarise(per_user)}
    for seg in SEGMENTS:
        slices[f"{seg}_users"] = M.summarise(per_user.filter(pl.col("segment") == seg))
    cold_truth = truth.join(train_items, on="item_id", how="anti")
    slices["cold_items"] = M.summarise(M.ranking_metrics(recs, cold_truth, ks))
    return EvaluationResult(ks=ks, metrics=metrics, per_user=per_user, slices=slices)


# ----------------------------------------------------------------------------- uncertainty

def _values(per_user: pl.DataFrame, metric: str) -> np.ndarray:
    if metric not in per_user.columns:
        raise KeyError(f"no per-user column {metric!r}; have {', '.join(M.metric_columns(per_user))}")
    return per_user[metric].cast(pl.Float64).fill_nan(None).drop_nulls().to_numpy()


def _boot_means(values: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Means of ``n_boot`` resamples of the rows of ``values`` (1-D or users x runs)."""
    rng = np.random.default_rng(seed)
    n = values.shape[0]
    chunk = max(1, 2_000_000 // max(n, 1))  # bounded memory for many users
    out = []
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_boot - start), n))
        out.append(values[idx].mean(axis=1))
    return np.concatenate(out)


def bootstrap_ci(per_user: pl.DataFrame, metric: str, n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0) -> dict[str, Any]:
    """Percentile bootstrap interval over users of the mean of ``metric``.

    Returns ``metric, mean, ci_low, ci_high, n_users, n_boot, alpha``; users whose value is
    undefined (null) are left out; the interval is NaN with no user.
    """
    v = _values(per_user, metric)
    if v.size == 0:
        return {"metric": metric, "mean": math.nan, "ci_low": math.nan, "ci_high": math.nan,
                "n_users": 0, "n_boot": n_boot, "alpha": alpha}
    means = _boot_means(v, n_boot, seed)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return {"metric": metric, "mean": float(v.mean()), "ci_low": float(lo), "ci_high": float(hi),
            "n_users": int(v.size), "n_boot": n_boot, "alpha": alpha}


def paired_comparison(per_user_a: pl.DataFrame, per_user_b: pl.DataFrame, metric: str,
                      n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> dict[str, Any]:
    """Offline A/B test: ``diff = mean(b) - mean(a)`` over the users both runs evaluated.

    Each bootstrap resample draws the same users for both runs (so their shared per-user
    variation cancels). Returns ``metric, mean_a, mean_b, diff, rel_diff, ci_low, ci_high``
    (percentile interval of the difference), ``p_value`` (two-sided: share of centred
    resampled differences at least as far from 0 as the observed one), ``share_b_better``
    (share of resamples with ``diff > 0``), ``n_users`` and the users only one run has.
    """
    a = per_user_a.select(pl.col("user_id").cast(pl.String), pl.col(metric).cast(pl.Float64).alias("a"))
    b = per_user_b.select(pl.col("user_id").cast(pl.String), pl.col(metric).cast(pl.Float64).alias("b"))
    both = a.join(b, on="user_id", how="inner").with_columns(pl.col("a", "b").fill_nan(None)).drop_nulls()
    only_a = a.join(b, on="user_id", how="anti").height
    only_b = b.join(a, on="user_id", how="anti").height
    base: dict[str, Any] = {"metric": metric, "n_users": both.height, "n_only_a": only_a, "n_only_b": only_b,
            "n_boot": n_boot, "alpha": alpha}
    if both.height == 0:
        return {**base, "mean_a": math.nan, "mean_b": math.nan, "diff": math.nan, "rel_diff": math.nan,
                "ci_low": math.nan, "ci_high": math.nan, "p_value": math.nan, "share_b_better": math.nan}
    d = (both["b"] - both["a"]).to_numpy()
    mean_a, mean_b = float(cast(float, both["a"].mean())), float(cast(float, both["b"].mean()))
    diff = float(d.mean())
    boots = _boot_means(d, n_boot, seed)
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    centred = boots - diff
    p = (1 + np.count_nonzero(np.abs(centred) >= abs(diff) - 1e-15)) / (n_boot + 1) if diff != 0 else 1.0
    return {**base, "mean_a": mean_a, "mean_b": mean_b, "diff": diff,
            "rel_diff": diff / mean_a if mean_a else math.nan,
            "ci_low": float(lo), "ci_high": float(hi), "p_value": float(min(p, 1.0)),
            "share_b_better": float(np.mean(boots > 0))}
