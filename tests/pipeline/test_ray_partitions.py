"""The Ray engine's reading tasks (`plan_partition`, one per batch of `embed.batch_rows`
rows) give the local engine's tables and errors; a memory-mapped index searches like a
loaded one.

The Ray tests run on a local Ray runtime of 2 CPUs, started once for the module, and are
skipped when Ray (the optional `ray` extra) is not installed; the partition function itself
is also checked in-process, without Ray.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import faiss
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from fusionrec.pipeline.config import Config, EmbedConfig, RayConfig
from fusionrec.pipeline.embedding.job import (
    ModalityEncoder,
    modality_contents,
    plan_partition,
    plan_rows,
    read_artifact_table,
    run_embed,
)
from fusionrec.pipeline.errors import InputError
from fusionrec.pipeline.io.streaming import validated_batches, validated_columns
from fusionrec.pipeline.io.tables import TEXT_LIMIT
from fusionrec.pipeline.retrieval.faiss_index import load_index, save_index

BATCH = 7  # rows per batch, hence per Ray task: 45 rows make 7 partitions
N = 45


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'fusionrec[ray]')")
    with pytest.MonkeyPatch.context() as mp:  # workers inherit these; restored after the module
        for key, value in {"RAY_DISABLE_USAGE_STATS": "1", "RAY_USAGE_STATS_ENABLED": "0"}.items():
            mp.setenv(key, os.environ.get(key, value))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
        yield ray
        ray.shutdown()


def crc_encoder() -> ModalityEncoder:
    """A deterministic 8-d text encoder (a closure: shipped to the Ray actors by value)."""
    freqs = np.linspace(0.5, 2.0, 8)

    def encode(texts: list) -> np.ndarray:
        seeds = np.array([zlib.crc32(t.encode()) for t in texts], dtype=np.float64)
        x = np.cos(np.outer(seeds / 2**32 * 1000.0, freqs)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return ModalityEncoder("test:crc-8", 8, encode, preprocess_id="clean-v1")


def items(n: int = N) -> pl.DataFrame:
    """Items whose text needs the clean-up: HTML, entities, control characters, tags, gaps."""
    rows = []
    for i in range(n):
        rows.append({"item_id": f" i{i:03d} ", "title": f"<b>Title</b> {i} &amp; more\x07" if i % 5 else None,
                     "description": f"line one\nline\ttwo {i * 7}" if i % 3 else "   ",
                     "tags": "a | b|c" if i % 4 else None})
    return pl.DataFrame(rows, schema={"item_id": pl.String, "title": pl.String, "description": pl.String,
                                      "tags": pl.String})


def write(frame: pl.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        frame.write_csv(path)
    else:  # row groups of 10 rows: partitions of 7 rows straddle them
        pq.write_table(frame.to_arrow(), path, row_group_size=10)
    return path


def config(engine: str) -> Config:
    return Config(engine=engine, ray=RayConfig(num_actors=2, batch_size=8),
                  embed=EmbedConfig(device="cpu", shard_size=6, batch_rows=BATCH))


def tables(art: Path) -> dict[str, tuple]:
    return {p.stem: read_artifact_table(p) for p in sorted((art / "embeddings").glob("*_*.parquet"))
            if p.name != "failures.parquet"}


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_ray_reading_tasks_write_the_local_engines_tables(tmp_path: Path, ray_local, suffix: str) -> None:
    data = tmp_path / "data"
    write(items(), data / f"items{suffix}")
    users = pl.DataFrame({"user_id": [f"u{i}" for i in range(20)],
                          "text": [f"I like <i>item</i> {i}" if i % 2 else "" for i in range(20)]})
    write(users, data / f"users{suffix}")
    local = run_embed(data, tmp_path / "local", config("local"), encoders={"text": crc_encoder()},
                      show_progress=False)
    on_ray = run_embed(data, tmp_path / "ray", config("ray"), encoders={"text": crc_encoder()},
                       show_progress=False)

    a, b = tables(tmp_path / "local"), tables(tmp_path / "ray")
    assert sorted(a) == sorted(b) == ["item_text", "user_text"]
    for name in a:
        ids_a, hashes_a, models_a, vec_a = a[name]
        ids_b, hashes_b, models_b, vec_b = b[name]
        assert ids_b == ids_a and hashes_b == hashes_a and models_b == models_a, name
        np.testing.assert_array_equal(vec_b, vec_a, err_msg=name)
    # Ids trimmed, in input order; item 0 has no text at all (no title, blank description, no tags).
    assert len(a["item_text"][0]) == N - 1 and a["item_text"][0][:2] == ["i001", "i002"]
    assert len(a["user_text"][0]) == 10  # users with empty text have no text row
    assert {k: (c.rows, c.encoded) for k, c in on_ray.counts.items()} == \
        {k: (c.rows, c.encoded) for k, c in local.counts.items()}


def test_one_partition_is_the_local_engines_batch(tmp_path: Path) -> None:
    """plan_partition run in-process: rows [14, 21) as the local engine's third batch, its
    plan part written by the task under the batch's first row, rows numbered in the table."""
    path = write(items(), tmp_path / "items.parquet")
    enc = crc_encoder()
    batch = list(validated_batches(path, "item", BATCH))[2]
    plans = tmp_path / "plan"
    plans.mkdir()
    part = plan_partition(None, str(path), "item", validated_columns(path, "item"), 14, 21,
                          {"text": (enc.model_id, enc.dim, enc.preprocess_id)}, {"text": str(plans)}, keep_ids=True)
    assert part.error is None and part.ids is not None and (part.start, part.rows) == (14, 7)
    assert part.ids.to_pylist() == batch["item_id"].to_list() == [f"i{i:03d}" for i in range(14, 21)]
    expected = plan_rows("text", modality_contents(batch, "item", 14)["text"], enc, tmp_path)
    assert [p.name for p in plans.iterdir()] == ["000000000014.parquet"] and part.written == {"text": 7}
    assert pq.read_table(plans / "000000000014.parquet").equals(expected)
    assert expected.column("row").to_pylist() == list(range(14, 21))
    assert "<b>" not in " ".join(expected.column("content").to_pylist())  # cleaned in the task
    # Without keep_ids the driver gets no ids back, only what it checks (the id hashes).
    bare = plan_partition(None, str(path), "item", validated_columns(path, "item"), 14, 21,
                          {"text": (enc.model_id, enc.dim, enc.preprocess_id)}, {"text": str(plans)})
    assert bare.ids is None and bare.id_hashes is not None and len(bare.id_hashes) == 7


