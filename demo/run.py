"""`soundstorm demo`: generate speech in held-out voices with the shipped model and measure it.

For each of a few held-out utterances (sentences the model never saw, spoken by one of the
voices held out of training), the demo

1. speaks the sentence with espeak-ng (the ground truth) and tokenizes it: semantic ids
   (what is said) and codec tokens (how it sounds);
2. takes a 3 s voice prompt from another sentence of the same held-out voice;
3. generates the codec tokens from the semantic ids and the prompt, as the paper does
   (prompt frames first, then level-wise MaskGIT decoding), and decodes them to audio.

It writes the first utterance's prompt, original, ground-truth codec resynthesis and
generated audio as WAV, their spectrograms side by side as a PNG, every utterance's
generated and resynthesised audio under `utterances/`, and a report (printed, and saved
as `report.json`):

- real-time factor of the generation (model only, and with the codec's decoder: its
  learned vocoder, or Griffin-Lim);
- voice preservation: the cosine similarity of speaker embeddings (resemblyzer) between
  the generated audio and the prompt's speaker, against the similarity to every other voice
  of the corpus (held-out and training), and the rank of the prompt's speaker among them
  (1: the nearest of all; every voice's reference passes through the codec too, so the
  codec's own sound is common to all);
- intelligibility: the word error rate of an offline recogniser (pocketsphinx, its search
  constrained to the corpus's sentences) on the original speech, its codec resynthesis and
  the generated speech;
- the distance of the generated log-mel spectrogram to the original's, next to the
  codec's own distance (its floor), and the token accuracy per level (level 1 first);
- the paper's decoding ablation on this model: its default schedule (16, 1, ..., 1)
  against level-wise greedy (1, ..., 1) and more iterations.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from soundstorm.demo import ASSETS
from soundstorm.demo.wer import normalise, word_errors
from soundstorm.engine.config import DecodeConfig

DEMO_FILE = "demo.json"
_DB = 20.0 / math.log(10.0)  # natural log of a magnitude -> dB


def ablation_schedules(num_quantizers: int) -> Dict[str, tuple]:
    """The decoding schedules compared: the paper's, level-wise greedy, and more steps."""
    rest = (1,) * (num_quantizers - 1)
    return {
        "default": (16,) + rest,
        "greedy": (1,) * num_quantizers,
        "more": (32,) + (4,) * (num_quantizers - 1),
    }


