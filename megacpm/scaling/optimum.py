"""The optimum between grid points: the vertex of a parabola through the best point and its
neighbours, on a log axis (learning rates and batch sizes are gridded geometrically)."""
from __future__ import annotations

import math
from typing import Optional, Sequence


def interpolated_minimum(xs: Sequence[float], ys: Sequence[float]) -> Optional[float]:
    """The x (positive, sorted) at the vertex of the parabola through the lowest y and its two
    neighbours, on a log x axis, clamped to those neighbours. None when the lowest y is at an end,
    or when the three points are not convex."""
    best = min(range(len(ys)), key=ys.__getitem__)
    if best in (0, len(ys) - 1):
        return None
    x = [math.log(xs[best + k]) for k in (-1, 0, 1)]
    y = [ys[best + k] for k in (-1, 0, 1)]
    # Divided differences: y = y1 + s1 (x - x1) + c (x - x1)(x - x2) (no fitting library needed).
    s1, s2 = (y[1] - y[0]) / (x[1] - x[0]), (y[2] - y[1]) / (x[2] - x[1])
    curvature = (s2 - s1) / (x[2] - x[0])
    if curvature <= 0:
        return None
    vertex = (x[0] + x[1]) / 2 - s1 / (2 * curvature)
    return math.exp(min(max(vertex, x[0]), x[2]))
