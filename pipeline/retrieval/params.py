"""The Retriever's parameters, written once: a frozen dataclass built from the typed config
in one place (`RetrieverParams.from_config`), used by `Retriever.__init__`, `get_params` and
the saved `retriever.json`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from fusionrec.pipeline.config import Config
from fusionrec.pipeline.retrieval.faiss_index import EXACT_MAX_ITEMS

FUSIONS = ("weighted", "attention", "concat")


@dataclass(frozen=True)
class RetrieverParams:
    """fusion: "weighted" (one global weight vector), "attention" (personal weights
    softmax(log w + beta * consistency)), "concat" (equal weights, the baseline).
    weights: fixed modality weights (modalities not named get 0); None searches them on a
    temporal hold-out of validation_fraction. behaviour_dim: size of the collaborative
    `behaviour` modality (0 leaves it out). popularity: add the `popularity` modality (a prior
    whose weight the search sets; see pipeline.retrieval.profiles.popularity_vectors).
    cold_share: share of each candidate list kept for the best items without interactions.
    content_strength: a user's own content counts as that many interactions. attention_beta:
    fixed attention temperature (None: chosen on the hold-out from beta_grid).
    """

    fusion: str = "weighted"
    weights: dict[str, float] | None = None
    half_life_days: float | None = 30.0
    event_weights: dict[str, float] | None = None
    validation_fraction: float = 0.1
    index_factory: str = "auto"
    target_recall: float = 0.95
    n_candidates: int = 100
    seed: int = 0
    behaviour_dim: int = 64
    content_strength: float = 5.0
    attention_beta: float | None = None
    beta_grid: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
    min_weight: float = 0.05
    center: bool = True
    validation_max_users: int = 1000
    tune_queries: int = 1000
    exact_max_items: int = EXACT_MAX_ITEMS
    index_memory_budget_gb: float = 4.0
    overfetch: float = 2.0
    popularity: bool = True
    cold_share: float = 0.1
    n_threads: int | None = None

    @classmethod
    def from_config(cls, cfg: Config) -> RetrieverParams:
        """The parameters the typed config sets (the rest keep their defaults)."""
        fusion = cfg.fusion
        return cls(fusion=fusion.method, weights=dict(fusion.weights) or None, half_life_days=fusion.half_life_days,
                   event_weights=dict(fusion.event_weights), validation_fraction=fusion.validation_fraction,
                   index_factory=cfg.index.factory, target_recall=cfg.index.target_recall,
                   n_candidates=cfg.index.n_candidates, seed=cfg.ranker.seed, behaviour_dim=fusion.behaviour_dim,
                   popularity=fusion.popularity, cold_share=fusion.cold_share,
                   attention_beta=fusion.attention_beta if fusion.attention_beta >= 0 else None)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def as_dict(self) -> dict[str, Any]:
        """{name: value}, the values themselves (get_params)."""
        return {name: getattr(self, name) for name in self.names()}

    def to_json(self) -> dict[str, Any]:
        """as_dict with JSON types (beta_grid a list), as saved in retriever.json."""
        return {**self.as_dict(), "beta_grid": list(self.beta_grid)}

    @classmethod
    def from_json(cls, state: dict[str, Any]) -> RetrieverParams:
        return cls(**{**state, "beta_grid": tuple(state["beta_grid"])})
