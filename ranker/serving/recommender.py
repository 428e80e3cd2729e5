"""Scoring and recommending from the artifacts (`fusionrec score`, `fusionrec recommend`).

`score` and `recommend` share one path: the candidate model's columns (every source's
score, z-score and rank, and the blend), behaviour and user-attribute features at the end
of the log, then the ranker where the guard shipped it. Every user gets a list: one
without history is served from the popularity sources (overall and of their segment in
the users table) and from their own content where they have some, in that order: the
ranker reorders users with history only, the only users it learns from and is checked on.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from fusionrec.pipeline.config import RerankConfig
from fusionrec.pipeline.errors import ConfigError, FusionrecError, InputError
from fusionrec.pipeline.retrieval.candidates import (
    CandidateModel,
    content_modality,
    content_vectors,
    explain_blend,
    user_content_vectors,
)
from fusionrec.pipeline.retrieval.retriever import BEHAVIOUR, POPULARITY, Retriever
from fusionrec.pipeline.retrieval.stage import embeddings, load_snapshot
from fusionrec.ranker.model import Ranker
from fusionrec.ranker.rerank import RerankInputs, read_rules
from fusionrec.ranker.rerank import rerank as rerank_lists
from fusionrec.ranker.serving.export import TOPK_SCHEMA, read_id_table, topk, topk_scored
from fusionrec.ranker.training import GUARD_FILE, lineage, pair_features

log = logging.getLogger("fusionrec.serving")


class Recommender:
    """The fitted two-stage model of one artifacts directory.

    Candidates come from the blended sources (`ART/sources/`); the ranker's order is used
    when the train stage's guard shipped it (`ART/ranker/guard.json`), else the retrieval
    (blend) order. `order_` says which; each row's `source` says which list its `score` is
    from: "ranker" (users with history, when the ranker's order ships), else "retrieval"
    (the blend), "content" or "popular" (users without history, whatever the order).

    Users without history keep their cold-start order even when the ranker ships: its labels
    are held out after a history, so it never learns from them, and the guard never checks
    it on them. On validation it lost there (new users of a global temporal hold-out of
    MovieLens' training part: docs/quality.md, "Users without history").
    """

    def __init__(self, art_dir: Path | str, *, use_ranker: bool = True, mmap_index: bool = False) -> None:
        self.art_dir = Path(art_dir)
        self.catalog_ = load_snapshot(self.art_dir)
        index_dir = self.art_dir / "index"
        if not (index_dir / "retriever.json").is_file() or not (self.art_dir / "sources" / "sources.json").is_file():
            raise FusionrecError(f"{self.art_dir} has no index: run `fusionrec index` (or `fusionrec run`) first")
        self.retriever_ = Retriever.load(index_dir, mmap=mmap_index)
        item_mods, user_mods = embeddings(self.art_dir)
        # A content table the index was built with must still be there: without it the lists
        # would change silently (its modality's similarities and the content source drop out).
        lost = [m for m in self.retriever_.modalities_ if m not in (BEHAVIOUR, POPULARITY) and m not in item_mods]
        if lost:
            raise FusionrecError(f"artifact {self.art_dir / 'embeddings' / f'item_{lost[0]}.parquet'} is missing or "
                                 f"empty, but the index was built with it; rerun `fusionrec embed` (or `fusionrec "
                                 f"run`) to rebuild it")
        self.sources_ = CandidateModel.load(
            self.art_dir / "sources", self.catalog_.interactions, self.retriever_.item_ids_, self.catalog_.users,
            self.retriever_, content=content_vectors(item_mods, self.retriever_.item_ids_),
            user_content=user_content_vectors(user_mods, content_modality(item_mods)))
        guard_path = self.art_dir / "ranker" / GUARD_FILE
        if not guard_path.is_file():
            raise FusionrecError(f"{self.art_dir} has no ranker: run `fusionrec train` (or `fusionrec run`) first")
        self.guard_ = json.loads(guard_path.read_text())
        self.depth_ = int(self.guard_.get("depth") or 0)  # the ranker reorders this many candidates (0: all)
        self._rerank_vectors: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # MMR vectors by modality, loaded once
        self._rerank_rules: dict[tuple[Any, ...], pl.DataFrame] = {}  # rules files by path and version, read once
        self._rules_checked: set[tuple[Any, ...]] = set()  # (rules file version, k) whose warnings were given
        self.ranker_: Ranker | None = None
        if (self.art_dir / "ranker" / "model.txt").is_file():
            self.ranker_ = Ranker.load(self.art_dir / "ranker")
        self.order_ = "ranker" if use_ranker and self.ranker_ is not None and self.guard_.get("order") == "ranker" \
            else "retrieval"
        checked = self.guard_.get("model_sha256")  # absent in artifacts trained before it was recorded
        if self.order_ == "ranker" and self.ranker_ is not None and checked and checked != self.ranker_.model_sha256_:
            # A train stage stopped between saving the model and writing its verdict: this model
            # was never checked against the retrieval order.
            log.warning("the ranker in %s is not the model its guard.json checked (a train stage stopped before "
                        "it finished; rerun `fusionrec train`): serving the retrieval order", self.art_dir)
            self.order_ = "retrieval"
        built_from = self.guard_.get("built_from")
        if self.order_ == "ranker" and built_from and built_from != lineage(self.art_dir, self.retriever_.verified_files_):
            # The index was rebuilt after the ranker was trained: its features no longer mean
            # what the ranker learned. Serve the retrieval order until `fusionrec train` runs.
            log.warning("the ranker in %s was trained on an older index (rerun `fusionrec train`): serving the "
                        "retrieval order", self.art_dir)
            self.order_ = "retrieval"

    @property
    def known_users_(self) -> list[str]:
        return [str(u) for u in self.sources_.user_ids_]

    def _features(self, stage1: pl.DataFrame) -> pl.DataFrame:
        return pair_features(stage1, self.catalog_, self.catalog_.interactions)

    def recommend(self, user_ids: list[str] | None = None, k: int = 10, *, exclude_seen: bool = True,
                  explain: bool = False, use_ranker: bool = True, rerank: RerankConfig | None = None) -> pl.DataFrame:
        """Top-k per user; `use_ranker=False` keeps the retrieval (blend) order.

        `rerank` (active options only): the post-ranking step (`ranker.rerank`) draws the k
        from the shipped order's first `rerank.candidates` (with the ranker's order, at most
        the `ranker.depth` candidates it reorders), and the rows gain a `rerank` column.
        """
        steps = rerank if rerank is not None and rerank.active else None
        depth = k if steps is None else max(k, steps.candidates)
        cands = self.sources_.candidates(user_ids, exclude_seen=exclude_seen)
        ranked = use_ranker and self.order_ == "ranker" and self.ranker_ is not None
        by_ranker = pl.col("user_id").is_in(self.users_with_history(cands["user_id"].unique().to_list())) \
            if ranked else pl.lit(False)  # a user's rows all come from one order (pinned rows too)
        warm, cold = cands.filter(by_ranker), cands.filter(~by_ranker)
        del cands  # the candidates are held once, not twice, while the orders are applied
        # No user at all: the frame of the shipped order (its columns), as before.
        tops = [self.ranker_top(warm, depth, k)] if warm.height or (ranked and not cold.height) else []
        if cold.height or not tops:
            tops.append(self._blend_top(cold, depth))
        best = pl.concat(tops, how="diagonal_relaxed")
        columns = list(TOPK_SCHEMA)
        if steps is not None:  # after both orders: its caps (an item's share of the lists) span every user
            best = rerank_lists(best, k, steps, self.rerank_inputs(steps, exclude_seen=exclude_seen, k=k))
            columns.append("rerank")
        if not explain:
            return best.select(columns).sort(["user_id", "rank"])
        # Explanations cost about a millisecond a row: only the kept top-k rows are explained. The
        # ranker's rows by their features' contributions; the blend's by each source's weight
        # times its z-score (a user without history: all of it `contrib_cold_start`).
        parts = []
        ranker_rows, blend_rows = best.filter(by_ranker), best.filter(~by_ranker)
        if ranker_rows.height or (ranked and not blend_rows.height):
            assert self.ranker_ is not None
            parts.append(pl.concat([ranker_rows.select(columns), self.ranker_.explain(ranker_rows)], how="horizontal"))
        if blend_rows.height or not parts:
            parts.append(pl.concat([blend_rows.select(columns), self._blend_explanation(blend_rows)],
                                   how="horizontal"))
        explained = pl.concat(parts, how="diagonal_relaxed")
        # A pinned item outside the candidates has no score, so nothing explains it: null, not
        # the contributions of features it does not have.
        why = [c for c in explained.columns if c not in columns]
        return explained.with_columns(pl.when(pl.col("score").is_not_null()).then(pl.col(c)).alias(c) for c in why
                                      ).sort(["user_id", "rank"])

    def users_with_history(self, user_ids: list[str]) -> list[str]:
        """The users in `user_ids` with history in the log: the ones the ranker's order serves.

        The others (unknown users included) keep their cold-start order, content or popularity,
        whichever order ships."""
        users = np.asarray([str(u) for u in user_ids], dtype=object)
        return users[self.sources_.history_counts(self.sources_.user_rows(users.tolist())) > 0].tolist()

    def _blend_top(self, cands: pl.DataFrame, depth: int) -> pl.DataFrame:
        """The `depth` best rows per user in the retrieval (blend) order, or the cold-start order of
        users without history; `source` says which, the z-scores kept (for explanations)."""
        z_columns = [c for c in cands.columns if c.startswith("src_") and c.endswith("_z")]
        return topk(self._blend_scored(cands), depth, columns=z_columns)

    def ranker_top(self, cands: pl.DataFrame, depth: int, k: int) -> pl.DataFrame:
        """The `depth` best rows per user of `cands` (`sources_.candidates`) in the ranker's order,
        the features kept (for explanations), drawn from the retrieval order's first `ranker.depth`
        candidates (at least `k`). `recommend` serves it to users with history; for any other
        user it is what the ranker would have served (`bench/cold_users.py`)."""
        assert self.ranker_ is not None
        if self.depth_:  # the ranker reorders the retrieval order's first `depth` candidates, as trained
            cands = cands.filter(pl.col("retrieval_rank") <= max(self.depth_, k))
        return topk_scored(self.ranker_, self._features(cands), depth)

    def rerank_inputs(self, config: RerankConfig, *, exclude_seen: bool = True, k: int | None = None
                      ) -> RerankInputs:
        """What the post-ranking step reads: the items table, the log, the rules file (read once)
        and, for MMR, the item vectors of `config.mmr_modality` (loaded once per modality).

        With `k`, the rules' warnings (an item the catalog lacks, a pin past k) are given on
        the first call for that file (as last modified) and k only: `recommend` called batch by
        batch warns once.
        """
        vectors = None
        if config.mmr_lambda:
            if config.mmr_modality not in self._rerank_vectors:
                self._rerank_vectors[config.mmr_modality] = item_vectors(self.art_dir, config.mmr_modality,
                                                                         self.retriever_)
            vectors = self._rerank_vectors[config.mmr_modality]
        log = self.catalog_.interactions.select(pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String))
        rules, checked = None, False
        if config.rules_file:
            path = Path(config.rules_file)
            # An edited file is read again (a long-lived process sees today's rules).
            stat = path.stat() if path.is_file() else None
            version = (str(path),) if stat is None else (str(path), stat.st_mtime_ns, stat.st_size)
            if version not in self._rerank_rules:
                self._rerank_rules = {version: read_rules(config.rules_file)}
            rules = self._rerank_rules[version]
            if k is not None:
                checked = (*version, k) in self._rules_checked
                self._rules_checked.add((*version, k))  # the step about to run gives them
        return RerankInputs(items=self.catalog_.items, vectors=vectors, history=log,
                            n_items=len(self.retriever_.item_ids_), rules=rules,
                            seen=log if exclude_seen else None, rules_checked=checked)

    def score(self, pairs: pl.DataFrame, *, explain: bool = False) -> pl.DataFrame:
        """`pairs` (user_id, item_id, other columns kept) plus stage-1 columns and `score`:
        the shipped order's score, the blend's for users without history (`users_with_history`)."""
        missing = [c for c in ("user_id", "item_id") if c not in pairs.columns]
        if missing:  # an InputError naming them, not polars' ColumnNotFoundError from deep inside
            raise InputError(f"pairs lack column(s) {', '.join(missing)}; has {', '.join(pairs.columns) or 'none'}",
                             field=missing[0])
        stage1 = self.sources_.score_pairs(pairs)
        if self.order_ != "ranker" or self.ranker_ is None:
            scored = self._blend_scored(stage1)
            if explain:  # as `recommend --explain` with the retrieval order: each source's part of the score
                scored = pl.concat([scored, self._blend_explanation(scored)], how="horizontal")
        else:
            by_ranker = pl.col("user_id").cast(pl.String).is_in(
                self.users_with_history(stage1["user_id"].unique().to_list()))
            # Every row gets the features, as before: the columns do not depend on which users are asked.
            rows = self._features(stage1).with_row_index("__row")
            warm, cold = rows.filter(by_ranker), rows.filter(~by_ranker)
            parts = [self.ranker_.score(warm, explain=explain).with_columns(
                pl.lit("ranker").alias("source"))] if warm.height or not cold.height else []
            if cold.height:
                blend = self._blend_scored(cold)
                if explain:  # as in `recommend`: a blend-ordered row explains itself
                    blend = pl.concat([blend, self._blend_explanation(blend)], how="horizontal")
                parts.append(blend)
            scored = pl.concat(parts, how="diagonal_relaxed").sort("__row").drop("__row")
        # An item the artifacts do not know has no score to give in either order (the ranker would
        # score its empty features), and is in no list: both empty, and so is its explanation.
        # A new user is still scored.
        emptied = [c for c in scored.columns if c in ("score", "source", "top_features", "explain_bias")
                   or c.startswith(("contrib_", "share_"))]
        return scored.with_columns(pl.when(self.item_known()).then(pl.col(c)).alias(c) for c in emptied)

    def item_known(self) -> pl.Expr:
        """True where a row's `item_id` is in the catalog these artifacts were built on."""
        return pl.col("item_id").cast(pl.String).is_in(np.asarray(self.retriever_.item_ids_, dtype=str).tolist())

    def _blend_scored(self, frame: pl.DataFrame) -> pl.DataFrame:
        """`frame` (candidate rows) plus the blend's `score` (its `retrieval_score`) and `source`:
        which list that score comes from, per user ("retrieval" for users with history,
        "content" or "popular" for users without)."""
        users = frame["user_id"].cast(pl.String).unique(maintain_order=True).to_list()
        kinds = self.sources_.cold_start(users)
        table = pl.DataFrame({"user_id": users, "source": [str(x) or "retrieval" for x in kinds]},
                             schema={"user_id": pl.String, "source": pl.String})
        return frame.with_columns(pl.col("retrieval_score").cast(pl.Float64).alias("score")) \
            .drop("source", strict=False).join(table, on="user_id", how="left", maintain_order="left")

    def _blend_explanation(self, rows: pl.DataFrame) -> pl.DataFrame:
        """The explanation columns of blend-ordered rows: each source's weight times its
        z-score; a cold-start row's whole score is `contrib_cold_start`."""
        cold = rows["source"].is_in(["content", "popular"]).fill_null(False).to_numpy()
        return explain_blend(rows, self.sources_.weights, cold)


def item_vectors(art_dir: Path, modality: str, retriever: Retriever) -> tuple[np.ndarray, np.ndarray]:
    """(item ids, vectors) for MMR: one item modality of ART/embeddings, or "fused": every content
    modality centred, unit length and weighted by the square root of its fusion weight (equal
    weights where the fusion gives the content modalities none), so the cosine of two items
    is the weighted mean of their per-modality cosines."""
    item_mods, _ = embeddings(art_dir)
    if modality != "fused" and modality not in item_mods:
        raise ConfigError(f"config key 'rerank.mmr_modality': no item modality {modality!r} in {art_dir} "
                          f"(have: fused, {', '.join(sorted(item_mods))})")
    names = sorted(item_mods) if modality == "fused" else [modality]
    ids = np.asarray(retriever.item_ids_, dtype=object)
    weights = {m: float(retriever.weights_.get(m, 0.0)) for m in names}
    if not sum(weights.values()):
        weights = dict.fromkeys(names, 1.0)
    total = sum(weights.values())
    blocks = []
    for m in names:
        if not weights[m]:
            continue
        block = content_vectors({m: item_mods[m]}, ids, prefer=m)
        assert block is not None
        present = np.abs(block).sum(axis=1) > 0
        if present.any():
            block = np.where(present[:, None], block - block[present].mean(axis=0), 0.0)
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        blocks.append(block / np.where(norms > 0, norms, 1.0) * np.sqrt(weights[m] / total))
    return ids.astype(str), np.concatenate(blocks, axis=1).astype(np.float32)


def read_users(path: Path | str) -> list[str]:
    """The user ids of a `--users` file (.parquet, .csv or .jsonl with a user_id column).

    A file without any non-empty id is bad input (`InputError`): the export would be empty."""
    frame = read_id_table(path, ("user_id",))
    # Trimmed, as every other id input is (" u2" is u2); empty ids are skipped like nulls.
    ids = frame["user_id"].drop_nulls().cast(pl.String).str.strip_chars()
    ids = ids.filter(ids != "").unique(maintain_order=True)
    if ids.is_empty():  # an empty export would replace the last one with nothing
        raise InputError("no user ids: the file has no rows" if frame.height == 0 else
                         "no user ids: every user_id is empty", file=str(path), field="user_id")
    return ids.to_list()
