"""The console: a tqdm progress bar on a terminal, plain log lines otherwise (log.progress)."""
from __future__ import annotations

import math
import sys
import time

from megacpm.train.callbacks.base import Record, Sink


class Console(Sink):
    """A tqdm bar when log.progress is on and stderr is a terminal; plain lines otherwise (CI logs,
    redirected output). Prints the run's description at the start and the messages of the other
    callbacks (on_message) without breaking the bar."""

    def __init__(self, use_bar: bool):
        self._use_bar = use_bar
        self._bar = None
        self._start = time.monotonic()
        self._start_step = 0
        self._total = 0

    def on_train_start(self, trainer) -> None:
        self._total, self._start_step = trainer.cfg.train.steps, trainer.state.step
        if self._use_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=self._total, initial=self._start_step, unit="step", dynamic_ncols=True)
        self._start = time.monotonic()
        self.message(trainer._describe())

    def on_step_end(self, trainer, step, metrics) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def on_message(self, trainer, text: str) -> None:
        self.message(text)

    def write(self, record: Record) -> None:
        if "eval_loss" in record:
            self.message(f"step {record['step']}: eval_loss {record['eval_loss']:.4f}"
                         + _preference(record, "eval_"))
            return
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                  tok_s=f"{record['tokens_per_sec']:.0f}", refresh=False)
            return
        step = record["step"]
        done = step - self._start_step
        elapsed = time.monotonic() - self._start
        eta = elapsed / done * (self._total - step) if done > 0 else float("nan")
        self.message(
            f"step {step}/{self._total} | loss {record['loss']:.4f} | lr {record['lr']:.3e} | "
            f"grad_norm {record['grad_norm']:.3f}{_preference(record)}{_routing(record)} | "
            f"{record['tokens_per_sec']:.0f} tok/s | "
            f"ETA {_hms(eta)}"
        )

    def message(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _preference(record: Record, prefix: str = "") -> str:
    """DPO's accuracy and margin, when the record has them."""
    if f"{prefix}rewards/accuracies" not in record:
        return ""
    return (f" | {prefix}accuracy {record[f'{prefix}rewards/accuracies']:.3f} | "
            f"{prefix}margin {record[f'{prefix}rewards/margins']:.3f}")


def _routing(record: Record) -> str:
    """An MoE model's balance: the load-balancing loss (1 when balanced) and the worst expert load
    relative to the mean, over layers."""
    if "moe/aux_loss" not in record:
        return ""
    return f" | moe_lb {record['moe/aux_loss']:.3f} | max_load {record['moe/max_load']:.2f}"


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
