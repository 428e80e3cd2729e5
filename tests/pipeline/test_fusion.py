"""Fusion identity, weight renormalisation, attention, weight search, user profiles."""

from __future__ import annotations

import re

import numpy as np
import polars as pl
import pytest

from fusionrec.pipeline.config import load_config
from fusionrec.pipeline.embedding.job import read_precomputed
from fusionrec.pipeline.errors import InputError
from fusionrec.pipeline.retrieval.fusion import (
    Blocks,
    align_blocks,
    attention_weights,
    consistency,
    fused_score,
    item_matrix,
    l2_normalise,
    load_modalities,
    query_matrix,
    read_embedding_table,
    renormalise,
    search_simplex,
    simplex_grid,
)
from fusionrec.pipeline.retrieval.profiles import (
    behaviour_embeddings,
    blend_content,
    history_profile,
    interaction_matrix,
    interaction_weights,
    popularity_vectors,
)

RNG = np.random.default_rng(7)


def unit(n: int, d: int) -> np.ndarray:
    return l2_normalise(RNG.normal(size=(n, d)).astype(np.float32))


def random_blocks(n: int, dims: tuple[int, ...], missing: float) -> Blocks:
    mask = RNG.random((n, len(dims))) > missing
    mask[~mask.any(axis=1), 0] = True
    mats = tuple(np.where(mask[:, j:j + 1], unit(n, d), 0.0).astype(np.float32) for j, d in enumerate(dims))
    return Blocks(np.arange(n).astype(str).astype(object), tuple(f"m{j}" for j in range(len(dims))), mats, mask)


def cosines(users: Blocks, items: Blocks) -> tuple[np.ndarray, np.ndarray]:
    sims = np.stack([u @ x.T for u, x in zip(users.mats, items.mats)], axis=-1)
    avail = users.mask[:, None, :] & items.mask[None, :, :]
    return sims, avail


# ---------------------------------------------------------------- loading
def test_load_modalities_reads_both_layouts_and_normalises(tmp_path):
    emb = tmp_path / "embeddings"
    emb.mkdir()
    pl.DataFrame({"id": ["a", "b"], "content_hash": ["h1", "h2"], "model": ["m", "m"],
                  "vector": pl.Series([[3.0, 4.0], [0.0, 2.0]], dtype=pl.Array(pl.Float32, 2))}
                 ).write_parquet(emb / "item_text.parquet")
    pl.DataFrame({"item_id": [1, 2, 3], "vector": [[1.0, 0.0, 0.0], [0.0, 0.0, 5.0], None]}
                 ).write_parquet(emb / "item_audio_vggish.parquet")
    pl.DataFrame({"id": ["u1"], "vector": [[1.0, 1.0]]}).write_parquet(emb / "user_text.parquet")
    pl.DataFrame({"id": ["x", "y"]}).write_parquet(emb / "failures.parquet")

    items = load_modalities(emb, "item")
    assert sorted(items) == ["audio_vggish", "text"]
    ids, x = items["text"]
    assert list(ids) == ["a", "b"] and x.dtype == np.float32
    np.testing.assert_allclose(x, [[0.6, 0.8], [0.0, 1.0]], rtol=1e-6)
    ids, x = items["audio_vggish"]
    assert list(ids) == ["1", "2"]  # the null vector row is left out, ids become strings
    np.testing.assert_allclose(x[1], [0, 0, 1])
    assert list(load_modalities(emb, "user")) == ["text"]
    assert load_modalities(tmp_path / "absent", "item") == {}


def test_load_modalities_rejects_duplicate_ids_naming_file_and_row(tmp_path):
    pl.DataFrame({"id": ["a", "b", "a"], "vector": [[1.0], [2.0], [3.0]]}).write_parquet(tmp_path / "item_text.parquet")
    with pytest.raises(InputError, match=r"item_text\.parquet, row 3, field 'id': duplicate id 'a' \(first on row 1\)"):
        load_modalities(tmp_path, "item")


BAD_FIRST_ROWS = [
    ([[float("nan"), 0.0], [1.0, 0.0], [0.0, 1.0]], "vector contains NaN or infinity"),
    ([[1.0], [1.0, 0.0], [0.0, 1.0]], "vector is missing or has a different length from the others"),
]


