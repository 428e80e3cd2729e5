"""Retrieval for a fitted Retriever: the FAISS fetch, the exact re-scoring and the cold quota.

FAISS fetches each user's best items by the index inner product (seen items filtered, rows
searched deeper until k remain), and the fetched items are re-scored with the exact fused
score (pipeline.retrieval.fusion). `cold_share` of the k places is kept for the best items
without interactions, from an exact index of those items, because a popularity or behaviour
weight would otherwise keep new items out of every list.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np
import polars as pl
import scipy.sparse as sp

from fusionrec.pipeline.retrieval import faiss_index as fidx
from fusionrec.pipeline.retrieval.fusion import Blocks, fused_score, item_matrix, query_matrix
from fusionrec.pipeline.retrieval.params import RetrieverParams
from fusionrec.pipeline.retrieval.profiles import BEHAVIOUR


@dataclass(frozen=True)
class ColdIndex:
    """Exact index over the items without interactions; rows maps its ids to item rows."""

    index: faiss.Index
    rows: np.ndarray


def cold_index(items: Blocks, modalities: tuple[str, ...], weights: np.ndarray) -> ColdIndex | None:
    """The exact index of the items that lack the behaviour modality (None: no such items)."""
    if BEHAVIOUR not in modalities:
        return None
    rows = np.flatnonzero(~items.mask[:, modalities.index(BEHAVIOUR)] & items.mask.any(axis=1))
    if len(rows) == 0:
        return None
    x = item_matrix(items.take(rows), weights)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    return ColdIndex(index, rows)


def gather_sims(user: Blocks, urows: np.ndarray, items: Blocks, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-modality cosines (B, K, M) of users urows with their candidate items cand (B, K)."""
    b, k = cand.shape
    chunk = max(1, 32_768 // max(k, 1))  # bounds the gathered (chunk, K, d) block
    m = len(items.names)
    sims = np.zeros((b, k, m), dtype=np.float32)
    safe = np.maximum(cand, 0)
    for j in range(m):
        um, im = user.mats[j], items.mats[j]
        if um.shape[1] == 0:
            continue
        for s in range(0, b, chunk):
            sims[s:s + chunk, :, j] = np.einsum("bd,bkd->bk", um[urows[s:s + chunk]], im[safe[s:s + chunk]])
    avail = user.mask[urows][:, None, :] & items.mask[safe] & (cand >= 0)[:, :, None]
    return sims, avail


def row_isin(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a[i, j] in b[i, :] (ignoring -1), row by row, for small b."""
    return ((a[:, :, None] == b[:, None, :]) & (b[:, None, :] >= 0)).any(axis=2)


def in_csr(rows_csr: sp.csr_matrix, cand: np.ndarray) -> np.ndarray:
    """Whether cand[b, j] is a stored column of row b of rows_csr (vectorised membership)."""
    n_cols = rows_csr.shape[1]
    counts = np.diff(rows_csr.indptr)
    keys = np.repeat(np.arange(rows_csr.shape[0], dtype=np.int64), counts) * n_cols + rows_csr.indices
    if len(keys) == 0:
        return np.zeros(cand.shape, dtype=bool)
    q = np.arange(cand.shape[0], dtype=np.int64)[:, None] * n_cols + np.maximum(cand, 0)
    pos = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
    return (keys[pos] == q) & (cand >= 0)


def top_exact(ub: Blocks, rows: np.ndarray, weights: np.ndarray, items: Blocks, cand: np.ndarray, k: int
              ) -> np.ndarray:
    """The k best of cand (B, K) by the exact fused score, best first (-1 padded)."""
    sims, avail = gather_sims(ub, rows, items, cand)
    score = fused_score(sims, avail, weights[rows][:, None, :])
    score = np.where((cand < 0) | np.isnan(score), -np.inf, score)
    order = np.argsort(-score, axis=1, kind="stable")[:, :k]
    return np.where(np.isfinite(np.take_along_axis(score, order, axis=1)),
                    np.take_along_axis(cand, order, axis=1), -1)


def fetch(index: faiss.Index, id_map: np.ndarray | None, q: np.ndarray, seen_rows: sp.csr_matrix | None,
          kf: int, n_items: int) -> np.ndarray:
    """FAISS top-kf item rows per query with seen items removed, re-searching short rows deeper.
    id_map maps the index's ids to item rows (None: they are item rows)."""
    n_seen = np.diff(seen_rows.indptr) if seen_rows is not None else np.zeros(len(q), dtype=int)
    depth = int(min(n_items, kf + (np.quantile(n_seen, 0.9) if len(n_seen) else 0)))
    out = np.full((len(q), kf), -1, dtype=np.int64)
    todo = np.arange(len(q))
    while len(todo):
        _, ids = fidx.search(index, q[todo], depth)
        if id_map is not None:
            ids = np.where(ids >= 0, id_map[np.maximum(ids, 0)], -1)
        ok = ids >= 0
        if seen_rows is not None:
            ok &= ~in_csr(seen_rows[todo], ids)
        order = np.argsort(~ok, axis=1, kind="stable")[:, :kf]
        got = np.take_along_axis(np.where(ok, ids, -1), order, axis=1)
        out[todo, :got.shape[1]] = got
        short = (ok.sum(axis=1) < kf) & (depth < n_items)
        todo, depth = todo[short], int(min(n_items, depth * 2))
    return out


def feature_columns(modalities: tuple[str, ...], sims: np.ndarray, avail: np.ndarray, weights: np.ndarray
                    ) -> list[pl.Series]:
    """sim_<modality> (null where a side lacks it) and attn_<modality> columns."""
    cols = []
    for j, name in enumerate(modalities):
        cols.append(pl.Series(f"sim_{name}", np.where(avail[:, j], sims[:, j], np.nan).astype(np.float32),
                              dtype=pl.Float32).fill_nan(None))
    for j, name in enumerate(modalities):
        cols.append(pl.Series(f"attn_{name}", weights[:, j].astype(np.float32), dtype=pl.Float32))
    return cols


def empty_frame(modalities: tuple[str, ...]) -> pl.DataFrame:
    schema = {"user_id": pl.Utf8, "item_id": pl.Utf8, "retrieval_rank": pl.Int32, "retrieval_score": pl.Float32}
    schema.update({f"sim_{m}": pl.Float32 for m in modalities})
    schema.update({f"attn_{m}": pl.Float32 for m in modalities})
    return pl.DataFrame(schema=schema)


def retrieve(params: RetrieverParams, index: faiss.Index, search_params: dict[str, int], items: Blocks,
             modalities: tuple[str, ...], cold: ColdIndex | None, ub: Blocks, weights: np.ndarray,
             seen: sp.csr_matrix | None, k: int, batch: int = 4096) -> pl.DataFrame:
    """Top-k per user row of ub by the exact fused score (FAISS fetch, seen filter, re-score).

    With cold_share > 0, that share of the k places is kept for the best items without
    interactions (from their own exact index), so that new items reach the ranker.
    """
    fidx.set_threads(params.n_threads)
    fidx.set_search_params(index, search_params)
    n_items = len(items.ids)
    k = int(min(k, n_items))
    item_full = bool(items.mask.all())
    if params.cold_share <= 0:
        cold = None
    n_cold = min(int(round(k * params.cold_share)), len(cold.rows)) if cold is not None else 0
    frames = []
    for s in range(0, len(ub.ids), batch):
        rows = np.arange(s, min(s + batch, len(ub.ids)))
        active = rows[ub.mask[rows].any(axis=1)]
        if len(active) == 0:
            continue
        exact_ip = item_full or (params.fusion != "attention" and bool(ub.mask[active].all()))
        kf = int(min(n_items, k if exact_ip else math.ceil(k * params.overfetch)))
        q = query_matrix(ub.take(active), weights[active])
        srows = seen[active] if seen is not None else None
        cand = top_exact(ub, active, weights, items, fetch(index, None, q, srows, kf, n_items), k)
        if n_cold and cold is not None:
            ccand = fetch(cold.index, cold.rows, q, srows, min(len(cold.rows), math.ceil(n_cold * params.overfetch)),
                          len(cold.rows))
            ccand = top_exact(ub, active, weights, items, ccand, n_cold)
            # cold picks first, then the main list without them, cut to k; then order by score
            merged = np.hstack([ccand, np.where(row_isin(cand, ccand), -1, cand)])
            take = np.argsort(merged < 0, axis=1, kind="stable")[:, :k]
            cand = top_exact(ub, active, weights, items, np.take_along_axis(merged, take, axis=1), k)
        sims, avail = gather_sims(ub, active, items, cand)
        score = fused_score(sims, avail, weights[active][:, None, :])
        bi, ki = np.nonzero(cand >= 0)
        cols = {"user_id": ub.ids[active][bi].astype(str), "item_id": items.ids[cand[bi, ki]].astype(str),
                "retrieval_rank": (ki + 1).astype(np.int32), "retrieval_score": score[bi, ki].astype(np.float32)}
        frame = pl.DataFrame(cols, schema={"user_id": pl.Utf8, "item_id": pl.Utf8, "retrieval_rank": pl.Int32,
                                           "retrieval_score": pl.Float32})
        frames.append(frame.with_columns(feature_columns(modalities, sims[bi, ki], avail[bi, ki],
                                                         weights[active][bi])))
    if not frames:
        return empty_frame(modalities)
    return pl.concat(frames)
