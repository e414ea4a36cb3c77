"""The training loop: masked-token training of a SoundStorm model (paper §3.2, §4.1).

    from soundstorm.training import TrainConfig, train
    summary = train(TrainConfig.preset("tiny", data="corpus/", out="run/"))

One optimizer step consumes one global batch of `batch_size` windows, split over the
processes of a torchrun launch and `grad_accum` micro-batches. The loss is the mean
cross-entropy over all masked level-q tokens of the global batch, computed exactly
whatever the split (the masked-token count is summed over ranks before the backward
pass), so a 2-process run reproduces a 1-process run with the same global batch.

Every step checks that the loss and the gradient norm are finite before the weights are
updated; a step where they are not stops the run with `TrainingDivergedError`, before
any checkpoint of that step is written.

A run resumes from a checkpoint that rank 0 alone chooses and broadcasts (`agree_on_resume`);
every rank loads that one, or all of them stop with an error (`load_resume_checkpoint`).
Rank 0 chooses the newest checkpoint that loads: a newer one that does not is named in a
warning, moved aside (`step-XXXXXXXX.broken`) and skipped. A checkpoint records the data
it was trained on (`data_identity`); resuming with other data or batch settings is refused
unless `allow_changed_data` is set.

The run directory (`out`) receives:
    train_config.json    the settings of the run's first invocation; each later one (a
                         resume, a longer --steps) writes train_config.step-XXXXXXXX.json,
                         named after the step it starts from, and never overwrites
    metrics.jsonl        one JSON object per log interval ("loss", "acc_level", ...) and
                         per validation ("val_loss", "val_acc_level", ...)
    checkpoints/         step-XXXXXXXX/ directories (see `soundstorm.training.checkpoint`)
    model/               the final model: config.json + model.safetensors, what
                         `Engine(out / "model")` loads
    curves.png           loss and per-level accuracy curves
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from soundstorm.engine.model import WEIGHTS_FILE, SoundStorm
from soundstorm.training import distributed as dist_utils
from soundstorm.training.checkpoint import (checkpoint_name, checkpoint_step,
                                            list_checkpoints, load_checkpoint, remove_partial,
                                            save_checkpoint)
from soundstorm.training.config import TrainConfig
from soundstorm.training.corpus import (TokenCorpus, corpus_fingerprint, join_utterances,
                                        open_corpus)
from soundstorm.training.data import (Batch, DataPosition, TrainStream, WindowDataset,
                                      WindowSampler, collate, split_indices)
from soundstorm.training.distributed import DistInfo
from soundstorm.training.masking import level_weights_at, masked_loss, sample_mask
from soundstorm.training.paths import check_output_dir
from soundstorm.training.plot import plot_curves
from soundstorm.training.schedule import WarmupExponentialDecay

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "train_config.json"
BROKEN_SUFFIX = ".broken"
VAL_SEED_OFFSET = 0x7A1  # validation windows and masks: fixed, and unlike training's
NO_CHECKPOINT = -1       # a resume decision: start from step 0
_UNDECIDED = -2          # rank 0 could not decide where to resume from (it raises why)
# The settings that decide the training data stream: a resumed run must share them.
DATA_SETTINGS = ("batch_size", "seed", "val_fraction", "min_seconds", "max_seconds",
                 "bucket_batches", "join_utterances")
# What a checkpoint saved before a data setting existed ran with.
_DATA_SETTING_DEFAULTS = {"join_utterances": 1}


class TrainingSetupError(ValueError):
    """Settings that cannot work together, found before any training step."""


class ResumeError(ValueError):
    """A rank of a launch cannot load the checkpoint that rank 0 chose to resume from."""


class TrainingDivergedError(RuntimeError):
    """The loss or the gradient norm of a step is not finite; the run stopped there."""


class ResumeWarning(UserWarning):
    """A checkpoint was skipped, or a resume goes on with changed data settings."""


def check_corpus_matches(corpus: TokenCorpus, config: TrainConfig, what: str) -> None:
    model = config.model_config()
    wrong = [f"{k}: corpus {getattr(corpus.meta, k)!r}, model {getattr(model, k)!r}"
             for k in ("num_quantizers", "codebook_size", "semantic_vocab_size",
                       "frame_rate", "semantic_rate")
             if float(getattr(corpus.meta, k)) != float(getattr(model, k))]
    if wrong:
        source = (f"the model of --init-from {config.init_from}" if config.init_from
                  else f"model {config.model!r}")
        raise TrainingSetupError(f"{what} {corpus.directory} does not fit {source}: "
                                 + "; ".join(wrong)
                                 + " (choose another preset or set model_overrides)")


def build_optimizer(model: SoundStorm, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices and embeddings only."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def build_schedule(cfg: TrainConfig) -> WarmupExponentialDecay:
    return WarmupExponentialDecay(cfg.lr, cfg.warmup_steps, cfg.decay_steps, cfg.decay_rate)


def data_identity(cfg: TrainConfig, fingerprint: str) -> Dict[str, Any]:
    """What a checkpoint records of the data stream it was trained on."""
    return {"data": str(Path(cfg.data).resolve()), "data_sha256": fingerprint,
            **{k: getattr(cfg, k) for k in DATA_SETTINGS}}


def data_changes(saved: Dict[str, Any], now: Dict[str, Any]) -> List[str]:
    """How the data stream `now` differs from the one a checkpoint recorded (the corpus
    path alone may change: a moved corpus is the same data)."""
    changes = []
    if saved.get("data_sha256") != now["data_sha256"]:
        changes.append(f"data: checkpoint {saved.get('data')} (sha256 "
                       f"{str(saved.get('data_sha256'))[:12]}), now {now['data']} "
                       f"(sha256 {now['data_sha256'][:12]})")
    for k in DATA_SETTINGS:
        was = saved.get(k, _DATA_SETTING_DEFAULTS.get(k))
        if was != now[k]:
            changes.append(f"{k}: checkpoint {was!r}, now {now[k]!r}")
    return changes


def load_init_weights(model: SoundStorm, directory: str) -> None:
    """Copy the weights of model directory `directory` into `model`, upcast as the engine
    loads them (a model may store float16 or bfloat16 weights). A prompt lookup or a
    prompt prior that `model` has and the directory's model lacks keeps its
    initialisation."""
    source = SoundStorm.from_pretrained(directory, dtype=torch.float32)
    added = model.lookup is not None and source.lookup is None
    prior_added = model.prior is not None and source.prior is None
    with torch.no_grad():
        state = source.state_dict()
        for name, tensor in model.state_dict().items():
            if (added and name.startswith("lookup.")) or (prior_added
                                                          and name.startswith("prior.")):
                continue
            tensor.copy_(state[name])


def _nonfinite_tensor(tensors: Dict[str, torch.Tensor]) -> Optional[str]:
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            return name
    return None


class _Stats:
    """Per-level sums (loss, correct, count) of masked tokens, as float64 [3, Q]."""

    def __init__(self, levels: int, device: torch.device):
        self.sums = torch.zeros(3, levels, dtype=torch.float64, device=device)

    def add(self, level: torch.Tensor, loss_sum: torch.Tensor, correct: torch.Tensor,
            count: torch.Tensor) -> None:
        idx = level - 1
        for row, values in enumerate((loss_sum.detach(), correct, count)):
            self.sums[row].index_add_(0, idx, values.to(torch.float64))

    def summary(self, prefix: str = "") -> Dict[str, Any]:
        loss, correct, count = self.sums.cpu().tolist()
        total = sum(count)
        return {
            f"{prefix}loss": sum(loss) / total if total else float("nan"),
            f"{prefix}acc": sum(correct) / total if total else float("nan"),
            f"{prefix}loss_level": [l / c if c else None for l, c in zip(loss, count)],
            f"{prefix}acc_level": [k / c if c else None for k, c in zip(correct, count)],
            f"{prefix}tokens": int(total),
        }


def _warn_if_one_voice(corpus: TokenCorpus, join: int, name: Any) -> None:
    """Warn that joining `corpus` (`join` > 1) runs every utterance into any other, when
    they all share one speaker id (a corpus tokenized without speaker names)."""
    if join > 1 and len(corpus) > 1 and len(np.unique(corpus.speaker)) == 1:
        warnings.warn(f"join_utterances = {join} joins the {len(corpus)} utterances of {name} "
                      f"as one voice: they all have speaker id {int(corpus.speaker[0])} (give "
                      "tokenize speaker names to keep joins within a voice)", stacklevel=3)


class Trainer:
    """Builds everything a run needs from a `TrainConfig`, checking it all first."""

    def __init__(self, config: TrainConfig):
        self.config = cfg = config
        if cfg.data is None:
            raise TrainingSetupError("data is not set: give the corpus directory (--data)")
        if cfg.out is None:
            raise TrainingSetupError("out is not set: give the run directory (--out)")
        check_output_dir(cfg.out, "out =")
        if cfg.init_from is not None and not (Path(cfg.init_from) / WEIGHTS_FILE).is_file():
            raise TrainingSetupError(f"init_from = {cfg.init_from!r}: no {WEIGHTS_FILE} there; "
                                     "expected a model directory (config.json + "
                                     f"{WEIGHTS_FILE})")
        self.dist = dist_utils.setup(cfg.device)
        d = self.dist
        chunks = d.world_size * cfg.grad_accum
        if cfg.batch_size % chunks:
            raise TrainingSetupError(
                f"batch_size = {cfg.batch_size} must be divisible by processes x grad_accum = "
                f"{d.world_size} x {cfg.grad_accum} = {chunks}")
        if cfg.dtype == "bfloat16" and d.device.type != "cuda":
            raise TrainingSetupError("dtype = 'bfloat16' (autocast) needs a CUDA device; "
                                     "CPU training runs in float32")
        self.autocast = d.device.type == "cuda" and cfg.dtype in ("auto", "bfloat16")
        self.model_config = cfg.model_config()

        self.corpus = open_corpus(cfg.data, on_bad_shard=cfg.on_bad_shard)
        check_corpus_matches(self.corpus, cfg, "corpus")
        self.data_identity = data_identity(cfg, corpus_fingerprint(cfg.data))
        train_idx, val_idx = split_indices(len(self.corpus), cfg.val_fraction, cfg.seed)
        _warn_if_one_voice(self.corpus, cfg.join_utterances, cfg.data)
        # Joins stay within the split, so no validation audio is trained on.
        self.corpus = join_utterances(self.corpus, cfg.join_utterances,
                                      np.isin(np.arange(len(self.corpus)), val_idx))
        lo, hi = cfg.window_frames()
        self.sampler = WindowSampler(self.corpus, cfg.seed, lo, hi, cfg.batch_size,
                                     indices=train_idx, bucket_batches=cfg.bucket_batches)
        self.val_sampler: Optional[WindowSampler] = None
        if cfg.val_data is not None:
            val_corpus = open_corpus(cfg.val_data, on_bad_shard=cfg.on_bad_shard)
            check_corpus_matches(val_corpus, cfg, "validation corpus")
            _warn_if_one_voice(val_corpus, cfg.join_utterances, cfg.val_data)
            val_corpus = join_utterances(val_corpus, cfg.join_utterances)
            val_idx = np.arange(len(val_corpus))
        elif cfg.val_fraction:
            val_corpus = self.corpus
            if len(val_idx) == 0:
                raise TrainingSetupError(f"val_fraction = {cfg.val_fraction} of "
                                         f"{len(self.corpus)} utterances holds none out")
        if cfg.val_data is not None or cfg.val_fraction:
            self.val_sampler = WindowSampler(val_corpus, cfg.seed + VAL_SEED_OFFSET, lo, hi,
                                             cfg.batch_size // chunks, indices=val_idx,
                                             drop_last=False)
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.broken: List[Tuple[Path, str]] = []   # skipped checkpoints (rank 0 only)
        resume = agree_on_resume(cfg.resume, self.ckpt_dir, d, check=self.check_checkpoint,
                                 broken=self.broken)
        self.resume_from, self.resume_step = resume if resume is not None else (None, None)

    def check_checkpoint(self, path: Path) -> None:
        """Raise why checkpoint `path` cannot be resumed from, if it cannot: everything a
        resume reads is read here, on the CPU, into a scratch model and optimizer."""
        with torch.device("meta"):
            scratch = SoundStorm(self.model_config)
        scratch = scratch.to_empty(device="cpu")
        optimizer = build_optimizer(scratch, self.config)
        state = load_checkpoint(path, scratch, optimizer, restore_rng=False)
        bad = _nonfinite_tensor(dict(scratch.named_parameters()))
        if bad is not None:
            raise ValueError(f"its weights hold NaN or infinity ({bad})")
        opt_tensors = {f"{i}.{k}": v for i, s in optimizer.state_dict()["state"].items()
                       for k, v in s.items() if isinstance(v, torch.Tensor)}
        bad = _nonfinite_tensor(opt_tensors)
        if bad is not None:
            raise ValueError(f"its optimizer state holds NaN or infinity ({bad})")
        build_schedule(self.config).load_state_dict(state["scheduler"])
        DataPosition(**state["data"])

    # -- the run ----------------------------------------------------------------------
    def run(self) -> Dict[str, Any]:
        cfg, d = self.config, self.dist
        from tqdm import tqdm

        torch.manual_seed(cfg.seed)
        model = SoundStorm(self.model_config).to(d.device).train()
        optimizer = build_optimizer(model, cfg)
        schedule = build_schedule(cfg)
        step, position = 0, DataPosition()
        # Everything is read and checked before anything is written.
        if self.resume_from is not None:
            state = load_resume_checkpoint(self.resume_from, self.resume_step, model, optimizer, d)
            self._check_same_data(state)
            schedule.load_state_dict(state["scheduler"])
            position = DataPosition(**state["data"])
            step = state["step"]
        elif cfg.init_from is not None:
            load_init_weights(model, cfg.init_from)
        export = self.out / "model"
        if step >= cfg.steps:
            return finished_run(model, export, step, cfg.steps, self.out, d)
        open_run_dir(self.out, self.ckpt_dir, self.broken, cfg.to_dict(), step, d)
        start_step = step

        net = model
        if d.distributed:
            net = DistributedDataParallel(
                model, device_ids=[d.device] if d.device.type == "cuda" else None)
        stream = TrainStream(self.sampler, d.rank, d.world_size, cfg.grad_accum,
                             cfg.num_workers)(position)
        Q = self.model_config.num_quantizers
        stats = _Stats(Q, d.device)
        bar = tqdm(total=cfg.steps, initial=step, desc="training", unit="step",
                   disable=not (cfg.progress and d.is_main), dynamic_ncols=True)
        interval_start, interval_steps = time.perf_counter(), 0
        last: Dict[str, Any] = {}
        last_val: Optional[Dict[str, Any]] = None
        while step < cfg.steps:
            position, micro = next(stream)
            step += 1
            lr = schedule.step(optimizer)
            grad_norm = self._train_step(net, model, optimizer, micro, stats, step)
            interval_steps += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                dist_utils.all_reduce_sum(stats.sums, d)
                elapsed = time.perf_counter() - interval_start
                last = {"step": step, "epoch": position.epoch, "lr": lr,
                        "grad_norm": grad_norm, **stats.summary(),
                        "steps_per_s": interval_steps / elapsed if elapsed > 0 else None}
                bar.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last['acc']:.3f}",
                                lr=f"{lr:.2e}")
                if d.is_main:
                    _append_metrics(self.out / METRICS_FILE, last)
                stats = _Stats(Q, d.device)
                interval_start, interval_steps = time.perf_counter(), 0
            if self.val_sampler is not None and (step % cfg.val_every == 0 or step == cfg.steps):
                last_val = {"step": step, **self.validate(model)}
                if d.is_main:
                    _append_metrics(self.out / METRICS_FILE, last_val)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                bad = _nonfinite_tensor(dict(model.named_parameters()))
                if bad is not None:   # the same weights on every rank: all stop here
                    raise TrainingDivergedError(
                        f"training diverged at step {step}: the weights hold NaN or infinity "
                        f"({bad}) after the update; no checkpoint of step {step} was written "
                        f"({self._newest_checkpoint()}). Lower --lr or check the data")
                if d.is_main:
                    save_checkpoint(self.ckpt_dir, step, model, optimizer, {
                        "scheduler": schedule.state_dict(),
                        "data": {"epoch": position.epoch, "batches_done": position.batches_done},
                        "data_identity": self.data_identity,
                        "train_config": cfg.to_dict(), "world_size": d.world_size},
                        keep=cfg.keep_checkpoints)
                dist_utils.barrier(d)
        bar.close()

        if d.is_main:
            model.save_pretrained(export)
            records = read_metrics(self.out / METRICS_FILE)
            plot_curves(records, self.out / "curves.png")
        dist_utils.barrier(d)
        return {"step": step, "steps": cfg.steps, "steps_run": step - start_step,
                "model": str(export), "train": last, "validation": last_val,
                "out": str(self.out)}

    def _check_same_data(self, state: Dict[str, Any]) -> None:
        saved = state.get("data_identity")
        if not isinstance(saved, dict):
            return   # a checkpoint from before data identities were recorded
        changes = data_changes(saved, self.data_identity)
        if not changes:
            return
        what = (f"checkpoint {self.resume_from} was trained on another data stream: "
                + "; ".join(changes))
        if not self.config.allow_changed_data:
            raise TrainingSetupError(
                f"{what}. Resuming would silently continue a different run: give the same "
                "data and settings, a new --out, or --allow-changed-data to continue anyway")
        if self.dist.is_main:
            warnings.warn(f"{what}; continuing as --allow-changed-data asks", ResumeWarning,
                          stacklevel=2)

    def _newest_checkpoint(self) -> str:
        found = list_checkpoints(self.ckpt_dir)
        return f"the newest is {found[-1]}" if found else "there is none"

    def _train_step(self, net: torch.nn.Module, model: SoundStorm,
                    optimizer: torch.optim.Optimizer, micro: List[Batch], stats: _Stats,
                    step: int) -> float:
        cfg, d = self.config, self.dist
        mask_id = self.model_config.mask_id
        micro = [b.to(d.device) for b in micro]
        weights = level_weights_at(step - 1, cfg.steps, cfg.level_weights, cfg.level_weights_end,
                                   self.model_config.num_quantizers)
        masked = [sample_mask(b.tokens, b.lengths, b.keys, cfg.seed, mask_id, weights,
                              cfg.finer_full_mask) for b in micro]
        # The loss is a mean over every masked token of the global batch: count them first.
        count = torch.stack([m.loss_mask.sum() for m in masked]).sum().to(torch.float64)
        total = dist_utils.all_reduce_sum(count.reshape(1), d)
        scale = d.world_size / total.item()   # DDP averages gradients over ranks
        this_step = _Stats(self.model_config.num_quantizers, d.device)
        for i, (b, m) in enumerate(zip(micro, masked)):
            sync = i == len(micro) - 1
            ctx = net.no_sync() if d.distributed and not sync else contextlib.nullcontext()
            with ctx:
                with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                    logits = net(b.semantic, m.inputs, b.lengths, level=m.level)
                parts = masked_loss(logits, m)
                (parts.loss_sum.sum() * scale).backward()
            this_step.add(m.level, parts.loss_sum, parts.correct, parts.count)
        stats.sums += this_step.sums
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
        # Every rank sees the step's global loss, so every rank stops at the same step.
        summary = _reduced(this_step, d).summary()
        if not (math.isfinite(summary["loss"]) and math.isfinite(grad_norm)):
            levels = ", ".join("-" if x is None else f"{x:.4g}" for x in summary["loss_level"])
            raise TrainingDivergedError(
                f"training diverged at step {step}: loss {summary['loss']:.4g} (per level: "
                f"{levels}), gradient norm {grad_norm:.4g}; the run stopped before updating "
                f"the weights, and no checkpoint of step {step} was written "
                f"({self._newest_checkpoint()}). Lower --lr, raise --warmup-steps or check "
                "the data")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm

    @torch.no_grad()
    def validate(self, model: SoundStorm) -> Dict[str, Any]:
        """Loss and accuracy per level on the validation windows (fixed windows and masks)."""
        cfg, d = self.config, self.dist
        sampler = self.val_sampler
        model.eval()
        stats = _Stats(self.model_config.num_quantizers, d.device)
        batches = sampler.global_batches(0)
        if cfg.val_batches:
            batches = batches[:cfg.val_batches * d.world_size]
        dataset = WindowDataset(sampler.corpus)
        for windows in batches[d.rank::d.world_size]:
            b = collate([dataset[w] for w in windows]).to(d.device)
            m = sample_mask(b.tokens, b.lengths, b.keys, cfg.seed + VAL_SEED_OFFSET,
                            self.model_config.mask_id)
            with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                logits = model(b.semantic, m.inputs, b.lengths, level=m.level)
            parts = masked_loss(logits, m)
            stats.add(m.level, parts.loss_sum, parts.correct, parts.count)
        dist_utils.all_reduce_sum(stats.sums, d)
        model.train()
        return stats.summary("val_")


def _reduced(stats: _Stats, info: DistInfo) -> _Stats:
    """A copy of `stats` summed over all ranks."""
    total = _Stats(stats.sums.shape[1], stats.sums.device)
    total.sums.copy_(stats.sums)
    dist_utils.all_reduce_sum(total.sums, info)
    return total


# -- the run directory ----------------------------------------------------------------
def config_path(out: Path, step: int) -> Path:
    """Where an invocation starting at `step` writes its settings: train_config.json for
    the run's first invocation, else train_config.step-XXXXXXXX[.N].json (never an
    existing file)."""
    first = out / CONFIG_FILE
    if not first.exists():
        return first
    base = f"train_config.{checkpoint_name(step)}"
    path, n = out / f"{base}.json", 2
    while path.exists():
        path, n = out / f"{base}.{n}.json", n + 1
    return path


def finished_run(model: Any, export: Path, step: int, steps: int, out: Path,
                 info: DistInfo) -> Dict[str, Any]:
    """A run already at its target `steps`: rank 0 exports the model if it is not there
    yet, every rank waits, and the summary says no step ran."""
    if info.is_main and not (export / WEIGHTS_FILE).is_file():
        model.save_pretrained(export)
    dist_utils.barrier(info)
    return {"step": step, "steps": steps, "steps_run": 0, "model": str(export),
            "train": None, "validation": None, "out": str(out)}


def open_run_dir(out: Path, ckpt_dir: Path, broken: List[Tuple[Path, str]],
                 settings: Dict[str, Any], step: int, info: DistInfo) -> None:
    """Before a run's first step (rank 0 writes, every rank waits): the run directory, no
    partial checkpoint left, the checkpoints that do not load moved aside, this
    invocation's settings written, and the metrics cut back to `step`."""
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        remove_partial(ckpt_dir)
        for path, _ in broken:
            _move_aside(path)
        _write_json(config_path(out, step), settings)
        _truncate_metrics(out / METRICS_FILE, step)
    dist_utils.barrier(info)


