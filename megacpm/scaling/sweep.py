"""The wind tunnel's sweep: many short runs of the normal trainer over a grid of hyperparameters.

A point of the grid is a parametrisation (muP or the standard one), a width and a learning rate,
optionally an init std, scale_emb, scale_depth and a batch size. Each point is one
``python -m megacpm train BASE --run.dir=OUT/runs/NAME ...`` in its own process (a crash or a
divergence stays in its run), several at a time with ``jobs``. A finished point leaves
``result.json`` in its run directory, so a sweep started again skips what is done and reruns
what was interrupted (from the start: the runs are short and keep no checkpoints).

Width w means hidden_size w, intermediate_size ffn_mult * w (the paper's proxies: 2.5) and w /
head_dim heads (the paper's proxies: head_dim 64), depth and vocabulary from the base config.
Under the standard parametrisation (``sp``) the same init std and one LR apply at every width and
there are no muP multipliers; under ``mup`` the model follows MiniCPM's muP (megacpm.model.mup).
"""
from __future__ import annotations

import json
import math
import os
import queue
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from itertools import product
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from megacpm.config import load_config
from megacpm.io.atomic import write_text_atomic
from megacpm.io.errors import EntryPointError
from megacpm.io.run_dir import CHECKPOINTS_DIR, read_metrics
from megacpm.scaling.optimum import interpolated_minimum

PARAMETRIZATIONS = ("mup", "sp")
RESULT_FILE = "result.json"
EXIT_DIVERGED = 1  # megacpm train's exit code for a failed run (a diverged one says so on stderr)


class SweepError(ValueError):
    """A grid that cannot run (a width the head size does not divide, an empty axis...)."""


@dataclass(frozen=True)
class SweepPoint:
    parametrization: str
    width: int
    lr: float
    depth: Optional[int] = None  # num_hidden_layers; None: the base config's
    init_std: Optional[float] = None  # None: the base config's
    scale_emb: Optional[float] = None
    scale_depth: Optional[float] = None
    batch_size: Optional[int] = None  # sequences per step; None: the base config's

    @property
    def name(self) -> str:
        """A directory name that identifies the point (stable, so a rerun finds its run)."""
        parts = [self.parametrization, f"w{self.width}", f"lr{self.lr:g}"]
        for tag, value in (("d", self.depth), ("std", self.init_std), ("emb", self.scale_emb), ("depth", self.scale_depth),
                           ("bs", self.batch_size)):
            if value is not None:
                parts.append(f"{tag}{value:g}")
        return "_".join(parts)


@dataclass(frozen=True)
class SweepSpec:
    base: str  # preset name or YAML file, as for `megacpm train`
    shapes: Sequence[Tuple[int, Optional[int]]]  # (width, depth); depth None: the base config's
    lrs: Sequence[float]
    parametrizations: Sequence[str] = PARAMETRIZATIONS
    init_stds: Sequence[Optional[float]] = (None,)
    scale_embs: Sequence[Optional[float]] = (None,)
    scale_depths: Sequence[Optional[float]] = (None,)
    batch_sizes: Sequence[Optional[int]] = (None,)
    head_dim: int = 64
    ffn_mult: float = 2.5
    steps: Optional[int] = None  # per run; None: the base config's (unless tokens is given)
    tokens: Optional[int] = None  # per run, instead of steps: every batch size sees the same tokens
    seq_len: Optional[int] = None  # None: the base config's
    warmup_frac: float = 0.1
    decay_frac: float = 0.2  # exponential WSD decay over the last fraction of each run; 0: constant LR
    eval_batches: int = 8
    log_interval: int = 1
    overrides: Sequence[str] = field(default_factory=tuple)  # extra --section.key=value for every run

    def points(self) -> List[SweepPoint]:
        for axis in ("shapes", "lrs", "parametrizations"):
            if not getattr(self, axis):
                raise SweepError(f"no {axis} given: the grid needs at least one")
        for p in self.parametrizations:
            if p not in PARAMETRIZATIONS:
                raise SweepError(f"parametrization must be one of {', '.join(PARAMETRIZATIONS)}, got {p!r}")
        for width, depth in self.shapes:
            if width <= 0 or width % self.head_dim:
                raise SweepError(f"width {width} is not a positive multiple of head_dim {self.head_dim}")
            if depth is not None and depth <= 0:
                raise SweepError(f"depth must be positive, got {depth}")
        for lr in self.lrs:
            if not lr > 0:
                raise SweepError(f"learning rates must be positive, got {lr}")
        if not 0 <= self.warmup_frac < 1 or not 0 <= self.decay_frac < 1 or self.warmup_frac + self.decay_frac >= 1:
            raise SweepError("warmup and decay fractions must be in [0, 1) and leave a stable phase")
        return [SweepPoint(param, width, lr, depth, std, emb, scale_depth, batch)
                for param, (width, depth), lr, std, emb, scale_depth, batch in product(
                    self.parametrizations, self.shapes, self.lrs, self.init_stds, self.scale_embs,
                    self.scale_depths, self.batch_sizes)]


