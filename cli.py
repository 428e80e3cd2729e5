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

from pipeline.config import Config, load_config
from pipeline.errors import FusionrecError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Offline two-stage multimodal recommender: embed, fuse and index, rank, export.")
log = logging.getLogger("fusionrec")

PROJECT_DATA = Path(__file__).resolve().parent / "data"

DataOpt = Annotated[Optional[Path], typer.Option("--data", help="Data directory (items, users, interactions).")]
OutOpt = Annotated[Path, typer.Option("--out", help="Artifacts directory.")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="TOML config file.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Config override, e.g. embed.text.batch_size=32 (repeatable).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars; warnings and errors only.")]


def _setup_logging(quiet: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(show_path=False, show_time=False, console=_console(stderr=True))],
                        force=True)


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr)


def _config(path: Path | None, overrides: list[str] | None) -> Config:
    return load_config(path, overrides or [])


def _data_dir(data: Path | None) -> Path:
    if data is not None:
        if not data.is_dir():
            raise typer.BadParameter(f"data directory {data} does not exist", param_hint="--data")
        return data
    for candidate in (PROJECT_DATA, Path("data")):
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
          quiet: QuietOpt = False) -> None:
    """The embedding job alone: frozen per-modality embeddings into ART/embeddings/ (incremental)."""
    from pipeline.embed import run_embed, summary_rows

    _setup_logging(quiet)
    try:
        cfg = _config(config, set_)
        report = run_embed(_data_dir(data), out, cfg, show_progress=not quiet)
    except FusionrecError as exc:
        _fail(exc)
    _print_table("embeddings", summary_rows(report),
                 ["table", "rows", "encoded", "reused", "resumed", "failed", "dropped", "seconds", "items_per_s"])


def main() -> None:
    try:
        app()
    except FusionrecError as exc:  # pragma: no cover - commands handle their own
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
