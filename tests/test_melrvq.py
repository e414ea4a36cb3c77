"""The built-in melrvq codec, fit on espeak-ng speech: round trips, the error falling as
Q grows, intelligibility, storage and fitting."""

import json

import librosa
import numpy as np
import pytest
import torch
from pystoi import stoi

from soundstorm.engine.codecs import load_codec
from soundstorm.engine.codecs.audio import read_audio
from soundstorm.engine.codecs.melrvq import MelRVQCodec, MelRVQConfig
from soundstorm.training.codec_fit import fit_melrvq, kmeans

from speech import espeak_corpus

Q, C = 8, 64


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Six espeak-ng sentences (22050 Hz WAV files); the first is held out of fitting."""
    return espeak_corpus(tmp_path_factory.mktemp("speech"))


@pytest.fixture(scope="module")
def codec_dir(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("codec") / "melrvq"
    fit_melrvq(corpus[1:], out, num_quantizers=Q, codebook_size=C, progress=False)
    return out


@pytest.fixture(scope="module")
def held_out(corpus):
    """The held-out sentence at 16 kHz, float32 [N]."""
    return read_audio(corpus[0], 16000)[0]


def test_fit_writes_a_codec_directory(codec_dir):
    assert sorted(p.name for p in codec_dir.iterdir()) == ["codebooks.safetensors", "config.json"]
    codec = load_codec("melrvq", path=codec_dir)
    assert (codec.sample_rate, codec.hop_length, codec.frame_rate) == (16000, 320, 50.0)
    assert (codec.num_quantizers, codec.codebook_size) == (Q, C)
    assert codec.codebooks.shape == (Q, C, 80) and codec.codebooks.dtype == torch.float32


def test_round_trip_on_speech(codec_dir, corpus, held_out):
    codec = load_codec("melrvq", path=codec_dir)
    wav, sr = read_audio(corpus[0])                       # espeak-ng's own 22050 Hz
    assert sr == 22050
    tokens = codec.encode(wav, sr)                        # resampled to 16 kHz with soxr
    assert tokens.dtype == torch.int64 and tokens.shape == (1, -(-len(held_out) // 320), Q)
    assert tokens.min() >= 0 and tokens.max() < C
    assert torch.equal(tokens, codec.encode(held_out, 16000))
    # every level uses many codewords: k-means left no dead codebook
    assert all(len(tokens[0, :, q].unique()) > C // 4 for q in range(Q))
    audio = codec.decode(tokens)
    assert audio.shape == (1, tokens.shape[1] * 320) and torch.isfinite(audio).all()
    assert torch.equal(codec.decode(tokens), audio)      # Griffin-Lim starts from a fixed phase
    assert 0.05 < audio.abs().max() < 2.0


def log_spectral_distance(a: np.ndarray, b: np.ndarray, sr: int = 16000) -> float:
    """RMS difference in dB of two signals' mel spectra (frames aligned, silence floored)."""
    n = min(len(a), len(b))
    ma, mb = (librosa.feature.melspectrogram(y=x[:n], sr=sr, n_fft=1024, hop_length=160, n_mels=64)
              for x in (a, b))
    da, db = (10 * np.log10(np.maximum(m, 1e-4)) for m in (ma, mb))
    return float(np.sqrt(np.mean((da - db) ** 2)))


def test_reconstruction_error_falls_as_q_grows(codec_dir, held_out):
    wav = torch.from_numpy(held_out)[None]
    feature_err, spectral_err = [], []
    for q in (1, 2, 4, 8):
        codec = load_codec("melrvq", path=codec_dir, num_quantizers=q)
        tokens = codec.encode(wav, 16000)
        feature_err.append((codec.dequantize(tokens) - codec.log_mel(wav)).pow(2).mean().item())
        spectral_err.append(log_spectral_distance(held_out, codec.decode(tokens)[0].numpy()))
    assert all(a > b for a, b in zip(feature_err, feature_err[1:])), feature_err
    assert all(a > b for a, b in zip(spectral_err, spectral_err[1:])), spectral_err
    assert feature_err[-1] < 0.4 * feature_err[0]


