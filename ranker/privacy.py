"""Pseudonymised exports: user ids replaced by a keyed hash (HMAC-SHA256).

The key comes from the environment variable named by `export.key_env`, else from
`export.key_file`, else from `ART/export.key`, created once (mode 0600) so that ids stay
stable across nightly runs of the same artifacts directory. The same key gives the same
pseudonym for the same id on every run; without the key the ids cannot be recovered.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

import polars as pl

from pipeline.config import ExportConfig
from pipeline.errors import FusionrecError
from pipeline.storage import atomic_path

KEY_FILE = "export.key"


def export_key(cfg: ExportConfig, art_dir: Path) -> bytes:
    env = os.environ.get(cfg.key_env, "").strip()
    if env:
        return env.encode()
    if cfg.key_file:
        path = Path(cfg.key_file)
        try:
            key = path.read_bytes().strip()
        except OSError as exc:
            raise FusionrecError(f"cannot read export key file {path}: {exc.strerror or exc}") from None
        if len(key) < 16:
            raise FusionrecError(f"export key file {path} holds fewer than 16 bytes")
        return key
    path = Path(art_dir) / KEY_FILE
    if not path.is_file():
        with atomic_path(path) as tmp:
            tmp.write_text(secrets.token_hex(32) + "\n")
            os.chmod(tmp, 0o600)
    return path.read_bytes().strip()


def pseudonym(user_id: str, key: bytes) -> str:
    return hmac.new(key, user_id.encode("utf-8"), hashlib.sha256).hexdigest()


def pseudonymise(frame: pl.DataFrame, key: bytes, column: str = "user_id") -> pl.DataFrame:
    """`frame` with `column` replaced by its keyed hash (each distinct id hashed once)."""
    ids = frame.select(pl.col(column).unique())
    mapping = ids.with_columns(pl.col(column).map_elements(lambda u: pseudonym(str(u), key), return_dtype=pl.String)
                               .alias("__pseudonym"))
    return (frame.join(mapping, on=column, how="left", maintain_order="left")
            .with_columns(pl.col("__pseudonym").alias(column)).drop("__pseudonym"))
