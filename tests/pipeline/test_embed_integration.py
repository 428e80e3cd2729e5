"""The embedding job with the real default weights on the shipped sample data."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from fusionrec.pipeline.embedding.job import read_artifact_table, run_embed
from fusionrec.pipeline.io.manifest import read_manifest

pytestmark = pytest.mark.integration
PROJECT = Path(__file__).resolve().parents[2]


def subset(sample: Path, out: Path, n: int, media: bool = True) -> pl.DataFrame:
    """The first n items of data/ (with their media files) and no users."""
    items = pl.read_csv(sample / "items.csv").head(n)
    if not media:
        items = items.drop("image", "audio")
    out.mkdir(parents=True)
    items.write_csv(out / "items.csv")
    if media:
        for rel in items["image"].drop_nulls().to_list() + items["audio"].drop_nulls().to_list():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(sample / rel, out / rel)
    return items


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory, sample_data: Path):
    """One run with all three real encoders over 8 items, one JPEG corrupted and one audio file gone."""
    base = tmp_path_factory.mktemp("real")
    data = base / "data"
    items = subset(sample_data, data, 8)
    with_jpeg = items.filter(pl.col("image").str.ends_with(".jpg")).row(0, named=True)
    with_audio = items.filter(pl.col("audio").is_not_null() & (pl.col("item_id") != with_jpeg["item_id"])).row(0, named=True)
    jpeg = data / with_jpeg["image"]
    jpeg.write_bytes(jpeg.read_bytes()[: len(jpeg.read_bytes()) // 2])  # truncated JPEG
    (data / with_audio["audio"]).unlink()
    report = run_embed(data, base / "art", show_progress=False)
    return base, items, with_jpeg, with_audio, report


def test_corrupt_jpeg_and_missing_audio_land_in_failures_with_items_kept(real_run) -> None:
    base, items, bad_image, bad_audio, report = real_run
    failures = pl.read_parquet(base / "art" / "embeddings" / "failures.parquet").sort("modality")
    assert failures.select("id", "modality").rows() == [(bad_audio["item_id"], "audio"), (bad_image["item_id"], "image")]
    assert "not found" in failures.filter(pl.col("modality") == "audio")["error"].item()
    assert "truncated" in failures.filter(pl.col("modality") == "image")["error"].item()
    emb = base / "art" / "embeddings"
    assert bad_image["item_id"] not in read_artifact_table(emb / "item_image.parquet")[0]
    assert bad_audio["item_id"] not in read_artifact_table(emb / "item_audio.parquet")[0]
    # Both items are kept: served from their other modalities.
    assert {bad_image["item_id"], bad_audio["item_id"]} <= set(read_artifact_table(emb / "item_text.parquet")[0])
    assert read_artifact_table(emb / "item_image.parquet")[3].shape[1] == 1280
    assert read_artifact_table(emb / "item_audio.parquet")[3].shape[1] == 384
    assert read_artifact_table(emb / "item_text.parquet")[3].shape[1] == 384


def test_rerun_after_a_title_change_encodes_exactly_one_text_row(real_run) -> None:
    base, items, *_ = real_run
    changed = items.with_columns(pl.when(pl.col("item_id") == items["item_id"][0]).then(pl.lit("A brand new title"))
                                 .otherwise(pl.col("title")).alias("title"))
    changed.write_csv(base / "data" / "items.csv")
    run_embed(base / "data", base / "art", show_progress=False)
    counts = read_manifest(base / "art")["runs"][-1]["counts"]
    assert (counts["item_text"]["encoded"], counts["item_text"]["reused"]) == (1, 7)
    assert counts["item_image"]["encoded"] == 0 and counts["item_audio"]["encoded"] == 0
    items.write_csv(base / "data" / "items.csv")


KILL_SCRIPT = r"""
import sys
from pathlib import Path
sys.path.insert(0, {project!r})
from fusionrec.pipeline.config import load_config
from fusionrec.pipeline.embedding.job import run_embed
cfg = load_config(overrides=["embed.shard_size=8", "embed.text.batch_size=8"])
run_embed(Path(sys.argv[1]), Path(sys.argv[2]), cfg, show_progress=False)
"""


def test_killed_run_resumes_to_the_same_tables_with_real_weights(tmp_path: Path, sample_data: Path) -> None:
    data = tmp_path / "data"
    subset(sample_data, data, 64, media=False)
    script = tmp_path / "job.py"
    script.write_text(KILL_SCRIPT.format(project=str(PROJECT)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), str(data), str(tmp_path / "clean")], check=True, env=env)

    killed = tmp_path / "killed"
    job = subprocess.Popen([sys.executable, str(script), str(data), str(killed)], env=env)
    shards = killed / "embeddings" / ".shards" / "item_text"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(shards.glob("shard-*.parquet"))) < 2 and job.poll() is None:
        time.sleep(0.02)
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    finished = len(list(shards.glob("shard-*.parquet")))
    assert 2 <= finished < 8, f"not killed mid-way ({finished} shards)"

    subprocess.run([sys.executable, str(script), str(data), str(killed)], check=True, env=env)
    counts = read_manifest(killed)["runs"][-1]["counts"]["item_text"]
    assert counts["resumed"] == 8 * finished and counts["encoded"] == 64 - 8 * finished
    a = pq.read_table(tmp_path / "clean" / "embeddings" / "item_text.parquet")
    b = pq.read_table(killed / "embeddings" / "item_text.parquet")
    assert a.column("id").equals(b.column("id")) and a.column("content_hash").equals(b.column("content_hash"))
    va = read_artifact_table(tmp_path / "clean" / "embeddings" / "item_text.parquet")[3]
    vb = read_artifact_table(killed / "embeddings" / "item_text.parquet")[3]
    # Same rows, same vectors; batches differ after a resume, so allow float rounding only.
    np.testing.assert_allclose(va, vb, atol=1e-5)


def test_same_topic_texts_are_closer_than_different_topics() -> None:
    from fusionrec.pipeline.encoders.text import TextEncoder

    enc = TextEncoder(device="cpu")
    v = enc.encode(["Waves crash on the sandy beach under a blue sky.",
                    "The ocean surf rolls onto the shore at noon.",
                    "The central bank raised interest rates to fight inflation.",
                    "Stock markets fell after the rate decision."])
    sims = v @ v.T
    assert sims[0, 1] > sims[0, 2] + 0.2 and sims[0, 1] > sims[0, 3] + 0.2
    assert sims[2, 3] > sims[2, 0] + 0.2 and sims[2, 3] > sims[2, 1] + 0.2
