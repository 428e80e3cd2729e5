"""Collaborative candidate sources over one user x item matrix.

Each source scores every catalog item for a batch of users (a dense ``(users, items)``
float32 array): EASE, item-kNN (cosine), the same two scored from each user's most recent
items only (sessions), ALS (from `implicit`, where installed) and popularity, overall and
per user segment (the users table's attributes). The candidate model (`candidates.py`)
blends them with the fused content retrieval.

Dense scores keep the sources exact and simple; they bound the catalog (EASE inverts an
items x items matrix: `sources.ease_max_items`), which is what `scale` is about.
"""

from __future__ import annotations

import logging
from typing import Any, cast

import numpy as np
import polars as pl
import scipy.sparse as sp

from fusionrec.pipeline.retrieval.sequence_model import GRUSequence

# Source, UserItemLog and _csr live in source_base (no cycle with sequence_model); re-exported here.
from fusionrec.pipeline.retrieval.source_base import (
    Source,
    UserItemLog,
    _csr,
    derived_array,
    matrix_digest,
    with_tags,
)
from fusionrec.pipeline.retrieval.vae_model import MultVAE
from fusionrec.pipeline.splits import tie_order
from fusionrec.pipeline.threads import thread_map

log = logging.getLogger("fusionrec.sources")

SOURCE_NAMES = ("ease", "itemknn", "recent_ease", "recent_itemknn", "sequence", "als", "vae", "rp3beta", "content",
                "popular", "segment_popular")


def relevance_threshold(interactions: pl.DataFrame, setting: float) -> float | None:
    """The rating at or above which an interaction is positive; None when `value` is no rating scale.

    `setting` > 0 is taken as it is; 0 means auto: 0.75 of the way up an integer scale (4 on
    1-5, 8 on 1-10). The scale starts at 1, or at the lowest value where values below 1 occur
    (0-5), and ends at the highest value: a log whose users gave no 1 or 2 (a shop's reviews, a
    short split) is still on a 1-5 scale, where 4 is a like.
    """
    if "value" not in interactions.columns:
        return None
    values = interactions["value"].drop_nulls()
    if values.len() == 0 or not bool((values == values.round()).all()):
        return None
    lo, hi = min(1.0, float(cast(float, values.min()))), float(cast(float, values.max()))
    if hi <= lo or hi - lo + 1 > 10:
        return None
    if setting > 0:
        return float(setting)
    return lo + 0.75 * (hi - lo)


def positive_mask(interactions: pl.DataFrame, threshold: float | None) -> pl.Expr:
    if threshold is None or "value" not in interactions.columns:
        return pl.lit(True)
    return pl.col("value").is_null() | (pl.col("value").cast(pl.Float64) >= threshold)


def build_log(interactions: pl.DataFrame, user_ids: np.ndarray, item_ids: np.ndarray, *,
              threshold: float | None, recent_items: int = 30, half_life: float = 6.6) -> UserItemLog:
    """The matrices of `interactions` over the given id vocabularies (unknown ids are dropped)."""
    users = pl.DataFrame({"user_id": user_ids.astype(str), "u": np.arange(len(user_ids), dtype=np.int64)})
    items = pl.DataFrame({"item_id": item_ids.astype(str), "i": np.arange(len(item_ids), dtype=np.int64)})
    frame = interactions.select(
        pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String), pl.col("timestamp"),
        positive_mask(interactions, threshold).alias("positive"),
    ).join(users, on="user_id").join(items, on="item_id")
    shape = (len(user_ids), len(item_ids))
    seen_pairs = frame.select("u", "i").unique()
    seen = _csr(seen_pairs["u"].to_numpy(), seen_pairs["i"].to_numpy(), np.ones(seen_pairs.height, np.float32), shape)
    pos = frame.filter(pl.col("positive")).group_by("u", "i").agg(pl.col("timestamp").max())
    matrix = _csr(pos["u"].to_numpy(), pos["i"].to_numpy(), np.ones(pos.height, np.float32), shape)
    # Each user's most recent items, newest first, whatever the rating: what a user just did
    # says most about what comes next (sessions). Ties in time: the log's seeded hash order
    # (`splits.tie_order`), never item order, which can carry how the ids were assigned.
    last = frame.group_by("u", "i").agg(pl.col("timestamp").max(), pl.col("user_id").first(),
                                        pl.col("item_id").first())
    last = last.with_columns(pl.Series("tie", tie_order(last["user_id"], last["item_id"]), dtype=pl.UInt64))
    recent = (last.sort(["u", "timestamp", "tie", "i"], descending=[False, True, True, True])
              .with_columns(pl.int_range(pl.len()).over("u").alias("age"))
              .filter(pl.col("age") < recent_items))
    weights = np.power(0.5, recent["age"].to_numpy() / max(half_life, 1e-9)).astype(np.float32)
    recent_m = _csr(recent["u"].to_numpy(), recent["i"].to_numpy(), weights, shape)
    # Successive pairs of each user's time-ordered items (the sequence source learns from them).
    ordered = last.sort(["u", "timestamp", "tie", "i"])
    seq = np.stack([ordered["u"].to_numpy(), ordered["i"].to_numpy()], axis=1).astype(np.int64)
    return UserItemLog(np.asarray(user_ids, dtype=object), np.asarray(item_ids, dtype=object), matrix, recent_m,
                       seen, seq)


