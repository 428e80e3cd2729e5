"""The train stage's contract: per-user labels without leakage, the guard, short logs, user attributes.

Runs the real stages (sources, FAISS retrieval, LightGBM) on small synthetic catalogs with
precomputed item vectors, so no encoder is loaded.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusionrec.jobs import run_index, run_nightly
from fusionrec.pipeline.config import load_config
from fusionrec.pipeline.errors import FusionrecError
from fusionrec.pipeline.io.manifest import read_manifest
from fusionrec.pipeline.retrieval.candidates import CandidateModel, label_split
from fusionrec.pipeline.retrieval.stage import Catalog, label_windows
from fusionrec.ranker import training
from fusionrec.ranker.serving.recommender import Recommender
from fusionrec.ranker.training import guard_ranker, pair_features

QUIET = ["sources.names=['itemknn','recent_itemknn','popular','segment_popular']", "ranker.n_estimators=60"]


def make_catalog(root: Path, *, n_users: int = 90, n_items: int = 60, per_user: int = 14, timestamps: str = "real",
                 seed: int = 0, attribute_drives_taste: bool = False, tags: bool = False) -> Path:
    """items (8-d precomputed vectors, 4 clusters), users with `segment` and `age`, interactions.

    Each user likes one cluster (or, with `attribute_drives_taste`, the cluster named by
    their segment); timestamps: "real" (distinct per user), "one" (a single value), "two".
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    items = [f"i{j:03d}" for j in range(n_items)]
    cluster = np.arange(n_items) % 4
    centres = rng.normal(size=(4, 8))
    vectors = centres[cluster] + 0.3 * rng.normal(size=(n_items, 8))
    table = pl.DataFrame({"item_id": items, "genre": [f"g{c}" for c in cluster]})
    if tags:  # `tags`: each item's cluster, and one tag every item shares
        table = table.with_columns(pl.format("cluster {}|catalog", "genre").alias("tags"))
    table.write_csv(root / "items.csv")
    (root / "embeddings").mkdir(exist_ok=True)
    pl.DataFrame({"item_id": items, "vector": vectors.astype(np.float32).tolist()}).write_parquet(
        root / "embeddings" / "item_text.parquet")
    users = [f"u{j:03d}" for j in range(n_users)]
    segment = rng.integers(0, 4, n_users)
    pl.DataFrame({"user_id": users, "segment": [f"s{s}" for s in segment],
                  "age": rng.integers(18, 70, n_users)}).write_csv(root / "users.csv")
    rows = []
    for u, user in enumerate(users):
        liked = segment[u] if attribute_drives_taste else rng.integers(0, 4)
        pool = np.flatnonzero(cluster == liked)
        others = np.flatnonzero(cluster != liked)
        n_other = min(3, per_user // 4)
        picks = list(rng.choice(pool, size=min(len(pool), per_user - n_other), replace=False)) + \
            list(rng.choice(others, size=n_other, replace=False))
        rng.shuffle(picks)
        for t, j in enumerate(picks):
            ts = {"real": 1_600_000_000 + u * 10_000 + t * 600, "one": 1_600_000_000,
                  "two": 1_600_000_000 + 86_400 * int(t >= per_user - 3)}[timestamps]
            rows.append((user, items[j], ts, 5.0 if cluster[j] == liked else 2.0))
    pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp", "value"], orient="row").write_csv(
        root / "interactions.csv")
    return root


def nightly(data: Path, art: Path, *extra: str) -> None:
    run_nightly(data, art, load_config(None, [*QUIET, *extra]), show_progress=False)


