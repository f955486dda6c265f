#!/usr/bin/env python
"""WSD checkpoint branching for the data-model scaling law: decays branched from a stable run.

  python tools/wsd_grid.py RUN --at 2000 4000 8000 --decay-frac 0.1 [--decay exp|linear|cosine|1-sqrt] \\
      [--out DIR] [--run] [--threads N] [--csv FILE] [--override train.eval_batches=50 ...]
  python tools/scaling_law.py fit --csv RUN-wsd/points.csv

RUN is the run directory of a *stable* WSD run (constant LR after the warmup) with checkpoints at
RUN/checkpoints/step_S. For each S in --at the tool branches a decay run from step_S into
OUT/decay_S (OUT defaults to the sibling directory RUN-wsd), exactly as `megacpm branch` does: the
parent is only read. The branch continues training from step S+1 with its LR decaying over d steps,
d = max(1, round(S * F / (1 - F))), so that the decay is the fraction F (--decay-frac) of the
branch's S + d steps. MiniCPM decays over about 10% of the tokens (F = 0.1); 2.5% is not enough.
The default exp decay uses megacpm's default half-life, which ends the decay at about a tenth of the
peak LR (pass --override schedule.half_life=H to choose one). Branches save only their final
checkpoint. One stable run per model size and several short decays from it give the loss at many
token counts for the cost of about one run (MiniCPM's O(m C) instead of O(m^2 C)).

With --run each branch is trained to the end, one after another (`python -m megacpm train
OUT/decay_S`); a finished branch is skipped and an interrupted one resumes, so the command can be
run again after an interruption (an existing OUT/decay_S is reused, never branched again). A branch
whose training fails is reported and the others go on; the exit code is then 1.

Every finished branch (an eval_loss at its last step) gives one point: N, the model's
non-embedding parameters, D, the tokens consumed at the end (both in units of 1e9), and the final
eval loss. The points go to --csv (default OUT/points.csv) with the columns
N,D,loss,run,branch_step,decay_steps, which `tools/scaling_law.py fit --csv` reads. Rows of the
same branch directory (`run`) in an existing file are replaced and other rows kept, so one file
gathers the branches of several model sizes (several stable runs).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _entry, when imported from its path

from _entry import run_tool  # noqa: E402

from megacpm.checkpoint import CheckpointError, list_checkpoints  # noqa: E402
from megacpm.checkpoint.branch import create_branch, resolve_checkpoint  # noqa: E402
from megacpm.config import Config, ConfigError, load_config, validate  # noqa: E402
from megacpm.config.schema import DECAY_SHAPES  # noqa: E402
from megacpm.io.atomic import write_text_atomic  # noqa: E402
from megacpm.io.errors import describe_decode_error, describe_os_error  # noqa: E402
from megacpm.io.run_dir import CONFIG_FILE, LINEAGE_FILE, checkpoints_dir, read_metrics, step_dir_name  # noqa: E402
from megacpm.model import count_parameters  # noqa: E402
from megacpm.optim.schedule import LRSchedule  # noqa: E402

COLUMNS = ("N", "D", "loss", "run", "branch_step", "decay_steps")
# The keys this tool derives from --at, --decay-frac and --decay (and the branch directory): a user
# override of one of them would make the branch disagree with its row in the CSV.
MANAGED_KEYS = ("run.dir", "train.steps", "schedule.kind", "schedule.decay", "schedule.decay_start",
                "schedule.decay_steps")


class ToolError(Exception):
    """A usage error: one line on stderr, exit code 2."""


@dataclass
class Branch:
    step: int  # the parent checkpoint's step
    decay_steps: int
    directory: Path
    overrides: List[str]  # as recorded in the branch's lineage.json
    cfg: Config  # validated


@dataclass
class Point:
    branch: Branch
    non_embedding: int
    tokens: int
    loss: float

    def row(self) -> Dict[str, str]:
        # repr: the shortest text that reads back as the same float, so the fit sees exact values.
        return {"N": repr(self.non_embedding / 1e9), "D": repr(self.tokens / 1e9), "loss": repr(self.loss),
                "run": str(self.branch.directory), "branch_step": str(self.branch.step),
                "decay_steps": str(self.branch.decay_steps)}


# -- planning: nothing is written until every branch's config has been validated -------------------
def decay_steps_for(step: int, frac: float) -> int:
    """d with d / (step + d) = frac, rounded, at least one step."""
    return max(1, round(step * frac / (1 - frac)))


def parse_user_overrides(pairs: Sequence[str]) -> List[str]:
    """KEY=VALUE (a leading -- tolerated) as megacpm's --KEY=VALUE; keys are checked by load_config."""
    overrides = []
    for pair in pairs:
        body = pair[2:] if pair.startswith("--") else pair
        key, sep, _value = body.partition("=")
        if not sep or not key:
            raise ToolError(f"--override {pair}: expected KEY=VALUE, e.g. train.eval_batches=50")
        if key in MANAGED_KEYS:
            raise ToolError(f"--override {pair}: {key} is set by wsd_grid from --at, --decay-frac, --decay "
                            f"and --out")
        overrides.append(f"--{body}")
    return overrides


