"""``megacpm VERB ...``: a thin layer that parses arguments and calls library functions.

Every user error (bad config value, unusable checkpoint, diverged run, a run directory in use, a
failure of the disk or the file system) is one line on stderr and a non-zero exit code, never a
traceback. Nothing is created before the config (and, for a resume, the checkpoint) has been
validated. Under torchrun, failures every rank shares are reported by rank 0 alone.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

# Only light modules at the top (the config and pure layout arithmetic, no torch): a bad config or
# argument fails in a fraction of a second. The verbs import torch's heavy parts locally, below.
from megacpm.config import ConfigError, config_to_dict, dump_yaml, load_config, preset_names, validate
from megacpm.config.loader import resolve_source, shown, split_overrides
from megacpm.io.errors import EntryPointError, describe_os_error
from megacpm.io.run_dir import CONFIG_FILE
from megacpm.parallel.layout import ParallelLayout

EXIT_USAGE = 2
EXIT_FAILURE = 1


def _fail(message: str, code: int) -> int:
    print(f"megacpm: error: {message}", file=sys.stderr)
    return code


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


# The fine-tuning verbs: `megacpm VERB` is `megacpm train` with objective.kind VERB.
FINETUNE_VERBS = ("sft", "dpo")


def training_config(config: str, overrides: List[str], kind: Optional[str] = None):
    """The (not yet validated) Config a training verb runs: CONFIG plus the overrides, and for a
    fine-tuning verb (``kind`` sft or dpo) its objective.kind. A config of objective.kind lm (the
    default) takes the verb's kind, unless it is a run directory (that run would be resumed with
    another objective); one of the other fine-tuning kind, or an --objective.kind override that
    contradicts the verb, is a ConfigError naming objective.kind."""
    cfg = load_config(config, overrides)
    if kind is None or cfg.objective.kind == kind:
        return cfg
    verb = f"megacpm {kind}"
    for key, raw in split_overrides(overrides):
        if key == "objective.kind":
            other = f"megacpm {cfg.objective.kind}" if cfg.objective.kind in FINETUNE_VERBS else "megacpm train"
            raise ConfigError(f"--objective.kind={shown(raw)} contradicts '{verb}' (objective.kind {kind}); "
                              f"run it with '{other}', or drop the override", key="objective.kind")
    if cfg.objective.kind != "lm":
        raise ConfigError(f"{shown(config)} has objective.kind {cfg.objective.kind}, not {kind}; run it with "
                          f"'megacpm {cfg.objective.kind}' (or set --objective.kind={kind})", key="objective.kind")
    if resolve_source(config)[2]:
        # Not a fine-tuning of that run: its directory would be resumed with another objective.
        raise ConfigError(f"{shown(config)} is a run directory of objective.kind lm; fine-tune its weights in a "
                          f"new run: {verb} CONFIG --train.init_from={shown(config)}", key="objective.kind")
    cfg.objective.kind = kind
    return cfg


def cmd_train(config: str, overrides: List[str], kind: Optional[str] = None) -> int:
    """`megacpm train` (objective.kind from the config), or with ``kind`` `megacpm sft` / `megacpm dpo`."""
    cfg = training_config(config, overrides, kind)
    validate(cfg, world_size=_world_size())  # before any process group or file exists
    # Imported after validation (start-up speed, not a cycle): a bad config must fail fast, without
    # loading torch's heavy parts.
    from megacpm.checkpoint import CheckpointError, latest_checkpoint
    from megacpm.data import DataError
    from megacpm.io.run_lock import RunLocked
    from megacpm.parallel.context import RankZeroFailed, is_peer_failure
    from megacpm.train.trainer import Trainer, TrainingDiverged

    trainer = None
    try:
        trainer = Trainer(cfg)
        result = trainer.run()
    except RankZeroFailed:
        return EXIT_FAILURE  # rank 0 failed at something done for all, and says so itself
    except (CheckpointError, DataError, TrainingDiverged, RunLocked, EntryPointError) as exc:
        # Global failures reach every rank with the same message: rank 0 speaks for the run.
        if _rank() == 0 or not isinstance(exc, (TrainingDiverged, CheckpointError)):
            _fail(str(exc), EXIT_FAILURE)
        return EXIT_FAILURE
    except OSError as exc:  # the disk or file system: this rank's own failure
        where = f"rank {_rank()}: " if _world_size() > 1 else ""
        return _fail(where + describe_os_error(exc), EXIT_FAILURE)
    except KeyboardInterrupt:
        try:
            last = latest_checkpoint(cfg.run.dir)
        except (CheckpointError, OSError):
            last = None
        return _fail(f"interrupted; {cfg.run.dir} resumes from {last if last else 'its start (no checkpoint yet)'} "
                     f"when started again", 130)
    except Exception as exc:
        if _world_size() == 1 or not is_peer_failure(exc):
            raise  # a bug: keep the traceback
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return _fail(f"rank {os.environ.get('RANK', '?')}: lost contact with another rank (it died, or "
                     f"stalled past parallel.timeout_s={cfg.parallel.timeout_s:g}s); the run stops here and "
                     f"resumes from its last checkpoint when started again. Cause: {first_line}", EXIT_FAILURE)
    finally:
        if trainer is not None:
            trainer.ctx.destroy()
    if result.status == "completed" and trainer.is_rank0:
        summary = f"done: {result.run_dir} at step {result.step}"
        if result.last_eval_loss is not None:
            summary += f", eval_loss {result.last_eval_loss:.4f}"
        print(summary)
    return 0


def model_summary(cfg, world_size: int) -> dict:
    """Sizes, FLOPs and per-rank memory of a config, computed without allocating the model."""
    # Local for start-up speed (these load torch), not for a cycle.
    from megacpm.model import count_parameters
    from megacpm.objectives import OBJECTIVES
    from megacpm.train.flops import flops_per_token
    from megacpm.train.memory import estimate_training_memory

    counts = count_parameters(cfg.model)
    flops = flops_per_token(cfg.model, cfg.train.seq_len)
    device_type = "cuda" if cfg.train.device != "cpu" else "cpu"
    memory = estimate_training_memory(cfg, counts["total"], device_type=device_type, world_size=world_size,
                                      expert_params=counts["experts"])
    # Rows of seq_len tokens: a DPO pair is two (chosen, rejected), and global_batch_size counts pairs.
    rows_per_step = cfg.train.global_batch_size * OBJECTIVES[cfg.objective.kind].rows_per_sample
    tokens_per_step = rows_per_step * cfg.train.seq_len
    layout = ParallelLayout.from_config(cfg.parallel, world_size)
    return {
        "config": cfg.run.name,
        "total_params": counts["total"],
        "non_embedding_params": counts["non_embedding"],
        "embedding_params": counts["embedding"],
        "expert_params": counts["experts"],
        "active_params": counts["active"],
        "active_non_embedding_params": counts["active_non_embedding"],
        "flops_per_token": flops["training"],
        "forward_flops_per_token": flops["forward"],
        "tokens_per_step": tokens_per_step,
        "flops_per_step": flops["training"] * tokens_per_step,
        "layout": {"world_size": world_size, **layout.sizes(), "vpp": layout.vpp, "ep": layout.ep,
                   "description": layout.describe()},
        "memory_per_rank_bytes": memory,
        "resolved_config": config_to_dict(cfg),
    }


def _format_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f}{unit}"
    return str(n)


def cmd_info(config: str, overrides: List[str], as_json: bool, world_size: int) -> int:
    cfg = load_config(config, overrides)
    validate(cfg, world_size=world_size, check_data=False)
    summary = model_summary(cfg, world_size)
    if as_json:
        print(json.dumps(summary, indent=1))
        return 0
    mem = summary["memory_per_rank_bytes"]
    layout = summary["layout"]
    lines = [
        f"config                 {summary['config']}",
        f"total params           {summary['total_params']:,} ({_format_count(summary['total_params'])})",
        f"non-embedding params   {summary['non_embedding_params']:,} "
        f"({_format_count(summary['non_embedding_params'])})",
        f"embedding params       {summary['embedding_params']:,}",
    ]
    if summary["expert_params"]:
        m = cfg.model
        lines += [f"experts                {m.num_experts} per layer, top-{m.num_experts_per_tok}: "
                  f"{summary['expert_params']:,} expert params",
                  f"active params / token  {summary['active_params']:,} ({_format_count(summary['active_params'])}; "
                  f"non-embedding {_format_count(summary['active_non_embedding_params'])})"]
    lines += [
        f"training FLOPs/token   {_format_count(summary['flops_per_token'])}",
        f"tokens per step        {summary['tokens_per_step']:,}",
        f"layout                 world {layout['world_size']} = {layout['description']}",
        "memory per rank (estimate of one training step):",
    ]
    lines += [f"  {k:<20} {v / 2**30:9.3f} GiB" for k, v in mem.items()]
    lines += ["resolved config:", *("  " + line for line in dump_yaml(cfg).splitlines())]
    print("\n".join(lines))
    return 0


def cmd_branch(source: str, new_run: str, overrides: List[str]) -> int:
    """A new run from a checkpoint of another run, with overrides; the parent is only read."""
    # Local for start-up speed (the checkpoint manager loads torch.distributed), not for a cycle.
    from megacpm.checkpoint import CheckpointError
    from megacpm.checkpoint.branch import create_branch, resolve_checkpoint

    try:
        checkpoint = resolve_checkpoint(source)
    except CheckpointError as exc:
        return _fail(str(exc), EXIT_FAILURE)
    # The branch's config: the checkpoint's own, the overrides on top, the new directory as run.dir.
    cfg = load_config(str(checkpoint / CONFIG_FILE), [*overrides, f"--run.dir={new_run}"])
    validate(cfg, world_size=1, check_data=True)
    try:
        path = create_branch(checkpoint, Path(new_run), cfg, overrides)
    except CheckpointError as exc:
        return _fail(str(exc), EXIT_FAILURE)
    print(f"branched {path} from {checkpoint} (step {checkpoint.name.split('_')[1]}); "
          f"continue it with: megacpm train {path}")
    return 0


def cmd_upcycle(source: str, new_run: str, overrides: List[str], router_seed: Optional[int], router_std: float,
                optimizer: str) -> int:
    """A new MoE run from a dense checkpoint: every MLP copied into experts, a new router."""
    # Local for start-up speed (DCP and the model), not for a cycle.
    from megacpm.checkpoint import CheckpointError
    from megacpm.checkpoint.branch import resolve_checkpoint
    from megacpm.checkpoint.upcycle import check_upcycle_source, create_upcycled_run, upcycle_defaults

    if not 0 < router_std < float("inf"):
        return _fail(f"--router-std: must be a positive number, got {router_std}", EXIT_USAGE)
    try:
        checkpoint = resolve_checkpoint(source)
        check_upcycle_source(checkpoint)  # before the config: an MoE source is the clearer refusal
    except CheckpointError as exc:
        return _fail(str(exc), EXIT_FAILURE)
    cfg = load_config(str(checkpoint / CONFIG_FILE), [*upcycle_defaults(overrides), *overrides,
                                                       f"--run.dir={new_run}"])
    validate(cfg, world_size=1, check_data=True)
    seed = cfg.train.seed if router_seed is None else router_seed
    try:
        path = create_upcycled_run(checkpoint, Path(new_run), cfg, overrides, router_seed=seed,
                                   router_std=router_std, optimizer=optimizer)
    except CheckpointError as exc:
        return _fail(str(exc), EXIT_FAILURE)
    m = cfg.model
    print(f"upcycled {path} from {checkpoint} (step {checkpoint.name.split('_')[1]}): {m.num_experts} experts, "
          f"top-{m.num_experts_per_tok}, router seed {seed}; continue it with: megacpm train {path}")
    return 0


def cmd_runs(root: str) -> int:
    from megacpm.checkpoint.branch import find_runs, format_tree  # local: start-up speed, as above

    if not Path(root).is_dir():
        return _fail(f"{root}: not a directory", EXIT_USAGE)
    print(format_tree(Path(root), find_runs(Path(root))))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megacpm", allow_abbrev=False,
        description="Train MiniCPM-family models (muP, WSD, 3D parallelism), then fine-tune them (SFT, DPO).",
        epilog=f"presets: {', '.join(preset_names())}",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    train = verbs.add_parser("train", allow_abbrev=False, help="pretrain or continue a run (any objective.kind)",
                             description="Pretrain or continue a run; objective.kind (lm, sft, dpo) comes from "
                                         "the config. Overrides: --section.key=value.")
    train.add_argument("config", help="preset name, YAML file or run directory")
    for verb, what, data in (("sft", "supervised fine-tuning on chat samples", "sft"),
                             ("dpo", "direct preference optimisation on (chosen, rejected) pairs", "preference")):
        finetune = verbs.add_parser(
            verb, allow_abbrev=False, help=f"{verb.upper()}: train with objective.kind {verb}",
            description=f"{what[0].upper() + what[1:]}: 'megacpm train' with objective.kind {verb} (a config "
                        f"of kind lm takes it). Needs data.source {data}; train.init_from names the weights to "
                        f"start from. Overrides: --section.key=value.")
        finetune.add_argument("config", help="preset name, YAML file or run directory")
    info = verbs.add_parser("info", allow_abbrev=False, help="parameters, FLOPs and memory of a config")
    info.add_argument("config", help="preset name, YAML file or run directory")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.add_argument("--world-size", type=int, default=None,
                      help="plan for this many ranks (default: $WORLD_SIZE or 1)")
    branch = verbs.add_parser("branch", allow_abbrev=False, help="start a new run from a checkpoint",
                              description="Start NEW_RUN_DIR from SOURCE (a run directory: its latest "
                                          "checkpoint; or one checkpoint directory) with overrides, e.g. "
                                          "a decay schedule or a new data mixture. The parent is not modified.")
    branch.add_argument("source", help="run directory or checkpoints/step_N directory")
    branch.add_argument("new_run", help="the new run directory (must not exist)")
    upcycle = verbs.add_parser(
        "upcycle", allow_abbrev=False, help="turn a dense checkpoint into a mixture-of-experts run",
        description="Sparse upcycling: start NEW_RUN_DIR from the dense SOURCE (a run directory: its latest "
                    "checkpoint; or one checkpoint directory) with every MLP copied into model.num_experts "
                    "experts (default 8, top model.num_experts_per_tok = 2) and a new router. Further "
                    "overrides as for branch. The parent is not modified.")
    upcycle.add_argument("source", help="dense run directory or checkpoints/step_N directory")
    upcycle.add_argument("new_run", help="the new run directory (must not exist)")
    upcycle.add_argument("--router-seed", type=int, default=None,
                         help="seed of the routers' N(0, std^2) draw, recorded in lineage.json (default: train.seed)")
    upcycle.add_argument("--router-std", type=float, default=0.1, help="the routers' initial std (default 0.1)")
    upcycle.add_argument("--optimizer", choices=("carry", "reset"), default="carry",
                         help="carry: AdamW's moments go on (each expert takes its dense weight's, the router "
                              "starts at zero); reset: a fresh optimizer (default carry)")
    runs = verbs.add_parser("runs", allow_abbrev=False, help="the tree of runs and branches under a directory")
    runs.add_argument("root", help="directory holding run directories")
    return parser


def _quiet_broken_pipe() -> int:
    # stdout's reader went away (`megacpm info CONFIG --json | head`): not a failure of ours.
    # Point stdout at /dev/null so the interpreter's final flush does not raise again.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    try:
        if args.verb == "train":
            return cmd_train(args.config, overrides)
        if args.verb in FINETUNE_VERBS:
            return cmd_train(args.config, overrides, kind=args.verb)
        if args.verb == "branch":
            return cmd_branch(args.source, args.new_run, overrides)
        if args.verb == "upcycle":
            return cmd_upcycle(args.source, args.new_run, overrides, args.router_seed, args.router_std,
                               args.optimizer)
        if args.verb == "runs":
            return cmd_runs(args.root) if not overrides else _fail(f"unexpected arguments {overrides}", EXIT_USAGE)
        if args.verb == "info":
            return cmd_info(args.config, overrides, args.json, args.world_size or _world_size())
    except ConfigError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except EntryPointError as exc:
        return _fail(str(exc), EXIT_FAILURE)
    except OSError as exc:
        if isinstance(exc, BrokenPipeError):
            return _quiet_broken_pipe()
        return _fail(describe_os_error(exc), EXIT_FAILURE)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    parser.error(f"unknown verb {args.verb}")
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
