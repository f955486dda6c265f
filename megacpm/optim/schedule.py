"""Learning-rate schedules: the LR is a pure function of the (1-based) optimizer step.

Nothing is stored between steps, so a resumed or branched run only needs its config to know every
LR it will use (Megatron's scheduler state, and its lost WSD fields, have no counterpart here).
``schedule(s)`` is the LR of the update of step s.

kind "wsd" (MiniCPM), with W = warmup_steps, T = decay_start, eta = peak LR, t = s - T:
  s < W        eta * s / W
  W <= s < T   eta                      (the "stable" phase)
  s >= T       exp:    max(min_lr, eta * 0.5 ** (t / half_life))   MiniCPM's decay, no fixed end
               linear, cosine, 1-sqrt: a ramp from eta to min_lr over decay_steps, then min_lr
kind "cosine" (the paper's baseline): warmup, then a cosine from eta to min_lr ending at train.steps.
kind "constant": warmup, then eta.

The landmarks (W, T, decay_steps, half_life, min_lr) and the defaults of unset fields are resolved
from a ScheduleConfig by megacpm.config.schedule.resolve_schedule, a pure config rule that
validation runs too; LRSchedule is those landmarks plus the LR at any step.
"""
from __future__ import annotations

import dataclasses
import math

from megacpm.config.schedule import ScheduleLandmarks, resolve_schedule
from megacpm.config.schema import ScheduleConfig


@dataclasses.dataclass(frozen=True)
class LRSchedule(ScheduleLandmarks):
    """The LR at each step of resolved landmarks (``describe`` lists them)."""

    @classmethod
    def from_config(cls, cfg: ScheduleConfig, peak_lr: float, total_steps: int) -> "LRSchedule":
        """Resolve ``cfg`` (megacpm.config.schedule.resolve_schedule: ValueError naming the
        schedule.* key of an inconsistent combination) and schedule the LR over it."""
        return cls.from_landmarks(resolve_schedule(cfg, peak_lr, total_steps))

    @classmethod
    def from_landmarks(cls, landmarks: ScheduleLandmarks) -> "LRSchedule":
        return cls(**{f.name: getattr(landmarks, f.name) for f in dataclasses.fields(ScheduleLandmarks)})

    def __call__(self, step: int) -> float:
        eta, warmup = self.peak_lr, self.warmup_steps
        if step < warmup:
            return eta * step / warmup
        if self.kind == "constant":
            return eta
        if self.kind == "cosine":
            # Clamped at total_steps: a step past the end keeps the final LR.
            frac = min(step - warmup, self.decay_steps) / self.decay_steps if self.decay_steps else 1.0
            return self._lower(0.5 * (1 - math.cos(math.pi * frac)))
        if self.decay_steps == 0 or step < self.decay_start:
            return eta
        return self._decayed(step - self.decay_start)

    def _decayed(self, t: int) -> float:
        if self.decay == "exp":
            return max(self.min_lr, self.peak_lr * 0.5 ** (t / self.half_life))
        frac = min(t, self.decay_steps) / self.decay_steps
        if self.decay == "linear":
            return self._lower(frac)
        if self.decay == "cosine":
            return self._lower(0.5 * (1 - math.cos(math.pi * frac)))
        return self._lower(math.sqrt(frac))  # "1-sqrt"

    def _lower(self, drop: float) -> float:
        """The LR a fraction ``drop`` of the way from eta down to min_lr.

        Written as eta - (eta - min_lr) * drop, not min_lr + (eta - min_lr) * (1 - drop): drop = 0
        then gives eta exactly, so the decay never starts one rounding error above the stable LR.
        """
        eta, floor = self.peak_lr, self.min_lr
        return max(floor, eta - (eta - floor) * drop)
