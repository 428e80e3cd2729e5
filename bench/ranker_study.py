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
from fusionrec.pipeline.retrieval.sources import positive_mask  # noqa: E402
from fusionrec.pipeline.retrieval.stage import candidate_split, embeddings, label_windows, load_snapshot  # noqa: E402
from fusionrec.ranker import training as T  # noqa: E402

LAMBDARANK = ["ranker.objective=lambdarank"]
SHIPPED = "shipped: binary objective, 300 rounds, learning rate 0.05"
COSINES = "shipped + per-modality profile-item cosines (sim_<modality>)"
# A lead: the shipped ranker's score and the blend's, each a z-score within the user's list, summed.
MIXED = "shipped, its score plus the blend's (z-scores within each list, equal weights)"
# A lead: the shipped setting fitted on the latest label window's rows only (the window whose
# protocol the served lists face); best read with --score-window 0.
LATEST = "shipped, fitted on the latest label window only"
# A lead: the shipped setting fitted with three seeds (feature_fraction 0.5 makes them differ),
# their scores averaged (bagging steadies a ranker whose seed spread is about +-0.003).
SEEDED = "binary, three seeds averaged"
# A lead: the guard already fits four rankers, each on three quarters of the users (its folds);
# their scores averaged (bagging over users, at no extra fit in the train stage), alone or with
# the ranker fitted on every user.
FOLD_BAG = "shipped, the guard's four fold rankers averaged"
FOLD_BAG_FULL = "shipped, the guard's four fold rankers and the full one averaged"
# A lead: raw counts grow with the log, so a ranker learned on label windows whose feature
# logs are smaller than the serving log (by the labels held out) meets larger counts when it
# serves. The item and pair counts as shares of each window's own log (interactions, users).
SHARES = "shipped, item and pair counts as shares of each window's log"
# A lead: the rows of both label windows, with a flag for the latest window as a feature, so
# the trees can set the earlier (on Last.fm a random hold-out) window's differences apart and
# serve with the flag on; best read with --score-window 0.
WINDOW_FLAG = "shipped + a latest-window flag as a feature (served on)"
# A check, not a lead: the features whose values depend on how equal timestamps are ordered
# (Last.fm's 0/1/2 split is all ties). Before `splits.tie_order` the sequence and recent
# sources ordered ties by item index, and Last.fm's item ids follow each artist's first listener.
NO_ORDER = "shipped without the sources that order equal timestamps (sequence, recent_*)"
NO_ORDER_COOC = "shipped without those sources and the recent-item co-occurrence (pair_cooc_*)"
ORDER_COLUMNS = ("src_sequence", "src_recent_ease", "src_recent_itemknn")
# Speed (issue 15, item 4), approximate fits: LightGBM's own sampling of rows or of histogram
# bins, on top of the shipped setting (parameters passed to every fit of the variant). And the
# other side of the bins: more of them, a quality lead.
LIGHTGBM: dict[str, dict[str, Any]] = {
    "fast fit: GOSS (rows sampled by gradient each round)": {"data_sample_strategy": "goss"},
    "fast fit: a quarter of the negatives each round (balanced bagging)": {
        "bagging_freq": 1, "pos_bagging_fraction": 1.0, "neg_bagging_fraction": 0.25},
    "fast fit: half the rows each round (bagging)": {"bagging_freq": 1, "bagging_fraction": 0.5},
    "fast fit: 63 histogram bins": {"max_bin": 63},
    "1023 histogram bins": {"max_bin": 1023},
}
# Speed (issue 15, item 4): a shallower `ranker.depth`, so each fit learns on fewer rows. The
# ranker fits on the rows at retrieval rank <= depth and reorders only them; the rows past it
# follow in the blend's order, as served (`DEPTHS`: the variant's name -> its depth).
DEPTHS = {f"shipped at ranker.depth {d} (the rows past it in the blend's order)": d for d in (50, 30)}
DEPTH_HALF = "shipped at ranker.depth 50 on half the negative rows (each weighted 2)"
DEPTHS[DEPTH_HALF] = 50
PER_INTERACTION = ("item_cnt_1d", "item_cnt_7d", "item_cnt_30d", "item_cnt_all", "item_rating_count")
PER_USER = ("item_users", "pair_cooc_sum", "pair_cooc_max")
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
    # A lead, not a feature of the product: the cosine of the user's profile (mean of the
    # centred unit vectors of their positives before the labels) and the item, per modality.
    COSINES: ["ranker.objective=binary"],
    # Speed (issue 15, item 4): the shipped setting fitted on a seeded share of the negatives,
    # each kept negative weighted 1 / share (`ranker.fit_ranker`).
    "shipped on half the negative rows": ["ranker.objective=binary", "ranker.negative_share=0.5"],
    "shipped on a quarter of the negative rows": ["ranker.objective=binary", "ranker.negative_share=0.25"],
    "shipped on an eighth of the negative rows": ["ranker.objective=binary", "ranker.negative_share=0.125"],
    MIXED: ["ranker.objective=binary"],
    LATEST: ["ranker.objective=binary"],
    # Less capacity helped LambdaRank on both sets; these try it with the binary objective.
    "binary, learning rate 0.025": ["ranker.objective=binary", "ranker.learning_rate=0.025"],
    "binary, 7 leaves": ["ranker.objective=binary", "ranker.num_leaves=7"],
    # Speed (issue 15, item 4): the same learning in fewer rounds (a round is most of a fit).
    "binary, learning rate 0.1, 150 rounds": ["ranker.objective=binary", "ranker.learning_rate=0.1",
                                              "ranker.n_estimators=150"],
    "binary, learning rate 0.15, 100 rounds": ["ranker.objective=binary", "ranker.learning_rate=0.15",
                                               "ranker.n_estimators=100"],
    SEEDED: ["ranker.objective=binary"],
    FOLD_BAG: ["ranker.objective=binary"],
    FOLD_BAG_FULL: ["ranker.objective=binary"],
    SHARES: ["ranker.objective=binary"],
    WINDOW_FLAG: ["ranker.objective=binary"],
    NO_ORDER: ["ranker.objective=binary"],
    NO_ORDER_COOC: ["ranker.objective=binary"],
    **{name: ["ranker.objective=binary"] for name in LIGHTGBM},
    **{name: ["ranker.objective=binary", f"ranker.depth={depth}"] for name, depth in DEPTHS.items()},
    DEPTH_HALF: ["ranker.objective=binary", "ranker.depth=50", "ranker.negative_share=0.5"],
}


