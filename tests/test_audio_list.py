"""Resolving audio inputs: files, directories (speakers from subdirectories), manifests."""

import json

import numpy as np
import pytest
import soundfile as sf

from soundstorm.training.audio_list import SPEECH_CORPUS_INFO, collect_audio


def _wav(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.zeros(160, np.float32), 16000)
    return path


def test_directory_file_and_manifest(tmp_path):
    _wav(tmp_path / "d/alice/b.wav")
    _wav(tmp_path / "d/alice/a.flac")
    _wav(tmp_path / "d/bob/x/c.wav")
    (tmp_path / "d/notes.txt").write_text("not audio")
    single = _wav(tmp_path / "one.wav")
    _wav(tmp_path / "m/clips/z.wav")
    (tmp_path / "m/list.jsonl").write_text(
        json.dumps({"path": "clips/z.wav", "id": "zed", "speaker": 7, "text": "hi"}) + "\n\n"
        + json.dumps({"path": str(single), "id": "again"}) + "\n")
    items = collect_audio([tmp_path / "d", str(single), tmp_path / "m/list.jsonl"])
    assert [i.id for i in items] == ["alice/a", "alice/b", "bob/x/c", "one", "zed", "again"]
    assert [i.speaker for i in items] == ["alice", "alice", "bob", None, "7", None]
    assert items[4].path == tmp_path / "m/clips/z.wav" and items[4].text == "hi"


def test_flat_directory_has_no_speakers(tmp_path):
    _wav(tmp_path / "a.wav")
    assert [(i.id, i.speaker) for i in collect_audio(tmp_path)] == [("a", None)]


def _speech_corpus(root):
    """The layout `soundstorm speech-corpus` writes: audio/<voice>/..., two manifests."""
    lines = {"train.jsonl": [("us-m1", 0), ("us-m1", 1), ("gb-f2", 0)],
             "heldout.jsonl": [("rp-m6", 0)]}
    for name, entries in lines.items():
        rows = []
        for voice, i in entries:
            rel = f"audio/{voice}/{voice}-{i:05d}.wav"
            _wav(root / rel)
            rows.append(json.dumps({"path": rel, "id": f"{voice}/{voice}-{i:05d}",
                                    "speaker": voice, "text": "hi", "duration": 0.01}))
        (root / name).write_text("\n".join(rows) + "\n")
    (root / SPEECH_CORPUS_INFO).write_text("{}")
    return root


def test_a_speech_corpus_folder_reads_its_manifests_by_split(tmp_path):
    root = _speech_corpus(tmp_path / "speech")
    items = collect_audio(root)
    # speakers are the voices (not "audio"), and the held-out voice is left out
    assert [(i.id, i.speaker) for i in items] == [("us-m1/us-m1-00000", "us-m1"),
                                                  ("us-m1/us-m1-00001", "us-m1"),
                                                  ("gb-f2/gb-f2-00000", "gb-f2")]
    assert items[0].path == root / "audio/us-m1/us-m1-00000.wav"
    assert [i.speaker for i in collect_audio(root, split="heldout")] == ["rp-m6"]
    assert len(collect_audio([root], split="all")) == 4
    # its audio/ folder is read the same way
    assert collect_audio(root / "audio") == items
    assert [i.speaker for i in collect_audio(root / "audio", split="heldout")] == ["rp-m6"]
    with pytest.raises(ValueError, match="split = 'heldout' applies to speech-corpus folders"):
        collect_audio(root / "audio" / "us-m1", split="heldout")
    with pytest.raises(ValueError, match="split = 'test': expected one of train, heldout, all"):
        collect_audio(root, split="test")


@pytest.mark.parametrize("line, match", [
    ("{not json", r"list.jsonl:1: not valid JSON"),
    ('{"id": "x"}', r"list.jsonl:1: each line must be a JSON object with a \"path\""),
    ('{"path": 7}', r"list.jsonl:1: \"path\" must be a non-empty string \(a file path\), got 7"),
    ('{"path": "a\\u0000b.wav"}', r"\"path\" must be a non-empty string"),
    ("[" * 50_000 + "]" * 50_000, r"list.jsonl:1: JSON nested too deeply"),
    ('{"path": "a.wav", "speaker": 1.5}', r"\"speaker\" must be a string or an integer"),
    ('{"path": "a.wav", "id": ""}', r"\"id\" must be a non-empty string"),
])
def test_bad_manifest_lines_are_named(tmp_path, line, match):
    (tmp_path / "list.jsonl").write_text(line + "\n")
    with pytest.raises(ValueError, match=match):
        collect_audio(tmp_path / "list.jsonl")


def test_a_manifest_that_is_not_utf8_is_named_with_its_line(tmp_path):
    (tmp_path / "list.jsonl").write_bytes(b'{"path": "a.wav"}\n\n{"path": "\xff.wav"}\n')
    with pytest.raises(ValueError, match=r"list.jsonl:3: not UTF-8 text \(byte 0xff at "
                                         r"column 11\); a manifest must be UTF-8"):
        collect_audio(tmp_path / "list.jsonl")


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="audio input .*nowhere' does not exist"):
        collect_audio(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no audio files"):
        collect_audio(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="neither a sound file"):
        collect_audio(tmp_path / "notes.txt")
    _wav(tmp_path / "a/s.wav")
    _wav(tmp_path / "b/s.wav")
    with pytest.raises(ValueError, match="two inputs have the id 's'"):
        collect_audio([tmp_path / "a/s.wav", tmp_path / "b/s.wav"])
