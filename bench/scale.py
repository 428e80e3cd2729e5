"""Scale: the embedding job's memory at 100k and 1M items, IVF-PQ built from Parquet at 1M, encoder cost.

    .venv/bin/python bench/scale.py [--sizes 100000,1000000] [--vectors 1000000] [--dim 384]
        [--factories "IVF1024,Flat;IVF1024,PQ48;IVF1024,PQ64"] [--queries 300] [--encode 256]
        [--skip-items] [--skip-index]

Every measurement runs in its own subprocess and reports its peak resident memory from the
kernel (getrusage ru_maxrss), so the figures are whole-process peaks including imports.

1. Items: synthetic catalogs (title, description ~50 words, tags) written as Parquet with
   row groups of 64k rows. For each size: the embedding job itself (`run_embed`, local
   engine, streamed) with a fast synthetic 384-d text encoder (`synthetic_encode`, so the
   job's reading, hashing, shards and table writing are measured, not a model): a first run
   that encodes every item, then a rerun after 1% of the titles changed. For reference,
   reading the whole table and hashing every text in memory (`load_items` +
   `content_hashes`), which is what the job did before it streamed, without the vectors.
2. Index: N synthetic unit vectors (d=384, low intrinsic dimension, see `vector_chunk`) in
   Parquet (row groups of 16k rows); IVF indexes (Flat codes for reference, PQ48, PQ64)
   trained on a 64k sample and filled in 16k-row chunks from the file
   (`build_index_from_parquet`); exact top-k of held-out queries computed in the same pass;
   recall@10 and 10@100 (the exact top 10 among the first 100 results, which the retriever
   re-scores exactly) per nprobe, bytes per vector in memory and on disk, build time, peak
   memory.
3. Encode: the default text encoder (all-MiniLM-L6-v2) and image encoder (MobileNetV2 at
   224 px) on one CPU thread: items per second per core, the base of the README's 100M-item estimate.
Results: bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = ROOT / "bench" / "results"
ROW_GROUP = 65_536  # item tables
WORDS = ("ocean sea wave blue surf water forest tree green moss leaf fire flame red smoke hot city night neon "
         "street desert sand dune snow ice cold jazz piano space star planet quiet loud warm soft bright dark "
         "morning evening rain storm wind river lake mountain valley garden kitchen coffee tea bread cotton wool "
         "leather steel glass wood stone paper linen silk velvet copper brass marble clay").split()


# --------------------------------------------------------------------------- children


def child_baseline(_: dict) -> dict:
    import pipeline.embed  # noqa: F401
    import pipeline.streaming  # noqa: F401
    import polars  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    return {}  # imports only: the floor under every other figure


def child_eager(a: dict) -> dict:
    """The reference: the item table read whole and every text hashed in memory."""
    from fusionrec.pipeline.embedding.job import ModalityEncoder, content_hashes, modality_contents
    from fusionrec.pipeline.io.tables import load_items

    t0 = time.perf_counter()
    text = modality_contents(load_items(Path(a["data_dir"])), "item")["text"]
    enc = ModalityEncoder(a["model_id"], 0, lambda xs: None, preprocess_id=a["preprocess_id"])
    hashes, _, _ = content_hashes("text", text["content"].to_list(), enc, Path(a["data_dir"]))
    return {"rows": len(hashes), "seconds": time.perf_counter() - t0}


def synthetic_encode(dim: int):
    """A fast deterministic stand-in text encoder: unit vectors from a CRC of each text, so the
    job's own reading, hashing, caching and writing are what is measured, not a model."""
    import zlib

    freqs = np.random.default_rng(7).uniform(0.5, 2.0, dim)

    def encode(texts: list) -> np.ndarray:
        seeds = np.fromiter((zlib.crc32(t.encode()) for t in texts), dtype=np.float64, count=len(texts))
        x = np.cos(np.outer(seeds / 2**32 * 1000.0, freqs)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return encode


def child_job(a: dict) -> dict:
    """`fusionrec embed`'s job (pipeline.embed.run_embed, local engine) on the catalog."""
    from fusionrec.pipeline.config import Config
    from fusionrec.pipeline.embedding.job import ModalityEncoder, run_embed

    enc = ModalityEncoder("bench:synthetic-crc", a["dim"], synthetic_encode(a["dim"]),
                          preprocess_id=a["preprocess_id"])
    t0 = time.perf_counter()
    report = run_embed(Path(a["data_dir"]), Path(a["art"]), Config(), encoders={"text": enc}, show_progress=False)
    counts = report.counts["item_text"]
    return {"seconds": time.perf_counter() - t0, "rows": counts.rows, "encoded": counts.encoded,
            "reused": counts.reused}


def vector_model(d: int, latent: int = 24, seed: int = 12345) -> np.ndarray:
    """The (latent, d) map of `vector_chunk`: a random basis with decaying scales."""
    rng = np.random.default_rng(seed)
    scales = (1.0 / np.sqrt(1.0 + np.arange(latent) / 4.0)).astype(np.float32)
    basis = rng.standard_normal((latent, d), dtype=np.float32) / np.float32(np.sqrt(d))
    return basis * scales[:, None]


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def vector_chunk(rng: np.random.Generator, n: int, basis: np.ndarray, noise: float = 0.35) -> np.ndarray:
    """float32 unit vectors with a low intrinsic dimension, like text embeddings: a Gaussian
    latent point (24 dimensions, decaying scales) mapped into d dimensions, plus isotropic
    noise. Similarities are continuous (no planted clusters to hand the coarse quantizer)."""
    z = rng.standard_normal((n, basis.shape[0]), dtype=np.float32) @ basis
    eps = rng.standard_normal((n, basis.shape[1]), dtype=np.float32) / np.float32(np.sqrt(basis.shape[1]))
    return _unit(z + np.float32(noise) * eps)


def child_vectors(a: dict) -> dict:
    import pyarrow as pa

    from fusionrec.pipeline.io.streaming import vector_row_group_rows, write_batches

    n, d = a["n"], a["dim"]
    group = vector_row_group_rows(d)
    basis = vector_model(d)
    t0 = time.perf_counter()

    def batches():
        rng = np.random.default_rng(1)
        for s in range(0, n, group):
            m = min(group, n - s)
            x = vector_chunk(rng, m, basis)
            yield pa.table({"id": pa.array(np.char.add("v", np.arange(s, s + m).astype(str))),
                            "vector": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d)})

    rows = write_batches(batches(), a["path"], row_group_rows=group)
    np.save(a["queries"], vector_chunk(np.random.default_rng(2), a["n_queries"], basis))
    return {"rows": rows, "seconds": time.perf_counter() - t0, "bytes": Path(a["path"]).stat().st_size}


