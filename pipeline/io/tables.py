"""Reading and validating the input tables (items, users, interactions).

Each table is `DIR/<name>.parquet` or `DIR/<name>.csv`. A bad table raises
`InputError` naming the file, the row (1-based data row; for CSV the header is line 1,
so data row N is on line N+1) and the field.

CSV header names are trimmed of surrounding white space (like the ids in the cells), and a
header that names a column twice is refused (`csv_header`): the parser would keep the
second column under another name, so its data would silently go unread.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Literal, cast, overload

import polars as pl

from fusionrec.pipeline.errors import InputError, MediaError, first_line

TEXT_LIMIT = 1_000_000  # characters in one field; beyond this it is bad input, not a description
ITEM_TEXT_COLUMNS = ("title", "description", "tags", "image", "audio")
USER_TEXT_COLUMNS = ("text", "image", "audio")
DEFAULT_EVENT = "interact"


@overload
def find_table(data_dir: Path, name: str, *, required: Literal[True] = ...) -> Path: ...
@overload
def find_table(data_dir: Path, name: str, *, required: bool) -> Path | None: ...
def find_table(data_dir: Path, name: str, *, required: bool = True) -> Path | None:
    """The table's file: Parquet preferred over CSV when both exist."""
    data_dir = Path(data_dir)
    for suffix in (".parquet", ".csv"):
        path = data_dir / f"{name}{suffix}"
        if path.is_file():
            return path
    if required:
        raise InputError(f"no {name}.parquet or {name}.csv in the data directory", file=str(data_dir))
    return None


def read_table(path: Path) -> pl.DataFrame:
    """Read a Parquet or CSV table as is (CSV: every column as a string)."""
    path = Path(path)
    raw = b""
    try:
        if path.stat().st_size == 0:
            raise InputError("the file is empty", file=str(path))
        if path.suffix == ".parquet":
            return pl.read_parquet(path)
        raw = path.read_bytes()
        check_encoding(raw[:4], path)
        if raw.startswith(UTF8_BOM):  # Excel's "CSV UTF-8"
            raw = raw[len(UTF8_BOM):]
        _check_utf8(raw, path)
        names = csv_header(io.StringIO(raw.decode("utf-8"), newline=""), path)
        frame = pl.read_csv(raw, infer_schema=False, raise_if_empty=True, quote_char='"')
        return with_header_names(frame, names)
    except InputError:
        raise
    except pl.exceptions.NoDataError:
        raise InputError("the file has no header row", file=str(path)) from None
    except (pl.exceptions.ComputeError, pl.exceptions.PolarsError, OSError) as exc:
        first = first_line(exc)
        row, field, reason = (locate_csv_problem(raw.decode("utf-8")) if raw and path.suffix != ".parquet"
                              else (None, None, None))
        raise InputError(f"cannot parse the table: {reason or first}", file=str(path), row=row, field=field) from None


def csv_header(lines: Iterable[str], path: Path) -> list[str]:
    """The column names of a CSV's header row (`lines`: its text, from the start, BOM removed),
    trimmed of surrounding white space: the names the loader gives the columns.

    A name given twice (after trimming: "title" and " title" are one name) raises
    `InputError` naming the column. Empty names (the trailing commas of a spreadsheet) are
    not checked: no column is read by an empty name.
    """
    try:
        raw = next(csv.reader(lines), [])
    except csv.Error as exc:
        raise InputError(f"cannot parse the header row: {exc}", file=str(path)) from None
    names = [name.strip() for name in raw]
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        if not name:
            continue
        if name in first:
            j = first[name]
            spelled = f": {raw[j]!r} and {raw[i]!r}" if raw[j] != raw[i] else ""
            raise InputError(f"the header row names column {name!r} twice (columns {j + 1} and {i + 1}{spelled}); "
                             "rename or remove one", file=str(path), field=name)
        first[name] = i
    return names


def with_header_names(frame: pl.DataFrame, names: list[str]) -> pl.DataFrame:
    """`frame` (read by polars from a CSV) with the trimmed names of `csv_header`; columns with
    an empty name keep the parser's name."""
    if frame.width != len(names):  # the parsers disagree on the header: leave polars' reading
        return frame
    renames = {old: new for old, new in zip(frame.columns, names) if new and new != old}
    return frame.rename(renames) if renames else frame


