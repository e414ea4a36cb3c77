"""The `soundstorm` command.

  soundstorm generate --model DIR --semantic ids.npy [--prompt prompt.npy] --out tokens.npy
  soundstorm generate --model DIR --manifest batch.jsonl   (many utterances, batched)
  soundstorm generate --preset small --seconds 10          (random weights: speed checks)
  soundstorm generate --model DIR --semantic ids.npy --prompt-wav voice.wav --codec melrvq \
      --codec-path codec/ --out speech.wav [--long]        (audio in, audio out)
  soundstorm encode in.wav --codec melrvq --codec-path codec/ --out tokens.npy
  soundstorm decode tokens.npy --codec melrvq --codec-path codec/ --out out.wav
  soundstorm say "TEXT" --voice prompt.wav [--voice-text "..."] --out out.wav
  soundstorm dialogue --transcript talk.txt --voice A=a.wav --voice B=b.wav --out talk.wav
  soundstorm info DIR|PRESET
  soundstorm demo [--out soundstorm-demo/]                 (the shipped model, end to end)
  soundstorm bench --preset small --seconds 10 [--batch N] [--backend B] [--dtype D] [--quantize int8] [--json]
  soundstorm train --preset tiny --data corpus/train --out run/     (soundstorm.training)
  soundstorm synthetic-corpus corpus/                               (soundstorm.training)
  soundstorm speech-corpus speech/ --minutes 40                     (soundstorm.training)
  soundstorm fit-codec AUDIO... --out codec/                        (soundstorm.training)
  soundstorm fit-vocoder codec/ AUDIO...                            (soundstorm.training)
  soundstorm fit-semantic AUDIO... --out semantic/                  (soundstorm.training)
  soundstorm tokenize speech/train.jsonl --codec melrvq --codec-path codec/ --semantic sem/ --out tokens/
  soundstorm train-text --data tokens/ --out text-run/                (soundstorm.training)
  soundstorm calibrate-copy run/model --data tokens/ --out calib/     (soundstorm.training)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from soundstorm.engine.benchmark import default_seconds, max_seconds, real_time_text
from soundstorm.engine.config import DecodeConfig, ModelConfig
from soundstorm.engine.engine import DTYPES, Engine
from soundstorm.engine.model import CONFIG_FILE, WEIGHTS_FILE
from soundstorm.engine.quantize import QUANTIZE_MODES


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


class CLIParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line too (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# -- checked arguments --------------------------------------------------------------------
def _positive_seconds(value: float, arg: str) -> float:
    if not (math.isfinite(value) and value > 0):
        raise CLIError(f"{arg} must be a finite number of seconds > 0, got {value}")
    return value


def _at_least_one(value: int, arg: str) -> int:
    if value < 1:
        raise CLIError(f"{arg} must be an integer >= 1, got {value}")
    return value


def _check_device(value: Optional[str]) -> Optional[str]:
    """--device: a device this machine has (cpu, cuda, cuda:N, mps)."""
    if value is None:
        return None
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {value!r} is not a device; expected cpu, cuda, cuda:N or mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {value}: CUDA is not available on this machine "
                           f"(torch {torch.__version__}); use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise CLIError(f"--device {value}: this machine has {count} CUDA device(s), "
                           f"cuda:0 to cuda:{count - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise CLIError(f"--device {value}: MPS is not available on this machine; "
                           f"use --device cpu")
    elif device.type != "cpu":
        raise CLIError(f"--device {value}: unsupported device type {device.type!r}; "
                       f"expected cpu, cuda, cuda:N or mps")
    return value


def _parse_steps(text: str, num_quantizers: int) -> tuple[int, ...]:
    try:
        steps = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise CLIError(f"--steps must be comma-separated ints such as 16 or 16,1,1; got {text!r}")
    if len(steps) == 1:  # level 1 only; the finer levels stay greedy (one step each)
        steps = steps + (1,) * (num_quantizers - 1)
    return steps


# -- files ----------------------------------------------------------------------------------
def _nearest_existing(path: Path) -> Path:
    """`path` or its closest ancestor that exists (it may be a file)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_output_dir(directory: Path, label: str, checked: Optional[set] = None,
                      shown: Optional[Path] = None) -> None:
    """Refuse, before any work, a directory that cannot be created or written in.

    label:   what names the path in the message (`--out`, `batch.jsonl:3 "out"`).
    checked: directories already found writable (a manifest's many outputs share a few).
    shown:   the path to show (default: `directory`; an output file in it).
    """
    shown = directory if shown is None else shown
    existing = _nearest_existing(directory)
    if checked is not None and existing in checked:
        return
    if not existing.is_dir():
        raise CLIError(f"{label} {shown}: {existing} is a file, not a directory")
    try:  # the one reliable test of writability (permissions, read-only mounts, ACLs)
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".soundstorm-write-check-")
    except OSError as e:
        raise CLIError(f"{label} {shown}: cannot write in {existing} ({e.strerror or e})")
    os.close(fd)
    os.unlink(probe)
    if checked is not None:
        checked.add(existing)


