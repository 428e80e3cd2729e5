"""Scoring and recommending from the artifacts (`fusionrec score`, `fusionrec recommend`).

`score` and `recommend` share one path: stage-1 columns from the Retriever, behaviour
features at the end of the log, then the ranker. A user the retriever cannot place (no
history, no content) is served from the most popular recent items with cold features,
never an error.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from fusionrec.pipeline.errors import FusionrecError
from fusionrec.pipeline.retrieval.stage import load_snapshot
from fusionrec.pipeline.retrieval.retriever import Retriever

from fusionrec.ranker.features import behaviour_features
from fusionrec.ranker.model import Ranker

POPULAR_DAYS = 30


def popular_items(interactions: pl.DataFrame, n: int, days: int = POPULAR_DAYS) -> pl.DataFrame:
    """item_id, count: the n most interacted items of the log's last `days` (all time if those are empty)."""
    end = int(interactions["timestamp"].max()) + 1
    recent = interactions.filter(pl.col("timestamp") >= end - days * 86_400)
    if recent.height == 0:
        recent = interactions
    return (recent.group_by("item_id").agg(pl.len().cast(pl.Float64).alias("count"))
            .sort(["count", "item_id"], descending=[True, False]).head(n))


def popular_fallback(user_ids: list[str], served: pl.DataFrame, interactions: pl.DataFrame, k: int) -> pl.DataFrame:
    """Top-k for wanted users that retrieval cannot place (no history, no content of their own).

    The ranker has nothing to rank them on, so they get the recent-popularity list in that
    order, with `score` = the item's interaction count over the last POPULAR_DAYS days.
    """
    from fusionrec.ranker.serving.export import topk

    missing = sorted(set(user_ids) - set(served["user_id"].unique().to_list()))
    if not missing:
        return served.clear()
    popular = popular_items(interactions, k)
    frame = pl.DataFrame({"user_id": missing}).join(popular, how="cross").rename({"count": "score"})
    return topk(frame.with_columns(pl.lit(None, pl.Float32).alias("retrieval_score")), k)


class Recommender:
    """The fitted two-stage model of one artifacts directory."""

    def __init__(self, art_dir: Path | str, *, use_ranker: bool = True) -> None:
        self.art_dir = Path(art_dir)
        self.catalog_ = load_snapshot(self.art_dir)
        index_dir = self.art_dir / "index"
        if not (index_dir / "retriever.json").is_file():
            raise FusionrecError(f"{self.art_dir} has no index: run `fusionrec index` (or `fusionrec run`) first")
        self.retriever_ = Retriever.load(index_dir)
        self.ranker_: Ranker | None = None
        if use_ranker:
            if not (self.art_dir / "ranker" / "model.txt").is_file():
                raise FusionrecError(f"{self.art_dir} has no ranker: run `fusionrec train` (or `fusionrec run`) first")
            self.ranker_ = Ranker.load(self.art_dir / "ranker")
        self.cutoff_ = int(self.catalog_.interactions["timestamp"].max()) + 1

    @property
    def known_users_(self) -> list[str]:
        return [str(u) for u in self.retriever_.user_ids_]

    def popular_items(self, n: int) -> list[str]:
        return popular_items(self.catalog_.interactions, n)

    def _features(self, stage1: pl.DataFrame) -> pl.DataFrame:
        return behaviour_features(stage1, self.catalog_.interactions, self.catalog_.items, self.cutoff_)

    def _score(self, features: pl.DataFrame, explain: bool) -> pl.DataFrame:
        if self.ranker_ is None:
            return features.with_columns(pl.col("retrieval_score").cast(pl.Float64).alias("score"))
        return self.ranker_.score(features, explain=explain)

    def recommend(self, user_ids: list[str] | None = None, k: int = 10, *, include_seen: bool = False,
                  explain: bool = False, use_ranker: bool = True) -> pl.DataFrame:
        """Top-k per user; `use_ranker=False` orders by the fused retrieval score alone (an ablation)."""
        from fusionrec.ranker.serving.export import recommend, topk

        cands = self.retriever_.candidates(user_ids, exclude_seen=not include_seen)
        if not use_ranker or self.ranker_ is None:
            ranked = topk(cands.with_columns(pl.col("retrieval_score").cast(pl.Float64).alias("score")), k)
        else:
            # Explanations cost about a millisecond a row: only the kept top-k rows are explained.
            ranked = recommend(self.ranker_, self._features(cands), k, explain=explain)
        if user_ids is None:
            return ranked
        fallback = popular_fallback(user_ids, ranked, self.catalog_.interactions, k)
        return pl.concat([ranked, fallback], how="diagonal_relaxed").sort("user_id", "rank") if fallback.height \
            else ranked

    def score(self, pairs: pl.DataFrame, *, explain: bool = False) -> pl.DataFrame:
        """`pairs` (user_id, item_id, other columns kept) plus stage-1 columns and `score`."""
        stage1 = self.retriever_.pair_features(pairs)
        return self._score(self._features(stage1), explain)


def read_users(path: Path | str) -> list[str]:
    """The user ids of a `--users` file (.parquet, .csv or .jsonl with a user_id column)."""
    from fusionrec.ranker.serving.export import read_id_table

    frame = read_id_table(path, ("user_id",))
    return frame["user_id"].drop_nulls().cast(pl.String).unique(maintain_order=True).to_list()
