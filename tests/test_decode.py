"""The decoding invariants of DESIGN.md, checked at every iteration through `on_step`."""

import math

import pytest
import torch

from soundstorm.engine import DecodeConfig, Engine
from soundstorm.engine.decode import masked_after

from conftest import make_model, random_codes, random_semantic


def test_masked_after_is_the_float64_cosine_schedule():
    assert masked_after(100, 0, 16) == 100
    assert masked_after(100, 16, 16) == 0
    assert masked_after(100, 8, 16) == math.floor(100 * math.cos(math.pi / 4)) == 70
    assert [masked_after(10, i, 4) for i in range(5)] == [10, 9, 7, 3, 0]
    assert masked_after(7, 1, 1) == 0
    for n in (0, 1, 2, 5, 499):
        seq = [masked_after(n, i, 16) for i in range(17)]
        assert seq == sorted(seq, reverse=True) and seq[0] == n and seq[-1] == 0


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, level, iteration, tokens):
        self.calls.append((level, iteration, tokens.clone()))


def check_invariants(engine, semantic, sem_len, prompt, prompt_len, decode, seed=0):
    cfg = engine.config
    rec = Recorder()
    out = engine.generate(semantic, semantic_lengths=sem_len, prompt=prompt,
                          prompt_lengths=prompt_len, decode=decode, seed=seed, on_step=rec)
    B, S = semantic.shape
    T, Q, MASK = cfg.frames_for(S), cfg.num_quantizers, cfg.mask_id
    sem_len = sem_len.tolist() if sem_len is not None else [S] * B
    frames = [cfg.frames_for(s) for s in sem_len]
    P = 0 if prompt is None else prompt.shape[1]
    plen = prompt_len.tolist() if prompt_len is not None else [P] * B
    steps = decode.resolve(Q)

    # invariant 6 / order: every (level, iteration) exactly once, coarse to fine
    assert [(l, i) for l, i, _ in rec.calls] == [(q, i) for q in range(1, Q + 1)
                                                  for i in range(1, steps[q - 1] + 1)]
    assert out.shape == (B, T, Q) and out.dtype == torch.int64
    assert torch.equal(out, rec.calls[-1][2])

    previous = None
    for level, it, tok in rec.calls:
        s = steps[level - 1]
        for b in range(B):
            n, t_b, p = frames[b], frames[b], plen[b]
            row = tok[b]
            assert (row[t_b:] == -1).all(), "padding frames must read -1"          # inv. 1
            if p:
                assert torch.equal(row[:p], prompt[b, :p]), "prompt frames changed"  # inv. 1
            gen = row[p:t_b]
            assert ((gen >= 0) & (gen <= MASK)).all()
            assert (gen[:, : level - 1] != MASK).all(), "coarser level incomplete"  # inv. 2
            assert (gen[:, level:] == MASK).all(), "finer level not MASK"         # inv. 2
            remaining = int((gen[:, level - 1] == MASK).sum())
            assert remaining == masked_after(t_b - p, it, s), (level, it, b)       # inv. 3
        if previous is not None:
            written = previous != MASK
            assert torch.equal(tok[written], previous[written]), "a token was re-masked"  # 5
        previous = tok
    assert not (out == MASK).any()
    return out, rec


@pytest.mark.parametrize("with_prompt", [False, True])
@pytest.mark.parametrize("steps", [None, (5, 3, 2, 1), (1, 1, 1, 1), (7, 1, 4, 2)])
def test_invariants_hold_at_every_iteration_on_ragged_batches(engine64, tiny_config, with_prompt, steps):
    cfg = tiny_config
    semantic = random_semantic(cfg, 4, 21, seed=11)
    sem_len = torch.tensor([21, 3, 14, 1])       # -> 42, 6, 28, 2 frames
    prompt = prompt_len = None
    if with_prompt:
        prompt = random_codes(cfg, 4, 9, cfg.num_quantizers, seed=12)
        prompt_len = torch.tensor([9, 6, 0, 1])  # row 1: nothing left to generate
    check_invariants(engine64, semantic, sem_len, prompt, prompt_len,
                     DecodeConfig(steps_per_level=steps))


def test_default_schedule_makes_16_plus_q_minus_1_passes(engine64, tiny_config):
    _, rec = check_invariants(engine64, random_semantic(tiny_config, 1, 40), None, None, None,
                              DecodeConfig())
    assert len(rec.calls) == 16 + tiny_config.num_quantizers - 1


