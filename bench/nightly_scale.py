"""The nightly path in bounded memory (`fusionrec.pipeline.batch`): peak RSS and time per stage.

    .venv/bin/python bench/nightly_scale.py [--items 1000000,3000000] [--users 1000000]
        [--export-users 0] [--factory 'IVF{nlist},PQ48'] [--train 131072] [--niter 10] [--nprobe 32] [--tune 0.95]

For each catalog size: synthetic inputs are written (items: a 256-d "text" and a 128-d
"image" table, 384 dimensions fused, 10% of items without an image, the image table in
another row order; users: the same two modalities made from a seed item drawn with power-law
popularity, plus noise; labels: each user's seed item; popularity: how many users seeded
on the item), then every stage of the path runs in its own subprocess, which reports its
own peak resident memory (getrusage ru_maxrss: imports and the memory-mapped pages it
touched included) and wall time:

  fuse_items   catalog + modality tables -> items/blocks.npy (memory-mapped), fused.parquet
  fuse_users   the same for users (no fused.parquet)
  index        IVF-PQ trained on a sample of fused.parquet, filled in chunks, saved
  train        bounded sample: users retrieved and featured by the batched path, lambdarank fit
  tune         with --tune R: `tune_nprobe` measures the exported retrieval's recall@10
               against exact search for 300 users at nprobe 1, 2, 4, ... and writes the
               smallest whose 95% lower bound reaches R into nightly.json, for the export
  export       users in batches: search, exact re-scoring from the memory map, features,
               LightGBM, top k written to Parquet; --export-users N: only the first N users
  check        recall of the exported retrieval against exact search (streamed over the
               memory map) for 300 users, at the export's nprobe and at each of --sweep
               (recall and milliseconds per user of search + re-scoring)

The vector model is bench/scale.py's (`vector_model`: a 24-d Gaussian latent with decaying
scales mapped into each modality, plus isotropic noise). Results: bench/results/nightly_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from scale import RESULTS, _unit, vector_model  # noqa: E402

from fusionrec.pipeline.batch.fuse import FusedTable, fuse_tables  # noqa: E402
from fusionrec.pipeline.batch.nightly import (  # noqa: E402
    Candidates,
    NightlyConfig,
    NightlyContext,
    build_item_index,
    exact_topk,
    export_topk,
    read_config,
    retrieval_recall,
    train_ranker,
    tune_nprobe,
    tuning_users,
)
from fusionrec.pipeline.io.streaming import ParquetSink, vector_row_group_rows, write_batches  # noqa: E402
from fusionrec.pipeline.retrieval.faiss_index import (  # noqa: E402
    default_nlist,
    search_param_name,
    set_search_params,
)

DIMS = {"text": 256, "image": 128}
WEIGHTS = {"text": 0.6, "image": 0.4}
LATENT = 24


# --------------------------------------------------------------------------- children


def _vectors(rng: np.random.Generator, z: np.ndarray, basis: np.ndarray, noise: float = 0.35) -> np.ndarray:
    eps = rng.standard_normal((len(z), basis.shape[1]), dtype=np.float32) / np.float32(np.sqrt(basis.shape[1]))
    return _unit(z @ basis + np.float32(noise) * eps)


def _fixed(ids: np.ndarray, x: np.ndarray, id_column: str) -> pa.Table:
    return pa.table({id_column: pa.array(ids), "vector": pa.FixedSizeListArray.from_arrays(
        pa.array(x.reshape(-1)), x.shape[1])})


def child_generate(a: dict) -> dict:
    """Catalogs, modality tables and labels, written chunk by chunk (never all in memory)."""
    n, n_users, root = a["items"], a["users"], Path(a["root"])
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    bases = {m: vector_model(d, seed=12345 + j) for j, (m, d) in enumerate(DIMS.items())}
    # Users pick their seed item by popularity rank over a random permutation of the items.
    rank_of = rng.permutation(n)
    # P(rank r) ~ r^-0.8 over the n ranks (inverse CDF of the continuous law): the top item
    # holds about 1% of the users at 1M items, half the users seed on the top 4% of items
    alpha = 0.8
    u = rng.random(n_users)
    seed_rank = np.minimum(((n ** (1 - alpha) - 1) * u + 1) ** (1 / (1 - alpha)) - 1, n - 1).astype(np.int64)
    seeds = np.argsort(rank_of)[seed_rank]  # the item holding that popularity rank
    by_seed = np.argsort(seeds, kind="stable")
    sorted_seeds = seeds[by_seed]
    popularity = np.bincount(seeds, minlength=n).astype(np.float32)
    item_ids = lambda s, e: np.char.add("i", np.arange(s, e).astype(str))  # noqa: E731
    user_ids = lambda rows: np.char.add("u", np.asarray(rows).astype(str))  # noqa: E731
    group = vector_row_group_rows(sum(DIMS.values()))
    t0 = time.perf_counter()
    write_batches((pa.table({"item_id": item_ids(s, min(s + group, n)), "popularity": popularity[s:s + group]})
                   for s in range(0, n, group)), root / "items.parquet")
    write_batches((pa.table({"user_id": user_ids(np.arange(s, min(s + group, n_users)))})
                   for s in range(0, n_users, group)), root / "users.parquet")
    sinks = {f"{kind}_{m}": ParquetSink(root / f"{kind}_{m}.parquet",
                                        pa.schema([(f"{kind}_id", pa.string()), ("vector", pa.list_(pa.float32(), d))]),
                                        row_group_rows=vector_row_group_rows(d))
             for kind in ("item", "user") for m, d in DIMS.items()}
    labels = ParquetSink(root / "labels.parquet", pa.schema([("user_id", pa.string()), ("item_id", pa.string()),
                                                            ("label", pa.int8())]))
    u_at = 0
    image_chunks: list[pa.Table] = []
    for s in range(0, n, group):
        e = min(s + group, n)
        z = rng.standard_normal((e - s, LATENT), dtype=np.float32)
        ids = item_ids(s, e)
        sinks["item_text"].write(_fixed(ids, _vectors(rng, z, bases["text"]), "item_id"))
        has_image = rng.random(e - s) > 0.1
        image_chunks.append(_fixed(ids[has_image], _vectors(rng, z[has_image], bases["image"]), "item_id"))
        if len(image_chunks) == 4:  # the image table in another order: chunks written back to front
            for t in reversed(image_chunks):
                sinks["item_image"].write(t)
            image_chunks = []
        # the users whose seed item is in this chunk: the seed's latent point plus noise
        u_end = int(np.searchsorted(sorted_seeds, e))
        users = by_seed[u_at:u_end]
        u_at = u_end
        if len(users):
            zu = z[seeds[users] - s] + np.float32(0.6) * rng.standard_normal((len(users), LATENT), dtype=np.float32)
            uid = user_ids(users)
            sinks["user_text"].write(_fixed(uid, _vectors(rng, zu, bases["text"]), "user_id"))
            keep = rng.random(len(users)) > 0.2
            sinks["user_image"].write(_fixed(uid[keep], _vectors(rng, zu[keep], bases["image"]), "user_id"))
            labels.write(pa.table({"user_id": uid, "item_id": np.char.add("i", seeds[users].astype(str)),
                                   "label": np.ones(len(users), np.int8)}))
    for t in reversed(image_chunks):
        sinks["item_image"].write(t)
    for sink in [*sinks.values(), labels]:
        sink.__exit__(None, None, None)
    sizes = {p.name: round(p.stat().st_size / 2**20, 1) for p in sorted(root.glob("*.parquet"))}
    return {"seconds": time.perf_counter() - t0, "parquet_mb": sizes}


def child_fuse(a: dict) -> dict:
    root, work = Path(a["root"]), Path(a["work"])
    kind = a["kind"]
    dims = None
    if kind == "user":
        items = FusedTable.open(work / "items")
        dims = dict(zip(items.names, items.dims))
    t0 = time.perf_counter()
    table = fuse_tables(root / f"{kind}s.parquet", {m: root / f"{kind}_{m}.parquet" for m in DIMS}, work / f"{kind}s",
                        WEIGHTS, kind=kind, dims=dims, batch_rows=a["batch_rows"])
    out = {"seconds": time.perf_counter() - t0, "rows": table.rows,
           "blocks_mb": round((table.directory / "blocks.npy").stat().st_size / 2**20, 1)}
    if kind == "item":
        out["fused_parquet_mb"] = round((table.directory / "fused.parquet").stat().st_size / 2**20, 1)
    return out


def child_index(a: dict) -> dict:
    t0 = time.perf_counter()
    info = build_item_index(a["work"], a["factory"], train_size=a["train"], niter=a["niter"], threads=a["threads"])
    return {"seconds": time.perf_counter() - t0, **info,
            "index_file_mb": round((Path(a["work"]) / "index.faiss").stat().st_size / 2**20, 1)}


def child_train(a: dict) -> dict:
    t0 = time.perf_counter()
    info = train_ranker(a["work"], Path(a["root"]) / "labels.parquet", NightlyConfig.from_dict(a["config"]))
    return {"seconds": time.perf_counter() - t0, **info}


def child_export(a: dict) -> dict:
    cfg = read_config(a["work"])
    users = (0, a["export_users"]) if a["export_users"] else None
    info = export_topk(a["work"], Path(a["work"]) / "topk.parquet", cfg, users=users)
    info["topk_mb"] = round((Path(a["work"]) / "topk.parquet").stat().st_size / 2**20, 1)
    return info


def child_check(a: dict) -> dict:
    """Recall@k of the re-scored retrieval against exact search over all items, streamed
    over the memory-mapped blocks (users with every modality: s(u, i) is then <q_u, v_i>)."""
    cfg = read_config(a["work"])
    ctx = NightlyContext(a["work"], cfg)
    full = np.flatnonzero(ctx.user_mask.all(axis=1))
    full = np.setdiff1d(full, tuning_users(ctx))  # held out from the users `tune_nprobe` chose nprobe on
    rng = np.random.default_rng(3)
    users = np.sort(rng.choice(full[full < (a["export_users"] or ctx.users.rows)], a["n"], replace=False))
    t0 = time.perf_counter()
    cand = ctx.candidates(users)
    k = cfg.k
    best_s, _ = exact_topk(ctx, users, k)
    seconds = time.perf_counter() - t0

    def recall_of(c: Candidates) -> tuple[float, float]:
        return (float(retrieval_recall(c, best_s).mean()),
                float(np.mean(np.abs(c.scores[:, 0] - best_s[:, 0]) < 1e-5)))

    recall, top1 = recall_of(cand)
    # The knob the export trades time for recall with: nprobe (same users, same depth).
    sweep = {}
    param = search_param_name(ctx.index)
    for nprobe in (a.get("sweep") or []) if param == "nprobe" else []:
        set_search_params(ctx.index, {"nprobe": nprobe})
        t = time.perf_counter()
        c = ctx.candidates(users)
        ms = 1000 * (time.perf_counter() - t) / len(users)
        r, t1 = recall_of(c)
        sweep[str(nprobe)] = {f"recall@{k}": round(r, 4), "top1_exact": round(t1, 4),
                              "ms_per_user_search_and_rescore": round(ms, 3)}
    return {"seconds": seconds, "users": int(len(users)), "k": k, "nprobe": cfg.nprobe,
            f"retrieval_recall@{k}": round(recall, 4), "top1_exact": round(top1, 4), "nprobe_sweep": sweep}


def child_tune(a: dict) -> dict:
    """`tune_nprobe`: the smallest nprobe reaching the target recall, written to nightly.json."""
    info = tune_nprobe(a["work"], target_recall=a["target"])
    info["trials"] = [{k: round(v, 4) if isinstance(v, float) else v for k, v in t.items()} for t in info["trials"]]
    return info


CHILDREN = {"generate": child_generate, "fuse": child_fuse, "index": child_index, "train": child_train,
            "tune": child_tune, "export": child_export, "check": child_check}


# --------------------------------------------------------------------------- parent


def status_mb() -> dict:
    """RssAnon / RssFile of this process now, in MB: heap vs mapped file pages."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("RssAnon", "RssFile")):
            name, value = line.split(":")
            out[name] = round(int(value.split()[0]) / 1024, 1)
    return out


