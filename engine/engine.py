"""`Engine`: a loaded model, a device, a dtype and a backend, and `generate`, which checks
its inputs, plans the schedule and runs the level-wise decoder."""

from __future__ import annotations

import copy
import reprlib
import secrets
import threading
from pathlib import Path
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch

from soundstorm.engine import longform
from soundstorm.engine.config import DecodeConfig, ModelConfig
from soundstorm.engine.decode import OnStep
from soundstorm.engine.longform import StreamChunk
from soundstorm.engine.runner import StepRunner, modes_for, step_activation_bytes
from soundstorm.engine.scheduler import RequestHandle, Scheduler, batch_buckets, length_buckets
from soundstorm.engine.model import SoundStorm, check_memory
from soundstorm.engine.quantize import QUANTIZE_MODES, quantize_int8
from soundstorm.kernels import get_ops

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float64": torch.float64, "fp64": torch.float64,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
SEED_LIMIT = 2 ** 63
# `generate` decodes at most max(max_batch, MAX_GENERATE_ROWS) rows per pass; a larger
# batch is decoded in consecutive chunks of that many rows (rows are independent, so the
# tokens are the same as in one pass).
MAX_GENERATE_ROWS = 64
# `warmup` prepares at most this many (batch, length) buckets at once.
MAX_WARMUP_BUCKETS = 256

Seed = Union[int, Sequence[int], torch.Tensor, None]


def resolve_dtype(dtype: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype in DTYPES.values()):
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be one of float32, float64, bfloat16, float16, got {dtype!r}")


@dataclass
class PreparedBatch:
    """Checked inputs of a batch and the decoder's starting state (on the engine's device)."""
    semantic: torch.Tensor        # int64 [B, S], ids past a row's length zeroed
    semantic_lengths: List[int]
    frames: List[int]             # T_b: frames of each row
    prompt_lengths: List[int]     # P_b
    tokens: torch.Tensor          # int64 [B, T, Q]: prompt frames filled, MASK elsewhere
    frame_valid: torch.Tensor     # bool [B, T]
    seeds: torch.Tensor           # int64 [B] (CPU)
    decode: DecodeConfig
    steps_per_level: Tuple[int, ...]

    @property
    def to_decode(self) -> List[int]:
        return [t - p for t, p in zip(self.frames, self.prompt_lengths)]


