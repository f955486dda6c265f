"""Which checkpoints a run has, which of them are complete, and which one a resume continues from.

``latest`` is the run's pointer, rewritten atomically after each save; but a user can delete it, a
tool can scribble over it, a crash can land between a checkpoint's rename and the pointer's update,
and a user can roll it back by hand to redo a stretch of training. So the pointer is trusted only
when it names a complete checkpoint; otherwise the newest complete checkpoint is found by scanning,
and the caller prints why (``Resume.warning``). Complete means every file the format needs is there
and readable: the trainer state (validated field by field), the config, rank 0's RNG file, DCP's
metadata, and every data file that metadata refers to, at least as long as the bytes it claims.

Nothing here writes: resolving a resume must leave a run it then rejects byte-identical.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from megacpm.io.run_dir import (CONFIG_FILE, LATEST_FILE, STATE_DIR, STEP_DIR, TRAINER_STATE_FILE, checkpoint_step,
                                checkpoints_dir, rng_file, step_dir_name)

PathLike = Union[str, Path]

FORMAT_VERSION = 2  # 2: model-space DCP of any layout, per-rank RNG files
# Model fields that change a tensor's shape: a checkpoint cannot load into a model differing in them.
SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "tie_word_embeddings", "num_experts")
# What a checkpoint written before a field existed had: its shape is read with these filled in.
SHAPE_DEFAULTS = {"num_experts": 0}
# trainer_state.json's counters: each a non-negative int.
COUNTER_FIELDS = ("step", "optimizer_steps", "consumed_samples", "tokens")


def saved_shape(model_fields: Dict[str, Any]) -> Dict[str, Any]:
    """The SHAPE_FIELDS of a checkpoint's recorded model fields, older checkpoints' defaults filled in."""
    return {key: model_fields.get(key, SHAPE_DEFAULTS.get(key)) for key in SHAPE_FIELDS}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: the message names the file or field."""


def read_trainer_state(path: PathLike) -> Dict[str, Any]:
    """A checkpoint's trainer_state.json, validated: a JSON object of this format version whose
    counters are non-negative ints. Any other content is one CheckpointError naming file and field."""
    meta_path = Path(path) / TRAINER_STATE_FILE
    try:
        meta = json.loads(meta_path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{meta_path}: missing (incomplete or foreign checkpoint)") from None
    except IsADirectoryError:
        raise CheckpointError(f"{meta_path}: a directory, not the checkpoint's state file") from None
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{meta_path}: not UTF-8 text (byte at offset {exc.start}; corrupted checkpoint)") from None
    except json.JSONDecodeError:
        raise CheckpointError(f"{meta_path}: not valid JSON (corrupted checkpoint)") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path}: a JSON {type(meta).__name__}, not an object (corrupted checkpoint)")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    for key in COUNTER_FIELDS:
        value = meta.get(key)
        if type(value) is not int or value < 0:
            raise CheckpointError(f"{meta_path}: field {key!r} is {value!r}, expected a non-negative integer")
    for key, kind in (("data_start", int), ("data_signature", str), ("seq_len", int), ("model", dict)):
        if key in meta and not isinstance(meta[key], kind):
            raise CheckpointError(f"{meta_path}: field {key!r} is {meta[key]!r}, expected {kind.__name__}")
    return meta


def checkpoint_problem(path: PathLike) -> Optional[str]:
    """Why the checkpoint directory ``path`` cannot be resumed from, or None when it is complete."""
    path = Path(path)
    if not path.is_dir():
        return "not a directory"
    try:
        meta = read_trainer_state(path)
    except CheckpointError as exc:
        return str(exc)
    step = checkpoint_step(path)
    if step is not None and meta["step"] != step:
        return f"{path / TRAINER_STATE_FILE}: says step {meta['step']}, the directory step {step}"
    for needed in (path / CONFIG_FILE, rng_file(path, 0)):
        if not needed.is_file():
            return f"{needed}: missing"
    return _dcp_problem(path / STATE_DIR)


