"""The XLA path against the torch path in one run, and its predicted TPU-v4 time.

    python bench/bench_xla.py                              # small preset, 10 s, batch 1
    python bench/bench_xla.py --preset tiny --seconds 2 --repeats 1 --json
    python bench/bench_xla.py --agreement                  # + agreement on the demo model
    python bench/bench_xla.py --predict-only               # only the TPU-v4 prediction

Measured on this machine, same weights and inputs for both: the torch engine
(`backend="torch"`) and `XlaEngine` (the whole decode as one jitted program). Compile time
is reported separately (ahead-of-time `lower(...).compile()` of the decode for these
shapes); the timed rounds run the compiled program, torch and XLA alternating so both see
the same load, and the ratio is the median of per-round ratios. The tokens of both are
compared (the same seed gives the same tokens where the logits agree).

Predicted: the paper preset decoding 30 s on one TPU-v4 chip, from the FLOP/byte table of
every op of a pass that `gpu_prediction.py` uses (`pass_loads`: the engine's analytic
matmul FLOPs and the fused ops' bytes), held against the peaks of a TPU-v4 chip and the
assumptions below, against the paper's "30 s of audio in 0.5 s on a TPU-v4". Nothing in
the prediction is measured.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from gpu_prediction import Assumptions, Gpu, predict  # noqa: E402

from soundstorm.engine import DecodeConfig, Engine, ModelConfig  # noqa: E402
from soundstorm.engine.benchmark import bench_inputs  # noqa: E402

# One TPU-v4 chip (two TensorCores): 275 TFLOP/s bf16 on the MXUs, 1.2 TB/s HBM2e
# (published). The vector units' float32 rate is not published as one figure; 8 TFLOP/s
# is an estimate (2 cores x 8 x 128 lanes x a few ALUs at 1.05 GHz), and barely matters:
# the decode is matmul- and bandwidth-bound.
TPU_V4 = Gpu("TPU v4 (1 chip)", tensor_tflops=275.0, vector_tflops=8.0, hbm_tb_per_s=1.2)
# XLA fuses each matmul with its elementwise neighbours and runs the whole decode as one
# program: no host launches, a short gap between fusions.
TPU_ASSUMPTIONS = Assumptions(matmul_fraction=0.6, attention_fraction=0.4, vector_fraction=0.5,
                              bandwidth_fraction=0.8, gap_us=1.5, launch_us=0.0,
                              cuda_graphs=True)
PAPER_SECONDS = 0.5   # the paper: 30 s of audio in 0.5 s on a TPU-v4


def predict_tpu(preset: str = "paper", seconds: float = 30.0, batch: int = 1,
                act_bytes: int = 2) -> dict:
    """act_bytes 2: bfloat16 weights and activations (the paper's setting,
    `XlaEngine(dtype="bfloat16")`); 4: float32, `XlaEngine`'s default (on a TPU its matmuls
    still run bf16 passes on the MXU at XLA's default precision, but every byte is read
    twice over)."""
    cfg = ModelConfig.preset(preset)
    p = predict(cfg, seconds, batch, TPU_V4, TPU_ASSUMPTIONS, act_bytes=act_bytes)
    # The table's attention is a fused (flash) kernel: `kernels="pallas"`. XLA's own
    # attention writes the float32 scores of every layer to HBM and reads them back at
    # least once more: the least that costs on top.
    scores = 2 * batch * cfg.heads * p["bucket_frames"] ** 2 * 4 * cfg.depth
    p["xla_attention_extra_ms"] = (p["forward_passes"] * scores / (
        TPU_V4.hbm_tb_per_s * 1e12 * TPU_ASSUMPTIONS.bandwidth_fraction) * 1e3)
    p["paper_seconds"] = PAPER_SECONDS
    return p


def measure(preset: str, seconds: float, batch: int, repeats: int) -> dict:
    import jax

    from soundstorm.engine.xla import XlaEngine
    from soundstorm.engine.xla.decode import sharded_program

    torch_engine = Engine.from_preset(preset, backend="torch")
    xla_engine = XlaEngine(torch_engine.model)
    cfg = torch_engine.config
    semantic = bench_inputs(torch_engine, seconds, batch)
    frames = cfg.frames_for(semantic.shape[1])
    decode = DecodeConfig()

    start = time.perf_counter()
    _, arrays, schedule = xla_engine.inputs(semantic, decode=decode, seed=0)
    # the program `XlaEngine.generate` runs, compiled ahead of time for these shapes
    compiled = sharded_program(xla_engine.mesh, cfg).lower(
        xla_engine.params, *arrays, schedule, xla_engine.table).compile()
    compile_s = time.perf_counter() - start

    def run_xla(seed: int):
        t0 = time.perf_counter()
        _, arrays, schedule = xla_engine.inputs(semantic, decode=decode, seed=seed)
        out = compiled(xla_engine.params, *arrays, schedule, xla_engine.table)
        jax.block_until_ready(out)
        return time.perf_counter() - t0

    def run_torch(seed: int):
        t0 = time.perf_counter()
        torch_engine.generate(semantic, decode=decode, seed=seed)
        return time.perf_counter() - t0

    run_xla(0)                  # warm-up: first run of the compiled program
    run_torch(0)
    xla_s, torch_s = [], []
    for r in range(repeats):
        torch_s.append(run_torch(r + 1))
        xla_s.append(run_xla(r + 1))
    ratios = [t / x for t, x in zip(torch_s, xla_s)]
    a = torch_engine.generate(semantic, decode=decode, seed=7)
    b = xla_engine.generate(semantic, decode=decode, seed=7)
    audio = batch * frames / cfg.frame_rate
    return {
        "preset": preset, "seconds": seconds, "batch": batch, "frames": frames,
        "forward_passes": decode.num_forward_passes(cfg.num_quantizers), "repeats": repeats,
        "threads": torch.get_num_threads(), "jax_backend": jax.default_backend(),
        "compile_s": compile_s,
        "torch_s": statistics.median(torch_s), "xla_s": statistics.median(xla_s),
        "torch_s_min": min(torch_s), "xla_s_min": min(xla_s),
        "speedup_xla_over_torch": statistics.median(ratios),
        "speedup_min": min(ratios), "speedup_max": max(ratios),
        "torch_rtf": statistics.median(torch_s) / audio,
        "xla_rtf": statistics.median(xla_s) / audio,
        "token_agreement": float((a == b).double().mean()),
    }


def agreement(rows: int = 8, seconds: float = 5.0, prompt_seconds: float = 1.5) -> dict:
    """Logits and tokens of torch and XLA on the shipped demo model: random semantic ids
    and prompts (the model's vocabularies), ragged lengths, one seed per row."""
    import jax.numpy as jnp
    import numpy as np

    from soundstorm.demo import ASSETS
    from soundstorm.engine.xla import XlaEngine
    from soundstorm.engine.xla import model as xla_model

    torch_engine = Engine(ASSETS / "model", backend="torch")
    xla_engine = XlaEngine(ASSETS / "model")
    cfg = torch_engine.config
    g = torch.Generator().manual_seed(0)
    S = round(seconds * cfg.semantic_rate)
    semantic = torch.randint(0, cfg.semantic_vocab_size, (rows, S), generator=g)
    sem_len = torch.randint(S // 2, S + 1, (rows,), generator=g)
    sem_len[0] = S
    P = round(prompt_seconds * cfg.frame_rate)
    prompt = torch.randint(0, cfg.codebook_size, (rows, P, cfg.num_quantizers), generator=g)
    kw = dict(semantic_lengths=sem_len, prompt=prompt, seed=list(range(rows)))

    T = cfg.frames_for(S)
    tokens = torch.randint(0, cfg.codebook_size + 1, (rows, T, cfg.num_quantizers), generator=g)
    lengths = torch.tensor([cfg.frames_for(int(s)) for s in sem_len])
    with torch.no_grad():
        want = torch_engine.model(semantic, tokens, lengths, level=None).numpy()
    got = np.asarray(xla_model.forward(
        xla_engine.params, cfg, jnp.asarray(semantic.numpy(), jnp.int32),
        jnp.asarray(tokens.numpy(), jnp.int32), jnp.asarray(lengths.numpy(), jnp.int32), None))
    valid = np.arange(T)[None, :] < lengths.numpy()[:, None]
    diff = np.abs(got - want)[valid]
    result = {"model": str(ASSETS / "model"), "rows": rows, "seconds": seconds,
              "logits_max_abs_diff": float(diff.max()),
              "logits_max_abs": float(np.abs(want[valid]).max()),
              "argmax_agreement": float((got.argmax(-1) == want.argmax(-1))[valid].mean())}
    for name, decode in (("greedy", DecodeConfig(temperature=0)), ("sampled", DecodeConfig()),
                         ("sampled_8_steps", DecodeConfig(steps_per_level=(8, 2, 2, 2)))):
        a = torch_engine.generate(decode=decode, semantic=semantic, **kw)
        b = xla_engine.generate(decode=decode, semantic=semantic, **kw)
        real = a >= 0
        result[f"{name}_token_agreement"] = float((a == b)[real].double().mean())
        result[f"{name}_rows_identical"] = int(sum(torch.equal(a[i], b[i]) for i in range(rows)))
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", choices=ModelConfig.preset_names())
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--agreement", action="store_true",
                   help="also compare torch and XLA on the shipped demo model")
    p.add_argument("--predict-only", action="store_true", help="only the TPU-v4 prediction")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    a = p.parse_args(argv)
    if not (a.seconds > 0 and math.isfinite(a.seconds)):
        p.error(f"--seconds must be a finite number > 0, got {a.seconds}")
    if a.batch < 1 or a.repeats < 1:
        p.error("--batch and --repeats must be >= 1")
    report = {}
    if not a.predict_only:
        m = measure(a.preset, a.seconds, a.batch, a.repeats)
        report["measured"] = m
        print(f"{m['preset']} preset, {m['seconds']:g} s ({m['frames']} frames), batch "
              f"{m['batch']}, {m['forward_passes']} passes, float32 on this CPU "
              f"({m['threads']} threads), median of {m['repeats']}")
        print(f"  torch      {m['torch_s']:.3f} s  (real-time factor {m['torch_rtf']:.3g})")
        print(f"  xla        {m['xla_s']:.3f} s  (real-time factor {m['xla_rtf']:.3g}); "
              f"compile {m['compile_s']:.2f} s, once per (batch, length) shape")
        print(f"  speed-up   {m['speedup_xla_over_torch']:.2f}x XLA over torch (per-round min "
              f"{m['speedup_min']:.2f}, max {m['speedup_max']:.2f}); tokens agree on "
              f"{m['token_agreement']:.4f}")
    if a.agreement:
        r = agreement()
        report["agreement"] = r
        print(f"demo model ({r['rows']} rows, {r['seconds']:g} s): logits max |diff| "
              f"{r['logits_max_abs_diff']:.2e} (max |logit| {r['logits_max_abs']:.1f}), argmax "
              f"agreement {r['argmax_agreement']:.5f}")
        for name in ("greedy", "sampled", "sampled_8_steps"):
            print(f"  {name:<16} tokens agree {r[name + '_token_agreement']:.5f}, rows "
                  f"identical {r[name + '_rows_identical']}/{r['rows']}")
    for name, act_bytes in (("bfloat16", 2), ("float32", 4)):
        t = predict_tpu(act_bytes=act_bytes)
        report[f"tpu_v4_{name}"] = t
        print(f"predicted TPU v4 (1 chip), paper preset, 30 s, batch 1, {name}: "
              f"{t['ms_per_decode']:.0f} ms ({t['forward_passes']} passes x "
              f"{t['ms_per_pass']:.2f} ms; compute limit {t['compute_limit_ms']:.0f} ms, "
              f"bandwidth limit {t['bandwidth_limit_ms']:.0f} ms) against the paper's "
              f"{PAPER_SECONDS * 1e3:.0f} ms, with the Pallas attention; XLA's own attention "
              f"adds at least {t['xla_attention_extra_ms']:.0f} ms (scores through HBM)")
    if a.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
