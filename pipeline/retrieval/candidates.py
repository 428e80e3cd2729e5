"""Stage 1's candidate model: several sources merged into one candidate list per user.

Sources: the collaborative ones of `sources.py` and the fused content retrieval (the FAISS
`Retriever`, with its cold-item quota). Each source scores the catalog for a user; scores are
z-scored per user and blended with weights chosen on validation; the candidate list is the
union of every source's top `n_candidates`, each row carrying every source's score and
rank (ranker features) and the blend (`retrieval_score`, `retrieval_rank`).

Validation follows the ranker's label protocol (`label_split`): `per_user` holds out each
user's latest interactions, `window` the log's last `label_window_days`. Every source's
setting and the blend weights are chosen there, never on data the caller tests on.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import polars as pl
import scipy.sparse as sp
from safetensors.numpy import load_file, save_file

from fusionrec.evaluation.metrics import paired_interval
from fusionrec.evaluation.splits import per_user_temporal_split
from fusionrec.pipeline.config import SourcesConfig
from fusionrec.pipeline.io.storage import atomic_path, write_json
from fusionrec.pipeline.retrieval.inputs import listed_ids
from fusionrec.pipeline.retrieval.retriever import Retriever
from fusionrec.pipeline.retrieval.sources import (
    ALS,
    SEARCH_GRID,
    Source,
    als_available,
    build_log,
    make_source,
    positive_mask,
    user_segments,
)
from fusionrec.pipeline.threads import thread_map

log = logging.getLogger("fusionrec.candidates")
DAY = 86_400
FUSED = "fused"
BATCH_USERS = 1024
THREADED_BLOCK_CELLS = 1 << 24  # users x items of a batch up to which sources are ranked side by side


@dataclass(frozen=True)
class LabelSplit:
    """The interactions features may use (`fit`) and the later ones that are labels (`held`)."""

    protocol: str  # per_user | window
    fit: pl.DataFrame
    held: pl.DataFrame
    users: int  # users with history in `fit` and a positive in `held`


def label_split(interactions: pl.DataFrame, protocol: str, *, fraction: float, window_days: float,
                threshold: float | None, seed: int = 0, min_users: int = 20) -> LabelSplit | None:
    """The label protocol's split; `auto` takes the window of the log's latest interactions while
    it labels at least half as many users as `per_user` does, else `per_user`.

    None when no protocol yields `min_users` users (the log is too short to learn from).
    """
    options = {}
    if protocol in ("auto", "per_user"):
        fit, held = per_user_temporal_split(interactions, fraction, min_train=1, seed=seed)
        options["per_user"] = (fit, held)
    if protocol in ("auto", "window"):
        end = int(cast(int, interactions["timestamp"].max())) + 1
        start = end - int(window_days * DAY)
        if start <= int(cast(int, interactions["timestamp"].min())):
            # The whole log fits in one window (a fixed split carried in `timestamp`, such as
            # Last.fm's 0/1/2): the latest distinct timestamp is the window.
            start = end - 1
        fit = interactions.filter(pl.col("timestamp") < start)
        held = interactions.filter(pl.col("timestamp") >= start)
        if fit.height and held.height:
            options["window"] = (fit, held)
    found = {name: LabelSplit(name, fit, held, _labelled_users(fit, held, threshold).height)
             for name, (fit, held) in options.items()}
    found = {name: split for name, split in found.items() if split.users >= min_users}
    if not found:
        return None
    # A window of the log's latest interactions is what the nightly job faces (the next
    # period, for everyone): auto takes it while it labels at least half as many users as
    # holding out each user's latest interactions does.
    if "window" in found and ("per_user" not in found or found["window"].users >= 0.5 * found["per_user"].users):
        return found["window"]
    return found.get("per_user") or found["window"]


def _labelled_users(fit: pl.DataFrame, held: pl.DataFrame, threshold: float | None) -> pl.DataFrame:
    positive = held.filter(positive_mask(held, threshold)).select(pl.col("user_id").cast(pl.String)).unique()
    return positive.join(fit.select(pl.col("user_id").cast(pl.String)).unique(), on="user_id", how="semi")


def truth_pairs(fit: pl.DataFrame, held: pl.DataFrame, threshold: float | None) -> pl.DataFrame:
    """Positive held-out (user_id, item_id) pairs the user had not seen in `fit`."""
    pos = held.filter(positive_mask(held, threshold)).select(pl.col("user_id").cast(pl.String),
                                                             pl.col("item_id").cast(pl.String)).unique()
    seen = fit.select(pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String)).unique()
    return pos.join(seen, on=["user_id", "item_id"], how="anti").join(
        seen.select("user_id").unique(), on="user_id", how="semi")


def zscore(scores: np.ndarray, seen: np.ndarray | None = None) -> np.ndarray:
    """Per-row z-scores over the items a user has not seen (a constant row scores 0 everywhere)."""
    if seen is None:
        mean = scores.mean(axis=1, keepdims=True)
        std = scores.std(axis=1, keepdims=True)
    else:
        unseen = ~seen
        count = np.maximum(unseen.sum(axis=1, keepdims=True), 1)
        mean = np.where(unseen, scores, 0.0).sum(axis=1, keepdims=True) / count
        std = np.sqrt(np.where(unseen, (scores - mean) ** 2, 0.0).sum(axis=1, keepdims=True) / count)
    return ((scores - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)


def _discounts(k: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(2, k + 2))


def _dcg_at(scores: np.ndarray, truth: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row DCG@k of each row's top k by `scores` (binary gains from `truth`), and the
    k-th best score (k <= the number of columns). An item at -inf (seen, or not in a list) is
    never recommended: a row with fewer than k others scores no hit for it."""
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    values = np.take_along_axis(scores, top, axis=1)
    ranked = np.argsort(-values, axis=1, kind="stable")
    order = np.take_along_axis(top, ranked, axis=1)
    hits = np.take_along_axis(truth, order, axis=1) & np.isfinite(np.take_along_axis(values, ranked, axis=1))
    return (hits * _discounts(k)).sum(axis=1), values.min(axis=1)


