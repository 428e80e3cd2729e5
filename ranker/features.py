"""Ranker features for (user, candidate) pairs, built with Polars over whole columns.

`behaviour_features` adds item, user and user-item features to the stage-1 candidates.
It keeps only interactions with `timestamp < cutoff`, so nothing at or after the
label window's start can leak into a feature (tests/ranker/test_features.py checks it).

Cold values: an unknown user or item gets 0 for counts and null for anything that is
undefined without history (means, days since, shares); LightGBM treats null as missing.

Feature names carry their group in their prefix (see `feature_group`):
`sim_<m>` and `attn_<m>` belong to modality `<m>`, `retrieval_*` to the fused stage-1
score, `item_*`, `user_*` and `pair_*` to item, user and user-item behaviour.
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

from fusionrec.pipeline.errors import InputError
from fusionrec.pipeline.retrieval.sources import item_tags, numeric_strings
from fusionrec.pipeline.splits import tie_order

DAY = 86_400
DEFAULT_WINDOWS = (1, 7, 30)

# Prefix -> group. sim_/attn_ map to the modality named after the prefix.
FEATURE_GROUPS: dict[str, str] = {
    "retrieval_": "retrieval",
    "src_": "sources",
    "item_": "item",
    "user_": "user",
    "pair_": "user_item",
}
MODALITY_PREFIXES = ("sim_", "attn_")
# Columns that look like features by prefix but are ids or outputs.
NOT_FEATURES = frozenset({"user_id", "item_id", "label", "score", "rank", "timestamp"})


def feature_group(name: str) -> str | None:
    """The group of a feature column (modality name, retrieval, item, user, user_item); None if not a feature."""
    if name in NOT_FEATURES:
        return None
    for prefix in MODALITY_PREFIXES:
        if name.startswith(prefix) and len(name) > len(prefix):
            return name[len(prefix):]
    for prefix, group in FEATURE_GROUPS.items():
        if name.startswith(prefix):
            return group
    return None


def is_modality_group(group: str) -> bool:
    return group not in FEATURE_GROUPS.values()


def feature_columns(frame: pl.DataFrame | pl.Schema) -> list[str]:
    """Numeric columns of `frame` that are features, in frame order."""
    schema = frame.schema if isinstance(frame, pl.DataFrame) else frame
    return [name for name, dtype in schema.items()
            if feature_group(name) is not None and (dtype.is_numeric() or dtype == pl.Boolean)]


def behaviour_features(pairs: pl.DataFrame, interactions: pl.DataFrame, items: pl.DataFrame | None,
                       cutoff: int, *, windows: Sequence[int] = DEFAULT_WINDOWS, last_n: int = 10,
                       cooc_history: int = 200, price_bins: int = 5, price_column: str = "price",
                       brand_column: str = "brand") -> pl.DataFrame:
    """`pairs` (user_id, item_id, stage-1 columns...) plus behaviour feature columns, row order kept.

    Only interactions with `timestamp < cutoff` are used. `last_n`: how many of the user's
    most recent distinct items the co-occurrence features look at; `cooc_history`: each
    user's most recent distinct items counted when building item-item co-occurrence
    (bounds the self-join on heavy users).
    """
    for column in ("user_id", "item_id"):
        if column not in pairs.columns:
            raise InputError("the candidate pairs have no such column", field=column)
    cutoff = int(cutoff)
    base = pairs.with_columns(pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String))
    inter = _past(interactions, cutoff)

    # Integer codes make the pair-level joins cheap; both sides share one vocabulary.
    # Codes follow id order, so they do not depend on the order of `pairs`.
    users = pl.concat([base.select("user_id"), inter.select("user_id")]).unique().sort("user_id") \
        .with_row_index("u")
    item_vocab = [base.select("item_id"), inter.select("item_id")]
    if items is not None and "item_id" in items.columns:
        item_vocab.append(items.select(pl.col("item_id").cast(pl.String)))
    item_codes = pl.concat(item_vocab).unique().sort("item_id").with_row_index("i")
    p = base.select("user_id", "item_id").with_row_index("row") \
        .join(users, on="user_id", how="left", maintain_order="left") \
        .join(item_codes, on="item_id", how="left", maintain_order="left").select("row", "u", "i")
    joined = inter.join(users, on="user_id", how="inner").join(item_codes, on="item_id", how="inner")
    ev = joined.select("u", "i", "timestamp", "value")
    # Equal timestamps keep the log's one tie order (`splits.tie_order`), not the codes' id
    # order: one key per distinct (user, item) pair.
    distinct = joined.select("u", "i", "user_id", "item_id").unique(subset=["u", "i"])
    ties = distinct.select("u", "i").with_columns(
        pl.Series("tie", tie_order(distinct["user_id"], distinct["item_id"]), dtype=pl.UInt64))

    wanted = p.select("u", "i").unique()  # the distinct pairs the pair-level features are built for
    out = p
    out = out.join(_item_stats(ev, cutoff, windows), on="i", how="left", maintain_order="left")
    out = out.join(_user_stats(ev, cutoff, windows), on="u", how="left", maintain_order="left")
    out = out.join(_pair_counts(ev, wanted), on=["u", "i"], how="left", maintain_order="left")
    out = out.join(_cooccurrence(ev, ties, wanted, last_n, cooc_history), on=["u", "i"], how="left",
                   maintain_order="left")
    # Every integer feature so far is a count: cold users and items have 0.
    counts = [c for c, t in out.schema.items() if c not in ("row", "u", "i") and t.is_integer()]
    out = out.with_columns(pl.col(c).fill_null(0) for c in counts)
    if "item_cnt_7d" in out.columns and "item_cnt_30d" in out.columns:
        # Smoothed ratio of last week's daily rate to the last month's: 1 = steady, >1 = rising.
        out = out.with_columns(((pl.col("item_cnt_7d") + 1) / (pl.col("item_cnt_30d") * 7 / 30 + 1))
                               .cast(pl.Float32).alias("item_trend"))

    if items is not None and "item_id" in items.columns:
        wanted_cols = [c for c in ("tags", price_column, brand_column) if c in items.columns]
        it = items.select(pl.col("item_id").cast(pl.String), *wanted_cols) \
            .join(item_codes, on="item_id", how="inner")
        hist = ev.select("u", "i").unique()
        if "tags" in it.columns:
            tag_feats, user_tags = _tag_features(it, hist, wanted)
            out = out.join(tag_feats, on=["u", "i"], how="left", maintain_order="left") \
                .join(user_tags, on="u", how="left", maintain_order="left") \
                .with_columns(pl.col("user_tags").fill_null(0))
        if price_column in it.columns:
            out = out.join(_price_features(it, hist, wanted, price_column, price_bins), on=["u", "i"],
                           how="left", maintain_order="left")
        if brand_column in it.columns:
            out = out.join(_brand_features(it, hist, wanted, brand_column), on=["u", "i"], how="left",
                           maintain_order="left")

    if not out["row"].is_sorted():  # left joins keep the order; this is only a safety net
        out = out.sort("row")
    out = out.drop("row", "u", "i")
    # Recomputing on a frame that already has these features replaces them.
    return pl.concat([base.drop([c for c in out.columns if c in base.columns]), out], how="horizontal")


def _past(interactions: pl.DataFrame, cutoff: int) -> pl.DataFrame:
    """Interactions strictly before `cutoff`, with the columns the features need."""
    value = pl.col("value").cast(pl.Float64) if "value" in interactions.columns else pl.lit(None, pl.Float64)
    return interactions.filter(pl.col("timestamp") < cutoff).select(
        pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String),
        pl.col("timestamp").cast(pl.Int64), value.alias("value"))


def _window_counts(prefix: str, cutoff: int, windows: Sequence[int]) -> list[pl.Expr]:
    return [(pl.col("timestamp") >= cutoff - int(w) * DAY).sum().cast(pl.Int32).alias(f"{prefix}_cnt_{w}d")
            for w in windows] + [pl.len().cast(pl.Int32).alias(f"{prefix}_cnt_all")]


def _days_since(expr: pl.Expr, cutoff: int) -> pl.Expr:
    return ((cutoff - expr) / DAY).cast(pl.Float32)


def _item_stats(ev: pl.DataFrame, cutoff: int, windows: Sequence[int]) -> pl.DataFrame:
    return ev.group_by("i").agg(
        *_window_counts("item", cutoff, windows),
        pl.col("u").n_unique().cast(pl.Int32).alias("item_users"),
        pl.col("value").mean().cast(pl.Float32).alias("item_mean_rating"),
        pl.col("value").count().cast(pl.Int32).alias("item_rating_count"),
        _days_since(pl.col("timestamp").min(), cutoff).alias("item_days_since_first"),
        _days_since(pl.col("timestamp").max(), cutoff).alias("item_days_since_last"),
    )


def _user_stats(ev: pl.DataFrame, cutoff: int, windows: Sequence[int]) -> pl.DataFrame:
    return ev.group_by("u").agg(
        *_window_counts("user", cutoff, windows),
        pl.col("i").n_unique().cast(pl.Int32).alias("user_items"),
        # Variety: distinct items per interaction (1 = never repeats, near 0 = replays a few items).
        (pl.col("i").n_unique() / pl.len()).cast(pl.Float32).alias("user_item_variety"),
        pl.col("value").mean().cast(pl.Float32).alias("user_mean_rating"),
        pl.col("value").count().cast(pl.Int32).alias("user_rating_count"),
        _days_since(pl.col("timestamp").max(), cutoff).alias("user_days_since_last"),
    )


def _pair_counts(ev: pl.DataFrame, wanted: pl.DataFrame) -> pl.DataFrame:
    """How often the user already interacted with the candidate (repeat consumption)."""
    return ev.join(wanted, on=["u", "i"], how="semi").group_by("u", "i").agg(
        pl.len().cast(pl.Int32).alias("pair_user_item_count"))


def _newest_first(ev: pl.DataFrame, ties: pl.DataFrame) -> pl.DataFrame:
    """Each user's distinct items (u, i), newest first (equal times: the larger key of `ties` is later)."""
    return ev.group_by("u", "i").agg(pl.col("timestamp").max().alias("last")).join(ties, on=["u", "i"]) \
        .sort(["u", "last", "tie", "i"], descending=[False, True, True, True]).select("u", "i")


