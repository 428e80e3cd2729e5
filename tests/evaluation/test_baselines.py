"""Popularity and item-kNN baselines: hand-checked scores, exclusion, cold users, real data."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from fusionrec.evaluation.baselines import ItemKNNRecommender, PopularityRecommender
from fusionrec.evaluation.metrics import ranking_metrics
from fusionrec.evaluation.results import evaluate
from fusionrec.evaluation.splits import global_temporal_split
from fusionrec.pipeline.errors import InputError

DATASETS = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"

# u1: a b      u2: a c      u3: a b d  (and a repeated row that must count once)
TRAIN = pl.DataFrame({"user_id": ["u1", "u1", "u2", "u2", "u3", "u3", "u3", "u3"],
                      "item_id": ["a", "b", "a", "c", "a", "b", "d", "d"],
                      "timestamp": list(range(8))})


def lists(recs: pl.DataFrame) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for u, i in zip(recs["user_id"], recs["item_id"]):
        out.setdefault(u, []).append(i)
    return out


def test_popularity_order_scores_and_exclusion() -> None:
    model = PopularityRecommender().fit(TRAIN)
    recs = model.recommend(["u1", "stranger", "u3"], k=3)
    assert recs.schema == pl.Schema({"user_id": pl.String, "rank": pl.Int32, "item_id": pl.String,
                                     "score": pl.Float64})
    # Popularity a=3 users, b=2, c=1, d=1 (c before d: ties by item id).
    assert lists(recs) == {"u1": ["c", "d"], "stranger": ["a", "b", "c"], "u3": ["c"]}
    assert recs.filter(pl.col("user_id") == "stranger")["score"].to_list() == [3.0, 2.0, 1.0]
    assert recs.filter(pl.col("user_id") == "stranger")["rank"].to_list() == [1, 2, 3]
    assert recs["user_id"].to_list()[0] == "u1"  # output follows the requested order
    seen_too = model.recommend(["u1"], k=2, exclude_seen=False)
    assert lists(seen_too) == {"u1": ["a", "b"]}
    everyone = model.recommend(k=1)
    assert lists(everyone) == {"u1": ["c"], "u2": ["b"], "u3": ["c"]}


def test_item_knn_similarities_by_hand() -> None:
    model = ItemKNNRecommender(k_neighbors=3).fit(TRAIN)
    order = list(model.item_ids_)
    sim = model.similarity_.toarray()

    def s(i: str, j: str) -> float:
        return float(sim[order.index(i), order.index(j)])

    # |U_a|=3, |U_b|=2, |U_c|=1, |U_d|=1; co-occurrences a-b 2, a-c 1, a-d 1, b-d 1.
    assert s("a", "b") == pytest.approx(2 / math.sqrt(6))
    assert s("a", "c") == pytest.approx(1 / math.sqrt(3))
    assert s("b", "d") == pytest.approx(1 / math.sqrt(2))
    assert s("b", "c") == 0.0 and s("a", "a") == 0.0
    np.testing.assert_allclose(sim, sim.T)
    shrunk = ItemKNNRecommender(k_neighbors=3, shrink=10.0).fit(TRAIN)
    assert shrunk.similarity_[order.index("a"), order.index("b")] == pytest.approx(2 / (math.sqrt(6) + 10))


def test_item_knn_scores_pruning_and_cold_users() -> None:
    model = ItemKNNRecommender(k_neighbors=3).fit(TRAIN)
    recs = model.recommend(["u2", "stranger"], k=2)
    got = {(u, i): sc for u, i, sc in zip(recs["user_id"], recs["item_id"], recs["score"])}
    # u2 saw a, c: score(b) = sim(a,b) + sim(c,b) = 2/sqrt6 + 0; score(d) = sim(a,d) = 1/sqrt3.
    assert lists(recs)["u2"] == ["b", "d"]
    assert got[("u2", "b")] == pytest.approx(2 / math.sqrt(6))
    assert got[("u2", "d")] == pytest.approx(1 / math.sqrt(3))
    # A user with no history scores 0 everywhere and gets the popularity order.
    assert lists(recs)["stranger"] == ["a", "b"] and got[("stranger", "a")] == 0.0
    # One neighbour per item: a keeps only b, so d is no longer reachable from a.
    pruned = ItemKNNRecommender(k_neighbors=1).fit(TRAIN)
    assert pruned.similarity_.getnnz(axis=1).max() == 1
    recs1 = pruned.recommend(["u2"], k=2)
    assert recs1["score"].to_list()[1] == 0.0


def test_short_lists_when_the_catalog_runs_out() -> None:
    model = ItemKNNRecommender().fit(TRAIN)
    recs = model.recommend(["u3"], k=10)
    assert lists(recs) == {"u3": ["c"]}  # u3 saw 3 of the 4 items
    assert model.recommend(["u3"], k=10, exclude_seen=False).height == 4


def test_errors() -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        PopularityRecommender().recommend(["u"], k=1)
    with pytest.raises(InputError, match="empty"):
        PopularityRecommender().fit(TRAIN.head(0))
    with pytest.raises(ValueError):
        ItemKNNRecommender(k_neighbors=0)
    with pytest.raises(ValueError):
        PopularityRecommender().fit(TRAIN).recommend(["u1"], k=0)


@pytest.mark.integration
def test_movielens_100k_figures() -> None:
    path = DATASETS / "movielens-100k" / "fusionrec" / "interactions.csv"
    if not path.exists():
        pytest.skip(f"shared MovieLens-100K data set absent at {path}")
    df = pl.read_csv(path, schema_overrides={"user_id": pl.String, "item_id": pl.String, "timestamp": pl.Int64,
                                             "event": pl.String, "value": pl.Float64})
    train, test = global_temporal_split(df, 0.2)
    assert (train.height, test.height, test["user_id"].n_unique()) == (80000, 20000, 301)
    users = test["user_id"].unique().sort()
    pop = evaluate(PopularityRecommender().fit(train).recommend(users, 10), test, train, ks=10)
    knn = evaluate(ItemKNNRecommender().fit(train).recommend(users, 10), test, train, ks=10)
    # Pinned figures of this split (popularity as in bench/results/peers.md; kNN with the
    # class defaults, not the tuned bench ones): a regression guard.
    assert pop.metrics["ndcg@10"] == pytest.approx(0.34043, abs=1e-4)
    assert knn.metrics["ndcg@10"] == pytest.approx(0.34105, abs=1e-4)
    assert pop.metrics["n_new_users"] == 192
    # kNN personalises: it covers more of the catalog and reaches further into the tail.
    assert knn.metrics["coverage@10"] > 1.5 * pop.metrics["coverage@10"]
    assert pop.metrics["long_tail_share@10"] == 0.0 < knn.metrics["long_tail_share@10"]


def test_quality_bench_scores_lists_as_the_library_does() -> None:
    """bench/peers.py's three ways of scoring a list (a score matrix, a top-k frame, the
    library's ranking_metrics) give the same NDCG@10 per user."""
    spec = importlib.util.spec_from_file_location("peers_bench",
                                                  Path(__file__).resolve().parents[2] / "bench" / "peers.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("peers_bench", bench)
    spec.loader.exec_module(bench)
    rng = np.random.default_rng(0)
    rows = [(f"u{u}", f"i{i}", t, float(rng.integers(1, 6))) for u in range(30)
            for t, i in enumerate(rng.choice(40, 12, replace=False))]
    inter = pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp", "value"], orient="row")
    train, test = bench.split("movielens", inter)
    items = np.array(sorted({f"i{i}" for i in range(40)}), dtype=object)
    task = bench.Task(train, test, items, 4.0)
    assert task.users and task.truth_matrix.sum() == task.truth.height
    scores = rng.normal(size=(len(task.users), len(items))).astype(np.float32)
    from_matrix = task.per_user(scores)
    masked = np.where(task.blocked, -np.inf, scores)
    order = np.argsort(-masked, axis=1, kind="stable")[:, :10]
    top = pl.DataFrame({"user_id": np.repeat(task.users, 10), "item_id": items[order].ravel(),
                        "rank": np.tile(np.arange(1, 11), len(task.users))})
    from_lists = task.per_user(task.lists(top))
    from_frame = bench.frame_ndcg(top, task.truth, task.users)
    library = ranking_metrics(top, task.truth, ks=(10,)).sort("user_id")
    lib = dict(zip(library["user_id"].to_list(), library["ndcg@10"].to_list()))
    assert np.allclose(from_matrix, from_lists) and np.allclose(from_matrix, from_frame)
    assert np.allclose(from_matrix, [lib[u] for u in task.users])
    mean, lo, hi = bench.interval(from_matrix)
    assert lo <= mean <= hi

