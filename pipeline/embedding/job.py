"""The embedding job: items and users -> one Parquet table of frozen embeddings per modality.

Incremental: every row carries a content hash over (raw content, preprocessing config,
model id). A rerun reuses rows whose hash is unchanged, encodes new or changed rows, drops
deleted ids, and re-encodes a whole modality when its model changes.

Resumable: rows are encoded in shards of `shard_size` (`shard_rows`); each finished shard is written
atomically under `ART/embeddings/.shards/` and acts as a cache keyed by content hash, so a
job killed mid-way redoes at most one shard. Final tables appear by atomic rename only.

Remembered failures: a media file that could not be decoded is remembered by its content
hash and the encoder's identity key (`FailureMemory`, `ART/cache/media_failures.parquet`);
a rerun reports it as failed again without reading it or loading the encoder, until the
file, the model or the encoder code changes, or `--verify` retries every failure.

Streamed: the tables are read `batch_rows` rows at a time into per-modality plan files,
known vectors are found by content hash (`pipeline.vector_files`) and the final table is
written a batch at a time, so memory does not grow with the catalog (`embed_modality`).
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import hashlib
import logging
import queue
import re
import shutil
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fusionrec.pipeline import interrupts
from fusionrec.pipeline.config import Config, EmbedConfig
from fusionrec.pipeline.embedding.encoding import (
    EncodedShard,
    EncodeRows,
    ModalityEncoder,
    TodoRows,
    build_encoders,
    prepare_one,
    read_ahead_shards,
    read_identities,
    save_identities,
    shard_rows,
)
from fusionrec.pipeline.embedding.ray_engine import RunOrdered, import_ray, ray_encode_rows
from fusionrec.pipeline.embedding.vector_files import HashIndex, VectorReader, hash_keys
from fusionrec.pipeline.encoders.base import l2_normalise, reporting_rows
from fusionrec.pipeline.encoders.text import ITEM_TEXT_FIELDS, clean_text, item_text
from fusionrec.pipeline.errors import ConfigError, FusionrecError, InputError, MediaError
from fusionrec.pipeline.io.manifest import RunRecord, hash_inputs, stage_run
from fusionrec.pipeline.io.storage import (
    FileHashes,
    check_separate_dirs,
    clean_temporaries,
    sha256_bytes,
    sha256_file,
    write_parquet,
)
from fusionrec.pipeline.io.streaming import (
    ParquetSink,
    bare_message,
    check_unique_ids,
    id_hashes_of,
    iter_table,
    read_rows,
    table_columns,
    table_rows,
    validate_batch,
    validated_batches,
    validated_columns,
    vector_row_group_rows,
)
from fusionrec.pipeline.io.tables import find_table, resolve_media
from fusionrec.pipeline.io.vectors import check_dimensions, read_vectors

log = logging.getLogger("fusionrec.embed")

MEDIA_MODALITIES = ("image", "audio")
BUILTIN_MODALITIES = ("text", "image", "audio")
FAILURE_SCHEMA = pa.schema([("kind", pa.string()), ("id", pa.string()), ("modality", pa.string()),
                            ("path", pa.string()), ("error", pa.string())])


MEMORY_SCHEMA = pa.schema([("kind", pa.string()), ("modality", pa.string()), ("id", pa.string()),
                           ("content_hash", pa.string()), ("identity", pa.string()), ("error", pa.string())])


class FailureMemory:
    """Media files that could not be decoded, remembered between runs in a Parquet file
    (`ART/cache/media_failures.parquet`), so a rerun does not read them again nor load the
    encoder only to fail the same way.

    A failure is known by what decides that a vector can be reused, the row's content hash
    (the file's sha256, through `FileHashes`, with the model id and preprocessing id), and by
    the encoder's identity key (its configuration, model files, library versions and code:
    `encoding.identity_key`), so a changed file, model or decoder retries it. `save` keeps only
    this run's failures (a deleted item's goes with it); `verify=True` remembers nothing old.
    """

    def __init__(self, store: Path | None = None, *, verify: bool = False) -> None:
        self.store = store
        self._known: dict[tuple[str, str], dict[str, tuple[str, str]]] = {}
        self._loaded: list[tuple[str, ...]] = []
        self._now: list[tuple[str, ...]] = []
        if store is not None and store.is_file():
            try:
                cols = pq.ParquetFile(store).read().cast(MEMORY_SCHEMA).to_pydict()
            except (OSError, ValueError, pa.ArrowException) as exc:  # a damaged cache is only a cache
                log.warning("ignoring the media failure cache %s (%s): failed files are tried again", store, exc)
                return
            self._loaded = sorted(zip(*(cols[n] for n in MEMORY_SCHEMA.names), strict=True))
            if not verify:
                for kind, modality, _id, content_hash, identity, error in self._loaded:
                    if None not in (kind, modality, content_hash, identity, error):
                        self._known.setdefault((kind, modality), {})[content_hash] = (identity, error)

    def known(self, kind: str, modality: str, identity: str) -> dict[str, str]:
        """{content hash: error} of the remembered failures of (kind, modality) under this encoder identity."""
        return {h: error for h, (ident, error) in self._known.get((kind, modality), {}).items() if ident == identity}

    def remember(self, kind: str, modality: str, id_: str, content_hash: str, identity: str, error: str) -> None:
        self._now.append((kind, modality, id_, content_hash, identity, error))

    def save(self) -> None:
        """Write this run's failures (atomically), when they differ from the file's."""
        rows = sorted(self._now)
        if self.store is None or rows == self._loaded:
            return
        write_parquet(pa.table({n: [r[i] for r in rows] for i, n in enumerate(MEMORY_SCHEMA.names)},
                               schema=MEMORY_SCHEMA), self.store)
        self._loaded = rows


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
    files_hashed: int = 0  # files read to hash them (the others' sha256 came from ART/cache/file_hashes.parquet)


# --------------------------------------------------------------------------- inputs

# One modality's rows for this run, as the plan file holds them: `content` is the text or the
# media path as the table gives it, `input` what the encoder reads (the text, or the resolved
# media path), `error` why a media row cannot be used (null when it can).
PLAN_SCHEMA = pa.schema([("row", pa.int64()), ("id", pa.string()), ("content", pa.string()),
                         ("content_hash", pa.string()), ("input", pa.string()), ("error", pa.string())])
TODO_SCHEMA = pa.schema([("row", pa.int64()), ("id", pa.string()), ("content_hash", pa.string()),
                         ("input", pa.string())])


@dataclass(frozen=True)
class ModalityPlan:
    """The rows of one (kind, modality) in this run: Parquet parts of PLAN_SCHEMA in
    `directory`, one per batch of the table, named by the batch's first row (so their sorted
    names are input order). `row` is the row's place in the table, counted from 0."""

    kind: str  # item | user
    modality: str
    directory: Path
    rows: int

    @property
    def files(self) -> list[Path]:
        return sorted(self.directory.glob(PART_GLOB))


