"""fusionrec: the command line (typer).

Exit status: 0 on success, 2 on bad usage or bad input (the message names the file, the
row and the field), 1 on any other failure.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional, cast

import typer
import typer.core

from fusionrec import jobs
from fusionrec.doctor import checks as doctor_checks
from fusionrec.doctor import plan as doctor_plan
from fusionrec.doctor import versions
from fusionrec.evaluation.holdout import split_data_dir
from fusionrec.evaluation.offline import parse_relevance, run_evaluate
from fusionrec.pipeline import interrupts
from fusionrec.pipeline.config import Config, load_config
from fusionrec.pipeline.embedding.job import EmbedReport, summary_rows
from fusionrec.pipeline.errors import FusionrecError, first_line
from fusionrec.pipeline.io.storage import ReadLock
from fusionrec.ranker.serving.recommender import read_users

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Offline two-stage multimodal recommender: embed, fuse and index, rank, export.")
log = logging.getLogger("fusionrec")

# typer: an option whose default is `...` (Ellipsis) is required; typed as a Path for mypy.
_REQUIRED = cast(Path, ...)

# Flags read `--explain / --no-explain`, not `--explain <bool>`: no type shown for flags and counts.
_display_type_rich = getattr(typer.core.TyperOption, "display_type_rich", None)
if _display_type_rich is not None:
    def _flag_display(self: typer.core.TyperOption, ctx: object) -> str | None:
        if getattr(self, "is_flag", False) or getattr(self, "count", False):
            return ""
        assert _display_type_rich is not None  # defined only when it is
        return _display_type_rich(self, ctx)

    typer.core.TyperOption.display_type_rich = _flag_display  # type: ignore[method-assign]


DataOpt = Annotated[Optional[Path], typer.Option("--data", help="Data directory (items, users, interactions).")]
OutOpt = Annotated[Path, typer.Option("--out", help="Artifacts directory.")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="TOML config file.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Config override, e.g. embed.text.batch_size=32 (repeatable).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars; warnings and errors only.")]
VerboseOpt = Annotated[int, typer.Option("--verbose", "-v", count=True,
                                         help="More detail: -v adds other libraries' INFO logs, -vv debug logs.")]


class Engine(str, Enum):
    local = "local"
    ray = "ray"


class LogFormat(str, Enum):
    text = "text"
    json = "json"


VerifyOpt = Annotated[bool, typer.Option(
    "--verify", help="Hash every media, table and model file again instead of trusting ART/cache/file_hashes.parquet "
                     "(remembered by path, size, mtime, ctime and inode), load every encoder and retry media that failed to decode.")]
EngineOpt = Annotated[Optional[Engine], typer.Option("--engine", case_sensitive=False,
                                                     help="Where to run (default: the config's engine).")]
# Set by the root options (`fusionrec -v --log-format json run ...`); commands add their own -v/-q.
_STATE: dict[str, object] = {"verbose": 0, "log_format": LogFormat.text}


class _JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"), "level": record.levelname,
                 "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def _setup_logging(quiet: bool, verbose: int = 0) -> None:
    """Logs on stderr. fusionrec's INFO unless -q; other libraries' INFO (faiss' "Loading faiss
    with AVX512", ...) only with -v; debug with -vv."""
    verbose = max(verbose, int(_STATE["verbose"]))  # type: ignore[call-overload]
    handler: logging.Handler
    if _STATE["log_format"] == LogFormat.json:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_JsonFormatter())
    else:
        from rich.logging import RichHandler

        handler = RichHandler(show_path=False, show_time=False, console=_console(stderr=True))
    third_party = logging.DEBUG if verbose >= 2 else logging.INFO if verbose == 1 else logging.WARNING
    logging.basicConfig(level=third_party, format="%(message)s", handlers=[handler], force=True)
    own = logging.DEBUG if verbose >= 2 else logging.WARNING if quiet and not verbose else logging.INFO
    logging.getLogger("fusionrec").setLevel(own)


def _console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Piped output (logs, CI) gets wide tables instead of rich's 80-column default.
    return Console(stderr=stderr, width=None if stream.isatty() else 200)


def _config(path: Path | None, overrides: list[str] | None, engine: Engine | str | None = None) -> Config:
    extra = [f"engine={getattr(engine, 'value', engine)}"] if engine else []
    cfg = load_config(path, [*(overrides or []), *extra])
    jobs.check_engine(cfg)
    return cfg


