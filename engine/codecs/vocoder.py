"""A learned vocoder for melrvq: log-mel frames -> waveform, in the manner of Vocos.

A stack of ConvNeXt blocks over the frame sequence predicts, for every frame, the
log-magnitude and the phase of one STFT frame; an inverse STFT with the codec's own hop
turns them into samples. Nothing is upsampled in the network: it runs at the frame rate
(50 Hz), so decoding costs a few milliseconds per second of audio on a CPU, and unlike
Griffin-Lim the phase comes from the features themselves, not from iterations.

A codec directory that carries a vocoder has `vocoder.safetensors` and a "vocoder" object
(a `VocoderConfig`) in its config.json; `soundstorm.training.vocoder_fit.fit_vocoder`
trains one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCODER_FILE = "vocoder.safetensors"


@dataclasses.dataclass(frozen=True)
class VocoderConfig:
    """Network shape. `n_fft` and `hop_length` are those of the inverse STFT; hop_length
    must equal the codec's (one STFT frame per codec frame)."""

    n_mels: int = 80
    dim: int = 128               # small enough to train in minutes on a CPU
    intermediate_dim: int = 384
    layers: int = 6
    kernel_size: int = 7
    n_fft: int = 1280
    hop_length: int = 320

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"VocoderConfig.{f.name} must be a positive integer, got {v!r}")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"VocoderConfig.kernel_size must be odd (centred convolutions), "
                             f"got {self.kernel_size}")
        if self.n_fft < self.hop_length or self.n_fft % 2:
            raise ValueError(f"VocoderConfig.n_fft must be even and at least hop_length "
                             f"({self.hop_length}), got {self.n_fft}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> "VocoderConfig":
        if not isinstance(d, dict):
            raise ValueError(f"the vocoder config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = sorted(set(d) - known), sorted(known - set(d))
        if unknown or missing:
            raise ValueError(f"vocoder config: unknown field(s) {unknown}, missing field(s) "
                             f"{missing}; expected exactly {sorted(known)}")
        return cls(**d)


class ConvNeXtBlock(nn.Module):
    """Depthwise convolution over time, LayerNorm, a pointwise MLP (GELU), layer scale,
    residual."""

    def __init__(self, dim: int, intermediate_dim: int, kernel_size: int, scale: float):
        super().__init__()
        self.depthwise = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, intermediate_dim)
        self.down = nn.Linear(intermediate_dim, dim)
        self.scale = nn.Parameter(torch.full((dim,), scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, dim, T]
        h = self.depthwise(x).transpose(1, 2)
        h = self.down(F.gelu(self.up(self.norm(h))))
        return x + (self.scale * h).transpose(1, 2)


class MelVocoder(nn.Module):
    """log-mel float [B, T, n_mels] -> waveform float32 [B, T * hop_length].

    Frame t is centred on sample t * hop_length, as melrvq's features are."""

    def __init__(self, config: VocoderConfig):
        super().__init__()
        c = self.config = config
        self.embed = nn.Conv1d(c.n_mels, c.dim, c.kernel_size, padding=c.kernel_size // 2)
        self.norm = nn.LayerNorm(c.dim)
        self.blocks = nn.ModuleList(ConvNeXtBlock(c.dim, c.intermediate_dim, c.kernel_size,
                                                  1.0 / c.layers) for _ in range(c.layers))
        self.final_norm = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, c.n_fft + 2)  # log-magnitude and phase of n_fft/2+1 bins
        self.register_buffer("window", torch.hann_window(c.n_fft), persistent=False)

    def spectrum(self, features: torch.Tensor) -> torch.Tensor:
        """The complex STFT [B, n_fft/2+1, T] the network predicts for `features`."""
        c = self.config
        x = self.embed(features.transpose(1, 2))
        x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        h = self.head(self.final_norm(x.transpose(1, 2))).transpose(1, 2)  # [B, n_fft+2, T]
        log_mag, phase = h.float().chunk(2, dim=1)
        # exp of an unbounded output can overflow early in training: magnitudes above e^4.6
        # (100, far above speech at full scale) are clipped, as Vocos does.
        mag = torch.exp(log_mag.clamp(max=math.log(100.0)))
        return torch.polar(mag, phase)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        c = self.config
        if features.dim() != 3 or features.shape[-1] != c.n_mels:
            raise ValueError(f"features must be log-mel frames [B, T, {c.n_mels}], got shape "
                             f"{tuple(features.shape)}")
        frames = features.shape[1]
        if frames == 0:
            return features.new_zeros(features.shape[0], 0, dtype=torch.float32)
        spec = self.spectrum(features.to(self.embed.weight.dtype))
        # A signal of T * hop samples has T + 1 centred frames; the last repeats frame T.
        spec = torch.cat([spec, spec[..., -1:]], dim=-1)
        return torch.istft(spec, n_fft=c.n_fft, hop_length=c.hop_length, window=self.window,
                           center=True, length=frames * c.hop_length)


__all__ = ["VOCODER_FILE", "VocoderConfig", "MelVocoder", "ConvNeXtBlock"]
