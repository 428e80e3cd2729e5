"""The embedding job: items and users -> one Parquet table of frozen embeddings per modality.

Incremental: every row carries a content hash over (raw content, preprocessing config,
model id). A rerun reuses rows whose hash is unchanged, encodes new or changed rows, drops
deleted ids, and re-encodes a whole modality when its model changes.

Resumable: rows are encoded in shards of `shard_size`; each finished shard is written
atomically under `ART/embeddings/.shards/` and acts as a cache keyed by content hash, so a
job killed mid-way redoes at most one shard. Final tables appear by atomic rename only.
"""

from __future__ import annotations

import concurrent.futures as futures
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from .config import Config, EmbedConfig
from .errors import ConfigError, FusionrecError, InputError, MediaError
from .manifest import RunRecord, hash_inputs
from .storage import ArtifactLock, clean_temporaries, sha256_bytes, sha256_file, write_parquet
from .tables import load_items, load_users, resolve_media
from .text import clean_text, item_text

log = logging.getLogger("fusionrec.embed")

MEDIA_MODALITIES = ("image", "audio")
BUILTIN_MODALITIES = ("text", "image", "audio")
FAILURE_SCHEMA = pa.schema([("kind", pa.string()), ("id", pa.string()), ("modality", pa.string()),
                            ("path", pa.string()), ("error", pa.string())])


@dataclass
class ModalityEncoder:
    """What the job needs from an encoder: an identity, a dimension, and two functions.

    `prepare` turns one media path into model input (decode, resize, resample ...) and
    raises MediaError when it cannot; `encode` turns a list of prepared inputs (or texts)
    into an (n, dim) float32 matrix of L2-normalised rows.
    """

    model_id: str
    dim: int
    encode: Callable[[list], np.ndarray]
    prepare: Callable[[Path], Any] | None = None
    preprocess_id: str = ""  # preprocessing settings folded into each content hash
    files: dict[str, str] = field(default_factory=dict)  # sha256 of the model files it loaded (manifest)


@dataclass(frozen=True)
class ModalityInput:
    kind: str  # item | user
    modality: str
    ids: list[str]
    contents: list[str]  # the text, or the media path relative to the data directory


@dataclass
class ModalityCounts:
    rows: int = 0
    encoded: int = 0
    reused: int = 0
    resumed: int = 0  # finished by an interrupted run (its shards), not encoded again
    failed: int = 0
    dropped: int = 0
    seconds: float = 0.0
    model: str = ""

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["items_per_s"] = round(self.encoded / self.seconds, 2) if self.seconds > 0 and self.encoded else None
        out["seconds"] = round(self.seconds, 3)
        return out


@dataclass
class EmbedReport:
    counts: dict[str, ModalityCounts] = field(default_factory=dict)
    failures: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0


# --------------------------------------------------------------------------- encoders


def build_encoders(cfg: EmbedConfig, needed: set[str]) -> dict[str, ModalityEncoder]:
    """The configured encoders for the modalities present in the data (loaded lazily)."""
    from .encoding import resolve_device

    device = resolve_device(cfg.device)
    out: dict[str, ModalityEncoder] = {}
    if "text" in needed and cfg.text.enabled:
        from .text import TextEncoder

        text = TextEncoder(cfg.text.model, device=device, batch_size=cfg.text.batch_size,
                           max_length=cfg.text.max_length)
        out["text"] = ModalityEncoder(text.model_id, text.dim, text.encode,
                                      preprocess_id=f"clean-v1;max_length={cfg.text.max_length}")
    if "image" in needed and cfg.image.enabled:
        from .image import ImageEncoder

        image = ImageEncoder(cfg.image.model, weights=cfg.image.weights, device=device,
                             batch_size=cfg.image.batch_size, max_pixels=cfg.image.max_pixels)
        out["image"] = ModalityEncoder(image.model_id, image.dim, lambda xs: image.encode(np.stack(xs)),
                                       prepare=image.preprocess,
                                       preprocess_id=json.dumps(_jsonable(image.data_config_), sort_keys=True))
    if "audio" in needed and cfg.audio.enabled:
        from .audio import AudioEncoder, load_audio

        a = cfg.audio
        audio = AudioEncoder(a.model, device=device, batch_size=a.batch_size, sample_rate=a.sample_rate,
                             chunk_seconds=a.chunk_seconds)

        def prepare_audio(path: Path) -> np.ndarray:
            return load_audio(path, sample_rate=a.sample_rate, max_seconds=a.max_seconds, top_db=a.top_db,
                              target_dbfs=a.target_dbfs)

        out["audio"] = ModalityEncoder(
            audio.model_id, audio.dim, audio.encode, prepare=prepare_audio,
            preprocess_id=f"sr={a.sample_rate};max={a.max_seconds};chunk={a.chunk_seconds};"
                          f"top_db={a.top_db};dbfs={a.target_dbfs}")
    return _with_file_hashes(out, cfg)


