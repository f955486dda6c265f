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

Unset fields: decay_steps = round(0.1 * total_steps), decay_start = total_steps - decay_steps + 1
(the last decay_steps steps decay; never before the warmup ends), half_life = decay_steps / log2(10)
(eta / 10 at t = decay_steps), min_lr = 0 (wsd) or 0.1 * eta (cosine). Once resolved, the decay
depends on decay_start only, never on total_steps, so a branch can set decay_start to its branch
step and extend the run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from megacpm.config import ScheduleConfig

KINDS = ("wsd", "cosine", "constant")
DECAYS = ("exp", "linear", "cosine", "1-sqrt")


def _fail(key: str, message: str) -> None:
    raise ValueError(f"schedule.{key}: {message}")


@dataclass(frozen=True)
class LRSchedule:
    """Resolved landmarks (``describe``). A kind's unused fields are None; constant has
    decay_steps 0 and min_lr = peak_lr, its lowest LR after the warmup."""

    kind: str
    peak_lr: float
    total_steps: int
    warmup_steps: int
    decay: Optional[str]  # wsd only
    decay_start: Optional[int]  # first step with t = 0; cosine: warmup_steps; constant: None
    decay_steps: int  # 0: never decays; cosine: max(total_steps - warmup_steps, 0)
    half_life: Optional[float]  # wsd + exp only
    min_lr: float

    @classmethod
    def from_config(cls, cfg: ScheduleConfig, peak_lr: float, total_steps: int) -> "LRSchedule":
        """Resolve the unset fields of ``cfg`` (see megacpm.config.ScheduleConfig).

        Raises ValueError naming the schedule.* key of an inconsistent combination. The wsd-only
        keys (decay, decay_start, decay_steps, half_life) are ignored by the other kinds, so
        switching a preset's kind does not require clearing them.
        """
        if cfg.kind not in KINDS:
            _fail("kind", f"must be one of {', '.join(KINDS)}, got {cfg.kind!r}")
        warmup = cfg.warmup_steps
        if warmup < 0:
            _fail("warmup_steps", f"must be non-negative, got {warmup}")
        if cfg.half_life is not None and cfg.half_life <= 0:
            _fail("half_life", f"must be positive, got {cfg.half_life}")
        if cfg.min_lr is not None and not 0 <= cfg.min_lr <= peak_lr:
            _fail("min_lr", f"must be in [0, peak LR {peak_lr}], got {cfg.min_lr}")

        if cfg.kind == "constant":
            return cls("constant", peak_lr, total_steps, warmup, None, None, 0, None, peak_lr)

        if cfg.kind == "cosine":
            # The paper's form 0.1*eta + 0.9*eta*(1+cos)/2 is min_lr = 0.1 * eta. A warmup that
            # reaches train.steps leaves a zero-length cosine: the run is all warmup.
            min_lr = 0.1 * peak_lr if cfg.min_lr is None else cfg.min_lr
            return cls("cosine", peak_lr, total_steps, warmup, None, warmup, max(total_steps - warmup, 0),
                       None, min_lr)

        if cfg.decay not in DECAYS:
            _fail("decay", f"must be one of {', '.join(DECAYS)}, got {cfg.decay!r}")
        decay_steps = round(0.1 * total_steps) if cfg.decay_steps is None else cfg.decay_steps
        if decay_steps < 0:
            _fail("decay_steps", f"must be non-negative, got {decay_steps}")
        if cfg.decay_start is None:
            # The last decay_steps steps decay, but never before the warmup ends: a run shortened
            # with --train.steps (a smoke test of a preset) then warms up and decays smoothly
            # instead of failing or jumping from the warmup ramp into the middle of the decay.
            decay_start = max(total_steps - decay_steps + 1, warmup)
        else:
            decay_start = cfg.decay_start
            if decay_steps == 0:
                # Loud rather than a branch that silently never decays.
                _fail("decay_steps", f"0 means a stable-only run, but schedule.decay_start is {decay_start}")
            if decay_start < warmup:
                _fail("decay_start", f"{decay_start} is before the end of the warmup "
                                     f"(schedule.warmup_steps {warmup})")
        half_life = None
        if cfg.decay == "exp" and decay_steps > 0:
            # Default: the LR is a tenth of the peak at the end of the decay (paper: 1e-2 -> 1e-3).
            half_life = float(cfg.half_life) if cfg.half_life is not None else decay_steps / math.log2(10)
        min_lr = 0.0 if cfg.min_lr is None else cfg.min_lr
        return cls("wsd", peak_lr, total_steps, warmup, cfg.decay, decay_start, decay_steps, half_life,
                   min_lr)

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

    def describe(self) -> dict:
        """The resolved landmarks, for logs and the run directory."""
        return {"kind": self.kind, "peak_lr": self.peak_lr, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "decay": self.decay, "decay_start": self.decay_start,
                "decay_steps": self.decay_steps, "half_life": self.half_life, "min_lr": self.min_lr}
