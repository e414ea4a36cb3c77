"""The engine's one step runner: static per-bucket buffers, the per-step function, and on
CUDA its captured graphs.

Every decoding pass of an engine, whoever asks for it (lockstep `Engine.generate`,
`generate_many`, the threaded scheduler behind `submit`, long-form windows), goes through
the engine's single `StepRunner`, one pass at a time under its lock. A pass

1. takes the bucket's buffers for its (batch, length) and, if the requests in it are not
   the ones already resident there, loads them: each request's tokens, semantic ids,
   length, seed and temperature (device-to-device copies; a request's tokens come to the
   device once, from pinned host memory, when it is first loaded);
2. stages the per-step parameters of every row (level, iteration, candidates to keep,
   noise scale, sample) in pinned host memory and copies them to the device without
   blocking (three copies, double-buffered so the host never overwrites a staging slot
   the device has not read);
3. runs the step function over the buffers: on CPU eagerly, on CUDA by replaying the
   graph captured for this (bucket, mode).

While the same requests stay in a bucket (lockstep `generate`, or the scheduler between
admissions and completions) their tokens stay resident in its buffers: nothing but the
staged parameters moves between steps. A request's tokens are copied back to its own
tensor only when another pass needs its rows (`Request.tokens` is then current again).

On CUDA every call runs under `torch.cuda.device(engine.device)`; graphs are captured on
the runner's own capture stream, in `thread_local` error mode (other threads may use the
GPU meanwhile), all into one shared memory pool: the pool holds about one step's
activations (the largest bucket's), not one copy per graph. `warmup` captures every
(bucket, mode) ahead of time, largest first.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

if TYPE_CHECKING:
    from soundstorm.engine.engine import Engine


@dataclass(frozen=True)
class StepMode:
    """What a step must compute, fixed per pass from the rows in it. A pass whose rows all
    take the argmax skips the candidate noise; one whose rows all keep every candidate (last
    iterations) skips ranking; one with no confidence noise skips that noise. On CUDA each
    (bucket, mode) has its own graph: the default schedule needs two per bucket."""
    sample: bool      # some row samples its candidates
    keep_all: bool    # every row keeps all its candidates
    noise: bool       # some row perturbs its confidence


ALL_MODES = tuple(StepMode(s, k, n) for s in (True, False) for k in (False, True)
                  for n in (True, False))


@dataclass
class Buffers:
    """Static inputs of one bucket's step. Per-request inputs are rewritten when other
    requests are loaded; per-step parameters are rewritten (by a staged copy) every step."""
    semantic: torch.Tensor     # int64 [B, S]
    tokens: torch.Tensor       # int64 [B, T, Q]
    lengths: torch.Tensor      # int64 [B]
    seeds: torch.Tensor        # int64 [B]
    temperature: torch.Tensor  # float32 [B]
    frame_index: torch.Tensor  # int64 [T]: 0..T-1
    step_int: torch.Tensor     # int64 [3, B]: level, iteration, num_keep of this step
    noise: torch.Tensor        # float32 [B]
    sample: torch.Tensor       # bool [B]
    staging: List["_Staging"]
    rows: tuple = ()           # the requests resident in rows 0.. (empty: none)
    next_staging: int = 0
    graphs: Dict[StepMode, "torch.cuda.CUDAGraph"] = field(default_factory=dict)
    warmed: set = field(default_factory=set)
    eager: set = field(default_factory=set)   # modes whose capture failed: run eagerly

    @property
    def level(self) -> torch.Tensor:       # int64 [B] 1-based
        return self.step_int[0]

    @property
    def iteration(self) -> torch.Tensor:   # int64 [B] 1-based
        return self.step_int[1]

    @property
    def num_keep(self) -> torch.Tensor:    # int64 [B]
        return self.step_int[2]

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    @property
    def frames(self) -> int:
        return self.tokens.shape[1]


@dataclass
class _Staging:
    """One slot of host memory for a step's parameters (pinned on CUDA), and the event
    after which the device has read it."""
    step_int: torch.Tensor     # int64 [3, B]
    noise: torch.Tensor        # float32 [B]
    sample: torch.Tensor       # bool [B]
    read: Optional["torch.cuda.Event"] = None


class StepRunner:
    """Runs decoding steps over static per-bucket buffers for one engine: eagerly on CPU,
    replaying captured CUDA graphs on CUDA. Thread-safe: one pass at a time."""

    def __init__(self, engine: "Engine", use_cuda_graphs: Optional[bool] = None):
        self.engine = engine
        self.device = engine.device
        on_cuda = self.device.type == "cuda"
        self.use_cuda_graphs = on_cuda if use_cuda_graphs is None else bool(use_cuda_graphs)
        if self.use_cuda_graphs and not on_cuda:
            raise ValueError("use_cuda_graphs=True needs a CUDA device; the engine is on "
                             f"{self.device}")
        self.lock = threading.RLock()
        self.buffers: Dict[Tuple[int, int], Buffers] = {}
        self._pool = None
        self._capture_stream = None

    # -- device context -----------------------------------------------------------------
    def device_guard(self):
        """`torch.cuda.device(engine.device)` on CUDA (kernels launch, and streams are
        made, on the current device), nothing elsewhere."""
        if self.device.type == "cuda":
            return torch.cuda.device(self.device)
        return contextlib.nullcontext()

    # -- buffers ------------------------------------------------------------------------
    def buffers_for(self, batch: int, frames: int) -> Buffers:
        key = (batch, frames)
        if key not in self.buffers:
            cfg, dev = self.engine.config, self.device
            num, den = cfg.semantic_index_fraction()
            S = ((frames - 1) * num) // den + 1
            i64 = dict(dtype=torch.int64, device=dev)
            pin = dev.type == "cuda"
            staging = [_Staging(torch.zeros(3, batch, dtype=torch.int64, pin_memory=pin),
                                torch.zeros(batch, dtype=torch.float32, pin_memory=pin),
                                torch.zeros(batch, dtype=torch.bool, pin_memory=pin))
                       for _ in range(2)]
            step_int = torch.zeros(3, batch, **i64)
            step_int[:2] = 1
            self.buffers[key] = Buffers(
                semantic=torch.zeros(batch, S, **i64),
                tokens=torch.full((batch, frames, cfg.num_quantizers), cfg.mask_id, **i64),
                lengths=torch.ones(batch, **i64), seeds=torch.zeros(batch, **i64),
                temperature=torch.ones(batch, dtype=torch.float32, device=dev),
                frame_index=torch.arange(frames, **i64), step_int=step_int,
                noise=torch.zeros(batch, dtype=torch.float32, device=dev),
                sample=torch.zeros(batch, dtype=torch.bool, device=dev), staging=staging)
        return self.buffers[key]

    # -- one pass over requests -----------------------------------------------------------
    def run(self, requests: Sequence, batch: int, frames: int) -> Buffers:
        """One decoding step for `requests` (scheduler `Request`s, each at its own cursor)
        in the (batch, frames) bucket. Afterwards their current tokens are rows 0..n-1 of
        the returned buffers (`row_tokens`)."""
        with self.lock, self.device_guard(), torch.no_grad():
            buf = self.buffers_for(batch, frames)
            if buf.rows != tuple(requests):
                self._load(buf, requests)
            self._stage(buf, requests)
            mode = StepMode(sample=any(r.sample[r.cursor] for r in requests),
                            keep_all=all(r.keep_all[r.cursor] for r in requests),
                            noise=any(r.noise[r.cursor] != 0.0 for r in requests))
            self.step(buf, mode)
            return buf

    def row_tokens(self, request) -> torch.Tensor:
        """A copy of `request`'s current tokens [T, Q] on the device, wherever they are."""
        with self.lock, self.device_guard():
            if self._resident(request):
                buf = request.resident_in
                return buf.tokens[request.row, :request.frames].clone()
            return request.tokens.to(self.device).clone()

    def release(self, request) -> None:
        """Forget `request`'s rows (it finished or failed): its rows may be reused."""
        with self.lock:
            if self._resident(request):
                buf = request.resident_in
                buf.rows = buf.rows[:request.row] + (None,) + buf.rows[request.row + 1:]
            request.resident_in = None

    def _save(self, request) -> None:
        """Copy a resident request's rows back into its own tensor."""
        if self._resident(request):
            buf = request.resident_in
            request.tokens.copy_(buf.tokens[request.row, :request.frames])
        request.resident_in = None

    @staticmethod
    def _resident(request) -> bool:
        """Whether `request`'s current tokens are in a bucket's rows (not its own tensor)."""
        buf = request.resident_in
        return buf is not None and request.row < len(buf.rows) and buf.rows[request.row] is request

    def _load(self, buf: Buffers, requests: Sequence) -> None:
        # Everyone whose rows are about to be overwritten or moved is saved first (a
        # request may move from row i of this bucket to row j < i).
        for request in set(requests) | {r for r in buf.rows if r is not None}:
            self._save(request)
        cfg = self.engine.config
        n = len(requests)
        buf.tokens[n:].fill_(cfg.mask_id)
        buf.semantic[n:].zero_()
        buf.lengths[n:].fill_(1)
        per_row = {"lengths": [], "seeds": [], "temperature": []}
        for i, r in enumerate(requests):
            if r.tokens.device != self.device:
                # First time on the device: one non-blocking copy from pinned memory.
                r.tokens = _to_device(r.tokens, self.device)
                r.semantic = _to_device(r.semantic, self.device)
            buf.tokens[i, :r.frames].copy_(r.tokens)
            buf.tokens[i, r.frames:].fill_(cfg.mask_id)
            S = min(r.semantic.shape[0], buf.semantic.shape[1])
            buf.semantic[i, :S].copy_(r.semantic[:S])
            buf.semantic[i, S:].zero_()
            per_row["lengths"].append(r.frames)
            per_row["seeds"].append(r.seed)
            per_row["temperature"].append(r.temperature)
            r.resident_in, r.row = buf, i
        for name, values in per_row.items():
            target = getattr(buf, name)
            target[:n].copy_(_to_device(torch.tensor(values, dtype=target.dtype), self.device))
        buf.rows = tuple(requests)

    def _stage(self, buf: Buffers, requests: Sequence) -> None:
        """This step's parameters: host slot -> device, without blocking the host."""
        slot = buf.staging[buf.next_staging]
        buf.next_staging = 1 - buf.next_staging
        if slot.read is not None:
            slot.read.synchronize()   # the copy that last read this slot is done
        pad = buf.batch - len(requests)
        cursors = [r.cursor for r in requests]
        slot.step_int.copy_(torch.tensor([
            [r.levels[c] for r, c in zip(requests, cursors)] + [1] * pad,
            [r.iterations[c] for r, c in zip(requests, cursors)] + [1] * pad,
            [r.num_keep[c] for r, c in zip(requests, cursors)] + [0] * pad]))  # pad: keep none
        slot.noise.copy_(torch.tensor([r.noise[c] for r, c in zip(requests, cursors)] + [0.0] * pad))
        slot.sample.copy_(torch.tensor([r.sample[c] for r, c in zip(requests, cursors)] + [False] * pad))
        blocking = self.device.type != "cuda"
        buf.step_int.copy_(slot.step_int, non_blocking=not blocking)
        buf.noise.copy_(slot.noise, non_blocking=not blocking)
        buf.sample.copy_(slot.sample, non_blocking=not blocking)
        if not blocking:
            slot.read = torch.cuda.Event()
            slot.read.record()

    # -- the step -------------------------------------------------------------------------
    def step(self, buf: Buffers, mode: StepMode) -> None:
        """One iteration for every row of `buf`, updating `buf.tokens` in place."""
        if not self.use_cuda_graphs or mode in buf.eager:
            self._step(buf, mode)
            return
        if mode not in buf.graphs:
            self._capture(buf, mode, run=True)
            return
        buf.graphs[mode].replay()

    def _capture(self, buf: Buffers, mode: StepMode, run: bool) -> None:
        """Warm up (one eager step on a side stream: allocator, cuBLAS handles, kernel
        compilation, rotary tables) and capture this (bucket, mode) into the shared pool.
        With `run`, the warm-up step is the real step; otherwise it ran on scratch values
        and the bucket holds no request afterwards."""
        if self._pool is None:
            cfg = self.engine.config
            # Tables the ops keep (rotary angles) exist before any graph reads them.
            self.engine.ops.prepare_capture(cfg.max_frames, cfg.head_dim, self.device)
            self._pool = torch.cuda.graph_pool_handle()
            self._capture_stream = torch.cuda.Stream(self.device)
        current = torch.cuda.current_stream(self.device)
        if mode not in buf.warmed:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                self._step(buf, mode)
            current.wait_stream(side)
            buf.warmed.add(mode)
            if not run:
                buf.rows = ()
            run = False
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool, stream=self._capture_stream,
                                  capture_error_mode="thread_local"):
                self._step(buf, mode)
        except Exception as error:
            # The warm-up step ran (and advanced the rows, when it was the real step):
            # failing the pass now would run it twice. Run this mode eagerly instead,
            # loudly, since it costs the graphs' speed.
            warnings.warn(f"capturing the decoding step of bucket {(buf.batch, buf.frames)} "
                          f"in mode {mode} failed ({error!r}); it runs eagerly from now on",
                          RuntimeWarning, stacklevel=3)
            buf.eager.add(mode)
            if run:
                self._step(buf, mode)
            return
        buf.graphs[mode] = graph
        if run:
            graph.replay()

    def _step(self, buf: Buffers, mode: StepMode) -> None:
        """The per-step function: fixed shapes, parameters read from device tensors, no
        host synchronisation, no host-to-device copy, no tensor made from a Python value
        (this is what a CUDA graph captures; `soundstorm.engine.capture` checks it)."""
        engine = self.engine
        B, T, _ = buf.tokens.shape
        logits = engine.model(buf.semantic, buf.tokens, buf.lengths, level=buf.level)
        index = (buf.level - 1).view(B, 1, 1).expand(B, T, 1)
        column = buf.tokens.gather(2, index).squeeze(2)
        frame_valid = buf.frame_index[None, :] < buf.lengths[:, None]
        eligible = (column == engine.config.mask_id) & frame_valid
        new = engine.ops.masked_resample(
            logits, column, eligible, None if mode.keep_all else buf.num_keep, buf.seeds,
            buf.level, buf.iteration, buf.temperature, buf.noise, buf.sample,
            any_sample=mode.sample, any_noise=mode.noise)
        buf.tokens.scatter_(2, index, new[..., None])

    # -- ahead of time ----------------------------------------------------------------------
    def warmup(self, buckets: Iterable[Tuple[int, int]],
               modes: Iterable[StepMode] = ALL_MODES) -> List[Tuple[int, int, StepMode]]:
        """Allocate every bucket and, on CUDA, capture every (bucket, mode) graph not yet
        captured, largest bucket first (so the shared pool is sized by the first capture
        and the others fit in it). Returns what was captured (on CPU: only allocated)."""
        modes = list(dict.fromkeys(modes))
        done = []
        with self.lock, self.device_guard(), torch.no_grad():
            for batch, frames in sorted(set(buckets), key=lambda k: (-k[0] * k[1], -k[1])):
                buf = self.buffers_for(batch, frames)
                if not self.use_cuda_graphs:
                    continue
                for mode in modes:
                    if mode not in buf.graphs:
                        self._save_all(buf)
                        self._capture(buf, mode, run=False)
                        done.append((batch, frames, mode))
        return done

    def _save_all(self, buf: Buffers) -> None:
        for request in buf.rows:
            if request is not None:
                self._save(request)
        buf.rows = ()

    @property
    def num_graphs(self) -> int:
        return sum(len(b.graphs) for b in self.buffers.values())