def ideal_dcg(truth: np.ndarray, k: int) -> np.ndarray:
    """Per-row DCG@k of a perfect order of a boolean truth matrix."""
    discounts = _discounts(k)
    by_count = np.array([discounts[:n].sum() for n in range(k + 1)])
    return by_count[np.minimum(truth.sum(axis=1), k)]


def _ndcg(dcg: np.ndarray, idcg: np.ndarray) -> np.ndarray:
    return np.where(idcg > 0, dcg / np.where(idcg > 0, idcg, 1.0), 0.0)


def ndcg_at(scores: np.ndarray, truth: np.ndarray, k: int = 10) -> np.ndarray:
    """Per-row NDCG@k of `scores` (seen items already at -inf) against a boolean truth matrix."""
    k = min(k, scores.shape[1])
    return _ndcg(_dcg_at(scores, truth, k)[0], ideal_dcg(truth, k))


def hits_at(scores: np.ndarray, truth: np.ndarray, n: int) -> np.ndarray:
    """Per row, how many of the `n` best-scored items are in `truth`; an item at -inf (seen, or
    not listed) is never recommended, so never a hit."""
    n = min(n, scores.shape[1])
    top = np.argpartition(-scores, n - 1, axis=1)[:, :n]
    return (np.take_along_axis(truth, top, axis=1) & np.isfinite(np.take_along_axis(scores, top, axis=1))).sum(axis=1)


def recall_at(scores: np.ndarray, truth: np.ndarray, n: int) -> float:
    """Recall@n pooled over rows: every row's hits over every row's truth."""
    return float(hits_at(scores, truth, n).sum() / max(truth.sum(), 1))


BLEND_STEPS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)


def coordinate_ascent(names: list[str], value: Callable[[dict[str, float]], float], *,
                      steps: tuple[float, ...] = BLEND_STEPS, rounds: int = 4) -> dict[str, float]:
    """Non-negative weights maximising `value`, one name at a time over `steps`, from the best
    single name (weight 1, the others 0); stops after `rounds` or a round without a gain."""
    singles = {n: value({m: float(m == n) for m in names}) for n in names}
    weights = {n: float(n == max(singles, key=singles.__getitem__)) for n in names}
    best = value(weights)
    for _ in range(rounds):
        improved = False
        for n in names:
            for step in steps:
                trial = {**weights, n: step}
                if step == weights[n] or not any(trial.values()):
                    continue
                v = value(trial)
                if v > best + 1e-6:
                    best, weights, improved = v, trial, True
        if not improved:
            break
    return weights


class BlendNDCG:
    """Mean NDCG@k of non-negative blends `sum_n w[n] * z[n]` (unseen items only), computed on
    each user's pool: the union of every source's top `pool` unseen items.

    Exact: an item outside the pool scores at most `sum_n w[n] * t[n]`, where `t[n]` is source
    n's best score outside its own top `pool`; a row whose k-th pooled blend score is not above
    that bound is scored again on the whole catalogue. The coordinate ascent evaluates hundreds
    of blends, so scoring ~(sources x pool) columns instead of the catalogue is what makes it quick.
    """

    def __init__(self, z: dict[str, np.ndarray], truth: np.ndarray, blocked: np.ndarray, *, k: int = 10,
                 pool: int = 30) -> None:
        self.names, self.z, self.truth, self.blocked = list(z), z, truth, blocked
        n_users, n_items = truth.shape
        self.k = min(k, n_items)
        self.idcg = ideal_dcg(truth, self.k)
        self.pooled = bool(self.names) and len(self.names) * pool < n_items and pool >= self.k
        if not self.pooled:
            return
        tops, bounds = [], []
        for n in self.names:
            neg = np.where(blocked, np.inf, -z[n])
            part = np.argpartition(neg, pool, axis=1)
            tops.append(part[:, :pool])
            # the best score outside the top `pool`; -inf (every other item seen) becomes a finite floor
            bounds.append(np.maximum(-np.take_along_axis(neg, part[:, pool:pool + 1], axis=1)[:, 0].astype(np.float64),
                                      -1e300))
        cand = np.sort(np.hstack(tops), axis=1)
        dup = np.zeros(cand.shape, dtype=bool)
        dup[:, 1:] = cand[:, 1:] == cand[:, :-1]
        self.cand = np.where(dup, n_items, cand)  # n_items: a padding column, always masked
        pad = np.ones((n_users, 1), dtype=bool)
        self.mask = np.take_along_axis(np.hstack([blocked, pad]), self.cand, axis=1)
        self.truth_pool = np.take_along_axis(np.hstack([truth, ~pad]), self.cand, axis=1)
        zero = np.zeros((n_users, 1), dtype=np.float32)
        self.z_pool = {n: np.take_along_axis(np.hstack([z[n], zero]), self.cand, axis=1) for n in self.names}
        self.bounds = np.stack(bounds, axis=1)  # (users, sources)
        self.rows_redone_ = 0  # rows scored on the whole catalogue because the pool bound failed

    def __call__(self, w: dict[str, float]) -> float:
        used = [n for n in self.names if w[n]]
        if not used:
            return 0.0
        if not self.pooled:
            total = sum(w[n] * self.z[n] for n in used)
            dcg, _ = _dcg_at(np.where(self.blocked, -np.inf, total), self.truth, self.k)
            return float(_ndcg(dcg, self.idcg).mean())
        total = sum(w[n] * self.z_pool[n] for n in used)
        dcg, kth = _dcg_at(np.where(self.mask, -np.inf, total), self.truth_pool, self.k)
        bound = self.bounds @ np.array([w[n] for n in self.names], dtype=np.float64)
        redo = np.flatnonzero(~(kth > bound))
        self.rows_redone_ += len(redo)
        if len(redo):
            full = sum(w[n] * self.z[n][redo] for n in used)
            dcg[redo] = _dcg_at(np.where(self.blocked[redo], -np.inf, full), self.truth[redo], self.k)[0]
        return float(_ndcg(dcg, self.idcg).mean())


