"""Weights & Biases (log.wandb): every record to a W&B run, rank 0 only; wandb is an optional package."""
from __future__ import annotations

import importlib
import re
import secrets
from pathlib import Path
from typing import Any, Optional

from megacpm.config import ConfigError
from megacpm.config.loader import config_to_dict
from megacpm.io.atomic import write_text_atomic
from megacpm.io.errors import EntryPointError
from megacpm.io.run_dir import WANDB_DIR
from megacpm.train.callbacks.base import Record, Sink

# The W&B run id of a run directory, so that a resumed run continues the same W&B run.
WANDB_ID_FILE = Path(WANDB_DIR) / "run_id"


def import_wandb() -> Any:
    """The wandb module, or a one-line ConfigError saying how to get it."""
    try:
        return importlib.import_module("wandb")
    except ImportError:
        raise ConfigError("log.wandb is true but the wandb package is not installed: pip install wandb "
                          "(or set log.wandb=false)") from None


class WandB(Sink):
    """``wandb.init(project=log.wandb_project, name=run.name, dir=RUN, config=<the resolved config>,
    mode=log.wandb_mode, id=<the run directory's W&B id>, resume="allow")`` at the start, every
    record (logged steps and evaluations) logged at its step, ``finish`` at the end (exit code 1 when
    the run raised).

    The W&B id is kept in RUN/wandb/run_id: starting the run directory again (a resume after a stop or
    a crash) continues the same W&B run. The steps recomputed after the last checkpoint are logged
    again at step numbers W&B has already seen; W&B keeps the first values (and warns). Offline mode
    writes RUN/wandb/offline-run-*/ for a later ``wandb sync`` and needs no network.

    Construct it on every rank (a missing wandb package then fails every rank alike), but only rank 0's
    instance should be active: ``WandB(active=False)`` on the others does nothing.
    """

    def __init__(self, active: bool = True):
        self._wandb = import_wandb()
        self.active = active
        self.run = None

    def _run_id(self, run_dir: Path) -> str:
        path = run_dir / WANDB_ID_FILE
        if path.is_file():
            text = path.read_bytes().decode("ascii", "replace").strip()
            if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", text):
                raise EntryPointError(f"{path}: not a W&B run id ({text[:20]!r}); delete it to log this run to "
                                      f"a new W&B run")
            return text
        run_id = secrets.token_hex(8)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, run_id + "\n")
        return run_id

    def on_train_start(self, trainer) -> None:
        if not self.active:
            return
        cfg = trainer.cfg
        self.run = self._wandb.init(project=cfg.log.wandb_project, name=cfg.run.name, dir=str(trainer.run_dir),
                                    config=config_to_dict(cfg), mode=cfg.log.wandb_mode,
                                    id=self._run_id(trainer.run_dir), resume="allow")

    def write(self, record: Record) -> None:
        if self.run is not None:
            self.run.log({key: value for key, value in record.items() if key != "step"}, step=record["step"])

    def on_train_end(self, trainer, result: Optional[Any]) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            run.finish(exit_code=0 if result is not None else 1)
