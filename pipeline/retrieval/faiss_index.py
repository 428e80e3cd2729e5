"""FAISS inner-product index: choice by catalogue size, build, search-parameter tuning, persistence.

All indexes use METRIC_INNER_PRODUCT on the fused vectors (see pipeline.fusion): a higher
score is a better match. `build_index(x, "auto")` keeps exact search (`Flat`) for small
catalogues; above EXACT_MAX_ITEMS, while the float vectors fit the memory budget,
`choose_index` builds each candidate family (IVF with more or fewer lists, an HNSW coarse
quantizer, SQ8/fp16 codes re-scored exactly from the float vectors, HNSW graphs), tunes
it to the target recall and keeps the fastest at that recall; beyond the budget
`choose_factory` gives IVF-PQ. Any faiss index-factory string (`HNSW32,Flat`,
`IVF4096,SQ8,RFlat`, `OPQ32,IVF1024,PQ32`, ...) can be given instead. `tune_search_params` raises nprobe (IVF) or efSearch (HNSW) until the
recall of the exact search on a sample of queries reaches the target, then bisects down
to the smallest value that still does.
"""

from __future__ import annotations

import math
import re
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from fusionrec.pipeline.errors import ConfigError
from fusionrec.pipeline.io.storage import atomic_path

EXACT_MAX_ITEMS = 20_000
DEFAULT_MEMORY_BUDGET = 4 << 30
# build_index('auto') records the family choice of each index it builds here (see describe)
_CHOICES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def set_threads(n_threads: int | None) -> None:
    """FAISS (OpenMP) threads for build and search; None leaves FAISS's default."""
    if n_threads:
        faiss.omp_set_num_threads(int(n_threads))


