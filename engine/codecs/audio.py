"""Waveform input checks and sample-rate conversion shared by every codec.

Resampling uses soxr (the SoX resampler, "HQ" quality): a well-kept, band-limited
resampler, so codecs never see aliasing from a hand-written interpolation.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import torch

# Sample rates outside this range are a mistake (a rate in kHz, a sample count), not audio.
MIN_RATE, MAX_RATE = 1_000, 384_000
# A 2-D array with 1 or 2 columns and at least this many rows is audio in soundfile's
# [samples, channels] layout, not a batch of clips one or two samples long.
CHANNELS_LAST_ROWS = 64


def require(module: str):
    """Import an optional codec dependency, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"the codecs need {module!r} ({e}); install them with "
                          f"pip install 'soundstorm[codecs]'") from None


def as_batch(wav: Any, name: str = "wav") -> torch.Tensor:
    """Check a waveform and return it as float32 [B, N] on the CPU.

    wav: float [N] (one clip) or [B, N] (a batch of equal-length clips), a torch tensor
         or a numpy array, samples in [-1, 1] by convention. Channels-last audio
         (soundfile's [samples, channels], 1 or 2 columns and many rows) is refused with a
         ValueError saying how to pass it: mix it down (`wav.mean(axis=1)`) or transpose
         it, whichever is meant; nothing is guessed.
    """
    if isinstance(wav, np.ndarray):
        wav = torch.from_numpy(np.ascontiguousarray(wav))
    if not isinstance(wav, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array of float samples, "
                        f"got {type(wav).__name__}")
    if not (wav.is_floating_point() and not wav.is_complex()):
        raise TypeError(f"{name} must hold float samples, got dtype {wav.dtype}")
    if wav.ndim == 1:
        wav = wav[None]
    if wav.ndim != 2:
        raise ValueError(f"{name} must have shape [samples] or [batch, samples], "
                         f"got shape {tuple(wav.shape)}")
    rows, columns = wav.shape
    if columns <= 2 and rows >= CHANNELS_LAST_ROWS:
        raise ValueError(
            f"{name} has shape {tuple(wav.shape)}: this looks like {rows} samples of "
            f"{'mono' if columns == 1 else 'stereo'} audio in the [samples, channels] layout "
            f"(as soundfile reads it), but the expected layout is [samples] for one clip or "
            f"[batch, samples] for a batch; pass one mono clip, e.g. wav.mean(axis=1), or wav.T "
            f"to encode each channel as a clip of its own")
    if rows == 0 or columns == 0:
        raise ValueError(f"{name} must hold at least one clip of at least one sample, "
                         f"got shape {tuple(wav.shape)}")
    wav = wav.detach().to("cpu", torch.float32)
    if not torch.isfinite(wav).all():
        raise ValueError(f"{name} contains NaN or infinite samples")
    return wav


def check_rate(sr: Any, name: str = "sr") -> int:
    """A sample rate: an integer number of samples per second in [MIN_RATE, MAX_RATE]."""
    if isinstance(sr, bool) or not isinstance(sr, (int, np.integer)) or sr <= 0:
        if not (isinstance(sr, float) and sr.is_integer() and sr > 0):
            raise ValueError(f"{name} must be a positive integer sample rate in Hz, got {sr!r}")
    if not MIN_RATE <= sr <= MAX_RATE:
        raise ValueError(f"{name} must be a sample rate from {MIN_RATE} to {MAX_RATE} Hz, "
                         f"got {sr!r}")
    return int(sr)


def resampled_length(num_samples: int, sr_in: int, sr_out: int) -> int:
    """Length of `resample` output: num_samples * sr_out / sr_in, halves rounded up
    (as soxr does), in exact integer arithmetic."""
    return (2 * num_samples * sr_out + sr_in) // (2 * sr_in)


def resample(wav: torch.Tensor, sr_in: int, sr_out: int) -> torch.Tensor:
    """Band-limited sample-rate conversion with soxr.

    wav: float32 [B, N] at `sr_in`. Returns float32 [B, resampled_length(N, sr_in, sr_out)].
    """
    sr_in, sr_out = check_rate(sr_in, "sr_in"), check_rate(sr_out, "sr_out")
    if sr_in == sr_out:
        return wav
    soxr = require("soxr")

    # soxr treats the columns of a [N, channels] array as channels: the batch rows go
    # through one resampler call.
    out = soxr.resample(wav.numpy().T.astype(np.float32), sr_in, sr_out, quality="HQ")
    return torch.from_numpy(np.ascontiguousarray(out.T)).reshape(wav.shape[0], -1)


def read_audio(path, sample_rate: int | None = None) -> tuple[np.ndarray, int]:
    """Read a sound file (WAV, FLAC, OGG, ... via libsndfile), mixed down to mono.

    Returns (float32 [N], rate); with `sample_rate`, resampled to that rate first.
    """
    sf = require("soundfile")
    from pathlib import Path

    if not Path(path).is_file():
        raise FileNotFoundError(f"audio file {str(path)!r} does not exist")
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    mono = data.mean(axis=1)
    if sample_rate is not None and sr != sample_rate:
        mono = resample(torch.from_numpy(mono)[None], sr, sample_rate)[0].numpy()
        sr = sample_rate
    return mono, sr
