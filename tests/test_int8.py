"""int8 linear layers: the reference's int32 products are exact, its results stay within
the bound that quantisation allows, the C++ passes around `torch._int_mm` equal the
reference bit for bit, and `Engine(..., quantize="int8")` swaps the layers, leaves the
caller's model alone and refuses what it cannot run."""

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import make_model, random_codes, random_semantic
from soundstorm.engine import DecodeConfig, Engine, ModelConfig
from soundstorm.engine.quantize import Int8Linear, is_quantized
from soundstorm.kernels import get_ops
from soundstorm.kernels.int8_linear import (dequantize_reference, int8_linear_reference,
                                            quantize_rows_reference, quantize_weight)

SHAPES = [(1, 1, 1), (1, 64, 17), (3, 7, 5), (13, 61, 97), (97, 512, 131), (500, 256, 2048)]


def _linear_case(M, K, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * torch.rand(M, 1, generator=g) * 10
    w = torch.randn(N, K, generator=g) * torch.rand(N, 1, generator=g)
    b = torch.randn(N, generator=g)
    return x, w, b


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_reference_is_within_the_quantisation_bound(shape):
    M, K, N = shape
    x, w, b = _linear_case(M, K, N)
    wq, ws = quantize_weight(w)
    xq, xs = quantize_rows_reference(x)
    # the codes reconstruct each value to within half a step
    assert (xq.float() * xs[:, None] - x).abs().le(0.5 * xs[:, None] * 1.0001).all()
    assert (wq.float() * ws[:, None] - w).abs().le(0.5 * ws[:, None] * 1.0001).all()
    assert xq.abs().max() <= 127 and wq.abs().max() <= 127
    # int32 accumulation is exact: the same sums as in int64
    acc = torch._int_mm(xq, wq.t())
    assert torch.equal(acc.long(), xq.long() @ wq.long().t())
    got = int8_linear_reference(x, wq, ws, b)
    want = F.linear(x.double(), w.double(), b.double())
    # |x.w - xq.wq * xs * ws| <= xs/2 * sum|w| + ws/2 * sum|x| + K * xs * ws / 4
    bound = (0.5 * xs[:, None].double() * w.abs().double().sum(1)[None, :]
             + 0.5 * ws[None, :].double() * x.abs().double().sum(1)[:, None]
             + 0.25 * K * xs[:, None].double() * ws[None, :].double())
    err = (got.double() - want).abs()
    assert (err <= bound * 1.001 + 1e-5 * want.abs() + 1e-6).all(), (err / bound).max()
    # and far better than the bound on average: a relative error of a few 1e-3
    rel = err.norm() / want.norm()
    assert rel < 0.02, rel


def test_zero_rows_and_extreme_values():
    x = torch.tensor([[0.0, 0.0, 0.0], [1e-20, -3e-20, 2e-20], [3e38, -3e38, 1.0],
                      [-2.5, 0.5, 1.0]])
    q, s = quantize_rows_reference(x)
    assert torch.equal(q[0], torch.zeros(3, dtype=torch.int8))
    assert torch.equal(q[1], torch.tensor([42, -127, 85], dtype=torch.int8))
    assert torch.equal(q[2], torch.tensor([127, -127, 0], dtype=torch.int8))
    assert torch.equal(q[3], torch.tensor([-127, 25, 51], dtype=torch.int8))
    assert torch.isfinite(s).all()


def test_quantize_weight_errors():
    with pytest.raises(ValueError, match=r"weight must be a float \[N, K\]"):
        quantize_weight(torch.ones(3, dtype=torch.int64).view(1, 3))
    with pytest.raises(ValueError, match="non-finite"):
        quantize_weight(torch.tensor([[1.0, float("nan")]]))


def test_int8_linear_argument_errors():
    wq, ws = quantize_weight(torch.randn(5, 7))
    x = torch.randn(3, 7)
    with pytest.raises(ValueError, match="float32 activations, got x of dtype torch.float64"):
        int8_linear_reference(x.double(), wq, ws, None)
    with pytest.raises(ValueError, match=r"x must be \[..., K=7\], got shape \(3, 6\)"):
        int8_linear_reference(x[:, :6], wq, ws, None)
    with pytest.raises(ValueError, match=r"weight must be int8 \[N, K\]"):
        int8_linear_reference(x, wq.float(), ws, None)
    with pytest.raises(ValueError, match=r"w_scale must be float32 \[N=5\]"):
        int8_linear_reference(x, wq, ws[:4], None)
    with pytest.raises(ValueError, match=r"bias must be float32 \[N=5\] or None"):
        int8_linear_reference(x, wq, ws, torch.zeros(4))


# -- the C++ passes ------------------------------------------------------------------------
cpp = pytest.importorskip("soundstorm.kernels.cpp", reason="the C++ extension is not built",
                          exc_type=ImportError)


@pytest.fixture(params=["avx512", "baseline"])
def quantize_variant(request):
    """Runs a test with the AVX-512 row quantisation (where the CPU has it) and with the
    portable one."""
    from soundstorm.kernels import _C
    avx512 = _C.use_avx512_quantize(request.param == "avx512")
    if request.param == "avx512" and not avx512:
        pytest.skip("this CPU has no AVX-512")
    yield request.param
    _C.use_avx512_quantize(True)


@pytest.mark.parametrize("shape", SHAPES + [(4, 33, 3), (2, 16, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cpp_quantise_and_rescale_equal_the_reference_bit_for_bit(shape, quantize_variant):
    from soundstorm.kernels import _C
    M, K, N = shape
    x, w, b = _linear_case(M, K, N, seed=1)
    x[0, 0] = 0.0
    if M > 2:
        x[1] = 0.0                                     # a row of zeros
        x[2, :] = x[2, :].round()                      # ties at .5 steps after scaling
    want_q, want_s = quantize_rows_reference(x)
    q, s = torch.empty(M, K, dtype=torch.int8), torch.empty(M)
    _C.quantize_rows(x.numpy(), q.numpy(), s.numpy())
    assert torch.equal(q, want_q) and torch.equal(s, want_s)
    wq, ws = quantize_weight(w)
    acc = torch._int_mm(q, wq.t())
    for bias in (b, None):
        out = torch.empty(M, N)
        _C.dequantize(acc.numpy(), s.numpy(), ws.numpy(), None if bias is None else bias.numpy(),
                      out.numpy())
        assert torch.equal(out, dequantize_reference(acc, s, ws, bias))
        # from sums already in float32, rescaled in place
        acc_f = acc.float()
        _C.dequantize(acc_f.numpy(), s.numpy(), ws.numpy(),
                      None if bias is None else bias.numpy(), acc_f.numpy())
        assert torch.equal(acc_f, out)


@pytest.mark.parametrize("lead,K,N", [((1, 1), 48, 29), ((2, 37), 7, 5), ((3, 1, 5), 61, 1),
                                      ((1, 500), 512, 2048)], ids=str)
def test_cpp_int8_linear_equals_the_reference(lead, K, N):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(*lead, K * 2, generator=g)[..., ::2]          # not contiguous
    wq, ws = quantize_weight(torch.randn(N, K, generator=g))
    b = torch.randn(N, generator=g)
    packed = cpp.int8_prepack(wq)
    assert (packed is None) == (not torch.backends.mkldnn.is_available())
    for bias in (b, None):
        want = int8_linear_reference(x, wq, ws, bias)
        for p in (packed, None):                   # oneDNN on the packed weight, _int_mm
            got = cpp.int8_linear(x, wq, ws, bias, p)
            assert got.shape == (*lead, N)
            assert torch.equal(got, want)
    with pytest.raises(ValueError, match="float32 activations"):
        cpp.int8_linear(x.double(), wq, ws, b)


def test_every_backend_offers_int8_linear():
    assert get_ops("torch").int8_linear is int8_linear_reference
    assert get_ops("torch").int8_prepack(torch.zeros(2, 3, dtype=torch.int8)) is None
    assert get_ops("cpp").int8_linear is cpp.int8_linear
    assert get_ops("cpp").int8_prepack is cpp.int8_prepack


# -- the engine ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sharp_model():
    return make_model(ModelConfig.preset("tiny"), seed=3, sharpen=20.0)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_engine_swaps_the_linears_and_leaves_the_model_alone(sharp_model, backend):
    before = {k: v.clone() for k, v in sharp_model.state_dict().items()}
    engine = Engine(sharp_model, backend=backend, quantize="int8")
    assert engine.quantize == "int8" and is_quantized(engine.model)
    assert not is_quantized(sharp_model)
    assert all(torch.equal(before[k], v) for k, v in sharp_model.state_dict().items())
    layers = [m for m in engine.model.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == 8 * sharp_model.config.depth    # FFNs 2 x 2, qkv, out, conv in and out
    assert all(m.weight.dtype == torch.int8 for m in layers)
    assert all(m.linear_fn is engine.ops.int8_linear for m in layers)
    packed = backend == "cpp" and torch.backends.mkldnn.is_available()
    assert all((m.packed is not None) == packed for m in layers)
    cfg = sharp_model.config
    sem, tok = random_semantic(cfg, 2, 40, seed=4), random_codes(cfg, 2, 80, cfg.num_quantizers, seed=5)
    lengths = torch.tensor([80, 53])
    with torch.no_grad():
        want = sharp_model(sem, tok, lengths, level=2)
        got = engine.model(sem, tok, lengths, level=2)
    rel = (got - want).norm() / want.norm()
    assert 0 < rel < 0.03, rel
    assert ((got.argmax(-1) == want.argmax(-1))[0].float().mean()) > 0.9


def test_int8_engines_of_both_backends_decode_alike(sharp_model):
    cfg = sharp_model.config
    sem = random_semantic(cfg, 3, 60, seed=6)
    lengths = torch.tensor([60, 41, 7])
    out = {}
    for backend in ("torch", "cpp"):
        engine = Engine(sharp_model, backend=backend, quantize="int8")
        out[backend] = engine.generate(sem, lengths, decode=DecodeConfig(), seed=11)
    fp32 = Engine(copy.deepcopy(sharp_model), backend="torch").generate(sem, lengths, seed=11)
    valid = out["torch"] >= 0
    assert torch.equal(valid, fp32 >= 0)
    assert (out["cpp"] == out["torch"])[valid].float().mean() > 0.95
    assert (out["torch"] == fp32)[valid].float().mean() > 0.8


def test_engine_refuses_what_int8_cannot_run(sharp_model):
    with pytest.raises(ValueError, match=r"quantize must be None or one of \['int8'\], got 'int4'"):
        Engine(sharp_model, quantize="int4")
    with pytest.raises(ValueError, match="quantize='int8' runs float32 models on the CPU.*bfloat16"):
        Engine(sharp_model, dtype="bfloat16", quantize="int8")
    with pytest.raises(ValueError, match="quantize='int8' runs float32 models on the CPU.*cuda"):
        Engine(sharp_model, device="cuda", quantize="int8")
    with pytest.raises(ValueError, match="quantize='int8' runs on backends torch and cpp.*xla"):
        Engine(sharp_model, backend="xla", quantize="int8")


def test_a_quantised_model_is_not_saved(sharp_model, tmp_path):
    engine = Engine(sharp_model, quantize="int8")
    with pytest.raises(ValueError, match="int8-quantised.*save the float model"):
        engine.model.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m" / "model.safetensors").exists()
