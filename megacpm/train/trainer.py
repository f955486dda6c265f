"""The training loop around megacpm.train.train_module.TrainModule (one optimizer step under any
tensor / sequence / pipeline / data-parallel layout; a single process is the layout of one): the LR
schedule, resuming, and the steps; everything else around a step (logs, evaluation, checkpoints,
stopping, profiling) is a callback of megacpm.train.callbacks, called by ``Trainer.run``.

A run is a pure function of its config: the sample order depends on (seed, sample index), the LR on
the step, and everything else a continuation needs is in the checkpoint, so a run stopped at any
checkpoint and started again reproduces the uninterrupted run step for step, under any layout.

Under torchrun every rank runs this loop on the same global batch (each takes its slice); losses and
gradient norms are global, so every rank takes the same decisions. Only rank 0 writes the run
directory's logs; checkpoints are written by all ranks together.

Opening a run (``_open_run``) validates before it writes: the run lock of an existing run first
(a second trainer is refused before it reads anything), then the checkpoint to resume from, loaded
in full; only then does rank 0 create the directory, take the lock for the run's life and write
config.yaml. A rejected start leaves the run directory byte-identical.
"""
from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megacpm.checkpoint import (CheckpointError, PendingSave, TrainerState, latest_checkpoint, load_checkpoint,
                                resolve_init_source, resolve_resume, save_checkpoint, save_checkpoint_async)
from megacpm.io.atomic import remove_stale_tmp, write_text_atomic
from megacpm.io.errors import print_warning
from megacpm.io.run_lock import RunLock
from megacpm.io.run_dir import CONFIG_FILE, METRICS_FILE, PROFILE_DIR, REFERENCE_FILE, TENSORBOARD_DIR
from megacpm.config import Config, dump_yaml
from megacpm.data import Batch, DataBundle, DataError, build_datasets, data_signature
from megacpm.optim import LRSchedule
from megacpm.parallel.context import ParallelContext
from megacpm.train.callbacks import (Callback, CallbackList, Checkpointing, CommStats, CompileMonitor, Console,
                                     Evaluation, GpuMonitor, MetricsFile, Profiler, StepRecords, TensorBoard, WandB)
from megacpm.train.device import param_dtype, resolve_device
from megacpm.train.reference import (LiveReference, PrecomputedReference, load_reference_table, reference_identity,
                                     reference_model, save_reference_table, score_split)
