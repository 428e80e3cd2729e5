"""The nightly path in bounded memory: index, ranker on a bounded sample, every user's top-k.

A work directory holds the stages' outputs::

    items/, users/   fused tables (`pipeline.batch.fuse.fuse_tables`): blocks.npy memory-mapped
    index.faiss      built from items/fused.parquet (`build_item_index`)
    index.json       the fused items it was built for: their count, dimension, `ids_sha256` and `vectors_sha256`
    ranker-<id>/     LightGBM lambdarank, trained on a bounded sample of users (`train_ranker`)
    nightly.json     the settings it was trained with, the folder and the model digest they pair with

`export_topk` then streams every user's top k to one Parquet file, a batch of users at a
time: the queries q_u of `fusion.query_matrix` search the index for `depth` candidates,
whose unit blocks are read from items/blocks.npy and scored exactly, s(u, i) of
`fusion.fused_score`; the best `keep` get features and the ranker's score; the best `k` by
that score are written. So whatever the index (Flat, IVF, IVF-PQ, HNSW), the scores that
reach the ranker are exact, and only the candidate set depends on the index's recall.

Memory, besides the index (IVF-PQ: m + 8 bytes per item): per item the mask (M bytes),
popularity (4), the id (about 4 + its length) and, while labels are matched, 16 bytes of
hash lookup; per batch of B users, the B * depth gathered rows (B * depth * D * 4 bytes:
512 x 100 x 384 x 4 = 79 MB). The blocks are read through `fuse.MappedRows`, which renews
its mapping every 256 MB read, so the mapped pages in the process's RSS stay bounded too;
the page cache keeps what fits (shared, reclaimable). Nothing grows with items x users.

Results do not depend on the batch size: each user's candidates, scores and features are
computed row by row (FAISS searches each query on its own; re-scoring sums each pair's
products alone), so `batch_users` and the engine ("local" or "ray") change only speed.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import polars as pl
import pyarrow as pa

from fusionrec.pipeline.batch.fuse import META_FILE, FusedTable, IdLookup
from fusionrec.pipeline.config import RayConfig
from fusionrec.pipeline.embedding.ray_engine import import_ray, ordered_actor_calls, ray_runtime
from fusionrec.pipeline.errors import FusionrecError, InputError
from fusionrec.pipeline.io.storage import write_json
from fusionrec.pipeline.io.streaming import ParquetSink, build_index_from_parquet, iter_table, vector_row_group_rows
from fusionrec.pipeline.retrieval.faiss_index import (
    EXACT_MAX_ITEMS,
    choose_factory,
    default_nlist,
    index_memory_bytes,
    load_index,
    recall_bound,
    save_index,
    search,
    search_param_name,
    set_search_params,
    set_threads,
    smallest_passing,
)
from fusionrec.pipeline.retrieval.fusion import Blocks, fused_score, item_matrix, query_matrix
from fusionrec.ranker.model import Ranker
from fusionrec.ranker.serving.export import TOPK_SCHEMA

log = logging.getLogger("fusionrec.batch")
INDEX_FILE = "index.faiss"
INDEX_META_FILE = "index.json"
CONFIG_FILE = "nightly.json"
RANKER_DIR = "ranker"  # the ranker of a nightly.json written before it named the folder
RANKER_PREFIX = "ranker-"  # each training's own folder, named in nightly.json
TOPK_ARROW = pl.DataFrame(schema=TOPK_SCHEMA).to_arrow().schema
INDEX_MEMORY_BUDGET = 2 << 30  # "auto": IVF-Flat while the float vectors fit this
SQ8_MEMORY_BUDGET = 6 << 30  # "auto": past that, IVF-SQ8 while its one-byte codes fit this, else IVF-PQ


@dataclass(frozen=True)
class NightlyConfig:
    """Sizes of the batched path. depth: candidates fetched from the index and re-scored
    exactly; keep: the best re-scored ones the ranker sees; k: exported per user; nprobe
    (IVF) or ef_search (HNSW): the index's search depth."""

    k: int = 10
    depth: int = 100
    keep: int = 50
    nprobe: int = 32
    ef_search: int = 128
    batch_users: int = 512
    train_users: int = 20_000
    max_train_rows: int = 500_000
    n_estimators: int = 100
    num_leaves: int = 31
    threads: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "seed" and (not isinstance(value, int) or value < 1):
                raise FusionrecError(f"nightly setting {f.name} must be a positive integer, not {value!r}")
        if not self.k <= self.keep <= self.depth:
            raise FusionrecError(f"nightly settings need k <= keep <= depth, not {self.k}, {self.keep}, {self.depth}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> NightlyConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


# --------------------------------------------------------------------------- index


def batch_factory(n: int, d: int, *, memory_budget: int = INDEX_MEMORY_BUDGET,
                  sq8_budget: int = SQ8_MEMORY_BUDGET, exact_max: int = EXACT_MAX_ITEMS) -> str:
    """The batched path's "auto" index for n items of d dimensions.

    `choose_factory` (exact search for small catalogues, IVF-Flat while n * d * 4 bytes fit
    `memory_budget`); past that IVF-SQ8 while its codes, n * d bytes, fit `sq8_budget`, and
    IVF-PQ beyond. SQ8 before PQ: the export re-scores exactly only the `depth` candidates
    the index hands over, and with PQ48 codes recall@10 flattened near 0.85 however deep the
    search, where SQ8's kept rising (1M items, nprobe 64: 0.906 against 0.855; docs/scale.md).
    """
    factory = choose_factory(n, d, memory_budget=memory_budget, exact_max=exact_max)
    if ",PQ" in factory and n * d <= sq8_budget:
        return f"IVF{default_nlist(n)},SQ8"
    return factory


def build_item_index(work: Path | str, factory: str = "auto", *, train_size: int | None = None, niter: int = 20,
                     memory_budget: int = INDEX_MEMORY_BUDGET, sq8_budget: int = SQ8_MEMORY_BUDGET, seed: int = 0,
                     threads: int | None = None) -> dict:
    """`index.faiss` from items/fused.parquet, trained on a sample and filled in chunks.

    factory "auto": `batch_factory` with `memory_budget` and `sq8_budget` (IVF-Flat, then
    IVF-SQ8, then IVF-PQ as the catalogue grows); or any FAISS factory string. Returns what
    was built.
    """
    work = Path(work)
    items = FusedTable.open(work / "items")
    d = sum(items.dims)
    if factory in ("", "auto"):
        factory = batch_factory(items.rows, d, memory_budget=memory_budget, sq8_budget=sq8_budget)
    set_threads(threads)
    timings: dict[str, float] = {}
    index, _ = build_index_from_parquet(items.directory / "fused.parquet", factory, train_size=train_size, seed=seed,
                                        niter=niter, id_column=None, batch_rows=vector_row_group_rows(d),
                                        timings=timings)
    save_index(index, work / INDEX_FILE)
    # After the index, never before: a build stopped between the two leaves the new index beside
    # the last one's fingerprint, refused until rebuilt, never an old index vouched for as new.
    write_json({"items": items.rows, "dimension": d, "ids_sha256": items.ids_sha256(), "vectors_sha256": items.vectors_digest,
                "factory": factory}, work / INDEX_META_FILE)
    return {"factory": factory, "ntotal": int(index.ntotal), "memory_bytes": index_memory_bytes(index), **timings}


# --------------------------------------------------------------------------- one batch of users


@dataclass
class Candidates:
    """The `keep` best re-scored candidates of a batch of users, (B, keep) each; item -1 and
    score -inf where a user has fewer candidates."""

    users: np.ndarray     # (B,) user rows
    items: np.ndarray     # (B, keep) item rows
    scores: np.ndarray    # (B, keep) exact s(u, i)
    sims: np.ndarray      # (B, keep, M) per-modality cosines, NaN where either side lacks m


class NightlyContext:
    """Everything a batch needs, opened once per process (or Ray actor): the index, the
    memory-mapped blocks, masks and popularity, the weights and the settings. `mmap_index`:
    the index's codes stay in the file (`load_index(mmap=True)`), so the Ray actors of a node
    share one copy in the page cache."""

    def __init__(self, work: Path | str, config: NightlyConfig | None = None, *, mmap_index: bool = False) -> None:
        self.work = Path(work)
        self.config = config or NightlyConfig()
        self.items = FusedTable.open(self.work / "items")
        self.users = FusedTable.open(self.work / "users")
        if (self.items.names, self.items.dims) != (self.users.names, self.users.dims):
            raise FusionrecError(f"users have modalities {dict(zip(self.users.names, self.users.dims))}, items "
                                 f"{dict(zip(self.items.names, self.items.dims))}: fuse both with the same tables")
        if not (self.work / INDEX_FILE).is_file():
            raise FusionrecError(f"{self.work} has no {INDEX_FILE}: build the item index first")
        self.index = load_index(self.work / INDEX_FILE, mmap=mmap_index)
        if (self.index.ntotal, self.index.d) != (self.items.rows, sum(self.items.dims)):
            # Its rows are item rows: an index of an earlier fusion finds other items, or rows past the end.
            raise FusionrecError(f"{self.work / INDEX_FILE} holds {self.index.ntotal} items of {self.index.d} "
                                 f"dimensions, the fused items are {self.items.rows} of {sum(self.items.dims)}: "
                                 "the items were fused again after it was built; build the item index again")
        self._check_index_items()
        param = search_param_name(self.index)
        if param is not None:
            set_search_params(self.index, {param: self.config.nprobe if param == "nprobe" else self.config.ef_search})
        self.item_blocks, self.item_mask = self.items.blocks(), self.items.mask()
        self.user_blocks, self.user_mask = self.users.blocks(), self.users.mask()
        self.popularity = np.log1p(np.maximum(self.items.popularity(), 0)).astype(np.float32)
        self.weights = np.asarray(self.items.weights)
        self.timings: dict[str, float] = {"search": 0.0, "rescore": 0.0, "features": 0.0, "predict": 0.0}
        self._ids: tuple[pa.Array, pa.Array] | None = None

    def _check_index_items(self) -> None:
        """Refuse an index built for other item ids or another order of them: its rows are item
        rows, so it would hand over other items than it found, silently (the counts match).
        Warn of one built on other vectors of the same ids: the lists stay right, recall falls."""
        index, meta_path = self.work / INDEX_FILE, self.work / INDEX_META_FILE
        if not meta_path.is_file():
            # built before index.json existed: only its size can be checked, as it was then
            log.warning("%s has no %s (built before the item order was recorded): only its item count and "
                        "dimension are checked; build the item index again to have the item ids checked too",
                        index, INDEX_META_FILE)
            return
        try:
            meta = json.loads(meta_path.read_text())
            built_for, built_on = meta["ids_sha256"], meta.get("vectors_sha256")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise FusionrecError(f"cannot read the item fingerprint of {index} in {meta_path} "
                                 f"({type(exc).__name__}: {exc}): build the item index again") from None
        current = self.items.ids_sha256()
        if built_for != current:
            raise FusionrecError(f"{index} was built for other item ids, or another order of them, than the fused "
                                 f"items in {self.items.directory} (ids_sha256 {str(built_for)[:12]}... in "
                                 f"{INDEX_META_FILE}, {current[:12]}... now): the items were fused again after it "
                                 "was built; build the item index again (build_item_index)")
        if self.items.vectors_digest is not None and built_on != self.items.vectors_digest:
            # Same ids, other vectors (items embedded again): every score stays exact (re-scored
            # from the blocks), but candidates are found by the old vectors, so recall falls for
            # the items that changed. Loud, not fatal: the lists stay right, and a large index
            # is rebuilt when its owner chooses. (An index.json without the digest is older.)
            log.warning("%s was built on other vectors of these items than %s holds now (vectors_sha256 %s in %s, "
                        "%s... in %s): candidates are found by the old vectors, their scores stay exact; build the "
                        "item index again (build_item_index)", index, self.items.directory,
                        f"{built_on[:12]}..." if built_on else "none", INDEX_META_FILE,
                        self.items.vectors_digest[:12], META_FILE)

    def ids(self) -> tuple[pa.Array, pa.Array]:
        """(user ids, item ids) in row order, read on first use."""
        if self._ids is None:
            self._ids = (self.users.ids(), self.items.ids())
        return self._ids

    def queries(self, users: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """q_u = concat_m(a_{u,m} u_{u,m}) of `fusion.query_matrix` for these user rows
        (`rows`: their blocks, when already read)."""
        mats = self.users.split(self.user_blocks[users] if rows is None else rows)
        return query_matrix(Blocks(users, self.users.names, mats, self.user_mask[users]), self.weights)

    def candidates(self, users: np.ndarray) -> Candidates:
        """Search `depth` candidates per user, re-score them exactly from the memory-mapped
        blocks and keep the best `keep` (ties: lower item row first)."""
        cfg = self.config
        users = np.asarray(users, dtype=np.int64)
        user_rows = self.user_blocks[users].astype(np.float32, copy=False)
        t0 = time.perf_counter()
        _, found = search(self.index, self.queries(users, user_rows), cfg.depth)
        t1 = time.perf_counter()
        valid = found >= 0
        wanted = np.unique(found[valid])  # ascending rows: the memory map is read in file order
        where = np.searchsorted(wanted, np.where(valid, found, wanted[0] if len(wanted) else 0))
        pairs = self.item_blocks[wanted].astype(np.float32, copy=False)[where]  # (B, depth, D)
        sims = np.empty(found.shape + (len(self.items.dims),), dtype=np.float32)
        for m, (o, d) in enumerate(zip(self.items.offsets, self.items.dims)):
            # one (depth, d) x (d,) product per user: each user's values do not depend on the batch
            sims[:, :, m] = np.matmul(pairs[:, :, o:o + d], user_rows[:, o:o + d, None])[..., 0]
        item_mask = self.item_mask[np.where(valid, found, 0)] & valid[:, :, None]
        avail = self.user_mask[users][:, None, :] & item_mask
        scores = fused_score(sims.astype(np.float64), avail, self.weights)
        scores = np.where(valid & np.isfinite(scores), scores, -np.inf)
        order = np.lexsort((np.where(valid, found, np.iinfo(np.int64).max), -scores), axis=-1)[:, :cfg.keep]
        items = np.take_along_axis(found, order, 1)
        scores = np.take_along_axis(scores, order, 1)
        items = np.where(np.isfinite(scores), items, -1)
        sims = np.where(np.take_along_axis(avail, order[:, :, None], 1), np.take_along_axis(sims, order[:, :, None], 1),
                        np.nan)
        self.timings["search"] += t1 - t0
        self.timings["rescore"] += time.perf_counter() - t1
        return Candidates(users, items, scores, sims)

    def features(self, cand: Candidates) -> pl.DataFrame:
        """One row per (user, candidate): user_row, item_row and the ranker's features."""
        t0 = time.perf_counter()
        b, keep = cand.items.shape
        ok = (cand.items >= 0).ravel()
        rank = np.broadcast_to(np.arange(1, keep + 1, dtype=np.int32), (b, keep))
        best = cand.scores[:, :1]
        items = cand.items.ravel()[ok]
        columns: dict[str, Any] = {
            "user_row": np.repeat(cand.users, keep)[ok],
            "item_row": items,
            "retrieval_score": cand.scores.ravel()[ok],
            "retrieval_rank": rank.ravel()[ok],
            "retrieval_gap": (best - cand.scores).ravel()[ok],  # how far below the user's best candidate
            "item_popularity": self.popularity[items],
        }
        for m, name in enumerate(self.items.names):
            columns[f"sim_{name}"] = cand.sims[:, :, m].ravel()[ok]
        frame = pl.DataFrame(columns).with_columns(pl.col(f"sim_{n}").fill_nan(None) for n in self.items.names)
        self.timings["features"] += time.perf_counter() - t0
        return frame


FEATURE_COLUMNS = ("retrieval_score", "retrieval_rank", "retrieval_gap", "item_popularity")


def feature_names(ctx: NightlyContext) -> list[str]:
    return [*FEATURE_COLUMNS, *(f"sim_{n}" for n in ctx.items.names)]


def rank_batch(ctx: NightlyContext, ranker: Ranker, users: np.ndarray) -> pa.Table:
    """The top k of these user rows by ranker score (ties: retrieval rank), TOPK_SCHEMA columns."""
    feats = ctx.features(ctx.candidates(users))
    t0 = time.perf_counter()
    scored = feats.select("user_row", "item_row", "retrieval_score", "retrieval_rank") \
        .with_columns(pl.Series("score", ranker.predict(feats) if feats.height else np.zeros(0), dtype=pl.Float64))
    top = scored.sort(["user_row", "score", "retrieval_rank"], descending=[False, True, False]) \
        .group_by("user_row", maintain_order=True).head(ctx.config.k) \
        .with_columns((pl.col("score").cum_count().over("user_row")).cast(pl.Int32).alias("rank"))
    user_ids, item_ids = ctx.ids()
    table = pa.table({
        "user_id": user_ids.take(pa.array(top["user_row"].to_numpy())),
        "rank": top["rank"].to_arrow(),
        "item_id": item_ids.take(pa.array(top["item_row"].to_numpy())),
        "score": top["score"].to_arrow(),
        "retrieval_score": top["retrieval_score"].cast(pl.Float32).to_arrow(),
        "source": pa.array(["ranker"] * top.height, pa.string()),
    })
    ctx.timings["predict"] += time.perf_counter() - t0
    return table.cast(TOPK_ARROW)


# --------------------------------------------------------------------------- training


def training_users(n_users: int, size: int, seed: int = 0) -> np.ndarray:
    """The seeded sample of user rows the ranker is trained on, ascending."""
    if size >= n_users:
        return np.arange(n_users, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n_users, size, replace=False)).astype(np.int64)


def read_labels(path: Path | str, ctx: NightlyContext, users: np.ndarray, batch_rows: int = 262_144) -> pl.DataFrame:
    """(user_row, item_row, label) of a labels table (user_id, item_id, label: a non-negative
    integer), streamed, keeping only the rows of `users` whose item the catalog has."""
    path = Path(path)
    user_lookup, item_lookup = IdLookup.of(ctx.users), IdLookup.of(ctx.items)
    kept: list[pl.DataFrame] = []
    offset = 0
    for frame in iter_table(path, ["user_id", "item_id", "label"], batch_rows):
        label = frame["label"].cast(pl.Int64, strict=False)
        bad = label.is_null() | (label < 0)
        if bad.any():
            raise InputError("label must be a non-negative integer", file=str(path),
                             row=offset + int(np.flatnonzero(bad.to_numpy())[0]) + 1, field="label")
        urow = user_lookup.rows(frame["user_id"])
        pos = np.minimum(np.searchsorted(users, urow), len(users) - 1)
        mine = users[pos] == urow
        irow = item_lookup.rows(frame["item_id"].filter(pl.Series(mine)))
        part = pl.DataFrame({"user_row": urow[mine], "item_row": irow, "label": label.filter(pl.Series(mine))})
        kept.append(part.filter(pl.col("item_row") >= 0))
        offset += frame.height
    if not kept:
        return pl.DataFrame(schema={"user_row": pl.Int64, "item_row": pl.Int64, "label": pl.Int64})
    # one label per pair: the highest
    return pl.concat(kept).group_by("user_row", "item_row").agg(pl.col("label").max())


def train_ranker(work: Path | str, labels: Path | str, config: NightlyConfig | None = None) -> dict:
    """Fit the ranker on at most `train_users` sampled users and `max_train_rows` rows.

    The sample's users are retrieved and featured by the batched path itself (so training
    sees the features serving computes); candidates without a label get 0; users with no
    labelled candidate are left out (lambdarank learns nothing from them); users are added
    in row order until the next would pass `max_train_rows`. Writes the ranker to a folder
    of its own, `ranker-<id>/`, then `nightly.json` (the settings, that folder and the model's
    digest), then removes the earlier rankers; returns the sample's counts.
    """
    work = Path(work)
    cfg = config or NightlyConfig()
    set_threads(cfg.threads)
    ctx = NightlyContext(work, cfg)
    sample = training_users(ctx.users.rows, cfg.train_users, cfg.seed)
    known = read_labels(labels, ctx, sample)
    parts: list[pl.DataFrame] = []
    rows = users_kept = 0
    full = False
    for s in range(0, len(sample), cfg.batch_users):
        feats = ctx.features(ctx.candidates(sample[s:s + cfg.batch_users]))
        feats = feats.join(known, on=["user_row", "item_row"], how="left", maintain_order="left") \
            .with_columns(pl.col("label").fill_null(0))
        useful = feats.group_by("user_row", maintain_order=True).agg(pl.col("label").max().alias("best"),
                                                                     pl.len().alias("n")).filter(pl.col("best") > 0)
        sizes = useful["n"].to_numpy()
        room = int(np.searchsorted(np.cumsum(sizes), cfg.max_train_rows - rows, side="right"))
        take = useful["user_row"][:room]
        parts.append(feats.filter(pl.col("user_row").is_in(take.implode())))
        rows += int(sizes[:room].sum())
        users_kept += room
        if room < len(sizes):
            full = True
            break
    if rows == 0 and full:  # the first user with a labelled candidate alone passes the cap
        raise FusionrecError(f"max_train_rows ({cfg.max_train_rows}) is below the {int(sizes[0])} candidate rows of "
                             f"one user: raise it to at least keep ({cfg.keep})")
    if rows == 0:
        raise FusionrecError(f"none of the {len(sample)} sampled users has a labelled item among their candidates "
                             f"({known.height} labels matched): check the labels table {labels}")
    train = pl.concat(parts)
    ranker = Ranker("lambdarank", n_estimators=cfg.n_estimators, num_leaves=cfg.num_leaves, seed=cfg.seed,
                    num_threads=cfg.threads, early_stopping_rounds=None, features=feature_names(ctx))
    t0 = time.perf_counter()
    ranker.fit(train, train["label"], group_ids=train["user_row"])
    fit_s = time.perf_counter() - t0
    # nightly.json, replaced atomically once the new folder is complete, is the one switch from
    # the last ranker and settings to the new pair: a stop before it leaves the last pair in use,
    # one after it the new pair (the folders it no longer names are removed next).
    folder = f"{RANKER_PREFIX}{uuid.uuid4().hex[:12]}"
    ranker.save(work / folder)
    try:
        previous = ranker_folder(work)[0].name
    except FusionrecError:  # no pair yet, or a nightly.json naming no folder of ours
        previous = None
    write_json({**asdict(cfg), "ranker": folder, "ranker_sha256": ranker.model_sha256_}, work / CONFIG_FILE)
    _remove_other_rankers(work, {folder, previous} - {None})
    return {"sampled_users": int(len(sample)), "labels_matched": int(known.height), "train_users": users_kept,
            "train_rows": rows, "capped": full, "positives": int((train["label"] > 0).sum()), "fit_s": fit_s,
            **ctx.timings}


def _remove_other_rankers(work: Path, keep: set) -> None:
    """Remove the ranker folders other than `keep`: nightly.json's and the one it named before
    (an export that began before the switch goes on reading that one), so the older pairs' and
    any a stopped training left half-written."""
    for path in work.iterdir():
        if path.is_dir() and path.name not in keep and (path.name == RANKER_DIR or path.name.startswith(RANKER_PREFIX)):
            shutil.rmtree(path, ignore_errors=True)  # one left behind is unused, and removed at the next training


def ranker_folder(work: Path | str) -> tuple[Path, str | None]:
    """The ranker folder nightly.json pairs with its settings, and the model digest it recorded.

    A nightly.json written before it named its folder (or none at all) pairs with `ranker/`,
    unchecked, as then.
    """
    folder, digest, _ = _pair_values(Path(work))
    return folder, digest


def ranker_pair(work: Path | str) -> tuple[Path, str | None, NightlyConfig | None]:
    """`ranker_folder` and the settings that ranker was trained with, from one read of
    nightly.json (a training may replace the file between two reads); no settings where
    there is no nightly.json."""
    work = Path(work)
    folder, digest, values = _pair_values(work)
    return folder, digest, None if values is None else _settings(work, values)


def _pair_values(work: Path) -> tuple[Path, str | None, dict[str, Any] | None]:
    """The ranker folder and model digest nightly.json names, and its values as read (the
    settings unchecked: a training replacing a nightly.json with a bad setting still knows
    which folder it named)."""
    if not (work / CONFIG_FILE).is_file():
        if not (work / RANKER_DIR).is_dir():
            raise FusionrecError(f"{work} has no {CONFIG_FILE}: train the ranker first")
        return work / RANKER_DIR, None, None
    values = _read_settings(work)
    name = values.get("ranker", RANKER_DIR)
    ours = isinstance(name, str) and (name == RANKER_DIR or name.startswith(RANKER_PREFIX)) and Path(name).name == name
    if not ours:  # a folder of this work directory only, never a path elsewhere
        raise FusionrecError(f"{work / CONFIG_FILE}: 'ranker' must name a ranker folder in {work}, not {name!r}; "
                             "train the ranker again")
    digest = values.get("ranker_sha256")
    return work / name, None if digest is None else str(digest), values


def _settings(work: Path, values: dict[str, Any]) -> NightlyConfig:
    """nightly.json's settings, a bad one named with the file."""
    try:
        return NightlyConfig.from_dict(values)
    except FusionrecError as exc:
        raise FusionrecError(f"{work / CONFIG_FILE}: {exc}; train the ranker again") from None


def load_ranker(folder: Path, digest: str | None) -> Ranker:
    """The ranker in `folder` (`ranker_folder`), refused when it is not the model `digest` names."""
    ranker = Ranker.load(folder)
    if digest is not None and ranker.model_sha256_ != digest:
        raise FusionrecError(f"{folder} holds another model (sha256 {ranker.model_sha256_[:12]}...) than the one "
                             f"{folder.parent / CONFIG_FILE} pairs its settings with ({digest[:12]}...): "
                             "train the ranker again (train_ranker)")
    return ranker


# --------------------------------------------------------------------------- the index's search depth

TUNE_USERS = 300  # users whose exact top k the search depth is tuned against


def exact_topk(ctx: NightlyContext, users: np.ndarray, k: int, step: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """Exact top k (scores, item rows) over every item for users with every modality (for
    them s(u, i) is <q_u, v_i> of `fusion.item_matrix`), streamed over the memory-mapped
    blocks `step` items at a time."""
    queries = ctx.queries(users)
    best_s = np.full((len(users), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(users), k), -1, dtype=np.int64)
    for s in range(0, ctx.items.rows, step):
        e = min(s + step, ctx.items.rows)
        vectors = item_matrix(Blocks(np.arange(s, e), ctx.items.names, ctx.items.split(ctx.item_blocks[s:e]),
                                     ctx.item_mask[s:e]), ctx.weights)
        sc, ix = faiss.knn(queries, vectors, min(k, e - s), metric=faiss.METRIC_INNER_PRODUCT)
        sc, ix = np.hstack([best_s, sc]), np.hstack([best_i, ix + s])
        order = np.argsort(-sc, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(sc, order, 1), np.take_along_axis(ix, order, 1)
    return best_s, best_i


def retrieval_recall(cand: Candidates, exact_scores: np.ndarray) -> np.ndarray:
    """Per user, the share of the exact top k (k: `exact_scores`' width) among the first k
    re-scored candidates; an item counts when its exact score reaches the exact k-th (ties)."""
    k = exact_scores.shape[1]
    return np.minimum((cand.scores[:, :k] >= exact_scores[:, -1:] - 1e-5).sum(axis=1), k) / k


def tuning_users(ctx: NightlyContext, users: int = TUNE_USERS, seed: int = 3) -> np.ndarray:
    """The user rows `tune_nprobe` measures on: a seeded sample of users with every modality."""
    full = np.flatnonzero(ctx.user_mask.all(axis=1))
    if len(full) == 0:
        raise FusionrecError("no user has every modality: the exact top k to tune against is not defined")
    return np.sort(np.random.default_rng(seed).choice(full, min(users, len(full)), replace=False))


def tune_nprobe(work: Path | str, config: NightlyConfig | None = None, *, target_recall: float = 0.95,
                users: int = TUNE_USERS, seed: int = 3, z: float = 1.645) -> dict:
    """The smallest nprobe at which the exported retrieval (search `depth`, exact re-scoring,
    first k) holds `target_recall` of the exact top k, measured on `users` sampled users
    with every modality. A value passes when the one-sided 95% lower bound of the mean
    recall (mean - z x standard error) reaches the target; when even every list falls short,
    nprobe is the number of lists, `reached` is false and a warning says so. When the
    ranker's settings (`nightly.json`) exist, their nprobe is replaced, so
    `export_topk(work, read_config(work))` uses it; a `config` whose k, depth or keep differ
    from them is refused (the nprobe would be measured at another depth than the export's).
    An index without nprobe (Flat, HNSW) is left as it is.

    Returns {"nprobe", "reached", "target_recall", "users", "trials": [{nprobe, recall,
    recall_lower_bound, ms_per_user}], "seconds"}.
    """
    work = Path(work)
    if not 0.0 < target_recall <= 1.0:
        raise FusionrecError(f"target_recall must be in (0, 1], not {target_recall}")
    if users < 2:
        raise FusionrecError(f"tune_nprobe needs at least 2 users to bound the recall, not {users}")
    raw = _read_settings(work) if (work / CONFIG_FILE).is_file() else None
    saved = None if raw is None else _settings(work, raw)
    cfg = config or saved or NightlyConfig()
    if saved is not None and (cfg.k, cfg.depth, cfg.keep) != (saved.k, saved.depth, saved.keep):
        raise FusionrecError(f"the config's k, depth and keep ({cfg.k}, {cfg.depth}, {cfg.keep}) differ from the "
                             f"export's in {work / CONFIG_FILE} ({saved.k}, {saved.depth}, {saved.keep}): an nprobe "
                             "tuned at one depth does not hold at another")
    set_threads(cfg.threads)
    t0 = time.perf_counter()
    ctx = NightlyContext(work, cfg)
    if search_param_name(ctx.index) != "nprobe":
        return {"nprobe": cfg.nprobe, "reached": True, "target_recall": target_recall, "users": 0, "trials": [],
                "seconds": 0.0, "note": "the index has no nprobe (exact or HNSW): nothing to tune"}
    sample = tuning_users(ctx, users, seed)
    exact_scores, _ = exact_topk(ctx, sample, cfg.k)
    trials: dict[int, dict[str, float]] = {}

    def passes(nprobe: int) -> bool:
        if nprobe not in trials:
            set_search_params(ctx.index, {"nprobe": nprobe})
            started = time.perf_counter()
            per_user = retrieval_recall(ctx.candidates(sample), exact_scores)
            ms = 1000 * (time.perf_counter() - started) / len(sample)
            trials[nprobe] = {"nprobe": nprobe, **recall_bound(per_user, z), "ms_per_user": ms}
        return trials[nprobe]["recall_lower_bound"] >= target_recall

    nprobe, reached = smallest_passing(passes, 1, int(faiss.extract_index_ivf(ctx.index).nlist))
    if not reached:
        log.warning("no nprobe reaches recall %.3f of the exact top %d (at %d, every list, the lower bound is %.3f): "
                    "a larger depth or another index is needed", target_recall, cfg.k, nprobe,
                    trials[nprobe]["recall_lower_bound"])
    if raw is not None:  # the ranker folder and digest it names stay
        write_json({**raw, "nprobe": nprobe}, work / CONFIG_FILE)
    return {"nprobe": nprobe, "reached": reached, "target_recall": target_recall, "users": int(len(sample)),
            "trials": [trials[v] for v in sorted(trials)], "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------- every user's top k


def user_batches(n_users: int, batch_users: int) -> list[tuple[int, int]]:
    return [(s, min(s + batch_users, n_users)) for s in range(0, n_users, batch_users)]


def iter_topk(work: Path | str, config: NightlyConfig | None = None, *, engine: str = "local",
              ray_config: RayConfig | None = None, users: tuple[int, int] | None = None,
              timings: dict[str, float] | None = None) -> Iterator[pa.Table]:
    """Top-k tables, one per batch of users, in user row order. users: (first, stop) rows
    only (default all). engine "ray": the batches on a pool of Ray actors, each opening the
    work directory once; the same tables as "local". config: default the settings the ranker
    was trained with (`read_config`); one whose depth or keep differ from them is refused."""
    work = Path(work)
    if engine not in ("local", "ray"):
        raise FusionrecError(f"engine must be 'local' or 'ray', not {engine!r}")
    n = FusedTable.open(work / "users").rows
    # resolved once: the actors load this folder even if a training switches nightly.json meanwhile
    folder, digest, trained = ranker_pair(work)
    cfg = config or trained or NightlyConfig()
    if trained is not None and (cfg.depth, cfg.keep) != (trained.depth, trained.keep):
        # The ranker learned on `keep` of `depth` re-scored candidates (their ranks among its
        # features); settings read before a training switched nightly.json would pair the new
        # ranker with the old sizes.
        raise FusionrecError(f"the export's depth and keep ({cfg.depth}, {cfg.keep}) differ from those the ranker "
                             f"in {folder} was trained with ({trained.depth}, {trained.keep}, {work / CONFIG_FILE}): "
                             "export with read_config(work), or train the ranker with these sizes")
    first, stop = users or (0, n)
    batches = [(s + first, e + first) for s, e in user_batches(min(stop, n) - first, cfg.batch_users)]
    if engine == "local":
        set_threads(cfg.threads)
        ctx = NightlyContext(work, cfg)
        ranker = load_ranker(folder, digest)
        for s, e in batches:
            yield rank_batch(ctx, ranker, np.arange(s, e))
        if timings is not None:
            timings.update(ctx.timings)
        return
    rc = ray_config or RayConfig()
    import_ray()
    if not batches:
        return
    with ray_runtime(rc) as ray:
        for out in ordered_actor_calls(ray, RankActor, {"work": str(work), "config": asdict(cfg),
                                                        "ranker": str(folder), "digest": digest}, batches,
                                       min(rc.num_actors, len(batches)), "nightly scoring"):
            if out.num_rows:
                yield out.cast(TOPK_ARROW)


class RankActor:
    """One Ray actor of `ordered_actor_calls` (one CPU, one thread in every library, FAISS's
    OpenMP included): the work directory opened once, then `rank_batch` on (start, stop) rows."""

    def __init__(self, work: str, config: dict[str, Any], ranker: str, digest: str | None) -> None:
        cfg = NightlyConfig.from_dict(config)
        self.ctx = NightlyContext(work, cfg, mmap_index=True)
        self.ranker = load_ranker(Path(ranker), digest)

    def run(self, rows: tuple[int, int]) -> pa.Table:
        return rank_batch(self.ctx, self.ranker, np.arange(*rows))


def export_topk(work: Path | str, out: Path | str, config: NightlyConfig | None = None, *, engine: str = "local",
                ray_config: RayConfig | None = None, users: tuple[int, int] | None = None) -> dict:
    """Every user's top k streamed to one Parquet file (atomic), a batch of users at a time."""
    out = Path(out)
    if out.suffix.lower() != ".parquet":
        raise FusionrecError(f"the nightly export is Parquet: {out} does not end in .parquet")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    users_out = 0
    with ParquetSink(out, TOPK_ARROW) as sink:
        for table in iter_topk(work, config, engine=engine, ray_config=ray_config, users=users, timings=timings):
            users_out += int((table.column("rank").to_numpy() == 1).sum())
            sink.write(table)
    return {"rows": sink.rows, "users": users_out, "seconds": time.perf_counter() - t0, **timings}


def read_config(work: Path | str) -> NightlyConfig:
    """The settings the ranker was trained with (`nightly.json`), for the export to reuse."""
    return _settings(Path(work), _read_settings(Path(work)))


def _read_settings(work: Path) -> dict[str, Any]:
    """nightly.json as written: the settings, and the ranker folder and digest they pair with."""
    path = work / CONFIG_FILE
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FusionrecError(f"cannot read {path} ({exc}): train the ranker first") from None
    if not isinstance(values, dict):
        raise FusionrecError(f"cannot read {path} (not a JSON object): train the ranker first")
    return values
