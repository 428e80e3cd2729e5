"""Error types shared by every stage.

Exit codes follow the contract: 2 for bad usage or bad input, 1 for any other failure.
"""

from __future__ import annotations


def first_line(exc: BaseException, limit: int = 300, empty: str | None = None) -> str:
    """The first line of `exc`'s message, cut to `limit` characters: all of a library's error
    that a user is shown. A message-less error gives `empty` (default: the error's type name)."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__ if empty is None else empty
    return text.splitlines()[0][:limit]


class FusionrecError(Exception):
    """A failure the CLI reports as one clear line and exit status 1."""

    exit_code = 1


class InputError(FusionrecError):
    """Bad input data: the message names the file, the row and the field."""

    exit_code = 2

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None,
                 field: str | None = None) -> None:
        self.file, self.row, self.field = file, row, field
        where = []
        if file is not None:
            where.append(str(file))
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{': '.join([', '.join(where)] if where else [])}{': ' if where else ''}{message}")


class ConfigError(FusionrecError):
    """A config file or override that does not fit the typed config."""

    exit_code = 2


class LockError(FusionrecError):
    """Another job holds the artifacts directory."""


class MediaError(Exception):
    """One media file (image or audio) could not be used.

    Never fatal: the embedding job records it in failures.parquet and keeps the item
    without that modality.
    """