def test_a_plan_part_written_where_the_driver_cannot_see_it_is_an_error(tmp_path: Path) -> None:
    """On a cluster whose nodes do not share the artifacts folder, a task's part would be
    missing from the plan, and its rows from the tables, without a word: the driver checks."""
    from fusionrec.pipeline.embedding.job import write_plans
    from fusionrec.pipeline.errors import FusionrecError

    path = write(items(), tmp_path / "data" / "items.parquet")
    elsewhere = tmp_path / "other_node"

    def on_another_node(fn, calls, what):  # a RunOrdered whose tasks write on another machine's disk
        for call in calls:
            dirs = {m: str(elsewhere / m) for m in call[7]}
            for d in dirs.values():
                Path(d).mkdir(parents=True, exist_ok=True)
            yield fn(*call[:7], dirs, *call[8:])

    with pytest.raises(FusionrecError, match=r"the Ray task for rows 0-6 of items.parquet wrote its text plan part "
                                             r"where this process cannot see it .*storage every node sees"):
        write_plans(path, "item", path.parent, {"text": crc_encoder()}, tmp_path / "work", batch_rows=BATCH,
                    run_ordered=on_another_node)


def bad_cases() -> list[tuple[str, pl.DataFrame]]:
    missing = items().with_columns(pl.when(pl.int_range(pl.len()) == 33).then(pl.lit(" "))
                                   .otherwise(pl.col("item_id")).alias("item_id"))
    too_long = items().with_columns(pl.when(pl.int_range(pl.len()) == 40).then(pl.lit("x" * (TEXT_LIMIT + 1)))
                                    .otherwise(pl.col("description")).alias("description"))
    duplicate = items().with_columns(pl.when(pl.int_range(pl.len()) == 38).then(pl.lit("i002"))
                                     .otherwise(pl.col("item_id")).alias("item_id"))
    return [("missing id", missing), ("text too long", too_long), ("duplicate id", duplicate)]


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
@pytest.mark.parametrize("case", [c for c, _ in bad_cases()])
def test_a_bad_row_in_a_later_partition_gives_the_local_engines_error(tmp_path: Path, ray_local, case: str,
                                                                       suffix: str) -> None:
    frame = dict(bad_cases())[case]
    data = tmp_path / "data"
    path = write(frame, data / f"items{suffix}")
    errors = {}
    for engine in ("local", "ray"):
        with pytest.raises(InputError) as info:
            run_embed(data, tmp_path / engine, config(engine), encoders={"text": crc_encoder()}, show_progress=False)
        errors[engine] = info.value
    local, on_ray = errors["local"], errors["ray"]
    assert str(on_ray) == str(local)
    assert (on_ray.file, on_ray.row, on_ray.field) == (local.file, local.row, local.field)
    assert on_ray.file == str(path) and on_ray.field in ("item_id", "description")
    assert on_ray.row == {"missing id": 34, "text too long": 41, "duplicate id": 39}[case]  # past the 4th partition
    assert not (tmp_path / "ray" / "embeddings" / "item_text.parquet").exists()


