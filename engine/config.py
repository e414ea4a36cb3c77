"""Typed configuration: the model's shape (`ModelConfig`) and the decoding schedule
(`DecodeConfig`). Both validate themselves on construction, so a bad value fails where
it is written, not deep inside a forward pass."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Mapping, Optional, Sequence, Tuple

_PRESETS: dict[str, dict[str, Any]] = {
    # Paper §4.1: 12-layer Conformer, d=1024, 16 heads, ff 4096, kernel 5, ~350M params;
    # SoundStream with 12 RVQ levels of 1024 codes at 50 Hz; w2v-BERT k-means (1024) at 25 Hz.
    "paper": dict(
        dim=1024, depth=12, heads=16, ff_dim=4096, conv_kernel=5, conv_expansion=2,
        num_quantizers=12, codebook_size=1024, semantic_vocab_size=1024,
        semantic_rate=25, frame_rate=50, max_frames=1500,
    ),
    "small": dict(
        dim=512, depth=6, heads=8, ff_dim=2048, conv_kernel=5, conv_expansion=2,
        num_quantizers=12, codebook_size=1024, semantic_vocab_size=1024,
        semantic_rate=25, frame_rate=50, max_frames=1500,
    ),
    # For tests: every code path, a forward pass in milliseconds.
    "tiny": dict(
        dim=64, depth=2, heads=4, ff_dim=128, conv_kernel=5, conv_expansion=2,
        num_quantizers=4, codebook_size=32, semantic_vocab_size=16,
        semantic_rate=25, frame_rate=50, max_frames=256,
    ),
}


def _rate(name: str, value: Any) -> Fraction:
    """A rate in Hz as an exact fraction (so frame/semantic index mapping has no rounding)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of Hz (int or float), got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive, finite number of Hz, got {value!r}")
    return Fraction(str(value)) if isinstance(value, float) else Fraction(value)


