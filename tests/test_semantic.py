"""Semantic tokenizers (mfcc, and HuBERT / w2v-BERT as small random models): shapes, rates,
storage, seeding, bad input, the fit-semantic and fit-codec commands, and mfcc ids that
follow what is said more than who says it (espeak-ng voices)."""

import json
import re
import shutil

import librosa
import numpy as np
import pytest
import torch

from soundstorm.cli import main
from soundstorm.engine.codecs import load_codec
from soundstorm.engine.codecs.audio import read_audio
from soundstorm.training.semantic import (KINDS, HFTokenizer, SemanticTokenizer,
                                          fit_semantic, load_semantic, pool)

from speech import SENTENCES, espeak_corpus

K = 16
HF_KINDS = ("hubert", "w2v-bert")


def noise_clips(n=3, seconds=2.0, sr=16000, seed=0):
    """(samples, rate) pairs of band-limited noise bursts: cheap audio with some structure."""
    rng = np.random.default_rng(seed)
    clips = []
    for _ in range(n):
        x = rng.standard_normal(int(seconds * sr)).astype(np.float32)
        x = np.convolve(x, np.hanning(rng.integers(3, 40)), mode="same").astype(np.float32)
        env = np.repeat(rng.random(int(seconds * 10)), sr // 10)[:len(x)].astype(np.float32)
        clips.append((0.1 * x * env / np.abs(x).max(), sr))
    return clips


@pytest.fixture(scope="module")
def audio():
    return noise_clips()


@pytest.fixture(scope="module")
def mfcc_dir(audio, tmp_path_factory):
    out = tmp_path_factory.mktemp("sem") / "mfcc"
    fit_semantic("mfcc", audio, out, vocab_size=K, iterations=5, progress=False)
    return out


@pytest.fixture(scope="module", params=KINDS)
def tok_dir(request, audio, tmp_path_factory):
    """A tokenizer of each kind (hubert and w2v-bert: small random models) fit on `audio`."""
    out = tmp_path_factory.mktemp("sem") / request.param
    fit_semantic(request.param, audio, out, vocab_size=K, iterations=5, progress=False,
                 random_init=request.param != "mfcc")
    return out


def load(d):
    meta = json.loads((d / "semantic.json").read_text())
    return load_semantic(d, **({"random_init": True} if meta["kind"] != "mfcc" else {}))


def test_directory_round_trip_gives_identical_ids(tok_dir, audio):
    assert sorted(p.name for p in tok_dir.iterdir()) == ["centroids.safetensors", "semantic.json"]
    meta = json.loads((tok_dir / "semantic.json").read_text())
    tok = load(tok_dir)
    assert isinstance(tok, SemanticTokenizer) and tok.kind == meta["kind"] in KINDS
    assert (tok.sample_rate, tok.rate, tok.vocab_size) == (16000, 25.0, K)
    x = audio[0][0]
    ids = tok.tokenize(x, 16000)
    assert ids.dtype == torch.int64 and ids.shape == (50,)          # 2 s at 25 Hz
    assert ids.min() >= 0 and ids.max() < K and len(ids.unique()) > 2
    tok.save(tok_dir.parent / (tok_dir.name + "-copy"))
    again = load(tok_dir.parent / (tok_dir.name + "-copy"))
    assert torch.equal(again.tokenize(torch.from_numpy(x), 16000), ids)  # torch input too


@pytest.mark.parametrize("n,sr", [(1, 16000), (7, 16000), (399, 16000), (641, 16000),
                                  (16001, 16000), (12347, 22050), (3, 44100), (30001, 24000),
                                  (8191, 8000)])
def test_num_ids_matches_tokenize(tok_dir, n, sr):
    tok = load(tok_dir)
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32) * 0.1
    ids = tok.tokenize(x, sr)
    assert len(ids) == tok.num_ids(n, sr) == max(1, -(-round(n * 16000 / sr) * 25 // 16000))
    assert ids.min() >= 0 and ids.max() < K


def test_other_rates_and_resampled_input(audio, tmp_path):
    tok = fit_semantic("mfcc", audio, tmp_path / "r", vocab_size=8, rate=12.5, iterations=3,
                       progress=False)
    assert load_semantic(tmp_path / "r").rate == 12.5
    assert tok.num_ids(32000) == 25 and tok.num_ids(32001) == 26 and tok.num_ids(0) == 1
    x = audio[0][0]
    at_48k = librosa.resample(x, orig_sr=16000, target_sr=48000)
    same = (tok.tokenize(x, 16000) == tok.tokenize(at_48k, 48000)).float().mean()
    assert same > 0.8                                   # the same sound, resampled with soxr
    fast = fit_semantic("mfcc", audio, tmp_path / "f", vocab_size=8, rate=50, iterations=3,
                        progress=False)
    assert len(fast.tokenize(x, 16000)) == 100


def test_pool_averages_frames_inside_each_window():
    frames = torch.arange(10, dtype=torch.float32)[:, None]      # frame i centred on 160 i
    out = pool(frames, hop=160, offset=0, sample_rate=16000, rate=25, num=3)
    assert out.flatten().tolist() == [1.5, 5.5, 8.5]             # [0..3], [4..7], [8, 9]
    # windows shorter than a frame: the frame nearest the window's centre
    out = pool(frames[:2], hop=160, offset=0, sample_rate=16000, rate=400, num=8)
    assert out.flatten().tolist() == [0, 0, 1, 1, 1, 1, 1, 1]  # centres 20, 60, 100, ...: 0 or 160


def test_fit_is_seeded(audio, tmp_path):
    kw = dict(vocab_size=8, iterations=4, progress=False)
    a = fit_semantic("mfcc", audio, tmp_path / "a", seed=1, **kw)
    b = fit_semantic("mfcc", audio, tmp_path / "b", seed=1, **kw)
    c = fit_semantic("mfcc", audio, tmp_path / "c", seed=2, **kw)
    assert torch.equal(a.centroids, b.centroids)
    assert not torch.equal(a.centroids, c.centroids)
    # a random subset of a long corpus, the same one for the same seed
    d = fit_semantic("mfcc", audio, tmp_path / "d", max_frames=60, **kw)
    e = fit_semantic("mfcc", audio, tmp_path / "e", max_frames=60, **kw)
    assert torch.equal(d.centroids, e.centroids)


def test_files_and_arrays_fit_the_same(audio, tmp_path):
    import soundfile as sf

    paths = []
    for i, (x, sr) in enumerate(audio):
        paths.append(tmp_path / f"c{i}.wav")
        sf.write(paths[-1], x, sr, subtype="FLOAT")
    kw = dict(vocab_size=8, iterations=3, progress=False)
    a = fit_semantic("mfcc", paths, tmp_path / "a", **kw)
    b = fit_semantic("mfcc", audio, tmp_path / "b", **kw)
    assert torch.equal(a.centroids, b.centroids)


@pytest.mark.parametrize("kind", HF_KINDS)
def test_hf_layer_selection(kind, audio, tmp_path):
    x = audio[1][0]
    deep = HFTokenizer(kind, random_init=True)                   # default: layer 6
    shallow = HFTokenizer(kind, layer=2, random_init=True)
    assert (deep.layer, shallow.layer, deep.num_layers) == (6, 2, 6)
    assert len(shallow.model.encoder.layers) == 2                # the layers above are dropped
    e2, e6 = shallow.embed(x, 16000), deep.embed(x, 16000)
    assert e2.shape == e6.shape == (50, 32) and not torch.allclose(e2, e6)
    # the truncated model gives the full model's hidden states of that layer
    inputs = deep.extractor(x, sampling_rate=16000, return_tensors="pt")
    key = "input_values" if kind == "hubert" else "input_features"
    with torch.no_grad():
        want = deep.model(inputs[key], output_hidden_states=True).hidden_states[2][0]
    assert torch.allclose(shallow._frames(x), want, atol=1e-5)
    tok = fit_semantic(kind, audio, tmp_path / "l2", vocab_size=K, iterations=3, layer=2,
                       random_init=True, progress=False)
    meta = json.loads((tmp_path / "l2" / "semantic.json").read_text())
    assert meta["kind"] == kind and meta["settings"]["layer"] == 2
    assert meta["settings"]["random_init"] is True and meta["rate"] == 25
    assert load_semantic(tmp_path / "l2", random_init=True).layer == 2
    assert torch.equal(load_semantic(tmp_path / "l2", random_init=True).tokenize(x, 16000),
                       tok.tokenize(x, 16000))
    for bad in (0, 7, 2.0, True):
        with pytest.raises(ValueError, match=rf"layer must be an integer in \[1, 6\] .* got {bad!r}"):
            fit_semantic(kind, audio, tmp_path / "x", layer=bad, random_init=True, progress=False)
    assert not (tmp_path / "x").exists()


def test_hf_long_clips_go_through_in_pieces(audio):
    tok = HFTokenizer("hubert", layer=1, random_init=True)
    x = np.concatenate([a for a, _ in audio])                    # 6 s
    whole = tok._frames(x)
    tok.CHUNK = 320 * 40                                         # 0.8 s pieces
    pieces = tok._frames(x)
    # the same 50 Hz frame grid (the values differ: each piece is its own utterance)
    assert pieces.shape == whole.shape == ((len(x) - 400) // 320 + 1, 32)


@pytest.mark.parametrize("kind", HF_KINDS)
def test_hf_weights_from_a_directory(kind, audio, tmp_path):
    from safetensors.torch import save_file

    small = HFTokenizer(kind, random_init=True)
    weights = tmp_path / "weights"
    small.model.save_pretrained(weights)                        # config.json + safetensors
    tok = fit_semantic(kind, audio, tmp_path / "t", vocab_size=K, iterations=3,
                       model_path=weights, progress=False)
    meta = json.loads((tmp_path / "t" / "semantic.json").read_text())
    assert meta["settings"]["model_path"] == str(weights.resolve())
    assert meta["settings"]["random_init"] is False
    x = audio[2][0]
    ids = tok.tokenize(x, 16000)
    assert torch.equal(load_semantic(tmp_path / "t").tokenize(x, 16000), ids)
    moved = tmp_path / "moved"
    shutil.move(weights, moved)
    with pytest.raises(FileNotFoundError, match=rf"{kind} model directory .*weights.* does not "
                                                r"exist: download the weights once with `hf download"):
        load_semantic(tmp_path / "t")
    assert torch.equal(load_semantic(tmp_path / "t", model_path=moved).tokenize(x, 16000), ids)
    with pytest.raises(ValueError, match="random_init=True would give other features"):
        load_semantic(tmp_path / "t", random_init=True)
    with pytest.raises(ValueError, match="fit on a small random model .* random_init=True"):
        load_semantic(_random_fit(kind, audio, tmp_path))
    # a checkpoint of another model
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "encodec"}))
    save_file({"w": torch.zeros(1)}, str(other / "model.safetensors"))
    with pytest.raises(ValueError, match=r"declares model_type='encodec'"):
        fit_semantic(kind, audio, tmp_path / "y", model_path=other, progress=False)