def _with_file_hashes(encoders: dict[str, ModalityEncoder], cfg: EmbedConfig) -> dict[str, ModalityEncoder]:
    """Record each encoder's model file hashes and fold them into its model id (a changed file re-encodes)."""
    from .model_files import file_hashes, encoder_files, with_files_id

    for modality, enc in encoders.items():
        enc.files = file_hashes(encoder_files(modality, cfg))
        if "+file:" not in enc.model_id:  # a checkpoint path's id carries its hash already
            enc.model_id = with_files_id(enc.model_id, enc.files)
    return encoders


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    return str(obj)


# --------------------------------------------------------------------------- inputs


def modality_inputs(items: pl.DataFrame, users: pl.DataFrame | None) -> list[ModalityInput]:
    """Which rows have which modality; rows without a value simply lack that modality."""
    out: list[ModalityInput] = []
    text = items.select("item_id", item_text(items).alias("content")).drop_nulls("content")
    out.append(ModalityInput("item", "text", text["item_id"].to_list(), text["content"].to_list()))
    for modality in MEDIA_MODALITIES:
        if modality in items.columns:
            rows = items.select("item_id", pl.col(modality).alias("content")).drop_nulls("content")
            out.append(ModalityInput("item", modality, rows["item_id"].to_list(), rows["content"].to_list()))
    if users is not None:
        if "text" in users.columns:
            rows = users.select("user_id", pl.col("text").map_elements(clean_text, return_dtype=pl.String)
                                .replace("", None).alias("content")).drop_nulls("content")
            out.append(ModalityInput("user", "text", rows["user_id"].to_list(), rows["content"].to_list()))
        for modality in MEDIA_MODALITIES:
            if modality in users.columns:
                rows = users.select("user_id", pl.col(modality).alias("content")).drop_nulls("content")
                out.append(ModalityInput("user", modality, rows["user_id"].to_list(), rows["content"].to_list()))
    return [m for m in out if m.ids]


def precomputed_tables(data_dir: Path) -> dict[tuple[str, str], Path]:
    """`DIR/embeddings/{item,user}_<modality>.parquet` -> {(kind, modality): path}."""
    out: dict[tuple[str, str], Path] = {}
    emb = Path(data_dir) / "embeddings"
    if emb.is_dir():
        for path in sorted(emb.glob("*.parquet")):
            kind, _, modality = path.stem.partition("_")
            if kind in ("item", "user") and modality:
                out[(kind, modality)] = path
    return out


