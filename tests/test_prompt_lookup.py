"""The prompt lookup (`ModelConfig.prompt_lookup`): every frame reads the finer codes of
the fully known frames that share its level-1 context. Checked against a loop over frame
pairs, for what it must ignore, through the config and the weight files, and for what it
is for: a model with it learns to copy a mapping that only the prompt shows."""

import math

import pytest
import torch

from conftest import (check_round_trip_and_older_config, make_model, random_codes,
                      random_semantic, train_on_task)
from soundstorm.engine import ModelConfig
from soundstorm.engine.capture import CaptureGuard
from soundstorm.engine.model import PromptLookup, SoundStorm


def lookup_config(**overrides):
    return ModelConfig.preset("tiny", **{"prompt_lookup": 8, **overrides})


def loop_lookup(lookup: PromptLookup, tokens, lengths):
    """The lookup written out frame pair by frame pair."""
    B, T, Q = tokens.shape
    C = lookup.codebook_size
    E = lookup.key_embed.weight.detach().double()
    V = lookup.value_embed.weight.detach().double()
    w = lookup.context.detach().double()
    s = math.exp(float(lookup.log_scale.detach()))
    g = float(lookup.gain.detach())
    out = torch.zeros(B, T, V.shape[1], dtype=torch.float64)
    for b in range(B):
        n = int(lengths[b])

        def key(i):
            k = w[1] * E[tokens[b, i, 0]]
            if i > 0:
                k = k + w[0] * E[tokens[b, i - 1, 0]]
            if i + 1 < n:
                k = k + w[2] * E[tokens[b, i + 1, 0]]
            return k / k.norm()

        refs = [j for j in range(n) if all(int(c) != C for c in tokens[b, j])]
        for i in range(n):
            others = [j for j in refs if j != i]
            if not others or int(tokens[b, i, 0]) == C:
                continue
            scores = torch.stack([s * key(i).dot(key(j)) for j in others])
            p = torch.softmax(scores, 0)
            for pj, j in zip(p, others):
                v = sum(V[(q - 1) * C + int(tokens[b, j, q])] for q in range(1, Q))
                out[b, i] += g * pj * v
    return out


def loop_copy(model, h, tokens, lengths, level: int, logits):
    """`PromptLookup.copy` of one level, written out frame by frame in float64."""
    lookup = model.lookup
    B, T, Q = tokens.shape
    C = lookup.codebook_size
    weights = lookup.weights(tokens.clone(), torch.arange(T)[None] < lengths[:, None]).double()
    out = logits.detach().double().clone()
    if level == 1:
        return out
    a = lookup.copy_weight.detach().double()[level - 2]
    b = float(lookup.copy_bias.detach()[level - 2])
    for i_b in range(B):
        for i in range(int(lengths[i_b])):
            if weights[i_b, i].sum() == 0:
                continue
            vote = torch.zeros(C, dtype=torch.float64)
            for j in range(T):
                if weights[i_b, i, j] > 0:
                    vote[int(tokens[i_b, j, level - 1])] += weights[i_b, i, j]
            g = torch.sigmoid(h[i_b, i].double() @ a + b)
            p = torch.softmax(out[i_b, i], 0)
            out[i_b, i] = torch.log((1 - g) * p + g * vote)
    return out


def trained_like(model):
    """Weights far from their init, so that every term of the lookup matters."""
    with torch.no_grad():
        for p in model.lookup.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def test_lookup_equals_the_loop_over_frame_pairs():
    cfg = lookup_config()
    torch.manual_seed(0)
    model = trained_like(SoundStorm(cfg).double())
    B, T = 3, 17
    tokens = random_codes(cfg, B, T, cfg.num_quantizers, seed=1)
    tokens[0, 9:, 2:] = cfg.mask_id           # a decoding state: prompt, then finer masked
    tokens[1, ::3, 1] = cfg.mask_id           # scattered masks: those frames are no reference
    tokens[2, :, 3] = cfg.mask_id             # no reference at all: the row reads nothing
    tokens[0, 13:, 0] = cfg.mask_id           # no level-1 code yet: those frames read nothing
    tokens[1, 12:] = 10 ** 6                  # padding holds anything
    lengths = torch.tensor([T, 12, T])
    mask = torch.arange(T)[None] < lengths[:, None]
    got = model.lookup(tokens, mask)
    want = loop_lookup(model.lookup, tokens, lengths)
    torch.testing.assert_close(got[mask], want[mask])
    assert got[2].abs().max() == 0 and got[0, 13:].abs().max() == 0
    assert got[0, :13].abs().amax(dim=1).min() > 0


