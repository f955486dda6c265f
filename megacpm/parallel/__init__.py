"""Parallelism: the layout's named axes and process groups, TP/SP mappings, layers and sharding
plans, pipeline schedules, the sharded model.

Import the submodules (``megacpm.parallel.layout`` is pure arithmetic and imports no torch, so
config validation can use it before torch loads); the names below load on first use (PEP 562).
"""
import importlib

_EXPORTS = {"ParallelContext": "megacpm.parallel.context", "ParallelLayout": "megacpm.parallel.layout",
            "LayoutError": "megacpm.parallel.layout"}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'megacpm.parallel' has no attribute {name!r}")
