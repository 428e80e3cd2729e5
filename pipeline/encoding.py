"""Small pieces every encoder shares: device choice, bf16 autocast on CUDA, L2 normalisation."""

from __future__ import annotations

import contextlib

import numpy as np


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


def l2_normalise(matrix: np.ndarray) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.maximum(norms, 1e-12)