def _move_aside(path: Path) -> Path:
    """Rename a checkpoint that does not load to `<name>.broken` (or .broken-2, ...)."""
    target, n = path.with_name(path.name + BROKEN_SUFFIX), 2
    while target.exists():
        target, n = path.with_name(f"{path.name}{BROKEN_SUFFIX}-{n}"), n + 1
    path.rename(target)
    return target


# -- where to resume from -------------------------------------------------------------
def choose_resume(mode: str, ckpt_dir: Path, check: Optional[Callable[[Path], None]] = None,
                  broken: Optional[List[Tuple[Path, str]]] = None) -> int:
    """The step to resume from as this process sees the file system, or NO_CHECKPOINT.

    mode: the `resume` setting: 'never' (and `ckpt_dir` must hold no checkpoint), 'auto'
    (the newest complete checkpoint in `ckpt_dir` that loads, if any) or a checkpoint
    directory.
    check: raises why a checkpoint cannot be resumed from (see `Trainer.check_checkpoint`);
    without it a checkpoint only needs a readable step in its state.json.
    broken: with mode 'auto', receives (path, reason) for each newer checkpoint skipped
    because it does not load; each is also named in a ResumeWarning.
    """
    if mode == "never":
        if list_checkpoints(ckpt_dir):
            raise TrainingSetupError(
                f"{ckpt_dir} already holds checkpoints and resume = 'never'; choose a "
                "new out directory or resume ('auto')")
        return NO_CHECKPOINT
    if mode == "auto":
        found = list_checkpoints(ckpt_dir)
        problems = []
        for path in reversed(found):
            step, problem = _try_checkpoint(path, check)
            if problem is None:
                return step
            problems.append((path, problem))
            if broken is not None:
                broken.append((path, problem))
            warnings.warn(f"checkpoint {path} does not load ({problem}); it is moved aside to "
                          f"{path.name}{BROKEN_SUFFIX} and the previous checkpoint is tried",
                          ResumeWarning, stacklevel=2)
        if problems:
            raise TrainingSetupError(
                f"none of the {len(found)} checkpoints in {ckpt_dir} loads: "
                + "; ".join(f"{p.name}: {why}" for p, why in problems)
                + ". Move them away to start over, or give another out directory")
        return NO_CHECKPOINT
    path = Path(mode)
    if not (path / "state.json").is_file():
        raise TrainingSetupError(f"resume = {mode!r} is not a complete checkpoint directory "
                                 "(no state.json)")
    step, problem = _try_checkpoint(path, check)
    if problem is not None:
        raise TrainingSetupError(f"resume = {mode!r}: the checkpoint does not load: {problem}")
    return step