class PeakSampler(threading.Thread):
    """Peaks of RssAnon and RssFile, read every 50 ms. ru_maxrss counts both: the pages of a
    memory-mapped file a process touched stay in its RSS while mapped, though the kernel can
    drop them (clean page cache) whenever memory is short; the anonymous part cannot go."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = {"RssAnon": 0.0, "RssFile": 0.0}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            for name, value in status_mb().items():
                self.peak[name] = max(self.peak[name], value)


def run_child(name: str, args: dict) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", name, "--args", json.dumps(args)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"child {name} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["peak_rss_mb"] = round(result.pop("__maxrss_kb") / 1024, 1)
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return result


def run_size(n: int, a: argparse.Namespace, work_root: Path) -> dict:
    root, work = work_root / f"data_{n}", work_root / f"work_{n}"
    cfg = NightlyConfig(k=10, depth=a.depth, keep=a.keep, nprobe=a.nprobe, batch_users=a.batch_users,
                        train_users=a.train_users, max_train_rows=a.max_train_rows, n_estimators=a.trees,
                        threads=a.threads)
    stages: dict[str, dict] = {}

    def stage(name: str, child: str, args: dict) -> None:
        stages[name] = res = run_child(child, args)
        print(f"{n:>10,} items  {name:<11} peak {res['peak_rss_mb']:7.0f} MB (anon {res['peak_sampled_mb']['RssAnon']:7.0f},"
              f" file {res['peak_sampled_mb']['RssFile']:7.0f})  {res['wall_seconds']:7.1f} s  "
              + json.dumps({k: v for k, v in res.items() if k not in ("peak_rss_mb", "wall_seconds",
                                                                      "peak_sampled_mb")})[:400], flush=True)

    stage("generate", "generate", {"items": n, "users": a.users, "root": str(root)})
    stage("fuse_items", "fuse", {"root": str(root), "work": str(work), "kind": "item", "batch_rows": a.batch_rows})
    stage("fuse_users", "fuse", {"root": str(root), "work": str(work), "kind": "user", "batch_rows": a.batch_rows})
    factory = a.factory.replace("{nlist}", str(default_nlist(n)))
    stage("index", "index", {"work": str(work), "factory": factory, "train": a.train, "niter": a.niter,
                             "threads": a.threads})
    stage("train", "train", {"work": str(work), "root": str(root), "config": cfg.__dict__})
    if a.tune:
        stage("tune", "tune", {"work": str(work), "target": a.tune})
    stage("export", "export", {"work": str(work), "export_users": a.export_users})
    stage("check", "check", {"work": str(work), "n": a.check_users, "export_users": a.export_users,
                             "sweep": [int(x) for x in a.sweep.split(",") if x]})
    if not a.keep_files:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    return {"items": n, "users": a.users, "config": cfg.__dict__, "stages": stages}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child")
    ap.add_argument("--args", default="{}")
    ap.add_argument("--items", default="1000000,3000000")
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--export-users", type=int, default=0, help="export only the first N users (0: all)")
    ap.add_argument("--factory", default="IVF{nlist},PQ48",
                    help="FAISS factory; {nlist} becomes the tuner's default_nlist(items), 2 sqrt(n) as a power of 2")
    ap.add_argument("--train", type=int, default=131_072, help="index training sample")
    ap.add_argument("--niter", type=int, default=10, help="k-means iterations of the coarse quantizer")
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--tune", type=float, default=0.0,
                    help="target recall@10: tune_nprobe chooses the export's nprobe after training (0: keep --nprobe)")
    ap.add_argument("--depth", type=int, default=100)
    ap.add_argument("--keep", type=int, default=50)
    ap.add_argument("--batch-users", type=int, default=512)
    ap.add_argument("--batch-rows", type=int, default=16_384, help="rows per batch of the fusion")
    ap.add_argument("--train-users", type=int, default=20_000)
    ap.add_argument("--max-train-rows", type=int, default=500_000)
    ap.add_argument("--trees", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--check-users", type=int, default=300)
    ap.add_argument("--sweep", default="16,32,64,128,256", help="nprobe values the check stage also measures")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep-files", action="store_true")
    a = ap.parse_args()
    if a.child:
        sampler = PeakSampler()
        sampler.start()
        result = CHILDREN[a.child](json.loads(a.args))
        usage = resource.getrusage(resource.RUSAGE_SELF)
        result["__maxrss_kb"] = usage.ru_maxrss
        # CPU seconds (all threads): on a shared machine a steadier measure of the work than wall time
        result["cpu_seconds"] = round(usage.ru_utime + usage.ru_stime, 1)
        sampler.done.set()
        sampler.join()
        result["peak_sampled_mb"] = sampler.peak
        print(json.dumps(result, default=float))
        return

    work = Path(a.workdir or tempfile.mkdtemp(prefix="fusionrec-nightly-"))
    work.mkdir(parents=True, exist_ok=True)
    command = " ".join([".venv/bin/python bench/nightly_scale.py", *sys.argv[1:]])
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    out = RESULTS / "nightly_scale.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    try:
        for n in [int(s) for s in a.items.split(",") if s]:
            load = os.getloadavg()[0]
            t = time.perf_counter()
            res = run_size(n, a, work)
            res.update(command=command, machine=machine, seconds=round(time.perf_counter() - t, 1),
                       load_average=[round(load, 2), round(os.getloadavg()[0], 2)])
            # read again just before writing: another run (another size) may have written since
            existing = json.loads(out.read_text()) if out.is_file() else {}
            existing[str(n)] = res
            out.write_text(json.dumps(existing, indent=2) + "\n")  # after each size: a later failure keeps it
    finally:
        if a.workdir is None and not a.keep_files:
            shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