from megacpm.train.train_module import TrainModule


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/inf; nothing was saved for that step."""


@dataclass
class RunResult:
    status: str  # "completed" | "interrupted" | "already-complete"
    step: int
    last_loss: Optional[float]
    last_eval_loss: Optional[float]
    run_dir: Path


class Trainer:
    def __init__(self, cfg: Config, print_fn: Callable[[str], None] = print,
                 ctx: Optional[ParallelContext] = None):
        # Set by a callback (the checkpointing one after a stop's save) to leave after the current step.
        self.should_stop = False
        self.last_eval_loss: Optional[float] = None  # the latest evaluation (the Evaluation callback)
        self.callbacks = CallbackList()  # empty until run() builds this run's
        self._extra_callbacks: Tuple[Callback, ...] = ()
        self.cfg = cfg
        self.print = print_fn
        self.run_dir = Path(cfg.run.dir)
        p, t = cfg.parallel, cfg.train
        if ctx is None:
            ctx = ParallelContext.initialize(p.tp, p.pp, p.vpp, timeout_s=p.timeout_s,
                                             device_type=resolve_device(cfg).type, cp=p.cp, ep=p.ep)
        self.ctx = ctx
        self.is_rank0 = ctx.rank == 0
        self.device = ctx.device
        self.param_dtype = param_dtype(cfg, self.device)
        if t.num_threads > 0:
            torch.set_num_threads(t.num_threads)
        self.data = self._build_data()
        # Every rank builds the full model from the same seed, then keeps its shard: a parallel run
        # starts from exactly the single-process weights.
        self.module = TrainModule(cfg, ctx, generator=torch.Generator().manual_seed(t.seed),
                                  param_dtype=self.param_dtype)
        self.schedule = LRSchedule.from_config(cfg.schedule, cfg.optim.lr, t.steps)
        self.state = TrainerState()
        self.pending: Optional[PendingSave] = None  # a checkpoint being written in the background
        self.reference = None  # DPO: what attaches the reference model's scores to each batch
        # DPO precompute, set by _open_run: (what the table must be made from, the usable saved table or None)
        self._reference_table: Optional[Tuple[Dict, Optional[Dict]]] = None
        self.lock = RunLock(self.run_dir)  # held by rank 0 for the run's life (the job's lock)

    def _build_data(self) -> DataBundle:
        """Datasets on every rank; local rank 0 first, so the others find the tokenizer and token
        caches written instead of all training the tokenizer at once."""
        t = self.cfg.train

        def build() -> DataBundle:
            return build_datasets(self.cfg.data, vocab_size=self.cfg.model.vocab_size, seq_len=t.seq_len, seed=t.seed,
                                  warn=self._warn)

        if self.ctx.world_size == 1:
            return build()
        first = int(os.environ.get("LOCAL_RANK", "0")) == 0
        data, error = None, None
        if first:
            try:
                data = build()
            except DataError as exc:
                error = exc
        dist.barrier()
        if error is not None:
            raise error
        return data if first else build()

    # -- one step -------------------------------------------------------------------------------
    def train_step(self, step: int) -> Dict[str, float]:
        """One optimizer step on the next global batch. Returns the step's metrics: loss, grad norm,
        LR and the objective's own (global, the same on every rank)."""
        t = self.cfg.train
        batch = self.next_batch()
        if self.reference is not None:
            batch = self.reference.attach(batch, "train")
        lr = self.schedule(step)
        metrics = self.module.step(batch, lr)
        loss, grad_norm = metrics["loss"], metrics["grad_norm"]
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            try:
                last = latest_checkpoint(self.run_dir)
            except CheckpointError:
                last = None
            raise TrainingDiverged(
                f"diverged at step {step}: non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} "
                f"(loss {loss}, grad_norm {grad_norm}); stopped without saving this step; "
                f"last checkpoint: {last if last is not None else 'none'}"
            )
        self.state.step = step
        self.state.optimizer_steps += 1
        self.state.consumed_samples += t.global_batch_size
        self.state.tokens += batch.num_loss_tokens()
        return {"loss": loss, "grad_norm": grad_norm, "lr": lr,
                **{k: v for k, v in metrics.items() if k not in ("loss", "grad_norm")}}

    def next_batch(self) -> Batch:
        """The global batch of the coming step: the current data config's stream at its position."""
        position = self.state.consumed_samples - self.state.data_start
        return self.data.train_batch(position, self.cfg.train.global_batch_size)

    def evaluate(self) -> Dict[str, float]:
        """The objective's metrics, as eval_<name>, on the first eval_batches * micro_batch_size
        validation samples (the same samples, and so the same values, under every layout)."""
        t = self.cfg.train
        batch = self.data.eval_batch(t.eval_batches * t.micro_batch_size)
        if self.reference is not None:
            batch = self.reference.attach(batch, "valid")
        return {f"eval_{name}": value for name, value in self.module.evaluate(batch).items()}

    # -- the run --------------------------------------------------------------------------------
    def _open_run(self) -> None:
        """Validate, then lock and write (see the module docstring)."""
        ctx = self.ctx
        # An existing run's lock, before reading anything of it (creating nothing).
        ctx.run_on_rank0(lambda: self.run_dir.is_dir() and self.lock.acquire(create=False))
        resume = ctx.run_on_rank0(lambda: resolve_resume(self.run_dir))
        if resume.warning:
            self._warn(resume.warning)
        self._resume(resume.path)  # collective; raises CheckpointError for a checkpoint this config cannot take
        self._reference_table = self._check_saved_reference()  # raises for a table this run cannot use

        def create() -> None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()  # a new run: two trainers racing to create it, one wins here
            self.lock.announce()
            remove_stale_tmp(self.run_dir)  # a write a crash interrupted (the lock is ours: nobody else writes)
            write_text_atomic(self.run_dir / CONFIG_FILE, dump_yaml(self.cfg))

        ctx.run_on_rank0(create)

    def _resume(self, checkpoint: Optional[Path]) -> None:
        signature = data_signature(self.cfg.data)
        if checkpoint is None and self.cfg.train.init_from:  # a fresh run only: a resumed one ignores it
            source = self._init_source
            self.module.load_initial_weights(source)
            self._message(f"initial weights from {source.describe()} (optimizer and step fresh)")
        if checkpoint is not None:
            self.state = load_checkpoint(checkpoint, self.cfg, self.module)
            self._message(f"resumed from {checkpoint} (step {self.state.step})")
            if self.state.data_signature and self.state.data_signature != signature:
                self.state.data_start = self.state.consumed_samples
                self._message(f"the data config differs from the checkpoint's: its stream starts at step "
                              f"{self.state.step + 1} from its first sample")
            elif self.state.seq_len and self.state.seq_len != self.cfg.train.seq_len:
                self._continue_stream_at_new_length()
        self.state.data_signature = signature
        self.state.seq_len = self.cfg.train.seq_len

    def _continue_stream_at_new_length(self) -> None:
        """A resumed run (a long-context branch) with another train.seq_len: the same stream of
        samples, now of the new length, continues at the same token count (the position counts
        samples: position * old length tokens were read)."""
        old, new = self.state.seq_len, self.cfg.train.seq_len
        position = self.state.consumed_samples - self.state.data_start
        continued = -(-position * old // new)
        self.state.data_start = self.state.consumed_samples - continued
        self._message(f"train.seq_len is {new}, the checkpoint's samples had {old} tokens: the stream continues at "
                      f"sample {continued} of {new} tokens (sample {position} of {old})")

    @functools.cached_property
    def _init_source(self):
        """train.init_from resolved once (on rank 0, shared; every rank reaches it at the same point)."""
        init_from = self.cfg.train.init_from
        return self.ctx.run_on_rank0(lambda: resolve_init_source(init_from)) if init_from else None

    def _reference_identity(self) -> Dict:
        """What the precomputed table must have been made from: this run's data, model and initial
        weights (train.init_from's file fingerprint, or the seed)."""
        from megacpm.checkpoint import init_fingerprint  # loaded when used

        source = self._init_source
        init = (self.ctx.run_on_rank0(lambda: init_fingerprint(source)) if source is not None
                else f"seed {self.cfg.train.seed}")
        return json.loads(json.dumps(reference_identity(self.cfg, self.data.signature, init), sort_keys=True))

    def _check_saved_reference(self) -> Optional[Tuple[Dict, Optional[Dict]]]:
        """DPO precompute: (this run's table identity, the run directory's tables when they match it,
        else None: to be scored, none yet or made for other data); a resumed run whose initial weights
        changed since is refused here, before anything is written. None for other runs."""
        cfg = self.cfg
        if cfg.objective.kind != "dpo" or cfg.objective.reference != "precompute":
            return None
        path = self.run_dir / REFERENCE_FILE
        identity = self._reference_identity()
        saved = self.ctx.run_on_rank0(lambda: load_reference_table(path))
        if saved is None:
            if self.state.step > 0:
                self._warn(f"{path}: missing; scoring the reference again from the initial weights")
            return identity, None
        tables, stored = saved
        if stored == identity:
            return identity, tables
        if stored.get("init") != identity["init"] and self.state.step > 0:
            raise CheckpointError(
                f"{path}: the reference scores were computed from other initial weights than train.init_from "
                f"{cfg.train.init_from or '(none: the seeded initialisation)'} now holds; restore those "
                f"weights, or delete {path.name} to score with the current ones")
        self._message(f"{path.name}: made for another data or model config; scoring again")
        return identity, None

    def _prepare_reference(self):
        """DPO's reference scores (after _open_run): a frozen model (live), or the table of every
        pair's scores (precompute): the run directory's when _open_run found it usable, else
        scored now with the initial weights and written there atomically."""
        cfg, ctx = self.cfg, self.ctx
        if cfg.objective.kind != "dpo":
            return None
        micro_rows = self.module.micro_batch_rows
        if cfg.objective.reference == "live":
            return LiveReference(reference_model(cfg, ctx, self.param_dtype, self._init_source), ctx, micro_rows)
        identity, saved = self._reference_table
        if saved is not None:
            return PrecomputedReference(saved)
        # A fresh run's policy still holds the initial weights: it scores, and no copy is built.
        model = (self.module.model if self.state.step == 0
                 else reference_model(cfg, ctx, self.param_dtype, self._init_source))
        self._message(f"reference (objective.reference precompute): scoring {self.data.train.num_samples} train and "
                      f"{self.data.valid.num_samples} validation pairs with the initial weights")
        tables = {split: score_split(model, ctx, dataset, micro_rows, cfg.train.global_batch_size)
                  for split, dataset in (("train", self.data.train), ("valid", self.data.valid))}
        ctx.run_on_rank0(lambda: save_reference_table(self.run_dir / REFERENCE_FILE, tables, identity))
        return PrecomputedReference(tables)

    def _save(self, background: bool = False) -> Path:
        """Checkpoint the current step (after publishing any save still in flight)."""
        self._finish_pending()
        if background:
            self.pending = save_checkpoint_async(self.run_dir, self.cfg, self.module, self.state)
            return self.pending.path
        return save_checkpoint(self.run_dir, self.cfg, self.module, self.state)

    def _finish_pending(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.finish()

    def _message(self, text: str) -> None:
        if self.is_rank0:
            self.print(text)

    def _warn(self, text: str) -> None:
        if self.is_rank0:
            print_warning(text)

    def add_callback(self, callback: Callback) -> None:
        """A callback of this trainer's runs, after the standard ones (see default_callbacks)."""
        self._extra_callbacks = (*self._extra_callbacks, callback)

    def default_callbacks(self) -> List[Callback]:
        """The standard callbacks, in the order they are called. The record builder first (it asks the
        comm/GPU callbacks for their fields and hands the record to the sinks), the sinks on rank 0
        only, then evaluation and checkpoints (collective: every rank), the profiler (every rank)."""
        cfg = self.cfg
        # The compile monitor first, so a step's record already counts that step's recompiles.
        callbacks: List[Callback] = [CompileMonitor()] if cfg.train.compile else []
        callbacks += [StepRecords(), CommStats()]
        if self.is_rank0:
            if self.device.type == "cuda":
                callbacks.append(GpuMonitor(self.device.index or 0, use_nvml=cfg.log.nvml))
            callbacks.append(MetricsFile(self.run_dir / METRICS_FILE))
            if cfg.log.tensorboard:
                callbacks.append(TensorBoard(self.run_dir / TENSORBOARD_DIR))
            callbacks.append(Console(cfg.log.progress))
        if cfg.log.wandb:
            callbacks.append(WandB(active=self.is_rank0))  # on every rank: a missing package fails all alike
        callbacks += [Evaluation(), Checkpointing()]
        if cfg.log.profile_steps:
            callbacks.append(Profiler(self.run_dir / PROFILE_DIR, cfg.log.profile_steps))
        return callbacks

    def _describe(self) -> str:
        t, layout = self.cfg.train, self.ctx.layout
        where = f"{self.device}" if layout.world_size == 1 else (
            f"{layout.world_size} ranks (tp {layout.tp} x pp {layout.pp} x dp {layout.dp}"
            f"{f', vpp {layout.vpp}' if layout.vpp > 1 else ''}"
            f"{', sp' if self.cfg.parallel.sp else ''}{', zero1' if self.cfg.parallel.zero1 else ''}) "
            f"on {self.device.type}")
        return (f"training {self.run_dir} from step {self.state.step + 1} to {t.steps} on {where} "
                f"({'bf16 with fp32 master weights' if self.param_dtype == torch.bfloat16 else 'fp32'}; "
                f"{self._batch_shape()} tokens/step{'; compiled blocks' if t.compile else ''})")

    def _batch_shape(self) -> str:
        t, rows = self.cfg.train, self.module.objective.rows_per_sample
        if rows == 1:
            return f"{t.global_batch_size} x {t.seq_len}"
        return f"{t.global_batch_size} pairs x {rows} x {t.seq_len}"

    def run(self) -> RunResult:
        try:
            return self._run()
        finally:
            self.lock.release()

    def _run(self) -> RunResult:
        t = self.cfg.train
        self._open_run()
        if self.state.step >= t.steps:
            self._message(f"{self.run_dir}: already at step {self.state.step} of {t.steps}; nothing to do "
                          f"(raise train.steps to continue)")
            return RunResult("already-complete", self.state.step, None, None, self.run_dir)
        self.reference = self._prepare_reference()

        callbacks = self.callbacks = CallbackList([*self.default_callbacks(), *self._extra_callbacks])
        self.should_stop, self.last_eval_loss, metrics, result = False, None, None, None
        try:
            callbacks.on_train_start(self)
            for step in range(self.state.step + 1, t.steps + 1):
                with callbacks.step_context(self, step):
                    metrics = self.train_step(step)
                callbacks.on_step_end(self, step, metrics)
                if self.should_stop:
                    break
            result = RunResult("interrupted" if self.should_stop else "completed", self.state.step,
                               metrics["loss"], self.last_eval_loss, self.run_dir)
        except TrainingDiverged:
            self._finish_pending()  # an earlier step's checkpoint is good: publish it (every rank is here)
            raise
        finally:
            callbacks.on_train_end(self, result)
        return result
