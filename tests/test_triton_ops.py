"""Triton kernels against their PyTorch references: summed embedding, rotary attention,
convolution module. Awkward shapes (T = 1, primes, non-powers of two, ragged padding,
batch 1 and > 1), every dtype (bf16 is loaded, then computed in float32)."""

import _triton_setup  # noqa: F401  (must come first: picks interpreter or GPU)
from _triton_setup import ATOL, DEVICE, DTYPES, assert_close_to_reference

import gc
import importlib
import weakref

import pytest
import torch
import torch.nn.functional as F

from soundstorm.kernels.attention import (apply_rotary, rotary_attention_reference,
                                          rotary_tables, rotate)
from soundstorm.kernels.conv_module import conv_module_reference
from soundstorm.kernels.embedding import summed_embedding_reference
from soundstorm.kernels.residual_norm import residual_norm_reference
from soundstorm.kernels.triton import (conv_module, masked_resample, prepare_rotary_tables,
                                       residual_norm, rotary_attention, summed_embedding)

attention_module = importlib.import_module("soundstorm.kernels.triton.attention")


def ragged_mask(lengths, T):
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).to(DEVICE)


# -- summed embedding -----------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,Q,C,D,rate", [
    (1, 1, 1, 5, 8, (1, 2)),        # one frame, one level
    (2, 37, 3, 11, 24, (1, 2)),     # primes and a non-power-of-two width
    (3, 20, 4, 7, 130, (2, 3)),     # wider than one tile; a 3:2 rate mapping
    (1, 13, 12, 16, 64, (1, 1)),    # paper's 12 levels, equal rates
])
def test_summed_embedding_matches_reference(dtype, B, T, Q, C, D, rate):
    g = torch.Generator().manual_seed(T * 7 + Q)
    num, den = rate
    S = (T - 1) * num // den + 1
    V = 9
    semantic = torch.randint(0, V, (B, S), generator=g).to(DEVICE)
    tokens = torch.randint(0, C + 1, (B, T, Q), generator=g).to(DEVICE)   # C = MASK
    sem_table = torch.randn(V, D, generator=g).to(DEVICE)
    ac_table = torch.randn(Q * C + 1, D, generator=g).to(DEVICE)
    out = summed_embedding(semantic, tokens, sem_table.to(dtype), ac_table.to(dtype), num, den)
    ref32 = summed_embedding_reference(semantic, tokens, sem_table.to(dtype).float(),
                                       ac_table.to(dtype).float(), num, den)
    ref_low = summed_embedding_reference(semantic, tokens, sem_table.to(dtype),
                                         ac_table.to(dtype), num, den)
    assert_close_to_reference(out, ref32, ref_low)


def test_summed_embedding_reads_noncontiguous_tokens():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 6, (2, 3, 17), generator=g).transpose(1, 2).to(DEVICE)
    semantic = torch.randint(0, 4, (2, 9), generator=g).to(DEVICE)
    st, at = torch.randn(4, 12).to(DEVICE), torch.randn(3 * 5 + 1, 12).to(DEVICE)
    torch.testing.assert_close(summed_embedding(semantic, tokens, st, at, 1, 2),
                               summed_embedding_reference(semantic, tokens, st, at, 1, 2))


