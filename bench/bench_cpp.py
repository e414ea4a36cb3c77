"""Masked resampling on the CPU: the C++ kernel (backend "cpp") vs the PyTorch reference,
at the small preset's shapes (T = 500 frames, C = 1024 codes), batch 1 and 8, sampled
(with confidence noise) and greedy.

    python bench/bench_cpp.py                  # T=500, C=1024, batches 1 and 8
    python bench/bench_cpp.py --scale 10             # more peaked logits
    python bench/bench_cpp.py --frames 7 --codes 11 --batches 1 2 --rounds 3

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

from soundstorm.kernels.resample import masked_resample_reference


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
    return 0


if __name__ == "__main__":
    sys.exit(main())
