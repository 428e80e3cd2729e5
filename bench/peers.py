"""Quality benchmark: the lists `fusionrec run` exports against tuned peers, on user-level protocols.

One command per data set (from the project root)::

    .venv/bin/python bench/peers.py --dataset movielens   # each user's latest 20% held out
    .venv/bin/python bench/peers.py --dataset lastfm      # the authors' split: train 0+1, test 2

What it does, in one run:

1. **Split.** MovieLens-100K: each user's latest 20% of ratings are test (seeded tie order),
   relevant = rating >= 4. Last.fm-2K: labels 0 and 1 are train, 2 is test, every test
   pair relevant. Scored users have training history and at least one relevant test item
   they had not seen; seen items are excluded from every list.
2. **fusionrec.** `fusionrec run` (the real CLI, real encoders or the set's precomputed
   embeddings) on a data directory holding the train part only; its exported top-10
   (`ART/exports/topk.parquet`) is what is scored. It chooses everything on validation
   carved from that train part. Its ranker's and its retrieval order's lists are scored
   too (the exported list is whichever its guard shipped).
3. **Peers**, each tuned on validation carved from the train part the same way fusionrec
   carves its own (MovieLens: each user's latest 20% of train; Last.fm: fit on 0, score 1),
   with at least the budget fusionrec's own source of the same kind gets (10 settings at
   most, ALS 16), then refitted on the whole train part:
   popularity, item-kNN (cosine), EASE (lambda x positives-only or all ratings), implicit
   ALS and BPR, Cornac VBPR (on the item image embeddings, or the audio ones where there
   are no images; skipped with a message when cornac is missing).
4. **Report.** NDCG@10, recall@10 and their bootstrap intervals; the paired difference
   and its 95% interval of fusionrec's exported list against each peer; the ratio to the
   strongest peer on test (the most demanding comparison); ranker vs retrieval order.
   MovieLens also gets the global temporal protocol (latest 20% of all ratings) as a
   slice table: known users and new users.

Writes bench/results/quality_<dataset>.json and .md. Never chooses anything on test data.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # implicit asks for it; set before numpy loads

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from fusionrec.evaluation.splits import global_temporal_split, per_user_temporal_split  # noqa: E402
from fusionrec.pipeline.retrieval.candidates import hits_at, ndcg_at, truth_pairs  # noqa: E402
from fusionrec.pipeline.retrieval.sources import (  # noqa: E402
    ALS,
    EASE,
    SEARCH_GRID,
    ItemKNN,
    Popular,
    UserItemLog,
    build_log,
    positive_mask,
    relevance_threshold,
)
from fusionrec.ranker.serving.recommender import Recommender  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SHARED = ROOT.parent / "shared" / "datasets"
SETS = {"movielens": "movielens-100k", "lastfm": "lastfm-2k"}
ENSEMBLE = "ALS ensemble (6 seeds, reference)"
N_BOOT = 1000


def read(path: Path) -> pl.DataFrame:
    return pl.read_csv(path, schema_overrides={"user_id": pl.String, "item_id": pl.String})


def split(name: str, inter: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    if name == "lastfm":
        return inter.filter(pl.col("timestamp") < 2), inter.filter(pl.col("timestamp") == 2)
    return per_user_temporal_split(inter, 0.2, seed=0)


def validation(name: str, train: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The peers' validation carve: the same protocol, applied to the train part."""
    if name == "lastfm":
        return train.filter(pl.col("timestamp") < 1), train.filter(pl.col("timestamp") == 1)
    return per_user_temporal_split(train, 0.2, seed=0)


def data_dir(source: Path, train: pl.DataFrame, out: Path) -> Path:
    """A data directory with the train interactions and the set's other files (hard links where the
    file system allows, else copies: media must sit inside the data directory, symlinks out are refused)."""
    out.mkdir(parents=True, exist_ok=True)

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    for entry in source.iterdir():
        if entry.name.startswith("interactions"):
            continue
        target = out / entry.name
        if target.exists():
            continue
        if entry.is_dir():
            shutil.copytree(entry, target, copy_function=link)
        else:
            link(str(entry), str(target))
    train.write_csv(out / "interactions.csv")
    return out


