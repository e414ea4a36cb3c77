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

With `ModelConfig.semantic_copy` level 1 has a copy gate too (its vote: the prompt frames
that read the same semantic ids); its offset b_1 and the weight c_1 of the best match (how
much more to trust the prompt where it said the same in the same context) are fitted the
same way, on the states that level 1's iterations pass through: a share of the target's
level-1 codes known (the cosine schedule's shares after 0, 4, 8 and 12 of 16 iterations),
the rest and every finer level masked. `add_semantic_copy` gives a model without level 1's copy one first (the
gate's weight on the hidden state 0, the initial context weights and sharpness), so that
the gate is the fitted offset and match weight alone.

With `ModelConfig.prompt_prior` (`add_prompt_prior` gives a model one, off) every level's
prior weight beta_q and smoothing alpha_q are fitted last, on the same states, to the
likelihood of the copy's output (with the gates just fitted) times the prompt's smoothed
code frequencies to the power beta_q: alpha_q the best of a grid of 13 values 2^-3..2^3,
each with its best beta_q in [0, 4] (the likelihood is concave in beta_q).

    soundstorm calibrate-copy run/model --data tokens/calibration --out calibrated/
    soundstorm calibrate-copy run/model --data tokens/calibration --out calibrated/ \
        --add-semantic-copy --add-prompt-prior
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

import torch
from tqdm import tqdm

REPORT_FILE = "copy-calibration.json"
# Level 1's calibration states: the share of the target's level-1 codes still masked after
# 0, 4, 8 and 12 of the paper's 16 iterations (cos(pi/2 * i/16)).
LEVEL1_MASKED = tuple(math.cos(math.pi / 2 * i / 16) for i in (0, 4, 8, 12))


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
    """For each level q = 2..Q (and 1 with `semantic_copy` or a prompt prior; without the
    copy level 1's `z` is -inf and its `vote` 0), over the target frames that read the
    lookup, in the state(s) in which q is decoded: `z` [N] (the gate's h . a_q,
    without its offset), `logits` [N, C] (the head alone), `vote` [N, C] and `target` [N]
    (the true codes); at level 1 also `match` [N] (each frame's best match m, which the
    gate weighs by c_1 apart from `z`); and for the prompt prior `pair` [N] (the frame's
    utterance) and `counts` [utterances, C] (how often each utterance's reference frames,
    its prompt, hold each code of the level). Level 1's known codes are drawn from a fixed
    seed."""
    C, Q = model.config.codebook_size, model.config.num_quantizers
    lookup = model.lookup
    # level 1: for its copy, or for the prompt prior alone (no copy: gate 0, vote 0)
    first = 1 if lookup.semantic_copy or model.prior is not None else 2
    parts: Dict[int, Dict[str, List[torch.Tensor]]] = {
        q: {"z": [], "logits": [], "vote": [], "target": [], "pair": [], "counts": []}
        for q in range(first, Q + 1)}
    if lookup.semantic_copy:
        parts[1]["match"] = []
    generator = torch.Generator().manual_seed(0)
    for n, (semantic, tokens, P) in enumerate(tqdm(pairs, desc="calibration utterances",
                                                   unit="utt", disable=not progress)):
        for q, part in parts.items():
            part["counts"].append(torch.bincount(tokens[:P, q - 1], minlength=C)[None])
        if first == 1:
            T = tokens.shape[0] - P
            for share in LEVEL1_MASKED:
                x = tokens[None].clone()
                x[0, P:, 1:] = C
                masked = torch.rand(T, generator=generator).argsort()[:max(1, int(share * T))]
                x[0, P + masked, 0] = C
                h, _ = model.hidden(semantic[None], x)
                reads = torch.zeros(T, dtype=torch.bool)
                reads[masked] = True
                part = parts[1]
                if lookup.semantic_copy:
                    weights, best = model.semantic_weights(semantic[None], x, None, 1)
                    reads &= weights[0, P:].sum(dim=1) > 0
                    z = h[0, P:].float() @ lookup.level1_copy_weight.float()
                    vote = lookup.vote(x, weights, 1)[0, P:].float()
                    part["match"].append(best[0, P:].float()[reads])
                else:
                    z = torch.full((T,), -math.inf)
                    vote = torch.zeros(T, C)
                part["z"].append(z[reads])
                part["logits"].append(model.logits(h, 1)[0, P:].float()[reads])
                part["vote"].append(vote[reads])
                part["target"].append(tokens[P:, 0][reads])
                part["pair"].append(torch.full((int(reads.sum()),), n))
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
            part["pair"].append(torch.full((int(reads.sum()),), n))
    return {q: {k: torch.cat(v) for k, v in part.items()} for q, part in parts.items()}


def mixture_nll(data: Dict[str, torch.Tensor], bias: float) -> float:
    """Mean negative log-likelihood of the true codes under the copy with offset `bias`."""
    g = torch.sigmoid(data["z"].double() + bias)
    p, v = _true_code_probabilities(data)
    return float(-torch.log((p + g * (v - p)).clamp_min(1e-300)).mean())


def _true_code_probabilities(data: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The head's and the vote's probability of each true code, float64 [N] each: all that
    the likelihood needs, computed once per `data` (kept in it under "_picked")."""
    if "_picked" not in data:
        target = data["target"][:, None]
        p = torch.softmax(data["logits"].double(), dim=1).gather(1, target)[:, 0]
        data["_picked"] = torch.stack([p, data["vote"].double().gather(1, target)[:, 0]])
    return data["_picked"][0], data["_picked"][1]


def mixture_accuracy(data: Dict[str, torch.Tensor], bias: float) -> float:
    """How often the copy's most likely code (the greedy choice) is the true one."""
    g = torch.sigmoid(data["z"] + bias)[:, None]
    p = torch.softmax(data["logits"], dim=1)
    return float(((p + g * (data["vote"] - p)).argmax(1) == data["target"]).float().mean())


def fit_bias(data: Dict[str, torch.Tensor], low: float = -12.0, high: float = 12.0) -> float:
    """The offset in [low, high] of least `mixture_nll`: the best of a grid of 49 points,
    refined by golden-section search between its neighbours."""
    return _minimise(lambda b: mixture_nll(data, b), low, high, 49, 40)


def _minimise(f, low: float, high: float, points: int, rounds: int) -> float:
    """The x in [low, high] of least f(x): the best of a grid of `points`, refined by
    `rounds` of golden-section search between its neighbours."""
    grid = [low + (high - low) * i / (points - 1) for i in range(points)]
    losses = [f(x) for x in grid]
    best = min(range(points), key=losses.__getitem__)
    a, b = grid[max(0, best - 1)], grid[min(points - 1, best + 1)]
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(rounds):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(d)
    found = (a + b) / 2
    return found if f(found) <= losses[best] else grid[best]


def copy_log_probs(data: Dict[str, torch.Tensor], bias: float) -> torch.Tensor:
    """The copy's output log-probabilities float32 [N, C] with offset `bias` (`data` from
    `collect`, with the match term already in `z`): log((1 - g) softmax(logits) + g vote)."""
    g = torch.sigmoid(data["z"] + bias)[:, None]
    p = torch.softmax(data["logits"], dim=1)
    return torch.log((p + g * (data["vote"] - p)).clamp_min(torch.finfo(torch.float32).tiny))


def prior_fit_figures(log_probs: torch.Tensor, data: Dict[str, torch.Tensor], weight: float,
                      smoothing: float) -> Tuple[float, float]:
    """(mean negative log-likelihood, greedy accuracy) of the true codes under `log_probs`
    [N, C] (`copy_log_probs`) times the prompt prior of weight beta and smoothing alpha:
    softmax(log_probs + beta log((n_c + alpha) / (N + alpha C)))."""
    return _prior_figures(log_probs, _prior_table(data, smoothing), data["target"], weight)


def _prior_table(data: Dict[str, torch.Tensor], smoothing: float) -> torch.Tensor:
    """Every frame's log prior log((n_c + alpha) / (N + alpha C)), float32 [N, C]."""
    counts = data["counts"].double()
    table = torch.log((counts + smoothing)
                      / (counts.sum(dim=1, keepdim=True) + smoothing * counts.shape[1]))
    return table.float()[data["pair"]]


def _prior_figures(log_probs: torch.Tensor, table: torch.Tensor, target: torch.Tensor,
                   weight: float) -> Tuple[float, float]:
    z = log_probs + weight * table
    picked = z.gather(1, target[:, None])[:, 0]
    nll = float((torch.logsumexp(z, dim=1) - picked).double().mean())
    return nll, float((z.argmax(dim=1) == target).double().mean())


# The prompt prior's smoothing grid: 2^-3 .. 2^3 in half-octaves.
PRIOR_SMOOTHING = tuple(2.0 ** (k / 2) for k in range(-6, 7))
PRIOR_MAX_WEIGHT = 4.0


def fit_prior(log_probs: torch.Tensor, data: Dict[str, torch.Tensor]) -> Tuple[float, float]:
    """The prompt prior's (beta, alpha) of least `prior_fit_figures` likelihood: alpha the
    best of `PRIOR_SMOOTHING`, each with its beta in [0, PRIOR_MAX_WEIGHT]."""
    best = None
    log_probs = log_probs.float()
    for alpha in PRIOR_SMOOTHING:
        table = _prior_table(data, alpha)
        beta = _minimise(lambda w: _prior_figures(log_probs, table, data["target"], w)[0],
                         0.0, PRIOR_MAX_WEIGHT, 9, 20)
        loss = _prior_figures(log_probs, table, data["target"], beta)[0]
        if best is None or loss < best[0]:
            best = (loss, beta, alpha)
    return best[1], best[2]


def with_semantic_copy(model):
    """`model` (with a prompt lookup) with level 1's copy added where it has none: the
    same weights, the new parameters at their initial values (`PromptLookup`)."""
    from soundstorm.engine.model import SEMANTIC_COPY_KEYS
    return _grown(model, "semantic_copy", SEMANTIC_COPY_KEYS)


def with_prompt_prior(model):
    """`model` with the prompt prior added where it has none: the same weights, the prior
    off (weight 0, smoothing 1: `PromptPrior`)."""
    from soundstorm.engine.model import PROMPT_PRIOR_KEYS
    return _grown(model, "prompt_prior", PROMPT_PRIOR_KEYS)


def _grown(model, field: str, keys):
    """`model` with the optional part `field` of its config turned on (its parameters
    `keys` at their initial values), or `model` itself where it is on already."""
    import dataclasses

    from soundstorm.engine.model import SoundStorm

    if getattr(model.config, field):
        return model
    grown = SoundStorm(dataclasses.replace(model.config, **{field: True})).eval()
    missing, unexpected = grown.load_state_dict(model.state_dict(), strict=False)
    assert set(missing) == set(keys) and not unexpected, (missing, unexpected)
    return grown


def _gate_bias(lookup, q: int) -> torch.Tensor:
    """The offset b_q of level q's copy gate, a 0-d view that can be written."""
    return lookup.level1_copy_bias if q == 1 else lookup.copy_bias[q - 2]


def fit_match_and_bias(data: Dict[str, torch.Tensor], high: float = 8.0,
                       points: int = 33) -> Tuple[float, float]:
    """Level 1's (c_1, b_1) of least `mixture_nll` with the gate's logit z + c_1 m + b_1
    (`data` from `collect`, with `match` m): c_1 the best of `points` values in [0, high]
    (a prompt that matches better is never trusted less), each with its `fit_bias`."""
    best = None
    _true_code_probabilities(data)          # once: every shifted copy below shares it
    for i in range(points):
        c = high * i / (points - 1)
        shifted = {**data, "z": data["z"] + c * data["match"]}
        b = fit_bias(shifted)
        loss = mixture_nll(shifted, b)
        if best is None or loss < best[0]:
            best = (loss, c, b)
    return best[1], best[2]


def calibrate_copy(model_dir: Union[str, Path], data: Union[str, Path],
                   out: Union[str, Path], prompt_seconds: float = 3.0,
                   add_semantic_copy: bool = False, add_prompt_prior: bool = False,
                   progress: bool = False) -> Dict[str, Any]:
    """Fit the copy gates' offsets of the model in `model_dir` on the token corpus `data`
    (voices the model was not trained on; every speaker needs two utterances) and save
    the model, with those offsets and nothing else changed, in `out`, with a report
    (`copy-calibration.json`: per level the offset, mean gate, negative log-likelihood
    and greedy accuracy before and after). With `add_semantic_copy`, a model without level
    1's copy is given one first (`with_semantic_copy`) and its offset fitted too. A model
    with a prompt prior (or given one by `add_prompt_prior`: `with_prompt_prior`) has
    every level's prior weight and smoothing fitted after the gates; the report gives
    them per level under "prior". Returns the report."""
    from soundstorm.engine.model import SoundStorm
    from soundstorm.training.corpus import open_corpus

    if isinstance(prompt_seconds, bool) or not isinstance(prompt_seconds, (int, float)) \
            or not prompt_seconds > 0 or not math.isfinite(prompt_seconds):
        raise ValueError(f"prompt_seconds must be a positive number, got {prompt_seconds!r}")
    for name, flag in (("add_semantic_copy", add_semantic_copy),
                       ("add_prompt_prior", add_prompt_prior)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    model = SoundStorm.from_pretrained(model_dir, dtype=torch.float32).eval()
    if model.lookup is None:
        raise ValueError(f"the model in {model_dir} has no prompt lookup (prompt_lookup = 0): "
                         "there is no copy gate to calibrate")
    added = add_semantic_copy and not model.config.semantic_copy
    if added:
        model = with_semantic_copy(model)
    prior_added = add_prompt_prior and not model.config.prompt_prior
    if prior_added:
        model = with_prompt_prior(model)
    cfg = model.config
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
            head_alone = {"nll": round(float(torch.nn.functional.cross_entropy(
                part["logits"], part["target"])), 4), "accuracy": round(float(
                    (part["logits"].argmax(1) == part["target"]).float().mean()), 4)}
            if q == 1 and not cfg.semantic_copy:    # no copy at level 1: the prior alone
                levels["1"] = {"frames": int(part["target"].numel()), "head_alone": head_alone,
                               "prior": _calibrate_prior(model.prior, 1,
                                                         copy_log_probs(part, 0.0), part)}
                continue
            old = float(_gate_bias(model.lookup, q))
            if q == 1:       # the match weight c_1 moves z: fold it in, then fit both
                old_c = float(model.lookup.level1_copy_match)
                new_c, new = fit_match_and_bias(part)
                before = {**part, "z": part["z"] + old_c * part["match"]}
                after = {**part, "z": part["z"] + new_c * part["match"]}
                if mixture_nll(before, old) <= mixture_nll(after, new):
                    new_c, new, after = old_c, old, before
                model.lookup.level1_copy_match.fill_(new_c)
            else:
                new = fit_bias(part)
                if mixture_nll(part, old) <= mixture_nll(part, new):
                    new = old
                before = after = part
            states = ((before, old), (after, new))
            levels[str(q)] = {
                "frames": int(part["target"].numel()),
                "bias": [round(old, 4), round(new, 4)],
                "mean_gate": [round(float(torch.sigmoid(d["z"] + b).mean()), 4)
                              for d, b in states],
                "nll": [round(mixture_nll(d, b), 4) for d, b in states],
                "accuracy": [round(mixture_accuracy(d, b), 4) for d, b in states],
                "head_alone": head_alone}
            if q == 1:
                levels["1"]["match_weight"] = [round(old_c, 4), round(new_c, 4)]
            _gate_bias(model.lookup, q).fill_(new)
            if model.prior is not None:
                levels[str(q)]["prior"] = _calibrate_prior(model.prior, q,
                                                           copy_log_probs(after, new), after)
    out = Path(out)
    model.save_pretrained(out)
    report = {"model": str(model_dir), "data": str(data), "utterances": len(pairs),
              "prompt_seconds": prompt_seconds, "semantic_copy_added": added,
              "prompt_prior_added": prior_added,
              "note": "per level: [before, after] calibration",
              "levels": levels}
    (out / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    return report


def _calibrate_prior(prior, q: int, log_probs: torch.Tensor,
                     data: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """Fit level q's prompt prior (`fit_prior`) on the copy's output `log_probs`, keep the
    old values unless the fit is better, write them into `prior`; the report's entry."""
    old = (float(prior.weight[q - 1]), float(prior.log_smoothing[q - 1].exp()))
    new = fit_prior(log_probs, data)
    before = prior_fit_figures(log_probs, data, *old)
    after = prior_fit_figures(log_probs, data, *new)
    if before[0] <= after[0]:
        new, after = old, before
    prior.weight[q - 1] = new[0]
    prior.log_smoothing[q - 1] = math.log(new[1])
    return {"weight": [round(old[0], 4), round(new[0], 4)],
            "smoothing": [round(old[1], 4), round(new[1], 4)],
            "nll": [round(before[0], 4), round(after[0], 4)],
            "accuracy": [round(before[1], 4), round(after[1], 4)]}
