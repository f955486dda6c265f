"""Checkpoints: DCP-based save/load in model space, the ``latest`` pointer, branches and the run tree.

The names below are loaded on first use (PEP 562): importing the package must not pull in
torch.distributed.checkpoint and the model (about a second per process) until one is used.
"""
import importlib

_MANAGER_EXPORTS = ("CheckpointError", "TrainerState", "latest_checkpoint", "list_checkpoints", "load_checkpoint",
                    "PendingSave", "load_model_weights", "save_checkpoint", "save_checkpoint_async", "save_weights")

__all__ = list(_MANAGER_EXPORTS)


def __getattr__(name):
    if name in _MANAGER_EXPORTS:
        return getattr(importlib.import_module("megacpm.checkpoint.manager"), name)
    raise AttributeError(f"module 'megacpm.checkpoint' has no attribute {name!r}")
