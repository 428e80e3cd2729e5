"""ART/data/: the index stage's snapshot of the validated tables, night after night."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from fusionrec.pipeline.retrieval.stage import SNAPSHOT_SUMS, Catalog, load_snapshot, save_snapshot


def _catalog(users: pl.DataFrame | None) -> Catalog:
    items = pl.DataFrame({"item_id": ["i1", "i2"]})
    log = pl.DataFrame({"user_id": ["u1"], "item_id": ["i1"], "timestamp": [1]})
    return Catalog(items, users, log)


def test_a_night_without_a_users_table_serves_none(tmp_path: Path) -> None:
    # Before, last night's users.parquet stayed under ART/data/ and was loaded beside an index
    # fitted without it (recommend crashed with IndexError in a collaborative source).
    save_snapshot(_catalog(pl.DataFrame({"user_id": ["u1", "u2", "u3"]})), tmp_path)
    assert load_snapshot(tmp_path).users is not None
    save_snapshot(_catalog(None), tmp_path)
    assert not (tmp_path / "data" / "users.parquet").exists()
    assert load_snapshot(tmp_path).users is None


def test_a_users_table_the_checksums_do_not_list_is_not_loaded(tmp_path: Path) -> None:
    # Artifacts an older version left in that state are served without the stale table.
    save_snapshot(_catalog(None), tmp_path)
    pl.DataFrame({"user_id": ["u9"]}).write_parquet(tmp_path / "data" / "users.parquet")
    assert "users.parquet" not in json.loads((tmp_path / "data" / SNAPSHOT_SUMS).read_text())
    assert load_snapshot(tmp_path).users is None
