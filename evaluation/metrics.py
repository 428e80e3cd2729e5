"""Offline recommendation metrics over polars frames.

Frames (see ``ranker.evaluation``):

* recommendations ``recs``: ``user_id, rank, item_id[, score]``, ``rank`` 1-based.
* truth: held-out interactions ``user_id, item_id[, ...]``; every distinct (user, item)
  pair is one relevant item (binary relevance; filter by rating before calling if needed).

Definitions (binary relevance, ``rel_u`` = the user's distinct relevant items, a hit is a
recommended item in ``rel_u``, ``pos`` its 1-based position in the list):

* ``recall@k = hits@k / |rel_u|`` (the common definition: a user with more relevant items
  than ``k`` cannot reach 1).
* ``precision@k = hits@k / k`` (a list shorter than ``k`` is not rewarded for it).
* ``ndcg@k = DCG@k / IDCG@k``, ``DCG = sum over hits of 1 / log2(pos + 1)``, IDCG the DCG of a
  perfect list of ``min(|rel_u|, k)`` hits, so a user with fewer relevant items than ``k``
  can reach 1.
* ``map@k``: per user the average precision ``AP@k = sum over hits of precision@pos /
  min(|rel_u|, k)``; its mean over users is MAP@k.
* ``mrr@k = 1 / pos`` of the first hit within the top ``k`` (0 without one).
* ``hit_rate@k = 1`` if the top ``k`` holds at least one hit.

Order and ties: the list order is the ``rank`` column alone; scores are never read, so
score ties are whatever order the recommender wrote into ``rank``. Ranks with gaps are
closed up (ranks 1, 3, 7 are positions 1, 2, 3). Two items at the same rank, or the same
item twice, in one user's list make the order ambiguous and raise ``InputError``.

Users: per-user ranking metrics cover exactly the users of ``truth`` (users with no
recommendations score 0 everywhere); users with recommendations but no relevant item are
left out, since recall and NDCG are undefined for them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import cast

import numpy as np
import polars as pl

from fusionrec.pipeline.errors import InputError

RANKING_METRICS = ("recall", "precision", "ndcg", "map", "mrr", "hit_rate")

ItemVectors = Mapping[str, Sequence[float] | np.ndarray] | tuple[Sequence[str], np.ndarray]


# ----------------------------------------------------------------------------- helpers

def paired_interval(a: np.ndarray, b: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a - b and its 95% paired bootstrap interval over users (rows of a and b)."""
    diff = a - b
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(n_boot, len(diff)))].mean(axis=1)
    return float(diff.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def _require(df: pl.DataFrame, columns: Iterable[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputError(f"{what} lacks column(s) {', '.join(missing)}; has {', '.join(df.columns)}",
                         field=missing[0])
    nulls = [c for c in columns if df[c].null_count() > 0]
    if nulls:
        raise InputError(f"{what} has empty values in column '{nulls[0]}'", field=nulls[0])


def check_ks(ks: int | Iterable[int]) -> tuple[int, ...]:
    """Cut-offs as a sorted tuple of distinct positive ints."""
    ks = (ks,) if isinstance(ks, int) else tuple(ks)
    if not ks or any(not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1 for k in ks):
        raise ValueError(f"cut-offs must be positive integers, got {ks!r}")
    return tuple(sorted({int(k) for k in ks}))


def ranked_lists(recs: pl.DataFrame, k: int | None = None) -> pl.DataFrame:
    """``user_id, item_id, pos`` with ``pos`` the 1-based position from ``rank``, cut at ``k``.

    An empty frame, even one without columns, is a run that recommended nothing.
    """
    if recs.height == 0:
        return pl.DataFrame(schema={"user_id": pl.String, "item_id": pl.String, "pos": pl.Int64})
    _require(recs, ("user_id", "item_id", "rank"), "recommendations")
    df = recs.select(
        pl.col("user_id").cast(pl.String),
        pl.col("item_id").cast(pl.String),
        pl.col("rank").cast(pl.Int64),
    )
    dup_rank = df.filter(pl.struct("user_id", "rank").is_duplicated())
    if dup_rank.height:
        row = dup_rank.row(0, named=True)
        raise InputError(f"recommendations: user {row['user_id']} has two items at rank {row['rank']}; "
                         "the order is ambiguous", field="rank")
    dup_item = df.filter(pl.struct("user_id", "item_id").is_duplicated())
    if dup_item.height:
        row = dup_item.row(0, named=True)
        raise InputError(f"recommendations: user {row['user_id']} gets item {row['item_id']} twice",
                         field="item_id")
    df = df.with_columns(pos=pl.col("rank").rank("ordinal").over("user_id").cast(pl.Int64)).drop("rank")
    if k is not None:
        df = df.filter(pl.col("pos") <= k)
    return df


def relevant_pairs(truth: pl.DataFrame) -> pl.DataFrame:
    """Distinct ``user_id, item_id`` pairs of the truth frame."""
    _require(truth, ("user_id", "item_id"), "truth")
    return truth.select(pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String)).unique()


def item_popularity(train: pl.DataFrame) -> pl.DataFrame:
    """``item_id, popularity``: number of distinct training users per item."""
    return (relevant_pairs(train).group_by("item_id").agg(pl.len().cast(pl.Int64).alias("popularity")))


def head_items(popularity: pl.DataFrame, n_items: int, share: float) -> pl.Series:
    """The head of a catalog of ``n_items``: the ``ceil(share * n_items)`` items of
    ``popularity`` (:func:`item_popularity`) with the most training users, ties by item id."""
    n_head = math.ceil(share * n_items)
    return popularity.sort(["popularity", "item_id"], descending=[True, False]).head(n_head)["item_id"]


# ----------------------------------------------------------------------------- ranking

def ranking_metrics(recs: pl.DataFrame, truth: pl.DataFrame, ks: int | Iterable[int] = (10, 20)
                    ) -> pl.DataFrame:
    """Per-user ``recall, precision, ndcg, map, mrr, hit_rate`` at each cut-off.

    One row per truth user, sorted by ``user_id``: ``user_id, n_relevant`` then
    ``<metric>@<k>`` (Float64) for each k. Definitions in the module docstring.
    """
    ks = check_ks(ks)
    lists = ranked_lists(recs, max(ks))
    rel = relevant_pairs(truth)
    per_user = rel.group_by("user_id").agg(pl.len().cast(pl.Int64).alias("n_relevant"))

    # Hits in list order; hit_no is the number of hits up to and including this position.
    hits = (
        lists.join(rel, on=["user_id", "item_id"], how="semi")
        .with_columns(hit_no=pl.col("pos").rank("ordinal").over("user_id").cast(pl.Int64))
        .with_columns(
            disc=1.0 / (pl.col("pos") + 1).cast(pl.Float64).log(2),
            prec=pl.col("hit_no") / pl.col("pos"),
        )
    )
    kmax = max(ks)
    idcg = pl.DataFrame({
        "_m": np.arange(kmax + 1, dtype=np.int64),
        "_idcg": np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(2, kmax + 2)))]),
    })

    cols: list[pl.Expr] = []
    for k in ks:
        agg = (
            hits.filter(pl.col("pos") <= k)
            .group_by("user_id")
            .agg(
                pl.len().cast(pl.Int64).alias(f"_hits{k}"),
                pl.col("disc").sum().alias(f"_dcg{k}"),
                pl.col("prec").sum().alias(f"_ap{k}"),
                pl.col("pos").min().alias(f"_first{k}"),
            )
        )
        per_user = (
            per_user.join(agg, on="user_id", how="left")
            .with_columns(pl.min_horizontal(pl.col("n_relevant"), pl.lit(k)).cast(pl.Int64).alias("_m"))
            .join(idcg, on="_m", how="left")
            .rename({"_idcg": f"_idcg{k}", "_m": f"_m{k}"})
        )
        hits_k = pl.col(f"_hits{k}").fill_null(0).cast(pl.Float64)
        cols += [
            (hits_k / pl.col("n_relevant")).alias(f"recall@{k}"),
            (hits_k / k).alias(f"precision@{k}"),
            (pl.col(f"_dcg{k}").fill_null(0.0) / pl.col(f"_idcg{k}")).alias(f"ndcg@{k}"),
            (pl.col(f"_ap{k}").fill_null(0.0) / pl.col(f"_m{k}")).alias(f"map@{k}"),
            (1.0 / pl.col(f"_first{k}").cast(pl.Float64)).fill_null(0.0).alias(f"mrr@{k}"),
            (hits_k > 0).cast(pl.Float64).alias(f"hit_rate@{k}"),
        ]
    return per_user.select("user_id", "n_relevant", *cols).sort("user_id")


