"""Peers benchmark: fusionrec's baselines and outside recommenders on one split and one metric set.

One command (from the project root)::

    .venv/bin/python bench/peers.py --data ../shared/datasets/movielens-100k/fusionrec [--art ART]

Global temporal split (latest 20% of interactions are test, seeded tie order), every model
trained on the same train frame and asked for the same test users, evaluated with
``ranker.evaluation`` at k = 10 and 20 with bootstrap intervals over users and a paired
comparison with the popularity baseline. Peers: popularity and item-kNN (in the project),
implicit's ALS and BPR, Cornac's VBPR fed with the item image embeddings of ``--art``
(``ART/embeddings/item_image.parquet``, a data directory's precomputed
``embeddings/item_image.parquet``, or a parquet file). implicit and cornac are the optional
``bench`` extra; a peer whose library is missing is skipped with a message. Models that know
nothing of a user (new users of the temporal split) fall back to popularity, as the
project's baselines do. Writes bench/results/peers.json and bench/results/peers.md
(``--report FILE.html`` adds the HTML report).

fusionrec's own rows (retrieval alone, with the ranker, ablations) come from
:func:`fusionrec_runs`: the hook to fill in.
"""

from __future__ import annotations

import os

# Before numpy/implicit load: one BLAS thread (implicit warns otherwise, and the machine is shared).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import importlib.metadata  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # running as a script from anywhere
    sys.path.insert(0, str(ROOT))

from fusionrec.pipeline.io.storage import atomic_path  # noqa: E402
from fusionrec.pipeline.io.tables import load_interactions  # noqa: E402
from fusionrec.evaluation.baselines import ItemKNNRecommender, MatrixRecommender, PopularityRecommender  # noqa: E402
from fusionrec.evaluation.results import EvaluationResult, bootstrap_ci, evaluate, paired_comparison  # noqa: E402
from fusionrec.evaluation.splits import global_temporal_split  # noqa: E402

RESULTS = ROOT / "bench" / "results"
TABLE_METRICS = ("ndcg@10", "recall@10", "map@10", "hit_rate@10", "ndcg@20", "recall@20")


class Skip(Exception):
    """A peer that cannot run here (library missing, no embeddings): reported, not fatal."""


# ----------------------------------------------------------------------------- data

def find_item_embeddings(places: list[Path], modality: str) -> Path | None:
    """First existing item embeddings parquet among artifacts/data dirs or files."""
    for place in places:
        if place.is_file():
            return place
        for cand in (place / "embeddings" / f"item_{modality}.parquet", place / f"item_{modality}.parquet"):
            if cand.exists():
                return cand
    return None


def load_item_vectors(path: Path) -> tuple[list[str], np.ndarray]:
    """(ids, matrix) from a parquet with ``item_id`` (or ``id``) and ``vector``."""
    df = pl.read_parquet(path)
    id_col = "item_id" if "item_id" in df.columns else "id"
    vec = df["vector"]
    dim = len(vec[0])
    matrix = vec.cast(pl.Array(pl.Float32, dim)).to_numpy().astype(np.float32)
    return df[id_col].cast(pl.String).to_list(), matrix


# ----------------------------------------------------------------------------- peers

class ImplicitALS(MatrixRecommender):
    """implicit's AlternatingLeastSquares on the binarised matrix (confidence 1 + alpha)."""

    def __init__(self, factors: int = 64, regularization: float = 0.05, alpha: float = 2.0,
                 iterations: int = 15, seed: int = 0, threads: int = 1) -> None:
        self.params = dict(factors=factors, regularization=regularization, alpha=alpha, iterations=iterations,
                           random_state=seed, num_threads=threads)

    def _fit_model(self) -> None:
        try:
            from implicit.cpu.als import AlternatingLeastSquares
        except ImportError as exc:
            raise Skip(f"implicit is not installed ({exc}); pip install 'fusionrec[bench]'") from exc
        self.model_ = AlternatingLeastSquares(**self.params)
        self.model_.fit(self.user_items_.astype(np.float32).tocsr(), show_progress=False)

    def _scores(self, rows: np.ndarray) -> np.ndarray:
        out = np.zeros((rows.size, self.item_ids_.size))
        known = rows >= 0
        out[known] = self.model_.user_factors[rows[known]] @ self.model_.item_factors.T
        return out


