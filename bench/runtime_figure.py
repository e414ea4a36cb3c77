"""The paper's runtime comparison (Figure 3) on this machine: SoundStorm's level-wise
parallel decode against the AudioLM-style autoregressive acoustic generator of the same
width and depth (bench/ar_baseline.py), for 5-30 s of audio.

    python bench/runtime_figure.py                                  # small preset, 5/10/20/30 s
    python bench/runtime_figure.py --lengths 5 10 --out results/ --repeats 1

Writes to --out (default bench-results/): runtime.json, runtime.md (the table) and
runtime.png (runtime against audio length, log scale, as in the paper), and prints the
table with the speed-up at each length. Lengths are measured in increasing order, each
SoundStorm run right before the AR run of the same length, so both see the same load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ar_baseline import AudioLMAcoustic  # noqa: E402

from soundstorm.engine import DecodeConfig, Engine, ModelConfig  # noqa: E402
from soundstorm.engine.benchmark import bench_inputs, machine_info  # noqa: E402


def measure(preset: str, lengths: list[float], repeats: int, ar_repeats: int) -> dict:
    cfg = ModelConfig.preset(preset)
    engine = Engine.from_preset(preset)
    ar = AudioLMAcoustic(cfg, max_seconds=max(lengths))
    engine_passes = DecodeConfig().num_forward_passes(cfg.num_quantizers)
    rows = []
    warm = bench_inputs(engine, 1.0, 1)
    engine.generate(warm, seed=0)
    ar.generate(warm[:, :5])
    for seconds in tqdm(sorted(lengths), desc="lengths", unit="len", file=sys.stderr):
        semantic = bench_inputs(engine, seconds, 1)
        frames = cfg.frames_for(semantic.shape[1])
        ss = []
        for r in range(repeats):
            start = time.perf_counter()
            engine.generate(semantic, seed=r)
            ss.append(time.perf_counter() - start)
        ar_s = []
        for r in range(ar_repeats):
            start = time.perf_counter()
            ar.generate(semantic, seed=r)
            ar_s.append(time.perf_counter() - start)
        s, a = statistics.median(ss), statistics.median(ar_s)
        rows.append({
            "seconds": seconds, "frames": frames, "soundstorm_s": s, "soundstorm_passes":
            engine_passes, "ar_s": a, "ar_passes": ar.forward_passes(frames),
            "soundstorm_rtf": s / seconds, "ar_rtf": a / seconds, "speedup": a / s,
            "soundstorm_runs": ss, "ar_runs": ar_s,
        })
    return {"preset": preset, "threads": torch.get_num_threads(), "machine": machine_info(),
            "coarse_levels": ar.coarse_levels, "fine_window_frames": ar.window, "rows": rows}


def table(result: dict) -> str:
    lines = [f"| audio (s) | SoundStorm (s) | AR baseline (s) | SoundStorm RTF | AR RTF | speed-up |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['seconds']:g} | {r['soundstorm_s']:.2f} | {r['ar_s']:.1f} | "
                     f"{r['soundstorm_rtf']:.3f} | {r['ar_rtf']:.2f} | {r['speedup']:.1f}x |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["seconds"] for r in result["rows"]]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot(xs, [r["ar_s"] for r in result["rows"]], "s-", label="AudioLM-style AR acoustic "
            f"generator ({result['coarse_levels']} coarse levels + fine windows)")
    ax.plot(xs, [r["soundstorm_s"] for r in result["rows"]], "o-",
            label=f"SoundStorm ({result['rows'][0]['soundstorm_passes']} passes)")
    ax.set_yscale("log")
    ax.set(xlabel="audio length (s)", ylabel="runtime (s, log scale)",
           title=f"Runtime on {result['machine']['cpu'][:40]} ({result['threads']} threads), "
                 f"{result['preset']} preset")
    ax.title.set_fontsize(9)
    for r in result["rows"]:
        ax.annotate(f"{r['speedup']:.0f}x", (r["seconds"], r["soundstorm_s"]),
                    textcoords="offset points", xytext=(0, -14), ha="center", fontsize=8)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", choices=ModelConfig.preset_names())
    p.add_argument("--lengths", type=float, nargs="+", default=[5, 10, 20, 30])
    p.add_argument("--repeats", type=int, default=2, help="SoundStorm runs per length")
    p.add_argument("--ar-repeats", type=int, default=1, help="AR runs per length")
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    a = p.parse_args()
    result = measure(a.preset, a.lengths, a.repeats, a.ar_repeats)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "runtime.json").write_text(json.dumps(result, indent=2) + "\n")
    (a.out / "runtime.md").write_text(table(result) + "\n")
    plot(result, a.out / "runtime.png")
    print(table(result))
    print(f"wrote {a.out / 'runtime.json'}, {a.out / 'runtime.md'}, {a.out / 'runtime.png'}")


if __name__ == "__main__":
    main()