def test_the_index_stage_tries_the_items_tags_and_records_whether_they_won(tmp_path: Path) -> None:
    config = load_config(None, QUIET)

    def index(data: Path) -> dict:
        art = tmp_path / f"art_{data.name}"
        shutil.copytree(data / "embeddings", art / "embeddings")  # precomputed: nothing to embed
        return run_index(data, art, config)

    with_tags = index(make_catalog(tmp_path / "tagged", tags=True))
    record = with_tags["sources"]["tags"]
    assert set(record) == {"itemknn", "recent_itemknn"}  # the chosen sources that have settings with tags
    for entry in record.values():
        low, high = entry["interval"]
        assert low <= entry["tags_minus_plain"] <= high and entry["tags_chosen"] == (low > 0)
    for name, entry in record.items():
        assert bool(with_tags["sources"]["params"][name].get("tag_weight")) == entry["tags_chosen"]
    without = index(make_catalog(tmp_path / "plain"))
    assert without["sources"]["tags"] == {}
    assert not any(p.get("tag_weight") for p in without["sources"]["params"].values())


@pytest.mark.parametrize("timestamps", ["one", "two"])
def test_a_log_with_one_or_two_distinct_timestamps_exports_with_exit_0(tmp_path: Path, timestamps: str) -> None:
    data = make_catalog(tmp_path / "data", timestamps=timestamps)
    art = tmp_path / "art"
    nightly(data, art)
    top = pl.read_parquet(art / "exports" / "topk.parquet")
    assert top["user_id"].n_unique() == 90 and top.group_by("user_id").len()["len"].min() == 10
    train = next(r for r in read_manifest(art)["runs"] if r["command"] == "train")
    assert train["training"]["order"] in ("ranker", "retrieval")
    assert train["status"] == "ok"
    guard = json.loads((art / "ranker" / "guard.json").read_text())
    assert guard["order"] == "ranker" or guard["reason"]  # retrieval order always says why


def test_a_fixed_split_gets_an_earlier_random_window_of_the_same_share() -> None:
    """Last.fm's 0/1/2 split carried in `timestamp`: labels at 1, features at 0 and no time
    before. The earlier window holds out each user's random share of the feature part, as
    large a share of it as the latest window is of the log, and never a label row."""
    rng = np.random.default_rng(3)
    rows = [(f"u{u:03d}", f"i{j:03d}", int(t >= 18), 1.0) for u in range(60)
            for t, j in enumerate(rng.choice(80, size=20, replace=False))]
    log = pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp", "value"], orient="row")
    cfg = load_config(None, ["ranker.labels=window"])
    split = label_split(log, "window", fraction=0.2, window_days=14, threshold=None)
    assert split is not None and split.protocol == "window" and split.held["timestamp"].unique().to_list() == [1]
    windows = label_windows(split, cfg, None)
    assert len(windows) == 2
    earlier = windows[1]
    assert earlier.protocol == "per_user"
    assert earlier.fit.height + earlier.held.height == split.fit.height  # only the feature part is split
    assert earlier.fit.join(earlier.held, on=["user_id", "item_id"], how="semi").height == 0  # features never see a label
    assert earlier.held["timestamp"].unique().to_list() == [0]
    share = split.held.height / log.height  # 2 of each user's 20
    assert earlier.held.group_by("user_id").len()["len"].to_list() == [round(share * 18)] * 60
    # random within a user, not the rows' file order: the held rows are not each user's last ones
    last = log.filter(pl.col("timestamp") == 0).group_by("user_id", maintain_order=True).tail(2)
    assert earlier.held.join(last, on=["user_id", "item_id"], how="anti").height > 0
    # A backfilled history (one timestamp) before a window of real times is not a fixed
    # split: it keeps its single window.
    timed = log.with_columns(pl.when(pl.col("timestamp") == 1).then(1_600_000_000 + 60 * pl.int_range(pl.len()))
                             .otherwise(0).alias("timestamp"))
    split = label_split(timed, "window", fraction=0.2, window_days=14, threshold=None)
    assert split is not None and split.fit["timestamp"].n_unique() == 1 and split.held["timestamp"].n_unique() > 1
    assert label_windows(split, cfg, None) == [split]


