#!/usr/bin/env python
"""Training-step throughput of a config: tokens/s, the split between forward+backward (with the
gradient reductions) and the optimizer update, peak memory, model FLOPs per token, achieved FLOP/s
and MFU (where the device's peak is known). One process: the trainer's own step (TrainModule).

  python tools/bench_train.py tiny --steps 10
  python tools/bench_train.py tiny --model.hidden_size=512 --model.num_hidden_layers=8 --json
  python tools/bench_train.py tiny --against HEAD~3 --rounds 3   # this tree vs a git ref, as a ratio

``--against REF`` checks REF out into a temporary git worktree and runs this benchmark there and here
alternately, ``--rounds`` times each, in fresh processes on the same machine, then prints both
medians and the ratio (this tree / REF): a speed target is a ratio measured side by side.

The batch is random token ids (the data pipeline is not what this measures); the model, optimizer,
precision and micro-batching are the trainer's own.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from megacpm.config import ConfigError, load_config, validate  # noqa: E402
from megacpm.data.batch import Batch  # noqa: E402
from megacpm.model import count_parameters  # noqa: E402
from megacpm.parallel.context import ParallelContext  # noqa: E402
from megacpm.train.device import param_dtype, resolve_device  # noqa: E402
from megacpm.train.flops import flops_per_token  # noqa: E402
from megacpm.train.train_module import TrainModule  # noqa: E402

# Dense bf16 peak FLOP/s of known accelerators (vendor datasheets), for MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_FLOPS.items():
        if key in name:
            return peak
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(cfg, steps: int, warmup: int) -> dict:
    device = resolve_device(cfg)
    dtype = param_dtype(cfg, device)
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    t = cfg.train
    step_fn = TrainModule(cfg, ParallelContext.single(device), generator=torch.Generator().manual_seed(t.seed),
                          param_dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    tokens_per_step = t.global_batch_size * t.seq_len

    timings = {"forward_backward": [], "optimizer": [], "step": []}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + steps):
        batch = Batch.from_tokens(torch.randint(0, cfg.model.vocab_size, (t.global_batch_size, t.seq_len + 1),
                                                generator=gen))
        synchronize(device)
        start = time.perf_counter()
        _, norm = step_fn.compute_gradients(batch)
        synchronize(device)
        middle = time.perf_counter()
        step_fn.apply_gradients(norm, cfg.optim.lr)
        synchronize(device)
        end = time.perf_counter()
        if i >= warmup:
            for key, value in (("forward_backward", middle - start), ("optimizer", end - middle), ("step", end - start)):
                timings[key].append(value)

    step_s = statistics.median(timings["step"])
    counts = count_parameters(cfg.model)
    flops = flops_per_token(cfg.model, t.seq_len)["training"]
    achieved = flops * tokens_per_step / step_s
    peak = device_peak_flops(device)
    if device.type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated(device)
    else:  # the process's peak resident set (Linux reports KiB)
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "config": cfg.run.name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
        "precision": "bf16 params, fp32 master" if dtype == torch.bfloat16 else "fp32",
        "total_params": counts["total"],
        "non_embedding_params": counts["non_embedding"],
        "tokens_per_step": tokens_per_step,
        "step_s": step_s,
        "tokens_per_sec": tokens_per_step / step_s,
        "forward_backward_s": statistics.median(timings["forward_backward"]),
        "optimizer_s": statistics.median(timings["optimizer"]),
        "flops_per_token": flops,
        "achieved_flops": achieved,
        "mfu": achieved / peak if peak else None,
        "peak_memory_bytes": peak_mem,
        "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
    }


REPO = Path(__file__).resolve().parents[1]


def _run_here_and_there(tree: Path, argv) -> float:
    """tokens/s of this benchmark run (``argv`` without --against) in the checkout ``tree``."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run([sys.executable, str(tree / "tools" / "bench_train.py"), *argv, "--json"], cwd=tree,
                         env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"bench_train: error: the run in {tree} failed:\n{out.stderr.strip()}")
    return json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_sec"]


def compare(ref: str, rounds: int, argv) -> int:
    """This tree against git ``ref``, alternating runs; prints the medians and their ratio."""
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    other = work / "ref"
    try:
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(other), ref], check=True)
        # The reference tree imports its own megacpm: its kernels/ as megacpm.kernels and the built
        # C++ helpers, as an installed checkout would have them.
        (other / "megacpm" / "kernels").symlink_to(other / "kernels")
        for built in REPO.joinpath("megacpm").glob("_C*"):
            shutil.copy2(built, other / "megacpm" / built.name)
        here, there = [], []
        for i in range(rounds):
            there.append(_run_here_and_there(other, argv))
            here.append(_run_here_and_there(REPO, argv))
            print(f"round {i + 1}/{rounds}: {ref} {there[-1]:,.0f} tok/s, this tree {here[-1]:,.0f} tok/s", flush=True)
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(other)], check=False)
        shutil.rmtree(work, ignore_errors=True)
    ratio = statistics.median(here) / statistics.median(there)
    print(f"median tokens/s: {ref} {statistics.median(there):,.0f}, this tree {statistics.median(here):,.0f}; "
          f"ratio {ratio:.3f}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("config", help="preset name or YAML file")
    parser.add_argument("--steps", type=int, default=5, help="measured steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps first")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--against", metavar="REF", help="also run at git REF, alternately, and print the ratio")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each tree with --against")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
        validate(cfg, check_data=False)
    except ConfigError as exc:
        print(f"bench_train: error: {exc}", file=sys.stderr)
        return 2
    if args.against:
        forwarded = [args.config, f"--steps={args.steps}", f"--warmup={args.warmup}", *overrides]
        return compare(args.against, args.rounds, forwarded)
    result = measure(cfg, args.steps, args.warmup)
    if args.json:
        print(json.dumps(result))
        return 0
    step = result["step_s"]
    print(f"config {result['config']} on {result['device']} ({result['precision']}), "
          f"{result['total_params'] / 1e6:.1f}M params ({result['non_embedding_params'] / 1e6:.1f}M non-embedding)")
    print(f"  tokens/s        {result['tokens_per_sec']:,.0f}  ({result['tokens_per_step']} tokens in {step:.3f} s/step)")
    for part in ("forward_backward", "optimizer"):
        print(f"  {part:<17} {result[part + '_s']:.3f} s ({100 * result[part + '_s'] / step:.0f}%)")
    print(f"  FLOPs/token     {result['flops_per_token'] / 1e6:.1f} MFLOP (6N + attention)")
    print(f"  achieved        {result['achieved_flops'] / 1e9:.1f} GFLOP/s"
          + (f", MFU {100 * result['mfu']:.1f}%" if result["mfu"] is not None else " (device peak unknown: no MFU)"))
    print(f"  peak memory     {result['peak_memory_bytes'] / 2**20:.0f} MiB ({result['peak_memory_kind']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
