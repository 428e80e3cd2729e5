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

from fusionrec.pipeline.embedding.job import ModalityEncoder, read_artifact_table, run_embed
from fusionrec.pipeline.errors import InputError
from fusionrec.pipeline.io import streaming
from fusionrec.pipeline.io.storage import sha256_bytes
from fusionrec.pipeline.io.tables import read_table
from fusionrec.pipeline.retrieval import faiss_index as fidx
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


class CountingEncoder(HashEncoder):
    """A HashEncoder that also records each batch it encodes."""

    def __init__(self, dim: int = 8, model_id: str = "hash-v1") -> None:
        super().__init__(dim, model_id)
        self.batches: list[list[str]] = []

    def encode(self, inputs: list) -> np.ndarray:
        self.batches.append(list(inputs))
        return super().encode(inputs)

    def as_modality(self) -> ModalityEncoder:
        return ModalityEncoder(self.model_id, self.dim, self.encode, preprocess_id="clean-v1")


def test_the_embedding_job_streams_its_input_and_writes_the_eager_result(tmp_path: Path, monkeypatch) -> None:
    """Batches of 4 rows (items in 6 batches): the table equals an in-memory computation of
    the same hashes and vectors, in input order."""
    from fusionrec.pipeline.encoders.text import item_text
    from fusionrec.pipeline.io.tables import load_items

    data = tmp_path / "data"
    data.mkdir()
    frame = items_frame()
    frame.write_csv(data / "items.csv")
    seen: list[int] = []
    real = streaming.iter_table

    def spy(path, columns=None, batch_rows=streaming.DEFAULT_BATCH_ROWS):
        for batch in real(path, columns, 4):
            seen.append(batch.height)
            yield batch

    monkeypatch.setattr(streaming, "iter_table", spy)
    text = CountingEncoder()
    run_embed(data, tmp_path / "art", encoders={"text": text.as_modality()}, show_progress=False)
    assert seen == [4, 4, 4, 4, 4, 3]  # never the whole table at once

    items = load_items(data)
    expected = items.select("item_id", item_text(items).alias("text")).drop_nulls("text")
    ids, hashes, models, matrix = read_artifact_table(tmp_path / "art" / "embeddings" / "item_text.parquet")
    assert ids == expected["item_id"].to_list() and len(ids) == frame.height - 1  # i010 has no text
    salt = b"hash-v1\x00clean-v1\x00"
    assert hashes == [sha256_bytes(salt + t.encode()) for t in expected["text"]]
    np.testing.assert_allclose(matrix, HashEncoder(8).encode(expected["text"].to_list()), atol=1e-6)
    assert set(models) == {"hash-v1"}
    assert not (tmp_path / "art" / "embeddings" / ".shards").exists()  # the work files are gone


def test_a_rerun_encodes_only_changed_rows_and_keeps_row_order(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    frame = items_frame(40)
    frame.write_parquet(data / "items.parquet", row_group_size=7)
    text = CountingEncoder()
    run_embed(data, tmp_path / "art", encoders={"text": text.as_modality()}, show_progress=False)
    first = read_artifact_table(tmp_path / "art" / "embeddings" / "item_text.parquet")

    # Reordered, one title changed, one item gone, one new: only two rows are encoded.
    changed = (frame.reverse().filter(pl.col("item_id") != "i030")
               .with_columns(pl.when(pl.col("item_id") == "i005").then(pl.lit("a new title"))
                             .otherwise(pl.col("title")).alias("title"))
               .vstack(pl.DataFrame({"item_id": ["n001"], "title": ["jazz piano night"], "description": [None],
                                     "tags": [None], "price": [1.0]}, schema=frame.schema)))
    changed.write_parquet(data / "items.parquet", row_group_size=7)
    text.batches.clear()
    report = run_embed(data, tmp_path / "art", encoders={"text": text.as_modality()}, show_progress=False)
    ids, hashes, _, matrix = read_artifact_table(tmp_path / "art" / "embeddings" / "item_text.parquet")
    encoded = [x for batch in text.batches for x in batch]
    assert encoded == ["a new title. Bold & loud, new line. a, b, c", "jazz piano night"]
    counts = report.counts["item_text"]
    assert (counts.encoded, counts.reused, counts.dropped) == (2, len(ids) - 2, 1)
    assert ids == [i for i in changed["item_id"].to_list() if i != "i010"]  # the new input order
    old = dict(zip(first[0], first[3]))
    for i, row in zip(ids, matrix):
        if i not in ("i005", "n001"):
            np.testing.assert_array_equal(row, old[i])  # reused vectors are the stored ones, bit for bit


def test_bad_ids_name_the_row_of_the_whole_table(tmp_path: Path) -> None:
    frame = items_frame()
    missing = frame.with_columns(pl.when(pl.col("item_id") == "i013").then(pl.lit("  ")).otherwise(pl.col("item_id"))
                                 .alias("item_id"))
    missing.write_parquet(tmp_path / "missing.parquet")
    with pytest.raises(InputError, match=r"missing\.parquet, row 14, field 'item_id': missing id$"):
        list(streaming.validated_batches(tmp_path / "missing.parquet", "item", batch_rows=5))

    dup = frame.with_columns(pl.when(pl.col("item_id") == "i021").then(pl.lit("i002")).otherwise(pl.col("item_id"))
                             .alias("item_id"))
    dup.write_parquet(tmp_path / "dup.parquet")
    with pytest.raises(InputError, match=r"row 22, field 'item_id': duplicate id 'i002' \(first on row 3\)"):
        list(streaming.validated_batches(tmp_path / "dup.parquet", "item", batch_rows=5))

    header_only = tmp_path / "users.csv"
    header_only.write_text("user_id,text\n")
    with pytest.raises(InputError, match=r"users\.csv: the table has no rows$"):
        list(streaming.validated_batches(header_only, "user", batch_rows=5))
    ragged = tmp_path / "items.csv"
    ragged.write_text("item_id,title\ni1,a\ni2,b,extra\n")
    with pytest.raises(InputError, match=r"items\.csv, row 2: cannot parse the table: 3 cells, but the header"):
        list(streaming.validated_batches(ragged, "item", batch_rows=1))


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
