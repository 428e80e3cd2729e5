"""Streamed reading of big tables and chunked FAISS building from Parquet.

For catalogs that outgrow memory: tables are read in record batches (Arrow), so memory is
bounded by the batch and the Parquet row group, not by the number of rows.

- `iter_table`: a Parquet or CSV table as polars frames of `batch_rows` rows.
- `validated_batches`: the items or users table, validated as `pipeline.tables` does, in
  batches (the embedding job's input); its pieces (`validate_batch`, `check_unique_ids`,
  `read_rows`) let the Ray engine validate row ranges in tasks with the same errors.
- `ParquetSink` / `write_batches`: Parquet files written batch by batch, atomically.
- `build_index_from_parquet`: a FAISS index trained on a seeded sample of the vectors and
  filled chunk by chunk from embedding tables, never holding all vectors; with IVF-PQ
  (`IVF4096,PQ48`, `OPQ48,IVF4096,PQ48`) the index itself holds m + 8 bytes per vector.

Reading granularity is the Parquet row group: Arrow decodes a whole row group's column at
once (for a vector column about 3x its float32 size, with the list levels and page
buffers), so tables meant for streaming are written with bounded row groups:
`write_batches` uses `ROW_GROUP_ROWS`, and `vector_row_group_rows(d)` keeps a row group of
d-dimensional vectors near 24 MB of floats.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal, cast

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from fusionrec.pipeline.errors import InputError, first_line
from fusionrec.pipeline.io.storage import atomic_path
from fusionrec.pipeline.io.tables import (
    ITEM_TEXT_COLUMNS,
    USER_TEXT_COLUMNS,
    check_encoding,
    check_ids,
    check_text,
    csv_header,
    listed,
    read_table,
    with_header_names,
)
from fusionrec.pipeline.retrieval.faiss_index import choose_factory, new_index

DEFAULT_BATCH_ROWS = 16_384
ROW_GROUP_ROWS = 65_536


# --------------------------------------------------------------------------- reading


def vector_row_group_rows(dim: int, target_bytes: int = 24 << 20) -> int:
    """Rows per Parquet row group for `dim`-dimensional float32 vectors (a power of two)."""
    rows = max(1, target_bytes // (4 * max(dim, 1)))
    return int(max(1024, min(ROW_GROUP_ROWS, 2 ** int(np.log2(rows)))))


def _parquet(path: Path) -> pq.ParquetFile:
    # No pre-buffering: only the row group being decoded is held, not the file's bytes.
    return pq.ParquetFile(path, buffer_size=1 << 22, pre_buffer=False)


def table_columns(path: Path | str) -> list[str]:
    """Column names of a Parquet or CSV table, from its schema or header only (CSV: the
    names of `pipeline.tables.csv_header`, trimmed, none given twice)."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise InputError("the file is empty", file=str(path))
        if path.suffix == ".parquet":
            return list(_parquet(path).schema_arrow.names)
        with open(path, "rb") as fh:
            head = fh.read(4)
        check_encoding(head, path)
        # utf-8-sig: the BOM Excel writes at the start of "CSV UTF-8" is not part of the first name.
        with open(path, encoding="utf-8-sig", newline="") as fh:
            if not fh.read(1):  # only a BOM
                raise StopIteration
            fh.seek(0)
            return csv_header(fh, path)
    except (OSError, StopIteration, pa.ArrowException, UnicodeDecodeError) as exc:
        if not isinstance(exc, OSError):
            _locate_csv_error(path)
        raise InputError(f"cannot read the table: {exc}", file=str(path)) from None


def _locate_csv_error(path: Path) -> None:
    """For a CSV the streamed reader refused: read it once more with the eager reader, whose
    error names the row and the field where it can tell them (memory no longer matters: the
    job is failing). Returns only when that reader accepts the file."""
    if path.suffix == ".csv":
        read_table(path)


