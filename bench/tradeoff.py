"""Beyond accuracy: what each `[rerank]` option costs in NDCG@10 and buys in coverage, Gini,
long-tail share, intra-list diversity and calibration, on the user-level protocols.

One command per data set (from the project root)::

    HF_HUB_OFFLINE=1 .venv/bin/python bench/tradeoff.py --dataset movielens   # each user's latest 20% held out
    HF_HUB_OFFLINE=1 .venv/bin/python bench/tradeoff.py --dataset lastfm      # the authors' split: train 0+1, test 2

1. **Split and fit** as `bench/peers.py` does (same split, same relevance, same scored users):
   `fusionrec run` on the train part, into `bench/results/work_<dataset>/art`; a directory
   there that holds the same train interactions is reused instead of fitted again.
2. **Candidates**: the shipped order's first `--candidates` (100) per scored user
   (`Recommender.recommend(users, 100)`, seen items left out), once.
3. **Sweep**: each option over its parameter (the others off), the lists reranked in memory
   with `ranker.rerank.rerank` (the served path's code) to 10 per user. Each point: NDCG@10
   and its 95% paired bootstrap interval against the unreranked top 10 (the same users);
   catalog coverage, Gini of exposure, long-tail share (head: the 20% of the catalog with the
   most training users), ILD (1 - cosine over the fused content vectors), calibration KL
   (Steck 2018, over the items' `tags`), ILD and KL with their paired intervals too.

Writes bench/results/tradeoff_<dataset>.json, .md and .html (the curves, drawn by
`evaluation.report`). Nothing is chosen on test data: the sweep only reports.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_json  # noqa: E402
from peers import SETS, SHARED, Task, data_dir, frame_ndcg, interval, load_dataset, run_fusionrec  # noqa: E402

from fusionrec.evaluation import metrics as M  # noqa: E402
from fusionrec.evaluation.report import write_report  # noqa: E402
from fusionrec.pipeline.config import RerankConfig  # noqa: E402
from fusionrec.ranker.rerank import rerank  # noqa: E402
from fusionrec.ranker.serving.recommender import Recommender  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
K = 10
# Each option and the values swept (the others off). Attribute caps only where the catalog
# has a single-valued attribute to cap (MovieLens: director; Last.fm's items are the artists).
SWEEPS: dict[str, tuple[str, list[Any]]] = {
    "diversity (MMR, fused)": ("mmr_lambda", [0.1, 0.3, 0.5, 0.7, 0.9]),
    "calibration (tags)": ("calibration_lambda", [0.05, 0.1, 0.2, 0.3, 0.5]),
    "exposure cap": ("max_item_share", [0.2, 0.1, 0.05, 0.03, 0.02]),
    "long-tail minimum": ("min_long_tail_share", [0.1, 0.2, 0.3, 0.5, 0.7]),
}
ATTRIBUTE = {"movielens": "director"}


def reuse_or_fit(name: str, source: Path, train: pl.DataFrame, work: Path) -> tuple[Path, str]:
    """The artifacts of `fusionrec run` on this train part: reused when ART/data holds the same pairs."""
    art = work / "art"
    snapshot = art / "data" / "interactions.parquet"
    if (art / "exports" / "topk.parquet").is_file() and snapshot.is_file():
        have = pl.read_parquet(snapshot, columns=["user_id", "item_id"]).select(pl.col("*").cast(pl.String))
        want = train.select(pl.col("user_id", "item_id").cast(pl.String))
        if have.height == want.height and have.sort(pl.all()).equals(want.sort(pl.all())):
            return art, "reused"
    seconds = run_fusionrec(data_dir(source, train, work / "train"), art)
    return art, f"fitted in {seconds:.0f} s"


def point(lists: pl.DataFrame, base: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    """Every metric of one set of lists, with paired intervals against the unreranked lists."""
    users = ctx["users"]
    ndcg = frame_ndcg(lists, ctx["truth"], users)
    ild = per_user(M.intra_list_diversity_per_user(lists, ctx["vectors"], K), "ild", users)
    kl = per_user(M.calibration_kl_per_user(lists, ctx["train"], ctx["items"], "tags", K), "calibration_kl", users)
    bias = M.popularity_bias(lists, ctx["train"], K, n_items=ctx["n_items"], head_fraction=0.2)
    out: dict[str, Any] = {
        "ndcg@10": float(ndcg.mean()), "coverage": M.coverage(lists, ctx["n_items"], K), "gini": bias["gini"],
        "long_tail_share": bias["long_tail_share"], "ild": float(np.nanmean(ild)),
        "calibration_kl": float(np.nanmean(kl)), "rows": lists.height,
        "moved": int(lists["rerank"].is_not_null().sum()) if "rerank" in lists.columns else 0}
    if base:
        for name, mine, theirs in (("ndcg@10", ndcg, base["_ndcg"]), ("ild", ild, base["_ild"]),
                                   ("calibration_kl", kl, base["_kl"])):
            both = ~np.isnan(mine) & ~np.isnan(theirs)
            d, lo, hi = interval(mine[both], theirs[both])
            out[f"{name}_diff"], out[f"{name}_ci"] = d, [lo, hi]
    else:
        out |= {"_ndcg": ndcg, "_ild": ild, "_kl": kl}
    return out


def per_user(frame: pl.DataFrame, column: str, users: list[str]) -> np.ndarray:
    values = dict(frame.select("user_id", column).iter_rows())
    return np.array([np.nan if values.get(u) is None else values[u] for u in users], np.float64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", choices=sorted(SETS), required=True)
    ap.add_argument("--shared", type=Path, default=SHARED)
    ap.add_argument("--work", type=Path, default=None, help="working folder (default bench/results/work_<dataset>)")
    ap.add_argument("--candidates", type=int, default=100)
    args = ap.parse_args()
    data = load_dataset(args.dataset, args.shared, args.work)
    source, work, items, item_ids, threshold = data.source, data.work, data.items, data.item_ids, data.threshold
    train, test = data.train, data.test
    art, how = reuse_or_fit(args.dataset, source, train, work)
    print(f"{args.dataset}: artifacts {art} ({how})", flush=True)
    task = Task(train, test, item_ids, threshold)
    rec = Recommender(art)
    t0 = time.perf_counter()
    cands = rec.recommend(task.users, args.candidates)
    print(f"{len(task.users)} users, {cands.height} candidates ({rec.order_} order) in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    base_config = RerankConfig(candidates=args.candidates, mmr_modality="fused", calibration_field="tags")
    inputs = rec.rerank_inputs(replace(base_config, mmr_lambda=0.1))  # loads the fused vectors once
    ctx = {"users": task.users, "truth": task.truth, "train": train.select("user_id", "item_id"),
           "items": items, "n_items": len(item_ids), "vectors": inputs.vectors}
    base = point(rerank(cands, K, base_config, inputs), {}, ctx)
    rows: list[dict[str, Any]] = [{"option": "none (shipped order)", "key": "", "value": None,
                                   **{k: v for k, v in base.items() if not k.startswith("_")}}]
    sweeps = dict(SWEEPS)
    if args.dataset in ATTRIBUTE:
        sweeps[f"attribute cap ({ATTRIBUTE[args.dataset]})"] = ("attribute_cap", [3, 2, 1])
    for option, (key, values) in sweeps.items():
        for value in values:
            config = replace(base_config, **{key: value})
            if key == "attribute_cap":
                config = replace(config, attribute_field=ATTRIBUTE[args.dataset])
            t0 = time.perf_counter()
            lists = rerank(cands, K, config, inputs)
            got = point(lists, base, ctx)
            rows.append({"option": option, "key": f"rerank.{key}", "value": value, **got,
                         "seconds": round(time.perf_counter() - t0, 1)})
            r = rows[-1]
            print(f"  {option:28s} {key}={value:<5} ndcg {r['ndcg@10']:.4f} ({r['ndcg@10_diff']:+.4f} "
                  f"[{r['ndcg@10_ci'][0]:+.4f}, {r['ndcg@10_ci'][1]:+.4f}]) cov {r['coverage']:.3f} "
                  f"gini {r['gini']:.3f} tail {r['long_tail_share']:.3f} ild {r['ild']:.3f} "
                  f"kl {r['calibration_kl']:.3f}", flush=True)
    columns = ["option", "value", "ndcg@10", "ndcg@10_diff", "coverage", "gini", "long_tail_share", "ild",
               "calibration_kl"]
    print_table(rows, columns, f"{args.dataset}: rerank trade-offs (top {K}, {len(task.users)} users)")
    result = {"dataset": args.dataset, "users": len(task.users), "k": K, "candidates": args.candidates,
              "shipped_order": rec.order_, "artifacts": str(art), "protocol": protocol(args.dataset),
              "points": rows}
    out = RESULTS / f"tradeoff_{args.dataset}"
    write_json(result, out.with_suffix(".json"))
    out.with_suffix(".md").write_text(markdown(result))
    write_report(out.with_suffix(".html"), title=f"fusionrec rerank trade-offs: {args.dataset}",
                 meta={"users": len(task.users), "k": K, "candidates": args.candidates, "order": rec.order_},
                 tradeoff=rows)
    print(f"wrote {out}.json, .md and .html")


def protocol(name: str) -> str:
    return "the authors' split: train 0+1, test 2" if name == "lastfm" else "each user's latest 20% held out"


def markdown(result: dict[str, Any]) -> str:
    out = [f"### {result['dataset']}: rerank trade-offs", "",
           f"{result['users']} users ({result['protocol']}); top {result['k']} drawn from the shipped "
           f"{result['shipped_order']} order's first {result['candidates']}. NDCG difference: paired, 95% bootstrap "
           "interval over users, against the unreranked lists.", "",
           "| option | value | NDCG@10 | difference (95% CI) | coverage | Gini | long-tail share | ILD | calibration KL |",
           "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in result["points"]:
        diff = "" if "ndcg@10_diff" not in r else \
            f"{r['ndcg@10_diff']:+.4f} ({r['ndcg@10_ci'][0]:+.4f}, {r['ndcg@10_ci'][1]:+.4f})"
        value = "" if r["value"] is None else f"`{r['key'].split('.')[-1]} = {r['value']}`"
        out.append(f"| {r['option']} | {value} | {r['ndcg@10']:.4f} | {diff} | {r['coverage']:.4f} | "
                   f"{r['gini']:.4f} | {r['long_tail_share']:.4f} | {r['ild']:.4f} | {r['calibration_kl']:.4f} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
