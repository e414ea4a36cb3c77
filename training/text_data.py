"""(text, semantic ids) pairs for the text-to-semantic model, from a tokenized corpus.

`soundstorm tokenize` writes `texts.jsonl` beside a corpus whose manifests carry text (the
speech corpus's do). A training example is one utterance: the encoder reads its text, the
decoder its semantic ids (one per semantic frame, not deduplicated). With probability
`prompt_probability` another utterance of the same speaker comes first as the voice
prompt: its transcript before the separator, its semantic ids after the begin symbol; the
loss covers only the target's ids and the end symbol, so the model learns to continue a
prompt's voice and timing with new words, as `generate_semantic` asks it to.

Which utterances form a batch and which prompt each gets is a pure function of (seed,
epoch, batch index), so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from soundstorm.engine.text_model import TextModelConfig, encode_text
from soundstorm.training.corpus import TokenCorpus, open_corpus

TEXTS_FILE = "texts.jsonl"
IGNORE = -100


@dataclass
class Utterance:
    id: str
    text: str
    speaker: int
    ids: np.ndarray           # int64 [S] semantic ids


@dataclass
class TextBatch:
    text: torch.Tensor        # int64 [B, L] encoder symbols, right-padded
    text_mask: torch.Tensor   # bool [B, L]
    inputs: torch.Tensor      # int64 [B, S] decoder inputs: begin, prompt ids, target ids
    input_mask: torch.Tensor  # bool [B, S]
    labels: torch.Tensor      # int64 [B, S]: the next symbol where it is trained, else -100

    def to(self, device: torch.device) -> "TextBatch":
        return TextBatch(*(t.to(device) for t in (self.text, self.text_mask, self.inputs,
                                                    self.input_mask, self.labels)))


def read_texts(directory: Path) -> Dict[str, str]:
    path = Path(directory) / TEXTS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the text model trains on a corpus tokenized from manifests "
            "that carry text (soundstorm tokenize on a speech-corpus folder or a .jsonl with "
            "\"text\")")
    texts: Dict[str, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise ValueError(f"{path}:{n}: not a JSON object") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or \
                not isinstance(entry.get("text"), str):
            raise ValueError(f"{path}:{n}: expected {{\"id\": str, \"text\": str}}")
        texts[entry["id"]] = entry["text"]
    return texts


def load_pairs(directory: Any, config: TextModelConfig) -> List[Utterance]:
    """Every utterance of the corpus that has a transcript and fits the model alone."""
    corpus: TokenCorpus = open_corpus(directory)
    if corpus.meta.semantic_vocab_size != config.semantic_vocab_size:
        raise ValueError(f"corpus {directory} has semantic_vocab_size "
                         f"{corpus.meta.semantic_vocab_size}, the text model "
                         f"{config.semantic_vocab_size}")
    if float(corpus.meta.semantic_rate) != float(config.semantic_rate):
        raise ValueError(f"corpus {directory} has semantic_rate {corpus.meta.semantic_rate}, "
                         f"the text model {config.semantic_rate}")
    texts = read_texts(Path(directory))
    pairs = []
    for i, uid in enumerate(corpus.ids):
        text = texts.get(uid)
        if text is None or not text.strip():
            continue
        ids = corpus.read(i, 0, int(corpus.frames[i]))[1]
        if len(ids) + 2 > config.max_semantic_len or \
                len(encode_text(text)) > config.max_text_len:
            continue
        pairs.append(Utterance(uid, text, int(corpus.speaker[i]), ids))
    if not pairs:
        raise ValueError(f"corpus {directory}: no utterance has a transcript in {TEXTS_FILE} "
                         "and fits the text model's lengths")
    return pairs


def split_pairs(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng([seed, 0x7E47]).permutation(n)
    held = int(round(n * val_fraction))
    return np.sort(order[held:]), np.sort(order[:held])


class PairSampler:
    """Global batches of examples, a pure function of (seed, epoch, batch index)."""

    def __init__(self, pairs: Sequence[Utterance], indices: np.ndarray, batch_size: int,
                 seed: int, prompt_probability: float, config: TextModelConfig,
                 drop_last: bool = True):
        self.pairs, self.indices = pairs, np.asarray(indices)
        self.batch_size, self.seed = batch_size, seed
        self.prompt_probability, self.config = prompt_probability, config
        self.drop_last = drop_last
        by_speaker: Dict[int, List[int]] = {}
        for i in self.indices:
            by_speaker.setdefault(pairs[i].speaker, []).append(int(i))
        self.by_speaker = by_speaker
        if len(self.indices) < batch_size and drop_last:
            raise ValueError(f"{len(self.indices)} training pairs are fewer than one batch of "
                             f"{batch_size}")

    def batches_per_epoch(self) -> int:
        n = len(self.indices)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def batch(self, epoch: int, index: int) -> List[tuple]:
        """(target, prompt or None) pair indices of global batch `index` of `epoch`."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.indices)
        chosen = order[index * self.batch_size:(index + 1) * self.batch_size]
        rng = np.random.default_rng([self.seed, epoch, index, 1])
        out = []
        for i in chosen:
            same = self.by_speaker[self.pairs[i].speaker]
            prompt = None
            if len(same) > 1 and rng.random() < self.prompt_probability:
                j = int(same[rng.integers(len(same) - 1)])
                prompt = j if j != i else int(same[-1])
            out.append((int(i), prompt))
        return out

    def example(self, target: int, prompt: Optional[int]) -> Dict[str, torch.Tensor]:
        cfg = self.config
        t = self.pairs[target]
        p = self.pairs[prompt] if prompt is not None else None
        if p is not None:
            text = encode_text(t.text, p.text)
            if len(text) > cfg.max_text_len or len(p.ids) + len(t.ids) + 2 > cfg.max_semantic_len:
                p = None
        if p is None:
            text = encode_text(t.text)
        prompt_ids = p.ids if p is not None else np.zeros(0, np.int64)
        inputs = np.concatenate([[cfg.begin_id], prompt_ids, t.ids]).astype(np.int64)
        labels = np.concatenate([np.full(len(prompt_ids), IGNORE), t.ids,
                                 [cfg.end_id]]).astype(np.int64)
        return {"text": text, "inputs": torch.from_numpy(inputs),
                "labels": torch.from_numpy(labels)}


def collate_pairs(examples: Sequence[Dict[str, torch.Tensor]]) -> TextBatch:
    B = len(examples)
    L = max(len(e["text"]) for e in examples)
    S = max(len(e["inputs"]) for e in examples)
    text = torch.zeros(B, L, dtype=torch.int64)
    text_mask = torch.zeros(B, L, dtype=torch.bool)
    inputs = torch.zeros(B, S, dtype=torch.int64)
    input_mask = torch.zeros(B, S, dtype=torch.bool)
    labels = torch.full((B, S), IGNORE, dtype=torch.int64)
    for b, e in enumerate(examples):
        n, s = len(e["text"]), len(e["inputs"])
        text[b, :n], text_mask[b, :n] = e["text"], True
        inputs[b, :s], input_mask[b, :s], labels[b, :s] = e["inputs"], True, e["labels"]
    return TextBatch(text, text_mask, inputs, input_mask, labels)


__all__ = ["TEXTS_FILE", "Utterance", "TextBatch", "load_pairs", "split_pairs",
           "PairSampler", "collate_pairs", "read_texts"]