# -- rotary attention -----------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,T,dh,lengths", [
    (1, 1, 1, 16, None),             # a single frame
    (2, 3, 37, 16, [37, 23]),        # ragged rows, prime length
    (1, 2, 131, 64, None),           # several query and key blocks, the paper's head dim
    (3, 1, 70, 24, [70, 1, 65]),     # non-power-of-two head dim; a row with one frame
])
def test_rotary_attention_matches_reference(dtype, B, H, T, dh, lengths):
    g = torch.Generator().manual_seed(T + dh)
    # As the model passes them: strided views of one fused [B, T, 3, H, dh] projection.
    qkv = (torch.randn(B, T, 3, H, dh, generator=g) * 2).to(DEVICE).to(dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    mask = None if lengths is None else ragged_mask(lengths, T)
    out = rotary_attention(q, k, v, mask)
    assert out.shape == (B, H, T, dh) and out.transpose(1, 2).is_contiguous()
    ref32 = rotary_attention_reference(q.float(), k.float(), v.float(), mask)
    ref_low = rotary_attention_reference(q, k, v, mask)
    assert_close_to_reference(out, ref32, ref_low)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_rotates_in_float32_and_rounds_once(dtype):
    """The reference rotates low-precision q and k as the kernel does: float32 tables,
    float32 products, one rounding to the input dtype at the end."""
    g = torch.Generator().manual_seed(13)
    B, H, T, dh = 2, 3, 45, 32
    q, k, v = (torch.randn(3, B, H, T, dh, generator=g) * 3).to(dtype).to(DEVICE)
    cos, sin = rotary_tables(T, dh, DEVICE, torch.float32)
    q_rot = apply_rotary(q.float(), cos, sin).to(dtype)
    k_rot = apply_rotary(k.float(), cos, sin).to(dtype)
    assert torch.equal(rotate(q), q_rot) and torch.equal(rotate(k), k_rot)
    mask = ragged_mask([45, 30], T)
    assert torch.equal(rotary_attention_reference(q, k, v, mask),
                       F.scaled_dot_product_attention(q_rot, k_rot, v,
                                                      attn_mask=mask[:, None, None, :]))
    # float32 and float64 inputs rotate in their own precision
    q64 = q.double()
    assert rotate(q64).dtype == torch.float64
    torch.testing.assert_close(rotate(q64), apply_rotary(q64, cos.double(), sin.double()),
                               atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rotary_attention_is_close_to_the_low_precision_reference(dtype):
    """Kernel and reference both rotate in float32: the kernel's low-precision output is
    within the op tolerance of the reference's in the same dtype."""
    g = torch.Generator().manual_seed(14)
    B, H, T, dh = 2, 2, 70, 32
    qkv = (torch.randn(B, T, 3, H, dh, generator=g) * 2).to(dtype).to(DEVICE)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    mask = ragged_mask([70, 41], T)
    out = rotary_attention(q, k, v, mask)
    ref_low = rotary_attention_reference(q, k, v, mask)
    ref32 = rotary_attention_reference(q.float(), k.float(), v.float(), mask)
    torch_err = (ref_low.float() - ref32).abs().max().item()
    err = (out.float() - ref_low.float()).abs().max().item()
    assert err <= 2 * torch_err + ATOL[dtype], (err, torch_err)


def test_rotary_attention_with_holes_in_the_key_mask():
    """Any key mask works, not only a prefix: here blocks of 64 keys that are wholly
    masked (the online softmax must not turn them into NaN)."""
    g = torch.Generator().manual_seed(5)
    B, H, T, dh = 2, 2, 150, 16
    q, k, v = torch.randn(3, B, H, T, dh, generator=g).to(DEVICE)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 100:130] = True
    mask[1, ::7] = True
    mask = mask.to(DEVICE)
    out = rotary_attention(q.contiguous(), k.contiguous(), v.contiguous(), mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, rotary_attention_reference(q, k, v, mask),
                               atol=2e-5, rtol=1e-4)


def test_rotary_attention_ignores_padded_keys():
    g = torch.Generator().manual_seed(6)
    q, k, v = torch.randn(3, 1, 2, 40, 16, generator=g).to(DEVICE)
    mask = ragged_mask([25], 40)
    a = rotary_attention(q, k, v, mask)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 25:] = 1e4
    v2[:, :, 25:] = -1e4
    assert torch.equal(a, rotary_attention(q, k2, v2, mask))


