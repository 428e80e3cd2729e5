"""The train stage (`fusionrec train`): a LightGBM ranker that ships only if it earns its place.

The index stage held labels out of the log (`ranker.labels`: each user's latest
`label_fraction` of interactions, or the log's last `label_window_days`, `auto` taking the
protocol with more labelled users), fitted every candidate source on the rest, and saved
the labelled users' candidates (`ART/sources/validation.parquet`). Here:

1. Features: the sources' scores, z-scores and ranks, behaviour statistics and user
   attributes, all computed from the interactions before the labels (the label rows are
   removed from the log the features see, so no feature can see a label).
2. Labels: graded gain of the held-out positive interactions (low ratings count 0).
3. The guard: four-fold cross-fitting over users gives every labelled user an order from
   a ranker that never saw them, and a forward check trains on the earlier label window
   and scores the latest; the ranker's order ships only if its NDCG@10 beats the
   retrieval (blend) order in both, each with a paired bootstrap interval above 0.
   Otherwise the retrieval order is exported, and the summary, the manifest and a
   warning say why.
4. The shipped model is refitted on every labelled user with the folds' mean best
   iteration (with a fixed number of rounds, the default, beside the guard's fits: the
   fits run side by side, one per core).

A log too short for any label split trains nothing: the night exports the retrieval order.
So does a log with a single label window, since the forward check needs an earlier one. A
fixed split carried in `timestamp` (Last.fm's 0/1/2) gets its earlier window from a random
share of each user's feature part (`label_windows`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import polars as pl

from fusionrec.evaluation.metrics import paired_interval
from fusionrec.pipeline.config import Config
from fusionrec.pipeline.io.manifest import stage_run
from fusionrec.pipeline.io.storage import sha256_file, write_json
from fusionrec.pipeline.retrieval.candidates import BLEND_STEPS, LabelSplit, coordinate_ascent
from fusionrec.pipeline.retrieval.sources import positive_mask
from fusionrec.pipeline.retrieval.stage import Catalog, candidate_split, label_windows, load_snapshot, require_snapshot
from fusionrec.pipeline.threads import cores, thread_map
from fusionrec.ranker.features import behaviour_features, user_attribute_features
from fusionrec.ranker.labels import DEFAULT_EVENT_GAIN, infer_rating_scale
from fusionrec.ranker.model import Ranker, remove_saved

log = logging.getLogger("fusionrec.train")
DAY = 86_400
GUARD_FILE = "guard.json"
GUARD_FOLDS = 4  # each fold's ranker learns from three quarters of the users
MIN_FORWARD_USERS = 20  # fewer labelled users in the earlier window make the forward check meaningless
R = TypeVar("R")
SIDE_BY_SIDE_MAX_BYTES = 1 << 30  # a fit's float64 feature matrix above which the fits run one at a time
SINGLE_WINDOW = ("the log holds one label window only, so a ranker could not be checked on labels later than "
                 "those it learned from")


def pair_features(pairs: pl.DataFrame, catalog: Catalog, history: pl.DataFrame) -> pl.DataFrame:
    """Candidate rows plus behaviour and user-attribute features from `history` (the past only).

    Raw source scores are dropped: their scale differs between users and between label
    windows; per-user z-scores and ranks carry them.
    """
    cutoff = int(cast(int, history["timestamp"].max())) + 1 if history.height else 0
    raw = [c for c in pairs.columns if c.startswith("src_") and not c.endswith(("_z", "_rank"))
           and c not in ("src_z_mean", "src_z_max", "src_top10_count")]
    feats = behaviour_features(pairs.drop(raw), history, catalog.items, cutoff)
    return user_attribute_features(feats, catalog.users)


def gain_labels(pairs: pl.DataFrame, held: pl.DataFrame, threshold: float | None) -> pl.DataFrame:
    """`pairs` plus `label`: 0 without a positive held-out interaction; else the rating's level
    above the relevance threshold (1, 2, ...) or the event's gain."""
    pos = held.filter(positive_mask(held, threshold))
    if threshold is not None and "value" in pos.columns:
        gain = (pl.col("value").cast(pl.Float64).round() - round(threshold) + 1).clip(lower_bound=1)
    elif "event" in pos.columns:
        gain = pl.col("event").cast(pl.String).replace_strict(DEFAULT_EVENT_GAIN, default=1, return_dtype=pl.Float64)
    else:
        gain = pl.lit(1.0)
    per_pair = pos.select(pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String),
                          gain.fill_null(1.0).alias("label")).group_by("user_id", "item_id").agg(pl.col("label").max())
    out = pairs.join(per_pair, on=["user_id", "item_id"], how="left", maintain_order="left")
    return out.with_columns(pl.col("label").fill_null(0).cast(pl.Int32))


