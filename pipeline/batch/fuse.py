"""Streamed fusion: per-modality vector tables to fused vectors on disk, in bounded memory.

`fuse_tables(catalog, {modality: paths}, weights, out_dir)` reads the catalog's ids and
each modality's Parquet tables in batches and writes, under out_dir:

- `blocks.npy`: the unit-length per-modality blocks x_{i,m} side by side, (n, sum d_m),
  a memory-mapped `.npy` (float32, or float16 for half the disk and page cache); rows
  follow the catalog, absent modalities are zeros. Exact re-scoring reads rows from it.
- `mask.npy` (n, M) bool: row has modality m; `popularity.npy` (n,) float32 (the catalog's
  `popularity` column, 0 without one); `ids.parquet`: the ids in catalog order, whose
  fingerprint (`IdsDigest`) `fused.json` holds as `ids_sha256`, beside `vectors_sha256`, the
  sha256 of the index vectors in row order (an index built on other vectors of the same ids
  finds candidates by the old ones).
- `fused.parquet` (items only): the index vectors v_i = concat_m(x_{i,m} / W_i) of
  `pipeline.retrieval.fusion.item_matrix`, written batch by batch for
  `build_index_from_parquet`.

Ids are matched by a 64-bit hash (16 bytes per catalog row with the sort order), so the
modality tables may list their rows in any order, leave rows out (that id lacks the
modality) or hold ids the catalog does not have (counted, then skipped). The memory held is
the batch plus those 16 bytes and the mask per row: never the vector table.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import mmap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from fusionrec.pipeline.encoders.base import l2_normalise
from fusionrec.pipeline.errors import FusionrecError, InputError
from fusionrec.pipeline.io.storage import write_json
from fusionrec.pipeline.io.streaming import (
    DEFAULT_BATCH_ROWS,
    ParquetSink,
    _check_unique_hashes,
    bare_message,
    iter_table,
    iter_vectors,
    table_columns,
    vector_row_group_rows,
    vector_shape,
)
from fusionrec.pipeline.io.tables import check_ids
from fusionrec.pipeline.retrieval.fusion import Blocks, item_matrix

ID_COLUMNS = ("id", "item_id", "user_id")
META_FILE = "fused.json"
DTYPES = ("float32", "float16")
REMAP_BYTES = 256 << 20


# Linux maps up to 16 cached pages around a read fault ("fault-around"): a scattered row read
# can bring 64 kB of the file into the process's RSS.
FAULT_AROUND = 16 * mmap.PAGESIZE


class MappedRows:
    """Rows of a memory-mapped `.npy` matrix, read (or written) as copies, the mapping renewed
    after every `window` bytes of pages touched. Mapped file pages a process touched count
    in its RSS until it unmaps them, up to the whole file (and a scattered read maps up to
    FAULT_AROUND bytes); reading and writing scattered rows in chunks, with the mapping
    renewed in between, keeps that part of the RSS within about `window`. The pages
    themselves stay in the page cache (shared, reclaimable) and written pages are written
    back by the kernel as usual."""

    def __init__(self, path: Path, mode: str = "r", window: int = REMAP_BYTES) -> None:
        self.path, self.mode, self.window = Path(path), mode, window
        self._open()

    def _open(self) -> None:
        self.array = np.load(self.path, mmap_mode=cast("Any", self.mode))
        self.row_bytes = int(self.array.dtype.itemsize * np.prod(self.array.shape[1:]))
        # scattered rows each fault in FAULT_AROUND bytes too, reads and writes alike (measured)
        self.rows_per_window = max(1, self.window // (self.row_bytes + FAULT_AROUND))
        self._since = 0

    def _count(self, touched: int) -> None:
        self._since += touched
        if self._since >= self.window:
            # no msync: unmapping keeps written pages in the page cache, and the kernel's own
            # writeback writes a page once however many rows of it were written
            del self.array
            self._open()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def __getitem__(self, rows: slice | np.ndarray) -> np.ndarray:
        if isinstance(rows, slice):  # consecutive rows: their own pages, and one fault-around
            out = np.array(self.array[rows])  # a copy: nothing keeps the mapping's pages alive
            self._count(len(out) * self.row_bytes + FAULT_AROUND)
            return out
        rows = np.asarray(rows)
        out = np.empty((len(rows), *self.array.shape[1:]), dtype=self.array.dtype)
        step = self.rows_per_window
        for s in range(0, len(rows), step):
            out[s:s + step] = self.array[rows[s:s + step]]
            self._count(len(rows[s:s + step]) * (self.row_bytes + FAULT_AROUND))
        return out

    def write(self, rows: np.ndarray, columns: slice, values: np.ndarray) -> None:
        step = self.rows_per_window
        for s in range(0, len(rows), step):
            self.array[rows[s:s + step], columns] = values[s:s + step]
            self._count(len(rows[s:s + step]) * (self.row_bytes + FAULT_AROUND))

    def close(self) -> None:
        if self.mode != "r":
            self.array.flush()
        del self.array


@dataclass(frozen=True)
class FusedTable:
    """A fused table written by `fuse_tables`: its layout, and its arrays opened read-only."""

    directory: Path
    kind: str
    names: tuple[str, ...]
    dims: tuple[int, ...]
    weights: tuple[float, ...]
    rows: int
    dtype: str
    ids_digest: str | None = None  # fused.json's ids_sha256; None in a table fused before it held one
    vectors_digest: str | None = None  # fused.json's vectors_sha256 (items); None for users, or fused before it

    @classmethod
    def open(cls, directory: Path | str) -> FusedTable:
        directory = Path(directory)
        try:
            meta = json.loads((directory / META_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise FusionrecError(f"{directory} holds no fused table ({META_FILE}: {exc}); run the fusion first") \
                from None
        return cls(directory, meta["kind"], tuple(meta["names"]), tuple(meta["dims"]), tuple(meta["weights"]),
                   int(meta["rows"]), meta["dtype"], meta.get("ids_sha256"), meta.get("vectors_sha256"))

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start column of each modality's block in `blocks()`."""
        return tuple(int(o) for o in np.cumsum((0, *self.dims))[:-1])

    def blocks(self) -> MappedRows:
        """(rows, sum of dims) unit blocks, memory-mapped: only the rows read come into memory."""
        return MappedRows(self.directory / "blocks.npy")

    def mask(self) -> np.ndarray:
        return np.load(self.directory / "mask.npy")

    def popularity(self) -> np.ndarray:
        return np.load(self.directory / "popularity.npy")

    def ids(self) -> pa.Array:
        """The ids in row order (one string array: about 4 bytes plus the id's length per row)."""
        return pq.read_table(self.directory / "ids.parquet", columns=["id"]).column("id").combine_chunks()

    def ids_sha256(self) -> str:
        """The fingerprint of the ids in row order (`IdsDigest`): fused.json's, or read from
        ids.parquet for a table fused before fused.json held it."""
        return self.ids_digest or ids_sha256(self.directory / "ids.parquet")

    def split(self, rows: np.ndarray) -> tuple[np.ndarray, ...]:
        """Per-modality float32 blocks of `rows` (a (r, sum dims) array read from `blocks()`)."""
        x = np.asarray(rows, dtype=np.float32)
        return tuple(x[:, o:o + d] for o, d in zip(self.offsets, self.dims))


