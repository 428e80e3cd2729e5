"""The index stage (`fusionrec index`): fusion, user vectors, the FAISS index, candidates.

Reads the embedding tables the embedding job wrote, fits a `Retriever` on all
interactions (its fusion weights chosen on the ranker's label split) and the candidate
sources, saves them under `ART/index/` and `ART/sources/`, writes `ART/candidates.parquet`,
and keeps a validated snapshot of the interactions and items under `ART/data/` so that later stages
(train, recommend, score, evaluate) need only the artifacts directory.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from fusionrec.pipeline.config import Config
from fusionrec.pipeline.errors import ConfigError, FusionrecError
from fusionrec.pipeline.io.manifest import hash_inputs, stage_run
from fusionrec.pipeline.io.storage import clean_temporaries, sha256_file, write_json, write_parquet
from fusionrec.pipeline.io.tables import ITEM_TEXT_COLUMNS, load_interactions, load_items, load_users
from fusionrec.pipeline.io.vectors import check_dimensions
from fusionrec.pipeline.retrieval.candidates import (
    FUSED,
    CandidateModel,
    LabelSplit,
    Tuning,
    content_modality,
    content_vectors,
    default_sources,
    label_split,
    truth_pairs,
    tune,
    user_content_vectors,
)
from fusionrec.pipeline.retrieval.fusion import load_modalities
from fusionrec.pipeline.retrieval.retriever import Retriever
from fusionrec.pipeline.retrieval.sources import SEARCH_GRID, als_available, relevance_threshold, tag_matrix

log = logging.getLogger("fusionrec.index")


@dataclass(frozen=True)
class Catalog:
    """The validated inputs every stage after embedding works from."""

    items: pl.DataFrame
    users: pl.DataFrame | None
    interactions: pl.DataFrame


def load_catalog(data_dir: Path) -> Catalog:
    items = load_items(data_dir)
    return Catalog(items, load_users(data_dir), load_interactions(data_dir, items))


SNAPSHOT_SUMS = "snapshot.json"


def save_snapshot(catalog: Catalog, art_dir: Path) -> None:
    """The validated tables under ART/data/, with their sha256 in ART/data/snapshot.json."""
    out = Path(art_dir) / "data"
    write_parquet(catalog.items.to_arrow(), out / "items.parquet")
    write_parquet(catalog.interactions.to_arrow(), out / "interactions.parquet")
    names = ["items.parquet", "interactions.parquet"]
    if catalog.users is not None:
        write_parquet(catalog.users.to_arrow(), out / "users.parquet")
        names.append("users.parquet")
    else:  # a night without a users table: last night's would be served beside today's index
        (out / "users.parquet").unlink(missing_ok=True)
    write_json({name: sha256_file(out / name) for name in names}, out / SNAPSHOT_SUMS)


def require_snapshot(art_dir: Path) -> None:
    """Refuse artifacts without the index stage's data snapshot (a stage that needs it: train)."""
    if not (Path(art_dir) / "data" / "interactions.parquet").is_file():
        if not Path(art_dir).is_dir():  # a mistyped --out, or a file given as one
            what = "is not a folder" if Path(art_dir).exists() else "does not exist"
            raise FusionrecError(f"the artifacts folder {art_dir} {what}: give the --out that `fusionrec run` "
                                 "(or `fusionrec index`) wrote, or run `fusionrec index` there first")
        raise FusionrecError(f"{art_dir} has no index yet: run `fusionrec index` (or `fusionrec run`) first")


def load_snapshot(art_dir: Path) -> Catalog:
    out = Path(art_dir) / "data"
    require_snapshot(art_dir)
    has_users = (out / "users.parquet").is_file()
    if (out / SNAPSHOT_SUMS).is_file():  # artifacts from before checksums have none to check
        try:
            sums = json.loads((out / SNAPSHOT_SUMS).read_text())
        except (OSError, ValueError) as exc:
            raise FusionrecError(f"{out / SNAPSHOT_SUMS} cannot be read ({exc}): rerun `fusionrec index`") from exc
        for name, digest in sums.items():
            path = out / str(name)
            if not path.is_file() or sha256_file(path) != digest:
                raise FusionrecError(f"{path} does not match the checksum recorded when it was written (changed or "
                                     "damaged since): rerun `fusionrec index` (or `fusionrec run`)")
        # A users table the last snapshot did not list is an earlier night's (left by older versions)
        has_users = has_users and "users.parquet" in sums
    users = pl.read_parquet(out / "users.parquet") if has_users else None
    return Catalog(pl.read_parquet(out / "items.parquet"), users, pl.read_parquet(out / "interactions.parquet"))


