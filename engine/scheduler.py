"""Continuous batching for level-wise decoding.

Many requests of different lengths, each at its own level and iteration of its own
schedule, share every forward pass. At each step the scheduler

1. admits waiting requests (first come, first served) up to `max_batch` active ones;
2. packs the active requests into the static buffers of the smallest (batch, length)
   bucket that holds them: row i gets request i's semantic ids, tokens, length, and the
   parameters of its next iteration (level, iteration, candidates to keep, temperature,
   annealed noise scale, greedy or sampled, seed);
3. runs one step over the bucket (`StepRunner`): one forward pass where each row uses its
   own level's head, then one masked-resampling call with per-row parameters;
4. unpacks the rows, advances each request by one iteration, and delivers the finished
   ones at once (their futures complete, their callbacks run).

Every active request advances on every step, so a request needs exactly as many passes as
its own schedule has iterations, whatever else is in flight: nothing starves. Because the
model ignores padding and every random number is keyed by (seed, level, iteration, frame),
a request's tokens do not depend on its batch companions, its bucket or when it arrived.

Bucket policy: batch sizes are powers of two up to `max_batch`; lengths are 64 frames
doubled up to 256, then every 256 frames up to `max_frames` (for 1500: 64, 128, 256, 512,
768, 1024, 1280, 1500). A batch pads to its longest row, rounded up to the next length.
The buckets' static buffers, their CUDA graphs (one memory pool for all of an engine's
graphs) and the step itself belong to the engine's one `StepRunner`
(`soundstorm.engine.runner`), which every scheduler of the engine shares; rows stay
resident in a bucket while the requests in it do not change.
"""

from __future__ import annotations

import threading
import warnings
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

import torch

from soundstorm.engine.config import DecodeConfig
from soundstorm.engine.decode import plan_decode
from soundstorm.engine.runner import Buffers, StepMode, StepRunner  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from soundstorm.engine.engine import Engine, PreparedBatch

OnRequestStep = Callable[[int, int, torch.Tensor], None]


def batch_buckets(max_batch: int) -> Tuple[int, ...]:
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return tuple(sizes + [max_batch])


def length_buckets(max_frames: int, smallest: int = 64, step: int = 256) -> Tuple[int, ...]:
    """`smallest` doubled up to `step`, then every `step` frames, then `max_frames`: short
    requests pad to less than twice their length, long ones by less than `step` frames."""
    sizes, t = [], smallest
    while t < min(step, max_frames):
        sizes.append(t)
        t *= 2
    t = step
    while t < max_frames:
        sizes.append(t)
        t += step
    return tuple(sorted(set(sizes))) + (max_frames,)


def smallest_fit(buckets: Tuple[int, ...], n: int) -> int:
    return next(b for b in buckets if b >= n)


@dataclass(eq=False)   # a request is itself: compared and hashed by identity
class Request:
    """One utterance in flight: its inputs, its schedule, and where it stands."""
    id: int
    semantic: torch.Tensor       # int64 [S] (host until first run, then the device)
    tokens: torch.Tensor         # int64 [T, Q]: prompt, decoded so far, MASK elsewhere;
                                 # stale while the request is resident in a bucket's rows
    seed: int
    temperature: float
    levels: List[int]            # per step of its schedule: 1-based level,
    iterations: List[int]        # 1-based iteration,
    num_keep: List[int]          # candidates kept,
    keep_all: List[bool]         # last iteration of a level: every remaining one kept,
    sample: List[bool]           # sampled (else argmax),
    noise: List[float]           # annealed confidence noise scale
    future: Future
    on_step: Optional[OnRequestStep] = None
    cursor: int = 0              # steps done
    resident_in: Optional[Buffers] = field(default=None, repr=False)  # see StepRunner
    row: int = 0

    @property
    def frames(self) -> int:
        return self.tokens.shape[0]

    @property
    def done(self) -> bool:
        return self.cursor == len(self.levels)


class RequestHandle:
    """What `Engine.submit` returns: a handle on one request's future."""

    def __init__(self, request_id: int, future: Future, request: Optional[Request] = None):
        self.id = request_id
        self.future = future
        self._request = request

    def result(self, timeout: Optional[float] = None) -> torch.Tensor:
        """Block until the request is decoded; returns int64 [T, Q] (or raises its error)."""
        return self.future.result(timeout)

    def done(self) -> bool:
        return self.future.done()

    def add_done_callback(self, fn: Callable[["RequestHandle"], None]) -> None:
        self.future.add_done_callback(lambda _: fn(self))

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"RequestHandle(id={self.id}, {state})"


@dataclass
class SchedulerStats:
    steps: int = 0
    rows_run: int = 0        # active rows summed over steps
    rows_padded: int = 0     # bucket rows summed over steps
    completed: int = 0
    failed: int = 0
    fallbacks: int = 0       # passes that failed and were rerun one request at a time
    buckets: Dict[Tuple[int, int], int] = field(default_factory=dict)