def default_nlist(n: int) -> int:
    """About 2 sqrt(n) inverted lists (a power of two, >= 39 training points per list).

    Search cost per query is nlist + nprobe n / nlist vectors; for the nprobe that reach
    0.95 recall this is flat between 2 and 4 sqrt(n) lists, while training and adding
    cost grow with nlist, so the lower end is taken (1M vectors: 2048 lists).
    """
    nlist = 2 ** int(round(math.log2(max(2.0 * math.sqrt(max(n, 1)), 1.0))))
    return int(max(1, min(nlist, n // 39)))


def _pq_subquantizers(d: int) -> int:
    """Largest m <= d/4 dividing d (each sub-vector gets >= 4 dimensions, one byte each)."""
    for m in range(max(d // 4, 1), 0, -1):
        if d % m == 0:
            return m
    return 1


def choose_factory(n: int, d: int, *, exact_max: int = EXACT_MAX_ITEMS,
                   memory_budget: int = DEFAULT_MEMORY_BUDGET) -> str:
    """Index-factory string for n vectors of dimension d."""
    if n <= exact_max:
        return "Flat"
    nlist = default_nlist(n)
    if n * d * 4 <= memory_budget:
        return f"IVF{nlist},Flat"
    return f"IVF{nlist},PQ{_pq_subquantizers(d)}"


def new_index(d: int, factory: str, *, seed: int = 0, niter: int | None = None):
    """An empty inner-product index from a factory string, with fusionrec's training settings:
    seeded k-means, at most 256 points per centroid, and no polysemous training for IVF-PQ
    (a permutation of each codebook for Hamming filtering, which search does not use by
    default: minutes of training for the same distances). Returns (index, its IVF part or None)."""
    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return index, None
    ivf.cp.seed = seed
    ivf.cp.max_points_per_centroid = 256
    if niter is not None:
        ivf.cp.niter = niter
    inner = faiss.downcast_index(ivf)
    if isinstance(inner, faiss.IndexIVFPQ):
        inner.do_polysemous_training = False  # type: ignore[attr-defined]  # a SWIG attribute the stubs lack
    return index, ivf


def build_index(x: np.ndarray, factory: str = "auto", *, seed: int = 0, train_size: int | None = None,
                exact_max: int = EXACT_MAX_ITEMS, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                add_batch: int = 262_144, tune_queries: np.ndarray | None = None, k: int = 100,
                target_recall: float = 0.95, n_tune_queries: int = 500, centroids: np.ndarray | None = None,
                **choice: Any) -> faiss.Index:
    """Train (on a seeded sample) and fill an inner-product index with the rows of x.

    factory "auto": exact search (`Flat`) up to exact_max rows; above it, while the float
    vectors fit memory_budget, `choose_index` picks the fastest family reaching
    target_recall of the exact top-k on `tune_queries` (default: n_tune_queries sums of two
    random rows of x, like a profile of two items; further keyword arguments go to
    choose_index), its record kept for `describe`; beyond the budget `choose_factory`'s IVF-PQ.
    centroids: trained coarse centroids for an IVF factory with as many lists (k-means is skipped).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    given = factory not in (None, "", "auto")
    if not given:
        factory = choose_factory(n, d, exact_max=exact_max, memory_budget=memory_budget)
        if n > exact_max and n * d * 4 <= memory_budget:
            if tune_queries is None:
                rng = np.random.default_rng(seed + 1)
                tune_queries = x[rng.integers(0, n, n_tune_queries)] + x[rng.integers(0, n, n_tune_queries)]
            index, record = choose_index(x, tune_queries, k, target_recall, memory_budget=memory_budget, seed=seed,
                                         **choice)
            _CHOICES[index] = record
            return index
    try:
        index, ivf = new_index(d, factory, seed=seed)
        if ivf is not None and centroids is not None and len(centroids) == ivf.nlist:
            ivf.quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))  # IVF training keeps a full quantizer
        if not index.is_trained:
            # 50 points per list is enough for the coarse centroids; k-means cost grows with it
            want = train_size or (max(ivf.nlist * 50, 10_000) if ivf is not None else 100_000)
            rng = np.random.default_rng(seed)
            sample = x if n <= want else x[np.sort(rng.choice(n, want, replace=False))]
            index.train(sample)
    except RuntimeError as exc:
        if not given:
            raise
        # A factory the config check parsed (at a stand-in dimension) that does not fit these
        # vectors: PQ subquantizers that do not divide d, more lists or codes than rows. The
        # config's to fix (exit 2), not a crash.
        raise ConfigError(f"config key 'index.factory': FAISS cannot build {factory!r} for {n} items of dimension "
                          f"{d} ({_faiss_reason(exc)}); use \"auto\" or a factory that fits") from None
    for start in range(0, n, add_batch):
        index.add(x[start:start + add_batch])
    return index


def _faiss_reason(exc: Exception) -> str:
    """FAISS's own words, without its `Error in <C++ signature> at <file>:<line>: ` prefix."""
    text = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return re.sub(r"^Error in .* at \S+:\d+: (Error: )?", "", text)


def search_param_name(index: faiss.Index) -> str | None:
    """'nprobe' for IVF indexes, 'efSearch' for HNSW, None when search is exhaustive."""
    try:
        faiss.extract_index_ivf(index)
        return "nprobe"
    except RuntimeError:
        pass
    inner = index
    while True:
        inner = faiss.downcast_index(inner)
        if isinstance(inner, faiss.IndexHNSW):
            return "efSearch"
        if isinstance(inner, (faiss.IndexPreTransform,)):
            inner = inner.index
        elif isinstance(inner, (faiss.IndexRefine,)):
            inner = inner.base_index
        elif isinstance(inner, (faiss.IndexIDMap,)):
            inner = inner.index
        else:
            return None


def set_search_params(index: faiss.Index, params: dict[str, int]) -> None:
    ps = faiss.ParameterSpace()
    for name, value in params.items():
        ps.set_index_parameter(index, name, float(value))


def search(index: faiss.Index, queries: np.ndarray, k: int, batch_size: int = 8192
           ) -> tuple[np.ndarray, np.ndarray]:
    """Batched search; FAISS parallelises each batch over its OpenMP threads. Missing hits: id -1."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = int(min(k, index.ntotal))
    scores = np.empty((len(queries), k), dtype=np.float32)
    ids = np.empty((len(queries), k), dtype=np.int64)
    for s in range(0, len(queries), batch_size):
        scores[s:s + batch_size], ids[s:s + batch_size] = index.search(queries[s:s + batch_size], k)
    return scores, ids


def exact_search(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-k (FAISS's blocked BLAS kernel, no index copy)."""
    k = int(min(k, len(base)))
    return faiss.knn(np.ascontiguousarray(queries, dtype=np.float32),
                     np.ascontiguousarray(base, dtype=np.float32), k, metric=faiss.METRIC_INNER_PRODUCT)


def per_query_recall(approx_ids: np.ndarray, exact_ids: np.ndarray, *, exact_scores: np.ndarray | None = None,
                     approx_true_scores: np.ndarray | None = None, tol: float = 1e-5) -> np.ndarray:
    """Share of each query's exact top-k found by the approximate search, (n_queries,).

    With scores (the exact top-k scores, and the true scores of the approximate hits) a
    hit is any returned item scoring at least the exact k-th score, so ties at the border
    (duplicate vectors) are not counted as misses.
    """
    k = exact_ids.shape[1]
    if exact_scores is not None and approx_true_scores is not None:
        good = (approx_true_scores[:, :k] >= exact_scores[:, -1:] - tol) & (approx_ids[:, :k] >= 0)
        return np.minimum(good.sum(axis=1), k) / k
    out = np.empty(len(exact_ids))
    for s in range(0, len(exact_ids), 1024):
        a, e = approx_ids[s:s + 1024, :k], exact_ids[s:s + 1024]
        out[s:s + 1024] = ((a[:, :, None] == e[:, None, :]) & (a[:, :, None] >= 0)).any(axis=2).sum(axis=1) / k
    return out


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, **kwargs) -> float:
    """Mean of per_query_recall (same arguments)."""
    return float(per_query_recall(approx_ids, exact_ids, **kwargs).mean())


def true_scores(queries: np.ndarray, base: np.ndarray, ids: np.ndarray, chunk: int = 64) -> np.ndarray:
    """Exact inner products of each query with its returned ids (-1 ids give -inf)."""
    out = np.empty(ids.shape, dtype=np.float32)
    for s in range(0, len(ids), chunk):
        out[s:s + chunk] = np.einsum("qd,qkd->qk", queries[s:s + chunk], base[np.maximum(ids[s:s + chunk], 0)])
    return np.where(ids >= 0, out, -np.inf)


def recall_bound(per_query: np.ndarray, z: float = 1.645) -> dict[str, float]:
    """{"recall": the mean of per-query recalls, "recall_lower_bound": the mean minus z
    standard errors (z = 1.645: a one-sided 95% bound; no error term for a single query)}."""
    se = float(per_query.std(ddof=1) / np.sqrt(len(per_query))) if len(per_query) > 1 else 0.0
    return {"recall": float(per_query.mean()), "recall_lower_bound": float(per_query.mean()) - z * se}


def smallest_passing(passes: Callable[[int], bool], floor: int, top: int) -> tuple[int, bool]:
    """The smallest search depth in [floor, top] that `passes` (taken to be monotone), and
    whether any did: doubling from `floor`, then bisecting below the first passing value
    (from half of it) to within an eighth. `passes` is called once or more per value, so
    callers memoise it. (top, False) when even `top` fails."""
    value = floor
    while value < top and not passes(value):
        value *= 2
    value = min(value, top)
    reached = passes(value)
    if reached and value > floor:
        lo, hi = value // 2, value
        while hi - lo > max(1, hi // 8):
            mid = (lo + hi) // 2
            if passes(mid):
                hi = mid
            else:
                lo = mid
        value = hi
    return value, reached


def tune_search_params(index: faiss.Index, queries: np.ndarray, k: int, target_recall: float, *,
                       base: np.ndarray | None = None, exact: tuple[np.ndarray, np.ndarray] | None = None,
                       z: float = 1.645) -> dict:
    """Smallest nprobe / efSearch whose recall@k of the exact search reaches target_recall.

    A value passes when the one-sided lower confidence bound of the mean recall over the
    sample queries (mean - z * standard error; z = 1.645: 95%) reaches the target, so the
    recall on further queries from the same distribution reaches it too, not only the
    sample's. Give `base` (the indexed vectors, for exact search and tie-aware recall) or
    `exact` (precomputed exact scores and ids). Returns {"params", "recall" (the sample
    mean), "recall_lower_bound", "k", "n_queries", "trials": [{value, recall,
    recall_lower_bound, ms_per_query}], "reached"}.
    """
    name = search_param_name(index)
    k = int(min(k, index.ntotal))
    if name is None:
        return {"params": {}, "recall": 1.0, "recall_lower_bound": 1.0, "k": k, "n_queries": int(len(queries)),
                "trials": [], "reached": True}
    if exact is None:
        if base is None:
            raise ValueError("tune_search_params needs base (the indexed vectors) or exact")
        exact = exact_search(base, queries, k)
    ex_scores, ex_ids = exact
    trials: dict[int, dict] = {}

    def trial(value: int) -> float:
        if value not in trials:
            set_search_params(index, {name: value})
            t0 = time.perf_counter()
            _, ids = search(index, queries, k)
            ms = (time.perf_counter() - t0) * 1000 / max(len(queries), 1)
            if base is not None:
                per = per_query_recall(ids, ex_ids, exact_scores=ex_scores,
                                       approx_true_scores=true_scores(queries, base, ids))
            else:
                per = per_query_recall(ids, ex_ids)
            trials[value] = {"value": value, **recall_bound(per, z), "ms_per_query": ms}
        return trials[value]["recall_lower_bound"]

    if name == "nprobe":
        top = int(faiss.extract_index_ivf(index).nlist)
        floor = 1
    else:  # HNSW explores max(efSearch, k) candidates: values below k are all the same
        top, floor = max(4096, 4 * k), k
    value, reached = smallest_passing(lambda v: trial(v) >= target_recall, floor, top)
    set_search_params(index, {name: value})
    params = {name: value}
    outer = faiss.downcast_index(index)
    if isinstance(outer, faiss.IndexRefine):  # the re-scoring depth, so that saved params restore it
        params["k_factor_rf"] = int(outer.k_factor)
    return {"params": params, "recall": trials[value]["recall"],
            "recall_lower_bound": trials[value]["recall_lower_bound"], "k": k,
            "n_queries": int(len(queries)), "trials": [trials[v] for v in sorted(trials)],
            "reached": bool(reached)}


# --------------------------------------------------------------------------- choice among index families

GRAPH_M = 32
REFINE_K_FACTOR = 4
DEFAULT_BUILD_BUDGET_S = 600.0


def default_candidates(n: int, d: int) -> list[str]:
    """The index families `choose_index` tries for n vectors of dimension d.

    IVF with about 2 sqrt(n) lists and with twice as many (flat codes; the larger one also
    with an HNSW coarse quantizer, and with SQ8 or fp16 codes re-scored exactly: `RFlat`
    keeps the float vectors and re-ranks REFINE_K_FACTOR * k candidates by their exact
    inner product), and HNSW graphs (float, and SQ8 re-scored)."""
    nl = default_nlist(n)
    nl2 = int(max(1, min(2 * nl, n // 39)))
    return [f"IVF{nl},Flat", f"IVF{nl2},Flat", f"IVF{nl2}_HNSW{GRAPH_M},Flat", f"IVF{nl},SQ8,RFlat",
            f"IVF{nl2},SQ8,RFlat", f"IVF{nl2},SQfp16,RFlat", f"HNSW{GRAPH_M},Flat", f"HNSW{GRAPH_M},SQ8,RFlat"]


def estimate_memory_bytes(factory: str, n: int, d: int) -> int:
    """Bytes an index from `factory` will hold for n vectors of dimension d, from its
    components (IVF lists: 8-byte ids and centroids; HNSW: 2M level-0 links of 4 bytes;
    Flat 4d, SQfp16 2d, SQ8 d, SQ4 d/2, PQm[xb] m*b/8 bytes a vector; RFlat: 4d more).
    Components it does not know count 0: the built index is measured again."""
    total = 0.0
    for part in factory.replace("_", ",").split(","):
        if m := re.fullmatch(r"IVF(\d+)", part):
            total += n * 8 + int(m[1]) * d * 4
        elif m := re.fullmatch(r"HNSW(\d+)", part):
            total += n * (2 * int(m[1]) * 4 + 16) * 1.05 if part == factory.split(",")[0] \
                else 0  # a coarse quantizer's graph is over the centroids: small
        elif part in ("Flat", "RFlat"):
            total += n * d * 4
        elif part == "SQfp16":
            total += n * d * 2
        elif m := re.fullmatch(r"SQ(\d)", part):
            total += n * d * int(m[1]) / 8
        elif m := re.fullmatch(r"PQ(\d+)(?:x(\d+))?(?:fs)?", part):
            total += n * int(m[1]) * int(m[2] or 8) / 8
    return int(total)


def _nlist(factory: str) -> int | None:
    m = re.match(r"(?:[^,]*,)?IVF(\d+)", factory)
    return int(m[1]) if m else None


def _time_search(index: faiss.Index, queries: np.ndarray, k: int, rounds: int = 3) -> float:
    """Best ms/query over `rounds` searches of all queries (the least disturbed by other load)."""
    best = math.inf
    for _ in range(rounds):
        t0 = time.perf_counter()
        search(index, queries, k)
        best = min(best, time.perf_counter() - t0)
    return 1000 * best / max(len(queries), 1)


def _estimate_graph_build_s(x: np.ndarray, factory: str, sample: int, seed: int) -> float:
    """Seconds to build `factory` (an HNSW graph) on all of x, from a build on `sample` rows
    scaled by n log n (each insertion searches the graph built so far)."""
    n = len(x)
    m = min(n, sample)
    rng = np.random.default_rng(seed)
    xs = x[np.sort(rng.choice(n, m, replace=False))] if m < n else x
    t0 = time.perf_counter()
    build_index(xs, factory, seed=seed)
    took = time.perf_counter() - t0
    return took * (n / m) * math.log(max(n, 2)) / math.log(max(m, 2))


def choose_index(x: np.ndarray, queries: np.ndarray, k: int, target_recall: float, *,
                 memory_budget: int = DEFAULT_MEMORY_BUDGET,
                 candidates: list[str | tuple[str, dict[str, int]]] | None = None,
                 build_budget_s: float | None = DEFAULT_BUILD_BUDGET_S, refine_k_factor: int = REFINE_K_FACTOR,
                 graph_sample: int = 20_000, timing_rounds: int = 3, seed: int = 0, z: float = 1.645,
                 inspect: Callable[[faiss.Index, dict], None] | None = None) -> tuple[faiss.Index, dict]:
    """The fastest index family that reaches target_recall of the exact top-k within the
    memory budget, with its search parameter tuned; and the record of every family tried.

    For each factory in `candidates` (default: `default_candidates`; a (factory, {param:
    value}) pair fixes search parameters other than the tuned one, e.g. a deeper k_factor_rf
    for coarser codes): skip it when its
    estimated memory is over `memory_budget`, or (HNSW graphs, whose build is the slowest)
    when the build time extrapolated from a `graph_sample`-row build is over `build_budget_s`;
    else build it on x (families with the same number of lists share one k-means), measure its memory (over the budget: dropped), tune nprobe / efSearch
    on `queries` with `tune_search_params` (re-scored families fetch refine_k_factor * k
    candidates and re-score them exactly), and time the search at the tuned value. The
    fastest family so far and the new one are timed again one after the other (best of
    `timing_rounds`), so a load that comes and goes on the machine does not decide.
    Returns (index, record): record["families"] holds each family's status, tuned params,
    recall, ms/query, memory, build and tuning seconds and the curve of its tuning trials.
    When no family reaches the target the one with the highest recall is kept.
    inspect(index, row), when given, sees each tuned family before it is compared (benchmarks).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    n, d = x.shape
    k = int(min(k, n))
    cands = [(c, {}) if isinstance(c, str) else (c[0], dict(c[1]))
             for c in (candidates if candidates is not None else default_candidates(n, d))]
    t_ex = time.perf_counter()
    exact = exact_search(x, queries, k)
    exact_ms = 1000 * (time.perf_counter() - t_ex) / max(len(queries), 1)
    families: list[dict] = []
    trained: dict[int, np.ndarray] = {}
    best: tuple[faiss.Index, dict] | None = None
    fallback: tuple[faiss.Index, dict] | None = None
    for factory, fixed in cands:
        row: dict[str, Any] = {"factory": factory, "estimated_memory_bytes": estimate_memory_bytes(factory, n, d)}
        if fixed:
            row["fixed_params"] = fixed
        families.append(row)
        if row["estimated_memory_bytes"] > memory_budget:
            row["status"] = "over_memory_budget"
            continue
        if build_budget_s is not None and factory.startswith("HNSW"):
            row["estimated_build_s"] = _estimate_graph_build_s(x, factory, graph_sample, seed)
            if row["estimated_build_s"] > build_budget_s:
                row["status"] = "over_build_budget"
                continue
        t0 = time.perf_counter()
        index = build_index(x, factory, seed=seed, centroids=trained.get(_nlist(factory) or -1))
        row["build_s"] = time.perf_counter() - t0
        try:  # families with as many lists share the k-means of the first one
            ivf = faiss.extract_index_ivf(index)
            if ivf.nlist not in trained:
                trained[ivf.nlist] = ivf.quantizer.reconstruct_n(0, ivf.nlist)
        except RuntimeError:
            pass
        row["memory_bytes"] = index_memory_bytes(index)
        if row["memory_bytes"] > memory_budget:
            row["status"] = "over_memory_budget"
            del index
            continue
        if isinstance(faiss.downcast_index(index), faiss.IndexRefine):
            set_search_params(index, {"k_factor_rf": refine_k_factor})
        set_search_params(index, fixed)
        t0 = time.perf_counter()
        tuned = tune_search_params(index, queries, k, target_recall, base=x, exact=exact, z=z)
        row["tune_s"] = time.perf_counter() - t0
        row.update(params={**fixed, **tuned["params"]}, recall=tuned["recall"],
                   recall_lower_bound=tuned["recall_lower_bound"], reached=tuned["reached"], trials=tuned["trials"])
        if inspect is not None:
            inspect(index, row)
        if not tuned["reached"]:
            row["status"] = "target_not_reached"
            if best is None and (fallback is None or row["recall"] > fallback[1]["recall"]):
                fallback = (index, row)
            continue
        row["ms_per_query"] = _time_search(index, queries, k, timing_rounds)
        if best is not None:  # time the fastest so far again, next to this one
            best[1]["ms_per_query"] = min(best[1]["ms_per_query"], _time_search(best[0], queries, k, timing_rounds))
            row["ms_per_query"] = min(row["ms_per_query"], _time_search(index, queries, k, timing_rounds))
        if best is None or row["ms_per_query"] < best[1]["ms_per_query"]:
            if best is not None:
                best[1]["status"] = "slower"
            best = (index, row)
            row["status"] = "fastest"
        else:
            row["status"] = "slower"
        fallback = None  # a family reached the target: those that did not are not kept
    chosen = best or fallback
    if chosen is None:
        raise ValueError(f"no index family fits memory_budget={memory_budget} bytes: {[c for c, _ in cands]}")
    index, row = chosen
    row["status"] = "chosen"
    set_search_params(index, row["params"])
    record = {"chosen": row["factory"], "params": dict(row["params"]), "recall": row["recall"],
              "recall_lower_bound": row["recall_lower_bound"], "reached": row["reached"],
              "ms_per_query": row.get("ms_per_query"), "exact_ms_per_query": exact_ms, "k": k,
              "target_recall": target_recall, "n_queries": int(len(queries)), "memory_budget": int(memory_budget),
              "build_budget_s": build_budget_s, "families": families}
    return index, record


def index_memory_bytes(index: faiss.Index) -> int:
    """Bytes the index holds in RAM (codes, ids, graph links, coarse centroids)."""
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexPreTransform):
        return index_memory_bytes(inner.index) + inner.d * inner.d * 4
    if isinstance(inner, faiss.IndexRefine):  # compressed codes plus the vectors they are re-scored with
        return index_memory_bytes(inner.base_index) + index_memory_bytes(inner.refine_index)
    try:
        ivf = faiss.extract_index_ivf(inner)
        lists = ivf.invlists
        if lists is not None:
            n = sum(int(lists.list_size(i)) for i in range(ivf.nlist))
            # ivf.code_size: fast-scan lists pack their codes in blocks and report no per-vector size
            return int(n * (ivf.code_size + 8) + index_memory_bytes(ivf.quantizer))
    except RuntimeError:
        pass
    if isinstance(inner, faiss.IndexHNSW):
        hnsw = inner.hnsw
        # neighbors and offsets are SWIG vectors the faiss stubs do not list
        graph = hnsw.neighbors.size() * 4 + hnsw.levels.size() * 4 + hnsw.offsets.size() * 8  # type: ignore[attr-defined]
        return int(graph + index_memory_bytes(inner.storage))
    if isinstance(inner, faiss.IndexFlatCodes):
        return int(inner.ntotal * inner.code_size)
    return int(inner.ntotal * inner.d * 4)


def describe(index: faiss.Index) -> dict:
    """Type, size and memory of an index, for the manifest."""
    inner = faiss.downcast_index(index)
    out = {"type": type(inner).__name__, "ntotal": int(index.ntotal), "dim": int(index.d),
           "metric": "inner_product", "memory_bytes": index_memory_bytes(index)}
    try:
        out["nlist"] = int(faiss.extract_index_ivf(index).nlist)
    except RuntimeError:
        pass
    if index in _CHOICES:
        out["choice"] = _CHOICES[index]
    return out


def save_index(index: faiss.Index, path: Path) -> None:
    """faiss.write_index to a temporary file, then os.replace (readers never see half a file)."""
    with atomic_path(Path(path)) as tmp:
        faiss.write_index(index, str(tmp))


def load_index(path: Path, *, mmap: bool = False) -> faiss.Index:
    """mmap: the codes stay in the file, mapped read-only, so processes that load the same file
    share one copy in the page cache. IO_FLAG_MMAP_IFC maps Flat, IVF lists and HNSW storage
    alike (IO_FLAG_MMAP copies a Flat index's codes into memory)."""
    return faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC if mmap else 0)
