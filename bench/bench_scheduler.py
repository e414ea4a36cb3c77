"""Continuous batching against one-at-a-time decoding: throughput (seconds of audio per wall
second) and per-request latency, by number of concurrent requests and length mix.

    python bench/bench_scheduler.py                                   # small preset, CPU
    python bench/bench_scheduler.py --preset tiny --concurrency 1 4 --mixes short --out /tmp/s

For each (mix, concurrency c): c requests with lengths drawn from the mix arrive together.
The scheduler decodes them with continuous batching (max_batch = c); the baseline decodes
them one after another with `Engine.generate`, in the same process right after, on the
same inputs. Latency is the time from arrival to that request's tokens. Writes
scheduler.json and scheduler.png to --out (default bench-results/).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from soundstorm.engine import Engine, ModelConfig
from soundstorm.engine.benchmark import machine_info
from soundstorm.engine.scheduler import Scheduler

MIXES = {"short": (2.0, 4.0), "mixed": (2.0, 12.0), "long": (8.0, 12.0)}


def draw_requests(cfg: ModelConfig, count: int, mix: str, seed: int) -> list[torch.Tensor]:
    lo, hi = MIXES[mix]
    rnd = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        seconds = min(rnd.uniform(lo, hi), cfg.max_frames / cfg.frame_rate)
        S = max(1, int(seconds * cfg.semantic_rate))
        out.append(torch.randint(0, cfg.semantic_vocab_size, (S,), generator=g))
    return out


def run_scheduler(engine: Engine, semantics: list[torch.Tensor]) -> tuple[float, list[float]]:
    scheduler = Scheduler(engine, max_batch=len(semantics), threaded=False)
    start = time.perf_counter()
    handles = [scheduler.submit(s, seed=i) for i, s in enumerate(semantics)]
    latency = [0.0] * len(handles)
    while scheduler.step():
        now = time.perf_counter() - start
        for i, h in enumerate(handles):
            if h.done() and not latency[i]:
                latency[i] = now
    return time.perf_counter() - start, latency


def run_sequential(engine: Engine, semantics: list[torch.Tensor]) -> tuple[float, list[float]]:
    start = time.perf_counter()
    latency = []
    for i, s in enumerate(semantics):
        engine.generate(s[None], seed=i)
        latency.append(time.perf_counter() - start)
    return time.perf_counter() - start, latency


def measure(preset: str, concurrency: list[int], mixes: list[str]) -> dict:
    engine = Engine.from_preset(preset)
    cfg = engine.config
    warm = draw_requests(cfg, 2, "short", 0)
    run_scheduler(engine, warm)
    run_sequential(engine, warm)
    rows = []
    cases = [(m, c) for m in mixes for c in concurrency]
    for mix, c in tqdm(cases, desc="cases", file=sys.stderr):
        semantics = draw_requests(cfg, c, mix, seed=c)
        audio = sum(cfg.frames_for(s.shape[0]) for s in semantics) / cfg.frame_rate
        sched_wall, sched_lat = run_scheduler(engine, semantics)
        seq_wall, seq_lat = run_sequential(engine, semantics)
        rows.append({
            "mix": mix, "concurrency": c, "audio_s": audio,
            "scheduler_wall_s": sched_wall, "sequential_wall_s": seq_wall,
            "scheduler_throughput": audio / sched_wall, "sequential_throughput": audio / seq_wall,
            "throughput_ratio": seq_wall / sched_wall,
            "scheduler_latency_median_s": statistics.median(sched_lat),
            "scheduler_latency_max_s": max(sched_lat),
            "sequential_latency_median_s": statistics.median(seq_lat),
            "sequential_latency_max_s": max(seq_lat),
        })
    return {"preset": preset, "threads": torch.get_num_threads(), "machine": machine_info(),
            "rows": rows}


def table(result: dict) -> str:
    lines = ["| mix | concurrent | audio (s) | throughput sched / seq (audio s per s) | ratio | "
             "median latency sched / seq (s) | max latency sched / seq (s) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['mix']} | {r['concurrency']} | {r['audio_s']:.1f} | "
            f"{r['scheduler_throughput']:.2f} / {r['sequential_throughput']:.2f} | "
            f"{r['throughput_ratio']:.2f}x | {r['scheduler_latency_median_s']:.1f} / "
            f"{r['sequential_latency_median_s']:.1f} | {r['scheduler_latency_max_s']:.1f} / "
            f"{r['sequential_latency_max_s']:.1f} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for mix in dict.fromkeys(r["mix"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["mix"] == mix]
        cs = [r["concurrency"] for r in rows]
        axes[0].plot(cs, [r["scheduler_throughput"] for r in rows], "o-", label=f"scheduler, {mix}")
        axes[0].plot(cs, [r["sequential_throughput"] for r in rows], "s--", label=f"one at a time, {mix}")
        axes[1].plot(cs, [r["scheduler_latency_median_s"] for r in rows], "o-", label=f"scheduler, {mix}")
        axes[1].plot(cs, [r["sequential_latency_median_s"] for r in rows], "s--", label=f"one at a time, {mix}")
    axes[0].set(xlabel="concurrent requests", ylabel="audio seconds per wall second",
                title="Throughput")
    axes[1].set(xlabel="concurrent requests", ylabel="median latency (s)", title="Latency")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{result['preset']} preset, {result['machine']['cpu'][:40]}, "
                 f"{result['threads']} threads", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", choices=ModelConfig.preset_names())
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--mixes", nargs="+", default=["short", "mixed"], choices=sorted(MIXES))
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    a = p.parse_args()
    result = measure(a.preset, a.concurrency, a.mixes)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "scheduler.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, a.out / "scheduler.png")
    print(table(result))
    print(f"wrote {a.out / 'scheduler.json'}, {a.out / 'scheduler.png'}")


if __name__ == "__main__":
    main()
