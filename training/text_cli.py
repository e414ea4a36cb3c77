"""`soundstorm train-text`: train the text-to-semantic model on a tokenized corpus with
transcripts (texts.jsonl, written by `soundstorm tokenize` from manifests with "text").

    soundstorm train-text --data tokens/train --out text-run/ --preset small --steps 2000
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional, Sequence

from soundstorm.engine.text_model import TextModelConfig
from soundstorm.training.cli import _check_outputs, _run, add_progress_flags

MODEL_FLAGS = ("dim", "heads", "encoder_layers", "decoder_layers", "ff_dim", "max_text_len",
               "max_semantic_len")
NUMBERS = (("steps", int), ("batch_size", int), ("lr", float), ("warmup_steps", int),
           ("decay_steps", int), ("decay_rate", float), ("weight_decay", float),
           ("grad_clip", float), ("prompt_probability", float), ("val_fraction", float),
           ("seed", int), ("log_every", int), ("val_every", int), ("checkpoint_every", int),
           ("keep_checkpoints", int))


def train_text_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="soundstorm train-text",
        description="Train the text-to-semantic model (a byte-level encoder-decoder) on the "
                    "(transcript, semantic ids) pairs of a tokenized corpus. Resumable: run "
                    "the same command again and it continues from the newest checkpoint in "
                    "--out. Writes OUT/model/ (what `soundstorm say --text-model` loads), "
                    "metrics.jsonl, curves.png and checkpoints/.",
        epilog="example: soundstorm train-text --data tokens/train --out text-run/ --steps 2000")
    p.add_argument("--data", required=True, metavar="DIR",
                   help="corpus directory from soundstorm tokenize, with texts.jsonl")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory")
    p.add_argument("--val-data", metavar="DIR", help="validation corpus (default: hold out "
                                                     "--val-fraction of --data)")
    p.add_argument("--preset", default="small", choices=TextModelConfig.preset_names())
    for name in MODEL_FLAGS:
        p.add_argument("--" + name.replace("_", "-"), type=int, metavar="N",
                       help=f"model {name} (default: the preset's)")
    p.add_argument("--dropout", type=float, metavar="P", help="model dropout (default 0)")
    for name, typ in NUMBERS:
        p.add_argument("--" + name.replace("_", "-"), type=typ, metavar="X",
                       help=f"{name} (default {_default(name)})")
    p.add_argument("--resume", default="auto", metavar="auto|never|DIR")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_progress_flags(p)
    return p


def _default(name: str):
    from soundstorm.training.text_trainer import TextTrainConfig
    return TextTrainConfig.__dataclass_fields__[name].default


def cmd_train_text(argv: Sequence[str]) -> int:
    args = train_text_parser().parse_args(argv)
    prog = "soundstorm train-text"
    _check_outputs(prog, {"--out": args.out})

    def work():
        from soundstorm.training.corpus import CORPUS_FILE
        from soundstorm.training.text_trainer import TextTrainConfig, train_text
        from pathlib import Path

        if not (Path(args.data) / CORPUS_FILE).is_file():
            raise ValueError(f"--data {args.data}: not a tokenized corpus (no {CORPUS_FILE}); "
                             "make one with soundstorm tokenize")
        settings = {"data": args.data, "out": args.out, "val_data": args.val_data,
                    "preset": args.preset, "resume": args.resume, "device": args.device,
                    "model": {"semantic_vocab_size": _corpus_vocab(args.data),
                              "semantic_rate": _corpus_rate(args.data),
                              **{k: getattr(args, k) for k in MODEL_FLAGS + ("dropout",)
                                 if getattr(args, k) is not None}}}
        settings.update({k: getattr(args, k) for k, _ in NUMBERS if getattr(args, k) is not None})
        if args.progress is not None:
            settings["progress"] = args.progress
        return train_text(TextTrainConfig(**settings))

    summary = _run(prog, {"--data": args.data, "--out": args.out, "--val-data": args.val_data},
                   work, errors=(ValueError, TypeError, RuntimeError))
    if int(os.environ.get("RANK", "0")) != 0:   # under torchrun rank 0 alone reports
        return 0
    val = summary.get("validation") or {}
    train = summary.get("train") or {}
    line = f"text model at step {summary['step']} of {summary['steps']}: {summary['model']}"
    if train:
        line += f"; train loss {train['loss']:.3f}, accuracy {train['acc']:.3f}"
    if val:
        line += f"; validation loss {val['val_loss']:.3f}, accuracy {val['val_acc']:.3f}"
    print(line)
    if args.json:
        print(json.dumps(summary))
    return 0


def _corpus_meta(directory: str) -> dict:
    from pathlib import Path

    from soundstorm.training.corpus import CORPUS_FILE
    return json.loads((Path(directory) / CORPUS_FILE).read_text())


def _corpus_vocab(directory: str) -> int:
    return int(_corpus_meta(directory)["semantic_vocab_size"])


def _corpus_rate(directory: str) -> float:
    return float(_corpus_meta(directory)["semantic_rate"])


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cmd_train_text(list(argv or []))
