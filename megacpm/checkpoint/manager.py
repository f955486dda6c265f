"""Checkpoints of a run: ``RUN/checkpoints/step_N/`` plus a ``latest`` pointer.

Layout of one checkpoint directory:
  state/              torch.distributed.checkpoint (DCP) of the weights and AdamW moments in model
                      space (megacpm.checkpoint.model_space), so any later layout can reshard it
  trainer_state.json  format version, step, optimizer steps, consumed samples, tokens, model shape
  rng/rank_R.json     each rank's python, numpy and torch RNG states (exact resume)
  config.yaml         the run's config at save time

Saving is collective: every rank writes its shards into ``.tmp-step_N``; rank 0 then writes the
metadata, fsyncs and renames the directory, and rewrites ``latest`` atomically afterwards, so
``latest`` always names a complete checkpoint whatever moment a crash strikes. A save that fails
(a full disk, an interrupt) removes its temporary directory before raising. Which checkpoint a
resume continues from (and what "complete" means) is megacpm.checkpoint.catalog's.
"""
from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import random
import shutil
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Dict, Optional, Protocol

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from megacpm.checkpoint.catalog import (FORMAT_VERSION, SHAPE_FIELDS, CheckpointError, checkpoint_problem, saved_shape,
                                        latest_checkpoint, list_checkpoints, read_trainer_state)
from megacpm.checkpoint.model_space import MOMENTS, HostCopyStager, state_to_load, state_to_save
from megacpm.config import Config, ModelConfig, dump_yaml
from megacpm.io.atomic import TMP_PREFIX, fsync_dir, fsync_tree, remove_stale_tmp, write_text_atomic
from megacpm.io.errors import describe_os_error
from megacpm.io.run_dir import (CONFIG_FILE, LATEST_FILE, STATE_DIR, TRAINER_STATE_FILE, checkpoints_dir, rng_file,
                                step_dir_name)
from megacpm.optim.sharded_optimizer import ShardedOptimizer
from megacpm.parallel.context import ParallelContext
from megacpm.parallel.sharded_model import ShardedModel

__all__ = ["CheckpointError", "FORMAT_VERSION", "PendingSave", "Trainable", "TrainerState", "latest_checkpoint",
           "list_checkpoints", "load_checkpoint", "load_model_weights", "read_trainer_state", "read_weights",
           "save_checkpoint", "save_checkpoint_async", "save_weights"]


class Trainable(Protocol):
    """What a checkpoint saves and restores: a sharded model and its optimizer (megacpm.train's
    TrainModule is one); checkpoint/ knows nothing more of training."""

    ctx: ParallelContext
    model: ShardedModel
    optimizer: ShardedOptimizer



@dataclass
class TrainerState:
    step: int = 0  # training steps completed
    optimizer_steps: int = 0  # AdamW's step count (bias correction)
    consumed_samples: int = 0  # samples consumed since the run began (all data configs)
    tokens: int = 0  # training tokens consumed
    # The data position: the current data config (its signature) started at sample data_start of
    # the run, so its stream is at consumed_samples - data_start. A branch with a new mixture
    # starts that mixture's stream from its beginning.
    data_start: int = 0
    data_signature: str = ""
    # train.seq_len of the samples counted (0: a checkpoint from before it was recorded). A run that
    # resumes with another length continues its stream at the same token count.
    seq_len: int = 0


def _rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": base64.b64encode(torch.random.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.random.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(
            [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in state["cuda"]]
        )


def _root_cause(exc: BaseException) -> BaseException:
    """The underlying error of a DCP failure (DCP wraps each rank's exception, often in a chain)."""
    for _ in range(8):
        failures = getattr(exc, "failures", None)
        if failures:
            exc = next(iter(failures.values()))
            exc = exc[0] if isinstance(exc, tuple) else exc
        elif exc.__cause__ is not None:
            exc = exc.__cause__
        else:
            break
    return exc