def test_greedy_iterations_take_the_argmax(engine64, tiny_config):
    """The last iteration of every level writes argmax(logits) given the state before it."""
    cfg = tiny_config
    semantic = random_semantic(cfg, 2, 10, seed=3)
    prompt = random_codes(cfg, 2, 4, cfg.num_quantizers, seed=4)
    decode = DecodeConfig(steps_per_level=(4, 2, 1, 1))
    _, rec = check_invariants(engine64, semantic, None, prompt, None, decode)
    states = [None] + [t for _, _, t in rec.calls]
    for k, (level, it, tok) in enumerate(rec.calls):
        if it != decode.steps_per_level[level - 1] or k == 0:
            continue
        before = states[k]
        with torch.no_grad():
            logits = engine64.model(semantic, before, level=level)
        new = before[..., level - 1] == cfg.mask_id
        assert new.any()
        assert torch.equal(tok[..., level - 1][new], logits.argmax(-1)[new])


def test_a_row_alone_equals_the_row_in_a_ragged_batch(engine64, tiny_config):
    cfg = tiny_config
    semantic = random_semantic(cfg, 3, 30, seed=21)
    sem_len = torch.tensor([17, 30, 9])
    prompt = random_codes(cfg, 3, 12, cfg.num_quantizers, seed=22)
    prompt_len = torch.tensor([5, 12, 0])
    batch = engine64.generate(semantic, sem_len, prompt, prompt_len, seed=1234)
    for b in range(3):
        s, p = int(sem_len[b]), int(prompt_len[b])
        alone = engine64.generate(semantic[b:b + 1, :s],
                                  prompt=prompt[b:b + 1, :p] if p else None, seed=1234)
        t = alone.shape[1]
        assert torch.equal(batch[b, :t], alone[0]), f"row {b} depends on its batch"
        assert (batch[b, t:] == -1).all()


def test_per_row_seeds(engine64, tiny_config):
    semantic = random_semantic(tiny_config, 1, 20, seed=5).expand(3, -1)
    out = engine64.generate(semantic, seed=[7, 8, 7])
    assert torch.equal(out[0], out[2]) and not torch.equal(out[0], out[1])
    single = engine64.generate(semantic[:1], seed=8)
    assert torch.equal(single[0], out[1])


def test_same_seed_same_output_different_seed_different_output(engine64, tiny_config):
    semantic = random_semantic(tiny_config, 2, 25, seed=6)
    a = engine64.generate(semantic, seed=42)
    assert torch.equal(a, engine64.generate(semantic, seed=42))
    assert not torch.equal(a, engine64.generate(semantic, seed=43))
    assert not torch.equal(engine64.generate(semantic), engine64.generate(semantic))


def test_greedy_everywhere_ignores_the_seed(engine64, tiny_config):
    semantic = random_semantic(tiny_config, 1, 25, seed=6)
    d = DecodeConfig(steps_per_level=(1, 1, 1, 1))
    assert torch.equal(engine64.generate(semantic, decode=d, seed=1),
                       engine64.generate(semantic, decode=d, seed=2))
    d0 = DecodeConfig(temperature=0.0, gumbel_scale=0.0)
    assert torch.equal(engine64.generate(semantic, decode=d0, seed=1),
                       engine64.generate(semantic, decode=d0, seed=2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_dtypes_decode(tiny_config, dtype):
    engine = Engine(make_model(tiny_config, seed=1, sharpen=20.0), dtype=dtype)
    assert engine.model.head_weight.dtype == dtype
    out = engine.generate(random_semantic(tiny_config, 2, 12), seed=0)
    assert out.shape == (2, 24, tiny_config.num_quantizers)
    assert ((out >= 0) & (out < tiny_config.codebook_size)).all()


def test_float32_and_float64_agree_on_a_greedy_decode(tiny_config):
    model = make_model(tiny_config, seed=2, sharpen=20.0)
    import copy
    e32 = Engine(copy.deepcopy(model), dtype=torch.float32)
    e64 = Engine(copy.deepcopy(model), dtype=torch.float64)
    semantic = random_semantic(tiny_config, 2, 16, seed=9)
    d = DecodeConfig(steps_per_level=(1, 1, 1, 1))
    agree = (e32.generate(semantic, decode=d) == e64.generate(semantic, decode=d)).float().mean()
    assert agree > 0.95
