"""Multimodal fusion: per-modality embeddings to one vector per item and per user.

Notation: modalities m = 1..M (text, image, audio, any precomputed name, and the behaviour
and popularity modalities learned from interactions, see pipeline.profiles), each
with its own dimension d_m. x_{i,m} is item i's L2-normalised vector in modality m and
u_{u,m} user u's; A(i), A(u) are the modalities each one has; cos_m = <u_{u,m}, x_{i,m}>.

**Fused score.** With non-negative modality weights w (summing to 1) the fused
similarity of user u and item i is the weighted mean of the per-modality cosines over the
modalities both have, the weights shared out over those modalities::

    s(u, i) = sum_{m in A(u) & A(i)} w_m cos_m  /  sum_{m in A(u) & A(i)} w_m

so a missing modality never counts against an item (or a user): its weight goes to the
modalities that are there. Weighted fusion uses one global w; attention fusion gives each
user their own w (see `attention_weights`); concatenation is the baseline w_m = 1/M.

**The index identity.** Dimensions differ, so items are stored as the concatenation of
their *unweighted* unit blocks, scaled by the inverse of the weight mass they have, and a
user's query carries the weights::

    item vector   v_i = concat_m( x_{i,m} / W_i ),   W_i = sum_{m in A(i)} wbar_m
    user query    q_u = concat_m( a_{u,m} u_{u,m} ), a_u = w_u renormalised over A(u)
    <q_u, v_i>    = sum_{m in A(u) & A(i)} a_{u,m} cos_m / W_i

(missing blocks are zero vectors). wbar are the global weights the index was built with.
With global weights (wbar = w) the inner product equals s(u, i) exactly whenever the user
or the item has every modality; with per-user attention weights it is exact whenever the
item has every modality. In the remaining cases the retriever over-fetches from FAISS and
re-scores the fetched items with s(u, i) exactly, so returned scores are always s(u, i).
Because the weights live on the query side, personal weights need no index rebuild.
(The symmetric alternative, both sides scaled by sqrt(w_m), gives sum_m w_m cos_m too but
bakes w into the index.)
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from fusionrec.pipeline.encoders.base import l2_normalise
from fusionrec.pipeline.io.vectors import read_vectors

_ID_COLUMNS = ("id", "item_id", "user_id")


def read_embedding_table(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One embedding Parquet table -> (ids as object array, float32 matrix, rows unit-length).

    Accepts the artifact layout (`id, content_hash, model, vector`) and the precomputed
    input layout (`item_id`/`user_id, vector`); vectors may be fixed-size or plain lists.
    Rows with a null vector are dropped (that id lacks the modality). Validation is
    `pipeline.io.vectors.read_vectors`, the embedding job's own (1-based rows).
    """
    ids, x = read_vectors(path, _ID_COLUMNS, drop_missing=True)
    if len(ids) == 0:
        return np.empty(0, dtype=object), np.zeros((0, 0), dtype=np.float32)
    return ids.to_numpy().astype(object), l2_normalise(x)