def _first_cause(exc: BaseException) -> str:
    exc = _root_cause(exc)
    if isinstance(exc, OSError):
        return describe_os_error(exc)
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _model_shape(model_cfg: ModelConfig) -> Dict[str, Any]:
    return {k: getattr(model_cfg, k) for k in SHAPE_FIELDS}


@contextlib.contextmanager
def _dcp_logs_silenced():
    """DCP logs each failure with its traceback before raising; the caller turns the exception into
    one line naming the file, so DCP's own loggers are held back meanwhile."""
    loggers = [logging.getLogger(name) for name in ("torch.distributed.checkpoint", "torch.distributed.checkpoint.logger",
                                                      "torch.distributed.checkpoint.utils")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _dcp_quiet(fn, *args, **kwargs):
    # DCP warns that it runs without a process group: that is the intended single-process mode.
    with warnings.catch_warnings(), _dcp_logs_silenced():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        return fn(*args, **kwargs)


def _on_rank0(ctx: ParallelContext, action, doing: str = ""):
    """Run ``action`` on rank 0 only; every rank gets its result, or raises its CheckpointError
    (prefixed with what was being done, e.g. "saving step_5: ")."""
    result, error = None, None
    if ctx.rank == 0:
        try:
            result = action()
        except OSError as exc:
            error = doing + describe_os_error(exc)
        except CheckpointError as exc:
            error = doing + str(exc)
    if ctx.world_size > 1:
        shared = [result, error]
        dist.broadcast_object_list(shared, src=0)
        result, error = shared
    if error is not None:
        raise CheckpointError(error)
    return result


def _barrier(ctx: ParallelContext) -> None:
    if ctx.world_size > 1:
        dist.barrier()


def save_checkpoint(run_dir: str | Path, cfg: Config, trainable: Trainable, state: TrainerState) -> Path:
    """Write ``checkpoints/step_<state.step>`` atomically, point ``latest`` at it, rotate old ones.

    Collective: every rank of the run calls it.
    """
    return _save(run_dir, cfg, trainable.ctx, state, lambda: state_to_save(trainable.model, trainable.optimizer),
                 with_optimizer=True)


class PendingSave:
    """A checkpoint being written in the background (``save_checkpoint_async``).

    ``done()`` is this rank's view; ``finish()`` (collective, every rank at the same step) waits for
    the writes and then publishes the checkpoint: rename, ``latest``, rotation. A write that failed
    on any rank fails ``finish()`` on every rank, and the temporary directory is removed.
    """

    def __init__(self, future, ctx: ParallelContext, publish, abandon, path: Path):
        self._future, self._ctx, self._publish, self._abandon, self.path = future, ctx, publish, abandon, path

    def done(self) -> bool:
        return self._future is None or self._future.done()

    def finish(self) -> Path:
        error = None
        if self._future is not None:
            try:
                self._future.result()
            except (Exception, CheckpointException) as exc:
                error = f"{self.path}: background write failed ({_first_cause(exc)})"
        if self._ctx.world_size > 1:  # every rank learns of any rank's failure: all publish, or none
            errors = [None] * self._ctx.world_size
            dist.all_gather_object(errors, error)
            error = next((e for e in errors if e is not None), None)
        if error is not None:
            if self._ctx.rank == 0:
                self._abandon()
            raise CheckpointError(error)
        _on_rank0(self._ctx, self._publish, f"saving {self.path.name}: ")
        return self.path


def save_checkpoint_async(run_dir: str | Path, cfg: Config, trainable: Trainable, state: TrainerState) -> PendingSave:
    """Start ``save_checkpoint`` in a background thread. The state is copied to host memory before
    this returns, so training may go on changing the weights; call ``finish()`` on the result before
    the next save. Collective: every rank of the run calls it."""
    return _save(run_dir, cfg, trainable.ctx, state, lambda: state_to_save(trainable.model, trainable.optimizer),
                 with_optimizer=True, background=True)


def save_weights(run_dir: str | Path, cfg: Config, weights: Dict[str, torch.Tensor],
                 state: Optional[TrainerState] = None) -> Path:
    """A weights-only checkpoint written by one process (the converter's output): model-space
    tensors by name. A run resuming from it starts a fresh optimizer (zero moments, step count 0)."""
    return save_model_space(run_dir, cfg, {"model": weights}, state or TrainerState())


def save_model_space(run_dir: str | Path, cfg: Config, state_dict: Dict[str, Dict],
                     state: TrainerState) -> Path:
    """A checkpoint written by one process from whole model-space tensors, laid out as
    megacpm.checkpoint.model_space describes ({"model": ...} and optionally "optim" and "buffers").
    With "optim" a run resuming from it continues those AdamW moments at ``state.optimizer_steps``;
    without, it starts a fresh optimizer. The RNG states saved are this process's."""
    return _save(run_dir, cfg, ParallelContext.single(), state, lambda: state_dict, with_optimizer="optim" in state_dict)


def _pointer_name(root: Path) -> Optional[str]:
    try:
        return (root / LATEST_FILE).read_bytes().decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None


def _save(run_dir: str | Path, cfg: Config, ctx: ParallelContext, state: TrainerState, dcp_state,
          with_optimizer: bool, background: bool = False):
    state = replace(state)  # as of now: a background save is published after the trainer moved on
    root = checkpoints_dir(run_dir)
    final = root / step_dir_name(state.step)
    tmp = root / f"{TMP_PREFIX}{final.name}"

    def abandon() -> None:
        shutil.rmtree(tmp, ignore_errors=True)

    def prepare() -> bool:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(root)  # a crashed save's leftovers: the run lock says no other save is live
        if final.exists() and _pointer_name(root) == final.name and checkpoint_problem(final) is None:
            return False  # saved already: this run's checkpoint of this step is the one latest names
        # Any other existing step_N is stale (a rolled-back latest, written just before a crash moved
        # the pointer, or damaged): this save replaces it, at publication.
        rng_file(tmp, 0).parent.mkdir(parents=True)
        return True

    doing = f"saving {final.name}: "
    if not _on_rank0(ctx, prepare, doing):
        return PendingSave(None, ctx, lambda: None, lambda: None, final) if background else final
    future = None
    try:
        write_text_atomic(rng_file(tmp, ctx.rank), json.dumps(_rng_state()))
        if background:
            # DCP copies the tensors to host memory, then writes from a thread coordinating over its
            # own group while this thread's collectives go on.
            future = _dcp_quiet(dcp.async_save, dcp_state(), checkpoint_id=str(tmp / STATE_DIR),
                                process_group=ctx.background_group, no_dist=ctx.world_size == 1,
                                async_stager=HostCopyStager())
        else:
            _dcp_quiet(dcp.save, dcp_state(), checkpoint_id=str(tmp / STATE_DIR))
    except (Exception, CheckpointException, KeyboardInterrupt) as exc:
        if ctx.rank == 0:  # DCP fails every rank alike: each stops here; rank 0 owns the directory
            abandon()
        if isinstance(exc, KeyboardInterrupt) or isinstance(_root_cause(exc), KeyboardInterrupt):
            raise KeyboardInterrupt from None  # a second Ctrl-C: the save is abandoned, latest untouched
        if isinstance(exc, OSError):
            raise CheckpointError(doing + describe_os_error(exc)) from None
        raise CheckpointError(doing + _first_cause(exc)) from None
    if not background:
        _barrier(ctx)

    def finalize() -> None:
        meta = {"format_version": FORMAT_VERSION, **asdict(state), "optimizer": with_optimizer,
                "model": _model_shape(cfg.model),
                "layout": {"world_size": ctx.world_size, "tp": ctx.layout.tp, "pp": ctx.layout.pp,
                           "vpp": ctx.layout.vpp, "zero1": cfg.parallel.zero1}}
        try:
            (tmp / TRAINER_STATE_FILE).write_text(json.dumps(meta, indent=1))
            (tmp / CONFIG_FILE).write_text(dump_yaml(cfg))
            fsync_tree(tmp)
        except BaseException:
            abandon()
            raise
        if final.exists():
            # The stale checkpoint leaves under a temporary name (removed by any later save if a
            # crash strikes in between), then the new one takes its name; latest names neither.
            stale = root / f"{TMP_PREFIX}stale-{final.name}"
            os.rename(final, stale)
            os.rename(tmp, final)
            fsync_dir(root)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.rename(tmp, final)
            fsync_dir(root)
        write_text_atomic(root / LATEST_FILE, final.name)
        _rotate(root, cfg.checkpoint.keep, state.step)

    if background:
        return PendingSave(future, ctx, finalize, abandon, final)
    _on_rank0(ctx, finalize, doing)
    return final


def _rotate(root: Path, keep: int, newest: int) -> None:
    """Keep the ``keep`` newest checkpoints up to ``newest`` (the one latest now names); never one
    past it: those are stale ones the coming saves replace, and deleting them is not rotation's call.
    A checkpoint leaves by rename first, so a crash mid-delete never leaves a partial step_N."""
    if keep <= 0:
        return
    steps = [step for step in list_checkpoints(root.parent) if step <= newest]
    for step in steps[:-keep]:
        doomed = root / f"{TMP_PREFIX}rotated-{step_dir_name(step)}"
        os.rename(root / step_dir_name(step), doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def _check_model_shape(path: Path, meta: Dict[str, Any], model_cfg: ModelConfig) -> None:
    saved = saved_shape(meta.get("model", {}))
    for key, value in _model_shape(model_cfg).items():
        if saved[key] != value:
            raise CheckpointError(f"{path}: model.{key} is {saved.get(key)!r} in the checkpoint but {value!r} in the config")


def _load_dcp(path: Path, model: ShardedModel, with_optimizer: bool) -> Dict[str, Dict[str, torch.Tensor]]:
    """This rank's slices of the checkpoint's fp32 masters (and moments) as {name: {...}}."""
    state_dir = path / STATE_DIR
    if not (state_dir / ".metadata").is_file():
        raise CheckpointError(f"{state_dir / '.metadata'}: missing (incomplete checkpoint)")
    target, local = state_to_load(model, with_optimizer)
    try:
        _dcp_quiet(dcp.load, target, checkpoint_id=str(state_dir))
    except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
        raise CheckpointError(f"{state_dir}: cannot be read ({_first_cause(exc)})") from None
    return local


def load_checkpoint(path: str | Path, cfg: Config, trainable: Trainable, with_optimizer: bool = True) -> TrainerState:
    """Load weights (and AdamW moments) into this rank's part of the model, under any layout, and
    this rank's RNG states. Collective: every rank of the run calls it."""
    path = Path(path)
    meta = read_trainer_state(path)
    _check_model_shape(path, meta, cfg.model)
    with_optimizer = with_optimizer and meta.get("optimizer", True)  # weights-only: a fresh optimizer
    local = _load_dcp(path, trainable.model, with_optimizer)
    trainable.optimizer.load_state_by_name(local, int(meta["optimizer_steps"]) if with_optimizer else 0)
    # A rank that did not exist when the checkpoint was written (a larger layout) takes rank 0's.
    rank_path = rng_file(path, trainable.ctx.rank)
    rng_path = rank_path if rank_path.is_file() else rng_file(path, 0)
    try:
        _set_rng_state(json.loads(rng_path.read_bytes().decode("utf-8")))
    except FileNotFoundError:
        raise CheckpointError(f"{rng_path}: missing (incomplete checkpoint)") from None
    except (ValueError, KeyError, TypeError, IndexError) as exc:  # JSON, UTF-8 and shape errors alike
        raise CheckpointError(f"{rng_path}: corrupted ({type(exc).__name__}); the checkpoint's RNG states "
                              f"cannot be restored") from None
    return TrainerState(step=int(meta["step"]), optimizer_steps=int(meta["optimizer_steps"]),
                        consumed_samples=int(meta["consumed_samples"]), tokens=int(meta["tokens"]),
                        data_start=int(meta.get("data_start", 0)), data_signature=str(meta.get("data_signature", "")),
                        seq_len=int(meta.get("seq_len", 0)))


@torch.no_grad()
def load_model_weights(path: str | Path, model: ShardedModel) -> None:
    """The weights of a checkpoint into a sharded model with no optimizer (a frozen reference, an
    evaluation), under any layout; RNG states and trainer state are left alone. Collective."""
    path = Path(path)
    _check_model_shape(path, read_trainer_state(path), model.cfg)
    local = _load_dcp(path, model, with_optimizer=False)
    for name, param in model.params_by_name().items():
        param.copy_(local[name]["master"])


def read_state(path: str | Path, model_cfg: ModelConfig, shapes: Dict[str, torch.Size]) -> Dict[str, Dict]:
    """A checkpoint's whole model-space state in one process, whatever layout wrote it: {"model":
    fp32 weights, "optim": {"exp_avg": ..., "exp_avg_sq": ...}} (the moments zero when the
    checkpoint holds none: a weights-only one)."""
    path = Path(path)
    meta = read_trainer_state(path)
    _check_model_shape(path, meta, model_cfg)
    def zeros() -> Dict[str, torch.Tensor]:
        return {name: torch.zeros(shape, dtype=torch.float32) for name, shape in shapes.items()}

    state = {"model": zeros(), "optim": {key: zeros() for key in MOMENTS}}
    target = state if meta.get("optimizer", True) else {"model": state["model"]}  # weights-only: moments stay 0
    try:
        _dcp_quiet(dcp.load, target, checkpoint_id=str(path / STATE_DIR))
    except (Exception, CheckpointException) as exc:
        raise CheckpointError(f"{path / STATE_DIR}: cannot be read ({_first_cause(exc)})") from None
    return state


def read_router_biases(path: str | Path, model_cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """An MoE checkpoint's router biases (auxiliary-loss-free balancing's routing state) by
    model-space name, whole, in one process; {} for a dense model or a checkpoint without them."""
    if not model_cfg.is_moe:
        return {}
    path = Path(path)
    state_dir = path / STATE_DIR
    try:
        saved = dcp.FileSystemReader(str(state_dir)).read_metadata().state_dict_metadata
        names = [key.split(".", 1)[1] for key in saved if key.startswith("buffers.")]
        biases = {name: torch.zeros(model_cfg.num_experts) for name in names}
        if biases:
            _dcp_quiet(dcp.load, {"buffers": biases}, checkpoint_id=str(state_dir))
    except (Exception, CheckpointException) as exc:
        raise CheckpointError(f"{state_dir}: cannot be read ({_first_cause(exc)})") from None
    return biases


def read_weights(path: str | Path, model_cfg: ModelConfig, shapes: Dict[str, torch.Size]) -> Dict[str, torch.Tensor]:
    """A checkpoint's fp32 model-space weights, whole, in one process (whatever layout wrote them)."""
    path = Path(path)
    _check_model_shape(path, read_trainer_state(path), model_cfg)
    weights = {name: torch.zeros(shape, dtype=torch.float32) for name, shape in shapes.items()}
    try:
        _dcp_quiet(dcp.load, {"model": weights}, checkpoint_id=str(path / STATE_DIR))
    except (Exception, CheckpointException) as exc:
        raise CheckpointError(f"{path / STATE_DIR}: cannot be read ({_first_cause(exc)})") from None
    return weights

