#!/usr/bin/env python
"""Context parallelism at a fixed sequence length, side by side in one run: per-rank step time and
peak memory against cp, and the bytes each rank moves per layer against the analytic volume.

  python tools/bench_context_parallel.py tiny                       # cp 1, 2, 4 at seq 2048, a minute
  python tools/bench_context_parallel.py tiny --cp 1 2 --train.seq_len=4096 --json
  python tools/bench_context_parallel.py CONFIG --attention ring    # only the ring core

Each cp runs as cp gloo processes on this machine (NCCL and one GPU per rank on CUDA: --device cuda
under torchrun is not needed, the tool spawns them), one training step of train.micro_batch_size
sequences of train.seq_len tokens per rank group (dp 1), through megacpm's TrainModule: the
head-tail split, the cp attention core (parallel.cp_attention: all_gather, ring; ring_masked is the
ring with its masked block kernel instead of the fused chunk pairs it picks without a document
mask; "both", the default, runs all three), RoPE at global positions, the gradient all-reduce over
cp. Reported per cp and core, from every rank:

- step time: the median of --steps steps after --warmup, the slowest rank's;
- peak memory: the rank's peak resident set (CUDA: max_memory_allocated) above its level before
  the step, the largest rank's, and its ratio to cp 1 — the activations of seq_len / cp tokens
  per rank should make it close to 1 / cp; megacpm info's activation estimate beside it;
- bytes per layer: one forward's cp-group traffic (megacpm.parallel.comm_stats) divided by the
  layers, against the analytic forward volume: the all-gather brings each rank (cp - 1) / cp of
  the layer's K and V (counted as the gathered tensor, K and V of the whole sequence, of which
  (cp - 1) / cp arrive); the ring sends cp - 1 blocks of its own K and V.

Peak memory on a CPU is the resident set (the allocator's reuse and the thread pools make it a
noisy measure at small sizes: the ratio is meaningful once the activations dominate, i.e. at long
sequences); step time on a shared-core CPU machine measures the arithmetic, not the overlap the
ring is for.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import get_args

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _entry and the other benches, when imported from its path

import torch  # noqa: E402

from _entry import OneLineParser, run_tool  # noqa: E402
from bench_finetune import PeakMemory  # noqa: E402
from bench_train import random_batches, synchronize  # noqa: E402
from megacpm.config import ConfigError, load_config, validate  # noqa: E402
from megacpm.config.schema import CpAttention  # noqa: E402
from megacpm.model import count_parameters  # noqa: E402
from megacpm.model.minicpm import Attention  # noqa: E402
from megacpm.parallel.comm_stats import CommAccounting  # noqa: E402
from megacpm.parallel.context import ParallelContext  # noqa: E402
from megacpm.parallel.context_parallel import RingAttention  # noqa: E402
from megacpm.parallel.local_launch import run_distributed  # noqa: E402
from megacpm.train.device import param_dtype, resolve_device  # noqa: E402
from megacpm.train.memory import estimate_training_memory  # noqa: E402
from megacpm.train.train_module import TrainModule  # noqa: E402

PROG = "bench_context_parallel"
# The cp cores (parallel.cp_attention), and the ring with its masked block kernel instead of the
# fused chunk pairs it picks without a document mask (megacpm.parallel.context_parallel).
RING_MASKED = "ring_masked"
CORES = (*get_args(CpAttention), RING_MASKED)


class UsageError(Exception):
    pass


def _configure(cfg, cp: int, core: str):
    cfg.parallel.cp, cfg.parallel.cp_attention = cp, "ring" if core == RING_MASKED else core
    cfg.parallel.tp = cfg.parallel.pp = cfg.parallel.vpp = 1
    cfg.parallel.sp = cfg.parallel.zero1 = False
    cfg.train.global_batch_size = cfg.train.micro_batch_size
    return cfg


def _attention_cores(module):
    return [m.attention_fn for m in module.model.modules() if isinstance(m, Attention)]


def _rank_worker(cfg, steps: int, warmup: int, ring_kernel: str = "auto"):
    """One cp layout's measurements on this rank."""
    device = resolve_device(cfg)
    ctx = ParallelContext.initialize(cp=cfg.parallel.cp, timeout_s=cfg.parallel.timeout_s,
                                     device_type=device.type)
    torch.manual_seed(0)
    module = TrainModule(cfg, ctx, generator=torch.Generator().manual_seed(0), param_dtype=param_dtype(cfg, device))
    for attention_fn in _attention_cores(module):
        if isinstance(attention_fn, RingAttention):
            attention_fn.block_kernel = ring_kernel
    batches = random_batches(cfg, warmup + steps)
    with CommAccounting(ctx) as comm:
        module.evaluate(batches[0])  # one forward: the cp group's forward traffic
    forward = {key: value["bytes"] for key, value in comm.summary().items() if key.startswith("cp.")}
    memory = PeakMemory(device)
    for batch in batches[:warmup]:
        module.step(batch, 1e-3)
    times, peak = [], 0
    for batch in batches[warmup:]:
        memory.start()
        synchronize(device)
        start = time.perf_counter()
        module.step(batch, 1e-3)
        synchronize(device)
        times.append(time.perf_counter() - start)
        peak = max(peak, memory.peak())
    ctx.destroy()
    return {"step_s": statistics.median(times), "peak_bytes": peak, "forward_cp_bytes": forward,
            "memory_kind": memory.kind}


