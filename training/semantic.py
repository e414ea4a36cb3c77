"""Semantic tokenizers: audio -> coarse, time-aligned ids (k-means over speech features).

    from soundstorm.training.semantic import fit_semantic, load_semantic
    fit_semantic("mfcc", wav_files, "semantic/", vocab_size=256, rate=25)
    tok = load_semantic("semantic/")
    ids = tok.tokenize(samples, sr)            # int64 [tok.num_ids(len(samples), sr)]

Kinds:
- `mfcc`: built in, nothing to download. 13 MFCCs + deltas + delta-deltas (25 ms windows,
  10 ms hop, 40 mel bands) at 16 kHz, normalised per utterance (cepstral mean and variance
  normalisation: the speaker's and the channel's average spectrum cancel, so the ids
  follow the phones more than the voice), averaged over windows of 1/rate s.
- `hubert` (transformers `HubertModel`) and `w2v-bert` (`Wav2Vec2BertModel`, fed the
  80-band fbanks of its `SeamlessM4TFeatureExtractor`): the hidden states after
  transformer layer `layer` (default 6, as AudioLM's HuBERT tokens; for w2v-BERT 2.0's 24
  layers a middle layer may serve better: try --layer), averaged from the model's 50 Hz
  to `rate`. Weights come only from a local directory in the Hugging Face layout
  (config.json + *.safetensors); `random_init=True` builds a small random model, for tests.

Id window j covers the samples [j, j + 1) * sample_rate / rate at 16 kHz, so a clip of N
samples (at 16 kHz) gets max(1, ceil(N * rate / 16000)) ids. A tokenizer directory holds
`semantic.json` (kind, settings) and `centroids.safetensors` (float32 [vocab_size, D]).
"""

from __future__ import annotations

import json
import math
import os
from abc import ABC, abstractmethod
from fractions import Fraction
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from soundstorm.engine.codecs.audio import as_batch, check_rate, require, resample, resampled_length
from soundstorm.engine.codecs.hf import (check_model_directory, from_pretrained_complete,
                                        how_to_get)
from soundstorm.engine.codecs.melrvq import nearest
from soundstorm.engine.files import read_format_json, read_tensor
from soundstorm.training.codec_fit import FrameSample, audio_clips, kmeans

FORMAT_NAME = "soundstorm-semantic-tokenizer"
FORMAT_VERSION = 1
CONFIG_FILE = "semantic.json"
CENTROIDS_FILE = "centroids.safetensors"
KINDS = ("mfcc", "hubert", "w2v-bert")
SAMPLE_RATE = 16000
DEFAULT_LAYER = 6


