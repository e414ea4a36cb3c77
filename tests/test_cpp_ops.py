"""Backend "cpp": the C++ kernels (masked resampling, summed embedding) equal their PyTorch
references token for token (and the counter-based hashes bit for bit), the LayerNorm ones
(residual norm, convolution module) agree within float32 rounding; dispatch selects them by
name only and refuses clearly when the extension is not built."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_model, random_codes, random_semantic
from soundstorm.engine import DecodeConfig, Engine, ModelConfig
from soundstorm.kernels import get_ops, rng
from soundstorm.kernels.attention import rotary_attention_reference
from soundstorm.kernels.conv_module import conv_module_reference
from soundstorm.kernels.embedding import summed_embedding_reference
from soundstorm.kernels.resample import masked_resample_reference
from soundstorm.kernels.residual_norm import residual_norm_reference

try:
    from soundstorm.kernels import cpp
    from soundstorm.kernels import _C
except ImportError as e:  # pragma: no cover - depends on the build
    pytest.skip(f"the C++ extension soundstorm.kernels._C is not built ({e})",
                allow_module_level=True)


def test_hashes_equal_the_reference_bit_for_bit():
    seeds = torch.tensor([0, 1, -1, 2 ** 40 + 7, 2 ** 63 - 1, -(2 ** 63), 123456789])
    level = torch.tensor([1, 2, 3, 70000, 4, 1, 12])
    iteration = torch.tensor([1, 5, 4096, 3, 1, 9, 2])
    for stream in (rng.STREAM_CANDIDATE, rng.STREAM_CONFIDENCE):
        want = rng.step_keys(seeds, level, iteration, stream)
        got = torch.from_numpy(_C.step_keys(seeds.numpy(), level.numpy(), iteration.numpy(), stream))
        assert torch.equal(got, want)
        fk = rng.frame_keys(want, 257)
        assert torch.equal(torch.from_numpy(_C.frame_keys(want.numpy(), 257)), fk)
        assert torch.equal(torch.from_numpy(_C.code_keys(fk[:2].numpy(), 1031)).view(2, 257, 1031),
                           rng.code_keys(fk[:2], 1031))


def test_gumbel_table_equals_to_gumbel_bit_for_bit():
    h = torch.cat([torch.randint(0, 2 ** 32, (200_000,), generator=torch.Generator().manual_seed(1)),
                   torch.tensor([0, 511, 512, 2 ** 32 - 1, 2 ** 31])])
    assert torch.equal(cpp.gumbel_table()[h >> 9], rng.to_gumbel(h))


def _case(B, T, C, seed, p_eligible=0.7):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, C, generator=g) * 3
    eligible = torch.rand(B, T, generator=g) < p_eligible
    tokens = torch.randint(0, C, (B, T), generator=g)
    tokens = torch.where(eligible, torch.full_like(tokens, C), tokens)
    seeds = torch.randint(-(2 ** 62), 2 ** 62, (B,), generator=g)
    return logits, tokens, eligible, seeds


def _both(*args, **kwargs):
    want = masked_resample_reference(*args, **kwargs)
    got = cpp.masked_resample(*args, **kwargs)
    assert got.dtype == torch.int64 and got.shape == want.shape
    assert torch.equal(got, want), (got != want).nonzero()[:10]
    return got


SHAPES = [(1, 1, 1), (1, 1, 7), (1, 13, 31), (3, 37, 101), (2, 97, 1024), (5, 1, 3)]
STEPS = [  # sample, temperature, noise_scale
    (False, 1.0, 0.0),                                      # greedy
    (True, 0.7, 0.0),                                       # sampled, no confidence noise
    (True, 1.3, 2.5),                                       # sampled with noise
    (False, 1.0, 1.0),                                      # greedy with noise
]


@pytest.fixture(params=["avx512", "baseline"])
def kernel_variant(request):
    """Runs a test with the AVX-512 per-frame kernels (where the CPU has them) and with the
    portable baseline ones."""
    avx512 = _C.use_avx512_kernels(request.param == "avx512")
    if request.param == "avx512" and not avx512:
        pytest.skip("this CPU has no AVX-512")
    yield request.param
    _C.use_avx512_kernels(True)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("step", STEPS, ids=["greedy", "sampled", "sampled-noise", "greedy-noise"])
def test_masked_resample_matches_the_reference(shape, step, kernel_variant):
    B, T, C = shape
    sample, temperature, noise = step
    logits, tokens, eligible, seeds = _case(B, T, C, seed=B * 1000 + T * 10 + C)
    n_elig = eligible.sum(1)
    for num_keep in (None, torch.zeros(B, dtype=torch.int64), n_elig // 2, n_elig,
                     n_elig + 5, torch.arange(B) % 3):
        _both(logits, tokens, eligible, num_keep, seeds, 2, 3, temperature, noise, sample)


def test_peaked_logits_skip_lookups_exactly(kernel_variant):
    # logits spread far beyond the Gumbel range: most codes cannot win and are skipped
    B, T, C = 3, 64, 1024
    logits, tokens, eligible, seeds = _case(B, T, C, seed=21)
    logits = logits * 15
    logits[0, :, 100:110] = logits[0, :, 100:101]           # equal top codes: ties
    for temperature in (0.3, 1.0, 4.0):
        for num_keep in (None, torch.tensor([5, 20, 64])):
            _both(logits, tokens, eligible, num_keep, seeds, 3, 2, temperature, 1.0, True)


def test_per_row_parameters_and_flags():
    B, T, C = 4, 53, 67
    logits, tokens, eligible, seeds = _case(B, T, C, seed=5)
    level, iteration = torch.tensor([1, 2, 3, 4]), torch.tensor([5, 1, 2, 9])
    temperature = torch.tensor([0.0, 0.5, 1.0, 2.0])   # 0 on a row that does not sample
    noise = torch.tensor([0.0, 1.0, 3.0, 0.5])
    sample = torch.tensor([False, True, True, True])
    num_keep = torch.tensor([3, 10, 0, 60])
    _both(logits, tokens, eligible, num_keep, seeds, level, iteration, temperature, noise, sample)
    _both(logits, tokens, eligible, None, seeds, level, iteration, temperature, noise, sample)
    for any_sample in (False, True):
        for any_noise in (False, True):
            _both(logits, tokens, eligible, num_keep, seeds, level, iteration, temperature,
                  noise, sample, any_sample=any_sample, any_noise=any_noise)


def test_ragged_eligibility_and_low_precision_logits():
    B, T, C = 3, 41, 29
    logits, tokens, _, seeds = _case(B, T, C, seed=9)
    eligible = torch.zeros(B, T, dtype=torch.bool)
    eligible[0, :] = True          # all
    eligible[1, 40] = True         # only the last frame
    eligible[2, ::7] = True        # sparse; row 3 of nothing below
    num_keep = torch.tensor([20, 1, 2])
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        _both(logits.to(dtype), tokens, eligible, num_keep, seeds, 1, 1, 0.9, 1.0, True)
    _both(logits, tokens, torch.zeros_like(eligible), num_keep, seeds, 1, 1, 0.9, 1.0, True)


def test_ties_go_to_the_earlier_frame(kernel_variant):
    B, T, C = 2, 31, 5
    # identical frames: equal candidates and equal confidences (greedy, no noise)
    logits = torch.randn(1, 1, C).expand(B, T, C).contiguous()
    logits[1] = 0.0                # a row of all-equal logits: argmax ties too
    tokens = torch.full((B, T), C)
    eligible = torch.ones(B, T, dtype=torch.bool)
    eligible[:, ::4] = False
    seeds = torch.tensor([3, 4])
    for k in range(0, T + 1, 5):
        num_keep = torch.tensor([k, k // 2])
        got = _both(logits, tokens, eligible, num_keep, seeds, 1, 1, 1.0, 0.0, False)
        first = eligible[0].nonzero()[:k, 0]
        assert torch.equal((got[0] != C).nonzero()[:, 0], first)


def test_non_finite_logits(kernel_variant):
    B, T, C = 2, 23, 17
    logits, tokens, eligible, seeds = _case(B, T, C, seed=11, p_eligible=0.9)
    logits[0, 0] = float("nan")                 # all NaN: dead frame
    logits[0, 1] = float("-inf")                # all -inf: dead frame
    logits[0, 2, ::2] = float("nan")
    logits[0, 2, 1::2] = float("-inf")          # a mix: dead frame
    logits[0, 3, 5] = float("inf")              # +inf -> the largest finite float32
    logits[0, 4, 2:4] = float("inf")            # two of them: the first wins greedily
    logits[1, :, 3] = float("nan")              # NaN in every frame: never drawn
    logits[1, 5, :] = float("-inf")
    logits[1, 5, 7] = 0.0                       # one finite code
    eligible[0, :5] = True
    eligible[1, 5] = True
    for num_keep in (None, torch.tensor([2, 1]), torch.tensor([5, 30]), torch.tensor([22, 3])):
        for step in STEPS:
            sample, temperature, noise = step
            _both(logits, tokens, eligible, num_keep, seeds, 1, 2, temperature, noise, sample)
    # temperature small enough that FLOAT32_MAX / t overflows to +inf
    _both(logits, tokens, eligible, torch.tensor([3, 3]), seeds, 1, 1, 1e-4, 1.0, True)


def test_inputs_are_not_modified_and_errors_are_clear():
    logits, tokens, eligible, seeds = _case(2, 9, 11, seed=2)
    logits[0, 0, 0] = float("nan")
    before = (logits.clone(), tokens.clone(), eligible.clone())
    cpp.masked_resample(logits, tokens, eligible, torch.tensor([1, 2]), seeds, 1, 1, 1.0, 1.0, True)
    assert torch.equal(tokens, before[1]) and torch.equal(eligible, before[2])
    assert torch.equal(logits.nan_to_num(), before[0].nan_to_num())
    with pytest.raises(ValueError, match=r"eligible must have shape \[2, 9\]"):
        cpp.masked_resample(logits, tokens, eligible[:, :5], None, seeds, 1, 1, 1.0, 1.0, True)
    with pytest.raises(ValueError, match=r"level must be one value or one per row \(2\)"):
        cpp.masked_resample(logits, tokens, eligible, None, seeds, torch.tensor([1, 2, 3]),
                            1, 1.0, 1.0, True)


EMBEDDING_SHAPES = [  # B, S, T, Q, C, D, rate_num, rate_den
    (1, 1, 1, 1, 1, 1, 1, 1),
    (2, 13, 26, 4, 17, 33, 1, 2),
    (3, 10, 20, 12, 1024, 512, 25, 50),
    (1, 5, 7, 3, 11, 7, 2, 3),
]


@pytest.mark.parametrize("shape", EMBEDDING_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=str)
def test_summed_embedding_matches_the_reference_bit_for_bit(shape, dtype):
    B, S, T, Q, C, D, num, den = shape
    g = torch.Generator().manual_seed(B * 100 + T)
    semantic = torch.randint(0, 50, (B, S), generator=g)
    tokens = torch.randint(0, C + 1, (B, T, Q), generator=g)   # C = MASK
    tokens[0, 0] = C
    semantic_table = torch.randn(50, D, generator=g).to(dtype)
    acoustic_table = torch.randn(Q * C + 1, D, generator=g).to(dtype)
    args = (semantic, tokens, semantic_table, acoustic_table, num, den)
    want = summed_embedding_reference(*args)
    got = cpp.summed_embedding(*args)
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_summed_embedding_rejects_bad_ids():
    semantic_table, acoustic_table = torch.randn(5, 4), torch.randn(2 * 3 + 1, 4)
    tokens = torch.zeros(1, 4, 2, dtype=torch.int64)
    with pytest.raises(IndexError, match="semantic id 5 is outside"):
        cpp.summed_embedding(torch.tensor([[0, 5, 1, 1]]), tokens, semantic_table,
                             acoustic_table, 1, 1)
    with pytest.raises(IndexError, match="token -1 is negative"):
        cpp.summed_embedding(torch.zeros(1, 4, dtype=torch.int64), tokens - 1,
                             semantic_table, acoustic_table, 1, 1)
    with pytest.raises(IndexError, match="reads semantic index 3, beyond the 3 semantic ids"):
        cpp.summed_embedding(torch.zeros(1, 3, dtype=torch.int64), tokens, semantic_table,
                             acoustic_table, 1, 1)


def _close(got, want, tol):
    """Within `tol` relative to the result's magnitude (LayerNorm outputs near zero have no
    meaningful elementwise relative error; both sides round their moments differently)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    scale = max(want.abs().max().item(), 1.0)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("rows", [1, 13, 97], ids=lambda r: f"rows{r}")