def test_round_trip_is_intelligible_speech(codec_dir, corpus):
    """Two listening proxies on audio the codec round-tripped. STOI (short-time objective
    intelligibility, 0..1) against the original; above ~0.75 listeners understand nearly
    every word. And identification: each round-tripped sentence is closer (DTW over
    MFCCs) to its own original than to any of the other five sentences."""
    codec = load_codec("melrvq", path=codec_dir)
    originals = [read_audio(p, 16000)[0] for p in corpus]
    decoded = [codec.decode(codec.encode(x, 16000))[0].numpy()[:len(x)] for x in originals]
    held_out_stoi = stoi(originals[0], decoded[0], 16000)
    assert held_out_stoi > 0.72, held_out_stoi

    def mfcc(x):
        m = librosa.feature.mfcc(y=x, sr=16000, n_mfcc=20, n_fft=512, hop_length=160)[1:]
        return (m - m.mean(1, keepdims=True)) / (m.std(1, keepdims=True) + 1e-8)

    refs = [mfcc(x) for x in originals]
    for i, y in enumerate(decoded):
        costs = []
        for r in refs:
            d, path = librosa.sequence.dtw(X=mfcc(y), Y=r, metric="euclidean")
            costs.append(d[-1, -1] / len(path))
        assert int(np.argmin(costs)) == i, (i, costs)


def test_num_quantizers_keeps_the_first_levels(codec_dir, held_out):
    full = load_codec("melrvq", path=codec_dir).encode(held_out, 16000)
    coarse = load_codec("melrvq", path=codec_dir, num_quantizers=3)
    assert coarse.num_quantizers == 3
    assert torch.equal(coarse.encode(held_out, 16000), full[..., :3])
    with pytest.raises(ValueError, match=r"num_quantizers must be an integer in \[1, 8\] .* got 9"):
        load_codec("melrvq", path=codec_dir, num_quantizers=9)


def test_fit_is_seeded_and_takes_arrays_or_files(corpus, tmp_path):
    kw = dict(num_quantizers=2, codebook_size=16, iterations=4, progress=False)
    a = fit_melrvq(corpus[1:3], tmp_path / "a", seed=1, **kw)
    arrays = [read_audio(p) for p in corpus[1:3]]         # (samples at 22050, 22050)
    b = fit_melrvq(arrays, tmp_path / "b", seed=1, **kw)
    c = fit_melrvq(corpus[1:3], tmp_path / "c", seed=2, **kw)
    assert torch.equal(a.codebooks, b.codebooks)
    assert not torch.equal(a.codebooks, c.codebooks)


def test_fit_keeps_a_random_subset_of_a_long_corpus(corpus, tmp_path):
    kw = dict(num_quantizers=1, codebook_size=8, iterations=2, progress=False)
    a = fit_melrvq(corpus[1:], tmp_path / "a", max_frames=300, **kw)
    b = fit_melrvq(corpus[1:], tmp_path / "b", max_frames=300, **kw)
    assert torch.equal(a.codebooks, b.codebooks)
    with pytest.raises(ValueError, match="max_frames=4 must be at least codebook_size=8"):
        fit_melrvq(corpus[1:2], tmp_path / "c", max_frames=4, **kw)