def _random_fit(kind, audio, tmp_path):
    out = tmp_path / "random"
    fit_semantic(kind, audio, out, vocab_size=K, iterations=2, random_init=True, progress=False)
    return out


@pytest.mark.parametrize("kind", HF_KINDS)
def test_hf_needs_weights(kind, audio, tmp_path):
    with pytest.raises(ValueError, match=rf"the {kind} semantic tokenizer needs model_path=DIR"
                                         r".*hf download facebook/"):
        fit_semantic(kind, audio, tmp_path / "x", progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist: download the weights once"):
        fit_semantic(kind, audio, tmp_path / "x", model_path=tmp_path / "none", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        fit_semantic(kind, audio, tmp_path / "x", model_path=tmp_path / "empty", progress=False)
    with pytest.raises(ValueError, match="either model_path=DIR .* or random_init=True"):
        fit_semantic(kind, audio, tmp_path / "x", model_path=tmp_path / "empty",
                     random_init=True, progress=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("audio_in,kw,err,match", [
    ("AUDIO", {"kind": "whisper"}, ValueError, "kind must be one of mfcc, hubert, w2v-bert, got 'whisper'"),
    ("AUDIO", {"vocab_size": 0}, ValueError, "vocab_size must be a positive integer, got 0"),
    ("AUDIO", {"vocab_size": 3.0}, ValueError, "vocab_size must be a positive integer, got 3.0"),
    ("AUDIO", {"rate": 0}, ValueError, "rate must be a positive number of ids per second, got 0"),
    ("AUDIO", {"rate": float("nan")}, ValueError, "rate must be a positive number .* got nan"),
    ("AUDIO", {"iterations": 0}, ValueError, "iterations must be a positive integer, got 0"),
    ("AUDIO", {"max_frames": 4}, ValueError, "max_frames=4 must be at least vocab_size=16"),
    ("AUDIO", {"vocab_size": 4096}, ValueError, r"audio has 150 frames at 25 Hz \(6.0 s\), fewer than vocab_size=4096"),
    ("AUDIO", {"layer": 3}, ValueError, "layer=3 applies only to the hubert and w2v-bert kinds"),
    ("AUDIO", {"random_init": True}, ValueError, "random_init=True applies only to the hubert"),
    ([], {}, ValueError, "audio is empty: fit_semantic needs at least one clip"),
    ([(np.zeros(0, np.float32), 16000)], {}, ValueError, r"audio\[0\] samples must hold at least one clip"),
    ("ONE", {}, TypeError, "wrap it in a list"),
    ([3], {}, TypeError, r"audio\[0\] must be a sound-file path or a \(samples, rate\) pair, got int"),
    ([(np.zeros((2, 100), np.float32), 16000)], {}, ValueError, r"audio\[0\] samples must be one mono clip"),
    ([(np.zeros(100, np.float32), 0)], {}, ValueError, r"audio\[0\] rate must be a positive integer"),
    (["missing.wav"], {}, FileNotFoundError, "audio file 'missing.wav' does not exist"),
])
def test_fit_rejects_bad_input(audio, tmp_path, audio_in, kw, err, match):
    audio_in = {"AUDIO": audio, "ONE": audio[0]}.get(audio_in, audio_in) \
        if isinstance(audio_in, str) else audio_in
    kw = {"kind": "mfcc", "vocab_size": K, **kw}
    with pytest.raises(err, match=match):
        fit_semantic(kw.pop("kind"), audio_in, tmp_path / "x", progress=False, **kw)
    assert not (tmp_path / "x").exists()


def test_tokenize_rejects_bad_input(mfcc_dir):
    tok = load_semantic(mfcc_dir)
    with pytest.raises(ValueError, match=r"wav must be one mono clip of shape \[samples\], got shape \(2, 100\)"):
        tok.tokenize(np.zeros((2, 100), np.float32), 16000)
    with pytest.raises(ValueError, match=r"wav must be one mono clip .* got shape \(1, 100\)"):
        tok.tokenize(torch.zeros(1, 100), 16000)
    with pytest.raises(ValueError, match="at least one sample"):
        tok.tokenize(np.zeros(0, np.float32), 16000)
    with pytest.raises(TypeError, match="must hold float samples"):
        tok.tokenize(np.zeros(100, np.int16), 16000)
    with pytest.raises(ValueError, match="NaN or infinite"):
        tok.tokenize(np.full(100, np.nan, np.float32), 16000)
    with pytest.raises(ValueError, match="sr must be a positive integer sample rate in Hz, got -1"):
        tok.tokenize(np.zeros(100, np.float32), -1)
    with pytest.raises(ValueError, match="num_samples must be a non-negative integer, got -3"):
        tok.num_ids(-3)


def test_load_rejects_broken_directories(mfcc_dir, tmp_path):
    d = tmp_path / "t"
    shutil.copytree(mfcc_dir, d)
    meta = json.loads((d / "semantic.json").read_text())
    with pytest.raises(FileNotFoundError, match="does not exist: fit one with `soundstorm fit-semantic"):
        load_semantic(tmp_path / "none")
    (d / "semantic.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_semantic(d)
    (d / "semantic.json").write_text(json.dumps({**meta, "format": "melrvq"}))
    with pytest.raises(ValueError, match="is not a semantic tokenizer config"):
        load_semantic(d)
    (d / "semantic.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="is not a semantic tokenizer config"):
        load_semantic(d)
    (d / "semantic.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99; this version reads 1"):
        load_semantic(d)
    (d / "semantic.json").write_text(json.dumps({**meta, "kind": "wavlm"}))
    with pytest.raises(ValueError, match="is corrupt: needs kind in"):
        load_semantic(d)
    (d / "semantic.json").write_text(json.dumps({**meta, "rate": -1}))
    with pytest.raises(ValueError, match="rate must be a positive number"):
        load_semantic(d)
    (d / "semantic.json").write_text(json.dumps({**meta, "vocab_size": 9}))
    with pytest.raises(ValueError, match=r"centroids of shape \(16, 39\), but .* vocab_size=9"):
        load_semantic(d)
    (d / "semantic.json").write_text(json.dumps({**meta, "settings": {**meta["settings"], "n_mfcc": 20}}))
    with pytest.raises(ValueError, match=r"mfcc centroids must be a float32 tensor of shape \[vocab_size, 60\], got \(16, 39\)"):
        load_semantic(d)
    (d / "semantic.json").write_text(json.dumps({**meta, "settings": {**meta["settings"], "hop": 3}}))
    with pytest.raises(ValueError, match="unknown mfcc settings"):
        load_semantic(d)
    (d / "semantic.json").write_text(json.dumps(meta))
    with pytest.raises(TypeError, match="an mfcc tokenizer takes no options"):
        load_semantic(d, model_path="x")
    (d / "centroids.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_semantic(d)
    (d / "centroids.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no centroids.safetensors"):
        load_semantic(d)


def test_mfcc_ids_agree_across_voices(tmp_path):
    """The same sentences in two espeak-ng voices (a male and a female variant) give ids
    that agree, along a DTW alignment of the two, much more often than the ids of
    different sentences aligned the same way. Fit, as a real corpus would be, on several
    voices."""
    voices = ("en-us+m3", "en-us+f3", "en-us+m1", "en-us+f2", "en-gb")
    corpus = {v: espeak_corpus(tmp_path / v.replace("+", "_"), voice=v) for v in voices}
    tok = fit_semantic("mfcc", [p for v in voices for p in corpus[v]], tmp_path / "sem",
                       vocab_size=64, progress=False)

    def utterances(voice):
        out = []
        for p in corpus[voice]:
            wav, sr = read_audio(p)                            # espeak-ng's 22050 Hz
            out.append((tok.embed(wav, sr).numpy().T, tok.tokenize(wav, sr).numpy()))
        return out

    a, b = (utterances(v) for v in voices[:2])

    def agreement(x, y):
        _, path = librosa.sequence.dtw(X=x[0], Y=y[0], metric="euclidean")
        return np.mean([x[1][i] == y[1][j] for i, j in path])

    n = len(SENTENCES)
    same = np.mean([agreement(a[i], b[i]) for i in range(n)])
    other = np.mean([agreement(a[i], b[j]) for i in range(n) for j in range(n) if i != j])
    assert same > 2 * other, (same, other)                # about 0.13 against 0.03 here


def test_tokenizing_is_fast(mfcc_dir):
    import time

    tok = load_semantic(mfcc_dir)
    x = np.random.default_rng(0).standard_normal(16000 * 20).astype(np.float32) * 0.1
    tok.tokenize(x, 16000)
    start = time.perf_counter()
    ids = tok.tokenize(x, 16000)
    assert len(ids) == 500
    assert time.perf_counter() - start < 2.0                    # 20 s of audio; ~0.1 s here


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_fit_semantic_and_fit_codec_commands(audio, tmp_path, capsys):
    import soundfile as sf

    (tmp_path / "speech" / "spk").mkdir(parents=True)
    for i, (x, sr) in enumerate(audio):
        sf.write(tmp_path / "speech" / "spk" / f"u{i}.wav", x, sr, subtype="FLOAT")
    code, out, _ = run_cli(capsys, "fit-semantic", tmp_path / "speech", "--out", tmp_path / "sem",
                           "--vocab-size", 8, "--rate", 12.5, "--iterations", 3, "--seed", 3,
                           "--no-progress")
    assert code == 0 and "fit a mfcc semantic tokenizer (8 ids at 12.5 Hz) on 3 files" in out
    tok = load_semantic(tmp_path / "sem")
    want = fit_semantic("mfcc", audio, tmp_path / "api", vocab_size=8, rate=12.5, iterations=3,
                        seed=3, progress=False)
    assert torch.equal(tok.centroids, want.centroids)

    code, out, _ = run_cli(capsys, "fit-codec", tmp_path / "speech", "--out", tmp_path / "codec",
                           "--num-quantizers", 2, "--codebook-size", 8, "--iterations", 2,
                           "--no-progress")
    assert code == 0 and "fit a melrvq codec (Q=2, C=8) on 3 files" in out
    codec = load_codec("melrvq", path=tmp_path / "codec")
    assert (codec.num_quantizers, codec.codebook_size) == (2, 8)

    for argv, match in [
        (["fit-semantic", tmp_path / "speech", "--out", tmp_path / "x", "--vocab-size", 0],
         "vocab_size must be a positive integer, got 0"),
        (["fit-semantic", tmp_path / "speech", "--out", tmp_path / "x", "--kind", "hubert"],
         "needs model_path=DIR.*hf download facebook/hubert-base-ls960"),
        (["fit-semantic", tmp_path / "nowhere", "--out", tmp_path / "x"], "does not exist"),
        (["fit-codec", tmp_path / "speech", "--out", tmp_path / "x", "--codebook-size", 100000],
         "fewer than codebook_size=100000"),
    ]:
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in argv])
        assert e.value.code == 2
        assert re.search(match, capsys.readouterr().err), argv
    for cmd in ("fit-semantic", "fit-codec"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0 and "--out" in capsys.readouterr().out