def _steps_of(spec: SweepSpec, point: SweepPoint, base_cfg) -> int:
    if spec.tokens is None:
        return spec.steps or base_cfg.train.steps
    batch = point.batch_size or base_cfg.train.global_batch_size
    return max(1, math.ceil(spec.tokens / (batch * (spec.seq_len or base_cfg.train.seq_len))))


def train_overrides(spec: SweepSpec, point: SweepPoint, base_cfg, run_dir: Path) -> List[str]:
    """The ``megacpm train`` overrides that make the base config this point's run."""
    steps = _steps_of(spec, point, base_cfg)
    heads = point.width // spec.head_dim
    args = {
        "run.dir": str(run_dir),
        "model.use_mup": point.parametrization == "mup",
        "model.hidden_size": point.width,
        "model.intermediate_size": int(round(spec.ffn_mult * point.width)),
        "model.num_attention_heads": heads,
        "model.num_key_value_heads": heads,
        "optim.lr": point.lr,
        "train.steps": steps,
        "train.log_interval": spec.log_interval,
        "train.eval_interval": steps,  # one evaluation, at the end
        "train.eval_batches": spec.eval_batches,
        "checkpoint.interval": 0,  # the final checkpoint only (removed when the point is done)
        "schedule.warmup_steps": int(spec.warmup_frac * steps),
        "log.progress": False,
        "log.tensorboard": False,
    }
    decay_steps = int(round(spec.decay_frac * steps))
    if decay_steps:
        args.update({"schedule.kind": "wsd", "schedule.decay": "exp", "schedule.decay_steps": decay_steps})
    else:
        args["schedule.kind"] = "constant"
    for key, value in (("model.num_hidden_layers", point.depth), ("model.initializer_range", point.init_std), ("model.scale_emb", point.scale_emb),
                       ("model.scale_depth", point.scale_depth), ("train.global_batch_size", point.batch_size),
                       ("train.seq_len", spec.seq_len)):
        if value is not None:
            args[key] = value
    if point.batch_size is not None:
        # Micro-batches must divide the batch; the smaller of the two keeps memory bounded.
        args["train.micro_batch_size"] = math.gcd(point.batch_size, base_cfg.train.micro_batch_size)
    return [f"--{key}={value}" for key, value in args.items()] + list(spec.overrides)


@dataclass
class PointResult:
    parametrization: str
    width: int
    lr: float
    depth: Optional[int]
    init_std: Optional[float]
    scale_emb: Optional[float]
    scale_depth: Optional[float]
    batch_size: Optional[int]
    status: str  # "ok" | "diverged" | "failed"
    eval_loss: Optional[float]
    train_loss: Optional[float]  # mean of the last 10% of the logged training losses
    steps: int
    tokens: Optional[int]
    seconds: float
    run_dir: str

    @property
    def setting(self) -> str:
        """The optional axes of the point other than the shape and the LR ("" when none is swept)."""
        return ", ".join(f"{tag} {value:g}" for tag, value in (
            ("init_std", self.init_std), ("scale_emb", self.scale_emb), ("scale_depth", self.scale_depth),
            ("batch", self.batch_size)) if value is not None)

    @property
    def point(self) -> SweepPoint:
        return SweepPoint(self.parametrization, self.width, self.lr, self.depth, self.init_std, self.scale_emb,
                          self.scale_depth, self.batch_size)


RESULT_COLUMNS = [f.name for f in fields(PointResult)]


