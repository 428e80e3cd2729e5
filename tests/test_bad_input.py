"""Bad input through the CLI: every case exits 2 naming the file, row and field, and the
artifacts a good run stored before are left byte for byte as they were.

Media are different: one unusable file is never fatal. The job exits 0, the item is kept
(served from its other modalities) and `failures.parquet` says what was wrong.

Loader-level messages are unit-tested in test_tables.py; here each case goes through the
command a user runs (`embed`, `index`, `run`, `score`, `recommend`, `evaluate`), on top of
a complete artifacts directory. Fast: a tiny random BERT, a random MobileNetV2 and a tiny
wav2vec2 stand in for the real encoders.
"""

from __future__ import annotations

import re
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from fusionrec.cli import app
from fusionrec.pipeline.embedding.job import read_artifact_table
from tests.reliability_counts import digests, small_catalog, temporaries
from tests.tiny_models import tiny_text_model


def invoke(*args: str | Path):
    return CliRunner().invoke(app, [str(a) for a in args])


def flat(text: str) -> str:
    return " ".join(text.split())


@dataclass
class Good:
    data: Path
    art: Path
    text_model: Path

    def opts(self) -> list[str]:
        return ["--set", f"embed.text.model={self.text_model}", "--set", "embed.image.enabled=false",
                "--set", "embed.audio.enabled=false", "-q"]


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Good:
    """A data directory and the complete artifacts of a clean run on it."""
    work = tmp_path_factory.mktemp("bad_input")
    g = Good(small_catalog(work / "data", 1), work / "art", tiny_text_model(work / "bert"))
    result = invoke("run", "--data", g.data, "--out", g.art, *g.opts())
    assert result.exit_code == 0, result.output
    return g


