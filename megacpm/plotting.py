"""Figures for the tools: matplotlib without a display, and PNGs written atomically.

matplotlib is imported only when a figure is made, so the engine never pays for it.
"""
from __future__ import annotations

import io
from pathlib import Path

from megacpm.io.atomic import write_bytes_atomic


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only: no display needed)."""
    import matplotlib  # local: an optional package, and slow to import (see the module docstring)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path, dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` under a temporary name, then rename (a reader never sees half a PNG),
    and close it."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi)
    finally:
        pyplot().close(fig)
    write_bytes_atomic(path, buffer.getvalue())
    return Path(path)
