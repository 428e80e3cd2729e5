"""The stages and the nightly job, as plain functions: what `fusionrec` commands call.

Each stage takes the artifacts lock and writes its run record through
`pipeline.io.manifest.stage_run`; `run_nightly` holds the lock once for all of them.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import polars as pl

from fusionrec.pipeline.config import Config
from fusionrec.pipeline.embedding.job import EmbedReport, run_embed
from fusionrec.pipeline.errors import ConfigError, FusionrecError, InputError, first_line
from fusionrec.pipeline.io.manifest import hash_inputs, stage_run
from fusionrec.pipeline.io.storage import ArtifactLock, check_separate_dirs, clean_stale_exports
from fusionrec.pipeline.io.tracking import check_tracking, log_nightly
from fusionrec.pipeline.retrieval.stage import load_catalog
from fusionrec.pipeline.retrieval.stage import run_index as _run_index
from fusionrec.ranker.serving.export import check_export_target, is_stdout, read_pairs, write_topk
from fusionrec.ranker.serving.privacy import export_key, pseudonymise
from fusionrec.ranker.serving.ray_scoring import known_users, recommend_all
from fusionrec.ranker.serving.recommender import Recommender
from fusionrec.ranker.training import run_train

log = logging.getLogger("fusionrec.recommend")

__all__ = ["NightlyReport", "check_engine", "export_topk", "open_recommender", "recommend_lists", "run_embed",
           "run_index", "run_nightly", "run_recommend", "run_score", "run_train", "sample_data_dir", "users_by_source"]


def sample_data_dir() -> Path:
    """The sample catalog that ships with fusionrec (the data/ folder of the checkout or the wheel)."""
    return Path(str(files("fusionrec") / "data"))


def run_index(data_dir: Path, art_dir: Path, config: Config | None = None, *, lock: bool = True) -> dict[str, Any]:
    """The index stage (`pipeline.retrieval.stage.run_index`), refusing an --out that overlaps --data."""
    check_separate_dirs(data_dir, art_dir)
    return _run_index(data_dir, art_dir, config, lock=lock)


def check_engine(config: Config) -> None:
    if config.engine not in ("local", "ray"):
        raise ConfigError(f"engine must be 'local' or 'ray', not {config.engine!r}")
    if config.engine == "ray" and config.rerank.active:
        # The exposure cap is over every list at once; Ray scores batches of users apart.
        raise ConfigError("the [rerank] step runs on the local engine only: set engine = \"local\" or turn the "
                          "rerank options off")


# Which command rebuilds a damaged artifact, by its first folder under ART.
RERUN = {"embeddings": "fusionrec embed", "data": "fusionrec index", "index": "fusionrec index",
         "sources": "fusionrec index", "candidates.parquet": "fusionrec index", "ranker": "fusionrec train"}


def open_recommender(art_dir: Path) -> Recommender:
    """`Recommender(art_dir)`, with any failure to load an artifact (truncated, zeroed,
    garbage: a JSON, polars, safetensors or FAISS error) turned into exit 1 naming the file
    and the command that rebuilds it."""
    art_dir = Path(art_dir)
    try:
        return Recommender(art_dir)
    except FusionrecError as exc:
        if isinstance(exc, InputError) and exc.file and Path(exc.file).resolve().is_relative_to(art_dir.resolve()):
            # A reader's "bad input" about a file of the artifacts is a damaged artifact (exit 1).
            raise artifact_failure(art_dir, exc) from exc
        if "fusionrec " in str(exc) or type(exc) is not FusionrecError:
            raise
        # A loader's own message that does not say what to do: add the command that rebuilds it.
        hint = artifact_failure(art_dir, exc)
        rerun = str(hint)[str(hint).rfind("; rerun"):] if "; rerun" in str(hint) else \
            "; rerun `fusionrec run` to rebuild the artifacts"
        raise FusionrecError(f"{exc}{rerun}") from exc
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - a loader's own exception is a damaged artifact
        raise artifact_failure(art_dir, exc) from exc


def artifact_failure(art_dir: Path, exc: BaseException) -> FusionrecError:
    """One clear error for an exception raised while loading `art_dir`: the file it was
    reading (from the exception or the innermost frame that held a path under `art_dir`)."""
    art = art_dir.resolve()
    found: Path | None = None
    name = getattr(exc, "filename", None) or getattr(exc, "file", None)
    candidates: list[Any] = [name] if name else []
    tb = exc.__traceback__
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        candidates.extend(v for v in frame.f_locals.values() if isinstance(v, (str, Path)))
    for value in candidates:
        try:
            path = Path(value).resolve()
        except (OSError, ValueError, RuntimeError):
            continue
        if path.is_relative_to(art) and path.is_file():
            found = path
            break
    first = first_line(exc, 200)
    if found is None:
        return FusionrecError(f"cannot load the artifacts in {art_dir} ({type(exc).__name__}: {first}); "
                              "rerun `fusionrec run` to rebuild them")
    rel = found.relative_to(art)
    rerun = RERUN.get(rel.parts[0], "fusionrec run")
    return FusionrecError(f"artifact {art_dir / rel} is damaged and cannot be loaded ({type(exc).__name__}: "
                          f"{first}); rerun `{rerun}` (or `fusionrec run`) to rebuild it")


def recommend_lists(art_dir: Path, users: list[str] | None, k: int, config: Config, **options: Any) -> pl.DataFrame:
    """Top-k from the artifacts, on Ray when the engine says so (same rows as local)."""
    if config.engine == "ray":
        check_engine(config)
        try:
            return recommend_all(art_dir, k, config.ray, user_ids=users, **options)
        except (FusionrecError, MemoryError):
            raise
        except Exception as exc:  # noqa: BLE001 - see open_recommender
            raise artifact_failure(Path(art_dir), exc) from exc
    return open_recommender(art_dir).recommend(users, k, rerank=config.rerank, **options)


def export_topk(frame: pl.DataFrame, path: Path, art_dir: Path, config: Config, pseudonymise_ids: bool | None,
                *, raw: bool = False) -> Path:
    """Write top-k rows to `path`, user ids pseudonymised unless asked otherwise; CSV cells
    that would run as spreadsheet formulas are escaped unless `raw`."""
    check_export_target(path, art_dir)
    if config.export.pseudonymise if pseudonymise_ids is None else pseudonymise_ids:
        frame = pseudonymise(frame, export_key(config.export, art_dir))
    return write_topk(frame, path, raw=raw)


def ready_export(export: Path, art_dir: Path) -> None:
    """Before the work: refuse an export onto the artifacts' own files, and remove the torn
    temporaries a killed export left beside the file (standard output has none)."""
    check_export_target(export, art_dir)
    if not is_stdout(export):
        clean_stale_exports(Path(export).parent, Path(export).name)


def with_pseudonymise(config: Config, pseudonymise_ids: bool | None) -> Config:
    """`config` as the export runs it: --raw-ids / --pseudonymise over export.pseudonymise, so the
    manifest's config says whether the file holds raw ids (it said `pseudonymise = true` beside raw ids)."""
    if pseudonymise_ids is None or pseudonymise_ids == config.export.pseudonymise:
        return config
    return dataclasses.replace(config, export=dataclasses.replace(config.export, pseudonymise=pseudonymise_ids))