def test_a_fixed_split_is_checked_forward_on_its_real_window(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                                              ) -> None:
    """The nightly job on a two-value fixed split: two label windows reach the guard, whose
    forward check learns on the random earlier window and judges on the real one."""
    data = make_catalog(tmp_path / "data", timestamps="two")
    art = tmp_path / "art"
    nightly(data, art, "ranker.labels=window")
    guard = json.loads((art / "ranker" / "guard.json").read_text())
    assert guard.get("reason") != training.SINGLE_WINDOW
    forward = guard["guard"]["forward"]
    assert forward is not None and forward["users"] >= training.MIN_FORWARD_USERS
    assert Recommender(art).order_ == guard["order"]
    assert pl.read_parquet(art / "exports" / "topk.parquet")["user_id"].n_unique() == 90


def test_a_log_too_short_for_labels_trains_nothing_and_exports_retrieval_order(tmp_path: Path,
                                                                              caplog: pytest.LogCaptureFixture) -> None:
    data = make_catalog(tmp_path / "data", n_users=10, per_user=2)  # one label each, too few users
    art = tmp_path / "art"
    nightly(data, art)
    guard = json.loads((art / "ranker" / "guard.json").read_text())
    assert guard["order"] == "retrieval" and "too short" in guard["reason"]
    assert not (art / "ranker" / "model.txt").exists()
    assert "retrieval order is exported" in caplog.text
    top = pl.read_parquet(art / "exports" / "topk.parquet")
    assert top["user_id"].n_unique() == 10
    assert Recommender(art).order_ == "retrieval"


def _rows(n_users: int, informative: str, seed: int = 0, window: int = 0) -> pl.DataFrame:
    """Candidate rows where retrieval order, a feature (`item_signal`) or the feature's opposite
    ("anti") finds the labels; `history` differs between windows (as a user's history grows)."""
    rng = np.random.default_rng(seed)
    frames = []
    for u in range(n_users):
        n = 30
        label = np.zeros(n, np.int32)
        label[rng.choice(n, 3, replace=False)] = 1
        signal = (1 - label if informative == "anti" else label) + 0.1 * rng.normal(size=n)
        if informative == "retrieval":
            rank = np.argsort(np.argsort(-(label + 0.01 * rng.normal(size=n)))) + 1
            signal = rng.normal(size=n)
        else:
            rank = rng.permutation(n) + 1
        frames.append(pl.DataFrame({"user_id": f"u{u}", "item_id": [f"i{j}" for j in range(n)],
                                    "retrieval_rank": rank.astype(np.int32), "retrieval_score": -rank.astype(np.float32),
                                    "item_signal": signal.astype(np.float32), "history": np.full(n, 10 - 5 * window),
                                    "label": label, "label_window": np.full(n, window, np.int8)}))
    return pl.concat(frames)


def _two_windows(latest: str, earlier: str, n_users: int = 120) -> pl.DataFrame:
    return pl.concat([_rows(n_users, latest, seed=0, window=0), _rows(n_users, earlier, seed=1, window=1)])


