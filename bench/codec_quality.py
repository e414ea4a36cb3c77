"""melrvq codec quality against Q: error, intelligibility (STOI) and speed on espeak-ng speech.

Speaks a small version of the demo corpus with espeak-ng, fits a melrvq codec on its
training voices, and for each number of levels q = 1..Q reports on the held-out voices:
- feature MSE: mean squared error of the dequantised log-mel frames;
- LSD: RMS log-spectral distance (dB, 64-band mel) between the decoded and original audio;
- STOI: short-time objective intelligibility of the decoded audio (0..1; pystoi);
plus the same on the unquantised features (the ceiling of the codec), and encode / decode
real-time factors at Q measured in the same run. Each figure comes for both decoders: Griffin-
Lim and the learned vocoder, trained here on the same training voices (--vocoder-steps; 0
skips it). Writes results.json, error_vs_q.png and WAV files of a held-out sentence
(original, each q, each decoder) to --out.

    python bench/codec_quality.py --out bench-results/codec-quality
    python bench/codec_quality.py --voices 60 --minutes 10 --vocoder-steps 2000
    python bench/codec_quality.py --codec demo/codec     # the shipped codec and vocoder

With --codec DIR nothing is fitted: the codec in DIR (with its vocoder, if it has one) is
scored on sentences spoken by the held-out voices of the demo settings next to it
(--assets, default the shipped demo), from the held-out text stream past every sentence
the corpus and the demo use.
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
from soundstorm.training.speech_corpus import VOICES, voice_population, write_speech_corpus
from soundstorm.training.vocoder_fit import fit_vocoder

DECODERS = ("griffin-lim", "vocoder")


def speak(directory: Path, minutes: float, voices: int = 0) -> tuple:
    """The demo's espeak-ng corpus, small: (training clips, clips of the held-out voices).
    voices > 0: that many drawn voices (8 held out) instead of the twelve fixed ones."""
    population = VOICES if voices <= 0 else voice_population(voices, heldout=min(8, voices - 1))
    try:
        write_speech_corpus(directory, minutes=minutes, heldout_utterances=2, progress=False,
                            voices=population)
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


def fit(args, codec_dir: Path) -> tuple:
    """Speak a corpus, fit the codec (and its vocoder) on its training voices: (training
    clips, held-out clips, held-out audio, fit seconds, vocoder fit seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        train, held_out = speak(Path(tmp), args.minutes, args.voices)
        t0 = time.perf_counter()
        fit_melrvq(train, codec_dir, num_quantizers=args.num_quantizers,
                   codebook_size=args.codebook_size, seed=args.seed)
        fit_s = time.perf_counter() - t0
        vocoder_fit_s = None
        if args.vocoder_steps > 0:
            t0 = time.perf_counter()
            fit_vocoder(codec_dir, train, steps=args.vocoder_steps, seed=args.seed)
            vocoder_fit_s = time.perf_counter() - t0
        sr = load_codec("melrvq", path=codec_dir, vocoder=False).sample_rate
        clips = [read_audio(pth, sr)[0] for pth in held_out]
    return train, held_out, clips, fit_s, vocoder_fit_s


def heldout_speech(assets, n: int) -> tuple:
    """`n` sentences spoken in turn by the held-out voices of the demo settings in `assets`
    (the shipped demo by default), from the held-out text stream past everything the
    corpus and the demo use: (voice names, audio)."""
    import itertools

    from soundstorm.demo import ASSETS
    from soundstorm.demo.run import demo_voices
    from soundstorm.training.speech_corpus import sentences, speak as say

    settings = json.loads((Path(assets or ASSETS) / "demo.json").read_text())
    voices = demo_voices(settings)
    held = [voices[v] for v in settings["heldout_voices"]]
    texts = itertools.islice(sentences(settings["corpus_seed"]
                                       + settings["heldout_stream_offset"]),
                             settings["heldout_sentences_used"] + 2000, None)
    chosen = [(held[j % len(held)], next(texts)) for j in range(n)]
    return [v.name for v, _ in chosen], [say(t, v) for v, t in chosen]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench-results/codec-quality"))
    p.add_argument("--num-quantizers", type=int, default=8)
    p.add_argument("--codebook-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=2.0,
                   help="training speech to fit the codec on (the demo corpus, 10 voices)")
    p.add_argument("--voices", type=int, default=0,
                   help="speak with this many drawn voices (8 held out) instead of the 12 "
                        "fixed ones (0)")
    p.add_argument("--vocoder-steps", type=int, default=1500,
                   help="train the learned vocoder this long on the training voices (1500; "
                        "0: Griffin-Lim only)")
    p.add_argument("--codec", type=Path,
                   help="score this fitted melrvq codec directory instead of fitting one")
    p.add_argument("--assets", type=Path,
                   help="with --codec: demo assets whose held-out voices speak the test "
                        "sentences (default: the shipped demo)")
    p.add_argument("--sentences", type=int, default=16,
                   help="with --codec: held-out sentences to score (16)")
    args = p.parse_args(argv)
    if args.codec is not None:
        probe = load_codec("melrvq", path=args.codec)
        args.num_quantizers, args.codebook_size = probe.num_quantizers, probe.codebook_size
        args.vocoder_steps = 0
        decoders = DECODERS if probe.decoder == "vocoder" else DECODERS[:1]
    else:
        decoders = DECODERS if args.vocoder_steps > 0 else DECODERS[:1]
    try:
        from pystoi import stoi
    except ImportError:
        stoi = None
    args.out.mkdir(parents=True, exist_ok=True)

    if args.codec is not None:
        codec_dir, fit_s, vocoder_fit_s = args.codec, None, None
        train, (held_out, clips) = [], heldout_speech(args.assets, args.sentences)
        args.minutes, args.voices = None, len(set(held_out))
    else:
        codec_dir = args.out / "melrvq"
        train, held_out, clips, fit_s, vocoder_fit_s = fit(args, codec_dir)
    full = load_codec("melrvq", path=codec_dir, vocoder=False)
    sr = full.sample_rate
    seconds = sum(len(c) for c in clips) / sr

    import soundfile as sf

    def score(decoded, prefix=""):
        row = {prefix + "lsd_db": float(np.mean([lsd_db(c, d, sr)
                                                 for c, d in zip(clips, decoded)]))}
        if stoi is not None:
            row[prefix + "stoi"] = float(np.mean([stoi(c, d[:len(c)], sr)
                                                  for c, d in zip(clips, decoded)]))
        return row

    def decoder_of(codec_q, name):
        return load_codec("melrvq", path=codec_dir, num_quantizers=codec_q,
                          vocoder=name == "vocoder")

    rows = []
    for q in range(1, args.num_quantizers + 1):
        row = {"q": q}
        for name in decoders:
            codec = decoder_of(q, name)
            errs, decoded = [], []
            for c in clips:
                wav = torch.from_numpy(c)[None]
                tokens = codec.encode(wav, sr)
                errs.append((codec.dequantize(tokens) - codec.log_mel(wav)).pow(2).mean().item())
                decoded.append(codec.decode(tokens)[0].numpy())
            row["feature_mse"] = float(np.mean(errs))
            row.update(score(decoded, "" if name == "griffin-lim" else "vocoder_"))
            if q in (1, args.num_quantizers):
                sf.write(args.out / f"heldout0_q{q}_{name}.wav", decoded[0], sr)
        rows.append(row)
        print(json.dumps(row))
    sf.write(args.out / "heldout0_original.wav", clips[0], sr)
    ceilings = {}
    for name in decoders:
        codec = decoder_of(None, name)
        ceilings[name] = score([codec.synthesize(codec.log_mel(torch.from_numpy(c)[None]))[0]
                                .numpy() for c in clips])
        print(f"{name} on unquantised features:", json.dumps(ceilings[name]))

    # speed at Q: encode and decode of the held-out sentences, same run
    speed = {"audio_s": seconds, "fit_s": fit_s, "vocoder_fit_s": vocoder_fit_s,
             "griffin_lim_iters": full.config.griffin_lim_iters}
    for name in decoders:
        codec = decoder_of(None, name)
        enc_s, dec_s = [], []
        for _ in range(3):
            t0 = time.perf_counter()
            toks = [codec.encode(c, sr) for c in clips]
            enc_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for tk in toks:
                codec.decode(tk)
            dec_s.append(time.perf_counter() - t0)
        speed["encode_rtf"] = float(np.median(enc_s)) / seconds
        speed[f"{name}_decode_rtf"] = float(np.median(dec_s)) / seconds
    print(json.dumps(speed))
    result = {"num_quantizers": args.num_quantizers, "codebook_size": args.codebook_size,
              "train_clips": len(train), "held_out_clips": len(held_out),
              "train_minutes": args.minutes, "voices": args.voices or len(VOICES),
              "vocoder_steps": args.vocoder_steps,
              "codec": str(args.codec) if args.codec is not None else None,
              "per_q": rows, "griffin_lim_ceiling": ceilings["griffin-lim"],
              "vocoder_ceiling": ceilings.get("vocoder"), "speed": speed}
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "error_vs_q.png")
    print(f"wrote {args.out}/results.json, error_vs_q.png and WAV files")


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    qs = [r["q"] for r in result["per_q"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    lines = [("", "Griffin-Lim", "griffin_lim_ceiling", "C0")]
    if result.get("vocoder_ceiling"):
        lines.append(("vocoder_", "vocoder", "vocoder_ceiling", "C1"))
    for ax, metric, label in ((axes[0], "lsd_db", "log-spectral distance (dB)"),
                              (axes[1], "stoi", "STOI")):
        if metric not in result["griffin_lim_ceiling"]:
            continue
        for prefix, name, ceiling, colour in lines:
            ax.plot(qs, [r[prefix + metric] for r in result["per_q"]], "o-", c=colour,
                    label=f"melrvq, {name}")
            ax.axhline(result[ceiling][metric], ls="--", c=colour, alpha=0.6,
                       label=f"{name}, unquantised")
        ax.set(xlabel="levels q", ylabel=label,
               title="Error" if metric == "lsd_db" else "Intelligibility (held out)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    if result.get("codec"):
        fig.suptitle(f"melrvq codec {result['codec']}, C={result['codebook_size']}, scored on "
                     f"{result['held_out_clips']} sentences of {result['voices']} held-out voices")
    else:
        fig.suptitle(f"melrvq, C={result['codebook_size']}, fit on {result['train_minutes']:g} "
                     f"min of espeak-ng speech ({result['voices']} voices), scored on held-out "
                     f"voices")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(path)


if __name__ == "__main__":
    main()
