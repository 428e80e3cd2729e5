"""Synthetic ranked candidates, items, vectors and a log for the rerank tests."""

from __future__ import annotations

import numpy as np
import polars as pl

from fusionrec.ranker.rerank import RerankInputs


def make_case(n_users: int = 40, n_items: int = 80, per_user: int = 30, seed: int = 0
              ) -> tuple[pl.DataFrame, RerankInputs]:
    rng = np.random.default_rng(seed)
    items = [f"i{j:03d}" for j in range(n_items)]
    genres = ["action", "comedy", "drama", "horror", "romance"]
    table = pl.DataFrame({
        "item_id": items,
        "tags": ["|".join(sorted({genres[j % 5], genres[(j // 5) % 5]})) for j in range(n_items)],
        "brand": [f"b{j % 7}" for j in range(n_items)],
        "in_stock": [j % 11 != 3 for j in range(n_items)],
    })
    cluster = np.arange(n_items) % 4
    vectors = rng.normal(size=(4, 16))[cluster] + 0.4 * rng.normal(size=(n_items, 16))
    # Popularity falls with the item number: the low numbers are the head.
    weights = 1.0 / (1 + np.arange(n_items)) ** 0.8
    rows, log = [], []
    for u in range(n_users):
        user = f"u{u:02d}"
        picks = rng.choice(n_items, size=per_user, replace=False, p=weights / weights.sum())
        scores = np.sort(rng.normal(size=per_user))[::-1] + 0.001 * np.arange(per_user)[::-1]
        rows += [(user, items[j], float(s), float(s) * 2) for j, s in zip(picks, scores, strict=True)]
        had = rng.choice(n_items, size=8, replace=False, p=weights / weights.sum())
        log += [(user, items[j]) for j in had]
    cands = pl.DataFrame(rows, schema={"user_id": pl.String, "item_id": pl.String, "score": pl.Float64,
                                       "retrieval_score": pl.Float32}, orient="row")
    cands = cands.sort(["user_id", "score"], descending=[False, True]).with_columns(
        (pl.int_range(pl.len()).over("user_id") + 1).cast(pl.Int32).alias("rank"))
    history = pl.DataFrame(log, schema={"user_id": pl.String, "item_id": pl.String}, orient="row")
    return cands, RerankInputs(items=table, vectors=(items, vectors.astype(np.float32)), history=history,
                               n_items=n_items)
