"""Fitting the built-in `melrvq` codec: residual k-means on log-mel frames of a corpus.

    from soundstorm.training.codec_fit import fit_melrvq
    codec = fit_melrvq(sorted(Path("corpus").glob("*.wav")), "codecs/melrvq",
                       num_quantizers=8, codebook_size=256)
    # later: soundstorm.engine.codecs.load_codec("melrvq", path="codecs/melrvq")

Level 1 is k-means on the frames themselves, level q on what levels < q leave over, so
the reconstruction error falls with every level added. Seeded: the same audio, settings
and seed give the same codebooks.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from soundstorm.engine.codecs.audio import as_batch, check_rate, read_audio, resample
from soundstorm.engine.codecs.melrvq import MelRVQCodec, MelRVQConfig, nearest


def fit_melrvq(audio: Iterable[Any], out_dir: Any, num_quantizers: int = 8,
               codebook_size: int = 256, iterations: int = 25, seed: int = 0,
               max_frames: int = 200_000, progress: bool = True,
               silence_db: float = -60.0, **config: Any) -> MelRVQCodec:
    """Fit a melrvq codec on `audio` and save it to `out_dir`.

    audio:          sound-file paths (any rate, mixed to mono) and/or (samples, rate)
                    pairs with float samples [N].
    num_quantizers: Q, RVQ levels.
    codebook_size:  C, codewords per level; the corpus needs at least C frames (C / 50 s).
    iterations:     Lloyd iterations of k-means per level.
    max_frames:     frames kept (a seeded random subset) when the corpus has more.
    silence_db:     a frame (hop) whose RMS level is below this (dB re full scale) is
                    silent; audio with fewer than `codebook_size` frames above it has no
                    signal to fit a codec on and is refused (ValueError).
    config:         other MelRVQConfig fields (sample_rate=16000, n_mels=80, ...).
    Returns the fitted codec, already saved.
    """
    cfg = MelRVQConfig(num_quantizers=num_quantizers, codebook_size=codebook_size, **config)
    for name, value in (("iterations", iterations), ("max_frames", max_frames)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if max_frames < cfg.codebook_size:
        raise ValueError(f"max_frames={max_frames} must be at least codebook_size="
                         f"{cfg.codebook_size}")
    if isinstance(silence_db, bool) or not isinstance(silence_db, (int, float)) \
            or not -math.inf < silence_db <= 0:
        raise ValueError(f"silence_db must be a finite level <= 0 dB, got {silence_db!r}")
    # A codec with no codebooks yet, for its feature extractor.
    extractor = MelRVQCodec(cfg, torch.zeros(cfg.num_quantizers, cfg.codebook_size, cfg.n_mels))
    g = torch.Generator().manual_seed(seed)
    sample = FrameSample(max_frames, cfg.n_mels, g)
    clips = silent_clips = voiced = 0
    for clip in audio_clips(audio, cfg.sample_rate, progress, desc="melrvq features"):
        sample.add(extractor.log_mel(clip)[0])
        clips += 1
        frames_above = count_voiced_frames(clip[0], cfg.hop_length, silence_db)
        voiced += frames_above
        silent_clips += frames_above == 0
    if clips == 0:
        raise ValueError("audio is empty: fit_melrvq needs at least one clip")
    if sample.total < cfg.codebook_size:
        raise ValueError(f"audio has {sample.total} frames ({sample.total / cfg.frame_rate:.1f} s), "
                         f"fewer than codebook_size={cfg.codebook_size}: give more audio or a "
                         f"smaller codebook")
    if voiced < cfg.codebook_size:
        raise ValueError(f"the audio has no signal to fit a codec on: {silent_clips} of {clips} "
                         f"clips are silent and only {voiced} of {sample.total} frames are "
                         f"above {silence_db:g} dBFS, fewer than codebook_size="
                         f"{cfg.codebook_size} (is it silence? a quieter threshold: silence_db)")
    frames = sample.frames()

    codebooks = []
    residual = frames.clone()
    bar = tqdm(total=cfg.num_quantizers * iterations, desc="melrvq k-means", unit="iter",
               disable=not progress)
    for level in range(cfg.num_quantizers):
        codebook = kmeans(residual, cfg.codebook_size, iterations, g, bar)
        residual = residual - codebook[nearest(residual, codebook)]
        codebooks.append(codebook)
        bar.set_postfix(level=level + 1, residual_mse=f"{residual.pow(2).mean().item():.4f}")
    bar.close()
    codec = MelRVQCodec(cfg, torch.stack(codebooks))
    codec.save(out_dir)
    return codec


def count_voiced_frames(samples: torch.Tensor, hop: int, silence_db: float) -> int:
    """How many whole hops of `samples` (float [N]) have an RMS level at or above
    `silence_db` dB re full scale."""
    n = samples.shape[0] // hop
    if n == 0:
        return 0
    power = samples[:n * hop].double().reshape(n, hop).pow(2).mean(1)
    return int((power >= 10.0 ** (silence_db / 10)).sum())


def kmeans(x: torch.Tensor, k: int, iterations: int, generator: torch.Generator,
           bar: Optional[Any] = None) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding.

    x: float32 [N, D] with N >= k. Returns float32 [k, D]. An emptied cluster is moved to
    the point worst served by the current centroids, so every codeword stays in use.
    """
    centroids = _kmeans_pp(x, k, generator)
    for _ in range(iterations):
        assign = nearest(x, centroids)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        centroids = sums / counts.clamp(min=1)[:, None].to(x.dtype)
        empty = (counts == 0).nonzero().flatten()
        if len(empty):
            err = (x - centroids[assign]).pow(2).sum(1)
            centroids[empty] = x[err.topk(len(empty)).indices]
        if bar is not None:
            bar.update(1)
    return centroids


