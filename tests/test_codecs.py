"""The codec protocol: input checks, resampling, `load_codec`, light imports."""

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from soundstorm.engine.codecs import CODECS, Codec, load_codec
from soundstorm.engine.codecs.audio import as_batch, read_audio, resample, resampled_length
from soundstorm.engine.codecs.melrvq import MelRVQCodec, MelRVQConfig


@pytest.fixture(scope="module")
def codec() -> MelRVQCodec:
    """A melrvq codec with random codebooks: enough to exercise the protocol's checks."""
    cfg = MelRVQConfig(num_quantizers=3, codebook_size=16, n_mels=20, griffin_lim_iters=2)
    return MelRVQCodec(cfg, torch.randn(3, 16, 20, generator=torch.Generator().manual_seed(0)))


def tone(freq: float, sr: int, seconds: float) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(x: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[spec.argmax()])


# -- resampling ------------------------------------------------------------------------
@pytest.mark.parametrize("sr_in,sr_out", [(22050, 16000), (16000, 24000), (44100, 24000), (8000, 16000)])
def test_resample_keeps_pitch_and_duration(sr_in, sr_out):
    x = torch.from_numpy(np.stack([tone(440, sr_in, 1.0), tone(1000, sr_in, 1.0)]))
    y = resample(x, sr_in, sr_out)
    assert y.dtype == torch.float32 and y.shape == (2, sr_out)
    assert abs(peak_hz(y[0].numpy(), sr_out) - 440) <= 2
    assert abs(peak_hz(y[1].numpy(), sr_out) - 1000) <= 2
    # band-limited: no loss of level away from the edges
    assert np.std(y[0, 1000:-1000].numpy()) == pytest.approx(0.5 / np.sqrt(2), rel=0.02)


def test_resample_removes_what_the_new_rate_cannot_hold():
    # 10 kHz cannot exist at 16 kHz (Nyquist 8 kHz): a proper resampler removes it instead
    # of folding it down to 6 kHz.
    y = resample(torch.from_numpy(tone(10_000, 44100, 1.0))[None], 44100, 16000)
    assert np.abs(y[0, 2000:-2000].numpy()).max() < 0.01


@pytest.mark.parametrize("n", [1, 3, 5, 7, 100, 101, 22049, 26461])
@pytest.mark.parametrize("sr_in,sr_out", [(48000, 24000), (22050, 16000), (8000, 24000), (44100, 16000)])
def test_resampled_length_predicts_the_output_length(n, sr_in, sr_out):
    assert resample(torch.zeros(1, n), sr_in, sr_out).shape[1] == resampled_length(n, sr_in, sr_out)


def test_num_frames_at_another_rate_matches_encode(codec):
    for n in (1, 441, 7055, 7057, 22050):
        assert codec.encode(torch.zeros(n), 22050).shape[1] == codec.num_frames(n, 22050)
    assert codec.num_frames(16000) == 50 and codec.num_frames(16001) == 51


def test_resample_same_rate_is_identity():
    x = torch.randn(2, 100)
    assert resample(x, 16000, 16000) is x


def test_read_audio_mixes_to_mono_and_resamples(tmp_path):
    stereo = np.stack([tone(440, 22050, 0.5), np.zeros(11025, np.float32)], axis=1)
    sf.write(tmp_path / "a.wav", stereo, 22050)
    mono, sr = read_audio(tmp_path / "a.wav")
    assert sr == 22050 and mono.shape == (11025,)
    np.testing.assert_allclose(mono, stereo.mean(1), atol=1e-4)
    mono16, sr16 = read_audio(tmp_path / "a.wav", 16000)
    assert sr16 == 16000 and mono16.shape == (8000,)
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        read_audio(tmp_path / "nope.wav")


def test_as_batch_accepts_numpy_and_torch_1d_and_2d():
    assert as_batch(np.zeros(5, np.float64)).shape == (1, 5)
    assert as_batch(torch.zeros(3, 5, dtype=torch.float16)).dtype == torch.float32