def listed(columns: Iterable[str]) -> str:
    """Column names for a message, quoted so that stray spaces and invisible characters show."""
    return ", ".join(repr(c) for c in columns) or "none"


UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_32_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"),
                  (b"\xfe\xff", "UTF-16"))


def check_encoding(head: bytes, path: Path) -> None:
    """Refuse a CSV saved as UTF-16 or UTF-32 (Excel's "Unicode text"): tables are UTF-8."""
    for bom, name in _UTF16_32_BOMS:
        if head.startswith(bom):
            raise InputError(f"the file is {name} text; save it as UTF-8 (\"CSV UTF-8\")", file=str(path), row=None)
    if len(head) >= 2 and (head[0] == 0 or head[1] == 0) and path.suffix != ".parquet":
        raise InputError("the file looks like UTF-16 text without a byte order mark; save it as UTF-8",
                         file=str(path))


def _check_utf8(raw: bytes, path: Path) -> None:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        # Undecodable bytes become lone surrogates, which valid text never holds: find their cell.
        row, field = _first_cell(raw.decode("utf-8", errors="surrogateescape"),
                                 lambda cell: any("\udc80" <= ch <= "\udcff" for ch in cell))
        raise InputError(f"invalid UTF-8 at byte {exc.start} (line {line}); save the file as UTF-8 (a Latin-1 or "
                         "Windows-1252 file is not read)", file=str(path),
                         row=row if row is not None else max(line - 1, 0), field=field) from None


def _first_cell(text: str, bad) -> tuple[int | None, str | None]:
    """(data row, column name) of the first CSV cell for which `bad(cell)` holds."""
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader, [])
        for row, record in enumerate(reader, 1):
            for i, cell in enumerate(record):
                if bad(cell):
                    return row, header[i].strip() if i < len(header) else None
    except csv.Error:
        pass
    return None, None


def locate_csv_problem(text: str) -> tuple[int | None, str | None, str | None]:
    """Where and why a CSV the parser refused goes wrong: (data row, column name, reason), as far as known.

    Finds a stray quote (a quoted cell never closed, or text after its closing quote) and a
    record with more cells than the header.
    """
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    lines = text.splitlines()
    try:
        header = next(reader)
    except (csv.Error, StopIteration):
        return None, None, None
    row, start = 0, reader.line_num + 1
    try:
        for row, record in enumerate(reader, 1):
            if len(record) > len(header):
                return row, None, f"{len(record)} cells, but the header names {len(header)} columns"
            start = reader.line_num + 1
    except csv.Error:
        problem = _quote_problem(lines[start - 1]) if 0 < start <= len(lines) else None
        if problem is None:
            return row + 1, None, None
        column, reason = problem
        return row + 1, header[column].strip() if column < len(header) else None, reason
    return None, None, None


def _quote_problem(line: str) -> tuple[int, str] | None:
    """(index, reason) of the cell in `line` whose quotes are broken: never closed, or text after them."""
    column, i, n, at_start = 0, 0, len(line), True
    while i < n:
        if at_start and line[i] == '"':
            j = i + 1
            while True:
                k = line.find('"', j)
                if k == -1:
                    return column, "stray quote: a quoted cell is never closed"
                if k + 1 < n and line[k + 1] == '"':
                    j = k + 2  # an escaped quote
                    continue
                break
            i = k + 1
            if i < n and line[i] != ",":
                return column, "stray quote: text after the closing quote of a cell"
            at_start = False
            continue
        if line[i] == ",":
            column, at_start = column + 1, True
        else:
            at_start = False
        i += 1
    return None


def _require_columns(df: pl.DataFrame, path: Path, columns: tuple[str, ...]) -> None:
    for column in columns:
        if column not in df.columns:
            raise InputError(f"required column is missing (columns: {listed(df.columns)})",
                             file=str(path), field=column)
    if df.height == 0:
        raise InputError("the table has no rows", file=str(path))


def _first_bad_row(mask: pl.Series) -> int:
    return int(mask.arg_true()[0]) + 1


