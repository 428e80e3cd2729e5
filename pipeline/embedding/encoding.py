"""What the embedding engines share: the encoder interface the job drives, building the
configured encoders, and the rows and shards an engine receives and returns.

Both the local engine (`pipeline.embedding.job`) and the Ray engine
(`pipeline.embedding.ray_engine`) import these from here, so neither imports the other's
internals.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fusionrec.pipeline.config import EmbedConfig
from fusionrec.pipeline.encoders.audio import AudioEncoder, load_audio
from fusionrec.pipeline.encoders.base import resolve_device
from fusionrec.pipeline.encoders.image import ImageEncoder
from fusionrec.pipeline.encoders.model_files import encoder_files, file_hashes, with_files_id
from fusionrec.pipeline.encoders.text import TextEncoder
from fusionrec.pipeline.errors import MediaError


@dataclass
class ModalityEncoder:
    """What the job needs from an encoder: an identity, a dimension, and two functions.

    `prepare` turns one media path into model input (decode, resize, resample ...) and
    raises MediaError when it cannot; `encode` turns a list of prepared inputs (or texts)
    into an (n, dim) float32 matrix of L2-normalised rows.
    """

    model_id: str
    dim: int
    encode: Callable[[list], np.ndarray]
    prepare: Callable[[Path], Any] | None = None
    preprocess_id: str = ""  # preprocessing settings folded into each content hash
    files: dict[str, str] = field(default_factory=dict)  # sha256 of the model files it loaded (manifest)


def build_encoders(cfg: EmbedConfig, needed: set[str]) -> dict[str, ModalityEncoder]:
    """The configured encoders for the modalities present in the data (loaded lazily)."""
    device = resolve_device(cfg.device)
    out: dict[str, ModalityEncoder] = {}
    if "text" in needed and cfg.text.enabled:
        text = TextEncoder(cfg.text.model, device=device, batch_size=cfg.text.batch_size,
                           max_length=cfg.text.max_length)
        out["text"] = ModalityEncoder(text.model_id, text.dim, text.encode,
                                      preprocess_id=f"clean-v1;max_length={cfg.text.max_length}")
    if "image" in needed and cfg.image.enabled:
        image = ImageEncoder(cfg.image.model, weights=cfg.image.weights, device=device,
                             batch_size=cfg.image.batch_size, max_pixels=cfg.image.max_pixels)
        out["image"] = ModalityEncoder(image.model_id, image.dim, lambda xs: image.encode(np.stack(xs)),
                                       prepare=image.preprocess,
                                       preprocess_id=json.dumps(jsonable(image.data_config_), sort_keys=True))
    if "audio" in needed and cfg.audio.enabled:
        a = cfg.audio
        audio = AudioEncoder(a.model, device=device, batch_size=a.batch_size, sample_rate=a.sample_rate,
                             chunk_seconds=a.chunk_seconds)

        def prepare_audio(path: Path) -> np.ndarray:
            return load_audio(path, sample_rate=a.sample_rate, max_seconds=a.max_seconds, top_db=a.top_db,
                              target_dbfs=a.target_dbfs)

        out["audio"] = ModalityEncoder(
            audio.model_id, audio.dim, audio.encode, prepare=prepare_audio,
            preprocess_id=f"sr={a.sample_rate};max={a.max_seconds};chunk={a.chunk_seconds};"
                          f"top_db={a.top_db};dbfs={a.target_dbfs}")
    return _with_file_hashes(out, cfg)


def _with_file_hashes(encoders: dict[str, ModalityEncoder], cfg: EmbedConfig) -> dict[str, ModalityEncoder]:
    """Record each encoder's model file hashes and fold them into its model id (a changed file re-encodes)."""
    for modality, enc in encoders.items():
        enc.files = file_hashes(encoder_files(modality, cfg))
        if "+file:" not in enc.model_id:  # a checkpoint path's id carries its hash already
            enc.model_id = with_files_id(enc.model_id, enc.files)
    return encoders


def jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    return str(obj)


@dataclass(frozen=True)
class TodoRows:
    """The rows an engine must encode: a Parquet file of TODO_SCHEMA (row: the plan's row)."""

    kind: str
    modality: str
    path: Path
    rows: int


def prepare_one(enc: ModalityEncoder, path: Path) -> tuple[Any, str | None]:
    """Decode one media file: (input, None), or (None, the error text failures.parquet records)."""
    try:
        return enc.prepare(path), None  # type: ignore[misc]
    except MediaError as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001 - any decoder crash is one bad file, not a dead job
        return None, f"{type(exc).__name__}: {exc}"


@dataclass
class EncodedShard:
    """What an engine hands back for one shard of the rows to encode."""

    rows: np.ndarray  # the plan rows encoded (int64)
    ids: list[str]
    hashes: list[str]
    vectors: np.ndarray  # (len(rows), dim) float32
    errors: dict[int, str]  # plan row -> why its media could not be decoded
    handled: int  # rows of the todo table this shard covers (encoded or failed)


EncodeRows = Callable[[TodoRows, ModalityEncoder, EmbedConfig], Iterator[EncodedShard]]
