"""Embedding job throughput against the raw forward pass, and the cost of an incremental rerun.

    .venv/bin/python bench/embed.py [--data DIR] [--config FILE] [--set KEY=VALUE ...]

Side by side in one run, with the same encoders (loaded once, warmed up) on the same inputs:
- raw: a hand-written loop that decodes each input and runs the encoder forward in batches,
  with no hashing, no shards, no Parquet, no manifest;
- job: `run_embed` on an empty artifacts directory.
Ratio = raw seconds / job seconds (the job's throughput as a share of the raw pass; goal >= 0.90).
Then 1% of the items get a new title and the job runs again: rerun seconds / full-run seconds
(goal <= 0.05). Results go to bench/results/embed.json.

    .venv/bin/python bench/embed.py --rerun [--data DIR] [--repeat 3]

`--rerun`: the whole `fusionrec embed` command, each run a fresh process, on a real data set
(default MovieLens-100K from ../shared/datasets): a cold run into an empty artifacts directory,
then `--repeat` reruns with nothing changed, then one `fusionrec embed --verify` (every file
hashed again, every encoder loaded). Ratio = median no-change rerun seconds / cold seconds
(goal <= 0.01). Python keeps compiled bytecode (bench/results/pycache, as an installed package
has it), warmed up before the cold run. `--before DIR` (a checkout of an earlier commit) also
times the same no-change rerun with that code, after this code's. Results go to
bench/results/embed_rerun.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fusionrec.pipeline.config import load_config  # noqa: E402
from fusionrec.pipeline.embedding.job import build_encoders, modality_contents, precomputed_tables, run_embed  # noqa: E402
from fusionrec.pipeline.io.tables import load_items, load_users, resolve_media  # noqa: E402


def raw_pass(inputs: dict[tuple[str, str], list[str]], encoders, data_dir: Path) -> dict[str, float]:
    """Decode + forward for every row, modality by modality, nothing else."""
    out: dict[str, float] = {}
    for (kind, modality), contents in inputs.items():
        enc = encoders.get(modality)
        if enc is None:
            continue
        t0 = time.perf_counter()
        if enc.prepare is None:
            batch = list(contents)
        else:
            batch = []
            for rel in contents:
                try:
                    batch.append(enc.prepare(resolve_media(data_dir, rel)))
                except Exception:  # noqa: BLE001 - the job skips bad files too
                    pass
        if batch:
            enc.encode(batch)
        out[f"{kind}_{modality}"] = time.perf_counter() - t0
    return out


def device_name(device: str) -> str:
    """The device the encoders run on, in words (the GPU's name on CUDA)."""
    import torch

    from fusionrec.pipeline.encoders.base import resolve_device

    chosen = resolve_device(device)
    if chosen.startswith("cuda"):
        return f"{chosen} ({torch.cuda.get_device_name(torch.device(chosen))}, bf16 autocast)"
    return f"{chosen} ({torch.get_num_threads()} threads, fp32)"


def rerun_bench(data: Path, repeat: int, out: Path, before: Path | None = None) -> None:
    """Cold `fusionrec embed`, then reruns with nothing changed and one --verify, each a fresh process."""
    work = ROOT / "bench" / "results" / "embed_rerun" / "bench"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    art = work / "art"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(HF_HUB_OFFLINE="1", PYTHONPYCACHEPREFIX=str(ROOT / "bench" / "results" / "pycache"))
    fusionrec = str(Path(sys.executable).with_name("fusionrec"))
    # Bytecode of everything the cold run imports, compiled before any timing.
    subprocess.run([sys.executable, "-c", "import fusionrec.cli, torch, transformers, timm, librosa"], env=env,
                   check=True)

    def embed(*extra: str, run_env: dict[str, str] = env) -> float:
        t0 = time.perf_counter()
        subprocess.run([fusionrec, "embed", "--data", str(data), "--out", str(art), "-q", *extra], env=run_env,
                       check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - t0

    def encoded() -> dict[str, int]:
        run = json.loads((art / "manifest.json").read_text())["runs"][-1]
        return {k: v["encoded"] for k, v in run["counts"].items() if isinstance(v, dict)}

    cold = embed()
    cold_encoded = encoded()
    reruns = [embed() for _ in range(repeat)]
    rerun_encoded = encoded()
    verify = embed("--verify")
    verify_encoded = encoded()
    before_runs: list[float] = []
    if before is not None:
        shim = work / "before_path"  # `fusionrec` resolved in the earlier checkout (PYTHONPATH first)
        shim.mkdir()
        (shim / "fusionrec").symlink_to(before.resolve())
        before_env = {**env, "PYTHONPATH": str(shim)}
        subprocess.run([sys.executable, "-c", "import fusionrec.cli"], env=before_env, check=True)
        before_runs = [embed(run_env=before_env) for _ in range(repeat)]
    rerun = statistics.median(reruns)
    load = os.getloadavg()
    result = {"data": str(data), "cold_s": round(cold, 2), "cold_encoded": cold_encoded,
              "rerun_s": [round(x, 3) for x in reruns], "rerun_median_s": round(rerun, 3),
              "rerun_encoded": rerun_encoded, "ratio": round(rerun / cold, 5), "verify_s": round(verify, 2),
              "verify_encoded": verify_encoded, "verify_ratio": round(verify / cold, 4),
              "before": str(before) if before else None, "before_rerun_s": [round(x, 3) for x in before_runs],
              "before_ratio": round(statistics.median(before_runs) / cold, 4) if before_runs else None,
              "load_average": [round(x, 2) for x in load], "cpus": os.cpu_count()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"cold `fusionrec embed`: {cold:.1f} s (encoded {cold_encoded})")
    print(f"no-change rerun (median of {repeat}): {rerun:.2f} s (runs {', '.join(f'{x:.2f}' for x in reruns)}; "
          f"encoded {rerun_encoded})")
    print(f"rerun / cold: {rerun / cold:.4f} (goal <= 0.01)")
    print(f"rerun with --verify: {verify:.1f} s ({verify / cold:.3f} of cold; encoded {verify_encoded})")
    if before_runs:
        print(f"no-change rerun with {before}: {statistics.median(before_runs):.2f} s "
              f"({statistics.median(before_runs) / cold:.4f} of cold)")
    print(f"(load average {load[0]:.1f} on {os.cpu_count()} CPUs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="data directory (default: data/, or MovieLens-100K "
                                                                "with --rerun)")
    parser.add_argument("--changed", type=float, default=0.01, help="share of items changed before the rerun")
    parser.add_argument("--rerun", action="store_true", help="cold vs no-change rerun of `fusionrec embed`")
    parser.add_argument("--repeat", type=int, default=3, help="no-change reruns (--rerun)")
    parser.add_argument("--before", type=Path, default=None, help="an earlier checkout to time beside (--rerun)")
    parser.add_argument("--config", type=Path, default=None, help="a config TOML (default: the built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override, as `fusionrec --set` takes (repeatable), e.g. embed.decode_workers=8")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results = ROOT / "bench" / "results"
    if args.rerun:
        rerun_bench(args.data or ROOT.parent / "shared" / "datasets" / "movielens-100k" / "fusionrec", args.repeat,
                    args.out or results / "embed_rerun.json", args.before)
        return
    args.data = args.data or ROOT / "data"
    args.out = args.out or results / "embed.json"

    cfg = load_config(args.config, args.overrides)
    items, users = load_items(args.data), load_users(args.data)
    inputs = {(kind, modality): rows["content"].to_list()
              for kind, frame in (("item", items), ("user", users)) if frame is not None
              for modality, rows in modality_contents(frame, kind).items()
              if rows.height and (kind, modality) not in precomputed_tables(args.data)}
    t0 = time.perf_counter()
    encoders = build_encoders(cfg.embed, {modality for _, modality in inputs})
    # Warm up: load weights and run one batch per modality, outside both timings.
    for (_, modality), contents in inputs.items():
        enc = encoders[modality]
        first = contents[:1] if enc.prepare is None else [enc.prepare(resolve_media(args.data, contents[0]))]
        enc.encode(first)
    load_seconds = time.perf_counter() - t0

    work = Path(tempfile.mkdtemp(prefix="fusionrec-bench-"))
    try:
        data = work / "data"
        shutil.copytree(args.data, data)
        if device_name(cfg.embed.device).startswith("cuda"):
            raw_pass(inputs, encoders, data)  # CUDA picks kernels for each new batch shape on first sight
        raw = raw_pass(inputs, encoders, data)
        t0 = time.perf_counter()
        full = run_embed(data, work / "art", cfg, encoders=encoders, show_progress=False)
        job_seconds = time.perf_counter() - t0

        n_changed = max(1, int(round(items.height * args.changed)))
        rerun, rerun_seconds = None, None
        if "title" in items.columns:  # a catalogue without titles (images alone, say) skips the rerun
            rng = np.random.default_rng(0)
            changed = set(rng.choice(items["item_id"].to_numpy(), n_changed, replace=False).tolist())
            items.with_columns(pl.when(pl.col("item_id").is_in(list(changed)))
                               .then(pl.concat_str([pl.col("title"), pl.lit(" (new edition)")]))
                               .otherwise(pl.col("title")).alias("title")).write_csv(data / "items.csv")
            for f in data.glob("items.parquet"):
                f.unlink()
            t0 = time.perf_counter()
            rerun = run_embed(data, work / "art", cfg, encoders=encoders, show_progress=False)
            rerun_seconds = time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)

    raw_seconds = sum(raw.values())
    rows = {name: {"rows": c.rows, "raw_s": round(raw.get(name, 0.0), 3), "job_s": round(c.seconds, 3)}
            for name, c in full.counts.items()}
    result = {
        "data": str(args.data),
        "items": items.height,
        "model_load_s": round(load_seconds, 2),
        "raw_s": round(raw_seconds, 3),
        "job_s": round(job_seconds, 3),
        "throughput_ratio": round(raw_seconds / job_seconds, 3),
        "changed_items": None if rerun is None else n_changed,
        "rerun_s": None if rerun_seconds is None else round(rerun_seconds, 3),
        "rerun_ratio": None if rerun_seconds is None else round(rerun_seconds / job_seconds, 4),
        "rerun_encoded": None if rerun is None else {name: c.encoded for name, c in rerun.counts.items()},
        "per_modality": rows,
        "torch_threads": __import__("torch").get_num_threads(),
        "device": device_name(cfg.embed.device),
        "overrides": args.overrides,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| table | rows | raw pass (s) | job (s) |\n|---|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['rows']} | {r['raw_s']} | {r['job_s']} |")
    print(f"\ndevice: {result['device']}; {sum(r['rows'] for r in rows.values())} rows in {job_seconds:.2f} s "
          f"(model load and warm-up {load_seconds:.1f} s, outside both timings)")
    print(f"job throughput / raw forward pass: {result['throughput_ratio']:.3f} (goal >= 0.90)")
    if rerun_seconds is not None:
        print(f"rerun with {n_changed} of {items.height} items changed / full run: {result['rerun_ratio']:.4f} "
              f"(goal <= 0.05; {rerun_seconds:.2f} s vs {job_seconds:.2f} s; encoded {result['rerun_encoded']})")


if __name__ == "__main__":
    main()