def _copy_case():
    cfg = lookup_config()
    torch.manual_seed(10)
    model = trained_like(SoundStorm(cfg).double())
    B, T = 3, 15
    semantic = random_semantic(cfg, B, 8, seed=11)
    tokens = random_codes(cfg, B, T, cfg.num_quantizers, seed=12)
    tokens[0, 8:, 1:] = cfg.mask_id           # a decoding state: prompt, then finer masked
    tokens[0, 12:, 0] = cfg.mask_id           # no level-1 code yet: those frames keep the head
    tokens[1, 10:] = 10 ** 6                  # padding
    tokens[2, :, 2] = cfg.mask_id             # no reference: the row keeps the head
    lengths = torch.tensor([T, 10, T])
    # The final hidden states and the plain head, from the same forward with the lookup's
    # copy taken out of it.
    seen = {}

    def keep_the_head(logits, h, *rest):
        seen["h"] = h
        return logits

    model.lookup.copy = keep_the_head
    with torch.no_grad():
        plain = model(semantic, tokens, lengths, level=None)
    del model.lookup.copy
    return model, semantic, tokens, lengths, seen["h"], plain


def test_the_copy_mixes_each_finer_level_with_the_lookups_vote_as_a_loop_does():
    model, semantic, tokens, lengths, h, plain = _copy_case()
    Q = model.config.num_quantizers
    mask = torch.arange(tokens.shape[1])[None] < lengths[:, None]
    with torch.no_grad():
        every = model(semantic, tokens, lengths, level=None)
        for level in range(1, Q + 1):
            want = loop_copy(model, h, tokens, lengths, level, plain[:, :, level - 1])
            got = model(semantic, tokens, lengths, level=level)
            torch.testing.assert_close(got[mask], want[mask])
            torch.testing.assert_close(every[:, :, level - 1][mask], want[mask])
        # One level per row picks each row's own level.
        levels = torch.tensor([3, 1, 2])
        got = model(semantic, tokens, lengths, level=levels)
        for b, level in enumerate(levels.tolist()):
            want = loop_copy(model, h, tokens, lengths, level, plain[:, :, level - 1])[b]
            torch.testing.assert_close(got[b, :int(lengths[b])], want[:int(lengths[b])])
    # Level 1, frames that read nothing and rows without a reference keep the head's logits;
    # the frames that read get a distribution (log-probabilities that sum to 1).
    assert torch.equal(every[..., 0, :], plain[..., 0, :])
    assert torch.equal(every[0, 12:], plain[0, 12:]) and torch.equal(every[2], plain[2])
    torch.testing.assert_close(every[0, :12, 1:].exp().sum(-1),
                               torch.ones(12, Q - 1, dtype=torch.float64))
    assert not torch.allclose(every[0, :12, 1:], plain[0, :12, 1:])


def test_hidden_gives_the_states_and_weights_that_forward_uses():
    model, semantic, tokens, lengths, h, plain = _copy_case()
    mask = torch.arange(tokens.shape[1])[None] < lengths[:, None]
    with torch.no_grad():
        got_h, weights = model.hidden(semantic, tokens, lengths)
        assert torch.equal(got_h[mask], h[mask])
        assert torch.equal(weights, model.lookup.weights(tokens, mask))
        torch.testing.assert_close(model.logits(got_h, None)[mask], plain[mask])
        for level in range(2, model.config.num_quantizers + 1):
            a, b = model.lookup.copy_weight[level - 2], model.lookup.copy_bias[level - 2]
            torch.testing.assert_close(model.lookup.gate_logit(got_h, level), got_h @ a + b)
    without = SoundStorm(ModelConfig(**{**model.config.to_dict(), "prompt_lookup": 0})).double()
    with torch.no_grad():
        h0, none = without.hidden(semantic, tokens, lengths)
        torch.testing.assert_close(without.logits(h0, 2), without(semantic, tokens, lengths, 2))
    assert none is None