def iter_table(path: Path | str, columns: Sequence[str] | None = None,
               batch_rows: int = DEFAULT_BATCH_ROWS) -> Iterator[pl.DataFrame]:
    """The rows of a Parquet or CSV table as frames of at most `batch_rows` rows.

    CSV columns are read as strings by the parser `pipeline.tables.read_table` uses; quoted
    cells may hold newlines. `columns`: only these (each must exist).
    """
    path = Path(path)
    present = table_columns(path)
    for column in columns or ():
        if column not in present:
            raise InputError(f"required column is missing (columns: {listed(present)})", file=str(path),
                             field=column)
    try:
        if path.suffix == ".parquet":
            for batch in _parquet(path).iter_batches(batch_size=batch_rows, columns=list(columns) if columns else None):
                yield cast(pl.DataFrame, pl.from_arrow(pa.Table.from_batches([batch])))
            return
        # Polars' streaming CSV reader: the parser of `read_table`, so both accept the same files.
        # Every column is parsed (a projection would skip checking a row's extra cells).
        lazy = pl.scan_csv(path, infer_schema=False, quote_char='"', raise_if_empty=True)
        for frame in lazy.collect_batches(chunk_size=batch_rows):
            frame = with_header_names(frame, present)
            yield frame.select(list(columns)) if columns else frame
    except (pa.ArrowException, pl.exceptions.PolarsError) as exc:
        _locate_csv_error(path)
        raise InputError(f"cannot parse the table: {first_line(exc)}", file=str(path)) from None


def table_rows(path: Path | str) -> int | None:
    """Rows of a Parquet table from its footer; None for CSV (unknown without reading it)."""
    path = Path(path)
    return _parquet(path).metadata.num_rows if path.suffix == ".parquet" else None


class ParquetSink:
    """One Parquet file written batch by batch inside `with`: it appears under its name
    (atomically) when the block ends, and not at all when the block raises."""

    def __init__(self, path: Path | str, schema: pa.Schema, row_group_rows: int = ROW_GROUP_ROWS) -> None:
        self.path, self.schema, self.row_group_rows = Path(path), schema, row_group_rows
        self.rows = 0
        self._atomic = atomic_path(self.path)
        self._writer = pq.ParquetWriter(self._atomic.__enter__(), schema, compression="zstd")

    def write(self, batch: pa.Table | pa.RecordBatch) -> None:
        table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
        self._writer.write_table(table.select(self.schema.names).cast(self.schema),
                                 row_group_size=self.row_group_rows)
        self.rows += table.num_rows

    def __enter__(self) -> ParquetSink:
        return self

    def __exit__(self, kind, exc, tb) -> Literal[False]:
        self._writer.close()
        if exc is None:
            self._atomic.__exit__(None, None, None)  # the file appears under its name
            return False
        try:
            self._atomic.__exit__(kind, exc, tb)  # the temporary file is removed
        except BaseException as failure:  # the atomic writer's own report (a full disk) wins
            if failure is not exc:
                raise
        return False


def write_batches(batches: Iterable[pa.Table | pa.RecordBatch], path: Path | str,
                  schema: pa.Schema | None = None, row_group_rows: int = ROW_GROUP_ROWS) -> int:
    """Write record batches to one Parquet file (atomic) as they come; returns the rows written."""
    it = iter(batches)
    first = next(it, None)
    if first is None and schema is None:
        return 0  # nothing to write and no schema to write it with
    with ParquetSink(path, schema or cast("pa.Table | pa.RecordBatch", first).schema, row_group_rows) as sink:
        for batch in itertools.chain([first] if first is not None else [], it):
            sink.write(batch)
    return sink.rows


# --------------------------------------------------------------------------- items, users


def validated_batches(path: Path | str, kind: str, batch_rows: int = DEFAULT_BATCH_ROWS) -> Iterator[pl.DataFrame]:
    """The items (kind "item") or users ("user") table as validated frames of `batch_rows` rows.

    The checks of `pipeline.tables.load_items` / `load_users`, batch by batch: ids present
    and unique across the whole table, by a 64-bit hash per id (8 bytes per row, 0.8 GB at
    100M items), naming the duplicate id and its rows; text fields typed and bounded, empty
    text as missing. Rows in errors count from the start of the table. Only the id and the
    columns the embedding job reads (text and media) are read.
    """
    path = Path(path)
    columns = validated_columns(path, kind)
    id_hashes: list[np.ndarray] = []
    offset = 0
    for frame in iter_table(path, columns, batch_rows):
        frame = validate_batch(frame, path, kind, offset)
        id_hashes.append(id_hashes_of(frame, kind))
        offset += frame.height
        yield frame
    check_unique_ids(id_hashes, path, kind, batch_rows)


