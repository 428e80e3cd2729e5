"""Persistence of a fitted Retriever: index.faiss, items.parquet, users.parquet,
seen.parquet and retriever.json (written last, naming the sha256 of the other four and of the stage's partner files, so a set
half replaced by a killed save is refused on load instead of served)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import polars as pl
import scipy.sparse as sp

from fusionrec.pipeline.errors import FusionrecError
from fusionrec.pipeline.io.storage import sha256_file
from fusionrec.pipeline.retrieval import faiss_index as fidx
from fusionrec.pipeline.retrieval.fusion import Blocks
from fusionrec.pipeline.retrieval.params import RetrieverParams
from fusionrec.pipeline.retrieval.profiles import interaction_matrix

FORMAT_VERSION = 1
SAVED_FILES = ("index.faiss", "items.parquet", "users.parquet", "seen.parquet")


@dataclass
class Stored:
    """Everything a fitted Retriever keeps: `save` writes one, `load` reads one back."""

    params: RetrieverParams
    modalities: tuple[str, ...]
    weights: dict[str, float]
    attention_beta: float
    modality_means: dict[str, np.ndarray]
    mean_sq: dict[str, float]
    search_params: dict[str, int]
    tuning: dict[str, Any]
    validation: dict[str, Any]
    validation_recall: float | None
    timings: dict[str, float]
    index_info: dict[str, Any]
    unused_user_modalities: list[str]
    n_unknown_item_rows: int
    item_blocks: Blocks
    user_blocks: Blocks
    user_weights: np.ndarray
    user_kappa: np.ndarray
    seen: sp.csr_matrix
    index: faiss.Index
    # Set by `load`: the sha256 it checked of each file retriever.json names (index files and
    # the stage's partners), by normalised path, so a caller need not hash them again.
    verified: dict[str, str] = field(default_factory=dict)


def save(stored: Stored, directory: Path, partners: tuple[str, ...] = ()) -> None:
    """index.faiss, items.parquet, users.parquet, seen.parquet, retriever.json (written last).

    partners: more files (paths relative to `directory`, e.g. "../sources/sources.json") written
    before it by the same stage; retriever.json names their sha256 too, so a set the stage
    stopped saving (Ctrl-C, a crash, a full disk) is refused on load, never served half new."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    mods = stored.modalities
    fidx.save_index(stored.index, d / "index.faiss")
    _write_parquet(_blocks_frame(stored.item_blocks, "item_id"), d / "items.parquet")
    uf = _blocks_frame(stored.user_blocks, "user_id").with_columns(
        [pl.Series(f"attn_{m}", stored.user_weights[:, j].astype(np.float64)) for j, m in enumerate(mods)]
        + [pl.Series(f"kappa_{m}", stored.user_kappa[:, j].astype(np.float64)) for j, m in enumerate(mods)])
    _write_parquet(uf, d / "users.parquet")
    coo = stored.seen.tocoo()
    _write_parquet(pl.DataFrame({"user_id": stored.user_blocks.ids[coo.row].astype(str),
                                 "item_id": stored.item_blocks.ids[coo.col].astype(str)},
                                schema={"user_id": pl.Utf8, "item_id": pl.Utf8}), d / "seen.parquet")
    state: dict[str, Any] = {
        "format_version": FORMAT_VERSION, "params": stored.params.to_json(),
        "modalities": list(mods), "weights": stored.weights, "attention_beta": stored.attention_beta,
        "modality_means": {m: v.astype(float).tolist() for m, v in stored.modality_means.items()},
        "mean_sq": stored.mean_sq, "search_params": stored.search_params, "tuning": stored.tuning,
        "validation": stored.validation, "validation_recall": stored.validation_recall,
        "timings": stored.timings, "index_info": stored.index_info,
        "unused_user_modalities": stored.unused_user_modalities, "n_unknown_item_rows": stored.n_unknown_item_rows,
    }
    # retriever.json, written last, names the sha256 of its partner files: a set half
    # replaced by a killed save is refused on load instead of served.
    state["files"] = {name: sha256_file(d / name) for name in (*SAVED_FILES, *partners)}
    with fidx.atomic_path(d / "retriever.json") as tmp:
        tmp.write_text(json.dumps(state, indent=2, default=float))


