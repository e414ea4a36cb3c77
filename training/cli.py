"""The training subcommands of `soundstorm` (loaded only when one of them runs).

  soundstorm train --preset tiny --data corpus/train --val-data corpus/val --out run/
  soundstorm synthetic-corpus corpus/ --utterances 2000
  soundstorm speech-corpus speech/ --minutes 40
  soundstorm fit-codec speech/ --out codec/
  soundstorm fit-semantic speech/ --out semantic/ [--kind hubert --model-path DIR]
  soundstorm tokenize speech/ --codec melrvq --codec-path codec/ --semantic semantic/ \
      --out tokens/

Every command fails the same way: one line on stderr, "soundstorm COMMAND: error: ...",
naming the argument and the path or value at fault, and exit status 2. Every command
takes --no-progress (alias --quiet): no progress bars, the result line still printed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

from soundstorm.engine.config import ModelConfig
from soundstorm.training.config import TrainConfig, load_config_file
from soundstorm.training.paths import OutputPathError, check_output_dir


def _numbers(text: str) -> tuple:
    """'2,1,1,1' -> (2.0, 1.0, 1.0, 1.0), for flags that take one number per level."""
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got "
                                         f"{text!r}") from None


# (setting, type, metavar, help). Every flag overrides the preset and the --config file.
_FLAGS = [
    ("data", str, "DIR", "training corpus directory (corpus.json + manifest.jsonl + shards)"),
    ("val_data", str, "DIR", "validation corpus directory"),
    ("val_fraction", float, "F", "hold out this fraction of --data for validation instead"),
    ("val_batches", int, "N", "validate on at most N batches per process (0 = all)"),
    ("out", str, "DIR", "run directory: checkpoints/, model/, metrics.jsonl, curves.png"),
    ("init_from", str, "DIR", "fine-tune the model in DIR (config.json + model.safetensors, "
                              "e.g. demo/model): its config and weights; a fresh optimizer; "
                              "with --prompt-lookup K it gains a lookup, freshly initialised"),
    ("steps", int, "N", "optimizer steps in all (a resumed run continues up to N)"),
    ("batch_size", int, "N", "windows per optimizer step, over all processes"),
    ("grad_accum", int, "N", "micro-batches per step (memory: each is batch/(procs*N))"),
    ("lr", float, "LR", "peak learning rate (AdamW)"),
    ("weight_decay", float, "WD", "AdamW weight decay (matrices and embeddings only)"),
    ("warmup_steps", int, "N", "linear warm-up steps"),
    ("decay_steps", int, "N", "after warm-up, lr *= decay_rate every N steps (smoothly)"),
    ("decay_rate", float, "R", "exponential decay factor per decay_steps"),
    ("grad_clip", float, "NORM", "clip the global gradient norm (0 = off)"),
    ("level_weights", _numbers, "W,W,...", "how often each RVQ level is trained, coarse to "
                                           "fine, e.g. 2,1,1,1 (default: uniformly, the paper's)"),
    ("level_weights_end", _numbers, "W,W,...", "the level weights at the last step: each "
                                               "level's share moves linearly to these from "
                                               "--level-weights' (default: no change)"),
    ("finer_full_mask", float, "P", "share of rows training a level > 1 that mask all of it "
                                    "after the prompt, as one-pass decoding asks (0 = the "
                                    "paper's cosine ratio)"),
    ("min_seconds", float, "S", "shortest training window"),
    ("max_seconds", float, "S", "longest training window (paper: 30)"),
    ("join_utterances", int, "N", "join each utterance to its speaker's next N-1, so windows "
                                  "and prompts span sentences as in a long recording (1 = off)"),
    ("bucket_batches", int, "N", "sort windows by length within groups of N batches (0 = off)"),
    ("num_workers", int, "N", "data-loading worker processes per training process"),
    ("on_bad_shard", str, "raise|skip", "a missing/corrupt shard: fail (default) or skip it "
                                        "with a warning"),
    ("seed", int, "N", "seed of the initialisation, data order, windows and masks"),
    ("device", str, "DEV", "auto (cuda:LOCAL_RANK if a GPU is visible, else cpu), cpu, cuda"),
    ("dtype", str, "D", "auto (bf16 autocast on CUDA, fp32 on CPU), float32, bfloat16"),
    ("log_every", int, "N", "log training metrics every N steps"),
    ("val_every", int, "N", "validate every N steps"),
    ("checkpoint_every", int, "N", "write a checkpoint every N steps"),
    ("keep_checkpoints", int, "K", "keep the newest K checkpoints"),
    ("resume", str, "auto|never|DIR", "auto: continue from the newest checkpoint in --out "
                                      "that loads, if there is one; never; or a checkpoint "
                                      "directory"),
]


def _model_size_flags() -> List[tuple]:
    """(field, type) of every int or float ModelConfig field: each is a flag of `train`."""
    types = {"int": int, "float": float, int: int, float: float}
    found = []
    for f in dataclasses.fields(ModelConfig):
        typ = types.get(f.type)
        if typ is not None:
            found.append((f.name, typ))
    return found


# -- shared by every command -----------------------------------------------------------
def add_progress_flags(p: argparse.ArgumentParser) -> None:
    """--no-progress and its alias --quiet: no progress bars (the result is still printed)."""
    p.add_argument("--no-progress", "--quiet", dest="progress", action="store_false",
                   default=None, help="no progress bars (alias: --quiet)")


def _fail(prog: str, message: str) -> None:
    sys.stderr.write(f"{prog}: error: {message}\n")
    raise SystemExit(2)


def describe_os_error(error: OSError, arguments: Dict[str, Any]) -> str:
    """One line for an OS error, naming the argument whose path it concerns.

    arguments: argument label (e.g. "--out") -> the path or paths it gave. The error's
    file is matched to the argument whose path is that file or a folder above it.
    """
    if error.errno is None:     # raised here with its own message, which names the path
        return str(error) or type(error).__name__
    reason = error.strerror or str(error)
    filename = error.filename
    if filename is None:
        outputs = ", ".join(f"{k} {v}" for k, v in arguments.items() if k.startswith("--out")
                            or k == "OUT")
        return f"{reason}" + (f" (writing {outputs})" if outputs else "")
    target = os.path.abspath(os.fsdecode(filename))
    best, best_len = None, -1
    for label, values in arguments.items():
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if value is None:
                continue
            root = os.path.abspath(os.fspath(value))
            if (target == root or target.startswith(root.rstrip(os.sep) + os.sep)) \
                    and len(root) > best_len:
                best, best_len = (label, value), len(root)
    if best is None:
        return f"{os.fsdecode(filename)}: {reason}"
    label, value = best
    where = "" if os.path.abspath(os.fspath(value)) == target else f": {os.fsdecode(filename)}"
    return f"{label} {value}: {reason}{where}"


@contextlib.contextmanager
def _plain_warnings(prog: str) -> Iterator[None]:
    """Warnings of this package print as one line, "prog: warning: ..."."""
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if category.__module__.startswith("soundstorm"):
            sys.stderr.write(f"{prog}: warning: {message}\n")
        else:
            original(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original


def _run(prog: str, arguments: Dict[str, Any], work: Callable[[], Any],
         errors: tuple = (ValueError, TypeError)) -> Any:
    """Run `work`; an error of the kinds expected ends the command with one line."""
    try:
        with _plain_warnings(prog):
            return work()
    except OSError as e:
        _fail(prog, describe_os_error(e, arguments))
    except errors as e:
        _fail(prog, str(e))


def _check_outputs(prog: str, outputs: Dict[str, Any]) -> None:
    for label, path in outputs.items():
        try:
            check_output_dir(path, label)
        except OutputPathError as e:
            _fail(prog, str(e))


def _deprecated(prog: str, old: str, new: str) -> None:
    sys.stderr.write(f"{prog}: warning: {old} is deprecated; use {new}\n")


# -- train ----------------------------------------------------------------------------
def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="soundstorm train",
        description="Train a SoundStorm model on a tokenized corpus (masking of paper §3.2; "
                    "AdamW with linear warm-up and exponential decay). Settings come from a "
                    "preset, then an optional --config file (JSON or YAML), then flags. The "
                    "model the engine loads is written to OUT/model. Multi-GPU and multi-node: "
                    "launch the same command with torchrun (see the README).",
        epilog="examples:\n"
               "  soundstorm synthetic-corpus corpus/ --utterances 2000\n"
               "  soundstorm train --preset tiny --data corpus/train --val-data corpus/val "
               "--out run/\n"
               "  soundstorm train --preset tiny --init-from demo/model --data tokens/ "
               "--steps 200 --out finetune/\n"
               "  torchrun --nproc-per-node 8 -m soundstorm.cli train --preset paper "
               "--data tokens/ --val-fraction 0.001 --out run/",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True, choices=TrainConfig.preset_names(),
                   help="training preset: tiny (CPU, seconds), small, paper (§4.1); it also "
                        "names the model preset unless --model-preset says otherwise")
    p.add_argument("--config", metavar="FILE", help="JSON or YAML file of settings (names as "
                                                    "the flags, with underscores)")
    p.add_argument("--model-preset", dest="model", metavar="PRESET",
                   choices=ModelConfig.preset_names(),
                   help=f"model preset ({', '.join(ModelConfig.preset_names())}); the size "
                        "flags below change its fields")
    p.add_argument("--model", dest="model_deprecated", metavar="PRESET",
                   choices=ModelConfig.preset_names(), help=argparse.SUPPRESS)
    for name, typ, metavar, help_text in _FLAGS:
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, metavar=metavar,
                       help=help_text)
    p.add_argument("--allow-changed-data", dest="allow_changed_data", action="store_true",
                   default=None, help="resume even when the data or the batch settings differ "
                                      "from the checkpoint's (otherwise refused)")
    sizes = p.add_argument_group(
        "model size", "ModelConfig fields, applied over the model preset and the --config "
                      "file's model_overrides")
    for name, typ in _model_size_flags():
        sizes.add_argument("--" + name.replace("_", "-"), dest="size_" + name, type=typ,
                           metavar="N" if typ is int else "X", help=f"ModelConfig.{name}")
    add_progress_flags(p)
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    return p


def build_train_config(args: argparse.Namespace) -> TrainConfig:
    settings: Dict[str, Any] = {}
    if args.config:
        settings.update(load_config_file(args.config))
    if getattr(args, "model_deprecated", None) is not None:
        _deprecated("soundstorm train", "--model PRESET", "--model-preset PRESET")
        if args.model is not None and args.model != args.model_deprecated:
            raise ValueError(f"--model {args.model_deprecated} and --model-preset {args.model} "
                             "disagree; give --model-preset only")
        args.model = args.model_deprecated
    for name in [f[0] for f in _FLAGS] + ["model", "progress", "allow_changed_data"]:
        value = getattr(args, name, None)
        if value is not None:
            settings[name] = value
    sizes = {name: getattr(args, "size_" + name) for name, _ in _model_size_flags()
             if getattr(args, "size_" + name, None) is not None}
    if sizes:
        file_overrides = settings.get("model_overrides") or {}
        if not isinstance(file_overrides, dict):
            raise ValueError(f"model_overrides = {file_overrides!r}: expected a mapping of "
                             "ModelConfig fields")
        settings["model_overrides"] = {**file_overrides, **sizes}
    if settings.get("init_from") is not None and settings.get("model") is not None:
        raise ValueError(f"init_from = {settings['init_from']!r} takes the model from that "
                         f"directory, but model = {settings['model']!r} names a preset too; "
                         "give one of them")
    return TrainConfig.preset(args.preset, **settings)


def cmd_train(argv: Sequence[str]) -> int:
    parser = train_parser()
    args = parser.parse_args(argv)
    prog = "soundstorm train"
    from soundstorm.training import distributed as dist_utils
    from soundstorm.training.trainer import TrainingDivergedError, train

    config = _run(prog, {"--config": args.config}, lambda: build_train_config(args))
    arguments = {"--out": config.out, "--data": config.data, "--val-data": config.val_data,
                 "--init-from": config.init_from, "--config": args.config}
    if config.out is not None:
        _check_outputs(prog, {"--out": config.out})
    summary = _run(prog, arguments, lambda: train(config),
                   errors=(ValueError, TypeError, TrainingDivergedError))
    if dist_utils.launch_rank() != 0:
        return 0   # under torchrun, rank 0 alone reports
    print(train_summary_line(summary))
    if args.json:
        print(json.dumps(summary))
    return 0


def train_summary_line(summary: Dict[str, Any]) -> str:
    step, steps = summary["step"], summary["steps"]
    if summary["steps_run"] == 0:
        where = (f"already at step {step} of {steps}" if step == steps
                 else f"already at step {step}, past the {steps} steps asked for")
        return f"{where}; nothing to do. Model: {summary['model']}"
    t, v = summary["train"], summary["validation"]
    run = summary["steps_run"]
    line = f"trained to step {step} ({run} step{'s' if run != 1 else ''} this run)"
    if t:
        line += f": loss {t['loss']:.4f}, masked accuracy {t['acc']:.3f}"
    if v:
        line += f"; validation loss {v['val_loss']:.4f}, accuracy {v['val_acc']:.3f}"
    return f"{line}. Model: {summary['model']}"


# -- synthetic-corpus -----------------------------------------------------------------
def synthetic_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="soundstorm synthetic-corpus",
        description="Write a synthetic token corpus for tests and quick experiments: level-1 "
                    "tokens follow the semantic ids and a hidden speaker, finer levels follow "
                    "coarser ones, and the speaker shows only in the acoustic tokens (the "
                    "voice prompt). Writes OUT/train and OUT/val with the same speakers.",
        epilog="example: soundstorm synthetic-corpus corpus/ --utterances 2000 && "
               "soundstorm train --preset tiny --data corpus/train --val-data corpus/val "
               "--out run/")
    p.add_argument("out", metavar="OUT", help="directory to create")
    p.add_argument("--preset", default=None, choices=ModelConfig.preset_names(),
                   help="model preset whose token shapes and rates to match (default tiny)")
    p.add_argument("--model", dest="model_deprecated", choices=ModelConfig.preset_names(),
                   help=argparse.SUPPRESS)
    p.add_argument("--utterances", type=int, default=2000, help="training utterances (2000)")
    p.add_argument("--val-utterances", type=int, default=200, help="validation utterances (200)")
    p.add_argument("--speakers", type=int, default=4, help="hidden speakers (4)")
    p.add_argument("--noise", type=float, default=0.02, help="token noise probability (0.02)")
    p.add_argument("--min-seconds", type=float, default=1.0, help="shortest utterance (1.0)")
    p.add_argument("--max-seconds", type=float, default=3.0, help="longest utterance (3.0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the voices and utterances")
    add_progress_flags(p)
    return p


def _check_synthetic_args(args: argparse.Namespace) -> None:
    from soundstorm.training.synthetic import MAX_UTTERANCE_SECONDS, MAX_UTTERANCES

    if not 1 <= args.utterances <= MAX_UTTERANCES:
        raise ValueError(f"--utterances {args.utterances}: expected 1..{MAX_UTTERANCES:,}")
    if not 0 <= args.val_utterances <= MAX_UTTERANCES:
        raise ValueError(f"--val-utterances {args.val_utterances}: expected "
                         f"0..{MAX_UTTERANCES:,}")
    for flag, value in (("--min-seconds", args.min_seconds), ("--max-seconds", args.max_seconds)):
        if not (math.isfinite(value) and 0 < value <= MAX_UTTERANCE_SECONDS):
            raise ValueError(f"{flag} {value:g}: expected a length in seconds in "
                             f"(0, {MAX_UTTERANCE_SECONDS:g}]")
    if args.min_seconds > args.max_seconds:
        raise ValueError(f"--min-seconds {args.min_seconds:g} is above --max-seconds "
                         f"{args.max_seconds:g}")
    if not (math.isfinite(args.noise) and 0 <= args.noise < 1):
        raise ValueError(f"--noise {args.noise:g}: expected a probability in [0, 1)")


def _check_disk_space(args: argparse.Namespace, bytes_per_utterance: float) -> None:
    need = bytes_per_utterance * (args.utterances + args.val_utterances)
    probe = Path(args.out)
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise ValueError(f"OUT {args.out}: the corpus needs about {need / 2**30:.1f} GiB "
                         f"({args.utterances + args.val_utterances:,} utterances of "
                         f"{args.min_seconds:g}-{args.max_seconds:g} s), but "
                         f"{probe} has {free / 2**30:.1f} GiB free")


def cmd_synthetic(argv: Sequence[str]) -> int:
    parser = synthetic_parser()
    args = parser.parse_args(argv)
    prog = "soundstorm synthetic-corpus"
    from soundstorm.training.synthetic import SyntheticSpec, write_synthetic_corpus

    if args.model_deprecated is not None:
        _deprecated(prog, "--model PRESET", "--preset PRESET")
        if args.preset is not None and args.preset != args.model_deprecated:
            _fail(prog, f"--model {args.model_deprecated} and --preset {args.preset} disagree; "
                        "give --preset only")
        args.preset = args.model_deprecated
    preset = args.preset or "tiny"
    out = Path(args.out)
    _check_outputs(prog, {"OUT": out})

    def work() -> None:
        _check_synthetic_args(args)
        spec = SyntheticSpec.for_model(ModelConfig.preset(preset), num_speakers=args.speakers,
                                       noise=args.noise, min_seconds=args.min_seconds,
                                       max_seconds=args.max_seconds)
        _check_disk_space(args, spec.bytes_per_utterance())
        write_synthetic_corpus(out / "train", args.utterances, spec, seed=args.seed,
                               voice_seed=args.seed)
        if args.val_utterances:
            write_synthetic_corpus(out / "val", args.val_utterances, spec,
                                   seed=args.seed + 1_000_003, voice_seed=args.seed,
                                   prefix="val")

    _run(prog, {"OUT": str(out)}, work)
    print(f"wrote {args.utterances} training and {args.val_utterances} validation utterances "
          f"to {out}/train and {out}/val")
    return 0


# -- audio commands -------------------------------------------------------------------
_AUDIO_HELP = ("sound files, directories (searched recursively), .jsonl manifests "
               "({\"path\": ...} per line) or speech-corpus folders (their train.jsonl; "
               "see --split)")


def _audio_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", choices=("train", "heldout", "all"),
                   help="of a speech-corpus folder: its training voices (train, the "
                        "default), its held-out voices (heldout) or both (all)")


def _fit_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--iterations", type=int, default=25, help="k-means iterations (25)")
    p.add_argument("--max-frames", type=int, default=200_000, metavar="N",
                   help="fit on a seeded random subset of at most N frames (200,000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset and k-means (0)")
    _audio_flags(p)
    add_progress_flags(p)


def _progress(args: argparse.Namespace) -> bool:
    return args.progress is not False


def fit_semantic_parser() -> argparse.ArgumentParser:
    from soundstorm.training.semantic import DEFAULT_LAYER, KINDS

    p = argparse.ArgumentParser(
        prog="soundstorm fit-semantic",
        description="Fit a semantic tokenizer: k-means over speech features pooled to --rate "
                    "ids per second. mfcc is built in (MFCCs with deltas, normalised per "
                    "utterance); hubert and w2v-bert use a hidden layer of that model, whose "
                    "weights must be in a local directory (--model-path).",
        epilog="examples:\n"
               "  soundstorm fit-semantic speech/ --out semantic/\n"
               "  hf download facebook/hubert-base-ls960 --local-dir hubert-base\n"
               "  soundstorm fit-semantic speech/ --kind hubert --model-path hubert-base "
               "--vocab-size 500 --out semantic-hubert/",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="AUDIO", help=_AUDIO_HELP)
    p.add_argument("--out", required=True, metavar="DIR", help="tokenizer directory to write")
    p.add_argument("--kind", default="mfcc", choices=KINDS, help="feature kind (mfcc)")
    p.add_argument("--vocab-size", type=int, default=256, help="number of ids (256)")
    p.add_argument("--rate", type=float, default=25.0,
                   help="ids per second: the model's semantic_rate (25)")
    p.add_argument("--layer", type=int, help=f"hubert/w2v-bert: the transformer layer whose "
                                             f"output is clustered ({DEFAULT_LAYER})")
    p.add_argument("--model-path", metavar="DIR",
                   help="hubert/w2v-bert: local directory with config.json + *.safetensors")
    p.add_argument("--device", default="cpu", help="hubert/w2v-bert: cpu, cuda, ... (cpu)")
    _fit_flags(p)
    return p


def cmd_fit_semantic(argv: Sequence[str]) -> int:
    parser = fit_semantic_parser()
    args = parser.parse_args(argv)
    prog = "soundstorm fit-semantic"
    from soundstorm.training.audio_list import collect_audio
    from soundstorm.training.semantic import fit_semantic

    _check_outputs(prog, {"--out": args.out})
    arguments = {"AUDIO": args.inputs, "--out": args.out, "--model-path": args.model_path}
    items = _run(prog, arguments, lambda: collect_audio(args.inputs, split=args.split))
    tok = _run(prog, arguments, lambda: fit_semantic(
        args.kind, [item.path for item in items], args.out, vocab_size=args.vocab_size,
        rate=args.rate, iterations=args.iterations, seed=args.seed,
        max_frames=args.max_frames, progress=_progress(args), layer=args.layer,
        model_path=args.model_path, device=args.device))
    print(f"fit a {tok.kind} semantic tokenizer ({tok.vocab_size} ids at {tok.rate:g} Hz) on "
          f"{len(items)} files: {args.out}")
    return 0


def fit_codec_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="soundstorm fit-codec",
        description="Fit the built-in melrvq codec (residual k-means on 16 kHz log-mel frames "
                    "at 50 Hz; Griffin-Lim decoding). Load it with "
                    "`--codec melrvq --codec-path DIR`. Audio with no signal (fewer frames "
                    "above --silence-db than codewords) is refused.",
        epilog="example: soundstorm fit-codec speech/ --out codec/")
    p.add_argument("inputs", nargs="+", metavar="AUDIO", help=_AUDIO_HELP)
    p.add_argument("--out", required=True, metavar="DIR", help="codec directory to write")
    p.add_argument("--num-quantizers", type=int, default=8, help="RVQ levels Q (8)")
    p.add_argument("--codebook-size", type=int, default=256, help="codewords per level C (256)")
    p.add_argument("--silence-db", type=float, default=-60.0,
                   help="frames quieter than this RMS level (dBFS) count as silent (-60)")
    _fit_flags(p)
    return p


def cmd_fit_codec(argv: Sequence[str]) -> int:
    parser = fit_codec_parser()
    args = parser.parse_args(argv)
    prog = "soundstorm fit-codec"
    from soundstorm.training.audio_list import collect_audio
    from soundstorm.training.codec_fit import fit_melrvq

    _check_outputs(prog, {"--out": args.out})
    arguments = {"AUDIO": args.inputs, "--out": args.out}
    items = _run(prog, arguments, lambda: collect_audio(args.inputs, split=args.split))

    def work():
        try:
            return fit_melrvq([item.path for item in items], args.out,
                              num_quantizers=args.num_quantizers,
                              codebook_size=args.codebook_size, iterations=args.iterations,
                              seed=args.seed, max_frames=args.max_frames,
                              progress=_progress(args), silence_db=args.silence_db)
        except ValueError as e:
            if "no signal" in str(e):
                raise ValueError(f"AUDIO {' '.join(args.inputs)}: {e}") from None
            raise

    codec = _run(prog, arguments, work)
    print(f"fit a melrvq codec (Q={codec.num_quantizers}, C={codec.codebook_size}) on "
          f"{len(items)} files: {args.out}")
    return 0


def fit_vocoder_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="soundstorm fit-vocoder",
        description="Train the learned vocoder of a melrvq codec (ConvNeXt blocks predicting "
                    "STFT magnitude and phase, inverted by an iSTFT) on audio. It learns to "
                    "decode the codec's frames at every number of levels; the codec then "
                    "decodes with it instead of Griffin-Lim (load with vocoder=False for "
                    "Griffin-Lim).",
        epilog="example: soundstorm fit-vocoder codec/ speech/ --steps 2000")
    p.add_argument("codec", metavar="CODEC", help="melrvq codec directory (from fit-codec)")
    p.add_argument("inputs", nargs="+", metavar="AUDIO", help=_AUDIO_HELP)
    p.add_argument("--out", metavar="DIR",
                   help="write the codec with its vocoder here (default: into CODEC)")
    p.add_argument("--steps", type=int, default=2000, help="optimiser steps (2000)")
    p.add_argument("--batch-size", type=int, default=8, help="segments per step (8)")
    p.add_argument("--segment-frames", type=int, default=32,
                   help="frames per training segment (32 = 0.64 s at 50 Hz)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (1e-3)")
    p.add_argument("--dim", type=int, default=128, help="channels of the network (128)")
    p.add_argument("--layers", type=int, default=6, help="ConvNeXt blocks (6)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and draws (0)")
    _audio_flags(p)
    add_progress_flags(p)
    return p


def cmd_fit_vocoder(argv: Sequence[str]) -> int:
    parser = fit_vocoder_parser()
    args = parser.parse_args(argv)
    prog = "soundstorm fit-vocoder"
    from soundstorm.training.audio_list import collect_audio
    from soundstorm.training.vocoder_fit import fit_vocoder

    out = args.out if args.out is not None else args.codec
    _check_outputs(prog, {"--out": out})
    arguments = {"CODEC": args.codec, "AUDIO": args.inputs, "--out": out}
    items = _run(prog, arguments, lambda: collect_audio(args.inputs, split=args.split))
    summary = _run(prog, arguments, lambda: fit_vocoder(
        args.codec, [item.path for item in items], out_dir=out, steps=args.steps,
        batch_size=args.batch_size, segment_frames=args.segment_frames,
        learning_rate=args.lr, config={"dim": args.dim, "intermediate_dim": 3 * args.dim,
                                       "layers": args.layers},
        seed=args.seed, progress=_progress(args)),
        errors=(ValueError, TypeError, FloatingPointError))
    print(f"trained a vocoder ({summary['parameters']:,} parameters, {summary['steps']} steps, "
          f"loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}) on "
          f"{summary['clips']} clips: {out}")
    return 0


# -- speech-corpus --------------------------------------------------------------------
def speech_corpus_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="soundstorm speech-corpus",
        description="Speak a reproducible English corpus with espeak-ng: 12 voices (accent, "
                    "voice variant, pitch, speed), 2 of them held out of training, or with "
                    "--voices N that many voices drawn from every English accent x voice "
                    "variant, each at its own pitch, speed and formant warp; sentences from a "
                    "seeded generator. Writes OUT/train.jsonl and OUT/heldout.jsonl "
                    "(manifests for `soundstorm tokenize`) and 16 kHz WAVs under OUT/audio.",
        epilog="example: soundstorm speech-corpus speech/ --minutes 40 && soundstorm tokenize "
               "speech/ --codec melrvq --codec-path codec/ --semantic semantic/ "
               "--out tokens/")
    p.add_argument("out", metavar="OUT", help="directory to create (must be new or empty)")
    p.add_argument("--minutes", type=float, default=40.0,
                   help="training audio, shared by the training voices (40)")
    p.add_argument("--voices", type=int, metavar="N",
                   help="draw N voices (seeded by --seed) instead of the twelve fixed ones")
    p.add_argument("--heldout-voices", type=int, default=8, metavar="M",
                   help="with --voices: how many of them are held out of training (8); their "
                        "voice variants are used by no training voice")
    p.add_argument("--heldout-utterances", type=int, default=24,
                   help="utterances per held-out voice (24), at most as many as each "
                        "training voice speaks")
    p.add_argument("--seed", type=int, default=0, help="seed of the sentence generator (0)")
    add_progress_flags(p)
    return p


def cmd_speech_corpus(argv: Sequence[str]) -> int:
    parser = speech_corpus_parser()
    args = parser.parse_args(argv)
    prog = "soundstorm speech-corpus"
    from soundstorm.training.speech_corpus import VOICES, voice_population, write_speech_corpus

    if args.voices is None:
        voices = VOICES
    else:
        try:
            voices = voice_population(args.voices, heldout=args.heldout_voices, seed=args.seed)
        except (TypeError, ValueError) as e:
            parser.error(f"--voices {args.voices} --heldout-voices {args.heldout_voices}: {e}")
    _check_outputs(prog, {"OUT": args.out})
    summary = _run(prog, {"OUT": args.out}, lambda: write_speech_corpus(
        args.out, minutes=args.minutes, heldout_utterances=args.heldout_utterances,
        seed=args.seed, voices=voices, progress=_progress(args)),
        errors=(ValueError, TypeError, RuntimeError))
    t, h = summary["train"], summary["heldout"]
    held = sum(v["heldout"] for v in summary["voices"])
    line = (f"spoke {t['utterances']} training utterances ({t['minutes']:.1f} min, "
            f"{len(summary['voices']) - held} voices) and {h['utterances']} held-out ones "
            f"({h['minutes']:.1f} min, {held} voices) to {args.out}")
    if h["utterances_per_voice"] < h["requested_per_voice"]:
        line += (f"; {h['utterances_per_voice']} per held-out voice, not "
                 f"{h['requested_per_voice']}: no more than each training voice speaks")
    print(line)
    return 0


# -- tokenize -------------------------------------------------------------------------
def tokenize_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="soundstorm tokenize",
        description="Turn audio into a training corpus: codec tokens and semantic ids for every "
                    "file, written as token shards + manifest (the format `soundstorm train` "
                    "reads). Unreadable, silent or too-short files are skipped and reported by "
                    "name. Resumable: run the same command again after an interruption and "
                    "finished shards are kept.",
        epilog="examples:\n"
               "  soundstorm tokenize speech/ --codec melrvq --codec-path codec/ "
               "--semantic semantic/ --out tokens/train\n"
               "  soundstorm tokenize speech/ --split heldout --codec melrvq --codec-path "
               "codec/ --semantic semantic/ --out tokens/heldout",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="AUDIO",
                   help="sound files, directories (searched recursively; the first directory "
                        "level names the speaker), .jsonl manifests ({\"path\", \"id\", "
                        "\"speaker\"} per line) or speech-corpus folders (speakers from their "
                        "manifests; see --split)")
    p.add_argument("--out", required=True, metavar="DIR", help="corpus directory to write")
    p.add_argument("--codec", default="melrvq", help="codec name (melrvq, encodec, dac, mimi)")
    p.add_argument("--codec-path", metavar="DIR", help="the codec's directory (weights or "
                                                       "codebooks)")
    p.add_argument("--codec-option", action="append", default=[], metavar="KEY=VALUE",
                   help="codec option, e.g. bandwidth=6.0 or num_quantizers=4 (repeatable)")
    p.add_argument("--semantic", required=True, metavar="DIR",
                   help="semantic tokenizer directory (from soundstorm fit-semantic)")
    p.add_argument("--semantic-model-path", metavar="DIR",
                   help="override the HuBERT/w2v-BERT weights directory the tokenizer records")
    p.add_argument("--shard-frames", type=int, default=2_000_000,
                   help="codec frames per shard (2,000,000)")
    p.add_argument("--silence-db", type=float, default=-60.0,
                   help="files quieter than this RMS level (dBFS) count as silent (-60)")
    _audio_flags(p)
    add_progress_flags(p)
    return p


def parse_options(pairs: Sequence[str], flag: str) -> Dict[str, Any]:
    """KEY=VALUE strings -> a dict; values parsed as JSON where they are (numbers, booleans)."""
    options: Dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} takes KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            options[key] = value
    return options


def cmd_tokenize(argv: Sequence[str]) -> int:
    parser = tokenize_parser()
    args = parser.parse_args(argv)
    prog = "soundstorm tokenize"
    _check_outputs(prog, {"--out": args.out})
    arguments = {"AUDIO": args.inputs, "--out": args.out, "--codec-path": args.codec_path,
                 "--semantic": args.semantic, "--semantic-model-path": args.semantic_model_path}

    def work():
        from soundstorm.engine.codecs import load_codec
        from soundstorm.training.audio_list import collect_audio
        from soundstorm.training.semantic import load_semantic
        from soundstorm.training.tokenize import tokenize_corpus

        items = collect_audio(args.inputs, split=args.split)
        codec = load_codec(args.codec, path=args.codec_path,
                           **parse_options(args.codec_option, "--codec-option"))
        sem_options = {} if args.semantic_model_path is None else \
            {"model_path": args.semantic_model_path}
        semantic = load_semantic(args.semantic, **sem_options)
        provenance = {"codec_path": None if args.codec_path is None
                      else str(Path(args.codec_path).resolve()),
                      "codec_options": parse_options(args.codec_option, "--codec-option"),
                      "semantic_path": str(Path(args.semantic).resolve())}
        return tokenize_corpus(items, codec, semantic, args.out,
                               shard_frames=args.shard_frames, silence_db=args.silence_db,
                               provenance=provenance, progress=_progress(args))

    report = _run(prog, arguments, work, errors=(ValueError, TypeError, RuntimeError))
    for s in report["skipped"]:
        print(f"skipped {s['path']}: {s['reason']}", file=sys.stderr)
    print(f"tokenized {report['utterances']} utterances ({report['hours'] * 60:.1f} min, "
          f"{report['speakers']} speakers) to {args.out}; skipped {len(report['skipped'])}")
    return 0


# -- calibrate-copy -------------------------------------------------------------------
def calibrate_copy_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="soundstorm calibrate-copy",
        description="Fit the copy gates of a model with a prompt lookup to voices it was not "
                    "trained on: one offset per level with a copy (the finer levels; level 1 "
                    "too with --add-semantic-copy or a model that has level 1's copy), "
                    "chosen for the likelihood of those voices' tokens with a prompt from "
                    "another utterance of the same speaker, in the state(s) in which each "
                    "level is decoded. The model is saved with those offsets (and level "
                    "1's copy where it was added) and nothing else changed, with a report "
                    "(copy-calibration.json). A model with a prompt prior (or given one "
                    "with --add-prompt-prior) has each level's prior weight and smoothing "
                    "fitted after the gates.",
        epilog="example: soundstorm calibrate-copy run/model --data tokens/calibration "
               "--out calibrated/")
    p.add_argument("model", metavar="MODEL", help="model directory (a training run's model/)")
    p.add_argument("--data", required=True, metavar="TOKENS",
                   help="token corpus of voices the model was not trained on (soundstorm "
                        "tokenize; every speaker with two utterances or more)")
    p.add_argument("--out", required=True, metavar="DIR", help="write the calibrated model here")
    p.add_argument("--prompt-seconds", type=float, default=3.0,
                   help="prompt length, from another utterance of the speaker (3.0)")
    p.add_argument("--add-semantic-copy", action="store_true",
                   help="give a model without level 1's copy (ModelConfig.semantic_copy) "
                        "one, and fit its gate's offset with the others")
    p.add_argument("--add-prompt-prior", action="store_true",
                   help="give a model without a prompt prior (ModelConfig.prompt_prior) one, "
                        "and fit each level's prior weight and smoothing after the gates")
    add_progress_flags(p)
    return p


def cmd_calibrate_copy(argv: Sequence[str]) -> int:
    args = calibrate_copy_parser().parse_args(argv)
    prog = "soundstorm calibrate-copy"
    from soundstorm.training.copy_calibration import calibrate_copy

    _check_outputs(prog, {"--out": args.out})
    arguments = {"MODEL": args.model, "--data": args.data, "--out": args.out}
    report = _run(prog, arguments, lambda: calibrate_copy(
        args.model, args.data, args.out, prompt_seconds=args.prompt_seconds,
        add_semantic_copy=args.add_semantic_copy, add_prompt_prior=args.add_prompt_prior,
        progress=_progress(args)))
    for q, level in report["levels"].items():
        if "mean_gate" in level:
            match = ""
            if "match_weight" in level:
                match = (f", match weight {level['match_weight'][0]:.2f} -> "
                         f"{level['match_weight'][1]:.2f}")
            print(f"level {q}: gate {level['mean_gate'][0]:.3f} -> "
                  f"{level['mean_gate'][1]:.3f}, nll {level['nll'][0]:.3f} -> "
                  f"{level['nll'][1]:.3f}, greedy accuracy {level['accuracy'][0]:.3f} -> "
                  f"{level['accuracy'][1]:.3f} ({level['frames']} frames){match}")
        if "prior" in level:
            prior = level["prior"]
            print(f"level {q}: prompt prior weight {prior['weight'][0]:.3f} -> "
                  f"{prior['weight'][1]:.3f}, smoothing {prior['smoothing'][1]:.3g}, nll "
                  f"{prior['nll'][0]:.3f} -> {prior['nll'][1]:.3f}, greedy accuracy "
                  f"{prior['accuracy'][0]:.3f} -> {prior['accuracy'][1]:.3f}")
    print(f"calibrated on {report['utterances']} utterances: {args.out}")
    return 0


COMMANDS = {"train": cmd_train, "synthetic-corpus": cmd_synthetic,
            "speech-corpus": cmd_speech_corpus, "fit-codec": cmd_fit_codec,
            "fit-vocoder": cmd_fit_vocoder,
            "fit-semantic": cmd_fit_semantic, "tokenize": cmd_tokenize,
            "calibrate-copy": cmd_calibrate_copy}


def _train_text(argv: Sequence[str]) -> int:
    from soundstorm.training.text_cli import cmd_train_text
    return cmd_train_text(argv)


COMMANDS["train-text"] = _train_text


def main(command: str, argv: Optional[Sequence[str]] = None) -> int:
    return COMMANDS[command](list(sys.argv[2:] if argv is None else argv))