def load_modalities(emb_dir: Path, kind: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """All `{kind}_<modality>.parquet` tables in emb_dir -> {modality: (ids, matrix)}.

    kind is "item" or "user". Empty tables are left out; a missing directory gives {}.
    """
    if kind not in ("item", "user"):
        raise ValueError(f"kind must be 'item' or 'user', not {kind!r}")
    emb_dir = Path(emb_dir)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if not emb_dir.is_dir():
        return out
    for path in sorted(emb_dir.glob(f"{kind}_*.parquet")):
        name = path.stem[len(kind) + 1:]
        ids, x = read_embedding_table(path)
        if len(ids):
            out[name] = (ids, x)
    return out


@dataclass(frozen=True)
class Blocks:
    """Per-modality matrices aligned on one id list; rows of absent modalities are zero."""

    ids: np.ndarray                    # (n,) object
    names: tuple[str, ...]             # modality order
    mats: tuple[np.ndarray, ...]       # each (n, d_m) float32
    mask: np.ndarray                   # (n, M) bool: row has modality m

    @property
    def dims(self) -> tuple[int, ...]:
        return tuple(m.shape[1] for m in self.mats)

    def take(self, rows: np.ndarray) -> Blocks:
        return Blocks(self.ids[rows], self.names, tuple(m[rows] for m in self.mats), self.mask[rows])


def align_blocks(modalities: dict[str, tuple[np.ndarray, np.ndarray]], names: tuple[str, ...],
                 ids: np.ndarray, dims: dict[str, int] | None = None) -> Blocks:
    """Place each modality's rows on the given id order (ids not in a table get zeros)."""
    ids = np.asarray(ids, dtype=object)
    pos = pl.DataFrame({"id": ids.astype(str), "row": np.arange(len(ids))})
    mats, mask = [], np.zeros((len(ids), len(names)), dtype=bool)
    for j, name in enumerate(names):
        if name in modalities:
            mids, x = modalities[name]
            src = pl.DataFrame({"id": np.asarray(mids).astype(str), "src": np.arange(len(mids))})
            hit = pos.join(src, on="id", how="inner")
            out = np.zeros((len(ids), x.shape[1]), dtype=np.float32)
            rows, srcs = hit["row"].to_numpy(), hit["src"].to_numpy()
            out[rows] = x[srcs]
            mask[rows, j] = np.linalg.norm(x[srcs], axis=1) > 0
        else:
            out = np.zeros((len(ids), (dims or {}).get(name, 0)), dtype=np.float32)
        mats.append(out)
    return Blocks(ids, tuple(names), tuple(mats), mask)


def renormalise(weights: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Weights shared out over the available modalities: w_m [m in A] / sum_{A} w.

    weights is (M,) or (n, M); mask (n, M). Rows with no weighted modality get zeros.
    """
    w = np.broadcast_to(np.asarray(weights, dtype=np.float64), mask.shape) * mask
    total = w.sum(axis=1, keepdims=True)
    return np.divide(w, total, out=np.zeros_like(w), where=total > 0)


def item_matrix(blocks: Blocks, weights: np.ndarray) -> np.ndarray:
    """Index vectors v_i = concat_m(x_{i,m} / W_i) with W_i = sum_{A(i)} w_m (see module doc)."""
    mass = (blocks.mask * np.asarray(weights, dtype=np.float64)).sum(axis=1)
    scale = np.divide(1.0, mass, out=np.zeros_like(mass), where=mass > 0).astype(np.float32)
    return np.ascontiguousarray(np.hstack([m * scale[:, None] for m in blocks.mats]), dtype=np.float32)


def query_matrix(blocks: Blocks, user_weights: np.ndarray) -> np.ndarray:
    """Query vectors q_u = concat_m(a_{u,m} u_{u,m}), a_u renormalised over A(u)."""
    a = renormalise(user_weights, blocks.mask).astype(np.float32)
    return np.ascontiguousarray(np.hstack([m * a[:, j:j + 1] for j, m in enumerate(blocks.mats)]),
                                dtype=np.float32)


def fused_score(sims: np.ndarray, avail: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Exact s(u, i) from per-modality cosines.

    sims (..., M) cosines, avail (..., M) bool (both sides have the modality), weights
    broadcastable to (..., M). Pairs sharing no weighted modality score NaN.
    """
    w = np.broadcast_to(weights, sims.shape) * avail
    den = w.sum(axis=-1)
    num = (np.where(avail, sims, 0.0) * w).sum(axis=-1)
    return np.divide(num, den, out=np.full(den.shape, np.nan), where=den > 0)


def consistency(resultant_sq: np.ndarray, sum_alpha_sq: np.ndarray, mean_sq: np.ndarray | float) -> np.ndarray:
    """How much more a user's history agrees within a modality than a random history.

    resultant_sq = ||p_m||^2 for the weighted mean p_m of the user's history vectors,
    sum_alpha_sq = sum_j alpha_j^2 of the normalised history weights (1/n for n equal
    weights), mean_sq = ||mu_m||^2 of the population's mean history vector. For histories
    drawn at random from the population E||p_m||^2 = ||mu||^2 + sum alpha^2 (1 - ||mu||^2),
    so kappa = (||p_m||^2 - ||mu||^2) / (1 - ||mu||^2) - sum alpha^2 is ~0 for a random
    history and exactly 0 for a single item; n equally weighted identical items give
    1 - 1/n, so short histories are shrunk towards 0 (no evidence either way).
    """
    spread = np.maximum(1.0 - mean_sq, 1e-6)
    return (resultant_sq - mean_sq) / spread - sum_alpha_sq


def attention_weights(prior: np.ndarray, kappa: np.ndarray, mask: np.ndarray, beta: float) -> np.ndarray:
    """Personal modality weights a_{u,m} = softmax_m(log w_m + beta kappa_{u,m}) over A(u).

    This is a_m = softmax(s_m . u) with s_m = (log w_m, kappa_{u,m}) the modality's
    evidence and u = (1, beta) the attention vector; kappa makes it personal (a modality in
    which the user's history is consistent earns weight). beta = 0 gives weighted fusion.
    """
    with np.errstate(divide="ignore"):
        logits = np.log(np.asarray(prior, dtype=np.float64))[None, :] + beta * np.nan_to_num(kappa)
    logits = np.where(mask, logits, -np.inf)
    top = np.max(logits, axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    e = np.exp(logits - top)
    total = e.sum(axis=1, keepdims=True)
    return np.divide(e, total, out=np.zeros_like(e), where=total > 0)


def simplex_grid(n: int, step: float | None = None, floor: float = 0.0, max_points: int = 400,
                 seed: int = 0) -> np.ndarray:
    """Candidate weight vectors on the simplex: (G, n), rows sum to 1, each entry >= floor.

    A regular grid (step 0.1 for up to 4 modalities, coarser beyond) mapped into the
    floored simplex; when the grid would exceed max_points, seeded Dirichlet samples plus
    the vertices and the centre.
    """
    if n == 1:
        return np.ones((1, 1))
    if step is None:
        step = 0.1 if n <= 4 else 0.2 if n <= 6 else 0.25
    s = int(round(1 / step))
    size = int(np.prod(range(s + 1, s + n)) / np.prod(range(1, n)))
    if size <= max_points:
        pts = np.array([c for c in itertools.product(range(s + 1), repeat=n - 1) if sum(c) <= s])
        grid = np.column_stack([pts, s - pts.sum(axis=1)]) / s
    else:
        rng = np.random.default_rng(seed)
        grid = np.vstack([np.eye(n), np.full((1, n), 1 / n), rng.dirichlet(np.ones(n), max_points - n - 1)])
    floor = min(max(floor, 0.0), 1.0 / n)
    return floor + (1 - n * floor) * grid


def search_simplex(evaluate, n: int, *, floor: float = 0.0, coarse_step: float | None = None,
                   steps: tuple[float, ...] = (0.1, 0.05, 0.025), seed: int = 0) -> dict:
    """Maximise evaluate over weight vectors on the floored simplex.

    evaluate maps a (G, n) array of weight rows to G scores. A coarse grid (plus the equal
    weights) is scored first; then a pattern search moves `step` of weight from one
    modality to another while that improves the score, halving the step down to the last
    of `steps`. Ties prefer the point nearer to equal weights. Returns {"weights", "score",
    "evaluations", "coarse_size"}.
    """
    if n == 1:
        w = np.ones((1, 1))
        return {"weights": w[0], "score": float(evaluate(w)[0]), "evaluations": 1, "coarse_size": 1}
    if coarse_step is None:
        coarse_step = 0.2 if n <= 5 else 0.25
    floor = min(max(floor, 0.0), 1.0 / n)
    grid = np.vstack([simplex_grid(n, coarse_step, floor=floor, seed=seed), np.full((1, n), 1.0 / n)])
    scores = np.asarray(evaluate(grid), dtype=np.float64)
    seen = {tuple(np.round(g, 6)): s for g, s in zip(grid, scores)}

    def pick(points: np.ndarray, vals: np.ndarray) -> int:
        top = np.flatnonzero(vals >= vals.max() - 1e-12)
        return int(top[np.argmin(np.linalg.norm(points[top] - 1.0 / n, axis=1))])

    i = pick(grid, scores)
    best, best_score = grid[i], float(scores[i])
    for step in steps:
        while True:
            steps_to: list[np.ndarray] = []
            for a, b in itertools.permutations(range(n), 2):
                w = best.copy()
                w[a] -= step
                w[b] += step
                if w[a] >= floor - 1e-9 and tuple(np.round(w, 6)) not in seen:
                    steps_to.append(np.maximum(w, floor))
            if not steps_to:
                break
            moves = np.array(steps_to)
            vals = np.asarray(evaluate(moves), dtype=np.float64)
            seen.update({tuple(np.round(g, 6)): s for g, s in zip(moves, vals)})
            j = pick(moves, vals)
            if vals[j] <= best_score + 1e-9:
                break
            best, best_score = moves[j], float(vals[j])
    return {"weights": best / best.sum(), "score": best_score, "evaluations": len(seen),
            "coarse_size": int(len(grid))}
