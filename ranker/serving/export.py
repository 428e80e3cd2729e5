"""Top-k lists and pair files: ranking per user, writing and reading Parquet, CSV and JSONL.

Formats are chosen by suffix: `.parquet`, `.csv`, `.jsonl`; `-` is standard output, as JSON
lines. Every write to a file is atomic.
CSV has no nested types: list and struct columns (such as `top_features` from
`--explain`) are written as JSON text in their cell, and `read_topk` decodes them back.
Parquet and JSONL keep them nested. `read_topk` restores the standard column types
(TOPK_SCHEMA), so all three formats read back as the same frame.

The rows that errors name are 1-based data rows, as for the data tables (pipeline.io.tables):
a CSV's header is line 1, so its data row N is line N+1; a JSON lines file has no header, so
its row N is line N. That holds because a blank line before a row is refused (`_blank_line`):
polars skips it, and every row after it would be named one line early. Blank lines at the
end hold no row and shift none: they are accepted.
"""

from __future__ import annotations

import codecs
import io
import json
import mmap
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from fusionrec.pipeline.errors import FusionrecError, InputError, first_line
from fusionrec.pipeline.io.storage import atomic_path
from fusionrec.pipeline.io.tables import csv_header, locate_csv_problem

if TYPE_CHECKING:
    from fusionrec.ranker.model import Ranker

FORMATS = (".parquet", ".csv", ".jsonl")
STDOUT = "-"  # an export to standard output, as JSON lines (for a pipe; logs stay on stderr)
TOPK_SCHEMA: dict[str, pl.DataType] = {
    "user_id": pl.String(), "rank": pl.Int32(), "item_id": pl.String(),
    "score": pl.Float64(), "retrieval_score": pl.Float32(), "source": pl.String(),
}
# Which list a row's `score` comes from (the `source` column): the ranker's order, the blend of
# the candidate sources, a user without history placed by their own content, or popularity.
SOURCES = ("ranker", "retrieval", "content", "popular")
TOP_FEATURES_DTYPE = pl.List(pl.Struct({"feature": pl.String, "value": pl.Float64, "contribution": pl.Float64}))
# Columns whose type is known when read back from text formats.
KNOWN_DTYPES: dict[str, pl.DataType] = {**TOPK_SCHEMA, "top_features": TOP_FEATURES_DTYPE,
                                        "explain_bias": pl.Float64(), "rerank": pl.String()}
EXPLAIN_PREFIXES = ("contrib_", "share_")
# Nested columns `read_topk` decodes from CSV JSON text (a CSV cell carries no type, so
# only columns of known type are decoded; any other nested column reads back as JSON text).
JSON_COLUMNS_IN_CSV = ("top_features",)


def _format(path: Path) -> str:
    suffix = path.suffix.lower()
    if path.is_dir():
        raise InputError("is a folder: give the export a file name ending in .parquet, .csv or .jsonl",
                         file=str(path))
    if suffix not in FORMATS:
        raise InputError(f"unsupported format '{path.suffix or '(none)'}': use .parquet, .csv or .jsonl",
                         file=str(path))
    return suffix


def topk(scored: pl.DataFrame, k: int, *, columns: list[str] | None = None) -> pl.DataFrame:
    """The `k` best rows per user: user_id, rank (1-based), item_id, score, retrieval_score, source, extras.

    Order: score descending (nulls last), ties by retrieval_score descending, then item_id
    ascending, so the output does not depend on the input order. Users come sorted by user_id. `columns`: extra columns
    to keep (default: the explanation columns present). `source` is null where `scored` has none.
    """
    if k < 1:
        raise InputError(f"k must be at least 1, not {k}", field="k")
    for column in ("user_id", "item_id", "score"):
        if column not in scored.columns:
            raise FusionrecError(f"cannot rank: the scored frame has no '{column}' column")
    if columns is None:
        columns = [c for c in scored.columns
                   if c in ("top_features", "explain_bias") or c.startswith(EXPLAIN_PREFIXES)]
    frame = scored
    if "retrieval_score" not in frame.columns:
        frame = frame.with_columns(pl.lit(None, pl.Float32).alias("retrieval_score"))
    if "source" not in frame.columns:
        frame = frame.with_columns(pl.lit(None, pl.String).alias("source"))
    ranked = frame.sort(["user_id", "score", "retrieval_score", "item_id"], descending=[False, True, True, False],
                        nulls_last=True) \
        .with_columns((pl.int_range(pl.len()).over("user_id") + 1).cast(pl.Int32).alias("rank")) \
        .filter(pl.col("rank") <= k)
    return ranked.select(
        pl.col("user_id").cast(pl.String), "rank", pl.col("item_id").cast(pl.String),
        pl.col("score").cast(pl.Float64), pl.col("retrieval_score").cast(pl.Float32), pl.col("source").cast(pl.String),
        *[c for c in columns if c not in TOPK_SCHEMA])