class Engine:
    """SoundStorm inference: semantic ids (+ voice prompt) -> RVQ codec tokens.

    model_or_dir: a `SoundStorm` module or a directory written by `save_pretrained`.
    device:       where to run (default: the model's device, CPU for a directory).
    dtype:        float32 (default), float64, bfloat16 or float16.
    backend:      "auto" (fastest available on the device) or a backend name; "torch" is
                  the plain PyTorch reference every other backend is tested against.
    max_batch:    most requests the scheduler decodes in one pass (`submit`,
                  `generate_many`); `generate` decodes up to max(max_batch, 64) rows per
                  pass (`max_generate_rows`) and larger batches in chunks of that many.
    cuda_graphs:  replay each step as a captured CUDA graph (default: on CUDA devices);
                  False runs every step eagerly.
    warmup:       capture every step graph now (`Engine.warmup()`) rather than on first
                  use.
    quantize:     None (default: float matmuls, the exact path) or "int8": the Conformer's
                  linear layers run in int8 (`soundstorm.engine.quantize`; CPU, float32
                  only). A model passed as a module is copied first, never changed.

    Every pass of the engine goes through its one `runner` (static buffers per (batch,
    length) bucket, the step graphs and one lock), so the engine may be used from several
    threads. Several GPUs: one engine per device; each runs under its own device guard.
    """

    def __new__(cls, model_or_dir=None, device=None, dtype=None, backend: str = "auto",
                *args, **kwargs):
        if backend == "xla":   # the XLA path: whole decodes in JAX (soundstorm.engine.xla)
            if kwargs.pop("quantize", None) is not None:
                raise ValueError("quantize='int8' runs on backends torch and cpp (CPU), not "
                                 "on backend 'xla'; use quantize=None there")
            from soundstorm.engine.xla.engine import xla_engine
            return xla_engine(model_or_dir, device, dtype, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, model_or_dir: Union[SoundStorm, str, Path],
                 device: Union[str, torch.device, None] = None,
                 dtype: Union[str, torch.dtype, None] = None, backend: str = "auto",
                 max_batch: int = 8, cuda_graphs: Optional[bool] = None,
                 warmup: bool = False, quantize: Optional[str] = None):
        dtype = resolve_dtype(dtype)
        if quantize is not None and quantize not in QUANTIZE_MODES:
            raise ValueError(f"quantize must be None or one of {list(QUANTIZE_MODES)}, "
                             f"got {quantize!r}")
        if isinstance(model_or_dir, SoundStorm):
            model = model_or_dir
        elif isinstance(model_or_dir, (str, Path)):
            model = SoundStorm.from_pretrained(model_or_dir, device=device,
                                               dtype=dtype or torch.float32)
        else:
            raise TypeError("model_or_dir must be a SoundStorm model or a model directory, "
                            f"got {type(model_or_dir).__name__}")
        if device is None:
            device = next(model.parameters()).device
        self.device = torch.device(device)
        if self.device.type == "meta":
            raise ValueError("the model's weights are on the meta device; load real weights "
                             "(SoundStorm.from_pretrained) before building an Engine")
        self.dtype = dtype or torch.float32
        if quantize == "int8" and (self.device.type != "cpu" or self.dtype != torch.float32):
            raise ValueError(f"quantize='int8' runs float32 models on the CPU (torch._int_mm "
                             f"with per-channel scales), got device {self.device} and dtype "
                             f"{self.dtype}; use quantize=None there")
        self.ops = get_ops(backend, self.device, self.dtype)
        self.backend = self.ops.name
        self.quantize = quantize
        if any(p.device != self.device or p.dtype != self.dtype for p in model.parameters()):
            # The weights are copied: check there is room before torch tries.
            count = model.config.num_parameters()
            check_memory(count * torch.empty((), dtype=self.dtype).element_size(),
                         self.device, f"moving a model of {count:,} parameters to "
                         f"{self.device} in {self.dtype}")
        if quantize is not None and model is model_or_dir:
            model = copy.deepcopy(model)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.model.ops = self.ops
        if quantize == "int8":
            quantize_int8(self.model, self.ops)
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        self.max_batch = max_batch
        self.max_generate_rows = max(max_batch, MAX_GENERATE_ROWS)
        self._scheduler: Optional[Scheduler] = None
        self._scheduler_lock = threading.Lock()
        self.runner = StepRunner(self, use_cuda_graphs=cuda_graphs)
        if warmup:
            self.warmup()

    @classmethod
    def from_preset(cls, name: str, seed: int = 0, **kwargs) -> "Engine":
        """An engine over a randomly initialised model of a preset (benchmarks, smoke tests)."""
        config = ModelConfig.preset(name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = SoundStorm(config)
        return cls(model, **kwargs)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    # -- generation ---------------------------------------------------------------------
    def generate(self, semantic: torch.Tensor, semantic_lengths: Optional[torch.Tensor] = None,
                 prompt: Optional[torch.Tensor] = None,
                 prompt_lengths: Optional[torch.Tensor] = None,
                 decode: Optional[DecodeConfig] = None, seed: Seed = None,
                 on_step: Optional[OnStep] = None) -> torch.Tensor:
        """Generate codec tokens for a batch.

        semantic:         int [B, S] semantic ids at the semantic rate
        semantic_lengths: int [B] real ids per row (default: all S)
        prompt:           int [B, P, Q] codec tokens of the voice prompt (the first frames
                          of every level)
        prompt_lengths:   int [B] real prompt frames per row (default: all P)
        decode:           a `DecodeConfig` (default: the paper's schedule)
        seed:             an int for every row, one int per row, or None for a fresh seed
        on_step:          called as on_step(level, iteration, tokens [B, T, Q]) after every
                          iteration (1-based); MASK = codebook_size, padding = -1
        returns           int64 [B, T, Q], T = floor(S * frame_rate / semantic_rate);
                          frames past a row's length are -1
        A batch of more than `max_generate_rows` rows is decoded in chunks of that many
        rows: the tokens are the same as in one pass (rows are independent), the memory of
        a pass stays bounded.
        """
        if on_step is not None and not callable(on_step):
            raise TypeError(f"on_step must be callable, got {on_step!r}")
        batch = self.prepare(semantic, semantic_lengths, prompt, prompt_lengths, decode, seed)
        B, T, Q = batch.tokens.shape
        steps = [(q, i) for q, s in enumerate(batch.steps_per_level, start=1)
                 for i in range(1, s + 1)]
        # Rows are decoded in chunks of at most `max_generate_rows`, one scheduler each. A
        # chunk's rows are admitted together and share one schedule, so they advance in
        # lockstep: after its step k every row has done iteration k, and their tokens stay
        # in the bucket's buffers from the first step to the last. With on_step the chunks
        # take turns step by step, so that every call sees the whole batch at one iteration.
        chunk = self.max_generate_rows
        schedulers, handles = [], []
        for start in range(0, B, chunk):
            rows = range(start, min(start + chunk, B))
            scheduler = Scheduler(self, max_batch=max(len(rows), self.max_batch), threaded=False)
            schedulers.append(scheduler)
            handles += [scheduler.enqueue(batch, b) for b in rows]
        if on_step is None:
            for scheduler in schedulers:
                for _ in steps:
                    scheduler.step()
        else:
            for level, iteration in steps:
                for scheduler in schedulers:
                    scheduler.step()
                rows = [h.result() if h.done() else self.runner.row_tokens(h._request)
                        for h in handles]
                on_step(level, iteration, _assemble(rows, T, Q))
        if any(scheduler.in_flight for scheduler in schedulers):
            raise RuntimeError("internal error: the batch did not finish with its schedule")
        return _assemble([h.result() for h in handles], T, Q)

    def prepare(self, semantic: torch.Tensor, semantic_lengths: Optional[torch.Tensor] = None,
                prompt: Optional[torch.Tensor] = None,
                prompt_lengths: Optional[torch.Tensor] = None,
                decode: Optional[DecodeConfig] = None, seed: Seed = None) -> "PreparedBatch":
        """Check `generate`'s inputs (raising ValueError/TypeError that name the argument,
        the value and what was expected) and build the decoder's starting state, on the
        host: nothing here touches the engine's device (the runner moves rows there)."""
        cfg = self.config
        decode = decode if decode is not None else DecodeConfig()
        if not isinstance(decode, DecodeConfig):
            raise TypeError(f"decode must be a DecodeConfig, got {type(decode).__name__}")
        steps_per_level = decode.resolve(cfg.num_quantizers)

        semantic_dtype = getattr(semantic, "dtype", None)
        semantic = _int_tensor("semantic", semantic, ndim=2, shape_doc="[B, S]")
        B, S = semantic.shape
        sem_len = _lengths("semantic_lengths", semantic_lengths, B, S, default=S)
        frames = [cfg.frames_for(s) for s in sem_len]
        T = cfg.frames_for(S)
        for b, (s, t) in enumerate(zip(sem_len, frames)):
            if t < 1:
                raise ValueError(
                    f"semantic row {b} has {s} ids, which make no codec frame at "
                    f"{cfg.semantic_rate} Hz -> {cfg.frame_rate} Hz; give at least "
                    f"{cfg.min_semantic_len()} ids")
        if T > cfg.max_frames:
            raise ValueError(
                f"semantic of length {S} asks for {T} frames, more than the model's "
                f"max_frames={cfg.max_frames} ({cfg.max_frames / cfg.frame_rate:g} s); for "
                "longer audio use Engine.generate_long or Engine.stream (slide-and-prompt "
                "windows)")
        _check_range("semantic", semantic, sem_len, cfg.semantic_vocab_size, semantic_dtype)

        if prompt is None:
            if prompt_lengths is not None:
                raise ValueError("prompt_lengths was given without a prompt")
            prompt = torch.empty(B, 0, cfg.num_quantizers, dtype=torch.int64)
        prompt_dtype = getattr(prompt, "dtype", None)
        prompt = _int_tensor("prompt", prompt, ndim=3, shape_doc="[B, P, Q]", allow_empty=True)
        if prompt.shape[0] != B:
            raise ValueError(f"prompt has batch size {prompt.shape[0]}, semantic has {B}")
        if prompt.shape[2] != cfg.num_quantizers:
            raise ValueError(f"prompt has {prompt.shape[2]} RVQ levels (shape "
                             f"{tuple(prompt.shape)}), the model has {cfg.num_quantizers}")
        P = prompt.shape[1]
        prompt_len = _lengths("prompt_lengths", prompt_lengths, B, P, default=P, minimum=0)
        for b, (p, t) in enumerate(zip(prompt_len, frames)):
            if p > t:
                raise ValueError(f"prompt row {b} has {p} frames, longer than the {t} frames "
                                 "its semantic ids make; the prompt must be the first frames "
                                 "of the target")
        _check_range("prompt", prompt, prompt_len, cfg.codebook_size, prompt_dtype)
        seeds = _seeds(seed, B)

        device = torch.device("cpu")
        # Ids past a row's length may be anything (e.g. -1 padding); the model must still
        # be able to look them up, and they never reach a real frame.
        sem_valid = torch.arange(S)[None, :] < torch.tensor(sem_len)[:, None]
        semantic = semantic.masked_fill(~sem_valid, 0).to(device)
        t_idx = torch.arange(T, device=device)
        frame_valid = t_idx[None, :] < torch.tensor(frames, device=device)[:, None]
        tokens = torch.full((B, T, cfg.num_quantizers), cfg.mask_id, dtype=torch.int64,
                            device=device)
        if P:
            in_prompt = t_idx[None, :P] < torch.tensor(prompt_len, device=device)[:, None]
            tokens[:, :P] = torch.where(in_prompt[..., None], prompt.to(device), cfg.mask_id)
        return PreparedBatch(semantic, sem_len, frames, prompt_len, tokens, frame_valid, seeds,
                             decode, steps_per_level)

    # -- continuous batching ------------------------------------------------------------
    @property
    def scheduler(self) -> Scheduler:
        """The engine's continuous-batching scheduler (a worker thread, created on first
        use, decoding up to `max_batch` requests per pass)."""
        with self._scheduler_lock:
            if self._scheduler is None:
                self._scheduler = Scheduler(self, max_batch=self.max_batch, threaded=True)
            return self._scheduler

    def submit(self, semantic: torch.Tensor, prompt: Optional[torch.Tensor] = None,
               decode: Optional[DecodeConfig] = None, seed: Optional[int] = None,
               on_step=None) -> RequestHandle:
        """Queue one utterance for decoding alongside whatever else is in flight; returns
        at once with a handle (`.result()` blocks for the int64 [T, Q] tokens).

        semantic: int [S] or [1, S]; prompt: int [P, Q] or [1, P, Q]; decode; seed (None:
        fresh). The tokens equal `generate` on this utterance alone with the same seed.
        Bad input raises here; a failure while decoding is reported through this handle
        only.
        """
        return self.scheduler.submit(semantic, prompt, decode, seed, on_step)

    def generate_many(self, requests: Sequence[dict]) -> List[torch.Tensor]:
        """Decode many utterances of any lengths together. Each request is a dict of one
        utterance's `submit` arguments (`semantic`, and optionally `prompt`, `decode`,
        `seed`); returns their int64 [T_i, Q] tokens (no padding) in request order. Every
        request is checked before any is queued; an error names the request
        ("requests[3]: ...")."""
        if isinstance(requests, dict) or not isinstance(requests, Sequence):
            raise TypeError("requests must be a list of dicts of submit() arguments, got "
                            f"{type(requests).__name__}")
        allowed = {"semantic", "prompt", "decode", "seed"}
        for i, request in enumerate(requests):
            if not isinstance(request, dict):
                raise TypeError(f"requests[{i}] must be a dict, got {type(request).__name__}")
            unknown = sorted(set(request) - allowed)
            if unknown or "semantic" not in request:
                raise ValueError(f"requests[{i}] has keys {sorted(request)}; expected "
                                 f"'semantic' and optionally 'prompt', 'decode', 'seed'")
        scheduler = Scheduler(self, max_batch=self.max_batch, threaded=False)
        handles = []
        for i, request in enumerate(requests):
            try:
                handles.append(scheduler.submit(**request))
            except (TypeError, ValueError) as error:
                kind = TypeError if isinstance(error, TypeError) else ValueError
                raise kind(f"requests[{i}]: {error}") from error
        scheduler.run_until_idle()
        return [h.result() for h in handles]

    # -- ahead of time -------------------------------------------------------------------
    def warmup(self, batch_sizes: Optional[Sequence[int]] = None,
               max_frames: Optional[int] = None,
               decodes: Optional[Sequence[DecodeConfig]] = None) -> dict:
        """Prepare every decoding step before the first request: allocate each (batch,
        length) bucket's buffers and, on CUDA, capture the step graph of every mode that
        `decodes` can produce, largest bucket first, all into the runner's one memory pool.
        Afterwards no request waits for a capture.

        batch_sizes: bucket batch sizes, each at most `max_generate_rows` (default: the
                     scheduler's, powers of two up to max_batch; `generate` with B rows
                     uses the smallest that holds B)
        max_frames:  capture the length buckets up to the one holding this many frames
                     (default: all, up to the model's max_frames)
        At most MAX_WARMUP_BUCKETS (256) (batch, length) buckets are prepared at once;
        narrow batch_sizes or max_frames for more.
        decodes:     the DecodeConfigs requests will use (default: the paper's schedule)
        returns      {"buckets", "modes", "graphs" (captured now), "seconds",
                     "pool_bytes" (measured on CUDA, else None), "pool_bytes_estimate"}
        """
        import time

        cfg = self.config
        sizes = batch_buckets(self.max_batch) if batch_sizes is None else tuple(batch_sizes)
        for b in sizes:
            if isinstance(b, bool) or not isinstance(b, int) or b < 1:
                raise ValueError(f"batch_sizes must be ints >= 1, got {list(sizes)!r}")
            if b > self.max_generate_rows:
                raise ValueError(f"batch size {b} in batch_sizes is larger than any pass of "
                                 f"this engine (max_generate_rows={self.max_generate_rows})")
        buckets_of = length_buckets(cfg.max_frames)
        if max_frames is not None:
            if isinstance(max_frames, bool) or not isinstance(max_frames, int) or not \
                    1 <= max_frames <= cfg.max_frames:
                raise ValueError(f"max_frames must be an int in 1..{cfg.max_frames} (the "
                                 f"model's max_frames), got {max_frames!r}")
            lengths = buckets_of.up_to(max_frames)
        else:
            lengths = tuple(buckets_of)
        if len(set(sizes)) * len(lengths) > MAX_WARMUP_BUCKETS:
            raise ValueError(
                f"warmup would prepare {len(set(sizes)) * len(lengths)} buckets "
                f"({len(set(sizes))} batch sizes x {len(lengths)} lengths up to "
                f"{lengths[-1]} frames), more than MAX_WARMUP_BUCKETS={MAX_WARMUP_BUCKETS}; "
                "pass max_frames= (the longest request you serve) or fewer batch_sizes=")
        decodes = [DecodeConfig()] if decodes is None else list(decodes)
        for d in decodes:
            if not isinstance(d, DecodeConfig):
                raise TypeError(f"decodes must be DecodeConfigs, got {type(d).__name__}")
        modes = modes_for(decodes, cfg.num_quantizers)
        buckets = [(b, t) for b in sizes for t in lengths]
        cuda = self.device.type == "cuda"
        reserved = torch.cuda.memory_reserved(self.device) if cuda else 0
        start = time.perf_counter()
        captured = self.runner.warmup(buckets, modes)
        if cuda:
            torch.cuda.synchronize(self.device)
        return {
            "buckets": sorted(buckets), "modes": modes, "graphs": len(captured),
            "seconds": time.perf_counter() - start,
            "pool_bytes": torch.cuda.memory_reserved(self.device) - reserved if cuda else None,
            "pool_bytes_estimate": max(step_activation_bytes(cfg, b, t, self.dtype, self.backend)
                                       for b, t in buckets),
        }

    # -- long-form ----------------------------------------------------------------------
    def stream(self, semantic: torch.Tensor, prompt: Optional[torch.Tensor] = None,
               decode: Optional[DecodeConfig] = None, seed: Optional[int] = None,
               window: Optional[int] = None, overlap: Optional[int] = None,
               codec=None) -> Iterator[StreamChunk]:
        """Generate one utterance of any length window by window (slide-and-prompt, see
        `soundstorm.engine.longform`), yielding a `StreamChunk` per finished window: its
        new frames `tokens` [n, Q] (and `audio = codec.decode(tokens[None])` given a codec),
        so playback can start before the clip is done.

        semantic: int [S] or [1, S]; prompt: int [P, Q] or [1, P, Q]; window, overlap:
        frames (default max_frames and 3 s); seed: int (None = fresh).
        Every argument is checked here, at the call (the windows are decoded lazily, as
        the iterator is consumed).
        """
        return longform.stream(self, semantic, prompt, decode, seed, window, overlap, codec)

    def generate_long(self, semantic: torch.Tensor, prompt: Optional[torch.Tensor] = None,
                      decode: Optional[DecodeConfig] = None, seed: Optional[int] = None,
                      window: Optional[int] = None, overlap: Optional[int] = None) -> torch.Tensor:
        """`stream` collected: int64 [T, Q] for T = floor(S * frame_rate / semantic_rate),
        however long. A clip that fits in one window decodes exactly as `generate`."""
        chunks = [c.tokens for c in self.stream(semantic, prompt, decode, seed, window, overlap)]
        return torch.cat(chunks, dim=0)


def _assemble(rows: List[torch.Tensor], T: int, Q: int) -> torch.Tensor:
    """Per-row tokens [T_b, Q] -> int64 [B, T, Q] with -1 past each row's length."""
    out = torch.full((len(rows), T, Q), -1, dtype=torch.int64, device=rows[0].device)
    for b, row in enumerate(rows):
        out[b, :row.shape[0]] = row
    return out


# -- input checks (host side, before the loop) ------------------------------------------
def _int_tensor(name: str, x, ndim: int, shape_doc: str, allow_empty: bool = False) -> torch.Tensor:
    """`x` checked to be a real (not meta) integer tensor of `ndim` dims, as int64 on the
    host. uint64 ids of 2**63 or more wrap to negative ids here; `_check_range` rejects
    them and, given the original dtype, shows their true value."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer ids {shape_doc}, "
                        f"got {type(x).__name__} {reprlib.repr(x)}")
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer ids, got dtype {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D {shape_doc}, got shape {tuple(x.shape)}")
    if x.numel() == 0 and not (allow_empty and x.shape[0] > 0 and x.shape[1] == 0):
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); expected {shape_doc} "
                         "with every dimension > 0")
    if x.device.type == "meta":
        raise ValueError(f"{name} is on the meta device and holds no ids; pass a real tensor")
    # Checks and the decoder's starting state live on the host (see `Engine.prepare`).
    return x.to(device="cpu", dtype=torch.int64)


def _lengths(name: str, lengths, batch: int, size: int, default: int,
             minimum: int = 1) -> list[int]:
    if lengths is None:
        return [default] * batch
    if isinstance(lengths, torch.Tensor):
        if lengths.is_floating_point() or lengths.dtype == torch.bool:
            raise TypeError(f"{name} must be integers, got dtype {lengths.dtype}")
        if lengths.ndim != 1:
            raise ValueError(f"{name} must be 1-D [B={batch}], got shape {tuple(lengths.shape)}")
        if lengths.device.type == "meta":
            raise ValueError(f"{name} is on the meta device and holds no values; pass a "
                             "real tensor")
        values = lengths.tolist()
    elif isinstance(lengths, (list, tuple)):
        values = list(lengths)
    else:
        raise TypeError(f"{name} must be a tensor or list of ints, got {type(lengths).__name__}")
    if len(values) != batch:
        raise ValueError(f"{name} has {len(values)} entries, expected one per row (B={batch})")
    for b, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name}[{b}] must be an int, got {v!r}")
        if not minimum <= v <= size:
            raise ValueError(f"{name}[{b}] = {v} is out of range; expected {minimum}..{size}")
    return values


def _check_range(name: str, x: torch.Tensor, lengths: list[int], upper: int,
                 source_dtype: Optional[torch.dtype] = None) -> None:
    """Every id of the int64 ids `x` [B, L, ...] within each row's length must lie in
    [0, upper). `source_dtype`: the caller's dtype, so an id shown in the error is the
    caller's value (a uint64 id >= 2**63 is negative in int64)."""
    if x.shape[1] == 0:
        return
    valid = torch.arange(x.shape[1], device=x.device)[None, :] < torch.tensor(
        lengths, device=x.device)[:, None]
    while valid.ndim < x.ndim:
        valid = valid[..., None]
    bad = valid & ((x < 0) | (x >= upper))
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        value = int(x[where])
        if source_dtype == torch.uint64 and value < 0:
            value += 2 ** 64
        raise ValueError(f"{name}{list(where)} = {value} is out of range; expected "
                         f"ids in 0..{upper - 1}")


def _seeds(seed: Seed, batch: int) -> torch.Tensor:
    if seed is None:
        return torch.full((batch,), secrets.randbits(63), dtype=torch.int64)
    if isinstance(seed, torch.Tensor):
        if seed.is_floating_point() or seed.dtype == torch.bool or seed.ndim > 1:
            raise TypeError(f"seed as a tensor must be integer [B], got {seed.dtype} "
                            f"{tuple(seed.shape)}")
        if seed.device.type == "meta":
            raise ValueError("seed is on the meta device and holds no values; pass a real "
                             "tensor")
        seed = seed.tolist()
    values = [seed] * batch if isinstance(seed, int) and not isinstance(seed, bool) else seed
    if not isinstance(values, (list, tuple)):
        raise TypeError(f"seed must be an int, a sequence of B ints, or None; got {seed!r}")
    if len(values) != batch:
        raise ValueError(f"seed has {len(values)} entries, expected one per row (B={batch})")
    for b, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < SEED_LIMIT:
            raise ValueError(f"seed[{b}] = {v!r}; seeds must be ints in 0..2**63-1")
    return torch.tensor(values, dtype=torch.int64)

