"""Checkpoints: DCP-based save/load in model space, the ``latest`` pointer, branches and the run tree.

The names below are loaded on first use (PEP 562): importing the package must not pull in
torch.distributed.checkpoint and the model (about a second per process) until one is used.
"""
import importlib

# catalog: which checkpoints exist and which one a resume continues from (light: no DCP import)
_CATALOG_EXPORTS = ("CheckpointError", "Resume", "checkpoint_problem", "latest_checkpoint", "list_checkpoints",
                    "resolve_resume")
_MANAGER_EXPORTS = ("TrainerState", "load_checkpoint", "PendingSave", "load_model_weights", "save_checkpoint",
                    "save_checkpoint_async", "save_weights")
# init_from: train.init_from's source (a megacpm run or checkpoint, a Hugging Face directory) and its load
_INIT_FROM_EXPORTS = ("InitSource", "init_fingerprint", "load_initial_weights", "resolve_init_source")

__all__ = [*_CATALOG_EXPORTS, *_MANAGER_EXPORTS, *_INIT_FROM_EXPORTS]


def __getattr__(name):
    if name in _CATALOG_EXPORTS:
        return getattr(importlib.import_module("megacpm.checkpoint.catalog"), name)
    if name in _MANAGER_EXPORTS:
        return getattr(importlib.import_module("megacpm.checkpoint.manager"), name)
    if name in _INIT_FROM_EXPORTS:
        return getattr(importlib.import_module("megacpm.checkpoint.init_from"), name)
    raise AttributeError(f"module 'megacpm.checkpoint' has no attribute {name!r}")
