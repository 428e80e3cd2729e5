"""Non-personalised and neighbourhood baselines with the recommender interface.

``fit(train)`` takes an interactions frame; ``recommend(user_ids, k, exclude_seen=True)``
returns a recommendations frame ``user_id, rank, item_id, score``. Interactions are
binarised (a user either touched an item or not). Items are indexed in popularity order
(most training users first, then item id), and scores are sorted stably, so every score
tie - including the all-zero scores of a user without history - falls back to popularity.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import polars as pl
import scipy.sparse as sp

from fusionrec.pipeline.errors import InputError

_BATCH_CELLS = 4_000_000  # users x items scored at once: ~32 MB of float64


class MatrixRecommender:
    """Shared fit/recommend over a binary user x item CSR matrix.

    Subclasses (the baselines here, the peers in bench/peers.py) learn from
    ``user_items_`` in ``_fit_model`` and return dense scores in ``_scores``.
    """

    def fit(self, train: pl.DataFrame) -> MatrixRecommender:
        missing = [c for c in ("user_id", "item_id") if c not in train.columns]
        if missing:
            raise InputError(f"train interactions lack column {missing[0]}", field=missing[0])
        pairs = train.select(pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String)).unique()
        if pairs.height == 0:
            raise InputError("train interactions are empty")
        items = (pairs.group_by("item_id").agg(pl.len().cast(pl.Int64).alias("popularity"))
                 .sort(["popularity", "item_id"], descending=[True, False]).with_row_index("_i"))
        users = pairs.select("user_id").unique().sort("user_id").with_row_index("_u")
        coded = pairs.join(users, on="user_id").join(items.select("item_id", "_i"), on="item_id")
        self.item_ids_ = items["item_id"].to_numpy()
        self.popularity_ = items["popularity"].to_numpy().astype(np.float64)
        self.user_index_ = users.select("user_id", pl.col("_u").cast(pl.Int64))
        self.user_items_ = sp.csr_matrix(
            (np.ones(coded.height), (coded["_u"].to_numpy(), coded["_i"].to_numpy())),
            shape=(users.height, items.height))
        self._fit_model()
        return self

    def _fit_model(self) -> None:
        """Learn model state from ``self.user_items_``."""

    def _scores(self, rows: np.ndarray) -> np.ndarray:
        """Dense scores (len(rows) x n_items); row -1 is a user unseen in training."""
        raise NotImplementedError

    def recommend(self, user_ids: Iterable[str] | pl.Series | None = None, k: int = 10,
                  exclude_seen: bool = True) -> pl.DataFrame:
        """Top-``k`` per user (all training users when ``user_ids`` is None).

        Users unseen in training get the most popular items. A list is shorter than ``k``
        only when the user has seen nearly the whole catalog. Output follows the order of
        ``user_ids`` (first occurrence), then rank.
        """
        if not hasattr(self, "item_ids_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if user_ids is None:
            wanted = self.user_index_.select("user_id")
        else:
            wanted = pl.DataFrame({"user_id": pl.Series(list(user_ids), dtype=pl.String)}).unique(
                maintain_order=True)
        rows = (wanted.join(self.user_index_, on="user_id", how="left", maintain_order="left")
                ["_u"].fill_null(-1).to_numpy())
        n_items = self.item_ids_.size
        k = min(k, n_items)
        batch = max(1, _BATCH_CELLS // n_items)
        parts_u, parts_i, parts_s = [], [], []
        for start in range(0, rows.size, batch):
            r = rows[start:start + batch]
            scores = self._scores(r).astype(np.float64, copy=True)
            if exclude_seen:
                known = np.flatnonzero(r >= 0)
                seen = self.user_items_[r[known]].tocoo()
                scores[known[seen.row], seen.col] = -np.inf
            top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            top_scores = np.take_along_axis(scores, top, axis=1)
            keep = np.isfinite(top_scores)
            parts_u.append(np.broadcast_to(np.arange(start, start + r.size)[:, None], top.shape)[keep])
            parts_i.append(top[keep])
            parts_s.append(top_scores[keep])
        u = np.concatenate(parts_u) if parts_u else np.zeros(0, dtype=np.int64)
        out = pl.DataFrame({
            "_row": u,
            "item_id": pl.Series(self.item_ids_[np.concatenate(parts_i)] if parts_i else [], dtype=pl.String),
            "score": np.concatenate(parts_s) if parts_s else np.zeros(0),
        })
        users = wanted.with_row_index("_row").with_columns(pl.col("_row").cast(pl.Int64))
        return (out.with_columns(pl.col("_row").cast(pl.Int64))
                .join(users, on="_row", how="left", maintain_order="left")
                .with_columns(rank=pl.int_range(1, pl.len() + 1).over("_row").cast(pl.Int32))
                .select("user_id", "rank", "item_id", pl.col("score").cast(pl.Float64)))


class PopularityRecommender(MatrixRecommender):
    """Most popular unseen items; ``score`` is the item's number of training users."""

    def _scores(self, rows: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.popularity_, (rows.size, self.popularity_.size))


class ItemKNNRecommender(MatrixRecommender):
    """Item-item cosine kNN on the binarised interaction matrix.

    ``sim(i, j) = |U_i & U_j| / (sqrt(|U_i| |U_j|) + shrink)``; each item keeps its
    ``k_neighbors`` most similar items; a user's score for ``j`` is the sum of ``sim(i, j)``
    over the items ``i`` they interacted with whose neighbour list holds ``j``.
    """

    def __init__(self, k_neighbors: int = 50, shrink: float = 0.0) -> None:
        if k_neighbors < 1 or shrink < 0:
            raise ValueError(f"need k_neighbors >= 1 and shrink >= 0, got {k_neighbors}, {shrink}")
        self.k_neighbors = k_neighbors
        self.shrink = shrink

    def _fit_model(self) -> None:
        x = self.user_items_.tocsc()
        xt = x.T.tocsr()
        n = x.shape[1]
        norms = np.sqrt(np.asarray(x.sum(axis=0)).ravel())
        keep = min(self.k_neighbors, max(n - 1, 1))
        block = max(1, _BATCH_CELLS // n)
        rows, cols, vals = [], [], []
        for start in range(0, n, block):  # dense blocks of the item x item product
            stop = min(start + block, n)
            co = (xt[start:stop] @ x).toarray()
            sim = co / (norms[start:stop, None] * norms[None, :] + self.shrink)
            sim[np.arange(stop - start), np.arange(start, stop)] = 0.0
            # Stable sort: equal similarities keep the more popular neighbour, deterministically.
            nb = np.argsort(-sim, axis=1, kind="stable")[:, :keep]
            v = np.take_along_axis(sim, nb, axis=1)
            rows.append(np.repeat(np.arange(start, stop), nb.shape[1]))
            cols.append(nb.ravel())
            vals.append(v.ravel())
        sim = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
        sim.eliminate_zeros()
        self.similarity_ = sim

    def _scores(self, rows: np.ndarray) -> np.ndarray:
        out = np.zeros((rows.size, self.item_ids_.size))
        known = np.flatnonzero(rows >= 0)
        if known.size:
            out[known] = (self.user_items_[rows[known]] @ self.similarity_).toarray()
        return out