TODO_GROUP_ROWS = 16_384  # row groups of the todo table (each shard reads across them as it needs)
PART_GLOB = "[0-9]" * 12 + ".parquet"  # `write_plan_part`'s names, not a killed write's temporary file


def table_modalities(kind: str, columns: list[str]) -> list[str]:
    """The modalities a table with these columns can have (a column of nulls still counts)."""
    text_columns = ITEM_TEXT_FIELDS if kind == "item" else ("text",)
    return ([m for m in ("text",) if any(c in columns for c in text_columns)]
            + [m for m in MEDIA_MODALITIES if m in columns])


def modality_contents(frame: pl.DataFrame, kind: str, first_row: int = 0) -> dict[str, pl.DataFrame]:
    """Per modality, `row, id, content` of the rows of a validated items or users frame that
    have it; `row` is the place in the table of a frame that starts at row `first_row`.

    Item text is title, description and tags cleaned (`item_text`); user text is the cleaned
    `text` column; media contents are the paths as given. Rows without a value lack the modality.
    """
    id_column = f"{kind}_id"
    out: dict[str, pl.DataFrame] = {}
    for modality in table_modalities(kind, frame.columns):
        content: pl.Expr | pl.Series
        if modality != "text":
            content = pl.col(modality)
        elif kind == "item":
            content = item_text(frame)
        else:
            content = pl.col("text").map_elements(clean_text, return_dtype=pl.String).replace("", None)
        out[modality] = frame.select(
            pl.int_range(first_row, first_row + pl.len(), dtype=pl.Int64).alias("row"),
            pl.col(id_column).alias("id"), content.alias("content")).drop_nulls("content")
    return out


def plan_dir(work_dir: Path, kind: str, modality: str) -> Path:
    """Where one modality's plan parts are written (inside its shard folder)."""
    return shard_dir(work_dir, kind, modality) / "plan"


def write_plans(path: Path, kind: str, data_dir: Path, encoders: dict[str, ModalityEncoder], work_dir: Path, *,
                keep_ids: bool = False, batch_rows: int = 16_384, advance: Callable[[int], None] | None = None,
                file_hashes: FileHashes | None = None,
                run_ordered: RunOrdered | None = None) -> tuple[list[ModalityPlan], Path | None]:
    """Read and validate the items or users table (`path`) in batches and write, for each
    modality in `encoders`, its plan: every row's content, content hash and input, or why it
    cannot be used, as one Parquet part per batch (`plan_dir`).

    Memory: one batch. Nothing is written under a final name, so a table that fails validation
    half-way leaves the artifacts as they were. keep_ids: also write every id of the table
    (`work_dir/{kind}_ids.parquet`, returned), to match precomputed tables against.
    run_ordered: the Ray engine's task runner (`RayEncodeRows.ordered`): each batch is read,
    validated, cleaned, text-hashed and written as a part by a Ray task (`plan_partition`),
    so the driver's own work does not grow with the workers; the parts and their row
    numbers are the local engine's, and errors are raised in input order, as the local
    engine's.
    """
    dirs = {m: plan_dir(work_dir, kind, m) for m in encoders}
    for directory in dirs.values():  # a killed run's parts must not join this plan
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
    rows = dict.fromkeys(encoders, 0)
    with contextlib.ExitStack() as stack:
        ids_path = work_dir / f"{kind}_ids.parquet" if keep_ids else None
        ids_sink = stack.enter_context(ParquetSink(ids_path, pa.schema([("id", pa.string())]))) if ids_path else None
        parts = (_local_partitions(path, kind, data_dir, encoders, batch_rows, file_hashes, dirs, keep_ids)
                 if run_ordered is None
                 else _ray_partitions(path, kind, data_dir, encoders, batch_rows, file_hashes, dirs, keep_ids,
                                      run_ordered))
        for part in parts:
            if ids_sink is not None:
                ids_sink.write(pa.table({"id": part.ids}))
            for modality, n in part.written.items():
                rows[modality] += n
            if advance:
                advance(part.rows)
    for modality, n in rows.items():
        if not n:  # a column with no values: no table for that modality
            shutil.rmtree(shard_dir(work_dir, kind, modality), ignore_errors=True)
    return [ModalityPlan(kind, m, dirs[m], n) for m, n in rows.items() if n], ids_path


def plan_rows(modality: str, rows: pl.DataFrame, enc: ModalityEncoder, data_dir: Path,
              file_hashes: FileHashes | None = None) -> pa.Table:
    """One batch's plan rows of one modality (`row, id, content` of `modality_contents`), PLAN_SCHEMA."""
    contents = rows["content"].to_list()
    hashes, paths, errors = content_hashes(modality, contents, enc, data_dir, file_hashes)
    content = rows["content"].to_arrow()
    inputs = content if modality == "text" else pa.array([str(p) if p is not None else None for p in paths],
                                                         pa.string())
    return pa.table({"row": rows["row"].to_arrow(), "id": rows["id"].to_arrow(), "content": content,
                     "content_hash": pa.array(hashes, pa.string()), "input": inputs,
                     "error": pa.array([errors.get(i) for i in range(rows.height)], pa.string())},
                    schema=PLAN_SCHEMA)


def plan_part_name(first_row: int) -> str:
    return f"{first_row:012d}.parquet"  # sorted names are input order (PART_GLOB)


def write_plan_part(directory: Path, first_row: int, table: pa.Table) -> int:
    """One batch's plan rows as the part named by the batch's first row (atomic); returns its rows."""
    write_parquet(table, Path(directory) / plan_part_name(first_row))
    return table.num_rows


