"""Per-op speed, PyTorch reference vs Triton kernel, at a preset's shapes, on one GPU.

    python bench/bench_ops.py                       # paper preset, 30 s, batch 1, bf16
    python bench/bench_ops.py --batch 4 --dtype float16 --json

Needs CUDA: without a GPU it prints that it was skipped and exits 0 (the kernels are
checked on CPU by the test suite, in Triton's interpreter, where timings mean nothing).
Reference and kernel calls alternate round by round on the same inputs, so both see the
same GPU state; each sample is the mean of `--inner` back-to-back calls timed with CUDA
events, warm-up (compilation, autotuning-free) excluded. Reports the median with min and
max over rounds, the speed-up as the median of per-round ratios, and the bandwidth the
kernel achieves on its compulsory traffic (`bench/op_costs.py`).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from op_costs import op_costs  # noqa: E402

from soundstorm.engine import ModelConfig  # noqa: E402
from soundstorm.engine.engine import resolve_dtype  # noqa: E402
from soundstorm.kernels import get_ops  # noqa: E402


def make_inputs(cfg: ModelConfig, frames: int, batch: int, dtype: torch.dtype,
                device: torch.device, seed: int = 0) -> Dict[str, Tuple]:
    """The arguments of each op at [batch, frames], as the model passes them."""
    g = torch.Generator().manual_seed(seed)
    B, T, Q, C, D = batch, frames, cfg.num_quantizers, cfg.codebook_size, cfg.dim
    H, dh, E, K = cfg.heads, cfg.head_dim, cfg.conv_dim, cfg.conv_kernel
    num, den = cfg.semantic_index_fraction()
    S = (T - 1) * num // den + 1

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    tokens = torch.randint(0, C, (B, T, Q), generator=g)
    tokens[:, :, 1:] = C                                   # decoding level 1
    qkv = randn(B, T, 3, H, dh)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    logits = randn(B, T, C, scale=3.0)
    eligible = torch.ones(B, T, dtype=torch.bool, device=device)
    # First of 16 iterations: keep n - floor(n cos(pi/32)).
    keep = T - math.floor(T * math.cos(math.pi / 2 / 16))
    return {
        "summed_embedding": (
            torch.randint(0, cfg.semantic_vocab_size, (B, S), generator=g).to(device),
            tokens.to(device), randn(cfg.semantic_vocab_size, D, scale=0.02),
            randn(Q * C + 1, D, scale=0.02), num, den),
        "rotary_attention": (q, k, v, None),
        "conv_module": (randn(B, T, 2 * E), randn(E, 1, K, scale=0.3), randn(E, scale=0.1),
                        randn(E, scale=0.1) + 1, randn(E, scale=0.1), None, 1e-5),
        "masked_resample": (
            logits, torch.full((B, T), C, dtype=torch.int64, device=device), eligible,
            torch.full((B,), keep, dtype=torch.int64, device=device),
            torch.arange(B, dtype=torch.int64, device=device), 1, 1, 1.0, 1.0 - 1 / 16, True),
        "residual_norm": (randn(B, T, D), randn(B, T, D), 0.5, randn(D, scale=0.1) + 1,
                          randn(D, scale=0.1), 1e-5),
    }


def _timer(device: torch.device) -> Callable[[Callable[[], object], int], float]:
    def timed(fn: Callable[[], object], inner: int) -> float:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / inner
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t0) / inner
    return timed


def run(preset: str, seconds: float, batch: int, dtype: str, repeats: int, inner: int,
        device: str = "cuda") -> List[dict]:
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype)
    cfg = ModelConfig.preset(preset)
    frames = min(round(seconds * cfg.frame_rate), cfg.max_frames)
    inputs = make_inputs(cfg, frames, batch, torch_dtype, device)
    reference, triton_ops = get_ops("torch", device), get_ops("triton", device)
    costs = {c.name: c for c in op_costs(cfg, frames, batch,
                                         torch.finfo(torch_dtype).bits // 8)}
    timed = _timer(device)
    rows = []
    with torch.no_grad():
        for name, args in inputs.items():
            ref_fn = lambda: getattr(reference, name)(*args)          # noqa: E731
            tri_fn = lambda: getattr(triton_ops, name)(*args)         # noqa: E731
            ref_fn(), tri_fn()                                        # warm-up, compile
            ref_t, tri_t, ratios = [], [], []
            for _ in range(repeats):
                ref_t.append(timed(ref_fn, inner))
                tri_t.append(timed(tri_fn, inner))
                ratios.append(ref_t[-1] / tri_t[-1])
            tri_med = statistics.median(tri_t)
            rows.append({
                "op": name, "preset": preset, "frames": frames, "batch": batch,
                "dtype": dtype, "device": str(device),
                "reference_ms": statistics.median(ref_t) * 1e3,
                "reference_ms_min": min(ref_t) * 1e3, "reference_ms_max": max(ref_t) * 1e3,
                "triton_ms": tri_med * 1e3, "triton_ms_min": min(tri_t) * 1e3,
                "triton_ms_max": max(tri_t) * 1e3,
                "speedup": statistics.median(ratios),
                "triton_GBps": costs[name].fused_bytes / tri_med / 1e9,
            })
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="paper", choices=ModelConfig.preset_names())
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--inner", type=int, default=10)
    p.add_argument("--json", action="store_true", help="print one JSON list as the last line")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_ops: no CUDA device; skipped (per-op timings need a GPU)")
        return
    rows = run(a.preset, a.seconds, a.batch, a.dtype, a.repeats, a.inner)
    print(f"{a.preset} preset, {rows[0]['frames']} frames, batch {a.batch}, {a.dtype}, "
          f"{torch.cuda.get_device_name()}")
    print(f"{'op':<18} {'reference ms':>20} {'triton ms':>20} {'speed-up':>9} {'GB/s':>7}")
    for r in rows:
        print(f"{r['op']:<18} {r['reference_ms']:>8.3f} [{r['reference_ms_min']:.3f}, "
              f"{r['reference_ms_max']:.3f}] {r['triton_ms']:>8.3f} [{r['triton_ms_min']:.3f}, "
              f"{r['triton_ms_max']:.3f}] {r['speedup']:>8.2f}x {r['triton_GBps']:>7.0f}")
    if a.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
