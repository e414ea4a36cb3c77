"""The codec protocol: waveform <-> RVQ tokens [B, T, Q].

Every adapter (EnCodec, DAC, Mimi, the built-in mel-RVQ codec) subclasses `Codec` and
implements `_encode` and `_decode` on checked inputs at its own sample rate; `encode`
and `decode` here do the checking and the resampling, so every codec rejects bad input
the same way.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Optional

import torch

from soundstorm.engine.codecs.audio import as_batch, check_rate, resample, resampled_length


class Codec(ABC):
    """A residual-vector-quantised audio codec.

    Tokens are int64 [B, T, Q]: T frames at `frame_rate`, Q levels with level 1 (index 0)
    the coarsest, ids in [0, codebook_size). One frame covers `hop_length` samples at
    `sample_rate`: `encode` of N samples gives T = ceil(N / hop_length) frames (the last
    frame zero-padded) and `decode` of T frames gives exactly T * hop_length samples.
    """

    name: str = "codec"

    @property
    @abstractmethod
    def sample_rate(self) -> int:
        """Samples per second of the codec's own waveforms."""

    @property
    @abstractmethod
    def hop_length(self) -> int:
        """Samples per token frame at `sample_rate`."""

    @property
    @abstractmethod
    def num_quantizers(self) -> int:
        """Q: RVQ levels per frame."""

    @property
    @abstractmethod
    def codebook_size(self) -> int:
        """C: ids per level are in [0, C)."""

    @property
    def frame_rate(self) -> float:
        """Token frames per second (50.0 for 320-sample frames at 16 kHz; 12.5 for Mimi)."""
        return self.sample_rate / self.hop_length

    def num_frames(self, num_samples: int, sr: Optional[int] = None) -> int:
        """Frames that `encode` makes of `num_samples` samples at `sr` (default:
        `sample_rate`)."""
        if sr is not None:
            num_samples = resampled_length(num_samples, check_rate(sr, "sr"), self.sample_rate)
        return math.ceil(num_samples / self.hop_length)

    # -- public API -------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, wav: Any, sr: int) -> torch.Tensor:
        """Waveform -> tokens.

        wav: float [N] or [B, N] (torch or numpy) at `sr` Hz, `sr` from 1 to 384 kHz;
             resampled with soxr when `sr != sample_rate`. Channels-last audio
             ([samples, channels], as soundfile reads it) and input too short to make one
             frame are refused with a ValueError. Clips of different lengths go in
             zero-padded to the longest; each row is encoded on its own, so cut a row's
             tokens to `num_frames(its length, sr)` afterwards.
        Returns int64 [B, T, Q], T = ceil(N' / hop_length) with N' the length at
        `sample_rate`.
        """
        sr = check_rate(sr, "sr")
        wav = as_batch(wav, "wav")
        if self.num_frames(wav.shape[1], sr) == 0:
            raise ValueError(f"wav of {wav.shape[1]} sample(s) at {sr} Hz is shorter than one "
                             f"sample at this {self.name} codec's {self.sample_rate} Hz: it "
                             f"makes no frames")
        wav = resample(wav, sr, self.sample_rate)
        tokens = self._encode(wav)
        expected = (wav.shape[0], self.num_frames(wav.shape[1]), self.num_quantizers)
        if tuple(tokens.shape) != expected:  # an adapter bug, not a user error
            raise RuntimeError(f"{self.name} encoder returned tokens of shape "
                               f"{tuple(tokens.shape)}, expected {expected}")
        return tokens.to(torch.int64)

    @torch.no_grad()
    def decode(self, tokens: Any) -> torch.Tensor:
        """Tokens -> waveform.

        tokens: int [B, T, Q] with ids in [0, codebook_size) and Q == num_quantizers.
        Returns float32 [B, T * hop_length] at `sample_rate`, on the CPU.
        """
        tokens = self.check_tokens(tokens)
        wav = self._decode(tokens)
        return wav.detach().to("cpu", torch.float32)

    def check_tokens(self, tokens: Any, name: str = "tokens") -> torch.Tensor:
        """Check token ids for `decode`; returns them as int64 [B, T, Q] on the CPU."""
        if not isinstance(tokens, torch.Tensor):
            try:
                tokens = torch.as_tensor(tokens)
            except Exception:
                raise TypeError(f"{name} must be an integer tensor [B, T, Q], "
                                f"got {type(tokens).__name__}") from None
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer ids, got dtype {tokens.dtype}")
        if tokens.ndim != 3:
            hint = " (one clip: pass tokens[None])" if tokens.ndim == 2 else ""
            raise ValueError(f"{name} must have shape [batch, frames, levels], "
                             f"got shape {tuple(tokens.shape)}{hint}")
        b, t, q = tokens.shape
        if q != self.num_quantizers:
            raise ValueError(f"{name} has {q} levels (shape {tuple(tokens.shape)}), but this "
                             f"{self.name} codec has num_quantizers={self.num_quantizers}")
        if b == 0 or t == 0:
            raise ValueError(f"{name} must hold at least one clip of at least one frame, "
                             f"got shape {tuple(tokens.shape)}")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.codebook_size:
            bad = lo if lo < 0 else hi
            hint = " (-1 marks padding frames in engine output: cut each row to its length)" \
                if bad == -1 else ""
            raise ValueError(f"{name} ids must be in [0, {self.codebook_size}) for this "
                             f"{self.name} codec, got {bad}{hint}")
        return tokens.to("cpu", torch.int64)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(sample_rate={self.sample_rate}, "
                f"frame_rate={self.frame_rate:g}, num_quantizers={self.num_quantizers}, "
                f"codebook_size={self.codebook_size})")

    # -- adapter hooks ----------------------------------------------------------------
    @abstractmethod
    def _encode(self, wav: torch.Tensor) -> torch.Tensor:
        """float32 [B, N] at `sample_rate` (CPU) -> int [B, ceil(N / hop_length), Q]."""

    @abstractmethod
    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Checked int64 [B, T, Q] (CPU) -> float [B, T * hop_length]."""


def check_levels(num_quantizers: Any, total: int, codec: str) -> int:
    """The number of RVQ levels to keep: `total` when None, else an int in [1, total]."""
    if num_quantizers is None:
        return total
    if isinstance(num_quantizers, bool) or not isinstance(num_quantizers, int) \
            or not 1 <= num_quantizers <= total:
        raise ValueError(f"num_quantizers must be an integer in [1, {total}] for this {codec} "
                         f"model, got {num_quantizers!r}")
    return num_quantizers