def metric_columns(per_user: pl.DataFrame) -> list[str]:
    """Metric columns of a per-user frame: those named ``<metric>@<k>``."""
    return [c for c in per_user.columns if "@" in c]


def summarise(per_user: pl.DataFrame) -> dict[str, float]:
    """Mean over users of every ``<metric>@<k>`` column (nulls skipped) plus ``n_users``.

    With no users every mean is NaN.
    """
    cols = metric_columns(per_user)
    out: dict[str, float] = {"n_users": int(per_user.height)}
    if per_user.height == 0:
        out.update({c: math.nan for c in cols})
        return out
    means = per_user.select(pl.col(cols).cast(pl.Float64).fill_nan(None).mean()).row(0, named=True)
    out.update({c: (math.nan if v is None else float(v)) for c, v in means.items()})
    return out


# ----------------------------------------------------------------------------- beyond accuracy

def coverage(recs: pl.DataFrame, n_items: int, k: int | None = None) -> float:
    """Catalog coverage: distinct items in the top-``k`` lists over ``n_items``."""
    if n_items <= 0:
        raise ValueError(f"n_items must be positive, got {n_items}")
    return ranked_lists(recs, k)["item_id"].n_unique() / n_items


def novelty(recs: pl.DataFrame, train: pl.DataFrame, k: int | None = None) -> float:
    """Mean self-information ``-log2(pop(i))`` of recommended items.

    ``pop(i)`` is the share of training users who interacted with ``i``; an item no training
    user touched counts as one user (the largest self-information, not infinity). Averaged
    within each user's list, then over users. NaN without recommendations.
    """
    lists = ranked_lists(recs, k)
    n_users = relevant_pairs(train)["user_id"].n_unique()
    if lists.height == 0 or n_users == 0:
        return math.nan
    info = (
        lists.join(item_popularity(train), on="item_id", how="left")
        .with_columns(info=-(pl.col("popularity").fill_null(1).clip(lower_bound=1) / n_users).log(2))
        .group_by("user_id").agg(pl.col("info").mean())
    )
    return float(cast(float, info["info"].mean()))


