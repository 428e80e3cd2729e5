"""Metric functions against values computed by hand, and the evaluation built on them."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from fusionrec.evaluation import metrics as M
from fusionrec.evaluation.results import bootstrap_ci, evaluate, paired_comparison, relevant_truth
from fusionrec.pipeline.errors import InputError

L2, L3, L4 = math.log2(2), math.log2(3), math.log2(4)  # discounts of positions 1, 2, 3


def recs_frame(lists: dict[str, list[str]]) -> pl.DataFrame:
    rows = [(u, r + 1, i, float(len(items) - r)) for u, items in lists.items() for r, i in enumerate(items)]
    return pl.DataFrame(rows, schema={"user_id": pl.String, "rank": pl.Int64, "item_id": pl.String,
                                      "score": pl.Float64}, orient="row")


def truth_frame(rel: dict[str, list[str]]) -> pl.DataFrame:
    rows = [(u, i) for u, items in rel.items() for i in items]
    return pl.DataFrame(rows, schema={"user_id": pl.String, "item_id": pl.String}, orient="row")


# A: 3 relevant, hits at positions 1 and 3 (more relevant items than k=2).
# B: 1 relevant (fewer than k), hit at position 2.  C: relevant items, no list at all.
# D: a list without hits.  E: a list but no relevant item (not evaluated).
RECS = recs_frame({"A": ["a", "d", "b", "e"], "B": ["y", "x"], "D": ["a", "b"], "E": ["a"]})
TRUTH = truth_frame({"A": ["a", "b", "c"], "B": ["x"], "C": ["p", "q"], "D": ["z"]})


@pytest.fixture(scope="module")
def per_user() -> pl.DataFrame:
    return M.ranking_metrics(RECS, TRUTH, ks=(2, 4))


def test_users_are_exactly_the_truth_users(per_user: pl.DataFrame) -> None:
    assert per_user["user_id"].to_list() == ["A", "B", "C", "D"]
    assert per_user["n_relevant"].to_list() == [3, 1, 2, 1]
    assert per_user.columns[:2] == ["user_id", "n_relevant"]
    assert {f"{m}@{k}" for m in M.RANKING_METRICS for k in (2, 4)} == set(per_user.columns[2:])


def test_user_with_more_relevant_items_than_k(per_user: pl.DataFrame) -> None:
    a = per_user.filter(pl.col("user_id") == "A").row(0, named=True)
    # k=2: hit at 1 only; IDCG over min(3, 2) = 2 positions; AP normalised by 2.
    assert a["recall@2"] == pytest.approx(1 / 3)
    assert a["precision@2"] == pytest.approx(1 / 2)
    assert a["ndcg@2"] == pytest.approx((1 / L2) / (1 / L2 + 1 / L3))
    assert a["map@2"] == pytest.approx(1 / 2)
    assert a["mrr@2"] == pytest.approx(1.0)
    assert a["hit_rate@2"] == 1.0
    # k=4: hits at 1 and 3; IDCG over 3 positions; AP = (1/1 + 2/3) / 3.
    assert a["recall@4"] == pytest.approx(2 / 3)
    assert a["precision@4"] == pytest.approx(2 / 4)
    assert a["ndcg@4"] == pytest.approx((1 / L2 + 1 / L4) / (1 / L2 + 1 / L3 + 1 / L4))
    assert a["map@4"] == pytest.approx((1 + 2 / 3) / 3)
    assert a["ndcg@4"] == pytest.approx(0.7039180890341347)


def test_user_with_fewer_relevant_items_than_k(per_user: pl.DataFrame) -> None:
    b = per_user.filter(pl.col("user_id") == "B").row(0, named=True)
    # One relevant item at position 2: IDCG is one perfect hit, AP normalised by 1.
    for k in (2, 4):
        assert b[f"recall@{k}"] == pytest.approx(1.0)
        assert b[f"ndcg@{k}"] == pytest.approx(1 / L3)
        assert b[f"map@{k}"] == pytest.approx(1 / 2)
        assert b[f"mrr@{k}"] == pytest.approx(1 / 2)
        assert b[f"hit_rate@{k}"] == 1.0
    assert b["precision@2"] == pytest.approx(1 / 2)
    assert b["precision@4"] == pytest.approx(1 / 4)  # denominator k even for a 2-item list


def test_users_without_hits_or_without_list_score_zero(per_user: pl.DataFrame) -> None:
    rest = per_user.filter(pl.col("user_id").is_in(["C", "D"])).drop("user_id", "n_relevant")
    assert rest.to_numpy().sum() == 0.0
    assert rest.null_count().to_numpy().sum() == 0


def test_summarise_means_over_users(per_user: pl.DataFrame) -> None:
    s = M.summarise(per_user)
    assert s["n_users"] == 4
    assert s["recall@2"] == pytest.approx((1 / 3 + 1) / 4)
    assert s["precision@2"] == pytest.approx((1 / 2 + 1 / 2) / 4)
    assert s["ndcg@2"] == pytest.approx(((1 / L2) / (1 / L2 + 1 / L3) + 1 / L3) / 4)
    assert s["map@2"] == pytest.approx(0.25)
    assert s["mrr@2"] == pytest.approx(0.375)
    assert s["hit_rate@2"] == pytest.approx(0.5)
    assert "n_relevant" not in s


def test_mrr_counts_only_hits_within_k() -> None:
    pu = M.ranking_metrics(recs_frame({"u": ["a", "b", "c"]}), truth_frame({"u": ["c"]}), ks=(2, 3))
    assert pu["mrr@2"].item() == 0.0
    assert pu["mrr@3"].item() == pytest.approx(1 / 3)


def test_score_ties_follow_the_rank_column() -> None:
    truth = truth_frame({"u": ["b"]})
    tied = pl.DataFrame({"user_id": ["u", "u"], "rank": [1, 2], "item_id": ["a", "b"], "score": [0.5, 0.5]})
    # Even a score that contradicts the ranks is ignored: the rank column is the order.
    contradicting = tied.with_columns(score=pl.Series([0.1, 0.9]))
    for recs in (tied, contradicting):
        pu = M.ranking_metrics(recs, truth, ks=(1, 2))
        assert pu["hit_rate@1"].item() == 0.0
        assert pu["mrr@2"].item() == pytest.approx(0.5)
        assert pu["ndcg@2"].item() == pytest.approx(1 / L3)
    swapped = tied.with_columns(rank=pl.Series([2, 1]))
    assert M.ranking_metrics(swapped, truth, ks=1)["hit_rate@1"].item() == 1.0


def test_rank_gaps_are_closed_and_order_is_not_row_order() -> None:
    recs = pl.DataFrame({"user_id": ["u", "u", "u"], "rank": [7, 1, 3], "item_id": ["c", "a", "b"]})
    pu = M.ranking_metrics(recs, truth_frame({"u": ["c"]}), ks=(2, 3))
    assert pu["hit_rate@2"].item() == 0.0  # c is third in the list despite rank 7
    assert pu["mrr@3"].item() == pytest.approx(1 / 3)


def test_ambiguous_lists_are_rejected() -> None:
    same_rank = pl.DataFrame({"user_id": ["u", "u"], "rank": [1, 1], "item_id": ["a", "b"]})
    with pytest.raises(InputError, match="two items at rank 1"):
        M.ranking_metrics(same_rank, truth_frame({"u": ["a"]}))
    same_item = pl.DataFrame({"user_id": ["u", "u"], "rank": [1, 2], "item_id": ["a", "a"]})
    with pytest.raises(InputError, match="item a twice"):
        M.ranking_metrics(same_item, truth_frame({"u": ["a"]}))
    with pytest.raises(InputError, match="lack"):
        M.ranking_metrics(pl.DataFrame({"user_id": ["u"], "item_id": ["a"]}), truth_frame({"u": ["a"]}))


def test_empty_recommendations_score_zero_for_every_truth_user() -> None:
    empty = pl.DataFrame(schema={"user_id": pl.String, "rank": pl.Int64, "item_id": pl.String})
    for recs in (empty, pl.DataFrame()):
        pu = M.ranking_metrics(recs, TRUTH, ks=(2,))
        assert pu.height == 4
        assert pu.drop("user_id", "n_relevant").to_numpy().sum() == 0.0
    assert M.coverage(empty, 10) == 0.0
    assert math.isnan(M.novelty(empty, TRUTH))


def test_empty_truth_gives_no_users_and_nan_means() -> None:
    pu = M.ranking_metrics(RECS, truth_frame({}), ks=(2,))
    assert pu.height == 0
    s = M.summarise(pu)
    assert s["n_users"] == 0 and math.isnan(s["ndcg@2"])


def test_duplicate_truth_rows_and_mixed_id_types() -> None:
    truth = pl.DataFrame({"user_id": [1, 1], "item_id": [10, 10]})  # same pair twice, integer ids
    recs = pl.DataFrame({"user_id": ["1"], "rank": [1], "item_id": ["10"]})
    pu = M.ranking_metrics(recs, truth, ks=1)
    assert pu["n_relevant"].item() == 1 and pu["recall@1"].item() == 1.0


def test_bad_cutoffs() -> None:
    for ks in ((), (0,), (2, -1), (1.5,)):
        with pytest.raises(ValueError, match="positive integers"):
            M.ranking_metrics(RECS, TRUTH, ks=ks)


# ----------------------------------------------------------------------------- beyond accuracy

TRAIN = pl.DataFrame({"user_id": ["u1", "u2", "u3", "u4", "u1", "u2", "u3", "u4"],
                      "item_id": ["a", "a", "a", "a", "b", "b", "c", "d"]})  # pop a=4 b=2 c=1 d=1


def test_coverage() -> None:
    assert M.coverage(RECS, n_items=10) == pytest.approx(6 / 10)  # a b d e x y
    assert M.coverage(RECS, n_items=10, k=1) == pytest.approx(2 / 10)  # a y
    with pytest.raises(ValueError):
        M.coverage(RECS, 0)


def test_novelty_is_mean_self_information_per_list() -> None:
    recs = recs_frame({"v1": ["a", "b"], "v2": ["c", "z"]})
    # -log2(pop/4 users): a 0 bits, b 1, c 2, unseen z counts as one user: 2 bits.
    assert M.novelty(recs, TRAIN) == pytest.approx(((0 + 1) / 2 + (2 + 2) / 2) / 2)
    assert M.novelty(recs, TRAIN, k=1) == pytest.approx((0 + 2) / 2)


def test_intra_list_diversity() -> None:
    vectors = {"a": [1.0, 0.0], "b": [0.0, 1.0], "c": [1.0, 1.0], "d": [2.0, 0.0], "zero": [0.0, 0.0]}
    recs = recs_frame({"v1": ["a", "b", "c"], "v2": ["a", "d"], "v3": ["a", "nothing", "zero"]})
    c = 1 / math.sqrt(2)
    expected_v1 = (1 + (1 - c) + (1 - c)) / 3
    per_user = M.intra_list_diversity_per_user(recs, vectors)
    got = dict(zip(per_user["user_id"].to_list(), per_user["ild"].to_list()))
    assert got["v1"] == pytest.approx(expected_v1)
    assert got["v2"] == pytest.approx(0.0)  # same direction
    assert got["v3"] is None  # one embedded item: no pair
    assert M.intra_list_diversity(recs, vectors) == pytest.approx(expected_v1 / 2)
    ids = list(vectors)
    matrix = np.array(list(vectors.values()))
    assert M.intra_list_diversity(recs, (ids, matrix)) == pytest.approx(expected_v1 / 2)
    assert M.intra_list_diversity(recs, vectors, k=2) == pytest.approx((1 + 0) / 2)
    with pytest.raises(ValueError, match="duplicate"):
        M.intra_list_diversity(recs, (["a", "a"], np.eye(2)))


def test_popularity_bias_by_hand() -> None:
    recs = recs_frame({"v1": ["a", "b"], "v2": ["a", "c"], "v3": ["e"]})
    bias = M.popularity_bias(recs, TRAIN, n_items=5)
    # exposure over catalog a..e: [2, 1, 1, 0, 1] -> sorted [0, 1, 1, 1, 2]; sum (2i-n-1) x = 8.
    assert bias["gini"] == pytest.approx(8 / (5 * 5))
    assert bias["mean_popularity"] == pytest.approx((4 + 2 + 4 + 1 + 0) / 5)
    # head = top ceil(0.2 * 5) = 1 item by popularity: a.
    assert bias["long_tail_share"] == pytest.approx(3 / 5)
    x, y = M.lorenz_curve(recs, 5)
    np.testing.assert_allclose(x, [0, 0.2, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(y, [0, 0, 0.2, 0.4, 0.6, 1.0])


def test_gini_extremes() -> None:
    assert M.gini(np.array([3, 3, 3])) == pytest.approx(0.0)
    assert M.gini(np.array([0, 0, 5])) == pytest.approx(2 / 3)  # (n - 1) / n: all on one item
    assert math.isnan(M.gini(np.zeros(3)))


def test_rmse() -> None:
    pred = pl.DataFrame({"user_id": ["u1", "u1", "u2", "u9"], "item_id": ["a", "b", "a", "q"],
                         "score": [3.0, 5.0, 2.0, 1.0]})
    truth = pl.DataFrame({"user_id": ["u1", "u1", "u2", "u3"], "item_id": ["a", "b", "a", "c"],
                          "value": [4.0, 5.0, None, 1.0]})
    assert M.rmse(pred, truth) == pytest.approx(math.sqrt((1 + 0) / 2))
    twice = pl.concat([truth, pl.DataFrame({"user_id": ["u1"], "item_id": ["a"], "value": [2.0]})])
    assert M.rmse(pred, twice) == pytest.approx(0.0)  # (u1, a) rated 4 and 2: mean 3
    assert math.isnan(M.rmse(pred.filter(pl.col("user_id") == "u9"), truth))
    with pytest.raises(InputError, match="appears twice"):
        M.rmse(pl.concat([pred, pred]), truth)


# ----------------------------------------------------------------------------- evaluation

def _interactions(rows: list[tuple[str, str, int]], value: float | None = None) -> pl.DataFrame:
    return pl.DataFrame(
        [(u, i, t, "rate", value) for u, i, t in rows],
        schema={"user_id": pl.String, "item_id": pl.String, "timestamp": pl.Int64, "event": pl.String,
                "value": pl.Float64}, orient="row")


@pytest.fixture(scope="module")
def small_eval():
    # Train activity: h 4 items (heavy), m 2, l 1 (light); n has no history (new user).
    train = _interactions([("h", "a", 1), ("h", "b", 2), ("h", "c", 3), ("h", "d", 4),
                           ("m", "a", 1), ("m", "b", 2), ("l", "a", 1)])
    # "new" is an item no training user touched (cold); (h, a) repeats a training pair.
    test = _interactions([("h", "e", 9), ("h", "a", 9), ("m", "new", 9), ("l", "b", 9), ("n", "a", 9)])
    recs = recs_frame({"h": ["e", "x"], "m": ["c", "new"], "l": ["c", "d"], "n": ["a", "b"],
                       "nobody": ["a", "b"]})
    return train, test, recs


def test_evaluate_slices_and_segments(small_eval) -> None:
    train, test, recs = small_eval
    res = evaluate(recs, test, train, ks=(1, 2), item_vectors={"a": [1, 0], "b": [0, 1], "c": [1, 0],
                                                               "d": [0, 1], "e": [1, 0]})
    pu = res.per_user
    assert pu["user_id"].to_list() == ["h", "l", "m", "n"]
    # Activity quantiles over train users (1, 2, 4 items): q25 = 1.5, q75 = 3.
    assert dict(zip(pu["user_id"], pu["segment"])) == {"h": "heavy", "l": "light", "m": "medium", "n": "new"}
    assert dict(zip(pu["user_id"], pu["n_train"])) == {"h": 4, "l": 1, "m": 2, "n": 0}
    # (h, a) was already in train: not relevant, so h has one relevant item, hit at 1.
    assert dict(zip(pu["user_id"], pu["n_relevant"])) == {"h": 1, "l": 1, "m": 1, "n": 1}
    assert dict(zip(pu["user_id"], pu["recall@2"])) == {"h": 1.0, "l": 0.0, "m": 1.0, "n": 1.0}
    assert res.metrics["recall@2"] == pytest.approx(3 / 4)
    assert res.metrics["n_new_users"] == 1
    assert res.slices["new_users"]["n_users"] == 1 and res.slices["new_users"]["recall@1"] == 1.0
    assert res.slices["heavy_users"]["ndcg@1"] == 1.0
    assert res.slices["light_users"]["recall@2"] == 0.0
    # Cold items (no training user): e, found by h at 1, and "new", found by m at 2.
    cold = res.slices["cold_items"]
    assert cold["n_users"] == 2 and cold["recall@2"] == 1.0 and cold["recall@1"] == 0.5
    # Beyond accuracy over evaluated users' lists only ("nobody" is left out).
    assert res.metrics["n_items"] == 7  # a b c d e x new
    assert res.metrics["coverage@2"] == pytest.approx(len({"e", "x", "c", "new", "d", "a", "b"}) / 7)
    assert res.metrics["coverage@1"] == pytest.approx(len({"e", "c", "a"}) / 7)
    # ILD@2 per user: h (e, x): x has no vector -> null; m (c, new) null; l (c, d) 1; n (a, b) 1.
    assert dict(zip(pu["user_id"], pu["ild@2"])) == {"h": None, "l": 1.0, "m": None, "n": 1.0}
    assert res.metrics["ild@2"] == pytest.approx(1.0)
    for key in ("novelty@2", "gini@2", "mean_popularity@2", "long_tail_share@2"):
        assert key in res.metrics
    assert res.to_dict()["slices"]["all"]["recall@2"] == pytest.approx(3 / 4)


def test_relevance_threshold_and_train_pairs() -> None:
    train = _interactions([("u", "a", 1)], 5.0)
    test = pl.concat([_interactions([("u", "a", 5), ("u", "b", 6)], 5.0), _interactions([("u", "c", 7)], 2.0),
                      _interactions([("u", "d", 8)], None)])
    assert relevant_truth(test, train)["item_id"].to_list() == ["b", "c", "d"]
    assert relevant_truth(test, train, relevance_threshold=4)["item_id"].to_list() == ["b", "d"]
    assert relevant_truth(test, train, exclude_train_pairs=False)["item_id"].to_list() == ["a", "b", "c", "d"]


def test_evaluate_judges_relevance_by_the_artifacts_threshold_unless_told() -> None:
    """`fusionrec evaluate`'s default (auto): a rated held-out row counts as a like only at the
    threshold the sources learned with, as in the benchmark; before, every pair counted, so a
    1-star rating the model rightly left out was scored as a miss."""
    from types import SimpleNamespace

    from fusionrec.evaluation.offline import resolve_relevance

    rated = SimpleNamespace(sources_=SimpleNamespace(threshold=4.0))
    unrated = SimpleNamespace(sources_=SimpleNamespace(threshold=None))
    test = pl.concat([_interactions([("u", "b", 6)], 5.0), _interactions([("u", "c", 7)], 2.0)])
    assert resolve_relevance("auto", rated, test) == 4.0
    assert resolve_relevance("auto", unrated, test) is None  # the training log had no rating scale
    assert resolve_relevance("auto", rated, test.with_columns(value=pl.lit(None, pl.Float64))) is None
    assert resolve_relevance("all", rated, test) is None and resolve_relevance(None, rated, test) is None
    assert resolve_relevance(3, rated, test) == 3.0
    with pytest.raises(InputError, match="--relevance takes a number, auto or all"):
        resolve_relevance("most", rated, test)


def test_evaluate_rmse_with_predictions(small_eval) -> None:
    train, test, recs = small_eval
    pred = pl.DataFrame({"user_id": ["h", "l"], "item_id": ["e", "b"], "score": [3.0, 1.0]})
    test = test.with_columns(value=pl.lit(2.0))
    res = evaluate(recs, test, train, ks=2, predictions=pred)
    assert res.metrics["rmse"] == pytest.approx(1.0)


def _per_user(values: list[float], metric: str = "ndcg@10") -> pl.DataFrame:
    return pl.DataFrame({"user_id": [f"u{i}" for i in range(len(values))], metric: values})


def test_bootstrap_ci() -> None:
    const = bootstrap_ci(_per_user([0.3] * 50), "ndcg@10", n_boot=200)
    assert const["mean"] == pytest.approx(0.3)
    assert const["ci_low"] == pytest.approx(0.3) and const["ci_high"] == pytest.approx(0.3)
    rng = np.random.default_rng(1)
    pu = _per_user(rng.random(400).tolist())
    ci = bootstrap_ci(pu, "ndcg@10", n_boot=500, seed=3)
    assert ci["ci_low"] < ci["mean"] < ci["ci_high"]
    # Close to the normal-theory interval mean +- 1.96 sd / sqrt(n).
    half = 1.96 * pu["ndcg@10"].std() / math.sqrt(400)
    assert (ci["ci_high"] - ci["ci_low"]) / 2 == pytest.approx(half, rel=0.15)
    assert bootstrap_ci(pu, "ndcg@10", n_boot=500, seed=3) == ci  # seeded
    wide = bootstrap_ci(pu, "ndcg@10", n_boot=500, alpha=0.01, seed=3)
    assert wide["ci_low"] < ci["ci_low"] and wide["ci_high"] > ci["ci_high"]
    with_null = pl.DataFrame({"user_id": ["a", "b"], "ild@10": [0.5, None]})
    assert bootstrap_ci(with_null, "ild@10", n_boot=10)["n_users"] == 1
    with pytest.raises(KeyError, match="ndcg@5"):
        bootstrap_ci(pu, "ndcg@5")


def test_paired_comparison() -> None:
    rng = np.random.default_rng(0)
    base = rng.random(300)
    a = _per_user(base.tolist())
    b = _per_user((base + 0.02).tolist())
    cmp = paired_comparison(a, b, "ndcg@10", n_boot=300)
    assert cmp["diff"] == pytest.approx(0.02)
    assert cmp["ci_low"] == pytest.approx(0.02) and cmp["ci_high"] == pytest.approx(0.02)
    assert cmp["share_b_better"] == 1.0 and cmp["p_value"] == pytest.approx(1 / 301)
    # The same users drawn for both runs: the paired interval is far narrower than either
    # run's own interval, which is the point of a paired (A/B-style) comparison.
    noisy_b = _per_user((base + 0.02 + rng.normal(0, 0.01, 300)).tolist())
    paired = paired_comparison(a, noisy_b, "ndcg@10", n_boot=300)
    own = bootstrap_ci(a, "ndcg@10", n_boot=300)
    assert paired["ci_high"] - paired["ci_low"] < (own["ci_high"] - own["ci_low"]) / 5
    assert paired["ci_low"] > 0 and paired["p_value"] < 0.01
    same = paired_comparison(a, a, "ndcg@10", n_boot=100)
    assert same["diff"] == 0.0 and same["p_value"] == 1.0
    partial = paired_comparison(a, b.head(100), "ndcg@10", n_boot=50)
    assert (partial["n_users"], partial["n_only_a"], partial["n_only_b"]) == (100, 200, 0)


def test_scorable_users_name_the_threshold_as_it_was_chosen(caplog: pytest.LogCaptureFixture) -> None:
    """Under `--relevance auto` the messages said "--relevance 4", a flag the user never gave."""
    from fusionrec.evaluation.offline import scorable_users

    train = _interactions([("u", "a", 1)], 5.0)
    test = pl.concat([_interactions([("u", "b", 6)], 2.0),
                      _interactions([("u", "c", 7)], 5.0).with_columns(value=pl.lit(None, pl.Float64))])
    auto = "the relevance threshold (--relevance auto: sources.relevance)"
    with caplog.at_level("WARNING", logger="fusionrec"):
        assert scorable_users(test, train, "held.csv", 4.0, auto) == ["u"]  # the unrated row stays relevant
    assert f"they stay relevant ({auto} 4 judges rated rows only)" in caplog.text
    with pytest.raises(InputError, match=r"at or above --relevance 4; lower the threshold \(--relevance N\), or "
                                         r"score every held-out pair \(--relevance all\)"):
        scorable_users(test.head(1), train, "held.csv", 4.0)


def test_scorable_users_say_what_is_left_out(caplog: pytest.LogCaptureFixture) -> None:
    """`split` held out 117 users and evaluate scored 99, and nothing said why: held-out pairs
    already in training, or rated below the threshold, are not scored."""
    from fusionrec.evaluation.offline import scorable_users

    train = _interactions([("u", "a", 1), ("v", "a", 1), ("w", "b", 1)], 5.0)
    test = pl.concat([_interactions([("u", "b", 6), ("v", "a", 7), ("u", "a", 8)], 5.0),  # v's only pair repeats
                      _interactions([("w", "c", 9)], 2.0)])  # w's only pair is below 4
    with caplog.at_level("INFO", logger="fusionrec"):
        assert scorable_users(test, train, "held.csv", 4.0) == ["u"]
    assert ("held.csv: 1 of 3 held-out users scored, over 1 of 4 distinct held-out pairs (not scored: 2 already in "
            "the training log, as seen items are never recommended, 1 rated below --relevance 4)") in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="fusionrec"):
        assert scorable_users(test.head(1), train, "held.csv", 4.0) == ["u"]  # everything scored: nothing to say
    assert "held-out users scored" not in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="fusionrec"):  # no threshold: only pairs already in training are left
        assert scorable_users(test, train, "held.csv") == ["u", "w"]
    assert ("held.csv: 2 of 3 held-out users scored, over 2 of 4 distinct held-out pairs (not scored: 2 already in "
            "the training log, as seen items are never recommended)") in caplog.text