def test_rotary_tables_handed_out_stay_alive_and_unchanged():
    """A captured CUDA graph keeps reading the cos/sin tables it was given without holding
    a reference to them: every table handed out must stay owned by the cache, at the
    same address, with the same values, however many other lengths come after it."""
    q = torch.empty(1, 1, 1, 16, device=DEVICE)
    handed_out = []
    for T in range(1, 700, 5):          # 140 distinct lengths, across two table growths
        cos, sin = attention_module._tables(q, T, 16)
        ref_cos, ref_sin = rotary_tables(T, 16, DEVICE, torch.float32)
        torch.testing.assert_close(cos, ref_cos, atol=0, rtol=0)
        torch.testing.assert_close(sin, ref_sin, atol=0, rtol=0)
        for table in (cos, sin):
            owner = table if table._base is None else table._base
            handed_out.append((weakref.ref(owner), table.data_ptr(), table.clone()))
        del cos, sin, table, owner      # as a graph would: no reference kept
    gc.collect()
    for owner_ref, address, values in handed_out:
        owner = owner_ref()
        assert owner is not None, f"a table of {values.shape[0]} frames was freed"
        offset = (address - owner.data_ptr()) // owner.element_size()
        assert 0 <= offset and offset + values.numel() <= owner.numel()
        still = owner.flatten()[offset:offset + values.numel()].view(values.shape)
        assert torch.equal(still, values)


def test_prepared_rotary_tables_serve_every_shorter_length():
    cos, sin = prepare_rotary_tables(900, 24, DEVICE)
    assert cos.shape == sin.shape == (900, 12) and cos.dtype == torch.float32
    q = torch.empty(1, 1, 1, 24, device=DEVICE)
    for T in (1, 17, 512, 900):
        c, s = attention_module._tables(q, T, 24)
        assert c.data_ptr() == cos.data_ptr() and s.data_ptr() == sin.data_ptr()
        assert torch.equal(c, cos[:T]) and torch.equal(s, sin[:T])
    with pytest.raises(ValueError, match="even head_dim"):
        prepare_rotary_tables(10, 15, DEVICE)


# -- convolution module ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,E,K,lengths", [
    (1, 1, 8, 5, None),              # one frame: every tap but the centre reads zeros
    (2, 37, 40, 5, [37, 20]),        # ragged rows, non-power-of-two channels
    (3, 19, 128, 5, [2, 19, 11]),    # the tiny preset's width
    (1, 11, 24, 3, [7]),             # another odd kernel size
])
def test_conv_module_matches_reference(dtype, B, T, E, K, lengths):
    g = torch.Generator().manual_seed(T + E)
    h = torch.randn(B, T, 2 * E, generator=g).to(DEVICE).to(dtype)
    params = [torch.randn(E, 1, K, generator=g) * 0.5, torch.randn(E, generator=g) * 0.1,
              1 + 0.1 * torch.randn(E, generator=g), 0.1 * torch.randn(E, generator=g)]
    params = [p.to(DEVICE).to(dtype) for p in params]
    mask = None if lengths is None else ragged_mask(lengths, T)
    out = conv_module(h, *params, mask)
    ref32 = conv_module_reference(h.float(), *[p.float() for p in params], mask)
    ref_low = conv_module_reference(h, *params, mask)
    assert_close_to_reference(out, ref32, ref_low)


def test_conv_module_zeroes_padding_before_the_convolution():
    g = torch.Generator().manual_seed(8)
    E, T = 16, 12
    h = torch.randn(1, T, 2 * E, generator=g).to(DEVICE)
    params = [torch.randn(E, 1, 5, generator=g).to(DEVICE)] + \
        [torch.randn(E, generator=g).to(DEVICE) for _ in range(3)]
    mask = ragged_mask([8], T)
    a = conv_module(h, *params, mask)
    h2 = h.clone()
    h2[:, 8:] = 1e3
    assert torch.equal(a[:, :8], conv_module(h2, *params, mask)[:, :8])


# -- residual + norm ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,alpha", [((1, 1, 8), 0.5), ((2, 37, 24), 1.0),
                                         ((3, 5, 130), 0.5)])
