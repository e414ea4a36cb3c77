"""Level 1's copy (`ModelConfig.semantic_copy`): every frame's level-1 output mixes in the
vote of the reference frames that read the same semantic ids in the same context, by a
gate that also weighs how well the best of them matches. Checked against a loop over
frame pairs, for what it must leave alone, through the config, the weight files and the
capture guard, and for what it is for: a model with it learns level-1 codes that only the
prompt shows."""

import math

import pytest
import torch

from conftest import (check_round_trip_and_older_config, make_model, random_codes,
                      train_on_task)
from soundstorm.engine import ModelConfig
from soundstorm.engine.capture import CaptureGuard
from soundstorm.engine.model import SEMANTIC_COPY_KEYS, SoundStorm


def copy_config(**overrides):
    return ModelConfig.preset("tiny", **{"prompt_lookup": 8, "semantic_copy": True,
                                         **overrides})


def trained_like(model):
    """Weights far from their init, so that every term of the copy matters."""
    with torch.no_grad():
        for p in model.lookup.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def loop_semantic(model, semantic, tokens, lengths):
    """`PromptLookup.semantic_weights` written out frame pair by frame pair, float64:
    (weights [B, T, T], best match [B, T])."""
    lookup, cfg = model.lookup, model.config
    B, T, Q = tokens.shape
    C = cfg.codebook_size
    num, den = cfg.semantic_index_fraction()
    u = lookup.semantic_context.detach().double()
    s = math.exp(float(lookup.semantic_log_scale.detach()))
    weights = torch.zeros(B, T, T, dtype=torch.float64)
    best = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        n = int(lengths[b])

        def sid(t):
            return int(semantic[b, t * num // den]) if 0 <= t < n else None

        def match(i, j):
            total = 0.0
            for k, d in enumerate((-1, 0, 1)):
                if sid(i + d) is not None and sid(i + d) == sid(j + d):
                    total += float(u[k])
            return total

        refs = [j for j in range(n) if all(int(c) != C for c in tokens[b, j])]
        for i in range(n):
            others = [j for j in refs if j != i]
            if not others:
                continue
            m = torch.tensor([match(i, j) for j in others], dtype=torch.float64)
            weights[b, i, others] = torch.softmax(s * m, 0)
            best[b, i] = m.max()
    return weights, best


def _case(seed=0):
    cfg = copy_config()
    torch.manual_seed(seed)
    model = trained_like(SoundStorm(cfg).double())
    B, T = 3, 16
    g = torch.Generator().manual_seed(seed + 1)
    # Few semantic ids, so that frames match fully, partly and not at all.
    semantic = torch.randint(0, 3, (B, 8), generator=g)
    tokens = random_codes(cfg, B, T, cfg.num_quantizers, seed=seed + 2)
    tokens[0, 6:, :] = cfg.mask_id            # prompt of 6 frames, the rest to decode
    tokens[0, 11:13, 0] = 5                   # level-1 codes decoded already: no reference
    tokens[1, 4:, 1:] = cfg.mask_id           # another prompt; padding past 12 frames
    tokens[1, 12:] = 10 ** 6
    tokens[2, :, 2] = cfg.mask_id             # no reference: the row reads nothing
    lengths = torch.tensor([T, 12, T])
    return model, semantic, tokens, lengths


def test_semantic_weights_equal_the_loop_over_frame_pairs():
    model, semantic, tokens, lengths = _case()
    mask = torch.arange(tokens.shape[1])[None] < lengths[:, None]
    got_w, got_best = model.semantic_weights(semantic, tokens, lengths, level=1)
    want_w, want_best = loop_semantic(model, semantic, tokens, lengths)
    torch.testing.assert_close(got_w[mask], want_w[mask])
    torch.testing.assert_close(got_best[mask], want_best[mask])
    # Only the prompt frames are references; a row without one reads nothing.
    assert got_w[0, :, 6:].abs().max() == 0 and got_w[0, 6:, :6].sum(-1).min() > 0.99
    assert got_w[2].abs().max() == 0 and got_best[2].abs().max() == 0
    # A level other than 1, or a model without the copy, computes none.
    assert model.semantic_weights(semantic, tokens, lengths, level=2) is None
    plain = SoundStorm(copy_config(semantic_copy=False))
    assert plain.semantic_weights(semantic, tokens, lengths, level=1) is None


def test_level_one_mixes_the_head_with_the_vote_as_a_loop_does_and_nothing_else_moves():
    model, semantic, tokens, lengths = _case(seed=3)
    cfg = model.config
    B, T, Q = tokens.shape
    mask = torch.arange(T)[None] < lengths[:, None]
    lookup = model.lookup
    with torch.no_grad():
        h, lookup_weights = model.hidden(semantic, tokens, lengths)
        head = model.logits(h, None)
        weights, best = loop_semantic(model, semantic, tokens, lengths)
        want = head[..., 0, :].double().clone()
        for b in range(B):
            for i in range(int(lengths[b])):
                if weights[b, i].sum() == 0:
                    continue
                vote = torch.zeros(cfg.codebook_size, dtype=torch.float64)
                vote.index_add_(0, tokens[b, :, 0].clamp(0, cfg.codebook_size - 1),
                                weights[b, i])
                g = torch.sigmoid(h[b, i] @ lookup.level1_copy_weight
                                  + lookup.level1_copy_match * best[b, i]
                                  + lookup.level1_copy_bias)
                want[b, i] = torch.log((1 - g) * torch.softmax(want[b, i], 0) + g * vote)
        got = model(semantic, tokens, lengths, level=1)
        every = model(semantic, tokens, lengths, level=None)
        per_row = model(semantic, tokens, lengths, level=torch.tensor([1, 3, 1]))
        without = lookup.copy(head, h, tokens, lookup_weights, None)       # level 1 alone
    torch.testing.assert_close(got[mask], want[mask])
    torch.testing.assert_close(every[..., 0, :][mask], want[mask])
    torch.testing.assert_close(per_row[0], want[0])
    torch.testing.assert_close(per_row[2], want[2])
    torch.testing.assert_close(per_row[1, :12], every[1, :12, 2])
    # The finer levels are the lookup's as before; level 1 moved only where a frame reads.
    torch.testing.assert_close(every[..., 1:, :][mask], without[..., 1:, :][mask])
    assert torch.equal(every[2, :, 0], head[2, :, 0])
    assert not torch.allclose(every[0, 6:, 0], head[0, 6:, 0])


def test_the_gate_decides_and_the_best_match_opens_it():
    model, semantic, tokens, lengths = _case(seed=5)
    lookup = model.lookup
    with torch.no_grad():
        lookup.level1_copy_weight.zero_()
        lookup.level1_copy_match.zero_()
        lookup.level1_copy_bias.fill_(-1e4)               # shut: the head alone
        h, _ = model.hidden(semantic, tokens, lengths)
        shut = model(semantic, tokens, lengths, level=1)
        lookup.level1_copy_bias.fill_(1e4)                # open: the vote alone
        vote = model(semantic, tokens, lengths, level=1).exp()
        # Gate logit c * best + b: frames that match better copy more.
        lookup.level1_copy_match.fill_(4.0)
        lookup.level1_copy_bias.fill_(-4.0)
        weights, best = model.semantic_weights(semantic, tokens, lengths, level=1)
    torch.testing.assert_close(shut[0], torch.log_softmax(model.logits(h, 1)[0], -1))
    prompt_codes = set(tokens[0, :6, 0].tolist())
    assert {int(c) for c in (vote[0, 6:].sum(0) > 1e-30).nonzero()} <= prompt_codes
    gate = torch.sigmoid(lookup.gate_logit(h, 1, best))
    torch.testing.assert_close(gate, torch.sigmoid(4.0 * best - 4.0).to(gate.dtype))
    assert best[0, 6:].max() > best[0, 6:].min()


def test_config_checks_and_weights_round_trip(tmp_path):
    with pytest.raises(TypeError, match="semantic_copy must be a bool, got int 1"):
        copy_config(semantic_copy=1)
    with pytest.raises(ValueError, match="semantic_copy is part of the prompt lookup.*got 0"):
        copy_config(prompt_lookup=0)
    assert ModelConfig.preset("tiny").semantic_copy is False
    model = trained_like(make_model(copy_config(), seed=6))
    assert {k for k in model.state_dict() if k.startswith("lookup.")} >= set(SEMANTIC_COPY_KEYS)
    assert model.num_parameters == model.config.num_parameters()
    fresh = SoundStorm(copy_config()).lookup
    assert fresh.level1_copy_weight.abs().max() == 0 and float(fresh.level1_copy_match.detach()) == 0
    assert float(torch.sigmoid(fresh.level1_copy_bias.detach())) == pytest.approx(0.018, abs=1e-3)
    # A config written before the field: the lookup without level 1's copy.
    check_round_trip_and_older_config(
        model, make_model(copy_config(semantic_copy=False), seed=6), tmp_path, "semantic_copy",
        True, r"missing tensor 'lookup\.(semantic|level1)")


def test_the_copy_is_capture_safe_and_runs_on_the_meta_device():
    model, semantic, tokens, lengths = _case(seed=7)
    for level in (1, None, torch.tensor([1, 2, 1])):
        with torch.no_grad(), CaptureGuard("cpu", "the semantic copy's forward") as guard:
            model(semantic, tokens, lengths, level=level)
        assert guard.ops > 100
    with torch.device("meta"):
        meta = SoundStorm(copy_config())
    out = meta(semantic.to("meta"), tokens.to("meta"), lengths.to("meta"), level=1)
    assert out.shape == (3, tokens.shape[1], meta.config.codebook_size)


def _level1_task(cfg, batch, frames, generator):
    """Level 1 is a per-row random function of the semantic id: only the prompt (the first
    half, all levels known) shows it. Returns semantic, tokens as the model sees them, and
    the level-1 targets after the prompt."""
    C, V = cfg.codebook_size, cfg.semantic_vocab_size
    semantic = torch.randint(0, V, (batch, frames), generator=generator)   # one id a frame
    table = torch.randint(0, C, (batch, V), generator=generator)
    level1 = table.gather(1, semantic)
    level2 = torch.randint(0, C, (batch, frames), generator=generator)
    inputs = torch.stack([level1, level2], dim=2)
    inputs[:, frames // 2:] = C
    return semantic, inputs, level1[:, frames // 2:]


def _train_level1(cfg, steps, seed=0):
    model, semantic, _, target, pred = train_on_task(cfg, _level1_task, 1, steps, seed)
    shown = (semantic[:, None, :24] == semantic[:, 24:, None]).any(-1)
    return (pred == target)[shown].float().mean().item(), model


def test_the_copy_gives_level_one_codes_only_the_prompt_shows_and_learns_to_trust_it():
    base = dict(num_quantizers=2, codebook_size=16, semantic_vocab_size=8, depth=1,
                semantic_rate=50, prompt_lookup=8)
    with_copy, model = _train_level1(ModelConfig.preset("tiny", semantic_copy=True, **base), 25)
    without, _ = _train_level1(ModelConfig.preset("tiny", **base), 25)
    # The Conformer alone has to learn to carry a code from the prompt; the copy gives it.
    assert with_copy > 0.9, with_copy
    assert without < 0.5, without
    # Training opens the gate, the more so for frames that match better.
    lookup = model.lookup
    assert float(lookup.level1_copy_bias.detach()) > -4.0 + 0.02
    assert float(lookup.level1_copy_match.detach()) > 0.02


def test_the_flop_count_adds_level_ones_vote():
    from soundstorm.engine.flops import forward_flops
    on, off = copy_config(), copy_config(semantic_copy=False)
    B, T, Q, C = 2, 40, on.num_quantizers, on.codebook_size
    assert forward_flops(on, B, T, 1) == forward_flops(off, B, T, 1)
    assert forward_flops(on, B, T, Q) == forward_flops(off, B, T, Q) + 2 * B * T * T * C
