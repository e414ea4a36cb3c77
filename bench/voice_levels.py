"""Where a generated voice is lost: speaker identity level by level.

For held-out sentences spoken by the demo's held-out voices (or, with --voices training, by
training voices), each with a 3 s prompt of its own voice as the demo gives it, this
decodes with the default schedule and scores with resemblyzer, against every voice of
the corpus, how close these token sets come to the prompt's speaker:

- truth levels 1..k   the codec's own tokens, only the first k levels (k = 1..Q): how much
                      of the voice each level carries;
- generated           SoundStorm's tokens (what the demo scores);
- generated L1 + truth finer, truth L1 + generated finer (the model decoding levels
                      2..Q after the true level 1): whose errors cost the voice, the
                      coarse level's or the finer levels';
- truth L1 + prompt's finer, generated L1 + prompt's finer
                      no model for the finer levels: each frame's levels 2..Q copied from
                      the prompt frame nearest it in level-1 context (its level-1
                      codeword and its neighbours'): how much of the voice a model could
                      take from the prompt by copying, at about the token accuracy it
                      reaches, under the true level 1 and under the model's.

Each row gives the similarity to the prompt's speaker, the mean over the other voices,
how many utterances rank the prompt's speaker first, and its mean rank; plus the token
accuracy per level of both decodes, and for a model with a prompt lookup, that of the
finer codes the lookup alone votes for after the true level 1, and the mean gate with
which each finer level mixes that vote into its output (`copy_gate`). --model scores another
model (a training run's `model/` directory) with the demo's codec and tokenizer.

    python bench/voice_levels.py                                # the shipped demo model
    python bench/voice_levels.py --model demo-build/run/model --voices training
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from soundstorm.demo.run import (ASSETS, _embed, _semantic_ids, _speaker_encoder,
                                 _speaker_references, demo_voices, load_assets,
                                 speaker_scores)
from soundstorm.engine.config import DecodeConfig
from soundstorm.engine.decode import reference_decode
from soundstorm.engine.engine import Engine


def variants(truth: torch.Tensor, generated: torch.Tensor, forced: torch.Tensor,
             copied: torch.Tensor, generated_copied: torch.Tensor) -> dict:
    """Token sets [T, k] to score, by name (see the module docstring)."""
    Q = truth.shape[1]
    out = {f"truth levels 1..{k}": truth[:, :k] for k in range(1, Q + 1)}
    out["generated"] = generated
    out["generated L1 + truth finer"] = torch.cat([generated[:, :1], truth[:, 1:]], 1)
    out["truth L1 + generated finer"] = forced
    out["truth L1 + prompt's finer"] = copied
    out["generated L1 + prompt's finer"] = generated_copied
    return out


def copy_from_prompt(codec, tokens: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """tokens [T, Q] with levels 2..Q replaced by those of the prompt frame ([P, Q]) nearest
    each frame in level-1 context: its level-1 codeword, and at half weight its neighbours'."""
    def context(t):
        e = codec.dequantize(t[None, :, :1])[0]                                 # [T, D]
        before = torch.cat([e[:1], e[:-1]])
        after = torch.cat([e[1:], e[-1:]])
        return torch.cat([0.5 * before, e, 0.5 * after], 1)
    nearest = torch.cdist(context(tokens), context(prompt)).argmin(1)
    return torch.cat([tokens[:, :1], prompt[nearest, 1:]], 1)


