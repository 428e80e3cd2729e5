"""FAISS inner-product index: choice by catalogue size, build, search-parameter tuning, persistence.

All indexes use METRIC_INNER_PRODUCT on the fused vectors (see pipeline.fusion): a higher
score is a better match. `choose_factory` picks exact search (`Flat`) for small catalogues,
IVF with flat codes while the vectors fit the memory budget and IVF-PQ beyond it; any
faiss index-factory string (`HNSW32,Flat`, `IVF4096,PQ64`, `OPQ32,IVF1024,PQ32`, ...) can
be given instead. `tune_search_params` raises nprobe (IVF) or efSearch (HNSW) until the
recall of the exact search on a sample of queries reaches the target, then bisects down
to the smallest value that still does.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import faiss
import numpy as np

from fusionrec.pipeline.io.storage import atomic_path

EXACT_MAX_ITEMS = 20_000
DEFAULT_MEMORY_BUDGET = 4 << 30


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
                add_batch: int = 262_144) -> faiss.Index:
    """Train (on a seeded sample) and fill an inner-product index with the rows of x."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if factory in (None, "", "auto"):
        factory = choose_factory(n, d, exact_max=exact_max, memory_budget=memory_budget)
    index, ivf = new_index(d, factory, seed=seed)
    if not index.is_trained:
        # 50 points per list is enough for the coarse centroids; k-means cost grows with it
        want = train_size or (max(ivf.nlist * 50, 10_000) if ivf is not None else 100_000)
        rng = np.random.default_rng(seed)
        sample = x if n <= want else x[np.sort(rng.choice(n, want, replace=False))]
        index.train(sample)
    for start in range(0, n, add_batch):
        index.add(x[start:start + add_batch])
    return index


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
            se = float(per.std(ddof=1) / np.sqrt(len(per))) if len(per) > 1 else 0.0
            trials[value] = {"value": value, "recall": float(per.mean()),
                             "recall_lower_bound": float(per.mean()) - z * se, "ms_per_query": ms}
        return trials[value]["recall_lower_bound"]

    if name == "nprobe":
        top = int(faiss.extract_index_ivf(index).nlist)
        value = 1
    else:  # HNSW explores max(efSearch, k) candidates: values below k are all the same
        top, value = max(4096, 4 * k), k
    floor = value
    while value < top and trial(value) < target_recall:
        value *= 2
    value = min(value, top)
    reached = trial(value) >= target_recall
    if reached and value > floor:  # bisect between the last failing value and the first passing one
        lo, hi = value // 2, value
        while hi - lo > max(1, hi // 8):
            mid = (lo + hi) // 2
            if trial(mid) >= target_recall:
                hi = mid
            else:
                lo = mid
        value = hi
    set_search_params(index, {name: value})
    return {"params": {name: value}, "recall": trials[value]["recall"],
            "recall_lower_bound": trials[value]["recall_lower_bound"], "k": k,
            "n_queries": int(len(queries)), "trials": [trials[v] for v in sorted(trials)],
            "reached": bool(reached)}


def index_memory_bytes(index: faiss.Index) -> int:
    """Bytes the index holds in RAM (codes, ids, graph links, coarse centroids)."""
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexPreTransform):
        return index_memory_bytes(inner.index) + inner.d * inner.d * 4
    try:
        ivf = faiss.extract_index_ivf(inner)
        lists = ivf.invlists
        if lists is not None:
            n = sum(int(lists.list_size(i)) for i in range(ivf.nlist))
            return int(n * (lists.code_size + 8) + index_memory_bytes(ivf.quantizer))
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
    return out


def save_index(index: faiss.Index, path: Path) -> None:
    """faiss.write_index to a temporary file, then os.replace (readers never see half a file)."""
    with atomic_path(Path(path)) as tmp:
        faiss.write_index(index, str(tmp))


def load_index(path: Path, *, mmap: bool = False) -> faiss.Index:
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    return faiss.read_index(str(path), flags)