@pytest.mark.parametrize("D", [1, 7, 64, 1024], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_residual_norm_matches_the_reference(rows, D, dtype):
    g = torch.Generator().manual_seed(rows * 10_000 + D)
    x = (torch.randn(1, rows, D, generator=g) * 3 + 1).to(dtype)
    delta = torch.randn(1, rows, D, generator=g).to(dtype)
    weight = torch.randn(D, generator=g).to(dtype)
    bias = torch.randn(D, generator=g).to(dtype)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    for alpha in (0.5, 1.0, 0.3):
        for eps in (1e-5, 1e-2):
            y_want, n_want = residual_norm_reference(x, delta, alpha, weight, bias, eps)
            y_got, n_got = cpp.residual_norm(x, delta, alpha, weight, bias, eps)
            if alpha in (0.5, 1.0):     # exact products: the sum is the same float
                assert torch.equal(y_got, y_want)
            _close(y_got, y_want, tol)
            _close(n_got, n_want, tol)


def test_residual_norm_other_layouts_and_dtypes():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 11, 3, 19, generator=g)                # more leading dims
    delta = torch.randn(2, 19, 3, 11, generator=g).transpose(1, 3)  # not contiguous
    weight, bias = torch.randn(19, generator=g), torch.randn(19, generator=g)
    for got, want in zip(cpp.residual_norm(x, delta, 0.5, weight, bias),
                         residual_norm_reference(x, delta, 0.5, weight, bias)):
        _close(got, want, 1e-6)
    # bfloat16 goes to the reference: the same results exactly
    args = (x.bfloat16(), delta.bfloat16(), 0.5, weight.bfloat16(), bias.bfloat16())
    for got, want in zip(cpp.residual_norm(*args), residual_norm_reference(*args)):
        assert torch.equal(got, want)


