"""`ART/manifest.json`: one record per run (inputs and their hashes, config, model ids,
library versions, counts, timings), appended atomically."""

from __future__ import annotations

import json
import platform
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from fusionrec.pipeline.io.storage import ArtifactLock, sha256_file, write_json

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


def hash_inputs(data_dir: Path) -> dict[str, str]:
    """sha256 of each input table (media hashes live in the embedding tables' content_hash)."""
    out: dict[str, str] = {}
    data_dir = Path(data_dir)
    for name in ("items", "users", "interactions"):
        for suffix in (".parquet", ".csv"):
            path = data_dir / f"{name}{suffix}"
            if path.is_file():
                out[path.name] = sha256_file(path)
    emb = data_dir / "embeddings"
    if emb.is_dir():
        for path in sorted(emb.glob("*.parquet")):
            out[f"embeddings/{path.name}"] = sha256_file(path)
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
        record = self.to_dict(status)
        append_run(self.art_dir, record)
        return record


def read_manifest(art_dir: Path) -> dict[str, Any]:
    path = Path(art_dir) / "manifest.json"
    if not path.is_file():
        return {"runs": []}
    return json.loads(path.read_text())


def append_run(art_dir: Path, record: dict[str, Any]) -> None:
    manifest = read_manifest(art_dir)
    manifest.setdefault("runs", []).append(record)
    manifest["latest"] = {**manifest.get("latest", {}), record["command"]: record["run_id"]}
    write_json(manifest, Path(art_dir) / "manifest.json")


def latest_run(art_dir: Path, command: str) -> dict[str, Any] | None:
    for record in reversed(read_manifest(art_dir).get("runs", [])):
        if record.get("command") == command and record.get("status") == "ok":
            return record
    return None


@contextmanager
def stage_run(command: str, art_dir: Path, data_dir: Path | None = None, config: dict[str, Any] | None = None, *,
              lock: bool = True) -> Iterator[RunRecord]:
    """One stage's run: the artifacts lock (unless the caller holds it) and its run record.

    The stage fills the record and calls `finish` with its status; the lock is released
    whatever happens.
    """
    held = ArtifactLock(art_dir).acquire() if lock else None
    try:
        yield RunRecord(command, Path(art_dir), Path(data_dir) if data_dir is not None else None, config or {})
    finally:
        if held is not None:
            held.release()
