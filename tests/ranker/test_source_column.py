"""The `source` column of `recommend` and `score`: which list each row's `score` comes from.

One small nightly run (synthetic catalog with precomputed item vectors, no encoder) with two
users without history: one with a profile vector of their own (served from content), one
with nothing (served from popularity).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from fusionrec.jobs import run_nightly, users_by_source
from fusionrec.pipeline.config import RerankConfig, load_config
from fusionrec.ranker.serving.export import SOURCES, TOPK_SCHEMA, read_topk, write_topk
from fusionrec.ranker.serving.recommender import Recommender
from tests.ranker.test_training import QUIET, make_catalog

COLD_CONTENT, COLD_NOTHING = "zz_content", "zz_nothing"


@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("source")
    data = make_catalog(root / "data", n_users=60)
    users = pl.read_csv(data / "users.csv")
    extra = pl.DataFrame({"user_id": [COLD_CONTENT, COLD_NOTHING], "segment": ["s0", "s1"], "age": [30, 40]})
    pl.concat([users, extra.cast(users.schema)]).write_csv(data / "users.csv")
    vector = np.random.default_rng(1).normal(size=8).astype(np.float32)
    pl.DataFrame({"user_id": [COLD_CONTENT], "vector": [vector.tolist()]}).write_parquet(
        data / "embeddings" / "user_text.parquet")
    out = root / "art"
    # guard off: the ranker's order ships whatever validation says, so both orders can be tested.
    run_nightly(data, out, load_config(None, [*QUIET, "ranker.guard=false"]), show_progress=False)
    return out


def expected_source(user: str, order: str) -> str:
    # Users without history keep their cold-start order whichever order ships: the ranker
    # never learns from them and the guard never checks it on them.
    cold = {COLD_CONTENT: "content", COLD_NOTHING: "popular"}
    return cold.get(user, "ranker" if order == "ranker" else "retrieval")


@pytest.mark.parametrize("use_ranker", [True, False])
def test_recommend_labels_every_row_with_the_list_its_score_comes_from(art: Path, use_ranker: bool) -> None:
    rec = Recommender(art, use_ranker=use_ranker)
    assert rec.order_ == ("ranker" if use_ranker else "retrieval")
    top = rec.recommend(None, k=5)
    assert top.columns == list(TOPK_SCHEMA) and top.schema["source"] == pl.String
    assert {COLD_CONTENT, COLD_NOTHING} <= set(top["user_id"].to_list())
    want = [expected_source(u, rec.order_) for u in top["user_id"].to_list()]
    assert top["source"].to_list() == want
    assert set(want) <= set(SOURCES)
    assert set(want) == {"ranker" if use_ranker else "retrieval", "content", "popular"}
    explained = rec.recommend([COLD_CONTENT, "u001"], k=3, explain=True)
    assert explained["source"].to_list() == [expected_source(u, rec.order_) for u in explained["user_id"].to_list()]


@pytest.mark.parametrize("use_ranker", [True, False])
def test_score_labels_given_pairs_the_same_way(art: Path, use_ranker: bool) -> None:
    rec = Recommender(art, use_ranker=use_ranker)
    pairs = pl.DataFrame({"user_id": ["u001", COLD_CONTENT, COLD_NOTHING, "someone-new"],
                          "item_id": ["i001", "i002", "i003", "i004"]})
    scored = rec.score(pairs)
    assert scored["user_id"].to_list() == pairs["user_id"].to_list()
    want = [expected_source(u, rec.order_) for u in pairs["user_id"].to_list()]
    want[-1] = "popular"  # a user nobody knows has neither history nor content
    assert scored["source"].to_list() == want


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl"])
def test_the_source_column_reads_back_from_every_format(art: Path, tmp_path: Path, suffix: str) -> None:
    top = Recommender(art, use_ranker=False).recommend([COLD_CONTENT, COLD_NOTHING, "u002"], k=3)
    back = read_topk(write_topk(top, tmp_path / f"top{suffix}"))
    assert_frame_equal(back, top)
    assert back["source"].to_list() == ["retrieval"] * 3 + ["content"] * 3 + ["popular"] * 3


def test_the_nightly_export_carries_the_shipped_order_as_source(art: Path) -> None:
    top = pl.read_parquet(art / "exports" / "topk.parquet")
    users = top.group_by("source").agg(pl.col("user_id").n_unique()).sort("source")  # ids pseudonymised
    assert users.rows() == [("content", 1), ("popular", 1), ("ranker", 60)]
    manifest = json.loads((art / "manifest.json").read_text())
    run = next(r for r in manifest["runs"] if r["run_id"] == manifest["latest"]["recommend"])
    assert run["counts"]["users_by_source"] == {"content": 1, "popular": 1, "ranker": 60}


def test_users_without_history_keep_their_cold_start_order_when_the_ranker_ships(art: Path) -> None:
    users = [COLD_CONTENT, COLD_NOTHING, "someone-new", "u001"]
    ranked = Recommender(art).recommend(users, k=5)
    blended = Recommender(art, use_ranker=False).recommend(users, k=5)
    cold = pl.col("user_id") != "u001"
    assert_frame_equal(ranked.filter(cold), blended.filter(cold))
    assert ranked.filter(cold)["score"].to_list() == ranked.filter(cold)["retrieval_score"].cast(pl.Float64).to_list()
    # u001 has history: the ranker's order, its probabilities as scores
    warm = ranked.filter(~cold)
    assert warm["source"].unique().to_list() == ["ranker"] and warm["score"].is_between(0, 1).all()
    assert_frame_equal(warm, Recommender(art).recommend(["u001"], k=5))  # as if asked alone
    explained = Recommender(art).recommend([COLD_CONTENT, "u001"], k=3, explain=True)
    assert explained["user_id"].to_list() == ["u001"] * 3 + [COLD_CONTENT] * 3  # users in id order
    assert explained["contrib_cold_start"].to_list()[3:] == explained["score"].to_list()[3:]
    firsts = [row[0]["feature"] for row in explained["top_features"].to_list()]
    assert firsts[3:] == ["src_cold_start_z"] * 3 and "src_cold_start_z" not in firsts[:3]


def test_score_explains_each_row_by_the_order_its_score_comes_from(art: Path) -> None:
    rec = Recommender(art)
    assert rec.ranker_ is not None
    mixed = rec.score(pl.DataFrame({"user_id": ["u001", COLD_NOTHING], "item_id": ["i001", "i002"]}), explain=True)
    assert mixed["source"].to_list() == ["ranker", "popular"]
    assert mixed["contrib_cold_start"].to_list() == [None, mixed["score"][1]]
    assert mixed["top_features"][1][0]["feature"] == "src_cold_start_z"
    # the ranker's features are there whichever users are asked
    cold_only = rec.score(pl.DataFrame({"user_id": [COLD_NOTHING], "item_id": ["i002"]}))
    assert set(rec.ranker_.feature_names_) <= set(cold_only.columns)
    assert cold_only["score"].to_list() == mixed["score"].to_list()[1:]


def test_score_explains_the_retrieval_order_when_it_ships(art: Path) -> None:
    """Before, `score --explain` returned no explanation at all when the retrieval order shipped
    (most small logs), while `recommend --explain` did."""
    rec = Recommender(art)
    rec.order_ = "retrieval"
    pairs = pl.DataFrame({"user_id": ["u001", COLD_NOTHING], "item_id": ["i001", "i002"]})
    explained = rec.score(pairs, explain=True)
    plain = rec.score(pairs)
    assert explained["score"].to_list() == plain["score"].to_list()
    assert "top_features" not in plain.columns and explained["top_features"].null_count() == 0
    assert explained["contrib_cold_start"].to_list() == [0.0, explained["score"][1]]
    assert explained["top_features"][1][0]["feature"] == "src_cold_start_z"
    assert explained["top_features"][0][0]["feature"] != "src_cold_start_z"


@pytest.mark.parametrize("order", ["ranker", "retrieval"])
def test_score_gives_an_unknown_item_no_score_and_no_list_in_either_order(art: Path, order: str) -> None:
    """Before, the ranker's order gave an item the artifacts do not know a score from its empty
    features, and `source` named a list the row is not in."""
    rec = Recommender(art)
    assert rec.ranker_ is not None
    rec.order_ = order
    pairs = pl.DataFrame({"user_id": ["u001", "u001", COLD_NOTHING], "item_id": ["i001", "zzz", "zzz"]})
    scored = rec.score(pairs)
    assert scored["item_id"].to_list() == ["i001", "zzz", "zzz"]
    assert scored["score"][0] is not None and scored["score"].to_list()[1:] == [None, None]
    assert scored["source"][0] == order and scored["source"].to_list()[1:] == [None, None]
    explained = rec.score(pairs, explain=True)  # its explanation is empty too, not a list of zero contributions
    parts = [c for c in explained.columns if c in ("top_features", "explain_bias") or c.startswith(("contrib_", "share_"))]
    assert "top_features" in parts and len(parts) > 2
    assert explained["top_features"][0] is not None and explained["explain_bias"][0] is not None
    for column in parts:
        assert explained[column].to_list()[1:] == [None, None], column


def test_users_by_source_counts_each_user_once_pinned_rows_included() -> None:
    recs = pl.DataFrame({"user_id": ["a", "a", "a", "b", "b", "c"],
                         "source": [None, "ranker", "ranker", "popular", None, None]})
    assert users_by_source(recs) == {"popular": 1, "ranker": 1, "rerank": 1}


def test_score_gives_users_without_history_the_blend_score(art: Path) -> None:
    pairs = pl.DataFrame({"user_id": ["u001", COLD_NOTHING, "u001"], "item_id": ["i001", "i002", "i003"]})
    scored = Recommender(art).score(pairs)
    assert scored["user_id"].to_list() == ["u001", COLD_NOTHING, "u001"]
    assert scored["item_id"].to_list() == ["i001", "i002", "i003"]
    assert scored["score"][1] == float(scored["retrieval_score"][1])
    ranker = Recommender(art).ranker_
    assert ranker is not None
    alone = Recommender(art).score(pairs.filter(pl.col("user_id") == "u001"))
    assert scored.filter(pl.col("user_id") == "u001")["score"].to_list() == alone["score"].to_list()


def test_the_rerank_step_draws_from_no_deeper_than_the_candidates_the_ranker_reorders(art: Path) -> None:
    rec = Recommender(art)
    rec.depth_ = 1  # as if trained with ranker.depth = 1: it reorders the first k candidates
    steps = RerankConfig(candidates=20, exclude_field="genre", exclude_values=["no such genre"])
    warm_users = [f"u{j:03d}" for j in range(1, 31)]
    listed = rec.recommend([*warm_users, COLD_NOTHING], k=3, rerank=steps)
    ranks = rec.sources_.candidates(warm_users).select("user_id", "item_id", "retrieval_rank")
    warm = listed.filter(pl.col("user_id") != COLD_NOTHING).join(ranks, on=["user_id", "item_id"])
    assert warm.height == 90 and (warm["source"] == "ranker").all()
    assert warm["retrieval_rank"].max() <= 3
    # the ranker does reorder them: its order is not the retrieval order everywhere
    assert (warm["rank"] != warm["retrieval_rank"]).any()
    assert listed.filter(pl.col("user_id") == COLD_NOTHING)["source"].to_list() == ["popular"] * 3


def test_one_user_id_given_as_a_string_is_one_user(art: Path) -> None:
    # Before, rec.recommend("u001") served the users "u", "0" and "1" (a string is iterable),
    # each a stranger with the popular list: no error, wrong lists.
    rec = Recommender(art)
    assert_frame_equal(rec.recommend("u001", k=3), rec.recommend(["u001"], k=3))  # type: ignore[arg-type]
    assert_frame_equal(rec.retriever_.candidates("u001", k=3), rec.retriever_.candidates(["u001"], k=3))  # type: ignore[arg-type]


def test_the_run_record_names_its_inputs(art: Path) -> None:
    # The manifest's record of `run` had inputs {} (only its embed and index records had them).
    runs = json.loads((art / "manifest.json").read_text())["runs"]
    last = {r["command"]: r for r in runs}
    assert last["run"]["inputs"] and last["run"]["inputs"] == last["index"]["inputs"]
    assert {"items.csv", "interactions.csv"} <= set(last["run"]["inputs"])


@pytest.mark.parametrize("raw", [True, False])
def test_the_manifest_says_whether_an_export_holds_raw_ids(art: Path, tmp_path: Path, raw: bool) -> None:
    # `recommend --raw-ids` recorded the config's `pseudonymise = true` beside a file of raw ids.
    from fusionrec.jobs import run_recommend, run_score

    cfg = load_config(None, [f"export.pseudonymise={str(raw).lower()}"])  # the flag says the opposite
    run_recommend(art, tmp_path / "top.csv", cfg, users=["u001"], k=2, pseudonymise_ids=not raw)
    pl.DataFrame({"user_id": ["u001"], "item_id": ["i001"]}).write_csv(tmp_path / "pairs.csv")
    run_score(art, tmp_path / "pairs.csv", tmp_path / "scored.csv", cfg, pseudonymise_ids=not raw)
    runs = json.loads((art / "manifest.json").read_text())["runs"]
    assert [r["config"]["export"]["pseudonymise"] for r in runs[-2:]] == [not raw, not raw]
    assert (pl.read_csv(tmp_path / "top.csv")["user_id"][0] == "u001") is raw


def test_pairs_without_an_id_column_are_an_input_error(art: Path) -> None:
    # Before: polars' ColumnNotFoundError from inside the candidate model.
    from fusionrec.pipeline.errors import InputError

    with pytest.raises(InputError, match="pairs lack column\\(s\\) item_id; has user_id, campaign") as info:
        Recommender(art).score(pl.DataFrame({"user_id": ["u001"], "campaign": ["a"]}))
    assert info.value.field == "item_id" and info.value.exit_code == 2
