"""The espeak-ng demo corpus: seeded sentences, voices, layout, reproducibility, errors."""

import inspect
import itertools
import json

import numpy as np
import pytest
import soundfile as sf

from soundstorm.cli import main as cli_main
from soundstorm.training.speech_corpus import (ACCENTS, SAMPLE_RATE, VARIANTS, VOICES, WARP_RANGE,
                                               Voice, sentences, speak, voice_by_name,
                                               voice_population, warp_formants,
                                               write_speech_corpus)
from speech import require_espeak


def test_sentences_are_seeded_and_varied():
    a = list(itertools.islice(sentences(0), 300))
    assert a == list(itertools.islice(sentences(0), 300))
    assert a != list(itertools.islice(sentences(1), 300))
    assert len(set(a)) > 280
    for s in a:
        assert s[0].isupper() and s[-1] in ".?" and 5 <= len(s.split()) <= 20


def test_voices_cover_the_corpus_requirements():
    names = [v.name for v in VOICES]
    assert len(names) == len(set(names)) >= 8
    train = [v for v in VOICES if not v.heldout]
    held = [v for v in VOICES if v.heldout]
    assert len(train) >= 8 and len(held) >= 2
    # Voices differ by (voice, pitch, speed): no two are the same speaker.
    assert len({(v.espeak, v.pitch, v.speed) for v in VOICES}) == len(VOICES)
    assert inspect.signature(write_speech_corpus).parameters["minutes"].default >= 30
    with pytest.raises(ValueError, match="unknown voice 'nobody'"):
        voice_by_name("nobody")


def test_every_voice_speaks_and_voices_differ():
    require_espeak()
    clips = {v.name: speak("Hello there, how are you today?", v) for v in VOICES}
    for name, clip in clips.items():
        assert clip.dtype == np.float32 and clip.ndim == 1
        assert 0.5 * SAMPLE_RATE < len(clip) < 5 * SAMPLE_RATE, name
        assert np.sqrt(np.mean(clip ** 2)) > 0.01, name
    # Speed and voice changes show in the lengths and the samples.
    assert len({len(c) for c in clips.values()}) >= len(VOICES) // 2


def _manifest(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_corpus_layout_heldout_split_and_reproducibility(tmp_path):
    require_espeak()
    a = write_speech_corpus(tmp_path / "a", minutes=0.4, heldout_utterances=2, progress=False)
    b = write_speech_corpus(tmp_path / "b", minutes=0.4, heldout_utterances=2, progress=False)
    assert a == b
    assert a["train"]["minutes"] >= 0.4
    train, held = _manifest(tmp_path / "a/train.jsonl"), _manifest(tmp_path / "a/heldout.jsonl")
    heldout_names = {v.name for v in VOICES if v.heldout}
    assert {e["speaker"] for e in train} == {v.name for v in VOICES if not v.heldout}
    # 0.4 min is one or two sentences per training voice: no held-out voice says more
    rounds = len(train) // len([v for v in VOICES if not v.heldout])
    assert {e["speaker"] for e in held} == heldout_names
    assert len(held) == min(2, rounds) * len(heldout_names)
    assert a["heldout"]["utterances_per_voice"] == min(2, rounds)
    assert not {e["text"] for e in held} & {e["text"] for e in train}
    assert len({e["id"] for e in train + held}) == len(train) + len(held)
    for e in train + held:
        data, sr = sf.read(tmp_path / "a" / e["path"], dtype="int16")
        assert sr == SAMPLE_RATE and data.ndim == 1
        assert e["duration"] == pytest.approx(len(data) / sr, abs=1e-3)
        other, _ = sf.read(tmp_path / "b" / e["path"], dtype="int16")
        np.testing.assert_array_equal(data, other)
    info = json.loads((tmp_path / "a/speech-corpus.json").read_text())
    assert info["seed"] == 0 and len(info["voices"]) == len(VOICES)


def test_corpus_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="minutes must be a positive number, got 0"):
        write_speech_corpus(tmp_path / "x", minutes=0)
    with pytest.raises(ValueError, match="heldout_utterances must be an integer >= 0"):
        write_speech_corpus(tmp_path / "x", minutes=1, heldout_utterances=-1)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not empty"):
        write_speech_corpus(tmp_path / "full", minutes=1)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_speech_corpus_command(tmp_path, capsys):
    require_espeak()
    # A small corpus holds out no more audio than it trains on, whatever was asked.
    assert cli_main(["speech-corpus", str(tmp_path / "c"), "--minutes", "0.2",
                     "--heldout-utterances", "24", "--quiet"]) == 0
    out = capsys.readouterr().out
    info = json.loads((tmp_path / "c/speech-corpus.json").read_text())
    per_voice = info["heldout"]["utterances_per_voice"]
    assert per_voice == info["train"]["utterances"] // 10 < 24
    assert info["heldout"]["minutes"] <= info["train"]["minutes"]
    assert "training utterances" in out and f"{per_voice} per held-out voice, not 24" in out
    assert (tmp_path / "c/train.jsonl").exists() and (tmp_path / "c/heldout.jsonl").exists()
    with pytest.raises(SystemExit) as e:
        cli_main(["speech-corpus", str(tmp_path / "c"), "--minutes", "0.2"])
    assert e.value.code == 2
    assert "is not empty" in capsys.readouterr().err


