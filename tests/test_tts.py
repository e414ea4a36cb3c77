"""Text to speech end to end on tiny random models: the TextToSpeech pipeline, `soundstorm
say` and `soundstorm dialogue`, and their refusals of bad input."""

import json
import math
import re
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from soundstorm.demo import ASSETS
from soundstorm.engine import Engine, ModelConfig, SoundStorm
from soundstorm.engine.codecs import load_codec
from soundstorm.engine.text_model import TextModelConfig, TextToSemantic
from soundstorm.engine.tts import TextToSpeech, VoiceError, split_sentences
from soundstorm.training.semantic import load_semantic

from test_cli_audio import one_line_error, run_cli, voice_wav

SR = 16000


def stopping_text_model(seed=0, mean_ids=10.0, **overrides):
    """A random tiny text model that ends an utterance after about `mean_ids` ids."""
    torch.manual_seed(seed)
    cfg = TextModelConfig.preset("tiny", **{"semantic_vocab_size": 256,
                                            "max_semantic_len": 96, **overrides})
    model = TextToSemantic(cfg)
    with torch.no_grad():
        model.head.weight.mul_(0.05)
        model.head.bias.zero_()
        model.head.bias[cfg.end_id] = math.log(257 / (mean_ids - 1))
    return model.eval()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("assets")
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", codebook_size=256, semantic_vocab_size=256, max_frames=48)
    SoundStorm(cfg).save_pretrained(d / "model")
    stopping_text_model().save_pretrained(d / "text-model")
    shutil.copytree(ASSETS / "codec", d / "codec")
    codec = json.loads((d / "codec/config.json").read_text())
    codec["codec"]["griffin_lim_iters"] = 4          # fast, for tests: the sound is not judged
    (d / "codec/config.json").write_text(json.dumps(codec))
    shutil.copytree(ASSETS / "semantic", d / "semantic")
    return d


@pytest.fixture(scope="module")
def tts(assets):
    return TextToSpeech(TextToSemantic.from_pretrained(assets / "text-model"),
                        Engine(assets / "model", backend="torch"),
                        load_codec("melrvq", path=assets / "codec"),
                        load_semantic(assets / "semantic"))


@pytest.fixture(scope="module")
def voice(tmp_path_factory):
    return voice_wav(tmp_path_factory.mktemp("voice") / "voice.wav", seconds=0.9)


def test_split_sentences():
    assert split_sentences("One. Two!  Three? four", 100) == ["One.", "Two!", "Three?", "four"]
    assert split_sentences("aaa bbb ccc. d", 8) == ["aaa bbb", "ccc.", "d"]
    with pytest.raises(ValueError, match="a word of 12 bytes"):
        split_sentences("abcdefghijkl", 8)


def test_synthesize_speaks_every_sentence_after_the_prompt(tts, voice):
    audio = tts.synthesize("The first one. And a second! A third?", voice, seed=1)
    r = tts.last_report
    assert r.sentences == 3 and r.semantic_ids > 0
    assert audio.dtype == np.float32 and audio.size == r.semantic_ids * 2 * 320
    assert set(r.seconds) == {"text_to_semantic", "soundstorm", "codec"}
    assert all(v > 0 for v in r.seconds.values())
    assert r.windows >= 2          # 12 prompt ids + the text's ids: past max_frames = 48
    assert not np.array_equal(audio, tts.synthesize("The first one. And a second! A third?",
                                                    voice, seed=2))
    chunks = list(tts.stream("The first one. And a second! A third?", voice, seed=1))
    assert len(chunks) == tts.last_report.windows
    assert sum(c.size for c in chunks) == audio.size      # the same ids and tokens, seeded


def test_the_voice_transcript_prompts_the_text_model(tts, voice, monkeypatch):
    seen = {}
    import soundstorm.engine.tts as module
    real = module.generate_semantic

    def spy(model, texts, prompts, voice_texts, **kw):
        seen.update(prompts=prompts, voice_texts=voice_texts)
        return real(model, texts, prompts, voice_texts, **kw)

    monkeypatch.setattr(module, "generate_semantic", spy)
    tts.synthesize("Hello.", voice, voice_text="a buzzing sound")
    assert seen["voice_texts"] == ["a buzzing sound"] and len(seen["prompts"][0]) > 12
    tts.synthesize("Hello.", voice)
    assert seen["voice_texts"] == [None] and seen["prompts"] == [None]


