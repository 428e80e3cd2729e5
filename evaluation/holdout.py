"""`fusionrec split`: a data directory into a train data directory and a held-out file.

    SPLIT/train/          items, users and media of DATA, interactions minus the held-out rows
    SPLIT/held_out.csv    the held-out interactions (user_id, item_id, timestamp, event, value)

Run the pipeline on SPLIT/train and evaluate against SPLIT/held_out.csv: the held-out rows
were never seen by any stage. Media files are hard-linked (or copied: `media="copy"`, or
when the output is on another file system) so they stay inside the new data directory; the
embedding job refuses symlinks that point outside it.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from fusionrec.evaluation.splits import global_temporal_split, leave_last_out, per_user_temporal_split
from fusionrec.pipeline.errors import FusionrecError, InputError
from fusionrec.pipeline.io.storage import check_out_folder, check_separate_dirs
from fusionrec.pipeline.io.tables import find_table, load_interactions, load_items

__all__ = ["PROTOCOLS", "SplitSummary", "split_data_dir"]

log = logging.getLogger("fusionrec.split")

PROTOCOLS = ("user", "global", "leave-last")
MEDIA_MODES = ("link", "copy")
HELD_OUT = "held_out.csv"


@dataclass(frozen=True)
class SplitSummary:
    train_dir: Path
    held_out: Path
    protocol: str
    train_rows: int
    held_out_rows: int
    held_out_users: int
    files_linked: int
    files_copied: int
    files_skipped: int = 0

    def rows(self) -> list[dict[str, object]]:
        return [{"table": "train interactions", "value": self.train_rows},
                {"table": "held-out interactions", "value": self.held_out_rows},
                {"table": "held-out users", "value": self.held_out_users},
                {"table": "files linked", "value": self.files_linked},
                {"table": "files copied", "value": self.files_copied},
                {"table": "files skipped", "value": self.files_skipped}]


def _place(src: Path, dst: Path, media: str) -> str:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if media == "link":
        try:
            os.link(src, dst)  # a hard link is a file of the new directory, not a pointer out of it
            return "linked"
        except OSError:
            pass  # another file system, or links not allowed: copy instead
    shutil.copy2(src, dst)
    return "copied"


def _regular_file(src: Path, root: Path) -> Path | None:
    """The regular file `src` names inside `root` (a symlink's target, when that stays inside),
    or None: a FIFO, socket or device, or a symlink that leaves the data directory, is not
    carried over. The embedding job refuses those media too; in the train folder the item
    keeps its row and the missing file is one more bad media row."""
    try:
        real = src.resolve(strict=True)
        mode = real.stat().st_mode
    except (OSError, RuntimeError):  # a broken or looping link
        return None
    if src.is_symlink() and root not in real.parents:
        return None
    return real if stat.S_ISREG(mode) else None


def split_data_dir(data_dir: Path, out_dir: Path, *, protocol: str = "user", test_fraction: float = 0.2,
                   media: str = "link", seed: int = 0) -> SplitSummary:
    """Write OUT/train (a data directory without the held-out rows) and OUT/held_out.csv."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    if protocol not in PROTOCOLS:
        raise InputError(f"--protocol must be one of {', '.join(PROTOCOLS)}, not {protocol!r}")
    if media not in MEDIA_MODES:
        raise InputError(f"--media must be link or copy, not {media!r}")
    if not 0.0 < test_fraction < 1.0:
        raise InputError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    if not data_dir.is_dir():
        raise InputError("is a file, not a data directory" if data_dir.exists() else "data directory does not exist",
                         file=str(data_dir))
    check_separate_dirs(data_dir, out_dir)
    check_out_folder(out_dir)
    src_root, dst_root = data_dir.resolve(), out_dir.resolve()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(f"--out {out_dir} already exists and is not empty; choose a new folder or remove it")

    items = load_items(data_dir)
    inter_path = find_table(data_dir, "interactions")
    assert inter_path is not None  # required=True raises otherwise
    interactions = load_interactions(data_dir, items)
    if protocol == "user":
        train, test = per_user_temporal_split(interactions, test_fraction, seed=seed)
    elif protocol == "global":
        train, test = global_temporal_split(interactions, test_fraction, seed=seed)
        if train.height and test.height and test["timestamp"].min() == train["timestamp"].max():
            tied = interactions.filter(pl.col("timestamp") == test["timestamp"].min()).height
            log.warning("split: %d interactions share the cut-off timestamp; they are split in the seeded hash order "
                        "(--seed), not by time", tied)
    else:
        train, test = leave_last_out(interactions, 1, seed=seed)
    if test.height == 0:
        raise InputError(f"the {protocol} protocol holds out no interaction (every user has too few); "
                         "try --protocol global", file=str(inter_path))

    # Built in a folder beside --out and renamed into place: a failed or killed split leaves no
    # half-written --out (a rerun is not refused as "not empty").
    try:
        dst_root.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{dst_root.name}.tmp-", dir=dst_root.parent))
    except OSError as exc:
        raise InputError(f"--out {out_dir} cannot be created: {exc.strerror or exc}") from None
    try:
        train_dir = work / "train"
        train_dir.mkdir()
        counts = {"linked": 0, "copied": 0, "skipped": 0}
        for src in sorted(data_dir.rglob("*")):
            rel = src.relative_to(data_dir)
            if rel.parts[0].startswith(".") or (len(rel.parts) == 1 and rel.stem == "interactions"):
                continue
            if src.is_dir() and not src.is_symlink():
                continue
            real = _regular_file(src, src_root)
            if real is None:
                counts["skipped"] += 1
                log.warning("split: %s is not carried over (a FIFO, device or socket, or a symlink out of the "
                            "data directory)", src)
                continue
            counts[_place(real, train_dir / rel, media)] += 1
        if inter_path.suffix == ".parquet":
            train.write_parquet(train_dir / "interactions.parquet")
        else:
            train.write_csv(train_dir / "interactions.csv")
        test.write_csv(work / HELD_OUT)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above): the rename takes its place
        os.replace(work, dst_root)
    except OSError as exc:  # a full disk, an unreadable media file: one line, not the crash path
        shutil.rmtree(work, ignore_errors=True)
        where = f" ({exc.filename})" if exc.filename else ""
        raise FusionrecError(f"split: cannot write {out_dir}: {exc.strerror or exc}{where}; nothing was "
                             "written") from None
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return SplitSummary(out_dir / "train", out_dir / HELD_OUT, protocol, train.height, test.height,
                        test.select(pl.col("user_id").n_unique()).item(), counts["linked"], counts["copied"],
                        counts["skipped"])