class Scheduler:
    """Continuous-batching decoder over one engine.

    threaded=True (what `Engine.submit` uses): a daemon worker thread runs steps whenever
    requests are in flight. threaded=False: the caller drives it with `step()` or
    `run_until_idle()` (deterministic arrival patterns in tests and benchmarks).
    Every scheduler of an engine runs its passes through the engine's one `StepRunner`
    (its buffers, graphs and lock), unless given another `runner`.
    """

    def __init__(self, engine: "Engine", max_batch: int = 8, threaded: bool = True,
                 min_length_bucket: int = 64, runner: Optional[StepRunner] = None):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        self.engine = engine
        self.max_batch = max_batch
        self.batch_buckets = batch_buckets(max_batch)
        self.length_buckets = length_buckets(engine.config.max_frames, min_length_bucket)
        self.runner = runner or engine.runner
        self.stats = SchedulerStats()
        self._waiting: deque[Request] = deque()
        self._active: List[Request] = []
        self._next_id = 0
        self._lock = threading.Condition()
        self._threaded = threaded
        self._worker: Optional[threading.Thread] = None
        self._closed = False

    # -- requests -----------------------------------------------------------------------
    def submit(self, semantic: torch.Tensor, prompt: Optional[torch.Tensor] = None,
               decode: Optional[DecodeConfig] = None, seed: Optional[int] = None,
               on_step: Optional[OnRequestStep] = None) -> RequestHandle:
        """Check one request and queue it; it joins the batch at the next step boundary.

        semantic: int [S] or [1, S]; prompt: int [P, Q] or [1, P, Q]; seed: int or None;
        on_step(level, iteration, tokens [T, Q]): called after each of its iterations.
        Bad input raises here, in the caller's thread, and never reaches the batch.
        """
        if on_step is not None and not callable(on_step):
            raise TypeError(f"on_step must be callable, got {on_step!r}")
        semantic = _one("semantic", semantic, 1)
        prompt = None if prompt is None else _one("prompt", prompt, 2)[None]
        if seed is not None and not (isinstance(seed, int) and not isinstance(seed, bool)):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        batch = self.engine.prepare(semantic[None], prompt=prompt, decode=decode, seed=seed)
        return self.enqueue(batch, 0, on_step)

    def enqueue(self, batch: "PreparedBatch", row: int,
                on_step: Optional[OnRequestStep] = None) -> RequestHandle:
        """Queue row `row` of an already checked batch (`Engine.prepare`)."""
        frames = batch.frames[row]
        plan = plan_decode([batch.to_decode[row]], batch.steps_per_level, batch.decode,
                           torch.device("cpu"))
        with self._lock:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            request = Request(
                id=self._next_id, semantic=batch.semantic[row],
                tokens=batch.tokens[row, :frames], seed=int(batch.seeds[row]),
                temperature=batch.decode.temperature,
                levels=[s.level for s in plan.steps],
                iterations=[s.iteration for s in plan.steps],
                num_keep=plan.num_keep[:, 0].tolist(),
                keep_all=[s.keep_all for s in plan.steps],
                sample=[s.sample for s in plan.steps],
                noise=[s.noise_scale for s in plan.steps],
                future=Future(), on_step=on_step)
            request.future.set_running_or_notify_cancel()
            self._next_id += 1
            self._waiting.append(request)
            if self._threaded:
                self._ensure_worker()
            self._lock.notify_all()
        return RequestHandle(request.id, request.future, request)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._waiting) + len(self._active)

    # -- stepping -----------------------------------------------------------------------
    def step(self) -> int:
        """Admit waiting requests, run one pass over the active ones, deliver the finished.
        Returns the number of requests that took part (0 when idle)."""
        with self._lock:
            while self._waiting and len(self._active) < self.max_batch:
                self._active.append(self._waiting.popleft())
            active = list(self._active)
        if not active:
            return 0
        try:
            self._run(active)
        except Exception as error:
            # The pass failed: run each request alone so only the ones that fail on their
            # own are failed; the others go on. Loudly: a pass that keeps failing would
            # otherwise only show as a slow engine.
            self.stats.fallbacks += 1
            warnings.warn(f"a batched decoding pass failed ({error!r}); running its "
                          f"{len(active)} requests one by one", RuntimeWarning, stacklevel=2)
            for request in active:
                try:
                    self._run([request])
                except Exception as error:
                    self._finish(request, error=error)
        for request in active:
            if request.future.done():
                continue
            request.cursor += 1
            if request.on_step is not None:
                try:
                    request.on_step(request.levels[request.cursor - 1],
                                    request.iterations[request.cursor - 1],
                                    self.runner.row_tokens(request))
                except Exception as error:
                    self._finish(request, error=error)
                    continue
            if request.done:
                self._finish(request, result=self.runner.row_tokens(request))
        self.stats.steps += 1
        return len(active)

    def _run(self, active: List[Request]) -> None:
        n = len(active)
        B = smallest_fit(self.batch_buckets, n)
        T = smallest_fit(self.length_buckets, max(r.frames for r in active))
        self.runner.run(active, B, T)
        self.stats.rows_run += n
        self.stats.rows_padded += B
        self.stats.buckets[(B, T)] = self.stats.buckets.get((B, T), 0) + 1

    def _finish(self, request: Request, result: Optional[torch.Tensor] = None,
                error: Optional[BaseException] = None) -> None:
        with self._lock:
            if request in self._active:
                self._active.remove(request)
        self.runner.release(request)
        if error is not None:
            self.stats.failed += 1
            request.future.set_exception(error)
        else:
            self.stats.completed += 1
            request.future.set_result(result)

    def run_until_idle(self) -> None:
        """Step until no request is waiting or active (for threaded=False)."""
        while self.step():
            pass

    # -- worker thread ------------------------------------------------------------------
    def _ensure_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._work, name="soundstorm-scheduler",
                                            daemon=True)
            self._worker.start()

    def _work(self) -> None:
        while True:
            with self._lock:
                while not (self._waiting or self._active or self._closed):
                    self._lock.wait()
                if self._closed and not (self._waiting or self._active):
                    return
            self.step()

    def close(self) -> None:
        """Finish what is in flight, then stop the worker."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        if self._worker is not None:
            self._worker.join()


def _one(name: str, x, ndim: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim == ndim + 1 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != ndim:
        raise ValueError(f"{name} of one request must be {ndim}-D (or {ndim + 1}-D with batch "
                         f"size 1), got shape {tuple(x.shape)}")
    return x
