"""Mult-VAE (Liang et al. 2018) as one more candidate source: a non-linear autoencoder over
each user's positive row. Opt-in (`sources.names`), not part of `auto`: on the benchmark's
validation it raised Last.fm's blend and lowered MovieLens' (docs/quality.md), and under the
clear-gain rule (`candidates.gate_source`) it kept no weight on either.

`MultVAE` learns to reconstruct a user's positives (a multinomial likelihood, the KL term
annealed up to `beta`) from the same row with half its entries dropped. Its layers are dense
over the catalog (items x `hidden`): a catalog of a few tens of thousands of items at most.

torch is needed only to fit (imported inside `fit`). Fitting keeps the layers' weights as
numpy arrays, so scoring, saving and restoring are plain numpy: a user's row, L2-normalised,
through the encoder's mean and the decoder. `seeds` fits are averaged (their logits: a
per-user constant apart from their log-softmax, so the same order and z-scores).

With `tag_weight` > 0 the items' tags join the fit as extra users, as in the co-occurrence
sources (`source_base.with_tags`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import scipy.sparse as sp

from fusionrec.pipeline.retrieval.source_base import Source, UserItemLog, with_tags

logger = logging.getLogger("fusionrec.sources")

LAYERS = ("w1", "b1", "w2", "b2", "w3", "b3", "w4", "b4")


class MultVAE(Source):
    """A variational autoencoder over users' positive rows, `seeds` seeded fits averaged."""

    name = "vae"

    def __init__(self, epochs: int = 35, hidden: int = 600, latent: int = 200, dropout: float = 0.5,
                 beta: float = 0.2, lr: float = 1e-3, batch_size: int = 128, seeds: int = 3, seed: int = 0,
                 threads: int = 0, tag_weight: float = 0.0, tags: sp.csr_matrix | None = None) -> None:
        self.epochs, self.hidden, self.latent = int(epochs), int(hidden), int(latent)
        self.dropout, self.beta, self.lr, self.batch_size = float(dropout), float(beta), float(lr), int(batch_size)
        self.seeds, self.seed, self.threads = int(seeds), int(seed), int(threads)
        self.tag_weight, self.tags = float(tag_weight), tags

    def fit(self, log: UserItemLog) -> MultVAE:
        import torch  # optional, heavy: needed to fit only; scoring is numpy

        rows = with_tags(log.matrix, self.tags, self.tag_weight)
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads or previous)  # 0: torch's own count
        try:
            with torch.enable_grad():  # a caller (an encoder) may have turned gradients off process-wide
                fits = [self._fit_one(torch, rows, self.seed + k) for k in range(self.seeds)]
        finally:
            torch.set_num_threads(previous)
        self.layers_ = {name: np.stack([f[name] for f in fits]) for name in LAYERS}
        return self

    def _fit_one(self, torch: Any, rows: sp.csr_matrix, seed: int) -> dict[str, np.ndarray]:
        nn = torch.nn
        torch.manual_seed(seed)
        data = torch.from_numpy(np.asarray(rows.toarray(), dtype=np.float32))
        n_rows, n_items = data.shape
        encoder = nn.Sequential(nn.Linear(n_items, self.hidden), nn.Tanh(), nn.Linear(self.hidden, 2 * self.latent))
        decoder = nn.Sequential(nn.Linear(self.latent, self.hidden), nn.Tanh(), nn.Linear(self.hidden, n_items))
        opt = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=self.lr)
        order = torch.Generator().manual_seed(seed)
        total = self.epochs * max(-(-n_rows // self.batch_size), 1)
        step = 0
        for epoch in range(self.epochs):
            loss_sum = 0.0
            for idx in torch.randperm(n_rows, generator=order).split(self.batch_size):
                batch = data[idx]
                h = nn.functional.dropout(nn.functional.normalize(batch, dim=1), self.dropout)
                mu, logvar = encoder(h).chunk(2, dim=1)
                z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
                nll = -(torch.log_softmax(decoder(z), dim=1) * batch).sum(dim=1).mean()
                kl = (-0.5 * (1 + logvar - mu ** 2 - logvar.exp()).sum(dim=1)).mean()
                # KL annealed from 0 to beta over the first 80% of the steps
                loss = nll + min(self.beta, self.beta * step / max(0.8 * total, 1.0)) * kl
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                loss_sum += float(loss.detach()) * len(idx)
            logger.debug("vae seed %d epoch %d: loss %.4f", seed, epoch + 1, loss_sum / max(n_rows, 1))
        lin1, lin2, lin3, lin4 = encoder[0], encoder[2], decoder[0], decoder[2]
        w2, b2 = lin2.weight[: self.latent], lin2.bias[: self.latent]  # the mean's half: scoring uses mu
        arrays = (lin1.weight.T, lin1.bias, w2.T, b2, lin3.weight.T, lin3.bias, lin4.weight.T, lin4.bias)
        return {name: a.detach().numpy().astype(np.float32).copy() for name, a in zip(LAYERS, arrays)}

    def score(self, log: UserItemLog, users: np.ndarray) -> np.ndarray:
        x = np.asarray(log.matrix[users].toarray(), dtype=np.float32)
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        out = np.zeros((len(users), log.n_items), np.float32)
        ws = self.layers_
        for k in range(len(ws["w1"])):
            mu = np.tanh(x @ ws["w1"][k] + ws["b1"][k]) @ ws["w2"][k] + ws["b2"][k]
            out += np.tanh(mu @ ws["w3"][k] + ws["b3"][k]) @ ws["w4"][k] + ws["b4"][k]
        return out / np.float32(len(ws["w1"]))

    def params(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "hidden": self.hidden, "latent": self.latent, "dropout": self.dropout,
                "beta": self.beta, "lr": self.lr, "batch_size": self.batch_size, "seeds": self.seeds,
                "seed": self.seed, "tag_weight": self.tag_weight}

    def state(self) -> dict[str, np.ndarray]:
        return dict(self.layers_)

    def restore(self, arrays: dict[str, np.ndarray]) -> MultVAE:
        self.layers_ = {name: arrays[name] for name in LAYERS}
        return self