CONV_SHAPES = [  # B, T, E, K
    (1, 1, 4, 1), (1, 1, 5, 5), (2, 2, 3, 5), (1, 13, 7, 3), (3, 37, 64, 5),
    (2, 97, 31, 1), (1, 500, 1024, 5),
]


@pytest.fixture(params=["avx512", "baseline"])
def sigmoid_variant(request):
    """Runs a test with conv_module's AVX-512 sigmoid (polynomial exp; where the CPU has
    it) and with the portable std::exp one."""
    avx512 = _C.use_avx512_sigmoid(request.param == "avx512")
    if request.param == "avx512" and not avx512:
        pytest.skip("this CPU has no AVX-512")
    yield request.param
    _C.use_avx512_sigmoid(True)


@pytest.mark.parametrize("shape", CONV_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "ragged-mask"])
def test_conv_module_matches_the_reference(shape, masked, sigmoid_variant):
    B, T, E, K = shape
    g = torch.Generator().manual_seed(B * 1000 + T * 10 + K)
    h = torch.randn(B, T, 2 * E, generator=g) * 2
    dw_weight, dw_bias = torch.randn(E, 1, K, generator=g), torch.randn(E, generator=g)
    norm_weight, norm_bias = torch.randn(E, generator=g), torch.randn(E, generator=g)
    frame_mask = None
    if masked:   # ragged lengths (one full row), plus a hole inside the first row
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        lengths[-1] = T
        frame_mask = torch.arange(T)[None, :] < lengths[:, None]
        frame_mask[0, T // 2] = False
    args = (h, dw_weight, dw_bias, norm_weight, norm_bias, frame_mask)
    for eps in (1e-5, 1e-1):
        _close(cpp.conv_module(*args, eps), conv_module_reference(*args, eps), 1e-5)


def test_conv_module_sigmoid_at_extremes(sigmoid_variant):
    gates = torch.tensor([-1e4, -100.0, -88.5, -87.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 87.0,
                          88.5, 100.0, 1e4, 3.0, -3.0, 0.5, 7.0])
    E = gates.numel()                                  # 17: one full AVX-512 step and a tail
    h = torch.cat([torch.linspace(-2, 2, E), gates])[None, None].repeat(1, 3, 1)
    params = (torch.ones(E, 1, 1), torch.zeros(E), torch.ones(E) * 40, torch.zeros(E))
    _close(cpp.conv_module(h, *params, None), conv_module_reference(h, *params, None), 1e-5)
    h[0, 1, E + 2] = float("nan")                      # a NaN gate poisons its frame only
    got, want = cpp.conv_module(h, *params, None), conv_module_reference(h, *params, None)
    assert torch.equal(got.isnan(), want.isnan()) and got[0, 1].isnan().all()
    _close(got[0, ::2], want[0, ::2], 1e-5)


def test_conv_module_fallbacks_and_errors():
    g = torch.Generator().manual_seed(4)
    h = torch.randn(2, 9, 10, generator=g)
    params = (torch.randn(5, 1, 3, generator=g), torch.randn(5, generator=g),
              torch.randn(5, generator=g), torch.randn(5, generator=g))
    args64 = (h.double(), *(p.double() for p in params), None)
    assert torch.equal(cpp.conv_module(*args64), conv_module_reference(*args64))
    with pytest.raises(ValueError, match=r"frame_mask must be \[B, T\]"):
        cpp.conv_module(h, *params, torch.ones(2, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="kernel size must be odd"):
        cpp.conv_module(h, torch.randn(5, 1, 2), *params[1:], None)


ATTENTION_SHAPES = [(1, 1, 1, 2), (1, 13, 3, 6), (2, 37, 2, 16), (3, 97, 4, 64), (1, 500, 8, 64)]


@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "ragged-mask"])
def test_rotary_attention_equals_the_reference_bit_for_bit(shape, masked):
    B, T, H, dh = shape
    g = torch.Generator().manual_seed(B * 1000 + T)
    # q, k, v as the model passes them: strided views of the QKV output [B, T, 3, H, dh]
    q, k, v = (torch.randn(B, T, 3, H, dh, generator=g) * 2).permute(2, 0, 3, 1, 4)
    key_mask = None
    if masked:
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        lengths[-1] = T
        key_mask = torch.arange(T)[None, :] < lengths[:, None]
    want = rotary_attention_reference(q, k, v, key_mask)
    got = cpp.rotary_attention(q, k, v, key_mask)
    assert got.shape == want.shape and torch.equal(got, want)


