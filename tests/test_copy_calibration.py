"""Calibrating a prompt lookup model's copy gates on voices it was not trained on
(`soundstorm calibrate-copy`): the fit finds the gate that generated the codes, only the
gates' offsets change (and level 1's copy, where it is added), the loss on the
calibration voices falls, and bad input is named."""

import json

import numpy as np
import pytest
import torch

from conftest import make_model
from soundstorm.cli import main as cli_main
from soundstorm.engine import ModelConfig
from soundstorm.engine.model import SoundStorm
from soundstorm.engine.model import PROMPT_PRIOR_KEYS, SEMANTIC_COPY_KEYS
from soundstorm.training.copy_calibration import (REPORT_FILE, calibrate_copy,
                                                  calibration_pairs, fit_bias,
                                                  fit_match_and_bias, fit_prior, mixture_nll,
                                                  prior_fit_figures)
from soundstorm.training.corpus import open_corpus, write_corpus


def small_config(**overrides):
    return ModelConfig.preset("tiny", **{"dim": 32, "depth": 1, "heads": 2, "ff_dim": 64,
                                         "num_quantizers": 3, "codebook_size": 16,
                                         "semantic_vocab_size": 8, "max_frames": 128,
                                         "prompt_lookup": 8, **overrides})


def copy_corpus(directory, speakers=3, utterances=3, frames=40, codebook=16, seed=0,
                level1_from_semantic=False, level1_codes=None):
    """Each speaker's finer codes are its own permutations of level 1: only another
    utterance of the same speaker (the prompt) shows them. With `level1_from_semantic`,
    level 1 too is the speaker's own function of the semantic id each frame reads; with
    `level1_codes` k, each speaker's level-1 codes are drawn from its own k codes."""
    rng = np.random.default_rng(seed)
    items = []
    for s in range(speakers):
        perms = [rng.permutation(codebook) for _ in range(2)]
        table = rng.integers(0, codebook, 8)
        for u in range(utterances):
            semantic = rng.integers(0, 8, (frames - 1) // 2 + 1)
            level1 = rng.integers(0, codebook, frames)
            if level1_codes:
                level1 = perms[0][rng.integers(0, level1_codes, frames)]
            if level1_from_semantic:
                level1 = table[semantic[np.arange(frames) // 2]]
            acoustic = np.stack([level1, perms[0][level1], perms[1][level1]], 1)
            items.append({"id": f"s{s}-{u}", "acoustic": acoustic, "speaker": s,
                          "semantic": semantic})
    return write_corpus(directory, items, num_quantizers=3, codebook_size=codebook,
                        semantic_vocab_size=8, frame_rate=50, semantic_rate=25)


@pytest.fixture
def model_dir(tmp_path):
    model = make_model(small_config(), seed=3)
    with torch.no_grad():
        model.lookup.copy_bias.fill_(-3.0)          # a gate that barely trusts the prompt
    model.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_fit_bias_recovers_the_gate_that_generated_the_codes():
    g = torch.Generator().manual_seed(0)
    N, C, bias = 6000, 16, 0.7
    logits = 2.0 * torch.randn(N, C, generator=g)
    vote = torch.softmax(4.0 * torch.randn(N, C, generator=g), dim=1)
    z = 0.5 * torch.randn(N, generator=g)
    gate = torch.sigmoid(z + bias)[:, None]
    probs = (1 - gate) * torch.softmax(logits, 1) + gate * vote
    target = torch.multinomial(probs, 1, generator=g)[:, 0]
    data = {"z": z, "logits": logits, "vote": vote, "target": target}
    found = fit_bias(data)
    assert abs(found - bias) < 0.2, found
    assert mixture_nll(data, found) <= min(mixture_nll(data, b) for b in (-2, 0, 0.7, 2))


def test_fit_match_and_bias_recovers_level_ones_gate():
    g = torch.Generator().manual_seed(1)
    N, C, weight, bias = 8000, 16, 1.5, -2.0
    logits = 2.0 * torch.randn(N, C, generator=g)
    vote = torch.softmax(4.0 * torch.randn(N, C, generator=g), dim=1)
    z = torch.zeros(N)
    match = torch.tensor([0.0, 0.5, 1.5, 2.0])[torch.randint(0, 4, (N,), generator=g)]
    gate = torch.sigmoid(weight * match + bias)[:, None]
    probs = (1 - gate) * torch.softmax(logits, 1) + gate * vote
    target = torch.multinomial(probs, 1, generator=g)[:, 0]
    data = {"z": z, "logits": logits, "vote": vote, "target": target, "match": match}
    c, b = fit_match_and_bias(data)
    assert abs(c - weight) < 0.5 and abs(b - bias) < 0.5, (c, b)
    # It beats the offset alone, fitted without the match.
    alone = fit_bias(data)
    assert mixture_nll({**data, "z": c * match}, b) < mixture_nll(data, alone)


def test_fit_prior_recovers_the_prior_that_generated_the_codes():
    g = torch.Generator().manual_seed(2)
    N, C, pairs, weight, smoothing = 12000, 16, 60, 0.8, 1.0
    log_probs = torch.log_softmax(2.0 * torch.randn(N, C, generator=g), dim=1)
    # Each utterance's prompt: 30 frames over a few codes.
    counts = torch.stack([torch.bincount(torch.randint(0, 4, (30,), generator=g)
                                         + torch.randint(0, C - 4, (1,), generator=g),
                                         minlength=C) for _ in range(pairs)])
    pair = torch.randint(0, pairs, (N,), generator=g)
    table = torch.log((counts + smoothing) / (30 + smoothing * C)).float()[pair]
    target = torch.multinomial(torch.softmax(log_probs + weight * table, 1), 1,
                               generator=g)[:, 0]
    data = {"counts": counts, "pair": pair, "target": target}
    beta, alpha = fit_prior(log_probs, data)
    assert abs(beta - weight) < 0.25 and 0.35 <= alpha <= 2.9, (beta, alpha)
    best = prior_fit_figures(log_probs, data, beta, alpha)[0]
    assert best <= min(prior_fit_figures(log_probs, data, b, a)[0]
                       for b in (0.0, 0.4, 0.8, 1.6) for a in (0.25, 1.0, 4.0))
    # Without a prior in the codes, the fit keeps it near 0.
    plain = torch.multinomial(log_probs.exp(), 1, generator=g)[:, 0]
    assert fit_prior(log_probs, {**data, "target": plain})[0] < 0.1


def test_pairs_take_the_prompt_from_another_utterance_of_the_same_speaker(tmp_path):
    corpus = open_corpus(copy_corpus(tmp_path / "c", speakers=2, utterances=2, frames=30))
    pairs = calibration_pairs(corpus, prompt_frames=10, max_frames=128)
    assert len(pairs) == 4
    semantic, tokens, P = pairs[0]                   # s0-0, prompted by s0-1
    prompt, _ = corpus.read(1, 0, 10)
    target, target_ids = corpus.read(0, 0, 30)
    assert P == 10 and torch.equal(tokens[:10], torch.from_numpy(prompt))
    assert torch.equal(tokens[10:], torch.from_numpy(target))
    assert semantic.shape[0] == 5 + len(target_ids)
    # Both fit the model: the target is cut to max_frames - P.
    assert all(t.shape[0] == 25 for _, t, _ in calibration_pairs(corpus, 10, 25))


def test_calibration_raises_the_gate_where_the_prompt_tells_and_changes_nothing_else(
        model_dir, tmp_path):
    data = copy_corpus(tmp_path / "calib")
    report = calibrate_copy(model_dir, data, tmp_path / "out", prompt_seconds=0.4)
    assert report["utterances"] == 9 and set(report["levels"]) == {"2", "3"}
    for level in report["levels"].values():
        assert level["bias"][0] == pytest.approx(-3.0)
        assert level["mean_gate"][1] > level["mean_gate"][0]
        assert level["nll"][1] < level["nll"][0]
        assert level["frames"] > 0
    before = SoundStorm.from_pretrained(model_dir).state_dict()
    after = SoundStorm.from_pretrained(tmp_path / "out").state_dict()
    for key, value in before.items():
        if key != "lookup.copy_bias":
            assert torch.equal(after[key], value), key
    assert after["lookup.copy_bias"].tolist() == pytest.approx(
        [report["levels"][q]["bias"][1] for q in ("2", "3")], abs=1e-4)
    assert json.loads((tmp_path / "out" / REPORT_FILE).read_text()) == report


def test_adding_level_ones_copy_fits_its_gate_where_the_prompt_tells(model_dir, tmp_path):
    data = copy_corpus(tmp_path / "calib", level1_from_semantic=True)
    report = calibrate_copy(model_dir, data, tmp_path / "out", prompt_seconds=0.4,
                            add_semantic_copy=True)
    assert report["semantic_copy_added"] is True
    assert set(report["levels"]) == {"1", "2", "3"}
    first = report["levels"]["1"]
    assert first["bias"][0] == pytest.approx(-4.0) and first["match_weight"][0] == 0
    assert first["match_weight"][1] > 0
    assert first["mean_gate"][1] > first["mean_gate"][0]
    assert first["nll"][1] < first["nll"][0] and first["accuracy"][1] > first["accuracy"][0]
    before = SoundStorm.from_pretrained(model_dir)
    after = SoundStorm.from_pretrained(tmp_path / "out")
    assert after.config.semantic_copy and not before.config.semantic_copy
    fresh = SoundStorm(after.config).lookup
    for key, value in after.state_dict().items():
        if key in before.state_dict() and key != "lookup.copy_bias":
            assert torch.equal(value, before.state_dict()[key]), key
    for key in ("semantic_context", "semantic_log_scale", "level1_copy_weight"):
        assert torch.equal(after.lookup.get_parameter(key), fresh.get_parameter(key)), key
    assert set(after.state_dict()) - set(before.state_dict()) == set(SEMANTIC_COPY_KEYS)
    assert float(after.lookup.level1_copy_bias.detach()) == pytest.approx(first["bias"][1], abs=1e-4)
    assert float(after.lookup.level1_copy_match.detach()) == pytest.approx(first["match_weight"][1],
                                                                  abs=1e-4)
    # Calibrated again, a model that has the copy keeps it and finds the same gate.
    again = calibrate_copy(tmp_path / "out", data, tmp_path / "again", prompt_seconds=0.4)
    assert again["semantic_copy_added"] is False
    assert again["levels"]["1"]["nll"][1] == pytest.approx(first["nll"][1], abs=1e-3)


def test_adding_the_prompt_prior_fits_every_levels_weight_after_the_gates(model_dir, tmp_path):
    data = copy_corpus(tmp_path / "calib", level1_codes=3)
    report = calibrate_copy(model_dir, data, tmp_path / "out", prompt_seconds=0.4,
                            add_prompt_prior=True)
    assert report["prompt_prior_added"] is True and report["semantic_copy_added"] is False
    assert set(report["levels"]) == {"1", "2", "3"}
    first = report["levels"]["1"]           # no copy at level 1: the prior alone
    assert "bias" not in first and first["frames"] > 0
    for q, level in report["levels"].items():
        prior = level["prior"]
        assert prior["weight"][0] == 0 and prior["smoothing"][0] == 1
        assert prior["nll"][1] <= prior["nll"][0], q
        if q != "1":    # the prior starts from the copy with its calibrated gate
            assert prior["nll"][0] == pytest.approx(level["nll"][1], abs=1e-3)
    # Level 1's codes are the speaker's 3: the prior is worth much there.
    assert first["prior"]["weight"][1] > 0.5
    assert first["prior"]["nll"][1] < first["prior"]["nll"][0] - 0.3
    assert first["prior"]["accuracy"][1] > first["prior"]["accuracy"][0]
    before = SoundStorm.from_pretrained(model_dir)
    after = SoundStorm.from_pretrained(tmp_path / "out")
    assert after.config.prompt_prior and not after.config.semantic_copy
    assert set(after.state_dict()) - set(before.state_dict()) == set(PROMPT_PRIOR_KEYS)
    for key, value in before.state_dict().items():
        if key != "lookup.copy_bias":
            assert torch.equal(after.state_dict()[key], value), key
    for q in range(3):
        prior = report["levels"][str(q + 1)]["prior"]
        assert float(after.prior.weight[q].detach()) == pytest.approx(prior["weight"][1],
                                                                      abs=1e-4)
        assert float(after.prior.log_smoothing[q].detach().exp()) == pytest.approx(
            prior["smoothing"][1], rel=1e-4)
    # Calibrated again, the model keeps its prior and finds the same fit.
    again = calibrate_copy(tmp_path / "out", data, tmp_path / "again", prompt_seconds=0.4)
    assert again["prompt_prior_added"] is False
    for q, level in again["levels"].items():
        assert level["prior"]["nll"][1] == pytest.approx(
            report["levels"][q]["prior"]["nll"][1], abs=1e-3)
    # Both additions at once: level 1 has its copy's gate and then its prior.
    both = calibrate_copy(model_dir, data, tmp_path / "both", prompt_seconds=0.4,
                          add_semantic_copy=True, add_prompt_prior=True)
    assert "match_weight" in both["levels"]["1"] and "prior" in both["levels"]["1"]
    assert both["levels"]["1"]["prior"]["nll"][0] == pytest.approx(
        both["levels"]["1"]["nll"][1], abs=1e-3)


def test_calibration_names_what_is_wrong(model_dir, tmp_path):
    data = copy_corpus(tmp_path / "calib")
    plain = make_model(small_config(prompt_lookup=0), seed=1)
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="no prompt lookup"):
        calibrate_copy(tmp_path / "plain", data, tmp_path / "o1", prompt_seconds=0.4)
    other = copy_corpus(tmp_path / "c32", codebook=32)
    with pytest.raises(ValueError, match="does not fit.*codebook_size: corpus 32, model 16"):
        calibrate_copy(model_dir, other, tmp_path / "o2", prompt_seconds=0.4)
    lonely = copy_corpus(tmp_path / "lonely", speakers=2, utterances=1)
    with pytest.raises(ValueError, match="no speaker with two utterances"):
        calibrate_copy(model_dir, lonely, tmp_path / "o3", prompt_seconds=0.4)
    for bad in (0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="prompt_seconds must be a positive number"):
            calibrate_copy(model_dir, data, tmp_path / "o4", prompt_seconds=bad)
    with pytest.raises(TypeError, match="add_semantic_copy must be a bool"):
        calibrate_copy(model_dir, data, tmp_path / "o4", prompt_seconds=0.4,
                       add_semantic_copy="yes")
    with pytest.raises(TypeError, match="add_prompt_prior must be a bool"):
        calibrate_copy(model_dir, data, tmp_path / "o4", prompt_seconds=0.4,
                       add_prompt_prior=1)
    with pytest.raises(ValueError, match="not fewer than the model's max_frames = 128"):
        calibrate_copy(model_dir, data, tmp_path / "o5", prompt_seconds=3.0)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))