@dataclass
class PartitionPlan:
    """What one batch of rows [start, start + rows) of the items or users table gave: the
    plan rows written per modality, and what the driver still needs."""

    start: int = 0
    rows: int = 0
    written: dict[str, int] = field(default_factory=dict)  # modality: plan rows written as a part
    ids: pa.Array | None = None  # every id of the batch (keep_ids only)
    id_hashes: np.ndarray | None = None  # Ray only: the driver checks ids are unique across batches
    media: dict[str, pl.DataFrame] = field(default_factory=dict)  # Ray: row, id, content, hashed by the driver
    error: tuple[str, str | None, int | None, str | None] | None = None  # an InputError's (message, file, row, field)


def _local_partitions(path: Path, kind: str, data_dir: Path, encoders: dict[str, ModalityEncoder], batch_rows: int,
                      file_hashes: FileHashes | None, dirs: dict[str, Path],
                      keep_ids: bool) -> Iterator[PartitionPlan]:
    """The local engine: each validated batch's plan parts, written in this process."""
    start = 0
    for frame in validated_batches(path, kind, batch_rows):
        written = {modality: write_plan_part(dirs[modality], start,
                                             plan_rows(modality, rows, encoders[modality], data_dir, file_hashes))
                   for modality, rows in modality_contents(frame, kind, start).items()
                   if modality in encoders and rows.height}
        yield PartitionPlan(start, frame.height, written, frame[f"{kind}_id"].to_arrow() if keep_ids else None)
        start += frame.height


def plan_partition(frame: pl.DataFrame | None, path: str, kind: str, columns: list[str], start: int, stop: int,
                   salts: dict[str, tuple[str, int, str]], dirs: dict[str, str],
                   keep_ids: bool = False) -> PartitionPlan:
    """A Ray task of the embedding job: rows [start, stop) of the table at `path` (read here
    from Parquet when `frame` is None) validated, cleaned and, for text, hashed and written
    as the batch's plan part (in `dirs[modality]`, the local engine's part).

    Media rows come back as (row, id, content): their files are hashed by the driver, whose
    `ART/cache/file_hashes.parquet` remembers them between runs. A bad row comes back as the
    InputError's parts, raised by the driver once the partitions before it are done.
    salts: {modality: (model id, dimension, preprocess id)}, what a content hash depends on.
    """
    source = Path(path)
    try:
        if frame is None:
            frame = read_rows(source, columns, start, stop)
        frame = validate_batch(frame, source, kind, start)
    except InputError as exc:
        return PartitionPlan(start, error=(bare_message(exc), exc.file, exc.row, exc.field))
    out = PartitionPlan(start, frame.height, ids=frame[f"{kind}_id"].to_arrow() if keep_ids else None,
                        id_hashes=id_hashes_of(frame, kind))
    for modality, rows in modality_contents(frame, kind, start).items():
        if modality not in salts or not rows.height:
            continue
        if modality in MEDIA_MODALITIES:
            out.media[modality] = rows
        else:
            model_id, dim, preprocess_id = salts[modality]
            enc = ModalityEncoder(model_id, dim, _not_here, preprocess_id=preprocess_id)
            out.written[modality] = write_plan_part(Path(dirs[modality]), start,
                                                    plan_rows(modality, rows, enc, source))
    return out


def _not_here(inputs: list) -> np.ndarray:
    raise FusionrecError("plan tasks hash contents; they do not encode")  # never called: the tasks only hash


def _ray_partitions(path: Path, kind: str, data_dir: Path, encoders: dict[str, ModalityEncoder], batch_rows: int,
                    file_hashes: FileHashes | None, dirs: dict[str, Path], keep_ids: bool,
                    run_ordered: RunOrdered) -> Iterator[PartitionPlan]:
    """The Ray engine: `plan_partition` for each batch of `batch_rows` rows (the local engine's
    batches, so a bad row gives its error), results in input order. Parquet partitions are
    read by the tasks; CSV batches are parsed here (a quoted cell may hold a newline, so byte
    ranges are not rows) and sent to the tasks. Media parts are written here, once their
    files are hashed."""
    path = Path(path)
    columns = validated_columns(path, kind)
    salts = {m: (enc.model_id, enc.dim, enc.preprocess_id) for m, enc in encoders.items()}
    where = {m: str(d) for m, d in dirs.items()}

    def calls() -> Iterator[tuple]:
        if path.suffix == ".parquet":
            n = table_rows(path) or 0
            for start in range(0, n, batch_rows):
                yield None, str(path), kind, columns, start, min(start + batch_rows, n), salts, where, keep_ids
            return
        start = 0
        for frame in iter_table(path, columns, batch_rows):
            yield frame, str(path), kind, columns, start, start + frame.height, salts, where, keep_ids
            start += frame.height

    id_hashes: list[np.ndarray] = []
    for part in run_ordered(plan_partition, calls(), f"reading of {path.name}"):
        if part.error is not None:
            message, file, row, field_ = part.error
            raise InputError(message, file=file, row=row, field=field_)
        assert part.id_hashes is not None
        id_hashes.append(part.id_hashes)
        for modality in part.written:
            if not (dirs[modality] / plan_part_name(part.start)).is_file():
                # The task ran on a node that does not see this folder: its rows would be lost silently.
                raise FusionrecError(
                    f"the Ray task for rows {part.start}-{part.start + part.rows - 1} of {path.name} wrote its "
                    f"{modality} plan part where this process cannot see it ({dirs[modality]}): on a Ray cluster "
                    "the artifacts directory must be on storage every node sees at the same path")
        for modality, rows in part.media.items():
            part.written[modality] = write_plan_part(
                dirs[modality], part.start, plan_rows(modality, rows, encoders[modality], data_dir, file_hashes))
        yield part
    check_unique_ids(id_hashes, path, kind, batch_rows)


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