def test_residual_norm_matches_reference(dtype, shape, alpha):
    g = torch.Generator().manual_seed(shape[1] + shape[2])
    D = shape[-1]
    x, delta = (torch.randn(*shape, generator=g).to(DEVICE).to(dtype) for _ in range(2))
    w = (1 + 0.1 * torch.randn(D, generator=g)).to(DEVICE).to(dtype)
    b = (0.1 * torch.randn(D, generator=g)).to(DEVICE).to(dtype)
    y, out = residual_norm(x, delta, alpha, w, b)
    ref32 = residual_norm_reference(x.float(), delta.float(), alpha, w.float(), b.float())
    ref_low = residual_norm_reference(x, delta, alpha, w, b)
    assert_close_to_reference(y, ref32[0], ref_low[0])
    assert_close_to_reference(out, ref32[1], ref_low[1])


# -- strided inputs -------------------------------------------------------------------
def every_other(x, dim):
    """`x` as a strided view: every other element along `dim` of a buffer twice as long
    whose other elements hold different values."""
    view = torch.stack([x, x.roll(1, dims=dim)], dim=dim + 1).select(dim + 1, 0)
    assert torch.equal(view, x) and not view.is_contiguous()
    return view


def test_summed_embedding_reads_strided_inputs():
    g = torch.Generator().manual_seed(2)
    B, T, Q, C, D = 2, 11, 3, 5, 12
    semantic = torch.randint(0, 4, (B, 6), generator=g).to(DEVICE)
    tokens = torch.randint(0, C + 1, (B, T, Q), generator=g).to(DEVICE)
    st = torch.randn(4, D, generator=g).to(DEVICE)
    at = torch.randn(Q * C + 1, D, generator=g).to(DEVICE)
    ref = summed_embedding_reference(semantic, tokens, st, at, 1, 2)
    for args in ((every_other(semantic, 1), tokens, st, at),
                 (every_other(semantic, 0), every_other(tokens, 0), st, at),
                 (semantic, every_other(tokens, 1), every_other(st, 1), every_other(at, 0)),
                 (semantic, tokens, every_other(st, 0), every_other(at, 1))):
        torch.testing.assert_close(summed_embedding(*args, 1, 2), ref)


def test_conv_module_reads_strided_inputs():
    g = torch.Generator().manual_seed(9)
    B, T, E, K = 2, 13, 8, 5
    h = torch.randn(B, T, 2 * E, generator=g).to(DEVICE)
    params = [torch.randn(E, 1, K, generator=g) * 0.5, torch.randn(E, generator=g) * 0.1,
              1 + 0.1 * torch.randn(E, generator=g), 0.1 * torch.randn(E, generator=g)]
    params = [p.to(DEVICE) for p in params]
    mask = ragged_mask([13, 6], T)
    ref = conv_module_reference(h, *params, mask)
    strided_params = [every_other(params[0], 2)] + [every_other(p, 0) for p in params[1:]]
    for args in ((every_other(h, 1), *params, every_other(mask, 1)),
                 (every_other(h, 2), *strided_params, every_other(mask, 0)),
                 (every_other(h, 0), *strided_params, mask)):
        torch.testing.assert_close(conv_module(*args), ref, atol=2e-5, rtol=1e-4)


def test_residual_norm_reads_strided_inputs():
    g = torch.Generator().manual_seed(10)
    x, delta = (torch.randn(2, 7, 24, generator=g).to(DEVICE) for _ in range(2))
    w, b = (torch.randn(24, generator=g).to(DEVICE) for _ in range(2))
    ref = residual_norm_reference(x, delta, 0.5, w, b)
    for args in ((every_other(x, 1), every_other(delta, 0), every_other(w, 0), b),
                 (every_other(x, 2), delta, w, every_other(b, 0)),
                 (x.transpose(0, 1).contiguous().transpose(0, 1), every_other(delta, 2), w, b)):
        y, out = residual_norm(args[0], args[1], 0.5, args[2], args[3])
        torch.testing.assert_close(y, ref[0])
        torch.testing.assert_close(out, ref[1], atol=2e-5, rtol=1e-4)