class SemanticTokenizer(ABC):
    """Speech features pooled to `rate` Hz, then the id of the nearest k-means centroid.

    Subclasses give `_frames` (features at a fixed hop) and the settings to save.
    """

    kind: str
    sample_rate: int = SAMPLE_RATE
    hop: int                   # feature frames are `hop` samples apart at sample_rate ...
    offset: float              # ... and frame i is centred on sample offset + i * hop

    def __init__(self, rate: float, centroids: Optional[torch.Tensor] = None):
        self.rate = check_semantic_rate(rate)
        self.centroids = centroids  # float32 [vocab_size, D]; None until fitted

    @property
    def vocab_size(self) -> int:
        if self.centroids is None:
            raise RuntimeError(f"this {self.kind} tokenizer has no centroids yet: fit it with "
                               f"fit_semantic or load one with load_semantic")
        return int(self.centroids.shape[0])

    @abstractmethod
    def _frames(self, wav: np.ndarray) -> torch.Tensor:
        """wav: float32 [N] at sample_rate, N >= 1. Returns float32 [F, D], F >= 1."""

    @abstractmethod
    def settings(self) -> Dict[str, Any]:
        """What `load_semantic` needs, besides kind, rate and centroids (JSON values)."""

    def num_ids(self, num_samples: int, sr: Optional[int] = None) -> int:
        """Ids that `tokenize` makes of a clip of num_samples samples at rate sr (default:
        sample_rate)."""
        if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) \
                or num_samples < 0:
            raise ValueError(f"num_samples must be a non-negative integer, got {num_samples!r}")
        n = int(num_samples)
        if sr is not None and check_rate(sr) != self.sample_rate:
            n = resampled_length(n, int(sr), self.sample_rate)
        return max(1, math.ceil(n * Fraction(self.rate) / self.sample_rate))

    def embed(self, wav: Any, sr: int) -> torch.Tensor:
        """The pooled features of one mono clip: float32 [num_ids(len(wav), sr), D]."""
        clip = _mono(wav)
        sr = check_rate(sr)
        clip = resample(clip[None], sr, self.sample_rate)[0]
        samples = clip.numpy()
        if len(samples) == 0:  # a clip of a sample or two can resample to nothing
            samples = np.zeros(1, np.float32)
        frames = self._frames(samples)
        return pool(frames, self.hop, self.offset, self.sample_rate, self.rate,
                    self.num_ids(len(clip)))

    def tokenize(self, wav: Any, sr: int) -> torch.Tensor:
        """One mono clip, float samples [N] (numpy or torch) at rate sr -> int64 ids
        [num_ids(N, sr)] in [0, vocab_size)."""
        self.vocab_size  # noqa: B018 (raises if not fitted)
        with torch.no_grad():
            feats = self.embed(wav, sr)
        return nearest(feats, self.centroids)

    def save(self, directory: Any) -> Path:
        """Write semantic.json and centroids.safetensors into `directory` (created if
        needed); each file is written under a temporary name, then renamed."""
        from safetensors.torch import save_file

        self.vocab_size  # noqa: B018 (raises if not fitted)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "kind": self.kind,
                "sample_rate": self.sample_rate, "rate": self.rate,
                "vocab_size": self.vocab_size, "feature_dim": int(self.centroids.shape[1]),
                "settings": self.settings()}
        tmp_w, tmp_c = directory / (CENTROIDS_FILE + ".tmp"), directory / (CONFIG_FILE + ".tmp")
        save_file({"centroids": self.centroids.contiguous()}, str(tmp_w),
                  metadata={"format": FORMAT_NAME})
        tmp_c.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp_w, directory / CENTROIDS_FILE)
        os.replace(tmp_c, directory / CONFIG_FILE)
        return directory

    def __repr__(self) -> str:
        size = "unfitted" if self.centroids is None else f"vocab_size={self.vocab_size}"
        return f"{type(self).__name__}(rate={self.rate:g}, {size}, {self.settings()})"