def child_index(a: dict) -> dict:
    import faiss

    from fusionrec.pipeline.io.streaming import build_index_from_parquet, vector_row_group_rows
    from fusionrec.pipeline.retrieval import faiss_index as fidx

    faiss.omp_set_num_threads(a["threads"])
    queries = np.load(a["queries"])
    k = 100
    best_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(queries), k), -1, dtype=np.int64)
    exact_seconds = [0.0]

    def exact(start: int, chunk: np.ndarray) -> None:  # running exact top-k, merged chunk by chunk
        t = time.perf_counter()
        s, i = faiss.knn(queries, chunk, min(k, len(chunk)), metric=faiss.METRIC_INNER_PRODUCT)
        s = np.hstack([best_s, s])
        i = np.hstack([best_i, i + start])
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
        best_s[:], best_i[:] = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
        exact_seconds[0] += time.perf_counter() - t

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    index, _ = build_index_from_parquet(a["path"], a["factory"], train_size=a["train"], seed=0,
                                        id_column=None, batch_rows=vector_row_group_rows(a["dim"]),
                                        on_chunk=exact,
                                        timings=timings)
    build = time.perf_counter() - t0 - exact_seconds[0]
    ntotal = int(index.ntotal)
    memory = fidx.index_memory_bytes(index)
    disk = Path(a["path"]).with_suffix(".faiss")
    fidx.save_index(index, disk)
    sweep = []
    exact10 = best_i[:, :10]
    for nprobe in a["nprobes"]:
        fidx.set_search_params(index, {"nprobe": nprobe})
        t = time.perf_counter()
        _, ids = fidx.search(index, queries, 100)
        ms = (time.perf_counter() - t) * 1000 / len(queries)
        r10 = fidx.recall_at_k(ids[:, :10], exact10)
        r10_100 = float(np.mean([len(set(e) & set(f)) / 10 for e, f in zip(exact10, ids)]))
        sweep.append({"nprobe": nprobe, "recall@10": round(r10, 4), "recall10@100": round(r10_100, 4),
                      "ms_per_query": round(ms, 3)})
    out = {"factory": a["factory"], "ntotal": ntotal, "dim": int(index.d), "train_rows": a["train"],
           "build_seconds": round(build, 1), "train_seconds": round(timings.get("train", 0.0), 1),
           "add_seconds": round(timings.get("add", 0.0) - exact_seconds[0], 1),
           "exact_pass_seconds": round(exact_seconds[0], 1),
           "memory_bytes": memory, "bytes_per_vector": round(memory / ntotal, 2),
           "disk_bytes_per_vector": round(disk.stat().st_size / ntotal, 2),
           "flat_bytes_per_vector": int(index.d) * 4, "queries": len(queries), "sweep": sweep}
    disk.unlink()
    return out


