"""Streamed reading of big tables and chunked FAISS building from Parquet (pipeline.streaming)."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from polars.testing import assert_frame_equal

from pipeline import index as fidx
from pipeline import streaming
from pipeline.embed import ModalityEncoder, read_artifact_table, run_embed
from pipeline.errors import InputError
from pipeline.tables import read_table
from tests.tiny_models import HashEncoder


def items_frame(n: int = 23) -> pl.DataFrame:
    rng = np.random.default_rng(0)
    words = np.array("ocean sea wave blue fire flame red city night neon jazz piano".split())
    return pl.DataFrame({
        "item_id": [f"i{i:03d}" for i in range(n)],
        "title": [None if i % 7 == 3 else " ".join(rng.choice(words, 3)) for i in range(n)],
        "description": ["<b>Bold</b> &amp; loud,\nnew line" if i % 5 == 0 else ("" if i % 5 == 1 else
                        " ".join(rng.choice(words, 8))) for i in range(n)],
        "tags": ["a|b | c" if i % 3 else None for i in range(n)],
        "price": [float(i) for i in range(n)],
    }).with_columns(  # one item with no text at all
        pl.when(pl.col("item_id") == "i010").then(None).otherwise(pl.col("title")).alias("title"),
        pl.when(pl.col("item_id") == "i010").then(pl.lit("")).otherwise(pl.col("description")).alias("description"),
        pl.when(pl.col("item_id") == "i010").then(None).otherwise(pl.col("tags")).alias("tags"))


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_iter_table_gives_the_whole_table_in_bounded_batches(tmp_path: Path, suffix: str) -> None:
    frame = items_frame()
    path = tmp_path / f"items{suffix}"
    frame.write_parquet(path, row_group_size=4) if suffix == ".parquet" else frame.write_csv(path)
    batches = list(streaming.iter_table(path, batch_rows=5))
    assert [b.height for b in batches] == [5, 5, 5, 5, 3]
    assert_frame_equal(pl.concat(batches), read_table(path))  # CSV: strings, quoted newlines kept
    only = list(streaming.iter_table(path, ["item_id", "tags"], batch_rows=100))
    assert len(only) == 1 and only[0].columns == ["item_id", "tags"]
    with pytest.raises(InputError, match="field 'colour'.*required column is missing"):
        next(streaming.iter_table(path, ["item_id", "colour"]))


def test_streamed_hashes_are_the_embedding_jobs_hashes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    frame = items_frame()
    frame.write_csv(data / "items.csv")
    text = HashEncoder(8, "hash-v1")
    run_embed(data, tmp_path / "art", encoders={"text": ModalityEncoder("hash-v1", 8, text.encode,
                                                                         preprocess_id="clean-v1")},
              show_progress=False)
    ids, hashes, _, _ = read_artifact_table(tmp_path / "art" / "embeddings" / "item_text.parquet")

    stats = streaming.stream_text_hashes(data / "items.csv", tmp_path / "hashes.parquet", model_id="hash-v1",
                                         preprocess_id="clean-v1", batch_rows=4)
    streamed = pl.read_parquet(tmp_path / "hashes.parquet")
    assert stats["rows"] == len(ids) == frame.height - 1  # the item without text has no text row
    assert streamed["id"].to_list() == ids and streamed["content_hash"].to_list() == hashes
    assert pq.ParquetFile(tmp_path / "hashes.parquet").metadata.num_rows == len(ids)

    # One title changes: only that id needs encoding against the existing table.
    frame.with_columns(pl.when(pl.col("item_id") == "i005").then(pl.lit("a new title")).otherwise(pl.col("title"))
                       .alias("title")).write_csv(data / "items.csv")
    streaming.stream_text_hashes(data / "items.csv", tmp_path / "hashes.parquet", model_id="hash-v1",
                                 preprocess_id="clean-v1", batch_rows=4)
    todo = streaming.rows_to_encode(tmp_path / "hashes.parquet",
                                    tmp_path / "art" / "embeddings" / "item_text.parquet")
    assert todo["id"].to_list() == ["i005"]
    assert streaming.rows_to_encode(tmp_path / "hashes.parquet", None).height == len(ids)


def test_bad_ids_name_the_row_of_the_whole_table(tmp_path: Path) -> None:
    frame = items_frame()
    missing = frame.with_columns(pl.when(pl.col("item_id") == "i013").then(pl.lit("  ")).otherwise(pl.col("item_id"))
                                 .alias("item_id"))
    missing.write_parquet(tmp_path / "missing.parquet")
    with pytest.raises(InputError, match=r"missing\.parquet, row 14, field 'item_id': missing id$"):
        list(streaming.item_text_batches(tmp_path / "missing.parquet", batch_rows=5))

    dup = frame.with_columns(pl.when(pl.col("item_id") == "i021").then(pl.lit("i002")).otherwise(pl.col("item_id"))
                             .alias("item_id"))
    dup.write_parquet(tmp_path / "dup.parquet")
    with pytest.raises(InputError, match=r"row 22, field 'item_id': duplicate id 'i002' \(first on row 3\)"):
        list(streaming.item_text_batches(tmp_path / "dup.parquet", batch_rows=5))


def clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((12, d)).astype(np.float32)
    x = centres[rng.integers(0, 12, n)] + 0.3 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_vectors(paths: list[Path], x: np.ndarray) -> list[str]:
    ids = [f"v{i}" for i in range(len(x))]
    parts = np.array_split(np.arange(len(x)), len(paths))
    for path, rows in zip(paths, parts):
        table = pa.table({"id": pa.array([ids[i] for i in rows]),
                          "vector": pa.FixedSizeListArray.from_arrays(pa.array(x[rows].reshape(-1)), x.shape[1])})
        streaming.write_batches([table], path, row_group_rows=500)
    return ids


def test_sample_is_seeded_and_made_of_real_rows(tmp_path: Path) -> None:
    x = clustered(3000, 16)
    paths = [tmp_path / "a.parquet", tmp_path / "b.parquet"]
    write_vectors(paths, x)
    assert pq.ParquetFile(paths[0]).metadata.num_row_groups == 3  # 1500 rows in row groups of 500
    sample = streaming.sample_vectors(paths, 400, seed=3, batch_rows=256)
    assert sample.shape == (400, 16)
    np.testing.assert_array_equal(sample, streaming.sample_vectors(paths, 400, seed=3, batch_rows=999))
    rows = {r.tobytes() for r in x}
    assert all(r.tobytes() in rows for r in sample) and len({r.tobytes() for r in sample}) == 400
    np.testing.assert_array_equal(streaming.sample_vectors(paths, 5000), x)
    assert streaming.vector_shape(paths) == (3000, 16)


def test_index_built_in_chunks_finds_the_exact_neighbours(tmp_path: Path) -> None:
    x = clustered(3000, 16)
    paths = [tmp_path / "a.parquet", tmp_path / "b.parquet"]
    ids = write_vectors(paths, x)
    queries = clustered(50, 16, seed=9)
    exact_scores, exact = fidx.exact_search(x, queries, 10)

    chunks: list[tuple[int, int]] = []
    index, got_ids = streaming.build_index_from_parquet(paths, "IVF8,Flat", train_size=800, batch_rows=700,
                                                        on_chunk=lambda start, m: chunks.append((start, len(m))))
    assert index.ntotal == 3000 and got_ids.to_pylist() == ids
    assert [s for s, _ in chunks] == list(np.cumsum([0] + [n for _, n in chunks])[:-1])
    assert sum(n for _, n in chunks) == 3000 and max(n for _, n in chunks) <= 700 and 1500 in [s for s, _ in chunks]
    fidx.set_search_params(index, {"nprobe": 8})  # every list probed: exact
    _, found = fidx.search(index, queries, 10)
    np.testing.assert_array_equal(found, exact)

    pq_index, _ = streaming.build_index_from_parquet(paths, "IVF8,PQ4", train_size=2000, batch_rows=1000,
                                                     id_column=None)
    assert fidx.index_memory_bytes(pq_index) == 3000 * (4 + 8) + 8 * 16 * 4  # codes + ids + centroids
    fidx.set_search_params(pq_index, {"nprobe": 8})
    _, approx = fidx.search(pq_index, queries, 50)
    inside = np.mean([len(set(e) & set(a)) / 10 for e, a in zip(exact, approx)])
    assert inside > 0.9  # 10@50: the exact top 10 found among the PQ top 50

    flat, _ = streaming.build_index_from_parquet(paths[0], "Flat", id_column=None)
    assert isinstance(faiss.downcast_index(flat), faiss.IndexFlat) and flat.ntotal == 1500


def test_vectors_that_are_not_fixed_size_lists_are_bad_input(tmp_path: Path) -> None:
    pq.write_table(pa.table({"id": ["a"], "vector": [[1.0, 2.0]]}), tmp_path / "v.parquet")
    with pytest.raises(InputError, match="fixed-size list"):
        streaming.vector_shape([tmp_path / "v.parquet"])