def _as_string(df: pl.DataFrame, path: Path, column: str) -> pl.DataFrame:
    """Cast an id/text column to string; ints in Parquet ids are accepted."""
    dtype = df.schema[column]
    if dtype == pl.String:
        return df
    if dtype.is_integer() or dtype == pl.Null:
        return df.with_columns(pl.col(column).cast(pl.String))
    raise InputError(f"expected text, found {dtype}", file=str(path), row=1, field=column)


def check_ids(df: pl.DataFrame, path: Path, column: str) -> pl.DataFrame:
    df = _as_string(df, path, column).with_columns(pl.col(column).str.strip_chars())
    empty = df[column].is_null() | (df[column] == "")
    if empty.any():
        raise InputError("missing id", file=str(path), row=_first_bad_row(empty), field=column)
    return df


def _check_unique(df: pl.DataFrame, path: Path, column: str) -> None:
    repeat = ~df[column].is_first_distinct()
    if repeat.any():
        row = _first_bad_row(repeat)
        value = df[column][row - 1]
        first = int((df[column] == value).arg_true()[0]) + 1
        raise InputError(f"duplicate id '{value}' (first on row {first})", file=str(path), row=row, field=column)


def check_text(df: pl.DataFrame, path: Path, columns: tuple[str, ...]) -> pl.DataFrame:
    for column in columns:
        if column not in df.columns:
            continue
        df = _as_string(df, path, column)
        too_long = df[column].str.len_chars() > TEXT_LIMIT
        if too_long.any():
            raise InputError(f"text longer than {TEXT_LIMIT:,} characters", file=str(path),
                             row=_first_bad_row(too_long.fill_null(False)), field=column)
        # Empty strings mean "no value", like a missing cell.
        df = df.with_columns(pl.when(pl.col(column).str.strip_chars() == "").then(None)
                             .otherwise(pl.col(column)).alias(column))
    return df


_NEAR_MISSES_SAID: set[tuple[str, str]] = set()  # (table path, column): said once per process


def warn_near_misses(df: pl.DataFrame, path: Path, content: tuple[str, ...]) -> list[tuple[str, str]]:
    """Warn about a column that looks like a misspelt content column the table lacks ('img' for
    'image', 'titel' for 'title', 'desc' for 'description'): it is kept as an attribute, so the
    modality is silently missing. Returns the (column, meant) pairs."""
    import difflib

    absent = [c for c in content if c not in df.columns]
    found = []
    for column in df.columns:
        if column in content or column.endswith("_id"):
            continue
        name = column.strip().lower()
        meant = next((c for c in absent if name == c or (len(name) >= 3 and c.startswith(name))), None)
        if meant is None:
            # A typo keeps the first letter ('img', 'titel', 'txt'); 'age' is no 'image'.
            close = difflib.get_close_matches(name, [c for c in absent if c[0] == name[:1]], n=1, cutoff=0.7)
            meant = close[0] if close else None
        if meant is not None:
            found.append((column, meant))
            if (str(path), column) not in _NEAR_MISSES_SAID:
                _NEAR_MISSES_SAID.add((str(path), column))
                logging.getLogger("fusionrec.tables").warning(
                    "%s: column %r is kept as an attribute, not read as %r (there is no %r column, so that "
                    "content is not embedded): rename it if %r was meant", path, column, meant, meant, meant)
    return found


def load_items(data_dir: Path) -> pl.DataFrame:
    path = find_table(data_dir, "items")
    df = read_table(path)
    _require_columns(df, path, ("item_id",))
    warn_near_misses(df, path, ITEM_TEXT_COLUMNS)
    df = check_ids(df, path, "item_id")
    _check_unique(df, path, "item_id")
    return check_text(df, path, ITEM_TEXT_COLUMNS)


def load_users(data_dir: Path) -> pl.DataFrame | None:
    path = find_table(data_dir, "users", required=False)
    if path is None:
        return None
    df = read_table(path)
    _require_columns(df, path, ("user_id",))
    warn_near_misses(df, path, USER_TEXT_COLUMNS)
    df = check_ids(df, path, "user_id")
    _check_unique(df, path, "user_id")
    return check_text(df, path, USER_TEXT_COLUMNS)