def branch_overrides(step: int, decay_steps: int, decay: str, user: Sequence[str]) -> List[str]:
    overrides = ["--schedule.kind=wsd", f"--schedule.decay={decay}", f"--schedule.decay_start={step + 1}",
                 f"--schedule.decay_steps={decay_steps}", f"--train.steps={step + decay_steps}"]
    if decay == "exp":
        # The parent's half-life (the MiniCPM presets set 5000 steps) was chosen for its own run
        # length; unset, it is resolved from decay_steps so the LR ends near peak / 10.
        overrides.append("--schedule.half_life=null")
    # Only the final checkpoint: the branch is a measurement, its intermediate states are not needed.
    overrides.append("--checkpoint.interval=0")
    return overrides + list(user)  # the user's come last and win


def check_run_dir(run: Path) -> None:
    if not (run / CONFIG_FILE).is_file():
        raise ToolError(f"{run}: not a megacpm run directory (no {CONFIG_FILE})")


def find_checkpoint(run: Path, step: int) -> Path:
    path = checkpoints_dir(run) / step_dir_name(step)
    if not path.is_dir():
        have = ", ".join(step_dir_name(s) for s in list_checkpoints(run)) or "none"
        raise ToolError(f"{path}: no such checkpoint (checkpoints of {run}: {have})")
    return resolve_checkpoint(path)  # CheckpointError for a directory without trainer_state.json


def warn_if_not_stable(checkpoint_cfg: Config, step: int, checkpoint: Path) -> None:
    """A decay from a checkpoint taken in the warmup or the parent's own decay starts from a LR the
    parent never had at that step: the point would not measure what the scaling law assumes."""
    try:
        schedule = LRSchedule.from_config(checkpoint_cfg.schedule, checkpoint_cfg.optim.lr,
                                          checkpoint_cfg.train.steps)
    except ValueError:
        return
    lr = schedule(step)
    if lr != checkpoint_cfg.optim.lr:
        print(f"wsd_grid: warning: {checkpoint}: the parent's LR at step {step} is {lr:g}, not the peak "
              f"{checkpoint_cfg.optim.lr:g}: not a stable-phase checkpoint", file=sys.stderr)


