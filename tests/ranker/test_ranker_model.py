"""The LightGBM ranker: explanations add up, save/load, determinism, objectives, real data."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from fusionrec.pipeline.errors import FusionrecError
from fusionrec.ranker.model import Ranker

DATASETS = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"


def synthetic(users: int = 120, per_user: int = 20, seed: int = 0,
              max_label: int = 4) -> tuple[pl.DataFrame, np.ndarray]:
    """Candidates whose graded label follows sim_text (plus noise); other features are noise."""
    rng = np.random.default_rng(seed)
    n = users * per_user
    frame = pl.DataFrame({
        "user_id": np.repeat([f"u{i:04d}" for i in range(users)], per_user),
        "item_id": [f"i{j}" for j in rng.integers(0, 10 * per_user, n)],
        "retrieval_score": rng.random(n).astype(np.float32),
        "sim_text": rng.random(n).astype(np.float32),
        "sim_image": rng.random(n).astype(np.float32),
        "attn_text": np.repeat(rng.random(users), per_user).astype(np.float32),
        "item_cnt_all": rng.integers(0, 50, n).astype(np.int32),
        "user_cnt_all": np.repeat(rng.integers(0, 9, users), per_user).astype(np.int32),
        "pair_tag_affinity": np.where(rng.random(n) < 0.2, np.nan, rng.random(n)),
    }).with_columns(pl.col("pair_tag_affinity").fill_nan(None))
    sim = frame["sim_text"].to_numpy()
    label = np.clip(np.round(sim * max_label + rng.normal(0, 0.4, n)), 0, max_label).astype(np.int32)
    return frame, label


def split(frame: pl.DataFrame, label: np.ndarray, val_share: float = 0.25):
    users = frame["user_id"].unique().sort()
    val_users = users.head(int(len(users) * val_share))
    mask = frame["user_id"].is_in(val_users.implode()).to_numpy()
    return (frame.filter(~mask), label[~mask]), (frame.filter(mask), label[mask])


def fit_ranker(objective: str = "lambdarank", **kw) -> tuple[Ranker, pl.DataFrame, np.ndarray]:
    frame, label = synthetic()
    (tr, ytr), (va, yva) = split(frame, label)
    if objective == "binary":
        ytr, yva = (ytr >= 2).astype(int), (yva >= 2).astype(int)
    elif objective == "regression":
        ytr, yva = ytr.astype(float), yva.astype(float)
    params = dict(objective=objective, n_estimators=60, min_child_samples=5, early_stopping_rounds=10) | kw
    model = Ranker(**params).fit(tr, ytr, tr["user_id"], eval_set=(va, yva, va["user_id"]))
    return model, va, yva


def ndcg_at(users: np.ndarray, label: np.ndarray, score: np.ndarray, k: int = 10) -> float:
    """Mean NDCG@k over users with a positive label, written out plainly."""
    values = []
    for user in np.unique(users):
        rows = users == user
        rel, s = label[rows], score[rows]
        if rel.max() == 0:
            continue
        discount = 1 / np.log2(np.arange(2, k + 2))
        top = rel[np.argsort(-s, kind="stable")][:k]
        ideal = np.sort(rel)[::-1][:k]
        values.append(((2.0 ** top - 1) @ discount[: len(top)]) / ((2.0 ** ideal - 1) @ discount[: len(ideal)]))
    return float(np.mean(values))


@pytest.fixture(scope="module")
def ranked() -> tuple[Ranker, pl.DataFrame, np.ndarray]:
    return fit_ranker()


def test_contributions_add_up_to_the_raw_score(ranked):
    model, va, _ = ranked
    explained = model.explain(va, top=3)
    total = explained.select(pl.sum_horizontal(pl.col("^contrib_.*$")) + pl.col("explain_bias")).to_series()
    assert np.allclose(total.to_numpy(), model.predict(va, raw_score=True), atol=1e-9)
    # Group columns cover every feature group: modalities text and image, plus the rest.
    assert {"contrib_text", "contrib_image", "contrib_retrieval", "contrib_item", "contrib_user",
            "contrib_user_item"} <= set(explained.columns)
    shares = explained.select(pl.sum_horizontal(pl.col("^share_.*$"))).to_series().to_numpy()
    assert np.allclose(shares, 1.0)


def test_explain_top_features_are_the_largest_contributions(ranked):
    model, va, _ = ranked
    rows = va.head(10)
    explained = model.explain(rows, top=3)
    contrib = model.contributions(rows)[:, :-1]
    names = model.feature_names_
    for i, top in enumerate(explained["top_features"].to_list()):
        assert len(top) == 3
        want = [names[j] for j in np.argsort(-np.abs(contrib[i]), kind="stable")[:3]]
        assert [t["feature"] for t in top] == want
        for t in top:
            assert t["contribution"] == pytest.approx(contrib[i, names.index(t["feature"])])
            raw = rows[t["feature"]][i]
            assert (t["value"] is None and raw is None) or t["value"] == pytest.approx(raw)
    # The label follows sim_text, so the text modality carries most of the score.
    assert explained["share_text"].mean() > 0.5


def test_binary_contributions_sum_to_logit():
    model, va, _ = fit_ranker("binary")
    assert set(model.eval_metrics_) == {"auc", "binary_logloss"} and model.eval_metrics_["auc"] > 0.8
    explained = model.explain(va)
    raw = explained.select(pl.sum_horizontal(pl.col("^contrib_.*$")) + pl.col("explain_bias")).to_series().to_numpy()
    assert np.allclose(1 / (1 + np.exp(-raw)), model.predict(va))


def test_lambdarank_beats_random_order(ranked):
    model, va, yva = ranked
    users = va["user_id"].to_numpy()
    learned = ndcg_at(users, yva, model.predict(va))
    rng = np.random.default_rng(1)
    random = np.mean([ndcg_at(users, yva, rng.random(len(yva))) for _ in range(5)])
    assert learned > random + 0.2, (learned, random)
    assert "ndcg@10" in model.eval_metrics_ and 0 < model.eval_metrics_["ndcg@10"] <= 1
    assert model.params_["label_gain"] == [0.0, 1.0, 3.0, 7.0, 15.0]


def test_label_gain_fits_a_wide_label_range():
    frame, label = synthetic(users=40, max_label=40)
    assert label.max() == 40  # beyond LightGBM's 31 default gains
    model = Ranker(n_estimators=5, min_child_samples=5).fit(frame, label, frame["user_id"])
    assert len(model.params_["label_gain"]) == 41
    with pytest.raises(FusionrecError, match="non-negative integers"):
        Ranker().fit(frame, label - 0.5, frame["user_id"])
    with pytest.raises(FusionrecError, match="group_ids"):
        Ranker().fit(frame, label)
    with pytest.raises(FusionrecError, match="nulls or NaN"):
        Ranker(objective="regression").fit(frame, np.where(label > 20, np.nan, label))


def test_regression_reports_rmse():
    model, va, yva = fit_ranker("regression")
    rmse = math.sqrt(np.mean((model.predict(va) - yva) ** 2))
    assert model.eval_metrics_["rmse"] == pytest.approx(rmse, rel=1e-6)
    assert rmse < np.std(yva) * 0.8  # clearly better than predicting the mean


def test_fit_is_deterministic_and_seeded():
    kw = dict(feature_fraction=0.7, params={"bagging_fraction": 0.7, "bagging_freq": 1})
    a, va, _ = fit_ranker(seed=3, **kw)
    b, _, _ = fit_ranker(seed=3, **kw)
    c, _, _ = fit_ranker(seed=4, **kw)
    assert np.array_equal(a.predict(va), b.predict(va))
    assert not np.array_equal(a.predict(va), c.predict(va))


def test_rows_need_not_be_grouped_by_user():
    frame, label = synthetic(users=40)
    order = np.random.default_rng(0).permutation(frame.height)
    shuffled = frame[order]
    model = Ranker(n_estimators=20, min_child_samples=5).fit(shuffled, label[order], shuffled["user_id"])
    # Rows are regrouped per user: the same model as from user-sorted rows (same within-user order).
    regrouped = np.argsort(shuffled["user_id"].to_numpy(), kind="stable")
    sorted_model = Ranker(n_estimators=20, min_child_samples=5).fit(
        shuffled[regrouped], label[order][regrouped], shuffled[regrouped]["user_id"])
    assert np.array_equal(model.predict(frame), sorted_model.predict(frame))


def test_save_load_gives_identical_predictions_without_pickle(ranked, tmp_path):
    model, va, _ = ranked
    model.save(tmp_path / "ranker")
    files = sorted(p.name for p in (tmp_path / "ranker").iterdir())
    assert files == ["features.json", "model.txt"]
    text = (tmp_path / "ranker" / "model.txt").read_text()
    assert text.startswith("tree\n")
    meta = json.loads((tmp_path / "ranker" / "features.json").read_text())
    assert meta["features"] == model.feature_names_
    assert meta["objective"] == "lambdarank" and meta["dtypes"]["sim_text"] == "Float32"
    assert meta["groups"]["attn_text"] == "text" and meta["lightgbm_version"]
    loaded = Ranker.load(tmp_path / "ranker")
    assert np.array_equal(loaded.predict(va), model.predict(va))
    assert loaded.explain(va.head(5)).equals(model.explain(va.head(5)))
    assert loaded.eval_metrics_ == model.eval_metrics_
    assert loaded.best_iteration_ == model.best_iteration_


def test_load_refuses_a_model_that_does_not_match_its_feature_list(ranked, tmp_path):
    model, _, _ = ranked
    model.save(tmp_path)
    (tmp_path / "model.txt").write_text((tmp_path / "model.txt").read_text().replace("tree", "tree ", 1))
    with pytest.raises(FusionrecError, match=r"model\.txt does not match .*features\.json \(interrupted write\?\); "
                                             "train again"):
        Ranker.load(tmp_path)


# A save replaces model.txt, then features.json; before that it keeps the complete pair there
# in previous/. Its fault points, in order: 1 the kept pair, 2 model.txt, 3 features.json.
@pytest.mark.parametrize(("fault", "loads"), [
    ("write:1", "old"), ("written:1", "old"), ("write:2=torn", "old"),
    ("written:2", "kept"),  # model.txt new, features.json old: the pair kept in previous/
    ("write:3=torn", "kept"), ("written:3", "new")])
def test_a_save_killed_anywhere_leaves_a_whole_ranker(ranked, tmp_path, caplog, fault: str, loads: str) -> None:
    """Before, a kill between model.txt and features.json left a ranker that would not load
    ("train again"), and serving stopped. Now the last complete pair is kept until the new one is."""
    model, va, _ = ranked
    target = tmp_path / "ranker"
    model.save(target)
    old = (target / "features.json").read_bytes()
    code = ("from fusionrec.ranker.model import Ranker\n"
            f"r = Ranker.load({str(target)!r}); r.best_iteration_ = 1; r.save({str(target)!r})\n")  # a one-tree model
    env = {**os.environ, "FUSIONREC_FAULT": fault, "FUSIONREC_LIGHTGBM_SKLEARN": "0"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == -signal.SIGKILL, done.stderr
    if loads == "kept":  # the kill point this is about: one file new, its partner old
        assert (target / "features.json").read_bytes() == old
        assert json.loads(old)["model_sha256"] != hashlib.sha256((target / "model.txt").read_bytes()).hexdigest()
    with caplog.at_level(logging.WARNING, logger="fusionrec.ranker"):
        loaded = Ranker.load(target)
    assert np.array_equal(loaded.predict(va), model.predict(va)) == (loads != "new")
    assert loaded.booster_.current_iteration() == (1 if loads == "new" else model.booster_.current_iteration())
    warned = [r.getMessage() for r in caplog.records if r.name == "fusionrec.ranker"]
    assert warned == ([f"{target / 'model.txt'} does not match {target / 'features.json'} (interrupted write?): "
                       f"loading the last complete ranker, kept in {target / 'previous'}; rerun `fusionrec train`"]
                      if loads == "kept" else [])

    # The next save completes the set and drops the kept pair.
    one = Ranker.load(target)
    one.best_iteration_ = 1
    one.save(target)
    # (.tmp-* files are a killed job's temporaries: invisible, removed when the next job takes the lock)
    assert sorted(p.name for p in target.iterdir() if not p.name.startswith(".tmp-")) == ["features.json",
                                                                                          "model.txt"]
    assert Ranker.load(target).booster_.current_iteration() == 1


def test_remove_saved_removes_the_ranker_and_its_kept_pair(ranked, tmp_path) -> None:
    from fusionrec.ranker.model import remove_saved

    model, _, _ = ranked
    model.save(tmp_path / "ranker")
    shutil.copytree(tmp_path / "ranker", tmp_path / "ranker" / "previous")
    remove_saved(tmp_path / "ranker")
    assert list((tmp_path / "ranker").iterdir()) == []
    with pytest.raises(FusionrecError, match="cannot read the ranker in .*; train again"):
        Ranker.load(tmp_path / "ranker")


def test_missing_feature_columns_score_as_unknown(ranked):
    model, va, _ = ranked
    without = va.drop("sim_image")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = model.predict(without)
    assert any("sim_image" in str(w.message) for w in caught)
    nulls = va.with_columns(pl.lit(None, pl.Float32).alias("sim_image"))
    assert np.array_equal(got, model.predict(nulls))


def test_score_adds_a_score_column_equal_to_predict(ranked):
    model, va, _ = ranked
    scored = model.score(va, explain=True, top=2)
    assert scored.columns[: va.width] == va.columns
    assert np.array_equal(scored["score"].to_numpy(), model.predict(va))
    assert scored["top_features"].list.len().to_list() == [2] * va.height


def test_predict_in_chunks_equals_one_pass(ranked):
    model, va, _ = ranked
    small = Ranker(**model.get_params() | {"chunk_rows": 7})  # va has 600 rows: 86 chunks
    small.booster_, small.feature_names_ = model.booster_, model.feature_names_
    small.best_iteration_, small.feature_groups_ = model.best_iteration_, model.feature_groups_
    assert np.array_equal(small.predict(va), model.predict(va))
    assert np.allclose(small.contributions(va), model.contributions(va))


@pytest.mark.integration
def test_movielens_ranker_beats_popularity_order():
    """Temporal split of ML-100K: the ranker orders popular unseen candidates better than popularity."""
    data = DATASETS / "movielens-100k" / "fusionrec"
    if not data.is_dir():
        pytest.skip(f"shared data set absent: {data}")
    from fusionrec.pipeline.io.tables import load_interactions, load_items
    from fusionrec.ranker.features import behaviour_features
    from fusionrec.ranker.labels import make_labels

    items = load_items(data)
    inter = load_interactions(data, items)
    cutoff = int(inter["timestamp"].quantile(0.8))
    past = inter.filter(pl.col("timestamp") < cutoff)
    users = inter.filter(pl.col("timestamp") >= cutoff)["user_id"].unique().sort()
    popular = past.group_by("item_id").agg(pl.len().cast(pl.Float32).alias("retrieval_score")) \
        .sort(["retrieval_score", "item_id"], descending=[True, False]).head(200)
    cand = pl.DataFrame({"user_id": users}).join(popular, how="cross") \
        .join(past.select("user_id", "item_id").unique(), on=["user_id", "item_id"], how="anti") \
        .sort(["user_id", "retrieval_score", "item_id"], descending=[False, True, False]) \
        .group_by("user_id", maintain_order=True).head(100) \
        .with_columns((pl.int_range(pl.len()).over("user_id") + 1).cast(pl.Int32).alias("retrieval_rank"))
    frame = make_labels(behaviour_features(cand, inter, items, cutoff), inter, cutoff, None, kind="binary")
    val_users = users.sample(fraction=0.25, seed=0)
    is_val = frame["user_id"].is_in(val_users.implode())
    tr, va = frame.filter(~is_val), frame.filter(is_val)
    model = Ranker(n_estimators=200, num_leaves=15).fit(
        tr, tr["label"], tr["user_id"], eval_set=(va, va["label"], va["user_id"]))
    assert "label" not in model.feature_names_ and "pair_cooc_sum" in model.feature_names_
    u, y = va["user_id"].to_numpy(), va["label"].to_numpy()
    learned = ndcg_at(u, y, model.predict(va))
    popularity = ndcg_at(u, y, va["retrieval_score"].to_numpy())
    assert learned > popularity + 0.05, (learned, popularity)


def test_the_command_line_imports_lightgbm_without_scikit_learn_and_fits_the_same(tmp_path: Path) -> None:
    """With FUSIONREC_LIGHTGBM_SKLEARN=0 (what `fusionrec` sets), loading lightgbm leaves
    scikit-learn out (seconds of every serving command's start-up); the ranker fits and
    predicts the same, and scikit-learn still imports afterwards for whoever needs it."""
    code = (
        "import sys, numpy as np, polars as pl\n"
        "from fusionrec.ranker.model import Ranker, _lightgbm\n"
        "_lightgbm(); print('sklearn' in sys.modules)\n"
        "rng = np.random.default_rng(0); x = rng.normal(size=(400, 3))\n"
        "X = pl.DataFrame({'retrieval_score': x[:, 0], 'sim_text': x[:, 1], 'sim_image': x[:, 2]})\n"
        "y = (x[:, 0] > 0).astype(int)\n"
        "m = Ranker(objective='binary', n_estimators=20, min_child_samples=5).fit(X, y)\n"
        "print(repr(m.predict(X).round(12).tolist()))\n"
        "import sklearn; print(sklearn.__name__)\n")
    runs = {}
    for value in ("0", "1"):
        env = {**os.environ, "FUSIONREC_LIGHTGBM_SKLEARN": value}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr
        runs[value] = done.stdout.splitlines()
    assert runs["0"][0] == "False" and runs["1"][0] == "True"
    assert runs["0"][1] == runs["1"][1] and runs["0"][2] == "sklearn"


def test_the_command_line_sets_the_variable_the_ranker_reads() -> None:
    """`cli.main` names the variable by its literal (importing ranker.model there would slow
    `--help`): it must be the one `ranker.model` reads, set to 0 unless the user set it."""
    code = ("import os; from fusionrec import cli; from fusionrec.ranker.model import SKLEARN_ENV\n"
            "try:\n    cli.main(['--version'])\nexcept SystemExit:\n    pass\n"
            "print(os.environ.get(SKLEARN_ENV))\n")
    env = {k: v for k, v in os.environ.items() if k != "FUSIONREC_LIGHTGBM_SKLEARN"}
    for preset, expected in ((None, "0"), ("1", "1")):
        run_env = env if preset is None else {**env, "FUSIONREC_LIGHTGBM_SKLEARN": preset}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=run_env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().splitlines()[-1] == expected