class ImplicitBPR(ImplicitALS):
    """implicit's BayesianPersonalizedRanking."""

    def __init__(self, factors: int = 64, learning_rate: float = 0.05, regularization: float = 0.01,
                 iterations: int = 100, seed: int = 0, threads: int = 1) -> None:
        self.params = dict(factors=factors, learning_rate=learning_rate, regularization=regularization,
                           iterations=iterations, random_state=seed, num_threads=threads)

    def _fit_model(self) -> None:
        try:
            from implicit.cpu.bpr import BayesianPersonalizedRanking
        except ImportError as exc:
            raise Skip(f"implicit is not installed ({exc}); pip install 'fusionrec[bench]'") from exc
        self.model_ = BayesianPersonalizedRanking(**self.params)
        self.model_.fit(self.user_items_.astype(np.float32).tocsr(), show_progress=False)


class CornacVBPR(MatrixRecommender):
    """Cornac's VBPR with the given item embeddings as its visual features (zeros where missing)."""

    def __init__(self, item_vectors: tuple[list[str], np.ndarray] | None, k: int = 10, k2: int = 10,
                 n_epochs: int = 20, batch_size: int = 100, learning_rate: float = 0.005,
                 lambda_w: float = 1.0, seed: int = 0) -> None:
        self.item_vectors = item_vectors
        self.params = dict(k=k, k2=k2, n_epochs=n_epochs, batch_size=batch_size, learning_rate=learning_rate,
                           lambda_w=lambda_w, lambda_b=0.01, lambda_e=0.0, use_gpu=False, verbose=False,
                           seed=seed)

    def _fit_model(self) -> None:
        if self.item_vectors is None:
            raise Skip("no item image embeddings: pass --art ART (ART/embeddings/item_image.parquet)")
        try:
            import torch
            from cornac.data import Dataset, ImageModality
            from cornac.models import VBPR
        except ImportError as exc:
            raise Skip(f"cornac is not installed ({exc}); pip install 'fusionrec[bench]'") from exc
        torch.set_num_threads(1)
        ids, mat = self.item_vectors
        lookup = pl.DataFrame({"item_id": ids, "_r": np.arange(len(ids))})
        rows = pl.DataFrame({"item_id": self.item_ids_}).join(lookup, on="item_id", how="left",
                                                               maintain_order="left")["_r"].to_numpy()
        feats = np.zeros((self.item_ids_.size, mat.shape[1]), dtype=np.float32)
        has = ~np.isnan(rows.astype(np.float64))
        feats[has] = mat[rows[has].astype(np.int64)]
        self.feature_coverage_ = float(has.mean())
        # Cornac indexes by raw ids; using our own indices as raw ids keeps both in line.
        coo = self.user_items_.tocoo()
        triples = list(zip(coo.row.astype(str).tolist(), coo.col.astype(str).tolist(), [1.0] * coo.nnz))
        train_set = Dataset.build(triples, fmt="UIR", seed=self.params["seed"])
        modality = ImageModality(features=feats, ids=[str(i) for i in range(feats.shape[0])], normalized=True)
        modality.build(id_map=train_set.iid_map)
        train_set.add_modalities(item_image=modality)
        model = VBPR(**self.params)
        model.fit(train_set)
        n_items = self.item_ids_.size
        uidx = np.array([train_set.uid_map[str(u)] for u in range(self.user_items_.shape[0])])
        iidx = np.array([train_set.iid_map.get(str(i), -1) for i in range(n_items)])
        self.user_vec_ = np.hstack([model.gamma_user, model.theta_user])[uidx]
        item_vec = np.hstack([model.gamma_item, model.theta_item])
        item_bias = model.beta_item + model.visual_bias
        self.item_vec_ = np.where(iidx[:, None] >= 0, item_vec[np.maximum(iidx, 0)], 0.0)
        self.item_bias_ = np.where(iidx >= 0, item_bias[np.maximum(iidx, 0)], -np.inf)

    def _scores(self, rows: np.ndarray) -> np.ndarray:
        out = np.zeros((rows.size, self.item_ids_.size))
        known = rows >= 0
        out[known] = self.user_vec_[rows[known]] @ self.item_vec_.T + self.item_bias_
        return out


@dataclass
class Peer:
    """A peer: how to build it, its parameters, and the grid ``--tune`` searches."""

    name: str
    make: Callable[..., MatrixRecommender]
    params: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)

    def build(self, **override: Any) -> MatrixRecommender:
        return self.make(**{**self.params, **override})


