"""The LightGBM ranker: fit, predict, explain, save and load (text model + JSON, no pickle).

Objectives: "lambdarank" (graded labels, groups per user, NDCG on the validation window),
"regression" (ratings, RMSE) and "binary" (AUC, log loss). Training is deterministic
for a fixed seed and `num_threads` (deterministic=True, force_col_wise=True).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import polars as pl
import pyarrow as pa

from fusionrec.pipeline.errors import FusionrecError
from fusionrec.pipeline.io.storage import keep_files, sha256_bytes, write_json, write_text
from fusionrec.ranker.features import feature_columns, feature_group

log = logging.getLogger("fusionrec.ranker")

if TYPE_CHECKING:
    import lightgbm as lgb

MODEL_FILE = "model.txt"
META_FILE = "features.json"
# The last complete model.txt and features.json, kept while `save` replaces them one at a time.
PREVIOUS_DIR = "previous"
FORMAT_VERSION = 1
_METRICS = {"lambdarank": "ndcg", "regression": "rmse", "binary": ["auc", "binary_logloss"]}
Objective = Literal["lambdarank", "regression", "binary"]


# "0": import lightgbm without its scikit-learn API (LGBMModel and the like, which fusionrec
# never uses). The command line sets it (`cli.main`): scikit-learn is about two thirds of
# lightgbm's import, 2 to 3 s of every serving command's start-up. A library user who does
# not set it gets lightgbm whole.
SKLEARN_ENV = "FUSIONREC_LIGHTGBM_SKLEARN"
_import_lock = threading.Lock()


def _lightgbm() -> Any:
    """lightgbm, imported on first use (commands that never fit or load a ranker skip it):
    with scikit-learn's API unless `SKLEARN_ENV` is "0" and nothing imported scikit-learn yet."""
    with _import_lock:
        if ("lightgbm" not in sys.modules and "sklearn" not in sys.modules
                and os.environ.get(SKLEARN_ENV, "").strip() == "0"):
            sys.modules["sklearn"] = None  # type: ignore[assignment]  # lightgbm's `from sklearn ...` raises ImportError
            try:
                import lightgbm
            finally:
                del sys.modules["sklearn"]  # scikit-learn imports normally afterwards (librosa needs it)
        import lightgbm

    return lightgbm


