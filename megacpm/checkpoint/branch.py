"""Checkpoint branching: a new run that starts from another run's checkpoint (MiniCPM's WSD decays
from any stable checkpoint, two-stage pretraining with a new data mixture), and the tree of runs.

A branch directory is an ordinary run directory:
  config.yaml               the parent's config with the branch's overrides, run.dir = the branch
  lineage.json              the parent run and checkpoint, the step branched at, the overrides
  checkpoints/step_N/       the parent's checkpoint, hard-linked file by file (copied across
                            filesystems), so it survives the parent rotating that checkpoint away
  checkpoints/latest        step_N
``megacpm train BRANCH`` resumes from step_N with the branch's own schedule and data. The parent is
only read. The branch is assembled under a temporary name and renamed, so it exists complete or not
at all.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import yaml

from megacpm.checkpoint.catalog import SHAPE_FIELDS, CheckpointError, latest_checkpoint, read_trainer_state, saved_shape
from megacpm.checkpoint.reshape import RESHAPE_FIELDS, check_reshape, parent_model, reshaped_state
from megacpm.config import Config, dump_yaml
from megacpm.io.atomic import TMP_PREFIX, atomic_directory
from megacpm.io.errors import decode_cause, os_error_cause
from megacpm.io.run_dir import (CHECKPOINTS_DIR, CONFIG_FILE, LATEST_FILE, LINEAGE_FILE, REFERENCE_FILE,
                                TRAINER_STATE_FILE, checkpoint_step, checkpoints_dir, read_metrics)


def resolve_checkpoint(source: str | Path) -> Path:
    """SOURCE as a checkpoint directory: a checkpoint itself, or a run directory (its latest)."""
    path = Path(source)
    if (path / TRAINER_STATE_FILE).is_file():
        return path
    if (path / CONFIG_FILE).is_file():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"{path}: the run has no checkpoint yet")
        return latest
    raise CheckpointError(f"{path}: neither a run directory ({CONFIG_FILE}) nor a checkpoint ({TRAINER_STATE_FILE})")


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (run files are replaced by renames, never rewritten in place, so sharing the inode
    is safe); a copy when the filesystems differ."""
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        shutil.copy2(src, dst)


def _link_or_copy_tree(source: Path, target: Path) -> None:
    """Every file of ``source`` under ``target``, linked or copied."""
    for dirpath, _dirnames, filenames in os.walk(source):
        relative = Path(dirpath).relative_to(source)
        (target / relative).mkdir(parents=True, exist_ok=True)
        for name in filenames:
            link_or_copy(Path(dirpath) / name, target / relative / name)


# Model fields a branch may change although they are in SHAPE_FIELDS: untying the embeddings and
# growing the vocabulary, mapped by megacpm.checkpoint.reshape. A branch otherwise continues the
# checkpoint's weights, so every tensor keeps its shape (upcycling, megacpm upcycle, adds experts).
ALLOWED_SHAPE_CHANGES: frozenset = RESHAPE_FIELDS


def _override_spelling(key: str, overrides: Iterable[str]) -> str:
    for override in overrides:
        if override.lstrip("-").split("=", 1)[0] == f"model.{key}":
            return override
    return f"model.{key}"


def check_branch_shape(checkpoint: Path, meta: Dict, config_yaml: str, overrides: Iterable[str],
                       allowed: Iterable[str] = ALLOWED_SHAPE_CHANGES) -> None:
    """Refuse a branch whose model shape differs from the checkpoint's (SHAPE_FIELDS, less the
    explicitly ``allowed`` changes: upcycling's num_experts): its weights could never load. One line
    naming the key, the checkpoint's value and the new one."""
    allowed = frozenset(allowed)
    saved = meta.get("model")
    try:
        new = (yaml.safe_load(config_yaml) or {}).get("model") or {}
    except (yaml.YAMLError, AttributeError):
        raise CheckpointError("the branch's config is not a YAML mapping") from None
    if not isinstance(saved, dict) or not isinstance(new, dict):
        return  # an older checkpoint without its shape: the load's own check speaks at train time
    saved = saved_shape(saved)
    for key in SHAPE_FIELDS:
        if key in allowed or key not in new:
            continue
        if saved[key] != new[key]:
            raise CheckpointError(
                f"{_override_spelling(key, overrides)}: the checkpoint {checkpoint} has model.{key} = {saved[key]!r}, "
                f"the branch asks for {new[key]!r}; a branch continues the checkpoint's weights, so the model's "
                f"shape ({', '.join(k for k in SHAPE_FIELDS if k not in allowed)}) cannot change")


def lineage_record(checkpoint: Path, meta: Dict, overrides: Iterable[str]) -> Dict:
    """lineage.json of a run started from ``checkpoint`` (its trainer state ``meta``)."""
    return {"parent_run": str(checkpoint.parent.parent), "parent_checkpoint": str(checkpoint),
            "step": int(meta["step"]), "tokens": int(meta["tokens"]),
            "consumed_samples": int(meta["consumed_samples"]), "overrides": list(overrides)}


