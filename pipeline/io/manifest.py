"""`ART/manifest.json`: one record per run (inputs and their hashes, config, model ids,
library versions, counts, timings), appended atomically."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from fusionrec.pipeline import interrupts
from fusionrec.pipeline.errors import FusionrecError, first_line
from fusionrec.pipeline.io.storage import (
    ArtifactLock,
    FileHashes,
    ReadLock,
    hold_flock,
    lock_file,
    sha256_file,
    write_json,
)

log = logging.getLogger("fusionrec.manifest")
LIBRARIES = ("fusionrec", "torch", "transformers", "timm", "librosa", "numpy", "pyarrow", "polars",
             "faiss-cpu", "lightgbm", "typer")


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def hash_inputs(data_dir: Path, hashes: FileHashes | None = None) -> dict[str, str]:
    """sha256 of each input table (media hashes live in the embedding tables' content_hash);
    through `hashes`, which remembers them between runs, when given."""
    digest_of = sha256_file if hashes is None else hashes.sha256
    out: dict[str, str] = {}
    data_dir = Path(data_dir)
    for name in ("items", "users", "interactions"):
        for suffix in (".parquet", ".csv"):
            path = data_dir / f"{name}{suffix}"
            if path.is_file():
                out[path.name] = digest_of(path)
    emb = data_dir / "embeddings"
    if emb.is_dir():
        for path in sorted(emb.glob("*.parquet")):
            if path.is_file():  # a directory of that name is refused by the embedding job, naming it
                out[f"embeddings/{path.name}"] = digest_of(path)
    return out


@dataclass
class RunRecord:
    """What one command did; `finish` appends it to the manifest."""

    command: str
    art_dir: Path
    data_dir: Path | None = None
    config: dict[str, Any] = field(default_factory=dict)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    started: float = field(default_factory=time.time)
    inputs: dict[str, str] = field(default_factory=dict)
    models: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    finished: bool = field(default=False, init=False, repr=False)

    def to_dict(self, status: str) -> dict[str, Any]:
        now = time.time()
        return {
            "run_id": self.run_id,
            "command": self.command,
            "status": status,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "seconds": round(now - self.started, 3),
            "data_dir": str(self.data_dir) if self.data_dir is not None else None,
            "inputs": self.inputs,
            "config": self.config,
            "models": self.models,
            "versions": library_versions(),
            "host": platform.node(),
            "counts": self.counts,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            **self.extra,
        }

    def finish(self, status: str = "ok") -> dict[str, Any]:
        if status == "ok":
            interrupts.check()  # a Ctrl-C that was swallowed on the way is no success
        record = self.to_dict(status)
        append_run(self.art_dir, record)
        self.finished = True
        return record

    def finish_failed(self, exc: BaseException) -> None:
        """Record why the stage stopped: status `interrupted` (Ctrl-C, SIGTERM) or `failed`, and `error`,
        the one line the user saw. Never raises: the stage's own error is what the user needs."""
        interrupted = isinstance(exc, KeyboardInterrupt)
        if isinstance(exc, FusionrecError):
            reason = str(exc)
        elif interrupted:
            reason = f"interrupted ({interrupts.reason()})"
        else:
            reason = f"unexpected {type(exc).__name__}: {first_line(exc, empty='')}"
        self.extra.setdefault("error", reason)
        if not Path(self.art_dir).is_dir():
            return  # a command that failed on a missing artifacts directory does not create one
        try:
            self.finish("interrupted" if interrupted else "failed")
        except BaseException as problem:  # noqa: BLE001 - never mask the stage's error
            log.debug("could not record the %s run in the manifest: %s", self.command, problem)


def read_manifest(art_dir: Path, *, warn: bool = True) -> dict[str, Any]:
    """The manifest; a damaged one (cut short, garbage, not an object) is recovered: every
    complete run record before the damage is kept, with a warning, never an exception."""
    path = Path(art_dir) / "manifest.json"
    if not path.is_file():
        return {"runs": []}
    try:
        raw = path.read_bytes()
    except OSError as exc:
        log.warning("cannot read %s (%s): starting a new run list", path, exc.strerror or exc)
        return {"runs": []}
    try:
        manifest = json.loads(raw)
        if isinstance(manifest, dict) and isinstance(manifest.get("runs", []), list):
            return manifest
    except ValueError:
        pass
    runs = salvage_runs(raw)
    if warn:
        log.warning("%s is damaged: recovered %d complete run records; the next run record rewrites it "
                    "(the damaged file is kept as %s)", path, len(runs), DAMAGED)
    latest: dict[str, str] = {}
    for record in runs:
        latest[str(record.get("command"))] = str(record.get("run_id"))
    return {"runs": runs, "latest": latest, "recovered": True}


DAMAGED = "manifest.json.damaged"


def salvage_runs(raw: bytes) -> list[dict[str, Any]]:
    """The complete run records at the start of a damaged manifest's `runs` list."""
    text = raw.decode("utf-8", errors="replace")
    start = text.find('"runs"')
    start = text.find("[", start) if start >= 0 else -1
    if start < 0:
        return []
    decoder = json.JSONDecoder()
    runs: list[dict[str, Any]] = []
    i = start + 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        try:
            record, i = decoder.raw_decode(text, i)
        except ValueError:
            return runs
        if not isinstance(record, dict):
            return runs
        runs.append(record)


def append_run(art_dir: Path, record: dict[str, Any]) -> None:
    """Add one run record. Appends are serialised by an flock (outside ART), so commands
    finishing at once (readers side by side) each keep their record."""
    art_dir = Path(art_dir)
    art_dir.mkdir(parents=True, exist_ok=True)
    fd = hold_flock(lock_file(art_dir, "manifest"), exclusive=True)
    try:
        manifest = read_manifest(art_dir)
        if manifest.pop("recovered", False):
            with contextlib.suppress(OSError):
                shutil.copyfile(art_dir / "manifest.json", art_dir / DAMAGED)
        manifest.setdefault("runs", []).append(record)
        latest = manifest.get("latest")
        manifest["latest"] = {**(latest if isinstance(latest, dict) else {}), record["command"]: record["run_id"]}
        write_json(manifest, art_dir / "manifest.json")
    finally:
        if fd is not None:
            os.close(fd)  # closing releases the flock


def latest_run(art_dir: Path, command: str) -> dict[str, Any] | None:
    for record in reversed(read_manifest(art_dir).get("runs", [])):
        if record.get("command") == command and record.get("status") == "ok":
            return record
    return None


@contextmanager
def stage_run(command: str, art_dir: Path, data_dir: Path | None = None, config: dict[str, Any] | None = None, *,
              lock: bool = True, shared: bool = False) -> Iterator[RunRecord]:
    """One stage's run: the artifacts lock (unless the caller holds it) and its run record.

    `shared`: a reader (recommend, score, evaluate) takes the shared lock, which any number
    of readers hold together and no writer meanwhile.

    The stage fills the record and calls `finish` with its status; a stage that raises
    instead gets a record with status `failed` (or `interrupted`, Ctrl-C) and its `error`,
    except on bad input or config (exit 2), which leaves every artifact as it was.
    The lock is released whatever happens.
    """
    held: ArtifactLock | ReadLock | None = None
    if lock:
        held = ReadLock(art_dir).__enter__() if shared else ArtifactLock(art_dir).acquire()
    try:
        interrupts.check()
        record = RunRecord(command, Path(art_dir), Path(data_dir) if data_dir is not None else None, config or {})
        try:
            yield record
        except BaseException as exc:
            # A stage that stopped early leaves its record, with the reason; bad input or config
            # (exit 2) is refused with the artifacts left byte for byte, the manifest included.
            refused = isinstance(exc, FusionrecError) and exc.exit_code == 2
            if not record.finished and not refused:
                record.finish_failed(exc)
            raise
    finally:
        if isinstance(held, ArtifactLock):
            held.release()
        elif held is not None:
            held.__exit__()