def _cooccurrence(ev: pl.DataFrame, ties: pl.DataFrame, wanted: pl.DataFrame, last_n: int, cooc_history: int
                  ) -> pl.DataFrame:
    """Sum and max over the user's last `last_n` items h != candidate of #users who had both.

    Item-item counts come from a self-join of (user, item) on user, limited to candidate
    items on one side and recent-history items on the other. The (candidate, history
    item) pair is packed into one UInt64 key: single-key joins are much cheaper.
    """
    newest = _newest_first(ev, ties)  # ordered once, cut twice
    recent = newest.group_by("u", maintain_order=True).head(last_n).rename({"i": "h"})
    capped = newest.group_by("u", maintain_order=True).head(cooc_history)
    key = (pl.col("i").cast(pl.UInt64) * (1 << 32) + pl.col("h").cast(pl.UInt64)).alias("k")
    left = capped.join(wanted.select("i").unique(), on="i", how="semi")
    right = capped.join(recent.select(pl.col("h").alias("i")).unique(), on="i", how="semi").rename({"i": "h"})
    counts = left.lazy().join(right.lazy(), on="u").filter(pl.col("i") != pl.col("h")).select(key) \
        .group_by("k").agg(pl.len().cast(pl.Int32).alias("n"))
    # Pairs without any co-occurring history item drop out here; the caller fills 0.
    return wanted.lazy().join(recent.lazy(), on="u").filter(pl.col("i") != pl.col("h")) \
        .select("u", "i", key).join(counts, on="k", how="inner").group_by("u", "i").agg(
            pl.col("n").sum().cast(pl.Int32).alias("pair_cooc_sum"),
            pl.col("n").max().cast(pl.Int32).alias("pair_cooc_max")).collect()


