"""Top-k lists and pair files: ranking, round trips in three formats, bad input, score vs recommend."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from fusionrec.pipeline.errors import InputError
from fusionrec.ranker.features import behaviour_features
from fusionrec.ranker.labels import make_labels
from fusionrec.ranker.model import Ranker
from fusionrec.ranker.serving.export import drop_seen, read_pairs, read_topk, recommend, topk, write_topk

D = 86_400
FORMATS = [".parquet", ".csv", ".jsonl"]


def scored_rows() -> pl.DataFrame:
    return pl.DataFrame({
        "user_id": ["u2", "u1", "u1", "u1", "u2", "u1", "007"],
        "item_id": ["x", "b", "a", "c,\"q\"", "y", "d", "é"],
        "score": [0.5, 1.0, 1.0, 2.0, 0.7, -1.0, 0.1],
        "retrieval_score": pl.Series([0.25, None, 0.5, 0.125, 0.1, 0.3, 0.2], dtype=pl.Float32),
        "sim_text": [0.0] * 7,
    })


def test_topk_ranks_by_score_then_item_id():
    out = topk(scored_rows(), 2)
    assert out.columns == ["user_id", "rank", "item_id", "score", "retrieval_score", "source"]
    assert out["source"].null_count() == out.height  # the scored rows say nothing of their list
    out = out.drop("source")
    assert out.schema["rank"] == pl.Int32 and out.schema["retrieval_score"] == pl.Float32
    assert out.rows() == [
        ("007", 1, "é", 0.1, pytest.approx(0.2)),
        ("u1", 1, "c,\"q\"", 2.0, 0.125),
        ("u1", 2, "a", 1.0, 0.5),  # ties with b at 1.0: a comes first
        ("u2", 1, "y", 0.7, pytest.approx(0.1)),
        ("u2", 2, "x", 0.5, 0.25),
    ]


def test_topk_does_not_depend_on_input_order():
    rows = scored_rows()
    assert_frame_equal(topk(rows.sample(fraction=1, shuffle=True, seed=5), 3), topk(rows, 3))
    assert topk(rows, 100).height == rows.height
    with pytest.raises(InputError, match="k must be"):
        topk(rows, 0)


def test_topk_without_retrieval_score_fills_null():
    out = topk(scored_rows().drop("retrieval_score"), 1)
    assert out["retrieval_score"].null_count() == out.height


@pytest.fixture(scope="module")
def pipeline_run():
    """A small end-to-end: log, stage-1 candidates, features, labels, a fitted ranker."""
    rng = np.random.default_rng(0)
    users, items = [f"u{i:02d}" for i in range(30)], [f"i{j:02d}" for j in range(40)]
    n = 900
    log = pl.DataFrame({
        "user_id": rng.choice(users, n), "item_id": rng.choice(items, n),
        "timestamp": rng.integers(0, 60 * D, n), "event": rng.choice(["view", "click", "purchase"], n),
        "value": pl.Series([None] * n, dtype=pl.Float64)})
    catalogue = pl.DataFrame({"item_id": items, "tags": [f"t{j % 5}|t{j % 3 + 5}" for j in range(40)],
                              "price": rng.uniform(1, 100, 40), "brand": [f"b{j % 4}" for j in range(40)]})
    cand = pl.DataFrame({"user_id": np.repeat(users, 15),
                         "item_id": np.concatenate([rng.choice(items, 15, replace=False) for _ in users])})
    cand = cand.with_columns(
        pl.Series("retrieval_score", rng.random(cand.height), dtype=pl.Float32),
        pl.Series("sim_text", rng.random(cand.height), dtype=pl.Float32),
        pl.Series("sim_image", np.where(rng.random(cand.height) < 0.3, np.nan, rng.random(cand.height)),
                  dtype=pl.Float32).fill_nan(None),
        pl.Series("attn_text", rng.random(cand.height), dtype=pl.Float32),
    ).with_columns(pl.col("retrieval_score").rank("ordinal", descending=True).over("user_id")
                   .cast(pl.Int32).alias("retrieval_rank"))
    cutoff = 45 * D
    feats = behaviour_features(cand, log, catalogue, cutoff)
    labelled = make_labels(feats, log, cutoff, 60 * D)
    model = Ranker(n_estimators=30, min_child_samples=5).fit(labelled, labelled["label"], labelled["user_id"])
    return dict(log=log, items=catalogue, cand=cand, cutoff=cutoff, feats=feats, model=model)


@pytest.mark.parametrize("suffix", FORMATS)
def test_export_round_trip_is_identical(pipeline_run, tmp_path, suffix):
    run = pipeline_run
    listed = recommend(run["model"], run["feats"], 5, explain=True, top=3)
    # A null retrieval score, an empty explanation and awkward ids must survive too.
    listed = listed.with_columns(
        pl.when(pl.col("rank") == 2).then(None).otherwise(pl.col("retrieval_score")).alias("retrieval_score"),
        pl.when(pl.col("rank") == 3).then(pl.lit([], dtype=listed.schema["top_features"]))
        .otherwise(pl.col("top_features")).alias("top_features"),
        pl.when(pl.col("rank") == 4).then(pl.lit("0,\"7\"\n")).otherwise(pl.col("item_id")).alias("item_id"))
    assert listed.schema["top_features"].is_nested() and "share_text" in listed.columns
    path = write_topk(listed, tmp_path / f"top{suffix}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"top{suffix}"]  # no temporary left behind
    assert_frame_equal(read_topk(path), listed)


def test_csv_holds_explanations_as_json_text(pipeline_run, tmp_path):
    scored = pipeline_run["model"].score(pipeline_run["feats"].head(4), explain=True, top=2)
    write_topk(topk(scored, 1), tmp_path / "top.csv")
    raw = pl.read_csv(tmp_path / "top.csv")
    assert raw.schema["top_features"] == pl.String
    assert raw["top_features"][0].startswith('[{"feature":')


def test_plain_export_without_explanations(pipeline_run, tmp_path):
    listed = topk(pipeline_run["model"].score(pipeline_run["feats"]), 3)
    for suffix in FORMATS:
        assert_frame_equal(read_topk(write_topk(listed, tmp_path / f"plain{suffix}")), listed)


def test_write_refuses_unknown_format(tmp_path):
    with pytest.raises(InputError, match=r"top\.xlsx.*use \.parquet, \.csv or \.jsonl") as info:
        write_topk(topk(scored_rows(), 1), tmp_path / "top.xlsx")
    assert info.value.exit_code == 2
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", FORMATS)
@pytest.mark.parametrize("missing", ["user_id", "item_id"])
def test_pair_file_without_an_id_column_is_bad_input(tmp_path, suffix, missing):
    frame = pl.DataFrame({"user_id": ["u1"], "item_id": ["a"], "extra": [1]}).drop(missing)
    path = tmp_path / f"pairs{suffix}"
    {".parquet": frame.write_parquet, ".csv": frame.write_csv, ".jsonl": frame.write_ndjson}[suffix](path)
    with pytest.raises(InputError) as info:
        read_pairs(path)
    assert info.value.exit_code == 2 and info.value.field == missing and info.value.file == str(path)
    assert str(path) in str(info.value) and f"'{missing}'" in str(info.value)


def test_pair_file_ids_stay_text_and_empty_ids_name_the_row(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("user_id,item_id,note\n007,0042,x\n8,9,y\n")
    pairs = read_pairs(path)
    assert pairs["user_id"].to_list() == ["007", "8"] and pairs["item_id"].to_list() == ["0042", "9"]
    path.write_text("user_id,item_id\nu1,a\nu2,\n")
    with pytest.raises(InputError, match="row 2") as info:
        read_pairs(path)
    assert info.value.field == "item_id"
    with pytest.raises(InputError, match="no such file"):
        read_pairs(tmp_path / "absent.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(InputError, match="empty"):
        read_pairs(tmp_path / "empty.csv")


def test_score_and_recommend_agree_for_the_same_pairs(pipeline_run, tmp_path):
    run = pipeline_run
    model, cand, cutoff = run["model"], run["cand"], run["cutoff"]
    # recommend: every candidate of every user, top 5 per user, exported and read back.
    recommended = read_topk(write_topk(recommend(model, run["feats"], 5), tmp_path / "top.jsonl"))

    # score: a pair file in another order, with a few of those pairs plus unknown ones.
    asked = recommended.select("user_id", "item_id").sample(fraction=0.5, shuffle=True, seed=1)
    unknown = pl.DataFrame({"user_id": ["nobody", "u01"], "item_id": ["i01", "no-such-item"]})
    pl.concat([asked, unknown]).write_csv(tmp_path / "pairs.csv")
    pairs = read_pairs(tmp_path / "pairs.csv")
    # The stage-1 columns for given pairs come from the retriever; unknown pairs get none.
    with_stage1 = pairs.join(cand, on=["user_id", "item_id"], how="left", maintain_order="left")
    scored = model.score(behaviour_features(with_stage1, run["log"], run["items"], cutoff))
    assert scored.height == pairs.height
    assert scored["score"].is_finite().all()  # cold users and items are scored, not refused

    both = scored.join(recommended, on=["user_id", "item_id"], how="inner", suffix="_rec")
    assert both.height == asked.height
    assert both["score"].to_list() == both["score_rec"].to_list()


def test_drop_seen_removes_past_interactions_only(pipeline_run):
    run = pipeline_run
    kept = drop_seen(run["cand"], run["log"], cutoff=run["cutoff"])
    past = run["log"].filter(pl.col("timestamp") < run["cutoff"]).select("user_id", "item_id").unique()
    assert kept.join(past, on=["user_id", "item_id"], how="semi").height == 0
    assert kept.height + run["cand"].join(past, on=["user_id", "item_id"], how="semi").height == run["cand"].height


def test_recommend_explains_only_the_kept_rows(pipeline_run):
    model, feats = pipeline_run["model"], pipeline_run["feats"]
    plain = recommend(model, feats, 4)
    explained = recommend(model, feats, 4, explain=True, top=2)
    assert plain.columns == ["user_id", "rank", "item_id", "score", "retrieval_score", "source"]
    assert plain["source"].unique().to_list() == ["ranker"]
    assert_frame_equal(explained.select(plain.columns), plain)
    assert explained.height == 30 * 4
    # The explanation of a kept row is the one of that candidate row, and adds up to its score.
    rows = feats.join(plain.select("user_id", "item_id", "rank"), on=["user_id", "item_id"]).sort("user_id", "rank")
    assert_frame_equal(explained.select("top_features", "explain_bias", "^contrib_.*$", "^share_.*$"),
                       model.explain(rows, top=2))
    total = explained.select(pl.sum_horizontal(pl.col("^contrib_.*$")) + pl.col("explain_bias")).to_series()
    assert np.allclose(total.to_numpy(), explained["score"].to_numpy())