def _data_dir(data: Path | None) -> Path:
    if data is not None:
        if not data.is_dir():
            raise typer.BadParameter(f"data directory {data} " + ("is a file, not a folder" if data.exists()
                                                                 else "does not exist"), param_hint="--data")
        return data
    for candidate in (jobs.sample_data_dir(), Path("data")):
        if (candidate / "items.csv").is_file() or (candidate / "items.parquet").is_file():
            return candidate
    raise typer.BadParameter("no --data given and no sample data/ found", param_hint="--data")


def _error_line(message: str) -> None:
    """The one line a failure shows on stderr: `error: ...`, or under `--log-format json` one
    JSON object like the logs' (level ERROR), so a log collector reads every stderr line."""
    if _STATE["log_format"] == LogFormat.json:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "level": "ERROR", "logger": "fusionrec",
                 "message": message}
        print(json.dumps(entry, ensure_ascii=False), file=sys.stderr, flush=True)
        return
    if not sys.stderr.isatty():
        print(f"error: {message}", file=sys.stderr, flush=True)
        return
    from rich.markup import escape as rich_escape

    # The message is text, not markup: paths and config keys hold [brackets].
    _console(stderr=True).print(f"[bold red]error:[/] {rich_escape(message)}", highlight=False, markup=True,
                                soft_wrap=True)


def _fail(exc: FusionrecError) -> None:
    _error_line(str(exc))
    raise typer.Exit(exc.exit_code)


def _progress_shown(quiet: bool) -> bool:
    # JSON logs are for collectors: no progress bars between their lines.
    return not quiet and _STATE["log_format"] != LogFormat.json


def _print_table(title: str, rows: list[dict], columns: list[str], caption: str | None = None) -> None:
    from rich.table import Table

    table = Table(title=title, caption=caption)
    for column in columns:
        table.add_column(column, justify="left" if column in ("table", "stage") else "right")
    for row in rows:
        table.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in columns))
    _console().print(table)


def version_text() -> str:
    """fusionrec's version and its main libraries', from package metadata (nothing heavy imported)."""
    v = versions()
    return f"fusionrec {v.pop('fusionrec')} (" + ", ".join(f"{k} {x}" for k, x in v.items()) + \
        f", python {sys.version.split()[0]})"


def _version(value: bool) -> None:
    if value:
        typer.echo(version_text())
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the versions of fusionrec, torch, faiss and lightgbm.")] = False,
          verbose: VerboseOpt = 0,
          log_format: Annotated[LogFormat, typer.Option("--log-format", case_sensitive=False,
                                                        help="Logs on stderr as text or JSON lines.")] = LogFormat.text,
          ) -> None:
    """Offline two-stage multimodal recommender: embed, fuse and index, rank, export."""
    _STATE["verbose"], _STATE["log_format"] = verbose, log_format


@app.command()
def embed(data: Annotated[Path, typer.Option("--data", help="Data directory.")],
          out: OutOpt = Path("artifacts"), config: ConfigOpt = None, set_: SetOpt = None,
          engine: EngineOpt = None, verify: VerifyOpt = False, quiet: QuietOpt = False,
          verbose: VerboseOpt = 0) -> None:
    """The embedding job alone: frozen per-modality embeddings into ART/embeddings/ (incremental)."""
    _setup_logging(quiet, verbose)
    try:
        cfg = _config(config, set_, engine)
        report = jobs.run_embed(_data_dir(data), out, cfg, show_progress=_progress_shown(quiet), verify=verify)
    except FusionrecError as exc:
        _fail(exc)
    _print_embed(report)


@app.command()
def index(data: Annotated[Path, typer.Option("--data", help="Data directory.")],
          out: OutOpt = Path("artifacts"), config: ConfigOpt = None, set_: SetOpt = None,
          quiet: QuietOpt = False, verbose: VerboseOpt = 0) -> None:
    """Fusion, user vectors and the FAISS index; writes ART/index/ and ART/candidates.parquet."""
    _setup_logging(quiet, verbose)
    try:
        summary = jobs.run_index(_data_dir(data), out, _config(config, set_))
    except FusionrecError as exc:
        _fail(exc)
    _print_index(summary)


def _print_index(summary: dict) -> None:
    rows = [{"table": m, "weight": round(w, 3)} for m, w in summary["weights"].items()]
    _print_table(f"fusion ({summary['fusion']}) and index ({summary['index'].get('type', '')})", rows,
                 ["table", "weight"])