def test_the_command_reports_each_level_and_fails_in_one_line(model_dir, tmp_path, capsys):
    data = copy_corpus(tmp_path / "calib")
    out = tmp_path / "out"
    assert cli_main(["calibrate-copy", str(model_dir), "--data", str(data), "--out", str(out),
                     "--prompt-seconds", "0.4", "--no-progress", "--add-semantic-copy",
                     "--add-prompt-prior"]) == 0
    printed = capsys.readouterr().out
    assert "level 1: gate" in printed and "match weight" in printed
    assert "level 1: prompt prior weight 0.000 ->" in printed
    assert "level 3: prompt prior weight" in printed
    assert "level 2: gate" in printed and "level 3: gate" in printed
    assert SoundStorm.from_pretrained(out).config.semantic_copy
    assert SoundStorm.from_pretrained(out).config.prompt_prior
    assert f"calibrated on 9 utterances: {out}" in printed
    assert (out / "model.safetensors").is_file()
    with pytest.raises(SystemExit) as e:
        cli_main(["calibrate-copy", str(tmp_path / "nowhere"), "--data", str(data),
                  "--out", str(tmp_path / "out2"), "--no-progress"])
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert "soundstorm calibrate-copy" in err and "nowhere" in err
    assert len(err.strip().splitlines()) == 1