def fit_with(rows: pl.DataFrame, config: Any, params: dict[str, Any]) -> Any:
    """The shipped fit (every row, `n_estimators` rounds) with extra LightGBM parameters."""
    model = T.new_ranker(config, rows.height, early_stopping=False)
    model.params = dict(params)
    return model.fit(rows, T.targets(rows, config), T.query_ids(rows))


def query_z(rows: pl.DataFrame, score: np.ndarray) -> np.ndarray:
    """`score` as z-scores within each (user, label window) list of `rows` (0 where a list is flat)."""
    keys = ["user_id", "label_window"]
    x = pl.col("x")
    return rows.select(keys).with_columns(pl.Series("x", score, dtype=pl.Float64)).select(
        ((x - x.mean().over(keys)) / x.std(ddof=0).over(keys)).fill_nan(0.0).fill_null(0.0)).to_series().to_numpy()


def count_shares(rows: pl.DataFrame, split: Any, threshold: float | None, config: Any) -> pl.DataFrame:
    """`rows` with the item and pair counts divided by their window's feature log's size."""
    parts = label_windows(split, config, threshold)
    interactions = {w: float(part.fit.height) for w, part in enumerate(parts)}
    users = {w: float(part.fit["user_id"].n_unique()) for w, part in enumerate(parts)}
    window = pl.col("label_window").cast(pl.Int64)
    per_interaction = window.replace_strict(interactions, return_dtype=pl.Float64)
    per_user = window.replace_strict(users, return_dtype=pl.Float64)
    return rows.with_columns(
        *[(pl.col(c) / per_interaction).cast(pl.Float32) for c in PER_INTERACTION if c in rows.columns],
        *[(pl.col(c) / per_user).cast(pl.Float32) for c in PER_USER if c in rows.columns])