# -- sources -------------------------------------------------------------------------------


def _dense(rows: sp.csr_matrix) -> np.ndarray:
    return np.asarray(rows.toarray(), dtype=np.float32)


class EASE(Source):
    """Steck's EASE: B = I - P / diag(P), P = (X'X + lambda I)^-1; scores X_u B."""

    name = "ease"

    def __init__(self, lam: float = 200.0, recent: bool = False, tag_weight: float = 0.0,
                 tags: sp.csr_matrix | None = None) -> None:
        self.lam = float(lam)
        self.recent = recent
        self.name = "recent_ease" if recent else "ease"
        self.tag_weight, self.tags = float(tag_weight), tags

    def fit(self, log: UserItemLog) -> EASE:
        x = with_tags(log.matrix, self.tags, self.tag_weight)

        def weights() -> np.ndarray:
            gram = (x.T @ x).toarray().astype(np.float64)
            gram[np.diag_indices_from(gram)] += self.lam
            p = np.linalg.inv(gram)
            b = -p / np.diag(p)
            b[np.diag_indices_from(b)] = 0.0
            return b.astype(np.float32)

        # `ease` and `recent_ease` fit the same weights (they differ in the rows they score)
        # (and the same tags: keyed by the tag matrix's contents)
        tagged = x is not log.matrix
        key = ("ease", self.lam, self.tag_weight if tagged else 0.0,
               matrix_digest(self.tags) if tagged and self.tags is not None else None)
        self.b_ = derived_array(log, key, weights)
        return self

    def score(self, log: UserItemLog, users: np.ndarray) -> np.ndarray:
        rows = (log.recent if self.recent else log.matrix)[users]
        return np.asarray(rows @ self.b_, dtype=np.float32)

    def params(self) -> dict[str, Any]:
        return {"lam": self.lam, "recent": self.recent, "tag_weight": self.tag_weight}

    def state(self) -> dict[str, np.ndarray]:
        return {"b": self.b_}

    def restore(self, arrays: dict[str, np.ndarray]) -> EASE:
        self.b_ = arrays["b"]
        return self


class ItemKNN(Source):
    """Cosine item-item similarity with shrinkage, each item's `neighbours` strongest kept."""

    def __init__(self, neighbours: int = 100, shrink: float = 10.0, recent: bool = False, tag_weight: float = 0.0,
                 tags: sp.csr_matrix | None = None) -> None:
        self.neighbours = int(neighbours)
        self.shrink = float(shrink)
        self.recent = recent
        self.name = "recent_itemknn" if recent else "itemknn"
        self.tag_weight, self.tags = float(tag_weight), tags

    def fit(self, log: UserItemLog) -> ItemKNN:
        x = with_tags(log.matrix, self.tags, self.tag_weight)
        co = (x.T @ x).toarray().astype(np.float32)
        norms = np.sqrt(np.diag(co)).astype(np.float32)
        sim = co / (np.outer(norms, norms) + self.shrink + 1e-9)
        np.fill_diagonal(sim, 0.0)
        n = sim.shape[0]
        if self.neighbours < n:
            # Keep each column's strongest neighbours (what an item passes on to the others).
            cut = np.partition(sim, n - self.neighbours, axis=0)[n - self.neighbours]
            sim[sim < cut[None, :]] = 0.0
        self.sim_ = sim
        return self

    def score(self, log: UserItemLog, users: np.ndarray) -> np.ndarray:
        rows = (log.recent if self.recent else log.matrix)[users]
        return np.asarray(rows @ self.sim_, dtype=np.float32)

    def params(self) -> dict[str, Any]:
        return {"neighbours": self.neighbours, "shrink": self.shrink, "recent": self.recent,
                "tag_weight": self.tag_weight}

    def state(self) -> dict[str, np.ndarray]:
        return {"sim": self.sim_}

    def restore(self, arrays: dict[str, np.ndarray]) -> ItemKNN:
        self.sim_ = arrays["sim"]
        return self


