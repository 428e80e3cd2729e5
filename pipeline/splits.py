"""Train/test splits of an interactions frame (``user_id, item_id, timestamp, event, value``).

All splits order interactions by ``timestamp`` and break equal timestamps with a seeded hash
of ``(user_id, item_id)``, never by row order: shuffling the input rows gives the same split,
and another seed reorders only the ties. The hash is computed here from the id bytes (not
polars' ``hash``, which may change between polars versions), so a split is the same on every
machine. Both returned frames keep the input columns, in time order.

One module for every split: the retriever's weight search holds out with
`global_temporal_split`, the candidate sources label with `per_user_temporal_split`, and the
evaluation (`fusionrec.evaluation.splits` re-exports these) uses the same functions.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pyarrow as pa

from fusionrec.pipeline.errors import InputError

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_POLY = np.uint64(0x100000001B3)  # FNV prime: odd, so powers never collapse to 0 mod 2**64


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads every input bit over the output (uint64 arrays wrap)."""
    z = z.astype(np.uint64, copy=True)
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def stable_hash(values: pl.Series, seed: int = 0) -> np.ndarray:
    """uint64 hash of each string, stable across platforms and library versions.

    Polynomial hash of the UTF-8 bytes (mod 2**64), then seeded and mixed; vectorised over
    the Arrow buffers. Nulls hash like the empty string.
    """
    arr = pa.array(values.cast(pl.String).fill_null("").to_arrow()).cast(pa.large_string())
    if isinstance(arr, pa.ChunkedArray):  # pragma: no cover - depends on the polars version
        arr = arr.combine_chunks()
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset: arr.offset + n + 1]
    data_buf = arr.buffers()[2]
    data = (np.frombuffer(data_buf, dtype=np.uint8)[offsets[0]: offsets[-1]].astype(np.uint64)
            if data_buf is not None else np.zeros(0, dtype=np.uint64))
    starts = offsets[:-1] - offsets[0]
    lengths = np.diff(offsets)
    if data.size:
        owner = np.repeat(np.arange(n), lengths)
        position = np.arange(data.size) - starts[owner]
        powers = np.cumprod(np.full(int(lengths.max()), _POLY, dtype=np.uint64))
        # byte + 1 so that embedded zero bytes still count; position 0 gets POLY**1.
        terms = np.concatenate([(data + np.uint64(1)) * np.asarray(powers, dtype=np.uint64)[position],
                                np.zeros(1, dtype=np.uint64)])
        sums = np.add.reduceat(terms, np.minimum(starts, data.size))
        h = np.where(lengths > 0, sums, np.uint64(0)).astype(np.uint64)
    else:
        h = np.zeros(n, dtype=np.uint64)
    salt = _mix64(np.full(n, np.uint64(seed & 0xFFFFFFFFFFFFFFFF)) ^ lengths.astype(np.uint64)
                  + np.uint64(0x9E3779B97F4A7C15))  # golden-ratio offset: no fixed point at 0
    return _mix64(h ^ salt)


def _checked(interactions: pl.DataFrame) -> pl.DataFrame:
    missing = [c for c in ("user_id", "item_id", "timestamp") if c not in interactions.columns]
    if missing:
        raise InputError(f"interactions lack column(s) {', '.join(missing)}", field=missing[0])
    if not interactions.schema["timestamp"].is_integer():
        raise InputError(f"interactions: timestamp must be integer Unix seconds, got "
                         f"{interactions.schema['timestamp']}", field="timestamp")
    for c in ("user_id", "item_id", "timestamp"):
        if interactions[c].null_count():
            raise InputError(f"interactions have empty values in column '{c}'", field=c)
    return interactions


def tie_order(user_ids: pl.Series, item_ids: pl.Series, seed: int = 0) -> np.ndarray:
    """The order of equal timestamps: a seeded uint64 hash of each (user, item) pair.

    Neither the input rows' order nor the ids' own order reaches it. Ids are sometimes
    assigned with hindsight, and then their order says who interacted: Last.fm-2K numbers
    its artists in order of their first listener, so a user's own later artists sit among
    their earlier ones in id order. Every tie of the log (splits, the recent-item and
    sequence sources, the ranker's recent-item features) is broken by this one key.
    """
    return _mix64(stable_hash(user_ids, seed) * np.uint64(0x9E3779B97F4A7C15) + stable_hash(item_ids, seed))


