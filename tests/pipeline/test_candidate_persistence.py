"""The candidate model as serving loads it (`CandidateModel.load`) scores exactly as the fitted one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from fusionrec.pipeline.retrieval.candidates import CandidateModel
from fusionrec.pipeline.retrieval.sources import als_available, tag_matrix
from tests.pipeline.test_sources import ITEMS, pairs_log


@pytest.mark.parametrize("with_tags", [False, True])
def test_a_loaded_candidate_model_scores_as_the_fitted_one(tmp_path: Path, with_tags: bool) -> None:
    """With tags, every source that can use them is fitted with them; serving loads the fitted
    arrays without the tags (no refit), and scores the same."""
    frame = pairs_log(n_users=30)
    users = pl.DataFrame({"user_id": [f"u{u:02d}" for u in range(32)], "side": ["even", "odd"] * 16,
                          "text": [None] * 32})
    rng = np.random.default_rng(0)
    content = rng.normal(size=(len(ITEMS), 6)).astype(np.float32)
    user_content = {"u31": rng.normal(size=6).astype(np.float32)}  # a user without history, with content
    names = ["ease", "recent_ease", "itemknn", "recent_itemknn", "sequence", "rp3beta", "content", "popular",
             "segment_popular", "vae", *(["als"] if als_available() else [])]
    params = {n: ({"factors": 4, "iterations": 3, "seeds": 2} if n == "als" else
                  {"epochs": 5, "seeds": 2} if n == "vae" else {}) for n in names}
    tags = None
    if with_tags:
        tags = tag_matrix(pl.DataFrame({"item_id": list(ITEMS), "tags": [f"t{j % 3}" for j in range(len(ITEMS))]}),
                          ITEMS, min_items=2)
        params = {n: {**p, "tag_weight": 0.5} if n in ("ease", "recent_ease", "itemknn", "recent_itemknn", "rp3beta",
                                                       "als", "vae") else p for n, p in params.items()}
    weights = {n: float(w) for n, w in zip(names, rng.uniform(0.1, 2.0, len(names)), strict=False)}
    fitted = CandidateModel(n_candidates=6, threshold=4.0, params=params, weights=weights, content=content,
                            user_content=user_content, tags=tags).fit(frame, ITEMS, users, None)
    fitted.save(tmp_path / "sources")
    loaded = CandidateModel.load(tmp_path / "sources", frame, ITEMS, users, None, content=content,
                                 user_content=user_content)

    wanted = [f"u{u:02d}" for u in range(32)] + ["nobody"]
    assert_frame_equal(loaded.candidates(wanted), fitted.candidates(wanted), check_exact=False, rel_tol=0,
                       abs_tol=1e-6)
    assert_frame_equal(loaded.candidates(wanted, exclude_seen=False), fitted.candidates(wanted, exclude_seen=False),
                       check_exact=False, rel_tol=0, abs_tol=1e-6)
    pairs = pl.DataFrame({"user_id": ["u00", "u01", "u31", "nobody", "u05"],
                          "item_id": ["i1", "i7", "i3", "i2", "not-an-item"], "extra": [1, 2, 3, 4, 5]})
    assert_frame_equal(loaded.score_pairs(pairs), fitted.score_pairs(pairs), check_exact=False, rel_tol=0,
                       abs_tol=1e-6)
