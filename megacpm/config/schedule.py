"""The landmarks of a learning-rate schedule: a ScheduleConfig's unset fields resolved.

Pure rules on config values (no torch, nothing of megacpm.optim), so that validation can reject an
inconsistent schedule before anything runs, and megacpm.optim.schedule.LRSchedule (the LR as a
function of the step) is built from what they resolve.

The shapes these landmarks parametrise are described in megacpm.optim.schedule.

Unset fields: decay_steps = round(0.1 * total_steps), decay_start = total_steps - decay_steps + 1
(the last decay_steps steps decay; never before the warmup ends), half_life = decay_steps / log2(10)
(eta / 10 at t = decay_steps), min_lr = 0 (wsd) or 0.1 * eta (cosine). Once resolved, the decay
depends on decay_start only, never on total_steps, so a branch can set decay_start to its branch
step and extend the run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NoReturn, Optional

from megacpm.config.schema import DECAY_SHAPES, SCHEDULE_KINDS, ScheduleConfig


def _fail(key: str, message: str) -> NoReturn:
    raise ValueError(f"schedule.{key}: {message}")


@dataclass(frozen=True)
class ScheduleLandmarks:
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

    def describe(self) -> dict:
        """The resolved landmarks, for logs and the run directory."""
        return {"kind": self.kind, "peak_lr": self.peak_lr, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "decay": self.decay, "decay_start": self.decay_start,
                "decay_steps": self.decay_steps, "half_life": self.half_life, "min_lr": self.min_lr}


def resolve_schedule(cfg: ScheduleConfig, peak_lr: float, total_steps: int) -> ScheduleLandmarks:
    """Resolve the unset fields of ``cfg`` (see the module docstring).

    Raises ValueError "schedule.<key>: ..." naming the key of an inconsistent combination. The
    wsd-only keys (decay, decay_start, decay_steps, half_life) are ignored by the other kinds, so
    switching a preset's kind does not require clearing them.
    """
    if cfg.kind not in SCHEDULE_KINDS:  # a ScheduleConfig built in code skips the loader's check
        _fail("kind", f"must be one of {', '.join(SCHEDULE_KINDS)}, got {cfg.kind!r}")
    warmup = cfg.warmup_steps
    if warmup < 0:
        _fail("warmup_steps", f"must be non-negative, got {warmup}")
    if cfg.half_life is not None and cfg.half_life <= 0:
        _fail("half_life", f"must be positive, got {cfg.half_life}")
    if cfg.min_lr is not None and not 0 <= cfg.min_lr <= peak_lr:
        _fail("min_lr", f"must be in [0, peak LR {peak_lr}], got {cfg.min_lr}")

    if cfg.kind == "constant":
        return ScheduleLandmarks("constant", peak_lr, total_steps, warmup, None, None, 0, None, peak_lr)

    if cfg.kind == "cosine":
        # The paper's form 0.1*eta + 0.9*eta*(1+cos)/2 is min_lr = 0.1 * eta. A warmup that
        # reaches train.steps leaves a zero-length cosine: the run is all warmup.
        min_lr = 0.1 * peak_lr if cfg.min_lr is None else cfg.min_lr
        return ScheduleLandmarks("cosine", peak_lr, total_steps, warmup, None, warmup,
                                 max(total_steps - warmup, 0), None, min_lr)

    if cfg.decay not in DECAY_SHAPES:
        _fail("decay", f"must be one of {', '.join(DECAY_SHAPES)}, got {cfg.decay!r}")
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
    return ScheduleLandmarks("wsd", peak_lr, total_steps, warmup, cfg.decay, decay_start, decay_steps,
                             half_life, min_lr)