def load_assets(assets: Any = ASSETS, device: str = "cpu", backend: str = "torch",
                quantize: Optional[str] = None):
    """(engine, codec, semantic tokenizer, demo settings) from an assets directory; the
    engine runs float32 on `backend`, with `quantize` (see `Engine`)."""
    from soundstorm.engine.codecs import load_codec
    from soundstorm.engine.engine import Engine
    from soundstorm.training.semantic import load_semantic

    assets = Path(assets)
    for part in ("model", "codec", "semantic", DEMO_FILE):
        if not (assets / part).exists():
            raise FileNotFoundError(f"demo assets {assets} lack {part!r}: expected model/, "
                                    f"codec/, semantic/ and {DEMO_FILE} (see demo/reproduce.sh)")
    try:
        settings = json.loads((assets / DEMO_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{assets / DEMO_FILE} is not valid demo settings JSON "
                         f"({e if not isinstance(e, RecursionError) else 'nested too deeply'})"
                         ) from None
    if not isinstance(settings, dict):
        raise ValueError(f"{assets / DEMO_FILE} is not a JSON object")
    engine = Engine(assets / "model", device=device, dtype=torch.float32, backend=backend,
                    quantize=quantize)
    codec = load_codec("melrvq", path=assets / "codec")
    semantic = load_semantic(assets / "semantic")
    cfg = engine.config
    checks = [("num_quantizers", codec.num_quantizers, cfg.num_quantizers),
              ("codebook_size", codec.codebook_size, cfg.codebook_size),
              ("frame_rate", float(codec.frame_rate), float(cfg.frame_rate)),
              ("semantic vocab_size", semantic.vocab_size, cfg.semantic_vocab_size),
              ("semantic rate", float(semantic.rate), float(cfg.semantic_rate))]
    for name, got, want in checks:
        if got != want:
            raise ValueError(f"demo assets {assets} disagree: the tokenizers' {name} is {got}, "
                             f"the model's is {want}")
    return engine, codec, semantic, settings


def run_demo(out: Any = "soundstorm-demo", assets: Any = ASSETS, utterances: int = 8,
             prompt_seconds: float = 3.0, max_seconds: float = 6.0, seed: int = 0,
             ablation: bool = True, speaker_similarity: bool = True, progress: bool = True,
             log: Callable[[str], None] = print, backend: str = "torch",
             quantize: Optional[str] = None, wer: bool = True) -> Dict[str, Any]:
    """Run the demo and write its files to `out`; returns the report.

    utterances:     held-out sentences to generate (alternating the held-out voices).
    prompt_seconds: length of the voice prompt.
    max_seconds:    held-out sentences are cut to at most this long.
    ablation:       also decode with the greedy and more-iterations schedules.
    speaker_similarity: score voice preservation with resemblyzer (needs it installed)
                    against every voice of the corpus.
    wer:            score intelligibility with pocketsphinx (needs it installed).
    backend, quantize: the engine's (see `Engine`); the shipped figures are backend "torch"
                    in float32.
    """
    from soundstorm.training.speech_corpus import sentences, speak, require_espeak

    for name, value, least in (("utterances", utterances, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    for name, value in (("prompt_seconds", prompt_seconds), ("max_seconds", max_seconds)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    require_espeak()
    encoder = _speaker_encoder() if speaker_similarity else None
    recognise = _recogniser() if wer else None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    engine, codec, semantic, settings = load_assets(assets, backend=backend, quantize=quantize)
    cfg = engine.config
    sr = codec.sample_rate
    frames_per_id = float(cfg.frame_rate) / float(cfg.semantic_rate)
    # The prompt is a whole number of semantic ids, so its frames line up with them.
    prompt_ids = max(1, round(prompt_seconds * float(cfg.semantic_rate)))
    prompt_frames = int(prompt_ids * frames_per_id)
    max_frames = min(int(max_seconds * float(cfg.frame_rate)), cfg.max_frames - prompt_frames)
    if max_frames < 1:
        raise ValueError(f"prompt_seconds={prompt_seconds} leaves no room for a target in the "
                         f"model's {cfg.max_frames} frames")

    all_voices = demo_voices(settings)
    voices = [all_voices[v] for v in settings["heldout_voices"]]
    texts = sentences(settings["corpus_seed"] + settings["heldout_stream_offset"])
    # Sentences drawn from the corpus's held-out stream, past those the corpus spoke.
    texts = itertools.islice(texts, settings["heldout_sentences_used"], None)
    prompt_text = {v.name: next(texts) for v in voices}
    targets = [(voices[j % len(voices)], next(texts)) for j in range(utterances)]
    schedules = ablation_schedules(cfg.num_quantizers)
    if not ablation:
        schedules = {"default": schedules["default"]}
    log(f"model: {cfg.num_parameters() / 1e6:.1f}M parameters, "
        f"{cfg.num_quantizers} levels of {cfg.codebook_size} codes at {cfg.frame_rate:g} Hz; "
        f"held-out voices {[v.name for v in voices]}")

    prompts = {}
    for v in voices:
        audio = speak(prompt_text[v.name], v)[: int(prompt_frames * codec.hop_length)]
        audio = np.pad(audio, (0, prompt_frames * codec.hop_length - len(audio)))
        prompts[v.name] = {
            "audio": audio,
            "tokens": codec.encode(audio, sr)[0][:prompt_frames],
            "ids": _semantic_ids(semantic, audio, sr)[:prompt_ids],
        }

    # Warm-up: the first pass of a shape pays one-off costs that are not the model's speed.
    warm = prompts[voices[0].name]
    engine.generate(torch.cat([warm["ids"], warm["ids"]])[None], prompt=warm["tokens"][None],
                    seed=seed)

    rows: List[Dict[str, Any]] = []
    clips: List[Dict[str, np.ndarray]] = []  # per row: the ground truth's and each schedule's audio
    (out / "utterances").mkdir(exist_ok=True)
    bar = tqdm(targets, desc="demo", unit="utt", disable=not progress)
    for j, (voice, text) in enumerate(bar):
        spoken = speak(text, voice)
        original = spoken[: max_frames * codec.hop_length]
        # a sentence cut short is not scored for its words (the audio lacks some of them)
        cut = len(original) < len(spoken)
        scored = recognise is not None and not cut
        reference = normalise(text)
        truth = codec.encode(original, sr)[0]
        frames = truth.shape[0]
        ids = _semantic_ids(semantic, original, sr)
        need = math.ceil(frames / frames_per_id)
        ids = torch.cat([ids, ids[-1:].expand(max(0, need - len(ids)))])[:need]
        p = prompts[voice.name]
        full_ids = torch.cat([p["ids"], ids])[None]
        truth_audio = codec.decode(truth[None])[0].numpy()
        row_clips = {"ground_truth": truth_audio}
        row: Dict[str, Any] = {"voice": voice.name, "text": text,
                               "seconds": round(frames / float(cfg.frame_rate), 3),
                               "cut": cut, "schedules": {}}
        features_truth = codec.log_mel(torch.from_numpy(original)[None])[0][:frames]
        if scored:
            heard = {k: recognise(a) for k, a in (("original", original),
                                                  ("ground_truth", truth_audio))}
            row.update(words=len(reference),
                       recognised={k: " ".join(h) for k, h in heard.items()},
                       word_errors={k: word_errors(reference, h) for k, h in heard.items()})
        row["codec_mel_distance_db"] = _mel_distance(codec.dequantize(truth[None])[0],
                                                     features_truth)
        for name, steps in schedules.items():
            decode = DecodeConfig(steps_per_level=steps)
            t0 = time.perf_counter()
            tokens = engine.generate(full_ids, prompt=p["tokens"][None], decode=decode,
                                     seed=seed + j)
            gen_s = time.perf_counter() - t0
            generated = tokens[0, prompt_frames:prompt_frames + frames].cpu()
            np.save(out / "utterances" / f"{j:02d}-{voice.name}-{name}.tokens.npy",
                    generated.numpy())
            t0 = time.perf_counter()
            audio = codec.decode(generated[None])[0].numpy()
            vocoder_s = time.perf_counter() - t0
            seconds = frames / float(cfg.frame_rate)
            result = {
                "steps_per_level": list(steps),
                "passes": int(sum(steps)),
                "rtf": gen_s / seconds,
                "rtf_with_vocoder": (gen_s + vocoder_s) / seconds,
                "token_accuracy": [float((generated[:, q] == truth[:, q]).float().mean())
                                   for q in range(cfg.num_quantizers)],
                "mel_distance_db": _mel_distance(codec.dequantize(generated[None])[0],
                                                 features_truth),
            }
            if scored:
                hyp = recognise(audio)
                result.update(recognised=" ".join(hyp), word_errors=word_errors(reference, hyp))
            if name == "default":
                _write_wav(out / "utterances" / f"{j:02d}-{voice.name}-generated.wav", audio, sr)
                _write_wav(out / "utterances" / f"{j:02d}-{voice.name}-ground_truth.wav",
                           truth_audio, sr)
                if j == 0:
                    _write_wav(out / "prompt.wav", p["audio"], sr)
                    _write_wav(out / "original.wav", original, sr)
                    _write_wav(out / "ground_truth.wav", truth_audio, sr)
                    _write_wav(out / "generated.wav", audio, sr)
                    _plot_spectrograms(out / "spectrograms.png", codec, [
                        ("voice prompt (held-out voice)", p["audio"]),
                        ("original (espeak-ng)", original),
                        ("ground truth (codec resynthesis)", truth_audio),
                        ("generated (SoundStorm)", audio)], text)
            row["schedules"][name] = result
            row_clips[name] = audio
        rows.append(row)
        clips.append(row_clips)

    report: Dict[str, Any] = {
        "model": {"parameters": cfg.num_parameters(),
                  "config": cfg.to_dict(), "backend": engine.backend,
                  "quantize": getattr(engine, "quantize", None),
                  "device": str(engine.device), "threads": torch.get_num_threads()},
        "prompt_seconds": prompt_frames / float(cfg.frame_rate),
        "heldout_voices": [v.name for v in voices],
        "voices": len(all_voices),
        "schedules": {}, "utterances": [],
    }
    if encoder is not None:
        refs = _speaker_references(encoder, list(all_voices.values()), [next(texts), next(texts)],
                                   speak, codec, progress)
        report["speaker_similarity"] = _similarity_report(encoder, refs, rows, clips)
    whole = [r for r in rows if "words" in r]
    if whole:  # word error rates over the utterances spoken whole
        total = sum(r["words"] for r in whole)
        report["wer"] = {
            "utterances": len(whole), "words": total,
            **{k: round(sum(r["word_errors"][k] for r in whole) / total, 4)
               for k in ("original", "ground_truth")},
            "generated": {name: round(sum(r["schedules"][name]["word_errors"] for r in whole)
                                      / total, 4) for name in schedules}}
    elif recognise is not None:
        log(f"no word error rate: every sentence was cut to max_seconds={max_seconds}")
    for name in schedules:
        per = [r["schedules"][name] for r in rows]
        acc = np.mean([s["token_accuracy"] for s in per], axis=0)
        summary = {
            "steps_per_level": per[0]["steps_per_level"], "passes": per[0]["passes"],
            "rtf": float(np.mean([s["rtf"] for s in per])),
            "rtf_with_vocoder": float(np.mean([s["rtf_with_vocoder"] for s in per])),
            "token_accuracy": [round(float(a), 4) for a in acc],
            "level1_accuracy": round(float(acc[0]), 4),
            "mel_distance_db": round(float(np.mean([s["mel_distance_db"] for s in per])), 3),
        }
        if encoder is not None:
            summary.update(report["speaker_similarity"]["generated"][name])
        if "wer" in report:
            summary["wer"] = report["wer"]["generated"][name]
        report["schedules"][name] = summary
    report["codec_mel_distance_db"] = round(float(np.mean([r["codec_mel_distance_db"]
                                                           for r in rows])), 3)
    report["utterances"] = rows
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    log(format_report(report))
    log(f"wrote {out}/: prompt.wav, original.wav, ground_truth.wav, generated.wav, "
        "spectrograms.png, report.json, utterances/")
    return report


def format_report(report: Dict[str, Any]) -> str:
    sim, wer = report.get("speaker_similarity"), report.get("wer")
    head = (f"{'schedule':<10} {'steps':<16} {'RTF':>6} {'+vocoder':>9} {'level-1 acc':>12} "
            f"{'mel dist':>9}")
    if sim:
        head += f" {'same spk':>9} {'other spk':>10} {'identified':>10} {'rank':>6}"
    if wer:
        head += f" {'WER':>6}"
    lines = [head]
    for name, s in report["schedules"].items():
        steps = ",".join(map(str, s["steps_per_level"]))
        line = (f"{name:<10} {steps:<16} {s['rtf']:>6.3f} {s['rtf_with_vocoder']:>9.3f} "
                f"{s['level1_accuracy']:>12.3f} {s['mel_distance_db']:>7.2f}dB")
        if "similarity_prompt_speaker" in s:
            line += (f" {s['similarity_prompt_speaker']:>9.3f} "
                     f"{s['similarity_other_speakers']:>10.3f} {s['identified']:>10.2f} "
                     f"{s['mean_rank']:>6.2f}")
        if "wer" in s:
            line += f" {s['wer']:>6.3f}"
        lines.append(line)
    lines.append(f"codec floor: mel distance {report['codec_mel_distance_db']:.2f} dB "
                 "(ground-truth tokens resynthesised)")
    if sim:
        t = sim["ground_truth"]
        lines.append(f"ground truth resynthesis: same speaker {t['similarity_prompt_speaker']:.3f}, "
                     f"others {t['similarity_other_speakers']:.3f}, identified "
                     f"{t['identified']:.2f}, mean rank {t['mean_rank']:.2f} of "
                     f"{len(sim['speakers'])} voices")
    if wer:
        lines.append(f"word error rate ({wer['utterances']} utterances, {wer['words']} words): "
                     f"original espeak-ng "
                     f"{wer['original']:.3f}, codec resynthesis {wer['ground_truth']:.3f}")
    return "\n".join(lines)


def demo_voices(settings: Dict[str, Any]) -> Dict[str, Any]:
    """Every voice of the demo's corpus by name (a `speech_corpus.Voice` each): the voices
    demo.json lists (accent and variant, pitch, speed, formant warp; held-out or not), or,
    for settings that list none, the corpus's twelve fixed voices."""
    from dataclasses import fields

    from soundstorm.training.speech_corpus import VOICES, Voice

    listed = settings.get("voices")
    if listed is None:
        return {v.name: v for v in VOICES}
    names = {f.name for f in fields(Voice)}
    kinds = {"name": (str, "a string"), "espeak": (str, "a string"),
             "pitch": (int, "an integer"), "speed": (int, "an integer"),
             "heldout": (bool, "true or false"), "warp": ((int, float), "a number")}
    if not isinstance(listed, list) or not listed:
        raise ValueError(f"demo settings: 'voices' must be a non-empty list of voices, got "
                         f"{type(listed).__name__}")
    voices = {}
    for i, entry in enumerate(listed):
        if not isinstance(entry, dict) or not {"name", "espeak", "pitch", "speed"} <= set(entry) \
                or set(entry) - names:
            raise ValueError(f"demo settings: voices[{i}] must be an object with name, espeak, "
                             f"pitch, speed (and optionally heldout, warp), got {entry!r}")
        for key, (kind, what) in kinds.items():
            value = entry.get(key)
            if key in entry and (not isinstance(value, kind) or
                                 (kind is not bool and isinstance(value, bool))):
                raise ValueError(f"demo settings: voices[{i}].{key} = {value!r} is not {what}")
        if entry["name"] in voices:
            raise ValueError(f"demo settings: voice {entry['name']!r} is listed twice")
        voices[entry["name"]] = Voice(**entry)
    missing = [v for v in settings.get("heldout_voices", []) if v not in voices]
    if missing:
        raise ValueError(f"demo settings: held-out voices {missing} are not among its voices")
    return voices


# -- pieces -----------------------------------------------------------------------------
def _recogniser():
    from soundstorm.demo.wer import Recogniser, corpus_vocabulary

    try:
        return Recogniser(corpus_vocabulary())
    except RuntimeError as e:
        raise RuntimeError(f"{e} (or pass wer=False / --no-wer)") from None


def _semantic_ids(semantic: Any, audio: np.ndarray, sr: int) -> torch.Tensor:
    ids = semantic.tokenize(audio, sr)
    return torch.as_tensor(ids, dtype=torch.int64).reshape(-1)


def _mel_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """RMS difference of two log-mel spectrograms [T, n_mels] (natural-log magnitudes), dB."""
    n = min(len(a), len(b))
    return float(_DB * (a[:n] - b[:n]).pow(2).mean().sqrt())


def _write_wav(path: Path, audio: np.ndarray, sr: int) -> None:
    import soundfile as sf

    tmp = path.with_name(path.stem + ".tmp.wav")
    try:
        sf.write(str(tmp), np.clip(np.asarray(audio, np.float32), -1, 1), sr, subtype="PCM_16")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _plot_spectrograms(path: Path, codec: Any, panels: Sequence, text: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6),
                             gridspec_kw={"width_ratios": [max(1, len(a)) for _, a in panels]})
    mels = [codec.log_mel(torch.from_numpy(np.asarray(a, np.float32))[None])[0] * _DB
            for _, a in panels]
    top = max(float(m.max()) for m in mels)
    for ax, (title, _), mel in zip(axes, panels, mels):
        seconds = mel.shape[0] / float(codec.frame_rate)
        ax.imshow(mel.T.numpy(), origin="lower", aspect="auto", cmap="magma",
                  vmin=top - 80, vmax=top, extent=(0, seconds, 0, mel.shape[1]))
        ax.set(title=title, xlabel="seconds")
    axes[0].set_ylabel("mel band")
    fig.suptitle(f"\u201c{text}\u201d", fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    try:
        fig.savefig(tmp, dpi=90)
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def _speaker_encoder():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # webrtcvad's pkg_resources deprecation notice
            from resemblyzer import VoiceEncoder
    except ImportError as e:
        raise RuntimeError("the demo scores voice preservation with resemblyzer, which is not "
                           "installed: pip install 'resemblyzer==0.1.4' 'setuptools<81' (or "
                           f"pass speaker_similarity=False / --no-speaker-similarity): {e}") from None
    with contextlib.redirect_stdout(None):
        return VoiceEncoder("cpu", verbose=False)


def _embed(encoder: Any, audio: np.ndarray, sr: int = 16000) -> np.ndarray:
    from resemblyzer import preprocess_wav

    wav = preprocess_wav(np.asarray(audio, np.float32), source_sr=sr)
    if len(wav) < sr // 2:  # voice activity detection left almost nothing: use it all
        wav = np.asarray(audio, np.float32)
    return encoder.embed_utterance(wav)


def _speaker_references(encoder: Any, voices: Sequence, ref_texts: Sequence[str], speak,
                        codec: Any, progress: bool = True) -> Dict[str, np.ndarray]:
    """One embedding per voice, from sentences no other part of the demo uses, passed
    through the codec like everything they are compared with (so that the codec's own
    sound is common to all and only the voices differ). espeak-ng and the formant warp run
    on a few threads; the codec and the speaker encoder take the voices in turn."""
    from concurrent.futures import ThreadPoolExecutor

    def spoken(v):
        return np.concatenate([speak(t, v) for t in ref_texts])

    refs = {}
    with ThreadPoolExecutor(max_workers=4) as pool:
        for v, audio in zip(voices, tqdm(pool.map(spoken, voices), total=len(voices),
                                         desc="speaker references", unit="voice",
                                         disable=not progress)):
            resynth = codec.decode(codec.encode(audio, codec.sample_rate))[0].numpy()
            refs[v.name] = _embed(encoder, resynth)
    return refs


def speaker_scores(refs: Dict[str, np.ndarray], embedding: np.ndarray,
                   voice: str) -> Dict[str, Any]:
    """Cosine similarity of a speaker embedding to `voice`'s reference against the other
    references: same, mean and max of the others, the nearest voice, and the rank of
    `voice` (1 + the voices nearer than it: 1 is identified)."""
    names = list(refs)
    matrix = np.stack([refs[n] for n in names])
    cos = matrix @ embedding / (np.linalg.norm(matrix, axis=1) * np.linalg.norm(embedding))
    same = names.index(voice)
    others = np.delete(cos, same)
    return {"same": float(cos[same]), "others": float(others.mean()),
            "max_other": float(others.max()), "identified": float(cos.argmax() == same),
            "closest": names[int(cos.argmax())], "rank": int(1 + (others > cos[same]).sum())}


def _similarity_report(encoder: Any, refs: Dict[str, np.ndarray], rows: List[Dict[str, Any]],
                       clips: List[Dict[str, np.ndarray]]):
    names = list(refs)

    def score(audio: np.ndarray, voice: str) -> Dict[str, float]:
        return speaker_scores(refs, _embed(encoder, audio), voice)

    def summary(scores: List[Dict[str, float]]) -> Dict[str, float]:
        return {"similarity_prompt_speaker": round(float(np.mean([s["same"] for s in scores])), 4),
                "similarity_other_speakers": round(float(np.mean([s["others"] for s in scores])), 4),
                "similarity_closest_other": round(float(np.mean([s["max_other"] for s in scores])), 4),
                "identified": round(float(np.mean([s["identified"] for s in scores])), 4),
                "mean_rank": round(float(np.mean([s["rank"] for s in scores])), 4)}

    out = {"speakers": names, "generated": {}}
    for name in rows[0]["schedules"]:
        scores = [score(c[name], r["voice"]) for r, c in zip(rows, clips)]
        out["generated"][name] = summary(scores)
        for r, sc in zip(rows, scores):  # per utterance: the similarities and the nearest voice
            r["schedules"][name].update(similarity_prompt_speaker=round(sc["same"], 4),
                                        closest_speaker=sc["closest"],
                                        prompt_speaker_rank=sc["rank"])
    out["ground_truth"] = summary([score(c["ground_truth"], r["voice"])
                                   for r, c in zip(rows, clips)])
    return out


__all__ = ["run_demo", "load_assets", "format_report", "ablation_schedules", "demo_voices",
           "speaker_scores"]
