"""Train the learned vocoder of a melrvq codec (`soundstorm fit-vocoder`).

    fit_vocoder("codec/", wav_files, steps=3000)

The vocoder learns to turn the codec's log-mel frames into the waveform they came from.
Its inputs are the frames as the codec hands them to it at decoding time: the sum of the
first q codewords for q drawn from `levels` (all of the codec's levels, by default, and
the unquantised features as level 0), so one network decodes every number of levels and
learns to undo part of the quantisation error. The loss compares spectra, not samples: a
multi-resolution STFT loss (spectral convergence + log-magnitude L1 at three resolutions)
plus an L1 loss on the codec's own log-mel frames.

Training is seeded (initialisation, segment draws, levels) and shows progress; the codec
directory gets `vocoder.safetensors`, a "vocoder" object in config.json (written last,
atomically) and `vocoder-training.json` + `vocoder-loss.png` (the loss curve).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from soundstorm.engine.codecs.melrvq import MelRVQCodec
from soundstorm.engine.codecs.vocoder import MelVocoder, VocoderConfig
from soundstorm.training.codec_fit import audio_clips

TRAINING_FILE = "vocoder-training.json"
PLOT_FILE = "vocoder-loss.png"
RESOLUTIONS = ((512, 128), (1024, 256), (2048, 512))


def _magnitude(x: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    window = torch.hann_window(n_fft, device=x.device)
    return torch.stft(x, n_fft, hop, window=window, return_complex=True).abs()


def spectral_loss(pred: torch.Tensor, target: torch.Tensor, mel_basis: torch.Tensor,
                  mel_n_fft: int, mel_hop: int) -> torch.Tensor:
    """Multi-resolution STFT loss (spectral convergence + log-magnitude L1, averaged over
    RESOLUTIONS) plus log-mel L1 in the codec's filterbank. pred, target: float [B, N]."""
    total = pred.new_zeros(())
    for n_fft, hop in RESOLUTIONS:
        p, t = _magnitude(pred, n_fft, hop), _magnitude(target, n_fft, hop)
        convergence = torch.linalg.norm(t - p) / torch.linalg.norm(t).clamp_min(1e-7)
        log_l1 = F.l1_loss(torch.log(p.clamp_min(1e-5)), torch.log(t.clamp_min(1e-5)))
        total = total + (convergence + log_l1) / len(RESOLUTIONS)
    p, t = (mel_basis @ _magnitude(x, mel_n_fft, mel_hop) for x in (pred, target))
    mel = F.l1_loss(torch.log(p.clamp_min(1e-5)), torch.log(t.clamp_min(1e-5)))
    return total + mel


class _Clips:
    """Every training clip as (samples [T * hop], features [T, n_mels], tokens [T, Q])."""

    def __init__(self, codec: MelRVQCodec, audio: Iterable[Any], segment_frames: int,
                 progress: bool):
        hop = codec.hop_length
        self.samples: List[torch.Tensor] = []
        self.features: List[torch.Tensor] = []
        self.tokens: List[torch.Tensor] = []
        short = 0
        for clip in audio_clips(audio, codec.sample_rate, progress, desc="vocoder features"):
            features = codec.log_mel(clip)[0]
            frames = features.shape[0]
            if frames < segment_frames:
                short += 1
                continue
            samples = F.pad(clip[0], (0, frames * hop - clip.shape[1]))
            self.samples.append(samples)
            self.features.append(features)
            self.tokens.append(codec.quantize(features[None])[0])
        if not self.samples:
            raise ValueError(f"no clip is at least segment_frames = {segment_frames} frames "
                             f"({segment_frames * hop / codec.sample_rate:.2f} s) long "
                             f"({short} shorter ones); give longer audio or a smaller "
                             f"segment_frames")
        self.skipped_short = short
        lengths = torch.tensor([f.shape[0] - segment_frames + 1 for f in self.features],
                               dtype=torch.float64)
        self.weights = lengths / lengths.sum()  # each possible segment equally likely