def read_precomputed(path: Path, kind: str, known_ids: pl.Series,
                     file_hashes: FileHashes | None = None) -> tuple[pa.Table, int]:
    """A precomputed embeddings table as the job's own table format; returns (table, dropped ids).

    Validated by `pipeline.io.vectors.read_vectors` (fusion's reader uses the same); ids not
    in the catalogue (and null ids) are dropped and counted.
    """
    kept, matrix, dropped = check_precomputed(path, kind, known_ids)
    matrix = l2_normalise(matrix)
    hashes = [sha256_bytes(row.tobytes()) for row in matrix]
    model = f"precomputed:{path.name}:{(sha256_file if file_hashes is None else file_hashes.sha256)(path)[:16]}"
    return embedding_table(kept, hashes, [model] * len(kept), matrix), dropped


def check_precomputed(path: Path, kind: str, known_ids: pl.Series) -> tuple[list[str], np.ndarray, int]:
    """What `read_precomputed` checks (`fusionrec doctor` stops here, before the per-row hashes):
    the ids that match the catalogue, their vectors as given, and the count of dropped ids."""
    if path.is_dir():
        raise InputError("is a directory, not a Parquet file of vectors", file=str(path), field="vector")
    ids, matrix = read_vectors(path, (f"{kind}_id", "id"), what="precomputed embeddings")
    if len(ids) and matrix.shape[1] == 0:
        raise InputError("every vector is empty (0 numbers)", file=str(path), row=1, field="vector")
    ids = ids.str.strip_chars()  # the tables' ids are trimmed: the same id, the same spelling
    keep = ids.is_in(known_ids.implode()).fill_null(False).to_numpy()
    check_matched(path, kind, ids, keep, known_ids)
    return ids.filter(pl.Series(keep)).to_list(), matrix[keep], int((~keep).sum())


MAX_UNMATCHED_SHARE = 0.10  # precomputed rows matching no id of the table; beyond this (and 2 rows) it is bad input


def check_matched(path: Path, kind: str, ids: pl.Series, keep: np.ndarray, known_ids: pl.Series) -> None:
    """Refuse a precomputed table whose ids mostly miss the items/users table (a different
    spelling: '1' against '01', case, spaces): exit 2 with examples of both spellings."""
    unmatched = int((~keep).sum())
    if unmatched <= 2 or unmatched <= MAX_UNMATCHED_SHARE * len(ids):
        return
    missing = ids.filter(pl.Series(~keep)).drop_nulls()
    first = int(np.flatnonzero(~keep)[0]) + 1

    def plain(value: str) -> str:  # the spelling aside: case, spaces, zeros before a number
        return re.sub(r"(?<!\d)0+(?=\d)", "", value.strip().lower())

    spelled = {plain(v): v for v in known_ids.head(1_000_000).to_list() if v is not None}
    pairs = [f"{m!r} (the {kind}s table has {spelled[plain(m)]!r})" for m in missing.head(200).to_list()
             if plain(m) in spelled][:3]
    if not pairs:
        pairs = [repr(m) for m in missing.head(3).to_list()]
        pairs.append(f"while the {kind}s table has ids such as "
                     f"{', '.join(repr(v) for v in known_ids.head(3).to_list())}")
    raise InputError(f"{unmatched} of {len(ids)} ids ({unmatched / len(ids):.0%}) match no id of the {kind}s table "
                     f"(more than {MAX_UNMATCHED_SHARE:.0%}), e.g. {', '.join(pairs)}; spell the ids as the {kind}s "
                     "table does", file=str(path), row=first, field=ids.name or f"{kind}_id")


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


def content_hashes(modality: str, contents: list[str], enc: ModalityEncoder, data_dir: Path,
                   file_hashes: FileHashes | None = None) -> tuple[list[str], list[Path | None], dict[int, str]]:
    """Hash each row's raw content with the model id and preprocessing config.

    Media rows hash the file's bytes (through `file_hashes`, which remembers them between
    runs, when given); a path that is missing or refused gets a hash of its error, and the
    error is returned so the row lands in failures.
    """
    digest_of = sha256_file if file_hashes is None else file_hashes.sha256
    salt = f"{enc.model_id}\x00{enc.preprocess_id}\x00".encode()
    hashes: list[str] = []
    paths: list[Path | None] = []
    errors: dict[int, str] = {}
    if modality not in MEDIA_MODALITIES:
        return [sha256_bytes(salt + c.encode("utf-8")) for c in contents], [None] * len(contents), errors
    root = Path(data_dir).resolve()
    for i, rel in enumerate(contents):
        try:
            path = resolve_media(data_dir, rel, root=root)
            if not path.is_file():
                raise MediaError("not a regular file" if path.exists() else "file not found")
            digest = digest_of(path)
        except MediaError as exc:
            errors[i] = str(exc)
            path, digest = None, sha256_bytes(salt + f"error:{rel}".encode())
        except (OSError, ValueError) as exc:  # ValueError: a path the OS cannot take
            errors[i] = f"cannot read file: {getattr(exc, 'strerror', None) or exc}"
            path, digest = None, sha256_bytes(salt + f"error:{rel!r}".encode())
        hashes.append(sha256_bytes(salt + digest.encode()))
        paths.append(path)
    return hashes, paths, errors


# --------------------------------------------------------------------------- the job


def shard_dir(work_dir: Path, kind: str, modality: str) -> Path:
    """`ART/embeddings/.shards/{kind}_{modality}`: one modality's work in flight (plan, shards)."""
    return Path(work_dir) / f"{kind}_{modality}"