def _check_output_file(path: Path, label: str, checked: Optional[set] = None) -> None:
    """Refuse, before any work, an output file that cannot be written."""
    if path.is_dir():
        raise CLIError(f"{label} {path}: is a directory; expected a file name such as "
                       f"{path / 'tokens.npy'}")
    _check_output_dir(path.parent, label, checked, shown=path)


def _check_history(path: Path) -> None:
    """--history is appended to after the measurement: refuse a file that cannot be."""
    _check_output_file(path, "--history")
    if path.exists():
        try:
            with open(path, "ab"):
                pass
        except OSError as e:
            raise CLIError(f"--history {path}: cannot append to it ({e.strerror or e})")


def _load_ids(path: str, what: str, ndim_single: int) -> tuple[torch.Tensor, bool]:
    """Load an integer .npy; returns (tensor with a batch axis, whether one was added)."""
    p = Path(path)
    label = what if what.isupper() else f"--{what}"  # a positional argument (TOKENS) or a flag
    if p.is_dir():
        raise CLIError(f"{label}: {p} is a directory, expected a .npy file")
    if not p.is_file():
        raise CLIError(f"{label}: file not found: {p}")
    from soundstorm.cli.audio import refuse_other_kind
    refuse_other_kind(p, f"{label}")
    try:
        arr = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise CLIError(f"{label}: {p} is not a readable .npy array ({e})")
    if not np.issubdtype(arr.dtype, np.integer):
        raise CLIError(f"{label}: {p} holds {arr.dtype}, expected integer ids")
    if arr.ndim == ndim_single:
        return torch.from_numpy(arr.astype(np.int64))[None], True
    if arr.ndim == ndim_single + 1:
        return torch.from_numpy(arr.astype(np.int64)), False
    raise CLIError(f"{label}: {p} has shape {arr.shape}; expected {ndim_single}-D (one "
                   f"utterance) or {ndim_single + 1}-D (a batch)")


def _save_npy(path: Path, array: np.ndarray) -> None:
    """Write `array` to `path` atomically: a temporary file beside it, renamed over it; the
    temporary file is removed whatever goes wrong."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# -- manifests ------------------------------------------------------------------------------
MANIFEST_KEYS = ("semantic", "prompt", "seed", "out")


def _manifest_lines(p: Path):
    """(line number, text) of each non-blank line of a UTF-8 manifest."""
    try:
        data = p.read_bytes()
    except OSError as e:
        raise CLIError(f"--manifest {p}: cannot read it ({e.strerror or e})")
    for n, raw in enumerate(data.splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CLIError(f"{p}:{n}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                           f"{e.start + 1}); a manifest is UTF-8 JSON lines")
        if n == 1:
            line = line.lstrip("\ufeff")
        if line.strip():
            yield n, line


def _read_manifest(path: str, cfg) -> list[dict]:
    """Lines of JSON: {"semantic": "a.npy", "prompt": "p.npy"?, "seed": 1?, "out": "o.npy"?};
    relative paths are relative to the manifest's folder."""
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"--manifest: file not found: {p}")
    entries = []
    for n, line in _manifest_lines(p):
        where = f"{p}:{n}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise CLIError(f"{where}: not a JSON object ({e})")
        except RecursionError:
            raise CLIError(f"{where}: JSON nested too deeply; expected one flat object")
        if not isinstance(entry, dict) or "semantic" not in entry:
            raise CLIError(f"{where}: expected an object with at least \"semantic\"")
        unknown = sorted(set(entry) - set(MANIFEST_KEYS))
        if unknown:
            raise CLIError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(MANIFEST_KEYS)}")
        for key in ("semantic", "prompt", "out"):
            if key in entry and not (isinstance(entry[key], str) and entry[key].strip()):
                raise CLIError(f"{where}: \"{key}\" must be a non-empty path string, got "
                               f"{json.dumps(entry[key])}" + ("; leave the key out for no prompt"
                                                             if key == "prompt" else ""))
        seed = entry.get("seed")
        if "seed" in entry and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise CLIError(f"{where}: \"seed\" must be an integer, got {json.dumps(seed)}")
        semantic, _ = _load_ids(str(p.parent / entry["semantic"]), f"manifest {where} semantic", 1)
        if semantic.shape[0] != 1:
            raise CLIError(f"{where}: semantic must be one utterance [S], got {tuple(semantic.shape)}")
        request = {"semantic": semantic[0]}
        if "prompt" in entry:
            prompt, _ = _load_ids(str(p.parent / entry["prompt"]), f"manifest {where} prompt", 2)
            request["prompt"] = prompt[0]
        if "seed" in entry:
            request["seed"] = seed
        out = entry.get("out")
        entries.append({"request": request, "out": None if out is None else p.parent / out,
                        "where": where})
    if not entries:
        raise CLIError(f"--manifest: {p} has no entries")
    return entries


