"""A synthetic token corpus with the structure that matters for SoundStorm, for tests and
quick experiments (no audio, no tokenizer: seconds to build).

- A hidden **voice** per speaker: speaker k owns the level-1 codes
  [k * C/K, (k + 1) * C/K) and maps every semantic id to one of them through its own
  random table. Level-1 tokens are therefore predictable from the semantic ids *and* the
  speaker, and the semantic ids (drawn independently of the speaker) say nothing about the
  speaker: the speaker is recoverable only from acoustic tokens, i.e. from the voice
  prompt.
- **Finer levels follow coarser ones**: level q's token is a fixed random permutation of
  level q-1's token at the same frame (the coarse-to-fine dependency of an RVQ).
- With probability `noise` a token is replaced by a uniformly random code (before the
  finer levels are derived from it), so the corpus is not perfectly predictable.
- Semantic ids come in runs of 1-4 ids (like the repeated ids of slow speech units).

The best possible masked accuracy is about 1 - noise at every level given the speaker;
without any acoustic context, level 1 can only be guessed among the K speakers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np

from soundstorm.training.corpus import CorpusWriter


# Sane limits: a synthetic utterance is at most 10 minutes long (the longest training
# window of the paper is 30 s), a corpus at most 10 million utterances.
MAX_UTTERANCE_SECONDS = 600.0
MAX_UTTERANCES = 10_000_000


@dataclass(frozen=True)
class SyntheticSpec:
    num_quantizers: int = 4
    codebook_size: int = 32
    semantic_vocab_size: int = 16
    frame_rate: float = 50
    semantic_rate: float = 25
    num_speakers: int = 4
    noise: float = 0.02
    min_seconds: float = 1.0
    max_seconds: float = 3.0

    def __post_init__(self) -> None:
        if self.num_speakers < 1 or self.codebook_size < self.num_speakers:
            raise ValueError(f"num_speakers = {self.num_speakers}: expected 1..codebook_size "
                             f"({self.codebook_size}); each speaker owns its own level-1 codes")
        if not 0 <= self.noise < 1:
            raise ValueError(f"noise = {self.noise}: expected a probability in [0, 1)")
        if not (math.isfinite(self.min_seconds) and math.isfinite(self.max_seconds)
                and 0 < self.min_seconds <= self.max_seconds <= MAX_UTTERANCE_SECONDS):
            raise ValueError(f"utterance durations must satisfy 0 < min_seconds <= max_seconds "
                             f"<= {MAX_UTTERANCE_SECONDS:g}, got {self.min_seconds}, "
                             f"{self.max_seconds}")

    def bytes_per_utterance(self) -> float:
        """The mean size on disk of one utterance's tokens (uint16 ids)."""
        frames = (self.min_seconds + self.max_seconds) / 2 * self.frame_rate
        semantic = frames * self.semantic_rate / self.frame_rate
        return 2 * (frames * self.num_quantizers + semantic)

    @classmethod
    def for_model(cls, config, **overrides) -> "SyntheticSpec":
        """A spec whose token streams fit a `ModelConfig`."""
        return cls(num_quantizers=config.num_quantizers, codebook_size=config.codebook_size,
                   semantic_vocab_size=config.semantic_vocab_size,
                   frame_rate=config.frame_rate, semantic_rate=config.semantic_rate,
                   **overrides)


@dataclass(frozen=True)
class Voices:
    """The hidden structure: level-1 tables [K, V] (absolute codes) and the level q >= 2
    permutations [Q - 1, C]."""
    level1: np.ndarray
    permutations: np.ndarray

    @classmethod
    def make(cls, spec: SyntheticSpec, seed: int = 0) -> "Voices":
        rng = np.random.default_rng([seed, 0xF0C])
        per = spec.codebook_size // spec.num_speakers
        level1 = (np.arange(spec.num_speakers)[:, None] * per
                  + rng.integers(0, per, (spec.num_speakers, spec.semantic_vocab_size)))
        perms = np.stack([rng.permutation(spec.codebook_size)
                          for _ in range(spec.num_quantizers - 1)]) \
            if spec.num_quantizers > 1 else np.zeros((0, spec.codebook_size), np.int64)
        return cls(level1=level1.astype(np.int64), permutations=perms.astype(np.int64))


def synthesize(spec: SyntheticSpec, voices: Voices, speaker: int, frames: int,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One utterance: acoustic int64 [frames, Q] and semantic int64 [S] (S just covers
    the frames at the two rates)."""
    from fractions import Fraction
    r = Fraction(str(spec.semantic_rate)) / Fraction(str(spec.frame_rate))
    num, den = r.numerator, r.denominator
    S = ((frames - 1) * num) // den + 1
    runs = []
    while sum(len(x) for x in runs) < S:
        runs.append(np.full(rng.integers(1, 5), rng.integers(0, spec.semantic_vocab_size)))
    semantic = np.concatenate(runs)[:S]
    frame_sem = semantic[(np.arange(frames) * num) // den]
    C, Q = spec.codebook_size, spec.num_quantizers
    tokens = np.empty((frames, Q), dtype=np.int64)

    def noisy(x: np.ndarray) -> np.ndarray:
        flip = rng.random(frames) < spec.noise
        return np.where(flip, rng.integers(0, C, frames), x)

    tokens[:, 0] = noisy(voices.level1[speaker, frame_sem])
    for q in range(1, Q):
        tokens[:, q] = noisy(voices.permutations[q - 1, tokens[:, q - 1]])
    return tokens, semantic.astype(np.int64)


def write_synthetic_corpus(directory: Union[str, Path], num_utterances: int,
                           spec: SyntheticSpec, seed: int = 0, voice_seed: int = 0,
                           shard_frames: int = 200_000, prefix: str = "utt") -> Path:
    """Write `num_utterances` synthetic utterances (durations uniform in
    [min_seconds, max_seconds], speakers uniform) as a token corpus. Corpora written with
    the same `spec` and `voice_seed` share their speakers; `seed` draws the utterances."""
    if not 1 <= num_utterances <= MAX_UTTERANCES:
        raise ValueError(f"num_utterances = {num_utterances}: expected 1..{MAX_UTTERANCES}")
    voices = Voices.make(spec, voice_seed)
    rng = np.random.default_rng([seed, 0x5EED])
    lo = max(1, int(round(spec.min_seconds * spec.frame_rate)))
    hi = max(lo, int(round(spec.max_seconds * spec.frame_rate)))
    with CorpusWriter(directory, spec.num_quantizers, spec.codebook_size,
                      spec.semantic_vocab_size, spec.frame_rate, spec.semantic_rate,
                      shard_frames=shard_frames) as writer:
        for i in range(num_utterances):
            speaker = int(rng.integers(0, spec.num_speakers))
            frames = int(rng.integers(lo, hi + 1))
            acoustic, semantic = synthesize(spec, voices, speaker, frames, rng)
            writer.add(f"{prefix}{i:07d}", acoustic, semantic, speaker=speaker)
    return Path(directory)
