"""Learning-rate schedule of the paper (§4.1): linear warm-up, then exponential decay."""

from __future__ import annotations

from typing import Any, Dict


class WarmupExponentialDecay:
    """lr(step) for optimizer steps numbered 1, 2, ...:

        step <= warmup_steps:  peak * step / warmup_steps
        afterwards:            peak * decay_rate ** ((step - warmup_steps) / decay_steps)

    A pure function of the step, so its whole state is the last step taken.
    """

    def __init__(self, peak: float, warmup_steps: int, decay_steps: int, decay_rate: float):
        self.peak, self.warmup_steps = peak, warmup_steps
        self.decay_steps, self.decay_rate = decay_steps, decay_rate
        self.last_step = 0

    def lr_at(self, step: int) -> float:
        if step <= self.warmup_steps:
            return self.peak * step / self.warmup_steps
        return self.peak * self.decay_rate ** ((step - self.warmup_steps) / self.decay_steps)

    def step(self, optimizer) -> float:
        """Set the learning rate of the next optimizer step and return it."""
        self.last_step += 1
        lr = self.lr_at(self.last_step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> Dict[str, Any]:
        return {"kind": "warmup_exponential_decay", "peak": self.peak,
                "warmup_steps": self.warmup_steps, "decay_steps": self.decay_steps,
                "decay_rate": self.decay_rate, "last_step": self.last_step}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("kind") != "warmup_exponential_decay":
            raise ValueError(f"not a warm-up/exponential-decay schedule state: {state}")
        self.last_step = int(state["last_step"])
