"""The Retriever's weight search on a temporal hold-out.

The last `validation_fraction` of the interactions by time are held out
(`pipeline.splits.global_temporal_split`, the split the evaluation uses: equal timestamps in
seeded order); profiles, behaviour and popularity are rebuilt from the rest, and weight
vectors on the simplex (each weight >= min_weight, so content alone can always reach a cold
item) are scored by recall@n_candidates of the held-out new items of up to
validation_max_users users: a coarse grid, then a pattern search
(pipeline.retrieval.fusion.search_simplex). Attention fusion then picks its temperature beta
from beta_grid the same way (beta = 0 is weighted fusion, so attention is never worse on the
hold-out).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp

from fusionrec.pipeline.errors import ConfigError
from fusionrec.pipeline.retrieval import faiss_index as fidx
from fusionrec.pipeline.retrieval.fetch import gather_sims, in_csr
from fusionrec.pipeline.retrieval.fusion import Blocks, attention_weights, search_simplex
from fusionrec.pipeline.retrieval.inputs import MODALITIES, user_universe
from fusionrec.pipeline.retrieval.params import RetrieverParams
from fusionrec.pipeline.retrieval.profiles import interaction_matrix, item_blocks, user_state
from fusionrec.pipeline.splits import global_temporal_split
from fusionrec.pipeline.threads import thread_map

log = logging.getLogger("fusionrec.retrieval")

_DENSE_VALIDATION_MAX_ITEMS = 50_000
_CACHE_BYTES = 256 << 20  # the hold-out's per-chunk arrays kept between a search's recall calls


@dataclass
class WeightChoice:
    """What the search chose: global weights, attention beta, hold-out recall and its record."""

    weights: dict[str, float]
    attention_beta: float
    validation_recall: float | None
    record: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _HoldOut:
    """Profiles from the training part and each sampled user's held-out new items."""

    users: Blocks
    kappa: np.ndarray
    items: Blocks
    seen: sp.csr_matrix
    rel: sp.csr_matrix
    n_rel: np.ndarray
    rows: np.ndarray
    # Per chunk of rows, what every weight set's recall reads (the similarities, where they
    # exist, the blocked and relevant cells), kept between `_recall` calls while they fit
    # `_CACHE_BYTES`: a search scores a few hundred weight sets in a dozen calls on the same users.
    chunks: dict[tuple[int, int], tuple[np.ndarray, ...]] = field(default_factory=dict, compare=False, repr=False)


def validation_split(interactions: pl.DataFrame, fraction: float, seed: int = 0
                     ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The weight search's hold-out: `pipeline.splits.global_temporal_split` (the latest
    round(fraction * n) interactions, equal timestamps in seeded order); fraction <= 0 or no
    interactions hold out nothing."""
    if interactions.height == 0 or fraction <= 0:
        return interactions, interactions.clear()
    return global_temporal_split(interactions, fraction, seed=seed)


def weight_vector(weights: dict[str, float], modalities: tuple[str, ...]) -> np.ndarray:
    return np.array([weights.get(m, 0.0) for m in modalities], dtype=np.float64)


def fixed_weights(params: RetrieverParams, modalities: tuple[str, ...]) -> dict[str, float] | None:
    """Concat's equal weights or the given weights normalised; None when they are to be searched."""
    if params.fusion == "concat":
        return {m: 1.0 / len(modalities) for m in modalities}
    if params.weights is None:
        return None
    # A name no modality has (a typo such as "txt", or a modality this catalog lacks) is said, not
    # silently dropped: the weights it was meant to change would otherwise look applied.
    unknown = sorted(set(params.weights) - set(modalities))
    w = {m: max(float(params.weights.get(m, 0.0)), 0.0) for m in modalities}
    total = sum(w.values())
    if total <= 0:
        hint = f"; not a modality here: {', '.join(unknown)}" if unknown else ""
        raise ConfigError("config key 'fusion.weights': fixed fusion weights give no weight to any modality "
                          f"present ({', '.join(modalities)}){hint}")
    if unknown:
        log.warning("config key 'fusion.weights' names %s, which no modality of this catalog has (modalities: %s): "
                    "ignored", ", ".join(unknown), ", ".join(modalities))
    return {m: v / total for m, v in w.items()}


