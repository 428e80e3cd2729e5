"""User vectors from behaviour and from the user's own content, and item vectors from behaviour.

A user's modality-m profile is the recency- and event-weighted mean of the unit vectors of
the items they interacted with (items lacking m are skipped for that modality):

    alpha_j = event_weight(event_j) * strength(value_j) * 0.5 ** ((t_last - t_j) / half_life)
    p_m     = sum_j alpha_j x_{j,m} / sum_j alpha_j,      u_m = p_m / ||p_m||

strength is the value divided by the largest value of that event type (a 4-star rating
weighs 0.8 of a 5-star one), 1 where value is null; t_last is the user's latest
interaction. Where the user also has their own content in m (profile text, avatar, voice,
embedded by the same encoder, so in the same space) it acts as a prior worth
`content_strength` interactions: u_m = normalise(n/(n+k) p_m/||p_m|| + k/(n+k) c_m) with
n = (sum alpha)^2 / sum alpha^2 the effective history length. Users with no history are
served from their content alone.

The `behaviour` modality gives items a collaborative vector: the right singular vectors of
the user-item weight matrix (popularity-damped columns), so items that the same users pick
are close. The `popularity` modality encodes each item's (recency-decayed) interaction
count as a 2-d unit vector whose cosine with every user's fixed vector is the popularity.
Items without interactions lack both and are served from their content.

`item_blocks` and `user_state` put these together for the Retriever: the item blocks with the
interaction modalities, and the user blocks, consistency kappa and ||mu||^2 per modality.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import polars as pl
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from fusionrec.pipeline.config import DEFAULT_EVENT_WEIGHTS as CONFIGURED_EVENT_WEIGHTS
from fusionrec.pipeline.config import OTHER_EVENT_WEIGHTS
from fusionrec.pipeline.retrieval.fusion import (
    Blocks,
    align_blocks,
    attention_weights,
    consistency,
    l2_normalise,
    renormalise,
)

BEHAVIOUR = "behaviour"
POPULARITY = "popularity"
_POPULARITY_USER = np.array([1.0, 0.0], dtype=np.float32)

# One table: the configured defaults (fusion.event_weights) over the other names' weights.
DEFAULT_EVENT_WEIGHTS: dict[str, float] = {**OTHER_EVENT_WEIGHTS, **CONFIGURED_EVENT_WEIGHTS}
UNKNOWN_EVENT_WEIGHT = 1.0


def interaction_weights(interactions: pl.DataFrame, *, half_life_days: float | None = 30.0,
                        event_weights: dict[str, float] | None = None) -> pl.DataFrame:
    """interactions + column `w` (>= 0): event weight x value strength x recency decay."""
    ew = {**DEFAULT_EVENT_WEIGHTS, **{k.lower(): float(v) for k, v in (event_weights or {}).items()}}
    df = interactions
    if "event" not in df.columns:
        df = df.with_columns(pl.lit("interact").alias("event"))
    if "value" not in df.columns:
        df = df.with_columns(pl.lit(None, dtype=pl.Float64).alias("value"))
    if "timestamp" not in df.columns:
        df = df.with_columns(pl.lit(0, dtype=pl.Int64).alias("timestamp"))
    event_w = (pl.col("event").fill_null("interact").str.to_lowercase()
               .replace_strict(ew, default=UNKNOWN_EVENT_WEIGHT, return_dtype=pl.Float64))
    vmax = pl.col("value").cast(pl.Float64).max().over("event")
    strength = (pl.when(pl.col("value").is_null() | (vmax <= 0)).then(1.0)
                .otherwise((pl.col("value").cast(pl.Float64) / vmax).clip(0.0, 1.0)))
    if half_life_days and half_life_days > 0:
        age = (pl.col("timestamp").max().over("user_id") - pl.col("timestamp")).cast(pl.Float64)
        decay = (0.5 ** (age / (half_life_days * 86400.0)))
    else:
        decay = pl.lit(1.0)
    return df.with_columns((event_w * strength * decay).alias("w"))


@dataclass(frozen=True)
class InteractionMatrix:
    """Users x items weights (duplicates summed) and the seen pattern (any interaction)."""

    user_ids: np.ndarray        # (U,) object
    weights: sp.csr_matrix      # (U, I) float64
    seen: sp.csr_matrix         # (U, I) bool, sorted indices
    n_unknown_items: int        # interaction rows whose item is not in the catalogue


def interaction_matrix(interactions: pl.DataFrame, item_ids: np.ndarray, *,
                       half_life_days: float | None = 30.0, event_weights: dict[str, float] | None = None,
                       user_ids: np.ndarray | None = None) -> InteractionMatrix:
    """Weighted user-item matrix on the given item order (and user order, else sorted ids)."""
    df = interaction_weights(interactions.with_columns(pl.col("user_id").cast(pl.Utf8),
                                                       pl.col("item_id").cast(pl.Utf8)),
                             half_life_days=half_life_days, event_weights=event_weights)
    items = pl.DataFrame({"item_id": np.asarray(item_ids).astype(str), "col": np.arange(len(item_ids))})
    if user_ids is None:
        user_ids = np.sort(df["user_id"].unique().to_numpy().astype(str)).astype(object)
    users = pl.DataFrame({"user_id": np.asarray(user_ids).astype(str), "row": np.arange(len(user_ids))})
    joined = df.join(items, on="item_id", how="left").join(users, on="user_id", how="inner")
    n_unknown = int(joined["col"].null_count())
    agg = (joined.filter(pl.col("col").is_not_null())
           .group_by("row", "col").agg(pl.col("w").sum()))
    shape = (len(user_ids), len(item_ids))
    r, c = agg["row"].to_numpy(), agg["col"].to_numpy()
    weights = sp.csr_matrix((agg["w"].to_numpy(), (r, c)), shape=shape)
    weights.sort_indices()
    seen = sp.csr_matrix((np.ones(len(r), dtype=bool), (r, c)), shape=shape)
    seen.sort_indices()
    return InteractionMatrix(np.asarray(user_ids, dtype=object), weights, seen, n_unknown)


@dataclass(frozen=True)
class HistoryProfile:
    """One modality's behaviour profile for each user."""

    direction: np.ndarray       # (U, d) unit vectors u_m (zero rows: no history in m)
    resultant_sq: np.ndarray    # (U,) ||p_m||^2, the agreement of the history
    sum_alpha_sq: np.ndarray    # (U,) sum of squared normalised weights (1/n_eff)
    n_eff: np.ndarray           # (U,) effective history length in m (0: none)