def validated_columns(path: Path, kind: str) -> list[str]:
    """The columns `validated_batches` reads: the id, then the text columns present."""
    id_column = f"{kind}_id"
    text_columns = ITEM_TEXT_COLUMNS if kind == "item" else USER_TEXT_COLUMNS
    present = table_columns(path)
    if id_column not in present:
        raise InputError(f"required column is missing (columns: {listed(present)})", file=str(path),
                         field=id_column)
    return [id_column] + [c for c in text_columns if c in present]


def validate_batch(frame: pl.DataFrame, path: Path, kind: str, offset: int) -> pl.DataFrame:
    """One batch's checks (ids present, text typed and bounded); `offset`: rows before the
    batch, so errors count rows from the start of the table."""
    text_columns = ITEM_TEXT_COLUMNS if kind == "item" else USER_TEXT_COLUMNS
    try:
        return check_text(check_ids(frame, path, f"{kind}_id"), path,
                          tuple(c for c in text_columns if c in frame.columns))
    except InputError as exc:  # rows counted from the start of the table, not of the batch
        if exc.row is None:
            raise
        raise InputError(bare_message(exc), file=str(path), row=exc.row + offset, field=exc.field) from None


def id_hashes_of(frame: pl.DataFrame, kind: str) -> np.ndarray:
    """The 64-bit hashes of a validated batch's ids, for `check_unique_ids`."""
    return frame[f"{kind}_id"].hash(seed=0).to_numpy()


def check_unique_ids(id_hashes: list[np.ndarray], path: Path, kind: str, batch_rows: int) -> None:
    """After the last batch: the table has rows, and no id twice (naming the first repeat)."""
    if not sum(len(h) for h in id_hashes):
        raise InputError("the table has no rows", file=str(path))
    _check_unique_hashes(np.concatenate(id_hashes), path, f"{kind}_id", batch_rows)


def read_rows(path: Path, columns: Sequence[str], start: int, stop: int) -> pl.DataFrame:
    """Rows [start, stop) of a Parquet table: only the row groups holding them are decoded."""
    pf = _parquet(path)
    groups, first, seen = [], None, 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if seen < stop and seen + n > start:
            groups.append(g)
            first = seen if first is None else first
        seen += n
    if not groups:
        return cast(pl.DataFrame, pl.from_arrow(pf.schema_arrow.empty_table().select(list(columns))))
    try:
        table = pf.read_row_groups(groups, columns=list(columns))
    except pa.ArrowException as exc:  # iter_table's wording for a table Arrow cannot decode
        raise InputError(f"cannot parse the table: {first_line(exc)}", file=str(path)) from None
    return cast(pl.DataFrame, pl.from_arrow(table.slice(start - cast(int, first), stop - start)))


def bare_message(exc: InputError) -> str:
    """The message of an InputError without its `file, row, field: ` prefix."""
    where = [str(v) for v in (exc.file,) if v is not None]
    where += [f"row {exc.row}"] if exc.row is not None else []
    where += [f"field '{exc.field}'"] if exc.field is not None else []
    return str(exc)[len(", ".join(where)) + 2:] if where else str(exc)


def _check_unique_hashes(hashes: np.ndarray, path: Path, id_column: str, batch_rows: int) -> None:
    hashes.sort()  # in place: 9 bytes per row in all
    same = np.flatnonzero(hashes[1:] == hashes[:-1])
    if not len(same):
        return
    # Equal hashes: find the rows holding those values and compare the ids themselves.
    suspects = set(hashes[same].tolist())
    seen: dict[str, int] = {}
    offset = 0
    for frame in iter_table(path, [id_column], batch_rows):
        ids = frame[id_column].cast(pl.String).str.strip_chars()
        for j in np.flatnonzero(np.isin(ids.hash(seed=0).to_numpy(), list(suspects))):
            value = ids[int(j)]
            if value in seen:
                raise InputError(f"duplicate id '{value}' (first on row {seen[value]})", file=str(path),
                                 row=offset + int(j) + 1, field=id_column)
            seen[value] = offset + int(j) + 1
        offset += frame.height


# --------------------------------------------------------------------------- vectors, FAISS


def vector_shape(paths: Sequence[Path | str], vector_column: str = "vector") -> tuple[int, int]:
    """(rows, dimension) of embedding tables, from their footers and schemas."""
    n, d = 0, None
    for path in paths:
        pf = _parquet(Path(path))
        field = pf.schema_arrow.field(vector_column)
        if not pa.types.is_fixed_size_list(field.type):
            raise InputError("vectors must be a fixed-size list of floats", file=str(path), field=vector_column)
        if d is not None and field.type.list_size != d:
            raise InputError(f"dimension {field.type.list_size}, other tables have {d}", file=str(path),
                             field=vector_column)
        d = field.type.list_size
        n += pf.metadata.num_rows
    if d is None:
        raise InputError("no embedding tables given")
    return n, d


