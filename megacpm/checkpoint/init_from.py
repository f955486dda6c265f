"""``train.init_from``: a fresh run that starts from given weights (fine-tuning), with a fresh
optimizer and step.

    source = resolve_init_source(cfg.train.init_from)    # which directory, of which kind
    load_initial_weights(source, cfg.model, model)       # this rank's shards of the weights
    init_fingerprint(source)                             # to tell later that its files changed

The source is one of:
  a megacpm run directory         its latest complete checkpoint (megacpm.checkpoint.catalog)
  a megacpm checkpoint directory  ``RUN/checkpoints/step_N`` (complete, or refused)
  a Hugging Face MiniCPM dir      config.json + safetensors / pytorch_model.bin (megacpm.huggingface)

Only the weights are read (a checkpoint's AdamW moments, RNG states and counters are not). Whatever
the layout (tp, pp, vpp, dp, zero1), each rank copies into its parameters its own part of each
model-space tensor, as the parameter's ParamSpec describes it. The model's shape (catalog's
SHAPE_FIELDS) must be the source's: a difference is one CheckpointError naming every differing
field with both values.

Note for the caller: ShardedOptimizer copies the parameters into its fp32 masters when it is built,
so weights loaded into a model whose optimizer already exists must be handed to that optimizer
too (``load_state_by_name`` with zero moments and step count 0), or they are overwritten by the
first step.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List

from megacpm.checkpoint.catalog import (SHAPE_FIELDS, CheckpointError, checkpoint_problem, list_checkpoints,
                                        read_trainer_state, resolve_resume, saved_shape)
from megacpm.io.errors import describe_os_error
from megacpm.io.run_dir import (CHECKPOINTS_DIR, CONFIG_FILE, LATEST_FILE, STEP_DIR, TRAINER_STATE_FILE,
                                checkpoint_step, checkpoints_dir, step_dir_name)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from megacpm.config import ModelConfig
    from megacpm.parallel.context import ParallelContext
    from megacpm.parallel.sharded_model import ShardedModel

__all__ = ["CHECKPOINT", "HUGGINGFACE", "InitSource", "init_fingerprint", "load_initial_weights", "local_part",
           "resolve_init_source"]

CHECKPOINT = "checkpoint"
HUGGINGFACE = "huggingface"
HF_CONFIG = "config.json"  # megacpm.huggingface.CONFIG (not imported here: that module pulls in the model)
EXPECTED = ("train.init_from expects a megacpm run directory, a megacpm checkpoint directory or a Hugging Face "
            "MiniCPM directory")


@dataclass(frozen=True)
class InitSource:
    """Where a run's initial weights come from: ``kind`` CHECKPOINT (``path`` a megacpm checkpoint
    directory; for a run directory, its latest complete checkpoint) or HUGGINGFACE (``path`` the
    Hugging Face directory); ``given``: what the user wrote."""

    kind: str
    path: Path
    given: str

    def describe(self) -> str:
        """One line for the log: ``runs/tiny/checkpoints/step_200 (megacpm checkpoint, step 200)``."""
        if self.kind == HUGGINGFACE:
            return f"{self.path} (Hugging Face MiniCPM directory)"
        step = checkpoint_step(self.path)
        if step is None:
            try:
                step = read_trainer_state(self.path)["step"]
            except (CheckpointError, OSError):
                return f"{self.path} (megacpm checkpoint)"
        return f"{self.path} (megacpm checkpoint, step {step})"


# -- which directory -------------------------------------------------------------------------------
def _is_run_directory(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() or checkpoints_dir(path).is_dir()


def _looks_like_checkpoints_dir(path: Path) -> bool:
    """A run's ``checkpoints/`` itself (its ``latest`` or step_N directories), given by mistake."""
    try:
        return (path / LATEST_FILE).is_file() or any(STEP_DIR.match(p.name) and p.is_dir() for p in path.iterdir())
    except OSError:
        return False