def _manifest_outputs(entries: list[dict], out_dir: Path) -> list[Path]:
    """Every entry's output file, checked before any decoding: no two lines write the same
    file, and each can be written."""
    outputs = [e["out"] if e["out"] is not None else out_dir / f"{i:05d}.npy"
               for i, e in enumerate(entries)]
    writers: dict[Path, list[str]] = {}
    for e, path in zip(entries, outputs):
        writers.setdefault(path.resolve(), []).append(e["where"])
    clashes = [(path, lines) for path, lines in writers.items() if len(lines) > 1]
    if clashes:
        path, lines = clashes[0]
        raise CLIError(f"manifest lines {', '.join(lines)} all write {path}; give each line "
                       f"its own \"out\"")
    checked: set = set()
    for e, path in zip(entries, outputs):
        label = f"{e['where']}: \"out\"" if e["out"] is not None else f"{e['where']}: output"
        _check_output_file(path, label, checked)
    return outputs


def cmd_generate_manifest(args: argparse.Namespace, engine: Engine, source: str) -> int:
    from tqdm import tqdm

    from soundstorm.engine.scheduler import Scheduler

    cfg = engine.config
    entries = _read_manifest(args.manifest, cfg)
    out_dir = Path(args.out) if args.out else Path(args.manifest).parent
    outputs = _manifest_outputs(entries, out_dir)
    steps = _parse_steps(args.steps, cfg.num_quantizers) if args.steps is not None else None
    decode = DecodeConfig(steps_per_level=steps, temperature=args.temperature)
    scheduler = Scheduler(engine, max_batch=args.max_batch, threaded=False)
    handles = []
    for i, e in enumerate(entries):   # every request is checked before any decoding starts
        request = dict(e["request"], decode=decode)
        if "seed" not in request and args.seed is not None:
            request["seed"] = args.seed + i
        try:
            handles.append(scheduler.submit(**request))
        except (ValueError, TypeError) as err:
            raise CLIError(f"{e['where']}: {err}")
    bar = tqdm(total=len(handles), desc="utterances", unit="utt", disable=args.quiet, file=sys.stderr)
    start = time.perf_counter()
    finished = 0
    while scheduler.step():
        now = sum(h.done() for h in handles)
        bar.update(now - finished)
        finished = now
    wall = time.perf_counter() - start
    bar.close()
    audio_s = 0.0
    for e, h, path in zip(entries, handles, outputs):
        tokens = h.result()
        audio_s += tokens.shape[0] / cfg.frame_rate
        try:
            _save_npy(path, tokens.cpu().numpy())
        except OSError as err:
            raise CLIError(f"{e['where']}: cannot write {path} ({err.strerror or err})")
    rtf = wall / audio_s
    summary = {"model": str(source), "utterances": len(handles), "audio_seconds": audio_s,
               "wall_seconds": round(wall, 4), "real_time_factor": round(rtf, 4),
               "forward_passes": scheduler.stats.steps, "max_batch": args.max_batch}
    print(f"generated {len(handles)} utterances ({audio_s:g} s of audio) from {source} in "
          f"{wall:.2f} s with {scheduler.stats.steps} batched forward passes: real-time "
          f"factor {real_time_text(rtf)}")
    if args.json:
        print(json.dumps(summary))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from soundstorm.cli import audio

    device = _check_device(args.device)
    audio.check_generate_args(args)
    if args.manifest:
        if args.semantic or args.prompt or args.seconds is not None:
            raise CLIError("--manifest replaces --semantic, --prompt and --seconds")
        if args.backend == "xla":
            raise CLIError("--manifest batches through the torch scheduler; --backend xla "
                           "decodes one batch (--semantic or --seconds with --batch)")
        _at_least_one(args.max_batch, "--max-batch")
        if args.out:
            _check_output_dir(Path(args.out), "--out")
    else:
        if args.seconds is not None:
            _positive_seconds(args.seconds, "--seconds")
        _at_least_one(args.batch, "--batch")
        if args.out:
            _check_output_file(Path(args.out), "--out")
    if not math.isfinite(args.temperature):
        raise CLIError(f"--temperature must be a finite number >= 0, got {args.temperature}")

    if args.model:
        engine = Engine(args.model, device=device, dtype=args.dtype, backend=args.backend,
                        quantize=args.quantize)
        source = args.model
    else:
        engine = Engine.from_preset(args.preset, seed=args.init_seed, device=device,
                                    dtype=args.dtype, backend=args.backend,
                                    quantize=args.quantize)
        source = f"preset {args.preset!r} with random weights"
    cfg = engine.config
    codec = None
    if args.codec is not None:
        codec = audio.load_codec_args(args)
        audio.check_codec_fits(codec, cfg)
    if args.manifest:
        return cmd_generate_manifest(args, engine, source)

    if args.semantic:
        semantic, single = _load_ids(args.semantic, "semantic", 1)
    else:
        longest = max_seconds(cfg)
        seconds = args.seconds if args.seconds is not None else default_seconds(cfg)
        if seconds > longest:
            raise CLIError(f"--seconds {seconds:g}: this model holds at most {longest:g} s "
                           f"({cfg.max_frames} frames)")
        S = max(1, round(seconds * cfg.semantic_rate))
        g = torch.Generator().manual_seed(args.seed if args.seed is not None else 0)
        semantic = torch.randint(0, cfg.semantic_vocab_size, (args.batch, S), generator=g)
        single = args.batch == 1
    prompt = None
    if args.prompt:
        prompt, _ = _load_ids(args.prompt, "prompt", 2)
    elif args.prompt_wav:
        prompt = audio.prompt_from_wav(args, codec)
    if prompt is not None:
        if prompt.shape[0] == 1 and semantic.shape[0] > 1:
            prompt = prompt.expand(semantic.shape[0], -1, -1)

    steps = _parse_steps(args.steps, cfg.num_quantizers) if args.steps is not None else None
    decode = DecodeConfig(steps_per_level=steps, temperature=args.temperature)
    passes = decode.num_forward_passes(cfg.num_quantizers)
    if not args.long and cfg.frames_for(semantic.shape[1]) > cfg.max_frames:
        raise CLIError(f"--semantic: {semantic.shape[1]} ids make {cfg.frames_for(semantic.shape[1])} "
                       f"frames, more than the model's max_frames={cfg.max_frames} "
                       f"({cfg.max_frames / cfg.frame_rate:g} s); add --long to generate "
                       f"it in slide-and-prompt windows")
    start = time.perf_counter()
    if args.long:
        tokens = audio.generate_long(engine, semantic, prompt, decode, args.seed, args.quiet)
    else:
        # The XLA path decodes in one program only without a per-step hook: no progress bar.
        whole = engine.backend == "xla"
        bar = tqdm(total=passes, desc="decoding", unit="pass", disable=args.quiet or whole,
                   file=sys.stderr)
        tokens = engine.generate(semantic, prompt=prompt, decode=decode, seed=args.seed,
                                 on_step=None if whole else lambda *_: bar.update(1))
        bar.close()
    wall = time.perf_counter() - start

    B, T, Q = tokens.shape
    audio_s = B * T / cfg.frame_rate
    rtf = wall / audio_s
    summary = {
        "model": str(source), "backend": engine.backend, "device": str(engine.device),
        "dtype": str(engine.dtype).replace("torch.", ""),
        "quantize": getattr(engine, "quantize", None),
        "batch": B, "frames": T,
        "levels": Q, "audio_seconds": audio_s, "forward_passes": passes,
        "wall_seconds": round(wall, 4), "real_time_factor": round(rtf, 4),
    }
    if args.out and audio.is_audio_path(args.out):
        P = 0 if prompt is None else prompt.shape[1]
        try:
            summary["out_seconds"] = audio.write_generated_wav(args, codec, tokens, P)
        except OSError as e:
            raise CLIError(f"--out {args.out}: cannot write it ({e.strerror or e})")
        summary["out"] = str(args.out)
    elif args.out:
        out = tokens[0] if single else tokens
        try:
            _save_npy(Path(args.out), out.cpu().numpy())
        except OSError as e:
            raise CLIError(f"--out {args.out}: cannot write it ({e.strerror or e})")
        summary["out"] = str(args.out)
    print(f"generated {B} x {T} frames x {Q} levels ({audio_s:g} s of audio) from {source} "
          f"in {wall:.2f} s with {passes} forward passes: real-time factor {real_time_text(rtf)}")
    if args.json:
        print(json.dumps(summary))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from soundstorm.engine.model import check_pretrained

    target = args.target
    checksum = None
    if Path(target).is_dir() and _is_text_model(Path(target)):
        return _info_text_model(Path(target), args.json)
    if Path(target).is_dir():
        # The loader's checks (names, shapes, dtypes, checksums, finite values), one tensor
        # at a time: the model itself is never built.
        config, checksum = check_pretrained(target)
        size = (Path(target) / WEIGHTS_FILE).stat().st_size
        where = f"model directory {target}"
    elif target in ModelConfig.preset_names():
        config, size, where = ModelConfig.preset(target), None, f"preset {target!r}"
    else:
        raise CLIError(f"{target!r} is neither a model directory (with {CONFIG_FILE}) nor a "
                       f"preset ({', '.join(ModelConfig.preset_names())})")
    params = config.num_parameters()
    from soundstorm.kernels import available_backends
    info = {"source": where, "parameters": params, "config": config.to_dict(),
            "default_forward_passes": DecodeConfig().num_forward_passes(config.num_quantizers),
            "cpu_backends": list(available_backends(torch.device("cpu"))),
            "cpu_quantize": ["none", *QUANTIZE_MODES]}
    if size is not None:
        info["weights_bytes"] = size
        info["weights_checksum"] = "verified" if checksum else "none recorded"
    if args.json:
        print(json.dumps(info))
        return 0
    print(where)
    print(f"  parameters: {params:,} ({params / 1e6:.1f}M)")
    if size is not None:
        print(f"  weights:    {size / 2**20:.1f} MiB ({WEIGHTS_FILE}), checked; "
              + ("sha256 checksums verified" if checksum else "no checksums recorded"))
    for key, value in config.to_dict().items():
        print(f"  {key + ':':<20}{value}")
    print(f"  on this CPU:        backends {', '.join(info['cpu_backends'])} (auto picks "
          f"{info['cpu_backends'][0]}); --quantize {' or '.join(info['cpu_quantize'])}")
    return 0


