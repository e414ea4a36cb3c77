"""Random training windows over a token corpus: deterministic, resumable, sharded by rank.

Each epoch visits every utterance once (in a seeded random order) and cuts one window of
`L` frames out of it, `L` drawn uniformly between the minimum and maximum window (paper:
random windows of up to 30 s; an utterance shorter than the minimum is used whole). A
window starts on a frame that maps exactly onto a semantic id (a multiple of the rate
denominator: every even frame for 25 Hz -> 50 Hz), so the semantic window stays aligned.

Everything an epoch does is a pure function of (seed, epoch): the order, the window of
each utterance, the bucketing and the batches. The position in the data is therefore just
(epoch, global batches done); resuming there reads nothing twice and skips nothing.

A global batch of `batch_size` windows feeds one optimizer step. It is cut into
`world_size * grad_accum` equal micro-batches; micro-step m of rank r takes chunk
m * world_size + r, so each rank reads only its own part of the data, and every example
carries a key (epoch, utterance) from which its mask is drawn: the same example gets the
same mask whichever process or micro-batch it lands in.
"""

from __future__ import annotations

import multiprocessing
import sys
from dataclasses import dataclass
from typing import Iterable, Iterator, List, Optional, Sequence

import numpy as np
import torch

from soundstorm.training.corpus import TokenCorpus

# Examples of an epoch are keyed epoch * 2**32 + utterance index.
_KEY_EPOCH_SHIFT = 32


@dataclass(frozen=True)
class Window:
    """One example: utterance `index`, frames [start, start + frames), mask key `key`."""
    index: int
    start: int
    frames: int
    key: int


@dataclass
class Batch:
    """A padded batch.

    semantic:        int64 [B, S]    semantic ids (0 past each row's length)
    tokens:          int64 [B, T, Q] codec tokens (0 past each row's length)
    lengths:         int64 [B]       real frames per row
    semantic_lengths: int64 [B]      real semantic ids per row
    speaker:         int64 [B]
    keys:            int64 [B]       per-example mask keys
    """
    semantic: torch.Tensor
    tokens: torch.Tensor
    lengths: torch.Tensor
    semantic_lengths: torch.Tensor
    speaker: torch.Tensor
    keys: torch.Tensor

    def to(self, device: torch.device) -> "Batch":
        return Batch(*(getattr(self, f).to(device, non_blocking=True) for f in
                       ("semantic", "tokens", "lengths", "semantic_lengths", "speaker", "keys")))

    def __len__(self) -> int:
        return self.tokens.shape[0]


class WindowDataset(torch.utils.data.Dataset):
    """Map-style dataset over `Window`s (indexed by the window itself)."""

    def __init__(self, corpus: TokenCorpus):
        self.corpus = corpus

    def __len__(self) -> int:
        return len(self.corpus)

    def __getitem__(self, window: Window) -> dict:
        acoustic, semantic = self.corpus.read(window.index, window.start, window.frames)
        return {"acoustic": acoustic, "semantic": semantic,
                "speaker": int(self.corpus.speaker[window.index]), "key": window.key}


def collate(items: Sequence[dict]) -> Batch:
    """Pad a list of examples into a `Batch` (padding value 0, never read by the model)."""
    B = len(items)
    T = max(x["acoustic"].shape[0] for x in items)
    S = max(x["semantic"].shape[0] for x in items)
    Q = items[0]["acoustic"].shape[1]
    tokens = np.zeros((B, T, Q), dtype=np.int64)
    semantic = np.zeros((B, S), dtype=np.int64)
    for b, x in enumerate(items):
        tokens[b, :x["acoustic"].shape[0]] = x["acoustic"]
        semantic[b, :x["semantic"].shape[0]] = x["semantic"]
    return Batch(
        semantic=torch.from_numpy(semantic), tokens=torch.from_numpy(tokens),
        lengths=torch.tensor([x["acoustic"].shape[0] for x in items], dtype=torch.int64),
        semantic_lengths=torch.tensor([x["semantic"].shape[0] for x in items], dtype=torch.int64),
        speaker=torch.tensor([x["speaker"] for x in items], dtype=torch.int64),
        keys=torch.tensor([x["key"] for x in items], dtype=torch.int64))


