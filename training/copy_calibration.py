"""Fit the prompt lookup's copy gates to voices the model has never heard.

A model with a prompt lookup (`ModelConfig.prompt_lookup`) mixes, at every finer level q,
its head's distribution with the lookup's vote for the code the prompt's speaker uses in
the same level-1 context, by a gate g = sigmoid(h . a_q + b_q) (`PromptLookup.copy`).
Trained on a corpus whose every voice it hears hundreds of times, the head learns those
voices and the gate learns to trust the head: for a voice it has never heard, the prompt
is worth more than the gate gives it. This fits the gate's offsets b_q (one number per
level; the model and the rest of the gate are kept) to the likelihood of the tokens of
voices that were not trained on, in the state in which the paper's schedule decodes
each finer level: the prompt (another utterance of the same speaker), the coarser levels
known, that level and the finer ones masked (coarser levels are the true ones here).

    soundstorm calibrate-copy run/model --data tokens/calibration --out calibrated/
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

import torch
from tqdm import tqdm

REPORT_FILE = "copy-calibration.json"


def calibration_pairs(corpus, prompt_frames: int, max_frames: int) -> List[Tuple[torch.Tensor,
                                                                                 torch.Tensor,
                                                                                 int]]:
    """(semantic [S], tokens [P + T, Q], P) for every utterance whose speaker has another
    utterance: the prompt is the first `prompt_frames` (or as many as it has, rounded down
    to an aligned count) of the speaker's next utterance (in corpus order, wrapping
    round), the target the utterance, cut so that both fit `max_frames`."""
    num, den = corpus.meta.rate_fraction()
    by_speaker: Dict[int, List[int]] = {}
    for i, speaker in enumerate(corpus.speaker.tolist()):
        by_speaker.setdefault(speaker, []).append(i)
    pairs = []
    for members in by_speaker.values():
        if len(members) < 2:
            continue
        for k, index in enumerate(members):
            source = members[(k + 1) % len(members)]
            P = min(prompt_frames, int(corpus.frames[source])) // den * den
            T = min(int(corpus.frames[index]), max_frames - P)
            if P < den or T < 1:
                continue
            prompt, prompt_ids = corpus.read(source, 0, P)
            target, target_ids = corpus.read(index, 0, T)
            ids = torch.from_numpy(prompt_ids[:P * num // den])
            semantic = torch.cat([ids, torch.from_numpy(target_ids)])
            tokens = torch.cat([torch.from_numpy(prompt), torch.from_numpy(target)])
            pairs.append((semantic, tokens, P))
    return pairs


@torch.no_grad()
def collect(model, pairs, progress: bool = False) -> Dict[int, Dict[str, torch.Tensor]]:
    """For each level q = 2..Q, over the target frames that read the lookup, in the state
    in which q is decoded: `z` [N] (the gate's h . a_q, without its offset), `logits`
    [N, C] (the head alone), `vote` [N, C] and `target` [N] (the true codes)."""
    C, Q = model.config.codebook_size, model.config.num_quantizers
    lookup = model.lookup
    parts: Dict[int, Dict[str, List[torch.Tensor]]] = {
        q: {"z": [], "logits": [], "vote": [], "target": []} for q in range(2, Q + 1)}
    for semantic, tokens, P in tqdm(pairs, desc="calibration utterances", unit="utt",
                                    disable=not progress):
        for q in range(2, Q + 1):
            x = tokens[None].clone()
            x[0, P:, q - 1:] = C
            h, weights = model.hidden(semantic[None], x)
            reads = weights[0, P:].sum(dim=1) > 0
            part = parts[q]
            part["z"].append((h[0, P:].float() @ lookup.copy_weight[q - 2].float())[reads])
            part["logits"].append(model.logits(h, q)[0, P:].float()[reads])
            part["vote"].append(lookup.vote(x, weights, q)[0, P:].float()[reads])
            part["target"].append(tokens[P:, q - 1][reads])
    return {q: {k: torch.cat(v) for k, v in part.items()} for q, part in parts.items()}


def mixture_nll(data: Dict[str, torch.Tensor], bias: float) -> float:
    """Mean negative log-likelihood of the true codes under the copy with offset `bias`."""
    g = torch.sigmoid(data["z"] + bias)[:, None]
    p = torch.softmax(data["logits"].double(), dim=1)
    mixed = p + g.double() * (data["vote"].double() - p)
    picked = mixed.gather(1, data["target"][:, None])[:, 0]
    return float(-torch.log(picked.clamp_min(1e-300)).mean())


def mixture_accuracy(data: Dict[str, torch.Tensor], bias: float) -> float:
    """How often the copy's most likely code (the greedy choice) is the true one."""
    g = torch.sigmoid(data["z"] + bias)[:, None]
    p = torch.softmax(data["logits"], dim=1)
    return float(((p + g * (data["vote"] - p)).argmax(1) == data["target"]).float().mean())


def fit_bias(data: Dict[str, torch.Tensor], low: float = -12.0, high: float = 12.0) -> float:
    """The offset in [low, high] of least `mixture_nll`: the best of a grid of 49 points,
    refined by golden-section search between its neighbours."""
    grid = [low + (high - low) * i / 48 for i in range(49)]
    losses = [mixture_nll(data, b) for b in grid]
    best = min(range(49), key=losses.__getitem__)
    a, b = grid[max(0, best - 1)], grid[min(48, best + 1)]
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = mixture_nll(data, c), mixture_nll(data, d)
    for _ in range(40):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = mixture_nll(data, c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = mixture_nll(data, d)
    found = (a + b) / 2
    return found if mixture_nll(data, found) <= losses[best] else grid[best]


def calibrate_copy(model_dir: Union[str, Path], data: Union[str, Path],
                   out: Union[str, Path], prompt_seconds: float = 3.0,
                   progress: bool = False) -> Dict[str, Any]:
    """Fit the copy gates' offsets of the model in `model_dir` on the token corpus `data`
    (voices the model was not trained on; every speaker needs two utterances) and save
    the model, with those offsets and nothing else changed, in `out`, with a report
    (`copy-calibration.json`: per level the offset, mean gate, negative log-likelihood
    and greedy accuracy before and after). Returns the report."""
    from soundstorm.engine.model import SoundStorm
    from soundstorm.training.corpus import open_corpus

    if isinstance(prompt_seconds, bool) or not isinstance(prompt_seconds, (int, float)) \
            or not prompt_seconds > 0 or not math.isfinite(prompt_seconds):
        raise ValueError(f"prompt_seconds must be a positive number, got {prompt_seconds!r}")
    model = SoundStorm.from_pretrained(model_dir, dtype=torch.float32).eval()
    cfg = model.config
    if model.lookup is None:
        raise ValueError(f"the model in {model_dir} has no prompt lookup (prompt_lookup = 0): "
                         "there is no copy gate to calibrate")
    corpus = open_corpus(data)
    wrong = [f"{k}: corpus {getattr(corpus.meta, k)!r}, model {getattr(cfg, k)!r}"
             for k in ("num_quantizers", "codebook_size", "semantic_vocab_size",
                       "frame_rate", "semantic_rate")
             if float(getattr(corpus.meta, k)) != float(getattr(cfg, k))]
    if wrong:
        raise ValueError(f"the corpus {data} does not fit the model in {model_dir}: "
                         + "; ".join(wrong))
    prompt_frames = max(1, round(prompt_seconds * float(cfg.frame_rate)))
    if prompt_frames >= cfg.max_frames:
        raise ValueError(f"prompt_seconds = {prompt_seconds} is {prompt_frames} frames, not "
                         f"fewer than the model's max_frames = {cfg.max_frames}")
    pairs = calibration_pairs(corpus, prompt_frames, cfg.max_frames)
    if not pairs:
        raise ValueError(f"the corpus {data} has no speaker with two utterances: a prompt "
                         "must come from another utterance of the target's speaker")
    collected = collect(model, pairs, progress)
    levels = {}
    with torch.no_grad():
        for q, part in collected.items():
            if part["target"].numel() == 0:
                raise ValueError(f"no frame of the corpus {data} reads the lookup at level {q}")
            old = float(model.lookup.copy_bias[q - 2])
            new = fit_bias(part)
            if mixture_nll(part, old) <= mixture_nll(part, new):
                new = old
            levels[str(q)] = {
                "frames": int(part["target"].numel()),
                "bias": [round(old, 4), round(new, 4)],
                "mean_gate": [round(float(torch.sigmoid(part["z"] + b).mean()), 4)
                              for b in (old, new)],
                "nll": [round(mixture_nll(part, b), 4) for b in (old, new)],
                "accuracy": [round(mixture_accuracy(part, b), 4) for b in (old, new)],
                "head_alone": {"nll": round(float(torch.nn.functional.cross_entropy(
                    part["logits"], part["target"])), 4), "accuracy": round(float(
                        (part["logits"].argmax(1) == part["target"]).float().mean()), 4)}}
            model.lookup.copy_bias[q - 2] = new
    out = Path(out)
    model.save_pretrained(out)
    report = {"model": str(model_dir), "data": str(data), "utterances": len(pairs),
              "prompt_seconds": prompt_seconds,
              "note": "per level: [before, after] calibration",
              "levels": levels}
    (out / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    return report