class ShardCache:
    """Finished shards of one (kind, modality), each a small embedding table; the job's
    HashIndex finds vectors in them by content hash, as in the previous final table."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def files(self) -> list[Path]:
        return sorted(self.directory.glob("shard-*.parquet")) if self.directory.is_dir() else []

    def write(self, ids: list[str], hashes: list[str], model: str, matrix: np.ndarray) -> Path:
        path = self.directory / f"shard-{sha256_bytes(''.join(hashes).encode())[:16]}.parquet"
        write_parquet(embedding_table(ids, hashes, [model] * len(ids), matrix), path)
        return path

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
        try:
            self.directory.parent.rmdir()  # the .shards folder, once no modality has work in flight
        except OSError:
            pass


def _prepared(enc: ModalityEncoder, paths: list[Path], workers: int,
              stop: threading.Event | None = None) -> Iterator[tuple[Any, str | None]]:
    """Decode media in threads ahead of the encoder, in input order: (input, error). A set
    `stop` ends it early (the consumer went away)."""

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
            if stop is not None and stop.is_set():
                for f in pending:
                    f.cancel()
                return
            done = pending.pop(0)
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(run, nxt))
            yield done.result()


@dataclass
class PreparedShard:
    """One shard of the todo table, its media decoded: what the encoder takes next."""

    batch: pa.RecordBatch
    ok: np.ndarray  # positions in `batch` whose input is ready (all of them for text)
    inputs: list  # the ready inputs, in `ok`'s order
    errors: dict[int, str]  # plan row -> why its media could not be decoded


def _prepare_shard(enc: ModalityEncoder, batch: pa.RecordBatch, workers: int,
                   stop: threading.Event | None = None) -> PreparedShard:
    rows = batch.column("row").to_numpy()
    inputs = batch.column("input").to_pylist()
    errors: dict[int, str] = {}
    if enc.prepare is None:
        return PreparedShard(batch, np.arange(len(rows)), inputs, errors)
    ok_list, prepared = [], []
    for j, (x, err) in enumerate(_prepared(enc, [Path(p) for p in inputs], workers, stop)):
        if err is None:
            ok_list.append(j)
            prepared.append(x)
        else:
            errors[int(rows[j])] = err
    return PreparedShard(batch, np.asarray(ok_list, dtype=np.int64), prepared, errors)


_DONE = object()


def _read_ahead(make: Callable[[threading.Event], Iterator[PreparedShard]], depth: int) -> Iterator[PreparedShard]:
    """The shards of `make(stop)`, prepared up to `depth` shards ahead in one background thread,
    so decoding the next shard runs while the encoder works on this one (on a GPU the two
    otherwise alternate; docs/benchmarks.md). depth 0: prepared here, one after the other.
    An error while preparing is raised here, at the shard it belongs to."""
    stop = threading.Event()
    if depth <= 0:
        yield from make(stop)
        return
    # A shard takes a slot before it is decoded and frees it when the encoder takes it, so at
    # most `depth` shards are decoded (or being decoded) beyond the one being encoded; a bounded
    # queue alone would let the thread hold one more, finished, while it waits to put it.
    slots = threading.Semaphore(depth)
    ready: queue.Queue = queue.Queue()  # bounded by the slots (and one end or error)

    def take_slot() -> bool:
        while not stop.is_set():
            if slots.acquire(timeout=0.1):
                return True
        return False

    def produce() -> None:
        try:
            shards = make(stop)
            while take_slot():
                shard = next(shards, _DONE)
                ready.put(shard)
                if shard is _DONE:
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            ready.put(exc)

    worker = threading.Thread(target=produce, name="read-ahead", daemon=True)
    worker.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            slots.release()  # taken: the next shard may be decoded while this one is encoded
            yield item
    finally:
        stop.set()  # the consumer is done or gone: the producer stops at its next file
        worker.join()


def encode_local(todo: TodoRows, enc: ModalityEncoder, cfg: EmbedConfig) -> Iterator[EncodedShard]:
    """The local engine: shards of `shard_rows` rows read from the todo table, media decoded
    in threads (`read_ahead_shards` shards ahead of the encoder), encoded here."""
    shard = shard_rows(cfg, enc.device, media=enc.prepare is not None)

    def shards(stop: threading.Event) -> Iterator[PreparedShard]:
        for batch in pq.ParquetFile(todo.path).iter_batches(batch_size=shard):
            if stop.is_set():
                return
            yield _prepare_shard(enc, batch, cfg.decode_workers, stop)

    for ready in _read_ahead(shards, read_ahead_shards(cfg, enc.device)):
        batch, ok = ready.batch, ready.ok
        rows = batch.column("row").to_numpy()
        matrix = enc.encode(ready.inputs) if len(ok) else np.zeros((0, enc.dim), np.float32)
        ids, hashes = batch.column("id").to_pylist(), batch.column("content_hash").to_pylist()
        yield EncodedShard(rows[ok], [ids[j] for j in ok], [hashes[j] for j in ok], matrix, ready.errors, len(rows))


def embed_modality(plan: ModalityPlan, enc: ModalityEncoder, art_dir: Path, cfg: EmbedConfig,
                   progress: Callable[[int], None] | None = None, encode_rows: EncodeRows | None = None,
                   batch_rows: int = 16_384, failure_memory: FailureMemory | None = None,
                   ) -> tuple[ModalityCounts, list[dict[str, str]]]:
    """Bring `ART/embeddings/{kind}_{modality}.parquet` up to date for one modality.

    Three streamed passes over the plan, so memory is bounded by a batch, the row groups
    being read and 28 bytes per row of the hash index, not by the catalog: (1) rows whose
    content hash is in the previous table or a finished shard are reused, the others go to
    a todo table; (2) the engine encodes the todo rows in shards (`encode_rows`, default
    `encode_local`; `config.engine = "ray"` passes the Ray engine's), each written as it
    comes; (3) the final table is written in plan order from the previous table and the
    shards. Caching, failures and the final table stay here, so both engines write the same
    tables.

    failure_memory: rows whose content hash failed to decode before under this encoder
    identity are failures again without being read (no encoder loads for them); this run's
    decode failures are remembered in it.
    """
    t0 = time.perf_counter()
    counts = ModalityCounts(rows=plan.rows, model=enc.model_id)
    final = table_path(art_dir, plan.kind, plan.modality)
    cache = ShardCache(plan.directory.parent)
    index = HashIndex(([final] if final.is_file() else []) + cache.files())
    for path in index.skipped_:
        log.warning("ignoring unreadable %s: its rows are encoded again", path)
    has_final = bool(index.files_) and index.files_[0] == final
    if has_final:
        counts.dropped = _ids_missing_from(final, plan.files)

    def plan_batches(columns: list[str]) -> Iterator[pa.RecordBatch]:
        for part in plan.files:
            yield from pq.ParquetFile(part).iter_batches(batch_size=batch_rows, columns=columns)

    # (1) Reuse what is known; the rest is to encode (but files known not to decode).
    errors: dict[int, str] = {}
    known_failures = failure_memory.known(plan.kind, plan.modality, enc.identity_key) if failure_memory else {}
    failed_hashes = pa.array(list(known_failures), pa.string())
    undecodable: list[int] = []  # plan rows whose file failed to decode, this run or before
    todo = TodoRows(plan.kind, plan.modality, plan.directory.parent / "todo.parquet", 0)
    with ParquetSink(todo.path, TODO_SCHEMA, row_group_rows=TODO_GROUP_ROWS) as sink:
        for batch in plan_batches(["row", "id", "content_hash", "input", "error"]):
            failed = batch.column("error").is_valid().to_numpy(zero_copy_only=False)
            errors.update(zip(batch.column("row").to_numpy()[failed].tolist(),
                              batch.column("error").filter(pa.array(failed)).to_pylist()))
            usable = batch.filter(pa.array(~failed))
            found, file, _ = index.lookup(hash_keys(usable.column("content_hash")))
            reused = int((found & (file == 0)).sum()) if has_final else 0
            counts.reused += reused
            counts.resumed += int(found.sum()) - reused
            todo_rows = usable.filter(pa.array(~found))
            if known_failures and todo_rows.num_rows:
                known = pc.is_in(todo_rows.column("content_hash"), value_set=failed_hashes).to_numpy(
                    zero_copy_only=False)
                if known.any():
                    remembered = todo_rows.filter(pa.array(known))
                    rows_known = remembered.column("row").to_pylist()
                    errors.update(zip(rows_known, (known_failures[h] for h in
                                                   remembered.column("content_hash").to_pylist()), strict=True))
                    undecodable.extend(rows_known)
                    todo_rows = todo_rows.filter(pa.array(~known))
            sink.write(todo_rows.select(TODO_SCHEMA.names))
            if progress:
                progress(batch.num_rows - todo_rows.num_rows)
    todo = TodoRows(todo.kind, todo.modality, todo.path, sink.rows)
    if undecodable:
        log.info("%s %s: %d files that failed to decode before are unchanged: reported as failed, not read "
                 "again (--verify retries them)", plan.kind, plan.modality, len(undecodable))

    # (2) The engine (local loop or Ray actors) encodes the todo rows.
    written: list[Path] = []
    if todo.rows:
        shards = (encode_rows or encode_local)(todo, enc, cfg)
        # The local engine's encoder reports its batches as it goes (`rows_done`); the rest of
        # each shard (its failures, or all of it from a Ray actor) is counted when it arrives.
        shard_reported = 0

        def encoded_rows(n: int) -> None:
            nonlocal shard_reported
            shard_reported += n
            cast("Callable[[int], None]", progress)(n)

        # Closed on the way out, error or not, so a read-ahead thread stops now, not at garbage collection.
        with contextlib.closing(cast(Any, shards)) if hasattr(shards, "close") else contextlib.nullcontext(), \
                reporting_rows(encoded_rows if progress else None):
            for shard in shards:
                interrupts.check()  # a Ctrl-C dropped in a destructor stops the job here, shards kept
                errors.update(shard.errors)
                undecodable.extend(shard.errors)
                if len(shard.rows):
                    matrix = np.asarray(shard.vectors, dtype=np.float32)
                    if matrix.shape != (len(shard.rows), enc.dim):
                        raise FusionrecError(f"{plan.modality} encoder returned shape {matrix.shape}, "
                                             f"expected ({len(shard.rows)}, {enc.dim})")
                    written.append(cache.write(shard.ids, shard.hashes, enc.model_id, matrix))
                    counts.encoded += len(shard.rows)
                if progress:
                    progress(shard.handled - shard_reported)
                shard_reported = 0
        index.add(written)

    # (3) The final table, in plan order (kept as it is when it already holds exactly these rows).
    failed_rows = np.fromiter(errors, dtype=np.int64, count=len(errors))

    def kept_batches(columns: list[str]) -> Iterator[pa.RecordBatch]:
        for batch in plan_batches(columns):
            yield batch.filter(pa.array(~np.isin(batch.column("row").to_numpy(), failed_rows)))

    if has_final and not written and _rows_digest(
            (b.column("id").to_pylist(), b.column("content_hash").to_pylist(), [enc.model_id] * b.num_rows)
            for b in kept_batches(["row", "id", "content_hash"])) == _rows_digest(
            (b.column("id").to_pylist(), b.column("content_hash").to_pylist(), b.column("model").to_pylist())
            for b in pq.ParquetFile(final).iter_batches(batch_size=batch_rows, columns=["id", "content_hash", "model"])):
        failures = _failure_records(plan, errors, undecodable, failure_memory, enc.identity_key)
        counts.failed = len(errors)
        cache.clear()
        counts.seconds = time.perf_counter() - t0
        return counts, failures
    reader = VectorReader(index.files_, enc.dim)
    schema = embedding_table([], [], [], np.zeros((0, enc.dim), np.float32)).schema
    with ParquetSink(final, schema, row_group_rows=vector_row_group_rows(enc.dim)) as sink:
        for batch in kept_batches(["row", "id", "content_hash"]):
            hashes = batch.column("content_hash").to_pylist()  # once: keys, check and table
            found, file, row = index.lookup(hash_keys(hashes))
            if not found.all():
                raise FusionrecError(f"{plan.kind} {plan.modality}: {int((~found).sum())} rows have no vector "
                                     "after encoding (a shard went missing during the run?)")
            matrix = reader.take(file, row, np.asarray(hashes, dtype=str))
            sink.write(embedding_table(batch.column("id").to_pylist(), hashes,
                                       [enc.model_id] * batch.num_rows, matrix))

    failures = _failure_records(plan, errors, undecodable, failure_memory, enc.identity_key)
    counts.failed = len(errors)
    cache.clear()
    counts.seconds = time.perf_counter() - t0
    return counts, failures


def _rows_digest(batches: Iterable[tuple[list[str], list[str], list[str]]]) -> tuple[int, str]:
    """(rows, sha256) over (id, content hash, model) of each row in order, streamed batch by batch."""
    digest, rows = hashlib.sha256(), 0
    for ids, hashes, models in batches:
        rows += len(ids)
        digest.update("".join(f"{i}\x00{h}\x00{m}\n" for i, h, m in zip(ids, hashes, models, strict=True))
                      .encode("utf-8", "surrogatepass"))
    return rows, digest.hexdigest()


def _ids_missing_from(final: Path, plan_files: list[Path]) -> int:
    """How many ids of the previous table are not in the plan (by 64-bit id hashes)."""
    def id_hashes(path: Path) -> Iterator[np.ndarray]:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=65_536, columns=["id"]):
            yield cast(pl.Series, pl.from_arrow(batch.column("id"))).hash(seed=0).to_numpy()

    current = np.sort(np.concatenate([np.zeros(0, np.uint64), *(h for f in plan_files for h in id_hashes(f))]))
    missing = 0
    for old in id_hashes(final):
        pos = np.minimum(np.searchsorted(current, old), max(len(current) - 1, 0))
        missing += int((current[pos] != old).sum()) if len(current) else len(old)
    return missing


def _failure_records(plan: ModalityPlan, errors: dict[int, str], undecodable: Collection[int] = (),
                     memory: FailureMemory | None = None, identity: str = "") -> list[dict[str, str]]:
    """failures.parquet rows of one modality, in plan order, and one WARNING line that sums
    them up (the first case named; user ids and paths kept out of logs). The rows in
    `undecodable` (files that failed to decode) are remembered in `memory` under `identity`."""
    if not errors:
        return []
    rows = (pl.scan_parquet(plan.files).filter(pl.col("row").is_in(list(errors)))
            .select("row", "id", "content", "input", "content_hash").sort("row").collect())
    decode = set(undecodable)
    out: list[dict[str, str]] = []
    for _row, id_, content, _resolved, content_hash in rows.iter_rows():  # failures only: few rows
        out.append({"kind": plan.kind, "id": id_, "modality": plan.modality, "path": content,
                    "error": errors[_row]})
        if memory is not None and _row in decode:
            memory.remember(plan.kind, plan.modality, id_, content_hash, identity, errors[_row])
    if out:
        first = out[0]
        if plan.kind == "user":
            # User ids (and media paths, which often contain them) stay out of logs: logs leave the team.
            example = _redact(first["error"], [first["path"], rows["input"][0]])
        else:
            example = f"{plan.kind} {first['id']}: {first['error']}"
        more = f" and {len(out) - 1} more" if len(out) > 1 else ""
        log.warning("%d %s %s files could not be used (first: %s%s); the %ss are kept without them, "
                    "see failures.parquet", len(out), plan.kind, plan.modality, _clip(example), more, plan.kind)
    return out


def _clip(text: str, limit: int = 200) -> str:
    text = text.replace("\x00", "\\0").replace("\n", " ")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _redact(text: str, paths: list[Any]) -> str:
    for path in sorted((str(p) for p in paths if p), key=len, reverse=True):  # the full path before its tail
        text = text.replace(path, "<file>")
    return text


def run_embed(data_dir: Path, art_dir: Path, config: Config | None = None, *,
              encoders: dict[str, ModalityEncoder] | None = None, show_progress: bool = True,
              lock: bool = True, command: str = "embed", verify: bool = False) -> EmbedReport:
    """The embedding job (`fusionrec embed`).

    The sha256 of input tables, media and model files are remembered by (path, size, mtime,
    ctime, inode) in `ART/cache/file_hashes.parquet`, and each encoder's identity in
    `ART/cache/encoders.json`, so a rerun reads only the files that changed and loads no model
    when nothing needs encoding. Media that failed to decode are remembered in
    `ART/cache/media_failures.parquet` (`FailureMemory`) and not read again while unchanged.
    `verify=True` hashes every file again, loads every encoder and retries every failed file.
    """
    config = config or Config()
    data_dir, art_dir = Path(data_dir), Path(art_dir)
    check_separate_dirs(data_dir, art_dir)
    with stage_run(command, art_dir, data_dir, config.to_dict(), lock=lock) as record:
        return _run_embed(data_dir, art_dir, config, encoders, show_progress, record, verify)


CACHE_DIR = "cache"  # ART/cache/: what lets a rerun skip work (file hashes, encoder identities); never needed
FILE_HASHES = "file_hashes.parquet"
ENCODER_IDENTITIES = "encoders.json"
MEDIA_FAILURES = "media_failures.parquet"


def _run_embed(data_dir: Path, art_dir: Path, config: Config, encoders: dict[str, ModalityEncoder] | None,
               show_progress: bool, record: RunRecord, verify: bool = False) -> EmbedReport:
    t0 = time.perf_counter()
    engine = _engine(config, data_dir, explicit=encoders is not None)  # checked before any work
    file_hashes = FileHashes(art_dir / CACHE_DIR / FILE_HASHES, verify=verify)
    record.inputs = hash_inputs(data_dir, file_hashes)
    emb_dir = art_dir / "embeddings"
    emb_dir.mkdir(parents=True, exist_ok=True)
    stale = clean_temporaries(emb_dir)
    if stale:
        log.info("removed %d temporary files left by an interrupted run", stale)

    # Which modalities the tables can have decides which encoders to load (their model ids
    # are part of every content hash, so they come before reading the rows).
    precomputed = precomputed_tables(data_dir)
    tables = {kind: find_table(data_dir, f"{kind}s", required=kind == "item") for kind in ("item", "user")}
    wanted = {kind: [m for m in table_modalities(kind, table_columns(path)) if (kind, m) not in precomputed]
              for kind, path in tables.items() if path is not None}
    if encoders is None:
        identities = art_dir / CACHE_DIR / ENCODER_IDENTITIES
        encoders = build_encoders(config.embed, {m for mods in wanted.values() for m in mods}, hashes=file_hashes,
                                  known=None if verify else read_identities(identities))

    report = EmbedReport()
    work_dir = emb_dir / ".shards"
    failure_memory = FailureMemory(art_dir / CACHE_DIR / MEDIA_FAILURES, verify=verify)
    try:
        _embed_all(data_dir, art_dir, config, encoders, tables, wanted, precomputed, work_dir, engine,
                   show_progress, report, file_hashes, failure_memory)
    except BaseException:
        _discard_plans(work_dir)  # a failed run leaves only its finished shards (resumable work)
        raise
    with contextlib.suppress(OSError):
        work_dir.rmdir()  # empty once every modality is done

    # Tables of modalities that are no longer produced would serve stale vectors: remove them.
    produced = {f"{k}.parquet" for k in report.counts}
    for path in emb_dir.glob("*_*.parquet"):
        if path.name not in produced and path.name != "failures.parquet":
            path.unlink()
            log.info("removed %s: the modality is no longer in the input", path.name)

    failures = pa.Table.from_pylist(report.failures, schema=FAILURE_SCHEMA)
    write_parquet(failures, emb_dir / "failures.parquet")
    file_hashes.save()
    failure_memory.save()
    save_identities(art_dir / CACHE_DIR / ENCODER_IDENTITIES, encoders)
    report.files_hashed = file_hashes.hashed
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
        raise FusionrecError(  # stage_run records the failed run with this reason
            f"{media_failed} of {media_rows} media files could not be read ({share:.0%} > "
            f"embed.max_failed_share {config.embed.max_failed_share:.0%}); see {emb_dir / 'failures.parquet'}")
    record.finish("ok")
    return report


def _embed_all(data_dir: Path, art_dir: Path, config: Config, encoders: dict[str, ModalityEncoder],
               tables: dict[str, Path | None], wanted: dict[str, list[str]],
               precomputed: dict[tuple[str, str], Path], work_dir: Path, engine, show_progress: bool,
               report: EmbedReport, file_hashes: FileHashes | None = None,
               failure_memory: FailureMemory | None = None) -> None:
    """Plans for both tables (read and validated before any final table changes), then the
    precomputed tables, then each modality; counts and failures go into `report`."""
    with engine as encode_rows, _progress(show_progress) as bar:
        plans: list[ModalityPlan] = []
        known_ids: dict[str, Path | None] = {}
        for kind, path in tables.items():
            if path is None:
                continue
            task = bar.add_task(f"read {kind}s", total=table_rows(path)) if bar else None
            kind_plans, known_ids[kind] = write_plans(
                path, kind, data_dir, {m: encoders[m] for m in wanted[kind] if m in encoders}, work_dir,
                keep_ids=any(k == kind for k, _ in precomputed), batch_rows=config.embed.batch_rows,
                advance=cast("Callable[[int], None]", lambda n, task=task: bar.advance(task, n)) if bar else None,
                file_hashes=file_hashes, run_ordered=encode_rows.ordered if encode_rows is not None else None)
            if bar:
                bar.stop_task(task)  # its timer ends with the step, not with the job
            plans.extend(kind_plans)

        # Every precomputed table is read and validated before any of them replaces a table in ART.
        ready = []
        for (kind, modality), path in precomputed.items():
            ids_path = known_ids.get(kind)
            known = pl.read_parquet(ids_path)["id"] if ids_path else pl.Series([], dtype=pl.String)
            started = time.perf_counter()
            table, dropped = read_precomputed(path, kind, known, file_hashes)
            ready.append((kind, modality, path, table, dropped, time.perf_counter() - started))
        # A user's and an item's vectors of one modality are compared: one dimension, checked
        # before anything lands (the index stage failed on a matrix product: "unexpected ValueError").
        dims: dict[str, dict[str, int]] = {"item": {}, "user": {}}
        for plan in plans:  # the modalities with rows to encode
            dims[plan.kind][plan.modality] = encoders[plan.modality].dim
        for kind, modality, _, table, _, _ in ready:
            if table.num_rows:
                dims[kind][modality] = table.schema.field("vector").type.list_size
        # A side not precomputed is encoded (its plan); both encoded share one encoder's dimension,
        # so a mismatch always has a precomputed side to name.
        check_dimensions(dims["item"], dims["user"], lambda kind, m: str(precomputed[(kind, m)]) if (kind, m) in
                         precomputed else f"the {m} encoder {encoders[m].model_id}",
                         lambda m: str(precomputed.get(("user", m)) or precomputed[("item", m)]))
        for kind, modality, path, table, dropped, seconds in ready:
            started = time.perf_counter() - seconds
            write_parquet(table, table_path(art_dir, kind, modality))
            report.counts[f"{kind}_{modality}"] = ModalityCounts(
                rows=table.num_rows, reused=table.num_rows, dropped=dropped,
                seconds=time.perf_counter() - started,
                model=table.column("model")[0].as_py() if table.num_rows else "")
            if dropped:
                log.warning("%s: %d ids not in the %s table were ignored", path, dropped, kind + "s")
        for ids_path in known_ids.values():
            if ids_path is not None:
                ids_path.unlink(missing_ok=True)

        for plan in plans:
            task = bar.add_task(f"{plan.kind} {plan.modality}", total=plan.rows) if bar else None
            counts, failures = embed_modality(
                plan, encoders[plan.modality], art_dir, config.embed,
                progress=cast("Callable[[int], None]", lambda n, task=task: bar.advance(task, n)) if bar else None,
                encode_rows=encode_rows,
                batch_rows=config.embed.batch_rows, failure_memory=failure_memory)
            if bar:
                bar.stop_task(task)
            report.counts[f"{plan.kind}_{plan.modality}"] = counts
            report.failures.extend(failures)


def _discard_plans(work_dir: Path) -> None:
    """Remove this run's plan, todo and id files (rebuilt by every run); keep finished shards."""
    for pattern in ("*/plan/*.parquet", "*/todo.parquet", "*_ids.parquet"):
        for path in work_dir.glob(pattern):
            path.unlink(missing_ok=True)
    for directory in [*work_dir.glob("*/plan/"), *work_dir.glob("*/"), work_dir]:
        with contextlib.suppress(OSError):
            directory.rmdir()  # only when empty


def _engine(config: Config, data_dir: Path, explicit: bool):
    """Engine dispatch: a context yielding the `encode_rows` of `config.engine` (None: local).

    explicit: encoders were given in-process, so the Ray engine ships them to its actors
    instead of building them from the config there.
    """
    if config.engine == "local":
        return contextlib.nullcontext(None)
    if config.engine == "ray":
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
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    # Progress on stderr: stdout carries only the data tables (pipeable).
    return Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=False, console=Console(stderr=True))


def summary_rows(report: EmbedReport) -> list[dict[str, Any]]:
    return [{"table": name, **c.as_dict()} for name, c in report.counts.items()]
