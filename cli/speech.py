"""Text to speech on the command line: `soundstorm say` and `soundstorm dialogue`.

    soundstorm say "Hello there." --voice prompt.wav [--voice-text "..."] --out out.wav
    soundstorm dialogue --transcript talk.txt --voice A=a.wav --voice B=b.wav --out talk.wav

Both use the shipped demo's models (SoundStorm, codec, semantic tokenizer, text model) by
default, or those of --assets DIR, or each given on its own (--model, --text-model,
--codec/--codec-path, --semantic).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from soundstorm.cli import CLIError
from soundstorm.cli.audio import check_wav_output, read_voice, write_wav

TEXT_MODEL_DIR = "text-model"


# -- the models ---------------------------------------------------------------------------
def add_model_flags(p: argparse.ArgumentParser) -> None:
    from soundstorm.engine.codecs import CODECS

    p.add_argument("--assets", metavar="DIR",
                   help="a folder with model/, text-model/, codec/ (melrvq) and semantic/ "
                        "(default: the shipped demo's)")
    p.add_argument("--model", metavar="DIR", help="SoundStorm model (default: ASSETS/model)")
    p.add_argument("--text-model", metavar="DIR",
                   help="text-to-semantic model (default: ASSETS/text-model)")
    p.add_argument("--codec", choices=CODECS, default="melrvq", help="codec (melrvq)")
    p.add_argument("--codec-path", metavar="DIR", help="codec directory (default: ASSETS/codec)")
    p.add_argument("--semantic", metavar="DIR",
                   help="semantic tokenizer directory (default: ASSETS/semantic)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    p.add_argument("--temperature", type=float, default=0.9,
                   help="text model sampling temperature (0.9, the paper's; 0 = greedy)")
    p.add_argument("--top-k", type=int, default=125, help="text model top-k (125, the paper's)")
    p.add_argument("--prompt-seconds", type=float, default=3.0,
                   help="seconds of the voice used as SoundStorm's acoustic prompt (3)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch CPU threads (default: torch's choice); on a CPU busy with "
                        "other work, 1 is often much faster")
    p.add_argument("--json", action="store_true", help="print a JSON report as the last line")


def _paths(args: argparse.Namespace) -> Dict[str, Path]:
    from soundstorm.demo import ASSETS

    assets = Path(args.assets) if args.assets else ASSETS
    if args.assets and not assets.is_dir():
        raise CLIError(f"--assets {assets}: not a directory")
    paths = {"--model": Path(args.model) if args.model else assets / "model",
             "--text-model": Path(args.text_model) if args.text_model else assets / TEXT_MODEL_DIR,
             "--codec-path": Path(args.codec_path) if args.codec_path else assets / "codec",
             "--semantic": Path(args.semantic) if args.semantic else assets / "semantic"}
    for flag, path in paths.items():
        if not path.is_dir():
            hint = (" (build the shipped one with bash demo/reproduce.sh, or train one with "
                    "soundstorm train-text)" if flag == "--text-model" else "")
            raise CLIError(f"{flag} {path}: not a directory{hint}")
    return paths


def load_pipeline(args: argparse.Namespace):
    """The TextToSpeech pipeline the flags name, every part checked against the others."""
    import torch

    from soundstorm.engine.codecs import load_codec
    from soundstorm.engine.engine import Engine
    from soundstorm.engine.text_model import TextToSemantic
    from soundstorm.engine.tts import TextToSpeech
    from soundstorm.training.semantic import load_semantic

    if args.top_k < 1:
        raise CLIError(f"--top-k must be >= 1, got {args.top_k}")
    if not (np.isfinite(args.temperature) and args.temperature >= 0):
        raise CLIError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if not (np.isfinite(args.prompt_seconds) and args.prompt_seconds > 0):
        raise CLIError(f"--prompt-seconds must be > 0, got {args.prompt_seconds}")
    if args.seed < 0:
        raise CLIError(f"--seed must be >= 0, got {args.seed}")
    if args.threads is not None:
        if args.threads < 1:
            raise CLIError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    paths = _paths(args)
    parts = {}
    for flag, load in (("--model", lambda p: Engine(p, dtype=torch.float32, backend="torch")),
                       ("--text-model",
                        lambda p: TextToSemantic.from_pretrained(p, dtype=torch.float32)),
                       ("--codec-path", lambda p: load_codec(args.codec, path=p)),
                       ("--semantic", load_semantic)):
        try:
            parts[flag] = load(paths[flag])
        except (FileNotFoundError, ValueError, TypeError) as e:
            raise CLIError(f"{flag} {paths[flag]}: {e}")
    try:
        return TextToSpeech(parts["--text-model"], parts["--model"], parts["--codec-path"],
                            parts["--semantic"], prompt_seconds=args.prompt_seconds)
    except ValueError as e:
        raise CLIError(str(e))


def _check_voice(path: str, label: str) -> None:
    """The voice file, refused by name before any model loads."""
    from soundstorm.engine.tts import MIN_VOICE_SECONDS

    read_voice(path, label, min_seconds=MIN_VOICE_SECONDS)


def _text_arg(args: argparse.Namespace) -> str:
    if (args.text is None) == (args.text_file is None):
        raise CLIError("give the text to speak once: as TEXT or with --text-file")
    if args.text_file is not None:
        p = Path(args.text_file)
        if not p.is_file():
            raise CLIError(f"--text-file {p}: file not found")
        data = p.read_bytes()
        try:
            return data.decode("utf-8").lstrip("\ufeff")
        except UnicodeDecodeError as e:
            raise CLIError(f"--text-file {p}: not UTF-8 text (byte {data[e.start]:#04x} at "
                           f"offset {e.start})")
    return args.text


def _check_text(tts: Any, text: str, label: str) -> str:
    try:
        return tts.check_text(text)
    except ValueError as e:
        raise CLIError(f"{label}: {e}")


def _report_line(report: Any, what: str, out: Path) -> str:
    s = report.seconds
    return (f"{what} to {out}: {report.audio_seconds:.2f} s of audio in "
            f"{sum(s.values()):.2f} s (text->semantic {s['text_to_semantic']:.2f} s, SoundStorm "
            f"{s['soundstorm']:.2f} s, codec {s['codec']:.2f} s): real-time factor "
            f"{report.real_time_factor:.3f}")


def _warn_unstopped(stopped: List[bool], quiet: bool, where: str = "") -> None:
    if not all(stopped) and not quiet:
        n = stopped.count(False)
        print(f"soundstorm: warning: {where}{n} of {len(stopped)} sentence(s) reached the text "
              "model's length limit before it ended them", file=sys.stderr)


# -- say ---------------------------------------------------------------------------------
def cmd_say(args: argparse.Namespace) -> int:
    import time

    out = check_wav_output(args.out)
    text = _text_arg(args)
    _check_voice(args.voice, "--voice")
    if args.voice_text is not None and not args.voice_text.strip():
        raise CLIError("--voice-text is empty; leave it out when the transcript is unknown")
    tts = load_pipeline(args)
    label = "--text-file " + args.text_file if args.text_file else "TEXT"
    text = _check_text(tts, text, label)
    start = time.perf_counter()
    try:
        voice = tts.prepare_voice(args.voice, args.voice_text)
    except ValueError as e:
        raise CLIError(f"--voice {args.voice}: {e}")
    audio = tts.synthesize(text, voice, seed=args.seed, temperature=args.temperature,
                           top_k=args.top_k)
    wall = time.perf_counter() - start
    if audio.size == 0:
        raise CLIError(f"{label}: the text model produced no semantic ids for it; nothing "
                       "was written")
    write_wav(out, audio, tts.sample_rate)
    report = tts.last_report
    _warn_unstopped(report.stopped, args.quiet)
    print(_report_line(report, "spoke", out))
    if args.json:
        import torch
        print(json.dumps({**report.to_dict(), "out": str(out), "wall_seconds": round(wall, 4),
                          "sample_rate": tts.sample_rate, "threads": torch.get_num_threads()}))
    return 0


# -- dialogue ----------------------------------------------------------------------------
def _pairs(values: List[str], flag: str) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for v in values:
        name, sep, rest = v.partition("=")
        if not sep or not name.strip() or not rest:
            raise CLIError(f"{flag} takes NAME=VALUE, got {v!r}")
        if name.strip() in out:
            raise CLIError(f"{flag} {name.strip()} is given twice")
        out[name.strip()] = rest
    return out


def parse_transcript(path: str, speakers: Dict[str, Any]) -> List[Tuple[str, str, str]]:
    """(speaker, text, where) per turn: one turn per line, or several on a line separated by
    the turn marker, each `NAME: text`."""
    from soundstorm.engine.text_model import TURN_MARKER

    p = Path(path)
    if not p.is_file():
        raise CLIError(f"--transcript {p}: file not found")
    data = p.read_bytes()
    turns = []
    for n, raw in enumerate(data.splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CLIError(f"{p}:{n}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                           f"{e.start + 1})")
        if n == 1:
            line = line.lstrip("\ufeff")
        for piece in line.split(TURN_MARKER):
            if not piece.strip():
                continue
            name, sep, text = piece.partition(":")
            where = f"{p}:{n}"
            if not sep or not name.strip():
                raise CLIError(f"{where}: turn {piece.strip()[:40]!r} names no speaker; "
                               "expected NAME: text")
            name = name.strip()
            if name not in speakers:
                raise CLIError(f"{where}: unknown speaker {name!r}; voices given: "
                               f"{', '.join(sorted(speakers))}")
            if not text.strip():
                raise CLIError(f"{where}: speaker {name}'s turn is empty")
            turns.append((name, text.strip(), where))
    if not turns:
        raise CLIError(f"--transcript {p}: holds no turns (expected NAME: text lines)")
    return turns


def cmd_dialogue(args: argparse.Namespace) -> int:
    import time

    out = check_wav_output(args.out)
    voices = _pairs(args.voice, "--voice")
    if not voices:
        raise CLIError("give at least one --voice NAME=voice.wav")
    voice_texts = _pairs(args.voice_text, "--voice-text")
    for name in voice_texts:
        if name not in voices:
            raise CLIError(f"--voice-text {name}: no --voice {name}=... was given")
    if not (np.isfinite(args.pause) and args.pause >= 0):
        raise CLIError(f"--pause must be >= 0 seconds, got {args.pause}")
    turns = parse_transcript(args.transcript, voices)
    for name, path in voices.items():
        _check_voice(path, f"--voice {name}:")
    tts = load_pipeline(args)
    for name, text, where in turns:
        _check_text(tts, text, where)
    prepared = {}
    for name, path in voices.items():
        try:
            prepared[name] = tts.prepare_voice(path, voice_texts.get(name))
        except ValueError as e:
            raise CLIError(f"--voice {name}={path}: {e}")
    sr = tts.sample_rate
    gap = np.zeros(int(round(args.pause * sr)), np.float32)
    pieces, rows = [], []
    totals = {"text_to_semantic": 0.0, "soundstorm": 0.0, "codec": 0.0}
    position = 0
    start = time.perf_counter()
    from tqdm import tqdm
    for i, (name, text, where) in enumerate(tqdm(turns, desc="turns", unit="turn",
                                                 disable=args.quiet, file=sys.stderr)):
        audio = tts.synthesize(text, prepared[name], seed=args.seed + i,
                               temperature=args.temperature, top_k=args.top_k)
        report = tts.last_report
        for k in totals:
            totals[k] += report.seconds[k]
        _warn_unstopped(report.stopped, args.quiet, f"{where}: ")
        if audio.size == 0:
            raise CLIError(f"{where}: the text model produced no semantic ids for this turn; "
                           "nothing was written")
        if pieces:
            pieces.append(gap)
            position += gap.size
        pieces.append(audio)
        rows.append({"speaker": name, "text": text, "start": round(position / sr, 4),
                     "end": round((position + audio.size) / sr, 4)})
        position += audio.size
    wall = time.perf_counter() - start
    audio = np.concatenate(pieces)
    write_wav(out, audio, sr)
    seconds = audio.size / sr
    print(f"spoke {len(turns)} turns ({len(voices)} voices) to {out}: {seconds:.2f} s of audio "
          f"in {wall:.2f} s (text->semantic {totals['text_to_semantic']:.2f} s, SoundStorm "
          f"{totals['soundstorm']:.2f} s, codec {totals['codec']:.2f} s)")
    if args.json:
        print(json.dumps({"out": str(out), "audio_seconds": round(seconds, 4),
                          "wall_seconds": round(wall, 4), "seconds": totals,
                          "sample_rate": sr, "turns": rows}))
    return 0


def add_commands(sub: argparse._SubParsersAction, add_quiet) -> None:
    s = sub.add_parser(
        "say", help="speak a text in the voice of a prompt (text -> WAV)",
        description="Text to speech: the text model turns the text into semantic ids "
                    "(prompted with the voice's transcript and ids when --voice-text is "
                    "given), SoundStorm generates the codec tokens in the voice of the "
                    "prompt, the codec makes the waveform. Long text is split at sentence "
                    "ends and generated in slide-and-prompt windows.",
        epilog='example: soundstorm say "The yellow orchard was quiet." --voice prompt.wav '
               '--out out.wav')
    s.add_argument("text", nargs="?", metavar="TEXT", help="the text to speak (UTF-8)")
    s.add_argument("--text-file", metavar="FILE", help="read the text from a UTF-8 file")
    s.add_argument("--voice", required=True, metavar="AUDIO", help="voice prompt (a sound file)")
    s.add_argument("--voice-text", metavar="TEXT", help="the voice prompt's transcript")
    s.add_argument("--out", required=True, metavar="WAV", help="WAV file to write")
    add_model_flags(s)
    add_quiet(s, "no warnings or progress on stderr")
    s.set_defaults(func=cmd_say)

    d = sub.add_parser(
        "dialogue", help="speak a transcript of turns, each in its speaker's voice",
        description="Speak a dialogue: one turn per line (or several on a line, separated "
                    "by |), each `NAME: text`, every NAME given a voice with --voice "
                    "NAME=voice.wav. The turns are joined with --pause seconds of silence.",
        epilog="example: soundstorm dialogue --transcript talk.txt --voice A=a.wav "
               "--voice B=b.wav --out talk.wav")
    d.add_argument("--transcript", required=True, metavar="FILE", help="UTF-8 transcript")
    d.add_argument("--voice", action="append", default=[], metavar="NAME=AUDIO",
                   help="a speaker's voice prompt (repeatable)")
    d.add_argument("--voice-text", action="append", default=[], metavar="NAME=TEXT",
                   help="a voice prompt's transcript (repeatable, optional)")
    d.add_argument("--pause", type=float, default=0.3, help="silence between turns (0.3 s)")
    d.add_argument("--out", required=True, metavar="WAV", help="WAV file to write")
    add_model_flags(d)
    add_quiet(d, "no warnings or progress on stderr")
    d.set_defaults(func=cmd_dialogue)


__all__ = ["add_commands", "load_pipeline", "parse_transcript"]
