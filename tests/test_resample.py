"""The counter-based generator and the masked resampling op (PyTorch reference)."""

import math

import pytest
import torch

from soundstorm.kernels import rng
from soundstorm.kernels.resample import masked_resample_reference


def mix32_python(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_mix32_is_exact_uint32_arithmetic():
    values = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 123456789, 0xDEADBEEF]
    values += torch.randint(0, 2 ** 32, (200,), dtype=torch.int64).tolist()
    got = rng.mix32(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [mix32_python(v) for v in values]


def test_keys_depend_on_every_coordinate_and_nothing_else():
    seeds = torch.tensor([0, 1, 2 ** 40 + 1, 2 ** 63 - 1])
    base = rng.step_keys(seeds, 1, 1, rng.STREAM_CANDIDATE)
    assert torch.equal(base, rng.step_keys(seeds, 1, 1, rng.STREAM_CANDIDATE))
    assert len(set(base.tolist())) == 4
    for other in (rng.step_keys(seeds, 2, 1, rng.STREAM_CANDIDATE),
                  rng.step_keys(seeds, 1, 2, rng.STREAM_CANDIDATE),
                  rng.step_keys(seeds, 1, 1, rng.STREAM_CONFIDENCE)):
        assert (other != base).all()
    assert ((base >= 0) & (base < 2 ** 32)).all()
    # a row's keys do not depend on which rows stand beside it
    assert torch.equal(rng.step_keys(seeds[2:3], 1, 1, 1), base[2:3])
    f = rng.frame_keys(base, 50)
    assert torch.equal(rng.frame_keys(base[1:2], 30), f[1:2, :30])


def test_uniform_and_gumbel_statistics():
    keys = rng.code_keys(rng.frame_keys(rng.step_keys(torch.tensor([5]), 1, 1, 1), 400), 500)
    u = rng.to_uniform(keys).flatten().double()
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 3e-3 and abs(u.var() - 1 / 12) < 2e-3
    hist = torch.histc(u, bins=20, min=0, max=1)
    assert (hist - u.numel() / 20).abs().max() < 5 * math.sqrt(u.numel() / 20)
    g = rng.to_gumbel(keys).double()
    assert torch.isfinite(g).all()
    assert abs(g.mean() - 0.5772156649) < 0.01 and abs(g.var() - math.pi ** 2 / 6) < 0.03


def random_case(B=3, T=37, C=11, seed=0, p_eligible=0.6):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, C, generator=g) * 3
    eligible = torch.rand(B, T, generator=g) < p_eligible
    tokens = torch.randint(0, C, (B, T), generator=g).masked_fill(eligible, C)
    return logits, tokens, eligible


def confidence(logits, candidate, seeds, level, it, noise_scale):
    lp = logits.double().log_softmax(-1).gather(-1, candidate[..., None])[..., 0]
    keys = rng.frame_keys(rng.step_keys(seeds, level, it, rng.STREAM_CONFIDENCE), logits.shape[1])
    return lp + noise_scale * rng.to_gumbel(keys).double()


