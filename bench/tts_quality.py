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
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from soundstorm.demo import ASSETS

SR = 16000


# -- recognition ---------------------------------------------------------------------------
def corpus_vocabulary(samples: int = 20000) -> list:
    """Every word the speech corpus's sentence generator uses (lower case)."""
    from soundstorm.training.speech_corpus import sentences

    words = set()
    for s in itertools.islice(sentences(0), samples):
        words.update(normalise(s))
    return sorted(words)


def corpus_grammar() -> str:
    """A JSGF grammar of exactly the sentences the corpus generator makes: its templates,
    with each slot the alternatives of its word class."""
    from soundstorm.training.speech_corpus import _TEMPLATES, _WORDS

    def alternatives(items):
        return "( " + " | ".join(" ".join(normalise(i)) for i in items) + " )"

    rules = {k: alternatives(v) for k, v in _WORDS.items()}
    rules["nouns"] = alternatives([n + "s" for n in _WORDS["noun"]])
    slot = {"name2": "name", "noun2": "noun", "adj2": "adj", "adj3": "adj"}
    sentences = []
    for t in _TEMPLATES:
        t = re.sub(r"[.,?!]", "", t)
        t = re.sub(r"\{(\w+)\}s\b", lambda m: "<nouns>", t)
        t = re.sub(r"\{(\w+)\}", lambda m: f"<{slot.get(m.group(1), m.group(1))}>", t)
        parts = [w if w.startswith("<") else " ".join(normalise(w)) for w in t.split()]
        sentences.append(" ".join(p for p in parts if p))
    body = "".join(f"<{k}> = {v};\n" for k, v in rules.items())
    return ("#JSGF V1.0;\ngrammar corpus;\n" + body + "public <s> = "
            + " | ".join(f"( {x} )" for x in sentences) + ";\n")


def corpus_bigram_arpa(samples: int = 20000, discount: float = 0.5) -> str:
    """An ARPA bigram language model (absolute discounting, back-off to unigrams) of the
    corpus generator's sentences: constrained to its words and word pairs, yet able to
    follow audio that strays from the templates (a template grammar finds no path then)."""
    import math
    from collections import Counter

    from soundstorm.training.speech_corpus import sentences

    uni, bi = Counter(), Counter()
    for s in itertools.islice(sentences(0), samples):
        words = ["<s>"] + normalise(s) + ["</s>"]
        uni.update(words)
        bi.update(zip(words, words[1:]))
    total = sum(c for w, c in uni.items() if w != "<s>")
    p_uni = {w: (c / total if w != "<s>" else 0.0) for w, c in uni.items()}
    followers = Counter(h for h, _ in bi)
    lines = ["\\data\\", f"ngram 1={len(uni)}", f"ngram 2={len(bi)}", "", "\\1-grams:"]
    for w in sorted(uni):
        prob = -99.0 if w == "<s>" else math.log10(p_uni[w])
        if w == "</s>":
            lines.append(f"{prob:.6f} {w}")
            continue
        seen = sum(p_uni[v] for (h, v) in bi if h == w)
        alpha = (discount * followers[w] / uni[w]) / max(1e-9, 1 - seen)
        lines.append(f"{prob:.6f} {w} {math.log10(alpha):.6f}")
    lines += ["", "\\2-grams:"]
    for (h, w), c in sorted(bi.items()):
        lines.append(f"{math.log10((c - discount) / uni[h]):.6f} {h} {w}")
    return "\n".join(lines + ["", "\\end\\", ""])


def normalise(text: str) -> list:
    return re.sub(r"[^a-z' ]", " ", text.lower()).split()


def word_errors(ref: list, hyp: list) -> int:
    """Levenshtein distance between two word lists (substitutions, insertions, deletions)."""
    d = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        prev, d[0] = d[0], i
        for j, h in enumerate(hyp, start=1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (r != h))
    return d[len(hyp)]


class Recogniser:
    """pocketsphinx, its search limited to the corpus's words: a bigram language model of
    its sentences, or with `strict` its exact template grammar (`vocabulary`: the words
    its dictionary holds)."""

    def __init__(self, vocabulary: list, strict: bool = False):
        from pocketsphinx import Config, Decoder, get_model_path

        model = Path(get_model_path()) / "en-us"
        dictionary = {}
        for line in (model / "cmudict-en-us.dict").read_text().splitlines():
            word, _, phones = line.partition(" ")
            if (word in vocabulary or word + "s" in vocabulary) and word not in dictionary:
                dictionary[word] = phones
        for word in set(vocabulary) - set(dictionary):   # plurals the dictionary lacks
            if word.endswith("s") and word[:-1] in dictionary:
                dictionary[word] = dictionary[word[:-1]] + " Z"
        missing = sorted(set(vocabulary) - set(dictionary))
        if missing:
            raise RuntimeError(f"words missing from the pocketsphinx dictionary: {missing}")
        self.tmp = tempfile.TemporaryDirectory()
        dict_path = Path(self.tmp.name) / "corpus.dict"
        words = sorted(set(vocabulary))
        dict_path.write_text("".join(f"{w} {dictionary[w]}\n" for w in words))
        if strict:
            grammar = Path(self.tmp.name) / "corpus.gram"
            grammar.write_text(corpus_grammar())
            search = {"jsgf": str(grammar)}
        else:
            lm = Path(self.tmp.name) / "corpus.arpa"
            lm.write_text(corpus_bigram_arpa())
            search = {"lm": str(lm)}
        config = Config(hmm=str(model / "en-us"), dict=str(dict_path), loglevel="FATAL",
                        **search)
        self.decoder = Decoder(config)

    def __call__(self, audio: np.ndarray, sr: int = SR) -> list:
        from soundstorm.engine.codecs.audio import resample

        if sr != SR:
            audio = resample(torch.from_numpy(audio)[None], sr, SR)[0].numpy()
        pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16).tobytes()
        self.decoder.start_utt()
        self.decoder.process_raw(pcm, full_utt=True)
        self.decoder.end_utt()
        hyp = self.decoder.hyp()
        return normalise(hyp.hypstr) if hyp is not None else []


# -- the measurements ---------------------------------------------------------------------
def load(assets: Path):
    from soundstorm.engine.text_model import TextToSemantic
    from soundstorm.engine.tts import TextToSpeech
    from soundstorm.demo.run import load_assets

    engine, codec, semantic, settings = load_assets(assets)
    text_model = TextToSemantic.from_pretrained(assets / "text-model", dtype=torch.float32)
    return TextToSpeech(text_model, engine, codec, semantic), settings


def heldout_material(settings: dict, n: int):
    """Per held-out voice a prompt sentence, then `n` target sentences alternating voices,
    from the held-out text stream past everything the corpus and the demo use."""
    from soundstorm.training.speech_corpus import sentences, voice_by_name

    voices = [voice_by_name(v) for v in settings["heldout_voices"]]
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
    voices, prompt_text, targets = heldout_material(settings, 8)
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
