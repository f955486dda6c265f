"""Evaluation on the validation split every train.eval_interval steps and at the last step."""
from __future__ import annotations

from megacpm.train.callbacks.base import Callback


def is_eval_step(trainer, step: int) -> bool:
    t = trainer.cfg.train
    return bool(t.eval_batches) and ((t.eval_interval > 0 and step % t.eval_interval == 0) or step == t.steps)


class Evaluation(Callback):
    """Runs ``trainer.evaluate()`` (collective: on every rank) after the steps due, keeps its
    eval_loss in ``trainer.last_eval_loss`` and passes the objective's eval metrics
    (``{"eval_loss": ...}`` and any others) on to on_evaluate. Nothing when train.eval_batches is 0."""

    def on_step_end(self, trainer, step, metrics) -> None:
        if is_eval_step(trainer, step):
            eval_metrics = trainer.evaluate()
            trainer.last_eval_loss = eval_metrics["eval_loss"]
            trainer.callbacks.on_evaluate(trainer, step, eval_metrics)
