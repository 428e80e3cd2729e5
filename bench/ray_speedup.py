"""The Ray engine with 1 worker against 2, on the steps it partitions, outputs checked against the local engine.

    .venv/bin/python bench/ray_speedup.py [--items 1000000] [--score-items 5000] [--score-users 4000]
        [--quiet-file /tmp/fusionrec_quiet] [--wait-until 07:10] [--workdir DIR]

1. Reading: the embedding job's read, validate, clean-up and text hashing of the items table
   (`pipeline.embedding.job.write_plans`), synthetic items of `bench/scale.py` (title, ~50-word
   description with HTML, tags; Parquet, 64k-row groups). On Ray one task per batch of
   `embed.batch_rows` rows (`plan_partition`), `ray.num_actors` at once, each writing its
   batch's plan part; the driver checks the ids are unique. Checked: every plan part (row, id,
   content, content hash, input, error) equals the local engine's, row for row.
2. Scoring: every user's top 10 (`ranker.serving.ray_scoring.recommend_all`: retrieval and
   ranking for batches of users on a pool of Ray actors, each memory-mapping the one FAISS index) on
   artifacts fitted to a synthetic catalog (embed with a fast synthetic encoder, index, train).
   Checked: the same users, items and ranks as `Recommender.recommend`, scores within 1e-6.

Each worker count runs on its own Ray runtime of that many CPUs (`ray.init(num_cpus=W)`, tasks and
actors of one CPU each, `ray.num_actors = W`). Reading is timed after a warm-up pass on a small
table (the workers' first task imports the pipeline: paid once per job, reported beside); scoring
is timed whole, actor start-up (each loads the artifacts) included, and a run on one batch of
users per actor measures that start-up alone (subtracted in `after_startup_seconds`). Before the timed part the
script waits for `--quiet-file` (other jobs done), polling every 30 s, until `--wait-until` (UTC);
the load average is recorded beside every figure. Results: bench/results/ray_speedup.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from bench.scale import WORDS, synthetic_encode, write_items  # noqa: E402
from fusionrec.pipeline.config import Config, EmbedConfig, RankerConfig, RayConfig  # noqa: E402
from fusionrec.pipeline.embedding.job import ModalityEncoder, ModalityPlan, run_embed, write_plans  # noqa: E402
from fusionrec.pipeline.embedding.ray_engine import RayEncodeRows, import_ray  # noqa: E402
from fusionrec.pipeline.retrieval.stage import run_index  # noqa: E402
from fusionrec.ranker.serving.ray_scoring import recommend_all  # noqa: E402
from fusionrec.ranker.serving.recommender import Recommender  # noqa: E402
from fusionrec.ranker.training import run_train  # noqa: E402

RESULTS = ROOT / "bench" / "results"
# The identity scale.py's job uses: the content hashes are those of the default text encoder.
TEXT = ModalityEncoder("sentence-transformers/all-MiniLM-L6-v2", 384, synthetic_encode(384),
                       preprocess_id="clean-v1;max_length=256")


def load() -> float:
    return round(os.getloadavg()[0], 2)


def wait_for_quiet(path: Path, until: dt.datetime) -> dict:
    """Poll for `path` every 30 s until `until` (UTC); say whether the machine was quiet."""
    t0 = time.time()
    while not path.exists() and dt.datetime.now(dt.UTC) < until:
        time.sleep(30)
    quiet = path.exists()
    print(f"waited {time.time() - t0:.0f} s: {'quiet file present' if quiet else 'no quiet file: machine shared'}, "
          f"load average {os.getloadavg()}", flush=True)
    return {"quiet_file": str(path), "quiet": quiet, "waited_s": round(time.time() - t0),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


# --------------------------------------------------------------------------- 1. reading


def plans(table: Path, work: Path, run_ordered=None) -> tuple[float, ModalityPlan]:
    shutil.rmtree(work, ignore_errors=True)
    t = time.perf_counter()
    out, _ = write_plans(table, "item", table.parent, {"text": TEXT}, work, batch_rows=EmbedConfig().batch_rows,
                         run_ordered=run_ordered)
    return time.perf_counter() - t, out[0]


def same_plans(a: ModalityPlan, b: ModalityPlan) -> bool:
    """The same parts (names), each row for row equal."""
    if [f.name for f in a.files] != [f.name for f in b.files]:
        return False
    return all(pq.read_table(x).equals(pq.read_table(y).cast(pq.read_schema(x))) for x, y in zip(a.files, b.files))


# --------------------------------------------------------------------------- 2. scoring


def fit_artifacts(n_items: int, n_users: int, work: Path) -> Path:
    """A synthetic catalog (8 themes; users mostly interact within theirs) embedded with the
    synthetic encoder, indexed and trained with the default config (the ranker's order shipped)."""
    data, art = work / "score_data", work / "score_art"
    if (art / "ranker" / "guard.json").is_file():
        return art
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    words = np.array(WORDS)
    theme = rng.integers(0, 8, n_items)
    pl.DataFrame({"item_id": [f"i{i}" for i in range(n_items)],
                  "title": [" ".join(w) for w in words[rng.integers(0, len(words), (n_items, 3))]],
                  "description": [" ".join(w) for w in
                                  words[(theme[:, None] * 8 + rng.integers(0, 12, (n_items, 20))) % len(words)]]}
                 ).write_csv(data / "items.csv")
    by_theme = [np.flatnonzero(theme == t) for t in range(8)]
    users, items, stamps = [], [], []
    for u, t in enumerate(rng.integers(0, 8, n_users)):
        k = int(rng.poisson(20)) + 3
        picked = np.concatenate([rng.choice(by_theme[t], k), rng.integers(0, n_items, k // 3)])
        users += [f"u{u}"] * len(picked)
        items += [f"i{i}" for i in picked]
        stamps += sorted(rng.integers(1_700_000_000, 1_700_000_000 + 90 * 86_400, len(picked)).tolist())
    pl.DataFrame({"user_id": users, "item_id": items, "timestamp": stamps}).unique(
        ["user_id", "item_id"], keep="first", maintain_order=True).write_csv(data / "interactions.csv")
    # guard off: the ranker's order ships whatever its validation gain, so scoring ranks every user.
    cfg = Config(ranker=RankerConfig(guard=False))
    enc = ModalityEncoder("bench:synthetic-crc-64", 64, synthetic_encode(64), preprocess_id="clean-v1")
    for step, run in (("embed", lambda: run_embed(data, art, cfg, encoders={"text": enc}, show_progress=False)),
                      ("index", lambda: run_index(data, art, cfg)), ("train", lambda: run_train(art, cfg))):
        t = time.perf_counter()
        run()
        print(f"  fitted: {step} {time.perf_counter() - t:.1f} s", flush=True)
    return art


def same_topk(local: pl.DataFrame, other: pl.DataFrame) -> dict:
    same_ids = (local.height == other.height and local["user_id"].to_list() == other["user_id"].to_list()
                and local["item_id"].to_list() == other["item_id"].to_list()
                and local["rank"].to_list() == other["rank"].to_list())
    diff = float(np.abs(local["score"].to_numpy() - other["score"].to_numpy()).max()) if same_ids and local.height \
        else None
    return {"same_ids": same_ids, "max_score_diff": diff, "identical": bool(same_ids and diff is not None
                                                                             and diff <= 1e-6)}


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=1_000_000, help="items table for the reading step")
    ap.add_argument("--score-items", type=int, default=5_000)
    ap.add_argument("--score-users", type=int, default=4_000)
    ap.add_argument("--batch-users", type=int, default=250, help="ray.scoring_batch_users")
    ap.add_argument("--quiet-file", default="/tmp/fusionrec_quiet")
    ap.add_argument("--wait-until", default="07:10", help="UTC HH:MM; '' = do not wait")
    ap.add_argument("--object-store-mb", type=int, default=1500)
    ap.add_argument("--workdir", default=None, help="keep the data here (reused by a rerun)")
    a = ap.parse_args()
    ray = import_ray()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="fusionrec-ray-"))
    work.mkdir(parents=True, exist_ok=True)
    command = " ".join([".venv/bin/python", "bench/ray_speedup.py", *sys.argv[1:]])
    out: dict = {"command": command, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                 "python": platform.python_version(), "ray": ray.__version__}}
    try:
        table = work / "items" / "items.parquet"
        small = work / "warmup" / "items.parquet"
        if not table.is_file():
            table.parent.mkdir(parents=True, exist_ok=True)
            t = time.perf_counter()
            write_items(table, a.items)
            print(f"{a.items:,} items written in {time.perf_counter() - t:.0f} s", flush=True)
        small.parent.mkdir(parents=True, exist_ok=True)
        write_items(small, 2 * EmbedConfig().batch_rows, seed=1)
        art = fit_artifacts(a.score_items, a.score_users, work)
        rc = RayConfig(scoring_batch_users=a.batch_users)

        if a.wait_until:
            hh, mm = (int(x) for x in a.wait_until.split(":"))
            until = dt.datetime.now(dt.UTC).replace(hour=hh, minute=mm, second=0, microsecond=0)
            out["wait"] = wait_for_quiet(Path(a.quiet_file), until)

        # Local references: what the Ray runs must equal.
        seconds, local_plan = plans(table, work / "plans_local")
        reading: dict = {"items": a.items, "batch_rows": EmbedConfig().batch_rows,
                         "local": {"seconds": round(seconds, 2), "load_average": load()}}
        print(f"reading, local engine: {seconds:.1f} s (load {load()})", flush=True)
        t = time.perf_counter()
        rec = Recommender(art)
        load_s = time.perf_counter() - t
        t = time.perf_counter()
        local_topk = rec.recommend(None, 10)
        scoring: dict = {"users": int(local_topk["user_id"].n_unique()), "items": a.score_items,
                         "batch_users": a.batch_users,
                         "local": {"seconds": round(time.perf_counter() - t, 2), "load_seconds": round(load_s, 2),
                                   "load_average": load()}}
        del rec
        print(f"scoring, local engine: {scoring['local']['seconds']} s for {scoring['users']:,} users "
              f"(+{load_s:.1f} s loading the artifacts)", flush=True)

        for workers in (1, 2):
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                     object_store_memory=a.object_store_mb << 20)
            try:
                engine = RayEncodeRows(Config(engine="ray", ray=RayConfig(num_actors=workers)))
                warm, _ = plans(small, work / "plans_warm", engine.ordered)
                seconds, plan = plans(table, work / f"plans_ray{workers}", engine.ordered)
                reading[f"ray_{workers}"] = {"seconds": round(seconds, 2), "warmup_seconds": round(warm, 2),
                                             "load_average": load(), "identical": same_plans(local_plan, plan)}
                print(f"reading, Ray, {workers} worker(s): {seconds:.1f} s (warm-up {warm:.1f} s, load {load()}), "
                      f"identical plans: {reading[f'ray_{workers}']['identical']}", flush=True)
                scoring_rc = RayConfig(num_actors=workers, scoring_batch_users=rc.scoring_batch_users)
                # Start-up alone (actors started, artifacts loaded): one batch per actor.
                first = local_topk["user_id"].unique(maintain_order=True).head(workers * rc.scoring_batch_users)
                t = time.perf_counter()
                recommend_all(art, 10, scoring_rc, user_ids=first.to_list())
                startup = time.perf_counter() - t
                t = time.perf_counter()
                topk = recommend_all(art, 10, scoring_rc)
                seconds = time.perf_counter() - t
                scoring[f"ray_{workers}"] = {"seconds": round(seconds, 2), "startup_run_seconds": round(startup, 2),
                                             "after_startup_seconds": round(seconds - startup, 2),
                                             "load_average": load(), **same_topk(local_topk, topk)}
                print(f"scoring, Ray, {workers} actor(s): {scoring[f'ray_{workers}']}", flush=True)
            finally:
                ray.shutdown()
        for part in (reading, scoring):
            part["speedup_2_vs_1"] = round(part["ray_1"]["seconds"] / part["ray_2"]["seconds"], 3)
        scoring["speedup_2_vs_1_after_startup"] = round(scoring["ray_1"]["after_startup_seconds"]
                                                        / scoring["ray_2"]["after_startup_seconds"], 3)
        out.update(reading=reading, scoring=scoring, load_average_at_end=[round(x, 2) for x in os.getloadavg()])
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print("\n| step | local engine | Ray, 1 worker | Ray, 2 workers | 2 vs 1 | identical to local |")
    print("|---|---:|---:|---:|---:|---|")
    for name, part in (("reading (read, validate, clean, hash)", out["reading"]),
                       ("scoring (retrieval + ranking)", out["scoring"])):
        print(f"| {name} | {part['local']['seconds']:.1f} s | {part['ray_1']['seconds']:.1f} s | "
              f"{part['ray_2']['seconds']:.1f} s | x{part['speedup_2_vs_1']:.2f} | "
              f"{part['ray_1']['identical'] and part['ray_2']['identical']} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "ray_speedup.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
