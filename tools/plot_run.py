#!/usr/bin/env python
"""Plot a run's training/eval loss and learning rate against the step.

  python tools/plot_run.py RUN_DIR [--output PATH]

Reads RUN_DIR/metrics.jsonl and writes a PNG (default RUN_DIR/curves.png).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _entry, when imported from its path

from _entry import OneLineParser, run_tool  # noqa: E402
from megacpm.io.errors import describe_decode_error, describe_os_error  # noqa: E402
from megacpm.io.run_dir import METRICS_FILE  # noqa: E402
from megacpm.plotting import pyplot, save_png  # noqa: E402

Series = Tuple[List[int], List[float]]
KEYS = ("loss", "eval_loss", "lr")


class PlotError(Exception):
    pass


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_series(metrics: Path) -> Dict[str, Series]:
    """Each key's (steps, values), sorted by step; a later record for the same step wins."""
    if not metrics.is_file():
        raise PlotError(f"{metrics}: no such file (is this a run directory?)")
    try:
        lines = metrics.read_bytes().decode("utf-8").splitlines()
    except OSError as exc:
        raise PlotError(describe_os_error(exc, metrics)) from None
    except UnicodeDecodeError as exc:
        raise PlotError(describe_decode_error(metrics, exc)) from None
    points: Dict[str, Dict[int, float]] = {key: {} for key in KEYS}
    for line in lines:
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            continue  # a line torn by a crash mid-write
        if not isinstance(record, dict) or not _number(record.get("step")):
            continue
        for key in KEYS:
            if _number(record.get(key)):
                points[key][int(record["step"])] = float(record[key])
    if not points["loss"]:
        raise PlotError(f"{metrics}: no training records with a step and a loss")
    return {key: (sorted(p), [p[s] for s in sorted(p)]) for key, p in points.items()}


def plot(series: Dict[str, Series], title: str, output: Path) -> None:
    plt = pyplot()
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 7), sharex=True,
                                         gridspec_kw={"height_ratios": [2, 1]})
    ax_loss.plot(*series["loss"], label="train loss", linewidth=1)
    if series["eval_loss"][0]:
        ax_loss.plot(*series["eval_loss"], "o-", label="eval loss", markersize=4)
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.set_title(title)
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    ax_lr.plot(*series["lr"], color="tab:green", linewidth=1)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, output)


def main(argv=None) -> int:
    parser = OneLineParser(prog="plot_run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--output", type=Path, default=None, help="PNG path (default RUN_DIR/curves.png)")
    args = parser.parse_args(argv)
    output = args.output or args.run_dir / "curves.png"

    def body() -> int:
        try:
            series = read_series(args.run_dir / METRICS_FILE)
        except PlotError as exc:
            print(f"plot_run: error: {exc}", file=sys.stderr)
            return 2
        try:
            plot(series, args.run_dir.resolve().name, output)
        except OSError as exc:
            print(f"plot_run: error: cannot write {describe_os_error(exc, output)}", file=sys.stderr)
            return 1
        print(output)
        return 0

    return run_tool("plot_run", body)


if __name__ == "__main__":
    sys.exit(main())