def test_the_copy_gate_decides_between_the_head_and_the_vote():
    model, semantic, tokens, lengths, h, plain = _copy_case()
    with torch.no_grad():
        model.lookup.copy_weight.zero_()
        model.lookup.copy_bias.fill_(-1e4)                # gate 0: the head alone
        off = model(semantic, tokens, lengths, level=2)
        model.lookup.copy_bias.fill_(1e4)                 # gate 1: the vote alone
        on = model(semantic, tokens, lengths, level=2)
        weights = model.lookup.weights(tokens, None)
    torch.testing.assert_close(off[0, :12], torch.log_softmax(plain[0, :12, 1], -1))
    # The vote alone puts all its mass on the prompt's level-2 codes, in proportion to the
    # weights of the frames that hold them.
    vote = on[0, :12].exp()
    prompt_codes = set(tokens[0, :8, 1].tolist())
    assert {int(c) for c in (vote.sum(0) > 1e-30).nonzero()} <= prompt_codes
    i = 10
    want = torch.zeros(model.config.codebook_size, dtype=torch.float64)
    want.index_add_(0, tokens[0, :8, 1], weights[0, i, :8])
    torch.testing.assert_close(vote[i], want)


def test_only_level_one_context_and_the_references_finer_codes_count():
    cfg = lookup_config()
    model = trained_like(make_model(cfg, seed=2))
    tokens = random_codes(cfg, 1, 20, cfg.num_quantizers, seed=3)
    tokens[0, 8:, 1:] = cfg.mask_id
    mask = torch.ones(1, 20, dtype=torch.bool)
    base = model.lookup(tokens, mask)
    # The codes of a non-reference frame at levels 2..Q are not read by anyone.
    other = tokens.clone()
    other[0, 15, 1] = (int(tokens[0, 15, 1]) + 1) % cfg.codebook_size
    other[0, 15, 2] = cfg.mask_id
    assert torch.equal(model.lookup(other, mask), base)
    # A reference's level-2 code changes what the others read, never what it reads itself.
    other = tokens.clone()
    other[0, 3, 1] = (int(tokens[0, 3, 1]) + 1) % cfg.codebook_size
    changed = (model.lookup(other, mask) - base).abs().amax(dim=2)[0] > 0
    assert not changed[3] and changed[[0, 1, 2, 4, 10, 19]].all()