def recommend(model: Ranker, features: pl.DataFrame, k: int, *, explain: bool = False,
              top: int = 5) -> pl.DataFrame:
    """Score every candidate, keep the `k` best per user; with `explain`, add the explanation columns.

    Explanations (TreeSHAP, about a millisecond per row for 300 trees) are computed for
    the kept rows only, never for every candidate.
    """
    best = topk_scored(model, features, k)
    if not explain:
        return best.select(list(TOPK_SCHEMA))
    return pl.concat([best.select(list(TOPK_SCHEMA)), model.explain(best, top=top)], how="horizontal")


def topk_scored(model: Ranker, features: pl.DataFrame, k: int) -> pl.DataFrame:
    """The ranker's `k` best rows per user, their features kept (for explanations), `source` "ranker"."""
    scored = model.score(features).with_columns(pl.lit("ranker").alias("source"))
    kept = [c for c in model.feature_names_ if c in scored.columns and c not in TOPK_SCHEMA]
    return topk(scored, k, columns=kept)


# Spreadsheets run a cell that begins with one of these as a formula (OWASP, CSV injection).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
ESCAPE = "'"


def is_stdout(path: Path | str) -> bool:
    """Whether `path` names standard output (`-`)."""
    return str(path) == STDOUT


def check_export_target(path: Path | str, art_dir: Path | str) -> None:
    """Refuse an export that would land on the artifacts' own files (the data snapshot, an
    index, the manifest, the key ...): inside ART only ART/exports/ may be written. (New files
    at ART's top level were accepted, and the same command refused the next night, the file then
    being there: one rule for both nights.)"""
    if is_stdout(path):
        return
    art = Path(art_dir).resolve()
    target = Path(path).resolve()
    if not target.is_relative_to(art):
        return
    parts = target.relative_to(art).parts
    if not parts or parts[0] != "exports":
        raise InputError(f"the export would land among the artifacts' own files ({path}); inside the artifacts "
                         f"directory only {Path(art_dir) / 'exports'} takes exports: write it there or outside",
                         file=str(path))


def escape_formulas(frame: pl.DataFrame) -> pl.DataFrame:
    """Text cells that begin with =, +, -, @, tab or CR prefixed with a ' (shown, never run)."""
    text = [c for c, t in frame.schema.items() if t == pl.String]
    if not text:
        return frame
    starts = "|".join(re_escape(c) for c in FORMULA_START)
    return frame.with_columns(
        pl.when(pl.col(c).str.contains(f"^(?:{starts})")).then(ESCAPE + pl.col(c)).otherwise(pl.col(c)).alias(c)
        for c in text)


def re_escape(char: str) -> str:
    import re

    return re.escape(char)


def write_topk(frame: pl.DataFrame, path: Path | str, *, raw: bool = False) -> Path:
    """Write `frame` as Parquet, CSV or JSONL by the suffix of `path`, atomically.

    CSV text cells that a spreadsheet would run as a formula are escaped with a leading '
    unless `raw`; `read_topk` removes the escape again.
    """
    if is_stdout(path):  # a pipe has no atomic write: a reader sees whole lines only
        sys.stdout.write(frame.write_ndjson())
        sys.stdout.flush()
        return Path(STDOUT)
    path = Path(path)
    fmt = _format(path)
    with atomic_path(path) as tmp:
        if fmt == ".parquet":
            frame.write_parquet(tmp, compression="zstd")
        elif fmt == ".csv":
            ready = _csv_ready(frame)
            (ready if raw else escape_formulas(ready)).write_csv(tmp)
        else:
            frame.write_ndjson(tmp)
    return path


