"""A small neural next-item model (GRU4Rec-style) as one more candidate source.

`GRUSequence` reads each user's time-ordered items (`UserItemLog.sequence`) and learns to
predict item t + 1 from items <= t: item embeddings, one GRU layer, a full softmax over the
catalog (a few thousand items at most here), Adam, seeded and on `threads` CPU threads.

torch is needed only to fit (imported inside `fit`). Fitting ends by running every user's
last `max_len` items through the network once and keeping the final hidden state
(`user_vectors_`) with the output item embeddings and bias, so scoring, saving and
restoring are plain numpy: `user_vectors_[users] @ item_vectors_.T + item_bias_`.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from fusionrec.pipeline.retrieval.source_base import Source, UserItemLog

logger = logging.getLogger("fusionrec.sources")


def user_sequences(sequence: np.ndarray, n_users: int) -> list[np.ndarray]:
    """Each user's item columns in time order (an empty array for users without items)."""
    out = [np.zeros(0, np.int64) for _ in range(n_users)]
    if len(sequence) == 0:
        return out
    u, i = sequence[:, 0], sequence[:, 1]
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    ends = np.r_[starts[1:], len(u)]
    for a, b in zip(starts, ends):
        out[int(u[a])] = i[a:b].astype(np.int64)
    return out


def training_windows(seqs: list[np.ndarray], max_len: int) -> list[np.ndarray]:
    """Windows of at most `max_len` + 1 items, cut from each sequence's end backwards, so that
    every transition (item t -> t + 1) is a target exactly once."""
    windows = []
    for s in seqs:
        for end in range(len(s), 1, -max_len):
            windows.append(s[max(0, end - max_len - 1):end])
    return windows


def _pad(windows: list[np.ndarray], width: int) -> np.ndarray:
    """Right-padded item ids shifted by one (0 = padding)."""
    out = np.zeros((len(windows), width), np.int64)
    for r, w in enumerate(windows):
        out[r, :len(w)] = w + 1
    return out


class GRUSequence(Source):
    """GRU over each user's recent items, trained for the next item; served as dot products."""

    name = "gru"

    def __init__(self, dim: int = 64, epochs: int = 10, dropout: float = 0.2, max_len: int = 50, lr: float = 3e-3,
                 batch_size: int = 128, weight_decay: float = 0.0, threads: int = 1, seed: int = 0) -> None:
        self.dim, self.epochs, self.dropout, self.max_len = int(dim), int(epochs), float(dropout), int(max_len)
        self.lr, self.batch_size, self.weight_decay = float(lr), int(batch_size), float(weight_decay)
        self.threads, self.seed = int(threads), int(seed)

    def fit(self, log: UserItemLog) -> GRUSequence:
        import torch  # optional, heavy: needed to fit only; scoring is numpy

        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            with torch.enable_grad():  # a caller (an encoder) may have turned gradients off process-wide
                return self._fit(torch, log)
        finally:
            torch.set_num_threads(previous)

    def _fit(self, torch: Any, log: UserItemLog) -> GRUSequence:
        nn = torch.nn
        torch.manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        n_items, d = log.n_items, self.dim
        seqs = user_sequences(log.sequence, log.n_users)

        embed = nn.Embedding(n_items + 1, d, padding_idx=0)
        gru = nn.GRU(d, d, num_layers=1, batch_first=True)
        out = nn.Embedding(n_items, d)
        bias = nn.Parameter(torch.zeros(n_items))
        drop = nn.Dropout(self.dropout)
        with torch.no_grad():
            nn.init.normal_(embed.weight, std=0.05)
            embed.weight[0].zero_()
            nn.init.normal_(out.weight, std=0.05)
        params = [*embed.parameters(), *gru.parameters(), *out.parameters(), bias]
        opt = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)

        def hidden(x: Any) -> Any:
            h, _ = gru(drop(embed(x)))
            return drop(h)

        windows = training_windows(seqs, self.max_len)
        if windows:
            data = torch.from_numpy(_pad(windows, self.max_len + 1))
            for epoch in range(self.epochs):
                embed.train(), gru.train(), drop.train()
                order = torch.from_numpy(rng.permutation(len(windows)))
                total, count = 0.0, 0
                for start in range(0, len(windows), self.batch_size):
                    batch = data[order[start:start + self.batch_size]]
                    width = int((batch > 0).sum(dim=1).max())
                    x, y = batch[:, :width - 1], batch[:, 1:width]
                    mask = y > 0
                    h = hidden(x)[mask]
                    logits = h @ out.weight.T + bias
                    loss = nn.functional.cross_entropy(logits, y[mask] - 1)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    total, count = total + float(loss.detach()) * int(mask.sum()), count + int(mask.sum())
                logger.debug("gru epoch %d: next-item cross-entropy %.4f", epoch + 1, total / max(count, 1))

        # Serving state: each user's final hidden state over their last max_len items.
        users = np.zeros((log.n_users, d), np.float32)
        rows = [u for u, s in enumerate(seqs) if len(s)]
        drop.eval()
        with torch.no_grad():
            for start in range(0, len(rows), 512):
                part = rows[start:start + 512]
                tails = [seqs[u][-self.max_len:] for u in part]
                x = torch.from_numpy(_pad(tails, self.max_len))
                lengths = torch.tensor([len(t) for t in tails])
                h, _ = gru(embed(x))
                users[part] = h[torch.arange(len(part)), lengths - 1].numpy()
        self.user_vectors_ = users
        self.item_vectors_ = out.weight.detach().numpy().astype(np.float32).copy()
        self.item_bias_ = bias.detach().numpy().astype(np.float32).copy()
        return self

    def score(self, log: UserItemLog, users: np.ndarray) -> np.ndarray:
        return np.asarray(self.user_vectors_[users] @ self.item_vectors_.T + self.item_bias_, dtype=np.float32)

    def params(self) -> dict[str, Any]:
        return {"dim": self.dim, "epochs": self.epochs, "dropout": self.dropout, "max_len": self.max_len,
                "lr": self.lr, "batch_size": self.batch_size, "weight_decay": self.weight_decay}

    def state(self) -> dict[str, np.ndarray]:
        return {"users": self.user_vectors_, "items": self.item_vectors_, "bias": self.item_bias_}

    def restore(self, arrays: dict[str, np.ndarray]) -> GRUSequence:
        self.user_vectors_, self.item_vectors_, self.item_bias_ = arrays["users"], arrays["items"], arrays["bias"]
        return self