def run_fusionrec(data: Path, art: Path, seed_embeddings: Path | None = None) -> float:
    if seed_embeddings is not None and seed_embeddings.is_dir() and not (art / "embeddings").exists():
        art.mkdir(parents=True, exist_ok=True)
        shutil.copytree(seed_embeddings, art / "embeddings")  # content-hashed: reused, not re-encoded
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "fusionrec.cli", "run", "--data", str(data), "--out", str(art), "-q",
           "--set", "export.pseudonymise=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"fusionrec run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


# -- peers --------------------------------------------------------------------------------------

Scorer = Callable[[UserItemLog, np.ndarray], np.ndarray]


def bpr(params: dict[str, Any]) -> Callable[[UserItemLog], Scorer]:
    def fit(log: UserItemLog) -> Scorer:
        from implicit.cpu.bpr import BayesianPersonalizedRanking

        model = BayesianPersonalizedRanking(factors=params["factors"], learning_rate=params["learning_rate"],
                                            regularization=params["regularization"], iterations=100,
                                            random_state=0, num_threads=1)
        model.fit(log.matrix, show_progress=False)
        u, i = np.asarray(model.user_factors), np.asarray(model.item_factors)
        return lambda _log, rows: u[rows] @ i.T
    return fit


def source_peer(make: Callable[[], Any]) -> Callable[[UserItemLog], Scorer]:
    def fit(log: UserItemLog) -> Scorer:
        source = make().fit(log)
        return source.score
    return fit


def vbpr(vectors: tuple[list[str], np.ndarray] | None, params: dict[str, Any]) -> Callable[[UserItemLog], Scorer]:
    def fit(log: UserItemLog) -> Scorer:
        import torch
        from cornac.data import Dataset, ImageModality
        from cornac.models import VBPR

        torch.set_num_threads(1)
        assert vectors is not None
        ids, mat = vectors
        index = {i: j for j, i in enumerate(ids)}
        feats = np.zeros((log.n_items, mat.shape[1]), np.float32)
        for j, item in enumerate(log.item_ids):
            if str(item) in index:
                feats[j] = mat[index[str(item)]]
        coo = log.matrix.tocoo()
        triples = list(zip(coo.row.astype(str).tolist(), coo.col.astype(str).tolist(), [1.0] * coo.nnz))
        train_set = Dataset.build(triples, fmt="UIR", seed=0)
        modality = ImageModality(features=feats, ids=[str(i) for i in range(log.n_items)], normalized=True)
        modality.build(id_map=train_set.iid_map)
        train_set.add_modalities(item_image=modality)
        model = VBPR(k=params["k"], k2=params["k"], n_epochs=params["epochs"], batch_size=100,
                     learning_rate=params["learning_rate"], lambda_w=1.0, lambda_b=0.01, lambda_e=0.0,
                     use_gpu=False, verbose=False, seed=0)
        model.fit(train_set)
        uidx = np.array([train_set.uid_map.get(str(u), -1) for u in range(log.n_users)])
        iidx = np.array([train_set.iid_map.get(str(i), -1) for i in range(log.n_items)])
        user_vec = np.hstack([model.gamma_user, model.theta_user])
        item_vec = np.hstack([model.gamma_item, model.theta_item])
        bias = model.beta_item + model.visual_bias
        uv = np.where(uidx[:, None] >= 0, user_vec[np.maximum(uidx, 0)], 0.0)
        iv = np.where(iidx[:, None] >= 0, item_vec[np.maximum(iidx, 0)], 0.0)
        ib = np.where(iidx >= 0, bias[np.maximum(iidx, 0)], -1e9)
        return lambda _log, rows: uv[rows] @ iv.T + ib
    return fit


# The peers' ALS searches every (factors, regularisation, alpha) of fusionrec's own ALS grid
# (11: the source's 14 settings less the tag weights, which a peer without tags cannot use)
# and five more around it (16 in all, more than the source's budget of 14), so the peer is at
# least as well tuned as the source.
ALS_SETTINGS = list(dict.fromkeys(
    (int(p["factors"]), float(p["regularization"]), float(p["alpha"])) for p in SEARCH_GRID["als"])) + [
    (32, 0.5, 10.0), (64, 0.5, 10.0), (64, 5.0, 10.0), (128, 5.0, 10.0), (16, 5.0, 10.0)]