def _csv_ready(frame: pl.DataFrame) -> pl.DataFrame:
    """Nested columns as JSON text (null stays null)."""
    nested = [c for c, t in frame.schema.items() if t.is_nested()]
    if not nested:
        return frame
    exprs = []
    for c in nested:
        # json_encode works on structs: wrap the column, then cut the wrapper off the text.
        prefix = '{' + json.dumps(c) + ':'
        text = pl.struct(pl.col(c)).struct.json_encode().str.strip_prefix(prefix).str.strip_suffix("}")
        exprs.append(pl.when(pl.col(c).is_null()).then(None).otherwise(text).alias(c))
    return frame.with_columns(exprs)


def read_topk(path: Path | str) -> pl.DataFrame:
    """Read a list written by `write_topk` back with the same column types."""
    path = Path(path)
    fmt = _format(path)
    if fmt == ".jsonl" and path.is_file() and not path.read_bytes().strip():
        return pl.DataFrame(schema=TOPK_SCHEMA)  # an empty list is an empty JSONL file: no line to infer from
    frame = _read(path, fmt, string_ids=True)
    if path.suffix.lower() == ".csv":
        frame = _unescape_formulas(frame)
        for c in frame.columns:
            if c in JSON_COLUMNS_IN_CSV and frame.schema[c] == pl.String:
                frame = frame.with_columns(pl.col(c).str.json_decode(KNOWN_DTYPES[c]))
    casts = [pl.col(c).cast(t) for c, t in KNOWN_DTYPES.items() if c in frame.columns and frame.schema[c] != t]
    floats = [pl.col(c).cast(pl.Float64) for c, t in frame.schema.items()
              if c.startswith(EXPLAIN_PREFIXES) and t != pl.Float64]
    return frame.with_columns(casts + floats) if casts or floats else frame


def _unescape_formulas(frame: pl.DataFrame) -> pl.DataFrame:
    starts = "|".join(re_escape(c) for c in FORMULA_START)
    text = [c for c, t in frame.schema.items() if t == pl.String]
    return frame.with_columns(
        pl.when(pl.col(c).str.contains(f"^'(?:{starts})")).then(pl.col(c).str.slice(1)).otherwise(pl.col(c)).alias(c)
        for c in text) if text else frame


def read_pairs(path: Path | str) -> pl.DataFrame:
    """The `user_id, item_id` pairs of a candidates file (other columns kept), ids as strings.

    A missing file, an unknown format, a missing id column, an empty id or a file without
    pairs is bad input (`InputError`, exit 2) naming the file, the row (1-based data row) and
    the field.
    """
    path = Path(path)
    frame = read_id_table(path, ("user_id", "item_id"))
    frame = frame.with_columns(pl.col("user_id", "item_id").cast(pl.String).str.strip_chars())
    for column in ("user_id", "item_id"):
        bad = frame[column].is_null() | (frame[column] == "")
        if bad.any():
            row = int(bad.arg_true()[0]) + 1
            raise InputError("empty id", file=str(path), row=row, field=column)
    if frame.height == 0:  # an empty export would replace the last one with nothing
        raise InputError("no pairs: the file has a header but no rows", file=str(path))
    return frame


def read_id_table(path: Path | str, required: tuple[str, ...]) -> pl.DataFrame:
    """A .parquet, .csv or .jsonl table with ids read as text; a missing file, unknown format
    or missing `required` column is bad input (`InputError`) naming the file and the field."""
    path = Path(path)
    fmt = _format(path)
    if not path.is_file():
        raise InputError("no such file", file=str(path))
    frame = _read(path, fmt, string_ids=True)
    for column in required:
        if column not in frame.columns:
            raise InputError(f"missing required column '{column}' (columns: {', '.join(frame.columns) or 'none'})",
                             file=str(path), field=column)
        dtype = frame.schema[column]
        if dtype.is_nested() or dtype == pl.Object:  # a list or struct of ids is not an id
            raise InputError(f"ids must be text or numbers, not {dtype}", file=str(path), field=column)
    return frame


