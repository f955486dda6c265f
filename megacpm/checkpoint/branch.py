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

import errno
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from megacpm.checkpoint.manager import CheckpointError, latest_checkpoint, read_trainer_state
from megacpm.io.atomic import TMP_PREFIX, atomic_directory
from megacpm.io.run_dir import (CHECKPOINTS_DIR, CONFIG_FILE, LATEST_FILE, LINEAGE_FILE, TRAINER_STATE_FILE,
                                checkpoint_step, checkpoints_dir, read_metrics)


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


def _link_or_copy_tree(source: Path, target: Path) -> None:
    """Hard-link every file of ``source`` under ``target`` (checkpoint files are never rewritten in
    place, so sharing inodes is safe); copy when the filesystems differ."""
    for dirpath, _dirnames, filenames in os.walk(source):
        relative = Path(dirpath).relative_to(source)
        (target / relative).mkdir(parents=True, exist_ok=True)
        for name in filenames:
            src, dst = Path(dirpath) / name, target / relative / name
            try:
                os.link(src, dst)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    raise
                shutil.copy2(src, dst)


def create_branch(checkpoint: Path, new_run: Path, config_yaml: str, overrides: Iterable[str]) -> Path:
    """Assemble the branch run directory ``new_run`` from ``checkpoint`` (see the module docstring)."""
    checkpoint, new_run = Path(checkpoint).resolve(), Path(new_run)
    meta = read_trainer_state(checkpoint)  # refuses an incomplete or foreign checkpoint first
    if new_run.exists():
        raise CheckpointError(f"{new_run}: already exists; a branch is created in a new directory")
    if checkpoint_step(checkpoint) is None:
        raise CheckpointError(f"{checkpoint}: not a checkpoints/step_N directory")
    parent_run = checkpoint.parent.parent
    with atomic_directory(new_run) as tmp:
        _link_or_copy_tree(checkpoint, checkpoints_dir(tmp) / checkpoint.name)
        (checkpoints_dir(tmp) / LATEST_FILE).write_text(checkpoint.name)
        (tmp / CONFIG_FILE).write_text(config_yaml)
        lineage = {"parent_run": str(parent_run), "parent_checkpoint": str(checkpoint),
                   "step": int(meta["step"]), "tokens": int(meta["tokens"]),
                   "consumed_samples": int(meta["consumed_samples"]), "overrides": list(overrides)}
        (tmp / LINEAGE_FILE).write_text(json.dumps(lineage, indent=1))
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


def _last_metrics(run: Path) -> Dict[str, float]:
    found: Dict[str, float] = {}
    for record in read_metrics(run):
        for key in ("loss", "eval_loss", "tokens"):
            if key in record:
                found[key] = record[key]
    return found


def summarize_run(run: Path) -> RunSummary:
    lineage_path = run / LINEAGE_FILE
    lineage = json.loads(lineage_path.read_text()) if lineage_path.is_file() else {}
    try:
        latest = latest_checkpoint(run)
    except CheckpointError:
        latest = None
    step = checkpoint_step(latest) if latest is not None else None
    metrics = _last_metrics(run)
    return RunSummary(run, Path(lineage["parent_run"]).resolve() if lineage else None, lineage.get("step"),
                      step, metrics.get("tokens"), metrics.get("loss"), metrics.get("eval_loss"))


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
