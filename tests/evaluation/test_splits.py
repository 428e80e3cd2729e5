"""Temporal and leave-last-out splits: which rows go where, ties, seeds, determinism."""

from __future__ import annotations

import polars as pl
import pytest

from fusionrec.evaluation import splits as evaluation_splits
from fusionrec.pipeline import splits
from fusionrec.pipeline.errors import InputError
from fusionrec.pipeline.splits import (
    global_temporal_split,
    leave_last_out,
    per_user_temporal_split,
    stable_hash,
    time_order,
)

MASK = (1 << 64) - 1


def _mix(z: int) -> int:
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & MASK
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def reference_hash(s: str, seed: int) -> int:
    """The documented hash, one string at a time in plain Python."""
    h = 0
    for j, byte in enumerate(s.encode("utf-8")):
        h = (h + (byte + 1) * pow(0x100000001B3, j + 1, 1 << 64)) & MASK
    salt = _mix((seed & MASK) ^ ((len(s.encode("utf-8")) + 0x9E3779B97F4A7C15) & MASK))
    return _mix(h ^ salt)


def frame(rows: list[tuple[str, str, int]]) -> pl.DataFrame:
    return pl.DataFrame(
        [(u, i, t, "view", float(n)) for n, (u, i, t) in enumerate(rows)],
        schema={"user_id": pl.String, "item_id": pl.String, "timestamp": pl.Int64, "event": pl.String,
                "value": pl.Float64}, orient="row")


def keys(df: pl.DataFrame) -> list[tuple[str, str, int]]:
    return list(zip(df["user_id"], df["item_id"], df["timestamp"]))


def test_stable_hash_matches_reference_and_pinned_values() -> None:
    words = ["a", "abc", "", "user_42", "é", "日本語", "x" * 300, "\x00"]
    for seed in (0, 7, 2**63 + 5):
        got = stable_hash(pl.Series(words), seed).tolist()
        assert got == [reference_hash(w, seed) for w in words]
    # Pinned: a split made today is the same on any machine and polars version tomorrow.
    assert stable_hash(pl.Series(["a", "abc", "", "user_42"]), 0).tolist() == [
        9274374675695316127, 12239197854040402693, 5197578548964807871, 3706736340744126128]
    assert stable_hash(pl.Series([None, ""]), 0).tolist()[0] == stable_hash(pl.Series([""]), 0).tolist()[0]


def test_global_split_takes_the_latest_fraction() -> None:
    rows = [(f"u{n % 3}", f"i{n}", 100 + n) for n in range(10)]
    df = frame(rows)
    train, test = global_temporal_split(df, 0.2)
    assert keys(test) == rows[8:]
    assert keys(train) == rows[:8]
    assert train["timestamp"].max() < test["timestamp"].min()
    assert train.columns == df.columns and train.schema == df.schema
    train, test = global_temporal_split(df, 0.25)  # 2.5 rows rounds half up to 3
    assert test.height == 3


def test_global_split_with_explicit_cutoff() -> None:
    df = frame([("u", "a", 0), ("u", "b", 1), ("v", "a", 1), ("v", "c", 2)])
    train, test = global_temporal_split(df, cutoff=1)
    assert keys(train) == [("u", "a", 0)]
    assert sorted(keys(test)) == [("u", "b", 1), ("v", "a", 1), ("v", "c", 2)]


def test_ties_broken_by_seeded_hash_not_row_order() -> None:
    rows = [(f"u{n}", f"i{n}", 5) for n in range(12)] + [("w", "z", 1)]  # 12 rows tied at the boundary
    df = frame(rows)
    splits = {}
    for seed in range(6):
        train, test = global_temporal_split(df, 0.25, seed=seed)
        shuffled = global_temporal_split(df.sample(fraction=1.0, shuffle=True, seed=seed + 100), 0.25, seed=seed)
        assert keys(shuffled[0]) == keys(train) and keys(shuffled[1]) == keys(test)
        assert sorted(keys(train) + keys(test)) == sorted(rows)  # nothing lost or doubled
        assert ("w", "z", 1) in keys(train)
        splits[seed] = frozenset(keys(test))
    assert len(set(splits.values())) > 1  # another seed picks other tied rows