class WeightSearch:
    """One search: the parameters, the fitted modalities and the content blocks it works on."""

    def __init__(self, params: RetrieverParams, modalities: tuple[str, ...], item_ids: np.ndarray,
                 modality_means: dict[str, np.ndarray]) -> None:
        self.params = params
        self.modalities = modalities
        self.item_ids = item_ids
        self.modality_means = modality_means

    def choose(self, cblocks: Blocks, inter: pl.DataFrame, user_content: MODALITIES, *,
               held_out: pl.DataFrame | None = None) -> WeightChoice:
        """Weights and attention beta, searched on the hold-out where the parameters leave them open.

        held_out: the later interactions to score on (`inter` is then the training part);
        None carves the temporal hold-out of `validation_fraction` from `inter`.
        """
        p, names = self.params, self.modalities
        fixed = fixed_weights(p, names)
        need_beta = p.fusion == "attention" and p.attention_beta is None
        beta = float(p.attention_beta) if p.attention_beta is not None else 0.0
        if held_out is None:
            record: dict[str, Any] = {"fraction": p.validation_fraction}
            train, valid = validation_split(inter, p.validation_fraction, p.seed)
        else:
            record = {"hold_out": "given (the ranker's label split)"}
            known = pl.Series(self.item_ids.astype(str)).implode()
            train, valid = inter, held_out.filter(pl.col("item_id").is_in(known))
        ev = self._hold_out(cblocks, train, valid, user_content) if valid.height and train.height else None
        if ev is None:
            record["skipped"] = "no temporal hold-out with users seen before it"
            return WeightChoice(fixed or {m: 1.0 / len(names) for m in names}, beta, None, record)
        rows = ev.rows
        record.update(n_users=int(len(rows)), n_train=train.height, n_heldout=valid.height, k=int(p.n_candidates))
        m = len(names)
        if fixed is None:
            def evaluate(ws: np.ndarray) -> np.ndarray:
                return np.array(self._recall(ev, list(ws)))

            found = search_simplex(evaluate, m, floor=p.min_weight, seed=p.seed)
            weights = dict(zip(names, map(float, found["weights"])))
            extra = evaluate(np.vstack([np.eye(m), np.full((1, m), 1.0 / m)]))
            record.update(search_evaluations=found["evaluations"], search_best_recall=found["score"],
                          single_modality_recall=dict(zip(names, map(float, extra[:m]))),
                          equal_weights_recall=float(extra[m]))
        else:
            weights = fixed
        w = weight_vector(weights, names)
        if need_beta:
            sets = [attention_weights(w, ev.kappa[rows], ev.users.mask[rows], b) for b in p.beta_grid]
            recalls = self._recall(ev, sets)
            beta = float(p.beta_grid[int(np.argmax(recalls))])
            record["beta_recall"] = {str(b): float(r) for b, r in zip(p.beta_grid, recalls)}
        chosen = attention_weights(w, ev.kappa[rows], ev.users.mask[rows], beta) if p.fusion == "attention" else w
        recall = float(self._recall(ev, [chosen])[0])
        record["recall"] = recall
        return WeightChoice(weights, beta, recall, record)

    def _hold_out(self, cblocks: Blocks, train: pl.DataFrame, valid: pl.DataFrame, user_content: MODALITIES
                  ) -> _HoldOut | None:
        """Profiles from the training part, and each sampled user's held-out new items."""
        p = self.params
        items = item_blocks(cblocks, train, self.modalities, half_life_days=p.half_life_days,
                            event_weights=p.event_weights, behaviour_dim=p.behaviour_dim, seed=p.seed)
        users = user_universe(train, user_content)
        im = interaction_matrix(train, self.item_ids, half_life_days=p.half_life_days,
                                event_weights=p.event_weights, user_ids=users)
        vm = interaction_matrix(valid, self.item_ids, half_life_days=None, user_ids=users)
        rel = (vm.seen.astype(np.int8) - vm.seen.multiply(im.seen).astype(np.int8)).tocsr()
        rel.eliminate_zeros()
        rel.sort_indices()
        n_rel = np.diff(rel.indptr)
        ub, kappa, _ = user_state(im, items, user_content, None, modality_means=self.modality_means,
                                  content_strength=p.content_strength)
        rows = np.flatnonzero((n_rel > 0) & ub.mask.any(axis=1))
        if len(rows) == 0:
            return None
        if len(rows) > p.validation_max_users:
            rows = np.sort(np.random.default_rng(p.seed).choice(rows, p.validation_max_users, replace=False))
        return _HoldOut(ub, kappa, items, im.seen, rel, n_rel, rows)

    def _recall(self, ev: _HoldOut, weight_sets: list[np.ndarray], chunk: int = 64) -> list[float]:
        """recall@n_candidates of each weight set (global (M,) or per validation user (R, M))."""
        ub, items, seen, rel, n_rel, rows = ev.users, ev.items, ev.seen, ev.rel, ev.n_rel, ev.rows
        n_items = len(items.ids)
        k = int(min(self.params.n_candidates, n_items))
        glob = [g for g, w in enumerate(weight_sets) if w.ndim == 1]
        per_user = [g for g, w in enumerate(weight_sets) if w.ndim == 2]
        wglob = np.array([weight_sets[g] for g in glob], dtype=np.float32).reshape(len(glob), len(items.names))
        dense = n_items <= _DENSE_VALIDATION_MAX_ITEMS
        cached = any(size == chunk for size, _ in ev.chunks)  # every chunk's arrays, from an earlier call
        pool = None if dense or cached else _pool(ub, items, rows)
        width = n_items if dense else pool.shape[1] if pool is not None else 0
        keep = not cached and len(rows) * width * (8 * len(items.names) + 2) <= _CACHE_BYTES

        def chunk_arrays(s: int) -> tuple[np.ndarray, ...]:
            if (chunk, s) in ev.chunks:
                return ev.chunks[chunk, s]
            r = rows[s:s + chunk]
            if pool is None:
                cand = np.broadcast_to(np.arange(n_items), (len(r), n_items))
                sims, avail = _dense_sims(ub, r, items)
            else:
                cand = pool[s:s + chunk]
                sims, avail = gather_sims(ub, r, items, cand)
            arrays = (np.where(avail, sims, 0.0).astype(np.float32), avail.astype(np.float32),
                      (in_csr(seen[r], cand) | (cand < 0))[:, None, :], in_csr(rel[r], cand)[:, None, :])
            if keep:
                ev.chunks[chunk, s] = arrays
            return arrays

        def chunk_hits(s: int) -> np.ndarray:
            hits = np.zeros(len(weight_sets))
            r = rows[s:s + chunk]
            sa, af, blocked, is_rel = chunk_arrays(s)
            inv_rel = 1.0 / n_rel[r]
            # global weight sets in groups, scored with one matmul: (B, P, M) @ (M, G)
            step = max(1, int(2**24 // max(sa.shape[0] * sa.shape[1], 1)))
            for g0 in range(0, len(glob), step):
                wt = wglob[g0:g0 + step].T
                score = _ratio(sa @ wt, af @ wt).transpose(0, 2, 1)
                h = _topk_hits(score, blocked, is_rel, k)
                hits[glob[g0:g0 + step]] += (h * inv_rel[:, None]).sum(axis=0)
            for g in per_user:
                w = weight_sets[g][s:s + chunk].astype(np.float32)[:, :, None]
                score = _ratio(sa @ w, af @ w).transpose(0, 2, 1)
                hits[g] += float((_topk_hits(score, blocked, is_rel, k)[:, 0] * inv_rel).sum())
            return hits

        # Chunks side by side (numpy's partitions and matmuls release the GIL), summed in chunk
        # order: the same sums as one chunk after another.
        hits = np.zeros(len(weight_sets))
        for part in thread_map(chunk_hits, range(0, len(rows), chunk)):
            hits += part
        return [float(h) for h in hits / len(rows)]


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with -inf where den is 0 (no shared weighted modality)."""
    return np.divide(num, den, out=np.full(num.shape, -np.inf, dtype=np.float32), where=den > 0)


def _topk_hits(score: np.ndarray, blocked: np.ndarray, is_rel: np.ndarray, k: int) -> np.ndarray:
    """Relevant items among each row's top k: score (B, G, P), blocked/is_rel (B, 1, P) -> (B, G).

    Items tied at the k-th score count fractionally, so that no tie order is favoured.
    """
    score = np.where(blocked, -np.inf, score)
    kk = min(k, score.shape[-1])
    kth = np.partition(score, -kk, axis=-1)[..., -kk][..., None]
    above = score > kth
    at = (score == kth) & np.isfinite(score)
    n_at = at.sum(axis=-1)
    share = np.divide(kk - above.sum(axis=-1), n_at, out=np.zeros(n_at.shape), where=n_at > 0)
    return (above & is_rel).sum(axis=-1) + (at & is_rel).sum(axis=-1) * share


def _dense_sims(ub: Blocks, r: np.ndarray, items: Blocks) -> tuple[np.ndarray, np.ndarray]:
    sims = np.stack([ub.mats[j][r] @ items.mats[j].T for j in range(len(items.names))], axis=-1)
    avail = ub.mask[r][:, None, :] & items.mask[None, :, :]
    return sims.astype(np.float32), avail


def _pool(ub: Blocks, items: Blocks, r: np.ndarray, per: int = 400) -> np.ndarray:
    """Large catalogues: the union of each modality's exact top-`per` items (-1 padded)."""
    parts = []
    for j in range(len(items.names)):
        has = np.flatnonzero(items.mask[:, j])
        if len(has) == 0:
            continue
        _, ids = fidx.exact_search(items.mats[j][has], ub.mats[j][r], per)
        parts.append(np.where(ids >= 0, has[np.maximum(ids, 0)], -1))
    cand = np.sort(np.hstack(parts), axis=1)
    dup = np.zeros_like(cand, dtype=bool)
    dup[:, 1:] = cand[:, 1:] == cand[:, :-1]
    return np.where(dup, -1, cand)
