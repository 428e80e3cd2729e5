"""Shared helpers for the benchmarks: data location, loading, splits, ranking metrics, output."""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
RESULTS = ROOT / "bench" / "results"


def rss_mb() -> float:
    """Current resident memory of this process (MB), from /proc where available."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_interactions(data_dir: Path) -> pl.DataFrame:
    """The interactions table of a data directory, via the project loader when it exists."""
    try:
        from fusionrec.pipeline.io.tables import load_interactions as project_loader  # the lead's loader
        return project_loader(data_dir)
    except ImportError:
        pass
    data_dir = Path(data_dir)
    path = data_dir / "interactions.parquet"
    df = pl.read_parquet(path) if path.exists() else pl.read_csv(data_dir / "interactions.csv", infer_schema_length=0)
    cols = [pl.col("user_id").cast(pl.Utf8), pl.col("item_id").cast(pl.Utf8), pl.col("timestamp").cast(pl.Int64)]
    cols.append(pl.col("event").cast(pl.Utf8).str.to_lowercase() if "event" in df.columns
                else pl.lit("interact").alias("event"))
    cols.append(pl.col("value").cast(pl.Float64) if "value" in df.columns else pl.lit(None, pl.Float64).alias("value"))
    return df.select(cols)


def global_temporal_split(df: pl.DataFrame, test_fraction: float) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The last test_fraction of rows by time are the test set (one cut for all users)."""
    ts = np.sort(df["timestamp"].to_numpy())
    cut = ts[int(len(ts) * (1 - test_fraction))]
    return df.filter(pl.col("timestamp") < cut), df.filter(pl.col("timestamp") >= cut)


def test_targets(train: pl.DataFrame, test: pl.DataFrame) -> pl.DataFrame:
    """Per evaluated user (in train and test) the test items they had not seen in train."""
    seen = train.select("user_id", "item_id").unique()
    rel = (test.select("user_id", "item_id").unique()
           .join(seen, on=["user_id", "item_id"], how="anti")
           .filter(pl.col("user_id").is_in(train["user_id"].unique().implode())))
    return rel


def ranking_metrics(cands: pl.DataFrame, targets: pl.DataFrame, *, k_recall: int = 100, k_ndcg: int = 10,
                    cold_items: set[str] | None = None) -> dict[str, float]:
    """recall@k_recall and NDCG@k_ndcg (binary gains), averaged over the users in targets.

    cands: user_id, item_id, retrieval_rank. Users with no candidates score 0.
    """
    n_rel = targets.group_by("user_id").agg(pl.len().alias("n_rel"))
    hits = (cands.filter(pl.col("retrieval_rank") <= max(k_recall, k_ndcg))
            .join(targets, on=["user_id", "item_id"], how="inner"))
    per_user = (n_rel.join(
        hits.group_by("user_id").agg(
            (pl.col("retrieval_rank") <= k_recall).sum().alias("hit_r"),
            pl.when(pl.col("retrieval_rank") <= k_ndcg).then(1.0 / (pl.col("retrieval_rank") + 1).log(2))
            .otherwise(0.0).sum().alias("dcg")), on="user_id", how="left").fill_null(0))
    idcg_table = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(2, k_ndcg + 2)))])
    idcg = idcg_table[np.minimum(per_user["n_rel"].to_numpy(), k_ndcg)]
    out = {f"recall@{k_recall}": float((per_user["hit_r"] / per_user["n_rel"]).mean()),
           f"ndcg@{k_ndcg}": float((per_user["dcg"].to_numpy() / idcg).mean()),
           "users": int(per_user.height)}
    if cold_items:
        cold_t = targets.filter(pl.col("item_id").is_in(pl.Series(sorted(cold_items)).implode()))
        if cold_t.height:
            got = hits.filter(pl.col("retrieval_rank") <= k_recall).join(cold_t, on=["user_id", "item_id"])
            out[f"cold_recall@{k_recall}"] = got.height / cold_t.height
    return out


def popularity_candidates(train: pl.DataFrame, users: list[str], k: int) -> pl.DataFrame:
    """Most-interacted items not yet seen by the user (reference baseline)."""
    pop = train.group_by("item_id").agg(pl.len().alias("n")).sort(["n", "item_id"], descending=[True, False])
    top = pop.head(k + int(train.group_by("user_id").len()["len"].max())).with_row_index("pop_rank")
    users_df = pl.DataFrame({"user_id": users}, schema={"user_id": pl.Utf8})
    cand = (users_df.join(top.select("item_id", "pop_rank"), how="cross")
            .join(train.select("user_id", "item_id").unique(), on=["user_id", "item_id"], how="anti")
            .sort(["user_id", "pop_rank"]))
    return (cand.with_columns((pl.col("pop_rank").rank("ordinal").over("user_id")).cast(pl.Int32)
                              .alias("retrieval_rank"))
            .filter(pl.col("retrieval_rank") <= k).select("user_id", "item_id", "retrieval_rank"))


def environment() -> dict:
    import faiss
    return {"python": platform.python_version(), "numpy": np.__version__, "faiss": faiss.__version__,
            "polars": pl.__version__, "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_json(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float))
    os.replace(tmp, path)


def print_table(rows: list[dict], columns: list[str], title: str | None = None) -> None:
    """A plain fixed-width table on stdout."""
    if title:
        print(f"\n{title}")
    fmt = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, fmt)))
    print("  ".join("-" * w for w in fmt))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, fmt)))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)