def test_a_voice_population_is_seeded_distinct_and_holds_out_whole_variants():
    voices = voice_population(300, heldout=12, seed=0)
    assert voices == voice_population(300, heldout=12, seed=0)
    assert voices != voice_population(300, heldout=12, seed=1)
    assert len({v.name for v in voices}) == 300
    assert len({(v.espeak, v.pitch, v.speed, v.warp) for v in voices}) == 300
    train = [v for v in voices if not v.heldout]
    held = [v for v in voices if v.heldout]
    assert len(held) == 12 and len(train) == 288
    variant = lambda v: v.espeak.split("+")[1]  # noqa: E731
    # No training voice uses a held-out voice's variant: held-out means a new voice.
    assert not {variant(v) for v in held} & {variant(v) for v in train}
    # Training voices cover accents and variants broadly and take no pair twice here.
    pairs = [v.espeak for v in train]
    assert len(set(pairs)) == len(pairs)
    assert {v.espeak.split("+")[0] for v in train} == set(ACCENTS)
    assert len({variant(v) for v in train}) >= len(VARIANTS) * 3 // 4
    warps = [v.warp for v in voices]
    assert WARP_RANGE[0] <= min(warps) < 0.92 and 1.1 < max(warps) <= WARP_RANGE[1]
    # more voices than accent x variant pairs: pairs come again at another pitch/warp
    many = voice_population(700, heldout=0, seed=3)
    assert len({(v.espeak, v.pitch, v.speed, v.warp) for v in many}) == 700
    with pytest.raises(ValueError, match=r"heldout must be in \[0, count\) = \[0, 4\), got 4"):
        voice_population(4, heldout=4)
    with pytest.raises(TypeError, match="count must be an integer"):
        voice_population(3.5)


def _centroid(y):
    frames = y[:len(y) // 1024 * 1024].reshape(-1, 1024) * np.hanning(1024)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    return float((power * np.fft.rfftfreq(1024, 1 / SAMPLE_RATE)).sum() / power.sum())


def _f0(y):
    import pyworld
    f0, _ = pyworld.dio(y.astype(np.float64), SAMPLE_RATE)
    return float(np.median(f0[f0 > 0]))


def test_the_formant_warp_moves_the_spectrum_and_keeps_pitch_timing_and_loudness():
    require_espeak()
    pytest.importorskip("pyworld")
    x = speak("Please ask Nadia to bring the golden violin.", Voice("a", "en-us+m3", 40, 160))
    assert np.array_equal(warp_formants(x, SAMPLE_RATE, 1.0), x)
    down, up = (warp_formants(x, SAMPLE_RATE, w) for w in (0.87, 1.15))
    for y in (down, up):
        assert y.dtype == np.float32 and len(y) == len(x) and np.isfinite(y).all()
        assert abs(_f0(y) / _f0(x) - 1) < 0.05
        assert abs(np.sqrt(np.mean(y ** 2)) / np.sqrt(np.mean(x ** 2)) - 1) < 1e-3
    assert _centroid(down) < 0.97 * _centroid(x) and _centroid(up) > 1.08 * _centroid(x)
    assert np.array_equal(up, warp_formants(x, SAMPLE_RATE, 1.15))  # deterministic
    warped_voice = Voice("b", "en-us+m3", 40, 160, warp=1.15)
    assert np.array_equal(speak("Please ask Nadia to bring the golden violin.", warped_voice), up)
    for bad in (0.2, float("nan"), 3.0):
        with pytest.raises(ValueError, match="warp must be a factor in"):
            warp_formants(x, SAMPLE_RATE, bad)


def test_a_corpus_of_drawn_voices(tmp_path, capsys):
    require_espeak()
    pytest.importorskip("pyworld")
    assert cli_main(["speech-corpus", str(tmp_path / "c"), "--minutes", "0.1", "--voices", "5",
                     "--heldout-voices", "2", "--heldout-utterances", "1", "--seed", "4",
                     "--quiet"]) == 0
    assert "3 voices) and" in capsys.readouterr().out
    info = json.loads((tmp_path / "c/speech-corpus.json").read_text())
    voices = voice_population(5, heldout=2, seed=4)
    assert [Voice(**v) for v in info["voices"]] == list(voices)
    train, held = _manifest(tmp_path / "c/train.jsonl"), _manifest(tmp_path / "c/heldout.jsonl")
    assert {e["speaker"] for e in train} == {v.name for v in voices if not v.heldout}
    assert {e["speaker"] for e in held} == {v.name for v in voices if v.heldout}
    with pytest.raises(SystemExit) as e:
        cli_main(["speech-corpus", str(tmp_path / "d"), "--voices", "3", "--heldout-voices", "3"])
    assert e.value.code == 2
    assert "--voices 3 --heldout-voices 3: heldout must be in [0, count)" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