@app.command()
def train(out: OutOpt = Path("artifacts"), data: DataOpt = None, config: ConfigOpt = None, set_: SetOpt = None,
          quiet: QuietOpt = False, verbose: VerboseOpt = 0) -> None:
    """Train the LightGBM ranker on later label windows; writes ART/ranker/ (model text + features)."""
    _setup_logging(quiet, verbose)
    try:
        cfg = _config(config, set_)
        if data is not None:
            jobs.run_index(_data_dir(data), out, cfg)
        summary = jobs.run_train(out, cfg)
    except FusionrecError as exc:
        _fail(exc)
    _print_train(summary)


def _print_embed(report: EmbedReport) -> None:
    _print_table("embeddings", summary_rows(report),
                 ["table", "rows", "encoded", "reused", "resumed", "failed", "dropped", "seconds", "items_per_s"])


def _print_train(summary: dict) -> None:
    # Every labelled row trains the ranker and is scored out of fold by the guard: one count.
    rows = [{"stage": "training rows (scored out of fold)", "value": summary["train_rows"]},
            {"stage": "rounds", "value": summary["best_iteration"]}]
    for name, value in (summary.get("valid_ndcg@10") or {}).items():
        rows.append({"stage": f"validation NDCG@10, {name}", "value": value})
    if summary.get("order"):
        rows.append({"stage": "shipped order", "value": summary["order"]})
    if "valid_rmse" in summary:
        rows.append({"stage": "validation RMSE", "value": round(summary["valid_rmse"], 4)})
    _print_table("ranker", rows, ["stage", "value"])


PseudoOpt = Annotated[Optional[bool], typer.Option("--pseudonymise/--raw-ids",
                                                   help="Replace user ids by a keyed hash (default: export.pseudonymise).")]


@app.command()
def recommend(out: OutOpt = Path("artifacts"),
              k: Annotated[Optional[int], typer.Option("--k", min=1, help="Items per user (default: export.k).")] = None,
              export: Annotated[Optional[Path], typer.Option(
                  "--export", help="Output file: .parquet, .csv or .jsonl, or - for standard output as JSON lines (default: OUT/exports/topk.parquet).")] = None,
              users: Annotated[Optional[Path], typer.Option("--users", help="Table with a user_id column; default all users.")] = None,
              explain: Annotated[bool, typer.Option("--explain/--no-explain", help="Add the top features and each feature group's share.")] = False,
              include_seen: Annotated[bool, typer.Option("--include-seen/--exclude-seen", help="Keep items the user already has.")] = False,
              pseudonymise: PseudoOpt = None, config: ConfigOpt = None, set_: SetOpt = None,
              engine: EngineOpt = None, quiet: QuietOpt = False, verbose: VerboseOpt = 0) -> None:
    """Top-k per user from the trained artifacts, exported to a file."""
    _setup_logging(quiet, verbose)
    try:
        cfg = _config(config, set_, engine)
        wanted = read_users(users) if users is not None else None
        target = export if export is not None else out / "exports" / "topk.parquet"
        recs, path = jobs.run_recommend(out, target, cfg, users=wanted, k=k, explain=explain,
                                        exclude_seen=not include_seen, pseudonymise_ids=pseudonymise)
    except FusionrecError as exc:
        _fail(exc)
    log.info("wrote %d rows for %d users to %s", recs.height, recs["user_id"].n_unique(), path)


@app.command()
def score(out: OutOpt = Path("artifacts"),
          candidates: Annotated[Path, typer.Option("--candidates", help="File with user_id, item_id pairs.")] = _REQUIRED,
          export: Annotated[Path, typer.Option("--export", help="Output file: .parquet, .csv or .jsonl, or - for standard output as JSON lines.")] = _REQUIRED,
          explain: Annotated[bool, typer.Option("--explain/--no-explain", help="Add the top features and each feature group's share.")] = False,
          pseudonymise: PseudoOpt = None, config: ConfigOpt = None, set_: SetOpt = None,
          quiet: QuietOpt = False, verbose: VerboseOpt = 0) -> None:
    """Score given (user_id, item_id) pairs; adds `score`, `source` and the candidate features (src_*, retrieval_*).
    Unknown users get cold features; unknown items an empty score."""
    _setup_logging(quiet, verbose)
    try:
        cfg = _config(config, set_)
        scored, path = jobs.run_score(out, candidates, export, cfg, explain=explain, pseudonymise_ids=pseudonymise)
    except FusionrecError as exc:
        _fail(exc)
    log.info("scored %d pairs into %s", scored.height, path)


