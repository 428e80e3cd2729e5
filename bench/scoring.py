"""Scoring throughput and peak memory of the ranker stage on synthetic data.

Default: 10,000 users x 100 candidates (1,000,000 pairs), 20,000 items, ~30 past
interactions per user, 8 stage-1 columns (3 modalities) + the behaviour features.
Phases: feature building, prediction, both together, recommend --explain for a sample
of users (explanations for the k kept rows only), top-k + Parquet export.
For each phase: wall and CPU seconds, candidates per second of each, the RSS before it and the
peak RSS during it (sampled every 5 ms from /proc/self/statm; Polars and LightGBM
allocate outside Python's allocator, so tracemalloc would miss most of it).

    .venv/bin/python bench/scoring.py                 # full size, 1 thread
    .venv/bin/python bench/scoring.py --threads 2
    .venv/bin/python bench/scoring.py --users 1000    # quick look
Writes bench/results/scoring.json (or --out).
"""

from __future__ import annotations

import argparse
import os
import sys


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--candidates", type=int, default=100, help="candidates per user")
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--history", type=int, default=30, help="mean past interactions per user")
    ap.add_argument("--trees", type=int, default=300)
    ap.add_argument("--leaves", type=int, default=31)
    ap.add_argument("--explain-users", type=int, default=1_000, help="users for the --explain phase")
    ap.add_argument("--threads", type=int, default=1, help="Polars and LightGBM threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "scoring.json"))
    return ap.parse_args()


ARGS = _args() if __name__ == "__main__" else None
if ARGS is not None:
    # Polars reads its thread count once, at import.
    os.environ["POLARS_MAX_THREADS"] = str(ARGS.threads)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

import lightgbm as lgb  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from fusionrec.ranker.features import behaviour_features, feature_columns  # noqa: E402
from fusionrec.ranker.labels import make_labels  # noqa: E402
from fusionrec.ranker.model import Ranker  # noqa: E402
from fusionrec.ranker.serving.export import recommend, topk, write_topk  # noqa: E402

DAY = 86_400
PAGE = os.sysconf("SC_PAGE_SIZE")
MODALITIES = ("text", "image", "audio")


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE / 2**20


@contextmanager
def measure(results: list[dict], phase: str, rows: int):
    """Time a phase and sample its peak RSS from a background thread."""
    before, peak, stop = rss_mb(), [rss_mb()], threading.Event()

    def sample() -> None:
        while not stop.wait(0.005):
            peak[0] = max(peak[0], rss_mb())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        stop.set()
        thread.join()
        peak[0] = max(peak[0], rss_mb())
        results.append({"phase": phase, "rows": rows, "seconds": round(seconds, 3),
                        "rows_per_s": round(rows / seconds) if seconds > 0 else None,
                        "cpu_seconds": round(cpu, 3), "rows_per_cpu_s": round(rows / cpu) if cpu > 0 else None,
                        "rss_before_mb": round(before, 1), "rss_peak_mb": round(peak[0], 1),
                        "rss_delta_mb": round(peak[0] - before, 1)})


def synthetic(args: argparse.Namespace):
    """Interactions over 90 days before the cutoff + 14 label days, items, stage-1 candidates."""
    rng = np.random.default_rng(args.seed)
    items = np.array([f"i{j:06d}" for j in range(args.items)])
    users = np.array([f"u{i:06d}" for i in range(args.users)])
    pop = 1 / np.arange(1, args.items + 1) ** 0.8  # Zipf-like popularity
    pop /= pop.sum()
    cutoff = 90 * DAY
    n_hist = rng.poisson(args.history, args.users)
    n = int(n_hist.sum())
    log = pl.DataFrame({
        "user_id": np.repeat(users, n_hist),
        "item_id": items[rng.choice(args.items, n, p=pop)],
        "timestamp": rng.integers(0, cutoff + 14 * DAY, n),
        "event": rng.choice(["view", "click", "cart", "purchase"], n, p=[0.6, 0.25, 0.1, 0.05]),
        "value": pl.Series(np.where(rng.random(n) < 0.3, rng.integers(1, 6, n), np.nan)).fill_nan(None),
    })
    tag_pool = np.array([f"tag{t}" for t in range(60)])
    catalogue = pl.DataFrame({
        "item_id": items,
        "tags": ["|".join(rng.choice(tag_pool, rng.integers(1, 5), replace=False)) for _ in range(args.items)],
        "price": rng.lognormal(3, 1, args.items),
        "brand": [f"brand{b}" for b in rng.integers(0, 300, args.items)],
    })
    k = args.candidates
    cand_items = items[rng.choice(args.items, (args.users, k), p=pop)].ravel()
    rows = args.users * k
    score = np.sort(rng.random((args.users, k)).astype(np.float32), axis=1)[:, ::-1].ravel()
    cols = {"user_id": np.repeat(users, k), "item_id": cand_items,
            "retrieval_rank": np.tile(np.arange(1, k + 1, dtype=np.int32), args.users),
            "retrieval_score": score}
    attn = rng.dirichlet(np.ones(len(MODALITIES)), args.users).astype(np.float32)
    for m_i, m in enumerate(MODALITIES):
        sim = rng.random(rows).astype(np.float32)
        if m == "audio":  # a modality many items lack
            sim[rng.random(rows) < 0.4] = np.nan
        cols[f"sim_{m}"] = sim
        cols[f"attn_{m}"] = np.repeat(attn[:, m_i], k)
    cand = pl.DataFrame(cols).with_columns(pl.col("sim_audio").fill_nan(None))
    return log, catalogue, cand, cutoff


def main(args: argparse.Namespace) -> dict:
    results: list[dict] = []
    t0 = time.perf_counter()
    log, catalogue, cand, cutoff = synthetic(args)
    gen_s = time.perf_counter() - t0
    rows = cand.height
    print(f"synthetic: {args.users} users x {args.candidates} candidates = {rows:,} pairs, "
          f"{log.height:,} interactions, {args.items:,} items ({gen_s:.1f}s)", flush=True)

    # Train on a slice of users (training cost is not what this bench measures).
    train_users = cand["user_id"].unique().sort().head(max(args.users // 10, 50))
    train = cand.filter(pl.col("user_id").is_in(train_users.implode()))
    train = make_labels(behaviour_features(train, log, catalogue, cutoff), log, cutoff, cutoff + 14 * DAY)
    model = Ranker(n_estimators=args.trees, num_leaves=args.leaves, early_stopping_rounds=None,
                   min_child_samples=20, num_threads=args.threads).fit(train, train["label"], train["user_id"])
    trees = model.booster_.num_trees()
    del train

    with measure(results, "features", rows):
        feats = behaviour_features(cand, log, catalogue, cutoff)
    n_features = len(feature_columns(feats))
    with measure(results, "predict", rows):
        scores = model.predict(feats)
    with measure(results, "features+predict", rows):
        scored = model.score(behaviour_features(cand, log, catalogue, cutoff))
    assert np.array_equal(scored["score"].to_numpy(), scores)
    # --explain: scores a user's candidates, explains only the k kept rows (TreeSHAP is costly).
    sample_users = cand["user_id"].unique().sort().head(args.explain_users)
    sample = feats.filter(pl.col("user_id").is_in(sample_users.implode()))
    with measure(results, f"recommend k=10 --explain ({sample_users.len()} users)", sample.height):
        explained = recommend(model, sample, 10, explain=True, top=5)
    results[-1]["explained_rows"] = explained.height
    results[-1]["explained_rows_per_s"] = round(explained.height / results[-1]["seconds"])
    results[-1]["explained_rows_per_cpu_s"] = round(explained.height / results[-1]["cpu_seconds"])
    with tempfile.TemporaryDirectory() as tmp, measure(results, "topk+parquet", rows):
        write_topk(topk(scored, 10), Path(tmp) / "top.parquet")

    report = {
        "bench": "scoring", "users": args.users, "candidates_per_user": args.candidates, "pairs": rows,
        "items": args.items, "interactions": log.height, "features": n_features, "trees": trees,
        "num_leaves": args.leaves, "threads": args.threads, "phases": results,
        "process_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "cpu_count": os.cpu_count(), "python": platform.python_version(), "polars": pl.__version__,
        "lightgbm": lgb.__version__, "numpy": np.__version__, "machine": platform.machine(),
        "load_average": os.getloadavg(),
        "note": "machine shared with other jobs: wall times vary, CPU seconds are the steadier figure",
    }
    print(f"\n{n_features} features, {trees} trees x {args.leaves} leaves, threads={args.threads}")
    print(f"{'phase':<42}{'rows':>11}{'wall s':>8}{'rows/s':>11}{'CPU s':>8}{'rows/CPU s':>12}"
          f"{'RSS before MB':>15}{'peak MB':>9}")
    for r in results:
        print(f"{r['phase']:<42}{r['rows']:>11,}{r['seconds']:>8.2f}{r['rows_per_s']:>11,}{r['cpu_seconds']:>8.2f}"
              f"{r['rows_per_cpu_s']:>12,}"
              f"{r['rss_before_mb']:>15.0f}{r['rss_peak_mb']:>9.0f}")
    print(f"process peak RSS (ru_maxrss): {report['process_peak_rss_mb']:.0f} MB")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main(ARGS)