@pytest.mark.parametrize(("vectors", "message"), BAD_FIRST_ROWS)
def test_ingest_and_fusion_report_the_first_bad_row_as_row_1(tmp_path, vectors, message):
    """One validator (pipeline.io.vectors) for both paths: rows are 1-based, file and field named."""
    path = tmp_path / "item_audio.parquet"
    pl.DataFrame({"item_id": ["a", "b", "c"], "vector": vectors}).write_parquet(path)
    expected = rf"item_audio\.parquet, row 1, field 'vector': {re.escape(message)}"
    with pytest.raises(InputError, match=expected) as fused:
        read_embedding_table(path)
    with pytest.raises(InputError, match=expected) as ingested:
        read_precomputed(path, "item", pl.Series(["a", "b", "c"]))
    assert fused.value.row == ingested.value.row == 1


def test_a_row_after_a_dropped_null_keeps_its_file_row_number(tmp_path):
    path = tmp_path / "item_text.parquet"
    pl.DataFrame({"id": ["a", "b", "c"], "vector": [None, [1.0, 0.0], [float("inf"), 0.0]]}).write_parquet(path)
    with pytest.raises(InputError, match=r"row 3, field 'vector'"):
        read_embedding_table(path)
    with pytest.raises(InputError, match=r"row 1, field 'vector': vector is missing"):
        read_precomputed(path, "item", pl.Series(["a", "b", "c"]))


def test_align_blocks_puts_rows_on_the_id_order_with_zeros_for_missing():
    b = align_blocks({"t": (np.array(["b", "a"], dtype=object), np.eye(2, dtype=np.float32))},
                     ("t", "img"), np.array(["a", "b", "c"], dtype=object), dims={"img": 3})
    np.testing.assert_array_equal(b.mats[0], [[0, 1], [1, 0], [0, 0]])
    assert b.mats[1].shape == (3, 3)
    np.testing.assert_array_equal(b.mask, [[True, False], [True, False], [False, False]])


# ---------------------------------------------------------------- fusion identity
def test_weighted_identity_is_exact_when_the_user_has_every_modality():
    items = random_blocks(50, (8, 5, 3), missing=0.3)
    users = random_blocks(20, (8, 5, 3), missing=0.0)
    w = np.array([0.5, 0.3, 0.2])
    ip = query_matrix(users, renormalise(w, users.mask)) @ item_matrix(items, w).T
    sims, avail = cosines(users, items)
    np.testing.assert_allclose(ip, fused_score(sims, avail, w), rtol=1e-5, atol=1e-6)


def test_personal_weights_identity_is_exact_for_items_with_every_modality():
    items = random_blocks(30, (8, 5, 3), missing=0.0)
    users = random_blocks(20, (8, 5, 3), missing=0.3)
    prior = np.array([0.5, 0.3, 0.2])
    a = attention_weights(prior, RNG.normal(size=(20, 3)), users.mask, beta=2.0)
    ip = query_matrix(users, a) @ item_matrix(items, prior).T
    sims, avail = cosines(users, items)
    np.testing.assert_allclose(ip, fused_score(sims, avail, a[:, None, :]), rtol=1e-5, atol=1e-6)


def test_concatenation_is_the_mean_cosine():
    items = random_blocks(10, (4, 6), missing=0.0)
    users = random_blocks(5, (4, 6), missing=0.0)
    w = np.array([0.5, 0.5])
    ip = query_matrix(users, renormalise(w, users.mask)) @ item_matrix(items, w).T
    expected = (users.mats[0] @ items.mats[0].T + users.mats[1] @ items.mats[1].T) / 2
    np.testing.assert_allclose(ip, expected, rtol=1e-5, atol=1e-6)


def test_renormalise_shares_a_missing_modality_weight_out():
    w = np.array([0.5, 0.3, 0.2])
    mask = np.array([[True, True, True], [True, False, True], [False, False, False]])
    np.testing.assert_allclose(renormalise(w, mask), [[0.5, 0.3, 0.2], [0.5 / 0.7, 0, 0.2 / 0.7], [0, 0, 0]])


def test_fused_score_of_an_item_missing_a_modality_is_the_mean_over_what_it_has():
    sims = np.array([[0.8, 0.9, 0.2], [0.8, 0.9, 0.2]])
    avail = np.array([[True, True, True], [True, False, True]])
    w = np.array([0.5, 0.3, 0.2])
    s = fused_score(sims, avail, w)
    assert s[0] == pytest.approx(0.5 * 0.8 + 0.3 * 0.9 + 0.2 * 0.2)
    assert s[1] == pytest.approx((0.5 * 0.8 + 0.2 * 0.2) / 0.7)
    assert np.isnan(fused_score(sims[:1], np.zeros((1, 3), bool), w)[0])