def search_weights(z: dict[str, np.ndarray], truth: np.ndarray, blocked: np.ndarray, *,
                   steps: tuple[float, ...] = BLEND_STEPS, rounds: int = 4) -> dict[str, float]:
    """Blend weights by coordinate ascent of validation NDCG@10, from the best single source."""
    return coordinate_ascent(list(z), BlendNDCG(z, truth, blocked), steps=steps, rounds=rounds)


def served_user_ids(*id_columns: pl.Series) -> np.ndarray:
    """Every user a candidate model serves, sorted, as text: the union of the log's, the users
    table's and the fused index's user ids (nulls dropped). One rule for `CandidateModel.fit`
    and for Ray's driver, which reads the same columns from the artifacts without the model."""
    if not id_columns:
        return np.array([], dtype=object)
    ids = pl.concat([column.cast(pl.String) for column in id_columns])
    return ids.drop_nulls().unique().sort().to_numpy().astype(object)


@dataclass
class CandidateModel:
    """The fitted sources, their settings and blend weights over one user and item vocabulary."""

    n_candidates: int = 100
    threshold: float | None = None
    recent_items: int = 30
    half_life: float = 6.6
    seed: int = 0
    params: dict[str, dict[str, Any]] = field(default_factory=dict)  # source name -> setting
    weights: dict[str, float] = field(default_factory=dict)  # source name -> blend weight
    content: np.ndarray | None = None  # (n_items, d) item content vectors (content source, new users)
    user_content: dict[str, np.ndarray] | None = None  # user id -> the user's own vector, same modality
    tags: sp.csr_matrix | None = None  # (n_tags, n_items) the items' tags (`sources.tag_matrix`), as extra users

    def fit(self, interactions: pl.DataFrame, item_ids: np.ndarray, users: pl.DataFrame | None,
            retriever: Retriever | None) -> CandidateModel:
        self.user_ids_ = served_user_ids(
            interactions["user_id"], *([users["user_id"]] if users is not None else []),
            *([pl.Series(np.asarray(retriever.user_ids_, dtype=str))] if retriever is not None else []))
        self.item_ids_ = np.asarray(item_ids, dtype=object)
        self.segments_, self.segment_names_ = user_segments(users, self.user_ids_)
        self.log_ = build_log(interactions, self.user_ids_, self.item_ids_, threshold=self.threshold,
                              recent_items=self.recent_items, half_life=self.half_life)
        self.sources_: dict[str, Source] = {}
        for name, setting in self.params.items():
            if name == FUSED:
                continue
            self.sources_[name] = make_source(name, setting, segments=self.segments_, seed=self.seed,
                                              content=self.content, tags=self.tags).fit(self.log_)
        self.retriever_ = retriever
        self._index = {u: j for j, u in enumerate(self.user_ids_)}
        self.cold_profile_ = self._cold_profiles()
        return self

    def _cold_profiles(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(user vectors, item vectors), centred and unit length, for serving users by their own content."""
        if self.content is None or not self.user_content:
            return None
        items = self.content.astype(np.float32)
        present = np.abs(items).sum(axis=1) > 0
        if not present.any():
            return None
        mean = items[present].mean(axis=0)
        items = np.where(present[:, None], items - mean, 0.0)
        users = np.zeros((len(self.user_ids_), items.shape[1]), np.float32)
        for user, vector in self.user_content.items():
            j = self._index.get(str(user))
            if j is not None and len(vector) == items.shape[1]:
                users[j] = np.asarray(vector, np.float32) - mean
        users[np.abs(users).sum(axis=1) == 0] = 0.0

        def unit(x: np.ndarray) -> np.ndarray:
            norms = np.linalg.norm(x, axis=1, keepdims=True)
            return (x / np.where(norms > 0, norms, 1.0)).astype(np.float32)

        return unit(users), unit(items)

    # -- scoring --------------------------------------------------------------------------

    def user_rows(self, user_ids: list[str]) -> np.ndarray:
        return np.array([self._index.get(str(u), -1) for u in user_ids], dtype=np.int64)

    def source_scores(self, rows: np.ndarray, user_ids: list[str]) -> dict[str, np.ndarray]:
        """Each source's scores (len(rows), n_items); users unknown to the log score 0 on collaborative sources."""
        known = rows >= 0
        out: dict[str, np.ndarray] = {}
        for name, source in self.sources_.items():
            block = np.zeros((len(rows), len(self.item_ids_)), np.float32)
            if known.any():
                block[known] = source.score(self.log_, rows[known])
            if (~known).any() and name in ("popular", "segment_popular"):
                block[~known] = source.overall_ if name == "segment_popular" else source.share_  # type: ignore[attr-defined]
            out[name] = block
        if self.retriever_ is not None and FUSED in self.params:
            out[FUSED] = fused_scores(self.retriever_, user_ids, self.item_ids_, self.n_candidates)
        return out

    def history_counts(self, rows: np.ndarray) -> np.ndarray:
        """Interactions each user has in the log (0 for users it does not know)."""
        counts = np.zeros(len(rows), np.int64)
        known = rows >= 0
        if known.any():
            counts[known] = np.diff(self.log_.seen.indptr)[rows[known]]
        return counts

    def cold_start(self, user_ids: list[str]) -> np.ndarray:
        """Per user, how the blend serves them (read-only; `_block` decides the same way):
        "" (history: the blended sources), "content" (no history, placed by their own content)
        or "popular" (no history and no content: popularity)."""
        rows = self.user_rows(user_ids)
        out = np.full(len(rows), "", dtype=object)
        cold = np.flatnonzero(self.history_counts(rows) == 0)
        if not len(cold):
            return out
        fused = None
        if self.cold_profile_ is None and self.retriever_ is not None and FUSED in self.params:
            fused = fused_scores(self.retriever_, [str(user_ids[j]) for j in cold], self.item_ids_, self.n_candidates)
        own = self._own_content(rows[cold], fused)
        out[cold] = np.where(own.std(axis=1) > 0, "content", "popular")
        return out

    def _own_content(self, rows: np.ndarray, fused: np.ndarray | None) -> np.ndarray:
        """Users' (rows of users without history) scores of the catalog by their own content:
        the cosine of their vector with the items', else the fused retrieval's scores (`fused`)
        where that is all there is; zeros for a user with no content."""
        own = np.zeros((len(rows), len(self.item_ids_)), np.float32)
        if self.cold_profile_ is not None:
            user_vecs, item_vecs = self.cold_profile_
            known = rows >= 0
            own[known] = user_vecs[rows[known]] @ item_vecs.T
        elif fused is not None:
            own = fused
        return own

    def blocked(self, rows: np.ndarray) -> np.ndarray:
        """Items each user has already (seen items never return)."""
        out = np.zeros((len(rows), len(self.item_ids_)), bool)
        known = rows >= 0
        if known.any():
            out[known] = self.log_.seen[rows[known]].toarray() > 0
        return out

    def candidates(self, user_ids: list[str] | None = None, *, exclude_seen: bool = True) -> pl.DataFrame:
        """Candidate rows for `user_ids` (default: every user): user_id, item_id, per-source
        `src_<name>`, `src_<name>_z`, `src_<name>_rank`, and the blend `retrieval_score`,
        `retrieval_rank`, ordered by user then blend."""
        wanted = listed_ids(self.user_ids_ if user_ids is None else user_ids)
        frames = [self._candidates(wanted[s:s + BATCH_USERS], exclude_seen)
                  for s in range(0, len(wanted), BATCH_USERS)]
        return pl.concat(frames) if frames else self._candidates([], exclude_seen)

    def _block(self, user_ids: list[str], exclude_seen: bool) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray],
                                                                       dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """Scores, z-scores and ranks per source, the blend and the blocked (seen) mask for a user batch.

        Ranks count unblocked items only; with `exclude_seen`, seen items rank after every unseen one."""
        rows = self.user_rows(user_ids)
        scores = self.source_scores(rows, user_ids)
        seen = self.blocked(rows)
        blocked = seen if exclude_seen else np.zeros_like(seen)
        # Sources side by side on threads while a block is small; on a large catalogue one at a
        # time, so that no more than one source's temporaries (argsort's int64 order) are alive.
        workers = 0 if seen.size <= THREADED_BLOCK_CELLS else 1
        z = dict(zip(scores, thread_map(lambda s: zscore(s, seen), scores.values(), workers)))
        blend = np.zeros(blocked.shape, np.float32)
        for name in z:
            if self.weights.get(name, 0.0):
                blend += np.float32(self.weights[name]) * z[name]
        # Users without history have nothing for the collaborative sources to go on: they are
        # served from popularity in their segment (users table) and their own content.
        cold = self.history_counts(rows) == 0
        if cold.any():
            popular = next((z[n][cold] for n in ("segment_popular", "popular") if n in z),
                           np.zeros((int(cold.sum()), blocked.shape[1]), np.float32))
            cold_blend = popular
            # A user with content of their own (profile text, avatar, voice) is placed by it:
            # the cosine of their vector with the items' (the fused retrieval where that is all
            # there is); popularity in their segment only breaks ties. Without content: popularity.
            own = self._own_content(rows[cold], z[FUSED][cold] if FUSED in z else None)
            has_content = own.std(axis=1) > 0
            cold_blend = np.where(has_content[:, None], zscore(own) + 0.01 * popular, popular)
            blend[cold] = cold_blend
        # The blend stays a number on blocked cells (score_pairs scores seen items as if unseen);
        # the ranks below put blocked cells last.
        def rank_of(s: np.ndarray) -> np.ndarray:
            order = np.argsort(-np.where(blocked, -np.inf, s), axis=1, kind="stable")
            rank = np.empty_like(order)
            np.put_along_axis(rank, order, np.broadcast_to(np.arange(1, order.shape[1] + 1), order.shape), axis=1)
            return rank

        named = {**scores, "blend": blend}
        ranks = dict(zip(named, thread_map(rank_of, named.values(), workers)))  # numpy's sorts release the GIL
        return scores, z, ranks, blend, blocked

    def _frame(self, user_ids: list[str], u: np.ndarray, i: np.ndarray, scores: dict[str, np.ndarray],
               z: dict[str, np.ndarray], ranks: dict[str, np.ndarray], blend: np.ndarray) -> pl.DataFrame:
        columns: dict[str, Any] = {"user_id": np.asarray(user_ids, dtype=object)[u].astype(str),
                                   "item_id": self.item_ids_[i].astype(str)}
        for name, s in scores.items():
            columns[f"src_{name}"] = s[u, i].astype(np.float32)
            columns[f"src_{name}_z"] = z[name][u, i].astype(np.float32)
            columns[f"src_{name}_rank"] = ranks[name][u, i].astype(np.int32)
        if scores:
            stacked_z = np.stack([z[name][u, i] for name in scores], axis=1)
            columns["src_z_mean"] = stacked_z.mean(axis=1).astype(np.float32)
            columns["src_z_max"] = stacked_z.max(axis=1).astype(np.float32)
            columns["src_top10_count"] = np.stack([ranks[name][u, i] <= 10 for name in scores], axis=1).sum(
                axis=1).astype(np.int32)
        columns["retrieval_score"] = blend[u, i].astype(np.float32)
        columns["retrieval_rank"] = ranks["blend"][u, i].astype(np.int32)
        return pl.DataFrame(columns)

    def _candidates(self, user_ids: list[str], exclude_seen: bool) -> pl.DataFrame:
        scores, z, ranks, blend, blocked = self._block(user_ids, exclude_seen)
        n = min(self.n_candidates, len(self.item_ids_))
        chosen = ranks["blend"] <= n
        for name in scores:
            if self.weights.get(name, 0.0) > 0 or name == FUSED:
                chosen |= ranks[name] <= n
        u, i = np.nonzero(chosen & ~blocked)
        return self._frame(user_ids, u, i, scores, z, ranks, blend).sort(["user_id", "retrieval_rank"])

    def score_pairs(self, pairs: pl.DataFrame) -> pl.DataFrame:
        """The candidate columns for given (user_id, item_id) pairs, input order and columns kept.

        Items outside the catalog get nulls; seen items are scored as if unseen.
        """
        base = pairs.with_columns(pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String))
        users = base["user_id"].unique(maintain_order=True).to_list()
        col = pl.DataFrame({"item_id": self.item_ids_.astype(str), "__i": np.arange(len(self.item_ids_))})
        frames = []
        for s in range(0, len(users), BATCH_USERS):
            batch = users[s:s + BATCH_USERS]
            # Ranks among the user's unseen items, as the candidates (and so the ranker's rows) have them.
            scores, z, ranks, blend, seen = self._block(batch, exclude_seen=True)
            want = base.filter(pl.col("user_id").is_in(batch)).select("user_id", "item_id").unique() \
                .join(col, on="item_id", how="inner").join(
                    pl.DataFrame({"user_id": batch, "__u": np.arange(len(batch))}), on="user_id")
            u, i = want["__u"].to_numpy(), want["__i"].to_numpy()
            _rank_seen_as_unseen(ranks, {**scores, "blend": blend}, seen, u, i)
            frames.append(self._frame(batch, u, i, scores, z, ranks, blend))
        feats = pl.concat(frames) if frames else self._frame([], np.zeros(0, np.int64), np.zeros(0, np.int64),
                                                             *self._block([], False)[:4])
        drop = [c for c in feats.columns if c in base.columns and c not in ("user_id", "item_id")]
        return base.drop(drop).join(feats, on=["user_id", "item_id"], how="left", maintain_order="left")

    # -- persistence ----------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {}
        for name, source in self.sources_.items():
            for key, value in source.state().items():
                arrays[f"{name}.{key}"] = value
        with atomic_path(directory / "sources.safetensors") as tmp:
            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp))
        write_json({"n_candidates": self.n_candidates, "threshold": self.threshold,
                    "recent_items": self.recent_items, "half_life": self.half_life, "seed": self.seed,
                    "params": self.params, "weights": self.weights, "segments": self.segment_names_},
                   directory / "sources.json")

    @classmethod
    def load(cls, directory: Path, interactions: pl.DataFrame, item_ids: np.ndarray, users: pl.DataFrame | None,
             retriever: Retriever | None, *, content: np.ndarray | None = None,
             user_content: dict[str, np.ndarray] | None = None) -> CandidateModel:
        """The saved settings and fitted sources, over the logged interactions of the snapshot."""
        meta_path = Path(directory) / "sources.json"  # a local, so a load failure names the file
        meta = json.loads(meta_path.read_text())
        model = cls(n_candidates=meta["n_candidates"], threshold=meta["threshold"],
                    recent_items=meta["recent_items"], half_life=meta["half_life"], seed=meta["seed"],
                    params=meta["params"], weights=meta["weights"], content=content, user_content=user_content)
        saved = load_file(str(Path(directory) / "sources.safetensors"))
        # The log is cheap to rebuild; the fitted sources come from the file, not a refit.
        model.params = {}
        model.fit(interactions, item_ids, users, retriever)
        model.params = meta["params"]
        for name, setting in meta["params"].items():
            if name == FUSED:
                continue
            source = make_source(name, setting, segments=model.segments_, seed=model.seed)
            model.sources_[name] = source.restore({k.split(".", 1)[1]: v for k, v in saved.items()
                                                   if k.split(".", 1)[0] == name})
        return model


