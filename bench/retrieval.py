"""Retrieval speed and recall: approximate FAISS index against exact search, in one run.

Part 1, synthetic: --n vectors of dimension --d drawn around --clusters random centres
(unit vectors plus Gaussian noise of --noise times their norm), and --queries fresh queries from the
same mixture. `faiss_index.choose_index` (what `auto` does above 20,000 items) builds each
candidate family (--families, default `default_candidates`: IVF with 2 and 4 sqrt(n) lists,
an HNSW coarse quantizer, SQ8/fp16 codes re-scored exactly, HNSW graphs), tunes its
nprobe/efSearch on --tune-queries separate queries to reach --target-recall of the exact
top-k, and keeps the fastest within the memory budget. For every family the benchmark then
times exact and approximate search on the same evaluation queries, one after the other, with
the same threads (best of --repeats each): recall@k and speed-up come from one run.

Part 2, the real catalogue: the item embeddings of a data set (MovieLens from --art when
given, else the Last.fm precomputed ones), each table as its own index, same procedure.

Each row reports the index's memory in all and per vector (IVF-PQ: m code bytes + 8 id
bytes + centroids, against 4*d for flat codes), and recall@k_in_100: the share of the exact
top k among the first 100 results, which the retriever re-scores exactly (what reaches
the ranker; compressed codes rank poorly on their own but keep the true top k among them).

Usage: .venv/bin/python bench/retrieval.py [--n 1000000] [--d 384] [--threads 2]
       [--families "IVF4096,SQ8,RFlat;HNSW32,Flat"] [--build-budget 600]
Writes bench/results/retrieval.json and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import DATASETS, RESULTS, environment, print_table, rss_mb, write_json  # noqa: E402
from fusionrec.pipeline.retrieval import faiss_index as fidx  # noqa: E402
from fusionrec.pipeline.retrieval.fusion import l2_normalise, load_modalities  # noqa: E402


def clustered(n: int, d: int, n_clusters: int, seed: int, noise: float = 1.0, chunk: int = 100_000) -> np.ndarray:
    """n unit vectors from a two-level mixture: n_clusters/100 topics, n_clusters clusters
    around them, points around the clusters (each level adds Gaussian noise of norm `noise`
    relative to a unit centre, then normalises). Clusters overlap within a topic, so the
    neighbours of a point are spread over several IVF cells, as with real embeddings."""
    crng = np.random.default_rng(12345)
    tops = l2_normalise(crng.standard_normal((max(n_clusters // 100, 1), d)).astype(np.float32))
    centres = l2_normalise(tops[crng.integers(0, len(tops), n_clusters)]
                           + crng.standard_normal((n_clusters, d)).astype(np.float32) * (noise / np.sqrt(d)))
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        z = rng.standard_normal((m, d), dtype=np.float32) * (noise / np.sqrt(d))
        out[s:s + m] = l2_normalise(centres[rng.integers(0, n_clusters, m)] + z)
    return out


def measure(name: str, base: np.ndarray, queries: np.ndarray, tune_q: np.ndarray, k: int, factory: str,
            target: float, repeats: int = 2) -> dict:
    """Build, tune, then time exact and approximate search on the same queries."""
    rss0 = rss_mb()
    t0 = time.perf_counter()
    index = fidx.build_index(base, factory)
    build_s = time.perf_counter() - t0
    rss_index = rss_mb() - rss0
    t0 = time.perf_counter()
    tuned = fidx.tune_search_params(index, tune_q, k, target, base=base)
    tune_s = time.perf_counter() - t0

    exact_s, (ex_scores, ex_ids) = best_time(lambda: fidx.exact_search(base, queries, k), repeats)
    ann_s, (_, ids) = best_time(lambda idx=index: fidx.search(idx, queries, k), repeats)  # bound now: `index` is deleted below
    true = fidx.true_scores(queries, base, ids)
    recall = fidx.recall_at_k(ids, ex_ids, exact_scores=ex_scores, approx_true_scores=true)
    recall_ids = fidx.recall_at_k(ids, ex_ids)
    # What reaches the ranker: the retriever re-scores its first 100 candidates exactly.
    _, ids100 = fidx.search(index, queries, 100)
    in_100 = float(np.mean([len(set(e) & set(f)) / len(e) for e, f in zip(ex_ids, ids100)]))
    info = fidx.describe(index)
    row = {"set": name, "n": int(len(base)), "d": int(base.shape[1]), "index": info["type"],
           "factory": factory if factory != "auto" else fidx.choose_factory(*base.shape),
           "params": tuned["params"], "tune_recall": tuned["recall"], "tune_recall_lower_bound":
           tuned["recall_lower_bound"], f"recall@{k}": recall, f"recall@{k}_ids": recall_ids,
           f"recall@{k}_in_100": in_100,
           "exact_ms_per_query": 1000 * exact_s / len(queries), "ann_ms_per_query": 1000 * ann_s / len(queries),
           "speedup": exact_s / ann_s if ann_s > 0 else None, "build_s": build_s, "tune_s": tune_s,
           "index_mb": info["memory_bytes"] / 2**20, "bytes_per_vector": info["memory_bytes"] / len(base),
           "rss_growth_mb": rss_index,
           "vectors_mb": base.nbytes / 2**20, "tune_trials": tuned["trials"], "tune_reached": tuned["reached"]}
    del index
    gc.collect()
    return row


def best_time(fn, repeats: int) -> tuple[float, tuple]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def families(base: np.ndarray, queries: np.ndarray, tune_q: np.ndarray, k: int, target: float,
             candidates: list[str | tuple[str, dict[str, int]]] | None, build_budget: float, repeats: int) -> tuple[list[dict], dict]:
    """choose_index on the synthetic set; each tuned family timed against exact search."""
    exact_ref = fidx.exact_search(base, queries, k)
    rows: list[dict] = []

    def inspect(index, fam: dict) -> None:
        ann_s = exact_s = math.inf
        ids = None
        for _ in range(repeats):  # interleaved: both see the same load
            e, _ = best_time(lambda: fidx.exact_search(base, queries, k), 1)
            a, (_, ids) = best_time(lambda: fidx.search(index, queries, k), 1)
            exact_s, ann_s = min(exact_s, e), min(ann_s, a)
        ex_scores, ex_ids = exact_ref
        true = fidx.true_scores(queries, base, ids)
        rows.append({"set": "synthetic-clustered", "n": int(len(base)), "d": int(base.shape[1]),
                     "factory": fam["factory"], "params": dict(fam["params"]), "tune_recall": fam["recall"],
                     "tune_recall_lower_bound": fam["recall_lower_bound"], "tune_reached": fam["reached"],
                     f"recall@{k}": fidx.recall_at_k(ids, ex_ids, exact_scores=ex_scores, approx_true_scores=true),
                     f"recall@{k}_ids": fidx.recall_at_k(ids, ex_ids),
                     "exact_ms_per_query": 1000 * exact_s / len(queries),
                     "ann_ms_per_query": 1000 * ann_s / len(queries), "speedup": exact_s / ann_s,
                     "build_s": fam["build_s"], "tune_s": fam["tune_s"],
                     "index_mb": fam["memory_bytes"] / 2**20, "bytes_per_vector": fam["memory_bytes"] / len(base),
                     "vectors_mb": base.nbytes / 2**20, "tune_trials": fam["trials"]})
        print(f"  {fam['factory']}: {fam['params']} recall {rows[-1][f'recall@{k}']:.3f} "
              f"{rows[-1]['ann_ms_per_query']:.3f} vs {rows[-1]['exact_ms_per_query']:.2f} ms/query "
              f"({rows[-1]['speedup']:.1f}x), build {fam['build_s']:.0f}s", flush=True)

    t0 = time.perf_counter()
    index, record = fidx.choose_index(base, tune_q, k, target, candidates=candidates, build_budget_s=build_budget,
                                      inspect=inspect)
    record["choose_s"] = time.perf_counter() - t0
    status = {f["factory"]: f["status"] for f in record["families"]}
    for r in rows:
        r["status"] = status[r["factory"]]
    for f in record["families"]:
        if "trials" not in f:  # skipped before building: no row to time
            rows.append({"set": "synthetic-clustered", "n": int(len(base)), "d": int(base.shape[1]),
                         "factory": f["factory"], "params": {}, "status": f["status"],
                         "estimated_build_s": f.get("estimated_build_s"),
                         "index_mb": f["estimated_memory_bytes"] / 2**20})
    del index
    gc.collect()
    return rows, record


def real_catalogue(art: Path | None) -> tuple[str, dict]:
    if art is not None:
        mods = load_modalities(Path(art) / "embeddings", "item")
        if mods:
            return str(art), mods
    path = DATASETS / "lastfm-2k" / "fusionrec" / "embeddings"
    return "lastfm-2k", load_modalities(path, "item")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--clusters", type=int, default=10_000)
    ap.add_argument("--noise", type=float, default=1.5)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--tune-queries", type=int, default=500)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--families", default="",
                    help="FAISS index-factory strings, ';'-separated, for the tuner to choose from "
                         "(default: faiss_index.default_candidates); 'factory|k_factor_rf=16' fixes a parameter")
    ap.add_argument("--build-budget", type=float, default=fidx.DEFAULT_BUILD_BUDGET_S,
                    help="skip graph families whose build is estimated longer (seconds)")
    ap.add_argument("--repeats", type=int, default=2, help="timed searches of each kind per family (best kept)")
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--art", type=Path, default=None, help="artifacts dir with item embeddings (real catalogue)")
    ap.add_argument("--real-factory", default="HNSW32,Flat",
                    help="ANN index for the (small) real catalogue; auto would pick exact search")
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / "retrieval.json")
    args = ap.parse_args(argv)
    fidx.set_threads(args.threads)
    rows: list[dict] = []
    choice: dict | None = None
    t_all = time.perf_counter()
    if not args.skip_synthetic:
        t0 = time.perf_counter()
        base = clustered(args.n, args.d, args.clusters, seed=1, noise=args.noise)
        queries = clustered(args.queries + args.tune_queries, args.d, args.clusters, seed=2, noise=args.noise)
        print(f"generated {args.n:,} x {args.d} in {time.perf_counter() - t0:.1f}s", flush=True)
        # "factory" or "factory|param=value,...": parameters fixed for that family (k_factor_rf=16)
        cands: list[str | tuple[str, dict[str, int]]] = []
        for f in filter(None, args.families.split(";")):
            fac, _, fixed = f.partition("|")
            cands.append((fac, {a: int(b) for a, b in (kv.split("=") for kv in fixed.split(",") if kv)}))
        fam_rows, choice = families(base, queries[:args.queries], queries[args.queries:], args.k,
                                    args.target_recall, cands or None, args.build_budget, args.repeats)
        rows += fam_rows
        print(f"chosen: {choice['chosen']} {choice['params']} ({choice['choose_s']:.0f}s for the choice)", flush=True)
        del base, queries
        gc.collect()
    name, mods = real_catalogue(args.art)
    rng = np.random.default_rng(3)
    for modality, (_, x) in sorted(mods.items()):
        # queries: the catalogue's own vectors perturbed a little (held-out-like), excluded from nothing
        q = l2_normalise(x[rng.integers(0, len(x), args.queries + args.tune_queries)]
                         + 0.3 * rng.standard_normal((args.queries + args.tune_queries, x.shape[1])).astype(np.float32)
                         / np.sqrt(x.shape[1]))
        for factory in ("auto", args.real_factory):
            rows.append(measure(f"{name}:{modality}", x, q[:args.queries], q[args.queries:], args.k, factory,
                                args.target_recall))
    k = args.k
    print_table([{**r, "params": ",".join(f"{a}={b}" for a, b in r["params"].items()) or "-"} for r in rows],
                ["set", "n", "factory", "status", "params", f"recall@{k}", f"recall@{k}_in_100", "exact_ms_per_query",
                 "ann_ms_per_query", "speedup", "build_s", "index_mb", "bytes_per_vector"],
                title=f"recall@{k} of the exact top-{k} and speed-up over exact search ({args.threads} threads)")
    result = {"args": {a: (str(v) if isinstance(v, Path) else v) for a, v in vars(args).items()},
              "environment": environment(), "rows": rows, "choice": choice, "total_s": time.perf_counter() - t_all}
    write_json(result, args.out)
    print(f"\nwrote {args.out} ({result['total_s']:.0f}s total)")
    return result


if __name__ == "__main__":
    main()