def lookup_vote(model, tokens: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """tokens [T, Q] with levels 2..Q replaced by what the model's prompt lookup reads
    most of: at each level, the code on which its weights over the prompt frames ([P, Q])
    put the most mass, with the target's finer levels masked as when they are decoded.
    How well the lookup itself copies, whatever the rest of the model makes of it."""
    C, Q = model.config.codebook_size, model.config.num_quantizers
    P = prompt.shape[0]
    seq = torch.cat([prompt, tokens]).to(torch.int64)[None]
    seq[0, P:, 1:] = C
    seq = seq.to(model.head_weight.device)
    with torch.no_grad():
        w = model.lookup.weights(seq, None)
        votes = [model.lookup.vote(seq, w, q)[0, P:].argmax(1).cpu() for q in range(2, Q + 1)]
    return torch.cat([tokens[:, :1], torch.stack(votes, 1).to(tokens.dtype)], 1)


def copy_gates(model, semantic: torch.Tensor, prompt: torch.Tensor,
               tokens: torch.Tensor) -> list:
    """The mean copy gate (`PromptLookup.copy`) of a lookup model over the target frames
    at each level 2..Q, in the state in which that level is decoded after `tokens` [T, Q]
    (the model's own decode): the prompt ([1, P, Q]), the target's coarser levels, the
    level and the finer ones masked. How much each finer level trusts the lookup's vote
    over its own head."""
    C, Q = model.config.codebook_size, model.config.num_quantizers
    P = prompt.shape[1]
    device = model.head_weight.device
    gates = []
    for level in range(2, Q + 1):
        seq = torch.cat([prompt[0], tokens]).to(torch.int64)[None].clone()
        seq[0, P:, level - 1:] = C
        with torch.no_grad():
            h, _ = model.hidden(semantic.to(device), seq.to(device))
            gate = torch.sigmoid(model.lookup.gate_logit(h[0, P:], level))
        gates.append(float(gate.float().mean()))
    return gates


def decode_after_level1(engine, semantic, prompt, level1: torch.Tensor, frames: slice,
                        decode: DecodeConfig, seed: int) -> torch.Tensor:
    """The model's levels 2..Q with level 1 of the target frames given (the reference
    decode, whose level-1 iterations then have nothing left to fill)."""
    batch = engine.prepare(semantic, None, prompt, None, decode, seed)
    batch.tokens[0, frames, 0] = level1
    return reference_decode(engine, batch)[0, frames].cpu()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--assets", default=str(ASSETS), help="demo assets (default: the shipped)")
    p.add_argument("--model", help="score this model directory instead of the assets' model")
    p.add_argument("--voices", choices=("heldout", "training"), default="heldout",
                   help="whose prompts and sentences: the held-out voices (default) or as "
                        "many training voices, spread over the corpus")
    p.add_argument("--utterances", type=int, default=8, help="sentences, one voice each (8)")
    p.add_argument("--reference-voices", type=int, default=0, metavar="N",
                   help="rank among the prompts' voices and N others only (0 = every voice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.utterances < 1 or args.reference_voices < 0:
        p.error(f"--utterances must be >= 1 and --reference-voices >= 0, got "
                f"{args.utterances} and {args.reference_voices}")

    from soundstorm.training.speech_corpus import sentences, speak

    engine, codec, semantic, settings = load_assets(args.assets)
    if args.model:
        engine = Engine(args.model, dtype=torch.float32)
        cfg = engine.config
        if (cfg.num_quantizers, cfg.codebook_size, cfg.semantic_vocab_size) != \
                (codec.num_quantizers, codec.codebook_size, semantic.vocab_size):
            p.error(f"--model {args.model} has {cfg.num_quantizers} levels of "
                    f"{cfg.codebook_size} codes over {cfg.semantic_vocab_size} semantic ids; "
                    f"the assets' codec and tokenizer have {codec.num_quantizers}, "
                    f"{codec.codebook_size} and {semantic.vocab_size}")
    cfg, sr = engine.config, codec.sample_rate
    every = demo_voices(settings)
    if args.voices == "heldout":
        pool = [every[n] for n in settings["heldout_voices"]]
    else:
        training = [v for v in every.values() if not v.heldout]
        pool = training[::max(1, len(training) // args.utterances)]
    per_id = float(cfg.frame_rate) / float(cfg.semantic_rate)
    prompt_ids = round(3.0 * float(cfg.semantic_rate))
    prompt_frames = int(prompt_ids * per_id)
    max_frames = min(int(6.0 * float(cfg.frame_rate)), cfg.max_frames - prompt_frames)
    # the demo's text stream, past every sentence the corpus and the demo use
    texts = itertools.islice(sentences(settings["corpus_seed"] + settings["heldout_stream_offset"]),
                             settings["heldout_sentences_used"] + 64, None)
    voices = [pool[j % len(pool)] for j in range(args.utterances)]
    rest = [v for v in every.values() if v.name not in {x.name for x in voices}]
    if args.reference_voices:
        rest = rest[::max(1, len(rest) // args.reference_voices)][:args.reference_voices]
    reference_voices = list({v.name: v for v in voices}.values()) + rest

    decode = DecodeConfig()
    encoder = _speaker_encoder()
    clips, gates = {}, []
    accuracy = {"generated": [], "truth L1 + generated finer": [],
                "truth L1 + prompt's finer": []}
    for j, voice in enumerate(tqdm(voices, desc="utterances", unit="utt")):
        prompt_audio = speak(next(texts), voice)[: prompt_frames * codec.hop_length]
        prompt_audio = np.pad(prompt_audio, (0, prompt_frames * codec.hop_length - len(prompt_audio)))
        prompt = codec.encode(prompt_audio, sr)[0][:prompt_frames][None]
        audio = speak(next(texts), voice)[: max_frames * codec.hop_length]
        truth = codec.encode(audio, sr)[0]
        frames = truth.shape[0]
        ids = _semantic_ids(semantic, audio, sr)
        need = math.ceil(frames / per_id)
        ids = torch.cat([ids, ids[-1:].expand(max(0, need - len(ids)))])[:need]
        full = torch.cat([_semantic_ids(semantic, prompt_audio, sr)[:prompt_ids], ids])[None]
        target = slice(prompt_frames, prompt_frames + frames)
        generated = engine.generate(full, prompt=prompt, decode=decode,
                                    seed=args.seed + j)[0, target].cpu()
        forced = decode_after_level1(engine, full, prompt, truth[:, 0], target, decode,
                                     args.seed + j)
        copied = copy_from_prompt(codec, truth, prompt[0])
        generated_copied = copy_from_prompt(codec, generated, prompt[0])
        scored = [("generated", generated), ("truth L1 + generated finer", forced),
                  ("truth L1 + prompt's finer", copied)]
        if engine.model.lookup is not None:
            scored.append(("truth L1 + lookup's vote", lookup_vote(engine.model, truth,
                                                                   prompt[0])))
            gates.append(copy_gates(engine.model, full, prompt, forced))
        for name, tokens in scored:
            accuracy.setdefault(name, []).append((tokens == truth).float().mean(0).tolist())
        for name, tokens in variants(truth, generated, forced, copied,
                                     generated_copied).items():
            wav = codec.synthesize(codec.dequantize(tokens[None]))[0].numpy()
            clips.setdefault(name, []).append((voice.name, wav))

    refs = _speaker_references(encoder, reference_voices, [next(texts), next(texts)], speak,
                               codec)
    rows = {}
    for name, items in clips.items():
        scores = [speaker_scores(refs, _embed(encoder, wav), voice) for voice, wav in items]
        rows[name] = {"same": round(float(np.mean([s["same"] for s in scores])), 4),
                      "others": round(float(np.mean([s["others"] for s in scores])), 4),
                      "identified": sum(s["rank"] == 1 for s in scores),
                      "mean_rank": round(float(np.mean([s["rank"] for s in scores])), 2),
                      "ranks": [s["rank"] for s in scores]}
    result = {"model": args.model or str(Path(args.assets) / "model"), "voices": args.voices,
              "utterances": args.utterances, "reference_voices": len(refs), "rows": rows,
              "token_accuracy": {k: [round(float(a), 4) for a in np.mean(v, axis=0)]
                                 for k, v in accuracy.items()}}
    if gates:
        result["copy_gate"] = [round(float(g), 4) for g in np.mean(gates, axis=0)]
    print(f"{'':30s} {'same':>6s} {'others':>7s} {'identified':>10s} {'mean rank':>9s}  "
          f"(of {len(refs)} voices, {args.utterances} utterances, {args.voices} voices)")
    for name, r in rows.items():
        print(f"{name:30s} {r['same']:6.3f} {r['others']:7.3f} "
              f"{r['identified']:>5d}/{args.utterances:<4d} {r['mean_rank']:9.2f}")
    for name, acc in result["token_accuracy"].items():
        print(f"token accuracy per level, {name}: {acc}")
    if gates:
        print(f"mean copy gate at levels 2..{cfg.num_quantizers}, truth L1 + generated "
              f"finer: {result['copy_gate']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