def peers(args: argparse.Namespace, item_vectors: tuple[list[str], np.ndarray] | None) -> list[Peer]:
    """The peers and their defaults: what ``--tune`` picked on ML-100K's validation split (the
    latest 20% of the training interactions, seed 0). VBPR is not tuned (minutes per fit)."""
    common = {"seed": args.seed, "threads": args.threads}
    return [
        Peer("popularity", PopularityRecommender),
        Peer("item-kNN", ItemKNNRecommender, {"k_neighbors": 20, "shrink": 10.0},
             {"k_neighbors": [20, 50, 100, 200], "shrink": [0.0, 10.0]}),
        Peer("implicit ALS", ImplicitALS, {"factors": 32, "regularization": 0.5, "alpha": 1.0, **common},
             {"factors": [32, 64], "regularization": [0.05, 0.5], "alpha": [1.0, 5.0, 20.0]}),
        Peer("implicit BPR", ImplicitBPR, {"factors": 64, "learning_rate": 0.005, "regularization": 0.001,
                                           **common},
             {"factors": [32, 64], "learning_rate": [0.005, 0.01, 0.05], "regularization": [0.001, 0.01]}),
        Peer("Cornac VBPR", CornacVBPR, {"item_vectors": item_vectors, "n_epochs": args.vbpr_epochs,
                                         "seed": args.seed}),
    ]


def tune(peer: Peer, train: pl.DataFrame, args: argparse.Namespace) -> dict[str, Any]:
    """Grid search on a validation split carved from ``train`` (never the test set)."""
    inner, val = global_temporal_split(train, args.test_fraction, seed=args.seed)
    users = val["user_id"].unique().sort()
    scores = []
    for values in itertools.product(*peer.grid.values()):
        params = dict(zip(peer.grid, values))
        recs = peer.build(**params).fit(inner).recommend(users, k=10)
        score = evaluate(recs, val, inner, 10).metrics["ndcg@10"]
        scores.append({"params": params, "val_ndcg@10": score})
        print(f"  tune {peer.name} {params}: val ndcg@10 {score:.4f}", flush=True)
    best = max(scores, key=lambda r: r["val_ndcg@10"])
    return {"best": best["params"], "best_val_ndcg@10": best["val_ndcg@10"], "grid": scores}


def fusionrec_runs(train: pl.DataFrame, test: pl.DataFrame, users: pl.Series, k: int,
                   args: argparse.Namespace) -> dict[str, pl.DataFrame]:
    """fusionrec's own rows: retrieval + ranker, retrieval alone, and the ablations
    (each modality alone, behaviour alone, weighted / attention / concatenation fusion).

    Everything is fitted on ``train`` only: the retrievers on all of it, the ranker on label
    windows at its end (ranker.training), exactly as `fusionrec run` does on a full log.
    Item embeddings come from ``--art`` (the tables `fusionrec embed` wrote).
    """
    if args.art is None or not (Path(args.art) / "embeddings").is_dir():
        print("fusionrec rows skipped: pass --art ART with ART/embeddings from `fusionrec embed`")
        return {}
    from fusionrec.pipeline.config import load_config
    from fusionrec.pipeline.retrieval.fusion import load_modalities
    from fusionrec.pipeline.retrieval.stage import Catalog, retriever_from_config
    from fusionrec.pipeline.io.tables import load_items
    from fusionrec.ranker.serving.export import recommend as ranked_topk, topk
    from fusionrec.ranker.features import behaviour_features
    from fusionrec.ranker.serving.recommender import popular_fallback
    from fusionrec.ranker.training import build_examples, fit_ranker, label_windows, split_users

    item_mods = load_modalities(Path(args.art) / "embeddings", "item")
    user_mods = load_modalities(Path(args.art) / "embeddings", "user")
    items = load_items(args.data)
    catalog = Catalog(items, None, train)
    wanted = users.to_list()
    cutoff = int(train["timestamp"].max()) + 1
    out: dict[str, pl.DataFrame] = {}

    def served(ranked: pl.DataFrame) -> pl.DataFrame:
        # As `fusionrec recommend` does: users retrieval cannot place get the recent-popularity list.
        return pl.concat([ranked, popular_fallback(wanted, ranked, train, k)], how="diagonal_relaxed")

    def retrieval(name: str, cfg, mods: dict, behaviour: bool = True) -> None:
        retriever = retriever_from_config(cfg)
        if not behaviour:  # content alone: no behaviour and no popularity modality
            retriever.behaviour_dim = 0
            retriever.popularity = False
        retriever.fit(mods, train, user_mods if mods else None)
        # As `fusionrec recommend` does: users retrieval cannot place get the popular items.
        cands = retriever.candidates(wanted, k=cfg.index.n_candidates)
        out[name] = served(topk(cands.with_columns(pl.col("retrieval_score").cast(pl.Float64).alias("score")), k))
        return retriever, cands

    cfg = load_config()
    # The two-stage model: weighted fusion, then the LightGBM ranker.
    retriever, cands = retrieval("fusionrec retrieval only (weighted)", cfg, item_mods)
    windows = label_windows(train["timestamp"], cfg.ranker.label_window_days)
    if len(windows) == 2:
        tr = build_examples(catalog, item_mods, user_mods, windows[0], cfg)
        va = build_examples(catalog, item_mods, user_mods, windows[1], cfg)
    else:
        tr, va = split_users(build_examples(catalog, item_mods, user_mods, windows[0], cfg))
    ranker = fit_ranker(tr, va, cfg)
    out["fusionrec retrieval + ranker"] = served(ranked_topk(ranker, behaviour_features(cands, train, items, cutoff), k))
    out = {"fusionrec retrieval + ranker": out.pop("fusionrec retrieval + ranker"), **out}
    # Ablations: fusion methods and single modalities (retrieval alone).
    retrieval("ablation: attention fusion", load_config(overrides=["fusion.method=attention"]), item_mods)
    retrieval("ablation: concatenation (equal weights)", load_config(overrides=["fusion.method=concat"]), item_mods)
    for name, mods in item_mods.items():
        retrieval(f"ablation: {name} only", cfg, {name: mods}, behaviour=False)
    retrieval("ablation: behaviour only", load_config(overrides=["fusion.weights={behaviour=1.0}"]), item_mods)
    return out


