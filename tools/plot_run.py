#!/usr/bin/env python
"""Plot a run's training/eval loss and learning rate against the step.

  python tools/plot_run.py RUN_DIR [--output PATH]

Reads RUN_DIR/metrics.jsonl and writes a PNG (default RUN_DIR/curves.png).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Tuple

Series = Tuple[List[int], List[float]]


class PlotError(Exception):
    pass


def read_series(metrics: Path) -> Dict[str, Series]:
    if not metrics.is_file():
        raise PlotError(f"{metrics}: no such file (is this a run directory?)")
    series: Dict[str, Series] = {"loss": ([], []), "eval_loss": ([], []), "lr": ([], [])}
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a crash
        for key, (steps, values) in series.items():
            if key in record and "step" in record:
                steps.append(record["step"])
                values.append(record[key])
    if not series["loss"][0]:
        raise PlotError(f"{metrics}: no training records with a loss")
    return series


def plot(series: Dict[str, Series], title: str, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

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
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    tmp = output.with_name(f".tmp-{output.name}")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, output)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--output", type=Path, default=None, help="PNG path (default RUN_DIR/curves.png)")
    args = parser.parse_args(argv)
    output = args.output or args.run_dir / "curves.png"
    try:
        series = read_series(args.run_dir / "metrics.jsonl")
        plot(series, args.run_dir.resolve().name, output)
    except PlotError as exc:
        print(f"plot_run: error: {exc}", file=sys.stderr)
        return 2
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