def existing_branch(directory: Path, step: int, overrides: List[str]) -> Config:
    """The config of a branch made by an earlier invocation, if it is the same branch."""
    lineage_path = directory / LINEAGE_FILE
    if not lineage_path.is_file():
        raise ToolError(f"{directory}: exists and is not a branch (no {LINEAGE_FILE}); use another --out")
    try:
        lineage = json.loads(lineage_path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ToolError(f"{describe_decode_error(lineage_path, exc)}; use another --out or remove it") from None
    except json.JSONDecodeError as exc:
        raise ToolError(f"{lineage_path}: not valid JSON ({exc.msg}); use another --out or remove it") from None
    if not isinstance(lineage, dict):
        raise ToolError(f"{lineage_path}: not a JSON object; use another --out or remove it")
    if lineage.get("step") != step or lineage.get("overrides") != overrides:
        # Reusing it would put a point with another decay (or parent step) under this one's name.
        raise ToolError(f"{directory}: exists as a branch of step {lineage.get('step')} with overrides "
                        f"{' '.join(lineage.get('overrides', []))}; use another --out or remove it")
    cfg = load_config(str(directory))
    validate(cfg, world_size=1, check_data=True)
    return cfg


def plan_branches(run: Path, steps: Sequence[int], frac: float, decay: str, out: Path,
                  user: Sequence[str]) -> List[Branch]:
    if not 0 < frac < 1:
        raise ToolError(f"--decay-frac: must be in (0, 1), got {frac}")
    if len(set(steps)) != len(steps):
        raise ToolError(f"--at: steps must be unique, got {' '.join(map(str, steps))}")
    if any(s < 1 for s in steps):
        raise ToolError(f"--at: steps must be positive, got {' '.join(map(str, steps))}")
    check_run_dir(run)
    branches = []
    for step in sorted(steps):
        checkpoint = find_checkpoint(run, step)
        d = decay_steps_for(step, frac)
        directory = out / f"decay_{step}"
        overrides = branch_overrides(step, d, decay, user)
        if directory.exists():
            cfg = existing_branch(directory, step, overrides)
        else:
            # As `megacpm branch` builds it: the checkpoint's config, the overrides, the new run.dir.
            parent_cfg = load_config(str(checkpoint / CONFIG_FILE))
            warn_if_not_stable(parent_cfg, step, checkpoint)
            cfg = load_config(str(checkpoint / CONFIG_FILE), [*overrides, f"--run.dir={directory}"])
            validate(cfg, world_size=1, check_data=True)
        branches.append(Branch(step, d, directory, overrides, cfg))
    return branches


def create_branches(run: Path, branches: Sequence[Branch]) -> None:
    for branch in branches:
        if branch.directory.exists():
            print(f"reusing {branch.directory}", flush=True)
            continue
        checkpoint = resolve_checkpoint(checkpoints_dir(run) / step_dir_name(branch.step))
        create_branch(checkpoint, branch.directory, branch.cfg, branch.overrides)
        print(f"branched {branch.directory} from {checkpoint}: decay {branch.cfg.schedule.decay} over steps "
              f"{branch.step + 1}..{branch.step + branch.decay_steps}", flush=True)


# -- training ----------------------------------------------------------------------------------------
def read_records(directory: Path) -> List[dict]:
    return [r for r in read_metrics(directory) if isinstance(r, dict)]


def last_trained_step(directory: Path) -> int:
    return max((int(r["step"]) for r in read_records(directory) if "loss" in r and "step" in r), default=0)


def run_to_completion(command: List[str]) -> int:
    process = subprocess.Popen(command)
    try:
        return process.wait()
    except KeyboardInterrupt:
        # The child got the SIGINT too: let it save its checkpoint and stop (subprocess.run would
        # kill it a quarter of a second later) so that a rerun resumes where it stopped.
        process.wait()
        raise


def train_branches(branches: Sequence[Branch], threads: Optional[int]) -> List[Branch]:
    """Train each unfinished branch in its own process; returns the ones whose training failed."""
    failed = []
    for branch in branches:
        if last_trained_step(branch.directory) >= branch.cfg.train.steps:
            print(f"{branch.directory}: already at step {branch.cfg.train.steps}, skipped", flush=True)
            continue
        command = [sys.executable, "-m", "megacpm", "train", str(branch.directory)]
        if threads is not None:
            command.append(f"--train.num_threads={threads}")
        print(f"training {branch.directory} to step {branch.cfg.train.steps}", flush=True)
        if run_to_completion(command) != 0:
            # One failed decay should not cost the others; the exit code says it happened.
            print(f"wsd_grid: error: training {branch.directory} failed (run again to resume it)",
                  file=sys.stderr, flush=True)
            failed.append(branch)
    return failed


# -- points ----------------------------------------------------------------------------------------
def final_point(branch: Branch) -> Optional[Point]:
    """The branch's point, or None while its final evaluation is missing."""
    t = branch.cfg.train
    records = read_records(branch.directory)
    finals = [r["eval_loss"] for r in records if "eval_loss" in r and r.get("step") == t.steps]
    if not finals:
        if last_trained_step(branch.directory) >= t.steps:
            print(f"wsd_grid: warning: {branch.directory} finished without an eval_loss at step {t.steps} "
                  f"(train.eval_batches is {t.eval_batches}); no point", file=sys.stderr)
        return None
    loss = float(finals[-1])
    if not math.isfinite(loss):
        print(f"wsd_grid: warning: {branch.directory}: final eval_loss is {loss}; no point", file=sys.stderr)
        return None
    tokens = [r["tokens"] for r in records if "tokens" in r]
    # The branch's token count continues its parent's, so D is the total the model has seen.
    consumed = int(tokens[-1]) if tokens else t.steps * t.global_batch_size * t.seq_len
    return Point(branch, count_parameters(branch.cfg.model)["non_embedding"], consumed, loss)


def merge_rows(path: Path, points: Sequence[Point]) -> str:
    """The CSV text of ``path``'s rows (those of other runs) followed by the new points."""
    rows: List[Dict[str, str]] = []
    fields = list(COLUMNS)
    if path.exists():
        try:
            reader = csv.DictReader(io.StringIO(path.read_bytes().decode("utf-8")))
            rows = list(reader)
        except OSError as exc:
            raise ToolError(describe_os_error(exc, path)) from None
        except UnicodeDecodeError as exc:
            raise ToolError(describe_decode_error(path, exc)) from None
        except csv.Error as exc:
            raise ToolError(f"{path}: cannot read as CSV: {exc}") from None
        header = reader.fieldnames or []
        if header and not all(c in header for c in ("N", "D", "loss")):
            raise ToolError(f"{path}: exists and is not a points file (needs the columns N,D,loss)")
        fields += [c for c in header if c not in fields]  # keep the user's extra columns
    replaced = {str(p.branch.directory) for p in points}
    rows = [r for r in rows if r.get("run") not in replaced] + [p.row() for p in points]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields, restval="", extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def format_table(points: Sequence[Point]) -> str:
    lines = [f"{'branch':<16} {'step':>8} {'decay':>7} {'N (1e9)':>11} {'D (1e9)':>11} {'loss':>8}"]
    for p in points:
        lines.append(f"{p.branch.directory.name:<16} {p.branch.step:>8} {p.branch.decay_steps:>7} "
                     f"{p.non_embedding / 1e9:>11.4g} {p.tokens / 1e9:>11.4g} {p.loss:>8.4f}")
    return "\n".join(lines)


# -- command line ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsd_grid", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, metavar="RUN", help="run directory of the stable run")
    parser.add_argument("--at", type=int, nargs="+", required=True, metavar="STEP",
                        help="checkpoint steps to branch from (RUN/checkpoints/step_STEP)")
    parser.add_argument("--decay-frac", type=float, required=True, metavar="F",
                        help="the decay's share of each branch's steps, in (0, 1); MiniCPM: about 0.1 "
                             "(10%% of the tokens)")
    parser.add_argument("--decay", choices=DECAY_SHAPES, default="exp", help="decay shape (default exp, MiniCPM's)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="where the branches go (default RUN-wsd)")
    parser.add_argument("--run", dest="train", action="store_true", help="train the branches (else only create them)")
    parser.add_argument("--csv", type=Path, default=None, metavar="FILE", help="points file (default OUT/points.csv)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="train.num_threads of each training process")
    parser.add_argument("--override", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="more config overrides for every branch, e.g. train.eval_batches=50")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    run = Path(os.path.abspath(args.run_dir))  # absolute: RUN may be "." or end in "/"
    # Absolute paths: the CSV's `run` column names a branch the same way from any working directory.
    out = Path(os.path.abspath(args.out)) if args.out is not None else run.with_name(run.name + "-wsd")
    csv_path = args.csv if args.csv is not None else out / "points.csv"

    def body() -> int:
        if args.threads is not None and args.threads < 1:
            raise ToolError(f"--threads: must be positive, got {args.threads}")
        branches = plan_branches(run, args.at, args.decay_frac, args.decay, out,
                                 parse_user_overrides(args.override))
        create_branches(run, branches)
        failed = train_branches(branches, args.threads) if args.train else []
        points = [p for p in (final_point(b) for b in branches) if p is not None]
        if points:
            csv_path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(csv_path, merge_rows(csv_path, points))
            print(format_table(points))
            print(f"wrote {len(points)} point(s) to {csv_path}; fit with: python tools/scaling_law.py fit "
                  f"--csv {csv_path}")
        else:
            print("no finished branch yet" + ("" if args.train else "; train them with --run"))
        return 1 if failed else 0

    return run_tool("wsd_grid", body, {ToolError: 2, ConfigError: 2, CheckpointError: 2},
                    interrupted="interrupted; run the same command again to resume")


if __name__ == "__main__":
    sys.exit(main())