def test_bad_voices_and_texts_are_refused(tts, voice, tmp_path):
    sf.write(str(tmp_path / "silent.wav"), np.zeros(SR, np.float32), SR)
    voice_wav(tmp_path / "short.wav", seconds=0.2)
    (tmp_path / "junk.wav").write_bytes(b"RIFF....WAVEjunk")
    for path, match in ((tmp_path / "silent.wav", "is silent"),
                        (tmp_path / "short.wav", "too short"),
                        (tmp_path / "junk.wav", "not a readable sound file"),
                        (tmp_path / "none.wav", "file not found")):
        with pytest.raises(VoiceError, match=match):
            tts.synthesize("Hello.", path)
    for text, match in (("", "empty"), (" | ", "empty"), ("x" * 4001, "too long: 4001 bytes"),
                        (b"\xffabc", "not UTF-8"), ("\udcffabc", "not valid Unicode")):
        with pytest.raises(ValueError, match=match):
            tts.synthesize(text, voice)


def test_mismatched_models_are_refused(assets):
    text_model = stopping_text_model(semantic_vocab_size=128)
    with pytest.raises(ValueError, match="semantic vocab_size .* 128 != 256"):
        TextToSpeech(text_model, Engine(assets / "model", backend="torch"),
                     load_codec("melrvq", path=assets / "codec"), load_semantic(assets / "semantic"))


