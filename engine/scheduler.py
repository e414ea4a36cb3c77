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

import logging
import reprlib
import threading
import warnings
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from soundstorm.engine.config import DecodeConfig
from soundstorm.engine.decode import plan_decode
from soundstorm.engine.runner import Buffers, StepMode, StepRunner  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from soundstorm.engine.engine import Engine, PreparedBatch

OnRequestStep = Callable[[int, int, torch.Tensor], None]

_LOG = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> Tuple[int, ...]:
    """Powers of two below `max_batch`, then `max_batch` (log2(max_batch) + 1 sizes)."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return tuple(sizes + [max_batch])


@dataclass(frozen=True)
class LengthBuckets:
    """The padded lengths of a scheduler's buckets: `smallest` doubled up to `step`, then
    every `step` frames, then `max_frames`, so short requests pad to less than twice their
    length and long ones by less than `step` frames. Nothing is stored per bucket: `fit`
    (the bucket of a length), `len` and `in` are arithmetic, whatever `max_frames`;
    iteration yields the buckets one by one, and `up_to` lists them only up to a length."""
    max_frames: int
    smallest: int = 64
    step: int = 256

    def __post_init__(self) -> None:
        for name in ("max_frames", "smallest", "step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")

    def fit(self, frames: int) -> int:
        """The smallest bucket that holds `frames` (1..max_frames) frames."""
        if not 1 <= frames <= self.max_frames:
            raise ValueError(f"frames must be in 1..max_frames={self.max_frames}, got {frames}")
        t = self.smallest
        while t < min(frames, self.step):
            t *= 2
        if t >= self.step:                      # past the doubling: multiples of `step`
            t = -(-frames // self.step) * self.step
        return min(t, self.max_frames)

    def _doubled(self) -> int:
        """How many doubled sizes (smallest, 2 * smallest, ...) lie below min(step,
        max_frames)."""
        n, t = 0, self.smallest
        while t < min(self.step, self.max_frames):
            n, t = n + 1, t * 2
        return n

    def __iter__(self) -> Iterator[int]:
        t = self.smallest
        for _ in range(self._doubled()):
            yield t
            t *= 2
        t = self.step
        while t < self.max_frames:
            yield t
            t += self.step
        yield self.max_frames

    def __len__(self) -> int:
        return self._doubled() + (self.max_frames - 1) // self.step + 1

    def __contains__(self, frames: object) -> bool:
        return (isinstance(frames, int) and 1 <= frames <= self.max_frames
                and self.fit(frames) == frames)

    def up_to(self, frames: int) -> Tuple[int, ...]:
        """The buckets up to and including the one that holds `frames` frames."""
        last = self.fit(frames)
        out = []
        for t in self:
            out.append(t)
            if t >= last:
                return tuple(out)
        return tuple(out)


def length_buckets(max_frames: int, smallest: int = 64, step: int = 256) -> LengthBuckets:
    """The length buckets of a model with `max_frames` (see `LengthBuckets`): for 1500,
    64, 128, 256, 512, 768, 1024, 1280, 1500."""
    return LengthBuckets(max_frames, smallest, step)


def smallest_fit(buckets, n: int) -> int:
    """The smallest of `buckets` (a `LengthBuckets` or an ascending sequence) that holds
    `n`."""
    if isinstance(buckets, LengthBuckets):
        return buckets.fit(n)
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
        """Call fn(handle) once the request is done (at once if it already is). Whatever
        fn raises, even SystemExit or KeyboardInterrupt, is logged and goes no further:
        it runs in the thread that finished the request, the scheduler's worker."""
        def call(_: Future) -> None:
            try:
                fn(self)
            except BaseException:
                _LOG.exception("done-callback %r of %r raised", fn, self)

        self.future.add_done_callback(call)

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
        semantic = _one("semantic", semantic, 1, "[S]")
        prompt = None if prompt is None else _one("prompt", prompt, 2, "[P, Q] (or None)")[None]
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
        Returns the number of requests that took part (0 when idle).

        A failure reaches only the requests it belongs to, through their futures: a pass
        that raises an Exception is rerun one request at a time; an on_step callback that
        raises anything fails its own request. A pass interrupted by a BaseException that
        is not an Exception (KeyboardInterrupt, SystemExit) fails every request in it and
        is raised again."""
        with self._lock:
            while self._waiting and len(self._active) < self.max_batch:
                self._active.append(self._waiting.popleft())
            active = list(self._active)
        if not active:
            return 0
        try:
            self._pass(active)
        except BaseException as error:
            for request in active:
                self._finish(request, error=error)
            raise
        for request in active:
            if request.future.done():
                continue
            request.cursor += 1
            try:
                if request.on_step is not None:
                    request.on_step(request.levels[request.cursor - 1],
                                    request.iterations[request.cursor - 1],
                                    self.runner.row_tokens(request))
                if request.done:
                    self._finish(request, result=self.runner.row_tokens(request))
            except BaseException as error:
                self._finish(request, error=error)
        self.stats.steps += 1
        return len(active)

    def _pass(self, active: List[Request]) -> None:
        """One batched pass over `active`; if it fails, each request alone, failing only
        those that fail on their own."""
        try:
            self._run(active)
        except Exception as error:
            # Loudly: a pass that keeps failing would otherwise only show as a slow engine.
            self.stats.fallbacks += 1
            warnings.warn(f"a batched decoding pass failed ({error!r}); running its "
                          f"{len(active)} requests one by one", RuntimeWarning, stacklevel=3)
            for request in active:
                try:
                    self._run([request])
                except Exception as error:
                    self._finish(request, error=error)

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
        """Complete `request` with its tokens or its error (once: a request already done
        is only removed)."""
        with self._lock:
            if request in self._active:
                self._active.remove(request)
        self.runner.release(request)
        if request.future.done():
            return
        if error is not None:
            self.stats.failed += 1
        else:
            self.stats.completed += 1
        try:
            if error is not None:
                request.future.set_exception(error)
            else:
                request.future.set_result(result)
        except BaseException:
            # The future is complete; a done-callback added to it directly raised what
            # concurrent.futures does not catch (SystemExit, KeyboardInterrupt).
            _LOG.exception("a done-callback of request %d raised", request.id)

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
        """The worker thread: steps while requests are in flight, until closed and idle.
        Nothing a step raises stops it (the step has already failed its requests)."""
        error: Optional[BaseException] = None
        try:
            while self._wait_for_work():
                try:
                    self.step()
                except BaseException as e:
                    self._fail_active(e)
        except BaseException as e:
            error = e
        finally:
            self._worker_stopped(error)

    def _wait_for_work(self) -> bool:
        """Block until a request is in flight (True) or the scheduler is closed and idle
        (False)."""
        with self._lock:
            while not (self._waiting or self._active or self._closed):
                self._lock.wait()
            return bool(self._waiting or self._active)

    def _fail_active(self, error: BaseException) -> None:
        with self._lock:
            active = [r for r in self._active if not r.future.done()]
        for request in active:
            self._finish(request, error=error)

    def _worker_stopped(self, error: Optional[BaseException]) -> None:
        """The worker is exiting. After `close` nothing is in flight; if it died, every
        request still waiting or active fails with a RuntimeError that says so (none is
        left to hang), and the next `submit` starts a new worker."""
        with self._lock:
            if self._worker is threading.current_thread():
                self._worker = None
            stranded = list(self._waiting) + list(self._active)
            self._waiting.clear()
        if stranded:
            cause = RuntimeError(f"the scheduler's worker thread stopped unexpectedly "
                                 f"({error!r}) before this request was decoded")
            for request in stranded:
                self._finish(request, error=cause)

    def close(self) -> None:
        """Finish what is in flight, then stop the worker."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        worker = self._worker
        if worker is not None:
            worker.join()


def _one(name: str, x, ndim: int, shape_doc: str) -> torch.Tensor:
    """One request's `x`: a tensor of `ndim` dims, or `ndim + 1` with batch size 1."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of ids {shape_doc}, got "
                        f"{type(x).__name__} {reprlib.repr(x)}")
    if x.ndim == ndim + 1 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != ndim:
        raise ValueError(f"{name} of one request must be {ndim}-D (or {ndim + 1}-D with batch "
                         f"size 1), got shape {tuple(x.shape)}")
    return x