def iter_vectors(paths: Sequence[Path | str], *, id_column: str | None = "id", vector_column: str = "vector",
                 batch_rows: int = DEFAULT_BATCH_ROWS) -> Iterator[tuple[pa.Array | None, np.ndarray]]:
    """(ids, float32 matrix) chunks of embedding tables, in file and row order."""
    columns = [vector_column] + ([id_column] if id_column else [])
    for path in paths:
        for batch in _parquet(Path(path)).iter_batches(batch_size=batch_rows, columns=columns):
            vec = batch.column(vector_column)
            d = vec.type.list_size
            flat = vec.values.slice(vec.offset * d, len(vec) * d) if vec.offset else vec.values
            matrix = flat.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(vec), d)
            yield (batch.column(id_column) if id_column else None), matrix


def sample_vectors(paths: Sequence[Path | str], size: int, *, seed: int = 0, vector_column: str = "vector",
                   batch_rows: int = DEFAULT_BATCH_ROWS) -> np.ndarray:
    """A seeded uniform sample of `size` rows (all rows if fewer), read in one streamed pass."""
    n, d = vector_shape(paths, vector_column)
    if size >= n:
        return np.concatenate([m for _, m in iter_vectors(paths, id_column=None, vector_column=vector_column,
                                                          batch_rows=batch_rows)]) if n else np.zeros((0, d), np.float32)
    wanted = np.sort(np.random.default_rng(seed).choice(n, size, replace=False))
    out = np.empty((size, d), dtype=np.float32)
    start = filled = 0
    for _, matrix in iter_vectors(paths, id_column=None, vector_column=vector_column, batch_rows=batch_rows):
        lo, hi = np.searchsorted(wanted, [start, start + len(matrix)])
        out[filled:filled + hi - lo] = matrix[wanted[lo:hi] - start]
        filled += hi - lo
        start += len(matrix)
        if filled == size:
            break
    return out


def build_index_from_parquet(paths: Sequence[Path | str] | Path | str, factory: str = "auto", *,
                             train_size: int | None = None, seed: int = 0, niter: int = 20,
                             vector_column: str = "vector", id_column: str | None = "id",
                             batch_rows: int = DEFAULT_BATCH_ROWS,
                             on_chunk: Callable[[int, np.ndarray], None] | None = None,
                             timings: dict[str, float] | None = None):
    """An inner-product FAISS index over embedding tables, trained on a sample, filled in chunks.

    factory: "auto" (`pipeline.index.choose_factory` for the table size) or any FAISS
    index-factory string. IVF indexes train their coarse quantizer (and PQ codebooks) on
    a seeded sample of `train_size` rows (default 64 per inverted list, at least 10,000).
    The vectors are then added `batch_rows` at a time; `on_chunk(first_row, matrix)` sees
    each chunk (for example to compute exact neighbours in the same pass). `timings`, when
    given, receives the seconds of "train" (sampling included) and "add" (on_chunk included).
    Returns (index, ids: pa.ChunkedArray in index order, or None without `id_column`).
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    n, d = vector_shape(paths, vector_column)
    if factory in (None, "", "auto"):
        factory = choose_factory(n, d)
    index, ivf = new_index(d, factory, seed=seed, niter=niter)  # the settings of pipeline.index.build_index
    t0 = time.perf_counter()
    if not index.is_trained:
        want = train_size or (max(ivf.nlist * 64, 10_000) if ivf is not None else 100_000)
        index.train(sample_vectors(paths, want, seed=seed, vector_column=vector_column, batch_rows=batch_rows))
    t1 = time.perf_counter()
    ids: list[pa.Array] = []
    start = 0
    for chunk_ids, matrix in iter_vectors(paths, id_column=id_column, vector_column=vector_column,
                                          batch_rows=batch_rows):
        index.add(np.ascontiguousarray(matrix))
        if on_chunk is not None:
            on_chunk(start, matrix)
        if chunk_ids is not None:
            ids.append(chunk_ids)
        start += len(matrix)
    if timings is not None:
        timings.update(train=t1 - t0, add=time.perf_counter() - t1)
    return index, (pa.chunked_array(ids, type=pa.string()) if id_column else None)
