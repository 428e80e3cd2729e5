"""Users without history: the ranker's order against their cold-start order, on validation only.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/cold_users.py [--fractions 0.2 0.1]

The ranker's labels are held out after a history (per user, or in a window among users who
had one), so it never learns from users without history, and the guard never checks it on
them. This study asks what its order would do for them, on genuinely new users.

Needs a `bench/peers.py --dataset movielens` run first: it reads that run's global-split
training part (`bench/results/work_movielens/train_global`, MovieLens' first 80% of ratings by
time) and item embeddings (`.../art_global/embeddings`), and never the test part.

For each fraction f: the training part's latest f of ratings by time (equal timestamps in the
seeded tie order) are held out, `fusionrec run` runs on the rest, and the users whose first
rating falls in the held-out part (new users, with a held-out rating >= 4) get two top-10
lists from the same artifacts: the ranker's order of their candidates, and their cold-start
order (segment popularity, or their own content), which is what the product serves them.
Users with history get the ranker's and the retrieval order too, for reference. NDCG@10 on
the held-out ratings >= 4, paired 95% bootstrap intervals over users.

Results: bench/results/cold_users.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import RESULTS, data_dir, frame_ndcg, interval, run_fusionrec  # noqa: E402

from fusionrec.evaluation.splits import global_temporal_split  # noqa: E402
from fusionrec.pipeline.config import Config  # noqa: E402
from fusionrec.pipeline.io.tables import load_interactions, load_items  # noqa: E402
from fusionrec.pipeline.retrieval.sources import positive_mask, relevance_threshold  # noqa: E402
from fusionrec.ranker.serving.recommender import Recommender  # noqa: E402

K = 10


def compare(name: str, first: pl.DataFrame, second: pl.DataFrame, truth: pl.DataFrame,
            users: list[str]) -> dict:
    a, b = frame_ndcg(first, truth, users, K), frame_ndcg(second, truth, users, K)
    diff, lo, hi = interval(a, b)
    print(f"  {name} ({len(users)} users): {a.mean():.4f} against {b.mean():.4f}, "
          f"difference {diff:+.4f} ({lo:+.4f}, {hi:+.4f})", flush=True)
    return {"users": len(users), "ndcg@10": [round(float(a.mean()), 4), round(float(b.mean()), 4)],
            "difference": round(diff, 4), "interval": [round(lo, 4), round(hi, 4)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=RESULTS / "work_movielens")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.2, 0.1])
    args = ap.parse_args()
    source = args.work / "train_global"
    if not (source / "interactions.csv").is_file():
        raise SystemExit(f"{source} is missing: run `bench/peers.py --dataset movielens` first")
    items = load_items(source)
    train = load_interactions(source, items).with_columns(pl.col("user_id").cast(pl.String),
                                                          pl.col("item_id").cast(pl.String))
    threshold = relevance_threshold(train, Config().sources.relevance)
    report: dict = {"source": str(source), "k": K, "fractions": {}}
    for fraction in args.fractions:
        fit, held = global_temporal_split(train, fraction, seed=0)
        work = args.work / f"cold_users_{fraction:g}"
        art = work / "art"
        if not (art / "exports" / "topk.parquet").is_file():
            run_fusionrec(data_dir(source, fit, work / "data"), art,
                          seed_embeddings=args.work / "art_global" / "embeddings")
        rec = Recommender(art)
        seen = fit.select("user_id", "item_id").unique()
        truth = held.filter(positive_mask(held, threshold)).select("user_id", "item_id").unique() \
            .join(seen, on=["user_id", "item_id"], how="anti")
        known = set(fit["user_id"].unique().to_list())
        new_users = sorted(set(truth["user_id"].to_list()) - known)
        old_users = sorted(set(truth["user_id"].to_list()) & known)
        print(f"hold-out {fraction:g}: {fit.height} ratings fitted, {held.height} held out; shipped order "
              f"{rec.order_}", flush=True)
        served = rec.recommend(new_users, K)  # the cold-start order, whichever order ships
        assert set(served["source"].unique().to_list()) <= {"content", "popular"}
        ranked = rec.ranker_top(rec.sources_.candidates(new_users), K, K) if rec.ranker_ is not None else served
        entry = {"shipped_order": rec.order_,
                 "new_users_ranker_minus_cold_start": compare("new users, ranker order minus cold-start order",
                                                              ranked, served, truth, new_users),
                 "known_users_ranker_minus_retrieval": compare(
                     "users with history, ranker order minus retrieval order",
                     rec.recommend(old_users, K), rec.recommend(old_users, K, use_ranker=False), truth, old_users)}
        report["fractions"][f"{fraction:g}"] = entry
    out = RESULTS / "cold_users.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
