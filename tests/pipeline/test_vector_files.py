"""Finding vectors by content hash across embedding tables without loading them (pipeline.vector_files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fusionrec.pipeline.embedding.job import embedding_table
from fusionrec.pipeline.embedding.vector_files import HashIndex, VectorReader, hash_keys
from fusionrec.pipeline.errors import FusionrecError
from fusionrec.pipeline.io.storage import sha256_bytes
from fusionrec.pipeline.io.streaming import write_batches


def table_file(path: Path, names: list[str], dim: int = 4, seed: int = 0, row_group_rows: int = 3) -> np.ndarray:
    matrix = np.random.default_rng(seed).standard_normal((len(names), dim)).astype(np.float32)
    hashes = [sha256_bytes(n.encode()) for n in names]
    write_batches([embedding_table(names, hashes, ["m"] * len(names), matrix)], path, row_group_rows=row_group_rows)
    return matrix


def test_hash_keys_are_the_first_16_bytes_and_sort_like_the_hashes() -> None:
    hashes = [sha256_bytes(str(i).encode()) for i in range(50)]
    keys = hash_keys(hashes)
    assert keys.dtype == np.dtype("S16") and keys[7] == bytes.fromhex(hashes[7])[:16]
    assert [hashes[i] for i in np.argsort(keys)] == sorted(hashes)
    assert len(hash_keys([])) == 0


def test_lookup_finds_each_row_and_the_earlier_file_wins(tmp_path: Path) -> None:
    table_file(tmp_path / "old.parquet", ["a", "b", "c", "d", "e"])
    table_file(tmp_path / "shard.parquet", ["e", "f"], seed=1)
    index = HashIndex([tmp_path / "old.parquet", tmp_path / "shard.parquet"])
    assert len(index) == 7
    found, file, row = index.lookup(hash_keys([sha256_bytes(x.encode()) for x in ["f", "a", "zz", "e"]]))
    assert found.tolist() == [True, True, False, True]
    assert file.tolist() == [1, 0, -1, 0]  # "e" is in both: the previous table's row
    assert row.tolist() == [1, 0, -1, 4]

    index.add([tmp_path / "missing.parquet"])
    assert index.skipped_ == [tmp_path / "missing.parquet"] and len(index) == 7
    empty = HashIndex([])
    assert empty.lookup(hash_keys(["00" * 32]))[0].tolist() == [False]


def test_reader_takes_rows_across_files_and_row_groups(tmp_path: Path) -> None:
    a = table_file(tmp_path / "a.parquet", list("abcdefgh"))  # row groups of 3 rows: [abc][def][gh]
    b = table_file(tmp_path / "b.parquet", list("xyz"), seed=1)
    reader = VectorReader([tmp_path / "a.parquet", tmp_path / "b.parquet"], dim=4)
    file = np.array([0, 1, 0, 0, 1])
    row = np.array([7, 2, 0, 4, 0])
    names = ["h", "z", "a", "e", "x"]
    got = reader.take(file, row, np.array([sha256_bytes(n.encode()) for n in names]))
    np.testing.assert_array_equal(got, np.stack([a[7], b[2], a[0], a[4], b[0]]))

    with pytest.raises(FusionrecError, match="content hashes do not match"):
        reader.take(np.array([0]), np.array([1]), np.array([sha256_bytes(b"a")]))
    with pytest.raises(FusionrecError, match="dimension 4, expected 8"):
        VectorReader([tmp_path / "a.parquet"], dim=8).take(np.array([0]), np.array([0]),
                                                             np.array([sha256_bytes(b"a")]))


def test_reader_cache_stays_within_its_budget(tmp_path: Path) -> None:
    table_file(tmp_path / "a.parquet", [str(i) for i in range(40)], dim=64, row_group_rows=4)
    # One row group decoded: 4 x 64 float32 (1,024 bytes) + 4 hashes as numpy str (1,024 bytes).
    reader = VectorReader([tmp_path / "a.parquet"], dim=64, cache_bytes=5_000)
    hashes = np.array([sha256_bytes(str(i).encode()) for i in range(40)])
    for start in range(0, 40, 4):
        rows = np.arange(start, start + 4)
        reader.take(np.zeros(4, np.int64), rows, hashes[rows])
    assert len(reader._cache) == 2 and reader._cached_bytes == 4_096 <= reader.cache_bytes