class IdsDigest:
    """sha256 of a sequence of string ids, fed in batches of any size: what an index built on
    the fused rows must match (its rows are item rows).

    Each id's byte length and the ids' bytes are hashed apart, from Arrow's buffers (no loop
    over rows), then together with the count, so the digest depends on the ids and their order
    only, not on how they were batched or on the Arrow string type.
    """

    def __init__(self) -> None:
        self.rows = 0
        self._lengths, self._bytes = hashlib.sha256(), hashlib.sha256()

    def update(self, ids: pa.Array | pa.ChunkedArray) -> None:
        chunked = ids if isinstance(ids, pa.ChunkedArray) else pa.chunked_array([ids])
        for chunk in chunked.cast(pa.large_string()).chunks:  # int64 offsets, whatever the type read
            if not len(chunk):
                continue
            offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int64)[chunk.offset:chunk.offset + len(chunk) + 1]
            self._lengths.update(np.diff(offsets).astype("<i8").tobytes())
            data = chunk.buffers()[2]
            if data is not None:  # None when every id in the chunk is empty
                self._bytes.update(memoryview(data)[int(offsets[0]):int(offsets[-1])])
            self.rows += len(chunk)

    def hexdigest(self) -> str:
        return hashlib.sha256(f"{self.rows}:".encode() + self._lengths.digest() + self._bytes.digest()).hexdigest()


def ids_sha256(path: Path | str, batch_rows: int = DEFAULT_BATCH_ROWS) -> str:
    """`IdsDigest` of the `id` column of a Parquet file, read in batches."""
    digest = IdsDigest()
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=["id"]):
        digest.update(batch.column(0))
    return digest.hexdigest()


def id_column(path: Path | str) -> str:
    """The id column of a catalog or vector table: the first of id, item_id, user_id it has."""
    present = table_columns(path)
    for name in ID_COLUMNS:
        if name in present:
            return name
    raise InputError(f"no id column: needs one of {', '.join(ID_COLUMNS)} (columns: {', '.join(present)})",
                     file=str(path))


