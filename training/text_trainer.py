"""Training the text-to-semantic model (paper §5) on (text, semantic ids) pairs.

    from soundstorm.training.text_trainer import TextTrainConfig, train_text
    summary = train_text(TextTrainConfig(data="tokens/train", out="text-run/", steps=2000))

The conventions are the SoundStorm trainer's: AdamW with linear warm-up and exponential
decay; one optimizer step per global batch, split over the processes of a torchrun launch
(the loss is the mean cross-entropy over every trained id of the global batch, the count
summed over ranks first); a step with a non-finite loss or gradient stops the run before
the update; atomic checkpoints (`checkpoints/step-XXXXXXXX/`, a model directory plus the
optimizer, RNG and data position) from which a resume continues exactly, rank 0 choosing
the newest that loads; `metrics.jsonl`, `curves.png`, `train_config.json` and the final
`model/` (config.json + model.safetensors, what `TextToSemantic.from_pretrained` loads).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from soundstorm.engine.text_model import TextModelConfig, TextToSemantic
from soundstorm.training import distributed as dist_utils
from soundstorm.training.checkpoint import load_checkpoint, save_checkpoint
from soundstorm.training.corpus import corpus_fingerprint
from soundstorm.training.paths import check_output_dir
from soundstorm.training.plot import plot_curves
from soundstorm.training.schedule import WarmupExponentialDecay
from soundstorm.training.text_data import (IGNORE, TEXTS_FILE, PairSampler, collate_pairs, load_pairs,
                                           split_pairs)
from soundstorm.training.trainer import (METRICS_FILE, TrainingDivergedError,
                                         TrainingSetupError, _append_metrics,
                                         _nonfinite_tensor, agree_on_resume,
                                         finished_run, load_resume_checkpoint, open_run_dir,
                                         read_metrics)

VAL_SEED_OFFSET = 0x7A1


@dataclass(frozen=True)
class TextTrainConfig:
    data: Optional[str] = None          # a tokenized corpus with texts.jsonl
    out: Optional[str] = None           # the run directory
    val_data: Optional[str] = None      # another corpus to validate on (else val_fraction)
    preset: str = "small"               # TextModelConfig preset
    model: Dict[str, Any] = field(default_factory=dict)   # overrides of the preset
    steps: int = 2000
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 100
    decay_steps: int = 1000
    decay_rate: float = 0.5
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    prompt_probability: float = 0.5
    val_fraction: float = 0.05
    seed: int = 0
    log_every: int = 10
    val_every: int = 200
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    resume: str = "auto"                # auto, never, or a checkpoint directory
    device: str = "auto"
    progress: bool = True

    def __post_init__(self):
        ints = {"steps": 1, "batch_size": 1, "warmup_steps": 1, "decay_steps": 1, "seed": 0,
                "log_every": 1, "val_every": 1, "checkpoint_every": 1, "keep_checkpoints": 1}
        for name, least in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ValueError(f"{name} must be an int >= {least}, got {v!r}")
        for name, lo, hi in (("lr", 0, math.inf), ("decay_rate", 0, 1), ("weight_decay", 0, 1),
                             ("grad_clip", 0, math.inf), ("prompt_probability", 0, 1),
                             ("val_fraction", 0, 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
                raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {v!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        self.model_config()   # an unknown preset or a bad override fails here

    def model_config(self) -> TextModelConfig:
        return TextModelConfig.preset(self.preset, **self.model)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


class TextTrainer:
    def __init__(self, config: TextTrainConfig):
        self.config = cfg = config
        if cfg.data is None:
            raise TrainingSetupError("data is not set: give the corpus directory (--data)")
        if cfg.out is None:
            raise TrainingSetupError("out is not set: give the run directory (--out)")
        check_output_dir(cfg.out, "--out")
        self.dist = d = dist_utils.setup(cfg.device)
        if cfg.batch_size % d.world_size:
            raise TrainingSetupError(f"batch_size = {cfg.batch_size} must be divisible by the "
                                     f"{d.world_size} processes")
        self.model_config = mc = cfg.model_config()
        self.pairs = load_pairs(cfg.data, mc)
        train_idx, val_idx = split_pairs(len(self.pairs), cfg.val_fraction, cfg.seed)
        if cfg.val_data is not None:
            train_idx = list(range(len(self.pairs)))
            self.val_pairs = load_pairs(cfg.val_data, mc)
            val_idx = list(range(len(self.val_pairs)))
        else:
            self.val_pairs = self.pairs
        self.sampler = PairSampler(self.pairs, train_idx, cfg.batch_size, cfg.seed,
                                   cfg.prompt_probability, mc)
        self.val_sampler = None
        if len(val_idx):
            self.val_sampler = PairSampler(self.val_pairs, val_idx, cfg.batch_size,
                                           cfg.seed + VAL_SEED_OFFSET, cfg.prompt_probability,
                                           mc, drop_last=False)
        texts = (Path(cfg.data) / TEXTS_FILE).read_bytes()
        self.identity = {"data": corpus_fingerprint(cfg.data),
                         "texts": hashlib.sha256(texts).hexdigest(),
                         **{k: getattr(cfg, k) for k in ("batch_size", "seed", "val_fraction",
                                                         "prompt_probability")}}
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.broken: List = []
        resume = agree_on_resume(cfg.resume, self.ckpt_dir, d, check=self.check_checkpoint,
                                 broken=self.broken)
        self.resume_from, self.resume_step = resume if resume is not None else (None, None)

    def build(self):
        model = TextToSemantic(self.model_config)
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
        rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": self.config.weight_decay},
                                       {"params": rest, "weight_decay": 0.0}],
                                      lr=self.config.lr, betas=(0.9, 0.98))
        schedule = WarmupExponentialDecay(self.config.lr, self.config.warmup_steps,
                                          self.config.decay_steps, self.config.decay_rate)
        return model, optimizer, schedule

    def check_checkpoint(self, path: Path) -> None:
        model, optimizer, schedule = self.build()
        state = load_checkpoint(path, model, optimizer, restore_rng=False)
        bad = _nonfinite_tensor(dict(model.named_parameters()))
        if bad is not None:
            raise ValueError(f"its weights hold NaN or infinity ({bad})")
        schedule.load_state_dict(state["scheduler"])
        for key in ("epoch", "batches_done"):
            if not isinstance(state["data"][key], int):
                raise ValueError(f"its data position has no integer {key!r}")

    def run(self) -> Dict[str, Any]:
        from tqdm import tqdm

        cfg, d = self.config, self.dist
        torch.manual_seed(cfg.seed)
        model, optimizer, schedule = self.build()
        model = model.to(d.device).train()
        step, epoch, done_in_epoch = 0, 0, 0
        if self.resume_from is not None:
            state = load_resume_checkpoint(self.resume_from, self.resume_step, model,
                                           optimizer, d)
            if state.get("data_identity") != self.identity:
                changed = sorted(k for k in self.identity
                                 if (state.get("data_identity") or {}).get(k) != self.identity[k])
                raise TrainingSetupError(
                    f"checkpoint {self.resume_from} was trained on other data or batch "
                    f"settings (changed: {', '.join(changed)}); resuming would silently "
                    "continue a different run: give the same data and settings, or a new --out")
            schedule.load_state_dict(state["scheduler"])
            step = state["step"]
            epoch, done_in_epoch = state["data"]["epoch"], state["data"]["batches_done"]
        export = self.out / "model"
        if step >= cfg.steps:
            return finished_run(model, export, step, cfg.steps, self.out, d)
        open_run_dir(self.out, self.ckpt_dir, self.broken, cfg.to_dict(), step, d)
        start_step = step
        net = model if not d.distributed else DistributedDataParallel(
            model, device_ids=[d.device] if d.device.type == "cuda" else None)
        per_epoch = self.sampler.batches_per_epoch()
        bar = tqdm(total=cfg.steps, initial=step, desc="training text model", unit="step",
                   disable=not (cfg.progress and d.is_main), dynamic_ncols=True)
        sums = torch.zeros(3, dtype=torch.float64, device=d.device)   # loss, correct, count
        last: Dict[str, Any] = {}
        last_val: Optional[Dict[str, Any]] = None
        tick, ticks = time.perf_counter(), 0
        while step < cfg.steps:
            if done_in_epoch >= per_epoch:
                epoch, done_in_epoch = epoch + 1, 0
            batch = self.sampler.batch(epoch, done_in_epoch)
            done_in_epoch += 1
            step += 1
            lr = schedule.step(optimizer)
            sums += self._train_step(net, model, optimizer, batch, step)
            ticks += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                dist_utils.all_reduce_sum(sums, d)
                loss, acc = float(sums[0] / sums[2]), float(sums[1] / sums[2])
                elapsed = time.perf_counter() - tick
                last = {"step": step, "epoch": epoch, "lr": lr, "loss": loss, "acc": acc,
                        "acc_level": [acc], "steps_per_s": ticks / elapsed if elapsed else None}
                bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}")
                if d.is_main:
                    _append_metrics(self.out / METRICS_FILE, last)
                sums.zero_()
                tick, ticks = time.perf_counter(), 0
            if self.val_sampler is not None and (step % cfg.val_every == 0 or step == cfg.steps):
                last_val = {"step": step, **self.validate(model)}
                if d.is_main:
                    _append_metrics(self.out / METRICS_FILE, last_val)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                if d.is_main:
                    save_checkpoint(self.ckpt_dir, step, model, optimizer, {
                        "scheduler": schedule.state_dict(),
                        "data": {"epoch": epoch, "batches_done": done_in_epoch},
                        "data_identity": self.identity, "train_config": cfg.to_dict(),
                        "world_size": d.world_size}, keep=cfg.keep_checkpoints)
                dist_utils.barrier(d)
        bar.close()
        if d.is_main:
            model.save_pretrained(export)
            plot_curves(read_metrics(self.out / METRICS_FILE), self.out / "curves.png")
        dist_utils.barrier(d)
        return {"step": step, "steps": cfg.steps, "steps_run": step - start_step,
                "model": str(export), "train": last, "validation": last_val,
                "out": str(self.out)}

    def _losses(self, net, batch) -> tuple:
        logits = net(batch.text, batch.text_mask, batch.inputs, batch.input_mask)
        labels = batch.labels
        trained = labels != IGNORE
        loss_sum = F.cross_entropy(logits.transpose(1, 2).float(), labels.clamp(min=0),
                                   reduction="none")[trained].sum()
        correct = (logits.argmax(-1) == labels)[trained].sum()
        return loss_sum, correct, trained.sum()

    def _train_step(self, net, model, optimizer, batch, step: int) -> torch.Tensor:
        cfg, d = self.config, self.dist
        mine = batch[d.rank::d.world_size]
        data = collate_pairs([self.sampler.example(t, p) for t, p in mine]).to(d.device)
        count = (data.labels != IGNORE).sum().to(torch.float64).reshape(1)
        total = float(dist_utils.all_reduce_sum(count.clone(), d))
        loss_sum, correct, n = self._losses(net, data)
        (loss_sum * d.world_size / total).backward()
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
        step_loss = dist_utils.all_reduce_sum(loss_sum.detach().to(torch.float64).reshape(1), d)
        if not (math.isfinite(float(step_loss)) and math.isfinite(grad_norm)):
            raise TrainingDivergedError(
                f"text model training diverged at step {step}: loss {float(step_loss) / total:.4g}, "
                f"gradient norm {grad_norm:.4g}; the run stopped before updating the weights. "
                "Lower --lr or raise --warmup-steps")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return torch.stack([loss_sum.detach().double(), correct.double(), n.double()])

    @torch.no_grad()
    def validate(self, model: TextToSemantic) -> Dict[str, Any]:
        d = self.dist
        model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=d.device)
        s = self.val_sampler
        for i in range(d.rank, s.batches_per_epoch(), d.world_size):
            data = collate_pairs([s.example(t, p) for t, p in s.batch(0, i)]).to(d.device)
            loss_sum, correct, n = self._losses(model, data)
            sums += torch.stack([loss_sum.double(), correct.double(), n.double()])
        dist_utils.all_reduce_sum(sums, d)
        model.train()
        acc = float(sums[1] / sums[2])
        return {"val_loss": float(sums[0] / sums[2]), "val_acc": acc, "val_acc_level": [acc],
                "val_tokens": int(sums[2])}


def train_text(config: TextTrainConfig) -> Dict[str, Any]:
    """Run (or resume) text-to-semantic training; returns a summary (see `Trainer`)."""
    trainer = TextTrainer(config)
    try:
        return trainer.run()
    finally:
        dist_utils.teardown(trainer.dist)


__all__ = ["TextTrainConfig", "TextTrainer", "train_text"]
