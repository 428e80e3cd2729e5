"""Tiny randomly initialised encoders for fast unit tests (real loading code paths)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

WORDS = ("ocean sea wave blue surf water forest tree green moss leaf fire flame red smoke hot city night "
         "neon street desert sand dune snow ice cold jazz piano space star planet a the and of in on with").split()


def tiny_text_model(directory: Path) -> Path:
    """A 1-layer BERT (hidden 16) with a word-level vocabulary, saved like a hub model."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *".,!?"]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(directory / "vocab.txt"))
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    BertModel(config).save_pretrained(directory, safe_serialization=True)
    return directory


class HashEncoder:
    """A deterministic stand-in encoder: vectors from a hash of the input, counting calls."""

    def __init__(self, dim: int = 8, model_id: str = "hash-v1") -> None:
        self.dim, self.model_id, self.calls, self.rows = dim, model_id, 0, 0

    def encode(self, inputs: list) -> np.ndarray:
        import hashlib

        self.calls += 1
        self.rows += len(inputs)
        out = np.stack([np.frombuffer(hashlib.sha256(str(x).encode()).digest()[: self.dim * 4], dtype=np.uint32)
                        .astype(np.float32) for x in inputs])
        return out / np.linalg.norm(out, axis=1, keepdims=True)