def test_fit_other_rates_and_sizes(corpus, tmp_path):
    codec = fit_melrvq(corpus[1:3], tmp_path / "c24", num_quantizers=3, codebook_size=8,
                       iterations=3, progress=False, sample_rate=24000, n_mels=64, n_fft=1920)
    loaded = load_codec("melrvq", path=tmp_path / "c24")
    assert (loaded.sample_rate, loaded.hop_length, loaded.frame_rate) == (24000, 480, 50.0)
    assert loaded.codebooks.shape == (3, 8, 64) and torch.equal(loaded.codebooks, codec.codebooks)
    wav, sr = read_audio(corpus[0])
    tokens = loaded.encode(wav, sr)
    assert tokens.shape[1] == -(-round(len(wav) * 24000 / sr) // 480)
    assert loaded.decode(tokens).shape == (1, tokens.shape[1] * 480)


@pytest.mark.parametrize("audio,kw,err,match", [
    ([], {}, ValueError, "audio is empty"),
    ("PATHS", {"codebook_size": 4096}, ValueError, "fewer than codebook_size=4096"),
    ([3], {}, TypeError, r"audio\[0\] must be a sound-file path or a \(samples, rate\) pair, got int"),
    ("ONE", {}, TypeError, "wrap it in a list"),
    ([(np.zeros((2, 100), np.float32), 16000)], {}, ValueError, r"audio\[0\] samples must be one mono clip"),
    ([(np.zeros(100, np.float32), -5)], {}, ValueError, r"audio\[0\] rate must be a positive integer"),
    ("PATHS", {"iterations": 0}, ValueError, "iterations must be a positive integer, got 0"),
    ("PATHS", {"sample_rate": 16001}, ValueError, "multiple of frame_rate"),
    ("PATHS", {"n_melz": 40}, TypeError, "n_melz"),
])
def test_fit_rejects_bad_input(corpus, tmp_path, audio, kw, err, match):
    audio = {"PATHS": corpus[1:2], "ONE": str(corpus[1])}.get(audio, audio) \
        if isinstance(audio, str) else audio
    with pytest.raises(err, match=match):
        fit_melrvq(audio, tmp_path / "x", progress=False, **kw)
    assert not (tmp_path / "x").exists()


def test_kmeans_finds_separated_clusters_and_keeps_every_codeword():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(200, 2, generator=g) for c in centres])
    found = kmeans(x, 3, 10, torch.Generator().manual_seed(1))
    dist = torch.cdist(centres, found).min(1).values
    assert (dist < 0.1).all(), found
    # more codewords than distinct points: none is left empty or NaN
    few = kmeans(torch.eye(4).repeat(10, 1), 6, 5, torch.Generator().manual_seed(0))
    assert torch.isfinite(few).all()


def test_load_rejects_broken_directories(codec_dir, tmp_path):
    import shutil

    d = tmp_path / "c"
    shutil.copytree(codec_dir, d)
    meta = json.loads((d / "config.json").read_text())

    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_codec("melrvq", path=d)
    (d / "config.json").write_text(json.dumps({**meta, "format": "something-else"}))
    with pytest.raises(ValueError, match="is not a melrvq codec config"):
        load_codec("melrvq", path=d)
    (d / "config.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        load_codec("melrvq", path=d)
    (d / "config.json").write_text(json.dumps({**meta, "codec": {**meta["codec"], "n_mels": 40}}))
    with pytest.raises(ValueError, match=r"codebooks must be a float tensor of shape .*\(8, 64, 40\), got \(8, 64, 80\)"):
        load_codec("melrvq", path=d)
    (d / "config.json").write_text(json.dumps({**meta, "codec": {**meta["codec"], "hop": 3}}))
    with pytest.raises(ValueError, match=r"unknown MelRVQConfig fields \['hop'\]"):
        load_codec("melrvq", path=d)
    (d / "config.json").write_text(json.dumps(meta))
    (d / "codebooks.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_codec("melrvq", path=d)
    (d / "codebooks.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no codebooks.safetensors"):
        load_codec("melrvq", path=d)


def test_save_replaces_files_atomically(codec_dir, tmp_path):
    codec = load_codec("melrvq", path=codec_dir)
    codec.save(tmp_path / "out")
    codec.save(tmp_path / "out")                          # over an existing codec
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == \
        ["codebooks.safetensors", "config.json"]          # no temporaries left behind
    assert torch.equal(load_codec("melrvq", path=tmp_path / "out").codebooks, codec.codebooks)


@pytest.mark.parametrize("kw,match", [
    ({"sample_rate": 16000, "frame_rate": 48}, "multiple of frame_rate"),
    ({"n_fft": 100}, "n_fft .* must be at least the hop"),
    ({"fmax": 9000.0}, "fmax <= sample_rate/2"),
    ({"codebook_size": 0}, "codebook_size must be a positive integer, got 0"),
    ({"num_quantizers": 2.0}, "num_quantizers must be a positive integer, got 2.0"),
    ({"log_floor": 0.0}, "log_floor must be > 0"),
])
def test_config_is_validated(kw, match):
    with pytest.raises(ValueError, match=match):
        MelRVQConfig(**kw)
    with pytest.raises(ValueError, match=r"codebooks must be a float tensor of shape \[num_quantizers"):
        MelRVQCodec(MelRVQConfig(num_quantizers=2, codebook_size=4, n_mels=8), torch.zeros(2, 4, 9))
