"""Training labels from a time window later than the features.

Features use interactions before `start` (the cutoff); labels use only [start, end).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, cast

import polars as pl

# Graded relevance per event; the strongest event in the window wins.
DEFAULT_EVENT_GAIN: dict[str, int] = {
    "purchase": 4, "buy": 4, "order": 4,
    "cart": 3, "add_to_cart": 3, "wishlist": 2,
    "click": 2, "play": 2, "listen": 1, "rate": 1,
    "view": 1, "interact": 1,
}
DEFAULT_GAIN = 1  # events not in the table


def infer_rating_scale(interactions: pl.DataFrame, max_levels: int = 10) -> tuple[int, int] | None:
    """(lowest, highest) rating when `value` looks like an integer rating scale, else None."""
    if "value" not in interactions.columns:
        return None
    values = interactions["value"].drop_nulls()
    if values.len() == 0:
        return None
    if not bool((values == values.round()).all()):
        return None
    lo, hi = int(cast(int, values.min())), int(cast(int, values.max()))
    if hi <= lo or hi - lo + 1 > max_levels:
        return None
    return lo, hi


def make_labels(pairs: pl.DataFrame, interactions: pl.DataFrame, start: int, end: int | None = None, *,
                kind: Literal["gain", "binary", "rating"] = "gain",
                event_gain: Mapping[str, int] | None = None, default_gain: int = DEFAULT_GAIN,
                rating_scale: tuple[float, float] | None = None) -> pl.DataFrame:
    """`pairs` plus `label`, from interactions with start <= timestamp < end (end None: no upper bound).

    kind="gain": Int32 graded relevance, 0 for no interaction in the window. A rated
      interaction (value not null) with `rating_scale=(lo, hi)` gains round(value) - lo + 1
      (so 1..hi-lo+1); otherwise the event's gain from `event_gain`. The maximum over the
      window's interactions of the pair is the label.
    kind="binary": Int32 1 if the pair has any interaction in the window, else 0.
    kind="rating": Float64 mean `value` in the window; null when the pair has none
      (drop those rows before a regression fit).
    """
    gains = dict(DEFAULT_EVENT_GAIN if event_gain is None else event_gain)
    window = interactions.filter(pl.col("timestamp") >= int(start))
    if end is not None:
        window = window.filter(pl.col("timestamp") < int(end))
    event = pl.col("event").cast(pl.String) if "event" in window.columns else pl.lit("interact")
    value = pl.col("value").cast(pl.Float64) if "value" in window.columns else pl.lit(None, pl.Float64)
    window = window.select(pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String),
                           event.alias("event"), value.alias("value"))

    if kind == "gain":
        gain = pl.col("event").replace_strict(gains, default=default_gain, return_dtype=pl.Int32)
        if rating_scale is not None:
            lo, hi = rating_scale
            levels = int(round(hi - lo)) + 1
            rated = (pl.col("value").round() - round(lo) + 1).clip(1, levels).cast(pl.Int32)
            gain = pl.when(pl.col("value").is_not_null()).then(rated).otherwise(gain)
        per_pair = window.group_by("user_id", "item_id").agg(gain.max().alias("label"))
        fill: int | None = 0
    elif kind == "binary":
        per_pair = window.select("user_id", "item_id").unique().with_columns(pl.lit(1, pl.Int32).alias("label"))
        fill = 0
    elif kind == "rating":
        per_pair = window.group_by("user_id", "item_id").agg(pl.col("value").mean().alias("label"))
        fill = None
    else:
        raise ValueError(f"unknown label kind {kind!r}")

    keys = pairs.select(pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String))
    label = keys.join(per_pair, on=["user_id", "item_id"], how="left", maintain_order="left")["label"]
    if fill is not None:
        label = label.fill_null(fill).cast(pl.Int32)
    return pairs.drop("label", strict=False).with_columns(label.alias("label"))
