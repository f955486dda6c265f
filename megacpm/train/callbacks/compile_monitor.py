"""train.compile's compilations, reported: the first of each phase once, every later one as a warning."""
from __future__ import annotations

from megacpm.model.compile import EVAL, TRAIN
from megacpm.train.callbacks.base import Callback


class CompileMonitor(Callback):
    """After each step and each evaluation, looks at what the compiled blocks compiled since.

    The first training step and the first evaluation compile (one message each, with the seconds it
    took); any graph compiled after that is a recompile — a guard failed (a new shape, dtype or Python
    value reached a block) — and each is a warning naming the step, since it costs a compile on every
    occurrence and hides a bug. Logged records carry the running count as ``recompiles``. On every
    rank: each compiles its own blocks; the messages and warnings reach the user from rank 0."""

    def __init__(self) -> None:
        self._seen = {TRAIN: 0, EVAL: 0}
        self.recompiles = 0

    def _check(self, trainer, step: int) -> None:
        stats = trainer.module.model.compile_stats
        if stats is None:
            return
        for phase in (TRAIN, EVAL):
            new = stats.graphs[phase] - self._seen[phase]
            if new <= 0:
                continue
            if self._seen[phase] == 0:
                trainer.callbacks.on_message(
                    trainer, f"compiled the decoder blocks for {'training' if phase == TRAIN else 'evaluation'}: "
                             f"{new} graph{'s' if new > 1 else ''}, {stats.seconds[phase]:.1f} s in the compiler backend (step {step})")
            else:
                self.recompiles += new
                trainer._warn(f"step {step}: the compiled blocks recompiled {new} graph{'s' if new > 1 else ''} "
                              f"for {phase} ({self.recompiles} so far): a guard failed, so something that "
                              f"should be fixed changed; run with TORCH_LOGS=recompiles to see which")
            self._seen[phase] = stats.graphs[phase]

    def on_step_end(self, trainer, step, metrics) -> None:
        self._check(trainer, step)

    def on_evaluate(self, trainer, step, eval_metrics) -> None:
        self._check(trainer, step)

    def record_fields(self, trainer, step):
        return {"recompiles": self.recompiles} if trainer.module.model.compile_stats is not None else {}
