"""The embedding job: incremental reruns, failures, precomputed tables, locking, atomicity."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fusionrec.pipeline.config import load_config
from fusionrec.pipeline.embedding.job import ModalityEncoder, read_artifact_table, run_embed
from fusionrec.pipeline.errors import ConfigError, FusionrecError, InputError, LockError, MediaError
from fusionrec.pipeline.io.manifest import read_manifest
from fusionrec.pipeline.io.storage import ArtifactLock
from tests.tiny_models import HashEncoder, tiny_text_model

PROJECT = Path(__file__).resolve().parents[2]


def write_catalog(data: Path, n: int = 10, with_media: bool = True) -> pl.DataFrame:
    data.mkdir(parents=True, exist_ok=True)
    (data / "media").mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        rows.append({"item_id": f"i{i}", "title": f"item number {i}", "description": f"about thing {i}",
                     "tags": "a|b", "image": f"media/i{i}.bin" if with_media else None})
        if with_media:
            (data / "media" / f"i{i}.bin").write_bytes(f"pixels of {i}".encode())
    items = pl.DataFrame(rows)
    items.write_csv(data / "items.csv")
    return items


def fake_encoders(text_dim: int = 8, model_id: str = "hash-v1") -> tuple[dict[str, ModalityEncoder], HashEncoder]:
    text = HashEncoder(text_dim, model_id)
    image = HashEncoder(8, "hash-image")

    def prepare(path: Path) -> bytes:
        data = path.read_bytes()
        if data.startswith(b"corrupt"):
            raise MediaError("cannot decode image: truncated")
        return data

    return {"text": ModalityEncoder(text.model_id, text.dim, text.encode),
            "image": ModalityEncoder(image.model_id, image.dim, image.encode, prepare=prepare)}, text


def last_counts(art: Path) -> dict:
    return read_manifest(art)["runs"][-1]["counts"]


def test_tables_follow_the_contract(tmp_path: Path) -> None:
    write_catalog(tmp_path / "data")
    encoders, _ = fake_encoders()
    run_embed(tmp_path / "data", tmp_path / "art", encoders=encoders, show_progress=False)
    table = pq.read_table(tmp_path / "art" / "embeddings" / "item_text.parquet")
    assert table.column_names == ["id", "content_hash", "model", "vector"]
    assert table.schema.field("vector").type == pa.list_(pa.float32(), 8)
    ids, hashes, models, matrix = read_artifact_table(tmp_path / "art" / "embeddings" / "item_text.parquet")
    assert ids == [f"i{i}" for i in range(10)]
    assert set(models) == {"hash-v1"}
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, rtol=1e-5)
    manifest = read_manifest(tmp_path / "art")
    run = manifest["runs"][-1]
    assert run["status"] == "ok" and run["models"]["text"] == "hash-v1"
    assert "items.csv" in run["inputs"] and len(run["inputs"]["items.csv"]) == 64
    assert run["versions"]["polars"] == pl.__version__
    assert not (tmp_path / "art" / "embeddings" / ".shards").exists()


def test_plan_parts_a_killed_run_left_do_not_join_the_next_plan(tmp_path: Path) -> None:
    """A killed run of a longer table leaves plan parts past this table's end (and a
    temporary part); the next run plans this table only, with rows numbered in the table."""
    from fusionrec.pipeline.embedding.job import plan_dir, write_plan_part, write_plans

    write_catalog(tmp_path / "data", n=10, with_media=False)
    encoders, _ = fake_encoders()
    work = tmp_path / "art" / "embeddings" / ".shards"
    stale = plan_dir(work, "item", "text")
    stale.mkdir(parents=True)
    write_plan_part(stale, 16_384, pa.table({"row": [16_384], "id": ["gone"]}))
    (stale / ".tmp-0123456789ab-000000000000.parquet").write_bytes(b"torn")
    plans, _ = write_plans(tmp_path / "data" / "items.csv", "item", tmp_path / "data",
                           {"text": encoders["text"]}, work)
    assert [(p.modality, p.rows, [f.name for f in p.files]) for p in plans] == \
        [("text", 10, ["000000000000.parquet"])]
    part = pq.read_table(plans[0].files[0])
    assert part.column("id").to_pylist() == [f"i{i}" for i in range(10)]
    assert part.column("row").to_pylist() == list(range(10))
    run_embed(tmp_path / "data", tmp_path / "art", encoders=encoders, show_progress=False)
    ids, *_ = read_artifact_table(tmp_path / "art" / "embeddings" / "item_text.parquet")
    assert ids == [f"i{i}" for i in range(10)]
    assert not work.exists()  # plans, temporaries and shards gone once the run ends


def test_rerun_after_one_title_change_encodes_exactly_one_text_row(tmp_path: Path) -> None:
    items = write_catalog(tmp_path / "data")
    encoders, text = fake_encoders()
    run_embed(tmp_path / "data", tmp_path / "art", encoders=encoders, show_progress=False)
    assert last_counts(tmp_path / "art")["item_text"]["encoded"] == 10
    before = read_artifact_table(tmp_path / "art" / "embeddings" / "item_text.parquet")

    items.with_columns(pl.when(pl.col("item_id") == "i3").then(pl.lit("a new title")).otherwise("title")
                       .alias("title")).write_csv(tmp_path / "data" / "items.csv")
    text.rows = 0
    run_embed(tmp_path / "data", tmp_path / "art", encoders=encoders, show_progress=False)
    counts = last_counts(tmp_path / "art")
    assert (counts["item_text"]["encoded"], counts["item_text"]["reused"]) == (1, 9)
    assert (counts["item_image"]["encoded"], counts["item_image"]["reused"]) == (0, 10)
    assert text.rows == 1
    after = read_artifact_table(tmp_path / "art" / "embeddings" / "item_text.parquet")
    changed = [i for i in range(10) if before[1][i] != after[1][i]]
    assert changed == [3]
    np.testing.assert_array_equal(np.delete(before[3], 3, 0), np.delete(after[3], 3, 0))


def test_deleted_ids_are_dropped_and_a_new_model_reencodes_everything(tmp_path: Path) -> None:
    items = write_catalog(tmp_path / "data")
    encoders, _ = fake_encoders()
    run_embed(tmp_path / "data", tmp_path / "art", encoders=encoders, show_progress=False)
    items.filter(pl.col("item_id") != "i0").write_csv(tmp_path / "data" / "items.csv")
    run_embed(tmp_path / "data", tmp_path / "art", encoders=encoders, show_progress=False)
    counts = last_counts(tmp_path / "art")["item_text"]
    assert (counts["rows"], counts["encoded"], counts["reused"], counts["dropped"]) == (9, 0, 9, 1)
    ids = read_artifact_table(tmp_path / "art" / "embeddings" / "item_text.parquet")[0]
    assert "i0" not in ids

    new_model, _ = fake_encoders(model_id="hash-v2")
    run_embed(tmp_path / "data", tmp_path / "art", encoders=new_model, show_progress=False)
    counts = last_counts(tmp_path / "art")["item_text"]
    assert (counts["encoded"], counts["reused"]) == (9, 0)
    assert set(read_artifact_table(tmp_path / "art" / "embeddings" / "item_text.parquet")[2]) == {"hash-v2"}


def test_bad_media_lands_in_failures_and_the_item_is_kept(tmp_path: Path) -> None:
    data = tmp_path / "data"
    items = write_catalog(data)
    (data / "media" / "i1.bin").write_bytes(b"corrupt jpeg")
    (data / "media" / "i2.bin").unlink()
    outside = tmp_path / "secret.bin"
    outside.write_bytes(b"secret")
    (data / "media" / "i4.bin").unlink()
    os.symlink(outside, data / "media" / "i4.bin")
    items.with_columns(pl.when(pl.col("item_id") == "i5").then(pl.lit("../secret.bin")).otherwise("image")
                       .alias("image")).write_csv(data / "items.csv")
    encoders, _ = fake_encoders()
    report = run_embed(data, tmp_path / "art", encoders=encoders, show_progress=False)

    failures = pl.read_parquet(tmp_path / "art" / "embeddings" / "failures.parquet").sort("id")
    assert failures["id"].to_list() == ["i1", "i2", "i4", "i5"]
    assert set(failures["modality"]) == {"image"}
    errors = dict(zip(failures["id"], failures["error"]))
    assert "truncated" in errors["i1"]
    assert "not found" in errors["i2"]
    assert "symlink" in errors["i4"] and "outside" in errors["i4"]
    assert "outside the data directory" in errors["i5"]
    assert failures.filter(pl.col("id") == "i5")["path"].item() == "../secret.bin"
    image_ids = read_artifact_table(tmp_path / "art" / "embeddings" / "item_image.parquet")[0]
    text_ids = read_artifact_table(tmp_path / "art" / "embeddings" / "item_text.parquet")[0]
    assert sorted(image_ids) == sorted({f"i{i}" for i in range(10)} - {"i1", "i2", "i4", "i5"})
    assert len(text_ids) == 10  # every item kept, served from the modalities it has
    assert report.counts["item_image"].failed == 4


def test_too_many_failures_fail_the_job_after_writing_what_it_could(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_catalog(data, n=4)
    for i in range(3):
        (data / "media" / f"i{i}.bin").write_bytes(b"corrupt")
    encoders, _ = fake_encoders()
    cfg = load_config(overrides=["embed.max_failed_share=0.5"])
    with pytest.raises(FusionrecError, match=r"3 of 4 media files could not be read \(75% > embed.max_failed_share 50%\)"):
        run_embed(data, tmp_path / "art", cfg, encoders=encoders, show_progress=False)
    assert pl.read_parquet(tmp_path / "art" / "embeddings" / "failures.parquet").height == 3
    (record,) = read_manifest(tmp_path / "art")["runs"]  # one record, with the reason the user saw
    assert record["status"] == "failed" and record["error"].startswith("3 of 4 media files could not be read")


def counting_image(encoders: dict[str, ModalityEncoder]) -> tuple[list[str], HashEncoder]:
    """Count the files the image encoder decodes (by name) and its encode calls."""
    read: list[str] = []
    real_prepare = encoders["image"].prepare
    assert real_prepare is not None
    image = HashEncoder(8, "hash-image")

    def prepare(path: Path) -> bytes:
        read.append(path.name)
        return real_prepare(path)

    encoders["image"].prepare, encoders["image"].encode = prepare, image.encode
    return read, image


def failure_rows(art: Path) -> list[tuple]:
    return sorted(pl.read_parquet(art / "embeddings" / "failures.parquet").iter_rows())


def test_an_unchanged_corrupt_image_is_not_read_again_and_still_reported(tmp_path: Path) -> None:
    data, art = tmp_path / "data", tmp_path / "art"
    items = write_catalog(data)
    (data / "media" / "i1.bin").write_bytes(b"corrupt jpeg")
    encoders, _ = fake_encoders()
    read, image = counting_image(encoders)
    run_embed(data, art, encoders=encoders, show_progress=False)
    assert sorted(read) == sorted(f"i{i}.bin" for i in range(10)) and image.rows == 9
    expected = [("item", "i1", "image", "media/i1.bin", "cannot decode image: truncated")]
    assert failure_rows(art) == expected
    table_before = (art / "embeddings" / "item_image.parquet").stat().st_mtime_ns

    # Nothing changed: the broken file is not decoded again, the encoder never called, yet the
    # failure is reported as before (summary, failures.parquet, manifest).
    encoders, _ = fake_encoders()
    read, image = counting_image(encoders)
    report = run_embed(data, art, encoders=encoders, show_progress=False)
    assert read == [] and image.calls == 0
    counts = report.counts["item_image"]
    assert (counts.rows, counts.encoded, counts.reused, counts.failed) == (10, 0, 9, 1)
    assert failure_rows(art) == expected
    assert last_counts(art)["failures"] == 1 and last_counts(art)["item_image"]["failed"] == 1
    assert (art / "embeddings" / "item_image.parquet").stat().st_mtime_ns == table_before  # not rewritten
    assert sorted(read_artifact_table(art / "embeddings" / "item_image.parquet")[0]) == \
        sorted(f"i{i}" for i in range(10) if i != 1)

    # A remembered failure still counts toward embed.max_failed_share.
    cfg = load_config(overrides=["embed.max_failed_share=0.05"])
    with pytest.raises(FusionrecError, match=r"1 of 10 media files could not be read"):
        run_embed(data, art, cfg, encoders=encoders, show_progress=False)
    assert read == [] and failure_rows(art) == expected

    # The item deleted: its remembered failure goes; back with the same broken file, it is tried again.
    items.filter(pl.col("item_id") != "i1").write_csv(data / "items.csv")
    report = run_embed(data, art, encoders=encoders, show_progress=False)
    assert report.counts["item_image"].failed == 0 and failure_rows(art) == []
    assert pl.read_parquet(art / "cache" / "media_failures.parquet").height == 0
    items.write_csv(data / "items.csv")
    report = run_embed(data, art, encoders=encoders, show_progress=False)
    assert read == ["i1.bin"] and report.counts["item_image"].failed == 1 and failure_rows(art) == expected


def test_a_repaired_image_or_another_encoder_is_tried_again(tmp_path: Path) -> None:
    data, art = tmp_path / "data", tmp_path / "art"
    write_catalog(data)
    (data / "media" / "i1.bin").write_bytes(b"corrupt jpeg")
    (data / "media" / "i2.bin").write_bytes(b"corrupt png")
    encoders, _ = fake_encoders()
    run_embed(data, art, encoders=encoders, show_progress=False)
    assert [r[1] for r in failure_rows(art)] == ["i1", "i2"]

    # Another encoder identity (its code or libraries changed): both failures are retried.
    encoders, _ = fake_encoders()
    encoders["image"].identity_key = "another decoder"
    read, _ = counting_image(encoders)
    report = run_embed(data, art, encoders=encoders, show_progress=False)
    assert sorted(read) == ["i1.bin", "i2.bin"] and report.counts["item_image"].failed == 2

    # i1 replaced by a valid file: it alone is read and encoded, and its failure is gone.
    (data / "media" / "i1.bin").write_bytes(b"the pixels of 1, fixed")
    encoders, _ = fake_encoders()
    encoders["image"].identity_key = "another decoder"
    read, image = counting_image(encoders)
    report = run_embed(data, art, encoders=encoders, show_progress=False)
    counts = report.counts["item_image"]
    assert read == ["i1.bin"] and image.rows == 1
    assert (counts.encoded, counts.reused, counts.failed) == (1, 8, 1)
    assert [r[1] for r in failure_rows(art)] == ["i2"]
    assert "i1" in read_artifact_table(art / "embeddings" / "item_image.parquet")[0]
    assert pl.read_parquet(art / "cache" / "media_failures.parquet")["id"].to_list() == ["i2"]


def test_verify_retries_a_remembered_failure(tmp_path: Path) -> None:
    data, art = tmp_path / "data", tmp_path / "art"
    write_catalog(data)
    (data / "media" / "i1.bin").write_bytes(b"corrupt jpeg")
    encoders, _ = fake_encoders()
    run_embed(data, art, encoders=encoders, show_progress=False)

    encoders, _ = fake_encoders()
    read, image = counting_image(encoders)
    report = run_embed(data, art, encoders=encoders, show_progress=False, verify=True)
    assert read == ["i1.bin"] and image.calls == 0  # decoded again; the others' vectors reused
    assert report.counts["item_image"].failed == 1
    assert failure_rows(art) == [("item", "i1", "image", "media/i1.bin", "cannot decode image: truncated")]
    # Still broken, so still remembered: the next plain rerun does not read it.
    run_embed(data, art, encoders=encoders, show_progress=False)
    assert read == ["i1.bin"]


def test_precomputed_embeddings_are_taken_as_they_are(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_catalog(data, n=5, with_media=False)
    (data / "embeddings").mkdir()
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(6, 5)).astype(np.float32)
    pl.DataFrame({"item_id": [f"i{i}" for i in range(5)] + ["unknown"], "vector": vectors.tolist()}).write_parquet(
        data / "embeddings" / "item_audio_vggish.parquet")
    encoders, _ = fake_encoders()
    report = run_embed(data, tmp_path / "art", encoders=encoders, show_progress=False)
    ids, hashes, models, matrix = read_artifact_table(tmp_path / "art" / "embeddings" / "item_audio_vggish.parquet")
    assert ids == [f"i{i}" for i in range(5)]
    expected = vectors[:5] / np.linalg.norm(vectors[:5], axis=1, keepdims=True)
    np.testing.assert_allclose(matrix, expected, rtol=1e-6)
    assert models[0].startswith("precomputed:item_audio_vggish.parquet")
    assert report.counts["item_audio_vggish"].dropped == 1


def test_precomputed_vectors_of_different_lengths_are_bad_input(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_catalog(data, n=3, with_media=False)
    (data / "embeddings").mkdir()
    pl.DataFrame({"item_id": ["i0", "i1", "i2"], "vector": [[1.0, 0.0], [0.0, 1.0], [1.0]]}).write_parquet(
        data / "embeddings" / "item_audio.parquet")
    encoders, _ = fake_encoders()
    with pytest.raises(InputError, match=r"item_audio.parquet, row 3, field 'vector': vector is missing or has a "
                                         r"different length"):
        run_embed(data, tmp_path / "art", encoders=encoders, show_progress=False)


def test_user_and_item_vectors_of_one_modality_with_other_dimensions_are_bad_input(tmp_path: Path) -> None:
    """A user's and an item's vectors of one modality are compared. Precomputed user vectors of
    another dimension than the items' (or item vectors of another dimension than the encoder
    gives the users' text) passed the embed stage, and the index stage failed on a matrix
    product: exit 1, "unexpected ValueError". Now the embed stage refuses them before any table
    lands (exit 2), naming the precomputed file and where the other side comes from; the index
    stage says the same of artifacts embedded before this check."""
    from fusionrec.pipeline.retrieval.stage import embeddings

    data = tmp_path / "data"
    write_catalog(data, n=4, with_media=False)
    pl.DataFrame({"user_id": ["u0", "u1"], "text": ["likes things", "likes items"]}).write_csv(data / "users.csv")
    (data / "embeddings").mkdir()
    items = pl.DataFrame({"item_id": [f"i{i}" for i in range(4)], "vector": np.eye(4, 6).tolist()})
    items.write_parquet(data / "embeddings" / "item_text.parquet")
    pl.DataFrame({"user_id": ["u0", "u1"], "vector": np.eye(2, 3).tolist()}).write_parquet(
        data / "embeddings" / "user_text.parquet")
    encoders, _ = fake_encoders(text_dim=8)
    art = tmp_path / "art"
    user_file, item_file = data / "embeddings" / "user_text.parquet", data / "embeddings" / "item_text.parquet"
    with pytest.raises(InputError) as refused:
        run_embed(data, art, encoders=encoders, show_progress=False)
    assert str(refused.value) == (
        f"{user_file}, field 'vector': the users' text vectors ({user_file}) have 3 numbers, the items' ({item_file}) "
        "6: a user's and an item's text vectors are compared, so they need one model and dimension: give the "
        "users and the items vectors of the same model (precomputed for both, or for neither)")
    assert refused.value.exit_code == 2 and not list((art / "embeddings").glob("*_text.parquet"))
    # Without the users' precomputed table their text is encoded (8 numbers), against the items' 6.
    user_file.unlink()
    with pytest.raises(InputError, match=rf"^{item_file}, field 'vector': the users' text vectors \(the text "
                                         rf"encoder hash-v1\) have 8 numbers, the items' \({item_file}\) 6: "):
        run_embed(data, art, encoders=encoders, show_progress=False)
    # Both sides of one dimension: accepted.
    pl.DataFrame({"user_id": ["u0", "u1"], "vector": np.eye(2, 6).tolist()}).write_parquet(user_file)
    run_embed(data, art, encoders=encoders, show_progress=False)
    assert set(embeddings(art)[1]) == {"text"}
    # Artifacts embedded before the check: the index stage names the artifact table.
    emb = art / "embeddings"
    pl.DataFrame({"id": [f"i{i}" for i in range(4)], "vector": np.eye(4, 5).tolist()}).write_parquet(
        emb / "item_text.parquet")
    with pytest.raises(InputError, match=rf"^{emb / 'user_text.parquet'}, field 'vector': the users' text vectors "
                                         rf"\({emb / 'user_text.parquet'}\) have 6 numbers, the items' "
                                         rf"\({emb / 'item_text.parquet'}\) 5: "):
        embeddings(art)


def test_a_second_job_on_the_same_artifacts_stops_and_a_stale_lock_is_taken_over(tmp_path: Path) -> None:
    write_catalog(tmp_path / "data", n=3)
    encoders, _ = fake_encoders()
    art = tmp_path / "art"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        art.mkdir()
        (art / ".lock").write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename}))
        with pytest.raises(LockError, match=rf"another fusionrec job \(pid {holder.pid} on .*\) is using"):
            run_embed(tmp_path / "data", art, encoders=encoders, show_progress=False)
    finally:
        holder.kill()
        holder.wait()
    # The holder is dead now: its lock is stale and the next job takes it over.
    lock = ArtifactLock(art).acquire()
    assert lock.taken_over_["pid"] == holder.pid
    lock.release()
    assert not (art / ".lock").exists()
    run_embed(tmp_path / "data", art, encoders=encoders, show_progress=False)
    assert not (art / ".lock").exists()


def test_tiny_transformers_encoder_through_the_configured_path(tmp_path: Path) -> None:
    from fusionrec.pipeline.encoders.text import TextEncoder

    model_dir = tiny_text_model(tmp_path / "tiny")
    encoder = TextEncoder(str(model_dir), device="cpu", batch_size=2)
    assert encoder.dim == 16 and encoder.model_id == str(model_dir)
    texts = ["ocean sea wave", "fire flame", "the ocean and the sea with blue water", "snow"]
    out = encoder.encode(texts)
    assert out.shape == (4, 16)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    # Length-sorted batching must not change a row's vector.
    alone = np.stack([encoder.encode([t])[0] for t in texts])
    np.testing.assert_allclose(out, alone, atol=1e-5)
    # Each batch of two tells the job's progress bar as it finishes.
    from fusionrec.pipeline.encoders.base import reporting_rows

    reports: list[int] = []
    with reporting_rows(reports.append):
        encoder.encode(texts[:3])
    assert reports == [2, 1]


def test_max_length_settings_the_model_caps_alike_reuse_the_vectors(tmp_path: Path) -> None:
    # The tiny model reads 64 positions: 100 and 1000 tokens both mean 64, so the second
    # setting finds every vector cached; 8 tokens is another preprocessing, so it re-encodes.
    write_catalog(tmp_path / "data", n=6, with_media=False)
    model = tiny_text_model(tmp_path / "tiny")
    encoded = []
    for max_length in (100, 1000, 8):
        cfg = load_config(overrides=[f"embed.text.model={model}", "embed.device=cpu",
                                     f"embed.text.max_length={max_length}", "embed.image.enabled=false",
                                     "embed.audio.enabled=false"])
        report = run_embed(tmp_path / "data", tmp_path / "art", cfg, show_progress=False)
        encoded.append(report.counts["item_text"].encoded)
    assert encoded == [6, 0, 6]


KILL_SCRIPT = r"""
import sys, time
from pathlib import Path
import numpy as np
sys.path.insert(0, {project!r})
from fusionrec.pipeline.config import load_config
from fusionrec.pipeline.embedding.job import ModalityEncoder, run_embed
from tests.tiny_models import HashEncoder