def read_precomputed(path: Path, kind: str, known_ids: pl.Series) -> tuple[pa.Table, int]:
    """A precomputed embeddings table as the job's own table format; returns (table, dropped ids)."""
    id_col = f"{kind}_id"
    try:
        df = pl.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is bad input
        raise InputError(f"cannot read precomputed embeddings: {exc}", file=str(path)) from None
    if id_col not in df.columns and "id" in df.columns:
        df = df.rename({"id": id_col})
    for column in (id_col, "vector"):
        if column not in df.columns:
            raise InputError("required column is missing", file=str(path), field=column)
    df = df.with_columns(pl.col(id_col).cast(pl.String))
    lengths = df["vector"].list.len() if df.schema["vector"] != pl.Array else None
    if lengths is not None:
        bad = lengths.is_null() | (lengths != lengths.drop_nulls().mode().first())
        if bad.any():
            row = int(bad.arg_true()[0]) + 1
            raise InputError("vector is missing or has a different length from the others",
                             file=str(path), row=row, field="vector")
    matrix = np.asarray(df["vector"].to_list(), dtype=np.float32)
    finite = np.isfinite(matrix).all(axis=1)
    if not finite.all():
        raise InputError("vector contains NaN or infinity", file=str(path),
                         row=int(np.argmin(finite)) + 1, field="vector")
    keep = df[id_col].is_in(known_ids.implode()).to_numpy()
    dropped = int((~keep).sum())
    ids = df[id_col].filter(pl.Series(keep)).to_list()
    from .encoding import l2_normalise

    matrix = l2_normalise(matrix[keep])
    hashes = [sha256_bytes(row.tobytes()) for row in matrix]
    model = f"precomputed:{path.name}:{sha256_file(path)[:16]}"
    return embedding_table(ids, hashes, [model] * len(ids), matrix), dropped


# --------------------------------------------------------------------------- tables


def embedding_table(ids: list[str], hashes: list[str], models: list[str], vectors: np.ndarray) -> pa.Table:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = vectors.shape[1] if vectors.ndim == 2 else 0
    flat = pa.array(vectors.reshape(-1), type=pa.float32())
    return pa.table({
        "id": pa.array(ids, type=pa.string()),
        "content_hash": pa.array(hashes, type=pa.string()),
        "model": pa.array(models, type=pa.string()),
        "vector": pa.FixedSizeListArray.from_arrays(flat, dim),
    })


def read_artifact_table(path: Path) -> tuple[list[str], list[str], list[str], np.ndarray]:
    """One table this job wrote -> (ids, content hashes, model ids, float32 matrix).

    (pipeline.fusion.read_embedding_table reads vectors for fusion and also accepts the
    precomputed input layout.)
    """
    table = pq.read_table(path)
    vectors = table.column("vector").combine_chunks()
    dim = vectors.type.list_size
    matrix = vectors.values.to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)
    return (table.column("id").to_pylist(), table.column("content_hash").to_pylist(),
            table.column("model").to_pylist(), matrix)


def table_path(art_dir: Path, kind: str, modality: str) -> Path:
    return Path(art_dir) / "embeddings" / f"{kind}_{modality}.parquet"


# --------------------------------------------------------------------------- hashing


def content_hashes(inp: ModalityInput, enc: ModalityEncoder, data_dir: Path) -> tuple[list[str], list[Path | None],
                                                                                      dict[int, str]]:
    """Hash each row's raw content with the model id and preprocessing config.

    Media rows hash the file's bytes; a path that is missing or refused gets a hash of its
    error, and the error is returned so the row lands in failures.
    """
    salt = f"{enc.model_id}\x00{enc.preprocess_id}\x00".encode()
    hashes: list[str] = []
    paths: list[Path | None] = []
    errors: dict[int, str] = {}
    if inp.modality not in MEDIA_MODALITIES:
        return [sha256_bytes(salt + c.encode("utf-8")) for c in inp.contents], [None] * len(inp.ids), errors
    for i, rel in enumerate(inp.contents):
        try:
            path = resolve_media(data_dir, rel)
            if not path.is_file():
                raise MediaError("not a regular file" if path.exists() else "file not found")
            digest = sha256_file(path)
        except MediaError as exc:
            errors[i] = str(exc)
            path, digest = None, sha256_bytes(salt + f"error:{rel}".encode())
        except OSError as exc:
            errors[i] = f"cannot read file: {exc.strerror or exc}"
            path, digest = None, sha256_bytes(salt + f"error:{rel}".encode())
        hashes.append(sha256_bytes(salt + digest.encode()))
        paths.append(path)
    return hashes, paths, errors


# --------------------------------------------------------------------------- the job