def run_score(art_dir: Path, candidates: Path, export: Path, config: Config | None = None, *,
              explain: bool = False, pseudonymise_ids: bool | None = None,
              lock: bool = True) -> tuple[pl.DataFrame, Path]:
    """The score command: (user_id, item_id) pairs scored and exported, under the shared lock."""
    config = with_pseudonymise(config or Config(), pseudonymise_ids)
    art_dir = Path(art_dir)
    ready_export(export, art_dir)
    pairs = read_pairs(candidates)
    with stage_run("score", art_dir, None, config.to_dict(), lock=lock, shared=True) as record:
        rec = open_recommender(art_dir)
        scored = rec.score(pairs, explain=explain)
        unknown = scored.filter(~rec.item_known())  # scored empty by `Recommender.score`: say so
        n_unknown = unknown.height
        if n_unknown:
            log.warning("score: %d of %d pairs name an item the artifacts do not know (e.g. %r; new since the last "
                        "index?): their score is empty", n_unknown, scored.height, unknown["item_id"][0])
        path = export_topk(scored, Path(export), art_dir, config, pseudonymise_ids)
        record.inputs = {"candidates": str(candidates)}
        record.counts = {"pairs": scored.height, "unknown_items": n_unknown}
        record.extra = {"export": str(path)}
        record.finish("ok")
    return scored, path


def users_by_source(recs: pl.DataFrame) -> dict[str, int]:
    """Users per list their rows come from (`source`): with the ranker's order shipped, users
    without history still get their cold-start order (content or popularity). Each user counts
    once; rows the rerank step pinned (no source) take their user's list, "rerank" if all are pinned."""
    per_user = recs.group_by("user_id").agg(pl.col("source").drop_nulls().first().fill_null("rerank"))
    return dict(per_user.group_by("source").len().sort("source").iter_rows())


PSEUDONYM = re.compile(r"[0-9a-f]{64}")  # what an export writes in place of a user id (`privacy.pseudonymise`)


