"""Memory that CUDA-graph pools hold for a preset, from the analytic step-activation
estimate (`soundstorm.engine.runner.step_activation_bytes`): the engine's one shared pool
(about the largest bucket's step) against one private pool per captured graph, which is
what capturing every (bucket, mode) separately costs (twice over with two runners).

    python bench/graph_memory.py                         # paper, small; max_batch 1, 8, 32
    python bench/graph_memory.py --preset paper --max-batch 8 --dtype float32 --json

On a GPU, `Engine.warmup()` reports the pool it measured (`pool_bytes`) next to this
estimate (`pool_bytes_estimate`); `make gpu-check` records both.
"""

from __future__ import annotations

import argparse
import json

import torch

from soundstorm.engine import DecodeConfig, ModelConfig
from soundstorm.engine.engine import resolve_dtype
from soundstorm.engine.runner import modes_for, step_activation_bytes
from soundstorm.engine.scheduler import batch_buckets, length_buckets


def pool_sizes(preset: str, max_batch: int, dtype: torch.dtype, backend: str) -> dict:
    cfg = ModelConfig.preset(preset)
    buckets = [(b, t) for b in batch_buckets(max_batch) for t in length_buckets(cfg.max_frames)]
    modes = len(modes_for([DecodeConfig()], cfg.num_quantizers))
    per_bucket = [step_activation_bytes(cfg, b, t, dtype, backend) for b, t in buckets]
    return {"preset": preset, "max_batch": max_batch, "dtype": str(dtype).replace("torch.", ""),
            "backend": backend, "buckets": len(buckets), "graphs": len(buckets) * modes,
            "shared_pool_bytes": max(per_bucket),
            "private_pools_bytes": modes * sum(per_bucket)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", nargs="+", default=["paper", "small"], choices=["paper", "small", "tiny"])
    p.add_argument("--max-batch", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--backend", default="triton", choices=["torch", "triton"])
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    for b in args.max_batch:
        if b < 1:
            p.error(f"--max-batch must be >= 1, got {b}")
    rows = [pool_sizes(pr, b, resolve_dtype(d), args.backend)
            for pr in args.preset for d in args.dtype for b in args.max_batch]
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{'preset':7} {'dtype':9} {'max_batch':>9} {'graphs':>6} {'one shared pool':>16} "
          f"{'a pool per graph':>17}")
    for r in rows:
        print(f"{r['preset']:7} {r['dtype']:9} {r['max_batch']:9d} {r['graphs']:6d} "
              f"{r['shared_pool_bytes'] / 2**30:13.2f} GiB {r['private_pools_bytes'] / 2**30:14.2f} GiB")


if __name__ == "__main__":
    main()
