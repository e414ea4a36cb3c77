"""What int8 linear layers cost in quality, on the shipped demo model: `soundstorm demo`
runs (every schedule of its ablation) with float32 and with `quantize="int8"`, both on the
same backend and with the same decoding seeds, plus float32 with other seeds for the
run-to-run spread.

    python bench/int8_quality.py                          # 8 utterances, seeds 0 and 1
    python bench/int8_quality.py --utterances 2 --seeds 0 --no-speaker-similarity
    python bench/int8_quality.py --reuse             # finish an interrupted run

Prints (and writes to --out/int8_quality.json):
- token agreement of int8 with float32 over every generated token of every utterance:
  greedy (the level-wise greedy schedule 1,1,...,1: no randomness at all) and sampled
  (the default schedule 16,1,...,1, the same seed on both sides);
- the demo's figures (level-1 accuracy, mel distance, speaker similarity) of float32 and
  int8 side by side, per seed, with float32's spread over its seeds.
The runs go seed by seed (float32, then int8), each in its own folder under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from soundstorm.demo import ASSETS
from soundstorm.demo.run import run_demo

FIGURES = ("level1_accuracy", "mel_distance_db", "similarity_prompt_speaker",
           "similarity_other_speakers", "identified")


def agreement(dir_a: Path, dir_b: Path, schedule: str) -> dict:
    """Share of equal tokens between two demo runs' generated tokens of `schedule`."""
    same = total = 0
    per_level = None
    for a in sorted((dir_a / "utterances").glob(f"*-{schedule}.tokens.npy")):
        ta, tb = np.load(a), np.load(dir_b / "utterances" / a.name)
        eq = ta == tb
        same += int(eq.sum())
        total += eq.size
        per_level = eq.sum(0) if per_level is None else per_level + eq.sum(0)
    if total == 0:
        raise SystemExit(f"no {schedule} tokens in {dir_a}/utterances")
    frames = total // len(per_level)
    return {"agreement": same / total, "tokens": total,
            "per_level": [round(float(n) / frames, 4) for n in per_level]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="int8-quality", help="folder for the demo runs and JSON")
    p.add_argument("--backend", default="cpp", help="backend of both runs (default cpp)")
    p.add_argument("--utterances", type=int, default=8)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--no-speaker-similarity", dest="speaker_similarity", action="store_false")
    p.add_argument("--assets", default=str(ASSETS))
    p.add_argument("--reuse", action="store_true",
                   help="reuse runs already in --out (same backend, quantize, utterances)")
    args = p.parse_args(argv)
    out = Path(args.out)
    reports, dirs = {}, {}
    for seed in args.seeds:
        for quantize in (None, "int8"):
            name = f"{quantize or 'float32'}-seed{seed}"
            dirs[name] = out / name
            done = dirs[name] / "report.json"
            if args.reuse and done.is_file():
                report = json.loads(done.read_text())
                if (report["model"].get("quantize") == quantize
                        and report["model"]["backend"] == args.backend
                        and len(report["utterances"]) == args.utterances):
                    print(f"== {name}: reusing {done}", file=sys.stderr, flush=True)
                    reports[name] = report
                    continue
            print(f"== {name}", file=sys.stderr, flush=True)
            reports[name] = run_demo(dirs[name], assets=args.assets,
                                     utterances=args.utterances, seed=seed,
                                     speaker_similarity=args.speaker_similarity,
                                     progress=False, log=lambda _: None,
                                     backend=args.backend, quantize=quantize)
    s0 = args.seeds[0]
    result = {
        "backend": args.backend, "utterances": args.utterances, "seeds": args.seeds,
        "greedy_agreement": agreement(dirs[f"float32-seed{s0}"], dirs[f"int8-seed{s0}"],
                                      "greedy"),
        "sampled_agreement": {f"seed{s}": agreement(dirs[f"float32-seed{s}"],
                                                    dirs[f"int8-seed{s}"], "default")
                              for s in args.seeds},
        "figures": {},
    }
    if len(args.seeds) > 1:     # float32 against itself with another seed: the noise floor
        result["sampled_agreement_float32_other_seed"] = agreement(
            dirs[f"float32-seed{args.seeds[0]}"], dirs[f"float32-seed{args.seeds[1]}"],
            "default")
    for schedule in ("default", "greedy"):
        rows = {}
        for name, report in reports.items():
            fig = report["schedules"][schedule]
            rows[name] = {k: fig[k] for k in FIGURES if k in fig}
        result["figures"][schedule] = rows
    (out / "int8_quality.json").write_text(json.dumps(result, indent=1) + "\n")

    g = result["greedy_agreement"]
    print(f"demo model, backend {args.backend}, {args.utterances} utterances")
    print(f"token agreement int8 vs float32, greedy (1,...,1): {g['agreement']:.4f} of "
          f"{g['tokens']} tokens (per level {g['per_level']})")
    for seed, a in result["sampled_agreement"].items():
        print(f"token agreement int8 vs float32, sampled (default), {seed}: "
              f"{a['agreement']:.4f} (per level {a['per_level']})")
    if "sampled_agreement_float32_other_seed" in result:
        a = result["sampled_agreement_float32_other_seed"]
        print(f"  for scale: float32 seed {args.seeds[0]} vs seed {args.seeds[1]}: "
              f"{a['agreement']:.4f}")
    for schedule, rows in result["figures"].items():
        print(f"{schedule} schedule:")
        keys = [k for k in FIGURES if k in next(iter(rows.values()))]
        print(f"  {'run':<16}" + "".join(f"{k:>28}" for k in keys))
        for name, fig in rows.items():
            print(f"  {name:<16}" + "".join(f"{fig[k]:>28.4f}" for k in keys))
        fp32 = [fig for name, fig in rows.items() if name.startswith("float32")]
        if len(fp32) > 1:
            print(f"  {'float32 spread':<16}" + "".join(
                f"{max(f[k] for f in fp32) - min(f[k] for f in fp32):>28.4f}" for k in keys))
    print(f"wrote {out / 'int8_quality.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
