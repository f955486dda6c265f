#!/usr/bin/env python
"""Fit MiniCPM's data-model scaling law L(N, D) = C_N N^-alpha + C_D D^-beta + L0.

  python tools/scaling_law.py fit --csv points.csv [--json] [--plot fit.png] [--budgets 1e20 1e21]

points.csv has the columns N, D, loss (other columns are ignored): N non-embedding parameters and
D training tokens, both in units of 1e9, and the loss after a decay (tools/wsd_grid.py writes such a
file from WSD branches). The fit is bounded least squares with several random starts
(megacpm.scaling.laws). It prints the constants, the compute-optimal split
N_opt / D_opt = K^2 (C/6)^eta and the tokens per parameter at a few compute budgets C (FLOPs,
C = 6 N D), beside the paper's fit (0.0715 N^-0.29 + 0.300 D^-0.23 + 0.31: about 192 tokens per
parameter). With --json it prints one JSON object with exactly the keys C_N, alpha, C_D, beta, L0.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _entry, when imported from its path

from _entry import run_tool  # noqa: E402
from megacpm.io.errors import describe_decode_error, describe_os_error  # noqa: E402
from megacpm.plotting import pyplot, save_png
from megacpm.scaling.laws import PAPER_DATA_MODEL_LAW, DataModelLaw, FitError, fit_data_model_law

COLUMNS = ("N", "D", "loss")
DEFAULT_BUDGETS = (1e19, 1e20, 1e21, 1e22, 1e23)


class ToolError(Exception):
    pass


def read_points(path: Path) -> Tuple[List[float], List[float], List[float]]:
    if not path.is_file():
        raise ToolError(f"{path}: no such file")
    try:
        rows = list(csv.DictReader(io.StringIO(path.read_bytes().decode("utf-8"))))
    except OSError as exc:
        raise ToolError(describe_os_error(exc, path)) from None
    except UnicodeDecodeError as exc:
        raise ToolError(describe_decode_error(path, exc)) from None
    except csv.Error as exc:
        raise ToolError(f"{path}: cannot read as CSV: {exc}") from None
    header = set(rows[0]) if rows else set()
    missing = [c for c in COLUMNS if c not in header]
    if not rows or missing:
        raise ToolError(f"{path}: needs the columns N,D,loss" + (f"; missing {', '.join(missing)}" if rows else
                                                                 "; the file has no data rows"))
    columns: Tuple[List[float], ...] = ([], [], [])
    for line, row in enumerate(rows, start=2):
        for column, values in zip(COLUMNS, columns):
            try:
                value = float(row[column])
            except (TypeError, ValueError):
                raise ToolError(f"{path}, line {line}: {column} is {row[column]!r}, not a number") from None
            if not math.isfinite(value) or (column != "loss" and value <= 0):
                raise ToolError(f"{path}, line {line}: {column} must be a positive finite number, got {value}")
            values.append(value)
    return columns


def describe_optimum(law: DataModelLaw, budgets: Sequence[float]) -> List[str]:
    lines = [f"{'budget C (FLOPs)':>17} {'N_opt (B)':>10} {'D_opt (B)':>10} {'tokens/param':>13}"]
    for flops in budgets:
        n_opt, d_opt = law.optimal_split(flops)
        lines.append(f"{flops:>17.3g} {n_opt:>10.4g} {d_opt:>10.4g} {d_opt / n_opt:>13.1f}")
    return lines


def plot_fit(path: Path, law: DataModelLaw, N, D, loss) -> None:
    import numpy as np  # local: only the plot needs it

    plt = pyplot()
    N, D, loss = (np.asarray(v, dtype=float) for v in (N, D, loss))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    d_grid = np.geomspace(D.min() / 2, D.max() * 2, 100)
    for n in np.unique(N):
        mask = N == n
        dots = left.scatter(D[mask], loss[mask], label=f"N = {n:.3g}B")
        left.plot(d_grid, law.loss(n, d_grid), color=dots.get_facecolor()[0])
    left.set_xscale("log")
    left.set_xlabel("tokens D (billions)")
    left.set_ylabel("loss")
    left.set_title(f"L = {law.C_N:.3g} N^-{law.alpha:.3f} + {law.C_D:.3g} D^-{law.beta:.3f} + {law.L0:.3f}",
                   fontsize=9)
    left.legend(fontsize=7)
    left.grid(True, alpha=0.3, which="both")
    # Iso-loss contours over (N, D), and the compute-optimal frontier (N_opt(C), D_opt(C)) for the
    # budgets around the points' own (C = 6ND): the window holds both, however far the optimum is.
    budgets = 6 * np.geomspace((N * D).min() / 10, (N * D).max() * 10, 60) * 1e18
    frontier = np.array([law.optimal_split(c) for c in budgets])
    n_lo, n_hi = min(N.min(), frontier[:, 0].min()) / 2, max(N.max(), frontier[:, 0].max()) * 2
    d_lo, d_hi = min(D.min(), frontier[:, 1].min()) / 2, max(D.max(), frontier[:, 1].max()) * 2
    nn, dd = np.meshgrid(np.geomspace(n_lo, n_hi, 200), np.geomspace(d_lo, d_hi, 200))
    contours = right.contour(nn, dd, law.loss(nn, dd), levels=12, cmap="viridis")
    right.clabel(contours, fontsize=7, fmt="%.2f")
    right.plot(frontier[:, 0], frontier[:, 1], "r-", label="compute-optimal N, D (C = 6ND)")
    right.scatter(N, D, c="k", s=10, label="points")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("non-embedding parameters N (billions)")
    right.set_ylabel("tokens D (billions)")
    right.set_title("iso-loss contours", fontsize=9)
    right.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)


def cmd_fit(args) -> int:
    N, D, loss = read_points(Path(args.csv))
    try:
        fit = fit_data_model_law(N, D, loss, starts=args.starts, seed=args.seed)
    except FitError as exc:
        raise ToolError(f"{args.csv}: {exc}") from None
    law = fit.law
    if args.plot:
        plot_fit(Path(args.plot), law, N, D, loss)
    if args.json:
        print(json.dumps(law.as_dict()))
        return 0
    paper = PAPER_DATA_MODEL_LAW
    print(f"{fit.points} points, best of {fit.starts} starts, rmse {fit.rmse:.4g}")
    print(f"{'':>6} {'C_N':>9} {'alpha':>7} {'C_D':>9} {'beta':>7} {'L0':>7}")
    for name, value in (("fit", law), ("paper", paper)):
        print(f"{name:>6} {value.C_N:>9.4g} {value.alpha:>7.4f} {value.C_D:>9.4g} {value.beta:>7.4f} {value.L0:>7.4f}")
    print(f"\ncompute-optimal: N_opt / D_opt = K^2 (C/6)^eta with K = {law.K:.4g}, eta = {law.eta:.4f}")
    print("\n".join(describe_optimum(law, args.budgets)))
    print(f"\nthe paper's fit (K = {paper.K:.4g}, eta = {paper.eta:.4f}):")
    print("\n".join(describe_optimum(paper, args.budgets)))
    if args.plot:
        print(f"\nwrote {args.plot}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scaling_law.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="fit L(N, D) to a CSV of points")
    fit.add_argument("--csv", required=True, help="columns N, D (billions), loss")
    fit.add_argument("--json", action="store_true", help="print only {C_N, alpha, C_D, beta, L0} as JSON")
    fit.add_argument("--plot", help="write a PNG of the fit and the iso-loss frontier here")
    fit.add_argument("--budgets", type=float, nargs="+", default=list(DEFAULT_BUDGETS),
                     help="compute budgets in FLOPs for the compute-optimal table")
    fit.add_argument("--starts", type=int, default=64, help="random starts of the optimiser")
    fit.add_argument("--seed", type=int, default=0)
    fit.set_defaults(func=cmd_fit)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_tool("scaling_law", lambda: args.func(args), {ToolError: 2})


if __name__ == "__main__":
    sys.exit(main())