def child_encode(a: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    from fusionrec.pipeline.encoders.image import ImageEncoder
    from fusionrec.pipeline.encoders.text import TextEncoder

    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, 50)) for _ in range(a["n"])]
    text = TextEncoder("default", device="cpu", batch_size=64, max_length=256)
    text.encode(texts[:16])  # load and warm up
    t = time.perf_counter()
    text.encode(texts)
    text_s = time.perf_counter() - t
    image = ImageEncoder(device="cpu", batch_size=32)
    batch = rng.standard_normal((a["n_images"], 3, 224, 224), dtype=np.float32)
    image.encode(batch[:4])
    t = time.perf_counter()
    image.encode(batch)
    image_s = time.perf_counter() - t
    tokens = text._tokenizer(texts, truncation=True, max_length=256)["input_ids"]
    return {"text_model": text.model_id, "texts": len(texts), "mean_tokens": float(np.mean([len(x) for x in tokens])),
            "text_items_per_s_per_core": round(len(texts) / text_s, 2),
            "image_model": image.model_id, "images": len(batch),
            "image_items_per_s_per_core": round(len(batch) / image_s, 2)}


CHILDREN = {"baseline": child_baseline, "eager": child_eager, "job": child_job,
            "vectors": child_vectors, "index": child_index, "encode": child_encode}


# --------------------------------------------------------------------------- parent


