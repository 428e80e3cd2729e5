"""The stages and the nightly job, as plain functions: what `fusionrec` commands call.

Each stage takes the artifacts lock and writes its run record through
`pipeline.io.manifest.stage_run`; `run_nightly` holds the lock once for all of them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import polars as pl

from fusionrec.pipeline.config import Config
from fusionrec.pipeline.embedding.job import EmbedReport, run_embed
from fusionrec.pipeline.errors import ConfigError
from fusionrec.pipeline.io.manifest import stage_run
from fusionrec.pipeline.io.tracking import check_tracking, log_nightly
from fusionrec.pipeline.io.storage import ArtifactLock
from fusionrec.pipeline.retrieval.stage import load_catalog, run_index
from fusionrec.ranker.serving.export import write_topk
from fusionrec.ranker.serving.privacy import export_key, pseudonymise
from fusionrec.ranker.serving.ray_scoring import recommend_all
from fusionrec.ranker.serving.recommender import Recommender
from fusionrec.ranker.training import run_train

__all__ = ["NightlyReport", "check_engine", "export_topk", "recommend_lists", "run_embed", "run_index", "run_nightly",
           "run_recommend", "run_train", "sample_data_dir"]


def sample_data_dir() -> Path:
    """The sample catalog that ships with fusionrec (the data/ folder of the checkout or the wheel)."""
    return Path(str(files("fusionrec") / "data"))


def check_engine(config: Config) -> None:
    if config.engine not in ("local", "ray"):
        raise ConfigError(f"engine must be 'local' or 'ray', not {config.engine!r}")


def recommend_lists(art_dir: Path, users: list[str] | None, k: int, config: Config, **options: Any) -> pl.DataFrame:
    """Top-k from the artifacts, on Ray when the engine says so (same rows as local)."""
    if config.engine == "ray":
        return recommend_all(art_dir, k, config.ray, user_ids=users, **options)
    return Recommender(art_dir).recommend(users, k, **options)


def export_topk(frame: pl.DataFrame, path: Path, art_dir: Path, config: Config, pseudonymise_ids: bool | None) -> Path:
    """Write top-k rows to `path`, user ids pseudonymised unless asked otherwise."""
    if config.export.pseudonymise if pseudonymise_ids is None else pseudonymise_ids:
        frame = pseudonymise(frame, export_key(config.export, art_dir))
    return write_topk(frame, path)


def run_recommend(art_dir: Path, export: Path, config: Config | None = None, *, users: list[str] | None = None,
                  k: int | None = None, explain: bool = False, include_seen: bool = False,
                  pseudonymise_ids: bool | None = None, data_dir: Path | None = None,
                  lock: bool = False) -> tuple[pl.DataFrame, Path]:
    """The recommend stage: top-k per user exported to `export`; returns the rows and the path."""
    config = config or Config()
    art_dir = Path(art_dir)
    k = config.export.k if k is None else k
    with stage_run("recommend", art_dir, data_dir, config.to_dict(), lock=lock) as record:
        recs = recommend_lists(art_dir, users, k, config, include_seen=include_seen, explain=explain)
        path = export_topk(recs, Path(export), art_dir, config, pseudonymise_ids)
        record.counts = {"users": recs["user_id"].n_unique(), "rows": recs.height}
        record.extra = {"export": str(path), "k": k}
        if explain or include_seen or users is not None:
            record.extra |= {"explain": explain, "include_seen": include_seen}
        record.finish("ok")
    return recs, path


@dataclass
class NightlyReport:
    """What `run_nightly` did: each stage's summary, the export and the timings."""

    embed: EmbedReport
    index: dict[str, Any]
    train: dict[str, Any]
    export: Path
    rows: int
    users: int
    timings: dict[str, float] = field(default_factory=dict)


def run_nightly(data_dir: Path, art_dir: Path, config: Config | None = None, *,
                show_progress: bool = True) -> NightlyReport:
    """The whole nightly job: embed, index, train, recommend for every user, export ART/exports/topk.parquet."""
    config = config or Config()
    check_engine(config)
    check_tracking(config)  # tracking.mlflow_uri set without MLflow: exit 2 before any stage
    data_dir, art_dir = Path(data_dir), Path(art_dir)
    timings: dict[str, float] = {}
    load_catalog(data_dir)  # every table validated before hours of encoding, not after
    with ArtifactLock(art_dir), stage_run("run", art_dir, data_dir, config.to_dict(), lock=False) as total:
        t0 = time.perf_counter()
        embedded = run_embed(data_dir, art_dir, config, show_progress=show_progress, lock=False)
        timings["embed"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        indexed = run_index(data_dir, art_dir, config, lock=False)
        timings["index"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        trained = run_train(art_dir, config, lock=False)
        timings["train"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        recs, path = run_recommend(art_dir, art_dir / "exports" / "topk.parquet", config, data_dir=data_dir)
        timings["recommend"] = time.perf_counter() - t0
        total.timings = timings
        total.counts = {"exported_rows": recs.height, "users": recs["user_id"].n_unique(),
                        "failures": len(embedded.failures)}
        total.finish("ok")
    log_nightly(config, art_dir, data_dir, {"seconds": {**timings, "total": sum(timings.values())},
                                            "rows": recs.height, "users": recs["user_id"].n_unique(),
                                            "media_failures": len(embedded.failures), "train": trained,
                                            "fusion_weight": indexed.get("weights", {})})
    return NightlyReport(embedded, indexed, trained, path, recs.height, recs["user_id"].n_unique(), timings)