# ---------------------------------------------------------------- attention
def test_attention_favours_the_modality_where_the_history_is_consistent():
    prior = np.array([0.5, 0.5])
    kappa = np.array([[0.6, 0.0], [0.0, 0.6], [0.0, 0.0]])
    mask = np.ones((3, 2), bool)
    a = attention_weights(prior, kappa, mask, beta=2.0)
    np.testing.assert_allclose(a.sum(axis=1), 1.0)
    assert a[0, 0] > 0.7 and a[1, 1] > 0.7
    np.testing.assert_allclose(a[2], [0.5, 0.5])
    np.testing.assert_allclose(attention_weights(prior, kappa, mask, beta=0.0), 0.5)
    masked = attention_weights(prior, kappa, np.array([[False, True]] * 3), beta=2.0)
    np.testing.assert_allclose(masked[:, 0], 0.0)
    np.testing.assert_allclose(masked[:, 1], 1.0)


def test_consistency_is_zero_for_one_item_and_grows_with_agreement():
    assert consistency(np.array(1.0), np.array(1.0), 0.1) == pytest.approx(0.0)
    # ten identical items: R^2 = 1, sum alpha^2 = 0.1
    assert consistency(np.array(1.0), np.array(0.1), 0.0) == pytest.approx(0.9)
    # random directions in high dimension: R^2 ~ 1/n
    x = unit(50, 512)
    r2 = float(np.linalg.norm(x.mean(axis=0)) ** 2)
    assert abs(consistency(np.array(r2), np.array(1 / 50), 0.0)) < 0.02


# ---------------------------------------------------------------- weight search
def test_simplex_grid_rows_sum_to_one_and_respect_the_floor():
    g = simplex_grid(3, 0.1)
    assert g.shape == (66, 3)
    np.testing.assert_allclose(g.sum(axis=1), 1.0)
    f = simplex_grid(4, 0.2, floor=0.05)
    assert f.min() >= 0.05 - 1e-12 and np.allclose(f.sum(axis=1), 1.0)
    assert len(simplex_grid(12, max_points=100)) == 100


def test_search_simplex_finds_the_maximum_of_a_known_function():
    target = np.array([0.6, 0.3, 0.05, 0.05])
    found = search_simplex(lambda w: -np.abs(w - target).sum(axis=1), 4, floor=0.05)
    np.testing.assert_allclose(found["weights"], target, atol=0.03)
    assert found["weights"].sum() == pytest.approx(1.0)
    assert found["evaluations"] > found["coarse_size"]


def test_search_simplex_prefers_equal_weights_on_a_flat_score():
    found = search_simplex(lambda w: np.zeros(len(w)), 3)
    np.testing.assert_allclose(found["weights"], 1 / 3)


# ---------------------------------------------------------------- user profiles
def _frame(rows):
    return pl.DataFrame(rows, schema={"user_id": pl.Utf8, "item_id": pl.Utf8, "timestamp": pl.Int64,
                                      "event": pl.Utf8, "value": pl.Float64}, orient="row")


def test_event_weights_order_purchase_cart_click_view_and_ratings_scale():
    df = _frame([("u", "a", 0, "purchase", None), ("u", "b", 0, "cart", None), ("u", "c", 0, "click", None),
                 ("u", "d", 0, "view", None), ("v", "a", 0, "rate", 5.0), ("v", "b", 0, "rate", 2.0)])
    w = interaction_weights(df, half_life_days=30)["w"].to_list()
    assert w[0] > w[1] > w[2] > w[3] > 0
    assert w[5] / w[4] == pytest.approx(0.4)
    custom = interaction_weights(df, event_weights={"view": 10.0})["w"].to_list()
    assert custom[3] == pytest.approx(10.0)


def test_event_weights_are_one_table_the_configured_defaults_and_their_synonyms():
    # Called without a config, the weights are the configured defaults (cart 3, not another
    # table's 2.5), and a synonym weighs what its documented name does.
    df = _frame([("u", "a", 0, "purchase", None), ("u", "b", 0, "order", None), ("u", "c", 0, "cart", None),
                 ("u", "d", 0, "add_to_cart", None), ("u", "e", 0, "click", None), ("u", "f", 0, "view", None),
                 ("u", "g", 0, "something else", None)])
    assert interaction_weights(df, half_life_days=None)["w"].to_list() == [4.0, 4.0, 3.0, 3.0, 2.0, 1.0, 1.0]
    configured = interaction_weights(df, half_life_days=None, event_weights=load_config().fusion.event_weights)
    assert configured["w"].to_list() == [4.0, 4.0, 3.0, 3.0, 2.0, 1.0, 1.0]