def copy_data(good: Good, tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(good.data, data)
    return data


def _replace_cell(frame: pl.DataFrame, row: int, column: str, value) -> pl.DataFrame:
    """`frame` with the cell of 1-based data `row` in `column` set to `value`."""
    return frame.with_columns(pl.when(pl.int_range(pl.len()) == row - 1).then(pl.lit(value))
                              .otherwise(pl.col(column)).alias(column))


# Each case: (name, table file to write, how to make it from the good data dir, command, expected message).
# The expected message is a regex over the whitespace-normalised output.
def _items(d: Path) -> pl.DataFrame:
    return pl.read_csv(d / "items.csv", infer_schema=False)


def _users(d: Path) -> pl.DataFrame:
    return pl.read_csv(d / "users.csv", infer_schema=False)


def _inter(d: Path) -> pl.DataFrame:
    return pl.read_csv(d / "interactions.csv", infer_schema=False)


def _csv_text(frame: pl.DataFrame) -> str:
    return frame.write_csv()


def _header(table: str, old: str, new: str):
    """A maker: the good `table` with `old` replaced by `new` in its header line, the rows as they are."""
    def make(d: Path) -> str:
        head, rows = (d / table).read_text().split("\n", 1)
        assert old in head, head
        return head.replace(old, new, 1) + "\n" + rows
    return make


TABLE_CASES = [
    # items.csv / items.parquet
    ("items: no item_id column", "items.csv", lambda d: _items(d).rename({"item_id": "id"}), "embed",
     r"items\.csv, field 'item_id': required column is missing"),
    ("items: duplicate id", "items.csv", lambda d: pl.concat([_items(d), _items(d)[4]]), "embed",
     r"items\.csv, row 61, field 'item_id': duplicate id 'i0005' \(first on row 5\)"),
    ("items: empty id", "items.csv", lambda d: _replace_cell(_items(d), 9, "item_id", ""), "embed",
     r"items\.csv, row 9, field 'item_id': missing id"),
    ("items: float ids (Parquet)", "items.parquet",
     lambda d: _items(d).with_columns(pl.int_range(pl.len()).cast(pl.Float64).alias("item_id")), "embed",
     r"items\.parquet, row 1, field 'item_id': expected text, found Float64"),
    ("items: list titles (Parquet)", "items.parquet",
     lambda d: _items(d).with_columns(pl.concat_list("title", "brand").alias("title")), "embed",
     r"items\.parquet, row 1, field 'title': expected text, found List\(String\)"),
    ("items: empty file", "items.csv", lambda d: b"", "embed", r"items\.csv: the file is empty"),
    ("items: header only", "items.csv", lambda d: b"item_id,title\n", "embed", r"items\.csv: the table has no rows"),
    ("items: huge description", "items.csv",
     lambda d: _replace_cell(_items(d), 7, "description", "sea " * 250_001), "embed",
     r"items\.csv, row 7, field 'description': text longer than 1,000,000 characters"),
    ("items: invalid UTF-8", "items.csv",
     lambda d: _csv_text(_replace_cell(_items(d), 10, "title", "MARKER")).encode().replace(b"MARKER", b"Caf\xe9 au lait"),
     "embed", r"items\.csv, row 10, field 'title': invalid UTF-8 at byte \d+ \(line 11\)"),
    ("items: Latin-1 file", "items.csv", lambda d: "item_id,title\ni1,Crème brûlée\n".encode("latin-1"), "embed",
     r"items\.csv, row 1, field 'title': invalid UTF-8"),
    ("items: unclosed quote", "items.csv",
     lambda d: _csv_text(_replace_cell(_items(d), 12, "title", "MARKER")).replace("MARKER", '"An open quote'),
     "embed", r"items\.csv, row 12, field 'title': cannot parse the table: stray quote"),
    ("items: text after a closing quote", "items.csv",
     lambda d: _csv_text(_replace_cell(_items(d), 15, "tags", "MARKER")).replace("MARKER", '"sea"|surf'),
     "embed", r"items\.csv, row 15, field 'tags': cannot parse the table: stray quote: text after the closing quote"),
    ("items: a row with an extra cell", "items.csv",
     lambda d: _csv_text(_items(d)).replace("\ni0020,", "\ni0020,extra,", 1), "embed",
     r"items\.csv, row 20: cannot parse the table: 7 cells, but the header names 6 columns"),
    ("items: a column named twice", "items.csv", _header("items.csv", "title,description", "title,title"), "embed",
     r"items\.csv, field 'title': the header row names column 'title' twice \(columns 2 and 3\)"),
    ("items: an invisible character in the id column's name", "items.csv",
     _header("items.csv", "item_id", "item_id\u200b"), "embed",
     r"items\.csv, field 'item_id': required column is missing \(columns: 'item_id\\u200b', 'title', "),
    # users
    ("users: a column named twice once its name is trimmed", "users.csv",
     _header("users.csv", "user_id,text", "user_id,user_id "), "embed",
     r"users\.csv, field 'user_id': the header row names column 'user_id' twice "
     r"\(columns 1 and 2: 'user_id' and 'user_id '\)"),
    ("users: duplicate id", "users.csv", lambda d: pl.concat([_users(d), _users(d)[2]]), "embed",
     r"users\.csv, row 121, field 'user_id': duplicate id"),
    ("users: no user_id column", "users.csv", lambda d: _users(d).rename({"user_id": "user"}), "embed",
     r"users\.csv, field 'user_id': required column is missing"),
    ("users: huge profile text", "users.csv",
     lambda d: _replace_cell(_users(d), 4, "text", "x" * 1_000_001), "embed",
     r"users\.csv, row 4, field 'text': text longer than 1,000,000 characters"),
    # interactions (read by the index stage)
    ("interactions: no timestamp column", "interactions.csv", lambda d: _inter(d).drop("timestamp"), "index",
     r"interactions\.csv, field 'timestamp': required column is missing"),
    ("interactions: unparsable timestamp", "interactions.csv",
     lambda d: _replace_cell(_inter(d), 30, "timestamp", "yesterday"), "index",
     r"interactions\.csv, row 30, field 'timestamp': cannot read timestamp 'yesterday'"),
    ("interactions: impossible date", "interactions.csv",
     lambda d: _replace_cell(_inter(d), 31, "timestamp", "2024-13-45T10:00:00"), "index",
     r"interactions\.csv, row 31, field 'timestamp': cannot read timestamp '2024-13-45T10:00:00'"),
    ("interactions: empty timestamp", "interactions.csv",
     lambda d: _replace_cell(_inter(d), 32, "timestamp", ""), "index",
     r"interactions\.csv, row 32, field 'timestamp': empty timestamp: every interaction needs one"),
    ("interactions: unknown item", "interactions.csv",
     lambda d: _replace_cell(_inter(d), 40, "item_id", "no-such-item"), "index",
     r"interactions\.csv, row 40, field 'item_id': item 'no-such-item' is not in the items table"),
    ("interactions: value not a number", "interactions.csv",
     lambda d: _replace_cell(_inter(d), 41, "value", "lots"), "index",
     r"interactions\.csv, row 41, field 'value': expected a number, found 'lots'"),
    ("interactions: missing user", "interactions.csv",
     lambda d: _replace_cell(_inter(d), 3, "user_id", " "), "index",
     r"interactions\.csv, row 3, field 'user_id': missing id"),
    ("interactions: boolean timestamps (Parquet)", "interactions.parquet",
     lambda d: _inter(d).with_columns(pl.lit(True).alias("timestamp")), "index",
     r"interactions\.parquet, row 1, field 'timestamp': expected Unix seconds or ISO-8601, found Boolean"),
    ("interactions: a column named twice", "interactions.csv",
     _header("interactions.csv", "event,value", "event,timestamp"), "index",
     r"interactions\.csv, field 'timestamp': the header row names column 'timestamp' twice \(columns 3 and 5\)"),
    ("interactions: empty file", "interactions.csv", lambda d: b"", "index", r"interactions\.csv: the file is empty"),
    ("interactions: invalid UTF-8", "interactions.csv",
     lambda d: _csv_text(_replace_cell(_inter(d), 50, "event", "MARKER")).encode().replace(b"MARKER", b"vi\xffew"),
     "index", r"interactions\.csv, row 50, field 'event': invalid UTF-8"),
    # precomputed embeddings
    ("precomputed: NaN in a vector", "embeddings/item_audio.parquet",
     lambda d: pl.DataFrame({"item_id": _items(d)["item_id"],
                             "vector": [[1.0, float("nan") if i == 4 else 0.0] for i in range(_items(d).height)]}),
     "embed", r"item_audio\.parquet, row 5, field 'vector': vector contains NaN or infinity"),
    ("precomputed: not a Parquet file", "embeddings/item_audio.parquet", lambda d: b"PAR1 but not really", "embed",
     r"item_audio\.parquet: cannot read precomputed embeddings"),
]


def _make(data: Path, name: str, make) -> None:
    content = make(data)
    (data / name).parent.mkdir(parents=True, exist_ok=True)
    if name.endswith(".parquet") and isinstance(content, pl.DataFrame):
        if "/" not in name:
            (data / name.replace(".parquet", ".csv")).unlink(missing_ok=True)
        content.write_parquet(data / name)
    elif isinstance(content, pl.DataFrame):
        content.write_csv(data / name)
    else:
        (data / name).write_bytes(content if isinstance(content, bytes) else content.encode())


@pytest.mark.parametrize(("case", "table", "make", "command", "expected"), TABLE_CASES,
                         ids=[c[0] for c in TABLE_CASES])
def test_bad_table_exits_2_naming_file_row_and_field(good: Good, tmp_path: Path, reliability, case: str, table: str,
                                                      make, command: str, expected: str) -> None:
    data = copy_data(good, tmp_path)
    _make(data, table, make)
    before = digests(good.art)
    result = invoke(command, "--data", data, "--out", good.art, *good.opts())
    after = digests(good.art)
    lost = sorted(name for name in before if after.get(name) != before[name])
    reliability.record(bad_inputs=1, data_lost=len(lost), case=f"bad input: {case}")
    assert result.exit_code == 2, result.output
    assert re.search(expected, flat(result.output)), result.output
    assert flat(result.output).startswith("error: ") and "Traceback" not in result.output
    assert lost == [] and after == before and temporaries(good.art) == []


def test_header_names_are_trimmed_of_white_space(good: Good, tmp_path: Path) -> None:
    """Stray spaces around the names in a CSV header (ids in cells are trimmed too) are no error:
    the tables read as the clean ones, the descriptions feeding the text vectors as before."""
    data = copy_data(good, tmp_path)
    for table, old, new in (("items.csv", "item_id,title,description", " item_id ,\ttitle,description  "),
                            ("users.csv", "user_id,text", "user_id , text"),
                            ("interactions.csv", "user_id,item_id,timestamp", " user_id,item_id , timestamp")):
        _make(data, table, _header(table, old, new))
    art = tmp_path / "art"
    for command in ("embed", "index"):
        result = invoke(command, "--data", data, "--out", art, *good.opts())
        assert result.exit_code == 0, result.output
    for table in ("item_text", "user_text"):
        ids, _, _, vectors = read_artifact_table(art / "embeddings" / f"{table}.parquet")
        good_ids, _, _, good_vectors = read_artifact_table(good.art / "embeddings" / f"{table}.parquet")
        assert ids == good_ids
        np.testing.assert_allclose(vectors, good_vectors, atol=1e-6)


def test_the_nightly_job_stops_on_bad_interactions_and_keeps_the_served_artifacts(good: Good, tmp_path: Path,
                                                                                  reliability) -> None:
    art = tmp_path / "art"
    shutil.copytree(good.art, art)
    data = copy_data(good, tmp_path)
    _make(data, "interactions.csv", lambda d: _replace_cell(_inter(d), 12, "item_id", "gone"))
    before = digests(art)
    result = invoke("run", "--data", data, "--out", art, *good.opts())
    assert result.exit_code == 2
    assert "interactions.csv, row 12, field 'item_id': item 'gone' is not in the items table" in flat(result.output)
    after = digests(art)
    # Every table is validated before any stage runs: nothing in the artifacts changes.
    changed = sorted(name for name in before if after.get(name) != before[name])
    reliability.record(bad_inputs=1, data_lost=len(changed), case="bad input: run")
    assert changed == []
    assert not (art / ".lock").exists() and temporaries(art) == []


PAIR_CASES = [
    ("score: empty id", "score", "pairs.csv", "user_id,item_id\nu0001,i0001\nu0002,\n",
     r"pairs\.csv, row 2, field 'item_id': empty id"),
    ("score: empty file", "score", "pairs.csv", "", r"pairs\.csv: the file is empty"),
    ("score: unsupported format", "score", "pairs.txt", "user_id,item_id\nu,i\n",
     r"pairs\.txt: unsupported format '\.txt': use \.parquet, \.csv or \.jsonl"),
    ("score: broken JSON lines", "score", "pairs.jsonl", '{"user_id": "u0001", "item_id": "i0001"}\n{"user_id": \n',
     r"pairs\.jsonl, row 2: cannot read the file: not valid JSON: Expecting value at character 14 of the line"),
    ("recommend: users file without user_id", "recommend", "users.csv", "user\nu0001\n",
     r"users\.csv, field 'user_id': missing required column 'user_id'"),
    ("evaluate: unparsable timestamp", "evaluate", "test.csv",
     "user_id,item_id,timestamp\nu0001,i0001,1719786864\nu0002,i0002,tomorrow\n",
     r"test\.csv, row 2, field 'timestamp': cannot read timestamp 'tomorrow'"),
]


@pytest.mark.parametrize(("case", "command", "name", "content", "expected"), PAIR_CASES,
                         ids=[c[0] for c in PAIR_CASES])
def test_bad_files_given_to_the_serving_commands(good: Good, tmp_path: Path, reliability, case: str, command: str,
                                                 name: str, content: str, expected: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    out = tmp_path / "out.csv"
    args = {"score": ["--candidates", path, "--export", out],
            "recommend": ["--users", path, "--export", out],
            "evaluate": ["--test", path, "--no-baselines"]}[command]
    before = digests(good.art)
    result = invoke(command, "--out", good.art, *args, "-q")
    lost = sorted(n for n, d in before.items() if digests(good.art).get(n) != d)
    reliability.record(bad_inputs=1, data_lost=len(lost), case=f"bad input: {case}")
    assert result.exit_code == 2, result.output
    assert re.search(expected, flat(result.output)), result.output
    assert not out.exists() and lost == []


# --------------------------------------------------------------------------- media


def png_header_only(w: int, h: int) -> bytes:
    """A PNG claiming w x h pixels in a few dozen bytes (an image bomb)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


SR = 16000


def tone(seconds: float, freq: float = 440.0, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    noise = np.random.default_rng(seed).normal(0, 0.01, t.size)
    return (0.3 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 0.5 * t)) + noise).astype(np.float32)


def tiny_wav2vec2(folder: Path) -> Path:
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    torch.manual_seed(0)
    config = Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                            conv_dim=(16, 16, 16), conv_stride=(5, 4, 4), conv_kernel=(10, 8, 4),
                            num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
                            feat_extract_norm="layer", do_stable_layer_norm=True, vocab_size=8)
    Wav2Vec2Model(config).save_pretrained(folder, safe_serialization=True)
    Wav2Vec2FeatureExtractor(sampling_rate=SR, do_normalize=True, return_attention_mask=True).save_pretrained(folder)
    return folder


# (item id, column, relative path, what the error in failures.parquet says; None: encoded fine)
MEDIA_CASES = [
    ("ok_image", "image", "media/ok.png", None),
    ("truncated_jpeg", "image", "media/cut.jpg", "truncated or corrupt"),
    ("zero_byte_image", "image", "media/empty.jpg", "empty (0 bytes)"),
    ("text_named_png", "image", "media/notes.png", "not a recognised image format"),
    ("image_bomb", "image", "media/bomb.png", "too large"),
    ("huge_dimensions", "image", "media/huge.png", "pixels > max_pixels"),
    ("directory_named_png", "image", "media/folder.png", "not a regular file"),
    ("missing_image", "image", "media/nowhere.png", "file not found"),
    ("escaping_path", "image", "../secret.png", "path leads outside the data directory"),
    ("symlink_outside", "image", "media/link.png", "symlink points outside the data directory"),
    ("absolute_path", "image", "/etc/hostname", "absolute path refused"),
    ("ok_audio", "audio", "media/ok.wav", None),
    ("text_named_wav", "audio", "media/notes.wav", "not an audio file (contents are text)"),
    ("garbage_wav", "audio", "media/garbage.wav", "could not decode audio file"),
    ("zero_byte_audio", "audio", "media/empty.wav", "empty (0 bytes)"),
    ("silent_audio", "audio", "media/silent.wav", "audio is silent"),
    ("png_named_mp3", "audio", "media/picture.mp3", "could not decode audio file"),
    ("very_long_audio", "audio", "media/long.wav", None),
    ("first_seconds_of_it", "audio", "media/long_head.wav", None),
]


@pytest.fixture(scope="module")
def media_run(good: Good, tmp_path_factory: pytest.TempPathFactory):
    import soundfile as sf
    from PIL import Image

    work = tmp_path_factory.mktemp("media")
    data, media = work / "data", work / "data" / "media"
    media.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(media / "ok.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(work / "full.jpg", quality=90)
    jpeg = (work / "full.jpg").read_bytes()
    (media / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (media / "empty.jpg").write_bytes(b"")
    (media / "notes.png").write_text("this is a shopping list, not a picture\n")
    (media / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
    (media / "huge.png").write_bytes(png_header_only(9_000, 9_000))  # under Pillow's guard, over max_pixels
    (media / "folder.png").mkdir()
    (work / "secret.png").write_bytes((media / "ok.png").read_bytes())
    (media / "link.png").symlink_to(work / "secret.png")
    sf.write(media / "ok.wav", tone(1.0), SR)
    (media / "notes.wav").write_text("RIFF? no: just a text file with a .wav name\n")
    (media / "garbage.wav").write_bytes(bytes(rng.integers(0, 256, 4000, dtype=np.uint8)))
    (media / "empty.wav").write_bytes(b"")
    sf.write(media / "silent.wav", np.zeros(SR, dtype=np.float32), SR)
    (media / "picture.mp3").write_bytes((media / "ok.png").read_bytes())
    long = tone(180.0, freq=330.0, seed=1)  # three minutes; the job reads the first max_seconds only
    sf.write(media / "long.wav", long, SR, subtype="FLOAT")
    sf.write(media / "long_head.wav", long[: 5 * SR], SR, subtype="FLOAT")
    rows = [{"item_id": item, "title": f"ocean sea wave {i}", column: path} for i, (item, column, path, _)
            in enumerate(MEDIA_CASES)]
    pl.DataFrame(rows, schema={"item_id": pl.String, "title": pl.String, "image": pl.String, "audio": pl.String}) \
        .write_csv(data / "items.csv")
    art = work / "art"
    opts = ["--set", f"embed.text.model={good.text_model}", "--set", "embed.image.weights=none",
            "--set", "embed.image.max_pixels=50000000", "--set", f"embed.audio.model={tiny_wav2vec2(work / 'w2v2')}",
            "--set", "embed.audio.max_seconds=5", "--set", "embed.max_failed_share=0.9", "-q"]
    result = invoke("embed", "--data", data, "--out", art, *opts)
    return result, art


def test_unusable_media_are_recorded_and_the_items_kept(media_run, reliability) -> None:
    result, art = media_run
    assert result.exit_code == 0, result.output
    failures = pl.read_parquet(art / "embeddings" / "failures.parquet")
    errors = {(r["id"], r["modality"]): r for r in failures.iter_rows(named=True)}
    for item, column, path, expected in MEDIA_CASES:
        if expected is None:
            assert (item, column) not in errors, errors.get((item, column))
            continue
        reliability.record(bad_inputs=1, case=f"bad media: {item}")
        assert (item, column) in errors, f"{item} ({path}) is not in failures.parquet"
        assert expected in errors[(item, column)]["error"], errors[(item, column)]
        assert errors[(item, column)]["path"] == path and errors[(item, column)]["kind"] == "item"
    assert len(errors) == sum(e is not None for *_, e in MEDIA_CASES)
    # Every item is kept, served from its text; only the usable media were embedded.
    text_ids = read_artifact_table(art / "embeddings" / "item_text.parquet")[0]
    assert sorted(text_ids) == sorted(c[0] for c in MEDIA_CASES)
    image_ids = read_artifact_table(art / "embeddings" / "item_image.parquet")[0]
    audio_ids = read_artifact_table(art / "embeddings" / "item_audio.parquet")[0]
    assert image_ids == ["ok_image"]
    assert sorted(audio_ids) == ["first_seconds_of_it", "ok_audio", "very_long_audio"]
    # The failures of a modality are summed up in one warning line naming the first (failures.parquet has each).
    for column in ("image", "audio"):
        bad = [item for item, c, _, expected in MEDIA_CASES if c == column and expected is not None]
        assert flat(result.output).count(f"item {column} files could not be used") == 1
        assert f"{len(bad)} item {column} files could not be used (first: item {bad[0]}: " in flat(result.output)


def test_very_long_audio_is_cut_at_max_seconds_not_failed(media_run) -> None:
    _, art = media_run
    ids, _, _, vectors = read_artifact_table(art / "embeddings" / "item_audio.parquet")
    by_id = dict(zip(ids, vectors))
    # Three minutes of audio embed exactly as their first five seconds: the rest was never decoded.
    np.testing.assert_allclose(by_id["very_long_audio"], by_id["first_seconds_of_it"], atol=1e-5)
    assert float(by_id["very_long_audio"] @ by_id["ok_audio"]) < 0.9999
