#!/usr/bin/env python
"""The model wind tunnel: sweeps of short megacpm runs that find hyperparameters on small models.

  python tools/wind_tunnel.py sweep --out DIR --widths 64 128 256 512 --lrs 0.0025 0.005 0.01 0.02 \\
      [--parametrization mup sp] [--base tiny] [--depth 2] [--steps 200] [--jobs 2] [--threads 1]
  python tools/wind_tunnel.py report DIR           # table, results.csv/json, loss_vs_lr.png
  python tools/wind_tunnel.py batch-law DIR        # bs = a / L^b from a --batch-sizes sweep

`sweep` trains every point of the grid (parametrisation x shape x LR [x init std x scale_emb x
scale_depth x batch size]) through the normal trainer, each in its own process under DIR/runs/,
`--jobs` at a time (each on `--nproc-per-point` processes under torchrun); a rerun skips finished
points. Shapes are `--widths` at one `--depth`, or `--shapes 320x8 512x12`, or the paper's proxies
with `--proxies 9m 36m`. Each run warms up over `--warmup-frac` of its steps, and decays
exponentially (MiniCPM's WSD) over the last `--decay-frac` (0: constant LR), then is evaluated once
on the validation split.

`report` prints the best LR per parametrisation and shape and how many grid steps the optimum
moves across widths: under muP it should stay put, under the standard parametrisation (`sp`: one
init std and one LR at every width, no multipliers) it moves. It writes DIR/results.csv,
DIR/results.json and DIR/loss_vs_lr.png (loss against LR, one curve per width).

`batch-law` takes a sweep over `--batch-sizes` at a fixed token budget (`--tokens`) and, for a
range of loss levels, the batch size that reaches each level in the fewest tokens; it fits
bs = a / L^b and prints it beside the paper's 1.21e9 / L^6.24 (DIR/batch_law.json, .png).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _entry, when imported from its path

from _entry import run_tool  # noqa: E402
from megacpm.config import ConfigError, load_config, validate
from megacpm.io.atomic import write_text_atomic
from megacpm.io.run_dir import read_metrics
from megacpm.plotting import pyplot, save_png
from megacpm.scaling.batch_size import optimal_batch_sizes, smooth
from megacpm.scaling.laws import PAPER_BATCH_SIZE_LAW, FitError, fit_batch_size_law
from megacpm.scaling.sweep import (RESULT_COLUMNS, PointResult, SweepError, SweepSpec, best_learning_rates,
                                   load_results, optimum_spread, run_sweep, train_overrides)

# The paper's wind-tunnel proxies (head_dim 64, d_ff = 2.5 d_m): name -> (d_m, layers).
PAPER_PROXIES = {"9m": (320, 8), "36m": (512, 12), "66m": (640, 14), "0.1b": (768, 16), "0.17b": (896, 18),
                 "0.24b": (1024, 20), "0.5b": (1344, 24)}
METRICS = ("eval_loss", "train_loss")


class ToolError(Exception):
    pass


# -- sweep -------------------------------------------------------------------------------------------
def _shape(text: str) -> Tuple[int, int]:
    try:
        width, depth = text.lower().split("x")
        return int(width), int(depth)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is WIDTHxDEPTH, e.g. 320x8; got {text!r}") from None


def _override(text: str) -> str:
    key, sep, value = text.lstrip("-").partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"an override is KEY=VALUE, e.g. train.seq_len=128; got {text!r}")
    return f"--{key}={value}"


def shapes_of(args) -> List[Tuple[int, Optional[int]]]:
    chosen = [bool(args.widths), bool(args.shapes), bool(args.proxies)]
    if sum(chosen) != 1:
        raise ToolError("give exactly one of --widths, --shapes, --proxies")
    if args.widths:
        return [(w, args.depth) for w in args.widths]
    if args.shapes:
        return list(args.shapes)
    unknown = [p for p in args.proxies if p not in PAPER_PROXIES]
    if unknown:
        raise ToolError(f"unknown proxy {unknown[0]!r}; the paper's are {', '.join(PAPER_PROXIES)}")
    return [PAPER_PROXIES[p] for p in args.proxies]


def spec_from_args(args) -> SweepSpec:
    if args.steps is not None and args.tokens is not None:
        raise ToolError("give --steps or --tokens, not both")
    return SweepSpec(
        base=args.base, shapes=shapes_of(args), lrs=args.lrs, parametrizations=args.parametrization,
        init_stds=args.init_stds or (None,), scale_embs=args.scale_embs or (None,),
        scale_depths=args.scale_depths or (None,), batch_sizes=args.batch_sizes or (None,),
        head_dim=args.head_dim, ffn_mult=args.ffn_mult, steps=args.steps, tokens=args.tokens,
        seq_len=args.seq_len, warmup_frac=args.warmup_frac, decay_frac=args.decay_frac,
        eval_batches=args.eval_batches, overrides=tuple(args.override))


def cmd_sweep(args) -> int:
    spec = spec_from_args(args)
    points = spec.points()
    out = Path(args.out)
    # Every point's config is checked before the first run starts: a typo fails in a second, not
    # after an hour of sweeping.
    base_cfg = load_config(spec.base)
    for point in points:
        try:
            validate(load_config(spec.base, train_overrides(spec, point, base_cfg, out / "runs" / point.name)),
                     world_size=args.nproc_per_point)
        except ConfigError as exc:
            raise ToolError(f"point {point.name}: {exc}") from None
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "sweep.json", json.dumps({"spec": asdict(spec), "command": sys.argv}, indent=1))
    print(f"wind tunnel: {len(points)} runs into {out}/runs, {args.jobs} at a time")
    done = []

    def progress(result: PointResult) -> None:
        done.append(result)
        loss = f"{result.eval_loss:.4f}" if result.eval_loss is not None else "-"
        print(f"[{len(done)}/{len(points)}] {Path(result.run_dir).name}: {result.status}, eval_loss {loss} "
              f"({result.seconds:.0f} s)", flush=True)

    results = run_sweep(spec, out, jobs=args.jobs, threads=args.threads, keep_checkpoints=args.keep_checkpoints,
                        on_result=progress, nproc=args.nproc_per_point)
    report(out, results, args.metric)
    return 1 if any(r.status == "failed" for r in results) else 0


# -- report ------------------------------------------------------------------------------------------
def _curve_label(width: int, depth: Optional[int], setting: str) -> str:
    return ", ".join(part for part in (f"width {width}", f"depth {depth}" if depth is not None else "", setting) if part)


def write_results(out: Path, results: Sequence[PointResult]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=RESULT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in results:
        writer.writerow({k: ("" if v is None else v) for k, v in asdict(r).items()})
    write_text_atomic(out / "results.csv", buffer.getvalue())
    write_text_atomic(out / "results.json", json.dumps([asdict(r) for r in results], indent=1))


def plot_loss_vs_lr(out: Path, results: Sequence[PointResult], metric: str) -> Path:
    plt = pyplot()
    params = sorted({r.parametrization for r in results})
    fig, axes = plt.subplots(1, len(params), figsize=(6 * len(params), 4.5), sharey=True, squeeze=False)
    titles = {"mup": "muP", "sp": "standard parametrisation"}
    for ax, param in zip(axes[0], params):
        curves = sorted({(r.setting, r.width, r.depth or 0) for r in results if r.parametrization == param})
        for setting, width, depth in curves:
            runs = sorted((r for r in results if r.parametrization == param and r.setting == setting
                           and r.width == width and (r.depth or 0) == depth and r.status == "ok"
                           and getattr(r, metric) is not None), key=lambda r: r.lr)
            if not runs:
                continue
            xs, ys = [r.lr for r in runs], [getattr(r, metric) for r in runs]
            line, = ax.plot(xs, ys, marker="o", label=_curve_label(width, depth or None, setting))
            best = min(range(len(ys)), key=ys.__getitem__)
            ax.plot([xs[best]], [ys[best]], marker="*", markersize=14, color=line.get_color())
        ax.set_xscale("log")
        grid = sorted({r.lr for r in results})
        ax.set_xticks(grid, [f"{lr:g}" for lr in grid], rotation=45)
        ax.minorticks_off()
        ax.set_xlabel("learning rate (optim.lr)")
        ax.set_title(titles.get(param, param))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel(metric.replace("_", " "))
    fig.suptitle("wind tunnel: loss against learning rate (star: best LR of each width)")
    fig.tight_layout()
    return save_png(fig, out / "loss_vs_lr.png")


def report(out: Path, results: Sequence[PointResult], metric: str) -> None:
    if not results:
        raise ToolError(f"{out}: no finished runs under {out / 'runs'}")
    write_results(out, results)
    best = best_learning_rates(results, metric)
    print(f"\nbest learning rate by {metric} (* = at the edge of the grid: the optimum may lie outside)")
    print(f"{'param':>5} {'width':>6} {'depth':>5} {'best lr':>9} {'between':>8} {metric:>10}")
    for b in best:
        lr = f"{b.lr:g}{'*' if b.edge else ''}" if b.lr is not None else "diverged"
        between = f"{b.lr_interpolated:.3g}" if b.lr_interpolated is not None else "-"
        loss = f"{b.loss:.4f}" if b.loss is not None else "-"
        print(f"{b.parametrization:>5} {b.width:>6} {b.depth if b.depth is not None else '-':>5} {lr:>9} {between:>8} "
              f"{loss:>10}  {b.setting}".rstrip())
    print("(between: the optimum between grid points, from a parabola in log LR through the best and its neighbours)")
    for (param, setting), spread in optimum_spread(best, [r.lr for r in results]).items():
        if spread.grid_steps is not None:
            line = f"{param}{f' ({setting})' if setting else ''}: the best LR moves {spread.grid_steps} grid step{'s' if spread.grid_steps != 1 else ''}"
            if spread.factor is not None:
                line += f", the interpolated optimum by a factor {spread.factor:.2f},"
            print(line + " across shapes")
    diverged = sum(r.status == "diverged" for r in results)
    if diverged:
        print(f"{diverged} run(s) diverged (left out of the plot)")
    print(f"wrote {out / 'results.csv'}, {out / 'results.json'}, {plot_loss_vs_lr(out, results, metric)}")


def cmd_report(args) -> int:
    out = Path(args.dir)
    report(out, load_results(out), args.metric)
    return 0


# -- batch-size law ----------------------------------------------------------------------------------
def batch_curves(results: Sequence[PointResult]) -> Dict[tuple, Dict[int, tuple]]:
    """(everything but the batch size) -> {batch tokens: (tokens, training loss)} of each run."""
    groups: Dict[tuple, Dict[int, tuple]] = {}
    for r in results:
        if r.batch_size is None or r.status != "ok":
            continue
        records = [x for x in read_metrics(Path(r.run_dir)) if "loss" in x and "tokens" in x]
        if not records:
            continue
        batch_tokens = records[0]["tokens"] // records[0]["step"]
        key = (r.parametrization, r.width, r.depth, r.lr, r.init_std, r.scale_emb, r.scale_depth)
        groups.setdefault(key, {})[batch_tokens] = ([x["tokens"] for x in records], [x["loss"] for x in records])
    return groups


def auto_levels(curves: Dict[int, tuple], count: int, window: float) -> List[float]:
    """Loss levels that at least three batch sizes reach: from the third-best final loss up to the
    loss the largest batch had after a quarter of its tokens."""
    finals = sorted(float(smooth(t, l, window)[-1]) for t, l in curves.values())
    largest = curves[max(curves)]
    tokens, losses = largest
    early = float(smooth(tokens, losses, window)[max(0, len(losses) // 4)])
    low, high = finals[min(2, len(finals) - 1)] + 1e-3, early
    if not high > low:
        raise ToolError("the runs do not descend far enough for loss levels; train them longer (--tokens)")
    return [high + (low - high) * i / (count - 1) for i in range(count)]


def plot_batch_law(out: Path, optima, law, paper) -> Path:
    import numpy as np  # local: only the plot needs it

    fig, ax = pyplot().subplots(figsize=(6, 4.5))
    losses = np.array([o.loss for o in optima])
    ax.scatter(losses, [o.batch_tokens for o in optima], c=["tab:gray" if o.edge else "tab:blue" for o in optima],
               label="optimal batch (grey: at the grid's edge, only a bound; not fitted)")
    grid = np.linspace(losses.min(), losses.max(), 50)
    ax.plot(grid, law.batch_size(grid), label=f"fit {law.a:.3g} / L^{law.b:.2f}")
    ax.plot(grid, paper.batch_size(grid), "--", label=f"paper {paper.a:.3g} / L^{paper.b:.2f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter  # local: matplotlib loads with the first figure

    for axis in (ax.xaxis,):  # plain numbers: a loss axis spans less than a decade
        axis.set_major_formatter(FormatStrFormatter("%.2g"))
        axis.set_minor_formatter(FormatStrFormatter("%.2g"))
    ax.set_xlabel("loss L")
    ax.set_ylabel("batch size (tokens)")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3, which="both")
    fig.tight_layout()
    return save_png(fig, out / "batch_law.png")


def cmd_batch_law(args) -> int:
    out = Path(args.dir)
    groups = batch_curves(load_results(out))
    groups = {k: v for k, v in groups.items() if len(v) >= 3}
    if not groups:
        raise ToolError(f"{out}: no model with finished runs at 3 or more batch sizes (sweep with --batch-sizes)")
    optima = []
    for key, curves in sorted(groups.items(), key=lambda kv: str(kv[0])):
        window = args.window_tokens or 4 * max(curves)
        levels = args.levels or auto_levels(curves, args.num_levels, window)
        found = optimal_batch_sizes(curves, levels, window)
        print(f"{key[0]} width {key[1]} lr {key[3]:g}: batch sizes {sorted(curves)} tokens")
        for o in found:
            print(f"  loss {o.loss:.4f}: optimal batch {o.batch_tokens:,.0f} tokens{' (grid edge)' if o.edge else ''}, "
                  f"reached after {o.tokens:,.0f} tokens")
        optima.extend(found)
    interior = [o for o in optima if not o.edge]
    used = interior if len(interior) >= 2 else optima
    if len(used) < 2:
        raise ToolError("fewer than 2 loss levels with an optimal batch size; widen the grid or train longer")
    try:
        law = fit_batch_size_law([o.loss for o in used], [o.batch_tokens for o in used])
    except FitError as exc:
        raise ToolError(str(exc)) from None
    paper = PAPER_BATCH_SIZE_LAW
    print(f"\nfit:   bs = {law.a:.4g} / L^{law.b:.3f}   ({len(used)} levels"
          f"{'' if used is interior else ', grid-edge optima included: only bounds'})")
    print(f"paper: bs = {paper.a:.4g} / L^{paper.b:.3f}   (C4 loss, 9M-170M models)")
    record = {"a": law.a, "b": law.b, "paper": {"a": paper.a, "b": paper.b},
              "optima": [asdict(o) for o in optima]}
    write_text_atomic(out / "batch_law.json", json.dumps(record, indent=1))
    print(f"wrote {out / 'batch_law.json'}, {plot_batch_law(out, optima, law, paper)}")
    return 0


# -- command line ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wind_tunnel.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sweep = sub.add_parser("sweep", help="run a grid of short trainings")
    sweep.add_argument("--out", required=True, help="sweep directory (runs/, results, plots)")
    sweep.add_argument("--base", default="tiny", help="preset or YAML the runs start from (default: tiny)")
    sweep.add_argument("--widths", type=int, nargs="+", help="hidden sizes (multiples of --head-dim)")
    sweep.add_argument("--depth", type=int, help="layers for --widths (default: the base config's)")
    sweep.add_argument("--shapes", type=_shape, nargs="+", help="WIDTHxDEPTH shapes, e.g. 320x8 512x12")
    sweep.add_argument("--proxies", nargs="+", help=f"the paper's proxy shapes: {', '.join(PAPER_PROXIES)}")
    sweep.add_argument("--lrs", type=float, nargs="+", required=True, help="global peak LRs (optim.lr)")
    sweep.add_argument("--parametrization", nargs="+", choices=("mup", "sp"), default=["mup", "sp"])
    sweep.add_argument("--init-stds", type=float, nargs="+", help="model.initializer_range values")
    sweep.add_argument("--scale-embs", type=float, nargs="+", help="model.scale_emb values")
    sweep.add_argument("--scale-depths", type=float, nargs="+", help="model.scale_depth values")
    sweep.add_argument("--batch-sizes", type=int, nargs="+", help="train.global_batch_size values (sequences)")
    sweep.add_argument("--head-dim", type=int, default=64)
    sweep.add_argument("--ffn-mult", type=float, default=2.5, help="intermediate_size / hidden_size")
    sweep.add_argument("--steps", type=int, help="steps per run (default: the base config's)")
    sweep.add_argument("--tokens", type=int, help="tokens per run instead of --steps (same budget at every batch size)")
    sweep.add_argument("--seq-len", type=int, help="train.seq_len (default: the base config's)")
    sweep.add_argument("--warmup-frac", type=float, default=0.1)
    sweep.add_argument("--decay-frac", type=float, default=0.2, help="exponential decay over this last fraction; 0: constant")
    sweep.add_argument("--eval-batches", type=int, default=8, help="validation micro-batches of the final evaluation")
    sweep.add_argument("--override", type=_override, action="append", default=[], metavar="KEY=VALUE",
                       help="another config override for every run (repeatable)")
    sweep.add_argument("--jobs", type=int, default=1, help="runs at a time")
    sweep.add_argument("--nproc-per-point", type=int, default=1,
                       help="processes per run, under torchrun (layout via --override parallel.tp=...; "
                            "concurrent runs get disjoint GPUs)")
    sweep.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    sweep.add_argument("--keep-checkpoints", action="store_true", help="keep each run's final checkpoint")
    sweep.add_argument("--metric", choices=METRICS, default="eval_loss")
    sweep.set_defaults(func=cmd_sweep)
    rep = sub.add_parser("report", help="tables and plots of a sweep (finished or not)")
    rep.add_argument("dir")
    rep.add_argument("--metric", choices=METRICS, default="eval_loss")
    rep.set_defaults(func=cmd_report)
    law = sub.add_parser("batch-law", help="fit bs = a / L^b from a --batch-sizes sweep")
    law.add_argument("dir")
    law.add_argument("--levels", type=float, nargs="+", help="loss levels (default: spread over what the runs reach)")
    law.add_argument("--num-levels", type=int, default=8)
    law.add_argument("--window-tokens", type=float, help="smoothing window (default: 4 of the largest batches)")
    law.set_defaults(func=cmd_batch_law)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_tool("wind_tunnel", lambda: args.func(args), {ToolError: 2, SweepError: 2, ConfigError: 2})


if __name__ == "__main__":
    sys.exit(main())