def _tag_features(it: pl.DataFrame, hist: pl.DataFrame, wanted: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """pair_tag_affinity: share of the user's history tag occurrences that the candidate's tags cover.

    Each distinct history item contributes each of its tags once. Also user_tag_entropy
    (Shannon, natural log) and user_tags (distinct tags) as measures of how varied the history is.
    """
    tags = item_tags(it.select("i", "tags"))
    # Tags as integer codes; (user, tag) packed into one UInt64 key for the big join below.
    codes = tags.select("tag").unique().sort("tag").with_row_index("t")
    tags = tags.join(codes, on="tag").select("i", "t")
    user_tag = hist.join(tags, on="i", how="inner").group_by("u", "t").agg(pl.len().alias("n"))
    totals = user_tag.group_by("u").agg(pl.col("n").sum().alias("total"))
    users = user_tag.join(totals, on="u").with_columns((pl.col("n") / pl.col("total")).alias("p")) \
        .group_by("u").agg((-(pl.col("p") * pl.col("p").log()).sum()).cast(pl.Float32).alias("user_tag_entropy"),
                           pl.len().cast(pl.Int32).alias("user_tags"))
    key = (pl.col("u").cast(pl.UInt64) * (1 << 32) + pl.col("t").cast(pl.UInt64)).alias("k")
    # (pair, candidate tag) rows meet the user's tag counts; tags the user never met drop out.
    covered = wanted.lazy().join(tags.lazy(), on="i", how="inner").select("u", "i", key) \
        .join(user_tag.lazy().select(key, "n"), on="k", how="inner") \
        .group_by("u", "i").agg(pl.col("n").sum().alias("covered")).collect()
    # Null when the user has no tagged history (undefined), 0 when nothing is covered.
    pair = wanted.join(totals, on="u", how="left").join(covered, on=["u", "i"], how="left").select(
        "u", "i", (pl.col("covered").fill_null(0) / pl.col("total")).cast(pl.Float32).alias("pair_tag_affinity"))
    return pair, users


def _price_features(it: pl.DataFrame, hist: pl.DataFrame, wanted: pl.DataFrame, column: str,
                    bins: int) -> pl.DataFrame:
    """item_price_band (quantile bin over the catalogue, 0-based) and pair_price_band_match.

    The user's usual band is the most frequent band among their distinct history items
    (ties: the lower band). The match is null when either band is unknown.
    """
    price = it.select("i", pl.col(column).cast(pl.Float64, strict=False).alias("price")).drop_nulls()
    if price.height == 0:
        return wanted.with_columns(pl.lit(None, pl.Int8).alias("item_price_band"),
                                                        pl.lit(None, pl.Int8).alias("pair_price_band_match"))
    # Band = how many of the catalogue's inner quantile edges lie strictly below the price.
    edges = price.select(pl.col("price").quantile(b / bins, "linear").alias(str(b))
                         for b in range(1, bins)).row(0) if bins > 1 else ()
    band = price.select("i", pl.sum_horizontal([(pl.col("price") > e).cast(pl.Int8) for e in edges] or [pl.lit(0)])
                        .cast(pl.Int8).alias("band"))
    usual = hist.join(band, on="i", how="inner").group_by("u", "band").agg(pl.len().alias("n")) \
        .sort(["u", "n", "band"], descending=[False, True, False]).group_by("u", maintain_order=True).first() \
        .select("u", pl.col("band").alias("user_band"))
    return wanted.join(band, on="i", how="left").join(usual, on="u", how="left").select(
        "u", "i", pl.col("band").alias("item_price_band"),
        (pl.col("band") == pl.col("user_band")).cast(pl.Int8).alias("pair_price_band_match"))


def _brand_features(it: pl.DataFrame, hist: pl.DataFrame, wanted: pl.DataFrame, column: str) -> pl.DataFrame:
    """pair_brand_match: 1 if the candidate's brand is among the brands of the user's history, else 0.

    Null when the candidate has no brand or the user has no branded history.
    """
    brand = it.select("i", pl.col(column).cast(pl.String).str.strip_chars().alias("brand")) \
        .filter(pl.col("brand").is_not_null() & (pl.col("brand") != ""))
    user_brands = hist.join(brand, on="i", how="inner").select("u", "brand").unique()
    has_brand = user_brands.select("u").unique().with_columns(pl.lit(True).alias("has"))
    hit = user_brands.with_columns(pl.lit(1, pl.Int8).alias("hit"))
    return wanted.join(brand, on="i", how="left").join(has_brand, on="u", how="left") \
        .join(hit, on=["u", "brand"], how="left").select(
            "u", "i", pl.when(pl.col("brand").is_null() | pl.col("has").is_null()).then(None)
            .otherwise(pl.col("hit").fill_null(0)).cast(pl.Int8).alias("pair_brand_match"))


def user_attribute_features(pairs: pl.DataFrame, users: pl.DataFrame | None, *, max_levels: int = 50) -> pl.DataFrame:
    """`pairs` plus `user_attr_<column>` for every extra column of the users table.

    Numeric columns are taken as they are; string columns with at most `max_levels`
    values become integer codes in sorted order (LightGBM splits on them; a zip code with
    hundreds of values is left out). Unknown users get nulls.
    """
    if users is None or users.height == 0:
        return pairs
    skip = {"user_id", "text", "image", "audio"}
    exprs: list[pl.Expr] = []
    users = numeric_strings(users)
    for name, dtype in users.schema.items():
        if name in skip:
            continue
        if dtype.is_numeric():
            exprs.append(pl.col(name).cast(pl.Float32).alias(f"user_attr_{name}"))
        elif dtype in (pl.String, pl.Categorical):
            levels = sorted(users[name].cast(pl.String).drop_nulls().unique().to_list())
            if 2 <= len(levels) <= max_levels:
                exprs.append(pl.col(name).cast(pl.String).replace_strict(
                    levels, list(range(len(levels))), default=None, return_dtype=pl.Int32).alias(f"user_attr_{name}"))
    if not exprs:
        return pairs
    attrs = users.select(pl.col("user_id").cast(pl.String), *exprs).unique("user_id", keep="first")
    return pairs.with_columns(pl.col("user_id").cast(pl.String)).join(attrs, on="user_id", how="left",
                                                                      maintain_order="left")

