"""Small pieces every encoder shares: device choice, bf16 autocast on CUDA, L2 normalisation,
and the progress hook that lets the embedding job's bar move within one `encode` call."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

import numpy as np

# Set by the embedding job around the shards it encodes in this thread (`reporting_rows`). An
# encoder calls `rows_done` after each of its batches, so a shard that takes a minute on the
# CPU (195 clips of audio) moves the bar batch by batch, not once at its end. Elsewhere (a test,
# a Ray actor, a notebook) nothing listens and the call does nothing. On a GPU the text and image
# encoders report a batch when it is queued (they copy back once, at the end), so there the bar
# runs a little ahead of the device.
_ROWS_DONE: ContextVar[Callable[[int], None] | None] = ContextVar("fusionrec_rows_done", default=None)


@contextlib.contextmanager
def reporting_rows(callback: Callable[[int], None] | None) -> Iterator[None]:
    """Within the block, `rows_done(n)` in this thread (or context) calls `callback(n)`."""
    token = _ROWS_DONE.set(callback)
    try:
        yield
    finally:
        _ROWS_DONE.reset(token)


def rows_done(n: int) -> None:
    """`n` more inputs of the current `encode` call are encoded (a clip cut into windows counts
    with its last window); a progress note only, never part of the result."""
    callback = _ROWS_DONE.get()
    if callback is not None:
        callback(n)


def resolve_device(device: str = "auto") -> str:
    """`auto` takes CUDA where there is one, else the CPU."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def autocast(device: str):
    """bf16 autocast on CUDA; a no-op on the CPU (fp32 there is exact and fast enough)."""
    if str(device).startswith("cuda"):
        import torch

        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def l2_normalise(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit length (float32); all-zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > eps)
