"""The GRU next-item source: learns a fixed cycle, is seeded, and serves from saved arrays without torch."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import scipy.sparse as sp

from fusionrec.pipeline.retrieval.sequence_model import GRUSequence, training_windows, user_sequences
from fusionrec.pipeline.retrieval.sources import SEARCH_GRID, UserItemLog, make_source

N_ITEMS, N_USERS = 24, 80


def cycle_log(seed: int = 0) -> UserItemLog:
    """Every user walks the cycle i -> i + 1 (mod N_ITEMS) from a random start for 6-16 steps."""
    rng = np.random.default_rng(seed)
    pairs = []
    for u in range(N_USERS):
        start, length = int(rng.integers(N_ITEMS)), int(rng.integers(6, 17))
        pairs += [(u, (start + t) % N_ITEMS) for t in range(length)]
    seq = np.array(pairs, dtype=np.int64)
    m = sp.csr_matrix((np.ones(len(seq), np.float32), (seq[:, 0], seq[:, 1])), shape=(N_USERS, N_ITEMS))
    return UserItemLog(np.array([str(u) for u in range(N_USERS)], dtype=object),
                       np.array([str(i) for i in range(N_ITEMS)], dtype=object), m, m, m, seq)


def small(seed: int = 0) -> GRUSequence:
    return GRUSequence(dim=16, epochs=30, dropout=0.0, max_len=20, lr=1e-2, batch_size=32, seed=seed)


@pytest.fixture(scope="module")
def fitted() -> tuple[UserItemLog, GRUSequence]:
    log = cycle_log()
    return log, small().fit(log)


def test_learns_the_next_item_of_the_cycle(fitted):
    log, model = fitted
    users = np.arange(N_USERS)
    scores = model.score(log, users)
    assert scores.shape == (N_USERS, N_ITEMS) and scores.dtype == np.float32
    last = np.array([s[-1] for s in user_sequences(log.sequence, N_USERS)])
    hit = np.argmax(scores, axis=1) == (last + 1) % N_ITEMS
    assert hit.mean() >= 0.9


def test_same_seed_same_scores(fitted):
    log, model = fitted
    again = small().fit(log)
    users = np.arange(N_USERS)
    np.testing.assert_array_equal(model.score(log, users), again.score(log, users))


def test_restored_state_scores_the_same_without_torch(fitted, monkeypatch):
    log, model = fitted
    monkeypatch.setitem(sys.modules, "torch", None)  # any `import torch` now raises ImportError
    restored = make_source("gru", model.params(), seed=0).restore(
        {k: np.array(v, copy=True) for k, v in model.state().items()})
    users = np.array([3, 0, 41, 79])
    np.testing.assert_array_equal(restored.score(log, users), model.score(log, users))
    with pytest.raises(ImportError):
        GRUSequence().fit(log)  # fitting is what needs torch


def test_windows_cover_every_transition_once():
    seqs = [np.arange(7), np.arange(1), np.arange(3)]
    windows = training_windows(seqs, 3)
    targets = sorted(int(t) for w in windows for t in w[1:])
    assert targets == [1, 1, 2, 2, 3, 4, 5, 6]
    assert all(2 <= len(w) <= 4 for w in windows)


def test_registered_with_a_small_grid():
    assert 1 <= len(SEARCH_GRID["gru"]) <= 4
    assert isinstance(make_source("gru", SEARCH_GRID["gru"][0], seed=3), GRUSequence)
