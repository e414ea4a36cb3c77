"""Training configuration: a typed dataclass, named presets, a JSON/YAML file, flags.

Precedence: preset < file < flags. Every field is validated on construction, and the
settings that depend on the data or the launch (corpus shape vs model, batch divisibility
by processes x accumulation) are checked by the trainer before any step runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

from soundstorm.engine.config import ModelConfig

_PRESETS: Dict[str, Dict[str, Any]] = {
    # Paper §4.1: batch 256, AdamW lr 5e-4 and weight decay 1e-3, linear warm-up over 20k
    # steps, exponential decay over 0.5M steps, windows of up to 30 s, 10 epochs of
    # LibriLight (~60k hours) -- about 0.5M steps at this batch size.
    "paper": dict(model="paper", batch_size=256, lr=5e-4, weight_decay=1e-3,
                  warmup_steps=20_000, decay_steps=500_000, decay_rate=0.1, steps=500_000,
                  min_seconds=0.0, max_seconds=30.0, grad_clip=1.0, log_every=50,
                  val_every=5_000, checkpoint_every=5_000, keep_checkpoints=3,
                  bucket_batches=64, num_workers=4),
    "small": dict(model="small", batch_size=64, lr=5e-4, weight_decay=1e-3,
                  warmup_steps=2_000, decay_steps=100_000, decay_rate=0.1, steps=100_000,
                  min_seconds=0.0, max_seconds=30.0, grad_clip=1.0, log_every=50,
                  val_every=2_000, checkpoint_every=2_000, keep_checkpoints=3,
                  bucket_batches=64, num_workers=4),
    # For tests and quick experiments on a CPU: the tiny model (4 levels of 32 codes).
    "tiny": dict(model="tiny", batch_size=16, lr=3e-3, weight_decay=1e-3,
                 warmup_steps=20, decay_steps=2_000, decay_rate=0.1, steps=300,
                 min_seconds=0.5, max_seconds=3.0, grad_clip=1.0, log_every=10,
                 val_every=100, checkpoint_every=100, keep_checkpoints=2,
                 bucket_batches=0, num_workers=0),
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs.

    data / val_data: corpus directories (see `soundstorm.training.corpus`); without
        val_data, `val_fraction` of `data` is held out (0 = no validation).
    out: run directory: checkpoints/, model/ (the exported model), metrics.jsonl,
        curves.png, train_config*.json (see `soundstorm.training.trainer`).
    model: a model preset; model_overrides: ModelConfig fields to change.
    init_from: a model directory (config.json + model.safetensors) to fine-tune: the
        model config is that directory's (`model` is then unused, and model_overrides
        may only repeat its values, or add a prompt lookup, `prompt_lookup: K`, to a
        model without one) and the weights start from its weights (an added lookup's
        from their initialisation); the optimizer and schedule start fresh.
    allow_changed_data: resume even when the data or the batch settings differ from the
        checkpoint's (otherwise refused).
    batch_size: windows per optimizer step, over all processes and accumulation steps.
    lr, weight_decay, betas, eps: AdamW. warmup_steps: linear ramp from 0 to lr;
        then lr * decay_rate ** ((step - warmup_steps) / decay_steps).
    grad_clip: max global gradient norm (0 = off). grad_accum: micro-batches per step.
    level_weights: how often each RVQ level is the one trained, coarse to fine (None =
        uniformly, as the paper; e.g. (2, 1, 1, 1) trains level 1 twice as often as each
        other level). Validation always draws levels uniformly.
    level_weights_end: the weights at the last step (None = level_weights throughout).
        Each level's share moves linearly from its share under level_weights (uniform when
        that is None) at step 0 to its share under these at the last step: e.g. (3, 2, 1, 1)
        to (2, 3, 1, 1) spends the early steps on level 1 and moves them to level 2.
    finer_full_mask: the share of rows training a level > 1 that mask all of that level
        after the prompt (0 = the paper's cosine mask ratio for every row). The paper's
        schedule decodes each finer level in one pass, from the prompt and the coarser
        levels alone; such rows train exactly that, so the model must take the voice's
        fine detail from the prompt rather than from the level's own unmasked tokens.
        Validation always uses the paper's mask.
    min_seconds, max_seconds: window lengths (clamped to the model's max_frames).
    join_utterances: join each utterance to its speaker's next ones, this many in all (1 =
        off), so that a window, its prompt and its target may span sentences as in a long
        recording (see `JoinedCorpus`); validation windows are joined the same way.
    bucket_batches: length-bucketing group size in batches (0 = off).
    on_bad_shard: "raise" or "skip" (see `open_corpus`).
    dtype: "auto" (bf16 autocast on CUDA, fp32 on CPU), "float32" or "bfloat16".
    """

    data: Optional[str] = None
    out: Optional[str] = None
    val_data: Optional[str] = None
    val_fraction: float = 0.0
    val_batches: int = 0
    model: str = "tiny"
    model_overrides: Dict[str, Any] = field(default_factory=dict)
    init_from: Optional[str] = None
    steps: int = 300
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-3
    weight_decay: float = 1e-3
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-8
    warmup_steps: int = 20
    decay_steps: int = 2000
    decay_rate: float = 0.1
    grad_clip: float = 1.0
    level_weights: Optional[tuple] = None
    level_weights_end: Optional[tuple] = None
    finer_full_mask: float = 0.0
    min_seconds: float = 0.5
    max_seconds: float = 3.0
    join_utterances: int = 1
    bucket_batches: int = 0
    num_workers: int = 0
    on_bad_shard: str = "raise"
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    log_every: int = 10
    val_every: int = 100
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    resume: str = "auto"
    allow_changed_data: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise ValueError(f"{name} = {getattr(self, name)!r}: expected {expected}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name in ("steps", "batch_size", "grad_accum", "log_every", "val_every",
                     "checkpoint_every", "keep_checkpoints", "join_utterances"):
            check(is_int(getattr(self, name)) and getattr(self, name) >= 1, name, "an int >= 1")
        for name in ("warmup_steps", "val_batches", "bucket_batches", "num_workers"):
            check(is_int(getattr(self, name)) and getattr(self, name) >= 0, name, "an int >= 0")
        check(is_int(self.decay_steps) and self.decay_steps >= 1, "decay_steps", "an int >= 1")
        check(is_int(self.seed) and 0 <= self.seed < 2 ** 63, "seed", "an int in 0..2**63-1")
        check(is_num(self.lr) and self.lr > 0, "lr", "a number > 0")
        check(is_num(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a number >= 0")
        check(is_num(self.eps) and self.eps > 0, "eps", "a number > 0")
        check(is_num(self.decay_rate) and 0 < self.decay_rate <= 1, "decay_rate",
              "a number in (0, 1]")
        check(is_num(self.grad_clip) and self.grad_clip >= 0, "grad_clip", "a number >= 0 (0 = off)")
        check(is_num(self.val_fraction) and 0 <= self.val_fraction < 1, "val_fraction",
              "a number in [0, 1)")
        check(is_num(self.min_seconds) and self.min_seconds >= 0, "min_seconds", "a number >= 0")
        check(is_num(self.max_seconds) and self.max_seconds > 0 and self.max_seconds >= self.min_seconds,
              "max_seconds", f"a number > 0 and >= min_seconds ({self.min_seconds})")
        betas = tuple(self.betas) if isinstance(self.betas, (list, tuple)) else self.betas
        check(isinstance(betas, tuple) and len(betas) == 2 and all(is_num(b) and 0 <= b < 1 for b in betas),
              "betas", "two numbers in [0, 1)")
        object.__setattr__(self, "betas", betas)
        check(self.on_bad_shard in ("raise", "skip"), "on_bad_shard", "'raise' or 'skip'")
        check(self.dtype in ("auto", "float32", "bfloat16"), "dtype",
              "'auto', 'float32' or 'bfloat16'")
        check(isinstance(self.device, str) and self.device.split(":")[0] in ("auto", "cpu", "cuda"),
              "device", "'auto', 'cpu', 'cuda' or 'cuda:N'")
        check(isinstance(self.resume, str) and bool(self.resume), "resume",
              "'auto' (latest checkpoint in out, if any), 'never', or a checkpoint directory")
        check(isinstance(self.progress, bool), "progress", "true or false")
        check(isinstance(self.allow_changed_data, bool), "allow_changed_data", "true or false")
        check(isinstance(self.model_overrides, dict), "model_overrides", "a mapping of ModelConfig fields")
        for name in ("data", "out", "val_data", "init_from"):
            v = getattr(self, name)
            check(v is None or (isinstance(v, str) and bool(v)), name, "a path")
        for name in ("level_weights", "level_weights_end"):
            if getattr(self, name) is None:
                continue
            from soundstorm.training.masking import check_level_weights

            try:
                levels = self.model_config().num_quantizers
            except (TypeError, ValueError):
                levels = None  # the model settings' own error is raised below
            if levels is not None:
                object.__setattr__(self, name,
                                   check_level_weights(getattr(self, name), levels, name))
        from soundstorm.training.masking import check_finer_full_mask

        object.__setattr__(self, "finer_full_mask", check_finer_full_mask(self.finer_full_mask))
        if self.val_data is not None and self.val_fraction:
            raise ValueError("give either val_data or val_fraction, not both")
        try:
            self.model_config()
        except (TypeError, ValueError) as e:
            if self.init_from is not None:
                raise ValueError(f"init_from = {self.init_from!r}: {e}") from None
            raise ValueError(f"model = {self.model!r} with model_overrides = "
                             f"{self.model_overrides}: {e}") from None

    def model_config(self) -> ModelConfig:
        if self.init_from is None:
            return ModelConfig.preset(self.model, **self.model_overrides)
        from soundstorm.engine.model import load_config

        try:
            base = load_config(self.init_from)
        except FileNotFoundError as e:
            raise ValueError(str(e)) from None
        fields = set(base.to_dict())
        unknown = sorted(set(self.model_overrides) - fields)
        if unknown:
            raise ValueError(f"model_overrides names unknown ModelConfig field(s) {unknown}")
        overrides = dict(self.model_overrides)
        grow = {}
        if not base.prompt_lookup and overrides.get("prompt_lookup"):
            grow["prompt_lookup"] = overrides.pop("prompt_lookup")
        if not base.prompt_prior and overrides.get("prompt_prior"):
            grow["prompt_prior"] = overrides.pop("prompt_prior")
        conflicts = [f"{k} = {v!r} (the model has {getattr(base, k)!r})"
                     for k, v in overrides.items() if getattr(base, k) != v]
        if conflicts:
            raise ValueError("the model size comes from the directory, but the settings ask "
                             "for " + ", ".join(conflicts) + "; drop those settings to "
                             "fine-tune this model (only a prompt lookup or a prompt prior may be "
                             "added to a model without one)")
        return dataclasses.replace(base, **grow) if grow else base

    def window_frames(self) -> tuple[int, int]:
        """(min, max) window length in frames, clamped to [1, max_frames]."""
        cfg = self.model_config()
        hi = min(cfg.max_frames, max(1, int(self.max_seconds * cfg.frame_rate)))
        lo = min(hi, max(1, int(self.min_seconds * cfg.frame_rate)))
        return lo, hi

    # -- construction -------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "TrainConfig":
        if name not in _PRESETS:
            raise ValueError(f"unknown training preset {name!r}; choose one of {sorted(_PRESETS)}")
        return cls.from_dict({**_PRESETS[name], **overrides})

    @staticmethod
    def preset_names() -> tuple[str, ...]:
        return tuple(_PRESETS)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training setting(s) {unknown}; expected a subset of "
                             f"{sorted(known)}")
        return cls(**data)

    def replace(self, **changes: Any) -> "TrainConfig":
        return self.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        for name in ("level_weights", "level_weights_end"):
            if getattr(self, name) is not None:
                d[name] = list(getattr(self, name))
        return d


def load_config_file(path: Union[str, Path]) -> Dict[str, Any]:
    """Read a JSON (.json) or YAML (.yaml/.yml) mapping of training settings."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise ValueError(f"config file {path}:{line}: not UTF-8 text (byte "
                         f"{e.object[e.start]:#04x})") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ValueError(f"config file {path} must end in .json, .yaml or .yml")
    except (json.JSONDecodeError, ValueError) as e:
        raise ValueError(f"config file {path}: {e}") from None
    except RecursionError:
        raise ValueError(f"config file {path}: nested too deeply to be a mapping of "
                         "settings") from None
    except Exception as e:  # yaml.YAMLError without importing yaml at module level
        raise ValueError(f"config file {path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings, got "
                         f"{type(data).__name__}")
    return data
