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
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp

log = logging.getLogger("fusionrec.sources")

SOURCE_NAMES = ("ease", "itemknn", "recent_ease", "recent_itemknn", "als", "popular", "segment_popular")


@dataclass(frozen=True)
class UserItemLog:
    """Positive evidence as a users x items matrix, plus each user's recency-weighted recent items.

    `matrix[u, i]` is 1 where user u showed positive evidence for item i (a rating at or
    above the relevance threshold, or any event where there are no ratings); `recent[u, i]`
    weighs the user's last `recent_items` positive items by 0.5 ** (age rank / half-life).
    """

    user_ids: np.ndarray
    item_ids: np.ndarray
    matrix: sp.csr_matrix
    recent: sp.csr_matrix
    seen: sp.csr_matrix  # every interaction, negative ones included (excluded from lists)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)


def relevance_threshold(interactions: pl.DataFrame, setting: float) -> float | None:
    """The rating at or above which an interaction is positive; None when `value` is no rating scale.

    `setting` > 0 is taken as it is; 0 means auto: 0.75 of the way up an integer scale
    (4 on 1-5, 8 on 1-10).
    """
    if "value" not in interactions.columns:
        return None
    values = interactions["value"].drop_nulls()
    if values.len() == 0 or not bool((values == values.round()).all()):
        return None
    lo, hi = float(values.min()), float(values.max())
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
              threshold: float | None, recent_items: int = 20, half_life: float = 5.0) -> UserItemLog:
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
    # Each user's most recent positive items, newest first (ties: item order, so seeded by ids).
    recent = (pos.sort(["u", "timestamp", "i"], descending=[False, True, True])
              .with_columns(pl.int_range(pl.len()).over("u").alias("age"))
              .filter(pl.col("age") < recent_items))
    weights = np.power(0.5, recent["age"].to_numpy() / max(half_life, 1e-9)).astype(np.float32)
    recent_m = _csr(recent["u"].to_numpy(), recent["i"].to_numpy(), weights, shape)
    return UserItemLog(np.asarray(user_ids, dtype=object), np.asarray(item_ids, dtype=object), matrix, recent_m,
                       seen)