class ALS(Source):
    """Implicit-feedback ALS (the `implicit` package), averaged over `seeds` seeded fits (steadier).

    With `tag_weight` > 0 and a `tags` matrix (tags x items, `tag_matrix`), each tag joins the
    fit as one more user who liked the items carrying it, at confidence `tag_weight`
    (collective factorisation of the log and the items' tags): items that share tags get
    nearby factors, and an item with tags but no interactions gets factors at all. The
    tags' own factors are dropped after the fit.

    Each fit runs on one thread (implicit's multi-threaded fit is not reproducible run to run);
    `threads` fits run side by side (0: one per core), which gives the same factors as one
    after another.
    """

    name = "als"

    def __init__(self, factors: int = 64, regularization: float = 0.05, iterations: int = 15, alpha: float = 10.0,
                 seed: int = 0, threads: int = 0, seeds: int = 6, tag_weight: float = 0.0,
                 tags: sp.csr_matrix | None = None, bm25: bool = False) -> None:
        self.factors, self.regularization, self.iterations = int(factors), float(regularization), int(iterations)
        self.alpha, self.seed, self.threads, self.seeds = float(alpha), int(seed), int(threads), int(seeds)
        self.tag_weight, self.tags, self.bm25 = float(tag_weight), tags, bool(bm25)

    def fit(self, log: UserItemLog, *, first: int | None = None) -> ALS:
        """Fit the `seeds` seeded models on `log`; with `first`, only the first `first` of them
        (a cheaper first look for a search, which `complete` turns into the full fit)."""
        self.fitted_seeds_ = 0
        self._partial: list[tuple[np.ndarray, np.ndarray]] = []  # each seed's factors, until every seed is in
        return self._add_seeds(log, self.seeds if first is None else min(int(first), self.seeds))

    def complete(self, log: UserItemLog) -> ALS:
        """The seeds `fit(log, first=...)` left out, fitted on the same `log`: the factors then
        equal those of `fit(log)` (each seed's fit is its own, single-threaded)."""
        return self._add_seeds(log, self.seeds - self.fitted_seeds_)

    def _add_seeds(self, log: UserItemLog, count: int) -> ALS:
        from implicit.cpu.als import AlternatingLeastSquares  # optional, heavy: imported when used
        from threadpoolctl import threadpool_limits

        def one(k: int) -> tuple[np.ndarray, np.ndarray]:
            with threadpool_limits(1, "blas"):  # where the BLAS keeps its thread count per thread
                model = AlternatingLeastSquares(factors=self.factors, regularization=self.regularization,
                                                iterations=self.iterations, alpha=self.alpha,
                                                random_state=self.seed + k, num_threads=1,
                                                calculate_training_loss=False)
                model.fit(matrix, show_progress=False)
            users = np.asarray(model.user_factors, dtype=np.float32)[:n_users]  # the tags' rows dropped
            return users, np.asarray(model.item_factors, dtype=np.float32)

        n_users = log.matrix.shape[0]
        matrix = with_tags(log.matrix, self.tags, self.tag_weight)
        if self.bm25:
            from implicit.nearest_neighbours import bm25_weight

            # Items as documents and users as terms (implicit's Last.fm recipe): a popular
            # item's rows and a heavy user's columns weigh less.
            matrix = sp.csr_matrix(bm25_weight(matrix.T, K1=100, B=0.8).T, dtype=np.float32)

        # No BLAS threads beside the fits: one limit around all of them (where the BLAS keeps
        # one count for the process, every fit's own limit then saves and restores 1, not a
        # count another fit set); implicit's fit releases the GIL, so the fits run at once.
        done = self.fitted_seeds_
        with threadpool_limits(1, "blas"):
            fits = self._partial + thread_map(one, range(done, done + count), self.threads)
        # The mean of the seeds' scores is one dot product of the stacked factors.
        self.users_ = np.hstack([f[0] for f in fits]) / np.float32(len(fits))
        self.items_ = np.hstack([f[1] for f in fits])
        self.fitted_seeds_ = len(fits)
        self._partial = fits if len(fits) < self.seeds else []
        return self

    def score(self, log: UserItemLog, users: np.ndarray) -> np.ndarray:
        return self.users_[users] @ self.items_.T

    def params(self) -> dict[str, Any]:
        return {"factors": self.factors, "regularization": self.regularization, "iterations": self.iterations,
                "alpha": self.alpha, "seed": self.seed, "seeds": self.seeds, "tag_weight": self.tag_weight,
                "bm25": self.bm25}

    def state(self) -> dict[str, np.ndarray]:
        return {"users": self.users_, "items": self.items_}

    def restore(self, arrays: dict[str, np.ndarray]) -> ALS:
        self.users_, self.items_ = arrays["users"], arrays["items"]
        self.fitted_seeds_, self._partial = self.seeds, []
        return self


