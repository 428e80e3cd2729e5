"""FAISS index: exact equals brute force, choice by size, tuning, save and load, memory."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from fusionrec.pipeline.retrieval import faiss_index as fidx
from fusionrec.pipeline.retrieval.fusion import l2_normalise


def clustered(n: int, d: int, seed: int, n_clusters: int = 20) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, d))
    return l2_normalise((centres[rng.integers(0, n_clusters, n)] + 0.7 * rng.normal(size=(n, d))).astype(np.float32))


@pytest.fixture(scope="module")
def data():
    return clustered(3000, 32, seed=1), clustered(200, 32, seed=2)


def brute_force(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ base.T
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, axis=1), ids


def test_flat_index_equals_numpy_brute_force(data):
    base, queries = data
    index = fidx.build_index(base, "auto")
    assert fidx.describe(index)["type"] == "IndexFlat"
    scores, ids = fidx.search(index, queries, 10, batch_size=64)
    ex_scores, ex_ids = brute_force(base, queries, 10)
    np.testing.assert_array_equal(ids, ex_ids)
    np.testing.assert_allclose(scores, ex_scores, rtol=1e-5, atol=1e-6)
    f_scores, f_ids = fidx.exact_search(base, queries, 10)
    np.testing.assert_array_equal(f_ids, ex_ids)


def test_ivf_probing_every_list_equals_brute_force(data):
    base, queries = data
    index = fidx.build_index(base, "IVF16,Flat")
    fidx.set_search_params(index, {"nprobe": 16})
    _, ids = fidx.search(index, queries, 10)
    np.testing.assert_array_equal(ids, brute_force(base, queries, 10)[1])


def test_choose_factory_by_catalogue_size_and_memory():
    assert fidx.choose_factory(5_000, 384) == "Flat"
    assert fidx.choose_factory(1_000_000, 384) == "IVF2048,Flat"
    assert fidx.choose_factory(1_000_000, 384, memory_budget=1 << 30) == "IVF2048,PQ96"
    assert fidx.choose_factory(100_000, 100, memory_budget=1 << 20) == "IVF512,PQ25"
    nlist = fidx.default_nlist(200_000)
    assert nlist & (nlist - 1) == 0 and 200_000 // nlist >= 39


@pytest.mark.parametrize("factory,param", [("IVF64,Flat", "nprobe"), ("HNSW16,Flat", "efSearch")])
def test_tuning_reaches_the_target_recall_with_the_smallest_value_tried(data, factory, param):
    base, queries = data
    index = fidx.build_index(base, factory)
    tuned = fidx.tune_search_params(index, queries, 20, 0.95, base=base)
    value = tuned["params"][param]
    assert tuned["reached"] and tuned["recall"] >= tuned["recall_lower_bound"] >= 0.95
    failing = [t["value"] for t in tuned["trials"] if t["recall_lower_bound"] < 0.95]
    assert all(v < value for v in failing)
    assert value == 1 or value - 1 in failing or any(value // 2 <= v < value for v in failing)
    # the index keeps the tuned value: a fresh measurement gives the reported recall
    _, ids = fidx.search(index, queries, 20)
    assert fidx.recall_at_k(ids, fidx.exact_search(base, queries, 20)[1]) == pytest.approx(tuned["recall"], abs=0.01)


@pytest.mark.parametrize("floor", [1, 10])
def test_smallest_passing_finds_the_threshold_to_within_an_eighth(floor):
    """Doubling then bisecting: the value returned passes, the value an eighth below it fails."""
    for threshold in range(floor, 300):
        calls: list[int] = []

        def passes(v: int, t: int = threshold, seen: list[int] = calls) -> bool:
            seen.append(v)
            return v >= t

        value, reached = fidx.smallest_passing(passes, floor, 512)
        assert reached and threshold <= value <= max(threshold + value // 8, threshold + 1)
        assert len(set(calls)) <= 20  # doubling and bisection, never a scan
    assert fidx.smallest_passing(lambda v: False, 1, 300) == (300, False)
    assert fidx.smallest_passing(lambda v: True, 4, 300) == (4, True)


def test_flat_index_needs_no_tuning(data):
    base, queries = data
    tuned = fidx.tune_search_params(fidx.build_index(base, "Flat"), queries, 10, 0.99, base=base)
    assert tuned["params"] == {} and tuned["recall"] == 1.0


def test_recall_at_k_counts_overlap_and_forgives_ties():
    exact = np.array([[1, 2, 3], [4, 5, 6]])
    approx = np.array([[3, 2, 9], [7, 8, 9]])
    assert fidx.recall_at_k(approx, exact) == pytest.approx(2 / 6)
    # item 9 scores as much as the exact 3rd item: a tie, not a miss
    assert fidx.recall_at_k(approx[:1], exact[:1], exact_scores=np.array([[0.9, 0.8, 0.7]]),
                            approx_true_scores=np.array([[0.7, 0.8, 0.7]])) == pytest.approx(1.0)


def test_save_and_load_give_the_same_results(data, tmp_path):
    base, queries = data
    index = fidx.build_index(base, "IVF32,Flat")
    fidx.set_search_params(index, {"nprobe": 4})
    before = fidx.search(index, queries, 10)
    fidx.save_index(index, tmp_path / "index.faiss")
    assert [p.name for p in tmp_path.iterdir()] == ["index.faiss"]  # no temporary left behind
    loaded = fidx.load_index(tmp_path / "index.faiss")
    fidx.set_search_params(loaded, {"nprobe": 4})
    after = fidx.search(loaded, queries, 10)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_array_equal(before[0], after[0])


def test_index_memory_estimates(data):
    base, _ = data
    n, d = base.shape
    assert fidx.index_memory_bytes(fidx.build_index(base, "Flat")) == n * d * 4
    assert fidx.index_memory_bytes(fidx.build_index(base, "IVF16,Flat")) == n * (d * 4 + 8) + 16 * d * 4
    pq = fidx.index_memory_bytes(fidx.build_index(base, "IVF16,PQ8x4"))
    assert pq == n * (4 + 8) + 16 * d * 4
    info = fidx.describe(fidx.build_index(base, "HNSW16,Flat"))
    assert info["type"] == "IndexHNSWFlat" and info["memory_bytes"] > n * d * 4


# ----------------------------------------------------------------- choice among index families

@pytest.fixture(scope="module")
def larger():
    return clustered(20_000, 32, seed=3, n_clusters=200), clustered(300, 32, seed=4, n_clusters=200)


def test_choose_index_keeps_the_fastest_family_that_reaches_the_target(larger):
    base, queries = larger
    # PQ4 codes without re-scoring cannot reach 0.95 of the exact top 10, however many lists are probed
    candidates = ["IVF64,PQ4", "IVF64,Flat", "IVF128,SQ8,RFlat", "HNSW16,Flat"]
    index, record = fidx.choose_index(base, queries, 10, 0.95, candidates=candidates)
    rows = {r["factory"]: r for r in record["families"]}
    assert [r["factory"] for r in record["families"]] == candidates
    assert rows["IVF64,PQ4"]["status"] == "target_not_reached"
    reached = [r for r in record["families"] if r.get("reached")]
    assert len(reached) == 3
    fastest = min(reached, key=lambda r: r["ms_per_query"])
    assert record["chosen"] == fastest["factory"] and fastest["status"] == "chosen"
    assert all(r["status"] == "slower" for r in reached if r is not fastest)
    assert record["recall_lower_bound"] >= 0.95 and record["params"] == fastest["params"]
    for r in reached:  # each family's curve: the trials it saw, the tuned value among them
        assert r["trials"] and all({"value", "recall", "ms_per_query"} <= set(t) for t in r["trials"])
        assert r["memory_bytes"] > 0 and r["build_s"] >= 0
    # the index comes back set to the chosen parameters and reaches the target on these queries
    ex_scores, ex_ids = fidx.exact_search(base, queries, 10)
    _, ids = fidx.search(index, queries, 10)
    assert fidx.recall_at_k(ids, ex_ids, exact_scores=ex_scores,
                            approx_true_scores=fidx.true_scores(queries, base, ids)) >= 0.95


def test_choose_index_never_picks_a_family_over_the_memory_budget(larger):
    base, queries = larger
    n, d = base.shape
    flat = fidx.estimate_memory_bytes("IVF64,Flat", n, d)
    sq8 = fidx.estimate_memory_bytes("IVF64,SQ8", n, d)
    assert sq8 < flat
    index, record = fidx.choose_index(base, queries, 10, 0.9, candidates=["IVF64,Flat", "HNSW16,Flat", "IVF64,SQ8"],
                                      memory_budget=(sq8 + flat) // 2)
    status = {r["factory"]: r["status"] for r in record["families"]}
    assert status == {"IVF64,Flat": "over_memory_budget", "HNSW16,Flat": "over_memory_budget", "IVF64,SQ8": "chosen"}
    assert fidx.index_memory_bytes(index) <= (sq8 + flat) // 2
    with pytest.raises(ValueError, match="memory_budget"):
        fidx.choose_index(base, queries, 10, 0.9, candidates=["IVF64,Flat"], memory_budget=1 << 20)


def test_graph_families_over_the_build_budget_are_skipped(larger):
    base, queries = larger
    _, record = fidx.choose_index(base, queries, 10, 0.9, candidates=["HNSW16,Flat", "IVF64,Flat"],
                                  build_budget_s=0.0, graph_sample=2000)
    rows = {r["factory"]: r for r in record["families"]}
    assert rows["HNSW16,Flat"]["status"] == "over_build_budget" and rows["HNSW16,Flat"]["estimated_build_s"] > 0
    assert record["chosen"] == "IVF64,Flat"


def test_auto_above_the_exact_threshold_chooses_a_family_and_describe_records_it(data):
    base, _ = data
    index = fidx.build_index(base, "auto", exact_max=1000, k=10, candidates=["IVF16,Flat", "IVF16,SQ8,RFlat"])
    choice = fidx.describe(index)["choice"]
    assert choice["chosen"] in ("IVF16,Flat", "IVF16,SQ8,RFlat") and choice["k"] == 10
    assert {r["factory"] for r in choice["families"]} == {"IVF16,Flat", "IVF16,SQ8,RFlat"}
    assert "choice" not in fidx.describe(fidx.build_index(base, "auto"))  # exact search below the threshold


@pytest.mark.parametrize("factory", ["IVF16,SQ8,RFlat", "IVF16,SQfp16,RFlat", "IVF16,PQ8,RFlat", "HNSW16,SQ8,RFlat"])
def test_rescored_results_are_exact_inner_products_and_equal_across_index_choices(data, factory):
    base, queries = data
    index = fidx.build_index(base, factory)
    ex_scores, ex_ids = brute_force(base, queries, 10)
    # every list probed (a wide graph search) and a deep re-scoring: for IVF the exact top 10 itself,
    # whatever the codes; a graph search stays approximate, but its scores are exact ones
    ivf = factory.startswith("IVF")
    fidx.set_search_params(index, {"nprobe": 16} if ivf else {"efSearch": 512})
    fidx.set_search_params(index, {"k_factor_rf": 50})
    scores, ids = fidx.search(index, queries, 10)
    np.testing.assert_allclose(scores, fidx.true_scores(queries, base, ids), atol=1e-5)
    if ivf:
        np.testing.assert_allclose(scores, ex_scores, atol=1e-5)
        assert fidx.recall_at_k(ids, ex_ids, exact_scores=ex_scores,
                                approx_true_scores=fidx.true_scores(queries, base, ids)) == 1.0
    # at the default depth the returned scores are still the exact ones of the ids returned
    fidx.set_search_params(index, {"k_factor_rf": fidx.REFINE_K_FACTOR})
    scores, ids = fidx.search(index, queries, 10)
    np.testing.assert_allclose(scores, fidx.true_scores(queries, base, ids), atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    tuned = fidx.tune_search_params(index, queries, 10, 0.9, base=base)
    assert tuned["params"]["k_factor_rf"] == fidx.REFINE_K_FACTOR


def test_memory_estimates_of_the_factories_match_the_built_indexes(data):
    base, _ = data
    n, d = base.shape
    for factory in ("IVF16,Flat", "IVF16,SQ8,RFlat", "IVF16,SQfp16,RFlat", "IVF16,PQ8,RFlat", "Flat"):
        assert fidx.estimate_memory_bytes(factory, n, d) == fidx.index_memory_bytes(fidx.build_index(base, factory))
    hnsw = fidx.index_memory_bytes(fidx.build_index(base, "HNSW16,Flat"))
    assert abs(fidx.estimate_memory_bytes("HNSW16,Flat", n, d) - hnsw) < 0.1 * hnsw


def test_given_centroids_skip_kmeans(data):
    base, queries = data
    first = fidx.build_index(base, "IVF16,Flat")
    cents = faiss.extract_index_ivf(first).quantizer.reconstruct_n(0, 16)
    second = fidx.build_index(base, "IVF16,SQ8,RFlat", seed=7, centroids=cents)
    np.testing.assert_array_equal(faiss.extract_index_ivf(second).quantizer.reconstruct_n(0, 16), cents)
    fidx.set_search_params(first, {"nprobe": 3})
    fidx.set_search_params(second, {"nprobe": 3, "k_factor_rf": 50})
    np.testing.assert_array_equal(fidx.search(first, queries, 10)[1], fidx.search(second, queries, 10)[1])


def test_a_candidate_can_fix_its_rescoring_depth(data):
    base, queries = data
    index, record = fidx.choose_index(base, queries, 10, 0.9, candidates=[("IVF16,PQ8x4fs,RFlat", {"k_factor_rf": 16})])
    assert record["params"]["k_factor_rf"] == 16 and record["families"][0]["fixed_params"] == {"k_factor_rf": 16}
    assert faiss.downcast_index(index).k_factor == 16
    scores, ids = fidx.search(index, queries, 10)
    np.testing.assert_allclose(scores, fidx.true_scores(queries, base, ids), atol=1e-5)


@pytest.mark.parametrize(("factory", "reason"), [
    ("PQ16", "should be a multiple of the number of subquantizers"),  # the config check parses at d = 7680
    ("IVF64,Flat", "Number of training points (40) should be at least as large as number of clusters (64)"),
])
def test_a_factory_that_does_not_fit_the_vectors_is_a_config_error(factory: str, reason: str) -> None:
    # Before: "unexpected RuntimeError" from FAISS (exit 1 and a crash log) in the index stage.
    from fusionrec.pipeline.errors import ConfigError

    x = l2_normalise(np.random.default_rng(0).normal(size=(40, 410)).astype(np.float32))
    with pytest.raises(ConfigError) as info:
        fidx.build_index(x, factory)
    text = str(info.value)
    assert text.startswith(f"config key 'index.factory': FAISS cannot build {factory!r} for 40 items of dimension 410")
    assert reason in text and "Error in" not in text and info.value.exit_code == 2