def _csr(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    return sp.csr_matrix((vals, (rows.astype(np.int64), cols.astype(np.int64))), shape=shape, dtype=np.float32)


# -- sources -------------------------------------------------------------------------------


class Source:
    """One candidate source: `fit` on a log, `score` users (rows of that log) against every item."""

    name: str = ""

    def fit(self, log: UserItemLog) -> Source:
        raise NotImplementedError

    def score(self, log: UserItemLog, users: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        return {}

    def state(self) -> dict[str, np.ndarray]:
        """Arrays that, with `params`, restore the fitted source (`restore`)."""
        return {}

    def restore(self, arrays: dict[str, np.ndarray]) -> Source:
        return self


def _dense(rows: sp.csr_matrix) -> np.ndarray:
    return np.asarray(rows.toarray(), dtype=np.float32)


class EASE(Source):
    """Steck's EASE: B = I - P / diag(P), P = (X'X + lambda I)^-1; scores X_u B."""

    name = "ease"

    def __init__(self, lam: float = 200.0, recent: bool = False) -> None:
        self.lam = float(lam)
        self.recent = recent
        self.name = "recent_ease" if recent else "ease"

    def fit(self, log: UserItemLog) -> EASE:
        x = log.matrix
        gram = (x.T @ x).toarray().astype(np.float64)
        gram[np.diag_indices_from(gram)] += self.lam
        p = np.linalg.inv(gram)
        b = -p / np.diag(p)
        b[np.diag_indices_from(b)] = 0.0
        self.b_ = b.astype(np.float32)
        return self

    def score(self, log: UserItemLog, users: np.ndarray) -> np.ndarray:
        rows = (log.recent if self.recent else log.matrix)[users]
        return np.asarray(rows @ self.b_, dtype=np.float32)

    def params(self) -> dict[str, Any]:
        return {"lam": self.lam, "recent": self.recent}

    def state(self) -> dict[str, np.ndarray]:
        return {"b": self.b_}

    def restore(self, arrays: dict[str, np.ndarray]) -> EASE:
        self.b_ = arrays["b"]
        return self


class ItemKNN(Source):
    """Cosine item-item similarity with shrinkage, each item's `neighbours` strongest kept."""

    def __init__(self, neighbours: int = 100, shrink: float = 10.0, recent: bool = False) -> None:
        self.neighbours = int(neighbours)
        self.shrink = float(shrink)
        self.recent = recent
        self.name = "recent_itemknn" if recent else "itemknn"

    def fit(self, log: UserItemLog) -> ItemKNN:
        x = log.matrix
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
        return {"neighbours": self.neighbours, "shrink": self.shrink, "recent": self.recent}

    def state(self) -> dict[str, np.ndarray]:
        return {"sim": self.sim_}

    def restore(self, arrays: dict[str, np.ndarray]) -> ItemKNN:
        self.sim_ = arrays["sim"]
        return self


class ALS(Source):
    """Implicit-feedback ALS (the `implicit` package), seeded and single-threaded per the config."""

    name = "als"

    def __init__(self, factors: int = 64, regularization: float = 0.05, iterations: int = 15, alpha: float = 10.0,
                 seed: int = 0, threads: int = 0) -> None:
        self.factors, self.regularization, self.iterations = int(factors), float(regularization), int(iterations)
        self.alpha, self.seed, self.threads = float(alpha), int(seed), int(threads)

    def fit(self, log: UserItemLog) -> ALS:
        from implicit.cpu.als import AlternatingLeastSquares  # optional, heavy: imported when used
        from threadpoolctl import threadpool_limits

        model = AlternatingLeastSquares(factors=self.factors, regularization=self.regularization,
                                        iterations=self.iterations, alpha=self.alpha, random_state=self.seed,
                                        num_threads=self.threads, calculate_training_loss=False)
        with threadpool_limits(1, "blas"):  # implicit's own threads do the work; BLAS threads would fight them
            model.fit(log.matrix, show_progress=False)
        self.users_ = np.asarray(model.user_factors, dtype=np.float32)
        self.items_ = np.asarray(model.item_factors, dtype=np.float32)
        return self

    def score(self, log: UserItemLog, users: np.ndarray) -> np.ndarray:
        return self.users_[users] @ self.items_.T

    def params(self) -> dict[str, Any]:
        return {"factors": self.factors, "regularization": self.regularization, "iterations": self.iterations,
                "alpha": self.alpha, "seed": self.seed}

    def state(self) -> dict[str, np.ndarray]:
        return {"users": self.users_, "items": self.items_}

    def restore(self, arrays: dict[str, np.ndarray]) -> ALS:
        self.users_, self.items_ = arrays["users"], arrays["items"]
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
    for name, dtype in frame.schema.items():
        if name in skip:
            continue
        col = frame[name]
        if dtype.is_numeric():
            values = col.cast(pl.Float64)
            if values.drop_nulls().n_unique() < 2:
                continue
            qs = np.unique(np.nanquantile(values.drop_nulls().to_numpy(), [0.2, 0.4, 0.6, 0.8]))
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


def make_source(name: str, params: dict[str, Any] | None = None, *, segments: np.ndarray | None = None,
                seed: int = 0) -> Source:
    params = dict(params or {})
    if name in ("ease", "recent_ease"):
        return EASE(lam=params.get("lam", 200.0), recent=name == "recent_ease")
    if name in ("itemknn", "recent_itemknn"):
        return ItemKNN(neighbours=params.get("neighbours", 100), shrink=params.get("shrink", 10.0),
                       recent=name == "recent_itemknn")
    if name == "als":
        return ALS(factors=params.get("factors", 64), regularization=params.get("regularization", 0.05),
                   iterations=params.get("iterations", 15), alpha=params.get("alpha", 10.0), seed=seed)
    if name == "popular":
        return Popular()
    if name == "segment_popular":
        return SegmentPopular(segments)
    raise ValueError(f"unknown candidate source {name!r}")


# Settings tried for each source on validation (the same small budget for every source).
SEARCH_GRID: dict[str, list[dict[str, Any]]] = {
    "ease": [{"lam": v} for v in (50.0, 100.0, 200.0, 500.0, 1000.0)],
    "recent_ease": [{"lam": v} for v in (50.0, 100.0, 200.0, 500.0, 1000.0)],
    "itemknn": [{"neighbours": n, "shrink": 10.0} for n in (20, 50, 100, 200, 400)],
    "recent_itemknn": [{"neighbours": n, "shrink": 10.0} for n in (20, 50, 100, 200, 400)],
    "als": [{"factors": f, "regularization": r} for f in (32, 64, 128) for r in (0.05, 0.5)][:5],
    "popular": [{}],
    "segment_popular": [{}],
}
