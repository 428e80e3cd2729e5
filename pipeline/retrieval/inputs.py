"""Input normalisation for the Retriever: the interactions frame, the user id universe and id lists."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import polars as pl

from fusionrec.pipeline.errors import InputError

MODALITIES = dict[str, tuple[np.ndarray, np.ndarray]]
"""{modality: (ids, matrix)}, as `pipeline.retrieval.fusion.load_modalities` returns."""

INTERACTIONS_SCHEMA = {"user_id": pl.Utf8, "item_id": pl.Utf8, "timestamp": pl.Int64, "event": pl.Utf8,
                       "value": pl.Float64}


def listed_ids(ids: Iterable[str] | str) -> list[str]:
    """`ids` as a list of strings; one id given as a string is that id (a string is iterable, and
    each of its characters had become a user)."""
    return [ids] if isinstance(ids, str) else [str(i) for i in ids]


def as_interactions(df: pl.DataFrame) -> pl.DataFrame:
    """Columns of the interactions frame, with ids as strings and defaults filled in."""
    missing = {"user_id", "item_id"} - set(df.columns)
    if missing:
        raise InputError(f"interactions need columns {sorted(missing)}", field=sorted(missing)[0])
    cols = [pl.col("user_id").cast(pl.Utf8), pl.col("item_id").cast(pl.Utf8)]
    cols.append(pl.col("timestamp").cast(pl.Int64) if "timestamp" in df.columns
                else pl.lit(0, pl.Int64).alias("timestamp"))
    cols.append(pl.col("event").cast(pl.Utf8).str.to_lowercase() if "event" in df.columns
                else pl.lit("interact").alias("event"))
    cols.append(pl.col("value").cast(pl.Float64) if "value" in df.columns else pl.lit(None, pl.Float64).alias("value"))
    return df.select(cols).filter(pl.col("user_id").is_not_null() & pl.col("item_id").is_not_null())


def user_universe(inter: pl.DataFrame, user_content: MODALITIES) -> np.ndarray:
    """Every user with interactions or own content, sorted (object array of strings)."""
    ids = set(inter["user_id"].unique().to_list())
    for uids, _ in user_content.values():
        ids.update(np.asarray(uids).astype(str).tolist())
    return np.array(sorted(ids), dtype=object)