def peer_grid(vectors: tuple[list[str], np.ndarray] | None) -> dict[str, list[tuple[dict[str, Any], Any]]]:
    """Each peer's settings (10 at most, ALS 16): (setting, fit function taking a log)."""
    grid: dict[str, list[tuple[dict[str, Any], Any]]] = {
        "popularity": [({}, source_peer(Popular))],
        # Seven settings, as many as fusionrec's item-kNN source tries with its two tag settings.
        "item-kNN": [({"neighbours": n}, source_peer(lambda n=n: ItemKNN(neighbours=n)))
                     for n in (10, 20, 50, 100, 200, 400, 800)],
        "EASE": [({"lambda": lam, "input": which}, source_peer(lambda lam=lam: EASE(lam=lam)))
                 for lam in (50.0, 100.0, 200.0, 500.0, 1000.0) for which in ("positives", "all")],
        "implicit ALS": [({"factors": f, "regularization": r, "alpha": a}, source_peer(
            lambda f=f, r=r, a=a: ALS(factors=f, regularization=r, alpha=a, threads=1, seeds=1)))
            for f, r, a in ALS_SETTINGS],
        # Not a library's own model: six seeded ALS fits averaged, as fusionrec's ALS source does.
        # Reported beside the peers so the margin over an ensemble is known too.
        ENSEMBLE: [({"factors": f, "regularization": r, "alpha": a, "seeds": 6}, source_peer(
            lambda f=f, r=r, a=a: ALS(factors=f, regularization=r, alpha=a, threads=1, seeds=6)))
            for f, r, a in ALS_SETTINGS],
        "implicit BPR": [({"factors": f, "learning_rate": lr, "regularization": 0.01},
                          bpr({"factors": f, "learning_rate": lr, "regularization": 0.01}))
                         for f in (32, 64) for lr in (0.005, 0.01, 0.05)],
    }
    if vectors is not None:
        grid["Cornac VBPR"] = [({"k": k, "epochs": 20, "learning_rate": lr}, vbpr(vectors, {"k": k, "epochs": 20,
                                                                                           "learning_rate": lr}))
                               for k in (10, 32) for lr in (0.005,)]
    return grid


def have_cornac() -> bool:
    try:
        import cornac  # noqa: F401
    except ImportError:
        return False
    return True


# -- scoring ------------------------------------------------------------------------------------

class Task:
    """Users to score, their truth, and the logs a model fits on (positives only, or all)."""

    def __init__(self, train: pl.DataFrame, test: pl.DataFrame, item_ids: np.ndarray, threshold: float | None):
        self.truth = truth_pairs(train, test, threshold)
        self.users = sorted(self.truth["user_id"].unique().to_list())
        user_ids = np.array(sorted(set(train["user_id"].to_list())), dtype=object)
        self.item_ids = item_ids
        self.logs = {"positives": build_log(train, user_ids, item_ids, threshold=threshold),
                     "all": build_log(train, user_ids, item_ids, threshold=None)}
        index = {u: j for j, u in enumerate(user_ids)}
        self.rows = np.array([index[u] for u in self.users], np.int64)
        col = {str(i): j for j, i in enumerate(item_ids)}
        row = {u: j for j, u in enumerate(self.users)}
        self.truth_matrix = np.zeros((len(self.users), len(item_ids)), bool)
        self.truth_matrix[[row[u] for u in self.truth["user_id"].to_list()],
                          [col[i] for i in self.truth["item_id"].to_list()]] = True
        self.blocked = self.logs["all"].seen[self.rows].toarray() > 0

    def per_user(self, scores: np.ndarray) -> np.ndarray:
        return ndcg_at(np.where(self.blocked, -np.inf, scores), self.truth_matrix)

    def recall(self, scores: np.ndarray, k: int = 10) -> np.ndarray:
        """Per-user recall@k (an item at -inf, seen or not in an exported list, is never a hit)."""
        hits = hits_at(np.where(self.blocked, -np.inf, scores), self.truth_matrix, k)
        return hits / np.maximum(self.truth_matrix.sum(axis=1), 1)

    def lists(self, recs: pl.DataFrame) -> np.ndarray:
        """A top-k frame (user_id, rank, item_id) as a score matrix (rank order, unlisted -inf).

        Unlisted items are -inf, never recommended: a user without a list, or with fewer than 10
        unseen items in it, scores only the hits the list holds (before, -1e9 let the first
        unlisted items by column fill the list; every exported list was full, see `short_lists`)."""
        col = {str(i): j for j, i in enumerate(self.item_ids)}
        row = {u: j for j, u in enumerate(self.users)}
        recs = recs.filter(pl.col("user_id").is_in(self.users) & (pl.col("rank") <= 10))
        out = np.full((len(self.users), len(self.item_ids)), -np.inf, np.float32)
        out[[row[u] for u in recs["user_id"].to_list()], [col[i] for i in recs["item_id"].to_list()]] = \
            -recs["rank"].cast(pl.Float32).to_numpy()
        return out

    def score_model(self, fit: Any, which: str) -> np.ndarray:
        log = self.logs[which]
        return np.asarray(fit(log)(log, self.rows), dtype=np.float32)


