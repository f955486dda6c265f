"""Checkpoints: atomic writes, DCP-based save/load in model space, the ``latest`` pointer."""
from megacpm.checkpoint.manager import (
    CheckpointError,
    TrainerState,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    PendingSave,
    save_checkpoint,
    save_checkpoint_async,
    save_weights,
)

__all__ = ["CheckpointError", "TrainerState", "latest_checkpoint", "list_checkpoints",
           "load_checkpoint", "PendingSave", "save_checkpoint", "save_checkpoint_async", "save_weights"]
