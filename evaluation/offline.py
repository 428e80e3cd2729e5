"""`fusionrec evaluate`: the current artifacts against held-out interactions.

Side by side on the same users and metrics: fusionrec (retrieval + ranker), retrieval
alone, and the popularity and item-kNN baselines fitted on the same training log (the
artifacts' snapshot). Bootstrap intervals over users for NDCG, paired comparisons of
fusionrec against each other run, and an optional self-contained HTML report.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import cast

import numpy as np
import polars as pl

from fusionrec.evaluation import metrics as M
from fusionrec.evaluation.baselines import ItemKNNRecommender, PopularityRecommender
from fusionrec.evaluation.report import write_report
from fusionrec.evaluation.results import EvaluationResult, bootstrap_ci, evaluate, paired_comparison, relevant_truth
from fusionrec.pipeline.errors import FusionrecError, InputError
from fusionrec.pipeline.io.manifest import RunRecord, library_versions, read_manifest
from fusionrec.pipeline.io.tables import read_interactions
from fusionrec.pipeline.retrieval.fusion import load_modalities
from fusionrec.ranker.serving.export import check_export_target
from fusionrec.ranker.serving.recommender import Recommender

log = logging.getLogger("fusionrec.evaluate")
MAIN = "fusionrec"
TABLE_METRICS = ("recall", "precision", "ndcg", "map", "mrr", "hit_rate", "coverage")
HEADLINE_METRICS = ("ndcg", "recall", "precision", "map", "hit_rate", "mrr")
CURVE_KS = (1, 2, 3, 5, 10, 15, 20, 30, 50)  # the report's metric-against-k curves (up to the lists' length)
CURVE_METRICS = ("ndcg", "recall", "precision", "hit_rate")
RELEVANCE_AUTO, RELEVANCE_ALL = "auto", "all"  # --relevance besides a number
CURVE_MIN_LENGTH = 20  # lists are at least this long, so the curves have points past the table's k


def recommendation_runs(rec: Recommender, users: list[str], k: int, baselines: bool = True
                        ) -> dict[str, pl.DataFrame]:
    runs = {MAIN: rec.recommend(users, k)}
    if baselines:
        train = rec.catalog_.interactions
        runs["retrieval only"] = rec.recommend(users, k, use_ranker=False)
        runs["popularity"] = PopularityRecommender().fit(train).recommend(users, k)
        runs["item-kNN"] = ItemKNNRecommender().fit(train).recommend(users, k)
    return runs


def result_rows(results: dict[str, EvaluationResult], ks: tuple[int, ...]) -> list[dict]:
    rows = []
    for name, res in results.items():
        row: dict = {"model": name}
        for k in ks:
            for m in TABLE_METRICS:
                value = res.metrics.get(f"{m}@{k}")
                if value is not None:
                    row[f"{m}@{k}"] = round(float(value), 4)
        rows.append(row)
    return rows


def scorable_users(test: pl.DataFrame, train: pl.DataFrame, test_path: Path | str,
                   relevance: float | None = None, named: str = "--relevance") -> list[str]:
    """The held-out users with at least one relevant pair not already in training, or InputError (exit 2)
    saying why there is none: evaluate never reports over 0 users. `named`: what the messages
    call the threshold (the flag, or what `--relevance auto` took it from)."""
    where = str(test_path)
    if test.height == 0:
        raise InputError("the held-out file has no rows", file=where)
    if relevance is not None:
        if not np.isfinite(relevance):
            raise InputError(f"--relevance must be a finite number, got {relevance}", field="--relevance")
        if "value" not in test.columns or test["value"].null_count() == test.height:
            raise InputError(f"--relevance {relevance} needs ratings, but the held-out rows have no value",
                             file=where, field="value")
        unrated = test["value"].null_count()
        if unrated:  # a log mixing events and ratings: an event without a rating is a positive
            log.warning("%s: %d of %d held-out rows have no value; they stay relevant (%s %g judges "
                        "rated rows only)", where, unrated, test.height, named, relevance)
    truth = relevant_truth(test, train, relevance_threshold=relevance)
    if truth.height == 0:
        rated = relevant_truth(test, train, relevance_threshold=None) if relevance is not None else truth
        if relevance is not None and rated.height:
            why = (f"no held-out row outside training has a value at or above {named} {relevance:g}; "
                   "lower the threshold (--relevance N), or score every held-out pair (--relevance all)")
        else:
            why = ("every held-out (user, item) pair is already in the training log these artifacts were "
                   "built from, so there is nothing to score; hold rows out before training: "
                   "`fusionrec split --data DATA --out SPLIT`, `fusionrec run --data SPLIT/train --out ART`, "
                   "then `fusionrec evaluate --out ART --test SPLIT/held_out.csv`")
        raise InputError(f"no scorable user: {why}", file=where)
    users = truth["user_id"].unique().sort().to_list()
    # Say what is not scored: a held-out pair already in training (seen items are never
    # recommended), or a rating below the threshold; and so how many held-out users remain.
    every = relevant_truth(test, train, exclude_train_pairs=False).height
    unseen = relevant_truth(test, train).height if relevance is not None else truth.height  # without a threshold, truth itself
    below = f", {unseen - truth.height} rated below {named} {relevance:g}" if relevance is not None else ""
    held_users = test["user_id"].cast(pl.String).n_unique()
    if every > truth.height or held_users > len(users):
        log.info("%s: %d of %d held-out users scored, over %d of %d distinct held-out pairs (not scored: %d already "
                 "in the training log, as seen items are never recommended%s)", where, len(users), held_users,
                 truth.height, every, every - unseen, below)
    return users


def parse_relevance(relevance: float | str | None) -> float | str | None:
    """`--relevance` as given: a number (also as text), `"auto"` or `"all"` (any case), or None."""
    if relevance is None or isinstance(relevance, (int, float)):
        return relevance
    word = relevance.strip().lower()
    if word in (RELEVANCE_AUTO, RELEVANCE_ALL):
        return word
    try:
        return float(word)
    except ValueError:
        raise InputError(f"--relevance takes a number, auto or all, not {relevance!r}", field="--relevance") from None


def resolve_relevance(relevance: float | str | None, rec: Recommender, test: pl.DataFrame) -> float | None:
    """The threshold a rated held-out row must reach to be relevant; None: every held-out pair.

    `relevance` (`parse_relevance`): a number; `"all"` or None, every pair; `"auto"`, the
    threshold the artifacts' sources learned with (`sources.relevance`: 4 on a 1-5 scale) where
    the held-out rows carry values, so a low rating the model took as no like is not scored as
    a miss either."""
    relevance = parse_relevance(relevance)
    if relevance is None or relevance == RELEVANCE_ALL:
        return None
    if relevance == RELEVANCE_AUTO:
        rated = "value" in test.columns and test["value"].null_count() < test.height
        threshold = rec.sources_.threshold if rated else None
        if threshold is not None:
            log.info("relevance: held-out rows with a value of at least %g (the threshold the artifacts' sources "
                     "used, sources.relevance); --relevance all scores every held-out pair", threshold)
        return threshold
    return float(relevance)


def run_evaluate(art_dir: Path, test_path: Path, ks: tuple[int, ...] = (10, 20), *, report: Path | None = None,
                 baselines: bool = True, n_boot: int = 1000, relevance: float | str | None = "auto",
                 rec: Recommender | None = None) -> list[dict]:
    """`rec`: the artifacts already opened (the command line opens them with
    `jobs.open_recommender`, which names a damaged file); default `Recommender(art_dir)`.
    `relevance`: see `resolve_relevance` (default auto: the sources' own threshold)."""
    if not ks or min(ks) < 1:
        raise FusionrecError("--k needs positive cut-offs")
    art_dir = Path(art_dir)
    if report is not None:  # before any metric is computed: a report never lands on the artifacts' own files
        check_export_target(report, art_dir)
    rec = rec if rec is not None else Recommender(art_dir)
    n_items = rec.catalog_.items.height
    if max(ks) > n_items:  # no list can be longer; a huge k would only allocate for nothing
        raise InputError(f"--k {max(ks)} is above the catalogue's {n_items} items", field="--k")
    test = read_interactions(Path(test_path), rec.catalog_.items)
    train = rec.catalog_.interactions
    named = "the relevance threshold (--relevance auto: sources.relevance)" \
        if parse_relevance(relevance) == RELEVANCE_AUTO else "--relevance"
    relevance = resolve_relevance(relevance, rec, test)
    users = scorable_users(test, train, test_path, relevance, named)
    item_vectors = cast("M.ItemVectors | None", load_modalities(art_dir / "embeddings", "item").get("text"))
    runs = recommendation_runs(rec, users, max(*ks, CURVE_MIN_LENGTH if report is not None else 1), baselines)
    results = {name: evaluate(recs, test, train, ks, item_vectors=item_vectors, relevance_threshold=relevance,
                              n_items=rec.catalog_.items.height) for name, recs in runs.items()}
    rows = result_rows(results, ks)
    k0 = ks[0]
    main = results[MAIN]
    ci = bootstrap_ci(main.per_user, f"ndcg@{k0}", n_boot=n_boot)
    comparisons = [{"a": name, "b": MAIN, **paired_comparison(res.per_user, main.per_user, f"ndcg@{k0}",
                                                               n_boot=n_boot)}
                   for name, res in results.items() if name != MAIN]
    out = {"ks": list(ks), "users": len(users), "test_rows": test.height, "rows": rows, "relevance": relevance,
           "ndcg_ci": ci, "comparisons": comparisons, "slices": main.slices}
    log.info("NDCG@%d of %s: %.4f [%.4f, %.4f] over %d users", k0, MAIN, ci["mean"], ci["ci_low"], ci["ci_high"],
             ci["n_users"])
    for c in comparisons:
        log.info("%s vs %s: NDCG@%d difference %+.4f [%+.4f, %+.4f]", MAIN, c["a"], k0, c["diff"], c["ci_low"],
                 c["ci_high"])
    if report is not None:
        truth = relevant_truth(test, train, relevance_threshold=relevance)
        write_evaluation_report(report, rec, results, rows, comparisons, runs, ks, truth=truth,
                                n_boot=n_boot, test_path=Path(test_path), relevance=relevance)
        log.info("report written to %s", report)
    record = RunRecord("evaluate", art_dir)
    record.inputs = {"test": str(test_path)}
    record.extra = {"evaluation": json.loads(json.dumps(out, default=float))}
    record.finish("ok")
    return rows


def metric_curves(runs: dict[str, pl.DataFrame], truth: pl.DataFrame, n_boot: int = 200,
                  ks: tuple[int, ...] = CURVE_KS) -> dict[str, dict[str, list[dict]]]:
    """run -> metric -> ``{k, mean, ci_low, ci_high}`` over the cut-offs the lists are long enough for."""
    out: dict[str, dict[str, list[dict]]] = {}
    for name, recs in runs.items():
        longest = int(cast(int, M.ranked_lists(recs)["pos"].max() or 0)) if recs.height else 0
        usable = tuple(k for k in ks if k <= max(longest, 1))
        per_user = M.ranking_metrics(recs, truth, usable)
        out[name] = {m: [{"k": k, **bootstrap_ci(per_user, f"{m}@{k}", n_boot=n_boot)} for k in usable]
                     for m in CURVE_METRICS}
    return out


def slice_intervals(main: EvaluationResult, recs: pl.DataFrame, truth: pl.DataFrame, train: pl.DataFrame,
                    metric: str, n_boot: int = 1000) -> list[dict]:
    """``metric`` with its bootstrap interval in each user segment and on cold items (slices with users only)."""
    rows = []
    for segment in ("new", "light", "medium", "heavy"):
        part = main.per_user.filter(pl.col("segment") == segment)
        if part.height:
            ci = bootstrap_ci(part, metric, n_boot=n_boot)
            rows.append({"slice": f"{segment} users", metric: ci["mean"], f"{metric}_ci_low": ci["ci_low"],
                         f"{metric}_ci_high": ci["ci_high"], "users": ci["n_users"]})
    train_items = M.relevant_pairs(train).select("item_id").unique()
    cold = truth.join(train_items, on="item_id", how="anti")
    if cold.height:
        k = int(metric.split("@")[1])
        ci = bootstrap_ci(M.ranking_metrics(recs, cold, (k,)), metric, n_boot=n_boot)
        rows.append({"slice": "cold items", metric: ci["mean"], f"{metric}_ci_low": ci["ci_low"],
                     f"{metric}_ci_high": ci["ci_high"], "users": ci["n_users"]})
    return rows


def run_metadata(art_dir: Path, test_path: Path | None = None, relevance: float | None = None
                 ) -> tuple[dict[str, str], str]:
    """(name -> value, config text) for the report: the data hash the artifacts were built from,
    the held-out file's hash, relevance, versions."""
    import hashlib

    runs = read_manifest(art_dir, warn=False).get("runs", [])
    built = next((r for r in reversed(runs) if r.get("command") in ("run", "index") and r.get("inputs")), None)
    meta: dict[str, str] = {}
    config: dict = {}
    if built is not None:
        inputs = {k: v for k, v in built["inputs"].items() if isinstance(v, str)}
        digest = hashlib.sha256("".join(f"{k}\x00{v}\n" for k, v in sorted(inputs.items())).encode()).hexdigest()
        meta["training data"] = str(built.get("data_dir") or "")
        meta["training data hash"] = digest[:16] + " (sha256 over " + ", ".join(sorted(inputs)) + ")"
        meta["built by"] = f"{built.get('command')} {built.get('run_id', '')} at {built.get('finished_at', '')}"
        config = built.get("config") or {}
    if test_path is not None and Path(test_path).is_file():
        meta["held-out file"] = str(test_path)
        meta["held-out hash"] = hashlib.sha256(Path(test_path).read_bytes()).hexdigest()[:16]
    meta["relevance"] = "every held-out pair" if relevance is None else f"value >= {relevance}"
    meta["versions"] = ", ".join(f"{k} {v}" for k, v in library_versions().items())
    return meta, json.dumps(config, indent=2, sort_keys=True, default=str) if config else ""


def write_evaluation_report(path: Path, rec: Recommender, results: dict[str, EvaluationResult], rows: list[dict],
                            comparisons: list[dict], runs: dict[str, pl.DataFrame], ks: tuple[int, ...], *,
                            truth: pl.DataFrame | None = None, n_boot: int = 1000, test_path: Path | None = None,
                            relevance: float | None = None) -> Path:
    main = results[MAIN]
    if main.per_user.height == 0:
        raise InputError("no scorable user: the report is not written over 0 users", file=str(test_path or ""))
    importance = None
    if rec.ranker_ is not None:
        booster = rec.ranker_.booster_
        importance = pl.DataFrame({"feature": booster.feature_name(),
                                   "gain": booster.feature_importance("gain").astype(np.float64)})
    retr = rec.retriever_
    attention = pl.DataFrame({m: retr.user_weights_[:, j] for j, m in enumerate(retr.modalities_)})
    k0 = ks[0]
    headline = [bootstrap_ci(main.per_user, f"{m}@{k0}", n_boot=n_boot) for m in HEADLINE_METRICS]
    curves = metric_curves(runs, truth, n_boot=min(n_boot, 200)) if truth is not None else None
    slices = (slice_intervals(main, runs[MAIN], truth, rec.catalog_.interactions, f"ndcg@{k0}", n_boot)
              if truth is not None else None)
    meta, config = run_metadata(rec.art_dir, test_path, relevance)
    return write_report(path, title="fusionrec evaluation",
                        meta={"artifacts": str(rec.art_dir), "users": main.per_user.height,
                              "fusion": retr.fusion},
                        headline=headline, summary=main.metrics, runs=results, curves=curves,
                        slices=main.slices, slice_intervals=slices, slice_metric=f"ndcg@{k0}",
                        comparisons=comparisons, peers=pl.DataFrame(rows), feature_importance=importance,
                        importance_type="gain", modality_weights=retr.weights_, user_attention=attention,
                        exposure=runs,
                        n_items=rec.catalog_.items.height, exposure_k=k0, run_metadata=meta, config=config)
