"""End-to-end decode speed of three ways to run the engine, measured in one run.

    python bench/gpu_bench.py                                   # paper, 30 s, batch 1 and 8, bf16, CUDA
    python bench/gpu_bench.py --batch 8 --repeats 10 --json-out gpu-bench.json
    python bench/gpu_bench.py --device cpu --preset tiny --seconds 1   # runs anywhere

Variants (each on a randomly initialised model of the preset; runtime does not depend on
the weights):

- `triton-graphs`: the Triton kernels, each decoding step replayed as a CUDA graph (the
  engine's default on CUDA);
- `torch-eager`: the PyTorch reference ops, every kernel launched from the host at every
  step (the baseline the others are compared with);
- `torch-compile`: the PyTorch reference ops with the model under
  `torch.compile(mode="max-autotune")` (which captures its own CUDA graphs on CUDA), the
  resampling eager.

Each variant decodes every batch size once to warm up (compilation, autotuning, graph
capture; excluded), then once greedily (temperature 0, no noise) to compare its tokens with
the eager baseline's. The timed rounds alternate: round r runs every variant at every batch
size, one after the other, so a burst of load on the machine hits all of them. Reported per
variant and batch: median, min and max wall time of the default decode (16 + Q - 1 forward
passes), real-time factor, seconds of audio per second, achieved TFLOP/s from the analytic
count, the speed-up over the eager baseline (median of the per-round ratios), the greedy
token agreement with it, and, on an H100 or H200, the roofline prediction of
`bench/gpu_prediction.py`. A variant that cannot run here (no CUDA, no Triton, a failed
compilation) is reported as skipped with the reason.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_prediction  # noqa: E402

from soundstorm.engine import DecodeConfig, Engine, ModelConfig  # noqa: E402
from soundstorm.engine.benchmark import (bench_inputs, machine_info, source_commit,  # noqa: E402
                                         synchronize)
from soundstorm.engine.engine import resolve_dtype  # noqa: E402
from soundstorm.engine.flops import forward_flops  # noqa: E402

BASELINE = "torch-eager"
VARIANTS = ("triton-graphs", BASELINE, "torch-compile")
DESCRIPTIONS = {
    "triton-graphs": "Triton kernels, each step replayed as a CUDA graph where on CUDA",
    BASELINE: "PyTorch reference ops, eager, no CUDA graphs (the baseline)",
    "torch-compile": "PyTorch reference ops, model under torch.compile, eager steps",
}
GREEDY = DecodeConfig(temperature=0.0, gumbel_scale=0.0)


def reason(error: BaseException) -> str:
    """One line saying why something failed."""
    text = str(error).strip().splitlines()
    line = f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def build_variant(name: str, preset: str, device: torch.device, dtype: torch.dtype,
                  max_batch: int, compile_mode: str) -> Engine:
    """The engine of one variant; raises when it cannot run here."""
    if name == "triton-graphs":
        # The engine's default on CUDA: each step replayed from a CUDA graph.
        return Engine.from_preset(preset, device=device, dtype=dtype, backend="triton",
                                  max_batch=max_batch)
    if name not in (BASELINE, "torch-compile"):
        raise ValueError(f"unknown variant {name!r}; choose from {list(VARIANTS)}")
    # The eager baseline (and the compiled model's step): no CUDA graph around the step,
    # every kernel is launched from the host.
    engine = Engine.from_preset(preset, device=device, dtype=dtype, backend="torch",
                                max_batch=max_batch, cuda_graphs=False)
    if name == "torch-compile":
        # One compiled graph per batch size (no dynamic shapes); on CUDA, max-autotune
        # captures CUDA graphs itself, so the steps around it stay eager.
        engine.model = torch.compile(engine.model, mode=compile_mode, dynamic=False)
    return engine


def warm_up(engine: Engine, batches: List[int], frames: int) -> dict:
    """The engine's own warm-up for what the benchmark decodes: the batch buckets of
    `batches`, lengths up to `frames`, the default and the greedy schedule (on CUDA with
    graphs: every step graph captured before timing)."""
    return engine.warmup(batch_sizes=sorted(set(batches)), max_frames=frames,
                         decodes=[DecodeConfig(), GREEDY])


def _warmup_summary(report: Optional[dict]) -> Optional[dict]:
    if report is None:
        return None
    return {"graphs": report["graphs"], "seconds": round(report["seconds"], 3),
            "pool_bytes": report["pool_bytes"],
            "pool_bytes_estimate": report["pool_bytes_estimate"]}


def timed(engine: Engine, semantic: torch.Tensor, seed: int,
          decode: Optional[DecodeConfig] = None) -> Tuple[float, torch.Tensor]:
    synchronize(engine.device)
    start = time.perf_counter()
    tokens = engine.generate(semantic, decode=decode, seed=seed)
    synchronize(engine.device)
    return time.perf_counter() - start, tokens


def predictions(config: ModelConfig, seconds: float, batches: List[int],
                device: torch.device) -> Dict[str, Dict[int, float]]:
    """Predicted ms per decode of the graph and eager variants on an H100 or H200."""
    if device.type != "cuda":
        return {}
    name = torch.cuda.get_device_name(device).upper()
    gpu = next((g for key, g in gpu_prediction.GPUS.items() if key.upper() in name), None)
    if gpu is None:
        return {}
    graphs = gpu_prediction.Assumptions()
    eager = gpu_prediction.Assumptions(cuda_graphs=False)
    return {
        "triton-graphs": {b: gpu_prediction.predict(config, seconds, b, gpu, graphs, True)
                          ["ms_per_decode"] for b in batches},
        BASELINE: {b: gpu_prediction.predict(config, seconds, b, gpu, eager, False)
                   ["ms_per_decode"] for b in batches},
    }


def run(preset: str = "paper", seconds: float = 30.0, batches: List[int] = (1, 8),
        dtype: str = "bfloat16", device: Optional[str] = None, repeats: int = 5,
        variants: List[str] = VARIANTS, compile_mode: str = "max-autotune",
        progress: bool = True) -> dict:
    """Measure every variant at every batch size; returns the report (see the module
    docstring)."""
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    batches = sorted(set(batches))
    if not batches or any(isinstance(b, bool) or not isinstance(b, int) or b < 1
                          for b in batches):
        raise ValueError(f"batch sizes must be ints >= 1, got {batches}")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    variants = [v for v in VARIANTS if v in variants]
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise ValueError(f"device {device!r} is not a torch device ({e})") from e
    torch_dtype = resolve_dtype(dtype)
    config = ModelConfig.preset(preset)
    frames = config.frames_for(math.ceil(seconds * config.semantic_rate))   # as bench_inputs
    if frames > config.max_frames:
        raise ValueError(f"{seconds:g} s is {frames} frames, more than the preset's "
                         f"max_frames={config.max_frames}")

    def say(message: str) -> None:
        if progress:
            tqdm.write(message, file=sys.stderr)

    engines: Dict[str, Engine] = {}
    skipped: Dict[str, Dict[int, str]] = {v: {} for v in variants}
    for name in variants:
        try:
            engines[name] = build_variant(name, preset, device, torch_dtype, max(batches),
                                          compile_mode)
        except Exception as error:  # any failure to set a variant up is reported, not raised
            skipped[name] = {b: reason(error) for b in batches}
            say(f"{name}: skipped ({skipped[name][batches[0]]})")
    inputs = {b: bench_inputs(engines[next(iter(engines))], seconds, b) for b in batches} \
        if engines else {}

    def alive(name: str, batch: int) -> bool:
        return name in engines and batch not in skipped[name]

    # Warm-up and the greedy decode (both untimed).
    greedy: Dict[str, Dict[int, torch.Tensor]] = {v: {} for v in variants}
    warmups: Dict[str, dict] = {}
    for name in engines:
        try:
            warmups[name] = warm_up(engines[name], batches, frames)
        except Exception as error:
            skipped[name] = {b: f"warmup() failed: {reason(error)}" for b in batches}
            continue
        for b in batches:
            say(f"{name}: warm-up at batch {b}")
            try:
                timed(engines[name], inputs[b], seed=0)
                greedy[name][b] = timed(engines[name], inputs[b], 0, GREEDY)[1].cpu()
            except Exception as error:
                skipped[name][b] = reason(error)
                say(f"{name}: skipped at batch {b} ({skipped[name][b]})")

    walls: Dict[str, Dict[int, List[Optional[float]]]] = {
        v: {b: [] for b in batches} for v in variants}
    runs = [(r, b, name) for r in range(repeats) for b in batches for name in variants]
    bar = tqdm(total=sum(alive(n, b) for _, b, n in runs), desc="timed decodes",
               unit="decode", disable=not progress, file=sys.stderr)
    for r, b, name in runs:
        if not alive(name, b):
            continue
        try:
            walls[name][b].append(timed(engines[name], inputs[b], seed=r + 1)[0])
        except Exception as error:
            skipped[name][b] = reason(error)
        bar.update(1)
    bar.close()

    passes = DecodeConfig().num_forward_passes(config.num_quantizers)
    predicted = predictions(config, seconds, batches, device)
    report = {
        "settings": {"preset": preset, "seconds": seconds, "frames": frames,
                     "batches": batches, "dtype": str(torch_dtype).replace("torch.", ""),
                     "device": str(device), "repeats": repeats, "forward_passes": passes,
                     "compile_mode": compile_mode},
        "machine": machine_info(), "commit": source_commit(), "variants": {},
    }
    for name in variants:
        engine = engines.get(name)
        entry = {"description": DESCRIPTIONS[name],
                 "backend": engine.backend if engine else None,
                 "cuda_graphs": engine.runner.use_cuda_graphs if engine else None,
                 "warmup": _warmup_summary(warmups.get(name)),
                 "batches": {}}
        for b in batches:
            if b in skipped[name]:
                entry["batches"][str(b)] = {"skipped": skipped[name][b]}
                continue
            times = walls[name][b]
            wall = statistics.median(times)
            audio = b * frames / config.frame_rate
            cell = {"skipped": None, "wall_s": wall, "wall_s_min": min(times),
                    "wall_s_max": max(times), "rounds": len(times),
                    "real_time_factor": wall / audio, "audio_s_per_s": audio / wall,
                    "achieved_tflops": passes * forward_flops(config, b, frames) / wall / 1e12}
            if alive(BASELINE, b):
                base = walls[BASELINE][b]
                cell["speedup_vs_eager"] = statistics.median(
                    e / t for e, t in zip(base, times))
                if name != BASELINE:
                    cell["greedy_agreement_vs_eager"] = float(
                        (greedy[name][b] == greedy[BASELINE][b]).double().mean())
            if name in predicted:
                cell["predicted_ms"] = predicted[name][b]
            entry["batches"][str(b)] = cell
        report["variants"][name] = entry
    report["summary"] = summary_line(report)
    return report


def summary_line(report: dict) -> str:
    s = report["settings"]
    parts = [f"{s['preset']} {s['seconds']:g}s {s['dtype']} {s['device']}"]
    for b in s["batches"]:
        cells = []
        for name, entry in report["variants"].items():
            cell = entry["batches"][str(b)]
            if cell["skipped"]:
                cells.append(f"{name} skipped")
                continue
            text = f"{name} {cell['wall_s'] * 1e3:.1f} ms {cell['audio_s_per_s']:.3g} audio-s/s"
            if name != BASELINE and "speedup_vs_eager" in cell:
                text += (f" x{cell['speedup_vs_eager']:.2f}"
                         f" agree {cell['greedy_agreement_vs_eager']:.3f}")
            cells.append(text)
        parts.append(f"b{b}: " + ", ".join(cells))
    reasons = sorted({f"{name}: {cell['skipped']}"
                      for name, entry in report["variants"].items()
                      for cell in entry["batches"].values() if cell["skipped"]})
    if reasons:
        parts.append("skipped " + "; ".join(reasons))
    return " | ".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="paper", choices=ModelConfig.preset_names())
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (default: 5)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--compile-mode", default="max-autotune",
                   help="torch.compile mode of the torch-compile variant (default: max-autotune)")
    p.add_argument("--json-out", type=Path, default=None, help="write the report here")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    a = p.parse_args(argv)
    try:
        report = run(a.preset, a.seconds, a.batch, a.dtype, a.device, a.repeats, a.variants,
                     a.compile_mode, progress=not a.quiet)
    except ValueError as e:
        p.error(str(e))
    if a.json_out:
        a.json_out.parent.mkdir(parents=True, exist_ok=True)
        a.json_out.write_text(json.dumps(report, indent=2) + "\n")
    print(report["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
