"""The §3.2 training mask: exact structural rules on ragged batches, and its statistics."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from soundstorm.training.masking import IGNORE_INDEX, masked_loss, sample_mask

Q, C = 4, 32
MASK = C


def ragged_batch(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    tokens = torch.randint(0, C, (len(lengths), T, Q), generator=g)
    return tokens, torch.tensor(lengths)


def draw(lengths, n_draws, seed=0):
    """n_draws masks of the same ragged batch, each with fresh example keys."""
    tokens, lengths_t = ragged_batch(lengths)
    B = len(lengths)
    keys = torch.arange(n_draws * B, dtype=torch.int64).view(n_draws, B)
    out = [sample_mask(tokens, lengths_t, keys[i], seed, MASK) for i in range(n_draws)]
    return tokens, lengths_t, out


def test_structural_rules_hold_exactly_on_ragged_batches():
    lengths = [1, 2, 3, 7, 64, 13, 97]
    tokens, lengths_t, draws = draw(lengths, 80)
    T = max(lengths)
    t_idx = torch.arange(T)
    for m in draws:
        real = t_idx[None, :] < lengths_t[:, None]
        prompt = t_idx[None, :] < m.prompt_len[:, None]
        after = real & ~prompt
        is_mask = m.inputs == MASK
        # prompt and padding frames are never masked, at any level
        assert not (is_mask & ~after[..., None]).any()
        # unmasked tokens are the ground truth
        assert torch.equal(torch.where(is_mask, tokens, m.inputs), tokens)
        for b in range(len(lengths)):
            q = int(m.level[b])
            assert 1 <= q <= Q and 0 <= int(m.prompt_len[b]) < lengths[b]
            # levels < q untouched, levels > q masked at every frame after the prompt
            assert not is_mask[b, :, :q - 1].any()
            assert torch.equal(is_mask[b, :, q:], after[b, :, None].expand(-1, Q - q))
            # loss targets: exactly the masked level-q tokens, with their true values
            target = m.targets[b]
            assert torch.equal(target != IGNORE_INDEX, is_mask[b, :, q - 1])
            assert torch.equal(target[target != IGNORE_INDEX],
                               tokens[b, :, q - 1][target != IGNORE_INDEX])
            # never an empty loss
            assert (target != IGNORE_INDEX).sum() >= 1


def test_level_prompt_and_ratio_are_drawn_per_row():
    _, _, draws = draw([50] * 16, 1)
    m = draws[0]
    assert len(set(m.level.tolist())) > 1
    assert len(set(m.prompt_len.tolist())) > 1
    assert len(set(m.ratio.tolist())) == 16


def test_statistics_of_level_prompt_and_ratio():
    lengths = [1, 5, 40]
    n = 3000
    # one batch of n copies of the three rows, each copy with its own key
    tokens, lengths_t = ragged_batch(lengths * n)
    m = sample_mask(tokens, lengths_t, torch.arange(3 * n), 3, MASK)
    level = m.level.view(n, 3)                              # [N, B]
    prompt = m.prompt_len.view(n, 3)
    ratio = m.ratio.double().numpy()
    # q ~ U{1..Q}: chi-square on all rows
    counts = np.bincount(level.flatten().numpy(), minlength=Q + 1)[1:]
    assert stats.chisquare(counts).pvalue > 1e-3
    # t ~ U{0..T_b-1}, per row length
    assert (prompt[:, 0] == 0).all()
    for b, T_b in enumerate(lengths[1:], start=1):
        counts = np.bincount(prompt[:, b].numpy(), minlength=T_b)
        assert len(counts) == T_b
        assert stats.chisquare(counts).pvalue > 1e-3
    # p = cos(u), u ~ U[0, pi/2]: P(p <= x) = 1 - (2/pi) arccos(x)
    ks = stats.kstest(ratio, lambda x: 1 - 2 / np.pi * np.arccos(np.clip(x, 0, 1)))
    assert ks.pvalue > 1e-3, ks
    # and the test can tell: a uniform ratio is rejected
    assert stats.kstest(np.random.default_rng(0).random(ratio.size),
                        lambda x: 1 - 2 / np.pi * np.arccos(np.clip(x, 0, 1))).pvalue < 1e-6
    assert abs(ratio.mean() - 2 / math.pi) < 0.01          # E[cos U] = 2/pi


def test_each_frame_after_the_prompt_is_masked_with_probability_p():
    # long rows without prompt effects: the masked fraction of the eligible level-q frames
    # tracks each row's own p
    tokens, lengths, draws = draw([400] * 8, 40, seed=5)
    ratios, fractions = [], []
    for m in draws:
        for b in range(8):
            eligible = 400 - int(m.prompt_len[b])
            if eligible < 200:
                continue
            masked = int((m.targets[b] != IGNORE_INDEX).sum())
            if masked > 1:   # (the one-token fallback aside)
                ratios.append(float(m.ratio[b]))
                fractions.append(masked / eligible)
    ratios, fractions = np.array(ratios), np.array(fractions)
    assert len(ratios) > 50
    assert np.abs(fractions - ratios).max() < 0.15
    assert np.corrcoef(ratios, fractions)[0, 1] > 0.98


def test_a_row_masked_empty_by_the_draw_gets_one_token():
    tokens, lengths, draws = draw([30] * 64, 50, seed=7)
    fallback = 0
    for m in draws:
        counts = (m.targets != IGNORE_INDEX).sum(dim=1)
        assert (counts >= 1).all()
        fallback += int(((counts == 1) & (m.ratio < 0.02)).sum())
    assert fallback > 0  # the case did occur


def test_the_mask_depends_only_on_the_example_key_and_seed():
    tokens, lengths = ragged_batch([9, 20, 14])
    keys = torch.tensor([11, 12, 13])
    full = sample_mask(tokens, lengths, keys, 0, MASK)
    # the same example alone, with different padding, gets the same mask
    alone = sample_mask(tokens[1:2, :20], lengths[1:2], keys[1:2], 0, MASK)
    assert torch.equal(alone.inputs[0], full.inputs[1, :20])
    assert torch.equal(alone.level, full.level[1:2])
    other_seed = sample_mask(tokens, lengths, keys, 1, MASK)
    assert not torch.equal(other_seed.inputs, full.inputs)


def test_masked_loss_counts_only_masked_level_q_tokens():
    tokens, lengths = ragged_batch([5, 12])
    m = sample_mask(tokens, lengths, torch.tensor([1, 2]), 0, MASK)
    logits = torch.randn(2, 12, C)
    parts = masked_loss(logits, m)
    for b in range(2):
        sel = m.targets[b] != IGNORE_INDEX
        want = torch.nn.functional.cross_entropy(logits[b][sel], m.targets[b][sel], reduction="sum")
        assert torch.allclose(parts.loss_sum[b], want)
        assert parts.count[b] == sel.sum()
        assert parts.correct[b] == (logits[b][sel].argmax(-1) == m.targets[b][sel]).sum()
    assert torch.isfinite(parts.loss_sum).all()


def test_bad_lengths_are_rejected():
    tokens, _ = ragged_batch([4, 4])
    with pytest.raises(ValueError, match="lengths must lie in 1..4"):
        sample_mask(tokens, torch.tensor([0, 4]), torch.tensor([1, 2]), 0, MASK)
    with pytest.raises(ValueError, match="must be \\[B=2\\]"):
        sample_mask(tokens, torch.tensor([4]), torch.tensor([1, 2]), 0, MASK)


def test_level_weights_set_how_often_each_level_is_drawn():
    n = 3000
    tokens, lengths = ragged_batch([6] * n)
    keys = torch.arange(n)
    weights = (3, 2, 0, 1)
    m = sample_mask(tokens, lengths, keys, 3, MASK, level_weights=weights)
    counts = np.bincount(m.level.numpy(), minlength=Q + 1)[1:]
    assert counts[2] == 0                                   # a level of weight 0: never
    expected = n * np.array([3, 2, 1]) / 6
    assert stats.chisquare(counts[[0, 1, 3]], expected).pvalue > 1e-3
    # the test can tell: uniform draws are rejected against these weights
    uniform = sample_mask(tokens, lengths, keys, 3, MASK).level.numpy()
    assert stats.chisquare(np.bincount(uniform, minlength=Q + 1)[[1, 2, 4]],
                           n * 0.75 * np.array([3, 2, 1]) / 6).pvalue < 1e-6
    # the rest of the mask follows the level drawn, as with uniform levels
    for b in range(0, n, 97):
        q = int(m.level[b])
        assert torch.equal(m.targets[b] != IGNORE_INDEX, m.inputs[b, :, q - 1] == MASK)
        assert not (m.inputs[b, :, :q - 1] == MASK).any()
    # equal weights draw the same distribution as none, and a weight-only-on-the-last
    # level always draws it
    last = sample_mask(tokens, lengths, keys, 3, MASK, level_weights=(0, 0, 0, 5))
    assert (last.level == Q).all()
    first = sample_mask(tokens, lengths, keys, 3, MASK, level_weights=(1, 0, 0, 0))
    assert (first.level == 1).all()


@pytest.mark.parametrize("weights", [(1, 1, 1), (0, 0, 0, 0), (1, -1, 1, 1),
                                     (1, float("nan"), 1, 1), (True, 1, 1, 1), "1111"])
def test_bad_level_weights_are_named(weights):
    tokens, lengths = ragged_batch([4, 4])
    with pytest.raises(ValueError, match="level_weights must be 4 numbers >= 0"):
        sample_mask(tokens, lengths, torch.tensor([1, 2]), 0, MASK, level_weights=weights)


def test_level_weights_move_linearly_from_start_to_end_over_the_run():
    from soundstorm.training.masking import level_weights_at
    assert level_weights_at(5, 10, None, None, Q) is None                 # uniform throughout
    assert level_weights_at(5, 10, (3, 2, 1, 1), None, Q) == (3, 2, 1, 1)
    start, end = (3, 2, 1, 1), (2, 6, 1, 1)          # shares 3/7.. to 2/10..: mixed as shares
    np.testing.assert_allclose(level_weights_at(0, 11, start, end, Q), np.array(start) / 7)
    np.testing.assert_allclose(level_weights_at(10, 11, start, end, Q), np.array(end) / 10)
    np.testing.assert_allclose(level_weights_at(5, 11, start, end, Q),
                               (np.array(start) / 7 + np.array(end) / 10) / 2)
    # past the last step (a resumed run with fewer steps) the end weights hold
    np.testing.assert_allclose(level_weights_at(20, 11, start, end, Q), np.array(end) / 10)
    # no start: from uniform; a one-step run trains with the start weights
    np.testing.assert_allclose(level_weights_at(0, 5, None, (0, 1, 0, 0), Q), [0.25] * 4)
    np.testing.assert_allclose(level_weights_at(4, 5, None, (0, 1, 0, 0), Q), [0, 1, 0, 0])
    np.testing.assert_allclose(level_weights_at(0, 1, (1, 0, 0, 0), (0, 1, 0, 0), Q),
                               [1, 0, 0, 0])
    # the draws follow the mixed shares: halfway from level 1 only to level 4 only
    n = 2000
    tokens, lengths = ragged_batch([6] * n)
    mid = level_weights_at(2, 5, (1, 0, 0, 0), (0, 0, 0, 1), Q)
    levels = sample_mask(tokens, lengths, torch.arange(n), 3, MASK, level_weights=mid).level
    counts = np.bincount(levels.numpy(), minlength=Q + 1)[1:]
    assert counts[1] == counts[2] == 0
    assert stats.chisquare(counts[[0, 3]], [n / 2, n / 2]).pvalue > 1e-3
    with pytest.raises(ValueError, match="level_weights_end must be 4 numbers >= 0"):
        level_weights_at(0, 5, None, (1, 1), Q)
    with pytest.raises(ValueError, match="^level_weights must be 4 numbers >= 0"):
        level_weights_at(0, 5, (1, 1), (1, 1, 1, 1), Q)


def test_finer_full_mask_masks_a_share_of_finer_level_rows_completely():
    n = 4000
    tokens, lengths = ragged_batch([40] * n)
    keys = torch.arange(n)
    paper = sample_mask(tokens, lengths, keys, 5, MASK)
    m = sample_mask(tokens, lengths, keys, 5, MASK, finer_full_mask=0.5)
    # the level, prompt and every level-1 row are the paper's draw
    assert torch.equal(m.level, paper.level) and torch.equal(m.prompt_len, paper.prompt_len)
    one = m.level == 1
    assert torch.equal(m.inputs[one], paper.inputs[one])
    assert torch.equal(m.ratio[one], paper.ratio[one])
    # a finer row either keeps its paper mask or masks all of its level after the prompt
    after = torch.arange(40)[None, :] >= m.prompt_len[:, None]
    q_masked = (m.inputs == MASK).gather(2, (m.level - 1)[:, None, None].expand(n, 40, 1))[..., 0]
    full = (m.ratio == 1.0) & ~one
    assert torch.equal(q_masked[full], after[full])
    assert torch.equal(m.inputs[~one & ~full], paper.inputs[~one & ~full])
    assert torch.equal(m.targets != IGNORE_INDEX, q_masked)
    # about half of the finer rows, independently of the level
    for q in (2, 3, 4):
        rows = m.level == q
        assert stats.binomtest(int(full[rows].sum()), int(rows.sum()), 0.5).pvalue > 1e-3
    # every finer row at 1, none at 0
    assert (sample_mask(tokens, lengths, keys, 5, MASK, finer_full_mask=1.0).ratio[~one] == 1).all()
    assert torch.equal(sample_mask(tokens, lengths, keys, 5, MASK, finer_full_mask=0.0).inputs,
                       paper.inputs)


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), True, "0.5"])
def test_bad_finer_full_mask_is_named(value):
    tokens, lengths = ragged_batch([4, 4])
    with pytest.raises(ValueError, match="finer_full_mask must be a number in"):
        sample_mask(tokens, lengths, torch.tensor([1, 2]), 0, MASK, finer_full_mask=value)
