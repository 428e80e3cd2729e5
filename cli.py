"""fusionrec: the command line (typer).

Exit status: 0 on success, 2 on bad usage or bad input (the message names the file, the
row and the field), 1 on any other failure.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from fusionrec import jobs
from fusionrec.evaluation.offline import run_evaluate
from fusionrec.pipeline.config import Config, load_config
from fusionrec.pipeline.embedding.job import summary_rows
from fusionrec.pipeline.errors import FusionrecError
from fusionrec.pipeline.io.manifest import RunRecord
from fusionrec.ranker.serving.export import read_pairs
from fusionrec.ranker.serving.recommender import Recommender, read_users

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Offline two-stage multimodal recommender: embed, fuse and index, rank, export.")
log = logging.getLogger("fusionrec")


DataOpt = Annotated[Optional[Path], typer.Option("--data", help="Data directory (items, users, interactions).")]
OutOpt = Annotated[Path, typer.Option("--out", help="Artifacts directory.")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="TOML config file.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Config override, e.g. embed.text.batch_size=32 (repeatable).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars; warnings and errors only.")]
EngineOpt = Annotated[Optional[str], typer.Option("--engine", help="local or ray (default: the config's engine).")]


def _setup_logging(quiet: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(show_path=False, show_time=False, console=_console(stderr=True))],
                        force=True)


def _console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Piped output (logs, CI) gets wide tables instead of rich's 80-column default.
    return Console(stderr=stderr, width=None if stream.isatty() else 200)


def _config(path: Path | None, overrides: list[str] | None, engine: str | None = None) -> Config:
    extra = [f"engine={engine}"] if engine else []
    cfg = load_config(path, [*(overrides or []), *extra])
    jobs.check_engine(cfg)
    return cfg


def _data_dir(data: Path | None) -> Path:
    if data is not None:
        if not data.is_dir():
            raise typer.BadParameter(f"data directory {data} does not exist", param_hint="--data")
        return data
    for candidate in (jobs.sample_data_dir(), Path("data")):
        if (candidate / "items.csv").is_file() or (candidate / "items.parquet").is_file():
            return candidate
    raise typer.BadParameter("no --data given and no sample data/ found", param_hint="--data")


def _fail(exc: FusionrecError) -> None:
    _console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(exc.exit_code)


def _print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column in ("table", "stage") else "right")
    for row in rows:
        table.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in columns))
    _console().print(table)


@app.callback()
def _root() -> None:
    """Offline two-stage multimodal recommender: embed, fuse and index, rank, export."""


@app.command()
def embed(data: Annotated[Path, typer.Option("--data", help="Data directory.")],
          out: OutOpt = Path("artifacts"), config: ConfigOpt = None, set_: SetOpt = None,
          engine: EngineOpt = None, quiet: QuietOpt = False) -> None:
    """The embedding job alone: frozen per-modality embeddings into ART/embeddings/ (incremental)."""
    _setup_logging(quiet)
    try:
        cfg = _config(config, set_, engine)
        report = jobs.run_embed(_data_dir(data), out, cfg, show_progress=not quiet)
    except FusionrecError as exc:
        _fail(exc)
    _print_table("embeddings", summary_rows(report),
                 ["table", "rows", "encoded", "reused", "resumed", "failed", "dropped", "seconds", "items_per_s"])


@app.command()
def index(data: Annotated[Path, typer.Option("--data", help="Data directory.")],
          out: OutOpt = Path("artifacts"), config: ConfigOpt = None, set_: SetOpt = None,
          quiet: QuietOpt = False) -> None:
    """Fusion, user vectors and the FAISS index; writes ART/index/ and ART/candidates.parquet."""
    _setup_logging(quiet)
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
          quiet: QuietOpt = False) -> None:
    """Train the LightGBM ranker on later label windows; writes ART/ranker/ (model text + features)."""
    _setup_logging(quiet)
    try:
        cfg = _config(config, set_)
        if data is not None:
            jobs.run_index(_data_dir(data), out, cfg)
        summary = jobs.run_train(out, cfg)
    except FusionrecError as exc:
        _fail(exc)
    _print_train(summary)


def _print_train(summary: dict) -> None:
    rows = [{"stage": "train rows", "value": summary["train_rows"]},
            {"stage": "validation rows", "value": summary["valid_rows"]},
            {"stage": "best iteration", "value": summary["best_iteration"]}]
    for name, value in (summary.get("valid_ndcg@10") or {}).items():
        rows.append({"stage": f"validation NDCG@10, {name}", "value": value})
    if "valid_rmse" in summary:
        rows.append({"stage": "validation RMSE", "value": round(summary["valid_rmse"], 4)})
    _print_table("ranker", rows, ["stage", "value"])


PseudoOpt = Annotated[Optional[bool], typer.Option("--pseudonymise/--raw-ids",
                                                   help="Replace user ids by a keyed hash (default: export.pseudonymise).")]


@app.command()
def recommend(out: OutOpt = Path("artifacts"),
              k: Annotated[int, typer.Option("--k", min=1, help="Items per user.")] = 10,
              export: Annotated[Path, typer.Option("--export", help="Output file: .parquet, .csv or .jsonl.")] = Path("artifacts/exports/topk.parquet"),
              users: Annotated[Optional[Path], typer.Option("--users", help="Table with a user_id column; default all users.")] = None,
              explain: Annotated[bool, typer.Option("--explain", help="Add top features and each modality's share.")] = False,
              include_seen: Annotated[bool, typer.Option("--include-seen", help="Keep items the user already has.")] = False,
              pseudonymise: PseudoOpt = None, config: ConfigOpt = None, set_: SetOpt = None,
              engine: EngineOpt = None, quiet: QuietOpt = False) -> None:
    """Top-k per user from the trained artifacts, exported to a file."""
    _setup_logging(quiet)
    try:
        cfg = _config(config, set_, engine)
        wanted = read_users(users) if users is not None else None
        recs, path = jobs.run_recommend(out, export, cfg, users=wanted, k=k, explain=explain,
                                        include_seen=include_seen, pseudonymise_ids=pseudonymise)
    except FusionrecError as exc:
        _fail(exc)
    log.info("wrote %d rows for %d users to %s", recs.height, recs["user_id"].n_unique(), path)


@app.command()
def score(out: OutOpt = Path("artifacts"),
          candidates: Annotated[Path, typer.Option("--candidates", help="File with user_id, item_id pairs.")] = ...,
          export: Annotated[Path, typer.Option("--export", help="Output file: .parquet, .csv or .jsonl.")] = ...,
          explain: Annotated[bool, typer.Option("--explain", help="Add top features and each modality's share.")] = False,
          pseudonymise: PseudoOpt = None, config: ConfigOpt = None, set_: SetOpt = None,
          quiet: QuietOpt = False) -> None:
    """Score given (user_id, item_id) pairs; adds `score`. Unknown ids get cold features."""
    _setup_logging(quiet)
    try:
        cfg = _config(config, set_)
        record = RunRecord("score", out, None, cfg.to_dict())
        pairs = read_pairs(candidates)
        scored = Recommender(out).score(pairs, explain=explain)
        path = jobs.export_topk(scored, export, out, cfg, pseudonymise)
        record.inputs = {"candidates": str(candidates)}
        record.counts = {"pairs": scored.height}
        record.extra = {"export": str(path)}
        record.finish("ok")
    except FusionrecError as exc:
        _fail(exc)
    log.info("scored %d pairs into %s", scored.height, path)


@app.command()
def evaluate(out: OutOpt = Path("artifacts"),
             test: Annotated[Path, typer.Option("--test", help="Held-out interactions (interactions format).")] = ...,
             k: Annotated[str, typer.Option("--k", help="Cut-offs, comma-separated.")] = "10,20",
             report: Annotated[Optional[Path], typer.Option("--report", help="Write an HTML report here.")] = None,
             baselines: Annotated[bool, typer.Option("--baselines/--no-baselines", help="Also evaluate popularity, item-kNN and retrieval alone.")] = True,
             quiet: QuietOpt = False) -> None:
    """Metrics of the current artifacts against held-out interactions (and baselines beside them)."""
    _setup_logging(quiet)
    try:
        ks = tuple(int(x) for x in k.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(f"--k must be comma-separated integers, got {k!r}", param_hint="--k") from None
    try:
        table = run_evaluate(out, test, ks, report=report, baselines=baselines)
    except FusionrecError as exc:
        _fail(exc)
    cols = ["model"] + [c for c in table[0] if c != "model"]
    _print_table("evaluation", table, cols)


@app.command()
def run(data: DataOpt = None, out: OutOpt = Path("artifacts"), config: ConfigOpt = None, set_: SetOpt = None,
        engine: EngineOpt = None, quiet: QuietOpt = False) -> None:
    """The whole nightly job: embed, index, train, recommend for every user, export ART/exports/topk.parquet."""
    _setup_logging(quiet)
    try:
        cfg = _config(config, set_, engine)
        night = jobs.run_nightly(_data_dir(data), out, cfg, show_progress=not quiet)
    except FusionrecError as exc:
        _fail(exc)
    _print_table("embeddings", summary_rows(night.embed),
                 ["table", "rows", "encoded", "reused", "resumed", "failed", "dropped", "seconds", "items_per_s"])
    _print_index(night.index)
    _print_train(night.train)
    _print_table("nightly job", [{"stage": s, "seconds": round(t, 2)} for s, t in night.timings.items()]
                 + [{"stage": f"exported {night.rows} rows for {night.users} users to {night.export}",
                     "seconds": round(sum(night.timings.values()), 2)}], ["stage", "seconds"])


def main() -> None:
    try:
        app()
    except FusionrecError as exc:  # pragma: no cover - commands handle their own
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
