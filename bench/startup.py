"""Serving start-up: `fusionrec recommend`, `score` and `evaluate` against importing the libraries they need.

    .venv/bin/python bench/startup.py [--work DIR] [--repeat 5] [--bytecode cached|none|both]

Side by side in one run, round by round (so a busy machine slows every command alike), each
command a fresh process on the demo artifacts (the sample in data/, split with `fusionrec
split`, then `fusionrec run` on the training part; built once under bench/results/startup/
when absent):

- libs: `python -c "import polars, pyarrow, faiss, lightgbm"` (what serving cannot do without);
- recommend: `fusionrec recommend --out ART --export FILE -q` (every user's top 10);
- score: `fusionrec score --out ART --candidates PAIRS --export FILE -q` (2,000 pairs);
- evaluate: `fusionrec evaluate --out ART --test HELD_OUT -q` (with its baselines).

Ratio = median seconds of the command / median seconds of libs (goal <= 3). `--bytecode
cached` runs Python with compiled bytecode kept (in bench/results/pycache, as an installed
package has it), `none` compiles every module at every start (PYTHONDONTWRITEBYTECODE=1 and no
cache, as this development environment runs); `both` measures each. Each serving command is
also run once with PYTHONPROFILEIMPORTTIME=1 to list the deep-learning libraries it imports
(none expected). `--before DIR` (a checkout of an earlier commit, e.g. `git worktree add
/tmp/before <commit>`) also times each serving command with that code, in the same rounds.
Results go to bench/results/startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
FUSIONREC = Path(sys.executable).with_name("fusionrec")
LIBS = "import polars, pyarrow, faiss, lightgbm"
HEAVY = ("torch", "transformers", "timm", "librosa", "ray", "implicit", "mlflow", "matplotlib", "jinja2", "sklearn")


def environment(bytecode: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
    env["HF_HUB_OFFLINE"] = "1"
    if bytecode == "cached":
        env["PYTHONPYCACHEPREFIX"] = str(RESULTS / "pycache")
    else:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def build_demo(work: Path) -> tuple[Path, Path]:
    """ART and the held-out file of the demo: `fusionrec split` of data/, `fusionrec run` on its training part."""
    art, split = work / "art", work / "split"
    if not (art / "ranker" / "guard.json").is_file() or not (split / "held_out.csv").is_file():
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        env = environment("cached")
        print(f"building the demo artifacts in {work} (a few minutes) ...", file=sys.stderr)
        subprocess.run([str(FUSIONREC), "split", "--data", str(ROOT / "data"), "--out", str(split), "-q"],
                       env=env, check=True)
        subprocess.run([str(FUSIONREC), "run", "--data", str(split / "train"), "--out", str(art), "-q"],
                       env=env, check=True, stdout=subprocess.DEVNULL)
    return art, split / "held_out.csv"


def commands(art: Path, held_out: Path, tmp: Path) -> dict[str, list[str]]:
    pairs = tmp / "pairs.parquet"
    pl.read_parquet(art / "candidates.parquet", columns=["user_id", "item_id"]).head(2000).write_parquet(pairs)
    return {
        "libs": [sys.executable, "-c", LIBS],
        "recommend": [str(FUSIONREC), "recommend", "--out", str(art), "--export", str(tmp / "recs.parquet"), "-q"],
        "score": [str(FUSIONREC), "score", "--out", str(art), "--candidates", str(pairs),
                  "--export", str(tmp / "scored.parquet"), "-q"],
        "evaluate": [str(FUSIONREC), "evaluate", "--out", str(art), "--test", str(held_out), "-q"],
    }


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def heavy_imports(cmd: list[str], env: dict[str, str]) -> list[str]:
    """The listed libraries a command imports (from Python's -X importtime report)."""
    result = subprocess.run(cmd, env={**env, "PYTHONPROFILEIMPORTTIME": "1"}, check=True, capture_output=True,
                            text=True)
    loaded = set()
    for line in result.stderr.splitlines():
        parts = line.split("|")
        # A refused import (lightgbm's `from sklearn ...` while the command line keeps
        # scikit-learn out, ranker.model.SKLEARN_ENV) is listed too, at a few microseconds.
        if line.startswith("import time:") and parts[1].strip().isdigit() and int(parts[1]) >= 1000:
            loaded.add(parts[-1].strip())
    return sorted(m for m in HEAVY if m in loaded)


def measure(cmds: dict[str, list[str]], bytecode: str, repeat: int, before: Path | None = None) -> dict:
    env = environment(bytecode)
    envs = {name: env for name in cmds}
    if before is not None:
        # `fusionrec` resolved in the earlier checkout: PYTHONPATH comes before the editable install.
        shim = RESULTS / "startup" / "before_path"
        shim.mkdir(parents=True, exist_ok=True)
        link = shim / "fusionrec"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(before.resolve())
        for name in [n for n in cmds if n != "libs"]:
            cmds[f"{name}@before"] = cmds[name]
            envs[f"{name}@before"] = {**env, "PYTHONPATH": str(shim)}
    for name, cmd in cmds.items():  # warm-up: the OS file cache and, with `cached`, the bytecode
        timed(cmd, envs[name])
    seconds: dict[str, list[float]] = {name: [] for name in cmds}
    for _ in range(repeat):
        for name, cmd in cmds.items():
            seconds[name].append(timed(cmd, envs[name]))
    median = {name: statistics.median(s) for name, s in seconds.items()}
    return {"bytecode": bytecode, "repeat": repeat,
            "median_s": {k: round(v, 3) for k, v in median.items()},
            "runs_s": {k: [round(x, 3) for x in v] for k, v in seconds.items()},
            "ratio": {k: round(v / median["libs"], 2) for k, v in median.items() if k != "libs"},
            "heavy_imports": {k: heavy_imports(c, envs[k]) for k, c in cmds.items() if k != "libs"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=RESULTS / "startup", help="where the demo artifacts live")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--bytecode", choices=["cached", "none", "both"], default="both")
    parser.add_argument("--before", type=Path, default=None, help="an earlier checkout to time beside this one")
    parser.add_argument("--out", type=Path, default=RESULTS / "startup.json")
    args = parser.parse_args()

    art, held_out = build_demo(args.work)
    tmp = args.work / "tmp"
    tmp.mkdir(exist_ok=True)
    cmds = commands(art, held_out, tmp)
    modes = ["cached", "none"] if args.bytecode == "both" else [args.bytecode]
    results = [measure(dict(cmds), mode, args.repeat, args.before) for mode in modes]
    load = os.getloadavg()
    out = {"art": str(art), "cpus": os.cpu_count(), "load_average": [round(x, 2) for x in load],
           "python": sys.version.split()[0], "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print("| bytecode | libs (s) | recommend (s) | score (s) | evaluate (s) | ratios (goal <= 3) | deep-learning imports |")
    print("|---|---:|---:|---:|---:|---|---|")
    for r in results:
        for tag in ("", "@before") if args.before else ("",):
            m = r["median_s"]
            ratios = ", ".join(f"{k} {r['ratio'][k + tag]:.2f}x" for k in ("recommend", "score", "evaluate"))
            heavy = "; ".join(f"{k}: {', '.join(v)}" for k, v in r["heavy_imports"].items()
                              if v and k.endswith(tag) and (tag or "@" not in k)) or "none"
            print(f"| {r['bytecode']}{' (before)' if tag else ''} | {m['libs']:.2f} | {m['recommend' + tag]:.2f} | "
                  f"{m['score' + tag]:.2f} | {m['evaluate' + tag]:.2f} | {ratios} | {heavy} |")
    print(f"(median of {args.repeat} runs each, interleaved; load average {load[0]:.1f} on {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
