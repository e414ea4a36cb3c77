"""Audio on the command line: encode, decode, generate --prompt-wav / --out x.wav / --long,
--version, and files of the wrong kind named as such."""

import re

import numpy as np
import pytest
import soundfile as sf
import torch

from soundstorm.cli import main
from soundstorm.demo import ASSETS
from soundstorm.engine import Engine, ModelConfig, SoundStorm

from test_cli import one_line_error, run_cli

CODEC = ["--codec", "melrvq", "--codec-path", str(ASSETS / "codec")]


def voice_wav(path, seconds=1.0, sr=22050, seed=0):
    """A voiced-sounding test signal: a 150 Hz harmonic buzz under a slow envelope."""
    t = np.arange(int(seconds * sr)) / sr
    g = np.random.default_rng(seed)
    x = sum(np.sin(2 * np.pi * 150 * k * t) / k for k in range(1, 8))
    x = 0.2 * x * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t)) + 0.01 * g.standard_normal(t.size)
    sf.write(str(path), x.astype(np.float32), sr, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random model that fits the shipped melrvq codec (4 levels of 256, 50 Hz)."""
    cfg = ModelConfig.preset("tiny", codebook_size=256, semantic_vocab_size=256, max_frames=64)
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("model")
    SoundStorm(cfg).save_pretrained(d)
    return d


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert re.match(r"soundstorm \d+\.\d+\.\d+", capsys.readouterr().out)


def test_encode_then_decode_round_trip(tmp_path, capsys):
    """0.8 s of espeak-ng speech through the shipped codec (its vocoder learned speech)."""
    from speech import require_espeak
    from soundstorm.training.speech_corpus import speak, voice_by_name

    require_espeak()
    speech = speak("Nora opened the window and the garden was quiet.", voice_by_name("us-m1"))
    wav = tmp_path / "v.wav"
    sf.write(str(wav), speech[1600:1600 + 12800], 16000, subtype="PCM_16")
    code, out, _ = run_cli(capsys, "encode", wav, *CODEC, "--out", tmp_path / "t.npy")
    assert code == 0 and "40 frames x 4 levels" in out, out
    tokens = np.load(tmp_path / "t.npy")
    assert tokens.shape == (40, 4) and tokens.dtype == np.int64
    assert tokens.min() >= 0 and tokens.max() < 256
    code, out, _ = run_cli(capsys, "decode", tmp_path / "t.npy", *CODEC,
                           "--out", tmp_path / "back.wav")
    assert code == 0
    audio, sr = sf.read(str(tmp_path / "back.wav"))
    assert sr == 16000 and audio.shape == (40 * 320,)
    # The resynthesis carries the speech's energy (not silence, not noise at full scale).
    assert 0.02 < np.sqrt(np.mean(audio ** 2)) < 0.5
    # Re-encoding the resynthesis mostly recovers the coarsest level.
    code, _, _ = run_cli(capsys, "encode", tmp_path / "back.wav", *CODEC,
                         "--out", tmp_path / "t2.npy")
    again = np.load(tmp_path / "t2.npy")
    assert (again[:, 0] == tokens[:, 0]).mean() > 0.5


def test_decode_drops_padding_frames(tmp_path, capsys):
    tokens = np.full((12, 4), 7, dtype=np.int64)
    tokens[9:] = -1
    np.save(tmp_path / "t.npy", tokens)
    code, _, _ = run_cli(capsys, "decode", tmp_path / "t.npy", *CODEC, "--out", tmp_path / "o.wav")
    assert code == 0 and sf.info(str(tmp_path / "o.wav")).frames == 9 * 320


@pytest.mark.parametrize("make, argv, match", [
    (lambda p: voice_wav(p / "x.wav"), ["decode", "{x.wav}", *CODEC, "--out", "{o.wav}"],
     r"x\.wav: is a WAV file, expected \.npy ids"),
    (lambda p: np.save(p / "x.npy", np.zeros((5, 4), np.int64)),
     ["encode", "{x.npy}", *CODEC, "--out", "{o.npy}"], r"x\.npy: is a \.npy array, expected a sound file"),
    (lambda p: voice_wav(p / "x.wav"), ["encode", "{x.wav}", *CODEC, "--out", "{o.wav}"],
     r"--out .*o\.wav: tokens are written as \.npy"),
    (lambda p: np.save(p / "x.npy", np.zeros((5, 4), np.int64)),
     ["decode", "{x.npy}", *CODEC, "--out", "{o.npy}"], r"--out .*o\.npy: audio is written as WAV"),
    (lambda p: np.save(p / "x.npy", np.zeros((5, 3), np.int64)),
     ["decode", "{x.npy}", *CODEC, "--out", "{o.wav}"], r"shape \(5, 3\).*takes \[T, 4\]"),
    (lambda p: np.save(p / "x.npy", np.full((5, 4), 300, np.int64)),
     ["decode", "{x.npy}", *CODEC, "--out", "{o.wav}"], r"id 300, outside .*\[0, 256\)"),
    (lambda p: sf.write(str(p / "x.wav"), np.zeros(8000, np.float32), 16000),
     ["encode", "{x.wav}", *CODEC, "--out", "{o.npy}"], r"x\.wav: is silent"),
    (lambda p: (p / "x.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunkjunk"),
     ["encode", "{x.wav}", *CODEC, "--out", "{o.npy}"], r"x\.wav: not a readable sound file"),
    (lambda p: None, ["encode", "{x.wav}", *CODEC, "--out", "{o.npy}"], r"x\.wav: file not found"),
    (lambda p: voice_wav(p / "x.wav"), ["encode", "{x.wav}", "--codec", "melrvq",
                                        "--codec-path", "{nowhere}", "--out", "{o.npy}"],
     r"--codec-path .*nowhere: not a directory"),
])
def test_bad_audio_inputs_are_one_line_and_leave_no_output(tmp_path, capsys, make, argv, match):
    make(tmp_path)
    argv = [re.sub(r"\{(.+?)\}", lambda m: str(tmp_path / m.group(1)), a) for a in argv]
    err = one_line_error(capsys, *argv)
    assert re.search(match, err), err
    assert not (tmp_path / "o.wav").exists() and not (tmp_path / "o.npy").exists()
    assert not list(tmp_path.glob(".*tmp"))


def test_a_wav_given_as_prompt_or_semantic_is_named(tmp_path, capsys, model_dir):
    voice_wav(tmp_path / "p.wav")
    np.save(tmp_path / "s.npy", np.arange(10))
    err = one_line_error(capsys, "generate", "--model", model_dir, "--semantic", tmp_path / "s.npy",
                         "--prompt", tmp_path / "p.wav", "--out", tmp_path / "o.npy")
    assert "p.wav: is a WAV file, expected .npy ids" in err and "--prompt-wav" in err, err
    err = one_line_error(capsys, "generate", "--model", model_dir, "--semantic", tmp_path / "p.wav")
    assert "--semantic" in err and "is a WAV file" in err, err


def test_generate_with_a_wav_prompt_matches_token_prompt(tmp_path, capsys, model_dir):
    voice_wav(tmp_path / "p.wav", seconds=0.4)                  # 20 frames, 10 semantic ids
    run_cli(capsys, "encode", tmp_path / "p.wav", *CODEC, "--out", tmp_path / "p.npy")
    sem = np.random.default_rng(0).integers(0, 256, 25)        # prompt + 15 ids of target
    np.save(tmp_path / "s.npy", sem)
    common = ["generate", "--model", model_dir, "--semantic", tmp_path / "s.npy", "--seed", 3,
              "--quiet"]
    run_cli(capsys, *common, "--prompt", tmp_path / "p.npy", "--out", tmp_path / "a.npy")
    run_cli(capsys, *common, "--prompt-wav", tmp_path / "p.wav", *CODEC, "--out", tmp_path / "b.npy")
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    prompt = np.load(tmp_path / "p.npy")
    assert a.shape == (50, 4) and (a == b).all()
    assert (a[:20] == prompt).all()                             # prompt frames come back first
    code, out, _ = run_cli(capsys, *common, "--prompt-wav", tmp_path / "p.wav", *CODEC,
                           "--out", tmp_path / "c.wav")
    assert code == 0
    audio, sr = sf.read(str(tmp_path / "c.wav"))
    assert sr == 16000 and audio.shape == (30 * 320,)           # the target only


def test_generate_wav_flags_are_checked_before_work(tmp_path, capsys, model_dir):
    voice_wav(tmp_path / "p.wav")
    np.save(tmp_path / "s.npy", np.arange(10))
    base = ["generate", "--model", model_dir, "--semantic", tmp_path / "s.npy"]
    assert "needs --codec" in one_line_error(capsys, *base, "--out", tmp_path / "o.wav")
    assert "needs --codec" in one_line_error(capsys, *base, "--prompt-wav", tmp_path / "p.wav")
    np.save(tmp_path / "p.npy", np.zeros((3, 4), np.int64))
    assert "give the voice prompt once" in one_line_error(
        capsys, *base, "--prompt", tmp_path / "p.npy", "--prompt-wav", tmp_path / "p.wav")
    sf.write(str(tmp_path / "quiet.wav"), np.zeros(4000, np.float32), 16000)
    err = one_line_error(capsys, *base, *CODEC, "--prompt-wav", tmp_path / "quiet.wav",
                         "--out", tmp_path / "o.wav")
    assert "quiet.wav: is silent" in err
    assert not (tmp_path / "o.wav").exists()
    other = ModelConfig.preset("tiny")                          # 32 codes: not the codec's 256
    SoundStorm(other).save_pretrained(tmp_path / "m32")
    err = one_line_error(capsys, "generate", "--model", tmp_path / "m32", "--semantic",
                         tmp_path / "s.npy", *CODEC, "--out", tmp_path / "o.wav")
    assert "codebook_size is 256, the model's is 32" in err


def test_long_generates_past_max_frames(tmp_path, capsys, model_dir):
    sem = np.random.default_rng(1).integers(0, 256, 80)         # 160 frames > max_frames 64
    np.save(tmp_path / "s.npy", sem)
    base = ["generate", "--model", model_dir, "--semantic", tmp_path / "s.npy", "--seed", 5]
    err = one_line_error(capsys, *base, "--out", tmp_path / "o.npy")
    assert "max_frames=64" in err and "--long" in err
    code, _, _ = run_cli(capsys, *base, "--long", "--quiet", "--out", tmp_path / "o.npy")
    tokens = np.load(tmp_path / "o.npy")
    assert code == 0 and tokens.shape == (160, 4) and tokens.min() >= 0
    engine = Engine(model_dir, backend="torch")
    want = engine.generate_long(torch.from_numpy(sem), seed=5, overlap=32)  # half of 64
    assert (tokens == want.numpy()).all()
    code, _, _ = run_cli(capsys, *base, "--long", "--quiet", *CODEC, "--out", tmp_path / "o.wav")
    assert code == 0 and sf.info(str(tmp_path / "o.wav")).frames == 160 * 320
