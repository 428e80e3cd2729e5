"""What every candidate source shares: the user x item log it learns from and the `Source` interface.

Kept apart from `sources.py` so that sources in their own modules (`sequence_model.py`) can
subclass `Source` while `sources.py` imports them for `make_source` (no import cycle);
`sources.py` re-exports these names.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp


@dataclass(frozen=True)
class UserItemLog:
    """Positive evidence as a users x items matrix, plus each user's recency-weighted recent items.

    `matrix[u, i]` is 1 where user u showed positive evidence for item i (a rating at or
    above the relevance threshold, or any event where there are no ratings); `recent[u, i]`
    weighs the user's last `recent_items` items (any rating) by 0.5 ** (age rank / half-life).
    """

    user_ids: np.ndarray
    item_ids: np.ndarray
    matrix: sp.csr_matrix
    recent: sp.csr_matrix
    seen: sp.csr_matrix  # every interaction, negative ones included (excluded from lists)
    sequence: np.ndarray  # (n, 2) user row, item column of every user's items in time order
    # What sources derive from this log and may share (EASE's weights per lambda: `ease` and
    # `recent_ease` learn the same ones), bounded by `DERIVED_MAX_BYTES`; see `derived_array`.
    derived: dict[Any, np.ndarray] = field(default_factory=dict, compare=False, repr=False)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)


DERIVED_MAX_BYTES = 256 << 20


def derived_array(log: UserItemLog, key: Any, make: Any) -> np.ndarray:
    """`make()` computed once per log and key while the log's shared arrays stay under
    `DERIVED_MAX_BYTES` (a large catalogue's arrays are computed each time instead)."""
    if key in log.derived:
        return log.derived[key]
    value = make()
    if sum(a.nbytes for a in log.derived.values()) + value.nbytes <= DERIVED_MAX_BYTES:
        log.derived[key] = value
    return value


def _csr(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    return sp.csr_matrix((vals, (rows.astype(np.int64), cols.astype(np.int64))), shape=shape, dtype=np.float32)


def with_tags(matrix: sp.csr_matrix, tags: sp.csr_matrix | None, tag_weight: float) -> sp.csr_matrix:
    """The users x items positives with the items' tags as extra users below them: tag t
    "liked" every item carrying it, at `tag_weight` (a source learning from item co-occurrence
    then also learns from shared tags). The log's rows keep their numbers."""
    if tag_weight <= 0:
        return matrix
    if tags is None:  # a setting with tags fitted without them would be a different model, silently
        raise ValueError(f"a setting with tag_weight {tag_weight} needs the items' tags, and none were given")
    if not tags.nnz:
        return matrix
    if tags.shape[1] != matrix.shape[1]:
        raise ValueError(f"the tag matrix has {tags.shape[1]} item columns, the log {matrix.shape[1]}")
    return sp.vstack([matrix, tag_weight * tags.astype(np.float32)], format="csr")


def matrix_digest(matrix: sp.csr_matrix) -> str:
    """sha256 of a sparse matrix's shape and contents (a cache key that cannot outlive its matrix)."""
    digest = hashlib.sha256(np.asarray(matrix.shape, np.int64).tobytes())
    for part in (matrix.indptr, matrix.indices, matrix.data):
        digest.update(np.ascontiguousarray(part).tobytes())
    return digest.hexdigest()


class Source:
    """One candidate source: `fit` on a log, `score` users (rows of that log) against every item."""

    name: str = ""

    def fit(self, log: UserItemLog) -> Source:
        raise NotImplementedError

    def score(self, log: UserItemLog, users: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        return {}

    def state(self) -> dict[str, np.ndarray]:
        """Arrays that, with `params`, restore the fitted source (`restore`)."""
        return {}

    def restore(self, arrays: dict[str, np.ndarray]) -> Source:
        return self
