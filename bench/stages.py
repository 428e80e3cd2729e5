"""Seconds per stage of the nightly job on a real data set, as a user runs it (issue 15, item 4:
the index and train stages of Last.fm-2K within 10 s each on 2 cores).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/stages.py --dataset lastfm [--repeats 3] [--set ranker.negative_share=0.25 --label quarter]

Needs a `bench/peers.py` run of the same data set first: it reads that run's train part
(`bench/results/work_<dataset>/train`) and embeddings (`.../art/embeddings`, content-hashed,
so the embed stage only checks them). Each repeat copies the embeddings into a fresh artifacts
folder and runs `fusionrec index` then `fusionrec train` in their own processes; the seconds
are each stage's own, from the run manifest (start-up and imports excluded), with the steps
the stage records. The table gives the median over repeats and the machine's load average
when the repeats began (the figures assume an otherwise idle machine).

Results: bench/results/stages_<dataset>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
SETS = ("lastfm", "movielens")


def stage_timings(art: Path) -> dict[str, dict[str, float]]:
    runs = json.loads((art / "manifest.json").read_text())["runs"]
    return {r["command"]: {"seconds": r["seconds"], **r.get("timings", {})} for r in runs}


def one_repeat(work: Path, scratch: Path, overrides: list[str]) -> dict[str, dict[str, float]]:
    art = scratch / "art"
    if art.exists():
        shutil.rmtree(art)
    art.mkdir(parents=True)
    shutil.copytree(work / "art" / "embeddings", art / "embeddings")
    for command in ("index", "train"):
        # `train --data` would build the index again first: train reads the index just built.
        data = ["--data", str(work / "train")] if command == "index" else []
        cmd = [sys.executable, "-m", "fusionrec.cli", command, *data, "--out", str(art), "-q",
               *[arg for o in overrides for arg in ("--set", o)]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"fusionrec {command} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return stage_timings(art)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", choices=SETS, required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, default=None, help="the peers run's folder (default bench/results/work_<dataset>)")
    ap.add_argument("--label", default="", help="a name for this row (e.g. a commit)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="a config override for both stages, as `fusionrec --set` takes it (repeatable)")
    args = ap.parse_args()
    work = args.work or RESULTS / f"work_{args.dataset}"
    if not (work / "train").is_dir() or not (work / "art" / "embeddings").is_dir():
        raise SystemExit(f"no {work}/train or {work}/art/embeddings: run bench/peers.py --dataset {args.dataset} first")
    load = os.getloadavg()[0]
    repeats = [one_repeat(work, RESULTS / f"stages_{args.dataset}", args.overrides) for _ in range(args.repeats)]
    table: dict[str, dict[str, float]] = {}
    for stage in ("index", "train"):
        keys = sorted({k for r in repeats for k in r.get(stage, {})}, key=lambda k: (k != "seconds", k))
        table[stage] = {k: round(statistics.median(r[stage].get(k, 0.0) for r in repeats), 2) for k in keys}
    out: dict[str, Any] = {"dataset": args.dataset, "label": args.label, "overrides": args.overrides,
                           "repeats": args.repeats,
                           "load_average_at_start": round(load, 2), "cores": os.cpu_count(), "median": table}
    print(f"{args.dataset} {args.label}: median of {args.repeats} repeats, load average {load:.2f} at start, "
          f"{os.cpu_count()} cores")
    print("| stage | seconds | steps |\n|---|---:|---|")
    for stage, row in table.items():
        steps = ", ".join(f"{k} {v:.1f}" for k, v in row.items() if k != "seconds")
        print(f"| {stage} | {row['seconds']:.1f} | {steps} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"stages_{args.dataset}{'_' + args.label if args.label else ''}.json"
    (RESULTS / name).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
