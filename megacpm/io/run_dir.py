"""The names of a run directory's files and folders: the one place they are spelled.

    RUN/config.yaml                 the resolved config (also inside every checkpoint)
    RUN/metrics.jsonl               one JSON record per logged step (rank 0)
    RUN/tb/                         TensorBoard events
    RUN/profile/                    torch.profiler traces (log.profile_steps)
    RUN/wandb/                      Weights & Biases files (log.wandb), run_id: the W&B run's id
    RUN/lineage.json                a branch's parent checkpoint and step
    RUN/reference_logps.npz         DPO's precomputed reference scores (objective.reference precompute)
    RUN/checkpoints/step_N/         one complete checkpoint
        trainer_state.json, config.yaml, state/ (DCP), rng/rank_R.json
    RUN/checkpoints/latest          the name of the newest complete checkpoint
    RUN/.lock                       the run lock (held by the live trainer; its holder as text)
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Union

PathLike = Union[str, Path]

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tb"
PROFILE_DIR = "profile"
WANDB_DIR = "wandb"
LINEAGE_FILE = "lineage.json"
REFERENCE_FILE = "reference_logps.npz"  # derived from the data and the initial weights; rebuilt when missing
CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
LOCK_FILE = ".lock"  # the run lock (megacpm.io.run_lock): one live trainer per run directory
TRAINER_STATE_FILE = "trainer_state.json"
STATE_DIR = "state"
RNG_DIR = "rng"
STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step}"


def checkpoints_dir(run_dir: PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def checkpoint_step(path: PathLike) -> Optional[int]:
    """N of a ``step_N`` directory name, None for any other name."""
    match = STEP_DIR.match(Path(path).name)
    return int(match.group(1)) if match else None


def rng_file(checkpoint: PathLike, rank: int) -> Path:
    return Path(checkpoint) / RNG_DIR / f"rank_{rank}.json"


def read_metrics(run_dir: PathLike) -> List[Dict]:
    """The records of RUN/metrics.jsonl in order ([] when there is none); see read_records."""
    return read_records(Path(run_dir) / METRICS_FILE)


def read_records(path: PathLike) -> List[Dict]:
    """The JSON-object lines of a JSON-lines file, in order ([] when there is none), skipping any
    other line (torn by a crash, or scribbled over: undecodable bytes included)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_bytes().splitlines():
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