def fused_scores(retriever: Retriever, user_ids: list[str], item_ids: np.ndarray, n: int) -> np.ndarray:
    """The fused retrieval's scores as a dense matrix: its candidates keep their score, the
    rest sit just below each user's lowest retrieved score (users it cannot place: all 0)."""
    out = np.zeros((len(user_ids), len(item_ids)), np.float32)
    if not user_ids:
        return out
    cands = retriever.candidates(user_ids, k=n, exclude_seen=False)
    col = {str(i): j for j, i in enumerate(item_ids)}
    row = {u: j for j, u in enumerate(user_ids)}
    r = np.array([row[u] for u in cands["user_id"].to_list()], np.int64)
    c = np.array([col.get(i, -1) for i in cands["item_id"].to_list()], np.int64)
    s = cands["retrieval_score"].cast(pl.Float32).to_numpy()
    keep = c >= 0
    r, c, s = r[keep], c[keep], s[keep]
    floor = np.full(len(user_ids), np.inf, np.float32)
    np.minimum.at(floor, r, s)
    floor = np.where(np.isfinite(floor), floor - 1e-3, 0.0).astype(np.float32)
    out[:] = floor[:, None]
    out[r, c] = s
    return out


@dataclass(frozen=True)
class Tuning:
    """What validation chose and measured."""

    protocol: str
    users: int
    params: dict[str, dict[str, Any]]
    weights: dict[str, float]
    ndcg: dict[str, float]  # per source at its chosen setting, and the blend
    recall: dict[str, float]  # recall@n_candidates per source and the union
    tags: dict[str, dict[str, Any]] = field(default_factory=dict)  # per source: did its tag settings win (`tags_win`)
    gates: dict[str, dict[str, Any]] = field(default_factory=dict)  # per gated source: did it earn its blend weight

    def as_dict(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "users": self.users, "params": self.params, "weights": self.weights,
                "validation_ndcg@10": self.ndcg, "validation_recall@n": self.recall, "tags": self.tags,
                "gates": self.gates}


