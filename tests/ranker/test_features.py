"""Ranker features: values computed by hand on a tiny log, no leakage, cold values, labels."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from fusionrec.pipeline.errors import InputError
from fusionrec.pipeline.splits import tie_order
from fusionrec.ranker.features import behaviour_features, feature_columns, feature_group
from fusionrec.ranker.labels import infer_rating_scale, make_labels

D = 86_400
CUTOFF = 100 * D


def tiny_log() -> pl.DataFrame:
    # Before the cutoff: u1 a(-40d, 4.0) b(-5d); u2 a(-10d, 5.0) c(-0.5d, 3.0); u3 b(-2d).
    # At or after the cutoff (must be ignored): u1 c(+5s, 1.0), u2 b(exactly the cutoff).
    return pl.DataFrame({
        "user_id": ["u1", "u2", "u1", "u2", "u3", "u1", "u2"],
        "item_id": ["a", "a", "b", "c", "b", "c", "b"],
        "timestamp": [CUTOFF - 40 * D, CUTOFF - 10 * D, CUTOFF - 5 * D, CUTOFF - D // 2, CUTOFF - 2 * D,
                      CUTOFF + 5, CUTOFF],
        "event": ["view", "view", "click", "purchase", "view", "view", "cart"],
        "value": [4.0, 5.0, None, 3.0, None, 1.0, None],
    })


def tiny_items() -> pl.DataFrame:
    return pl.DataFrame({
        "item_id": ["a", "b", "c", "d"],
        "tags": ["Rock|pop", "pop", None, "jazz"],
        "price": [10.0, 12.0, 100.0, 110.0],
        "brand": ["x", "y", "x", None],
    })


def tiny_pairs() -> pl.DataFrame:
    return pl.DataFrame({
        "user_id": ["u1", "u1", "u2", "zz", "u3"],
        "item_id": ["c", "d", "b", "a", "q"],
        "retrieval_rank": pl.Series([1, 2, 1, None, 1], dtype=pl.Int32),
        "retrieval_score": pl.Series([0.9, 0.5, 0.7, None, 0.1], dtype=pl.Float32),
        "sim_text": pl.Series([0.1, 0.2, 0.3, None, 0.5], dtype=pl.Float32),
        "sim_audio_vggish": pl.Series([0.6, None, 0.2, 0.1, 0.0], dtype=pl.Float32),
        "attn_text": pl.Series([0.7, 0.7, 0.4, 0.5, 0.5], dtype=pl.Float32),
        "attn_audio_vggish": pl.Series([0.3, 0.3, 0.6, 0.5, 0.5], dtype=pl.Float32),
    })


# Expected values worked out by hand from the log above (price_bins=2: the median price
# 56 splits a, b (band 0) from c, d (band 1)). None = null.
ENTROPY_U1 = -(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3))  # tags rock 1, pop 2
EXPECTED = {
    ("u1", "c"): dict(
        item_cnt_1d=1, item_cnt_7d=1, item_cnt_30d=1, item_cnt_all=1, item_users=1, item_mean_rating=3.0,
        item_rating_count=1, item_days_since_first=0.5, item_days_since_last=0.5, item_trend=2 / (7 / 30 + 1),
        user_cnt_1d=0, user_cnt_7d=1, user_cnt_30d=1, user_cnt_all=2, user_items=2, user_item_variety=1.0,
        user_mean_rating=4.0, user_rating_count=1, user_days_since_last=5.0,
        pair_user_item_count=0, pair_cooc_sum=1, pair_cooc_max=1,  # c-a shared by u2, c-b by nobody
        pair_tag_affinity=0.0, user_tag_entropy=ENTROPY_U1, user_tags=2,
        item_price_band=1, pair_price_band_match=0, pair_brand_match=1),
    ("u1", "d"): dict(
        item_cnt_1d=0, item_cnt_7d=0, item_cnt_30d=0, item_cnt_all=0, item_users=0, item_mean_rating=None,
        item_rating_count=0, item_days_since_first=None, item_days_since_last=None, item_trend=1.0,
        user_cnt_all=2, user_days_since_last=5.0,
        pair_user_item_count=0, pair_cooc_sum=0, pair_cooc_max=0,
        pair_tag_affinity=0.0, item_price_band=1, pair_price_band_match=0, pair_brand_match=None),
    ("u2", "b"): dict(
        item_cnt_1d=0, item_cnt_7d=2, item_cnt_30d=2, item_cnt_all=2, item_users=2, item_mean_rating=None,
        item_rating_count=0, item_days_since_first=5.0, item_days_since_last=2.0, item_trend=3 / (14 / 30 + 1),
        user_cnt_1d=1, user_cnt_7d=1, user_cnt_30d=2, user_cnt_all=2, user_items=2, user_item_variety=1.0,
        user_mean_rating=4.0, user_rating_count=2, user_days_since_last=0.5,
        pair_user_item_count=0, pair_cooc_sum=1, pair_cooc_max=1,  # b-a shared by u1
        pair_tag_affinity=0.5, user_tag_entropy=math.log(2), user_tags=2,  # rock 1, pop 1; b has pop
        item_price_band=0, pair_price_band_match=1,  # u2's bands 0 and 1 tie: the lower wins
        pair_brand_match=0),  # u2 only knows brand x
    ("zz", "a"): dict(
        item_cnt_1d=0, item_cnt_7d=0, item_cnt_30d=1, item_cnt_all=2, item_users=2, item_mean_rating=4.5,
        item_rating_count=2, item_days_since_first=40.0, item_days_since_last=10.0, item_trend=1 / (7 / 30 + 1),
        user_cnt_1d=0, user_cnt_7d=0, user_cnt_30d=0, user_cnt_all=0, user_items=0, user_item_variety=None,
        user_mean_rating=None, user_rating_count=0, user_days_since_last=None,
        pair_user_item_count=0, pair_cooc_sum=0, pair_cooc_max=0,
        pair_tag_affinity=None, user_tag_entropy=None, user_tags=0,
        item_price_band=0, pair_price_band_match=None, pair_brand_match=None),
    ("u3", "q"): dict(
        item_cnt_all=0, item_users=0, item_mean_rating=None, item_trend=1.0,
        user_cnt_1d=0, user_cnt_7d=1, user_cnt_30d=1, user_cnt_all=1, user_items=1, user_mean_rating=None,
        user_days_since_last=2.0, pair_cooc_sum=0, pair_tag_affinity=0.0, user_tag_entropy=0.0, user_tags=1,
        item_price_band=None, pair_price_band_match=None, pair_brand_match=None),
}


def build(interactions: pl.DataFrame | None = None, pairs: pl.DataFrame | None = None, **kw) -> pl.DataFrame:
    return behaviour_features(tiny_pairs() if pairs is None else pairs,
                              tiny_log() if interactions is None else interactions,
                              tiny_items(), CUTOFF, price_bins=2, **kw)


def test_features_match_hand_computed_values():
    out = build()
    assert out.height == 5
    rows = {(r["user_id"], r["item_id"]): r for r in out.iter_rows(named=True)}
    for key, expected in EXPECTED.items():
        for name, want in expected.items():
            got = rows[key][name]
            if want is None:
                assert got is None, (key, name, got)
            else:
                assert got is not None and got == pytest.approx(want, rel=1e-6), (key, name, got, want)


def test_stage1_columns_pass_through_in_order():
    pairs = tiny_pairs()
    out = build()
    assert out.columns[: pairs.width] == pairs.columns
    assert_frame_equal(out.select(pairs.columns), pairs)


def test_last_n_limits_cooccurrence_to_recent_items():
    # With last_n=1 u1 looks only at b (its latest item): c-b co-occur for nobody.
    out = build(last_n=1)
    row = out.filter((pl.col("user_id") == "u1") & (pl.col("item_id") == "c"))
    assert row["pair_cooc_sum"].item() == 0


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["u1", "u2", "u3", "zz", "new"]),
                          st.sampled_from(["a", "b", "c", "d", "q", "new"]),
                          st.integers(0, 60 * D),
                          st.sampled_from(["view", "purchase", "rate"]),
                          st.one_of(st.none(), st.floats(0, 5))),
                min_size=1, max_size=12))
def test_no_leakage_from_interactions_at_or_after_cutoff(extra):
    """Adding interactions at or after the cutoff (new users, items, ratings) changes no feature."""
    base = build()
    later = pl.DataFrame(
        {"user_id": [e[0] for e in extra], "item_id": [e[1] for e in extra],
         "timestamp": [CUTOFF + e[2] for e in extra], "event": [e[3] for e in extra],
         "value": pl.Series([e[4] for e in extra], dtype=pl.Float64)})
    log = tiny_log()
    # Also change the existing post-cutoff rows.
    log = log.with_columns(pl.when(pl.col("timestamp") >= CUTOFF).then(pl.lit(0.5)).otherwise(pl.col("value"))
                           .alias("value"))
    assert_frame_equal(build(interactions=pl.concat([later, log])), base)


def test_leakage_test_is_sensitive_to_past_changes():
    log = tiny_log().with_columns(pl.when(pl.col("timestamp") == CUTOFF - 40 * D).then(pl.lit(CUTOFF - 1))
                                  .otherwise(pl.col("timestamp")).alias("timestamp"))
    changed = build(interactions=log)
    assert not changed.equals(build())
    assert changed.filter(pl.col("item_id") == "a")["item_cnt_1d"].item() == 1


def test_pairs_order_and_duplicates_do_not_change_values():
    pairs = tiny_pairs()
    shuffled = pl.concat([pairs, pairs.head(2)]).sample(fraction=1.0, shuffle=True, seed=3)
    out = build(pairs=shuffled)
    assert out.height == 7
    assert_frame_equal(out.select(shuffled.columns), shuffled)  # row order kept
    assert_frame_equal(out.unique().sort("user_id", "item_id"), build().sort("user_id", "item_id"))


def test_without_items_or_attributes_features_are_left_out_not_failed():
    out = behaviour_features(tiny_pairs(), tiny_log(), None, CUTOFF)
    assert "pair_tag_affinity" not in out.columns and "pair_brand_match" not in out.columns
    assert out["user_cnt_all"].to_list() == [2, 2, 2, 0, 1]
    bare = tiny_items().select("item_id", "tags")
    out = behaviour_features(tiny_pairs(), tiny_log(), bare, CUTOFF)
    assert "pair_tag_affinity" in out.columns and "item_price_band" not in out.columns


def test_empty_history_gives_cold_values():
    empty = tiny_log().filter(pl.col("timestamp") >= CUTOFF)
    out = build(interactions=empty)
    assert out["item_cnt_all"].to_list() == [0] * 5
    assert out["pair_cooc_sum"].to_list() == [0] * 5
    assert out["user_days_since_last"].null_count() == 5


def test_csv_style_string_prices_are_used():
    items = tiny_items().with_columns(pl.col("price").cast(pl.String))
    out = behaviour_features(tiny_pairs(), tiny_log(), items, CUTOFF, price_bins=2)
    assert out["item_price_band"].to_list() == [1, 1, 0, 0, None]


def test_missing_id_column_is_input_error():
    with pytest.raises(InputError, match="item_id"):
        behaviour_features(tiny_pairs().drop("item_id"), tiny_log(), None, CUTOFF)


def test_feature_columns_and_groups_follow_modality_names():
    out = build()
    cols = feature_columns(out)
    assert cols[:6] == ["retrieval_rank", "retrieval_score", "sim_text", "sim_audio_vggish", "attn_text",
                        "attn_audio_vggish"]
    assert "user_id" not in cols and "item_id" not in cols
    assert feature_group("sim_audio_vggish") == "audio_vggish"
    assert feature_group("attn_text") == "text"
    assert feature_group("retrieval_rank") == "retrieval"
    assert feature_group("pair_cooc_sum") == "user_item"
    assert feature_group("item_cnt_7d") == "item" and feature_group("user_tags") == "user"
    assert feature_group("label") is None and feature_group("score") is None


# ---- labels --------------------------------------------------------------------------

def test_labels_only_from_window_and_strongest_event_wins():
    pairs = pl.DataFrame({"user_id": ["u1", "u2", "u2", "u3", "zz"], "item_id": ["c", "b", "a", "b", "a"]})
    log = tiny_log().vstack(pl.DataFrame({
        "user_id": ["u2", "u3", "u3"], "item_id": ["b", "b", "b"],
        "timestamp": [CUTOFF + D, CUTOFF + 3 * D, CUTOFF + 20 * D],  # the last is after the window
        "event": ["view", "click", "purchase"], "value": [None, None, None]}))
    out = make_labels(pairs, log, CUTOFF, CUTOFF + 10 * D)
    # u1 c: view (+5 s) -> 1; u2 b: cart (at the cutoff) beats view -> 3; u2 a: only before -> 0;
    # u3 b: click in the window -> 2 (its purchase is after the window end); zz: nothing -> 0.
    assert out["label"].to_list() == [1, 3, 0, 2, 0]
    assert out["label"].dtype == pl.Int32
    assert make_labels(pairs, log, CUTOFF, CUTOFF + 10 * D, kind="binary")["label"].to_list() == [1, 1, 0, 1, 0]


def test_labels_from_ratings():
    log = pl.DataFrame({"user_id": ["u", "u", "v"], "item_id": ["a", "b", "a"],
                        "timestamp": [10, 11, 12], "event": ["rate"] * 3, "value": [5.0, 1.0, 3.0]})
    pairs = pl.DataFrame({"user_id": ["u", "u", "v", "v"], "item_id": ["a", "b", "a", "b"]})
    assert infer_rating_scale(log) == (1, 5)
    gains = make_labels(pairs, log, 0, 100, rating_scale=(1, 5))["label"].to_list()
    assert gains == [5, 1, 3, 0]
    ratings = make_labels(pairs, log, 0, 100, kind="rating")["label"].to_list()
    assert ratings == [5.0, 1.0, 3.0, None]
    assert infer_rating_scale(log.with_columns(pl.col("value") / 3)) is None


def test_label_window_is_disjoint_from_features():
    """Labels from [cutoff, end) and features from < cutoff: the same event never feeds both."""
    log = tiny_log()
    pairs = tiny_pairs().select("user_id", "item_id")
    labels = make_labels(pairs, log, CUTOFF, CUTOFF + D)
    feats = build(pairs=pairs)
    # u1 c is labelled by its post-cutoff view but the features never saw that view.
    row = feats.join(labels, on=["user_id", "item_id"]).filter(pl.col("user_id") == "u1", pl.col("item_id") == "c")
    assert row["label"].item() == 1 and row["pair_user_item_count"].item() == 0
    assert np.isclose(row["item_mean_rating"].item(), 3.0)  # the post-cutoff rating 1.0 is not in it


def test_equal_timestamps_follow_the_logs_tie_order_not_item_ids():
    # u did b and z at the same time. The one tie order of the log (`splits.tie_order`) puts
    # z after b for u, where id order would put b last: ids can be assigned with hindsight
    # (Last.fm numbers artists by their first listener), so their order must not say "recent".
    key = tie_order(pl.Series(["u", "u"]), pl.Series(["b", "z"]))
    assert key[1] > key[0]
    t = CUTOFF - D
    log = pl.DataFrame({"user_id": ["u", "u", "v", "v", "w", "w"], "item_id": ["b", "z", "b", "c", "z", "d"],
                        "timestamp": [t, t, t - D, t - D, t - D, t - D]})
    pairs = pl.DataFrame({"user_id": ["u", "u"], "item_id": ["c", "d"]})
    out = behaviour_features(pairs, log, None, CUTOFF, last_n=1)
    # u's latest item is z: d co-occurs with z (w), c only with b (v).
    assert out["pair_cooc_sum"].to_list() == [0, 1]