def hash_ids(ids: pl.Series | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """64-bit hashes of ids as `pipeline.io.streaming` hashes them (strings, trimmed)."""
    series = ids if isinstance(ids, pl.Series) else pl.Series(ids)
    return series.cast(pl.String).str.strip_chars().hash(seed=0).to_numpy()


class IdLookup:
    """Row numbers of ids, by hash: 16 bytes per row (the sorted hashes and their rows)."""

    def __init__(self, hashes: np.ndarray) -> None:
        self.order = np.argsort(hashes, kind="stable")
        self.sorted = hashes[self.order]

    @classmethod
    def of(cls, table: FusedTable) -> IdLookup:
        return cls(hash_ids(table.ids()))

    def rows(self, ids: pl.Series | pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Row of each id, -1 for ids not in the table."""
        h = hash_ids(ids)
        if not len(self.sorted):
            return np.full(len(h), -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.sorted, h), len(self.sorted) - 1)
        return np.where(self.sorted[pos] == h, self.order[pos], -1).astype(np.int64)


def fusion_weights(names: Sequence[str], weights: Mapping[str, float] | None) -> np.ndarray:
    """Non-negative weights over `names`, summing to 1 (None: equal weights)."""
    if weights is None:
        return np.full(len(names), 1.0 / len(names))
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise FusionrecError(f"weights for modalities that have no table: {', '.join(unknown)} "
                             f"(modalities: {', '.join(names)})")
    w = np.array([float(weights.get(n, 0.0)) for n in names])
    if not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
        raise FusionrecError(f"fusion weights must be non-negative with a positive sum, not {dict(weights)}")
    return w / w.sum()


def _paths(value: Path | str | Sequence[Path | str]) -> list[Path]:
    return [Path(value)] if isinstance(value, (str, Path)) else [Path(p) for p in value]


def fuse_tables(catalog: Path | str, modalities: Mapping[str, Path | str | Sequence[Path | str]],
                out_dir: Path | str, weights: Mapping[str, float] | None = None, *, kind: str = "item",
                dims: Mapping[str, int] | None = None, dtype: str = "float32",
                batch_rows: int = DEFAULT_BATCH_ROWS) -> FusedTable:
    """Fuse the modality tables of the catalog's rows into `out_dir` (see the module doc).

    catalog: a Parquet or CSV table with an id column (`id`, `item_id` or `user_id`) in the
    order the fused rows take, and optionally a numeric `popularity` column. modalities:
    name -> one or more Parquet tables (`id`/`item_id`/`user_id`, fixed-size `vector`).
    kind "item" also writes `fused.parquet`, the index vectors. dims: the dimension each
    modality must have (the item side's, when fusing users). Returns the opened table.
    """
    if kind not in ("item", "user"):
        raise FusionrecError(f"kind must be 'item' or 'user', not {kind!r}")
    if dtype not in DTYPES:
        raise FusionrecError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if not modalities:
        raise FusionrecError("no modality tables to fuse")
    catalog, out_dir = Path(catalog), Path(out_dir)
    names = tuple(sorted(modalities))
    w = fusion_weights(names, weights)
    shapes = {}
    for name in names:
        paths = _paths(modalities[name])
        _, d = vector_shape(paths)  # names the file whose dimension differs from the others'
        want = (dims or {}).get(name)
        if want is not None and d != want:
            raise InputError(f"modality '{name}' has dimension {d}, the items' has {want}", file=str(paths[0]),
                             field="vector")
        shapes[name] = (paths, d)
    out_dir.mkdir(parents=True, exist_ok=True)
    # An earlier table's metadata would vouch for the files rewritten below until the new one is
    # complete: gone first, so a fusion that stops part-way leaves no table that opens.
    (out_dir / META_FILE).unlink(missing_ok=True)

    # Pass 1: the catalog's ids (written out in row order), their hashes and popularity.
    key = id_column(catalog)
    columns = [key] + (["popularity"] if "popularity" in table_columns(catalog) else [])
    hashes: list[np.ndarray] = []
    popularity: list[np.ndarray] = []
    digest = IdsDigest()
    with ParquetSink(out_dir / "ids.parquet", pa.schema([("id", pa.string())])) as sink:
        for frame in iter_table(catalog, columns, batch_rows):
            try:  # an empty id would become an item "None" or "" in every export
                ids = check_ids(frame.select(pl.col(key).cast(pl.String)), Path(catalog), key)[key]
            except InputError as exc:  # rows counted from the start of the table, not of the batch
                raise InputError(bare_message(exc), file=str(catalog), row=(exc.row or 1) + sink.rows,
                                 field=key) from None
            hashes.append(hash_ids(ids))
            pop = frame["popularity"].cast(pl.Float32, strict=False) if "popularity" in columns \
                else pl.Series([0.0] * frame.height, dtype=pl.Float32)
            if pop.null_count():
                row = sink.rows + int(np.flatnonzero(pop.is_null().to_numpy())[0]) + 1
                raise InputError("popularity must be a number", file=str(catalog), row=row, field="popularity")
            popularity.append(pop.to_numpy())
            written = ids.to_arrow()
            digest.update(written)
            sink.write(pa.table({"id": written}))
    n = sink.rows
    if n == 0:
        raise InputError("the table has no rows", file=str(catalog))
    h = np.concatenate(hashes)
    _check_unique_hashes(h.copy(), catalog, key, batch_rows)  # names a duplicate id and its rows
    lookup = IdLookup(h)
    del hashes, h
    np.save(out_dir / "popularity.npy", np.concatenate(popularity))
    del popularity

    # Pass 2: each modality's rows placed on the catalog's rows of the memory-mapped blocks.
    total = sum(d for _, d in shapes.values())
    np.lib.format.open_memmap(out_dir / "blocks.npy", mode="w+", dtype=np.dtype(dtype), shape=(n, total)).flush()
    blocks = MappedRows(out_dir / "blocks.npy", "r+")
    mask = np.zeros((n, len(names)), dtype=bool)
    unmatched: dict[str, int] = {}
    offset = 0
    for j, name in enumerate(names):
        paths, d = shapes[name]
        unmatched[name] = 0
        for path in paths:
            col = id_column(path)
            start = 0
            for chunk_ids, matrix in iter_vectors([path], id_column=col, batch_rows=batch_rows):
                bad = ~np.isfinite(matrix).all(axis=1)
                if bad.any():
                    raise InputError("vector has NaN or infinite values", file=str(path),
                                     row=start + int(np.flatnonzero(bad)[0]) + 1, field="vector")
                x = l2_normalise(matrix)
                rows = lookup.rows(cast(pa.Array, chunk_ids))
                keep = (rows >= 0) & (np.abs(x).sum(axis=1) > 0)  # all-zero (or null) vector: modality absent
                unmatched[name] += int((rows < 0).sum())
                rows, x = rows[keep], x[keep]
                seen = mask[rows, j]
                if seen.any() or len(np.unique(rows)) < len(rows):
                    dup = rows[seen][0] if seen.any() else np.argmax(np.bincount(rows))
                    raise InputError(f"id '{_id_at(out_dir, int(dup))}' has more than one vector", file=str(path),
                                     field=col)
                order = np.argsort(rows, kind="stable")  # ascending rows: sequential writes to the file
                blocks.write(rows[order], slice(offset, offset + d), x[order])
                mask[rows, j] = True
                start += len(matrix)
        offset += d
    blocks.close()
    np.save(out_dir / "mask.npy", mask)

    meta = {"kind": kind, "names": list(names), "dims": [shapes[m][1] for m in names], "weights": w.tolist(),
            "rows": n, "dtype": dtype, "catalog": str(catalog), "unmatched_ids": unmatched,
            "rows_with_modality": dict(zip(names, mask.sum(axis=0).tolist())), "ids_sha256": digest.hexdigest()}
    table = FusedTable(out_dir, kind, names, tuple(meta["dims"]), tuple(meta["weights"]), n, dtype,
                       meta["ids_sha256"])
    if kind == "item":
        # The same ids may come with other vectors (items embedded again): an index checks this
        # too, by the vectors' digest, so fusing the same inputs again needs no new index.
        meta["vectors_sha256"] = write_fused(table, batch_rows=vector_row_group_rows(total))
        table = dataclasses.replace(table, vectors_digest=meta["vectors_sha256"])
    write_json(meta, out_dir / META_FILE)  # last: its presence says the table is complete
    return table


def _id_at(directory: Path, row: int) -> str:
    return str(pq.read_table(directory / "ids.parquet", columns=["id"]).column("id")[row])


def write_fused(table: FusedTable, *, batch_rows: int = DEFAULT_BATCH_ROWS) -> str:
    """`fused.parquet`: the index vectors of `fusion.item_matrix` (same weights), in row order.
    Returns the sha256 of the vectors (float32, row order, with the dimension): the same for
    the same vectors however they were batched."""
    blocks, mask, w = table.blocks(), table.mask(), np.asarray(table.weights)
    d = sum(table.dims)
    digest = hashlib.sha256(f"{d}:".encode())
    schema = pa.schema([("row", pa.int64()), ("vector", pa.list_(pa.float32(), d))])
    with ParquetSink(table.directory / "fused.parquet", schema, row_group_rows=batch_rows) as sink:
        for s in range(0, table.rows, batch_rows):
            e = min(s + batch_rows, table.rows)
            v = np.ascontiguousarray(item_matrix(Blocks(np.arange(s, e), table.names, table.split(blocks[s:e]),
                                                        mask[s:e]), w), dtype=np.float32)
            digest.update(v.tobytes())
            sink.write(pa.table({"row": pa.array(np.arange(s, e, dtype=np.int64)),
                                 "vector": pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), d)}))
    return digest.hexdigest()
