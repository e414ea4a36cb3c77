"""Decode-speed measurement shared by `soundstorm bench` and the `bench/` suite.

Speed is reported the way it survives a shared, noisy machine: as ratios measured in one
run. Decode runs alternate with passes of `torch.matmul` over exactly the products one
forward pass multiplies (the matmul roofline, each layer with its own weight matrix), so
both see the same load; the fraction of matmul FLOP/s is the median of per-round ratios.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from soundstorm.engine.config import DecodeConfig, ModelConfig
from soundstorm.engine.engine import Engine, resolve_dtype
from soundstorm.engine.flops import forward_gemms

DEFAULT_SECONDS = 10.0


def max_seconds(cfg: ModelConfig) -> float:
    """The longest audio a model holds: the most semantic ids whose frames fit in
    `max_frames`, in seconds (5.12 for the tiny preset, 30 for small and paper)."""
    num, den = cfg.semantic_index_fraction()   # semantic ids per frame = num / den
    ids = ((cfg.max_frames + 1) * num - 1) // den
    return ids / cfg.semantic_rate


def default_seconds(cfg: ModelConfig) -> float:
    """The audio length commands use when none is given: 10 s, or less if the model holds
    less."""
    return min(DEFAULT_SECONDS, max_seconds(cfg))


def real_time_text(rtf: float) -> str:
    """A real-time factor (seconds of compute per second of audio) in words that say which
    way it goes: "0.31 s per second of audio, 3.23x faster than real time" or "1.11 s per
    second of audio, 0.90x real time (slower than real time)"."""
    if not (math.isfinite(rtf) and rtf > 0):
        return f"{rtf:.3g} s per second of audio"
    speed = 1 / rtf
    times = f"{speed:.2f}x" if speed < 100 else f"{speed:,.0f}x"
    if rtf < 1:
        pace = f"{times} faster than real time"
    elif rtf > 1:
        pace = f"{times} real time (slower than real time)"
    else:
        pace = "exactly real time"
    return f"{rtf:.3g} s per second of audio, {pace}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# The products that stay in float when the linear layers are int8 (engine.quantize).
FLOAT_GEMMS = ("attn_scores", "attn_values", "head")


def matmul_pass(engine: Engine, batch: int, frames: int,
                int8: bool = False) -> Callable[[], float]:
    """A function that runs one forward pass's products (same shapes, dtype and device as
    `engine`) and returns the seconds it took: all in torch.matmul, or with `int8` the
    linear layers' products in torch._int_mm (int8 [m, k] x int8 [k, n] -> int32, the
    weight a transposed [n, k] matrix as `Int8Linear` holds it) and the rest in
    torch.matmul, as a `quantize="int8"` engine runs them."""
    cfg, dtype, device = engine.config, engine.dtype, engine.device
    operands = []
    for g in forward_gemms(cfg, batch, frames):
        shape_a = (g.batch, g.m, g.k) if g.batch > 1 else (g.m, g.k)
        shape_b = (g.batch, g.k, g.n) if g.batch > 1 else (g.k, g.n)
        if int8 and g.name not in FLOAT_GEMMS:
            a = torch.randint(-127, 128, shape_a, dtype=torch.int8, device=device)
            operands += [(torch._int_mm, a, torch.randint(
                -127, 128, (g.n, g.k), dtype=torch.int8, device=device).t())
                for _ in range(g.count)]
            continue
        a = torch.randn(shape_a, dtype=dtype, device=device)
        operands += [(torch.matmul, a, torch.randn(shape_b, dtype=dtype, device=device))
                     for _ in range(g.count)]

    def one_pass() -> float:
        synchronize(device)
        start = time.perf_counter()
        for mm, a, b in operands:
            mm(a, b)
        synchronize(device)
        return time.perf_counter() - start

    return one_pass


def bench_inputs(engine: Engine, seconds: float, batch: int, seed: int = 0) -> torch.Tensor:
    """Random semantic ids [batch, S] for `seconds` of audio (S rounded up)."""
    cfg = engine.config
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"seconds must be a finite number > 0, got {seconds}")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")
    # Rounded up, but a length given as S / semantic_rate (5.12 s) is S ids despite the
    # float product's last bit.
    S = max(1, math.ceil(seconds * cfg.semantic_rate - 1e-9))
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.semantic_vocab_size, (batch, S), generator=g)