class RP3beta(Source):
    """Random walks of three steps item -> user -> item, popularity-damped (Paudel et al. 2017):
    W = (P_iu^a P_ui^a) / pop_j^b, each item's `neighbours` strongest kept; scores X_u W."""

    name = "rp3beta"

    def __init__(self, alpha: float = 1.0, beta: float = 0.5, neighbours: int = 200, tag_weight: float = 0.0,
                 tags: sp.csr_matrix | None = None) -> None:
        self.alpha, self.beta, self.neighbours = float(alpha), float(beta), int(neighbours)
        self.tag_weight, self.tags = float(tag_weight), tags

    def fit(self, log: UserItemLog) -> RP3beta:
        x = with_tags(log.matrix, self.tags, self.tag_weight)
        p_ui = sp.diags(1.0 / np.maximum(np.asarray(x.sum(axis=1)).ravel(), 1.0)) @ x
        p_iu = sp.diags(1.0 / np.maximum(np.asarray(x.sum(axis=0)).ravel(), 1.0)) @ x.T.tocsr()
        if self.alpha != 1.0:
            p_ui, p_iu = p_ui.power(self.alpha), p_iu.power(self.alpha)
        w = (p_iu @ p_ui).toarray().astype(np.float32)
        pop = np.maximum(np.asarray(x.sum(axis=0)).ravel(), 1.0).astype(np.float32)
        w /= np.power(pop, self.beta)[None, :]
        np.fill_diagonal(w, 0.0)
        n = w.shape[0]
        if self.neighbours < n:
            cut = np.partition(w, n - self.neighbours, axis=1)[:, n - self.neighbours]
            w[w < cut[:, None]] = 0.0
        self.w_ = w
        return self

    def score(self, log: UserItemLog, users: np.ndarray) -> np.ndarray:
        return np.asarray(log.matrix[users] @ self.w_, dtype=np.float32)

    def params(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "beta": self.beta, "neighbours": self.neighbours, "tag_weight": self.tag_weight}

    def state(self) -> dict[str, np.ndarray]:
        return {"w": self.w_}

    def restore(self, arrays: dict[str, np.ndarray]) -> RP3beta:
        self.w_ = arrays["w"]
        return self


class Content(Source):
    """Item-item cosine of centred content embeddings (text by default), each item's `neighbours`
    closest kept; scored from the user's positives. Serves items without interactions too."""

    name = "content"

    def __init__(self, vectors: np.ndarray | None = None, neighbours: int = 50) -> None:
        self.vectors = vectors  # (n_items, d) aligned to the log's items; zero rows = no content
        self.neighbours = int(neighbours)

    def fit(self, log: UserItemLog) -> Content:
        v: np.ndarray = np.zeros((log.n_items, 1), np.float32) if self.vectors is None else self.vectors.astype(np.float32)
        present = np.abs(v).sum(axis=1) > 0
        if present.any():
            v = np.where(present[:, None], v - v[present].mean(axis=0), 0.0)  # centred: cosines mean something
        norms = np.linalg.norm(v, axis=1, keepdims=True)
        v = v / np.where(norms > 0, norms, 1.0)
        w = (v @ v.T).astype(np.float32)
        np.fill_diagonal(w, 0.0)
        n = w.shape[0]
        if self.neighbours < n:
            cut = np.partition(w, n - self.neighbours, axis=1)[:, n - self.neighbours]
            w[w < cut[:, None]] = 0.0
        self.w_ = np.maximum(w, 0.0)
        return self

    def score(self, log: UserItemLog, users: np.ndarray) -> np.ndarray:
        return np.asarray(log.matrix[users] @ self.w_, dtype=np.float32)

    def params(self) -> dict[str, Any]:
        return {"neighbours": self.neighbours}

    def state(self) -> dict[str, np.ndarray]:
        return {"w": self.w_}

    def restore(self, arrays: dict[str, np.ndarray]) -> Content:
        self.w_ = arrays["w"]
        return self