@dataclass(frozen=True, eq=False)
class Tried:
    """One setting of a source as the search saw it on the validation users."""

    value: float  # mean NDCG@10
    setting: dict[str, Any]
    scores: np.ndarray  # (users, items)
    source: Source
    per_user: np.ndarray  # NDCG@10 per user


# ALS averages `seeds` seeded fits per setting (six by default). The search fits each
# setting's first SCREEN_SEEDS only (`sources.als_screen_seeds`), and the best few of each
# group (with and without the items' tags, `finalists`) get the rest: 48 fits instead of 84.
# On both benchmark sets the full fits' choice was among the finalists, so the choice and its
# factors are those of fitting every seed of every setting; chosen on halves of the
# validation users it tied (docs/quality.md, "Cheaper ALS searches").
SCREEN_SEEDS = SourcesConfig().als_screen_seeds  # one default, the config's


def finalists(grid: list[dict[str, Any]], first_look: Callable[[dict[str, Any]], tuple[Any, float]], *,
              share: float = 0.3, least: int = 2) -> list[tuple[dict[str, Any], Any]]:
    """The best `share` (at least `least`) of each group of `grid`'s settings by their
    `first_look` (a model and its value), as (setting, model) in grid order. The groups are the
    settings with and without the items' tags (`tags_win` compares their best). Only each
    group's leaders are held while the grid is screened: a model can be large."""
    def tagged(setting: dict[str, Any]) -> bool:
        return bool(setting.get("tag_weight"))

    size = {g: max(least, math.ceil(share * sum(tagged(s) is g for s in grid))) for g in (False, True)}
    leaders: dict[int, tuple[float, Any]] = {}
    for j, setting in enumerate(grid):
        model, value = first_look(setting)
        leaders[j] = (value, model)
        group = [i for i in leaders if tagged(grid[i]) is tagged(setting)]
        if len(group) > size[tagged(setting)]:  # drop the group's worst (the later one on a tie)
            del leaders[min(group, key=lambda i: (leaders[i][0], -i))]
    return [(grid[j], leaders[j][1]) for j in sorted(leaders)]


