"""Audio on the command line: `soundstorm encode`, `soundstorm decode`, and the WAV side of
`soundstorm generate` (--prompt-wav, --out x.wav, --long).

    soundstorm encode speech.wav --codec melrvq --codec-path codec/ --out tokens.npy
    soundstorm decode tokens.npy --codec melrvq --codec-path codec/ --out speech.wav

Every input file is recognised by its first bytes, so a file of the wrong kind is named as
such ("is a WAV file, expected .npy ids") instead of failing deep inside a reader.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from soundstorm.cli import CLIError, _check_output_file, _load_ids, _save_npy

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")


# -- what a file is -------------------------------------------------------------------------
def sniff(path: Path) -> Optional[str]:
    """The kind of file `path` holds, from its first bytes: "wav", "flac", "ogg", "mp3",
    "npy", "json", "safetensors" or None (unknown or unreadable)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return None
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:3] == b"ID3" or head[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2"):
        return "mp3"
    if head[:6] == b"\x93NUMPY":
        return "npy"
    if head.lstrip()[:1] in (b"{", b"["):
        return "json"
    if len(head) >= 9 and head[8:9] == b"{":  # 8-byte header length, then JSON
        return "safetensors"
    return None


KIND_NAMES = {"wav": "a WAV file", "flac": "a FLAC file", "ogg": "an Ogg file",
              "mp3": "an MP3 file", "npy": "a .npy array", "json": "a JSON file",
              "safetensors": "a safetensors file"}


def refuse_other_kind(p: Path, label: str) -> None:
    """A one-line error when the file `p`, read for .npy ids, is of another known kind."""
    kind = sniff(p)
    if kind is not None and kind != "npy":
        hint = ("; turn audio into tokens with soundstorm encode (or give a voice prompt "
                "as --prompt-wav)" if kind in ("wav", "flac", "ogg", "mp3") else "")
        raise CLIError(f"{label} {p}: is {KIND_NAMES[kind]}, expected .npy ids{hint}")


def load_ids_file(path: str, label: str, ndim_single: int) -> tuple[torch.Tensor, bool]:
    """`_load_ids` for a positional argument named `label` (upper case, e.g. TOKENS)."""
    return _load_ids(path, label, ndim_single)


def read_voice(path: str, label: str, sample_rate: Optional[int] = None,
               min_seconds: float = 0.0) -> tuple[np.ndarray, int]:
    """A sound file as float32 mono [N] and its rate (resampled to `sample_rate` if given),
    refusing, with a one-line error naming it, a file that is missing, of another kind,
    unreadable, empty, non-finite, silent or shorter than `min_seconds`."""
    import soundfile as sf

    from soundstorm.engine.codecs.audio import read_audio
    from soundstorm.engine.tts import VoiceError, check_voice

    p = Path(path)
    if p.is_dir():
        raise CLIError(f"{label} {p}: is a directory, expected a sound file")
    if not p.is_file():
        raise CLIError(f"{label} {p}: file not found")
    kind = sniff(p)
    if kind in ("npy", "json", "safetensors"):
        raise CLIError(f"{label} {p}: is {KIND_NAMES[kind]}, expected a sound file (WAV, "
                       f"FLAC or Ogg)")
    try:
        samples, sr = read_audio(p, sample_rate)
    except (sf.LibsndfileError, RuntimeError, ValueError) as e:
        raise CLIError(f"{label} {p}: not a readable sound file ({e})")
    try:
        check_voice(samples, sr, f"{label} {p}:", min_seconds)
    except VoiceError as e:
        raise CLIError(str(e))
    return samples.astype(np.float32), sr


def write_wav(path: Path, audio: Any, sample_rate: int) -> None:
    """Write mono float audio as 16-bit PCM WAV atomically (a temporary file beside it,
    renamed over it; removed whatever goes wrong)."""
    import soundfile as sf

    audio = np.clip(np.asarray(audio, dtype=np.float32).reshape(-1), -1.0, 1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        sf.write(str(tmp), audio, sample_rate, subtype="PCM_16", format="WAV")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def is_audio_path(path: Optional[str]) -> bool:
    return path is not None and Path(path).suffix.lower() in AUDIO_SUFFIXES


def check_wav_output(path: str, label: str = "--out") -> Path:
    p = Path(path)
    if p.suffix.lower() != ".wav":
        raise CLIError(f"{label} {p}: audio is written as WAV; give a name ending in .wav")
    _check_output_file(p, label)
    return p


# -- codecs ---------------------------------------------------------------------------------
def add_codec_flags(p: argparse.ArgumentParser, required: bool) -> None:
    from soundstorm.engine.codecs import CODECS

    p.add_argument("--codec", choices=CODECS, required=required,
                   help="audio codec" + ("" if required else
                                         " (needed by --prompt-wav and --out x.wav)"))
    p.add_argument("--codec-path", metavar="DIR",
                   help="the codec's directory (melrvq codebooks, or transformers weights)")
    p.add_argument("--codec-option", action="append", default=[], metavar="KEY=VALUE",
                   help="codec option, e.g. bandwidth=6.0 or num_quantizers=4 (repeatable)")


def parse_codec_options(pairs) -> Dict[str, Any]:
    from soundstorm.training.cli import parse_options

    try:
        return parse_options(pairs, "--codec-option")
    except ValueError as e:
        raise CLIError(str(e))


def load_codec_args(args: argparse.Namespace):
    """The codec named by --codec/--codec-path/--codec-option, or a one-line error."""
    from soundstorm.engine.codecs import load_codec

    if args.codec_path is not None and not Path(args.codec_path).is_dir():
        raise CLIError(f"--codec-path {args.codec_path}: not a directory")
    try:
        return load_codec(args.codec, path=args.codec_path,
                          **parse_codec_options(args.codec_option))
    except (FileNotFoundError, ValueError, TypeError) as e:
        raise CLIError(f"--codec {args.codec}: {e}")


def check_codec_fits(codec: Any, cfg: Any) -> None:
    """The codec and a SoundStorm model agree on levels, codebook and frame rate."""
    for name, got, want in (("num_quantizers", codec.num_quantizers, cfg.num_quantizers),
                            ("codebook_size", codec.codebook_size, cfg.codebook_size),
                            ("frame_rate", float(codec.frame_rate), float(cfg.frame_rate))):
        if got != want:
            raise CLIError(f"--codec {codec.name}: its {name} is {got:g}, the model's is "
                           f"{want:g}")


def decode_tokens(codec: Any, tokens: torch.Tensor, label: str) -> np.ndarray:
    """Tokens [T, Q] -> float32 audio [T * hop]; frames of -1 (padding) are dropped."""
    if tokens.ndim != 2 or tokens.shape[1] != codec.num_quantizers:
        raise CLIError(f"{label}: tokens of shape {tuple(tokens.shape)}; the {codec.name} "
                       f"codec takes [T, {codec.num_quantizers}]")
    keep = (tokens >= 0).all(dim=1)
    tokens = tokens[keep]
    if tokens.shape[0] == 0:
        raise CLIError(f"{label}: holds no frames (every frame is padding)")
    bad = (tokens >= codec.codebook_size)
    if bool(bad.any()):
        raise CLIError(f"{label}: holds id {int(tokens.max())}, outside the {codec.name} "
                       f"codec's codebook [0, {codec.codebook_size})")
    if bool((tokens < 0).any()):
        raise CLIError(f"{label}: holds negative ids inside a frame")
    return codec.decode(tokens[None])[0].numpy()


# -- encode / decode ------------------------------------------------------------------------
def cmd_encode(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.suffix.lower() != ".npy":
        raise CLIError(f"--out {out}: tokens are written as .npy; give a name ending in .npy")
    _check_output_file(out, "--out")
    codec = load_codec_args(args)
    samples, sr = read_voice(args.input, "AUDIO")
    tokens = codec.encode(torch.from_numpy(samples)[None], sr)[0]
    _save_npy(out, tokens.numpy())
    print(f"encoded {args.input} ({samples.size / sr:.2f} s) to {out}: {tokens.shape[0]} "
          f"frames x {tokens.shape[1]} levels at {float(codec.frame_rate):g} Hz "
          f"({codec.name})")
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    out = check_wav_output(args.out)
    tokens, single = load_ids_file(args.tokens, "TOKENS", 2)
    if not single and tokens.shape[0] != 1:
        raise CLIError(f"TOKENS {args.tokens}: holds a batch of {tokens.shape[0]}; decode "
                       f"takes one utterance [T, Q]")
    codec = load_codec_args(args)
    audio = decode_tokens(codec, tokens[0], f"TOKENS {args.tokens}")
    write_wav(out, audio, codec.sample_rate)
    print(f"decoded {args.tokens} ({tokens.shape[1]} frames) to {out}: "
          f"{audio.size / codec.sample_rate:.2f} s at {codec.sample_rate} Hz ({codec.name})")
    return 0


def add_commands(sub: argparse._SubParsersAction, add_quiet) -> None:
    e = sub.add_parser(
        "encode", help="audio file -> codec tokens (.npy)",
        description="Encode a sound file (WAV, FLAC, Ogg; mixed to mono, resampled to the "
                    "codec's rate) into RVQ codec tokens int64 [T, Q], written as .npy.",
        epilog="example: soundstorm encode voice.wav --codec melrvq --codec-path "
               "codec/ --out voice.npy")
    e.add_argument("input", metavar="AUDIO", help="sound file to encode")
    e.add_argument("--out", required=True, metavar="NPY", help="tokens file to write")
    add_codec_flags(e, required=True)
    add_quiet(e, "accepted for uniformity: encode shows no progress")
    e.set_defaults(func=cmd_encode)

    d = sub.add_parser(
        "decode", help="codec tokens (.npy) -> WAV",
        description="Decode RVQ codec tokens int [T, Q] (.npy, as generate or encode write "
                    "them; frames of -1 are padding and dropped) into a 16-bit WAV file at "
                    "the codec's sample rate.",
        epilog="example: soundstorm decode tokens.npy --codec melrvq --codec-path codec/ "
               "--out speech.wav")
    d.add_argument("tokens", metavar="TOKENS", help=".npy tokens [T, Q]")
    d.add_argument("--out", required=True, metavar="WAV", help="WAV file to write")
    add_codec_flags(d, required=True)
    add_quiet(d, "accepted for uniformity: decode shows no progress")
    d.set_defaults(func=cmd_decode)


# -- generate: WAV prompt, WAV output, long form --------------------------------------------
def add_generate_flags(g: argparse.ArgumentParser) -> None:
    g.add_argument("--prompt-wav", metavar="AUDIO",
                   help="voice prompt as audio, encoded with --codec (instead of --prompt); "
                        "the semantic ids must cover the prompt and the target")
    g.add_argument("--long", action="store_true",
                   help="one utterance of any length: slide-and-prompt windows of the "
                        "model's max_frames, each prompted with the end of the previous one")
    add_codec_flags(g, required=False)


def check_generate_args(args: argparse.Namespace) -> None:
    """Before any work: the audio flags make sense together."""
    wav_out = is_audio_path(args.out)
    if args.prompt_wav and args.prompt:
        raise CLIError("give the voice prompt once: --prompt (tokens) or --prompt-wav (audio)")
    if args.manifest and (args.prompt_wav or args.long or wav_out):
        raise CLIError("--manifest writes tokens: --prompt-wav, --long and --out x.wav take "
                       "one utterance")
    if (args.prompt_wav or wav_out) and args.codec is None:
        raise CLIError(f"{'--prompt-wav' if args.prompt_wav else '--out ' + args.out} needs "
                       f"--codec (and --codec-path) to turn audio into tokens and back")
    if wav_out:
        check_wav_output(args.out)
    if args.long and args.batch != 1:
        raise CLIError("--long generates one utterance; leave out --batch")


def prompt_from_wav(args: argparse.Namespace, codec: Any) -> torch.Tensor:
    """--prompt-wav encoded: int64 [1, P, Q]."""
    samples, sr = read_voice(args.prompt_wav, "--prompt-wav",
                             min_seconds=1.0 / float(codec.frame_rate))
    return codec.encode(torch.from_numpy(samples)[None], sr)


def long_overlap(cfg: Any) -> int:
    """Frames each --long window takes from the previous one as its prompt: the paper's 3 s,
    or half a window for a model that holds less than 6 s."""
    from soundstorm.engine.longform import DEFAULT_OVERLAP_SECONDS

    return min(round(DEFAULT_OVERLAP_SECONDS * float(cfg.frame_rate)), cfg.max_frames // 2)


def generate_long(engine: Any, semantic: torch.Tensor, prompt: Optional[torch.Tensor],
                  decode: Any, seed: Optional[int], quiet: bool) -> torch.Tensor:
    """--long: one utterance window by window; int64 [1, T, Q]."""
    from tqdm import tqdm

    from soundstorm.engine.longform import plan_windows

    overlap = long_overlap(engine.config)
    if semantic.shape[0] != 1:
        raise CLIError(f"--long generates one utterance; --semantic holds a batch of "
                       f"{semantic.shape[0]}")
    P = 0 if prompt is None else prompt.shape[1]
    windows = plan_windows(engine.config, semantic.shape[1], P, overlap=overlap)
    chunks = []
    bar = tqdm(total=len(windows), desc="windows", unit="win", disable=quiet, file=sys.stderr)
    for chunk in engine.stream(semantic[0], prompt=None if prompt is None else prompt[0],
                               decode=decode, seed=seed, overlap=overlap):
        chunks.append(chunk.tokens)
        bar.update(1)
    bar.close()
    return torch.cat(chunks)[None]


def write_generated_wav(args: argparse.Namespace, codec: Any, tokens: torch.Tensor,
                        prompt_frames: int) -> float:
    """--out x.wav: the generated frames after the prompt, decoded; returns seconds."""
    if tokens.shape[0] != 1:
        raise CLIError(f"--out {args.out}: a WAV holds one utterance, this batch has "
                       f"{tokens.shape[0]}; write tokens (.npy) or use --batch 1")
    new = tokens[0, prompt_frames:]
    audio = decode_tokens(codec, new.cpu(), "generated tokens")
    write_wav(Path(args.out), audio, codec.sample_rate)
    return audio.size / codec.sample_rate


def print_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("soundstorm")
    except PackageNotFoundError:
        v = "unknown (not installed)"
    return f"soundstorm {v} (torch {torch.__version__})"


__all__ = ["sniff", "read_voice", "write_wav", "load_ids_file", "add_commands",
           "add_generate_flags", "check_generate_args", "prompt_from_wav", "generate_long",
           "write_generated_wav", "load_codec_args", "check_codec_fits", "decode_tokens"]