def write_derived_checkpoint(run_dir: Path, cfg: Config, state: Dict[str, Dict], meta: Dict, checkpoint: Path,
                             optimizer_steps: Optional[int] = None) -> Path:
    """A checkpoint of ``run_dir`` holding ``state`` (model space, ``cfg``'s shape) that continues
    ``checkpoint`` (its trainer state ``meta``): the parent's step, tokens, samples and data position,
    its AdamW step count (unless ``optimizer_steps``) and every rank's RNG state. The branch-like
    runs whose weights are a function of the parent's write one (upcycling, a reshaping branch)."""
    from megacpm.checkpoint.manager import TrainerState, save_model_space  # local: DCP and the model
    from megacpm.io.run_dir import rng_file

    carried = {key: int(meta.get(key, 0)) for key in ("step", "consumed_samples", "tokens", "data_start", "seq_len")}
    steps = int(meta["optimizer_steps"]) if optimizer_steps is None else optimizer_steps
    trainer_state = TrainerState(optimizer_steps=steps, data_signature=str(meta.get("data_signature", "")), **carried)
    saved = save_model_space(run_dir, cfg, state, trainer_state)
    rng_dir = rng_file(saved, 0).parent
    for source in rng_file(checkpoint, 0).parent.glob("rank_*.json"):
        (rng_dir / source.name).unlink(missing_ok=True)
        link_or_copy(source, rng_dir / source.name)
    return saved


def _reshaped_checkpoint_state(checkpoint: Path, meta: Dict, cfg: Config) -> Dict[str, Dict]:
    """The parent's model-space state in the branch's shape (megacpm.checkpoint.reshape)."""
    from megacpm.checkpoint.manager import read_router_biases, read_state  # local: DCP and the model
    from megacpm.model.params import parameter_shapes

    parent = parent_model(cfg.model, saved_shape(meta["model"]))
    state = reshaped_state(read_state(checkpoint, parent, parameter_shapes(parent)), parent, cfg.model)
    biases = read_router_biases(checkpoint, parent)
    if biases:
        state["buffers"] = biases
    if not meta.get("optimizer", True):
        state.pop("optim")  # a weights-only parent: the branch starts a fresh optimizer too
    return state


def create_branch(checkpoint: Path, new_run: Path, cfg: Config, overrides: Iterable[str]) -> Path:
    """Assemble the branch run directory ``new_run`` from ``checkpoint`` with config ``cfg`` (see
    the module docstring).

    Refused before anything is written: an unusable checkpoint, an existing ``new_run``, and a
    config that changes the model's shape (check_branch_shape) other than by untying the embeddings
    or growing the vocabulary; those two write the branch its own checkpoint, the parent's state in
    the new shape (megacpm.checkpoint.reshape). What branching is for (schedule, optim.lr, the data
    mixture, train.steps, train.seq_len, RoPE's base and scaling, ...) may change freely."""
    checkpoint, new_run = Path(checkpoint).resolve(), Path(new_run)
    overrides = list(overrides)
    config_yaml = dump_yaml(cfg)
    meta = read_trainer_state(checkpoint)  # validated: refuses an incomplete, corrupt or foreign checkpoint first
    check_branch_shape(checkpoint, meta, config_yaml, overrides)
    reshape = isinstance(meta.get("model"), dict) and check_reshape(
        saved_shape(meta["model"]), dataclasses.asdict(cfg.model), lambda key: _override_spelling(key, overrides),
        checkpoint)
    if new_run.exists():
        raise CheckpointError(f"{new_run}: already exists; a branch is created in a new directory")
    if checkpoint_step(checkpoint) is None:
        raise CheckpointError(f"{checkpoint}: not a checkpoints/step_N directory")
    parent_run = checkpoint.parent.parent
    state = _reshaped_checkpoint_state(checkpoint, meta, cfg) if reshape else None
    with atomic_directory(new_run) as tmp:
        if reshape:
            write_derived_checkpoint(tmp, cfg, state, meta, checkpoint)
        else:
            _link_or_copy_tree(checkpoint, checkpoints_dir(tmp) / checkpoint.name)
            (checkpoints_dir(tmp) / LATEST_FILE).write_text(checkpoint.name)
        (tmp / CONFIG_FILE).write_text(config_yaml)
        (tmp / LINEAGE_FILE).write_text(json.dumps(lineage_record(checkpoint, meta, overrides), indent=1))
        if (parent_run / REFERENCE_FILE).is_file():
            # DPO's precomputed reference scores: derived data the branch's trainer checks against its
            # own data and initial weights (and rescores when they differ), so sharing is safe.
            link_or_copy(parent_run / REFERENCE_FILE, tmp / REFERENCE_FILE)
    return new_run