def tune(split: LabelSplit, item_ids: np.ndarray, users: pl.DataFrame | None, fused: Retriever | None,
         names: list[str], *, n_candidates: int, threshold: float | None, recent_items: int, half_life: float,
         seed: int, max_users: int = 3000, als_screen_seeds: int = SCREEN_SEEDS, content: np.ndarray | None = None,
         user_content: dict[str, np.ndarray] | None = None, tags: sp.csr_matrix | None = None
         ) -> tuple[Tuning, CandidateModel]:
    """Choose each source's setting (the same grid budget for each) and the blend weights on `split`.

    Returns what was chosen, and the model on `split.fit` with the chosen sources as fitted
    during the search (the label window's candidate model: no second fit of the same sources).
    """
    truth_frame = truth_pairs(split.fit, split.held, threshold)
    val_users = sorted(truth_frame["user_id"].unique().to_list())
    if len(val_users) > max_users:  # a seeded sample bounds the dense validation matrices
        rng = np.random.default_rng(seed)
        val_users = sorted(rng.choice(np.array(val_users, dtype=object), max_users, replace=False).tolist())
    base = CandidateModel(n_candidates, threshold, recent_items, half_life, seed, params={}, content=content,
                          user_content=user_content, tags=tags).fit(
        split.fit, item_ids, users, fused)
    rows = base.user_rows(val_users)
    col = {str(i): j for j, i in enumerate(item_ids)}
    row = {u: j for j, u in enumerate(val_users)}
    truth = np.zeros((len(val_users), len(item_ids)), bool)
    tf = truth_frame.filter(pl.col("user_id").is_in(val_users))
    truth[[row[u] for u in tf["user_id"].to_list()], [col[i] for i in tf["item_id"].to_list()]] = True
    blocked = base.blocked(rows)

    params: dict[str, dict[str, Any]] = {}
    ndcg: dict[str, float] = {}
    z: dict[str, np.ndarray] = {}
    recall: dict[str, float] = {}
    tag_choice: dict[str, dict[str, Any]] = {}

    def source(name: str, setting: dict[str, Any]) -> Source:
        return make_source(name, setting, segments=base.segments_, seed=seed, content=content, tags=tags)

    def tried(fit: Source, setting: dict[str, Any]) -> Tried:
        scores = fit.score(base.log_, rows)
        per_user = ndcg_at(np.where(blocked, -np.inf, scores), truth)
        return Tried(float(per_user.mean()), setting, scores, fit, per_user)

    for name in names:
        if name == "als" and not als_available():
            log.warning("candidate source 'als' skipped: the `implicit` package is not installed")
            continue
        if name == "segment_popular" and base.segments_.shape[1] == 0:
            continue
        if name == "content" and content is None:
            continue
        grid = [s for s in SEARCH_GRID[name] if not (s.get("tag_weight") and tags is None)]  # same fit without tags
        fitted: Iterable[tuple[dict[str, Any], Source]]
        if name == "als" and als_screen_seeds:  # every setting screened on its first seeds; the finalists get the rest
            def first_look(setting: dict[str, Any]) -> tuple[ALS, float]:
                model = cast(ALS, source("als", setting)).fit(base.log_, first=als_screen_seeds)
                return model, tried(model, setting).value

            fitted = ((s, m.complete(base.log_)) for s, m in finalists(grid, first_look))
        else:  # one setting at a time (each holds a dense users x items array)
            fitted = ((s, source(name, s).fit(base.log_)) for s in grid)
        # The best setting without the items' tags, and the best with them (`tags_win` decides).
        plain: Tried | None = None
        tagged: Tried | None = None
        for setting, fit in fitted:
            result = tried(fit, setting)
            if setting.get("tag_weight"):
                tagged = result if tagged is None or result.value > tagged.value + 1e-9 else tagged
            else:
                plain = result if plain is None or result.value > plain.value + 1e-9 else plain
        best = plain
        if tagged is not None and plain is not None:
            won, tag_choice[name] = tags_win(tagged.per_user, plain.per_user, seed)
            best = tagged if won else plain
            log.info("%s with the items' tags: validation NDCG@10 %+.4f (95%% interval %+.4f to %+.4f) against "
                     "without: %s", name, tag_choice[name]["tags_minus_plain"], *tag_choice[name]["interval"],
                     "chosen" if won else "not chosen (no clear gain)")
        assert best is not None
        ndcg[name], params[name], z[name] = best.value, best.setting, zscore(best.scores, blocked)
        base.sources_[name] = best.source
        recall[name] = recall_at(np.where(blocked, -np.inf, best.scores), truth, n_candidates)
    if fused is not None:
        scores = fused_scores(fused, val_users, np.asarray(item_ids, dtype=object), n_candidates)
        ndcg[FUSED] = float(ndcg_at(np.where(blocked, -np.inf, scores), truth).mean())
        recall[FUSED] = recall_at(np.where(blocked, -np.inf, scores), truth, n_candidates)
        params[FUSED], z[FUSED] = {}, zscore(scores, blocked)
    weights = search_weights(z, truth, blocked)
    gates: dict[str, dict[str, Any]] = {}
    for name in GATED_SOURCES:
        if weights.get(name):
            weights, gates[name] = gate_source(name, weights, z, truth, blocked, seed)
    blend = sum(weights[n] * z[n] for n in z if weights[n])
    blend = np.where(blocked, -np.inf, blend)
    ndcg["blend"] = float(ndcg_at(blend, truth).mean())
    recall["blend"] = recall_at(blend, truth, n_candidates)
    union = np.zeros_like(truth)
    for name in z:
        if weights[name] > 0 or name == FUSED:
            s = np.where(blocked, -np.inf, z[name])
            top = np.argpartition(-s, min(n_candidates, s.shape[1]) - 1, axis=1)[:, :n_candidates]
            np.put_along_axis(union, top, True, axis=1)
    top = np.argpartition(-blend, min(n_candidates, blend.shape[1]) - 1, axis=1)[:, :n_candidates]
    np.put_along_axis(union, top, True, axis=1)
    recall["union"] = float((union & truth).sum() / max(truth.sum(), 1))
    log.info("candidate sources on validation (%s, %d users): NDCG@10 %s; blend weights %s", split.protocol,
             len(val_users), {k: round(v, 4) for k, v in ndcg.items()}, weights)
    base.params, base.weights = params, weights
    return Tuning(split.protocol, len(val_users), params, weights, {k: round(v, 5) for k, v in ndcg.items()},
                  {k: round(v, 4) for k, v in recall.items()}, tag_choice, gates), base