def retriever_from_config(cfg: Config) -> Retriever:
    return Retriever.from_config(cfg)


def source_names(config: Config, n_items: int) -> list[str]:
    """The sources to fit for a catalog of `n_items`: `sources.names` (`auto`: by catalog size),
    and the fused retrieval.

    EASE holds items x items matrices, so a catalog above `sources.ease_max_items` that names
    it explicitly is a ConfigError before any work, not a job killed for memory hours later.
    """
    names = list(config.sources.names)
    if "auto" in names:
        names = default_sources(n_items, config.sources.ease_max_items)
    dense = [n for n in names if n in ("ease", "recent_ease")]
    if dense and n_items > config.sources.ease_max_items:
        gib = 3 * 4 * n_items ** 2 / 2**30  # the Gram, its inverse and the weights, float32
        raise ConfigError(f"sources.names names {', '.join(dense)}, which holds items x items matrices: "
                          f"{n_items:,} items is above sources.ease_max_items = {config.sources.ease_max_items:,} "
                          f"(about {gib:,.0f} GiB). Drop it from sources.names (or use 'auto'), or raise "
                          "sources.ease_max_items if the machine has the memory")
    if config.sources.fused:
        names.append(FUSED)
    return names


def candidate_split(interactions: pl.DataFrame, config: Config) -> tuple[LabelSplit | None, float | None]:
    """The validation split the sources, the blend and the ranker's labels share, and the relevance threshold."""
    threshold = relevance_threshold(interactions, config.sources.relevance)
    split = label_split(interactions, config.ranker.labels, fraction=config.ranker.label_fraction,
                        window_days=config.ranker.label_window_days, threshold=threshold, seed=config.ranker.seed)
    return split, threshold


def label_windows(split: LabelSplit, config: Config, threshold: float | None) -> list[LabelSplit]:
    """The ranker's label splits: `split`, then the same protocol applied to its feature part.

    A fixed split carried in `timestamp` (Last.fm's 0/1/2) has no time before its window:
    its feature part is one timestamp and so is its window (a log with real times in its
    window is not a fixed split, and keeps a single window). There the earlier window holds
    out a random share of each user's feature part, the same share of the log as the latest
    window's, so a ranker learned on it can still be checked on the real window (the guard's
    forward check).
    """
    earlier = label_split(split.fit, split.protocol, fraction=config.ranker.label_fraction,
                          window_days=config.ranker.label_window_days, threshold=threshold,
                          seed=config.ranker.seed)
    fixed_split = split.fit["timestamp"].n_unique() == 1 and split.held["timestamp"].n_unique() == 1
    if earlier is None and split.protocol == "window" and fixed_split:
        share = split.held.height / (split.fit.height + split.held.height)
        earlier = label_split(split.fit, "per_user", fraction=share, window_days=config.ranker.label_window_days,
                              threshold=threshold, seed=config.ranker.seed)
    return [split] if earlier is None else [split, earlier]


