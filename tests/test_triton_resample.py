"""The Triton resampling kernels: the counter-based noise bit for bit, exactly k kept per
row, nothing written outside the eligible positions, and token-for-token agreement with
the reference."""

import _triton_setup  # noqa: F401  (must come first: picks interpreter or GPU)
from _triton_setup import DEVICE, DTYPES

import pytest
import torch
import triton
import triton.language as tl

from soundstorm.kernels import rng as rng_ref
from soundstorm.kernels.resample import masked_resample_reference
from soundstorm.kernels.triton import masked_resample
from soundstorm.kernels.triton import rng
from soundstorm.kernels.triton.resample import masked_resample_rows


@triton.jit
def _noise_probe(seeds_ptr, hash_ptr, gumbel_ptr, level, iteration, T, C: tl.constexpr,
                 STREAM: tl.constexpr, BLOCK_T: tl.constexpr):
    b = tl.program_id(0)
    t = tl.arange(0, BLOCK_T)
    c = tl.arange(0, C)
    tag = rng.step_tag(level, iteration, STREAM)
    fkey = rng.mix32(rng.step_key(tl.load(seeds_ptr + b), tag) ^ rng.spread(t))
    h = rng.mix32(fkey[:, None] ^ rng.spread(c)[None, :])
    where = b * T * C + t[:, None] * C + c[None, :]
    ok = (t < T)[:, None]
    tl.store(hash_ptr + where, h.to(tl.int64), mask=ok)
    tl.store(gumbel_ptr + where, rng.to_gumbel(h), mask=ok)


def test_device_generator_is_bit_identical_to_the_reference():
    seeds = torch.tensor([0, 1, 2 ** 32 + 7, 2 ** 63 - 1], device=DEVICE)
    T, C, level, it = 21, 16, 3, 5
    hashes = torch.empty(4, T, C, dtype=torch.int64, device=DEVICE)
    gumbel = torch.empty(4, T, C, dtype=torch.float32, device=DEVICE)
    _noise_probe[(4,)](seeds, hashes, gumbel, level, it, T, C=C,
                       STREAM=rng_ref.STREAM_CANDIDATE, BLOCK_T=32)
    keys = rng_ref.code_keys(rng_ref.frame_keys(
        rng_ref.step_keys(seeds.cpu(), level, it, rng_ref.STREAM_CANDIDATE), T), C)
    assert torch.equal(hashes.cpu(), keys)
    # The uniform is exact; -log(-log(u)) may differ in the last bit between libms.
    torch.testing.assert_close(gumbel.cpu(), rng_ref.to_gumbel(keys), atol=2.5e-7, rtol=2.5e-7)


def random_case(B, T, C, seed, p_eligible=0.6, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, C, generator=g) * 3).to(dtype)
    eligible = torch.rand(B, T, generator=g) < p_eligible
    tokens = torch.randint(0, C, (B, T), generator=g).masked_fill(eligible, C)
    return logits.to(DEVICE), tokens.to(DEVICE), eligible.to(DEVICE)


CASES = [(1, 1, 7), (3, 37, 11), (2, 131, 50), (1, 64, 1000)]


@pytest.mark.parametrize("B,T,C", CASES)
@pytest.mark.parametrize("sample,noise_scale", [(False, 0.0), (False, 0.6), (True, 0.0),
                                                (True, 0.9)])