@pytest.mark.parametrize("sample", [True, False])
@pytest.mark.parametrize("noise_scale", [0.0, 0.7])
def test_keeps_exactly_k_of_the_most_confident(sample, noise_scale):
    logits, tokens, eligible = random_case(seed=1)
    seeds = torch.tensor([3, 4, 5])
    counts = eligible.sum(1)
    num_keep = torch.stack([counts[0], counts[1] // 2, torch.tensor(0)])
    out = masked_resample_reference(logits, tokens, eligible, num_keep, seeds, 2, 3,
                                    temperature=0.8, noise_scale=noise_scale, sample=sample)
    C = logits.shape[-1]
    assert torch.equal(out[~eligible], tokens[~eligible]), "non-eligible positions changed"
    written = eligible & (out != C)
    assert written.sum(1).tolist() == num_keep.tolist()
    # the written ids are the candidates the op drew (same noise as a full keep)
    full = masked_resample_reference(logits, tokens, eligible, None, seeds, 2, 3, 0.8,
                                     noise_scale, sample)
    assert torch.equal(out[written], full[written])
    if not sample:
        assert torch.equal(full[eligible], logits.argmax(-1)[eligible])
    conf = confidence(logits, full.clamp(max=C - 1), seeds, 2, 3, noise_scale)
    for b in range(3):
        kept, left = conf[b][written[b]], conf[b][eligible[b] & ~written[b]]
        if len(kept) and len(left):
            assert kept.min() >= left.max() - 1e-5


def test_keep_all_writes_every_eligible_position():
    logits, tokens, eligible = random_case(seed=2)
    out = masked_resample_reference(logits, tokens, eligible, None, torch.tensor([1, 2, 3]),
                                    1, 1, 1.0, 0.0, sample=True)
    assert (out[eligible] < logits.shape[-1]).all()
    assert torch.equal(out[~eligible], tokens[~eligible])


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_candidates_follow_softmax_over_temperature(temperature):
    C, T = 6, 6000
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    logits = base.expand(1, T, C).clone()
    eligible = torch.ones(1, T, dtype=torch.bool)
    tokens = torch.full((1, T), C)
    out = masked_resample_reference(logits, tokens, eligible, None, torch.tensor([99]), 1, 1,
                                    temperature, 0.0, sample=True)
    freq = torch.bincount(out[0], minlength=C).double()
    expected = torch.softmax(base.double() / temperature, -1) * T
    chi2 = ((freq - expected) ** 2 / expected).sum()
    assert chi2 < 25.7, (freq, expected)   # chi-square, 5 dof, p = 1e-4


def test_rows_are_independent_of_companions():
    logits, tokens, eligible = random_case(B=4, seed=3)
    seeds = torch.tensor([10, 11, 12, 13])
    num_keep = eligible.sum(1) // 3
    out = masked_resample_reference(logits, tokens, eligible, num_keep, seeds, 1, 5, 1.0, 0.9, True)
    for b in range(4):
        alone = masked_resample_reference(logits[b:b + 1], tokens[b:b + 1], eligible[b:b + 1],
                                          num_keep[b:b + 1], seeds[b:b + 1], 1, 5, 1.0, 0.9, True)
        assert torch.equal(alone, out[b:b + 1])


def test_per_row_parameters_equal_one_call_per_row():
    """Rows at different levels, iterations, temperatures and modes in one call decode as
    if each were alone with its own scalar settings."""
    B = 5
    logits, tokens, eligible = random_case(B=B, T=29, C=9, seed=7)
    seeds = torch.tensor([1, 2, 3, 4, 5])
    level = torch.tensor([1, 1, 2, 3, 1])
    iteration = torch.tensor([1, 4, 1, 1, 16])
    temperature = torch.tensor([1.0, 0.7, 0.0, 1.3, 1.0])
    noise = torch.tensor([0.9, 0.3, 0.0, 0.0, 0.5])
    sample = torch.tensor([True, True, False, True, False])
    num_keep = torch.tensor([3, 0, 100, 2, 5])      # 100 >= eligible count: keep all
    out = masked_resample_reference(logits, tokens, eligible, num_keep, seeds, level, iteration,
                                    temperature, noise, sample)
    for b in range(B):
        alone = masked_resample_reference(
            logits[b:b + 1], tokens[b:b + 1], eligible[b:b + 1], num_keep[b:b + 1],
            seeds[b:b + 1], int(level[b]), int(iteration[b]), float(temperature[b]),
            float(noise[b]), bool(sample[b]))
        assert torch.equal(out[b:b + 1], alone), b
    assert torch.equal(out[2][eligible[2]], logits[2].argmax(-1)[eligible[2]])


def test_non_finite_logits_have_one_defined_outcome():
    """NaN reads as -inf and +inf as the largest float32; a frame with no finite logit
    takes code 0 with confidence -inf: below every finite confidence, above non-eligible
    frames, so exactly k are kept."""
    inf, nan = float("inf"), float("nan")
    C = 4
    logits = torch.tensor([[
        [nan, 1.0, 2.0, nan],          # NaN never wins: code 2
        [0.0, inf, nan, inf],          # +inf ties with +inf: the first, code 1
        [-inf, -inf, -inf, -inf],      # no finite logit
        [nan, nan, nan, nan],          # no finite logit
        [0.5, 0.1, -inf, 0.2],         # not eligible
        [nan, -inf, nan, -inf],        # no finite logit
    ]])
    eligible = torch.tensor([[True, True, True, True, False, True]])
    tokens = torch.where(eligible, C, 3)
    seeds = torch.tensor([9])
    for noise in (0.0, 0.7):
        full = masked_resample_reference(logits, tokens, eligible, None, seeds, 1, 1, 1.0,
                                         noise, sample=False)
        assert full.tolist() == [[2, 1, 0, 0, 3, 0]]
        for k in range(0, 6):
            out = masked_resample_reference(logits, tokens, eligible, torch.tensor([k]),
                                            seeds, 1, 1, 1.0, noise, sample=False)
            kept = (out != C) & eligible
            assert kept.sum().item() == min(k, 5), (k, out)
            if k >= 2:   # the two finite frames, then those without a finite logit in order
                assert kept[0, [0, 1, 2, 3, 5][:k]].all(), (k, out)
    # sampling: a NaN or -inf logit is never drawn while a finite one exists
    out = masked_resample_reference(logits.expand(50, -1, -1), tokens.expand(50, -1),
                                    eligible.expand(50, -1), None, torch.arange(50), 1, 1,
                                    2.0, 0.0, sample=True)
    assert set(out[:, 0].tolist()) <= {1, 2}
    assert set(out[:, 1].tolist()) == {1}    # +inf / 2 overflows back to +inf: first tie
    assert (out[:, [2, 3, 5]] == 0).all()