def frame_ndcg(recs: pl.DataFrame, truth: pl.DataFrame, users: list[str], k: int = 10) -> np.ndarray:
    """Per-user NDCG@k of top-k lists (user_id, item_id, rank) against truth pairs, in `users` order."""
    rel = truth.with_columns(pl.lit(1.0).alias("rel"))
    got = recs.filter(pl.col("rank") <= k).join(rel, on=["user_id", "item_id"], how="left").with_columns(
        (pl.col("rel").fill_null(0.0) / (pl.col("rank") + 1).cast(pl.Float64).log(2)).alias("g"))
    dcg = dict(got.group_by("user_id").agg(pl.col("g").sum()).iter_rows())
    n_rel = dict(truth.group_by("user_id").agg(pl.len()).iter_rows())
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    return np.array([dcg.get(u, 0.0) / disc[:min(n_rel.get(u, 0), k)].sum() if n_rel.get(u) else 0.0
                     for u in users])


def interval(a: np.ndarray, b: np.ndarray | None = None, seed: int = 0) -> tuple[float, float, float]:
    values = a if b is None else a - b
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(N_BOOT, len(values)))].mean(axis=1)
    return float(values.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def tune_peers(name: str, train: pl.DataFrame, item_ids: np.ndarray, threshold: float | None,
               vectors: tuple[list[str], np.ndarray] | None) -> dict[str, dict[str, Any]]:
    fit_part, val_part = validation(name, train)
    task = Task(fit_part, val_part, item_ids, threshold)
    chosen = {}
    for peer, settings in peer_grid(vectors).items():
        best: dict[str, Any] | None = None
        t0 = time.perf_counter()
        for setting, fit in settings:
            which = setting.get("input", "positives")
            value = float(task.per_user(task.score_model(fit, which)).mean())
            if best is None or value > best["validation"]:
                best = {"setting": setting, "validation": round(value, 5), "fit": fit, "input": which}
        assert best is not None
        chosen[peer] = best
        print(f"  {peer}: validation NDCG@10 {best['validation']:.4f} with {best['setting']} "
              f"({len(settings)} settings, {time.perf_counter() - t0:.0f} s)", flush=True)
    return chosen


def evaluate_all(task: Task, peers: dict[str, dict[str, Any]], ours: dict[str, pl.DataFrame]) -> dict[str, Any]:
    per_user: dict[str, np.ndarray] = {}
    recall: dict[str, np.ndarray] = {}
    for peer, best in peers.items():
        scores = task.score_model(best["fit"], best["input"])
        per_user[peer], recall[peer] = task.per_user(scores), task.recall(scores)
    short: dict[str, int] = {}
    for label, recs in ours.items():
        scores = task.lists(recs)
        per_user[label], recall[label] = task.per_user(scores), task.recall(scores)
        # users whose list holds fewer than 10 unseen items (none: the lists are full)
        short[label] = int((np.isfinite(np.where(task.blocked, -np.inf, scores)).sum(axis=1) < 10).sum())
        if short[label]:
            print(f"  WARNING {label}: {short[label]} of {len(task.users)} users have fewer than 10 unseen items "
                  "in their list (scored as they are, missing slots miss)", flush=True)
    return {"ndcg": per_user, "recall": recall, "short_lists": short}


def table(result: dict[str, Any], peers: dict[str, dict[str, Any]], headline: str) -> tuple[list[dict], dict]:
    ndcg = result["ndcg"]
    strongest = max((p for p in peers if p != ENSEMBLE), key=lambda p: float(ndcg[p].mean()))
    rows = []
    for model, values in ndcg.items():
        mean, lo, hi = interval(values)
        d, dlo, dhi = interval(ndcg[headline], values) if model != headline else (0.0, 0.0, 0.0)
        rows.append({"model": model, "ndcg@10": round(mean, 4), "ci": [round(lo, 4), round(hi, 4)],
                     "recall@10": round(float(result["recall"][model].mean()), 4),
                     "validation": peers[model]["validation"] if model in peers else None,
                     "setting": peers[model]["setting"] if model in peers else None,
                     "fusionrec_minus_model": round(d, 4), "paired_ci": [round(dlo, 4), round(dhi, 4)]})
    ratio = float(ndcg[headline].mean() / ndcg[strongest].mean())
    d, lo, hi = interval(ndcg[headline], ndcg[strongest])
    head = {"strongest_peer": strongest, "ratio": round(ratio, 4), "difference": round(d, 4),
            "interval": [round(lo, 4), round(hi, 4)], "users": len(ndcg[headline])}
    if ENSEMBLE in ndcg:
        e, elo, ehi = interval(ndcg[headline], ndcg[ENSEMBLE])
        head["vs_als_ensemble"] = {"ratio": round(float(ndcg[headline].mean() / ndcg[ENSEMBLE].mean()), 4),
                                   "difference": round(e, 4), "interval": [round(elo, 4), round(ehi, 4)]}
    return rows, head


def our_lists(art: Path, users: list[str]) -> tuple[dict[str, pl.DataFrame], dict[str, Any]]:
    exported = pl.read_parquet(art / "exports" / "topk.parquet")
    rec = Recommender(art)
    shipped = rec.order_
    lists = {"fusionrec (exported)": exported}
    rec.order_ = "retrieval"
    lists["fusionrec retrieval order"] = rec.recommend(users, 10)
    if rec.ranker_ is not None:
        rec.order_ = "ranker"
        lists["fusionrec ranker order"] = rec.recommend(users, 10)
    guard = rec.guard_
    return lists, {"shipped": shipped, "guard": guard}


def markdown(title: str, rows: list[dict], head: dict, extra: str = "") -> str:
    out = [f"### {title}", "", f"{head['users']} users. fusionrec's exported top-10 vs the strongest peer on test "
           f"({head['strongest_peer']}): ratio **{head['ratio']:.3f}**, paired difference {head['difference']:+.4f} "
           f"(95% interval {head['interval'][0]:+.4f} to {head['interval'][1]:+.4f})."
           + (f" Against an ensemble of six ALS fits (not a peer library's model, a reference): ratio "
              f"{head['vs_als_ensemble']['ratio']:.3f}, paired difference {head['vs_als_ensemble']['difference']:+.4f} "
              f"({head['vs_als_ensemble']['interval'][0]:+.4f} to {head['vs_als_ensemble']['interval'][1]:+.4f})."
              if "vs_als_ensemble" in head else ""), "",
           "| model | NDCG@10 | 95% CI | recall@10 | validation NDCG@10 | fusionrec - model (paired 95% CI) | setting |",
           "|---|---:|---|---:|---:|---|---|"]
    for r in sorted(rows, key=lambda r: -r["ndcg@10"]):
        out.append(f"| {r['model']} | {r['ndcg@10']:.4f} | {r['ci'][0]:.4f}-{r['ci'][1]:.4f} | {r['recall@10']:.4f} | "
                   f"{'' if r['validation'] is None else format(r['validation'], '.4f')} | "
                   f"{r['fusionrec_minus_model']:+.4f} ({r['paired_ci'][0]:+.4f}, {r['paired_ci'][1]:+.4f}) | "
                   f"{'' if r['setting'] is None else json.dumps(r['setting'])} |")
    return "\n".join(out) + "\n" + extra


def item_vectors(art: Path, source: Path) -> tuple[list[str], np.ndarray] | None:
    for path in (art / "embeddings" / "item_image.parquet", source / "embeddings" / "item_audio.parquet"):
        if path.is_file():
            df = pl.read_parquet(path)
            dim = len(df["vector"][0])
            id_column = "item_id" if "item_id" in df.columns else "id"  # ART's tables name it id
            return df[id_column].cast(pl.String).to_list(), \
                df["vector"].cast(pl.Array(pl.Float32, dim)).to_numpy().astype(np.float32)
    return None


@dataclass(frozen=True)
class DataSet:
    """One shared data set, read and split as every benchmark here reads it."""

    source: Path  # the data directory
    work: Path  # the benchmark's working folder
    inter: pl.DataFrame
    items: pl.DataFrame
    item_ids: np.ndarray  # sorted
    threshold: float | None  # relevance threshold of ratings (None: every interaction counts)
    train: pl.DataFrame
    test: pl.DataFrame


def relabelled_items(source: Path, out: Path, seed: int) -> Path:
    """A copy of the data directory `source` whose item ids are a seeded random permutation of
    new ids, in every table that names items (interactions, items, embeddings); media linked.

    A check that no model reads the ids' order: Last.fm-2K numbers its artists in order of
    their first listener over the whole data set, test part included, so a model that orders
    anything by id can find a user's held-out artists among their own.
    """
    items = pl.read_csv(source / "items.csv", infer_schema_length=0)
    ids = items["item_id"].to_list()
    new = (np.random.default_rng(seed).permutation(len(ids)) + 10 ** len(str(len(ids)))).astype(str)
    mapping = dict(zip(ids, new.tolist(), strict=True))
    out.mkdir(parents=True, exist_ok=True)
    relabel = pl.col("item_id").replace_strict(mapping, default=None)
    for entry in source.iterdir():
        target = out / entry.name
        if entry.name in ("items.csv", "interactions.csv"):
            frame = pl.read_csv(entry, infer_schema_length=0).with_columns(relabel)
            if entry.name == "items.csv":  # the rows' order follows the ids too
                frame = frame.sample(fraction=1.0, shuffle=True, seed=seed)
            frame.write_csv(target)
        elif entry.name == "embeddings":
            target.mkdir(exist_ok=True)
            for table in entry.glob("*.parquet"):
                vectors = pl.read_parquet(table).with_columns(pl.col("item_id").cast(pl.String))
                vectors.with_columns(relabel).drop_nulls("item_id").write_parquet(target / table.name)
        elif not target.exists():
            target.symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    return out


def load_dataset(name: str, shared: Path, work: Path | None, relabel_seed: int | None = None) -> DataSet:
    source = shared / SETS[name] / "fusionrec"
    if not source.is_dir():
        raise SystemExit(f"data set absent at {source}")
    if relabel_seed is not None:
        work = work or RESULTS / f"work_{name}_relabelled"
        source = relabelled_items(source, work / "source", relabel_seed)
    inter = read(source / "interactions.csv")
    items = pl.read_csv(source / "items.csv", schema_overrides={"item_id": pl.String}, infer_schema_length=0)
    train, test = split(name, inter)
    return DataSet(source, work or RESULTS / f"work_{name}", inter, items,
                   np.array(sorted(items["item_id"].to_list()), dtype=object), relevance_threshold(inter, 0),
                   train, test)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", choices=sorted(SETS), required=True)
    ap.add_argument("--shared", type=Path, default=SHARED)
    ap.add_argument("--work", type=Path, default=None, help="working folder (default bench/results/work_<dataset>)")
    ap.add_argument("--no-vbpr", action="store_true", help="skip Cornac VBPR (minutes per fit)")
    ap.add_argument("--no-global", action="store_true", help="skip the global temporal slice table")
    ap.add_argument("--relabel-items", type=int, default=None, metavar="SEED",
                    help="run on a copy whose item ids are a seeded random permutation (a check that no model "
                         "reads the ids' order); results get the suffix _relabelled")
    args = ap.parse_args()
    data = load_dataset(args.dataset, args.shared, args.work, args.relabel_items)
    source, work, inter, item_ids, threshold = data.source, data.work, data.inter, data.item_ids, data.threshold
    train, test = data.train, data.test
    print(f"{args.dataset}: {train.height} train, {test.height} test interactions; relevance threshold {threshold}",
          flush=True)

    art = work / "art"
    seconds = run_fusionrec(data_dir(source, train, work / "train"), art)
    print(f"fusionrec run: {seconds:.0f} s", flush=True)
    vectors = item_vectors(art, source) if not args.no_vbpr and have_cornac() else None
    if not args.no_vbpr and vectors is None:
        print("  Cornac VBPR skipped: cornac is not installed (pip install 'fusionrec[bench]') or no item embeddings")
    peers = tune_peers(args.dataset, train, item_ids, threshold, vectors)
    task = Task(train, test, item_ids, threshold)
    ours, shipped = our_lists(art, task.users)
    result = evaluate_all(task, peers, ours)
    rows, head = table(result, peers, "fusionrec (exported)")
    r_vs = interval(result["ndcg"].get("fusionrec ranker order", result["ndcg"]["fusionrec retrieval order"]),
                    result["ndcg"]["fusionrec retrieval order"])
    protocol = "each user's latest 20% of ratings held out, relevant = rating >= 4" if args.dataset == "movielens" \
        else "the authors' split: train on 0 and 1, test on 2"
    extra = (f"\nShipped order: **{shipped['shipped']}** (guard on validation: {json.dumps(shipped['guard'].get('guard', shipped['guard']))}). "
             f"On test, ranker order minus retrieval order: {r_vs[0]:+.4f} (95% interval {r_vs[1]:+.4f} to {r_vs[2]:+.4f}). "
             f"`fusionrec run` took {seconds:.0f} s. Users whose list holds fewer than 10 unseen items: "
             f"{json.dumps(result['short_lists'])}.\n")
    report = {"dataset": args.dataset, "protocol": protocol, "rows": rows, "headline": head,
              "shipped": shipped, "ranker_minus_retrieval_on_test": [round(x, 4) for x in r_vs],
              "fusionrec_run_seconds": round(seconds, 1), "short_lists": result["short_lists"]}
    md = [f"## {args.dataset}: {protocol}", "", markdown("user-level protocol (headline)", rows, head, extra)]

    if args.dataset == "movielens" and not args.no_global:
        g_train, g_test = global_temporal_split(inter, 0.2, seed=0)
        g_art = work / "art_global"
        run_fusionrec(data_dir(source, g_train, work / "train_global"), g_art, seed_embeddings=art / "embeddings")
        g_peers = tune_peers("movielens_global", g_train, item_ids, threshold, None)
        known = set(g_train["user_id"].to_list())
        g_task = Task(g_train, g_test, item_ids, threshold)
        g_ours, _ = our_lists(g_art, g_task.users)
        g_result = evaluate_all(g_task, g_peers, {"fusionrec (exported)": g_ours["fusionrec (exported)"]})
        g_rows, g_head = table(g_result, g_peers, "fusionrec (exported)")
        md.append(markdown("global temporal protocol, known-user slice (users with training history)",
                           g_rows, g_head))
        report["global_known_users"] = {"rows": g_rows, "headline": g_head}
        cold_truth = (g_test.filter(positive_mask(g_test, threshold))
                      .filter(~pl.col("user_id").is_in(list(known))).select("user_id", "item_id").unique())
        cold_users = sorted(cold_truth["user_id"].unique().to_list())
        exported = pl.read_parquet(g_art / "exports" / "topk.parquet")
        share = Popular().fit(g_task.logs["positives"]).share_
        top = item_ids[np.argsort(-share, kind="stable")[:10]]
        popular = pl.DataFrame({"user_id": np.repeat(cold_users, 10), "item_id": np.tile(top, len(cold_users)),
                                "rank": np.tile(np.arange(1, 11), len(cold_users))})
        a, b = frame_ndcg(exported, cold_truth, cold_users), frame_ndcg(popular, cold_truth, cold_users)
        d = interval(a, b)
        md.append(f"### global temporal protocol, new-user slice\n\n{len(cold_users)} users with no training history: "
                  f"fusionrec {a.mean():.4f} vs popularity {b.mean():.4f}, paired difference {d[0]:+.4f} "
                  f"(95% interval {d[1]:+.4f} to {d[2]:+.4f}).\n")
        report["global_new_users"] = {"users": len(cold_users), "fusionrec": round(float(a.mean()), 4),
                                      "popularity": round(float(b.mean()), 4), "paired": [round(x, 4) for x in d]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = args.dataset + ("" if args.relabel_items is None else "_relabelled")
    (RESULTS / f"quality_{name}.json").write_text(json.dumps(report, indent=2, default=str))
    (RESULTS / f"quality_{name}.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
