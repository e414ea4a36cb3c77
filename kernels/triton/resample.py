"""Gumbel-perturbed top-k masked resampling (reference: `soundstorm.kernels.resample`).

Two kernels per decoding iteration:

1. `_candidates_kernel`, one program per tile of frames: reads each eligible frame's C
   logits once, draws the candidate (Gumbel-max over logits / temperature with the
   counter-based noise, or argmax), and computes its confidence log softmax(logits)[cand]
   plus the annealed Gumbel noise. Non-eligible frames are never read. On the last
   iteration of a level (keep all) it writes the tokens directly and is the only kernel.
2. `_select_kernel`, one program per row: keeps exactly `num_keep[b]` of the most
   confident candidates by threshold selection - a 32-step bisection on an
   order-preserving uint32 image of the confidences finds the k-th largest, and a prefix
   count breaks ties toward the earlier frame, exactly as the reference's stable sort -
   instead of sorting the row.

Shapes: logits [B, T, C] fp32/fp16/bf16 (a strided last dim is copied), tokens int64
[B, T], eligible bool [B, T], num_keep integer [B] or None, seeds int64 [B] (on the
device: a CUDA graph replays with whatever seeds the buffer holds), any strides; the
registered op takes level / iteration as integer [B], temperature / noise_scale as
float32 [B], sample as bool [B]. Returns int64 [B, T].

Memory traffic (paper preset, 30 s = 1500 frames, B = 1, bf16 logits, C = 1024;
`bench/op_costs.py`): the kernels read the logits once, 3.1 MB, plus O(T) bytes. A
sampled iteration of the reference materialises the [B, T, C] hashes, uniforms and
Gumbel noise in int64/float32 (mix32 alone is ten passes over int64) and re-reads the
logits in float32: 470 MB, 467 MB more; a greedy one moves 27.6 MB.

Confidences equal the reference's up to the float rounding of log-sum-exp, so only two
frames tied to the last bit could rank differently (the tests compare token for token).
An eligible frame always ranks above a non-eligible one, so exactly k are kept even when
a confidence is -inf.

Non-finite logits, as in the reference: NaN is read as -inf and +inf as the largest
finite float32 when the logits are loaded, so no NaN reaches a max or an argmax (whose
NaN handling on a GPU differs from the interpreter's and from torch's). A frame whose
logits are all -inf after that gets candidate 0 and confidence -inf.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from soundstorm.kernels import rng as rng_ref
from soundstorm.kernels.triton import rng
from soundstorm.kernels.triton._launch import check_device, check_float, launch_device, next_pow2


FLOAT32_MAX: tl.constexpr = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _candidates_kernel(logits_ptr, tokens_ptr, eligible_ptr, seeds_ptr, out_ptr, cand_ptr,
                       key_ptr, level_ptr, iteration_ptr, temperature_ptr, noise_ptr,
                       sample_ptr, T, C, stride_lb, stride_lt, stride_tb, stride_tt,
                       stride_eb, stride_ob, stride_ot,
                       STREAM_CANDIDATE: tl.constexpr, STREAM_CONFIDENCE: tl.constexpr,
                       SAMPLE: tl.constexpr, KEEP_ALL: tl.constexpr, HAS_NOISE: tl.constexpr,
                       BLOCK_F: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    offs_t = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    offs_c = tl.arange(0, BLOCK_C)
    t_ok = offs_t < T
    eligible = tl.load(eligible_ptr + b * stride_eb + offs_t, mask=t_ok, other=0) != 0
    # Masked lanes issue no memory traffic: frames that are not eligible cost nothing.
    lane = eligible[:, None] & (offs_c < C)[None, :]
    x = tl.load(logits_ptr + b * stride_lb + offs_t[:, None].to(tl.int64) * stride_lt
                + offs_c[None, :], mask=lane, other=float("-inf")).to(tl.float32)
    # NaN -> -inf, +inf -> the largest finite float32: max and argmax below never see a
    # NaN (a GPU's max/argmax treat NaN differently from the interpreter's and torch's).
    x = tl.where(x != x, float("-inf"), x)
    x = tl.where(x == float("inf"), FLOAT32_MAX, x)
    row_max = tl.max(x, axis=1)
    # Frames with no finite logit (and frames not read) take candidate 0.
    dead = row_max == float("-inf")
    seed = tl.load(seeds_ptr + b)
    # The row's own (level, iteration): rows of one pass may be at different steps.
    level = tl.load(level_ptr + b)
    iteration = tl.load(iteration_ptr + b)
    cand = tl.argmax(x, axis=1, tie_break_left=True)
    if SAMPLE:
        temperature = tl.load(temperature_ptr + b)
        # rows that take the argmax may carry temperature 0: keep the division finite
        temperature = tl.where(temperature > 0, temperature, 1.0)
        tag_candidate = rng.step_tag(level, iteration, STREAM_CANDIDATE)
        fkey = rng.mix32(rng.step_key(seed, tag_candidate) ^ rng.spread(offs_t))
        noise = rng.to_gumbel(rng.mix32(fkey[:, None] ^ rng.spread(offs_c)[None, :]))
        # div_rn: the reference divides with IEEE rounding, not by a reciprocal.
        z = tl.where(lane, tl.div_rn(x, temperature) + noise, float("-inf"))
        drawn = tl.argmax(z, axis=1, tie_break_left=True)
        cand = tl.where(tl.load(sample_ptr + b) != 0, drawn, cand)
    cand = tl.where(dead, 0, cand)
    tokens = tl.load(tokens_ptr + b * stride_tb + offs_t * stride_tt, mask=t_ok, other=0)
    if KEEP_ALL:
        tl.store(out_ptr + b * stride_ob + offs_t * stride_ot,
                 tl.where(eligible, cand.to(tl.int64), tokens), mask=t_ok)
    else:
        safe_max = tl.where(dead, 0.0, row_max)
        total = tl.sum(tl.exp(x - safe_max[:, None]), axis=1)
        lse = safe_max + tl.log(tl.where(dead, 1.0, total))
        picked = tl.sum(tl.where(offs_c[None, :] == cand[:, None], x, 0.0), axis=1)
        conf = picked - lse
        if HAS_NOISE:
            tag_confidence = rng.step_tag(level, iteration, STREAM_CONFIDENCE)
            ckey = rng.mix32(rng.step_key(seed, tag_confidence) ^ rng.spread(offs_t))
            conf = conf + tl.load(noise_ptr + b) * rng.to_gumbel(ckey)
        # No finite logit: confidence -inf, below every finite one, above non-eligible.
        conf = tl.where(dead, float("-inf"), conf)
        # Order-preserving map float32 -> uint32 (+0.0 first, so -0.0 ties with +0.0).
        bits = (conf + 0.0).to(tl.uint32, bitcast=True)
        sign_bit = tl.full(bits.shape, 0x80000000, tl.uint32)
        all_ones = tl.full(bits.shape, 0xFFFFFFFF, tl.uint32)
        key = tl.where((bits & sign_bit) != 0, bits ^ all_ones, bits | sign_bit)
        # 0 is below the image of every float, -inf included: ineligible frames rank last.
        key = tl.where(eligible, key, tl.zeros_like(key))
        tl.store(cand_ptr + b * T + offs_t, cand, mask=t_ok)
        tl.store(key_ptr + b * T + offs_t, key.to(tl.int32, bitcast=True), mask=t_ok)


@triton.jit
def _select_kernel(cand_ptr, key_ptr, tokens_ptr, num_keep_ptr, out_ptr, T,
                   stride_tb, stride_tt, stride_ob, stride_ot, BLOCK_T: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_T)
    ok = offs < T
    key = tl.load(key_ptr + b * T + offs, mask=ok, other=0).to(tl.uint32, bitcast=True)
    k = tl.load(num_keep_ptr + b).to(tl.int32)
    # The largest threshold with at least k keys >= it, one bit at a time from the top.
    tau = tl.zeros([], tl.uint32)
    for i in tl.static_range(32):
        trial = tau | tl.full([], 1 << (31 - i), tl.uint32)
        count = tl.sum((key >= trial).to(tl.int32), axis=0)
        tau = tl.where(count >= k, trial, tau)
    above = key > tau
    tied = (key == tau) & ok
    # Among frames tied at the threshold, the earliest ones fill the remaining places.
    tie_rank = tl.cumsum(tied.to(tl.int32), axis=0)
    need = k - tl.sum(above.to(tl.int32), axis=0)
    keep = (above | (tied & (tie_rank <= need))) & (key != 0)
    cand = tl.load(cand_ptr + b * T + offs, mask=ok, other=0)
    tokens = tl.load(tokens_ptr + b * stride_tb + offs * stride_tt, mask=ok, other=0)
    tl.store(out_ptr + b * stride_ob + offs * stride_ot,
             tl.where(keep, cand.to(tl.int64), tokens), mask=ok)


def candidates_config(num_codes: int) -> dict:
    """Block sizes of `_candidates_kernel` for C codes: a [BLOCK_F, BLOCK_C] tile of about
    4096 logits (4 frames at C = 1024), so short rows still fill a program."""
    block_c = next_pow2(num_codes)
    return dict(BLOCK_C=block_c, BLOCK_F=max(1, 4096 // block_c),
                num_warps=4 if block_c <= 2048 else 8)


def select_config(num_frames: int) -> dict:
    """The whole row in one tile (T <= max_frames): BLOCK_T = next power of two."""
    block_t = next_pow2(num_frames)
    return dict(BLOCK_T=block_t, num_warps=max(1, min(8, block_t // 256)))


def masked_resample(logits: torch.Tensor, tokens: torch.Tensor, eligible: torch.Tensor,
                    num_keep: Optional[torch.Tensor], seeds: torch.Tensor, level, iteration,
                    temperature, noise_scale, sample, any_sample: Optional[bool] = None,
                    any_noise: Optional[bool] = None) -> torch.Tensor:
    """Triton version of `masked_resample_reference` (same arguments, same result): each
    per-step parameter is one value for the batch or a tensor with one value per row.
    Inside a captured step every parameter must already be a device tensor (a Python
    value becomes one through a host-to-device copy); `any_sample` / `any_noise` then say
    which work the pass needs."""
    B = logits.shape[0] if logits.ndim == 3 else 0
    device = logits.device
    sampling = (isinstance(sample, torch.Tensor) or bool(sample)) if any_sample is None \
        else bool(any_sample)
    noisy = (isinstance(noise_scale, torch.Tensor) or float(noise_scale) != 0.0) \
        if any_noise is None else bool(any_noise)
    if not isinstance(sample, torch.Tensor) and sample and not isinstance(
            temperature, torch.Tensor) and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    return masked_resample_rows(
        logits, tokens, eligible, num_keep, seeds, _rows(level, B, device, torch.int64),
        _rows(iteration, B, device, torch.int64), _rows(temperature, B, device, torch.float32),
        _rows(noise_scale, B, device, torch.float32), _rows(sample, B, device, torch.bool),
        sampling, noisy)


def _rows(value, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """One value per row, contiguous on `device`. A tensor already there in `dtype` is
    used as it is (no copy, no sync); a Python value is copied from the host."""
    if isinstance(value, torch.Tensor) and value.device == device and value.dtype == dtype:
        return value.expand(batch).contiguous()
    return torch.as_tensor(value, dtype=dtype, device=device).expand(batch).contiguous()


_DTYPE_KINDS = {
    "int64": lambda dtype: dtype == torch.int64,
    "integer": lambda dtype: not dtype.is_floating_point and not dtype.is_complex
    and dtype != torch.bool,
    "float32": lambda dtype: dtype == torch.float32,
    "bool": lambda dtype: dtype == torch.bool,
}


def _check_same_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} must be on the logits' device {device}, got {t.device}")


def _per_row(name: str, t: torch.Tensor, batch: int, device: torch.device,
             kind: str) -> torch.Tensor:
    """Check that `t` holds one value of `kind` (a key of `_DTYPE_KINDS`) per row on
    `device`; return it contiguous (a copy on the device if it is a strided view)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a {kind} tensor [B] = [{batch}], got "
                        f"{type(t).__name__}")
    if not _DTYPE_KINDS[kind](t.dtype):
        raise TypeError(f"{name} must be {kind} [B] = [{batch}], got {t.dtype}")
    if t.shape != (batch,):
        raise ValueError(f"{name} must be {kind} [B] = [{batch}] (one value per row), got "
                         f"{t.dtype} {tuple(t.shape)}")
    _check_same_device(name, t, device)
    return t.contiguous()