def summarize_metrics(records: List[dict]):
    """(final eval loss, mean of the last 10% of the training losses, tokens) of a finished run."""
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    losses = [r["loss"] for r in records if "loss" in r]
    tokens = [r["tokens"] for r in records if "tokens" in r]
    tail = losses[-max(1, len(losses) // 10):] if losses else []
    return (evals[-1] if evals else None, sum(tail) / len(tail) if tail else None, tokens[-1] if tokens else None)


def _finite_or_none(value: Optional[float]) -> Optional[float]:
    return value if value is not None and math.isfinite(value) else None


def train_command(base: str, args: List[str], nproc: int) -> List[str]:
    """``megacpm train`` in one process, or under torchrun with ``nproc`` local workers (parallel.*
    overrides choose their layout; --standalone picks a free rendezvous port per point)."""
    if nproc <= 1:
        return [sys.executable, "-m", "megacpm", "train", base, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "megacpm", "train", base, *args]


def slot_environment(slot: int, nproc: int) -> Dict[str, str]:
    """The environment of a point run in job slot ``slot``: on a GPU machine, concurrent points get
    disjoint GPUs (slot k: GPUs k*nproc .. (k+1)*nproc - 1) unless the user pinned CUDA_VISIBLE_DEVICES."""
    env = dict(os.environ)
    if "CUDA_VISIBLE_DEVICES" not in env:
        import torch  # local: only here, and torch costs seconds to import in the planning process

        if torch.cuda.device_count() >= (slot + 1) * nproc:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(slot * nproc + i) for i in range(nproc))
    return env


def read_result(path: Path) -> PointResult:
    """A finished point's result file; any other content is one EntryPointError naming the file
    (delete it and the point is trained again)."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
        if not isinstance(data, dict):
            raise TypeError(f"a JSON {type(data).__name__}, not an object")
        return PointResult(**data)
    except (ValueError, TypeError) as exc:  # JSON, UTF-8 and field errors alike
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EntryPointError(f"{path}: not a point result ({reason}); delete it to train the point again") from None


def run_point(spec: SweepSpec, point: SweepPoint, out: Path, base_cfg, threads: int = 0,
              keep_checkpoints: bool = False, nproc: int = 1, slot: int = 0) -> PointResult:
    """Train one point (or read its result when it already finished)."""
    run_dir = out / "runs" / point.name
    result_file = run_dir / RESULT_FILE
    if result_file.is_file():
        return read_result(result_file)
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an interrupted point restarts from scratch
    run_dir.mkdir(parents=True)
    args = train_overrides(spec, point, base_cfg, run_dir)
    if threads:
        args.append(f"--train.num_threads={threads}")
    command = train_command(spec.base, args, nproc)
    started = time.monotonic()
    with open(run_dir / "train.log", "w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=slot_environment(slot, nproc)).returncode
    seconds = time.monotonic() - started
    eval_loss, train_loss, tokens = summarize_metrics(read_metrics(run_dir))
    output = (run_dir / "train.log").read_text(errors="replace")
    if code == 0 and eval_loss is not None and math.isfinite(eval_loss):
        status = "ok"
    elif (code == EXIT_DIVERGED and "diverged" in output.lower()) or (eval_loss is not None
                                                                    and not math.isfinite(eval_loss)):
        status = "diverged"
    else:
        status = "failed"
        tail = output.strip().splitlines()[-1:] or ["no output"]
        print(f"wind tunnel: {point.name} failed (exit {code}): {tail[0]}; see {run_dir / 'train.log'}",
              file=sys.stderr)
    result = PointResult(**asdict(point), status=status, eval_loss=_finite_or_none(eval_loss),
                         train_loss=_finite_or_none(train_loss), steps=_steps_of(spec, point, base_cfg),
                         tokens=tokens, seconds=round(seconds, 2), run_dir=str(run_dir))
    if not keep_checkpoints:
        shutil.rmtree(run_dir / CHECKPOINTS_DIR, ignore_errors=True)  # 48 runs x 200 MB adds up
    if status != "failed":  # a failed point is retried by the next sweep
        write_text_atomic(result_file, json.dumps(asdict(result), indent=1))
    return result


def cost_estimate(spec: SweepSpec, point: SweepPoint, base_cfg) -> float:
    """Relative cost of a point (parameters x tokens), to start the longest runs first."""
    batch = point.batch_size or base_cfg.train.global_batch_size
    layers, vocab = point.depth or base_cfg.model.num_hidden_layers, base_cfg.model.vocab_size
    per_token = 12 * layers * point.width ** 2 + vocab * point.width
    return per_token * _steps_of(spec, point, base_cfg) * batch


def run_sweep(spec: SweepSpec, out: Path, jobs: int = 1, threads: int = 0, keep_checkpoints: bool = False,
              on_result: Optional[Callable[[PointResult], None]] = None, nproc: int = 1) -> List[PointResult]:
    """Run every point of the grid, ``jobs`` at a time (each on ``nproc`` processes); results in grid order."""
    base_cfg = load_config(spec.base)
    points = spec.points()
    out.mkdir(parents=True, exist_ok=True)
    order = sorted(points, key=lambda p: -cost_estimate(spec, p, base_cfg))  # longest first: less idle tail

    free_slots: "queue.Queue[int]" = queue.Queue()
    for slot in range(max(1, jobs)):
        free_slots.put(slot)

    def one(point: SweepPoint) -> PointResult:
        slot = free_slots.get()  # which devices this point may use, while it runs
        try:
            result = run_point(spec, point, out, base_cfg, threads=threads, keep_checkpoints=keep_checkpoints,
                               nproc=nproc, slot=slot)
        finally:
            free_slots.put(slot)
        if on_result is not None:
            on_result(result)
        return result

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        finished = dict(zip(order, pool.map(one, order)))
    return [finished[p] for p in points]


def load_results(out: Path) -> List[PointResult]:
    """Every finished point under OUT/runs (for reports on a sweep, finished or not)."""
    results = []
    for result_file in sorted((out / "runs").glob(f"*/{RESULT_FILE}")):
        results.append(read_result(result_file))
    return results


# -- analysis ----------------------------------------------------------------------------------------
@dataclass
class BestLR:
    parametrization: str
    width: int
    depth: Optional[int]
    lr: Optional[float]  # None: every LR diverged
    loss: Optional[float]
    edge: bool  # the best LR is the smallest or the largest of the grid: the true optimum may lie outside
    # The vertex of a parabola through the best LR and its two neighbours in (log LR, loss): the
    # optimum between grid points (None at the edge of the grid or where the three are not convex).
    lr_interpolated: Optional[float] = None
    setting: str = ""  # the swept init_std / scale_emb / scale_depth / batch of this curve, if any


def best_learning_rates(results: Sequence[PointResult], metric: str = "eval_loss") -> List[BestLR]:
    """The LR of the lowest loss on each curve: one parametrisation, shape and setting of the other axes."""
    groups: Dict[tuple, List[PointResult]] = {}
    for r in results:
        groups.setdefault((r.parametrization, r.setting, r.width, r.depth or 0), []).append(r)
    best = []
    for (param, setting, width, _), members in sorted(groups.items()):
        depth = members[0].depth
        lrs = sorted({m.lr for m in members})
        scored = [m for m in members if m.status == "ok" and getattr(m, metric) is not None]
        if not scored:
            best.append(BestLR(param, width, depth, None, None, False, setting=setting))
            continue
        winner = min(scored, key=lambda m: getattr(m, metric))
        # The parabola needs the neighbours on the LR grid themselves (a diverged neighbour: none).
        by_lr = {m.lr: getattr(m, metric) for m in scored}
        curve = [(lr, by_lr[lr]) for lr in lrs if lr in by_lr]
        contiguous = len(curve) == len(lrs)
        best.append(BestLR(param, width, depth, winner.lr, getattr(winner, metric),
                           len(lrs) > 1 and winner.lr in (lrs[0], lrs[-1]),
                           interpolated_minimum(*zip(*curve)) if contiguous and len(curve) >= 3 else None,
                           setting))
    return best


@dataclass
class Spread:
    grid_steps: Optional[int]  # between the best grid LRs of the shapes
    factor: Optional[float]  # largest / smallest interpolated optimum (None unless every shape has one)


def optimum_spread(best: Sequence[BestLR], lrs: Sequence[float]) -> Dict[Tuple[str, str], Spread]:
    """For each (parametrisation, setting), how far apart the best LRs of the different shapes are."""
    grid = sorted(set(lrs))
    spread: Dict[Tuple[str, str], Spread] = {}
    for param, setting in sorted({(b.parametrization, b.setting) for b in best}):
        mine = [b for b in best if b.parametrization == param and b.setting == setting]
        found = [grid.index(b.lr) for b in mine if b.lr in grid]
        smooth = [b.lr_interpolated for b in mine]
        spread[param, setting] = Spread(max(found) - min(found) if found else None,
                               max(smooth) / min(smooth) if smooth and None not in smooth else None)
    return spread
