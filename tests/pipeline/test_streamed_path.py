"""The batched nightly path (pipeline.batch) gives what the in-memory computation gives.

Small synthetic worlds: items with a text and an image modality (some items without an
image, the image table in another order), users made from a seed item plus noise (some
without an image), labels = each user's seed item.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import faiss
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from fusionrec.pipeline.batch.fuse import FusedTable, IdsDigest, MappedRows, fuse_tables, ids_sha256
from fusionrec.pipeline.batch.nightly import (
    NightlyConfig,
    NightlyContext,
    batch_factory,
    build_item_index,
    exact_topk,
    export_topk,
    feature_names,
    load_ranker,
    ranker_folder,
    read_config,
    retrieval_recall,
    train_ranker,
    tune_nprobe,
)
from fusionrec.pipeline.config import RayConfig
from fusionrec.pipeline.errors import FusionrecError, InputError
from fusionrec.pipeline.io import storage
from fusionrec.pipeline.retrieval.faiss_index import exact_search
from fusionrec.pipeline.retrieval.fusion import align_blocks, fused_score, item_matrix, query_matrix
from fusionrec.ranker.model import Ranker

DIMS = {"image": 8, "text": 16}
WEIGHTS = {"image": 0.3, "text": 0.7}


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_vectors(path: Path, ids: list[str], x: np.ndarray, id_column: str = "id") -> Path:
    pq.write_table(pa.table({id_column: ids, "vector": pa.FixedSizeListArray.from_arrays(
        pa.array(np.asarray(x, np.float32).reshape(-1)), x.shape[1])}), path, row_group_size=97)
    return path


def make_world(root: Path, n_items: int = 1500, n_users: int = 240, seed: int = 0) -> dict:
    """Catalog, modality tables, users and labels on disk; also the raw vectors for references."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    item_ids = [f"i{j}" for j in range(n_items)]
    user_ids = [f"u{j}" for j in range(n_users)]
    latent = rng.standard_normal((n_items, 6)).astype(np.float32)
    items = {m: _unit(latent @ rng.standard_normal((6, d)).astype(np.float32)
                      + 0.5 * rng.standard_normal((n_items, d)).astype(np.float32)) for m, d in DIMS.items()}
    has_image = rng.random(n_items) > 0.1
    seed_item = rng.integers(0, n_items, n_users)
    users = {m: _unit(x[seed_item] + 0.4 * rng.standard_normal((n_users, x.shape[1])).astype(np.float32))
             for m, x in items.items()}
    user_has_image = rng.random(n_users) > 0.2
    pl.DataFrame({"item_id": item_ids, "popularity": rng.zipf(1.5, n_items).astype(float)}) \
        .write_parquet(root / "items.parquet")
    pl.DataFrame({"user_id": user_ids}).write_parquet(root / "users.parquet")
    write_vectors(root / "item_text.parquet", item_ids, items["text"], "item_id")
    shuffled = rng.permutation(np.flatnonzero(has_image))
    write_vectors(root / "item_image.parquet", [item_ids[j] for j in shuffled], items["image"][shuffled])
    write_vectors(root / "user_text.parquet", user_ids, users["text"], "user_id")
    keep = np.flatnonzero(user_has_image)
    write_vectors(root / "user_image.parquet", [user_ids[j] for j in keep], users["image"][keep], "user_id")
    pl.DataFrame({"user_id": user_ids, "item_id": [item_ids[j] for j in seed_item], "label": [1] * n_users}) \
        .write_parquet(root / "labels.parquet")
    return {"root": root, "item_ids": np.array(item_ids, dtype=object), "user_ids": np.array(user_ids, dtype=object),
            "items": items, "users": users, "has_image": has_image, "user_has_image": user_has_image}


def fuse_world(world: dict, work: Path, factory: str = "Flat", **index_kw) -> Path:
    root = world["root"]
    items = fuse_tables(root / "items.parquet", {m: root / f"item_{m}.parquet" for m in DIMS}, work / "items",
                        WEIGHTS, batch_rows=128)
    fuse_tables(root / "users.parquet", {m: root / f"user_{m}.parquet" for m in DIMS}, work / "users", WEIGHTS,
                kind="user", dims=dict(zip(items.names, items.dims)), batch_rows=100)
    build_item_index(work, factory, threads=1, **index_kw)
    return work


def in_memory_blocks(world: dict):
    """The in-memory fusion's Blocks (pipeline.retrieval.fusion), for items and users."""
    names = tuple(sorted(DIMS))
    has = {"image": world["has_image"], "text": np.ones(len(world["item_ids"]), bool)}
    uhas = {"image": world["user_has_image"], "text": np.ones(len(world["user_ids"]), bool)}
    items = align_blocks({m: (world["item_ids"][has[m]], world["items"][m][has[m]]) for m in names}, names,
                         world["item_ids"])
    users = align_blocks({m: (world["user_ids"][uhas[m]], world["users"][m][uhas[m]]) for m in names}, names,
                         world["user_ids"])
    return items, users, np.array([WEIGHTS[m] for m in names])