def test_rotary_attention_tables_grow_and_other_dtypes_go_to_the_reference():
    for T in (5, 300, 7):                         # longer, then shorter than the kept tables
        q, k, v = torch.randn(3, 1, 2, T, 8).unbind(0)
        assert torch.equal(cpp.rotary_attention(q, k, v, None),
                           rotary_attention_reference(q, k, v, None))
    q, k, v = torch.randn(3, 1, 2, 9, 8, dtype=torch.float64).unbind(0)
    assert torch.equal(cpp.rotary_attention(q, k, v, None),
                       rotary_attention_reference(q, k, v, None))
    with pytest.raises(ValueError, match=r"rotate: out must have the shape of x"):
        _C.rotate(q.float().numpy(), *(t.numpy() for t in cpp._rotary_tables(9, 8)),
                  torch.empty(1, 2, 9, 6).numpy())


def test_get_ops_selects_cpp_by_name_and_auto_on_cpu():
    ops = get_ops("cpp")
    assert ops.name == "cpp" and ops.masked_resample is cpp.masked_resample
    assert ops.summed_embedding is cpp.summed_embedding
    assert ops.conv_module is cpp.conv_module
    # torch's add + LayerNorm is faster than the C++ residual_norm: the Ops keep torch's
    assert ops.residual_norm is residual_norm_reference
    assert ops.rotary_attention is cpp.rotary_attention
    assert get_ops("auto", torch.device("cpu")).name == "cpp"
    assert get_ops("auto").name == "cpp"
    assert get_ops("auto", torch.device("meta")).name == "torch"
    assert Engine.from_preset("tiny").backend == "cpp"


