"""Looking up vectors by content hash across embedding tables, without loading them.

The embedding job reuses a vector when a row's content hash is already in the previous
table or in a finished shard. `HashIndex` holds, for every row of those files, 16 bytes of
its hash plus where it is (28 bytes per row: 28 MB per million rows, next to 1.5 GB of
384-d vectors); `VectorReader` then reads the vectors of the rows asked for, a Parquet
row group at a time, keeping a few decoded row groups in a small byte-bounded cache.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fusionrec.pipeline.errors import FusionrecError

KEY_BYTES = 16  # of the 32-byte sha256: collisions need ~2^64 rows


def hash_keys(hashes: pa.Array | pa.ChunkedArray | Sequence[str]) -> np.ndarray:
    """Hex sha256 strings -> an array of their first 16 bytes (numpy 'S16', sortable)."""
    values = hashes.to_pylist() if isinstance(hashes, (pa.Array, pa.ChunkedArray)) else list(hashes)
    if not values:
        return np.zeros(0, dtype=f"S{KEY_BYTES}")
    raw = np.frombuffer(bytes.fromhex("".join(v[:2 * KEY_BYTES] for v in values)), dtype=np.uint8)
    return raw.reshape(len(values), KEY_BYTES).copy().view(f"S{KEY_BYTES}").ravel()


class HashIndex:
    """content hash -> (file, row) over embedding tables, earlier files winning on equal hashes.

    files: Parquet files with a `content_hash` column, read in streamed batches. A file that
    cannot be read is skipped and listed in `skipped_` (a damaged shard is only lost work).
    """

    def __init__(self, files: Sequence[Path], batch_rows: int = 65_536) -> None:
        self.batch_rows = batch_rows
        self.files_: list[Path] = []
        self.skipped_: list[Path] = []
        self.keys_ = np.zeros(0, dtype=f"S{KEY_BYTES}")
        self.file_ = np.zeros(0, np.int32)
        self.row_ = np.zeros(0, np.int64)
        self.add(files)

    def add(self, files: Sequence[Path]) -> None:
        """Index more files (after those already indexed: they win on equal hashes)."""
        keys, where, rows = [self.keys_], [self.file_], [self.row_]
        for path in files:
            try:
                part = [hash_keys(b.column("content_hash"))
                        for b in pq.ParquetFile(path).iter_batches(batch_size=self.batch_rows,
                                                                   columns=["content_hash"])]
            except (OSError, pa.ArrowException, ValueError):
                self.skipped_.append(Path(path))
                continue
            n = sum(len(k) for k in part)
            keys.extend(part)
            where.append(np.full(n, len(self.files_), dtype=np.int32))
            rows.append(np.arange(n, dtype=np.int64))
            self.files_.append(Path(path))
        all_keys = np.concatenate(keys)
        order = np.argsort(all_keys, kind="stable")  # stable: among equal keys the earlier file first
        self.keys_, self.file_, self.row_ = all_keys[order], np.concatenate(where)[order], np.concatenate(rows)[order]

    def __len__(self) -> int:
        return len(self.keys_)

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(found mask, file number, row in file) of each key; file -1 where not found."""
        if not len(self.keys_):
            n = len(keys)
            return np.zeros(n, bool), np.full(n, -1, np.int32), np.full(n, -1, np.int64)
        pos = np.minimum(np.searchsorted(self.keys_, keys, side="left"), len(self.keys_) - 1)
        found = self.keys_[pos] == keys
        return found, np.where(found, self.file_[pos], -1), np.where(found, self.row_[pos], -1)


class VectorReader:
    """Vectors of given rows of Parquet embedding tables, read a row group at a time.

    Decoded row groups (content hashes and a float32 matrix) stay in an LRU cache of at most
    `cache_bytes`; rows asked for in file order read each row group once.
    """

    def __init__(self, files: Sequence[Path], dim: int, cache_bytes: int = 32 << 20) -> None:
        self.files, self.dim, self.cache_bytes = list(files), dim, cache_bytes
        self._starts: dict[int, np.ndarray] = {}
        self._cache: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._cached_bytes = 0

    def take(self, file: np.ndarray, row: np.ndarray, hashes: np.ndarray) -> np.ndarray:
        """The (n, dim) vectors at (file[i], row[i]); `hashes` (the expected content hashes,
        numpy str) are checked against the files, so a vector never lands under another row."""
        out = np.empty((len(file), self.dim), dtype=np.float32)
        for f in np.unique(file):
            sel = np.flatnonzero(file == f)
            starts = self._row_group_starts(int(f))
            group = np.searchsorted(starts, row[sel], side="right") - 1
            for g in np.unique(group):
                part = sel[group == g]
                got_hashes, matrix = self._row_group(int(f), int(g))
                local = row[part] - starts[g]
                if not np.array_equal(got_hashes[local], hashes[part]):
                    raise FusionrecError(f"{self.files[f]}: content hashes do not match the rows asked for")
                out[part] = matrix[local]
        return out

    def _row_group_starts(self, f: int) -> np.ndarray:
        if f not in self._starts:
            meta = pq.ParquetFile(self.files[f]).metadata
            sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
            self._starts[f] = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if sizes else \
                np.zeros(1, np.int64)
        return self._starts[f]

    def _row_group(self, f: int, g: int) -> tuple[np.ndarray, np.ndarray]:
        key = (f, g)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        table = pq.ParquetFile(self.files[f]).read_row_group(g, columns=["content_hash", "vector"])
        vectors = table.column("vector").combine_chunks()
        if vectors.type.list_size != self.dim:
            raise FusionrecError(f"{self.files[f]}: vectors of dimension {vectors.type.list_size}, expected {self.dim}")
        flat = vectors.values.slice(vectors.offset * self.dim, len(vectors) * self.dim)
        matrix = flat.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(vectors), self.dim)
        hashes = np.asarray(table.column("content_hash").to_pylist(), dtype=str)
        entry = (hashes, matrix)
        self._cache[key] = entry
        self._cached_bytes += matrix.nbytes + hashes.nbytes
        while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
            _, (h, m) = self._cache.popitem(last=False)
            self._cached_bytes -= m.nbytes + h.nbytes
        return entry
