"""The training loop of one process: micro-batches, gradient accumulation, clipping, the LR schedule,
evaluation, checkpoints, and the reporting sinks of megacpm.train.callbacks.

A run is a pure function of its config: the sample order depends on (seed, sample index), the LR on
the step, and everything else a continuation needs is in the checkpoint, so a run stopped at any
checkpoint and started again reproduces the uninterrupted run step for step.
"""
from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import torch

from megacpm.checkpoint import TrainerState, latest_checkpoint, load_checkpoint, save_checkpoint
from megacpm.checkpoint.atomic import write_text_atomic
from megacpm.config import Config, dump_yaml
from megacpm.data import build_datasets, get_batch
from megacpm.model import MiniCPM
from megacpm.optim import LRSchedule, build_optimizer, clip_grad_norm_, set_lr
from megacpm.train.callbacks import Console, GpuMonitor, MetricsFile, TensorBoard
from megacpm.train.device import autocast_dtype, resolve_device

IGNORE_INDEX = -100


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/inf; nothing was saved for that step."""


@dataclass
class RunResult:
    status: str  # "completed" | "interrupted" | "already-complete"
    step: int
    last_loss: Optional[float]
    last_eval_loss: Optional[float]
    run_dir: Path


class StopRequest:
    """SIGTERM / first Ctrl-C ask the loop to checkpoint and leave after the current step.

    A second Ctrl-C interrupts at once (the default behaviour), for a user who means it.
    """

    def __init__(self) -> None:
        self.requested: Optional[str] = None
        self._previous: Dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopRequest"]:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)


class Trainer:
    def __init__(self, cfg: Config, print_fn: Callable[[str], None] = print):
        self.cfg = cfg
        self.print = print_fn
        self.run_dir = Path(cfg.run.dir)
        self.device = resolve_device(cfg)
        self.amp_dtype = autocast_dtype(cfg, self.device)
        if cfg.train.num_threads > 0:
            torch.set_num_threads(cfg.train.num_threads)

        t = cfg.train
        self.micro_batches = t.global_batch_size // t.micro_batch_size  # one data-parallel rank
        self.data = build_datasets(cfg.data, vocab_size=cfg.model.vocab_size, seq_len=t.seq_len, seed=t.seed)

        init_generator = torch.Generator().manual_seed(t.seed)
        self.model = MiniCPM(cfg.model, activation_checkpointing=t.activation_checkpointing)
        self.model.init_weights(init_generator)
        self.model.to(self.device)
        self.optimizer = build_optimizer(self.model, cfg.model, cfg.optim)
        self.schedule = LRSchedule.from_config(cfg.schedule, cfg.optim.lr, t.steps)
        self.state = TrainerState()

    # -- one step -------------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _micro_batches(self, samples: torch.Tensor) -> List[torch.Tensor]:
        return list(samples.split(self.cfg.train.micro_batch_size))

    def train_step(self, step: int) -> Dict[str, float]:
        """Forward/backward over this step's micro-batches, clip, update. Returns loss and grad norm."""
        t = self.cfg.train
        samples = get_batch(self.data.train, self.state.consumed_samples, t.global_batch_size)
        samples = samples.to(self.device, non_blocking=True)
        # Token-weighted mean over the whole global batch: every micro-batch's summed loss is
        # divided by the global count of target tokens, so the gradient is that of one big batch.
        num_targets = int((samples[:, 1:] != IGNORE_INDEX).sum())
        self.model.train()
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        for micro in self._micro_batches(samples):
            with self._autocast():
                micro_loss, _ = self.model.loss(micro[:, :-1], micro[:, 1:], ignore_index=IGNORE_INDEX)
            (micro_loss / max(num_targets, 1)).backward()
            loss_sum += micro_loss.detach()
        loss = float(loss_sum) / max(num_targets, 1)
        grad_norm = float(clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad))
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            last = latest_checkpoint(self.run_dir)
            raise TrainingDiverged(
                f"step {step}: non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} "
                f"(loss {loss}, grad_norm {grad_norm}); stopped without saving this step; "
                f"last checkpoint: {last if last is not None else 'none'}"
            )
        lr = self.schedule(step)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step = step
        self.state.consumed_samples += t.global_batch_size
        self.state.tokens += num_targets
        return {"loss": loss, "grad_norm": grad_norm, "lr": lr}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean token loss on the first eval_batches micro-batches of the validation split."""
        t = self.cfg.train
        self.model.eval()
        total, count = 0.0, 0
        for i in range(t.eval_batches):
            samples = get_batch(self.data.valid, i * t.micro_batch_size, t.micro_batch_size).to(self.device)
            with self._autocast():
                loss_sum, num = self.model.loss(samples[:, :-1], samples[:, 1:], ignore_index=IGNORE_INDEX)
            total += float(loss_sum)
            count += int(num)
        return total / max(count, 1)

    # -- the run --------------------------------------------------------------------------------
    def _resume(self) -> None:
        checkpoint = latest_checkpoint(self.run_dir)
        if checkpoint is not None:
            self.state = load_checkpoint(checkpoint, self.cfg, self.model, self.optimizer)
            self.print(f"resumed from {checkpoint} (step {self.state.step})")

    def _save(self) -> Path:
        return save_checkpoint(self.run_dir, self.cfg, self.model, self.optimizer, self.state)

    def run(self) -> RunResult:
        cfg, t = self.cfg, self.cfg.train
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.run_dir / "config.yaml", dump_yaml(cfg))
        self._resume()
        if self.state.step >= t.steps:
            self.print(f"{self.run_dir}: already at step {self.state.step} of {t.steps}; nothing to do "
                       f"(raise train.steps to continue)")
            return RunResult("already-complete", self.state.step, None, None, self.run_dir)

        sinks = [MetricsFile(self.run_dir / "metrics.jsonl", resume_step=self.state.step)]
        if cfg.log.tensorboard:
            sinks.append(TensorBoard(self.run_dir / "tb"))
        console = Console(t.steps, self.state.step, cfg.log.progress)
        sinks.append(console)
        gpu = GpuMonitor.create(self.device.index or 0) if cfg.log.nvml and self.device.type == "cuda" else None
        status, metrics, eval_loss = "completed", None, None
        console.message(
            f"training {self.run_dir} from step {self.state.step + 1} to {t.steps} on {self.device} "
            f"({'bf16 autocast' if self.amp_dtype else 'fp32'}; {t.global_batch_size} x {t.seq_len} tokens/step)"
        )
        try:
            with StopRequest().installed() as stop:
                window_start, window_tokens = time.monotonic(), 0
                for step in range(self.state.step + 1, t.steps + 1):
                    tokens_before = self.state.tokens
                    metrics = self.train_step(step)
                    window_tokens += self.state.tokens - tokens_before
                    console.step_done()
                    last_step = step == t.steps
                    if step % t.log_interval == 0 or step == 1 or last_step:
                        elapsed = time.monotonic() - window_start
                        record = {"step": step, **metrics, "tokens": self.state.tokens,
                                  "tokens_per_sec": window_tokens / max(elapsed, 1e-9)}
                        if gpu is not None:
                            record.update(gpu.sample())
                        for sink in sinks:
                            sink.write(record)
                        window_start, window_tokens = time.monotonic(), 0
                    if t.eval_batches and (step % t.eval_interval == 0 or last_step):
                        eval_loss = self.evaluate()
                        for sink in sinks:
                            sink.write({"step": step, "eval_loss": eval_loss})
                    interval = cfg.checkpoint.interval
                    if last_step or (interval and step % interval == 0) or stop.requested:
                        path = self._save()
                        if stop.requested:
                            console.message(f"{stop.requested}: saved {path}; stopping at step {step}")
                            status = "interrupted"
                            break
        finally:
            for sink in sinks:
                sink.close()
        last_loss = metrics["loss"] if metrics else None
        return RunResult(status, self.state.step, last_loss, eval_loss, self.run_dir)