def analytic_forward_bytes(cfg, core: str) -> int:
    """Per rank and layer: the all-gather's gathered K and V of the whole sequence (of which
    (cp - 1) / cp arrive), or the ring's cp - 1 sends of the rank's own K and V block."""
    m, t, cp = cfg.model, cfg.train, cfg.parallel.cp
    element = 2 if t.uses_bf16(resolve_device(cfg).type) else 4
    kv = 2 * t.micro_batch_size * m.num_key_value_heads * m.head_dim * element
    if core == "all_gather":
        return kv * t.seq_len
    return kv * (t.seq_len // cp) * (cp - 1)


def measure(base_cfg, cps, cores, steps: int, warmup: int) -> dict:
    import copy

    rows = []
    params = count_parameters(base_cfg.model)["total"]
    for cp in cps:
        for core in (cores if cp > 1 else ("none",)):
            cfg = _configure(copy.deepcopy(base_cfg), cp, core if cp > 1 else "all_gather")
            validate(cfg, world_size=cp, check_data=False)
            # cp 1 runs in this process: a group of one needs no spawn.
            ring_kernel = "masked" if core == RING_MASKED else "auto"
            per_rank = run_distributed(_rank_worker, cp, args=(cfg, steps, warmup, ring_kernel), timeout=1800) \
                if cp > 1 else [_rank_worker(cfg, steps, warmup)]
            estimate = estimate_training_memory(cfg, params, resolve_device(cfg).type, world_size=cp)
            measured_forward = max(sum(r["forward_cp_bytes"].values()) for r in per_rank) / cfg.model.num_hidden_layers
            rows.append({"cp": cp, "core": core, "step_s": max(r["step_s"] for r in per_rank),
                         "tokens_per_s": cfg.train.micro_batch_size * cfg.train.seq_len / max(r["step_s"] for r in per_rank),
                         "peak_bytes": max(r["peak_bytes"] for r in per_rank),
                         "estimated_activation_bytes": estimate["activations"],
                         "forward_bytes_per_layer": measured_forward,
                         "analytic_forward_bytes_per_layer": analytic_forward_bytes(cfg, cfg.parallel.cp_attention)
                         if cp > 1 else 0,
                         "memory_kind": per_rank[0]["memory_kind"]})
    baseline = rows[0]
    for row in rows:
        row["peak_ratio_to_cp1"] = row["peak_bytes"] / baseline["peak_bytes"] if baseline["cp"] == 1 else None
        row["step_ratio_to_cp1"] = row["step_s"] / baseline["step_s"] if baseline["cp"] == 1 else None
    t = base_cfg.train
    return {"seq_len": t.seq_len, "micro_batch_size": t.micro_batch_size, "layers": base_cfg.model.num_hidden_layers,
            "rows": rows}


def print_table(result: dict) -> None:
    print(f"context parallelism at seq_len {result['seq_len']}, micro-batch {result['micro_batch_size']}, "
          f"{result['layers']} layers (per rank; the slowest / largest rank)")
    print(f"{'cp':>3} {'core':<10} {'step s':>8} {'tokens/s':>10} {'peak MiB':>9} {'x cp1':>6} {'est. act MiB':>12} "
          f"{'fwd KiB/layer':>13} {'analytic':>9}")
    for r in result["rows"]:
        ratio = "" if r["peak_ratio_to_cp1"] is None else f"{r['peak_ratio_to_cp1']:.2f}"
        print(f"{r['cp']:>3} {r['core']:<10} {r['step_s']:>8.3f} {r['tokens_per_s']:>10,.0f} "
              f"{r['peak_bytes'] / 2**20:>9.1f} {ratio:>6} {r['estimated_activation_bytes'] / 2**20:>12.1f} "
              f"{r['forward_bytes_per_layer'] / 1024:>13.1f} {r['analytic_forward_bytes_per_layer'] / 1024:>9.1f}")
    print(f"  peak memory: {result['rows'][0]['memory_kind']}")


def main(argv=None) -> int:
    parser = OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                           allow_abbrev=False)
    parser.add_argument("config", help="preset name or YAML file (its model; dp 1, no tp/pp)")
    parser.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4], help="context-parallel sizes (default 1 2 4)")
    parser.add_argument("--attention", choices=(*CORES, "both"), default="both", help="the cp core(s) measured (both: every one)")
    parser.add_argument("--steps", type=int, default=3, help="measured steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps first")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args, overrides = parser.parse_known_args(argv)

    def body() -> int:
        if args.steps < 1 or args.warmup < 0 or any(cp < 1 for cp in args.cp):
            raise UsageError("--steps and every --cp must be >= 1, --warmup >= 0")
        cfg = load_config(args.config, ["--train.seq_len=2048", "--train.micro_batch_size=1", *overrides])
        if cfg.model.rope_scaling is None:
            # A benchmark of the sequence length, not of a model's trained range (RoPE has no weights).
            cfg.model.max_position_embeddings = max(cfg.model.max_position_embeddings, cfg.train.seq_len)
        cores = CORES if args.attention == "both" else (args.attention,)
        result = measure(cfg, sorted(set(args.cp)), cores, args.steps, args.warmup)
        print(json.dumps(result) if args.json else "", end="\n" if args.json else "")
        if not args.json:
            print_table(result)
        return 0

    return run_tool(PROG, body, {ConfigError: 2, UsageError: 2})


if __name__ == "__main__":
    sys.exit(main())
