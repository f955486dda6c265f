"""Checkpoints of a run: ``RUN/checkpoints/step_N/`` plus a ``latest`` pointer.

Layout of one checkpoint directory:
  state/              torch.distributed.checkpoint (DCP) of the model and optimizer, keyed by
                      parameter names (model space), so a later layout can reshard it
  trainer_state.json  format version, step, consumed samples, tokens, the model's shape
  rng.json            python, numpy and torch RNG states (exact resume)
  config.yaml         the run's config at save time

The directory is written under a temporary name and renamed when complete; ``latest`` is
rewritten atomically afterwards, so it always names a complete checkpoint.
"""
from __future__ import annotations

import base64
import json
import random
import re
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from megacpm.checkpoint.atomic import atomic_directory, remove_stale_tmp, write_text_atomic
from megacpm.config import Config, ModelConfig, dump_yaml

FORMAT_VERSION = 1
LATEST = "latest"
STEP_DIR = re.compile(r"^step_(\d+)$")
# Model fields that change a tensor's shape: a checkpoint cannot load into a model differing in them.
SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "tie_word_embeddings")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: the message names the file or field."""


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps completed
    consumed_samples: int = 0  # position in the global sample stream
    tokens: int = 0  # training tokens consumed


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> List[int]:
    """Steps of the complete checkpoints of a run, ascending."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    steps = [int(m.group(1)) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(steps)


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    """The checkpoint named by ``latest``, or None when the run has none."""
    root = checkpoints_dir(run_dir)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = root / name
    if not STEP_DIR.match(name) or not path.is_dir():
        raise CheckpointError(f"{pointer}: names '{name}', which is not a checkpoint directory")
    return path


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


def _first_cause(exc: BaseException) -> str:
    """The underlying error of a DCP failure (DCP wraps each rank's exception)."""
    failures = getattr(exc, "failures", None)
    if failures:
        exc = next(iter(failures.values()))
        exc = exc[0] if isinstance(exc, tuple) else exc
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _model_shape(model_cfg: ModelConfig) -> Dict[str, Any]:
    return {k: getattr(model_cfg, k) for k in SHAPE_FIELDS}


def _dcp_quiet(fn, *args, **kwargs):
    # DCP warns that it runs without a process group: that is the intended single-process mode.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        return fn(*args, **kwargs)


def save_checkpoint(run_dir: str | Path, cfg: Config, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, state: TrainerState) -> Path:
    """Write ``checkpoints/step_<state.step>`` atomically, point ``latest`` at it, rotate old ones."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(root)
    final = root / f"step_{state.step}"
    if final.exists():  # saved already (e.g. the end of a run that was interrupted right after)
        write_text_atomic(root / LATEST, final.name)
        return final
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with atomic_directory(final) as tmp:
        _dcp_quiet(dcp.save, {"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "state"))
        meta = {"format_version": FORMAT_VERSION, **asdict(state), "model": _model_shape(cfg.model)}
        (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=1))
        (tmp / "rng.json").write_text(json.dumps(_rng_state()))
        (tmp / "config.yaml").write_text(dump_yaml(cfg))
    write_text_atomic(root / LATEST, final.name)
    _rotate(root, cfg.checkpoint.keep)
    return final


def _rotate(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    steps = list_checkpoints(root.parent)
    for step in steps[:-keep]:
        shutil.rmtree(root / f"step_{step}", ignore_errors=True)


def read_trainer_state(path: Path) -> Dict[str, Any]:
    meta_path = path / "trainer_state.json"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{meta_path}: missing (incomplete or foreign checkpoint)") from None
    except json.JSONDecodeError:
        raise CheckpointError(f"{meta_path}: not valid JSON (corrupted checkpoint)") from None
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    return meta


def load_checkpoint(path: str | Path, cfg: Config, model: torch.nn.Module,
                    optimizer: Optional[torch.optim.Optimizer]) -> TrainerState:
    """Load weights, optimizer state and RNG states from a checkpoint directory into the run."""
    path = Path(path)
    meta = read_trainer_state(path)
    saved_shape, wanted = meta.get("model", {}), _model_shape(cfg.model)
    for key, value in wanted.items():
        if saved_shape.get(key) != value:
            raise CheckpointError(
                f"{path}: model.{key} is {saved_shape.get(key)!r} in the checkpoint but {value!r} in the config"
            )
    model_sd, optim_sd = get_state_dict(model, optimizer) if optimizer is not None else (
        get_state_dict(model, [])[0], None)
    target = {"model": model_sd}
    if optim_sd is not None:
        target["optim"] = optim_sd
    state_dir = path / "state"
    if not (state_dir / ".metadata").is_file():
        raise CheckpointError(f"{state_dir / '.metadata'}: missing (incomplete checkpoint)")
    try:
        _dcp_quiet(dcp.load, target, checkpoint_id=str(state_dir))
    except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
        raise CheckpointError(f"{state_dir}: cannot be read ({_first_cause(exc)})") from None
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"])
    else:
        model.load_state_dict(target["model"])
    rng_path = path / "rng.json"
    try:
        _set_rng_state(json.loads(rng_path.read_text()))
    except (FileNotFoundError, json.JSONDecodeError, KeyError, ValueError):
        raise CheckpointError(f"{rng_path}: missing or corrupted") from None
    return TrainerState(step=int(meta["step"]), consumed_samples=int(meta["consumed_samples"]),
                        tokens=int(meta["tokens"]))