def _latest_of_run(run_dir: Path) -> Path:
    """The run's latest complete checkpoint (the one a resume would continue from)."""
    try:
        latest = resolve_resume(run_dir).path
    except CheckpointError:
        # Checkpoints exist but none is complete (resolve_resume's message is about restarting the run).
        steps = list_checkpoints(run_dir)
        newest = checkpoints_dir(run_dir) / step_dir_name(steps[-1]) if steps else None
        why = f"; the newest, {newest.name}: {checkpoint_problem(newest)}" if newest is not None else ""
        raise CheckpointError(f"{run_dir}: a megacpm run directory without a complete checkpoint{why} "
                              f"(train.init_from needs a complete checkpoint)") from None
    if latest is None:
        raise CheckpointError(f"{run_dir}: a megacpm run directory without a checkpoint yet "
                              f"(train.init_from needs a complete checkpoint in {checkpoints_dir(run_dir)})")
    return latest


def resolve_init_source(path: str) -> InitSource:
    """What ``train.init_from`` names: a megacpm run directory (its latest complete checkpoint), a
    megacpm checkpoint directory, or a Hugging Face MiniCPM directory (config.json). Anything else
    (a missing path, a file, a run without a complete checkpoint, an incomplete checkpoint, a
    directory that is none of these) is one CheckpointError line naming the path and what was
    expected. Reads only small files (no weights)."""
    from megacpm.huggingface import is_hf_directory  # local: it imports the model

    p = Path(os.path.expanduser(str(path)))
    try:
        if not p.exists():
            raise CheckpointError(f"{p}: does not exist ({EXPECTED})")
        if not p.is_dir():
            raise CheckpointError(f"{p}: a file, not a directory ({EXPECTED})")
        if (p / TRAINER_STATE_FILE).is_file():
            problem = checkpoint_problem(p)
            if problem is not None:
                raise CheckpointError(f"{p}: an incomplete megacpm checkpoint ({problem}); "
                                      f"train.init_from needs a complete one")
            return InitSource(CHECKPOINT, p, str(path))
        if _is_run_directory(p):
            return InitSource(CHECKPOINT, _latest_of_run(p), str(path))
        if is_hf_directory(p):
            return InitSource(HUGGINGFACE, p, str(path))
        hint = ""
        if p.name == CHECKPOINTS_DIR and _looks_like_checkpoints_dir(p):
            hint = f"; this looks like a run's {CHECKPOINTS_DIR}/ directory: give the run directory {p.parent}"
        raise CheckpointError(f"{p}: neither a megacpm run directory ({CONFIG_FILE} or {CHECKPOINTS_DIR}/), "
                              f"a megacpm checkpoint ({TRAINER_STATE_FILE}) nor a Hugging Face MiniCPM "
                              f"directory ({HF_CONFIG}){hint} ({EXPECTED})")
    except OSError as exc:  # a permission, a broken mount: one line naming the path
        raise CheckpointError(f"{describe_os_error(exc)} ({EXPECTED})") from None


# -- the weights -----------------------------------------------------------------------------------
def local_part(full: "torch.Tensor", param: "nn.Parameter", ctx: "ParallelContext") -> "torch.Tensor":
    """This rank's part of the model-space tensor ``full`` (single-process name and shape) for
    ``param``: the inverse of ShardedModel.global_view. A tensor-parallel weight is cut along its
    ParamSpec's shard dim into tp equal contiguous pieces (torch.chunk's split); a padded vocabulary
    (tp does not divide it) is first completed with zero rows, so the padding rows stay zero. A
    replicated parameter gets ``full`` itself; MoE experts are first cut along dim 0 into ep pieces
    (this EP rank's experts). (The cut is megacpm.parallel.layers.shard, the one the plans shard the
    initial weights with.)"""
    from megacpm.parallel.layers import shard
    from megacpm.parallel.param_spec import param_spec

    spec = param_spec(param)
    unknown = sorted(set(spec.shard_dims) - {"tp", "ep"})
    if unknown:  # no plan splits a parameter over another axis (cp splits tokens only): never guess a slice
        raise RuntimeError(f"a parameter split over {unknown}: local_part cuts only tp and ep slices; the plan "
                           f"that introduced that split must teach it the cut")
    part = full
    if spec.shard_dim("ep") is not None:  # experts: this EP rank's contiguous E / ep of them
        part = shard(part, spec.shard_dim("ep"), ctx.group("ep"))
    dim = spec.shard_dim("tp")
    if dim is None:
        return part
    return shard(part, dim, ctx.group("tp"), pad=spec.padded_rows is not None)


