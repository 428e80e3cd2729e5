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


def _night(root: Path, n_items: int, seed: int) -> Path:
    """A catalogue of ids alone (ranked from behaviour: no encoder runs) and a random log."""
    import numpy as np

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    pl.DataFrame({"item_id": [f"i{i:03d}" for i in range(n_items)]}).write_csv(root / "items.csv")
    users = rng.integers(0, 30, 600)
    pl.DataFrame({"user_id": [f"u{u:02d}" for u in users],
                  "item_id": [f"i{i:03d}" for i in rng.integers(0, n_items, 600)],
                  "timestamp": 1_700_000_000 + np.arange(600) * 3600}).write_csv(root / "interactions.csv")
    return root


def test_an_index_stage_stopped_while_it_saves_is_never_served_half_new(tmp_path: Path, monkeypatch) -> None:
    """Ctrl-C (or a crash) after the index stage wrote tonight's snapshot and sources but before its
    retriever: before, `recommend` loaded the new sources beside last night's index and failed with
    an unexpected ValueError (a dimension mismatch, 45 items against 40); now the half-saved index is
    refused, naming the command that rebuilds it."""
    import pytest

    from fusionrec.jobs import open_recommender, run_index
    from fusionrec.pipeline.config import Config
    from fusionrec.pipeline.errors import FusionrecError
    from fusionrec.pipeline.io.storage import write_json
    from fusionrec.pipeline.retrieval.retriever import Retriever

    art, cfg = tmp_path / "art", Config()
    run_index(_night(tmp_path / "night1", 40, 1), art, cfg)
    write_json({"order": "retrieval", "reason": "test"}, art / "ranker" / "guard.json")
    assert open_recommender(art).recommend(None, 5).height > 0

    def interrupted(self, *args, **kwargs):  # Ctrl-C as the retriever, saved last, is written
        raise KeyboardInterrupt

    monkeypatch.setattr(Retriever, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_index(_night(tmp_path / "night2", 45, 2), art, cfg)
    with pytest.raises(FusionrecError, match=r"run `fusionrec index`"):
        open_recommender(art).recommend(None, 5)