def history_profile(weights: sp.csr_matrix, block: np.ndarray, has: np.ndarray) -> HistoryProfile:
    """Weighted mean of the history's unit vectors in one modality (items lacking it skipped)."""
    w = weights @ sp.diags(has.astype(np.float64))     # drop items without the modality
    mass = np.asarray(w.sum(axis=1)).ravel()
    sq = np.asarray(w.multiply(w).sum(axis=1)).ravel()
    inv = np.divide(1.0, mass, out=np.zeros_like(mass), where=mass > 0)
    p = np.asarray((sp.diags(inv) @ w) @ block.astype(np.float64))
    r2 = (p * p).sum(axis=1)
    sum_a2 = sq * inv * inv
    n_eff = np.divide(1.0, sum_a2, out=np.zeros_like(sum_a2), where=sum_a2 > 0)
    return HistoryProfile(l2_normalise(p.astype(np.float32)), r2, sum_a2, n_eff)


def blend_content(direction: np.ndarray, n_eff: np.ndarray, content: np.ndarray,
                  content_strength: float) -> np.ndarray:
    """normalise(n/(n+k) behaviour + k/(n+k) content); either side may be a zero row."""
    has_b = np.linalg.norm(direction, axis=1) > 0
    has_c = np.linalg.norm(content, axis=1) > 0
    k = max(float(content_strength), 0.0)
    beh = np.where(has_b, n_eff, 0.0)
    cw = np.where(has_c, k if k > 0 else 1e-9, 0.0)
    total = beh + cw
    wb = np.divide(beh, total, out=np.zeros_like(beh), where=total > 0)
    wc = np.divide(cw, total, out=np.zeros_like(cw), where=total > 0)
    # a history with no content keeps its direction; content alone is used as it is
    return l2_normalise(direction * wb[:, None].astype(np.float32) + content * wc[:, None].astype(np.float32))


