"""Stage-1 candidate retrieval: fused item and user vectors in a FAISS inner-product index.

`Retriever.fit` (1) aligns the item modalities (content embeddings plus the `behaviour`
and `popularity` modalities learned from the interactions; items without interactions
lack those two and are served by content), centres each modality on its catalogue mean and
re-normalises (cosines of different encoders then share a zero point), (2) chooses the
fusion weights on a temporal hold-out of the given interactions, (3) builds user vectors
from all given interactions and user content (pipeline.profiles) and (4) indexes the fused
item vectors (pipeline.fusion explains the scoring identity; pipeline.index the index).

Weight search: the last `validation_fraction` of the interactions by time are held out
(`pipeline.splits.global_temporal_split`, the split the evaluation uses: equal timestamps in
seeded order);
profiles, behaviour and popularity are rebuilt from the rest, and weight vectors on the
simplex (each weight >= min_weight, so content alone can always reach a cold item) are
scored by recall@n_candidates of the held-out new items of up to validation_max_users
users: a coarse grid, then a pattern search (pipeline.fusion.search_simplex). Attention
fusion then picks its temperature beta from beta_grid the same way (beta = 0 is weighted
fusion, so attention is never worse on the hold-out).

Retrieval: FAISS fetches each user's best items by the index inner product (seen items
filtered, rows searched deeper until k remain), and the fetched items are re-scored with
the exact fused score (pipeline.fusion). `cold_share` of the k places is kept for the best
items without interactions, from an exact index of those items, because a popularity or
behaviour weight would otherwise keep new items out of every list.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import faiss
import numpy as np
import polars as pl
import scipy.sparse as sp

from fusionrec.pipeline.retrieval import faiss_index as fidx
from fusionrec.pipeline.errors import FusionrecError, InputError
from fusionrec.pipeline.io.storage import sha256_file
from fusionrec.pipeline.splits import global_temporal_split
from fusionrec.pipeline.retrieval.fusion import (Blocks, align_blocks, attention_weights, consistency, fused_score,
                             item_matrix, l2_normalise, query_matrix, renormalise, search_simplex)
from fusionrec.pipeline.retrieval.profiles import (InteractionMatrix, behaviour_embeddings, blend_content, history_profile,
                               interaction_matrix, popularity_vectors)

BEHAVIOUR = "behaviour"
POPULARITY = "popularity"
_POPULARITY_USER = np.array([1.0, 0.0], dtype=np.float32)
FORMAT_VERSION = 1
_SAVED_FILES = ("index.faiss", "items.parquet", "users.parquet", "seen.parquet")
_DENSE_VALIDATION_MAX_ITEMS = 50_000
_MODALITIES = dict[str, tuple[np.ndarray, np.ndarray]]


def _as_interactions(df: pl.DataFrame) -> pl.DataFrame:
    """Columns of the interactions frame, with ids as strings and defaults filled in."""
    missing = {"user_id", "item_id"} - set(df.columns)
    if missing:
        raise InputError(f"interactions need columns {sorted(missing)}", field=sorted(missing)[0])
    cols = [pl.col("user_id").cast(pl.Utf8), pl.col("item_id").cast(pl.Utf8)]
    cols.append(pl.col("timestamp").cast(pl.Int64) if "timestamp" in df.columns
                else pl.lit(0, pl.Int64).alias("timestamp"))
    cols.append(pl.col("event").cast(pl.Utf8).str.to_lowercase() if "event" in df.columns
                else pl.lit("interact").alias("event"))
    cols.append(pl.col("value").cast(pl.Float64) if "value" in df.columns else pl.lit(None, pl.Float64).alias("value"))
    return df.select(cols).filter(pl.col("user_id").is_not_null() & pl.col("item_id").is_not_null())


def validation_split(interactions: pl.DataFrame, fraction: float, seed: int = 0
                     ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The weight search's hold-out: `pipeline.splits.global_temporal_split` (the latest
    round(fraction * n) interactions, equal timestamps in seeded order); fraction <= 0 or no
    interactions hold out nothing."""
    if interactions.height == 0 or fraction <= 0:
        return interactions, interactions.clear()
    return global_temporal_split(interactions, fraction, seed=seed)