def _dcp_problem(state_dir: Path) -> Optional[str]:
    """Whether DCP's metadata reads and every file it refers to holds the bytes it claims."""
    if not (state_dir / ".metadata").is_file():
        return f"{state_dir / '.metadata'}: missing"
    import torch.distributed.checkpoint as dcp  # local: listing runs must not load DCP

    try:
        metadata = dcp.FileSystemReader(str(state_dir)).read_metadata()
    except Exception as exc:  # noqa: BLE001 - any unreadable metadata makes the checkpoint incomplete
        return f"{state_dir / '.metadata'}: unreadable ({type(exc).__name__})"
    needed: Dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, size in needed.items():
        file = state_dir / name
        try:
            have = file.stat().st_size
        except OSError:
            return f"{file}: missing"
        if have < size:
            return f"{file}: truncated ({have} of {size} bytes)"
    return None


def list_checkpoints(run_dir: PathLike) -> List[int]:
    """Steps of the run's ``step_N`` directories, ascending (complete unless damaged after the fact:
    a directory gets its final name only once written; ``checkpoint_problem`` tells)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir())


@dataclass
class Resume:
    """Where a run continues: ``path`` (None: from scratch), a one-line ``warning`` when the pointer
    could not be followed as it was, and ``newer``: the steps of checkpoints past ``path`` (a crash
    right after a rename, or a hand-rolled-back ``latest``), which the next saves replace."""

    path: Optional[Path]
    warning: Optional[str] = None
    newer: List[int] = field(default_factory=list)

    @property
    def step(self) -> int:
        return checkpoint_step(self.path) if self.path is not None else 0


def _pointer(root: Path) -> "tuple[Optional[Path], Optional[str]]":
    """(the complete checkpoint ``latest`` names, or None with why it cannot be followed)."""
    pointer = root / LATEST_FILE
    if not pointer.exists():
        return None, f"{pointer} is missing"
    try:
        name = pointer.read_bytes().decode("ascii").strip()
    except (UnicodeDecodeError, OSError) as exc:
        return None, f"{pointer} is unreadable ({type(exc).__name__})"
    if not STEP_DIR.match(name):
        return None, f"{pointer} holds {name[:40]!r}, not a checkpoint name"
    problem = checkpoint_problem(root / name)
    if problem == "not a directory":
        return None, f"{pointer} names {name}, which does not exist"
    if problem is not None:
        return None, f"{pointer} names {name}, which is incomplete ({problem})"
    return root / name, None


def resolve_resume(run_dir: PathLike) -> Resume:
    """The checkpoint a run in ``run_dir`` continues from (see the module docstring). Raises
    CheckpointError when the run had checkpoints but none complete is left: starting over from step
    1 would silently throw away the run's history, so that takes a user's decision."""
    root = checkpoints_dir(run_dir)
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"{root}: a file, not the run's checkpoints directory")
    steps = list_checkpoints(run_dir)
    if not root.is_dir() or (not steps and not (root / LATEST_FILE).exists()):
        return Resume(None)
    named, why = _pointer(root)
    if named is not None:
        newer = [s for s in steps if s > checkpoint_step(named)]
        warning = None
        if newer:
            warning = (f"{root / LATEST_FILE} names {named.name}, but {', '.join(step_dir_name(s) for s in newer)} "
                       f"{'is' if len(newer) == 1 else 'are'} newer (rolled back by hand, or a crash before the "
                       f"pointer moved): resuming from {named.name}; later saves replace the newer ones")
        return Resume(named, warning, newer)
    for step in reversed(steps):
        if checkpoint_problem(root / step_dir_name(step)) is None:
            newer = [s for s in steps if s > step]
            return Resume(root / step_dir_name(step), f"{why}: resuming from {step_dir_name(step)}, "
                                                      f"the newest complete checkpoint", newer)
    raise CheckpointError(f"{why}, and no complete checkpoint is left in {root}: refusing to restart the run "
                          f"from step 1 over its history; move {run_dir} away (or delete {root}) to start anew")


def latest_checkpoint(run_dir: PathLike) -> Optional[Path]:
    """The checkpoint a resume of ``run_dir`` would load (None: the run has none); see resolve_resume."""
    return resolve_resume(run_dir).path
