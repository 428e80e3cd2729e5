"""Pseudonymised exports: user ids replaced by a keyed hash (HMAC-SHA256).

The key comes from the environment variable named by `export.key_env`, else from
`export.key_file`, else from `ART/export.key`, created once (mode 0600) so that ids stay
stable across nightly runs of the same artifacts directory. The same key gives the same
pseudonym for the same id on every run; without the key the ids cannot be recovered.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

import polars as pl

from fusionrec.pipeline.config import ExportConfig
from fusionrec.pipeline.errors import FusionrecError
from fusionrec.pipeline.io.storage import atomic_path

KEY_FILE = "export.key"
log = logging.getLogger("fusionrec.privacy")
MIN_KEY_BYTES = 16  # a shorter key could be guessed, and with it every pseudonym reversed


def export_key(cfg: ExportConfig, art_dir: Path) -> bytes:
    env = os.environ.get(cfg.key_env, "").strip()
    if env:
        if len(env.encode()) < MIN_KEY_BYTES:
            raise FusionrecError(f"the export key in ${cfg.key_env} holds fewer than {MIN_KEY_BYTES} bytes")
        return env.encode()
    if cfg.key_file:
        return read_key_file(Path(cfg.key_file))
    path = Path(art_dir) / KEY_FILE
    if path.is_symlink() and not path.exists():
        # A linked key is someone's secret kept elsewhere: replacing it would change every pseudonym.
        raise FusionrecError(f"export key {path} is a link to {os.readlink(path)}, which does not exist; restore "
                             "the key it points to (a new key would change every pseudonym)")
    if path.exists() and not path.is_file():
        raise FusionrecError(f"export key {path} is not a regular file; restore the key file")
    if not path.is_file():
        with atomic_path(path) as tmp:
            # Created 0600 from the start: the key is never readable by others, not even for a moment.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32) + "\n")
    return read_key_file(path, "; remove it to make a new key (pseudonyms will change) or restore it")


def warn_if_readable(path: Path) -> None:
    """A WARNING when the key file (what a link points to) grants more than its owner's read/write (0600)."""
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return
    if mode & 0o077:
        log.warning("export key %s has mode %04o: others can read it and reverse every pseudonym; "
                    "chmod 600 %s", path, mode, path)


def pseudonym(user_id: str, key: bytes) -> str:
    return hmac.new(key, user_id.encode("utf-8"), hashlib.sha256).hexdigest()


def pseudonymise(frame: pl.DataFrame, key: bytes, column: str = "user_id") -> pl.DataFrame:
    """`frame` with `column` replaced by its keyed hash (each distinct id hashed once)."""
    ids = frame.select(pl.col(column).unique())
    mapping = ids.with_columns(pl.col(column).map_elements(lambda u: pseudonym(str(u), key), return_dtype=pl.String)
                               .alias("__pseudonym"))
    return (frame.join(mapping, on=column, how="left", maintain_order="left")
            .with_columns(pl.col("__pseudonym").alias(column)).drop("__pseudonym"))


def read_key_file(path: Path, hint: str = "") -> bytes:
    """The key in `path` (warning when others may read it); `hint` ends the too-short message."""
    warn_if_readable(path)
    try:
        key = path.read_bytes().strip()
    except OSError as exc:
        raise FusionrecError(f"cannot read export key file {path}: {exc.strerror or exc}") from None
    if len(key) < MIN_KEY_BYTES:
        raise FusionrecError(f"export key file {path} holds fewer than {MIN_KEY_BYTES} bytes{hint}")
    return key