def _is_text_model(directory: Path) -> bool:
    from soundstorm.engine.text_model import FORMAT_NAME as TEXT_FORMAT

    try:
        return json.loads((directory / CONFIG_FILE).read_text()).get("format") == TEXT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False  # the model loader's own checks name what is wrong


def _info_text_model(directory: Path, as_json: bool) -> int:
    """`info` of a text-to-semantic model directory: every loader check, then its shape."""
    from soundstorm.engine.text_model import TextToSemantic

    model = TextToSemantic.from_pretrained(directory)
    params = sum(p.numel() for p in model.parameters())
    size = (directory / WEIGHTS_FILE).stat().st_size
    info = {"source": f"text-to-semantic model directory {directory}", "parameters": params,
            "config": model.config.to_dict(), "weights_bytes": size}
    if as_json:
        print(json.dumps(info))
        return 0
    print(info["source"])
    print(f"  parameters: {params:,} ({params / 1e6:.1f}M)")
    print(f"  weights:    {size / 2**20:.1f} MiB ({WEIGHTS_FILE}), checked")
    for key, value in info["config"].items():
        print(f"  {key + ':':<20}{value}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from soundstorm.engine import benchmark

    device = _check_device(args.device)
    if args.seconds is not None:
        _positive_seconds(args.seconds, "--seconds")
    _at_least_one(args.batch, "--batch")
    _at_least_one(args.repeats, "--repeats")
    cfg = ModelConfig.preset(args.preset)
    seconds = args.seconds if args.seconds is not None else benchmark.default_seconds(cfg)
    longest = benchmark.max_seconds(cfg)
    if seconds > longest:
        raise CLIError(f"--seconds {seconds:g}: the {args.preset} preset holds at most "
                       f"{longest:g} s ({cfg.max_frames} frames)")
    if args.history:
        _check_history(Path(args.history))
    say = None if args.quiet else (lambda msg: print(f"  {msg}", file=sys.stderr, flush=True))
    r = benchmark.run_preset(args.preset, seconds, args.batch, args.backend, args.dtype,
                             device, args.repeats, progress=say, quantize=args.quantize)
    print(f"{r['preset']} preset, {r['seconds']:g} s of audio ({r['frames']} frames), batch "
          f"{r['batch']}, {r['dtype']}" + (f" with {r['quantize']} linear layers"
                                            if r.get('quantize') else "")
          + f", backend {r['backend']} on {r['device']}, {r['threads']} threads")
    print(f"  wall time         {r['wall_s']:.3f} s (median of {r['repeats']}; "
          f"min {r['wall_s_min']:.3f}, max {r['wall_s_max']:.3f}; warm-up excluded)")
    print(f"  real-time factor  {real_time_text(r['real_time_factor'])}; "
          f"{r['frames_per_s']:.0f} frames/s")
    print(f"  forward passes    {r['forward_passes']} ({r['gflop_per_pass']:.1f} GFLOP each)")
    print(f"  achieved          {r['achieved_gflops']:.1f} GFLOP/s")
    print(f"  torch.matmul      {r['matmul_gflops']:.1f} GFLOP/s at the same shapes and dtype")
    print(f"  fraction          {r['fraction_of_matmul']:.2f} of matmul FLOP/s "
          f"(per-round min {r['fraction_min']:.2f}, max {r['fraction_max']:.2f})")
    if "int8_matmul_gflops" in r:
        print(f"  int8 roofline     {r['int8_matmul_gflops']:.1f} GFLOP/s: torch._int_mm at the "
              f"linear layers' shapes, float matmul for attention and the head")
        print(f"  fraction          {r['fraction_of_int8_matmul']:.2f} of the int8 roofline "
              f"(per-round min {r['fraction_int8_min']:.2f}, max {r['fraction_int8_max']:.2f})")
    if args.history:
        try:
            benchmark.append_history(args.history, r)
        except OSError as e:
            raise CLIError(f"--history {args.history}: cannot append to it ({e.strerror or e})")
        print(f"  appended to       {args.history}")
    if args.json:
        print(json.dumps(r))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from soundstorm.demo import ASSETS
    from soundstorm.demo.run import run_demo

    _check_output_dir(Path(args.out), "--out")
    if args.assets is not None and not Path(args.assets).is_dir():
        raise CLIError(f"--assets {args.assets}: not a directory (expected model/, codec/, "
                       f"semantic/ and demo.json)")
    run_demo(args.out, assets=args.assets or ASSETS, utterances=args.utterances,
             prompt_seconds=args.prompt_seconds, max_seconds=args.max_seconds, seed=args.seed,
             ablation=args.ablation, speaker_similarity=args.speaker_similarity,
             wer=args.wer, progress=not args.quiet, backend=args.backend,
             quantize=args.quantize)
    return 0


def _add_quantize(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantize", choices=["none", *QUANTIZE_MODES], default="none",
                        type=lambda v: v.lower(),
                        help="none (default: float matmuls, the exact path) or int8: the "
                             "Conformer's linear layers in int8 (CPU, float32)")


def _add_quiet(parser: argparse.ArgumentParser, what: str) -> None:
    """--quiet (and its alias --no-progress): the same flag and meaning in every command:
    no progress output on stderr; results and errors are printed as usual."""
    parser.add_argument("--quiet", "--no-progress", dest="quiet", action="store_true",
                        help=f"{what}; results are still printed (--no-progress is the same "
                             f"flag)")


def build_parser() -> argparse.ArgumentParser:
    parser = CLIParser(
        prog="soundstorm",
        description="SoundStorm: parallel level-wise decoding of RVQ audio-codec tokens from "
                    "semantic tokens and a voice prompt.")
    from soundstorm.cli import audio as audio_cli

    parser.add_argument("--version", action="version", version=audio_cli.print_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    g = sub.add_parser(
        "generate", help="generate codec tokens from semantic ids",
        description="Generate RVQ codec tokens [T, Q] (or [B, T, Q]) from semantic ids and "
                    "write them as .npy. With --preset instead of --model the weights are "
                    "random: useful to measure speed, not to listen to.",
        epilog="example: soundstorm generate --model my-model/ --semantic ids.npy "
               "--prompt voice.npy --out tokens.npy")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="DIR", help="model directory (config.json + model.safetensors)")
    src.add_argument("--preset", choices=ModelConfig.preset_names(),
                     help="randomly initialised model of a preset")
    g.add_argument("--semantic", metavar="NPY",
                   help="semantic ids, int [S] or [B, S] at the model's semantic rate")
    g.add_argument("--manifest", metavar="JSONL",
                   help="a batch: one JSON object per line, {\"semantic\": \"a.npy\", "
                        "\"prompt\": \"p.npy\", \"seed\": 1, \"out\": \"a.tokens.npy\"} "
                        "(prompt, seed, out optional; paths relative to the manifest); decoded "
                        "together with continuous batching; without \"out\", tokens go to "
                        "--out DIR (default: the manifest's folder) as 00000.npy, ...")
    g.add_argument("--max-batch", type=int, default=8,
                   help="with --manifest: requests per forward pass (default 8)")
    g.add_argument("--seconds", type=float, metavar="S",
                   help="without --semantic: random semantic ids for S seconds (default 10, "
                        "or the model's longest if it holds less: 5.12 for tiny)")
    g.add_argument("--batch", type=int, default=1, help="with --seconds: batch size (default 1)")
    g.add_argument("--prompt", metavar="NPY",
                   help="voice prompt codec tokens, int [P, Q] or [B, P, Q]")
    g.add_argument("--out", metavar="NPY|WAV",
                   help="where to write the tokens (.npy, int64, -1 = padding; the prompt's "
                        "frames come first), or the generated audio after the prompt (.wav, "
                        "decoded with --codec)")
    g.add_argument("--steps", metavar="LIST",
                   help="iterations per level, e.g. 16,1,1,... (one value = level 1 only; "
                        "default: the paper's 16 then 1 per level)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0 = greedy)")
    g.add_argument("--seed", type=int, help="decoding seed (default: fresh)")
    g.add_argument("--init-seed", type=int, default=0, help="with --preset: weight init seed")
    g.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cpu)")
    g.add_argument("--dtype", choices=sorted(DTYPES), help="compute dtype (default float32)")
    g.add_argument("--backend", default="auto",
                   help="op backend: auto (default), torch, triton, cpp, or xla (the "
                        "whole decode in JAX: pip install 'soundstorm[xla]')")
    _add_quantize(g)
    g.add_argument("--json", action="store_true", help="also print a JSON summary as the last line")
    audio_cli.add_generate_flags(g)
    _add_quiet(g, "no progress bar on stderr")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="show a model's configuration and size",
                       description="Show the configuration and parameter count of a model "
                                   "directory or a preset.")
    i.add_argument("target", metavar="DIR|PRESET")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    _add_quiet(i, "accepted for uniformity: info shows no progress")
    i.set_defaults(func=cmd_info)

    b = sub.add_parser(
        "bench", help="measure decode speed (real-time factor, FLOP/s vs matmul)",
        description="Time the default decode of random semantic ids with a randomly "
                    "initialised preset model: real-time factor, frames/s, forward passes, "
                    "achieved FLOP/s and its fraction of torch.matmul's FLOP/s at the same "
                    "shapes and dtype, measured in the same run. Warm-up is excluded; the "
                    "wall time is the median over --repeats rounds.",
        epilog="example: soundstorm bench --preset small --seconds 10 --history bench.jsonl")
    b.add_argument("--preset", default="small", choices=ModelConfig.preset_names())
    b.add_argument("--seconds", type=float,
                   help="audio length (default 10, or the preset's longest if it holds less: "
                        "5.12 for tiny)")
    b.add_argument("--batch", type=int, default=1, help="clips decoded together (default 1)")
    b.add_argument("--backend", default="auto",
                   help="op backend: auto (default), torch, cpp, triton, or xla (the "
                        "whole decode in JAX)")
    b.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    _add_quantize(b)
    b.add_argument("--device", help="cpu, cuda, ... (default cpu)")
    b.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    b.add_argument("--history", metavar="JSONL",
                   help="append a record (commit, machine, settings, figures) to this file")
    b.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    _add_quiet(b, "no progress lines on stderr")
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser(
        "demo", help="speak held-out sentences in a held-out voice with the shipped model",
        description="The offline end-to-end demo. The shipped model (trained by this project "
                    "on an espeak-ng corpus) generates held-out sentences from their semantic "
                    "ids and a 3 s prompt of a voice it never heard. Writes the prompt, "
                    "original, codec resynthesis and generated audio as WAV, their "
                    "spectrograms as a PNG, and a report (real-time factor, speaker "
                    "similarity and rank among all the corpus's voices, word error rate, "
                    "spectrogram distance, token accuracy, decoding ablation).",
        epilog="example: soundstorm demo --out soundstorm-demo/")
    d.add_argument("--out", default="soundstorm-demo", metavar="DIR",
                   help="output folder (default ./soundstorm-demo/)")
    d.add_argument("--utterances", type=int, default=8, help="held-out sentences (8)")
    d.add_argument("--prompt-seconds", type=float, default=3.0, help="voice prompt (3.0)")
    d.add_argument("--max-seconds", type=float, default=6.0,
                   help="cut held-out sentences to at most this long (6.0)")
    d.add_argument("--seed", type=int, default=0, help="decoding seed (0)")
    d.add_argument("--no-ablation", dest="ablation", action="store_false",
                   help="decode with the default schedule only")
    d.add_argument("--no-speaker-similarity", dest="speaker_similarity", action="store_false",
                   help="skip the resemblyzer speaker-similarity scores")
    d.add_argument("--no-wer", dest="wer", action="store_false",
                   help="skip the pocketsphinx word error rates")
    d.add_argument("--assets", metavar="DIR",
                   help="another demo assets directory (model/, codec/, semantic/, demo.json)")
    d.add_argument("--backend", default="torch",
                   help="op backend: torch (default: the shipped figures' path), auto, cpp")
    _add_quantize(d)
    _add_quiet(d, "no progress bars on stderr")
    d.set_defaults(func=cmd_demo)

    audio_cli.add_commands(sub, _add_quiet)
    from soundstorm.cli import speech as speech_cli
    speech_cli.add_commands(sub, _add_quiet)

    # Training subcommands: listed here, parsed and run by soundstorm.training.cli, which
    # is imported only when one of them runs.
    for name, text in TRAINING_HELP.items():
        sub.add_parser(name, add_help=False, help=text)
    return parser


