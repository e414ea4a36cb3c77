"""`soundstorm demo` end to end on short clips, and the shipped demo assets."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from soundstorm.demo import ASSETS
from soundstorm.demo.run import ablation_schedules, load_assets, run_demo
from soundstorm.cli import main as cli_main
from soundstorm.engine.config import ModelConfig
from soundstorm.engine.model import SoundStorm
from soundstorm.training.audio_list import collect_audio
from soundstorm.training.codec_fit import fit_melrvq
from soundstorm.training.semantic import fit_semantic
from soundstorm.training.speech_corpus import HELDOUT_STREAM_OFFSET, write_speech_corpus
from speech import require_espeak

SHIPPED_BYTES_LIMIT = 40 * 2 ** 20


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    """Demo assets built in seconds: a codec, a semantic tokenizer and an untrained model."""
    require_espeak()
    root = tmp_path_factory.mktemp("demo")
    summary = write_speech_corpus(root / "speech", minutes=0.3, heldout_utterances=0,
                                  progress=False)
    paths = [i.path for i in collect_audio(root / "speech/train.jsonl")]
    assets = root / "assets"
    fit_melrvq(paths, assets / "codec", num_quantizers=2, codebook_size=16, iterations=3,
               progress=False)
    fit_semantic("mfcc", paths, assets / "semantic", vocab_size=8, iterations=3,
                 progress=False)
    config = ModelConfig.preset("tiny", dim=32, depth=1, heads=2, ff_dim=64, num_quantizers=2,
                                codebook_size=16, semantic_vocab_size=8, max_frames=256)
    torch.manual_seed(0)
    SoundStorm(config).save_pretrained(assets / "model")
    (assets / "demo.json").write_text(json.dumps({
        "corpus_seed": 0, "heldout_stream_offset": HELDOUT_STREAM_OFFSET,
        "heldout_sentences_used": 0, "heldout_voices": summary["heldout"]["voices"]}))
    return assets


def test_demo_end_to_end(tiny_assets, tmp_path):
    out = tmp_path / "out"
    lines = []
    report = run_demo(out, assets=tiny_assets, utterances=2, prompt_seconds=1.0,
                      max_seconds=4.0, progress=False, log=lines.append)
    for name in ("prompt.wav", "original.wav", "ground_truth.wav", "generated.wav"):
        data, sr = sf.read(str(out / name))
        assert sr == 16000 and data.ndim == 1 and np.abs(data).max() > 0
    assert sf.info(str(out / "prompt.wav")).duration == pytest.approx(1.0, abs=0.02)
    gen, truth = sf.info(str(out / "generated.wav")), sf.info(str(out / "ground_truth.wav"))
    assert gen.frames == truth.frames and 0.5 < gen.duration <= 4.0
    assert (out / "spectrograms.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((out / "utterances").glob("*.wav"))) == 4
    tokens = sorted((out / "utterances").glob("*.tokens.npy"))
    assert len(tokens) == 2 * 3                          # every utterance, every schedule
    first = np.load(tokens[0])
    assert first.dtype == np.int64 and first.shape[1] == 2 and (first >= 0).all()
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    assert list(report["schedules"]) == ["default", "greedy", "more"]
    for name, steps in ablation_schedules(2).items():
        s = report["schedules"][name]
        assert s["steps_per_level"] == list(steps) and s["passes"] == sum(steps)
        assert s["rtf"] > 0 and s["rtf_with_vocoder"] >= s["rtf"]
        assert len(s["token_accuracy"]) == 2 and all(0 <= a <= 1 for a in s["token_accuracy"])
        assert s["level1_accuracy"] == s["token_accuracy"][0]
        assert s["mel_distance_db"] > 0
        for key in ("similarity_prompt_speaker", "similarity_other_speakers",
                    "similarity_closest_other"):
            assert -1 <= s[key] <= 1
        assert s["identified"] in (0.0, 0.5, 1.0)
        # the prompt speaker's rank among all voices: 1 exactly when identified
        ranks = [u["schedules"][name]["prompt_speaker_rank"] for u in report["utterances"]]
        assert all(1 <= r <= 12 for r in ranks) and s["mean_rank"] == np.mean(ranks)
        assert s["identified"] == np.mean([r == 1 for r in ranks])
        # word error rate: the errors of every utterance over all their words
        errors = [u["schedules"][name]["word_errors"] for u in report["utterances"]
                  if not u["cut"]]
        assert all(isinstance(e, int) and e >= 0 for e in errors)
        assert s["wer"] == report["wer"]["generated"][name] == \
            round(sum(errors) / report["wer"]["words"], 4)
    assert report["codec_mel_distance_db"] > 0
    # no voices listed in demo.json: the corpus's twelve fixed voices
    assert len(report["speaker_similarity"]["speakers"]) == report["voices"] == 12
    wer = report["wer"]
    whole = [u for u in report["utterances"] if not u["cut"]]
    assert wer["utterances"] == len(whole) > 0
    assert wer["words"] == sum(u["words"] for u in whole) > 0
    for k in ("original", "ground_truth"):
        assert wer[k] == round(sum(u["word_errors"][k] for u in whole) / wer["words"], 4)
    assert 0 <= wer["original"] <= 1.5 and 0 <= wer["ground_truth"]
    # the recogniser hears the original espeak-ng speech: most of its words right
    assert wer["original"] < 0.5, [u["recognised"] for u in whole]
    assert any("word error rate" in line for line in lines)
    assert [u["voice"] for u in report["utterances"]] == report["heldout_voices"]
    assert any("level-1 acc" in line for line in lines)


def test_demo_command_and_errors(tiny_assets, tmp_path, capsys):
    assert cli_main(["demo", "--assets", str(tiny_assets), "--out", str(tmp_path / "o"),
                     "--utterances", "1", "--prompt-seconds", "1", "--max-seconds", "1",
                     "--no-ablation", "--no-speaker-similarity", "--no-wer",
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "default" in out and "greedy" not in out and "WER" not in out
    report = json.loads((tmp_path / "o/report.json").read_text())
    assert list(report["schedules"]) == ["default"] and "speaker_similarity" not in report
    assert "wer" not in report and "wer" not in report["schedules"]["default"]
    for argv, message in [
        (["--utterances", "0"], "utterances must be an integer >= 1, got 0"),
        (["--prompt-seconds", "-1"], "prompt_seconds must be a positive number of seconds"),
        (["--prompt-seconds", "100"], "leaves no room for a target"),
    ]:
        with pytest.raises(SystemExit) as e:
            cli_main(["demo", "--assets", str(tiny_assets), "--out", str(tmp_path / "x")]
                     + argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(tiny_assets, broken)
    shutil.rmtree(broken / "semantic")
    with pytest.raises(FileNotFoundError, match="lack 'semantic'"):
        load_assets(broken)


@pytest.fixture(scope="module")
def population_assets(tiny_assets, tmp_path_factory):
    """The tiny assets with a drawn voice population listed in demo.json."""
    from dataclasses import asdict

    from soundstorm.training.speech_corpus import voice_population

    assets = tmp_path_factory.mktemp("population") / "assets"
    shutil.copytree(tiny_assets, assets)
    voices = voice_population(5, heldout=2, seed=3)
    settings = json.loads((assets / "demo.json").read_text())
    settings.update(voices=[asdict(v) for v in voices],
                    heldout_voices=[v.name for v in voices if v.heldout])
    (assets / "demo.json").write_text(json.dumps(settings))
    return assets, voices


def test_demo_scores_against_every_listed_voice(population_assets, tmp_path):
    assets, voices = population_assets
    report = run_demo(tmp_path / "out", assets=assets, utterances=2, prompt_seconds=1.0,
                      max_seconds=1.0, ablation=False, wer=False, progress=False,
                      log=lambda line: None)
    held = [v.name for v in voices if v.heldout]
    assert report["heldout_voices"] == held and report["voices"] == 5
    assert [u["voice"] for u in report["utterances"]] == held
    assert report["speaker_similarity"]["speakers"] == [v.name for v in voices]
    ranks = [u["schedules"]["default"]["prompt_speaker_rank"] for u in report["utterances"]]
    assert all(1 <= r <= 5 for r in ranks)
    assert "wer" not in report


@pytest.mark.parametrize("change, match", [
    ({"voices": []}, "'voices' must be a non-empty list"),
    ({"voices": [{"name": "a", "espeak": "en-us"}]}, r"voices\[0\] must be an object with"),
    ({"voices": [{"name": "a", "espeak": "en-us", "pitch": "50", "speed": 160}]},
     r"voices\[0\].pitch = '50' is not an integer"),
    ({"voices": [{"name": "a", "espeak": "en-us", "pitch": 50, "speed": 160, "age": 3}]},
     r"voices\[0\] must be an object"),
    ({"voices": [{"name": "a", "espeak": "en-us", "pitch": 50, "speed": 160}] * 2},
     "voice 'a' is listed twice"),
    ({"voices": [{"name": "a", "espeak": "en-us", "pitch": 50, "speed": 160}],
      "heldout_voices": ["b"]}, r"held-out voices \['b'\] are not among its voices"),
])
def test_demo_voices_reject_broken_settings(change, match):
    from soundstorm.demo.run import demo_voices

    with pytest.raises(ValueError, match=match):
        demo_voices({"heldout_voices": [], **change})


def test_shipped_assets_load_and_fit_the_limits():
    from soundstorm.demo.run import demo_voices

    files = [f for part in ("model", "codec", "semantic", "text-model")
             for f in (ASSETS / part).iterdir()]
    assert sum(f.stat().st_size for f in files) <= SHIPPED_BYTES_LIMIT
    engine, codec, semantic, settings = load_assets(ASSETS)
    voices = demo_voices(settings)
    held = {name for name, v in voices.items() if v.heldout}
    assert set(settings["heldout_voices"]) == held and len(held) >= 8
    assert set(settings["corpus_voices"]) == set(voices) - held and len(voices) >= 100
    # whole voices held out: their espeak-ng voice variants are not any training voice's
    variant = lambda name: voices[name].espeak.split("+")[1]  # noqa: E731
    assert not {variant(n) for n in held} & {variant(n) for n in settings["corpus_voices"]}
    assert settings["corpus_minutes"] >= 60 and settings["training"]["steps"] >= 2000
    assert semantic.kind == "mfcc" and codec.name == "melrvq"
    assert codec.decoder == "vocoder"     # the learned vocoder ships with the codec
    assert engine.config.num_quantizers == codec.num_quantizers


def test_shipped_vocoder_beats_griffin_lim_on_a_held_out_voice():
    """The round trip encode -> decode of a held-out voice's speech: the shipped vocoder's
    audio is more intelligible (STOI) than Griffin-Lim's from the same codes."""
    require_espeak()
    pystoi = pytest.importorskip("pystoi")
    from soundstorm.demo.run import demo_voices
    from soundstorm.engine.codecs import load_codec
    from soundstorm.training.speech_corpus import speak

    settings = json.loads((ASSETS / "demo.json").read_text())
    voice = demo_voices(settings)[settings["heldout_voices"][0]]
    speech = speak("Please ask Nora to bring the golden kettle across the river.", voice)
    scores = {}
    for vocoder in (True, False):
        codec = load_codec("melrvq", path=ASSETS / "codec", vocoder=vocoder)
        tokens = codec.encode(torch.from_numpy(speech)[None], 16000)
        audio = codec.decode(tokens)[0].numpy()[:len(speech)]
        assert np.isfinite(audio).all() and audio.shape == speech[:len(audio)].shape
        scores[vocoder] = pystoi.stoi(speech[:len(audio)], audio, 16000)
    assert scores[True] > scores[False] + 0.05, scores