# -- the commands --------------------------------------------------------------------------
def test_say_writes_a_wav_and_reports_each_stage(assets, voice, tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        code, out, _ = run_cli(capsys, "say", "Hello there. How are you?", "--voice", voice,
                               "--assets", assets, "--out", tmp_path / "o.wav", "--json",
                               "--quiet", "--threads", 1)
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    report = json.loads(out.splitlines()[-1])
    assert report["threads"] == 1
    info = sf.info(str(tmp_path / "o.wav"))
    assert info.samplerate == SR and info.frames == report["semantic_ids"] * 640
    assert report["sentences"] == 2 and report["real_time_factor"] > 0
    assert re.search(r"text->semantic .* SoundStorm .* codec .* real-time factor", out)
    (tmp_path / "t.txt").write_text("From a file.", encoding="utf-8")
    code, _, _ = run_cli(capsys, "say", "--text-file", tmp_path / "t.txt", "--voice", voice,
                         "--assets", assets, "--out", tmp_path / "f.wav", "--quiet")
    assert code == 0 and (tmp_path / "f.wav").is_file()


def test_say_bad_input_is_one_line_exit_2_and_writes_nothing(assets, voice, tmp_path, capsys):
    sf.write(str(tmp_path / "silent.wav"), np.zeros(SR, np.float32), SR)
    voice_wav(tmp_path / "short.wav", seconds=0.2)
    (tmp_path / "junk.wav").write_bytes(b"RIFF....WAVEjunk")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9")
    np.save(tmp_path / "ids.npy", np.arange(4))
    out = tmp_path / "o.wav"
    base = ["--assets", assets, "--out", out]
    cases = [
        (["say", "", "--voice", voice], "TEXT: the text is empty"),
        (["say", "x" * 4001, "--voice", voice], "TEXT: the text is too long"),
        (["say", "\udcffabc", "--voice", voice], "not valid Unicode"),
        (["say", "--text-file", tmp_path / "bad.txt", "--voice", voice],
         r"bad\.txt: not UTF-8 text \(byte 0xe9 at offset 3\)"),
        (["say", "Hi.", "--voice", tmp_path / "silent.wav"], r"--voice .*silent\.wav: is silent"),
        (["say", "Hi.", "--voice", tmp_path / "short.wav"], r"short\.wav: is too short"),
        (["say", "Hi.", "--voice", tmp_path / "junk.wav"], "not a readable sound file"),
        (["say", "Hi.", "--voice", tmp_path / "ids.npy"], r"is a \.npy array, expected a sound"),
        (["say", "Hi.", "--voice", tmp_path / "nope.wav"], "file not found"),
        (["say", "Hi.", "--voice", voice, "--text-model", tmp_path], "--text-model .*config"),
        (["say", "Hi.", "--voice", voice, "--top-k", "0"], "--top-k must be >= 1"),
        (["say", "Hi.", "--voice", voice, "--threads", "0"], "--threads must be >= 1"),
        (["say", "Hi.", "--text-file", tmp_path / "bad.txt", "--voice", voice], "once"),
    ]
    for argv, match in cases:
        err = one_line_error(capsys, *argv, *base)
        assert re.search(match, err), (argv, err)
        assert not out.exists() and not list(tmp_path.glob(".*tmp"))
    err = one_line_error(capsys, "say", "Hi.", "--voice", voice, "--assets", assets,
                         "--out", tmp_path / "o.npy")
    assert "audio is written as WAV" in err


def test_dialogue_speaks_each_turn_in_its_voice(assets, tmp_path, capsys):
    a = voice_wav(tmp_path / "a.wav", seconds=0.9, seed=1)
    b = voice_wav(tmp_path / "b.wav", seconds=0.9, seed=2)
    (tmp_path / "talk.txt").write_text("A: Hello there.\nB: Hi! | A: How are you?\n\n",
                                       encoding="utf-8")
    code, out, _ = run_cli(capsys, "dialogue", "--transcript", tmp_path / "talk.txt",
                           "--voice", f"A={a}", "--voice", f"B={b}", "--voice-text", "A=a buzz",
                           "--assets", assets, "--out", tmp_path / "talk.wav", "--json",
                           "--quiet", "--pause", "0.25")
    assert code == 0
    report = json.loads(out.splitlines()[-1])
    assert [t["speaker"] for t in report["turns"]] == ["A", "B", "A"]
    assert [t["text"] for t in report["turns"]] == ["Hello there.", "Hi!", "How are you?"]
    turns = report["turns"]
    assert math.isclose(turns[1]["start"] - turns[0]["end"], 0.25, abs_tol=1e-3)
    assert math.isclose(sf.info(str(tmp_path / "talk.wav")).duration, turns[-1]["end"],
                        abs_tol=1e-3)


@pytest.mark.parametrize("transcript, voices, match", [
    ("A: hi\nC: who?\n", ["A={a}"], r"talk\.txt:2: unknown speaker 'C'; voices given: A"),
    ("hello\n", ["A={a}"], r"talk\.txt:1: turn 'hello' names no speaker"),
    ("A:   \n", ["A={a}"], r"talk\.txt:1: speaker A's turn is empty"),
    ("\n\n", ["A={a}"], "holds no turns"),
    (b"A: caf\xe9\n", ["A={a}"], r"talk\.txt:1: not UTF-8 text"),
    ("A: hi\n", ["A={a}", "A={a}"], "--voice A is given twice"),
    ("A: hi\n", ["A={silent}"], r"--voice A: .*silent\.wav: is silent"),
    ("A: " + "x" * 4001 + "\n", ["A={a}"], r"talk\.txt:1: the text is too long"),
])
def test_dialogue_bad_input(assets, tmp_path, capsys, transcript, voices, match):
    a = voice_wav(tmp_path / "a.wav", seconds=0.9)
    sf.write(str(tmp_path / "silent.wav"), np.zeros(SR, np.float32), SR)
    path = tmp_path / "talk.txt"
    path.write_bytes(transcript if isinstance(transcript, bytes) else transcript.encode())
    argv = ["dialogue", "--transcript", path, "--assets", assets, "--out", tmp_path / "o.wav"]
    for v in voices:
        argv += ["--voice", v.format(a=a, silent=tmp_path / "silent.wav")]
    err = one_line_error(capsys, *argv)
    assert re.search(match, err), err
    assert not (tmp_path / "o.wav").exists()


def test_word_error_measure_and_the_corpus_constrained_recogniser():
    from soundstorm.demo import wer

    assert wer.word_errors("a b c".split(), "a c d".split()) == 2
    assert wer.word_errors([], ["x"]) == 1
    assert wer.normalise("Did Nora see twelve kettles?") == \
        ["did", "nora", "see", "twelve", "kettles"]
    grammar = wer.corpus_grammar()
    public = grammar.split("public <s> =")[1]
    assert "<nouns>" in public and not any(c in public for c in ".,?!")
    assert "\\2-grams:" in wer.corpus_bigram_arpa(samples=200)
    pytest.importorskip("pocketsphinx")
    from speech import require_espeak
    require_espeak()
    from soundstorm.training.speech_corpus import speak, voice_by_name

    recognise = wer.Recogniser(wer.corpus_vocabulary())
    text = "Nora found the silver kettle near the old station."
    hyp = recognise(speak(text, voice_by_name("us-m1")))
    assert wer.word_errors(wer.normalise(text), hyp) <= 2, hyp
