"""Pytest plugin: counts of the reliability suites, printed at the end of the run.

Tests record through the `reliability` fixture:

    def test_x(reliability):
        ...
        reliability.record(faults=1)          # one fault injected (kill -9, disk full, ...)
        reliability.record(bad_inputs=1)      # one bad input tried
        reliability.record(data_lost=0)       # artifacts lost or damaged by it (must stay 0)
        reliability.record(random_rejected=1) # a random input the property tests saw rejected
        reliability.record(probes=1, tracebacks=0, silent_damage=0)  # one careless/hostile probe

and the terminal summary prints

    reliability: faults injected 30, bad inputs tried 50 (and 253 random inputs rejected), data lost 0,
    probes tried 80 (tracebacks 0, silent damage 0)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest


@dataclass
class ReliabilityCounts:
    faults: int = 0
    bad_inputs: int = 0
    data_lost: int = 0
    random_rejected: int = 0
    probes: int = 0  # probes of tests/test_probes.py (careless or hostile use)
    tracebacks: int = 0  # of those, how many showed a Python traceback (must stay 0)
    silent_damage: int = 0  # of those, how many exited 0 and damaged data or exports (must stay 0)
    cases: list[str] = field(default_factory=list)  # a short name per recorded case, for -v output

    def record(self, *, faults: int = 0, bad_inputs: int = 0, data_lost: int = 0, random_rejected: int = 0,
               probes: int = 0, tracebacks: int = 0, silent_damage: int = 0, case: str | None = None) -> None:
        self.faults += faults
        self.bad_inputs += bad_inputs
        self.data_lost += data_lost
        self.random_rejected += random_rejected
        self.probes += probes
        self.tracebacks += tracebacks
        self.silent_damage += silent_damage
        if case:
            self.cases.append(case)

    def line(self) -> str:
        random = f" (and {self.random_rejected} random inputs rejected)" if self.random_rejected else ""
        probes = (f", probes tried {self.probes} (tracebacks {self.tracebacks}, silent damage {self.silent_damage})"
                  if self.probes else "")
        return (f"reliability: faults injected {self.faults}, bad inputs tried {self.bad_inputs}{random}, "
                f"data lost {self.data_lost}{probes}")


COUNTS = ReliabilityCounts()


@pytest.fixture(scope="session")
def reliability() -> ReliabilityCounts:
    return COUNTS


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ARG001 - pytest hook signature
    if not (COUNTS.faults or COUNTS.bad_inputs or COUNTS.data_lost or COUNTS.random_rejected or COUNTS.probes):
        return
    terminalreporter.write_sep("-", "reliability suites")
    terminalreporter.write_line(COUNTS.line())
    if config.getoption("verbose") > 0 and COUNTS.cases:
        for case in COUNTS.cases:
            terminalreporter.write_line(f"  {case}")


# --------------------------------------------------------------------------- helpers the suites share

PROJECT = Path(__file__).resolve().parents[1]
SAMPLE = PROJECT / "data"
QUICK = ["--set", "embed.image.enabled=false", "--set", "embed.audio.enabled=false", "-q"]
EXPORT_KEY = "reliability-suite-export-key-0123456789"


def small_catalog(dest: Path, night: int = 1, n_items: int = 60) -> Path:
    """A small text-only data directory cut from the sample in data/ (a few seconds per job).

    Night 2 is the next night's input: two items added, two titles and one user's text
    changed, and the interactions of the last ten days added.
    """
    if not (SAMPLE / "items.csv").is_file():
        pytest.skip("data/ sample not generated (run: make sample)")
    import polars as pl

    dest.mkdir(parents=True, exist_ok=True)
    items = pl.read_csv(SAMPLE / "items.csv", infer_schema=False).drop("image", "audio")
    users = pl.read_csv(SAMPLE / "users.csv", infer_schema=False).select("user_id", "text")
    inter = pl.read_csv(SAMPLE / "interactions.csv", infer_schema=False)
    last = int(inter["timestamp"].cast(pl.Int64).max())
    if night == 1:
        items = items.head(n_items)
        inter = inter.filter(pl.col("timestamp").cast(pl.Int64) < last - 10 * 86_400)
    else:
        items = items.head(n_items + 2).with_columns(
            pl.when(pl.col("item_id").is_in([items["item_id"][3], items["item_id"][7]]))
            .then(pl.concat_str(pl.col("title"), pl.lit(" (remastered)"))).otherwise(pl.col("title")).alias("title"))
        users = users.with_columns(pl.when(pl.col("user_id") == users["user_id"][0])
                                   .then(pl.lit("Rain on a tin roof and distant thunder, every night."))
                                   .otherwise(pl.col("text")).alias("text"))
    inter = inter.filter(pl.col("item_id").is_in(items["item_id"].implode()))
    items.write_csv(dest / "items.csv")
    users.write_csv(dest / "users.csv")
    inter.write_csv(dest / "interactions.csv")
    return dest


def visible_files(art: Path) -> list[Path]:
    """Every file under `art` but temporaries (`.tmp-*`, invisible by contract)."""
    from fusionrec.pipeline.io.storage import TMP_PREFIX

    return sorted(p for p in Path(art).rglob("*") if p.is_file()
                  and not any(part.startswith(TMP_PREFIX) for part in p.relative_to(art).parts))


def temporaries(art: Path) -> list[Path]:
    from fusionrec.pipeline.io.storage import TMP_PREFIX

    return sorted(Path(art).rglob(f"{TMP_PREFIX}*"))


def digests(art: Path) -> dict[str, str]:
    """sha256 of every visible file under `art`, by relative path."""
    import hashlib

    return {str(p.relative_to(art)): hashlib.sha256(p.read_bytes()).hexdigest() for p in visible_files(art)}


@dataclass
class JobResult:
    code: int  # exit status; -9 when killed by SIGKILL
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def _run_cli(args: list[str], env: dict[str, str], out: str, err: str, fsize: int | None) -> None:
    """The body of one job: the real `fusionrec` CLI in a fresh child process."""
    import os
    import resource
    import signal
    import sys

    os.environ.update(env)
    for fd, name in ((1, out), (2, err)):
        target = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    if fsize is not None:  # files may not grow past `fsize` bytes: every write beyond fails
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.RLIM_INFINITY))
    from fusionrec.cli import main

    try:
        main(args)  # the console script's entry point: its Ctrl-C and crash handling included
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


PRELOAD = ["fusionrec.cli", "fusionrec.pipeline.embedding.job", "fusionrec.pipeline.retrieval.stage", "fusionrec.pipeline.encoders.text", "fusionrec.ranker.training", "fusionrec.ranker.serving.recommender",
           "fusionrec.ranker.serving.export", "fusionrec.ranker.serving.privacy", "transformers.models.bert.modeling_bert", "faiss", "lightgbm",
           "tests.reliability_counts"]


class JobRunner:
    """Runs `fusionrec` commands as separate processes, each forked from one clean server.

    Every job is a real process that `kill -9` (or a fault point) can end at any moment; the
    server has imported torch, transformers, faiss and lightgbm once, so a job starts in
    milliseconds instead of seconds, and it never ran a thread pool, so forking it is safe.
    """

    def __init__(self, workdir: Path) -> None:
        import multiprocessing

        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(PRELOAD)
        self.workdir = workdir
        self.jobs = 0

    def __call__(self, *args: str | Path, env: dict[str, str] | None = None, fsize: int | None = None,
                 timeout: float = 600) -> JobResult:
        self.jobs += 1
        out, err = self.workdir / f"job{self.jobs}.out", self.workdir / f"job{self.jobs}.err"
        full_env = {"COLUMNS": "250", "FUSIONREC_EXPORT_KEY": EXPORT_KEY, "FUSIONREC_FAULT": "",
                    "FUSIONREC_FAULT_TRACE": "", **(env or {})}
        proc = self.ctx.Process(target=_run_cli, args=([str(a) for a in args], full_env, str(out), str(err), fsize))
        proc.start()
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
            raise AssertionError(f"fusionrec {' '.join(map(str, args))} ran past {timeout} s")
        return JobResult(int(proc.exitcode), out.read_text(errors="replace"), err.read_text(errors="replace"))

    def start(self, *args: str | Path, env: dict[str, str] | None = None):
        """Start a job without waiting (a multiprocessing Process); `stop` faults leave it alive."""
        self.jobs += 1
        out, err = self.workdir / f"job{self.jobs}.out", self.workdir / f"job{self.jobs}.err"
        full_env = {"COLUMNS": "250", "FUSIONREC_EXPORT_KEY": EXPORT_KEY, **(env or {})}
        proc = self.ctx.Process(target=_run_cli, args=([str(a) for a in args], full_env, str(out), str(err), None))
        proc.start()
        return proc


@pytest.fixture(scope="session")
def fusionrec_job(tmp_path_factory: pytest.TempPathFactory) -> JobRunner:
    return JobRunner(tmp_path_factory.mktemp("jobs"))
