"""The train stage (`fusionrec train`): labelled examples from later windows, a LightGBM ranker.

Time is cut into windows at the end of the log (`label_window_days` each, or, where the
log is too short for that, windows holding `label_fraction` of the interactions):

    ... features ... | T1: train labels | T2: validation labels | end

For each window a Retriever is fitted on the interactions before its start only, its
candidates for the users active in the window get behaviour features computed before
the start (`behaviour_features` filters by the cutoff itself), and labels from inside
the window. The ranker trains on the first window and stops early on the second. Where
the log has a single usable window (a fixed split such as Last.fm's 0/1/2), a seeded
fifth of the users is held out for early stopping instead.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from fusionrec.pipeline.config import Config
from fusionrec.pipeline.errors import FusionrecError
from fusionrec.pipeline.retrieval.stage import Catalog, embeddings, load_snapshot, retriever_from_config
from fusionrec.pipeline.io.manifest import stage_run

from fusionrec.ranker.features import behaviour_features
from fusionrec.ranker.labels import infer_rating_scale, make_labels
from fusionrec.evaluation.metrics import ranking_metrics
from fusionrec.ranker.model import Ranker

log = logging.getLogger("fusionrec.train")
DAY = 86_400


@dataclass(frozen=True)
class Window:
    cutoff: int  # features use interactions before this
    end: int  # labels come from [cutoff, end)


def label_windows(timestamps: pl.Series, days: float, fraction: float = 0.1) -> list[Window]:
    """Two windows (train, validation) at the end of the log; one if the log is too short."""
    end = int(timestamps.max()) + 1
    width = int(days * DAY)
    t2, t1 = end - width, end - 2 * width
    if days <= 0 or int((timestamps < t1).sum()) == 0:
        t2 = int(timestamps.quantile(1 - fraction, "higher"))
        t1 = int(timestamps.quantile(1 - 2 * fraction, "higher"))
    if t1 < t2 and int((timestamps < t1).sum()) > 0 and int(((timestamps >= t1) & (timestamps < t2)).sum()) > 0:
        return [Window(t1, t2), Window(t2, end)]
    if int((timestamps < t2).sum()) == 0:
        raise FusionrecError("the interactions span too little time to hold out a label window")
    return [Window(t2, end)]


def label_kind(objective: str) -> str:
    return {"lambdarank": "gain", "binary": "binary", "regression": "rating"}[objective]


def build_examples(catalog: Catalog, item_mods: dict, user_mods: dict, window: Window, config: Config,
                   users: list[str] | None = None) -> pl.DataFrame:
    """Candidates of a retriever fitted before `window.cutoff`, with features and labels."""
    inter = catalog.interactions
    past = inter.filter(pl.col("timestamp") < window.cutoff)
    future = inter.filter((pl.col("timestamp") >= window.cutoff) & (pl.col("timestamp") < window.end))
    retriever = retriever_from_config(config).fit(item_mods, past, user_mods)
    wanted = future["user_id"].unique().sort().to_list() if users is None else users
    # Users retrieval cannot place are served from the popular list, not ranked: not trained on.
    candidates = retriever.candidates(wanted, exclude_seen=True)
    features = behaviour_features(candidates, inter, catalog.items, window.cutoff)
    scale = infer_rating_scale(inter)
    labelled = make_labels(features, inter, window.cutoff, window.end, kind=label_kind(config.ranker.objective),
                           rating_scale=scale)
    if config.ranker.objective == "regression":
        return labelled.drop_nulls("label")
    # Users without any positive give LambdaRank nothing to learn and NDCG nothing to measure.
    return labelled.filter((pl.col("label") > 0).any().over("user_id"))


def split_users(frame: pl.DataFrame, share: float = 0.2, seed: int = 0) -> tuple[pl.DataFrame, pl.DataFrame]:
    """A seeded, order-free split of the users (for logs with a single window)."""
    users = frame["user_id"].unique().sort().to_list()
    held = {u for u in users if int(hashlib.sha256(f"{seed}:{u}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < share}
    mask = pl.col("user_id").is_in(list(held))
    return frame.filter(~mask), frame.filter(mask)


def ndcg_of(frame: pl.DataFrame, score: str, k: int = 10) -> float:
    """Mean NDCG@k over users when `frame` is ordered by `score` (graded labels)."""
    recs = frame.sort(["user_id", score, "item_id"], descending=[False, True, False]) \
        .with_columns((pl.int_range(pl.len()).over("user_id") + 1).alias("rank")) \
        .select("user_id", "item_id", "rank")
    truth = frame.filter(pl.col("label") > 0).select("user_id", "item_id")
    per_user = ranking_metrics(recs, truth, ks=(k,))
    return float(per_user[f"ndcg@{k}"].mean())


def fit_ranker(train: pl.DataFrame, valid: pl.DataFrame, config: Config) -> Ranker:
    rc = config.ranker
    ranker = Ranker(objective=rc.objective, n_estimators=rc.n_estimators, learning_rate=rc.learning_rate,
                    num_leaves=rc.num_leaves, min_child_samples=rc.min_child_samples,
                    early_stopping_rounds=rc.early_stopping_rounds, seed=rc.seed)
    eval_set = (valid, valid["label"].to_numpy(), valid["user_id"].to_numpy()) if valid.height else None
    return ranker.fit(train, train["label"].to_numpy(), train["user_id"].to_numpy(), eval_set=eval_set)


def run_train(art_dir: Path, config: Config | None = None, *, lock: bool = True) -> dict:
    config = config or Config()
    art_dir = Path(art_dir)
    with stage_run("train", art_dir, None, config.to_dict(), lock=lock) as record:
        catalog = load_snapshot(art_dir)
        item_mods, user_mods = embeddings(art_dir)
        windows = label_windows(catalog.interactions["timestamp"], config.ranker.label_window_days)
        t0 = time.perf_counter()
        if len(windows) == 2:
            train = build_examples(catalog, item_mods, user_mods, windows[0], config)
            valid = build_examples(catalog, item_mods, user_mods, windows[1], config)
        else:
            train, valid = split_users(build_examples(catalog, item_mods, user_mods, windows[0], config),
                                       seed=config.ranker.seed)
        record.timings["examples"] = time.perf_counter() - t0
        if train.height == 0 or train["user_id"].n_unique() < 2:
            raise FusionrecError("too few labelled candidates to train the ranker: the label window holds "
                                 "no interaction with a retrieved item (try a longer ranker.label_window_days)")
        t0 = time.perf_counter()
        ranker = fit_ranker(train, valid, config)
        record.timings["fit"] = time.perf_counter() - t0
        ranker.save(art_dir / "ranker")

        summary: dict = {"objective": config.ranker.objective, "windows": [w.__dict__ for w in windows],
                         "train_rows": train.height, "train_users": train["user_id"].n_unique(),
                         "valid_rows": valid.height, "valid_users": valid["user_id"].n_unique() if valid.height else 0,
                         "features": ranker.feature_names_, "best_iteration": ranker.best_iteration_,
                         "eval_metrics": ranker.eval_metrics_}
        if valid.height and config.ranker.objective != "regression":
            scored = valid.with_columns(pl.Series("ranker_score", ranker.predict(valid)),
                                        (-pl.col("retrieval_rank").cast(pl.Float64)).alias("retrieval_order"))
            summary["valid_ndcg@10"] = {"retrieval": round(ndcg_of(scored, "retrieval_order"), 4),
                                        "ranker": round(ndcg_of(scored, "ranker_score"), 4)}
        elif valid.height:
            pred = ranker.predict(valid)
            summary["valid_rmse"] = float(np.sqrt(np.mean((pred - valid["label"].to_numpy()) ** 2)))
        record.counts = {"train_rows": train.height, "valid_rows": valid.height}
        record.models = {"ranker": f"lightgbm:{config.ranker.objective}", "features": len(ranker.feature_names_)}
        record.extra = {"training": summary}
        record.finish("ok")
        log.info("ranker: %d train rows, best iteration %d, validation %s", train.height, ranker.best_iteration_,
                 summary.get("valid_ndcg@10") or summary.get("valid_rmse"))
        return summary
