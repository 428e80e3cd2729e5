"""Stage-1 candidate retrieval: fused item and user vectors in a FAISS inner-product index.

`Retriever` is the façade; each responsibility lives in its own module:

- `params`: the parameters, one frozen dataclass built from the config in one place;
- `inputs`: the interactions frame and the user universe;
- `weight_search`: fusion weights (and attention beta) on a temporal hold-out;
- `profiles`: item blocks with the interaction modalities, user blocks and attention;
- `fetch`: the FAISS fetch with exact re-scoring and the cold quota;
- `retriever_store`: save and load.

`Retriever.fit` (1) aligns the item modalities (content embeddings plus the `behaviour`
and `popularity` modalities learned from the interactions; items without interactions
lack those two and are served by content), centres each modality on its catalogue mean and
re-normalises (cosines of different encoders then share a zero point), (2) chooses the
fusion weights on a temporal hold-out of the given interactions (weight_search), (3) builds
user vectors from all given interactions and user content (profiles) and (4) indexes the
fused item vectors (fusion explains the scoring identity; faiss_index the index).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import polars as pl
import scipy.sparse as sp

from fusionrec.pipeline.config import Config
from fusionrec.pipeline.errors import FusionrecError, InputError
from fusionrec.pipeline.retrieval import faiss_index as fidx
from fusionrec.pipeline.retrieval import retriever_store as store
from fusionrec.pipeline.retrieval.fetch import ColdIndex, cold_index, feature_columns, gather_sims, retrieve
from fusionrec.pipeline.retrieval.fusion import (
    Blocks,
    align_blocks,
    fused_score,
    item_matrix,
    l2_normalise,
    query_matrix,
)
from fusionrec.pipeline.retrieval.inputs import (
    INTERACTIONS_SCHEMA,
    MODALITIES,
    as_interactions,
    listed_ids,
    user_universe,
)
from fusionrec.pipeline.retrieval.params import FUSIONS, RetrieverParams
from fusionrec.pipeline.retrieval.profiles import (
    BEHAVIOUR,
    POPULARITY,
    InteractionMatrix,
    interaction_matrix,
    item_blocks,
    personal_weights,
    user_state,
)
from fusionrec.pipeline.retrieval.weight_search import WeightSearch, weight_vector

__all__ = ["BEHAVIOUR", "POPULARITY", "Retriever", "RetrieverParams"]

_PARAM_NAMES = frozenset(RetrieverParams.names())


class Retriever:
    """Fused multimodal candidate retrieval (stage 1), scikit-learn style.

    `Retriever(params=None, **overrides)`: a `RetrieverParams` (see there for each
    parameter) and/or keyword overrides of its fields, e.g. `Retriever(fusion="attention",
    n_candidates=50)`. The parameters read as attributes too (`r.fusion`).
    """

    params: RetrieverParams
    weights_searched_: bool = False  # True when the weights came from another Retriever's search
    # fitted
    modalities_: tuple[str, ...]
    item_ids_: np.ndarray
    user_ids_: np.ndarray
    modality_means_: dict[str, np.ndarray]
    unused_user_modalities_: list[str]
    n_unknown_item_rows_: int
    weights_: dict[str, float]
    attention_beta_: float
    validation_: dict[str, Any]
    validation_recall_: float | None
    item_blocks_: Blocks
    user_blocks_: Blocks
    user_kappa_: np.ndarray
    user_weights_: np.ndarray
    mean_sq_: dict[str, float]
    seen_: sp.csr_matrix
    index_: faiss.Index
    tuning_: dict[str, Any]
    search_params_: dict[str, int]
    timings_: dict[str, float]
    index_info_: dict[str, Any]
    verified_files_: dict[str, str]  # loaded: sha256 by normalised path of the files `load` checked

    def __init__(self, params: RetrieverParams | None = None, /, **overrides: Any) -> None:
        self.params = dataclasses.replace(params or RetrieverParams(), **overrides)
        self._cold: ColdIndex | None = None
        self._cold_built = False

    @classmethod
    def from_config(cls, cfg: Config) -> Retriever:
        """An unfitted Retriever with the parameters the typed config sets."""
        return cls(RetrieverParams.from_config(cfg))

    def __getattr__(self, name: str) -> Any:
        # Only reached for names not set on the instance: the parameters read as attributes.
        if name in _PARAM_NAMES and "params" in self.__dict__:
            return getattr(self.__dict__["params"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def get_params(self) -> dict[str, Any]:
        return self.params.as_dict()

    def with_chosen_weights(self) -> Retriever:
        """An unfitted Retriever that keeps this one's chosen weights and attention beta (no search)."""
        chosen = dataclasses.replace(self.params, weights=dict(self.weights_), attention_beta=self.attention_beta_,
                                     validation_fraction=0.0)
        out = type(self)(chosen)
        out.weights_searched_ = self._weights_source() == "validation_search"
        return out

    def _weights_source(self) -> str:
        if self.weights_searched_:
            return "validation_search"  # searched by the Retriever these weights were taken from
        p = self.params
        return "fixed" if (p.weights is not None or p.fusion == "concat") else "validation_search"

    # ------------------------------------------------------------------ fitting
    def fit(self, item_modalities: MODALITIES, interactions: pl.DataFrame,
            user_modalities: MODALITIES | None = None, *, held_out: pl.DataFrame | None = None) -> Retriever:
        """Learn weights on a hold-out, then profiles and the index on all `interactions`.

        held_out: later interactions to choose the weights on (the ranker's label split);
        None carves a temporal hold-out of `validation_fraction` from `interactions`.
        """
        p = self.params
        if p.fusion not in FUSIONS:
            raise ValueError(f"fusion must be 'weighted', 'attention' or 'concat', not {p.fusion!r}")
        fidx.set_threads(p.n_threads)
        self._cold, self._cold_built = None, False
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        inter = as_interactions(interactions)
        content = {k: v for k, v in item_modalities.items() if len(v[0])}
        use_behaviour = p.behaviour_dim > 0 and inter.height > 0
        if not content and not use_behaviour:
            raise FusionrecError("no item embeddings and no interactions: nothing to index")
        content_names = tuple(sorted(content))
        self.modalities_ = content_names + ((BEHAVIOUR,) if use_behaviour else ()) \
            + ((POPULARITY,) if p.popularity and inter.height > 0 else ())
        ids: set[str] = set()
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
            mean = x[has].mean(axis=0) if p.center and has.any() else np.zeros(x.shape[1], np.float32)
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
        choice = WeightSearch(p, self.modalities_, self.item_ids_, self.modality_means_).choose(
            cblocks, inter_known, user_content, held_out=None if held_out is None else as_interactions(held_out))
        self.weights_, self.attention_beta_ = choice.weights, choice.attention_beta
        self.validation_recall_, self.validation_ = choice.validation_recall, choice.record
        timings["weight_search_s"] = time.perf_counter() - t1

        # (3) profiles from everything
        t2 = time.perf_counter()
        self.item_blocks_ = item_blocks(cblocks, inter_known, self.modalities_, half_life_days=p.half_life_days,
                                        event_weights=p.event_weights, behaviour_dim=p.behaviour_dim, seed=p.seed)
        im = interaction_matrix(inter_known, self.item_ids_, half_life_days=p.half_life_days,
                                event_weights=p.event_weights, user_ids=user_universe(inter_known, user_content))
        ub, kappa, mean_sq = self._user_state(im, user_content, mean_sq=None)
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
        # The family is chosen for the configured depth and recall (nprobe is tuned again below
        # on the users' own queries).
        self.index_ = fidx.build_index(xb, p.index_factory, seed=p.seed, exact_max=p.exact_max_items,
                                       memory_budget=int(p.index_memory_budget_gb * (1 << 30)),
                                       k=p.n_candidates, target_recall=p.target_recall)
        timings["index_build_s"] = time.perf_counter() - t3
        t4 = time.perf_counter()
        active = np.flatnonzero(ub.mask.any(axis=1))
        rng = np.random.default_rng(p.seed)
        sample = np.sort(active if len(active) <= p.tune_queries
                         else rng.choice(active, p.tune_queries, replace=False))
        q = query_matrix(ub.take(sample), self.user_weights_[sample])
        self.tuning_ = fidx.tune_search_params(self.index_, q, p.n_candidates, p.target_recall, base=xb) \
            if len(sample) else {"params": {}, "recall": None, "trials": [], "reached": False}
        self.search_params_ = dict(self.tuning_["params"])
        timings["index_tune_s"] = time.perf_counter() - t4
        timings["fit_s"] = time.perf_counter() - t0
        self.timings_ = timings
        self.index_info_ = fidx.describe(self.index_)
        return self

    def _user_state(self, im: InteractionMatrix, user_content: MODALITIES, mean_sq: dict[str, float] | None
                    ) -> tuple[Blocks, np.ndarray, dict[str, float]]:
        return user_state(im, self.item_blocks_, user_content, mean_sq, modality_means=self.modality_means_,
                          content_strength=self.params.content_strength)

    def _weight_vector(self) -> np.ndarray:
        return weight_vector(self.weights_, self.modalities_)

    def _personal_weights(self, mask: np.ndarray, kappa: np.ndarray) -> np.ndarray:
        return personal_weights(self._weight_vector(), mask, kappa, attention=self.params.fusion == "attention",
                                beta=self.attention_beta_)

    # ------------------------------------------------------------------ retrieval
    def _check_fitted(self) -> None:
        if not hasattr(self, "index_"):
            raise FusionrecError("Retriever is not fitted: call fit() or Retriever.load()")

    def _cold_index(self) -> ColdIndex | None:
        """Exact index over the items without interactions (built on first use, not saved)."""
        if not self._cold_built:
            self._cold = cold_index(self.item_blocks_, self.modalities_, self._weight_vector())
            self._cold_built = True
        return self._cold

    def _retrieve(self, ub: Blocks, weights: np.ndarray, seen: sp.csr_matrix | None, k: int) -> pl.DataFrame:
        cold = self._cold_index() if self.params.cold_share > 0 else None
        return retrieve(self.params, self.index_, self.search_params_, self.item_blocks_, self.modalities_, cold,
                        ub, weights, seen, k)

    def _depth(self, k: int | None) -> int:
        """`k` rows a user, `index.n_candidates` when None (`k or ...` turned k = 0 into 100 rows)."""
        if k is None:
            return self.params.n_candidates
        if k < 1:
            raise InputError(f"k must be at least 1, not {k}", field="k")
        return int(k)

    def candidates(self, user_ids: list[str] | None = None, k: int | None = None, exclude_seen: bool = True
                   ) -> pl.DataFrame:
        """Top-k (default n_candidates) items per known user: user_id, item_id, retrieval_rank,
        retrieval_score, sim_<modality>, attn_<modality>. Unknown user ids give no rows."""
        self._check_fitted()
        if user_ids is None:
            rows = np.arange(len(self.user_ids_))
        else:
            lookup = pl.DataFrame({"user_id": self.user_ids_.astype(str), "row": np.arange(len(self.user_ids_))})
            want = pl.DataFrame({"user_id": pl.Series(listed_ids(user_ids), dtype=pl.Utf8)}).unique(maintain_order=True)
            rows = want.join(lookup, on="user_id", how="inner", maintain_order="left")["row"].to_numpy()
        return self._retrieve(self.user_blocks_.take(rows), self.user_weights_[rows],
                              self.seen_[rows] if exclude_seen else None, self._depth(k))

    def pair_features(self, pairs: pl.DataFrame, exclude_seen: bool = True) -> pl.DataFrame:
        """The candidate columns for arbitrary (user_id, item_id) pairs, in the input order.

        retrieval_rank is the item's rank in the user's top n_candidates (null outside it);
        unknown users or items get nulls. Other input columns are kept.
        """
        self._check_fitted()
        mods = self.modalities_
        feats = ["retrieval_rank", "retrieval_score"] + [f"{p}_{m}" for p in ("sim", "attn") for m in mods]
        base = pairs.drop([c for c in feats if c in pairs.columns]).with_columns(
            pl.col("user_id").cast(pl.Utf8), pl.col("item_id").cast(pl.Utf8)).with_row_index("__row")
        users = pl.DataFrame({"user_id": self.user_ids_.astype(str), "__u": np.arange(len(self.user_ids_))})
        items = pl.DataFrame({"item_id": self.item_ids_.astype(str), "__i": np.arange(len(self.item_ids_))})
        j = base.join(users, on="user_id", how="left").join(items, on="item_id", how="left").sort("__row")
        known = (j["__u"].is_not_null() & j["__i"].is_not_null()).to_numpy()
        u = j["__u"].fill_null(0).to_numpy()
        i = j["__i"].fill_null(0).to_numpy()
        sims, avail = gather_sims(self.user_blocks_, u, self.item_blocks_, i[:, None])
        sims, avail = sims[:, 0], avail[:, 0] & known[:, None]
        w = self.user_weights_[u]
        score = fused_score(sims, avail, w).astype(np.float32)
        cols = [pl.Series("retrieval_score", score, dtype=pl.Float32).fill_nan(None)]
        cols += feature_columns(mods, sims, avail, w)
        out = j.with_columns(cols).with_columns(
            [pl.when(pl.Series(known)).then(pl.col(f"attn_{m}")).otherwise(None).alias(f"attn_{m}") for m in mods])
        cand_users = out.filter(pl.Series(known))["user_id"].unique().to_list()
        ranks = self.candidates(cand_users, self.params.n_candidates, exclude_seen=exclude_seen).select(
            "user_id", "item_id", "retrieval_rank") if cand_users else \
            pl.DataFrame(schema={"user_id": pl.Utf8, "item_id": pl.Utf8, "retrieval_rank": pl.Int32})
        out = out.join(ranks, on=["user_id", "item_id"], how="left").sort("__row")
        return out.select([c for c in pairs.columns if c not in feats] + feats)

    def user_vectors(self, history: pl.DataFrame | None = None, user_modalities: MODALITIES | None = None
                     ) -> tuple[Blocks, np.ndarray, InteractionMatrix]:
        """User blocks, personal weights and interactions for users given at query time (no refit)."""
        self._check_fitted()
        p = self.params
        hist = as_interactions(history) if history is not None and history.height else \
            pl.DataFrame(schema=INTERACTIONS_SCHEMA)
        content = {k: v for k, v in (user_modalities or {}).items() if k in self.modalities_ and len(v[0])}
        im = interaction_matrix(hist, self.item_ids_, half_life_days=p.half_life_days,
                                event_weights=p.event_weights, user_ids=user_universe(hist, content))
        ub, kappa, _ = self._user_state(im, content, mean_sq=self.mean_sq_)
        return ub, self._personal_weights(ub.mask, kappa), im

    def recommend_for_history(self, history: pl.DataFrame | None, k: int | None = None,
                              user_modalities: MODALITIES | None = None, exclude_seen: bool = True
                              ) -> pl.DataFrame:
        """Candidates for users given only now: a few interactions (columns item_id and
        optionally user_id, timestamp, event, value; no user_id means one user "query")
        and/or their own content embeddings ({modality: (ids, matrix)}). No refit."""
        if history is not None and "user_id" not in history.columns:
            history = history.with_columns(pl.lit("query").alias("user_id"))
        ub, w, im = self.user_vectors(history, user_modalities)
        return self._retrieve(ub, w, im.seen if exclude_seen else None, self._depth(k))

    # ------------------------------------------------------------------ summary and persistence
    def summary_(self) -> dict[str, Any]:
        """Weights, attention statistics, index, tuned parameters, recalls and timings (for the manifest)."""
        self._check_fitted()
        p, mods = self.params, self.modalities_
        attn = {}
        for j, m in enumerate(mods):
            has = self.user_blocks_.mask[:, j]
            a = self.user_weights_[has, j]
            attn[m] = {"mean": float(a.mean()) if len(a) else None,
                       "p10": float(np.quantile(a, 0.1)) if len(a) else None,
                       "p90": float(np.quantile(a, 0.9)) if len(a) else None}
        beh = mods.index(BEHAVIOUR) if BEHAVIOUR in mods else None
        return {
            "fusion": p.fusion, "modalities": list(mods), "weights": self.weights_,
            "weights_source": self._weights_source(),
            "attention_beta": self.attention_beta_ if p.fusion == "attention" else None,
            "user_modality_weights": attn, "validation": self.validation_,
            "validation_recall": self.validation_recall_,
            "index": {**self.index_info_, "factory": p.index_factory},
            "search_params": self.search_params_,
            "tuning": dict(self.tuning_),
            "target_recall": p.target_recall,
            "counts": {"items": int(len(self.item_ids_)), "users": int(len(self.user_ids_)),
                       "items_per_modality": {m: int(self.item_blocks_.mask[:, j].sum()) for j, m in enumerate(mods)},
                       "cold_items": int((~self.item_blocks_.mask[:, beh]).sum()) if beh is not None else None,
                       "items_with_interactions":
                           int(self.item_blocks_.mask[:, beh].sum()) if beh is not None else None,
                       "users_per_modality": {m: int(self.user_blocks_.mask[:, j].sum()) for j, m in enumerate(mods)},
                       "interaction_rows_unknown_item": int(self.n_unknown_item_rows_)},
            "unused_user_modalities": self.unused_user_modalities_,
            "timings": self.timings_,
        }

    def save(self, directory: Path, partners: tuple[str, ...] = ()) -> None:
        """index.faiss, items.parquet, users.parquet, seen.parquet, retriever.json (written last;
        with the sha256 of `partners` too, files relative to `directory` saved before it)."""
        self._check_fitted()
        store.save(store.Stored(
            params=self.params, modalities=self.modalities_, weights=self.weights_,
            attention_beta=self.attention_beta_, modality_means=self.modality_means_, mean_sq=self.mean_sq_,
            search_params=self.search_params_, tuning=self.tuning_, validation=self.validation_,
            validation_recall=self.validation_recall_, timings=self.timings_, index_info=self.index_info_,
            unused_user_modalities=self.unused_user_modalities_, n_unknown_item_rows=self.n_unknown_item_rows_,
            item_blocks=self.item_blocks_, user_blocks=self.user_blocks_, user_weights=self.user_weights_,
            user_kappa=self.user_kappa_, seen=self.seen_, index=self.index_), directory, partners)

    @classmethod
    def load(cls, directory: Path, *, mmap: bool = False) -> Retriever:
        """A fitted Retriever from `save`'s files; the index is read, not rebuilt (mmap: memory-mapped,
        shared by the processes that map the same file)."""
        s = store.load(directory, mmap=mmap)
        self = cls(s.params)
        self.modalities_, self.weights_, self.attention_beta_ = s.modalities, s.weights, s.attention_beta
        self.modality_means_, self.mean_sq_, self.search_params_ = s.modality_means, s.mean_sq, s.search_params
        self.tuning_, self.validation_ = s.tuning, s.validation
        self.validation_recall_, self.timings_ = s.validation_recall, s.timings
        self.index_info_ = s.index_info
        self.unused_user_modalities_ = s.unused_user_modalities
        self.n_unknown_item_rows_ = s.n_unknown_item_rows
        self.item_blocks_, self.item_ids_ = s.item_blocks, s.item_blocks.ids
        self.user_blocks_, self.user_ids_ = s.user_blocks, s.user_blocks.ids
        self.user_weights_, self.user_kappa_ = s.user_weights, s.user_kappa
        self.seen_, self.index_ = s.seen, s.index
        self.verified_files_ = s.verified
        return self
