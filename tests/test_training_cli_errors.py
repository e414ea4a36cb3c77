"""Every training command fails the same way: one line on stderr naming the argument and
the path or value at fault, exit status 2, no traceback -- for OS errors (outputs that are
files, lie under files or cannot be written; unreadable audio), sizes past sane limits,
and audio with no signal."""

import json
import os
from collections import namedtuple

import numpy as np
import pytest
import soundfile as sf
import torch

from soundstorm.cli import main
from soundstorm.training import paths, trainer
from soundstorm.training.synthetic import SyntheticSpec, write_synthetic_corpus

TRAIN = ["--preset", "tiny", "--batch-size", 4, "--max-seconds", 1, "--min-seconds", 0.2,
         "--steps", 2, "--no-progress"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    write_synthetic_corpus(root / "c", 12, SyntheticSpec(min_seconds=0.3, max_seconds=1.0))
    return root / "c"


@pytest.fixture
def speech(tmp_path):
    """Two short clips of a loud tone, as audio a fit can use."""
    t = np.arange(16000 * 2) / 16000
    for i in range(2):
        sf.write(str(tmp_path / f"tone{i}.wav"),
                 (0.3 * np.sin(2 * np.pi * (220 + 110 * i) * t)).astype(np.float32), 16000)
    return [tmp_path / "tone0.wav", tmp_path / "tone1.wav"]


def fails(capsys, *argv):
    """Run a command that must fail: its one-line error (exit status 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert e.value.code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def a_file(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("not a directory")
    return path


# -- outputs that are files, under files, or not writable -----------------------------
def test_outputs_that_are_files_or_lie_under_files(corpus, tmp_path, capsys, speech):
    f = a_file(tmp_path / "f")
    under = f / "sub"
    cases = [
        (["train", *TRAIN, "--data", corpus, "--out", f], f"--out '{f}' is a file"),
        (["train", *TRAIN, "--data", corpus, "--out", under],
         f"--out '{under}' lies under '{f}', which is a file"),
        (["synthetic-corpus", f], f"OUT '{f}' is a file"),
        (["synthetic-corpus", under / "x"], f"OUT '{under / 'x'}' lies under '{f}'"),
        (["speech-corpus", f, "--minutes", 0.1], f"OUT '{f}' is a file"),
        (["fit-codec", *speech, "--out", under], f"--out '{under}' lies under '{f}'"),
        (["fit-semantic", *speech, "--out", f], f"--out '{f}' is a file"),
        (["tokenize", *speech, "--semantic", tmp_path, "--out", under],
         f"--out '{under}' lies under '{f}'"),
    ]
    for argv, message in cases:
        err = fails(capsys, *argv)
        assert message in err, (argv, err)
        assert err.startswith(f"soundstorm {argv[0]}: error: ")


def test_an_output_that_cannot_be_written(corpus, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    # Tests run as root here, and root may write anywhere: the permission is faked.
    real_access = os.access
    monkeypatch.setattr(paths.os, "access", lambda p, mode: False if str(p) == str(locked)
                        else real_access(p, mode))
    err = fails(capsys, "train", *TRAIN, "--data", corpus, "--out", locked / "run")
    assert f"--out '{locked / 'run'}': the directory '{locked}' is not writable" in err
    err = fails(capsys, "synthetic-corpus", locked / "s")
    assert f"OUT '{locked / 's'}': the directory '{locked}' is not writable" in err
    assert list(locked.iterdir()) == []


def test_os_errors_while_training_name_the_argument_and_path(corpus, tmp_path, capsys,
                                                             monkeypatch):
    # a file the run writes is a directory: a real OS error in the middle of the work
    out = tmp_path / "run"
    (out / "metrics.jsonl").mkdir(parents=True)
    err = fails(capsys, "train", *TRAIN, "--data", corpus, "--out", out)
    assert err.startswith(f"soundstorm train: error: --out {out}: Is a directory: ")
    assert str(out / "metrics.jsonl") in err

    # the storage refuses a checkpoint half-way through
    def refuse(directory, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(directory / "step-00000002.tmp"))

    monkeypatch.setattr(trainer, "save_checkpoint", refuse)
    out = tmp_path / "run2"
    err = fails(capsys, "train", *TRAIN, "--data", corpus, "--out", out)
    assert err == (f"soundstorm train: error: --out {out}: Permission denied: "
                   f"{out / 'checkpoints' / 'step-00000002.tmp'}")


# -- inputs -----------------------------------------------------------------------------
def test_unreadable_audio_stops_a_fit_naming_the_file(tmp_path, capsys, speech):
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"RIFF\x00\x00\x00\x00WAVE but not really")
    for command in ("fit-codec", "fit-semantic"):
        err = fails(capsys, command, garbage, *speech, "--out", tmp_path / command,
                    "--no-progress")
        assert f"cannot read audio file '{garbage}'" in err
        assert not (tmp_path / command).exists()
    err = fails(capsys, "fit-codec", tmp_path / "missing.wav", "--out", tmp_path / "c")
    assert f"audio input '{tmp_path / 'missing.wav'}' does not exist" in err


def test_bad_manifests_are_named_with_their_line(tmp_path, capsys, speech):
    manifest = tmp_path / "list.jsonl"
    manifest.write_bytes(json.dumps({"path": str(speech[0])}).encode() + b"\n"
                         + b'{"path": "caf\xe9.wav"}\n')
    err = fails(capsys, "fit-codec", manifest, "--out", tmp_path / "c")
    assert f"{manifest}:2: not UTF-8 text (byte 0xe9 at column 14)" in err
    manifest.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    err = fails(capsys, "fit-semantic", manifest, "--out", tmp_path / "s")
    assert f"{manifest}:1: JSON nested too deeply" in err
    manifest.write_text(json.dumps({"path": ["a.wav"]}) + "\n")
    err = fails(capsys, "tokenize", manifest, "--semantic", tmp_path, "--out", tmp_path / "t")
    assert f"{manifest}:1: \"path\" must be a non-empty string (a file path), got ['a.wav']" \
        in err


# -- sizes and signal --------------------------------------------------------------------
def test_synthetic_corpus_sizes_are_checked_before_any_work(tmp_path, capsys, monkeypatch):
    out = tmp_path / "s"
    for argv, message in [
        (["--max-seconds", "1e9"], "--max-seconds 1e+09: expected a length in seconds in (0, 600]"),
        (["--min-seconds", "nan"], "--min-seconds nan: expected a length in seconds"),
        (["--min-seconds", "5", "--max-seconds", "4"], "--min-seconds 5 is above --max-seconds 4"),
        (["--utterances", "100000000"], "--utterances 100000000: expected 1..10,000,000"),
        (["--val-utterances", "-1"], "--val-utterances -1: expected 0..10,000,000"),
        (["--noise", "1"], "--noise 1: expected a probability in [0, 1)"),
    ]:
        assert message in fails(capsys, "synthetic-corpus", out, *argv)
    # a corpus larger than the free space of its disk
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda p: Usage(2**30, 2**30 - 2**20, 2**20))
    err = fails(capsys, "synthetic-corpus", out, "--utterances", 10_000, "--max-seconds", 60)
    assert f"OUT {out}: the corpus needs about 0.1 GiB" in err and "0.0 GiB free" in err
    assert not out.exists()


def test_fit_codec_refuses_audio_with_no_signal(tmp_path, capsys, speech):
    silent = tmp_path / "silent"
    silent.mkdir()
    rng = np.random.default_rng(0)
    sf.write(str(silent / "zeros.wav"), np.zeros(16000 * 3, np.float32), 16000)
    sf.write(str(silent / "hiss.wav"),       # -80 dBFS noise: below the -60 dBFS threshold
             (1e-4 * rng.standard_normal(16000 * 3)).astype(np.float32), 16000)
    err = fails(capsys, "fit-codec", silent, "--out", tmp_path / "c", "--codebook-size", 16,
                "--num-quantizers", 1, "--no-progress")
    assert f"AUDIO {silent}: the audio has no signal to fit a codec on: 2 of 2 clips are " \
           "silent and only 0 of 300 frames are above -60 dBFS" in err
    assert not (tmp_path / "c").exists()
    # a few voiced frames are not enough either: fewer than the codewords
    sf.write(str(silent / "blip.wav"), np.concatenate(
        [np.zeros(16000, np.float32), 0.5 * np.ones(320 * 4, np.float32)]), 16000)
    err = fails(capsys, "fit-codec", silent, "--out", tmp_path / "c", "--codebook-size", 16,
                "--num-quantizers", 1, "--no-progress")
    assert "only 4 of" in err and "fewer than codebook_size=16" in err
    # a quieter threshold accepts the hiss: it is the caller's call
    assert main(["fit-codec", str(silent), "--out", str(tmp_path / "c"), "--codebook-size", "16",
                 "--num-quantizers", "1", "--iterations", "2", "--silence-db", "-90",
                 "--no-progress"]) == 0
    assert main(["fit-codec", *map(str, speech), "--out", str(tmp_path / "tone"),
                 "--codebook-size", "16", "--num-quantizers", "1", "--iterations", "2",
                 "--quiet"]) == 0