def parse_timestamps(df: pl.DataFrame, path: Path, column: str = "timestamp") -> pl.DataFrame:
    """Unix seconds (int) or ISO-8601 strings -> Int64 Unix seconds."""
    dtype = df.schema[column]
    if dtype.is_integer():
        parsed = df[column].cast(pl.Int64)
    elif dtype.is_float():
        parsed = df[column].cast(pl.Int64, strict=False)
    elif dtype == pl.Datetime or isinstance(dtype, pl.Datetime):
        parsed = df[column].dt.epoch("s")
    elif dtype == pl.String:
        text = df[column].str.strip_chars()
        as_int = text.cast(pl.Int64, strict=False)
        as_float = text.cast(pl.Float64, strict=False).cast(pl.Int64, strict=False)
        as_date = _parse_iso(text)
        parsed = as_int.fill_null(as_float).fill_null(as_date)
    else:
        raise InputError(f"expected Unix seconds or ISO-8601, found {dtype}", file=str(path), row=1, field=column)
    bad = parsed.is_null()
    if bad.any():
        row = _first_bad_row(bad)
        value = df[column][row - 1]
        what = "empty timestamp: every interaction needs one" if value is None or str(value).strip() == "" else \
            f"cannot read timestamp {value!r}"
        raise InputError(f"{what} (Unix seconds or ISO-8601)", file=str(path), row=row, field=column)
    return df.with_columns(plausible_timestamps(parsed, df[column], path, column).alias(column))


MS_FROM = 10**11  # as seconds: the year 5138; as milliseconds: 1973
MS_UNTIL = 10**14  # as milliseconds: the year 5138
FUTURE_SLACK_S = 366 * 86_400  # a log may run ahead of the clock a little, never by more than a year


def plausible_timestamps(seconds: pl.Series, raw: pl.Series, path: Path, column: str = "timestamp",
                         now: float | None = None) -> pl.Series:
    """Unix seconds checked for plausibility.

    Integer timestamps in milliseconds (every row between 10^11 and 10^14, i.e. 1973 to 5138
    as milliseconds) are converted to seconds, with a warning; a column that mixes seconds
    and milliseconds is refused, naming the first row in the other unit. A timestamp more
    than a year after today (a row dated 9999, nanoseconds, 10^18) is refused, naming the
    file, the row and the field.
    """
    import logging
    import time

    if seconds.len() == 0:
        return seconds
    # Only numbers can be milliseconds (an ISO date of the year 9999 is just far away).
    numeric = (pl.Series([True] * len(raw)) if raw.dtype.is_numeric()
               else raw.cast(pl.String).str.strip_chars().cast(pl.Float64, strict=False).is_not_null())
    as_ms = ((seconds >= MS_FROM) & (seconds < MS_UNTIL)).fill_null(False) & numeric
    if as_ms.any():
        if as_ms.all():
            logging.getLogger("fusionrec.tables").warning(
                "%s: every %s is in milliseconds (e.g. %s): read as milliseconds", path, column, raw[0])
            seconds = seconds // 1000
        else:
            n_ms = int(as_ms.sum())
            row = _first_bad_row(as_ms if n_ms <= len(as_ms) - n_ms else ~as_ms)  # the minority's first row
            other = _first_bad_row(~as_ms if n_ms <= len(as_ms) - n_ms else as_ms)
            unit, other_unit = ("milliseconds", "seconds") if bool(as_ms[row - 1]) else ("seconds", "milliseconds")
            raise InputError(f"timestamp {raw[row - 1]!r} is in {unit} while row {other} ({raw[other - 1]!r}) "
                             f"is in {other_unit}: use one unit for the whole file", file=str(path), row=row,
                             field=column)
    limit = int((time.time() if now is None else now) + FUTURE_SLACK_S)
    future = (seconds > limit).fill_null(False)
    if future.any():
        row = _first_bad_row(future)
        raise InputError(f"timestamp {raw[row - 1]!r} lies in the far future (more than a year from today; "
                         "Unix seconds, or milliseconds for a whole file)", file=str(path), row=row, field=column)
    return seconds


