"""melrvq codec quality against Q: error, intelligibility (STOI) and speed on espeak-ng speech.

Speaks a small version of the demo corpus with espeak-ng, fits a melrvq codec on its
training voices, and for each number of levels q = 1..Q reports on the held-out voices:
- feature MSE: mean squared error of the dequantised log-mel frames;
- LSD: RMS log-spectral distance (dB, 64-band mel) between the decoded and original audio;
- STOI: short-time objective intelligibility of the decoded audio (0..1; pystoi);
plus the same for Griffin-Lim on the unquantised features (the ceiling of the codec), and
encode / decode real-time factors at Q measured in the same run. Writes results.json,
error_vs_q.png and WAV files of a held-out sentence (original, each q) to --out.

    python bench/codec_quality.py --out bench-results/codec-quality
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from soundstorm.engine.codecs import load_codec
from soundstorm.engine.codecs.audio import read_audio
from soundstorm.training.codec_fit import fit_melrvq
from soundstorm.training.speech_corpus import write_speech_corpus

def speak(directory: Path, minutes: float) -> tuple:
    """The demo's espeak-ng corpus, small: (training clips, clips of the held-out voices)."""
    try:
        write_speech_corpus(directory, minutes=minutes, heldout_utterances=2, progress=False)
    except RuntimeError as e:  # espeak-ng missing
        raise SystemExit(str(e))

    def paths(manifest):
        return [directory / json.loads(line)["path"]
                for line in (directory / manifest).read_text().splitlines()]
    return paths("train.jsonl"), paths("heldout.jsonl")


def lsd_db(a: np.ndarray, b: np.ndarray, sr: int) -> float:
    import librosa

    n = min(len(a), len(b))
    ma, mb = (librosa.feature.melspectrogram(y=x[:n], sr=sr, n_fft=1024, hop_length=sr // 100,
                                             n_mels=64) for x in (a, b))
    da, db = (10 * np.log10(np.maximum(m, 1e-4)) for m in (ma, mb))
    return float(np.sqrt(np.mean((da - db) ** 2)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench-results/codec-quality"))
    p.add_argument("--num-quantizers", type=int, default=8)
    p.add_argument("--codebook-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=2.0,
                   help="training speech to fit the codec on (the demo corpus, 10 voices)")
    args = p.parse_args()
    try:
        from pystoi import stoi
    except ImportError:
        stoi = None
    args.out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory() as tmp:
        train, held_out = speak(Path(tmp), args.minutes)
        codec_dir = args.out / "melrvq"
        t0 = time.perf_counter()
        fit_melrvq(train, codec_dir, num_quantizers=args.num_quantizers,
                   codebook_size=args.codebook_size, seed=args.seed)
        fit_s = time.perf_counter() - t0
        full = load_codec("melrvq", path=codec_dir)
        sr = full.sample_rate
        clips = [read_audio(pth, sr)[0] for pth in held_out]
    seconds = sum(len(c) for c in clips) / sr

    def score(decoded, features_err=None):
        row = {"lsd_db": float(np.mean([lsd_db(c, d, sr) for c, d in zip(clips, decoded)]))}
        if stoi is not None:
            row["stoi"] = float(np.mean([stoi(c, d[:len(c)], sr) for c, d in zip(clips, decoded)]))
        if features_err is not None:
            row["feature_mse"] = features_err
        return row

    rows = []
    for q in range(1, args.num_quantizers + 1):
        codec = load_codec("melrvq", path=codec_dir, num_quantizers=q)
        errs, decoded = [], []
        for c in clips:
            wav = torch.from_numpy(c)[None]
            tokens = codec.encode(wav, sr)
            errs.append((codec.dequantize(tokens) - codec.log_mel(wav)).pow(2).mean().item())
            decoded.append(codec.decode(tokens)[0].numpy())
        rows.append({"q": q, **score(decoded, float(np.mean(errs)))})
        if q in (1, args.num_quantizers):
            import soundfile as sf
            sf.write(args.out / f"heldout0_q{q}.wav", decoded[0], sr)
        print(json.dumps(rows[-1]))
    import soundfile as sf
    sf.write(args.out / "heldout0_original.wav", clips[0], sr)
    ceiling = score([full.synthesize(full.log_mel(torch.from_numpy(c)[None]))[0].numpy()
                     for c in clips])
    print("griffin-lim on unquantised features:", json.dumps(ceiling))

    # speed at Q: encode and decode of the held-out sentences, same run
    enc_s, dec_s = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        toks = [full.encode(c, sr) for c in clips]
        enc_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for tk in toks:
            full.decode(tk)
        dec_s.append(time.perf_counter() - t0)
    speed = {"audio_s": seconds, "encode_rtf": float(np.median(enc_s)) / seconds,
             "decode_rtf": float(np.median(dec_s)) / seconds, "fit_s": fit_s,
             "griffin_lim_iters": full.config.griffin_lim_iters}
    print(json.dumps(speed))
    result = {"num_quantizers": args.num_quantizers, "codebook_size": args.codebook_size,
              "train_clips": len(train), "held_out_clips": len(held_out),
              "train_minutes": args.minutes,
              "per_q": rows, "griffin_lim_ceiling": ceiling, "speed": speed}
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "error_vs_q.png")
    print(f"wrote {args.out}/results.json, error_vs_q.png and WAV files")


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    qs = [r["q"] for r in result["per_q"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(qs, [r["lsd_db"] for r in result["per_q"]], "o-", label="melrvq")
    axes[0].axhline(result["griffin_lim_ceiling"]["lsd_db"], ls="--", c="gray",
                    label="Griffin-Lim, unquantised")
    axes[0].set(xlabel="levels q", ylabel="log-spectral distance (dB)", title="Error")
    if "stoi" in result["griffin_lim_ceiling"]:
        axes[1].plot(qs, [r["stoi"] for r in result["per_q"]], "o-", label="melrvq")
        axes[1].axhline(result["griffin_lim_ceiling"]["stoi"], ls="--", c="gray",
                        label="Griffin-Lim, unquantised")
        axes[1].set(xlabel="levels q", ylabel="STOI", title="Intelligibility (held out)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"melrvq, C={result['codebook_size']}, fit on {result['train_minutes']:g} min "
                 "of espeak-ng speech (10 voices), scored on 2 held-out voices")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(path)


if __name__ == "__main__":
    main()