def load(directory: Path, *, mmap: bool = False) -> Stored:
    """`save`'s files, checked against the hashes retriever.json names; the index is read, not
    rebuilt (mmap: memory-mapped, `faiss_index.load_index`)."""
    d = Path(directory)
    path = d / "retriever.json"
    if not path.exists():
        raise FusionrecError(f"{path}: no saved retriever here")
    state = json.loads(path.read_text())
    if state.get("format_version") != FORMAT_VERSION:
        raise FusionrecError(f"{path}: unsupported format_version {state.get('format_version')}")
    verified: dict[str, str] = {}
    for name, digest in state.get("files", {}).items():
        if not (d / name).is_file() or sha256_file(d / name) != digest:
            raise FusionrecError(f"{os.path.normpath(d / name)} does not belong to {path}: the index stage was "
                                 "interrupted while it saved, or the file changed since; run `fusionrec index` (or "
                                 "`fusionrec run`) again")
        verified[os.path.normpath(d / name)] = digest
    mods = tuple(state["modalities"])
    item_blocks = _frame_blocks(pl.read_parquet(d / "items.parquet"), "item_id", mods)
    uf = pl.read_parquet(d / "users.parquet")
    user_blocks = _frame_blocks(uf, "user_id", mods)
    seen = pl.read_parquet(d / "seen.parquet")
    index = fidx.load_index(d / "index.faiss", mmap=mmap)
    search_params = {k: int(v) for k, v in state["search_params"].items()}
    fidx.set_search_params(index, search_params)
    return Stored(
        params=RetrieverParams.from_json(state["params"]), modalities=mods,
        weights={k: float(v) for k, v in state["weights"].items()},
        attention_beta=float(state["attention_beta"]),
        modality_means={m: np.asarray(v, dtype=np.float32) for m, v in state["modality_means"].items()},
        mean_sq={k: float(v) for k, v in state["mean_sq"].items()}, search_params=search_params,
        tuning=state["tuning"], validation=state["validation"], validation_recall=state["validation_recall"],
        timings=state["timings"], index_info=state["index_info"],
        unused_user_modalities=state["unused_user_modalities"], n_unknown_item_rows=state["n_unknown_item_rows"],
        item_blocks=item_blocks, user_blocks=user_blocks,
        user_weights=np.column_stack([uf[f"attn_{m}"].to_numpy().astype(np.float64) for m in mods]),
        user_kappa=np.column_stack([uf[f"kappa_{m}"].to_numpy().astype(np.float64) for m in mods]),
        seen=interaction_matrix(seen, item_blocks.ids, half_life_days=None, user_ids=user_blocks.ids).seen,
        index=index, verified=verified)


def _blocks_frame(blocks: Blocks, id_col: str) -> pl.DataFrame:
    cols = [pl.Series(id_col, blocks.ids.astype(str), dtype=pl.Utf8)]
    for j, m in enumerate(blocks.names):
        cols.append(pl.Series(f"has_{m}", blocks.mask[:, j]))
        cols.append(pl.Series(f"vec_{m}", blocks.mats[j], dtype=pl.Array(pl.Float32, blocks.mats[j].shape[1])))
    return pl.DataFrame(cols)


def _frame_blocks(df: pl.DataFrame, id_col: str, names: tuple[str, ...]) -> Blocks:
    mats = tuple(np.ascontiguousarray(df[f"vec_{m}"].to_numpy(), dtype=np.float32).reshape(df.height, -1)
                 for m in names)
    mask = np.column_stack([df[f"has_{m}"].to_numpy() for m in names]) if names else np.zeros((df.height, 0), bool)
    return Blocks(df[id_col].to_numpy().astype(object), tuple(names), mats, mask)


def _write_parquet(df: pl.DataFrame, path: Path) -> None:
    with fidx.atomic_path(path) as tmp:
        df.write_parquet(tmp)