@app.command()
def evaluate(out: OutOpt = Path("artifacts"),
             test: Annotated[Path, typer.Option("--test", help="Held-out interactions (interactions format).")] = _REQUIRED,
             k: Annotated[str, typer.Option("--k", help="Cut-offs, comma-separated.")] = "10,20",
             report: Annotated[Optional[Path], typer.Option("--report", help="Write an HTML report here.")] = None,
             baselines: Annotated[bool, typer.Option("--baselines/--no-baselines", help="Also evaluate popularity, item-kNN and retrieval alone.")] = True,
             relevance: Annotated[str, typer.Option(
                 "--relevance", help="Ratings: held-out rows with a value below this are not relevant. auto: the "
                                     "threshold the sources learned with (sources.relevance; 4 on a 1-5 scale) "
                                     "when the rows have values; all: every held-out pair.")] = "auto",
             quiet: QuietOpt = False, verbose: VerboseOpt = 0) -> None:
    """Metrics of the current artifacts against held-out interactions (and baselines beside them)."""
    _setup_logging(quiet, verbose)
    try:
        ks = tuple(int(x) for x in k.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(f"--k must be comma-separated integers, got {k!r}", param_hint="--k") from None
    if not ks or min(ks) < 1:
        raise typer.BadParameter(f"--k needs positive cut-offs, got {k!r}", param_hint="--k")
    try:
        threshold = parse_relevance(relevance)  # before the artifacts are opened
        with ReadLock(out):  # a reader: no writer changes the artifacts meanwhile
            table = run_evaluate(out, test, ks, report=report, baselines=baselines, relevance=threshold,
                                 rec=jobs.open_recommender(out))
    except FusionrecError as exc:
        _fail(exc)
    cols = ["model"] + [c for c in table[0] if c != "model"]
    _print_table("evaluation", table, cols)


@app.command()
def run(data: DataOpt = None, out: OutOpt = Path("artifacts"), config: ConfigOpt = None, set_: SetOpt = None,
        engine: EngineOpt = None, verify: VerifyOpt = False, quiet: QuietOpt = False, verbose: VerboseOpt = 0) -> None:
    """The whole nightly job: embed, index, train, recommend for every user, export ART/exports/topk.parquet."""
    _setup_logging(quiet, verbose)
    try:
        cfg = _config(config, set_, engine)
        night = jobs.run_nightly(_data_dir(data), out, cfg, show_progress=_progress_shown(quiet), verify=verify)
    except FusionrecError as exc:
        _fail(exc)
    _print_embed(night.embed)
    _print_index(night.index)
    _print_train(night.train)
    _print_table("nightly job", [{"stage": s, "seconds": round(t, 2)} for s, t in night.timings.items()]
                 + [{"stage": "total", "seconds": round(sum(night.timings.values()), 2)}], ["stage", "seconds"])
    _console().print(f"exported {night.rows} rows for {night.users} users to {night.export}", highlight=False,
                     markup=False, soft_wrap=True)


class Protocol(str, Enum):
    user = "user"
    global_ = "global"
    leave_last = "leave-last"


class Media(str, Enum):
    link = "link"
    copy = "copy"


@app.command()
def split(data: Annotated[Path, typer.Option("--data", help="Data directory to split.")],
          out: Annotated[Path, typer.Option("--out", help="New folder: OUT/train (a data directory) and "
                                                          "OUT/held_out.csv.")],
          protocol: Annotated[Protocol, typer.Option(
              "--protocol", help="user: each user's latest share; global: one time cut-off for all; "
                                 "leave-last: each user's last interaction.")] = Protocol.user,
          test_fraction: Annotated[float, typer.Option("--test-fraction",
                                                       help="Share held out, in (0, 1) (user, global).")] = 0.2,
          media: Annotated[Media, typer.Option("--media", help="Media files hard-linked (copied across file "
                                                               "systems) or copied.")] = Media.link,
          seed: Annotated[int, typer.Option("--seed", help="Orders interactions with equal timestamps.")] = 0,
          quiet: QuietOpt = False, verbose: VerboseOpt = 0) -> None:
    """Hold out interactions for `evaluate`: writes a train data directory and a held-out file."""
    _setup_logging(quiet, verbose)
    try:
        summary = split_data_dir(data, out, protocol=protocol.value, test_fraction=test_fraction,
                                 media=media.value, seed=seed)
    except FusionrecError as exc:
        _fail(exc)
    _print_table(f"split ({summary.protocol})", summary.rows(), ["table", "value"])
    log.info("next: fusionrec run --data %s --out ART, then fusionrec evaluate --out ART --test %s",
             summary.train_dir, summary.held_out)


@app.command()
def doctor(data: DataOpt = None, out: OutOpt = Path("artifacts"), config: ConfigOpt = None, set_: SetOpt = None,
           engine: EngineOpt = None, quiet: QuietOpt = False, verbose: VerboseOpt = 0) -> None:
    """Check the install (libraries, weights, CUDA), a data directory and free disk; say what a run would do."""
    _setup_logging(quiet, verbose)
    try:
        cfg = _config(config, set_, engine)
    except FusionrecError as exc:
        _fail(exc)
    results = doctor_checks(cfg, out, data)
    _print_table(f"fusionrec doctor ({version_text()})", [c.as_dict() for c in results], ["check", "status", "detail"])
    failed = [c.name for c in results if c.status == "fail"]
    if not quiet and not failed:  # a plan for a run that would stop at a failed check misleads
        steps = doctor_plan(cfg, out, data)
        if _STATE["log_format"] == LogFormat.json:
            log.info("a run would: %s", "; ".join(steps))  # one JSON line
        else:
            _console(stderr=True).print("a run would:\n  " + "\n  ".join(steps),
                                        highlight=False, markup=False, soft_wrap=True)
    if failed:
        _error_line(f"{len(failed)} check(s) failed: {', '.join(failed)}")
        raise typer.Exit(1)


DEBUG_ENV = "FUSIONREC_DEBUG"  # 1: an unexpected failure shows its traceback
INTERRUPTED = 130  # 128 + SIGINT, as shells report it (SIGTERM: 143, interrupts.exit_code)
INTERRUPTED_MESSAGE = ("interrupted (Ctrl-C): finished work is kept (committed shards, written artifacts, "
                       "the previous export); a rerun resumes")


def _interrupted() -> None:
    """The one line of a job stopped by Ctrl-C, SIGTERM or SIGHUP, and its exit status (130, 143 or 129)."""
    _error_line(INTERRUPTED_MESSAGE.replace("Ctrl-C", interrupts.reason(), 1))
    sys.exit(interrupts.exit_code())


def crash_log_path() -> Path:
    """Where an unexpected failure's traceback is written (FUSIONREC_CRASH_DIR, else the temp dir)."""
    import os
    import tempfile

    folder = Path(os.environ.get("FUSIONREC_CRASH_DIR") or tempfile.gettempdir())
    return folder / f"fusionrec-crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


def main(args: list[str] | None = None) -> None:
    """The `fusionrec` entry point, the last line of defence: an unexpected exception ends
    with exit 1, one line naming it and a log file holding its traceback (shown with
    FUSIONREC_DEBUG=1); usage errors exit 2 (click), bad input 2, known failures 1."""
    import os
    import traceback

    # lightgbm without its scikit-learn API, which no command uses (ranker.model.SKLEARN_ENV).
    os.environ.setdefault("FUSIONREC_LIGHTGBM_SKLEARN", "0")
    interrupts.install()
    try:
        app(args=args, prog_name="fusionrec")
    except SystemExit as done:
        # typer turns Ctrl-C (and SIGTERM, raised as one) into a silent exit 130: say what happened and what was kept.
        if done.code == INTERRUPTED or interrupts.requested():
            _interrupted()
        raise
    except FusionrecError as exc:  # commands handle their own; this one escaped
        _error_line(str(exc))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _interrupted()
    except BaseException as exc:  # noqa: BLE001 - the last line of defence
        text = "".join(traceback.format_exception(exc))
        if os.environ.get(DEBUG_ENV, "").strip() not in ("", "0"):
            print(text, file=sys.stderr, end="")
            sys.exit(1)
        where = "the traceback could not be saved"
        try:
            path = crash_log_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"fusionrec {' '.join(sys.argv[1:] if args is None else args)}\n{text}")
            where = f"traceback in {path}"
        except OSError:
            pass
        first = first_line(exc, empty="")
        _error_line(f"unexpected {type(exc).__name__}: {first} ({where}; {DEBUG_ENV}=1 shows it)")
        sys.exit(1)


if __name__ == "__main__":
    main()