# Sources that keep a blend weight only with a clear gain (`gate_source`). Mult-VAE (opt-in)
# raised Last.fm's validation NDCG@10 and lowered MovieLens' when the blend weighed it freely
# (docs/quality.md).
GATED_SOURCES = ("vae",)


def gate_source(name: str, weights: dict[str, float], z: dict[str, np.ndarray], truth: np.ndarray,
                blocked: np.ndarray, seed: int) -> tuple[dict[str, float], dict[str, Any]]:
    """The blend weights with `name`, or searched again without it (its weight 0): it stays only
    if the blend with it beats the blend without it on the validation users with a paired 95%
    bootstrap interval above 0 (per-user NDCG@10), the rule `tags_win` applies to tag settings."""
    without = {k: v for k, v in z.items() if k != name}
    weights_without = {**search_weights(without, truth, blocked), name: 0.0}

    def per_user(w: dict[str, float]) -> np.ndarray:
        return ndcg_at(np.where(blocked, -np.inf, sum(w[n] * z[n] for n in z if w.get(n))), truth)

    d, lo, hi = paired_interval(per_user(weights), per_user(weights_without), seed=seed)
    kept = lo > 0
    log.info("candidate source %s: blend with it minus without on validation NDCG@10 %+.4f (95%% interval "
             "%+.4f to %+.4f): %s", name, d, lo, hi, "kept" if kept else "weight 0 (no clear gain)")
    record = {"with_minus_without": round(d, 5), "interval": [round(lo, 5), round(hi, 5)], "kept": kept}
    return (weights if kept else weights_without), record


