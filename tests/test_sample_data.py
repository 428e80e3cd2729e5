"""The shipped sample in data/: contract, media, theme consistency, size, determinism."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import polars as pl
import pytest
import soundfile as sf
from PIL import Image

DATA = Path(__file__).resolve().parents[1] / "data"
TABLES = ("items.csv", "users.csv", "interactions.csv", "themes.json")
MAX_BYTES = 5 * 1024 * 1024


def _load_generator() -> ModuleType:
    # data/ is not a package; load the script by path without leaving a __pycache__ in data/.
    name = "fusionrec_sample_generator"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, DATA / "make_sample.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve string annotations through it
    old, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = old
    return module


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    return _load_generator()


@pytest.fixture(scope="module")
def items() -> pl.DataFrame:
    return pl.read_csv(DATA / "items.csv")


@pytest.fixture(scope="module")
def users() -> pl.DataFrame:
    return pl.read_csv(DATA / "users.csv")


@pytest.fixture(scope="module")
def inter() -> pl.DataFrame:
    return pl.read_csv(DATA / "interactions.csv")


@pytest.fixture(scope="module")
def truth() -> dict:
    return json.loads((DATA / "themes.json").read_text())


@pytest.fixture(scope="module")
def labelled(inter: pl.DataFrame, truth: dict) -> pl.DataFrame:
    """Interactions with the item's theme and whether it is among the user's favourites."""
    favs = pl.DataFrame({"user_id": list(truth["users"]), "fav": list(truth["users"].values())})
    return (inter.with_columns(pl.col("item_id").replace_strict(truth["items"]).alias("theme"))
            .join(favs, on="user_id", how="left")
            .with_columns(pl.col("fav").list.contains(pl.col("theme")).alias("in_theme")))


# ----------------------------------------------------------------------------- contract

def test_tables_have_contract_columns_and_types(items, users, inter):
    assert items.columns[:6] == ["item_id", "title", "description", "tags", "image", "audio"]
    assert {"price", "brand"} <= set(items.columns)
    assert users.columns == ["user_id", "text"]
    assert inter.columns == ["user_id", "item_id", "timestamp", "event", "value"]
    assert inter.schema["timestamp"] == pl.Int64
    assert inter.schema["value"] == pl.Float64
    assert items.schema["price"] == pl.Float64


def test_ids_unique_and_references_resolve(items, users, inter):
    assert items["item_id"].n_unique() == items.height
    assert users["user_id"].n_unique() == users.height
    assert items["item_id"].null_count() == 0 and users["user_id"].null_count() == 0
    assert set(inter["item_id"].to_list()) <= set(items["item_id"].to_list())
    assert set(inter["user_id"].to_list()) <= set(users["user_id"].to_list())
    assert inter.select(pl.all().exclude("value").null_count()).row(0) == (0, 0, 0, 0)


def test_counts_are_in_the_planned_range(items, users, inter, truth):
    assert 180 <= items.height <= 220
    assert 100 <= users.height <= 150
    assert 2_000 <= inter.height <= 8_000
    per_theme = pl.Series(list(truth["items"].values())).value_counts()
    assert per_theme.height == 8 and per_theme["count"].min() >= 20


def test_titles_and_tags_are_present_and_tags_are_pipe_separated(items):
    assert items["title"].null_count() == 0
    tags = items["tags"].drop_nulls().str.split("|")
    assert tags.list.len().min() >= 2
    assert tags.explode().str.contains(r"^[a-z][a-z-]*$").all()


def test_a_few_percent_of_items_lack_each_modality(items):
    for col in ("image", "audio", "description"):
        missing = items[col].null_count()
        assert 1 <= missing <= 0.08 * items.height, (col, missing)
    # every item keeps at least its title
    bare = items.select(pl.all_horizontal(pl.col("image", "audio", "description").is_null()))
    assert bare.to_series().sum() <= 1


# ----------------------------------------------------------------------------- media

def _media_paths(items: pl.DataFrame, col: str) -> list[str]:
    return items[col].drop_nulls().to_list()


@pytest.mark.parametrize("col", ["image", "audio"])
def test_media_paths_exist_stay_inside_data_and_have_no_orphans(items, col):
    paths = _media_paths(items, col)
    root = DATA.resolve()
    for p in paths:
        assert not Path(p).is_absolute() and ".." not in Path(p).parts, p
        full = (DATA / p).resolve()
        assert full.is_relative_to(root) and full.is_file(), p
    folder = "images" if col == "image" else "audio"
    on_disk = {f"{folder}/{f.name}" for f in (DATA / folder).iterdir()}
    assert on_disk == set(paths)


def test_images_decode_square_rgb_in_size_range_with_mixed_formats(items):
    formats = {}
    for p in _media_paths(items, "image"):
        with Image.open(DATA / p) as img:
            img.load()
            assert img.mode == "RGB" and img.width == img.height and 128 <= img.width <= 160, p
            formats[img.format] = formats.get(img.format, 0) + 1
            ext = p.rsplit(".", 1)[1]
            assert {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext] == img.format, p
    assert set(formats) == {"JPEG", "PNG", "WEBP"}
    assert formats["JPEG"] > formats["PNG"] + formats["WEBP"]


def test_audio_decodes_16k_mono_1_to_2_seconds_not_silent(items):
    formats = set()
    for p in _media_paths(items, "audio"):
        y, sr = sf.read(DATA / p, dtype="float32")
        formats.add(sf.info(DATA / p).format)
        assert sr == 16_000 and y.ndim == 1, p
        assert 1.0 - 1e-3 <= len(y) / sr <= 2.0 + 1e-3, (p, len(y) / sr)
        assert np.isfinite(y).all() and 0.01 < np.sqrt(np.mean(y**2)) and np.abs(y).max() <= 1.0, p
    assert formats == {"FLAC", "OGG"}


def test_sizes_stay_within_budget():
    files = [f for f in DATA.rglob("*") if f.is_file() and "__pycache__" not in f.parts]
    total = sum(f.stat().st_size for f in files)
    assert total <= MAX_BYTES, f"data/ is {total / 2**20:.2f} MiB"
    media = [f for f in files if f.parent.name in ("images", "audio")]
    assert max(f.stat().st_size for f in media) <= 64 * 1024


# ----------------------------------------------------------------------------- behaviour

def test_themes_json_covers_every_item_and_user(items, users, truth):
    themes = set(truth["themes"])
    assert len(themes) == 8
    assert set(truth["items"]) == set(items["item_id"].to_list())
    assert set(truth["items"].values()) == themes
    assert set(truth["users"]) == set(users["user_id"].to_list())
    assert all(1 <= len(f) <= 2 and set(f) <= themes for f in truth["users"].values())


def test_interactions_follow_the_users_favourite_themes(labelled):
    assert labelled["in_theme"].mean() >= 0.7
    per_user = labelled.group_by("user_id").agg(pl.col("in_theme").mean())
    assert per_user["in_theme"].median() >= 0.75
    # the off-theme rest exists (not a perfectly separable toy)
    assert labelled["in_theme"].mean() <= 0.95


def test_activity_and_popularity_are_skewed(inter):
    per_user = inter.group_by("user_id").len()["len"]
    assert per_user.max() >= 5 * per_user.median() and per_user.min() <= 10
    per_item = inter.group_by("item_id").len()["len"].sort(descending=True)
    top = per_item.head(max(1, per_item.len() // 10)).sum()
    assert top / per_item.sum() >= 0.25


def test_event_funnel_values_and_time_window(inter, gen):
    counts = dict(inter["event"].value_counts().iter_rows())
    assert set(counts) == {"view", "click", "cart", "purchase"}
    assert counts["view"] > counts["click"] > counts["cart"] > counts["purchase"] > 0
    rated = inter.filter(pl.col("value").is_not_null())
    assert rated.height >= 50 and set(rated["event"].unique().to_list()) == {"purchase"}
    assert rated["value"].is_in([1.0, 2.0, 3.0, 4.0, 5.0]).all()
    start = gen.END_TS - 90 * 86_400
    assert start <= inter["timestamp"].min() and inter["timestamp"].max() <= gen.END_TS
    assert inter["timestamp"].max() - inter["timestamp"].min() >= 60 * 86_400
    assert inter["timestamp"].is_sorted()


def test_ratings_favour_the_users_themes(labelled):
    # Off-theme purchases are rare (a funnel of small odds), so compare against the scale.
    rated = labelled.filter(pl.col("value").is_not_null())
    assert rated.filter(pl.col("in_theme"))["value"].mean() >= 3.8
    assert not rated.filter(pl.col("value") < 3)["in_theme"].any()


def test_cold_users_and_cold_items(items, users, inter, truth):
    active_users, touched = set(inter["user_id"].to_list()), set(inter["item_id"].to_list())
    cold_users = sorted(set(users["user_id"].to_list()) - active_users)
    assert cold_users == truth["cold_users"] and len(cold_users) >= 2
    texts = dict(users.iter_rows())
    assert all(texts[u] for u in cold_users)
    cold_items = sorted(set(items["item_id"].to_list()) - touched)
    assert cold_items == truth["cold_items"] and len(cold_items) >= 5
    full = items.filter(pl.col("item_id").is_in(cold_items))
    assert full.select(pl.col("image", "audio", "description").null_count()).row(0) == (0, 0, 0)
    assert {truth["items"][i] for i in cold_items} == set(truth["themes"])  # one per theme


def test_profile_texts_speak_of_the_users_favourite_themes(users, truth, gen):
    with_text = users.filter(pl.col("text").is_not_null())
    assert 0.2 <= with_text.height / users.height <= 0.45
    for user_id, text in with_text.iter_rows():
        for theme in truth["users"][user_id]:
            likes = gen.THEMES[theme].likes
            assert any(phrase.lower() in text.lower() for phrase in likes), (user_id, theme, text)


# Each modality on its own must recover the theme: a nearest-centroid classifier fitted on
# even rows, scored on odd rows. This is what makes recommendations checkable by eye.

def _nearest_centroid_accuracy(x: np.ndarray, labels: np.ndarray) -> float:
    x = (x - x.mean(0)) / (x.std(0) + 1e-9)
    x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
    train = np.arange(len(x)) % 2 == 0
    cents = np.stack([x[train & (labels == k)].mean(0) for k in np.unique(labels)])
    pred = np.unique(labels)[(x[~train] @ cents.T).argmax(1)]
    return float((pred == labels[~train]).mean())


def _labels(items: pl.DataFrame, truth: dict, col: str) -> tuple[pl.DataFrame, np.ndarray]:
    have = items.filter(pl.col(col).is_not_null())
    names = sorted(truth["themes"])
    return have, np.array([names.index(truth["items"][i]) for i in have["item_id"]])


def test_text_encodes_the_theme(items, truth):
    have, labels = _labels(items, truth, "description")
    docs = have.select(
        pl.concat_str("title", "description", "tags", separator=" ").str.to_lowercase())
    tokens = [re.findall(r"[a-z]+", d) for d in docs.to_series().to_list()]
    vocab = {w: j for j, w in enumerate(sorted({w for ts in tokens for w in ts}))}
    x = np.zeros((len(tokens), len(vocab)))
    for i, ts in enumerate(tokens):
        np.add.at(x[i], [vocab[w] for w in ts], 1.0)
    assert _nearest_centroid_accuracy(x, labels) >= 0.9


def test_images_encode_the_theme(items, truth):
    have, labels = _labels(items, truth, "image")
    x = np.stack([np.asarray(Image.open(DATA / p).convert("RGB").resize((8, 8)), float).ravel()
                  for p in have["image"]])
    assert _nearest_centroid_accuracy(x, labels) >= 0.85


def _band_energies(y: np.ndarray, sr: int) -> np.ndarray:
    """Mean and spread over time of log energy in 24 log-spaced bands (30 Hz-8 kHz)."""
    frames = np.lib.stride_tricks.sliding_window_view(y, 512)[::256] * np.hanning(512)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    freqs = np.fft.rfftfreq(512, 1 / sr)
    edges = np.geomspace(30, 8000, 25)
    bands = np.stack([power[:, (freqs >= lo) & (freqs < hi)].sum(1)
                      for lo, hi in zip(edges[:-1], edges[1:])], axis=1)
    logs = np.log(bands + 1e-8)
    return np.concatenate([logs.mean(0), logs.std(0)])


def test_audio_encodes_the_theme(items, truth):
    have, labels = _labels(items, truth, "audio")
    x = np.stack([_band_energies(*sf.read(DATA / p)) for p in have["audio"]])
    assert _nearest_centroid_accuracy(x, labels) >= 0.85


# ----------------------------------------------------------------------------- determinism

@pytest.fixture(scope="module")
def regenerated(gen, tmp_path_factory) -> tuple[Path, Path]:
    a, b = tmp_path_factory.mktemp("sample_a"), tmp_path_factory.mktemp("sample_b")
    gen.make_sample(a, seed=gen.SEED)
    gen.make_sample(b, seed=gen.SEED)
    return a, b


def test_generator_reproduces_the_shipped_tables_byte_for_byte(regenerated):
    a, _ = regenerated
    for name in TABLES:
        assert (a / name).read_bytes() == (DATA / name).read_bytes(), (
            f"{name} differs from a fresh run: re-run .venv/bin/python data/make_sample.py")


def test_generator_media_are_byte_identical_between_runs(regenerated):
    a, b = regenerated
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) > 300
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_generator_media_match_the_shipped_media(regenerated, items):
    # Compared decoded, with a small tolerance: another Pillow/libsndfile build may encode
    # the same pixels and samples into slightly different bytes.
    a, _ = regenerated
    for p in _media_paths(items, "image"):
        fresh = np.asarray(Image.open(a / p).convert("RGB"), float)
        shipped = np.asarray(Image.open(DATA / p).convert("RGB"), float)
        assert fresh.shape == shipped.shape and np.abs(fresh - shipped).mean() < 2.0, p
    for p in _media_paths(items, "audio"):
        fresh, shipped = sf.read(a / p)[0], sf.read(DATA / p)[0]
        assert fresh.shape == shipped.shape and np.abs(fresh - shipped).max() < 0.02, p


def test_another_seed_gives_other_data_of_the_same_shape(gen, tmp_path):
    counts = gen.make_sample(tmp_path, seed=gen.SEED + 1, media=False)
    assert counts["media_files"] == 0 and not (tmp_path / "images").exists()
    other = pl.read_csv(tmp_path / "interactions.csv")
    shipped = pl.read_csv(DATA / "interactions.csv")
    assert other.columns == shipped.columns and other.schema == shipped.schema
    assert (tmp_path / "interactions.csv").read_bytes() != (DATA / "interactions.csv").read_bytes()
    titles = pl.read_csv(tmp_path / "items.csv")["title"].to_list()
    assert titles != pl.read_csv(DATA / "items.csv")["title"].to_list()


def test_rerun_into_the_same_folder_removes_stale_media(gen, tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "i9999.jpg").write_bytes(b"stale")
    (tmp_path / "images" / "keep.txt").write_text("not ours")
    gen.make_sample(tmp_path, seed=gen.SEED, n_items=16, n_users=10)
    assert not (tmp_path / "images" / "i9999.jpg").exists()
    assert (tmp_path / "images" / "keep.txt").exists()
    shipped_like = pl.read_csv(tmp_path / "items.csv")
    assert shipped_like.height == 16