def test_the_models_output_depends_on_the_prompt_only_through_it_when_off_it_is_absent():
    off = make_model(ModelConfig.preset("tiny"), seed=0)
    on = make_model(lookup_config(), seed=0)
    assert not any(k.startswith("lookup.") for k in off.state_dict())
    assert {k for k in on.state_dict() if k.startswith("lookup.")} == {
        "lookup.key_embed.weight", "lookup.context", "lookup.log_scale", "lookup.gain",
        "lookup.value_embed.weight", "lookup.copy_weight", "lookup.copy_bias"}
    # The gain starts at 0: an untrained lookup reads nothing into the input; its copy
    # gates start almost shut.
    tokens0 = random_codes(on.config, 1, 20, on.config.num_quantizers, seed=1)
    assert on.lookup(tokens0, None).abs().max() == 0
    fresh = SoundStorm(on.config).lookup
    assert fresh.copy_weight.abs().max() == 0
    assert torch.sigmoid(fresh.copy_bias).tolist() == pytest.approx([0.018] * 3, abs=1e-3)
    for m in (off, on):
        assert m.num_parameters == m.config.num_parameters()
    # With the lookup's values zeroed and its copy gates shut the model is the model without
    # it, up to the log-softmax the copy applies.
    with torch.no_grad():
        on.lookup.value_embed.weight.zero_()
        on.lookup.copy_bias.fill_(-1e4)
        for name, p in off.named_parameters():
            on.get_parameter(name).copy_(p)
    cfg = on.config
    semantic = random_semantic(cfg, 2, 10, seed=4)
    tokens = random_codes(cfg, 2, 20, cfg.num_quantizers, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(on(semantic, tokens, level=2).log_softmax(-1),
                                   off(semantic, tokens, level=2).log_softmax(-1))


def test_config_checks_prompt_lookup():
    with pytest.raises(TypeError, match="prompt_lookup must be an int"):
        lookup_config(prompt_lookup=True)
    with pytest.raises(TypeError, match="prompt_lookup must be an int"):
        lookup_config(prompt_lookup=8.0)
    with pytest.raises(ValueError, match=r"prompt_lookup must lie in 0\.\.4096.*got -1"):
        lookup_config(prompt_lookup=-1)
    with pytest.raises(ValueError, match="needs num_quantizers >= 2"):
        lookup_config(num_quantizers=1)
    assert ModelConfig.preset("tiny").prompt_lookup == 0
    assert ModelConfig.preset("tiny", num_quantizers=1).prompt_lookup == 0


def test_weights_round_trip_and_older_configs_load_without_the_field(tmp_path):
    model = trained_like(make_model(lookup_config(), seed=6))
    # A config written before the field existed: the model without the lookup; turning the
    # lookup on in a config whose weights lack it names the missing tensor.
    check_round_trip_and_older_config(model, make_model(ModelConfig.preset("tiny"), seed=6),
                                      tmp_path, "prompt_lookup", 8, r"missing tensor 'lookup\.")


def test_the_lookup_is_capture_safe_and_runs_on_the_meta_device():
    cfg = lookup_config()
    model = make_model(cfg, seed=7)
    semantic = random_semantic(cfg, 2, 10, seed=8)
    tokens = random_codes(cfg, 2, 20, cfg.num_quantizers, seed=9)
    lengths = torch.tensor([20, 11])
    with torch.no_grad(), CaptureGuard("cpu", "the lookup model's forward") as guard:
        model(semantic, tokens, lengths, level=3)
    assert guard.ops > 100
    with torch.device("meta"):
        meta = SoundStorm(cfg)
    out = meta(semantic.to("meta"), tokens.to("meta"), lengths.to("meta"), level=3)
    assert out.shape == (2, 20, cfg.codebook_size)


def _copy_task(cfg, batch, frames, generator):
    """Level 2 is a per-row random permutation of level 1: only the prompt (the first half,
    all levels known) shows it. Returns semantic, tokens as the model sees them, targets."""
    C = cfg.codebook_size
    level1 = torch.randint(0, C, (batch, frames), generator=generator)
    perms = torch.stack([torch.randperm(C, generator=generator) for _ in range(batch)])
    level2 = perms.gather(1, level1)
    tokens = torch.stack([level1, level2], dim=2)
    inputs = tokens.clone()
    inputs[:, frames // 2:, 1] = C
    semantic = torch.zeros(batch, frames // 2, dtype=torch.long)
    return semantic, inputs, level2[:, frames // 2:]


def _train_copy(cfg, steps=150, seed=0):
    _, _, inputs, target, pred = train_on_task(cfg, _copy_task, 2, steps, seed)
    # Only codes the prompt shows can be copied: score on those.
    shown = (inputs[:, None, :24, 0] == inputs[:, 24:, None, 0]).any(-1)
    return (pred == target)[shown].float().mean().item()


def test_a_model_with_the_lookup_learns_to_copy_what_only_the_prompt_shows():
    base = dict(num_quantizers=2, codebook_size=16, semantic_vocab_size=4, depth=1)
    with_lookup = _train_copy(ModelConfig.preset("tiny", prompt_lookup=16, **base))
    without = _train_copy(ModelConfig.preset("tiny", **base))
    assert with_lookup > 0.8, with_lookup
    assert without < 0.5, without


def test_the_flop_count_adds_the_lookups_three_products():
    from soundstorm.engine.flops import forward_flops
    off = ModelConfig.preset("tiny")
    on = lookup_config()
    B, T, Q, C = 3, 50, on.num_quantizers, on.codebook_size
    for heads, votes in ((1, 1), (Q, Q - 1)):
        extra = 2 * B * T * T * (on.prompt_lookup + on.dim + votes * C)
        assert forward_flops(on, B, T, heads) == forward_flops(off, B, T, heads) + extra
