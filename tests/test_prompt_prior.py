"""The prompt prior (`ModelConfig.prompt_prior`): every level's output times the reference
frames' smoothed code frequencies to a learned power. Checked against counts written out
frame by frame, for what it must leave alone, through the config, the weight files, the
capture guard and the XLA mirror, and for what it is for: a model learns from it which
part of the codebook a prompt's speaker uses."""

import math

import pytest
import torch

from conftest import check_round_trip_and_older_config, make_model, random_codes
from soundstorm.engine import ModelConfig
from soundstorm.engine.capture import CaptureGuard
from soundstorm.engine.model import PROMPT_PRIOR_KEYS, SoundStorm


def prior_config(**overrides):
    return ModelConfig.preset("tiny", **{"prompt_prior": True, **overrides})


def _case(seed=0, **overrides):
    cfg = prior_config(**overrides)
    torch.manual_seed(seed)
    model = SoundStorm(cfg).double().eval()
    with torch.no_grad():
        model.prior.weight.copy_(torch.linspace(0.3, 1.2, cfg.num_quantizers))
        model.prior.log_smoothing.copy_(torch.linspace(-1.0, 1.5, cfg.num_quantizers))
    B, T, Q = 3, 16, cfg.num_quantizers
    g = torch.Generator().manual_seed(seed + 1)
    semantic = torch.randint(0, cfg.semantic_vocab_size, (B, 8), generator=g)
    tokens = random_codes(cfg, B, T, Q, seed=seed + 2) % 5   # few codes: counts above 1
    tokens[0, 6:, :] = cfg.mask_id            # prompt of 6 frames, the rest to decode
    tokens[0, 11:13, 0] = 3                   # level 1 decoded already: not a reference
    tokens[1, 4:, 1:] = cfg.mask_id           # another prompt; padding past 12 frames
    tokens[1, 12:] = 2                        # padding holding codes: not a reference
    tokens[2, :, 2] = cfg.mask_id             # no reference at all
    lengths = torch.tensor([T, 12, T])
    return model, semantic, tokens, lengths


def loop_prior(model, tokens, lengths):
    """beta_q log((n_qc + alpha_q) / (N + alpha_q C)) written out, float64 [B, Q, C]."""
    cfg = model.config
    B, T, Q = tokens.shape
    C = cfg.codebook_size
    out = torch.zeros(B, Q, C, dtype=torch.float64)
    for b in range(B):
        refs = [t for t in range(int(lengths[b]))
                if all(int(c) != C for c in tokens[b, t])]
        for q in range(Q):
            beta = float(model.prior.weight.detach()[q])
            alpha = math.exp(float(model.prior.log_smoothing.detach()[q]))
            for c in range(C):
                n = sum(int(tokens[b, t, q]) == c for t in refs)
                out[b, q, c] = beta * math.log((n + alpha) / (len(refs) + alpha * C))
    return out


def test_the_prior_adds_the_weighted_log_frequencies_of_the_reference_codes():
    model, semantic, tokens, lengths = _case()
    T = tokens.shape[1]
    mask = torch.arange(T)[None] < lengths[:, None]
    want = loop_prior(model, tokens, lengths)
    with torch.no_grad():
        h, _ = model.hidden(semantic, tokens, lengths)
        head = model.logits(h, None)                                       # [B, T, Q, C]
        every = model(semantic, tokens, lengths, level=None)
        got_log_prior = model.prior.log_prior(tokens, torch.arange(T)[None] < lengths[:, None])
        for level in (1, 3):
            got = model(semantic, tokens, lengths, level=level)
            torch.testing.assert_close(got[mask], (head[:, :, level - 1]
                                                   + want[:, None, level - 1])[mask])
        per_row = model(semantic, tokens, lengths, level=torch.tensor([2, 1, 4]))
    torch.testing.assert_close(every[mask], (head + want[:, None])[mask])
    for b, level in enumerate((2, 1, 4)):
        torch.testing.assert_close(per_row[b, :int(lengths[b])],
                                   every[b, :int(lengths[b]), level - 1])
    weight = model.prior.weight.detach()[None, :, None]
    torch.testing.assert_close(got_log_prior * weight, want)
    # The row without a reference gets the uniform prior: its distributions do not move.
    torch.testing.assert_close(torch.log_softmax(every[2], -1), torch.log_softmax(head[2], -1))
    # Row 0's references are its 6 prompt frames only: its decoded level-1 codes and row
    # 1's padding count for nothing.
    C = model.config.codebook_size
    counts = (got_log_prior[0, 0].exp() * (6 + math.exp(-1.0) * C) - math.exp(-1.0))
    torch.testing.assert_close(counts, torch.bincount(tokens[0, :6, 0], minlength=C).double())


def test_the_prior_follows_the_copy_and_a_zero_weight_is_the_model_without_it():
    model, semantic, tokens, lengths = _case(seed=3, prompt_lookup=8, semantic_copy=True)
    plain = SoundStorm(prior_config(prompt_lookup=8, semantic_copy=True,
                                    prompt_prior=False)).double().eval()
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert set(unexpected) == set(PROMPT_PRIOR_KEYS) and not missing
    mask = torch.arange(tokens.shape[1])[None] < lengths[:, None]
    want = loop_prior(model, tokens, lengths)
    with torch.no_grad():
        copied = plain(semantic, tokens, lengths, level=None)       # the lookup's copy
        got = model(semantic, tokens, lengths, level=None)
        torch.testing.assert_close(got[mask], (copied + want[:, None])[mask])
        model.prior.weight.zero_()
        for level in (1, None, torch.tensor([1, 2, 4])):
            assert torch.equal(model(semantic, tokens, lengths, level=level),
                               plain(semantic, tokens, lengths, level=level))


