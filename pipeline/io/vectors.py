"""Tables of vectors (`<id>, vector`): the one validator of precomputed and stored embeddings.

The embedding job's ingest of precomputed vectors (`pipeline.embedding.job.read_precomputed`)
and fusion's reading of embedding tables (`pipeline.retrieval.fusion.read_embedding_table`)
both go through `read_vectors`, so a bad table is refused with the same message on either
path. Every message names the file, the 1-based row of the file and the field.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import polars as pl

from fusionrec.pipeline.errors import InputError


def read_vectors(path: Path, id_columns: Sequence[str], *, drop_missing: bool = False,
                 what: str = "embeddings") -> tuple[pl.Series, np.ndarray]:
    """Read and validate one vector table: (ids as strings, float32 matrix, one row per id).

    The id column is the first of `id_columns` the table has. With `drop_missing`, rows with
    a null id or a null vector are left out (that id lacks the modality); otherwise a null
    vector is an error and null ids are returned as nulls. Vectors may be fixed-size or
    plain lists. The matrix is not normalised.
    """
    try:
        df = pl.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is bad input
        raise InputError(f"cannot read {what}: {exc}", file=str(path)) from None
    return validate_vectors(df, path, id_columns, drop_missing=drop_missing)


def validate_vectors(df: pl.DataFrame, path: Path, id_columns: Sequence[str], *, drop_missing: bool = False
                     ) -> tuple[pl.Series, np.ndarray]:
    """`read_vectors` on a frame already read from `path` (see there)."""
    file = str(path)
    id_col = next((c for c in id_columns if c in df.columns), None)
    if id_col is None:
        raise InputError("required column is missing", file=file, field=id_columns[0])
    if "vector" not in df.columns:
        raise InputError("required column is missing", file=file, field="vector")
    dtype = df.schema["vector"]
    if not isinstance(dtype, (pl.List, pl.Array)):
        raise InputError(f"vector must be a list of numbers, found {dtype}", file=file, row=1, field="vector")
    ids = df[id_col].cast(pl.String)
    vectors = df["vector"]
    rows = np.arange(1, df.height + 1)  # 1-based row of the file
    present = vectors.is_not_null()
    if drop_missing:
        present &= ids.is_not_null()
    else:
        missing = ~present.to_numpy()
        if missing.any():
            raise InputError("vector is missing or has a different length from the others", file=file,
                             row=int(rows[missing][0]), field="vector")
    keep = present.to_numpy()
    ids, vectors, rows = ids.filter(present), vectors.filter(present), rows[keep]
    if len(ids) == 0:
        return ids, np.zeros((0, 0), dtype=np.float32)
    lengths = (vectors.list.len() if isinstance(dtype, pl.List) else vectors.arr.len()).to_numpy()
    values, first, counts = np.unique(lengths, return_index=True, return_counts=True)
    dim = int(values[np.lexsort((first, -counts))[0]])  # the most common length; ties: the earliest
    bad = lengths != dim
    if bad.any():
        raise InputError("vector is missing or has a different length from the others", file=file,
                         row=int(rows[bad][0]), field="vector")
    try:
        fixed = vectors.cast(pl.Array(pl.Float32, dim))
    except pl.exceptions.PolarsError:
        raise InputError(f"vector must be a list of numbers, found {dtype}", file=file, row=int(rows[0]),
                         field="vector") from None
    matrix = np.ascontiguousarray(fixed.to_numpy(), dtype=np.float32)
    matrix = matrix.reshape(len(ids), dim)
    finite = np.isfinite(matrix).all(axis=1)
    if not finite.all():
        raise InputError("vector contains NaN or infinity", file=file, row=int(rows[~finite][0]), field="vector")
    again = (~ids.is_first_distinct() & ids.is_not_null()).to_numpy()
    if again.any():
        at = int(np.flatnonzero(again)[0])
        first_row = int(rows[int(np.flatnonzero((ids == ids[at]).to_numpy())[0])])
        raise InputError(f"duplicate id {ids[at]!r} (first on row {first_row})", file=file, row=int(rows[at]),
                         field=id_col)
    return ids, matrix


def check_dimensions(item_dims: dict[str, int], user_dims: dict[str, int], source: Callable[[str, str], str],
                     blamed: Callable[[str], str]) -> None:
    """Refuse a modality whose user vectors have another dimension than its item vectors (a
    user's and an item's vectors of one modality are compared by cosine; a mismatch failed
    later on a matrix product). `source(kind, modality)` says where each side's vectors come
    from; the InputError names the file `blamed(modality)`."""
    for name in sorted(set(item_dims) & set(user_dims)):
        if item_dims[name] != user_dims[name]:
            raise InputError(f"the users' {name} vectors ({source('user', name)}) have {user_dims[name]} numbers, "
                             f"the items' ({source('item', name)}) {item_dims[name]}: a user's and an item's "
                             f"{name} vectors are compared, so they need one model and dimension: give the users "
                             "and the items vectors of the same model (precomputed for both, or for neither)",
                             file=blamed(name), field="vector")