def _positive_int(name: str, value: Any, limit: Optional[int] = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    if limit is not None and value > limit:
        raise ValueError(f"{name} = {value} is above its limit {limit} (see "
                         "ModelConfig.LIMITS)")


# Largest value of each size field (inclusive). Far above any useful SoundStorm (the paper's
# model is dim 1024, depth 12, 1500 frames), small enough that an analytic size, a bucket
# table or a loop over a field stays cheap. Whether the parameters fit in memory is checked
# separately, against the machine, when a model is built or loaded.
LIMITS: dict[str, int] = {
    "num_quantizers": 64,
    "codebook_size": 2 ** 20,
    "semantic_vocab_size": 2 ** 20,
    "dim": 2 ** 16,
    "depth": 256,
    "heads": 1024,
    "ff_dim": 2 ** 18,
    "conv_kernel": 255,
    "conv_expansion": 16,
    "max_frames": 2 ** 16,
}
# Largest key width of the prompt lookup (0 turns it off).
MAX_PROMPT_LOOKUP = 2 ** 12
# Fields a saved config may leave out (added after the format was fixed; their defaults
# are the model saved before them).
OPTIONAL_FIELDS = ("prompt_lookup", "semantic_copy", "prompt_prior")
# Rates in Hz: at most MAX_RATE, and semantic_rate / frame_rate must reduce to a fraction
# whose terms are at most MAX_RATE_TERM (frame t reads semantic index t * num // den).
MAX_RATE = 10 ** 6
MAX_RATE_TERM = 2 ** 20


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a SoundStorm model and of the token streams it reads and writes.

    num_quantizers (Q) RVQ levels of `codebook_size` (C) codes each at `frame_rate` Hz;
    semantic ids from a vocabulary of `semantic_vocab_size` at `semantic_rate` Hz.
    The Conformer has `depth` blocks of width `dim`, `heads` attention heads, feed-forward
    width `ff_dim`, and a convolution module whose inner width is `conv_expansion * dim`
    with a depthwise kernel of `conv_kernel` frames. `max_frames` is the longest sequence
    a single forward pass accepts.

    `prompt_lookup` (0: off, the paper's model) adds to the input embeddings a lookup into
    the frames whose codes are all known (the voice prompt): every frame whose level-1 code
    is known attends to them by the similarity of level-1 codes in context alone, through
    `prompt_lookup`-wide learned keys, reads their finer codes, and mixes its vote for a
    finer code into that level's output distribution through a learned per-frame gate (see
    `soundstorm.engine.model.PromptLookup`). It makes copying the prompt speaker's finer
    codes, which is what keeps a voice, one learned lookup instead of something the
    Conformer must discover. Older configs without the field load with it off.

    `semantic_copy` (needs the lookup) does the same for level 1, which the level-1 keys
    cannot serve: every frame reads the reference frames that say the same, by the match of
    semantic ids in context (its own and its two neighbours', with learned weights and
    sharpness), and mixes their vote for a level-1 code into level 1's output through a
    learned gate that also sees how well the best reference matches. A speaker's level-1
    codes for a sound are a large part of the voice.
    Older configs without the field load with it off.

    `prompt_prior` multiplies every level's output distribution by how often the reference
    frames (the voice prompt) use each code at that level, smoothed and raised to a learned
    power that starts at 0 (off; see `soundstorm.engine.model.PromptPrior`): a speaker uses
    a part of each codebook, and a voice the model never heard otherwise drifts to the
    codes of the voices it did. It needs no lookup. Older configs load with it off.

    Every size field must lie in 1..`LIMITS[field]` (`ModelConfig.LIMITS`: e.g. depth <= 256,
    dim <= 65536, max_frames <= 65536); rates must be positive, at most 10**6 Hz, and
    semantic_rate / frame_rate must reduce to a fraction whose terms are at most 2**20.
    """

    LIMITS = LIMITS

    num_quantizers: int = 12
    codebook_size: int = 1024
    semantic_vocab_size: int = 1024
    semantic_rate: float = 25
    frame_rate: float = 50
    dim: int = 1024
    depth: int = 12
    heads: int = 16
    ff_dim: int = 4096
    conv_kernel: int = 5
    conv_expansion: int = 2
    max_frames: int = 1500
    prompt_lookup: int = 0
    semantic_copy: bool = False
    prompt_prior: bool = False

    def __post_init__(self) -> None:
        for name, limit in LIMITS.items():
            _positive_int(name, getattr(self, name), limit)
        lookup = self.prompt_lookup
        if isinstance(lookup, bool) or not isinstance(lookup, int):
            raise TypeError(f"prompt_lookup must be an int (0: off), got "
                            f"{type(lookup).__name__} {lookup!r}")
        if not 0 <= lookup <= MAX_PROMPT_LOOKUP:
            raise ValueError(f"prompt_lookup must lie in 0..{MAX_PROMPT_LOOKUP} (the width of "
                             f"its keys; 0: off), got {lookup}")
        if lookup:
            if self.num_quantizers < 2:
                raise ValueError("prompt_lookup reads the finer levels of the prompt: it "
                                 "needs num_quantizers >= 2, got 1 (set prompt_lookup = 0)")
        if not isinstance(self.semantic_copy, bool):
            raise TypeError(f"semantic_copy must be a bool, got "
                            f"{type(self.semantic_copy).__name__} {self.semantic_copy!r}")
        if self.semantic_copy and not lookup:
            raise ValueError("semantic_copy is part of the prompt lookup: it needs "
                             "prompt_lookup >= 1, got 0")
        if not isinstance(self.prompt_prior, bool):
            raise TypeError(f"prompt_prior must be a bool, got "
                            f"{type(self.prompt_prior).__name__} {self.prompt_prior!r}")
        semantic_rate = _rate("semantic_rate", self.semantic_rate)
        frame_rate = _rate("frame_rate", self.frame_rate)
        for name, rate in (("semantic_rate", semantic_rate), ("frame_rate", frame_rate)):
            if rate > MAX_RATE:
                raise ValueError(f"{name} = {getattr(self, name)!r} Hz is above the limit "
                                 f"{MAX_RATE} Hz")
        ratio = semantic_rate / frame_rate
        if max(ratio.numerator, ratio.denominator) > MAX_RATE_TERM:
            raise ValueError(
                f"semantic_rate / frame_rate = {self.semantic_rate!r} / {self.frame_rate!r} "
                f"reduces to {ratio.numerator}/{ratio.denominator}; both terms must be at "
                f"most {MAX_RATE_TERM} (give rates with few decimal places)")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        if (self.dim // self.heads) % 2:
            raise ValueError(
                f"head dimension dim/heads = {self.dim // self.heads} must be even "
                "(rotary embeddings rotate pairs of channels)")
        if self.conv_kernel % 2 == 0:
            raise ValueError(
                f"conv_kernel must be odd so the convolution is centred, got {self.conv_kernel}")

    # -- derived quantities -------------------------------------------------------------
    @property
    def mask_id(self) -> int:
        """The id that marks a MASK token in `[B, T, Q]` token tensors (= codebook_size)."""
        return self.codebook_size

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def conv_dim(self) -> int:
        return self.dim * self.conv_expansion

    def frames_for(self, semantic_len: int) -> int:
        """Number of codec frames covered by `semantic_len` semantic ids:
        floor(S * frame_rate / semantic_rate)."""
        r = _rate("frame_rate", self.frame_rate) / _rate("semantic_rate", self.semantic_rate)
        return (semantic_len * r.numerator) // r.denominator

    def semantic_index_fraction(self) -> Tuple[int, int]:
        """(num, den) such that frame t reads semantic index (t * num) // den,
        i.e. floor(t * semantic_rate / frame_rate), exactly."""
        r = _rate("semantic_rate", self.semantic_rate) / _rate("frame_rate", self.frame_rate)
        return r.numerator, r.denominator

    def min_semantic_len(self) -> int:
        """The fewest semantic ids that make one codec frame: ceil(semantic_rate /
        frame_rate)."""
        num, den = self.semantic_index_fraction()
        return -(-num // den)

    def num_parameters(self) -> int:
        """Exact parameter count of `SoundStorm(self)` (no model is built)."""
        d, f, c = self.dim, self.ff_dim, self.conv_dim
        ln = 2 * d
        ffn = ln + (d * f + f) + (f * d + d)
        attn = ln + (d * 3 * d + 3 * d) + (d * d + d)
        conv = ln + (d * 2 * c + 2 * c) + (c * self.conv_kernel + c) + 2 * c + (c * d + d)
        block = 2 * ffn + attn + conv + ln
        q, cb = self.num_quantizers, self.codebook_size
        embed = self.semantic_vocab_size * d + (q * cb + 1) * d
        heads = ln + q * (cb * d + cb)
        lookup = 0
        if self.prompt_lookup:
            lookup = (cb + 1) * self.prompt_lookup + 3 + 2 + (q - 1) * (cb * d + d + 1)
            if self.semantic_copy:      # context weights, sharpness, level 1's gate
                lookup += 3 + 1 + d + 2
        prior = 2 * q if self.prompt_prior else 0      # a weight and a smoothing per level
        return embed + self.depth * block + heads + lookup + prior

    # -- construction -------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A named preset (`paper`, `small`, `tiny`), optionally with fields overridden."""
        if name not in _PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(_PRESETS)}")
        return cls.from_dict({**_PRESETS[name], **overrides})

    @staticmethod
    def preset_names() -> Tuple[str, ...]:
        return tuple(_PRESETS)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {unknown}; expected a subset of "
                             f"{sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