def _vector_table(item_vectors: ItemVectors) -> tuple[pl.DataFrame, np.ndarray]:
    """Item id index frame and the row-normalised matrix; zero vectors are dropped."""
    if isinstance(item_vectors, tuple):
        ids, matrix = item_vectors
        ids = [str(i) for i in ids]
        matrix = np.asarray(matrix, dtype=np.float64)
    else:
        ids = [str(i) for i in item_vectors.keys()]
        matrix = (np.stack([np.asarray(v, dtype=np.float64) for v in item_vectors.values()])
                  if ids else np.zeros((0, 1)))
    if matrix.ndim != 2 or matrix.shape[0] != len(ids):
        raise ValueError(f"item vectors: {len(ids)} ids but a matrix of shape {matrix.shape}")
    if len(set(ids)) != len(ids):
        raise ValueError("item vectors: duplicate item ids")
    norms = np.linalg.norm(matrix, axis=1)
    keep = norms > 0
    index = pl.DataFrame({"item_id": ids, "_vi": np.arange(len(ids), dtype=np.int64)}).filter(pl.Series(keep))
    return index, matrix / np.where(keep, norms, 1.0)[:, None]


def intra_list_diversity_per_user(recs: pl.DataFrame, item_vectors: ItemVectors,
                                  k: int | None = None) -> pl.DataFrame:
    """``user_id, ild``: mean pairwise cosine distance ``1 - cos`` within each list.

    Items without a (non-zero) vector are left out of their list; a list with fewer than two
    such items has ``ild`` null.
    """
    index, unit = _vector_table(item_vectors)
    rows = ranked_lists(recs, k).join(index, on="item_id", how="inner")
    users = rows.select("user_id").unique().sort("user_id").with_row_index("_ui")
    if rows.height == 0:
        return pl.DataFrame({"user_id": users["user_id"], "ild": pl.Series([], dtype=pl.Float64)})
    rows = rows.join(users, on="user_id")
    codes = rows["_ui"].to_numpy().astype(np.int64)
    # sum_{i<j} cos(v_i, v_j) = (|sum v|^2 - n) / 2 for unit vectors: no pairwise loop.
    sums = np.zeros((users.height, unit.shape[1]))
    np.add.at(sums, codes, unit[rows["_vi"].to_numpy()])
    n = np.bincount(codes, minlength=users.height).astype(np.float64)
    pairs = n * (n - 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        ild = 1.0 - ((sums ** 2).sum(axis=1) - n) / 2 / pairs
    return pl.DataFrame({"user_id": users["user_id"], "ild": np.where(n >= 2, ild, np.nan)}).with_columns(
        pl.col("ild").fill_nan(None))


def intra_list_diversity(recs: pl.DataFrame, item_vectors: ItemVectors, k: int | None = None) -> float:
    """Mean over users (with at least two embedded items) of :func:`intra_list_diversity_per_user`."""
    ild = intra_list_diversity_per_user(recs, item_vectors, k)["ild"].drop_nulls()
    return float(cast(float, ild.mean())) if ild.len() else math.nan


def exposure_counts(recs: pl.DataFrame, n_items: int | None = None, k: int | None = None) -> np.ndarray:
    """How often each catalog item is recommended (ascending), zeros for never-shown items.

    The catalog has ``n_items`` items (at least the number of distinct recommended items).
    """
    counts = ranked_lists(recs, k).group_by("item_id").agg(pl.len())["len"].to_numpy().astype(np.int64)
    n = max(int(n_items or 0), counts.size)
    return np.sort(np.concatenate([counts, np.zeros(n - counts.size, dtype=np.int64)]))


def gini(values: np.ndarray) -> float:
    """Gini coefficient of non-negative values (0 equal, 1 all on one); NaN if all zero/empty."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    n, total = x.size, x.sum()
    if n == 0 or total <= 0:
        return math.nan
    i = np.arange(1, n + 1)
    return float(((2 * i - n - 1) * x).sum() / (n * total))


def lorenz_curve(recs: pl.DataFrame, n_items: int | None = None, k: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Lorenz curve of exposure: cumulative share of items (least shown first) against share of slots."""
    x = exposure_counts(recs, n_items, k).astype(np.float64)
    total = x.sum()
    cum = np.concatenate([[0.0], np.cumsum(x) / total]) if total > 0 else np.zeros(x.size + 1)
    return np.linspace(0.0, 1.0, x.size + 1), cum


def popularity_bias(recs: pl.DataFrame, train: pl.DataFrame, k: int | None = None,
                    n_items: int | None = None, head_fraction: float = 0.2) -> dict[str, float]:
    """Popularity bias of the lists.

    * ``gini``: Gini of exposure counts over the catalog (``n_items``; default the distinct
      items of train and recs), never-recommended items counting 0.
    * ``mean_popularity``: mean over recommendation slots of the item's number of training users.
    * ``long_tail_share``: share of slots whose item is outside the head, the head being the
      top ``head_fraction`` of the catalog by training popularity (ties broken by item id;
      items with no training user are always tail).
    """
    lists = ranked_lists(recs, k)
    pop = item_popularity(train)
    catalog = n_items or pl.concat([pop["item_id"], lists["item_id"]]).n_unique()
    if lists.height == 0:
        return {"gini": math.nan, "mean_popularity": math.nan, "long_tail_share": math.nan}
    head = head_items(pop, catalog, head_fraction).to_frame()
    slots = lists.join(pop, on="item_id", how="left").with_columns(pl.col("popularity").fill_null(0))
    in_head = slots.join(head, on="item_id", how="semi").height
    return {
        "gini": gini(exposure_counts(recs, catalog, k)),
        "mean_popularity": float(cast(float, slots["popularity"].mean())),
        "long_tail_share": 1.0 - in_head / slots.height,
    }


def _label_mix(pairs: pl.DataFrame, items: pl.DataFrame, field: str) -> pl.DataFrame:
    """``user_id, label, share``: the mean over each user's labelled items of 1/|labels| per label."""
    labels = (items.select(pl.col("item_id").cast(pl.String), pl.col(field).cast(pl.String).str.split("|")
                           .list.eval(pl.element().str.strip_chars()).list.eval(pl.element().filter(pl.element() != ""))
                           .list.unique().alias("label"))
              .filter(pl.col("label").list.len() > 0)
              .with_columns((1.0 / pl.col("label").list.len()).alias("w")).explode("label"))
    rows = pairs.join(labels, on="item_id", how="inner")
    n = rows.select("user_id", "item_id").unique().group_by("user_id").agg(pl.len().alias("n"))
    return rows.group_by("user_id", "label").agg(pl.col("w").sum()).join(n, on="user_id") \
        .select("user_id", "label", (pl.col("w") / pl.col("n")).alias("share"))


def calibration_kl_per_user(recs: pl.DataFrame, history: pl.DataFrame, items: pl.DataFrame, field: str = "tags",
                            k: int | None = None, alpha: float = 0.01) -> pl.DataFrame:
    """``user_id, calibration_kl``: Steck's (2018) miscalibration of each top-``k`` list.

    ``KL(p || q~)`` with p the genre/tag mix of the user's ``history`` and q the list's (each
    item's ``|``-separated ``field`` labels weighing 1/|labels|, averaged over labelled items),
    ``q~ = (1 - alpha) q + alpha p``. 0 is a list whose mix is the history's; users without a
    labelled history item are left out; a list without a labelled item scores ``log(1/alpha)``.
    """
    lists = ranked_lists(recs, k).select("user_id", "item_id")
    hist = relevant_pairs(history)
    p = _label_mix(hist, items, field)
    q = _label_mix(lists, items, field).rename({"share": "q"})
    users = lists.select("user_id").unique().join(p.select("user_id").unique(), on="user_id", how="semi")
    joined = p.join(users, on="user_id", how="semi").join(q, on=["user_id", "label"], how="left") \
        .with_columns(pl.col("q").fill_null(0.0))
    kl = joined.group_by("user_id").agg(
        (pl.col("share") * (pl.col("share") / ((1 - alpha) * pl.col("q") + alpha * pl.col("share"))).log())
        .sum().alias("calibration_kl"))
    return kl.sort("user_id")


def calibration_kl(recs: pl.DataFrame, history: pl.DataFrame, items: pl.DataFrame, field: str = "tags",
                   k: int | None = None, alpha: float = 0.01) -> float:
    """Mean over users of :func:`calibration_kl_per_user` (NaN without a user to score)."""
    kl = calibration_kl_per_user(recs, history, items, field, k, alpha)["calibration_kl"]
    return float(cast(float, kl.mean())) if kl.len() else math.nan


def rmse(pred: pl.DataFrame, truth: pl.DataFrame, column: str = "score") -> float:
    """Root mean squared error of ``pred[column]`` against ``truth.value`` on shared pairs.

    Truth rows without a value are skipped; a pair rated twice counts with its mean rating.
    NaN when no pair is shared. A pair predicted twice raises ``InputError``.
    """
    _require(pred, ("user_id", "item_id", column), "predictions")
    _require(truth, ("user_id", "item_id"), "truth")
    if "value" not in truth.columns:
        raise InputError("truth lacks column value (ratings)", field="value")
    p = pred.select(pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String),
                    pl.col(column).cast(pl.Float64).alias("_pred"))
    if p.select(pl.struct("user_id", "item_id").is_duplicated().any()).item():
        raise InputError("predictions: a (user_id, item_id) pair appears twice", field="item_id")
    t = (truth.select(pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String),
                      pl.col("value").cast(pl.Float64))
         .drop_nulls("value").group_by("user_id", "item_id").agg(pl.col("value").mean()))
    joined = p.join(t, on=["user_id", "item_id"], how="inner")
    if joined.height == 0:
        return math.nan
    return float(math.sqrt(joined.select(((pl.col("_pred") - pl.col("value")) ** 2).mean()).item()))