TRAINING_HELP = {
    "train": "train a model on a token corpus (see: soundstorm train --help)",
    "synthetic-corpus": "write a synthetic token corpus for tests and quick experiments",
    "speech-corpus": "speak a reproducible espeak-ng corpus (the demo's training data)",
    "fit-codec": "fit the built-in melrvq codec on audio",
    "fit-vocoder": "train the melrvq codec's learned vocoder on audio",
    "fit-semantic": "fit a semantic tokenizer (mfcc, hubert, w2v-bert k-means) on audio",
    "tokenize": "audio files -> codec tokens + semantic ids (a training corpus)",
    "train-text": "train the text-to-semantic model on a corpus with transcripts",
    "calibrate-copy": "fit a prompt lookup model's copy gates to voices it was not trained on",
}
TRAINING_COMMANDS = tuple(TRAINING_HELP)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TRAINING_COMMANDS:
        from soundstorm.training.cli import main as training_main
        return training_main(argv[0], argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "quantize", None) == "none":
        args.quantize = None
    try:
        return args.func(args)
    except CLIError as e:
        message = str(e)
    except OSError as e:
        message = _os_error_message(e, args)
    except RecursionError:
        message = "an input file is nested too deeply to read"
    except (ValueError, TypeError, RuntimeError) as e:
        message = str(e)
    parser.exit(2, f"soundstorm {args.command}: error: {message}\n")


# Arguments that name files or directories, for naming the one an OS error is about.
PATH_ARGUMENTS = ("model", "semantic", "prompt", "manifest", "out", "history", "assets",
                  "prompt_wav", "codec_path", "text_model", "text_file", "transcript", "voice")


def _os_error_message(e: OSError, args: argparse.Namespace) -> str:
    """One line for an OS error: the argument whose path it concerns, the path, the reason."""
    if e.filename is None:
        return str(e)
    failed = Path(os.fsdecode(e.filename)).absolute()
    reason = e.strerror or str(e)
    for name in PATH_ARGUMENTS:
        value = getattr(args, name, None)
        if not isinstance(value, str):   # unset, or a list (dialogue's --voice NAME=...)
            continue
        given = Path(value).absolute()
        if failed == given or given in failed.parents:
            where = "" if failed == given else f" ({failed})"
            return f"--{name.replace('_', '-')} {value}: {reason}{where}"
    return f"{reason}: {os.fsdecode(e.filename)}"