@triton_op("soundstorm::masked_resample", mutates_args=())
def masked_resample_rows(logits: torch.Tensor, tokens: torch.Tensor, eligible: torch.Tensor,
                         num_keep: Optional[torch.Tensor], seeds: torch.Tensor,
                         level: torch.Tensor, iteration: torch.Tensor,
                         temperature: torch.Tensor, noise_scale: torch.Tensor,
                         sample: torch.Tensor, any_sample: bool,
                         any_noise: bool) -> torch.Tensor:
    """The registered op: per-row parameters as [B] tensors; `any_sample` / `any_noise`
    (known on the host) let a pass in which no row samples or perturbs skip that work."""
    check_device(logits, "masked_resample")
    check_float("logits", logits)
    if logits.ndim != 3:
        raise ValueError(f"logits must be [B, T, C], got shape {tuple(logits.shape)}")
    B, T, C = logits.shape
    if tokens.shape != (B, T) or tokens.dtype != torch.int64:
        raise ValueError(f"tokens must be int64 [B, T] = [{B}, {T}], got {tokens.dtype} "
                         f"{tuple(tokens.shape)}")
    if eligible.shape != (B, T) or eligible.dtype != torch.bool:
        raise ValueError(f"eligible must be bool [B, T] = [{B}, {T}], got {eligible.dtype} "
                         f"{tuple(eligible.shape)}")
    for name, t in (("tokens", tokens), ("eligible", eligible)):
        _check_same_device(name, t, logits.device)
    # The kernels read one value per row at ptr + b: every [B] tensor is made contiguous
    # here (a strided or expanded view is copied on the device, nothing on the host).
    seeds = _per_row("seeds", seeds, B, logits.device, "int64")
    if num_keep is not None:
        num_keep = _per_row("num_keep", num_keep, B, logits.device, "integer")
    level = _per_row("level", level, B, logits.device, "integer")
    iteration = _per_row("iteration", iteration, B, logits.device, "integer")
    temperature = _per_row("temperature", temperature, B, logits.device, "float32")
    noise_scale = _per_row("noise_scale", noise_scale, B, logits.device, "float32")
    sample = _per_row("sample", sample, B, logits.device, "bool")
    if logits.stride(2) != 1:
        logits = logits.contiguous()
    eligible = eligible.contiguous()
    out = torch.empty((B, T), dtype=torch.int64, device=logits.device)
    keep_all = num_keep is None
    if keep_all:
        cand = torch.empty((1,), dtype=torch.int32, device=logits.device)
        key = torch.empty((1,), dtype=torch.int32, device=logits.device)
    else:
        cand = torch.empty((B, T), dtype=torch.int32, device=logits.device)
        key = torch.empty((B, T), dtype=torch.int32, device=logits.device)
    cfg = candidates_config(C)
    grid = (triton.cdiv(T, cfg["BLOCK_F"]), B)
    with launch_device(out):
        wrap_triton(_candidates_kernel)[grid](
            logits, tokens, eligible, seeds, out, cand, key, level, iteration, temperature,
            noise_scale, sample, T, C, logits.stride(0), logits.stride(1), tokens.stride(0),
            tokens.stride(1), eligible.stride(0), out.stride(0), out.stride(1),
            STREAM_CANDIDATE=rng_ref.STREAM_CANDIDATE, STREAM_CONFIDENCE=rng_ref.STREAM_CONFIDENCE,
            SAMPLE=any_sample, KEEP_ALL=keep_all, HAS_NOISE=any_noise,
            BLOCK_F=cfg["BLOCK_F"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"])
    if keep_all:
        return out
    sel = select_config(T)
    with launch_device(out):
        wrap_triton(_select_kernel)[(B,)](
            cand, key, tokens, num_keep, out, T, tokens.stride(0), tokens.stride(1),
            out.stride(0), out.stride(1), BLOCK_T=sel["BLOCK_T"], num_warps=sel["num_warps"])
    return out