class Sequence(Source):
    """Items that follow each other in users' histories: W[i, j] sums decay ** (d - 1) over every
    user who had j within `window` steps after i, normalised like a cosine; scored from the
    user's recent items (what comes next after what they just did)."""

    name = "sequence"

    def __init__(self, window: int = 10, decay: float = 0.8) -> None:
        self.window, self.decay = int(window), float(decay)

    def fit(self, log: UserItemLog) -> Sequence:
        u, i = log.sequence[:, 0], log.sequence[:, 1]
        rows, cols, vals = [], [], []
        for d in range(1, self.window + 1):
            same = u[d:] == u[:-d]
            rows.append(i[:-d][same])
            cols.append(i[d:][same])
            vals.append(np.full(int(same.sum()), self.decay ** (d - 1), np.float32))
        n = log.n_items
        w = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n),
                          dtype=np.float32).toarray()
        count = np.bincount(i, minlength=n).astype(np.float32) + 1.0
        w /= np.sqrt(count[:, None] * count[None, :])
        np.fill_diagonal(w, 0.0)
        self.w_ = w
        return self

    def score(self, log: UserItemLog, users: np.ndarray) -> np.ndarray:
        return np.asarray(log.recent[users] @ self.w_, dtype=np.float32)

    def params(self) -> dict[str, Any]:
        return {"window": self.window, "decay": self.decay}

    def state(self) -> dict[str, np.ndarray]:
        return {"w": self.w_}

    def restore(self, arrays: dict[str, np.ndarray]) -> Sequence:
        self.w_ = arrays["w"]
        return self


def als_available() -> bool:
    try:
        import implicit  # noqa: F401
    except ImportError:
        return False
    return True


class Popular(Source):
    """Positive-evidence counts as a share of users: the same list for everyone."""

    name = "popular"

    def fit(self, log: UserItemLog) -> Popular:
        counts = np.asarray(log.matrix.sum(axis=0)).ravel()
        self.share_ = (counts / max(log.n_users, 1)).astype(np.float32)
        return self

    def score(self, log: UserItemLog, users: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.share_, (len(users), len(self.share_))).copy()

    def state(self) -> dict[str, np.ndarray]:
        return {"share": self.share_}

    def restore(self, arrays: dict[str, np.ndarray]) -> Popular:
        self.share_ = arrays["share"]
        return self


class SegmentPopular(Source):
    """Popularity among users who share an attribute value (age band, gender, occupation, ...).

    A user's score is the mean, over their attributes, of the item's positive share in that
    attribute's segment; users without attributes get overall popularity.
    """

    name = "segment_popular"

    def __init__(self, segments: np.ndarray | None = None) -> None:
        self.segments = segments  # (n_users, n_attributes) int codes, -1 = missing

    def fit(self, log: UserItemLog) -> SegmentPopular:
        seg = self._codes(log.n_users)
        x = log.matrix
        overall = np.asarray(x.sum(axis=0)).ravel() / max(log.n_users, 1)
        tables = []
        for j in range(seg.shape[1]):
            col = seg[:, j]
            n_codes = int(col.max()) + 1 if (col >= 0).any() else 0
            table = np.zeros((n_codes + 1, log.n_items), np.float32)
            if n_codes:
                member = _csr(np.where(col >= 0)[0], col[col >= 0], np.ones(int((col >= 0).sum()), np.float32),
                              (log.n_users, n_codes)).T.tocsr()
                sizes = np.asarray(member.sum(axis=1)).ravel()
                table[:n_codes] = (member @ x).toarray() / np.maximum(sizes, 1)[:, None]
            table[n_codes] = overall  # the row for "missing"
            tables.append(table)
        self.tables_ = tables
        self.overall_ = overall.astype(np.float32)
        return self

    def _codes(self, n_users: int) -> np.ndarray:
        if self.segments is None or self.segments.shape[1] == 0:
            return np.full((n_users, 0), -1, np.int64)
        return self.segments

    def score(self, log: UserItemLog, users: np.ndarray) -> np.ndarray:
        seg = self._codes(log.n_users)[users]
        if seg.shape[1] == 0:
            return np.broadcast_to(self.overall_, (len(users), len(self.overall_))).copy()
        out = np.zeros((len(users), len(self.overall_)), np.float32)
        for j, table in enumerate(self.tables_):
            codes = np.where(seg[:, j] >= 0, seg[:, j], table.shape[0] - 1)
            out += table[codes]
        return out / len(self.tables_)

    def state(self) -> dict[str, np.ndarray]:
        return {"segments": self._codes(0) if self.segments is None else self.segments, "overall": self.overall_,
                **{f"table{j}": t for j, t in enumerate(self.tables_)}}

    def restore(self, arrays: dict[str, np.ndarray]) -> SegmentPopular:
        self.segments = arrays["segments"]
        self.overall_ = arrays["overall"]
        self.tables_ = [arrays[f"table{j}"] for j in range(sum(k.startswith("table") for k in arrays))]
        return self



