"""Learning-rate schedules: the LR is a pure function of the (1-based) optimizer step.

Nothing is stored between steps, so a resumed or branched run only needs its config to know every
LR it will use (Megatron's scheduler state, and its lost WSD fields, have no counterpart here).

W = warmup_steps, T = decay_start, eta = peak LR:
  s < W        eta * s / W
  W <= s < T   eta                      (the "stable" phase of WSD)
  s >= T       eta * f(s - T)           exp: 0.5 ** (t / half_life), MiniCPM's decay; or a linear,
                                        cosine or 1-sqrt ramp to min_lr over decay_steps
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from megacpm.config import ScheduleConfig


@dataclass(frozen=True)
class LRSchedule:
    kind: str
    peak_lr: float
    total_steps: int
    warmup_steps: int
    decay: str
    decay_start: int
    decay_steps: int
    half_life: float
    min_lr: float

    @classmethod
    def from_config(cls, cfg: ScheduleConfig, peak_lr: float, total_steps: int) -> "LRSchedule":
        """Resolve the unset fields (see megacpm.config.ScheduleConfig) into concrete landmarks."""
        decay_steps = cfg.decay_steps if cfg.decay_steps is not None else round(0.1 * total_steps)
        decay_start = cfg.decay_start if cfg.decay_start is not None else total_steps - decay_steps + 1
        if cfg.half_life is not None:
            if cfg.half_life <= 0:
                raise ValueError(f"schedule.half_life: must be positive, got {cfg.half_life}")
            half_life = float(cfg.half_life)
        else:
            # The paper's decay takes the LR from 1e-2 to about 1e-3: a tenth by the end.
            half_life = max(decay_steps, 1) / math.log2(10)
        if cfg.min_lr is not None:
            min_lr = cfg.min_lr
        else:
            min_lr = 0.1 * peak_lr if cfg.kind == "cosine" else 0.0
        if min_lr > peak_lr:
            raise ValueError(f"schedule.min_lr: {min_lr} exceeds the peak LR {peak_lr}")
        if cfg.kind == "cosine" and cfg.warmup_steps >= total_steps:
            raise ValueError(f"schedule.warmup_steps: {cfg.warmup_steps} leaves no cosine phase "
                             f"before train.steps {total_steps}")
        return cls(kind=cfg.kind, peak_lr=peak_lr, total_steps=total_steps, warmup_steps=cfg.warmup_steps,
                   decay=cfg.decay, decay_start=decay_start, decay_steps=decay_steps, half_life=half_life,
                   min_lr=min_lr)

    def __call__(self, step: int) -> float:
        eta, warmup = self.peak_lr, self.warmup_steps
        if step < warmup:
            return eta * step / warmup
        if self.kind == "constant":
            return eta
        if self.kind == "cosine":
            progress = min(step - warmup, self.total_steps - warmup) / (self.total_steps - warmup)
            return self.min_lr + (eta - self.min_lr) * (1 + math.cos(math.pi * progress)) / 2
        if self.decay_steps == 0 or step < self.decay_start:
            return eta
        return self._decayed(step - self.decay_start)

    def _decayed(self, t: int) -> float:
        eta, floor, length = self.peak_lr, self.min_lr, self.decay_steps
        if self.decay == "exp":
            return max(floor, eta * 0.5 ** (t / self.half_life))
        frac = min(t, length) / length
        if self.decay == "linear":
            shape = 1.0 - frac
        elif self.decay == "cosine":
            shape = (1 + math.cos(math.pi * frac)) / 2
        elif self.decay == "1-sqrt":
            shape = 1.0 - math.sqrt(frac)
        else:
            raise ValueError(f"schedule.decay: unknown shape {self.decay!r}")
        return floor + (eta - floor) * shape

    def describe(self) -> dict:
        return {"kind": self.kind, "warmup_steps": self.warmup_steps, "decay": self.decay,
                "decay_start": self.decay_start, "decay_steps": self.decay_steps,
                "half_life": self.half_life, "min_lr": self.min_lr}