def _read(path: Path, fmt: str, *, string_ids: bool) -> pl.DataFrame:
    ids = {"user_id": pl.String, "item_id": pl.String} if string_ids else {}
    try:
        if fmt == ".parquet":
            return pl.read_parquet(path)
        if fmt == ".csv":
            # A column named twice would be read under another name and go unread, as in the data tables.
            with open(path, encoding="utf-8-sig", errors="replace", newline="") as fh:
                csv_header(fh, path)
            # Ids stay text ("007" is not 7); empty cells are null.
            return pl.read_csv(path, schema_overrides=ids, infer_schema_length=10_000, raise_if_empty=True)
        source: Path | io.BytesIO = path
        if _blank_line(path):  # a byte-order mark, as a CSV's: accepted (polars' reader refuses it)
            with open(path, "rb") as fh:
                fh.seek(len(codecs.BOM_UTF8))
                source = io.BytesIO(fh.read())  # one copy: BytesIO shares the bytes read
        frame = pl.read_ndjson(source, infer_schema_length=10_000)
        return frame.with_columns(pl.col(c).cast(pl.String) for c in ids if c in frame.columns)
    except pl.exceptions.NoDataError:
        raise InputError("the file is empty", file=str(path)) from None
    except FileNotFoundError:
        raise InputError("no such file", file=str(path)) from None
    except (pl.exceptions.PolarsError, OSError) as exc:
        first = first_line(exc)
        row = field = reason = None
        if fmt == ".csv":  # polars does not say which row: the data tables' locator does
            try:
                row, field, reason = locate_csv_problem(path.read_bytes().decode("utf-8-sig"))
            except (OSError, UnicodeDecodeError):
                pass
        elif fmt != ".parquet":
            row, reason = _locate_json_lines_problem(path)
        raise InputError(f"cannot read the file: {reason or first}", file=str(path), row=row, field=field) from None


def _locate_json_lines_problem(path: Path) -> tuple[int | None, str | None]:
    """The first line (its row) that is not one JSON object, and why; (None, None) when every
    line is (the problem is elsewhere, such as a value's type changing between rows). Only on
    the error path, line by line: polars names a character offset, not a row."""
    try:
        with open(path, encoding="utf-8-sig") as fh:
            for line_number, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as exc:
                    return line_number, f"not valid JSON: {exc.msg} at character {exc.pos + 1} of the line"
                if not isinstance(value, dict):
                    return line_number, f"a JSON {type(value).__name__}, not an object of column: value"
    except (OSError, UnicodeDecodeError) as exc:
        return None, first_line(exc)
    return None, None


_BLANK_LINE = re.compile(rb"^[ \t\r]*\n", re.MULTILINE)  # what polars' JSON lines reader skips
_NOT_BLANK = re.compile(rb"[^ \t\r\n]")


def _blank_line(path: Path) -> bool:
    """Refuse a JSON lines file with a blank line before a row (naming the line: its row), or
    with nothing but blank lines (an empty file); otherwise say whether it starts with a UTF-8
    byte-order mark. Searched in a memory map: a pairs file can be large, and only an error
    needs the line counted."""
    if path.stat().st_size == 0:
        return False  # polars: "the file is empty"
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if _NOT_BLANK.search(data) is None:
            raise InputError("the file is empty (blank lines only)", file=str(path))
        blank = _BLANK_LINE.search(data)
        if blank is None or _NOT_BLANK.search(data, blank.end()) is None:
            return data[:len(codecs.BOM_UTF8)] == codecs.BOM_UTF8  # no blank line, or only after the last row
        line = data[:blank.start()].count(b"\n") + 1
    raise InputError("a blank line before a row: a JSON lines file holds one JSON object on each line, and "
                     "errors name a row by its line; delete the blank line", file=str(path), row=line)


def drop_seen(pairs: pl.DataFrame, interactions: pl.DataFrame, cutoff: int | None = None) -> pl.DataFrame:
    """Pairs whose user had not interacted with the item (before `cutoff` when given)."""
    seen = interactions if cutoff is None else interactions.filter(pl.col("timestamp") < cutoff)
    return pairs.join(seen.select(pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String)).unique(),
                      on=["user_id", "item_id"], how="anti", maintain_order="left")
