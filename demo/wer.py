"""Word error rates on the speech corpus's sentences, with an offline recogniser.

    from soundstorm.demo.wer import Recogniser, corpus_vocabulary, normalise, word_errors
    recognise = Recogniser(corpus_vocabulary())
    errors = word_errors(normalise(text), recognise(audio, 16000))

pocketsphinx (`pip install 'soundstorm[wer]'`; its en-us acoustic model ships in the wheel)
recognises espeak-ng speech only when its search is constrained: here to the words of the
corpus's sentence generator and a bigram language model of its sentences (or, strictly, a
JSGF grammar of its templates). The demo report and bench/tts_quality.py use it.
"""

from __future__ import annotations

import itertools
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

SR = 16000


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
        try:
            from pocketsphinx import Config, Decoder, get_model_path
        except ImportError as e:
            raise RuntimeError("word error rates need pocketsphinx, which is not installed: "
                               "pip install 'soundstorm[wer]'") from e

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


__all__ = ["Recogniser", "corpus_vocabulary", "corpus_grammar", "corpus_bigram_arpa",
           "normalise", "word_errors"]
