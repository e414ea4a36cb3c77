"""`soundstorm tokenize`: audio -> token corpus, bad files reported by name, resumable."""

import json

import numpy as np
import pytest
import soundfile as sf

from soundstorm.cli import main as cli_main
from soundstorm.engine.codecs import load_codec
from soundstorm.engine.codecs.audio import read_audio
from soundstorm.training.audio_list import collect_audio
from soundstorm.training.codec_fit import fit_melrvq
from soundstorm.training.corpus import open_corpus
from soundstorm.training.semantic import fit_semantic, load_semantic
from soundstorm.training.speech_corpus import write_speech_corpus
from soundstorm.training.tokenize import STATE_FILE, tokenize_corpus
from speech import require_espeak


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small espeak corpus with a melrvq codec and an MFCC tokenizer fit on it."""
    require_espeak()
    root = tmp_path_factory.mktemp("tok")
    write_speech_corpus(root / "speech", minutes=0.5, heldout_utterances=1, progress=False)
    items = collect_audio(root / "speech/train.jsonl")
    fit_melrvq([i.path for i in items], root / "codec", num_quantizers=2, codebook_size=16,
               iterations=5, progress=False)
    fit_semantic("mfcc", [i.path for i in items], root / "semantic", vocab_size=8,
                 iterations=5, progress=False)
    return root


def _load(root):
    return load_codec("melrvq", path=root / "codec"), load_semantic(root / "semantic")


def _corpus_arrays(directory):
    c = open_corpus(directory)
    out = {}
    for i in range(len(c)):
        a, s = c.read(i, 0, int(c.frames[i]))
        out[c.ids[i]] = (np.array(a), np.array(s))
    return c, out


def test_tokens_match_the_tokenizers(setup, tmp_path):
    codec, semantic = _load(setup)
    items = collect_audio(setup / "speech/train.jsonl")
    report = tokenize_corpus(items, codec, semantic, tmp_path / "t", shard_frames=400,
                             progress=False)
    assert report["utterances"] == len(items) and report["skipped"] == []
    corpus, arrays = _corpus_arrays(tmp_path / "t")
    assert len(json.loads((tmp_path / "t/corpus.json").read_text())["shards"]) > 1
    speakers = json.loads((tmp_path / "t/speakers.json").read_text())
    assert sorted(speakers) == sorted({i.speaker for i in items})
    for k, item in enumerate(items[:4]):
        wav, sr = read_audio(item.path)
        acoustic, ids = arrays[item.id]
        np.testing.assert_array_equal(acoustic, codec.encode(wav, sr)[0].numpy())
        want = semantic.tokenize(wav, sr).numpy()
        np.testing.assert_array_equal(ids[:len(want)], want)
        assert corpus.speaker[corpus.ids.index(item.id)] == speakers[item.speaker]
    assert not (tmp_path / "t" / STATE_FILE).exists()
    with pytest.raises(FileExistsError, match="already holds a finished corpus"):
        tokenize_corpus(items, codec, semantic, tmp_path / "t", progress=False)


def test_bad_files_are_skipped_and_named(setup, tmp_path, capsys):
    good = collect_audio(setup / "speech/train.jsonl")[:2]
    (tmp_path / "garbage.wav").write_bytes(b"RIFF not really a wave file")
    sf.write(str(tmp_path / "silent.wav"), np.zeros(16000, np.float32), 16000)
    sf.write(str(tmp_path / "tiny.wav"), np.full(3, 0.5, np.float32), 16000)
    lines = [{"path": str(i.path), "id": i.id, "speaker": i.speaker} for i in good]
    lines += [{"path": "garbage.wav"}, {"path": "silent.wav"}, {"path": "tiny.wav"},
              {"path": "gone.wav"}]
    (tmp_path / "list.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert cli_main(["tokenize", str(tmp_path / "list.jsonl"), "--codec", "melrvq",
                     "--codec-path", str(setup / "codec"), "--semantic", str(setup / "semantic"),
                     "--out", str(tmp_path / "t"), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "tokenized 2 utterances" in captured.out
    for name, reason in (("garbage.wav", "unreadable"), ("silent.wav", "silent"),
                         ("tiny.wav", "too short"), ("gone.wav", "missing")):
        assert f"{tmp_path / name}: {reason}" in captured.err
    report = json.loads((tmp_path / "t/tokenize-report.json").read_text())
    assert {s["id"] for s in report["skipped"]} == {"garbage", "silent", "tiny", "gone"}
    assert len(open_corpus(tmp_path / "t")) == 2


def test_nothing_readable_is_an_error(setup, tmp_path, capsys):
    (tmp_path / "garbage.wav").write_bytes(b"nope")
    with pytest.raises(SystemExit) as e:
        cli_main(["tokenize", str(tmp_path / "garbage.wav"), "--codec-path",
                  str(setup / "codec"), "--semantic", str(setup / "semantic"),
                  "--out", str(tmp_path / "t"), "--no-progress"])
    assert e.value.code == 2
    assert "none of the 1 audio files could be tokenized" in capsys.readouterr().err


def test_interrupted_run_resumes_to_the_same_corpus(setup, tmp_path, monkeypatch):
    codec, semantic = _load(setup)
    items = collect_audio(setup / "speech/train.jsonl")
    tokenize_corpus(items, codec, semantic, tmp_path / "straight", shard_frames=300,
                    progress=False)

    calls = {"n": 0}
    real = type(semantic).tokenize

    def dying(self, wav, sr):
        calls["n"] += 1
        if calls["n"] > len(items) // 2:
            raise KeyboardInterrupt
        return real(self, wav, sr)

    monkeypatch.setattr(type(semantic), "tokenize", dying)
    with pytest.raises(KeyboardInterrupt):
        tokenize_corpus(items, codec, semantic, tmp_path / "resumed", shard_frames=300,
                        progress=False)
    monkeypatch.setattr(type(semantic), "tokenize", real)
    state = json.loads((tmp_path / "resumed" / STATE_FILE).read_text())
    assert 0 < len(state["entries"]) < len(items)
    # Other settings than the interrupted run's are refused, not mixed in.
    with pytest.raises(ValueError, match="unfinished tokenization with other settings"):
        tokenize_corpus(items, codec, semantic, tmp_path / "resumed", shard_frames=301,
                        progress=False)
    report = tokenize_corpus(items, codec, semantic, tmp_path / "resumed", shard_frames=300,
                             progress=False)
    assert report["resumed_from"] == len(state["entries"])
    _, a = _corpus_arrays(tmp_path / "straight")
    _, b = _corpus_arrays(tmp_path / "resumed")
    assert list(a) == list(b)
    for k in a:
        np.testing.assert_array_equal(a[k][0], b[k][0])
        np.testing.assert_array_equal(a[k][1], b[k][1])
    assert (tmp_path / "straight/manifest.jsonl").read_text() == \
        (tmp_path / "resumed/manifest.jsonl").read_text()


def test_bad_arguments(setup, tmp_path):
    codec, semantic = _load(setup)
    items = collect_audio(setup / "speech/train.jsonl")[:1]
    with pytest.raises(ValueError, match="no audio to tokenize"):
        tokenize_corpus([], codec, semantic, tmp_path / "a")
    with pytest.raises(ValueError, match="shard_frames must be a positive integer, got 0"):
        tokenize_corpus(items, codec, semantic, tmp_path / "a", shard_frames=0)
    with pytest.raises(ValueError, match="silence_db must be a finite level <= 0 dB"):
        tokenize_corpus(items, codec, semantic, tmp_path / "a", silence_db=3.0)


def test_a_speech_corpus_folder_is_tokenized_by_voice_without_its_held_out_voices(setup,
                                                                                  tmp_path):
    from soundstorm.training.speech_corpus import VOICES

    common = ["--codec-path", str(setup / "codec"), "--semantic", str(setup / "semantic"),
              "--quiet"]
    assert cli_main(["tokenize", str(setup / "speech"), "--out", str(tmp_path / "train"),
                     *common]) == 0
    speakers = json.loads((tmp_path / "train/speakers.json").read_text())
    assert sorted(speakers) == sorted(v.name for v in VOICES if not v.heldout)
    assert len(open_corpus(tmp_path / "train")) == len(collect_audio(setup / "speech/train.jsonl"))
    assert cli_main(["tokenize", str(setup / "speech"), "--split", "heldout",
                     "--out", str(tmp_path / "heldout"), *common]) == 0
    speakers = json.loads((tmp_path / "heldout/speakers.json").read_text())
    assert sorted(speakers) == sorted(v.name for v in VOICES if v.heldout)


def test_transcripts_are_written_beside_the_corpus_in_its_order(setup, tmp_path):
    common = ["--codec-path", str(setup / "codec"), "--semantic", str(setup / "semantic"),
              "--quiet"]
    assert cli_main(["tokenize", str(setup / "speech"), "--out", str(tmp_path / "t"),
                     *common]) == 0
    corpus = open_corpus(tmp_path / "t")
    lines = [json.loads(x) for x in (tmp_path / "t/texts.jsonl").read_text().splitlines()]
    manifest = {i.id: i.text for i in collect_audio(setup / "speech/train.jsonl")}
    assert [x["id"] for x in lines] == list(corpus.ids)
    assert all(x["text"] == manifest[x["id"]] and x["text"] for x in lines)
    report = json.loads((tmp_path / "t/tokenize-report.json").read_text())
    assert report["texts"] == len(corpus)