# ----------------------------------------------------------------------------- run

def _row(name: str, res: EvaluationResult, base: EvaluationResult | None, seconds: float,
         n_boot: int, seed: int) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name}
    for m in TABLE_METRICS:
        ci = bootstrap_ci(res.per_user, m, n_boot=n_boot, seed=seed)
        row.update({m: ci["mean"], f"{m}_ci_low": ci["ci_low"], f"{m}_ci_high": ci["ci_high"]})
    known = bootstrap_ci(res.per_user.filter(pl.col("segment") != "new"), "ndcg@10", n_boot=n_boot, seed=seed)
    row.update({"ndcg@10 known users": known["mean"], "ndcg@10 known users_ci_low": known["ci_low"],
                "ndcg@10 known users_ci_high": known["ci_high"]})
    for m in ("coverage@10", "novelty@10", "gini@10", "long_tail_share@10", "ild@10"):
        if m in res.metrics:
            row[m] = res.metrics[m]
    if base is not None:
        cmp = paired_comparison(base.per_user, res.per_user, "ndcg@10", n_boot=n_boot, seed=seed)
        row.update({"d_ndcg@10_vs_pop": cmp["diff"], "d_ndcg@10_vs_pop_ci_low": cmp["ci_low"],
                    "d_ndcg@10_vs_pop_ci_high": cmp["ci_high"], "p_vs_pop": cmp["p_value"]})
    row["seconds"] = seconds
    return row


