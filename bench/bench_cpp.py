"""The C++ kernels of backend "cpp" vs the PyTorch references on the CPU, at the small
preset's shapes: masked resampling (T = 500 frames, C = 1024 codes, batch 1 and 8, sampled
with confidence noise and greedy), then the residual add with its LayerNorm (D = 512), the
inner part of the convolution module (E = 1024 channels, K = 5 taps, half the rows
padded), rotary attention (8 heads of 64) and the int8 linear layer (512 -> 2048).

    python bench/bench_cpp.py                  # T=500, C=1024, batches 1 and 8
    python bench/bench_cpp.py --scale 10             # more peaked logits
    python bench/bench_cpp.py --frames 7 --codes 11 --batches 1 2 --rounds 3
    python bench/bench_cpp.py --dim 1024 --kernel 5     # the base preset's widths

Reference and kernel alternate round by round on the same inputs; each sample is the mean
of `--inner` back-to-back calls. Prints the median time of each and the speed-up as the
median of the per-round ratios (reference / C++). Both run with torch's thread count.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from soundstorm.kernels.attention import rotary_attention_reference
from soundstorm.kernels.conv_module import conv_module_reference
from soundstorm.kernels.int8_linear import int8_linear_reference, quantize_weight
from soundstorm.kernels.resample import masked_resample_reference
from soundstorm.kernels.residual_norm import residual_norm_reference


def _timed(fn, inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner


def bench_case(batch: int, frames: int, codes: int, sampled: bool, rounds: int,
               inner: int, impl, scale: float = 3.0) -> dict:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, frames, codes, generator=g) * scale
    tokens = torch.full((batch, frames), codes, dtype=torch.int64)
    eligible = torch.ones(batch, frames, dtype=torch.bool)
    num_keep = torch.full((batch,), frames // 2, dtype=torch.int64)
    seeds = torch.arange(batch, dtype=torch.int64)
    args = (logits, tokens, eligible, num_keep, seeds, 1, 2,
            1.0 if sampled else 0.0, 1.5 if sampled else 0.0, sampled)
    want = masked_resample_reference(*args)
    if not torch.equal(impl(*args), want):
        raise SystemExit(f"the C++ result differs from the reference at B={batch} "
                         f"T={frames} C={codes} sampled={sampled}")
    ref_times, cpp_times, ratios = [], [], []
    for _ in range(rounds):
        r = _timed(lambda: masked_resample_reference(*args), inner)
        c = _timed(lambda: impl(*args), inner)
        ref_times.append(r)
        cpp_times.append(c)
        ratios.append(r / c)
    return {"batch": batch, "sampled": sampled, "torch_ms": 1e3 * statistics.median(ref_times),
            "cpp_ms": 1e3 * statistics.median(cpp_times), "speedup": statistics.median(ratios)}


def _compare(reference, impl, rounds: int, inner: int) -> tuple:
    """Median reference and C++ times (ms) and the median per-round ratio."""
    ref_times, cpp_times, ratios = [], [], []
    for _ in range(rounds):
        r = _timed(reference, inner)
        c = _timed(impl, inner)
        ref_times.append(r)
        cpp_times.append(c)
        ratios.append(r / c)
    return (1e3 * statistics.median(ref_times), 1e3 * statistics.median(cpp_times),
            statistics.median(ratios))


def bench_norm_ops(batch: int, frames: int, dim: int, expansion: int, kernel: int,
                   rounds: int, inner: int, cpp) -> list:
    """(name, torch ms, cpp ms, speed-up) for residual_norm and conv_module; each result is
    checked against the reference first."""
    g = torch.Generator().manual_seed(1)
    x, delta = torch.randn(batch, frames, dim, generator=g), torch.randn(batch, frames, dim, generator=g)
    weight, bias = torch.randn(dim, generator=g), torch.randn(dim, generator=g)
    norm_args = (x, delta, 0.5, weight, bias)
    for got, want in zip(cpp.residual_norm(*norm_args), residual_norm_reference(*norm_args)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    E = dim * expansion
    h = torch.randn(batch, frames, 2 * E, generator=g)
    frame_mask = torch.ones(batch, frames, dtype=torch.bool)
    frame_mask[1::2, frames // 2:] = False               # every other row half padded
    conv_args = (h, torch.randn(E, 1, kernel, generator=g), torch.randn(E, generator=g),
                 torch.randn(E, generator=g), torch.randn(E, generator=g), frame_mask)
    torch.testing.assert_close(cpp.conv_module(*conv_args), conv_module_reference(*conv_args),
                               rtol=1e-5, atol=1e-5)
    heads = max(1, dim // 64)
    qkv = torch.randn(batch, frames, 3, heads, dim // heads, generator=g)
    attn_args = (*qkv.permute(2, 0, 3, 1, 4), frame_mask)   # strided views, as in the model
    assert torch.equal(cpp.rotary_attention(*attn_args), rotary_attention_reference(*attn_args))
    wq, ws = quantize_weight(torch.randn(2 * E, dim, generator=g))
    lin_args = (x, wq, ws, torch.randn(2 * E, generator=g))
    packed = cpp.int8_prepack(wq)
    assert torch.equal(cpp.int8_linear(*lin_args, packed), int8_linear_reference(*lin_args))
    rows = []
    with torch.no_grad():
        rows.append(("residual_norm", *_compare(lambda: residual_norm_reference(*norm_args),
                                                lambda: cpp.residual_norm(*norm_args),
                                                rounds, inner)))
        rows.append(("conv_module", *_compare(lambda: conv_module_reference(*conv_args),
                                              lambda: cpp.conv_module(*conv_args),
                                              rounds, inner)))
        rows.append(("rotary_attn", *_compare(lambda: rotary_attention_reference(*attn_args),
                                              lambda: cpp.rotary_attention(*attn_args),
                                              rounds, inner)))
        rows.append(("int8_linear", *_compare(lambda: int8_linear_reference(*lin_args),
                                              lambda: cpp.int8_linear(*lin_args, packed),
                                              rounds, inner)))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=500)
    p.add_argument("--codes", type=int, default=1024)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--inner", type=int, default=5)
    p.add_argument("--scale", type=float, default=3.0,
                   help="standard deviation of the random logits (a trained model's are "
                        "more peaked: the C++ kernel then skips most Gumbel lookups)")
    p.add_argument("--dim", type=int, default=512, help="model width (residual_norm)")
    p.add_argument("--expansion", type=int, default=2,
                   help="convolution module expansion (its channels: dim * expansion)")
    p.add_argument("--kernel", type=int, default=5, help="depthwise convolution taps")
    a = p.parse_args(argv)
    try:
        from soundstorm.kernels import cpp
    except ImportError as e:
        print(f"skipped: the C++ extension is not built ({e})")
        return 0
    cpp.gumbel_table()  # built once per process; not part of a call's cost
    print(f"masked_resample, T={a.frames} C={a.codes}, logits N(0, {a.scale:g}**2), "
          f"{torch.get_num_threads()} threads, "
          f"AVX-512 kernels: {cpp._C.avx512_kernels()}")
    print(f"{'B':>3} {'mode':>8} {'torch ms':>10} {'cpp ms':>10} {'speed-up':>9}")
    for batch in a.batches:
        for sampled in (True, False):
            r = bench_case(batch, a.frames, a.codes, sampled, a.rounds, a.inner,
                           cpp.masked_resample, a.scale)
            print(f"{batch:>3} {'sampled' if sampled else 'greedy':>8} {r['torch_ms']:>10.3f} "
                  f"{r['cpp_ms']:>10.3f} {r['speedup']:>8.2f}x")
    print(f"\nLayer ops, T={a.frames} D={a.dim} E={a.dim * a.expansion} K={a.kernel}, "
          f"heads of 64 (int8_linear: D -> 2E; torch._int_mm against oneDNN on the "
          f"packed weight)")
    print(f"{'B':>3} {'op':>14} {'torch ms':>10} {'cpp ms':>10} {'speed-up':>9}")
    for batch in a.batches:
        for name, torch_ms, cpp_ms, speedup in bench_norm_ops(
                batch, a.frames, a.dim, a.expansion, a.kernel, a.rounds, a.inner, cpp):
            print(f"{batch:>3} {name:>14} {torch_ms:>10.3f} {cpp_ms:>10.3f} {speedup:>8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