def test_the_grid_ndcg_equals_the_row_ndcg_ties_and_ragged_queries_included(monkeypatch: pytest.MonkeyPatch
                                                                              ) -> None:
    """`QueryGrid` only lays rows out differently: the same per-query NDCG@10 (ties keep row
    order) and so the same blend weights as sorting the rows themselves."""
    rng = np.random.default_rng(5)
    sizes = rng.integers(3, 40, 200)
    user = rng.permutation(np.repeat(np.arange(200), sizes))  # queries interleaved, uneven lengths
    label = (rng.random(len(user)) < 0.15).astype(np.int32)
    grid = training.QueryGrid(user, label)
    assert grid.shape == (200, sizes.max()) and training.QueryGrid.fits(user)
    odd = rng.normal(size=len(user))
    odd[rng.random(len(user)) < 0.1], odd[rng.random(len(user)) < 0.1] = np.nan, -np.inf  # NaN after -inf
    for score in (np.round(rng.normal(size=len(user)), 1), np.zeros(len(user)), rng.normal(size=len(user)), odd):
        by_rows = training.ndcg_rows(user, score, label)
        by_grid = grid.ndcg(np.where(grid.padding, np.nan, grid.grid(score, 0.0)))
        np.testing.assert_allclose(by_grid, by_rows, rtol=0, atol=1e-12)
        assert 0 < by_rows.mean() < 1
    # queries under k rows: alone (no partition) and inside a wider grid; +inf, -inf, NaN, an all-NaN query
    for sizes in (rng.integers(1, 9, 50), np.r_[rng.integers(1, 9, 40), rng.integers(10, 30, 10)]):
        short = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
        short_label = (rng.random(len(short)) < 0.4).astype(np.int32)
        short_score = np.round(rng.normal(size=len(short)), 1)
        short_score[rng.random(len(short)) < 0.1] = np.inf
        short_score[rng.random(len(short)) < 0.1] = -np.inf
        short_score[(rng.random(len(short)) < 0.1) | (short == 0)] = np.nan
        short_grid = training.QueryGrid(short, short_label)
        np.testing.assert_allclose(
            short_grid.ndcg(np.where(short_grid.padding, np.nan, short_grid.grid(short_score, 0.0))),
            training.ndcg_rows(short, short_score, short_label), rtol=0, atol=1e-12)
    rows = pl.concat([_rows(60, "feature", seed=2), _rows(60, "retrieval", seed=3, window=1)]).with_columns(
        src_a_z=pl.col("item_signal"), src_b_z=-pl.col("retrieval_rank").cast(pl.Float64),
        src_c_z=pl.Series(np.round(rng.normal(size=3600), 1)))
    columns = ["src_a_z", "src_b_z", "src_c_z"]
    on_grid = training.blend_weights(rows, columns)
    monkeypatch.setattr(training.QueryGrid, "MAX_PADDING", 0)  # too much padding: the row path
    assert training.blend_weights(rows, columns) == on_grid
    assert on_grid["src_a_z"] > 0 and on_grid["src_b_z"] > 0


def test_the_ranker_fits_on_every_positive_and_a_seeded_share_of_negatives() -> None:
    """`ranker.negative_share` keeps each positive row and about that share of the negatives,
    the same rows whatever their order, a different draw for another seed; 1.0 keeps all."""
    rows = pl.concat([_rows(60, "feature", seed=2), _rows(60, "retrieval", seed=3, window=1)])
    positives = rows.filter(pl.col("label") > 0)
    assert training.fitting_rows(rows, load_config(None)).equals(rows)
    config = load_config(None, ["ranker.negative_share=0.25"])
    kept = training.fitting_rows(rows, config)
    keys = ["user_id", "item_id", "label_window"]
    assert positives.select(keys).join(kept.select(keys), on=keys, how="anti").height == 0
    share = kept.filter(pl.col("label") == 0).height / rows.filter(pl.col("label") == 0).height
    assert 0.2 < share < 0.3
    shuffled = training.fitting_rows(rows.sample(fraction=1.0, shuffle=True, seed=1), config)
    assert shuffled.sort(keys).equals(kept.sort(keys))
    other = training.fitting_rows(rows, load_config(None, ["ranker.negative_share=0.25", "ranker.seed=1"]))
    assert not other.sort(keys).equals(kept.sort(keys))


def test_sampled_negatives_are_weighted_back_so_scores_keep_the_base_rate() -> None:
    """A ranker fitted on a quarter of the negatives, each weighing 4, predicts about the true
    share of positives (a tenth here), as the full fit does; a bad weight is refused."""
    rows = _rows(200, "feature", seed=4)
    quarter = load_config(None, [*QUIET[1:], "ranker.negative_share=0.25"])
    full, sampled = training.fit_ranker(rows, load_config(None, QUIET[1:])), training.fit_ranker(rows, quarter)
    assert training.fitting_rows(rows, quarter).height < 0.4 * rows.height
    for model in (full, sampled):
        assert abs(float(model.predict(rows).mean()) - 0.1) < 0.02
    with pytest.raises(FusionrecError, match="sample_weight needs finite, non-negative weights"):
        full.fit(rows, rows["label"], training.query_ids(rows), sample_weight=np.full(rows.height, -1.0))
    with pytest.raises(FusionrecError, match=rf"one weight per row \({rows.height} rows\), not shape \(3,\)"):
        full.fit(rows, rows["label"], training.query_ids(rows), sample_weight=np.ones(3))