def test_config_checks_and_weights_round_trip(tmp_path):
    with pytest.raises(TypeError, match="prompt_prior must be a bool, got int 1"):
        prior_config(prompt_prior=1)
    assert ModelConfig.preset("tiny").prompt_prior is False
    model = make_model(prior_config(prompt_lookup=8), seed=6)
    assert {k for k in model.state_dict() if k.startswith("prior.")} == set(PROMPT_PRIOR_KEYS)
    assert model.num_parameters == model.config.num_parameters()
    assert (model.config.num_parameters() - prior_config(prompt_prior=False,
                                                         prompt_lookup=8).num_parameters()
            == 2 * model.config.num_quantizers)
    fresh = SoundStorm(prior_config()).prior
    assert fresh.weight.abs().max() == 0 and fresh.log_smoothing.abs().max() == 0
    with torch.no_grad():
        model.prior.weight.normal_()
        model.prior.log_smoothing.normal_()
    # A config written before the field: no prior.
    check_round_trip_and_older_config(
        model, make_model(prior_config(prompt_prior=False), seed=6), tmp_path, "prompt_prior",
        True, r"missing tensor 'prior\.(weight|log_smoothing)'")


def test_the_prior_is_capture_safe_and_runs_on_the_meta_device():
    model, semantic, tokens, lengths = _case(seed=7)
    for level in (1, None, torch.tensor([1, 2, 1])):
        with torch.no_grad(), CaptureGuard("cpu", "the prompt prior's forward") as guard:
            model(semantic, tokens, lengths, level=level)
        assert guard.ops > 100
    with torch.device("meta"):
        meta = SoundStorm(prior_config())
    out = meta(semantic.to("meta"), tokens.to("meta"), lengths.to("meta"),
               level=torch.tensor([1, 2, 3]).to("meta"))
    assert out.shape == (3, tokens.shape[1], meta.config.codebook_size)


def _subset_task(cfg, batch, frames, generator):
    """Every row (a speaker) uses its own 4 of the 16 level-1 codes, each frame one of
    them at random, whatever it says: only the prompt (the first half) shows which."""
    C = cfg.codebook_size
    semantic = torch.randint(0, cfg.semantic_vocab_size, (batch, frames), generator=generator)
    subsets = torch.rand(batch, C, generator=generator).argsort(1)[:, :4]
    level1 = subsets.gather(1, torch.randint(0, 4, (batch, frames), generator=generator))
    level2 = torch.randint(0, C, (batch, frames), generator=generator)
    inputs = torch.stack([level1, level2], dim=2)
    inputs[:, frames // 2:] = C
    return semantic, inputs, level1[:, frames // 2:]


def test_the_prior_pulls_a_model_to_the_prompts_codes_and_training_raises_its_weight():
    import torch.nn.functional as F

    cfg = ModelConfig.preset("tiny", prompt_prior=True, num_quantizers=2, codebook_size=16,
                             semantic_vocab_size=8, depth=1, semantic_rate=50)
    model = make_model(cfg, seed=1, sharpen=5.0)
    semantic, inputs, target = _subset_task(cfg, 64, 48, torch.Generator().manual_seed(2))

    def found():
        with torch.no_grad():
            pred = model(semantic, inputs, level=1)[:, 24:].argmax(-1)
        # How often the greedy code is one the row's prompt uses (chance: 4 of 16).
        return (inputs[:, :24, 0, None] == pred[:, None, :]).any(1).float().mean().item()

    assert found() < 0.5
    with torch.no_grad():
        model.prior.weight.fill_(4.0)
    assert found() > 0.95
    # From 0 (the initial weight), the training loss asks for a larger level-1 weight, and
    # nothing of level 2's prior, which this loss does not read.
    with torch.no_grad():
        model.prior.weight.zero_()
    logits = model(semantic, inputs, level=1)[:, 24:]
    F.cross_entropy(logits.reshape(-1, 16), target.reshape(-1)).backward()
    assert float(model.prior.weight.grad[0]) < -0.1
    assert float(model.prior.weight.grad[1]) == 0


def test_fine_tuning_can_add_a_prior_to_a_model_without_one(tmp_path):
    from soundstorm.training.config import TrainConfig
    from soundstorm.training.trainer import load_init_weights

    plain = make_model(prior_config(prompt_prior=False), seed=2)
    plain.save_pretrained(tmp_path / "plain")
    cfg = TrainConfig(init_from=str(tmp_path / "plain"), model_overrides={"prompt_prior": True})
    grown = cfg.model_config()
    assert grown.prompt_prior and grown == prior_config()
    model = SoundStorm(grown)
    load_init_weights(model, str(tmp_path / "plain"))
    for name, value in plain.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert model.prior.weight.abs().max() == 0            # the prior starts off
    with pytest.raises(ValueError, match="only a prompt lookup or a prompt prior may be added"):
        TrainConfig(init_from=str(tmp_path / "plain"), model_overrides={"depth": 3}).model_config()