# -- the protocol on any codec ---------------------------------------------------------
def test_encode_decode_shapes_and_lengths(codec):
    assert codec.hop_length == 320 and codec.frame_rate == 50.0
    for n in (1, 319, 320, 321, 16000):
        tokens = codec.encode(torch.zeros(n).uniform_(-0.1, 0.1), 16000)
        assert tokens.dtype == torch.int64 and tokens.shape == (1, -(-n // 320), 3)
        assert 0 <= tokens.min() and tokens.max() < 16
        wav = codec.decode(tokens)
        assert wav.dtype == torch.float32 and wav.shape == (1, tokens.shape[1] * 320)


def test_batches_encode_row_by_row(codec):
    g = torch.Generator().manual_seed(0)
    wav = 0.1 * torch.randn(2, 3200, generator=g)
    tokens = codec.encode(wav, 16000)
    assert tokens.shape == (2, 10, 3)
    assert torch.equal(tokens[1:], codec.encode(wav[1], 16000))
    assert codec.decode(tokens).shape == (2, 3200)


def test_encode_resamples_other_rates(codec):
    x = torch.from_numpy(tone(300, 22050, 1.0))
    tokens = codec.encode(x, 22050)
    assert tokens.shape == (1, 50, 3)
    same = codec.encode(resample(x[None], 22050, 16000), 16000)
    assert torch.equal(tokens, same)


@pytest.mark.parametrize("wav,sr,err,match", [
    (torch.zeros(2, 3, 100), 16000, ValueError, r"wav must have shape \[samples\] or \[batch, samples\], got shape \(2, 3, 100\)"),
    (torch.zeros(1, 0), 16000, ValueError, "at least one sample"),
    (torch.zeros(100, dtype=torch.int16), 16000, TypeError, "float samples, got dtype torch.int16"),
    ([0.0, 0.1], 16000, TypeError, "torch.Tensor or numpy array"),
    (torch.full((100,), float("nan")), 16000, ValueError, "NaN"),
    (torch.zeros(100), 0, ValueError, "sr must be a positive integer sample rate in Hz, got 0"),
    (torch.zeros(100), "16k", ValueError, "got '16k'"),
    (torch.zeros(100), 10**9, ValueError, "sr must be a sample rate from 1000 to 384000 Hz, got 1000000000"),
    (torch.zeros(100), 1e9, ValueError, "from 1000 to 384000 Hz, got 1000000000.0"),
    (torch.zeros(100), 999, ValueError, "from 1000 to 384000 Hz, got 999"),
    (torch.zeros(1), 384000, ValueError, r"1 sample\(s\) at 384000 Hz is shorter than one sample .* no frames"),
])
def test_encode_rejects_bad_input(codec, wav, sr, err, match):
    with pytest.raises(err, match=match):
        codec.encode(wav, sr)


@pytest.mark.parametrize("channels", [1, 2])
def test_encode_refuses_channels_last_audio(codec, tmp_path, channels):
    """soundfile reads [samples, channels]; encode wants [samples] or [batch, samples]."""
    sf.write(tmp_path / "a.wav", np.stack([tone(440, 16000, 0.5)] * channels, axis=1), 16000)
    data, sr = sf.read(tmp_path / "a.wav", dtype="float32", always_2d=True)
    assert data.shape == (8000, channels)
    with pytest.raises(ValueError, match=r"shape \(8000, %d\): this looks like 8000 samples of "
                       r"\w+ audio in the \[samples, channels\] layout .* wav.mean\(axis=1\)"
                       % channels):
        codec.encode(data, sr)
    assert codec.encode(data.mean(axis=1), sr).shape == (1, 25, 3)
    assert codec.encode(data.T, sr).shape == (channels, 25, 3)   # a channel per clip


def test_encode_keeps_short_batches_and_the_extreme_rates(codec):
    assert codec.encode(torch.zeros(3, 2), 16000).shape == (3, 1, 3)   # 3 clips of 2 samples
    assert codec.encode(torch.zeros(1000), 1000).shape == (1, 50, 3)
    assert codec.encode(torch.zeros(384), 384000).shape == (1, 1, 3)


@pytest.mark.parametrize("tokens,err,match", [
    (torch.zeros(5, 3, dtype=torch.long), ValueError, r"shape \[batch, frames, levels\], got shape \(5, 3\) \(one clip: pass tokens\[None\]\)"),
    (torch.zeros(1, 5, 4, dtype=torch.long), ValueError, "has 4 levels .* num_quantizers=3"),
    (torch.full((1, 5, 3), 16), ValueError, r"ids must be in \[0, 16\) .* got 16"),
    (torch.full((1, 5, 3), -1), ValueError, "got -1 .*padding"),
    (torch.zeros(1, 5, 3), TypeError, "integer ids, got dtype torch.float32"),
    (torch.zeros(1, 0, 3, dtype=torch.long), ValueError, "at least one frame"),
])
def test_decode_rejects_bad_tokens(codec, tokens, err, match):
    with pytest.raises(err, match=match):
        codec.decode(tokens)


def test_codec_is_a_codec(codec):
    assert isinstance(codec, Codec)
    assert "num_quantizers=3" in repr(codec)


# -- load_codec -------------------------------------------------------------------------
def test_load_codec_rejects_unknown_names_and_options(tmp_path):
    with pytest.raises(ValueError, match=r"unknown codec 'soundstream'; expected one of \['encodec', 'dac', 'mimi', 'melrvq'\]"):
        load_codec("soundstream")
    with pytest.raises(TypeError, match="bad options.*'bandwdth'"):
        load_codec("encodec", bandwdth=6.0, random_init=True)
    assert CODECS == ("encodec", "dac", "mimi", "melrvq")


@pytest.mark.parametrize("name,hint", [
    ("encodec", "hf download facebook/encodec_24khz --local-dir"),
    ("dac", "hf download descript/dac_16khz --local-dir"),
    ("mimi", "hf download kyutai/mimi --local-dir"),
    ("melrvq", "fit_melrvq"),
])
def test_missing_directory_says_how_to_get_the_weights(tmp_path, name, hint):
    missing = tmp_path / "no-such-dir"
    with pytest.raises(FileNotFoundError, match=hint) as info:
        load_codec(name, path=missing)
    assert str(missing) in str(info.value)


@pytest.mark.parametrize("name", ["encodec", "dac", "mimi", "melrvq"])
def test_no_path_and_no_random_init_is_an_error(name):
    with pytest.raises(ValueError, match="needs path=DIR"):
        load_codec(name)


def test_weights_directory_needs_config_and_safetensors(tmp_path):
    d = tmp_path / "enc"
    d.mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_codec("encodec", path=d)
    (d / "config.json").write_text(json.dumps({"model_type": "encodec"}))
    (d / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match=r"no \*.safetensors file \(pickled checkpoints are not loaded\)"):
        load_codec("encodec", path=d)


def test_importing_the_engine_and_codecs_stays_light():
    code = ("import sys, soundstorm.engine, soundstorm.engine.codecs;"
            "from soundstorm.engine.codecs import load_codec;"
            "heavy = [m for m in ('transformers', 'librosa', 'torchaudio', 'encodec') if m in sys.modules];"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# -- with the engine ---------------------------------------------------------------------
def test_engine_output_decodes_and_streams_through_a_codec(tiny_model):
    """A voice prompt encoded by a codec conditions generation, and the engine's tokens
    (and each streamed window) decode to audio of frames x hop samples."""
    from soundstorm.engine import Engine

    cfg = tiny_model.config
    g = torch.Generator().manual_seed(0)
    codec = MelRVQCodec(MelRVQConfig(num_quantizers=cfg.num_quantizers,
                                     codebook_size=cfg.codebook_size, n_mels=20,
                                     griffin_lim_iters=2),
                        torch.randn(cfg.num_quantizers, cfg.codebook_size, 20, generator=g))
    engine = Engine(tiny_model, backend="torch")
    prompt = codec.encode(torch.from_numpy(tone(220, 22050, 0.3)), 22050)   # [1, 15, Q]
    semantic = torch.randint(0, cfg.semantic_vocab_size, (1, 40), generator=g)
    tokens = engine.generate(semantic, prompt=prompt, seed=1)
    assert torch.equal(tokens[:, :15], prompt)
    assert codec.decode(tokens).shape == (1, tokens.shape[1] * 320)
    chunks = list(engine.stream(semantic[0], prompt=prompt[0], seed=1, codec=codec,
                                window=40, overlap=10))
    assert len(chunks) > 1
    for chunk in chunks:
        assert chunk.audio.shape == (1, chunk.tokens.shape[0] * 320)