def test_shipped_model_generates_held_out_speech(tmp_path):
    """The trained model on one held-out sentence in a held-out voice: far above chance
    at level 1, and closer to the original's spectrogram than an untrained model."""
    require_espeak()
    kwargs = dict(utterances=1, max_seconds=3.0, ablation=False, speaker_similarity=False,
                  progress=False, log=lambda line: None)
    trained = run_demo(tmp_path / "trained", **kwargs)["schedules"]["default"]
    engine, *_ = load_assets(ASSETS)
    untrained = tmp_path / "untrained"
    shutil.copytree(ASSETS, untrained, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    # An untrained network, without the prompt lookup: its copies would pick the prompt's
    # codes untrained (an almost uniform head loses to even an almost shut gate).
    torch.manual_seed(0)
    SoundStorm(dataclasses.replace(engine.config, prompt_lookup=0, semantic_copy=False,
                                   prompt_prior=False)).save_pretrained(untrained / "model")
    baseline = run_demo(tmp_path / "u", assets=untrained, **kwargs)["schedules"]["default"]
    chance = 1 / engine.config.codebook_size
    assert trained["level1_accuracy"] > 10 * chance
    assert trained["level1_accuracy"] > 5 * baseline["level1_accuracy"]
    assert trained["mel_distance_db"] < baseline["mel_distance_db"] - 3


def test_pipeline_from_espeak_to_demo(tmp_path):
    """demo/reproduce.sh in miniature: speak, fit, tokenize, train, export, run the demo."""
    require_espeak()
    from soundstorm.demo.export import export_assets

    w = tmp_path / "work"
    cli = lambda *argv: cli_main([str(a) for a in argv])  # noqa: E731
    assert cli("speech-corpus", w / "speech", "--minutes", "1.2", "--heldout-utterances", "2",
               "--no-progress") == 0
    assert cli("fit-codec", w / "speech/train.jsonl", "--out", w / "codec", "--num-quantizers",
               2, "--codebook-size", 16, "--iterations", 3, "--no-progress") == 0
    assert cli("fit-semantic", w / "speech/train.jsonl", "--out", w / "semantic", "--kind",
               "mfcc", "--vocab-size", 8, "--iterations", 3, "--no-progress") == 0
    for split in ("train", "heldout"):
        assert cli("tokenize", w / f"speech/{split}.jsonl", "--codec-path", w / "codec",
                   "--semantic", w / "semantic", "--out", w / f"tokens/{split}",
                   "--no-progress") == 0
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"model_overrides": {
        "dim": 32, "depth": 1, "heads": 2, "ff_dim": 64, "num_quantizers": 2,
        "codebook_size": 16, "semantic_vocab_size": 8, "max_frames": 256},
        "batch_size": 4, "min_seconds": 1.0, "max_seconds": 2.0, "log_every": 1,
        "val_every": 2, "checkpoint_every": 2}))
    assert cli("train", "--preset", "tiny", "--config", config, "--data", w / "tokens/train",
               "--val-data", w / "tokens/heldout", "--out", w / "run", "--steps", 2,
               "--no-progress") == 0
    # The second stage: the trained model given a prompt lookup and fine-tuned with it.
    assert cli("train", "--preset", "tiny", "--init-from", w / "run/model", "--prompt-lookup",
               8, "--batch-size", 4, "--min-seconds", 1.0, "--max-seconds", 2.0,
               "--log-every", 1, "--val-every", 3, "--checkpoint-every", 3,
               "--data", w / "tokens/train", "--val-data", w / "tokens/heldout",
               "--out", w / "run-lookup", "--steps", 3, "--no-progress") == 0
    assert cli("train-text", "--data", w / "tokens/train", "--val-data", w / "tokens/heldout",
               "--out", w / "text-run", "--preset", "tiny", "--steps", 2, "--batch-size", 2,
               "--log-every", 1, "--no-progress") == 0
    (w / "stage-times.tsv").write_text("speech-corpus\t3\ntrain-soundstorm\t9\n"
                                       "train-soundstorm\t11\n")  # a resumed stage: summed
    # Without a calibration, export takes the lookup run's model.
    uncalibrated = export_assets(w, tmp_path / "uncalibrated")
    assert "copy_calibration" not in uncalibrated
    assert SoundStorm.from_pretrained(tmp_path / "uncalibrated/model").config.prompt_lookup == 8
    # The lookup's copy gates calibrated (on the held-out voices here, for the plumbing),
    # level 1 given its copy and every level the prompt prior as reproduce.sh does: export
    # takes the calibrated model and records the calibration.
    assert cli("calibrate-copy", w / "run-lookup/model", "--data", w / "tokens/heldout",
               "--out", w / "calibrated", "--prompt-seconds", 0.5, "--add-semantic-copy",
               "--add-prompt-prior", "--no-progress") == 0
    settings = export_assets(w, tmp_path / "assets")
    assert set(settings["copy_calibration"]["levels"]) == {"1", "2"}
    assert settings["copy_calibration"]["semantic_copy_added"] is True
    assert settings["copy_calibration"]["prompt_prior_added"] is True
    assert all("prior" in level for level in settings["copy_calibration"]["levels"].values())
    calibrated = SoundStorm.from_pretrained(w / "calibrated")
    exported = SoundStorm.from_pretrained(tmp_path / "assets/model")
    assert exported.config.semantic_copy and exported.config.prompt_prior
    for name in ("lookup.copy_bias", "lookup.level1_copy_bias", "lookup.level1_copy_match",
                 "prior.weight", "prior.log_smoothing"):
        torch.testing.assert_close(exported.get_parameter(name).float(),
                                   calibrated.get_parameter(name).half().float())
    assert settings["training"]["steps"] == 2 and settings["text_model"]["steps"] == 2
    assert settings["lookup_training"]["steps"] == 3
    assert settings["lookup_training"]["final_validation"]["val_loss"] > 0
    assert settings["stage_seconds"] == {"speech-corpus": 3, "train-soundstorm": 20}
    # every voice whole, so that the demo speaks in them again
    from soundstorm.demo.run import demo_voices
    from soundstorm.training.speech_corpus import VOICES
    assert list(demo_voices(settings).values()) == list(VOICES)
    from soundstorm.engine.text_model import TextToSemantic
    text_model = TextToSemantic.from_pretrained(tmp_path / "assets/text-model")
    assert next(text_model.parameters()).dtype == torch.float16
    assert settings["training"]["final_validation"]["val_loss"] > 0
    from safetensors import safe_open
    with safe_open(str(tmp_path / "assets/model/model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
    engine, *_ = load_assets(tmp_path / "assets")
    assert next(engine.model.parameters()).dtype == torch.float32
    report = run_demo(tmp_path / "out", assets=tmp_path / "assets", utterances=1,
                      prompt_seconds=1.0, max_seconds=1.0, ablation=False,
                      speaker_similarity=False, progress=False, log=lambda line: None)
    assert (tmp_path / "out/generated.wav").exists()
    assert report["utterances"][0]["voice"] in settings["heldout_voices"]