def test_rotary_attention_reads_a_strided_key_mask():
    g = torch.Generator().manual_seed(12)
    B, H, T, dh = 2, 1, 21, 16
    q, k, v = torch.randn(3, B, H, T, dh, generator=g).to(DEVICE)
    mask = ragged_mask([21, 9], T)
    mask[0, 3:7] = False
    ref = rotary_attention_reference(q, k, v, mask)
    for m in (every_other(mask, 0), every_other(mask, 1)):
        torch.testing.assert_close(rotary_attention(q, k, v, m), ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(rotary_attention(every_other(q, 3), every_other(k, 2),
                                                every_other(v, 0), mask),
                               ref, atol=2e-5, rtol=1e-4)


# -- errors ---------------------------------------------------------------------------
def test_bad_arguments_raise_clear_errors():
    x = torch.randn(1, 2, 5, 16).to(DEVICE)
    with pytest.raises(TypeError, match="q must be float32, float16 or bfloat16"):
        rotary_attention(x.double(), x.double(), x.double(), None)
    with pytest.raises(ValueError, match=r"key_mask must be bool \[B, T\] = \[1, 5\]"):
        rotary_attention(x, x, x, torch.ones(1, 4, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match=r"h must be \[B, T, 2E\]"):
        conv_module(torch.randn(1, 3, 7).to(DEVICE), torch.randn(3, 1, 5), torch.randn(3),
                    torch.randn(3), torch.randn(3), None)
    with pytest.raises(ValueError, match=r"acoustic_table must be \[Q \* C \+ 1, D=4\]"):
        summed_embedding(torch.zeros(1, 3, dtype=torch.long, device=DEVICE),
                         torch.zeros(1, 5, 2, dtype=torch.long, device=DEVICE),
                         torch.randn(3, 4).to(DEVICE), torch.randn(6, 4).to(DEVICE), 1, 2)


def test_every_launch_runs_under_its_tensors_device(monkeypatch):
    """Each launcher enters `launch_device(out)` around its kernels: on CUDA that is
    `torch.cuda.device(out.device)`, so a tensor on cuda:1 launches on cuda:1."""
    import importlib

    from soundstorm.kernels.triton import _launch

    entered = []
    real = _launch.launch_device

    def spy(x):
        entered.append(x.device)
        return real(x)

    modules = [importlib.import_module(f"soundstorm.kernels.triton.{name}") for name in
               ("attention", "conv_module", "embedding", "resample", "residual_norm")]
    for module in modules:
        monkeypatch.setattr(module, "launch_device", spy)
    B, T, D, H = 2, 5, 8, 2
    x = torch.randn(B, T, D, device=DEVICE)
    w, b = torch.ones(D, device=DEVICE), torch.zeros(D, device=DEVICE)
    residual_norm(x, x, 1.0, w, b, 1e-5)
    q = torch.randn(B, H, T, D // H, device=DEVICE)
    rotary_attention(q, q, q, None)
    conv_module(torch.randn(B, T, 2 * D, device=DEVICE), torch.randn(D, 1, 3, device=DEVICE), b, w, b,
                None, 1e-5)
    summed_embedding(torch.zeros(B, 3, dtype=torch.long, device=DEVICE),
                     torch.zeros(B, T, 2, dtype=torch.long, device=DEVICE),
                     torch.randn(4, D, device=DEVICE), torch.randn(2 * 4 + 1, D, device=DEVICE), 1, 2)
    logits = torch.randn(B, T, 4, device=DEVICE)
    tokens = torch.full((B, T), 4, device=DEVICE)
    seeds = torch.zeros(B, dtype=torch.long, device=DEVICE)
    masked_resample(logits, tokens, tokens == 4, seeds + 2, seeds, 1, 1, 1.0, 0.5, True)
    assert len(entered) == 6 and {d.type for d in entered} == {DEVICE.type}


def test_launch_device_on_cuda_is_a_device_guard():
    import contextlib

    from soundstorm.kernels.triton._launch import launch_device

    assert isinstance(launch_device(torch.empty(1, device="meta")), contextlib.nullcontext)
    if DEVICE.type == "cpu":
        assert isinstance(launch_device(torch.empty(1)), contextlib.nullcontext)
    else:
        guard = launch_device(torch.empty(1, device=DEVICE))
        assert isinstance(guard, torch.cuda.device)