slow = HashEncoder(8, "hash-v1")
def encode(xs):
    time.sleep(float(sys.argv[3]))
    return slow.encode(xs)
cfg = load_config(overrides=["embed.shard_size=4"])
run_embed(Path(sys.argv[1]), Path(sys.argv[2]), cfg, show_progress=False,
          encoders={{"text": ModalityEncoder("hash-v1", 8, encode)}})
"""


def test_killed_run_resumes_and_gives_the_same_tables(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_catalog(data, n=40, with_media=False)
    script = tmp_path / "job.py"
    script.write_text(KILL_SCRIPT.format(project=str(PROJECT)))
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run([sys.executable, str(script), str(data), str(clean), "0"], check=True)

    job = subprocess.Popen([sys.executable, str(script), str(data), str(killed), "0.3"])
    shards = killed / "embeddings" / ".shards" / "item_text"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(shards.glob("shard-*.parquet"))) < 3:
        time.sleep(0.05)
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    finished = len(list(shards.glob("shard-*.parquet")))
    assert 3 <= finished < 10, "the job was not killed mid-way"
    assert not (killed / "embeddings" / "item_text.parquet").exists()  # no partial final table

    subprocess.run([sys.executable, str(script), str(data), str(killed), "0"], check=True)
    counts = read_manifest(killed)["runs"][-1]["counts"]["item_text"]
    # Finished shards of the killed run are not encoded again.
    assert (counts["resumed"], counts["encoded"]) == (4 * finished, 40 - 4 * finished)
    a = pq.read_table(clean / "embeddings" / "item_text.parquet")
    b = pq.read_table(killed / "embeddings" / "item_text.parquet")
    assert a.equals(b)
    leftovers = [p for p in killed.rglob("*") if p.name.startswith(".tmp-") or p.name == ".shards"]
    assert leftovers == []


def test_each_progress_timer_stops_when_its_step_ends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """'read items 10/10 0:00:01' must not keep counting while the encoders run."""
    import io

    from rich.console import Console
    from rich.progress import Progress

    from fusionrec.pipeline.embedding import job

    bars: list[Progress] = []

    def recording(show: bool) -> Progress:
        bar = Progress(console=Console(file=io.StringIO()))
        bars.append(bar)
        return bar

    monkeypatch.setattr(job, "_progress", recording)
    write_catalog(tmp_path / "data")
    encoders, _ = fake_encoders()
    run_embed(tmp_path / "data", tmp_path / "art", encoders=encoders, show_progress=True)
    tasks = bars[0].tasks
    assert [t.description for t in tasks] == ["read items", "item text", "item image"]
    assert all(t.stop_time is not None for t in tasks)
    assert all(t.completed == 10 for t in tasks)
    # The read step's timer stopped before the encoders' steps began.
    assert tasks[0].stop_time <= tasks[1].start_time


def test_shard_size_zero_is_256_rows_and_4096_texts_on_a_gpu(tmp_path: Path) -> None:
    from fusionrec.pipeline.config import EmbedConfig
    from fusionrec.pipeline.embedding.encoding import shard_rows

    default = EmbedConfig()
    assert default.shard_size == 0
    assert (shard_rows(default, "cpu"), shard_rows(default, "cuda"), shard_rows(default, "cuda:1")) == (256, 4096, 4096)
    # Media shards hold their decoded inputs together: 256 on a GPU too.
    assert (shard_rows(default, "cuda", media=True), shard_rows(default, "cpu", media=True)) == (256, 256)
    assert shard_rows(default, None) == 256  # an encoder given in-process: taken as the CPU
    assert (shard_rows(EmbedConfig(shard_size=8), "cuda"), shard_rows(EmbedConfig(shard_size=8), "cpu")) == (8, 8)

    # The job on the CPU commits 600 new texts as shards of 256, 256 and 88 rows.
    write_catalog(tmp_path / "data", n=600, with_media=False)
    sizes: list[int] = []
    text = HashEncoder(8, "hash-v1")

    def encode(inputs: list) -> np.ndarray:
        sizes.append(len(inputs))
        return text.encode(inputs)

    cfg = load_config(overrides=["embed.device=cpu"])
    run_embed(tmp_path / "data", tmp_path / "art", cfg, encoders={"text": ModalityEncoder("hash-v1", 8, encode)},
              show_progress=False)
    assert sizes == [256, 256, 88]
    assert last_counts(tmp_path / "art")["item_text"]["encoded"] == 600


def test_an_encoder_given_in_process_never_imports_torch_for_its_shard_size(tmp_path: Path) -> None:
    # embed.device is "auto": resolving it would import torch (450 MB and seconds) for a numpy encoder.
    write_catalog(tmp_path / "data", n=3, with_media=False)
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from fusionrec.pipeline.embedding.job import ModalityEncoder, run_embed\n"
        "from tests.tiny_models import HashEncoder\n"
        "text = HashEncoder(8, 'hash-v1')\n"
        f"run_embed(Path({str(tmp_path / 'data')!r}), Path({str(tmp_path / 'art')!r}), "
        "encoders={'text': ModalityEncoder('hash-v1', 8, text.encode)}, show_progress=False)\n"
        "print(text.rows, 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(PROJECT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["3", "False"]


def test_the_next_shard_is_decoded_while_the_encoder_works_on_this_one(tmp_path: Path) -> None:
    # Shards of 4 images. The first encode call waits until a file of the second shard is being
    # decoded: with read-ahead that happens (the wait returns True), decoding after encoding would not.
    import threading

    data = tmp_path / "data"
    write_catalog(data, n=12)
    encoders, _ = fake_encoders()
    image = HashEncoder(8, "hash-image")
    second_shard_started = threading.Event()
    real_prepare = encoders["image"].prepare
    assert real_prepare is not None
    seen: list[bool] = []

    def prepare(path: Path) -> bytes:
        if path.name in {"i4.bin", "i5.bin", "i6.bin", "i7.bin"}:
            second_shard_started.set()
        return real_prepare(path)

    def encode(inputs: list) -> np.ndarray:
        if not seen:
            seen.append(second_shard_started.wait(timeout=5 if waits else 0.5))
        return image.encode(inputs)

    encoders["image"].prepare, encoders["image"].encode = prepare, encode
    waits = True
    cfg = load_config(overrides=["embed.shard_size=4", "embed.decode_workers=1", "embed.read_ahead_shards=1"])
    run_embed(data, tmp_path / "art", cfg, encoders=encoders, show_progress=False)
    assert seen == [True]
    assert image.rows == 12

    # read_ahead_shards = 0 (auto's value for an encoder given in-process, taken as the CPU):
    # the second shard is decoded only after the first is encoded.
    seen.clear()
    second_shard_started.clear()
    waits = False
    cfg = load_config(overrides=["embed.shard_size=4", "embed.decode_workers=1"])
    run_embed(data, tmp_path / "art0", cfg, encoders=encoders, show_progress=False)
    assert seen == [False]


def test_read_ahead_auto_is_one_shard_on_a_gpu_and_none_on_the_cpu() -> None:
    from fusionrec.pipeline.config import EmbedConfig
    from fusionrec.pipeline.embedding.encoding import read_ahead_shards

    auto = EmbedConfig()
    assert auto.read_ahead_shards == "auto"
    assert [read_ahead_shards(auto, d) for d in ("cuda", "cuda:1", "cpu", None)] == [1, 1, 0, 0]
    assert [read_ahead_shards(EmbedConfig(read_ahead_shards=n), "cpu") for n in (0, 2)] == [0, 2]
    for bad in ("-1", "soon", "1.5"):
        with pytest.raises(ConfigError, match=r"config key 'embed.read_ahead_shards': should be 'auto' or a whole "
                                              r"number >= 0, got"):
            load_config(overrides=[f"embed.read_ahead_shards={bad}"])


def test_read_ahead_gives_the_same_tables_and_failures(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_catalog(data, n=23)
    for i in (3, 9, 22):
        (data / "media" / f"i{i}.bin").write_bytes(b"corrupt jpeg")
    tables = []
    for depth in (0, 1, 3):
        art = tmp_path / f"art{depth}"
        encoders, _ = fake_encoders()
        cfg = load_config(overrides=["embed.shard_size=5", f"embed.read_ahead_shards={depth}"])
        run_embed(data, art, cfg, encoders=encoders, show_progress=False)
        ids, hashes, models, vectors = read_artifact_table(art / "embeddings" / "item_image.parquet")
        tables.append((ids, hashes, models, vectors.tobytes(), failure_rows(art)))
    assert tables[0] == tables[1] == tables[2]
    failed = pl.read_parquet(tmp_path / "art1" / "embeddings" / "failures.parquet")["id"].sort().to_list()
    assert failed == ["i22", "i3", "i9"]
    assert len(tables[0][0]) == 20


def test_an_encoder_error_stops_the_read_ahead_thread_and_keeps_finished_shards(tmp_path: Path) -> None:
    import threading

    data = tmp_path / "data"
    write_catalog(data, n=40)
    encoders, _ = fake_encoders()
    image = HashEncoder(8, "hash-image")
    real_prepare = encoders["image"].prepare
    assert real_prepare is not None
    decoded: list[str] = []

    def prepare(path: Path) -> bytes:
        decoded.append(path.name)
        return real_prepare(path)

    def encode(inputs: list) -> np.ndarray:
        if image.calls == 2:
            raise FusionrecError("the encoder ran out of memory")
        return image.encode(inputs)

    encoders["image"].prepare, encoders["image"].encode = prepare, encode
    cfg = load_config(overrides=["embed.shard_size=4", "embed.read_ahead_shards=1"])
    with pytest.raises(FusionrecError, match="ran out of memory"):
        run_embed(data, tmp_path / "art", cfg, encoders=encoders, show_progress=False)
    assert not [t for t in threading.enumerate() if t.name == "read-ahead"]
    # Shards 1 and 2 encoded, 3 failed; 4 decoded meanwhile at most (one shard ahead): never the 40 files.
    assert 12 <= len(decoded) <= 16
    shards = list((tmp_path / "art" / "embeddings" / ".shards").glob("item_image/shard-*.parquet"))
    assert len(shards) == 2  # the finished shards stay for the rerun


def test_an_error_while_reading_ahead_is_raised_at_its_shard() -> None:
    import threading

    from fusionrec.pipeline.embedding.job import _read_ahead

    def make(stop: threading.Event):
        yield "first"
        raise OSError("todo table unreadable")

    got = []
    with pytest.raises(OSError, match="todo table unreadable"):
        for item in _read_ahead(make, 2):
            got.append(item)
    assert got == ["first"]


@pytest.mark.parametrize("depth", [1, 2])
def test_read_ahead_decodes_at_most_its_depth_of_shards_beyond_the_one_being_encoded(depth: int) -> None:
    import threading

    from fusionrec.pipeline.embedding.job import _read_ahead

    prepared: list[int] = []

    def make(stop: threading.Event):
        for i in range(8):
            prepared.append(i)  # shard i is being decoded (and held until the encoder takes it)
            yield i

    shards = _read_ahead(make, depth)
    assert next(shards) == 0  # the encoder works on shard 0 ...
    deadline = time.monotonic() + 5
    while len(prepared) < depth + 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # ... long enough for the thread to decode more, were it allowed
    assert prepared == list(range(depth + 1))  # `depth` shards ahead, not depth + 1 (memory)
    assert next(shards) == 1
    deadline = time.monotonic() + 5
    while len(prepared) < depth + 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    assert prepared == list(range(depth + 2))
    assert list(shards) == list(range(2, 8))


class RecordingBar:
    """Stands in for the rich bar: records every advance with the encoder calls made so far."""

    def __init__(self, encoders: list[HashEncoder]) -> None:
        self.encoders, self.advances = encoders, []

    def __enter__(self) -> RecordingBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, description: str, total: int) -> str:
        return description

    def advance(self, task: str, n: int) -> None:
        self.advances.append((task, n, sum(e.calls for e in self.encoders)))

    def stop_task(self, task: str) -> None:
        return None


def test_the_bar_moves_batch_by_batch_within_a_shard(tmp_path: Path, monkeypatch) -> None:
    """A shard on the CPU can take a minute (195 clips of audio on the sample), so the encoder's
    batches move the bar as they finish; failures and the rest still count once, exactly."""
    from fusionrec.pipeline.embedding import job
    from fusionrec.pipeline.encoders.base import rows_done

    data = tmp_path / "data"
    write_catalog(data)
    (data / "media" / "i1.bin").write_bytes(b"corrupt jpeg")
    text, image = HashEncoder(8, "hash-v1"), HashEncoder(8, "hash-image")

    def in_batches_of_three(encoder: HashEncoder):
        def encode(inputs: list) -> np.ndarray:
            out = encoder.encode(inputs)
            for start in range(0, len(inputs), 3):
                rows_done(len(inputs[start:start + 3]))
            return out
        return encode

    prepare = fake_encoders()[0]["image"].prepare  # raises MediaError for a corrupt file
    encoders = {"text": ModalityEncoder(text.model_id, text.dim, in_batches_of_three(text)),
                "image": ModalityEncoder(image.model_id, image.dim, in_batches_of_three(image), prepare=prepare)}
    bar = RecordingBar([text, image])
    monkeypatch.setattr(job, "_progress", lambda show: bar)
    report = run_embed(data, tmp_path / "art", encoders=encoders)

    item_text = [(n, calls) for task, n, calls in bar.advances if task == "item text"]
    item_image = [(n, calls) for task, n, calls in bar.advances if task == "item image"]
    assert text.calls == 1 and image.calls == 1  # one shard each: 10 rows, under 256
    # Ten text rows in one encode call, reported 3, 3, 3, 1 as its batches finish.
    assert [(n, calls) for n, calls in item_text if n] == [(3, 1), (3, 1), (3, 1), (1, 1)]
    assert sum(n for n, _ in item_text) == 10
    # Nine images decode and are reported by the encoder (3, 3, 3); the corrupt one is counted
    # when its shard arrives, so the bar still ends at the table's rows.
    assert [n for n, _ in item_image if n] == [3, 3, 3, 1]
    assert sum(n for n, _ in item_image) == 10 and report.counts["item_image"].failed == 1
