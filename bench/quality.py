"""Retrieval quality by modality and fusion method, side by side.

For each data set the interactions are split in time, a Retriever is fitted on the
training part (its fusion weights are chosen on a temporal hold-out *inside* that part),
and its candidates for the users present in both parts are scored against the test items
each user had not seen in training: recall@100 (the stage-1 job: is the item among the
candidates?) and NDCG@10 (binary gains), plus recall@100 restricted to test items that
had no training interactions at all (cold items, reachable only by content).

- movielens-100k: global temporal split, the last --test-fraction of all ratings by time
  are the test set. Needs text and image embeddings: `--art DIR` with DIR/embeddings, or
  the project's embedding job (pipeline.embed.run_embed) is run into
  bench/results/art-movielens-100k when it is importable.
- lastfm-2k: the authors' fixed split carried in `timestamp` (0 train, 1 validation,
  2 test); fitted on 0+1 (the Retriever holds out 1), tested on 2; precomputed
  Whisper/VGGish audio and MiniLM tag-text embeddings.

Usage: .venv/bin/python bench/quality.py [--dataset all|movielens|lastfm] [--art DIR]
Writes bench/results/quality.json and prints one table per data set.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    DATASETS,
    RESULTS,
    environment,
    global_temporal_split,
    load_interactions,
    popularity_candidates,
    print_table,
    ranking_metrics,
    test_targets,
    write_json,
)
from fusionrec.pipeline.retrieval import faiss_index as fidx  # noqa: E402
from fusionrec.pipeline.retrieval.fusion import load_modalities  # noqa: E402
from fusionrec.pipeline.retrieval.retriever import Retriever  # noqa: E402


def movielens_embeddings(data_dir: Path, art: Path | None) -> tuple[dict, str]:
    """Item embeddings of MovieLens: from --art, else from the project's embedding job."""
    if art is not None:
        mods = load_modalities(Path(art) / "embeddings", "item")
        if not mods:
            raise SystemExit(f"no item embeddings in {art}/embeddings")
        return mods, f"--art {art}"
    out = RESULTS / "art-movielens-100k"
    mods = load_modalities(out / "embeddings", "item")
    if mods:
        return mods, f"cached {out}"
    try:
        from fusionrec.pipeline.embedding.job import run_embed
    except ImportError as exc:
        raise SystemExit(f"MovieLens needs text and image embeddings: pipeline.embed is not importable ({exc}); "
                         "run `fusionrec embed --data ../shared/datasets/movielens-100k/fusionrec --out DIR` "
                         "and pass --art DIR") from exc
    print(f"embedding MovieLens into {out} (pipeline.embed.run_embed) ...", flush=True)
    run_embed(data_dir, out, show_progress=False)
    return load_modalities(out / "embeddings", "item"), f"embedded into {out}"


def configurations(modalities: list[str]) -> list[tuple[str, dict, list[str] | None]]:
    """(row name, Retriever arguments, content modalities used; None = all)."""
    only = {"behaviour_dim": 0, "popularity": False}
    rows: list[tuple[str, dict, list[str] | None]] = [
        ("behaviour only", {"popularity": False}, [])]
    rows += [(f"{m} only", only, [m]) for m in modalities]
    if len(modalities) > 1:
        rows.append(("content only, weighted fusion", only, None))
    rows += [("weighted fusion without popularity", {"popularity": False}, None),
             ("concatenation (equal weights)", {"fusion": "concat"}, None),
             ("weighted fusion", {"fusion": "weighted"}, None),
             ("attention fusion", {"fusion": "attention"}, None),
             ("attention fusion, beta=2 fixed", {"fusion": "attention", "attention_beta": 2.0}, None)]
    return rows