def modes_for(decodes: Iterable, num_quantizers: int) -> List[StepMode]:
    """Every step mode a mix of requests decoded with `decodes` (DecodeConfigs) can
    produce: the modes of each plan's steps, and those of any set of steps in one pass
    (some row samples, some row perturbs, every row keeps all)."""
    from soundstorm.engine.decode import plan_decode

    flags = set()
    for decode in decodes:
        plan = plan_decode([1], decode.resolve(num_quantizers), decode, torch.device("cpu"))
        flags |= {(s.sample, s.keep_all, s.noise_scale != 0.0) for s in plan.steps}
    flags = sorted(flags)
    modes = set()
    for chosen in range(1, 2 ** len(flags)):
        subset = [f for i, f in enumerate(flags) if chosen >> i & 1]
        modes.add(StepMode(sample=any(f[0] for f in subset),
                           keep_all=all(f[1] for f in subset),
                           noise=any(f[2] for f in subset)))
    return sorted(modes, key=lambda m: (not m.sample, m.keep_all, not m.noise))


def step_activation_bytes(config, batch: int, frames: int, dtype: torch.dtype,
                          backend: str) -> int:
    """Analytic peak of the activations live at once in one step of a (batch, frames)
    bucket: what a CUDA graph pool must hold for it. Per frame, the largest of

    - feed-forward: residual, normed input, hidden F, output D;
    - attention: residual, normed input, QKV 3D, then the attention output and the
      projection (the torch reference also keeps rotated q and k and their halves);
    - convolution module: residual, normed input, the GLU pair 2E, then E-wide
      intermediates (one fused kernel; four in the torch reference);
    - the head: final hidden state and the C logits (the torch reference's resampling
      also materialises float32 scores, int64 hashes and float32 noise over [T, C]).

    Weights, the buffers and the rotary tables are not counted (they live outside the
    pool). An estimate to hold the measured pool against, not a bound."""
    a = torch.empty((), dtype=dtype).element_size()
    D, F, E, C = config.dim, config.ff_dim, config.conv_dim, config.codebook_size
    fused = backend != "torch"
    ffn = (3 * D + F) * a
    attention = (2 * D + 3 * D + 2 * D) * a if fused else (2 * D + 3 * D + 4 * D + 2 * D) * a
    conv = (2 * D + 2 * E + E + D) * a if fused else (2 * D + 2 * E + 4 * E) * a
    head = (2 * D + C) * a + (0 if fused else (4 + 8 + 8 + 4) * C)
    return batch * frames * max(ffn, attention, conv, head)


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`: through pinned memory and a non-blocking copy on CUDA
    (the caching host allocator keeps the pinned block until the copy is done)."""
    if x.device == device:
        return x
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)