def modality_cosines(art: Path, rows: pl.DataFrame, split: Any, threshold: float | None, config: Any
                     ) -> pl.DataFrame:
    """(user_id, item_id, label_window, sim_<modality>...): each window's profiles from its own
    feature part (positives only), so no label reaches them."""
    item_mods, _ = embeddings(art)
    frames = []
    for window, part in enumerate(label_windows(split, config, threshold)):
        fit = part.fit.filter(positive_mask(part.fit, threshold)).select(
            pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String))
        out = rows.filter(pl.col("label_window") == window).select("user_id", "item_id", "label_window")
        for name, (ids, matrix) in item_mods.items():
            v = matrix.astype(np.float64)
            v = v - v.mean(axis=0)
            v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
            item_index = {str(i): j for j, i in enumerate(ids)}
            known = fit.with_columns(pl.col("item_id").replace_strict(item_index, default=-1, return_dtype=pl.Int64)
                                     .alias("j")).filter(pl.col("j") >= 0)
            profile_users = sorted(known["user_id"].unique().to_list())
            user_index = {u: k for k, u in enumerate(profile_users)}
            profile = np.zeros((len(profile_users), v.shape[1]))
            np.add.at(profile, known["user_id"].replace_strict(user_index, return_dtype=pl.Int64).to_numpy(),
                      v[known["j"].to_numpy()])
            profile /= np.maximum(np.linalg.norm(profile, axis=1, keepdims=True), 1e-12)
            u = out["user_id"].cast(pl.String).replace_strict(user_index, default=-1, return_dtype=pl.Int64).to_numpy()
            i = out["item_id"].cast(pl.String).replace_strict(item_index, default=-1, return_dtype=pl.Int64).to_numpy()
            cos = np.einsum("ij,ij->i", profile[np.maximum(u, 0)], v[np.maximum(i, 0)])
            out = out.with_columns(pl.Series(f"sim_{name}", np.where((u >= 0) & (i >= 0), cos, np.nan)
                                             .astype(np.float32)))
        frames.append(out)
    return pl.concat(frames)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", choices=sorted(SETS), required=True)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--only", default="", help="run only the settings whose name holds this text (and the shipped one)")
    ap.add_argument("--score-window", type=int, default=None,
                    help="score only this label window's rows (0: the latest); default every window")
    ap.add_argument("--work", type=Path, default=None, help="working folder (default bench/results/work_<dataset>)")
    ap.add_argument("--fit-window", type=int, default=None,
                    help="fit on this label window's rows only (1 with --score-window 0: the guard's forward check)")
    args = ap.parse_args()
    variants = {name: v for name, v in VARIANTS.items() if name == SHIPPED or args.only in name}
    art = (args.work or RESULTS / f"work_{args.dataset}") / "art"
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
    # The cosine lead's rows: the same rows in the same order plus its columns (so `blend` lines
    # up); built only when that lead runs (it loads every modality's embeddings).
    frames = {SHIPPED: rows}
    if COSINES in variants:
        frames[COSINES] = rows.join(modality_cosines(art, rows, split, threshold, base),
                                    on=["user_id", "item_id", "label_window"], how="left", maintain_order="left")
    if WINDOW_FLAG in variants:
        frames[WINDOW_FLAG] = rows.with_columns((pl.col("label_window") == 0).cast(pl.Int8).alias("pair_latest_window"))
    for name, extra in ((NO_ORDER, ()), (NO_ORDER_COOC, ("pair_cooc_sum", "pair_cooc_max"))):
        if name in variants:
            frames[name] = rows.drop([c for c in rows.columns if c.startswith(ORDER_COLUMNS) or c in extra])
    if SHARES in variants:
        frames[SHARES] = count_shares(rows, split, threshold, base)
    if args.score_window is not None and args.score_window not in rows["label_window"].unique().to_list():
        raise SystemExit(f"--score-window {args.score_window}: the rows hold label windows "
                         f"{sorted(rows['label_window'].unique().to_list())}")
    users = np.array(sorted(rows["user_id"].unique().to_list()), dtype=object)
    print(f"{args.dataset}: {rows.height} labelled candidate rows, {len(users)} users, "
          f"{rows['label_window'].n_unique()} label windows", flush=True)
    configs = {name: load_config(None, overrides) for name, overrides in variants.items()}
    columns = T.source_columns(rows)
    sums = {name: np.zeros(len(users)) for name in variants}
    blend_sum, times = np.zeros(len(users)), np.zeros(len(users))
    index = {u: j for j, u in enumerate(users)}
    rng = np.random.default_rng(1)
    rounds: dict[str, list[int]] = {name: [] for name in variants}
    seconds: dict[str, list[float]] = {name: [] for name in variants}  # each fit's, side by side in one run
    for _ in range(args.repeats):
        perm = rng.permutation(len(users))
        halves = (users[np.sort(perm[: len(users) // 2])], users[np.sort(perm[len(users) // 2:])])
        for fit_users, score_users in (halves, halves[::-1]):
            scored_window = pl.lit(True) if args.score_window is None else pl.col("label_window") == args.score_window
            parts = {key: (data.filter(pl.col("user_id").is_in(list(fit_users))),
                           data.filter(pl.col("user_id").is_in(list(score_users)) & scored_window))
                     for key, data in frames.items()}
            fit_rows, score_rows = parts[SHIPPED]
            if args.fit_window is not None:
                fit_rows = fit_rows.filter(pl.col("label_window") == args.fit_window)
            weights = T.blend_weights(fit_rows, columns) if columns else {}
            blend = T._blend_scores(score_rows, weights)
            bagged = None
            for name, config in configs.items():
                started = time.perf_counter()
                fit_part, score_part = parts[name if name in frames else SHIPPED]
                if args.fit_window is not None:  # e.g. learned on the earlier window, scored on the latest
                    fit_part = fit_part.filter(pl.col("label_window") == args.fit_window)
                if name == LATEST:
                    fit_part = fit_part.filter(pl.col("label_window") == 0)
                if name in DEPTHS:  # a user without a positive in the first rows teaches nothing there
                    fit_part = fit_part.filter(pl.col("retrieval_rank") <= DEPTHS[name])
                    fit_part = fit_part.filter((pl.col("label") > 0).any().over(["label_window", "user_id"]))
                model = fit_with(fit_part, config, LIGHTGBM[name]) if name in LIGHTGBM else T._fit(fit_part, config)
                seconds[name].append(time.perf_counter() - started)
                rounds[name].append(int(model.best_iteration_))
                predicted = model.predict(score_part)
                if name in DEPTHS:  # probabilities in [0, 1] first; the rest below 0, in the blend's order
                    past = score_part["retrieval_rank"].to_numpy() > DEPTHS[name]
                    predicted = np.where(past, blend - blend.max() - 1.0, predicted)
                if name == SEEDED:
                    for seed in (1, 2):
                        other = load_config(None, [*variants[name], f"ranker.seed={seed}"])
                        predicted = predicted + T._fit(fit_part, other).predict(score_part)
                if name in (FOLD_BAG, FOLD_BAG_FULL):
                    if bagged is None:  # the same four fold rankers serve both variants
                        fold = T.user_fold(fit_part["user_id"], config.ranker.seed, folds=T.GUARD_FOLDS)
                        bagged = sum(T._fit(fit_part.filter(pl.Series(fold != f)), config).predict(score_part)
                                     for f in range(T.GUARD_FOLDS))
                    predicted = bagged + (predicted if name == FOLD_BAG_FULL else 0.0)
                if name == MIXED:
                    predicted = query_z(score_part, predicted) + query_z(score_part, blend)
                got = T.per_user_ndcg(score_part, predicted, blend)
                j = np.array([index[u] for u in got["user_id"].to_list()])
                sums[name][j] += got["ranker"].to_numpy()
                if name == SHIPPED:
                    blend_sum[j] += got["retrieval"].to_numpy()
                    times[j] += 1
                print(f"  {name}: {model.best_iteration_} rounds, {time.perf_counter() - started:.0f} s", flush=True)
    scored = times > 0
    blend_mean = blend_sum[scored] / times[scored]
    out: dict[str, Any] = {"dataset": args.dataset, "users": int(scored.sum()), "repeats": args.repeats,
                           "only": args.only, "score_window": args.score_window,
                           "retrieval_ndcg@10": float(blend_mean.mean()), "variants": {}}
    print(f"\n{args.dataset}: {int(scored.sum())} validation users, {args.repeats} x 2 user halves; "
          f"retrieval (blend) order NDCG@10 {blend_mean.mean():.4f}")
    print("| ranker setting | NDCG@10 | rounds | fit (median s) | minus retrieval order (95% CI) | minus shipped setting (95% CI) |")
    print("|---|---:|---|---:|---|---|")
    shipped = sums[SHIPPED][scored] / times[scored]
    for name in variants:
        mean = sums[name][scored] / times[scored]
        d, lo, hi = T.paired_interval(mean, blend_mean)
        s, slo, shi = T.paired_interval(mean, shipped)
        out["variants"][name] = {"ndcg@10": float(mean.mean()), "rounds": rounds[name], "minus_retrieval": [d, lo, hi],
                                 "minus_shipped": [s, slo, shi], "overrides": variants[name],
                                 "lightgbm": LIGHTGBM.get(name, {}), "fit_seconds": seconds[name]}
        print(f"| {name} | {mean.mean():.4f} | {min(rounds[name])}-{max(rounds[name])} "
              f"| {np.median(seconds[name]):.1f} | {d:+.4f} ({lo:+.4f}, {hi:+.4f}) "
              f"| {s:+.4f} ({slo:+.4f}, {shi:+.4f}) |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "" if len(variants) == len(VARIANTS) else "_only_" + "".join(ch if ch.isalnum() else "_" for ch in args.only)
    suffix += "" if args.score_window is None else f"_window{args.score_window}"
    suffix += "" if args.fit_window is None else f"_fit{args.fit_window}"
    suffix += "" if args.work is None else f"_{args.work.name}"
    (RESULTS / f"ranker_study_{args.dataset}{suffix}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