def _warn_unknown_users(users: list[str], art_dir: Path, counts: dict[str, Any]) -> None:
    """Say how many of the requested users the artifacts do not know (they get the popular
    items, as anyone unknown does): a typo, or an id copied from a pseudonymised export."""
    wanted = {str(u) for u in users}
    try:
        unknown = sorted(wanted - set(known_users(art_dir)))
    except (FusionrecError, OSError, pl.exceptions.PolarsError) as exc:  # a note, never the export's failure
        log.debug("could not count unknown users: %s", exc)
        return
    if not unknown:
        return
    counts["unknown_users"] = len(unknown)
    hint = ("; 64-hex ids look like the pseudonyms an export writes: pass the raw ids (`--raw-ids` exports them)"
            if any(PSEUDONYM.fullmatch(u) for u in unknown) else "")
    log.warning("%d of %d requested users are unknown to %s (%s%s): they get the popular items%s", len(unknown),
                len(wanted), art_dir, ", ".join(unknown[:3]), ", ..." if len(unknown) > 3 else "", hint)


def run_recommend(art_dir: Path, export: Path, config: Config | None = None, *, users: list[str] | None = None,
                  k: int | None = None, explain: bool = False, exclude_seen: bool = True,
                  pseudonymise_ids: bool | None = None, data_dir: Path | None = None,
                  lock: bool = True) -> tuple[pl.DataFrame, Path]:
    """The recommend stage: top-k per user exported to `export`; returns the rows and the path.

    A reader: it holds the shared lock (unless the caller holds the exclusive one, `lock=False`).
    """
    config = with_pseudonymise(config or Config(), pseudonymise_ids)
    art_dir = Path(art_dir)
    k = config.export.k if k is None else k
    if k < 1:
        raise ConfigError(f"export.k must be at least 1, not {k}")
    ready_export(export, art_dir)
    with stage_run("recommend", art_dir, data_dir, config.to_dict(), lock=lock, shared=True) as record:
        recs = recommend_lists(art_dir, users, k, config, exclude_seen=exclude_seen, explain=explain)
        if recs.height == 0 and users is None:
            rules = config.rerank.rules_file or config.rerank.exclude_values
            hint = ("the [rerank] exclusions (rules_file, exclude_field/exclude_values) may remove every item, or "
                    if rules else "")
            raise FusionrecError(f"no recommendation for any user from {art_dir} (an empty night): check {hint}"
                                 "index.n_candidates and export.k, then rerun `fusionrec run`; or every user "
                                 "already has every item (seen items are never recommended)")
        path = export_topk(recs, Path(export), art_dir, config, pseudonymise_ids)
        by_source = users_by_source(recs)
        n_users = recs["user_id"].n_unique()
        record.counts = {"users": n_users, "rows": recs.height, "users_by_source": by_source}
        short = recs.group_by("user_id").len().filter(pl.col("len") < k).height
        if short:  # a k past the candidates gave shorter lists, silently
            record.counts["short_lists"] = short
            log.warning("%d of %d users got fewer than %d items: a list holds the user's candidates (index."
                        "n_candidates from each source, set when `fusionrec index` ran) less the items they "
                        "already have and any rerank exclusions; for longer lists raise index.n_candidates and "
                        "rerun `fusionrec index`", short, n_users, k)
        if users is not None:
            _warn_unknown_users(users, art_dir, record.counts)
        cold = by_source.get("content", 0) + by_source.get("popular", 0)
        if cold and by_source.get("ranker"):
            log.info("%d users without history keep their cold-start order (content or popularity): the ranker "
                     "is neither trained nor checked on users without history", cold)
        record.extra = {"export": str(path), "k": k}
        if explain or not exclude_seen or users is not None:
            record.extra |= {"explain": explain, "exclude_seen": exclude_seen}
        if config.rerank.active:
            record.counts["reranked_rows"] = recs.filter(pl.col("rerank").is_not_null()).height
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
                show_progress: bool = True, verify: bool = False) -> NightlyReport:
    """The whole nightly job: embed, index, train, recommend for every user, export ART/exports/topk.parquet.

    verify: the embedding job hashes every file again (`run_embed(verify=True)`)."""
    config = config or Config()
    check_engine(config)
    check_tracking(config)  # tracking.mlflow_uri set without MLflow: exit 2 before any stage
    data_dir, art_dir = Path(data_dir), Path(art_dir)
    check_separate_dirs(data_dir, art_dir)
    timings: dict[str, float] = {}
    load_catalog(data_dir)  # every table validated before hours of encoding, not after
    with ArtifactLock(art_dir), stage_run("run", art_dir, data_dir, config.to_dict(), lock=False) as total:
        total.inputs = hash_inputs(data_dir)  # the run's own record names its inputs too (it had none)
        t0 = time.perf_counter()
        embedded = run_embed(data_dir, art_dir, config, show_progress=show_progress, lock=False, verify=verify)
        timings["embed"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        indexed = run_index(data_dir, art_dir, config, lock=False)
        timings["index"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        trained = run_train(art_dir, config, lock=False)
        timings["train"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        recs, path = run_recommend(art_dir, art_dir / "exports" / "topk.parquet", config, data_dir=data_dir,
                                   lock=False)
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