def run_child(name: str, args: dict) -> dict:
    """Run one measurement in a fresh interpreter; its result plus its peak RSS (MB, the child's own
    getrusage ru_maxrss, imports included) and wall time."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", name, "--args", json.dumps(args)],
                          capture_output=True, text=True)
    out, err = proc.stdout, proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"child {name} failed:\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mb"] = result.pop("__maxrss_kb") / 1024
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return result


def write_items(path: Path, n: int, seed: int = 0, changed_every: int = 0) -> None:
    """A synthetic catalog; changed_every=k retitles every k-th item (the same catalog otherwise)."""
    import pyarrow as pa

    from fusionrec.pipeline.io.streaming import write_batches

    words = np.array(WORDS)

    def batches():
        rng = np.random.default_rng(seed)
        for s in range(0, n, ROW_GROUP):
            m = min(ROW_GROUP, n - s)
            title = [" ".join(w) for w in words[rng.integers(0, len(words), (m, 3))]]
            if changed_every:
                title = [f"new {t}" if (s + i) % changed_every == 0 else t for i, t in enumerate(title)]
            desc = [" ".join(w) + " &amp; <b>more</b>." for w in words[rng.integers(0, len(words), (m, 50))]]
            tags = ["|".join(w) for w in words[rng.integers(0, len(words), (m, 3))]]
            yield pa.table({"item_id": pa.array(np.char.add("item", np.arange(s, s + m).astype(str))),
                            "title": title, "description": desc, "tags": tags,
                            "price": pa.array(rng.uniform(1, 100, m).round(2))})

    write_batches(batches(), path, row_group_rows=ROW_GROUP)


def bench_items(sizes: list[int], work: Path, dim: int) -> list[dict]:
    rows = []
    base = run_child("baseline", {})
    print(f"imports alone: peak {base['peak_rss_mb']:.0f} MB")
    model = {"model_id": "sentence-transformers/all-MiniLM-L6-v2", "preprocess_id": "clean-v1;max_length=256"}
    for n in sizes:
        data, art = work / f"items_{n}", work / f"art_{n}"
        data.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        write_items(data / "items.parquet", n)
        size_mb = (data / "items.parquet").stat().st_size / 2**20
        print(f"{n:>9,} items: {size_mb:.0f} MB Parquet written in {time.perf_counter() - t:.1f} s")
        eager = run_child("eager", {"data_dir": str(data), **model})
        job = run_child("job", {"data_dir": str(data), "art": str(art), "dim": dim, **model})
        table_mb = (art / "embeddings" / "item_text.parquet").stat().st_size / 2**20
        write_items(data / "items.parquet", n, changed_every=100)
        rerun = run_child("job", {"data_dir": str(data), "art": str(art), "dim": dim, **model})
        rows.append({"items": n, "parquet_mb": round(size_mb, 1), "baseline_rss_mb": round(base["peak_rss_mb"], 1),
                     "eager_read_hash_peak_rss_mb": round(eager["peak_rss_mb"], 1),
                     "eager_read_hash_seconds": round(eager["seconds"], 1),
                     "job_peak_rss_mb": round(job["peak_rss_mb"], 1), "job_seconds": round(job["seconds"], 1),
                     "job_encoded": job["encoded"], "dim": dim, "table_mb": round(table_mb, 1),
                     "rerun_peak_rss_mb": round(rerun["peak_rss_mb"], 1), "rerun_seconds": round(rerun["seconds"], 1),
                     "rerun_encoded": rerun["encoded"], "rerun_reused": rerun["reused"]})
        print(f"{'':>9}  eager read+hash {eager['peak_rss_mb']:6.0f} MB | embedding job {job['peak_rss_mb']:6.0f} MB "
              f"{job['seconds']:6.1f} s ({job['encoded']:,} encoded, table {table_mb:.0f} MB) | rerun, 1% retitled "
              f"{rerun['peak_rss_mb']:6.0f} MB {rerun['seconds']:6.1f} s ({rerun['encoded']:,} encoded)")
        shutil.rmtree(data)
        shutil.rmtree(art)
    if len(rows) > 1:
        lo, hi = rows[0], rows[-1]
        print(f"peak memory, {hi['items']:,} vs {lo['items']:,} items: job x{hi['job_peak_rss_mb'] / lo['job_peak_rss_mb']:.2f}"
              f", rerun x{hi['rerun_peak_rss_mb'] / lo['rerun_peak_rss_mb']:.2f}, eager read+hash "
              f"x{hi['eager_read_hash_peak_rss_mb'] / lo['eager_read_hash_peak_rss_mb']:.2f}")
    return rows


def bench_index(n: int, dim: int, factories: list[str], n_queries: int, train: int, work: Path,
                threads: int) -> dict:
    path = work / f"vectors_{n}.parquet"
    queries = work / "queries.npy"
    gen = run_child("vectors", {"n": n, "dim": dim, "path": str(path), "queries": str(queries),
                                "n_queries": n_queries})
    print(f"{n:,} x {dim} vectors: {gen['bytes'] / 2**20:.0f} MB Parquet in {gen['seconds']:.1f} s")
    out = {"vectors": n, "dim": dim, "parquet_mb": round(gen["bytes"] / 2**20, 1),
           "flat_in_memory_mb": round(n * dim * 4 / 2**20, 1), "indexes": []}
    for factory in factories:
        res = run_child("index", {"path": str(path), "queries": str(queries), "factory": factory, "train": train,
                                  "dim": dim,
                                  "nprobes": [1, 4, 16, 32, 64, 128], "threads": threads})
        res["peak_rss_mb"] = round(res["peak_rss_mb"], 1)
        out["indexes"].append(res)
        print(f"{factory}: {res['bytes_per_vector']} B/vector in memory ({res['disk_bytes_per_vector']} on disk, "
              f"flat {res['flat_bytes_per_vector']}), build {res['build_seconds']} s (train {res['train_seconds']} s),"
              f" peak {res['peak_rss_mb']:.0f} MB")
        for row in res["sweep"]:
            print(f"    nprobe {row['nprobe']:>3}: recall@10 {row['recall@10']:.3f}  10@100 "
                  f"{row['recall10@100']:.3f}  {row['ms_per_query']:.2f} ms/query")
    path.unlink()
    queries.unlink()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child")
    ap.add_argument("--args", default="{}")
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--vectors", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--factories", default="IVF1024,Flat;IVF1024,PQ48;IVF1024,PQ64",
                    help="';'-separated FAISS factory strings")
    ap.add_argument("--train", type=int, default=65_536)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--encode", type=int, default=256, help="texts for the per-item encoder cost (0: skip)")
    ap.add_argument("--skip-items", action="store_true")
    ap.add_argument("--skip-index", action="store_true")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    if a.child:
        import resource

        result = CHILDREN[a.child](json.loads(a.args))
        result["__maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps(result))
        return

    work = Path(a.workdir or tempfile.mkdtemp(prefix="fusionrec-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    command = " ".join(["bench/scale.py", *sys.argv[1:]])
    results: dict = {}

    def section(name: str, run) -> None:  # each section keeps its own command, time and machine load
        t = time.perf_counter()
        load = os.getloadavg()
        results[name] = {"result": run(), "command": command, "seconds": round(time.perf_counter() - t, 1),
                         "load_average": [round(load[0], 2), round(os.getloadavg()[0], 2)], "machine": machine}

    try:
        if not a.skip_items:
            section("items", lambda: bench_items([int(s) for s in a.sizes.split(",") if s], work, a.dim))
        if not a.skip_index:
            section("index", lambda: bench_index(a.vectors, a.dim, [f for f in a.factories.split(";") if f],
                                                 a.queries, a.train, work, a.threads))
        if a.encode:
            section("encode", lambda: run_child("encode", {"n": a.encode, "n_images": 64}))
            enc = results["encode"]["result"]
            print(f"encode, 1 CPU thread: text {enc['text_items_per_s_per_core']} items/s "
                  f"({enc['mean_tokens']:.0f} tokens), image {enc['image_items_per_s_per_core']} images/s")
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "scale.json"
    existing = json.loads(out.read_text()) if out.is_file() else {}
    existing = {k: v for k, v in existing.items() if k in ("items", "index", "encode")}
    existing.update(results)  # a partial run (--skip-...) keeps the other sections
    out.write_text(json.dumps(existing, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
