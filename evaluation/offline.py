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

import numpy as np
import polars as pl

from fusionrec.pipeline.errors import FusionrecError
from fusionrec.pipeline.retrieval.fusion import load_modalities
from fusionrec.pipeline.io.tables import read_interactions

from fusionrec.evaluation.baselines import ItemKNNRecommender, PopularityRecommender
from fusionrec.evaluation.results import EvaluationResult, bootstrap_ci, evaluate, paired_comparison
from fusionrec.ranker.serving.recommender import Recommender

log = logging.getLogger("fusionrec.evaluate")
MAIN = "fusionrec"
TABLE_METRICS = ("recall", "precision", "ndcg", "map", "mrr", "hit_rate", "coverage")


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


def run_evaluate(art_dir: Path, test_path: Path, ks: tuple[int, ...] = (10, 20), *, report: Path | None = None,
                 baselines: bool = True, n_boot: int = 1000) -> list[dict]:
    if not ks or min(ks) < 1:
        raise FusionrecError("--k needs positive cut-offs")
    art_dir = Path(art_dir)
    rec = Recommender(art_dir)
    test = read_interactions(Path(test_path), rec.catalog_.items)
    train = rec.catalog_.interactions
    users = test["user_id"].unique().sort().to_list()
    item_vectors = load_modalities(art_dir / "embeddings", "item").get("text")
    runs = recommendation_runs(rec, users, max(ks), baselines)
    results = {name: evaluate(recs, test, train, ks, item_vectors=item_vectors,
                              n_items=rec.catalog_.items.height) for name, recs in runs.items()}
    rows = result_rows(results, ks)
    k0 = ks[0]
    main = results[MAIN]
    ci = bootstrap_ci(main.per_user, f"ndcg@{k0}", n_boot=n_boot)
    comparisons = [{"a": name, "b": MAIN, **paired_comparison(res.per_user, main.per_user, f"ndcg@{k0}",
                                                               n_boot=n_boot)}
                   for name, res in results.items() if name != MAIN]
    out = {"ks": list(ks), "users": len(users), "test_rows": test.height, "rows": rows,
           "ndcg_ci": ci, "comparisons": comparisons, "slices": main.slices}
    log.info("NDCG@%d of %s: %.4f [%.4f, %.4f] over %d users", k0, MAIN, ci["mean"], ci["ci_low"], ci["ci_high"],
             ci["n_users"])
    for c in comparisons:
        log.info("%s vs %s: NDCG@%d difference %+.4f [%+.4f, %+.4f]", MAIN, c["a"], k0, c["diff"], c["ci_low"],
                 c["ci_high"])
    if report is not None:
        write_evaluation_report(report, rec, results, rows, comparisons, runs, ks)
        log.info("report written to %s", report)
    from fusionrec.pipeline.io.manifest import RunRecord

    record = RunRecord("evaluate", art_dir)
    record.inputs = {"test": str(test_path)}
    record.extra = {"evaluation": json.loads(json.dumps(out, default=float))}
    record.finish("ok")
    return rows


def write_evaluation_report(path: Path, rec: Recommender, results: dict[str, EvaluationResult], rows: list[dict],
                            comparisons: list[dict], runs: dict[str, pl.DataFrame], ks: tuple[int, ...]) -> Path:
    from fusionrec.evaluation.report import write_report

    importance = None
    if rec.ranker_ is not None:
        booster = rec.ranker_.booster_
        importance = pl.DataFrame({"feature": booster.feature_name(),
                                   "importance": booster.feature_importance("gain").astype(np.float64)})
    retr = rec.retriever_
    attention = pl.DataFrame({m: retr.user_weights_[:, j] for j, m in enumerate(retr.modalities_)})
    return write_report(path, title="fusionrec evaluation",
                        meta={"artifacts": str(rec.art_dir), "users": results[MAIN].per_user.height,
                              "fusion": retr.fusion},
                        summary=results[MAIN].metrics, runs=results, slices=results[MAIN].slices,
                        comparisons=comparisons, peers=pl.DataFrame(rows), feature_importance=importance,
                        modality_weights=retr.weights_, user_attention=attention,
                        exposure=runs, n_items=rec.catalog_.items.height, exposure_k=ks[0])
