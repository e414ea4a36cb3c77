"""Analytic memory traffic and FLOPs of each fused op, PyTorch reference vs Triton
kernel, for one decode step of a preset (default: `paper`, 30 s = 1500 frames, batch 1,
bf16 activations, C = 1024 logits per frame).

    python bench/op_costs.py                      # paper preset, 30 s
    python bench/op_costs.py --preset small --seconds 10 --json

Bytes count compulsory DRAM traffic of every full pass over an activation tensor: each
PyTorch op reads its inputs and writes its output once; a Triton kernel reads and writes
once in all (halo rows, re-read key blocks and the rotary tables are served from cache
and not counted). Passes over O(T) tensors (ids, masks, lengths) are small and included
only where they are the kernel's whole input. Weights are not part of these ops.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import List, Tuple

from soundstorm.engine.config import ModelConfig

INT64, FLOAT32 = 8, 4


@dataclass
class OpCost:
    name: str
    per_pass: int                    # how many times one forward pass / iteration runs it
    reference: List[Tuple[str, float]] = field(default_factory=list)   # (pass, bytes)
    fused: List[Tuple[str, float]] = field(default_factory=list)
    flops: float = 0.0

    @property
    def reference_bytes(self) -> float:
        return sum(b for _, b in self.reference)

    @property
    def fused_bytes(self) -> float:
        return sum(b for _, b in self.fused)

    @property
    def saved_bytes(self) -> float:
        return self.reference_bytes - self.fused_bytes


def op_costs(config: ModelConfig, frames: int, batch: int = 1, act_bytes: int = 2,
             sample: bool = True, padded: bool = False) -> List[OpCost]:
    """Costs of one call of each op at [batch, frames]; `sample` = a sampled iteration
    (else greedy), `padded` = the batch has padding (a frame mask exists)."""
    T, B, Q, C = frames, batch, config.num_quantizers, config.codebook_size
    D, E, K, H, dh = config.dim, config.conv_dim, config.conv_kernel, config.heads, config.head_dim
    act = B * T * D * act_bytes                 # one [B, T, D] activation
    ids = B * T * Q * INT64                     # the [B, T, Q] token ids
    costs = []

    rows = (Q + 1) * B * T * D * act_bytes      # the gathered table rows
    costs.append(OpCost("summed_embedding", 1, reference=[
        ("row index arithmetic (add, compare, where on [B,T,Q] int64)", 7 * ids),
        ("semantic embedding: gather, write", B * T * D * act_bytes + act),
        ("embedding_bag over Q levels: gather, write", Q * B * T * D * act_bytes + act),
        ("add: read 2, write 1", 3 * act),
    ], fused=[
        ("ids", ids + B * T * INT64),
        ("gathered rows", rows),
        ("write [B,T,D]", act),
    ], flops=Q * B * T * D))

    qkv = 3 * act
    costs.append(OpCost("rotary_attention", config.depth, reference=[
        ("rotary on q: 4 half-size multiplies, add/sub, cat", 9 * act),
        ("rotary on k", 9 * act),
        ("attention (flash-style ideal: read q, k, v, write o)", qkv + act),
        ("output transpose copy for the out-projection", 2 * act),
    ], fused=[
        ("read q, k, v as strided views of the QKV output", qkv),
        ("write o in [B,T,H,dh] layout", act),
    ], flops=4 * B * H * T * T * dh + 2 * 6 * B * T * D))

    n_e = B * T * E * act_bytes                  # one [B, T, E] tensor
    reference = [("GLU: read 2E, write E", 3 * n_e)]
    if padded:
        reference.append(("zero padded frames", 2 * n_e))
    reference += [
        ("pad by K//2 frames", 2 * n_e),
        ("first tap (addcmul)", 2 * n_e),
        (f"{K - 1} further taps (addcmul_: read y and x, write y)", (K - 1) * 3 * n_e),
        ("LayerNorm", 2 * n_e),
        ("swish (in place)", 2 * n_e),
    ]
    costs.append(OpCost("conv_module", config.depth, reference=reference, fused=[
        ("read h [B,T,2E]", 2 * n_e), ("write [B,T,E]", n_e)],
        flops=B * T * E * (2 * K + 4 + 8 + 4)))

    n_l = B * T * C                              # logits per iteration
    reference = [("logits.float(): read, write fp32", n_l * (act_bytes + FLOAT32))]
    if sample:
        reference += [
            ("code keys: xor of frame and code keys, write int64", n_l * INT64),
            ("mix32: 3 shifts, 3 xors, 2 multiplies, 2 masks on int64", n_l * 184),
            ("to_uniform: shift, to float, add, scale", n_l * 44),
            ("to_gumbel: log, neg, log, neg", n_l * 32),
            ("scores / temperature + noise", n_l * 20),
        ]
    reference += [
        ("argmax", n_l * FLOAT32),
        ("logsumexp (max, then sum of exp)", n_l * 2 * FLOAT32),
    ]
    costs.append(OpCost("masked_resample", 1, reference=reference, fused=[
        ("read the logits once", n_l * act_bytes),
        ("tokens, eligible, seeds; candidates and keys; output", B * T * (3 * INT64 + 1 + 8)),
    ], flops=n_l * ((30 if sample else 0) + 6)))
    costs.append(OpCost("residual_norm", 4 * config.depth, reference=[
        ("residual add: read 2, write 1", 3 * act), ("LayerNorm: read, write", 2 * act),
    ], fused=[("read x and delta", 2 * act), ("write the sum and its norm", 2 * act)],
        flops=B * T * D * 9))
    return costs


def summary(config: ModelConfig, frames: int, batch: int = 1, act_bytes: int = 2) -> dict:
    """Per-op and per-forward-pass totals (a sampled iteration, no padding)."""
    ops = op_costs(config, frames, batch, act_bytes)
    rows = [{"op": c.name, "calls_per_pass": c.per_pass,
             "reference_MB": c.reference_bytes / 1e6, "fused_MB": c.fused_bytes / 1e6,
             "saved_MB": c.saved_bytes / 1e6, "GFLOP": c.flops / 1e9,
             "fused_flop_per_byte": c.flops / c.fused_bytes} for c in ops]
    saved = sum(c.saved_bytes * c.per_pass for c in ops)
    return {"preset_frames": frames, "batch": batch, "act_bytes": act_bytes, "ops": rows,
            "saved_MB_per_pass": saved / 1e6,
            "reference_MB_per_pass": sum(c.reference_bytes * c.per_pass for c in ops) / 1e6,
            "fused_MB_per_pass": sum(c.fused_bytes * c.per_pass for c in ops) / 1e6}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="paper", choices=ModelConfig.preset_names())
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    a = p.parse_args()
    cfg = ModelConfig.preset(a.preset)
    frames = min(round(a.seconds * cfg.frame_rate), cfg.max_frames)
    s = summary(cfg, frames, a.batch)
    print(f"{a.preset} preset, {frames} frames, batch {a.batch}, bf16 activations; "
          "per call (MB = 1e6 bytes)")
    print(f"{'op':<18} {'calls/pass':>10} {'reference MB':>13} {'Triton MB':>10} "
          f"{'saved MB':>9} {'GFLOP':>8} {'FLOP/byte':>10}")
    for r in s["ops"]:
        print(f"{r['op']:<18} {r['calls_per_pass']:>10} {r['reference_MB']:>13.1f} "
              f"{r['fused_MB']:>10.1f} {r['saved_MB']:>9.1f} {r['GFLOP']:>8.2f} "
              f"{r['fused_flop_per_byte']:>10.1f}")
    print(f"per forward pass + sampled iteration: reference {s['reference_MB_per_pass']:.0f} MB, "
          f"Triton {s['fused_MB_per_pass']:.0f} MB, saved {s['saved_MB_per_pass']:.0f} MB")
    if a.json:
        print(json.dumps(s))


if __name__ == "__main__":
    main()
