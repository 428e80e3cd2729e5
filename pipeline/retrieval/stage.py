"""The index stage (`fusionrec index`): fusion, user vectors, the FAISS index, candidates.

Reads the embedding tables the embedding job wrote, fits a `Retriever` on all
interactions, saves it under `ART/index/`, writes `ART/candidates.parquet`, and keeps a
validated snapshot of the interactions and items under `ART/data/` so that later stages
(train, recommend, score, evaluate) need only the artifacts directory.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from fusionrec.pipeline.config import Config
from fusionrec.pipeline.errors import FusionrecError
from fusionrec.pipeline.retrieval.fusion import load_modalities
from fusionrec.pipeline.io.manifest import hash_inputs, stage_run
from fusionrec.pipeline.retrieval.retriever import Retriever
from fusionrec.pipeline.io.storage import clean_temporaries, write_parquet
from fusionrec.pipeline.io.tables import load_interactions, load_items, load_users

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


def save_snapshot(catalog: Catalog, art_dir: Path) -> None:
    out = Path(art_dir) / "data"
    write_parquet(catalog.items.to_arrow(), out / "items.parquet")
    write_parquet(catalog.interactions.to_arrow(), out / "interactions.parquet")
    if catalog.users is not None:
        write_parquet(catalog.users.to_arrow(), out / "users.parquet")


def load_snapshot(art_dir: Path) -> Catalog:
    out = Path(art_dir) / "data"
    if not (out / "interactions.parquet").is_file():
        raise FusionrecError(f"{art_dir} has no index yet: run `fusionrec index` (or `fusionrec run`) first")
    users = pl.read_parquet(out / "users.parquet") if (out / "users.parquet").is_file() else None
    return Catalog(pl.read_parquet(out / "items.parquet"), users, pl.read_parquet(out / "interactions.parquet"))


def retriever_from_config(cfg: Config) -> Retriever:
    return Retriever(fusion=cfg.fusion.method, weights=dict(cfg.fusion.weights) or None,
                     half_life_days=cfg.fusion.half_life_days, event_weights=dict(cfg.fusion.event_weights),
                     validation_fraction=cfg.fusion.validation_fraction, index_factory=cfg.index.factory,
                     target_recall=cfg.index.target_recall, n_candidates=cfg.index.n_candidates,
                     seed=cfg.ranker.seed, behaviour_dim=cfg.fusion.behaviour_dim, popularity=cfg.fusion.popularity,
                     cold_share=cfg.fusion.cold_share,
                     attention_beta=cfg.fusion.attention_beta if cfg.fusion.attention_beta >= 0 else None)


def embeddings(art_dir: Path) -> tuple[dict, dict]:
    emb = Path(art_dir) / "embeddings"
    items = load_modalities(emb, "item")
    if not items:
        raise FusionrecError(f"no item embeddings in {emb}: run `fusionrec embed` first")
    return items, load_modalities(emb, "user")


def run_index(data_dir: Path, art_dir: Path, config: Config | None = None, *, lock: bool = True) -> dict:
    config = config or Config()
    data_dir, art_dir = Path(data_dir), Path(art_dir)
    with stage_run("index", art_dir, data_dir, config.to_dict(), lock=lock) as record:
        record.inputs = hash_inputs(data_dir)
        clean_temporaries(art_dir / "index")
        t0 = time.perf_counter()
        catalog = load_catalog(data_dir)
        item_mods, user_mods = embeddings(art_dir)
        record.timings["load"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        retriever = retriever_from_config(config).fit(item_mods, catalog.interactions, user_mods)
        record.timings["fit"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        candidates = retriever.candidates(k=config.index.n_candidates, exclude_seen=True)
        record.timings["candidates"] = time.perf_counter() - t0

        # Snapshot and candidates first, the retriever last: its retriever.json marks a finished index.
        save_snapshot(catalog, art_dir)
        write_parquet(candidates.to_arrow(), art_dir / "candidates.parquet")
        retriever.save(art_dir / "index")
        summary = retriever.summary_()
        record.models = {"fusion": summary["fusion"], "weights": summary["weights"], "index": summary["index"]}
        record.counts = {"items": summary["counts"]["items"], "users": summary["counts"]["users"],
                         "candidates": candidates.height, "interactions": catalog.interactions.height}
        record.extra = {"retrieval": summary}
        record.finish("ok")
        log.info("index: %d items, %d users, weights %s, %d candidates", summary["counts"]["items"],
                 summary["counts"]["users"], {k: round(v, 3) for k, v in summary["weights"].items()},
                 candidates.height)
        return summary | {"n_candidates": candidates.height}