def _try_checkpoint(path: Path, check: Optional[Callable[[Path], None]]) -> Tuple[int, Optional[str]]:
    """(its step, None) for a checkpoint that passes `check`, else (-1, why not)."""
    try:
        step = checkpoint_step(path)
        if check is not None:
            check(path)
    except Exception as e:   # whatever stops it loading makes it unusable
        return -1, str(e) or type(e).__name__
    return step, None


def agree_on_resume(mode: str, ckpt_dir: Path, info: DistInfo,
                    check: Optional[Callable[[Path], None]] = None,
                    broken: Optional[List[Tuple[Path, str]]] = None) -> Optional[Tuple[Path, int]]:
    """The checkpoint (path, step) every rank resumes from, or None to start at step 0.

    Rank 0 alone looks at the file system (`choose_resume`, with `check` and `broken`) and
    broadcasts the step it chose, so ranks that list `ckpt_dir` at different moments, or on
    storage that differs between nodes, cannot resume from different steps. When rank 0
    cannot decide, it raises the reason and every other rank a TrainingSetupError saying
    so. A single process decides alone, as `choose_resume` does.
    """
    step, error = NO_CHECKPOINT, None
    if info.is_main:
        try:
            step = choose_resume(mode, ckpt_dir, check, broken)
        except Exception as e:   # the other ranks must hear of it, or they would wait forever
            step, error = _UNDECIDED, e
    step = dist_utils.broadcast_int(step, info)
    if error is not None:
        raise error
    if step == _UNDECIDED:
        raise TrainingSetupError(f"rank {info.rank}: rank 0 could not choose a checkpoint to "
                                 f"resume from (resume = {mode!r}); its error says why")
    if step == NO_CHECKPOINT:
        return None
    path = ckpt_dir / checkpoint_name(step) if mode == "auto" else Path(mode)
    return path, step