def fit_vocoder(codec_dir: Union[str, Path], audio: Iterable[Any],
                out_dir: Optional[Union[str, Path]] = None, steps: int = 2000,
                batch_size: int = 8, segment_frames: int = 32, learning_rate: float = 1e-3,
                config: Union[VocoderConfig, Dict[str, Any], None] = None,
                levels: Optional[Sequence[int]] = None, seed: int = 0,
                progress: bool = True, log_every: int = 25) -> Dict[str, Any]:
    """Train a vocoder for the melrvq codec in `codec_dir` on `audio` (sound-file paths or
    (samples, rate) pairs) and save the codec with it to `out_dir` (default: `codec_dir`
    itself). Returns the training summary (also written to vocoder-training.json).

    config: a VocoderConfig, or a dict of its fields to change (n_mels and hop_length
            always come from the codec).
    levels: numbers of codec levels whose dequantised frames the vocoder learns to decode;
            0 stands for the unquantised features. Default: 0, 1, ..., Q.
    """
    for name, value, low in (("steps", steps, 1), ("batch_size", batch_size, 1),
                             ("segment_frames", segment_frames, 1), ("log_every", log_every, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not (isinstance(learning_rate, (int, float)) and 0 < learning_rate < 1):
        raise ValueError(f"learning_rate must be in (0, 1), got {learning_rate!r}")
    codec = MelRVQCodec.load(codec_dir, vocoder=False)
    q_max = codec.num_quantizers
    levels = list(range(q_max + 1)) if levels is None else list(levels)
    bad = [q for q in levels if isinstance(q, bool) or not isinstance(q, int) or not 0 <= q <= q_max]
    if not levels or bad:
        raise ValueError(f"levels must be a non-empty list of integers in [0, {q_max}] (0: "
                         f"unquantised features), got {levels!r}")
    base = {"n_mels": codec.config.n_mels, "hop_length": codec.hop_length}
    if config is None:
        config = VocoderConfig(**base)
    elif isinstance(config, dict):
        config = VocoderConfig(**{**VocoderConfig().to_dict(), **config, **base})
    elif isinstance(config, VocoderConfig):
        if (config.n_mels, config.hop_length) != (base["n_mels"], base["hop_length"]):
            raise ValueError(f"config has n_mels={config.n_mels}, hop_length="
                             f"{config.hop_length}; the codec has {base}")
    else:
        raise TypeError(f"config must be a VocoderConfig, a dict or None, got "
                        f"{type(config).__name__}")
    out_dir = Path(codec_dir if out_dir is None else out_dir)

    data = _Clips(codec, audio, segment_frames, progress)
    torch.manual_seed(seed)
    net = MelVocoder(config)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=learning_rate, betas=(0.8, 0.99),
                                  weight_decay=0.01)
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to a tenth
        if step < warmup:
            return learning_rate * (step + 1) / warmup
        done = (step - warmup) / max(1, steps - warmup)
        return learning_rate * (0.1 + 0.45 * (1 + math.cos(math.pi * done)))

    mel_basis = torch.from_numpy(codec.mel_basis).to(torch.float32)
    hop = codec.hop_length
    records: List[Dict[str, Any]] = []
    running, start = None, time.perf_counter()
    bar = tqdm(range(steps), desc="vocoder", disable=not progress)
    for step in bar:
        clip_ids = torch.multinomial(data.weights, batch_size, replacement=True,
                                     generator=generator).tolist()
        level_ids = torch.randint(len(levels), (batch_size,), generator=generator).tolist()
        inputs, targets = [], []
        for i, q in zip(clip_ids, level_ids):
            frames = data.features[i].shape[0]
            t0 = int(torch.randint(frames - segment_frames + 1, (1,), generator=generator))
            window = slice(t0, t0 + segment_frames)
            q = levels[q]
            feats = (data.features[i][window] if q == 0
                     else codec.dequantize(data.tokens[i][window, :q][None])[0])
            inputs.append(feats)
            targets.append(data.samples[i][t0 * hop:(t0 + segment_frames) * hop])
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        pred = net(torch.stack(inputs))
        loss = spectral_loss(pred, torch.stack(targets), mel_basis, codec.config.n_fft, hop)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the vocoder's loss is {loss.item()} at step {step}; "
                                     f"lower learning_rate (now {learning_rate})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        value = loss.item()
        running = value if running is None else 0.9 * running + 0.1 * value
        if step % log_every == 0 or step == steps - 1:
            records.append({"step": step, "loss": value, "smoothed": running,
                            "lr": lr_at(step)})
            bar.set_postfix(loss=f"{running:.3f}")
    seconds = time.perf_counter() - start

    out_dir.mkdir(parents=True, exist_ok=True)
    trained = MelRVQCodec(codec.config, codec.codebooks, vocoder=net)
    trained.save(out_dir)
    summary = {"steps": steps, "batch_size": batch_size, "segment_frames": segment_frames,
               "learning_rate": learning_rate, "levels": levels, "seed": seed,
               "clips": len(data.samples), "skipped_short_clips": data.skipped_short,
               "parameters": sum(p.numel() for p in net.parameters()),
               "first_loss": records[0]["loss"], "final_loss": running,
               "seconds": round(seconds, 1), "config": config.to_dict(), "curve": records}
    tmp = out_dir / (TRAINING_FILE + ".tmp")
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, out_dir / TRAINING_FILE)
    plot_loss(records, out_dir / PLOT_FILE)
    return summary


def plot_loss(records: List[Dict[str, Any]], path: Path) -> Path:
    """The vocoder's loss curve (raw and smoothed) as a PNG, written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in records]
    ax.plot(steps, [r["loss"] for r in records], alpha=0.4, label="loss")
    ax.plot(steps, [r["smoothed"] for r in records], label="smoothed")
    ax.set(title="vocoder: spectral loss", xlabel="step", ylabel="loss")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


__all__ = ["fit_vocoder", "spectral_loss", "plot_loss", "TRAINING_FILE", "PLOT_FILE"]