def numeric_strings(frame: pl.DataFrame) -> pl.DataFrame:
    """String columns whose every value reads as a number become Float64 (CSV readers often leave an
    `age` column as text). A column with a value written with a leading zero ("02139", "007") is a
    code, not a quantity (a zip code, a branch number): it stays text."""
    out = []
    for name, dtype in frame.schema.items():
        if dtype == pl.String:
            text = frame[name].str.strip_chars()
            parsed = text.cast(pl.Float64, strict=False)
            if parsed.null_count() == frame[name].null_count() and frame[name].drop_nulls().len() > 0 \
                    and not text.str.contains(r"^[+-]?0[0-9]").any():
                out.append(parsed.alias(name))
    return frame.with_columns(out) if out else frame


def user_segments(users: pl.DataFrame | None, user_ids: np.ndarray, max_levels: int = 50) -> tuple[np.ndarray, list[str]]:
    """Integer codes (n_users, n_attributes) of the users table's attribute columns; -1 where missing.

    Numeric columns are cut into quintile bands; string columns with at most `max_levels`
    values are taken as they are (a zip code is not a segment).
    """
    n = len(user_ids)
    if users is None or users.height == 0:
        return np.full((n, 0), -1, np.int64), []
    skip = {"user_id", "text", "image", "audio"}
    frame = pl.DataFrame({"user_id": np.asarray(user_ids).astype(str)}).join(
        users.with_columns(pl.col("user_id").cast(pl.String)), on="user_id", how="left", maintain_order="left")
    codes, names = [], []
    frame = numeric_strings(frame)
    for name, dtype in frame.schema.items():
        if name in skip:
            continue
        col = frame[name]
        if dtype.is_numeric():
            values = col.cast(pl.Float64)
            if values.drop_nulls().n_unique() < 2:
                continue
            known = values.drop_nulls().to_numpy()
            finite = known[np.isfinite(known)]  # +-inf: the top and bottom band (a quantile of them is nan)
            qs = np.unique(np.quantile(finite, [0.2, 0.4, 0.6, 0.8])) if finite.size else np.zeros(1)
            arr = values.to_numpy()
            code = np.where(np.isnan(arr), -1, np.searchsorted(qs, np.nan_to_num(arr), side="right"))
        elif dtype == pl.String or dtype == pl.Categorical:
            text = col.cast(pl.String)
            levels = sorted(text.drop_nulls().unique().to_list())
            if not 2 <= len(levels) <= max_levels:
                continue
            lookup = {v: j for j, v in enumerate(levels)}
            code = np.array([lookup.get(v, -1) if v is not None else -1 for v in text.to_list()], np.int64)
        else:
            continue
        codes.append(code.astype(np.int64))
        names.append(name)
    if not codes:
        return np.full((n, 0), -1, np.int64), []
    return np.stack(codes, axis=1), names


def item_tags(items: pl.DataFrame) -> pl.DataFrame:
    """(item code or id, tag) pairs from the `|`-separated tags column, trimmed, lower-case, unique."""
    key = "i" if "i" in items.columns else "item_id"
    return items.select(key, pl.col("tags").cast(pl.String).str.split("|").alias("tag")).explode("tag") \
        .with_columns(pl.col("tag").str.strip_chars().str.to_lowercase()) \
        .filter(pl.col("tag").is_not_null() & (pl.col("tag") != "")).unique()


# A tag whose items one user liked this large a share of is that user's own list ("my
# favourites", "seen live"), not a property of the items: as an extra user it would copy
# that user's history, and where tags were gathered later than the log (a public data set's
# tags, or a log replayed for evaluation) it carries the user's later items with it.
TAG_MAX_USER_SHARE = 0.5