def reference_candidates(world: dict, keep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact top `keep` per user by s(u, i) over all items, in memory (ties: lower item row)."""
    items, users, w = in_memory_blocks(world)
    sims = np.stack([u @ x.T for u, x in zip(users.mats, items.mats)], axis=-1)  # (users, items, M)
    avail = users.mask[:, None, :] & items.mask[None, :, :]
    s = fused_score(sims.astype(np.float64), avail, w)
    s = np.where(np.isfinite(s), s, -np.inf)
    order = np.lexsort((np.broadcast_to(np.arange(s.shape[1]), s.shape), -s), axis=-1)[:, :keep]
    return order, np.take_along_axis(s, order, 1), sims


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return make_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def trained(world: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, NightlyConfig]:
    cfg = NightlyConfig(k=5, depth=60, keep=20, nprobe=16, batch_users=64, n_estimators=20, threads=1)
    work = fuse_world(world, tmp_path_factory.mktemp("work"), "IVF16,PQ4", train_size=1500)
    train_ranker(work, world["root"] / "labels.parquet", cfg)
    return work, cfg


def test_streamed_fusion_equals_the_in_memory_fusion(world: dict, tmp_path: Path) -> None:
    work = fuse_world(world, tmp_path)
    items, users, w = in_memory_blocks(world)
    table = FusedTable.open(work / "items")
    assert table.names == ("image", "text") and table.dims == (8, 16) and table.rows == 1500
    np.testing.assert_array_equal(table.mask(), items.mask)
    np.testing.assert_allclose(table.blocks()[:], np.hstack(items.mats), atol=1e-7)
    fused = pq.read_table(work / "items" / "fused.parquet")
    assert fused.column("row").to_pylist() == list(range(1500))
    vectors = np.stack(fused.column("vector").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(vectors, item_matrix(items, w), atol=1e-6)
    np.testing.assert_array_equal(FusedTable.open(work / "users").mask(), users.mask)
    assert table.ids().to_pylist() == list(world["item_ids"])


def test_mapped_rows_renewing_the_mapping_reads_and_writes_the_same_values(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((50, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", np.zeros_like(x))
    out = MappedRows(tmp_path / "x.npy", "r+", window=100)  # renewed every 5 rows
    for s in range(0, 50, 7):
        out.write(np.arange(s, min(s + 7, 50)), slice(0, 4), x[s:s + 7, :4])
    out.write(np.arange(50)[::-1], slice(4, 6), x[::-1, 4:])
    out.close()
    rows = MappedRows(tmp_path / "x.npy", window=100)
    np.testing.assert_array_equal(rows[:], x)
    pick = np.array([3, 17, 17, 49, 0])
    np.testing.assert_array_equal(rows[pick], x[pick])
    assert rows.shape == (50, 6) and rows[10:20].flags.owndata


def test_rescored_scores_are_the_exact_scores_of_the_returned_items(world: dict, trained) -> None:
    work, cfg = trained
    ctx = NightlyContext(work, cfg)
    cand = ctx.candidates(np.arange(len(world["user_ids"])))
    items, users, w = in_memory_blocks(world)
    # Against the exact inner product <q_u, v_i> of the in-memory index vectors: equal to s(u, i)
    # whenever the user or the item has every modality (pipeline.retrieval.fusion's identity).
    q, v = query_matrix(users, w), item_matrix(items, w)
    complete = users.mask.all(axis=1)[:, None] | items.mask.all(axis=1)[cand.items]
    ok = cand.items >= 0
    ip = np.einsum("ud,ukd->uk", q, v[cand.items])
    assert (ok & complete).sum() > 1000
    np.testing.assert_allclose(cand.scores[ok & complete], ip[ok & complete], atol=1e-6)
    # And against s(u, i) computed in memory for every returned pair.
    _, _, sims = reference_candidates(world, 1)
    s = fused_score(sims.astype(np.float64), users.mask[:, None, :] & items.mask[None, :, :], w)
    np.testing.assert_allclose(cand.scores[ok], np.take_along_axis(s, cand.items, 1)[ok], atol=1e-6)
    # Scores come sorted, ties by item row.
    assert np.all(np.diff(cand.scores, axis=1)[ok[:, 1:]] <= 0)
    # IVF-PQ decides only which items are re-scored: against exact search on the in-memory
    # vectors, nearly every user with every modality keeps the exact best item.
    full = np.flatnonzero(users.mask.all(axis=1))
    ex_scores, _ = exact_search(v, q[full], cfg.keep)
    assert np.mean(np.abs(cand.scores[full, 0] - ex_scores[:, 0]) < 1e-6) >= 0.95


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat", "IVF16,PQ8", "HNSW16,Flat", "IVF16,SQ8"])
def test_every_index_choice_gives_the_exact_top_after_rescoring(world: dict, tmp_path: Path, factory: str) -> None:
    cfg = NightlyConfig(k=5, depth=300, keep=20, nprobe=16, ef_search=600, threads=1)
    work = fuse_world(world, tmp_path, factory, train_size=1500)
    cand = NightlyContext(work, cfg).candidates(np.arange(len(world["user_ids"])))
    ref_items, ref_scores, _ = reference_candidates(world, cfg.keep)
    np.testing.assert_array_equal(cand.items, ref_items)
    np.testing.assert_allclose(cand.scores, ref_scores, atol=1e-6)
    # The Ray actors' memory-mapped index (codes left in the file) returns the same candidates.
    mapped = NightlyContext(work, cfg, mmap_index=True).candidates(np.arange(len(world["user_ids"])))
    np.testing.assert_array_equal(mapped.items, cand.items)
    np.testing.assert_array_equal(mapped.scores, cand.scores)


def test_exact_topk_streams_the_in_memory_exact_top(world: dict, trained) -> None:
    work, cfg = trained
    ctx = NightlyContext(work, cfg)
    full = np.flatnonzero(ctx.user_mask.all(axis=1))
    scores, items = exact_topk(ctx, full, 7, step=100)  # 15 chunks of the catalogue
    ref_items, ref_scores, _ = reference_candidates(world, 7)
    np.testing.assert_allclose(scores, ref_scores[full], atol=1e-5)
    assert np.mean(items == ref_items[full]) > 0.99  # item rows agree but for float ties


def test_tune_nprobe_picks_the_smallest_passing_value_and_the_export_uses_it(world: dict, tmp_path: Path) -> None:
    cfg = NightlyConfig(k=5, depth=20, keep=10, nprobe=1, batch_users=64, n_estimators=10, threads=1)
    work = fuse_world(world, tmp_path, "IVF32,Flat", train_size=1500)
    train_ranker(work, world["root"] / "labels.parquet", cfg)
    tuned = tune_nprobe(work, target_recall=0.95, users=150)
    nprobe = tuned["nprobe"]
    trials = {t["nprobe"]: t for t in tuned["trials"]}
    assert tuned["reached"] and tuned["users"] == 150 and trials[nprobe]["recall_lower_bound"] >= 0.95
    failing = [v for v, t in trials.items() if t["recall_lower_bound"] < 0.95]
    assert failing and all(v < nprobe for v in failing)  # nprobe 1 does not reach it on this catalogue
    assert nprobe == max(failing) + 1 or nprobe <= max(failing) + max(1, nprobe // 8)
    assert read_config(work).nprobe == nprobe  # the export's settings now carry it
    # measured again at that nprobe, on the same users, the recall is the reported one
    ctx = NightlyContext(work, read_config(work))
    full = np.flatnonzero(ctx.user_mask.all(axis=1))
    users = np.sort(np.random.default_rng(3).choice(full, 150, replace=False))
    exact, _ = exact_topk(ctx, users, 5)
    assert retrieval_recall(ctx.candidates(users), exact).mean() == pytest.approx(trials[nprobe]["recall"])
    # every list searched: the exact top, so even a target of 1 is reached
    assert tune_nprobe(work, target_recall=1.0, users=150)["reached"]
    # settings other than the export's would tune nprobe at another depth: refused
    with pytest.raises(FusionrecError, match="depth"):
        tune_nprobe(work, NightlyConfig(k=5, depth=40, keep=10))
    with pytest.raises(FusionrecError, match="at least 2 users"):
        tune_nprobe(work, users=1)


def test_tune_nprobe_says_when_no_nprobe_reaches_the_target(world: dict, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """With PQ codes' approximate order and a depth of only k, even every list searched
    misses some of the exact top k: nprobe is the number of lists, `reached` is false and a
    warning names the shortfall."""
    cfg = NightlyConfig(k=5, depth=5, keep=5, nprobe=1, batch_users=64, n_estimators=10, threads=1)
    work = fuse_world(world, tmp_path, "IVF16,PQ4", train_size=1500)
    train_ranker(work, world["root"] / "labels.parquet", cfg)
    tuned = tune_nprobe(work, target_recall=1.0, users=100)
    assert not tuned["reached"] and tuned["nprobe"] == 16 and read_config(work).nprobe == 16
    assert "no nprobe reaches recall 1.000" in caplog.text


def test_tune_nprobe_leaves_an_exact_index_alone_and_refuses_a_bad_target(world: dict, tmp_path: Path) -> None:
    work = fuse_world(world, tmp_path, "Flat")
    assert tune_nprobe(work, NightlyConfig(k=5, depth=20, keep=10))["trials"] == []
    with pytest.raises(FusionrecError, match="target_recall"):
        tune_nprobe(work, target_recall=1.5)


def test_auto_index_goes_from_flat_to_sq8_to_pq_as_the_catalogue_grows(world: dict, tmp_path: Path) -> None:
    assert batch_factory(5_000, 384) == "Flat"
    assert batch_factory(1_000_000, 384) == "IVF2048,Flat"  # 1.5 GB of floats fit the 2 GB budget
    assert batch_factory(3_000_000, 384) == "IVF4096,SQ8"  # 4.6 GB of floats do not; 1.15 GB of codes do
    assert batch_factory(10_000_000, 384) == "IVF8192,SQ8"  # 3.8 GB of codes
    assert batch_factory(20_000_000, 384).startswith("IVF8192,PQ")  # 7.7 GB of codes: past the 6 GB budget
    # Scaled down (a catalogue past the exact-search size, a float budget it exceeds): SQ8
    # codes, and re-scoring still gives the exact top (the check the named factories pass above).
    factory = batch_factory(1500, 24, memory_budget=1, exact_max=100)
    assert factory.endswith(",SQ8")
    cfg = NightlyConfig(k=5, depth=300, keep=20, nprobe=64, threads=1)
    work = fuse_world(world, tmp_path, factory, train_size=1500)
    index = faiss.read_index(str(work / "index.faiss"))
    assert isinstance(faiss.downcast_index(faiss.extract_index_ivf(index)), faiss.IndexIVFScalarQuantizer)
    cand = NightlyContext(work, cfg).candidates(np.arange(len(world["user_ids"])))
    ref_items, ref_scores, _ = reference_candidates(world, cfg.keep)
    np.testing.assert_array_equal(cand.items, ref_items)
    np.testing.assert_allclose(cand.scores, ref_scores, atol=1e-6)


def reference_topk(world: dict, work: Path, cfg: NightlyConfig) -> pl.DataFrame:
    """The whole path unbatched in memory: exact candidates, features, the trained ranker, top k."""
    items, users, w = in_memory_blocks(world)
    order, scores, sims = reference_candidates(world, cfg.keep)
    n_users = len(world["user_ids"])
    avail = users.mask[:, None, :] & items.mask[None, :, :]
    pop = np.log1p(pl.read_parquet(world["root"] / "items.parquet")["popularity"].to_numpy()).astype(np.float32)
    cols = {"user_row": np.repeat(np.arange(n_users), cfg.keep), "item_row": order.ravel(),
            "retrieval_score": scores.ravel(), "retrieval_rank": np.tile(np.arange(1, cfg.keep + 1), n_users),
            "retrieval_gap": (scores[:, :1] - scores).ravel(), "item_popularity": pop[order.ravel()]}
    for m, name in enumerate(items.names):
        sim = np.take_along_axis(sims[:, :, m], order, 1)
        cols[f"sim_{name}"] = np.where(np.take_along_axis(avail[:, :, m], order, 1), sim, np.nan).ravel()
    frame = pl.DataFrame(cols).with_columns(pl.col(f"sim_{n}").fill_nan(None) for n in items.names)
    frame = frame.filter(pl.col("retrieval_score").is_finite())
    ranker = load_ranker(*ranker_folder(work))
    assert ranker.feature_names_ == list(frame.select(list(ranker.feature_names_)).columns)
    frame = frame.with_columns(pl.Series("score", ranker.predict(frame)))
    top = frame.sort(["user_row", "score", "retrieval_rank"], descending=[False, True, False]) \
        .group_by("user_row", maintain_order=True).head(cfg.k)
    return top.select(pl.col("user_row").map_elements(lambda r: world["user_ids"][r], pl.String).alias("user_id"),
                      pl.col("item_row").map_elements(lambda r: world["item_ids"][r], pl.String).alias("item_id"),
                      "score", "retrieval_score")


def test_batched_export_equals_the_unbatched_in_memory_path(world: dict, tmp_path: Path) -> None:
    # A Flat index: the candidates are then the exact top `keep`, which the reference computes.
    cfg = NightlyConfig(k=5, depth=60, keep=20, batch_users=7, n_estimators=20, threads=1)
    work = fuse_world(world, tmp_path / "work")
    train_ranker(work, world["root"] / "labels.parquet", cfg)
    small = export_topk(work, tmp_path / "small.parquet", cfg)
    whole = export_topk(work, tmp_path / "whole.parquet", NightlyConfig(**{**cfg.__dict__, "batch_users": 10_000}))
    a, b = pl.read_parquet(tmp_path / "small.parquet"), pl.read_parquet(tmp_path / "whole.parquet")
    assert small["rows"] == whole["rows"] == a.height == len(world["user_ids"]) * cfg.k
    assert a.equals(b)
    assert a["rank"].to_list() == list(range(1, cfg.k + 1)) * len(world["user_ids"])
    ref = reference_topk(world, work, cfg)
    assert a["user_id"].to_list() == ref["user_id"].to_list()
    assert a["item_id"].to_list() == ref["item_id"].to_list()
    np.testing.assert_allclose(a["score"].to_numpy(), ref["score"].to_numpy(), atol=1e-6)
    np.testing.assert_allclose(a["retrieval_score"].to_numpy(), ref["retrieval_score"].to_numpy(), atol=1e-6)


def test_export_is_independent_of_the_batch_size_with_ivf_pq(trained, tmp_path: Path) -> None:
    work, cfg = trained
    export_topk(work, tmp_path / "a.parquet", cfg)
    export_topk(work, tmp_path / "b.parquet", NightlyConfig(**{**cfg.__dict__, "batch_users": 1}))
    export_topk(work, tmp_path / "c.parquet", cfg, users=(30, 91))
    a, b, c = (pl.read_parquet(tmp_path / f"{x}.parquet") for x in "abc")
    assert a.equals(b)
    assert c.equals(a.filter(pl.col("user_id").is_in([f"u{j}" for j in range(30, 91)])))


def test_the_ray_engine_gives_the_local_engine_export(trained, tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'fusionrec[ray]')")
    work, cfg = trained
    local = export_topk(work, tmp_path / "local.parquet", cfg)
    ray = export_topk(work, tmp_path / "ray.parquet", cfg, engine="ray", ray_config=RayConfig(num_actors=2))
    assert local["rows"] == ray["rows"] and local["users"] == ray["users"] == 240
    assert pl.read_parquet(tmp_path / "local.parquet").equals(pl.read_parquet(tmp_path / "ray.parquet"))


def test_training_sample_is_bounded(world: dict, tmp_path: Path) -> None:
    work = fuse_world(world, tmp_path)
    cfg = NightlyConfig(k=5, depth=40, keep=20, train_users=100, max_train_rows=300, batch_users=16,
                        n_estimators=5, threads=1)
    info = train_ranker(work, world["root"] / "labels.parquet", cfg)
    assert info["sampled_users"] == 100
    assert info["labels_matched"] == 100  # one label per user, only the sampled users' kept
    assert info["capped"] and 300 - 20 < info["train_rows"] <= 300  # whole users of 20 candidates each
    assert info["train_users"] == info["train_rows"] // 20 <= 100
    assert 0 < info["positives"] <= info["train_users"]
    assert load_ranker(*ranker_folder(work)).feature_names_ == feature_names(NightlyContext(work, cfg))
    everyone = train_ranker(work, world["root"] / "labels.parquet",
                            NightlyConfig(**{**cfg.__dict__, "train_users": 10_000, "max_train_rows": 10**6}))
    assert everyone["sampled_users"] == 240 and not everyone["capped"]


def test_a_training_cap_below_one_users_candidates_says_so(world: dict, tmp_path: Path) -> None:
    """Every sampled user has a labelled candidate, but each brings 20 rows and the cap is 10:
    the error named the labels table as the cause."""
    work = fuse_world(world, tmp_path)
    cfg = NightlyConfig(k=5, depth=40, keep=20, max_train_rows=10, batch_users=16, n_estimators=5, threads=1)
    with pytest.raises(FusionrecError, match=r"^max_train_rows \(10\) is below the 20 candidate rows of one user: "
                                             r"raise it to at least keep \(20\)$"):
        train_ranker(work, world["root"] / "labels.parquet", cfg)
    assert not (work / "nightly.json").exists() and not [p for p in work.iterdir() if p.name.startswith("ranker")]


def test_a_modality_table_of_another_dimension_names_its_file(world: dict, tmp_path: Path) -> None:
    root = world["root"]
    other = write_vectors(tmp_path / "item_text_2.parquet", ["extra"], np.ones((1, 12), np.float32))
    with pytest.raises(InputError, match=r"item_text_2\.parquet.*field 'vector'.*dimension 12, other tables have 16"):
        fuse_tables(root / "items.parquet", {"text": [root / "item_text.parquet", other]}, tmp_path / "items")
    wrong = write_vectors(tmp_path / "user_text.parquet", ["u0"], np.ones((1, 10), np.float32), "user_id")
    with pytest.raises(InputError, match=r"user_text\.parquet.*modality 'text' has dimension 10, the items' has 16"):
        fuse_tables(root / "users.parquet", {"text": wrong}, tmp_path / "users", kind="user", dims={"text": 16})


def test_bad_vectors_and_labels_are_named(world: dict, tmp_path: Path) -> None:
    root = world["root"]
    x = np.ones((3, 16), np.float32)
    x[2, 4] = np.nan
    nan = write_vectors(tmp_path / "nan.parquet", ["i0", "i1", "i2"], x)
    with pytest.raises(InputError, match=r"nan\.parquet, row 3, field 'vector': vector has NaN"):
        fuse_tables(root / "items.parquet", {"text": nan}, tmp_path / "a")
    dup = write_vectors(tmp_path / "dup.parquet", ["i0", "i7", "i0"], np.ones((3, 16), np.float32))
    with pytest.raises(InputError, match=r"dup\.parquet.*id 'i0' has more than one vector"):
        fuse_tables(root / "items.parquet", {"text": dup}, tmp_path / "b")
    with pytest.raises(FusionrecError, match="weights for modalities that have no table: audio"):
        fuse_tables(root / "items.parquet", {"text": root / "item_text.parquet"}, tmp_path / "c", {"audio": 1.0})
    work = fuse_world(world, tmp_path / "work")
    pl.DataFrame({"user_id": ["u0", "u1"], "item_id": ["i0", "i1"], "label": [1, -2]}) \
        .write_parquet(tmp_path / "labels.parquet")
    with pytest.raises(InputError, match=r"labels\.parquet, row 2, field 'label'"):
        train_ranker(work, tmp_path / "labels.parquet", NightlyConfig(k=5, depth=40, keep=20, threads=1))
    with pytest.raises(FusionrecError, match="k <= keep <= depth"):
        NightlyConfig(k=30, keep=20)


def test_a_refused_fusion_over_an_earlier_table_leaves_no_table_that_opens(world: dict, tmp_path: Path) -> None:
    """A second fusion into the same directory that stops part-way (a NaN vector here, or
    Ctrl-C) has already rewritten ids, popularity and blocks: the earlier fused.json must not
    vouch for them. The table opened as complete, its text blocks zeros under a mask that
    said every item has a text vector."""
    root = world["root"]
    fuse_tables(root / "items.parquet", {m: root / f"item_{m}.parquet" for m in DIMS}, tmp_path / "items", WEIGHTS)
    x = np.ones((3, 16), np.float32)
    x[2, 4] = np.nan
    nan = write_vectors(tmp_path / "nan.parquet", ["i0", "i1", "i2"], x)
    with pytest.raises(InputError, match=r"nan\.parquet, row 3"):
        fuse_tables(root / "items.parquet", {"image": root / "item_image.parquet", "text": nan}, tmp_path / "items",
                    WEIGHTS)
    with pytest.raises(FusionrecError, match="holds no fused table"):
        FusedTable.open(tmp_path / "items")


def test_an_index_of_an_earlier_fusion_is_refused(world: dict, tmp_path: Path) -> None:
    """Items fused again (the catalogue changed) without rebuilding the index: its rows are
    another fusion's. A smaller catalogue ended in an IndexError from the memory map, a larger
    one never recommended the new items."""
    root = world["root"]
    cfg = NightlyConfig(k=5, depth=40, keep=20, batch_users=64, n_estimators=5, threads=1)
    work = fuse_world(world, tmp_path / "work")  # 1500 items, indexed
    train_ranker(work, root / "labels.parquet", cfg)
    fewer = tmp_path / "fewer.parquet"
    pl.read_parquet(root / "items.parquet").head(1000).write_parquet(fewer)
    for catalogue, stale, now in ((fewer, 1500, 1000), (root / "items.parquet", 1000, 1500)):
        fuse_tables(catalogue, {m: root / f"item_{m}.parquet" for m in DIMS}, work / "items", WEIGHTS)
        with pytest.raises(FusionrecError, match=rf"index\.faiss holds {stale} items of 24 dimensions, the fused "
                                                 rf"items are {now} of 24.*build the item index again"):
            export_topk(work, tmp_path / "stale.parquet", cfg)
        assert not (tmp_path / "stale.parquet").exists()
        build_item_index(work, "Flat", threads=1)  # rebuilt for the catalogue it now has: accepted again
        assert export_topk(work, tmp_path / "fresh.parquet", cfg)["users"] == len(world["user_ids"])


@pytest.mark.parametrize("empty", [None, "", "  "])
def test_an_empty_item_id_in_the_catalogue_is_refused_by_row(world: dict, tmp_path: Path, empty: str | None) -> None:
    """One empty id passed and became an item in the export; two were called a duplicate 'None'."""
    root = world["root"]
    items = pl.read_parquet(root / "items.parquet")
    key = "item_id" if "item_id" in items.columns else "id"
    bad = tmp_path / "items.parquet"
    items.with_columns(pl.when(pl.int_range(pl.len()) == 6).then(pl.lit(empty, pl.String))
                       .otherwise(pl.col(key).cast(pl.String)).alias(key)).write_parquet(bad)
    with pytest.raises(InputError, match=rf"items\.parquet, row 7, field '{key}': missing id"):
        fuse_tables(bad, {m: root / f"item_{m}.parquet" for m in DIMS}, tmp_path / "out", WEIGHTS)


def test_an_index_of_a_fusion_with_the_same_count_but_other_ids_or_order_is_refused(world: dict,
                                                                                     tmp_path: Path) -> None:
    """The catalogue reordered (or its ids renamed) and fused again, the index not rebuilt: the
    count and dimension match, so the index was used and its rows, now other items, reached the
    export under the wrong ids, silently."""
    root = world["root"]
    cfg = NightlyConfig(k=5, depth=40, keep=20, batch_users=64, n_estimators=5, threads=1)
    work = fuse_world(world, tmp_path / "work")
    train_ranker(work, root / "labels.parquet", cfg)
    good = export_topk(work, tmp_path / "good.parquet", cfg)
    items = pl.read_parquet(root / "items.parquet")
    reordered = tmp_path / "reordered.parquet"
    items.reverse().write_parquet(reordered)
    renamed_root = tmp_path / "renamed"
    renamed_root.mkdir()
    items.with_columns(pl.col("item_id") + "x").write_parquet(renamed_root / "items.parquet")
    for m in DIMS:
        table = pq.read_table(root / f"item_{m}.parquet")
        key = table.column_names[0]
        renamed = pc.binary_join_element_wise(table.column(key), "x", "")
        pq.write_table(table.set_column(0, key, renamed), renamed_root / f"item_{m}.parquet")
    for catalogue, modalities in ((reordered, root), (renamed_root / "items.parquet", renamed_root)):
        fuse_tables(catalogue, {m: modalities / f"item_{m}.parquet" for m in DIMS}, work / "items", WEIGHTS)
        with pytest.raises(FusionrecError, match=rf"^{re.escape(str(work / 'index.faiss'))} was built for other item "
                                                 r"ids, or another order of them, than the fused items in .*items "
                                                 r"\(ids_sha256 .*build the item index again \(build_item_index\)$"):
            export_topk(work, tmp_path / "stale.parquet", cfg)
        assert not (tmp_path / "stale.parquet").exists()
    fuse_tables(reordered, {m: root / f"item_{m}.parquet" for m in DIMS}, work / "items", WEIGHTS)
    build_item_index(work, "Flat", threads=1)  # rebuilt for the order it now has: accepted
    assert export_topk(work, tmp_path / "fresh.parquet", cfg)["users"] == good["users"]
    fresh = pl.read_parquet(tmp_path / "fresh.parquet")
    assert fresh.sort("user_id", "rank").equals(pl.read_parquet(tmp_path / "good.parquet").sort("user_id", "rank"))


def test_an_index_built_on_other_vectors_of_the_same_ids_is_named_in_a_warning(
        world: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Items embedded again under the same ids and fused again: the index, built on the old
    vectors, passed the ids check and found candidates by the old vectors (scores exact, recall
    lost), silently. fused.json now records the sha256 of the index vectors and index.json the
    one it was built on: another is a warning naming both (the lists stay right; a large index
    is rebuilt when its owner chooses), and the same inputs fused again are not."""
    root = world["root"]
    cfg = NightlyConfig(k=5, depth=40, keep=20, batch_users=64, n_estimators=5, threads=1)
    work = fuse_world(world, tmp_path / "work")
    train_ranker(work, root / "labels.parquet", cfg)
    export_topk(work, tmp_path / "old.parquet", cfg)
    built_on = json.loads((work / "index.json").read_text())["vectors_sha256"]
    assert built_on == FusedTable.open(work / "items").vectors_digest and len(built_on) == 64
    stale = "was built on other vectors of these items"
    # the same inputs fused again, in other batches: the same digest, no warning, the same lists
    again = fuse_tables(root / "items.parquet", {m: root / f"item_{m}.parquet" for m in DIMS}, work / "items",
                        WEIGHTS, batch_rows=333)
    assert again.vectors_digest == built_on
    with caplog.at_level("WARNING", logger="fusionrec.batch"):
        export_topk(work, tmp_path / "again.parquet", cfg)
    assert stale not in caplog.text
    assert pl.read_parquet(tmp_path / "again.parquet").equals(pl.read_parquet(tmp_path / "old.parquet"))
    moved = tmp_path / "moved"
    moved.mkdir()
    for m in DIMS:  # every item's vectors rolled onto another item's id: the same ids, other vectors
        table = pq.read_table(root / f"item_{m}.parquet")
        vectors = table.column("vector").to_pylist()
        table = table.set_column(table.column_names.index("vector"), "vector",
                                 pa.array(vectors[1:] + vectors[:1], table.schema.field("vector").type))
        pq.write_table(table, moved / f"item_{m}.parquet")
    fused = fuse_tables(root / "items.parquet", {m: moved / f"item_{m}.parquet" for m in DIMS}, work / "items",
                        WEIGHTS)
    assert fused.ids_digest == json.loads((work / "index.json").read_text())["ids_sha256"]
    assert fused.vectors_digest != built_on
    caplog.clear()
    with caplog.at_level("WARNING", logger="fusionrec.batch"):
        export_topk(work, tmp_path / "stale.parquet", cfg)
    assert (f"{work / 'index.faiss'} was built on other vectors of these items than {work / 'items'} holds now "
            f"(vectors_sha256 {built_on[:12]}... in index.json, {fused.vectors_digest[:12]}... in fused.json): "
            "candidates are found by the old vectors, their scores stay exact; build the item index again "
            "(build_item_index)") in caplog.text
    build_item_index(work, "Flat", threads=1)
    caplog.clear()
    with caplog.at_level("WARNING", logger="fusionrec.batch"):
        export_topk(work, tmp_path / "new.parquet", cfg)
    assert stale not in caplog.text
    new = pl.read_parquet(tmp_path / "new.parquet")
    assert not new.equals(pl.read_parquet(tmp_path / "old.parquet"))
    # the rebuilt index serves the new vectors: the export of a work directory fused from them
    # afresh, with the same ranker and settings
    fresh = tmp_path / "fresh"
    items = fuse_tables(root / "items.parquet", {m: moved / f"item_{m}.parquet" for m in DIMS}, fresh / "items",
                        WEIGHTS, batch_rows=128)
    fuse_tables(root / "users.parquet", {m: root / f"user_{m}.parquet" for m in DIMS}, fresh / "users", WEIGHTS,
                kind="user", dims=dict(zip(items.names, items.dims)), batch_rows=100)
    build_item_index(fresh, "Flat", threads=1)
    shutil.copytree(ranker_folder(work)[0], fresh / ranker_folder(work)[0].name)
    shutil.copy(work / "nightly.json", fresh / "nightly.json")
    export_topk(fresh, tmp_path / "fresh.parquet", cfg)
    assert new.equals(pl.read_parquet(tmp_path / "fresh.parquet"))
    # An index.json written before it held the digest, beside items fused since: warned of too.
    meta = json.loads((work / "index.json").read_text())
    (work / "index.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "vectors_sha256"}))
    caplog.clear()
    with caplog.at_level("WARNING", logger="fusionrec.batch"):
        export_topk(work, tmp_path / "upgraded.parquet", cfg)
    assert "(vectors_sha256 none in index.json" in caplog.text
    assert pl.read_parquet(tmp_path / "upgraded.parquet").equals(new)


def test_the_item_fingerprint_depends_on_the_ids_and_their_order_only(world: dict, tmp_path: Path) -> None:
    """fused.json's ids_sha256 is what ids.parquet holds, however the ids were batched; a
    reordered catalogue has another."""
    root = world["root"]
    modalities = {"text": root / "item_text.parquet"}
    small = fuse_tables(root / "items.parquet", modalities, tmp_path / "a", batch_rows=97)
    large = fuse_tables(root / "items.parquet", modalities, tmp_path / "b", batch_rows=4096)
    assert small.ids_digest is not None
    assert small.ids_digest == large.ids_digest == ids_sha256(tmp_path / "a" / "ids.parquet", batch_rows=1000)
    assert FusedTable.open(tmp_path / "a").ids_sha256() == small.ids_digest
    swapped = tmp_path / "swapped.parquet"
    ids = list(world["item_ids"])
    ids[3], ids[4] = ids[4], ids[3]
    pl.DataFrame({"item_id": ids}).write_parquet(swapped)
    assert fuse_tables(swapped, modalities, tmp_path / "c").ids_digest != small.ids_digest
    # ids whose bytes run together alike ("ab", "c" and "a", "bc") differ too
    digests = set()
    for pair in (["ab", "c"], ["a", "bc"]):
        digest = IdsDigest()
        digest.update(pa.array(pair))
        digests.add(digest.hexdigest())
    assert len(digests) == 2


def test_an_index_built_before_the_fingerprint_is_checked_by_size_and_named(world: dict, tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    """An index.faiss without index.json (built before it was written) keeps working, checked by
    count and dimension as before, with a warning that says how to have the ids checked."""
    cfg = NightlyConfig(k=5, depth=40, keep=20, batch_users=64, n_estimators=5, threads=1)
    work = fuse_world(world, tmp_path / "work")
    (work / "index.json").unlink()
    with caplog.at_level("WARNING", logger="fusionrec.batch"):
        train_ranker(work, world["root"] / "labels.parquet", cfg)
    assert f"{work / 'index.faiss'} has no index.json (built before the item order was recorded)" in caplog.text
    assert "build the item index again to have the item ids checked too" in caplog.text
    assert export_topk(work, tmp_path / "old.parquet", cfg)["users"] == len(world["user_ids"])
    (work / "index.json").write_text("{not json")
    with pytest.raises(FusionrecError, match=r"cannot read the item fingerprint of .*index\.faiss in .*index\.json "
                                             r"\(JSONDecodeError: .*\): build the item index again$"):
        export_topk(work, tmp_path / "torn.parquet", cfg)


class Stopped(BaseException):
    """A stop at a storage fault point: on disk, what a kill there leaves (`atomic_path` removes
    only its own temporary file, which no reader looks at)."""


def stop_at(monkeypatch: pytest.MonkeyPatch, point: str) -> None:
    """Stop the job at `point` ("write:N": the N-th atomic write about to replace its file,
    "written:N": just replaced), counted from now."""
    counts: dict[str, int] = {}

    def fault_point(name: str, path: object = None, tmp: object = None) -> None:
        counts[name] = counts.get(name, 0) + 1
        if f"{name}:{counts[name]}" == point:
            raise Stopped(point)

    monkeypatch.setattr(storage, "fault_point", fault_point)


def test_a_training_stopped_at_any_write_leaves_a_pair_that_serves(world: dict, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A second training stopped at each of its writes (model.txt, features.json, nightly.json,
    just after nightly.json): the export with the settings on disk is the first pair's or the
    second's, never a mix. nightly.json was written after ranker/: a stop between them served
    the new ranker with the old k, depth and keep, and one between model.txt and features.json
    left no ranker that loads. A training run after the stop completes and leaves its ranker and
    the one nightly.json named before it."""
    labels = world["root"] / "labels.parquet"
    first = NightlyConfig(k=5, depth=40, keep=20, batch_users=64, n_estimators=5, threads=1)
    second = NightlyConfig(k=3, depth=30, keep=10, batch_users=64, n_estimators=12, num_leaves=7, threads=1)
    base = fuse_world(world, tmp_path / "base")
    train_ranker(base, labels, first)

    def export(work: Path, name: str) -> pl.DataFrame:
        export_topk(work, tmp_path / f"{name}.parquet", read_config(work))
        return pl.read_parquet(tmp_path / f"{name}.parquet")

    old = export(base, "old")
    shutil.copytree(base, tmp_path / "new")
    train_ranker(tmp_path / "new", labels, second)
    new = export(tmp_path / "new", "new")
    assert not old.equals(new) and set(new["rank"]) == {1, 2, 3}
    for point, expected in (("write:1", old), ("write:2", old), ("write:3", old), ("written:3", new)):
        work = shutil.copytree(base, tmp_path / point.replace(":", "-"))
        with monkeypatch.context() as patch:
            stop_at(patch, point)
            with pytest.raises(Stopped):
                train_ranker(work, labels, second)
        assert export(work, f"{point}-after").equals(expected), point
        train_ranker(work, labels, second)
        assert export(work, f"{point}-again").equals(new), point
        folders = {p.name for p in work.iterdir() if p.name.startswith("ranker")}
        assert ranker_folder(work)[0].name in folders and len(folders) == 2, point  # the new pair's, the last one's


def test_an_export_under_way_when_a_training_switches_keeps_its_ranker(world: dict, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The export resolves its ranker folder once; a training that finishes meanwhile switches
    nightly.json and removed that folder, so the export failed with 'train again'. The folder
    nightly.json named before the switch is kept until the next training."""
    from fusionrec.pipeline.batch import nightly

    labels = world["root"] / "labels.parquet"
    first = NightlyConfig(k=5, depth=40, keep=20, batch_users=64, n_estimators=5, threads=1)
    second = NightlyConfig(k=5, depth=40, keep=20, batch_users=64, n_estimators=12, num_leaves=7, threads=1)
    work = fuse_world(world, tmp_path / "work")
    train_ranker(work, labels, first)
    settings = read_config(work)
    export_topk(work, tmp_path / "before.parquet", settings)
    first_folder = ranker_folder(work)[0]
    real = nightly.NightlyContext

    def a_training_finishes_first(*args, **kwargs):
        monkeypatch.setattr(nightly, "NightlyContext", real)
        train_ranker(work, labels, second)
        return real(*args, **kwargs)

    monkeypatch.setattr(nightly, "NightlyContext", a_training_finishes_first)
    export_topk(work, tmp_path / "during.parquet", settings)
    assert ranker_folder(work)[0] != first_folder and first_folder.is_dir()
    assert pl.read_parquet(tmp_path / "during.parquet").equals(pl.read_parquet(tmp_path / "before.parquet"))
    train_ranker(work, labels, first)  # the next training removes it
    assert not first_folder.exists()


def test_settings_read_before_a_training_with_other_sizes_are_refused(world: dict, tmp_path: Path) -> None:
    """Settings read before a training switched nightly.json paired the new ranker, trained on
    `keep` of `depth` candidates, with the old depth and keep, silently. The export now reads
    the ranker and its settings from one nightly.json and refuses other sizes, naming both;
    without a config it uses the trained settings; k and batch_users may differ."""
    labels = world["root"] / "labels.parquet"
    first = NightlyConfig(k=5, depth=40, keep=20, batch_users=64, n_estimators=5, threads=1)
    second = NightlyConfig(k=3, depth=30, keep=10, batch_users=64, n_estimators=5, threads=1)
    work = fuse_world(world, tmp_path / "work")
    train_ranker(work, labels, first)
    stale = read_config(work)
    train_ranker(work, labels, second)
    with pytest.raises(FusionrecError, match=r"^the export's depth and keep \(40, 20\) differ from those the ranker in "
                                             r".*ranker-\w+ was trained with \(30, 10, .*nightly\.json\): export "
                                             r"with read_config\(work\), or train the ranker with these sizes$"):
        export_topk(work, tmp_path / "stale.parquet", stale)
    assert not (tmp_path / "stale.parquet").exists()
    export_topk(work, tmp_path / "default.parquet")
    export_topk(work, tmp_path / "read.parquet", read_config(work))
    default, read = pl.read_parquet(tmp_path / "default.parquet"), pl.read_parquet(tmp_path / "read.parquet")
    assert default.equals(read) and set(default["rank"]) == {1, 2, 3}
    export_topk(work, tmp_path / "k2.parquet", NightlyConfig(**{**second.__dict__, "k": 2, "batch_users": 7}))
    assert pl.read_parquet(tmp_path / "k2.parquet").equals(read.filter(pl.col("rank") <= 2))


def test_a_bad_setting_in_nightly_json_is_named_and_its_folder_outlives_the_next_training(world: dict,
                                                                                       tmp_path: Path) -> None:
    """A nightly.json whose setting does not hold (edited by hand): the export's error named
    neither the file nor the work directory, and the next training, reading the folder through
    the settings, took it for no pair and removed the folder an export under way still read."""
    labels = world["root"] / "labels.parquet"
    cfg = NightlyConfig(k=5, depth=40, keep=20, batch_users=64, n_estimators=5, threads=1)
    work = fuse_world(world, tmp_path / "work")
    train_ranker(work, labels, cfg)
    folder = ranker_folder(work)[0]
    settings = json.loads((work / "nightly.json").read_text())
    (work / "nightly.json").write_text(json.dumps({**settings, "threads": 0}))
    named = (rf"^{re.escape(str(work / 'nightly.json'))}: nightly setting threads must be a positive integer, not 0; "
             r"train the ranker again$")
    for call in (lambda: export_topk(work, tmp_path / "out.parquet", cfg), lambda: read_config(work),
                 lambda: tune_nprobe(work)):
        with pytest.raises(FusionrecError, match=named):
            call()
    train_ranker(work, labels, cfg)
    assert ranker_folder(work)[0] != folder and folder.is_dir()  # kept for an export that began before


def test_a_ranker_folder_holding_another_model_than_nightly_json_names_is_refused(world: dict,
                                                                                  tmp_path: Path) -> None:
    """nightly.json records the model it pairs its settings with; a ranker folder holding
    another (copied over it, say) is refused, naming both. A nightly.json written before it
    named its folder pairs with ranker/, as then."""
    labels = world["root"] / "labels.parquet"
    cfg = NightlyConfig(k=5, depth=40, keep=20, batch_users=64, n_estimators=5, threads=1)
    work = fuse_world(world, tmp_path / "work")
    train_ranker(work, labels, cfg)
    folder, digest = ranker_folder(work)
    assert folder.parent == work and folder.name.startswith("ranker-") and digest == Ranker.load(folder).model_sha256_
    other = fuse_world(world, tmp_path / "other")
    train_ranker(other, labels, NightlyConfig(**{**cfg.__dict__, "n_estimators": 9}))
    for name in ("model.txt", "features.json"):
        shutil.copy(ranker_folder(other)[0] / name, folder / name)
    with pytest.raises(FusionrecError, match=rf"^{re.escape(str(folder))} holds another model \(sha256 .*\) than the "
                                             rf"one {re.escape(str(work / 'nightly.json'))} pairs its settings with "
                                             r".*train the ranker again \(train_ranker\)$"):
        export_topk(work, tmp_path / "mixed.parquet", read_config(work))
    assert not (tmp_path / "mixed.parquet").exists()
    # written before nightly.json named its folder: ranker/ and the settings alone
    folder.rename(work / "ranker")
    settings = json.loads((work / "nightly.json").read_text())
    (work / "nightly.json").write_text(json.dumps({k: v for k, v in settings.items() if not k.startswith("ranker")}))
    assert export_topk(work, tmp_path / "legacy.parquet", read_config(work))["users"] == len(world["user_ids"])
    (work / "nightly.json").write_text(json.dumps({**settings, "ranker": "../other/ranker"}))
    with pytest.raises(FusionrecError, match=r"nightly\.json: 'ranker' must name a ranker folder in .*, not "
                                             r"'\.\./other/ranker'; train the ranker again$"):
        export_topk(work, tmp_path / "elsewhere.parquet", read_config(work))
