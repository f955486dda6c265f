"""Checkpoints: atomic writes, DCP-based save/load in model space, the ``latest`` pointer.

The names below are loaded on first use (PEP 562): importing a light submodule such as
``megacpm.io.atomic`` must not pull in torch.distributed.checkpoint and the trainer (about a
second per process, paid by every data-preprocessing worker otherwise).
"""
import importlib

_MANAGER_EXPORTS = ("CheckpointError", "TrainerState", "latest_checkpoint", "list_checkpoints", "load_checkpoint",
                    "PendingSave", "save_checkpoint", "save_checkpoint_async", "save_weights")

__all__ = list(_MANAGER_EXPORTS)


def __getattr__(name):
    if name in _MANAGER_EXPORTS:
        return getattr(importlib.import_module("megacpm.checkpoint.manager"), name)
    raise AttributeError(f"module 'megacpm.checkpoint' has no attribute {name!r}")