MIN_TEMPERATURE = 1e-4
MAX_TEMPERATURE = 1e6
MAX_GUMBEL_SCALE = 1e6
MAX_STEPS_PER_LEVEL = 1024


@dataclass(frozen=True)
class DecodeConfig:
    """Level-wise MaskGIT decoding schedule (paper §3.3).

    steps_per_level: iterations for each RVQ level, coarse to fine, each 1..1024. None
        means the paper's schedule (16, 1, 1, ..., 1) for the model's number of levels.
    temperature: candidates are sampled from softmax(logits / temperature); 0 means
        argmax everywhere. Otherwise it must lie in [MIN_TEMPERATURE, MAX_TEMPERATURE] =
        [1e-4, 1e6]: a smaller one pushes logits / temperature out of float32's range
        (to inf, or to 0 once the temperature itself is stored in float32), so it is
        refused rather than silently decoded as something else; use 0 for greedy.
    gumbel_scale: weight of the Gumbel noise added to the log-probability confidence,
        annealed linearly to 0 within each level: g * (1 - i / s) at iteration i of s;
        0..1e6.
    greedy_last: the last iteration of every level takes the argmax (so a level with one
        step is fully greedy), as the paper does.
    """

    steps_per_level: Optional[Tuple[int, ...]] = None
    temperature: float = 1.0
    gumbel_scale: float = 1.0
    greedy_last: bool = True

    def __post_init__(self) -> None:
        steps = self.steps_per_level
        if steps is not None:
            if isinstance(steps, (str, bytes)) or not isinstance(steps, Sequence):
                raise TypeError(
                    f"steps_per_level must be a sequence of ints (one per RVQ level), got {steps!r}")
            steps = tuple(steps)
            if not steps:
                raise ValueError("steps_per_level must not be empty: give one count per RVQ level")
            for q, s in enumerate(steps, start=1):
                if isinstance(s, bool) or not isinstance(s, int):
                    raise TypeError(
                        f"steps_per_level[{q - 1}] (level {q}) must be an int, got {s!r}")
                if s < 1:
                    raise ValueError(
                        f"steps_per_level[{q - 1}] (level {q}) must be >= 1, got {s}")
                if s > MAX_STEPS_PER_LEVEL:
                    raise ValueError(
                        f"steps_per_level[{q - 1}] (level {q}) = {s} is above the limit "
                        f"{MAX_STEPS_PER_LEVEL} (each step is one forward pass)")
            object.__setattr__(self, "steps_per_level", steps)
        for name, upper in (("temperature", MAX_TEMPERATURE), ("gumbel_scale", MAX_GUMBEL_SCALE)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{name} must be a finite number (int or float), got "
                                f"{type(v).__name__} {v!r}")
            if not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
            if v < 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
            if v > upper:
                raise ValueError(f"{name} = {v!r} is above the limit {upper:g}")
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise ValueError(
                f"temperature = {self.temperature!r} is below the smallest sampling "
                f"temperature {MIN_TEMPERATURE:g}: logits / temperature would leave float32's "
                "range; use temperature=0 for greedy (argmax) decoding")
        if not isinstance(self.greedy_last, bool):
            raise TypeError(f"greedy_last must be a bool, got {self.greedy_last!r}")

    def resolve(self, num_quantizers: int) -> Tuple[int, ...]:
        """The per-level step counts for a model with `num_quantizers` levels."""
        if self.steps_per_level is None:
            return (16,) + (1,) * (num_quantizers - 1)
        if len(self.steps_per_level) != num_quantizers:
            raise ValueError(
                f"decode.steps_per_level has {len(self.steps_per_level)} entries "
                f"{self.steps_per_level} but the model has {num_quantizers} RVQ levels; "
                "give one step count per level")
        return self.steps_per_level

    def num_forward_passes(self, num_quantizers: int) -> int:
        return sum(self.resolve(num_quantizers))