def test_time_order_is_total_even_for_duplicate_rows() -> None:
    df = pl.DataFrame({"user_id": ["u", "u", "u"], "item_id": ["a", "a", "a"], "timestamp": [3, 3, 3],
                       "event": ["view", "cart", "view"], "value": [None, 1.0, 2.0]})
    a = time_order(df)
    b = time_order(df.reverse())
    assert a.to_dicts() == b.to_dicts()


def test_unseen_users_and_items_kept_unless_asked() -> None:
    df = frame([("u", "a", 1), ("u", "b", 2), ("u", "c", 8), ("new", "a", 9), ("u", "cold", 10)])
    train, test = global_temporal_split(df, 0.6)
    assert sorted(keys(test)) == [("new", "a", 9), ("u", "c", 8), ("u", "cold", 10)]
    _, kept = global_temporal_split(df, 0.4, drop_unseen=True)
    assert kept.height == 0  # both test rows were new user / cold item
    df2 = frame([("u", "a", 1), ("u", "b", 2), ("u", "a", 8), ("new", "a", 9), ("u", "cold", 10)])
    _, kept = global_temporal_split(df2, 0.6, drop_unseen=True)
    assert keys(kept) == [("u", "a", 8)]


def test_per_user_split_fractions_and_min_train() -> None:
    rows = ([("ten", f"i{n}", n) for n in range(10)] + [("one", "a", 3)]
            + [("three", f"j{n}", 20 + n) for n in range(3)])
    train, test = per_user_temporal_split(frame(rows), 0.2)
    by_user = test.group_by("user_id").agg(pl.col("timestamp").sort()).sort("user_id")
    got = dict(zip(by_user["user_id"], by_user["timestamp"].to_list()))
    # ten: 2 latest; three: round(0.6) = 1 latest; one: keeps its only row in train.
    assert got == {"ten": [8, 9], "three": [22]}
    assert train.height + test.height == len(rows)
    _, test = per_user_temporal_split(frame(rows), 0.2, min_train=3)
    assert sorted(test["user_id"].unique()) == ["ten"]
    _, test = per_user_temporal_split(frame(rows), 0.9, min_train=1)
    assert test.filter(pl.col("user_id") == "ten").height == 9  # at least one row stays in train


def test_leave_last_out() -> None:
    rows = [("u", "a", 1), ("u", "b", 2), ("u", "c", 3), ("v", "x", 5), ("w", "p", 1), ("w", "q", 2)]
    train, test = leave_last_out(frame(rows))
    assert sorted(keys(test)) == [("u", "c", 3), ("w", "q", 2)]
    assert ("v", "x", 5) in keys(train)
    _, test = leave_last_out(frame(rows), n=2)
    assert sorted(keys(test)) == [("u", "b", 2), ("u", "c", 3), ("w", "q", 2)]
    # Tied last timestamps: the seeded hash decides, the same way for any row order.
    tied = frame([("u", "a", 1), ("u", "b", 4), ("u", "c", 4), ("u", "d", 4)])
    picks = {keys(leave_last_out(tied, seed=s)[1])[0] for s in range(8)}
    assert picks <= {("u", "b", 4), ("u", "c", 4), ("u", "d", 4)} and len(picks) > 1
    assert keys(leave_last_out(tied.reverse(), seed=3)[1]) == keys(leave_last_out(tied, seed=3)[1])


def test_bad_input() -> None:
    with pytest.raises(InputError, match="timestamp"):
        global_temporal_split(pl.DataFrame({"user_id": ["u"], "item_id": ["a"], "timestamp": ["2020-01-01"]}))
    with pytest.raises(InputError, match="lack column"):
        global_temporal_split(pl.DataFrame({"user_id": ["u"], "item_id": ["a"]}))
    with pytest.raises(InputError, match="empty values"):
        leave_last_out(pl.DataFrame({"user_id": ["u", None], "item_id": ["a", "b"], "timestamp": [1, 2]}))
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="test_fraction"):
            global_temporal_split(frame([("u", "a", 1)]), bad)
    with pytest.raises(ValueError):
        leave_last_out(frame([("u", "a", 1)]), n=0)


def test_evaluation_splits_re_exports_the_pipeline_splits():
    for name in evaluation_splits.__all__:
        assert getattr(evaluation_splits, name) is getattr(splits, name)