def pool(frames: torch.Tensor, hop: int, offset: float, sample_rate: int, rate: float,
         num: int) -> torch.Tensor:
    """Average feature frames over id windows.

    frames: float32 [F, D], frame i centred on sample offset + i * hop. Window j is the
    samples [j, j + 1) * sample_rate / rate; it averages the frames centred inside it, or,
    where none is (rate above the frame rate, or the clip's end), takes the frame nearest
    its centre. Returns float32 [num, D].
    """
    # Window edges in exact integer arithmetic: width = p / q samples.
    width = Fraction(sample_rate) / Fraction(rate)
    p, q = width.numerator, width.denominator
    off = Fraction(offset).limit_denominator(1000)
    num_o, den_o = off.numerator, off.denominator
    j = np.arange(num + 1, dtype=np.int64)
    # first frame i with offset + i * hop >= j * p / q  <=>  i >= (j p den_o - num_o q) / (hop q den_o)
    top = j * p * den_o - num_o * q
    edges = np.clip(-(-top // (hop * q * den_o)), 0, len(frames))
    a, b = torch.from_numpy(edges[:-1]), torch.from_numpy(edges[1:])
    cs = torch.cat([torch.zeros(1, frames.shape[1], dtype=torch.float64),
                    frames.double().cumsum(0)])
    counts = (b - a).clamp(min=1)
    out = (cs[b] - cs[a]) / counts[:, None]
    empty = (b <= a).nonzero().flatten()
    if len(empty):
        centre = (2 * j[empty.numpy()] + 1) * float(width) / 2
        near = np.clip(np.round((centre - float(offset)) / hop), 0, len(frames) - 1).astype(np.int64)
        out[empty] = frames[torch.from_numpy(near)].double()
    return out.float()


class MFCCTokenizer(SemanticTokenizer):
    """MFCCs + deltas + delta-deltas, normalised per utterance (see the module docstring)."""

    kind = "mfcc"
    offset = 0.0  # librosa centres frame i on sample i * hop

    def __init__(self, rate: float = 25, centroids: Optional[torch.Tensor] = None,
                 n_mfcc: int = 13, n_mels: int = 40, n_fft: int = 512, win_length: int = 400,
                 hop_length: int = 160, fmin: float = 20.0, fmax: float = 7600.0):
        super().__init__(rate, centroids)
        for name, value in (("n_mfcc", n_mfcc), ("n_mels", n_mels), ("n_fft", n_fft),
                            ("win_length", win_length), ("hop_length", hop_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (n_mfcc <= n_mels and win_length <= n_fft and 0 <= fmin < fmax <= SAMPLE_RATE / 2):
            raise ValueError(f"mfcc settings need n_mfcc <= n_mels, win_length <= n_fft and "
                             f"0 <= fmin < fmax <= {SAMPLE_RATE // 2}, got n_mfcc={n_mfcc}, "
                             f"n_mels={n_mels}, win_length={win_length}, n_fft={n_fft}, "
                             f"fmin={fmin}, fmax={fmax}")
        self.n_mfcc, self.n_mels, self.n_fft, self.win_length = n_mfcc, n_mels, n_fft, win_length
        self.hop = self.hop_length = hop_length
        self.fmin, self.fmax = float(fmin), float(fmax)
        if centroids is not None:
            _check_centroids(centroids, 3 * n_mfcc, "mfcc")
        self._librosa = require("librosa")
        self._mel = self._librosa.filters.mel(sr=SAMPLE_RATE, n_fft=n_fft, n_mels=n_mels,
                                              fmin=self.fmin, fmax=self.fmax)

    def settings(self) -> Dict[str, Any]:
        return {"n_mfcc": self.n_mfcc, "n_mels": self.n_mels, "n_fft": self.n_fft,
                "win_length": self.win_length, "hop_length": self.hop_length,
                "fmin": self.fmin, "fmax": self.fmax}

    def _frames(self, wav: np.ndarray) -> torch.Tensor:
        lr = self._librosa
        if len(wav) < self.n_fft:  # the frames of the clip's own samples stay as they are
            wav = np.pad(wav, (0, self.n_fft - len(wav)))
        spec = np.abs(lr.stft(wav, n_fft=self.n_fft, hop_length=self.hop_length,
                              win_length=self.win_length, center=True)) ** 2
        logmel = lr.power_to_db(self._mel @ spec, top_db=80.0)
        mfcc = lr.feature.mfcc(S=logmel, n_mfcc=self.n_mfcc)                 # [13, F]
        # mode="nearest": defined for clips shorter than the 9-frame delta window
        feats = np.concatenate([mfcc, lr.feature.delta(mfcc, mode="nearest"),
                                lr.feature.delta(mfcc, order=2, mode="nearest")])
        feats = (feats - feats.mean(1, keepdims=True)) / (feats.std(1, keepdims=True) + 1e-3)
        return torch.from_numpy(np.ascontiguousarray(feats.T, dtype=np.float32))


# kind -> (model class, config class, feature-extractor class, model_type in config.json,
#          where the official weights live)
_HF = {
    "hubert": ("HubertModel", "HubertConfig", "Wav2Vec2FeatureExtractor", "hubert",
               "facebook/hubert-base-ls960"),
    "w2v-bert": ("Wav2Vec2BertModel", "Wav2Vec2BertConfig", "SeamlessM4TFeatureExtractor",
                 "wav2vec2-bert", "facebook/w2v-bert-2.0"),
}
# random_init=True: small random models (tests only), 6 layers so the default layer exists.
SMALL_CONFIGS = {
    "hubert": dict(hidden_size=32, num_hidden_layers=6, num_attention_heads=2,
                   intermediate_size=64, conv_dim=(32,) * 7, num_conv_pos_embeddings=16,
                   num_conv_pos_embedding_groups=2),
    "w2v-bert": dict(hidden_size=32, num_hidden_layers=6, num_attention_heads=2,
                     intermediate_size=64, conv_depthwise_kernel_size=5),
}


class HFTokenizer(SemanticTokenizer):
    """HuBERT or w2v-BERT hidden states after transformer layer `layer` (1-based)."""

    hop = 320                  # both models emit 50 Hz frames at 16 kHz
    CHUNK = 30 * SAMPLE_RATE   # longer clips go through in pieces: attention is quadratic

    def __init__(self, kind: str, rate: float = 25, centroids: Optional[torch.Tensor] = None,
                 layer: Optional[int] = None, model_path: Any = None, random_init: bool = False,
                 device: Any = "cpu", model_config: Optional[Dict[str, Any]] = None):
        super().__init__(rate, centroids)
        if kind not in _HF:
            raise ValueError(f"kind must be one of {', '.join(_HF)}, got {kind!r}")
        self.kind = kind
        # Frame i of HuBERT sees samples [320 i, 320 i + 400); of w2v-BERT, two stacked
        # 25 ms fbank frames: samples [320 i, 320 i + 560).
        self.min_samples = 400 if kind == "hubert" else 560
        self.offset = self.min_samples / 2
        self.random_init = bool(random_init)
        self.model_path = None if model_path is None else str(Path(model_path).resolve())
        self.device = torch.device(device)
        if model_config is not None and not random_init:
            raise ValueError("model_config applies only with random_init=True; a weights "
                             "directory brings its own config.json")
        self.model_config = dict(model_config or SMALL_CONFIGS[kind]) if random_init else None
        self.model, self.extractor = _load_hf(kind, model_path, self.model_config)
        num_layers = int(self.model.config.num_hidden_layers)
        layer = DEFAULT_LAYER if layer is None else layer
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) \
                or not 1 <= layer <= num_layers:
            raise ValueError(f"layer must be an integer in [1, {num_layers}] (the {kind} "
                             f"model has {num_layers} transformer layers), got {layer!r}")
        self.layer = int(layer)
        self.num_layers = num_layers
        # Layers above `layer` are never needed: drop them.
        self.model.encoder.layers = self.model.encoder.layers[:self.layer]
        self.model.to(self.device).eval()
        if centroids is not None:
            _check_centroids(centroids, int(self.model.config.hidden_size), kind)

    def settings(self) -> Dict[str, Any]:
        s = {"layer": self.layer, "model_path": self.model_path, "random_init": self.random_init}
        if self.random_init:
            s["model_config"] = self.model_config
        return s

    def _frames(self, wav: np.ndarray) -> torch.Tensor:
        if len(wav) < self.min_samples:
            wav = np.pad(wav, (0, self.min_samples - len(wav)))
        # Pieces overlap by min_samples - hop so that together they give the same frame
        # grid as one pass would.
        out = []
        for start in range(0, max(1, len(wav) - self.min_samples + self.hop), self.CHUNK):
            piece = wav[start:start + self.CHUNK + self.min_samples - self.hop]
            if len(piece) < self.min_samples:
                break
            out.append(self._forward(piece))
        return torch.cat(out)

    def _forward(self, wav: np.ndarray) -> torch.Tensor:
        inputs = self.extractor(wav, sampling_rate=SAMPLE_RATE, return_tensors="pt")
        key = "input_values" if self.kind == "hubert" else "input_features"
        with torch.no_grad():
            out = self.model(inputs[key].to(self.device), output_hidden_states=True)
        return out.hidden_states[self.layer][0].float().cpu()


def _load_hf(kind: str, model_path: Any, random_config: Optional[Dict[str, Any]]):
    """(model, feature extractor): from `model_path`, or with random_config, a random model
    of that config (seeded: the same config gives the same weights)."""
    transformers = require("transformers")
    model_name, config_name, extractor_name, model_type, repo = _HF[kind]
    model_cls, config_cls, extractor_cls = (getattr(transformers, n) for n in
                                            (model_name, config_name, extractor_name))
    if random_config is not None:
        if model_path is not None:
            raise ValueError(f"{kind}: pass either model_path=DIR (trained weights) or "
                             f"random_init=True (a small random model, for tests), not both")
        with torch.random.fork_rng(devices=[]):  # seeded, without touching the caller's RNG
            torch.manual_seed(0)
            model = model_cls(config_cls(**random_config))
        return model, extractor_cls()
    directory = _check_model_dir(kind, model_type, repo, model_path)
    model = from_pretrained_complete(model_cls, directory, f"{kind} weights",
                                     how_to_get(repo, directory, "model_path", "--model-path"))
    if (directory / "preprocessor_config.json").is_file():
        extractor = extractor_cls.from_pretrained(str(directory), local_files_only=True)
    else:
        extractor = extractor_cls()
    return model, extractor


def _check_model_dir(kind: str, model_type: str, repo: str, path: Any) -> Path:
    return check_model_directory(f"the {kind} semantic tokenizer", f"{kind} model", model_type,
                                 repo, path, argument="model_path", flag="--model-path")


def check_semantic_rate(rate: Any) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.integer, np.floating)) \
            or not math.isfinite(rate) or rate <= 0:
        raise ValueError(f"rate must be a positive number of ids per second, got {rate!r}")
    return float(rate)


def _check_centroids(centroids: Any, dim: int, kind: str) -> None:
    if not isinstance(centroids, torch.Tensor) or centroids.dtype != torch.float32 \
            or centroids.ndim != 2 or centroids.shape[0] < 1 or centroids.shape[1] != dim:
        shape = tuple(centroids.shape) if isinstance(centroids, torch.Tensor) else None
        raise ValueError(f"{kind} centroids must be a float32 tensor of shape [vocab_size, {dim}], "
                         f"got {shape}")


def _mono(wav: Any) -> torch.Tensor:
    if isinstance(wav, (np.ndarray, torch.Tensor)) and wav.ndim != 1:
        raise ValueError(f"wav must be one mono clip of shape [samples], got shape "
                         f"{tuple(wav.shape)}")
    return as_batch(wav, "wav")[0]


def _build(kind: str, rate: float, centroids: Optional[torch.Tensor] = None,
           layer: Optional[int] = None, model_path: Any = None, random_init: bool = False,
           device: Any = "cpu", **settings: Any) -> SemanticTokenizer:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "mfcc":
        for name, value in (("layer", layer), ("model_path", model_path)):
            if value is not None:
                raise ValueError(f"{name}={value!r} applies only to the hubert and w2v-bert "
                                 f"kinds, not mfcc")
        if random_init:
            raise ValueError("random_init=True applies only to the hubert and w2v-bert kinds, "
                             "not mfcc")
        return MFCCTokenizer(rate, centroids, **settings)
    return HFTokenizer(kind, rate, centroids, layer=layer, model_path=model_path,
                       random_init=random_init, device=device, **settings)


def fit_semantic(kind: str, audio: Iterable[Any], out_dir: Any, vocab_size: int = 256,
                 rate: float = 25, iterations: int = 25, seed: int = 0,
                 max_frames: int = 200_000, progress: bool = True, layer: Optional[int] = None,
                 model_path: Any = None, random_init: bool = False,
                 device: Any = "cpu") -> SemanticTokenizer:
    """Fit a semantic tokenizer's k-means on `audio`, save it to `out_dir` and return it.

    kind:        "mfcc", "hubert" or "w2v-bert".
    audio:       sound-file paths (any rate, mixed to mono) and/or (samples, rate) pairs
                 with float samples [N].
    vocab_size:  k, the number of ids; the corpus needs at least k pooled frames (k / rate s).
    rate:        ids per second (the model's semantic_rate).
    max_frames:  pooled frames kept (a seeded uniform random subset) when there are more.
    layer, model_path, random_init, device: hubert and w2v-bert only (module docstring).
    Seeded: the same audio, settings and seed give the same centroids.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    for name, value in (("iterations", iterations), ("max_frames", max_frames)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if max_frames < vocab_size:
        raise ValueError(f"max_frames={max_frames} must be at least vocab_size={vocab_size}")
    tok = _build(kind, rate, layer=layer, model_path=model_path, random_init=random_init,
                 device=device)
    g = torch.Generator().manual_seed(seed)
    sample: Optional[FrameSample] = None
    clips = 0
    for clip in audio_clips(audio, SAMPLE_RATE, progress, desc=f"{kind} features"):
        feats = tok.embed(clip[0], SAMPLE_RATE)
        if sample is None:
            sample = FrameSample(max_frames, feats.shape[1], g)
        sample.add(feats)
        clips += 1
    if sample is None:
        raise ValueError("audio is empty: fit_semantic needs at least one clip")
    if sample.total < vocab_size:
        raise ValueError(f"audio has {sample.total} frames at {tok.rate:g} Hz "
                         f"({sample.total / tok.rate:.1f} s), fewer than vocab_size={vocab_size}: "
                         f"give more audio or a smaller vocabulary")
    bar = tqdm(total=iterations, desc=f"{kind} k-means", unit="iter", disable=not progress)
    tok.centroids = kmeans(sample.frames(), vocab_size, iterations, g, bar)
    bar.close()
    tok.save(out_dir)
    return tok


def load_semantic(path: Any, **options: Any) -> SemanticTokenizer:
    """Load a tokenizer directory written by `fit_semantic` (or `SemanticTokenizer.save`).

    options (hubert, w2v-bert): model_path=DIR overrides the weights directory recorded at
    fitting time; random_init=True for a tokenizer fit on a small random model (tests);
    device="cuda" runs the model there.
    """
    if path is None:
        raise ValueError("load_semantic needs a directory written by fit_semantic "
                         "(semantic.json + centroids.safetensors)")
    directory = Path(path)
    how = "fit one with `soundstorm fit-semantic AUDIO... --out DIR`"
    if not directory.is_dir():
        raise FileNotFoundError(f"semantic tokenizer directory {str(directory)!r} does not "
                                f"exist: {how}")
    for f in (CONFIG_FILE, CENTROIDS_FILE):
        if not (directory / f).is_file():
            raise FileNotFoundError(f"semantic tokenizer directory {str(directory)!r} has no "
                                    f"{f}: {how}")
    config_file = directory / CONFIG_FILE
    meta = read_format_json(config_file, FORMAT_NAME, FORMAT_VERSION, "semantic tokenizer config")
    kind, settings = meta.get("kind"), meta.get("settings")
    if kind not in KINDS or not isinstance(settings, dict) \
            or meta.get("sample_rate") != SAMPLE_RATE:
        raise ValueError(f"{config_file} is corrupt: needs kind in {list(KINDS)}, a settings "
                         f"object and sample_rate {SAMPLE_RATE}, got kind={kind!r}, "
                         f"sample_rate={meta.get('sample_rate')!r}")
    centroids = read_tensor(directory / CENTROIDS_FILE, "centroids")
    if centroids.ndim != 2 or centroids.shape[0] != meta.get("vocab_size"):
        raise ValueError(f"{directory / CENTROIDS_FILE} holds centroids of shape "
                         f"{tuple(centroids.shape)}, but {config_file} says vocab_size="
                         f"{meta.get('vocab_size')!r}")

    settings = dict(settings)
    if kind == "mfcc":
        if options:
            raise TypeError(f"load_semantic: an mfcc tokenizer takes no options, got "
                            f"{sorted(options)}")
        try:
            return _build(kind, meta.get("rate"), centroids, **settings)
        except TypeError as e:
            raise ValueError(f"{config_file} has unknown mfcc settings: {e}") from None
    unknown = set(options) - {"model_path", "random_init", "device"}
    if unknown:
        raise TypeError(f"load_semantic: unknown options {sorted(unknown)} (known: model_path, "
                        f"random_init, device)")
    fitted_random = bool(settings.get("random_init"))
    random_init = bool(options.get("random_init", False))
    if fitted_random != random_init:
        raise ValueError(
            f"{config_file}: this {kind} tokenizer was fit on a small random model (tests "
            f"only); load it with random_init=True" if fitted_random else
            f"{config_file}: this {kind} tokenizer was fit on the weights in "
            f"{settings.get('model_path')!r}; random_init=True would give other features")
    model_path = options.get("model_path", settings.get("model_path"))
    try:
        return _build(kind, meta.get("rate"), centroids, layer=settings.get("layer"),
                      model_path=None if random_init else model_path, random_init=random_init,
                      device=options.get("device", "cpu"),
                      model_config=settings.get("model_config") if random_init else None)
    except TypeError as e:  # a model_config of unknown fields
        raise ValueError(f"{config_file} has bad {kind} settings: {e}") from None


__all__ = ["SemanticTokenizer", "MFCCTokenizer", "HFTokenizer", "fit_semantic",
           "load_semantic", "pool", "KINDS", "DEFAULT_LAYER"]
