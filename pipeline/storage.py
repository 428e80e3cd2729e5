"""Atomic writes, the artifacts lock and content hashes.

Every artifact appears by `os.replace` of a finished temporary file in the same
directory, so a killed job never leaves a partial file under its final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import FusionrecError, LockError

TMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` atomically."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FusionrecError(f"cannot create directory {path.parent}: {exc.strerror or exc}") from exc
    tmp = path.parent / f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{path.name}"
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _remove_quietly(tmp)
        raise FusionrecError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        _remove_quietly(tmp)
        raise


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir():
            import shutil

            shutil.rmtree(path)
        else:
            path.unlink()


def write_parquet(table: pa.Table, path: Path | str) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def write_json(obj: Any, path: Path | str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_text(text: str, path: Path | str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def clean_temporaries(directory: Path) -> int:
    """Remove temporary files a killed job left behind; returns how many."""
    removed = 0
    if directory.is_dir():
        for tmp in directory.rglob(f"{TMP_PREFIX}*"):
            _remove_quietly(tmp)
            removed += 1
    return removed


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ArtifactLock:
    """An exclusive lock on an artifacts directory (`ART/.lock`).

    The lock file holds the owner's pid and host. A lock whose process is gone on this
    host is stale: it is taken over, with a note in `taken_over_`.
    """

    def __init__(self, art_dir: Path | str) -> None:
        self.art_dir = Path(art_dir)
        self.path = self.art_dir / ".lock"
        self.taken_over_: dict | None = None

    def acquire(self) -> "ArtifactLock":
        try:
            self.art_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FusionrecError(f"cannot create artifacts directory {self.art_dir}: {exc.strerror or exc}") from exc
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read_holder()
                if holder is not None and (holder.get("host") != me["host"] or _pid_alive(int(holder.get("pid", -1)))):
                    raise LockError(
                        f"another fusionrec job (pid {holder.get('pid')} on {holder.get('host')}) is using "
                        f"{self.art_dir}; wait for it to finish or use another --out"
                    ) from None
                # Stale: its process is gone. Remove and retry.
                self.taken_over_ = holder or {}
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            except OSError as exc:
                raise FusionrecError(f"cannot write lock file {self.path}: {exc.strerror or exc}") from exc
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            return self
        raise LockError(f"could not take the lock {self.path}")

    def _read_holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        holder = self._read_holder()
        if holder is not None and holder.get("pid") == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> "ArtifactLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
