"""Retriever: brute-force agreement, cold items, new users, query-time users, weights, persistence."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from fusionrec.pipeline.errors import ConfigError, FusionrecError, InputError
from fusionrec.pipeline.retrieval import weight_search
from fusionrec.pipeline.retrieval.candidates import served_user_ids
from fusionrec.pipeline.retrieval.fusion import fused_score
from fusionrec.pipeline.retrieval.retriever import Retriever
from fusionrec.pipeline.retrieval.weight_search import validation_split
from fusionrec.pipeline.splits import global_temporal_split

N_TOPICS, N_ITEMS, N_USERS, K = 8, 240, 80, 10
SCHEMA = {"user_id": pl.Utf8, "item_id": pl.Utf8, "timestamp": pl.Int64, "event": pl.Utf8, "value": pl.Float64}


def make_world(seed: int = 0):
    """Items in topics: text follows the topic, image is noise, 20% of items lack an image.
    Each user keeps to one topic. One extra item `cold` (topic 3 text, no interactions)."""
    rng = np.random.default_rng(seed)
    text_c = rng.normal(size=(N_TOPICS, 24))
    topic = np.arange(N_ITEMS) % N_TOPICS
    text = text_c[topic] + 0.6 * rng.normal(size=(N_ITEMS, 24))
    image = rng.normal(size=(N_ITEMS, 16))
    ids = np.array([f"i{i}" for i in range(N_ITEMS)], dtype=object)
    has_img = rng.random(N_ITEMS) > 0.2
    norm = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    mods = {"text": (np.append(ids, "cold"), norm(np.vstack([text, text_c[3]]))),
            "image": (ids[has_img], norm(image[has_img]))}
    rows = []
    for u in range(N_USERS):
        pool = np.flatnonzero(topic == u % N_TOPICS)
        for t, i in enumerate(rng.choice(pool, 12, replace=False)):
            event = ["view", "click", "cart", "purchase"][rng.integers(0, 4)]
            rows.append((f"u{u}", f"i{i}", 1_000_000 + 86400 * t + u, event, None))
    inter = pl.DataFrame(rows, schema=SCHEMA, orient="row")
    return mods, inter, topic, text_c


@pytest.fixture(scope="module")
def world():
    return make_world()


@pytest.fixture(scope="module")
def newbie_text(world):
    _, _, _, text_c = world
    v = text_c[5] / np.linalg.norm(text_c[5])
    return {"text": (np.array(["newbie"], dtype=object), v[None, :].astype(np.float32))}


@pytest.fixture(scope="module")
def fixed(world, newbie_text):
    mods, inter, _, _ = world
    return Retriever(weights={"text": 0.5, "image": 0.2, "behaviour": 0.3}, n_candidates=K,
                     behaviour_dim=8, cold_share=0.0).fit(mods, inter, user_modalities=newbie_text)


@pytest.fixture(scope="module")
def searched(world):
    mods, inter, _, _ = world
    return Retriever(fusion="attention", n_candidates=K, behaviour_dim=8, validation_fraction=0.2,
                     beta_grid=(0.0, 1.0, 4.0), cold_share=0.0).fit(mods, inter)


def topic_of(item_ids, topic):
    return np.array([topic[int(i[1:])] if i != "cold" else 3 for i in item_ids])


def brute_force(r: Retriever, k: int) -> dict[str, tuple[list[str], np.ndarray]]:
    """Exact fused scores of every user with every item, numpy only."""
    ub, ib = r.user_blocks_, r.item_blocks_
    sims = np.stack([u @ x.T for u, x in zip(ub.mats, ib.mats)], axis=-1)
    avail = ub.mask[:, None, :] & ib.mask[None, :, :]
    score = fused_score(sims, avail, r.user_weights_[:, None, :])
    score = np.where(r.seen_.toarray() | np.isnan(score), -np.inf, score)
    out = {}
    for row, uid in enumerate(r.user_ids_):
        top = np.argsort(-score[row], kind="stable")[:k]
        out[uid] = (list(r.item_ids_[top]), score[row, top])
    return out


@pytest.mark.parametrize("which", ["fixed", "searched"])
def test_candidates_equal_numpy_brute_force(which, request):
    r = request.getfixturevalue(which)
    cands = r.candidates()
    expected = brute_force(r, K)
    assert cands["user_id"].n_unique() == len(r.user_ids_)
    for uid, frame in cands.group_by("user_id", maintain_order=True):
        ids, scores = expected[uid[0]]
        assert frame["item_id"].to_list() == ids
        np.testing.assert_allclose(frame["retrieval_score"].to_numpy(), scores, rtol=1e-5, atol=1e-6)


def test_candidate_columns_types_and_invariants(fixed, world):
    _, inter, _, _ = world
    c = fixed.candidates()
    assert c.schema == pl.Schema({
        "user_id": pl.Utf8, "item_id": pl.Utf8, "retrieval_rank": pl.Int32, "retrieval_score": pl.Float32,
        "sim_image": pl.Float32, "sim_text": pl.Float32, "sim_behaviour": pl.Float32, "sim_popularity": pl.Float32,
        "attn_image": pl.Float32, "attn_text": pl.Float32, "attn_behaviour": pl.Float32,
        "attn_popularity": pl.Float32})
    per_user = c.group_by("user_id").agg(pl.col("retrieval_rank"), pl.col("retrieval_score"))
    for ranks, scores in zip(per_user["retrieval_rank"], per_user["retrieval_score"]):
        assert ranks.to_list() == list(range(1, K + 1))
        assert (np.diff(scores.to_numpy()) <= 1e-7).all()
    assert c.join(inter, on=["user_id", "item_id"], how="semi").height == 0  # seen items left out
    # global weights, renormalised over the user's modalities, are the attn columns
    row = c.filter(pl.col("user_id") == "u0").row(0, named=True)
    assert (row["attn_text"], row["attn_image"], row["attn_behaviour"], row["attn_popularity"]) == \
        pytest.approx((0.5, 0.2, 0.3, 0.0))
    # items without an image have a null image similarity, and their score is the mean over the rest
    no_img = c.filter(pl.col("sim_image").is_null() & pl.col("sim_behaviour").is_not_null())
    assert no_img.height > 0
    expect = (0.5 * no_img["sim_text"] + 0.3 * no_img["sim_behaviour"]) / 0.8
    np.testing.assert_allclose(no_img["retrieval_score"].to_numpy(), expect.to_numpy(), rtol=1e-5)


def test_candidates_options(fixed, world):
    _, inter, _, _ = world
    c = fixed.candidates(["u3", "nobody", "u1"], k=5)
    assert c["user_id"].unique(maintain_order=True).to_list() == ["u3", "u1"]
    assert c.height == 10
    with_seen = fixed.candidates(["u3"], k=30, exclude_seen=False)
    assert with_seen.join(inter, on=["user_id", "item_id"], how="semi").height >= 10


def test_k_zero_is_refused_not_the_default(fixed):
    # `k or n_candidates` served the default 100 rows a user for k = 0, silently.
    for call in (lambda: fixed.candidates(["u3"], k=0),
                 lambda: fixed.recommend_for_history(pl.DataFrame({"item_id": ["i1"]}), k=0)):
        with pytest.raises(InputError, match="k must be at least 1, not 0"):
            call()
    assert fixed.candidates(["u3"]).height == K  # None: index.n_candidates


def test_candidates_keep_to_the_users_topic(fixed, world):
    _, _, topic, _ = world
    c = fixed.candidates()
    users_topic = np.array([int(u[1:]) % N_TOPICS for u in c.filter(pl.col("user_id") != "newbie")["user_id"]])
    items_topic = topic_of(c.filter(pl.col("user_id") != "newbie")["item_id"].to_list(), topic)
    assert (users_topic == items_topic).mean() > 0.9


def test_cold_item_is_retrieved_by_content(fixed):
    c = fixed.candidates()
    cold = c.filter(pl.col("item_id") == "cold")
    topic3_users = [f"u{u}" for u in range(3, N_USERS, N_TOPICS)]
    assert sorted(cold["user_id"].to_list()) == sorted(topic3_users)
    assert cold["sim_behaviour"].null_count() == cold.height and cold["sim_image"].null_count() == cold.height
    assert fixed.summary_()["counts"]["cold_items"] >= 1


def test_new_user_with_only_profile_text_gets_the_matching_topic(fixed, world, newbie_text):
    _, _, topic, _ = world
    c = fixed.candidates(["newbie"])
    assert c.height == K
    assert (topic_of(c["item_id"].to_list(), topic) == 5).all()
    assert c["sim_behaviour"].null_count() == K and c["attn_text"].to_list() == [1.0] * K
    # the same user given only at query time gets the same list, without refitting
    q = fixed.recommend_for_history(None, user_modalities=newbie_text)
    assert q["item_id"].to_list() == c["item_id"].to_list()


def test_query_time_history_matches_a_fitted_user_with_that_history(fixed, world):
    _, inter, topic, _ = world
    index_before, users_before = fixed.index_, fixed.user_ids_.copy()
    hist = inter.filter(pl.col("user_id") == "u6").with_columns(pl.lit("again").alias("user_id"))
    q = fixed.recommend_for_history(hist)
    ref = fixed.candidates(["u6"])
    assert q["item_id"].to_list() == ref["item_id"].to_list()
    np.testing.assert_allclose(q["retrieval_score"].to_numpy(), ref["retrieval_score"].to_numpy(), rtol=1e-5)
    assert fixed.index_ is index_before and list(fixed.user_ids_) == list(users_before)
    # a handful of interactions without user or time columns
    few = pl.DataFrame({"item_id": ["i7", "i15", "i23"]})
    got = fixed.recommend_for_history(few, k=8)
    assert set(got["user_id"]) == {"query"} and not {"i7", "i15", "i23"} & set(got["item_id"])
    assert (topic_of(got["item_id"].to_list(), topic) == 7).mean() >= 0.75


def test_pair_features_for_arbitrary_pairs(fixed):
    top = fixed.candidates(["u2"])
    pairs = pl.DataFrame({"user_id": ["u2", "u2", "ghost", "u2", "u2"],
                          "item_id": [top["item_id"][3], "i0", "i1", "nope", top["item_id"][0]],
                          "label": [1, 0, 0, 0, 1]})
    f = fixed.pair_features(pairs)
    assert f.columns[:3] == ["user_id", "item_id", "label"] and f.height == 5
    assert f["retrieval_rank"].to_list()[0] == 4 and f["retrieval_rank"].to_list()[4] == 1
    assert f["retrieval_score"][0] == pytest.approx(top["retrieval_score"][3], rel=1e-5)
    assert f["sim_text"][0] == pytest.approx(top["sim_text"][3], rel=1e-5)
    for row in (2, 3):  # unknown user, unknown item: nulls, not errors
        assert f.row(row, named=True)["retrieval_score"] is None
        assert f.row(row, named=True)["attn_text"] is None and f.row(row, named=True)["retrieval_rank"] is None
    assert f["label"].to_list() == [1, 0, 0, 0, 1]


def test_weight_search_prefers_the_informative_modality(searched):
    w = searched.weights_
    assert sum(w.values()) == pytest.approx(1.0) and min(w.values()) >= 0.05 - 1e-9
    assert w["text"] == max(w.values()) and w["text"] > w["image"]
    assert set(w) == {"text", "image", "behaviour", "popularity"}
    v = searched.validation_
    assert v["single_modality_recall"]["text"] > v["single_modality_recall"]["image"]
    assert searched.validation_recall_ >= v["single_modality_recall"]["image"]
    assert searched.attention_beta_ in (0.0, 1.0, 4.0)
    assert set(v["beta_recall"]) == {"0.0", "1.0", "4.0"}


def test_attention_weights_are_personal_and_recorded(searched):
    a = searched.user_weights_
    np.testing.assert_allclose(a.sum(axis=1), 1.0)
    c = searched.candidates(["u1", "u2"])
    first = c.group_by("user_id", maintain_order=True).first()
    for j, m in enumerate(searched.modalities_):
        rows = [list(searched.user_ids_).index(u) for u in first["user_id"]]
        np.testing.assert_allclose(first[f"attn_{m}"].to_numpy(), a[rows, j], rtol=1e-6)
    if searched.attention_beta_ > 0:
        assert a.std(axis=0).max() > 1e-3


def test_attention_with_beta_zero_equals_weighted_fusion(world):
    mods, inter, _, _ = world
    w = {"text": 0.6, "image": 0.1, "behaviour": 0.3}
    att = Retriever(fusion="attention", weights=w, attention_beta=0.0, n_candidates=K, behaviour_dim=8).fit(mods, inter)
    wei = Retriever(fusion="weighted", weights=w, n_candidates=K, behaviour_dim=8).fit(mods, inter)
    assert att.candidates().drop("retrieval_score").equals(wei.candidates().drop("retrieval_score"))


def test_fixed_and_concat_weights(world):
    mods, inter, _, _ = world
    r = Retriever(weights={"text": 2, "image": 1, "behaviour": 1, "audio": 5}, n_candidates=K,
                  behaviour_dim=8, validation_fraction=0).fit(mods, inter)
    assert r.weights_ == pytest.approx({"text": 0.5, "image": 0.25, "behaviour": 0.25, "popularity": 0.0})
    assert r.summary_()["weights_source"] == "fixed" and r.validation_recall_ is None
    c = Retriever(fusion="concat", n_candidates=K, behaviour_dim=0, popularity=False).fit(mods, inter)
    assert c.weights_ == pytest.approx({"image": 0.5, "text": 0.5}) and c.modalities_ == ("image", "text")
    with pytest.raises(ConfigError, match="'fusion.weights': .*no weight.*not a modality here: audio"):
        Retriever(weights={"audio": 1.0}).fit(mods, inter)


def test_fit_on_a_time_cutoff_subset(world):
    mods, inter, _, _ = world
    early = inter.filter(pl.col("timestamp") < 1_000_000 + 86400 * 4)
    r = Retriever(n_candidates=K, behaviour_dim=8).fit(mods, early)
    assert r.summary_()["counts"]["cold_items"] > 0
    c = r.candidates()
    assert c["user_id"].n_unique() == N_USERS
    assert c.join(early, on=["user_id", "item_id"], how="semi").height == 0


def test_save_and_load_give_the_same_results(fixed, tmp_path, newbie_text):
    fixed.save(tmp_path / "index")
    files = sorted(p.name for p in (tmp_path / "index").iterdir())
    assert files == ["index.faiss", "items.parquet", "retriever.json", "seen.parquet", "users.parquet"]
    loaded = Retriever.load(tmp_path / "index")
    assert loaded.candidates().equals(fixed.candidates())
    pairs = pl.DataFrame({"user_id": ["u1", "u1", "x"], "item_id": ["i3", "i9", "i3"]})
    assert loaded.pair_features(pairs).equals(fixed.pair_features(pairs))
    hist = pl.DataFrame({"item_id": ["i2", "i10"]})
    assert loaded.recommend_for_history(hist).equals(fixed.recommend_for_history(hist))
    assert loaded.recommend_for_history(None, user_modalities=newbie_text).equals(
        fixed.recommend_for_history(None, user_modalities=newbie_text))
    assert loaded.weights_ == fixed.weights_ and loaded.search_params_ == fixed.search_params_
    json.dumps(loaded.summary_())


def test_summary_reports_what_the_manifest_needs(searched):
    s = searched.summary_()
    json.dumps(s)
    assert s["fusion"] == "attention" and s["weights_source"] == "validation_search"
    assert set(s["weights"]) == {"text", "image", "behaviour", "popularity"}
    assert s["index"]["type"] == "IndexFlat" and s["index"]["ntotal"] == N_ITEMS + 1
    assert s["tuning"]["recall"] == 1.0 and s["validation_recall"] == searched.validation_recall_
    assert {"weight_search_s", "index_build_s", "fit_s"} <= set(s["timings"])
    assert s["user_modality_weights"]["text"]["mean"] > 0


def test_ann_index_is_tuned_to_the_target_recall(world):
    mods, inter, _, _ = world
    r = Retriever(weights={"text": 1, "image": 1, "behaviour": 1}, index_factory="IVF16,Flat",
                  target_recall=0.9, n_candidates=K, behaviour_dim=8).fit(mods, inter)
    assert "nprobe" in r.search_params_ and r.tuning_["recall"] >= 0.9
    assert r.summary_()["index"]["type"] == "IndexIVFFlat"
    assert r.candidates()["user_id"].n_unique() == N_USERS


def test_validation_split_is_the_global_temporal_split():
    df = pl.DataFrame({"user_id": [f"u{i % 7}" for i in range(100)], "item_id": [f"i{i}" for i in range(100)],
                       "timestamp": [0] * 80 + [1] * 8 + [2] * 12})
    train, valid = validation_split(df, 0.1, seed=3)
    expected = global_temporal_split(df, 0.1, seed=3)
    assert train.equals(expected[0]) and valid.equals(expected[1])
    assert valid.height == 10 and set(valid["timestamp"]) == {2}  # 10 of the 12 tied rows, in seeded order
    assert set(validation_split(df, 0.1, seed=4)[1]["item_id"]) != set(valid["item_id"])
    train, valid = validation_split(df, 0.0)
    assert train.height == 100 and valid.height == 0


def test_fit_holds_out_round_fraction_of_the_interactions(world):
    mods, inter, _, _ = world
    r = Retriever(n_candidates=K, behaviour_dim=8, validation_fraction=0.2, seed=1).fit(mods, inter)
    n_held = int(0.2 * inter.height + 0.5)
    assert r.validation_["n_heldout"] == n_held and r.validation_["n_train"] == inter.height - n_held


def test_unfitted_and_bad_arguments():
    with pytest.raises(FusionrecError, match="not fitted"):
        Retriever().candidates()
    with pytest.raises(ValueError, match="fusion must be"):
        Retriever(fusion="sum").fit({}, pl.DataFrame(schema=SCHEMA))
    with pytest.raises(FusionrecError, match="nothing to index"):
        Retriever().fit({}, pl.DataFrame(schema=SCHEMA))


def test_cold_share_keeps_places_for_items_without_interactions(world, fixed, tmp_path):
    mods, inter, _, _ = world
    r = Retriever(weights={"text": 0.5, "image": 0.2, "behaviour": 0.3}, n_candidates=K, behaviour_dim=8,
                  cold_share=0.1).fit(mods, inter)
    cold = set(mods["text"][0]) - set(inter["item_id"])
    assert "cold" in cold and len(cold) > 1
    c = r.candidates()
    assert c.group_by("user_id").len()["len"].to_list() == [K] * N_USERS
    expected = brute_force(fixed, N_ITEMS + 1)  # full rankings
    for uid, frame in c.group_by("user_id"):
        items = frame["item_id"].to_list()
        assert len(cold & set(items)) >= 1  # one place kept for the best cold item
        best_cold = [i for i in expected[uid[0]][0] if i in cold][0]
        assert best_cold in items
        # the other places are the best items overall, and the list is ordered by score
        assert [i for i in items if i != best_cold] == [i for i in expected[uid[0]][0] if i != best_cold][:K - 1]
        assert (np.diff(frame["retrieval_score"].to_numpy()) <= 1e-7).all()
    r.save(tmp_path)
    assert Retriever.load(tmp_path).candidates().equals(c)


def test_popularity_is_a_modality_with_the_same_prior_for_everyone(world):
    mods, inter, _, _ = world
    extra = pl.DataFrame([(f"fan{j}", "i0", 1_000_000, "click", None) for j in range(30)], schema=SCHEMA, orient="row")
    r = Retriever(weights={"popularity": 1.0}, n_candidates=K, behaviour_dim=8, cold_share=0.0,
                  half_life_days=None).fit(
        mods, pl.concat([inter, extra]))
    c = r.candidates(["u1", "u2"])
    assert c.filter(pl.col("retrieval_rank") == 1)["item_id"].to_list() == ["i0", "i0"]
    # sim_popularity = log(1 + count) / log(1 + max count), the same for every user
    counts = pl.concat([inter, extra]).group_by("item_id").len()
    top = counts["len"].max()
    got = c.join(counts, on="item_id")
    np.testing.assert_allclose(got["sim_popularity"].to_numpy(), np.log1p(got["len"].to_numpy()) / np.log1p(top),
                               rtol=1e-5)
    assert c.filter(pl.col("item_id") == "cold").height == 0  # no interactions: no popularity


def test_large_catalogue_validation_pool_matches_the_dense_evaluation(world, searched, monkeypatch):
    mods, inter, _, _ = world
    monkeypatch.setattr(weight_search, "_DENSE_VALIDATION_MAX_ITEMS", 10)  # force the candidate-pool path
    pooled = Retriever(fusion="attention", n_candidates=K, behaviour_dim=8, validation_fraction=0.2,
                       beta_grid=(0.0, 1.0, 4.0), cold_share=0.0).fit(mods, inter)
    # each modality's top 400 covers this catalogue, so the pool path must agree exactly
    assert pooled.validation_recall_ == pytest.approx(searched.validation_recall_)
    assert pooled.weights_ == pytest.approx(searched.weights_)


@pytest.mark.parametrize("dense", [True, False])
def test_the_weight_search_reads_each_users_similarities_once_with_the_same_choice(world, monkeypatch, dense):
    """The search's recall calls (grid, pattern steps, beta) share the hold-out's per-chunk
    arrays: one similarity computation per chunk instead of one per call, the same record."""
    mods, inter, _, _ = world
    if not dense:
        monkeypatch.setattr(weight_search, "_DENSE_VALIDATION_MAX_ITEMS", 10)  # the candidate-pool path
    calls: list[int] = []
    for name in ("_dense_sims", "gather_sims"):
        real = getattr(weight_search, name)
        monkeypatch.setattr(weight_search, name, lambda *a, _real=real, **kw: calls.append(1) or _real(*a, **kw))

    def fit() -> Retriever:
        return Retriever(fusion="attention", n_candidates=K, behaviour_dim=8, validation_fraction=0.2,
                         beta_grid=(0.0, 1.0, 4.0), cold_share=0.0).fit(mods, inter)

    cached = fit()
    cached_calls = len(calls)
    calls.clear()
    monkeypatch.setattr(weight_search, "_CACHE_BYTES", 0)
    uncached = fit()
    assert 0 < cached_calls < len(calls) / 5  # a dozen recall calls read the same chunks
    assert cached.validation_ == uncached.validation_ and cached.weights_ == uncached.weights_
    assert cached.attention_beta_ == uncached.attention_beta_


def test_served_user_ids_is_the_sorted_text_union_without_nulls() -> None:
    log = pl.Series(["u2", "u10", "u2", None])
    table = pl.Series([7, 3])  # a users table read with integer ids is served as text
    ids = served_user_ids(log, table, pl.Series(np.array(["u1"], dtype=str)))
    assert ids.tolist() == ["3", "7", "u1", "u10", "u2"]
    assert ids.dtype == object
    assert served_user_ids().tolist() == []
