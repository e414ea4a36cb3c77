"""Text-to-speech measurements with the shipped demo models (or --assets DIR).

    python bench/tts_quality.py --json tts-quality.json [--sentences 12]

1. WER: pocketsphinx (offline, en-us acoustic model) with its search constrained to the
   speech corpus's vocabulary and sentence patterns (a JSGF grammar made from the corpus
   generator's templates and word lists), on held-out sentences in the held-out voices, for
     original  - the espeak-ng audio itself (the recogniser's floor on this speech),
     codec     - its codec resynthesis (encode -> decode),
     soundstorm- SoundStorm from the sentence's true semantic ids and a 3 s voice prompt,
     text      - the full pipeline: text -> text model -> SoundStorm -> codec.
2. Runtime per stage (text->semantic, SoundStorm, codec) for about 10 s and 30 s of
   speech, and the real-time factor of `say` (the pipeline's wall time over audio time).
3. Dialogue: per turn, the resemblyzer speaker-embedding similarity of the generated turn
   to its own speaker's prompt against the other speaker's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from soundstorm.demo import ASSETS
from soundstorm.demo.wer import Recogniser, corpus_vocabulary, normalise, word_errors

SR = 16000


# -- the measurements ---------------------------------------------------------------------
def load(assets: Path):
    from soundstorm.engine.text_model import TextToSemantic
    from soundstorm.engine.tts import TextToSpeech
    from soundstorm.demo.run import load_assets

    engine, codec, semantic, settings = load_assets(assets)
    text_model = TextToSemantic.from_pretrained(assets / "text-model", dtype=torch.float32)
    return TextToSpeech(text_model, engine, codec, semantic), settings


def heldout_material(settings: dict, n: int, speakers: int = 0):
    """Per held-out voice (the first `speakers` of them; all when 0) a prompt sentence, then
    `n` target sentences alternating voices,
    from the held-out text stream past everything the corpus and the demo use."""
    from soundstorm.demo.run import demo_voices
    from soundstorm.training.speech_corpus import sentences

    every = demo_voices(settings)
    voices = [every[v] for v in settings["heldout_voices"]][:speakers or None]
    texts = sentences(settings["corpus_seed"] + settings["heldout_stream_offset"])
    texts = itertools.islice(texts, settings["heldout_sentences_used"] + 1000, None)
    prompts = {v.name: next(texts) for v in voices}
    targets = [(voices[j % len(voices)], next(texts)) for j in range(n)]
    return voices, prompts, targets


def measure_wer(tts, settings: dict, n: int, seed: int, log) -> dict:
    from soundstorm.training.speech_corpus import speak

    recognise = Recogniser(corpus_vocabulary())
    codec, engine, semantic = tts.codec, tts.engine, tts.semantic_tokenizer
    voices, prompt_text, targets = heldout_material(settings, n)
    voice = {v.name: tts.prepare_voice(speak(prompt_text[v.name], v), prompt_text[v.name],
                                       sr=SR) for v in voices}
    errors = {k: 0 for k in ("original", "codec", "soundstorm", "text")}
    words, rows = 0, []
    for j, (v, text) in enumerate(targets):
        ref = normalise(text)
        original = speak(text, v)
        tokens = codec.encode(original, SR)[0]
        resynth = codec.decode(tokens[None])[0].numpy()
        ids = torch.as_tensor(semantic.tokenize(original, SR), dtype=torch.int64).reshape(-1)
        p = voice[v.name]
        gen = engine.generate(torch.cat([p.ids, ids])[None], prompt=p.tokens[None], seed=seed + j)
        gen = gen[0, p.tokens.shape[0]:]
        storm = codec.decode(gen[None])[0].numpy()
        spoken = tts.synthesize(text, p, seed=seed + j)
        hyps = {"original": recognise(original), "codec": recognise(resynth),
                "soundstorm": recognise(storm), "text": recognise(spoken)}
        row = {"voice": v.name, "sentence": text, "text_seconds": round(spoken.size / SR, 3),
               "original_seconds": round(original.size / SR, 3)}
        for k, hyp in hyps.items():
            e = word_errors(ref, hyp)
            errors[k] += e
            row[k] = {"hyp": " ".join(hyp), "errors": e}
        words += len(ref)
        rows.append(row)
        log(f"  {j + 1}/{n} {v.name}: " + ", ".join(f"{k} {row[k]['errors']}/{len(ref)}"
                                                     for k in errors))
    return {"wer": {k: round(e / words, 4) for k, e in errors.items()}, "words": words,
            "sentences": n, "vocabulary": len(corpus_vocabulary()), "utterances": rows}


def measure_runtime(tts, settings: dict, seed: int, log) -> dict:
    """Per-stage time for texts of about 10 s and 30 s of speech (3 and 9 sentences)."""
    from soundstorm.training.speech_corpus import speak

    voices, prompt_text, targets = heldout_material(settings, 9)
    v = voices[0]
    voice = tts.prepare_voice(speak(prompt_text[v.name], v), prompt_text[v.name], sr=SR)
    tts.synthesize(targets[0][1], voice, seed=seed)               # warm-up
    out = {}
    for label, count in (("10s", 3), ("30s", 9)):
        text = " ".join(t for _, t in targets[:count])
        t0 = time.perf_counter()
        audio = tts.synthesize(text, voice, seed=seed)
        wall = time.perf_counter() - t0
        r = tts.last_report.to_dict()
        r.update(wall_seconds=round(wall, 4), say_rtf=round(wall / (audio.size / SR), 4),
                 threads=torch.get_num_threads())
        out[label] = r
        log(f"  {label}: {r['audio_seconds']:.1f} s of audio: " + ", ".join(
            f"{k} {s:.2f} s" for k, s in r["seconds"].items()) + f"; RTF {r['say_rtf']:.3f}")
    return out


def measure_dialogue(tts, settings: dict, seed: int, log) -> dict:
    from soundstorm.demo.run import _embed, _speaker_encoder
    from soundstorm.training.speech_corpus import speak

    encoder = _speaker_encoder()
    voices, prompt_text, targets = heldout_material(settings, 8, speakers=2)
    audio = {v.name: speak(prompt_text[v.name], v) for v in voices}
    prepared = {n: tts.prepare_voice(a, prompt_text[n], sr=SR) for n, a in audio.items()}
    # The reference of each voice: its prompt through the codec (as generated audio is).
    refs = {n: _embed(encoder, tts.codec.decode(tts.codec.encode(a, SR))[0].numpy())
            for n, a in audio.items()}
    rows = []
    for j, (v, text) in enumerate(targets):
        other = [n for n in refs if n != v.name][0]
        e = _embed(encoder, tts.synthesize(text, prepared[v.name], seed=seed + j))
        cos = {n: float(r @ e / (np.linalg.norm(r) * np.linalg.norm(e))) for n, r in refs.items()}
        rows.append({"speaker": v.name, "own": round(cos[v.name], 4),
                     "other": round(cos[other], 4)})
        log(f"  turn {j + 1} ({v.name}): own {cos[v.name]:.3f}, other {cos[other]:.3f}")
    return {"turns": rows,
            "mean_own": round(float(np.mean([r["own"] for r in rows])), 4),
            "mean_other": round(float(np.mean([r["other"] for r in rows])), 4),
            "own_closer": round(float(np.mean([r["own"] > r["other"] for r in rows])), 4)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--assets", default=str(ASSETS))
    p.add_argument("--sentences", type=int, default=12, help="held-out sentences for WER")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", action="append", default=[], choices=("wer", "runtime", "dialogue"))
    p.add_argument("--json", metavar="FILE", help="write the results here")
    args = p.parse_args(argv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    tts, settings = load(Path(args.assets))
    results = {"assets": args.assets, "threads": torch.get_num_threads()}
    for name, fn in (("wer", lambda: measure_wer(tts, settings, args.sentences, args.seed, log)),
                     ("runtime", lambda: measure_runtime(tts, settings, args.seed, log)),
                     ("dialogue", lambda: measure_dialogue(tts, settings, args.seed, log))):
        if name not in args.skip:
            log(f"{name}:")
            results[name] = fn()
    summary = {k: v for k, v in results.items() if k != "wer"}
    if "wer" in results:
        summary["wer"] = results["wer"]["wer"]
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