def tags_win(tagged: np.ndarray, plain: np.ndarray, seed: int = 0) -> tuple[bool, dict[str, Any]]:
    """Whether a source's best setting with the items' tags replaces its best without them:
    only when it wins on the validation users with a paired 95% bootstrap interval above 0
    (per-user NDCG@10 of each). A bigger grid should not win by the luck of the draw: on
    MovieLens (18 genre tags) picking the best of either lost a little on held-out users,
    on Last.fm (1,260 tags) the tags won clearly (docs/quality.md)."""
    d, lo, hi = paired_interval(tagged, plain, seed=seed)
    won = lo > 0
    return won, {"tags_minus_plain": round(d, 5), "interval": [round(lo, 5), round(hi, 5)], "tags_chosen": won}


def default_sources(n_items: int, ease_max_items: int) -> list[str]:
    names = ["itemknn", "recent_itemknn", "sequence", "als", "rp3beta", "content", "popular", "segment_popular"]
    if n_items <= ease_max_items:  # EASE inverts an items x items matrix
        names = ["ease", "recent_ease", *names]
    return names



def content_modality(item_mods: dict[str, tuple[np.ndarray, np.ndarray]], prefer: str = "text") -> str | None:
    """The item modality content-based scoring uses: `prefer` if present, else the one covering most items."""
    if not item_mods:
        return None
    return prefer if prefer in item_mods else max(item_mods, key=lambda m: len(item_mods[m][0]))


def user_content_vectors(user_mods: dict[str, tuple[np.ndarray, np.ndarray]], modality: str | None
                         ) -> dict[str, np.ndarray] | None:
    """user id -> the user's own vector of `modality` (profile text, avatar, voice), if any."""
    if modality is None or modality not in user_mods:
        return None
    ids, matrix = user_mods[modality]
    return {str(u): matrix[j] for j, u in enumerate(ids)}


def content_vectors(item_mods: dict[str, tuple[np.ndarray, np.ndarray]], item_ids: np.ndarray,
                    prefer: str = "text") -> np.ndarray | None:
    """One item modality's vectors aligned to `item_ids` (zero rows where missing): `prefer` if
    present, else the modality covering most items."""
    name = content_modality(item_mods, prefer)
    if name is None:
        return None
    ids, matrix = item_mods[name]
    index = {str(i): j for j, i in enumerate(ids)}
    rows = np.array([index.get(str(i), -1) for i in item_ids], np.int64)
    out = np.zeros((len(item_ids), matrix.shape[1]), np.float32)
    out[rows >= 0] = matrix[rows[rows >= 0]]
    return out


def explain_blend(rows: pl.DataFrame, weights: dict[str, float], cold: np.ndarray | None = None,
                  top: int = 5) -> pl.DataFrame:
    """Per candidate row: what each source added to the blend (`weight * z-score`).

    Columns as the ranker's explanations: `top_features` list[struct{feature, value,
    contribution}] by |contribution| (feature = `src_<name>_z`, value = the z-score),
    `explain_bias` (0: the blend has none), `contrib_<source>` and `share_<source>`. Rows of
    users without history (`cold`) were scored by their own content or popularity: their whole
    score is `contrib_cold_start`.
    """
    names = [n for n, w in weights.items() if w and f"src_{n}_z" in rows.columns]
    cold = np.zeros(rows.height, bool) if cold is None else cold
    z = np.column_stack([rows[f"src_{n}_z"].fill_null(0.0).to_numpy().astype(np.float64) for n in names]
                        + [np.zeros(rows.height)])
    contrib = z * np.array([weights[n] for n in names] + [0.0])[None, :]
    names = [*names, "cold_start"]
    contrib[cold] = 0.0
    contrib[cold, -1] = rows["score"].to_numpy()[cold] if "score" in rows.columns else 0.0
    z[cold, -1] = contrib[cold, -1]
    k = min(top, len(names))
    idx = np.argsort(-np.abs(contrib), axis=1, kind="stable")[:, :k]
    top_features = [[{"feature": f"src_{names[j]}_z", "value": float(z[r, j]), "contribution": float(contrib[r, j])}
                     for j in idx[r]] for r in range(rows.height)]
    total = np.abs(contrib).sum(axis=1, keepdims=True)
    shares = np.where(total > 0, np.abs(contrib) / np.where(total > 0, total, 1.0), np.nan)
    columns: dict[str, Any] = {"top_features": top_features, "explain_bias": np.zeros(rows.height)}
    columns.update({f"contrib_{n}": contrib[:, j] for j, n in enumerate(names)})
    columns.update({f"share_{n}": shares[:, j] for j, n in enumerate(names)})
    return pl.DataFrame(columns).with_columns(pl.col(f"share_{n}").fill_nan(None) for n in names)


def _rank_seen_as_unseen(ranks: dict[str, np.ndarray], named: dict[str, np.ndarray], seen: np.ndarray,
                         u: np.ndarray, i: np.ndarray, chunk: int = 1024) -> None:
    """Give the seen cells among (u, i) the rank they would have among the user's unseen items
    if they were unseen too (1 + the unseen items scored higher, or equal with a smaller index:
    the stable sort's order), in place. Unseen cells already have it."""
    hit = seen[u, i]
    if not hit.any():
        return
    u, i = u[hit], i[hit]
    columns = np.arange(seen.shape[1])
    for start in range(0, len(u), chunk):
        uc, ic = u[start:start + chunk], i[start:start + chunk]
        unseen = ~seen[uc]
        earlier = columns[None, :] < ic[:, None]
        for name, score in named.items():
            rows, own = score[uc], score[uc, ic][:, None]
            ahead = unseen & ((rows > own) | ((rows == own) & earlier))
            ranks[name][uc, ic] = 1 + ahead.sum(axis=1)