def behaviour_embeddings(weights: sp.csr_matrix, dim: int = 64, *, popularity_damping: float = 0.5,
                         seed: int = 0) -> np.ndarray:
    """Item vectors (I, k) from a truncated SVD of the user-item matrix; zero rows for items
    nobody interacted with. Columns are divided by popularity**damping and user rows by
    their L2 norm before the SVD, so neither heavy users nor blockbusters dominate."""
    x = weights.tocsr().astype(np.float64)
    row = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
    x = sp.diags(np.divide(1.0, row, out=np.zeros_like(row), where=row > 0)) @ x
    pop = np.asarray((weights > 0).sum(axis=0)).ravel().astype(np.float64)
    x = x @ sp.diags(np.divide(1.0, pop ** popularity_damping, out=np.zeros_like(pop), where=pop > 0))
    k = int(min(dim, min(x.shape) - 1))
    if k < 1 or x.nnz == 0:
        return np.zeros((x.shape[1], max(k, 1)), dtype=np.float32)
    s, vt = _randomized_svd(x, k, seed=seed)
    items = (vt.T * s).astype(np.float32)
    items[pop == 0] = 0.0
    return l2_normalise(items)


def _randomized_svd(x: sp.csr_matrix, k: int, *, n_oversample: int = 10, n_iter: int = 5, seed: int = 0
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k singular values and right singular vectors (Halko et al.), seeded; (k,), (k, n)."""
    rng = np.random.default_rng(seed)
    p = min(k + n_oversample, min(x.shape))
    # One BLAS thread: these QRs are of thin (n, k + 10) matrices, where a second thread only
    # waits (10x slower than one thread for 1,892 x 74 when the other core is busy).
    with threadpool_limits(1, "blas"):
        q, _ = np.linalg.qr(x @ rng.standard_normal((x.shape[1], p)))
        for _ in range(n_iter):  # power iterations sharpen the spectrum; QR keeps them stable
            q, _ = np.linalg.qr(x.T @ q)
            q, _ = np.linalg.qr(x @ q)
        b = np.asarray((x.T @ q).T)
        _, s, vt = np.linalg.svd(b, full_matrices=False)
    # fix signs so that reruns and platforms agree
    signs = np.sign(vt[np.arange(len(vt)), np.argmax(np.abs(vt), axis=1)])
    return s[:k], vt[:k] * signs[:k, None]


def popularity_vectors(interactions: pl.DataFrame, item_ids: np.ndarray, *,
                       half_life_days: float | None = None) -> np.ndarray:
    """The `popularity` modality: item i as the unit vector (r_i, sqrt(1 - r_i^2)) with
    r_i = log(1 + c_i) / log(1 + max c) in [0, 1], c_i its interaction count (each row
    decayed by 0.5 ** (age / half_life), age from the latest interaction of all, so recent
    popularity counts more). Every user's vector is (1, 0), so the cosine is r_i: a
    popularity prior whose weight the fusion search sets like any other modality's.
    Items without interactions get zero rows (they lack the modality)."""
    df = interactions.select(pl.col("item_id").cast(pl.Utf8), pl.col("timestamp").cast(pl.Int64))
    if half_life_days and half_life_days > 0 and df.height:
        age = (pl.col("timestamp").max() - pl.col("timestamp")).cast(pl.Float64)
        w = 0.5 ** (age / (half_life_days * 86400.0))
    else:
        w = pl.lit(1.0)
    counts = df.with_columns(w.alias("w")).group_by("item_id").agg(pl.col("w").sum())
    items = pl.DataFrame({"item_id": np.asarray(item_ids).astype(str)})
    c = items.join(counts, on="item_id", how="left")["w"].fill_null(0.0).to_numpy()
    out = np.zeros((len(item_ids), 2), dtype=np.float32)
    if c.max(initial=0.0) <= 0:
        return out
    r = np.log1p(c) / np.log1p(c.max())
    has = c > 0
    out[has, 0] = r[has]
    out[has, 1] = np.sqrt(np.maximum(1.0 - r[has] ** 2, 0.0))
    return out


# --------------------------------------------------------------------------- the retriever's blocks


def item_blocks(content: Blocks, inter: pl.DataFrame, modalities: tuple[str, ...], *,
                half_life_days: float | None, event_weights: dict[str, float] | None, behaviour_dim: int,
                seed: int) -> Blocks:
    """Content blocks plus the modalities learned from interactions (behaviour, popularity)
    that `modalities` names."""
    names, mats, masks = list(content.names), list(content.mats), [content.mask]
    if BEHAVIOUR in modalities:
        im = interaction_matrix(inter, content.ids, half_life_days=half_life_days, event_weights=event_weights)
        beh = behaviour_embeddings(im.weights, behaviour_dim, seed=seed)
        names.append(BEHAVIOUR)
        mats.append(beh)
        masks.append((np.linalg.norm(beh, axis=1) > 0)[:, None])
    if POPULARITY in modalities:
        pop = popularity_vectors(inter, content.ids, half_life_days=half_life_days)
        names.append(POPULARITY)
        mats.append(pop)
        masks.append((np.linalg.norm(pop, axis=1) > 0)[:, None])
    return Blocks(content.ids, tuple(names), tuple(mats), np.hstack(masks))


def user_state(im: InteractionMatrix, items: Blocks, user_content: Mapping[str, tuple[np.ndarray, np.ndarray]],
               mean_sq: dict[str, float] | None, *, modality_means: Mapping[str, np.ndarray],
               content_strength: float) -> tuple[Blocks, np.ndarray, dict[str, float]]:
    """User blocks (behaviour profile blended with own content), consistency kappa, ||mu||^2.

    mean_sq None computes ||mu||^2 from these users' histories (fitting); a fitted
    retriever passes its own for users given at query time.
    """
    uc = align_blocks(dict(user_content), items.names, im.user_ids, dims=dict(zip(items.names, items.dims)))
    mats: list[np.ndarray] = []
    kappa = np.zeros((len(im.user_ids), len(items.names)))
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
        if name in modality_means and uc.mask[:, j].any():
            c = np.where(uc.mask[:, j:j + 1], l2_normalise(c - modality_means[name]), 0.0).astype(np.float32)
        mats.append(blend_content(prof.direction, prof.n_eff, c, content_strength))
    mask = np.column_stack([np.linalg.norm(m, axis=1) > 0 for m in mats]) if mats else \
        np.zeros((len(im.user_ids), 0), dtype=bool)
    # Sums of many floats come out in a thread-dependent order (differences near 1e-16);
    # rounding keeps attention weights and the saved index byte-identical across runs.
    return Blocks(im.user_ids, items.names, tuple(mats), mask), np.round(kappa, 9), mean_sq


def personal_weights(weights: np.ndarray, mask: np.ndarray, kappa: np.ndarray, *, attention: bool,
                     beta: float) -> np.ndarray:
    """Each user's modality weights: attention (beta) or the global weights renormalised over A(u)."""
    if attention:
        return attention_weights(weights, kappa, mask, beta)
    return renormalise(weights, mask)