class WindowSampler:
    """The deterministic plan of windows and global batches, epoch by epoch.

    corpus:        the corpus to draw from
    indices:       which utterances to use (default: all), e.g. a train/validation split
    seed:          the data seed
    min_frames, max_frames: window lengths are drawn uniformly in [min, max] frames
    batch_size:    windows per global batch (one optimizer step)
    bucket_batches: 0 for no length bucketing; otherwise windows are sorted by length
                   within groups of this many global batches (less padding), and the
                   batches of a group are shuffled
    drop_last:     drop an epoch's final incomplete batch (training; keeps every rank's
                   share equal); keep it for evaluation
    """

    def __init__(self, corpus: TokenCorpus, seed: int, min_frames: int, max_frames: int,
                 batch_size: int, indices: Optional[np.ndarray] = None,
                 bucket_batches: int = 0, drop_last: bool = True):
        if not 1 <= min_frames <= max_frames:
            raise ValueError(f"window lengths must satisfy 1 <= min_frames <= max_frames, got "
                             f"min_frames={min_frames}, max_frames={max_frames}")
        self.corpus = corpus
        self.indices = np.arange(len(corpus)) if indices is None else np.asarray(indices, np.int64)
        self.seed, self.batch_size = seed, batch_size
        self.min_frames, self.max_frames = min_frames, max_frames
        self.bucket_batches, self.drop_last = bucket_batches, drop_last
        self._den = corpus.meta.rate_fraction()[1]
        self._cache: Optional[tuple] = None
        if len(self.indices) == 0:
            raise ValueError(f"no utterances to sample from in {corpus.directory}")
        if drop_last and len(self.indices) < batch_size:
            raise ValueError(f"batch_size={batch_size} is larger than the {len(self.indices)} "
                             f"utterances available in {corpus.directory}; lower batch_size")

    def batches_per_epoch(self) -> int:
        n = len(self.indices)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _epoch(self, epoch: int) -> tuple[np.ndarray, ...]:
        """The epoch's windows as arrays in epoch order: (utterance, start, frames, key),
        each int64 [n]. Arrays, not objects: a corpus of millions of utterances plans an
        epoch in a fraction of a second and a few bytes per window."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.indices)
        order = self.indices[rng.permutation(n)]
        length_u, start_u = rng.random(n), rng.random(n)
        total = self.corpus.frames[order]
        longest = np.minimum(self.max_frames, total)
        shortest = np.minimum(self.min_frames, longest)
        frames = shortest + np.floor(length_u * (longest - shortest + 1)).astype(np.int64)
        frames = np.minimum(frames, longest)
        starts_available = (total - frames) // self._den + 1
        start = self._den * np.minimum(np.floor(start_u * starts_available).astype(np.int64),
                                       starts_available - 1)
        keys = (np.int64(epoch) << _KEY_EPOCH_SHIFT) + order
        arrays = (order, start, frames, keys)
        self._cache = (epoch, arrays)
        return arrays

    def windows(self, epoch: int, positions: Optional[np.ndarray] = None) -> List[Window]:
        """The windows of an epoch (at `positions` of the epoch order, default all)."""
        arrays = self._epoch(epoch)
        if positions is not None:
            arrays = tuple(a[positions] for a in arrays)
        return [Window(int(i), int(s), int(f), int(k)) for i, s, f, k in zip(*arrays)]

    def batch_positions(self, epoch: int) -> List[np.ndarray]:
        """Each global batch of the epoch as positions (int64 [<= batch_size]) in the
        epoch's window order."""
        _, _, frames, _ = self._epoch(epoch)
        n, B = len(frames), self.batch_size
        positions = np.arange(n)
        if self.bucket_batches:
            rng = np.random.default_rng([self.seed, epoch, 1])
            group = self.bucket_batches * B
            batches: List[np.ndarray] = []
            for g in range(0, n, group):
                chunk = positions[g:g + group]
                chunk = chunk[np.argsort(frames[chunk], kind="stable")]
                cut = [chunk[i:i + B] for i in range(0, len(chunk), B)]
                batches.extend(cut[i] for i in rng.permutation(len(cut)))
            # An incomplete batch can only come from the last group: move it to the end.
            batches.sort(key=lambda b: len(b) < B)
        else:
            batches = [positions[i:i + B] for i in range(0, n, B)]
        if self.drop_last and batches and len(batches[-1]) < B:
            batches.pop()
        return batches

    def global_batches(self, epoch: int) -> List[List[Window]]:
        """Every global batch of the epoch as windows (small corpora, tests)."""
        return [self.windows(epoch, b) for b in self.batch_positions(epoch)]


def micro_batches(batch: List[Window], rank: int, world_size: int,
                  grad_accum: int) -> List[List[Window]]:
    """This rank's micro-batches of one global batch (chunk m * world_size + rank)."""
    chunks = world_size * grad_accum
    size = -(-len(batch) // chunks)
    return [batch[(m * world_size + rank) * size:(m * world_size + rank + 1) * size]
            for m in range(grad_accum)]


@dataclass
class DataPosition:
    """Where the training stream stands: `batches_done` global batches of `epoch`."""
    epoch: int = 0
    batches_done: int = 0


class TrainStream:
    """Iterate this rank's micro-batches step by step, from a `DataPosition`.

    Yields (position after the step, [micro-batch Batch] * grad_accum). Loading runs in
    `num_workers` DataLoader workers when asked (order stays deterministic).
    """

    def __init__(self, sampler: WindowSampler, rank: int, world_size: int, grad_accum: int,
                 num_workers: int = 0):
        self.sampler = sampler
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.dataset = WindowDataset(sampler.corpus)
        self.num_workers = num_workers

    def _loader(self, micro: Iterable[List[Window]]) -> Iterator[Batch]:
        if self.num_workers == 0:
            for ws in micro:
                yield collate([self.dataset[w] for w in ws])
            return
        # Forked workers of a process whose JAX threads are running can deadlock: start
        # them from a fresh server process then.
        context = ("forkserver" if "jax" in sys.modules
                   and "forkserver" in multiprocessing.get_all_start_methods() else None)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=micro, collate_fn=collate,
            num_workers=self.num_workers, prefetch_factor=4, persistent_workers=False,
            multiprocessing_context=context)
        yield from loader

    def __call__(self, position: DataPosition) -> Iterator[tuple[DataPosition, List[Batch]]]:
        epoch, done = position.epoch, position.batches_done
        while True:
            batches = self.sampler.batch_positions(epoch)
            # Only this rank's windows of the batches still to do are ever materialised.
            micro = (m for pos in batches[done:]
                     for m in micro_batches(self.sampler.windows(epoch, pos), self.rank,
                                            self.world_size, self.grad_accum))
            it = self._loader(micro)
            for i in range(done, len(batches)):
                step = [next(it) for _ in range(self.grad_accum)]
                nxt = DataPosition(epoch, i + 1) if i + 1 < len(batches) else DataPosition(epoch + 1, 0)
                yield nxt, step
            epoch, done = epoch + 1, 0


def split_indices(num_utterances: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded train/validation split of utterance indices (validation: round(n * f))."""
    n_val = int(round(num_utterances * val_fraction))
    perm = np.random.default_rng([seed, 0x5A11]).permutation(num_utterances)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])