# ------------------------------------------------------------------ memory-mapped index


def _rss_anon_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon")


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat", "HNSW16"])
def test_a_memory_mapped_index_searches_like_a_loaded_one(tmp_path: Path, factory: str) -> None:
    x = np.random.default_rng(0).standard_normal((20_000, 256)).astype(np.float32)
    index = faiss.index_factory(256, factory, faiss.METRIC_INNER_PRODUCT)
    index.train(x[:4_000])
    index.add(x)
    save_index(index, tmp_path / "index.faiss")
    del index
    queries = x[:50] + 0.1
    loaded = load_index(tmp_path / "index.faiss")
    before = _rss_anon_mb() if Path("/proc/self/status").is_file() else None
    mapped = load_index(tmp_path / "index.faiss", mmap=True)
    if before is not None:  # the 20 MB of codes stay in the file (page cache), not in this process's heap
        assert _rss_anon_mb() - before < 5
    for idx in (loaded, mapped):
        if "IVF" in factory:
            faiss.extract_index_ivf(idx).nprobe = 4
    s_loaded, i_loaded = loaded.search(queries, 10)
    s_mapped, i_mapped = mapped.search(queries, 10)
    np.testing.assert_array_equal(i_mapped, i_loaded)
    np.testing.assert_allclose(s_mapped, s_loaded, atol=1e-6)


# ------------------------------------------------------------------ the scoring actor pool


def test_the_actor_pool_keeps_input_order_runs_one_thread_each_and_names_an_actors_error(ray_local) -> None:
    from fusionrec.pipeline.embedding.ray_engine import ordered_actor_calls
    from fusionrec.pipeline.errors import FusionrecError

    class Echo:  # defined here: shipped to the actors by value, as a test module is not importable there
        """An actor that reports its process's thread settings, slowly for even inputs."""

        def __init__(self, fail: bool = False) -> None:
            if fail:
                raise ValueError("no artifacts here")

        def run(self, x: int) -> tuple[int, str, str, int]:
            import time

            from fusionrec.pipeline.threads import cores

            time.sleep(0.05 if x % 2 == 0 else 0.0)
            return x, os.environ.get("OMP_NUM_THREADS", ""), os.environ.get("POLARS_MAX_THREADS", ""), cores()

    out = list(ordered_actor_calls(ray_local, Echo, {}, range(9), 2, "echo"))
    assert [x for x, *_ in out] == list(range(9))  # in input order, though odd inputs finish first
    assert {tuple(rest) for _, *rest in out} == {("1", "1", 1)}  # one thread in every library
    with pytest.raises(FusionrecError, match="Ray echo failed: ValueError: no artifacts here"):
        list(ordered_actor_calls(ray_local, Echo, {"fail": True}, range(3), 2, "echo"))


def test_more_actors_than_the_clusters_cpus_still_finish_in_order(ray_local, caplog) -> None:
    """ray.num_actors = 4 on a 2-CPU runtime: before, input 2 waited on an actor that never got a
    CPU, and `recommend --engine ray` hung forever; now the pool is cut to the CPUs, with a warning."""
    import threading

    from fusionrec.pipeline.embedding.ray_engine import ordered_actor_calls

    class Double:  # defined here: shipped to the actors by value
        def run(self, x: int) -> int:
            return 2 * x

    got: list[int] = []
    worker = threading.Thread(target=lambda: got.extend(ordered_actor_calls(ray_local, Double, {}, range(9), 4,
                                                                             "batch scoring")), daemon=True)
    with caplog.at_level("WARNING", logger="fusionrec.ray"):
        worker.start()
        worker.join(timeout=90)
    assert not worker.is_alive(), "the actor pool hung: more actors than CPUs"
    assert got == [2 * x for x in range(9)]
    assert "ray.num_actors = 4 but the Ray cluster has 2 CPU(s): batch scoring runs on 2 actors" in caplog.text


def test_cores_honours_omp_num_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    from fusionrec.pipeline.threads import cores

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    free = cores()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cores() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "not a number")
    assert cores() == free
    monkeypatch.setenv("OMP_NUM_THREADS", str(free + 8))
    assert cores() == free  # never more than the process may run on