# -- the tree of runs ------------------------------------------------------------------------------
@dataclass
class RunSummary:
    path: Path
    parent: Optional[Path]  # the parent run, for a branch
    branched_at: Optional[int]
    step: Optional[int]  # of the newest complete checkpoint
    tokens: Optional[int]
    last_loss: Optional[float]
    last_eval_loss: Optional[float]
    problems: Tuple[str, ...] = ()  # state files that could not be read, e.g. "lineage unreadable: ..."


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _last_metrics(run: Path) -> Dict[str, float]:
    """The last finite loss, eval_loss and tokens of RUN/metrics.jsonl (unusable lines skipped)."""
    found: Dict[str, float] = {}
    for record in read_metrics(run):
        for key in ("loss", "eval_loss", "tokens"):
            if _number(record.get(key)) and math.isfinite(record[key]):
                found[key] = record[key]
    return found


def _unreadable(exc: BaseException) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return decode_cause(exc)
    if isinstance(exc, json.JSONDecodeError):
        return f"not valid JSON ({exc.msg} at line {exc.lineno})"
    if isinstance(exc, OSError):
        return os_error_cause(exc)
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def read_lineage(run: Path) -> Optional[Dict]:
    """RUN/lineage.json as {"parent_run": str, "step": int, ...}; None when the run is not a branch.
    A file that cannot be used raises ValueError (the reason)."""
    path = run / LINEAGE_FILE
    if not path.is_file():
        return None
    lineage = json.loads(path.read_bytes().decode("utf-8"))
    if not isinstance(lineage, dict):
        raise ValueError(f"a JSON {type(lineage).__name__}, not an object")
    if not isinstance(lineage.get("parent_run"), str) or not lineage["parent_run"]:
        raise ValueError("no parent_run")
    if not isinstance(lineage.get("step"), int) or isinstance(lineage.get("step"), bool):
        raise ValueError("no integer step")
    return lineage


def summarize_run(run: Path) -> RunSummary:
    """What ``megacpm runs`` shows of one run. It degrades, never fails: a state file that cannot be
    read (corrupt lineage.json, binary bytes in metrics.jsonl, a dangling latest) is named in
    ``problems`` and the rest is shown."""
    problems: List[str] = []
    try:
        lineage = read_lineage(run)
    except (OSError, ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
        lineage = None
        problems.append(f"lineage unreadable: {_unreadable(exc)}")
    try:
        latest = latest_checkpoint(run)
    except (CheckpointError, OSError, ValueError):
        latest = None
        problems.append("checkpoints/latest unreadable")
    step = checkpoint_step(latest) if latest is not None else None
    try:
        metrics = _last_metrics(run)
    except (OSError, ValueError, RecursionError) as exc:
        metrics = {}
        problems.append(f"metrics unreadable: {_unreadable(exc)}")
    parent = Path(lineage["parent_run"]).resolve() if lineage else None
    return RunSummary(run, parent, lineage.get("step") if lineage else None, step, metrics.get("tokens"),
                      metrics.get("loss"), metrics.get("eval_loss"), tuple(problems))


def find_runs(root: Path) -> List[RunSummary]:
    """Every run directory (holding config.yaml) under ``root``, sorted by path."""
    runs = sorted({p.parent.resolve() for p in Path(root).rglob(CONFIG_FILE)
                   if not any(part.startswith(TMP_PREFIX) or part == CHECKPOINTS_DIR for part in p.parts)})
    return [summarize_run(run) for run in runs]


def format_tree(root: Path, runs: List[RunSummary]) -> str:
    """Runs as a tree: each branch under its parent (a parent outside ``root`` is named)."""
    by_parent: Dict[Optional[Path], List[RunSummary]] = {}
    known = {run.path for run in runs}
    for run in runs:
        by_parent.setdefault(run.parent if run.parent in known else None, []).append(run)
    root = Path(root).resolve()

    def describe(run: RunSummary) -> str:
        name = os.path.relpath(run.path, root)
        parts = [f"step {run.step}" if run.step is not None else "no checkpoint"]
        if run.tokens is not None:
            parts.append(f"{run.tokens:,} tokens")
        if run.last_loss is not None:
            parts.append(f"loss {run.last_loss:.4f}")
        if run.last_eval_loss is not None:
            parts.append(f"eval {run.last_eval_loss:.4f}")
        if run.branched_at is not None:
            origin = "" if run.parent in known else f" of {run.parent}"
            parts.append(f"branched at step {run.branched_at}{origin}")
        parts.extend(run.problems)
        return f"{name}  ({', '.join(parts)})"

    lines: List[str] = []

    def walk(parent: Optional[Path], prefix: str) -> None:
        children = by_parent.get(parent, [])
        for i, run in enumerate(children):
            if parent is None:  # a root run: flush left, its branches below it
                lines.append(describe(run))
                walk(run.path, "")
                continue
            last = i == len(children) - 1
            lines.append(f"{prefix}{'└── ' if last else '├── '}{describe(run)}")
            walk(run.path, prefix + ("    " if last else "│   "))

    walk(None, "")
    return "\n".join(lines) if lines else f"{root}: no runs"