def evaluate(name: str, mods: dict, train: pl.DataFrame, test: pl.DataFrame, args) -> list[dict]:
    targets = test_targets(train, test)
    users = targets["user_id"].unique().sort().to_list()
    cold = set(test["item_id"].unique().to_list()) - set(train["item_id"].unique().to_list())
    k = max(args.k_recall, args.k_ndcg)
    print(f"\n{name}: {train.height:,} training rows, {test.height:,} test rows, {len(users):,} users evaluated, "
          f"{len(cold):,} cold test items, modalities {sorted(mods)}", flush=True)
    rows = []
    m = ranking_metrics(popularity_candidates(train, users, k), targets, k_recall=args.k_recall,
                        k_ndcg=args.k_ndcg, cold_items=cold)
    rows.append({"method": "popularity (reference)", **m})
    for label, kwargs, use in configurations(sorted(mods)):
        t0 = time.perf_counter()
        item_mods = mods if use is None else {k_: mods[k_] for k_ in use}
        r = Retriever(n_candidates=k, seed=args.seed, n_threads=args.threads,
                      validation_fraction=args.validation_fraction, **kwargs).fit(item_mods, train)
        cands = r.candidates(users, k=k)
        m = ranking_metrics(cands, targets, k_recall=args.k_recall, k_ndcg=args.k_ndcg, cold_items=cold)
        row = {"method": label, **m, "fit_s": time.perf_counter() - t0,
               "weights": {a: round(b, 3) for a, b in r.weights_.items()},
               "validation_recall": r.validation_recall_}
        if r.fusion == "attention":
            s = r.summary_()
            row["attention_beta"] = r.attention_beta_
            row["validation_beta_recall"] = r.validation_.get("beta_recall")
            row["user_weights_mean"] = {a: round(b["mean"], 3) for a, b in s["user_modality_weights"].items()
                                        if b["mean"] is not None}
        rows.append(row)
        print(f"  {label:32s} recall@{args.k_recall} {m[f'recall@{args.k_recall}']:.4f}  "
              f"ndcg@{args.k_ndcg} {m[f'ndcg@{args.k_ndcg}']:.4f}  ({row['fit_s']:.0f}s)", flush=True)
    cols = ["method", f"recall@{args.k_recall}", f"ndcg@{args.k_ndcg}", f"cold_recall@{args.k_recall}",
            "validation_recall", "attention_beta", "weights"]
    print_table([{**r, "weights": " ".join(f"{a}={b}" for a, b in r.get("weights", {}).items()) or None}
                 for r in rows], cols, title=f"{name} (users: {rows[0]['users']})")
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", choices=["all", "movielens", "lastfm"], default="all")
    ap.add_argument("--art", type=Path, default=None, help="artifacts dir with MovieLens item embeddings")
    ap.add_argument("--test-fraction", type=float, default=0.2, help="MovieLens global temporal test share")
    ap.add_argument("--validation-fraction", type=float, default=0.1)
    ap.add_argument("--k-recall", type=int, default=100)
    ap.add_argument("--k-ndcg", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "quality.json")
    args = ap.parse_args(argv)
    fidx.set_threads(args.threads)
    result: dict = {"args": {a: (str(v) if isinstance(v, Path) else v) for a, v in vars(args).items()},
                    "environment": environment(), "datasets": {}}
    if args.dataset in ("all", "lastfm"):
        d = DATASETS / "lastfm-2k" / "fusionrec"
        if not d.is_dir():
            print(f"lastfm-2k absent at {d}: skipped")
        else:
            inter = load_interactions(d)
            mods = load_modalities(d / "embeddings", "item")
            rows = evaluate("lastfm-2k (fixed split: fit on 0+1, test on 2)", mods,
                            inter.filter(pl.col("timestamp") <= 1), inter.filter(pl.col("timestamp") == 2), args)
            result["datasets"]["lastfm-2k"] = {"split": "fixed 0/1/2", "rows": rows}
    if args.dataset in ("all", "movielens"):
        d = DATASETS / "movielens-100k" / "fusionrec"
        if not d.is_dir():
            print(f"movielens-100k absent at {d}: skipped")
        else:
            try:
                mods, source = movielens_embeddings(d, args.art)
            except SystemExit as exc:
                if args.dataset == "movielens":
                    raise
                print(f"\nmovielens-100k skipped: {exc}")
            else:
                inter = load_interactions(d)
                train, test = global_temporal_split(inter, args.test_fraction)
                rows = evaluate(f"movielens-100k (global temporal split, last {args.test_fraction:.0%} test)",
                                mods, train, test, args)
                result["datasets"]["movielens-100k"] = {"split": f"global temporal {args.test_fraction}",
                                                        "embeddings": source, "rows": rows}
    write_json(result, args.out)
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