def time_order(interactions: pl.DataFrame, seed: int = 0) -> pl.DataFrame:
    """Interactions in time order, equal timestamps in seeded-hash order (input row order unused)."""
    df = _checked(interactions)
    df = df.with_columns(pl.Series("_tie", tie_order(df["user_id"], df["item_id"], seed), dtype=pl.UInt64))
    # Remaining columns as last keys: identical (user, item, time) rows still order the same.
    rest = [c for c, t in df.schema.items() if c not in ("timestamp", "_tie", "user_id", "item_id")
            and (t.is_numeric() or t in (pl.String, pl.Boolean))]
    keys = ["timestamp", "_tie", "user_id", "item_id", *rest]
    return df.sort(keys, nulls_last=True).drop("_tie")


def _check_fraction(test_fraction: float) -> None:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")


def global_temporal_split(interactions: pl.DataFrame, test_fraction: float = 0.2, *, seed: int = 0,
                          cutoff: int | None = None, drop_unseen: bool = False
                          ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """One time cutoff for everyone: the latest ``test_fraction`` of all interactions is test.

    The test set has ``round(test_fraction * n)`` rows; interactions sharing the boundary
    timestamp are split by the seeded tie order. With ``cutoff`` (Unix seconds) instead,
    test is every interaction at or after it. Test rows of users or items absent from train
    are kept (the evaluation reports them as new users and cold items) unless ``drop_unseen``.
    """
    df = time_order(interactions, seed)
    if cutoff is None:
        _check_fraction(test_fraction)
        n_train = df.height - int(math.floor(test_fraction * df.height + 0.5))
        train, test = df.head(n_train), df.slice(n_train)
    else:
        train = df.filter(pl.col("timestamp") < cutoff)
        test = df.filter(pl.col("timestamp") >= cutoff)
    if drop_unseen:
        test = (test.join(train.select("user_id").unique(), on="user_id", how="semi")
                .join(train.select("item_id").unique(), on="item_id", how="semi"))
    return train, test


def _per_user(interactions: pl.DataFrame, n_test: pl.Expr, seed: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    df = time_order(interactions, seed).with_columns(
        _pos=pl.int_range(pl.len()).over("user_id"), _n=pl.len().over("user_id").cast(pl.Int64))
    df = df.with_columns(_test=pl.col("_pos") >= pl.col("_n") - n_test)
    helpers = ["_pos", "_n", "_test"]
    return df.filter(~pl.col("_test")).drop(helpers), df.filter(pl.col("_test")).drop(helpers)


def per_user_temporal_split(interactions: pl.DataFrame, test_fraction: float = 0.2, min_train: int = 1,
                            *, seed: int = 0) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Each user's latest ``round(test_fraction * n_u)`` interactions (halves up) are test.

    A user always keeps at least ``min_train`` interactions in train (so a user with
    ``min_train`` or fewer has none in test).
    """
    _check_fraction(test_fraction)
    if min_train < 0:
        raise ValueError(f"min_train must be >= 0, got {min_train}")
    wanted = (pl.col("_n").cast(pl.Float64) * test_fraction + 0.5).floor().cast(pl.Int64)
    return _per_user(interactions, pl.min_horizontal(wanted, pl.col("_n") - min_train).clip(lower_bound=0),
                     seed)


def leave_last_out(interactions: pl.DataFrame, n: int = 1, min_train: int = 1, *, seed: int = 0
                   ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Each user's last ``n`` interactions are test, keeping at least ``min_train`` in train."""
    if n < 1 or min_train < 0:
        raise ValueError(f"need n >= 1 and min_train >= 0, got n={n}, min_train={min_train}")
    return _per_user(interactions, pl.min_horizontal(pl.lit(n), pl.col("_n") - min_train).clip(lower_bound=0),
                     seed)