def load_resume_checkpoint(path: Path, step: int, model: SoundStorm,
                           optimizer: torch.optim.Optimizer, info: DistInfo) -> Dict[str, Any]:
    """Load checkpoint `path` (step `step`, rank 0's choice) on every rank; returns its
    state.json.

    The ranks then agree on success: when any rank cannot read the checkpoint, or finds
    another step in it, every rank raises ResumeError (each failing rank with its reason)
    instead of leaving the others waiting for it. A single process raises what
    `load_checkpoint` raises.
    """
    if not info.distributed:
        return load_checkpoint(path, model, optimizer)
    state, error = None, None
    try:
        state = load_checkpoint(path, model, optimizer)
        if state["step"] != step:
            raise ValueError(f"its state.json records step {state['step']!r}")
    except Exception as e:   # the other ranks must hear of it, or they would wait forever
        error = e
    failed = dist_utils.failed_ranks(error is not None, info)
    if error is not None:
        raise ResumeError(f"rank {info.rank} cannot resume from checkpoint {path} (step {step}, "
                          f"chosen by rank 0): {error}") from error
    if failed:
        raise ResumeError(f"rank {info.rank}: rank(s) {', '.join(map(str, failed))} cannot "
                          f"resume from checkpoint {path} (step {step}, chosen by rank 0); "
                          "their errors say why")
    return state


def train(config: TrainConfig) -> Dict[str, Any]:
    """Run (or resume) training as configured; returns a summary. Every rank of a torchrun
    launch calls this.

    The summary: step (where the run stands), steps (the target), steps_run (0 when the
    run was already at its target), model (the exported model directory), train and
    validation (the last logged metrics, None when nothing ran) and out.
    """
    trainer = Trainer(config)
    try:
        return trainer.run()
    finally:
        dist_utils.teardown(trainer.dist)


# -- metrics file ---------------------------------------------------------------------
def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _append_metrics(path: Path, record: Dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> List[Dict[str, Any]]:
    if not Path(path).is_file():
        return []
    records = []
    for line in Path(path).read_text(errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except (json.JSONDecodeError, RecursionError):
            continue  # a line cut short by a kill
    return records


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, forget what was logged after the checkpoint (it is about to be redone)."""
    records = [r for r in read_metrics(path) if isinstance(r, dict) and r.get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)
