"""The model files behind each configured encoder and their sha256, for the manifest.

The embedding job records these hashes in `ART/manifest.json` (`models.weights_sha256`) and
folds a digest of them into each encoder's model id, which is part of every content hash:
a weights file that changed on disk (a package upgrade, a retrained checkpoint, a damaged
copy) is seen at once and that modality is encoded again. A model that is not a local file
(a hub id, timm's hub weights, random weights) has no files to hash and keeps its id.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from fusionrec.pipeline.config import EmbedConfig
from fusionrec.pipeline.encoders import image, text, whisper_ct2
from fusionrec.pipeline.io.storage import FileHashes, sha256_file

# Files of a model folder that decide its output: the weights, the config, the tokenizer.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".h5", ".msgpack", ".gguf")
CONFIG_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                "vocab.json", "vocabulary.txt", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
                "preprocessor_config.json")
ID_MARK = "#sha256:"


def folder_files(folder: Path) -> dict[str, Path]:
    """The weight and config files at the top of a model folder, by name."""
    out: dict[str, Path] = {}
    for path in sorted(Path(folder).iterdir()):
        if path.is_file() and (path.suffix in WEIGHT_SUFFIXES or path.name in CONFIG_FILES):
            out[path.name] = path
    return out


def is_weights(name: str) -> bool:
    return Path(name).suffix in WEIGHT_SUFFIXES


def encoder_files(modality: str, cfg: EmbedConfig) -> dict[str, Path]:
    """The local files the configured encoder of `modality` loads ({} for hub ids and random weights)."""
    if modality == "text":
        folder = text.default_model_dir() if cfg.text.model == text.DEFAULT_TEXT_MODEL else Path(cfg.text.model)
        return folder_files(folder) if folder.is_dir() else {}
    if modality == "image":
        weights = cfg.image.weights
        if weights == "default":
            path = image.default_weights_path()
            return {path.name: path}
        if weights in ("none", "hub"):
            return {}
        path = Path(weights)
        return {path.name: path} if path.is_file() else {}
    if modality == "audio":
        if cfg.audio.model == "default":
            folder = whisper_ct2.default_model_dir()
        else:
            folder = Path(cfg.audio.model)
        return folder_files(folder) if folder.is_dir() else {}
    return {}


def file_hashes(files: dict[str, Path], hashes: FileHashes | None = None) -> dict[str, str]:
    """sha256 of each file by name (through `hashes`, which remembers them between runs, when given)."""
    digest_of = sha256_file if hashes is None else hashes.sha256
    return {name: digest_of(path) for name, path in sorted(files.items())}


def digest(hashes: dict[str, str]) -> str:
    """One short digest over all (name, sha256) pairs."""
    text = "".join(f"{name}\x00{sha}\n" for name, sha in sorted(hashes.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_hashes(cfg: EmbedConfig, modalities: set[str] | list[str]) -> dict[str, dict[str, str]]:
    """sha256 of every model file of each modality's configured encoder (modalities without files left out)."""
    out: dict[str, dict[str, str]] = {}
    for modality in sorted(modalities):
        hashes = file_hashes(encoder_files(modality, cfg))
        if hashes:
            out[modality] = hashes
    return out


def with_files_id(model_id: str, hashes: dict[str, str]) -> str:
    """`model_id` with the digest of its files appended (unchanged when there are none)."""
    if not hashes or ID_MARK in model_id:
        return model_id
    return f"{model_id}{ID_MARK}{digest(hashes)}"