def _gather_sims(user: Blocks, urows: np.ndarray, items: Blocks, cand: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
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


def _row_isin(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a[i, j] in b[i, :] (ignoring -1), row by row, for small b."""
    return ((a[:, :, None] == b[:, None, :]) & (b[:, None, :] >= 0)).any(axis=2)


def _in_csr(rows_csr: sp.csr_matrix, cand: np.ndarray) -> np.ndarray:
    """Whether cand[b, j] is a stored column of row b of rows_csr (vectorised membership)."""
    n_cols = rows_csr.shape[1]
    counts = np.diff(rows_csr.indptr)
    keys = np.repeat(np.arange(rows_csr.shape[0], dtype=np.int64), counts) * n_cols + rows_csr.indices
    if len(keys) == 0:
        return np.zeros(cand.shape, dtype=bool)
    q = np.arange(cand.shape[0], dtype=np.int64)[:, None] * n_cols + np.maximum(cand, 0)
    pos = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
    return (keys[pos] == q) & (cand >= 0)


class Retriever:
    """Fused multimodal candidate retrieval (stage 1), scikit-learn style.

    fusion: "weighted" (one global weight vector), "attention" (personal weights
    softmax(log w + beta * consistency)), "concat" (equal weights, the baseline).
    weights: fixed modality weights (modalities not named get 0); None searches them on a
    temporal hold-out. behaviour_dim: size of the collaborative `behaviour` modality
    (0 leaves it out). popularity: add the `popularity` modality (a prior whose weight the
    search sets; see pipeline.profiles.popularity_vectors). cold_share: share of each
    candidate list kept for the best items without interactions. content_strength: a user's own
    content counts as that many interactions. attention_beta: fixed attention temperature
    (None: chosen on the hold-out).
    """

    def __init__(self, fusion: str = "weighted", weights: dict[str, float] | None = None,
                 half_life_days: float | None = 30.0, event_weights: dict[str, float] | None = None,
                 validation_fraction: float = 0.1, index_factory: str = "auto", target_recall: float = 0.95,
                 n_candidates: int = 100, seed: int = 0, *, behaviour_dim: int = 64,
                 content_strength: float = 5.0, attention_beta: float | None = None,
                 beta_grid: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0), min_weight: float = 0.05,
                 center: bool = True, validation_max_users: int = 1000, tune_queries: int = 1000,
                 exact_max_items: int = fidx.EXACT_MAX_ITEMS, index_memory_budget_gb: float = 4.0,
                 overfetch: float = 2.0, popularity: bool = True, cold_share: float = 0.1,
                 n_threads: int | None = None) -> None:
        self.fusion = fusion
        self.weights = weights
        self.half_life_days = half_life_days
        self.event_weights = event_weights
        self.validation_fraction = validation_fraction
        self.index_factory = index_factory
        self.target_recall = target_recall
        self.n_candidates = n_candidates
        self.seed = seed
        self.behaviour_dim = behaviour_dim
        self.content_strength = content_strength
        self.attention_beta = attention_beta
        self.beta_grid = beta_grid
        self.min_weight = min_weight
        self.center = center
        self.validation_max_users = validation_max_users
        self.tune_queries = tune_queries
        self.exact_max_items = exact_max_items
        self.index_memory_budget_gb = index_memory_budget_gb
        self.overfetch = overfetch
        self.popularity = popularity
        self.cold_share = cold_share
        self.n_threads = n_threads

    _PARAMS = ("fusion", "weights", "half_life_days", "event_weights", "validation_fraction", "index_factory",
               "target_recall", "n_candidates", "seed", "behaviour_dim", "content_strength", "attention_beta",
               "beta_grid", "min_weight", "center", "validation_max_users", "tune_queries", "exact_max_items",
               "index_memory_budget_gb", "overfetch", "popularity", "cold_share", "n_threads")

    def get_params(self) -> dict:
        return {p: getattr(self, p) for p in self._PARAMS}

    # ------------------------------------------------------------------ fitting
    def fit(self, item_modalities: _MODALITIES, interactions: pl.DataFrame,
            user_modalities: _MODALITIES | None = None) -> "Retriever":
        """Learn weights on a temporal hold-out, then profiles and the index on all interactions."""
        if self.fusion not in ("weighted", "attention", "concat"):
            raise ValueError(f"fusion must be 'weighted', 'attention' or 'concat', not {self.fusion!r}")
        fidx.set_threads(self.n_threads)
        self._cold = None
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        inter = _as_interactions(interactions)
        content = {k: v for k, v in item_modalities.items() if len(v[0])}
        use_behaviour = self.behaviour_dim > 0 and inter.height > 0
        if not content and not use_behaviour:
            raise FusionrecError("no item embeddings and no interactions: nothing to index")
        content_names = tuple(sorted(content))
        self.modalities_ = content_names + ((BEHAVIOUR,) if use_behaviour else ()) \
            + ((POPULARITY,) if self.popularity and inter.height > 0 else ())
        ids = set()
        for mids, _ in content.values():
            ids.update(np.asarray(mids).astype(str).tolist())
        if use_behaviour:
            ids.update(inter["item_id"].unique().to_list())
        self.item_ids_ = np.array(sorted(ids), dtype=object)
        cblocks = align_blocks(content, content_names, self.item_ids_)
        self.modality_means_ = {}
        mats = []
        for j, name in enumerate(content_names):
            x, has = cblocks.mats[j], cblocks.mask[:, j]
            mean = x[has].mean(axis=0) if self.center and has.any() else np.zeros(x.shape[1], np.float32)
            self.modality_means_[name] = mean.astype(np.float32)
            mats.append(np.where(has[:, None], l2_normalise(x - mean), 0.0).astype(np.float32))
        cblocks = Blocks(self.item_ids_, content_names, tuple(mats), cblocks.mask)
        user_content = {k: v for k, v in (user_modalities or {}).items() if k in content_names and len(v[0])}
        self.unused_user_modalities_ = sorted(set(user_modalities or {}) - set(user_content))
        inter_known = inter.filter(pl.col("item_id").is_in(pl.Series(self.item_ids_.astype(str)).implode()))
        self.n_unknown_item_rows_ = inter.height - inter_known.height
        timings["prepare_s"] = time.perf_counter() - t0

        # (2) weights on the temporal hold-out
        t1 = time.perf_counter()
        self.validation_ = self._choose_weights(cblocks, inter_known, user_content)
        timings["weight_search_s"] = time.perf_counter() - t1

        # (3) profiles from everything
        t2 = time.perf_counter()
        self.item_blocks_ = self._with_interaction_modalities(cblocks, inter_known)
        im = interaction_matrix(inter_known, self.item_ids_, half_life_days=self.half_life_days,
                                event_weights=self.event_weights,
                                user_ids=self._user_universe(inter_known, user_content))
        ub, kappa, mean_sq = self._user_state(im, self.item_blocks_, user_content, mean_sq=None)
        self.mean_sq_ = mean_sq
        self.user_ids_ = im.user_ids
        self.user_blocks_ = ub
        self.user_kappa_ = kappa
        self.user_weights_ = self._personal_weights(ub.mask, kappa)
        self.seen_ = im.seen
        timings["profiles_s"] = time.perf_counter() - t2

        # (4) index and tuned search parameters
        t3 = time.perf_counter()
        xb = item_matrix(self.item_blocks_, self._weight_vector())
        self.index_ = fidx.build_index(xb, self.index_factory, seed=self.seed, exact_max=self.exact_max_items,
                                       memory_budget=int(self.index_memory_budget_gb * (1 << 30)))
        timings["index_build_s"] = time.perf_counter() - t3
        t4 = time.perf_counter()
        active = np.flatnonzero(ub.mask.any(axis=1))
        rng = np.random.default_rng(self.seed)
        sample = np.sort(active if len(active) <= self.tune_queries
                         else rng.choice(active, self.tune_queries, replace=False))
        q = query_matrix(ub.take(sample), self.user_weights_[sample])
        self.tuning_ = fidx.tune_search_params(self.index_, q, self.n_candidates, self.target_recall, base=xb) \
            if len(sample) else {"params": {}, "recall": None, "trials": [], "reached": False}
        self.search_params_ = dict(self.tuning_["params"])
        timings["index_tune_s"] = time.perf_counter() - t4
        timings["fit_s"] = time.perf_counter() - t0
        self.timings_ = timings
        self.index_info_ = fidx.describe(self.index_)
        return self

    def _user_universe(self, inter: pl.DataFrame, user_content: _MODALITIES) -> np.ndarray:
        ids = set(inter["user_id"].unique().to_list())
        for uids, _ in user_content.values():
            ids.update(np.asarray(uids).astype(str).tolist())
        return np.array(sorted(ids), dtype=object)

    def _with_interaction_modalities(self, cblocks: Blocks, inter: pl.DataFrame) -> Blocks:
        """Content blocks plus the modalities learned from interactions (behaviour, popularity)."""
        names, mats, masks = list(cblocks.names), list(cblocks.mats), [cblocks.mask]
        if BEHAVIOUR in self.modalities_:
            im = interaction_matrix(inter, cblocks.ids, half_life_days=self.half_life_days,
                                    event_weights=self.event_weights)
            beh = behaviour_embeddings(im.weights, self.behaviour_dim, seed=self.seed)
            names.append(BEHAVIOUR)
            mats.append(beh)
            masks.append((np.linalg.norm(beh, axis=1) > 0)[:, None])
        if POPULARITY in self.modalities_:
            pop = popularity_vectors(inter, cblocks.ids, half_life_days=self.half_life_days)
            names.append(POPULARITY)
            mats.append(pop)
            masks.append((np.linalg.norm(pop, axis=1) > 0)[:, None])
        return Blocks(cblocks.ids, tuple(names), tuple(mats), np.hstack(masks))

    def _user_state(self, im: InteractionMatrix, items: Blocks, user_content: _MODALITIES,
                    mean_sq: dict[str, float] | None) -> tuple[Blocks, np.ndarray, dict[str, float]]:
        """User blocks (behaviour profile blended with own content), consistency kappa, ||mu||^2."""
        uc = align_blocks(user_content, items.names, im.user_ids, dims=dict(zip(items.names, items.dims)))
        mats, kappa = [], np.zeros((len(im.user_ids), len(items.names)))
        mean_sq = dict(mean_sq or {})
        for j, name in enumerate(items.names):
            if name == POPULARITY:  # the same prior for everyone, new users included
                mean_sq.setdefault(name, 0.0)
                mats.append(np.tile(_POPULARITY_USER, (len(im.user_ids), 1)))
                continue
            prof = history_profile(im.weights, items.mats[j], items.mask[:, j])
            if name not in mean_sq:
                hist = prof.n_eff > 0
                mu = (prof.direction[hist] * np.sqrt(prof.resultant_sq[hist])[:, None]).mean(axis=0) \
                    if hist.any() else np.zeros(items.dims[j])
                mean_sq[name] = float(np.dot(mu, mu))
            kappa[:, j] = np.where(prof.n_eff > 0, consistency(prof.resultant_sq, prof.sum_alpha_sq,
                                                              mean_sq[name]), 0.0)
            c = uc.mats[j]
            if name in self.modality_means_ and uc.mask[:, j].any():
                c = np.where(uc.mask[:, j:j + 1], l2_normalise(c - self.modality_means_[name]), 0.0).astype(np.float32)
            mats.append(blend_content(prof.direction, prof.n_eff, c, self.content_strength))
        mask = np.column_stack([np.linalg.norm(m, axis=1) > 0 for m in mats]) if mats else \
            np.zeros((len(im.user_ids), 0), dtype=bool)
        # Sums of many floats come out in a thread-dependent order (differences near 1e-16);
        # rounding keeps attention weights and the saved index byte-identical across runs.
        return Blocks(im.user_ids, items.names, tuple(mats), mask), np.round(kappa, 9), mean_sq

    def _weight_vector(self, weights: dict[str, float] | None = None) -> np.ndarray:
        w = weights if weights is not None else self.weights_
        return np.array([w.get(m, 0.0) for m in self.modalities_], dtype=np.float64)

    def _personal_weights(self, mask: np.ndarray, kappa: np.ndarray, beta: float | None = None) -> np.ndarray:
        w = self._weight_vector()
        if self.fusion == "attention":
            return attention_weights(w, kappa, mask, self.attention_beta_ if beta is None else beta)
        return renormalise(w, mask)

    def _fixed_weights(self) -> dict[str, float] | None:
        if self.fusion == "concat":
            return {m: 1.0 / len(self.modalities_) for m in self.modalities_}
        if self.weights is None:
            return None
        w = {m: max(float(self.weights.get(m, 0.0)), 0.0) for m in self.modalities_}
        total = sum(w.values())
        if total <= 0:
            raise InputError("fixed fusion weights give no weight to any modality present "
                             f"({', '.join(self.modalities_)})", field="weights")
        return {m: v / total for m, v in w.items()}

    def _choose_weights(self, cblocks: Blocks, inter: pl.DataFrame, user_content: _MODALITIES) -> dict:
        """Set weights_ and attention_beta_; return the validation record."""
        fixed = self._fixed_weights()
        need_beta = self.fusion == "attention" and self.attention_beta is None
        self.attention_beta_ = float(self.attention_beta) if self.attention_beta is not None else 0.0
        record: dict = {"fraction": self.validation_fraction}
        train, valid = validation_split(inter, self.validation_fraction, self.seed)
        ev = self._validation_set(cblocks, train, valid, user_content) if valid.height and train.height else None
        if ev is None:
            record["skipped"] = "no temporal hold-out with users seen before it"
            self.weights_ = fixed or {m: 1.0 / len(self.modalities_) for m in self.modalities_}
            self.validation_recall_ = None
            return record
        ub, kappa, items, seen, rel, n_rel, rows = ev
        record.update(n_users=int(len(rows)), n_train=train.height, n_heldout=valid.height,
                      k=int(self.n_candidates))
        m = len(self.modalities_)
        if fixed is None:
            def evaluate(ws: np.ndarray) -> np.ndarray:
                return np.array(self._eval_recall(ub, items, seen, rel, n_rel, rows, list(ws)))

            found = search_simplex(evaluate, m, floor=self.min_weight, seed=self.seed)
            self.weights_ = dict(zip(self.modalities_, map(float, found["weights"])))
            extra = evaluate(np.vstack([np.eye(m), np.full((1, m), 1.0 / m)]))
            record.update(search_evaluations=found["evaluations"], search_best_recall=found["score"],
                          single_modality_recall=dict(zip(self.modalities_, map(float, extra[:m]))),
                          equal_weights_recall=float(extra[m]))
        else:
            self.weights_ = fixed
        w = self._weight_vector()
        if need_beta:
            sets = [attention_weights(w, kappa[rows], ub.mask[rows], b) for b in self.beta_grid]
            recalls = self._eval_recall(ub, items, seen, rel, n_rel, rows, sets)
            ib = int(np.argmax(recalls))
            self.attention_beta_ = float(self.beta_grid[ib])
            record["beta_recall"] = {str(b): float(r) for b, r in zip(self.beta_grid, recalls)}
        chosen = attention_weights(w, kappa[rows], ub.mask[rows], self.attention_beta_) \
            if self.fusion == "attention" else w
        self.validation_recall_ = float(self._eval_recall(ub, items, seen, rel, n_rel, rows, [chosen])[0])
        record["recall"] = self.validation_recall_
        return record

    def _validation_set(self, cblocks: Blocks, train: pl.DataFrame, valid: pl.DataFrame,
                        user_content: _MODALITIES):
        """Profiles from the training part, and each sampled user's held-out new items."""
        items = self._with_interaction_modalities(cblocks, train)
        users = self._user_universe(train, user_content)
        im = interaction_matrix(train, self.item_ids_, half_life_days=self.half_life_days,
                                event_weights=self.event_weights, user_ids=users)
        vm = interaction_matrix(valid, self.item_ids_, half_life_days=None, user_ids=users)
        rel = (vm.seen.astype(np.int8) - vm.seen.multiply(im.seen).astype(np.int8)).tocsr()
        rel.eliminate_zeros()
        rel.sort_indices()
        n_rel = np.diff(rel.indptr)
        ub, kappa, _ = self._user_state(im, items, user_content, mean_sq=None)
        rows = np.flatnonzero((n_rel > 0) & ub.mask.any(axis=1))
        if len(rows) == 0:
            return None
        if len(rows) > self.validation_max_users:
            rows = np.sort(np.random.default_rng(self.seed).choice(rows, self.validation_max_users, replace=False))
        return ub, kappa, items, im.seen, rel, n_rel, rows

    def _eval_recall(self, ub: Blocks, items: Blocks, seen: sp.csr_matrix, rel: sp.csr_matrix,
                     n_rel: np.ndarray, rows: np.ndarray, weight_sets: list[np.ndarray], chunk: int = 64
                     ) -> list[float]:
        """recall@n_candidates of each weight set (global (M,) or per validation user (R, M))."""
        n_items = len(items.ids)
        k = int(min(self.n_candidates, n_items))
        glob = [g for g, w in enumerate(weight_sets) if w.ndim == 1]
        per_user = [g for g, w in enumerate(weight_sets) if w.ndim == 2]
        wglob = np.array([weight_sets[g] for g in glob], dtype=np.float32).reshape(len(glob), len(items.names))
        hits = np.zeros(len(weight_sets))
        dense = n_items <= _DENSE_VALIDATION_MAX_ITEMS
        pool = None if dense else self._pool(ub, items, rows)
        for s in range(0, len(rows), chunk):
            r = rows[s:s + chunk]
            cand = np.broadcast_to(np.arange(n_items), (len(r), n_items)) if dense else pool[s:s + chunk]
            sims, avail = _gather_sims(ub, r, items, cand) if not dense else self._dense_sims(ub, r, items)
            sa = np.where(avail, sims, 0.0).astype(np.float32)
            af = avail.astype(np.float32)
            blocked = (_in_csr(seen[r], cand) | (cand < 0))[:, None, :]
            is_rel = _in_csr(rel[r], cand)[:, None, :]
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
        return (hits / len(rows)).tolist()

    @staticmethod
    def _dense_sims(ub: Blocks, r: np.ndarray, items: Blocks) -> tuple[np.ndarray, np.ndarray]:
        sims = np.stack([ub.mats[j][r] @ items.mats[j].T for j in range(len(items.names))], axis=-1)
        avail = ub.mask[r][:, None, :] & items.mask[None, :, :]
        return sims.astype(np.float32), avail

    def _pool(self, ub: Blocks, items: Blocks, r: np.ndarray, per: int = 400) -> np.ndarray:
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

    # ------------------------------------------------------------------ retrieval
    def _check_fitted(self) -> None:
        if not hasattr(self, "index_"):
            raise FusionrecError("Retriever is not fitted: call fit() or Retriever.load()")

    def _cold_index(self) -> tuple[faiss.Index, np.ndarray] | None:
        """Exact index over the items without interactions (built on first use, not saved)."""
        if BEHAVIOUR not in self.modalities_:
            return None
        if getattr(self, "_cold", None) is None:
            rows = np.flatnonzero(~self.item_blocks_.mask[:, self.modalities_.index(BEHAVIOUR)]
                                  & self.item_blocks_.mask.any(axis=1))
            if len(rows) == 0:
                self._cold = (None, rows)
            else:
                x = item_matrix(self.item_blocks_.take(rows), self._weight_vector())
                index = faiss.IndexFlatIP(x.shape[1])
                index.add(x)
                self._cold = (index, rows)
        return self._cold if self._cold[0] is not None else None

    def _top_exact(self, ub: Blocks, rows: np.ndarray, weights: np.ndarray, cand: np.ndarray, k: int
                   ) -> np.ndarray:
        """The k best of cand (B, K) by the exact fused score, best first (-1 padded)."""
        sims, avail = _gather_sims(ub, rows, self.item_blocks_, cand)
        score = fused_score(sims, avail, weights[rows][:, None, :])
        score = np.where((cand < 0) | np.isnan(score), -np.inf, score)
        order = np.argsort(-score, axis=1, kind="stable")[:, :k]
        return np.where(np.isfinite(np.take_along_axis(score, order, axis=1)),
                        np.take_along_axis(cand, order, axis=1), -1)

    def _retrieve(self, ub: Blocks, weights: np.ndarray, seen: sp.csr_matrix | None, k: int,
                  batch: int = 4096) -> pl.DataFrame:
        """Top-k per user row of ub by the exact fused score (FAISS fetch, seen filter, re-score).

        With cold_share > 0, that share of the k places is kept for the best items without
        interactions (from their own exact index), so that new items reach the ranker.
        """
        fidx.set_threads(self.n_threads)
        fidx.set_search_params(self.index_, self.search_params_)
        items = self.item_blocks_
        n_items = len(items.ids)
        k = int(min(k, n_items))
        item_full = bool(items.mask.all())
        cold = self._cold_index() if self.cold_share > 0 else None
        n_cold = min(int(round(k * self.cold_share)), len(cold[1])) if cold is not None else 0
        frames = []
        for s in range(0, len(ub.ids), batch):
            rows = np.arange(s, min(s + batch, len(ub.ids)))
            active = rows[ub.mask[rows].any(axis=1)]
            if len(active) == 0:
                continue
            exact_ip = item_full or (self.fusion != "attention" and bool(ub.mask[active].all()))
            kf = int(min(n_items, k if exact_ip else math.ceil(k * self.overfetch)))
            q = query_matrix(ub.take(active), weights[active])
            srows = seen[active] if seen is not None else None
            cand = self._top_exact(ub, active, weights, self._fetch(self.index_, None, q, srows, kf, n_items), k)
            if n_cold:
                cidx, crows = cold
                ccand = self._fetch(cidx, crows, q, srows, min(len(crows), math.ceil(n_cold * self.overfetch)),
                                    len(crows))
                ccand = self._top_exact(ub, active, weights, ccand, n_cold)
                # cold picks first, then the main list without them, cut to k; then order by score
                merged = np.hstack([ccand, np.where(_row_isin(cand, ccand), -1, cand)])
                take = np.argsort(merged < 0, axis=1, kind="stable")[:, :k]
                cand = self._top_exact(ub, active, weights, np.take_along_axis(merged, take, axis=1), k)
            sims, avail = _gather_sims(ub, active, items, cand)
            score = fused_score(sims, avail, weights[active][:, None, :])
            bi, ki = np.nonzero(cand >= 0)
            cols = {"user_id": ub.ids[active][bi].astype(str), "item_id": items.ids[cand[bi, ki]].astype(str),
                    "retrieval_rank": (ki + 1).astype(np.int32), "retrieval_score": score[bi, ki].astype(np.float32)}
            frame = pl.DataFrame(cols, schema={"user_id": pl.Utf8, "item_id": pl.Utf8, "retrieval_rank": pl.Int32,
                                               "retrieval_score": pl.Float32})
            frames.append(frame.with_columns(self._feature_columns(sims[bi, ki], avail[bi, ki],
                                                                   weights[active][bi])))
        if not frames:
            return self._empty_frame()
        return pl.concat(frames)

    @staticmethod
    def _fetch(index: faiss.Index, id_map: np.ndarray | None, q: np.ndarray, seen_rows: sp.csr_matrix | None,
               kf: int, n_items: int) -> np.ndarray:
        """FAISS top-kf item rows per query with seen items removed, re-searching short rows deeper.
        id_map maps the index's ids to item rows (None: they are item rows)."""
        n_seen = np.diff(seen_rows.indptr) if seen_rows is not None else np.zeros(len(q), dtype=int)
        fetch = int(min(n_items, kf + (np.quantile(n_seen, 0.9) if len(n_seen) else 0)))
        out = np.full((len(q), kf), -1, dtype=np.int64)
        todo = np.arange(len(q))
        while len(todo):
            _, ids = fidx.search(index, q[todo], fetch)
            if id_map is not None:
                ids = np.where(ids >= 0, id_map[np.maximum(ids, 0)], -1)
            ok = ids >= 0
            if seen_rows is not None:
                ok &= ~_in_csr(seen_rows[todo], ids)
            order = np.argsort(~ok, axis=1, kind="stable")[:, :kf]
            got = np.take_along_axis(np.where(ok, ids, -1), order, axis=1)
            out[todo, :got.shape[1]] = got
            short = (ok.sum(axis=1) < kf) & (fetch < n_items)
            todo, fetch = todo[short], int(min(n_items, fetch * 2))
        return out

    def _feature_columns(self, sims: np.ndarray, avail: np.ndarray, weights: np.ndarray) -> list[pl.Series]:
        cols = []
        for j, name in enumerate(self.modalities_):
            cols.append(pl.Series(f"sim_{name}", np.where(avail[:, j], sims[:, j], np.nan).astype(np.float32),
                                  dtype=pl.Float32).fill_nan(None))
        for j, name in enumerate(self.modalities_):
            cols.append(pl.Series(f"attn_{name}", weights[:, j].astype(np.float32), dtype=pl.Float32))
        return cols

    def _empty_frame(self) -> pl.DataFrame:
        schema = {"user_id": pl.Utf8, "item_id": pl.Utf8, "retrieval_rank": pl.Int32, "retrieval_score": pl.Float32}
        schema.update({f"sim_{m}": pl.Float32 for m in self.modalities_})
        schema.update({f"attn_{m}": pl.Float32 for m in self.modalities_})
        return pl.DataFrame(schema=schema)

    def candidates(self, user_ids=None, k: int | None = None, exclude_seen: bool = True) -> pl.DataFrame:
        """Top-k (default n_candidates) items per known user: user_id, item_id, retrieval_rank,
        retrieval_score, sim_<modality>, attn_<modality>. Unknown user ids give no rows."""
        self._check_fitted()
        if user_ids is None:
            rows = np.arange(len(self.user_ids_))
        else:
            lookup = pl.DataFrame({"user_id": self.user_ids_.astype(str), "row": np.arange(len(self.user_ids_))})
            want = pl.DataFrame({"user_id": pl.Series(list(user_ids), dtype=pl.Utf8)}).unique(maintain_order=True)
            rows = want.join(lookup, on="user_id", how="inner", maintain_order="left")["row"].to_numpy()
        return self._retrieve(self.user_blocks_.take(rows), self.user_weights_[rows],
                              self.seen_[rows] if exclude_seen else None, k or self.n_candidates)

    def pair_features(self, pairs: pl.DataFrame, exclude_seen: bool = True) -> pl.DataFrame:
        """The candidate columns for arbitrary (user_id, item_id) pairs, in the input order.

        retrieval_rank is the item's rank in the user's top n_candidates (null outside it);
        unknown users or items get nulls. Other input columns are kept.
        """
        self._check_fitted()
        feats = ["retrieval_rank", "retrieval_score"] + [f"{p}_{m}" for p in ("sim", "attn") for m in self.modalities_]
        base = pairs.drop([c for c in feats if c in pairs.columns]).with_columns(
            pl.col("user_id").cast(pl.Utf8), pl.col("item_id").cast(pl.Utf8)).with_row_index("__row")
        users = pl.DataFrame({"user_id": self.user_ids_.astype(str), "__u": np.arange(len(self.user_ids_))})
        items = pl.DataFrame({"item_id": self.item_ids_.astype(str), "__i": np.arange(len(self.item_ids_))})
        j = base.join(users, on="user_id", how="left").join(items, on="item_id", how="left").sort("__row")
        known = (j["__u"].is_not_null() & j["__i"].is_not_null()).to_numpy()
        u = j["__u"].fill_null(0).to_numpy()
        i = j["__i"].fill_null(0).to_numpy()
        sims, avail = _gather_sims(self.user_blocks_, u, self.item_blocks_, i[:, None])
        sims, avail = sims[:, 0], avail[:, 0] & known[:, None]
        w = self.user_weights_[u]
        score = fused_score(sims, avail, w).astype(np.float32)
        cols = [pl.Series("retrieval_score", score, dtype=pl.Float32).fill_nan(None)]
        cols += self._feature_columns(sims, avail, w)
        out = j.with_columns(cols).with_columns(
            [pl.when(pl.Series(known)).then(pl.col(f"attn_{m}")).otherwise(None).alias(f"attn_{m}")
             for m in self.modalities_])
        cand_users = out.filter(pl.Series(known))["user_id"].unique().to_list()
        ranks = self.candidates(cand_users, self.n_candidates, exclude_seen=exclude_seen).select(
            "user_id", "item_id", "retrieval_rank") if cand_users else \
            pl.DataFrame(schema={"user_id": pl.Utf8, "item_id": pl.Utf8, "retrieval_rank": pl.Int32})
        out = out.join(ranks, on=["user_id", "item_id"], how="left").sort("__row")
        return out.select([c for c in pairs.columns if c not in feats] + feats)

    def user_vectors(self, history: pl.DataFrame | None = None, user_modalities: _MODALITIES | None = None
                     ) -> tuple[Blocks, np.ndarray]:
        """User blocks and personal weights for users given at query time (no refit)."""
        self._check_fitted()
        hist = _as_interactions(history) if history is not None and history.height else \
            pl.DataFrame(schema={"user_id": pl.Utf8, "item_id": pl.Utf8, "timestamp": pl.Int64,
                                 "event": pl.Utf8, "value": pl.Float64})
        content = {k: v for k, v in (user_modalities or {}).items() if k in self.modalities_ and len(v[0])}
        im = interaction_matrix(hist, self.item_ids_, half_life_days=self.half_life_days,
                                event_weights=self.event_weights, user_ids=self._user_universe(hist, content))
        ub, kappa, _ = self._user_state(im, self.item_blocks_, content, mean_sq=self.mean_sq_)
        return ub, self._personal_weights(ub.mask, kappa), im

    def recommend_for_history(self, history: pl.DataFrame | None, k: int | None = None,
                              user_modalities: _MODALITIES | None = None, exclude_seen: bool = True
                              ) -> pl.DataFrame:
        """Candidates for users given only now: a few interactions (columns item_id and
        optionally user_id, timestamp, event, value; no user_id means one user "query")
        and/or their own content embeddings ({modality: (ids, matrix)}). No refit."""
        if history is not None and "user_id" not in history.columns:
            history = history.with_columns(pl.lit("query").alias("user_id"))
        ub, w, im = self.user_vectors(history, user_modalities)
        return self._retrieve(ub, w, im.seen if exclude_seen else None, k or self.n_candidates)

    # ------------------------------------------------------------------ persistence
    def summary_(self) -> dict:
        """Weights, attention statistics, index, tuned parameters, recalls and timings (for the manifest)."""
        self._check_fitted()
        attn = {}
        for j, m in enumerate(self.modalities_):
            has = self.user_blocks_.mask[:, j]
            a = self.user_weights_[has, j]
            attn[m] = {"mean": float(a.mean()) if len(a) else None,
                       "p10": float(np.quantile(a, 0.1)) if len(a) else None,
                       "p90": float(np.quantile(a, 0.9)) if len(a) else None}
        return {
            "fusion": self.fusion, "modalities": list(self.modalities_), "weights": self.weights_,
            "weights_source": "fixed" if (self.weights is not None or self.fusion == "concat") else "validation_search",
            "attention_beta": self.attention_beta_ if self.fusion == "attention" else None,
            "user_modality_weights": attn, "validation": self.validation_,
            "validation_recall": self.validation_recall_,
            "index": {**self.index_info_, "factory": self.index_factory},
            "search_params": self.search_params_,
            "tuning": dict(self.tuning_),
            "target_recall": self.target_recall,
            "counts": {"items": int(len(self.item_ids_)), "users": int(len(self.user_ids_)),
                       "items_per_modality": {m: int(self.item_blocks_.mask[:, j].sum())
                                              for j, m in enumerate(self.modalities_)},
                       "cold_items": int((~self.item_blocks_.mask[:, self.modalities_.index(BEHAVIOUR)]).sum())
                       if BEHAVIOUR in self.modalities_ else None,
                       "items_with_interactions":
                           int(self.item_blocks_.mask[:, self.modalities_.index(BEHAVIOUR)].sum())
                       if BEHAVIOUR in self.modalities_ else None,
                       "users_per_modality": {m: int(self.user_blocks_.mask[:, j].sum())
                                              for j, m in enumerate(self.modalities_)},
                       "interaction_rows_unknown_item": int(self.n_unknown_item_rows_)},
            "unused_user_modalities": self.unused_user_modalities_,
            "timings": self.timings_,
        }

    def save(self, directory: Path) -> None:
        """index.faiss, items.parquet, users.parquet, seen.parquet, retriever.json (written last)."""
        self._check_fitted()
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        fidx.save_index(self.index_, d / "index.faiss")
        _write_parquet(_blocks_frame(self.item_blocks_, "item_id"), d / "items.parquet")
        uf = _blocks_frame(self.user_blocks_, "user_id").with_columns(
            [pl.Series(f"attn_{m}", self.user_weights_[:, j].astype(np.float64))
             for j, m in enumerate(self.modalities_)]
            + [pl.Series(f"kappa_{m}", self.user_kappa_[:, j].astype(np.float64))
               for j, m in enumerate(self.modalities_)])
        _write_parquet(uf, d / "users.parquet")
        coo = self.seen_.tocoo()
        _write_parquet(pl.DataFrame({"user_id": self.user_ids_[coo.row].astype(str),
                                     "item_id": self.item_ids_[coo.col].astype(str)},
                                    schema={"user_id": pl.Utf8, "item_id": pl.Utf8}), d / "seen.parquet")
        state = {
            "format_version": FORMAT_VERSION, "params": {**self.get_params(), "beta_grid": list(self.beta_grid)},
            "modalities": list(self.modalities_), "weights": self.weights_, "attention_beta": self.attention_beta_,
            "modality_means": {m: v.astype(float).tolist() for m, v in self.modality_means_.items()},
            "mean_sq": self.mean_sq_, "search_params": self.search_params_, "tuning": self.tuning_,
            "validation": self.validation_, "validation_recall": self.validation_recall_,
            "timings": self.timings_, "index_info": self.index_info_,
            "unused_user_modalities": self.unused_user_modalities_, "n_unknown_item_rows": self.n_unknown_item_rows_,
        }
        # retriever.json, written last, names the sha256 of its partner files: a set half
        # replaced by a killed save is refused on load instead of served.
        state["files"] = {name: sha256_file(d / name) for name in _SAVED_FILES}
        with fidx.atomic_path(d / "retriever.json") as tmp:
            tmp.write_text(json.dumps(state, indent=2, default=float))

    @classmethod
    def load(cls, directory: Path) -> "Retriever":
        """A fitted Retriever from `save`'s files; the index is read, not rebuilt."""
        d = Path(directory)
        path = d / "retriever.json"
        if not path.exists():
            raise FusionrecError(f"{path}: no saved retriever here")
        state = json.loads(path.read_text())
        if state.get("format_version") != FORMAT_VERSION:
            raise FusionrecError(f"{path}: unsupported format_version {state.get('format_version')}")
        for name, digest in state.get("files", {}).items():
            if not (d / name).is_file() or sha256_file(d / name) != digest:
                raise FusionrecError(f"{d / name} does not belong to {path}: the index was interrupted while it "
                                     "was saved; run `fusionrec index` (or `fusionrec run`) again")
        params = dict(state["params"])
        params["beta_grid"] = tuple(params["beta_grid"])
        self = cls(**params)
        self.modalities_ = tuple(state["modalities"])
        self.weights_ = {k: float(v) for k, v in state["weights"].items()}
        self.attention_beta_ = float(state["attention_beta"])
        self.modality_means_ = {m: np.asarray(v, dtype=np.float32) for m, v in state["modality_means"].items()}
        self.mean_sq_ = {k: float(v) for k, v in state["mean_sq"].items()}
        self.search_params_ = {k: int(v) for k, v in state["search_params"].items()}
        self.tuning_, self.validation_ = state["tuning"], state["validation"]
        self.validation_recall_, self.timings_ = state["validation_recall"], state["timings"]
        self.index_info_ = state["index_info"]
        self.unused_user_modalities_ = state["unused_user_modalities"]
        self.n_unknown_item_rows_ = state["n_unknown_item_rows"]
        self.item_blocks_ = _frame_blocks(pl.read_parquet(d / "items.parquet"), "item_id", self.modalities_)
        self.item_ids_ = self.item_blocks_.ids
        uf = pl.read_parquet(d / "users.parquet")
        self.user_blocks_ = _frame_blocks(uf, "user_id", self.modalities_)
        self.user_ids_ = self.user_blocks_.ids
        self.user_weights_ = np.column_stack([uf[f"attn_{m}"].to_numpy().astype(np.float64) for m in self.modalities_])
        self.user_kappa_ = np.column_stack([uf[f"kappa_{m}"].to_numpy().astype(np.float64) for m in self.modalities_])
        seen = pl.read_parquet(d / "seen.parquet")
        self.seen_ = interaction_matrix(seen, self.item_ids_, half_life_days=None, user_ids=self.user_ids_).seen
        self.index_ = fidx.load_index(d / "index.faiss")
        fidx.set_search_params(self.index_, self.search_params_)
        return self


def _blocks_frame(blocks: Blocks, id_col: str) -> pl.DataFrame:
    cols = [pl.Series(id_col, blocks.ids.astype(str), dtype=pl.Utf8)]
    for j, m in enumerate(blocks.names):
        cols.append(pl.Series(f"has_{m}", blocks.mask[:, j]))
        cols.append(pl.Series(f"vec_{m}", blocks.mats[j], dtype=pl.Array(pl.Float32, blocks.mats[j].shape[1])))
    return pl.DataFrame(cols)


def _frame_blocks(df: pl.DataFrame, id_col: str, names: tuple[str, ...]) -> Blocks:
    mats = tuple(np.ascontiguousarray(df[f"vec_{m}"].to_numpy(), dtype=np.float32).reshape(df.height, -1)
                 for m in names)
    mask = np.column_stack([df[f"has_{m}"].to_numpy() for m in names]) if names else np.zeros((df.height, 0), bool)
    return Blocks(df[id_col].to_numpy().astype(object), tuple(names), mats, mask)


def _write_parquet(df: pl.DataFrame, path: Path) -> None:
    with fidx.atomic_path(path) as tmp:
        df.write_parquet(tmp)