def user_fold(user_ids: pl.Series, seed: int, folds: int = 2) -> np.ndarray:
    """A seeded, order-free fold number per user id (one hash per distinct user, not per row)."""
    distinct, row_of = np.unique(np.asarray(user_ids.cast(pl.String).to_list(), dtype=object).astype(str),
                                 return_inverse=True)
    fold = np.array([int(hashlib.sha256(f"{seed}:{u}".encode()).hexdigest()[:8], 16) % folds for u in distinct],
                    dtype=np.int64)
    return fold[row_of]


def new_ranker(config: Config, rows: int, n_estimators: int | None = None, early_stopping: bool = True,
               row_share: float = 1.0, threads: int = 0) -> Ranker:
    """`rows`: the labelled rows before any negative sampling; `row_share`: the share of them
    fitted; `threads`: LightGBM's threads (0: one per core)."""
    rc = config.ranker
    # Leaves of at least min_child_samples rows, fewer on small logs (a tree still needs room to split),
    # scaled by the share of rows fitted so a leaf holds the same share of the data.
    min_leaf = max(5, int(row_share * min(rc.min_child_samples, rows // (4 * rc.num_leaves))))
    return Ranker(objective=rc.objective, n_estimators=n_estimators or rc.n_estimators,
                  learning_rate=rc.learning_rate, num_leaves=rc.num_leaves, min_child_samples=min_leaf,
                  early_stopping_rounds=rc.early_stopping_rounds if early_stopping else None, seed=rc.seed,
                  feature_fraction=rc.feature_fraction, lambda_l2=rc.lambda_l2, num_threads=threads or cores())


def fitting_rows(rows: pl.DataFrame, config: Config) -> pl.DataFrame:
    """The rows a ranker fits on: every positive row, and a seeded share
    (`ranker.negative_share`) of the negatives, drawn by a hash of (user, item, label window)
    so the draw does not depend on row order. Fewer rows, a quicker fit; scoring is unchanged."""
    share = config.ranker.negative_share
    if share >= 1.0:
        return rows
    keys = [c for c in ("user_id", "item_id", "label_window") if c in rows.columns]
    draw = pl.struct(keys).hash(seed=config.ranker.seed).cast(pl.Float64) / 2.0 ** 64
    return rows.filter((pl.col("label") > 0) | (draw < share))


def fit_ranker(rows: pl.DataFrame, config: Config, n_estimators: int | None = None, *,
               early_stopping: bool = False, eval_set: tuple | None = None, threads: int = 0) -> Ranker:
    """A ranker fitted on `fitting_rows(rows)`. Each kept negative weighs 1 / share, so for the
    binary objective (the default) the loss is the whole rows' loss in expectation, and leaves
    need the same share of the data (min_child_samples counts the rows kept). For lambdarank
    the weight only scales each kept row's pairwise gradient: fewer pairs, not the same loss."""
    kept = fitting_rows(rows, config)
    share = config.ranker.negative_share
    weight = None if share >= 1.0 else np.where(kept["label"].to_numpy() > 0, 1.0, 1.0 / share)
    model = new_ranker(config, rows.height, n_estimators=n_estimators, early_stopping=early_stopping,
                       row_share=kept.height / max(rows.height, 1), threads=threads)
    return model.fit(kept, targets(kept, config), query_ids(kept), eval_set=eval_set, sample_weight=weight)


def _fit(rows: pl.DataFrame, config: Config, threads: int = 0) -> Ranker:
    """Fit `n_estimators` rounds, or with early stopping on a seeded fifth of the users when
    `ranker.early_stopping_rounds` > 0 (early stopping scores every row of those users)."""
    if not config.ranker.early_stopping_rounds:
        return fit_ranker(rows, config, threads=threads)
    stop = user_fold(rows["user_id"], config.ranker.seed + 1, folds=5) == 0
    train, valid = rows.filter(pl.Series(~stop)), rows.filter(pl.Series(stop))
    eval_set = (valid, targets(valid, config), query_ids(valid)) if valid.height else None
    return fit_ranker(train, config, early_stopping=True, eval_set=eval_set, threads=threads)


def fits_side_by_side(jobs: list[Callable[[int], R]], matrix_bytes: int = 0) -> list[R]:
    """Run independent ranker fits side by side, one per core, each job given its LightGBM
    thread count; results in input order.

    LightGBM's second thread on a fit adds about 60% (Last.fm's rows: 12.4 s on one thread,
    7.8 s on two), two one-thread fits side by side about 100%. The fits are deterministic
    (`deterministic`, column-wise histograms), so a fit on one thread gives the same model as
    on two (tested): side by side changes the time, not the results. Each fit holds its own
    feature matrix, so where one (`matrix_bytes`) passes `SIDE_BY_SIDE_MAX_BYTES` the fits run
    one after another on every core, in the memory they took before.
    """
    lanes = 1 if matrix_bytes > SIDE_BY_SIDE_MAX_BYTES else max(1, min(len(jobs), cores()))
    threads = max(1, cores() // lanes)
    return thread_map(lambda job: job(threads), jobs, lanes)


def query_ids(rows: pl.DataFrame) -> np.ndarray:
    """One ranking query per user and label window: a user's windows are separate lists
    (their features come from different histories), never one merged list."""
    if "label_window" not in rows.columns:
        return rows["user_id"].cast(pl.String).to_numpy()
    return rows.select(pl.format("{}|{}", "user_id", "label_window")).to_series().to_numpy()


def query_codes(rows: pl.DataFrame) -> np.ndarray:
    """The queries of `query_ids` as dense integer codes (for `ndcg_rows`), numbered in
    (user_id, label_window) order, so per-query results line up with rows sorted that way."""
    keys = ["user_id", "label_window"] if "label_window" in rows.columns else ["user_id"]
    return rows.select(pl.struct(keys).rank("dense")).to_series().cast(pl.Int64).to_numpy()


def targets(rows: pl.DataFrame, config: Config) -> np.ndarray:
    """Graded gains for lambdarank, 0/1 for binary."""
    label = rows["label"]
    return (label > 0).cast(pl.Int32).to_numpy() if config.ranker.objective == "binary" else label.to_numpy()


def source_columns(rows: pl.DataFrame) -> list[str]:
    """The per-source z-score columns the blend is made of."""
    return [c for c in rows.columns if c.startswith("src_") and c.endswith("_z") and c != "src_z_mean"]


def ndcg_rows(user: np.ndarray, score: np.ndarray, label: np.ndarray, k: int = 10) -> np.ndarray:
    """Per-user NDCG@k (binary: label > 0) of candidate rows ordered by `score` within each user;
    `user` holds integer codes. Ties keep row order (rows come in retrieval order)."""
    order = np.lexsort((np.arange(len(score)), -score, user))
    u, rel = user[order], (label[order] > 0).astype(np.float64)
    starts = np.r_[0, np.flatnonzero(np.diff(u)) + 1]
    sizes = np.diff(np.r_[starts, len(u)])
    rank = np.arange(len(u)) - np.repeat(starts, sizes)
    gain = np.where(rank < k, rel / np.log2(rank + 2.0), 0.0)
    return _normalised(np.add.reduceat(gain, starts), np.add.reduceat(rel, starts), k)


def _normalised(dcg: np.ndarray, relevant: np.ndarray, k: int) -> np.ndarray:
    """NDCG from per-query DCG@k and relevant counts: DCG over the ideal DCG of min(count, k)
    hits (0 where a query has none)."""
    n_rel = np.minimum(relevant, k).astype(int)
    disc = np.r_[0.0, np.cumsum(1.0 / np.log2(np.arange(2, k + 2)))]
    return np.where(n_rel > 0, dcg / np.where(n_rel > 0, disc[n_rel], 1.0), 0.0)


class QueryGrid:
    """Candidate rows laid out as a (queries x longest query) grid, each query's rows in row
    order, padding scored NaN (after every real row, NaN rows included): `ndcg` then ranks
    the relevant cells of short rows instead of one long lexsort. The same per-query NDCG@k
    as `ndcg_rows` to float rounding, ties included (ties keep row order)."""

    MAX_PADDING = 4  # grid cells per row beyond which the padding costs more than the grid saves

    def __init__(self, user: np.ndarray, label: np.ndarray) -> None:
        order = np.argsort(user, kind="stable")
        starts = np.r_[0, np.flatnonzero(np.diff(user[order])) + 1]
        sizes = np.diff(np.r_[starts, len(user)])
        self.query = np.repeat(np.arange(len(starts)), sizes)
        self.slot = np.arange(len(user)) - np.repeat(starts, sizes)
        self.order = order
        self.shape = (len(starts), int(sizes.max()) if len(sizes) else 0)
        self.relevant = self.grid(label > 0, False).astype(np.float64)
        self.padding = ~self.grid(np.ones(len(user), bool), False)
        self._relevant_cells = np.nonzero(self.relevant)
        self._relevant_count = self.relevant.sum(axis=1)

    @classmethod
    def fits(cls, user: np.ndarray) -> bool:
        sizes = np.bincount(np.unique(user, return_inverse=True)[1]) if len(user) else np.zeros(0, int)
        return len(sizes) > 0 and len(sizes) * int(sizes.max()) <= cls.MAX_PADDING * len(user)

    def grid(self, values: np.ndarray, fill: Any) -> np.ndarray:
        out = np.full(self.shape, fill, dtype=np.asarray(values).dtype)
        out[self.query, self.slot] = values[self.order]
        return out

    def ndcg(self, score: np.ndarray, k: int = 10) -> np.ndarray:
        """Per-query NDCG@k of the grid's rows ordered by `score` (a grid, padding at NaN).

        Only relevant cells count, so no row is sorted: a relevant cell below its row's k-th
        best score cannot reach the top k; the others get their exact rank in the order a
        stable descending sort gives (greater scores, then equal ones in earlier slots; a NaN
        after every number, then earlier NaNs). A partition and a few comparisons per relevant
        cell instead of a sort of every row: about 3x quicker on Last.fm's grid."""
        q, s = self._relevant_cells
        v = score[q, s]
        if score.shape[1] > k:
            kth = -np.partition(-score, k - 1, axis=1)[:, k - 1]
            near = ~(v < kth[q])  # NaN in either: the exact rank decides
            q, s, v = q[near], s[near], v[near]
        row = score[q]
        earlier = np.arange(score.shape[1])[None, :] < s[:, None]
        rank = (row > v[:, None]).sum(axis=1) + ((row == v[:, None]) & earlier).sum(axis=1)
        nan = np.isnan(v)
        if nan.any():
            rank[nan] = (~np.isnan(row[nan])).sum(axis=1) + (np.isnan(row[nan]) & earlier[nan]).sum(axis=1)
        # The gains at their ranks, summed along each row as a sorted top k is (the same sums to the bit).
        hit = rank < k
        top = np.zeros((score.shape[0], min(k, score.shape[1])))
        top[q[hit], rank[hit]] = 1.0 / np.log2(rank[hit] + 2.0)
        return _normalised(top.sum(axis=1), self._relevant_count, k)


def blend_weights(rows: pl.DataFrame, columns: list[str], steps: tuple[float, ...] = BLEND_STEPS,
                  rounds: int = 2) -> dict[str, float]:
    """Blend weights over the candidate rows' z-scores by coordinate ascent of NDCG@10."""
    user = query_codes(rows)
    label = rows["label"].to_numpy()
    z = {c: rows[c].fill_null(0.0).to_numpy().astype(np.float64) for c in columns}
    if QueryGrid.fits(user):  # hundreds of blends are scored: rank within short grid rows
        grid = QueryGrid(user, label)
        zg = {c: grid.grid(v, 0.0) for c, v in z.items()}

        def value(w: dict[str, float]) -> float:
            score = np.zeros(grid.shape)
            for c in columns:  # in place, in the row path's order (the same sums, the same ties)
                if w[c]:
                    score += w[c] * zg[c]
            score[grid.padding] = np.nan
            return float(grid.ndcg(score).mean())
    else:
        def value(w: dict[str, float]) -> float:
            score = sum((w[c] * z[c] for c in columns if w[c]), np.zeros(rows.height))
            return float(ndcg_rows(user, score, label).mean())

    return coordinate_ascent(columns, value, steps=steps, rounds=rounds)

def _blend_scores(rows: pl.DataFrame, weights: dict[str, float]) -> np.ndarray:
    """The blend (retrieval) order's scores of candidate rows under `weights`."""
    if not weights:
        return -rows["retrieval_rank"].cast(pl.Float64).to_numpy()
    return np.asarray(sum((w * rows[c].fill_null(0.0).to_numpy() for c, w in weights.items() if w),
                          np.zeros(rows.height)), dtype=np.float64)


def per_user_ndcg(rows: pl.DataFrame, ranker_score: np.ndarray, blend_score: np.ndarray) -> pl.DataFrame:
    """Per-user NDCG@10 of both orders of `rows`: columns user_id, ranker, retrieval (each the
    mean over the user's label windows, each window one query), users in id order."""
    window = rows["label_window"] if "label_window" in rows.columns else pl.lit(0, pl.Int8)
    frame = rows.select("user_id", "retrieval_rank", "label", window.alias("label_window")).with_columns(
        pl.Series("ranker_score", ranker_score), pl.Series("blend_score", blend_score)) \
        .sort("user_id", "label_window", "retrieval_rank")
    query = query_codes(frame)
    label = frame["label"].to_numpy()
    per_query = frame.select("user_id", "label_window").unique(maintain_order=True).with_columns(
        pl.Series("ranker", ndcg_rows(query, frame["ranker_score"].to_numpy(), label)),
        pl.Series("retrieval", ndcg_rows(query, frame["blend_score"].to_numpy(), label)))
    return per_query.group_by("user_id", maintain_order=True).agg(pl.col("ranker", "retrieval").mean())


def _compare(rows: pl.DataFrame, ranker_score: np.ndarray, blend_score: np.ndarray, seed: int) -> dict[str, Any]:
    """`per_user_ndcg` of both orders and the paired interval of ranker - blend, resampling users."""
    per_user = per_user_ndcg(rows, ranker_score, blend_score)
    ranker, retrieval = per_user["ranker"].to_numpy(), per_user["retrieval"].to_numpy()
    mean, lo, hi = paired_interval(ranker, retrieval, seed=seed)
    return {"users": len(ranker), "ndcg@10": {"ranker": round(float(ranker.mean()), 5),
                                             "retrieval": round(float(retrieval.mean()), 5)},
            "difference": round(mean, 5), "interval": [round(lo, 5), round(hi, 5)], "wins": bool(lo > 0),
            "harms": bool(hi < 0)}


def forward_check(latest: pl.DataFrame, earlier: pl.DataFrame, config: Config, threads: int = 0) -> dict[str, Any]:
    """The ranker and the blend, both chosen on the earlier label window only, judged on the latest.

    This is how the shipped order is used: learned from one period, applied to the next,
    with features over a longer history. A gain that holds only within one window (users
    split in folds) does not pass it.
    """
    model = _fit(earlier, config, threads)
    columns = source_columns(earlier)
    weights = blend_weights(earlier, columns) if columns else {}
    result = _compare(latest, model.predict(latest), _blend_scores(latest, weights), config.ranker.seed)
    return {**result, "iterations": model.best_iteration_, "blend_weights": weights}


def guard_ranker(rows: pl.DataFrame, config: Config, final: Callable[[int], Ranker] | None = None
                 ) -> dict[str, Any]:
    """Does the ranker's order beat the retrieval (blend) order on held-out labels?

    Two checks:

    - across users, which must show a gain (a paired 95% interval above 0): four folds of
      users; for each fold the ranker trains on the other folds' rows (every label window),
      and the blend's weights are chosen on the other folds too, so both orders are judged on
      users neither was chosen on; every labelled (user, window) of the fold is scored;
    - forward in time (`forward_check`), which must show no harm (an interval not wholly
      below 0): ranker and blend chosen on the earlier label window only, judged on the
      latest, as the shipped model is used. It has half the data and is noisier, so it vetoes
      a clear loss rather than requiring a gain. A log with a single label window cannot be
      checked this way, so its ranker does not ship.

    The folds' fits, the forward check's and `final` (the shipped model's fit, given the
    LightGBM thread count; its model is returned under "final_model") run side by side
    (`fits_side_by_side`), the same models as one after another.
    """
    if "label_window" not in rows.columns:
        rows = rows.with_columns(pl.lit(0, pl.Int8).alias("label_window"))
    latest = rows.filter(pl.col("label_window") == 0)
    earlier = rows.filter(pl.col("label_window") != 0)
    fold = user_fold(rows["user_id"], config.ranker.seed, folds=GUARD_FOLDS)
    columns = source_columns(rows)
    enough = earlier["user_id"].n_unique() >= MIN_FORWARD_USERS if earlier.height else False

    def fold_fit(f: int) -> Callable[[int], tuple[pl.DataFrame, int, dict[str, float]]]:
        def job(threads: int) -> tuple[pl.DataFrame, int, dict[str, float]]:
            other = rows.filter(pl.Series(fold != f))
            started = time.perf_counter()
            model = _fit(other, config, threads)
            log.info("guard: fold %d/%d ranker fitted on %d rows (%.0f s)", f + 1, GUARD_FOLDS, other.height,
                     time.perf_counter() - started)
            part = rows.filter(pl.Series(fold == f))
            weights = blend_weights(other, columns) if columns else {}
            return (part.with_columns(pl.Series("ranker_score", model.predict(part)),
                                      pl.Series("blend_score", _blend_scores(part, weights))),
                    model.best_iteration_, weights)
        return job

    def forward_fit(threads: int) -> dict[str, Any]:
        started = time.perf_counter()
        result = forward_check(latest, earlier, config, threads)
        log.info("guard: forward check fitted on the earlier window's %d rows (%.0f s)", earlier.height,
                 time.perf_counter() - started)
        return result

    # The largest fits first, so that the last to start are the shortest (the lanes end together).
    jobs: list[Callable[[int], Any]] = ([final] if final is not None else []) + [fold_fit(f) for f in range(GUARD_FOLDS)]
    results = fits_side_by_side([*jobs, forward_fit] if enough else jobs, matrix_bytes=8 * rows.height * rows.width)
    final_model = results.pop(0) if final is not None else None
    folds = results[:GUARD_FOLDS]
    forward = results[GUARD_FOLDS] if enough else None
    iterations = [it for _, it, _ in folds]
    blend_weights_used = [w for _, _, w in folds]
    oof = pl.concat([part for part, _, _ in folds])
    across = _compare(oof, oof["ranker_score"].to_numpy(), oof["blend_score"].to_numpy(), config.ranker.seed)
    if not across["wins"]:
        reason = "the ranker did not beat the retrieval order on held-out users"
    elif forward is None:
        reason = SINGLE_WINDOW
    elif forward["harms"]:
        reason = "the ranker learned on the earlier label window was worse than the retrieval order on the latest"
    else:
        reason = ""
    out = {key: across[key] for key in ("users", "ndcg@10", "difference", "interval")}
    extra = {"final_model": final_model} if final is not None else {}
    return {**out, "iterations": iterations, "blend_weights": blend_weights_used,
            "forward": forward, "ships": not reason, "reason": reason, **extra,
            "note": "NDCG@10 within each user's candidates, averaged over the user's label windows; "
                    "both orders out of fold"}


def training_rows(catalog: Catalog, cands: pl.DataFrame, split: LabelSplit, threshold: float | None,
                  config: Config) -> pl.DataFrame:
    """Labelled candidate rows of every label window, features from before each window's labels."""
    parts = []
    if config.ranker.depth:  # the rows the ranker will reorder at serving time, no others
        cands = cands.filter(pl.col("retrieval_rank") <= config.ranker.depth)
    for window, part in enumerate(label_windows(split, config, threshold)):
        rows_w = cands.filter(pl.col("label_window") == window)
        parts.append(gain_labels(pair_features(rows_w, catalog, part.fit), part.held, threshold))
    rows = pl.concat(parts, how="diagonal_relaxed")
    return rows.filter((pl.col("label") > 0).any().over(["label_window", "user_id"]))


def run_train(art_dir: Path, config: Config | None = None, *, lock: bool = True) -> dict:
    config = config or Config()
    art_dir = Path(art_dir)
    if not art_dir.is_dir():  # before the lock, which would create the folder to hold a failed record
        require_snapshot(art_dir)
    with stage_run("train", art_dir, None, config.to_dict(), lock=lock) as record:
        catalog = load_snapshot(art_dir)
        valid_path = art_dir / "sources" / "validation.parquet"
        ranker_dir = art_dir / "ranker"
        split, threshold = candidate_split(catalog.interactions, config)
        if split is None or not valid_path.is_file():
            reason = ("the log is too short to hold out labels for any user" if split is None else
                      "the index stage held out no labels to learn from (no user of the validation split has a "
                      "held-out positive)") + ": no ranker is trained"
            return _no_ranker(art_dir, record, reason)
        t0 = time.perf_counter()
        rows = training_rows(catalog, pl.read_parquet(valid_path), split, threshold, config)
        if config.ranker.objective == "regression":
            return _no_ranker(art_dir, record, "ranker.objective = regression predicts ratings, not an order: "
                                               "the retrieval order is exported")
        record.timings["examples"] = time.perf_counter() - t0
        if rows["user_id"].n_unique() < 20:
            return _no_ranker(art_dir, record, f"only {rows['user_id'].n_unique()} users have held-out positives "
                                               "among their candidates: too few to train and check a ranker")
        earlier_users = rows.filter(pl.col("label_window") != 0)["user_id"].n_unique()
        if config.ranker.guard and earlier_users < MIN_FORWARD_USERS:
            # The guard's forward check needs an earlier window; without it the ranker could not
            # ship, so none is trained (ranker.guard = false trains and ships one anyway).
            single = rows["label_window"].n_unique() < 2 and len(label_windows(split, config, threshold)) < 2
            return _no_ranker(art_dir, record, SINGLE_WINDOW if single else (
                f"only {earlier_users} users of the earlier label window have a held-out positive among their "
                f"first {config.ranker.depth or 'all'} candidates: too few to check the ranker forward in time"))
        latest_users = rows.filter(pl.col("label_window") == 0)["user_id"].n_unique()
        if config.ranker.guard and latest_users == 0:
            # The forward check judges on the latest window: with no labelled user there it cannot
            # run (it failed with an IndexError), and the ranker could not ship.
            return _no_ranker(art_dir, record, (
                f"no user of the latest label window has a held-out positive among their first "
                f"{config.ranker.depth or 'all'} candidates: the ranker cannot be checked forward in time"))
        t0 = time.perf_counter()
        log.info("train: %d candidate rows of %d users; checking the ranker against the retrieval order "
                 "(%d folds and a forward check, beside the final fit)", rows.height, rows["user_id"].n_unique(),
                 GUARD_FOLDS)
        # Without early stopping the shipped model's rounds are known up front: it is fitted side
        # by side with the guard's fits. With it, it takes the folds' mean best iteration, after.
        final = None if config.ranker.early_stopping_rounds else (
            lambda threads: fit_ranker(rows, config, n_estimators=config.ranker.n_estimators, threads=threads))
        guard = guard_ranker(rows, config, final=final)
        ranker = guard.pop("final_model", None)
        record.timings["guard"] = time.perf_counter() - t0
        ships = guard["ships"] or not config.ranker.guard
        rounds = max(1, int(round(float(np.mean(guard["iterations"])))))
        if ranker is None:
            t0 = time.perf_counter()
            ranker = fit_ranker(rows, config, n_estimators=rounds)
            record.timings["fit"] = time.perf_counter() - t0
        ranker.save(ranker_dir)
        order = "ranker" if ships else "retrieval"
        reason = "" if ships else guard.get("reason") or "the ranker did not beat the retrieval order on validation"
        # Written last, naming the model it checked: a stage stopped before this line leaves the
        # new model beside the last night's verdict, and serving sees they do not belong together.
        write_json({"order": order, "reason": reason, "depth": config.ranker.depth, "guard": guard,
                    "protocol": split.protocol, "built_from": lineage(art_dir),
                    "model_sha256": ranker.model_sha256_}, ranker_dir / GUARD_FILE)
        if not ships:
            checked = guard["forward"] if guard["forward"] and guard["interval"][0] > 0 else guard
            log.warning("%s (NDCG@10 %s vs %s, difference %s, 95%% interval %s): the retrieval order is exported",
                        reason, checked["ndcg@10"]["ranker"], checked["ndcg@10"]["retrieval"],
                        checked["difference"], checked["interval"])
        summary: dict[str, Any] = {
            "objective": config.ranker.objective, "protocol": split.protocol, "order": order, "reason": reason,
            "train_rows": rows.height, "train_users": rows["user_id"].n_unique(), "valid_rows": rows.height,
            "valid_users": guard["users"], "features": ranker.feature_names_, "best_iteration": rounds,
            "eval_metrics": {}, "valid_ndcg@10": guard["ndcg@10"], "guard": guard}
        record.counts = {"train_rows": rows.height, "users": rows["user_id"].n_unique()}
        record.models = {"ranker": f"lightgbm:{config.ranker.objective}", "features": len(ranker.feature_names_),
                         "order": order}
        record.extra = {"training": summary}
        record.finish("ok")
        log.info("ranker: %d rows of %d users, %d rounds; validation NDCG@10 ranker %s vs retrieval %s: ships %s",
                 rows.height, guard["users"], rounds, guard["ndcg@10"]["ranker"], guard["ndcg@10"]["retrieval"],
                 order)
        return summary


def lineage(art_dir: Path, verified: Mapping[str, str] | None = None) -> dict[str, str]:
    """sha256 of the stage-1 artifacts a ranker is trained on (serving checks they still match).

    verified: digests just checked against the files, by normalised path (`Retriever.load`
    checks these files and keeps them as `verified_files_`): those files are not hashed again."""
    out = {}
    known = verified or {}
    # Content files only: retriever.json also holds timings, which differ between identical runs.
    for rel in ("sources/sources.json", "sources/sources.safetensors", "index/index.faiss", "index/items.parquet"):
        path = Path(art_dir) / rel
        if path.is_file():
            out[rel] = known.get(os.path.normpath(path)) or sha256_file(path)
    return out


def _no_ranker(art_dir: Path, record: Any, reason: str) -> dict:
    """Record that retrieval order is exported, remove any stale model, warn (the night goes on)."""
    ranker_dir = art_dir / "ranker"
    remove_saved(ranker_dir)
    write_json({"order": "retrieval", "reason": reason}, ranker_dir / GUARD_FILE)
    log.warning("%s; the retrieval order is exported", reason)
    summary = {"order": "retrieval", "reason": reason, "train_rows": 0, "valid_rows": 0, "best_iteration": 0}
    record.models = {"order": "retrieval"}
    record.extra = {"training": summary}
    record.finish("ok")
    return summary


__all__ = ["gain_labels", "guard_ranker", "infer_rating_scale", "pair_features", "run_train"]
