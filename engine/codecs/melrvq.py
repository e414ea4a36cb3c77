"""`melrvq`: the built-in reference codec, which needs no downloaded weights.

A low-fidelity codec for offline use and tests, not for listening quality: each 20 ms
frame (50 frames/s) is a log-mel spectrum, quantised by residual vector quantisation with
Q codebooks of C codewords fit by k-means on a speech corpus
(`soundstorm.training.codec_fit.fit_melrvq`). Decoding sums the codewords and turns the
log-mel frames into a waveform with the codec's learned vocoder when it has one
(`vocoder.MelVocoder`, trained by `soundstorm.training.vocoder_fit.fit_vocoder`), else by
mapping the mel spectrum back to a linear magnitude spectrogram and recovering a phase
with Griffin-Lim (librosa), which gives intelligible speech with a buzzy, phasey timbre.

A codec directory holds `config.json` and `codebooks.safetensors` (float32 [Q, C, n_mels]),
and, with a vocoder, `vocoder.safetensors` and a "vocoder" object in config.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from soundstorm.engine.codecs.audio import require
from soundstorm.engine.codecs.base import Codec, check_levels
from soundstorm.engine.codecs.vocoder import VOCODER_FILE, MelVocoder, VocoderConfig
from soundstorm.engine.files import read_format_json, read_tensor

CONFIG_FILE = "config.json"
CODEBOOKS_FILE = "codebooks.safetensors"
FORMAT_NAME = "soundstorm-melrvq"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class MelRVQConfig:
    """Feature and quantiser settings. hop = sample_rate / frame_rate samples per frame."""

    sample_rate: int = 16000
    frame_rate: int = 50
    n_fft: int = 1280              # 80 ms window, 4 windows per hop: enough overlap for Griffin-Lim
    n_mels: int = 80
    fmin: float = 0.0
    fmax: Optional[float] = None   # None: sample_rate / 2
    log_floor: float = 1e-5        # mel magnitudes are clamped here before the log
    num_quantizers: int = 8
    codebook_size: int = 256
    griffin_lim_iters: int = 32

    def __post_init__(self):
        def positive_int(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"MelRVQConfig.{name} must be a positive integer, got {v!r}")
        for name in ("sample_rate", "frame_rate", "n_fft", "n_mels", "num_quantizers",
                     "codebook_size", "griffin_lim_iters"):
            positive_int(name)
        if self.sample_rate % self.frame_rate:
            raise ValueError(f"MelRVQConfig.sample_rate ({self.sample_rate}) must be a multiple "
                             f"of frame_rate ({self.frame_rate}) so that a frame is whole samples")
        if self.n_fft < self.hop_length:
            raise ValueError(f"MelRVQConfig.n_fft ({self.n_fft}) must be at least the hop "
                             f"({self.hop_length} samples) so that frames cover the signal")
        top = self.sample_rate / 2 if self.fmax is None else self.fmax
        if not 0 <= self.fmin < top <= self.sample_rate / 2:
            raise ValueError(f"MelRVQConfig needs 0 <= fmin < fmax <= sample_rate/2, got "
                             f"fmin={self.fmin}, fmax={self.fmax}, sample_rate={self.sample_rate}")
        if not self.log_floor > 0:
            raise ValueError(f"MelRVQConfig.log_floor must be > 0, got {self.log_floor!r}")

    @property
    def hop_length(self) -> int:
        return self.sample_rate // self.frame_rate

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MelRVQConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown MelRVQConfig fields {unknown}; known: {sorted(fields)}")
        return cls(**d)


class MelRVQCodec(Codec):
    """Log-mel frames at 50 Hz, residual-VQ'd with Q codebooks, decoded by a learned
    vocoder or by Griffin-Lim.

    codebooks: float32 [Q, C, n_mels], level 1 first.
    vocoder:   a MelVocoder for these features (same n_mels and hop), or None: Griffin-Lim.
    """

    name = "melrvq"

    def __init__(self, config: MelRVQConfig, codebooks: torch.Tensor,
                 vocoder: Optional[MelVocoder] = None):
        expected = (config.num_quantizers, config.codebook_size, config.n_mels)
        if not isinstance(codebooks, torch.Tensor) or tuple(codebooks.shape) != expected:
            shape = tuple(codebooks.shape) if isinstance(codebooks, torch.Tensor) else codebooks
            raise ValueError(f"codebooks must be a float tensor of shape [num_quantizers, "
                             f"codebook_size, n_mels] = {expected}, got {shape}")
        if not torch.isfinite(codebooks).all():
            raise ValueError("codebooks contain NaN or infinite values")
        self.config = config
        self.codebooks = codebooks.detach().to("cpu", torch.float32).contiguous()
        if vocoder is not None:
            if not isinstance(vocoder, MelVocoder):
                raise TypeError(f"vocoder must be a MelVocoder or None, got "
                                f"{type(vocoder).__name__}")
            vc = vocoder.config
            if (vc.n_mels, vc.hop_length) != (config.n_mels, config.hop_length):
                raise ValueError(f"the vocoder takes {vc.n_mels} mel bands at a hop of "
                                 f"{vc.hop_length} samples; this codec has {config.n_mels} "
                                 f"at {config.hop_length}")
            vocoder = vocoder.eval().requires_grad_(False)
        self.vocoder = vocoder
        self._mel_basis = None
        self._mel_inverse = None

    # -- protocol ---------------------------------------------------------------------
    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def hop_length(self) -> int:
        return self.config.hop_length

    @property
    def num_quantizers(self) -> int:
        return self.config.num_quantizers

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def _encode(self, wav: torch.Tensor) -> torch.Tensor:
        return self.quantize(self.log_mel(wav))

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.synthesize(self.dequantize(tokens))

    # -- the pieces, public for fitting and analysis ------------------------------------
    def log_mel(self, wav: torch.Tensor) -> torch.Tensor:
        """float32 [B, N] at `sample_rate` -> log-mel frames float32 [B, ceil(N / hop), n_mels].

        Frame t is centred on sample t * hop (the signal is zero-padded to whole frames).
        """
        librosa = require("librosa")

        c, hop = self.config, self.hop_length
        x = wav.numpy().astype(np.float32)
        frames = -(-x.shape[1] // hop)
        # Zero-pad to whole frames, plus half a window each side so that frame t is
        # centred on sample t * hop (librosa's center=True, without its short-input warning).
        half = c.n_fft // 2
        x = np.pad(x, ((0, 0), (half, frames * hop - x.shape[1] + half)))
        spec = np.abs(librosa.stft(x, n_fft=c.n_fft, hop_length=hop, center=False))
        mel = self.mel_basis @ spec[..., :frames]  # [B, n_mels, T]
        return torch.from_numpy(np.log(np.maximum(mel, c.log_floor))).transpose(1, 2).contiguous()

    def quantize(self, features: torch.Tensor) -> torch.Tensor:
        """Residual VQ: float [B, T, n_mels] -> int64 [B, T, Q], nearest codeword per level."""
        residual = features.reshape(-1, features.shape[-1]).to(torch.float32)
        ids = []
        for codebook in self.codebooks:
            idx = nearest(residual, codebook)
            residual = residual - codebook[idx]
            ids.append(idx)
        return torch.stack(ids, dim=-1).reshape(*features.shape[:-1], len(ids))

    def dequantize(self, tokens: torch.Tensor) -> torch.Tensor:
        """int [B, T, Q] -> float32 [B, T, n_mels]: the sum of the chosen codewords."""
        out = torch.zeros(*tokens.shape[:-1], self.config.n_mels)
        for q in range(tokens.shape[-1]):
            out += self.codebooks[q][tokens[..., q]]
        return out

    @property
    def decoder(self) -> str:
        """How frames become samples: "vocoder" or "griffin-lim"."""
        return "griffin-lim" if self.vocoder is None else "vocoder"

    def synthesize(self, features: torch.Tensor) -> torch.Tensor:
        """Log-mel frames float [B, T, n_mels] -> waveform float32 [B, T * hop], by the
        vocoder when the codec has one, else by Griffin-Lim."""
        if self.vocoder is None:
            return self.griffin_lim(features)
        with torch.inference_mode():
            wav = self.vocoder(features.to(torch.float32))
        return wav.to(torch.float32).contiguous()

    def griffin_lim(self, features: torch.Tensor) -> torch.Tensor:
        """Log-mel frames float [B, T, n_mels] -> waveform float32 [B, T * hop] (Griffin-Lim)."""
        librosa = require("librosa")

        c, hop = self.config, self.hop_length
        b, t, _ = features.shape
        mel = np.exp(features.numpy().astype(np.float64)).transpose(0, 2, 1)  # [B, n_mels, T]
        # The least-squares inverse of the mel filterbank, clipped at zero: the same
        # magnitudes as librosa's NNLS mel_to_stft here, at a fraction of the cost.
        mag = np.maximum(self.mel_inverse @ mel, 0.0)
        # A signal of T * hop samples has T + 1 centred frames; the last one repeats frame T.
        mag = np.concatenate([mag, mag[..., -1:]], axis=-1).astype(np.float32)
        with warnings.catch_warnings():
            # Clips shorter than one window (a few frames) are fine: librosa zero-pads them.
            warnings.filterwarnings("ignore", message="n_fft=.* is too large", category=UserWarning)
            wav = librosa.griffinlim(mag, n_iter=c.griffin_lim_iters, hop_length=hop,
                                     n_fft=c.n_fft, length=t * hop, random_state=0)
        return torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32)).reshape(b, t * hop)

    @property
    def mel_basis(self) -> np.ndarray:
        """float32 [n_mels, n_fft // 2 + 1]: librosa's Slaney-normalised mel filterbank."""
        if self._mel_basis is None:
            librosa = require("librosa")

            c = self.config
            self._mel_basis = librosa.filters.mel(sr=c.sample_rate, n_fft=c.n_fft, n_mels=c.n_mels,
                                                  fmin=c.fmin, fmax=c.fmax)
        return self._mel_basis

    @property
    def mel_inverse(self) -> np.ndarray:
        if self._mel_inverse is None:
            self._mel_inverse = np.linalg.pinv(self.mel_basis.astype(np.float64))
        return self._mel_inverse

    # -- storage ------------------------------------------------------------------------
    def save(self, directory: Any) -> Path:
        """Write `config.json` and `codebooks.safetensors` into `directory` (created if
        needed); each file is written under a temporary name, then renamed."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                "codec": self.config.to_dict()}
        tmp_w, tmp_c = directory / (CODEBOOKS_FILE + ".tmp"), directory / (CONFIG_FILE + ".tmp")
        save_file({"codebooks": self.codebooks}, str(tmp_w), metadata={"format": FORMAT_NAME})
        if self.vocoder is not None:
            meta["vocoder"] = self.vocoder.config.to_dict()
            tmp_v = directory / (VOCODER_FILE + ".tmp")
            save_file({k: v.contiguous() for k, v in self.vocoder.state_dict().items()},
                      str(tmp_v), metadata={"format": FORMAT_NAME})
            os.replace(tmp_v, directory / VOCODER_FILE)
        tmp_c.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp_w, directory / CODEBOOKS_FILE)
        # the config goes last: it names the vocoder only once its weights are in place
        os.replace(tmp_c, directory / CONFIG_FILE)
        return directory

    @classmethod
    def load(cls, path: Any, num_quantizers: Optional[int] = None,
             griffin_lim_iters: Optional[int] = None,
             vocoder: Optional[bool] = None) -> "MelRVQCodec":
        """Load a directory written by `save`. `num_quantizers` keeps the first levels only
        (a coarser codec from the same codebooks). `vocoder`: None uses the directory's
        vocoder when it has one, False decodes with Griffin-Lim, True requires the vocoder."""
        if path is None:
            raise ValueError("load_codec('melrvq') needs path=DIR, a directory written by "
                             "soundstorm.training.codec_fit.fit_melrvq (config.json + "
                             "codebooks.safetensors)")
        directory = Path(path)
        how = ("fit one from a few minutes of speech with "
               "soundstorm.training.codec_fit.fit_melrvq(wav_files, out_dir)")
        if not directory.is_dir():
            raise FileNotFoundError(f"melrvq codec directory {str(directory)!r} does not exist: {how}")
        for f in (CONFIG_FILE, CODEBOOKS_FILE):
            if not (directory / f).is_file():
                raise FileNotFoundError(f"melrvq codec directory {str(directory)!r} has no {f}: {how}")
        meta = read_format_json(directory / CONFIG_FILE, FORMAT_NAME, FORMAT_VERSION,
                                "melrvq codec config")
        config = MelRVQConfig.from_dict(meta["codec"])
        codebooks = read_tensor(directory / CODEBOOKS_FILE, "codebooks")
        q = check_levels(num_quantizers, config.num_quantizers, "melrvq")
        changes = {"num_quantizers": q}
        if griffin_lim_iters is not None:
            changes["griffin_lim_iters"] = griffin_lim_iters
        if vocoder not in (None, True, False):
            raise TypeError(f"vocoder must be None, True or False, got {vocoder!r}")
        if vocoder is True and "vocoder" not in meta:
            raise ValueError(f"melrvq codec directory {str(directory)!r} has no vocoder (its "
                             f"config.json names none); train one with soundstorm "
                             f"fit-vocoder {directory} AUDIO...")
        net = None
        if vocoder is not False and "vocoder" in meta:
            net = load_vocoder(directory, meta["vocoder"])
        codec = cls(config, codebooks)
        return cls(dataclasses.replace(config, **changes), codec.codebooks[:q], vocoder=net)


def load_vocoder(directory: Path, config: Any) -> MelVocoder:
    """The vocoder of a codec directory: its config (the "vocoder" object of config.json)
    and `vocoder.safetensors`, every tensor present with its shape, loaded as float32."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        net = MelVocoder(VocoderConfig.from_dict(config))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{directory / CONFIG_FILE}: invalid vocoder config: {e}") from None
    path = directory / VOCODER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"melrvq codec directory {str(directory)!r} names a vocoder "
                                f"but has no {VOCODER_FILE}")
    try:
        weights = load_file(str(path))
    except SafetensorError as e:
        raise ValueError(f"{path} is not a valid safetensors file: {e}") from None
    expected = net.state_dict()
    unknown, missing = sorted(set(weights) - set(expected)), sorted(set(expected) - set(weights))
    if unknown or missing:
        raise ValueError(f"{path} does not fit the vocoder config: missing tensor(s) "
                         f"{missing[:4]}, unknown tensor(s) {unknown[:4]}")
    for key, value in weights.items():
        if value.shape != expected[key].shape or not value.is_floating_point():
            raise ValueError(f"{path}: tensor {key!r} has shape {tuple(value.shape)} "
                             f"({value.dtype}), the config needs {tuple(expected[key].shape)} "
                             f"(float)")
        if not torch.isfinite(value).all():
            raise ValueError(f"{path}: tensor {key!r} holds NaN or infinite values")
    net.load_state_dict({k: v.to(torch.float32) for k, v in weights.items()})
    return net


def nearest(x: torch.Tensor, codebook: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """Index of the nearest codeword (Euclidean) for each row.

    x: float32 [N, D]; codebook: float32 [C, D]. Returns int64 [N]. Rows go in chunks so
    the [chunk, C] distance matrix stays small.
    """
    sq = (codebook * codebook).sum(1)
    out = torch.empty(x.shape[0], dtype=torch.int64)
    for i in range(0, x.shape[0], chunk):
        xs = x[i:i + chunk]
        # |x - c|^2 = |x|^2 - 2 x.c + |c|^2; |x|^2 is the same for every c
        out[i:i + chunk] = (sq - 2.0 * xs @ codebook.T).argmin(1)
    return out