class ShardCache:
    """Finished shards of one (kind, modality): content hash -> vector."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.vectors: dict[str, np.ndarray] = {}
        if directory.is_dir():
            for path in sorted(directory.glob("shard-*.parquet")):
                try:
                    ids, hashes, _, matrix = read_artifact_table(path)
                except Exception:  # noqa: BLE001 - a damaged shard is only lost work
                    log.warning("ignoring unreadable shard %s", path)
                    continue
                self.vectors.update(zip(hashes, matrix))

    def write(self, ids: list[str], hashes: list[str], model: str, matrix: np.ndarray) -> None:
        key = sha256_bytes("".join(hashes).encode())[:16]
        write_parquet(embedding_table(ids, hashes, [model] * len(ids), matrix),
                      self.directory / f"shard-{key}.parquet")
        self.vectors.update(zip(hashes, matrix))

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
        try:
            self.directory.parent.rmdir()  # the .shards folder, once no modality has work in flight
        except OSError:
            pass


def prepare_one(enc: ModalityEncoder, path: Path) -> tuple[Any, str | None]:
    """Decode one media file: (input, None), or (None, the error text failures.parquet records)."""
    try:
        return enc.prepare(path), None  # type: ignore[misc]
    except MediaError as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001 - any decoder crash is one bad file, not a dead job
        return None, f"{type(exc).__name__}: {exc}"


def _prepared(enc: ModalityEncoder, paths: list[Path], workers: int) -> Iterator[tuple[Any, str | None]]:
    """Decode media in threads ahead of the encoder, in input order: (input, error)."""

    def run(path: Path) -> tuple[Any, str | None]:
        return prepare_one(enc, path)

    with futures.ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="decode") as pool:
        window = max(8, workers * 8)
        pending: list[futures.Future] = []
        it = iter(paths)
        for path in it:
            pending.append(pool.submit(run, path))
            if len(pending) >= window:
                break
        while pending:
            done = pending.pop(0)
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(run, nxt))
            yield done.result()


# One encoded batch from an engine: (rows encoded, their vectors, {row: error}, rows handled).
EncodedBatch = tuple[list[int], np.ndarray, dict[int, str], int]
EncodeRows = Callable[[ModalityInput, ModalityEncoder, list[int], list[Path | None], EmbedConfig],
                      Iterator[EncodedBatch]]


def encode_local(inp: ModalityInput, enc: ModalityEncoder, todo: list[int], paths: list[Path | None],
                 cfg: EmbedConfig) -> Iterator[EncodedBatch]:
    """The local engine: shards of `shard_size` rows, media decoded in threads, encoded here."""
    for start in range(0, len(todo), cfg.shard_size):
        shard = todo[start:start + cfg.shard_size]
        errors: dict[int, str] = {}
        if enc.prepare is None:
            ok, inputs = shard, [inp.contents[i] for i in shard]
        else:
            ok, inputs = [], []
            for i, (x, err) in zip(shard, _prepared(enc, [paths[i] for i in shard], cfg.decode_workers)):
                if err is None:
                    ok.append(i)
                    inputs.append(x)
                else:
                    errors[i] = err
        yield ok, (enc.encode(inputs) if ok else np.zeros((0, enc.dim), np.float32)), errors, len(shard)


def embed_modality(inp: ModalityInput, enc: ModalityEncoder, data_dir: Path, art_dir: Path, cfg: EmbedConfig,
                   progress: Callable[[int], None] | None = None, encode_rows: EncodeRows | None = None
                   ) -> tuple[ModalityCounts, list[dict[str, str]]]:
    """Bring `ART/embeddings/{kind}_{modality}.parquet` up to date for one modality.

    `encode_rows` encodes the rows that need it (default `encode_local`; `config.engine = "ray"`
    passes the Ray engine's).
    """
    t0 = time.perf_counter()
    counts = ModalityCounts(rows=len(inp.ids), model=enc.model_id)
    failures: list[dict[str, str]] = []
    hashes, paths, errors = content_hashes(inp, enc, data_dir)

    final = table_path(art_dir, inp.kind, inp.modality)
    known: dict[str, np.ndarray] = {}
    if final.is_file():
        old_ids, old_hashes, _, old_matrix = read_artifact_table(final)
        known.update(zip(old_hashes, old_matrix))
        counts.dropped = len(set(old_ids) - set(inp.ids))
    cache = ShardCache(final.parent / ".shards" / f"{inp.kind}_{inp.modality}")

    vectors: dict[int, np.ndarray] = {}
    todo: list[int] = []
    for i, h in enumerate(hashes):
        if i in errors:
            continue
        v = known.get(h)
        if v is None:
            v = cache.vectors.get(h)
            if v is not None:
                counts.resumed += 1
        else:
            counts.reused += 1
        if v is None:
            todo.append(i)
        else:
            vectors[i] = v
    if progress:
        progress(len(inp.ids) - len(todo))

    # The engine (local loop or Ray actors) encodes the rows in `todo`; caching, failures and
    # the final table stay here, so both engines write the same tables.
    for ok, matrix, shard_errors, done in (encode_rows or encode_local)(inp, enc, todo, paths, cfg):
        errors.update(shard_errors)
        if ok:
            matrix = np.asarray(matrix, dtype=np.float32)
            if matrix.shape != (len(ok), enc.dim):
                raise FusionrecError(f"{inp.modality} encoder returned shape {matrix.shape}, "
                                     f"expected ({len(ok)}, {enc.dim})")
            cache.write([inp.ids[i] for i in ok], [hashes[i] for i in ok], enc.model_id, matrix)
            vectors.update(zip(ok, matrix))
            counts.encoded += len(ok)
        if progress:
            progress(done)

    for i, err in sorted(errors.items()):
        failures.append({"kind": inp.kind, "id": inp.ids[i], "modality": inp.modality,
                         "path": inp.contents[i], "error": err})
        if inp.kind == "user":
            # User ids (and media paths, which often contain them) stay out of logs: logs leave the team.
            log.warning("a user's %s could not be used: %s (user kept without it; the id is in failures.parquet)",
                        inp.modality, _redact(err, [inp.contents[i], paths[i]]))
        else:
            log.warning("%s %s %s: %s (%s kept without it)", inp.kind, inp.ids[i], inp.modality, err, inp.kind)
    counts.failed = len(errors)

    order = sorted(vectors)
    matrix = np.stack([vectors[i] for i in order]) if order else np.zeros((0, enc.dim), np.float32)
    write_parquet(embedding_table([inp.ids[i] for i in order], [hashes[i] for i in order],
                                  [enc.model_id] * len(order), matrix), final)
    cache.clear()
    counts.seconds = time.perf_counter() - t0
    return counts, failures


def _redact(text: str, paths: list[Any]) -> str:
    for path in sorted((str(p) for p in paths if p), key=len, reverse=True):  # the full path before its tail
        text = text.replace(path, "<file>")
    return text


def run_embed(data_dir: Path, art_dir: Path, config: Config | None = None, *,
              encoders: dict[str, ModalityEncoder] | None = None, show_progress: bool = True,
              lock: bool = True, command: str = "embed") -> EmbedReport:
    """The embedding job (`fusionrec embed`)."""
    config = config or Config()
    data_dir, art_dir = Path(data_dir), Path(art_dir)
    held = ArtifactLock(art_dir).acquire() if lock else None
    try:
        return _run_embed(data_dir, art_dir, config, encoders, show_progress, command)
    finally:
        if held is not None:
            held.release()


def _run_embed(data_dir: Path, art_dir: Path, config: Config, encoders: dict[str, ModalityEncoder] | None,
               show_progress: bool, command: str) -> EmbedReport:
    t0 = time.perf_counter()
    engine = _engine(config, data_dir, explicit=encoders is not None)  # checked before any work
    record = RunRecord(command, art_dir, data_dir, config.to_dict())
    record.inputs = hash_inputs(data_dir)
    emb_dir = art_dir / "embeddings"
    emb_dir.mkdir(parents=True, exist_ok=True)
    stale = clean_temporaries(emb_dir)
    if stale:
        log.info("removed %d temporary files left by an interrupted run", stale)

    items = load_items(data_dir)
    users = load_users(data_dir)
    inputs = modality_inputs(items, users)
    precomputed = precomputed_tables(data_dir)
    to_encode = [m for m in inputs if (m.kind, m.modality) not in precomputed]
    if encoders is None:
        encoders = build_encoders(config.embed, {m.modality for m in to_encode})
    to_encode = [m for m in to_encode if m.modality in encoders]

    report = EmbedReport()
    for (kind, modality), path in precomputed.items():
        known = items["item_id"] if kind == "item" else (users["user_id"] if users is not None else pl.Series([], dtype=pl.String))
        started = time.perf_counter()
        table, dropped = read_precomputed(path, kind, known)
        write_parquet(table, table_path(art_dir, kind, modality))
        report.counts[f"{kind}_{modality}"] = ModalityCounts(
            rows=table.num_rows, reused=table.num_rows, dropped=dropped,
            seconds=time.perf_counter() - started, model=table.column("model")[0].as_py() if table.num_rows else "")
        if dropped:
            log.warning("%s: %d ids not in the %s table were ignored", path, dropped, kind + "s")

    with engine as encode_rows, _progress(show_progress) as bar:
        for inp in to_encode:
            task = bar.add_task(f"{inp.kind} {inp.modality}", total=len(inp.ids)) if bar else None
            counts, failures = embed_modality(
                inp, encoders[inp.modality], data_dir, art_dir, config.embed,
                progress=(lambda n, task=task: bar.advance(task, n)) if bar else None, encode_rows=encode_rows)
            report.counts[f"{inp.kind}_{inp.modality}"] = counts
            report.failures.extend(failures)

    # Tables of modalities that are no longer produced would serve stale vectors: remove them.
    produced = {f"{k}.parquet" for k in report.counts}
    for path in emb_dir.glob("*_*.parquet"):
        if path.name not in produced and path.name != "failures.parquet":
            path.unlink()
            log.info("removed %s: the modality is no longer in the input", path.name)

    failures = pa.Table.from_pylist(report.failures, schema=FAILURE_SCHEMA)
    write_parquet(failures, emb_dir / "failures.parquet")
    report.seconds = time.perf_counter() - t0

    record.models = {name: enc.model_id for name, enc in encoders.items()}
    record.models["weights_sha256"] = {name: enc.files for name, enc in encoders.items() if enc.files}
    record.counts = {name: c.as_dict() for name, c in report.counts.items()}
    record.counts["failures"] = len(report.failures)
    record.timings = {"total": report.seconds, **{name: c.seconds for name, c in report.counts.items()}}

    media_rows = sum(c.rows for name, c in report.counts.items() if name.split("_", 1)[1] in MEDIA_MODALITIES)
    media_failed = sum(c.failed for name, c in report.counts.items() if name.split("_", 1)[1] in MEDIA_MODALITIES)
    share = media_failed / media_rows if media_rows else 0.0
    if share > config.embed.max_failed_share:
        record.finish("failed")
        raise FusionrecError(
            f"{media_failed} of {media_rows} media files could not be read ({share:.0%} > "
            f"embed.max_failed_share {config.embed.max_failed_share:.0%}); see {emb_dir / 'failures.parquet'}")
    record.finish("ok")
    return report


def _engine(config: Config, data_dir: Path, explicit: bool):
    """Engine dispatch: a context yielding the `encode_rows` of `config.engine` (None: local).

    explicit: encoders were given in-process, so the Ray engine ships them to its actors
    instead of building them from the config there.
    """
    import contextlib

    if config.engine == "local":
        return contextlib.nullcontext(None)
    if config.engine == "ray":
        from .ray_engine import import_ray, ray_encode_rows

        import_ray()  # the optional extra must be installed: say so before loading anything
        return ray_encode_rows(config, data_dir, ship_encoders=explicit)
    raise ConfigError(f"config key 'engine' must be 'local' or 'ray', got {config.engine!r}")


class _NoProgress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _progress(show: bool):
    if not show:
        return _NoProgress()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=False)


def summary_rows(report: EmbedReport) -> list[dict[str, Any]]:
    return [{"table": name, **c.as_dict()} for name, c in report.counts.items()]