def test_half_life_halves_the_weight_of_an_older_interaction():
    day = 86400
    df = _frame([("u", "a", 100 * day, "click", None), ("u", "b", 70 * day, "click", None),
                 ("w", "a", 5 * day, "click", None)])
    w = interaction_weights(df, half_life_days=30)["w"].to_list()
    assert w[1] == pytest.approx(w[0] / 2)
    assert w[2] == pytest.approx(w[0])  # decay counts from each user's latest interaction
    assert interaction_weights(df, half_life_days=None)["w"].to_list() == [2.0, 2.0, 2.0]  # click weighs 2


def test_history_profile_is_the_weighted_mean_skipping_items_without_the_modality():
    x = np.array([[1, 0], [0, 1], [0, 0]], dtype=np.float32)
    df = _frame([("u", "a", 0, "purchase", None), ("u", "b", 0, "view", None), ("u", "c", 0, "purchase", None)])
    im = interaction_matrix(df, np.array(["a", "b", "c"], dtype=object), half_life_days=None)
    prof = history_profile(im.weights, x, np.array([True, True, False]))
    p = np.array([4.0, 1.0]) / 5.0  # purchase 4, view 1
    np.testing.assert_allclose(prof.direction[0], p / np.linalg.norm(p), rtol=1e-6)
    assert prof.resultant_sq[0] == pytest.approx(float(p @ p))
    assert prof.n_eff[0] == pytest.approx(5.0 ** 2 / (16 + 1))


def test_interaction_matrix_sums_repeats_and_counts_unknown_items():
    df = _frame([("u", "a", 0, "click", None), ("u", "a", 1, "click", None), ("u", "zz", 0, "click", None)])
    im = interaction_matrix(df, np.array(["a", "b"], dtype=object), half_life_days=None)
    assert im.weights.toarray().tolist() == [[4.0, 0.0]]  # two clicks of 2
    assert im.seen.toarray().tolist() == [[True, False]]
    assert im.n_unknown_items == 1 and list(im.user_ids) == ["u"]


def test_blend_content_serves_new_users_from_content_and_shrinks_with_history():
    beh = np.array([[1, 0], [1, 0], [0, 0]], dtype=np.float32)
    content = np.array([[0, 1], [0, 0], [0, 1]], dtype=np.float32)
    out = blend_content(beh, np.array([5.0, 5.0, 0.0]), content, content_strength=5.0)
    np.testing.assert_allclose(out[0], [np.sqrt(0.5), np.sqrt(0.5)], rtol=1e-6)
    np.testing.assert_allclose(out[1], [1, 0])
    np.testing.assert_allclose(out[2], [0, 1])


def test_behaviour_embeddings_place_co_consumed_items_together():
    rows = [(f"u{u}", f"i{i}", 0, "click", None) for u in range(40) for i in ((0, 1, 2) if u < 20 else (3, 4, 5))]
    rows += [("u0", "i3", 0, "click", None)]
    im = interaction_matrix(_frame(rows), np.array([f"i{i}" for i in range(7)], dtype=object), half_life_days=None)
    v = behaviour_embeddings(im.weights, dim=4)
    assert v.shape == (7, 4)
    assert np.allclose(v[6], 0)  # nobody interacted with i6
    np.testing.assert_allclose(np.linalg.norm(v[:6], axis=1), 1.0, rtol=1e-5)
    assert v[0] @ v[1] > 0.9 and v[3] @ v[4] > 0.9
    assert v[0] @ v[4] < v[0] @ v[1] - 0.5


def test_popularity_vectors_encode_log_counts_with_recent_ones_weighing_more():
    day = 86400
    df = _frame([("u", "a", 100 * day, "click", None)] * 7 + [("v", "b", 100 * day, "click", None)] * 3
                + [("w", "c", 40 * day, "click", None)] * 7)
    ids = np.array(["a", "b", "c", "d"], dtype=object)
    plain = popularity_vectors(df, ids)
    np.testing.assert_allclose(plain[:, 0], [1.0, np.log(4) / np.log(8), 1.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(plain[:3], axis=1), 1.0, rtol=1e-6)
    assert np.all(plain[3] == 0)  # no interactions: the item lacks the modality
    decayed = popularity_vectors(df, ids, half_life_days=30)
    # c's 7 interactions are two half-lives older than a's: they count as 1.75
    assert decayed[2, 0] == pytest.approx(np.log(2.75) / np.log(8), rel=1e-5)