def tag_matrix(items: pl.DataFrame | None, item_ids: np.ndarray, min_items: int = 5, *,
               interactions: pl.DataFrame | None = None, threshold: float | None = None,
               max_user_share: float = TAG_MAX_USER_SHARE) -> sp.csr_matrix | None:
    """The items' tags as a binary tags x items matrix over `item_ids` (columns in that order).

    Only tags on at least `min_items` of these items: a rarer tag links too few items to say
    anything. With `interactions`, also only tags no single user's positive evidence (at
    `threshold`) covers `max_user_share` or more of: such a tag is one user's own list
    (`TAG_MAX_USER_SHARE`). None where the items table has no `tags` column or no tag is left.
    """
    if items is None or "tags" not in items.columns:
        return None
    col = pl.DataFrame({"item_id": np.asarray(item_ids).astype(str), "i": np.arange(len(item_ids), dtype=np.int64)})
    pairs = item_tags(items.select(pl.col("item_id").cast(pl.String), "tags")).join(col, on="item_id")
    pairs = pairs.filter(pl.len().over("tag") >= min_items)
    if pairs.height == 0:
        return None
    codes = pairs.select("tag").unique().sort("tag").with_row_index("t")
    pairs = pairs.join(codes, on="tag")
    tags = _csr(pairs["t"].cast(pl.Int64).to_numpy(), pairs["i"].to_numpy(), np.ones(pairs.height, np.float32),
                (codes.height, len(item_ids)))
    if interactions is None or interactions.height == 0:
        return tags
    liked = interactions.filter(positive_mask(interactions, threshold)).select(
        pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String)).join(col, on="item_id").unique(
        ["user_id", "i"]).with_columns(pl.col("user_id").rank("dense").cast(pl.Int64).alias("u") - 1)
    if liked.height == 0:
        return tags
    x = _csr(liked["u"].to_numpy(), liked["i"].to_numpy(), np.ones(liked.height, np.float32),
             (int(liked["u"].max()) + 1, len(item_ids)))  # type: ignore[arg-type]
    # Each user's count of each tag's items (users x tags, sparse), its largest per tag.
    top = np.asarray((x @ tags.T).max(axis=0).toarray()).ravel()
    size = np.asarray(tags.sum(axis=1)).ravel()
    keep = np.flatnonzero(top < max_user_share * size)
    if len(keep) < tags.shape[0]:
        log.info("items' tags: %d of %d dropped as one user's own list (a user liked %.0f%% or more of "
                 "their items)", tags.shape[0] - len(keep), tags.shape[0], 100 * max_user_share)
    return tags[keep] if len(keep) else None


# The settings each source reads (`make_source`): a setting outside these is an error, not ignored.
SOURCE_SETTINGS: dict[str, frozenset[str]] = {
    "ease": frozenset({"lam", "tag_weight"}), "recent_ease": frozenset({"lam", "tag_weight"}),
    "itemknn": frozenset({"neighbours", "shrink", "tag_weight"}),
    "recent_itemknn": frozenset({"neighbours", "shrink", "tag_weight"}),
    "als": frozenset({"factors", "regularization", "iterations", "alpha", "seeds", "bm25", "tag_weight"}),
    "rp3beta": frozenset({"alpha", "beta", "neighbours", "tag_weight"}),
    "content": frozenset({"neighbours"}), "sequence": frozenset({"window", "decay"}),
    "gru": frozenset({"dim", "epochs", "dropout", "max_len", "lr", "batch_size", "weight_decay", "threads"}),
    "vae": frozenset({"epochs", "seeds", "tag_weight"}), "popular": frozenset(), "segment_popular": frozenset(),
}


def make_source(name: str, params: dict[str, Any] | None = None, *, segments: np.ndarray | None = None,
                seed: int = 0, content: np.ndarray | None = None, tags: sp.csr_matrix | None = None) -> Source:
    """The candidate source `name` with the settings in `params` (the others at their defaults).

    Raises ValueError for an unknown source or a setting it does not have (a misspelt key
    would otherwise fit the default silently).
    """
    params = dict(params or {})
    if name not in SOURCE_SETTINGS:
        raise ValueError(f"unknown candidate source {name!r}")
    unknown = sorted(set(params) - SOURCE_SETTINGS[name])
    if unknown:
        raise ValueError(f"candidate source {name!r} has no setting {', '.join(map(repr, unknown))} "
                         f"(its settings: {', '.join(sorted(SOURCE_SETTINGS[name])) or 'none'})")
    tagging = {"tag_weight": params.get("tag_weight", 0.0), "tags": tags}
    if name in ("ease", "recent_ease"):
        return EASE(lam=params.get("lam", 200.0), recent=name == "recent_ease", **tagging)
    if name in ("itemknn", "recent_itemknn"):
        return ItemKNN(neighbours=params.get("neighbours", 100), shrink=params.get("shrink", 10.0),
                       recent=name == "recent_itemknn", **tagging)
    if name == "als":
        return ALS(factors=params.get("factors", 64), regularization=params.get("regularization", 0.05),
                   iterations=params.get("iterations", 15), alpha=params.get("alpha", 10.0), seed=seed,
                   seeds=params.get("seeds", 6), bm25=params.get("bm25", False), **tagging)
    if name == "rp3beta":
        return RP3beta(alpha=params.get("alpha", 1.0), beta=params.get("beta", 0.5),
                       neighbours=params.get("neighbours", 200), **tagging)
    if name == "content":
        return Content(content, neighbours=params.get("neighbours", 50))
    if name == "sequence":
        return Sequence(window=params.get("window", 10), decay=params.get("decay", 0.8))
    if name == "gru":
        return GRUSequence(**params, seed=seed)
    if name == "vae":
        return MultVAE(epochs=params.get("epochs", 35), seeds=params.get("seeds", 3), seed=seed, **tagging)
    if name == "popular":
        return Popular()
    if name == "segment_popular":
        return SegmentPopular(segments)
    raise ValueError(f"unknown candidate source {name!r}")