def test_matches_reference_token_for_token(B, T, C, sample, noise_scale):
    logits, tokens, eligible = random_case(B, T, C, seed=B * T + C)
    seeds = torch.arange(B, device=DEVICE) * 1_000_003 + 17
    counts = eligible.sum(1)
    for num_keep in (None, counts // 2, counts):
        args = (logits, tokens, eligible, num_keep, seeds, 2, 3, 0.7, noise_scale, sample)
        out = masked_resample(*args)
        assert torch.equal(out, masked_resample_reference(*args)), (num_keep, sample)


@pytest.mark.parametrize("dtype", DTYPES)
def test_low_precision_logits(dtype):
    logits, tokens, eligible = random_case(2, 29, 13, seed=4, dtype=dtype)
    seeds = torch.tensor([5, 6], device=DEVICE)
    args = (logits, tokens, eligible, eligible.sum(1) // 3, seeds, 1, 2, 1.0, 0.5, True)
    # The reference upcasts the logits to float32 first, exactly as the kernel does.
    assert torch.equal(masked_resample(*args), masked_resample_reference(*args))


@pytest.mark.parametrize("B,T,C", CASES)
def test_keeps_exactly_k_and_never_touches_other_positions(B, T, C):
    logits, tokens, eligible = random_case(B, T, C, seed=7 + T)
    # prompt frames at the start of each row and padding at the end are not eligible
    eligible[:, : T // 5] = False
    eligible[-1, T - T // 4:] = False
    tokens = torch.where(eligible, C, tokens)
    seeds = torch.arange(B, device=DEVICE) + 99
    counts = eligible.sum(1)
    for fraction in (0.0, 0.3, 1.0):
        num_keep = (counts.double() * fraction).floor().long()
        out = masked_resample(logits, tokens, eligible, num_keep, seeds, 1, 4, 1.0, 0.8, True)
        assert torch.equal(out[~eligible], tokens[~eligible])
        written = eligible & (out != C)
        assert written.sum(1).tolist() == num_keep.tolist()
        assert ((out[written] >= 0) & (out[written] < C)).all()


def test_ties_go_to_the_earlier_frame_as_in_the_reference():
    """Every frame has the same logits, so every confidence ties: both implementations
    keep the first k eligible frames."""
    B, T, C = 2, 45, 9
    logits = torch.randn(C).expand(B, T, C).contiguous().to(DEVICE)
    eligible = (torch.arange(T) % 3 != 0).expand(B, T).contiguous().to(DEVICE)
    tokens = torch.where(eligible, C, 0)
    num_keep = torch.tensor([5, 17], device=DEVICE)
    seeds = torch.tensor([1, 2], device=DEVICE)
    args = (logits, tokens, eligible, num_keep, seeds, 1, 1, 1.0, 0.0, False)
    out = masked_resample(*args)
    assert torch.equal(out, masked_resample_reference(*args))
    first = eligible.cumsum(1) <= num_keep[:, None]
    assert torch.equal(out != C, (first & eligible) | ~eligible)


def test_seeds_are_read_from_the_device_tensor():
    logits, tokens, eligible = random_case(1, 40, 20, seed=3)
    seeds = torch.tensor([11], device=DEVICE)
    k = eligible.sum(1) // 2
    a = masked_resample(logits, tokens, eligible, k, seeds, 1, 1, 1.0, 1.0, True)
    seeds.fill_(12)     # the same tensor, new contents (as a CUDA graph replay sees it)
    b = masked_resample(logits, tokens, eligible, k, seeds, 1, 1, 1.0, 1.0, True)
    assert not torch.equal(a, b)
    assert torch.equal(b, masked_resample_reference(logits, tokens, eligible, k,
                                                    torch.tensor([12], device=DEVICE),
                                                    1, 1, 1.0, 1.0, True))


def test_bad_arguments_raise_clear_errors():
    logits, tokens, eligible = random_case(2, 5, 4, seed=0)
    seeds = torch.tensor([1, 2], device=DEVICE)
    with pytest.raises(ValueError, match=r"tokens must be int64 \[B, T\] = \[2, 5\]"):
        masked_resample(logits, tokens[:, :4], eligible, None, seeds, 1, 1, 1.0, 0.0, True)
    with pytest.raises(ValueError, match="temperature must be > 0 when sampling"):
        masked_resample(logits, tokens, eligible, None, seeds, 1, 1, 0.0, 0.0, True)
    with pytest.raises(ValueError, match=r"seeds must be int64 \[B\] = \[2\]"):
        masked_resample(logits, tokens, eligible, None, seeds[:1], 1, 1, 1.0, 0.0, True)


def test_per_row_parameters_match_the_reference():
    """Rows at different levels, iterations, temperatures and modes in one call (as the
    scheduler packs them) give the reference's tokens."""
    logits, tokens, eligible = random_case(5, 29, 9, seed=11)
    rows = dict(
        seeds=torch.tensor([1, 2, 3, 4, 5]), level=torch.tensor([1, 1, 2, 3, 1]),
        iteration=torch.tensor([1, 4, 1, 1, 16]),
        temperature=torch.tensor([1.0, 0.7, 0.0, 1.3, 1.0]),
        noise=torch.tensor([0.9, 0.3, 0.0, 0.0, 0.5]),
        sample=torch.tensor([True, True, False, True, False]))
    rows = {k: v.to(DEVICE) for k, v in rows.items()}
    for num_keep in (torch.tensor([3, 0, 100, 2, 5], device=DEVICE), None):
        args = (logits, tokens, eligible, num_keep, rows["seeds"], rows["level"],
                rows["iteration"], rows["temperature"], rows["noise"], rows["sample"])
        assert torch.equal(masked_resample(*args), masked_resample_reference(*args))


def non_finite_case(B=3, T=24, C=13, seed=21, dtype=torch.float32):
    """Logits with NaN, +inf and -inf entries, and whole frames of -inf, of NaN, and of
    -inf mixed with NaN, some of them eligible."""
    logits, tokens, eligible = random_case(B, T, C, seed=seed, p_eligible=0.7)
    logits = logits.float().cpu()
    g = torch.Generator().manual_seed(seed + 1)
    pick = torch.rand(B, T, C, generator=g)
    logits[pick < 0.08] = float("nan")
    logits[(pick >= 0.08) & (pick < 0.12)] = float("inf")
    logits[(pick >= 0.12) & (pick < 0.25)] = float("-inf")
    logits[0, 3] = float("-inf")
    logits[0, 4] = float("nan")
    logits[1, 5] = float("-inf")
    logits[1, 5, ::2] = float("nan")
    logits[2, 0] = float("inf")             # every code tied at the largest float32
    logits[2, 7] = float("-inf")
    eligible = eligible.cpu()
    eligible[0, 3:5] = True
    eligible[1, 5] = True
    eligible[2, [0, 7]] = True
    eligible[2, 8] = False
    logits[2, 8] = float("-inf")            # a non-eligible frame with no finite logit
    tokens = torch.where(eligible, C, tokens.cpu())
    return logits.to(dtype).to(DEVICE), tokens.to(DEVICE), eligible.to(DEVICE)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # +inf / 0.7
@pytest.mark.parametrize("sample,noise_scale", [(False, 0.0), (False, 0.6), (True, 0.0),
                                                (True, 0.9)])
def test_non_finite_logits_match_the_reference(sample, noise_scale):
    logits, tokens, eligible = non_finite_case()
    C = logits.shape[-1]
    seeds = torch.tensor([3, 4, 5], device=DEVICE)
    counts = eligible.sum(1)
    for num_keep in (None, counts // 2, counts, counts - 1):
        args = (logits, tokens, eligible, num_keep, seeds, 1, 2, 0.7, noise_scale, sample)
        ref = masked_resample_reference(*args)
        assert torch.equal(masked_resample(*args), ref), (num_keep, sample)
        assert torch.equal(ref[~eligible], tokens[~eligible])
        written = eligible & (ref != C)
        expected = counts if num_keep is None else num_keep
        assert written.sum(1).tolist() == expected.tolist()
    full = masked_resample_reference(logits, tokens, eligible, None, seeds, 1, 2, 0.7,
                                     noise_scale, sample)
    # no finite logit: candidate 0, like the argmax of equal values
    assert full[0, 3] == 0 and full[0, 4] == 0 and full[1, 5] == 0 and full[2, 7] == 0
    # +inf reads as the largest float32: a frame of them all ties, so code 0 greedily
    if not sample:
        assert full[2, 0] == 0
    finite_logit = torch.isfinite(logits.float()) | (logits.float() == float("inf"))
    chosen = finite_logit.gather(-1, full.clamp(max=C - 1)[..., None])[..., 0]
    assert chosen[eligible & finite_logit.any(-1)].all()


def test_frames_without_a_finite_logit_rank_last_among_eligible():
    """Keeping all but one of the eligible frames drops one with no finite logit; keeping
    one more than the frames with finite logits keeps the earliest such frame."""
    logits, tokens, eligible = non_finite_case()
    C = logits.shape[-1]
    seeds = torch.tensor([3, 4, 5], device=DEVICE)
    x = logits.float()
    dead = ((x == float("-inf")) | x.isnan()).all(-1) & eligible
    live = eligible & ~dead
    num_keep = live.sum(1) + 1
    for sample in (False, True):
        args = (logits, tokens, eligible, num_keep, seeds, 1, 2, 1.0, 0.8, sample)
        out = masked_resample(*args)
        assert torch.equal(out, masked_resample_reference(*args))
        kept = eligible & (out != C)
        assert torch.equal(kept & live, live)
        for b in range(3):
            first_dead = dead[b].nonzero()[0, 0]
            assert (kept[b] & dead[b]).nonzero()[:, 0].tolist() == [first_dead.item()]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_non_finite_low_precision_logits(dtype):
    logits, tokens, eligible = non_finite_case(dtype=dtype)
    seeds = torch.tensor([7, 8, 9], device=DEVICE)
    for num_keep in (None, eligible.sum(1) // 2):
        args = (logits, tokens, eligible, num_keep, seeds, 2, 1, 1.0, 0.5, True)
        assert torch.equal(masked_resample(*args), masked_resample_reference(*args))


def strided(values, dtype=None):
    """`values` as a [B] view with stride 2 (every other element of a larger buffer, the
    ones in between holding other values)."""
    values = torch.as_tensor(values, dtype=dtype).to(DEVICE)
    big = torch.stack([values, values.roll(1)]).t().contiguous()
    view = big[:, 0]
    assert view.stride() == (2,) and torch.equal(view, values)
    return view


@pytest.mark.parametrize("keep_all", [False, True])
def test_strided_per_row_tensors_read_the_right_rows(keep_all):
    """Views such as seeds_big[::2] are read row by row, not as if contiguous."""
    logits, tokens, eligible = random_case(4, 23, 9, seed=31)
    rows = dict(seeds=strided([101, 7, 2 ** 40 + 3, 55]),
                level=strided([1, 2, 3, 1]), iteration=strided([1, 3, 1, 7]),
                temperature=strided([1.0, 0.6, 1.4, 0.0]), noise=strided([0.9, 0.0, 0.4, 0.2]),
                sample=strided([True, True, False, False]))
    num_keep = None if keep_all else strided(eligible.sum(1).cpu() // 2)
    args = (logits, tokens, eligible, num_keep, rows["seeds"], rows["level"],
            rows["iteration"], rows["temperature"], rows["noise"], rows["sample"])
    contiguous = [a.contiguous() if isinstance(a, torch.Tensor) else a for a in args]
    ref = masked_resample_reference(*contiguous)
    assert torch.equal(masked_resample(*args), ref)
    assert torch.equal(masked_resample_rows(*args, True, True), ref)


def test_expanded_per_row_tensors_read_one_value_for_every_row():
    """A single value expanded to [B] (stride 0) passed straight to the registered op."""
    logits, tokens, eligible = random_case(3, 19, 8, seed=32)
    B = 3
    seeds = torch.tensor([5, 6, 7], device=DEVICE)
    one = lambda v, dtype: torch.tensor(v, dtype=dtype, device=DEVICE).expand(B)
    num_keep = one(4, torch.int64)
    assert num_keep.stride() == (0,)
    args = (logits, tokens, eligible, num_keep, seeds, one(2, torch.int64),
            one(3, torch.int64), one(0.8, torch.float32), one(0.5, torch.float32),
            one(True, torch.bool))
    assert torch.equal(masked_resample_rows(*args, True, True),
                       masked_resample_reference(*args))


def test_per_row_tensors_of_the_wrong_dtype_raise_clear_errors():
    logits, tokens, eligible = random_case(2, 5, 4, seed=0)
    ok = dict(num_keep=torch.tensor([1, 2]), seeds=torch.tensor([1, 2]),
              level=torch.tensor([1, 1]), iteration=torch.tensor([1, 1]),
              temperature=torch.tensor([1.0, 1.0]), noise_scale=torch.tensor([0.0, 0.0]),
              sample=torch.tensor([True, False]))
    ok = {k: v.to(DEVICE) for k, v in ok.items()}
    bad = dict(num_keep=ok["num_keep"].float(), seeds=ok["seeds"].int(),
               level=ok["level"].bool(), iteration=ok["iteration"].double(),
               temperature=ok["temperature"].double(), noise_scale=ok["noise_scale"].half(),
               sample=ok["sample"].long())
    for name, value in bad.items():
        kwargs = dict(ok, **{name: value})
        with pytest.raises(TypeError, match=rf"^{name} must be \w+ \[B\] = \[2\], got "
                                             rf"{value.dtype}"):
            masked_resample_rows(logits, tokens, eligible, any_sample=True, any_noise=True,
                                 **kwargs)
    with pytest.raises(ValueError, match=r"level must be integer \[B\] = \[2\] \(one value"):
        masked_resample_rows(logits, tokens, eligible, any_sample=True, any_noise=True,
                             **dict(ok, level=ok["level"][:1]))
    with pytest.raises(TypeError, match=r"num_keep must be integer \[B\] = \[2\], got "
                                        r"torch.float32"):
        masked_resample(logits, tokens, eligible, ok["num_keep"].float(), ok["seeds"], 1, 1,
                        1.0, 0.0, True)