def _cell(row: dict[str, Any], m: str) -> str:
    v = row.get(m)
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "n/a"
    if f"{m}_ci_low" in row:
        return f"{v:.4f} [{row[m + '_ci_low']:.4f}, {row[m + '_ci_high']:.4f}]"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def markdown(rows: list[dict[str, Any]], skipped: dict[str, str], info: dict[str, Any]) -> str:
    acc = ["model", *TABLE_METRICS, "d_ndcg@10_vs_pop", "p_vs_pop", "seconds"]
    beyond = ["model", "ndcg@10 known users", "coverage@10", "novelty@10", "gini@10", "long_tail_share@10",
              "ild@10"]
    beyond = [c for c in beyond if any(c in r for r in rows)]

    def table(cols: list[str]) -> list[str]:
        out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        for r in rows:
            cells = [r["model"] if c == "model" else (f"{r[c]:.1f}" if c == "seconds" else _cell(r, c))
                     for c in cols]
            out.append("| " + " | ".join(cells) + " |")
        return out

    lines = [
        f"Data: `{info['data']}`; global temporal split, latest {info['test_fraction']:.0%} of interactions "
        f"as test (seed {info['seed']}): {info['n_train']} train / {info['n_test']} test interactions, "
        f"{info['n_test_users']} test users of whom {info['n_new_users']} have no training history "
        "(every model gives them popularity). Relevance: every test interaction not already in train. "
        f"Mean over users with 95% bootstrap intervals ({info['n_boot']} resamples); "
        "d_ndcg@10_vs_pop is the paired difference with popularity.",
        "",
        *table(acc),
        "",
        *table(beyond),
    ]
    if info.get("embeddings"):
        lines.append(f"\nItem embeddings (VBPR's visual features, ILD): `{info['embeddings']}`")
    for name, params in info.get("params", {}).items():
        if params and name not in skipped:
            lines.append(f"\n{name}: " + ", ".join(f"{k}={v}" for k, v in params.items()))
    for name, why in skipped.items():
        lines.append(f"\nSkipped {name}: {why}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="data directory (interactions.csv/.parquet)")
    ap.add_argument("--art", type=Path, help="artifacts dir or embeddings parquet with item image vectors")
    ap.add_argument("--modality", default="image", help="item embedding fed to VBPR and diversity (image)")
    ap.add_argument("--test-fraction", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k", default="10,20", help="cut-offs, comma-separated")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vbpr-epochs", type=int, default=20)
    ap.add_argument("--only", help="comma-separated model names to run (substring match)")
    ap.add_argument("--tune", action="store_true", help="grid-search each peer on a validation split of train")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--report", type=Path, help="also write the HTML report here")
    args = ap.parse_args(argv)
    ks = tuple(int(k) for k in args.k.split(","))

    interactions = load_interactions(args.data)
    train, test = global_temporal_split(interactions, args.test_fraction, seed=args.seed)
    users = test["user_id"].unique().sort()
    emb_path = find_item_embeddings([p for p in (args.art, args.data) if p is not None], args.modality)
    item_vectors = load_item_vectors(emb_path) if emb_path else None
    print(f"split: {train.height} train / {test.height} test, {users.len()} test users; "
          f"embeddings: {emb_path or 'none'}", flush=True)

    runs: dict[str, tuple[pl.DataFrame, float]] = {}
    skipped: dict[str, str] = {}
    tuning: dict[str, Any] = {}
    chosen = peers(args, item_vectors)
    if args.only:
        wanted = [w.strip().lower() for w in args.only.split(",")]
        chosen = [p for p in chosen if any(w in p.name.lower() for w in wanted)]
    for peer in chosen:
        t0 = time.perf_counter()
        try:
            if args.tune and peer.grid:
                tuning[peer.name] = tune(peer, train, args)
                peer.params.update(tuning[peer.name]["best"])
                t0 = time.perf_counter()
            recs = peer.build().fit(train).recommend(users, k=max(ks))
        except Skip as why:
            skipped[peer.name] = str(why)
            print(f"skip {peer.name}: {why}", flush=True)
            continue
        runs[peer.name] = (recs, time.perf_counter() - t0)
        print(f"{peer.name}: {runs[peer.name][1]:.1f} s", flush=True)
    for name, recs in fusionrec_runs(train, test, users, max(ks), args).items():
        runs[name] = (recs, float("nan"))

    results = {n: evaluate(r, test, train, ks, item_vectors=item_vectors, n_items=None)
               for n, (r, _) in runs.items()}
    base = results.get("popularity")
    rows = [_row(n, res, base if n != "popularity" else None, runs[n][1], args.n_boot, args.seed)
            for n, res in results.items()]
    first = next(iter(results.values()))
    info = {"data": str(args.data), "test_fraction": args.test_fraction, "seed": args.seed,
            "n_train": train.height, "n_test": test.height, "n_test_users": users.len(),
            "n_new_users": int(first.metrics["n_new_users"]) if results else 0, "n_boot": args.n_boot,
            "embeddings": str(emb_path) if emb_path else None}
    info["params"] = {p.name: {k: v for k, v in p.params.items() if k not in ("item_vectors", "threads")}
                      for p in chosen}
    md = markdown(rows, skipped, info)
    print("\n" + md)

    args.out.mkdir(parents=True, exist_ok=True)
    versions = {"python": platform.python_version(), "polars": pl.__version__, "numpy": np.__version__}
    for lib in ("implicit", "cornac"):
        try:
            versions[lib] = importlib.metadata.version(lib)  # no import: cornac pulls in torch
        except importlib.metadata.PackageNotFoundError:
            versions[lib] = None
    payload = {"info": info, "versions": versions, "tuning": tuning, "rows": rows,
               "skipped": skipped,
               "results": {n: r.to_dict() for n, r in results.items()}}
    for name, text in (("peers.json", json.dumps(payload, indent=2, default=float, allow_nan=True) + "\n"),
                       ("peers.md", md)):
        with atomic_path(args.out / name) as tmp:
            tmp.write_text(text)
    if args.report:
        from fusionrec.evaluation.report import write_report
        write_report(args.report, title="fusionrec peers", runs=results,
                     meta={k: v for k, v in info.items() if k != "params"},
                     peers=pl.DataFrame(rows).drop("seconds"),
                     exposure={n: r for n, (r, _) in runs.items()}, n_items=first.metrics.get("n_items"),
                     exposure_k=10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