def test_a_ranker_fit_gives_the_same_model_on_one_thread_as_on_two() -> None:
    """What lets the guard's fits run side by side, one thread each: the same scores to the bit."""
    rows = _rows(200, "feature", seed=5)
    config = load_config(None, QUIET[1:])
    one, two = training.fit_ranker(rows, config, threads=1), training.fit_ranker(rows, config, threads=2)
    assert one.params_["num_threads"] == 1 and two.params_["num_threads"] == 2
    assert np.array_equal(one.predict(rows), two.predict(rows))


def test_side_by_side_fits_come_back_in_order_with_the_cores_shared(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(training, "cores", lambda: 4)
    got = training.fits_side_by_side([lambda threads, j=j: (j, threads) for j in range(2)])
    assert got == [(0, 2), (1, 2)]  # two fits on four cores: two threads each
    got = training.fits_side_by_side([lambda threads, j=j: (j, threads) for j in range(6)])
    assert got == [(j, 1) for j in range(6)]
    # Fits too large to hold two at once run one after another, each on every core.
    got = training.fits_side_by_side([lambda threads, j=j: (j, threads) for j in range(3)],
                                     matrix_bytes=training.SIDE_BY_SIDE_MAX_BYTES + 1)
    assert got == [(j, 4) for j in range(3)]


def test_the_guard_fits_the_final_model_beside_its_own_and_returns_it() -> None:
    rows = _two_windows("feature", "feature")
    cfg = load_config(None, ["ranker.n_estimators=50"])
    calls: list[int] = []

    def final(threads: int) -> str:
        calls.append(threads)
        return "the final model"

    with_final, alone = guard_ranker(rows, cfg, final=final), guard_ranker(rows, cfg)
    assert with_final.pop("final_model") == "the final model" and len(calls) == 1
    assert "final_model" not in alone and with_final == alone  # the verdict does not change


def test_the_guard_keeps_retrieval_order_when_the_ranker_is_not_better() -> None:
    cfg = load_config(None, ["ranker.n_estimators=50"])
    guard = guard_ranker(_two_windows("retrieval", "retrieval"), cfg)
    assert guard["ships"] is False
    assert guard["ndcg@10"]["retrieval"] >= guard["ndcg@10"]["ranker"] - 1e-9
    assert guard["interval"][0] <= 0
    assert guard["reason"] == "the ranker did not beat the retrieval order on held-out users"


def test_the_guard_ships_a_ranker_that_beats_retrieval_order_across_users_and_forward() -> None:
    cfg = load_config(None, ["ranker.n_estimators=50"])
    guard = guard_ranker(_two_windows("feature", "feature"), cfg)
    assert guard["ships"] is True and guard["interval"][0] > 0 and guard["reason"] == ""
    assert guard["ndcg@10"]["ranker"] > guard["ndcg@10"]["retrieval"] + 0.2
    assert guard["users"] == 120  # each user's two windows averaged: one value a user
    forward = guard["forward"]
    assert forward["wins"] is True and forward["interval"][0] > 0
    assert forward["users"] == 120  # every window-0 user, scored by a ranker that saw window 1 only


def test_a_ranker_that_wins_across_users_but_loses_forward_does_not_ship() -> None:
    """What the feature means flips between windows (the ranker can tell them apart by
    `history`): across users the ranker learns both and wins; learned on the earlier window
    alone and applied to the latest, it is clearly worse than the retrieval order. (LambdaRank:
    it orders within each user's window, so in 50 rounds it learns each window's meaning; the
    binary objective pools the windows' rows and needs the interaction with `history` first.)"""
    cfg = load_config(None, ["ranker.n_estimators=50", "ranker.objective=lambdarank"])
    guard = guard_ranker(_two_windows("feature", "anti"), cfg)
    assert guard["interval"][0] > 0  # across users it wins
    assert guard["forward"]["harms"] is True and guard["forward"]["interval"][1] < 0
    assert guard["ships"] is False
    assert "earlier label window was worse" in guard["reason"]


def test_a_noisy_forward_check_without_a_clear_loss_does_not_veto() -> None:
    """Retrieval finds the earlier window's labels, the feature the latest's: learned on the
    earlier window the ranker follows retrieval order, no worse than it on the latest."""
    cfg = load_config(None, ["ranker.n_estimators=50"])
    guard = guard_ranker(_two_windows("feature", "retrieval"), cfg)
    assert guard["interval"][0] > 0 and guard["forward"]["harms"] is False
    assert guard["ships"] is True


def test_a_single_label_window_cannot_ship_a_ranker() -> None:
    """Last.fm's fixed split leaves one label window: nothing later than the labels to check on."""
    cfg = load_config(None, ["ranker.n_estimators=50"])
    guard = guard_ranker(_rows(120, "feature"), cfg)
    assert guard["interval"][0] > 0 and guard["forward"] is None
    assert guard["ships"] is False and "one label window only" in guard["reason"]


def test_a_worse_ranker_is_not_shipped_by_the_nightly_job(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """When the guard finds the ranker worse (the decision itself is tested above on rows where
    it is), the night exports the retrieval order and says so in the log, guard.json and the manifest."""
    real = training.guard_ranker

    def losing(rows: pl.DataFrame, config: object, final: object = None) -> dict:
        result = real(rows, config, final=final)
        return {**result, "ndcg@10": {"ranker": 0.1, "retrieval": 0.2}, "difference": -0.1,
                "interval": [-0.12, -0.08], "ships": False}

    monkeypatch.setattr(training, "guard_ranker", losing)
    data = make_catalog(tmp_path / "data")
    art = tmp_path / "art"
    nightly(data, art)
    guard = json.loads((art / "ranker" / "guard.json").read_text())
    assert guard["order"] == "retrieval" and guard["guard"]["ships"] is False
    assert "retrieval order is exported" in caplog.text
    rec = Recommender(art)
    assert rec.order_ == "retrieval"
    exported = pl.read_parquet(art / "exports" / "topk.parquet")
    blend = rec.sources_.candidates(sorted(exported["user_id"].unique().to_list()))
    expected = blend.filter(pl.col("retrieval_rank") <= 10).sort("user_id", "retrieval_rank")
    got = exported.sort("user_id", "rank")
    # Pseudonymised ids: compare the item sequences user by user in id order.
    assert got["item_id"].to_list() != [] and len(got) == len(expected)
    runs = read_manifest(art)["runs"]
    assert next(r for r in runs if r["command"] == "train")["models"]["order"] == "retrieval"
    # --explain on the retrieval order: each source's weight times its z-score, summing to the score.
    explained = rec.recommend(["u001", "u002"], 5, explain=True)
    contrib = [c for c in explained.columns if c.startswith("contrib_")]
    assert contrib and explained.height == 10
    total = explained.select(pl.sum_horizontal(*contrib).alias("t"))["t"]
    assert np.allclose(total.to_numpy(), explained["score"].to_numpy(), atol=1e-4)
    assert explained["top_features"].list.len().min() >= 1


def test_user_attributes_reach_the_model(tmp_path: Path) -> None:
    data = make_catalog(tmp_path / "data", attribute_drives_taste=True, n_users=160)
    art = tmp_path / "art"
    nightly(data, art, "ranker.guard=false")
    features = json.loads((art / "ranker" / "features.json").read_text())
    names = features["features"] if isinstance(features, dict) and "features" in features else features
    assert "user_attr_segment" in json.dumps(names) and "user_attr_age" in json.dumps(names)
    rec = Recommender(art)
    assert rec.order_ == "ranker"
    assert set(rec.sources_.segment_names_) == {"segment", "age"}


def test_the_ranker_reorders_the_first_depth_candidates_it_was_trained_on(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_catalog(tmp_path / "data", n_users=60)
    art = tmp_path / "art"
    seen: list[int] = []
    real = training.guard_ranker

    def spy(rows: pl.DataFrame, config: object, final: object = None) -> dict:
        seen.append(int(rows["retrieval_rank"].max()))
        return real(rows, config, final=final)

    monkeypatch.setattr(training, "guard_ranker", spy)
    nightly(data, art, "ranker.guard=false", "ranker.depth=15")
    assert seen == [15]  # training rows: the first 15 of each user's retrieval order only
    assert json.loads((art / "ranker" / "guard.json").read_text())["depth"] == 15
    rec = Recommender(art)
    assert rec.order_ == "ranker"
    users = rec.known_users_[:5]
    top = rec.recommend(users, 10)
    blend = rec.sources_.candidates(users).select("user_id", "item_id", "retrieval_rank")
    ranks = top.join(blend, on=["user_id", "item_id"], how="left")["retrieval_rank"]
    assert ranks.max() <= 15 and top.height == 50
    # Asked for more than the depth, the ranker orders the first k.
    assert rec.recommend(users, 20).group_by("user_id").len()["len"].min() == 20


def test_a_ranker_trained_on_an_older_index_is_not_served(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = make_catalog(tmp_path / "data", n_users=60)
    art = tmp_path / "art"
    nightly(data, art, "ranker.guard=false")
    assert Recommender(art).order_ == "ranker"
    run_index(data, art, load_config(None, [*QUIET, "index.n_candidates=40"]))  # the index changes, train does not
    rec = Recommender(art)
    assert rec.order_ == "retrieval"
    assert "trained on an older index" in caplog.text


def test_serving_checks_the_rankers_lineage_without_hashing_the_files_again(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # Retriever.load has just checked every lineage file against retriever.json: the lineage
    # reads those digests, the same values as hashing the files, and hashes nothing again.
    data = make_catalog(tmp_path / "data", n_users=60)
    art = tmp_path / "art"
    nightly(data, art, "ranker.guard=false")
    hashed = training.lineage(art)
    assert len(hashed) == 4
    calls: list[str] = []
    real = training.sha256_file
    monkeypatch.setattr(training, "sha256_file", lambda path: calls.append(str(path)) or real(path))
    rec = Recommender(art)
    assert rec.order_ == "ranker" and calls == []
    assert training.lineage(art, rec.retriever_.verified_files_) == hashed and calls == []


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), shift=st.integers(1, 50))
def test_per_user_labels_never_leak_into_features(tmp_path: Path, seed: int, shift: int) -> None:
    """Changing every held-out label interaction (its item) changes no feature of any training row."""
    data = make_catalog(tmp_path / f"d{seed}_{shift}", n_users=30, seed=seed)
    inter = pl.read_csv(data / "interactions.csv", schema_overrides={"user_id": pl.String, "item_id": pl.String})
    items = pl.read_csv(data / "items.csv")
    users = pl.read_csv(data / "users.csv")
    split = label_split(inter, "per_user", fraction=0.2, window_days=14, threshold=4.0, min_users=1)
    assert split is not None and split.protocol == "per_user"
    # Swap the label rows' items for others (same users, same timestamps: the split is unchanged).
    ids = sorted(items["item_id"].to_list())
    moved = split.held.with_columns(pl.col("item_id").map_elements(
        lambda i: ids[(ids.index(i) + shift) % len(ids)], return_dtype=pl.String))
    other = pl.concat([split.fit, moved])
    split2 = label_split(other, "per_user", fraction=0.2, window_days=14, threshold=4.0, min_users=1)
    assert split2 is not None
    assert split2.fit.sort("user_id", "timestamp").equals(split.fit.sort("user_id", "timestamp"))

    def features(log: pl.DataFrame, fit: pl.DataFrame) -> pl.DataFrame:
        model = CandidateModel(n_candidates=20, threshold=4.0, params={"itemknn": {}, "recent_itemknn": {},
                                                                       "popular": {}, "segment_popular": {}},
                               weights={"itemknn": 1.0, "recent_itemknn": 1.0}).fit(
            fit, np.array(ids, dtype=object), users, None)
        cands = model.candidates(sorted(fit["user_id"].unique().to_list()))
        return pair_features(cands, Catalog(items, users, log), fit).sort("user_id", "item_id")

    a, b = features(inter, split.fit), features(other, split2.fit)
    assert a.equals(b)
    assert not any(c == "label" for c in a.columns)


def test_a_swapped_data_snapshot_is_refused_naming_the_file(tmp_path: Path) -> None:
    """A valid Parquet file with other content put in place of ART/data/interactions.parquet is not served."""
    data = make_catalog(tmp_path / "data", n_users=30)
    art = tmp_path / "art"
    nightly(data, art)
    snapshot = art / "data" / "interactions.parquet"
    pl.read_parquet(snapshot).head(10).write_parquet(snapshot)
    with pytest.raises(FusionrecError, match=r"interactions\.parquet does not match the checksum.*fusionrec index"):
        Recommender(art)


def test_no_labelled_user_in_the_latest_window_trains_no_ranker_instead_of_crashing(tmp_path: Path) -> None:
    """Each user active in a time block of their own, on a periodic pattern of items: every held-out
    item of the latest label window is one its user had already, so no user has a held-out
    positive there. The guard's forward check then judged on no row and failed with "IndexError:
    index 0 out-of-bounds in add.reduceat" (exit 1, "unexpected"); now the index stage keeps the
    sources' defaults, no ranker is trained, and the night ends."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "items.csv").write_text("item_id\n" + "".join(f"i{i:02d}\n" for i in range(30)))
    rows = [f"u{u:02d},i{(u * 7 + j * 5) % 30:02d},{1_700_000_000 + u * 1000 + j * 10}" for u in range(20)
            for j in range(8)]
    (data / "interactions.csv").write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    art = tmp_path / "art"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        night = run_nightly(data, art, load_config(None, []), show_progress=False)
    assert night.rows > 0 and not (art / "ranker" / "model.txt").exists()
    train = [r for r in read_manifest(art)["runs"] if r["command"] == "train"][-1]
    assert train["status"] == "ok"
    # The index stage sees it first: every source setting and blend weight would be judged on no
    # user (NDCG nan, numpy's "Mean of empty slice" on stderr), so the sources keep their defaults.
    assert "the index stage held out no labels to learn from (no user of the validation split has a " \
           "held-out positive): no ranker is trained" in json.dumps(train)
    assert not [w for w in seen if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in seen]



def test_no_labelled_candidate_in_the_latest_window_trains_no_ranker(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The train stage's own check, past the index stage's: users of the latest label window hold
    positives, but none among their first `ranker.depth` candidates (here the latest window's rows
    are taken out of the training rows, as such a log leaves them). The forward check would judge
    on no row (it failed with an IndexError); no ranker is trained, the night exports the
    retrieval order, and the record says why."""
    real = training.training_rows

    def no_latest(*args: object, **kwargs: object) -> pl.DataFrame:
        rows = real(*args, **kwargs)
        assert rows.filter(pl.col("label_window") == 0).height > 0  # the index stage's check passed
        return rows.filter(pl.col("label_window") != 0)

    monkeypatch.setattr(training, "training_rows", no_latest)
    data = make_catalog(tmp_path / "data")
    art = tmp_path / "art"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        night = run_nightly(data, art, load_config(None, QUIET), show_progress=False)
    assert night.rows > 0 and not (art / "ranker" / "model.txt").exists()
    train = [r for r in read_manifest(art)["runs"] if r["command"] == "train"][-1]
    assert train["status"] == "ok"
    assert ("no user of the latest label window has a held-out positive among their first 100 candidates: the "
            "ranker cannot be checked forward in time") in json.dumps(train)
    assert Recommender(art).order_ == "retrieval"
    assert not [w for w in seen if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in seen]
