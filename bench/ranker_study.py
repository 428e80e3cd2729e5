"""Ranker settings judged on validation only: each setting's ranker fitted on one half of the
validation users and scored on the other half, against the retrieval (blend) order chosen on
the same half.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/ranker_study.py --dataset movielens [--repeats 2]

Needs a `bench/peers.py` run of the same data set first (its artifacts folder
`bench/results/work_<dataset>/art`, index and train stages done); it reads the labelled
candidate rows the train stage learns from (`ART/sources/validation.parquet`, every label
window, features from before each window's labels) and never the test part.

For each of `--repeats` random halvings of the labelled users, and each half in turn: every
setting in `VARIANTS` fits a ranker on one half's rows (all label windows); the blend's
weights are chosen on the same half; both orders are scored (NDCG@10 within the candidates,
the mean over a user's label windows) on the other half. Each user's figure is the mean over
the times they were scored. Reported: each setting's ranker minus the blend, and minus the
shipped setting, with 95% paired bootstrap intervals over users.

Results: bench/results/ranker_study_<dataset>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import RESULTS, SETS  # noqa: E402

from fusionrec.pipeline.config import load_config  # noqa: E402
from fusionrec.pipeline.retrieval.stage import candidate_split, load_snapshot  # noqa: E402
from fusionrec.ranker import training as T  # noqa: E402

LAMBDARANK = ["ranker.objective=lambdarank"]
SHIPPED = "shipped: binary objective, 300 rounds, learning rate 0.05"
# The study that chose the binary objective (commit message and docs/quality.md): the previous
# default (lambdarank, 300 rounds, learning rate 0.05) and six other settings of it.
VARIANTS: dict[str, list[str]] = {
    SHIPPED: ["ranker.objective=binary"],
    "previous: lambdarank, 300 rounds, learning rate 0.05": LAMBDARANK,
    "lambdarank, 1000 rounds, early stopping 50": [*LAMBDARANK, "ranker.n_estimators=1000",
                                                   "ranker.early_stopping_rounds=50"],
    "lambdarank, learning rate 0.1, 300 rounds": [*LAMBDARANK, "ranker.learning_rate=0.1"],
    "lambdarank, learning rate 0.1, 1000 rounds, early stopping 50": [
        *LAMBDARANK, "ranker.learning_rate=0.1", "ranker.n_estimators=1000", "ranker.early_stopping_rounds=50"],
    "lambdarank, 31 leaves, 100 per leaf, 1000 rounds, early stopping 50": [
        *LAMBDARANK, "ranker.num_leaves=31", "ranker.min_child_samples=100", "ranker.n_estimators=1000",
        "ranker.early_stopping_rounds=50"],
    "lambdarank, learning rate 0.025, 300 rounds": [*LAMBDARANK, "ranker.learning_rate=0.025"],
    "lambdarank, 7 leaves, 300 rounds": [*LAMBDARANK, "ranker.num_leaves=7"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", choices=sorted(SETS), required=True)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    art = RESULTS / f"work_{args.dataset}" / "art"
    if not (art / "sources" / "validation.parquet").is_file():
        raise SystemExit(f"no {art}/sources/validation.parquet: run bench/peers.py --dataset {args.dataset} first")
    base = load_config(None)
    catalog = load_snapshot(art)
    split, threshold = candidate_split(catalog.interactions, base)
    if split is None:
        raise SystemExit("the log is too short for a label split")
    rows = T.training_rows(catalog, pl.read_parquet(art / "sources" / "validation.parquet"), split, threshold, base)
    if "label_window" not in rows.columns:
        rows = rows.with_columns(pl.lit(0, pl.Int8).alias("label_window"))
    users = np.array(sorted(rows["user_id"].unique().to_list()), dtype=object)
    print(f"{args.dataset}: {rows.height} labelled candidate rows, {len(users)} users, "
          f"{rows['label_window'].n_unique()} label windows", flush=True)
    configs = {name: load_config(None, overrides) for name, overrides in VARIANTS.items()}
    columns = T.source_columns(rows)
    sums = {name: np.zeros(len(users)) for name in VARIANTS}
    blend_sum, times = np.zeros(len(users)), np.zeros(len(users))
    index = {u: j for j, u in enumerate(users)}
    rng = np.random.default_rng(1)
    rounds: dict[str, list[int]] = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        perm = rng.permutation(len(users))
        halves = (users[np.sort(perm[: len(users) // 2])], users[np.sort(perm[len(users) // 2:])])
        for fit_users, score_users in (halves, halves[::-1]):
            fit_rows = rows.filter(pl.col("user_id").is_in(list(fit_users)))
            score_rows = rows.filter(pl.col("user_id").is_in(list(score_users)))
            weights = T.blend_weights(fit_rows, columns) if columns else {}
            blend = T._blend_scores(score_rows, weights)
            for name, config in configs.items():
                started = time.perf_counter()
                model = T._fit(fit_rows, config)
                rounds[name].append(int(model.best_iteration_))
                got = T.per_user_ndcg(score_rows, model.predict(score_rows), blend)
                j = np.array([index[u] for u in got["user_id"].to_list()])
                sums[name][j] += got["ranker"].to_numpy()
                if name == SHIPPED:
                    blend_sum[j] += got["retrieval"].to_numpy()
                    times[j] += 1
                print(f"  {name}: {model.best_iteration_} rounds, {time.perf_counter() - started:.0f} s", flush=True)
    scored = times > 0
    blend_mean = blend_sum[scored] / times[scored]
    out: dict[str, Any] = {"dataset": args.dataset, "users": int(scored.sum()), "repeats": args.repeats,
                           "retrieval_ndcg@10": float(blend_mean.mean()), "variants": {}}
    print(f"\n{args.dataset}: {int(scored.sum())} validation users, {args.repeats} x 2 user halves; "
          f"retrieval (blend) order NDCG@10 {blend_mean.mean():.4f}")
    print("| ranker setting | NDCG@10 | rounds | minus retrieval order (95% CI) | minus shipped setting (95% CI) |")
    print("|---|---:|---|---|---|")
    shipped = sums[SHIPPED][scored] / times[scored]
    for name in VARIANTS:
        mean = sums[name][scored] / times[scored]
        d, lo, hi = T.paired_interval(mean, blend_mean)
        s, slo, shi = T.paired_interval(mean, shipped)
        out["variants"][name] = {"ndcg@10": float(mean.mean()), "rounds": rounds[name], "minus_retrieval": [d, lo, hi],
                                 "minus_shipped": [s, slo, shi], "overrides": VARIANTS[name]}
        print(f"| {name} | {mean.mean():.4f} | {min(rounds[name])}-{max(rounds[name])} | {d:+.4f} ({lo:+.4f}, {hi:+.4f}) "
              f"| {s:+.4f} ({slo:+.4f}, {shi:+.4f}) |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"ranker_study_{args.dataset}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