def _shape_differences(source: Dict, model_cfg: "ModelConfig", where: str) -> List[str]:
    source = saved_shape(source)
    return [f"{key} is {source[key]!r} in {where} but {getattr(model_cfg, key)!r} in the config"
            for key in SHAPE_FIELDS if source[key] != getattr(model_cfg, key)]


def _refuse_other_shape(path: Path, differences: List[str]) -> None:
    if differences:
        raise CheckpointError(f"{path}: the model's shape differs from the source's "
                              f"({'; '.join(differences)}); train.init_from loads weights of the same shape only")


def _load_huggingface(source: InitSource, model_cfg: "ModelConfig", model: "ShardedModel") -> None:
    import torch

    from megacpm.huggingface import model_config_from_hf, read_hf_weights

    hf_cfg = model_config_from_hf(source.path)
    _refuse_other_shape(source.path, _shape_differences({k: getattr(hf_cfg, k) for k in SHAPE_FIELDS}, model_cfg,
                                                        HF_CONFIG))
    weights = read_hf_weights(source.path, hf_cfg)  # fp32, whole, checked against config.json's shapes
    with torch.no_grad():
        for name, param in model.params_by_name().items():
            key = model.model_space_name(name, param)  # the last stage's tied copy: the embedding
            part = local_part(weights[key], param, model.ctx)
            if part.shape != param.shape:  # a model that is not model_cfg's: a caller's bug
                raise CheckpointError(f"{source.path}: tensor {key} gives this rank a {tuple(part.shape)} part, "
                                      f"the parameter {name} is {tuple(param.shape)}")
            param.copy_(part)  # cast to the parameter's dtype, onto its device


def load_initial_weights(source: InitSource, model_cfg: "ModelConfig", model: "ShardedModel") -> None:
    """The source's weights into this rank's shards of ``model`` (built for ``model_cfg``), under any
    layout; optimizer state is never read, RNG states are left alone. A megacpm checkpoint goes
    through the model-only DCP load (collective: every rank calls it); a Hugging Face directory is
    read whole by every rank (no collective). A model shape that differs from the source's is one
    CheckpointError naming each differing field with both values and the source's path."""
    if source.kind == HUGGINGFACE:
        _load_huggingface(source, model_cfg, model)
        return
    if source.kind != CHECKPOINT:
        raise ValueError(f"unknown InitSource kind {source.kind!r} (expected {CHECKPOINT!r} or {HUGGINGFACE!r})")
    from megacpm.checkpoint.manager import load_model_weights  # local: DCP and the model

    meta = read_trainer_state(source.path)
    saved = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    _refuse_other_shape(source.path, _shape_differences(saved, model_cfg, "the checkpoint"))
    load_model_weights(source.path, model)


# -- identity of the source's files ----------------------------------------------------------------
def _is_metadata(name: str) -> bool:
    return name in (HF_CONFIG, TRAINER_STATE_FILE, ".metadata") or name.endswith(".index.json")


def _files(root: Path) -> List[Path]:
    """Every file under ``root``, relative, sorted; hidden directories (a download tool's ``.cache/``,
    ``.git/``) are left out: their content changes without the weights changing."""
    found: List[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=_raise):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        relative = Path(dirpath).relative_to(root)
        found.extend(relative / name for name in filenames)
    return sorted(found, key=lambda p: p.as_posix())


def _raise(exc: OSError) -> None:
    raise exc


def init_fingerprint(source: InitSource) -> str:
    """A cheap identity of the source's files (hex sha256), to tell later that they changed: the
    kind, every file's relative name and size, and the whole content of the small metadata files
    (config.json, trainer_state.json, DCP's .metadata, *.index.json). Weight files are not read, so a
    same-size rewrite of one goes unnoticed."""
    digest = hashlib.sha256(f"megacpm init_from v1 {source.kind}\n".encode())
    try:
        files = _files(source.path)
        for relative in files:
            size = (source.path / relative).stat().st_size
            digest.update(f"file {relative.as_posix()} {size}\n".encode())
        for relative in files:
            if _is_metadata(relative.name):
                content = (source.path / relative).read_bytes()
                digest.update(f"content {relative.as_posix()} {len(content)}\n".encode())
                digest.update(content)
    except OSError as exc:
        raise CheckpointError(f"{describe_os_error(exc)} (fingerprinting train.init_from's {source.path})") from None
    return digest.hexdigest()
