"""Export a demo training run as the demo's assets.

    python -m soundstorm.demo.export WORK [--dest DIR]

WORK is the folder `demo/reproduce.sh` builds in (speech/, codec/, semantic/, run/, and
text-run/ for the text-to-semantic model, exported as text-model/). The SoundStorm model
exported is the first of: WORK/calibrated (a model with its copy gates calibrated by
`soundstorm calibrate-copy`; `demo.json` records the calibration), WORK/run-lookup/model
(run/'s model given a prompt lookup and fine-tuned; `demo.json` records both runs),
WORK/run/model. The
model is stored in float16 (the engine loads it as float32), which halves its size; the
codec codebooks and semantic k-means are copied as they are, and `demo.json` records what
the demo needs to draw held-out speech (corpus seed, held-out voices and sentences) plus
the run's final training and validation figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch

from soundstorm.demo import ASSETS

TEXT_MODEL = "text-model"


def export_assets(work: Any, dest: Any = ASSETS) -> Dict[str, Any]:
    from soundstorm.engine.model import SoundStorm

    work, dest = Path(work), Path(dest)
    for part in ("speech/speech-corpus.json", "codec", "semantic", "run/model",
                 "run/metrics.jsonl"):
        if not (work / part).exists():
            raise FileNotFoundError(f"{work / part} is missing: run demo/reproduce.sh first")
    corpus = json.loads((work / "speech/speech-corpus.json").read_text())
    calibrated, lookup = work / "calibrated", work / "run-lookup"
    source = (calibrated if (calibrated / "config.json").is_file()
              else lookup / "model" if (lookup / "model/config.json").is_file()
              else work / "run/model")
    model = SoundStorm.from_pretrained(source, dtype=torch.float16)
    dest.mkdir(parents=True, exist_ok=True)
    for part in ("model", "codec", "semantic"):
        if (dest / part).exists():
            shutil.rmtree(dest / part)
    model.save_pretrained(dest / "model")
    # the codec with its vocoder (and the vocoder's training record, not its plot)
    shutil.copytree(work / "codec", dest / "codec", ignore=shutil.ignore_patterns("*.png"))
    shutil.copytree(work / "semantic", dest / "semantic")
    held = corpus["heldout"]
    settings = {
        "corpus_seed": corpus["seed"],
        "corpus_minutes": corpus["train"]["minutes"],
        "corpus_voices": [v["name"] for v in corpus["voices"] if not v["heldout"]],
        "heldout_voices": held["voices"],
        # Every voice whole (accent and variant, pitch, speed, formant warp), so that the
        # demo can speak in any of them again.
        "voices": corpus["voices"],
        "heldout_stream_offset": held["stream_offset"],
        "heldout_sentences_used": held["utterances"],
        "espeak_version": corpus["espeak_version"],
        "training": run_figures(work / "run/metrics.jsonl"),
        "reproduce": "bash demo/reproduce.sh",
    }
    if (lookup / "metrics.jsonl").is_file():
        settings["lookup_training"] = run_figures(lookup / "metrics.jsonl")
    if source == calibrated:
        from soundstorm.training.copy_calibration import REPORT_FILE
        report = json.loads((calibrated / REPORT_FILE).read_text())
        settings["copy_calibration"] = {k: report[k] for k in
                                        ("utterances", "prompt_seconds", "semantic_copy_added",
                                         "prompt_prior_added", "levels") if k in report}
    if (work / "text-run/model").is_dir():
        settings["text_model"] = export_text_model(work, dest)
    times = work / "stage-times.tsv"
    if times.is_file():  # reproduce.sh's seconds per stage, summed over resumed runs
        stages: Dict[str, int] = {}
        for name, _, seconds in (line.partition("\t") for line in times.read_text().splitlines()):
            if seconds.isdigit():
                stages[name] = stages.get(name, 0) + int(seconds)
        settings["stage_seconds"] = stages
    (dest / "demo.json").write_text(json.dumps(settings, indent=1) + "\n")
    return settings


def run_figures(metrics: Path) -> Dict[str, Any]:
    """A SoundStorm training run's steps and final training and validation figures."""
    from soundstorm.training.trainer import read_metrics

    records = read_metrics(metrics)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    return {
        "steps": train[-1]["step"] if train else 0,
        "final_train": {k: train[-1][k] for k in ("loss", "acc", "acc_level")
                        if train and k in train[-1]},
        "final_validation": {k: val[-1][k] for k in val[-1] if k.startswith("val_")}
        if val else {},
    }


def export_text_model(work: Path, dest: Path) -> Dict[str, Any]:
    """The text-to-semantic run (WORK/text-run) as DEST/text-model, in float16 (the pipeline
    loads it as float32); returns its final figures for demo.json."""
    from soundstorm.engine.text_model import TextToSemantic
    from soundstorm.training.trainer import read_metrics

    model = TextToSemantic.from_pretrained(work / "text-run/model", dtype=torch.float16)
    if (dest / TEXT_MODEL).exists():
        shutil.rmtree(dest / TEXT_MODEL)
    model.save_pretrained(dest / TEXT_MODEL)
    records = read_metrics(work / "text-run/metrics.jsonl")
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    return {"steps": train[-1]["step"] if train else 0,
            "parameters": sum(p.numel() for p in model.parameters()),
            "final_train": {k: train[-1][k] for k in ("loss", "acc") if train},
            "final_validation": {k: val[-1][k] for k in ("val_loss", "val_acc", "val_tokens")
                                 if val}}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("work", help="the folder reproduce.sh built in")
    p.add_argument("--dest", default=str(ASSETS), help=f"assets folder (default {ASSETS})")
    args = p.parse_args(argv)
    settings = export_assets(args.work, args.dest)
    size = sum(f.stat().st_size for f in Path(args.dest).rglob("*") if f.is_file()
               and f.parent.name in ("model", "codec", "semantic", TEXT_MODEL))
    print(f"exported to {args.dest} ({size / 2**20:.1f} MiB): trained "
          f"{settings['training']['steps']} steps on {settings['corpus_minutes']:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