def test_without_the_extension_cpp_raises_and_the_package_still_imports():
    code = ("import sys\n"
            "sys.modules['soundstorm.kernels._C'] = None  # as if it were not built\n"
            "from soundstorm.engine import Engine\n"
            "from soundstorm.kernels import get_ops\n"
            "print('AUTO', get_ops('auto').name)\n"
            "try:\n"
            "    get_ops('cpp')\n"
            "except RuntimeError as e:\n"
            "    print('ERR', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "AUTO torch" in r.stdout
    assert "ERR backend 'cpp' is not available: the C++ extension soundstorm.kernels._C" in r.stdout


@pytest.mark.parametrize("decode", [
    DecodeConfig(steps_per_level=(4, 1, 1, 1), temperature=0.0, gumbel_scale=0.0),
    DecodeConfig(steps_per_level=(3, 2, 1, 1)),   # sampled, with annealed Gumbel noise
], ids=["greedy", "sampled"])
@pytest.mark.parametrize("lookup", [0, 8], ids=["paper", "prompt-lookup"])
def test_engine_decodes_the_same_tokens_as_torch(decode, lookup):
    model = make_model(ModelConfig.preset("tiny", prompt_lookup=lookup), seed=3, sharpen=20.0)
    ref = Engine(copy.deepcopy(model), backend="torch")
    eng = Engine(copy.deepcopy(model), backend="cpp")
    assert eng.backend == "cpp" and eng.model.ops.masked_resample is cpp.masked_resample
    assert eng.model.ops.summed_embedding is cpp.summed_embedding
    assert eng.model.ops.residual_norm is residual_norm_reference
    assert eng.model.ops.conv_module is cpp.conv_module
    cfg = ref.config
    semantic = random_semantic(cfg, 2, 13, seed=4)
    prompt = random_codes(cfg, 2, 5, cfg.num_quantizers, seed=5)
    kwargs = dict(semantic_lengths=torch.tensor([13, 9]), prompt=prompt,
                  prompt_lengths=torch.tensor([5, 3]), decode=decode, seed=[21, 22])
    assert torch.equal(eng.generate(semantic, **kwargs), ref.generate(semantic, **kwargs))


def test_benchmark_script_runs_at_tiny_shapes(capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        import bench_cpp
    finally:
        sys.path.pop(0)
    assert bench_cpp.main(["--frames", "7", "--codes", "11", "--batches", "1", "2",
                           "--rounds", "2", "--inner", "1", "--dim", "6", "--kernel", "3"]) == 0
    out = capsys.readouterr().out
    assert "speed-up" in out and out.count("x\n") == 12
    assert out.count("residual_norm") == 2 and out.count("conv_module") == 2
    assert out.count("rotary_attn") == 2 and out.count("int8_linear") == 3