def _parse_iso(text: pl.Series) -> pl.Series:
    out = pl.Series(values=[None] * len(text), dtype=pl.Int64)
    for fmt in ("%Y-%m-%dT%H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%d"):
        try:
            parsed = text.str.to_datetime(fmt, strict=False, time_zone="UTC" if "%#z" in fmt else None)
        except pl.exceptions.PolarsError:
            continue
        if cast(pl.Datetime, parsed.dtype).time_zone is None:
            parsed = parsed.dt.replace_time_zone("UTC")
        out = out.fill_null(parsed.dt.epoch("s"))
    return out


def load_interactions(data_dir: Path, items: pl.DataFrame | None = None) -> pl.DataFrame:
    """`DIR/interactions.{parquet,csv}`, validated (see `read_interactions`)."""
    return read_interactions(find_table(data_dir, "interactions"), items)


def read_interactions(path: Path, items: pl.DataFrame | None = None) -> pl.DataFrame:
    """user_id, item_id, timestamp (Int64 Unix s), event (lower-case), value (Float64, nullable)."""
    path = Path(path)
    if not path.is_file():
        raise InputError("is a directory, not a file" if path.is_dir() else "no such file", file=str(path))
    df = read_table(path)
    _require_columns(df, path, ("user_id", "item_id", "timestamp"))
    df = check_ids(df, path, "user_id")
    df = check_ids(df, path, "item_id")
    df = parse_timestamps(df, path)
    if "event" in df.columns:
        df = _as_string(df, path, "event").with_columns(
            pl.col("event").str.strip_chars().str.to_lowercase().replace("", None).fill_null(DEFAULT_EVENT))
    else:
        df = df.with_columns(pl.lit(DEFAULT_EVENT).alias("event"))
    if "value" in df.columns:
        raw = df["value"]
        if not (raw.dtype.is_numeric() or raw.dtype in (pl.String, pl.Null, pl.Boolean)):
            raise InputError(f"expected a number, found {raw.dtype}", file=str(path), row=1, field="value")
        if raw.dtype == pl.String:
            raw = raw.str.strip_chars().replace("", None)
        value = raw.cast(pl.Float64, strict=False)
        bad = value.is_null() & raw.is_not_null()
        if bad.any():
            row = _first_bad_row(bad)
            raise InputError(f"expected a number, found {raw[row - 1]!r}", file=str(path), row=row, field="value")
        infinite = (value.is_nan() | value.is_infinite()).fill_null(False)
        if infinite.any():  # a rating of inf overflows training; NaN is no rating (leave the cell empty)
            row = _first_bad_row(infinite)
            raise InputError(f"expected a finite number, found {raw[row - 1]!r} (leave the cell empty for no value)",
                             file=str(path), row=row, field="value")
        df = df.with_columns(value.alias("value"))
    else:
        df = df.with_columns(pl.lit(None, dtype=pl.Float64).alias("value"))
    if items is not None:
        unknown = ~df["item_id"].is_in(items["item_id"].implode())
        if unknown.any():
            row = _first_bad_row(unknown)
            raise InputError(f"item '{df['item_id'][row - 1]}' is not in the items table",
                             file=str(path), row=row, field="item_id")
    return df.select("user_id", "item_id", "timestamp", "event", "value")


def resolve_media(data_dir: Path, relative: str, *, root: Path | None = None) -> Path:
    """The media file for a table path; refuses paths (and symlinks) that leave the data directory.

    root: `data_dir` already resolved (callers resolving many paths pass it once)."""
    if "\x00" in relative:
        raise MediaError("the path holds a NUL byte")
    if "://" in relative or relative.lower().startswith(("http:", "https:", "ftp:", "s3:", "gs:", "data:")):
        raise MediaError("URLs are not fetched: media paths must be files relative to the data directory")
    root = Path(data_dir).resolve() if root is None else root
    candidate = Path(relative)
    if candidate.is_absolute():
        raise MediaError("absolute path refused: media paths must be relative to the data directory")
    full = (root / candidate)
    resolved = full.resolve()
    if not resolved.is_relative_to(root):
        kind = "symlink points" if full.is_symlink() or any(p.is_symlink() for p in full.parents) else "path leads"
        raise MediaError(f"{kind} outside the data directory")
    return resolved
