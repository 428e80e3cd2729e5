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


def test_scored_pairs_carry_the_candidates_ranks_and_seen_items_rank_as_if_unseen() -> None:
    """The ranker learns on candidate rows whose ranks count unseen items only; `score_pairs`
    (what `fusionrec score` feeds it) must give the same pair the same columns. A seen item is
    ranked among the unseen ones as if it were unseen (its score does not move)."""
    frame = pairs_log(n_users=30)
    names = ["ease", "itemknn", "rp3beta", "popular"]
    model = CandidateModel(n_candidates=len(ITEMS), threshold=4.0, params={n: {} for n in names},
                           weights={"ease": 1.0, "itemknn": 0.5, "rp3beta": 0.25, "popular": 0.1}
                           ).fit(frame, ITEMS, None, None)
    users = ["u00", "u03", "u07"]
    candidates = model.candidates(users)  # unseen items only, every one (n_candidates = the catalog)
    scored = model.score_pairs(candidates.select("user_id", "item_id"))
    assert_frame_equal(scored, candidates.select(scored.columns), check_exact=False, rel_tol=0, abs_tol=1e-6)

    seen = frame.filter(pl.col("user_id") == "u00", pl.col("value") >= 4)["item_id"].cast(pl.String).unique().sort()
    assert seen.len() > 0
    own = model.score_pairs(pl.DataFrame({"user_id": ["u00"] * seen.len(), "item_id": seen}))
    unseen = candidates.filter(pl.col("user_id") == "u00")
    for row in own.iter_rows(named=True):
        score = row["retrieval_score"]
        assert np.isfinite(score)
        # 1 + the unseen items scored higher (ties: a smaller catalog index first)
        index = {item: j for j, item in enumerate(ITEMS)}
        ahead = unseen.filter((pl.col("retrieval_score") > score)
                              | ((pl.col("retrieval_score") == score)
                                 & (pl.col("item_id").replace_strict(index, return_dtype=pl.Int64)
                                    < index[row["item_id"]])))
        assert row["retrieval_rank"] == 1 + ahead.height
        assert row["src_ease_rank"] == 1 + unseen.filter(pl.col("src_ease") > row["src_ease"]).height \
            + unseen.filter((pl.col("src_ease") == row["src_ease"])
                            & (pl.col("item_id").replace_strict(index, return_dtype=pl.Int64)
                               < index[row["item_id"]])).height