# Settings with the items' tags as extra users (`with_tags`), tried where the items table has
# tags; one replaces the best setting without tags only with a clear gain (`candidates.tags_win`).
TAGGED_EASE = [{"lam": lam, "tag_weight": w} for lam in (100.0, 500.0) for w in (0.3, 1.0)]
TAGGED_KNN = [{"neighbours": n, "shrink": 10.0, "tag_weight": 1.0} for n in (50, 200)]

# Settings tried for each source on validation (the same small budget for every source).
SEARCH_GRID: dict[str, list[dict[str, Any]]] = {
    "ease": [{"lam": v} for v in (50.0, 100.0, 200.0, 500.0, 1000.0)] + TAGGED_EASE,
    "recent_ease": [{"lam": v} for v in (50.0, 100.0, 200.0, 500.0, 1000.0)] + TAGGED_EASE,
    "itemknn": [{"neighbours": n, "shrink": 10.0} for n in (20, 50, 100, 200, 400)] + TAGGED_KNN,
    "recent_itemknn": [{"neighbours": n, "shrink": 10.0} for n in (20, 50, 100, 200, 400)] + TAGGED_KNN,
    # Confidence weighting (alpha) and regularisation matter more than the factor count on
    # sparse logs: from light to heavy regularisation, three confidence levels, and at the
    # heavy end (where both data sets chose) 16 to 128 factors. Ten settings, not five: the
    # wider grid with six seeds raised validation NDCG@10 on both sets (docs/quality.md).
    "als": [{"factors": f, "regularization": r, "alpha": a} for f, r, a in
            ((32, 0.05, 1.0), (32, 5.0, 1.0), (32, 5.0, 10.0), (64, 20.0, 10.0), (32, 50.0, 20.0),
             (64, 50.0, 20.0), (32, 100.0, 40.0), (64, 100.0, 40.0), (128, 50.0, 20.0), (16, 50.0, 20.0))] + [
        # The items' tags as extra users (`ALS`, tried only where the items table has tags): four
        # settings near where both data sets chose, so the search stays within the ALS peer's 15.
        {"factors": f, "regularization": r, "alpha": a, "tag_weight": w} for f, r, a, w in
        ((64, 50.0, 20.0, 0.5), (64, 100.0, 40.0, 0.5), (128, 100.0, 40.0, 0.5), (128, 100.0, 40.0, 1.0))],
    "rp3beta": [{"alpha": a, "beta": b} for a, b in ((1.0, 0.3), (1.0, 0.5), (0.8, 0.5), (1.0, 0.7), (0.6, 0.3))] + [
        {"alpha": a, "beta": 0.5, "tag_weight": 1.0} for a in (1.0, 0.8)],
    # Mult-VAE overfits past about 50 epochs on both sets; with and without the tags as extra users.
    "vae": [{"epochs": e} for e in (35, 50)] + [{"epochs": e, "tag_weight": 1.0} for e in (35, 50)],
    "content": [{"neighbours": n} for n in (20, 50, 100, 200, 400)],
    "sequence": [{"window": w, "decay": d} for w in (3, 10) for d in (0.5, 0.8)],
    "gru": [{"dim": 64, "epochs": 10, "dropout": 0.2}, {"dim": 64, "epochs": 20, "dropout": 0.5}],
    "popular": [{}],
    "segment_popular": [{}],
}