def measure_decode(engine: Engine, seconds: float, batch: int = 1, repeats: int = 3,
                   decode: Optional[DecodeConfig] = None,
                   progress: Optional[Callable[[str], None]] = None) -> dict:
    """Time `engine.generate` for `batch` clips of `seconds` (warm-up excluded) and the
    matmul roofline at the same shapes, alternating; returns the figures as a dict. An
    engine with int8 linear layers is also timed against the int8 roofline
    (`matmul_pass(..., int8=True)`)."""
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    cfg = engine.config
    decode = decode or DecodeConfig()
    semantic = bench_inputs(engine, seconds, batch)
    frames = cfg.frames_for(semantic.shape[1])
    if frames > cfg.max_frames:
        raise ValueError(f"{seconds:g} s is {frames} frames, more than the preset's "
                         f"max_frames={cfg.max_frames} (at most {max_seconds(cfg):g} s)")
    passes = decode.num_forward_passes(cfg.num_quantizers)
    pass_flops = sum(g.flops for g in forward_gemms(cfg, batch, frames))
    roofline = matmul_pass(engine, batch, frames)
    int8 = getattr(engine, "quantize", None) == "int8"
    roofline8 = matmul_pass(engine, batch, frames, int8=True) if int8 else None

    def decode_once(seed: int) -> float:
        synchronize(engine.device)
        start = time.perf_counter()
        engine.generate(semantic, decode=decode, seed=seed)
        synchronize(engine.device)
        return time.perf_counter() - start

    if progress:
        progress("warm-up")
    decode_once(0)
    roofline()
    walls, matmul_s, int8_s = [], [], []
    for r in range(repeats):
        if progress:
            progress(f"round {r + 1}/{repeats}")
        walls.append(decode_once(r + 1))
        matmul_s.append(min(roofline() for _ in range(3)))
        if int8:
            int8_s.append(min(roofline8() for _ in range(3)))
    fractions = [(passes * pass_flops / w) / (pass_flops / m) for w, m in zip(walls, matmul_s)]

    wall = statistics.median(walls)
    audio = batch * frames / cfg.frame_rate
    flops = passes * pass_flops
    result = {
        "backend": engine.backend, "device": str(engine.device),
        "dtype": str(engine.dtype).replace("torch.", ""),
        "quantize": getattr(engine, "quantize", None), "seconds": seconds, "batch": batch,
        "frames": frames, "forward_passes": passes, "repeats": repeats,
        "wall_s": wall, "wall_s_min": min(walls), "wall_s_max": max(walls),
        "real_time_factor": wall / audio, "frames_per_s": batch * frames / wall,
        "gflop_per_pass": pass_flops / 1e9, "achieved_gflops": flops / wall / 1e9,
        "matmul_gflops": pass_flops / statistics.median(matmul_s) / 1e9,
        "matmul_gflops_min": pass_flops / max(matmul_s) / 1e9,
        "matmul_gflops_max": pass_flops / min(matmul_s) / 1e9,
        "fraction_of_matmul": statistics.median(fractions),
        "fraction_min": min(fractions), "fraction_max": max(fractions),
    }
    if int8:
        fractions8 = [m / (w / passes) for w, m in zip(walls, int8_s)]
        result.update({
            "int8_matmul_gflops": pass_flops / statistics.median(int8_s) / 1e9,
            "fraction_of_int8_matmul": statistics.median(fractions8),
            "fraction_int8_min": min(fractions8), "fraction_int8_max": max(fractions8),
        })
    return result


def run_preset(preset: str, seconds: float, batch: int = 1, backend: str = "auto",
               dtype: Union[str, torch.dtype] = "float32", device: Optional[str] = None,
               repeats: int = 3, progress: Optional[Callable[[str], None]] = None,
               quantize: Optional[str] = None) -> dict:
    """`measure_decode` on a randomly initialised model of a preset."""
    engine = Engine.from_preset(preset, device=device, dtype=resolve_dtype(dtype),
                                backend=backend, quantize=quantize)
    result = measure_decode(engine, seconds, batch, repeats, progress=progress)
    return {"preset": preset, "threads": torch.get_num_threads(), **result}


# -- history ----------------------------------------------------------------------------
def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"host": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def source_commit() -> Optional[str]:
    """The git commit of the source tree this package runs from, if it is a checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


SETTINGS = ("preset", "seconds", "batch", "backend", "dtype", "quantize", "device")


def history_record(result: dict) -> dict:
    """A JSON-lines record: when, which commit, which machine, which settings, figures."""
    return {
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": source_commit(), "machine": machine_info(),
        # quantize only when set: float records compare with those written before it existed
        "settings": {k: result[k] for k in SETTINGS
                     if k in result and not (k == "quantize" and result[k] is None)},
        "figures": {k: v for k, v in result.items() if k not in SETTINGS},
    }


def append_history(path: Union[str, Path], result: dict) -> dict:
    """Append one record to a JSON-lines history file (one write, one line)."""
    record = history_record(result)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
    return record


def read_history(path: Union[str, Path]) -> list[dict]:
    """All records of a history file; a malformed line raises naming its number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark history not found: {path}")
    records = []
    for n, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{path}:{n}: not UTF-8 text") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON record ({e})") from e
        except RecursionError:
            raise ValueError(f"{path}:{n}: not a benchmark record (JSON nested too "
                             f"deeply)") from None
        if not isinstance(record, dict) or not {"settings", "figures"} <= set(record):
            raise ValueError(f"{path}:{n}: not a benchmark record (needs settings and figures)")
        records.append(record)
    return records