class Ranker:
    """A LightGBM model over the feature columns of a polars frame (sklearn-like)."""

    def __init__(self, objective: Objective = "lambdarank", n_estimators: int = 300,
                 learning_rate: float = 0.05, num_leaves: int = 31, min_child_samples: int = 20,
                 early_stopping_rounds: int | None = 30, seed: int = 0, num_threads: int = 1,
                 eval_at: Sequence[int] = (10,), features: Sequence[str] | None = None,
                 feature_fraction: float = 1.0, lambda_l2: float = 0.0,
                 params: dict[str, Any] | None = None, chunk_rows: int = 262_144) -> None:
        if objective not in _METRICS:
            raise ValueError(f"objective must be one of {sorted(_METRICS)}, not {objective!r}")
        self.objective = objective
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.min_child_samples = min_child_samples
        self.early_stopping_rounds = early_stopping_rounds
        self.seed = seed
        self.num_threads = num_threads
        self.eval_at = tuple(eval_at)
        self.features = list(features) if features is not None else None
        self.feature_fraction = feature_fraction
        self.lambda_l2 = lambda_l2
        self.params = dict(params or {})
        self.chunk_rows = chunk_rows

    # ---- training -------------------------------------------------------------------
    def _lgb_params(self, max_label: int | None) -> dict[str, Any]:
        params: dict[str, Any] = {
            "objective": self.objective, "metric": _METRICS[self.objective],
            "learning_rate": self.learning_rate, "num_leaves": self.num_leaves,
            "min_data_in_leaf": self.min_child_samples, "feature_fraction": self.feature_fraction,
            "lambda_l2": self.lambda_l2, "seed": self.seed, "num_threads": self.num_threads,
            "deterministic": True, "force_col_wise": True, "verbosity": -1,
        }
        if self.objective == "lambdarank":
            # One gain per label level 0..max (2^l - 1), so any label range fits.
            params["label_gain"] = [float(2 ** level - 1) for level in range((max_label or 0) + 1)]
            params["eval_at"] = list(self.eval_at)
        params.update(self.params)
        return params

    def fit(self, X: pl.DataFrame, y: Any, group_ids: Any = None,
            eval_set: tuple | None = None, sample_weight: Any = None) -> Ranker:
        """Fit on the feature columns of `X` (all of `feature_columns(X)` unless `features` was given).

        group_ids: one id per row (the user), required for lambdarank; rows need not be
        sorted. eval_set: (X_val, y_val) or (X_val, y_val, group_ids_val); enables early stopping.
        sample_weight: one non-negative weight per row (e.g. the inverse of a sampling share).
        """
        names = list(self.features) if self.features is not None else feature_columns(X)
        if not names:
            raise FusionrecError("no feature columns to train the ranker on")
        self.feature_names_ = names
        self.feature_dtypes_ = {n: str(X.schema[n]) for n in names}
        self.feature_groups_ = {n: feature_group(n) or "other" for n in names}
        y_train = _as_array(y)
        has_val = eval_set is not None
        y_val = _as_array(eval_set[1]) if eval_set is not None else None
        max_label = None
        if self.objective == "lambdarank":
            labels = y_train if y_val is None else np.concatenate([y_train, y_val])
            if labels.size and (labels.min() < 0 or not np.all(labels == np.round(labels))):
                raise FusionrecError("lambdarank labels must be non-negative integers")
            max_label = int(labels.max()) if labels.size else 0
        params = self._lgb_params(max_label)

        weight = None if sample_weight is None else _as_array(sample_weight).astype(np.float64)
        if weight is not None and weight.shape != (len(y_train),):
            raise FusionrecError(f"sample_weight needs one weight per row ({len(y_train)} rows), not shape {weight.shape}")
        if weight is not None and not (np.all(np.isfinite(weight)) and (weight >= 0).all()):
            raise FusionrecError("sample_weight needs finite, non-negative weights: it holds negative or non-finite ones")
        train = self._dataset(X, y_train, group_ids, None, weight)
        valid_sets, callbacks = [], []
        history: dict[str, dict[str, list[Any]]] = {}
        if has_val:
            assert eval_set is not None and y_val is not None
            val_groups = eval_set[2] if len(eval_set) > 2 else None
            valid_sets.append(self._dataset(eval_set[0], y_val, val_groups, train))
            callbacks.append(_lightgbm().record_evaluation(history))
            if self.early_stopping_rounds:
                callbacks.append(_lightgbm().early_stopping(self.early_stopping_rounds, first_metric_only=True,
                                                    verbose=False))
        booster = _lightgbm().train(params, train, num_boost_round=self.n_estimators, valid_sets=valid_sets,
                            valid_names=["valid"] * len(valid_sets), callbacks=callbacks)
        self.booster_ = booster
        self.params_ = params
        self.best_iteration_ = int(booster.best_iteration) if booster.best_iteration > 0 \
            else booster.current_iteration()
        self.eval_metrics_ = {name: float(values[self.best_iteration_ - 1])
                              for name, values in history.get("valid", {}).items()}
        return self

    def _dataset(self, X: pl.DataFrame, y: np.ndarray, group_ids: Any,
                 reference: lgb.Dataset | None, weight: np.ndarray | None = None) -> lgb.Dataset:
        matrix = self._matrix(X)
        if len(y) != matrix.shape[0]:
            raise FusionrecError(f"{len(y)} labels for {matrix.shape[0]} rows")
        if not np.all(np.isfinite(y.astype(np.float64))):
            raise FusionrecError("labels contain nulls or NaN: drop those rows before fitting")
        group = None
        if self.objective == "lambdarank":
            if group_ids is None:
                raise FusionrecError("lambdarank needs group_ids (one user id per row)")
            # LightGBM wants each group's rows contiguous: stable sort by group id.
            _, codes = np.unique(np.asarray(_as_array(group_ids), dtype=str), return_inverse=True)
            order = np.argsort(codes, kind="stable")
            matrix, y, group = matrix[order], y[order], np.bincount(codes)
            weight = None if weight is None else weight[order]
        return _lightgbm().Dataset(matrix, label=y, weight=weight, group=group, feature_name=self.feature_names_,
                           reference=reference, free_raw_data=True,
                           params={"feature_pre_filter": False, "verbosity": -1})

    # ---- prediction -----------------------------------------------------------------
    def _matrix(self, X: pl.DataFrame) -> np.ndarray:
        """Float64 matrix of the model's features in order; missing features become null (cold)."""
        missing = [n for n in self.feature_names_ if n not in X.columns]
        if missing:
            warnings.warn(f"features missing from the input, treated as unknown: {', '.join(missing)}",
                          stacklevel=3)
        cols = [pl.col(n).cast(pl.Float64) if n in X.columns else pl.lit(None, pl.Float64).alias(n)
                for n in self.feature_names_]
        # Nulls become NaN, which LightGBM treats as missing.
        return X.select(cols).to_numpy(order="c").astype(np.float64, copy=False)

    def _chunks(self, X: pl.DataFrame):
        for start in range(0, X.height, self.chunk_rows):
            yield self._matrix(X.slice(start, self.chunk_rows))

    def predict(self, X: pl.DataFrame, raw_score: bool = False) -> np.ndarray:
        """One score per row (binary: probability unless raw_score)."""
        self._check_fitted()
        if X.height == 0:
            return np.zeros(0)
        return np.concatenate([
            self.booster_.predict(m, num_iteration=self.best_iteration_, raw_score=raw_score,
                                  num_threads=self.num_threads) for m in self._chunks(X)])

    def contributions(self, X: pl.DataFrame) -> np.ndarray:
        """(rows, features + 1) SHAP contributions; the last column is the bias. Rows sum to the raw score."""
        self._check_fitted()
        if X.height == 0:
            return np.zeros((0, len(self.feature_names_) + 1))
        return np.concatenate([
            np.asarray(self.booster_.predict(m, num_iteration=self.best_iteration_, pred_contrib=True,
                                             num_threads=self.num_threads)) for m in self._chunks(X)])

    @property
    def groups_(self) -> list[str]:
        """Feature groups in first-seen order (modalities, retrieval, item, user, user_item)."""
        return list(dict.fromkeys(self.feature_groups_[n] for n in self.feature_names_))

    def explain(self, X: pl.DataFrame, top: int = 5) -> pl.DataFrame:
        """Per row: top contributing features and each group's (modality's) part of the raw score.

        Columns: `top_features` list[struct{feature, value, contribution}] by |contribution|
        descending; `explain_bias` (the model's expected raw score); `contrib_<group>` the
        summed contributions of the group's features (explain_bias + all contrib_* = raw
        score); `share_<group>` = |contrib_<group>| / sum of |contrib_*| (sums to 1 per row).
        """
        contrib = self.contributions(X)
        names = self.feature_names_
        feats, bias = contrib[:, :-1], contrib[:, -1]
        n, k = feats.shape[0], min(top, len(names))
        # Stable sort on -|c|: ties keep the feature order, so the output is deterministic.
        idx = np.argsort(-np.abs(feats), axis=1, kind="stable")[:, :k]
        values = self._matrix(X)
        picked_c = np.take_along_axis(feats, idx, axis=1).ravel()
        picked_v = np.take_along_axis(values, idx, axis=1).ravel()
        structs = pa.StructArray.from_arrays(
            [pa.array(np.asarray(names, dtype=object)[idx.ravel()], pa.string()),
             pa.array(picked_v, pa.float64(), from_pandas=True),  # NaN (missing value) -> null
             pa.array(picked_c, pa.float64())],
            names=["feature", "value", "contribution"])
        offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32))
        top_col = cast(pl.Series, pl.from_arrow(pa.ListArray.from_arrays(offsets, structs))).alias("top_features")

        groups = self.groups_
        member = np.array([[self.feature_groups_[f] == g for f in names] for g in groups], dtype=np.float64)
        by_group = feats @ member.T  # (rows, groups)
        total = np.abs(by_group).sum(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            shares = np.where(total > 0, np.abs(by_group) / total, np.nan)
        columns: dict[str, Any] = {"top_features": top_col, "explain_bias": bias}
        columns.update({f"contrib_{g}": by_group[:, j] for j, g in enumerate(groups)})
        columns.update({f"share_{g}": shares[:, j] for j, g in enumerate(groups)})
        frame = pl.DataFrame(columns)
        return frame.with_columns(pl.col(f"share_{g}").fill_nan(None) for g in groups)

    def score(self, frame: pl.DataFrame, *, explain: bool = False, top: int = 5,
              column: str = "score") -> pl.DataFrame:
        """`frame` plus `score` (and the `explain` columns): the one path score and recommend share.

        The score is `predict(frame)`: the raw score for lambdarank and regression, the
        probability for binary (whose explanations add up to the raw log-odds).
        """
        out = frame.with_columns(pl.Series(column, self.predict(frame), dtype=pl.Float64))
        if explain:
            out = pl.concat([out, self.explain(frame, top=top)], how="horizontal")
        return out

    # ---- persistence ----------------------------------------------------------------
    def save(self, directory: Path | str) -> Path:
        """Write `model.txt` (LightGBM text, best iteration only) and `features.json`, as one set.

        features.json holds the model text's SHA-256, so `load` notices a model file and a
        feature list that do not belong together. Each file is replaced atomically, one after
        the other: the complete pair already there is first kept in `previous/` (hard links),
        which `load` falls back to while the two do not match (a save killed between them), and
        which is removed once both are written.
        """
        self._check_fitted()
        directory = Path(directory)
        text = self.booster_.model_to_string(num_iteration=self.best_iteration_)
        meta = {
            "format_version": FORMAT_VERSION,
            "objective": self.objective,
            "features": self.feature_names_,
            "dtypes": self.feature_dtypes_,
            "groups": self.feature_groups_,
            "params": self.params_,
            "config": self.get_params(),
            "best_iteration": self.best_iteration_,
            "eval_metrics": self.eval_metrics_,
            "lightgbm_version": _lightgbm().__version__,
            "model_sha256": sha256_bytes(text.encode()),
        }
        kept = directory / PREVIOUS_DIR
        if _complete(directory):
            keep_files([directory / MODEL_FILE, directory / META_FILE], kept)
        # else: no ranker yet, or a save stopped part-way, whose kept pair (if any) stays the fallback
        write_text(text, directory / MODEL_FILE)
        write_json(meta, directory / META_FILE)
        shutil.rmtree(kept, ignore_errors=True)  # the new pair is whole: the fallback is not needed
        self.model_sha256_ = meta["model_sha256"]  # the train stage's guard.json names the model it checked
        return directory

    @classmethod
    def load(cls, directory: Path | str) -> Ranker:
        """The ranker `save` wrote to `directory`; while its model.txt and features.json do not
        match (a save stopped between them), the complete pair it kept in `previous/`, with a
        warning. Without one, a FusionrecError says to train again."""
        directory = Path(directory)
        try:
            meta, text = _read_saved(directory)
        except FusionrecError as exc:
            kept = directory / PREVIOUS_DIR
            try:
                meta, text = _read_saved(kept)
            except FusionrecError:
                raise FusionrecError(f"{exc}; train again") from exc.__cause__
            log.warning("%s: loading the last complete ranker, kept in %s; rerun `fusionrec train`", exc, kept)
        ranker = cls(**meta["config"])
        ranker.booster_ = _lightgbm().Booster(model_str=text)
        ranker.feature_names_ = list(meta["features"])
        if ranker.booster_.feature_name() != ranker.feature_names_:
            raise FusionrecError(f"{directory / MODEL_FILE}: feature names differ from {META_FILE}")
        ranker.feature_dtypes_ = dict(meta["dtypes"])
        ranker.feature_groups_ = dict(meta["groups"])
        ranker.params_ = dict(meta["params"])
        ranker.best_iteration_ = ranker.booster_.current_iteration()
        ranker.eval_metrics_ = dict(meta.get("eval_metrics", {}))
        ranker.model_sha256_ = meta["model_sha256"]
        return ranker

    def get_params(self) -> dict[str, Any]:
        return {"objective": self.objective, "n_estimators": self.n_estimators,
                "learning_rate": self.learning_rate, "num_leaves": self.num_leaves,
                "min_child_samples": self.min_child_samples,
                "early_stopping_rounds": self.early_stopping_rounds, "seed": self.seed,
                "num_threads": self.num_threads, "eval_at": list(self.eval_at),
                "features": self.features, "feature_fraction": self.feature_fraction,
                "lambda_l2": self.lambda_l2, "params": self.params, "chunk_rows": self.chunk_rows}

    def _check_fitted(self) -> None:
        if not hasattr(self, "booster_"):
            raise FusionrecError("the ranker is not fitted")


def _read_saved(directory: Path) -> tuple[dict[str, Any], str]:
    """features.json and model.txt of `directory`, checked to belong together; else a
    FusionrecError saying what is wrong (the caller adds what to do)."""
    try:
        meta = json.loads((directory / META_FILE).read_text())
        text = (directory / MODEL_FILE).read_text()
    except (OSError, ValueError) as exc:
        raise FusionrecError(f"cannot read the ranker in {directory}: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("model_sha256") != sha256_bytes(text.encode()):
        raise FusionrecError(f"{directory / MODEL_FILE} does not match {directory / META_FILE} (interrupted write?)")
    return meta, text


def _complete(directory: Path) -> bool:
    """Whether `directory` holds a model.txt and features.json that belong together."""
    try:
        _read_saved(directory)
    except FusionrecError:
        return False
    return True


def remove_saved(directory: Path | str) -> None:
    """Remove a saved ranker: model.txt first (serving loads a ranker only where it is), then
    features.json and any kept previous pair."""
    directory = Path(directory)
    for name in (MODEL_FILE, META_FILE):
        (directory / name).unlink(missing_ok=True)
    shutil.rmtree(directory / PREVIOUS_DIR, ignore_errors=True)


def _as_array(values: Any) -> np.ndarray:
    if isinstance(values, pl.Series):
        return values.to_numpy()
    return np.asarray(values)
