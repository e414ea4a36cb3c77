"""The training subcommands of `soundstorm` (loaded only when one of them runs).

  soundstorm train --preset tiny --data corpus/train --val-data corpus/val --out run/
  soundstorm synthetic-corpus corpus/ --utterances 2000
  soundstorm speech-corpus speech/ --minutes 40
  soundstorm fit-codec speech/train.jsonl --out codec/
  soundstorm fit-semantic speech/train.jsonl --out semantic/ [--kind hubert --model-path DIR]
  soundstorm tokenize speech/train.jsonl --codec melrvq --codec-path codec/ \
      --semantic semantic/ --out tokens/
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from soundstorm.engine.config import ModelConfig
from soundstorm.training.config import TrainConfig, load_config_file

# (setting, type, metavar, help). Every flag overrides the preset and the --config file.
_FLAGS = [
    ("data", str, "DIR", "training corpus directory (corpus.json + manifest.jsonl + shards)"),
    ("val_data", str, "DIR", "validation corpus directory"),
    ("val_fraction", float, "F", "hold out this fraction of --data for validation instead"),
    ("val_batches", int, "N", "validate on at most N batches per process (0 = all)"),
    ("out", str, "DIR", "run directory: checkpoints/, model/, metrics.jsonl, curves.png"),
    ("model", str, "PRESET", f"model preset ({', '.join(ModelConfig.preset_names())}); "
                             "change fields with model_overrides in --config"),
    ("steps", int, "N", "optimizer steps in all (a resumed run continues up to N)"),
    ("batch_size", int, "N", "windows per optimizer step, over all processes"),
    ("grad_accum", int, "N", "micro-batches per step (memory: each is batch/(procs*N))"),
    ("lr", float, "LR", "peak learning rate (AdamW)"),
    ("weight_decay", float, "WD", "AdamW weight decay (matrices and embeddings only)"),
    ("warmup_steps", int, "N", "linear warm-up steps"),
    ("decay_steps", int, "N", "after warm-up, lr *= decay_rate every N steps (smoothly)"),
    ("decay_rate", float, "R", "exponential decay factor per decay_steps"),
    ("grad_clip", float, "NORM", "clip the global gradient norm (0 = off)"),
    ("min_seconds", float, "S", "shortest training window"),
    ("max_seconds", float, "S", "longest training window (paper: 30)"),
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
    ("resume", str, "auto|never|DIR", "auto: continue from the newest checkpoint in --out if "
                                      "there is one; never; or a checkpoint directory"),
]


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
               "  torchrun --nproc-per-node 8 -m soundstorm.engine.cli train --preset paper "
               "--data tokens/ --val-fraction 0.001 --out run/",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True, choices=TrainConfig.preset_names(),
                   help="training preset: tiny (CPU, seconds), small, paper (§4.1)")
    p.add_argument("--config", metavar="FILE", help="JSON or YAML file of settings (names as "
                                                    "the flags, with underscores)")
    for name, typ, metavar, help_text in _FLAGS:
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, metavar=metavar,
                       help=help_text)
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bar")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    return p


def build_train_config(args: argparse.Namespace) -> TrainConfig:
    settings: Dict[str, Any] = {}
    if args.config:
        settings.update(load_config_file(args.config))
    for name, *_ in _FLAGS + [("progress",)]:
        value = getattr(args, name)
        if value is not None:
            settings[name] = value
    return TrainConfig.preset(args.preset, **settings)


def cmd_train(argv: Sequence[str]) -> int:
    parser = train_parser()
    args = parser.parse_args(argv)
    from soundstorm.training.trainer import train
    try:
        config = build_train_config(args)
        summary = train(config)
    except (ValueError, TypeError, FileNotFoundError) as e:
        parser.exit(2, f"soundstorm train: error: {e}\n")
    t, v = summary["train"], summary["validation"]
    line = f"trained to step {summary['step']}"
    if t:
        line += f": loss {t['loss']:.4f}, masked accuracy {t['acc']:.3f}"
    if v:
        line += f"; validation loss {v['val_loss']:.4f}, accuracy {v['val_acc']:.3f}"
    print(f"{line}. Model: {summary['model']}")
    if args.json:
        print(json.dumps(summary))
    return 0


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
    p.add_argument("--model", default="tiny", choices=ModelConfig.preset_names(),
                   help="model preset whose token shapes and rates to match (default tiny)")
    p.add_argument("--utterances", type=int, default=2000, help="training utterances (2000)")
    p.add_argument("--val-utterances", type=int, default=200, help="validation utterances (200)")
    p.add_argument("--speakers", type=int, default=4, help="hidden speakers (4)")
    p.add_argument("--noise", type=float, default=0.02, help="token noise probability (0.02)")
    p.add_argument("--min-seconds", type=float, default=1.0, help="shortest utterance (1.0)")
    p.add_argument("--max-seconds", type=float, default=3.0, help="longest utterance (3.0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the voices and utterances")
    return p


def cmd_synthetic(argv: Sequence[str]) -> int:
    parser = synthetic_parser()
    args = parser.parse_args(argv)
    from soundstorm.training.synthetic import SyntheticSpec, write_synthetic_corpus
    try:
        if args.utterances < 1 or args.val_utterances < 0:
            raise ValueError(f"--utterances must be >= 1 and --val-utterances >= 0, got "
                             f"{args.utterances} and {args.val_utterances}")
        spec = SyntheticSpec.for_model(ModelConfig.preset(args.model),
                                       num_speakers=args.speakers, noise=args.noise,
                                       min_seconds=args.min_seconds, max_seconds=args.max_seconds)
        out = Path(args.out)
        write_synthetic_corpus(out / "train", args.utterances, spec, seed=args.seed,
                               voice_seed=args.seed)
        if args.val_utterances:
            write_synthetic_corpus(out / "val", args.val_utterances, spec,
                                   seed=args.seed + 1_000_003, voice_seed=args.seed,
                                   prefix="val")
    except (ValueError, FileExistsError) as e:
        parser.exit(2, f"soundstorm synthetic-corpus: error: {e}\n")
    print(f"wrote {args.utterances} training and {args.val_utterances} validation utterances "
          f"to {out}/train and {out}/val")
    return 0


_AUDIO_HELP = ("sound files, directories (searched recursively) or .jsonl manifests "
               "({\"path\": ...} per line)")


def _fit_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--iterations", type=int, default=25, help="k-means iterations (25)")
    p.add_argument("--max-frames", type=int, default=200_000, metavar="N",
                   help="fit on a seeded random subset of at most N frames (200,000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset and k-means (0)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars")


def fit_semantic_parser() -> argparse.ArgumentParser:
    from soundstorm.training.semantic import DEFAULT_LAYER, KINDS

    p = argparse.ArgumentParser(
        prog="soundstorm fit-semantic",
        description="Fit a semantic tokenizer: k-means over speech features pooled to --rate "
                    "ids per second. mfcc is built in (MFCCs with deltas, normalised per "
                    "utterance); hubert and w2v-bert use a hidden layer of that model, whose "
                    "weights must be in a local directory (--model-path).",
        epilog="examples:\n"
               "  soundstorm fit-semantic speech/train.jsonl --out semantic/\n"
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
    from soundstorm.training.audio_list import collect_audio
    from soundstorm.training.semantic import fit_semantic
    try:
        items = collect_audio(args.inputs)
        tok = fit_semantic(args.kind, [item.path for item in items], args.out,
                           vocab_size=args.vocab_size, rate=args.rate,
                           iterations=args.iterations, seed=args.seed,
                           max_frames=args.max_frames, progress=args.progress,
                           layer=args.layer, model_path=args.model_path, device=args.device)
    except (ValueError, TypeError, FileNotFoundError) as e:
        parser.exit(2, f"soundstorm fit-semantic: error: {e}\n")
    print(f"fit a {tok.kind} semantic tokenizer ({tok.vocab_size} ids at {tok.rate:g} Hz) on "
          f"{len(items)} files: {args.out}")
    return 0


def fit_codec_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="soundstorm fit-codec",
        description="Fit the built-in melrvq codec (residual k-means on 16 kHz log-mel frames "
                    "at 50 Hz; Griffin-Lim decoding). Load it with "
                    "`--codec melrvq --codec-path DIR`.",
        epilog="example: soundstorm fit-codec speech/train.jsonl --out codec/")
    p.add_argument("inputs", nargs="+", metavar="AUDIO", help=_AUDIO_HELP)
    p.add_argument("--out", required=True, metavar="DIR", help="codec directory to write")
    p.add_argument("--num-quantizers", type=int, default=8, help="RVQ levels Q (8)")
    p.add_argument("--codebook-size", type=int, default=256, help="codewords per level C (256)")
    _fit_flags(p)
    return p


def cmd_fit_codec(argv: Sequence[str]) -> int:
    parser = fit_codec_parser()
    args = parser.parse_args(argv)
    from soundstorm.training.audio_list import collect_audio
    from soundstorm.training.codec_fit import fit_melrvq
    try:
        items = collect_audio(args.inputs)
        codec = fit_melrvq([item.path for item in items], args.out,
                           num_quantizers=args.num_quantizers, codebook_size=args.codebook_size,
                           iterations=args.iterations, seed=args.seed,
                           max_frames=args.max_frames, progress=args.progress)
    except (ValueError, TypeError, FileNotFoundError) as e:
        parser.exit(2, f"soundstorm fit-codec: error: {e}\n")
    print(f"fit a melrvq codec (Q={codec.num_quantizers}, C={codec.codebook_size}) on "
          f"{len(items)} files: {args.out}")
    return 0


def speech_corpus_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="soundstorm speech-corpus",
        description="Speak a reproducible English corpus with espeak-ng: 12 voices (accent, "
                    "voice variant, pitch, speed), 2 of them held out of training, sentences "
                    "from a seeded generator. Writes OUT/train.jsonl and OUT/heldout.jsonl "
                    "(manifests for `soundstorm tokenize`) and 16 kHz WAVs under OUT/audio.",
        epilog="example: soundstorm speech-corpus speech/ --minutes 40 && soundstorm tokenize "
               "speech/train.jsonl --codec melrvq --codec-path codec/ --semantic semantic/ "
               "--out tokens/")
    p.add_argument("out", metavar="OUT", help="directory to create (must be new or empty)")
    p.add_argument("--minutes", type=float, default=40.0,
                   help="training audio, shared by the 10 training voices (40)")
    p.add_argument("--heldout-utterances", type=int, default=24,
                   help="utterances per held-out voice (24)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sentence generator (0)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def cmd_speech_corpus(argv: Sequence[str]) -> int:
    parser = speech_corpus_parser()
    args = parser.parse_args(argv)
    from soundstorm.training.speech_corpus import write_speech_corpus
    try:
        summary = write_speech_corpus(args.out, minutes=args.minutes,
                                      heldout_utterances=args.heldout_utterances,
                                      seed=args.seed, progress=args.progress)
    except (ValueError, FileExistsError, RuntimeError) as e:
        parser.exit(2, f"soundstorm speech-corpus: error: {e}\n")
    t, h = summary["train"], summary["heldout"]
    print(f"spoke {t['utterances']} training utterances ({t['minutes']:.1f} min) and "
          f"{h['utterances']} held-out ones ({h['minutes']:.1f} min) to {args.out}")
    return 0


def tokenize_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="soundstorm tokenize",
        description="Turn audio into a training corpus: codec tokens and semantic ids for every "
                    "file, written as token shards + manifest (the format `soundstorm train` "
                    "reads). Unreadable, silent or too-short files are skipped and reported by "
                    "name. Resumable: run the same command again after an interruption and "
                    "finished shards are kept.",
        epilog="example: soundstorm tokenize speech/train.jsonl --codec melrvq --codec-path "
               "codec/ --semantic semantic/ --out tokens/")
    p.add_argument("inputs", nargs="+", metavar="AUDIO",
                   help="sound files, directories (searched recursively; the first directory "
                        "level names the speaker) or .jsonl manifests ({\"path\", \"id\", "
                        "\"speaker\"} per line)")
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
    p.add_argument("--no-progress", dest="progress", action="store_false")
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
        except json.JSONDecodeError:
            options[key] = value
    return options


def cmd_tokenize(argv: Sequence[str]) -> int:
    parser = tokenize_parser()
    args = parser.parse_args(argv)
    try:
        from soundstorm.engine.codecs import load_codec
        from soundstorm.training.audio_list import collect_audio
        from soundstorm.training.semantic import load_semantic
        from soundstorm.training.tokenize import tokenize_corpus

        items = collect_audio(args.inputs)
        codec = load_codec(args.codec, path=args.codec_path,
                           **parse_options(args.codec_option, "--codec-option"))
        sem_options = {} if args.semantic_model_path is None else \
            {"model_path": args.semantic_model_path}
        semantic = load_semantic(args.semantic, **sem_options)
        provenance = {"codec_path": None if args.codec_path is None
                      else str(Path(args.codec_path).resolve()),
                      "codec_options": parse_options(args.codec_option, "--codec-option"),
                      "semantic_path": str(Path(args.semantic).resolve())}
        report = tokenize_corpus(items, codec, semantic, args.out,
                                 shard_frames=args.shard_frames, silence_db=args.silence_db,
                                 provenance=provenance, progress=args.progress)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        parser.exit(2, f"soundstorm tokenize: error: {e}\n")
    for s in report["skipped"]:
        print(f"skipped {s['path']}: {s['reason']}", file=sys.stderr)
    print(f"tokenized {report['utterances']} utterances ({report['hours'] * 60:.1f} min, "
          f"{report['speakers']} speakers) to {args.out}; skipped {len(report['skipped'])}")
    return 0


COMMANDS = {"train": cmd_train, "synthetic-corpus": cmd_synthetic,
            "speech-corpus": cmd_speech_corpus, "fit-codec": cmd_fit_codec,
            "fit-semantic": cmd_fit_semantic, "tokenize": cmd_tokenize}


def main(command: str, argv: Optional[Sequence[str]] = None) -> int:
    return COMMANDS[command](list(sys.argv[2:] if argv is None else argv))