def _kmeans_pp(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    # k-means++ (Arthur & Vassilvitskii, 2007): each new centre drawn with probability
    # proportional to the squared distance to the nearest centre so far.
    n = x.shape[0]
    centroids = torch.empty(k, x.shape[1], dtype=x.dtype)
    centroids[0] = x[torch.randint(n, (1,), generator=generator)]
    d2 = (x - centroids[0]).pow(2).sum(1)
    for i in range(1, k):
        total = d2.sum()
        if total <= 0:  # fewer distinct points than k: repeat points, Lloyd moves them apart
            idx = torch.randint(n, (1,), generator=generator)
        else:
            idx = torch.multinomial(d2 / total, 1, generator=generator)
        centroids[i] = x[idx]
        d2 = torch.minimum(d2, (x - centroids[i]).pow(2).sum(1))
    return centroids


class FrameSample:
    """A uniform random subset of at most `max_frames` feature frames, kept while reading so
    that a long corpus never sits in memory whole: every frame gets a random key (drawn
    from `generator`) and the frames with the max_frames smallest keys stay."""

    def __init__(self, max_frames: int, dim: int, generator: torch.Generator):
        self.max_frames, self.generator = max_frames, generator
        self._frames, self._keys = [torch.empty(0, dim)], [torch.empty(0)]
        self._held = 0
        self.total = 0  # frames seen, kept or not

    def add(self, frames: torch.Tensor) -> None:
        """frames: float32 [N, dim]."""
        self._frames.append(frames)
        self._keys.append(torch.rand(len(frames), generator=self.generator))
        self._held += len(frames)
        self.total += len(frames)
        if self._held > 2 * self.max_frames:  # now and then, not per clip: cheap for short clips
            self._compact()

    def frames(self) -> torch.Tensor:
        """The kept frames, float32 [min(total, max_frames), dim]."""
        self._compact()
        return self._frames[0]

    def _compact(self) -> None:
        f, k = torch.cat(self._frames), torch.cat(self._keys)
        if len(f) > self.max_frames:
            keep = k.topk(self.max_frames, largest=False).indices
            f, k = f[keep], k[keep]
        self._frames, self._keys, self._held = [f], [k], len(f)


class AudioReadError(ValueError):
    """A sound file of a fitting corpus that cannot be read; names the file."""

    def __init__(self, path: Any, error: Exception):
        self.path = Path(path)
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        super().__init__(f"cannot read audio file {str(path)!r}: {reason}")


def audio_clips(audio: Iterable[Any], sample_rate: int, progress: bool,
                desc: str = "features") -> Iterator[torch.Tensor]:
    """The clips of a fitting corpus, one at a time, as float32 [1, N] at `sample_rate`
    (empty clips skipped).

    audio: sound-file paths (any rate, mixed to mono) and/or (samples, rate) pairs with
           float samples [N].
    """
    if isinstance(audio, (str, Path)) or (isinstance(audio, tuple) and len(audio) == 2
                                          and not isinstance(audio[0], (str, Path, tuple))):
        raise TypeError("audio must be a list of sound-file paths or (samples, rate) pairs, "
                        f"got a single {type(audio).__name__}; wrap it in a list")
    items = list(audio)
    for i, item in enumerate(tqdm(items, desc=desc, unit="clip", disable=not progress)):
        if isinstance(item, (str, Path)):
            try:
                samples, _ = read_audio(item, sample_rate)
            except FileNotFoundError:
                raise
            except Exception as e:   # libsndfile raises its own types for every bad file
                raise AudioReadError(item, e) from None
            clip = torch.from_numpy(samples)[None]
        elif isinstance(item, tuple) and len(item) == 2:
            samples, rate = item
            clip = as_batch(samples, f"audio[{i}] samples")
            if clip.shape[0] != 1:
                raise ValueError(f"audio[{i}] samples must be one mono clip [N], got shape "
                                 f"{tuple(np.shape(samples))}")
            clip = resample(clip, check_rate(rate, f"audio[{i}] rate"), sample_rate)
        else:
            raise TypeError(f"audio[{i}] must be a sound-file path or a (samples, rate) pair, "
                            f"got {type(item).__name__}")
        if clip.shape[1] > 0:
            yield clip


__all__ = ["fit_melrvq", "kmeans", "audio_clips", "count_voiced_frames", "AudioReadError",
           "FrameSample"]