def fit_candidate_model(catalog: Catalog, item_mods: dict, user_mods: dict, config: Config,
                        timings: dict[str, float] | None = None
                        ) -> tuple[CandidateModel, Tuning | None, pl.DataFrame | None, Retriever]:
    """The fused retriever and the sources, tuned and blended on the validation split, then
    refitted on the whole log.

    Returns the model, what validation chose, the validation users' candidates from sources
    fitted before their labels (the ranker's training rows; None for a log too short to
    split), and the Retriever fitted on the whole log. `timings` receives seconds per step.
    """
    timings = {} if timings is None else timings
    source_names(config, catalog.items.height)  # a source the catalog is too big for: say so before any work
    clock = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[step] = round(timings.get(step, 0.0) + now - clock, 3)
        clock = now

    inter = catalog.interactions
    split, threshold = candidate_split(inter, config)
    too_short = "the log is too short for a validation split"
    if split is not None and truth_pairs(split.fit, split.held, threshold).is_empty():
        # Every setting and blend weight would be judged on no user (NDCG nan, numpy warnings).
        too_short = (f"no user of the validation split ({split.protocol}) has a held-out positive"
                     + ("" if threshold is None else f" (a rating of at least {threshold:g})"))
        split = None
    if split is None:
        retriever = retriever_from_config(config).fit(item_mods, inter, user_mods)  # its own temporal hold-out
    else:
        # Fusion weights are chosen on the label split itself (the protocol the sources, the
        # blend and the ranker's labels share), then kept by the retrievers fitted on more of
        # the log: one weight search instead of one per fit.
        fused_fit = retriever_from_config(config).fit(item_mods, split.fit, user_mods, held_out=split.held)
        retriever = fused_fit.with_chosen_weights().fit(item_mods, inter, user_mods)
        retriever.validation_, retriever.validation_recall_ = fused_fit.validation_, fused_fit.validation_recall_
    lap("fusion")
    item_ids = retriever.item_ids_
    names = source_names(config, len(item_ids))
    sc = config.sources
    content = content_vectors(item_mods, item_ids)
    user_content = user_content_vectors(user_mods, content_modality(item_mods))
    common: dict[str, Any] = {"n_candidates": config.index.n_candidates, "threshold": threshold, "recent_items": sc.recent_items,
              "half_life": sc.recent_half_life, "seed": config.ranker.seed, "content": content, "user_content": user_content,
              "tags": tag_matrix(catalog.items, item_ids, sc.tag_min_items, interactions=inter, threshold=threshold)
              if sc.tag_min_items else None}
    if split is None:
        log.warning("%s: candidate sources keep default settings and equal weights, and no ranker will be "
                    "trained", too_short)
        collab = [n for n in names if n != FUSED and (n != "als" or als_available())]
        plain = {n: [s for s in SEARCH_GRID[n] if not s.get("tag_weight")] for n in collab}  # tags need a search
        params = {n: plain[n][len(plain[n]) // 2] for n in collab}
        if FUSED in names:
            params[FUSED] = {}
        weights = {n: 1.0 for n in params if n not in ("popular", "segment_popular")} or {n: 1.0 for n in params}
        model = CandidateModel(**common, params=params, weights=weights).fit(inter, item_ids, catalog.users, retriever)
        return model, None, None, retriever
    fused_source = fused_fit if FUSED in names else None
    tuning, tuned_model = tune(split, item_ids, catalog.users, fused_source, [n for n in names if n != FUSED],
                               **common, max_users=sc.validation_users,
                               als_screen_seeds=sc.als_screen_seeds)
    lap("source_search")
    frames = []
    # Window 0 holds the labels the sources were tuned on; window 1, one step earlier (the
    # same protocol applied to window 0's feature part), doubles the ranker's examples.
    for window, part in enumerate(label_windows(split, config, threshold)):
        # An earlier window's retriever searches its own weights on its own labels: weights
        # chosen on window 0's labels would look ahead of window 1's features.
        fused_part = fused_source if window == 0 or fused_source is None else (
            retriever_from_config(config).fit(item_mods, part.fit, user_mods, held_out=part.held))
        # Window 0's sources are the ones the search fitted on the same part of the log.
        held_model = tuned_model if window == 0 else CandidateModel(
            **common, params=tuning.params, weights=tuning.weights).fit(part.fit, item_ids, catalog.users, fused_part)
        labelled = truth_pairs(part.fit, part.held, threshold)["user_id"].unique().sort().to_list()
        frames.append(held_model.candidates(labelled, exclude_seen=True).with_columns(
            pl.lit(window, pl.Int8).alias("label_window")))
    validation = pl.concat(frames)
    lap("label_windows")
    model = CandidateModel(**common, params=tuning.params, weights=tuning.weights).fit(
        inter, item_ids, catalog.users, retriever)
    lap("sources_refit")
    return model, tuning, validation, retriever


def embeddings(art_dir: Path) -> tuple[dict, dict]:
    """(item, user) modality tables of ART/embeddings; none where the catalog has no content."""
    emb = Path(art_dir) / "embeddings"
    items, users = load_modalities(emb, "item"), load_modalities(emb, "user")
    check_dimensions({m: x.shape[1] for m, (_, x) in items.items()}, {m: x.shape[1] for m, (_, x) in users.items()},
                     lambda kind, m: str(emb / f"{kind}_{m}.parquet"), lambda m: str(emb / f"user_{m}.parquet"))
    return items, users


def run_index(data_dir: Path, art_dir: Path, config: Config | None = None, *, lock: bool = True) -> dict:
    config = config or Config()
    data_dir, art_dir = Path(data_dir), Path(art_dir)
    with stage_run("index", art_dir, data_dir, config.to_dict(), lock=lock) as record:
        record.inputs = hash_inputs(data_dir)
        clean_temporaries(art_dir / "index")
        t0 = time.perf_counter()
        catalog = load_catalog(data_dir)
        item_mods, user_mods = embeddings(art_dir)
        if not item_mods:  # a catalog of ids alone (or every content cell empty): behaviour still ranks
            content = [c for c in ITEM_TEXT_COLUMNS if c in catalog.items.columns]
            if content and not (art_dir / "embeddings").is_dir():  # `index` before `embed`
                log.warning("index: no item embeddings in %s, though the items have %s: run `fusionrec embed` on "
                            "this --out first (or `fusionrec run`); meanwhile the lists come from behaviour and "
                            "popularity alone", art_dir / "embeddings", ", ".join(content))
            else:
                log.warning("index: no item has text, image or audio content (no item embeddings in %s): the "
                            "lists come from behaviour and popularity alone, and items without interactions cannot "
                            "be recommended", art_dir / "embeddings")
        record.timings["load"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        steps: dict[str, float] = {}
        model, tuning, validation, retriever = fit_candidate_model(catalog, item_mods, user_mods, config, steps)
        record.timings["fit"] = retriever.timings_.get("fit_s", 0.0)  # the whole-log retriever
        record.timings["sources"] = time.perf_counter() - t0 - record.timings["fit"]
        record.timings.update({f"sources.{k}": v for k, v in steps.items()})
        t0 = time.perf_counter()
        candidates = model.candidates(exclude_seen=True)
        record.timings["candidates"] = time.perf_counter() - t0

        # Snapshot, sources and candidates first, the retriever last: its retriever.json marks a finished index.
        save_snapshot(catalog, art_dir)
        model.save(art_dir / "sources")
        valid_path = art_dir / "sources" / "validation.parquet"
        if validation is not None:
            write_parquet(validation.to_arrow(), valid_path)
        elif valid_path.exists():
            valid_path.unlink()
        write_parquet(candidates.to_arrow(), art_dir / "candidates.parquet")
        # retriever.json names the sha256 of tonight's snapshot and sources too: a stage stopped before
        # it (Ctrl-C, a crash, a full disk) leaves last night's retriever, which then refuses them,
        # instead of serving tonight's sources beside last night's index.
        partners = (f"data/{SNAPSHOT_SUMS}", "sources/sources.json", "sources/sources.safetensors")
        retriever.save(art_dir / "index", partners=tuple(f"../{rel}" for rel in partners
                                                         if (art_dir / rel).is_file()))
        summary = retriever.summary_()
        summary["sources"] = tuning.as_dict() if tuning is not None else {
            "protocol": None, "note": "the log is too short for a validation split: default settings, equal weights"}
        record.models = {"fusion": summary["fusion"], "weights": summary["weights"], "index": summary["index"]}
        record.counts = {"items": summary["counts"]["items"], "users": summary["counts"]["users"],
                         "candidates": candidates.height, "interactions": catalog.interactions.height}
        record.extra = {"retrieval": summary}
        record.finish("ok")
        log.info("index: %d items, %d users, weights %s, %d candidates", summary["counts"]["items"],
                 summary["counts"]["users"], {k: round(v, 3) for k, v in summary["weights"].items()},
                 candidates.height)
        return summary | {"n_candidates": candidates.height}
