"""Parallel layouts: rank arithmetic (layout.py) and the process groups of a run (context.py)."""
from megacpm.parallel.context import ParallelContext
from megacpm.parallel.layout import LayoutError, ParallelLayout

__all__ = ["LayoutError", "ParallelContext", "ParallelLayout"]
